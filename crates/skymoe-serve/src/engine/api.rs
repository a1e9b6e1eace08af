//! What callers of the engine see: requests, the events a request streams back, submission
//! errors and the engine's counters.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use skymoe_model::sampling::SamplingParams;
pub use skymoe_model::sampling::TokenLogprob;
use tokio::sync::mpsc;

use crate::constrained::Constraint;

/// One generation request, already tokenised.
#[derive(Debug, Clone)]
pub struct GenerationRequest {
    /// Prompt token ids (non-empty).
    pub prompt: Vec<u32>,
    /// How the next token is chosen (temperature, top-k/p, min-p, repetition penalty, seed).
    pub sampling: SamplingParams,
    /// Most tokens to generate.
    pub max_tokens: usize,
    /// Generation ends when the text produced contains one of these; the stop string itself
    /// is not returned.
    pub stop: Vec<String>,
    /// Keep generating past end-of-sequence tokens.
    pub ignore_eos: bool,
    /// Seed of the sampler (`None`: a fresh random seed).
    pub seed: Option<u64>,
    /// Report the log-probability of every generated token and of this many most likely
    /// alternatives (`None`: none).
    pub logprobs: Option<usize>,
    /// Report the log-probability of every prompt token after the first and of this many
    /// most likely alternatives (`None`: none). Only these requests have the logits of every
    /// prompt position computed.
    pub prompt_logprobs: Option<usize>,
    /// A grammar the generated text must follow (constrained decoding, compiled with the
    /// engine's [`crate::engine::EngineHandle::constraint_vocab`]). Each step samples only
    /// tokens it allows; the request ends (`Stop`) when the text is complete and nothing may
    /// follow, or at an end-of-sequence token even with `ignore_eos`. Log-probabilities are
    /// those of the masked logits. Each request needs its own state: clone it per choice.
    pub constraint: Option<Constraint>,
}

impl GenerationRequest {
    /// A greedy request for `max_tokens` tokens after `prompt`.
    pub fn greedy(prompt: Vec<u32>, max_tokens: usize) -> Self {
        GenerationRequest {
            prompt,
            sampling: SamplingParams::default(),
            max_tokens,
            stop: Vec::new(),
            ignore_eos: false,
            seed: None,
            logprobs: None,
            prompt_logprobs: None,
            constraint: None,
        }
    }
}

/// Why a request finished.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// An end-of-sequence token or a stop string.
    Stop,
    /// `max_tokens` reached, or the model's context is full.
    Length,
    /// The caller dropped its stream.
    Cancelled,
}

impl FinishReason {
    /// The OpenAI `finish_reason` string.
    pub fn as_openai(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length | FinishReason::Cancelled => "length",
        }
    }
}

/// Token counts of a finished request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Usage {
    /// Tokens in the prompt.
    pub prompt_tokens: usize,
    /// Tokens generated.
    pub completion_tokens: usize,
}

/// What a request streams back, in order: any number of deltas, then one `Finished` or
/// one `Failed`. With [`GenerationRequest::prompt_logprobs`], the first delta carries the
/// prompt's log-probabilities (and no text).
#[derive(Debug, Clone, PartialEq)]
pub enum GenerationEvent {
    /// Newly generated text (possibly empty when a token completes no character yet; text
    /// that might be the start of a stop string is held back until it is known not to be).
    Delta {
        /// The new text.
        text: String,
        /// The tokens generated since the previous delta.
        token_ids: Vec<u32>,
        /// With [`GenerationRequest::logprobs`]: one entry per token of `token_ids`.
        logprobs: Vec<TokenLogprob>,
        /// With [`GenerationRequest::prompt_logprobs`], in the first delta only: one entry per
        /// prompt token, `None` for the first (nothing precedes it).
        prompt_logprobs: Option<Vec<Option<TokenLogprob>>>,
    },
    /// The request ended normally.
    Finished {
        /// Why.
        reason: FinishReason,
        /// Token counts.
        usage: Usage,
    },
    /// The request could not be completed (an internal error).
    Failed {
        /// What went wrong.
        message: String,
    },
}

/// Why the engine refused a request.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SubmitError {
    /// As many requests are running or queued as the engine accepts.
    #[error("the server is at capacity ({limit} requests in flight); retry later")]
    Saturated {
        /// The limit in force.
        limit: usize,
    },
    /// Prompt plus `max_tokens` do not fit the model's context.
    #[error("the prompt has {prompt} tokens and asks for {max_tokens} more, but the model's context is {context} tokens")]
    TooLong {
        /// Prompt tokens.
        prompt: usize,
        /// Requested new tokens.
        max_tokens: usize,
        /// The model's context length.
        context: usize,
    },
    /// The request itself is invalid (empty prompt, out-of-vocabulary ids, bad sampling values).
    #[error("{0}")]
    Invalid(String),
    /// The engine is shutting down or has stopped.
    #[error("the engine is shutting down")]
    ShuttingDown,
}

/// Counters of a running engine (for `/metrics`).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct EngineStats {
    /// Requests accepted since start.
    pub requests_total: u64,
    /// Requests finished (any reason) since start.
    pub requests_finished: u64,
    /// Requests cancelled by their caller.
    pub requests_cancelled: u64,
    /// Requests in the running batch.
    pub running: usize,
    /// Requests waiting for a place in the batch.
    pub waiting: usize,
    /// Prompt tokens computed since start (those taken from the prefix cache are not).
    pub prompt_tokens_total: u64,
    /// Tokens generated since start.
    pub generated_tokens_total: u64,
    /// Generated tokens per second over the last few seconds.
    pub generation_tokens_per_s: f64,
    /// KV-cache blocks in use.
    pub kv_blocks_used: usize,
    /// KV-cache blocks in all.
    pub kv_blocks_total: usize,
    /// Times a running request was preempted because the KV cache was full.
    pub preemptions_total: u64,
    /// Prefix-cache lookups: prompt tokens and blocks queried and found.
    pub prefix_cache: crate::kv_cache::PrefixCacheStats,
    /// KV-cache blocks holding cached prefix contents (held by requests or free).
    pub prefix_cache_blocks: usize,
}

/// The receiving end of one request. Dropping it cancels the generation.
pub struct RequestStream {
    pub(crate) rx: mpsc::UnboundedReceiver<GenerationEvent>,
    pub(crate) cancelled: Arc<AtomicBool>,
}

impl RequestStream {
    /// The next event (async); `None` after the last one.
    pub async fn next(&mut self) -> Option<GenerationEvent> {
        self.rx.recv().await
    }

    /// The next event, blocking the thread (not for use inside an async runtime).
    pub fn blocking_next(&mut self) -> Option<GenerationEvent> {
        self.rx.blocking_recv()
    }

    /// Ask the engine to stop this generation (as dropping the stream does).
    pub fn cancel(&self) {
        self.cancelled.store(true, Ordering::Relaxed);
    }
}

impl Drop for RequestStream {
    fn drop(&mut self) {
        self.cancel();
    }
}
