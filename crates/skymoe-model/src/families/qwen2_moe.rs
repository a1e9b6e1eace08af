//! Qwen2-MoE (`Qwen2MoeForCausalLM`): Llama attention with q/k/v biases (no output bias),
//! MoE layers every `decoder_sparse_step` layers except `mlp_only_layers` (dense SwiGLU in
//! between), a softmax router renormalised only with `norm_topk_prob`, and a sigmoid-gated
//! shared expert (`mlp.shared_expert`, `mlp.shared_expert_gate`). Tensors under `mlp.`.

use std::path::Path;

use serde_json::{Map, Value};

use super::{every_layer_moe, Architecture, Family, NewExperts};
use crate::config::{get_bool, get_usize, need_usize, ModelConfig, MoeConfig, RouterConfig};
use crate::error::Result;

/// The Qwen2-MoE family.
#[derive(Debug, Clone, Copy)]
pub struct Qwen2Moe;

/// Qwen2-MoE's router: softmax over all experts, renormalised over the top-k when asked.
fn router(normalize_top_k: bool) -> RouterConfig {
    RouterConfig {
        logits_norm_std: None,
        normalize_top_k,
        two_layer_gate: false,
        multiply_input_by_top_k: false,
        ..RouterConfig::PLAIN
    }
}

impl Family for Qwen2Moe {
    fn hf_class(&self) -> &'static str {
        "Qwen2MoeForCausalLM"
    }

    fn model_type(&self) -> &'static str {
        "qwen2_moe"
    }

    fn read_hf_config(&self, v: &Value, origin: &Path, c: &mut ModelConfig) -> Result<()> {
        c.qkv_bias = true;
        c.o_bias = false;
        let num_experts = need_usize(v, origin, "num_experts")?;
        let top_k = get_usize(v, "num_experts_per_tok").unwrap_or(4);
        let moe_layers = sparse_layers(v, c.num_hidden_layers);
        let shared = get_usize(v, "shared_expert_intermediate_size").filter(|&x| x > 0);
        c.moe = Some(MoeConfig {
            num_experts,
            top_k,
            expert_intermediate_size: need_usize(v, origin, "moe_intermediate_size")?,
            shared_expert_intermediate_size: shared,
            shared_expert_gated: true,
            moe_layers,
            router: router(get_bool(v, "norm_topk_prob").unwrap_or(false)),
        });
        Ok(())
    }

    fn write_hf_config(&self, c: &ModelConfig, o: &mut Map<String, Value>) {
        let Some(m) = &c.moe else { return };
        o.insert("num_experts".into(), m.num_experts.into());
        o.insert("num_experts_per_tok".into(), m.top_k.into());
        o.insert(
            "moe_intermediate_size".into(),
            m.expert_intermediate_size.into(),
        );
        o.insert(
            "shared_expert_intermediate_size".into(),
            m.shared_expert_intermediate_size.unwrap_or(0).into(),
        );
        o.insert("norm_topk_prob".into(), m.router.normalize_top_k.into());
        write_sparse_layers(m, c.num_hidden_layers, o);
        o.insert("qkv_bias".into(), true.into());
    }

    fn new_model(&self, mut dense: ModelConfig, experts: &NewExperts) -> ModelConfig {
        dense.architecture = Architecture::Qwen2Moe;
        dense.qkv_bias = true;
        dense.o_bias = false;
        dense.moe = Some(every_layer_moe(
            experts,
            dense.num_hidden_layers,
            router(false),
        ));
        dense
    }
}

/// Which layers are MoE under the Qwen MoE rule (Qwen2-MoE, Qwen3-MoE): layer `l` is sparse
/// when it is not in `mlp_only_layers` and `(l + 1) % decoder_sparse_step == 0`.
pub(super) fn sparse_layers(v: &Value, layers: usize) -> Vec<bool> {
    let step = get_usize(v, "decoder_sparse_step").unwrap_or(1).max(1);
    // A set: a list checked once per layer is quadratic in a hostile config.
    let mlp_only: std::collections::HashSet<usize> = v
        .get("mlp_only_layers")
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(Value::as_u64)
                .map(|x| x as usize)
                .collect()
        })
        .unwrap_or_default();
    (0..layers)
        .map(|l| !mlp_only.contains(&l) && (l + 1) % step == 0)
        .collect()
}

/// Write the MoE layers of `m` back under the Qwen rule: step 1, the dense layers listed.
pub(super) fn write_sparse_layers(m: &MoeConfig, layers: usize, o: &mut Map<String, Value>) {
    o.insert("decoder_sparse_step".into(), 1.into());
    let dense: Vec<usize> = (0..layers)
        .filter(|&l| !m.moe_layers.get(l).copied().unwrap_or(false))
        .collect();
    o.insert("mlp_only_layers".into(), dense.into());
}
