//! The endpoints: request parsing and validation, submission to the engine, and the
//! responses (JSON or server-sent events).

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{MatchedPath, Path, Request, State};
use axum::http::{header, HeaderValue, Method, StatusCode, Uri};
use axum::middleware::Next;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures_util::Stream;
use rand::Rng;
use serde::de::DeserializeOwned;
use skymoe_model::sampling::SamplingParams;

use super::error::ApiError;
use super::metrics::{self, HttpCounters};
use super::types::*;
use crate::constrained::{ConstraintError, Grammar};
use crate::engine::{
    EngineHandle, FinishReason, GenerationEvent, GenerationRequest, RequestStream, TokenLogprob,
    Usage,
};
use crate::tool_calls::{
    parse_required_output, parse_tool_calls, parse_tool_choice, parse_tools, tools_system_prompt,
    ToolCall, ToolCallFormat, ToolCallParser, ToolChoice, ToolError, ToolStreamEvent,
};
use futures_util::StreamExt;
use skymoe_model::Tokenizer;

/// What every handler shares.
pub(crate) struct AppState {
    pub(crate) engine: EngineHandle,
    pub(crate) api_key: Option<String>,
    pub(crate) http: HttpCounters,
    pub(crate) started: u64,
}

type St = State<Arc<AppState>>;

/// Seconds since the Unix epoch.
pub(crate) fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn new_id(prefix: &str) -> String {
    let n: u128 = rand::rng().random();
    format!("{prefix}-{:024x}", n & ((1u128 << 96) - 1))
}

// ---------------------------------------------------------------------------------------
// Middleware and fallbacks

/// Count and log every response (outermost layer, so 404/405/413 are counted too).
pub(crate) async fn track(State(st): St, req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|m| m.as_str().to_string())
        .unwrap_or_else(|| "unmatched".to_string());
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let t0 = Instant::now();
    let resp = next.run(req).await;
    let status = resp.status();
    st.http.record(&route, status.as_u16());
    tracing::debug!(
        %method,
        path,
        status = status.as_u16(),
        elapsed_ms = t0.elapsed().as_millis() as u64,
        "http response"
    );
    resp
}

/// Compare two byte strings in time that does not depend on where they differ.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Require `Authorization: Bearer <key>` when the server has an API key.
pub(crate) async fn require_api_key(State(st): St, req: Request, next: Next) -> Response {
    if let Some(key) = &st.api_key {
        let given = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .map(str::trim);
        let token = given.and_then(|v| {
            let (scheme, rest) = v.split_once(' ')?;
            scheme.eq_ignore_ascii_case("bearer").then(|| rest.trim())
        });
        match token {
            None => {
                return ApiError::unauthorized(
                    "missing API key: send the header `Authorization: Bearer <key>`",
                )
                .into_response()
            }
            Some(t) if !constant_time_eq(t.as_bytes(), key.as_bytes()) => {
                return ApiError::unauthorized("incorrect API key").into_response()
            }
            Some(_) => {}
        }
    }
    next.run(req).await
}

/// 404 for any path that is not a route.
pub(crate) async fn not_found(method: Method, uri: Uri) -> ApiError {
    ApiError::not_found(format!("no such endpoint: {method} {}", uri.path()))
}

/// 405 for a route called with the wrong method.
pub(crate) async fn method_not_allowed(method: Method, uri: Uri) -> ApiError {
    ApiError::method_not_allowed(format!("method {method} is not allowed on {}", uri.path()))
}

// ---------------------------------------------------------------------------------------
// Small endpoints

/// `GET /health`.
pub(crate) async fn health() -> impl IntoResponse {
    Json(serde_json::json!({ "status": "ok" }))
}

/// `GET /metrics`.
pub(crate) async fn metrics(State(st): St) -> impl IntoResponse {
    let body = metrics::render(
        st.engine.model_id(),
        &st.engine.stats(),
        &st.http.snapshot(),
    );
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
        )],
        body,
    )
}

fn model_card(st: &AppState) -> ModelCard {
    ModelCard {
        id: st.engine.model_id().to_string(),
        object: "model",
        created: st.started,
        owned_by: "skymoe",
        max_model_len: st.engine.context_length(),
    }
}

/// `GET /v1/models`.
pub(crate) async fn list_models(State(st): St) -> impl IntoResponse {
    Json(ModelList {
        object: "list",
        data: vec![model_card(&st)],
    })
}

/// `GET /v1/models/{id}`.
pub(crate) async fn get_model(State(st): St, Path(id): Path<String>) -> Response {
    if id == st.engine.model_id() {
        Json(model_card(&st)).into_response()
    } else {
        ApiError {
            code: Some("model_not_found"),
            ..ApiError::not_found(format!("the model `{id}` does not exist"))
        }
        .into_response()
    }
}

// ---------------------------------------------------------------------------------------
// Request parsing

/// The body as a JSON object, or the right error (413 too large, 400 malformed).
fn parse_body(body: Result<Bytes, BytesRejection>) -> Result<serde_json::Value, ApiError> {
    let bytes = body.map_err(|r| {
        let status = r.status();
        ApiError {
            status,
            message: if status == StatusCode::PAYLOAD_TOO_LARGE {
                "the request body is too large".to_string()
            } else {
                r.body_text()
            },
            kind: "invalid_request_error",
            param: None,
            code: (status == StatusCode::PAYLOAD_TOO_LARGE).then_some("request_too_large"),
        }
    })?;
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Err(ApiError::bad_request(
            "the request body is empty; expected a JSON object",
        ));
    }
    let value: serde_json::Value = serde_json::from_slice(&bytes)
        .map_err(|e| ApiError::bad_request(format!("the request body is not valid JSON: {e}")))?;
    if !value.is_object() {
        return Err(ApiError::bad_request(
            "the request body must be a JSON object",
        ));
    }
    Ok(value)
}

/// A hint for fields whose error from serde would be unhelpful (untagged enums).
fn field_hint(param: &str) -> Option<&'static str> {
    let top = param.split(['.', '[']).next().unwrap_or(param);
    match top {
        "prompt" => Some(
            "must be a string, an array of strings, an array of token ids or an array of \
             token-id arrays",
        ),
        "stop" => Some("must be a string or an array of strings"),
        "seed" => Some("must be an integer"),
        "messages" if param.ends_with(".content") => {
            Some("must be a string or an array of content parts")
        }
        _ => None,
    }
}

/// Read typed fields from the request object; type errors name the field.
fn fields<T: DeserializeOwned>(value: &serde_json::Value) -> Result<T, ApiError> {
    serde_path_to_error::deserialize(value).map_err(|e| {
        let param = e.path().to_string();
        let inner = e.into_inner().to_string();
        let untagged = inner.contains("did not match any variant");
        match (param.as_str(), field_hint(&param)) {
            (".", _) => ApiError::bad_request(format!("invalid request: {inner}")),
            (p, Some(h)) if untagged => ApiError::invalid_param(p, format!("`{p}` {h}")),
            (p, _) => ApiError::invalid_param(p, format!("invalid `{p}`: {inner}")),
        }
    })
}

fn check_model(st: &AppState, common: &CommonParams) -> Result<(), ApiError> {
    match common.model.as_deref() {
        None => Err(ApiError::invalid_param(
            "model",
            "the field `model` is required",
        )),
        Some(m) if m == st.engine.model_id() => Ok(()),
        Some(m) => Err(ApiError {
            code: Some("model_not_found"),
            ..ApiError::invalid_param(
                "model",
                format!(
                    "the model `{m}` does not exist; this server serves `{}`",
                    st.engine.model_id()
                ),
            )
        }),
    }
}

/// Most alternatives a request may ask for per token (`logprobs`, `top_logprobs`), as vLLM's
/// default `max_logprobs`.
const MAX_LOGPROBS: i64 = 20;

/// `model` when a request may leave it out (`/tokenize`, `/detokenize`).
fn check_optional_model(st: &AppState, model: Option<&str>) -> Result<(), ApiError> {
    match model {
        None => Ok(()),
        Some(m) => check_model(
            st,
            &CommonParams {
                model: Some(m.to_string()),
                ..CommonParams::default()
            },
        ),
    }
}

/// Choices per prompt (`n`, default 1).
fn choices_per_prompt(common: &CommonParams) -> Result<usize, ApiError> {
    match common.n {
        None => Ok(1),
        Some(n) if n >= 1 => Ok(usize::try_from(n).unwrap_or(usize::MAX)),
        Some(n) => Err(ApiError::invalid_param(
            "n",
            format!("`n` must be ≥ 1, got {n}"),
        )),
    }
}

/// `logit_bias`, checked against the vocabulary.
fn logit_bias(common: &CommonParams, vocab: usize) -> Result<Vec<(u32, f32)>, ApiError> {
    let Some(map) = &common.logit_bias else {
        return Ok(Vec::new());
    };
    let mut out = Vec::with_capacity(map.len());
    for (key, &bias) in map {
        let id: u32 = key.trim().parse().map_err(|_| {
            ApiError::invalid_param(
                "logit_bias",
                format!("`logit_bias` keys must be token ids, got {key:?}"),
            )
        })?;
        if id as usize >= vocab {
            return Err(ApiError::invalid_param(
                "logit_bias",
                format!("`logit_bias` token id {id} is out of range for a vocabulary of {vocab}"),
            ));
        }
        if !(-100.0..=100.0).contains(&bias) {
            return Err(ApiError::invalid_param(
                "logit_bias",
                format!("`logit_bias` values must be in [-100, 100], got {bias} for token {id}"),
            ));
        }
        out.push((id, bias as f32));
    }
    Ok(out)
}

/// Sampling settings from the request, checked.
fn sampling(common: &CommonParams, vocab: usize) -> Result<SamplingParams, ApiError> {
    fn num(
        v: Option<f64>,
        default: f64,
        param: &str,
        ok: impl Fn(f64) -> bool,
        rule: &str,
    ) -> Result<f32, ApiError> {
        let x = v.unwrap_or(default);
        if !x.is_finite() || !(x as f32).is_finite() || !ok(x) {
            return Err(ApiError::invalid_param(
                param,
                format!("`{param}` must be {rule}, got {x}"),
            ));
        }
        Ok(x as f32)
    }
    let temperature = num(common.temperature, 1.0, "temperature", |t| t >= 0.0, "≥ 0")?;
    let top_p = num(
        common.top_p,
        1.0,
        "top_p",
        |p| p > 0.0 && p <= 1.0,
        "in (0, 1]",
    )?;
    let min_p = num(
        common.min_p,
        0.0,
        "min_p",
        |p| (0.0..=1.0).contains(&p),
        "in [0, 1]",
    )?;
    let repetition_penalty = num(
        common.repetition_penalty,
        1.0,
        "repetition_penalty",
        |p| p > 0.0,
        "> 0",
    )?;
    let presence_penalty = num(
        common.presence_penalty,
        0.0,
        "presence_penalty",
        |p| (-2.0..=2.0).contains(&p),
        "in [-2, 2]",
    )?;
    let frequency_penalty = num(
        common.frequency_penalty,
        0.0,
        "frequency_penalty",
        |p| (-2.0..=2.0).contains(&p),
        "in [-2, 2]",
    )?;
    let top_k = match common.top_k.unwrap_or(0) {
        k if (-1..=0).contains(&k) => 0,
        k if k > 0 => usize::try_from(k).unwrap_or(usize::MAX),
        k => {
            return Err(ApiError::invalid_param(
                "top_k",
                format!("`top_k` must be ≥ 1, or 0 or -1 for no limit, got {k}"),
            ))
        }
    };
    let logit_bias = logit_bias(common, vocab)?;
    // Any fields SamplingParams gains later keep their defaults.
    #[allow(clippy::needless_update)]
    let params = SamplingParams {
        temperature,
        top_k,
        top_p,
        min_p,
        repetition_penalty,
        presence_penalty,
        frequency_penalty,
        logit_bias,
        ..SamplingParams::default()
    };
    params.validate().map_err(ApiError::bad_request)?;
    Ok(params)
}

/// Build the engine request from a tokenised prompt and the shared fields. `max_tokens` 0
/// is accepted only when `allow_zero` (an echo that only scores the prompt).
fn generation_request(
    st: &AppState,
    common: &CommonParams,
    prompt: Vec<u32>,
    prompt_param: &str,
    default_max_tokens: Option<usize>,
    allow_zero: bool,
) -> Result<GenerationRequest, ApiError> {
    let sampling = sampling(common, st.engine.vocab_size())?;
    if prompt.is_empty() {
        return Err(ApiError::invalid_param(
            prompt_param,
            "the prompt is empty (it encodes to no tokens)",
        ));
    }
    let context = st.engine.context_length();
    if prompt.len() >= context {
        return Err(ApiError {
            code: Some("context_length_exceeded"),
            ..ApiError::invalid_param(
                prompt_param,
                format!(
                    "the prompt has {} tokens but the model's context is {context} tokens",
                    prompt.len()
                ),
            )
        });
    }
    let room = context - prompt.len();
    let (requested, param) = match (common.max_completion_tokens, common.max_tokens) {
        (Some(m), _) => (Some(m), "max_completion_tokens"),
        (None, m) => (m, "max_tokens"),
    };
    let least = if allow_zero { 0 } else { 1 };
    let max_tokens = match requested {
        Some(m) if m < least => {
            return Err(ApiError::invalid_param(
                param,
                format!("`{param}` must be ≥ {least}, got {m}"),
            ))
        }
        Some(m) => {
            let m = usize::try_from(m).unwrap_or(usize::MAX);
            if m > room {
                return Err(ApiError {
                    code: Some("context_length_exceeded"),
                    ..ApiError::invalid_param(
                        param,
                        format!(
                            "the prompt has {} tokens and asks for {m} more, but the model's \
                             context is {context} tokens",
                            prompt.len()
                        ),
                    )
                });
            }
            m
        }
        None => default_max_tokens.unwrap_or(room).min(room),
    };
    let stop = common
        .stop
        .clone()
        .map(StopInput::into_vec)
        .unwrap_or_default();
    Ok(GenerationRequest {
        prompt,
        sampling,
        max_tokens,
        stop,
        ignore_eos: common.ignore_eos.unwrap_or(false),
        seed: common.seed.map(SeedInput::as_u64),
        logprobs: None,
        prompt_logprobs: None,
        constraint: None,
    })
}

/// The `n` copies of `req` (choice `j` samples with seed + `j`), after checking that they
/// fit the engine together: at most `--max-queue` sequences in all (`total` counts every
/// prompt's), and the `n` sequences of one prompt in the KV cache at once.
fn fan_out(
    st: &AppState,
    req: GenerationRequest,
    n: usize,
    total: usize,
) -> Result<Vec<GenerationRequest>, ApiError> {
    let queue = st.engine.max_queue();
    if total > queue {
        return Err(ApiError::invalid_param(
            "n",
            format!(
                "the request asks for {total} sequences (prompts × `n`) but the server runs at \
                 most {queue} at a time"
            ),
        ));
    }
    let per_seq = req.prompt.len() + req.max_tokens.max(1);
    let capacity = st.engine.kv_capacity();
    if per_seq.saturating_mul(n) > capacity {
        return Err(ApiError {
            code: Some("context_length_exceeded"),
            ..ApiError::invalid_param(
                "n",
                format!(
                    "`n` = {n} sequences of {per_seq} positions (prompt + `max_tokens`) need \
                     {} positions, more than the KV cache's {capacity}",
                    per_seq.saturating_mul(n)
                ),
            )
        });
    }
    Ok((0..n)
        .map(|j| GenerationRequest {
            seed: req.seed.map(|s| s.wrapping_add(j as u64)),
            ..req.clone()
        })
        .collect())
}

/// Run a tokenizer (or template) job off the async threads.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ApiError::internal(format!("tokenizer task failed: {e}")))?
}

// ---------------------------------------------------------------------------------------
// Log-probabilities in the API's shapes

/// A token's text as the log-probability lists show it (special tokens included).
fn token_text(tok: &Tokenizer, id: u32) -> String {
    tok.inner().decode(&[id], false).unwrap_or_default()
}

/// JSON has no −∞: very unlikely tokens are reported at −9999 (as vLLM does).
fn finite_logprob(lp: f32) -> f32 {
    if lp.is_nan() {
        -9999.0
    } else {
        lp.max(-9999.0)
    }
}

/// Append one token to a completion's `logprobs` (`lp` is `None` for the first prompt
/// token); `offset` is where the token's text starts, in characters, and moves past it.
fn push_completion_logprob(
    out: &mut CompletionLogprobs,
    tok: &Tokenizer,
    offset: &mut usize,
    id: u32,
    lp: Option<&TokenLogprob>,
) {
    let text = token_text(tok, id);
    out.text_offset.push(*offset);
    *offset += text.chars().count();
    out.tokens.push(text);
    out.token_logprobs
        .push(lp.map(|l| finite_logprob(l.logprob)));
    out.top_logprobs.push(lp.map(|l| {
        let mut top: Vec<(String, f32)> = l
            .top
            .iter()
            .map(|&(t, v)| (token_text(tok, t), finite_logprob(v)))
            .collect();
        if !l.top.iter().any(|&(t, _)| t == l.token) {
            top.push((token_text(tok, l.token), finite_logprob(l.logprob)));
        }
        TopLogprobs(top)
    }));
}

/// One generated token in the chat shape.
fn chat_logprob(tok: &Tokenizer, lp: &TokenLogprob) -> ChatTokenLogprob {
    let token = token_text(tok, lp.token);
    ChatTokenLogprob {
        bytes: token.as_bytes().to_vec(),
        token,
        logprob: finite_logprob(lp.logprob),
        top_logprobs: lp
            .top
            .iter()
            .map(|&(t, v)| {
                let token = token_text(tok, t);
                ChatTopLogprob {
                    bytes: token.as_bytes().to_vec(),
                    token,
                    logprob: finite_logprob(v),
                }
            })
            .collect(),
    }
}

// ---------------------------------------------------------------------------------------
// Generation endpoints

/// Which kind of response a generation produces.
#[derive(Clone)]
struct Shape {
    chat: bool,
    id: String,
    created: u64,
    model: String,
    /// Choices per prompt.
    n: usize,
    /// Whether the response carries log-probabilities.
    logprobs: bool,
    /// How a chat answer's text becomes its message (tool calls).
    tools: ToolMode,
    /// Whether the answer is streamed.
    stream: bool,
}

impl Shape {
    fn new(st: &AppState, chat: bool, n: usize, logprobs: bool) -> Self {
        Shape {
            chat,
            id: new_id(if chat { "chatcmpl" } else { "cmpl" }),
            created: unix_now(),
            model: st.engine.model_id().to_string(),
            n,
            logprobs,
            tools: ToolMode::Text,
            stream: false,
        }
    }
}

/// How the text of a chat answer becomes its message.
#[derive(Clone, Debug, PartialEq)]
enum ToolMode {
    /// Plain text (no tools, or `tool_choice: "none"`).
    Text,
    /// Text in which tool calls written in the family's format are found
    /// (`tool_choice: "auto"`).
    Auto(ToolCallFormat),
    /// A JSON array of `{"name", "parameters"}`, enforced (`tool_choice: "required"`).
    Required(ToolCallFormat),
    /// The named function's arguments, enforced.
    Named {
        /// The format whose call ids are used.
        format: ToolCallFormat,
        /// The function.
        name: String,
    },
}

/// One choice's tool calls while its text streams.
enum ToolStream {
    /// Calls found by a parser (`auto` and `required`).
    Parser(ToolCallParser),
    /// The whole text is the arguments of one call to `name`.
    Named {
        name: String,
        id: String,
        started: bool,
    },
}

impl ToolStream {
    fn new(mode: &ToolMode) -> Option<Self> {
        match mode {
            ToolMode::Text => None,
            ToolMode::Auto(f) => Some(ToolStream::Parser(ToolCallParser::new(*f))),
            ToolMode::Required(f) => Some(ToolStream::Parser(ToolCallParser::required(*f))),
            ToolMode::Named { format, name } => Some(ToolStream::Named {
                name: name.clone(),
                id: format.new_call_id(),
                started: false,
            }),
        }
    }

    /// The content and tool-call pieces `text` adds (`last`: the text is over).
    fn push(&mut self, text: &str, last: bool) -> (String, Vec<ToolCallDelta>) {
        match self {
            ToolStream::Parser(p) => {
                let mut events = p.push(text);
                if last {
                    events.extend(p.finish());
                }
                stream_deltas(events)
            }
            ToolStream::Named { name, id, started } => {
                let mut out = Vec::new();
                if !*started {
                    *started = true;
                    out.push(ToolCallDelta {
                        index: 0,
                        id: Some(id.clone()),
                        kind: Some("function"),
                        function: FunctionDelta {
                            name: Some(name.clone()),
                            arguments: Some(String::new()),
                        },
                    });
                }
                if !text.is_empty() {
                    out.push(argument_delta(0, text.to_string()));
                }
                (String::new(), out)
            }
        }
    }
}

fn argument_delta(index: usize, fragment: String) -> ToolCallDelta {
    ToolCallDelta {
        index,
        id: None,
        kind: None,
        function: FunctionDelta {
            name: None,
            arguments: Some(fragment),
        },
    }
}

/// Parser events as OpenAI's stream pieces: content text, and per call a first piece with
/// its id and name, then fragments of its arguments (consecutive ones merged).
fn stream_deltas(events: Vec<ToolStreamEvent>) -> (String, Vec<ToolCallDelta>) {
    let mut content = String::new();
    let mut out: Vec<ToolCallDelta> = Vec::new();
    for e in events {
        match e {
            ToolStreamEvent::Content(t) => content.push_str(&t),
            ToolStreamEvent::ToolCallStart { index, id, name } => out.push(ToolCallDelta {
                index,
                id: Some(id),
                kind: Some("function"),
                function: FunctionDelta {
                    name: Some(name),
                    arguments: Some(String::new()),
                },
            }),
            ToolStreamEvent::ToolCallArguments { index, fragment } => match out.last_mut() {
                Some(d) if d.index == index && d.id.is_none() => {
                    if let Some(a) = d.function.arguments.as_mut() {
                        a.push_str(&fragment);
                    }
                }
                _ => out.push(argument_delta(index, fragment)),
            },
        }
    }
    (content, out)
}

/// A whole chat answer as its message: (content, tool calls, finish reason). A message with
/// calls that ended normally finishes with `tool_calls`; output that does not hold the calls
/// its mode asks for (cut short by `max_tokens`) stays text.
fn finish_message(
    mode: &ToolMode,
    text: String,
    reason: &'static str,
) -> (Option<String>, Vec<ToolCallOut>, &'static str) {
    let out = |calls: Vec<ToolCall>| -> Vec<ToolCallOut> {
        calls
            .into_iter()
            .map(|c| ToolCallOut {
                id: c.id,
                kind: "function",
                function: FunctionCallOut {
                    name: c.name,
                    arguments: c.arguments,
                },
            })
            .collect()
    };
    let called = |r: &'static str| if r == "stop" { "tool_calls" } else { r };
    match mode {
        ToolMode::Text => (Some(text), Vec::new(), reason),
        ToolMode::Auto(format) => {
            let parsed = parse_tool_calls(*format, &text);
            if parsed.tool_calls.is_empty() {
                (Some(text), Vec::new(), reason)
            } else {
                (parsed.content, out(parsed.tool_calls), called(reason))
            }
        }
        ToolMode::Required(format) => match parse_required_output(&text, *format) {
            Some(calls) if !calls.is_empty() => (None, out(calls), called(reason)),
            _ => (Some(text), Vec::new(), reason),
        },
        ToolMode::Named { format, name } => (
            None,
            out(vec![ToolCall {
                id: format.new_call_id(),
                name: name.clone(),
                arguments: text,
            }]),
            called(reason),
        ),
    }
}

/// What one choice of a completion echoes before its text.
struct Echo {
    /// The prompt as text.
    text: String,
    /// The prompt's token ids (for its log-probabilities).
    ids: Vec<u32>,
}

/// A piece of one choice's answer: its text and the log-probabilities of its tokens.
#[derive(Default)]
struct Piece {
    text: String,
    completion: Option<CompletionLogprobs>,
    chat: Option<ChatLogprobs>,
    /// Pieces of tool calls (streamed chat answers with tools).
    tool_calls: Vec<ToolCallDelta>,
}

impl Piece {
    fn is_empty(&self) -> bool {
        self.text.is_empty()
            && self.tool_calls.is_empty()
            && self.completion.as_ref().is_none_or(|c| c.tokens.is_empty())
            && self.chat.as_ref().is_none_or(|c| c.content.is_empty())
    }
}

/// One choice while its events arrive.
struct ChoiceState {
    /// Still to echo (completions with `echo`).
    echo: Option<Echo>,
    /// Characters of the choice's text so far (for `text_offset`).
    offset: usize,
    /// The whole answer so far (non-streaming).
    acc: Piece,
    finished: Option<(FinishReason, Usage)>,
    /// Tool calls of a streamed chat answer with tools.
    tools: Option<ToolStream>,
    /// Whether a tool call was streamed.
    called: bool,
}

impl ChoiceState {
    fn new(echo: Option<Echo>, shape: &Shape) -> Self {
        ChoiceState {
            echo,
            offset: 0,
            acc: Piece {
                text: String::new(),
                completion: (shape.logprobs && !shape.chat).then(CompletionLogprobs::default),
                chat: (shape.logprobs && shape.chat).then(ChatLogprobs::default),
                tool_calls: Vec::new(),
            },
            finished: None,
            tools: if shape.chat && shape.stream {
                ToolStream::new(&shape.tools)
            } else {
                None
            },
            called: false,
        }
    }

    /// The echoed prompt, with its log-probabilities when they are given (the first is null).
    fn echo_piece(
        &mut self,
        tok: &Tokenizer,
        shape: &Shape,
        prompt_lps: Option<&[Option<TokenLogprob>]>,
    ) -> Option<Piece> {
        let echo = self.echo.take()?;
        let completion = shape.logprobs.then(|| {
            let mut out = CompletionLogprobs::default();
            let mut offset = self.offset;
            for (k, &id) in echo.ids.iter().enumerate() {
                let lp = prompt_lps.and_then(|l| l.get(k)).and_then(Option::as_ref);
                push_completion_logprob(&mut out, tok, &mut offset, id, lp);
            }
            out
        });
        self.offset += echo.text.chars().count();
        Some(Piece {
            text: echo.text,
            completion,
            chat: None,
            tool_calls: Vec::new(),
        })
    }

    /// The piece a delta adds.
    fn delta_piece(
        &mut self,
        tok: &Tokenizer,
        shape: &Shape,
        text: String,
        token_ids: &[u32],
        logprobs: &[TokenLogprob],
    ) -> Piece {
        let mut piece = Piece::default();
        if shape.logprobs {
            if shape.chat {
                piece.chat = Some(ChatLogprobs {
                    content: logprobs.iter().map(|l| chat_logprob(tok, l)).collect(),
                });
            } else {
                let mut out = CompletionLogprobs::default();
                let mut offset = self.offset;
                for (&id, lp) in token_ids.iter().zip(logprobs) {
                    push_completion_logprob(&mut out, tok, &mut offset, id, Some(lp));
                }
                piece.completion = Some(out);
            }
        }
        self.offset += text.chars().count();
        match self.tools.as_mut() {
            Some(t) => {
                let (content, calls) = t.push(&text, false);
                self.called |= !calls.is_empty();
                piece.text = content;
                piece.tool_calls = calls;
            }
            None => piece.text = text,
        }
        piece
    }

    /// What the streamed tool calls held back when the answer ends.
    fn tool_tail(&mut self) -> Option<Piece> {
        let (text, tool_calls) = self.tools.as_mut()?.push("", true);
        self.called |= !tool_calls.is_empty();
        let p = Piece {
            text,
            tool_calls,
            ..Piece::default()
        };
        (!p.is_empty()).then_some(p)
    }

    /// Add a piece to the whole answer.
    fn accumulate(&mut self, p: Piece) {
        self.acc.text.push_str(&p.text);
        if let (Some(acc), Some(c)) = (self.acc.completion.as_mut(), p.completion) {
            acc.tokens.extend(c.tokens);
            acc.token_logprobs.extend(c.token_logprobs);
            acc.top_logprobs.extend(c.top_logprobs);
            acc.text_offset.extend(c.text_offset);
        }
        if let (Some(acc), Some(c)) = (self.acc.chat.as_mut(), p.chat) {
            acc.content.extend(c.content);
        }
    }
}

/// What the event loop reports to its consumer.
enum Step {
    /// A piece of choice `index`'s answer.
    Piece(usize, Piece),
    /// Choice `index` finished, for this reason (`stop`, `length`, `tool_calls`).
    Finished(usize, &'static str),
    /// Everything finished: the summed token counts.
    Done(Usage),
    /// The generation failed.
    Failed(ApiError),
}

/// The events of every choice, merged; dropping it drops the engine streams, which cancels
/// the generations.
type Merged = futures_util::stream::SelectAll<
    std::pin::Pin<Box<dyn Stream<Item = (usize, Option<GenerationEvent>)> + Send>>,
>;

fn merge(streams: Vec<RequestStream>) -> Merged {
    futures_util::stream::select_all(streams.into_iter().enumerate().map(|(i, s)| {
        // Each stream ends with a `None` marker so that an early end is noticed.
        let events = futures_util::stream::unfold(Some(s), |s| async move {
            let mut s = s?;
            match s.next().await {
                Some(ev) => Some((Some(ev), Some(s))),
                None => Some((None, None)),
            }
        })
        .map(move |ev| (i, ev));
        Box::pin(events)
            as std::pin::Pin<Box<dyn Stream<Item = (usize, Option<GenerationEvent>)> + Send>>
    }))
}

/// Drives the merged events of all choices and turns them into [`Step`]s.
struct Driver {
    merged: Merged,
    states: Vec<ChoiceState>,
    shape: Shape,
    engine: EngineHandle,
    queue: std::collections::VecDeque<Step>,
    done: bool,
}

impl Driver {
    fn new(
        streams: Vec<RequestStream>,
        echoes: Vec<Option<Echo>>,
        shape: Shape,
        engine: EngineHandle,
    ) -> Self {
        let states = echoes
            .into_iter()
            .map(|e| ChoiceState::new(e, &shape))
            .collect();
        Driver {
            merged: merge(streams),
            states,
            shape,
            engine,
            queue: Default::default(),
            done: false,
        }
    }

    /// The next step; `None` after `Done` or `Failed`.
    async fn next(&mut self) -> Option<Step> {
        use futures_util::StreamExt as _;
        loop {
            if let Some(s) = self.queue.pop_front() {
                return Some(s);
            }
            if self.done {
                return None;
            }
            let Some((i, ev)) = self.merged.next().await else {
                self.done = true;
                let all = self.states.iter().all(|c| c.finished.is_some());
                return Some(if all {
                    Step::Done(self.usage())
                } else {
                    Step::Failed(ApiError::internal(
                        "the engine stopped before the request finished",
                    ))
                });
            };
            let tok = self.engine.tokenizer();
            let Some(state) = self.states.get_mut(i) else {
                continue;
            };
            match ev {
                Some(GenerationEvent::Delta {
                    text,
                    token_ids,
                    logprobs,
                    prompt_logprobs,
                }) => {
                    if state.echo.is_some() {
                        if let Some(p) =
                            state.echo_piece(tok, &self.shape, prompt_logprobs.as_deref())
                        {
                            self.queue.push_back(Step::Piece(i, p));
                        }
                    }
                    let p = state.delta_piece(tok, &self.shape, text, &token_ids, &logprobs);
                    if !p.is_empty() {
                        self.queue.push_back(Step::Piece(i, p));
                    }
                }
                Some(GenerationEvent::Finished { reason, usage }) => {
                    if let Some(p) = state.echo_piece(tok, &self.shape, None) {
                        self.queue.push_back(Step::Piece(i, p));
                    }
                    if let Some(p) = state.tool_tail() {
                        self.queue.push_back(Step::Piece(i, p));
                    }
                    state.finished = Some((reason, usage));
                    let why = match reason.as_openai() {
                        "stop" if state.called => "tool_calls",
                        r => r,
                    };
                    self.queue.push_back(Step::Finished(i, why));
                }
                Some(GenerationEvent::Failed { message }) => {
                    self.done = true;
                    tracing::warn!(id = %self.shape.id, %message, "generation failed");
                    self.queue.clear();
                    return Some(Step::Failed(ApiError::internal(format!(
                        "generation failed: {message}"
                    ))));
                }
                None => {
                    if state.finished.is_none() {
                        self.done = true;
                        tracing::warn!(id = %self.shape.id, "the engine ended a request without finishing it");
                        self.queue.clear();
                        return Some(Step::Failed(ApiError::internal(
                            "the engine stopped before the request finished",
                        )));
                    }
                }
            }
        }
    }

    /// Token counts of all choices: each prompt once, every choice's completion.
    fn usage(&self) -> Usage {
        let n = self.shape.n.max(1);
        let mut u = Usage::default();
        for (i, c) in self.states.iter().enumerate() {
            if let Some((_, usage)) = c.finished {
                if i % n == 0 {
                    u.prompt_tokens += usage.prompt_tokens;
                }
                u.completion_tokens += usage.completion_tokens;
            }
        }
        u
    }
}

fn error_event(e: &ApiError) -> Event {
    Event::default().data(e.to_json())
}

fn json_event<T: serde::Serialize>(v: &T) -> Event {
    match serde_json::to_string(v) {
        Ok(j) => Event::default().data(j),
        Err(e) => error_event(&ApiError::internal(format!("cannot encode a chunk: {e}"))),
    }
}

/// Logs when a generation's client goes away before it finished.
struct DisconnectGuard {
    id: String,
    done: bool,
}

impl Drop for DisconnectGuard {
    fn drop(&mut self) {
        if !self.done {
            tracing::info!(id = %self.id, "client went away; generation cancelled");
        }
    }
}

fn log_finished(shape: &Shape, choices: usize, usage: Usage, t0: Instant, stream: bool) {
    tracing::info!(
        id = %shape.id,
        stream,
        choices,
        prompt_tokens = usage.prompt_tokens,
        completion_tokens = usage.completion_tokens,
        elapsed_ms = t0.elapsed().as_millis() as u64,
        "request finished"
    );
}

/// The whole answer as one JSON response. If the client disconnects, this future is dropped
/// with the streams in it, which cancels the generations.
async fn respond_full(mut d: Driver, t0: Instant) -> Response {
    let mut guard = DisconnectGuard {
        id: d.shape.id.clone(),
        done: false,
    };
    let usage = loop {
        match d.next().await {
            Some(Step::Piece(i, p)) => {
                if let Some(c) = d.states.get_mut(i) {
                    c.accumulate(p);
                }
            }
            Some(Step::Finished(..)) => {}
            Some(Step::Done(u)) => break u,
            Some(Step::Failed(e)) => {
                guard.done = true;
                return e.into_response();
            }
            None => {
                guard.done = true;
                return ApiError::internal("the engine stopped before the request finished")
                    .into_response();
            }
        }
    };
    guard.done = true;
    let shape = &d.shape;
    log_finished(shape, d.states.len(), usage, t0, false);
    let finish = |c: &ChoiceState| {
        c.finished
            .map_or("length", |(r, _)| FinishReason::as_openai(r))
    };
    if shape.chat {
        let choices = d
            .states
            .iter_mut()
            .enumerate()
            .map(|(index, c)| {
                let (content, tool_calls, finish_reason) =
                    finish_message(&shape.tools, std::mem::take(&mut c.acc.text), finish(c));
                ChatChoice {
                    index,
                    finish_reason,
                    message: ChatMessageOut {
                        role: "assistant",
                        content,
                        tool_calls,
                    },
                    logprobs: c.acc.chat.take(),
                }
            })
            .collect();
        Json(ChatCompletionResponse {
            id: shape.id.clone(),
            object: "chat.completion",
            created: shape.created,
            model: shape.model.clone(),
            choices,
            usage: usage.into(),
        })
        .into_response()
    } else {
        let choices = d
            .states
            .iter_mut()
            .enumerate()
            .map(|(index, c)| CompletionChoice {
                index,
                finish_reason: Some(finish(c)),
                text: std::mem::take(&mut c.acc.text),
                logprobs: c.acc.completion.take(),
            })
            .collect();
        Json(CompletionResponse {
            id: shape.id.clone(),
            object: "text_completion",
            created: shape.created,
            model: shape.model.clone(),
            choices,
            usage: Some(usage.into()),
        })
        .into_response()
    }
}

/// One stream chunk of choice `index`: a piece of text (with its log-probabilities), the
/// role (chat's first chunk), or the finish reason.
fn chunk(
    shape: &Shape,
    index: usize,
    role: bool,
    piece: Option<Piece>,
    reason: Option<&'static str>,
) -> Event {
    let piece = piece.unwrap_or_default();
    if shape.chat {
        let content =
            role || (reason.is_none() && (!piece.text.is_empty() || piece.tool_calls.is_empty()));
        json_event(&ChatCompletionChunk {
            id: shape.id.clone(),
            object: "chat.completion.chunk",
            created: shape.created,
            model: shape.model.clone(),
            choices: vec![ChatChunkChoice {
                index,
                delta: ChatDelta {
                    role: role.then_some("assistant"),
                    content: content.then_some(piece.text),
                    tool_calls: piece.tool_calls,
                },
                logprobs: piece.chat,
                finish_reason: reason,
            }],
            usage: None,
        })
    } else {
        json_event(&CompletionResponse {
            id: shape.id.clone(),
            object: "text_completion",
            created: shape.created,
            model: shape.model.clone(),
            choices: vec![CompletionChoice {
                index,
                text: piece.text,
                logprobs: piece.completion,
                finish_reason: reason,
            }],
            usage: None,
        })
    }
}

/// The last chunk with `include_usage`: no choices, the token counts.
fn usage_chunk(shape: &Shape, usage: Usage) -> Event {
    if shape.chat {
        json_event(&ChatCompletionChunk {
            id: shape.id.clone(),
            object: "chat.completion.chunk",
            created: shape.created,
            model: shape.model.clone(),
            choices: Vec::new(),
            usage: Some(usage.into()),
        })
    } else {
        json_event(&CompletionResponse {
            id: shape.id.clone(),
            object: "text_completion",
            created: shape.created,
            model: shape.model.clone(),
            choices: Vec::new(),
            usage: Some(usage.into()),
        })
    }
}

/// The answer as server-sent events, ending with `data: [DONE]` (with `:` comment lines
/// every 10 s while nothing else is sent). Each chunk carries one choice, named by its
/// `index`. The stream owns the engine's request streams: when the client disconnects the
/// body is dropped, and with it the requests, which cancels the generations.
fn respond_stream(
    mut d: Driver,
    include_usage: bool,
    t0: Instant,
) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    let events = async_stream::stream! {
        let mut guard = DisconnectGuard { id: d.shape.id.clone(), done: false };
        if d.shape.chat {
            for i in 0..d.states.len() {
                yield Ok(chunk(&d.shape, i, true, None, None));
            }
        }
        loop {
            match d.next().await {
                Some(Step::Piece(i, p)) => yield Ok(chunk(&d.shape, i, false, Some(p), None)),
                Some(Step::Finished(i, reason)) => {
                    yield Ok(chunk(&d.shape, i, false, None, Some(reason)));
                }
                Some(Step::Done(usage)) => {
                    if include_usage {
                        yield Ok(usage_chunk(&d.shape, usage));
                    }
                    log_finished(&d.shape, d.states.len(), usage, t0, true);
                    break;
                }
                Some(Step::Failed(e)) => {
                    yield Ok(error_event(&e));
                    break;
                }
                None => break,
            }
        }
        guard.done = true;
        yield Ok(Event::default().data("[DONE]"));
    };
    // Comment lines while a request waits keep proxies open and reveal a client that left.
    Sse::new(events).keep_alive(KeepAlive::new().interval(Duration::from_secs(10)))
}

/// `logprobs` of a completion request: an integer in [0, 20], or null / false for none.
fn completion_logprobs(v: &Option<serde_json::Value>) -> Result<Option<usize>, ApiError> {
    let bad = |what: String| {
        ApiError::invalid_param(
            "logprobs",
            format!("`logprobs` must be an integer in [0, {MAX_LOGPROBS}], got {what}"),
        )
    };
    match v {
        None | Some(serde_json::Value::Null) | Some(serde_json::Value::Bool(false)) => Ok(None),
        Some(serde_json::Value::Number(n)) => match n.as_i64() {
            Some(k) if (0..=MAX_LOGPROBS).contains(&k) => Ok(Some(k as usize)),
            _ => Err(bad(n.to_string())),
        },
        Some(other) => Err(bad(other.to_string())),
    }
}

/// `POST /v1/completions`.
pub(crate) async fn completions(State(st): St, body: Result<Bytes, BytesRejection>) -> Response {
    match completions_inner(st, body).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    }
}

async fn completions_inner(
    st: Arc<AppState>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let t0 = Instant::now();
    let value = parse_body(body)?;
    let common: CommonParams = fields(&value)?;
    let req: CompletionRequest = fields(&value)?;
    check_model(&st, &common)?;
    let n = choices_per_prompt(&common)?;
    if let Some(b) = req.best_of {
        if b != 1 && b != n as i64 {
            return Err(ApiError::unsupported(
                "best_of",
                format!("`best_of` must equal `n` ({n}) or be 1, got {b}"),
            ));
        }
    }
    let logprobs = completion_logprobs(&req.logprobs)?;
    if req.suffix.as_deref().is_some_and(|s| !s.is_empty()) {
        return Err(ApiError::unsupported("suffix", "`suffix` is not supported"));
    }
    let echo = req.echo.unwrap_or(false);
    let prompts = req
        .prompt
        .ok_or_else(|| ApiError::invalid_param("prompt", "the field `prompt` is required"))?
        .into_prompts()?;
    let engine = st.engine.clone();
    let tokenised: Vec<(Vec<u32>, Option<String>)> = blocking(move || {
        let tok = engine.tokenizer();
        let vocab = engine.vocab_size();
        prompts
            .into_iter()
            .map(|p| match p {
                Prompt::Text(text) => {
                    let ids = tok.encode_prompt(&text).map_err(|e| {
                        ApiError::invalid_param(
                            "prompt",
                            format!("cannot tokenize the prompt: {e}"),
                        )
                    })?;
                    Ok((ids, echo.then_some(text)))
                }
                Prompt::Tokens(ids) => {
                    let text = (echo && ids.iter().all(|&t| (t as usize) < vocab))
                        .then(|| tok.decode(&ids).unwrap_or_default());
                    Ok((ids, text))
                }
            })
            .collect()
    })
    .await?;
    let total = tokenised.len().saturating_mul(n);
    let mut gens = Vec::with_capacity(total);
    let mut echoes = Vec::with_capacity(total);
    for (ids, text) in tokenised {
        let mut gen = generation_request(&st, &common, ids, "prompt", Some(16), echo)?;
        gen.logprobs = logprobs;
        gen.prompt_logprobs = if echo { logprobs } else { None };
        for _ in 0..n {
            echoes.push(text.as_ref().map(|t| Echo {
                text: t.clone(),
                ids: gen.prompt.clone(),
            }));
        }
        gens.extend(fan_out(&st, gen, n, total)?);
    }
    let shape = Shape::new(&st, false, n, logprobs.is_some());
    respond(&st, &common, gens, echoes, shape, t0).await
}

/// `POST /v1/chat/completions`.
pub(crate) async fn chat_completions(
    State(st): St,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    match chat_inner(st, body).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    }
}

/// The messages as JSON objects for the chat template: `role`, `content` (text parts
/// joined; null becomes ""), and `tool_calls`, `tool_call_id`, `name` when given.
fn chat_messages(msgs: Vec<MessageInput>) -> Result<Vec<serde_json::Value>, ApiError> {
    if msgs.is_empty() {
        return Err(ApiError::invalid_param(
            "messages",
            "`messages` must hold at least one message",
        ));
    }
    msgs.into_iter()
        .enumerate()
        .map(|(i, m)| {
            let content = match m.content {
                None => String::new(),
                Some(ContentInput::Text(s)) => s,
                Some(ContentInput::Parts(parts)) => {
                    let mut texts = Vec::with_capacity(parts.len());
                    for (j, p) in parts.into_iter().enumerate() {
                        match (p.kind.as_str(), p.text) {
                            ("text", Some(t)) => texts.push(t),
                            ("text", None) => {
                                return Err(ApiError::invalid_param(
                                    format!("messages[{i}].content[{j}].text"),
                                    "a text part needs `text`",
                                ))
                            }
                            (other, _) => {
                                return Err(ApiError::unsupported(
                                    &format!("messages[{i}].content[{j}].type"),
                                    format!("content parts of type `{other}` are not supported"),
                                ))
                            }
                        }
                    }
                    texts.join("\n")
                }
            };
            let mut o = serde_json::Map::new();
            o.insert("role".into(), m.role.into());
            o.insert("content".into(), content.into());
            if let Some(calls) = m.tool_calls {
                if !calls.is_empty() {
                    o.insert("tool_calls".into(), calls.into());
                }
            }
            if let Some(id) = m.tool_call_id {
                o.insert("tool_call_id".into(), id.into());
            }
            if let Some(name) = m.name {
                o.insert("name".into(), name.into());
            }
            Ok(serde_json::Value::Object(o))
        })
        .collect()
}

/// Show `tools` to a model whose chat template ignores them: the built-in tool prompt
/// ([`tools_system_prompt`], Hermes format) joins the system message (or becomes one), and
/// assistant tool calls in the history are written in the same format.
fn add_tools_to_messages(messages: &mut Vec<serde_json::Value>, tools: &[serde_json::Value]) {
    use serde_json::Value;
    let prompt = tools_system_prompt(tools);
    match messages.first_mut().and_then(Value::as_object_mut) {
        Some(o) if o.get("role").and_then(Value::as_str) == Some("system") => {
            let old = o.get("content").and_then(Value::as_str).unwrap_or_default();
            let text = if old.is_empty() {
                prompt
            } else {
                format!("{old}\n\n{prompt}")
            };
            o.insert("content".into(), text.into());
        }
        _ => messages.insert(0, serde_json::json!({"role": "system", "content": prompt})),
    }
    for m in messages.iter_mut() {
        let Some(o) = m.as_object_mut() else { continue };
        let Some(Value::Array(calls)) = o.remove("tool_calls") else {
            continue;
        };
        let mut text = o
            .get("content")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string();
        for c in &calls {
            let f = c.get("function").unwrap_or(c);
            let name = f.get("name").cloned().unwrap_or(Value::Null);
            let args = match f.get("arguments") {
                Some(Value::String(a)) => {
                    serde_json::from_str(a).unwrap_or(Value::String(a.clone()))
                }
                Some(v) => v.clone(),
                None => serde_json::json!({}),
            };
            if !text.is_empty() {
                text.push('\n');
            }
            let call = serde_json::json!({"name": name, "arguments": args});
            text.push_str(&format!("<tool_call>\n{call}\n</tool_call>"));
        }
        o.insert("content".into(), text.into());
    }
}

/// `logprobs` / `top_logprobs` of a chat request: `Some(alternatives)` when asked for.
fn chat_logprobs(req: &ChatCompletionRequest) -> Result<Option<usize>, ApiError> {
    let top = match req.top_logprobs {
        None => None,
        Some(k) if (0..=MAX_LOGPROBS).contains(&k) => Some(k as usize),
        Some(k) => {
            return Err(ApiError::invalid_param(
                "top_logprobs",
                format!("`top_logprobs` must be in [0, {MAX_LOGPROBS}], got {k}"),
            ))
        }
    };
    match (req.logprobs.unwrap_or(false), top) {
        (true, top) => Ok(Some(top.unwrap_or(0))),
        (false, None) => Ok(None),
        (false, Some(_)) => Err(ApiError::invalid_param(
            "top_logprobs",
            "`top_logprobs` needs `logprobs` set to true",
        )),
    }
}

/// Render `messages` (with the function `tools`, if any) with the chat template and
/// tokenise them. A template that ignores tools gets them through the built-in tool prompt.
async fn chat_prompt(
    st: &AppState,
    mut messages: Vec<serde_json::Value>,
    tools: Vec<serde_json::Value>,
    add_generation_prompt: bool,
    add_special_tokens: bool,
    kwargs: serde_json::Map<String, serde_json::Value>,
) -> Result<Vec<u32>, ApiError> {
    let engine = st.engine.clone();
    blocking(move || {
        let template = engine.chat_template();
        let native = !tools.is_empty() && template.uses_tools();
        if !tools.is_empty() && !native {
            add_tools_to_messages(&mut messages, &tools);
        }
        let text = template
            .render_openai(
                &messages,
                native.then_some(&tools[..]),
                add_generation_prompt,
                &kwargs,
            )
            .map_err(|e| {
                ApiError::invalid_param("messages", format!("cannot apply the chat template: {e}"))
            })?;
        let tok = engine.tokenizer();
        let ids = if add_special_tokens {
            tok.encode_prompt(&text)
        } else {
            tok.encode_plain(&text)
        };
        ids.map_err(|e| {
            ApiError::invalid_param("messages", format!("cannot tokenize the messages: {e}"))
        })
    })
    .await
}

/// A tool error as the API's 400.
fn tool_error(e: ToolError) -> ApiError {
    ApiError::invalid_param(e.param, e.message)
}

/// `response_format`: the grammar it asks for (`None` for text).
fn response_format(v: Option<&serde_json::Value>) -> Result<Option<Grammar>, ApiError> {
    use serde_json::Value;
    let o = match v {
        None | Some(Value::Null) => return Ok(None),
        Some(Value::Object(o)) => o,
        Some(_) => {
            return Err(ApiError::invalid_param(
                "response_format",
                "`response_format` must be an object such as {\"type\": \"json_object\"}",
            ))
        }
    };
    match o.get("type").and_then(Value::as_str) {
        Some("text") => Ok(None),
        Some("json_object") => Ok(Some(Grammar::JsonObject)),
        Some("json_schema") => {
            let Some(js) = o.get("json_schema").and_then(Value::as_object) else {
                return Err(ApiError::invalid_param(
                    "response_format.json_schema",
                    "`response_format.json_schema` is required with type \"json_schema\" and \
                     must be an object",
                ));
            };
            let strict = match js.get("strict") {
                None | Some(Value::Null) => false,
                Some(Value::Bool(b)) => *b,
                Some(_) => {
                    return Err(ApiError::invalid_param(
                        "response_format.json_schema.strict",
                        "`response_format.json_schema.strict` must be a boolean",
                    ))
                }
            };
            // No schema: any JSON value.
            let schema = js.get("schema").cloned().unwrap_or(Value::Bool(true));
            Ok(Some(Grammar::json_schema(schema, strict)))
        }
        _ => Err(ApiError::invalid_param(
            "response_format.type",
            "`response_format.type` must be \"text\", \"json_object\" or \"json_schema\"",
        )),
    }
}

/// Compile `grammar` over the engine's vocabulary off the async threads; a grammar that
/// does not compile is a 400 naming `param`.
async fn compile_constraint(
    st: &AppState,
    grammar: Grammar,
    param: String,
) -> Result<crate::constrained::Constraint, ApiError> {
    let engine = st.engine.clone();
    blocking(move || {
        let vocab = engine.constraint_vocab().map_err(|e| {
            ApiError::unsupported(
                &param,
                format!("this model cannot use constrained decoding: {e}"),
            )
        })?;
        vocab.compile(&grammar).map_err(|e| match e {
            ConstraintError::InvalidSchema(_) | ConstraintError::InvalidGrammar(_) => {
                ApiError::invalid_param(param.clone(), format!("`{param}`: {e}"))
            }
            other => ApiError::internal(format!("constrained decoding: {other}")),
        })
    })
    .await
}

async fn chat_inner(
    st: Arc<AppState>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let t0 = Instant::now();
    let value = parse_body(body)?;
    let common: CommonParams = fields(&value)?;
    let req: ChatCompletionRequest = fields(&value)?;
    check_model(&st, &common)?;
    let n = choices_per_prompt(&common)?;
    let logprobs = chat_logprobs(&req)?;
    let tools_json = req.tools.clone().unwrap_or_default();
    let tools = parse_tools(&tools_json).map_err(tool_error)?;
    let choice = parse_tool_choice(req.tool_choice.as_ref(), &tools).map_err(tool_error)?;
    let format = ToolCallFormat::detect(st.engine.chat_template().source());
    let tool_grammar = choice.grammar(&tools).map_err(tool_error)?;
    let format_grammar = response_format(req.response_format.as_ref())?;
    let (mode, grammar) = match (&choice, tool_grammar, format_grammar) {
        (ToolChoice::Required | ToolChoice::Function(_), Some(_), Some(_)) => {
            return Err(ApiError::invalid_param(
                "response_format",
                "`response_format` cannot be combined with a `tool_choice` that forces a tool \
                 call (\"required\" or a named function)",
            ))
        }
        (ToolChoice::Required, Some(g), None) => {
            (ToolMode::Required(format), Some((g, "tools".to_string())))
        }
        (ToolChoice::Function(name), Some(g), None) => {
            let i = tools.iter().position(|t| &t.name == name).unwrap_or(0);
            let param = format!("tools[{i}].function.parameters");
            let mode = ToolMode::Named {
                format,
                name: name.clone(),
            };
            (mode, Some((g, param)))
        }
        (ToolChoice::Auto, _, g) if !tools.is_empty() => (
            ToolMode::Auto(format),
            g.map(|g| (g, "response_format.json_schema.schema".to_string())),
        ),
        (_, _, g) => (
            ToolMode::Text,
            g.map(|g| (g, "response_format.json_schema.schema".to_string())),
        ),
    };
    let messages =
        chat_messages(req.messages.ok_or_else(|| {
            ApiError::invalid_param("messages", "the field `messages` is required")
        })?)?;
    let constraint = match grammar {
        Some((g, param)) => Some(compile_constraint(&st, g, param).await?),
        None => None,
    };
    let kwargs = req.chat_template_kwargs.unwrap_or_default();
    let ids = chat_prompt(&st, messages, tools_json, true, false, kwargs).await?;
    let mut gen = generation_request(&st, &common, ids, "messages", None, false)?;
    gen.logprobs = logprobs;
    gen.constraint = constraint;
    let gens = fan_out(&st, gen, n, n)?;
    let echoes = (0..n).map(|_| None).collect();
    let mut shape = Shape::new(&st, true, n, logprobs.is_some());
    shape.tools = mode;
    respond(&st, &common, gens, echoes, shape, t0).await
}

/// Submit every choice (all at once, so they batch) and answer, streaming or not. If one
/// is refused, those already submitted are cancelled.
async fn respond(
    st: &AppState,
    common: &CommonParams,
    reqs: Vec<GenerationRequest>,
    echoes: Vec<Option<Echo>>,
    mut shape: Shape,
    t0: Instant,
) -> Result<Response, ApiError> {
    shape.stream = common.stream.unwrap_or(false);
    let prompt_tokens: usize = reqs.iter().map(|r| r.prompt.len()).sum();
    let choices = reqs.len();
    let mut streams = Vec::with_capacity(choices);
    for req in reqs {
        let stream = st.engine.submit(req).map_err(|e| {
            tracing::info!(id = %shape.id, error = %e, "request refused");
            ApiError::from(e)
        })?;
        streams.push(stream);
    }
    tracing::debug!(id = %shape.id, prompt_tokens, choices, "request accepted");
    let driver = Driver::new(streams, echoes, shape, st.engine.clone());
    if common.stream.unwrap_or(false) {
        let include_usage = common
            .stream_options
            .as_ref()
            .and_then(|o| o.include_usage)
            .unwrap_or(false);
        Ok(respond_stream(driver, include_usage, t0).into_response())
    } else {
        Ok(respond_full(driver, t0).await)
    }
}

// ---------------------------------------------------------------------------------------
// Tokenizer endpoints

/// `POST /tokenize` (vLLM's endpoint).
pub(crate) async fn tokenize(State(st): St, body: Result<Bytes, BytesRejection>) -> Response {
    match tokenize_inner(st, body).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    }
}

async fn tokenize_inner(
    st: Arc<AppState>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let value = parse_body(body)?;
    let req: TokenizeRequest = fields(&value)?;
    check_optional_model(&st, req.model.as_deref())?;
    if req.tools.is_some() && req.messages.is_none() {
        return Err(ApiError::invalid_param(
            "tools",
            "`tools` can only be given with `messages`",
        ));
    }
    let ids = match (req.prompt, req.messages) {
        (Some(_), Some(_)) => {
            return Err(ApiError::invalid_param(
                "messages",
                "send either `prompt` or `messages`, not both",
            ))
        }
        (None, None) => {
            return Err(ApiError::invalid_param(
                "prompt",
                "the field `prompt` (or `messages`) is required",
            ))
        }
        (Some(text), None) => {
            let special = req.add_special_tokens.unwrap_or(true);
            let engine = st.engine.clone();
            blocking(move || {
                let tok = engine.tokenizer();
                let ids = if special {
                    tok.encode_prompt(&text)
                } else {
                    tok.encode_plain(&text)
                };
                ids.map_err(|e| {
                    ApiError::invalid_param("prompt", format!("cannot tokenize the prompt: {e}"))
                })
            })
            .await?
        }
        (None, Some(msgs)) => {
            let messages = chat_messages(msgs)?;
            let tools = req.tools.unwrap_or_default();
            parse_tools(&tools).map_err(tool_error)?;
            chat_prompt(
                &st,
                messages,
                tools,
                req.add_generation_prompt.unwrap_or(true),
                req.add_special_tokens.unwrap_or(false),
                req.chat_template_kwargs.unwrap_or_default(),
            )
            .await?
        }
    };
    let token_strs = req.return_token_strs.unwrap_or(false).then(|| {
        let inner = st.engine.tokenizer().inner();
        ids.iter()
            .map(|&id| inner.id_to_token(id).unwrap_or_default())
            .collect()
    });
    Ok(Json(TokenizeResponse {
        count: ids.len(),
        max_model_len: st.engine.context_length(),
        tokens: ids,
        token_strs,
    })
    .into_response())
}

/// `POST /detokenize` (vLLM's endpoint).
pub(crate) async fn detokenize(State(st): St, body: Result<Bytes, BytesRejection>) -> Response {
    match detokenize_inner(st, body).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    }
}

async fn detokenize_inner(
    st: Arc<AppState>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let value = parse_body(body)?;
    let req: DetokenizeRequest = fields(&value)?;
    check_optional_model(&st, req.model.as_deref())?;
    let ids = req
        .tokens
        .ok_or_else(|| ApiError::invalid_param("tokens", "the field `tokens` is required"))?;
    let vocab = st.engine.vocab_size();
    if let Some(bad) = ids.iter().find(|&&t| t as usize >= vocab) {
        return Err(ApiError::invalid_param(
            "tokens",
            format!("`tokens` holds token id {bad}, out of range for a vocabulary of {vocab}"),
        ));
    }
    let engine = st.engine.clone();
    let prompt = blocking(move || {
        engine
            .tokenizer()
            .inner()
            .decode(&ids, false)
            .map_err(|e| ApiError::invalid_param("tokens", format!("cannot decode: {e}")))
    })
    .await?;
    Ok(Json(DetokenizeResponse { prompt }).into_response())
}

/// `POST /v1/embeddings`: the served models generate text; they do not embed it.
pub(crate) async fn embeddings(State(st): St) -> ApiError {
    ApiError {
        code: Some("model_not_supported"),
        param: Some("model".to_string()),
        ..ApiError::not_found(format!(
            "the model `{}` is a text-generation model and does not produce embeddings; this \
             server does not serve /v1/embeddings",
            st.engine.model_id()
        ))
    }
}
