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
use crate::chat_template::ChatMessage;
use crate::engine::{
    EngineHandle, FinishReason, GenerationEvent, GenerationRequest, RequestStream, Usage,
};

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
        "prompt" => Some("must be a string or an array of token ids"),
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

fn check_common(common: &CommonParams) -> Result<(), ApiError> {
    if let Some(n) = common.n {
        if n != 1 {
            return Err(ApiError::unsupported(
                "n",
                format!("only n = 1 is supported, got {n}"),
            ));
        }
    }
    Ok(())
}

/// Sampling settings from the request, checked.
fn sampling(common: &CommonParams) -> Result<SamplingParams, ApiError> {
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
        ..SamplingParams::default()
    };
    params.validate().map_err(ApiError::bad_request)?;
    Ok(params)
}

/// Build the engine request from a tokenised prompt and the shared fields.
fn generation_request(
    st: &AppState,
    common: &CommonParams,
    prompt: Vec<u32>,
    prompt_param: &str,
    default_max_tokens: Option<usize>,
) -> Result<GenerationRequest, ApiError> {
    let sampling = sampling(common)?;
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
    let max_tokens = match requested {
        Some(m) if m < 1 => {
            return Err(ApiError::invalid_param(
                param,
                format!("`{param}` must be ≥ 1, got {m}"),
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
    })
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
// Generation endpoints

/// Which kind of response a generation produces.
#[derive(Clone)]
struct Shape {
    chat: bool,
    id: String,
    created: u64,
    model: String,
}

impl Shape {
    fn new(st: &AppState, chat: bool) -> Self {
        Shape {
            chat,
            id: new_id(if chat { "chatcmpl" } else { "cmpl" }),
            created: unix_now(),
            model: st.engine.model_id().to_string(),
        }
    }

    fn full(&self, text: String, reason: FinishReason, usage: Usage) -> Response {
        if self.chat {
            Json(ChatCompletionResponse {
                id: self.id.clone(),
                object: "chat.completion",
                created: self.created,
                model: self.model.clone(),
                choices: vec![ChatChoice {
                    index: 0,
                    message: ChatMessageOut {
                        role: "assistant",
                        content: text,
                    },
                    logprobs: None,
                    finish_reason: reason.as_openai(),
                }],
                usage: usage.into(),
            })
            .into_response()
        } else {
            Json(CompletionResponse {
                id: self.id.clone(),
                object: "text_completion",
                created: self.created,
                model: self.model.clone(),
                choices: vec![CompletionChoice {
                    index: 0,
                    text,
                    logprobs: None,
                    finish_reason: Some(reason.as_openai()),
                }],
                usage: Some(usage.into()),
            })
            .into_response()
        }
    }

    /// One stream chunk: a text delta, the first (role) chunk, the finish chunk, or the
    /// usage chunk (no choices).
    fn chunk(
        &self,
        role: bool,
        text: Option<String>,
        reason: Option<FinishReason>,
        usage: Option<Usage>,
    ) -> Event {
        let json = if self.chat {
            let choices = if usage.is_some() {
                Vec::new()
            } else {
                vec![ChatChunkChoice {
                    index: 0,
                    delta: ChatDelta {
                        role: role.then_some("assistant"),
                        content: text,
                    },
                    logprobs: None,
                    finish_reason: reason.map(FinishReason::as_openai),
                }]
            };
            serde_json::to_string(&ChatCompletionChunk {
                id: self.id.clone(),
                object: "chat.completion.chunk",
                created: self.created,
                model: self.model.clone(),
                choices,
                usage: usage.map(Into::into),
            })
        } else {
            let choices = if usage.is_some() {
                Vec::new()
            } else {
                vec![CompletionChoice {
                    index: 0,
                    text: text.unwrap_or_default(),
                    logprobs: None,
                    finish_reason: reason.map(FinishReason::as_openai),
                }]
            };
            serde_json::to_string(&CompletionResponse {
                id: self.id.clone(),
                object: "text_completion",
                created: self.created,
                model: self.model.clone(),
                choices,
                usage: usage.map(Into::into),
            })
        };
        match json {
            Ok(j) => Event::default().data(j),
            Err(e) => error_event(&ApiError::internal(format!("cannot encode a chunk: {e}"))),
        }
    }
}

fn error_event(e: &ApiError) -> Event {
    Event::default().data(e.to_json())
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

fn log_finished(shape: &Shape, reason: FinishReason, usage: Usage, t0: Instant, stream: bool) {
    tracing::info!(
        id = %shape.id,
        stream,
        prompt_tokens = usage.prompt_tokens,
        completion_tokens = usage.completion_tokens,
        finish_reason = reason.as_openai(),
        elapsed_ms = t0.elapsed().as_millis() as u64,
        "request finished"
    );
}

/// The whole answer as one JSON response. If the client disconnects, this future is dropped
/// with the stream in it, which cancels the generation.
async fn respond_full(mut stream: RequestStream, shape: Shape, t0: Instant) -> Response {
    let mut guard = DisconnectGuard {
        id: shape.id.clone(),
        done: false,
    };
    let mut text = String::new();
    loop {
        match stream.next().await {
            Some(GenerationEvent::Delta { text: t, .. }) => text.push_str(&t),
            Some(GenerationEvent::Finished { reason, usage }) => {
                guard.done = true;
                log_finished(&shape, reason, usage, t0, false);
                return shape.full(text, reason, usage);
            }
            Some(GenerationEvent::Failed { message }) => {
                guard.done = true;
                tracing::warn!(id = %shape.id, %message, "generation failed");
                return ApiError::internal(format!("generation failed: {message}")).into_response();
            }
            None => {
                guard.done = true;
                tracing::warn!(id = %shape.id, "the engine ended a request without finishing it");
                return ApiError::internal("the engine stopped before the request finished")
                    .into_response();
            }
        }
    }
}

/// The answer as server-sent events, ending with `data: [DONE]` (with `:` comment lines
/// every 10 s while nothing else is sent). The stream owns the
/// engine's request stream: when the client disconnects the body is dropped, and with it
/// the request, which cancels the generation.
fn respond_stream(
    mut stream: RequestStream,
    shape: Shape,
    include_usage: bool,
    t0: Instant,
) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    let events = async_stream::stream! {
        let mut guard = DisconnectGuard { id: shape.id.clone(), done: false };
        if shape.chat {
            yield Ok(shape.chunk(true, Some(String::new()), None, None));
        }
        loop {
            match stream.next().await {
                Some(GenerationEvent::Delta { text, .. }) => {
                    if !text.is_empty() {
                        yield Ok(shape.chunk(false, Some(text), None, None));
                    }
                }
                Some(GenerationEvent::Finished { reason, usage }) => {
                    let text = (!shape.chat).then(String::new);
                    yield Ok(shape.chunk(false, text, Some(reason), None));
                    if include_usage {
                        yield Ok(shape.chunk(false, None, None, Some(usage)));
                    }
                    log_finished(&shape, reason, usage, t0, true);
                    break;
                }
                Some(GenerationEvent::Failed { message }) => {
                    tracing::warn!(id = %shape.id, %message, "generation failed");
                    yield Ok(error_event(&ApiError::internal(format!("generation failed: {message}"))));
                    break;
                }
                None => {
                    tracing::warn!(id = %shape.id, "the engine ended a request without finishing it");
                    yield Ok(error_event(&ApiError::internal(
                        "the engine stopped before the request finished",
                    )));
                    break;
                }
            }
        }
        guard.done = true;
        yield Ok(Event::default().data("[DONE]"));
    };
    // Comment lines while a request waits keep proxies open and reveal a client that left.
    Sse::new(events).keep_alive(KeepAlive::new().interval(Duration::from_secs(10)))
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
    check_common(&common)?;
    if req.echo == Some(true) {
        return Err(ApiError::unsupported("echo", "`echo` is not supported"));
    }
    if let Some(b) = req.best_of {
        if b != 1 {
            return Err(ApiError::unsupported(
                "best_of",
                format!("only best_of = 1 is supported, got {b}"),
            ));
        }
    }
    let wants_logprobs = match &req.logprobs {
        None | Some(serde_json::Value::Null) | Some(serde_json::Value::Bool(false)) => false,
        Some(serde_json::Value::Number(n)) => n.as_i64() != Some(0),
        Some(_) => true,
    };
    if wants_logprobs {
        return Err(ApiError::unsupported(
            "logprobs",
            "`logprobs` is not supported",
        ));
    }
    if req.suffix.as_deref().is_some_and(|s| !s.is_empty()) {
        return Err(ApiError::unsupported("suffix", "`suffix` is not supported"));
    }
    let prompt = req
        .prompt
        .ok_or_else(|| ApiError::invalid_param("prompt", "the field `prompt` is required"))?
        .single()?;
    let ids = match prompt {
        Prompt::Tokens(t) => t,
        Prompt::Text(text) => {
            let engine = st.engine.clone();
            blocking(move || {
                engine.tokenizer().encode_prompt(&text).map_err(|e| {
                    ApiError::invalid_param("prompt", format!("cannot tokenize the prompt: {e}"))
                })
            })
            .await?
        }
    };
    let gen = generation_request(&st, &common, ids, "prompt", Some(16))?;
    let shape = Shape::new(&st, false);
    respond(&st, &common, gen, shape, t0).await
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

fn chat_messages(msgs: Vec<MessageInput>) -> Result<Vec<ChatMessage>, ApiError> {
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
            Ok(ChatMessage {
                role: m.role,
                content,
            })
        })
        .collect()
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
    check_common(&common)?;
    if req.logprobs == Some(true) || req.top_logprobs.is_some_and(|n| n > 0) {
        return Err(ApiError::unsupported(
            "logprobs",
            "`logprobs` is not supported",
        ));
    }
    if req.tools.as_ref().is_some_and(|t| !t.is_empty()) {
        return Err(ApiError::unsupported("tools", "`tools` are not supported"));
    }
    let messages =
        chat_messages(req.messages.ok_or_else(|| {
            ApiError::invalid_param("messages", "the field `messages` is required")
        })?)?;
    let engine = st.engine.clone();
    let ids = blocking(move || {
        let text = engine
            .chat_template()
            .render(&messages, true)
            .map_err(|e| {
                ApiError::invalid_param("messages", format!("cannot apply the chat template: {e}"))
            })?;
        engine.tokenizer().encode_plain(&text).map_err(|e| {
            ApiError::invalid_param("messages", format!("cannot tokenize the messages: {e}"))
        })
    })
    .await?;
    let gen = generation_request(&st, &common, ids, "messages", None)?;
    let shape = Shape::new(&st, true);
    respond(&st, &common, gen, shape, t0).await
}

/// Submit and answer, streaming or not.
async fn respond(
    st: &AppState,
    common: &CommonParams,
    req: GenerationRequest,
    shape: Shape,
    t0: Instant,
) -> Result<Response, ApiError> {
    let prompt_tokens = req.prompt.len();
    let max_tokens = req.max_tokens;
    let stream = st.engine.submit(req).map_err(|e| {
        tracing::info!(id = %shape.id, error = %e, "request refused");
        ApiError::from(e)
    })?;
    tracing::debug!(id = %shape.id, prompt_tokens, max_tokens, "request accepted");
    if common.stream.unwrap_or(false) {
        let include_usage = common
            .stream_options
            .as_ref()
            .and_then(|o| o.include_usage)
            .unwrap_or(false);
        Ok(respond_stream(stream, shape, include_usage, t0).into_response())
    } else {
        Ok(respond_full(stream, shape, t0).await)
    }
}
