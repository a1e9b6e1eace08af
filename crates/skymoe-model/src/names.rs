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
    /// The shared expert, if the layer has one.
    pub shared: Option<SharedExpertNames>,
}

/// Names of a shared expert.
#[derive(Debug, Clone)]
pub struct SharedExpertNames {
    /// Its FFN.
    pub ffn: SwiGluNames,
    /// Its scalar sigmoid gate `[1, hidden]` (Qwen2-MoE's `shared_expert_gate`); `None` for an
    /// ungated shared expert (DeepSeek's `shared_experts`).
    pub gate: Option<String>,
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
/// when the config has one, `shared_expert` with its scalar `shared_expert_gate` (Qwen2-MoE;
/// a family with another shared-expert form replaces it).
pub fn mlp_moe_names(c: &ModelConfig, l: usize) -> MoeNames {
    let n = c.moe.as_ref().map_or(0, |m| m.num_experts);
    let p = layer(l, "mlp");
    let shared = c
        .moe
        .as_ref()
        .and_then(|m| m.shared_expert_intermediate_size)
        .map(|_| SharedExpertNames {
            ffn: swiglu(&format!("{p}.shared_expert"), false),
            gate: Some(format!("{p}.shared_expert_gate.weight")),
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

/// A SwiGLU FFN under `prefix` with Llama's matrix names (`{prefix}.gate_proj.weight`, ...).
pub fn llama_swiglu(prefix: &str) -> SwiGluNames {
    swiglu(prefix, false)
}

/// Layer `l`'s multi-head latent attention tensors, as DeepSeek's checkpoints name them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MlaNames {
    /// `q_proj` (without a query bottleneck).
    pub q_proj: String,
    /// `q_a_proj` (with a query bottleneck).
    pub q_a_proj: String,
    /// `q_a_layernorm`.
    pub q_a_norm: String,
    /// `q_b_proj`.
    pub q_b_proj: String,
    /// `kv_a_proj_with_mqa`.
    pub kv_a_proj: String,
    /// `kv_a_layernorm`.
    pub kv_a_norm: String,
    /// `kv_b_proj`.
    pub kv_b_proj: String,
    /// `o_proj`.
    pub o_proj: String,
}

/// The names of layer `l`'s latent attention tensors.
pub fn mla(l: usize) -> MlaNames {
    let w = |m: &str| layer(l, &format!("self_attn.{m}.weight"));
    MlaNames {
        q_proj: w("q_proj"),
        q_a_proj: w("q_a_proj"),
        q_a_norm: w("q_a_layernorm"),
        q_b_proj: w("q_b_proj"),
        kv_a_proj: w("kv_a_proj_with_mqa"),
        kv_a_norm: w("kv_a_layernorm"),
        kv_b_proj: w("kv_b_proj"),
        o_proj: w("o_proj"),
    }
}

impl ModelConfig {
    /// [`ModelConfig::mla_tensors`] as one of `ranks` tensor-parallel ranks holds them: the
    /// head-split ones (`q_proj`/`q_b_proj` and `kv_b_proj` rows, `o_proj` columns) cut to a
    /// `1/ranks` share, the rest whole.
    pub fn mla_tensors_split(&self, l: usize, ranks: usize) -> Vec<(String, Vec<usize>)> {
        let ranks = ranks.max(1);
        self.mla_tensors(l)
            .into_iter()
            .map(|(name, mut shape)| {
                if let Some((dim, _)) = self.mla_split_dim(&name) {
                    shape[dim] /= ranks;
                }
                (name, shape)
            })
            .collect()
    }

    /// For a latent attention tensor split over tensor-parallel ranks by heads: the dimension
    /// cut and its full size (`None`: replicated).
    pub fn mla_split_dim(&self, name: &str) -> Option<(usize, usize)> {
        let m = self.mla.as_ref()?;
        let nh = self.num_attention_heads;
        let split = [
            ("self_attn.q_proj.weight", 0, nh * m.qk_head_dim()),
            ("self_attn.q_b_proj.weight", 0, nh * m.qk_head_dim()),
            (
                "self_attn.kv_b_proj.weight",
                0,
                nh * (m.qk_nope_head_dim + m.v_head_dim),
            ),
            ("self_attn.o_proj.weight", 1, nh * m.v_head_dim),
        ];
        split
            .iter()
            .find(|(suffix, _, _)| name.ends_with(suffix))
            .map(|&(_, dim, full)| (dim, full))
    }

    /// Layer `l`'s latent attention tensors with their shapes, in checkpoint order (empty
    /// without MLA).
    pub fn mla_tensors(&self, l: usize) -> Vec<(String, Vec<usize>)> {
        let Some(m) = &self.mla else {
            return Vec::new();
        };
        let (h, nh) = (self.hidden_size, self.num_attention_heads);
        let n = mla(l);
        let mut out = match m.q_lora_rank {
            Some(q) => vec![
                (n.q_a_proj, vec![q, h]),
                (n.q_a_norm, vec![q]),
                (n.q_b_proj, vec![nh * m.qk_head_dim(), q]),
            ],
            None => vec![(n.q_proj, vec![nh * m.qk_head_dim(), h])],
        };
        out.push((n.kv_a_proj, vec![m.kv_lora_rank + m.qk_rope_head_dim, h]));
        out.push((n.kv_a_norm, vec![m.kv_lora_rank]));
        out.push((
            n.kv_b_proj,
            vec![nh * (m.qk_nope_head_dim + m.v_head_dim), m.kv_lora_rank],
        ));
        out.push((n.o_proj, vec![h, nh * m.v_head_dim]));
        out
    }
}
