//! llama.cpp GGUF files (v2/v3) of the `llama` architecture, dense or MoE (stacked experts).
//!
//! The file is memory-mapped and its tensors are put under Hugging Face names and layout
//! without being read: [`GgufWeights`] knows, for each Hugging Face tensor, the bytes of the
//! file it comes from. Two ways to read one:
//!
//! - dequantised to f32 on demand ([`GgufWeights::load`]: F32, F16, BF16, Q8_0, Q4_0, Q4_1 and
//!   the other ggml block types candle reads), for training, `CausalLm` and re-quantisation;
//! - as stored ([`GgufWeights::ggml_matrix`]): a [`GgmlMatrix`] over the mapped blocks, for the
//!   types skymoe's ggml kernels serve (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K).
//!
//! The layout conversion: the rotary-permuted q/k rows of llama.cpp's converter are put back in
//! Hugging Face's "rotate_half" order (a row permutation; for stored q/k matrices, their rows'
//! blocks are copied in that order), the stacked `ffn_*_exps` tensors are split into one tensor
//! per expert (each expert's rows are contiguous: a slice of the map, no copy), and the split
//! latent-attention `attn_k_b`/`attn_v_b` are joined back into `kv_b_proj` (dequantised).

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::quantized::gguf_file::{Content, TensorInfo, Value, VersionedMagic};
use candle_core::quantized::GgmlDType;
use candle_core::{Device, Tensor};
use memmap2::Mmap;
use skymoe_kernels::ggml::{GgmlMatrix, GgmlType};

use crate::config::{ModelConfig, RopeScaling, MAX_HIDDEN_LAYERS};
use crate::error::{ModelError, Result};
use crate::families::{self, Architecture, GgufForm, GgufKeys};
use crate::names;

/// The key/value metadata of a GGUF file.
pub struct GgufMetadata {
    /// All metadata entries.
    pub entries: HashMap<String, Value>,
}

impl GgufMetadata {
    /// A string entry.
    pub fn string(&self, key: &str) -> Option<&str> {
        match self.entries.get(key) {
            Some(Value::String(s)) => Some(s.as_str()),
            _ => None,
        }
    }

    /// An integer entry of any integer type.
    pub fn uint(&self, key: &str) -> Option<u64> {
        Self::uint_value(self.entries.get(key)?)
    }

    /// A float entry (f32 or f64).
    pub fn float(&self, key: &str) -> Option<f64> {
        match self.entries.get(key)? {
            Value::F32(x) => Some(*x as f64),
            Value::F64(x) => Some(*x),
            _ => None,
        }
    }

    /// A boolean entry.
    pub fn bool(&self, key: &str) -> Option<bool> {
        match self.entries.get(key)? {
            Value::Bool(b) => Some(*b),
            _ => None,
        }
    }

    /// An array of strings.
    pub fn strings(&self, key: &str) -> Option<Vec<&str>> {
        match self.entries.get(key)? {
            Value::Array(a) => a
                .iter()
                .map(|v| match v {
                    Value::String(s) => Some(s.as_str()),
                    _ => None,
                })
                .collect(),
            _ => None,
        }
    }

    /// An array of integers.
    pub fn ints(&self, key: &str) -> Option<Vec<i64>> {
        match self.entries.get(key)? {
            Value::Array(a) => a
                .iter()
                .map(|v| match v {
                    Value::I32(x) => Some(*x as i64),
                    Value::U32(x) => Some(*x as i64),
                    Value::I64(x) => Some(*x),
                    Value::U64(x) => i64::try_from(*x).ok(),
                    Value::I8(x) => Some(*x as i64),
                    Value::U8(x) => Some(*x as i64),
                    Value::I16(x) => Some(*x as i64),
                    Value::U16(x) => Some(*x as i64),
                    _ => None,
                })
                .collect(),
            _ => None,
        }
    }
}

/// A GGUF file converted to Hugging Face names, layout and config.
pub struct GgufCheckpoint {
    /// The config derived from the metadata.
    pub config: ModelConfig,
    /// The tensors under Hugging Face names, read from the file's memory map on demand.
    pub weights: GgufWeights,
    /// The metadata (tokenizer and the rest).
    pub metadata: GgufMetadata,
}

/// One tensor as stored in the file (or one expert's slice of a stacked tensor).
#[derive(Debug, Clone)]
struct Stored {
    /// Its name in the file.
    name: String,
    /// candle's type (for dequantisation).
    dtype: GgmlDType,
    /// ggml's type id.
    type_id: u32,
    /// Dimensions, outermost first (GGUF lists them innermost first).
    dims: Vec<usize>,
    /// Absolute offset of its first byte in the file.
    offset: usize,
    /// Its bytes.
    bytes: usize,
}

/// How a Hugging Face tensor is made from the file's.
#[derive(Debug, Clone)]
enum Recipe {
    /// A stored tensor, its rows (its only dimension for a bias) un-permuted for `heads` rotary
    /// heads when set.
    Tensor {
        stored: Stored,
        unpermute: Option<usize>,
    },
    /// `kv_b_proj` joined from llama.cpp's `attn_k_b` and `attn_v_b` (dequantised).
    JoinKvUp { key: Stored, value: Stored },
}

impl Recipe {
    fn shape(&self) -> Vec<usize> {
        match self {
            Recipe::Tensor { stored, .. } => stored.dims.clone(),
            Recipe::JoinKvUp { key, value } => {
                // [heads, rank, nope] and [heads, v, rank] -> [heads·(nope + v), rank].
                vec![key.dims[0] * (key.dims[2] + value.dims[1]), key.dims[1]]
            }
        }
    }
}

/// A tensor of a GGUF file as stored, for readers of the raw blocks: the bytes
/// `offset..offset + bytes` of [`GgufWeights::file_bytes`] hold it in ggml type `ggml_type`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GgufRawTensor {
    /// The tensor's name in the file.
    pub file_name: String,
    /// ggml's type id (`GGML_TYPE_*`: 0 F32, 1 F16, 2 Q4_0, …, 12 Q4_K, 14 Q6_K, 30 BF16).
    pub ggml_type: u32,
    /// The Hugging Face shape, outermost first (`[rows, cols]` for a matrix).
    pub shape: Vec<usize>,
    /// Offset of the tensor's first byte in the file.
    pub offset: usize,
    /// Bytes of the tensor.
    pub bytes: usize,
    /// Whether the Hugging Face rows are a permutation of the stored ones (llama.cpp's rotary
    /// order of q/k): row `r` of the Hugging Face tensor is stored row `row_order()[r]`.
    pub permuted_heads: Option<usize>,
}

impl GgufRawTensor {
    /// The stored row of each Hugging Face row (the identity unless `permuted_heads`).
    pub fn row_order(&self) -> Vec<usize> {
        let rows = self.shape.first().copied().unwrap_or(0);
        match self.permuted_heads {
            Some(h) => rotary_row_order(rows, h),
            None => (0..rows).collect(),
        }
    }
}

/// The tensors of a GGUF file under Hugging Face names, backed by its memory map.
pub struct GgufWeights {
    map: Arc<Mmap>,
    path: PathBuf,
    tensors: HashMap<String, Recipe>,
}

impl std::fmt::Debug for GgufWeights {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GgufWeights")
            .field("path", &self.path)
            .field("tensors", &self.tensors.len())
            .finish_non_exhaustive()
    }
}

/// Hugging Face row `r` of a `[heads, d]`-row q/k tensor is stored row `order[r]`:
/// llama.cpp's converter stores `[heads, 2, d/2]` as `[heads, d/2, 2]`.
fn rotary_row_order(rows: usize, heads: usize) -> Vec<usize> {
    let half = rows / heads.max(1) / 2;
    let mut order = Vec::with_capacity(rows);
    for h in 0..heads {
        for j in 0..2 {
            for i in 0..half {
                order.push(h * 2 * half + i * 2 + j);
            }
        }
    }
    order
}

impl GgufWeights {
    /// Whether a tensor of this (Hugging Face) name exists.
    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    /// Hugging Face names of all tensors (unsorted).
    pub fn names(&self) -> Vec<String> {
        self.tensors.keys().cloned().collect()
    }

    /// The file the tensors are mapped from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The whole mapped file.
    pub fn file_bytes(&self) -> &[u8] {
        &self.map[..]
    }

    fn recipe(&self, name: &str) -> Result<&Recipe> {
        self.tensors
            .get(name)
            .ok_or_else(|| ModelError::MissingTensor {
                name: name.to_string(),
            })
    }

    /// A tensor's Hugging Face shape.
    pub fn shape(&self, name: &str) -> Result<Vec<usize>> {
        Ok(self.recipe(name)?.shape())
    }

    /// The stored form of a tensor: its ggml type, shape and place in the file; `None` for a
    /// tensor made of several stored ones (a joined latent-attention `kv_b_proj`).
    pub fn raw(&self, name: &str) -> Result<Option<GgufRawTensor>> {
        Ok(match self.recipe(name)? {
            Recipe::Tensor { stored, unpermute } => Some(GgufRawTensor {
                file_name: stored.name.clone(),
                ggml_type: stored.type_id,
                shape: stored.dims.clone(),
                offset: stored.offset,
                bytes: stored.bytes,
                permuted_heads: *unpermute,
            }),
            Recipe::JoinKvUp { .. } => None,
        })
    }

    /// A matrix as stored, its blocks read in place from the memory map (q/k rows un-permuted
    /// into a copy of their blocks), when it is a 2-D tensor of a ggml type skymoe's kernels
    /// serve ([`GgmlType`]); `None` for other types (F32, F16, BF16, Q2_K, Q3_K, …) and for
    /// joined tensors, which [`GgufWeights::load`] dequantises.
    pub fn ggml_matrix(&self, name: &str) -> Result<Option<GgmlMatrix>> {
        let Recipe::Tensor { stored, unpermute } = self.recipe(name)? else {
            return Ok(None);
        };
        let (Some(ty), &[rows, cols]) = (GgmlType::from_id(stored.type_id), &stored.dims[..])
        else {
            return Ok(None);
        };
        let m = GgmlMatrix::new(ty, rows, cols, self.map.clone(), stored.offset)
            .map_err(|e| ModelError::corrupt(&self.path, format!("tensor {}: {e}", stored.name)))?;
        if m.storage_bytes() != stored.bytes {
            return Err(ModelError::corrupt(
                &self.path,
                format!(
                    "tensor {}: {} bytes for its type and shape, the directory says {}",
                    stored.name,
                    m.storage_bytes(),
                    stored.bytes
                ),
            ));
        }
        Ok(Some(match unpermute {
            None => m,
            Some(heads) => m
                .gather_rows(&rotary_row_order(rows, *heads))
                .ok_or_else(|| {
                    ModelError::corrupt(
                        &self.path,
                        format!("tensor {}: bad row order", stored.name),
                    )
                })?,
        }))
    }

    /// Dequantise one stored tensor (whole) to f32 in its stored layout.
    fn dequantize(&self, t: &Stored, device: &Device) -> Result<Tensor> {
        let bad = |e: String| ModelError::corrupt(&self.path, format!("tensor {}: {e}", t.name));
        let bytes = t
            .offset
            .checked_add(t.bytes)
            .and_then(|end| self.map.get(t.offset..end))
            .ok_or_else(|| bad("runs past the end of the file".into()))?;
        // candle views the bytes as blocks (f16 fields, f32s) in place: give it an aligned copy
        // of exactly the tensor's bytes.
        let mut aligned = vec![0u64; bytes.len().div_ceil(8)];
        // SAFETY: `aligned` holds at least `bytes.len()` bytes; u64 has no invalid bit patterns
        // and no padding, so viewing its storage as bytes is sound.
        let buf =
            unsafe { std::slice::from_raw_parts_mut(aligned.as_mut_ptr() as *mut u8, bytes.len()) };
        buf.copy_from_slice(bytes);
        let q = candle_core::quantized::ggml_file::qtensor_from_ggml(
            t.dtype,
            buf,
            t.dims.clone(),
            device,
        )
        .map_err(|e| bad(e.to_string().lines().next().unwrap_or_default().to_string()))?;
        q.dequantize(device).map_err(|e| bad(e.to_string()))
    }

    /// A tensor dequantised to f32 in Hugging Face layout.
    pub fn load(&self, name: &str, device: &Device) -> Result<Tensor> {
        match self.recipe(name)? {
            Recipe::Tensor { stored, unpermute } => {
                let t = self.dequantize(stored, device)?;
                match (unpermute, t.rank()) {
                    (None, _) => Ok(t),
                    (Some(h), 1) => Ok(unpermute_rotary(&t.unsqueeze(1)?, *h)?.squeeze(1)?),
                    (Some(h), _) => unpermute_rotary(&t, *h),
                }
            }
            Recipe::JoinKvUp { key, value } => join_kv_up(
                &self.dequantize(key, device)?,
                &self.dequantize(value, device)?,
            ),
        }
    }
}

/// The file's own tensors (names as in the file), while the config is read.
struct RawTensors<'a> {
    weights: &'a GgufWeights,
    stored: HashMap<String, Stored>,
}

impl RawTensors<'_> {
    fn contains_key(&self, name: &str) -> bool {
        self.stored.contains_key(name)
    }

    fn dims(&self, name: &str) -> Option<&[usize]> {
        self.stored.get(name).map(|t| t.dims.as_slice())
    }

    fn load(&self, name: &str) -> Option<Result<Tensor>> {
        let t = self.stored.get(name)?;
        Some(self.weights.dequantize(t, &Device::Cpu))
    }
}

/// Most dimensions of a tensor.
const MAX_TENSOR_DIMS: u32 = 4;
/// Deepest nesting of arrays in a metadata value.
const MAX_VALUE_DEPTH: usize = 8;
/// Most array elements in all the metadata together (vocabularies and merges hold a few
/// hundred thousand each); each costs a [`Value`] in memory whatever its size on disk.
const MAX_ARRAY_ELEMENTS: u64 = 1 << 23;
/// The alignment of the tensor data when `general.alignment` does not say.
const DEFAULT_ALIGNMENT: u64 = 32;

/// A bounded reader of the GGUF header: every length and count is checked against the bytes
/// left in the file before anything of that size is allocated.
struct HeaderReader<'a> {
    r: BufReader<&'a mut File>,
    path: &'a Path,
    pos: u64,
    len: u64,
    /// GGUF v1 writes lengths as u32, later versions as u64.
    v1: bool,
    /// Array elements read so far.
    elements: u64,
}

impl HeaderReader<'_> {
    fn bad(&self, reason: impl Into<String>) -> ModelError {
        ModelError::corrupt(self.path, reason.into())
    }

    fn remaining(&self) -> u64 {
        self.len.saturating_sub(self.pos)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N]> {
        if (N as u64) > self.remaining() {
            return Err(self.bad(format!(
                "the header runs past the end of the file (at byte {})",
                self.pos
            )));
        }
        let mut b = [0u8; N];
        self.r
            .read_exact(&mut b)
            .map_err(|e| ModelError::io(self.path, e))?;
        self.pos += N as u64;
        Ok(b)
    }

    fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(self.array()?))
    }

    fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(self.array()?))
    }

    /// A length or count (u32 in v1, u64 after).
    fn length(&mut self) -> Result<u64> {
        if self.v1 {
            Ok(self.u32()? as u64)
        } else {
            self.u64()
        }
    }

    fn string(&mut self) -> Result<String> {
        let n = self.length()?;
        if n > self.remaining() {
            return Err(self.bad(format!(
                "a string of {n} bytes at byte {} runs past the end of the file",
                self.pos
            )));
        }
        let mut v = vec![0u8; n as usize];
        self.r
            .read_exact(&mut v)
            .map_err(|e| ModelError::io(self.path, e))?;
        self.pos += n;
        // Writers are meant to leave strings unterminated; some add a NUL.
        while v.last() == Some(&0) {
            v.pop();
        }
        Ok(String::from_utf8_lossy(&v).into_owned())
    }

    /// The fewest bytes a value of this type takes in the file.
    fn min_size(&self, ty: u32) -> u64 {
        let len = if self.v1 { 4 } else { 8 };
        match ty {
            0 | 1 | 7 => 1,
            2 | 3 => 2,
            4..=6 => 4,
            10..=12 => 8,
            8 => len,
            _ => 4 + len,
        }
    }

    fn value(&mut self, ty: u32, depth: usize) -> Result<Value> {
        Ok(match ty {
            0 => Value::U8(self.array::<1>()?[0]),
            1 => Value::I8(self.array::<1>()?[0] as i8),
            2 => Value::U16(u16::from_le_bytes(self.array()?)),
            3 => Value::I16(i16::from_le_bytes(self.array()?)),
            4 => Value::U32(self.u32()?),
            5 => Value::I32(i32::from_le_bytes(self.array()?)),
            6 => Value::F32(f32::from_le_bytes(self.array()?)),
            7 => match self.array::<1>()?[0] {
                0 => Value::Bool(false),
                1 => Value::Bool(true),
                b => return Err(self.bad(format!("a boolean holds {b}"))),
            },
            8 => Value::String(self.string()?),
            9 => {
                if depth >= MAX_VALUE_DEPTH {
                    return Err(self.bad(format!(
                        "metadata arrays nest deeper than {MAX_VALUE_DEPTH}"
                    )));
                }
                let elem = self.u32()?;
                if elem > 12 {
                    return Err(self.bad(format!("unknown metadata value type {elem}")));
                }
                let n = self.length()?;
                let need = n.saturating_mul(self.min_size(elem));
                if need > self.remaining() {
                    return Err(self.bad(format!(
                        "an array of {n} elements needs at least {need} bytes, only {} remain",
                        self.remaining()
                    )));
                }
                self.elements = self.elements.saturating_add(n);
                if self.elements > MAX_ARRAY_ELEMENTS {
                    return Err(self.bad(format!(
                        "the metadata holds more than {MAX_ARRAY_ELEMENTS} array elements"
                    )));
                }
                let mut out = Vec::with_capacity(n as usize);
                for _ in 0..n {
                    out.push(self.value(elem, depth + 1)?);
                }
                Value::Array(out)
            }
            10 => Value::U64(self.u64()?),
            11 => Value::I64(i64::from_le_bytes(self.array()?)),
            12 => Value::F64(f64::from_le_bytes(self.array()?)),
            other => return Err(self.bad(format!("unknown metadata value type {other}"))),
        })
    }
}

/// The ggml tensor types candle dequantises, by their GGUF number (Q8_1 and Q8_K, which
/// candle names but does not read, and the IQ types are refused when the header is read).
fn ggml_dtype(n: u32) -> Option<GgmlDType> {
    Some(match n {
        0 => GgmlDType::F32,
        1 => GgmlDType::F16,
        2 => GgmlDType::Q4_0,
        3 => GgmlDType::Q4_1,
        6 => GgmlDType::Q5_0,
        7 => GgmlDType::Q5_1,
        8 => GgmlDType::Q8_0,
        10 => GgmlDType::Q2K,
        11 => GgmlDType::Q3K,
        12 => GgmlDType::Q4K,
        13 => GgmlDType::Q5K,
        14 => GgmlDType::Q6K,
        30 => GgmlDType::BF16,
        _ => return None,
    })
}

/// ggml's id of a type [`ggml_dtype`] reads.
fn ggml_type_id(t: GgmlDType) -> u32 {
    (0..=30)
        .find(|&n| ggml_dtype(n) == Some(t))
        .expect("every type read has an id")
}

/// Read the header of a GGUF file (metadata and tensor directory), checking every length,
/// count, shape and data range against the size of the file, so that a damaged or hostile
/// header is an error before anything of the size it claims is allocated.
fn read_content(file: &mut File, path: &Path, with_tensors: bool) -> Result<Content> {
    let len = file
        .seek(SeekFrom::End(0))
        .and_then(|len| file.seek(SeekFrom::Start(0)).map(|_| len))
        .map_err(|e| ModelError::io(path, e))?;
    let mut h = HeaderReader {
        r: BufReader::new(file),
        path,
        pos: 0,
        len,
        v1: false,
        elements: 0,
    };
    let magic = h.u32()?;
    if magic != 0x4655_4747 && magic != 0x4747_5546 {
        return Err(h.bad(format!("not a GGUF file (magic 0x{magic:08x})")));
    }
    let version = h.u32()?;
    let magic = match version {
        1 => VersionedMagic::GgufV1,
        2 => VersionedMagic::GgufV2,
        3 => VersionedMagic::GgufV3,
        v => return Err(h.bad(format!("unsupported GGUF version {v}"))),
    };
    h.v1 = version == 1;
    let tensor_count = h.length()?;
    let kv_count = h.length()?;
    // A metadata entry takes at least a key length, a type and one byte; a tensor entry a
    // name length, a dimension count, a type and an offset.
    let prefix = if h.v1 { 4 } else { 8 };
    let need = kv_count
        .saturating_mul(prefix + 5)
        .saturating_add(tensor_count.saturating_mul(prefix + 16));
    if need > h.remaining() {
        return Err(h.bad(format!(
            "the header declares {tensor_count} tensors and {kv_count} metadata entries, \
             which need at least {need} bytes; only {} remain",
            h.remaining()
        )));
    }
    let mut metadata = HashMap::new();
    for _ in 0..kv_count {
        let key = h.string()?;
        let ty = h.u32()?;
        let value = h.value(ty, 0)?;
        metadata.insert(key, value);
    }
    let mut tensor_infos = HashMap::new();
    if !with_tensors {
        return Ok(Content {
            magic,
            metadata,
            tensor_infos,
            tensor_data_offset: 0,
        });
    }
    for _ in 0..tensor_count {
        let name = h.string()?;
        let n_dims = h.u32()?;
        if n_dims > MAX_TENSOR_DIMS {
            return Err(h.bad(format!(
                "tensor {name} has {n_dims} dimensions; at most {MAX_TENSOR_DIMS} are allowed"
            )));
        }
        let mut dims = Vec::with_capacity(n_dims as usize);
        for _ in 0..n_dims {
            let d = if h.v1 { h.u32()? as u64 } else { h.u64()? };
            dims.push(
                usize::try_from(d)
                    .map_err(|_| h.bad(format!("tensor {name} has a dimension of {d} elements")))?,
            );
        }
        // GGUF lists dimensions innermost first.
        dims.reverse();
        let ty = h.u32()?;
        let dtype = ggml_dtype(ty).ok_or_else(|| {
            h.bad(format!(
                "tensor {name} has ggml type {ty}, which skymoe cannot read (supported: F32=0, \
                 F16=1, Q4_0=2, Q4_1=3, Q5_0=6, Q5_1=7, Q8_0=8, Q2_K=10, Q3_K=11, Q4_K=12, \
                 Q5_K=13, Q6_K=14, BF16=30)"
            ))
        })?;
        let offset = h.u64()?;
        tensor_infos.insert(
            name,
            TensorInfo {
                ggml_dtype: dtype,
                shape: candle_core::Shape::from(dims),
                offset,
            },
        );
    }
    let alignment = match metadata.get("general.alignment") {
        None => DEFAULT_ALIGNMENT,
        Some(v) => match GgufMetadata::uint_value(v) {
            Some(a) if a > 0 => a,
            _ => return Err(h.bad("general.alignment is not a positive integer")),
        },
    };
    let tensor_data_offset = h
        .pos
        .div_ceil(alignment)
        .checked_mul(alignment)
        .ok_or_else(|| h.bad(format!("general.alignment {alignment} is too large")))?;
    for (name, t) in &tensor_infos {
        let dims = t.shape.dims();
        let elements = dims
            .iter()
            .try_fold(1usize, |n, &d| n.checked_mul(d))
            .ok_or_else(|| h.bad(format!("tensor {name}: the shape {dims:?} overflows")))?;
        // candle views an empty tensor's (dangling, unaligned) buffer as blocks, which is
        // undefined behaviour; no model has an empty weight.
        if elements == 0 {
            return Err(h.bad(format!("tensor {name} has no elements (shape {dims:?})")));
        }
        let block = t.ggml_dtype.block_size();
        // ggml quantises each row (the innermost dimension) in whole blocks.
        let row = dims.last().copied().unwrap_or(1);
        if !row.is_multiple_of(block) {
            return Err(h.bad(format!(
                "tensor {name} ({dims:?}, {:?}): its rows of {row} elements are not a whole \
                 number of blocks of {block}",
                t.ggml_dtype
            )));
        }
        let bytes = (elements / block)
            .checked_mul(t.ggml_dtype.type_size())
            .map(|b| b as u64);
        let fits = bytes
            .and_then(|b| tensor_data_offset.checked_add(t.offset)?.checked_add(b))
            .is_some_and(|end| end <= len);
        if !fits {
            return Err(h.bad(format!(
                "tensor {name} ({dims:?}, {:?}) at data offset {} runs past the end of the \
                 file ({len} bytes)",
                t.ggml_dtype, t.offset
            )));
        }
    }
    Ok(Content {
        magic,
        metadata,
        tensor_infos,
        tensor_data_offset,
    })
}

impl GgufMetadata {
    /// Read only the metadata of a GGUF file (no tensor directory, no tensor data).
    pub fn read(path: &Path) -> Result<Self> {
        let mut file = File::open(path).map_err(|e| ModelError::io(path, e))?;
        let content = read_content(&mut file, path, false)?;
        Ok(GgufMetadata {
            entries: content.metadata,
        })
    }

    fn uint_value(v: &Value) -> Option<u64> {
        match v {
            Value::U8(x) => Some(*x as u64),
            Value::U16(x) => Some(*x as u64),
            Value::U32(x) => Some(*x as u64),
            Value::U64(x) => Some(*x),
            Value::I8(x) => u64::try_from(*x).ok(),
            Value::I16(x) => u64::try_from(*x).ok(),
            Value::I32(x) => u64::try_from(*x).ok(),
            Value::I64(x) => u64::try_from(*x).ok(),
            _ => None,
        }
    }
}

impl GgufCheckpoint {
    /// Read a GGUF file's header, map the file, and put its tensors under Hugging Face names
    /// and layout (nothing is dequantised yet: see [`GgufWeights`]).
    pub fn open(path: &Path, _device: &Device) -> Result<Self> {
        let mut file = File::open(path).map_err(|e| ModelError::io(path, e))?;
        let content = read_content(&mut file, path, true)?;
        let metadata = GgufMetadata {
            entries: content.metadata,
        };
        let arch = metadata
            .string("general.architecture")
            .ok_or_else(|| ModelError::corrupt(path, "no general.architecture in the metadata"))?
            .to_string();
        let with_experts = metadata
            .uint(&format!("{arch}.expert_count"))
            .is_some_and(|n| n > 0);
        let (family, form) = families::for_gguf(&arch, with_experts)
            .and_then(|a| Some((a, a.family().gguf()?)))
            .ok_or_else(|| ModelError::UnsupportedArchitecture {
                found: format!("GGUF general.architecture={arch:?}"),
            })?;
        let map = super::map_weights(&file).map_err(|e| ModelError::io(path, e))?;
        let mut weights = GgufWeights {
            map: Arc::new(map),
            path: path.to_path_buf(),
            tensors: HashMap::new(),
        };
        let file_len = weights.map.len();
        let mut stored = HashMap::new();
        for (name, info) in content.tensor_infos {
            let dims = info.shape.dims().to_vec();
            let elements: usize = dims.iter().product();
            // `read_content` checked that the tensor is whole blocks and ends in the file.
            let bytes = elements / info.ggml_dtype.block_size() * info.ggml_dtype.type_size();
            let offset = usize::try_from(content.tensor_data_offset + info.offset)
                .ok()
                .filter(|o| o.checked_add(bytes).is_some_and(|end| end <= file_len))
                .ok_or_else(|| {
                    ModelError::corrupt(
                        path,
                        format!("tensor {name} runs past the end of the file"),
                    )
                })?;
            let type_id = ggml_type_id(info.ggml_dtype);
            stored.insert(
                name.clone(),
                Stored {
                    name,
                    dtype: info.ggml_dtype,
                    type_id,
                    dims,
                    offset,
                    bytes,
                },
            );
        }
        let raw = RawTensors {
            weights: &weights,
            stored,
        };
        let config = config_from_metadata(family, form, &metadata, &raw, path)?;
        let stored = raw.stored;
        weights.tensors = to_hf_layout(&config, form, stored)?;
        Ok(GgufCheckpoint {
            config,
            weights,
            metadata,
        })
    }
}

/// The shared part of the config (`{arch}.` keys every family has), then the family's own.
fn config_from_metadata(
    family: Architecture,
    form: GgufForm,
    m: &GgufMetadata,
    raw: &RawTensors<'_>,
    path: &Path,
) -> Result<ModelConfig> {
    let origin: PathBuf = path.to_path_buf();
    let keys = GgufKeys {
        metadata: m,
        architecture: form.architecture,
        origin: path,
    };
    let need = |key: &str| -> Result<usize> {
        keys.uint(key)
            .filter(|&x| x > 0)
            .map(|x| x as usize)
            .ok_or_else(|| {
                ModelError::config(&origin, format!("GGUF metadata lacks {}", keys.key(key)))
            })
    };
    let hidden_size = need("embedding_length")?;
    let num_hidden_layers = need("block_count")?;
    if num_hidden_layers > MAX_HIDDEN_LAYERS {
        return Err(ModelError::config(
            &origin,
            format!(
                "{} ({num_hidden_layers}) is above {MAX_HIDDEN_LAYERS}",
                keys.key("block_count")
            ),
        ));
    }
    let num_attention_heads = need("attention.head_count")?;
    let num_key_value_heads = need("attention.head_count_kv").unwrap_or(num_attention_heads);
    let feed_forward = need("feed_forward_length")?;
    let head_dim = keys
        .uint("attention.key_length")
        .map(|x| x as usize)
        .unwrap_or(hidden_size / num_attention_heads.max(1));
    let vocab_size = match keys.uint("vocab_size") {
        Some(v) => v as usize,
        None => match m.strings("tokenizer.ggml.tokens") {
            Some(t) => t.len(),
            None => raw
                .dims("token_embd.weight")
                .and_then(|d| d.first().copied())
                .ok_or_else(|| ModelError::MissingTensor {
                    name: "token_embd.weight".into(),
                })?,
        },
    };
    let max_position_embeddings = keys.uint("context_length").unwrap_or(4096) as usize;
    let mut config = ModelConfig {
        architecture: family,
        vocab_size,
        hidden_size,
        intermediate_size: feed_forward,
        num_hidden_layers,
        num_attention_heads,
        num_key_value_heads,
        head_dim,
        rms_norm_eps: keys
            .float("attention.layer_norm_rms_epsilon")
            .unwrap_or(1e-5),
        rope_theta: keys.float("rope.freq_base").unwrap_or(10000.0),
        max_position_embeddings,
        rope_scaling: RopeScaling::Default,
        tie_word_embeddings: !raw.contains_key("output.weight"),
        qkv_bias: raw.contains_key("blk.0.attn_q.bias"),
        o_bias: raw.contains_key("blk.0.attn_output.bias"),
        qk_norm: crate::config::QkNorm::None,
        clip_qkv: None,
        mla: None,
        moe: None,
        mtp_layers: 0,
        bos_token_id: m.uint("tokenizer.ggml.bos_token_id").map(|x| x as u32),
        eos_token_ids: m
            .uint("tokenizer.ggml.eos_token_id")
            .map(|x| vec![x as u32])
            .unwrap_or_default(),
    };
    family.family().read_gguf_config(&keys, &mut config)?;
    // Layers without a router are dense (llama.cpp's form of `mlp_only_layers`).
    if let Some(m) = config.moe.as_mut() {
        for (l, moe) in m.moe_layers.iter_mut().enumerate() {
            *moe = raw.contains_key(&format!("blk.{l}.ffn_gate_inp.weight"));
        }
    }
    if num_key_value_heads == 0 || num_attention_heads % num_key_value_heads != 0 {
        return Err(ModelError::config(
            &origin,
            "attention.head_count must be a multiple of head_count_kv",
        ));
    }
    config.rope_scaling =
        rope_scaling_from_metadata(m, form.architecture, raw, &origin, max_position_embeddings)?;
    Ok(config)
}

/// The rotary scaling llama.cpp's converter writes: `{arch}.rope.scaling.type` (`none`,
/// `linear`, `yarn`) with `{arch}.rope.scaling.factor` and, for YaRN,
/// `{arch}.rope.scaling.original_context_length` (defaulting to `{arch}.context_length`, as
/// transformers defaults it to `max_position_embeddings`), the optional
/// `{arch}.rope.scaling.attn_factor` (a multiplier on YaRN's attention factor) and
/// `{arch}.rope.scaling.yarn_beta_fast`/`yarn_beta_slow`; also the older
/// `{arch}.rope.scale_linear`, and DeepSeek's `{arch}.rope.scaling.yarn_log_multiplier`
/// (0.1·`mscale_all_dim`, with `mscale` equal to it). Llama 3.1 files carry their scaling as per-frequency divisors in
/// a `rope_freqs.weight` tensor instead; those are refused unless all ones (no scaling).
fn rope_scaling_from_metadata(
    m: &GgufMetadata,
    arch: &str,
    raw: &RawTensors<'_>,
    origin: &Path,
    context_length: usize,
) -> Result<RopeScaling> {
    if let Some(t) = raw.load("rope_freqs.weight") {
        let ones = t?
            .flatten_all()
            .and_then(|f| f.to_vec1::<f32>())
            .map(|v| v.iter().all(|&x| x == 1.0))
            .unwrap_or(false);
        if !ones {
            return Err(ModelError::config(
                origin,
                "the GGUF file scales its rotary embedding with a `rope_freqs.weight` tensor                  (llama.cpp's form of Llama 3.1 `llama3` scaling), which skymoe does not read;                  load the Hugging Face checkpoint (config.json with `rope_scaling`) instead",
            ));
        }
    }
    let factor = |key: &str| -> Result<f64> {
        m.float(key)
            .filter(|f| f.is_finite() && *f > 0.0)
            .ok_or_else(|| {
                ModelError::config(
                    origin,
                    format!("GGUF metadata lacks a positive `{key}` for its rope scaling"),
                )
            })
    };
    let key = |k: &str| format!("{arch}.{k}");
    let kind = m.string(&key("rope.scaling.type"));
    match kind {
        None | Some("none") => match m.float(&key("rope.scale_linear")) {
            Some(f) if f != 1.0 => Ok(RopeScaling::Linear {
                factor: factor(&key("rope.scale_linear"))?,
            }),
            _ => Ok(RopeScaling::Default),
        },
        Some("linear") => Ok(RopeScaling::Linear {
            factor: factor(&key("rope.scaling.factor"))?,
        }),
        Some("yarn") => {
            let factor = factor(&key("rope.scaling.factor"))?;
            let original = m
                .uint(&key("rope.scaling.original_context_length"))
                .filter(|&n| n > 0)
                .map_or(context_length, |n| n as usize);
            // llama.cpp multiplies its attention factor `0.1·ln(factor) + 1` by attn_factor.
            let attention_factor = m
                .float(&key("rope.scaling.attn_factor"))
                .filter(|&a| a != 1.0)
                .map(|a| {
                    a * if factor > 1.0 {
                        0.1 * factor.ln() + 1.0
                    } else {
                        1.0
                    }
                });
            let log_mul = m
                .float(&key("rope.scaling.yarn_log_multiplier"))
                .filter(|&l| l != 0.0);
            Ok(RopeScaling::Yarn {
                factor,
                original_max_position_embeddings: original,
                beta_fast: m.float(&key("rope.scaling.yarn_beta_fast")).unwrap_or(32.0),
                beta_slow: m.float(&key("rope.scaling.yarn_beta_slow")).unwrap_or(1.0),
                // DeepSeek's `mscale` = `mscale_all_dim`, stored as 0.1·mscale_all_dim.
                mscale: log_mul.map(|l| l / 0.1),
                mscale_all_dim: log_mul.map(|l| l / 0.1),
                attention_factor: if log_mul.is_some() {
                    None
                } else {
                    attention_factor
                },
                truncate: true,
            })
        }
        Some(other) => Err(ModelError::config(
            origin,
            format!("GGUF `{arch}.rope.scaling.type` is `{other}`; supported: none, linear, yarn"),
        )),
    }
}

/// Undo llama.cpp's rotary permutation of q/k rows (`[heads, 2, d/2] -> [heads, d/2, 2]`).
fn unpermute_rotary(t: &Tensor, heads: usize) -> Result<Tensor> {
    let (rows, cols) = t.dims2()?;
    if heads == 0 || heads > rows || rows % (2 * heads) != 0 {
        return Err(ModelError::InvalidInput(format!(
            "cannot un-permute a [{rows}, {cols}] q/k weight for {heads} heads"
        )));
    }
    let half = rows / heads / 2;
    Ok(t.reshape((heads, half, 2, cols))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape((rows, cols))?)
}

/// Hugging Face names and layout of llama.cpp's tensors: llama.cpp's names of the shared parts
/// are mapped to the names the model's family gives them; q/k rows are to be un-permuted when
/// the family's converter permuted them, and stacked experts are split (each expert a slice of
/// the stack). Shapes are checked here, so reading a tensor later cannot fail on them.
fn to_hf_layout(
    cfg: &ModelConfig,
    form: GgufForm,
    raw: HashMap<String, Stored>,
) -> Result<HashMap<String, Recipe>> {
    let qk = |t: Stored, heads: usize| -> Result<Recipe> {
        if !form.permuted_qk {
            return Ok(Recipe::Tensor {
                stored: t,
                unpermute: None,
            });
        }
        let rows = t.dims.first().copied().unwrap_or(0);
        let cols = t.dims.get(1).copied().unwrap_or(1);
        if t.dims.len() > 2 || heads == 0 || heads > rows || rows % (2 * heads) != 0 {
            return Err(ModelError::InvalidInput(format!(
                "cannot un-permute a {:?} q/k tensor {} for {heads} heads ([{rows}, {cols}])",
                t.dims, t.name
            )));
        }
        Ok(Recipe::Tensor {
            stored: t,
            unpermute: Some(heads),
        })
    };
    let plain = |t: Stored| Recipe::Tensor {
        stored: t,
        unpermute: None,
    };
    let mut out = HashMap::new();
    // llama.cpp's newer DeepSeek files split each layer's `kv_b_proj` into `attn_k_b` (each
    // head's key rows, transposed) and `attn_v_b`: (is the key part, tensor) per layer.
    let mut split_kv_up: HashMap<usize, Vec<(bool, Stored)>> = HashMap::new();
    for (name, t) in raw {
        let hf = match name.as_str() {
            "token_embd.weight" => names::EMBED.to_string(),
            "output_norm.weight" => names::FINAL_NORM.to_string(),
            "output.weight" => names::LM_HEAD.to_string(),
            _ => {
                let Some(rest) = name.strip_prefix("blk.") else {
                    tracing::debug!("ignoring GGUF tensor {name}");
                    continue;
                };
                let Some((layer, tail)) = rest.split_once('.') else {
                    continue;
                };
                let Ok(l) = layer.parse::<usize>() else {
                    tracing::debug!("ignoring GGUF tensor {name}");
                    continue;
                };
                let p = |s: &str| names::layer(l, s);
                match tail {
                    "attn_norm.weight" => p("input_layernorm.weight"),
                    "ffn_norm.weight" => p("post_attention_layernorm.weight"),
                    "attn_q.weight" | "attn_k.weight" | "attn_q.bias" | "attn_k.bias" => {
                        let (heads, proj) = if tail.starts_with("attn_q") {
                            (cfg.num_attention_heads, "q_proj")
                        } else {
                            (cfg.num_key_value_heads, "k_proj")
                        };
                        let kind = if tail.ends_with("bias") {
                            "bias"
                        } else {
                            "weight"
                        };
                        if kind == "bias" && t.dims.len() != 1 {
                            return Err(ModelError::InvalidInput(format!(
                                "GGUF tensor {name} is {:?}, not a vector",
                                t.dims
                            )));
                        }
                        out.insert(p(&format!("self_attn.{proj}.{kind}")), qk(t, heads)?);
                        continue;
                    }
                    "attn_q_a.weight" => names::mla(l).q_a_proj,
                    "attn_q_a_norm.weight" => names::mla(l).q_a_norm,
                    "attn_q_b.weight" => names::mla(l).q_b_proj,
                    "attn_kv_a_mqa.weight" => names::mla(l).kv_a_proj,
                    "attn_kv_a_norm.weight" => names::mla(l).kv_a_norm,
                    "attn_kv_b.weight" => names::mla(l).kv_b_proj,
                    "attn_k_b.weight" | "attn_v_b.weight" => {
                        split_kv_up
                            .entry(l)
                            .or_default()
                            .push((tail == "attn_k_b.weight", t));
                        continue;
                    }
                    "exp_probs_b.bias" => {
                        crate::layers::router::selection_bias_name(&cfg.moe_names(l).gate)
                    }
                    "ffn_gate_shexp.weight" | "ffn_up_shexp.weight" | "ffn_down_shexp.weight" => {
                        let Some(shared) = cfg.moe_names(l).shared else {
                            tracing::debug!("ignoring GGUF tensor {name}");
                            continue;
                        };
                        match tail {
                            "ffn_gate_shexp.weight" => shared.ffn.gate,
                            "ffn_up_shexp.weight" => shared.ffn.up,
                            _ => shared.ffn.down,
                        }
                    }
                    "attn_q_norm.weight" => names::q_norm(l),
                    "attn_k_norm.weight" => names::k_norm(l),
                    "attn_v.weight" => p("self_attn.v_proj.weight"),
                    "attn_v.bias" => p("self_attn.v_proj.bias"),
                    "attn_output.weight" => p("self_attn.o_proj.weight"),
                    "attn_output.bias" => p("self_attn.o_proj.bias"),
                    "ffn_gate.weight" => cfg.dense_ffn_names(l).gate,
                    "ffn_up.weight" => cfg.dense_ffn_names(l).up,
                    "ffn_down.weight" => cfg.dense_ffn_names(l).down,
                    "ffn_gate_inp.weight" => cfg.moe_names(l).gate,
                    "ffn_gate_exps.weight" | "ffn_up_exps.weight" | "ffn_down_exps.weight" => {
                        let n = t.dims.first().copied().unwrap_or(0);
                        let experts = cfg.moe.as_ref().map_or(0, |m| m.num_experts);
                        if n != experts || t.dims.len() != 3 {
                            return Err(ModelError::InvalidInput(format!(
                                "GGUF tensor {name} ({:?}) stacks {n} experts but \
                                 {}.expert_count is {experts}",
                                t.dims, form.architecture
                            )));
                        }
                        // Each expert's rows are whole rows of blocks, one after the other.
                        let each = t.bytes / n;
                        for (e, en) in cfg.moe_names(l).experts.into_iter().enumerate() {
                            let hf = match tail {
                                "ffn_gate_exps.weight" => en.gate,
                                "ffn_up_exps.weight" => en.up,
                                _ => en.down,
                            };
                            let slice = Stored {
                                name: format!("{name}[{e}]"),
                                dims: t.dims[1..].to_vec(),
                                offset: t.offset + e * each,
                                bytes: each,
                                ..t.clone()
                            };
                            out.insert(hf, plain(slice));
                        }
                        continue;
                    }
                    _ => {
                        tracing::debug!("ignoring GGUF tensor {name}");
                        continue;
                    }
                }
            }
        };
        out.insert(hf, plain(t));
    }
    for (l, parts) in split_kv_up {
        let key = parts.iter().find(|(k, _)| *k).map(|(_, t)| t);
        let value = parts.iter().find(|(k, _)| !*k).map(|(_, t)| t);
        let (Some(key), Some(value)) = (key, value) else {
            return Err(ModelError::InvalidInput(format!(
                "GGUF layer {l} has only one of attn_k_b and attn_v_b (latent attention needs both)"
            )));
        };
        let (kd, vd) = (&key.dims, &value.dims);
        if kd.len() != 3 || vd.len() != 3 || kd[0] != vd[0] || kd[1] != vd[2] {
            return Err(ModelError::InvalidInput(format!(
                "GGUF attn_k_b {kd:?} and attn_v_b {vd:?} disagree in heads or latent rank"
            )));
        }
        out.insert(
            names::mla(l).kv_b_proj,
            Recipe::JoinKvUp {
                key: key.clone(),
                value: value.clone(),
            },
        );
    }
    Ok(out)
}

/// `kv_b_proj` `[heads·(nope + v), rank]` from llama.cpp's `attn_k_b` `[heads, rank, nope]`
/// (each head's key rows, transposed) and `attn_v_b` `[heads, v, rank]`.
fn join_kv_up(key: &Tensor, value: &Tensor) -> Result<Tensor> {
    let (kh, rank, nope) = key.dims3()?;
    let (vh, v, vr) = value.dims3()?;
    if kh != vh || rank != vr {
        return Err(ModelError::InvalidInput(format!(
            "GGUF attn_k_b {:?} and attn_v_b {:?} disagree in heads or latent rank",
            key.dims(),
            value.dims()
        )));
    }
    let joined = Tensor::cat(&[&key.transpose(1, 2)?.contiguous()?, value], 1)?;
    Ok(joined.reshape((kh * (nope + v), rank))?)
}

#[cfg(test)]
mod tests {
    //! Malformed headers found by fuzzing (and their neighbours): each must be an error, never
    //! a panic, a hang or an allocation of the size the header claims.
    use super::*;

    enum V<'a> {
        U32(u32),
        U64(u64),
        Str(&'a str),
    }

    /// A GGUF v3 file: metadata entries, then tensors `(name, dims innermost first, ggml
    /// type, offset)`, then `data` at the default alignment.
    fn gguf(kv: &[(&str, V<'_>)], tensors: &[(&str, &[u64], u32, u64)], data: &[u8]) -> Vec<u8> {
        fn string(out: &mut Vec<u8>, s: &str) {
            out.extend_from_slice(&(s.len() as u64).to_le_bytes());
            out.extend_from_slice(s.as_bytes());
        }
        let mut out = b"GGUF".to_vec();
        out.extend_from_slice(&3u32.to_le_bytes());
        out.extend_from_slice(&(tensors.len() as u64).to_le_bytes());
        out.extend_from_slice(&(kv.len() as u64).to_le_bytes());
        for (k, v) in kv {
            string(&mut out, k);
            match v {
                V::U32(x) => {
                    out.extend_from_slice(&4u32.to_le_bytes());
                    out.extend_from_slice(&x.to_le_bytes());
                }
                V::U64(x) => {
                    out.extend_from_slice(&10u32.to_le_bytes());
                    out.extend_from_slice(&x.to_le_bytes());
                }
                V::Str(s) => {
                    out.extend_from_slice(&8u32.to_le_bytes());
                    string(&mut out, s);
                }
            }
        }
        for (name, dims, ty, offset) in tensors {
            string(&mut out, name);
            out.extend_from_slice(&(dims.len() as u32).to_le_bytes());
            for d in *dims {
                out.extend_from_slice(&d.to_le_bytes());
            }
            out.extend_from_slice(&ty.to_le_bytes());
            out.extend_from_slice(&offset.to_le_bytes());
        }
        while !out.len().is_multiple_of(32) {
            out.push(0);
        }
        out.extend_from_slice(data);
        out
    }

    fn llama<'a>(extra: Vec<(&'a str, V<'a>)>) -> Vec<(&'a str, V<'a>)> {
        let mut kv = vec![
            ("general.architecture", V::Str("llama")),
            ("llama.embedding_length", V::U32(8)),
            ("llama.block_count", V::U32(1)),
            ("llama.attention.head_count", V::U32(2)),
            ("llama.feed_forward_length", V::U32(16)),
        ];
        kv.extend(extra);
        kv
    }

    fn open(bytes: &[u8]) -> Result<GgufCheckpoint> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("model.gguf");
        std::fs::write(&path, bytes).unwrap();
        GgufCheckpoint::open(&path, &Device::Cpu)
    }

    fn open_err(bytes: &[u8]) -> String {
        match open(bytes) {
            Ok(_) => panic!("a malformed file was accepted"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn a_well_formed_file_opens() {
        let kv = llama(vec![("llama.vocab_size", V::U32(4))]);
        let data: Vec<u8> = (0..8u32).flat_map(|i| (i as f32).to_le_bytes()).collect();
        let ck = open(&gguf(&kv, &[("output_norm.weight", &[8], 0, 0)], &data)).unwrap();
        assert_eq!(ck.config.num_hidden_layers, 1);
        assert_eq!(ck.weights.shape("model.norm.weight").unwrap(), [8]);
        let t = ck.weights.load("model.norm.weight", &Device::Cpu).unwrap();
        assert_eq!(t.to_vec1::<f32>().unwrap()[7], 7.0);
    }

    #[test]
    fn zero_alignment_is_an_error() {
        // candle divides by the alignment.
        let kv = llama(vec![("general.alignment", V::U32(0))]);
        assert!(open_err(&gguf(&kv, &[], &[])).contains("general.alignment"));
    }

    #[test]
    fn an_empty_tensor_is_an_error() {
        // candle views an empty buffer's dangling pointer as f32s (undefined behaviour).
        let kv = llama(vec![]);
        let e = open_err(&gguf(&kv, &[("output_norm.weight", &[0], 0, 0)], &[]));
        assert!(e.contains("no elements"), "{e}");
    }

    #[test]
    fn shapes_that_overflow_or_outgrow_the_file_are_errors() {
        let kv = llama(vec![]);
        let huge = 1u64 << 40;
        let e = open_err(&gguf(&kv, &[("t", &[huge, huge, huge], 0, 0)], &[]));
        assert!(e.contains("overflows"), "{e}");
        let e = open_err(&gguf(&kv, &[("t", &[huge], 0, 0)], &[0; 64]));
        assert!(e.contains("past the end"), "{e}");
        let e = open_err(&gguf(&kv, &[("t", &[4], 0, u64::MAX - 8)], &[0; 64]));
        assert!(e.contains("past the end"), "{e}");
    }

    #[test]
    fn lengths_past_the_end_are_errors_before_allocation() {
        let mut bytes = gguf(&llama(vec![]), &[], &[]);
        // The first key's length: a string of 2^62 bytes.
        bytes[24..32].copy_from_slice(&(1u64 << 62).to_le_bytes());
        assert!(open_err(&bytes).contains("past the end"));
        let mut bytes = gguf(&[], &[], &[]);
        bytes[8..16].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(open_err(&bytes).contains("declares"));
    }

    #[test]
    fn a_huge_block_count_is_an_error() {
        // `vec![true; block_count]` for the MoE layer table.
        let kv = llama(vec![
            ("llama.block_count", V::U64(1 << 40)),
            ("llama.expert_count", V::U32(2)),
            ("llama.vocab_size", V::U32(4)),
        ]);
        assert!(open_err(&gguf(&kv, &[], &[])).contains("block_count"));
    }

    #[test]
    fn a_huge_expert_count_is_an_error() {
        // Found by fuzzing a deepseek2 file: the names of every expert were built first.
        let kv = llama(vec![
            ("llama.expert_count", V::U64(1 << 40)),
            ("llama.vocab_size", V::U32(4)),
        ]);
        assert!(open_err(&gguf(&kv, &[], &[])).contains("expert_count"));
    }

    #[test]
    fn stacked_experts_must_match_the_expert_count() {
        // Splitting a [2^20, 1, 1] stack made a million tensors.
        let kv = llama(vec![
            ("llama.expert_count", V::U32(2)),
            ("llama.vocab_size", V::U32(4)),
        ]);
        let n = 1u64 << 20;
        let data = vec![0u8; 4 << 20];
        let e = open_err(&gguf(
            &kv,
            &[("blk.0.ffn_up_exps.weight", &[1, 1, n], 0, 0)],
            &data,
        ));
        assert!(e.contains("expert_count"), "{e}");
    }

    #[test]
    fn a_scalar_embedding_is_an_error() {
        let kv = llama(vec![]);
        let e = open_err(&gguf(&kv, &[("token_embd.weight", &[], 0, 0)], &[0; 4]));
        assert!(e.contains("token_embd"), "{e}");
    }
    /// `rows` Q8_0 rows of `cols` weights: scale 1/64, values varying by row and column.
    fn q8_0(rows: usize, cols: usize) -> Vec<u8> {
        let mut out = Vec::new();
        for r in 0..rows {
            for b in 0..cols / 32 {
                out.extend_from_slice(&half::f16::from_f32(1.0 / 64.0).to_bits().to_le_bytes());
                out.extend((0..32).map(|j| ((r * 31 + b * 7 + j * 3) % 255) as u8));
            }
        }
        out
    }

    #[test]
    fn rows_that_are_not_whole_blocks_are_errors() {
        // 96 weights are three Q8_0 blocks, but rows of 48 are not whole blocks.
        let kv = llama(vec![("llama.vocab_size", V::U32(4))]);
        let e = open_err(&gguf(&kv, &[("output.weight", &[48, 2], 8, 0)], &[0; 102]));
        assert!(e.contains("not a whole number of blocks"), "{e}");
    }

    #[test]
    fn a_file_truncated_mid_tensor_is_an_error() {
        let kv = llama(vec![("llama.vocab_size", V::U32(4))]);
        let data = q8_0(4, 32);
        let e = open_err(&gguf(
            &kv,
            &[("output.weight", &[32, 4], 8, 0)],
            &data[..100],
        ));
        assert!(e.contains("past the end"), "{e}");
    }

    #[test]
    fn unknown_ggml_types_are_refused() {
        let kv = llama(vec![("llama.vocab_size", V::U32(4))]);
        // Q8_1 (candle names it, cannot read it), IQ2_XXS, and no type at all.
        for ty in [9u32, 16, 99] {
            let e = open_err(&gguf(
                &kv,
                &[("output.weight", &[256, 1], ty, 0)],
                &[0; 512],
            ));
            assert!(
                e.contains(&format!("ggml type {ty}, which skymoe cannot read")),
                "{e}"
            );
        }
    }

    #[test]
    fn stored_matrices_are_ggml_blocks_and_others_dequantise() {
        let kv = llama(vec![("llama.vocab_size", V::U32(4))]);
        // q: 2 heads of 4 rows (rotary-permuted by llama.cpp), 32 columns, Q8_0;
        // output: Q2_K (served dequantised), 4 rows of 256 zeros.
        let q = q8_0(8, 32);
        let mut data = q.clone();
        data.resize(288, 0);
        data.extend_from_slice(&[0u8; 4 * 84]);
        let ck = open(&gguf(
            &kv,
            &[
                ("blk.0.attn_q.weight", &[32, 8], 8, 0),
                ("output.weight", &[256, 4], 10, 288),
            ],
            &data,
        ))
        .unwrap();
        let w = &ck.weights;
        let name = "model.layers.0.self_attn.q_proj.weight";
        let m = w.ggml_matrix(name).unwrap().unwrap();
        assert_eq!((m.ty(), m.rows(), m.cols()), (GgmlType::Q8_0, 8, 32));
        let raw = w.raw(name).unwrap().unwrap();
        assert_eq!(
            (raw.ggml_type, raw.bytes, raw.permuted_heads),
            (8, 272, Some(2))
        );
        assert_eq!(raw.row_order(), [0, 2, 1, 3, 4, 6, 5, 7]);
        assert_eq!(&w.file_bytes()[raw.offset..raw.offset + raw.bytes], &q[..]);
        // The un-permuted stored rows are the un-permuted dequantised tensor's.
        let dense = w.load(name, &Device::Cpu).unwrap();
        assert_eq!(dense.dims(), [8, 32]);
        let dense = dense.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(m.dequantize(), dense);
        assert_ne!(dense[..32], dense[32..64]);
        // Q2_K is read (dequantised), not served as blocks.
        assert!(w.ggml_matrix("lm_head.weight").unwrap().is_none());
        let head = w.load("lm_head.weight", &Device::Cpu).unwrap();
        assert_eq!(head.dims(), [4, 256]);
    }
}
