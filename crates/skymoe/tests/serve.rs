//! `skymoe serve` as a process: start on a free port, wait for /health, one completion,
//! then SIGTERM and a clean exit.

mod common;

use std::io::{BufRead, BufReader, Read};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

#[test]
fn serve_answers_and_stops_cleanly_on_sigterm() {
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/reference/mixtral");
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("tiny-mixtral");
    std::fs::create_dir(&model).unwrap();
    for entry in std::fs::read_dir(&fixture).unwrap() {
        let p = entry.unwrap().path();
        let name = p.file_name().unwrap().to_str().unwrap().to_string();
        if name == "config.json" || name == "tokenizer.json" || name.starts_with("model") {
            std::fs::copy(&p, model.join(&name)).unwrap();
        }
    }

    let help = Command::new(env!("CARGO_BIN_EXE_skymoe"))
        .args(["serve", "--help"])
        .output()
        .unwrap();
    assert!(help.status.success());
    let help = String::from_utf8_lossy(&help.stdout);
    for flag in [
        "--model",
        "--host",
        "--port",
        "--api-key",
        "--max-concurrency",
        "--weights",
        "--kv-cache-dtype",
    ] {
        assert!(help.contains(flag), "{flag} missing from\n{help}");
    }

    let (mut child, addr) = spawn_server(&model, &[]);

    let (status, models) = common::http(&addr, "GET", "/v1/models", None);
    assert_eq!(status, 200, "{models}");
    let models: serde_json::Value = serde_json::from_str(&models).unwrap();
    assert_eq!(models["data"][0]["id"], "tiny-mixtral");

    let req = r#"{"model": "tiny-mixtral", "prompt": "Hello", "max_tokens": 5,
                  "temperature": 0, "ignore_eos": true}"#;
    let (status, body) = common::http(&addr, "POST", "/v1/completions", Some(req));
    assert_eq!(status, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["object"], "text_completion");
    assert_eq!(v["usage"]["completion_tokens"], 5);
    assert_eq!(v["choices"][0]["finish_reason"], "length");

    let kill = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    let t0 = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if t0.elapsed() > Duration::from_secs(20) {
            let _ = child.kill();
            panic!("the server did not exit after SIGTERM");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut stderr = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    assert!(status.success(), "exit {status:?}; stderr:\n{stderr}");
    assert!(stderr.contains("drained"), "{stderr}");
    assert!(TcpStream::connect(&addr).is_err(), "still listening");
}

/// Start `skymoe serve --model MODEL --port 0 EXTRA...` and wait for /health; returns the
/// child and its address.
fn spawn_server(model: &Path, extra: &[&str]) -> (std::process::Child, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_skymoe"))
        .args(["serve", "--model"])
        .arg(model)
        .args(["--port", "0"])
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    stdout.read_line(&mut line).unwrap();
    let addr = line
        .trim()
        .rsplit("http://")
        .next()
        .filter(|_| line.contains("http://"))
        .unwrap_or_else(|| {
            let _ = child.kill();
            panic!("no address in {line:?}")
        })
        .to_string();
    assert!(addr.starts_with("127.0.0.1:"), "{addr}");

    let t0 = Instant::now();
    loop {
        if TcpStream::connect(&addr).is_ok() {
            let (status, _) = common::http(&addr, "GET", "/health", None);
            if status == 200 {
                break;
            }
        }
        assert!(t0.elapsed() < Duration::from_secs(30), "no /health");
        std::thread::sleep(Duration::from_millis(50));
    }

    (child, addr)
}

/// DeepSeek-V3's latent attention, sigmoid router and shared experts behind the OpenAI API:
/// a greedy completion equals the autograd model's greedy continuation, and a chat request
/// with `chat_template_kwargs` is served.
#[test]
fn serve_runs_deepseek_v3() {
    // The fixture with DeepSeek-V3.1's chat template beside it.
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures");
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("deepseek_v3");
    std::fs::create_dir(&model).unwrap();
    for entry in std::fs::read_dir(fixtures.join("reference/deepseek_v3")).unwrap() {
        let p = entry.unwrap().path();
        std::fs::copy(&p, model.join(p.file_name().unwrap())).unwrap();
    }
    let template =
        std::fs::read_to_string(fixtures.join("chat_templates/deepseek-v3.1.jinja")).unwrap();
    let config =
        serde_json::json!({"chat_template": template, "bos_token": "<s>", "eos_token": "</s>"});
    std::fs::write(model.join("tokenizer_config.json"), config.to_string()).unwrap();
    let (mut child, addr) = spawn_server(&model, &[]);
    let req = r#"{"model": "deepseek_v3", "prompt": [3, 17, 42], "max_tokens": 6,
                  "temperature": 0, "ignore_eos": true}"#;
    let (status, body) = common::http(&addr, "POST", "/v1/completions", Some(req));
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    // The same continuation from the autograd model, greedily, through its KV cache.
    let ckpt = skymoe_model::Checkpoint::open(&model, &candle_core::Device::Cpu).unwrap();
    let lm = skymoe_model::CausalLm::load(&ckpt, &candle_core::Device::Cpu).unwrap();
    let mut cache = lm.new_cache();
    let mut next = vec![3u32, 17, 42];
    let mut ids = Vec::new();
    for _ in 0..6 {
        let logits = lm.forward_last(&next, Some(&mut cache)).unwrap();
        let id = logits.argmax(0).unwrap().to_scalar::<u32>().unwrap();
        ids.push(id);
        next = vec![id];
    }
    let tok = skymoe_model::Tokenizer::for_model(&model, None).unwrap();
    let want = tok.decode(&ids).unwrap();
    let chat = r#"{"model": "deepseek_v3", "messages": [{"role": "user", "content": "Hi"}],
                   "max_tokens": 3,
                   "chat_template_kwargs": {"enable_thinking": false}}"#;
    let (chat_status, chat_body) = common::http(&addr, "POST", "/v1/chat/completions", Some(chat));
    // The template's `thinking` variable decides how the assistant turn opens.
    let opening = |kwargs: &str| {
        let req = format!(
            r#"{{"model": "deepseek_v3", "messages": [{{"role": "user", "content": "Hi"}}]{kwargs}}}"#
        );
        let (_, v) = common::http(&addr, "POST", "/tokenize", Some(&req));
        let v: serde_json::Value = serde_json::from_str(&v).unwrap();
        let req = serde_json::json!({"model": "deepseek_v3", "tokens": v["tokens"]}).to_string();
        let (_, d) = common::http(&addr, "POST", "/detokenize", Some(&req));
        let d: serde_json::Value = serde_json::from_str(&d).unwrap();
        d["prompt"].as_str().unwrap_or_default().to_string()
    };
    let (plain, thinking) = (
        opening(""),
        opening(r#", "chat_template_kwargs": {"thinking": true}"#),
    );
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(status, 200, "{body}");
    assert_eq!(v["choices"][0]["text"], want, "{body}");
    assert_eq!(chat_status, 200, "{chat_body}");
    assert!(plain.ends_with("Hi<｜Assistant｜></think>"), "{plain:?}");
    assert!(
        thinking.ends_with("Hi<｜Assistant｜><think>"),
        "{thinking:?}"
    );
}
