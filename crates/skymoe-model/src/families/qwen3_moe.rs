//! Qwen3-MoE (`Qwen3MoeForCausalLM`): Llama attention with an explicit `head_dim`, optional
//! biases (`attention_bias`) and an RMSNorm of `head_dim` over each q and k head before RoPE
//! (`self_attn.q_norm`, `self_attn.k_norm`); MoE layers every `decoder_sparse_step` layers
//! except `mlp_only_layers` (dense SwiGLU of `intermediate_size` in between), many small
//! experts (`moe_intermediate_size`) behind a softmax router renormalised with
//! `norm_topk_prob`, no shared expert. Tensors under `mlp.`. Also llama.cpp's `qwen3moe` GGUF
//! files (q/k not permuted: NEOX rotary).

use std::path::Path;

use serde_json::{Map, Value};

use super::qwen2_moe::{sparse_layers, write_sparse_layers};
use super::{every_layer_moe, Architecture, Family, GgufForm, GgufKeys, NewExperts};
use crate::config::{
    get_bool, get_usize, need_usize, ModelConfig, MoeConfig, QkNorm, RouterConfig,
};
use crate::error::Result;

/// The Qwen3-MoE family.
#[derive(Debug, Clone, Copy)]
pub struct Qwen3Moe;

/// Qwen3-MoE's router: softmax over all experts, renormalised over the top-k when asked.
fn router(normalize_top_k: bool) -> RouterConfig {
    RouterConfig {
        logits_norm_std: None,
        normalize_top_k,
        two_layer_gate: false,
        multiply_input_by_top_k: false,
        ..RouterConfig::PLAIN
    }
}

impl Family for Qwen3Moe {
    fn hf_class(&self) -> &'static str {
        "Qwen3MoeForCausalLM"
    }

    fn model_type(&self) -> &'static str {
        "qwen3_moe"
    }

    fn read_hf_config(&self, v: &Value, origin: &Path, c: &mut ModelConfig) -> Result<()> {
        c.qk_norm = QkNorm::PerHead;
        c.moe = Some(MoeConfig {
            // transformers 5 writes `num_local_experts`; the published configs `num_experts`.
            num_experts: match get_usize(v, "num_local_experts") {
                Some(n) if n > 0 => n,
                _ => need_usize(v, origin, "num_experts")?,
            },
            top_k: get_usize(v, "num_experts_per_tok").unwrap_or(8),
            expert_intermediate_size: need_usize(v, origin, "moe_intermediate_size")?,
            shared_expert_intermediate_size: None,
            shared_expert_gated: false,
            moe_layers: sparse_layers(v, c.num_hidden_layers),
            router: router(get_bool(v, "norm_topk_prob").unwrap_or(false)),
        });
        Ok(())
    }

    fn write_hf_config(&self, c: &ModelConfig, o: &mut Map<String, Value>) {
        o.insert("attention_bias".into(), c.qkv_bias.into());
        let Some(m) = &c.moe else { return };
        o.insert("num_local_experts".into(), m.num_experts.into());
        o.insert("num_experts_per_tok".into(), m.top_k.into());
        o.insert(
            "moe_intermediate_size".into(),
            m.expert_intermediate_size.into(),
        );
        o.insert("norm_topk_prob".into(), m.router.normalize_top_k.into());
        write_sparse_layers(m, c.num_hidden_layers, o);
        o.insert("router_aux_loss_coef".into(), 0.0.into());
    }

    fn gguf(&self) -> Option<GgufForm> {
        Some(GgufForm {
            architecture: "qwen3moe",
            with_experts: true,
            permuted_qk: false,
        })
    }

    fn read_gguf_config(&self, keys: &GgufKeys<'_>, c: &mut ModelConfig) -> Result<()> {
        let experts = keys.routed_experts(8, c.intermediate_size)?;
        // llama.cpp renormalises the top-k of qwen3moe unless the file says otherwise.
        let normalize = keys
            .metadata
            .bool(&keys.key("expert_weights_norm"))
            .unwrap_or(true);
        c.qk_norm = QkNorm::PerHead;
        c.moe = Some(every_layer_moe(
            &experts,
            c.num_hidden_layers,
            router(normalize),
        ));
        Ok(())
    }

    fn upcycle_target(&self) -> bool {
        true
    }

    fn new_model(&self, mut dense: ModelConfig, experts: &NewExperts) -> ModelConfig {
        dense.architecture = Architecture::Qwen3Moe;
        dense.qk_norm = QkNorm::PerHead;
        dense.clip_qkv = None;
        dense.moe = Some(every_layer_moe(
            experts,
            dense.num_hidden_layers,
            router(true),
        ));
        dense
    }
}
