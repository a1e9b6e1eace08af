//! Checkpoint tensor names (Hugging Face conventions): the shared naming forms of the parts,
//! which each family picks in [`crate::families`].

use crate::config::ModelConfig;

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

/// Layer `l`'s query norm weight (`self_attn.q_norm.weight`), when the config has a q/k norm.
pub fn q_norm(l: usize) -> String {
    layer(l, "self_attn.q_norm.weight")
}

/// Layer `l`'s key norm weight (`self_attn.k_norm.weight`), when the config has a q/k norm.
pub fn k_norm(l: usize) -> String {
    layer(l, "self_attn.k_norm.weight")
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
    /// Names of a dense FFN in layer `l`.
    pub fn dense_ffn_names(&self, l: usize) -> SwiGluNames {
        self.architecture.family().dense_ffn_names(l)
    }

    /// Names of the MoE tensors in layer `l` (meaningful only for an MoE layer).
    pub fn moe_names(&self, l: usize) -> MoeNames {
        self.architecture.family().moe_names(self, l)
    }
}

/// The Llama form of a dense FFN: `model.layers.{l}.mlp.{gate,up,down}_proj`.
pub fn mlp_names(l: usize) -> SwiGluNames {
    swiglu(&layer(l, "mlp"), false)
}

/// Mixtral's form of an MoE layer, under `model.layers.{l}.block_sparse_moe`: the router
/// `gate` (`gate.wg.0`/`gate.wg.2` for a two-layer gate), experts `experts.{e}.w1/w3/w2`.
pub fn block_sparse_moe_names(c: &ModelConfig, l: usize) -> MoeNames {
    let n = c.moe.as_ref().map_or(0, |m| m.num_experts);
    let two_layer = c.moe.as_ref().is_some_and(|m| m.router.two_layer_gate);
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
}

/// The `mlp` form of an MoE layer (Qwen2-MoE and later transformers models), under
/// `model.layers.{l}.mlp`: the router `gate`, experts `experts.{e}.{gate,up,down}_proj`, and
/// when the config has one, `shared_expert` with its scalar `shared_expert_gate`.
pub fn mlp_moe_names(c: &ModelConfig, l: usize) -> MoeNames {
    let n = c.moe.as_ref().map_or(0, |m| m.num_experts);
    let p = layer(l, "mlp");
    let shared = c
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
