//! Upcycling: turn a dense Llama checkpoint into an MoE (Skywork-MoE, Mixtral or Qwen3-MoE
//! layout) whose experts start from the dense FFN.
//!
//! With `segments = 1` every expert is a copy of the dense FFN; with no expert noise and
//! renormalised top-k weights the MoE computes exactly the dense FFN's function, whatever the
//! gate. With `segments = G > 1` (fine-grained experts, as Qwen3-MoE and DeepSeekMoE use) the
//! dense FFN's hidden units are split into G column segments, expert `e` holds segment
//! `e mod G` (replicated to fill the expert count), and each expert's down projection is
//! scaled by G: with a zero gate and top-k = G the k selected experts (the first k, all
//! scores tied) are the G segments with weight 1/G each, so the MoE again computes the dense
//! FFN exactly. Other settings start close to it but not equal. Qwen3-MoE's per-head q/k
//! RMSNorm (weights 1) has no setting that leaves attention unchanged: an upcycled Qwen3-MoE
//! starts with the dense FFNs but not the dense attention.
//!
//! DeepSeek-V3 (`deepseek_v3`) follows the DeepSeekMoE recipe: the dense FFN becomes the
//! shared expert (its down projection halved) and the routed experts start from its `G`
//! column segments (down projections scaled by `G/2`); the sigmoid router's scores are
//! renormalised over the top-k and `routed_scaling_factor` is 1, so with a zero gate and
//! top-k = G the layer computes ½·FFN + ½·FFN. The first `dense_layers` layers keep their
//! dense FFN (`first_k_dense_replace`). The selection bias starts at zero. Its latent
//! attention starts from Llama's attention as [`mla`] describes: exact only for a dense
//! model with one kv head, every head dimension rotary and a lossless latent.

pub mod mla;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use rand::SeedableRng;
use skymoe_model::families::NewExperts;
use skymoe_model::layers::TensorLoader;
use skymoe_model::model::CheckpointLoader;
use skymoe_model::{Architecture, Checkpoint, ModelConfig, Tokenizer};

use self::mla::LatentShape;
use crate::checkpoint::{write_dir_atomically, write_model_files};
use crate::error::{Result, TrainError};
use crate::params::normal_samples;

/// How the new router gates start.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum GateInit {
    /// All zeros: every expert equally likely at first.
    Zeros,
    /// Normal with this standard deviation.
    Normal(f64),
}

impl std::str::FromStr for GateInit {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        if s == "zeros" {
            return Ok(GateInit::Zeros);
        }
        if let Some(std) = s.strip_prefix("normal:") {
            let v: f64 = std
                .parse()
                .map_err(|_| format!("`{std}` is not a number"))?;
            if !(v.is_finite() && v >= 0.0) {
                return Err(format!("gate std must be finite and ≥ 0, got {v}"));
            }
            return Ok(GateInit::Normal(v));
        }
        Err(format!("unknown gate init `{s}` (zeros | normal:STD)"))
    }
}

/// What to build.
#[derive(Debug, Clone)]
pub struct UpcycleOptions {
    /// Experts per MoE layer.
    pub experts: usize,
    /// Experts per token.
    pub top_k: usize,
    /// Output layout: `SkyworkMoe` or `Mixtral`.
    pub arch: Architecture,
    /// Router initialisation.
    pub gate_init: GateInit,
    /// Standard deviation of Gaussian noise added to each expert's copy (0: exact copies).
    pub expert_noise: f64,
    /// Gating logit normalisation λ for the Skywork layout (`None`: off).
    pub gate_norm_std: Option<f64>,
    /// Column segments the dense FFN is split into, one per expert (fine-grained experts);
    /// 1: every expert is the whole FFN.
    pub segments: usize,
    /// Seed of the gate and noise draws.
    pub seed: u64,
    /// Width of the key/value latent, for layouts with latent attention (`None`: the
    /// [`default_latent`] one).
    pub kv_lora_rank: Option<usize>,
    /// Rotary dimensions per head, for layouts with latent attention (`None`: the
    /// [`default_latent`] one).
    pub rope_dim: Option<usize>,
    /// Leading layers whose FFN stays dense (`first_k_dense_replace`; DeepSeek layouts only).
    pub dense_layers: usize,
}

/// The latent attention an upcycled DeepSeek model gets unless told otherwise: a lossless
/// latent (`kv_lora_rank` = hidden size), and every head dimension rotary for a dense model
/// with one kv head (then Llama's attention is kept exactly). With several kv heads the
/// shared rotary key can only average them, and fewer rotary dimensions start closer:
/// `head_dim/16` (at least 2), the best of those measured on SmolLM2-135M (README,
/// "Upcycling into DeepSeek-V3").
pub fn default_latent(dense: &ModelConfig) -> LatentShape {
    let d = dense.head_dim;
    let rope_dim = if dense.num_key_value_heads == 1 {
        d
    } else {
        (d / 16).max(2) & !1
    };
    LatentShape {
        kv_lora_rank: dense.hidden_size,
        rope_dim,
    }
}

/// What was built.
#[derive(Debug, Clone)]
pub struct UpcycleSummary {
    /// The new model's config.
    pub config: ModelConfig,
    /// Where it was written.
    pub out: PathBuf,
    /// Whether a tokenizer was written beside it.
    pub tokenizer: bool,
}

/// The MoE config of the upcycled model.
pub fn upcycled_config(dense: &ModelConfig, o: &UpcycleOptions) -> Result<ModelConfig> {
    if dense.architecture != Architecture::Llama || dense.moe.is_some() {
        return Err(TrainError::Config(format!(
            "upcycling needs a dense Llama model, got {}",
            dense.architecture.hf_class()
        )));
    }
    if o.top_k < 1 {
        return Err(TrainError::Config("--top-k must be at least 1".into()));
    }
    if o.experts < o.top_k {
        return Err(TrainError::Config(format!(
            "--experts ({}) must be at least --top-k ({})",
            o.experts, o.top_k
        )));
    }
    if !o.arch.family().upcycle_target() {
        return Err(TrainError::Config(format!(
            "upcycling writes the skywork, mixtral, qwen3_moe or deepseek_v3 layout, not {}",
            o.arch.model_type(),
        )));
    }
    let g = o.segments;
    if g == 0 || !dense.intermediate_size.is_multiple_of(g) || !o.experts.is_multiple_of(g) {
        return Err(TrainError::Config(format!(
            "--segments ({g}) must divide the dense FFN width ({}) and the expert count ({})",
            dense.intermediate_size, o.experts
        )));
    }
    if dense.qkv_bias || dense.o_bias {
        return Err(TrainError::Config(
            "the dense model has attention biases, which the Mixtral/Skywork layouts cannot hold"
                .into(),
        ));
    }
    if !(o.expert_noise.is_finite() && o.expert_noise >= 0.0) {
        return Err(TrainError::Config(format!(
            "--expert-noise must be ≥ 0, got {}",
            o.expert_noise
        )));
    }
    let experts = NewExperts {
        num_experts: o.experts,
        top_k: o.top_k,
        expert_intermediate_size: dense.intermediate_size / g,
        logits_norm_std: o.gate_norm_std,
    };
    let mut c = o.arch.family().new_model(dense.clone(), &experts);
    let deepseek = c.mla.is_some();
    if o.dense_layers > 0 && !deepseek {
        return Err(TrainError::Config(format!(
            "--dense-layers needs a layout with dense layers among MoE layers (deepseek_v3), \
             not {}",
            o.arch.model_type()
        )));
    }
    if o.dense_layers >= dense.num_hidden_layers {
        return Err(TrainError::Config(format!(
            "--dense-layers ({}) must leave at least one of the {} layers MoE",
            o.dense_layers, dense.num_hidden_layers
        )));
    }
    if deepseek {
        let d = default_latent(dense);
        let latent = LatentShape {
            kv_lora_rank: o.kv_lora_rank.unwrap_or(d.kv_lora_rank),
            rope_dim: o.rope_dim.unwrap_or(d.rope_dim),
        };
        latent.check(dense)?;
        let d = dense.head_dim;
        c.mla = Some(skymoe_model::config::MlaConfig {
            q_lora_rank: None,
            kv_lora_rank: latent.kv_lora_rank,
            qk_nope_head_dim: d - latent.rope_dim,
            qk_rope_head_dim: latent.rope_dim,
            v_head_dim: d,
            rope_interleave: true,
        });
        // The rotary tables follow the rotary dimensions.
        c.head_dim = latent.rope_dim;
        c.intermediate_size = dense.intermediate_size;
        if let Some(m) = c.moe.as_mut() {
            // The DeepSeekMoE recipe: the dense FFN is the shared expert.
            m.shared_expert_intermediate_size = Some(dense.intermediate_size);
            m.shared_expert_gated = false;
            m.moe_layers = (0..dense.num_hidden_layers)
                .map(|l| l >= o.dense_layers)
                .collect();
        }
    } else if o.kv_lora_rank.is_some() || o.rope_dim.is_some() {
        return Err(TrainError::Config(format!(
            "--kv-lora-rank and --rope-dim shape latent attention, which {} has not",
            o.arch.model_type()
        )));
    }
    Ok(c)
}

/// The upcycled tensors (checkpoint names of the new layout).
pub fn upcycle_tensors(
    dense: &ModelConfig,
    weights: &dyn TensorLoader,
    o: &UpcycleOptions,
    device: &Device,
) -> Result<(ModelConfig, BTreeMap<String, Tensor>)> {
    let moe_cfg = upcycled_config(dense, o)?;
    let mut rng = rand::rngs::StdRng::seed_from_u64(o.seed);
    let h = dense.hidden_size;
    let mut out = BTreeMap::new();
    let latent = moe_cfg.mla.is_some();
    // Everything but the FFNs (and an attention that becomes latent) is copied as is.
    for spec in dense.param_specs() {
        if spec.name.contains(".mlp.") || (latent && spec.name.contains(".self_attn.")) {
            continue;
        }
        out.insert(spec.name.clone(), weights.tensor(&spec.name, &spec.shape)?);
    }
    // A q/k norm the dense model lacks starts at weight 1.
    if let Some((qs, ks)) = moe_cfg.qk_norm_sizes() {
        for l in 0..dense.num_hidden_layers {
            out.insert(
                skymoe_model::names::q_norm(l),
                Tensor::ones(qs, candle_core::DType::F32, device)?,
            );
            out.insert(
                skymoe_model::names::k_norm(l),
                Tensor::ones(ks, candle_core::DType::F32, device)?,
            );
        }
    }
    let segments = o.segments;
    let width = dense.intermediate_size / segments;
    // The routed experts' share of the layer's output: all of it, or half beside a shared
    // expert that holds the other half.
    let shared = moe_cfg
        .moe
        .as_ref()
        .is_some_and(|m| m.shared_expert_intermediate_size.is_some());
    let routed_share = if shared { 0.5 } else { 1.0 };
    for l in 0..dense.num_hidden_layers {
        if latent {
            out.extend(mla::latent_attention(dense, &moe_cfg, l, weights, device)?);
        }
        let d = dense.dense_ffn_names(l);
        let f = dense.intermediate_size;
        let gate = weights.tensor(&d.gate, &[f, h])?;
        let up = weights.tensor(&d.up, &[f, h])?;
        let down = weights.tensor(&d.down, &[h, f])?;
        if !moe_cfg.is_moe_layer(l) {
            let n = moe_cfg.dense_ffn_names(l);
            out.insert(n.gate, gate);
            out.insert(n.up, up);
            out.insert(n.down, down);
            continue;
        }
        let names = moe_cfg.moe_names(l);
        let g = match o.gate_init {
            GateInit::Zeros => Tensor::zeros((o.experts, h), candle_core::DType::F32, device)?,
            GateInit::Normal(std) => Tensor::from_vec(
                normal_samples(o.experts * h, std, &mut rng),
                (o.experts, h),
                device,
            )?,
        };
        if moe_cfg.requires_selection_bias() {
            out.insert(
                skymoe_model::layers::router::selection_bias_name(&names.gate),
                Tensor::zeros(o.experts, candle_core::DType::F32, device)?,
            );
        }
        out.insert(names.gate.clone(), g);
        if let Some(s) = &names.shared {
            out.insert(s.ffn.gate.clone(), gate.clone());
            out.insert(s.ffn.up.clone(), up.clone());
            out.insert(s.ffn.down.clone(), (&down * (1.0 - routed_share))?);
        }
        let mut noisy = |t: &Tensor| -> Result<Tensor> {
            if o.expert_noise == 0.0 {
                return Ok(t.clone());
            }
            let noise = Tensor::from_vec(
                normal_samples(t.elem_count(), o.expert_noise, &mut rng),
                t.dims(),
                device,
            )?;
            Ok((t + noise)?)
        };
        for (i, e) in names.experts.iter().enumerate() {
            let s = (i % segments) * width;
            let (eg, eu, ed) = if segments == 1 {
                (gate.clone(), up.clone(), (&down * routed_share)?)
            } else {
                (
                    gate.narrow(0, s, width)?.contiguous()?,
                    up.narrow(0, s, width)?.contiguous()?,
                    (down.narrow(1, s, width)?.contiguous()? * (segments as f64 * routed_share))?,
                )
            };
            out.insert(e.gate.clone(), noisy(&eg)?);
            out.insert(e.up.clone(), noisy(&eu)?);
            out.insert(e.down.clone(), noisy(&ed)?);
        }
    }
    // Every tensor of the new layout, in its shape.
    for spec in moe_cfg.param_specs() {
        match out.get(&spec.name) {
            Some(t) if t.dims() == spec.shape.as_slice() => {}
            got => {
                return Err(TrainError::Config(format!(
                    "upcycling produced {} for {} of shape {:?}",
                    got.map_or("nothing".to_string(), |t| format!("{:?}", t.dims())),
                    spec.name,
                    spec.shape
                )))
            }
        }
    }
    Ok((moe_cfg, out))
}

/// Upcycle the dense checkpoint at `from` (a Hugging Face Llama directory or a Llama GGUF file)
/// and write a Hugging Face checkpoint (config, weights, tokenizer) to `out`, atomically.
pub fn upcycle(from: &Path, out: &Path, o: &UpcycleOptions) -> Result<UpcycleSummary> {
    let device = Device::Cpu;
    let ckpt = Checkpoint::open(from, &device)?;
    let loader = CheckpointLoader::new(&ckpt.weights, &device);
    let (config, tensors) = upcycle_tensors(&ckpt.config, &loader, o, &device)?;
    // The tokenizer: tokenizer.json from a directory, or the one embedded in a GGUF file.
    let tok_tmp = tempfile_path(out);
    let tokenizer_src: Option<PathBuf> = if let Some(meta) = &ckpt.gguf_metadata {
        match Tokenizer::from_gguf(meta) {
            Ok(t) => {
                t.inner()
                    .save(&tok_tmp, false)
                    .map_err(|e| TrainError::Write {
                        path: tok_tmp.clone(),
                        reason: e.to_string(),
                    })?;
                Some(tok_tmp.clone())
            }
            Err(e) => {
                tracing::warn!("no tokenizer written: {e}");
                None
            }
        }
    } else {
        let p = from.join("tokenizer.json");
        p.exists().then_some(p)
    };
    let result = write_dir_atomically(out, |dir| {
        write_model_files(dir, &config, &tensors, tokenizer_src.as_deref())?;
        if ckpt.gguf_metadata.is_none() {
            // tokenizer.json and/or tokenizer.model with their configs.
            skymoe_model::tokenizer::copy_tokenizer_files(from, dir)?;
            let src = from.join("generation_config.json");
            if src.exists() {
                std::fs::copy(&src, dir.join("generation_config.json"))
                    .map_err(|e| TrainError::io(&src, e))?;
            }
        }
        Ok(())
    });
    if tokenizer_src.as_deref() == Some(tok_tmp.as_path()) {
        let _ = std::fs::remove_file(&tok_tmp);
    }
    result?;
    Ok(UpcycleSummary {
        config,
        out: out.to_path_buf(),
        tokenizer: tokenizer_src.is_some()
            || (ckpt.gguf_metadata.is_none() && skymoe_model::tokenizer::has_tokenizer(from)),
    })
}

/// A scratch file name beside `out`.
fn tempfile_path(out: &Path) -> PathBuf {
    let name = out
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_default();
    out.with_file_name(format!(".{name}.tokenizer-{}.json", std::process::id()))
}
