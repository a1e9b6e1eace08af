//! Hugging Face safetensors checkpoints: a single `model.safetensors` or shards listed in
//! `model.safetensors.index.json`, memory-mapped.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::safetensors::MmapedSafetensors;
use candle_core::{Device, Tensor};
use safetensors::Dtype;
use skymoe_kernels::quant::SharedBytes;

use crate::error::{ModelError, Result};

/// A safetensors checkpoint (one file or several shards): headers are validated through a
/// memory map; tensor bytes are read from the file when they are converted (so a loaded
/// model's memory is not counted twice, once as mapped file pages and once as its own copy),
/// or used in place from the map when served as stored ([`SafetensorsCheckpoint::mapped`]).
pub struct SafetensorsCheckpoint {
    files: MmapedSafetensors,
    /// File -> its read-only memory map, shared with the matrices that read it in place.
    maps: HashMap<PathBuf, SharedBytes>,
    /// Tensor name -> file it lives in (for error messages).
    locations: HashMap<String, PathBuf>,
    /// Tensor name -> (absolute byte offset in its file, length).
    ranges: HashMap<String, (u64, usize)>,
}

/// Absolute byte ranges of the tensors of one safetensors file, from its header. Every size
/// is checked against the length of the file before it is used.
fn tensor_ranges(path: &Path) -> Result<Vec<(String, u64, usize)>> {
    use std::io::Read;
    let mut f = std::fs::File::open(path).map_err(|e| ModelError::io(path, e))?;
    let file_len = f.metadata().map_err(|e| ModelError::io(path, e))?.len();
    let mut len = [0u8; 8];
    f.read_exact(&mut len)
        .map_err(|e| ModelError::io(path, e))?;
    let n = u64::from_le_bytes(len);
    let data_start = n
        .checked_add(8)
        .filter(|&start| start <= file_len)
        .ok_or_else(|| {
            ModelError::corrupt(
                path,
                format!("the header claims {n} bytes but the file holds {file_len}"),
            )
        })?;
    let mut header = vec![0u8; n as usize];
    f.read_exact(&mut header)
        .map_err(|e| ModelError::io(path, e))?;
    let v: serde_json::Value = serde_json::from_slice(&header)
        .map_err(|e| ModelError::corrupt(path, format!("header is not JSON: {e}")))?;
    let obj = v
        .as_object()
        .ok_or_else(|| ModelError::corrupt(path, "header is not an object"))?;
    let mut out = Vec::with_capacity(obj.len());
    for (name, info) in obj {
        if name == "__metadata__" {
            continue;
        }
        let offsets = info
            .get("data_offsets")
            .and_then(|o| o.as_array())
            .and_then(|o| Some((o.first()?.as_u64()?, o.get(1)?.as_u64()?)))
            .ok_or_else(|| {
                ModelError::corrupt(path, format!("tensor {name} has no data_offsets"))
            })?;
        let (begin, end) = offsets;
        let start = data_start.checked_add(begin);
        if begin > end || start.is_none_or(|s| s > file_len || end - begin > file_len - s) {
            return Err(ModelError::corrupt(
                path,
                format!(
                    "tensor {name}: data_offsets [{begin}, {end}] lie outside the file's \
                     {} data bytes",
                    file_len - data_start
                ),
            ));
        }
        out.push((name.clone(), data_start + begin, (end - begin) as usize));
    }
    Ok(out)
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
        let mut ranges = HashMap::new();
        let mut maps: HashMap<PathBuf, SharedBytes> = HashMap::new();
        // Open each file on its own first so that a corrupt file is named in the error.
        for f in files {
            // SAFETY: the file is mapped read-only; like every memory-mapped reader we rely on no
            // other process truncating it while mapped.
            let st = unsafe { MmapedSafetensors::new(f) }
                .map_err(|e| ModelError::corrupt(f, strip_candle_context(&e)))?;
            for (name, _) in st.tensors() {
                locations.insert(name, f.clone());
            }
            // The map validated the header and the offsets against the file's length.
            for (name, start, len) in tensor_ranges(f)? {
                ranges.insert(name, (start, len));
            }
            let file = std::fs::File::open(f).map_err(|e| ModelError::io(f, e))?;
            let map = super::map_weights(&file).map_err(|e| ModelError::io(f, e))?;
            maps.insert(f.clone(), Arc::new(map));
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
            maps,
            locations,
            ranges,
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

    /// A tensor as stored: its dtype, shape and bytes (little-endian), read from the file.
    pub fn raw(&self, name: &str) -> Result<(Dtype, Vec<usize>, Vec<u8>)> {
        use std::io::{Read, Seek, SeekFrom};
        let view = self.view(name)?;
        let path = self.locations.get(name).cloned().unwrap_or_default();
        let &(start, len) = self
            .ranges
            .get(name)
            .ok_or_else(|| ModelError::MissingTensor {
                name: name.to_string(),
            })?;
        let mut bytes = vec![0u8; len];
        let mut f = std::fs::File::open(&path).map_err(|e| ModelError::io(&path, e))?;
        f.seek(SeekFrom::Start(start))
            .and_then(|_| f.read_exact(&mut bytes))
            .map_err(|e| ModelError::io(&path, e))?;
        Ok((view.dtype(), view.shape().to_vec(), bytes))
    }

    /// A tensor as stored, its bytes left in place in the file's memory map: dtype, shape,
    /// the map, and the byte offset and length of the tensor in it (inside the map, checked
    /// against the file's length when the checkpoint was opened).
    pub fn mapped(&self, name: &str) -> Result<(Dtype, Vec<usize>, SharedBytes, usize, usize)> {
        let view = self.view(name)?;
        let path = self.locations.get(name).cloned().unwrap_or_default();
        let missing = || ModelError::MissingTensor {
            name: name.to_string(),
        };
        let &(start, len) = self.ranges.get(name).ok_or_else(missing)?;
        let map = self.maps.get(&path).ok_or_else(missing)?;
        let start = usize::try_from(start)
            .ok()
            .filter(|s| {
                s.checked_add(len)
                    .is_some_and(|e| e <= (**map).as_ref().len())
            })
            .ok_or_else(|| {
                ModelError::corrupt(
                    &path,
                    format!("tensor {name} lies beyond the end of the file"),
                )
            })?;
        Ok((view.dtype(), view.shape().to_vec(), map.clone(), start, len))
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
        let (dtype, shape, bytes) = self.raw(name)?;
        let dtype = match dtype {
            Dtype::F16 => candle_core::DType::F16,
            Dtype::BF16 => candle_core::DType::BF16,
            _ => candle_core::DType::F32,
        };
        Ok(Tensor::from_raw_buffer(&bytes, dtype, &shape, device)?)
    }
}

/// Candle errors carry a backtrace-like context; keep only the message.
fn strip_candle_context(e: &candle_core::Error) -> String {
    e.to_string().lines().next().unwrap_or_default().to_string()
}
