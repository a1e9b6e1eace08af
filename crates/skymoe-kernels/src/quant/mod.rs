//! Quantised weight matrices (`[rows, cols]`, PyTorch's `[out, in]` layout) and the product
//! `y = x Wᵀ` with the dequantisation fused into the kernel: a matrix is never dequantised
//! as a whole, only 16 or 32 weights at a time in registers (few activation rows; f16 and f32
//! rows in register blocks of three weight rows by eight activation rows from 8 rows on
//! AVX-512) or one tile of rows into a small per-thread buffer fed to a GEMM (many rows).
//!
//! Formats:
//! - `f32`, `f16`: plain.
//! - `int8`: symmetric, one f32 scale per row (per output channel): `w = s_r · q`, `q ∈ [-127, 127]`.
//! - `fp8`: E4M3 with one f32 scale per row or one for the whole tensor: `w = s · e4m3(q)`
//!   (the layout of vLLM / Skywork FP8 checkpoints: `F8_E4M3` weight + `weight_scale`).
//! - `q4`: symmetric 4-bit in groups of 32 columns, one f32 scale per group: `w = d · (q − 8)`;
//!   a group's 16 bytes hold column `j` in the low nibble of byte `j` and column `j + 16` in
//!   the high nibble; a row's last group may be partial (padding nibbles are 8, i.e. zero).
//!
//! - ggml blocks as stored in a GGUF file (Q4_0 … Q6_K, see [`crate::ggml`]): a [`QMatrix`]
//!   built with [`QMatrix::from_ggml`] keeps the file's blocks (typically borrowed from its
//!   memory map) and runs ggml's fused kernels. Stacking projections of different ggml types
//!   (a Q4_K_M file's q and v, gate and up) gives a row-segmented matrix whose segments run
//!   their own kernels into their own output columns. [`QMatrix::format`] tells them apart with
//!   a [`MatrixFormat`]; [`WeightFormat`] stays the set of formats skymoe quantises *to*.
//!
//! The instruction set is chosen at run time: AVX-512 (with F16C/FMA) where present, else
//! AVX2 + FMA + F16C, else portable scalar code. `SKYMOE_ISA=scalar|avx2|avx512` forces one.

pub(crate) mod bf16_tiles;
mod blocked;
mod f16_vec;
pub mod fp8;
pub(crate) mod fp8_bf16;
mod kernels;
pub(crate) use kernels::tile_rows;
#[cfg(target_arch = "x86_64")]
pub(crate) use kernels::x86_support;
mod store;
#[cfg(target_arch = "x86_64")]
mod x86;

use std::fmt;
use std::str::FromStr;

use rayon::prelude::*;

use crate::ggml::{GgmlMatrix, GgmlType};

pub use f16_vec::{axpy_f16, axpy_f16_rows, dot_f16, dot_f16_rows};
pub use kernels::{uses_bf16_tiles, Isa, BF16_TILES_ABOVE_ROWS};
pub use store::{Element, SharedBytes, Store};

/// Columns per q4 scale group.
pub const Q4_GROUP: usize = 32;

/// Storage format of a weight matrix.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum WeightFormat {
    /// 32-bit floats.
    F32,
    /// 16-bit IEEE floats.
    F16,
    /// 8-bit integers with a per-row scale.
    Int8,
    /// FP8 E4M3 with a per-row (or per-tensor) scale.
    Fp8,
    /// 4-bit integers in groups of 32 with a scale per group.
    Q4,
}

impl WeightFormat {
    /// The name used on the command line and in `quantization_config`.
    pub fn name(self) -> &'static str {
        match self {
            WeightFormat::F32 => "f32",
            WeightFormat::F16 => "f16",
            WeightFormat::Int8 => "int8",
            WeightFormat::Fp8 => "fp8",
            WeightFormat::Q4 => "q4",
        }
    }

    /// Every format.
    pub const ALL: [WeightFormat; 5] = [
        WeightFormat::F32,
        WeightFormat::F16,
        WeightFormat::Int8,
        WeightFormat::Fp8,
        WeightFormat::Q4,
    ];
}

impl fmt::Display for WeightFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for WeightFormat {
    type Err = QuantError;
    fn from_str(s: &str) -> Result<Self, QuantError> {
        match s.to_ascii_lowercase().as_str() {
            "f32" | "float32" => Ok(WeightFormat::F32),
            "f16" | "float16" | "fp16" => Ok(WeightFormat::F16),
            "int8" | "i8" | "q8" => Ok(WeightFormat::Int8),
            "fp8" | "f8" | "e4m3" | "fp8_e4m3" => Ok(WeightFormat::Fp8),
            "q4" | "int4" => Ok(WeightFormat::Q4),
            _ => Err(QuantError::UnknownFormat(s.to_string())),
        }
    }
}

/// What a [`QMatrix`] holds: one of skymoe's [`WeightFormat`]s, or ggml blocks as stored in a
/// GGUF file (one type, or row segments of several after stacking).
///
/// Compares equal to a [`WeightFormat`] only when it is that skymoe format, so
/// `matrix.format() == requested` is false for ggml matrices (they are never "already in" a
/// skymoe format).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MatrixFormat {
    /// One of skymoe's formats.
    Skymoe(WeightFormat),
    /// ggml blocks of one type, as stored.
    Ggml(GgmlType),
    /// Stacked row segments of ggml blocks of several types, as stored.
    GgmlMixed,
}

impl MatrixFormat {
    /// The skymoe format, if it is one.
    pub fn weight_format(self) -> Option<WeightFormat> {
        match self {
            MatrixFormat::Skymoe(f) => Some(f),
            _ => None,
        }
    }

    /// Whether the matrix holds ggml blocks as stored.
    pub fn is_ggml(self) -> bool {
        !matches!(self, MatrixFormat::Skymoe(_))
    }
}

impl From<WeightFormat> for MatrixFormat {
    fn from(f: WeightFormat) -> Self {
        MatrixFormat::Skymoe(f)
    }
}

impl PartialEq<WeightFormat> for MatrixFormat {
    fn eq(&self, other: &WeightFormat) -> bool {
        *self == MatrixFormat::Skymoe(*other)
    }
}

impl PartialEq<MatrixFormat> for WeightFormat {
    fn eq(&self, other: &MatrixFormat) -> bool {
        other == self
    }
}

impl fmt::Display for MatrixFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MatrixFormat::Skymoe(w) => f.write_str(w.name()),
            MatrixFormat::Ggml(t) => write!(f, "gguf:{t}"),
            MatrixFormat::GgmlMixed => f.write_str("gguf:mixed"),
        }
    }
}

/// Errors building or using a quantised matrix.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum QuantError {
    /// A format name that is not one of f32, f16, int8, fp8, q4.
    #[error("unknown weight format `{0}` (expected f32, f16, int8, fp8 or q4)")]
    UnknownFormat(String),
    /// Buffer lengths that do not match the shape.
    #[error("{what}: expected {expected} elements for a {rows}x{cols} matrix, found {found}")]
    Length {
        /// Which buffer.
        what: &'static str,
        /// Rows.
        rows: usize,
        /// Columns.
        cols: usize,
        /// Expected length.
        expected: usize,
        /// Actual length.
        found: usize,
    },
    /// A weight or scale that is NaN or infinite.
    #[error("{0} contains NaN or infinite values")]
    NonFinite(&'static str),
}

/// The stored data of a [`QMatrix`].
#[derive(Debug, Clone)]
pub enum QData {
    /// Row-major f32.
    F32(Vec<f32>),
    /// Row-major f16 bits.
    F16(Store<u16>),
    /// Row-major int8 and one scale per row.
    Int8 {
        /// Quantised values.
        q: Store<i8>,
        /// Per-row scales.
        scales: Vec<f32>,
    },
    /// Row-major E4M3 bytes and one scale per row (a per-tensor scale is repeated).
    Fp8 {
        /// E4M3 codes.
        q: Store<u8>,
        /// Per-row scales.
        scales: Vec<f32>,
    },
    /// Packed nibbles, `ceil(cols/32)·16` bytes per row, and `ceil(cols/32)` scales per row.
    Q4 {
        /// Packed 4-bit values.
        packed: Store<u8>,
        /// Per-group scales.
        scales: Vec<f32>,
    },
}

/// A weight matrix `[rows, cols]` in one of the [`WeightFormat`]s, or ggml blocks as stored
/// (see [`QMatrix::from_ggml`]). Its values are owned or read in place from shared bytes (a
/// checkpoint's memory map, see [`Store`]).
#[derive(Debug, Clone)]
pub struct QMatrix {
    rows: usize,
    cols: usize,
    /// The skymoe-format data; an empty `QData::F32` when `ggml` or `stack` is set.
    data: QData,
    /// ggml row segments, top to bottom (each `cols` wide, rows summing to `rows`), when the
    /// matrix is stored as ggml blocks. The skymoe kernels never see such a matrix.
    ggml: Option<Vec<GgmlMatrix>>,
    /// Row parts, top to bottom, of a stack of skymoe-format matrices of which some are read
    /// in place (stacking them would copy them): each part is a plain matrix of the same
    /// format and width and runs its own product into its own output columns.
    stack: Option<Vec<QMatrix>>,
}

fn check_len(
    what: &'static str,
    rows: usize,
    cols: usize,
    expected: usize,
    found: usize,
) -> Result<(), QuantError> {
    if expected == found {
        Ok(())
    } else {
        Err(QuantError::Length {
            what,
            rows,
            cols,
            expected,
            found,
        })
    }
}

fn check_finite(what: &'static str, v: &[f32]) -> Result<(), QuantError> {
    if v.iter().all(|x| x.is_finite()) {
        Ok(())
    } else {
        Err(QuantError::NonFinite(what))
    }
}

/// One scale per row from a per-tensor scale (repeated) or per-row scales (checked).
fn per_row_scales(scales: &[f32], rows: usize, cols: usize) -> Result<Vec<f32>, QuantError> {
    check_finite("weight_scale", scales)?;
    match scales {
        [s] => Ok(vec![*s; rows]),
        _ => {
            check_len("weight_scale", rows, cols, rows, scales.len())?;
            Ok(scales.to_vec())
        }
    }
}

/// Groups of [`Q4_GROUP`] columns in a row of `cols`.
pub fn q4_groups(cols: usize) -> usize {
    cols.div_ceil(Q4_GROUP)
}

impl QMatrix {
    /// Quantise a row-major f32 matrix. int8 and fp8 scale each row by its largest magnitude
    /// (to 127 and 448); q4 scales each group so that its largest-magnitude value maps to −8.
    pub fn quantize(
        w: &[f32],
        rows: usize,
        cols: usize,
        format: WeightFormat,
    ) -> Result<Self, QuantError> {
        check_len("weights", rows, cols, rows * cols, w.len())?;
        check_finite("the weight matrix", w)?;
        let data = match format {
            WeightFormat::F32 => QData::F32(w.to_vec()),
            WeightFormat::F16 => QData::F16(
                w.iter()
                    .map(|&x| half::f16::from_f32(x).to_bits())
                    .collect::<Vec<u16>>()
                    .into(),
            ),
            WeightFormat::Int8 => {
                let mut q = vec![0i8; rows * cols];
                let mut scales = vec![0f32; rows];
                for r in 0..rows {
                    let row = &w[r * cols..(r + 1) * cols];
                    let amax = row.iter().fold(0f32, |a, x| a.max(x.abs()));
                    let s = if amax > 0.0 { amax / 127.0 } else { 1.0 };
                    scales[r] = s;
                    for (d, &x) in q[r * cols..(r + 1) * cols].iter_mut().zip(row) {
                        *d = (x / s).round().clamp(-127.0, 127.0) as i8;
                    }
                }
                QData::Int8 {
                    q: q.into(),
                    scales,
                }
            }
            WeightFormat::Fp8 => {
                let mut q = vec![0u8; rows * cols];
                let mut scales = vec![0f32; rows];
                for r in 0..rows {
                    let row = &w[r * cols..(r + 1) * cols];
                    let amax = row.iter().fold(0f32, |a, x| a.max(x.abs()));
                    let s = if amax > 0.0 {
                        amax / fp8::E4M3_MAX
                    } else {
                        1.0
                    };
                    scales[r] = s;
                    for (d, &x) in q[r * cols..(r + 1) * cols].iter_mut().zip(row) {
                        *d = fp8::f32_to_e4m3(x / s);
                    }
                }
                QData::Fp8 {
                    q: q.into(),
                    scales,
                }
            }
            WeightFormat::Q4 => {
                let groups = q4_groups(cols);
                let mut packed = vec![0x88u8; rows * groups * 16];
                let mut scales = vec![0f32; rows * groups];
                for r in 0..rows {
                    for g in 0..groups {
                        let start = r * cols + g * Q4_GROUP;
                        let len = Q4_GROUP.min(cols - g * Q4_GROUP);
                        let vals = &w[start..start + len];
                        // The value of largest magnitude, with its sign, maps to -8.
                        let extreme = vals
                            .iter()
                            .fold(0f32, |a, &x| if x.abs() > a.abs() { x } else { a });
                        let d = if extreme != 0.0 { extreme / -8.0 } else { 1.0 };
                        scales[r * groups + g] = d;
                        let bytes = &mut packed[(r * groups + g) * 16..(r * groups + g + 1) * 16];
                        for (j, &x) in vals.iter().enumerate() {
                            let q = ((x / d).round() + 8.0).clamp(0.0, 15.0) as u8;
                            let b = &mut bytes[j % 16];
                            *b = if j < 16 {
                                (*b & 0xF0) | q
                            } else {
                                (*b & 0x0F) | (q << 4)
                            };
                        }
                    }
                }
                QData::Q4 {
                    packed: packed.into(),
                    scales,
                }
            }
        };
        Ok(QMatrix {
            rows,
            cols,
            data,
            ggml: None,
            stack: None,
        })
    }

    /// FP8 with one scale for the whole matrix (largest magnitude to 448), the layout of
    /// vLLM's per-tensor FP8 checkpoints.
    pub fn quantize_fp8_per_tensor(
        w: &[f32],
        rows: usize,
        cols: usize,
    ) -> Result<Self, QuantError> {
        check_len("weights", rows, cols, rows * cols, w.len())?;
        check_finite("the weight matrix", w)?;
        let amax = w.iter().fold(0f32, |a, x| a.max(x.abs()));
        let s = if amax > 0.0 {
            amax / fp8::E4M3_MAX
        } else {
            1.0
        };
        let q: Vec<u8> = w.iter().map(|&x| fp8::f32_to_e4m3(x / s)).collect();
        Ok(QMatrix {
            rows,
            cols,
            data: QData::Fp8 {
                q: q.into(),
                scales: vec![s; rows],
            },
            ggml: None,
            stack: None,
        })
    }

    /// A matrix from E4M3 codes (owned, or a [`Store`] read in place) and scales: one scale
    /// (per tensor) or one per row.
    pub fn from_fp8(
        q: impl Into<Store<u8>>,
        scales: &[f32],
        rows: usize,
        cols: usize,
    ) -> Result<Self, QuantError> {
        let q = q.into();
        check_len("fp8 weights", rows, cols, rows * cols, q.len())?;
        let scales = per_row_scales(scales, rows, cols)?;
        Ok(QMatrix {
            rows,
            cols,
            data: QData::Fp8 { q, scales },
            ggml: None,
            stack: None,
        })
    }

    /// A matrix from int8 values (owned, or a [`Store`] read in place) and one scale per row
    /// (or one per tensor).
    pub fn from_int8(
        q: impl Into<Store<i8>>,
        scales: &[f32],
        rows: usize,
        cols: usize,
    ) -> Result<Self, QuantError> {
        let q = q.into();
        check_len("int8 weights", rows, cols, rows * cols, q.len())?;
        let scales = per_row_scales(scales, rows, cols)?;
        Ok(QMatrix {
            rows,
            cols,
            data: QData::Int8 { q, scales },
            ggml: None,
            stack: None,
        })
    }

    /// A matrix from packed q4 groups (owned, or a [`Store`] read in place) and their scales.
    pub fn from_q4(
        packed: impl Into<Store<u8>>,
        scales: Vec<f32>,
        rows: usize,
        cols: usize,
    ) -> Result<Self, QuantError> {
        let packed = packed.into();
        let groups = q4_groups(cols);
        check_len(
            "q4 packed weights",
            rows,
            cols,
            rows * groups * 16,
            packed.len(),
        )?;
        check_len("q4 scales", rows, cols, rows * groups, scales.len())?;
        check_finite("weight_scale", &scales)?;
        Ok(QMatrix {
            rows,
            cols,
            data: QData::Q4 { packed, scales },
            ggml: None,
            stack: None,
        })
    }

    /// A matrix from f16 bits (owned, or a [`Store`] read in place).
    pub fn from_f16(
        bits: impl Into<Store<u16>>,
        rows: usize,
        cols: usize,
    ) -> Result<Self, QuantError> {
        let bits = bits.into();
        check_len("f16 weights", rows, cols, rows * cols, bits.len())?;
        Ok(QMatrix {
            rows,
            cols,
            data: QData::F16(bits),
            ggml: None,
            stack: None,
        })
    }

    /// A matrix of ggml blocks as stored (borrowed from the [`GgmlMatrix`]'s buffer, e.g. a
    /// GGUF file's memory map): products run ggml's fused kernels, rows dequantise exactly as
    /// ggml does.
    pub fn from_ggml(m: GgmlMatrix) -> QMatrix {
        let (rows, cols) = (m.rows(), m.cols());
        Self::from_segments(vec![m], rows, cols)
    }

    fn from_segments(segments: Vec<GgmlMatrix>, rows: usize, cols: usize) -> QMatrix {
        debug_assert_eq!(segments.iter().map(|s| s.rows()).sum::<usize>(), rows);
        debug_assert!(segments.iter().all(|s| s.cols() == cols));
        QMatrix {
            rows,
            cols,
            data: QData::F32(Vec::new()),
            ggml: Some(segments),
            stack: None,
        }
    }

    /// The ggml row segments (top to bottom) of a matrix stored as ggml blocks, else `None`.
    pub fn ggml_segments(&self) -> Option<&[GgmlMatrix]> {
        self.ggml.as_deref()
    }

    /// The segment holding row `r`, and `r`'s index in it.
    fn ggml_row(segments: &[GgmlMatrix], mut r: usize) -> (&GgmlMatrix, usize) {
        for s in segments {
            if r < s.rows() {
                return (s, r);
            }
            r -= s.rows();
        }
        panic!("row out of range");
    }

    /// Stack matrices of one format and width on top of each other (e.g. q, k and v into one
    /// projection). Matrices of ggml blocks stack with each other whatever their types (the
    /// result keeps each part's blocks as a row segment); not with skymoe formats.
    pub fn concat_rows(parts: &[QMatrix]) -> Result<QMatrix, QuantError> {
        let Some(first) = parts.first() else {
            return Ok(QMatrix {
                rows: 0,
                cols: 0,
                data: QData::F32(Vec::new()),
                ggml: None,
                stack: None,
            });
        };
        let cols = first.cols;
        let rows: usize = parts.iter().map(|p| p.rows).sum();
        if first.ggml.is_some() {
            // ggml parts of any types: their segments, one after the other (no copy).
            let mut segments = Vec::new();
            for p in parts {
                match &p.ggml {
                    Some(s) if p.cols == cols => segments.extend(s.iter().cloned()),
                    _ => {
                        return Err(QuantError::Length {
                            what: "stacked matrix (columns differ, or ggml blocks stacked with \
                                   another format)",
                            rows: p.rows,
                            cols,
                            expected: cols,
                            found: p.cols,
                        })
                    }
                }
            }
            return Ok(Self::from_segments(segments, rows, cols));
        }
        if let Some(p) = parts
            .iter()
            .find(|p| p.cols != cols || p.format() != first.format())
        {
            return Err(QuantError::Length {
                what: "stacked matrix (columns or format differ)",
                rows: p.rows,
                cols,
                expected: cols,
                found: p.cols,
            });
        }
        if parts.iter().any(|p| p.stack.is_some() || p.is_shared()) {
            // Parts read in place stay where they are: the stack keeps them as row parts.
            let mut stack = Vec::new();
            for p in parts {
                match &p.stack {
                    Some(inner) => stack.extend(inner.iter().cloned()),
                    None => stack.push(p.clone()),
                }
            }
            return Ok(QMatrix {
                rows,
                cols,
                data: QData::F32(Vec::new()),
                ggml: None,
                stack: Some(stack),
            });
        }
        // Values and scales of every part, one after the other (all parts share a format).
        fn stack<T: Copy>(
            parts: &[QMatrix],
            get: impl Fn(&QData) -> Option<(&[T], &[f32])>,
        ) -> (Vec<T>, Vec<f32>) {
            let (mut values, mut scales) = (Vec::new(), Vec::new());
            for (v, s) in parts.iter().filter_map(|p| get(&p.data)) {
                values.extend_from_slice(v);
                scales.extend_from_slice(s);
            }
            (values, scales)
        }
        let data = match &first.data {
            QData::F32(_) => QData::F32(
                stack(parts, |d| match d {
                    QData::F32(v) => Some((v.as_slice(), &[][..])),
                    _ => None,
                })
                .0,
            ),
            QData::F16(_) => QData::F16(
                stack(parts, |d| match d {
                    QData::F16(v) => Some((&v[..], &[][..])),
                    _ => None,
                })
                .0
                .into(),
            ),
            QData::Int8 { .. } => {
                let (q, scales) = stack(parts, |d| match d {
                    QData::Int8 { q, scales } => Some((&q[..], scales.as_slice())),
                    _ => None,
                });
                QData::Int8 {
                    q: q.into(),
                    scales,
                }
            }
            QData::Fp8 { .. } => {
                let (q, scales) = stack(parts, |d| match d {
                    QData::Fp8 { q, scales } => Some((&q[..], scales.as_slice())),
                    _ => None,
                });
                QData::Fp8 {
                    q: q.into(),
                    scales,
                }
            }
            QData::Q4 { .. } => {
                let (packed, scales) = stack(parts, |d| match d {
                    QData::Q4 { packed, scales } => Some((&packed[..], scales.as_slice())),
                    _ => None,
                });
                QData::Q4 {
                    packed: packed.into(),
                    scales,
                }
            }
        };
        Ok(QMatrix {
            rows,
            cols,
            data,
            ggml: None,
            stack: None,
        })
    }

    /// Rows (output features).
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Columns (input features).
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// The stored data in a skymoe format. A matrix of ggml blocks, or a stack of parts read
    /// in place, has none: for it this is an empty `QData::F32` (see [`QMatrix::try_data`],
    /// [`QMatrix::ggml_segments`] and [`QMatrix::stacked_parts`]).
    pub fn data(&self) -> &QData {
        &self.data
    }

    /// The stored data in a skymoe format, `None` for a matrix of ggml blocks or a stack.
    pub fn try_data(&self) -> Option<&QData> {
        match (&self.ggml, &self.stack) {
            (None, None) => Some(&self.data),
            _ => None,
        }
    }

    /// The row parts (top to bottom) of a stack of skymoe-format matrices read in place (see
    /// [`QMatrix::concat_rows`]), else `None`.
    pub fn stacked_parts(&self) -> Option<&[QMatrix]> {
        self.stack.as_deref()
    }

    /// Whether the values (of every part) are read in place from shared bytes, not owned: a
    /// ggml matrix (whose blocks are always shared) or a skymoe format built from a [`Store`].
    pub fn is_shared(&self) -> bool {
        if self.ggml.is_some() {
            return true;
        }
        if let Some(parts) = &self.stack {
            return parts.iter().all(|p| p.is_shared());
        }
        match &self.data {
            QData::F32(_) => false,
            QData::F16(v) => v.is_shared(),
            QData::Int8 { q, .. } => q.is_shared(),
            QData::Fp8 { q, .. } => q.is_shared(),
            QData::Q4 { packed, .. } => packed.is_shared(),
        }
    }

    /// The stack part holding row `r`, and `r`'s index in it.
    fn stack_row(parts: &[QMatrix], mut r: usize) -> (&QMatrix, usize) {
        for p in parts {
            if r < p.rows {
                return (p, r);
            }
            r -= p.rows;
        }
        panic!("row out of range");
    }

    /// The storage format: a skymoe [`WeightFormat`] or ggml blocks as stored. Compare it with
    /// a [`WeightFormat`] directly (`m.format() == WeightFormat::Int8`).
    pub fn format(&self) -> MatrixFormat {
        if let Some(segments) = &self.ggml {
            let ty = segments.first().map(|s| s.ty());
            return match ty {
                Some(t) if segments.iter().all(|s| s.ty() == t) => MatrixFormat::Ggml(t),
                _ => MatrixFormat::GgmlMixed,
            };
        }
        if let Some(first) = self.stack.as_ref().and_then(|p| p.first()) {
            return first.format();
        }
        MatrixFormat::Skymoe(match self.data {
            QData::F32(_) => WeightFormat::F32,
            QData::F16(_) => WeightFormat::F16,
            QData::Int8 { .. } => WeightFormat::Int8,
            QData::Fp8 { .. } => WeightFormat::Fp8,
            QData::Q4 { .. } => WeightFormat::Q4,
        })
    }

    /// Bytes of weight storage (values and scales; for ggml, the blocks).
    pub fn storage_bytes(&self) -> usize {
        if let Some(segments) = &self.ggml {
            return segments.iter().map(|s| s.storage_bytes()).sum();
        }
        if let Some(parts) = &self.stack {
            return parts.iter().map(|p| p.storage_bytes()).sum();
        }
        match &self.data {
            QData::F32(v) => v.len() * 4,
            QData::F16(v) => v.len() * 2,
            QData::Int8 { q, scales } => q.len() + scales.len() * 4,
            QData::Fp8 { q, scales } => q.len() + scales.len() * 4,
            QData::Q4 { packed, scales } => packed.len() + scales.len() * 4,
        }
    }

    /// Dequantise row `r` into `out` (`cols` values), with the instruction set in force.
    pub fn dequantize_row(&self, r: usize, out: &mut [f32]) {
        self.dequantize_row_with(Isa::detect(), r, out);
    }

    /// Dequantise row `r` with portable scalar code (the reference).
    pub fn dequantize_row_reference(&self, r: usize, out: &mut [f32]) {
        self.dequantize_row_with(Isa::Scalar, r, out);
    }

    fn dequantize_row_with(&self, isa: Isa, r: usize, out: &mut [f32]) {
        match &self.ggml {
            Some(segments) => {
                assert!(
                    r < self.rows && out.len() >= self.cols,
                    "row {r} out of range"
                );
                let (s, rs) = Self::ggml_row(segments, r);
                s.dequantize_row_with(isa, rs, out);
            }
            None => match &self.stack {
                Some(parts) => {
                    assert!(r < self.rows, "row {r} out of range");
                    let (p, rp) = Self::stack_row(parts, r);
                    p.dequantize_row_with(isa, rp, out);
                }
                None => kernels::dequantize_row(isa, self, r, out),
            },
        }
    }

    /// The whole matrix as f32 (for tests, conversions and the reference product).
    pub fn dequantize(&self) -> Vec<f32> {
        let mut out = vec![0f32; self.rows * self.cols];
        for (r, row) in out.chunks_mut(self.cols.max(1)).enumerate().take(self.rows) {
            self.dequantize_row_reference(r, row);
        }
        out
    }

    /// `out[m, rows] = x[m, cols] · Wᵀ`, multithreaded, dequantisation fused.
    pub fn matmul(&self, x: &[f32], m: usize, out: &mut [f32]) {
        self.matmul_with(Isa::detect(), x, m, out);
    }

    /// [`QMatrix::matmul`] with a given instruction set (it must be supported: see
    /// [`Isa::supported`]; an unsupported one falls back to scalar code).
    pub fn matmul_with(&self, isa: Isa, x: &[f32], m: usize, out: &mut [f32]) {
        assert_eq!(x.len(), m * self.cols, "activation length");
        assert_eq!(out.len(), m * self.rows, "output length");
        let isa = if isa.supported() { isa } else { Isa::Scalar };
        match &self.ggml {
            // Each segment runs its own type's kernel into its own output columns; those
            // with 8-bit activations share one quantisation of `x`.
            Some(segments) => {
                crate::ggml::matmul_segments_with(isa, segments, x, m, out, self.rows)
            }
            None => match &self.stack {
                // Each part into its own output columns.
                Some(parts) => {
                    let parts: Vec<&QMatrix> = parts.iter().collect();
                    kernels::matmul_parts(isa, &parts, x, m, out, self.rows, 0);
                }
                None => kernels::matmul(isa, self, x, m, out, self.rows, 0),
            },
        }
    }

    /// The plain reference: dequantise the whole matrix, then multiply in f64-accumulated f32.
    pub fn matmul_reference(&self, x: &[f32], m: usize) -> Vec<f32> {
        let w = self.dequantize();
        let mut out = vec![0f32; m * self.rows];
        for i in 0..m {
            let xi = &x[i * self.cols..(i + 1) * self.cols];
            for r in 0..self.rows {
                let wr = &w[r * self.cols..(r + 1) * self.cols];
                out[i * self.rows + r] = xi
                    .iter()
                    .zip(wr)
                    .map(|(a, b)| *a as f64 * *b as f64)
                    .sum::<f64>() as f32;
            }
        }
        out
    }
}

thread_local! {
    /// Whether this thread's products stay on it (see [`on_this_thread`]).
    static ON_THIS_THREAD: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Run `f` with every matrix product it makes on this thread kept on this thread, not split
/// over the pool: for callers that already run independent products one per thread (the
/// active experts of a decode step), where splitting each product again only has the thread
/// that finishes first wait for the other's last piece.
pub fn on_this_thread<R>(f: impl FnOnce() -> R) -> R {
    /// Restores the previous setting, also when `f` unwinds.
    struct Restore(bool);
    impl Drop for Restore {
        fn drop(&mut self) {
            ON_THIS_THREAD.with(|c| c.set(self.0));
        }
    }
    let _restore = Restore(ON_THIS_THREAD.with(|c| c.replace(true)));
    f()
}

/// Whether products on this thread run serially (inside [`on_this_thread`]).
pub(crate) fn kept_on_this_thread() -> bool {
    ON_THIS_THREAD.with(|c| c.get())
}

/// Run `f` on disjoint chunks of `0..n` in parallel when the work is worth it.
pub(crate) fn par_ranges(
    n: usize,
    chunk: usize,
    work_per_item: usize,
    f: impl Fn(usize, usize) + Sync + Send,
) {
    let chunk = chunk.max(1);
    let chunks = n.div_ceil(chunk);
    if chunks <= 1 || n * work_per_item < 1 << 15 || kept_on_this_thread() {
        f(0, n);
        return;
    }
    (0..chunks).into_par_iter().for_each(|c| {
        let start = c * chunk;
        f(start, (start + chunk).min(n));
    });
}

#[cfg(test)]
mod tests;
