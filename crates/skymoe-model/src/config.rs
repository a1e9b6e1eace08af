//! Model configuration: Hugging Face `config.json` (and GGUF metadata) parsed into one
//! architecture-independent [`ModelConfig`].

use std::path::Path;

use serde_json::Value;

use crate::error::{ModelError, Result};
pub use crate::families::Architecture;
pub use crate::layers::rope::RopeScaling;

/// How the router turns gate logits into expert weights.
#[derive(Debug, Clone, PartialEq)]
pub struct RouterConfig {
    /// Gating logit normalisation: `Some(λ)` means `z~ = λ·(z − mean z)/std z` (unbiased std)
    /// before the softmax (Skywork-MoE `moe_use_logits_norm` with `moe_gate_norm_std`).
    pub logits_norm_std: Option<f64>,
    /// Renormalise the selected top-k probabilities to sum to one.
    pub normalize_top_k: bool,
    /// Skywork-MoE `moe_2layer_gate`: the gate is Linear(H, 8E) → Tanh → Linear(8E, E).
    pub two_layer_gate: bool,
    /// Skywork-MoE `moe_feature_no_mul_topk = false`: the expert input is multiplied by top-k.
    pub multiply_input_by_top_k: bool,
    /// How gate logits become expert scores (softmax over the experts, or an independent
    /// sigmoid per expert as in DeepSeek-V3).
    pub scoring: ScoreFunction,
    /// Group-limited selection (DeepSeek-V2 `group_limited_greedy`, DeepSeek-V3 `noaux_tc`):
    /// a token first picks its best groups of experts, then its top-k inside them.
    pub group_limit: Option<GroupLimit>,
    /// Factor on the combine weights after any renormalisation (DeepSeek's
    /// `routed_scaling_factor`; 1 for every other family).
    pub routed_scaling_factor: f64,
    /// The router always carries a selection bias (DeepSeek-V3's `e_score_correction_bias`),
    /// which a checkpoint must hold; otherwise one is optional (aux-loss-free balancing).
    pub requires_selection_bias: bool,
}

impl RouterConfig {
    /// A softmax router taking the top-k as they are: no logit normalisation, no
    /// renormalisation, one linear gate, no groups, no scaling. Families start from it.
    pub const PLAIN: RouterConfig = RouterConfig {
        logits_norm_std: None,
        normalize_top_k: false,
        two_layer_gate: false,
        multiply_input_by_top_k: false,
        scoring: ScoreFunction::Softmax,
        group_limit: None,
        routed_scaling_factor: 1.0,
        requires_selection_bias: false,
    };
}

/// How a router turns gate logits into expert scores.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ScoreFunction {
    /// `softmax(z)` over the experts (every family but DeepSeek-V3).
    #[default]
    Softmax,
    /// `sigmoid(z)` per expert (DeepSeek-V3 `scoring_func: sigmoid`).
    Sigmoid,
}

/// How a group of experts is scored for group-limited selection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GroupScore {
    /// The group's highest expert score (DeepSeek-V2 `group_limited_greedy`).
    Max,
    /// The sum of the group's two highest selection scores, bias included (DeepSeek-V3
    /// `noaux_tc`).
    TopTwoSum,
}

/// Group-limited expert selection: the experts are split into `groups` equal groups of
/// consecutive indices; each token keeps its `top_groups` best groups and picks its top-k
/// among their experts only.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GroupLimit {
    /// Number of groups (`n_group`); divides the expert count.
    pub groups: usize,
    /// Groups each token may choose from (`topk_group`), at most `groups`.
    pub top_groups: usize,
    /// How a group is scored.
    pub score: GroupScore,
}

/// Multi-head latent attention (DeepSeek-V2/V3): keys and values are decompressed from a
/// per-token latent of `kv_lora_rank` (normalised), plus one rotary key of
/// `qk_rope_head_dim` shared by all heads; queries optionally go through a low-rank
/// bottleneck of `q_lora_rank`. A head's query and key are `qk_nope_head_dim` plain
/// dimensions followed by `qk_rope_head_dim` rotated ones; its value is `v_head_dim` wide.
/// A cache holds the latent and the rotary key only: `kv_lora_rank + qk_rope_head_dim`
/// values per token and layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MlaConfig {
    /// Rank of the query bottleneck (`q_a_proj` → `q_a_layernorm` → `q_b_proj`); `None`: one
    /// `q_proj` (DeepSeek-V2-Lite).
    pub q_lora_rank: Option<usize>,
    /// Width of the compressed key/value latent.
    pub kv_lora_rank: usize,
    /// Per-head query/key dimensions without rotary embedding.
    pub qk_nope_head_dim: usize,
    /// Per-head query/key dimensions with rotary embedding (the key part shared by all heads).
    pub qk_rope_head_dim: usize,
    /// Per-head value width.
    pub v_head_dim: usize,
    /// The rotary dimensions are laid out as interleaved pairs `(x0, x1), (x2, x3), …`
    /// (DeepSeek's checkpoints; transformers' `rope_interleave`), not as two halves.
    pub rope_interleave: bool,
}

/// The epsilon of MLA's latent norms (`q_a_layernorm`, `kv_a_layernorm`), which transformers
/// and DeepSeek's code build with the RMSNorm default rather than `rms_norm_eps`.
pub const MLA_NORM_EPS: f64 = 1e-6;

impl MlaConfig {
    /// Per-head query and key width (`qk_nope_head_dim + qk_rope_head_dim`).
    pub fn qk_head_dim(&self) -> usize {
        self.qk_nope_head_dim + self.qk_rope_head_dim
    }

    /// Values a cache keeps per token and layer: the latent and the rotary key.
    pub fn cache_width(&self) -> usize {
        self.kv_lora_rank + self.qk_rope_head_dim
    }
}

/// RMSNorm applied to the query and key projections before RoPE (its weights are
/// `self_attn.q_norm.weight` and `self_attn.k_norm.weight`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum QkNorm {
    /// No q/k norm (Llama).
    #[default]
    None,
    /// Over each head after the head split, one weight of `head_dim` shared by all heads
    /// (Qwen3-MoE).
    PerHead,
    /// Over the whole q and k projections before the head split, weights of
    /// `heads·head_dim` and `kv_heads·head_dim` (OLMoE).
    PerProjection,
}

impl QkNorm {
    /// A short description for reports (`None` when there is no norm).
    pub fn describe(self) -> Option<&'static str> {
        match self {
            QkNorm::None => None,
            QkNorm::PerHead => Some("per-head q/k RMSNorm"),
            QkNorm::PerProjection => Some("per-projection q/k RMSNorm"),
        }
    }
}

/// The Mixture-of-Experts part of a configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct MoeConfig {
    /// Number of routed experts per MoE layer.
    pub num_experts: usize,
    /// Experts selected per token.
    pub top_k: usize,
    /// Hidden width of one routed expert's SwiGLU.
    pub expert_intermediate_size: usize,
    /// Width of the shared expert every token passes through, if any.
    pub shared_expert_intermediate_size: Option<usize>,
    /// Whether the shared expert's output is scaled by `sigmoid(shared_expert_gate · x)`
    /// (Qwen2-MoE) or added as it is (DeepSeek).
    pub shared_expert_gated: bool,
    /// For each layer, whether its FFN is an MoE (otherwise a dense SwiGLU of `intermediate_size`).
    pub moe_layers: Vec<bool>,
    /// Routing rule.
    pub router: RouterConfig,
}

/// An architecture-independent description of a decoder-only transformer.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    /// Model family.
    pub architecture: Architecture,
    /// Vocabulary size (rows of the embedding and of the LM head).
    pub vocab_size: usize,
    /// Residual stream width.
    pub hidden_size: usize,
    /// Hidden width of a dense FFN (dense layers, or every layer of a dense model).
    pub intermediate_size: usize,
    /// Number of decoder layers.
    pub num_hidden_layers: usize,
    /// Query heads.
    pub num_attention_heads: usize,
    /// Key/value heads (grouped-query attention when fewer than the query heads).
    pub num_key_value_heads: usize,
    /// Width of one attention head.
    pub head_dim: usize,
    /// RMSNorm epsilon.
    pub rms_norm_eps: f64,
    /// RoPE base frequency.
    pub rope_theta: f64,
    /// Longest sequence the model was trained for.
    pub max_position_embeddings: usize,
    /// Scaling of the rotary embedding (`rope_scaling` / `rope_parameters`).
    pub rope_scaling: RopeScaling,
    /// LM head shares the embedding matrix.
    pub tie_word_embeddings: bool,
    /// q/k/v projections carry biases.
    pub qkv_bias: bool,
    /// The output projection carries a bias.
    pub o_bias: bool,
    /// RMSNorm of the query and key projections.
    pub qk_norm: QkNorm,
    /// Clamp q, k and v to `±clip` after the projections and the q/k norm (OLMoE's
    /// `clip_qkv`, in transformers' order).
    pub clip_qkv: Option<f64>,
    /// Multi-head latent attention in place of grouped-query attention (DeepSeek-V2/V3);
    /// `head_dim` is then its rotary width.
    pub mla: Option<MlaConfig>,
    /// MoE settings; `None` for a dense model.
    pub moe: Option<MoeConfig>,
    /// Multi-token-prediction modules stored after the decoder layers (DeepSeek-V3's
    /// `num_nextn_predict_layers`); their weights are not used for next-token prediction and
    /// are skipped.
    pub mtp_layers: usize,
    /// Beginning-of-sequence token, if the config names one.
    pub bos_token_id: Option<u32>,
    /// End-of-sequence tokens.
    pub eos_token_ids: Vec<u32>,
}

/// An unsigned integer entry of a `config.json`.
pub(crate) fn get_usize(v: &Value, key: &str) -> Option<usize> {
    v.get(key).and_then(Value::as_u64).map(|x| x as usize)
}

/// A number entry of a `config.json`.
pub(crate) fn get_f64(v: &Value, key: &str) -> Option<f64> {
    v.get(key).and_then(Value::as_f64)
}

/// A boolean entry of a `config.json`.
pub(crate) fn get_bool(v: &Value, key: &str) -> Option<bool> {
    v.get(key).and_then(Value::as_bool)
}

/// A positive integer entry of a `config.json` that must be present.
pub(crate) fn need_usize(v: &Value, origin: &Path, key: &str) -> Result<usize> {
    get_usize(v, key)
        .filter(|&x| x > 0)
        .ok_or_else(|| ModelError::config(origin, format!("missing or invalid `{key}`")))
}

fn token_ids(v: Option<&Value>) -> Vec<u32> {
    match v {
        Some(Value::Number(n)) => n.as_u64().map(|x| vec![x as u32]).unwrap_or_default(),
        Some(Value::Array(a)) => a
            .iter()
            .filter_map(Value::as_u64)
            .map(|x| x as u32)
            .collect(),
        _ => Vec::new(),
    }
}

/// Most transformer blocks a config (or GGUF file) may declare.
pub const MAX_HIDDEN_LAYERS: usize = 1 << 16;

/// Most routed experts per layer a config (or GGUF file) may declare (published models have a
/// few hundred); per-expert tables are sized by the count before any weight is checked.
pub const MAX_EXPERTS: usize = 1 << 16;

impl ModelConfig {
    /// Read and parse a Hugging Face `config.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| ModelError::io(path, e))?;
        Self::from_json_str(&text, path)
    }

    /// Parse the text of a Hugging Face `config.json`; `origin` names it in errors.
    pub fn from_json_str(text: &str, origin: &Path) -> Result<Self> {
        let v: Value = serde_json::from_str(text)
            .map_err(|e| ModelError::config(origin, format!("not valid JSON: {e}")))?;
        Self::from_json(&v, origin)
    }

    /// Build a config from parsed `config.json` contents. At most [`MAX_HIDDEN_LAYERS`]
    /// layers are accepted.
    pub fn from_json(v: &Value, origin: &Path) -> Result<Self> {
        if !v.is_object() {
            return Err(ModelError::config(origin, "expected a JSON object"));
        }
        let architecture = crate::families::for_hf_config(v)?;
        let family = architecture.family();
        check_unhonoured_keys(v, origin)?;
        family.check_hf_keys(v, origin)?;
        let need = |key: &str| need_usize(v, origin, key);
        let vocab_size = need("vocab_size")?;
        let hidden_size = need("hidden_size")?;
        let num_hidden_layers = need("num_hidden_layers")?;
        // Per-layer tables are sized by it before any weight is checked; the largest
        // published models have a few hundred layers.
        if num_hidden_layers > MAX_HIDDEN_LAYERS {
            return Err(ModelError::config(
                origin,
                format!("num_hidden_layers ({num_hidden_layers}) is above {MAX_HIDDEN_LAYERS}"),
            ));
        }
        let num_attention_heads = need("num_attention_heads")?;
        let num_key_value_heads =
            get_usize(v, "num_key_value_heads").unwrap_or(num_attention_heads);
        if num_key_value_heads == 0 || num_attention_heads % num_key_value_heads != 0 {
            return Err(ModelError::config(
                origin,
                format!(
                    "num_attention_heads ({num_attention_heads}) must be a multiple of num_key_value_heads ({num_key_value_heads})"
                ),
            ));
        }
        let head_dim = match get_usize(v, "head_dim") {
            Some(h) if h > 0 => h,
            _ => {
                if hidden_size % num_attention_heads != 0 {
                    return Err(ModelError::config(
                        origin,
                        format!("hidden_size ({hidden_size}) is not divisible by num_attention_heads ({num_attention_heads}) and no head_dim is given"),
                    ));
                }
                hidden_size / num_attention_heads
            }
        };
        if head_dim % 2 != 0 {
            return Err(ModelError::config(
                origin,
                format!("head_dim ({head_dim}) must be even for rotary embeddings"),
            ));
        }
        let rope_theta = crate::layers::rope::rope_theta_from_hf_json(v);
        let rms_norm_eps = get_f64(v, "rms_norm_eps").unwrap_or(1e-6);
        let max_position_embeddings = get_usize(v, "max_position_embeddings").unwrap_or(4096);
        let rope_scaling = RopeScaling::from_hf_json(v, origin, max_position_embeddings)?;
        let tie_word_embeddings = get_bool(v, "tie_word_embeddings").unwrap_or(false);
        let attention_bias = get_bool(v, "attention_bias").unwrap_or(false);
        let intermediate_size = need("intermediate_size")?;
        let mut config = ModelConfig {
            architecture,
            vocab_size,
            hidden_size,
            intermediate_size,
            num_hidden_layers,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            rms_norm_eps,
            rope_theta,
            max_position_embeddings,
            rope_scaling,
            tie_word_embeddings,
            qkv_bias: attention_bias,
            o_bias: attention_bias,
            qk_norm: QkNorm::None,
            clip_qkv: None,
            mla: None,
            moe: None,
            mtp_layers: 0,
            bos_token_id: v
                .get("bos_token_id")
                .and_then(Value::as_u64)
                .map(|x| x as u32),
            eos_token_ids: token_ids(v.get("eos_token_id")),
        };
        family.read_hf_config(v, origin, &mut config)?;
        if let Some(m) = &config.moe {
            if m.num_experts > MAX_EXPERTS {
                return Err(ModelError::config(
                    origin,
                    format!(
                        "{} routed experts per layer is above {MAX_EXPERTS}",
                        m.num_experts
                    ),
                ));
            }
            if m.num_experts == 0 || m.top_k == 0 || m.top_k > m.num_experts {
                return Err(ModelError::config(
                    origin,
                    format!(
                        "top-k ({}) must be between 1 and the number of experts ({})",
                        m.top_k, m.num_experts
                    ),
                ));
            }
            if let Some(g) = &m.router.group_limit {
                if g.groups == 0 || !m.num_experts.is_multiple_of(g.groups) {
                    return Err(ModelError::config(
                        origin,
                        format!(
                            "n_group ({}) must divide the number of experts ({})",
                            g.groups, m.num_experts
                        ),
                    ));
                }
                if g.top_groups == 0 || g.top_groups > g.groups {
                    return Err(ModelError::config(
                        origin,
                        format!(
                            "topk_group ({}) must be between 1 and n_group ({})",
                            g.top_groups, g.groups
                        ),
                    ));
                }
                if g.top_groups * (m.num_experts / g.groups) < m.top_k {
                    return Err(ModelError::config(
                        origin,
                        format!(
                            "topk_group ({}) groups of {} experts cannot hold the top-{} experts",
                            g.top_groups,
                            m.num_experts / g.groups,
                            m.top_k
                        ),
                    ));
                }
            }
        }
        Ok(config)
    }

    /// The softmax scale of attention scores: `1/√head_dim`, or for MLA `1/√(nope + rope)`
    /// times the square of YaRN's `mscale(factor, mscale_all_dim)` when the rotary scaling
    /// sets one (as DeepSeek's code and transformers compute it).
    pub fn attention_scale(&self) -> f64 {
        match &self.mla {
            None => 1.0 / (self.head_dim as f64).sqrt(),
            Some(m) => {
                let base = 1.0 / (m.qk_head_dim() as f64).sqrt();
                match self.rope_scaling {
                    RopeScaling::Yarn {
                        factor,
                        mscale_all_dim: Some(all),
                        ..
                    } if all != 0.0 && factor > 1.0 => {
                        let mscale = 0.1 * all * factor.ln() + 1.0;
                        base * mscale * mscale
                    }
                    _ => base,
                }
            }
        }
    }

    /// Whether the MoE routers always carry a selection bias that checkpoints hold
    /// (DeepSeek-V3's `e_score_correction_bias`).
    pub fn requires_selection_bias(&self) -> bool {
        self.moe
            .as_ref()
            .is_some_and(|m| m.router.requires_selection_bias)
    }

    /// Width of the attention output that `o_proj` reads: `heads · v_head_dim` with MLA, else
    /// `heads · head_dim`.
    pub fn attention_output_width(&self) -> usize {
        match &self.mla {
            Some(m) => self.num_attention_heads * m.v_head_dim,
            None => self.num_attention_heads * self.head_dim,
        }
    }

    /// Values a KV cache keeps per token and layer (all heads): keys and values of the kv
    /// heads, or MLA's latent and rotary key.
    pub fn kv_cache_width(&self) -> usize {
        match &self.mla {
            Some(m) => m.cache_width(),
            None => 2 * self.num_key_value_heads * self.head_dim,
        }
    }

    /// Heads the KV cache stores per position and layer, keys and values counted apart (one
    /// latent for multi-head latent attention).
    pub fn kv_cache_heads(&self) -> usize {
        match &self.mla {
            Some(_) => 1,
            None => 2 * self.num_key_value_heads,
        }
    }

    /// Lengths of the q and k norm weights (`None` without a q/k norm): `head_dim` each for a
    /// per-head norm, `heads·head_dim` and `kv_heads·head_dim` for a per-projection one.
    pub fn qk_norm_sizes(&self) -> Option<(usize, usize)> {
        match self.qk_norm {
            QkNorm::None => None,
            QkNorm::PerHead => Some((self.head_dim, self.head_dim)),
            QkNorm::PerProjection => Some((
                self.num_attention_heads * self.head_dim,
                self.num_key_value_heads * self.head_dim,
            )),
        }
    }

    /// Whether layer `layer` has an MoE feed-forward block.
    pub fn is_moe_layer(&self, layer: usize) -> bool {
        self.moe
            .as_ref()
            .is_some_and(|m| m.moe_layers.get(layer).copied().unwrap_or(false))
    }
}

/// Refuse configuration keys whose values change the computation in a way skymoe does not
/// implement, instead of silently running a different model (the keys every family shares;
/// a family refuses its own in [`crate::families::Family::check_hf_keys`]).
fn check_unhonoured_keys(v: &Value, origin: &Path) -> Result<()> {
    let refuse = |reason: String| Err(ModelError::config(origin, reason));
    if let Some(act) = v
        .get("hidden_act")
        .or_else(|| v.get("hidden_activation"))
        .and_then(Value::as_str)
    {
        if act != "silu" && act != "swish" {
            return refuse(format!(
                "`hidden_act` is `{act}`; skymoe implements SwiGLU feed-forward blocks (`silu`) only"
            ));
        }
    }
    if let Some(p) = v.get("rotary_percent").filter(|p| !p.is_null()) {
        if p.as_f64() != Some(1.0) {
            return refuse(format!(
                "`rotary_percent` is {p}; skymoe rotates the whole head (rotary_percent 1.0) only"
            ));
        }
    }
    let window = v.get("sliding_window").filter(|w| !w.is_null());
    if let Some(w) = window {
        let enabled = v
            .get("use_sliding_window")
            .and_then(Value::as_bool)
            .unwrap_or(true);
        let size = w.as_u64();
        let max_pos = get_usize(v, "max_position_embeddings").unwrap_or(4096) as u64;
        // A window of 0, a disabled one, or one no shorter than the context changes nothing.
        let effective = enabled && size.is_none_or(|n| n > 0 && n < max_pos);
        if effective {
            return refuse(format!(
                "`sliding_window` is {w}; skymoe implements full causal attention only \
                 (sliding-window attention is not supported)"
            ));
        }
    }
    if get_bool(v, "mlp_bias") == Some(true) {
        return refuse("`mlp_bias` is true; skymoe's feed-forward blocks carry no biases".into());
    }
    if let Some(q) = v.get("quantization_config").filter(|q| !q.is_null()) {
        let method = q.get("quant_method").and_then(Value::as_str).unwrap_or("");
        if method != "fp8" && method != "skymoe" {
            return refuse(format!(
                "`quantization_config.quant_method` is `{method}`; skymoe reads fp8 checkpoints \
                 (vLLM's layout) and its own int8/q4 formats"
            ));
        }
        if method == "fp8" {
            let scheme = q
                .get("activation_scheme")
                .and_then(Value::as_str)
                .unwrap_or("dynamic");
            if scheme != "dynamic" && scheme != "static" {
                return refuse(format!(
                    "`quantization_config.activation_scheme` is `{scheme}` (expected dynamic or static)"
                ));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(v: serde_json::Value) -> Result<ModelConfig> {
        ModelConfig::from_json(&v, Path::new("config.json"))
    }

    fn base(arch: &str) -> serde_json::Value {
        serde_json::json!({
            "architectures": [arch], "vocab_size": 100, "hidden_size": 64, "intermediate_size": 128,
            "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2,
        })
    }

    #[test]
    fn llama_defaults_and_rope_forms() {
        let mut v = base("LlamaForCausalLM");
        v["rope_parameters"] = serde_json::json!({"rope_type": "default", "rope_theta": 500000.0});
        let c = parse(v).unwrap();
        assert_eq!(c.architecture, Architecture::Llama);
        assert_eq!(c.rope_theta, 500000.0);
        assert_eq!(c.head_dim, 16);
        assert!(c.moe.is_none());
        let mut v = base("LlamaForCausalLM");
        v["rope_theta"] = 1234.0.into();
        v["head_dim"] = 32.into();
        let c = parse(v).unwrap();
        assert_eq!((c.rope_theta, c.head_dim), (1234.0, 32));
    }

    #[test]
    fn unsupported_rope_scaling_is_an_error() {
        let mut v = base("LlamaForCausalLM");
        v["rope_scaling"] = serde_json::json!({"rope_type": "longrope", "factor": 4.0});
        assert!(parse(v).unwrap_err().to_string().contains("longrope"));
        let mut v = base("LlamaForCausalLM");
        v["rope_scaling"] = serde_json::json!({"rope_type": "yarn", "factor": 4.0});
        let c = parse(v).unwrap();
        assert_eq!(c.rope_scaling.name(), "yarn");
        let mut v = base("LlamaForCausalLM");
        v["rope_parameters"] = serde_json::json!({"rope_type": "llama3", "factor": 8.0});
        assert!(parse(v)
            .unwrap_err()
            .to_string()
            .contains("low_freq_factor"));
    }

    #[test]
    fn gqa_must_divide() {
        let mut v = base("LlamaForCausalLM");
        v["num_key_value_heads"] = 3.into();
        assert!(parse(v)
            .unwrap_err()
            .to_string()
            .contains("num_key_value_heads"));
    }

    #[test]
    fn qwen2_moe_sparse_layers_shared_expert_and_biases() {
        let mut v = base("Qwen2MoeForCausalLM");
        v["num_experts"] = 8.into();
        v["num_experts_per_tok"] = 2.into();
        v["moe_intermediate_size"] = 32.into();
        v["shared_expert_intermediate_size"] = 64.into();
        v["decoder_sparse_step"] = 2.into();
        v["mlp_only_layers"] = serde_json::json!([3]);
        v["norm_topk_prob"] = true.into();
        let c = parse(v).unwrap();
        let m = c.moe.as_ref().unwrap();
        assert_eq!(m.moe_layers, vec![false, true, false, false]);
        assert_eq!(m.shared_expert_intermediate_size, Some(64));
        assert!(m.router.normalize_top_k);
        assert!(c.qkv_bias && !c.o_bias);
    }

    #[test]
    fn skywork_keys() {
        let mut v = base("SkyworkForCausalLM");
        v["model_type"] = "skywork_moe".into();
        v["num_experts"] = serde_json::json!([16]);
        v["moe_expert_interval"] = 2.into();
        v["moe_use_logits_norm"] = true.into();
        v["moe_gate_norm_std"] = 1.0.into();
        v["moe_feature_no_mul_topk"] = false.into();
        v["moe_use_mixtral_gating"] = false.into();
        v["moe_2layer_gate"] = false.into();
        let c = parse(v).unwrap();
        let m = c.moe.as_ref().unwrap();
        assert_eq!((m.num_experts, m.top_k), (16, 2));
        assert_eq!(m.moe_layers, vec![false, true, false, true]);
        assert_eq!(m.router.logits_norm_std, Some(1.0));
        assert!(m.router.multiply_input_by_top_k);
        assert!(!m.router.two_layer_gate);
    }

    /// Skywork-MoE-Base's published `config.json`, every key as released.
    fn skywork_moe_base() -> serde_json::Value {
        serde_json::json!({
            "architectures": ["SkyworkForCausalLM"], "model_type": "skywork_moe",
            "vocab_size": 65532, "hidden_size": 4608, "intermediate_size": 12288,
            "num_hidden_layers": 52, "num_attention_heads": 36, "num_key_value_heads": 36,
            "num_experts": [16], "moe_use_skywork_gating": false, "moe_2layer_gate": false,
            "moe_use_logits_norm": true, "moe_gate_norm_std": 1.0,
            "moe_feature_no_mul_topk": true, "moe_expert_interval": 1, "rms_norm_eps": 1e-6,
            "rope_theta": 10000, "rotary_percent": 1.0, "sliding_window": null,
            "max_position_embeddings": 8192, "torch_dtype": "bfloat16", "hidden_act": "silu",
            "bos_token_id": 1, "eos_token_id": 2, "tie_word_embeddings": false,
        })
    }

    #[test]
    fn skywork_moe_base_as_published() {
        let c = parse(skywork_moe_base()).unwrap();
        assert_eq!(c.architecture, Architecture::SkyworkMoe);
        assert_eq!(
            (c.vocab_size, c.hidden_size, c.head_dim),
            (65532, 4608, 128)
        );
        let m = c.moe.as_ref().unwrap();
        assert_eq!((m.num_experts, m.top_k), (16, 2));
        assert!(m.moe_layers.iter().all(|&x| x));
        assert_eq!(m.router.logits_norm_std, Some(1.0));
        assert!(!m.router.multiply_input_by_top_k && !m.router.two_layer_gate);
        // The FP8 repository's config adds a quantisation block.
        let mut v = skywork_moe_base();
        v["quantization_config"] =
            serde_json::json!({"activation_scheme": "dynamic", "quant_method": "fp8"});
        assert_eq!(parse(v).unwrap(), c);
    }

    #[test]
    fn dense_skywork_is_a_llama_block() {
        let mut v = skywork_moe_base();
        let o = v.as_object_mut().unwrap();
        for k in ["num_experts", "moe_use_skywork_gating", "moe_2layer_gate"] {
            o.remove(k);
        }
        o.insert("model_type".into(), "skywork".into());
        o.insert("vocab_size".into(), 65519.into());
        let c = parse(v.clone()).unwrap();
        assert_eq!(c.architecture, Architecture::Llama);
        assert!(c.moe.is_none());
        assert_eq!(c.vocab_size, 65519);
        v["num_experts"] = serde_json::Value::Null;
        assert_eq!(parse(v).unwrap().architecture, Architecture::Llama);
    }

    #[test]
    fn keys_skymoe_cannot_honour_are_errors() {
        let cases: [(&str, serde_json::Value, &str); 8] = [
            ("rotary_percent", 0.5.into(), "rotary_percent"),
            ("sliding_window", 4096.into(), "sliding_window"),
            (
                "moe_use_skywork_gating",
                true.into(),
                "moe_use_skywork_gating",
            ),
            ("hidden_act", "gelu".into(), "gelu"),
            ("mlp_bias", true.into(), "mlp_bias"),
            (
                "num_experts",
                serde_json::json!([16, 32]),
                "same number of experts",
            ),
            (
                "quantization_config",
                serde_json::json!({"quant_method": "gptq", "bits": 4}),
                "gptq",
            ),
            (
                "quantization_config",
                serde_json::json!({"quant_method": "fp8", "activation_scheme": "weird"}),
                "weird",
            ),
        ];
        for (key, value, needle) in cases {
            let mut v = skywork_moe_base();
            v[key] = value;
            let err = parse(v).unwrap_err().to_string();
            assert!(err.contains(needle), "{key}: {err}");
        }
        // Values that change nothing are accepted.
        for (key, value) in [
            ("rotary_percent", serde_json::json!(1.0)),
            ("sliding_window", serde_json::json!(8192)),
            ("sliding_window", serde_json::json!(0)),
        ] {
            let mut v = skywork_moe_base();
            v[key] = value;
            parse(v).unwrap_or_else(|e| panic!("{key}: {e}"));
        }
        let mut v = skywork_moe_base();
        v["sliding_window"] = 4096.into();
        v["use_sliding_window"] = false.into();
        parse(v).unwrap();
    }

    #[test]
    fn unknown_architecture_names_supported_ones() {
        let err = parse(base("BertModel")).unwrap_err().to_string();
        assert!(
            err.contains("BertModel")
                && err.contains("SkyworkForCausalLM")
                && err.contains("Qwen2MoeForCausalLM")
        );
    }
}

impl ModelConfig {
    /// The Hugging Face `config.json` contents for this model, loadable by transformers (for
    /// Llama, Mixtral and Qwen2-MoE) and by skymoe (all families).
    pub fn to_hf_json(&self) -> Value {
        let mut v = serde_json::json!({
            "architectures": [self.architecture.hf_class()],
            "model_type": self.architecture.model_type(),
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "hidden_act": "silu",
            "torch_dtype": "float32",
        });
        let o = v.as_object_mut().expect("object literal");
        if let Some(b) = self.bos_token_id {
            o.insert("bos_token_id".into(), b.into());
        }
        match self.eos_token_ids.as_slice() {
            [] => {}
            [e] => {
                o.insert("eos_token_id".into(), (*e).into());
            }
            many => {
                o.insert("eos_token_id".into(), many.into());
            }
        }
        if self.rope_scaling != RopeScaling::Default {
            // The older key, which transformers 4 and 5 both read.
            o.insert(
                "rope_scaling".into(),
                self.rope_scaling.to_hf_json(self.rope_theta),
            );
        }
        self.architecture.family().write_hf_config(self, o);
        v
    }
}

#[cfg(test)]
mod round_trip_tests {
    use super::*;

    /// Every reference fixture's config survives `to_hf_json` → `from_json` unchanged.
    #[test]
    fn hf_json_round_trips_every_fixture() {
        let root =
            std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/reference");
        for fam in [
            "llama",
            "mixtral",
            "qwen2_moe",
            "qwen2_moe_norm",
            "skywork_moe",
            "skywork_moe_variant",
            "rope/linear",
            "rope/dynamic",
            "rope/ntk",
            "rope/llama3",
            "rope/yarn",
            "rope/yarn_mscale",
            "rope/yarn_attention_factor",
            "qwen3_moe",
            "olmoe",
            "deepseek_v2",
            "deepseek_v3",
        ] {
            let c = ModelConfig::from_file(&root.join(fam).join("config.json")).unwrap();
            let back = ModelConfig::from_json(&c.to_hf_json(), Path::new("x")).unwrap();
            assert_eq!(c, back, "{fam}");
        }
    }
}
