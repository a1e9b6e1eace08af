//! Model families, one file each.
//!
//! A family says how its `config.json` (and GGUF metadata) maps onto the shared
//! [`ModelConfig`], which tensor names it gives the shared parts in Hugging Face and GGUF
//! form, and which parts it uses. The executors (the autograd [`crate::CausalLm`] and the
//! quantised serving model) read only the parts described by [`ModelConfig`] (attention
//! biases, router rule, routed and shared experts, dense layers among MoE layers) and the
//! names [`ModelConfig::moe_names`] gives; none of them asks which family a model is.
//!
//! Adding a family means adding one file here that implements [`Family`] and one line in
//! the [`families!`] list below (docs/FAMILIES.md has the checklist).

use std::path::Path;

use serde_json::{Map, Value};

use crate::config::{ModelConfig, MoeConfig};
use crate::error::{ModelError, Result};
use crate::names::{self, MoeNames, SwiGluNames};
use crate::weights::GgufMetadata;

pub mod deepseek_v2;
pub mod deepseek_v3;
pub mod llama;
pub mod mixtral;
pub mod olmoe;
pub mod qwen2_moe;
pub mod qwen3_moe;
pub mod skywork_moe;

/// Declares [`Architecture`] (the identifiers of the families) and the registry of their
/// descriptions from one list of `Variant => module::Type` entries.
macro_rules! families {
    ($($(#[$doc:meta])* $variant:ident => $module:ident :: $family:ident,)+) => {
        /// The model families skymoe implements, each described by a [`Family`] in its own
        /// file of [`crate::families`].
        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        pub enum Architecture {
            $($(#[$doc])* $variant,)+
        }

        /// Every family with its identifier, in declaration order.
        static REGISTRY: &[(Architecture, &dyn Family)] =
            &[$((Architecture::$variant, &$module::$family),)+];

        impl Architecture {
            /// The family's description.
            pub fn family(self) -> &'static dyn Family {
                match self {
                    $(Architecture::$variant => &$module::$family,)+
                }
            }
        }
    };
}

families! {
    /// Dense Llama (`LlamaForCausalLM`), also the architecture of llama.cpp's `llama` GGUF files.
    Llama => llama::Llama,
    /// Mixtral (`MixtralForCausalLM`): every layer an MoE of SwiGLU experts.
    Mixtral => mixtral::Mixtral,
    /// Qwen2-MoE (`Qwen2MoeForCausalLM`): q/k/v biases, a sigmoid-gated shared expert.
    Qwen2Moe => qwen2_moe::Qwen2Moe,
    /// Skywork-MoE (`SkyworkForCausalLM`): gating logit normalisation, expert interval.
    SkyworkMoe => skywork_moe::SkyworkMoe,
    /// Qwen3-MoE (`Qwen3MoeForCausalLM`): per-head q/k norm, many small experts, dense layers
    /// among MoE layers.
    Qwen3Moe => qwen3_moe::Qwen3Moe,
    /// OLMoE (`OlmoeForCausalLM`): q/k norm over the whole projections, `clip_qkv`.
    Olmoe => olmoe::Olmoe,
    /// DeepSeek-V2 (`DeepseekV2ForCausalLM`): latent attention, shared experts, softmax
    /// router with optional group-limited selection.
    DeepseekV2 => deepseek_v2::DeepseekV2,
    /// DeepSeek-V3 (`DeepseekV3ForCausalLM`): latent attention, shared experts, sigmoid
    /// router with bias-corrected group-limited selection.
    DeepseekV3 => deepseek_v3::DeepseekV3,
}

/// How a family is stored in llama.cpp's GGUF files.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GgufForm {
    /// The `general.architecture` value; metadata keys are prefixed with it.
    pub architecture: &'static str,
    /// Whether the family's files declare routed experts (`{arch}.expert_count` > 0); two
    /// families may share one `general.architecture` (llama.cpp stores Mixtral as `llama`).
    pub with_experts: bool,
    /// Whether llama.cpp's converter permuted the q/k rows for its interleaved rotary
    /// embedding (undone at load to Hugging Face's "rotate_half" order).
    pub permuted_qk: bool,
}

/// Files and `config.json` entries with which transformers loads a family through
/// `trust_remote_code`.
#[derive(Debug, Clone, Copy)]
pub struct RemoteCode {
    /// The `auto_map` entries (auto class, `module.Class`).
    pub auto_map: &'static [(&'static str, &'static str)],
    /// The Python files (file name, contents) written beside `config.json`.
    pub files: &'static [(&'static str, &'static str)],
}

/// Sizes of a new model's routed experts, from which a family builds its MoE part (fresh
/// models of a run file, upcycled models).
#[derive(Debug, Clone, PartialEq)]
pub struct NewExperts {
    /// Routed experts per MoE layer.
    pub num_experts: usize,
    /// Experts selected per token.
    pub top_k: usize,
    /// Hidden width of one routed expert.
    pub expert_intermediate_size: usize,
    /// Gating logit normalisation λ, for families whose router has it.
    pub logits_norm_std: Option<f64>,
}

/// GGUF metadata keys of one architecture (`{arch}.{key}`), read by a family.
pub struct GgufKeys<'a> {
    /// The file's metadata.
    pub metadata: &'a GgufMetadata,
    /// The `general.architecture` value prefixing the keys.
    pub architecture: &'a str,
    /// The file, for errors.
    pub origin: &'a Path,
}

impl GgufKeys<'_> {
    /// The full name of `key` (`{arch}.{key}`).
    pub fn key(&self, key: &str) -> String {
        format!("{}.{key}", self.architecture)
    }

    /// An integer entry `{arch}.{key}`.
    pub fn uint(&self, key: &str) -> Option<u64> {
        self.metadata.uint(&self.key(key))
    }

    /// A float entry `{arch}.{key}`.
    pub fn float(&self, key: &str) -> Option<f64> {
        self.metadata.float(&self.key(key))
    }

    /// A configuration error naming the file.
    pub fn error(&self, reason: impl Into<String>) -> ModelError {
        ModelError::config(self.origin, reason)
    }

    /// The routed experts as llama.cpp writes them: `expert_count`, `expert_used_count`
    /// (`default_top_k` when absent, checked to be in 1..=experts) and
    /// `expert_feed_forward_length` (else the dense `feed_forward_length`, `dense_width`).
    pub fn routed_experts(&self, default_top_k: u64, dense_width: usize) -> Result<NewExperts> {
        let num_experts = self.uint("expert_count").unwrap_or(0) as usize;
        if num_experts > crate::config::MAX_EXPERTS {
            return Err(self.error(format!(
                "{} ({num_experts}) is above {}",
                self.key("expert_count"),
                crate::config::MAX_EXPERTS
            )));
        }
        let top_k = self.uint("expert_used_count").unwrap_or(default_top_k) as usize;
        if top_k == 0 || top_k > num_experts {
            return Err(self.error(format!(
                "{} ({top_k}) must be in 1..={num_experts}",
                self.key("expert_used_count")
            )));
        }
        Ok(NewExperts {
            num_experts,
            top_k,
            expert_intermediate_size: self
                .uint("expert_feed_forward_length")
                .map_or(dense_width, |x| x as usize),
            logits_norm_std: None,
        })
    }
}

/// One model family: its names, its `config.json` and GGUF mappings onto [`ModelConfig`],
/// and its tensor names. Implementations are unit structs listed in [`families!`].
pub trait Family: Sync {
    /// The Hugging Face class name written in `architectures`.
    fn hf_class(&self) -> &'static str;

    /// The `model_type` written in `config.json`.
    fn model_type(&self) -> &'static str;

    /// Further `architectures[0]` class names the family answers to.
    fn other_classes(&self) -> &'static [&'static str] {
        &[]
    }

    /// Further `model_type` values the family answers to.
    fn other_model_types(&self) -> &'static [&'static str] {
        &[]
    }

    /// The family a `config.json` naming this family actually describes, when it is another
    /// one (Skywork's names also cover the dense Skywork-13B, a Llama); `None`: this one.
    fn hand_over(&self, _v: &Value) -> Option<Architecture> {
        None
    }

    /// Refuse family keys whose values change the computation in a way skymoe does not
    /// implement (checked after the keys every family shares).
    fn check_hf_keys(&self, _v: &Value, _origin: &Path) -> Result<()> {
        Ok(())
    }

    /// Read the family's own `config.json` keys into `c`, whose shared fields are read
    /// already (a dense model; biases from `attention_bias`).
    fn read_hf_config(&self, v: &Value, origin: &Path, c: &mut ModelConfig) -> Result<()>;

    /// Write the family's own `config.json` keys of `c` into `o`, after the shared ones.
    fn write_hf_config(&self, c: &ModelConfig, o: &mut Map<String, Value>);

    /// How llama.cpp stores the family, if it reads GGUF files of it.
    fn gguf(&self) -> Option<GgufForm> {
        None
    }

    /// Read the family's own GGUF metadata into `c`, whose shared fields are read already.
    fn read_gguf_config(&self, _keys: &GgufKeys<'_>, _c: &mut ModelConfig) -> Result<()> {
        Ok(())
    }

    /// Hugging Face names of the MoE tensors of layer `layer` (an MoE layer of `c`).
    fn moe_names(&self, c: &ModelConfig, layer: usize) -> MoeNames {
        names::mlp_moe_names(c, layer)
    }

    /// Hugging Face names of the dense FFN of layer `layer`.
    fn dense_ffn_names(&self, layer: usize) -> SwiGluNames {
        names::mlp_names(layer)
    }

    /// The model of this family with `dense`'s sizes and, for an MoE family, `experts` in
    /// every layer: the family's router rule and attention parts for a new model.
    fn new_model(&self, dense: ModelConfig, experts: &NewExperts) -> ModelConfig;

    /// Whether a dense Llama can be upcycled into this family (its experts start from a dense
    /// SwiGLU FFN and its attention from Llama's).
    fn upcycle_target(&self) -> bool {
        false
    }

    /// The remote code transformers needs to load the family, if it is not built in.
    fn remote_code(&self) -> Option<&'static RemoteCode> {
        None
    }
}

impl Architecture {
    /// The Hugging Face class name of the architecture.
    pub fn hf_class(self) -> &'static str {
        self.family().hf_class()
    }

    /// The `model_type` value written in `config.json`.
    pub fn model_type(self) -> &'static str {
        self.family().model_type()
    }

    /// Recognise an architecture from a `architectures[0]` class name or a `model_type`.
    pub fn from_name(name: &str) -> Option<Self> {
        REGISTRY.iter().find_map(|(a, f)| {
            let answers = f.hf_class() == name
                || f.model_type() == name
                || f.other_classes().contains(&name)
                || f.other_model_types().contains(&name);
            answers.then_some(*a)
        })
    }

    /// Every family, in declaration order.
    pub fn all() -> impl Iterator<Item = Architecture> {
        REGISTRY.iter().map(|(a, _)| *a)
    }
}

/// The family of a `config.json`: its `architectures[0]` class, else its `model_type`, as
/// the family named hands it over.
pub fn for_hf_config(v: &Value) -> Result<Architecture> {
    let class = v
        .get("architectures")
        .and_then(Value::as_array)
        .and_then(|a| a.first())
        .and_then(Value::as_str);
    let model_type = v.get("model_type").and_then(Value::as_str);
    let named = class
        .and_then(Architecture::from_name)
        .or_else(|| model_type.and_then(Architecture::from_name))
        .ok_or_else(|| ModelError::UnsupportedArchitecture {
            found: format!(
                "architectures={:?}, model_type={:?}",
                class.unwrap_or("<none>"),
                model_type.unwrap_or("<none>")
            ),
        })?;
    Ok(named.family().hand_over(v).unwrap_or(named))
}

/// The family of a GGUF file of `general.architecture` `arch`, with or without experts.
pub fn for_gguf(arch: &str, with_experts: bool) -> Option<Architecture> {
    REGISTRY.iter().find_map(|(a, f)| {
        f.gguf()
            .filter(|g| g.architecture == arch && g.with_experts == with_experts)
            .map(|_| *a)
    })
}

/// The supported names, for errors: `Class (model_type / ...), ...; GGUF: general.architecture = ...`.
pub fn supported_names() -> String {
    let hf: Vec<String> = REGISTRY
        .iter()
        .map(|(_, f)| {
            let types: Vec<&str> = std::iter::once(f.model_type())
                .chain(f.other_model_types().iter().copied())
                .collect();
            format!("{} ({})", f.hf_class(), types.join(" / "))
        })
        .collect();
    let mut gguf: Vec<&str> = Vec::new();
    for (_, f) in REGISTRY {
        if let Some(g) = f.gguf() {
            if !gguf.contains(&g.architecture) {
                gguf.push(g.architecture);
            }
        }
    }
    format!(
        "{}; GGUF: general.architecture = {}",
        hf.join(", "),
        gguf.join(", ")
    )
}

/// A dense model of `family` with `dense`'s sizes (the [`Family::new_model`] of dense
/// families).
pub fn dense_model(mut dense: ModelConfig, family: Architecture) -> ModelConfig {
    dense.architecture = family;
    dense.moe = None;
    dense
}

/// An MoE part with `experts` in each of `layers` layers and `router`'s rule.
pub fn every_layer_moe(
    experts: &NewExperts,
    layers: usize,
    router: crate::config::RouterConfig,
) -> MoeConfig {
    MoeConfig {
        num_experts: experts.num_experts,
        top_k: experts.top_k,
        expert_intermediate_size: experts.expert_intermediate_size,
        shared_expert_intermediate_size: None,
        shared_expert_gated: false,
        moe_layers: vec![true; layers],
        router,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_name_answers_to_one_family() {
        let mut seen: Vec<&str> = Vec::new();
        for (a, f) in REGISTRY {
            assert_eq!(a.family().hf_class(), f.hf_class());
            for name in [f.hf_class(), f.model_type()]
                .into_iter()
                .chain(f.other_classes().iter().copied())
                .chain(f.other_model_types().iter().copied())
            {
                assert!(!seen.contains(&name), "{name} is claimed twice");
                assert_eq!(Architecture::from_name(name), Some(*a));
                seen.push(name);
            }
        }
    }

    #[test]
    fn supported_names_as_errors_list_them() {
        assert_eq!(
            supported_names(),
            "LlamaForCausalLM (llama), MixtralForCausalLM (mixtral), Qwen2MoeForCausalLM \
             (qwen2_moe), SkyworkForCausalLM (skywork_moe / skywork), Qwen3MoeForCausalLM \
             (qwen3_moe), OlmoeForCausalLM (olmoe), DeepseekV2ForCausalLM (deepseek_v2), \
             DeepseekV3ForCausalLM (deepseek_v3); GGUF: general.architecture = llama, \
             qwen3moe, olmoe, deepseek2"
        );
    }

    #[test]
    fn gguf_llama_files_are_llama_or_mixtral() {
        assert_eq!(for_gguf("llama", false), Some(Architecture::Llama));
        assert_eq!(for_gguf("llama", true), Some(Architecture::Mixtral));
        assert_eq!(for_gguf("gpt2", false), None);
        assert_eq!(for_gguf("qwen3moe", true), Some(Architecture::Qwen3Moe));
        assert_eq!(for_gguf("olmoe", true), Some(Architecture::Olmoe));
        assert_eq!(for_gguf("deepseek2", true), Some(Architecture::DeepseekV2));
    }
}
