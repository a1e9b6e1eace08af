//! Data parallelism for the trainer: [`skymoe_train::trainer::ReplicaSync`] over a
//! communicator (the layout's DP group).

use skymoe_train::trainer::ReplicaSync;
use skymoe_train::TrainError;

use crate::comm::Communicator;

/// The trainer's replica synchronisation over a data-parallel group.
pub struct DataParallel {
    comm: Box<dyn Communicator>,
}

impl DataParallel {
    /// Synchronise over `comm`.
    pub fn new(comm: Box<dyn Communicator>) -> Self {
        DataParallel { comm }
    }
}

fn err(e: crate::comm::CommError) -> TrainError {
    TrainError::Replica(e.to_string())
}

impl ReplicaSync for DataParallel {
    fn rank(&self) -> usize {
        self.comm.rank()
    }

    fn replicas(&self) -> usize {
        self.comm.size()
    }

    fn sum_f32(&self, data: &mut [f32]) -> skymoe_train::Result<()> {
        self.comm.all_reduce_sum(data).map_err(err)
    }

    fn sum_f64(&self, data: &mut [f64]) -> skymoe_train::Result<()> {
        self.comm.all_reduce_sum_f64(data).map_err(err)
    }

    fn all_ok(&self, ok: bool) -> skymoe_train::Result<bool> {
        let mut flag = [u64::from(ok)];
        self.comm.all_reduce_min_u64(&mut flag).map_err(err)?;
        Ok(flag[0] == 1)
    }
}
