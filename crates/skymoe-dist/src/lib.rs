//! skymoe-dist: training over many processes.
//!
//! - [`comm`]: one [`comm::Communicator`] trait for collectives, with a single-process engine
//!   and OpenMPI (feature `mpi`).
//! - [`mesh`]: the groups of a parallel layout (attention: pp × dp × tp; experts:
//!   pp × expert-dp × ep × etp).
//! - [`data_parallel`]: the trainer's gradient and metric synchronisation over a DP group.

pub mod comm;
pub mod data_parallel;
pub mod mesh;
pub mod model_parallel;
