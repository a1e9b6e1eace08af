//! Training a model cut over a tensor-parallel group (see `skymoe_model::parallel`): this
//! rank's slices of the parameters and optimiser moments, the global gradient norm, and the
//! whole tensors gathered back for checkpoints.

use std::collections::HashMap;

use candle_core::{Tensor, Var};
use skymoe_model::parallel::{Part, Sharding};

use crate::error::Result;
use crate::optim::global_norm;
use crate::params::TrainableParams;
use crate::trainer::ReplicaSync;

/// The tensor-parallel group of a run and how the model is cut over it.
pub struct ModelShards {
    /// Collectives over the group (norms and gathers).
    pub group: Box<dyn ReplicaSync>,
    /// The layers' view of the group.
    pub sharding: Sharding,
    /// This rank's part of every split or absent tensor.
    pub parts: HashMap<String, Part>,
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
fn unslice_into(whole: &mut [f32], local: &[f32], shape: &[usize], p: Part) {
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

/// A tensor-parallel group before the model is known: its collectives and the layers' view.
pub struct ShardGroup {
    /// Collectives over the group (norms and gathers).
    pub group: Box<dyn ReplicaSync>,
    /// The layers' view of the group.
    pub sharding: Sharding,
}

impl ModelShards {
    /// Cut `config` over `g`; an error says what does not divide.
    pub fn new(g: ShardGroup, config: &skymoe_model::ModelConfig) -> Result<Self> {
        let n = g.group.replicas();
        let rank = g.group.rank();
        let bad = |what: &str, count: usize| {
            Err(crate::error::TrainError::Config(format!(
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
            if g.sharding.whole_experts && m.num_experts % n != 0 {
                return bad("experts", m.num_experts);
            }
            if !g.sharding.whole_experts && m.expert_intermediate_size % n != 0 {
                return bad("expert FFN columns", m.expert_intermediate_size);
            }
        }
        if !config.intermediate_size.is_multiple_of(n) {
            return bad("FFN columns", config.intermediate_size);
        }
        let parts = skymoe_model::parallel::parts(config, rank, n, g.sharding.whole_experts);
        Ok(ModelShards {
            group: g.group,
            sharding: g.sharding,
            parts,
        })
    }

    /// This rank in the group.
    pub fn rank(&self) -> usize {
        self.group.rank()
    }

    /// Cut whole parameters down to this rank's parts.
    pub fn shard_params(&self, params: TrainableParams) -> Result<TrainableParams> {
        let mut vars = std::collections::BTreeMap::new();
        for (name, var) in params.vars {
            let p = part(&self.parts, &name);
            let t = var.as_tensor();
            let local = match p {
                Part::Full | Part::Whole => var,
                Part::Absent => continue,
                Part::Slice {
                    dim, start, len, ..
                } => Var::from_tensor(&t.narrow(dim, start, len)?.contiguous()?)?,
            };
            vars.insert(name, local);
        }
        Ok(TrainableParams { vars })
    }

    /// The whole tensor `name` of `shape` from every rank's `local` elements (`None` where
    /// this rank holds none), summed over the group; replicated tensors count once.
    pub fn gather(&self, name: &str, shape: &[usize], local: Option<&[f32]>) -> Result<Vec<f32>> {
        let n: usize = shape.iter().product();
        let mut whole = vec![0f32; n];
        let p = part(&self.parts, name);
        if let Some(local) = local {
            let replicated = p == Part::Full;
            if !replicated || self.rank() == 0 {
                unslice_into(&mut whole, local, shape, p);
            }
        }
        self.group.sum_f32(&mut whole)?;
        Ok(whole)
    }

    /// The global norm of gradients held in parts over the group (replicated ones counted
    /// once).
    pub fn grad_norm(&self, grads: &std::collections::BTreeMap<String, Tensor>) -> Result<f64> {
        let mut split = std::collections::BTreeMap::new();
        let mut replicated = std::collections::BTreeMap::new();
        for (name, g) in grads {
            if part(&self.parts, name) == Part::Full {
                replicated.insert(name.clone(), g.clone());
            } else {
                split.insert(name.clone(), g.clone());
            }
        }
        let sq = |m: &std::collections::BTreeMap<String, Tensor>| -> Result<f64> {
            let n = global_norm(m)?;
            Ok(n * n)
        };
        let mut total = [sq(&split)?
            + if self.rank() == 0 {
                sq(&replicated)?
            } else {
                0.0
            }];
        self.group.sum_f64(&mut total)?;
        Ok(total[0].sqrt())
    }
}
