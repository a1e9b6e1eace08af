//! The OpenAI-compatible HTTP server.
//!
//! Routes:
//!
//! | route | |
//! | --- | --- |
//! | `POST /v1/completions` | text completion of one or several prompts (strings or token ids), `n` choices each, `echo`, `logprobs`, `logit_bias`; JSON or SSE |
//! | `POST /v1/chat/completions` | chat completion through the model's chat template, `n` choices, `logprobs` / `top_logprobs`; JSON or SSE |
//! | `GET /v1/models`, `GET /v1/models/{id}` | the served model |
//! | `POST /v1/embeddings` | 404: generation models do not embed |
//! | `POST /tokenize`, `POST /detokenize` | vLLM's tokenizer endpoints (never need the API key, as in vLLM) |
//! | `GET /health` | `{"status": "ok"}` (never needs the API key) |
//! | `GET /metrics` | Prometheus text format (never needs the API key) |
//!
//! Streaming answers are server-sent events `data: {chunk}\n\n` ending with `data: [DONE]`;
//! each chunk carries one choice, named by its `index`.
//! Errors are `{"error": {"message", "type", "param", "code"}}` with the HTTP status: 400 for
//! invalid requests, 401 for a missing or wrong API key, 404, 405, 413 for bodies over
//! [`ServerConfig::max_body_bytes`], 429 when the engine is saturated, 503 while shutting
//! down. A client that disconnects cancels its generation.

mod error;
mod handlers;
mod metrics;
pub mod types;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::DefaultBodyLimit;
use axum::middleware::from_fn_with_state;
use axum::routing::{get, post};
use axum::Router;
use tokio::net::TcpListener;

pub use error::ApiError;
pub use metrics::render as render_metrics;

use crate::engine::EngineHandle;
use handlers::AppState;

/// Settings of the HTTP server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerConfig {
    /// Address to listen on (loopback by default).
    pub host: String,
    /// Port to listen on (0 picks a free one).
    pub port: u16,
    /// When set, `/v1/*` requires `Authorization: Bearer <api_key>`.
    pub api_key: Option<String>,
    /// Largest request body accepted (413 beyond).
    pub max_body_bytes: usize,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            host: "127.0.0.1".to_string(),
            port: 8000,
            api_key: None,
            max_body_bytes: 4 << 20,
        }
    }
}

/// Why the server could not run.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The address could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// `host:port`.
        addr: String,
        /// The cause.
        source: std::io::Error,
    },
    /// Accepting or serving connections failed.
    #[error("the HTTP server failed: {0}")]
    Io(#[from] std::io::Error),
}

/// The application: every route, the API-key check, the body limit and the HTTP counters.
pub fn router(engine: EngineHandle, config: &ServerConfig) -> Router {
    let state = Arc::new(AppState {
        engine,
        api_key: config.api_key.clone().filter(|k| !k.is_empty()),
        http: Default::default(),
        started: handlers::unix_now(),
    });
    let v1 = Router::new()
        .route("/v1/completions", post(handlers::completions))
        .route("/v1/chat/completions", post(handlers::chat_completions))
        .route("/v1/models", get(handlers::list_models))
        .route("/v1/models/{id}", get(handlers::get_model))
        .route("/v1/embeddings", post(handlers::embeddings))
        .route_layer(from_fn_with_state(state.clone(), handlers::require_api_key));
    Router::new()
        .route("/health", get(handlers::health))
        .route("/metrics", get(handlers::metrics))
        .route("/tokenize", post(handlers::tokenize))
        .route("/detokenize", post(handlers::detokenize))
        .merge(v1)
        .fallback(handlers::not_found)
        .method_not_allowed_fallback(handlers::method_not_allowed)
        .layer(DefaultBodyLimit::max(config.max_body_bytes))
        .layer(from_fn_with_state(state.clone(), handlers::track))
        .with_state(state)
}

/// Bind the configured address.
pub async fn bind(config: &ServerConfig) -> Result<TcpListener, ServeError> {
    let addr = if config.host.contains(':') && !config.host.starts_with('[') {
        format!("[{}]:{}", config.host, config.port)
    } else {
        format!("{}:{}", config.host, config.port)
    };
    TcpListener::bind(&addr)
        .await
        .map_err(|source| ServeError::Bind { addr, source })
}

/// Bind the configured address and serve until `shutdown` resolves, then drain: stop
/// accepting connections, let running requests finish, and return once the engine is idle.
pub async fn serve(
    engine: EngineHandle,
    config: ServerConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    let listener = bind(&config).await?;
    serve_on(listener, engine, config, shutdown).await
}

/// [`serve`] on a listener the caller has bound (for example to port 0, to learn the port
/// from [`TcpListener::local_addr`] first).
pub async fn serve_on(
    listener: TcpListener,
    engine: EngineHandle,
    config: ServerConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    let addr: Option<SocketAddr> = listener.local_addr().ok();
    let app = router(engine.clone(), &config);
    tracing::info!(
        addr = ?addr,
        model = engine.model_id(),
        auth = config.api_key.is_some(),
        "serving the OpenAI API"
    );
    let for_shutdown = engine.clone();
    axum::serve(listener, app)
        .with_graceful_shutdown(async move {
            shutdown.await;
            tracing::info!("shutting down: no new requests; draining the running ones");
            for_shutdown.begin_shutdown();
        })
        .await?;
    engine.drained().await;
    tracing::info!("drained; the server has stopped");
    Ok(())
}

/// Resolves on SIGINT (Ctrl-C) or, on Unix, SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => tracing::info!("SIGINT received"),
        _ = term => tracing::info!("SIGTERM received"),
    }
}
