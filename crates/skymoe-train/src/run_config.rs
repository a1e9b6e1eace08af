//! The run configuration of `skymoe train`: one TOML file, every option documented in
//! `docs/run.toml`; every field has a default so a file only states what it changes.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use skymoe_model::families::NewExperts;
use skymoe_model::{Architecture, ModelConfig};

use crate::aux_loss::{AdaptiveConfig, AuxCoefficients, BalanceLoss};
use crate::error::{Result, TrainError};
use crate::optim::{AdamWConfig, Decay, Schedule};

/// The model to train.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ModelSection {
    /// Start from this checkpoint (Hugging Face directory or .gguf) instead of a fresh model.
    pub init: Option<PathBuf>,
    /// Architecture of a fresh model: llama, mixtral, qwen2_moe or skywork_moe.
    pub arch: String,
    /// Residual width.
    pub hidden_size: usize,
    /// Dense FFN width (also the expert width for mixtral/skywork_moe).
    pub intermediate_size: usize,
    /// Decoder layers.
    pub layers: usize,
    /// Attention heads.
    pub heads: usize,
    /// Key/value heads.
    pub kv_heads: usize,
    /// Routed experts (MoE architectures).
    pub experts: usize,
    /// Experts per token.
    pub top_k: usize,
    /// Longest sequence.
    pub max_position_embeddings: usize,
    /// RoPE base.
    pub rope_theta: f64,
    /// Share the embedding with the LM head.
    pub tie_word_embeddings: bool,
    /// Gating logit normalisation λ (skywork_moe; 0 disables).
    pub gate_norm_std: f64,
    /// Standard deviation of the initial weights.
    pub init_std: f64,
}

impl Default for ModelSection {
    fn default() -> Self {
        ModelSection {
            init: None,
            arch: "mixtral".into(),
            hidden_size: 128,
            intermediate_size: 256,
            layers: 4,
            heads: 4,
            kv_heads: 2,
            experts: 8,
            top_k: 2,
            max_position_embeddings: 1024,
            rope_theta: 10000.0,
            tie_word_embeddings: true,
            gate_norm_std: 1.0,
            init_std: 0.02,
        }
    }
}

/// Routing during training.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RouterSection {
    /// Capacity factor: each expert takes at most `ceil(cf·k·T/E)` assignments per micro-batch;
    /// ≤ 0 is dropless.
    pub capacity_factor: f64,
}

impl Default for RouterSection {
    fn default() -> Self {
        RouterSection {
            capacity_factor: 1.0,
        }
    }
}

/// Auxiliary losses.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuxSection {
    /// Load-balancing loss: skywork, switch or none.
    pub balance: BalanceLoss,
    /// Adapt the coefficient per layer from the drop rate (eqs. 7–9); otherwise fixed at `coef`.
    pub adaptive: bool,
    /// Fixed coefficient (when not adaptive).
    pub coef: f64,
    /// ξ of the adaptive rule.
    pub xi: f64,
    /// α_max of the adaptive rule.
    pub alpha_max: f64,
    /// β of the adaptive rule.
    pub beta: f64,
    /// α before the first update.
    pub alpha_init: f64,
    /// Router z-loss coefficient (0 disables).
    pub z_loss_coef: f64,
    /// Aux-loss-free balancing (DeepSeek-V3): each MoE layer's selection bias moves by this
    /// much after every optimiser step, `b_e ← b_e + rate · sign(mean load − load_e)`
    /// (0 disables).
    pub bias_update_rate: f64,
}

impl Default for AuxSection {
    fn default() -> Self {
        let a = AdaptiveConfig::default();
        AuxSection {
            balance: BalanceLoss::Skywork,
            adaptive: true,
            coef: 0.01,
            xi: a.xi,
            alpha_max: a.alpha_max,
            beta: a.beta,
            alpha_init: a.alpha_init,
            z_loss_coef: 0.0,
            bias_update_rate: 0.0,
        }
    }
}

/// Training data.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DataSection {
    /// Text files, directories and JSONL files.
    pub inputs: Vec<PathBuf>,
    /// An existing tokenizer: a tokenizer.json or tokenizer.model file, or a model directory
    /// holding one; without one a byte-level BPE of `vocab_size` is trained.
    pub tokenizer: Option<PathBuf>,
    /// Vocabulary of a trained tokenizer.
    pub vocab_size: usize,
    /// Tokens per training sequence.
    pub seq_len: usize,
    /// Fraction of sequences held out for validation.
    pub val_fraction: f64,
}

impl Default for DataSection {
    fn default() -> Self {
        DataSection {
            inputs: Vec::new(),
            tokenizer: None,
            vocab_size: 2048,
            seq_len: 128,
            val_fraction: 0.05,
        }
    }
}

/// Optimiser and schedule.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OptimSection {
    /// Peak learning rate.
    pub lr: f64,
    /// Final learning rate.
    pub min_lr: f64,
    /// Warmup steps.
    pub warmup_steps: u64,
    /// Decay after warmup: cosine, linear or constant.
    pub decay: Decay,
    /// Decoupled weight decay (matrices only).
    pub weight_decay: f64,
    /// AdamW β₁.
    pub beta1: f64,
    /// AdamW β₂.
    pub beta2: f64,
    /// AdamW ε.
    pub eps: f64,
    /// Clip the global gradient norm to this (0 disables).
    pub grad_clip: f64,
}

impl Default for OptimSection {
    fn default() -> Self {
        OptimSection {
            lr: 1e-3,
            min_lr: 1e-4,
            warmup_steps: 20,
            decay: Decay::Cosine,
            weight_decay: 0.1,
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            grad_clip: 1.0,
        }
    }
}

/// The loop.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrainSection {
    /// Optimiser steps.
    pub steps: u64,
    /// Sequences per micro-batch.
    pub batch_size: usize,
    /// Micro-batches per optimiser step.
    pub grad_accum: usize,
    /// Micro-batches of a step that run at once, each on a thread of its own (0: as many as
    /// there are threads; 1: one after the other). Ignored, as 1, on a pipeline stage, for a
    /// model cut over processes and with recomputation.
    pub concurrent_micro_batches: usize,
    /// Validate every this many steps (0: only at the end).
    pub eval_every: u64,
    /// Validation batches per evaluation (0: all).
    pub eval_batches: usize,
    /// Checkpoint every this many steps (0: only at the end).
    pub checkpoint_every: u64,
    /// Checkpoints kept.
    pub keep_checkpoints: usize,
    /// Run directory.
    pub out_dir: PathBuf,
    /// Seed of initialisation and data order.
    pub seed: u64,
    /// Continue from the newest checkpoint in `out_dir`.
    pub resume: bool,
}

impl Default for TrainSection {
    fn default() -> Self {
        TrainSection {
            steps: 200,
            batch_size: 8,
            grad_accum: 1,
            concurrent_micro_batches: 0,
            eval_every: 50,
            eval_batches: 8,
            checkpoint_every: 100,
            keep_checkpoints: 2,
            out_dir: PathBuf::from("runs/default"),
            seed: 1234,
            resume: false,
        }
    }
}

/// A whole run configuration.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RunConfig {
    /// Model.
    pub model: ModelSection,
    /// Routing.
    pub router: RouterSection,
    /// Auxiliary losses.
    pub aux: AuxSection,
    /// Data.
    pub data: DataSection,
    /// Optimiser.
    pub optim: OptimSection,
    /// Loop.
    pub train: TrainSection,
}

impl RunConfig {
    /// Read a TOML run file.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| TrainError::io(path, e))?;
        let cfg: RunConfig = toml::from_str(&text)
            .map_err(|e| TrainError::Config(format!("{}: {e}", path.display())))?;
        Ok(cfg)
    }

    /// The TOML text of this configuration.
    pub fn to_toml(&self) -> Result<String> {
        toml::to_string_pretty(self).map_err(|e| TrainError::Config(e.to_string()))
    }

    /// Check values that would fail later.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(TrainError::Config(m));
        if self.train.steps == 0 {
            return bad("train.steps must be at least 1".into());
        }
        if self.train.batch_size == 0 || self.train.grad_accum == 0 {
            return bad("train.batch_size and train.grad_accum must be at least 1".into());
        }
        if self.data.seq_len < 2 {
            return bad("data.seq_len must be at least 2".into());
        }
        if !(0.0..1.0).contains(&self.data.val_fraction) {
            return bad(format!(
                "data.val_fraction must be in [0, 1), got {}",
                self.data.val_fraction
            ));
        }
        if self.optim.lr.is_nan() || self.optim.lr <= 0.0 || self.optim.min_lr < 0.0 {
            return bad("optim.lr must be > 0 and optim.min_lr ≥ 0".into());
        }
        if !(self.aux.bias_update_rate >= 0.0 && self.aux.bias_update_rate.is_finite()) {
            return bad(format!(
                "aux.bias_update_rate must be a finite value ≥ 0, got {}",
                self.aux.bias_update_rate
            ));
        }
        if self.data.inputs.is_empty() {
            return bad("data.inputs lists no files or directories".into());
        }
        Ok(())
    }

    /// The learning-rate schedule.
    pub fn schedule(&self) -> Schedule {
        Schedule {
            lr: self.optim.lr,
            min_lr: self.optim.min_lr,
            warmup_steps: self.optim.warmup_steps,
            total_steps: self.train.steps,
            decay: self.optim.decay,
        }
    }

    /// AdamW hyper-parameters.
    pub fn adamw(&self) -> AdamWConfig {
        AdamWConfig {
            beta1: self.optim.beta1,
            beta2: self.optim.beta2,
            eps: self.optim.eps,
            weight_decay: self.optim.weight_decay,
        }
    }

    /// Initial auxiliary-loss coefficients for `moe_layers` layers.
    pub fn aux_coefficients(&self, moe_layers: usize) -> AuxCoefficients {
        if self.aux.adaptive {
            AuxCoefficients::adaptive(
                moe_layers,
                AdaptiveConfig {
                    xi: self.aux.xi,
                    alpha_max: self.aux.alpha_max,
                    beta: self.aux.beta,
                    alpha_init: self.aux.alpha_init,
                },
            )
        } else {
            AuxCoefficients::fixed(moe_layers, self.aux.coef)
        }
    }

    /// The capacity factor in force (`None`: dropless).
    pub fn capacity_factor(&self) -> Option<f64> {
        (self.router.capacity_factor > 0.0).then_some(self.router.capacity_factor)
    }

    /// The model config of a fresh model with `vocab_size` tokens.
    pub fn fresh_model_config(
        &self,
        vocab_size: usize,
        bos: Option<u32>,
        eos: Option<u32>,
    ) -> Result<ModelConfig> {
        let m = &self.model;
        let arch = Architecture::from_name(&m.arch).ok_or_else(|| {
            let known: Vec<&str> = Architecture::all().map(Architecture::model_type).collect();
            TrainError::Config(format!(
                "unknown model.arch `{}` ({})",
                m.arch,
                known.join(", ")
            ))
        })?;
        if m.heads == 0
            || m.kv_heads == 0
            || !m.heads.is_multiple_of(m.kv_heads)
            || !m.hidden_size.is_multiple_of(m.heads)
        {
            return Err(TrainError::Config(format!(
                "model.heads ({}) must divide hidden_size ({}) and be a multiple of kv_heads ({})",
                m.heads, m.hidden_size, m.kv_heads
            )));
        }
        if self.data.seq_len > m.max_position_embeddings {
            return Err(TrainError::Config(format!(
                "data.seq_len ({}) exceeds model.max_position_embeddings ({})",
                self.data.seq_len, m.max_position_embeddings
            )));
        }
        let dense = ModelConfig {
            architecture: arch,
            vocab_size,
            hidden_size: m.hidden_size,
            intermediate_size: m.intermediate_size,
            num_hidden_layers: m.layers,
            num_attention_heads: m.heads,
            num_key_value_heads: m.kv_heads,
            head_dim: m.hidden_size / m.heads,
            rms_norm_eps: 1e-5,
            rope_theta: m.rope_theta,
            max_position_embeddings: m.max_position_embeddings,
            rope_scaling: skymoe_model::config::RopeScaling::Default,
            tie_word_embeddings: m.tie_word_embeddings,
            qkv_bias: false,
            o_bias: false,
            qk_norm: skymoe_model::QkNorm::None,
            clip_qkv: None,
            mla: None,
            moe: None,
            mtp_layers: 0,
            bos_token_id: bos,
            eos_token_ids: eos.into_iter().collect(),
        };
        let experts = NewExperts {
            num_experts: m.experts,
            top_k: m.top_k,
            expert_intermediate_size: m.intermediate_size,
            logits_norm_std: (m.gate_norm_std > 0.0).then_some(m.gate_norm_std),
        };
        let config = arch.family().new_model(dense, &experts);
        if config.moe.is_some() && (m.top_k == 0 || m.top_k > m.experts) {
            return Err(TrainError::Config(format!(
                "model.top_k ({}) must be in 1..=experts ({})",
                m.top_k, m.experts
            )));
        }
        Ok(config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// docs/run.toml documents every option with its default value.
    #[test]
    fn documented_run_file_lists_the_defaults() {
        let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../docs/run.toml");
        let cfg = RunConfig::from_file(&p).unwrap();
        assert_eq!(cfg, RunConfig::default());
        let text = std::fs::read_to_string(&p).unwrap();
        let full = toml::to_string(&RunConfig::default()).unwrap();
        for line in full.lines().filter(|l| l.contains(" = ")) {
            let key = line.split(" = ").next().unwrap();
            assert!(
                text.contains(&format!("{key} =")) || text.contains(&format!("# {key} =")),
                "docs/run.toml lacks `{key}`"
            );
        }
    }

    #[test]
    fn unknown_keys_are_rejected() {
        let err = toml::from_str::<RunConfig>("[optim]\nlearning_rate = 1.0\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("learning_rate"), "{err}");
    }
}
