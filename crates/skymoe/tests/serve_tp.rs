//! Tensor-parallel serving under `mpirun -np 3` (feature `mpi`) on models whose 4 heads do
//! not divide by 3 (shares 2,1,1, or 1,2,1 by rank weights): logits equal one process's and
//! transformers', the HTTP server answers as one process does, SIGTERM to rank 0 drains and
//! ends every rank, and a bad split is a clear error on every rank.
#![cfg(feature = "mpi")]

mod common;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{fixtures, skymoe, token_list, Mpirun};

fn read_logits(path: &Path) -> Vec<f32> {
    let t = candle_core::safetensors::load(path, &candle_core::Device::Cpu).unwrap();
    t["logits"].flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

fn max_rel(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    let scale = b.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-6);
    a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs())) / scale
}

#[test]
fn logits_over_three_uneven_ranks_equal_one_process_and_transformers() {
    let dir = tempfile::tempdir().unwrap();
    for fam in ["qwen2_moe", "skywork_moe_variant", "llama"] {
        let model = fixtures().join(fam);
        let reference = candle_core::safetensors::load(
            model.join("reference.safetensors"),
            &candle_core::Device::Cpu,
        )
        .unwrap();
        let tokens = token_list(&reference["tokens"]);
        let hf = reference["logits"]
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let one = dir.path().join(format!("{fam}-one.safetensors"));
        let out = skymoe(&[
            "logits",
            "--model",
            model.to_str().unwrap(),
            "--tokens",
            &tokens,
            "--out",
            one.to_str().unwrap(),
            "--weights",
            "f32",
        ]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let alone = read_logits(&one);
        assert!(max_rel(&alone, &hf) < 1e-4);
        for weights in [None, Some("1,2,1")] {
            let three = dir.path().join(format!("{fam}-three.safetensors"));
            let mut cmd = Mpirun::new(3);
            cmd.args([
                "logits",
                "--model",
                model.to_str().unwrap(),
                "--tokens",
                &tokens,
                "--out",
                three.to_str().unwrap(),
                "--weights",
                "f32",
            ]);
            if let Some(w) = weights {
                cmd.args(["--tp-weights", w]);
            }
            let out = cmd.output().unwrap();
            assert!(
                out.status.success(),
                "{fam} {weights:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            let got = read_logits(&three);
            let e = max_rel(&got, &alone);
            assert!(e < 1e-5, "{fam} {weights:?}: {e} from one process");
            assert!(
                max_rel(&got, &hf) < 1e-4,
                "{fam} {weights:?}: far from transformers"
            );
        }
    }
}

#[test]
fn bad_splits_end_every_rank_with_a_message() {
    let model = fixtures().join("mixtral");
    let run = |np: usize, weights: &str| {
        let out = Mpirun::new(np)
            .args([
                "logits",
                "--model",
                model.to_str().unwrap(),
                "--tokens",
                "1,2",
                "--out",
                "/nonexistent/x",
                "--weights",
                "f32",
                "--tp-weights",
                weights,
            ])
            .output()
            .unwrap();
        assert!(!out.status.success());
        String::from_utf8_lossy(&out.stderr).to_string()
    };
    assert!(run(3, "1,1").contains("2 rank weights given for 3 ranks"));
    assert!(run(3, "1,-1,1").contains("positive"));
    let out = Mpirun::new(5)
        .args([
            "logits",
            "--model",
            model.to_str().unwrap(),
            "--tokens",
            "1,2",
            "--out",
            "/tmp/never",
            "--weights",
            "f32",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot split 4"));
}

#[test]
fn serving_over_three_ranks_answers_like_one_process_and_drains() {
    let model = fixtures().join("mixtral");
    let req = r#"{"model": "mixtral", "prompt": [3, 17, 42, 99], "max_tokens": 10,
                  "temperature": 0, "ignore_eos": true}"#;
    let start = |cmd: &mut Command| {
        let mut child = cmd
            .args([
                "serve",
                "--model",
                model.to_str().unwrap(),
                "--port",
                "0",
                "--weights",
                "f32",
            ])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let addr = line
            .trim()
            .rsplit("http://")
            .next()
            .unwrap_or_default()
            .to_string();
        assert!(addr.starts_with("127.0.0.1:"), "{line:?}");
        (child, addr)
    };
    let completion = |addr: &str| {
        let (status, body) = common::http(addr, "POST", "/v1/completions", Some(req));
        assert_eq!(status, 200, "{body}");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        v["choices"][0]["text"].as_str().unwrap().to_string()
    };
    let (mut one, addr) = start(&mut Command::new(env!("CARGO_BIN_EXE_skymoe")));
    let want = completion(&addr);
    let _ = one.kill();
    let _ = one.wait();

    // The session directory lives until the job has ended.
    let mut mpirun = Mpirun::new(3);
    let (mut job, addr) = start(&mut mpirun);
    assert_eq!(completion(&addr), want);
    assert_eq!(completion(&addr), want, "a second request after the first");
    // SIGTERM to rank 0: it drains, releases the other ranks, and the job ends cleanly.
    let rank0 = find_rank0().expect("rank 0's process");
    assert!(Command::new("kill")
        .args(["-TERM", &rank0.to_string()])
        .status()
        .unwrap()
        .success());
    let t0 = Instant::now();
    let status = loop {
        if let Some(s) = job.try_wait().unwrap() {
            break s;
        }
        if t0.elapsed() > Duration::from_secs(30) {
            let _ = job.kill();
            panic!("the job did not end after SIGTERM to rank 0");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "{status:?}");
}

/// The pid of the `skymoe serve` process with MPI rank 0 (started by this test's mpirun).
fn find_rank0() -> Option<u32> {
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        if !String::from_utf8_lossy(&cmdline).contains("serve") {
            continue;
        }
        let env = std::fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
        if env
            .split(|&b| b == 0)
            .any(|kv| kv == b"OMPI_COMM_WORLD_RANK=0")
        {
            return Some(pid);
        }
    }
    None
}
