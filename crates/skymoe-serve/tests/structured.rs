//! Structured outputs and tool calling over real HTTP against the tiny Mixtral fixture
//! (random weights): `response_format` `json_object` and `json_schema` (strict), `tools`
//! with `tool_choice` `none`, `auto`, `required` and a named function, streamed tool-call
//! deltas, tool messages in the history, and the 400s for an invalid schema and an unknown
//! tool. Outputs of a random model must still parse and validate: the constraints decide.
//!
//! The fixture's context (256 positions) is too small for a tool prompt in its byte-level
//! vocabulary, so the tests serve a copy whose `config.json` allows 4096 positions (RoPE
//! computes any position; the weights are random anyway).

use std::path::{Path, PathBuf};

use reqwest::{Client, StatusCode};
use serde_json::{json, Value};
use skymoe_serve::engine::{EngineConfig, EngineHandle};
use skymoe_serve::openai::{serve_on, ServerConfig};

const MODEL_ID: &str = "tiny-mixtral";

fn fixture_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/reference/mixtral")
}

/// A copy of the Mixtral fixture with a 4096-position context, and optionally a
/// `tokenizer_config.json` carrying `chat_template`.
fn model_copy(template: Option<&str>) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for e in std::fs::read_dir(fixture_dir()).unwrap() {
        let e = e.unwrap();
        let name = e.file_name();
        let name = name.to_string_lossy();
        if name == "config.json" {
            let mut c: Value =
                serde_json::from_str(&std::fs::read_to_string(e.path()).unwrap()).unwrap();
            c["max_position_embeddings"] = json!(4096);
            std::fs::write(dir.path().join("config.json"), c.to_string()).unwrap();
        } else if name.starts_with("model") || name == "tokenizer.json" {
            std::fs::copy(e.path(), dir.path().join(&*name)).unwrap();
        }
    }
    if let Some(t) = template {
        let cfg = json!({"chat_template": t, "bos_token": "<s>", "eos_token": "</s>"});
        std::fs::write(dir.path().join("tokenizer_config.json"), cfg.to_string()).unwrap();
    }
    dir
}

/// A server on an ephemeral loopback port (stopped when the test's runtime ends).
struct Server {
    base: String,
    client: Client,
    _dir: tempfile::TempDir,
}

impl Server {
    async fn start(template: Option<&str>) -> Server {
        let dir = model_copy(template);
        let path = dir.path().to_path_buf();
        let engine = tokio::task::spawn_blocking(move || {
            EngineHandle::load(
                &path,
                None,
                EngineConfig {
                    model_id: MODEL_ID.to_string(),
                    kv_blocks: Some(4096),
                    ..EngineConfig::default()
                },
            )
        })
        .await
        .unwrap()
        .expect("the fixture loads");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(serve_on(
            listener,
            engine,
            ServerConfig::default(),
            std::future::pending(),
        ));
        Server {
            base,
            client: Client::new(),
            _dir: dir,
        }
    }

    async fn post(&self, path: &str, body: &Value) -> (StatusCode, Value) {
        let resp = self
            .client
            .post(format!("{}{path}", self.base))
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

    async fn chat(&self, body: Value) -> Value {
        let (st, v) = self.post("/v1/chat/completions", &body).await;
        assert_eq!(st, StatusCode::OK, "{v}");
        v
    }

    /// The JSON chunks of a streamed answer (checks the `[DONE]` ending).
    async fn stream(&self, body: Value) -> Vec<Value> {
        let resp = self
            .client
            .post(format!("{}/v1/chat/completions", self.base))
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        let text = resp.text().await.unwrap();
        let data: Vec<&str> = text
            .split("\n\n")
            .filter(|e| !e.is_empty())
            .flat_map(|e| e.lines())
            .filter(|l| !l.starts_with(':'))
            .map(|l| l.strip_prefix("data: ").expect("a data line"))
            .collect();
        assert_eq!(data.last(), Some(&"[DONE]"), "{text}");
        data[..data.len() - 1]
            .iter()
            .map(|d| serde_json::from_str(d).unwrap())
            .collect()
    }
}

/// A JSON-schema validator for the keywords these tests use.
fn validate(schema: &Value, v: &Value) -> Result<(), String> {
    let Some(s) = schema.as_object() else {
        return Ok(());
    };
    if let Some(t) = s.get("type").and_then(Value::as_str) {
        let ok = match t {
            "object" => v.is_object(),
            "array" => v.is_array(),
            "string" => v.is_string(),
            "integer" => v.is_i64() || v.is_u64(),
            "number" => v.is_number(),
            "boolean" => v.is_boolean(),
            "null" => v.is_null(),
            _ => true,
        };
        if !ok {
            return Err(format!("{v} is not of type {t}"));
        }
    }
    if let Some(e) = s.get("enum").and_then(Value::as_array) {
        if !e.contains(v) {
            return Err(format!("{v} not in {e:?}"));
        }
    }
    if let Some(c) = s.get("const") {
        if c != v {
            return Err(format!("{v} is not {c}"));
        }
    }
    if let (Some(min), Some(x)) = (s.get("minimum").and_then(Value::as_f64), v.as_f64()) {
        if x < min {
            return Err(format!("{x} < {min}"));
        }
    }
    if let (Some(max), Some(x)) = (s.get("maximum").and_then(Value::as_f64), v.as_f64()) {
        if x > max {
            return Err(format!("{x} > {max}"));
        }
    }
    if let (Some(max), Some(x)) = (s.get("maxLength").and_then(Value::as_u64), v.as_str()) {
        if x.chars().count() as u64 > max {
            return Err(format!("{x:?} longer than {max}"));
        }
    }
    if let Some(o) = v.as_object() {
        let props = s.get("properties").and_then(Value::as_object);
        for r in s
            .get("required")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            let r = r.as_str().unwrap_or_default();
            if !o.contains_key(r) {
                return Err(format!("missing {r} in {v}"));
            }
        }
        for (k, x) in o {
            match props.and_then(|p| p.get(k)) {
                Some(ps) => validate(ps, x)?,
                None if s.get("additionalProperties") == Some(&json!(false)) => {
                    return Err(format!("unexpected property {k} in {v}"))
                }
                None => {}
            }
        }
    }
    if let Some(a) = v.as_array() {
        if let Some(max) = s.get("maxItems").and_then(Value::as_u64) {
            if a.len() as u64 > max {
                return Err(format!("{} items > {max}", a.len()));
            }
        }
        if let Some(min) = s.get("minItems").and_then(Value::as_u64) {
            if (a.len() as u64) < min {
                return Err(format!("{} items < {min}", a.len()));
            }
        }
        if let Some(items) = s.get("items") {
            for x in a {
                validate(items, x)?;
            }
        }
    }
    if let Some(any) = s.get("anyOf").and_then(Value::as_array) {
        if !any.iter().any(|a| validate(a, v).is_ok()) {
            return Err(format!("{v} matches no anyOf branch"));
        }
    }
    Ok(())
}

fn person_schema() -> Value {
    json!({
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 8},
            "age": {"type": "integer", "minimum": 0, "maximum": 150},
            "admin": {"type": "boolean"},
            "role": {"enum": ["admin", "user", "guest"]},
            "tags": {"type": "array", "items": {"type": "string", "maxLength": 4}, "maxItems": 2}
        },
        "required": ["name", "age", "admin", "role", "tags"],
        "additionalProperties": false
    })
}

fn tools() -> Value {
    json!([
        {"type": "function", "function": {
            "name": "get_weather",
            "description": "Weather in a city",
            "parameters": {
                "type": "object",
                "properties": {
                    "city": {"type": "string", "maxLength": 10},
                    "unit": {"enum": ["c", "f"]}
                },
                "required": ["city", "unit"],
                "additionalProperties": false
            }
        }},
        {"type": "function", "function": {
            "name": "add",
            "parameters": {
                "type": "object",
                "properties": {
                    "a": {"type": "integer", "minimum": -100, "maximum": 100},
                    "b": {"type": "integer", "minimum": -100, "maximum": 100}
                },
                "required": ["a", "b"],
                "additionalProperties": false
            }
        }}
    ])
}

/// The parameters schema of the tool `name`.
fn params_of(name: &str) -> Value {
    tools()
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["function"]["name"] == name)
        .map(|t| t["function"]["parameters"].clone())
        .unwrap_or_else(|| panic!("no tool {name}"))
}

fn user(text: &str) -> Value {
    json!([{"role": "user", "content": text}])
}

/// Checks one tool call of a response and returns its function's name.
fn check_call(call: &Value) -> String {
    assert_eq!(call["type"], "function", "{call}");
    let id = call["id"].as_str().expect("an id");
    assert!(id.starts_with("call_"), "{id}");
    let name = call["function"]["name"]
        .as_str()
        .expect("a name")
        .to_string();
    let args: Value = serde_json::from_str(call["function"]["arguments"].as_str().unwrap())
        .unwrap_or_else(|e| panic!("arguments are not JSON ({e}): {call}"));
    validate(&params_of(&name), &args).unwrap_or_else(|e| panic!("{e}: {call}"));
    name
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_schema_outputs_validate() {
    let s = Server::start(None).await;
    let schema = person_schema();
    for strict in [true, false] {
        let v = s
            .chat(json!({
                "model": MODEL_ID,
                "messages": user("A person as JSON."),
                "max_tokens": 400,
                "temperature": 1.0,
                "seed": 7,
                "n": 4,
                "logprobs": true,
                "top_logprobs": 2,
                "response_format": {"type": "json_schema", "json_schema": {
                    "name": "person", "schema": schema, "strict": strict}}
            }))
            .await;
        let choices = v["choices"].as_array().unwrap();
        assert_eq!(choices.len(), 4);
        for c in choices {
            assert_eq!(c["finish_reason"], "stop", "{c}");
            let text = c["message"]["content"].as_str().unwrap();
            let out: Value = serde_json::from_str(text).unwrap_or_else(|e| panic!("{e}: {text:?}"));
            validate(&schema, &out).unwrap_or_else(|e| panic!("{e}: {text}"));
            // Log-probabilities of the masked logits: every chosen token was allowed.
            for t in c["logprobs"]["content"].as_array().unwrap() {
                assert!(t["logprob"].as_f64().unwrap() > -9999.0, "{t}");
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_object_outputs_are_objects() {
    let s = Server::start(None).await;
    // `ignore_eos` does not let a constrained generation run past its end.
    let v = s
        .chat(json!({
            "model": MODEL_ID,
            "messages": user("Any JSON object."),
            "max_tokens": 1500,
            "temperature": 1.0,
            "seed": 3,
            "n": 6,
            "ignore_eos": true,
            "response_format": {"type": "json_object"}
        }))
        .await;
    let mut finished = 0;
    for c in v["choices"].as_array().unwrap() {
        let text = c["message"]["content"].as_str().unwrap();
        assert!(text.starts_with('{'), "{text:?}");
        if c["finish_reason"] == "stop" {
            finished += 1;
            match serde_json::from_str::<Value>(text) {
                Ok(o) => assert!(o.is_object(), "{text}"),
                // Valid JSON whose numbers overflow an f64 (`1e999`): serde_json refuses them.
                Err(e) if e.to_string().starts_with("number out of range") => {}
                Err(e) => panic!("{e}: {text:?}"),
            }
        } else {
            assert_eq!(c["finish_reason"], "length", "{c}");
        }
    }
    assert!(finished >= 3, "only {finished} of 6 finished: {v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tool_choice_required_and_named_validate() {
    let s = Server::start(None).await;
    let v = s
        .chat(json!({
            "model": MODEL_ID,
            "messages": user("Weather in Paris, and 2 + 3?"),
            "max_tokens": 600,
            "temperature": 1.0,
            "seed": 11,
            "n": 3,
            "tools": tools(),
            "tool_choice": "required"
        }))
        .await;
    for c in v["choices"].as_array().unwrap() {
        assert_eq!(c["finish_reason"], "tool_calls", "{c}");
        assert!(c["message"]["content"].is_null(), "{c}");
        let calls = c["message"]["tool_calls"].as_array().expect("tool calls");
        assert!(!calls.is_empty());
        for call in calls {
            check_call(call);
        }
    }
    for name in ["get_weather", "add"] {
        let v = s
            .chat(json!({
                "model": MODEL_ID,
                "messages": user("Call it."),
                "max_tokens": 300,
                "temperature": 1.0,
                "seed": 5,
                "n": 2,
                "tools": tools(),
                "tool_choice": {"type": "function", "function": {"name": name}}
            }))
            .await;
        for c in v["choices"].as_array().unwrap() {
            assert_eq!(c["finish_reason"], "tool_calls", "{c}");
            let calls = c["message"]["tool_calls"].as_array().expect("tool calls");
            assert_eq!(calls.len(), 1);
            assert_eq!(check_call(&calls[0]), name);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tool_choice_none_and_auto_answer_text() {
    let s = Server::start(None).await;
    let plain = s
        .chat(json!({"model": MODEL_ID, "messages": user("Hi"), "max_tokens": 4}))
        .await;
    for choice in [json!("none"), json!("auto"), Value::Null] {
        let v = s
            .chat(json!({
                "model": MODEL_ID,
                "messages": user("Hi"),
                "max_tokens": 12,
                "tools": tools(),
                "tool_choice": choice
            }))
            .await;
        let c = &v["choices"][0];
        // A random model writes no `<tool_call>`: the answer is text.
        assert!(c["message"]["content"].is_string(), "{c}");
        assert!(c["message"].get("tool_calls").is_none(), "{c}");
        assert!(["stop", "length"].contains(&c["finish_reason"].as_str().unwrap()));
        // The tools are shown to the model (the built-in tool prompt: ChatML ignores tools).
        assert!(
            v["usage"]["prompt_tokens"].as_u64().unwrap()
                > plain["usage"]["prompt_tokens"].as_u64().unwrap() + 100,
            "{v}"
        );
    }
}

/// A streamed tool call put together: (id, name, arguments).
type Call = (String, String, String);

/// Tool-call deltas of a stream, per choice, and the finish reasons.
fn assemble_stream(chunks: &[Value]) -> (Vec<Vec<Call>>, Vec<String>) {
    let mut calls: Vec<Vec<Call>> = Vec::new();
    let mut reasons = Vec::new();
    let mut roles = 0;
    for ch in chunks {
        for c in ch["choices"].as_array().unwrap() {
            let i = c["index"].as_u64().unwrap() as usize;
            if calls.len() <= i {
                calls.resize(i + 1, Vec::new());
            }
            let delta = &c["delta"];
            if delta["role"] == "assistant" {
                roles += 1;
            }
            for d in delta["tool_calls"].as_array().into_iter().flatten() {
                let k = d["index"].as_u64().unwrap() as usize;
                if let Some(id) = d["id"].as_str() {
                    assert_eq!(k, calls[i].len(), "calls start in order: {d}");
                    assert_eq!(d["type"], "function");
                    let name = d["function"]["name"].as_str().expect("a name").to_string();
                    calls[i].push((id.to_string(), name, String::new()));
                }
                if let Some(a) = d["function"]["arguments"].as_str() {
                    calls[i][k].2.push_str(a);
                }
            }
            if let Some(r) = c["finish_reason"].as_str() {
                reasons.push(r.to_string());
            }
        }
    }
    assert_eq!(roles, calls.len());
    (calls, reasons)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streamed_tool_calls_arrive_as_deltas() {
    let s = Server::start(None).await;
    for (choice, n) in [
        (json!("required"), 2),
        (json!({"type": "function", "function": {"name": "add"}}), 2),
    ] {
        let chunks = s
            .stream(json!({
                "model": MODEL_ID,
                "messages": user("Add 2 and 3."),
                "max_tokens": 600,
                "temperature": 1.0,
                "seed": 2,
                "n": n,
                "stream": true,
                "tools": tools(),
                "tool_choice": choice
            }))
            .await;
        let (calls, reasons) = assemble_stream(&chunks);
        assert_eq!(calls.len(), n);
        assert_eq!(reasons, vec!["tool_calls"; n], "{chunks:?}");
        for per_choice in calls {
            assert!(!per_choice.is_empty());
            for (id, name, args) in per_choice {
                check_call(&json!({"id": id, "type": "function",
                    "function": {"name": name, "arguments": args}}));
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_schema_and_unknown_tool_are_400s() {
    let s = Server::start(None).await;
    let (st, v) = s
        .post(
            "/v1/chat/completions",
            &json!({
                "model": MODEL_ID,
                "messages": user("x"),
                "response_format": {"type": "json_schema", "json_schema": {
                    "name": "bad", "schema": {"type": "object", "properties": {"a": {"type": 5}}}}}
            }),
        )
        .await;
    assert_eq!(st, StatusCode::BAD_REQUEST, "{v}");
    assert_eq!(
        v["error"]["param"], "response_format.json_schema.schema",
        "{v}"
    );
    let (st, v) = s
        .post(
            "/v1/chat/completions",
            &json!({
                "model": MODEL_ID,
                "messages": user("x"),
                "tools": tools(),
                "tool_choice": {"type": "function", "function": {"name": "nope"}}
            }),
        )
        .await;
    assert_eq!(st, StatusCode::BAD_REQUEST, "{v}");
    assert_eq!(v["error"]["param"], "tool_choice.function.name", "{v}");
    assert!(v["error"]["message"].as_str().unwrap().contains("nope"));
    let (st, v) = s
        .post(
            "/v1/chat/completions",
            &json!({"model": MODEL_ID, "messages": user("x"),
                    "response_format": {"type": "yaml"}}),
        )
        .await;
    assert_eq!(st, StatusCode::BAD_REQUEST, "{v}");
    assert_eq!(v["error"]["param"], "response_format.type", "{v}");
    // The server is still up.
    s.chat(json!({"model": MODEL_ID, "messages": user("x"), "max_tokens": 2}))
        .await;
}

/// A conversation with a call and its result.
fn tool_history() -> Value {
    json!([
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": null, "tool_calls": [{"id": "call_1", "type": "function",
            "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\", \"unit\": \"c\"}"}}]},
        {"role": "tool", "tool_call_id": "call_1", "name": "get_weather", "content": "{\"temp\": 21}"}
    ])
}

async fn rendered(s: &Server, body: Value) -> String {
    let (st, v) = s.post("/tokenize", &body).await;
    assert_eq!(st, StatusCode::OK, "{v}");
    let (st, v) = s.post("/detokenize", &json!({"tokens": v["tokens"]})).await;
    assert_eq!(st, StatusCode::OK, "{v}");
    v["prompt"].as_str().unwrap().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tool_history_is_rendered_by_the_template() {
    // ChatML ignores tools: the built-in tool prompt and Hermes-format calls.
    let s = Server::start(None).await;
    let text = rendered(&s, json!({"messages": tool_history(), "tools": tools()})).await;
    assert!(text.starts_with("<|im_start|>system\n# Tools"), "{text}");
    assert!(text.contains("\"name\":\"get_weather\""), "{text}");
    assert!(
        text.contains("<tool_call>\n{\"name\":\"get_weather\",\"arguments\":{\"city\":\"Paris\",\"unit\":\"c\"}}\n</tool_call>"),
        "{text}"
    );
    assert!(
        text.contains("<|im_start|>tool\n{\"temp\": 21}<|im_end|>"),
        "{text}"
    );
    let v = s
        .chat(
            json!({"model": MODEL_ID, "messages": tool_history(), "tools": tools(),
                     "max_tokens": 4}),
        )
        .await;
    assert!(v["choices"][0]["message"]["content"].is_string());

    // Qwen2.5's template renders tools, calls and results itself.
    let template = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../fixtures/chat_templates/qwen2.5-instruct.jinja"),
    )
    .unwrap();
    let s = Server::start(Some(&template)).await;
    let text = rendered(&s, json!({"messages": tool_history(), "tools": tools()})).await;
    assert!(text.contains("<tools>\n{\"type\": \"function\""), "{text}");
    assert!(text.contains("<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\", \"unit\": \"c\"}}\n</tool_call>"), "{text}");
    assert!(
        text.contains("<tool_response>\n{\"temp\": 21}\n</tool_response>"),
        "{text}"
    );
    let v = s
        .chat(
            json!({"model": MODEL_ID, "messages": tool_history(), "tools": tools(),
                     "tool_choice": "required", "max_tokens": 600, "seed": 1}),
        )
        .await;
    let calls = v["choices"][0]["message"]["tool_calls"].as_array().unwrap();
    for c in calls {
        check_call(c);
    }
}
