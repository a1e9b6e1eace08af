//! Collective communication behind one trait, with real engines: a single process
//! ([`SingleProcess`]) and OpenMPI ([`mpi_engine::MpiComm`], feature `mpi`).
//!
//! Every operation works on `f32` (tensors) or `f64` (metrics) slices. A collective that does
//! not finish within the watchdog's timeout ends the process with a message naming the rank
//! and the operation, so a dead or stuck peer never hangs a job ([`Watchdog`]).

#[cfg(feature = "mpi")]
pub mod mpi_engine;
#[cfg(feature = "nccl")]
pub mod nccl_engine;
mod watchdog;

pub use watchdog::Watchdog;

use std::sync::atomic::{AtomicU64, Ordering};

use thiserror::Error;

/// Bytes this process has handed to collectives and sends (its payload, whatever the
/// engine's algorithm then moves on the wire).
static PAYLOAD_BYTES: AtomicU64 = AtomicU64::new(0);

/// Bytes this process has handed to collectives and sends so far.
pub fn payload_bytes() -> u64 {
    PAYLOAD_BYTES.load(Ordering::Relaxed)
}

/// Count `elements` of `bytes_each` handed to the engine.
#[cfg(feature = "mpi")]
pub(crate) fn count_payload(elements: usize, bytes_each: usize) {
    PAYLOAD_BYTES.fetch_add((elements * bytes_each) as u64, Ordering::Relaxed);
}

/// A failed collective.
#[derive(Debug, Error)]
pub enum CommError {
    /// Arguments that cannot work (sizes, ranks).
    #[error("rank {rank}: {op}: {msg}")]
    Invalid {
        /// This process's rank.
        rank: usize,
        /// The operation.
        op: &'static str,
        /// What is wrong.
        msg: String,
    },
    /// The engine is not available (not compiled in, or its library is missing).
    #[error("{0}")]
    Unavailable(String),
}

/// Result of a collective.
pub type Result<T> = std::result::Result<T, CommError>;

/// A group of processes that communicate. Ranks run the same calls in the same order.
pub trait Communicator {
    /// This process's rank in the group.
    fn rank(&self) -> usize;
    /// Processes in the group.
    fn size(&self) -> usize;
    /// Element-wise sum over the group, in place.
    fn all_reduce_sum(&self, data: &mut [f32]) -> Result<()>;
    /// Element-wise sum over the group, in place (metrics).
    fn all_reduce_sum_f64(&self, data: &mut [f64]) -> Result<()>;
    /// Element-wise minimum over the group, in place (agreement on flags).
    fn all_reduce_min_u64(&self, data: &mut [u64]) -> Result<()>;
    /// Sum `send` (`size` equal blocks) over the group and keep block `rank` in `recv`.
    fn reduce_scatter_sum(&self, send: &[f32], recv: &mut [f32]) -> Result<()>;
    /// Concatenate every rank's `send` (equal lengths) into `recv`, in rank order.
    fn all_gather(&self, send: &[f32], recv: &mut [f32]) -> Result<()>;
    /// Send `send_counts[j]` consecutive elements of `send` to rank `j`; receive
    /// `recv_counts[j]` from rank `j`, concatenated in rank order.
    fn all_to_all_v(
        &self,
        send: &[f32],
        send_counts: &[usize],
        recv_counts: &[usize],
    ) -> Result<Vec<f32>>;
    /// Send `data` to rank `dest`.
    fn send(&self, data: &[f32], dest: usize, tag: i32) -> Result<()>;
    /// Send `data` to rank `dest` without waiting for the receiver (copied into a send
    /// buffer where the engine has one: see [`mpi_engine::MpiRuntime::reserve_send_buffer`]),
    /// so that two ranks may send to each other before either receives (pipeline schedules).
    fn send_detached(&self, data: &[f32], dest: usize, tag: i32) -> Result<()> {
        self.send(data, dest, tag)
    }
    /// Receive exactly `data.len()` elements from rank `src`.
    fn recv(&self, data: &mut [f32], src: usize, tag: i32) -> Result<()>;
    /// Copy `data` of rank `root` to every rank.
    fn broadcast(&self, data: &mut [f32], root: usize) -> Result<()>;
    /// Wait for every rank.
    fn barrier(&self) -> Result<()>;
    /// Split into sub-groups: ranks with the same `color` form one, ordered by `key`.
    fn split(&self, color: usize, key: usize) -> Result<Box<dyn Communicator>>;
}

/// Check the arguments shared by all engines.
pub(crate) fn check_blocks(
    rank: usize,
    op: &'static str,
    big: usize,
    small: usize,
    size: usize,
) -> Result<()> {
    if big != small * size {
        return Err(CommError::Invalid {
            rank,
            op,
            msg: format!("buffer of {big} elements is not {size} blocks of {small}"),
        });
    }
    Ok(())
}

/// The group of one process: every collective is the identity.
#[derive(Debug, Default, Clone, Copy)]
pub struct SingleProcess;

impl Communicator for SingleProcess {
    fn rank(&self) -> usize {
        0
    }
    fn size(&self) -> usize {
        1
    }
    fn all_reduce_sum(&self, _data: &mut [f32]) -> Result<()> {
        Ok(())
    }
    fn all_reduce_sum_f64(&self, _data: &mut [f64]) -> Result<()> {
        Ok(())
    }
    fn all_reduce_min_u64(&self, _data: &mut [u64]) -> Result<()> {
        Ok(())
    }
    fn reduce_scatter_sum(&self, send: &[f32], recv: &mut [f32]) -> Result<()> {
        check_blocks(0, "reduce_scatter", send.len(), recv.len(), 1)?;
        recv.copy_from_slice(send);
        Ok(())
    }
    fn all_gather(&self, send: &[f32], recv: &mut [f32]) -> Result<()> {
        check_blocks(0, "all_gather", recv.len(), send.len(), 1)?;
        recv.copy_from_slice(send);
        Ok(())
    }
    fn all_to_all_v(
        &self,
        send: &[f32],
        send_counts: &[usize],
        recv_counts: &[usize],
    ) -> Result<Vec<f32>> {
        if send_counts != [send.len()] || recv_counts != send_counts {
            return Err(CommError::Invalid {
                rank: 0,
                op: "all_to_all_v",
                msg: format!(
                    "one rank: counts {send_counts:?}/{recv_counts:?} must both be [{}]",
                    send.len()
                ),
            });
        }
        Ok(send.to_vec())
    }
    fn send(&self, _data: &[f32], dest: usize, _tag: i32) -> Result<()> {
        Err(CommError::Invalid {
            rank: 0,
            op: "send",
            msg: format!("no rank {dest} in a group of one"),
        })
    }
    fn recv(&self, _data: &mut [f32], src: usize, _tag: i32) -> Result<()> {
        Err(CommError::Invalid {
            rank: 0,
            op: "recv",
            msg: format!("no rank {src} in a group of one"),
        })
    }
    fn broadcast(&self, _data: &mut [f32], root: usize) -> Result<()> {
        if root != 0 {
            return Err(CommError::Invalid {
                rank: 0,
                op: "broadcast",
                msg: format!("no rank {root} in a group of one"),
            });
        }
        Ok(())
    }
    fn barrier(&self) -> Result<()> {
        Ok(())
    }
    fn split(&self, _color: usize, _key: usize) -> Result<Box<dyn Communicator>> {
        Ok(Box::new(SingleProcess))
    }
}
