//! AVX2 and AVX-512 kernels: weights are decoded 8 or 16 at a time into f32 registers and
//! multiplied with the activations by FMA.
//!
//! FP8 E4M3 is decoded through F16: the byte's exponent and mantissa moved into an f16 bit
//! pattern (`(b & 0x7F) << 7 | (b & 0x80) << 8`, computed as a sign extension, a shift and a
//! mask) give the value divided by 2^8 exactly, subnormals included, and the hardware
//! f16→f32 conversion does the rest.

use std::arch::x86_64::*;

use super::kernels::Isa;
use super::{QData, QMatrix, Q4_GROUP};

/// 2^8: FP8 values decoded through f16 come out divided by this.
const FP8_VIA_F16: f32 = 256.0;

/// Keeps bits 15 and 13..7 of a sign-extended E4M3 byte shifted left by 7: the byte
/// `S EEEE MMM` sign-extended to 16 bits and shifted is `S S EEEE MMM 0000000`, and clearing
/// bit 14 leaves the f16 pattern `S 0EEEE MMM0000000` (three instructions per vector).
const FP8_F16_MASK: i16 = 0xBFFF_u16 as i16;

#[target_feature(enable = "avx2,fma")]
#[inline]
fn hsum256(v: __m256) -> f32 {
    let hi = _mm256_extractf128_ps(v, 1);
    let lo = _mm256_castps256_ps128(v);
    let s = _mm_add_ps(lo, hi);
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
    _mm_cvtss_f32(s)
}

#[target_feature(enable = "avx512f")]
#[inline]
fn hsum512(v: __m512) -> f32 {
    _mm512_reduce_add_ps(v)
}

// ---- decoders: `n` weights starting at a pointer into f32 lanes ----

#[target_feature(enable = "avx512f,avx512bw,avx2,fma,f16c")]
#[inline]
unsafe fn dec512_f32(p: *const f32) -> __m512 {
    unsafe { _mm512_loadu_ps(p) }
}
#[target_feature(enable = "avx512f,avx512bw,avx2,fma,f16c")]
#[inline]
unsafe fn dec512_f16(p: *const u16) -> __m512 {
    unsafe { _mm512_cvtph_ps(_mm256_loadu_si256(p as *const __m256i)) }
}
#[target_feature(enable = "avx512f,avx512bw,avx2,fma,f16c")]
#[inline]
unsafe fn dec512_i8(p: *const i8) -> __m512 {
    unsafe { _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(p as *const __m128i))) }
}
#[target_feature(enable = "avx512f,avx512bw,avx2,fma,f16c")]
#[inline]
unsafe fn dec512_fp8(p: *const u8) -> __m512 {
    let v = _mm256_cvtepi8_epi16(unsafe { _mm_loadu_si128(p as *const __m128i) });
    _mm512_cvtph_ps(_mm256_and_si256(
        _mm256_slli_epi16(v, 7),
        _mm256_set1_epi16(FP8_F16_MASK),
    ))
}

#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn dec256_f32(p: *const f32) -> __m256 {
    unsafe { _mm256_loadu_ps(p) }
}
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn dec256_f16(p: *const u16) -> __m256 {
    unsafe { _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i)) }
}
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn dec256_i8(p: *const i8) -> __m256 {
    unsafe { _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(p as *const __m128i))) }
}
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn dec256_fp8(p: *const u8) -> __m256 {
    let v = _mm_cvtepi8_epi16(unsafe { _mm_loadl_epi64(p as *const __m128i) });
    _mm256_cvtph_ps(_mm_and_si128(
        _mm_slli_epi16(v, 7),
        _mm_set1_epi16(FP8_F16_MASK),
    ))
}

/// How far ahead of the weights being read the kernels request cache lines. One core's
/// hardware prefetchers keep too few lines in flight to stream a decode step's weights at the
/// memory's bandwidth; asking for lines this far ahead measured 1.1-2.1x the products'
/// throughput from memory (`examples/qmatmul`, f16 least, int8 most) on a 2-core Xeon.
const PREFETCH_BYTES: usize = 4096;

/// Request the cache lines `PREFETCH_BYTES` ahead of the `bytes` starting at `p` (at least one
/// line). A prefetch is a hint that never faults, so addresses past the end of the weights are
/// harmless; the pointer arithmetic wraps rather than assuming them in bounds.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
pub(super) fn prefetch_ahead(p: *const u8, bytes: usize) {
    let ahead = p.wrapping_add(PREFETCH_BYTES);
    let mut off = 0;
    loop {
        _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(off) as *const i8);
        off += 64;
        if off >= bytes {
            break;
        }
    }
}

/// Request the row scales of rows `r0..r1` of `mat` (a task about to read its rows): they are
/// read after the rows' products, so requested first they arrive meanwhile instead of missing
/// then. The rows themselves are left to the kernels' requests ahead of themselves and the
/// hardware prefetchers: requesting a task's first 4 KiB of weights up front as well made
/// batch-1 decode 1–5% slower on a Zen 4 core (f16, FP8), its prefetches waiting for free
/// miss buffers.
pub(super) fn prefetch_scales(mat: &QMatrix, r0: usize, r1: usize) {
    let rows = r1.min(mat.rows).saturating_sub(r0);
    if let QData::Int8 { scales, .. } | QData::Fp8 { scales, .. } = &mat.data {
        if let Some(s) = scales.get(r0..r0 + rows) {
            let (p, bytes) = (s.as_ptr() as *const u8, std::mem::size_of_val(s));
            let mut off = 0;
            while off < bytes.min(PREFETCH_BYTES) {
                // SAFETY: prefetching reads nothing architecturally visible and cannot
                // fault; SSE is part of every x86-64 CPU.
                unsafe { _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(off) as *const i8) };
                off += 64;
            }
        }
    }
}

/// A dot-product kernel over whole vectors of one element type: `M` activation rows,
/// `U` independent accumulators per row. Returns the sums and the columns covered.
macro_rules! dots_kernel {
    ($name:ident, $feat:literal, $elem:ty, $lanes:expr, $vec:ty, $zero:expr, $fma:ident,
     $loadx:ident, $reduce:ident, $add:ident, $dec:ident) => {
        #[target_feature(enable = $feat)]
        unsafe fn $name<const M: usize, const U: usize>(
            w: *const $elem,
            x: *const f32,
            cols: usize,
        ) -> ([f32; M], usize) {
            let mut acc = [[$zero; U]; M];
            let mut c = 0;
            // SAFETY (whole body): the caller guarantees `w` points at `cols` weights and `x`
            // at `M` rows of `cols` activations; every access below is below `cols`.
            unsafe {
                while c + U * $lanes <= cols {
                    prefetch_ahead(w.add(c) as *const u8, U * $lanes * size_of::<$elem>());
                    for u in 0..U {
                        let wv = $dec(w.add(c + u * $lanes));
                        for (i, a) in acc.iter_mut().enumerate() {
                            a[u] = $fma(wv, $loadx(x.add(i * cols + c + u * $lanes)), a[u]);
                        }
                    }
                    c += U * $lanes;
                }
                while c + $lanes <= cols {
                    let wv = $dec(w.add(c));
                    for (i, a) in acc.iter_mut().enumerate() {
                        a[0] = $fma(wv, $loadx(x.add(i * cols + c)), a[0]);
                    }
                    c += $lanes;
                }
            }
            let mut out = [0f32; M];
            for (o, a) in out.iter_mut().zip(acc.iter()) {
                let mut s = a[0];
                for v in a.iter().skip(1) {
                    s = $add(s, *v);
                }
                *o = $reduce(s);
            }
            (out, c)
        }
    };
}

/// A dot-product kernel of one activation row with four consecutive weight rows of one
/// element type (batch-1 decode): each activation vector is loaded once for the four rows, and
/// the call, dispatch and reduction costs are paid once per four rows. Two accumulators per
/// row; returns the four sums and the columns covered.
macro_rules! rows4_kernel {
    ($name:ident, $feat:literal, $elem:ty, $lanes:expr, $zero:expr, $fma:ident, $loadx:ident,
     $reduce:ident, $add:ident, $dec:ident) => {
        #[target_feature(enable = $feat)]
        unsafe fn $name(w: *const $elem, x: *const f32, cols: usize) -> ([f32; 4], usize) {
            let mut acc = [[$zero; 2]; 4];
            let mut c = 0;
            // SAFETY (whole body): the caller guarantees `w` points at four rows of `cols`
            // weights, one after the other, and `x` at `cols` activations; every access
            // below is below those bounds.
            unsafe {
                while c + 2 * $lanes <= cols {
                    // The four rows are one contiguous block: request it as one stream, as
                    // far ahead of its start as the block's share already read.
                    prefetch_ahead(
                        (w as *const u8).wrapping_add(4 * c * size_of::<$elem>()),
                        4 * 2 * $lanes * size_of::<$elem>(),
                    );
                    let x0 = $loadx(x.add(c));
                    let x1 = $loadx(x.add(c + $lanes));
                    for (r, a) in acc.iter_mut().enumerate() {
                        let p = w.add(r * cols + c);
                        a[0] = $fma($dec(p), x0, a[0]);
                        a[1] = $fma($dec(p.add($lanes)), x1, a[1]);
                    }
                    c += 2 * $lanes;
                }
                while c + $lanes <= cols {
                    let x0 = $loadx(x.add(c));
                    for (r, a) in acc.iter_mut().enumerate() {
                        a[0] = $fma($dec(w.add(r * cols + c)), x0, a[0]);
                    }
                    c += $lanes;
                }
            }
            (acc.map(|a| $reduce($add(a[0], a[1]))), c)
        }
    };
}

/// A four-row kernel that reads the four rows one after the other, each to its end (four
/// accumulators per row), without software prefetches: the weights are then one sequential
/// stream that the hardware prefetchers follow by themselves. For f16 weights on AVX-512 this
/// measured 15-20% faster batch-1 decode than the interleaved kernel with prefetches (Zen 4,
/// `skymoe bench`, alternated); for int8 and FP8 weights it measured level or slower.
macro_rules! rows4_seq_kernel {
    ($name:ident, $feat:literal, $elem:ty, $lanes:expr, $zero:expr, $fma:ident, $loadx:ident,
     $reduce:ident, $add:ident, $dec:ident) => {
        #[target_feature(enable = $feat)]
        unsafe fn $name(w: *const $elem, x: *const f32, cols: usize) -> ([f32; 4], usize) {
            let mut out = [0f32; 4];
            let mut done = 0;
            // SAFETY (whole body): the caller guarantees `w` points at four rows of `cols`
            // weights, one after the other, and `x` at `cols` activations; every access
            // below is below those bounds.
            unsafe {
                for (r, o) in out.iter_mut().enumerate() {
                    let p = w.add(r * cols);
                    let mut a = [$zero; 4];
                    let mut c = 0;
                    while c + 4 * $lanes <= cols {
                        for (u, acc) in a.iter_mut().enumerate() {
                            let wv = $dec(p.add(c + u * $lanes));
                            *acc = $fma(wv, $loadx(x.add(c + u * $lanes)), *acc);
                        }
                        c += 4 * $lanes;
                    }
                    while c + $lanes <= cols {
                        a[0] = $fma($dec(p.add(c)), $loadx(x.add(c)), a[0]);
                        c += $lanes;
                    }
                    *o = $reduce($add($add(a[0], a[1]), $add(a[2], a[3])));
                    done = c;
                }
            }
            (out, done)
        }
    };
}

/// The one-row kernel (`dots…`, `M` activation rows) and the four-row kernel (`rows4…`, one
/// activation row; `rows4_kernel` or `rows4_seq_kernel`, as each type measured best) of each
/// element type, for one vector width (its features, lanes, vector
/// type and operations given once).
macro_rules! kernels {
    ($feat:literal, $lanes:expr, $vec:ty, $zero:expr, $fma:ident, $loadx:ident, $reduce:ident,
     $add:ident; $(($dots:ident, $rows4_kind:ident $rows4:ident, $elem:ty, $dec:ident)),* $(,)?) => {
        $(
            dots_kernel!($dots, $feat, $elem, $lanes, $vec, $zero, $fma, $loadx, $reduce, $add, $dec);
            $rows4_kind!($rows4, $feat, $elem, $lanes, $zero, $fma, $loadx, $reduce, $add, $dec);
        )*
    };
}

kernels!(
    "avx512f,avx512bw,avx2,fma,f16c", 16, __m512, _mm512_setzero_ps(), _mm512_fmadd_ps,
    _mm512_loadu_ps, hsum512, _mm512_add_ps;
    (dots512_f32, rows4_kernel rows4_512_f32, f32, dec512_f32),
    (dots512_f16, rows4_seq_kernel rows4_512_f16, u16, dec512_f16),
    (dots512_i8, rows4_kernel rows4_512_i8, i8, dec512_i8),
    (dots512_fp8, rows4_kernel rows4_512_fp8, u8, dec512_fp8),
);
kernels!(
    "avx2,fma,f16c", 8, __m256, _mm256_setzero_ps(), _mm256_fmadd_ps, _mm256_loadu_ps,
    hsum256, _mm256_add_ps;
    (dots256_f32, rows4_kernel rows4_256_f32, f32, dec256_f32),
    (dots256_f16, rows4_kernel rows4_256_f16, u16, dec256_f16),
    (dots256_i8, rows4_kernel rows4_256_i8, i8, dec256_i8),
    (dots256_fp8, rows4_kernel rows4_256_fp8, u8, dec256_fp8),
);

/// Partial dot products of one activation row `x` with rows `r .. r + 4` of `mat` (not q4):
/// the sums over the columns covered (before per-row scales) and how many columns that is;
/// `None` for q4, which has no four-row kernel.
///
/// # Safety
/// `isa` is AVX2 or AVX-512 and supported by this CPU, `r + 4 <= mat.rows()`, and
/// `x.len() >= mat.cols()`.
pub(super) unsafe fn rows4_dots(
    isa: Isa,
    mat: &QMatrix,
    r: usize,
    x: &[f32],
) -> Option<([f32; 4], usize)> {
    let cols = mat.cols;
    debug_assert!(x.len() >= cols && r + 4 <= mat.rows);
    let xp = x.as_ptr();
    let wide = isa == Isa::Avx512;
    macro_rules! run {
        ($k512:ident, $k256:ident, $ptr:expr) => {
            // SAFETY: guaranteed by the caller; `$ptr` is the start of row `r`, and rows
            // r .. r + 4 follow it.
            Some(unsafe {
                if wide {
                    $k512($ptr, xp, cols)
                } else {
                    $k256($ptr, xp, cols)
                }
            })
        };
    }
    match &mat.data {
        QData::F32(w) => run!(rows4_512_f32, rows4_256_f32, w.as_ptr().add(r * cols)),
        QData::F16(w) => run!(rows4_512_f16, rows4_256_f16, w.as_ptr().add(r * cols)),
        QData::Int8 { q, .. } => run!(rows4_512_i8, rows4_256_i8, q.as_ptr().add(r * cols)),
        QData::Fp8 { q, .. } => run!(rows4_512_fp8, rows4_256_fp8, q.as_ptr().add(r * cols))
            .map(|(s, done)| (s.map(|v| v * FP8_VIA_F16), done)),
        QData::Q4 { .. } => None,
    }
}

/// q4 dot products over whole groups (AVX-512): group scales applied.
#[target_feature(enable = "avx512f,avx512bw,avx2,fma,f16c")]
unsafe fn dots512_q4<const M: usize>(
    packed: *const u8,
    scales: *const f32,
    x: *const f32,
    cols: usize,
) -> ([f32; M], usize) {
    let groups = cols / Q4_GROUP;
    let mut acc = [[_mm512_setzero_ps(); 2]; M];
    let low = _mm_set1_epi8(0x0F);
    // SAFETY (whole body): `packed` holds `groups` whole groups of 16 bytes, `scales` one
    // value per group, `x` `M` rows of `cols`; every access is below those bounds.
    unsafe {
        for g in 0..groups {
            prefetch_ahead(packed.add(g * 16), 16);
            let d = *scales.add(g);
            let dv = _mm512_set1_ps(d);
            let nd8 = _mm512_set1_ps(-8.0 * d);
            let b = _mm_loadu_si128(packed.add(g * 16) as *const __m128i);
            let lo = _mm_and_si128(b, low);
            let hi = _mm_and_si128(_mm_srli_epi16(b, 4), low);
            let wlo = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(lo)), dv, nd8);
            let whi = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(hi)), dv, nd8);
            for (i, a) in acc.iter_mut().enumerate() {
                let xp = x.add(i * cols + g * Q4_GROUP);
                a[0] = _mm512_fmadd_ps(wlo, _mm512_loadu_ps(xp), a[0]);
                a[1] = _mm512_fmadd_ps(whi, _mm512_loadu_ps(xp.add(16)), a[1]);
            }
        }
    }
    let mut out = [0f32; M];
    for (o, a) in out.iter_mut().zip(acc.iter()) {
        *o = hsum512(_mm512_add_ps(a[0], a[1]));
    }
    (out, groups * Q4_GROUP)
}

/// The 32 weights of one q4 group as four vectors of 8 (AVX2), scale applied.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn dec256_q4(p: *const u8, d: f32) -> [__m256; 4] {
    let b = unsafe { _mm_loadu_si128(p as *const __m128i) };
    let low = _mm_set1_epi8(0x0F);
    let lo = _mm_and_si128(b, low);
    let hi = _mm_and_si128(_mm_srli_epi16(b, 4), low);
    let dv = _mm256_set1_ps(d);
    let nd8 = _mm256_set1_ps(-8.0 * d);
    [
        q4_half(lo, dv, nd8),
        q4_half(_mm_srli_si128(lo, 8), dv, nd8),
        q4_half(hi, dv, nd8),
        q4_half(_mm_srli_si128(hi, 8), dv, nd8),
    ]
}

/// Eight nibbles (the low 8 bytes of `v`) as `d·q − 8d`.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
fn q4_half(v: __m128i, dv: __m256, nd8: __m256) -> __m256 {
    _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(v)), dv, nd8)
}

/// q4 dot products over whole groups (AVX2): group scales applied.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dots256_q4<const M: usize>(
    packed: *const u8,
    scales: *const f32,
    x: *const f32,
    cols: usize,
) -> ([f32; M], usize) {
    let groups = cols / Q4_GROUP;
    let mut acc = [[_mm256_setzero_ps(); 2]; M];
    // SAFETY (whole body): as in `dots512_q4`.
    unsafe {
        for g in 0..groups {
            prefetch_ahead(packed.add(g * 16), 16);
            let w = dec256_q4(packed.add(g * 16), *scales.add(g));
            for (i, a) in acc.iter_mut().enumerate() {
                let xp = x.add(i * cols + g * Q4_GROUP);
                a[0] = _mm256_fmadd_ps(w[0], _mm256_loadu_ps(xp), a[0]);
                a[1] = _mm256_fmadd_ps(w[1], _mm256_loadu_ps(xp.add(8)), a[1]);
                a[0] = _mm256_fmadd_ps(w[2], _mm256_loadu_ps(xp.add(16)), a[0]);
                a[1] = _mm256_fmadd_ps(w[3], _mm256_loadu_ps(xp.add(24)), a[1]);
            }
        }
    }
    let mut out = [0f32; M];
    for (o, a) in out.iter_mut().zip(acc.iter()) {
        *o = hsum256(_mm256_add_ps(a[0], a[1]));
    }
    (out, groups * Q4_GROUP)
}

/// Partial dot products of `M` activation rows (`x`, rows of `cols`) with row `r` of `mat`:
/// the sums over the columns covered (before per-row scales) and how many columns that is.
///
/// # Safety
/// `isa` is supported by this CPU, `r < mat.rows()`, and `x.len() >= M · cols`.
pub(super) unsafe fn row_dots<const M: usize>(
    isa: Isa,
    mat: &QMatrix,
    r: usize,
    x: &[f32],
) -> ([f32; M], usize) {
    let cols = mat.cols;
    debug_assert!(x.len() >= M * cols && r < mat.rows);
    let xp = x.as_ptr();
    let wide = isa == Isa::Avx512;
    // One accumulator chain per row is latency-bound: use at least four chains in all.
    macro_rules! run {
        ($k512:ident, $k256:ident, $ptr:expr) => {
            // SAFETY: guaranteed by the caller; `$ptr` is the start of row `r`.
            unsafe {
                match (wide, M) {
                    (true, 1) => $k512::<M, 4>($ptr, xp, cols),
                    (true, 2) => $k512::<M, 2>($ptr, xp, cols),
                    (true, _) => $k512::<M, 1>($ptr, xp, cols),
                    (false, 1) => $k256::<M, 4>($ptr, xp, cols),
                    (false, 2) => $k256::<M, 2>($ptr, xp, cols),
                    (false, _) => $k256::<M, 1>($ptr, xp, cols),
                }
            }
        };
    }
    match &mat.data {
        QData::F32(w) => run!(dots512_f32, dots256_f32, w.as_ptr().add(r * cols)),
        QData::F16(w) => run!(dots512_f16, dots256_f16, w.as_ptr().add(r * cols)),
        QData::Int8 { q, .. } => run!(dots512_i8, dots256_i8, q.as_ptr().add(r * cols)),
        QData::Fp8 { q, .. } => {
            let (s, done) = run!(dots512_fp8, dots256_fp8, q.as_ptr().add(r * cols));
            (s.map(|v| v * FP8_VIA_F16), done)
        }
        QData::Q4 { packed, scales } => {
            let groups = super::q4_groups(cols);
            // SAFETY: row `r`'s groups start at these offsets and are in bounds.
            let (p, s) = unsafe {
                (
                    packed.as_ptr().add(r * groups * 16),
                    scales.as_ptr().add(r * groups),
                )
            };
            // SAFETY: guaranteed by the caller.
            unsafe {
                if wide {
                    dots512_q4::<M>(p, s, xp, cols)
                } else {
                    dots256_q4::<M>(p, s, xp, cols)
                }
            }
        }
    }
}

macro_rules! dequant_kernel {
    ($name:ident, $feat:literal, $elem:ty, $lanes:expr, $mul:ident, $set1:ident, $store:ident, $dec:ident) => {
        #[target_feature(enable = $feat)]
        unsafe fn $name(w: *const $elem, scale: f32, out: *mut f32, cols: usize) -> usize {
            let s = $set1(scale);
            let mut c = 0;
            // SAFETY: the caller guarantees `cols` readable weights and writable outputs.
            unsafe {
                while c + $lanes <= cols {
                    prefetch_ahead(w.add(c) as *const u8, $lanes * size_of::<$elem>());
                    $store(out.add(c), $mul($dec(w.add(c)), s));
                    c += $lanes;
                }
            }
            c
        }
    };
}

dequant_kernel!(
    deq512_f16,
    "avx512f,avx512bw,avx2,fma,f16c",
    u16,
    16,
    _mm512_mul_ps,
    _mm512_set1_ps,
    _mm512_storeu_ps,
    dec512_f16
);
dequant_kernel!(
    deq512_i8,
    "avx512f,avx512bw,avx2,fma,f16c",
    i8,
    16,
    _mm512_mul_ps,
    _mm512_set1_ps,
    _mm512_storeu_ps,
    dec512_i8
);
dequant_kernel!(
    deq512_fp8,
    "avx512f,avx512bw,avx2,fma,f16c",
    u8,
    16,
    _mm512_mul_ps,
    _mm512_set1_ps,
    _mm512_storeu_ps,
    dec512_fp8
);
dequant_kernel!(
    deq256_f16,
    "avx2,fma,f16c",
    u16,
    8,
    _mm256_mul_ps,
    _mm256_set1_ps,
    _mm256_storeu_ps,
    dec256_f16
);
dequant_kernel!(
    deq256_i8,
    "avx2,fma,f16c",
    i8,
    8,
    _mm256_mul_ps,
    _mm256_set1_ps,
    _mm256_storeu_ps,
    dec256_i8
);
dequant_kernel!(
    deq256_fp8,
    "avx2,fma,f16c",
    u8,
    8,
    _mm256_mul_ps,
    _mm256_set1_ps,
    _mm256_storeu_ps,
    dec256_fp8
);

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn deq256_q4(packed: *const u8, scales: *const f32, out: *mut f32, cols: usize) -> usize {
    let groups = cols / Q4_GROUP;
    // SAFETY: the caller guarantees whole groups in bounds and `cols` writable outputs.
    unsafe {
        for g in 0..groups {
            prefetch_ahead(packed.add(g * 16), 16);
            let w = dec256_q4(packed.add(g * 16), *scales.add(g));
            for (j, v) in w.iter().enumerate() {
                _mm256_storeu_ps(out.add(g * Q4_GROUP + j * 8), *v);
            }
        }
    }
    groups * Q4_GROUP
}

/// Dequantise row `r` of `mat` into `out`, returning how many leading columns were written.
///
/// # Safety
/// `isa` is supported by this CPU, `r < mat.rows()`, and `out.len() >= mat.cols()`.
pub(super) unsafe fn dequantize_row(isa: Isa, mat: &QMatrix, r: usize, out: &mut [f32]) -> usize {
    let cols = mat.cols;
    debug_assert!(out.len() >= cols && r < mat.rows);
    let o = out.as_mut_ptr();
    let wide = isa == Isa::Avx512;
    // SAFETY (whole match): guaranteed by the caller; pointers are the start of row `r`.
    unsafe {
        match &mat.data {
            QData::F32(_) => 0,
            QData::F16(w) => {
                let p = w.as_ptr().add(r * cols);
                if wide {
                    deq512_f16(p, 1.0, o, cols)
                } else {
                    deq256_f16(p, 1.0, o, cols)
                }
            }
            QData::Int8 { q, scales } => {
                let p = q.as_ptr().add(r * cols);
                if wide {
                    deq512_i8(p, scales[r], o, cols)
                } else {
                    deq256_i8(p, scales[r], o, cols)
                }
            }
            QData::Fp8 { q, scales } => {
                let p = q.as_ptr().add(r * cols);
                let s = scales[r] * FP8_VIA_F16;
                if wide {
                    deq512_fp8(p, s, o, cols)
                } else {
                    deq256_fp8(p, s, o, cols)
                }
            }
            QData::Q4 { packed, scales } => {
                let groups = super::q4_groups(cols);
                deq256_q4(
                    packed.as_ptr().add(r * groups * 16),
                    scales.as_ptr().add(r * groups),
                    o,
                    cols,
                )
            }
        }
    }
}

/// `Σ x[c]·w[c]` over the leading whole vectors of f16 `w` (bits) and f32 `x`, both `n`
/// long; returns the sum and the elements covered.
///
/// # Safety
/// `isa` is supported by this CPU and `w`, `x` point at `n` readable elements each.
pub(super) unsafe fn dot_f16(isa: Isa, w: *const u16, x: *const f32, n: usize) -> (f32, usize) {
    // SAFETY: guaranteed by the caller.
    let (s, done) = unsafe {
        if isa == Isa::Avx512 {
            dots512_f16::<1, 2>(w, x, n)
        } else {
            dots256_f16::<1, 4>(w, x, n)
        }
    };
    (s[0], done)
}

/// `y[c] += a·w[c]` over the leading whole vectors of 8 of f16 `w` (bits); returns the
/// elements covered.
///
/// # Safety
/// The CPU supports AVX2, FMA and F16C, `w` points at `n` readable and `y` at `n` writable
/// elements.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn axpy_f16(a: f32, w: *const u16, y: *mut f32, n: usize) -> usize {
    let av = _mm256_set1_ps(a);
    let mut c = 0;
    // SAFETY: every access is below `n` (guaranteed readable/writable by the caller).
    unsafe {
        while c + 8 <= n {
            let wv = dec256_f16(w.add(c));
            _mm256_storeu_ps(y.add(c), _mm256_fmadd_ps(av, wv, _mm256_loadu_ps(y.add(c))));
            c += 8;
        }
    }
    c
}

/// Dot products of `x` (`len` values) with `n` f16 rows (bits) laid `stride` apart from `w`,
/// into `out[..n]`: four rows at a time share each activation vector and one horizontal
/// reduction; the columns past the last whole vector of 8 are added in scalar code.
///
/// # Safety
/// The CPU supports AVX2, FMA and F16C; row `j < n` of `len` values at `w + j·stride` is
/// readable, `x` holds `len` values and `out` `n`.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn dot_f16_rows(
    w: *const u16,
    stride: usize,
    x: *const f32,
    len: usize,
    out: *mut f32,
    n: usize,
) {
    let whole = len / 8 * 8;
    // The columns past the whole vectors of row `p`.
    let tail = |p: *const u16| -> f32 {
        (whole..len)
            // SAFETY: column c < len of a readable row, and of `x`.
            .map(|c| unsafe { *x.add(c) * half::f16::from_bits(*p.add(c)).to_f32() })
            .sum()
    };
    let mut j = 0;
    // SAFETY (whole body): rows j < n of `len` values at w + j·stride, `x[..len]` and
    // `out[..n]` are in bounds (the caller's guarantee); every access below is.
    unsafe {
        while j + 4 <= n {
            let p: [*const u16; 4] = std::array::from_fn(|r| w.add((j + r) * stride));
            let mut acc = [_mm256_setzero_ps(); 4];
            let mut c = 0;
            while c < whole {
                let xv = _mm256_loadu_ps(x.add(c));
                for (a, pr) in acc.iter_mut().zip(&p) {
                    *a = _mm256_fmadd_ps(dec256_f16(pr.add(c)), xv, *a);
                }
                c += 8;
            }
            // Four sums at once: pairwise horizontal adds, then the two 128-bit halves.
            let h = _mm256_hadd_ps(
                _mm256_hadd_ps(acc[0], acc[1]),
                _mm256_hadd_ps(acc[2], acc[3]),
            );
            let s = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps::<1>(h));
            let mut four = [0f32; 4];
            _mm_storeu_ps(four.as_mut_ptr(), s);
            for (r, v) in four.iter().enumerate() {
                *out.add(j + r) = v + tail(p[r]);
            }
            j += 4;
        }
        while j < n {
            let p = w.add(j * stride);
            let mut acc = _mm256_setzero_ps();
            let mut c = 0;
            while c < whole {
                acc = _mm256_fmadd_ps(dec256_f16(p.add(c)), _mm256_loadu_ps(x.add(c)), acc);
                c += 8;
            }
            *out.add(j) = hsum256(acc) + tail(p);
            j += 1;
        }
    }
}

/// `y[c] += Σ_j a[j]·w[j·stride + c]` (`j < n`, `c < len`, f16 `w` as bits), the rows added
/// in order as [`axpy_f16`] adds one (an FMA per element of the whole vectors, a product and
/// a sum past them): four vectors of `y` stay in registers over all rows.
///
/// # Safety
/// The CPU supports AVX2, FMA and F16C; row `j < n` of `len` values at `w + j·stride` is
/// readable, `a` holds `n` values and `y` `len` writable ones.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn axpy_f16_rows(
    a: *const f32,
    n: usize,
    w: *const u16,
    stride: usize,
    y: *mut f32,
    len: usize,
) {
    let whole = len / 8 * 8;
    let mut c = 0;
    // SAFETY (whole body): as the caller guarantees, every row j < n has `len` readable
    // values, `a` n and `y` len; every access below is inside them.
    unsafe {
        while c + 32 <= whole {
            let mut v: [__m256; 4] = std::array::from_fn(|k| _mm256_loadu_ps(y.add(c + 8 * k)));
            for j in 0..n {
                let aj = _mm256_set1_ps(*a.add(j));
                let p = w.add(j * stride + c);
                for (k, vk) in v.iter_mut().enumerate() {
                    *vk = _mm256_fmadd_ps(aj, dec256_f16(p.add(8 * k)), *vk);
                }
            }
            for (k, vk) in v.iter().enumerate() {
                _mm256_storeu_ps(y.add(c + 8 * k), *vk);
            }
            c += 32;
        }
        while c < whole {
            let mut v = _mm256_loadu_ps(y.add(c));
            for j in 0..n {
                v = _mm256_fmadd_ps(
                    _mm256_set1_ps(*a.add(j)),
                    dec256_f16(w.add(j * stride + c)),
                    v,
                );
            }
            _mm256_storeu_ps(y.add(c), v);
            c += 8;
        }
        for c in whole..len {
            let mut v = *y.add(c);
            for j in 0..n {
                v += *a.add(j) * half::f16::from_bits(*w.add(j * stride + c)).to_f32();
            }
            *y.add(c) = v;
        }
    }
}
