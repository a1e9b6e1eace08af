//! Hugging Face safetensors checkpoints: a single `model.safetensors` or shards listed in
//! `model.safetensors.index.json`, memory-mapped.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use candle_core::safetensors::MmapedSafetensors;
use candle_core::{Device, Tensor};
use safetensors::Dtype;

use crate::error::{ModelError, Result};

/// A memory-mapped safetensors checkpoint (one file or several shards).
pub struct SafetensorsCheckpoint {
    files: MmapedSafetensors,
    /// Tensor name -> file it lives in (for error messages).
    locations: HashMap<String, PathBuf>,
}

impl SafetensorsCheckpoint {
    /// Open the weights of a model directory.
    pub fn open_dir(dir: &Path) -> Result<Self> {
        let index = dir.join("model.safetensors.index.json");
        let single = dir.join("model.safetensors");
        let files: Vec<PathBuf> = if index.exists() {
            let text = std::fs::read_to_string(&index).map_err(|e| ModelError::io(&index, e))?;
            let v: serde_json::Value = serde_json::from_str(&text)
                .map_err(|e| ModelError::corrupt(&index, format!("not valid JSON: {e}")))?;
            let map = v
                .get("weight_map")
                .and_then(|m| m.as_object())
                .ok_or_else(|| ModelError::corrupt(&index, "no `weight_map` object"))?;
            let mut shards = BTreeSet::new();
            for (name, file) in map {
                let file = file.as_str().ok_or_else(|| {
                    ModelError::corrupt(&index, format!("weight_map[{name}] is not a file name"))
                })?;
                if file.contains("..") || Path::new(file).is_absolute() {
                    return Err(ModelError::corrupt(
                        &index,
                        format!("shard name {file} points outside the model directory"),
                    ));
                }
                shards.insert(dir.join(file));
            }
            for shard in &shards {
                if !shard.is_file() {
                    return Err(ModelError::MissingShard {
                        index: index.clone(),
                        shard: shard.clone(),
                    });
                }
            }
            shards.into_iter().collect()
        } else if single.exists() {
            vec![single]
        } else {
            return Err(ModelError::NoWeights {
                path: dir.to_path_buf(),
            });
        };
        Self::open_files(&files)
    }

    /// Open an explicit list of safetensors files.
    pub fn open_files(files: &[PathBuf]) -> Result<Self> {
        let mut locations = HashMap::new();
        // Open each file on its own first so that a corrupt file is named in the error.
        for f in files {
            // SAFETY: the file is mapped read-only; like every memory-mapped reader we rely on no
            // other process truncating it while mapped.
            let st = unsafe { MmapedSafetensors::new(f) }
                .map_err(|e| ModelError::corrupt(f, strip_candle_context(&e)))?;
            for (name, _) in st.tensors() {
                locations.insert(name, f.clone());
            }
        }
        // SAFETY: as above.
        let files_mm = unsafe { MmapedSafetensors::multi(files) }.map_err(|e| {
            ModelError::corrupt(
                files.first().cloned().unwrap_or_default(),
                strip_candle_context(&e),
            )
        })?;
        Ok(SafetensorsCheckpoint {
            files: files_mm,
            locations,
        })
    }

    /// Whether the checkpoint holds a tensor of this name.
    pub fn contains(&self, name: &str) -> bool {
        self.locations.contains_key(name)
    }

    /// All tensor names.
    pub fn names(&self) -> Vec<String> {
        self.locations.keys().cloned().collect()
    }

    /// The shape of a tensor without loading it.
    pub fn shape(&self, name: &str) -> Result<Vec<usize>> {
        let view = self.view(name)?;
        Ok(view.shape().to_vec())
    }

    fn view(&self, name: &str) -> Result<safetensors::tensor::TensorView<'_>> {
        if !self.contains(name) {
            return Err(ModelError::MissingTensor {
                name: name.to_string(),
            });
        }
        self.files.get(name).map_err(|e| {
            ModelError::corrupt(
                self.locations.get(name).cloned().unwrap_or_default(),
                strip_candle_context(&e),
            )
        })
    }

    /// A tensor as stored: its dtype, shape and bytes (little-endian).
    pub fn raw(&self, name: &str) -> Result<(Dtype, Vec<usize>, Vec<u8>)> {
        let view = self.view(name)?;
        Ok((view.dtype(), view.shape().to_vec(), view.data().to_vec()))
    }

    /// The stored dtype of a tensor.
    pub fn dtype(&self, name: &str) -> Result<Dtype> {
        Ok(self.view(name)?.dtype())
    }

    /// Load a tensor in its stored dtype (f32, f16 or bf16).
    pub fn load(&self, name: &str, device: &Device) -> Result<Tensor> {
        let view = self.view(name)?;
        match view.dtype() {
            Dtype::F32 | Dtype::F16 | Dtype::BF16 => {}
            other => {
                return Err(ModelError::UnsupportedDtype {
                    name: name.to_string(),
                    dtype: format!("{other:?}"),
                })
            }
        }
        let path = self.locations.get(name).cloned().unwrap_or_default();
        self.files.load(name, device).map_err(|e| {
            ModelError::corrupt(path, format!("tensor {name}: {}", strip_candle_context(&e)))
        })
    }
}

/// Candle errors carry a backtrace-like context; keep only the message.
fn strip_candle_context(e: &candle_core::Error) -> String {
    e.to_string().lines().next().unwrap_or_default().to_string()
}
