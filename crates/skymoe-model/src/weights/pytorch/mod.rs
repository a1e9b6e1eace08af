//! PyTorch checkpoints as Hugging Face writes them: `pytorch_model.bin`, or shards listed in
//! `pytorch_model.bin.index.json`, each a `torch.save` zip archive of a state dict.
//!
//! Opening parses every shard's pickle with a machine that only knows the globals torch uses
//! to rebuild tensors, so reading a checkpoint never runs code from it. Tensor bytes are read
//! when a tensor is requested, straight from the file.

mod archive;
mod layout;
pub mod pickle;
mod records;

use std::collections::{BTreeSet, HashMap};
use std::io::Cursor;
use std::path::{Component, Path, PathBuf};

use candle_core::{Device, Tensor};
use safetensors::Dtype;

pub use archive::{StorageEntry, TorchArchive};
pub use layout::gather;
pub use pickle::{parse_pickle, Global, Obj, ObjId, Pickle, PickleError};
pub use records::{parse_state_dict, state_dict, StorageRef, TensorRecord, TorchDtype};

use crate::error::{ModelError, Result};

/// File name of a single-file PyTorch checkpoint.
pub const SINGLE_FILE: &str = "pytorch_model.bin";
/// File name of the index of a sharded PyTorch checkpoint.
pub const INDEX_FILE: &str = "pytorch_model.bin.index.json";

/// A PyTorch checkpoint (one file or several shards), indexed lazily.
pub struct PytorchCheckpoint {
    /// Each shard and its index, in file-name order.
    files: Vec<(PathBuf, TorchArchive)>,
    /// Tensor name → (shard, position in that shard's tensor list).
    tensors: HashMap<String, (usize, usize)>,
}

/// The shard files named by an index's `weight_map`, each checked to exist.
pub fn index_shards(dir: &Path, index: &Path) -> Result<Vec<PathBuf>> {
    let text = std::fs::read_to_string(index).map_err(|e| ModelError::io(index, e))?;
    let v: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| ModelError::corrupt(index, format!("not valid JSON: {e}")))?;
    let map = v
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| ModelError::corrupt(index, "no `weight_map` object"))?;
    let mut shards = BTreeSet::new();
    for (name, file) in map {
        let file = file.as_str().ok_or_else(|| {
            ModelError::corrupt(index, format!("weight_map[{name}] is not a file name"))
        })?;
        let plain = Path::new(file)
            .components()
            .all(|c| matches!(c, Component::Normal(_)));
        if file.is_empty() || !plain {
            return Err(ModelError::corrupt(
                index,
                format!("shard name {file} points outside the model directory"),
            ));
        }
        shards.insert(dir.join(file));
    }
    for shard in &shards {
        if !shard.is_file() {
            return Err(ModelError::MissingShard {
                index: index.to_path_buf(),
                shard: shard.clone(),
            });
        }
    }
    Ok(shards.into_iter().collect())
}

impl PytorchCheckpoint {
    /// Whether a model directory holds PyTorch weights (`pytorch_model.bin` or its index).
    pub fn present(dir: &Path) -> bool {
        dir.join(INDEX_FILE).is_file() || dir.join(SINGLE_FILE).is_file()
    }

    /// The weight files of a model directory: the shards its index names, or the single file.
    pub fn dir_files(dir: &Path) -> Result<Vec<PathBuf>> {
        let index = dir.join(INDEX_FILE);
        let single = dir.join(SINGLE_FILE);
        if index.exists() {
            index_shards(dir, &index)
        } else if single.exists() {
            Ok(vec![single])
        } else {
            Err(ModelError::NoWeights {
                path: dir.to_path_buf(),
            })
        }
    }

    /// Open the PyTorch weights of a model directory.
    pub fn open_dir(dir: &Path) -> Result<Self> {
        Self::open_files(&Self::dir_files(dir)?)
    }

    /// Open an explicit list of `torch.save` files.
    pub fn open_files(files: &[PathBuf]) -> Result<Self> {
        let mut opened = Vec::with_capacity(files.len());
        let mut tensors = HashMap::new();
        for (i, path) in files.iter().enumerate() {
            let archive = TorchArchive::open(path)?;
            for (j, (name, _)) in archive.tensors.iter().enumerate() {
                tensors.insert(name.clone(), (i, j));
            }
            opened.push((path.clone(), archive));
        }
        Ok(PytorchCheckpoint {
            files: opened,
            tensors,
        })
    }

    /// The shard files, in the order they were opened.
    pub fn files(&self) -> Vec<PathBuf> {
        self.files.iter().map(|(p, _)| p.clone()).collect()
    }

    /// Names of the tensors read from shard `file` (a path from [`Self::files`]), in the
    /// order the shard lists them. A name a later shard repeats belongs to that shard.
    pub fn names_in(&self, file: &Path) -> Vec<String> {
        let Some(i) = self.files.iter().position(|(p, _)| p == file) else {
            return Vec::new();
        };
        self.files
            .get(i)
            .map(|(_, a)| {
                a.tensors
                    .iter()
                    .enumerate()
                    .filter(|(j, (n, _))| self.tensors.get(n) == Some(&(i, *j)))
                    .map(|(_, (n, _))| n.clone())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Whether the checkpoint holds a tensor of this name.
    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    /// All tensor names (unordered).
    pub fn names(&self) -> Vec<String> {
        self.tensors.keys().cloned().collect()
    }

    /// The record of a tensor and the shard holding it.
    fn locate(&self, name: &str) -> Result<(&Path, &TorchArchive, &TensorRecord)> {
        self.tensors
            .get(name)
            .and_then(|&(i, j)| {
                let (path, archive) = self.files.get(i)?;
                let (_, t) = archive.tensors.get(j)?;
                Some((path.as_path(), archive, t))
            })
            .ok_or_else(|| ModelError::MissingTensor {
                name: name.to_string(),
            })
    }

    /// A tensor's record: storage, dtype, shape, strides and offset.
    pub fn record(&self, name: &str) -> Result<&TensorRecord> {
        Ok(self.locate(name)?.2)
    }

    /// The shape of a tensor without reading it.
    pub fn shape(&self, name: &str) -> Result<Vec<usize>> {
        Ok(self.record(name)?.shape.clone())
    }

    /// The stored element type of a tensor.
    pub fn dtype(&self, name: &str) -> Result<TorchDtype> {
        Ok(self.record(name)?.dtype)
    }

    /// A tensor as safetensors would store it: its dtype, shape and row-major little-endian
    /// bytes (views are gathered, shared storages read once per tensor).
    pub fn raw(&self, name: &str) -> Result<(Dtype, Vec<usize>, Vec<u8>)> {
        let (path, archive, t) = self.locate(name)?;
        let dtype = t
            .dtype
            .safetensors()
            .ok_or_else(|| ModelError::UnsupportedDtype {
                name: name.to_string(),
                dtype: t.dtype.name().to_string(),
            })?;
        let bytes = archive.tensor_bytes(path, name, t)?;
        Ok((dtype, t.shape.clone(), bytes))
    }

    /// Load a tensor in its stored dtype (f32, f16 or bf16).
    pub fn load(&self, name: &str, device: &Device) -> Result<Tensor> {
        let (path, archive, t) = self.locate(name)?;
        let dtype = match t.dtype {
            TorchDtype::F32 => candle_core::DType::F32,
            TorchDtype::F16 => candle_core::DType::F16,
            TorchDtype::BF16 => candle_core::DType::BF16,
            other => {
                return Err(ModelError::UnsupportedDtype {
                    name: name.to_string(),
                    dtype: other.name().to_string(),
                })
            }
        };
        let bytes = archive.tensor_bytes(path, name, t)?;
        Ok(Tensor::from_raw_buffer(&bytes, dtype, &t.shape, device)?)
    }
}

/// Index a `torch.save` zip held in memory and read every tensor: name, record and row-major
/// little-endian bytes. `label` names the bytes in errors. Meant for checking untrusted input
/// end to end (every path that reading a file takes, without the file).
pub fn read_all_from_bytes(
    bytes: &[u8],
    label: &Path,
) -> Result<Vec<(String, TensorRecord, Vec<u8>)>> {
    let archive = TorchArchive::from_reader(Cursor::new(bytes), label)?;
    archive
        .tensors
        .iter()
        .map(|(name, t)| {
            let data = archive.tensor_bytes_from(Cursor::new(bytes), label, name, t)?;
            Ok((name.clone(), t.clone(), data))
        })
        .collect()
}
