//! `skymoe plan` end to end: the JSON interface, the table, bad input, calibration, and the
//! hand-off of the chosen layout to `skymoe train`.

mod common;

use common::{assert_clean_failure, corpus, fixtures, skymoe};
use serde_json::Value;

const SKYWORK: [&str; 10] = [
    "plan",
    "--model",
    "skywork-moe-146b",
    "--cluster",
    "a800-80g",
    "--nodes",
    "192",
    "--global-batch-tokens",
    "6291456",
    "--seq-len",
];

fn plan_json(extra: &[&str]) -> Vec<Value> {
    let mut args: Vec<&str> = SKYWORK.to_vec();
    args.push("4096");
    args.extend_from_slice(extra);
    args.push("--json");
    let out = skymoe(&args);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice::<Value>(&out.stdout)
        .expect("plan --json prints JSON")
        .as_array()
        .expect("a JSON array")
        .clone()
}

#[test]
fn json_lists_layouts_best_first_with_every_field() {
    let plans = plan_json(&["--zero", "1"]);
    assert!(plans.len() > 50, "{}", plans.len());
    for key in [
        "tp",
        "ep",
        "edp",
        "etp",
        "pp",
        "dp",
        "zero",
        "pp_layers",
        "recompute_layers",
        "mem_gib_per_gpu",
        "step_time_s",
        "bubble_fraction",
        "mfu",
        "tokens_per_gpu_s",
        "feasible",
        "why_infeasible",
        "args",
    ] {
        assert!(plans[0].get(key).is_some(), "missing {key}");
    }
    let feasible: Vec<&Value> = plans.iter().filter(|p| p["feasible"] == true).collect();
    assert!(!feasible.is_empty());
    // Feasible layouts come first, fastest first.
    assert_eq!(plans[0]["feasible"], true);
    let times: Vec<f64> = feasible
        .iter()
        .map(|p| p["step_time_s"].as_f64().unwrap())
        .collect();
    assert!(times.windows(2).all(|w| w[0] <= w[1]));
    for p in &plans {
        let layers: u64 = p["pp_layers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap())
            .sum();
        assert_eq!(layers, 52);
        assert_eq!(
            p["pp_layers"].as_array().unwrap().len() as u64,
            p["pp"].as_u64().unwrap()
        );
        if p["feasible"] == true {
            assert!(p["why_infeasible"].is_null());
            assert!(p["mem_gib_per_gpu"].as_f64().unwrap() <= 80.0);
            let mfu = p["mfu"].as_f64().unwrap();
            assert!(mfu > 0.0 && mfu < 1.0, "{mfu}");
        } else {
            assert!(p["why_infeasible"].is_string());
        }
    }
}

#[test]
fn one_layout_is_evaluated_alone() {
    let plans = plan_json(&["--layout", "edp=4,pp=12,dp=32,zero=1"]);
    assert_eq!(plans.len(), 1);
    let p = &plans[0];
    assert_eq!(
        [&p["tp"], &p["ep"], &p["edp"], &p["etp"], &p["pp"], &p["dp"], &p["zero"]]
            .map(|v| v.as_u64().unwrap()),
        [4, 4, 4, 1, 12, 32, 1]
    );
    assert_eq!(p["feasible"], true);
    assert!(p["args"]
        .as_str()
        .unwrap()
        .starts_with("--parallel edp=4,pp=12,dp=32,zero=1 --pp-layers "));
    // A split given by hand is used as given.
    let plans = plan_json(&[
        "--layout",
        "edp=4,pp=12,dp=32,zero=1",
        "--pp-layers",
        "5,5,5,5,4,4,4,4,4,4,4,4",
    ]);
    assert_eq!(
        plans[0]["pp_layers"],
        serde_json::json!([5, 5, 5, 5, 4, 4, 4, 4, 4, 4, 4, 4])
    );
}

#[test]
fn table_names_the_winner_as_train_arguments() {
    let mut args: Vec<&str> = SKYWORK.to_vec();
    args.extend_from_slice(&["4096", "--top", "5"]);
    let out = skymoe(&args);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("pp_layers") && text.contains("MFU%"),
        "{text}"
    );
    assert!(text.contains("best: skymoe train --parallel "), "{text}");
    assert_eq!(
        text.lines()
            .filter(|l| l.trim_start().starts_with("5 "))
            .count(),
        1,
        "{text}"
    );
}

#[test]
fn latent_attention_presets_plan() {
    let args = [
        "plan",
        "--model",
        "deepseek-v3",
        "--cluster",
        "h800-80g",
        "--nodes",
        "32",
        "--global-batch-tokens",
        "8388608",
        "--seq-len",
        "4096",
        "--zero",
        "1",
        "--top",
        "3",
    ];
    let out = skymoe(&args);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("best: skymoe train --parallel tp="), "{text}");
    assert!(text.contains("note: 3 of the 61 layers"), "{text}");
    assert!(text.contains("multi-token-prediction"), "{text}");
    assert!(text.contains("70272 bytes per token"), "{text}");
    let mut with_tp = args.to_vec();
    with_tp.extend_from_slice(&["--layout", "tp=2,ep=8,pp=16"]);
    let out = skymoe(&with_tp);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn bad_input_is_explained() {
    let run = |args: &[&str], needle: &str| {
        let out = skymoe(args);
        assert_clean_failure(&out, needle);
    };
    let base = |model: &'static str, cluster: &'static str, nodes: &'static str| {
        vec![
            "plan",
            "--model",
            model,
            "--cluster",
            cluster,
            "--nodes",
            nodes,
            "--global-batch-tokens",
            "4194304",
            "--seq-len",
            "4096",
        ]
    };
    run(&base("no-such-model", "a800-80g", "4"), "skywork-moe-146b");
    run(
        &base("skywork-moe-146b", "no-such-cluster", "4"),
        "a800-80g",
    );
    run(
        &base("skywork-moe-146b", "a800-80g", "0"),
        "nodes must be at least 1",
    );
    // A model that fits nowhere: 146B parameters on one 8x4090 server.
    run(&base("skywork-moe-146b", "rtx4090-24g", "1"), "short by");
    let mut a = base("skywork-moe-146b", "a800-80g", "192");
    a.extend(["--layout", "tp=8,pp=12"]);
    run(&a, "36 attention heads");
    let mut a = base("skywork-moe-146b", "a800-80g", "192");
    a.extend(["--layout", "tp=4,pp=12,dp=16"]);
    run(&a, "768 ranks, but there are 1536");
    let mut a = base("skywork-moe-146b", "a800-80g", "192");
    a.extend(["--layout", "edp=4,pp=12", "--pp-layers", "4,4,4"]);
    run(&a, "3 stage sizes given for pp=12");
    let mut a = base("mixtral-8x7b", "h100-80g", "4");
    a[8] = "5000";
    run(&a, "not a whole number of 4096-token sequences");
    run(
        &[
            "plan",
            "--model",
            "mixtral-8x7b",
            "--cluster",
            "h100-80g",
            "--nodes",
            "1",
            "--global-batch-tokens",
            "1048576",
            "--seq-len",
            "4096",
            "--mem-gib=-3",
        ],
        "mem_gib must be a positive number",
    );
    // Cluster files: garbage, and impossible numbers.
    let tmp = tempfile::tempdir().unwrap();
    let garbage = tmp.path().join("c.json");
    std::fs::write(&garbage, "{ not json").unwrap();
    let g = garbage.to_str().unwrap();
    run(
        &[
            "plan",
            "--model",
            "mixtral-8x7b",
            "--cluster",
            g,
            "--global-batch-tokens",
            "1048576",
            "--seq-len",
            "4096",
        ],
        "not a cluster file",
    );
    let out = skymoe(&[
        "plan",
        "--model",
        "mixtral-8x7b",
        "--cluster",
        "h100-80g",
        "--global-batch-tokens",
        "1048576",
        "--seq-len",
        "4096",
        "--json",
    ]);
    // Mixtral-8x7B's 47B parameters need 18 bytes each for mixed-precision AdamW: one
    // 8-GPU node cannot hold them in any layout; the closest one is named.
    assert_clean_failure(&out, "no layout fits");
    assert!(String::from_utf8_lossy(&out.stderr).contains("the closest, --parallel "));
}

/// Calibrate on this machine, plan a small model with the result, and hand the chosen layout
/// to `skymoe train`, which accepts it; a layout needing more processes is refused clearly.
#[test]
fn calibrated_plan_for_this_machine_is_accepted_by_train() {
    let tmp = tempfile::tempdir().unwrap();
    let cluster = tmp.path().join("cpu.json");
    let out = skymoe(&[
        "plan",
        "--calibrate",
        "--quick",
        "--out",
        cluster.to_str().unwrap(),
        "--json",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    let points = report["points"].as_array().unwrap();
    assert!(points
        .iter()
        .all(|p| p["measured_s"].as_f64().unwrap() > 0.0));
    assert!(points.iter().any(|p| p["held_out"] == true));
    let fitted: Value = serde_json::from_str(&std::fs::read_to_string(&cluster).unwrap()).unwrap();
    assert!(fitted["fp32_tflops"].as_f64().unwrap() > 0.0);
    assert!(fitted["mem_gbps"].as_f64().unwrap() > 0.0);

    let model = fixtures().join("skywork_moe");
    let out = skymoe(&[
        "plan",
        "--model",
        model.to_str().unwrap(),
        "--cluster",
        cluster.to_str().unwrap(),
        "--global-batch-tokens",
        "128",
        "--seq-len",
        "32",
        "--micro-batch",
        "4",
        "--precision",
        "fp32",
        "--json",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let plans: Value = serde_json::from_slice(&out.stdout).unwrap();
    let best = &plans[0];
    assert_eq!(best["feasible"], true);
    assert!(best["step_time_s"].as_f64().unwrap() > 0.0);
    let args_text = best["args"].as_str().unwrap().to_string();
    assert_eq!(args_text, "--parallel tp=1,pp=1,dp=1,zero=0");

    let run_file = tmp.path().join("run.toml");
    std::fs::write(
        &run_file,
        format!(
            "[model]\narch = \"skywork_moe\"\nhidden_size = 32\nintermediate_size = 64\nlayers = 2\nheads = 4\nkv_heads = 2\nexperts = 4\nmax_position_embeddings = 64\n\n[data]\ninputs = [\"{}\"]\nvocab_size = 300\nseq_len = 32\n\n[train]\nbatch_size = 4\neval_every = 0\ncheckpoint_every = 0\n",
            corpus().display()
        ),
    )
    .unwrap();
    let out_dir = tmp.path().join("run");
    let mut args = vec![
        "train",
        "--config",
        run_file.to_str().unwrap(),
        "--quiet",
        "--steps",
        "1",
        "--out",
        out_dir.to_str().unwrap(),
    ];
    args.extend(args_text.split_whitespace());
    let out = skymoe(&args);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let bad = |extra: &[&str], needle: &str| {
        let mut a = vec![
            "train",
            "--config",
            run_file.to_str().unwrap(),
            "--quiet",
            "--steps",
            "1",
            "--out",
            out_dir.to_str().unwrap(),
        ];
        a.extend_from_slice(extra);
        assert_clean_failure(&skymoe(&a), needle);
    };
    bad(&["--parallel", "edp=2,pp=2"], "needs 4 processes");
    bad(
        &["--parallel", "tp=1,pp=1", "--pp-layers", "3"],
        "add up to 3 layers; the model has 2",
    );
    bad(
        &["--parallel", "tp=1,pp=1", "--recompute-layers", "3"],
        "3 recomputed layers for a stage of 2 layers",
    );
    bad(&["--parallel", "tp=1,foo=2"], "unknown key");
}
