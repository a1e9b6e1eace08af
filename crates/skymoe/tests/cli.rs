//! The `skymoe` binary end to end: verbs work on the reference fixtures, and bad input gives a
//! clear message and a non-zero exit, never a panic.

mod common;

use common::{assert_clean_failure, fixtures, max_abs, skymoe, skymoe_with_env, token_list};

#[test]
fn logits_verb_writes_the_reference_logits() {
    let tmp = tempfile::tempdir().unwrap();
    let out_file = tmp.path().join("logits.safetensors");
    let dir = fixtures().join("mixtral");
    let refmap = candle_core::safetensors::load(
        dir.join("reference.safetensors"),
        &candle_core::Device::Cpu,
    )
    .unwrap();
    let out = skymoe(&[
        "logits",
        "--model",
        dir.to_str().unwrap(),
        "--tokens",
        &token_list(&refmap["tokens"]),
        "--out",
        out_file.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let got = candle_core::safetensors::load(&out_file, &candle_core::Device::Cpu).unwrap();
    let logits = &got["logits"];
    assert_eq!(logits.dtype(), candle_core::DType::F32);
    assert_eq!(logits.dims(), refmap["logits"].dims());
    let d = max_abs(&(logits - &refmap["logits"]).unwrap());
    assert!(d <= 1e-4, "max |Δ| {d}");
}

/// `logits --weights stored --kv-cache-dtype f32` on a llama.cpp-quantised GGUF file, with
/// 8-bit activations, gives llama.cpp's own logits for the same file (its f32 KV cache;
/// `fixtures/reference/gguf_quant/llama_cpp_logits.safetensors`).
#[test]
fn logits_verb_serves_a_gguf_file_as_llama_cpp_computes_it() {
    let tmp = tempfile::tempdir().unwrap();
    let out_file = tmp.path().join("logits.safetensors");
    let cpu = candle_core::Device::Cpu;
    let want = candle_core::safetensors::load(
        fixtures().join("gguf_quant/llama_cpp_logits.safetensors"),
        &cpu,
    )
    .unwrap();
    let out = skymoe_with_env(
        &[
            "logits",
            "--model",
            fixtures()
                .join("gguf_quant/wide-q4_k_m.gguf")
                .to_str()
                .unwrap(),
            "--tokens",
            &token_list(&want["wide-q4_k_m.tokens"]),
            "--weights",
            "stored",
            "--kv-cache-dtype",
            "f32",
            "--out",
            out_file.to_str().unwrap(),
        ],
        &[("SKYMOE_GGML_ACTIVATIONS", "int8")],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let got = candle_core::safetensors::load(&out_file, &cpu).unwrap();
    let theirs = &want["wide-q4_k_m.prefill_f32kv"];
    assert_eq!(got["logits"].dims(), theirs.dims());
    let e = max_abs(&(&got["logits"] - theirs).unwrap()) / max_abs(theirs);
    assert!(e < 1e-5, "max relative logit error against llama.cpp {e}");
    // The cache's type applies to the serving model only, and must be one.
    let model = fixtures().join("llama");
    for (extra, needle) in [
        (&["--kv-cache-dtype", "f32"][..], "needs --weights"),
        (
            &["--weights", "stored", "--kv-cache-dtype", "f8"][..],
            "invalid --kv-cache-dtype",
        ),
    ] {
        let mut args = vec![
            "logits",
            "--model",
            model.to_str().unwrap(),
            "--tokens",
            "1,2",
            "--out",
            out_file.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        assert_clean_failure(&skymoe(&args), needle);
    }
}

#[test]
fn inspect_reports_counts() {
    let out = skymoe(&[
        "inspect",
        "--model",
        fixtures().join("qwen2_moe").to_str().unwrap(),
        "--json",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["architecture"], "Qwen2MoeForCausalLM");
    let total = v["params_total"].as_u64().unwrap();
    let active = v["params_active_per_token"].as_u64().unwrap();
    assert!(
        active < total,
        "an MoE activates fewer parameters than it has"
    );
    // Count the checkpoint's scalars directly.
    let st = candle_core::safetensors::load(
        fixtures().join("qwen2_moe/model.safetensors"),
        &candle_core::Device::Cpu,
    )
    .unwrap();
    let n: usize = st.values().map(|t| t.elem_count()).sum();
    assert_eq!(total as usize, n);
}

#[test]
fn generate_is_deterministic_and_greedy_at_zero_temperature() {
    let dir = fixtures().join("llama");
    let run = |extra: &[&str]| {
        let mut args = vec![
            "generate",
            "--model",
            dir.to_str().unwrap(),
            "--prompt",
            "The king",
            "--max-tokens",
            "8",
        ];
        args.extend_from_slice(extra);
        let out = skymoe(&args);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(String::from_utf8_lossy(&out.stderr).contains("tokens/s"));
        String::from_utf8_lossy(&out.stdout).to_string()
    };
    let a = run(&[]);
    assert!(a.starts_with("The king"));
    assert_eq!(a, run(&[]));
    let s1 = run(&["--temperature", "1.0", "--seed", "5"]);
    assert_eq!(s1, run(&["--temperature", "1.0", "--seed", "5"]));
}

#[test]
fn empty_prompt_is_an_error() {
    let out = skymoe(&[
        "generate",
        "--model",
        fixtures().join("llama").to_str().unwrap(),
        "--prompt",
        "",
    ]);
    assert_clean_failure(&out, "prompt is empty");
}

#[test]
fn token_out_of_vocab_is_an_error() {
    let tmp = tempfile::tempdir().unwrap();
    let out = skymoe(&[
        "logits",
        "--model",
        fixtures().join("llama").to_str().unwrap(),
        "--tokens",
        "1,999999",
        "--out",
        tmp.path().join("x.safetensors").to_str().unwrap(),
    ]);
    assert_clean_failure(&out, "out of range");
    assert!(!tmp.path().join("x.safetensors").exists());
    let out = skymoe(&[
        "logits",
        "--model",
        fixtures().join("llama").to_str().unwrap(),
        "--tokens",
        "1,x",
        "--out",
        tmp.path().join("x.safetensors").to_str().unwrap(),
    ]);
    assert_clean_failure(&out, "not a token id");
}

#[test]
fn missing_model_is_an_error() {
    let out = skymoe(&["inspect", "--model", "/nonexistent/dir"]);
    assert_clean_failure(&out, "/nonexistent/dir");
    // The cause is said once, not once per layer of the error.
    let stderr = String::from_utf8_lossy(&out.stderr).to_lowercase();
    assert_eq!(
        stderr.matches("no such file").count(),
        1,
        "cause repeated: {stderr}"
    );
}

#[test]
fn unknown_architecture_is_an_error() {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::write(
        tmp.path().join("config.json"),
        r#"{"architectures": ["FalconForCausalLM"], "model_type": "falcon"}"#,
    )
    .unwrap();
    let out = skymoe(&["inspect", "--model", tmp.path().to_str().unwrap()]);
    assert_clean_failure(&out, "supported: LlamaForCausalLM");
}

#[test]
fn truncated_gguf_is_an_error() {
    let tmp = tempfile::tempdir().unwrap();
    let bytes = std::fs::read(fixtures().join("gguf/llama-q4_0.gguf")).unwrap();
    let p = tmp.path().join("cut.gguf");
    std::fs::write(&p, &bytes[..bytes.len() * 2 / 3]).unwrap();
    let out = skymoe(&["generate", "--model", p.to_str().unwrap(), "--prompt", "hi"]);
    assert_clean_failure(&out, "corrupt or truncated");
}

#[test]
fn grads_verb_writes_loss_and_every_gradient() {
    let tmp = tempfile::tempdir().unwrap();
    let out_file = tmp.path().join("grads.safetensors");
    let dir = fixtures().join("skywork_moe");
    let dev = candle_core::Device::Cpu;
    let refmap = candle_core::safetensors::load(dir.join("reference.safetensors"), &dev).unwrap();
    let tokens: Vec<String> = refmap["tokens"]
        .to_vec1::<i64>()
        .unwrap()
        .iter()
        .map(|t| t.to_string())
        .collect();
    let out = skymoe(&[
        "grads",
        "--model",
        dir.to_str().unwrap(),
        "--tokens",
        &tokens.join(","),
        "--out",
        out_file.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let got = candle_core::safetensors::load(&out_file, &dev).unwrap();
    let loss = got["loss"].to_scalar::<f32>().unwrap();
    assert!((loss - refmap["loss"].to_scalar::<f32>().unwrap()).abs() < 1e-5);
    let n_ref = refmap.keys().filter(|k| k.starts_with("grad.")).count();
    assert_eq!(got.len(), n_ref + 1);
    let g = &got["model.layers.0.block_sparse_moe.gate.weight"];
    let want = &refmap["grad.model.layers.0.block_sparse_moe.gate.weight"];
    let d = max_abs(&(g - want).unwrap());
    assert!(d < 1e-6, "router gradient differs by {d}");
}

#[test]
fn grads_needs_two_tokens() {
    let tmp = tempfile::tempdir().unwrap();
    let out = skymoe(&[
        "grads",
        "--model",
        fixtures().join("llama").to_str().unwrap(),
        "--tokens",
        "5",
        "--out",
        tmp.path().join("g.safetensors").to_str().unwrap(),
    ]);
    assert_clean_failure(&out, "at least two tokens");
}

#[test]
fn bench_reports_its_settings_and_refuses_bad_ones() {
    let model = fixtures().join("mixtral");
    let model = model.to_str().unwrap();
    let args = |dtype: &'static str| {
        vec![
            "bench",
            "--model",
            model,
            "--weights",
            "int8",
            "--prompt-tokens",
            "5",
            "--gen-tokens",
            "2",
            "--concurrency",
            "2",
            "--repeats",
            "1",
            "--step-tokens",
            "4",
            "--kv-cache-dtype",
            dtype,
            "--bandwidth-mib",
            "64",
        ]
    };
    let out = skymoe(&args("f16"));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["kv_dtype"], "f16");
    assert_eq!(report["step_tokens"], 4);
    assert_eq!(report["runs"].as_array().unwrap().len(), 2);
    // Batch-1 decode's share of the measured read bandwidth, from the weights it reads.
    let bytes = report["decode_weight_bytes_per_token"].as_f64().unwrap();
    let bandwidth = report["read_bandwidth_gbs"].as_f64().unwrap();
    let decode = report["runs"][0]["decode_tokens_per_s"].as_f64().unwrap();
    let fraction = report["decode_bandwidth_fraction"].as_f64().unwrap();
    assert!(bytes > 0.0 && bandwidth > 0.0, "{report}");
    assert!((fraction - decode * bytes / 1e9 / bandwidth).abs() <= 1e-9 * fraction.max(1.0));
    let auto = skymoe(&args("auto"));
    let report: serde_json::Value = serde_json::from_slice(&auto.stdout).unwrap();
    assert_eq!(report["kv_dtype"], "f16", "int8 weights get an f16 cache");
    assert_clean_failure(&skymoe(&args("bf8")), "invalid --kv-cache-dtype");
    let int8 = skymoe(&args("int8"));
    assert!(
        int8.status.success(),
        "{}",
        String::from_utf8_lossy(&int8.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&int8.stdout).unwrap();
    assert_eq!(report["kv_dtype"], "int8");
    let mut no_steps = args("f16");
    no_steps[14] = "0";
    assert_clean_failure(&skymoe(&no_steps), "--step-tokens must be at least 1");
    let mut huge = args("f16");
    huge[18] = "1000000000000";
    assert_clean_failure(&skymoe(&huge), "--bandwidth-mib must be at most");
}
