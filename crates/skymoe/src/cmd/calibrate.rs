//! `skymoe plan --calibrate`: time the real training step on this machine for a few small
//! MoE shapes and fit the cost model's two compute constants (matrix-product FLOP/s and
//! element-wise bytes/s) to them, then check the fit on a shape it has not seen.

use std::path::Path;
use std::time::Instant;

use anyhow::Context;
use candle_core::Device;
use rand::{Rng, SeedableRng};
use skymoe_model::ModelConfig;
use skymoe_plan::cost::{CostModel, StepWork};
use skymoe_plan::{Cluster, Job, Layout, ModelShape, Optimizer, Precision};
use skymoe_train::params::TrainableParams;
use skymoe_train::run_config::RunConfig;
use skymoe_train::trainer::Trainer;

/// One timed shape.
#[derive(Debug, Clone, Copy)]
struct Shape {
    hidden: usize,
    ffn: usize,
    layers: usize,
    experts: usize,
    seq: usize,
    batch: usize,
}

/// One measurement.
struct Point {
    shape: Shape,
    work: StepWork,
    seconds: f64,
}

const VOCAB: usize = 2048;

fn run_config(s: &Shape) -> RunConfig {
    let mut c = RunConfig::default();
    c.model.hidden_size = s.hidden;
    c.model.intermediate_size = s.ffn;
    c.model.layers = s.layers;
    c.model.heads = (s.hidden / 32).max(1);
    c.model.kv_heads = (s.hidden / 64).max(1);
    c.model.experts = s.experts;
    c.model.max_position_embeddings = s.seq.max(64);
    c.data.seq_len = s.seq;
    c.data.vocab_size = VOCAB;
    c.train.batch_size = s.batch;
    c
}

fn job_for(s: &Shape, c: &RunConfig) -> Job {
    Job {
        micro_batch: s.batch,
        precision: Precision::Fp32,
        optimizer: Optimizer::Adamw,
        capacity_factor: c.router.capacity_factor,
        ..Job::new((s.batch * s.seq) as u64, s.seq)
    }
}

fn placeholder_cluster() -> Cluster {
    Cluster {
        name: "this machine".into(),
        gpus_per_node: 1,
        nodes: 1,
        mem_gib: memory_gib().unwrap_or(16.0),
        reserved_gib: 1.0,
        tflops: 1.0,
        fp32_tflops: 1.0,
        matmul_efficiency: 1.0,
        mem_gbps: 10.0,
        intra_gbps: 10.0,
        inter_gbps: 1.0,
        intra_latency_us: 1.0,
        inter_latency_us: 10.0,
        layer_overhead_us: 0.0,
    }
}

/// The cost model's work for one training step of `s`.
fn work_of(config: &ModelConfig, s: &Shape, c: &RunConfig) -> StepWork {
    let shape = ModelShape::from_config(config, "calibration");
    let cluster = placeholder_cluster();
    let job = job_for(s, c);
    let cost = CostModel {
        model: &shape,
        cluster: &cluster,
        job: &job,
        layout: Layout {
            tp: 1,
            ep: 1,
            etp: 1,
            pp: 1,
            dp: 1,
            zero: 0,
        },
    };
    cost.single_device_step(1)
}

/// Median seconds of a training step of `s` over `reps` steps after three warm-up steps.
fn measure(s: &Shape, reps: usize) -> anyhow::Result<Point> {
    let c = run_config(s);
    let config = c.fresh_model_config(VOCAB, None, None)?;
    let params = TrainableParams::random(&config, c.model.init_std, 0, &Device::Cpu)?;
    let work = work_of(&config, s, &c);
    let mut trainer = Trainer::in_memory(c, config, params)?;
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let batch: Vec<Vec<u32>> = (0..s.batch)
        .map(|_| {
            (0..=s.seq)
                .map(|_| rng.random_range(0..VOCAB as u32))
                .collect()
        })
        .collect();
    let micro = vec![batch];
    let mut times = Vec::with_capacity(reps);
    const WARM_UP: usize = 3;
    for i in 0..reps + WARM_UP {
        let t0 = Instant::now();
        trainer.step_on_batches(&micro, t0, &None)?;
        if i >= WARM_UP {
            times.push(t0.elapsed().as_secs_f64());
        }
    }
    times.sort_by(f64::total_cmp);
    Ok(Point {
        shape: *s,
        work,
        seconds: times[times.len() / 2],
    })
}

/// FLOP/s of a large f32 matrix product on this machine, through the same library the
/// trainer uses (median of five 1024×1024×1024 products after a warm-up).
fn matmul_flops_per_s() -> anyhow::Result<f64> {
    let n = 1024;
    let a = candle_core::Tensor::randn(0f32, 1.0, (n, n), &Device::Cpu)?;
    let b = candle_core::Tensor::randn(0f32, 1.0, (n, n), &Device::Cpu)?;
    let mut times = Vec::new();
    for i in 0..6 {
        let t0 = Instant::now();
        let c = a.matmul(&b)?;
        c.sum_all()?.to_scalar::<f32>()?;
        if i > 0 {
            times.push(t0.elapsed().as_secs_f64());
        }
    }
    times.sort_by(f64::total_cmp);
    Ok(2.0 * (n * n * n) as f64 / times[times.len() / 2])
}

/// With matrix products at `flops_per_s`, fit seconds per byte of element-wise traffic `b`
/// and seconds per layer pass `c` (both ≥ 0) minimising the squared relative error of
/// `seconds ≈ flops/flops_per_s + bytes·b + layer_passes·c`.
fn fit_rest(points: &[Point], flops_per_s: f64) -> (f64, f64) {
    // Rows scaled by 1/seconds: x = bytes/s, y = passes/s, target = 1 − flops/(F·s).
    let rows: Vec<(f64, f64, f64)> = points
        .iter()
        .map(|p| {
            (
                p.work.bytes / p.seconds,
                p.work.layer_passes / p.seconds,
                1.0 - p.work.flops / flops_per_s / p.seconds,
            )
        })
        .collect();
    let (mut sxx, mut sxy, mut syy, mut sxt, mut syt) = (0.0, 0.0, 0.0, 0.0, 0.0);
    for &(x, y, t) in &rows {
        sxx += x * x;
        sxy += x * y;
        syy += y * y;
        sxt += x * t;
        syt += y * t;
    }
    let det = sxx * syy - sxy * sxy;
    if det > 0.0 {
        let b = (sxt * syy - syt * sxy) / det;
        let c = (syt * sxx - sxt * sxy) / det;
        if b > 0.0 && c >= 0.0 {
            return (b, c);
        }
    }
    // The overhead term alone would be negative or degenerate: bytes only.
    ((sxt / sxx).max(1e-15), 0.0)
}

fn memory_gib() -> Option<f64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kib: f64 = text
        .lines()
        .find(|l| l.starts_with("MemTotal:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()?;
    Some(kib / 1024.0 / 1024.0)
}

fn cpu_name() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|s| s.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into())
}

fn describe(s: &Shape) -> String {
    format!(
        "hidden {} ffn {} layers {} experts {} seq {} batch {}",
        s.hidden, s.ffn, s.layers, s.experts, s.seq, s.batch
    )
}

/// Run the calibration; write the fitted machine to `out` when given.
pub fn run(out: Option<&Path>, quick: bool, json: bool) -> anyhow::Result<()> {
    let shape = |hidden, ffn, layers, experts, seq, batch| Shape {
        hidden,
        ffn,
        layers,
        experts,
        seq,
        batch,
    };
    let (fit_shapes, check, reps) = if quick {
        (
            vec![
                shape(64, 128, 1, 4, 64, 2),
                shape(128, 256, 2, 4, 64, 2),
                shape(64, 128, 2, 8, 128, 2),
            ],
            shape(96, 192, 2, 4, 96, 2),
            3,
        )
    } else {
        (
            vec![
                shape(128, 256, 1, 4, 128, 4),
                shape(128, 256, 2, 8, 128, 4),
                shape(256, 512, 1, 8, 128, 4),
                shape(256, 512, 2, 4, 256, 4),
                shape(384, 768, 1, 8, 128, 4),
                shape(192, 384, 3, 8, 64, 8),
                shape(512, 1536, 1, 4, 128, 4),
                shape(768, 2048, 1, 4, 64, 4),
            ],
            // The default run's shape (docs/run.toml), not in the fit.
            shape(128, 256, 4, 8, 128, 8),
            7,
        )
    };
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    if !json {
        eprintln!(
            "timing {} shapes on {} ({threads} threads)…",
            fit_shapes.len() + 1,
            cpu_name()
        );
    }
    let mut points = Vec::new();
    for s in &fit_shapes {
        points.push(measure(s, reps).with_context(|| format!("timing {}", describe(s)))?);
    }
    let held_out = measure(&check, reps).with_context(|| format!("timing {}", describe(&check)))?;
    let flops_per_s = matmul_flops_per_s()?;
    let (b, c) = fit_rest(&points, flops_per_s);
    let predict = |w: &StepWork| w.flops / flops_per_s + b * w.bytes + c * w.layer_passes;
    let bytes_per_s = 1.0 / b;
    let mut cluster = placeholder_cluster();
    cluster.name = format!("{} ({threads} threads, calibrated)", cpu_name());
    cluster.fp32_tflops = flops_per_s / 1e12;
    cluster.tflops = cluster.fp32_tflops;
    cluster.mem_gbps = bytes_per_s / 1e9;
    cluster.layer_overhead_us = c * 1e6;
    let err = |p: &Point| predict(&p.work) / p.seconds - 1.0;
    if json {
        let pts: Vec<serde_json::Value> = points
            .iter()
            .chain(std::iter::once(&held_out))
            .enumerate()
            .map(|(i, p)| {
                serde_json::json!({
                    "shape": describe(&p.shape),
                    "held_out": i == points.len(),
                    "measured_s": p.seconds,
                    "predicted_s": predict(&p.work),
                    "error": err(p),
                })
            })
            .collect();
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "cluster": cluster,
                "points": pts,
            }))?
        );
    } else {
        println!(
            "measured {:.1} GFLOP/s in a large matrix product; fitted {:.2} GB/s of element-wise traffic and {:.0} µs per layer pass\n",
            flops_per_s / 1e9,
            bytes_per_s / 1e9,
            c * 1e6
        );
        println!(
            "{:<55} {:>12} {:>12} {:>8}",
            "shape", "measured ms", "model ms", "error"
        );
        for (i, p) in points.iter().chain(std::iter::once(&held_out)).enumerate() {
            let tag = if i == points.len() { " (held out)" } else { "" };
            println!(
                "{:<55} {:>12.1} {:>12.1} {:>7.1}%{tag}",
                describe(&p.shape),
                1e3 * p.seconds,
                1e3 * predict(&p.work),
                100.0 * err(p)
            );
        }
    }
    if let Some(path) = out {
        let text = serde_json::to_string_pretty(&cluster)?;
        let tmp = path.with_extension("json.tmp");
        std::fs::write(&tmp, text).with_context(|| format!("cannot write {}", tmp.display()))?;
        std::fs::rename(&tmp, path).with_context(|| format!("cannot write {}", path.display()))?;
        if !json {
            println!(
                "\nwrote {} (use it as --cluster {})",
                path.display(),
                path.display()
            );
        }
    }
    Ok(())
}
