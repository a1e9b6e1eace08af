//! What a PyTorch state dict says about each tensor: its storage, dtype, shape, strides and
//! offset, read from the pickle without touching tensor bytes.

use safetensors::Dtype;

use super::pickle::{parse_pickle, Obj, ObjId, Pickle, PickleError};

/// Longest tensor name accepted.
const MAX_NAME_BYTES: usize = 4096;

/// An element type of a torch storage or tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TorchDtype {
    /// float64.
    F64,
    /// float32.
    F32,
    /// float16.
    F16,
    /// bfloat16.
    BF16,
    /// int64.
    I64,
    /// int32.
    I32,
    /// int16.
    I16,
    /// int8.
    I8,
    /// uint8 (also the element of an untyped storage).
    U8,
    /// uint16.
    U16,
    /// uint32.
    U32,
    /// uint64.
    U64,
    /// bool.
    Bool,
    /// float8 e4m3fn.
    F8E4M3,
    /// float8 e5m2.
    F8E5M2,
    /// complex64.
    Complex64,
    /// complex128.
    Complex128,
}

impl TorchDtype {
    /// The dtype of a legacy storage class name such as `FloatStorage`.
    pub fn from_storage_class(name: &str) -> Option<Self> {
        Some(match name {
            "DoubleStorage" => Self::F64,
            "FloatStorage" => Self::F32,
            "HalfStorage" => Self::F16,
            "BFloat16Storage" => Self::BF16,
            "LongStorage" => Self::I64,
            "IntStorage" => Self::I32,
            "ShortStorage" => Self::I16,
            "CharStorage" => Self::I8,
            "ByteStorage" => Self::U8,
            "BoolStorage" => Self::Bool,
            "ComplexFloatStorage" => Self::Complex64,
            "ComplexDoubleStorage" => Self::Complex128,
            _ => return None,
        })
    }

    /// The dtype of a `torch.<name>` dtype object such as `float32`.
    pub fn from_torch_name(name: &str) -> Option<Self> {
        Some(match name {
            "float64" | "double" => Self::F64,
            "float32" | "float" => Self::F32,
            "float16" | "half" => Self::F16,
            "bfloat16" => Self::BF16,
            "int64" | "long" => Self::I64,
            "int32" | "int" => Self::I32,
            "int16" | "short" => Self::I16,
            "int8" => Self::I8,
            "uint8" => Self::U8,
            "uint16" => Self::U16,
            "uint32" => Self::U32,
            "uint64" => Self::U64,
            "bool" => Self::Bool,
            "float8_e4m3fn" => Self::F8E4M3,
            "float8_e5m2" => Self::F8E5M2,
            "complex64" | "cfloat" => Self::Complex64,
            "complex128" | "cdouble" => Self::Complex128,
            _ => return None,
        })
    }

    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            Self::U8 | Self::I8 | Self::Bool | Self::F8E4M3 | Self::F8E5M2 => 1,
            Self::F16 | Self::BF16 | Self::I16 | Self::U16 => 2,
            Self::F32 | Self::I32 | Self::U32 => 4,
            Self::F64 | Self::I64 | Self::U64 | Self::Complex64 => 8,
            Self::Complex128 => 16,
        }
    }

    /// The torch name of the dtype.
    pub fn name(self) -> &'static str {
        match self {
            Self::F64 => "float64",
            Self::F32 => "float32",
            Self::F16 => "float16",
            Self::BF16 => "bfloat16",
            Self::I64 => "int64",
            Self::I32 => "int32",
            Self::I16 => "int16",
            Self::I8 => "int8",
            Self::U8 => "uint8",
            Self::U16 => "uint16",
            Self::U32 => "uint32",
            Self::U64 => "uint64",
            Self::Bool => "bool",
            Self::F8E4M3 => "float8_e4m3fn",
            Self::F8E5M2 => "float8_e5m2",
            Self::Complex64 => "complex64",
            Self::Complex128 => "complex128",
        }
    }

    /// The safetensors dtype of the same layout, if safetensors has one.
    pub fn safetensors(self) -> Option<Dtype> {
        Some(match self {
            Self::F64 => Dtype::F64,
            Self::F32 => Dtype::F32,
            Self::F16 => Dtype::F16,
            Self::BF16 => Dtype::BF16,
            Self::I64 => Dtype::I64,
            Self::I32 => Dtype::I32,
            Self::I16 => Dtype::I16,
            Self::I8 => Dtype::I8,
            Self::U8 => Dtype::U8,
            Self::U16 => Dtype::U16,
            Self::U32 => Dtype::U32,
            Self::U64 => Dtype::U64,
            Self::Bool => Dtype::BOOL,
            Self::F8E4M3 => Dtype::F8_E4M3,
            Self::F8E5M2 => Dtype::F8_E5M2,
            Self::Complex64 | Self::Complex128 => return None,
        })
    }
}

/// A storage named by a persistent id: the zip entry `data/<key>` holding `numel` elements.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StorageRef {
    /// The entry name under `data/`.
    pub key: String,
    /// The element type of the storage (bytes for an untyped storage).
    pub dtype: TorchDtype,
    /// Number of elements of `dtype`.
    pub numel: usize,
}

impl StorageRef {
    /// Size of the storage in bytes, if it fits in memory.
    pub fn nbytes(&self) -> Option<usize> {
        self.numel.checked_mul(self.dtype.size())
    }
}

/// One tensor of a state dict: a strided view of a storage.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorRecord {
    /// The storage it views.
    pub storage: StorageRef,
    /// The element type of the tensor.
    pub dtype: TorchDtype,
    /// Offset of the first element, in elements of `dtype`.
    pub offset: usize,
    /// Size of each dimension.
    pub shape: Vec<usize>,
    /// Stride of each dimension, in elements.
    pub strides: Vec<usize>,
}

impl TensorRecord {
    /// Number of elements, if it does not overflow.
    pub fn numel(&self) -> Option<usize> {
        self.shape.iter().try_fold(1usize, |n, &d| n.checked_mul(d))
    }

    /// Whether the view is row-major contiguous.
    pub fn is_contiguous(&self) -> bool {
        let mut expected = 1usize;
        for (&d, &s) in self.shape.iter().zip(&self.strides).rev() {
            if d != 1 && s != expected {
                return false;
            }
            expected = expected.saturating_mul(d);
        }
        true
    }

    /// The elements of the storage the view touches, `[first, end)`, or `None` on overflow.
    /// An empty tensor touches nothing.
    pub fn element_span(&self) -> Option<(usize, usize)> {
        if self.shape.contains(&0) {
            return Some((self.offset, self.offset));
        }
        let mut last = self.offset;
        for (&d, &s) in self.shape.iter().zip(&self.strides) {
            last = last.checked_add((d - 1).checked_mul(s)?)?;
        }
        Some((self.offset, last.checked_add(1)?))
    }

    /// Check that the view lies inside its storage and is no larger than it (views with
    /// zero or overlapping strides that would expand the data are refused). Returns the byte
    /// range of the storage the view touches.
    pub fn byte_span(&self) -> Result<(usize, usize), String> {
        let es = self.dtype.size();
        let overflow = || "tensor extent overflows".to_string();
        let (first, end) = self.element_span().ok_or_else(overflow)?;
        let first = first.checked_mul(es).ok_or_else(overflow)?;
        let end = end.checked_mul(es).ok_or_else(overflow)?;
        let storage = self.storage.nbytes().ok_or_else(overflow)?;
        if end > storage {
            return Err(format!(
                "the view ends at byte {end} of storage {} which holds {storage} bytes",
                self.storage.key
            ));
        }
        let out = self
            .numel()
            .and_then(|n| n.checked_mul(es))
            .ok_or_else(overflow)?;
        if out > storage {
            return Err(format!(
                "the view holds {out} bytes, more than its storage {} ({storage}): \
                 zero or overlapping strides; save it with .contiguous()",
                self.storage.key
            ));
        }
        Ok((first, end))
    }
}

/// Parse a `data.pkl` and return its tensors by name, in the order the pickle lists them.
///
/// The pickle must be a dict of name → tensor, or a dict holding such a dict under
/// `state_dict` or `model` (as training scripts save them).
pub fn parse_state_dict(data: &[u8]) -> Result<Vec<(String, TensorRecord)>, PickleError> {
    let p = parse_pickle(data)?;
    state_dict(&p)
}

/// The tensors of a parsed pickle (see [`parse_state_dict`]).
pub fn state_dict(p: &Pickle) -> Result<Vec<(String, TensorRecord)>, PickleError> {
    let Obj::Dict(items) = p.root() else {
        return Err(PickleError::Unsupported(format!(
            "the pickle holds {}, not a dict of tensors",
            p.kind(p.root)
        )));
    };
    match tensor_items(p, items) {
        Ok(t) => Ok(t),
        Err(e) => {
            for key in ["state_dict", "model"] {
                let nested = items
                    .iter()
                    .rev()
                    .find(|(k, _)| p.text(*k) == Some(key))
                    .map(|&(_, v)| p.get(v));
                if let Some(Obj::Dict(inner)) = nested {
                    return tensor_items(p, inner);
                }
            }
            Err(e)
        }
    }
}

fn tensor_items(
    p: &Pickle,
    items: &[(ObjId, ObjId)],
) -> Result<Vec<(String, TensorRecord)>, PickleError> {
    let mut out: Vec<(String, TensorRecord)> = Vec::with_capacity(items.len());
    let mut seen = std::collections::HashMap::new();
    for &(k, v) in items {
        let name = p.text(k).ok_or_else(|| {
            PickleError::Unsupported(format!(
                "the pickle is a dict keyed by {}, not a dict of tensors",
                p.kind(k)
            ))
        })?;
        // Each entry copies its name; a pickle could refer to one huge name many times.
        if name.len() > MAX_NAME_BYTES {
            return Err(PickleError::Unsupported(format!(
                "a tensor name of {} bytes",
                name.len()
            )));
        }
        let Obj::Tensor(t) = p.get(v) else {
            return Err(PickleError::Unsupported(format!(
                "the pickle is not a dict of tensors: `{name}` holds {}",
                p.kind(v)
            )));
        };
        match seen.get(name) {
            Some(&i) => {
                if let Some(slot) = out.get_mut(i) {
                    *slot = (name.to_string(), t.clone());
                }
            }
            None => {
                seen.insert(name.to_string(), out.len());
                out.push((name.to_string(), t.clone()));
            }
        }
    }
    Ok(out)
}
