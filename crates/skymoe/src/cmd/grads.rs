//! `skymoe grads`: the loss of a token sequence and the gradient of every parameter, written
//! to a safetensors file (for external verification).

use std::collections::HashMap;
use std::path::PathBuf;

use anyhow::Context;
use candle_core::{DType, Device, Tensor};
use skymoe_model::Checkpoint;
use skymoe_train::{loss_and_grads, TrainableParams};

/// Arguments of `skymoe grads`.
#[derive(clap::Args)]
pub struct Args {
    /// A Hugging Face model directory or a .gguf file.
    #[arg(long)]
    model: PathBuf,
    /// Comma-separated token ids (at least two).
    #[arg(long)]
    tokens: String,
    /// Output safetensors file: `loss` (scalar f32, mean next-token cross-entropy, dropless,
    /// no auxiliary loss) and every parameter's gradient under its checkpoint name.
    #[arg(long)]
    out: PathBuf,
}

/// Run the verb.
pub fn run(a: Args) -> anyhow::Result<()> {
    let tokens = super::parse_tokens(&a.tokens)?;
    let device = super::device()?;
    let ckpt = Checkpoint::open(&a.model, &device)
        .with_context(|| format!("cannot open model {}", a.model.display()))?;
    let params = TrainableParams::from_checkpoint(&ckpt, &device)
        .with_context(|| format!("cannot load model {}", a.model.display()))?;
    let out =
        loss_and_grads(&params, &ckpt.config, &tokens, &device).context("backward pass failed")?;
    let mut map: HashMap<String, Tensor> = HashMap::new();
    map.insert("loss".into(), Tensor::new(out.loss, &Device::Cpu)?);
    for (name, g) in out.grads {
        map.insert(name, g.to_dtype(DType::F32)?.to_device(&Device::Cpu)?);
    }
    super::save_atomically(&map, &a.out)?;
    eprintln!(
        "loss {:.6}; wrote {} gradients to {}",
        out.loss,
        map.len() - 1,
        a.out.display()
    );
    Ok(())
}
