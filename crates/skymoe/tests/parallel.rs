//! Multi-process training under `mpirun` (feature `mpi`): data parallelism equals one process
//! accumulating the same micro-batches; layout errors and a killed rank stop every rank.
#![cfg(feature = "mpi")]

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{corpus, skymoe, Mpirun};

/// `mpirun -np np skymoe args`, its processes tagged `tag` (to find them by their environment).
fn mpirun(np: usize, args: &[&str], tag: &str) -> Mpirun {
    let mut cmd = Mpirun::new(np);
    cmd.args(args).env("SKYMOE_TEST_TAG", tag);
    cmd
}

/// `skymoe train --quiet` in one process with `args`; panics with its output on failure.
fn train_alone(args: &[&str]) {
    let mut all = vec!["train", "--quiet"];
    all.extend_from_slice(args);
    let out = skymoe(&all);
    assert!(out.status.success(), "{args:?}: {}", text(&out));
}

/// `skymoe train --quiet` under `mpirun -np np` with `args`; panics with its output on
/// failure, else returns it.
fn train_mpirun(np: usize, args: &[&str], tag: &str) -> Output {
    let mut all = vec!["train", "--quiet"];
    all.extend_from_slice(args);
    let out = mpirun(np, &all, tag).output().unwrap();
    assert!(out.status.success(), "{args:?}: {}", text(&out));
    out
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn write_config(dir: &Path, grad_accum: usize, steps: usize) -> PathBuf {
    let p = dir.join(format!("run-accum{grad_accum}.toml"));
    std::fs::write(
        &p,
        format!(
            r#"
[model]
arch = "skywork_moe"
hidden_size = 32
intermediate_size = 64
layers = 3
heads = 4
kv_heads = 2
experts = 4
top_k = 2
max_position_embeddings = 128

[router]
capacity_factor = 1.0

[aux]
balance = "skywork"
adaptive = true
alpha_init = 0.01

[data]
inputs = ["{}"]
vocab_size = 300
seq_len = 32

[optim]
warmup_steps = 1
lr = 0.003
# AdamW moves a weight by lr·g/(|g| + eps): around |g| ≈ eps it turns rounding-order noise of
# 1e-11 in a gradient element into 1e-6 in the weight. eps = 1e-6 keeps the comparison about
# the parallel arithmetic (the gradients themselves are compared directly at 1e-5 elsewhere).
eps = 1e-6

[train]
steps = {steps}
batch_size = 2
grad_accum = {grad_accum}
eval_every = 0
checkpoint_every = 0
"#,
            corpus().display()
        ),
    )
    .unwrap();
    p
}

/// (loss, ce, aux, drop rates, α) per training step.
type StepRecord = (f64, f64, f64, Vec<f64>, Vec<f64>);

fn steps(run: &Path) -> Vec<StepRecord> {
    let text = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
    text.lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|v| v["kind"] == "train")
        .map(|v| {
            let list = |k: &str| -> Vec<f64> {
                v[k].as_array()
                    .unwrap()
                    .iter()
                    .map(|x| x.as_f64().unwrap())
                    .collect()
            };
            (
                v["loss"].as_f64().unwrap(),
                v["ce"].as_f64().unwrap(),
                v["aux_loss"].as_f64().unwrap(),
                list("drop_rate"),
                list("alpha"),
            )
        })
        .collect()
}

fn close(a: f64, b: f64, what: &str) {
    let tol = 1e-5 * a.abs().max(b.abs()) + 1e-9;
    assert!((a - b).abs() <= tol, "{what}: {a} vs {b}");
}

fn weights(run: &Path) -> std::collections::HashMap<String, candle_core::Tensor> {
    let ck = std::fs::read_dir(run.join("checkpoints"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .max()
        .unwrap();
    candle_core::safetensors::load(ck.join("model.safetensors"), &candle_core::Device::Cpu).unwrap()
}

/// Losses, CE, aux loss, drop rates and α of every step, and the final weights, within 1e-5.
fn assert_same_training(single: &Path, other: &Path, what: &str) {
    assert_same_training_within(single, other, what, 1e-5);
}

/// As [`assert_same_training`], the final weights within `weights_tol` (relative L2).
fn assert_same_training_within(single: &Path, other: &Path, what: &str, weights_tol: f32) {
    let (a, b) = (steps(single), steps(other));
    assert_eq!(a.len(), b.len(), "{what}: steps");
    for (i, (x, y)) in a.iter().zip(&b).enumerate() {
        close(x.0, y.0, &format!("{what} step {i} loss"));
        close(x.1, y.1, &format!("{what} step {i} ce"));
        close(x.2, y.2, &format!("{what} step {i} aux"));
        for (l, (p, q)) in x.3.iter().zip(&y.3).enumerate() {
            close(*p, *q, &format!("{what} step {i} drop rate layer {l}"));
        }
        for (l, (p, q)) in x.4.iter().zip(&y.4).enumerate() {
            close(*p, *q, &format!("{what} step {i} alpha layer {l}"));
        }
    }
    assert_same_weights(single, other, what, weights_tol);
}

/// Every tensor of the final checkpoints within 1e-5 relative (L2 norm of the difference over
/// the L2 norm of the tensor). Element-wise maxima are not used: where a gradient element is
/// about Adam's eps (1e-8), its update is lr·g/(|g| + eps), which turns rounding-order
/// differences of 1e-11 in g into 1e-6 in a few weights.
fn assert_same_weights(single: &Path, other: &Path, what: &str, tol: f32) {
    let (wa, wb) = (weights(single), weights(other));
    assert_eq!(wa.len(), wb.len());
    let l2 = |t: &candle_core::Tensor| -> f32 {
        t.sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
            .sqrt()
    };
    for (name, ta) in &wa {
        let diff = l2(&(ta - &wb[name]).unwrap());
        let norm = l2(ta);
        assert!(
            diff <= tol * norm.max(1e-6),
            "{what} {name}: |Δ| {diff}, |w| {norm}"
        );
    }
}

#[test]
fn model_parallel_training_equals_one_process() {
    let tmp = tempfile::tempdir().unwrap();
    let single = tmp.path().join("single");
    let cfg2 = write_config(tmp.path(), 2, 3);
    train_alone(&[
        "--config",
        cfg2.to_str().unwrap(),
        "--out",
        single.to_str().unwrap(),
    ]);
    let cfg1 = write_config(tmp.path(), 1, 3);
    for (np, layout, cfg, extra) in [
        (2, "tp=2", &cfg2, &[][..]),
        (2, "edp=2", &cfg2, &[]),
        (4, "edp=2,dp=2", &cfg1, &[]),
        (4, "tp=2,dp=2", &cfg1, &[]),
        (2, "pp=2", &cfg2, &["--pp-layers", "1,2"][..]),
        (4, "pp=2,dp=2", &cfg1, &["--pp-layers", "2,1"]),
        (4, "edp=2,pp=2", &cfg2, &["--pp-layers", "1,2"]),
        (2, "ep=2,dp=2", &cfg1, &["--recompute-layers", "2"]),
        (4, "tp=2,ep=4,dp=2", &cfg1, &[]),
        (2, "tp=2", &cfg2, &["--recompute-layers", "3"]),
        (
            2,
            "pp=2",
            &cfg2,
            &["--pp-layers", "1,2", "--recompute-layers", "1,1"],
        ),
        (4, "ep=2,dp=2,pp=2", &cfg1, &["--pp-layers", "2,1"]),
    ] {
        let run = tmp.path().join(layout.replace([',', '='], "-"));
        let mut args = vec![
            "train",
            "--config",
            cfg.to_str().unwrap(),
            "--quiet",
            "--out",
            run.to_str().unwrap(),
            "--parallel",
            layout,
        ];
        args.extend_from_slice(extra);
        let out = mpirun(np, &args, "mp").output().unwrap();
        assert!(out.status.success(), "{layout}: {}", text(&out));
        assert_same_training(&single, &run, layout);
    }
    // Without --pp-layers the planner splits the stages: the LM head and loss weigh on the
    // last stage, which gets fewer layers.
    let run = tmp.path().join("pp-planned");
    let out = train_mpirun(
        2,
        &[
            "--config",
            cfg2.to_str().unwrap(),
            "--out",
            run.to_str().unwrap(),
            "--parallel",
            "pp=2",
        ],
        "planned",
    );
    assert!(
        text(&out).contains("pipeline: [2, 1] layers per stage (planned)"),
        "{}",
        text(&out)
    );
    assert_same_training(&single, &run, "pp=2 planned");
    // Four data-parallel ranks: experts over all four, and over pairs (expert-data-parallel
    // groups of two summing their experts' gradients).
    let single4 = tmp.path().join("single4");
    let cfg4 = write_config(tmp.path(), 4, 3);
    train_alone(&[
        "--config",
        cfg4.to_str().unwrap(),
        "--out",
        single4.to_str().unwrap(),
    ]);
    for layout in ["ep=4,dp=4", "ep=2,dp=4"] {
        let run = tmp.path().join(layout.replace([',', '='], "-"));
        train_mpirun(
            4,
            &[
                "--config",
                cfg1.to_str().unwrap(),
                "--out",
                run.to_str().unwrap(),
                "--parallel",
                layout,
            ],
            "ep4",
        );
        assert_same_training(&single4, &run, layout);
    }
    // Resharding: two steps in one process, the third resumed under EDP over two processes.
    let resumed = tmp.path().join("resumed");
    train_alone(&[
        "--config",
        cfg2.to_str().unwrap(),
        "--out",
        resumed.to_str().unwrap(),
        "--steps",
        "2",
    ]);
    train_mpirun(
        2,
        &[
            "--config",
            cfg2.to_str().unwrap(),
            "--out",
            resumed.to_str().unwrap(),
            "--steps",
            "3",
            "--resume",
            "--parallel",
            "edp=2",
        ],
        "resume",
    );
    assert_same_training(&single, &resumed, "one process then edp=2");
}

#[test]
fn data_parallel_equals_one_process_accumulating_the_same_batches() {
    let tmp = tempfile::tempdir().unwrap();
    for np in [2usize, 4] {
        let single = tmp.path().join(format!("single-{np}"));
        let cfg = write_config(tmp.path(), np, 3);
        train_alone(&[
            "--config",
            cfg.to_str().unwrap(),
            "--out",
            single.to_str().unwrap(),
        ]);

        let parallel = tmp.path().join(format!("dp-{np}"));
        let cfg = write_config(tmp.path(), 1, 3);
        let dp = format!("dp={np}");
        let out = train_mpirun(
            np,
            &[
                "--config",
                cfg.to_str().unwrap(),
                "--out",
                parallel.to_str().unwrap(),
                "--parallel",
                &dp,
            ],
            "dp",
        );
        assert!(
            text(&out).contains(&format!("on {np} processes")),
            "{}",
            text(&out)
        );

        let (a, b) = (steps(&single), steps(&parallel));
        assert_eq!(a.len(), 3);
        assert_eq!(b.len(), 3, "only rank 0 writes metrics");
        for (i, (x, y)) in a.iter().zip(&b).enumerate() {
            close(x.0, y.0, &format!("np={np} step {i} loss"));
            close(x.1, y.1, &format!("np={np} step {i} ce"));
            close(x.2, y.2, &format!("np={np} step {i} aux"));
            for (l, (p, q)) in x.3.iter().zip(&y.3).enumerate() {
                close(*p, *q, &format!("np={np} step {i} drop rate layer {l}"));
            }
            for (l, (p, q)) in x.4.iter().zip(&y.4).enumerate() {
                close(*p, *q, &format!("np={np} step {i} alpha layer {l}"));
            }
        }
        assert!(
            a.iter().any(|s| s.3.iter().any(|&d| d > 0.0)),
            "the runs drop tokens"
        );
        assert_same_weights(&single, &parallel, &format!("dp={np}"), 1e-5);
        // The checkpoint of the parallel run is an ordinary one: a single process loads it.
        let ck = std::fs::read_dir(parallel.join("checkpoints"))
            .unwrap()
            .next()
            .unwrap()
            .unwrap()
            .path();
        let out = skymoe(&["inspect", "--model", ck.to_str().unwrap()]);
        assert!(out.status.success(), "{}", text(&out));
    }
}

/// The optimiser state of a run's last checkpoint.
fn moments(run: &Path) -> std::collections::HashMap<String, candle_core::Tensor> {
    let ck = std::fs::read_dir(run.join("checkpoints"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .max()
        .unwrap();
    candle_core::safetensors::load(ck.join("optimizer.safetensors"), &candle_core::Device::Cpu)
        .unwrap()
}

/// The Mixtral fixture with every gate zeroed: all routing logits tie, and every token goes
/// to experts 0 and 1, so under `ep=2` the second rank's experts receive nothing.
fn collapsed_router_model(dir: &Path) -> PathBuf {
    let src = common::fixtures().join("mixtral");
    let out = dir.join("collapsed");
    std::fs::create_dir_all(&out).unwrap();
    for f in ["config.json", "tokenizer.json"] {
        std::fs::copy(src.join(f), out.join(f)).unwrap();
    }
    let mut all = std::collections::HashMap::new();
    for entry in std::fs::read_dir(&src).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().to_string();
        if name.starts_with("model-") && name.ends_with(".safetensors") {
            for (k, t) in candle_core::safetensors::load(&path, &candle_core::Device::Cpu).unwrap()
            {
                let t = if k.ends_with("block_sparse_moe.gate.weight") {
                    t.zeros_like().unwrap()
                } else {
                    t
                };
                all.insert(k, t);
            }
        }
    }
    candle_core::safetensors::save(&all, out.join("model.safetensors")).unwrap();
    out
}

#[test]
fn expert_parallelism_survives_a_rank_whose_experts_get_no_tokens() {
    let tmp = tempfile::tempdir().unwrap();
    let model = collapsed_router_model(tmp.path());
    let tokenizer = model.join("tokenizer.json");
    let cfg = |accum: usize| {
        let p = tmp.path().join(format!("collapsed-{accum}.toml"));
        std::fs::write(
            &p,
            format!(
                "[model]\ninit = \"{}\"\n[router]\ncapacity_factor = 0.0\n[aux]\nbalance = \"none\"\n[data]\ninputs = [\"{}\"]\ntokenizer = \"{}\"\nseq_len = 32\n[optim]\nwarmup_steps = 0\neps = 1e-6\n[train]\nsteps = 2\nbatch_size = 2\ngrad_accum = {accum}\neval_every = 0\ncheckpoint_every = 0\n",
                model.display(),
                corpus().display(),
                tokenizer.display()
            ),
        )
        .unwrap();
        p
    };
    let single = tmp.path().join("single");
    train_alone(&[
        "--config",
        cfg(2).to_str().unwrap(),
        "--out",
        single.to_str().unwrap(),
    ]);
    let run = tmp.path().join("ep");
    train_mpirun(
        2,
        &[
            "--config",
            cfg(1).to_str().unwrap(),
            "--out",
            run.to_str().unwrap(),
            "--parallel",
            "ep=2, dp=2",
        ],
        "collapsed",
    );
    // Every token went to experts 0 and 1 in the first step (rank 1's experts idle).
    let first = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
    let first: serde_json::Value = serde_json::from_str(first.lines().next().unwrap()).unwrap();
    let load = first["expert_load"][0].as_array().unwrap();
    assert!(
        load[2].as_f64().unwrap() == 0.0 && load[3].as_f64().unwrap() == 0.0,
        "{load:?}"
    );
    // The collapsed router's gate weights are tiny (|w| ~ 0.015) and Adam's eps is 1e-6 here:
    // the single process multiplies all experts in one grouped product and the ranks theirs
    // one by one, and the rounding-order differences of ~1e-7 in their gradients reach the
    // gate's update as ~2e-5 of its norm.
    assert_same_training_within(&single, &run, "ep=2 with idle experts", 5e-5);
}

#[test]
fn zero_one_shards_optimizer_state_and_changes_nothing_else() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = write_config(tmp.path(), 1, 3);
    let mut runs = Vec::new();
    for layout in [
        "dp=2",
        "dp=2,zero=1",
        "edp=2,dp=2,zero=1",
        "ep=2,dp=2,zero=1",
    ] {
        let np = if layout.starts_with("edp") { 4 } else { 2 };
        let run = tmp.path().join(layout.replace([',', '='], "-"));
        train_mpirun(
            np,
            &[
                "--config",
                cfg.to_str().unwrap(),
                "--out",
                run.to_str().unwrap(),
                "--parallel",
                layout,
            ],
            "zero",
        );
        runs.push(run);
    }
    assert_same_training(&runs[0], &runs[1], "zero=1");
    assert_same_training(&runs[0], &runs[2], "edp=2,zero=1");
    assert_same_training(&runs[0], &runs[3], "ep=2,zero=1");
    // The checkpoint holds every replica's moments, as without ZeRO.
    let (a, b) = (moments(&runs[0]), moments(&runs[1]));
    assert_eq!(a.len(), b.len());
    for (name, ta) in &a {
        let diff = (ta - &b[name])
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(diff <= 1e-9, "{name}: {diff}");
    }
}

#[test]
fn a_layout_the_processes_cannot_run_stops_every_rank() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = write_config(tmp.path(), 1, 2);
    let run = tmp.path().join("run");
    for (layout, needle) in [
        ("dp=4", "needs 4 processes, but 2 were started"),
        ("tp=2,ep=2,etp=2", "not available yet"),
        ("dp=2,zero=2", "ZeRO-2 is not available"),
    ] {
        let out = mpirun(
            2,
            &[
                "train",
                "--config",
                cfg.to_str().unwrap(),
                "--quiet",
                "--out",
                run.to_str().unwrap(),
                "--parallel",
                layout,
            ],
            "layout",
        )
        .output()
        .unwrap();
        assert!(!out.status.success());
        let t = text(&out);
        assert!(t.contains(needle), "{layout}: {t}");
        assert!(t.contains("error: rank "), "{t}");
    }
}

/// Processes of this test's runs with `OMPI_COMM_WORLD_RANK` = `rank`.
fn pids_of_rank(tag: &str, rank: usize) -> Vec<u32> {
    let mut pids = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(env) = std::fs::read(entry.path().join("environ")) else {
            continue;
        };
        let vars: Vec<&[u8]> = env.split(|&b| b == 0).collect();
        let has = |kv: &str| vars.contains(&kv.as_bytes());
        if has(&format!("SKYMOE_TEST_TAG={tag}")) && has(&format!("OMPI_COMM_WORLD_RANK={rank}")) {
            pids.push(pid);
        }
    }
    pids
}

#[test]
fn killing_a_rank_stops_the_run_with_the_rank_named() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = write_config(tmp.path(), 1, 100_000);
    let run = tmp.path().join("run");
    let tag = format!("kill-{}", std::process::id());
    // The session directory lives until the job has ended.
    let mut job = mpirun(
        2,
        &[
            "train",
            "--config",
            cfg.to_str().unwrap(),
            "--quiet",
            "--out",
            run.to_str().unwrap(),
            "--parallel",
            "dp=2",
        ],
        &tag,
    );
    let mut child = job
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Wait for training to start (a metrics line), then kill rank 1.
    let t0 = Instant::now();
    while std::fs::read_to_string(run.join("metrics.jsonl")).map_or(true, |t| t.lines().count() < 2)
    {
        assert!(
            t0.elapsed() < Duration::from_secs(120),
            "training did not start"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let victims = pids_of_rank(&tag, 1);
    assert!(!victims.is_empty(), "rank 1's process not found");
    for pid in victims {
        let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
    }
    // Every rank must exit, non-zero, promptly: no hang.
    let t0 = Instant::now();
    loop {
        if child.try_wait().unwrap().is_some() {
            break;
        }
        if t0.elapsed() > Duration::from_secs(60) {
            let _ = child.kill();
            panic!("the run hung after rank 1 was killed");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let out = child.wait_with_output().unwrap();
    assert!(!out.status.success());
    let t = text(&out);
    assert!(t.contains("rank 1"), "{t}");
    assert!(pids_of_rank(&tag, 0).is_empty(), "rank 0 is still running");
}

/// `skymoe grads` of one process, and the same under mpirun with a model-parallel layout.
fn grads_file(dir: &Path, model: &Path, tag: &str, layout: Option<(usize, &[&str])>) -> PathBuf {
    let out = dir.join(format!("{tag}.safetensors"));
    let tokens = "1,5,9,3,7,2,11,4";
    let mut args = vec![
        "grads",
        "--model",
        model.to_str().unwrap(),
        "--tokens",
        tokens,
        "--out",
        out.to_str().unwrap(),
    ];
    let o = match layout {
        None => skymoe(&args),
        Some((np, extra)) => {
            args.extend_from_slice(extra);
            mpirun(np, &args, "grads").output().unwrap()
        }
    };
    assert!(o.status.success(), "{tag}: {}", text(&o));
    out
}

/// Processes and extra arguments of one `mpirun` launch.
type Launch<'a> = (usize, &'a [&'a str]);

#[test]
fn model_parallel_gradients_equal_one_process() {
    let tmp = tempfile::tempdir().unwrap();
    let fixtures = common::fixtures();
    let cases: [(&str, &[Launch]); 7] = [
        (
            "skywork_moe",
            &[
                (2, &["--parallel", "tp=2"]),
                (2, &["--parallel", "edp=2"]),
                (4, &["--parallel", "edp=4"]),
                (4, &["--parallel", "tp=4"]),
                (4, &["--parallel", "edp=2,pp=2", "--pp-layers", "1,2"]),
                (3, &["--parallel", "pp=3"]),
            ],
        ),
        (
            "qwen2_moe",
            &[
                (2, &["--parallel", "tp=2"]),
                (2, &["--parallel", "edp=2"]),
                (4, &["--parallel", "tp=2,pp=2", "--pp-layers", "2,1"]),
            ],
        ),
        (
            "skywork_moe_variant",
            &[
                (2, &["--parallel", "edp=2"]),
                (2, &["--parallel", "pp=2", "--pp-layers", "1,2"]),
            ],
        ),
        (
            "llama",
            &[
                (2, &["--parallel", "tp=2"]),
                (2, &["--parallel", "pp=2", "--pp-layers", "2,1"]),
            ],
        ),
        // Latent attention split by heads (the latent projections replicated).
        (
            "deepseek_v2",
            &[
                (2, &["--parallel", "tp=2"]),
                (2, &["--parallel", "edp=2"]),
                (4, &["--parallel", "tp=2,pp=2", "--pp-layers", "2,1"]),
            ],
        ),
        (
            "deepseek_v3",
            &[(2, &["--parallel", "tp=2"]), (4, &["--parallel", "tp=4"])],
        ),
        // A q/k norm over the whole projections, its sum of squares summed over the ranks.
        (
            "olmoe",
            &[(2, &["--parallel", "tp=2"]), (2, &["--parallel", "edp=2"])],
        ),
    ];
    for (name, layouts) in cases {
        let model = fixtures.join(name);
        let single = grads_file(tmp.path(), &model, &format!("{name}-single"), None);
        let want = candle_core::safetensors::load(&single, &candle_core::Device::Cpu).unwrap();
        for (i, &(np, extra)) in layouts.iter().enumerate() {
            let file = grads_file(
                tmp.path(),
                &model,
                &format!("{name}-{i}"),
                Some((np, extra)),
            );
            let got = candle_core::safetensors::load(&file, &candle_core::Device::Cpu).unwrap();
            assert_eq!(got.len(), want.len(), "{name} {extra:?}");
            for (t, w) in &want {
                let g = &got[t];
                let diff = (w - g)
                    .unwrap()
                    .abs()
                    .unwrap()
                    .max_all()
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap();
                let scale = w
                    .abs()
                    .unwrap()
                    .max_all()
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap();
                assert!(
                    diff <= 1e-5 * scale.max(1e-6),
                    "{name} {extra:?} {t}: max |Δ| {diff}, scale {scale}"
                );
            }
        }
    }
}

/// A run file training the reference checkpoint of `family` with `balance` (and a selection
/// bias updated at `bias_rate`), `grad_accum` micro-batches a step.
fn family_config(
    dir: &Path,
    family: &str,
    balance: &str,
    bias_rate: f64,
    grad_accum: usize,
) -> PathBuf {
    family_config_sized(dir, family, balance, bias_rate, grad_accum, 2, 1.25)
}

/// [`family_config`] with its micro-batch size and capacity factor (0: dropless).
fn family_config_sized(
    dir: &Path,
    family: &str,
    balance: &str,
    bias_rate: f64,
    grad_accum: usize,
    batch_size: usize,
    capacity_factor: f64,
) -> PathBuf {
    let p = dir.join(format!(
        "{family}-{balance}-{bias_rate}-accum{grad_accum}-batch{batch_size}-cf{capacity_factor}.toml"
    ));
    std::fs::write(
        &p,
        format!(
            r#"
[model]
init = "{init}"

[router]
capacity_factor = {capacity_factor}

[aux]
balance = "{balance}"
adaptive = {adaptive}
alpha_init = 0.01
bias_update_rate = {bias_rate}

[data]
inputs = ["{corpus}"]
seq_len = 16

[optim]
warmup_steps = 1
lr = 0.003
eps = 1e-6

[train]
steps = 3
batch_size = {batch_size}
grad_accum = {grad_accum}
eval_every = 0
checkpoint_every = 0
"#,
            init = common::fixtures().join(family).display(),
            adaptive = balance == "skywork",
            corpus = corpus().display()
        ),
    )
    .unwrap();
    p
}

/// The new families (latent attention, shared experts and dense first layers of DeepSeek-V3;
/// Qwen3-MoE's per-head q/k norm and many small experts) train the same over expert-parallel
/// and pipeline-parallel processes as in one, with their balancing options: DeepSeek-V3's
/// sequence-wise loss and aux-loss-free selection bias (its load counts summed over the
/// processes), Megatron's global-batch loss.
#[test]
fn new_families_train_the_same_under_expert_and_pipeline_parallelism() {
    type Case<'a> = (&'a str, &'a str, f64, &'a [(usize, &'a str, &'a [&'a str])]);
    let cases: [Case; 3] = [
        (
            "deepseek_v3",
            "sequence",
            0.01,
            &[
                (2, "ep=2,dp=2", &[]),
                (2, "pp=2", &["--pp-layers", "1,2"]),
                (4, "ep=2,dp=2,pp=2", &["--pp-layers", "2,1"]),
                (2, "tp=2", &[]),
                (2, "edp=2", &[]),
            ],
        ),
        (
            "qwen3_moe",
            "skywork",
            0.0,
            &[
                (2, "ep=2,dp=2", &[]),
                (2, "pp=2", &["--pp-layers", "2,1"]),
                (2, "tp=2", &[]),
                (2, "edp=2", &[]),
            ],
        ),
        (
            "qwen3_moe",
            "global",
            0.0,
            &[(2, "edp=2", &[]), (2, "pp=2", &["--pp-layers", "1,2"])],
        ),
    ];
    let tmp = tempfile::tempdir().unwrap();
    for (family, balance, rate, layouts) in cases {
        let single = tmp.path().join(format!("{family}-{balance}-single"));
        let cfg2 = family_config(tmp.path(), family, balance, rate, 2);
        let cfg1 = family_config(tmp.path(), family, balance, rate, 1);
        train_alone(&[
            "--config",
            cfg2.to_str().unwrap(),
            "--out",
            single.to_str().unwrap(),
        ]);
        for &(np, layout, extra) in layouts {
            let what = format!("{family} {balance} {layout}");
            let run = tmp.path().join(format!(
                "{family}-{balance}-{}",
                layout.replace([',', '='], "-")
            ));
            // Data-parallel replicas each take one of the single process's micro-batches.
            let cfg = if layout.split(',').any(|p| p == "dp=2") {
                &cfg1
            } else {
                &cfg2
            };
            let mut args = vec![
                "train",
                "--config",
                cfg.to_str().unwrap(),
                "--quiet",
                "--out",
                run.to_str().unwrap(),
                "--parallel",
                layout,
            ];
            args.extend_from_slice(extra);
            let out = mpirun(np, &args, "families").output().unwrap();
            assert!(out.status.success(), "{what}: {}", text(&out));
            assert_same_training(&single, &run, &what);
        }
    }
    // The global-batch loss over data-parallel replicas, as Megatron-Core computes it: each
    // micro-batch's load counts summed over the replicas, divided by their tokens. Two
    // replicas of one micro-batch of 2 sequences equal one process with one micro-batch of
    // their 4 sequences (dropless, so that capacity does not depend on the micro-batch size).
    let single = tmp.path().join("global-dp-single");
    let cfg4 = family_config_sized(tmp.path(), "qwen3_moe", "global", 0.0, 1, 4, 0.0);
    let cfg2 = family_config_sized(tmp.path(), "qwen3_moe", "global", 0.0, 1, 2, 0.0);
    train_alone(&[
        "--config",
        cfg4.to_str().unwrap(),
        "--out",
        single.to_str().unwrap(),
    ]);
    for (np, layout) in [(2, "dp=2"), (2, "ep=2,dp=2"), (4, "ep=2,dp=2,pp=2")] {
        let run = tmp
            .path()
            .join(format!("global-{}", layout.replace([',', '='], "-")));
        let mut args = vec![
            "train",
            "--config",
            cfg2.to_str().unwrap(),
            "--quiet",
            "--out",
            run.to_str().unwrap(),
            "--parallel",
            layout,
        ];
        if layout.contains("pp=2") {
            args.extend_from_slice(&["--pp-layers", "1,2"]);
        }
        let out = mpirun(np, &args, "families").output().unwrap();
        let what = format!("qwen3_moe global {layout}");
        assert!(out.status.success(), "{what}: {}", text(&out));
        assert_same_training(&single, &run, &what);
    }
}
