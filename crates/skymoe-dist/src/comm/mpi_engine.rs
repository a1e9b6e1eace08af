//! OpenMPI through the `mpi` crate.

use std::time::Duration;

use mpi::collective::{CommunicatorCollectives, Root, SystemOperation};
use mpi::datatype::{Partition, PartitionMut};
use mpi::environment::Universe;
use mpi::point_to_point::{Destination, Source};
use mpi::topology::{Color, Communicator as _, SimpleCommunicator};
use mpi::Count;

use super::{check_blocks, count_payload, CommError, Communicator, Result, Watchdog};

/// The MPI library, initialised for this process; finalised when dropped.
pub struct MpiRuntime {
    universe: Universe,
}

impl MpiRuntime {
    /// Initialise MPI. `None` when it was initialised before in this process.
    pub fn init() -> Option<Self> {
        mpi::initialize().map(|universe| MpiRuntime { universe })
    }

    /// Processes in the job (`mpirun -np N`).
    pub fn world_size(&self) -> usize {
        self.universe.world().size() as usize
    }

    /// This process's rank in the job.
    pub fn world_rank(&self) -> usize {
        self.universe.world().rank() as usize
    }

    /// Attach a buffer of `bytes` for [`Communicator::send_detached`] (MPI's buffered mode):
    /// detached sends copy into it and return at once; the buffer must hold every message not
    /// yet received.
    pub fn reserve_send_buffer(&mut self, bytes: usize) {
        if bytes > self.universe.buffer_size() {
            self.universe.set_buffer_size(bytes);
        }
    }

    /// The communicator of every process, watched with `timeout`.
    pub fn world(&self, timeout: Duration) -> MpiComm {
        let world = self.universe.world();
        let rank = world.rank() as usize;
        MpiComm {
            comm: world,
            dog: Watchdog::start(rank, timeout),
        }
    }

    /// End every process of the job with `code` (after an error on one rank, so that no
    /// other rank waits for it).
    pub fn abort(&self, code: i32) -> ! {
        self.universe.world().abort(code)
    }
}

/// A communicator over MPI processes.
pub struct MpiComm {
    comm: SimpleCommunicator,
    dog: Watchdog,
}

fn counts(
    rank: usize,
    op: &'static str,
    v: &[usize],
    size: usize,
) -> Result<(Vec<Count>, Vec<Count>)> {
    if v.len() != size {
        return Err(CommError::Invalid {
            rank,
            op,
            msg: format!("{} counts for {size} ranks", v.len()),
        });
    }
    let mut displs = Vec::with_capacity(size);
    let mut at: usize = 0;
    for &c in v {
        displs.push(Count::try_from(at).map_err(|_| CommError::Invalid {
            rank,
            op,
            msg: "more than 2^31 elements".into(),
        })?);
        at += c;
    }
    let c = v
        .iter()
        .map(|&c| Count::try_from(c))
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|_| CommError::Invalid {
            rank,
            op,
            msg: "more than 2^31 elements".into(),
        })?;
    Ok((c, displs))
}

impl MpiComm {
    /// An error unless `peer` is a rank of this group.
    fn check_peer(&self, op: &'static str, peer: usize) -> Result<()> {
        if peer >= self.size() {
            return Err(CommError::Invalid {
                rank: self.rank(),
                op,
                msg: format!("no rank {peer} in a group of {}", self.size()),
            });
        }
        Ok(())
    }
}

impl Communicator for MpiComm {
    fn rank(&self) -> usize {
        self.comm.rank() as usize
    }

    fn size(&self) -> usize {
        self.comm.size() as usize
    }

    fn all_reduce_sum(&self, data: &mut [f32]) -> Result<()> {
        let _g = self.dog.watch("all_reduce");
        count_payload(data.len(), 4);
        let send = data.to_vec();
        self.comm
            .all_reduce_into(&send[..], data, SystemOperation::sum());
        Ok(())
    }

    fn all_reduce_sum_f64(&self, data: &mut [f64]) -> Result<()> {
        let _g = self.dog.watch("all_reduce_f64");
        count_payload(data.len(), 8);
        let send = data.to_vec();
        self.comm
            .all_reduce_into(&send[..], data, SystemOperation::sum());
        Ok(())
    }

    fn all_reduce_min_u64(&self, data: &mut [u64]) -> Result<()> {
        let _g = self.dog.watch("all_reduce_min");
        let send = data.to_vec();
        self.comm
            .all_reduce_into(&send[..], data, SystemOperation::min());
        Ok(())
    }

    fn reduce_scatter_sum(&self, send: &[f32], recv: &mut [f32]) -> Result<()> {
        check_blocks(
            self.rank(),
            "reduce_scatter",
            send.len(),
            recv.len(),
            self.size(),
        )?;
        let _g = self.dog.watch("reduce_scatter");
        count_payload(send.len(), 4);
        self.comm
            .reduce_scatter_block_into(send, recv, SystemOperation::sum());
        Ok(())
    }

    fn all_gather(&self, send: &[f32], recv: &mut [f32]) -> Result<()> {
        check_blocks(
            self.rank(),
            "all_gather",
            recv.len(),
            send.len(),
            self.size(),
        )?;
        let _g = self.dog.watch("all_gather");
        count_payload(send.len(), 4);
        self.comm.all_gather_into(send, recv);
        Ok(())
    }

    fn all_to_all_v(
        &self,
        send: &[f32],
        send_counts: &[usize],
        recv_counts: &[usize],
    ) -> Result<Vec<f32>> {
        let (rank, size) = (self.rank(), self.size());
        if send_counts.iter().sum::<usize>() != send.len() {
            return Err(CommError::Invalid {
                rank,
                op: "all_to_all_v",
                msg: format!(
                    "send counts add up to {}, the buffer has {}",
                    send_counts.iter().sum::<usize>(),
                    send.len()
                ),
            });
        }
        let (sc, sd) = counts(rank, "all_to_all_v", send_counts, size)?;
        let (rc, rd) = counts(rank, "all_to_all_v", recv_counts, size)?;
        let mut out = vec![0f32; recv_counts.iter().sum()];
        let _g = self.dog.watch("all_to_all_v");
        count_payload(send.len(), 4);
        {
            let sendbuf = Partition::new(send, &sc[..], &sd[..]);
            let mut recvbuf = PartitionMut::new(&mut out[..], &rc[..], &rd[..]);
            self.comm.all_to_all_varcount_into(&sendbuf, &mut recvbuf);
        }
        Ok(out)
    }

    fn send(&self, data: &[f32], dest: usize, tag: i32) -> Result<()> {
        self.check_peer("send", dest)?;
        let _g = self.dog.watch("send");
        count_payload(data.len(), 4);
        self.comm
            .process_at_rank(dest as i32)
            .send_with_tag(data, tag);
        Ok(())
    }

    fn send_detached(&self, data: &[f32], dest: usize, tag: i32) -> Result<()> {
        self.check_peer("send", dest)?;
        let _g = self.dog.watch("send");
        count_payload(data.len(), 4);
        self.comm
            .process_at_rank(dest as i32)
            .buffered_send_with_tag(data, tag);
        Ok(())
    }

    fn recv(&self, data: &mut [f32], src: usize, tag: i32) -> Result<()> {
        self.check_peer("recv", src)?;
        let _g = self.dog.watch("recv");
        let status = self
            .comm
            .process_at_rank(src as i32)
            .receive_into_with_tag(data, tag);
        let got = status.count(<f32 as mpi::datatype::Equivalence>::equivalent_datatype()) as usize;
        if got != data.len() {
            return Err(CommError::Invalid {
                rank: self.rank(),
                op: "recv",
                msg: format!(
                    "expected {} elements from rank {src}, got {got}",
                    data.len()
                ),
            });
        }
        Ok(())
    }

    fn broadcast(&self, data: &mut [f32], root: usize) -> Result<()> {
        self.check_peer("broadcast", root)?;
        let _g = self.dog.watch("broadcast");
        if self.rank() == root {
            count_payload(data.len(), 4);
        }
        self.comm.process_at_rank(root as i32).broadcast_into(data);
        Ok(())
    }

    fn barrier(&self) -> Result<()> {
        let _g = self.dog.watch("barrier");
        self.comm.barrier();
        Ok(())
    }

    fn split(&self, color: usize, key: usize) -> Result<Box<dyn Communicator>> {
        let _g = self.dog.watch("split");
        let comm = self
            .comm
            .split_by_color_with_key(Color::with_value(color as i32), key as i32)
            .ok_or_else(|| CommError::Invalid {
                rank: self.rank(),
                op: "split",
                msg: "MPI returned no communicator".into(),
            })?;
        Ok(Box::new(MpiComm {
            comm,
            dog: self.dog.clone(),
        }))
    }
}
