//! Tensor-parallel serving over the processes of an `mpirun` job. MPI is driven from the
//! thread that initialised it: the model runs on worker threads and hands each collective to
//! that thread through a channel ([`with_comm_thread`]).

use std::sync::mpsc;
use std::sync::Arc;

use skymoe_dist::comm::Communicator;
use skymoe_serve::model::TpComm;

type Reply = mpsc::Sender<Result<Vec<f32>, String>>;

/// A collective for the communicating thread to run.
enum Request {
    AllReduce(Vec<f32>, Reply),
    Broadcast(Vec<f32>, usize, Reply),
}

/// [`TpComm`] whose collectives run on the communicating thread.
struct ChannelComm {
    tx: mpsc::Sender<Request>,
    rank: usize,
    size: usize,
}

impl ChannelComm {
    fn call(
        &self,
        data: &mut [f32],
        make: impl FnOnce(Vec<f32>, Reply) -> Request,
    ) -> Result<(), String> {
        let (reply, answer) = mpsc::channel();
        self.tx
            .send(make(data.to_vec(), reply))
            .map_err(|_| "the communicating thread has stopped".to_string())?;
        let out = answer
            .recv()
            .map_err(|_| "the communicating thread has stopped".to_string())??;
        data.copy_from_slice(&out);
        Ok(())
    }
}

impl TpComm for ChannelComm {
    fn rank(&self) -> usize {
        self.rank
    }
    fn size(&self) -> usize {
        self.size
    }
    fn all_reduce_sum(&self, data: &mut [f32]) -> Result<(), String> {
        self.call(data, Request::AllReduce)
    }
    fn broadcast(&self, data: &mut [f32], root: usize) -> Result<(), String> {
        self.call(data, |v, r| Request::Broadcast(v, root, r))
    }
}

/// Run `work` on a new thread with a [`TpComm`] over `comm`, serving its collectives on this
/// thread until every handle on it is gone; returns what `work` returns.
pub fn with_comm_thread<T: Send + 'static>(
    comm: &dyn Communicator,
    work: impl FnOnce(Arc<dyn TpComm>) -> T + Send + 'static,
) -> anyhow::Result<T> {
    let (tx, rx) = mpsc::channel::<Request>();
    let tp: Arc<dyn TpComm> = Arc::new(ChannelComm {
        tx,
        rank: comm.rank(),
        size: comm.size(),
    });
    let worker = std::thread::Builder::new()
        .name("skymoe-tp-worker".into())
        .spawn(move || work(tp))?;
    for req in rx {
        let (mut data, reply, result) = match req {
            Request::AllReduce(mut d, r) => {
                let res = comm.all_reduce_sum(&mut d);
                (d, r, res)
            }
            Request::Broadcast(mut d, root, r) => {
                let res = comm.broadcast(&mut d, root);
                (d, r, res)
            }
        };
        let answer = result
            .map(|_| std::mem::take(&mut data))
            .map_err(|e| e.to_string());
        let _ = reply.send(answer);
    }
    worker
        .join()
        .map_err(|_| anyhow::anyhow!("the tensor-parallel worker thread panicked"))
}

/// Parse `--tp-weights 2,1,1`.
pub fn parse_weights(s: Option<&str>) -> anyhow::Result<Option<Vec<f64>>> {
    s.map(|s| {
        s.split(',')
            .map(|w| {
                w.trim()
                    .parse::<f64>()
                    .map_err(|_| anyhow::anyhow!("`{w}` in --tp-weights is not a number"))
            })
            .collect()
    })
    .transpose()
}
