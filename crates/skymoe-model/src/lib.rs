//! skymoe-model: Hugging Face and GGUF checkpoints of Llama, Mixtral, Qwen2-MoE and
//! Skywork-MoE, parsed into one [`config::ModelConfig`] and run by one [`model::CausalLm`].

pub mod config;
pub mod error;
pub mod families;
pub mod fsutil;
pub mod hub;
pub mod layers;
pub mod model;
pub mod names;
pub mod parallel;
pub mod params;
pub mod recompute;
pub mod sampling;
pub mod tokenizer;
pub mod weights;

pub use config::{Architecture, ModelConfig, MoeConfig, QkNorm, RouterConfig, ScoreFunction};
pub use error::{ModelError, Result};
pub use model::{CausalLm, KvCache};
pub use tokenizer::Tokenizer;
pub use weights::Checkpoint;
