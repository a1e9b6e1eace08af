//! `skymoe logits`: run a token sequence and write its logits (for external verification).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::Context;
use skymoe_kernels::quant::WeightFormat;
use skymoe_serve::kv_cache::KvDtype;
use skymoe_serve::model::{LogitsFor, SeqChunk, ServeModel, TensorParallel};

/// Arguments of `skymoe logits`.
#[derive(clap::Args)]
pub struct Args {
    /// A Hugging Face model directory, a .gguf file, or a hub id (org/name[@revision]) found
    /// in the local Hugging Face cache.
    #[arg(long, value_parser = super::model_arg)]
    model: PathBuf,
    /// Comma-separated token ids, e.g. 1,2,3.
    #[arg(long)]
    tokens: String,
    /// Output safetensors file; gets an f32 tensor `logits` of shape [n_tokens, vocab].
    #[arg(long)]
    out: PathBuf,
    /// Run the serving model with its projections in this format (f32, f16, int8, fp8, q4,
    /// or `stored`); under `mpirun` it is split over the processes (tensor parallelism).
    #[arg(long)]
    weights: Option<String>,
    /// Relative share of each process under tensor parallelism, e.g. 2,1,1 (default: equal).
    #[arg(long)]
    tp_weights: Option<String>,
    /// With `--weights`: the element type of the KV cache, auto (as `skymoe serve` chooses),
    /// f32, f16 or int8.
    #[arg(long, default_value = "auto")]
    kv_cache_dtype: String,
}

/// Logits `[n_tokens · vocab]` of the serving model with projections in `format` and a KV
/// cache of `kv_dtype` (the engine's choice where `None`), split over `tp` when given.
fn served_logits(
    model: &Path,
    tokens: &[u32],
    format: Option<WeightFormat>,
    kv_dtype: Option<KvDtype>,
    tp: Option<TensorParallel>,
) -> anyhow::Result<Vec<f32>> {
    let ckpt = skymoe_model::Checkpoint::open(model, &candle_core::Device::Cpu)
        .with_context(|| format!("cannot open model {}", model.display()))?;
    let model = ServeModel::load_sharded(&ckpt, format, tp)?;
    let mut kv = model.new_kv_cache(16, tokens.len().div_ceil(16), kv_dtype);
    let blocks = kv.allocate(kv.blocks_for(tokens.len())).unwrap_or_default();
    let chunk = SeqChunk {
        tokens,
        start: 0,
        blocks: &blocks,
        logits: LogitsFor::All,
    };
    Ok(model.forward(&[chunk], &mut kv)?.remove(0))
}

/// `--weights`: the serving model, one process or tensor-parallel over an `mpirun` job
/// (rank 0 writes the file).
fn run_served(
    a: &Args,
    tokens: Vec<u32>,
    weights: &str,
    kv_dtype: Option<KvDtype>,
) -> anyhow::Result<()> {
    let format = match weights {
        "stored" => None,
        other => Some(other.parse::<WeightFormat>()?),
    };
    let tp_weights = super::tp::parse_weights(a.tp_weights.as_deref())?;
    let procs = super::launch::Processes::detect()?;
    let logits = if procs.world == 1 {
        if tp_weights.is_some() {
            anyhow::bail!("--tp-weights needs several processes (mpirun -np N)");
        }
        served_logits(&a.model, &tokens, format, kv_dtype, None)
    } else {
        let comm = procs.world_comm(std::time::Duration::from_secs(600));
        let model = a.model.clone();
        let toks = tokens.clone();
        super::tp::with_comm_thread(comm.as_ref(), move |c| {
            let tp = TensorParallel::new(c, tp_weights)?;
            served_logits(&model, &toks, format, kv_dtype, Some(tp))
        })
        .and_then(|r| r)
    };
    let logits = match logits {
        Ok(l) => l,
        Err(e) if procs.world > 1 => procs.fail(&e),
        Err(e) => return Err(e),
    };
    if procs.rank == 0 {
        let vocab = logits.len() / tokens.len();
        let t = candle_core::Tensor::from_vec(
            logits,
            (tokens.len(), vocab),
            &candle_core::Device::Cpu,
        )?;
        write_logits(t, &a.out)?;
        eprintln!(
            "wrote logits [{}, {vocab}] to {}",
            tokens.len(),
            a.out.display()
        );
    }
    Ok(())
}

/// Write `logits` to a temporary file beside `out` and rename it, so a crash leaves no half
/// file.
fn write_logits(logits: candle_core::Tensor, out: &Path) -> anyhow::Result<()> {
    let map: HashMap<String, candle_core::Tensor> = [("logits".to_string(), logits)].into();
    let tmp = out.with_extension("safetensors.tmp");
    candle_core::safetensors::save(&map, &tmp)
        .with_context(|| format!("cannot write {}", tmp.display()))?;
    std::fs::rename(&tmp, out).with_context(|| format!("cannot write {}", out.display()))?;
    Ok(())
}

/// Run the verb.
pub fn run(a: Args) -> anyhow::Result<()> {
    let tokens = super::parse_tokens(&a.tokens)?;
    let kv_dtype = super::bench::parse_kv_dtype(&a.kv_cache_dtype)?;
    if let Some(w) = a.weights.clone() {
        return run_served(&a, tokens, &w, kv_dtype);
    }
    if a.tp_weights.is_some() {
        anyhow::bail!("--tp-weights applies to the serving model: add --weights");
    }
    if kv_dtype.is_some() {
        anyhow::bail!("--kv-cache-dtype needs --weights (the serving engine's model)");
    }
    let device = super::device()?;
    let (_, model) = super::load_model(&a.model, &device)?;
    let logits = model
        .forward_tokens(&tokens, None)
        .context("forward pass failed")?;
    let logits = logits
        .to_dtype(candle_core::DType::F32)?
        .to_device(&candle_core::Device::Cpu)?;
    write_logits(logits, &a.out)?;
    eprintln!(
        "wrote logits [{}, {}] to {}",
        tokens.len(),
        model.config.vocab_size,
        a.out.display()
    );
    Ok(())
}
