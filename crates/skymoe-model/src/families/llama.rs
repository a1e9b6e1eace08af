//! Llama (`LlamaForCausalLM`): the dense block every other family builds on — GQA attention
//! with optional biases (`attention_bias`), a SwiGLU FFN in every layer. Also llama.cpp's
//! `llama` GGUF files without experts, and the dense Skywork-13B (handed over by Skywork).

use std::path::Path;

use serde_json::{Map, Value};

use super::{dense_model, Architecture, Family, GgufForm, NewExperts};
use crate::config::ModelConfig;
use crate::error::Result;

/// The Llama family.
#[derive(Debug, Clone, Copy)]
pub struct Llama;

impl Family for Llama {
    fn hf_class(&self) -> &'static str {
        "LlamaForCausalLM"
    }

    fn model_type(&self) -> &'static str {
        "llama"
    }

    fn read_hf_config(&self, _v: &Value, _origin: &Path, _c: &mut ModelConfig) -> Result<()> {
        // Every Llama key is a shared one.
        Ok(())
    }

    fn write_hf_config(&self, c: &ModelConfig, o: &mut Map<String, Value>) {
        o.insert("attention_bias".into(), c.qkv_bias.into());
        o.insert("mlp_bias".into(), false.into());
    }

    fn gguf(&self) -> Option<GgufForm> {
        Some(GgufForm {
            architecture: "llama",
            with_experts: false,
            permuted_qk: true,
        })
    }

    fn new_model(&self, dense: ModelConfig, _experts: &NewExperts) -> ModelConfig {
        dense_model(dense, Architecture::Llama)
    }
}
