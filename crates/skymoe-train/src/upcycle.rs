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

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use rand::SeedableRng;
use skymoe_model::families::NewExperts;
use skymoe_model::layers::TensorLoader;
use skymoe_model::model::CheckpointLoader;
use skymoe_model::{Architecture, Checkpoint, ModelConfig, Tokenizer};

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
            "upcycling writes the skywork, mixtral or qwen3_moe layout, not {}{}",
            o.arch.model_type(),
            if o.arch
                .family()
                .new_model(
                    dense.clone(),
                    &NewExperts {
                        num_experts: 1,
                        top_k: 1,
                        expert_intermediate_size: 1,
                        logits_norm_std: None,
                    }
                )
                .mla
                .is_some()
            {
                " (its multi-head latent attention has no counterpart of Llama's attention to \
                 start from)"
            } else {
                ""
            }
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
    let c = o.arch.family().new_model(dense.clone(), &experts);
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
    // Everything but the FFNs is copied as is.
    for spec in dense.param_specs() {
        if spec.name.contains(".mlp.") {
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
    for l in 0..dense.num_hidden_layers {
        let d = dense.dense_ffn_names(l);
        let f = dense.intermediate_size;
        let gate = weights.tensor(&d.gate, &[f, h])?;
        let up = weights.tensor(&d.up, &[f, h])?;
        let down = weights.tensor(&d.down, &[h, f])?;
        let names = moe_cfg.moe_names(l);
        let g = match o.gate_init {
            GateInit::Zeros => Tensor::zeros((o.experts, h), candle_core::DType::F32, device)?,
            GateInit::Normal(std) => Tensor::from_vec(
                normal_samples(o.experts * h, std, &mut rng),
                (o.experts, h),
                device,
            )?,
        };
        out.insert(names.gate.clone(), g);
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
                (gate.clone(), up.clone(), down.clone())
            } else {
                (
                    gate.narrow(0, s, width)?.contiguous()?,
                    up.narrow(0, s, width)?.contiguous()?,
                    (down.narrow(1, s, width)?.contiguous()? * segments as f64)?,
                )
            };
            out.insert(e.gate.clone(), noisy(&eg)?);
            out.insert(e.up.clone(), noisy(&eu)?);
            out.insert(e.down.clone(), noisy(&ed)?);
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
