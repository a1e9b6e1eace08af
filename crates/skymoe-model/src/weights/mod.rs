//! Reading checkpoints: Hugging Face safetensors or PyTorch (`pytorch_model.bin`) directories
//! and llama.cpp GGUF files.
//!
//! Every source yields tensors under their Hugging Face checkpoint names, in the Hugging Face
//! layout, as f32 on the requested device. Matrices stored quantised (fp8/int8/q4 safetensors,
//! ggml blocks of a GGUF file) can also be read as stored: [`WeightSource::quantized`].

pub mod convert;
mod gguf;
pub mod pytorch;
pub mod quantized;
mod safetensors_dir;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};

pub use gguf::{GgufCheckpoint, GgufMetadata, GgufRawTensor, GgufWeights};
pub use pytorch::PytorchCheckpoint;
pub use safetensors_dir::SafetensorsCheckpoint;

use crate::config::ModelConfig;
use crate::error::{ModelError, Result};

/// Where a model's tensors come from.
pub enum WeightSource {
    /// A Hugging Face directory with one or more safetensors files (memory-mapped).
    Safetensors(SafetensorsCheckpoint),
    /// A Hugging Face directory with `pytorch_model.bin` or its shards (read lazily, no code run).
    Pytorch(PytorchCheckpoint),
    /// Tensors already converted to Hugging Face names and layout (built in memory).
    InMemory(HashMap<String, Tensor>),
    /// A llama.cpp GGUF file (memory-mapped), its tensors under Hugging Face names and layout,
    /// dequantised when read as f32, or read as stored ggml blocks.
    Gguf(GgufWeights),
}

impl WeightSource {
    /// Whether a tensor of this name exists.
    pub fn contains(&self, name: &str) -> bool {
        match self {
            WeightSource::Safetensors(s) => s.contains(name),
            WeightSource::Pytorch(p) => p.contains(name),
            WeightSource::InMemory(m) => m.contains_key(name),
            WeightSource::Gguf(g) => g.contains(name),
        }
    }

    /// Names of all tensors, sorted.
    pub fn names(&self) -> Vec<String> {
        let mut names = match self {
            WeightSource::Safetensors(s) => s.names(),
            WeightSource::Pytorch(p) => p.names(),
            WeightSource::InMemory(m) => m.keys().cloned().collect(),
            WeightSource::Gguf(g) => g.names(),
        };
        names.sort();
        names
    }

    /// A matrix stored quantised as it is: fp8, int8 or q4 with its `weight_scale` (safetensors),
    /// or the ggml blocks of a GGUF tensor whose type skymoe's ggml kernels serve (Q4_0, Q4_1,
    /// Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K; read in place from the file's memory map). `None`
    /// when the tensor is stored as a float or in another ggml type (read those with
    /// [`WeightSource::get`]).
    pub fn quantized(
        &self,
        name: &str,
        rows: usize,
        cols: usize,
    ) -> Result<Option<skymoe_kernels::quant::QMatrix>> {
        match self {
            WeightSource::Safetensors(s) => quantized::read_qmatrix(s, name, rows, cols),
            WeightSource::Gguf(g) => match g.ggml_matrix(name)? {
                Some(m) if (m.rows(), m.cols()) != (rows, cols) => Err(ModelError::ShapeMismatch {
                    name: name.to_string(),
                    expected: vec![rows, cols],
                    found: vec![m.rows(), m.cols()],
                }),
                Some(m) => Ok(Some(skymoe_kernels::quant::QMatrix::from_ggml(m))),
                None => Ok(None),
            },
            WeightSource::Pytorch(_) | WeightSource::InMemory(_) => Ok(None),
        }
    }

    /// A matrix stored in f16 (safetensors), read in place from the file's memory map; `None`
    /// for other dtypes and sources.
    pub fn f16_matrix(
        &self,
        name: &str,
        rows: usize,
        cols: usize,
    ) -> Result<Option<skymoe_kernels::quant::QMatrix>> {
        match self {
            WeightSource::Safetensors(s) => quantized::read_f16_matrix(s, name, rows, cols),
            _ => Ok(None),
        }
    }

    /// The stored form of a GGUF tensor (ggml type, shape, place in the file), `None` for
    /// other sources and for GGUF tensors joined from several stored ones.
    pub fn gguf_raw(&self, name: &str) -> Result<Option<GgufRawTensor>> {
        match self {
            WeightSource::Gguf(g) => g.raw(name),
            _ => Ok(None),
        }
    }

    /// A tensor's dtype as its file names it (`F32`, `BF16`, `F8_E4M3`, ...), or `None` for
    /// tensors converted when read (GGUF, built in memory).
    pub fn stored_dtype(&self, name: &str) -> Option<String> {
        match self {
            WeightSource::Safetensors(s) => s.dtype(name).ok().map(|d| format!("{d:?}")),
            WeightSource::Pytorch(p) => p.dtype(name).ok().map(|d| format!("{d:?}")),
            WeightSource::InMemory(_) | WeightSource::Gguf(_) => None,
        }
    }

    /// The kind of source: `safetensors`, `pytorch` or `converted` (GGUF or in memory).
    pub fn kind(&self) -> &'static str {
        match self {
            WeightSource::Safetensors(_) => "safetensors",
            WeightSource::Pytorch(_) => "pytorch",
            WeightSource::InMemory(_) | WeightSource::Gguf(_) => "converted",
        }
    }

    /// The stored shape of a tensor, without reading it.
    pub fn shape(&self, name: &str) -> Result<Vec<usize>> {
        match self {
            WeightSource::Safetensors(s) => s.shape(name),
            WeightSource::Pytorch(p) => p.shape(name),
            WeightSource::InMemory(m) => {
                m.get(name)
                    .map(|t| t.dims().to_vec())
                    .ok_or_else(|| ModelError::MissingTensor {
                        name: name.to_string(),
                    })
            }
            WeightSource::Gguf(g) => g.shape(name),
        }
    }

    /// Load a tensor as f32 on `device`, checking that its shape is `expected`. Quantised
    /// matrices are dequantised.
    pub fn get(&self, name: &str, expected: &[usize], device: &Device) -> Result<Tensor> {
        if let [rows, cols] = *expected {
            if let Some(q) = self.quantized(name, rows, cols)? {
                return Ok(Tensor::from_vec(q.dequantize(), (rows, cols), device)?);
            }
        }
        let t = match self {
            WeightSource::Safetensors(s) => s.load(name, device)?,
            WeightSource::Pytorch(p) => p.load(name, device)?,
            WeightSource::InMemory(m) => m
                .get(name)
                .ok_or_else(|| ModelError::MissingTensor {
                    name: name.to_string(),
                })?
                .to_device(device)?,
            WeightSource::Gguf(g) => g.load(name, device)?,
        };
        if t.dims() != expected {
            return Err(ModelError::ShapeMismatch {
                name: name.to_string(),
                expected: expected.to_vec(),
                found: t.dims().to_vec(),
            });
        }
        Ok(t.to_dtype(DType::F32)?)
    }
}

/// A model checkpoint opened from disk: its config, its tensors, and where it came from.
pub struct Checkpoint {
    /// The parsed configuration.
    pub config: ModelConfig,
    /// The tensors.
    pub weights: WeightSource,
    /// The directory or file it was opened from.
    pub path: PathBuf,
    /// GGUF metadata (tokenizer and the rest) when the checkpoint is a GGUF file.
    pub gguf_metadata: Option<GgufMetadata>,
}

impl Checkpoint {
    /// Open a Hugging Face model directory (config.json + safetensors or PyTorch `.bin`
    /// weights; safetensors win when both are present) or a `.gguf` file.
    pub fn open(path: &Path, device: &Device) -> Result<Self> {
        if path.is_dir() {
            let config_path = path.join("config.json");
            if !config_path.exists() {
                return Err(ModelError::config(
                    &config_path,
                    "config.json not found in the model directory",
                ));
            }
            let config = ModelConfig::from_file(&config_path)?;
            let has_safetensors = path.join("model.safetensors.index.json").exists()
                || path.join("model.safetensors").exists();
            let weights = if !has_safetensors && PytorchCheckpoint::present(path) {
                WeightSource::Pytorch(PytorchCheckpoint::open_dir(path)?)
            } else {
                WeightSource::Safetensors(SafetensorsCheckpoint::open_dir(path)?)
            };
            check_gate_layout(&config, &weights, &config_path)?;
            Ok(Checkpoint {
                config,
                weights,
                path: path.to_path_buf(),
                gguf_metadata: None,
            })
        } else if path.is_file() {
            if path.extension().and_then(|e| e.to_str()) == Some("gguf") {
                let g = GgufCheckpoint::open(path, device)?;
                Ok(Checkpoint {
                    config: g.config,
                    weights: WeightSource::Gguf(g.weights),
                    path: path.to_path_buf(),
                    gguf_metadata: Some(g.metadata),
                })
            } else {
                Err(ModelError::NoWeights {
                    path: path.to_path_buf(),
                })
            }
        } else {
            Err(ModelError::io(
                path,
                std::io::Error::new(std::io::ErrorKind::NotFound, "no such file or directory"),
            ))
        }
    }
}

/// A config's two-layer-gate setting (Skywork's `moe_2layer_gate`) must match the router
/// tensors the checkpoint holds: a two-layer gate (`gate.wg.0`/`gate.wg.2`) or a one-layer one
/// (`gate.weight`). The Skywork config class defaults to the two-layer gate, so a config that
/// omits the key while the weights hold a one-layer gate would otherwise fail with a bare
/// missing tensor. Families whose names do not tell the two gates apart pass.
fn check_gate_layout(config: &ModelConfig, weights: &WeightSource, origin: &Path) -> Result<()> {
    let Some(moe) = &config.moe else {
        return Ok(());
    };
    let Some(layer) = (0..config.num_hidden_layers).find(|&l| config.is_moe_layer(l)) else {
        return Ok(());
    };
    let expected = config.moe_names(layer).gate;
    if weights.contains(&expected) {
        return Ok(());
    }
    let mut flipped = config.clone();
    if let Some(m) = &mut flipped.moe {
        m.router.two_layer_gate = !m.router.two_layer_gate;
    }
    let other = flipped.moe_names(layer).gate;
    if other == expected {
        return Ok(());
    }
    let found = if moe.router.two_layer_gate {
        "a one-layer gate"
    } else {
        "a two-layer gate"
    };
    if weights.contains(&other) {
        return Err(ModelError::config(
            origin,
            format!(
                "`moe_2layer_gate` is {} (absent means true for Skywork configs) but the checkpoint \
                 holds {found} (`{other}`); set `moe_2layer_gate` to {}",
                moe.router.two_layer_gate, !moe.router.two_layer_gate
            ),
        ));
    }
    Ok(())
}

/// Map a weight file read-only, asking for huge pages: the kernels stream every weight once
/// per decoded token, and with 4 KiB pages the TLB misses cost about 8% of batch-1 decode
/// (measured against weights copied into memory the allocator backs with huge pages). The
/// kernel honours the advice for pages it reads after it (a file first read through this map
/// is cached in 2 MiB folios and mapped as such); pages already cached in small folios stay
/// small. The advice is only a hint: where it is refused, the map works as before.
pub(crate) fn map_weights(file: &std::fs::File) -> std::io::Result<memmap2::Mmap> {
    // SAFETY: the file is mapped read-only; like every memory-mapped reader we rely on no
    // other process truncating or rewriting it while mapped.
    let map = unsafe { memmap2::Mmap::map(file) }?;
    #[cfg(target_os = "linux")]
    let _ = map.advise(memmap2::Advice::HugePage);
    Ok(map)
}
