//! `skymoe logits`: run a token sequence and write its logits (for external verification).

use std::collections::HashMap;
use std::path::PathBuf;

use anyhow::Context;

/// Arguments of `skymoe logits`.
#[derive(clap::Args)]
pub struct Args {
    /// A Hugging Face model directory or a .gguf file.
    #[arg(long)]
    model: PathBuf,
    /// Comma-separated token ids, e.g. 1,2,3.
    #[arg(long)]
    tokens: String,
    /// Output safetensors file; gets an f32 tensor `logits` of shape [n_tokens, vocab].
    #[arg(long)]
    out: PathBuf,
}

/// Run the verb.
pub fn run(a: Args) -> anyhow::Result<()> {
    let tokens = super::parse_tokens(&a.tokens)?;
    let device = super::device()?;
    let (_, model) = super::load_model(&a.model, &device)?;
    let logits = model
        .forward_tokens(&tokens, None)
        .context("forward pass failed")?;
    let logits = logits
        .to_dtype(candle_core::DType::F32)?
        .to_device(&candle_core::Device::Cpu)?;
    let map: HashMap<String, candle_core::Tensor> = [("logits".to_string(), logits)].into();
    // Write to a temporary file beside the target and rename it, so a crash leaves no half file.
    let tmp = a.out.with_extension("safetensors.tmp");
    candle_core::safetensors::save(&map, &tmp)
        .with_context(|| format!("cannot write {}", tmp.display()))?;
    std::fs::rename(&tmp, &a.out).with_context(|| format!("cannot write {}", a.out.display()))?;
    eprintln!(
        "wrote logits [{}, {}] to {}",
        tokens.len(),
        model.config.vocab_size,
        a.out.display()
    );
    Ok(())
}
