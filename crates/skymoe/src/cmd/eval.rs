//! `skymoe eval`: perplexity of a model on a corpus.

use std::path::PathBuf;

use anyhow::Context;
use skymoe_model::Tokenizer;
use skymoe_train::data::{PackedDataset, TokenFile};
use skymoe_train::trainer::evaluate_all_windows;

/// Arguments of `skymoe eval`.
#[derive(clap::Args)]
pub struct Args {
    /// A Hugging Face model directory, a .gguf file, or a hub id (org/name[@revision]) found
    /// in the local Hugging Face cache.
    #[arg(long, value_parser = super::model_arg)]
    model: PathBuf,
    /// Text files, directories or JSONL files (repeatable).
    #[arg(long, required = true)]
    data: Vec<PathBuf>,
    /// Tokens per evaluated window.
    #[arg(long, default_value_t = 256)]
    seq_len: usize,
    /// Windows per forward pass.
    #[arg(long, default_value_t = 4)]
    batch_size: usize,
    /// Evaluate at most this many windows (0: all).
    #[arg(long, default_value_t = 0)]
    max_windows: usize,
    /// Run the serving engine's model with its projections in this format (f32, f16,
    /// int8, fp8, q4) instead of the training model; `stored` keeps the checkpoint's format.
    #[arg(long)]
    weights: Option<String>,
    /// With `--weights`: the element type of the KV cache, auto (as `skymoe serve` chooses),
    /// f32, f16 or int8.
    #[arg(long, default_value = "auto")]
    kv_cache_dtype: String,
    /// With `--weights`: run each window token by token, as decoding reads the KV cache
    /// (by default a window runs as one prompt).
    #[arg(long)]
    decode: bool,
}

/// Run the verb.
pub fn run(a: Args) -> anyhow::Result<()> {
    let kv_dtype = super::bench::parse_kv_dtype(&a.kv_cache_dtype)?;
    if kv_dtype.is_some() && a.weights.is_none() {
        anyhow::bail!("--kv-cache-dtype needs --weights (the serving engine's model)");
    }
    if a.decode && a.weights.is_none() {
        anyhow::bail!("--decode needs --weights (the serving engine's model)");
    }
    let device = super::device()?;
    let (ckpt, model) = super::load_model(&a.model, &device)?;
    if a.seq_len > model.config.max_position_embeddings {
        anyhow::bail!(
            "--seq-len {} exceeds the model's maximum of {}",
            a.seq_len,
            model.config.max_position_embeddings
        );
    }
    let tok = Tokenizer::for_model(&ckpt.path, ckpt.gguf_metadata.as_ref())
        .context("cannot load the tokenizer")?;
    let tmp = tempfile::tempdir().context("cannot create a temporary directory")?;
    let path = tmp.path().join("tokens.bin");
    let eos = tok.eos_ids.first().copied();
    TokenFile::build(&a.data, tok.inner(), eos, &path).context("cannot tokenize the data")?;
    let tokens = TokenFile::open(&path)?;
    let n_tokens = tokens.len();
    let data = PackedDataset::new(tokens, a.seq_len, 0.0, 0)
        .context("cannot cut the data into windows")?;
    let (loss, predicted) = match &a.weights {
        None => evaluate_all_windows(&model, &data, a.batch_size, a.max_windows)?,
        Some(w) => {
            let format = match w.as_str() {
                "stored" => None,
                other => Some(other.parse::<skymoe_kernels::quant::WeightFormat>()?),
            };
            drop(model);
            let served = skymoe_serve::model::ServeModel::load(&ckpt, format)
                .with_context(|| format!("cannot load {} for serving", a.model.display()))?;
            let n = match a.max_windows {
                0 => data.num_windows(),
                m => data.num_windows().min(m),
            };
            let windows: Vec<&[u32]> = (0..n).filter_map(|i| data.window(i)).collect();
            let scoring = if a.decode {
                skymoe_serve::eval::Scoring::Decoded
            } else {
                skymoe_serve::eval::Scoring::Prompts
            };
            let (nll, count) = skymoe_serve::eval::windows_nll(
                &served,
                &windows,
                a.batch_size,
                kv_dtype,
                scoring,
            )?;
            if count == 0 {
                anyhow::bail!("no windows to evaluate");
            }
            (nll / count as f64, count)
        }
    };
    println!(
        "{{\"loss\": {loss:.6}, \"perplexity\": {:.4}, \"tokens_predicted\": {predicted}, \"corpus_tokens\": {n_tokens}}}",
        loss.exp()
    );
    Ok(())
}
