//! One model replica over many processes: tensor parallelism (attention heads and FFN
//! columns split, experts split — ETP — or spread whole — EDP) inside each pipeline stage,
//! and pipeline stages exchanging activations and their gradients.
//!
//! [`parallel_grads`] computes the loss of a token sequence and every parameter's gradient
//! this way and gathers them on rank 0: the same numbers as one process (`skymoe grads`).

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::ops::Range;
use std::sync::Arc;

use candle_core::{Device, Tensor, Var};
use skymoe_model::layers::block::DecoderLayer;
use skymoe_model::layers::norm::RmsNorm;
use skymoe_model::layers::rotary::RotaryEmbedding;
use skymoe_model::layers::TensorLoader;
use skymoe_model::model::{build_layer, CheckpointLoader};
use skymoe_model::parallel::{parts, Part, ShardComm, Sharding, SliceLoader, TensorParallel};
use skymoe_model::{names, Checkpoint, ModelConfig, ModelError};
use skymoe_plan::pipeline::uniform_split;
use skymoe_plan::{layout::check_stage_layers, Strategy};

use crate::comm::Communicator;
use crate::mesh::{Mesh, MeshComms};

/// Why a model-parallel pass failed.
#[derive(Debug, thiserror::Error)]
pub enum ParallelError {
    /// The layout cannot run this way.
    #[error("layout: {0}")]
    Layout(String),
    /// The model.
    #[error(transparent)]
    Model(#[from] ModelError),
    /// A tensor operation.
    #[error(transparent)]
    Tensor(#[from] candle_core::Error),
    /// A collective.
    #[error(transparent)]
    Comm(#[from] crate::comm::CommError),
}

/// Result of a model-parallel pass.
pub type Result<T> = std::result::Result<T, ParallelError>;

/// [`ShardComm`] over a [`Communicator`].
#[derive(Debug)]
pub struct CommShard {
    comm: CommBox,
}

struct CommBox(Box<dyn Communicator>);

impl std::fmt::Debug for CommBox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "rank {} of {}", self.0.rank(), self.0.size())
    }
}

// SAFETY: the communicator is a handle (an MPI communicator or NCCL comm) that is only used
// from the thread running the model's forward and backward passes, which is the thread that
// created it; nothing here is shared with other threads while a collective runs.
unsafe impl Send for CommBox {}
// SAFETY: as above: all calls come from one thread, in the same order on every rank.
unsafe impl Sync for CommBox {}

impl CommShard {
    /// Wrap a communicator.
    pub fn new(comm: Box<dyn Communicator>) -> Self {
        CommShard {
            comm: CommBox(comm),
        }
    }
}

impl ShardComm for CommShard {
    fn rank(&self) -> usize {
        self.comm.0.rank()
    }
    fn size(&self) -> usize {
        self.comm.0.size()
    }
    fn all_reduce_sum(&self, data: &mut [f32]) -> std::result::Result<(), String> {
        self.comm.0.all_reduce_sum(data).map_err(|e| e.to_string())
    }
}

impl skymoe_model::parallel::PipeComm for CommShard {
    fn send(&self, data: &[f32], dest: usize, tag: i32) -> std::result::Result<(), String> {
        self.comm
            .0
            .send_detached(data, dest, tag)
            .map_err(|e| e.to_string())
    }
    fn recv(&self, data: &mut [f32], src: usize, tag: i32) -> std::result::Result<(), String> {
        self.comm.0.recv(data, src, tag).map_err(|e| e.to_string())
    }
}

impl skymoe_model::parallel::ExpertComm for CommShard {
    fn rank(&self) -> usize {
        self.comm.0.rank()
    }
    fn size(&self) -> usize {
        self.comm.0.size()
    }
    fn all_to_all_v(
        &self,
        send: &[f32],
        send_counts: &[usize],
        recv_counts: &[usize],
    ) -> std::result::Result<Vec<f32>, String> {
        self.comm
            .0
            .all_to_all_v(send, send_counts, recv_counts)
            .map_err(|e| e.to_string())
    }
}

/// Hands out tensors of another loader as trainable variables, remembering them by name
/// (a name asked twice — a tied embedding — gives the same variable).
struct VarLoader<'a> {
    inner: &'a dyn TensorLoader,
    vars: RefCell<BTreeMap<String, Var>>,
}

impl TensorLoader for VarLoader<'_> {
    fn tensor(&self, name: &str, shape: &[usize]) -> skymoe_model::Result<Tensor> {
        if let Some(v) = self.vars.borrow().get(name) {
            return Ok(v.as_tensor().clone());
        }
        let t = self.inner.tensor(name, shape)?;
        let v = Var::from_tensor(&t)?;
        let out = v.as_tensor().clone();
        self.vars.borrow_mut().insert(name.to_string(), v);
        Ok(out)
    }
    fn contains(&self, name: &str) -> bool {
        self.inner.contains(name)
    }
}

/// This rank's pipeline stage of a model replica.
pub struct Stage {
    /// Decoder layers of the stage, and their indices in the model.
    pub layers: Vec<DecoderLayer>,
    /// Which decoder layers.
    pub range: Range<usize>,
    /// The embedding (first stage).
    pub embed: Option<Tensor>,
    /// Final norm and LM head (last stage).
    pub head: Option<(RmsNorm, Tensor)>,
    rotary: RotaryEmbedding,
    /// Trainable variables of this rank, by checkpoint name.
    pub vars: BTreeMap<String, Var>,
    /// The part of each split or absent tensor on this rank.
    pub parts: std::collections::HashMap<String, Part>,
}

/// Decoder layers per stage: `pp_layers` if given (checked), else as even as possible.
pub fn stage_layers(
    config: &ModelConfig,
    pp: usize,
    pp_layers: Option<&[usize]>,
) -> Result<Vec<usize>> {
    match pp_layers {
        Some(s) => {
            check_stage_layers(s, pp, config.num_hidden_layers)
                .map_err(|e| ParallelError::Layout(e.to_string()))?;
            Ok(s.to_vec())
        }
        None => Ok(uniform_split(config.num_hidden_layers, pp)),
    }
}

impl Stage {
    /// Load this rank's stage and tensor-parallel part of `ckpt`.
    pub fn load(
        ckpt: &Checkpoint,
        mesh: &Mesh,
        tp: Option<TensorParallel>,
        split: &[usize],
        device: &Device,
    ) -> Result<Self> {
        let c = &ckpt.config;
        let layout = mesh.layout;
        let (pp_rank, _, tp_rank) = mesh.coords(mesh.rank);
        let whole_experts = match layout.strategy() {
            Strategy::Edp => true,
            Strategy::Replicated | Strategy::Etp => false,
            s => {
                return Err(ParallelError::Layout(format!(
                    "{} with data parallelism 1 is not a model-parallel layout this build runs (use edp=N or tp=N)",
                    s.name()
                )))
            }
        };
        let parts = parts(c, tp_rank, layout.tp, whole_experts);
        let full = CheckpointLoader::new(&ckpt.weights, device);
        let sliced = SliceLoader {
            inner: &full,
            parts: &parts,
        };
        let loader = VarLoader {
            inner: &sliced,
            vars: RefCell::new(BTreeMap::new()),
        };
        let sharding = tp.map(|tp| Sharding { tp, whole_experts });
        let start: usize = split[..pp_rank].iter().sum();
        let range = start..start + split[pp_rank];
        let h = c.hidden_size;
        let first = pp_rank == 0;
        let last = pp_rank + 1 == layout.pp;
        let embed = if first {
            Some(loader.tensor(names::EMBED, &[c.vocab_size, h])?)
        } else {
            None
        };
        let layers = range
            .clone()
            .map(|i| build_layer(c, &loader, i, sharding.as_ref()))
            .collect::<skymoe_model::Result<Vec<_>>>()?;
        let head = if last {
            let norm = RmsNorm::new(loader.tensor(names::FINAL_NORM, &[h])?, c.rms_norm_eps);
            let name = if c.tie_word_embeddings {
                names::EMBED
            } else {
                names::LM_HEAD
            };
            Some((norm, loader.tensor(name, &[c.vocab_size, h])?))
        } else {
            None
        };
        let rotary = RotaryEmbedding::from_config(c, device)?;
        Ok(Stage {
            layers,
            range,
            embed,
            head,
            rotary,
            vars: loader.vars.into_inner(),
            parts,
        })
    }

    /// Run the stage's decoder layers on `x` `[batch, seq, hidden]` (dropless).
    pub fn forward_layers(&self, mut x: Tensor) -> Result<Tensor> {
        for layer in &self.layers {
            x = layer.forward(&x, &self.rotary, 0, None, None)?.0;
        }
        Ok(x)
    }
}

const TAG_ACTIVATION: i32 = 11;
const TAG_GRADIENT: i32 = 12;

/// The mean next-token cross-entropy of `tokens` and every parameter's gradient, computed by
/// the ranks of `mesh` (data parallelism 1) and returned whole on rank 0 (`None` elsewhere).
pub fn parallel_grads(
    ckpt: &Checkpoint,
    tokens: &[u32],
    mesh: &Mesh,
    comms: MeshComms,
    world: &dyn Communicator,
    pp_layers: Option<&[usize]>,
) -> Result<Option<(f32, BTreeMap<String, Tensor>)>> {
    let layout = mesh.layout;
    if layout.dp != 1 {
        return Err(ParallelError::Layout(format!(
            "gradients of one sequence use data parallelism 1, not dp={}",
            layout.dp
        )));
    }
    if tokens.len() < 2 {
        return Err(ParallelError::Layout(
            "a loss needs at least two tokens".into(),
        ));
    }
    let c = &ckpt.config;
    let device = Device::Cpu;
    let split = stage_layers(c, layout.pp, pp_layers)?;
    let tp = (layout.tp > 1).then(|| TensorParallel {
        comm: Arc::new(CommShard::new(comms.tp)),
    });
    let stage = Stage::load(ckpt, mesh, tp, &split, &device)?;
    let (pp_rank, _, tp_rank) = mesh.coords(mesh.rank);
    let last = pp_rank + 1 == layout.pp;
    let t = tokens.len();
    let h = c.hidden_size;
    let pp = &comms.pp;

    // Forward: the input comes from the embedding or from the previous stage.
    let input_var = if pp_rank == 0 {
        None
    } else {
        let mut buf = vec![0f32; t * h];
        pp.recv(&mut buf, pp_rank - 1, TAG_ACTIVATION)?;
        Some(Var::from_tensor(&Tensor::from_vec(
            buf,
            (1, t, h),
            &device,
        )?)?)
    };
    let x = match (&stage.embed, &input_var) {
        (Some(embed), _) => {
            let ids = Tensor::from_vec(tokens.to_vec(), t, &device)?;
            embed.index_select(&ids, 0)?.reshape((1, t, h))?
        }
        (None, Some(v)) => v.as_tensor().clone(),
        (None, None) => unreachable!("a stage without the embedding receives its input"),
    };
    let y = stage.forward_layers(x)?;
    let mut loss_value = 0f32;
    let store = if let Some((norm, lm_head)) = &stage.head {
        let logits = norm.forward(&y)?.reshape((t, h))?.matmul(&lm_head.t()?)?;
        let loss = skymoe_train::loss::next_token_loss(&logits, tokens)?;
        loss_value = loss.to_scalar::<f32>()?;
        loss.backward()?
    } else {
        pp.send(
            &y.flatten_all()?.to_vec1::<f32>()?,
            pp_rank + 1,
            TAG_ACTIVATION,
        )?;
        let mut g = vec![0f32; t * h];
        pp.recv(&mut g, pp_rank + 1, TAG_GRADIENT)?;
        let g = Tensor::from_vec(g, (1, t, h), &device)?;
        (y * g)?.sum_all()?.backward()?
    };
    if let Some(v) = &input_var {
        let g = store
            .get(v.as_tensor())
            .cloned()
            .unwrap_or(v.as_tensor().zeros_like()?);
        pp.send(
            &g.flatten_all()?.to_vec1::<f32>()?,
            pp_rank - 1,
            TAG_GRADIENT,
        )?;
    }

    // Gather on rank 0: every tensor's parts summed into a whole one. Replicated tensors are
    // contributed by TP rank 0 of their stage only; a tied embedding gets both stages' parts.
    let mut loss = [if last && tp_rank == 0 {
        loss_value
    } else {
        0.0
    }];
    world.all_reduce_sum(&mut loss)?;
    let mut out = BTreeMap::new();
    for spec in c.param_specs() {
        let n: usize = spec.shape.iter().product();
        let mut whole = vec![0f32; n];
        if let Some(var) = stage.vars.get(&spec.name) {
            let g = store
                .get(var.as_tensor())
                .cloned()
                .unwrap_or(var.as_tensor().zeros_like()?);
            let p = stage.parts.get(&spec.name).copied().unwrap_or(Part::Full);
            // A replicated tensor is contributed by TP rank 0 only.
            if p != Part::Full || tp_rank == 0 {
                let local = g.flatten_all()?.to_vec1::<f32>()?;
                skymoe_train::sharded::unslice_into(&mut whole, &local, &spec.shape, p);
            }
        }
        world.all_reduce_sum(&mut whole)?;
        if mesh.rank == 0 {
            out.insert(
                spec.name.clone(),
                Tensor::from_vec(whole, spec.shape.clone(), &device)?,
            );
        }
    }
    Ok((mesh.rank == 0).then_some((loss[0], out)))
}
