//! AVX2 and AVX-512 kernels for the ggml types. Each 32 weights ("chunk") are decoded into two
//! 128-bit vectors of their 32 signed integer values (AVX2 byte operations, shared by both
//! instruction sets), widened to f32 lanes (two zmm or four ymm), scaled (`q·s`, or `q·s + o`
//! by FMA) and multiplied with up to eight activation rows by FMA. The block scales come from
//! the portable [`blocks::prep`], once per block.
//!
//! Dequantisation to memory multiplies and adds in two roundings, bit-exact with the portable
//! code (and gguf); the dot products fuse `q·s + o` into one FMA.

use std::arch::x86_64::*;
use std::slice;

use super::blocks::{self, group_span, has_min};
use super::{GgmlType, Isa};

/// How far ahead of the weights being read the kernels request cache lines (as the quant
/// kernels: one core's hardware prefetchers keep too few lines in flight to stream weights at
/// the memory's bandwidth).
const PREFETCH_BYTES: usize = 4096;

/// Request the cache lines `PREFETCH_BYTES` ahead of the `bytes` starting at `p`. A prefetch
/// never faults, so addresses past the end are harmless (the arithmetic wraps).
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

/// Request the first `PREFETCH_BYTES` of `bytes`: a task's row scales, read after its
/// products. A task's weights are left to the kernels' requests ahead of themselves
/// ([`prefetch_ahead`]) and the hardware prefetchers: requesting their first 4 KiB up front
/// as well made batch-1 decode 2–4% slower on a Zen 4 core (int8, Q8_0, Q4_K_M and the
/// Qwen3-MoE-shaped file), its prefetches waiting for free miss buffers.
pub(super) fn prefetch_first(bytes: &[u8]) {
    let p = bytes.as_ptr();
    let mut off = 0;
    while off < bytes.len().min(PREFETCH_BYTES) {
        // SAFETY: prefetching reads nothing architecturally visible and cannot fault; SSE is
        // part of every x86-64 CPU.
        unsafe { _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(off) as *const i8) };
        off += 64;
    }
}

// ---- chunk decoders: 32 weights of a block as two vectors of 16 signed bytes ----
//
// Two 128-bit halves rather than one 256-bit vector: the AVX-512 kernel widens each half to
// a zmm directly, without the lane insert/extract shuffles (port 5) a 256-bit detour costs.

/// Low nibbles of the 16 bytes at `p` (weights 0-15) and their high nibbles (16-31).
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn nibbles16(p: *const u8) -> [__m128i; 2] {
    // SAFETY: the caller guarantees 16 readable bytes at `p`.
    let qs = unsafe { _mm_loadu_si128(p as *const __m128i) };
    let m = _mm_set1_epi8(0x0F);
    [
        _mm_and_si128(qs, m),
        _mm_and_si128(_mm_srli_epi16::<4>(qs), m),
    ]
}

/// Byte `l` of the halves = 16 where bit `l` (first half) or `l + 16` (second) of `qh` is set,
/// else 0.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
fn bits_to_16s(qh: u32) -> [__m128i; 2] {
    // Byte l gets byte l/8 of qh, then keeps bit l%8 of it.
    let v = _mm_set1_epi32(qh as i32);
    let bit = _mm_set1_epi64x(0x8040_2010_0804_0201_u64 as i64);
    let sixteen = _mm_set1_epi8(16);
    let pick =
        |spread: __m128i| _mm_and_si128(_mm_cmpeq_epi8(_mm_and_si128(spread, bit), bit), sixteen);
    [
        pick(_mm_shuffle_epi8(
            v,
            _mm_set_epi64x(0x0101_0101_0101_0101, 0),
        )),
        pick(_mm_shuffle_epi8(
            v,
            _mm_set_epi64x(0x0303_0303_0303_0303, 0x0202_0202_0202_0202),
        )),
    ]
}

/// 4-bit values of the 32 bytes at `p`: low nibbles (`high` false) or high ones.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn nibbles32(p: *const u8, high: bool) -> [__m128i; 2] {
    // SAFETY: the caller guarantees 32 readable bytes at `p`.
    let v = unsafe { load2(p) };
    let m = _mm_set1_epi8(0x0F);
    v.map(|v| {
        let v = if high { _mm_srli_epi16::<4>(v) } else { v };
        _mm_and_si128(v, m)
    })
}

/// The 32 bytes at `p` as two halves.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn load2(p: *const u8) -> [__m128i; 2] {
    // SAFETY: the caller guarantees 32 readable bytes.
    unsafe {
        [
            _mm_loadu_si128(p as *const __m128i),
            _mm_loadu_si128(p.add(16) as *const __m128i),
        ]
    }
}

#[inline(always)]
unsafe fn read_u32(p: *const u8) -> u32 {
    // SAFETY: the caller guarantees 4 readable bytes.
    unsafe { (p as *const u32).read_unaligned() }
}

// Each `chunk_*(b, j)`: the 32 integer weights of chunk `j` of the block at `b`.
// # Safety: `b` points at a whole block and `j < block_elems / 32`; AVX2 is available.

#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn chunk_q4_0(b: *const u8, _j: usize) -> [__m128i; 2] {
    // SAFETY: bytes 2..18 are the block's quants.
    let q = unsafe { nibbles16(b.add(2)) };
    q.map(|v| _mm_sub_epi8(v, _mm_set1_epi8(8)))
}

#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn chunk_q4_1(b: *const u8, _j: usize) -> [__m128i; 2] {
    // SAFETY: bytes 4..20 are the block's quants.
    unsafe { nibbles16(b.add(4)) }
}

#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn chunk_q5_0(b: *const u8, _j: usize) -> [__m128i; 2] {
    // SAFETY: bytes 2..6 are the fifth bits, 6..22 the nibbles.
    let (qh, ql) = unsafe { (read_u32(b.add(2)), nibbles16(b.add(6))) };
    let h = bits_to_16s(qh);
    [0, 1].map(|k| _mm_sub_epi8(_mm_or_si128(ql[k], h[k]), _mm_set1_epi8(16)))
}

#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn chunk_q5_1(b: *const u8, _j: usize) -> [__m128i; 2] {
    // SAFETY: bytes 4..8 are the fifth bits, 8..24 the nibbles.
    let (qh, ql) = unsafe { (read_u32(b.add(4)), nibbles16(b.add(8))) };
    let h = bits_to_16s(qh);
    [_mm_or_si128(ql[0], h[0]), _mm_or_si128(ql[1], h[1])]
}

/// Bytes = 16 where the bits of `qh` are set (AVX-512 masks: one instruction per half).
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
#[inline]
fn bits_to_16s_512(qh: u32) -> [__m128i; 2] {
    let sixteen = _mm_set1_epi8(16);
    [
        _mm_maskz_mov_epi8(qh as u16, sixteen),
        _mm_maskz_mov_epi8((qh >> 16) as u16, sixteen),
    ]
}

#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
#[inline]
unsafe fn chunk512_q5_0(b: *const u8, _j: usize) -> [__m128i; 2] {
    // SAFETY: bytes 2..6 are the fifth bits, 6..22 the nibbles.
    let (qh, ql) = unsafe { (read_u32(b.add(2)), nibbles16(b.add(6))) };
    let h = bits_to_16s_512(qh);
    [0, 1].map(|k| _mm_sub_epi8(_mm_or_si128(ql[k], h[k]), _mm_set1_epi8(16)))
}

#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
#[inline]
unsafe fn chunk512_q5_1(b: *const u8, _j: usize) -> [__m128i; 2] {
    // SAFETY: bytes 4..8 are the fifth bits, 8..24 the nibbles.
    let (qh, ql) = unsafe { (read_u32(b.add(4)), nibbles16(b.add(8))) };
    let h = bits_to_16s_512(qh);
    [_mm_or_si128(ql[0], h[0]), _mm_or_si128(ql[1], h[1])]
}

#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn chunk_q8_0(b: *const u8, _j: usize) -> [__m128i; 2] {
    // SAFETY: bytes 2..34 are the block's int8 quants.
    unsafe { load2(b.add(2)) }
}

#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn chunk_q4_k(b: *const u8, j: usize) -> [__m128i; 2] {
    // SAFETY: bytes 16..144 are the quants, 32 bytes per pair of sub-blocks.
    unsafe { nibbles32(b.add(16 + (j / 2) * 32), j % 2 == 1) }
}

#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn chunk_q5_k(b: *const u8, j: usize) -> [__m128i; 2] {
    // SAFETY: bytes 16..48 are the fifth bits (bit j of byte l for weight l of sub-block j),
    // 48..176 the nibbles, 32 bytes per pair of sub-blocks.
    let (ql, qh) = unsafe {
        (
            nibbles32(b.add(48 + (j / 2) * 32), j % 2 == 1),
            load2(b.add(16)),
        )
    };
    let bit = _mm_set1_epi8((1u8 << j) as i8);
    let sixteen = _mm_set1_epi8(16);
    [0, 1].map(|k| {
        let set = _mm_cmpeq_epi8(_mm_and_si128(qh[k], bit), bit);
        _mm_or_si128(ql[k], _mm_and_si128(set, sixteen))
    })
}

#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn chunk_q6_k(b: *const u8, j: usize) -> [__m128i; 2] {
    let (h, t) = (j / 4, j % 4);
    // SAFETY: bytes 0..128 are the low 4 bits (64 per half), 128..192 the high 2 bits (32
    // per half, four 2-bit fields per byte).
    let (ql, qh) = unsafe {
        (
            nibbles32(b.add(h * 64 + (t % 2) * 32), t >= 2),
            load2(b.add(128 + h * 32)),
        )
    };
    let shift = _mm_cvtsi32_si128(2 * t as i32);
    [0, 1].map(|k| {
        let hi = _mm_and_si128(_mm_srl_epi16(qh[k], shift), _mm_set1_epi8(3));
        _mm_sub_epi8(
            _mm_or_si128(ql[k], _mm_slli_epi16::<4>(hi)),
            _mm_set1_epi8(32),
        )
    })
}

/// Walk the `$nb` blocks of type `$ty` (`$bb` bytes each) at `$row`: for each, request the
/// cache lines ahead, decode its scales ([`blocks::prep`]) and run `$body` with the block's
/// index, pointer and scales bound to `$blk`, `$b` and `$p`. Expanded in place (inside the
/// caller's `unsafe` block and target features), the one block walk of every kernel here.
macro_rules! each_block {
    ($ty:expr, $bb:expr, $row:expr, $nb:expr, |$blk:ident, $b:ident, $p:ident| $body:block) => {
        for $blk in 0..$nb {
            let $b = $row.add($blk * $bb);
            prefetch_ahead($b, $bb);
            let $p = blocks::prep($ty, slice::from_raw_parts($b, $bb));
            $body
        }
    };
}

/// Kernels of one type: fused dot products (AVX-512, AVX2) and dequantisation (both).
macro_rules! type_kernels {
    ($ty:expr, $chunk:ident, $dots512:ident, $dots256:ident, $deq512:ident, $deq256:ident,
     $codes:ident) => {
        type_kernels!($ty, $chunk, $chunk, $dots512, $dots256, $deq512, $deq256, $codes);
    };
    ($ty:expr, $chunk512:ident, $chunk:ident, $dots512:ident, $dots256:ident, $deq512:ident,
     $deq256:ident, $codes:ident) => {
        /// Dot products of `M` activation rows (`x`, rows of `cols`) with the `nb` blocks at
        /// `row` (AVX-512).
        ///
        /// # Safety
        /// The CPU supports the features; `row` holds `nb` blocks and `x` `M` rows of `cols`
        /// (`cols >= nb · block_elems`).
        #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
        unsafe fn $dots512<const M: usize>(
            row: *const u8,
            nb: usize,
            x: *const f32,
            cols: usize,
        ) -> [f32; M] {
            const TY: GgmlType = $ty;
            const BB: usize = TY.block_bytes();
            const BE: usize = TY.block_elems();
            const MIN: bool = has_min(TY);
            let mut acc = [[_mm512_setzero_ps(); 2]; M];
            // SAFETY (whole body): every block read is one of the `nb` at `row`, every
            // activation read below `M · cols` (guaranteed by the caller).
            unsafe {
                each_block!(TY, BB, row, nb, |blk, b, p| {
                    for j in 0..BE / 32 {
                        let [h0, h1] = $chunk512(b, j);
                        let q0 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(h0));
                        let q1 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(h1));
                        let (s0, s1) = (_mm512_set1_ps(p.s[2 * j]), _mm512_set1_ps(p.s[2 * j + 1]));
                        let (w0, w1) = if MIN {
                            (
                                _mm512_fmadd_ps(q0, s0, _mm512_set1_ps(p.o[2 * j])),
                                _mm512_fmadd_ps(q1, s1, _mm512_set1_ps(p.o[2 * j + 1])),
                            )
                        } else {
                            (_mm512_mul_ps(q0, s0), _mm512_mul_ps(q1, s1))
                        };
                        let xo = x.add(blk * BE + j * 32);
                        for (i, a) in acc.iter_mut().enumerate() {
                            let xp = xo.add(i * cols);
                            a[0] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(xp), a[0]);
                            a[1] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(xp.add(16)), a[1]);
                        }
                    }
                });
            }
            let mut out = [0f32; M];
            for (o, a) in out.iter_mut().zip(&acc) {
                *o = _mm512_reduce_add_ps(_mm512_add_ps(a[0], a[1]));
            }
            out
        }

        /// [`$dots512`] with AVX2.
        ///
        /// # Safety
        /// As for the AVX-512 kernel.
        #[target_feature(enable = "avx2,fma,f16c")]
        unsafe fn $dots256<const M: usize>(
            row: *const u8,
            nb: usize,
            x: *const f32,
            cols: usize,
        ) -> [f32; M] {
            const TY: GgmlType = $ty;
            const BB: usize = TY.block_bytes();
            const BE: usize = TY.block_elems();
            const MIN: bool = has_min(TY);
            let mut acc = [[_mm256_setzero_ps(); 2]; M];
            // SAFETY (whole body): as in the AVX-512 kernel.
            unsafe {
                each_block!(TY, BB, row, nb, |blk, b, p| {
                    for j in 0..BE / 32 {
                        let [lo, hi] = $chunk(b, j);
                        let qf = [
                            _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(lo)),
                            _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128::<8>(lo))),
                            _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(hi)),
                            _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128::<8>(hi))),
                        ];
                        let (s0, s1) = (_mm256_set1_ps(p.s[2 * j]), _mm256_set1_ps(p.s[2 * j + 1]));
                        let w = if MIN {
                            let (o0, o1) =
                                (_mm256_set1_ps(p.o[2 * j]), _mm256_set1_ps(p.o[2 * j + 1]));
                            [
                                _mm256_fmadd_ps(qf[0], s0, o0),
                                _mm256_fmadd_ps(qf[1], s0, o0),
                                _mm256_fmadd_ps(qf[2], s1, o1),
                                _mm256_fmadd_ps(qf[3], s1, o1),
                            ]
                        } else {
                            [
                                _mm256_mul_ps(qf[0], s0),
                                _mm256_mul_ps(qf[1], s0),
                                _mm256_mul_ps(qf[2], s1),
                                _mm256_mul_ps(qf[3], s1),
                            ]
                        };
                        let xo = x.add(blk * BE + j * 32);
                        for (i, a) in acc.iter_mut().enumerate() {
                            let xp = xo.add(i * cols);
                            a[0] = _mm256_fmadd_ps(w[0], _mm256_loadu_ps(xp), a[0]);
                            a[1] = _mm256_fmadd_ps(w[1], _mm256_loadu_ps(xp.add(8)), a[1]);
                            a[0] = _mm256_fmadd_ps(w[2], _mm256_loadu_ps(xp.add(16)), a[0]);
                            a[1] = _mm256_fmadd_ps(w[3], _mm256_loadu_ps(xp.add(24)), a[1]);
                        }
                    }
                });
            }
            let mut out = [0f32; M];
            for (o, a) in out.iter_mut().zip(&acc) {
                *o = hsum256(_mm256_add_ps(a[0], a[1]));
            }
            out
        }

        /// Dequantise the `nb` blocks at `row` into `out` (AVX-512), bit-exact.
        ///
        /// # Safety
        /// The CPU supports the features; `row` holds `nb` blocks, `out` room for their
        /// weights.
        #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
        unsafe fn $deq512(row: *const u8, nb: usize, out: *mut f32) {
            const TY: GgmlType = $ty;
            const BB: usize = TY.block_bytes();
            const BE: usize = TY.block_elems();
            const MIN: bool = has_min(TY);
            // SAFETY (whole body): reads within the `nb` blocks, writes within their weights.
            unsafe {
                each_block!(TY, BB, row, nb, |blk, b, p| {
                    for j in 0..BE / 32 {
                        let halves = $chunk512(b, j);
                        for (k, h) in halves.into_iter().enumerate() {
                            let mut w = _mm512_mul_ps(
                                _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(h)),
                                _mm512_set1_ps(p.s[2 * j + k]),
                            );
                            if MIN {
                                w = _mm512_add_ps(w, _mm512_set1_ps(p.o[2 * j + k]));
                            }
                            _mm512_storeu_ps(out.add(blk * BE + j * 32 + k * 16), w);
                        }
                    }
                });
            }
        }

        /// The integer values of the `nb` blocks at `row` as bf16 pairs (16 per 32 weights,
        /// exact: integers of at most 8 bits), and the multiplier and offset of each group of
        /// [`group_span`] weights into `s` and `o` (offsets only for types with a minimum).
        ///
        /// # Safety
        /// The CPU supports the features; `row` holds `nb` blocks, `pairs` room for their
        /// weights' pairs, `s` and `o` for a value per group.
        #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16,avx2,fma,f16c")]
        unsafe fn $codes(row: *const u8, nb: usize, pairs: *mut u32, s: *mut f32, o: *mut f32) {
            const TY: GgmlType = $ty;
            const BB: usize = TY.block_bytes();
            const BE: usize = TY.block_elems();
            const MIN: bool = has_min(TY);
            const SPAN: usize = group_span(TY);
            // SAFETY (whole body): reads within the `nb` blocks, writes within their pairs and
            // groups.
            unsafe {
                each_block!(TY, BB, row, nb, |blk, b, p| {
                    for j in 0..BE / 32 {
                        let [lo, hi] =
                            $chunk512(b, j).map(|h| _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(h)));
                        let v =
                            std::mem::transmute::<__m512bh, __m512i>(_mm512_cvtne2ps_pbh(hi, lo));
                        let c = blk * BE + j * 32;
                        _mm512_storeu_si512(pairs.add(c / 2) as *mut _, v);
                        // `prep` gives a multiplier and offset per 16 weights.
                        for k in 0..32 / SPAN {
                            let h = 2 * j + k * SPAN / 16;
                            *s.add(c / SPAN + k) = p.s[h];
                            if MIN {
                                *o.add(c / SPAN + k) = p.o[h];
                            }
                        }
                    }
                });
            }
        }

        /// Dequantise the `nb` blocks at `row` into `out` (AVX2), bit-exact.
        ///
        /// # Safety
        /// As for the AVX-512 version.
        #[target_feature(enable = "avx2,fma,f16c")]
        unsafe fn $deq256(row: *const u8, nb: usize, out: *mut f32) {
            const TY: GgmlType = $ty;
            const BB: usize = TY.block_bytes();
            const BE: usize = TY.block_elems();
            const MIN: bool = has_min(TY);
            // SAFETY (whole body): reads within the `nb` blocks, writes within their weights.
            unsafe {
                each_block!(TY, BB, row, nb, |blk, b, p| {
                    for j in 0..BE / 32 {
                        let [lo, hi] = $chunk(b, j);
                        let parts = [lo, _mm_srli_si128::<8>(lo), hi, _mm_srli_si128::<8>(hi)];
                        for (k, v) in parts.into_iter().enumerate() {
                            let mut w = _mm256_mul_ps(
                                _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v)),
                                _mm256_set1_ps(p.s[2 * j + k / 2]),
                            );
                            if MIN {
                                w = _mm256_add_ps(w, _mm256_set1_ps(p.o[2 * j + k / 2]));
                            }
                            _mm256_storeu_ps(out.add(blk * BE + j * 32 + k * 8), w);
                        }
                    }
                });
            }
        }
    };
}

#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
fn hsum256(v: __m256) -> f32 {
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_shuffle_ps::<1>(s, s));
    _mm_cvtss_f32(s)
}

type_kernels!(
    GgmlType::Q4_0,
    chunk_q4_0,
    dots512_q4_0,
    dots256_q4_0,
    deq512_q4_0,
    deq256_q4_0,
    codes_q4_0
);
type_kernels!(
    GgmlType::Q4_1,
    chunk_q4_1,
    dots512_q4_1,
    dots256_q4_1,
    deq512_q4_1,
    deq256_q4_1,
    codes_q4_1
);
type_kernels!(
    GgmlType::Q5_0,
    chunk512_q5_0,
    chunk_q5_0,
    dots512_q5_0,
    dots256_q5_0,
    deq512_q5_0,
    deq256_q5_0,
    codes_q5_0
);
type_kernels!(
    GgmlType::Q5_1,
    chunk512_q5_1,
    chunk_q5_1,
    dots512_q5_1,
    dots256_q5_1,
    deq512_q5_1,
    deq256_q5_1,
    codes_q5_1
);
type_kernels!(
    GgmlType::Q8_0,
    chunk_q8_0,
    dots512_q8_0,
    dots256_q8_0,
    deq512_q8_0,
    deq256_q8_0,
    codes_q8_0
);
type_kernels!(
    GgmlType::Q4K,
    chunk_q4_k,
    dots512_q4_k,
    dots256_q4_k,
    deq512_q4_k,
    deq256_q4_k,
    codes_q4_k
);
type_kernels!(
    GgmlType::Q5K,
    chunk_q5_k,
    dots512_q5_k,
    dots256_q5_k,
    deq512_q5_k,
    deq256_q5_k,
    codes_q5_k
);
type_kernels!(
    GgmlType::Q6K,
    chunk_q6_k,
    dots512_q6_k,
    dots256_q6_k,
    deq512_q6_k,
    deq256_q6_k,
    codes_q6_k
);

/// Dot products of `M` activation rows (`x`, rows of `cols`) with one weight row (`row`: its
/// whole blocks).
///
/// # Safety
/// `isa` (AVX2, or AVX-512 with VL) is supported by this CPU, `row.len()` is a whole number of blocks
/// of `ty` holding at most `cols` weights, and `x.len() >= M · cols`.
pub(super) unsafe fn dots<const M: usize>(
    isa: Isa,
    ty: GgmlType,
    row: &[u8],
    x: &[f32],
    cols: usize,
) -> [f32; M] {
    let nb = row.len() / ty.block_bytes();
    debug_assert!(nb * ty.block_elems() <= cols && x.len() >= M * cols);
    let (r, xp) = (row.as_ptr(), x.as_ptr());
    let wide = isa == Isa::Avx512;
    macro_rules! go {
        ($k512:ident, $k256:ident) => {
            // SAFETY: guaranteed by the caller.
            unsafe {
                if wide {
                    $k512::<M>(r, nb, xp, cols)
                } else {
                    $k256::<M>(r, nb, xp, cols)
                }
            }
        };
    }
    match ty {
        GgmlType::Q4_0 => go!(dots512_q4_0, dots256_q4_0),
        GgmlType::Q4_1 => go!(dots512_q4_1, dots256_q4_1),
        GgmlType::Q5_0 => go!(dots512_q5_0, dots256_q5_0),
        GgmlType::Q5_1 => go!(dots512_q5_1, dots256_q5_1),
        GgmlType::Q8_0 => go!(dots512_q8_0, dots256_q8_0),
        GgmlType::Q4K => go!(dots512_q4_k, dots256_q4_k),
        GgmlType::Q5K => go!(dots512_q5_k, dots256_q5_k),
        GgmlType::Q6K => go!(dots512_q6_k, dots256_q6_k),
    }
}

/// Dequantise one weight row (`row`: its whole blocks) into `out`, bit-exact with the
/// portable code.
///
/// # Safety
/// `isa` (AVX2, or AVX-512 with VL) is supported by this CPU.
pub(super) unsafe fn dequantize(isa: Isa, ty: GgmlType, row: &[u8], out: &mut [f32]) {
    let nb = row.len() / ty.block_bytes();
    assert!(
        out.len() >= nb * ty.block_elems(),
        "dequantisation output too short"
    );
    let (r, o) = (row.as_ptr(), out.as_mut_ptr());
    let wide = isa == Isa::Avx512;
    macro_rules! go {
        ($k512:ident, $k256:ident) => {
            // SAFETY: the CPU supports `isa` (guaranteed by the caller); `row` holds `nb`
            // blocks and `out` room for their weights (asserted above).
            unsafe {
                if wide {
                    $k512(r, nb, o)
                } else {
                    $k256(r, nb, o)
                }
            }
        };
    }
    match ty {
        GgmlType::Q4_0 => go!(deq512_q4_0, deq256_q4_0),
        GgmlType::Q4_1 => go!(deq512_q4_1, deq256_q4_1),
        GgmlType::Q5_0 => go!(deq512_q5_0, deq256_q5_0),
        GgmlType::Q5_1 => go!(deq512_q5_1, deq256_q5_1),
        GgmlType::Q8_0 => go!(deq512_q8_0, deq256_q8_0),
        GgmlType::Q4K => go!(deq512_q4_k, deq256_q4_k),
        GgmlType::Q5K => go!(deq512_q5_k, deq256_q5_k),
        GgmlType::Q6K => go!(deq512_q6_k, deq256_q6_k),
    }
}

/// One weight row (`row`: its whole blocks) as the bf16 tiles take it: its integer values as
/// bf16 pairs into `pairs`, each group's multiplier into `s` and, for types with a minimum,
/// offset into `o` ([`group_span`] weights per group). A weight is `code·s + o` exactly as it
/// dequantises.
///
/// # Safety
/// The CPU supports AVX-512 F/BW/VL and BF16.
///
/// # Panics
/// If `pairs`, `s` or `o` are too short for the row.
pub(super) unsafe fn codes_bf16(
    ty: GgmlType,
    row: &[u8],
    pairs: &mut [u32],
    s: &mut [f32],
    o: &mut [f32],
) {
    let nb = row.len() / ty.block_bytes();
    let n = nb * ty.block_elems();
    let groups = n / group_span(ty);
    assert!(
        pairs.len() >= n / 2 && s.len() >= groups && (!has_min(ty) || o.len() >= groups),
        "bf16 code outputs too short"
    );
    let (r, pp, sp, op) = (
        row.as_ptr(),
        pairs.as_mut_ptr(),
        s.as_mut_ptr(),
        o.as_mut_ptr(),
    );
    macro_rules! go {
        ($k:ident) => {
            // SAFETY: the CPU supports the features (guaranteed by the caller); `row` holds
            // `nb` blocks, the outputs room for them (asserted above).
            unsafe { $k(r, nb, pp, sp, op) }
        };
    }
    match ty {
        GgmlType::Q4_0 => go!(codes_q4_0),
        GgmlType::Q4_1 => go!(codes_q4_1),
        GgmlType::Q5_0 => go!(codes_q5_0),
        GgmlType::Q5_1 => go!(codes_q5_1),
        GgmlType::Q8_0 => go!(codes_q8_0),
        GgmlType::Q4K => go!(codes_q4_k),
        GgmlType::Q5K => go!(codes_q5_k),
        GgmlType::Q6K => go!(codes_q6_k),
    }
}
