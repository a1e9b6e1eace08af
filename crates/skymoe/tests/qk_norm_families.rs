//! The q/k-norm families (Qwen3-MoE, OLMoE) through the command line: `inspect` reports
//! their attention parts, and a short training run from each reference checkpoint gives
//! finite losses and a checkpoint that loads again.

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
fn training_from_the_reference_checkpoints_runs() {
    for family in ["qwen3_moe", "olmoe"] {
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
        assert!(out.contains("q/k RMSNorm"), "{family}: {out}");
    }
}
