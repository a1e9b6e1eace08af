//! DeepSeek-V2 (`DeepseekV2ForCausalLM`): multi-head latent attention (a compressed key/value
//! latent and a shared rotary key, optionally a low-rank query), the first
//! `first_k_dense_replace` layers dense and then an MoE every `moe_layer_freq` layers, with
//! `n_shared_experts` ungated shared experts (`mlp.shared_experts`) beside many small routed
//! experts; a softmax router picking its top-k greedily or among its `topk_group` best groups
//! (`group_limited_greedy`: a group scored by its best expert), combine weights renormalised
//! only with `norm_topk_prob` and scaled by `routed_scaling_factor`. Also llama.cpp's
//! `deepseek2` GGUF files (which hold DeepSeek-V3 too: a sigmoid gating function hands a file
//! over to [`super::deepseek_v3`]).
//!
//! This file also holds the reading and writing both DeepSeek versions share.

use std::path::Path;

use serde_json::{Map, Value};

use super::{Architecture, Family, GgufForm, GgufKeys, NewExperts};
use crate::config::{
    get_bool, get_f64, get_usize, need_usize, GroupLimit, GroupScore, MlaConfig, ModelConfig,
    MoeConfig, RouterConfig, ScoreFunction,
};
use crate::error::{ModelError, Result};
use crate::names::{self, MoeNames, SharedExpertNames};

/// The DeepSeek-V2 family.
#[derive(Debug, Clone, Copy)]
pub struct DeepseekV2;

/// The defaults of the two versions' configuration classes in transformers, for keys a
/// `config.json` leaves out.
pub(super) struct Defaults {
    pub first_k_dense_replace: usize,
    pub n_shared_experts: usize,
    pub routed_scaling_factor: f64,
    pub norm_topk_prob: bool,
    pub rope_interleave: bool,
}

/// Refuse DeepSeek keys whose values skymoe does not implement.
pub(super) fn check_keys(v: &Value, origin: &Path) -> Result<()> {
    if get_bool(v, "attention_bias") == Some(true) {
        return Err(ModelError::config(
            origin,
            "`attention_bias` is true; skymoe's latent attention projections carry no biases",
        ));
    }
    Ok(())
}

/// Multi-head latent attention dimensions of a DeepSeek `config.json`, checked to add up.
fn read_mla(v: &Value, origin: &Path, c: &ModelConfig, interleave: bool) -> Result<MlaConfig> {
    let need = |key: &str| need_usize(v, origin, key);
    let q_lora_rank = match v.get("q_lora_rank") {
        None | Some(Value::Null) => None,
        Some(x) => Some(x.as_u64().filter(|&r| r > 0).ok_or_else(|| {
            ModelError::config(origin, "`q_lora_rank` must be a positive integer or null")
        })? as usize),
    };
    let mla = MlaConfig {
        q_lora_rank,
        kv_lora_rank: need("kv_lora_rank")?,
        qk_nope_head_dim: get_usize(v, "qk_nope_head_dim").unwrap_or(0),
        qk_rope_head_dim: need("qk_rope_head_dim")?,
        v_head_dim: need("v_head_dim")?,
        rope_interleave: interleave,
    };
    if !mla.qk_rope_head_dim.is_multiple_of(2) {
        return Err(ModelError::config(
            origin,
            format!(
                "qk_rope_head_dim ({}) must be even for rotary embeddings",
                mla.qk_rope_head_dim
            ),
        ));
    }
    if let Some(qk) = get_usize(v, "qk_head_dim") {
        if qk != mla.qk_head_dim() {
            return Err(ModelError::config(
                origin,
                format!(
                    "qk_head_dim ({qk}) is not qk_nope_head_dim + qk_rope_head_dim ({} + {})",
                    mla.qk_nope_head_dim, mla.qk_rope_head_dim
                ),
            ));
        }
    }
    if let Some(kv) = get_usize(v, "num_key_value_heads") {
        if kv != c.num_attention_heads {
            return Err(ModelError::config(
                origin,
                format!(
                    "num_key_value_heads ({kv}) differs from num_attention_heads ({}); latent \
                     attention decompresses keys and values for every head",
                    c.num_attention_heads
                ),
            ));
        }
    }
    Ok(mla)
}

/// Which layers are MoE: from `first_k_dense_replace` on, every `moe_layer_freq`-th layer
/// (DeepSeek's `layer_idx >= first_k_dense_replace and layer_idx % moe_layer_freq == 0`).
pub(super) fn moe_layers(layers: usize, first_dense: usize, freq: usize) -> Vec<bool> {
    let freq = freq.max(1);
    (0..layers)
        .map(|l| l >= first_dense && l % freq == 0)
        .collect()
}

/// `first_k_dense_replace` and `moe_layer_freq` of a layer pattern (the pattern
/// [`moe_layers`] gives back; a pattern it cannot express keeps its first dense layers).
fn layer_rule(pattern: &[bool]) -> (usize, usize) {
    let mut moe = pattern
        .iter()
        .enumerate()
        .filter(|(_, &x)| x)
        .map(|(l, _)| l);
    let first = moe.next().unwrap_or(pattern.len());
    // The gap to the second MoE layer, checked once (linear in the layer count).
    let freq = moe.next().map_or(1, |second| second - first);
    if moe_layers(pattern.len(), first, freq) == pattern {
        (first, freq)
    } else {
        (first, 1)
    }
}

/// Read the keys both DeepSeek versions share into `c`; `router` holds the version's routing
/// rule (read by the caller).
pub(super) fn read_common(
    v: &Value,
    origin: &Path,
    c: &mut ModelConfig,
    d: &Defaults,
    router: RouterConfig,
) -> Result<()> {
    let interleave = get_bool(v, "rope_interleave").unwrap_or(d.rope_interleave);
    let mla = read_mla(v, origin, c, interleave)?;
    c.head_dim = mla.qk_rope_head_dim;
    c.num_key_value_heads = c.num_attention_heads;
    c.qkv_bias = false;
    c.o_bias = false;
    c.mla = Some(mla);
    c.mtp_layers = get_usize(v, "num_nextn_predict_layers").unwrap_or(0);
    let num_experts = match get_usize(v, "n_routed_experts").or_else(|| get_usize(v, "num_local_experts")) {
        Some(n) if n > 0 => n,
        _ => {
            return Err(ModelError::config(
                origin,
                "missing or invalid `n_routed_experts` (a DeepSeek model without routed experts is not supported)",
            ))
        }
    };
    let expert_width = need_usize(v, origin, "moe_intermediate_size")?;
    let shared = get_usize(v, "n_shared_experts").unwrap_or(d.n_shared_experts);
    let first_dense = get_usize(v, "first_k_dense_replace").unwrap_or(d.first_k_dense_replace);
    let freq = get_usize(v, "moe_layer_freq").unwrap_or(1);
    c.moe = Some(MoeConfig {
        num_experts,
        top_k: need_usize(v, origin, "num_experts_per_tok")?,
        expert_intermediate_size: expert_width,
        shared_expert_intermediate_size: (shared > 0).then_some(shared * expert_width),
        shared_expert_gated: false,
        moe_layers: moe_layers(c.num_hidden_layers, first_dense, freq),
        router,
    });
    Ok(())
}

/// The group limit of `n_group`/`topk_group` (`None` when `n_group` is absent or null and
/// `required` is false).
pub(super) fn read_groups(
    v: &Value,
    origin: &Path,
    score: GroupScore,
    default: Option<(usize, usize)>,
) -> Result<Option<GroupLimit>> {
    let groups = get_usize(v, "n_group").or(default.map(|d| d.0));
    let top = get_usize(v, "topk_group").or(default.map(|d| d.1));
    match (groups, top) {
        (Some(groups), Some(top_groups)) => Ok(Some(GroupLimit {
            groups,
            top_groups,
            score,
        })),
        (None, None) => Ok(None),
        _ => Err(ModelError::config(
            origin,
            "group-limited routing needs both `n_group` and `topk_group`",
        )),
    }
}

/// Write the keys both DeepSeek versions share.
pub(super) fn write_common(c: &ModelConfig, o: &mut Map<String, Value>) {
    o.insert("attention_bias".into(), false.into());
    if let Some(m) = &c.mla {
        o.insert(
            "q_lora_rank".into(),
            m.q_lora_rank.map_or(Value::Null, Value::from),
        );
        o.insert("kv_lora_rank".into(), m.kv_lora_rank.into());
        o.insert("qk_nope_head_dim".into(), m.qk_nope_head_dim.into());
        o.insert("qk_rope_head_dim".into(), m.qk_rope_head_dim.into());
        o.insert("v_head_dim".into(), m.v_head_dim.into());
    }
    o.insert("num_nextn_predict_layers".into(), c.mtp_layers.into());
    let Some(m) = &c.moe else { return };
    let (first, freq) = layer_rule(&m.moe_layers);
    o.insert("n_routed_experts".into(), m.num_experts.into());
    o.insert("num_experts_per_tok".into(), m.top_k.into());
    o.insert(
        "moe_intermediate_size".into(),
        m.expert_intermediate_size.into(),
    );
    let shared = m
        .shared_expert_intermediate_size
        .map_or(0, |s| s / m.expert_intermediate_size.max(1));
    o.insert("n_shared_experts".into(), shared.into());
    o.insert("first_k_dense_replace".into(), first.into());
    o.insert("moe_layer_freq".into(), freq.into());
    o.insert(
        "routed_scaling_factor".into(),
        m.router.routed_scaling_factor.into(),
    );
    o.insert("norm_topk_prob".into(), m.router.normalize_top_k.into());
    match &m.router.group_limit {
        Some(g) => {
            o.insert("n_group".into(), g.groups.into());
            o.insert("topk_group".into(), g.top_groups.into());
        }
        None => {
            o.insert("n_group".into(), Value::Null);
            o.insert("topk_group".into(), Value::Null);
        }
    }
}

/// The MoE tensor names of a DeepSeek layer: Qwen's `mlp.gate`/`mlp.experts.{e}`, and the
/// ungated `mlp.shared_experts`.
pub(super) fn deepseek_moe_names(c: &ModelConfig, layer: usize) -> MoeNames {
    let mut n = names::mlp_moe_names(c, layer);
    n.shared = c
        .moe
        .as_ref()
        .and_then(|m| m.shared_expert_intermediate_size)
        .map(|_| SharedExpertNames {
            ffn: names::llama_swiglu(&names::layer(layer, "mlp.shared_experts")),
            gate: None,
        });
    n
}

/// Read llama.cpp's `deepseek2` metadata into `c`: latent attention, expert counts, leading
/// dense layers, gating function, groups and scaling. A sigmoid gating function marks a
/// DeepSeek-V3 file.
pub(super) fn read_deepseek2_gguf(keys: &GgufKeys<'_>, c: &mut ModelConfig) -> Result<()> {
    let need = |key: &str| -> Result<usize> {
        keys.uint(key)
            .filter(|&x| x > 0)
            .map(|x| x as usize)
            .ok_or_else(|| keys.error(format!("missing or invalid {}", keys.key(key))))
    };
    let rope = need("rope.dimension_count")?;
    let kv_lora_rank = need("attention.kv_lora_rank")?;
    // llama.cpp stores latent attention as one-kv-head attention over [latent | rope key]:
    // key_length = kv_lora_rank + rope, and the per-head sizes as the `_mla` lengths (older
    // files: key_length = nope + rope and value_length = v_head_dim).
    let (qk, v_dim) = match (
        keys.uint("attention.key_length_mla"),
        keys.uint("attention.value_length_mla"),
    ) {
        (Some(k), Some(v)) => (k as usize, v as usize),
        _ => (
            need("attention.key_length")?,
            need("attention.value_length")?,
        ),
    };
    if qk < rope || !rope.is_multiple_of(2) {
        return Err(keys.error(format!(
            "attention key length {qk} and rope dimension {rope} do not add up"
        )));
    }
    c.mla = Some(MlaConfig {
        q_lora_rank: keys
            .uint("attention.q_lora_rank")
            .map(|x| x as usize)
            .filter(|&x| x > 0),
        kv_lora_rank,
        qk_nope_head_dim: qk - rope,
        qk_rope_head_dim: rope,
        v_head_dim: v_dim,
        rope_interleave: true,
    });
    c.head_dim = rope;
    c.num_key_value_heads = c.num_attention_heads;
    let experts = keys.routed_experts(6, c.intermediate_size)?;
    let sigmoid = keys.uint("expert_gating_func") == Some(2);
    let group_limit = match (
        keys.uint("expert_group_count"),
        keys.uint("expert_group_used_count"),
    ) {
        (Some(g), Some(t)) if g > 1 => Some(GroupLimit {
            groups: g as usize,
            top_groups: t as usize,
            score: if sigmoid {
                GroupScore::TopTwoSum
            } else {
                GroupScore::Max
            },
        }),
        _ => None,
    };
    let shared = keys.uint("expert_shared_count").unwrap_or(0) as usize;
    let first_dense = keys.uint("leading_dense_block_count").unwrap_or(0) as usize;
    if sigmoid {
        c.architecture = Architecture::DeepseekV3;
    }
    c.moe = Some(MoeConfig {
        num_experts: experts.num_experts,
        top_k: experts.top_k,
        expert_intermediate_size: experts.expert_intermediate_size,
        shared_expert_intermediate_size: (shared > 0)
            .then_some(shared * experts.expert_intermediate_size),
        shared_expert_gated: false,
        moe_layers: moe_layers(c.num_hidden_layers, first_dense, 1),
        router: RouterConfig {
            normalize_top_k: keys
                .metadata
                .bool(&keys.key("expert_weights_norm"))
                .unwrap_or(false),
            scoring: if sigmoid {
                ScoreFunction::Sigmoid
            } else {
                ScoreFunction::Softmax
            },
            group_limit,
            routed_scaling_factor: keys.float("expert_weights_scale").unwrap_or(1.0),
            requires_selection_bias: sigmoid,
            ..RouterConfig::PLAIN
        },
    });
    Ok(())
}

/// A DeepSeek model of `version` with `dense`'s sizes: latent attention of DeepSeek-V2-Lite's
/// proportions (no query bottleneck, a latent of 4·head_dim, head_dim plain and head_dim/2
/// rotary query/key dimensions, values of head_dim), every layer an MoE with `experts` and
/// `router`.
pub(super) fn new_deepseek(
    mut dense: ModelConfig,
    experts: &NewExperts,
    version: Architecture,
    router: RouterConfig,
) -> ModelConfig {
    let hd = dense.head_dim;
    let rope = (hd / 2).max(2) & !1;
    dense.architecture = version;
    dense.mla = Some(MlaConfig {
        q_lora_rank: None,
        kv_lora_rank: 4 * hd,
        qk_nope_head_dim: hd,
        qk_rope_head_dim: rope,
        v_head_dim: hd,
        rope_interleave: true,
    });
    dense.head_dim = rope;
    dense.num_key_value_heads = dense.num_attention_heads;
    dense.qkv_bias = false;
    dense.o_bias = false;
    dense.qk_norm = crate::config::QkNorm::None;
    dense.clip_qkv = None;
    dense.moe = Some(MoeConfig {
        num_experts: experts.num_experts,
        top_k: experts.top_k,
        expert_intermediate_size: experts.expert_intermediate_size,
        shared_expert_intermediate_size: None,
        shared_expert_gated: false,
        moe_layers: vec![true; dense.num_hidden_layers],
        router,
    });
    dense
}

/// DeepSeek-V2's defaults (transformers' `DeepseekV2Config`).
const V2_DEFAULTS: Defaults = Defaults {
    first_k_dense_replace: 0,
    n_shared_experts: 2,
    routed_scaling_factor: 1.0,
    norm_topk_prob: false,
    rope_interleave: true,
};

/// DeepSeek-V2's router for a `config.json`.
fn v2_router(v: &Value, origin: &Path) -> Result<RouterConfig> {
    if let Some(f) = v.get("scoring_func").and_then(Value::as_str) {
        if f != "softmax" {
            return Err(ModelError::config(
                origin,
                format!("`scoring_func` is `{f}`; DeepSeek-V2 routers score with softmax"),
            ));
        }
    }
    let method = v
        .get("topk_method")
        .and_then(Value::as_str)
        .unwrap_or("greedy");
    let group_limit = match method {
        "greedy" => None,
        "group_limited_greedy" => Some(read_groups(v, origin, GroupScore::Max, None)?.ok_or_else(
            || {
                ModelError::config(
                    origin,
                    "`group_limited_greedy` needs `n_group` and `topk_group`",
                )
            },
        )?),
        other => {
            return Err(ModelError::config(
                origin,
                format!(
                    "`topk_method` is `{other}`; DeepSeek-V2 routes with `greedy` or \
                     `group_limited_greedy` (`noaux_tc` is DeepSeek-V3's)"
                ),
            ))
        }
    };
    Ok(RouterConfig {
        normalize_top_k: get_bool(v, "norm_topk_prob").unwrap_or(V2_DEFAULTS.norm_topk_prob),
        group_limit,
        routed_scaling_factor: get_f64(v, "routed_scaling_factor")
            .unwrap_or(V2_DEFAULTS.routed_scaling_factor),
        ..RouterConfig::PLAIN
    })
}

impl Family for DeepseekV2 {
    fn hf_class(&self) -> &'static str {
        "DeepseekV2ForCausalLM"
    }

    fn model_type(&self) -> &'static str {
        "deepseek_v2"
    }

    fn check_hf_keys(&self, v: &Value, origin: &Path) -> Result<()> {
        check_keys(v, origin)
    }

    fn read_hf_config(&self, v: &Value, origin: &Path, c: &mut ModelConfig) -> Result<()> {
        let router = v2_router(v, origin)?;
        read_common(v, origin, c, &V2_DEFAULTS, router)
    }

    fn write_hf_config(&self, c: &ModelConfig, o: &mut Map<String, Value>) {
        write_common(c, o);
        let grouped = c
            .moe
            .as_ref()
            .is_some_and(|m| m.router.group_limit.is_some());
        o.insert(
            "topk_method".into(),
            if grouped {
                "group_limited_greedy"
            } else {
                "greedy"
            }
            .into(),
        );
        o.insert("scoring_func".into(), "softmax".into());
    }

    fn gguf(&self) -> Option<GgufForm> {
        Some(GgufForm {
            architecture: "deepseek2",
            with_experts: true,
            permuted_qk: false,
        })
    }

    fn read_gguf_config(&self, keys: &GgufKeys<'_>, c: &mut ModelConfig) -> Result<()> {
        read_deepseek2_gguf(keys, c)
    }

    fn moe_names(&self, c: &ModelConfig, layer: usize) -> MoeNames {
        deepseek_moe_names(c, layer)
    }

    fn new_model(&self, dense: ModelConfig, experts: &NewExperts) -> ModelConfig {
        new_deepseek(
            dense,
            experts,
            Architecture::DeepseekV2,
            RouterConfig::PLAIN,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layer_rules_round_trip() {
        for (first, freq) in [(0, 1), (1, 1), (3, 1), (1, 2), (0, 3)] {
            let pattern = moe_layers(7, first, freq);
            let (f, q) = layer_rule(&pattern);
            assert_eq!(moe_layers(7, f, q), pattern, "{first} {freq}");
        }
        assert_eq!(moe_layers(4, 1, 2), vec![false, false, true, false]);
    }
}
