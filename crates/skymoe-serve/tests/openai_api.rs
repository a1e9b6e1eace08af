//! The OpenAI API's fuller surface over real HTTP against the tiny Mixtral fixture: several
//! prompts and `n` choices, `echo`, `logprobs` (prompt log-probabilities checked against
//! transformers' values in `fixtures/reference/logprobs`), `logit_bias`, streaming with
//! them, chat `logprobs` / `top_logprobs`, `/tokenize`, `/detokenize`, `/v1/embeddings`, and
//! the 400s for bad values of these parameters.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use reqwest::{Client, StatusCode};
use serde_json::{json, Value};
use skymoe_serve::engine::{EngineConfig, EngineHandle};
use skymoe_serve::openai::{serve_on, ServerConfig};

const MODEL_ID: &str = "tiny-mixtral";

fn fixture_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/reference/mixtral")
}

/// A server on an ephemeral loopback port (stopped when the test's runtime ends).
struct Server {
    base: String,
    engine: EngineHandle,
    client: Client,
}

impl Server {
    async fn start(config: EngineConfig) -> Server {
        let path = fixture_dir();
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
        tokio::spawn(serve_on(
            listener,
            engine.clone(),
            ServerConfig::default(),
            std::future::pending(),
        ));
        Server {
            base,
            engine,
            client: Client::new(),
        }
    }

    async fn default() -> Server {
        Server::start(EngineConfig::default()).await
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

    async fn ok(&self, path: &str, body: &Value) -> Value {
        let (st, v) = self.post(path, body).await;
        assert_eq!(st, StatusCode::OK, "{v}");
        v
    }

    /// The JSON chunks of a streamed answer (checks the `[DONE]` ending).
    async fn stream(&self, path: &str, body: &Value) -> Vec<Value> {
        let resp = self
            .client
            .post(format!("{}{path}", self.base))
            .json(body)
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

    fn token_text(&self, id: u32) -> String {
        self.engine
            .tokenizer()
            .inner()
            .decode(&[id], false)
            .unwrap()
    }
}

/// Log-probabilities equal up to the rounding of differently batched products.
fn assert_close(got: &[Value], want: &[Value]) {
    assert_eq!(got.len(), want.len(), "{got:?} vs {want:?}");
    for (g, w) in got.iter().zip(want) {
        match (g.as_f64(), w.as_f64()) {
            (Some(g), Some(w)) => assert!((g - w).abs() < 1e-5, "{got:?} vs {want:?}"),
            _ => assert_eq!(g, w),
        }
    }
}

fn assert_400(status: StatusCode, body: &Value, param: &str, what: &str) {
    assert_eq!(status, StatusCode::BAD_REQUEST, "{what}: {body}");
    let err = &body["error"];
    assert_eq!(err["param"].as_str(), Some(param), "{what}: {body}");
    assert_eq!(err["type"], "invalid_request_error", "{what}: {body}");
    assert!(
        err["message"].as_str().is_some_and(|m| m.contains(param)),
        "{what}: the message names `{param}`: {body}"
    );
}

/// The fixture prompts with transformers' log-probabilities.
struct RefPrompt {
    tokens: Vec<u32>,
    token_logprobs: Vec<Option<f64>>,
    top: Vec<Option<Vec<(u32, f64)>>>,
}

fn reference() -> Vec<RefPrompt> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../fixtures/reference/logprobs/mixtral.json");
    let v: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    v["prompts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| RefPrompt {
            tokens: serde_json::from_value(p["tokens"].clone()).unwrap(),
            token_logprobs: serde_json::from_value(p["token_logprobs"].clone()).unwrap(),
            top: p["top_logprobs"]
                .as_array()
                .unwrap()
                .iter()
                .map(|t| {
                    t.as_array().map(|l| {
                        l.iter()
                            .map(|e| (e[0].as_u64().unwrap() as u32, e[1].as_f64().unwrap()))
                            .collect()
                    })
                })
                .collect(),
        })
        .collect()
}

/// Check one echoed choice's prompt log-probabilities against the reference (≤ 1e-4).
fn check_prompt_logprobs(s: &Server, choice: &Value, r: &RefPrompt) -> f64 {
    let lp = &choice["logprobs"];
    let n = r.tokens.len();
    let tokens = lp["tokens"].as_array().unwrap();
    assert_eq!(tokens.len(), n, "{lp}");
    assert!(lp["token_logprobs"][0].is_null());
    assert!(lp["top_logprobs"][0].is_null());
    let mut worst = 0f64;
    let mut offset = 0;
    for i in 0..n {
        let text = s.token_text(r.tokens[i]);
        assert_eq!(tokens[i].as_str().unwrap(), text);
        assert_eq!(lp["text_offset"][i].as_u64().unwrap() as usize, offset);
        offset += text.chars().count();
        let Some(want) = r.token_logprobs[i] else {
            continue;
        };
        let got = lp["token_logprobs"][i].as_f64().unwrap();
        worst = worst.max((got - want).abs());
        let dict = lp["top_logprobs"][i].as_object().unwrap();
        let top = r.top[i].as_ref().unwrap();
        // Token texts can coincide (byte tokens); compare those that name one token.
        let mut names: BTreeMap<String, usize> = BTreeMap::new();
        for &(id, _) in top {
            *names.entry(s.token_text(id)).or_default() += 1;
        }
        *names.entry(text.clone()).or_default() += 1;
        for &(id, want) in top {
            let name = s.token_text(id);
            if names[&name] == 1 {
                let got = dict[&name].as_f64().unwrap();
                worst = worst.max((got - want).abs());
            }
        }
        assert!(dict.len() <= 6, "{dict:?}");
    }
    worst
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn echoed_prompt_logprobs_match_transformers() {
    let s = Server::default().await;
    let refs = reference();
    // One prompt per request, then all of them in one batched request.
    let mut worst = 0f64;
    for r in &refs {
        let body = json!({"model": MODEL_ID, "prompt": r.tokens, "echo": true,
                          "logprobs": 5, "max_tokens": 0});
        let v = s.ok("/v1/completions", &body).await;
        let choice = &v["choices"][0];
        assert_eq!(choice["finish_reason"], "length");
        assert_eq!(
            choice["text"].as_str().unwrap(),
            s.engine.tokenizer().decode(&r.tokens).unwrap()
        );
        assert_eq!(v["usage"]["completion_tokens"], 0);
        assert_eq!(v["usage"]["prompt_tokens"], r.tokens.len());
        worst = worst.max(check_prompt_logprobs(&s, choice, r));
    }
    let all: Vec<&Vec<u32>> = refs.iter().map(|r| &r.tokens).collect();
    let body = json!({"model": MODEL_ID, "prompt": all, "echo": true, "logprobs": 5,
                      "max_tokens": 0});
    let v = s.ok("/v1/completions", &body).await;
    let choices = v["choices"].as_array().unwrap();
    assert_eq!(choices.len(), refs.len());
    for (i, r) in refs.iter().enumerate() {
        assert_eq!(choices[i]["index"], i);
        worst = worst.max(check_prompt_logprobs(&s, &choices[i], r));
    }
    eprintln!("largest |Δ logprob| against transformers: {worst:.2e}");
    assert!(worst <= 1e-4, "{worst}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prompt_forms_n_and_indices() {
    let s = Server::default().await;
    let tok = s.engine.tokenizer();
    let a = "The quick brown fox";
    let b = "Once upon a time";
    let ids_a = tok.encode_prompt(a).unwrap();
    let ids_b = tok.encode_prompt(b).unwrap();
    let body = |prompt: Value, n: usize| {
        json!({"model": MODEL_ID, "prompt": prompt, "max_tokens": 6, "temperature": 0,
               "ignore_eos": true, "n": n})
    };
    let single = s.ok("/v1/completions", &body(json!(a), 1)).await;
    let text_a = single["choices"][0]["text"].as_str().unwrap().to_string();
    let single_b = s.ok("/v1/completions", &body(json!(b), 1)).await;
    let text_b = single_b["choices"][0]["text"].as_str().unwrap().to_string();
    for prompt in [json!([a, b]), json!([ids_a.clone(), ids_b.clone()])] {
        let v = s.ok("/v1/completions", &body(prompt, 2)).await;
        let choices = v["choices"].as_array().unwrap();
        assert_eq!(choices.len(), 4, "{v}");
        for (i, c) in choices.iter().enumerate() {
            assert_eq!(c["index"], i);
            // Prompt-major: index = prompt × n + choice.
            let want = if i < 2 { &text_a } else { &text_b };
            assert_eq!(c["text"].as_str().unwrap(), want, "{v}");
        }
        assert_eq!(v["usage"]["prompt_tokens"], ids_a.len() + ids_b.len());
        assert_eq!(v["usage"]["completion_tokens"], 24);
    }
    let v = s.ok("/v1/completions", &body(json!(ids_a), 1)).await;
    assert_eq!(v["choices"][0]["text"].as_str().unwrap(), text_a);

    // Sampled choices differ from each other, and repeat with the same seed.
    let sampled = json!({"model": MODEL_ID, "prompt": a, "max_tokens": 12, "temperature": 1.0,
                         "ignore_eos": true, "n": 3, "seed": 7});
    let x = s.ok("/v1/completions", &sampled).await;
    let y = s.ok("/v1/completions", &sampled).await;
    let texts = |v: &Value| -> Vec<String> {
        v["choices"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["text"].as_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(texts(&x), texts(&y));
    assert!(texts(&x)[0] != texts(&x)[1] || texts(&x)[1] != texts(&x)[2]);

    // Echo without logprobs: the prompt text, then the completion.
    let mut echo = body(json!(a), 1);
    echo["echo"] = json!(true);
    let v = s.ok("/v1/completions", &echo).await;
    assert_eq!(
        v["choices"][0]["text"].as_str().unwrap(),
        format!("{a}{text_a}")
    );
    assert!(v["choices"][0]["logprobs"].is_null());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generated_logprobs_and_logit_bias() {
    let s = Server::default().await;
    let base = json!({"model": MODEL_ID, "prompt": "The quick brown fox", "max_tokens": 6,
                      "temperature": 0, "ignore_eos": true, "logprobs": 3});
    let v = s.ok("/v1/completions", &base).await;
    let lp = &v["choices"][0]["logprobs"];
    let tokens = lp["tokens"].as_array().unwrap();
    assert_eq!(tokens.len(), 6);
    let text: String = tokens.iter().map(|t| t.as_str().unwrap()).collect();
    assert_eq!(text, v["choices"][0]["text"].as_str().unwrap());
    let mut offset = 0;
    for i in 0..6 {
        let got = lp["token_logprobs"][i].as_f64().unwrap();
        assert!(got <= 0.0);
        let dict = lp["top_logprobs"][i].as_object().unwrap();
        assert!((1..=4).contains(&dict.len()), "{dict:?}");
        // Greedy: the chosen token is the most likely one.
        let best = dict
            .values()
            .map(|x| x.as_f64().unwrap())
            .fold(f64::MIN, f64::max);
        assert!((best - got).abs() < 1e-6, "{got} vs {best}");
        assert_eq!(lp["text_offset"][i].as_u64().unwrap() as usize, offset);
        offset += tokens[i].as_str().unwrap().chars().count();
    }

    // Echo with generated tokens: the prompt's entries, then the completion's.
    let mut echo = base.clone();
    echo["echo"] = json!(true);
    let e = s.ok("/v1/completions", &echo).await;
    let prompt_len = v["usage"]["prompt_tokens"].as_u64().unwrap() as usize;
    let elp = &e["choices"][0]["logprobs"];
    assert_eq!(elp["tokens"].as_array().unwrap().len(), prompt_len + 6);
    assert!(elp["token_logprobs"][0].is_null());
    assert_close(
        &elp["token_logprobs"].as_array().unwrap()[prompt_len..],
        lp["token_logprobs"].as_array().unwrap(),
    );

    // logit_bias: −100 bans the greedy choice, +100 forces a token.
    let first = tokens[0].as_str().unwrap().to_string();
    // Every token with that text (byte tokens share one) is banned.
    let banned: serde_json::Map<String, Value> = (0..s.engine.vocab_size() as u32)
        .filter(|&id| s.token_text(id) == first)
        .map(|id| (id.to_string(), json!(-100)))
        .collect();
    assert!(!banned.is_empty());
    let mut ban = base.clone();
    ban["logit_bias"] = Value::Object(banned);
    let b = s.ok("/v1/completions", &ban).await;
    let banned_first = b["choices"][0]["logprobs"]["tokens"][0].as_str().unwrap();
    assert_ne!(banned_first, first);
    let mut force = base.clone();
    force["logit_bias"] = json!({"42": 100});
    let f = s.ok("/v1/completions", &force).await;
    let forced = s.token_text(42);
    for t in f["choices"][0]["logprobs"]["tokens"].as_array().unwrap() {
        assert_eq!(t.as_str().unwrap(), forced);
    }
    // The reported distribution includes the bias: the forced token is almost certain.
    let lp0 = f["choices"][0]["logprobs"]["token_logprobs"][0]
        .as_f64()
        .unwrap();
    assert!(lp0 > -1e-3, "{lp0}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streaming_with_n_echo_and_logprobs() {
    let s = Server::default().await;
    let body = json!({"model": MODEL_ID, "prompt": ["The quick", "A king"], "max_tokens": 5,
                      "temperature": 0, "ignore_eos": true, "n": 2, "echo": true,
                      "logprobs": 2});
    let full = s.ok("/v1/completions", &body).await;
    let mut sbody = body.clone();
    sbody["stream"] = json!(true);
    sbody["stream_options"] = json!({"include_usage": true});
    let chunks = s.stream("/v1/completions", &sbody).await;
    let mut text = vec![String::new(); 4];
    let mut lps: Vec<Vec<Value>> = vec![Vec::new(); 4];
    let mut offsets: Vec<Vec<Value>> = vec![Vec::new(); 4];
    let mut finish = vec![0; 4];
    for c in &chunks {
        for ch in c["choices"].as_array().unwrap() {
            let i = ch["index"].as_u64().unwrap() as usize;
            text[i].push_str(ch["text"].as_str().unwrap());
            if let Some(l) = ch["logprobs"].as_object() {
                lps[i].extend(l["token_logprobs"].as_array().unwrap().iter().cloned());
                offsets[i].extend(l["text_offset"].as_array().unwrap().iter().cloned());
            }
            if ch["finish_reason"].is_string() {
                finish[i] += 1;
            }
        }
    }
    assert_eq!(finish, vec![1; 4]);
    for i in 0..4 {
        let c = &full["choices"][i];
        assert_eq!(text[i], c["text"].as_str().unwrap());
        assert_close(&lps[i], c["logprobs"]["token_logprobs"].as_array().unwrap());
        assert_eq!(
            &offsets[i],
            c["logprobs"]["text_offset"].as_array().unwrap()
        );
    }
    assert_eq!(chunks.last().unwrap()["usage"], full["usage"]);

    // Chat: logprobs with top_logprobs, n = 2, streamed and not.
    let chat = json!({"model": MODEL_ID, "messages": [{"role": "user", "content": "Hello"}],
                      "max_tokens": 5, "temperature": 0, "ignore_eos": true, "n": 2,
                      "logprobs": true, "top_logprobs": 3});
    let full = s.ok("/v1/chat/completions", &chat).await;
    let choices = full["choices"].as_array().unwrap();
    assert_eq!(choices.len(), 2);
    for (i, c) in choices.iter().enumerate() {
        assert_eq!(c["index"], i);
        let content = c["logprobs"]["content"].as_array().unwrap();
        assert_eq!(content.len(), 5);
        let joined: String = content
            .iter()
            .map(|t| t["token"].as_str().unwrap())
            .collect();
        assert_eq!(joined, c["message"]["content"].as_str().unwrap());
        for t in content {
            let top = t["top_logprobs"].as_array().unwrap();
            assert_eq!(top.len(), 3);
            assert!(
                (top[0]["logprob"].as_f64().unwrap() - t["logprob"].as_f64().unwrap()).abs() < 1e-6
            );
            let bytes: Vec<u8> = serde_json::from_value(t["bytes"].clone()).unwrap();
            assert_eq!(bytes, t["token"].as_str().unwrap().as_bytes());
            assert!(top[0]["bytes"].is_array());
        }
    }
    let mut schat = chat.clone();
    schat["stream"] = json!(true);
    let chunks = s.stream("/v1/chat/completions", &schat).await;
    let mut roles = 0;
    let mut content: Vec<Vec<Value>> = vec![Vec::new(); 2];
    let mut text = vec![String::new(); 2];
    for c in &chunks {
        for ch in c["choices"].as_array().unwrap() {
            let i = ch["index"].as_u64().unwrap() as usize;
            if ch["delta"]["role"] == "assistant" {
                roles += 1;
            }
            if let Some(t) = ch["delta"]["content"].as_str() {
                text[i].push_str(t);
            }
            if let Some(l) = ch["logprobs"]["content"].as_array() {
                content[i].extend(l.iter().cloned());
            }
        }
    }
    assert_eq!(roles, 2);
    for i in 0..2 {
        assert_eq!(text[i], choices[i]["message"]["content"].as_str().unwrap());
        let want = choices[i]["logprobs"]["content"].as_array().unwrap();
        assert_eq!(content[i].len(), want.len());
        for (got, want) in content[i].iter().zip(want) {
            assert_eq!(got["token"], want["token"]);
            assert_eq!(got["bytes"], want["bytes"]);
            assert_close(&[got["logprob"].clone()], &[want["logprob"].clone()]);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokenize_detokenize_and_embeddings() {
    let s = Server::default().await;
    let text = "The quick brown fox";
    let want = s.engine.tokenizer().encode_prompt(text).unwrap();
    let v = s
        .ok("/tokenize", &json!({"model": MODEL_ID, "prompt": text}))
        .await;
    assert_eq!(v["tokens"], json!(want));
    assert_eq!(v["count"], want.len());
    assert_eq!(v["max_model_len"], s.engine.context_length());
    assert!(v["token_strs"].is_null());
    let plain = s.engine.tokenizer().encode_plain(text).unwrap();
    let v = s
        .ok(
            "/tokenize",
            &json!({"prompt": text, "add_special_tokens": false, "return_token_strs": true}),
        )
        .await;
    assert_eq!(v["tokens"], json!(plain));
    let strs = v["token_strs"].as_array().unwrap();
    assert_eq!(strs.len(), plain.len());
    let inner = s.engine.tokenizer().inner();
    assert_eq!(strs[0], inner.id_to_token(plain[0]).unwrap());
    let msgs = json!({"model": MODEL_ID, "messages": [{"role": "user", "content": "Hi"}]});
    let v = s.ok("/tokenize", &msgs).await;
    assert!(v["count"].as_u64().unwrap() > 3);
    let d = s
        .ok("/detokenize", &json!({"model": MODEL_ID, "tokens": plain}))
        .await;
    assert_eq!(d["prompt"], text);

    let (st, v) = s.post("/detokenize", &json!({"tokens": [1, 99999]})).await;
    assert_400(st, &v, "tokens", "out-of-vocabulary id");
    let (st, v) = s
        .post("/tokenize", &json!({"model": "nope", "prompt": "x"}))
        .await;
    assert_400(st, &v, "model", "unknown model");

    let (st, v) = s
        .post("/v1/embeddings", &json!({"model": MODEL_ID, "input": "x"}))
        .await;
    assert_eq!(st, StatusCode::NOT_FOUND, "{v}");
    assert!(v["error"]["message"]
        .as_str()
        .unwrap()
        .contains("does not produce embeddings"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_values_are_400s_naming_the_parameter() {
    let s = Server::default().await;
    let m = MODEL_ID;
    let ctx = s.engine.context_length();
    let vocab = s.engine.vocab_size();
    let msgs = json!([{"role": "user", "content": "hi"}]);
    let cases: Vec<(&str, &str, Value, &str)> = vec![
        (
            "logprobs above 20",
            "/v1/completions",
            json!({"model": m, "prompt": "x", "logprobs": 21}),
            "logprobs",
        ),
        (
            "logprobs negative",
            "/v1/completions",
            json!({"model": m, "prompt": "x", "logprobs": -1}),
            "logprobs",
        ),
        (
            "top_logprobs without logprobs",
            "/v1/chat/completions",
            json!({"model": m, "messages": msgs, "top_logprobs": 2}),
            "top_logprobs",
        ),
        (
            "top_logprobs above 20",
            "/v1/chat/completions",
            json!({"model": m, "messages": msgs, "logprobs": true, "top_logprobs": 21}),
            "top_logprobs",
        ),
        (
            "n beyond the engine's queue",
            "/v1/completions",
            json!({"model": m, "prompt": "x", "n": 1000, "max_tokens": 1}),
            "n",
        ),
        (
            "chat n beyond the engine's queue",
            "/v1/chat/completions",
            json!({"model": m, "messages": msgs, "n": 1000, "max_tokens": 1}),
            "n",
        ),
        (
            "logit_bias key not a token id",
            "/v1/completions",
            json!({"model": m, "prompt": "x", "logit_bias": {"abc": 1}}),
            "logit_bias",
        ),
        (
            "logit_bias key beyond the vocabulary",
            "/v1/completions",
            json!({"model": m, "prompt": "x", "logit_bias": {vocab.to_string(): 1}}),
            "logit_bias",
        ),
        (
            "logit_bias value above 100",
            "/v1/chat/completions",
            json!({"model": m, "messages": msgs, "logit_bias": {"5": 100.5}}),
            "logit_bias",
        ),
        (
            "logit_bias value below -100",
            "/v1/completions",
            json!({"model": m, "prompt": "x", "logit_bias": {"5": -101}}),
            "logit_bias",
        ),
        (
            "echoed prompt longer than the context",
            "/v1/completions",
            json!({"model": m, "prompt": vec![5u32; ctx + 1], "echo": true, "logprobs": 1,
                   "max_tokens": 0}),
            "prompt",
        ),
        (
            "empty prompt list",
            "/v1/completions",
            json!({"model": m, "prompt": []}),
            "prompt",
        ),
        (
            "empty list among prompts",
            "/v1/completions",
            json!({"model": m, "prompt": [[5, 6], []]}),
            "prompt",
        ),
        (
            "max_tokens 0 without echo",
            "/v1/completions",
            json!({"model": m, "prompt": "x", "max_tokens": 0}),
            "max_tokens",
        ),
        (
            "suffix",
            "/v1/completions",
            json!({"model": m, "prompt": "x", "suffix": "y"}),
            "suffix",
        ),
    ];
    for (what, path, body, param) in cases {
        let (st, v) = s.post(path, &body).await;
        assert_400(st, &v, param, what);
    }
    assert_eq!(s.engine.stats().generated_tokens_total, 0);
    // The server is still up and answers.
    let v = s
        .ok(
            "/v1/completions",
            &json!({"model": m, "prompt": "x", "max_tokens": 2, "ignore_eos": true}),
        )
        .await;
    assert_eq!(v["usage"]["completion_tokens"], 2);

    // n × (prompt + max_tokens) beyond a small KV cache (8 blocks of 16 positions).
    let small = Server::start(EngineConfig {
        kv_blocks: Some(8),
        ..EngineConfig::default()
    })
    .await;
    let body = json!({"model": m, "prompt": "x", "n": 4, "max_tokens": 60});
    let (st, v) = small.post("/v1/completions", &body).await;
    assert_400(st, &v, "n", "n × max_tokens beyond the KV cache");
    let body = json!({"model": m, "prompt": "x", "n": 2, "max_tokens": 20, "ignore_eos": true});
    let v = small.ok("/v1/completions", &body).await;
    assert_eq!(v["choices"].as_array().unwrap().len(), 2);
}
