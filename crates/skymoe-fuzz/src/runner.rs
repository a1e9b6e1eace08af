//! The mutation fuzzer: runs a target on its seeds, then on mutants of its pool for a given
//! time or number of runs. A mutant whose outcome fingerprint (see [`Target::run`]) has not
//! been seen joins the pool. Every input runs under `catch_unwind`; a watchdog thread ends the
//! process on an input that runs too long, and [`crate::alloc::LimitAlloc`] (when it is the
//! global allocator) on one that allocates too much. Each finding's input is written to the
//! findings directory before the process reports it.

use std::collections::HashSet;
use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use crate::alloc;
use crate::mutate::Mutator;
use crate::targets::{seeds, Target};

/// Exit status after a panic.
pub const EXIT_PANIC: i32 = 70;
/// Exit status after an input ran past the time limit.
pub const EXIT_HANG: i32 = 71;
/// Exit status after an allocation over the limit (the process aborts; a supervising
/// process sees SIGABRT).
pub const EXIT_OOM: i32 = 134;

/// How to fuzz one target.
#[derive(Debug, Clone)]
pub struct Options {
    /// The target.
    pub target: Target,
    /// Stop after this long (the seeds always run to the end first).
    pub duration: Option<Duration>,
    /// Stop after this many runs (seeds included).
    pub runs: Option<u64>,
    /// Seed of the mutator.
    pub seed: u64,
    /// Longest input produced by mutation.
    pub max_len: usize,
    /// One input running longer than this is a hang.
    pub timeout: Duration,
    /// The repository's `fixtures/` directory (seeds).
    pub fixtures: PathBuf,
    /// Where findings are written.
    pub findings: PathBuf,
    /// Where to write the inputs that showed new behaviour (a corpus to minimise and keep).
    pub save_corpus: Option<PathBuf>,
    /// Keep going after a panic (hangs and allocations over the limit always stop).
    pub keep_going: bool,
    /// Largest pool of inputs kept for mutation.
    pub max_pool: usize,
    /// Largest total size of the pool in bytes.
    pub max_pool_bytes: usize,
}

/// A bug found: what happened and where its input was written.
#[derive(Debug, Clone)]
pub struct Finding {
    /// `crash`, `hang` or `oom`.
    pub kind: &'static str,
    /// The panic message, or what went over the limit.
    pub message: String,
    /// The input, as written.
    pub path: PathBuf,
}

/// What a fuzzing run did.
#[derive(Debug, Clone)]
pub struct Report {
    /// The target.
    pub target: Target,
    /// Inputs run (seeds and mutants).
    pub runs: u64,
    /// Seeds run.
    pub seeds: usize,
    /// Distinct outcome fingerprints seen.
    pub behaviours: usize,
    /// Inputs in the pool at the end.
    pub pool: usize,
    /// Wall time.
    pub elapsed: Duration,
    /// Most heap bytes one input took beyond what was live before it (0 without the
    /// limiting allocator).
    pub peak_heap: usize,
    /// Panics found (hangs and allocations over the limit end the process).
    pub findings: Vec<Finding>,
}

/// What the watchdog and the allocation hook need to save the input that is running.
struct Current {
    target: &'static str,
    findings: PathBuf,
    input: Vec<u8>,
}

static CURRENT: Mutex<Option<Current>> = Mutex::new(None);
/// Milliseconds since `epoch()` when the running input started, 0 when none is running.
static STARTED_MS: AtomicU64 = AtomicU64::new(0);
static TIMEOUT_MS: AtomicU64 = AtomicU64::new(10_000);
static WATCHDOG: AtomicBool = AtomicBool::new(false);
static PANIC_MESSAGE: Mutex<Option<String>> = Mutex::new(None);
/// Most heap bytes one input has taken so far.
static INPUT_PEAK: AtomicUsize = AtomicUsize::new(0);

fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

fn now_ms() -> u64 {
    epoch().elapsed().as_millis() as u64 + 1
}

/// A 64-bit FNV-1a hash, used to name finding files.
pub fn fnv(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ b as u64).wrapping_mul(0x0100_0000_01b3)
    })
}

/// Write a finding's input as `<findings>/<target>/<kind>-<hash>` and return the path.
pub fn save_input(findings: &Path, target: &str, kind: &str, input: &[u8]) -> PathBuf {
    let dir = findings.join(target);
    let _ = std::fs::create_dir_all(&dir);
    let path = dir.join(format!("{kind}-{:016x}", fnv(input)));
    if let Err(e) = std::fs::write(&path, input) {
        eprintln!("cannot write {}: {e}", path.display());
    }
    path
}

/// Report a finding that ends the process: save the running input and say what happened.
fn fatal(kind: &'static str, message: &str) {
    let guard = CURRENT.try_lock();
    match guard.as_ref().ok().and_then(|g| g.as_ref()) {
        Some(c) => {
            let path = save_input(&c.findings, c.target, kind, &c.input);
            eprintln!(
                "\n== FINDING ({kind}) in target {}: {message}\n   input ({} bytes) saved to {}",
                c.target,
                c.input.len(),
                path.display()
            );
            eprintln!(
                "   reproduce: skymoe-fuzz run {} {}",
                c.target,
                path.display()
            );
        }
        None => eprintln!("\n== FINDING ({kind}): {message} (no input recorded)"),
    }
    eprintln!("{}", std::backtrace::Backtrace::force_capture());
}

fn on_oversize(what: alloc::Oversize) {
    fatal("oom", &format!("{what}"));
}

/// Install the panic hook (panics are recorded, not printed), the allocation hook and the
/// watchdog thread. Idempotent.
pub fn install(timeout: Duration) {
    TIMEOUT_MS.store(timeout.as_millis().max(1) as u64, Ordering::SeqCst);
    alloc::set_oversize_hook(on_oversize);
    std::panic::set_hook(Box::new(|info| {
        let msg = format!("{info}");
        if let Ok(mut m) = PANIC_MESSAGE.lock() {
            *m = Some(msg);
        }
    }));
    if WATCHDOG.swap(true, Ordering::SeqCst) {
        return;
    }
    let _ = epoch();
    std::thread::spawn(|| loop {
        std::thread::sleep(Duration::from_millis(100));
        let started = STARTED_MS.load(Ordering::SeqCst);
        if started == 0 {
            continue;
        }
        let ran = now_ms().saturating_sub(started);
        if ran > TIMEOUT_MS.load(Ordering::SeqCst) {
            fatal("hang", &format!("one input ran for more than {ran} ms"));
            std::process::exit(EXIT_HANG);
        }
    });
}

/// Run one input under the watchdog; `Err` holds the panic message.
pub fn run_one(target: Target, findings: &Path, input: &[u8]) -> Result<u64, String> {
    if let Ok(mut c) = CURRENT.lock() {
        match c.as_mut() {
            Some(c) if c.target == target.name() => {
                c.input.clear();
                c.input.extend_from_slice(input);
            }
            _ => {
                *c = Some(Current {
                    target: target.name(),
                    findings: findings.to_path_buf(),
                    input: input.to_vec(),
                })
            }
        }
    }
    let base = alloc::live_bytes();
    alloc::reset_peak();
    STARTED_MS.store(now_ms(), Ordering::SeqCst);
    let r = std::panic::catch_unwind(AssertUnwindSafe(|| target.run(input)));
    STARTED_MS.store(0, Ordering::SeqCst);
    INPUT_PEAK.fetch_max(alloc::peak_bytes().saturating_sub(base), Ordering::Relaxed);
    r.map_err(|_| {
        PANIC_MESSAGE
            .lock()
            .ok()
            .and_then(|mut m| m.take())
            .unwrap_or_else(|| "panic".into())
    })
}

/// Fuzz one target as `opts` says.
pub fn fuzz(opts: &Options) -> Report {
    install(opts.timeout);
    INPUT_PEAK.store(0, Ordering::Relaxed);
    let start = Instant::now();
    let seeds = seeds(opts.target, &opts.fixtures);
    let dict = opts.target.dictionary();
    let mut pool: Vec<Vec<u8>> = Vec::new();
    let mut seen = HashSet::new();
    let mut report = Report {
        target: opts.target,
        runs: 0,
        seeds: seeds.len(),
        behaviours: 0,
        pool: 0,
        elapsed: Duration::ZERO,
        peak_heap: 0,
        findings: Vec::new(),
    };
    if let Some(dir) = &opts.save_corpus {
        let _ = std::fs::create_dir_all(dir);
    }
    let record_panic = |report: &mut Report, input: &[u8], message: String| {
        let path = save_input(&opts.findings, opts.target.name(), "crash", input);
        eprintln!(
            "\n== FINDING (crash) in target {}: {message}\n   input ({} bytes) saved to {}",
            opts.target.name(),
            input.len(),
            path.display()
        );
        report.findings.push(Finding {
            kind: "crash",
            message,
            path,
        });
    };
    let done = |report: &Report| {
        opts.runs.is_some_and(|n| report.runs >= n)
            || opts.duration.is_some_and(|d| start.elapsed() >= d)
            || (!opts.keep_going && !report.findings.is_empty())
    };
    for (label, input) in &seeds {
        report.runs += 1;
        match run_one(opts.target, &opts.findings, input) {
            Ok(fp) => {
                seen.insert(fp);
            }
            Err(m) => record_panic(&mut report, input, format!("{m} (seed {label})")),
        }
        pool.push(input.clone());
        if !opts.keep_going && !report.findings.is_empty() {
            break;
        }
    }
    if pool.is_empty() {
        pool.push(Vec::new());
    }
    let mut pool_bytes: usize = pool.iter().map(Vec::len).sum();
    let mut m = Mutator::new(opts.seed, opts.max_len);
    let mut last_status = Instant::now();
    let mut buf = Vec::new();
    while !done(&report) {
        let a = m.rng.below(pool.len());
        let b = m.rng.below(pool.len());
        buf.clear();
        buf.extend_from_slice(&pool[a]);
        m.mutate(&mut buf, &pool[b], dict);
        report.runs += 1;
        match run_one(opts.target, &opts.findings, &buf) {
            Ok(fp) => {
                if seen.insert(fp) {
                    if let Some(dir) = &opts.save_corpus {
                        let _ = std::fs::write(dir.join(format!("{:016x}", fnv(&buf))), &buf);
                    }
                    if pool.len() < opts.max_pool && pool_bytes + buf.len() <= opts.max_pool_bytes {
                        pool_bytes += buf.len();
                        pool.push(buf.clone());
                    } else {
                        let i = seeds.len() + m.rng.below(pool.len() - seeds.len().min(pool.len()));
                        if i < pool.len()
                            && pool_bytes - pool[i].len() + buf.len() <= opts.max_pool_bytes
                        {
                            pool_bytes = pool_bytes - pool[i].len() + buf.len();
                            pool[i] = buf.clone();
                        }
                    }
                }
            }
            Err(msg) => record_panic(&mut report, &buf, msg),
        }
        if last_status.elapsed() >= Duration::from_secs(10) {
            last_status = Instant::now();
            let secs = start.elapsed().as_secs_f64();
            eprintln!(
                "   {}: {} runs in {secs:.0} s ({:.0}/s), {} behaviours, pool {}",
                opts.target.name(),
                report.runs,
                report.runs as f64 / secs,
                seen.len(),
                pool.len()
            );
        }
    }
    report.behaviours = seen.len();
    report.pool = pool.len();
    report.elapsed = start.elapsed();
    report.peak_heap = INPUT_PEAK.load(Ordering::Relaxed);
    report
}
