//! The processes of a run: one, or many under `mpirun` (feature `mpi`).

use std::time::Duration;

use skymoe_dist::comm::{Communicator, SingleProcess};

/// Environment variables that MPI launchers set in every process they start.
const LAUNCHER_VARS: [&str; 3] = ["OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK"];

/// Give each process of this node an equal share of its cores for intra-op threads (unless
/// `RAYON_NUM_THREADS` is set): ranks on one node would otherwise each start a thread per
/// core and fight over them. Runs before any thread pool exists.
#[cfg(feature = "mpi")]
fn share_cores_between_local_ranks() {
    if std::env::var_os("RAYON_NUM_THREADS").is_some() {
        return;
    }
    let local = std::env::var("OMPI_COMM_WORLD_LOCAL_SIZE")
        .ok()
        .and_then(|s| s.parse::<usize>().ok())
        .unwrap_or(1)
        .max(1);
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let threads = (cores / local).max(1);
    // Read by the thread pool when it starts and by the matrix products on every call.
    std::env::set_var("RAYON_NUM_THREADS", threads.to_string());
}

/// This process's place among the processes of the run.
pub struct Processes {
    /// Processes in the run.
    pub world: usize,
    /// This process's rank.
    pub rank: usize,
    #[cfg(feature = "mpi")]
    runtime: Option<skymoe_dist::comm::mpi_engine::MpiRuntime>,
}

impl Processes {
    /// One process, or the MPI job this process was started in.
    pub fn detect() -> anyhow::Result<Self> {
        let launched = LAUNCHER_VARS.iter().any(|v| std::env::var_os(v).is_some());
        #[cfg(feature = "mpi")]
        {
            if launched {
                share_cores_between_local_ranks();
                let runtime = skymoe_dist::comm::mpi_engine::MpiRuntime::init()
                    .ok_or_else(|| anyhow::anyhow!("MPI was already initialised"))?;
                let world = runtime.world_size();
                let rank = runtime.world_rank();
                return Ok(Processes {
                    world,
                    rank,
                    runtime: Some(runtime),
                });
            }
            Ok(Processes {
                world: 1,
                rank: 0,
                runtime: None,
            })
        }
        #[cfg(not(feature = "mpi"))]
        {
            let many = std::env::var("OMPI_COMM_WORLD_SIZE")
                .ok()
                .and_then(|s| s.parse::<usize>().ok())
                .is_some_and(|n| n > 1);
            if launched && many {
                anyhow::bail!(
                    "started under mpirun, but this skymoe was built without multi-process support; rebuild with `cargo build --release --features mpi`"
                );
            }
            Ok(Processes { world: 1, rank: 0 })
        }
    }

    /// The communicator of all processes; a collective waiting longer than `timeout` ends
    /// the process with a message naming its rank.
    pub fn world_comm(&self, timeout: Duration) -> Box<dyn Communicator> {
        #[cfg(feature = "mpi")]
        if let Some(rt) = &self.runtime {
            return Box::new(rt.world(timeout));
        }
        let _ = timeout;
        Box::new(SingleProcess)
    }

    /// Room for `bytes` of detached sends (pipeline activations and gradients in flight).
    pub fn reserve_send_buffer(&mut self, bytes: usize) {
        #[cfg(feature = "mpi")]
        if let Some(rt) = &mut self.runtime {
            rt.reserve_send_buffer(bytes);
        }
        let _ = bytes;
    }

    /// Report `error` as this rank's and end every process of the run with a failure.
    pub fn fail(&self, error: &anyhow::Error) -> ! {
        if self.world > 1 {
            eprintln!("error: rank {}: {error:#}", self.rank);
        } else {
            eprintln!("error: {error:#}");
        }
        #[cfg(feature = "mpi")]
        if let Some(rt) = &self.runtime {
            if self.world > 1 {
                rt.abort(1);
            }
        }
        std::process::exit(1)
    }
}
