//! The shape of a model as the cost model sees it: sizes, not weights.

use std::path::Path;

use serde::Serialize;
use skymoe_model::ModelConfig;

use crate::error::{PlanError, Result};

/// The Mixture-of-Experts part of a model's shape.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct MoeShape {
    /// Routed experts per MoE layer.
    pub experts: usize,
    /// Experts each token is sent to.
    pub top_k: usize,
    /// Intermediate (FFN) width of one routed expert.
    pub expert_ffn: usize,
    /// Intermediate width of an always-on shared expert (0 when there is none).
    pub shared_ffn: usize,
    /// Which decoder layers have an MoE FFN (the others are dense).
    pub layers: Vec<bool>,
}

/// Sizes of a decoder-only transformer, dense or MoE.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ModelShape {
    /// A name for tables and messages.
    pub name: String,
    /// Vocabulary size.
    pub vocab: usize,
    /// Hidden size.
    pub hidden: usize,
    /// Decoder layers.
    pub layers: usize,
    /// Attention (query) heads.
    pub heads: usize,
    /// Key/value heads (GQA); equal to `heads` without GQA.
    pub kv_heads: usize,
    /// Width of one head.
    pub head_dim: usize,
    /// Intermediate width of the dense FFN layers.
    pub dense_ffn: usize,
    /// The MoE part; `None` for a dense model.
    pub moe: Option<MoeShape>,
    /// Whether the LM head shares the embedding matrix.
    pub tied_embeddings: bool,
}

/// Names of the built-in model presets.
pub const MODEL_PRESETS: [&str; 3] = ["skywork-moe-146b", "mixtral-8x7b", "qwen2-moe-57b"];

/// `config.json` of the presets, as published with the checkpoints (only the keys that
/// matter for sizes).
fn preset_json(name: &str) -> Option<&'static str> {
    Some(match name {
        "skywork-moe-146b" => {
            r#"{"architectures":["SkyworkForCausalLM"],"model_type":"skywork_moe",
            "vocab_size":65536,"hidden_size":4608,"intermediate_size":12288,
            "num_hidden_layers":52,"num_attention_heads":36,"num_key_value_heads":36,
            "num_experts":[16],"moe_expert_interval":1,"moe_use_logits_norm":true,
            "moe_gate_norm_std":1.0,"moe_2layer_gate":false,"moe_feature_no_mul_topk":true,
            "moe_use_mixtral_gating":false,"max_position_embeddings":8192,
            "rope_theta":10000,"rms_norm_eps":1e-6,"tie_word_embeddings":false}"#
        }
        "mixtral-8x7b" => {
            r#"{"architectures":["MixtralForCausalLM"],"model_type":"mixtral",
            "vocab_size":32000,"hidden_size":4096,"intermediate_size":14336,
            "num_hidden_layers":32,"num_attention_heads":32,"num_key_value_heads":8,
            "num_local_experts":8,"num_experts_per_tok":2,"max_position_embeddings":32768,
            "rope_theta":1000000.0,"rms_norm_eps":1e-5,"tie_word_embeddings":false}"#
        }
        "qwen2-moe-57b" => {
            r#"{"architectures":["Qwen2MoeForCausalLM"],"model_type":"qwen2_moe",
            "vocab_size":151936,"hidden_size":3584,"intermediate_size":18944,
            "moe_intermediate_size":2560,"shared_expert_intermediate_size":20480,
            "num_hidden_layers":28,"num_attention_heads":28,"num_key_value_heads":4,
            "num_experts":64,"num_experts_per_tok":8,"norm_topk_prob":false,
            "decoder_sparse_step":1,"mlp_only_layers":[],"max_position_embeddings":32768,
            "rope_theta":1000000.0,"rms_norm_eps":1e-6,"tie_word_embeddings":false}"#
        }
        _ => return None,
    })
}

impl ModelShape {
    /// The shape of a parsed Hugging Face config.
    pub fn from_config(cfg: &ModelConfig, name: impl Into<String>) -> Self {
        let moe = cfg.moe.as_ref().map(|m| MoeShape {
            experts: m.num_experts,
            top_k: m.top_k,
            expert_ffn: m.expert_intermediate_size,
            shared_ffn: m.shared_expert_intermediate_size.unwrap_or(0),
            layers: (0..cfg.num_hidden_layers)
                .map(|l| cfg.is_moe_layer(l))
                .collect(),
        });
        ModelShape {
            name: name.into(),
            vocab: cfg.vocab_size,
            hidden: cfg.hidden_size,
            layers: cfg.num_hidden_layers,
            heads: cfg.num_attention_heads,
            kv_heads: cfg.num_key_value_heads,
            head_dim: cfg.head_dim,
            dense_ffn: cfg.intermediate_size,
            moe,
            tied_embeddings: cfg.tie_word_embeddings,
        }
    }

    /// A built-in preset by name (see [`MODEL_PRESETS`]).
    pub fn preset(name: &str) -> Option<Self> {
        let json = preset_json(name)?;
        let cfg = ModelConfig::from_json_str(json, Path::new(name))
            .expect("built-in model presets are valid configs");
        Some(Self::from_config(&cfg, name))
    }

    /// A preset name, a `config.json` file, or a directory holding one.
    pub fn load(spec: &str) -> Result<Self> {
        if let Some(shape) = Self::preset(spec) {
            return Ok(shape);
        }
        let path = Path::new(spec);
        let file = if path.is_dir() {
            path.join("config.json")
        } else {
            path.to_path_buf()
        };
        if !file.exists() {
            return Err(PlanError::Model(format!(
                "`{spec}` is neither a preset ({}) nor an existing config.json or model directory",
                MODEL_PRESETS.join(", ")
            )));
        }
        let cfg = ModelConfig::from_file(&file).map_err(|e| PlanError::Model(e.to_string()))?;
        Ok(Self::from_config(&cfg, spec))
    }

    /// Whether decoder layer `layer` has an MoE FFN.
    pub fn is_moe_layer(&self, layer: usize) -> bool {
        self.moe
            .as_ref()
            .is_some_and(|m| m.layers.get(layer).copied().unwrap_or(false))
    }

    /// Routed experts per MoE layer (0 for a dense model).
    pub fn experts(&self) -> usize {
        self.moe.as_ref().map_or(0, |m| m.experts)
    }

    /// The same model with a different number of routed experts per MoE layer.
    pub fn with_experts(&self, experts: usize) -> Self {
        let mut s = self.clone();
        if let Some(m) = &mut s.moe {
            m.experts = experts;
            m.top_k = m.top_k.min(experts);
        }
        s.name = format!("{} ({experts} experts)", self.name);
        s
    }

    /// Parameters of one attention block (projections and its norm).
    pub fn attention_params(&self) -> f64 {
        let (h, q, kv) = (
            self.hidden as f64,
            (self.heads * self.head_dim) as f64,
            (self.kv_heads * self.head_dim) as f64,
        );
        h * q + 2.0 * h * kv + q * h + h
    }

    /// Parameters of all routed experts of one MoE layer.
    pub fn routed_expert_params(&self) -> f64 {
        self.moe
            .as_ref()
            .map_or(0.0, |m| (m.experts * 3 * self.hidden * m.expert_ffn) as f64)
    }

    /// Parameters of the FFN of layer `layer` that are not routed experts (dense FFN, or the
    /// router, shared expert and norm of an MoE layer).
    pub fn ffn_dense_params(&self, layer: usize) -> f64 {
        let h = self.hidden as f64;
        match &self.moe {
            Some(m) if self.is_moe_layer(layer) => {
                let shared = if m.shared_ffn > 0 {
                    3.0 * h * m.shared_ffn as f64 + h
                } else {
                    0.0
                };
                h * m.experts as f64 + shared + h
            }
            _ => 3.0 * h * self.dense_ffn as f64 + h,
        }
    }

    /// Total parameters (embedding and LM head counted once each unless tied).
    pub fn total_params(&self) -> f64 {
        let emb = (self.vocab * self.hidden) as f64;
        let head = if self.tied_embeddings { 0.0 } else { emb };
        let mut p = emb + head + self.hidden as f64;
        for l in 0..self.layers {
            p += self.attention_params() + self.ffn_dense_params(l);
            if self.is_moe_layer(l) {
                p += self.routed_expert_params();
            }
        }
        p
    }

    /// Parameters a token passes through (top-k of the routed experts).
    pub fn active_params(&self) -> f64 {
        let mut p = self.total_params();
        if let Some(m) = &self.moe {
            let per_expert = (3 * self.hidden * m.expert_ffn) as f64;
            let moe_layers = m.layers.iter().filter(|&&x| x).count() as f64;
            p -= moe_layers * per_expert * (m.experts - m.top_k) as f64;
        }
        p
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_have_their_published_sizes() {
        let sky = ModelShape::preset("skywork-moe-146b").unwrap();
        assert_eq!(sky.experts(), 16);
        assert!(
            (sky.total_params() / 1e9 - 146.0).abs() < 1.5,
            "{}",
            sky.total_params()
        );
        assert!(
            (sky.active_params() / 1e9 - 22.0).abs() < 1.0,
            "{}",
            sky.active_params()
        );
        let mix = ModelShape::preset("mixtral-8x7b").unwrap();
        assert!(
            (mix.total_params() / 1e9 - 46.7).abs() < 0.2,
            "{}",
            mix.total_params()
        );
        assert!(
            (mix.active_params() / 1e9 - 12.9).abs() < 0.1,
            "{}",
            mix.active_params()
        );
        let qwen = ModelShape::preset("qwen2-moe-57b").unwrap();
        assert!(
            (qwen.total_params() / 1e9 - 57.4).abs() < 0.5,
            "{}",
            qwen.total_params()
        );
        assert!(
            (qwen.active_params() / 1e9 - 14.2).abs() < 0.3,
            "{}",
            qwen.active_params()
        );
    }

    #[test]
    fn unknown_model_spec_names_the_presets() {
        let e = ModelShape::load("no-such-model").unwrap_err().to_string();
        assert!(e.contains("skywork-moe-146b"), "{e}");
    }
}
