//! The inference engine: a scheduler thread running continuous batches over a paged KV cache.

mod api;

pub use api::{
    EngineStats, FinishReason, GenerationEvent, GenerationRequest, RequestStream, SubmitError,
    Usage,
};
