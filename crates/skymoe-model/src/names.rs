//! Checkpoint tensor names of each architecture (Hugging Face conventions).

use crate::config::{Architecture, ModelConfig};

/// The three matrices of a SwiGLU FFN under their checkpoint names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SwiGluNames {
    /// gate_proj / w1.
    pub gate: String,
    /// up_proj / w3.
    pub up: String,
    /// down_proj / w2.
    pub down: String,
}

fn swiglu(prefix: &str, mixtral_style: bool) -> SwiGluNames {
    if mixtral_style {
        SwiGluNames {
            gate: format!("{prefix}.w1.weight"),
            up: format!("{prefix}.w3.weight"),
            down: format!("{prefix}.w2.weight"),
        }
    } else {
        SwiGluNames {
            gate: format!("{prefix}.gate_proj.weight"),
            up: format!("{prefix}.up_proj.weight"),
            down: format!("{prefix}.down_proj.weight"),
        }
    }
}

/// Name of a layer's tensor `model.layers.{layer}.{rest}`.
pub fn layer(layer: usize, rest: &str) -> String {
    format!("model.layers.{layer}.{rest}")
}

/// Token embedding.
pub const EMBED: &str = "model.embed_tokens.weight";
/// Final norm.
pub const FINAL_NORM: &str = "model.norm.weight";
/// LM head (absent when tied).
pub const LM_HEAD: &str = "lm_head.weight";

/// Names of the MoE-specific tensors of one layer.
#[derive(Debug, Clone)]
pub struct MoeNames {
    /// Gate weight (the first of two for a two-layer gate).
    pub gate: String,
    /// Second gate matrix of a two-layer gate.
    pub gate2: Option<String>,
    /// Expert `e`'s FFN names, for each expert.
    pub experts: Vec<SwiGluNames>,
    /// Shared expert FFN and its scalar gate (Qwen2-MoE).
    pub shared: Option<(SwiGluNames, String)>,
}

impl ModelConfig {
    /// Whether the MoE tensors follow Mixtral's `block_sparse_moe` naming (Mixtral, Skywork).
    pub fn mixtral_style(&self) -> bool {
        matches!(
            self.architecture,
            Architecture::Mixtral | Architecture::SkyworkMoe
        )
    }

    /// Names of a dense FFN in layer `l`.
    pub fn dense_ffn_names(&self, l: usize) -> SwiGluNames {
        swiglu(&layer(l, "mlp"), false)
    }

    /// Names of the MoE tensors in layer `l` (meaningful only for an MoE layer).
    pub fn moe_names(&self, l: usize) -> MoeNames {
        let n = self.moe.as_ref().map_or(0, |m| m.num_experts);
        let two_layer = self.moe.as_ref().is_some_and(|m| m.router.two_layer_gate);
        if self.mixtral_style() {
            let p = layer(l, "block_sparse_moe");
            MoeNames {
                gate: if two_layer {
                    format!("{p}.gate.wg.0.weight")
                } else {
                    format!("{p}.gate.weight")
                },
                gate2: two_layer.then(|| format!("{p}.gate.wg.2.weight")),
                experts: (0..n)
                    .map(|e| swiglu(&format!("{p}.experts.{e}"), true))
                    .collect(),
                shared: None,
            }
        } else {
            let p = layer(l, "mlp");
            let shared = self
                .moe
                .as_ref()
                .and_then(|m| m.shared_expert_intermediate_size)
                .map(|_| {
                    (
                        swiglu(&format!("{p}.shared_expert"), false),
                        format!("{p}.shared_expert_gate.weight"),
                    )
                });
            MoeNames {
                gate: format!("{p}.gate.weight"),
                gate2: None,
                experts: (0..n)
                    .map(|e| swiglu(&format!("{p}.experts.{e}"), false))
                    .collect(),
                shared,
            }
        }
    }
}
