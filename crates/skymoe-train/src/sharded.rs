//! Training one model replica cut over several processes: tensor parallelism (see
//! `skymoe_model::parallel`) and pipeline stages. This rank's slices of the parameters and
//! optimiser moments, the global gradient norm, the tied embedding shared by the first and
//! last stage, the per-layer metrics of all stages, and the whole tensors gathered back for
//! checkpoints.

use std::collections::{BTreeMap, HashMap, HashSet};

use candle_core::{Tensor, Var};
use skymoe_model::parallel::{
    expert_parts, stage_tensor_names, ExpertParallel, Part, PipelineStage, Sharding,
};
use skymoe_model::{names, ModelConfig};

use crate::error::{Result, TrainError};
use crate::optim::global_norm;
use crate::params::TrainableParams;
use crate::trainer::ReplicaSync;

/// How the model replica is split, before the model is known.
pub struct ModelSplit {
    /// Every rank of the replica (all stages and tensor-parallel ranks): norms and gathers.
    pub replica: Box<dyn ReplicaSync>,
    /// The tensor-parallel group of this rank, if the layers are cut over one.
    pub tensor: Option<Sharding>,
    /// The pipeline stage of this rank, if the layers are split into stages.
    pub pipeline: Option<PipelineSplit>,
    /// Experts spread over ranks holding different tokens, if they are.
    pub experts: Option<ExpertSplit>,
}

/// Experts spread over an expert-parallel group across data-parallel ranks.
pub struct ExpertSplit {
    /// The group, for the token all-to-all.
    pub ep: ExpertParallel,
    /// The same group, for norms and gathers of expert tensors.
    pub group: Box<dyn ReplicaSync>,
    /// The ranks holding the same experts (expert data parallelism), when more than one.
    pub expert_dp: Option<Box<dyn ReplicaSync>>,
}

/// Chooses layers per stage for a model and a number of stages.
pub type SplitChooser = Box<dyn Fn(&ModelConfig, usize) -> Option<Vec<usize>>>;

/// This rank's pipeline stage and its groups, before the model is known.
pub struct PipelineSplit {
    /// Messages to the other stages (ranks are stage indices).
    pub comm: std::sync::Arc<dyn skymoe_model::parallel::PipeComm>,
    /// This stage.
    pub stage: usize,
    /// Stages.
    pub stages_count: usize,
    /// Decoder layers per stage; chosen by `choose_split` when `None`.
    pub layers_per_stage: Option<Vec<usize>>,
    /// Chooses the layers per stage for a model and a stage count (e.g. the planner's
    /// non-uniform split); as even as possible (extra layers first) when absent or `None`.
    pub choose_split: Option<SplitChooser>,
    /// One rank per stage (same DP and TP index): per-layer metrics are summed over it.
    pub stages: Box<dyn ReplicaSync>,
    /// The first and last stage's ranks of this DP/TP index, which both hold a tied embedding
    /// (`None` on other stages or without tying).
    pub embedding: Option<Box<dyn ReplicaSync>>,
}

/// A pipeline stage with its groups, once the model is known.
pub struct StageGroups {
    /// The stage.
    pub stage: PipelineStage,
    /// Decoder layers of every stage.
    pub split: Vec<usize>,
    /// See [`PipelineSplit::stages`].
    pub stages: Box<dyn ReplicaSync>,
    /// See [`PipelineSplit::embedding`].
    pub embedding: Option<Box<dyn ReplicaSync>>,
}

/// A model replica split over processes, once the model is known.
pub struct ModelShards {
    /// See [`ModelSplit::replica`].
    pub replica: Box<dyn ReplicaSync>,
    /// See [`ModelSplit::tensor`].
    pub tensor: Option<Sharding>,
    /// This rank's pipeline stage and its groups, if the layers are split into stages.
    pub pipeline: Option<StageGroups>,
    /// See [`ModelSplit::experts`].
    pub experts: Option<ExpertSplit>,
    /// Names of the routed experts' tensors when experts are spread over ranks.
    pub expert_names: HashSet<String>,
    /// This rank's part of every split or absent tensor (tensor parallelism).
    pub parts: HashMap<String, Part>,
    /// Tensors this rank holds (its stage's).
    pub held: Option<HashSet<String>>,
    tied: bool,
}

fn part(parts: &HashMap<String, Part>, name: &str) -> Part {
    parts.get(name).copied().unwrap_or(Part::Full)
}

/// This rank's elements of a row-major tensor of `shape` (`None` when absent).
pub fn slice_flat(data: &[f32], shape: &[usize], p: Part) -> Option<Vec<f32>> {
    match p {
        Part::Full | Part::Whole => Some(data.to_vec()),
        Part::Absent => None,
        Part::Slice {
            dim, start, len, ..
        } => {
            let inner: usize = shape[dim + 1..].iter().product();
            let outer: usize = shape[..dim].iter().product();
            let full = shape[dim];
            let mut out = Vec::with_capacity(outer * len * inner);
            for o in 0..outer {
                let base = o * full * inner;
                out.extend_from_slice(&data[base + start * inner..base + (start + len) * inner]);
            }
            Some(out)
        }
    }
}

/// Write this rank's elements `local` into `whole` (row-major, `shape`).
pub fn unslice_into(whole: &mut [f32], local: &[f32], shape: &[usize], p: Part) {
    match p {
        Part::Full | Part::Whole => whole.copy_from_slice(local),
        Part::Absent => {}
        Part::Slice {
            dim, start, len, ..
        } => {
            let inner: usize = shape[dim + 1..].iter().product();
            let outer: usize = shape[..dim].iter().product();
            let full = shape[dim];
            for o in 0..outer {
                let base = o * full * inner;
                let src = &local[o * len * inner..(o + 1) * len * inner];
                whole[base + start * inner..base + (start + len) * inner].copy_from_slice(src);
            }
        }
    }
}

impl ModelShards {
    /// Split `config` as `split` says; an error says what does not divide.
    pub fn new(split: ModelSplit, config: &ModelConfig) -> Result<Self> {
        let (n, rank, whole) = split.tensor.as_ref().map_or((1, 0, false), |s| {
            (s.tp.size(), s.tp.rank(), s.whole_experts)
        });
        let bad = |what: &str, count: usize| {
            Err(TrainError::Config(format!(
                "tensor parallelism over {n} ranks: the {count} {what} do not divide by {n}"
            )))
        };
        if !config.num_attention_heads.is_multiple_of(n) {
            return bad("attention heads", config.num_attention_heads);
        }
        if !config.num_key_value_heads.is_multiple_of(n) {
            return bad("key/value heads", config.num_key_value_heads);
        }
        if let Some(m) = &config.moe {
            if whole && !m.num_experts.is_multiple_of(n) {
                return bad("experts", m.num_experts);
            }
            if !whole && !m.expert_intermediate_size.is_multiple_of(n) {
                return bad("expert FFN columns", m.expert_intermediate_size);
            }
        }
        if !config.intermediate_size.is_multiple_of(n) {
            return bad("FFN columns", config.intermediate_size);
        }
        let pipeline = match split.pipeline {
            None => None,
            Some(p) => {
                let layers = config.num_hidden_layers;
                let k = p.stages_count.max(1);
                let sizes = p
                    .layers_per_stage
                    .clone()
                    .or_else(|| p.choose_split.as_ref().and_then(|f| f(config, k)))
                    .unwrap_or_else(|| {
                        (0..k)
                            .map(|i| layers / k + usize::from(i < layers % k))
                            .collect()
                    });
                if sizes.len() != k || sizes.contains(&0) || sizes.iter().sum::<usize>() != layers {
                    return Err(TrainError::Config(format!(
                        "{sizes:?} layers per stage do not split {layers} layers into {k} non-empty stages"
                    )));
                }
                let start: usize = sizes[..p.stage].iter().sum();
                Some(StageGroups {
                    split: sizes.clone(),
                    stage: PipelineStage {
                        comm: p.comm,
                        stage: p.stage,
                        stages: k,
                        layers: start..start + sizes[p.stage],
                    },
                    stages: p.stages,
                    embedding: p.embedding,
                })
            }
        };
        let mut parts = skymoe_model::parallel::parts(config, rank, n, whole);
        let mut expert_names = HashSet::new();
        if let Some(x) = &split.experts {
            let e = config.moe.as_ref().map_or(0, |m| m.num_experts);
            if e == 0 || !e.is_multiple_of(x.ep.size()) {
                return Err(TrainError::Config(format!(
                    "expert parallelism over {} ranks needs a model whose experts divide by it",
                    x.ep.size()
                )));
            }
            let ep_parts = expert_parts(config, x.ep.rank(), x.ep.size());
            expert_names = ep_parts.keys().cloned().collect();
            parts.extend(ep_parts);
        }
        let held = pipeline
            .as_ref()
            .map(|p| stage_tensor_names(config, &p.stage));
        Ok(ModelShards {
            replica: split.replica,
            tensor: split.tensor,
            pipeline,
            experts: split.experts,
            expert_names,
            parts,
            held,
            tied: config.tie_word_embeddings,
        })
    }

    fn tp_rank(&self) -> usize {
        self.tensor.as_ref().map_or(0, |s| s.tp.rank())
    }

    /// Whether this rank's copy of `name` counts in sums over the replica: split tensors
    /// always, replicated ones on TP rank 0 only, a tied embedding on the first stage only.
    fn counts(&self, name: &str) -> bool {
        if part(&self.parts, name) == Part::Full && self.tp_rank() != 0 {
            return false;
        }
        match &self.pipeline {
            Some(p) if self.tied && name == names::EMBED => p.stage.is_first(),
            _ => true,
        }
    }

    /// Cut whole parameters down to what this rank holds.
    pub fn shard_params(&self, params: TrainableParams) -> Result<TrainableParams> {
        let mut vars = BTreeMap::new();
        for (name, var) in params.vars {
            if self.held.as_ref().is_some_and(|h| !h.contains(&name)) {
                continue;
            }
            let local = match part(&self.parts, &name) {
                Part::Full | Part::Whole => var,
                Part::Absent => continue,
                Part::Slice {
                    dim, start, len, ..
                } => Var::from_tensor(&var.as_tensor().narrow(dim, start, len)?.contiguous()?)?,
            };
            vars.insert(name, local);
        }
        Ok(TrainableParams { vars })
    }

    /// This rank's part of a whole tensor `name` (`None` when it holds none).
    pub fn local_part(&self, name: &str, shape: &[usize], whole: &[f32]) -> Option<Vec<f32>> {
        if self.held.as_ref().is_some_and(|h| !h.contains(name)) {
            return None;
        }
        slice_flat(whole, shape, part(&self.parts, name))
    }

    /// The whole tensor `name` of `shape` from every rank's `local` elements (`None` where
    /// this rank holds none), summed over the replica's ranks.
    pub fn gather(&self, name: &str, shape: &[usize], local: Option<&[f32]>) -> Result<Vec<f32>> {
        let n: usize = shape.iter().product();
        let mut whole = vec![0f32; n];
        if let Some(local) = local {
            if self.counts(name) {
                unslice_into(&mut whole, local, shape, part(&self.parts, name));
            }
        }
        match self
            .experts
            .as_ref()
            .filter(|_| self.expert_names.contains(name))
        {
            // Each expert lives on one rank of its stage's expert-parallel group (which may
            // span tensor-parallel ranks): sum over that group, then over the stages.
            Some(x) => {
                x.group.sum_f32(&mut whole)?;
                if let Some(p) = &self.pipeline {
                    p.stages.sum_f32(&mut whole)?;
                }
            }
            None => self.replica.sum_f32(&mut whole)?,
        }
        Ok(whole)
    }

    /// Under expert parallelism: sum the expert gradients over the ranks holding the same
    /// experts and divide by the data-parallel size (the other gradients are averaged over
    /// the data-parallel group by the trainer).
    pub fn sync_expert_grads(
        &self,
        grads: &mut BTreeMap<String, Tensor>,
        data_parallel: usize,
        params: &TrainableParams,
    ) -> Result<()> {
        let Some(x) = &self.experts else {
            return Ok(());
        };
        let scale = 1.0 / data_parallel.max(1) as f64;
        for (name, var) in params
            .vars
            .iter()
            .filter(|(n, _)| self.expert_names.contains(*n))
        {
            // An expert no token reached has no gradient; it stays without one unless another
            // rank holding it has one (then it contributes zeros), as in one process.
            let local = grads.get(name).cloned();
            let g = match &x.expert_dp {
                Some(group) => {
                    let t = match &local {
                        Some(g) => g.clone(),
                        None => var.as_tensor().zeros_like()?,
                    };
                    let shape = t.dims().to_vec();
                    let mut data = t.flatten_all()?.to_vec1::<f32>()?;
                    data.push(if local.is_some() { 1.0 } else { 0.0 });
                    group.sum_f32(&mut data)?;
                    let present = data.pop().unwrap_or(0.0) > 0.0;
                    present
                        .then(|| Tensor::from_vec(data, shape, t.device()))
                        .transpose()?
                }
                None => local,
            };
            match g {
                Some(g) => {
                    grads.insert(name.clone(), (g * scale)?);
                }
                None => {
                    grads.remove(name);
                }
            }
        }
        Ok(())
    }

    /// The global norm of the replica's gradients (each element counted once).
    pub fn grad_norm(&self, grads: &BTreeMap<String, Tensor>) -> Result<f64> {
        let counted: BTreeMap<String, Tensor> = grads
            .iter()
            .filter(|(n, _)| self.counts(n))
            .map(|(n, g)| (n.clone(), g.clone()))
            .collect();
        let (experts, others): (BTreeMap<String, Tensor>, BTreeMap<String, Tensor>) = counted
            .into_iter()
            .partition(|(n, _)| self.expert_names.contains(n));
        let (a, b) = (global_norm(&others)?, global_norm(&experts)?);
        let mut others_sq = [a * a];
        self.replica.sum_f64(&mut others_sq)?;
        // Experts: once per rank of each stage's expert-parallel group, then over the stages.
        let mut experts_sq = [b * b];
        if let Some(x) = &self.experts {
            x.group.sum_f64(&mut experts_sq)?;
            if let Some(p) = &self.pipeline {
                p.stages.sum_f64(&mut experts_sq)?;
            }
        }
        Ok((others_sq[0] + experts_sq[0]).sqrt())
    }

    /// Sum the gradient of a tied embedding over the first and last stage, which both hold it.
    pub fn sum_tied_embedding(&self, grads: &mut BTreeMap<String, Tensor>) -> Result<()> {
        // Untied, the first stage's embedding and the last stage's LM head are two tensors
        // (every stage must agree on this, or the first would wait in the sum alone).
        if !self.tied {
            return Ok(());
        }
        let Some(group) = self.pipeline.as_ref().and_then(|p| p.embedding.as_ref()) else {
            return Ok(());
        };
        if let Some(g) = grads.get(names::EMBED) {
            let shape = g.dims().to_vec();
            let mut data = g.flatten_all()?.to_vec1::<f32>()?;
            group.sum_f32(&mut data)?;
            let t = Tensor::from_vec(data, shape, g.device())?;
            grads.insert(names::EMBED.to_string(), t);
        }
        Ok(())
    }

    /// Sum per-layer metrics over the pipeline stages (each stage fills its own layers).
    pub fn sum_over_stages(&self, values: &mut [f64]) -> Result<()> {
        match &self.pipeline {
            Some(p) => p.stages.sum_f64(values),
            None => Ok(()),
        }
    }
}
