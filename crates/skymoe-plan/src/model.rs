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
    /// Intermediate width of the always-on shared expert(s) (0 when there is none; DeepSeek's
    /// `n_shared_experts` experts count as one of `n_shared_experts × moe_intermediate_size`).
    pub shared_ffn: usize,
    /// Whether the shared expert's output is scaled by a sigmoid gate (Qwen2-MoE: one `[1, h]`
    /// weight) or added as it is (DeepSeek).
    pub shared_gated: bool,
    /// Which decoder layers have an MoE FFN (the others are dense).
    pub layers: Vec<bool>,
}

/// Multi-head latent attention (DeepSeek-V2/V3) as the cost model sees it; see
/// [`skymoe_model::MlaConfig`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct MlaShape {
    /// Rank of the query bottleneck (`q_a_proj` → norm → `q_b_proj`); `None`: one `q_proj`.
    pub q_lora_rank: Option<usize>,
    /// Width of the compressed key/value latent.
    pub kv_lora_rank: usize,
    /// Per-head query/key dimensions without rotary embedding.
    pub qk_nope_head_dim: usize,
    /// Per-head query/key dimensions with rotary embedding (the key part shared by all heads).
    pub qk_rope_head_dim: usize,
    /// Per-head value width.
    pub v_head_dim: usize,
}

impl MlaShape {
    /// Per-head query and key width.
    pub fn qk_head_dim(&self) -> usize {
        self.qk_nope_head_dim + self.qk_rope_head_dim
    }
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
    /// Multi-head latent attention in place of grouped-query attention (`head_dim` is then
    /// its rotary width and `kv_heads` equals `heads`).
    pub mla: Option<MlaShape>,
    /// Whether q, k and v projections carry biases (Qwen2-MoE).
    pub qkv_bias: bool,
    /// Parameters of the q/k RMSNorms of one attention block (Qwen3-MoE, OLMoE; 0 without).
    pub qk_norm_params: usize,
    /// Values a KV cache keeps per token and layer ([`ModelConfig::kv_cache_width`]).
    pub kv_cache_width: usize,
    /// Multi-token-prediction modules after the decoder layers (DeepSeek-V3); not part of
    /// the planned forward and backward.
    pub mtp_layers: usize,
}

/// How latent attention splits over tensor parallelism (said in the plan's notes).
pub const MLA_TP: &str = "multi-head latent attention splits its heads over tensor parallelism; its latent projections (q_a, kv_a), their norms and the rotary key are computed on every rank";

/// Names of the built-in model presets.
pub const MODEL_PRESETS: [&str; 5] = [
    "skywork-moe-146b",
    "mixtral-8x7b",
    "qwen2-moe-57b",
    "qwen3-30b-a3b",
    "deepseek-v3",
];

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
        // Qwen/Qwen3-30B-A3B (the keys of its config.json that the parser reads).
        "qwen3-30b-a3b" => {
            r#"{"architectures":["Qwen3MoeForCausalLM"],"model_type":"qwen3_moe",
            "vocab_size":151936,"hidden_size":2048,"intermediate_size":6144,
            "moe_intermediate_size":768,"num_hidden_layers":48,"num_attention_heads":32,
            "num_key_value_heads":4,"head_dim":128,"num_experts":128,"num_experts_per_tok":8,
            "norm_topk_prob":true,"decoder_sparse_step":1,"mlp_only_layers":[],
            "attention_bias":false,"hidden_act":"silu","max_position_embeddings":40960,
            "rope_theta":1000000.0,"rms_norm_eps":1e-6,"sliding_window":null,
            "use_sliding_window":false,"tie_word_embeddings":false}"#
        }
        // deepseek-ai/DeepSeek-V3 (likewise; its fp8 `quantization_config` left out: the
        // planner trains in bf16).
        "deepseek-v3" => {
            r#"{"architectures":["DeepseekV3ForCausalLM"],"model_type":"deepseek_v3",
            "vocab_size":129280,"hidden_size":7168,"intermediate_size":18432,
            "moe_intermediate_size":2048,"num_hidden_layers":61,"num_attention_heads":128,
            "num_key_value_heads":128,"q_lora_rank":1536,"kv_lora_rank":512,
            "qk_nope_head_dim":128,"qk_rope_head_dim":64,"v_head_dim":128,
            "n_routed_experts":256,"n_shared_experts":1,"num_experts_per_tok":8,
            "first_k_dense_replace":3,"moe_layer_freq":1,"n_group":8,"topk_group":4,
            "topk_method":"noaux_tc","scoring_func":"sigmoid","norm_topk_prob":true,
            "routed_scaling_factor":2.5,"num_nextn_predict_layers":1,"attention_bias":false,
            "hidden_act":"silu","max_position_embeddings":163840,"rope_theta":10000,
            "rope_scaling":{"beta_fast":32,"beta_slow":1,"factor":40,"mscale":1.0,
            "mscale_all_dim":1.0,"original_max_position_embeddings":4096,"type":"yarn"},
            "rms_norm_eps":1e-6,"tie_word_embeddings":false}"#
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
            shared_gated: m.shared_expert_gated && m.shared_expert_intermediate_size.is_some(),
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
            mla: cfg.mla.map(|m| MlaShape {
                q_lora_rank: m.q_lora_rank,
                kv_lora_rank: m.kv_lora_rank,
                qk_nope_head_dim: m.qk_nope_head_dim,
                qk_rope_head_dim: m.qk_rope_head_dim,
                v_head_dim: m.v_head_dim,
            }),
            qkv_bias: cfg.qkv_bias,
            qk_norm_params: cfg.qk_norm_sizes().map_or(0, |(q, k)| q + k),
            kv_cache_width: cfg.kv_cache_width(),
            mtp_layers: cfg.mtp_layers,
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

    /// Weights of the attention projections of one layer (no norms, no biases). With MLA:
    /// `q_a` `[r_q, h]` and `q_b` `[heads·(nope+rope), r_q]` (or one `q_proj`), `kv_a`
    /// `[r_kv + rope, h]`, `kv_b` `[heads·(nope + v), r_kv]`, `o` `[h, heads·v]`.
    pub fn attention_weights(&self) -> f64 {
        let h = self.hidden as f64;
        let nh = self.heads as f64;
        match &self.mla {
            Some(m) => {
                let qk = m.qk_head_dim() as f64;
                let q = match m.q_lora_rank {
                    Some(r) => h * r as f64 + r as f64 * nh * qk,
                    None => h * nh * qk,
                };
                let kv_a = h * (m.kv_lora_rank + m.qk_rope_head_dim) as f64;
                let kv_b = m.kv_lora_rank as f64 * nh * (m.qk_nope_head_dim + m.v_head_dim) as f64;
                q + kv_a + kv_b + nh * m.v_head_dim as f64 * h
            }
            None => {
                let q = (self.heads * self.head_dim) as f64;
                let kv = (self.kv_heads * self.head_dim) as f64;
                h * q + 2.0 * h * kv + q * h
            }
        }
    }

    /// Parameters of one attention block: projections, their biases and norms (MLA's latent
    /// norms, q/k norms), and the block's input norm.
    pub fn attention_params(&self) -> f64 {
        let h = self.hidden as f64;
        let extra = match &self.mla {
            Some(m) => (m.q_lora_rank.unwrap_or(0) + m.kv_lora_rank) as f64,
            None => {
                let bias = if self.qkv_bias {
                    ((self.heads + 2 * self.kv_heads) * self.head_dim) as f64
                } else {
                    0.0
                };
                bias + self.qk_norm_params as f64
            }
        };
        self.attention_weights() + extra + h
    }

    /// Weights of the latent attention projections every tensor-parallel rank holds whole
    /// (`q_a_proj`, `kv_a_proj_with_mqa`; 0 without MLA).
    pub fn attention_replicated_weights(&self) -> f64 {
        match &self.mla {
            Some(m) => {
                (self.hidden * (m.q_lora_rank.unwrap_or(0) + m.kv_lora_rank + m.qk_rope_head_dim))
                    as f64
            }
            None => 0.0,
        }
    }

    /// Forward matrix-product FLOPs of attention per token and per attended position: the
    /// scores `q·k` over the query/key width and the weighted sum of the values, for every
    /// head: `2·heads·(qk + v)` (`4·heads·head_dim` without MLA).
    pub fn attention_score_flops_per_position(&self) -> f64 {
        let nh = self.heads as f64;
        match &self.mla {
            Some(m) => 2.0 * nh * (m.qk_head_dim() + m.v_head_dim) as f64,
            None => 4.0 * nh * self.head_dim as f64,
        }
    }

    /// Activation values per token that attention keeps for its backward (in elements of the
    /// activation type; the fp32 softmax statistics are counted apart): the norm's input and
    /// output, q, k, v and the attention output; with MLA also the query latent before and
    /// after its norm, the `kv_a` output and the normalised key/value latent (the `kv_b`
    /// outputs are the per-head k and v).
    pub fn attention_activation_values(&self) -> f64 {
        let h = self.hidden as f64;
        let nh = self.heads as f64;
        match &self.mla {
            Some(m) => {
                let qk = nh * m.qk_head_dim() as f64;
                let v = nh * m.v_head_dim as f64;
                let q_latent = 2.0 * m.q_lora_rank.unwrap_or(0) as f64;
                let kv_latent = (2 * m.kv_lora_rank + m.qk_rope_head_dim) as f64;
                2.0 * h + q_latent + kv_latent + 2.0 * qk + 2.0 * v
            }
            None => {
                let q = (self.heads * self.head_dim) as f64;
                let kv = (self.kv_heads * self.head_dim) as f64;
                2.0 * h + 2.0 * q + 2.0 * kv
            }
        }
    }

    /// Bytes an inference KV cache holds per token, all layers, at `bytes_per_value` (2 for
    /// bf16): `layers × kv_cache_width` values (MLA: the latent and the rotary key).
    pub fn kv_cache_bytes_per_token(&self, bytes_per_value: f64) -> f64 {
        (self.layers * self.kv_cache_width) as f64 * bytes_per_value
    }

    /// Decoder layers with a dense FFN.
    pub fn dense_layers(&self) -> usize {
        (0..self.layers).filter(|&l| !self.is_moe_layer(l)).count()
    }

    /// What the planner's user should know about the model's shape beyond the table: dense
    /// layers among MoE ones, latent attention (no tensor parallelism), MTP modules left out,
    /// the KV cache per token.
    pub fn notes(&self) -> Vec<String> {
        let mut out = Vec::new();
        if self.moe.is_some() {
            let dense = self.dense_layers();
            if dense > 0 {
                out.push(format!(
                    "{dense} of the {} layers have a dense FFN of width {} (the stage split weighs them apart)",
                    self.layers, self.dense_ffn
                ));
            }
        }
        if self.mla.is_some() {
            out.push(MLA_TP.to_string());
        }
        if self.mtp_layers > 0 {
            out.push(format!(
                "{} multi-token-prediction layer(s) are not counted in the step time, memory or parameters",
                self.mtp_layers
            ));
        }
        out.push(format!(
            "KV cache for inference: {} values per token and layer, {:.0} bytes per token in bf16",
            self.kv_cache_width,
            self.kv_cache_bytes_per_token(2.0)
        ));
        out
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
                    3.0 * h * m.shared_ffn as f64 + if m.shared_gated { h } else { 0.0 }
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

    fn preset_config(name: &str) -> ModelConfig {
        ModelConfig::from_json_str(preset_json(name).unwrap(), Path::new(name)).unwrap()
    }

    #[test]
    fn every_preset_counts_the_parameters_the_model_crate_counts() {
        for name in MODEL_PRESETS {
            let cfg = preset_config(name);
            let shape = ModelShape::preset(name).unwrap();
            assert_eq!(
                shape.total_params(),
                cfg.total_params() as f64,
                "{name} total"
            );
            assert_eq!(
                shape.active_params(),
                cfg.active_params() as f64,
                "{name} active"
            );
            assert_eq!(shape.kv_cache_width, cfg.kv_cache_width(), "{name}");
        }
    }

    #[test]
    fn qwen3_30b_a3b_is_the_published_model() {
        let cfg = preset_config("qwen3-30b-a3b");
        let m = cfg.moe.as_ref().unwrap();
        assert_eq!(
            (cfg.hidden_size, cfg.num_hidden_layers, cfg.vocab_size),
            (2048, 48, 151936)
        );
        assert_eq!(
            (
                cfg.num_attention_heads,
                cfg.num_key_value_heads,
                cfg.head_dim
            ),
            (32, 4, 128)
        );
        assert_eq!(
            (m.num_experts, m.top_k, m.expert_intermediate_size),
            (128, 8, 768)
        );
        assert!(m.moe_layers.iter().all(|&x| x) && m.router.normalize_top_k);
        assert_eq!(m.shared_expert_intermediate_size, None);
        assert!(cfg.mla.is_none() && cfg.mtp_layers == 0);
        let s = ModelShape::preset("qwen3-30b-a3b").unwrap();
        assert_eq!(s.qk_norm_params, 256);
        assert_eq!(s.dense_layers(), 0);
        // Qwen3 technical report / model card: 30.5B total, 3.3B activated.
        let (total, active) = (s.total_params() / 1e9, s.active_params() / 1e9);
        assert!((total / 30.5 - 1.0).abs() < 0.01, "{total}");
        assert!((active / 3.3 - 1.0).abs() < 0.03, "{active}");
        // GQA cache: 2 · 4 kv heads · 128 values per layer.
        assert_eq!(s.kv_cache_width, 1024);
        assert_eq!(s.kv_cache_bytes_per_token(2.0), 48.0 * 1024.0 * 2.0);
    }

    #[test]
    fn deepseek_v3_is_the_published_model() {
        let cfg = preset_config("deepseek-v3");
        let mla = cfg.mla.unwrap();
        assert_eq!(
            (
                mla.q_lora_rank,
                mla.kv_lora_rank,
                mla.qk_nope_head_dim,
                mla.qk_rope_head_dim,
                mla.v_head_dim
            ),
            (Some(1536), 512, 128, 64, 128)
        );
        let m = cfg.moe.as_ref().unwrap();
        assert_eq!(
            (m.num_experts, m.top_k, m.expert_intermediate_size),
            (256, 8, 2048)
        );
        assert_eq!(m.shared_expert_intermediate_size, Some(2048));
        assert!(!m.shared_expert_gated);
        assert_eq!(m.moe_layers.iter().filter(|&&x| !x).count(), 3);
        assert!(!m.moe_layers[2] && m.moe_layers[3]);
        let g = m.router.group_limit.unwrap();
        assert_eq!((g.groups, g.top_groups), (8, 4));
        assert_eq!(m.router.routed_scaling_factor, 2.5);
        assert!(m.router.normalize_top_k && m.router.requires_selection_bias);
        assert_eq!(cfg.mtp_layers, 1);
        assert_eq!(
            (cfg.hidden_size, cfg.num_hidden_layers, cfg.vocab_size),
            (7168, 61, 129280)
        );
        assert_eq!(
            (cfg.num_attention_heads, cfg.intermediate_size),
            (128, 18432)
        );

        let s = ModelShape::preset("deepseek-v3").unwrap();
        assert_eq!(s.dense_layers(), 3);
        assert_eq!(s.mtp_layers, 1);
        // DeepSeek-V3 technical report: 671B total, 37B activated per token. The model card
        // gives 685B on Hugging Face = 671B main model + 14B MTP module: the 671B exclude
        // MTP, as our count does (MTP weights are not in `param_specs`).
        let (total, active) = (s.total_params() / 1e9, s.active_params() / 1e9);
        assert!((total / 671.0 - 1.0).abs() < 0.01, "{total}");
        assert!((active / 37.0 - 1.0).abs() < 0.03, "{active}");
        // The latent cache: 61 layers × (512 + 64) values = 35,136 values, 70,272 bf16 bytes.
        assert_eq!(s.kv_cache_width, 576);
        assert_eq!(s.kv_cache_bytes_per_token(1.0), 35_136.0);
        assert_eq!(s.kv_cache_bytes_per_token(2.0), 70_272.0);
        let notes = s.notes().join("\n");
        assert!(notes.contains("multi-token-prediction"), "{notes}");
        assert!(notes.contains("tensor parallelism"), "{notes}");
        assert!(notes.contains("3 of the 61 layers"), "{notes}");
        assert!(notes.contains("70272 bytes per token"), "{notes}");
    }

    #[test]
    fn mla_projection_and_score_sizes_by_hand() {
        let s = ModelShape::preset("deepseek-v3").unwrap();
        // q_a 7168·1536 + q_b 1536·(128·192) + kv_a 7168·576 + kv_b 512·(128·256)
        // + o (128·128)·7168.
        let weights = 7168 * 1536 + 1536 * 24576 + 7168 * 576 + 512 * 32768 + 16384 * 7168;
        assert_eq!(weights, 187_105_280);
        assert_eq!(s.attention_weights(), weights as f64);
        // ... plus the two latent norms (1536 + 512) and the input norm (7168).
        assert_eq!(s.attention_params(), (weights + 1536 + 512 + 7168) as f64);
        // Scores over q·k of 128 + 64 and values of 128, 128 heads: 2·128·(192 + 128).
        assert_eq!(s.attention_score_flops_per_position(), 81_920.0);
        // Kept for backward: norm in/out 2·7168, q latent 2·1536, kv_a out 576 and latent
        // 512, q and k 2·128·192, v and output 2·128·128.
        assert_eq!(
            s.attention_activation_values(),
            (2 * 7168 + 2 * 1536 + 576 + 512 + 2 * 24576 + 2 * 16384) as f64
        );
        // Without the query bottleneck (DeepSeek-V2-Lite style): one q_proj h × heads·qk.
        let mut lite = s.clone();
        lite.mla.as_mut().unwrap().q_lora_rank = None;
        assert_eq!(
            lite.attention_weights(),
            (7168 * 24576 + 7168 * 576 + 512 * 32768 + 16384 * 7168) as f64
        );
        assert_eq!(
            lite.attention_params(),
            lite.attention_weights() + (512 + 7168) as f64
        );
    }

    #[test]
    fn unknown_model_spec_names_the_presets() {
        let e = ModelShape::load("no-such-model").unwrap_err().to_string();
        assert!(e.contains("skywork-moe-146b"), "{e}");
    }
}
