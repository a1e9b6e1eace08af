//! `skymoe quantize`: write a copy of a model with its linear projections in fp8, int8, q4
//! or f16.

use std::path::PathBuf;

use anyhow::Context;
use skymoe_kernels::quant::WeightFormat;
use skymoe_serve::quantize::{quantize_checkpoint, Fp8Scale};

/// Arguments of `skymoe quantize`.
#[derive(clap::Args)]
pub struct Args {
    /// A Hugging Face model directory, a .gguf file, or a hub id (org/name[@revision]) found
    /// in the local Hugging Face cache.
    #[arg(long, value_parser = super::model_arg)]
    model: PathBuf,
    /// Target format: fp8 (E4M3), int8, q4 or f16.
    #[arg(long)]
    to: String,
    /// FP8 scales: one per output channel (`channel`) or one per matrix (`tensor`, vLLM's
    /// per-tensor layout).
    #[arg(long, default_value = "channel")]
    fp8_scale: String,
    /// Output directory (replaced atomically if it exists).
    #[arg(long)]
    out: PathBuf,
}

/// Run the verb.
pub fn run(a: Args) -> anyhow::Result<()> {
    let format: WeightFormat = a.to.parse()?;
    if format == WeightFormat::F32 {
        anyhow::bail!("--to f32 would not quantise anything (fp8, int8, q4 or f16)");
    }
    let scale = match a.fp8_scale.as_str() {
        "channel" => Fp8Scale::Channel,
        "tensor" => Fp8Scale::Tensor,
        other => anyhow::bail!("unknown --fp8-scale `{other}` (channel | tensor)"),
    };
    if a.out.exists() && a.out.canonicalize().ok() == a.model.canonicalize().ok() {
        anyhow::bail!("--out must differ from --model");
    }
    let s = quantize_checkpoint(&a.model, &a.out, format, scale)
        .with_context(|| format!("cannot quantise {}", a.model.display()))?;
    eprintln!(
        "wrote {} ({} matrices in {format}, {} tensors kept; {:.1} MiB -> {:.1} MiB)",
        s.out.display(),
        s.quantized,
        s.kept,
        s.bytes_before as f64 / (1 << 20) as f64,
        s.bytes_after as f64 / (1 << 20) as f64
    );
    Ok(())
}
