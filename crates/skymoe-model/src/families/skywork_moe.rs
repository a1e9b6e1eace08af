//! Skywork-MoE (`SkyworkForCausalLM`, `skywork_moe`): Llama attention, MoE layers every
//! `moe_expert_interval` layers under Mixtral's `block_sparse_moe` names, a softmax router
//! with gating logit normalisation (`moe_use_logits_norm`, `moe_gate_norm_std`), an optional
//! two-layer gate (`moe_2layer_gate`: `gate.wg.0`/`gate.wg.2`) and an optional top-k multiple
//! of the expert input (`moe_feature_no_mul_topk`). Skywork's names also cover the dense
//! Skywork-13B (`skywork`, no `num_experts`), which is handed to [`super::llama`].

use std::path::Path;

use serde_json::{Map, Value};

use super::{every_layer_moe, Architecture, Family, NewExperts, RemoteCode};
use crate::config::{get_bool, get_f64, get_usize, ModelConfig, MoeConfig, RouterConfig};
use crate::error::{ModelError, Result};
use crate::names::{self, MoeNames};

/// The Skywork-MoE family.
#[derive(Debug, Clone, Copy)]
pub struct SkyworkMoe;

/// transformers remote code for the Skywork-MoE layout (Skywork's own modeling code lives on
/// the Hugging Face hub): written beside every Skywork-MoE checkpoint so that
/// `AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)` loads it.
static REMOTE_CODE: RemoteCode = RemoteCode {
    auto_map: &[
        ("AutoConfig", "configuration_skywork_moe.SkyworkMoeConfig"),
        (
            "AutoModelForCausalLM",
            "modeling_skywork_moe.SkyworkForCausalLM",
        ),
    ],
    files: &[
        (
            "configuration_skywork_moe.py",
            include_str!("../../../../tools/reference/skywork_remote/configuration_skywork_moe.py"),
        ),
        (
            "modeling_skywork_moe.py",
            include_str!("../../../../tools/reference/skywork_remote/modeling_skywork_moe.py"),
        ),
        (
            "skywork_moe_ref.py",
            include_str!("../../../../tools/reference/skywork_moe_ref.py"),
        ),
    ],
};

impl Family for SkyworkMoe {
    fn hf_class(&self) -> &'static str {
        "SkyworkForCausalLM"
    }

    fn model_type(&self) -> &'static str {
        "skywork_moe"
    }

    fn other_classes(&self) -> &'static [&'static str] {
        &["SkyworkMoeForCausalLM"]
    }

    fn other_model_types(&self) -> &'static [&'static str] {
        &["skywork"]
    }

    fn hand_over(&self, v: &Value) -> Option<Architecture> {
        // Skywork's class names cover both the dense Skywork-13B (a Llama block, no
        // `num_experts`) and Skywork-MoE; only the MoE key tells them apart.
        v.get("num_experts")
            .is_none_or(Value::is_null)
            .then_some(Architecture::Llama)
    }

    fn check_hf_keys(&self, v: &Value, origin: &Path) -> Result<()> {
        if get_bool(v, "moe_use_skywork_gating") == Some(true) {
            return Err(ModelError::config(
                origin,
                "`moe_use_skywork_gating` is true; skymoe implements the released Skywork-MoE \
                 gating (softmax, top-2, renormalised), where this key is false",
            ));
        }
        Ok(())
    }

    fn read_hf_config(&self, v: &Value, origin: &Path, c: &mut ModelConfig) -> Result<()> {
        c.moe = Some(skywork_moe(
            v,
            origin,
            c.intermediate_size,
            c.num_hidden_layers,
        )?);
        Ok(())
    }

    fn write_hf_config(&self, c: &ModelConfig, o: &mut Map<String, Value>) {
        let Some(m) = &c.moe else { return };
        let interval = (1..=c.num_hidden_layers)
            .find(|&i| {
                (0..c.num_hidden_layers).all(|l| m.moe_layers[l] == (i == 1 || (l + 1) % i == 0))
            })
            .unwrap_or(1);
        o.insert("num_experts".into(), vec![m.num_experts].into());
        // Read back by skymoe (Skywork's released modeling code routes top-2 whatever it says).
        o.insert("moe_topk".into(), m.top_k.into());
        o.insert("moe_expert_interval".into(), interval.into());
        o.insert("moe_use_mixtral_gating".into(), false.into());
        o.insert("moe_2layer_gate".into(), m.router.two_layer_gate.into());
        o.insert(
            "moe_use_logits_norm".into(),
            m.router.logits_norm_std.is_some().into(),
        );
        o.insert(
            "moe_gate_norm_std".into(),
            m.router.logits_norm_std.unwrap_or(1.0).into(),
        );
        o.insert(
            "moe_feature_no_mul_topk".into(),
            (!m.router.multiply_input_by_top_k).into(),
        );
    }

    fn moe_names(&self, c: &ModelConfig, layer: usize) -> MoeNames {
        names::block_sparse_moe_names(c, layer)
    }

    fn new_model(&self, mut dense: ModelConfig, experts: &NewExperts) -> ModelConfig {
        dense.architecture = Architecture::SkyworkMoe;
        // One `intermediate_size` holds the expert width (every layer is an MoE).
        dense.intermediate_size = experts.expert_intermediate_size;
        let router = RouterConfig {
            logits_norm_std: experts.logits_norm_std,
            normalize_top_k: true,
            two_layer_gate: false,
            multiply_input_by_top_k: false,
            ..RouterConfig::PLAIN
        };
        dense.moe = Some(every_layer_moe(experts, dense.num_hidden_layers, router));
        dense
    }

    fn upcycle_target(&self) -> bool {
        true
    }

    fn remote_code(&self) -> Option<&'static RemoteCode> {
        Some(&REMOTE_CODE)
    }
}

/// Parse the Skywork-MoE specific keys.
fn skywork_moe(
    v: &Value,
    origin: &Path,
    intermediate_size: usize,
    num_layers: usize,
) -> Result<MoeConfig> {
    let num_experts = match v.get("num_experts") {
        Some(Value::Array(a)) => {
            let counts: Vec<Option<u64>> = a.iter().map(Value::as_u64).collect();
            if counts.windows(2).any(|w| w[0] != w[1]) {
                return Err(ModelError::config(
                    origin,
                    format!(
                        "`num_experts` is {}; skymoe needs the same number of experts in every MoE layer",
                        Value::Array(a.clone())
                    ),
                ));
            }
            counts.first().copied().flatten().map(|x| x as usize)
        }
        Some(Value::Number(n)) => n.as_u64().map(|x| x as usize),
        _ => None,
    }
    .filter(|&x| x > 0)
    .ok_or_else(|| {
        ModelError::config(
            origin,
            "missing or invalid `num_experts` (expected e.g. [16])",
        )
    })?;
    let top_k = get_usize(v, "moe_topk")
        .or_else(|| get_usize(v, "num_experts_per_tok"))
        .unwrap_or(2);
    let interval = get_usize(v, "moe_expert_interval").unwrap_or(1).max(1);
    let moe_layers = (0..num_layers)
        .map(|l| l % interval == interval - 1)
        .collect();
    let use_logits_norm = get_bool(v, "moe_use_logits_norm").unwrap_or(false);
    let norm_std = get_f64(v, "moe_gate_norm_std").unwrap_or(1.0);
    let mixtral_gating = get_bool(v, "moe_use_mixtral_gating").unwrap_or(false);
    let no_mul_topk = get_bool(v, "moe_feature_no_mul_topk").unwrap_or(false);
    Ok(MoeConfig {
        num_experts,
        top_k,
        expert_intermediate_size: intermediate_size,
        shared_expert_intermediate_size: None,
        shared_expert_gated: false,
        moe_layers,
        router: RouterConfig {
            logits_norm_std: use_logits_norm.then_some(norm_std),
            normalize_top_k: true,
            // The Skywork config class defaults to a two-layer gate; released checkpoints set false.
            two_layer_gate: get_bool(v, "moe_2layer_gate").unwrap_or(true),
            multiply_input_by_top_k: !mixtral_gating && !no_mul_topk,
            ..RouterConfig::PLAIN
        },
    })
}
