//! The JSON shapes of the OpenAI API: requests as clients send them, responses and stream
//! chunks as clients expect them.

use serde::{Deserialize, Serialize};

use super::error::ApiError;

/// `prompt`: a string, an array of token ids, an array of strings or an array of token-id
/// arrays (one completion per prompt).
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum PromptInput {
    /// Text.
    Text(String),
    /// Token ids.
    Tokens(Vec<u32>),
    /// Several texts.
    Texts(Vec<String>),
    /// Several token-id arrays.
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
    /// The prompts, in order; a 400 when there are none (`[]`).
    pub fn into_prompts(self) -> Result<Vec<Prompt>, ApiError> {
        let prompts = match self {
            PromptInput::Text(s) => vec![Prompt::Text(s)],
            PromptInput::Tokens(t) if t.is_empty() => Vec::new(),
            PromptInput::Tokens(t) => vec![Prompt::Tokens(t)],
            PromptInput::Texts(v) => v.into_iter().map(Prompt::Text).collect(),
            PromptInput::TokenLists(v) => v.into_iter().map(Prompt::Tokens).collect(),
        };
        if prompts.is_empty() {
            return Err(ApiError::invalid_param(
                "prompt",
                "`prompt` is an empty list; send at least one prompt",
            ));
        }
        Ok(prompts)
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
    /// Number of choices per prompt.
    #[serde(default)]
    pub n: Option<i64>,
    /// Keep generating past end-of-sequence tokens.
    #[serde(default)]
    pub ignore_eos: Option<bool>,
    /// Token id (as a string) → bias in [−100, 100] added to its logit.
    #[serde(default)]
    pub logit_bias: Option<std::collections::BTreeMap<String, f64>>,
}

/// The fields of `POST /v1/completions` beyond [`CommonParams`] (both are read from the
/// same JSON object).
#[derive(Debug, Clone, Default, Deserialize)]
pub struct CompletionRequest {
    /// The prompt.
    #[serde(default)]
    pub prompt: Option<PromptInput>,
    /// Return the prompt before the completion.
    #[serde(default)]
    pub echo: Option<bool>,
    /// Server-side best-of sampling (only equal to `n`).
    #[serde(default)]
    pub best_of: Option<i64>,
    /// Log-probabilities of each token and of this many alternatives (0–20).
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
    /// The tool calls of an assistant message: `[{"id", "type": "function", "function":
    /// {"name", "arguments"}}]`, passed to the chat template.
    #[serde(default)]
    pub tool_calls: Option<Vec<serde_json::Value>>,
    /// The call a `tool` message answers.
    #[serde(default)]
    pub tool_call_id: Option<String>,
    /// The speaker's name (or, in a `tool` message, the function's).
    #[serde(default)]
    pub name: Option<String>,
}

/// The fields of `POST /v1/chat/completions` beyond [`CommonParams`] (both are read from
/// the same JSON object).
#[derive(Debug, Clone, Default, Deserialize)]
pub struct ChatCompletionRequest {
    /// The conversation.
    #[serde(default)]
    pub messages: Option<Vec<MessageInput>>,
    /// Return the log-probability of each generated token.
    #[serde(default)]
    pub logprobs: Option<bool>,
    /// With `logprobs`: how many alternatives to return per token (0–20).
    #[serde(default)]
    pub top_logprobs: Option<i64>,
    /// Functions the model may call: `[{"type": "function", "function": {"name",
    /// "description", "parameters", "strict"}}]`.
    #[serde(default)]
    pub tools: Option<Vec<serde_json::Value>>,
    /// `"none"`, `"auto"`, `"required"` or `{"type": "function", "function": {"name"}}`.
    #[serde(default)]
    pub tool_choice: Option<serde_json::Value>,
    /// Whether the model may call several tools in one turn (accepted; calls are never
    /// limited).
    #[serde(default)]
    pub parallel_tool_calls: Option<bool>,
    /// `{"type": "text"}`, `{"type": "json_object"}` or `{"type": "json_schema",
    /// "json_schema": {"name", "schema", "strict"}}`.
    #[serde(default)]
    pub response_format: Option<serde_json::Value>,
    /// Further variables for the chat template (vLLM's `chat_template_kwargs`), e.g.
    /// `{"enable_thinking": false}` for Qwen3 or DeepSeek-V3.1.
    #[serde(default)]
    pub chat_template_kwargs: Option<serde_json::Map<String, serde_json::Value>>,
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

/// `top_logprobs` entries of a completion: token text → log-probability, most likely first
/// (a token text seen twice keeps its first, larger value).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TopLogprobs(pub Vec<(String, f32)>);

impl Serialize for TopLogprobs {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut seen = std::collections::HashSet::new();
        let mut m = s.serialize_map(None)?;
        for (k, v) in &self.0 {
            if seen.insert(k.as_str()) {
                m.serialize_entry(k, v)?;
            }
        }
        m.end()
    }
}

/// The `logprobs` object of a completion choice (the legacy OpenAI shape): parallel lists,
/// one entry per token.
#[derive(Debug, Clone, Default, Serialize)]
pub struct CompletionLogprobs {
    /// Each token's text.
    pub tokens: Vec<String>,
    /// Each token's log-probability (null for the first prompt token).
    pub token_logprobs: Vec<Option<f32>>,
    /// The most likely tokens at each position, with the token itself (null for the first
    /// prompt token).
    pub top_logprobs: Vec<Option<TopLogprobs>>,
    /// Where each token's text starts in the choice's text, in characters.
    pub text_offset: Vec<usize>,
}

/// One choice of a text completion (or of a completion stream chunk).
#[derive(Debug, Clone, Serialize)]
pub struct CompletionChoice {
    /// Prompt-major: prompt index × `n` + choice number.
    pub index: usize,
    /// The generated text (or this chunk's part of it).
    pub text: String,
    /// Log-probabilities when asked for, else null.
    pub logprobs: Option<CompletionLogprobs>,
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
    /// The choices (none in the usage chunk).
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
    /// The generated text (null when the message is only tool calls).
    pub content: Option<String>,
    /// The tool calls found in (or forced on) the output; absent when there are none.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub tool_calls: Vec<ToolCallOut>,
}

/// A function call in a response: `{"id", "type": "function", "function": {"name",
/// "arguments"}}`.
#[derive(Debug, Clone, Serialize)]
pub struct ToolCallOut {
    /// The call's id.
    pub id: String,
    /// `function`.
    #[serde(rename = "type")]
    pub kind: &'static str,
    /// The function and its arguments.
    pub function: FunctionCallOut,
}

/// The function of a [`ToolCallOut`].
#[derive(Debug, Clone, Serialize)]
pub struct FunctionCallOut {
    /// The function's name.
    pub name: String,
    /// Its arguments, as JSON text.
    pub arguments: String,
}

/// A piece of a tool call in a chat stream chunk, as OpenAI streams them: the first names
/// the call (`id`, `type`, `function.name`), later ones carry fragments of
/// `function.arguments`.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ToolCallDelta {
    /// The call's position in the message.
    pub index: usize,
    /// The call's id (first piece only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// `function` (first piece only).
    #[serde(rename = "type", skip_serializing_if = "Option::is_none")]
    pub kind: Option<&'static str>,
    /// The function's name and a fragment of its arguments.
    pub function: FunctionDelta,
}

/// The `function` of a [`ToolCallDelta`].
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct FunctionDelta {
    /// The function's name (first piece only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// The next fragment of the arguments' JSON text.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub arguments: Option<String>,
}

/// One alternative token in a chat completion's log-probabilities.
#[derive(Debug, Clone, Serialize)]
pub struct ChatTopLogprob {
    /// The token's text.
    pub token: String,
    /// Its log-probability.
    pub logprob: f32,
    /// The UTF-8 bytes of `token`.
    pub bytes: Vec<u8>,
}

/// One generated token in a chat completion's log-probabilities.
#[derive(Debug, Clone, Serialize)]
pub struct ChatTokenLogprob {
    /// The token's text.
    pub token: String,
    /// Its log-probability.
    pub logprob: f32,
    /// The UTF-8 bytes of `token`.
    pub bytes: Vec<u8>,
    /// The `top_logprobs` most likely tokens at this position, most likely first.
    pub top_logprobs: Vec<ChatTopLogprob>,
}

/// The `logprobs` object of a chat choice or chunk.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ChatLogprobs {
    /// One entry per generated token (of this chunk, when streaming).
    pub content: Vec<ChatTokenLogprob>,
}

/// One choice of a chat completion.
#[derive(Debug, Clone, Serialize)]
pub struct ChatChoice {
    /// The choice's number (0 to `n` − 1).
    pub index: usize,
    /// The answer.
    pub message: ChatMessageOut,
    /// Log-probabilities when asked for, else null.
    pub logprobs: Option<ChatLogprobs>,
    /// `stop`, `length` or `tool_calls`.
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
    /// The choices.
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
    /// Pieces of tool calls.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub tool_calls: Vec<ToolCallDelta>,
}

/// One choice of a chat stream chunk.
#[derive(Debug, Clone, Serialize)]
pub struct ChatChunkChoice {
    /// The choice's number (0 to `n` − 1).
    pub index: usize,
    /// The change.
    pub delta: ChatDelta,
    /// Log-probabilities of this chunk's tokens when asked for, else null.
    pub logprobs: Option<ChatLogprobs>,
    /// `stop`, `length` or `tool_calls` in the last chunk, else null.
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
    /// The choices (none in the usage chunk).
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

/// `POST /tokenize` (vLLM's shape): a `prompt`, or `messages` rendered by the chat template.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct TokenizeRequest {
    /// The model; when given, must be the served model's id.
    #[serde(default)]
    pub model: Option<String>,
    /// Text to tokenise.
    #[serde(default)]
    pub prompt: Option<String>,
    /// A conversation to render with the chat template and tokenise.
    #[serde(default)]
    pub messages: Option<Vec<MessageInput>>,
    /// With `messages`: the function tools shown to the model, as in a chat request.
    #[serde(default)]
    pub tools: Option<Vec<serde_json::Value>>,
    /// With `messages`: end with the assistant's turn opening (default true).
    #[serde(default)]
    pub add_generation_prompt: Option<bool>,
    /// With `messages`: further variables for the chat template, as in a chat request.
    #[serde(default)]
    pub chat_template_kwargs: Option<serde_json::Map<String, serde_json::Value>>,
    /// Add the tokenizer's special tokens (BOS); default true for `prompt`, false for
    /// `messages` (the template writes them).
    #[serde(default)]
    pub add_special_tokens: Option<bool>,
    /// Also return each token's vocabulary string.
    #[serde(default)]
    pub return_token_strs: Option<bool>,
}

/// The answer of `/tokenize`.
#[derive(Debug, Clone, Serialize)]
pub struct TokenizeResponse {
    /// Number of tokens.
    pub count: usize,
    /// The model's context length.
    pub max_model_len: usize,
    /// The token ids.
    pub tokens: Vec<u32>,
    /// Each token's vocabulary string (with `return_token_strs`), else null.
    pub token_strs: Option<Vec<String>>,
}

/// `POST /detokenize` (vLLM's shape).
#[derive(Debug, Clone, Default, Deserialize)]
pub struct DetokenizeRequest {
    /// The model; when given, must be the served model's id.
    #[serde(default)]
    pub model: Option<String>,
    /// The token ids to decode.
    #[serde(default)]
    pub tokens: Option<Vec<u32>>,
}

/// The answer of `/detokenize`.
#[derive(Debug, Clone, Serialize)]
pub struct DetokenizeResponse {
    /// The decoded text.
    pub prompt: String,
}
