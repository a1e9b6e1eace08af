//! `skymoe convert`: write the safetensors form of a PyTorch (`pytorch_model*.bin`) model
//! directory.

use std::path::PathBuf;

use anyhow::Context;
use skymoe_model::weights::convert::convert_pytorch_dir;

/// Arguments of `skymoe convert`.
#[derive(clap::Args)]
pub struct Args {
    /// A Hugging Face model directory with `pytorch_model.bin` or its shards and index, or a
    /// hub id (org/name[@revision]) found in the local Hugging Face cache.
    #[arg(long, value_parser = super::model_arg)]
    model: PathBuf,
    /// Output directory: created if missing; it must not be the model directory nor already
    /// hold weights.
    #[arg(long)]
    out: PathBuf,
}

/// Run the verb.
pub fn run(a: Args) -> anyhow::Result<()> {
    let s = convert_pytorch_dir(&a.model, &a.out)
        .with_context(|| format!("cannot convert {}", a.model.display()))?;
    eprintln!(
        "wrote {} ({} tensors, {:.1} MiB in {} weight file(s); {} other file(s) copied)",
        s.out.display(),
        s.tensors,
        s.total_bytes as f64 / (1 << 20) as f64,
        s.weight_files.len(),
        s.copied.len(),
    );
    Ok(())
}
