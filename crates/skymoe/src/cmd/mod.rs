//! One module per verb; each is a thin adapter over the library crates.

pub mod bench;
pub mod calibrate;
pub mod convert;
pub mod demo;
pub mod eval;
pub mod experiment;
pub mod generate;
pub mod grads;
pub mod inspect;
pub mod launch;
pub mod logits;
pub mod plan;
pub mod quantize;
pub mod report;
pub mod serve;
pub mod tokenizer;
pub mod tp;
pub mod train;
pub mod upcycle;

use std::path::Path;

use anyhow::Context;
use candle_core::Device;
use skymoe_model::{CausalLm, Checkpoint};

/// The compute device: CPU unless built with `cuda` and a GPU is present.
pub fn device() -> anyhow::Result<Device> {
    #[cfg(feature = "cuda")]
    {
        if let Ok(d) = Device::new_cuda(0) {
            return Ok(d);
        }
    }
    Ok(Device::Cpu)
}

/// Parse a model argument: an existing path, or a hub id `org/name[@revision]` resolved
/// offline from the local Hugging Face cache (see [`skymoe_model::hub`]).
pub fn model_arg(s: &str) -> Result<std::path::PathBuf, String> {
    skymoe_model::hub::resolve_model_path(Path::new(s)).map_err(|e| e.to_string())
}

/// Open a checkpoint and build its model.
pub fn load_model(path: &Path, device: &Device) -> anyhow::Result<(Checkpoint, CausalLm)> {
    let ckpt = Checkpoint::open(path, device)
        .with_context(|| format!("cannot open model {}", path.display()))?;
    let model = CausalLm::load(&ckpt, device)
        .with_context(|| format!("cannot load model {}", path.display()))?;
    Ok((ckpt, model))
}

/// Parse `1,2,3` into token ids.
pub fn parse_tokens(s: &str) -> anyhow::Result<Vec<u32>> {
    let ids = s
        .split(',')
        .map(|t| t.trim())
        .filter(|t| !t.is_empty())
        .map(|t| {
            t.parse::<u32>()
                .with_context(|| format!("`{t}` is not a token id"))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    if ids.is_empty() {
        anyhow::bail!("no token ids given");
    }
    Ok(ids)
}

/// Write tensors to a safetensors file through a temporary file and a rename, so an
/// interrupted write never leaves a half-written file under the final name.
pub fn save_atomically(
    map: &std::collections::HashMap<String, candle_core::Tensor>,
    path: &Path,
) -> anyhow::Result<()> {
    let tmp = path.with_extension("safetensors.tmp");
    candle_core::safetensors::save(map, &tmp)
        .with_context(|| format!("cannot write {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("cannot write {}", path.display()))?;
    Ok(())
}
