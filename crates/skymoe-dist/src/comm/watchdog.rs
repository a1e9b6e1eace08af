//! A watchdog that ends the process when a collective takes too long.
//!
//! MPI has no timeouts: a peer that hangs (or a network that does) blocks every other rank
//! forever. The watchdog thread checks when the current collective started; past the timeout
//! it prints which rank waited on which operation and exits with status 124, and `mpirun`
//! then stops the other ranks.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Names of the operations, indexed by the value stored while one runs.
const OPS: [&str; 12] = [
    "idle",
    "all_reduce",
    "all_reduce_f64",
    "all_reduce_min",
    "reduce_scatter",
    "all_gather",
    "all_to_all_v",
    "send",
    "recv",
    "broadcast",
    "barrier",
    "split",
];

/// Watches the collectives of one process.
#[derive(Debug, Clone)]
pub struct Watchdog {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    rank: usize,
    timeout: Duration,
    epoch: Instant,
    /// Milliseconds since `epoch` when the current operation started (0: none running).
    started_ms: AtomicU64,
    op: AtomicUsize,
}

/// Marks one operation as running while it lives.
pub struct Guard<'a> {
    dog: &'a Watchdog,
}

impl Drop for Guard<'_> {
    fn drop(&mut self) {
        self.dog.inner.started_ms.store(0, Ordering::SeqCst);
        self.dog.inner.op.store(0, Ordering::SeqCst);
    }
}

impl Watchdog {
    /// Start watching: a collective running longer than `timeout` ends the process.
    pub fn start(rank: usize, timeout: Duration) -> Self {
        let dog = Watchdog {
            inner: Arc::new(Inner {
                rank,
                timeout,
                epoch: Instant::now(),
                started_ms: AtomicU64::new(0),
                op: AtomicUsize::new(0),
            }),
        };
        let watched = dog.inner.clone();
        let poll = (timeout / 10).clamp(Duration::from_millis(10), Duration::from_secs(1));
        std::thread::Builder::new()
            .name("skymoe-comm-watchdog".into())
            .spawn(move || loop {
                std::thread::sleep(poll);
                let started = watched.started_ms.load(Ordering::SeqCst);
                if started == 0 {
                    continue;
                }
                let now = watched.epoch.elapsed().as_millis() as u64;
                if now.saturating_sub(started) > watched.timeout.as_millis() as u64 {
                    let op = OPS
                        .get(watched.op.load(Ordering::SeqCst))
                        .copied()
                        .unwrap_or("collective");
                    eprintln!(
                        "error: rank {}: {op} did not complete within {:.0} s (a peer died or hangs); stopping",
                        watched.rank,
                        watched.timeout.as_secs_f64()
                    );
                    std::process::exit(124);
                }
            })
            .expect("spawn the watchdog thread");
        dog
    }

    /// Mark `op` (one of the names above) as running until the guard drops.
    pub fn watch(&self, op: &'static str) -> Guard<'_> {
        let index = OPS.iter().position(|&o| o == op).unwrap_or(0);
        let now = self.inner.epoch.elapsed().as_millis() as u64;
        self.inner.op.store(index, Ordering::SeqCst);
        self.inner.started_ms.store(now.max(1), Ordering::SeqCst);
        Guard { dog: self }
    }
}
