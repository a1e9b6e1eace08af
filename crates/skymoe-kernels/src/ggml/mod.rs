//! llama.cpp (ggml) quantised tensors served as stored: a [`GgmlMatrix`] holds the raw ggml
//! blocks of a `[rows, cols]` weight (PyTorch's `[out, in]` layout; GGUF's `ne = [cols, rows]`),
//! typically borrowed from a memory-mapped GGUF file without a copy, and computes
//! `y = x · Wᵀ` with the dequantisation fused into the dot products.
//!
//! Types (ggml's block layouts and dequantisation, bit-exact with `gguf.quants.dequantize`):
//!
//! | type | id | weights/block | bytes/block | weight |
//! |------|----|---------------|-------------|--------|
//! | Q4_0 | 2  | 32  | 18  | `d·(q − 8)`, q 4-bit |
//! | Q4_1 | 3  | 32  | 20  | `d·q + m` |
//! | Q5_0 | 6  | 32  | 22  | `d·(q − 16)`, q 5-bit |
//! | Q5_1 | 7  | 32  | 24  | `d·q + m` |
//! | Q8_0 | 8  | 32  | 34  | `d·q`, q int8 |
//! | Q4_K | 12 | 256 | 144 | `(d·sc_j)·q − dmin·m_j`, 8 sub-blocks of 32, 6-bit sc/m |
//! | Q5_K | 13 | 256 | 176 | as Q4_K with 5-bit q |
//! | Q6_K | 14 | 256 | 210 | `(d·sc_j)·(q − 32)`, 16 sub-blocks of 16, int8 sc |
//!
//! Two kinds of products:
//! - **8-bit activations** (as llama.cpp's `vec_dot` kernels): the activation rows are
//!   quantised once per product ([`Q8Activations`]: 32-value blocks for the 32-weight types,
//!   256-value blocks with sums of every 16 for the k-quants) and every weight block is
//!   multiplied with them in integers (AVX-512 VNNI `vpdpbusd`/`vpdpwssd`, AVX2
//!   `vpmaddubsw`/`vpmaddwd`, or portable code, all bit-identical), then scaled once per
//!   block. Used where it is faster: up to [`int8_max_rows`] activation rows (decode, small
//!   batches, short prompts), up to 16 on CPUs with AVX512-BF16 (more take the bf16 tiles).
//!   The result equals the product of the dequantised weights with the dequantised 8-bit
//!   activations up to f32 rounding; against f32 activations it differs by the activations'
//!   quantisation (at most half a step, `max|x|/254` per block, per value).
//! - **f32 activations**: up to [`FUSED_MAX_ROWS`] activation rows share one pass over a weight
//!   row (the blocks are decoded once, 32 weights at a time, into f32 registers and multiplied
//!   with every activation row by FMA); up to 16 rows run in such groups over 16-row tasks whose
//!   weights stay in cache; more rows dequantise a tile of weight rows per thread and multiply
//!   it with a GEMM. The result equals the dequantise-then-multiply product up to f32 summation
//!   order.
//!
//! [`activations`] chooses between them (`SKYMOE_GGML_ACTIVATIONS=auto|f32|int8` sets it at
//! start, [`set_activations`] at run time). The instruction set is [`Isa::detect`]'s
//! (`SKYMOE_ISA=scalar|avx2|avx512` forces one).

mod blocks;
mod q8;
#[cfg(target_arch = "x86_64")]
mod x86;
#[cfg(target_arch = "x86_64")]
mod x86_q8;

use rayon::prelude::*;
use std::cell::RefCell;
use std::fmt;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;

pub use q8::Q8Activations;

use crate::quant::par_ranges;
pub use crate::quant::Isa;

/// Most activation rows one fused pass over a weight row handles (AVX-512; AVX2 and scalar
/// code take half as many, for want of registers).
pub const FUSED_MAX_ROWS: usize = 8;

/// Most activation rows handled by the fused kernels; more go through dequantised tiles and a
/// GEMM.
pub const FUSED_MAX_CHUNKED_ROWS: usize = 16;

/// A ggml quantisation type served by [`GgmlMatrix`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum GgmlType {
    /// 4-bit, scale per 32.
    Q4_0,
    /// 4-bit, scale and minimum per 32.
    Q4_1,
    /// 5-bit, scale per 32.
    Q5_0,
    /// 5-bit, scale and minimum per 32.
    Q5_1,
    /// 8-bit, scale per 32.
    Q8_0,
    /// 4-bit k-quant: super-blocks of 256, 6-bit scales and minima per 32.
    Q4K,
    /// 5-bit k-quant: super-blocks of 256, 6-bit scales and minima per 32.
    Q5K,
    /// 6-bit k-quant: super-blocks of 256, int8 scales per 16.
    Q6K,
}

impl GgmlType {
    /// Every type.
    pub const ALL: [GgmlType; 8] = [
        GgmlType::Q4_0,
        GgmlType::Q4_1,
        GgmlType::Q5_0,
        GgmlType::Q5_1,
        GgmlType::Q8_0,
        GgmlType::Q4K,
        GgmlType::Q5K,
        GgmlType::Q6K,
    ];

    /// The type with ggml's id (`ggml_type`), if served here.
    pub fn from_id(id: u32) -> Option<Self> {
        Self::ALL.into_iter().find(|t| t.id() == id)
    }

    /// ggml's id (`GGML_TYPE_*`).
    pub fn id(self) -> u32 {
        match self {
            GgmlType::Q4_0 => 2,
            GgmlType::Q4_1 => 3,
            GgmlType::Q5_0 => 6,
            GgmlType::Q5_1 => 7,
            GgmlType::Q8_0 => 8,
            GgmlType::Q4K => 12,
            GgmlType::Q5K => 13,
            GgmlType::Q6K => 14,
        }
    }

    /// ggml's name ("Q4_K" etc.).
    pub fn name(self) -> &'static str {
        match self {
            GgmlType::Q4_0 => "Q4_0",
            GgmlType::Q4_1 => "Q4_1",
            GgmlType::Q5_0 => "Q5_0",
            GgmlType::Q5_1 => "Q5_1",
            GgmlType::Q8_0 => "Q8_0",
            GgmlType::Q4K => "Q4_K",
            GgmlType::Q5K => "Q5_K",
            GgmlType::Q6K => "Q6_K",
        }
    }

    /// Weights per block (32, or 256 for the k-quants).
    pub const fn block_elems(self) -> usize {
        match self {
            GgmlType::Q4K | GgmlType::Q5K | GgmlType::Q6K => 256,
            _ => 32,
        }
    }

    /// Bytes per block.
    pub const fn block_bytes(self) -> usize {
        match self {
            GgmlType::Q4_0 => 18,
            GgmlType::Q4_1 => 20,
            GgmlType::Q5_0 => 22,
            GgmlType::Q5_1 => 24,
            GgmlType::Q8_0 => 34,
            GgmlType::Q4K => 144,
            GgmlType::Q5K => 176,
            GgmlType::Q6K => 210,
        }
    }

    /// Bytes of a row of `cols` weights; `None` when `cols` is not a multiple of
    /// [`GgmlType::block_elems`] (or the size overflows).
    pub fn row_bytes(self, cols: usize) -> Option<usize> {
        if !cols.is_multiple_of(self.block_elems()) {
            return None;
        }
        (cols / self.block_elems()).checked_mul(self.block_bytes())
    }
}

impl fmt::Display for GgmlType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Errors building a [`GgmlMatrix`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GgmlError {
    /// A ggml type id that is not served here.
    #[error("ggml type id {0} is not supported (expected one of Q4_0=2, Q4_1=3, Q5_0=6, Q5_1=7, Q8_0=8, Q4_K=12, Q5_K=13, Q6_K=14)")]
    UnsupportedType(u32),
    /// A row length that is not a whole number of blocks.
    #[error("{ty} {rows}x{cols}: {cols} columns is not a multiple of the {ty} block size {block}")]
    Cols {
        /// The type.
        ty: GgmlType,
        /// Rows.
        rows: usize,
        /// Columns.
        cols: usize,
        /// Weights per block.
        block: usize,
    },
    /// A shape whose byte size does not fit in `usize`.
    #[error("{ty} {rows}x{cols}: the byte size overflows (offset {offset})")]
    Overflow {
        /// The type.
        ty: GgmlType,
        /// Rows.
        rows: usize,
        /// Columns.
        cols: usize,
        /// Offset of the tensor in the buffer.
        offset: usize,
    },
    /// A buffer too short for the tensor at its offset (or of the wrong length for
    /// [`GgmlMatrix::from_vec`]).
    #[error("{ty} {rows}x{cols}: expected {expected} bytes at offset {offset}, found a buffer of {found} bytes")]
    Length {
        /// The type.
        ty: GgmlType,
        /// Rows.
        rows: usize,
        /// Columns.
        cols: usize,
        /// Offset of the tensor in the buffer.
        offset: usize,
        /// Bytes the tensor needs.
        expected: usize,
        /// Bytes in the buffer.
        found: usize,
    },
}

/// Raw bytes behind a [`GgmlMatrix`]: a memory map, a `Vec<u8>`, …
pub type GgmlBytes = Arc<dyn AsRef<[u8]> + Send + Sync>;

/// A `[rows, cols]` weight matrix in a ggml quantised type, its blocks stored as in the file:
/// row `r` is the `row_bytes` bytes at `offset + r·row_bytes` of `bytes`.
#[derive(Clone)]
pub struct GgmlMatrix {
    ty: GgmlType,
    rows: usize,
    cols: usize,
    bytes: GgmlBytes,
    offset: usize,
    row_bytes: usize,
}

impl fmt::Debug for GgmlMatrix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GgmlMatrix")
            .field("ty", &self.ty)
            .field("rows", &self.rows)
            .field("cols", &self.cols)
            .field("offset", &self.offset)
            .finish_non_exhaustive()
    }
}

thread_local! {
    static TILE: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
    /// A task's codes as bf16 pairs and their groups' multipliers and offsets (the BF16
    /// tiles).
    #[allow(clippy::type_complexity)]
    static BF16_TILE: RefCell<(Vec<u32>, Vec<f32>, Vec<f32>)> =
        const { RefCell::new((Vec::new(), Vec::new(), Vec::new())) };
}

/// A raw output pointer shared by tasks writing disjoint elements.
#[derive(Clone, Copy)]
struct OutPtr(*mut f32);
// SAFETY: tasks write disjoint elements of the buffer behind the pointer (disjoint weight-row
// ranges are disjoint output columns), and the buffer outlives them.
unsafe impl Send for OutPtr {}
// SAFETY: as above.
unsafe impl Sync for OutPtr {}

impl OutPtr {
    /// The pointer to element `i` (not dereferenced here).
    fn at(self, i: usize) -> *mut f32 {
        self.0.wrapping_add(i)
    }
}

/// The instruction set actually used for a requested one: unsupported ones fall back to scalar
/// code, AVX-512 without the VL extension (which the kernels use on 128-bit vectors) to AVX2.
fn effective(isa: Isa) -> Isa {
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 if isa.supported() && !crate::quant::x86_support().avx512_vl => Isa::Avx2,
        _ if isa.supported() => isa,
        _ => Isa::Scalar,
    }
}

/// How many activation rows one fused pass handles with `isa`.
fn group_rows(isa: Isa) -> usize {
    match isa {
        Isa::Avx512 => FUSED_MAX_ROWS,
        _ => FUSED_MAX_ROWS / 2,
    }
}

/// Dot products of the `dots.len()` (1 to [`FUSED_MAX_ROWS`]) activation rows of `x` (rows of
/// `cols`) with one weight row (`row`: its blocks), with a supported `isa`.
fn row_dots(isa: Isa, ty: GgmlType, row: &[u8], x: &[f32], cols: usize, dots: &mut [f32]) {
    debug_assert_eq!(Some(row.len()), ty.row_bytes(cols));
    debug_assert!(x.len() >= dots.len() * cols);
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 | Isa::Avx512 => {
            macro_rules! rows {
                ($($m:literal)*) => {
                    match dots.len() {
                        $($m => {
                            // SAFETY: `isa` is supported (callers pass `effective` ones), `row`
                            // holds the whole blocks of `cols` weights and `x` `M` rows of
                            // `cols` (checked above and by the callers).
                            let d = unsafe { x86::dots::<$m>(isa, ty, row, x, cols) };
                            dots.copy_from_slice(&d);
                        })*
                        _ => unreachable!("at most FUSED_MAX_ROWS activation rows"),
                    }
                };
            }
            rows!(1 2 3 4 5 6 7 8);
        }
        _ => blocks::dots_scalar(ty, row, x, cols, dots),
    }
}

/// Dequantise one weight row (its blocks) into `out[..cols]` with a supported `isa`.
fn dequantize_blocks(isa: Isa, ty: GgmlType, row: &[u8], out: &mut [f32]) {
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 | Isa::Avx512 => {
            // SAFETY: `isa` is supported; `row` holds whole blocks and `out` their weights.
            unsafe { x86::dequantize(isa, ty, row, out) }
        }
        _ => blocks::dequantize_scalar(ty, row, out),
    }
}

/// One weight row (its blocks) as the bf16 tiles take it: its integer values as bf16 pairs
/// into `pairs`, each group's multiplier into `s` and offset into `o` (see
/// [`blocks::group_span`]), on a CPU that runs the bf16 tiles.
///
/// # Panics
/// Unless [`crate::quant::bf16_tiles::supported`], or if an output is too short.
fn codes_bf16(ty: GgmlType, row: &[u8], pairs: &mut [u32], s: &mut [f32], o: &mut [f32]) {
    assert!(crate::quant::bf16_tiles::supported(), "no AVX512-BF16 here");
    #[cfg(target_arch = "x86_64")]
    // SAFETY: the bf16 tiles' CPUs have AVX-512 F/BW/VL and BF16 (asserted).
    unsafe {
        x86::codes_bf16(ty, row, pairs, s, o)
    };
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (ty, row, pairs, s, o);
}

/// Which activations the products of ggml blocks multiply the weights with (and those of
/// skymoe's int8 and FP8 rows, see [`crate::quant::QMatrix`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GgmlActivations {
    /// 8-bit activations where they are faster (up to [`int8_max_rows`] rows, with SIMD),
    /// f32 elsewhere; on CPUs with AVX512-BF16, bf16 activations for skymoe's FP8 rows from 2
    /// rows, and for its int8 and FP8 rows and the ggml blocks beyond 16 rows.
    /// The default.
    Auto,
    /// f32 activations always (the product of the dequantised weights, up to f32 rounding).
    F32,
    /// 8-bit activations always, whatever the number of rows or instruction set.
    Int8,
}

/// 0: not yet read from the environment; else 1 + the mode's index.
static ACTIVATIONS: AtomicU8 = AtomicU8::new(0);

/// The activations [`GgmlMatrix::matmul`] and [`matmul_segments_with`] use: [`set_activations`]'s
/// choice, else `SKYMOE_GGML_ACTIVATIONS` (`auto`, `f32` or `int8`), else
/// [`GgmlActivations::Auto`].
pub fn activations() -> GgmlActivations {
    let v = ACTIVATIONS.load(Ordering::Relaxed);
    let v = if v == 0 {
        let mode = match std::env::var("SKYMOE_GGML_ACTIVATIONS").as_deref() {
            Ok("f32") => 2,
            Ok("int8") => 3,
            _ => 1,
        };
        // Keep a value set meanwhile by `set_activations`.
        match ACTIVATIONS.compare_exchange(0, mode, Ordering::Relaxed, Ordering::Relaxed) {
            Ok(_) => mode,
            Err(set) => set,
        }
    } else {
        v
    };
    match v {
        2 => GgmlActivations::F32,
        3 => GgmlActivations::Int8,
        _ => GgmlActivations::Auto,
    }
}

/// Set the activations of every later ggml product in this process (see [`activations`]).
pub fn set_activations(mode: GgmlActivations) {
    let v = match mode {
        GgmlActivations::Auto => 1,
        GgmlActivations::F32 => 2,
        GgmlActivations::Int8 => 3,
    };
    ACTIVATIONS.store(v, Ordering::Relaxed);
}

/// Most activation rows for which [`GgmlActivations::Auto`] multiplies `ty` with 8-bit
/// activations (with SIMD; portable code keeps f32 activations). Measured with
/// `examples/ggml_matmul` (AVX-512 VNNI, 2 threads), the integer products are 1.6-2.5x as
/// fast as the f32 ones for 1 to 32 rows and 1.3-1.5x for 64, then 1.2x for 128 and 1.1x for
/// 256, where the f32 path multiplies dequantised tiles with a GEMM (since the tiles hold whole
/// micro-kernel panels: 1.0-1.4x for 128 rows and 0.8-1.1x for 256). Beyond 64 rows
/// (prefill-sized products, log-likelihood scoring) 8-bit activations are not used for that
/// last 10-20%: those products keep f32 activations. On CPUs with AVX512-BF16 the products of
/// more than 16 rows take bf16 activations instead (`quant::bf16_tiles`: more accurate than 8
/// bits, and twice the f32 rate; see [`uses_int8`]): with the blocks decoded straight into the
/// tiles, the decode phase with 32 sequences ran 1.22x (Q8_0) and 1.28x (Q4_K_M) the 8-bit
/// path's speed. `SKYMOE_GGML_ACTIVATIONS=int8` trades the accuracy for speed.
pub fn int8_max_rows(ty: GgmlType) -> usize {
    // The same for every type, as measured.
    let _ = ty;
    64
}

/// Whether a product of `m` activation rows with a matrix of `ty` on `isa` (an unsupported
/// one runs scalar code) uses 8-bit activations under the current [`activations`]: with
/// SIMD up to [`int8_max_rows`] rows, unless the rows take the bf16 tiles
/// ([`crate::quant::uses_bf16_tiles`]: beyond 16 rows on AVX512-BF16).
pub fn uses_int8(isa: Isa, ty: GgmlType, m: usize) -> bool {
    use_int8(effective(isa), ty, m)
}

/// [`uses_int8`] with an effective instruction set.
fn use_int8(isa: Isa, ty: GgmlType, m: usize) -> bool {
    match activations() {
        GgmlActivations::F32 => false,
        GgmlActivations::Int8 => true,
        GgmlActivations::Auto => {
            isa != Isa::Scalar && m <= int8_max_rows(ty) && !crate::quant::uses_bf16_tiles(isa, m)
        }
    }
}

/// The integer kernels an (effective) instruction set runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum IntIsa {
    Scalar,
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    Avx2,
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    Vnni,
}

fn int_isa(isa: Isa) -> IntIsa {
    match isa {
        Isa::Scalar => IntIsa::Scalar,
        Isa::Avx2 => IntIsa::Avx2,
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 if is_x86_feature_detected!("avx512vnni") => IntIsa::Vnni,
        Isa::Avx512 => IntIsa::Avx2,
    }
}

/// Most activation rows one integer kernel call handles.
fn int_group_rows(kind: IntIsa) -> usize {
    match kind {
        IntIsa::Avx2 => FUSED_MAX_ROWS / 2,
        _ => FUSED_MAX_ROWS,
    }
}

/// A raw view of the activation blocks `ty`'s kernels read.
#[cfg(target_arch = "x86_64")]
fn act_view(a: &Q8Activations, ty: GgmlType) -> x86_q8::Act {
    use std::ptr::null;
    if ty.block_elems() == 256 {
        let b = a.b256.as_ref().expect("256-value activation blocks");
        x86_q8::Act {
            q: b.q.as_ptr(),
            d: b.d.as_ptr(),
            sum: null(),
            dsum: null(),
            bsums: b.bsums.as_ptr(),
            cols: a.cols,
            nbx: a.cols / 256,
        }
    } else {
        let b = a.b32.as_ref().expect("32-value activation blocks");
        x86_q8::Act {
            q: b.q.as_ptr(),
            d: b.d.as_ptr(),
            sum: b.sum.as_ptr(),
            dsum: b.dsum.as_ptr(),
            bsums: null(),
            cols: a.cols,
            nbx: a.cols / 32,
        }
    }
}

/// Integer dot products of activation rows `i0 .. i0 + g` (`g` at most [`FUSED_MAX_ROWS`])
/// of `a` with weight rows `r0 .. r1` of `mat`, written to `out` element `(i0 + i)·ld + r`
/// (the caller's disjoint share of the output).
#[allow(clippy::too_many_arguments)]
fn q8_rows_dots(
    kind: IntIsa,
    mat: &GgmlMatrix,
    r0: usize,
    r1: usize,
    a: &Q8Activations,
    i0: usize,
    g: usize,
    out: OutPtr,
    ld: usize,
) {
    let (ty, rb) = (mat.ty, mat.row_bytes);
    let rows = &mat.blocks()[r0 * rb..r1 * rb];
    debug_assert!(a.serves(ty) && a.cols == mat.cols && i0 + g <= a.rows && g <= FUSED_MAX_ROWS);
    match kind {
        #[cfg(target_arch = "x86_64")]
        IntIsa::Avx2 | IntIsa::Vnni => {
            // SAFETY: the instruction set is supported (`int_isa` of an effective one);
            // `rows` holds r1 − r0 rows of whole blocks of `a.cols` weights; `a` has blocks of
            // `ty`'s size for rows up to i0 + g (checked by the callers); the output elements
            // (i0 + i)·ld + r are in bounds and written by this task only (the caller's
            // guarantee).
            unsafe {
                x86_q8::rows_dots(
                    kind == IntIsa::Vnni,
                    x86_q8::Rows::Ggml(ty),
                    rows.as_ptr(),
                    r1 - r0,
                    act_view(a, ty),
                    i0,
                    g,
                    x86_q8::Out {
                        ptr: out.at(i0 * ld + r0),
                        ld,
                    },
                )
            }
        }
        _ => {
            let mut dots = [0f32; FUSED_MAX_ROWS];
            for (r, row) in (r0..r1).zip(rows.chunks_exact(rb)) {
                q8::dots_scalar(ty, row, a, i0, &mut dots[..g]);
                for (i, &d) in dots[..g].iter().enumerate() {
                    // SAFETY: as above (the caller's disjoint, in-bounds share).
                    unsafe { *out.at((i0 + i) * ld + r) = d };
                }
            }
        }
    }
}

/// `out[i·ld + col0(s) + r] = (x · Wₛᵀ)[i, r]` for the row segments `segments` of a stacked
/// matrix (all `cols` wide; segment `s` writes columns `col0(s) .. col0(s) + rows(s)`, the
/// segments one after the other from column 0), each with the activations [`activations`]
/// chooses for its type; the activation rows are quantised once for all the segments that
/// use 8-bit ones.
///
/// # Panics
/// When the segments' widths differ from `x.len() / m`, their rows exceed `ld`, or `out` is
/// shorter than `m·ld`.
pub fn matmul_segments_with(
    isa: Isa,
    segments: &[GgmlMatrix],
    x: &[f32],
    m: usize,
    out: &mut [f32],
    ld: usize,
) {
    matmul_segments_at(isa, segments, x, m, out, ld, 0);
}

/// [`matmul_segments_with`] from column `col0`.
fn matmul_segments_at(
    isa: Isa,
    segments: &[GgmlMatrix],
    x: &[f32],
    m: usize,
    out: &mut [f32],
    ld: usize,
    mut col0: usize,
) {
    let Some(first) = segments.first() else {
        return;
    };
    let cols = first.cols;
    assert!(
        segments.iter().all(|s| s.cols == cols),
        "segments of different widths"
    );
    assert_eq!(Some(x.len()), m.checked_mul(cols), "activation length");
    let eff = effective(isa);
    let int8: Vec<bool> = segments
        .iter()
        .map(|s| m > 0 && cols > 0 && use_int8(eff, s.ty, m))
        .collect();
    let need = |k: bool| {
        segments
            .iter()
            .zip(&int8)
            .any(|(s, &i)| i && (s.ty.block_elems() == 256) == k)
    };
    let a = int8
        .iter()
        .any(|&i| i)
        .then(|| Q8Activations::new(x, m, cols, need(false), need(true)));
    if let (Some(a), true) = (&a, int8.iter().all(|&i| i)) {
        matmul_q8_segments(eff, segments, a, out, ld, col0);
        return;
    }
    // Many rows on AVX512-BF16: exact bf16 codes, the multipliers and offsets in f32, bf16
    // activations (see `quant::bf16_tiles`).
    let bf16: Vec<bool> = segments
        .iter()
        .zip(&int8)
        .map(|(s, &i)| {
            !i && s.ty.block_elems().is_multiple_of(32)
                && cols.is_multiple_of(32)
                && crate::quant::uses_bf16_tiles(eff, m)
        })
        .collect();
    let with_sums = segments
        .iter()
        .zip(&bf16)
        .any(|(s, &b)| b && blocks::has_min(s.ty));
    let pairs = bf16.iter().any(|&b| b).then(|| {
        if with_sums {
            crate::quant::bf16_tiles::Bf16Pairs::with_sums(x, m, cols)
        } else {
            crate::quant::bf16_tiles::Bf16Pairs::new(x, m, cols)
        }
    });
    for ((s, &i), &b) in segments.iter().zip(&int8).zip(&bf16) {
        match (&a, i, &pairs, b) {
            (Some(a), true, _, _) => s.matmul_q8_into_with(isa, a, out, ld, col0),
            (_, _, Some(p), true) => s.matmul_bf16_into(p, out, ld, col0),
            _ => s.matmul_f32_into_with(isa, x, m, out, ld, col0),
        }
        col0 += s.rows;
    }
}

/// Check that a row-major `[m, ld]` output of `len` elements holds the columns
/// `col0 .. col0 + rows`.
///
/// # Panics
/// When `col0 + rows > ld` or `len < m·ld`.
fn check_output_columns(m: usize, len: usize, ld: usize, col0: usize, rows: usize) {
    assert!(
        col0.checked_add(rows).is_some_and(|end| end <= ld),
        "columns {col0}..{col0}+{rows} outside an output row of {ld}"
    );
    assert!(m.checked_mul(ld).is_some_and(|n| n <= len), "output length");
}

/// The products of row segments that all take the 8-bit activations `a` (one matrix, or a
/// decode step's stacked q, k and v, or an expert's gate and up), segment `s` into columns
/// `col0(s) .. col0(s) + rows(s)` of the row-major `[a.rows, ld]` output from `col0` on, with
/// an effective `isa`: tasks of 16 weight rows (larger ones measured slower at batch 1), every
/// group of activation rows over them, and the tasks of every segment in one parallel region,
/// so a stacked product forks and joins the pool once rather than once per segment.
///
/// # Panics
/// When a segment's width differs from `a`'s, `a` lacks a segment's blocks, the segments'
/// columns pass `ld`, or `out` is shorter than `a.rows · ld`.
fn matmul_q8_segments(
    isa: Isa,
    segments: &[GgmlMatrix],
    a: &Q8Activations,
    out: &mut [f32],
    ld: usize,
    col0: usize,
) {
    let (m, cols) = (a.rows, a.cols);
    let rows: usize = segments.iter().map(|s| s.rows).sum();
    check_output_columns(m, out.len(), ld, col0, rows);
    for s in segments {
        assert_eq!(s.cols, cols, "activation width");
        assert!(
            a.serves(s.ty),
            "activations without the {} blocks of {}",
            s.ty.block_elems(),
            s.ty
        );
    }
    if m == 0 || rows == 0 {
        return;
    }
    let kind = int_isa(isa);
    let group = int_group_rows(kind);
    // Task t is rows 16·(t − first[s]) .. of segment s, the last segment with first[s] ≤ t;
    // segment s writes from column col0 + Σ rows of the segments before it.
    let mut first = Vec::with_capacity(segments.len());
    let mut columns = Vec::with_capacity(segments.len());
    let (mut tasks, mut c0) = (0, col0);
    for s in segments {
        first.push(tasks);
        columns.push(c0);
        tasks += s.rows.div_ceil(16);
        c0 += s.rows;
    }
    let base = OutPtr(out.as_mut_ptr());
    let run = |t: usize| {
        let i = first.partition_point(|&f| f <= t) - 1;
        let mat = &segments[i];
        let r0 = (t - first[i]) * 16;
        let r1 = (r0 + 16).min(mat.rows);
        for g0 in (0..m).step_by(group) {
            let g = (m - g0).min(group);
            // Elements (j, c + r) of this task (j < m, r0 ≤ r < r1, c its segment's first
            // column) are in bounds (c + r < col0 + rows ≤ ld, checked) and no other task's
            // (segments own disjoint columns, tasks disjoint rows of a segment).
            q8_rows_dots(kind, mat, r0, r1, a, g0, g, OutPtr(base.at(columns[i])), ld);
        }
    };
    if tasks <= 1 || rows * m * cols < 1 << 15 || crate::quant::kept_on_this_thread() {
        (0..tasks).for_each(run);
    } else {
        (0..tasks).into_par_iter().for_each(run);
    }
}

/// Whether a product of `m` activation rows with skymoe's own int8 rows of `cols` columns
/// (one scale per row) on `isa` uses 8-bit activations: as for Q8_0 under the current
/// [`activations`], for rows of whole 32-value blocks, unless the rows take the bf16 tiles
/// ([`crate::quant::uses_bf16_tiles`]: beyond 16 rows on AVX512-BF16).
pub fn int8_rows_use_q8(isa: Isa, cols: usize, m: usize) -> bool {
    let isa = effective(isa);
    m > 0 && cols > 0 && cols.is_multiple_of(32) && use_int8(isa, GgmlType::Q8_0, m)
}

/// `a · Wᵀ` for skymoe's own int8 matrix `W = diag(scales) · q` (`q`: `[rows, a.cols()]`
/// signed bytes, `a.cols()` a multiple of 32) and the 8-bit activations `a` (32-value
/// blocks), multithreaded, in integers: each row's products in the arithmetic of Q8_0 with
/// block scales of 1 (the same bits on every instruction set), then times the row's scale.
/// Written into columns `col0 .. col0 + rows` of the row-major `[m, ld]` output `out`. The
/// products of `QMatrix` run its tasks ([`int8_rows_q8_task`]) in their own parallel
/// regions; this whole product serves the tests.
///
/// # Panics
/// When the lengths disagree, `col0 + rows > ld`, `a.cols()` is not a multiple of 32 or `a`
/// lacks 32-value blocks.
#[cfg(test)]
pub(crate) fn int8_rows_matmul_q8(
    isa: Isa,
    q: &[i8],
    scales: &[f32],
    a: &Q8Activations,
    out: &mut [f32],
    ld: usize,
    col0: usize,
) {
    let (m, cols, rows) = (a.rows, a.cols, scales.len());
    assert!(cols.is_multiple_of(32), "{cols} columns in 32-value blocks");
    assert!(a.b32.is_some(), "activations without 32-value blocks");
    assert_eq!(Some(q.len()), rows.checked_mul(cols), "weight length");
    assert!(col0 + rows <= ld, "output columns out of range");
    assert!(
        m.checked_mul(ld).is_some_and(|n| out.len() >= n),
        "output length"
    );
    if m == 0 || rows == 0 || cols == 0 {
        return;
    }
    let ptr = out[col0..].as_mut_ptr();
    let base = OutPtr(ptr);
    // Tasks of 16 weight rows, as the ggml products.
    par_ranges(rows, 16, m * cols, |r0, r1| {
        // SAFETY: `q` holds `rows` rows of `cols` and `a` 32-value blocks of its `m` rows
        // (asserted); the elements i·ld + r (i < m, r0 <= r < r1) from `ptr` are in bounds
        // (col0 + r < ld, i < m) and only this task writes them.
        unsafe { int8_rows_q8_task(isa, q, scales, a, base.at(0), ld, r0, r1) }
    });
}

/// Rows `r0 .. r1` of [`int8_rows_matmul_q8`]'s product (`q`: `[scales.len(), a.cols()]`),
/// element `(i, r)` written at `ptr + i·ld + r`.
///
/// # Safety
/// `r1 <= scales.len()`, `q.len() == scales.len() · a.cols()`, `a.cols()` a multiple of 32 and
/// `a` with 32-value blocks; the elements `i·ld + r` (`i < a.rows()`, `r0 <= r < r1`) from
/// `ptr` are in bounds and written by nobody else meanwhile.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn int8_rows_q8_task(
    isa: Isa,
    q: &[i8],
    scales: &[f32],
    a: &Q8Activations,
    ptr: *mut f32,
    ld: usize,
    r0: usize,
    r1: usize,
) {
    let (m, cols) = (a.rows, a.cols);
    let kind = int_isa(effective(isa));
    let group = int_group_rows(kind);
    let ptr = OutPtr(ptr);
    let w = &q[r0 * cols..r1 * cols];
    // The task's row scales are read after its products: requested first, they arrive
    // meanwhile instead of missing then.
    #[cfg(target_arch = "x86_64")]
    x86::prefetch_first(f32_bytes(&scales[r0..r1]));
    for g0 in (0..m).step_by(group) {
        let g = (m - g0).min(group);
        match kind {
            #[cfg(target_arch = "x86_64")]
            IntIsa::Avx2 | IntIsa::Vnni => {
                // SAFETY: the instruction set is supported (`int_isa` of an effective one);
                // `w` holds r1 − r0 rows of `cols` bytes; `a` has 32-value blocks of its `m`
                // rows; the elements (g0 + i)·ld + r are in bounds and this task's (the
                // caller's guarantee).
                unsafe {
                    x86_q8::rows_dots(
                        kind == IntIsa::Vnni,
                        x86_q8::Rows::Int8,
                        w.as_ptr() as *const u8,
                        r1 - r0,
                        act_view(a, GgmlType::Q8_0),
                        g0,
                        g,
                        x86_q8::Out {
                            ptr: ptr.at(g0 * ld + r0),
                            ld,
                        },
                    )
                }
            }
            _ => {
                let mut dots = [0f32; FUSED_MAX_ROWS];
                for (r, row) in (r0..r1).zip(w.chunks_exact(cols)) {
                    q8::int8_dots_scalar(row, a, g0, &mut dots[..g]);
                    for (i, &d) in dots[..g].iter().enumerate() {
                        // SAFETY: as above (this task's in-bounds elements).
                        unsafe { *ptr.at((g0 + i) * ld + r) = d };
                    }
                }
            }
        }
        for i in g0..g0 + g {
            for (r, &s) in (r0..r1).zip(&scales[r0..r1]) {
                // SAFETY: as above (this task's in-bounds elements, written just now).
                unsafe { *ptr.at(i * ld + r) *= s };
            }
        }
    }
}

/// The bytes of floats (for prefetching).
#[cfg(target_arch = "x86_64")]
fn f32_bytes(v: &[f32]) -> &[u8] {
    // SAFETY: any initialised f32 is four initialised bytes, u8 has alignment 1, and the slice
    // covers the same memory.
    unsafe { std::slice::from_raw_parts(v.as_ptr() as *const u8, std::mem::size_of_val(v)) }
}

/// The fused dot product of one weight row (the blocks `row`, `x.len()` weights) with the f32
/// vector `x`, with the detected instruction set.
///
/// # Panics
/// When `row` is not the [`GgmlType::row_bytes`] of `x.len()` weights.
pub fn dot_row(ty: GgmlType, row: &[u8], x: &[f32]) -> f32 {
    dot_row_with(Isa::detect(), ty, row, x)
}

/// [`dot_row`] with a given instruction set (an unsupported one runs scalar code).
///
/// # Panics
/// When `row` is not the [`GgmlType::row_bytes`] of `x.len()` weights.
pub fn dot_row_with(isa: Isa, ty: GgmlType, row: &[u8], x: &[f32]) -> f32 {
    assert_eq!(
        ty.row_bytes(x.len()),
        Some(row.len()),
        "{ty}: {} bytes of blocks for {} weights",
        row.len(),
        x.len()
    );
    let mut d = [0f32];
    row_dots(effective(isa), ty, row, x, x.len(), &mut d);
    d[0]
}

impl GgmlMatrix {
    /// A `[rows, cols]` matrix of type `ty` whose blocks start at `offset` in `bytes`.
    ///
    /// Errors when `cols` is not a multiple of the block size, the byte size overflows, or
    /// `bytes` ends before the tensor does.
    pub fn new(
        ty: GgmlType,
        rows: usize,
        cols: usize,
        bytes: GgmlBytes,
        offset: usize,
    ) -> Result<Self, GgmlError> {
        let row_bytes = if !cols.is_multiple_of(ty.block_elems()) {
            return Err(GgmlError::Cols {
                ty,
                rows,
                cols,
                block: ty.block_elems(),
            });
        } else {
            ty.row_bytes(cols)
        };
        let overflow = GgmlError::Overflow {
            ty,
            rows,
            cols,
            offset,
        };
        let row_bytes = row_bytes.ok_or(overflow.clone())?;
        let len = rows.checked_mul(row_bytes).ok_or(overflow.clone())?;
        let end = offset.checked_add(len).ok_or(overflow)?;
        let found = (*bytes).as_ref().len();
        if end > found {
            return Err(GgmlError::Length {
                ty,
                rows,
                cols,
                offset,
                expected: len,
                found,
            });
        }
        Ok(GgmlMatrix {
            ty,
            rows,
            cols,
            bytes,
            offset,
            row_bytes,
        })
    }

    /// [`GgmlMatrix::new`] with a ggml type id.
    pub fn from_type_id(
        id: u32,
        rows: usize,
        cols: usize,
        bytes: GgmlBytes,
        offset: usize,
    ) -> Result<Self, GgmlError> {
        let ty = GgmlType::from_id(id).ok_or(GgmlError::UnsupportedType(id))?;
        Self::new(ty, rows, cols, bytes, offset)
    }

    /// A matrix owning exactly its blocks.
    pub fn from_vec(
        ty: GgmlType,
        rows: usize,
        cols: usize,
        bytes: Vec<u8>,
    ) -> Result<Self, GgmlError> {
        let found = bytes.len();
        let m = Self::new(ty, rows, cols, Arc::new(bytes), 0)?;
        if m.storage_bytes() != found {
            return Err(GgmlError::Length {
                ty,
                rows,
                cols,
                offset: 0,
                expected: m.storage_bytes(),
                found,
            });
        }
        Ok(m)
    }

    /// The quantisation type.
    pub fn ty(&self) -> GgmlType {
        self.ty
    }

    /// Rows (output features).
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Columns (input features).
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Bytes of the tensor's blocks.
    pub fn storage_bytes(&self) -> usize {
        self.rows * self.row_bytes
    }

    /// The tensor's blocks (all rows).
    pub fn blocks(&self) -> &[u8] {
        &(*self.bytes).as_ref()[self.offset..self.offset + self.storage_bytes()]
    }

    /// Rows `range` of this matrix, sharing its bytes (no copy); `None` when the range is not
    /// within `0..rows`.
    pub fn slice_rows(&self, range: std::ops::Range<usize>) -> Option<GgmlMatrix> {
        if range.start > range.end || range.end > self.rows {
            return None;
        }
        Some(GgmlMatrix {
            rows: range.len(),
            offset: self.offset + range.start * self.row_bytes,
            ..self.clone()
        })
    }

    /// A matrix owning copies of rows `order` of this one, in that order (a row permutation
    /// or selection); `None` when an index is out of range.
    pub fn gather_rows(&self, order: &[usize]) -> Option<GgmlMatrix> {
        let mut bytes = Vec::with_capacity(order.len() * self.row_bytes);
        for &r in order {
            if r >= self.rows {
                return None;
            }
            bytes.extend_from_slice(self.row_bytes_of(r));
        }
        Some(GgmlMatrix {
            rows: order.len(),
            offset: 0,
            bytes: Arc::new(bytes),
            ..self.clone()
        })
    }

    /// The blocks of row `r`.
    ///
    /// # Panics
    /// When `r >= rows`.
    pub fn row_bytes_of(&self, r: usize) -> &[u8] {
        assert!(r < self.rows, "row {r} of {}", self.rows);
        &self.blocks()[r * self.row_bytes..(r + 1) * self.row_bytes]
    }

    /// Dequantise row `r` into `out[..cols]` (bit-exact with ggml / `gguf.quants`).
    ///
    /// # Panics
    /// When `r >= rows` or `out` is shorter than `cols`.
    pub fn dequantize_row(&self, r: usize, out: &mut [f32]) {
        self.dequantize_row_with(Isa::detect(), r, out);
    }

    /// [`GgmlMatrix::dequantize_row`] with a given instruction set.
    pub fn dequantize_row_with(&self, isa: Isa, r: usize, out: &mut [f32]) {
        assert!(out.len() >= self.cols, "output shorter than a row");
        dequantize_blocks(
            effective(isa),
            self.ty,
            self.row_bytes_of(r),
            &mut out[..self.cols],
        );
    }

    /// The whole matrix as row-major f32.
    pub fn dequantize(&self) -> Vec<f32> {
        let mut out = vec![0f32; self.rows * self.cols];
        if self.cols > 0 {
            for (r, row) in out.chunks_mut(self.cols).enumerate() {
                self.dequantize_row(r, row);
            }
        }
        out
    }

    /// `out[m, rows] = x[m, cols] · Wᵀ`, multithreaded, dequantisation fused.
    ///
    /// # Panics
    /// When `x.len() != m·cols` or `out.len() != m·rows`.
    pub fn matmul(&self, x: &[f32], m: usize, out: &mut [f32]) {
        self.matmul_with(Isa::detect(), x, m, out);
    }

    /// [`GgmlMatrix::matmul`] with a given instruction set (an unsupported one runs scalar
    /// code).
    pub fn matmul_with(&self, isa: Isa, x: &[f32], m: usize, out: &mut [f32]) {
        assert_eq!(Some(out.len()), m.checked_mul(self.rows), "output length");
        self.matmul_into_with(isa, x, m, out, self.rows, 0);
    }

    /// `out[i·ld + col0 + r] = (x · Wᵀ)[i, r]` for `i < m`, `r < rows`: the product written
    /// into columns `col0..col0 + rows` of a row-major `[m, ld]` output (the rows of a stacked
    /// projection), other columns untouched.
    ///
    /// # Panics
    /// When `x.len() != m·cols`, `col0 + rows > ld`, or `out` is shorter than `m·ld`.
    pub fn matmul_into(&self, x: &[f32], m: usize, out: &mut [f32], ld: usize, col0: usize) {
        self.matmul_into_with(Isa::detect(), x, m, out, ld, col0);
    }

    /// [`GgmlMatrix::matmul_into`] with a given instruction set (an unsupported one runs
    /// scalar code), with the activations [`activations`] chooses.
    pub fn matmul_into_with(
        &self,
        isa: Isa,
        x: &[f32],
        m: usize,
        out: &mut [f32],
        ld: usize,
        col0: usize,
    ) {
        matmul_segments_at(isa, std::slice::from_ref(self), x, m, out, ld, col0);
    }

    /// Check that an `[m, ld]` output holds this product's columns `col0 .. col0 + rows`, and
    /// settle the products with nothing to compute: `true` when there is none left (no rows,
    /// or no columns, whose products are zero and are written so).
    ///
    /// # Panics
    /// When `col0 + rows > ld` or `out` is shorter than `m·ld`.
    fn output_is_trivial(&self, m: usize, out: &mut [f32], ld: usize, col0: usize) -> bool {
        let rows = self.rows;
        check_output_columns(m, out.len(), ld, col0, rows);
        if m == 0 || rows == 0 {
            return true;
        }
        if self.cols == 0 {
            for i in 0..m {
                out[i * ld + col0..i * ld + col0 + rows].fill(0.0);
            }
            return true;
        }
        false
    }

    /// The product of this matrix with the bf16 activations `a` (with their 16-column sums
    /// where the type has offsets), multithreaded: each task's rows are decoded into their
    /// integer values (exact in bf16) and the multiplier and offset of each group of 16 or 32
    /// weights, and multiplied through
    /// [`crate::quant::bf16_tiles`] (on a CPU that [`crate::quant::uses_bf16_tiles`] allows);
    /// into columns `col0 .. col0 + rows` of the `[a.rows, ld]` output `out`.
    ///
    /// # Panics
    /// As [`GgmlMatrix::matmul_into`].
    fn matmul_bf16_into(
        &self,
        a: &crate::quant::bf16_tiles::Bf16Pairs,
        out: &mut [f32],
        ld: usize,
        col0: usize,
    ) {
        use crate::quant::bf16_tiles::{products_grouped, task_rows};
        assert!(
            self.cols.is_multiple_of(32),
            "rows of whole 32-weight groups"
        );
        assert_eq!(a.pairs, self.cols / 2, "activation width");
        assert!(crate::quant::bf16_tiles::supported(), "no AVX512-BF16 here");
        let m = a.rows;
        if self.output_is_trivial(m, out, ld, col0) {
            return;
        }
        let (rows, cols, rb, ty) = (self.rows, self.cols, self.row_bytes, self.ty);
        let span = blocks::group_span(ty);
        let with_min = blocks::has_min(ty);
        let ng = cols / span;
        let blocks = self.blocks();
        let ptr = OutPtr(out[col0..].as_mut_ptr());
        par_ranges(rows, task_rows(cols), m * cols, |r0, r1| {
            BF16_TILE.with(|buf| {
                let mut buf = buf.borrow_mut();
                let (tile, scales, offsets) = &mut *buf;
                let n = r1 - r0;
                tile.resize(tile.len().max(n * cols / 2), 0);
                scales.resize(scales.len().max(n * ng), 0.0);
                offsets.resize(offsets.len().max(n * ng), 0.0);
                for (j, r) in (r0..r1).enumerate() {
                    codes_bf16(
                        ty,
                        &blocks[r * rb..(r + 1) * rb],
                        &mut tile[j * cols / 2..(j + 1) * cols / 2],
                        &mut scales[j * ng..(j + 1) * ng],
                        &mut offsets[j * ng..(j + 1) * ng],
                    );
                }
                // SAFETY: as above; the tile, scales and offsets hold n rows, `a` its sums
                // where offsets are used (the caller builds them for such types); the output
                // elements i·ld + col0 + r0 .. + r1 (i < m) are in bounds (checked above) and
                // only this task writes them.
                unsafe {
                    products_grouped(
                        a,
                        tile,
                        n,
                        span,
                        scales,
                        with_min.then_some(&offsets[..]),
                        ptr.at(r0),
                        ld,
                    )
                };
            })
        });
    }

    /// [`GgmlMatrix::matmul_into_with`] with f32 activations, whatever [`activations`] says.
    ///
    /// # Panics
    /// As [`GgmlMatrix::matmul_into`].
    pub fn matmul_f32_into_with(
        &self,
        isa: Isa,
        x: &[f32],
        m: usize,
        out: &mut [f32],
        ld: usize,
        col0: usize,
    ) {
        assert_eq!(Some(x.len()), m.checked_mul(self.cols), "activation length");
        if self.output_is_trivial(m, out, ld, col0) {
            return;
        }
        let isa = effective(isa);
        let (rows, cols, ty, rb) = (self.rows, self.cols, self.ty, self.row_bytes);
        let blocks = self.blocks();
        // Element (i, r) of this product is at `i·ld + r` from here.
        let ptr = OutPtr(out[col0..].as_mut_ptr());
        if m <= FUSED_MAX_CHUNKED_ROWS {
            // Tasks of 16 weight rows; every group of activation rows runs over them, so the
            // rows come from memory once and from cache for the other groups.
            let group = group_rows(isa);
            par_ranges(rows, 16, m * cols, |r0, r1| {
                let mut dots = [0f32; FUSED_MAX_ROWS];
                for g0 in (0..m).step_by(group) {
                    let g = (m - g0).min(group);
                    let xg = &x[g0 * cols..(g0 + g) * cols];
                    for r in r0..r1 {
                        row_dots(
                            isa,
                            ty,
                            &blocks[r * rb..(r + 1) * rb],
                            xg,
                            cols,
                            &mut dots[..g],
                        );
                        for (i, &d) in dots[..g].iter().enumerate() {
                            // SAFETY: element (g0 + i, r) is in bounds ((g0 + i)·ld + col0 + r
                            // < m·ld as r < rows ≤ ld − col0, g0 + i < m) and only this task
                            // writes column r.
                            unsafe { *ptr.at((g0 + i) * ld + r) = d };
                        }
                    }
                }
            });
            return;
        }
        // Many activation rows: dequantise a tile of weight rows into a per-thread buffer (at
        // most ~256 KiB, whole micro-kernel panels) and multiply it with a GEMM.
        let tile = crate::quant::tile_rows(cols);
        par_ranges(rows, tile, m * cols, |r0, r1| {
            TILE.with(|buf| {
                let mut buf = buf.borrow_mut();
                let n = r1 - r0;
                if buf.len() < n * cols {
                    buf.resize(n * cols, 0.0);
                }
                for (j, r) in (r0..r1).enumerate() {
                    dequantize_blocks(
                        isa,
                        ty,
                        &blocks[r * rb..(r + 1) * rb],
                        &mut buf[j * cols..(j + 1) * cols],
                    );
                }
                // SAFETY: `x` is [m, cols] row-major, the tile [n, cols] row-major read as its
                // transpose [cols, n]; the destination is columns col0 + r0..col0 + r1 of
                // `out` [m, ld] (row stride `ld`, col0 + r1 ≤ ld), written by this task only.
                // All extents are in bounds.
                unsafe {
                    gemm::gemm(
                        m,
                        n,
                        cols,
                        ptr.at(r0),
                        1,
                        ld as isize,
                        false,
                        x.as_ptr(),
                        1,
                        cols as isize,
                        buf.as_ptr(),
                        cols as isize,
                        1,
                        0.0f32,
                        1.0f32,
                        false,
                        false,
                        false,
                        gemm::Parallelism::None,
                    );
                }
            })
        });
    }

    /// `out[m, rows] = a · Wᵀ` with the 8-bit activations `a` (`[m, cols]`, with blocks of
    /// this type's size), multithreaded, in integers.
    ///
    /// # Panics
    /// When `a` has another width or lacks this type's blocks, or `out.len() != m·rows`.
    pub fn matmul_q8_with(&self, isa: Isa, a: &Q8Activations, out: &mut [f32]) {
        assert_eq!(
            Some(out.len()),
            a.rows.checked_mul(self.rows),
            "output length"
        );
        self.matmul_q8_into_with(isa, a, out, self.rows, 0);
    }

    /// [`GgmlMatrix::matmul_q8_with`] written into columns `col0 .. col0 + rows` of a
    /// row-major `[m, ld]` output, as [`GgmlMatrix::matmul_into`].
    ///
    /// # Panics
    /// When `a` has another width or lacks this type's blocks, `col0 + rows > ld`, or `out`
    /// is shorter than `m·ld`.
    pub fn matmul_q8_into_with(
        &self,
        isa: Isa,
        a: &Q8Activations,
        out: &mut [f32],
        ld: usize,
        col0: usize,
    ) {
        let m = a.rows;
        assert_eq!(a.cols, self.cols, "activation width");
        assert!(
            a.serves(self.ty),
            "activations without the {} blocks of {}",
            self.ty.block_elems(),
            self.ty
        );
        if self.output_is_trivial(m, out, ld, col0) {
            return;
        }
        matmul_q8_segments(effective(isa), std::slice::from_ref(self), a, out, ld, col0);
    }

    /// The reference of [`GgmlMatrix::matmul_q8_with`]: the dequantised weights times the
    /// dequantised 8-bit activations, accumulated in f64. For Q4_1 and Q5_1 a block's minimum
    /// multiplies the activations' stored `d·Σq` (rounded to f16, as llama.cpp's
    /// `block_q8_1::s`) rather than the dequantised values' sum.
    ///
    /// # Panics
    /// When `a` has another width or lacks this type's blocks.
    pub fn matmul_q8_reference(&self, a: &Q8Activations) -> Vec<f32> {
        assert_eq!(a.cols, self.cols, "activation width");
        let x = a
            .dequantize_for(self.ty)
            .expect("activations with this type's blocks");
        let mut out = self.matmul_reference(&x, a.rows);
        if blocks::has_min(self.ty) && self.ty.block_elems() == 32 {
            let b = a.b32.as_ref().expect("32-value activation blocks");
            let nb = self.cols / 32;
            for i in 0..a.rows {
                for r in 0..self.rows {
                    let row_blocks = self.row_bytes_of(r).chunks_exact(self.ty.block_bytes());
                    let shift: f64 = row_blocks
                        .enumerate()
                        .map(|(k, blk)| {
                            let j = i * nb + k;
                            let min = blocks::prep(self.ty, blk).o[0] as f64;
                            min * (b.dsum[j] as f64 - b.d[j] as f64 * b.sum[j] as f64)
                        })
                        .sum();
                    let o = &mut out[i * self.rows + r];
                    *o = (*o as f64 + shift) as f32;
                }
            }
        }
        out
    }

    /// The plain reference: dequantise the whole matrix, then multiply with f64 accumulation.
    pub fn matmul_reference(&self, x: &[f32], m: usize) -> Vec<f32> {
        assert_eq!(x.len(), m * self.cols, "activation length");
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

#[cfg(test)]
pub(crate) mod tests;
#[cfg(test)]
mod tests_q8;
