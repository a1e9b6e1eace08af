//! 8-bit activations and integer dot products for the ggml types, as llama.cpp computes its
//! quantised products: the activation rows are quantised once per product, then every weight
//! block is multiplied with them in integers and scaled once per block.
//!
//! Activations ([`Q8Activations`]), symmetric, `q = round(x·(127 / max|x|))` rounded half to
//! even, `q ∈ [-127, 127]`, with the scales llama.cpp's `block_q8_0`, `block_q8_1` and
//! `block_q8_K` hold, so that a product gives llama.cpp's result up to the order of its float
//! additions:
//! - 32-value blocks (for Q4_0, Q4_1, Q5_0, Q5_1, Q8_0): the scale `max|x| / 127` rounded to
//!   f16, the block's integer sum `Σq` and, for the types with a minimum, `(max|x| / 127)·Σq`
//!   rounded to f16. Where llama.cpp's f16 would overflow (`max|x|` above 127·65504) the f32
//!   values are kept, so that large activations stay finite;
//! - 256-value blocks (for the k-quants): the f32 scale `1 / (127 / max|x|)` per 256 and the
//!   integer sum of every 16.
//!
//! The canonical arithmetic, which the scalar code below spells out and the SIMD kernels
//! reproduce bit for bit (integer sums are exact; the float operations are the same, in the
//! same order, without fused multiply-adds):
//! - 32-value blocks: block `b` gives the exact `Σ w_int·q` (`w_int` the stored integers less
//!   the type's offset, `q − 8` for Q4_0) and `t_b = (d_w·d_x)·Σ` (`+ m_w·(d_x·Σq)` for Q4_1
//!   and Q5_1); `t_b` is added to accumulator `b mod 8`, and the eight accumulators are summed
//!   as `((a0 + a4) + (a2 + a6)) + ((a1 + a5) + (a3 + a7))`.
//! - k-quants, in eight lanes: per super-block, lane `l` has the exact
//!   `S_l = Σ_j sc_j·Σ_{e∈[4l, 4l+4)} q_{32j+e}·x_{32j+e}` over its sub-blocks `j` of 32
//!   (unsigned `q`; Q6_K's scales by halves of 16) and `N_l`: for Q4_K and Q5_K sub-block
//!   `l`'s minimum times its activations' sum, for Q6_K (whose `S_l` then becomes
//!   `S_l − 32·N_l`) the scales of the 16-value halves `2l` and `2l + 1` times theirs; then
//!   `acc_l += (d·d_x)·S_l − (dmin·d_x)·N_l` (Q6_K: `(d·d_x)·S_l`), and the accumulators are
//!   summed as the 32-weight types' are.

use super::blocks::{chunk, f16_to_f32, k_scales, prep};
use super::GgmlType;

/// Activation rows quantised to 8 bits for the integer products of [`super::GgmlMatrix`]:
/// in 32-value blocks (the 32-weight types), 256-value blocks (the k-quants), or both.
#[derive(Debug, Clone)]
pub struct Q8Activations {
    pub(super) rows: usize,
    pub(super) cols: usize,
    pub(super) b32: Option<Blocks32>,
    pub(super) b256: Option<Blocks256>,
}

/// Rows in 32-value blocks.
#[derive(Debug, Clone)]
pub(super) struct Blocks32 {
    /// `[rows, cols]` quantised values.
    pub q: Vec<i8>,
    /// `[rows, cols / 32]` scales.
    pub d: Vec<f32>,
    /// `[rows, cols / 32]` integer sums of the values.
    pub sum: Vec<i32>,
    /// `[rows, cols / 32]` `d · sum`.
    pub dsum: Vec<f32>,
}

/// Rows in 256-value blocks.
#[derive(Debug, Clone)]
pub(super) struct Blocks256 {
    /// `[rows, cols]` quantised values.
    pub q: Vec<i8>,
    /// `[rows, cols / 256]` scales.
    pub d: Vec<f32>,
    /// `[rows, cols / 16]` integer sums of every 16 values.
    pub bsums: Vec<i16>,
}

/// `v` rounded half to even, as an int8 clamped to ±127 (exact for `|v| < 2^22`: adding
/// 1.5·2^23 leaves the rounded integer in the low mantissa bits).
#[inline(always)]
fn round_q(v: f32) -> i8 {
    let r = (v + 12_582_912.0f32).to_bits() as i32 - 0x4B40_0000;
    r.clamp(-127, 127) as i8
}

/// Quantise one block of values into `q` (`q = round(x·(127 / max|x|))`); returns `max|x|`,
/// from which the callers derive the block's scale. A block holding a NaN or an infinity
/// returns NaN (its products are NaN, as with f32 activations); a block whose largest
/// magnitude has no finite inverse (zeros, tiny subnormals) quantises to zeros and returns 0.
#[inline(always)]
pub(super) fn quantize_block(x: &[f32], q: &mut [i8]) -> f32 {
    let mut amax = 0f32;
    let mut nan = false;
    for &v in x {
        let a = v.abs();
        if a > amax {
            amax = a;
        }
        nan |= v.is_nan();
    }
    if nan || amax == f32::INFINITY {
        q.fill(0);
        return f32::NAN;
    }
    let id = 127.0 / amax;
    if !id.is_finite() {
        q.fill(0);
        return 0.0;
    }
    for (q, &v) in q.iter_mut().zip(x) {
        *q = round_q(v * id);
    }
    amax
}

/// `v` rounded to the nearest f16 (ties to even), or `v` itself where that is infinite.
#[inline(always)]
fn to_f16_finite(v: f32) -> f32 {
    let h = half::f16::from_f32(v).to_f32();
    if h.is_infinite() && v.is_finite() {
        v
    } else {
        h
    }
}

/// A 256-value block's scale from its `max|x|`: `1 / (127 / max|x|)`, as llama.cpp's
/// `block_q8_K` holds it (0 for a block of zeros, through `1 / ∞`; NaN for a NaN).
#[inline(always)]
fn scale256(amax: f32) -> f32 {
    1.0 / (127.0 / amax)
}

/// [`quantize_block`] of 32 or 256 values, with the sums of every 16 quantised values in
/// `sums16`, in portable code; returns `max|x|` as [`quantize_block`] does.
fn block_portable(x: &[f32], q: &mut [i8], sums16: &mut [i32]) -> f32 {
    let amax = quantize_block(x, q);
    for (s, q16) in sums16.iter_mut().zip(q.chunks_exact(16)) {
        *s = q16.iter().map(|&v| v as i32).sum();
    }
    amax
}

/// A block quantiser: [`block_portable`] or its SIMD twin.
type BlockFn = fn(&[f32], &mut [i8], &mut [i32]) -> f32;

/// The SIMD block quantiser, where this CPU has one.
fn simd_block() -> Option<BlockFn> {
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx2") {
        return Some(|x, q, sums16| {
            // SAFETY: AVX2 is supported (checked above); the callers pass 32 or 256 values,
            // as many quantised ones and one sum per 16.
            unsafe { super::x86_q8::quantize_block(x, q, sums16) }
        });
    }
    None
}

/// The 32-value blocks of `rows` rows of `cols` (a multiple of 32).
pub(super) fn quantize32(x: &[f32], rows: usize, cols: usize, block: BlockFn) -> Blocks32 {
    let nb = rows * (cols / 32);
    let mut b = Blocks32 {
        q: vec![0; rows * cols],
        d: vec![0.0; nb],
        sum: vec![0; nb],
        dsum: vec![0.0; nb],
    };
    let mut s2 = [0i32; 2];
    for (k, (xs, qs)) in x.chunks_exact(32).zip(b.q.chunks_exact_mut(32)).enumerate() {
        let amax = block(xs, qs, &mut s2);
        let s = s2[0] + s2[1];
        // llama.cpp's `block_q8_0::d` and `block_q8_1::s`: the f32 scale, and the f32 scale
        // times the sum, each rounded to f16.
        let d = amax / 127.0;
        b.d[k] = to_f16_finite(d);
        b.sum[k] = s;
        b.dsum[k] = to_f16_finite(d * s as f32);
    }
    b
}

/// The 256-value blocks of `rows` rows of `cols` (a multiple of 256).
pub(super) fn quantize256(x: &[f32], rows: usize, cols: usize, block: BlockFn) -> Blocks256 {
    let mut b = Blocks256 {
        q: vec![0; rows * cols],
        d: vec![0.0; rows * (cols / 256)],
        bsums: vec![0; rows * (cols / 16)],
    };
    let mut s16 = [0i32; 16];
    for (k, (xs, qs)) in x
        .chunks_exact(256)
        .zip(b.q.chunks_exact_mut(256))
        .enumerate()
    {
        b.d[k] = scale256(block(xs, qs, &mut s16));
        for (o, &s) in b.bsums[k * 16..k * 16 + 16].iter_mut().zip(&s16) {
            *o = s as i16;
        }
    }
    b
}

/// The portable and, where this CPU has it, the SIMD quantiser (for tests).
#[cfg(test)]
pub(super) fn block_fns() -> (BlockFn, Option<BlockFn>) {
    (block_portable, simd_block())
}

impl Q8Activations {
    /// Quantise `rows` rows of `x` (`[rows, cols]`) into 32-value blocks (`blocks32`, for the
    /// 32-weight types; `cols` a multiple of 32) and/or 256-value blocks (`blocks256`, for
    /// the k-quants; `cols` a multiple of 256). The result is the same on every CPU.
    ///
    /// # Panics
    /// When `x.len() != rows·cols` or `cols` is not a multiple of a requested block size.
    pub fn new(x: &[f32], rows: usize, cols: usize, blocks32: bool, blocks256: bool) -> Self {
        assert_eq!(Some(x.len()), rows.checked_mul(cols), "activation length");
        assert!(
            !blocks32 || cols.is_multiple_of(32),
            "{cols} columns in 32-value blocks"
        );
        assert!(
            !blocks256 || cols.is_multiple_of(256),
            "{cols} columns in 256-value blocks"
        );
        let block = simd_block().unwrap_or(block_portable);
        let b32 = blocks32.then(|| quantize32(x, rows, cols, block));
        let b256 = blocks256.then(|| quantize256(x, rows, cols, block));
        Q8Activations {
            rows,
            cols,
            b32,
            b256,
        }
    }

    /// The blocks the products of type `ty` need: `Q8Activations::new` with 32- or 256-value
    /// blocks.
    pub fn for_type(ty: GgmlType, x: &[f32], rows: usize, cols: usize) -> Self {
        let k = ty.block_elems() == 256;
        Self::new(x, rows, cols, !k, k)
    }

    /// Rows.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Columns.
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Whether the products of `ty` can read these activations (their block size is here).
    pub fn serves(&self, ty: GgmlType) -> bool {
        if ty.block_elems() == 256 {
            self.b256.is_some()
        } else {
            self.b32.is_some()
        }
    }

    /// The activations as the products of `ty` see them, dequantised (`d·q`, `[rows, cols]`),
    /// `None` when their blocks were not made.
    pub fn dequantize_for(&self, ty: GgmlType) -> Option<Vec<f32>> {
        if ty.block_elems() == 256 {
            let b = self.b256.as_ref()?;
            Some(
                b.q.chunks_exact(256)
                    .zip(&b.d)
                    .flat_map(|(q, &d)| q.iter().map(move |&v| d * v as f32))
                    .collect(),
            )
        } else {
            let b = self.b32.as_ref()?;
            Some(
                b.q.chunks_exact(32)
                    .zip(&b.d)
                    .flat_map(|(q, &d)| q.iter().map(move |&v| d * v as f32))
                    .collect(),
            )
        }
    }
}

/// The sum of eight accumulators in the SIMD kernels' order (a horizontal add of a 256-bit
/// vector).
#[inline(always)]
pub(super) fn sum8(a: &[f32; 8]) -> f32 {
    ((a[0] + a[4]) + (a[2] + a[6])) + ((a[1] + a[5]) + (a[3] + a[7]))
}

/// The canonical integer products (see the module documentation) of one weight row (`row`:
/// its blocks) with activation rows `i0 .. i0 + dots.len()` of `a`, in portable code.
pub(super) fn dots_scalar(
    ty: GgmlType,
    row: &[u8],
    a: &Q8Activations,
    i0: usize,
    dots: &mut [f32],
) {
    let (be, bb) = (ty.block_elems(), ty.block_bytes());
    let cols = a.cols;
    let mut q = [0i8; 32];
    if be == 32 {
        let b32 = a.b32.as_ref().expect("32-value activation blocks");
        let nbx = cols / 32;
        let min = matches!(ty, GgmlType::Q4_1 | GgmlType::Q5_1);
        for (ii, dot) in dots.iter_mut().enumerate() {
            let i = i0 + ii;
            let mut acc = [0f32; 8];
            for (b, blk) in row.chunks_exact(bb).enumerate() {
                let p = prep(ty, blk);
                chunk(ty, blk, 0, &mut q);
                let xs = &b32.q[i * cols + b * 32..i * cols + b * 32 + 32];
                let s: i32 = q.iter().zip(xs).map(|(&w, &x)| w as i32 * x as i32).sum();
                let k = i * nbx + b;
                let mut t = (p.s[0] * b32.d[k]) * s as f32;
                if min {
                    t += p.o[0] * b32.dsum[k];
                }
                acc[b % 8] += t;
            }
            *dot = sum8(&acc);
        }
        return;
    }
    let b256 = a.b256.as_ref().expect("256-value activation blocks");
    let nbx = cols / 256;
    for (ii, dot) in dots.iter_mut().enumerate() {
        let i = i0 + ii;
        let mut acc = [0f32; 8];
        for (b, blk) in row.chunks_exact(bb).enumerate() {
            let k = i * nbx + b;
            let xs = &b256.q[k * 256..k * 256 + 256];
            let bs = &b256.bsums[k * 16..k * 16 + 16];
            let dx = b256.d[k];
            // Lane l: weights 4l .. 4l + 4 of every sub-block of 32 (unsigned), each times
            // its sub-block's scale; and the minima (Q4_K, Q5_K) or offsets (Q6_K) of lane
            // l's activation sums.
            let (mut s, mut n) = ([0i32; 8], [0i32; 8]);
            let (d, dmin) = match ty {
                GgmlType::Q4K | GgmlType::Q5K => {
                    let (sc, mn) = k_scales(blk[4..16].try_into().expect("12 scale bytes"));
                    for j in 0..8 {
                        chunk(ty, blk, j, &mut q);
                        for (l, sl) in s.iter_mut().enumerate() {
                            *sl += sc[j] as i32 * lane_dot(&q, &xs[32 * j..], l, 0);
                        }
                    }
                    for (l, nl) in n.iter_mut().enumerate() {
                        *nl = mn[l] as i32 * (bs[2 * l] as i32 + bs[2 * l + 1] as i32);
                    }
                    (
                        f16_to_f32(u16::from_le_bytes([blk[0], blk[1]])),
                        f16_to_f32(u16::from_le_bytes([blk[2], blk[3]])),
                    )
                }
                GgmlType::Q6K => {
                    let scale = |p: usize| (blk[192 + p] as i8) as i32;
                    for j in 0..8 {
                        chunk(ty, blk, j, &mut q);
                        for (l, sl) in s.iter_mut().enumerate() {
                            *sl += scale(2 * j + l / 4) * lane_dot(&q, &xs[32 * j..], l, 32);
                        }
                    }
                    // Q6_K's offset 32 per value, by the sums of 16: `S − 32·N`.
                    for (l, sl) in s.iter_mut().enumerate() {
                        let nl = scale(2 * l) * bs[2 * l] as i32
                            + scale(2 * l + 1) * bs[2 * l + 1] as i32;
                        *sl -= 32 * nl;
                    }
                    (f16_to_f32(u16::from_le_bytes([blk[208], blk[209]])), 0.0)
                }
                _ => unreachable!("{ty} has 32-weight blocks"),
            };
            for l in 0..8 {
                let mut t = (d * dx) * s[l] as f32;
                if ty != GgmlType::Q6K {
                    t -= (dmin * dx) * n[l] as f32;
                }
                acc[l] += t;
            }
        }
        *dot = sum8(&acc);
    }
}

/// `Σ (w + off)·x` over weights `4l .. 4l + 4` of the 32 in `q` (a k-quant's lane `l`).
#[inline(always)]
fn lane_dot(q: &[i8; 32], xs: &[i8], l: usize, off: i32) -> i32 {
    (4 * l..4 * l + 4)
        .map(|e| (q[e] as i32 + off) * xs[e] as i32)
        .sum()
}

/// The integer products of one of skymoe's int8 rows (`row`, signed bytes, `a.cols` of them,
/// a multiple of 32) with activation rows `i0 .. i0 + dots.len()` of `a`, before the row's
/// scale, in portable code: the arithmetic of Q8_0 (see the module documentation) with block
/// scales of 1.
pub(super) fn int8_dots_scalar(row: &[i8], a: &Q8Activations, i0: usize, dots: &mut [f32]) {
    let b32 = a.b32.as_ref().expect("32-value activation blocks");
    let cols = a.cols;
    let nbx = cols / 32;
    for (ii, dot) in dots.iter_mut().enumerate() {
        let i = i0 + ii;
        let mut acc = [0f32; 8];
        for (b, w) in row.chunks_exact(32).enumerate() {
            let xs = &b32.q[i * cols + b * 32..i * cols + b * 32 + 32];
            let s: i32 = w.iter().zip(xs).map(|(&w, &x)| w as i32 * x as i32).sum();
            acc[b % 8] += (1.0f32 * b32.d[i * nbx + b]) * s as f32;
        }
        *dot = sum8(&acc);
    }
}
