//! Instruction-set dispatch, the portable scalar kernels, and the choice of a product's
//! strategy: fused row dot products (few activation rows), integer (int8) and bf16 (FP8)
//! products, register-blocked f16/f32 products (`super::blocked`, 8 to 128 rows on AVX-512),
//! and dequantised tiles fed to a GEMM (many rows).

use std::cell::RefCell;
use std::sync::OnceLock;

use super::fp8::e4m3_table;
use rayon::prelude::*;

use super::{QData, QMatrix, Q4_GROUP};

/// The instruction set the kernels use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Isa {
    /// Portable Rust.
    Scalar,
    /// AVX2 + FMA + F16C.
    Avx2,
    /// AVX-512 (F, BW) + FMA + F16C.
    Avx512,
}

/// The x86 feature sets the kernels are built for, as this CPU has them.
#[cfg(target_arch = "x86_64")]
#[derive(Debug, Clone, Copy)]
pub(crate) struct X86Support {
    /// AVX2 with FMA and F16C.
    pub(crate) avx2: bool,
    /// That and AVX-512 F and BW.
    pub(crate) avx512: bool,
    /// That and AVX-512 VL.
    pub(crate) avx512_vl: bool,
}

/// This CPU's [`X86Support`], detected on first use.
#[cfg(target_arch = "x86_64")]
pub(crate) fn x86_support() -> X86Support {
    static SUPPORT: OnceLock<X86Support> = OnceLock::new();
    *SUPPORT.get_or_init(|| {
        let avx2 = is_x86_feature_detected!("avx2")
            && is_x86_feature_detected!("fma")
            && is_x86_feature_detected!("f16c");
        let avx512 =
            avx2 && is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512bw");
        X86Support {
            avx2,
            avx512,
            avx512_vl: avx512 && is_x86_feature_detected!("avx512vl"),
        }
    })
}

impl Isa {
    /// The best instruction set of this CPU, or the one `SKYMOE_ISA` names (if supported).
    pub fn detect() -> Isa {
        static ISA: OnceLock<Isa> = OnceLock::new();
        *ISA.get_or_init(|| {
            let forced = std::env::var("SKYMOE_ISA")
                .ok()
                .and_then(|v| match v.as_str() {
                    "scalar" => Some(Isa::Scalar),
                    "avx2" => Some(Isa::Avx2),
                    "avx512" => Some(Isa::Avx512),
                    _ => None,
                });
            match forced {
                Some(isa) if isa.supported() => isa,
                _ => [Isa::Avx512, Isa::Avx2]
                    .into_iter()
                    .find(|i| i.supported())
                    .unwrap_or(Isa::Scalar),
            }
        })
    }

    /// Whether this CPU can run the instruction set (detected once: the kernels ask on every
    /// task).
    pub fn supported(self) -> bool {
        match self {
            Isa::Scalar => true,
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => x86_support().avx2,
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => x86_support().avx512,
            #[cfg(not(target_arch = "x86_64"))]
            _ => false,
        }
    }

    /// A short name.
    pub fn name(self) -> &'static str {
        match self {
            Isa::Scalar => "scalar",
            Isa::Avx2 => "avx2",
            Isa::Avx512 => "avx512",
        }
    }
}

/// Most activation rows one fused dot-product kernel handles at once.
pub(crate) const FUSED_MAX_ROWS: usize = 8;

/// Most activation rows handled by the fused kernels (in groups of [`FUSED_MAX_ROWS`]);
/// more go through dequantised tiles and a GEMM.
pub(crate) const FUSED_MAX_CHUNKED_ROWS: usize = 16;

/// The per-row scale applied after the dot product (int8, fp8), else 1.
fn row_scale(mat: &QMatrix, r: usize) -> f32 {
    match &mat.data {
        QData::Int8 { scales, .. } | QData::Fp8 { scales, .. } => scales[r],
        _ => 1.0,
    }
}

/// Add to `acc[i]` the dot products of activation row `i` of `x` (rows of `cols`) with row
/// `r` of `mat` over columns `from..cols`, before the per-row scale (q4 group scales applied).
/// `from` is a multiple of 32 for q4.
fn scalar_partial(mat: &QMatrix, r: usize, x: &[f32], from: usize, acc: &mut [f32]) {
    let cols = mat.cols;
    let rows_x = acc.len();
    match &mat.data {
        QData::F32(w) => {
            let wr = &w[r * cols..(r + 1) * cols];
            for (i, a) in acc.iter_mut().enumerate().take(rows_x) {
                let xi = &x[i * cols..(i + 1) * cols];
                *a += (from..cols).map(|c| xi[c] * wr[c]).sum::<f32>();
            }
        }
        QData::F16(w) => {
            let wr = &w[r * cols..(r + 1) * cols];
            for (i, a) in acc.iter_mut().enumerate() {
                let xi = &x[i * cols..(i + 1) * cols];
                *a += (from..cols)
                    .map(|c| xi[c] * half::f16::from_bits(wr[c]).to_f32())
                    .sum::<f32>();
            }
        }
        QData::Int8 { q, .. } => {
            let wr = &q[r * cols..(r + 1) * cols];
            for (i, a) in acc.iter_mut().enumerate() {
                let xi = &x[i * cols..(i + 1) * cols];
                *a += (from..cols).map(|c| xi[c] * wr[c] as f32).sum::<f32>();
            }
        }
        QData::Fp8 { q, .. } => {
            let t = e4m3_table();
            let wr = &q[r * cols..(r + 1) * cols];
            for (i, a) in acc.iter_mut().enumerate() {
                let xi = &x[i * cols..(i + 1) * cols];
                *a += (from..cols).map(|c| xi[c] * t[wr[c] as usize]).sum::<f32>();
            }
        }
        QData::Q4 { packed, scales } => {
            let groups = super::q4_groups(cols);
            for g in from / Q4_GROUP..groups {
                let d = scales[r * groups + g];
                let bytes = &packed[(r * groups + g) * 16..(r * groups + g + 1) * 16];
                let len = Q4_GROUP.min(cols - g * Q4_GROUP);
                for (i, a) in acc.iter_mut().enumerate() {
                    let xi = &x[i * cols + g * Q4_GROUP..i * cols + g * Q4_GROUP + len];
                    let mut s = 0f32;
                    for (j, xv) in xi.iter().enumerate() {
                        let b = bytes[j % 16];
                        let q = if j < 16 { b & 0x0F } else { b >> 4 };
                        s += xv * (q as f32 - 8.0);
                    }
                    *a += d * s;
                }
            }
        }
    }
}

/// Dequantise row `r` of `mat` into `out` over columns `from..cols` (scales applied).
fn scalar_dequantize(mat: &QMatrix, r: usize, from: usize, out: &mut [f32]) {
    let cols = mat.cols;
    match &mat.data {
        QData::F32(w) => out[from..cols].copy_from_slice(&w[r * cols + from..(r + 1) * cols]),
        QData::F16(w) => {
            for c in from..cols {
                out[c] = half::f16::from_bits(w[r * cols + c]).to_f32();
            }
        }
        QData::Int8 { q, scales } => {
            for c in from..cols {
                out[c] = q[r * cols + c] as f32 * scales[r];
            }
        }
        QData::Fp8 { q, scales } => {
            let t = e4m3_table();
            for c in from..cols {
                out[c] = t[q[r * cols + c] as usize] * scales[r];
            }
        }
        QData::Q4 { packed, scales } => {
            let groups = super::q4_groups(cols);
            for (c, o) in out.iter_mut().enumerate().take(cols).skip(from) {
                let g = c / Q4_GROUP;
                let j = c % Q4_GROUP;
                let b = packed[(r * groups + g) * 16 + j % 16];
                let q = if j < 16 { b & 0x0F } else { b >> 4 };
                *o = scales[r * groups + g] * (q as f32 - 8.0);
            }
        }
    }
}

/// Dequantise row `r` with `isa`.
pub(crate) fn dequantize_row(isa: Isa, mat: &QMatrix, r: usize, out: &mut [f32]) {
    assert!(
        r < mat.rows && out.len() >= mat.cols,
        "row {r} out of range"
    );
    let done = match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 | Isa::Avx2 if isa.supported() => {
            // SAFETY: the CPU supports the instruction set (checked just above); the callee
            // reads row `r` of `mat` and writes `out[..cols]`, both in bounds (asserted).
            unsafe { super::x86::dequantize_row(isa, mat, r, out) }
        }
        _ => 0,
    };
    scalar_dequantize(mat, r, done, out);
}

/// Dot products of `M` activation rows with row `r`, scales applied.
fn row_dots<const M: usize>(isa: Isa, mat: &QMatrix, r: usize, x: &[f32]) -> [f32; M] {
    let (mut acc, done) = match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 | Isa::Avx2 => {
            // SAFETY: `matmul` only passes a supported `isa`; `x` holds `M` rows of `cols`
            // (asserted by the caller) and `r < rows`.
            unsafe { super::x86::row_dots::<M>(isa, mat, r, x) }
        }
        _ => ([0f32; M], 0),
    };
    if done < mat.cols {
        scalar_partial(mat, r, x, done, &mut acc);
    }
    let s = row_scale(mat, r);
    acc.map(|a| a * s)
}

/// Dot products of the `dots.len()` (1 to [`FUSED_MAX_ROWS`]) rows of `x` with row `r`.
fn fused_row_dots(isa: Isa, mat: &QMatrix, r: usize, x: &[f32], dots: &mut [f32]) {
    macro_rules! rows {
        ($($m:literal)*) => {
            match dots.len() {
                $($m => dots.copy_from_slice(&row_dots::<$m>(isa, mat, r, x)),)*
                _ => unreachable!("at most FUSED_MAX_ROWS activation rows"),
            }
        };
    }
    rows!(1 2 3 4 5 6 7 8);
}

/// A raw output pointer shared by tasks writing disjoint elements.
#[derive(Clone, Copy)]
struct OutPtr(*mut f32);
// SAFETY: tasks write disjoint elements of the buffer behind the pointer (disjoint row ranges
// of the weight matrix are disjoint output columns), and the buffer outlives them.
unsafe impl Send for OutPtr {}
// SAFETY: as above.
unsafe impl Sync for OutPtr {}

impl OutPtr {
    /// The pointer to element `i` (not dereferenced here).
    fn at(self, i: usize) -> *mut f32 {
        self.0.wrapping_add(i)
    }

    /// Write `v` at `i`.
    ///
    /// # Safety
    /// `i` is in bounds and no other task writes element `i`.
    unsafe fn write(self, i: usize, v: f32) {
        // SAFETY: guaranteed by the caller.
        unsafe { *self.0.add(i) = v }
    }
}

thread_local! {
    static TILE: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
    /// A task's weight rows converted to bf16 pairs (the BF16 tile path).
    static BF16_TILE: RefCell<Vec<u32>> = const { RefCell::new(Vec::new()) };
}

/// How a product runs for a number of activation rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Path {
    /// int8 rows with 8-bit activations and integer dot products (few rows).
    Int8Q8,
    /// FP8 rows with bf16 activations and AVX-512 BF16 dot products (few rows).
    Fp8Bf16,
    /// Fused dot products, weights decoded in registers (few rows).
    Fused,
    /// f16 or f32 rows in register blocks of several weight and activation rows (AVX-512).
    Blocked,
    /// Dequantised tiles of weight rows fed to a GEMM (many rows).
    Tiles,
    /// int8 or FP8 rows converted to exact bf16 tiles, bf16 activations and AVX-512 BF16
    /// dot products (many rows).
    Bf16Tiles,
}

fn path(isa: Isa, mat: &QMatrix, m: usize) -> Path {
    if matches!(mat.data, QData::Int8 { .. }) && crate::ggml::int8_rows_use_q8(isa, mat.cols, m) {
        Path::Int8Q8
    } else if matches!(mat.data, QData::Fp8 { .. }) && fp8_uses_bf16(isa, mat.cols, m) {
        Path::Fp8Bf16
    } else if matches!(mat.data, QData::Int8 { .. } | QData::Fp8 { .. }) && uses_bf16_tiles(isa, m)
    {
        Path::Bf16Tiles
    } else if blocked_rows(isa, mat, m) {
        Path::Blocked
    } else if m <= FUSED_MAX_CHUNKED_ROWS {
        Path::Fused
    } else {
        Path::Tiles
    }
}

/// Whether a product of `m` activation rows with `mat` on `isa` runs on the register-blocked
/// kernels (`super::blocked`): f16 and f32 rows on AVX-512, from 8 to 128 activation rows.
/// Measured with `examples/qmatmul` (1536×576 f16 from memory, 2 threads) against the fused
/// kernels (up to 16 rows) and the dequantised tiles: 1.1x at 8 rows, 1.25x at 16, 1.6x at
/// 32, 1.25x at 64, 1.1x at 128, level at 256; below 8 rows (bound by the memory's bandwidth)
/// the fused kernels are faster.
pub(crate) fn blocked_rows(isa: Isa, mat: &QMatrix, m: usize) -> bool {
    isa == Isa::Avx512
        && matches!(mat.data, QData::F16(_) | QData::F32(_))
        && (8..=128).contains(&m)
}

/// Activation rows above which skymoe's int8 and FP8 rows and the ggml blocks take the bf16
/// tiles where [`uses_bf16_tiles`] allows. Measured with `examples/qmatmul` (1536×576, two threads, µs per
/// product, the 8-bit or bf16 products of few rows against the tiles): int8 at 32 rows 270–294
/// against 195–204, at 64 rows 528–535 against 322–356; FP8 at 32 rows 318 against 194; level
/// at 16–24 rows. The decode phase with 32 sequences: int8 SmolLM2 MoE 400–402 → 480–493
/// tokens/s, FP8 424–428 → 467–469; the Q8_0 GGUF 358 → 435, Q4_K_M 318 → 405 (their
/// blocks decoded straight into the tiles).
pub const BF16_TILES_ABOVE_ROWS: usize = 16;

/// Whether a product of `m` activation rows with int8, FP8 or ggml rows on `isa` may convert
/// the weights to exact bf16 tiles and round the activations to bf16 (see `bf16_tiles`): on
/// CPUs with AVX512-BF16, for more than [`BF16_TILES_ABOVE_ROWS`] rows under
/// [`crate::ggml::GgmlActivations::Auto`]. skymoe's int8 and FP8 rows and the ggml blocks
/// then take them (their 8-bit and bf16 paths of few rows give way). Exact weights: int8 and
/// E4M3 codes, and the codes of ggml blocks with their groups' multipliers and offsets in f32.
pub fn uses_bf16_tiles(isa: Isa, m: usize) -> bool {
    crate::ggml::activations() == crate::ggml::GgmlActivations::Auto
        && m > BF16_TILES_ABOVE_ROWS
        && isa == Isa::Avx512
        && super::bf16_tiles::supported()
}

/// Whether a product of `m` activation rows with FP8 rows of `cols` columns on `isa` uses bf16
/// activations and the AVX-512 BF16 kernels (see `fp8_bf16`): on CPUs with them, for rows of
/// whole 64-column blocks, under the activations `crate::ggml::activations` chooses (auto:
/// 1 to 64 rows; f32: never; int8, i.e. low-precision activations everywhere: always).
/// Measured with `examples/qmatmul` (1536×576, 2 threads): 1.5x (4 rows), 2.0x (8), 1.5x (16)
/// and 1.8x (32) the f32 path's throughput from memory. One row is bound by the memory's
/// bandwidth (1.8x the f32 path from cache, about level from memory), but batch-1 decode of
/// the FP8 SmolLM2 MoE measured 1.04–1.05x with it (`skymoe bench`, 10 and 12 alternated
/// rounds, faster in 17 of 22): the f32 path's decoding only just keeps up with the memory.
pub(crate) fn fp8_uses_bf16(isa: Isa, cols: usize, m: usize) -> bool {
    use crate::ggml::GgmlActivations;
    let wanted = match crate::ggml::activations() {
        GgmlActivations::F32 => false,
        GgmlActivations::Int8 => true,
        GgmlActivations::Auto => (1..=64).contains(&m) && !uses_bf16_tiles(isa, m),
    };
    wanted
        && isa == Isa::Avx512
        && m > 0
        && cols > 0
        && cols.is_multiple_of(super::fp8_bf16::BLOCK)
        && super::fp8_bf16::supported()
}

/// The activations a product's tasks share: 8-bit (int8 rows on the integer path) and bf16
/// (FP8 rows on the BF16 path), each made once per product where some part needs it.
struct Shared {
    q8: Option<crate::ggml::Q8Activations>,
    bf16: Option<super::fp8_bf16::Bf16Activations>,
    pairs: Option<super::bf16_tiles::Bf16Pairs>,
}

/// Weight rows per task: 16 for the fused paths (larger tasks measured slower at batch 1),
/// a tile of at most ~256 KiB of dequantised rows for the GEMM path.
fn task_rows(path: Path, cols: usize) -> usize {
    match path {
        Path::Int8Q8 | Path::Fp8Bf16 | Path::Fused => 16,
        Path::Blocked => super::blocked::TASK_ROWS,
        Path::Tiles => tile_rows(cols),
        Path::Bf16Tiles => super::bf16_tiles::task_rows(cols),
    }
}

/// Weight rows per dequantised tile of `cols` columns: about 256 KiB of f32, whole 16-row
/// panels where that many fit (the GEMM's AVX2 micro-kernel covers 16 weight rows per call;
/// a tile of 113 rows left a 1-row remainder that took a call of its own for every six
/// activation rows).
pub(crate) fn tile_rows(cols: usize) -> usize {
    /// Weight rows one call of the `gemm` crate's f32 micro-kernel covers.
    const PANEL_ROWS: usize = 16;
    let rows = (65536 / cols.max(1)).clamp(8, 128);
    if rows >= PANEL_ROWS {
        rows / PANEL_ROWS * PANEL_ROWS
    } else {
        rows
    }
}

/// Rows `r0 .. r1` of the product `x[m, cols] · Wᵀ` of `mat` on `path`, element `(i, r)`
/// written at `ptr + i·ld + r`; `a`: the activations of `x` the path needs.
///
/// # Safety
/// `isa` is supported; `r1 <= mat.rows`, `x` holds `m` rows of `mat.cols`, `cols > 0`; the
/// elements `i·ld + r` (`i < m`, `r0 <= r < r1`) from `ptr` are in bounds and written by
/// nobody else meanwhile.
#[allow(clippy::too_many_arguments)]
unsafe fn product_rows(
    isa: Isa,
    path: Path,
    mat: &QMatrix,
    x: &[f32],
    m: usize,
    a: &Shared,
    ptr: OutPtr,
    ld: usize,
    (r0, r1): (usize, usize),
) {
    let cols = mat.cols;
    match path {
        Path::Int8Q8 => {
            let (QData::Int8 { q, scales }, Some(a)) = (&mat.data, &a.q8) else {
                unreachable!("the integer path is chosen for int8 rows with activations")
            };
            // SAFETY: the caller's guarantees, passed on.
            unsafe { crate::ggml::int8_rows_q8_task(isa, q, scales, a, ptr.0, ld, r0, r1) };
        }
        Path::Fp8Bf16 => {
            let (QData::Fp8 { q, scales }, Some(a)) = (&mat.data, &a.bf16) else {
                unreachable!("the BF16 path is chosen for FP8 rows with activations")
            };
            #[cfg(target_arch = "x86_64")]
            super::x86::prefetch_scales(mat, r0, r1);
            for g0 in (0..m).step_by(FUSED_MAX_ROWS) {
                let g = (m - g0).min(FUSED_MAX_ROWS);
                // SAFETY: the path is chosen only where the CPU runs the kernels; `q` holds
                // `mat.rows` rows of `cols` codes (r1 <= rows) with a scale each, the
                // activations `m` rows; the elements (g0 + i)·ld + r from `ptr` are in bounds
                // and this task's (the caller's guarantee).
                unsafe { super::fp8_bf16::rows_dots(q, scales, a, g0, g, ptr.0, ld, (r0, r1)) };
            }
        }
        Path::Fused => {
            // Every group of up to FUSED_MAX_ROWS activation rows runs over the task's weight
            // rows, so they are read from memory once and from cache for the other groups.
            #[cfg(target_arch = "x86_64")]
            if isa != Isa::Scalar {
                super::x86::prefetch_scales(mat, r0, r1);
            }
            // One activation row (batch-1 decode): four weight rows per kernel call.
            let mut from = r0;
            #[cfg(target_arch = "x86_64")]
            if m == 1 && isa != Isa::Scalar {
                while from + 4 <= r1 {
                    // SAFETY: `isa` is supported, rows from .. from + 4 exist (from + 4 <= r1
                    // <= rows) and `x` holds `cols` activations.
                    let Some((mut acc, done)) =
                        (unsafe { super::x86::rows4_dots(isa, mat, from, x) })
                    else {
                        break;
                    };
                    for (i, a) in acc.iter_mut().enumerate() {
                        let r = from + i;
                        if done < cols {
                            scalar_partial(mat, r, x, done, std::slice::from_mut(a));
                        }
                        // SAFETY: element (0, r) is in bounds and this task's (the caller's
                        // guarantee).
                        unsafe { ptr.write(r, *a * row_scale(mat, r)) };
                    }
                    from += 4;
                }
            }
            for g0 in (0..m).step_by(FUSED_MAX_ROWS) {
                let g = (m - g0).min(FUSED_MAX_ROWS);
                let xg = &x[g0 * cols..(g0 + g) * cols];
                for r in from..r1 {
                    let mut dots = [0f32; FUSED_MAX_ROWS];
                    fused_row_dots(isa, mat, r, xg, &mut dots[..g]);
                    for (i, &d) in dots[..g].iter().enumerate() {
                        // SAFETY: element (g0 + i, r) is in bounds and this task's.
                        unsafe { ptr.write((g0 + i) * ld + r, d) };
                    }
                }
            }
        }
        Path::Blocked => {
            #[cfg(target_arch = "x86_64")]
            {
                // SAFETY: the path is chosen on AVX-512 (supported: the caller's guarantee)
                // for f16 and f32 rows; the rest is the caller's guarantees, passed on.
                let done = unsafe {
                    super::blocked::rows_products(&mat.data, cols, x, m, ptr.0, ld, (r0, r1))
                };
                debug_assert!(done, "the blocked path is chosen for f16 and f32 rows");
            }
            #[cfg(not(target_arch = "x86_64"))]
            unreachable!("the blocked path is chosen on AVX-512 only")
        }
        Path::Bf16Tiles => BF16_TILE.with(|buf| {
            use super::bf16_tiles::{convert_rows, products, Codes};
            let (codes, scales) = match &mat.data {
                QData::Int8 { q, scales } => (Codes::Int8(q), scales),
                QData::Fp8 { q, scales } => (Codes::Fp8(q), scales),
                _ => unreachable!("the BF16 tiles are chosen for int8 and FP8 rows"),
            };
            let Some(a) = &a.pairs else {
                unreachable!("the BF16 tiles are chosen with their activations")
            };
            let mut buf = buf.borrow_mut();
            let need = (r1 - r0) * cols.div_ceil(2);
            if buf.len() < need {
                buf.resize(need, 0);
            }
            // SAFETY: the path is chosen only where the CPU runs the kernels; the matrix holds
            // rows up to r1 <= rows of `cols` codes with a scale each; the tile holds r1 − r0
            // rows of pairs; the elements i·ld + r0 .. i·ld + r1 (i < m) from `ptr` are in
            // bounds and this task's (the caller's guarantee).
            unsafe {
                convert_rows(codes, cols, (r0, r1), &mut buf);
                products(a, &buf[..need], &scales[r0..r1], ptr.at(r0), ld);
            }
        }),
        Path::Tiles => TILE.with(|buf| {
            // Dequantise the task's weight rows into a per-thread buffer and multiply the tile
            // with a GEMM.
            let mut buf = buf.borrow_mut();
            let n = r1 - r0;
            if buf.len() < n * cols {
                buf.resize(n * cols, 0.0);
            }
            for (j, r) in (r0..r1).enumerate() {
                dequantize_row(isa, mat, r, &mut buf[j * cols..(j + 1) * cols]);
            }
            // SAFETY: `x` is [m, cols] row-major, the tile [n, cols] row-major read as its
            // transpose [cols, n]; the destination is elements i·ld + r0 .. i·ld + r1 from
            // `ptr` (row stride `ld`), in bounds and this task's (the caller's guarantee).
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
        }),
    }
}

/// `x[m, cols] · Wᵀ` for the matrices `parts` stacked on top of each other (all `cols` wide;
/// part `k` into columns `col0(k) .. col0(k) + rows(k)`, the parts one after the other from
/// column `col0`) with a supported `isa`, into the row-major `[m, ld]` output `out`: the
/// tasks of every part run in one parallel region, and the int8 parts on the integer path
/// share one quantisation of `x`.
///
/// # Panics
/// When the parts' widths differ, their rows overflow `ld`, or `out` is shorter than `m · ld`
/// (or `x` than `m · cols`).
pub(crate) fn matmul_parts(
    isa: Isa,
    parts: &[&QMatrix],
    x: &[f32],
    m: usize,
    out: &mut [f32],
    ld: usize,
    col0: usize,
) {
    let Some(first) = parts.first() else {
        return;
    };
    let cols = first.cols;
    let rows: usize = parts.iter().map(|p| p.rows).sum();
    assert!(
        parts.iter().all(|p| p.cols == cols),
        "parts of different widths"
    );
    assert!(col0 + rows <= ld, "output columns out of range");
    assert!(out.len() >= m * ld && x.len() >= m * cols, "buffer lengths");
    if m == 0 || rows == 0 {
        return;
    }
    if cols == 0 {
        for row in out.chunks_mut(ld).take(m) {
            row[col0..col0 + rows].fill(0.0);
        }
        return;
    }
    let paths: Vec<Path> = parts.iter().map(|p| path(isa, p, m)).collect();
    let x = &x[..m * cols];
    let a = Shared {
        q8: paths
            .contains(&Path::Int8Q8)
            .then(|| crate::ggml::Q8Activations::new(x, m, cols, true, false)),
        bf16: paths
            .contains(&Path::Fp8Bf16)
            .then(|| super::fp8_bf16::Bf16Activations::new(x, m, cols)),
        pairs: paths
            .contains(&Path::Bf16Tiles)
            .then(|| super::bf16_tiles::Bf16Pairs::new(x, m, cols)),
    };
    // (part, its path, its first output column, its weight rows r0..r1)
    let mut tasks = Vec::new();
    let mut c0 = col0;
    for (p, &path) in parts.iter().zip(&paths) {
        let step = task_rows(path, cols);
        for r0 in (0..p.rows).step_by(step) {
            tasks.push((*p, path, c0, (r0, (r0 + step).min(p.rows))));
        }
        c0 += p.rows;
    }
    let base = OutPtr(out.as_mut_ptr());
    let run = |&(p, path, c0, range): &(&QMatrix, Path, usize, (usize, usize))| {
        // SAFETY: `isa` is supported (the caller's contract); each task's rows are in its
        // part, `x` holds m rows of `cols > 0`; its elements i·ld + c0 + r (i < m, r in its
        // range, c0 + r < col0 + rows <= ld) are in bounds (asserted) and no other task's
        // (parts own disjoint columns, tasks disjoint rows of a part).
        unsafe { product_rows(isa, path, p, x, m, &a, OutPtr(base.at(c0)), ld, range) }
    };
    if tasks.len() <= 1 || rows * m * cols < 1 << 15 || super::kept_on_this_thread() {
        tasks.iter().for_each(run);
    } else {
        tasks.par_iter().for_each(run);
    }
}

/// `x[m, cols] · Wᵀ` with a supported `isa`, written into columns `col0 .. col0 + rows` of
/// the row-major `[m, ld]` output `out`.
///
/// # Panics
/// When `col0 + rows > ld` or `out` is shorter than `m · ld` (or `x` than `m · cols`).
pub(crate) fn matmul(
    isa: Isa,
    mat: &QMatrix,
    x: &[f32],
    m: usize,
    out: &mut [f32],
    ld: usize,
    col0: usize,
) {
    matmul_parts(isa, &[mat], x, m, out, ld, col0);
}
