//! AVX2 and AVX-512 VNNI kernels of the integer products with 8-bit activations (see
//! [`super::q8`] for the arithmetic, which they reproduce bit for bit).
//!
//! Each 32 weights are decoded into one 256-bit vector of unsigned integers and multiplied
//! with 32 activation bytes: AVX2 by `vpmaddubsw` (u8·i8 pairs to i16; no saturation here, as
//! the weights are below 64, or at most 128 for Q8_0 taken as |w| times x with w's sign) then
//! `vpmaddwd`; AVX-512 VNNI by `vpdpbusd` (u8·i8 quadruples into i32, Q8_0 as w + 128 less
//! 128·Σx), and for the k-quants' sub-block scales `vpdpwssd`. Offsets (Q4_0's 8, Q5_0's 16)
//! are subtracted as offset·Σx per block. The 32-weight types reduce the integer sums
//! of eight blocks into the lanes of one vector and scale them together; the k-quants keep
//! one integer accumulator per super-block. Both run on 256-bit vectors: 512-bit ones would
//! not stream more weights per cycle on CPUs that split them in two halves, and at batch 1
//! the products are bound by memory, not by the vector width.

use std::arch::x86_64::*;

use super::x86::prefetch_ahead;
use super::GgmlType;

/// The kernel id (in place of a ggml type id, which is never 0 for these kernels) of skymoe's
/// own int8 rows: 32 signed bytes per block, one scale per row applied by the caller.
const PLAIN_INT8: u32 = 0;

/// The activation rows a kernel reads (raw views of a [`super::q8::Q8Activations`]'s blocks of
/// the kernel's size); unused pointers are null.
#[derive(Clone, Copy)]
pub(super) struct Act {
    /// Quantised values, rows of `cols`.
    pub q: *const i8,
    /// Scales, rows of `nbx`.
    pub d: *const f32,
    /// 32-value blocks: integer sums, rows of `nbx`.
    pub sum: *const i32,
    /// 32-value blocks: scale times sum, rows of `nbx`.
    pub dsum: *const f32,
    /// 256-value blocks: sums of every 16 values, 16 per block.
    pub bsums: *const i16,
    /// Values per row.
    pub cols: usize,
    /// Blocks per row.
    pub nbx: usize,
}

/// Where a kernel writes: element `i·ld + r` from `ptr` for activation row `i` (counted from
/// the kernel's first) and weight row `r`.
#[derive(Clone, Copy)]
pub(super) struct Out {
    /// The element of the first rows.
    pub ptr: *mut f32,
    /// The stride between activation rows.
    pub ld: usize,
}

// ---- shared helpers (AVX2) ----

/// The 32 nibbles of the 16 bytes at `p`: low nibbles (weights 0-15) then high (16-31).
///
/// # Safety
/// 16 readable bytes at `p`; AVX2.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn nib32(p: *const u8) -> __m256i {
    // SAFETY: the caller guarantees 16 readable bytes.
    let v = _mm256_broadcastsi128_si256(unsafe { _mm_loadu_si128(p as *const __m128i) });
    // The upper half shifted right by 4 within 64-bit words: byte l's high nibble drops into
    // its low bits (the bits entering from byte l + 1 are masked off).
    let v = _mm256_srlv_epi64(v, _mm256_set_epi64x(4, 4, 0, 0));
    _mm256_and_si256(v, _mm256_set1_epi8(0x0F))
}

/// Byte `l` = 16 where bit `l` of `qh` is set, else 0 (AVX2).
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
fn hi16_avx2(qh: u32) -> __m256i {
    // Byte l gets byte l / 8 of qh, then keeps bit l % 8 of it.
    let v = _mm256_set1_epi32(qh as i32);
    let spread = _mm256_shuffle_epi8(
        v,
        _mm256_set_epi64x(
            0x0303_0303_0303_0303,
            0x0202_0202_0202_0202,
            0x0101_0101_0101_0101,
            0,
        ),
    );
    let bit = _mm256_set1_epi64x(0x8040_2010_0804_0201_u64 as i64);
    _mm256_and_si256(
        _mm256_cmpeq_epi8(_mm256_and_si256(spread, bit), bit),
        _mm256_set1_epi8(16),
    )
}

/// Byte `l` = 16 where bit `l` of `qh` is set, else 0 (AVX-512 masks).
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
#[inline]
fn hi16_512(qh: u32) -> __m256i {
    _mm256_maskz_mov_epi8(qh, _mm256_set1_epi8(16))
}

/// Lane `k` = the sum of the eight lanes of `v[k]` (exact: integer adds in any order), for a
/// kernel of `M` activation rows.
///
/// Several rows are bound by the arithmetic, and `vphaddd` issues only one per two cycles on
/// Zen 4: they transpose by interleaves and adds, which issue several per cycle (1.01–1.12x
/// from cache at 2–8 rows). One row keeps the six horizontal adds: it streams its weights from
/// memory, and there the interleaves, though faster from cache, made batch-1 decode 5–9% slower
/// (`BENCHMARKS.md`).
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
fn reduce8<const M: usize>(v: &[__m256i; 8]) -> __m256i {
    if M == 1 {
        let a0 = _mm256_hadd_epi32(v[0], v[1]);
        let a1 = _mm256_hadd_epi32(v[2], v[3]);
        let a2 = _mm256_hadd_epi32(v[4], v[5]);
        let a3 = _mm256_hadd_epi32(v[6], v[7]);
        // Per 128-bit half: the half-sums of v0..v3 (b0) and v4..v7 (b1).
        let b0 = _mm256_hadd_epi32(a0, a1);
        let b1 = _mm256_hadd_epi32(a2, a3);
        let lo = _mm256_permute2x128_si256::<0x20>(b0, b1);
        let hi = _mm256_permute2x128_si256::<0x31>(b0, b1);
        return _mm256_add_epi32(lo, hi);
    }
    // Per 128-bit half: [a0 + a2, b0 + b2, a1 + a3, b1 + b3].
    let pair = |a: __m256i, b: __m256i| {
        _mm256_add_epi32(_mm256_unpacklo_epi32(a, b), _mm256_unpackhi_epi32(a, b))
    };
    let p01 = pair(v[0], v[1]);
    let p23 = pair(v[2], v[3]);
    let p45 = pair(v[4], v[5]);
    let p67 = pair(v[6], v[7]);
    // Per 128-bit half: the half-sums of four vectors, [a, b, c, d].
    let quad = |a: __m256i, b: __m256i| {
        _mm256_add_epi32(_mm256_unpacklo_epi64(a, b), _mm256_unpackhi_epi64(a, b))
    };
    let q0 = quad(p01, p23);
    let q1 = quad(p45, p67);
    // [q0.lo + q0.hi, q1.hi + q1.lo]: v0..v3 in the low half, v4..v7 in the high.
    _mm256_add_epi32(
        _mm256_blend_epi32::<0b1111_0000>(q0, q1),
        _mm256_permute2x128_si256::<0x21>(q0, q1),
    )
}

/// The sum of the lanes, in the order of [`super::q8::sum8`].
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
fn hsum_ps(v: __m256) -> f32 {
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_shuffle_ps::<1>(s, s));
    _mm_cvtss_f32(s)
}

/// The sum of the i32 lanes (exact).
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
fn hsum_epi32(v: __m256i) -> i32 {
    let s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256::<1>(v));
    let s = _mm_add_epi32(s, _mm_shuffle_epi32::<0b01_00_11_10>(s));
    let s = _mm_add_epi32(s, _mm_shuffle_epi32::<0b00_00_00_01>(s));
    _mm_cvtsi128_si32(s)
}

#[inline(always)]
unsafe fn read_u16(p: *const u8) -> u16 {
    // SAFETY: the caller guarantees 2 readable bytes.
    unsafe { (p as *const u16).read_unaligned() }
}

#[inline(always)]
unsafe fn read_u32(p: *const u8) -> u32 {
    // SAFETY: the caller guarantees 4 readable bytes.
    unsafe { (p as *const u32).read_unaligned() }
}

// ---- instruction-set specific integer products ----

/// Lane `k` = `Σ_{l<4} w[4k+l]·x[4k+l]` (u8 · i8; AVX2: pairs to i16, then pairs to i32).
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
fn dp_avx2(w: __m256i, x: __m256i) -> __m256i {
    _mm256_madd_epi16(_mm256_maddubs_epi16(w, x), _mm256_set1_epi16(1))
}

/// [`dp_avx2`] with VNNI.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
#[inline]
fn dp_vnni(w: __m256i, x: __m256i) -> __m256i {
    _mm256_dpbusd_epi32(_mm256_setzero_si256(), w, x)
}

/// `acc + (i16 pairs of p)·(i16 pairs of s)` (AVX2).
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
fn wdot_avx2(acc: __m256i, p: __m256i, s: __m256i) -> __m256i {
    _mm256_add_epi32(acc, _mm256_madd_epi16(p, s))
}

/// [`wdot_avx2`] with VNNI.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
#[inline]
fn wdot_vnni(acc: __m256i, p: __m256i, s: __m256i) -> __m256i {
    _mm256_dpwssd_epi32(acc, p, s)
}

/// How a 32-weight kernel (`T`: its ggml id, or [`PLAIN_INT8`]) reads its blocks.
#[derive(Clone, Copy)]
struct Shape32 {
    /// The type whose arithmetic the kernel follows (Q8_0's for skymoe's int8 rows).
    ty: GgmlType,
    /// skymoe's int8 rows: Q8_0's arithmetic with 32 plain bytes per block and a block scale
    /// of 1 (the row's scale is applied by the caller).
    plain: bool,
    /// Bytes per block.
    bb: usize,
    /// Bytes before the block's weights (its f16 scale).
    head: usize,
    /// Q4_1 and Q5_1: a minimum per block.
    min: bool,
    /// Subtracted per block: offset · Σx as `Σx << corr_shift` (Q4_0: q − 8, Q5_0: q − 16;
    /// Q8_0 read as unsigned: w + 128); 0 for none.
    corr_shift: i32,
}

/// The [`Shape32`] of kernel `t`; `q8_unsigned`: Q8_0's weights are read as `w + 128`.
const fn shape32(t: u32, q8_unsigned: bool) -> Shape32 {
    let ty = match t {
        2 => GgmlType::Q4_0,
        3 => GgmlType::Q4_1,
        6 => GgmlType::Q5_0,
        7 => GgmlType::Q5_1,
        _ => GgmlType::Q8_0,
    };
    let plain = t == PLAIN_INT8;
    let (bb, head) = match (plain, ty) {
        (true, _) => (32, 0),
        (false, GgmlType::Q4_0) => (18, 2),
        (false, GgmlType::Q4_1) => (20, 2),
        (false, GgmlType::Q5_0) => (22, 2),
        (false, GgmlType::Q5_1) => (24, 2),
        (false, _) => (34, 2),
    };
    Shape32 {
        ty,
        plain,
        bb,
        head,
        min: matches!(ty, GgmlType::Q4_1 | GgmlType::Q5_1),
        corr_shift: match ty {
            GgmlType::Q4_0 => 3,
            GgmlType::Q5_0 => 4,
            GgmlType::Q8_0 if q8_unsigned => 7,
            _ => 0,
        },
    }
}

/// Both kernels of one instruction set: the 32-weight types and the k-quants.
macro_rules! int_kernels {
    ($features:literal, $dp:ident, $wdot:ident, $hi16:ident, $q8_unsigned:literal) => {
        /// The eight accumulators (`[__m256; M]`, one per block index modulo 8, see
        /// [`super::q8`]) of blocks `0 .. nb` of one weight row of a 32-weight type (`T`),
        /// for activation rows `i0 .. i0 + M`; a macro, so that each kernel has the loop in
        /// its own body (a function called from several kernels is not inlined). Unsafe code:
        /// the caller upholds [`dots32`]'s contract.
        macro_rules! groups32 {
            ($row:expr, $nb:expr, $a:expr, $i0:expr) => {{
                let (row, nb, a, i0): (*const u8, usize, Act, usize) = ($row, $nb, $a, $i0);
                let Shape32 {
                    plain,
                    bb,
                    min,
                    corr_shift,
                    ..
                } = const { shape32(T, $q8_unsigned) };
                let mut acc = [_mm256_setzero_ps(); M];
                let iota = _mm256_set_epi32(7, 6, 5, 4, 3, 2, 1, 0);
                let mut g = 0;
                // SAFETY (whole block): blocks g .. g + n ≤ nb of the row and activation blocks
                // g .. g + n of rows i0 .. i0 + M are read (masked loads for the scales of a
                // last, partial group), as the caller guarantees them.
                unsafe {
                    // One group of `$n` blocks from block `g`; `$full`: all eight present (plain
                    // loads, no tests), else the scales beyond the row are masked off.
                    macro_rules! group {
                        ($n:expr, $full:expr) => {{
                            let n: usize = $n;
                            let base = row.add(g * bb);
                            prefetch_ahead(base, 8 * bb);
                            let mut w = [_mm256_setzero_si256(); 8];
                            // The first 4 bytes of each block: d, then m (Q4_1, Q5_1).
                            let mut hdm = [0u32; 8];
                            for k in 0..8 {
                                if !$full && k >= n {
                                    break;
                                }
                                let b = base.add(k * bb);
                                if !plain {
                                    hdm[k] = read_u32(b);
                                }
                                w[k] = weights32::<T>(b);
                            }
                            let (dw, mw) = scales32::<T>(&hdm);
                            let mask = _mm256_cmpgt_epi32(_mm256_set1_epi32(n as i32), iota);
                            for (i, acc) in acc.iter_mut().enumerate() {
                                let r = i0 + i;
                                let xq = a.q.add(r * a.cols + g * 32);
                                let mut v = [_mm256_setzero_si256(); 8];
                                for k in 0..8 {
                                    if !$full && k >= n {
                                        break;
                                    }
                                    let x = _mm256_loadu_si256(xq.add(32 * k) as *const __m256i);
                                    v[k] = dot32::<T>(w[k], x);
                                }
                                let mut s = reduce8::<M>(&v);
                                let off = r * a.nbx + g;
                                if corr_shift > 0 {
                                    let sx = if $full {
                                        _mm256_loadu_si256(a.sum.add(off) as *const __m256i)
                                    } else {
                                        _mm256_maskload_epi32(a.sum.add(off), mask)
                                    };
                                    s = _mm256_sub_epi32(
                                        s,
                                        _mm256_sll_epi32(sx, _mm_cvtsi32_si128(corr_shift)),
                                    );
                                }
                                let dx = if $full {
                                    _mm256_loadu_ps(a.d.add(off))
                                } else {
                                    _mm256_maskload_ps(a.d.add(off), mask)
                                };
                                let mut t =
                                    _mm256_mul_ps(_mm256_mul_ps(dw, dx), _mm256_cvtepi32_ps(s));
                                if min {
                                    let ds = if $full {
                                        _mm256_loadu_ps(a.dsum.add(off))
                                    } else {
                                        _mm256_maskload_ps(a.dsum.add(off), mask)
                                    };
                                    t = _mm256_add_ps(t, _mm256_mul_ps(mw, ds));
                                }
                                *acc = _mm256_add_ps(*acc, t);
                            }
                        }};
                    }
                    while g + 8 <= nb {
                        group!(8, true);
                        g += 8;
                    }
                    // A last, partial group, its size a constant in each arm (the blocks and
                    // scales then stay in registers).
                    match nb - g {
                        0 => {}
                        1 => group!(1, false),
                        2 => group!(2, false),
                        3 => group!(3, false),
                        4 => group!(4, false),
                        5 => group!(5, false),
                        6 => group!(6, false),
                        _ => group!(7, false),
                    }
                }
                acc
            }};
        }

        /// The 32 weights of the block at `b` of kernel `T` as the bytes its products take
        /// (unsigned but for Q8_0 read as signed; offsets are subtracted per block).
        ///
        /// # Safety
        /// The CPU supports the features; a whole block at `b`.
        #[target_feature(enable = $features)]
        #[inline]
        unsafe fn weights32<const T: u32>(b: *const u8) -> __m256i {
            let sh = const { shape32(T, $q8_unsigned) };
            // SAFETY: the caller guarantees the block.
            unsafe {
                match sh.ty {
                    GgmlType::Q4_0 => nib32(b.add(2)),
                    GgmlType::Q4_1 => nib32(b.add(4)),
                    GgmlType::Q5_0 => _mm256_or_si256(nib32(b.add(6)), $hi16(read_u32(b.add(2)))),
                    GgmlType::Q5_1 => _mm256_or_si256(nib32(b.add(8)), $hi16(read_u32(b.add(4)))),
                    _ if $q8_unsigned => _mm256_xor_si256(
                        _mm256_loadu_si256(b.add(sh.head) as *const __m256i),
                        _mm256_set1_epi8(-128),
                    ),
                    _ => _mm256_loadu_si256(b.add(sh.head) as *const __m256i),
                }
            }
        }

        /// The f16 scales `d` (and minima `m`, Q4_1 and Q5_1) of eight blocks of kernel `T`
        /// from their first four bytes each, as two vectors (`d` is 1 for skymoe's int8 rows).
        #[target_feature(enable = $features)]
        #[inline]
        fn scales32<const T: u32>(hdm: &[u32; 8]) -> (__m256, __m256) {
            // The halves: d of the eight blocks in the low 128 bits, m in the high.
            // SAFETY: reads the 32 bytes of `hdm`.
            let dm = _mm256_permute4x64_epi64::<0b11_01_10_00>(_mm256_shuffle_epi8(
                unsafe { _mm256_loadu_si256(hdm.as_ptr() as *const __m256i) },
                _mm256_set_epi64x(
                    0x0f0e_0b0a_0706_0302,
                    0x0d0c_0908_0504_0100,
                    0x0f0e_0b0a_0706_0302,
                    0x0d0c_0908_0504_0100,
                ),
            ));
            let dw = if const { shape32(T, $q8_unsigned).plain } {
                _mm256_set1_ps(1.0)
            } else {
                _mm256_cvtph_ps(_mm256_castsi256_si128(dm))
            };
            (dw, _mm256_cvtph_ps(_mm256_extracti128_si256::<1>(dm)))
        }

        /// The integer products of the 32 weights `w` of kernel `T` (from [`weights32`]) with
        /// 32 activation bytes `x`, four by four into eight lanes.
        #[target_feature(enable = $features)]
        #[inline]
        fn dot32<const T: u32>(w: __m256i, x: __m256i) -> __m256i {
            if const { matches!(shape32(T, $q8_unsigned).ty, GgmlType::Q8_0) && !$q8_unsigned } {
                // Signed weights: |w| times x with w's sign.
                $dp(_mm256_abs_epi8(w), _mm256_sign_epi8(x, w))
            } else {
                $dp(w, x)
            }
        }

        /// Adds the last `nb % 8` blocks (`n`, 1 to 4: a partial group) of `R` consecutive
        /// weight rows (`rb` bytes apart from `rows`) into their accumulators `acc[j]`, all
        /// rows at once: row `j`'s blocks take lanes `j·n .. j·n + n` of one group, whose
        /// integer sums are reduced and scaled together, then each row's lanes are moved back
        /// to lanes `0 .. n` of its accumulators. Every lane's arithmetic is the row's own
        /// (see [`super::q8`]); a row alone would spend a whole group's reduction and scaling
        /// on its `n` blocks.
        ///
        /// # Safety
        /// As for [`dots32`] for each of the `R` rows; `R·(nb % 8) ≤ 8`.
        #[target_feature(enable = $features)]
        #[inline]
        unsafe fn tails32<const T: u32, const M: usize, const R: usize>(
            rows: *const u8,
            rb: usize,
            nb: usize,
            a: Act,
            i0: usize,
            acc: &mut [[__m256; M]; R],
        ) {
            let sh = const { shape32(T, $q8_unsigned) };
            let n = nb % 8;
            let g = nb - n;
            debug_assert!(n > 0 && R * n <= 8);
            let iota = _mm256_set_epi32(7, 6, 5, 4, 3, 2, 1, 0);
            let nv = _mm256_set1_epi32(n as i32);
            // Lane l of the joint group holds block g + l % n of row l / n.
            let mut block_of_lane = [0i32; 8];
            for (l, b) in block_of_lane.iter_mut().enumerate() {
                *b = (l % n) as i32;
            }
            let block_of_lane = _mm256_loadu_si256(block_of_lane.as_ptr() as *const __m256i);
            let in_row = _mm256_cmpgt_epi32(nv, iota);
            // SAFETY (whole block): blocks g .. nb of the R rows and activation blocks
            // g .. nb of rows i0 .. i0 + M, as the caller guarantees them.
            unsafe {
                let mut w = [_mm256_setzero_si256(); 8];
                let mut hdm = [0u32; 8];
                for j in 0..R {
                    // The rows' own groups requested only their whole groups' lines ahead.
                    prefetch_ahead(rows.add(j * rb + g * sh.bb), n * sh.bb);
                    for k in 0..n {
                        let b = rows.add(j * rb + (g + k) * sh.bb);
                        if !sh.plain {
                            hdm[j * n + k] = read_u32(b);
                        }
                        w[j * n + k] = weights32::<T>(b);
                    }
                }
                let (dw, mw) = scales32::<T>(&hdm);
                for i in 0..M {
                    let r = i0 + i;
                    let xq = a.q.add(r * a.cols + g * 32);
                    let mut v = [_mm256_setzero_si256(); 8];
                    for j in 0..R {
                        for k in 0..n {
                            let x = _mm256_loadu_si256(xq.add(32 * k) as *const __m256i);
                            let l = j * n + k;
                            v[l] = dot32::<T>(w[l], x);
                        }
                    }
                    let mut s = reduce8::<M>(&v);
                    let off = r * a.nbx + g;
                    // The activation's block values of each lane: the row's n blocks,
                    // repeated for every weight row.
                    let spread_i = |p: *const i32| {
                        _mm256_permutevar8x32_epi32(_mm256_maskload_epi32(p, in_row), block_of_lane)
                    };
                    let spread_f = |p: *const f32| {
                        _mm256_permutevar8x32_ps(_mm256_maskload_ps(p, in_row), block_of_lane)
                    };
                    if sh.corr_shift > 0 {
                        s = _mm256_sub_epi32(
                            s,
                            _mm256_sll_epi32(
                                spread_i(a.sum.add(off)),
                                _mm_cvtsi32_si128(sh.corr_shift),
                            ),
                        );
                    }
                    let dx = spread_f(a.d.add(off));
                    let mut t = _mm256_mul_ps(_mm256_mul_ps(dw, dx), _mm256_cvtepi32_ps(s));
                    if sh.min {
                        t = _mm256_add_ps(t, _mm256_mul_ps(mw, spread_f(a.dsum.add(off))));
                    }
                    for (j, acc) in acc.iter_mut().enumerate() {
                        // Lanes j·n .. j·n + n of t to lanes 0 .. n, the others zero.
                        let back = _mm256_add_epi32(iota, _mm256_set1_epi32((j * n) as i32));
                        let mine = _mm256_and_ps(
                            _mm256_permutevar8x32_ps(t, back),
                            _mm256_castsi256_ps(in_row),
                        );
                        acc[i] = _mm256_add_ps(acc[i], mine);
                    }
                }
            }
        }

        /// Integer products of one weight row of a 32-weight type (`T`: its ggml id; `nb`
        /// blocks at `row`) with activation rows `i0 .. i0 + M` of `a`.
        ///
        /// # Safety
        /// The CPU supports the features; `row` holds `nb` blocks; `a` views 32-value
        /// blocks of at least `i0 + M` rows of `nb` blocks.
        #[target_feature(enable = $features)]
        #[inline]
        unsafe fn dots32<const T: u32, const M: usize>(
            row: *const u8,
            nb: usize,
            a: Act,
            i0: usize,
        ) -> [f32; M] {
            // SAFETY: guaranteed by the caller.
            let acc = groups32!(row, nb, a, i0);
            let mut out = [0f32; M];
            for (o, a) in out.iter_mut().zip(&acc) {
                *o = hsum_ps(*a);
            }
            out
        }

        /// Integer products of one weight row of a k-quant (`T`: its ggml id; `nb`
        /// super-blocks at `row`) with activation rows `i0 .. i0 + M` of `a`.
        ///
        /// # Safety
        /// The CPU supports the features; `row` holds `nb` super-blocks; `a` views 256-value
        /// blocks of at least `i0 + M` rows of `nb` blocks.
        #[target_feature(enable = $features)]
        #[inline]
        unsafe fn dots256<const T: u32, const M: usize>(
            row: *const u8,
            nb: usize,
            a: Act,
            i0: usize,
        ) -> [f32; M] {
            let ty = match T {
                12 => GgmlType::Q4K,
                13 => GgmlType::Q5K,
                _ => GgmlType::Q6K,
            };
            let bb = ty.block_bytes();
            // Per activation row, eight f32 lanes summed over the super-blocks (see
            // [`super::q8`]): one horizontal sum per row, not two per super-block.
            let mut accf = [_mm256_setzero_ps(); M];
            let lo4 = _mm256_set1_epi8(0x0F);
            // SAFETY (whole loop): super-block `blk < nb` of the row and activation block
            // `blk` of rows i0 .. i0 + M are read, as the caller guarantees them.
            unsafe {
                for blk in 0..nb {
                    let b = row.add(blk * bb);
                    prefetch_ahead(b, bb);
                    let mut q = [_mm256_setzero_si256(); 8];
                    // Per 32 weights, the i16 scale of each of its 16-weight halves; the mins
                    // (Q4_K, Q5_K) or scales (Q6_K) of the 16 values of `bsums`.
                    let mut sc = [_mm256_setzero_si256(); 8];
                    let per16;
                    let (d, dmin);
                    if ty == GgmlType::Q6K {
                        d = f16_to_f32_x86(read_u16(b.add(208)));
                        dmin = 0.0;
                        for h in 0..2 {
                            let ql = b.add(64 * h);
                            let l0 = _mm256_loadu_si256(ql as *const __m256i);
                            let l1 = _mm256_loadu_si256(ql.add(32) as *const __m256i);
                            let qh = _mm256_loadu_si256(b.add(128 + 32 * h) as *const __m256i);
                            let m2 = _mm256_set1_epi8(0x30);
                            q[4 * h] = _mm256_or_si256(
                                _mm256_and_si256(l0, lo4),
                                _mm256_and_si256(_mm256_slli_epi16::<4>(qh), m2),
                            );
                            q[4 * h + 1] = _mm256_or_si256(
                                _mm256_and_si256(l1, lo4),
                                _mm256_and_si256(_mm256_slli_epi16::<2>(qh), m2),
                            );
                            q[4 * h + 2] = _mm256_or_si256(
                                _mm256_and_si256(_mm256_srli_epi16::<4>(l0), lo4),
                                _mm256_and_si256(qh, m2),
                            );
                            q[4 * h + 3] = _mm256_or_si256(
                                _mm256_and_si256(_mm256_srli_epi16::<4>(l1), lo4),
                                _mm256_and_si256(_mm256_srli_epi16::<2>(qh), m2),
                            );
                        }
                        let s8 = _mm_loadu_si128(b.add(192) as *const __m128i);
                        for (c, s) in sc.iter_mut().enumerate() {
                            // Bytes 0-7: scale 2c, bytes 8-15: scale 2c + 1.
                            let pick = _mm_set_epi64x(
                                (0x0101_0101_0101_0101u64 * (2 * c as u64 + 1)) as i64,
                                (0x0101_0101_0101_0101u64 * (2 * c as u64)) as i64,
                            );
                            *s = _mm256_cvtepi8_epi16(_mm_shuffle_epi8(s8, pick));
                        }
                        per16 = _mm256_cvtepi8_epi16(s8);
                    } else {
                        d = f16_to_f32_x86(read_u16(b));
                        dmin = f16_to_f32_x86(read_u16(b.add(2)));
                        // The 6-bit scales and mins (see `blocks::k_scales`), four per word.
                        let w0 = read_u32(b.add(4));
                        let w1 = read_u32(b.add(8));
                        let w2 = read_u32(b.add(12));
                        let sc_lo = w0 & 0x3F3F_3F3F;
                        let mn_lo = w1 & 0x3F3F_3F3F;
                        let sc_hi = (w2 & 0x0F0F_0F0F) | ((w0 >> 2) & 0x3030_3030);
                        let mn_hi = ((w2 >> 4) & 0x0F0F_0F0F) | ((w1 >> 2) & 0x3030_3030);
                        let scs = ((sc_hi as u64) << 32) | sc_lo as u64;
                        let mns = ((mn_hi as u64) << 32) | mn_lo as u64;
                        let v = _mm_set_epi64x(mns as i64, scs as i64);
                        let sc16 = _mm256_broadcastsi128_si256(_mm_cvtepu8_epi16(v));
                        for (j, s) in sc.iter_mut().enumerate() {
                            // Every i16 lane: scale j.
                            *s = _mm256_shuffle_epi8(
                                sc16,
                                _mm256_set1_epi16((0x0100 + 0x0202 * j) as i16),
                            );
                        }
                        let mn8 = _mm_srli_si128::<8>(v);
                        per16 = _mm256_cvtepu8_epi16(_mm_unpacklo_epi8(mn8, mn8));
                        let qs = if ty == GgmlType::Q5K {
                            b.add(48)
                        } else {
                            b.add(16)
                        };
                        for c in 0..4 {
                            let v = _mm256_loadu_si256(qs.add(32 * c) as *const __m256i);
                            q[2 * c] = _mm256_and_si256(v, lo4);
                            q[2 * c + 1] = _mm256_and_si256(_mm256_srli_epi16::<4>(v), lo4);
                        }
                        if ty == GgmlType::Q5K {
                            let qh = _mm256_loadu_si256(b.add(16) as *const __m256i);
                            let b4 = _mm256_set1_epi8(0x10);
                            // Bit j of each byte moved to bit 4 (16-bit shifts stay within
                            // bytes for these counts once masked).
                            let hb = [
                                _mm256_slli_epi16::<4>(qh),
                                _mm256_slli_epi16::<3>(qh),
                                _mm256_slli_epi16::<2>(qh),
                                _mm256_slli_epi16::<1>(qh),
                                qh,
                                _mm256_srli_epi16::<1>(qh),
                                _mm256_srli_epi16::<2>(qh),
                                _mm256_srli_epi16::<3>(qh),
                            ];
                            for (qj, h) in q.iter_mut().zip(hb) {
                                *qj = _mm256_or_si256(*qj, _mm256_and_si256(h, b4));
                            }
                        }
                    }
                    for (i, o) in accf.iter_mut().enumerate() {
                        let r = i0 + i;
                        let off = r * a.nbx + blk;
                        let xq = a.q.add(r * a.cols + blk * 256);
                        let mut acc = _mm256_setzero_si256();
                        for j in 0..8 {
                            let x = _mm256_loadu_si256(xq.add(32 * j) as *const __m256i);
                            acc = $wdot(acc, _mm256_maddubs_epi16(q[j], x), sc[j]);
                        }
                        let bs = _mm256_loadu_si256(a.bsums.add(16 * off) as *const __m256i);
                        let m = _mm256_madd_epi16(per16, bs);
                        let dx = *a.d.add(off);
                        let t = if ty == GgmlType::Q6K {
                            let s = _mm256_sub_epi32(acc, _mm256_slli_epi32::<5>(m));
                            _mm256_mul_ps(_mm256_set1_ps(d * dx), _mm256_cvtepi32_ps(s))
                        } else {
                            _mm256_sub_ps(
                                _mm256_mul_ps(_mm256_set1_ps(d * dx), _mm256_cvtepi32_ps(acc)),
                                _mm256_mul_ps(_mm256_set1_ps(dmin * dx), _mm256_cvtepi32_ps(m)),
                            )
                        };
                        *o = _mm256_add_ps(*o, t);
                    }
                }
            }
            let mut out = [0f32; M];
            for (o, a) in out.iter_mut().zip(&accf) {
                *o = hsum_ps(*a);
            }
            out
        }

        /// [`dots32`] (`K` false) or [`dots256`] (`K` true) of `nrows` weight rows of `rb`
        /// bytes from `rows`, written to `out` for activation rows `i0 ..` and weight rows
        /// `0 .. nrows`.
        ///
        /// # Safety
        /// As for the kernel of each row; `out` has room for element `(M − 1)·ld + nrows − 1`
        /// and nobody else accesses those elements meanwhile.
        #[target_feature(enable = $features)]
        pub(super) unsafe fn rows<const T: u32, const K: bool, const M: usize>(
            rows: *const u8,
            nrows: usize,
            rb: usize,
            a: Act,
            i0: usize,
            out: Out,
        ) {
            let nb = a.nbx;
            // The 32-weight types' rows with a partial group go in sets first.
            // SAFETY: guaranteed by the caller.
            let done = unsafe {
                match (K, nb % 8) {
                    (true, _) => 0,
                    (false, 1) => joint_rows::<T, M, 8>(rows, nrows, rb, a, i0, out),
                    (false, 2) => joint_rows::<T, M, 4>(rows, nrows, rb, a, i0, out),
                    (false, 3 | 4) => joint_rows::<T, M, 2>(rows, nrows, rb, a, i0, out),
                    _ => 0,
                }
            };
            for r in done..nrows {
                // SAFETY: guaranteed by the caller.
                unsafe {
                    let d = if K {
                        dots256::<T, M>(rows.add(r * rb), nb, a, i0)
                    } else {
                        dots32::<T, M>(rows.add(r * rb), nb, a, i0)
                    };
                    for (i, v) in d.into_iter().enumerate() {
                        *out.ptr.add(i * out.ld + r) = v;
                    }
                }
            }
        }

        /// [`dots32`] of the first rows of [`rows`] in sets of `R` whose partial groups
        /// (`nb % 8` blocks each, `R·(nb % 8) ≤ 8`) are computed together ([`tails32`]);
        /// returns how many rows it wrote (a multiple of `R`).
        ///
        /// # Safety
        /// As for [`rows`].
        #[target_feature(enable = $features)]
        #[inline]
        unsafe fn joint_rows<const T: u32, const M: usize, const R: usize>(
            rows: *const u8,
            nrows: usize,
            rb: usize,
            a: Act,
            i0: usize,
            out: Out,
        ) -> usize {
            let nb = a.nbx;
            let full = nb - nb % 8;
            let sets = nrows / R;
            for set in 0..sets {
                let r0 = set * R;
                let mut acc = [[_mm256_setzero_ps(); M]; R];
                for (j, acc) in acc.iter_mut().enumerate() {
                    *acc = groups32!(rows.wrapping_add((r0 + j) * rb), full, a, i0);
                }
                // SAFETY: guaranteed by the caller.
                unsafe {
                    tails32::<T, M, R>(rows.add(r0 * rb), rb, nb, a, i0, &mut acc);
                    for (j, acc) in acc.iter().enumerate() {
                        for (i, v) in acc.iter().enumerate() {
                            *out.ptr.add(i * out.ld + r0 + j) = hsum_ps(*v);
                        }
                    }
                }
            }
            sets * R
        }
    };
}

/// An f16 (bits) as f32 with F16C (exact; equal to the portable conversion but for NaN
/// payloads).
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
fn f16_to_f32_x86(h: u16) -> f32 {
    _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(h as i32)))
}

/// Quantise the 32 or 256 values of `x` into `q` (see [`super::q8::quantize_block`], whose
/// results these are, bit for bit) and write the sum of every 16 quantised values into
/// `sums16`; returns `max|x|` (NaN for a non-finite block, 0 where no scale exists).
///
/// # Safety
/// The CPU supports AVX2; `x.len()` is 32 or 256, `q` as long, `sums16` at least
/// `x.len() / 16` long.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn quantize_block(x: &[f32], q: &mut [i8], sums16: &mut [i32]) -> f32 {
    let n = x.len();
    assert!(
        (n == 32 || n == 256) && q.len() == n && sums16.len() >= n / 16,
        "quantisation block sizes"
    );
    let p = x.as_ptr();
    let sign = _mm256_set1_ps(-0.0);
    let mut amax = _mm256_setzero_ps();
    let mut nan = _mm256_setzero_ps();
    for c in (0..n).step_by(8) {
        // SAFETY: c + 8 ≤ n values of `x`.
        let v = unsafe { _mm256_loadu_ps(p.add(c)) };
        // A NaN in the first operand leaves the maximum as it was, as `a > amax` does.
        amax = _mm256_max_ps(_mm256_andnot_ps(sign, v), amax);
        nan = _mm256_or_ps(nan, _mm256_cmp_ps::<_CMP_UNORD_Q>(v, v));
    }
    let m = _mm_max_ps(
        _mm256_castps256_ps128(amax),
        _mm256_extractf128_ps::<1>(amax),
    );
    let m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    let amax = _mm_cvtss_f32(_mm_max_ss(m, _mm_shuffle_ps::<1>(m, m)));
    let zero = |q: &mut [i8], sums16: &mut [i32]| {
        q.fill(0);
        sums16[..n / 16].fill(0);
    };
    if _mm256_movemask_ps(nan) != 0 || amax == f32::INFINITY {
        zero(q, sums16);
        return f32::NAN;
    }
    let id = 127.0 / amax;
    if !id.is_finite() {
        zero(q, sums16);
        return 0.0;
    }
    let vid = _mm256_set1_ps(id);
    let order = _mm256_set_epi32(7, 3, 6, 2, 5, 1, 4, 0);
    for c in (0..n).step_by(32) {
        // SAFETY: c + 32 ≤ n values of `x` and bytes of `q`.
        unsafe {
            // Rounded half to even (the default rounding mode), as `round_q`; |v·id| ≤ 127.
            let r = [0, 8, 16, 24]
                .map(|o| _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(p.add(c + o)), vid)));
            // i32 → i16 → i8 within 128-bit halves, then the four groups of 4 back in order.
            let b = _mm256_packs_epi16(
                _mm256_packs_epi32(r[0], r[1]),
                _mm256_packs_epi32(r[2], r[3]),
            );
            let b = _mm256_permutevar8x32_epi32(b, order);
            _mm256_storeu_si256(q.as_mut_ptr().add(c) as *mut __m256i, b);
            sums16[c / 16] = hsum_epi32(_mm256_add_epi32(r[0], r[1]));
            sums16[c / 16 + 1] = hsum_epi32(_mm256_add_epi32(r[2], r[3]));
        }
    }
    amax
}

/// The AVX2 kernels.
mod avx2 {
    use super::*;
    int_kernels!("avx2,fma,f16c", dp_avx2, wdot_avx2, hi16_avx2, false);
}

/// The AVX-512 VNNI kernels.
mod vnni {
    use super::*;
    int_kernels!(
        "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c",
        dp_vnni,
        wdot_vnni,
        hi16_512,
        true
    );
}

/// The weight rows an integer kernel reads.
#[derive(Clone, Copy)]
pub(super) enum Rows {
    /// Whole blocks of a ggml type, `a.nbx` per row.
    Ggml(GgmlType),
    /// skymoe's int8 rows of `a.cols` signed bytes (`a.cols` a multiple of 32): the products
    /// before the rows' scales, in the arithmetic of Q8_0 with block scales of 1.
    Int8,
}

/// Integer products of `g` (1 to 8) activation rows (`a`, from row `i0`) with `nrows` weight
/// rows (`rows`, of the kind `kind`), with VNNI (`vnni`) or AVX2, written to `out` (element
/// `i·ld + r` for activation row `i0 + i`, weight row `r`).
///
/// # Safety
/// AVX2 (and with `vnni` AVX-512 F/BW/VL/VNNI) is supported by this CPU; `rows` holds
/// `nrows` whole rows of `kind`; `a` views blocks of its size (32 values for int8 rows) of at
/// least `i0 + g` rows; `out` has room for element `(g − 1)·ld + nrows − 1`, accessed by
/// nobody else meanwhile.
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn rows_dots(
    vnni: bool,
    kind: Rows,
    rows: *const u8,
    nrows: usize,
    a: Act,
    i0: usize,
    g: usize,
    out: Out,
) {
    macro_rules! groups {
        ($($m:literal)*) => {
            match g {
                // SAFETY: guaranteed by the caller.
                $($m => unsafe { rows_dots_m::<$m>(vnni, kind, rows, nrows, a, i0, out) },)*
                _ => unreachable!("at most 8 activation rows"),
            }
        };
    }
    groups!(1 2 3 4 5 6 7 8);
}

/// [`rows_dots`] of `M` activation rows.
///
/// # Safety
/// As for [`rows_dots`] with `g = M`.
unsafe fn rows_dots_m<const M: usize>(
    vnni: bool,
    kind: Rows,
    rows: *const u8,
    nrows: usize,
    a: Act,
    i0: usize,
    out: Out,
) {
    macro_rules! go {
        ($id:expr, $k:literal, $rb:expr) => {
            // SAFETY: guaranteed by the caller.
            unsafe {
                if vnni {
                    vnni::rows::<{ $id }, $k, M>(rows, nrows, $rb, a, i0, out)
                } else {
                    avx2::rows::<{ $id }, $k, M>(rows, nrows, $rb, a, i0, out)
                }
            }
        };
    }
    let ty = match kind {
        Rows::Int8 => return go!(PLAIN_INT8, false, a.cols),
        Rows::Ggml(ty) => ty,
    };
    let rb = a.nbx * ty.block_bytes();
    match ty {
        GgmlType::Q4_0 => go!(2, false, rb),
        GgmlType::Q4_1 => go!(3, false, rb),
        GgmlType::Q5_0 => go!(6, false, rb),
        GgmlType::Q5_1 => go!(7, false, rb),
        GgmlType::Q8_0 => go!(8, false, rb),
        GgmlType::Q4K => go!(12, true, rb),
        GgmlType::Q5K => go!(13, true, rb),
        GgmlType::Q6K => go!(14, true, rb),
    }
}
