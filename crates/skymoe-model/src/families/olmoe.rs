//! OLMoE (`OlmoeForCausalLM`): Llama attention with an RMSNorm over the whole q and k
//! projections before the head split (`self_attn.q_norm` of `heads·head_dim`,
//! `self_attn.k_norm` of `kv_heads·head_dim`), then q, k and v clamped to `±clip_qkv` when
//! set; every layer an MoE of `num_experts` SwiGLU experts of `intermediate_size` behind a
//! softmax router renormalised only with `norm_topk_prob` (off by default). Tensors under
//! `mlp.`. Also llama.cpp's `olmoe` GGUF files (q/k not permuted: NEOX rotary).

use std::path::Path;

use serde_json::{Map, Value};

use super::{every_layer_moe, Architecture, Family, GgufForm, GgufKeys, NewExperts};
use crate::config::{get_bool, get_f64, get_usize, ModelConfig, QkNorm, RouterConfig};
use crate::error::{ModelError, Result};

/// The OLMoE family.
#[derive(Debug, Clone, Copy)]
pub struct Olmoe;

/// OLMoE's router: softmax over all experts, renormalised over the top-k when asked.
fn router(normalize_top_k: bool) -> RouterConfig {
    RouterConfig {
        logits_norm_std: None,
        normalize_top_k,
        two_layer_gate: false,
        multiply_input_by_top_k: false,
        ..RouterConfig::PLAIN
    }
}

/// A clamp bound, which must be a positive number.
fn check_clip(clip: Option<f64>, origin: &Path, key: &str) -> Result<Option<f64>> {
    match clip {
        Some(c) if !(c.is_finite() && c > 0.0) => Err(ModelError::config(
            origin,
            format!("`{key}` is {c}; it must be a positive number"),
        )),
        other => Ok(other),
    }
}

impl Family for Olmoe {
    fn hf_class(&self) -> &'static str {
        "OlmoeForCausalLM"
    }

    fn model_type(&self) -> &'static str {
        "olmoe"
    }

    fn read_hf_config(&self, v: &Value, origin: &Path, c: &mut ModelConfig) -> Result<()> {
        c.qk_norm = QkNorm::PerProjection;
        c.clip_qkv = check_clip(get_f64(v, "clip_qkv"), origin, "clip_qkv")?;
        let experts = NewExperts {
            num_experts: get_usize(v, "num_experts").unwrap_or(64),
            top_k: get_usize(v, "num_experts_per_tok").unwrap_or(8),
            expert_intermediate_size: c.intermediate_size,
            logits_norm_std: None,
        };
        let normalize = get_bool(v, "norm_topk_prob").unwrap_or(false);
        c.moe = Some(every_layer_moe(
            &experts,
            c.num_hidden_layers,
            router(normalize),
        ));
        Ok(())
    }

    fn write_hf_config(&self, c: &ModelConfig, o: &mut Map<String, Value>) {
        o.insert("attention_bias".into(), c.qkv_bias.into());
        o.insert(
            "clip_qkv".into(),
            c.clip_qkv.map_or(Value::Null, Value::from),
        );
        let Some(m) = &c.moe else { return };
        o.insert("num_experts".into(), m.num_experts.into());
        o.insert("num_experts_per_tok".into(), m.top_k.into());
        o.insert("norm_topk_prob".into(), m.router.normalize_top_k.into());
        o.insert("router_aux_loss_coef".into(), 0.0.into());
    }

    fn gguf(&self) -> Option<GgufForm> {
        Some(GgufForm {
            architecture: "olmoe",
            with_experts: true,
            permuted_qk: false,
        })
    }

    fn read_gguf_config(&self, keys: &GgufKeys<'_>, c: &mut ModelConfig) -> Result<()> {
        let experts = keys.routed_experts(8, c.intermediate_size)?;
        let clamp = keys.key("attention.clamp_kqv");
        c.qk_norm = QkNorm::PerProjection;
        c.clip_qkv = check_clip(keys.float("attention.clamp_kqv"), keys.origin, &clamp)?;
        c.moe = Some(every_layer_moe(
            &experts,
            c.num_hidden_layers,
            router(false),
        ));
        Ok(())
    }

    fn new_model(&self, mut dense: ModelConfig, experts: &NewExperts) -> ModelConfig {
        dense.architecture = Architecture::Olmoe;
        dense.qk_norm = QkNorm::PerProjection;
        dense.moe = Some(every_layer_moe(
            experts,
            dense.num_hidden_layers,
            router(false),
        ));
        dense
    }
}
