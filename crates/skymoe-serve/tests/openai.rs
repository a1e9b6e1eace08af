//! End-to-end tests of the OpenAI-compatible server: real HTTP over loopback against the
//! engine running the tiny Mixtral fixture (random weights, so the text is gibberish: the
//! tests check structure, counts and determinism, not content).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use reqwest::{Client, StatusCode};
use serde_json::{json, Value};
use skymoe_serve::engine::{EngineConfig, EngineHandle};
use skymoe_serve::openai::{serve_on, ServerConfig};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

const MODEL_ID: &str = "tiny-mixtral";

/// Context length of the fixture copies used to interrupt long generations.
const LONG_CONTEXT: usize = 16384;

const CHAT_TEMPLATE: &str = "{% for message in messages %}{{ '<|' + message['role'] + '|>\\n' + \
    message['content'] + '</s>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}";

/// A copy of the fixture with a chat template, in a temporary directory; `context` replaces
/// its context length (256) so that a generation can last long enough to be interrupted.
fn model_dir(context: Option<usize>) -> tempfile::TempDir {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/reference/mixtral");
    let dir = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(&src).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_str().unwrap().to_string();
        let wanted = name == "config.json"
            || name == "tokenizer.json"
            || name == "model.safetensors.index.json"
            || (name.starts_with("model-") && name.ends_with(".safetensors"));
        if wanted {
            std::fs::copy(&path, dir.path().join(&name)).unwrap();
        }
    }
    if let Some(n) = context {
        let path = dir.path().join("config.json");
        let mut cfg: Value =
            serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        cfg["max_position_embeddings"] = json!(n);
        std::fs::write(&path, cfg.to_string()).unwrap();
    }
    let tcfg = json!({
        "bos_token": "<s>",
        "eos_token": "</s>",
        "add_bos_token": true,
        "chat_template": CHAT_TEMPLATE,
    });
    std::fs::write(
        dir.path().join("tokenizer_config.json"),
        serde_json::to_string_pretty(&tcfg).unwrap(),
    )
    .unwrap();
    dir
}

/// A server on an ephemeral loopback port.
struct Server {
    base: String,
    engine: EngineHandle,
    client: Client,
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<Result<(), skymoe_serve::openai::ServeError>>>,
    _dir: tempfile::TempDir,
}

impl Server {
    async fn start(config: EngineConfig, server: ServerConfig) -> Server {
        Server::start_with_context(None, config, server).await
    }

    async fn start_with_context(
        context: Option<usize>,
        config: EngineConfig,
        server: ServerConfig,
    ) -> Server {
        let dir = model_dir(context);
        let path: PathBuf = dir.path().to_path_buf();
        let engine = tokio::task::spawn_blocking(move || {
            EngineHandle::load(
                &path,
                None,
                EngineConfig {
                    model_id: MODEL_ID.to_string(),
                    ..config
                },
            )
        })
        .await
        .unwrap()
        .expect("the fixture loads");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(serve_on(listener, engine.clone(), server, async move {
            let _ = rx.await;
        }));
        Server {
            base,
            engine,
            client: Client::new(),
            shutdown: Some(tx),
            task: Some(task),
            _dir: dir,
        }
    }

    async fn default() -> Server {
        Server::start(EngineConfig::default(), ServerConfig::default()).await
    }

    /// A server whose model has a long context (generations of thousands of tokens).
    async fn long() -> Server {
        Server::start_with_context(
            Some(LONG_CONTEXT),
            EngineConfig::default(),
            ServerConfig::default(),
        )
        .await
    }

    /// Wait until every accepted request has finished and the engine's gauges show it.
    async fn idle(&self) {
        self.stats_until("the engine to be idle", |st| {
            st.requests_finished == st.requests_total && st.running == 0 && st.waiting == 0
        })
        .await;
        let t0 = Instant::now();
        while self.engine.in_flight() > 0 {
            assert!(
                t0.elapsed() < Duration::from_secs(10),
                "requests stay in flight"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    async fn post(&self, path: &str, body: &Value) -> (StatusCode, Value) {
        let resp = self
            .client
            .post(self.url(path))
            .json(body)
            .send()
            .await
            .unwrap();
        let status = resp.status();
        let text = resp.text().await.unwrap();
        let value = serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {text:?} (status {status})"));
        (status, value)
    }

    /// POST a streaming request and return the parsed `data:` payloads (the last is `[DONE]`).
    async fn post_stream(&self, path: &str, body: &Value) -> Vec<String> {
        let resp = self
            .client
            .post(self.url(path))
            .json(body)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        let ctype = resp.headers()["content-type"].to_str().unwrap().to_string();
        assert!(ctype.starts_with("text/event-stream"), "{ctype}");
        let text = resp.text().await.unwrap();
        parse_sse(&text)
    }

    async fn stats_until(
        &self,
        what: &str,
        f: impl Fn(&skymoe_serve::engine::EngineStats) -> bool,
    ) {
        let t0 = Instant::now();
        loop {
            let s = self.engine.stats();
            if f(&s) {
                return;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(10),
                "timed out waiting for {what}: {s:?}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Shut down (drain) and check the server returned cleanly.
    async fn stop(mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.task.take() {
            tokio::time::timeout(Duration::from_secs(20), task)
                .await
                .expect("the server drains in time")
                .unwrap()
                .unwrap();
        }
    }
}

/// Split an SSE body into its `data:` payloads, checking the framing.
fn parse_sse(text: &str) -> Vec<String> {
    assert!(text.ends_with("\n\n"), "{text:?}");
    let mut out = Vec::new();
    for event in text.split("\n\n").filter(|e| !e.is_empty()) {
        for line in event.lines() {
            if line.starts_with(':') {
                continue;
            }
            let data = line
                .strip_prefix("data: ")
                .or_else(|| line.strip_prefix("data:"))
                .unwrap_or_else(|| panic!("not a data line: {line:?}"));
            out.push(data.to_string());
        }
    }
    assert_eq!(out.last().map(String::as_str), Some("[DONE]"), "{text}");
    assert_eq!(out.iter().filter(|d| *d == "[DONE]").count(), 1);
    out
}

/// The JSON chunks of a stream (without `[DONE]`).
fn chunks(events: &[String]) -> Vec<Value> {
    events[..events.len() - 1]
        .iter()
        .map(|d| serde_json::from_str(d).unwrap_or_else(|e| panic!("bad chunk {d:?}: {e}")))
        .collect()
}

fn assert_error(status: StatusCode, body: &Value, want: StatusCode) {
    assert_eq!(status, want, "{body}");
    let err = &body["error"];
    assert!(err.is_object(), "{body}");
    assert!(
        err["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{body}"
    );
    assert!(err["type"].is_string(), "{body}");
    assert!(err.get("param").is_some(), "{body}");
    assert!(err.get("code").is_some(), "{body}");
}

fn completion_body(prompt: Value, max_tokens: usize) -> Value {
    json!({
        "model": MODEL_ID,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": true,
    })
}

fn check_completion_shape(v: &Value) {
    assert!(v["id"].as_str().unwrap().starts_with("cmpl-"), "{v}");
    assert_eq!(v["object"], "text_completion");
    assert!(v["created"].as_u64().unwrap() > 1_600_000_000);
    assert_eq!(v["model"], MODEL_ID);
    let choices = v["choices"].as_array().unwrap();
    assert_eq!(choices.len(), 1);
    assert_eq!(choices[0]["index"], 0);
    assert!(choices[0]["text"].is_string());
    assert!(choices[0]["logprobs"].is_null());
}

fn process_rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn completion_non_streaming_counts_and_determinism() {
    let s = Server::default().await;
    let prompt = "The quick brown fox";
    let prompt_ids = s.engine.tokenizer().encode_prompt(prompt).unwrap();

    let (st, a) = s
        .post("/v1/completions", &completion_body(json!(prompt), 12))
        .await;
    assert_eq!(st, StatusCode::OK, "{a}");
    check_completion_shape(&a);
    assert_eq!(a["choices"][0]["finish_reason"], "length");
    assert_eq!(a["usage"]["prompt_tokens"], prompt_ids.len());
    assert_eq!(a["usage"]["completion_tokens"], 12);
    assert_eq!(a["usage"]["total_tokens"], prompt_ids.len() + 12);

    // Greedy: the same again, and the same from the token ids of the prompt.
    let (_, b) = s
        .post("/v1/completions", &completion_body(json!(prompt), 12))
        .await;
    assert_eq!(a["choices"][0]["text"], b["choices"][0]["text"]);
    assert_ne!(a["id"], b["id"]);
    let (st, c) = s
        .post("/v1/completions", &completion_body(json!(prompt_ids), 12))
        .await;
    assert_eq!(st, StatusCode::OK, "{c}");
    assert_eq!(a["choices"][0]["text"], c["choices"][0]["text"]);
    // A one-element array of prompts is one prompt.
    let (st, d) = s
        .post("/v1/completions", &completion_body(json!([prompt]), 12))
        .await;
    assert_eq!(st, StatusCode::OK, "{d}");
    assert_eq!(a["choices"][0]["text"], d["choices"][0]["text"]);

    // Defaults: no max_tokens means 16 tokens at most; max_completion_tokens is accepted.
    let (st, e) = s
        .post(
            "/v1/completions",
            &json!({"model": MODEL_ID, "prompt": prompt, "temperature": 0, "ignore_eos": true}),
        )
        .await;
    assert_eq!(st, StatusCode::OK, "{e}");
    assert_eq!(e["usage"]["completion_tokens"], 16);
    let (st, f) = s
        .post(
            "/v1/completions",
            &json!({"model": MODEL_ID, "prompt": prompt, "temperature": 0, "ignore_eos": true,
                    "max_completion_tokens": 5}),
        )
        .await;
    assert_eq!(st, StatusCode::OK, "{f}");
    assert_eq!(f["usage"]["completion_tokens"], 5);

    // Sampling with a seed is reproducible.
    let sampled = json!({"model": MODEL_ID, "prompt": prompt, "max_tokens": 10, "temperature": 0.9,
                         "top_p": 0.95, "top_k": 50, "seed": 1234, "ignore_eos": true});
    let (st, g) = s.post("/v1/completions", &sampled).await;
    assert_eq!(st, StatusCode::OK, "{g}");
    let (_, h) = s.post("/v1/completions", &sampled).await;
    assert_eq!(g["choices"][0]["text"], h["choices"][0]["text"]);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn completion_streaming_matches_non_streaming() {
    let s = Server::default().await;
    let prompt = "Once upon a time";
    let mut body = completion_body(json!(prompt), 20);
    let (st, full) = s.post("/v1/completions", &body).await;
    assert_eq!(st, StatusCode::OK);

    body["stream"] = json!(true);
    body["stream_options"] = json!({"include_usage": true});
    let events = s.post_stream("/v1/completions", &body).await;
    let chunks = chunks(&events);
    let id = chunks[0]["id"].as_str().unwrap().to_string();
    let mut text = String::new();
    let mut finish = Vec::new();
    for c in &chunks {
        assert_eq!(c["object"], "text_completion");
        assert_eq!(c["id"], id.as_str());
        assert_eq!(c["model"], MODEL_ID);
        for ch in c["choices"].as_array().unwrap() {
            text.push_str(ch["text"].as_str().unwrap());
            if !ch["finish_reason"].is_null() {
                finish.push(ch["finish_reason"].as_str().unwrap().to_string());
            }
        }
    }
    assert_eq!(text, full["choices"][0]["text"].as_str().unwrap());
    assert_eq!(finish, vec!["length"]);
    let last = chunks.last().unwrap();
    assert_eq!(last["choices"].as_array().unwrap().len(), 0);
    assert_eq!(last["usage"], full["usage"]);
    assert!(chunks[..chunks.len() - 1]
        .iter()
        .all(|c| c.get("usage").is_none_or(Value::is_null)));

    // Without include_usage there is no usage chunk.
    body["stream_options"] = json!(null);
    let chunks2 = self::chunks(&s.post_stream("/v1/completions", &body).await);
    assert!(chunks2
        .iter()
        .all(|c| c.get("usage").is_none_or(Value::is_null)));
    assert_eq!(
        chunks2.last().unwrap()["choices"][0]["finish_reason"],
        "length"
    );
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_completion_both_ways() {
    let s = Server::default().await;
    let messages = json!([
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": [{"type": "text", "text": "Say hello."}]},
    ]);
    let body = json!({"model": MODEL_ID, "messages": messages, "max_tokens": 15,
                      "temperature": 0, "ignore_eos": true});
    let (st, full) = s.post("/v1/chat/completions", &body).await;
    assert_eq!(st, StatusCode::OK, "{full}");
    assert!(full["id"].as_str().unwrap().starts_with("chatcmpl-"));
    assert_eq!(full["object"], "chat.completion");
    assert_eq!(full["model"], MODEL_ID);
    let choice = &full["choices"][0];
    assert_eq!(choice["index"], 0);
    assert_eq!(choice["message"]["role"], "assistant");
    assert!(choice["message"]["content"].is_string());
    assert!(choice["logprobs"].is_null());
    assert_eq!(choice["finish_reason"], "length");
    assert_eq!(full["usage"]["completion_tokens"], 15);
    assert!(full["usage"]["prompt_tokens"].as_u64().unwrap() > 10);

    let (_, again) = s.post("/v1/chat/completions", &body).await;
    assert_eq!(
        again["choices"][0]["message"]["content"],
        choice["message"]["content"]
    );

    let mut sbody = body.clone();
    sbody["stream"] = json!(true);
    sbody["stream_options"] = json!({"include_usage": true});
    let chunks = chunks(&s.post_stream("/v1/chat/completions", &sbody).await);
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let mut text = String::new();
    let mut finish = Vec::new();
    for c in &chunks {
        assert_eq!(c["object"], "chat.completion.chunk");
        assert_eq!(c["id"], chunks[0]["id"]);
        for ch in c["choices"].as_array().unwrap() {
            if let Some(t) = ch["delta"]["content"].as_str() {
                text.push_str(t);
            }
            if let Some(r) = ch["finish_reason"].as_str() {
                finish.push(r.to_string());
            }
        }
    }
    assert_eq!(text, choice["message"]["content"].as_str().unwrap());
    assert_eq!(finish, vec!["length"]);
    assert_eq!(chunks.last().unwrap()["usage"], full["usage"]);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn models_health_and_metrics() {
    let s = Server::default().await;
    let r = s.client.get(s.url("/health")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let models: Value = s
        .client
        .get(s.url("/v1/models"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(models["object"], "list");
    assert_eq!(models["data"][0]["id"], MODEL_ID);
    assert_eq!(models["data"][0]["object"], "model");
    assert_eq!(
        models["data"][0]["max_model_len"],
        s.engine.context_length()
    );
    let one = s
        .client
        .get(s.url(&format!("/v1/models/{MODEL_ID}")))
        .send()
        .await
        .unwrap();
    assert_eq!(one.status(), StatusCode::OK);
    let missing = s.client.get(s.url("/v1/models/nope")).send().await.unwrap();
    assert_eq!(missing.status(), StatusCode::NOT_FOUND);

    let metric = |text: &str, name: &str| -> f64 {
        text.lines()
            .find(|l| l.starts_with(&format!("{name}{{")) || l.starts_with(&format!("{name} ")))
            .unwrap_or_else(|| panic!("no {name} in\n{text}"))
            .rsplit(' ')
            .next()
            .unwrap()
            .parse()
            .unwrap()
    };
    let get_metrics = || async {
        let r = s.client.get(s.url("/metrics")).send().await.unwrap();
        assert_eq!(r.status(), StatusCode::OK);
        assert!(r.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/plain"));
        r.text().await.unwrap()
    };
    let before = get_metrics().await;
    for name in [
        "skymoe_requests_total",
        "skymoe_requests_running",
        "skymoe_requests_waiting",
        "skymoe_prompt_tokens_total",
        "skymoe_generation_tokens_total",
        "skymoe_generation_tokens_per_second",
        "skymoe_kv_cache_usage_ratio",
        "skymoe_kv_cache_blocks_used",
        "skymoe_kv_cache_blocks_total",
        "skymoe_preemptions_total",
        "skymoe_requests_cancelled_total",
    ] {
        assert!(before.contains(&format!("# TYPE {name} ")), "{name}");
        metric(&before, name);
    }
    let (st, r) = s
        .post("/v1/completions", &completion_body(json!("metrics"), 7))
        .await;
    assert_eq!(st, StatusCode::OK);
    s.idle().await;
    let after = get_metrics().await;
    assert_eq!(
        metric(&after, "skymoe_requests_total"),
        metric(&before, "skymoe_requests_total") + 1.0
    );
    assert_eq!(
        metric(&after, "skymoe_generation_tokens_total"),
        metric(&before, "skymoe_generation_tokens_total") + 7.0
    );
    assert_eq!(
        metric(&after, "skymoe_prompt_tokens_total"),
        metric(&before, "skymoe_prompt_tokens_total")
            + r["usage"]["prompt_tokens"].as_f64().unwrap()
    );
    assert_eq!(metric(&after, "skymoe_requests_running"), 0.0);
    assert!(after.contains("skymoe_http_responses_total{route=\"/v1/completions\",code=\"200\"} 1"));
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_have_openai_shape_and_status() {
    let s = Server::default().await;
    let ctx = s.engine.context_length();
    let bad = StatusCode::BAD_REQUEST;
    let m = MODEL_ID;
    let cases: Vec<(&str, Value, Option<&str>)> = vec![
        ("missing model", json!({"prompt": "x"}), Some("model")),
        (
            "unknown model",
            json!({"model": "gpt-9", "prompt": "x"}),
            Some("model"),
        ),
        ("missing prompt", json!({"model": m}), Some("prompt")),
        (
            "prompt wrong type",
            json!({"model": m, "prompt": 5}),
            Some("prompt"),
        ),
        (
            "empty prompt list",
            json!({"model": m, "prompt": []}),
            Some("prompt"),
        ),
        (
            "temperature string",
            json!({"model": m, "prompt": "x", "temperature": "hot"}),
            Some("temperature"),
        ),
        (
            "temperature negative",
            json!({"model": m, "prompt": "x", "temperature": -1}),
            Some("temperature"),
        ),
        (
            "top_p zero",
            json!({"model": m, "prompt": "x", "top_p": 0}),
            Some("top_p"),
        ),
        (
            "top_p above one",
            json!({"model": m, "prompt": "x", "top_p": 1.5}),
            Some("top_p"),
        ),
        (
            "top_k negative",
            json!({"model": m, "prompt": "x", "top_k": -5}),
            Some("top_k"),
        ),
        (
            "min_p above one",
            json!({"model": m, "prompt": "x", "min_p": 2}),
            Some("min_p"),
        ),
        (
            "repetition_penalty zero",
            json!({"model": m, "prompt": "x", "repetition_penalty": 0}),
            Some("repetition_penalty"),
        ),
        (
            "presence_penalty",
            json!({"model": m, "prompt": "x", "presence_penalty": 3}),
            Some("presence_penalty"),
        ),
        (
            "frequency_penalty",
            json!({"model": m, "prompt": "x", "frequency_penalty": -3}),
            Some("frequency_penalty"),
        ),
        (
            "max_tokens zero",
            json!({"model": m, "prompt": "x", "max_tokens": 0}),
            Some("max_tokens"),
        ),
        (
            "max_tokens wrong type",
            json!({"model": m, "prompt": "x", "max_tokens": "ten"}),
            Some("max_tokens"),
        ),
        (
            "max_tokens beyond context",
            json!({"model": m, "prompt": "x", "max_tokens": ctx + 5}),
            Some("max_tokens"),
        ),
        (
            "prompt too long",
            json!({"model": m, "prompt": vec![5u32; ctx + 10]}),
            Some("prompt"),
        ),
        (
            "token id out of vocabulary",
            json!({"model": m, "prompt": [5, 99999], "max_tokens": 2}),
            None,
        ),
        (
            "n = 0",
            json!({"model": m, "prompt": "x", "n": 0}),
            Some("n"),
        ),
        (
            "suffix",
            json!({"model": m, "prompt": "x", "suffix": "y"}),
            Some("suffix"),
        ),
        (
            "best_of",
            json!({"model": m, "prompt": "x", "best_of": 3}),
            Some("best_of"),
        ),
        (
            "logprobs",
            json!({"model": m, "prompt": "x", "logprobs": 21}),
            Some("logprobs"),
        ),
        (
            "stop wrong type",
            json!({"model": m, "prompt": "x", "stop": 7}),
            Some("stop"),
        ),
        (
            "stream wrong type",
            json!({"model": m, "prompt": "x", "stream": "yes"}),
            Some("stream"),
        ),
        ("body not an object", json!([1, 2]), None),
    ];
    for (what, body, param) in cases {
        let (st, v) = s.post("/v1/completions", &body).await;
        assert_error(st, &v, bad);
        assert_eq!(v["error"]["param"].as_str(), param, "{what}: {v}");
    }
    let chat_cases: Vec<(&str, Value)> = vec![
        ("missing messages", json!({"model": m})),
        ("empty messages", json!({"model": m, "messages": []})),
        (
            "message without role",
            json!({"model": m, "messages": [{"content": "hi"}]}),
        ),
        ("messages wrong type", json!({"model": m, "messages": "hi"})),
        (
            "image part",
            json!({"model": m, "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}),
        ),
        (
            "n = 0",
            json!({"model": m, "n": 0, "messages": [{"role": "user", "content": "hi"}]}),
        ),
        (
            "unknown model",
            json!({"model": "x", "messages": [{"role": "user", "content": "hi"}]}),
        ),
    ];
    for (what, body) in chat_cases {
        let (st, v) = s.post("/v1/chat/completions", &body).await;
        assert_error(st, &v, bad);
        assert!(v["error"]["message"].is_string(), "{what}");
    }

    let raw = |path: &'static str, body: &'static str| {
        let c = s.client.clone();
        let url = s.url(path);
        async move {
            let r = c
                .post(url)
                .header("content-type", "application/json")
                .body(body)
                .send()
                .await
                .unwrap();
            let st = r.status();
            (st, r.json::<Value>().await.unwrap())
        }
    };
    let (st, v) = raw("/v1/completions", "{\"model\": ").await;
    assert_error(st, &v, bad);
    let (st, v) = raw("/v1/chat/completions", "not json").await;
    assert_error(st, &v, bad);
    let (st, v) = raw("/v1/completions", "").await;
    assert_error(st, &v, bad);

    // Unknown route, wrong method.
    let r = s.client.get(s.url("/v1/nothing")).send().await.unwrap();
    let st = r.status();
    assert_error(st, &r.json().await.unwrap(), StatusCode::NOT_FOUND);
    let r = s.client.get(s.url("/v1/completions")).send().await.unwrap();
    let st = r.status();
    assert_error(st, &r.json().await.unwrap(), StatusCode::METHOD_NOT_ALLOWED);
    let r = s.client.post(s.url("/health")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::METHOD_NOT_ALLOWED);

    // Body over the limit.
    let big = format!(
        "{{\"model\": \"{m}\", \"prompt\": \"{}\"}}",
        "a".repeat(5 << 20)
    );
    let r = s
        .client
        .post(s.url("/v1/completions"))
        .header("content-type", "application/json")
        .body(big)
        .send()
        .await
        .unwrap();
    let st = r.status();
    assert_error(st, &r.json().await.unwrap(), StatusCode::PAYLOAD_TOO_LARGE);

    // Nothing was generated for any of these.
    let stats = s.engine.stats();
    assert_eq!(stats.generated_tokens_total, 0, "{stats:?}");
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_key_is_required_when_set() {
    let s = Server::start(
        EngineConfig::default(),
        ServerConfig {
            api_key: Some("sekret".to_string()),
            ..ServerConfig::default()
        },
    )
    .await;
    let body = completion_body(json!("hi"), 2);
    let r = s
        .client
        .post(s.url("/v1/completions"))
        .json(&body)
        .send()
        .await
        .unwrap();
    let st = r.status();
    assert_error(st, &r.json().await.unwrap(), StatusCode::UNAUTHORIZED);
    let r = s
        .client
        .post(s.url("/v1/completions"))
        .bearer_auth("wrong")
        .json(&body)
        .send()
        .await
        .unwrap();
    let st = r.status();
    assert_error(st, &r.json().await.unwrap(), StatusCode::UNAUTHORIZED);
    let r = s.client.get(s.url("/v1/models")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    let r = s
        .client
        .post(s.url("/v1/completions"))
        .bearer_auth("sekret")
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let r = s.client.get(s.url("/health")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_disconnect_cancels_generation() {
    let s = Server::long().await;
    let ctx = s.engine.context_length();
    let prompt = s.engine.tokenizer().encode_prompt("cancel me").unwrap();
    let max_tokens = ctx - prompt.len();

    // Streaming: read one chunk, then drop the connection.
    let mut body = completion_body(json!("cancel me"), max_tokens);
    body["stream"] = json!(true);
    let resp = s
        .client
        .post(s.url("/v1/completions"))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let mut bytes = resp.bytes_stream();
    let first = bytes.next().await.unwrap().unwrap();
    assert!(first.starts_with(b"data: "));
    drop(bytes);
    s.stats_until("the streaming request to be cancelled", |st| {
        st.requests_cancelled >= 1 && st.running == 0 && st.waiting == 0
    })
    .await;
    assert!(s.engine.stats().generated_tokens_total < max_tokens as u64 / 2);

    // Non-streaming: abandon the request while it runs.
    body["stream"] = json!(false);
    let client = s.client.clone();
    let url = s.url("/v1/completions");
    let pending = tokio::spawn(async move { client.post(url).json(&body).send().await });
    let generated = s.engine.stats().generated_tokens_total;
    s.stats_until("the request to start generating", |st| {
        st.requests_total >= 2 && st.generated_tokens_total > generated
    })
    .await;
    pending.abort();
    s.stats_until("the non-streaming request to be cancelled", |st| {
        st.requests_cancelled >= 2 && st.running == 0 && st.waiting == 0
    })
    .await;
    assert!(s.engine.stats().generated_tokens_total < max_tokens as u64);
    s.idle().await;
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_clients_match_sequential() {
    let s = Server::default().await;
    let prompts: Vec<String> = (0..8).map(|i| format!("prompt number {i}:")).collect();
    let mut sequential = Vec::new();
    for p in &prompts {
        let (st, v) = s
            .post("/v1/completions", &completion_body(json!(p), 10))
            .await;
        assert_eq!(st, StatusCode::OK);
        sequential.push(v["choices"][0]["text"].as_str().unwrap().to_string());
    }
    let futures = prompts.iter().enumerate().map(|(i, p)| {
        let s = &s;
        async move {
            let mut body = completion_body(json!(p), 10);
            if i % 2 == 1 {
                body["stream"] = json!(true);
                let c = chunks(&s.post_stream("/v1/completions", &body).await);
                c.iter()
                    .flat_map(|c| c["choices"].as_array().unwrap().clone())
                    .map(|ch| ch["text"].as_str().unwrap().to_string())
                    .collect::<String>()
            } else {
                let (st, v) = s.post("/v1/completions", &body).await;
                assert_eq!(st, StatusCode::OK);
                v["choices"][0]["text"].as_str().unwrap().to_string()
            }
        }
    });
    let concurrent = futures_util::future::join_all(futures).await;
    assert_eq!(concurrent, sequential);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn saturated_engine_answers_429() {
    let s = Server::start_with_context(
        Some(LONG_CONTEXT),
        EngineConfig {
            max_batch: 1,
            max_queue: 1,
            ..EngineConfig::default()
        },
        ServerConfig::default(),
    )
    .await;
    let ctx = s.engine.context_length();
    let mut body = completion_body(json!("busy"), ctx - 8);
    body["stream"] = json!(true);
    let resp = s
        .client
        .post(s.url("/v1/completions"))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let mut first = resp.bytes_stream();
    first.next().await.unwrap().unwrap();

    let (st, v) = s
        .post("/v1/completions", &completion_body(json!("more"), 2))
        .await;
    assert_error(st, &v, StatusCode::TOO_MANY_REQUESTS);

    drop(first);
    s.idle().await;
    assert_eq!(s.engine.stats().requests_cancelled, 1);
    let (st, v) = s
        .post("/v1/completions", &completion_body(json!("more"), 2))
        .await;
    assert_eq!(st, StatusCode::OK, "{v} {:?}", s.engine.stats());
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_finishes_running_requests() {
    let s = Server::default().await;
    let mut body = completion_body(json!("drain"), 40);
    body["stream"] = json!(true);
    let resp = s
        .client
        .post(s.url("/v1/completions"))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let base = s.base.clone();
    let engine = s.engine.clone();
    let stopping = tokio::spawn(s.stop());
    let text = resp.text().await.unwrap();
    let chunks = chunks(&parse_sse(&text));
    assert_eq!(
        chunks.last().unwrap()["choices"][0]["finish_reason"],
        "length"
    );
    stopping.await.unwrap();
    let stats = engine.stats();
    assert_eq!(stats.requests_cancelled, 0, "{stats:?}");
    assert_eq!(stats.generated_tokens_total, 40);
    // The listener is closed.
    assert!(Client::new()
        .get(format!("{base}/health"))
        .send()
        .await
        .is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn load_test_has_no_errors_and_bounded_memory() {
    let s = Server::start(
        EngineConfig {
            max_batch: 16,
            max_queue: 64,
            ..EngineConfig::default()
        },
        ServerConfig::default(),
    )
    .await;
    let run = |n: usize| {
        let s = &s;
        futures_util::stream::iter(0..n)
            .map(move |i| async move {
                let mut body = completion_body(json!(format!("load {i}")), 4);
                if i % 3 == 0 {
                    body["stream"] = json!(true);
                    let c = chunks(&s.post_stream("/v1/completions", &body).await);
                    assert!(!c.is_empty());
                } else {
                    let (st, v) = s.post("/v1/completions", &body).await;
                    assert_eq!(st, StatusCode::OK, "{v}");
                    assert_eq!(v["usage"]["completion_tokens"], 4);
                }
            })
            .buffer_unordered(16)
            .collect::<Vec<()>>()
    };
    run(48).await; // warm-up
    let rss_warm = process_rss_kib();
    let t0 = Instant::now();
    run(200).await;
    let elapsed = t0.elapsed();
    let rss_after = process_rss_kib();
    eprintln!(
        "load: 200 requests in {:.2} s; RSS {} → {} MiB",
        elapsed.as_secs_f64(),
        rss_warm / 1024,
        rss_after / 1024
    );
    // Generous: other tests share this process and run at the same time.
    assert!(
        rss_after < rss_warm + 256 * 1024,
        "RSS grew from {rss_warm} KiB to {rss_after} KiB"
    );
    let stats = s.engine.stats();
    assert_eq!(stats.requests_total, 248);
    assert_eq!(stats.requests_cancelled, 0);
    assert_eq!(stats.running, 0);
    s.stop().await;
}
