//! Serving MoE language models: quantised weights with fused CPU kernels, a paged KV cache,
//! continuous batching, and an OpenAI-compatible HTTP API.

pub mod bench;
pub mod chat_template;
pub mod constrained;
pub mod engine;
pub mod error;
pub mod eval;
pub mod kv_cache;
pub mod model;
pub mod openai;
pub mod quantize;
pub mod stop;
pub mod tool_calls;
