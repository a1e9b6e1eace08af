//! Mixtral (`MixtralForCausalLM`): Llama attention, every layer an MoE of SwiGLU experts
//! under `block_sparse_moe` (`w1`/`w3`/`w2`), a softmax router renormalised over the top-k.
//! Also llama.cpp's `llama` GGUF files with experts (stacked `ffn_*_exps` tensors).

use std::path::Path;

use serde_json::{Map, Value};

use super::{every_layer_moe, Architecture, Family, GgufForm, GgufKeys, NewExperts};
use crate::config::{get_usize, ModelConfig, RouterConfig};
use crate::error::Result;
use crate::names::{self, MoeNames};

/// The Mixtral family.
#[derive(Debug, Clone, Copy)]
pub struct Mixtral;

/// Mixtral's router: softmax over all experts, top-k renormalised.
const ROUTER: RouterConfig = RouterConfig {
    logits_norm_std: None,
    normalize_top_k: true,
    two_layer_gate: false,
    multiply_input_by_top_k: false,
    ..RouterConfig::PLAIN
};

impl Family for Mixtral {
    fn hf_class(&self) -> &'static str {
        "MixtralForCausalLM"
    }

    fn model_type(&self) -> &'static str {
        "mixtral"
    }

    fn read_hf_config(&self, v: &Value, _origin: &Path, c: &mut ModelConfig) -> Result<()> {
        let experts = NewExperts {
            num_experts: get_usize(v, "num_local_experts").unwrap_or(8),
            top_k: get_usize(v, "num_experts_per_tok").unwrap_or(2),
            expert_intermediate_size: c.intermediate_size,
            logits_norm_std: None,
        };
        c.moe = Some(every_layer_moe(&experts, c.num_hidden_layers, ROUTER));
        Ok(())
    }

    fn write_hf_config(&self, c: &ModelConfig, o: &mut Map<String, Value>) {
        let Some(m) = &c.moe else { return };
        o.insert("num_local_experts".into(), m.num_experts.into());
        o.insert("num_experts_per_tok".into(), m.top_k.into());
        o.insert("router_aux_loss_coef".into(), 0.0.into());
    }

    fn gguf(&self) -> Option<GgufForm> {
        Some(GgufForm {
            architecture: "llama",
            with_experts: true,
            permuted_qk: true,
        })
    }

    fn read_gguf_config(&self, keys: &GgufKeys<'_>, c: &mut ModelConfig) -> Result<()> {
        let experts = keys.routed_experts(2, c.intermediate_size)?;
        c.moe = Some(every_layer_moe(&experts, c.num_hidden_layers, ROUTER));
        Ok(())
    }

    fn moe_names(&self, c: &ModelConfig, layer: usize) -> MoeNames {
        names::block_sparse_moe_names(c, layer)
    }

    fn new_model(&self, mut dense: ModelConfig, experts: &NewExperts) -> ModelConfig {
        dense.architecture = Architecture::Mixtral;
        // Mixtral's `intermediate_size` is the expert width.
        dense.intermediate_size = experts.expert_intermediate_size;
        dense.moe = Some(every_layer_moe(experts, dense.num_hidden_layers, ROUTER));
        dense
    }

    fn upcycle_target(&self) -> bool {
        true
    }
}
