//! `skymoe bench`: serving throughput of a model (prefill, batch-1 decode, total tokens/s at
//! several concurrent requests) and peak memory, as JSON.

use std::path::PathBuf;

use anyhow::Context;
use skymoe_serve::bench::{run as run_bench, BenchConfig};
use skymoe_serve::kv_cache::KvDtype;
use skymoe_serve::model::ServeModel;

/// Arguments of `skymoe bench`.
#[derive(clap::Args)]
pub struct Args {
    /// A Hugging Face model directory, a .gguf file, or a hub id (org/name[@revision]) found
    /// in the local Hugging Face cache.
    #[arg(long, value_parser = super::model_arg)]
    model: PathBuf,
    /// Weight format of the projections (f32, f16, int8, fp8, q4; default: as stored).
    #[arg(long)]
    weights: Option<String>,
    /// Prompt length of each synthetic request.
    #[arg(long, default_value_t = 128)]
    prompt_tokens: usize,
    /// Tokens generated per request.
    #[arg(long, default_value_t = 64)]
    gen_tokens: usize,
    /// Concurrent requests to measure total throughput at (comma-separated).
    #[arg(long, default_value = "8,32", value_delimiter = ',')]
    concurrency: Vec<usize>,
    /// Repetitions of each measurement (the median is reported).
    #[arg(long, default_value_t = 3)]
    repeats: usize,
    /// Most prompt tokens in one forward pass (as `skymoe serve` schedules them).
    #[arg(long, default_value_t = skymoe_serve::engine::EngineConfig::default().max_step_tokens)]
    step_tokens: usize,
    /// Element type of the KV cache: auto (as `skymoe serve` chooses), f32 or f16.
    #[arg(long, default_value = "auto")]
    kv_cache_dtype: String,
}

/// `--kv-cache-dtype`: `auto` (the engine's choice for the weights) or a [`KvDtype`].
pub fn parse_kv_dtype(s: &str) -> anyhow::Result<Option<KvDtype>> {
    if s.eq_ignore_ascii_case("auto") {
        return Ok(None);
    }
    s.parse::<KvDtype>()
        .map(Some)
        .map_err(|e| anyhow::anyhow!("invalid --kv-cache-dtype: {e}"))
}

/// Peak resident memory of this process in MiB (Linux), if known.
fn peak_rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

/// Run the verb.
pub fn run(a: Args) -> anyhow::Result<()> {
    anyhow::ensure!(a.step_tokens >= 1, "--step-tokens must be at least 1");
    let kv_dtype = parse_kv_dtype(&a.kv_cache_dtype)?;
    let format = a
        .weights
        .as_deref()
        .map(str::parse::<skymoe_kernels::quant::WeightFormat>)
        .transpose()?;
    let ckpt = skymoe_model::Checkpoint::open(&a.model, &candle_core::Device::Cpu)
        .with_context(|| format!("cannot open model {}", a.model.display()))?;
    let model = ServeModel::load(&ckpt, format)
        .with_context(|| format!("cannot load model {}", a.model.display()))?;
    drop(ckpt);
    let cfg = BenchConfig {
        prompt_tokens: a.prompt_tokens,
        gen_tokens: a.gen_tokens,
        concurrency: a.concurrency,
        repeats: a.repeats,
        step_tokens: a.step_tokens,
        kv_dtype,
    };
    let runs = run_bench(&model, &cfg)?;
    let report = serde_json::json!({
        "engine": "skymoe",
        "weights": model.format.name(),
        "kernels": skymoe_kernels::quant::Isa::detect().name(),
        "cores": std::thread::available_parallelism().map_or(1, |n| n.get()),
        "weight_mib": model.weight_bytes() as f64 / (1 << 20) as f64,
        "prompt_tokens": cfg.prompt_tokens,
        "gen_tokens": cfg.gen_tokens,
        "step_tokens": cfg.step_tokens,
        "kv_dtype": model.kv_dtype(cfg.kv_dtype).name(),
        "runs": runs,
        "peak_rss_mib": peak_rss_mib(),
    });
    println!("{}", serde_json::to_string_pretty(&report)?);
    Ok(())
}
