//! The full list of a model's parameters (name, shape, role) derived from its config — the
//! single source of truth for loading, counting, and checking checkpoints.

use crate::config::ModelConfig;
use crate::names::{self, SwiGluNames};

/// What a parameter is for; used to count parameters activated per token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ParamRole {
    /// Used by every token (attention, norms, embedding, head, dense FFN, router, shared expert).
    Always,
    /// A routed expert's weight: used by a token only when routed there.
    RoutedExpert,
}

/// One parameter tensor of a model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParamSpec {
    /// Checkpoint name.
    pub name: String,
    /// Shape.
    pub shape: Vec<usize>,
    /// Role.
    pub role: ParamRole,
}

impl ParamSpec {
    /// Number of scalars.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

fn push_swiglu(
    out: &mut Vec<ParamSpec>,
    n: &SwiGluNames,
    hidden: usize,
    ffn: usize,
    role: ParamRole,
) {
    out.push(ParamSpec {
        name: n.gate.clone(),
        shape: vec![ffn, hidden],
        role,
    });
    out.push(ParamSpec {
        name: n.up.clone(),
        shape: vec![ffn, hidden],
        role,
    });
    out.push(ParamSpec {
        name: n.down.clone(),
        shape: vec![hidden, ffn],
        role,
    });
}

impl ModelConfig {
    /// Every parameter of the model, in a fixed order.
    pub fn param_specs(&self) -> Vec<ParamSpec> {
        let h = self.hidden_size;
        let q = self.num_attention_heads * self.head_dim;
        let kv = self.num_key_value_heads * self.head_dim;
        let a = ParamRole::Always;
        let mut out = vec![ParamSpec {
            name: names::EMBED.into(),
            shape: vec![self.vocab_size, h],
            role: a,
        }];
        for l in 0..self.num_hidden_layers {
            let p = |s: &str| names::layer(l, s);
            out.push(ParamSpec {
                name: p("input_layernorm.weight"),
                shape: vec![h],
                role: a,
            });
            if self.mla.is_some() {
                out.extend(
                    self.mla_tensors(l)
                        .into_iter()
                        .map(|(name, shape)| ParamSpec {
                            name,
                            shape,
                            role: a,
                        }),
                );
                out.push(ParamSpec {
                    name: p("post_attention_layernorm.weight"),
                    shape: vec![h],
                    role: a,
                });
                self.push_ffn_specs(l, &mut out);
                continue;
            }
            for (proj, rows) in [("q_proj", q), ("k_proj", kv), ("v_proj", kv)] {
                out.push(ParamSpec {
                    name: p(&format!("self_attn.{proj}.weight")),
                    shape: vec![rows, h],
                    role: a,
                });
                if self.qkv_bias {
                    out.push(ParamSpec {
                        name: p(&format!("self_attn.{proj}.bias")),
                        shape: vec![rows],
                        role: a,
                    });
                }
            }
            if let Some((qs, ks)) = self.qk_norm_sizes() {
                out.push(ParamSpec {
                    name: names::q_norm(l),
                    shape: vec![qs],
                    role: a,
                });
                out.push(ParamSpec {
                    name: names::k_norm(l),
                    shape: vec![ks],
                    role: a,
                });
            }
            out.push(ParamSpec {
                name: p("self_attn.o_proj.weight"),
                shape: vec![h, q],
                role: a,
            });
            if self.o_bias {
                out.push(ParamSpec {
                    name: p("self_attn.o_proj.bias"),
                    shape: vec![h],
                    role: a,
                });
            }
            out.push(ParamSpec {
                name: p("post_attention_layernorm.weight"),
                shape: vec![h],
                role: a,
            });
            self.push_ffn_specs(l, &mut out);
        }
        out.push(ParamSpec {
            name: names::FINAL_NORM.into(),
            shape: vec![h],
            role: a,
        });
        if !self.tie_word_embeddings {
            out.push(ParamSpec {
                name: names::LM_HEAD.into(),
                shape: vec![self.vocab_size, h],
                role: a,
            });
        }
        out
    }

    /// The feed-forward parameters of layer `l` (dense, or router, experts and shared expert).
    fn push_ffn_specs(&self, l: usize, out: &mut Vec<ParamSpec>) {
        let h = self.hidden_size;
        let a = ParamRole::Always;
        match (&self.moe, self.is_moe_layer(l)) {
            (Some(m), true) => {
                let names = self.moe_names(l);
                let e = m.num_experts;
                match &names.gate2 {
                    Some(g2) => {
                        out.push(ParamSpec {
                            name: names.gate.clone(),
                            shape: vec![8 * e, h],
                            role: a,
                        });
                        out.push(ParamSpec {
                            name: g2.clone(),
                            shape: vec![e, 8 * e],
                            role: a,
                        });
                    }
                    None => out.push(ParamSpec {
                        name: names.gate.clone(),
                        shape: vec![e, h],
                        role: a,
                    }),
                }
                for ex in &names.experts {
                    push_swiglu(
                        out,
                        ex,
                        h,
                        m.expert_intermediate_size,
                        ParamRole::RoutedExpert,
                    );
                }
                if let (Some(shared), Some(sf)) = (&names.shared, m.shared_expert_intermediate_size)
                {
                    push_swiglu(out, &shared.ffn, h, sf, a);
                    if let Some(gate) = &shared.gate {
                        out.push(ParamSpec {
                            name: gate.clone(),
                            shape: vec![1, h],
                            role: a,
                        });
                    }
                }
            }
            _ => push_swiglu(out, &self.dense_ffn_names(l), h, self.intermediate_size, a),
        }
    }

    /// Total number of parameters.
    pub fn total_params(&self) -> usize {
        self.param_specs().iter().map(ParamSpec::numel).sum()
    }

    /// Parameters used for one token: everything but routed experts, plus `top_k` experts per
    /// MoE layer.
    pub fn active_params(&self) -> usize {
        let specs = self.param_specs();
        let always: usize = specs
            .iter()
            .filter(|s| s.role == ParamRole::Always)
            .map(ParamSpec::numel)
            .sum();
        let routed: usize = specs
            .iter()
            .filter(|s| s.role == ParamRole::RoutedExpert)
            .map(ParamSpec::numel)
            .sum();
        match &self.moe {
            Some(m) if m.num_experts > 0 => always + routed / m.num_experts * m.top_k,
            _ => always,
        }
    }
}
