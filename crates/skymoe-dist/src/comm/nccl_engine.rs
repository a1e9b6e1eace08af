//! NCCL through cudarc: the same collectives on NVIDIA GPUs. Host slices are copied to the
//! rank's GPU, reduced or exchanged by NCCL, and copied back; the all-to-all is a group of
//! send/receive pairs. NCCL's unique id is exchanged over a bootstrap communicator (MPI),
//! which also forms the sub-groups of [`Communicator::split`].

use std::sync::Arc;

use cudarc::driver::{CudaContext, CudaSlice, CudaStream};
use cudarc::nccl::{Comm, Id, ReduceOp};

use super::{check_blocks, CommError, Communicator, Result, Watchdog};

/// Libraries NCCL needs at run time.
const LIBRARIES: [(&str, &str); 2] = [
    ("libcuda.so.1", "the NVIDIA driver"),
    ("libnccl.so.2", "NCCL"),
];

/// Check that the NVIDIA driver and NCCL can be loaded, before cudarc is touched (it panics
/// when they are missing).
pub fn probe() -> Result<()> {
    for (lib, what) in LIBRARIES {
        // SAFETY: loading a shared library runs its initialisers; these are the libraries
        // cudarc loads next anyway, and the handle is dropped (unloaded) at once.
        let loaded = unsafe { libloading::Library::new(lib) };
        if let Err(e) = loaded {
            return Err(CommError::Unavailable(format!(
                "NCCL needs {what} ({lib}), which cannot be loaded: {e}"
            )));
        }
    }
    Ok(())
}

/// A communicator over NCCL.
pub struct NcclComm {
    comm: Comm,
    stream: Arc<CudaStream>,
    bootstrap: Box<dyn Communicator>,
    dog: Watchdog,
    ordinal: usize,
}

fn nccl_err(rank: usize, op: &'static str, e: impl std::fmt::Debug) -> CommError {
    CommError::Invalid {
        rank,
        op,
        msg: format!("NCCL/CUDA: {e:?}"),
    }
}

/// NCCL's unique id as 32 f32 bit patterns, to travel through a float broadcast unchanged.
fn id_to_words(id: &Id) -> Vec<f32> {
    id.internal()
        .chunks(4)
        .map(|c| {
            f32::from_bits(u32::from_le_bytes([
                c[0] as u8, c[1] as u8, c[2] as u8, c[3] as u8,
            ]))
        })
        .collect()
}

fn id_from_words(words: &[f32]) -> Id {
    let mut raw = [0 as std::ffi::c_char; 128];
    for (i, w) in words.iter().enumerate() {
        for (j, b) in w.to_bits().to_le_bytes().iter().enumerate() {
            raw[4 * i + j] = *b as std::ffi::c_char;
        }
    }
    Id::uninit(raw)
}

impl NcclComm {
    /// Join the NCCL group of every rank of `bootstrap`, on GPU `ordinal`.
    pub fn new(bootstrap: Box<dyn Communicator>, ordinal: usize, dog: Watchdog) -> Result<Self> {
        probe()?;
        let rank = bootstrap.rank();
        let mut words = vec![0f32; 32];
        if rank == 0 {
            let id = Id::new().map_err(|e| nccl_err(rank, "init", e))?;
            words = id_to_words(&id);
        }
        bootstrap.broadcast(&mut words, 0)?;
        let ctx = CudaContext::new(ordinal).map_err(|e| nccl_err(rank, "init", e))?;
        let stream = ctx.default_stream();
        let _g = dog.watch("split");
        let comm = Comm::from_rank(
            stream.clone(),
            rank,
            bootstrap.size(),
            id_from_words(&words),
        )
        .map_err(|e| nccl_err(rank, "init", e))?;
        drop(_g);
        Ok(NcclComm {
            comm,
            stream,
            bootstrap,
            dog,
            ordinal,
        })
    }

    fn upload(&self, op: &'static str, data: &[f32]) -> Result<CudaSlice<f32>> {
        self.stream
            .clone_htod(data)
            .map_err(|e| nccl_err(self.rank(), op, e))
    }

    fn download(&self, op: &'static str, src: &CudaSlice<f32>, dst: &mut [f32]) -> Result<()> {
        self.stream
            .memcpy_dtoh(src, dst)
            .map_err(|e| nccl_err(self.rank(), op, e))?;
        self.stream
            .synchronize()
            .map_err(|e| nccl_err(self.rank(), op, e))
    }

    fn zeros(&self, op: &'static str, n: usize) -> Result<CudaSlice<f32>> {
        self.stream
            .alloc_zeros::<f32>(n)
            .map_err(|e| nccl_err(self.rank(), op, e))
    }
}

impl Communicator for NcclComm {
    fn rank(&self) -> usize {
        self.comm.rank()
    }

    fn size(&self) -> usize {
        self.comm.world_size()
    }

    fn all_reduce_sum(&self, data: &mut [f32]) -> Result<()> {
        let _g = self.dog.watch("all_reduce");
        let mut buf = self.upload("all_reduce", data)?;
        self.comm
            .all_reduce_in_place(&mut buf, &ReduceOp::Sum)
            .map_err(|e| nccl_err(self.rank(), "all_reduce", e))?;
        self.download("all_reduce", &buf, data)
    }

    fn all_reduce_sum_f64(&self, data: &mut [f64]) -> Result<()> {
        // Metrics are few: reduce them over the bootstrap group in full precision.
        self.bootstrap.all_reduce_sum_f64(data)
    }

    fn all_reduce_min_u64(&self, data: &mut [u64]) -> Result<()> {
        self.bootstrap.all_reduce_min_u64(data)
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
        let src = self.upload("reduce_scatter", send)?;
        let mut dst = self.zeros("reduce_scatter", recv.len())?;
        self.comm
            .reduce_scatter(&src, &mut dst, &ReduceOp::Sum)
            .map_err(|e| nccl_err(self.rank(), "reduce_scatter", e))?;
        self.download("reduce_scatter", &dst, recv)
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
        let src = self.upload("all_gather", send)?;
        let mut dst = self.zeros("all_gather", recv.len())?;
        self.comm
            .all_gather(&src, &mut dst)
            .map_err(|e| nccl_err(self.rank(), "all_gather", e))?;
        self.download("all_gather", &dst, recv)
    }

    fn all_to_all_v(
        &self,
        send: &[f32],
        send_counts: &[usize],
        recv_counts: &[usize],
    ) -> Result<Vec<f32>> {
        let (rank, size) = (self.rank(), self.size());
        if send_counts.len() != size
            || recv_counts.len() != size
            || send_counts.iter().sum::<usize>() != send.len()
        {
            return Err(CommError::Invalid {
                rank,
                op: "all_to_all_v",
                msg: format!(
                    "{} send and {} receive counts for {size} ranks and {} elements",
                    send_counts.len(),
                    recv_counts.len(),
                    send.len()
                ),
            });
        }
        let _g = self.dog.watch("all_to_all_v");
        let mut at = 0;
        let mut sends = Vec::with_capacity(size);
        for &c in send_counts {
            sends.push(self.upload("all_to_all_v", &send[at..at + c])?);
            at += c;
        }
        let mut recvs = Vec::with_capacity(size);
        for &c in recv_counts {
            recvs.push(self.zeros("all_to_all_v", c.max(1))?);
        }
        {
            let mut group = self.comm.group();
            for (peer, (s, r)) in sends.iter().zip(recvs.iter_mut()).enumerate() {
                if send_counts[peer] > 0 {
                    group
                        .send(s.slice(..), peer as i32)
                        .map_err(|e| nccl_err(rank, "all_to_all_v", e))?;
                }
                if recv_counts[peer] > 0 {
                    group
                        .recv(r.slice_mut(..recv_counts[peer]), peer as i32)
                        .map_err(|e| nccl_err(rank, "all_to_all_v", e))?;
                }
            }
        }
        let mut out = vec![0f32; recv_counts.iter().sum()];
        let mut at = 0;
        for (r, &c) in recvs.iter().zip(recv_counts) {
            if c > 0 {
                let part = self
                    .stream
                    .clone_dtoh(&r.slice(..c))
                    .map_err(|e| nccl_err(rank, "all_to_all_v", e))?;
                out[at..at + c].copy_from_slice(&part);
            }
            at += c;
        }
        Ok(out)
    }

    fn send(&self, data: &[f32], dest: usize, _tag: i32) -> Result<()> {
        let _g = self.dog.watch("send");
        let buf = self.upload("send", data)?;
        self.comm
            .send(&buf, dest as i32)
            .map_err(|e| nccl_err(self.rank(), "send", e))?;
        self.stream
            .synchronize()
            .map_err(|e| nccl_err(self.rank(), "send", e))
    }

    fn recv(&self, data: &mut [f32], src: usize, _tag: i32) -> Result<()> {
        let _g = self.dog.watch("recv");
        let mut buf = self.zeros("recv", data.len())?;
        self.comm
            .recv(&mut buf, src as i32)
            .map_err(|e| nccl_err(self.rank(), "recv", e))?;
        self.download("recv", &buf, data)
    }

    fn broadcast(&self, data: &mut [f32], root: usize) -> Result<()> {
        let _g = self.dog.watch("broadcast");
        let mut buf = self.upload("broadcast", data)?;
        self.comm
            .broadcast_in_place(&mut buf, root as i32)
            .map_err(|e| nccl_err(self.rank(), "broadcast", e))?;
        self.download("broadcast", &buf, data)
    }

    fn barrier(&self) -> Result<()> {
        let mut x = [0f32];
        self.all_reduce_sum(&mut x)
    }

    fn split(&self, color: usize, key: usize) -> Result<Box<dyn Communicator>> {
        let sub = self.bootstrap.split(color, key)?;
        Ok(Box::new(NcclComm::new(
            sub,
            self.ordinal,
            self.dog.clone(),
        )?))
    }
}
