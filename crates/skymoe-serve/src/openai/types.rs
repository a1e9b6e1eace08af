//! The JSON shapes of the OpenAI API: requests as clients send them, responses and stream
//! chunks as clients expect them.

use serde::{Deserialize, Serialize};

use super::error::ApiError;

/// `prompt`: a string, an array of token ids, or a one-element array of either.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum PromptInput {
    /// Text.
    Text(String),
    /// Token ids.
    Tokens(Vec<u32>),
    /// Several texts (only one is accepted).
    Texts(Vec<String>),
    /// Several token-id arrays (only one is accepted).
    TokenLists(Vec<Vec<u32>>),
}

/// A prompt after unwrapping the one-element array forms.
#[derive(Debug, Clone, PartialEq)]
pub enum Prompt {
    /// Text to tokenise.
    Text(String),
    /// Token ids used as they are.
    Tokens(Vec<u32>),
}

impl PromptInput {
    /// The single prompt, or a 400 when there are none or several.
    pub fn single(self) -> Result<Prompt, ApiError> {
        let many = |n: usize| {
            ApiError::unsupported(
                "prompt",
                format!("exactly one prompt per request is supported, got {n}"),
            )
        };
        match self {
            PromptInput::Text(s) => Ok(Prompt::Text(s)),
            PromptInput::Tokens(t) => Ok(Prompt::Tokens(t)),
            PromptInput::Texts(mut v) if v.len() == 1 => Ok(Prompt::Text(v.remove(0))),
            PromptInput::Texts(v) => Err(many(v.len())),
            PromptInput::TokenLists(mut v) if v.len() == 1 => Ok(Prompt::Tokens(v.remove(0))),
            PromptInput::TokenLists(v) => Err(many(v.len())),
        }
    }
}

/// `stop`: one string or a list of them.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum StopInput {
    /// One stop string.
    One(String),
    /// Several.
    Many(Vec<String>),
}

impl StopInput {
    /// The non-empty stop strings.
    pub fn into_vec(self) -> Vec<String> {
        let v = match self {
            StopInput::One(s) => vec![s],
            StopInput::Many(v) => v,
        };
        v.into_iter().filter(|s| !s.is_empty()).collect()
    }
}

/// `seed`: any JSON integer (negative seeds are reinterpreted as unsigned).
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(untagged)]
pub enum SeedInput {
    /// A non-negative seed.
    Unsigned(u64),
    /// A negative seed.
    Signed(i64),
}

impl SeedInput {
    /// The seed as 64 bits.
    pub fn as_u64(self) -> u64 {
        match self {
            SeedInput::Unsigned(u) => u,
            SeedInput::Signed(i) => i as u64,
        }
    }
}

/// `stream_options`.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct StreamOptions {
    /// Send a last chunk with the token counts.
    #[serde(default)]
    pub include_usage: Option<bool>,
}

/// The request fields shared by completions and chat completions.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct CommonParams {
    /// The model to use; must be the served model's id.
    #[serde(default)]
    pub model: Option<String>,
    /// Most tokens to generate.
    #[serde(default)]
    pub max_tokens: Option<i64>,
    /// Most tokens to generate (the newer chat name).
    #[serde(default)]
    pub max_completion_tokens: Option<i64>,
    /// Sampling temperature (0 = greedy; default 1).
    #[serde(default)]
    pub temperature: Option<f64>,
    /// Nucleus sampling threshold.
    #[serde(default)]
    pub top_p: Option<f64>,
    /// Keep the k most likely tokens (0 or -1 = all).
    #[serde(default)]
    pub top_k: Option<i64>,
    /// Drop tokens less likely than `min_p` times the most likely one.
    #[serde(default)]
    pub min_p: Option<f64>,
    /// Multiplicative penalty on tokens already seen.
    #[serde(default)]
    pub repetition_penalty: Option<f64>,
    /// Additive penalty on tokens already generated.
    #[serde(default)]
    pub presence_penalty: Option<f64>,
    /// Penalty proportional to how often a token was generated.
    #[serde(default)]
    pub frequency_penalty: Option<f64>,
    /// Random seed for sampling.
    #[serde(default)]
    pub seed: Option<SeedInput>,
    /// Stop strings.
    #[serde(default)]
    pub stop: Option<StopInput>,
    /// Stream the answer by server-sent events.
    #[serde(default)]
    pub stream: Option<bool>,
    /// Streaming options.
    #[serde(default)]
    pub stream_options: Option<StreamOptions>,
    /// Number of choices (only 1).
    #[serde(default)]
    pub n: Option<i64>,
    /// Keep generating past end-of-sequence tokens.
    #[serde(default)]
    pub ignore_eos: Option<bool>,
}

/// The fields of `POST /v1/completions` beyond [`CommonParams`] (both are read from the
/// same JSON object).
#[derive(Debug, Clone, Default, Deserialize)]
pub struct CompletionRequest {
    /// The prompt.
    #[serde(default)]
    pub prompt: Option<PromptInput>,
    /// Return the prompt with the completion (unsupported).
    #[serde(default)]
    pub echo: Option<bool>,
    /// Server-side best-of sampling (only 1).
    #[serde(default)]
    pub best_of: Option<i64>,
    /// Log probabilities (unsupported).
    #[serde(default)]
    pub logprobs: Option<serde_json::Value>,
    /// Text after the insertion point (unsupported).
    #[serde(default)]
    pub suffix: Option<String>,
}

/// Chat message content: a string or an array of parts.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum ContentInput {
    /// Plain text.
    Text(String),
    /// Content parts; only `{"type": "text", "text": ...}` is supported.
    Parts(Vec<ContentPart>),
}

/// One part of a chat message's content.
#[derive(Debug, Clone, Deserialize)]
pub struct ContentPart {
    /// Part type.
    #[serde(rename = "type")]
    pub kind: String,
    /// The text of a `text` part.
    #[serde(default)]
    pub text: Option<String>,
}

/// One chat message as sent.
#[derive(Debug, Clone, Deserialize)]
pub struct MessageInput {
    /// `system`, `user`, `assistant`, ...
    pub role: String,
    /// Its content (may be null for an assistant message).
    #[serde(default)]
    pub content: Option<ContentInput>,
}

/// The fields of `POST /v1/chat/completions` beyond [`CommonParams`] (both are read from
/// the same JSON object).
#[derive(Debug, Clone, Default, Deserialize)]
pub struct ChatCompletionRequest {
    /// The conversation.
    #[serde(default)]
    pub messages: Option<Vec<MessageInput>>,
    /// Log probabilities (unsupported).
    #[serde(default)]
    pub logprobs: Option<bool>,
    /// Top log probabilities (unsupported).
    #[serde(default)]
    pub top_logprobs: Option<i64>,
    /// Tool definitions (unsupported).
    #[serde(default)]
    pub tools: Option<Vec<serde_json::Value>>,
}

/// Token counts in a response.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct UsageOut {
    /// Tokens in the prompt.
    pub prompt_tokens: usize,
    /// Tokens generated.
    pub completion_tokens: usize,
    /// Their sum.
    pub total_tokens: usize,
}

impl From<crate::engine::Usage> for UsageOut {
    fn from(u: crate::engine::Usage) -> Self {
        UsageOut {
            prompt_tokens: u.prompt_tokens,
            completion_tokens: u.completion_tokens,
            total_tokens: u.prompt_tokens + u.completion_tokens,
        }
    }
}

/// One choice of a text completion (or of a completion stream chunk).
#[derive(Debug, Clone, Serialize)]
pub struct CompletionChoice {
    /// Always 0.
    pub index: usize,
    /// The generated text (or this chunk's part of it).
    pub text: String,
    /// Always null.
    pub logprobs: Option<()>,
    /// `stop` or `length`; null in all but the last stream chunk.
    pub finish_reason: Option<&'static str>,
}

/// A text completion response or stream chunk (`object: "text_completion"`).
#[derive(Debug, Clone, Serialize)]
pub struct CompletionResponse {
    /// `cmpl-...`.
    pub id: String,
    /// `text_completion`.
    pub object: &'static str,
    /// Unix time of the request.
    pub created: u64,
    /// The model id.
    pub model: String,
    /// The choices (one, or none in the usage chunk).
    pub choices: Vec<CompletionChoice>,
    /// Token counts (non-streaming, or the last chunk with `include_usage`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<UsageOut>,
}

/// An assistant message in a chat response.
#[derive(Debug, Clone, Serialize)]
pub struct ChatMessageOut {
    /// `assistant`.
    pub role: &'static str,
    /// The generated text.
    pub content: String,
}

/// One choice of a chat completion.
#[derive(Debug, Clone, Serialize)]
pub struct ChatChoice {
    /// Always 0.
    pub index: usize,
    /// The answer.
    pub message: ChatMessageOut,
    /// Always null.
    pub logprobs: Option<()>,
    /// `stop` or `length`.
    pub finish_reason: &'static str,
}

/// A chat completion response (`object: "chat.completion"`).
#[derive(Debug, Clone, Serialize)]
pub struct ChatCompletionResponse {
    /// `chatcmpl-...`.
    pub id: String,
    /// `chat.completion`.
    pub object: &'static str,
    /// Unix time of the request.
    pub created: u64,
    /// The model id.
    pub model: String,
    /// The one choice.
    pub choices: Vec<ChatChoice>,
    /// Token counts.
    pub usage: UsageOut,
}

/// The change a chat stream chunk carries.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ChatDelta {
    /// `assistant` in the first chunk only.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub role: Option<&'static str>,
    /// New text.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
}

/// One choice of a chat stream chunk.
#[derive(Debug, Clone, Serialize)]
pub struct ChatChunkChoice {
    /// Always 0.
    pub index: usize,
    /// The change.
    pub delta: ChatDelta,
    /// Always null.
    pub logprobs: Option<()>,
    /// `stop` or `length` in the last chunk, else null.
    pub finish_reason: Option<&'static str>,
}

/// A chat stream chunk (`object: "chat.completion.chunk"`).
#[derive(Debug, Clone, Serialize)]
pub struct ChatCompletionChunk {
    /// `chatcmpl-...`, the same in every chunk.
    pub id: String,
    /// `chat.completion.chunk`.
    pub object: &'static str,
    /// Unix time of the request.
    pub created: u64,
    /// The model id.
    pub model: String,
    /// The choices (one, or none in the usage chunk).
    pub choices: Vec<ChatChunkChoice>,
    /// Token counts (the last chunk with `include_usage`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<UsageOut>,
}

/// One entry of `/v1/models`.
#[derive(Debug, Clone, Serialize)]
pub struct ModelCard {
    /// The model id clients pass as `model`.
    pub id: String,
    /// `model`.
    pub object: &'static str,
    /// Unix time the server started.
    pub created: u64,
    /// `skymoe`.
    pub owned_by: &'static str,
    /// The model's context length in tokens.
    pub max_model_len: usize,
}

/// `/v1/models`.
#[derive(Debug, Clone, Serialize)]
pub struct ModelList {
    /// `list`.
    pub object: &'static str,
    /// The served models (one).
    pub data: Vec<ModelCard>,
}
