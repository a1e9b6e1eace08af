//! The causal language model: embedding → decoder layers → final norm → LM head.

use candle_core::{Device, Tensor, Var};

use crate::config::ModelConfig;
use crate::error::{ModelError, Result};
use crate::layers::attention::{Attention, AttentionBlock, LayerKv};
use crate::layers::block::{DecoderLayer, FeedForward};
use crate::layers::ffn::SwiGlu;
use crate::layers::linear::Linear;
use crate::layers::mla::{MlaAttention, MlaQuery};
use crate::layers::moe::{MoeBlock, SharedExpert};
use crate::layers::norm::RmsNorm;
use crate::layers::rotary::RotaryEmbedding;
use crate::layers::router::{Gate, Router, Routing};
use crate::layers::TensorLoader;
use crate::names::{self, SwiGluNames};
use crate::parallel::{ExpertParallel, PipelineStage, Sharding};
use crate::weights::{Checkpoint, WeightSource};

/// Per-layer keys and values for incremental decoding.
#[derive(Debug, Clone, Default)]
pub struct KvCache {
    layers: Vec<Option<LayerKv>>,
    len: usize,
}

impl KvCache {
    /// An empty cache for a model of `num_layers` layers.
    pub fn new(num_layers: usize) -> Self {
        KvCache {
            layers: vec![None; num_layers],
            len: 0,
        }
    }

    /// Number of positions cached.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether nothing is cached yet.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Forget everything.
    pub fn clear(&mut self) {
        self.layers.iter_mut().for_each(|l| *l = None);
        self.len = 0;
    }
}

/// What a forward pass returns besides the logits.
#[derive(Debug, Clone)]
pub struct ForwardOutput {
    /// Logits `[batch, seq, vocab]`.
    pub logits: Tensor,
    /// The routing of each MoE layer, in layer order (`None` for dense layers, and for the
    /// layers of other pipeline stages).
    pub routings: Vec<Option<Routing>>,
    /// On a pipeline stage before the last: a zero scalar whose backward pulls the gradient
    /// of the stage's output from the next stage (`logits` is then empty).
    pub stage_output: Option<Tensor>,
}

/// A decoder-only causal language model of any supported family.
#[derive(Debug, Clone)]
pub struct CausalLm {
    /// Its configuration.
    pub config: ModelConfig,
    /// Token embedding `[vocab, hidden]`.
    pub embed: Tensor,
    /// Decoder layers.
    pub layers: Vec<DecoderLayer>,
    /// Final norm.
    pub norm: RmsNorm,
    /// LM head `[vocab, hidden]` (the embedding when tied).
    pub lm_head: Tensor,
    rotary: RotaryEmbedding,
    /// The pipeline stage this model is, if it is one: `layers` then holds only the stage's
    /// decoder layers; `embed` is used on the first stage only and `norm`/`lm_head` on the
    /// last only (the others hold empty placeholders).
    pub pipeline: Option<PipelineStage>,
    /// Layers whose activations are recomputed in backward (training), if any.
    pub recompute: Option<std::sync::Arc<crate::recompute::Recompute>>,
}

/// A [`TensorLoader`] over a checkpoint's weights on a device.
pub struct CheckpointLoader<'a> {
    weights: &'a WeightSource,
    device: &'a Device,
}

impl<'a> CheckpointLoader<'a> {
    /// Loads from `weights` onto `device`.
    pub fn new(weights: &'a WeightSource, device: &'a Device) -> Self {
        CheckpointLoader { weights, device }
    }
}

impl TensorLoader for CheckpointLoader<'_> {
    fn tensor(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        self.weights.get(name, shape, self.device)
    }
    fn contains(&self, name: &str) -> bool {
        self.weights.contains(name)
    }
}

fn swiglu(l: &dyn TensorLoader, n: &SwiGluNames, hidden: usize, ffn: usize) -> Result<SwiGlu> {
    Ok(SwiGlu {
        gate: Linear::new(l.tensor(&n.gate, &[ffn, hidden])?, None),
        up: Linear::new(l.tensor(&n.up, &[ffn, hidden])?, None),
        down: Linear::new(l.tensor(&n.down, &[hidden, ffn])?, None),
    })
}

/// Layer `i`'s q and k norms, if the config has them, for a tensor-parallel group of `n`
/// ranks (a per-head norm is shared by all heads; one over the whole projection is cut to the
/// rank's heads).
fn qk_norms(
    c: &ModelConfig,
    l: &dyn TensorLoader,
    i: usize,
    n: usize,
) -> Result<Option<(RmsNorm, RmsNorm)>> {
    let Some((qs, ks)) = c.qk_norm_sizes() else {
        return Ok(None);
    };
    // A norm over the whole projection: this rank's heads' part of the weight.
    let (qs, ks) = if c.qk_norm == crate::config::QkNorm::PerProjection {
        (qs / n, ks / n)
    } else {
        (qs, ks)
    };
    let norm = |name: String, size: usize| -> Result<RmsNorm> {
        Ok(RmsNorm::new(l.tensor(&name, &[size])?, c.rms_norm_eps))
    };
    Ok(Some((
        norm(names::q_norm(i), qs)?,
        norm(names::k_norm(i), ks)?,
    )))
}

/// Layer `i`'s grouped-query attention, cut over `sharding`'s group when given.
fn gqa_attention(
    c: &ModelConfig,
    l: &dyn TensorLoader,
    i: usize,
    sharding: Option<&Sharding>,
) -> Result<Attention> {
    let h = c.hidden_size;
    let n = sharding.map_or(1, |s| s.tp.size());
    let (q, kv) = (
        c.num_attention_heads * c.head_dim / n,
        c.num_key_value_heads * c.head_dim / n,
    );
    let p = |s: &str| names::layer(i, s);
    let proj = |name: &str, rows: usize, cols: usize, bias: bool| -> Result<Linear> {
        let w = l.tensor(&p(&format!("self_attn.{name}.weight")), &[rows, cols])?;
        let b = if bias {
            Some(l.tensor(&p(&format!("self_attn.{name}.bias")), &[rows])?)
        } else {
            None
        };
        Ok(Linear::new(w, b))
    };
    Ok(Attention {
        q_proj: proj("q_proj", q, h, c.qkv_bias)?,
        k_proj: proj("k_proj", kv, h, c.qkv_bias)?,
        v_proj: proj("v_proj", kv, h, c.qkv_bias)?,
        o_proj: proj("o_proj", h, q, c.o_bias)?,
        num_heads: c.num_attention_heads / n,
        num_kv_heads: c.num_key_value_heads / n,
        head_dim: c.head_dim,
        tp: sharding.map(|s| s.tp.clone()),
        qk_norm: c.qk_norm,
        qk_norms: qk_norms(c, l, i, n)?,
        clip_qkv: c.clip_qkv,
    })
}

/// Layer `i`'s multi-head latent attention.
fn mla_attention(
    c: &ModelConfig,
    dims: &crate::config::MlaConfig,
    l: &dyn TensorLoader,
    i: usize,
    sharding: Option<&Sharding>,
) -> Result<MlaAttention> {
    let n = sharding.map_or(1, |s| s.tp.size());
    let mut t = std::collections::HashMap::new();
    // This rank's part of each tensor (the loader cuts split ones, see `parallel::parts`).
    for (name, shape) in c.mla_tensors_split(i, n) {
        let w = l.tensor(&name, &shape)?;
        t.insert(name, w);
    }
    let tp_size = n;
    let n = names::mla(i);
    let mut take = |name: &str| -> Result<Tensor> {
        t.remove(name)
            .ok_or_else(|| ModelError::MissingTensor { name: name.into() })
    };
    let eps = crate::config::MLA_NORM_EPS;
    let query = match dims.q_lora_rank {
        Some(_) => MlaQuery::LowRank {
            down: Linear::new(take(&n.q_a_proj)?, None),
            norm: RmsNorm::new(take(&n.q_a_norm)?, eps),
            up: Linear::new(take(&n.q_b_proj)?, None),
        },
        None => MlaQuery::Direct(Linear::new(take(&n.q_proj)?, None)),
    };
    Ok(MlaAttention {
        query,
        kv_down: Linear::new(take(&n.kv_a_proj)?, None),
        kv_norm: RmsNorm::new(take(&n.kv_a_norm)?, eps),
        kv_up: Linear::new(take(&n.kv_b_proj)?, None),
        o_proj: Linear::new(take(&n.o_proj)?, None),
        num_heads: c.num_attention_heads / tp_size,
        dims: *dims,
        scale: c.attention_scale(),
        tp: sharding.map(|s| s.tp.clone()),
    })
}

/// Build decoder layer `i` of `c` from `l`, cut over `sharding`'s group when given (the loader
/// then hands out this rank's parts).
pub fn build_layer(
    c: &ModelConfig,
    l: &dyn TensorLoader,
    i: usize,
    sharding: Option<&Sharding>,
) -> Result<DecoderLayer> {
    build_layer_split(c, l, i, sharding, None)
}

/// [`build_layer`] with experts spread over an expert-parallel group of ranks holding
/// different tokens (this rank builds only its share of the experts).
pub fn build_layer_split(
    c: &ModelConfig,
    l: &dyn TensorLoader,
    i: usize,
    sharding: Option<&Sharding>,
    ep: Option<&ExpertParallel>,
) -> Result<DecoderLayer> {
    let h = c.hidden_size;
    let (n, rank) = sharding.map_or((1, 0), |s| (s.tp.size(), s.tp.rank()));
    let tp = sharding.map(|s| s.tp.clone());
    let p = |s: &str| names::layer(i, s);
    let attention = match &c.mla {
        Some(dims) => AttentionBlock::Mla(mla_attention(c, dims, l, i, sharding)?),
        None => AttentionBlock::Gqa(gqa_attention(c, l, i, sharding)?),
    };
    let ffn = match (&c.moe, c.is_moe_layer(i)) {
        (Some(m), true) => {
            let names = c.moe_names(i);
            let e = m.num_experts;
            let gate = match &names.gate2 {
                Some(g2) => Gate::TwoLayer(
                    Linear::new(l.tensor(&names.gate, &[8 * e, h])?, None),
                    Linear::new(l.tensor(g2, &[e, 8 * e])?, None),
                ),
                None => Gate::Linear(Linear::new(l.tensor(&names.gate, &[e, h])?, None)),
            };
            let whole = sharding.is_some_and(|s| s.whole_experts);
            let (expert_ids, width): (Vec<usize>, usize) = if let Some(ep) = ep {
                let per = e / ep.size();
                (
                    (ep.rank() * per..(ep.rank() + 1) * per).collect(),
                    m.expert_intermediate_size,
                )
            } else if whole {
                let per = e / n;
                (
                    (rank * per..(rank + 1) * per).collect(),
                    m.expert_intermediate_size,
                )
            } else {
                ((0..e).collect(), m.expert_intermediate_size / n)
            };
            let experts = expert_ids
                .iter()
                .map(|&x| swiglu(l, &names.experts[x], h, width))
                .collect::<Result<Vec<_>>>()?;
            let shared = match (&names.shared, m.shared_expert_intermediate_size) {
                (Some(shared), Some(sf)) => Some(SharedExpert {
                    ffn: swiglu(l, &shared.ffn, h, sf / n)?,
                    gate: match &shared.gate {
                        Some(g) => Some(Linear::new(l.tensor(g, &[1, h])?, None)),
                        None => None,
                    },
                }),
                _ => None,
            };
            // DeepSeek-V3's aux-loss-free balancing bias, when the checkpoint has one.
            let bias_name = crate::layers::router::selection_bias_name(&names.gate);
            if m.router.requires_selection_bias && !l.contains(&bias_name) {
                return Err(ModelError::InvalidInput(format!(
                    "{} routers select with a bias, and the checkpoint has no {bias_name}",
                    c.architecture.hf_class()
                )));
            }
            let selection_bias = if l.contains(&bias_name) {
                Some(
                    l.tensor(&bias_name, &[e])?
                        .to_dtype(candle_core::DType::F32)?,
                )
            } else {
                None
            };
            FeedForward::Moe(Box::new(MoeBlock {
                router: Router {
                    gate,
                    config: m.router.clone(),
                    top_k: m.top_k,
                    selection_bias,
                },
                experts,
                expert_ids,
                num_experts: e,
                shared,
                tp: tp.clone(),
                ep: ep.cloned(),
                defer_expert_weight_grads: false,
            }))
        }
        _ => FeedForward::Dense(swiglu(
            l,
            &c.dense_ffn_names(i),
            h,
            c.intermediate_size / n,
        )?),
    };
    Ok(DecoderLayer {
        input_norm: RmsNorm::new(
            l.tensor(&p("input_layernorm.weight"), &[h])?,
            c.rms_norm_eps,
        ),
        attention,
        post_attention_norm: RmsNorm::new(
            l.tensor(&p("post_attention_layernorm.weight"), &[h])?,
            c.rms_norm_eps,
        ),
        ffn,
        tp,
    })
}

impl CausalLm {
    /// Build the model from a checkpoint opened with [`Checkpoint::open`].
    pub fn load(ckpt: &Checkpoint, device: &Device) -> Result<Self> {
        Self::from_loader(
            ckpt.config.clone(),
            &CheckpointLoader::new(&ckpt.weights, device),
            device,
        )
    }

    /// Build the model from any tensor loader (checkpoints, trainable variables, ...).
    pub fn from_loader(config: ModelConfig, l: &dyn TensorLoader, device: &Device) -> Result<Self> {
        Self::from_loader_sharded(config, l, device, None)
    }

    /// Build this rank's part of a model cut over a tensor-parallel group (see
    /// [`crate::parallel`]); `l` hands out this rank's parts (e.g. a
    /// [`crate::parallel::SliceLoader`]). `None` builds the whole model.
    pub fn from_loader_sharded(
        config: ModelConfig,
        l: &dyn TensorLoader,
        device: &Device,
        sharding: Option<&Sharding>,
    ) -> Result<Self> {
        Self::from_loader_split(config, l, device, sharding, None, None)
    }

    /// Build this process's part of a model split any way: cut over a tensor-parallel group
    /// (`sharding`), with experts spread over ranks holding different tokens (`ep`), and/or
    /// as one pipeline stage (`stage`: its decoder layers, plus the embedding on the first
    /// stage and the final norm and LM head on the last). `l` hands out this rank's parts.
    pub fn from_loader_split(
        config: ModelConfig,
        l: &dyn TensorLoader,
        device: &Device,
        sharding: Option<&Sharding>,
        ep: Option<&ExpertParallel>,
        stage: Option<PipelineStage>,
    ) -> Result<Self> {
        let c = &config;
        let h = c.hidden_size;
        let first = stage.as_ref().is_none_or(|s| s.is_first());
        let last = stage.as_ref().is_none_or(|s| s.is_last());
        let range = stage
            .as_ref()
            .map_or(0..c.num_hidden_layers, |s| s.layers.clone());
        let placeholder = || Tensor::zeros((0, h), candle_core::DType::F32, device);
        let embed = if first {
            l.tensor(names::EMBED, &[c.vocab_size, h])?
        } else {
            placeholder()?
        };
        let layers = range
            .map(|i| build_layer_split(c, l, i, sharding, ep))
            .collect::<Result<Vec<_>>>()?;
        let (norm, lm_head) = if last {
            let norm = RmsNorm::new(l.tensor(names::FINAL_NORM, &[h])?, c.rms_norm_eps);
            let head = match (c.tie_word_embeddings, first) {
                (true, true) => embed.clone(),
                (true, false) => l.tensor(names::EMBED, &[c.vocab_size, h])?,
                (false, _) => l.tensor(names::LM_HEAD, &[c.vocab_size, h])?,
            };
            (norm, head)
        } else {
            (
                RmsNorm::new(
                    Tensor::ones(h, candle_core::DType::F32, device)?,
                    c.rms_norm_eps,
                ),
                placeholder()?,
            )
        };
        let rotary = RotaryEmbedding::from_config(c, device)?;
        Ok(CausalLm {
            config,
            embed,
            layers,
            norm,
            lm_head,
            rotary,
            pipeline: stage,
            recompute: None,
        })
    }

    /// Build one pipeline stage (optionally cut over a tensor-parallel group too): its decoder
    /// layers, plus the embedding on the first stage and the final norm and LM head on the
    /// last. `l` need only hold the stage's tensors.
    pub fn from_loader_stage(
        config: ModelConfig,
        l: &dyn TensorLoader,
        device: &Device,
        sharding: Option<&Sharding>,
        stage: PipelineStage,
    ) -> Result<Self> {
        Self::from_loader_split(config, l, device, sharding, None, Some(stage))
    }

    /// A fresh KV cache for this model.
    pub fn new_cache(&self) -> KvCache {
        KvCache::new(self.layers.len())
    }

    /// Check token ids against the vocabulary, and `offset + seq_len` against the position limit.
    fn check_tokens(&self, tokens: &[u32], offset: usize, seq_len: usize) -> Result<()> {
        if tokens.is_empty() {
            return Err(ModelError::InvalidInput("no tokens to run".into()));
        }
        if let Some(&bad) = tokens
            .iter()
            .find(|&&t| t as usize >= self.config.vocab_size)
        {
            return Err(ModelError::InvalidInput(format!(
                "token id {bad} is out of range for a vocabulary of {}",
                self.config.vocab_size
            )));
        }
        let end = offset + seq_len;
        if end > self.rotary.max_positions() {
            return Err(ModelError::InvalidInput(format!(
                "sequence of {end} positions exceeds the model's maximum of {}",
                self.rotary.max_positions()
            )));
        }
        Ok(())
    }

    /// Run one sequence (`tokens`), continuing after what `cache` holds (if given), and
    /// return the logits of every position `[seq, vocab]`.
    pub fn forward_tokens(&self, tokens: &[u32], cache: Option<&mut KvCache>) -> Result<Tensor> {
        let out = self.forward_full(tokens, cache, true)?;
        Ok(out.logits.squeeze(0)?)
    }

    /// Run one sequence and return only the logits of its last position `[vocab]`.
    pub fn forward_last(&self, tokens: &[u32], cache: Option<&mut KvCache>) -> Result<Tensor> {
        let out = self.forward_full(tokens, cache, false)?;
        Ok(out.logits.squeeze(0)?.squeeze(0)?)
    }

    /// Run one sequence; `all_positions` selects logits for every position or only the last.
    pub fn forward_full(
        &self,
        tokens: &[u32],
        cache: Option<&mut KvCache>,
        all_positions: bool,
    ) -> Result<ForwardOutput> {
        let offset = cache.as_ref().map_or(0, |c| c.len);
        self.check_tokens(tokens, offset, tokens.len())?;
        let ids = Tensor::from_vec(tokens.to_vec(), (1, tokens.len()), self.embed.device())?;
        self.run(&ids, offset, cache, None, all_positions)
    }

    /// Whether the MoE layers hand their experts' weight gradients over in their routing
    /// instead of through the autograd graph (see
    /// [`MoeBlock::defer_expert_weight_grads`](crate::layers::moe::MoeBlock::defer_expert_weight_grads)).
    pub fn set_deferred_expert_grads(&mut self, on: bool) {
        for layer in &mut self.layers {
            if let crate::layers::block::FeedForward::Moe(moe) = &mut layer.ffn {
                moe.defer_expert_weight_grads = on;
            }
        }
    }

    /// Run a batch of equal-length sequences from position 0 (training): logits
    /// `[batch, seq, vocab]` and every MoE layer's routing. `capacity_factor` limits tokens per
    /// expert over the whole batch (`None` or ≤ 0: dropless).
    pub fn forward_batch(
        &self,
        batch: &[Vec<u32>],
        capacity_factor: Option<f64>,
    ) -> Result<ForwardOutput> {
        let t = batch.first().map_or(0, Vec::len);
        if batch.iter().any(|s| s.len() != t) {
            return Err(ModelError::InvalidInput(
                "all sequences of a batch must have the same length".into(),
            ));
        }
        let flat: Vec<u32> = batch.iter().flatten().copied().collect();
        self.check_tokens(&flat, 0, t)?;
        let ids = Tensor::from_vec(flat, (batch.len(), t), self.embed.device())?;
        self.run(&ids, 0, None, capacity_factor, true)
    }

    fn run(
        &self,
        ids: &Tensor,
        offset: usize,
        mut cache: Option<&mut KvCache>,
        capacity_factor: Option<f64>,
        all_positions: bool,
    ) -> Result<ForwardOutput> {
        let (b, t) = ids.dims2()?;
        let h = self.config.hidden_size;
        if let Some(stage) = &self.pipeline {
            return self.run_stage(stage, ids, capacity_factor);
        }
        let mut x = self
            .embed
            .index_select(&ids.flatten_all()?, 0)?
            .reshape((b, t, h))?;
        let mut routings = Vec::with_capacity(self.layers.len());
        for (i, layer) in self.layers.iter().enumerate() {
            if cache.is_none() && offset == 0 {
                if let Some((y, r)) = self.recomputed(i, layer, &x, capacity_factor)? {
                    x = y;
                    routings.push(r);
                    continue;
                }
            }
            let slot = cache.as_mut().map(|c| &mut c.layers[i]);
            let (y, r) = layer.forward(&x, &self.rotary, offset, slot, capacity_factor)?;
            x = y;
            routings.push(r);
        }
        if let Some(c) = cache {
            c.len += t;
        }
        if !all_positions {
            x = x.narrow(1, t - 1, 1)?;
        }
        let x = self.norm.forward(&x)?;
        let (b, t, h) = x.dims3()?;
        let logits = x
            .reshape((b * t, h))?
            .matmul(&self.lm_head.t()?)?
            .reshape((b, t, self.config.vocab_size))?;
        Ok(ForwardOutput {
            logits,
            routings,
            stage_output: None,
        })
    }

    /// Decoder layer `index` applied to `x` with its activations recomputed in backward, when
    /// it is one of the recomputed layers (`None` otherwise).
    fn recomputed(
        &self,
        index: usize,
        layer: &DecoderLayer,
        x: &Tensor,
        capacity_factor: Option<f64>,
    ) -> Result<Option<(Tensor, Option<Routing>)>> {
        let Some(plan) = self
            .recompute
            .as_ref()
            .filter(|p| p.layers.contains(&index))
        else {
            return Ok(None);
        };
        let y = x
            .contiguous()?
            .apply_op1(crate::recompute::RecomputeLayer {
                index,
                layer: layer.clone(),
                rotary: self.rotary.clone(),
                capacity_factor,
                plan: plan.clone(),
            })?;
        let routing = plan
            .routings
            .lock()
            .map_err(|_| ModelError::InvalidInput("recomputation state poisoned".into()))?
            .remove(&index);
        Ok(Some((y, routing)))
    }

    /// A pipeline stage's forward from position 0 without a cache: receive (or embed) the
    /// input, run the stage's layers, then send the output on (or compute the logits).
    fn run_stage(
        &self,
        stage: &PipelineStage,
        ids: &Tensor,
        capacity_factor: Option<f64>,
    ) -> Result<ForwardOutput> {
        let (b, t) = ids.dims2()?;
        let h = self.config.hidden_size;
        let mut x = if stage.is_first() {
            self.embed
                .index_select(&ids.flatten_all()?, 0)?
                .reshape((b, t, h))?
        } else {
            // A trainable zero tensor, so that the backward pass reaches the receiving op.
            let anchor = Var::zeros((b, t, h), candle_core::DType::F32, ids.device())?;
            stage.receive(anchor.as_tensor())?
        };
        let mut routings = vec![None; self.config.num_hidden_layers];
        for (i, layer) in stage.layers.clone().zip(&self.layers) {
            let (y, r) = match self.recomputed(i, layer, &x, capacity_factor)? {
                Some(out) => out,
                None => layer.forward(&x, &self.rotary, 0, None, capacity_factor)?,
            };
            x = y;
            routings[i] = r;
        }
        if !stage.is_last() {
            return Ok(ForwardOutput {
                logits: Tensor::zeros(0, candle_core::DType::F32, ids.device())?,
                routings,
                stage_output: Some(stage.send(&x)?),
            });
        }
        let x = self.norm.forward(&x)?;
        let logits = x
            .reshape((b * t, h))?
            .matmul(&self.lm_head.t()?)?
            .reshape((b, t, self.config.vocab_size))?;
        Ok(ForwardOutput {
            logits,
            routings,
            stage_output: None,
        })
    }
}
