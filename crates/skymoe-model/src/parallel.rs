//! Tensor and expert parallelism inside one model replica (Megatron style, activations
//! replicated over the tensor-parallel group).
//!
//! Attention heads, dense FFN columns and shared-expert columns are split over the group; the
//! routed experts are either split the same way (ETP) or spread whole (EDP: rank `r` holds
//! experts `r·E/n .. (r+1)·E/n`). Two autograd-aware collectives join the pieces:
//! [`TensorParallel::copy_in`] (Megatron's *f*: identity forward, all-reduce of the gradient
//! backward) before a split computation, and [`TensorParallel::reduce_out`] (*g*: all-reduce
//! forward, identity backward) after it. Replicated parameters then get their full gradient
//! on every rank and split ones the gradient of their slice: exactly the single-process
//! gradients, cut the same way.

use std::collections::HashMap;
use std::sync::Arc;

use candle_core::{CpuStorage, CustomOp1, Layout, Shape, Tensor};

use crate::config::ModelConfig;
use crate::error::{ModelError, Result};
use crate::layers::TensorLoader;
use crate::names::{self, SwiGluNames};

/// The all-reduce the model needs from a tensor-parallel group (implemented over MPI or
/// NCCL by skymoe-dist). Called on the thread that runs the forward and backward passes.
pub trait ShardComm: Send + Sync + std::fmt::Debug {
    /// This rank in the group.
    fn rank(&self) -> usize;
    /// Ranks in the group.
    fn size(&self) -> usize;
    /// Element-wise sum over the group, in place.
    fn all_reduce_sum(&self, data: &mut [f32]) -> std::result::Result<(), String>;
}

/// A tensor-parallel group as the layers see it.
#[derive(Debug, Clone)]
pub struct TensorParallel {
    /// The group.
    pub comm: Arc<dyn ShardComm>,
}

fn contiguous_f32<'a>(s: &'a CpuStorage, l: &Layout) -> candle_core::Result<&'a [f32]> {
    let data = s.as_slice::<f32>()?;
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&data[a..b]),
        None => candle_core::bail!("tensor-parallel collective expects a contiguous tensor"),
    }
}

/// All-reduce without a backward (used inside the backward of [`CopyIn`]).
struct AllReduce(Arc<dyn ShardComm>);

impl CustomOp1 for AllReduce {
    fn name(&self) -> &'static str {
        "tp-all-reduce"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let mut v = contiguous_f32(s, l)?.to_vec();
        self.0
            .all_reduce_sum(&mut v)
            .map_err(candle_core::Error::msg)?;
        Ok((CpuStorage::F32(v), l.shape().clone()))
    }
}

/// Megatron's *g*: all-reduce forward, identity backward.
struct ReduceOut(Arc<dyn ShardComm>);

impl CustomOp1 for ReduceOut {
    fn name(&self) -> &'static str {
        "tp-reduce-out"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        AllReduce(self.0.clone()).cpu_fwd(s, l)
    }
    fn bwd(
        &self,
        _arg: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(grad.clone()))
    }
}

/// Megatron's *f*: identity forward, all-reduce of the gradient backward.
struct CopyIn(Arc<dyn ShardComm>);

impl CustomOp1 for CopyIn {
    fn name(&self) -> &'static str {
        "tp-copy-in"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        Ok((
            CpuStorage::F32(contiguous_f32(s, l)?.to_vec()),
            l.shape().clone(),
        ))
    }
    fn bwd(
        &self,
        _arg: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(
            grad.contiguous()?
                .apply_op1_no_bwd(&AllReduce(self.0.clone()))?,
        ))
    }
}

impl TensorParallel {
    /// Sum over the group forward, for a quantity every rank then uses (a norm's sum of
    /// squares over heads split between ranks); the gradient is summed over the group too.
    pub fn sum_shared(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        // *g* then *f*: all-reduce forward, all-reduce of the gradient backward.
        self.copy_in(&self.reduce_out(x)?)
    }

    /// This rank in the group.
    pub fn rank(&self) -> usize {
        self.comm.rank()
    }

    /// Ranks in the group.
    pub fn size(&self) -> usize {
        self.comm.size()
    }

    /// Identity forward; the gradient is summed over the group backward.
    pub fn copy_in(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        x.contiguous()?.apply_op1(CopyIn(self.comm.clone()))
    }

    /// Sum over the group forward; the gradient passes unchanged backward.
    pub fn reduce_out(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        x.contiguous()?.apply_op1(ReduceOut(self.comm.clone()))
    }
}

/// How one model replica is cut over a tensor-parallel group.
#[derive(Debug, Clone)]
pub struct Sharding {
    /// The group.
    pub tp: TensorParallel,
    /// Routed experts spread whole over the group (EDP) rather than split across it (ETP).
    pub whole_experts: bool,
}

/// Which part of a checkpoint tensor a rank holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Part {
    /// All of it (replicated).
    Full,
    /// All of it, held by this rank alone (one of its whole experts).
    Whole,
    /// `len` rows (`dim` 0) or columns (`dim` 1) from `start`, of `full` in all.
    Slice {
        /// The split dimension.
        dim: usize,
        /// First index held.
        start: usize,
        /// Indices held.
        len: usize,
        /// Size of the dimension in the whole tensor.
        full: usize,
    },
    /// None of it (another rank's expert).
    Absent,
}

impl Part {
    /// The shape this rank holds of a tensor of `full_shape`.
    pub fn local_shape(&self, full_shape: &[usize]) -> Option<Vec<usize>> {
        match *self {
            Part::Full | Part::Whole => Some(full_shape.to_vec()),
            Part::Slice { dim, len, .. } => {
                let mut s = full_shape.to_vec();
                s[dim] = len;
                Some(s)
            }
            Part::Absent => None,
        }
    }
}

fn slice(dim: usize, full: usize, rank: usize, size: usize) -> Part {
    let len = full / size;
    Part::Slice {
        dim,
        start: rank * len,
        len,
        full,
    }
}

fn split_swiglu(
    parts: &mut HashMap<String, Part>,
    n: &SwiGluNames,
    ffn: usize,
    rank: usize,
    size: usize,
) {
    parts.insert(n.gate.clone(), slice(0, ffn, rank, size));
    parts.insert(n.up.clone(), slice(0, ffn, rank, size));
    parts.insert(n.down.clone(), slice(1, ffn, rank, size));
}

/// The part of every split or absent tensor for `rank` of `size` (tensors not listed are
/// replicated). Heads, FFN widths and expert counts must divide by `size`.
pub fn parts(
    config: &ModelConfig,
    rank: usize,
    size: usize,
    whole_experts: bool,
) -> HashMap<String, Part> {
    let c = config;
    let mut parts = HashMap::new();
    if size <= 1 {
        return parts;
    }
    let q = c.num_attention_heads * c.head_dim;
    let kv = c.num_key_value_heads * c.head_dim;
    for i in 0..c.num_hidden_layers {
        if c.mla.is_some() {
            // Latent attention: the head-split projections by heads; the latent, its norms
            // and the rotary key replicated.
            for (name, _) in c.mla_tensors(i) {
                if let Some((dim, full)) = c.mla_split_dim(&name) {
                    parts.insert(name, slice(dim, full, rank, size));
                }
            }
        }
        for (proj, rows) in [("q_proj", q), ("k_proj", kv), ("v_proj", kv)]
            .into_iter()
            .filter(|_| c.mla.is_none())
        {
            parts.insert(
                names::layer(i, &format!("self_attn.{proj}.weight")),
                slice(0, rows, rank, size),
            );
            parts.insert(
                names::layer(i, &format!("self_attn.{proj}.bias")),
                slice(0, rows, rank, size),
            );
        }
        if c.mla.is_none() {
            parts.insert(
                names::layer(i, "self_attn.o_proj.weight"),
                slice(1, q, rank, size),
            );
        }
        if c.qk_norm == crate::config::QkNorm::PerProjection {
            // A norm over the whole projection: each rank holds its heads' part of the weight.
            parts.insert(names::q_norm(i), slice(0, q, rank, size));
            parts.insert(names::k_norm(i), slice(0, kv, rank, size));
        }
        match &c.moe {
            Some(m) if c.is_moe_layer(i) => {
                let n = c.moe_names(i);
                let per_rank = m.num_experts / size;
                for (e, en) in n.experts.iter().enumerate() {
                    if whole_experts {
                        let part = if e / per_rank.max(1) == rank {
                            Part::Whole
                        } else {
                            Part::Absent
                        };
                        for name in [&en.gate, &en.up, &en.down] {
                            parts.insert(name.clone(), part);
                        }
                    } else {
                        split_swiglu(&mut parts, en, m.expert_intermediate_size, rank, size);
                    }
                }
                if let (Some(shared), Some(sf)) = (&n.shared, m.shared_expert_intermediate_size) {
                    split_swiglu(&mut parts, &shared.ffn, sf, rank, size);
                }
            }
            _ => split_swiglu(
                &mut parts,
                &c.dense_ffn_names(i),
                c.intermediate_size,
                rank,
                size,
            ),
        }
    }
    parts
}

/// Hands out this rank's part of the tensors of a loader that holds whole tensors.
pub struct SliceLoader<'a> {
    /// The loader of whole tensors.
    pub inner: &'a dyn TensorLoader,
    /// The parts (see [`parts`]).
    pub parts: &'a HashMap<String, Part>,
}

impl TensorLoader for SliceLoader<'_> {
    fn tensor(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        match self.parts.get(name).copied().unwrap_or(Part::Full) {
            Part::Full | Part::Whole => self.inner.tensor(name, shape),
            Part::Slice {
                dim,
                start,
                len,
                full,
            } => {
                let mut whole = shape.to_vec();
                whole[dim] = full;
                Ok(self
                    .inner
                    .tensor(name, &whole)?
                    .narrow(dim, start, len)?
                    .contiguous()?)
            }
            Part::Absent => Err(ModelError::InvalidInput(format!(
                "{name} belongs to another rank"
            ))),
        }
    }

    fn contains(&self, name: &str) -> bool {
        self.parts.get(name) != Some(&Part::Absent) && self.inner.contains(name)
    }
}

/// Point-to-point messages between pipeline stages (implemented over MPI by skymoe-dist).
/// Called on the thread that runs the forward and backward passes.
pub trait PipeComm: Send + Sync + std::fmt::Debug {
    /// Send `data` to stage `dest`.
    fn send(&self, data: &[f32], dest: usize, tag: i32) -> std::result::Result<(), String>;
    /// Receive exactly `data.len()` elements from stage `src`.
    fn recv(&self, data: &mut [f32], src: usize, tag: i32) -> std::result::Result<(), String>;
}

/// This process's pipeline stage: which decoder layers it runs, and the link to its
/// neighbours. The first stage also embeds the tokens, the last also runs the final norm, the
/// LM head and the loss.
#[derive(Debug, Clone)]
pub struct PipelineStage {
    /// Messages to the other stages (ranks of the pipeline group are stage indices).
    pub comm: Arc<dyn PipeComm>,
    /// This stage's index.
    pub stage: usize,
    /// Stages in the pipeline.
    pub stages: usize,
    /// The decoder layers of this stage.
    pub layers: std::ops::Range<usize>,
}

const TAG_ACTIVATION: i32 = 21;
const TAG_GRADIENT: i32 = 22;

impl PipelineStage {
    /// Whether this stage embeds the tokens.
    pub fn is_first(&self) -> bool {
        self.stage == 0
    }

    /// Whether this stage computes the logits.
    pub fn is_last(&self) -> bool {
        self.stage + 1 == self.stages
    }

    /// The activations from the previous stage, shaped like `anchor` (a trainable zero tensor,
    /// so that the backward pass reaches this op and sends the gradient back).
    pub fn receive(&self, anchor: &Tensor) -> candle_core::Result<Tensor> {
        anchor.apply_op1(RecvActivations {
            comm: self.comm.clone(),
            src: self.stage - 1,
        })
    }

    /// Send `y` to the next stage; returns a zero scalar whose backward receives `y`'s
    /// gradient from that stage.
    pub fn send(&self, y: &Tensor) -> candle_core::Result<Tensor> {
        y.contiguous()?.apply_op1(SendActivations {
            comm: self.comm.clone(),
            dest: self.stage + 1,
        })
    }
}

/// Receives a stage's input forward; sends its gradient back backward.
struct RecvActivations {
    comm: Arc<dyn PipeComm>,
    src: usize,
}

impl CustomOp1 for RecvActivations {
    fn name(&self) -> &'static str {
        "pp-recv-activations"
    }
    fn cpu_fwd(&self, _s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let mut buf = vec![0f32; l.shape().elem_count()];
        self.comm
            .recv(&mut buf, self.src, TAG_ACTIVATION)
            .map_err(candle_core::Error::msg)?;
        Ok((CpuStorage::F32(buf), l.shape().clone()))
    }
    fn bwd(
        &self,
        _arg: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        let g = grad.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
        self.comm
            .send(&g, self.src, TAG_GRADIENT)
            .map_err(candle_core::Error::msg)?;
        Ok(None)
    }
}

/// Sends a stage's output forward (returning a zero scalar); receives its gradient backward.
struct SendActivations {
    comm: Arc<dyn PipeComm>,
    dest: usize,
}

impl CustomOp1 for SendActivations {
    fn name(&self) -> &'static str {
        "pp-send-activations"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        self.comm
            .send(contiguous_f32(s, l)?, self.dest, TAG_ACTIVATION)
            .map_err(candle_core::Error::msg)?;
        Ok((CpuStorage::F32(vec![0.0]), Shape::from(())))
    }
    fn bwd(
        &self,
        arg: &Tensor,
        _res: &Tensor,
        _grad: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        // The next stage's gradient already carries the loss scaling (both stages scale their
        // objective alike), so the incoming scalar gradient is not applied again.
        let mut buf = vec![0f32; arg.elem_count()];
        self.comm
            .recv(&mut buf, self.dest, TAG_GRADIENT)
            .map_err(candle_core::Error::msg)?;
        Ok(Some(Tensor::from_vec(buf, arg.shape(), arg.device())?))
    }
}

/// Checkpoint names of the tensors a pipeline stage holds: its parameters, and the selection
/// biases (`e_score_correction_bias`, router state) of its MoE layers.
pub fn stage_tensor_names(
    config: &ModelConfig,
    stage: &PipelineStage,
) -> std::collections::HashSet<String> {
    let mut keep: std::collections::HashSet<String> = stage
        .layers
        .clone()
        .filter(|&l| config.is_moe_layer(l))
        .map(|l| crate::layers::router::selection_bias_name(&config.moe_names(l).gate))
        .collect();
    for spec in config.param_specs() {
        let name = spec.name;
        let in_layer = stage
            .layers
            .clone()
            .any(|i| name.starts_with(&names::layer(i, "")));
        let first = stage.is_first() && name == names::EMBED;
        let last = stage.is_last()
            && (name == names::FINAL_NORM
                || name == names::LM_HEAD
                || (config.tie_word_embeddings && name == names::EMBED));
        if in_layer || first || last {
            keep.insert(name);
        }
    }
    keep
}

/// The variable-size all-to-all that moves tokens to their experts' ranks (implemented over
/// MPI by skymoe-dist). Called on the thread that runs the forward and backward passes.
pub trait ExpertComm: Send + Sync + std::fmt::Debug {
    /// This rank in the expert-parallel group.
    fn rank(&self) -> usize;
    /// Ranks in the group.
    fn size(&self) -> usize;
    /// Send `send_counts[j]` consecutive elements of `send` to rank `j`; receive
    /// `recv_counts[j]` from rank `j`, concatenated in rank order.
    fn all_to_all_v(
        &self,
        send: &[f32],
        send_counts: &[usize],
        recv_counts: &[usize],
    ) -> std::result::Result<Vec<f32>, String>;
}

/// Experts spread over ranks that each hold different tokens (Megatron expert parallelism
/// across data-parallel ranks): tokens travel to their experts' ranks and back by all-to-all.
#[derive(Debug, Clone)]
pub struct ExpertParallel {
    /// The expert-parallel group.
    pub comm: Arc<dyn ExpertComm>,
}

/// Moves rows between the ranks of an expert-parallel group; its backward moves the
/// gradients back the opposite way.
struct Exchange {
    comm: Arc<dyn ExpertComm>,
    /// Rows sent to each rank, and received from each.
    send_rows: Vec<usize>,
    recv_rows: Vec<usize>,
    width: usize,
}

impl CustomOp1 for Exchange {
    fn name(&self) -> &'static str {
        "ep-all-to-all"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let w = self.width;
        let sc: Vec<usize> = self.send_rows.iter().map(|r| r * w).collect();
        let rc: Vec<usize> = self.recv_rows.iter().map(|r| r * w).collect();
        let out = self
            .comm
            .all_to_all_v(contiguous_f32(s, l)?, &sc, &rc)
            .map_err(candle_core::Error::msg)?;
        let rows: usize = self.recv_rows.iter().sum();
        Ok((CpuStorage::F32(out), Shape::from((rows, w))))
    }
    fn bwd(
        &self,
        _arg: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        let back = Exchange {
            comm: self.comm.clone(),
            send_rows: self.recv_rows.clone(),
            recv_rows: self.send_rows.clone(),
            width: self.width,
        };
        Ok(Some(grad.contiguous()?.apply_op1_no_bwd(&back)?))
    }
}

impl ExpertParallel {
    /// This rank in the group.
    pub fn rank(&self) -> usize {
        self.comm.rank()
    }

    /// Ranks in the group.
    pub fn size(&self) -> usize {
        self.comm.size()
    }

    /// Send `send_rows[j]` consecutive rows of `x` `[rows, width]` to rank `j`; returns the
    /// rows received, in rank order. Differentiable.
    pub fn exchange(
        &self,
        x: &Tensor,
        send_rows: Vec<usize>,
        recv_rows: Vec<usize>,
    ) -> candle_core::Result<Tensor> {
        let width = x.dim(1)?;
        x.contiguous()?.apply_op1(Exchange {
            comm: self.comm.clone(),
            send_rows,
            recv_rows,
            width,
        })
    }

    /// Exchange `per_rank` counts with every rank: `counts[j·per_rank .. (j+1)·per_rank]` go
    /// to rank `j`; returns the counts received, in rank order.
    pub fn exchange_counts(
        &self,
        counts: &[usize],
        per_rank: usize,
    ) -> candle_core::Result<Vec<usize>> {
        let n = self.size();
        let send: Vec<f32> = counts.iter().map(|&c| c as f32).collect();
        let got = self
            .comm
            .all_to_all_v(&send, &vec![per_rank; n], &vec![per_rank; n])
            .map_err(candle_core::Error::msg)?;
        Ok(got.into_iter().map(|c| c as usize).collect())
    }
}

/// Parts of the routed experts for expert-parallel rank `rank` of `size`: its own experts
/// whole, the others absent.
pub fn expert_parts(config: &ModelConfig, rank: usize, size: usize) -> HashMap<String, Part> {
    let mut parts = HashMap::new();
    let Some(m) = &config.moe else {
        return parts;
    };
    let per = (m.num_experts / size.max(1)).max(1);
    for i in 0..config.num_hidden_layers {
        if !config.is_moe_layer(i) {
            continue;
        }
        for (e, en) in config.moe_names(i).experts.iter().enumerate() {
            let p = if e / per == rank {
                Part::Whole
            } else {
                Part::Absent
            };
            for name in [&en.gate, &en.up, &en.down] {
                parts.insert(name.clone(), p);
            }
        }
    }
    parts
}
