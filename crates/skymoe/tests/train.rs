//! `skymoe train` end to end: a run trains and checkpoints; a run killed mid-way and resumed
//! reproduces the losses of an uninterrupted run exactly; bad setups fail cleanly.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{assert_clean_failure, corpus, max_abs, skymoe};
use skymoe_model::Checkpoint;

fn write_config(dir: &Path, extra: &str) -> PathBuf {
    let p = dir.join("run.toml");
    let text = format!(
        r#"
[model]
arch = "skywork_moe"
hidden_size = 32
intermediate_size = 64
layers = 2
heads = 4
kv_heads = 2
experts = 4
top_k = 2
max_position_embeddings = 128

[router]
capacity_factor = 1.0

[data]
inputs = ["{}"]
vocab_size = 300
seq_len = 32

[optim]
decay = "constant"
warmup_steps = 0
lr = 0.003

[train]
batch_size = 4
eval_every = 0
checkpoint_every = 5
keep_checkpoints = 3
{extra}
"#,
        corpus().display()
    );
    std::fs::write(&p, text).unwrap();
    p
}

fn losses(run: &Path) -> Vec<(u64, f64, Vec<f64>, Vec<f64>)> {
    records(run, false)
}

/// The training records of a run's metrics log. `torn_tail`: the run was killed, so its last
/// line may be cut short (a record is one write, but a kill can still land inside it); such a
/// line is skipped, as the resume and `skymoe report` skip it.
fn records(run: &Path, torn_tail: bool) -> Vec<(u64, f64, Vec<f64>, Vec<f64>)> {
    let text = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    let last = lines.len().saturating_sub(1);
    lines
        .iter()
        .enumerate()
        .filter_map(
            |(i, l)| match serde_json::from_str::<serde_json::Value>(l) {
                Ok(v) => Some(v),
                Err(_) if torn_tail && i == last && !text.ends_with('\n') => None,
                Err(e) => panic!("line {} of the metrics log: {e}: {l}", i + 1),
            },
        )
        .filter(|v| v["kind"] == "train")
        .map(|v| {
            let f = |k: &str| {
                v[k].as_array()
                    .unwrap()
                    .iter()
                    .map(|x| x.as_f64().unwrap())
                    .collect::<Vec<_>>()
            };
            (
                v["step"].as_u64().unwrap(),
                v["loss"].as_f64().unwrap(),
                f("alpha"),
                f("drop_rate"),
            )
        })
        .collect()
}

#[test]
fn killed_and_resumed_run_matches_an_uninterrupted_one() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = write_config(tmp.path(), "");
    let straight = tmp.path().join("straight");
    let out = skymoe(&[
        "train",
        "--config",
        cfg.to_str().unwrap(),
        "--quiet",
        "--steps",
        "30",
        "--out",
        straight.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Start a long run and kill it hard once its step-10 checkpoint exists.
    let killed = tmp.path().join("killed");
    let mut child = Command::new(env!("CARGO_BIN_EXE_skymoe"))
        .args([
            "train",
            "--config",
            cfg.to_str().unwrap(),
            "--quiet",
            "--steps",
            "100000",
            "--out",
            killed.to_str().unwrap(),
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let marker = killed.join("checkpoints/step-00000010/trainer_state.json");
    let t0 = Instant::now();
    while !marker.exists() {
        assert!(
            t0.elapsed() < Duration::from_secs(120),
            "no checkpoint appeared"
        );
        assert!(
            child.try_wait().unwrap().is_none(),
            "the run ended before it could be killed"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(records(&killed, true).len() >= 10);

    let out = skymoe(&[
        "train",
        "--config",
        cfg.to_str().unwrap(),
        "--quiet",
        "--steps",
        "30",
        "--out",
        killed.to_str().unwrap(),
        "--resume",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("resuming from"));
    let a = losses(&straight);
    let b = losses(&killed);
    assert_eq!(a.len(), 30);
    assert_eq!(
        a, b,
        "losses, α and drop rates must be identical after the resume"
    );
    assert!(
        a.iter().any(|x| x.3.iter().any(|&d| d > 0.0)),
        "capacity 1.0 should drop some tokens"
    );
    assert!(
        a.last().unwrap().2.iter().all(|&al| al > 0.0),
        "adaptive α rises while tokens drop"
    );
    // The final checkpoints hold identical weights.
    let w = |run: &Path| {
        candle_core::safetensors::load(
            run.join("checkpoints/step-00000030/model.safetensors"),
            &candle_core::Device::Cpu,
        )
        .unwrap()
    };
    let (wa, wb) = (w(&straight), w(&killed));
    for (k, t) in &wa {
        let d = max_abs(&(t - &wb[k]).unwrap());
        assert_eq!(d, 0.0, "{k}");
    }
    // Only the newest checkpoints are kept, and no partial directory is left.
    let names: Vec<String> = std::fs::read_dir(killed.join("checkpoints"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .collect();
    assert!(names.len() <= 3, "{names:?}");
    assert!(names.iter().all(|n| n.starts_with("step-")), "{names:?}");
}

#[test]
fn trained_checkpoint_loads_and_generates() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = write_config(tmp.path(), "");
    let run = tmp.path().join("run");
    let out = skymoe(&[
        "train",
        "--config",
        cfg.to_str().unwrap(),
        "--quiet",
        "--steps",
        "10",
        "--out",
        run.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let first = losses(&run)[0].1;
    let last = losses(&run).last().unwrap().1;
    assert!(last < first, "loss should fall: {first} -> {last}");
    let ck = run.join("checkpoints/step-00000010");
    let out = skymoe(&[
        "generate",
        "--model",
        ck.to_str().unwrap(),
        "--prompt",
        "When shall we",
        "--max-tokens",
        "5",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = skymoe(&["inspect", "--model", ck.to_str().unwrap(), "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["architecture"], "SkyworkForCausalLM");
    assert_eq!(v["experts"], 4);
    // `skymoe eval` of the checkpoint on its corpus, 40 windows of 32 tokens, with `extra`.
    let eval = |extra: &[&str]| -> serde_json::Value {
        let (model, data) = (ck.to_str().unwrap(), corpus());
        let mut args = vec!["eval", "--model", model, "--data", data.to_str().unwrap()];
        args.extend(["--seq-len", "32", "--max-windows", "40"]);
        args.extend(extra);
        let out = skymoe(&args);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    };
    // Perplexity of the trained model on its corpus: finite, better than uniform over the vocab.
    let e = eval(&[]);
    let ppl = e["perplexity"].as_f64().unwrap();
    assert!(ppl > 1.0 && ppl < 300.0, "perplexity {ppl}");
    assert!((e["loss"].as_f64().unwrap().exp() - ppl).abs() < 1e-2 * ppl);
    assert_eq!(e["tokens_predicted"], 40 * 32);
    // The serving engine's perplexity over an int8 KV cache: close to the f32 cache's.
    let served = |kv: &str| {
        eval(&["--weights", "f32", "--kv-cache-dtype", kv])["perplexity"]
            .as_f64()
            .unwrap()
    };
    let (exact, int8) = (served("f32"), served("int8"));
    assert!(
        (int8 - exact).abs() <= 5e-3 * exact && int8 != exact,
        "perplexity {int8} with an int8 cache, {exact} with f32"
    );
    // Token by token, as decoding reads the cache: the f32 cache's perplexity is the
    // prompts' (the same arithmetic in another order), the int8 cache's close to it.
    let decoded = |kv: &str| {
        let e = eval(&["--weights", "f32", "--kv-cache-dtype", kv, "--decode"]);
        assert_eq!(e["tokens_predicted"], 40 * 32);
        e["perplexity"].as_f64().unwrap()
    };
    let (exact_decoded, int8_decoded) = (decoded("f32"), decoded("int8"));
    assert!(
        (exact_decoded - exact).abs() <= 1e-4 * exact,
        "perplexity {exact_decoded} decoded, {exact} as prompts"
    );
    assert!(
        (int8_decoded - exact).abs() <= 5e-3 * exact,
        "perplexity {int8_decoded} decoded over an int8 cache, {exact} with f32"
    );
    // The serving engine's options without `--weights` are refused.
    for (extra, message) in [
        (
            &["--kv-cache-dtype", "int8"][..],
            "--kv-cache-dtype needs --weights",
        ),
        (&["--decode"][..], "--decode needs --weights"),
    ] {
        let (model, data) = (ck.to_str().unwrap(), corpus());
        let mut args = vec!["eval", "--model", model, "--data", data.to_str().unwrap()];
        args.extend(extra);
        assert_clean_failure(&skymoe(&args), message);
    }
}

#[test]
fn empty_corpus_is_an_error() {
    let tmp = tempfile::tempdir().unwrap();
    let empty = tmp.path().join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    let cfg = write_config(tmp.path(), "");
    let out = skymoe(&[
        "train",
        "--config",
        cfg.to_str().unwrap(),
        "--quiet",
        "--data",
        empty.to_str().unwrap(),
        "--out",
        tmp.path().join("r").to_str().unwrap(),
    ]);
    assert_clean_failure(&out, "empty");
}

#[test]
fn non_utf8_input_is_an_error() {
    let tmp = tempfile::tempdir().unwrap();
    let bad = tmp.path().join("bad.txt");
    std::fs::write(&bad, [b'o', b'k', 0xff, 0xfe, b'\n']).unwrap();
    let cfg = write_config(tmp.path(), "");
    let out = skymoe(&[
        "train",
        "--config",
        cfg.to_str().unwrap(),
        "--quiet",
        "--data",
        bad.to_str().unwrap(),
        "--out",
        tmp.path().join("r").to_str().unwrap(),
    ]);
    assert_clean_failure(&out, "bad.txt");
}

#[test]
fn sequence_longer_than_the_model_is_an_error() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = write_config(tmp.path(), "");
    let out = skymoe(&[
        "train",
        "--config",
        cfg.to_str().unwrap(),
        "--quiet",
        "--seq-len",
        "512",
        "--out",
        tmp.path().join("r").to_str().unwrap(),
    ]);
    assert_clean_failure(&out, "max_position_embeddings");
}

#[test]
fn unwritable_output_directory_is_an_error() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = write_config(tmp.path(), "");
    let file = tmp.path().join("a-file");
    std::fs::write(&file, b"x").unwrap();
    let out = skymoe(&[
        "train",
        "--config",
        cfg.to_str().unwrap(),
        "--quiet",
        "--out",
        file.join("run").to_str().unwrap(),
    ]);
    assert_clean_failure(&out, "a-file");
}

#[test]
fn diverging_loss_stops_with_the_last_checkpoint_intact() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = write_config(tmp.path(), "");
    let run = tmp.path().join("r");
    // A sane first stretch, checkpointed at step 5.
    let out = skymoe(&[
        "train",
        "--config",
        cfg.to_str().unwrap(),
        "--quiet",
        "--steps",
        "5",
        "--out",
        run.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let good = std::fs::read(run.join("checkpoints/step-00000005/model.safetensors")).unwrap();
    // Then an absurd learning rate blows the weights up.
    let out = skymoe(&[
        "train",
        "--config",
        cfg.to_str().unwrap(),
        "--quiet",
        "--steps",
        "50",
        "--lr",
        "1e30",
        "--out",
        run.to_str().unwrap(),
        "--resume",
    ]);
    assert_clean_failure(&out, "step-00000005");
    assert_eq!(
        std::fs::read(run.join("checkpoints/step-00000005/model.safetensors")).unwrap(),
        good
    );
}

#[test]
fn bad_run_file_is_an_error() {
    let tmp = tempfile::tempdir().unwrap();
    let p = tmp.path().join("run.toml");
    std::fs::write(&p, "[train]\nstepz = 3\n").unwrap();
    let out = skymoe(&["train", "--config", p.to_str().unwrap()]);
    assert_clean_failure(&out, "stepz");
}

/// A disk that fills up mid-checkpoint: a clear error, no half-written checkpoint, and the last
/// good one intact. Runs inside a private mount namespace over a 1.5 MB tmpfs.
#[test]
fn full_disk_stops_cleanly_and_keeps_the_last_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = write_config(tmp.path(), "");
    let bin = env!("CARGO_BIN_EXE_skymoe");
    let mnt = tmp.path().join("small");
    std::fs::create_dir_all(&mnt).unwrap();
    let run = mnt.join("run");
    let script = format!(
        "set -u; mount -t tmpfs -o size=1500k tmpfs '{m}' || exit 90; \
         '{bin}' train --config '{cfg}' --quiet --steps 40 --checkpoint-every 2 --out '{run}' 2>'{m}/err.txt'; \
         echo \"exit=$?\"; cat '{m}/err.txt'; ls -a '{run}/checkpoints' | sed 's/^/ls: /'; \
         last=$(ls -d '{run}'/checkpoints/step-* | tail -1); \
         '{bin}' inspect --model \"$last\" --json >/dev/null && echo LOADS",
        m = mnt.display(),
        cfg = cfg.display(),
        run = run.display(),
    );
    let is_root = Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false);
    let ns = if is_root { "-m" } else { "-rm" };
    let out = Command::new("unshare")
        .args([ns, "sh", "-c", &script])
        .output()
        .expect("unshare (util-linux) is needed for this test");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_ne!(
        out.status.code(),
        Some(90),
        "cannot mount a tmpfs in a private namespace: {text}"
    );
    assert!(
        text.contains("exit=1"),
        "training should fail with exit status 1: {text}"
    );
    assert!(
        text.contains("No space left on device"),
        "the error should say the disk is full: {text}"
    );
    assert!(!text.contains("panicked"), "{text}");
    assert!(
        !text
            .lines()
            .any(|l| l.starts_with("ls: ") && l.contains("partial")),
        "no partial checkpoint may remain: {text}"
    );
    assert!(
        text.contains("ls: step-00000002"),
        "an early checkpoint fits: {text}"
    );
    assert!(
        text.contains("LOADS"),
        "the last checkpoint must load: {text}"
    );
}

/// `skymoe demo` end to end on a tiny budget: all phases run, reports and samples appear, and
/// every figure it prints comes from the run.
#[test]
fn demo_runs_every_phase() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("demo");
    let o = skymoe(&[
        "demo",
        "--quiet",
        "--steps",
        "6,4",
        "--data",
        corpus().to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success(),
        "{}\n{}",
        stdout,
        String::from_utf8_lossy(&o.stderr)
    );
    for needle in [
        "dense, pre-trained",
        "dense control, continued",
        "MoE 8x top-2",
        "sample from the MoE",
        "sample from the dense control",
        "MoE minus control",
    ] {
        assert!(stdout.contains(needle), "missing `{needle}` in:\n{stdout}");
    }
    assert!(out.join("report/index.html").exists());
    for run in ["dense", "moe", "dense-control"] {
        assert!(
            out.join(run).join("report/index.html").exists(),
            "{run} report"
        );
        assert!(out.join(run).join("metrics.jsonl").exists());
    }
    let ck = Checkpoint::open(&out.join("moe-init"), &candle_core::Device::Cpu).unwrap();
    assert_eq!(
        ck.config.architecture,
        skymoe_model::Architecture::SkyworkMoe
    );
    // The validation losses printed are those of the runs' last validation records.
    let last_val = |run: &str| -> f64 {
        std::fs::read_to_string(out.join(run).join("metrics.jsonl"))
            .unwrap()
            .lines()
            .rev()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .find(|v| v["kind"] == "val")
            .unwrap()["val_loss"]
            .as_f64()
            .unwrap()
    };
    assert!(stdout.contains(&format!("{:.4}", last_val("moe"))));
    assert!(stdout.contains(&format!("{:.4}", last_val("dense-control"))));
}

/// `skymoe experiment` on a tiny budget: tables and plots are written and the expert-similarity
/// metric starts where it must (identical upcycled experts: 1; random experts: near 0).
#[test]
fn experiments_write_results() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("exp");
    let o = skymoe(&[
        "experiment",
        "expert-similarity",
        "--quiet",
        "--seeds",
        "1",
        "--steps",
        "8",
        "--data",
        corpus().to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let csv = std::fs::read_to_string(out.join("expert-similarity/results.csv")).unwrap();
    let start = |kind: &str| -> f64 {
        csv.lines()
            .find(|l| l.starts_with(&format!("{kind},0,")))
            .unwrap()
            .rsplit(',')
            .next()
            .unwrap()
            .parse()
            .unwrap()
    };
    assert!((start("upcycled") - 1.0).abs() < 1e-4, "{csv}");
    assert!(start("scratch").abs() < 0.05, "{csv}");
    assert!(out.join("expert-similarity/similarity.png").exists());
    let o = skymoe(&[
        "experiment",
        "gating-norm",
        "--quiet",
        "--steps",
        "4",
        "--data",
        corpus().to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let md = std::fs::read_to_string(out.join("gating-norm/results.md")).unwrap();
    for row in ["| none |", "| lambda-1 |", "| lambda-2 |"] {
        assert!(md.contains(row), "{md}");
    }
    let o = skymoe(&["experiment", "no-such-thing"]);
    assert!(
        !o.status.success() && String::from_utf8_lossy(&o.stderr).contains("unknown experiment")
    );
}

/// Two runs of the same configuration, large enough for the multithreaded kernels, give
/// bit-identical losses, drop rates and α (no dependence on thread scheduling).
#[test]
fn training_is_deterministic_across_runs() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = write_config(tmp.path(), "");
    let text = std::fs::read_to_string(&cfg)
        .unwrap()
        .replace("hidden_size = 32", "hidden_size = 128")
        .replace("intermediate_size = 64", "intermediate_size = 256");
    std::fs::write(&cfg, text).unwrap();
    let run = |name: &str| {
        let out = tmp.path().join(name);
        let o = skymoe(&[
            "train",
            "--config",
            cfg.to_str().unwrap(),
            "--quiet",
            "--steps",
            "6",
            "--batch-size",
            "8",
            "--out",
            out.to_str().unwrap(),
        ]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        losses(&out)
    };
    assert_eq!(run("a"), run("b"));
}

/// Recomputing layers in backward gives the same training as keeping their activations,
/// with Skywork's adaptive loss and with DeepSeek-V3's sequence-wise loss and selection bias.
#[test]
fn recomputed_layers_train_exactly_like_kept_ones() {
    check_recomputation("");
    check_recomputation(
        "[aux]\nbalance = \"sequence\"\nadaptive = false\nalpha_init = 0.01\nbias_update_rate = 0.01\n",
    );
    // Megatron's global-batch loss over several micro-batches.
    check_recomputation(
        "grad_accum = 2\n[aux]\nbalance = \"global\"\nadaptive = false\nalpha_init = 0.01\n",
    );
}

fn check_recomputation(extra: &str) {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = write_config(tmp.path(), extra);
    let mut runs = Vec::new();
    for (name, extra) in [
        ("kept", None),
        ("recomputed", Some("2")),
        ("first-recomputed", Some("1")),
    ] {
        let run = tmp.path().join(name);
        let mut args = vec![
            "train",
            "--config",
            cfg.to_str().unwrap(),
            "--quiet",
            "--steps",
            "3",
            "--out",
            run.to_str().unwrap(),
        ];
        if let Some(r) = extra {
            args.extend(["--recompute-layers", r]);
        }
        let out = skymoe(&args);
        assert!(
            out.status.success(),
            "{name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        runs.push(run);
    }
    let base = losses(&runs[0]);
    for run in &runs[1..] {
        let other = losses(run);
        assert_eq!(base.len(), other.len());
        for (a, b) in base.iter().zip(&other) {
            assert!((a.1 - b.1).abs() <= 1e-6 * a.1.abs(), "{a:?} vs {b:?}");
            assert_eq!(a.2.len(), b.2.len());
            for (x, y) in a.2.iter().zip(&b.2) {
                assert!((x - y).abs() <= 1e-9, "drop rates {a:?} vs {b:?}");
            }
        }
        let wa = candle_core::safetensors::load(
            runs[0].join("checkpoints/step-00000003/model.safetensors"),
            &candle_core::Device::Cpu,
        )
        .unwrap();
        let wb = candle_core::safetensors::load(
            run.join("checkpoints/step-00000003/model.safetensors"),
            &candle_core::Device::Cpu,
        )
        .unwrap();
        for (name, ta) in &wa {
            let diff = (ta - &wb[name])
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(diff <= 1e-6, "{name}: {diff}");
        }
    }
}

#[test]
fn recompute_counts_must_match_the_stages() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = write_config(tmp.path(), "");
    let out = skymoe(&[
        "train",
        "--config",
        cfg.to_str().unwrap(),
        "--quiet",
        "--steps",
        "1",
        "--out",
        tmp.path().join("bad").to_str().unwrap(),
        "--recompute-layers",
        "1,1",
    ]);
    assert_clean_failure(&out, "2 recompute counts given for pp=1");
}
