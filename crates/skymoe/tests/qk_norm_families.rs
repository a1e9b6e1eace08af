//! The families with parts of their own (Qwen3-MoE and OLMoE's q/k norms, DeepSeek's latent
//! attention and routers) through the command line: `inspect` reports their attention parts
//! and cache size, and a short training run from each reference checkpoint gives finite
//! losses and a checkpoint that loads again.

mod common;

use common::{corpus, fixtures, skymoe};

fn run_ok(args: &[&str]) -> String {
    let out = skymoe(args);
    assert!(
        out.status.success(),
        "skymoe {args:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr)
}

#[test]
fn inspect_reports_the_qk_norm_and_clip() {
    let olmoe = run_ok(&[
        "inspect",
        "--model",
        fixtures().join("olmoe").to_str().unwrap(),
    ]);
    assert!(
        olmoe.contains("per-projection q/k RMSNorm") && olmoe.contains("clipped to ±1.1"),
        "{olmoe}"
    );
    let qwen3 = run_ok(&[
        "inspect",
        "--model",
        fixtures().join("gguf/qwen3moe-f16.gguf").to_str().unwrap(),
    ]);
    assert!(
        qwen3.contains("per-head q/k RMSNorm") && qwen3.contains("(2 MoE)"),
        "{qwen3}"
    );
}

#[test]
fn inspect_reports_latent_attention_its_cache_and_the_router() {
    let v3 = run_ok(&[
        "inspect",
        "--model",
        fixtures().join("deepseek_v3").to_str().unwrap(),
    ]);
    // 3 layers of latent 32 + rotary key 8.
    assert!(
        v3.contains("latent (MLA), 4 heads: q/k 16 plain + 8 rotary (query rank 24)")
            && v3.contains("kv cache       120 values per token: 240 bytes in f16")
            && v3.contains("sigmoid, best 2 of 4 groups (by top-2 sum), selection bias")
            && v3.contains("shared expert  FFN 16, no gate"),
        "{v3}"
    );
    let json = run_ok(&[
        "inspect",
        "--json",
        "--model",
        fixtures()
            .join("gguf/deepseek2-v2-f32.gguf")
            .to_str()
            .unwrap(),
    ]);
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(v["kv_cache_bytes_per_token"]["f16"], 240, "{json}");
    assert_eq!(v["mla"]["kv_lora_rank"], 32, "{json}");
    assert_eq!(v["router_scores"], "softmax", "{json}");
    // A Llama-style model caches keys and values of its kv heads: 3 layers × 2 × 2 × 16.
    let llama = run_ok(&[
        "inspect",
        "--model",
        fixtures().join("llama").to_str().unwrap(),
    ]);
    assert!(
        llama.contains("192 values per token: 384 bytes in f16"),
        "{llama}"
    );
}

#[test]
fn training_from_the_reference_checkpoints_runs() {
    for family in ["qwen3_moe", "olmoe", "deepseek_v2", "deepseek_v3"] {
        let tmp = tempfile::tempdir().unwrap();
        let run = tmp.path().join("run");
        let cfg = tmp.path().join("run.toml");
        std::fs::write(
            &cfg,
            format!(
                r#"
[model]
init = "{init}"

[data]
inputs = ["{corpus}"]
seq_len = 16

[optim]
decay = "constant"
warmup_steps = 0
lr = 0.001

[train]
batch_size = 2
steps = 3
eval_every = 0
checkpoint_every = 3
out_dir = "{run}"
"#,
                init = fixtures().join(family).display(),
                corpus = corpus().display(),
                run = run.display()
            ),
        )
        .unwrap();
        run_ok(&["train", "--config", cfg.to_str().unwrap(), "--quiet"]);
        let losses: Vec<f64> = std::fs::read_to_string(run.join("metrics.jsonl"))
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
            .filter(|v| v["kind"] == "train")
            .map(|v| v["loss"].as_f64().unwrap())
            .collect();
        assert_eq!(losses.len(), 3, "{family}: {losses:?}");
        assert!(losses.iter().all(|l| l.is_finite()), "{family}: {losses:?}");
        let trained = run.join("checkpoints").join("step-00000003");
        let out = run_ok(&["inspect", "--model", trained.to_str().unwrap()]);
        let part = if family.starts_with("deepseek") {
            "latent (MLA)"
        } else {
            "q/k RMSNorm"
        };
        assert!(out.contains(part), "{family}: {out}");
    }
}
