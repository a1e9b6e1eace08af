//! DeepSeek-V3 (`DeepseekV3ForCausalLM`, also Moonlight and Kimi-K2's layout): DeepSeek-V2's
//! latent attention, dense first layers and ungated shared experts, with a sigmoid router
//! that selects on `sigmoid(z) + e_score_correction_bias` (the bias chooses, the combine
//! weights stay the unbiased scores) among its `topk_group` best of `n_group` groups, each
//! group scored by the sum of its two best selection scores (`noaux_tc`), combine weights
//! renormalised with `norm_topk_prob` and scaled by `routed_scaling_factor`. Its
//! multi-token-prediction layers (`num_nextn_predict_layers`, stored after the decoder
//! layers) are not used for next-token prediction and are skipped. llama.cpp stores it as
//! `deepseek2` (read by [`super::deepseek_v2`]).

use std::path::Path;

use serde_json::{Map, Value};

use super::deepseek_v2::{
    check_keys, deepseek_moe_names, new_deepseek, read_common, read_groups, write_common, Defaults,
};
use super::{Architecture, Family, NewExperts};
use crate::config::{get_bool, get_f64, GroupScore, ModelConfig, RouterConfig, ScoreFunction};
use crate::error::{ModelError, Result};
use crate::names::MoeNames;

/// The DeepSeek-V3 family.
#[derive(Debug, Clone, Copy)]
pub struct DeepseekV3;

/// DeepSeek-V3's defaults (transformers' `DeepseekV3Config`).
const V3_DEFAULTS: Defaults = Defaults {
    first_k_dense_replace: 3,
    n_shared_experts: 1,
    routed_scaling_factor: 2.5,
    norm_topk_prob: true,
    rope_interleave: true,
};

/// DeepSeek-V3's router: sigmoid scores, bias-corrected group-limited selection.
pub(super) fn v3_router(normalize_top_k: bool, scaling: f64) -> RouterConfig {
    RouterConfig {
        normalize_top_k,
        scoring: ScoreFunction::Sigmoid,
        routed_scaling_factor: scaling,
        requires_selection_bias: true,
        ..RouterConfig::PLAIN
    }
}

impl Family for DeepseekV3 {
    fn hf_class(&self) -> &'static str {
        "DeepseekV3ForCausalLM"
    }

    fn model_type(&self) -> &'static str {
        "deepseek_v3"
    }

    fn check_hf_keys(&self, v: &Value, origin: &Path) -> Result<()> {
        check_keys(v, origin)?;
        if let Some(f) = v.get("scoring_func").and_then(Value::as_str) {
            if f != "sigmoid" {
                return Err(ModelError::config(
                    origin,
                    format!("`scoring_func` is `{f}`; DeepSeek-V3 routers score with sigmoid"),
                ));
            }
        }
        if let Some(m) = v.get("topk_method").and_then(Value::as_str) {
            if m != "noaux_tc" {
                return Err(ModelError::config(
                    origin,
                    format!("`topk_method` is `{m}`; DeepSeek-V3 routes with `noaux_tc`"),
                ));
            }
        }
        Ok(())
    }

    fn read_hf_config(&self, v: &Value, origin: &Path, c: &mut ModelConfig) -> Result<()> {
        let mut router = v3_router(
            get_bool(v, "norm_topk_prob").unwrap_or(V3_DEFAULTS.norm_topk_prob),
            get_f64(v, "routed_scaling_factor").unwrap_or(V3_DEFAULTS.routed_scaling_factor),
        );
        // transformers' defaults: 8 groups, 4 kept.
        router.group_limit = read_groups(v, origin, GroupScore::TopTwoSum, Some((8, 4)))?;
        read_common(v, origin, c, &V3_DEFAULTS, router)
    }

    fn write_hf_config(&self, c: &ModelConfig, o: &mut Map<String, Value>) {
        write_common(c, o);
        let grouped = c.moe.as_ref().and_then(|m| m.router.group_limit).is_some();
        if !grouped {
            // One group holding every expert: no limit.
            o.insert("n_group".into(), 1.into());
            o.insert("topk_group".into(), 1.into());
        }
        o.insert("topk_method".into(), "noaux_tc".into());
        o.insert("scoring_func".into(), "sigmoid".into());
        let interleave = c.mla.is_none_or(|m| m.rope_interleave);
        o.insert("rope_interleave".into(), interleave.into());
    }

    fn moe_names(&self, c: &ModelConfig, layer: usize) -> MoeNames {
        deepseek_moe_names(c, layer)
    }

    fn upcycle_target(&self) -> bool {
        true
    }

    fn new_model(&self, dense: ModelConfig, experts: &NewExperts) -> ModelConfig {
        new_deepseek(
            dense,
            experts,
            Architecture::DeepseekV3,
            v3_router(true, 1.0),
        )
    }
}
