//! Checkpoints: a Hugging Face model directory (config.json, model.safetensors,
//! tokenizer.json) plus the trainer's state (optimiser moments, step, data position, α per
//! layer), written atomically — into a temporary directory, every file fsynced, then renamed —
//! keeping the newest N.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};
use skymoe_model::ModelConfig;

use crate::aux_loss::AuxCoefficients;
use crate::error::{Result, TrainError};
use crate::optim::{AdamW, Moments};
use crate::params::TrainableParams;

/// The trainer state besides weights and moments.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainerState {
    /// Optimiser steps completed.
    pub step: u64,
    /// Training sequences consumed (the data position).
    pub consumed: u64,
    /// Auxiliary-loss coefficients per MoE layer.
    pub aux: AuxCoefficients,
    /// The data/initialisation seed of the run.
    pub seed: u64,
    /// Tokens trained on so far.
    pub tokens: u64,
}

const STATE_FILE: &str = "trainer_state.json";
const OPTIM_FILE: &str = "optimizer.safetensors";

fn sync_file(path: &Path) -> Result<()> {
    File::open(path)
        .and_then(|f| f.sync_all())
        .map_err(|e| TrainError::io(path, e))
}

fn write_synced(path: &Path, bytes: &[u8]) -> Result<()> {
    skymoe_model::fsutil::write_synced(path, bytes, |p, e| TrainError::io(p, e))
}

fn save_tensors(map: &HashMap<String, Tensor>, path: &Path) -> Result<()> {
    candle_core::safetensors::save(map, path).map_err(|e| {
        // candle repeats the OS error in its message; keep the first statement of it.
        let msg = e.to_string();
        let reason = msg
            .split(": ")
            .find(|p| !p.starts_with("I/O error"))
            .unwrap_or(&msg)
            .to_string();
        TrainError::Write {
            path: path.to_path_buf(),
            reason,
        }
    })?;
    sync_file(path)
}

/// Write the model (Hugging Face layout) into `dir`, which must exist. `tokenizer` is a
/// tokenizer.json file (written as tokenizer.json), or a tokenizer.model file or model
/// directory whose tokenizer files are copied.
pub fn write_model_files(
    dir: &Path,
    config: &ModelConfig,
    tensors: &BTreeMap<String, Tensor>,
    tokenizer: Option<&Path>,
) -> Result<()> {
    let mut json = config.to_hf_json();
    if let Some(remote) = config.architecture.family().remote_code() {
        let auto_map: serde_json::Map<String, serde_json::Value> = remote
            .auto_map
            .iter()
            .map(|(k, v)| ((*k).to_string(), (*v).into()))
            .collect();
        json["auto_map"] = auto_map.into();
        for (name, text) in remote.files {
            write_synced(&dir.join(name), text.as_bytes())?;
        }
    }
    let cfg = serde_json::to_vec_pretty(&json).map_err(|e| TrainError::Config(e.to_string()))?;
    write_synced(&dir.join("config.json"), &cfg)?;
    let map: HashMap<String, Tensor> = tensors
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    save_tensors(&map, &dir.join("model.safetensors"))?;
    if let Some(t) = tokenizer {
        if t.is_dir() || t.extension().is_some_and(|e| e == "model") {
            // A SentencePiece tokenizer (or a model directory): copy the directory's tokenizer
            // files, so that transformers can load the checkpoint.
            let src = if t.is_dir() {
                t
            } else {
                t.parent().unwrap_or(Path::new("."))
            };
            skymoe_model::tokenizer::copy_tokenizer_files(src, dir)?;
        } else {
            let bytes = std::fs::read(t).map_err(|e| TrainError::io(t, e))?;
            write_synced(&dir.join("tokenizer.json"), &bytes)?;
        }
    }
    Ok(())
}

/// Create `final_dir` atomically: `fill` writes into a temporary sibling directory which is
/// then renamed into place (replacing an older directory of that name).
pub fn write_dir_atomically(
    final_dir: &Path,
    fill: impl FnOnce(&Path) -> Result<()>,
) -> Result<()> {
    skymoe_model::fsutil::write_dir_atomically(final_dir, |p, e| TrainError::io(p, e), fill)
}

/// Directory name of the checkpoint of `step`.
pub fn checkpoint_name(step: u64) -> String {
    format!("step-{step:08}")
}

/// Save a full training checkpoint under `root/step-NNNNNNNN`, then delete all but the newest
/// `keep` checkpoints. Returns the checkpoint directory.
#[allow(clippy::too_many_arguments)]
pub fn save_checkpoint(
    root: &Path,
    config: &ModelConfig,
    params: &TrainableParams,
    optimizer: &AdamW,
    state: &TrainerState,
    tokenizer: Option<&Path>,
    keep: usize,
) -> Result<PathBuf> {
    let dir = root.join(checkpoint_name(state.step));
    write_dir_atomically(&dir, |tmp| {
        write_model_files(tmp, config, &params.tensors(), tokenizer)?;
        let mut moments = HashMap::new();
        for (name, m) in &optimizer.moments {
            let m = m
                .lock()
                .map_err(|_| TrainError::Config("poisoned optimizer state".into()))?;
            let shape = params
                .vars
                .get(name)
                .map(|v| v.dims().to_vec())
                .unwrap_or_else(|| vec![m.m.len()]);
            moments.insert(
                format!("m.{name}"),
                Tensor::from_slice(&m.m, shape.clone(), &Device::Cpu)?,
            );
            moments.insert(
                format!("v.{name}"),
                Tensor::from_slice(&m.v, shape, &Device::Cpu)?,
            );
        }
        save_tensors(&moments, &tmp.join(OPTIM_FILE))?;
        let mut st = serde_json::to_value(state).map_err(|e| TrainError::Config(e.to_string()))?;
        st["optimizer_step"] = optimizer.step.into();
        write_synced(
            &tmp.join(STATE_FILE),
            &serde_json::to_vec_pretty(&st).map_err(|e| TrainError::Config(e.to_string()))?,
        )
    })?;
    let mut all = list_checkpoints(root)?;
    while all.len() > keep.max(1) {
        let old = all.remove(0);
        std::fs::remove_dir_all(&old.1).map_err(|e| TrainError::io(&old.1, e))?;
    }
    Ok(dir)
}

/// Complete checkpoints under `root`, oldest first, as (step, directory).
pub fn list_checkpoints(root: &Path) -> Result<Vec<(u64, PathBuf)>> {
    let mut out = Vec::new();
    let Ok(rd) = std::fs::read_dir(root) else {
        return Ok(out);
    };
    for e in rd {
        let e = e.map_err(|e| TrainError::io(root, e))?;
        let name = e.file_name().to_string_lossy().to_string();
        if let Some(n) = name
            .strip_prefix("step-")
            .and_then(|s| s.parse::<u64>().ok())
        {
            if e.path().join(STATE_FILE).exists() {
                out.push((n, e.path()));
            }
        }
    }
    out.sort();
    Ok(out)
}

/// Restore trainer state and optimiser moments from a checkpoint directory into `optimizer`.
pub fn load_trainer_state(
    dir: &Path,
    params: &TrainableParams,
    optimizer: &mut AdamW,
) -> Result<TrainerState> {
    let bad = |reason: String| TrainError::BadCheckpoint {
        path: dir.to_path_buf(),
        reason,
    };
    let text = std::fs::read_to_string(dir.join(STATE_FILE))
        .map_err(|e| TrainError::io(dir.join(STATE_FILE), e))?;
    let raw: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| bad(format!("{STATE_FILE}: {e}")))?;
    let state: TrainerState =
        serde_json::from_value(raw.clone()).map_err(|e| bad(format!("{STATE_FILE}: {e}")))?;
    optimizer.step = raw
        .get("optimizer_step")
        .and_then(|v| v.as_u64())
        .ok_or_else(|| bad("no optimizer_step".into()))?;
    let moments = candle_core::safetensors::load(dir.join(OPTIM_FILE), &Device::Cpu)
        .map_err(|e| bad(format!("{OPTIM_FILE}: {e}")))?;
    for name in params.vars.keys() {
        let get = |k: String| -> Result<Vec<f32>> {
            let t = moments.get(&k).ok_or_else(|| bad(format!("no {k}")))?;
            Ok(t.flatten_all()?.to_vec1::<f32>()?)
        };
        let m = get(format!("m.{name}"))?;
        let v = get(format!("v.{name}"))?;
        let slot = optimizer
            .moments
            .get(name)
            .ok_or_else(|| bad(format!("optimizer has no slot for {name}")))?;
        let mut guard = slot
            .lock()
            .map_err(|_| bad("poisoned optimizer state".into()))?;
        if m.len() != guard.m.len() || v.len() != guard.v.len() {
            return Err(bad(format!("moment size mismatch for {name}")));
        }
        *guard = Moments { m, v };
    }
    Ok(state)
}
