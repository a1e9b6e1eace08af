//! `skymoe bench`: serving throughput of a model (prefill, batch-1 decode, total tokens/s at
//! several concurrent requests) and peak memory, as JSON; with `--scenario lm-eval|chat`, the
//! prompt tokens computed and the wall time of a workload through the engine with prefix
//! caching off and on.

use std::path::PathBuf;

use anyhow::Context;
use skymoe_serve::bench::{run as run_bench, run_prefix, BenchConfig, PrefixBenchConfig};
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
    /// Element type of the KV cache: auto (as `skymoe serve` chooses), f32, f16 or int8.
    #[arg(long, default_value = "auto")]
    kv_cache_dtype: String,
    /// MiB read by the streaming pass that measures the memory's read bandwidth (reported
    /// with batch-1 decode's share of it); well above the caches. 0 skips the measurement.
    #[arg(long, default_value_t = 1024)]
    bandwidth_mib: usize,
    /// Measure prefix caching on a workload through the engine instead of raw throughput:
    /// `lm-eval` (contexts each followed by several continuations, all submitted at once) or
    /// `chat` (conversations whose every turn extends the previous prompt and reply).
    #[arg(long)]
    scenario: Option<skymoe_serve::bench::PrefixScenario>,
    /// Scenario: contexts (lm-eval) or conversations (chat).
    #[arg(long, default_value_t = 8)]
    items: usize,
    /// Scenario: tokens of each context (lm-eval) or first prompt (chat).
    #[arg(long, default_value_t = 400)]
    context_tokens: usize,
    /// Scenario: continuations per context (lm-eval) or turns per conversation (chat).
    #[arg(long, default_value_t = 4)]
    branches: usize,
    /// Scenario: tokens of each continuation (lm-eval) or later user message (chat).
    #[arg(long, default_value_t = 16)]
    branch_tokens: usize,
    /// Scenario: most requests running at once (the engine's batch).
    #[arg(long, default_value_t = skymoe_serve::engine::EngineConfig::default().max_batch)]
    max_concurrency: usize,
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
    anyhow::ensure!(
        a.bandwidth_mib <= 1 << 16,
        "--bandwidth-mib must be at most 65536 (64 GiB); 1024 is plenty to exceed the caches"
    );
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
    if let Some(scenario) = a.scenario {
        let cfg = PrefixBenchConfig {
            scenario,
            items: a.items,
            context_tokens: a.context_tokens,
            branches: a.branches,
            branch_tokens: a.branch_tokens,
            gen_tokens: a.gen_tokens,
            repeats: a.repeats,
            step_tokens: a.step_tokens,
            max_batch: a.max_concurrency,
            kv_dtype,
        };
        let tokenizer = || -> skymoe_serve::error::Result<skymoe_model::Tokenizer> {
            Ok(skymoe_model::Tokenizer::for_model(
                &ckpt.path,
                ckpt.gguf_metadata.as_ref(),
            )?)
        };
        let [off, on] = run_prefix(&model, &tokenizer, &cfg)?;
        let report = serde_json::json!({
            "engine": "skymoe",
            "scenario": scenario,
            "weights": model.format.name(),
            "weight_formats": model.weight_formats(),
            "kernels": skymoe_kernels::quant::Isa::detect().name(),
            "cores": std::thread::available_parallelism().map_or(1, |n| n.get()),
            "items": cfg.items,
            "context_tokens": cfg.context_tokens,
            "branches": cfg.branches,
            "branch_tokens": cfg.branch_tokens,
            "gen_tokens": cfg.gen_tokens,
            "step_tokens": cfg.step_tokens,
            "kv_dtype": model.kv_dtype(cfg.kv_dtype).name(),
            "caching_off": off,
            "caching_on": on,
            "prefill_saved": 1.0 - on.computed_prompt_tokens as f64 / off.computed_prompt_tokens.max(1) as f64,
            "speedup": off.wall_s / on.wall_s.max(1e-9),
        });
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
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
    // Batch-1 decode streams its weights once per token: its share of the read bandwidth.
    let decode_bytes = model.decode_bytes_per_token();
    // Before the bandwidth pass, whose buffer would count in the peak.
    let peak_rss = peak_rss_mib();
    let bandwidth =
        (a.bandwidth_mib > 0).then(|| skymoe_serve::bench::read_bandwidth_gbs(a.bandwidth_mib, 5));
    let decode_gbs = runs
        .iter()
        .find(|r| r.requests == 1)
        .map(|r| r.decode_tokens_per_s * decode_bytes as f64 / 1e9);
    let fraction = decode_gbs.zip(bandwidth).map(|(g, b)| g / b);
    let report = serde_json::json!({
        "engine": "skymoe",
        "weights": model.format.name(),
        "weight_formats": model.weight_formats(),
        "kernels": skymoe_kernels::quant::Isa::detect().name(),
        "cores": std::thread::available_parallelism().map_or(1, |n| n.get()),
        "weight_mib": model.weight_bytes() as f64 / (1 << 20) as f64,
        "prompt_tokens": cfg.prompt_tokens,
        "gen_tokens": cfg.gen_tokens,
        "step_tokens": cfg.step_tokens,
        "kv_dtype": model.kv_dtype(cfg.kv_dtype).name(),
        "runs": runs,
        "decode_weight_bytes_per_token": decode_bytes,
        "read_bandwidth_gbs": bandwidth,
        "decode_weight_gbs": decode_gbs,
        "decode_bandwidth_fraction": fraction,
        "peak_rss_mib": peak_rss,
    });
    println!("{}", serde_json::to_string_pretty(&report)?);
    Ok(())
}
