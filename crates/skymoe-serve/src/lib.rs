//! Serving MoE language models: quantised weights with fused CPU kernels, a paged KV cache,
//! continuous batching, and an OpenAI-compatible HTTP API.

pub mod engine;
