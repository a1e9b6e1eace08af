//! Many-row products (prefill) of int8, FP8 and ggml rows with bf16 activations and AVX-512
//! BF16 dot products, on CPUs with them.
//!
//! `vdpbf16ps` adds two bf16·bf16 products (each exact in f32) to each of 16 f32 lanes: twice
//! the multiply-adds of an f32 FMA per instruction, and on Zen 4 at the same rate (measured:
//! 115 against 57 G multiply-adds per second and core). The weights are converted exactly:
//! int8 codes (at most 8 significant bits) and E4M3 codes (3 mantissa bits) are bf16 values,
//! and the row's scale multiplies the finished sum; a ggml row's blocks are decoded into their
//! integer values and each group's multiplier and offset (the ggml module's kernels, beside
//! its dequantisation), and the kernel adds each group's sum times its multiplier, plus
//! its offset times the activations' sum over the group ([`products_grouped`]). The
//! activations are rounded to bf16 once per product (relative error at most 2⁻⁹ each, as on
//! the FP8 path of few rows, `fp8_bf16`); sums are kept in f32.
//!
//! Layout. The lanes of an accumulator are 16 activation rows, so that the activations,
//! transposed once per product ([`Bf16Pairs`]: groups of 32 rows, for each pair of columns
//! the 32 rows' bf16 pairs side by side), are read as whole vectors, and each weight pair is
//! broadcast from a tile of the task's weight rows converted to bf16 pairs in row order
//! ([`convert_rows`]). One call of the micro-kernel covers 32 activation rows (two vectors)
//! and [`NR`] weight rows (24 accumulators; 6 rows for the ggml kernel, whose group sums take
//! another 12 registers): two vector loads and one broadcast per weight row and column pair.
//! The results are staged as whole vectors and written one output row at a time.

#![cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]

use super::fp8_bf16::to_bf16;

/// Weight rows per call of the micro-kernel.
pub(crate) const NR: usize = 12;

/// Weight rows per task of a product: about 128 KiB of bf16 pairs of `cols` columns, in
/// whole calls of the micro-kernels.
pub(crate) fn task_rows(cols: usize) -> usize {
    (65536 / cols.max(1)).clamp(NR, 192) / NR * NR
}

/// Activation rows per group of [`Bf16Pairs`] (two vectors of 16 lanes).
pub(crate) const GROUP: usize = 32;

/// Activation rows rounded to bf16 and transposed for the micro-kernel: rows in groups of
/// [`GROUP`] (the last padded with zeros), each group `[pairs][GROUP]` of `u32`, the bf16 of
/// columns `2k` (low half) and `2k + 1` (high half; zero past an odd last column) of each row.
#[derive(Debug, Clone)]
pub(crate) struct Bf16Pairs {
    /// Rows.
    pub rows: usize,
    /// Column pairs (`cols` halved, rounded up).
    pub pairs: usize,
    /// The groups, one after the other.
    pub data: Vec<u32>,
    /// Where asked for: the sums of every 16 columns of the rounded rows, per group
    /// `[ceil(cols / 16)][GROUP]` (for the weight types with an offset per block, whose
    /// products add `offset · Σx` per block).
    pub sums16: Vec<f32>,
}

impl Bf16Pairs {
    /// Round and transpose `rows` rows of `x` (`[rows, cols]`), the groups in parallel.
    /// Rounding is to nearest, ties to even; with the AVX-512 BF16 conversion (where
    /// [`supported`]) subnormal values become zero, as that instruction has them.
    pub fn new(x: &[f32], rows: usize, cols: usize) -> Self {
        Self::build(x, rows, cols, false)
    }

    /// [`Bf16Pairs::new`] with the sums of every 16 columns ([`Bf16Pairs::sums16`]).
    pub fn with_sums(x: &[f32], rows: usize, cols: usize) -> Self {
        Self::build(x, rows, cols, true)
    }

    fn build(x: &[f32], rows: usize, cols: usize, with_sums: bool) -> Self {
        use rayon::prelude::*;
        assert_eq!(x.len(), rows * cols, "activation length");
        let pairs = cols.div_ceil(2);
        let groups = rows.div_ceil(GROUP);
        let mut data = vec![0u32; groups * pairs * GROUP];
        let n16 = if with_sums { cols.div_ceil(16) } else { 0 };
        let mut sums16 = vec![0f32; groups * n16 * GROUP];
        if pairs == 0 {
            return Bf16Pairs {
                rows,
                pairs,
                data,
                sums16,
            };
        }
        let vector = supported();
        data.par_chunks_mut(pairs * GROUP)
            .enumerate()
            .for_each(|(g, group)| {
                let mut row = vec![0u32; pairs];
                for (l, xi) in x[g * GROUP * cols..]
                    .chunks_exact(cols)
                    .take(GROUP)
                    .enumerate()
                {
                    if vector {
                        // SAFETY: `supported()`: the CPU runs the conversion.
                        #[cfg(target_arch = "x86_64")]
                        unsafe {
                            x86::pairs_of_row(xi, &mut row)
                        };
                    } else {
                        pairs_of_row_portable(xi, &mut row);
                    }
                    for (k, &p) in row.iter().enumerate() {
                        group[k * GROUP + l] = p;
                    }
                }
            });
        if with_sums {
            // From the transposed pairs: lane by lane, so that the loops vectorise.
            sums16
                .par_chunks_mut(n16 * GROUP)
                .zip(data.par_chunks(pairs * GROUP))
                .for_each(|(sums, group)| {
                    for (j, s) in sums.chunks_exact_mut(GROUP).enumerate() {
                        for k in 8 * j..(8 * j + 8).min(pairs) {
                            for (acc, &p) in s.iter_mut().zip(&group[k * GROUP..(k + 1) * GROUP]) {
                                *acc += f32::from_bits(p << 16) + f32::from_bits(p & 0xFFFF_0000);
                            }
                        }
                    }
                });
        }
        Bf16Pairs {
            rows,
            pairs,
            data,
            sums16,
        }
    }

    /// Row `i` back in column order (`cols` values), as f32: the activations the products use.
    #[cfg(test)]
    pub fn row(&self, i: usize, cols: usize) -> Vec<f32> {
        let group = &self.data[(i / GROUP) * self.pairs * GROUP..];
        (0..cols)
            .map(|c| {
                let p = group[(c / 2) * GROUP + i % GROUP];
                let bits = if c % 2 == 0 { p & 0xFFFF } else { p >> 16 };
                f32::from_bits(bits << 16)
            })
            .collect()
    }
}

/// The bf16 pairs of one activation row (`out`: `ceil(xi.len() / 2)` pairs).
fn pairs_of_row_portable(xi: &[f32], out: &mut [u32]) {
    for (k, p) in out.iter_mut().enumerate() {
        let lo = to_bf16(xi[2 * k]) as u32;
        let hi = xi.get(2 * k + 1).map_or(0, |&v| to_bf16(v) as u32);
        *p = lo | hi << 16;
    }
}

/// A weight format the kernels convert exactly.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Codes<'a> {
    /// int8 codes, row-major.
    Int8(&'a [i8]),
    /// E4M3 codes, row-major.
    Fp8(&'a [u8]),
}

/// The bf16 bits of the E4M3 magnitudes `0 ..= 127`.
fn fp8_table() -> &'static [u16; 128] {
    static TABLE: std::sync::OnceLock<[u16; 128]> = std::sync::OnceLock::new();
    TABLE.get_or_init(super::fp8_bf16::e4m3_bf16_table)
}

/// The bf16 bits of E4M3 code `c` (sign included; NaN codes give a bf16 NaN).
fn fp8_bf16(c: u8) -> u16 {
    fp8_table()[(c & 0x7F) as usize] | ((c as u16 & 0x80) << 8)
}

/// Convert weight rows `r0 .. r1` (`cols` codes each) into `tile`, row `j` (`r0 + j`) at
/// `j · pairs` as [`Bf16Pairs`]'s pairs (an odd last column paired with zero), without their
/// scales. Portable code: the reference of the vector conversion.
pub(crate) fn convert_rows_portable(
    codes: Codes<'_>,
    cols: usize,
    (r0, r1): (usize, usize),
    tile: &mut [u32],
) {
    let pairs = cols.div_ceil(2);
    for (j, r) in (r0..r1).enumerate() {
        let value = |c: usize| -> u32 {
            match codes {
                Codes::Int8(q) => to_bf16(q[r * cols + c] as f32) as u32,
                Codes::Fp8(q) => fp8_bf16(q[r * cols + c]) as u32,
            }
        };
        for (k, p) in tile[j * pairs..(j + 1) * pairs].iter_mut().enumerate() {
            let hi = if 2 * k + 1 < cols {
                value(2 * k + 1)
            } else {
                0
            };
            *p = value(2 * k) | hi << 16;
        }
    }
}

/// Whether this CPU runs the kernels.
pub(crate) fn supported() -> bool {
    super::fp8_bf16::supported()
}

#[cfg(target_arch = "x86_64")]
pub(crate) use x86::{convert_rows, products, products_grouped};

/// No kernels on other targets ([`supported`] is false there, so nothing calls this).
///
/// # Safety
/// Never called.
#[cfg(not(target_arch = "x86_64"))]
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn products_grouped(
    _x: &Bf16Pairs,
    _tile: &[u32],
    _rows: usize,
    _span: usize,
    _scales: &[f32],
    _offsets: Option<&[f32]>,
    _out: *mut f32,
    _ld: usize,
) {
    unreachable!("no BF16 kernels on this target")
}

/// No kernels on other targets ([`supported`] is false there, so nothing calls this).
///
/// # Safety
/// Never called.
#[cfg(not(target_arch = "x86_64"))]
pub(crate) unsafe fn convert_rows(
    _codes: Codes<'_>,
    _cols: usize,
    _rows: (usize, usize),
    _tile: &mut [u32],
) {
    unreachable!("no BF16 kernels on this target")
}

/// No kernels on other targets ([`supported`] is false there, so nothing calls this).
///
/// # Safety
/// Never called.
#[cfg(not(target_arch = "x86_64"))]
pub(crate) unsafe fn products(
    _x: &Bf16Pairs,
    _tile: &[u32],
    _scales: &[f32],
    _out: *mut f32,
    _ld: usize,
) {
    unreachable!("no BF16 kernels on this target")
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::{convert_rows_portable, fp8_table, pairs_of_row_portable, Bf16Pairs, Codes};
    use super::{GROUP, NR};

    /// [`pairs_of_row_portable`] with AVX-512 BF16, 32 values per step (subnormals become
    /// zero; a last partial step as the portable code).
    ///
    /// # Safety
    /// [`super::supported`]; `out` holds `ceil(xi.len() / 2)` pairs.
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    pub(super) unsafe fn pairs_of_row(xi: &[f32], out: &mut [u32]) {
        let whole = xi.len() / 32 * 32;
        assert!(out.len() >= xi.len().div_ceil(2), "pair count");
        let mut c = 0;
        while c < whole {
            // SAFETY: values c .. c + 32 are in `xi` and pairs c/2 .. c/2 + 16 in `out`.
            unsafe {
                let lo = _mm512_loadu_ps(xi.as_ptr().add(c));
                let hi = _mm512_loadu_ps(xi.as_ptr().add(c + 16));
                let v = std::mem::transmute::<__m512bh, __m512i>(_mm512_cvtne2ps_pbh(hi, lo));
                _mm512_storeu_si512(out.as_mut_ptr().add(c / 2) as *mut _, v);
            }
            c += 32;
        }
        if whole < xi.len() {
            pairs_of_row_portable(&xi[whole..], &mut out[whole / 2..]);
        }
    }

    /// [`convert_rows_portable`] with AVX-512 (32 codes per step; a last partial step and an
    /// odd last column as the portable code).
    ///
    /// # Safety
    /// [`super::supported`]; `codes` holds rows up to `r1` of `cols` codes and `tile` room for
    /// `(r1 − r0) · ceil(cols / 2)` pairs.
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16,avx512vbmi")]
    pub(crate) unsafe fn convert_rows(
        codes: Codes<'_>,
        cols: usize,
        (r0, r1): (usize, usize),
        tile: &mut [u32],
    ) {
        let pairs = cols.div_ceil(2);
        let whole = cols / 32 * 32;
        assert!(tile.len() >= (r1 - r0) * pairs, "tile length");
        let table = fp8_table();
        // SAFETY: four 32-value vectors of the 128-entry table.
        let t: [__m512i; 4] = std::array::from_fn(|k| unsafe {
            _mm512_loadu_si512(table.as_ptr().add(32 * k) as *const _)
        });
        for (j, r) in (r0..r1).enumerate() {
            let dst = &mut tile[j * pairs..(j + 1) * pairs];
            let mut c = 0;
            while c < whole {
                // SAFETY: codes r·cols + c .. + 32 are in row r (c + 32 <= cols) and the 16
                // pairs c/2 .. c/2 + 16 in `dst` (c + 32 <= cols <= 2·pairs).
                unsafe {
                    let v = match codes {
                        Codes::Int8(q) => {
                            let p = q.as_ptr().add(r * cols + c);
                            let lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(
                                p as *const __m128i,
                            )));
                            let hi = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(
                                p.add(16) as *const __m128i,
                            )));
                            // Exact: integers of at most 8 significant bits.
                            std::mem::transmute::<__m512bh, __m512i>(_mm512_cvtne2ps_pbh(hi, lo))
                        }
                        Codes::Fp8(q) => {
                            let code = _mm512_cvtepu8_epi16(_mm256_loadu_si256(
                                q.as_ptr().add(r * cols + c) as *const __m256i,
                            ));
                            // Magnitudes 0-63 from the first two table vectors, 64-127 from
                            // the other two (bit 6 picks), then the sign bit.
                            let low = _mm512_permutex2var_epi16(t[0], code, t[1]);
                            let high = _mm512_permutex2var_epi16(t[2], code, t[3]);
                            let v = _mm512_mask_blend_epi16(
                                _mm512_test_epi16_mask(code, _mm512_set1_epi16(0x40)),
                                low,
                                high,
                            );
                            _mm512_or_si512(
                                v,
                                _mm512_slli_epi16::<8>(_mm512_and_si512(
                                    code,
                                    _mm512_set1_epi16(0x80),
                                )),
                            )
                        }
                    };
                    _mm512_storeu_si512(dst.as_mut_ptr().add(c / 2) as *mut _, v);
                }
                c += 32;
            }
            if whole < cols {
                let mut rest = vec![0u32; pairs - whole / 2];
                let tail = match codes {
                    Codes::Int8(q) => Codes::Int8(&q[r * cols + whole..(r + 1) * cols]),
                    Codes::Fp8(q) => Codes::Fp8(&q[r * cols + whole..(r + 1) * cols]),
                };
                convert_rows_portable(tail, cols - whole, (0, 1), &mut rest);
                dst[whole / 2..].copy_from_slice(&rest);
            }
        }
    }

    /// As [`kernel`], per group of `GP` pairs (`2·GP` columns) of each weight row: the
    /// group's sum times its multiplier (`d`, the rows' multipliers `ds` apart) and, with
    /// `MIN`, plus its offset (`o`, laid out as `d`) times the activation rows' sums over the
    /// group (`sums`: `[groups][GROUP]`, see [`Bf16Pairs::sums16`], whose 16-column sums
    /// are added in pairs when `GP` is 16).
    ///
    /// # Safety
    /// As for [`kernel`], `pairs` a multiple of `GP`; `d` (and `o`) hold `(N − 1)·ds +
    /// pairs / GP` values; with `MIN`, `sums` holds `pairs / 8` rows of `GROUP` sums.
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    #[inline]
    #[allow(clippy::too_many_arguments)]
    unsafe fn kernel_grouped<const N: usize, const V: usize, const GP: usize, const MIN: bool>(
        a: *const u32,
        w: *const u32,
        ws: usize,
        pairs: usize,
        d: *const f32,
        o: *const f32,
        ds: usize,
        sums: *const f32,
    ) -> [[__m512; V]; N] {
        let mut acc = [[_mm512_setzero_ps(); V]; N];
        for g in 0..pairs / GP {
            let mut part = [[_mm512_setzero_ps(); V]; N];
            for k in g * GP..g * GP + GP {
                // SAFETY: in bounds (the caller's guarantee).
                unsafe {
                    let av: [__m512bh; V] = std::array::from_fn(|v| {
                        std::mem::transmute::<__m512i, __m512bh>(_mm512_loadu_si512(
                            a.add(k * GROUP + 16 * v) as *const _,
                        ))
                    });
                    for (r, part_r) in part.iter_mut().enumerate() {
                        let wb = std::mem::transmute::<__m512i, __m512bh>(_mm512_set1_epi32(
                            *w.add(r * ws + k) as i32,
                        ));
                        for (p, &x) in part_r.iter_mut().zip(&av) {
                            *p = _mm512_dpbf16_ps(*p, x, wb);
                        }
                    }
                }
            }
            // SAFETY: the group's sums are in `sums` (the caller's guarantee).
            let sum: [__m512; V] = std::array::from_fn(|v| unsafe {
                if !MIN {
                    return _mm512_setzero_ps();
                }
                let at = |j: usize| _mm512_loadu_ps(sums.add(j * GROUP + 16 * v));
                if GP == 16 {
                    _mm512_add_ps(at(2 * g), at(2 * g + 1))
                } else {
                    at(g)
                }
            });
            for (r, (acc_r, part_r)) in acc.iter_mut().zip(&part).enumerate() {
                // SAFETY: row r's value for group g is in `d` (and `o`): the caller's guarantee.
                let (m, off) = unsafe {
                    (
                        *d.add(r * ds + g),
                        if MIN { *o.add(r * ds + g) } else { 0.0 },
                    )
                };
                let m = _mm512_set1_ps(m);
                let off = _mm512_set1_ps(off);
                for ((x, &p), &sv) in acc_r.iter_mut().zip(part_r).zip(&sum) {
                    *x = _mm512_fmadd_ps(p, m, *x);
                    if MIN {
                        *x = _mm512_fmadd_ps(sv, off, *x);
                    }
                }
            }
        }
        acc
    }

    /// Store `acc` (rows `r .. r + N` of the tile, lanes a group's activation rows), times
    /// `scales[r]` where given, into `stage` (`[tile row][GROUP]`) with whole-vector stores.
    ///
    /// # Panics
    /// When `stage` has no room for rows `r .. r + N`.
    #[target_feature(enable = "avx512f")]
    fn stage_acc<const N: usize, const V: usize>(
        acc: &[[__m512; V]; N],
        r: usize,
        scales: Option<&[f32]>,
        stage: &mut [f32],
    ) {
        assert!(stage.len() >= (r + N) * GROUP, "stage length");
        for (n, acc_r) in acc.iter().enumerate() {
            let scale = _mm512_set1_ps(scales.map_or(1.0, |s| s[r + n]));
            for (v, a) in acc_r.iter().enumerate() {
                // SAFETY: 16 floats at (r + n)·GROUP + 16v, inside `stage` (asserted).
                unsafe {
                    _mm512_storeu_ps(
                        stage.as_mut_ptr().add((r + n) * GROUP + 16 * v),
                        _mm512_mul_ps(*a, scale),
                    )
                };
            }
        }
    }

    /// Write the staged products of `rows` tile rows with the group's `n_act` activation rows
    /// from `i0` to `out + i·ld + r`, one output row after the other.
    ///
    /// # Safety
    /// The elements are in bounds and written by nobody else meanwhile.
    unsafe fn flush(stage: &[f32], rows: usize, n_act: usize, i0: usize, out: *mut f32, ld: usize) {
        for l in 0..n_act {
            // SAFETY: the caller's guarantee.
            let o = unsafe { out.add((i0 + l) * ld) };
            for r in 0..rows {
                // SAFETY: the caller's guarantee.
                unsafe { *o.add(r) = stage[r * GROUP + l] };
            }
        }
    }

    /// `out[i·ld + r] = Σ_g (scales[r·ng + g] · Σ_{c in g} x[i, c] · w[r, c] + offsets[r·ng + g] ·
    /// Σ_{c in g} x[i, c])` for every activation row `i` of `x` and each of the `rows` rows of
    /// the converted `tile`, over the `ng = 2·x.pairs / span` groups of `span` columns (16 or
    /// 32) of each row; no offsets where `offsets` is `None`.
    ///
    /// # Safety
    /// [`super::supported`]; `2·x.pairs` is a multiple of `span`; `tile` holds `rows ·
    /// x.pairs` pairs and `scales` (and `offsets`) `rows · ng` values; with offsets, `x` has
    /// its sums ([`Bf16Pairs::with_sums`]); the elements `i·ld + r` (`i < x.rows`, `r < rows`)
    /// from `out` are in bounds and written by nobody else meanwhile.
    #[allow(clippy::too_many_arguments)]
    pub(crate) unsafe fn products_grouped(
        x: &Bf16Pairs,
        tile: &[u32],
        rows: usize,
        span: usize,
        scales: &[f32],
        offsets: Option<&[f32]>,
        out: *mut f32,
        ld: usize,
    ) {
        /// Weight rows per call: 12 partial sums and 12 totals in registers.
        const NS: usize = 6;
        let pairs = x.pairs;
        assert!(matches!(span, 16 | 32) && (2 * pairs).is_multiple_of(span));
        let ng = 2 * pairs / span;
        let n16 = 2 * pairs / 16;
        assert!(
            tile.len() >= rows * pairs && scales.len() >= rows * ng,
            "tile length"
        );
        assert!(offsets.is_none_or(|o| o.len() >= rows * ng), "offsets");
        assert!(offsets.is_none() || x.sums16.len() >= x.rows.div_ceil(GROUP) * n16 * GROUP);
        let o_ptr = offsets.map_or(std::ptr::null(), |o| o.as_ptr());
        let mut stage = vec![0f32; rows * GROUP];
        for i0 in (0..x.rows).step_by(GROUP) {
            let two = x.rows - i0 > 16;
            let n_act = (x.rows - i0).min(GROUP);
            let a = x.data[i0 * pairs..].as_ptr();
            let sums = if offsets.is_some() {
                x.sums16[(i0 / GROUP) * n16 * GROUP..].as_ptr()
            } else {
                std::ptr::null()
            };
            let mut r = 0;
            while r < rows {
                let nr = (rows - r).min(NS);
                let w = tile[r * pairs..].as_ptr();
                let d = scales[r * ng..].as_ptr();
                let o = o_ptr.wrapping_add(r * ng);
                macro_rules! call {
                    ($k:literal, $v:literal) => {
                        // SAFETY: the caller's guarantees, for rows r .. r + nr.
                        unsafe {
                            let acc = match (span, offsets.is_some()) {
                                (32, false) => kernel_grouped::<$k, $v, 16, false>(
                                    a, w, pairs, pairs, d, o, ng, sums,
                                ),
                                (32, true) => kernel_grouped::<$k, $v, 16, true>(
                                    a, w, pairs, pairs, d, o, ng, sums,
                                ),
                                (_, false) => kernel_grouped::<$k, $v, 8, false>(
                                    a, w, pairs, pairs, d, o, ng, sums,
                                ),
                                (_, true) => kernel_grouped::<$k, $v, 8, true>(
                                    a, w, pairs, pairs, d, o, ng, sums,
                                ),
                            };
                            stage_acc(&acc, r, None, &mut stage)
                        }
                    };
                }
                macro_rules! go {
                    ($($k:literal)*) => {
                        match (nr, two) {
                            $(
                                ($k, true) => call!($k, 2),
                                ($k, false) => call!($k, 1),
                            )*
                            _ => unreachable!("at most {NS} rows per call"),
                        }
                    };
                }
                go!(1 2 3 4 5 6);
                r += nr;
            }
            // SAFETY: the caller's guarantee.
            unsafe { flush(&stage, rows, n_act, i0, out, ld) };
        }
    }

    /// Sums of `N` weight rows of `w` (pairs, rows `ws` apart) with the `V · 16` activation
    /// rows of the group at `a` (`[pairs][GROUP]`), over `pairs` column pairs.
    ///
    /// # Safety
    /// The CPU runs AVX-512 BF16; `a` holds `pairs · GROUP` and `w` `(N − 1)·ws + pairs`
    /// values.
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    #[inline]
    unsafe fn kernel<const N: usize, const V: usize>(
        a: *const u32,
        w: *const u32,
        ws: usize,
        pairs: usize,
    ) -> [[__m512; V]; N] {
        let mut acc = [[_mm512_setzero_ps(); V]; N];
        for k in 0..pairs {
            // SAFETY: in bounds (the caller's guarantee).
            unsafe {
                let av: [__m512bh; V] = std::array::from_fn(|v| {
                    std::mem::transmute::<__m512i, __m512bh>(_mm512_loadu_si512(
                        a.add(k * GROUP + 16 * v) as *const _,
                    ))
                });
                for (r, acc_r) in acc.iter_mut().enumerate() {
                    let b = std::mem::transmute::<__m512i, __m512bh>(_mm512_set1_epi32(
                        *w.add(r * ws + k) as i32,
                    ));
                    for (acc_v, &x) in acc_r.iter_mut().zip(&av) {
                        *acc_v = _mm512_dpbf16_ps(*acc_v, x, b);
                    }
                }
            }
        }
        acc
    }

    /// Run [`kernel`] for `N` rows and `V` vectors, then write `(i, r)` (for the group's
    /// rows below `x.rows`) scaled by `scales[r]` at `out + i·ld + r`.
    ///
    /// # Safety
    /// As for [`products`], for the group starting at row `i0` and rows `r .. r + N` of the
    /// tile.
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn block<const N: usize, const V: usize>(
        x: &Bf16Pairs,
        i0: usize,
        tile: &[u32],
        r: usize,
        scales: &[f32],
        stage: &mut [f32],
    ) {
        let pairs = x.pairs;
        // SAFETY: the group's and the rows' data are in bounds (the caller's guarantee).
        let acc = unsafe {
            kernel::<N, V>(
                x.data.as_ptr().add(i0 * pairs),
                tile.as_ptr().add(r * pairs),
                pairs,
                pairs,
            )
        };
        stage_acc(&acc, r, Some(scales), stage);
    }

    /// `out[i·ld + r] = scales[r] · Σ_c x[i, c] · w[r, c]` for every activation row `i` of `x`
    /// and every row `r` of the converted `tile` (`scales.len()` rows of `x.pairs` pairs).
    ///
    /// # Safety
    /// [`super::supported`]; `tile` holds `scales.len() · x.pairs` pairs; the elements
    /// `i·ld + r` (`i < x.rows`, `r < scales.len()`) from `out` are in bounds and written by
    /// nobody else meanwhile.
    pub(crate) unsafe fn products(
        x: &Bf16Pairs,
        tile: &[u32],
        scales: &[f32],
        out: *mut f32,
        ld: usize,
    ) {
        let n = scales.len();
        assert!(tile.len() >= n * x.pairs, "tile length");
        let mut stage = vec![0f32; n * GROUP];
        for i0 in (0..x.rows).step_by(GROUP) {
            let two = x.rows - i0 > 16;
            let mut r = 0;
            while r < n {
                let nr = (n - r).min(NR);
                macro_rules! go {
                    ($($k:literal)*) => {
                        match (nr, two) {
                            $(
                                // SAFETY: the caller's guarantees, for rows r .. r + nr <= n.
                                ($k, true) => unsafe { block::<$k, 2>(x, i0, tile, r, scales, &mut stage) },
                                ($k, false) => unsafe { block::<$k, 1>(x, i0, tile, r, scales, &mut stage) },
                            )*
                            _ => unreachable!("at most {NR} rows per call"),
                        }
                    };
                }
                go!(1 2 3 4 5 6 7 8 9 10 11 12);
                r += nr;
            }
            // SAFETY: the caller's guarantee.
            unsafe { flush(&stage, n, (x.rows - i0).min(GROUP), i0, out, ld) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rng(seed: u64) -> impl FnMut() -> f32 {
        let mut s = seed;
        move || {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        }
    }

    #[test]
    fn activations_keep_every_row_rounded_to_bf16() {
        for (rows, cols) in [(1, 1), (3, 5), (33, 64), (70, 31)] {
            let mut r = rng(rows as u64 * 7 + cols as u64);
            let x: Vec<f32> = (0..rows * cols).map(|_| r() * 3.0).collect();
            let a = Bf16Pairs::new(&x, rows, cols);
            for i in 0..rows {
                let want: Vec<f32> = x[i * cols..(i + 1) * cols]
                    .iter()
                    .map(|&v| f32::from_bits((to_bf16(v) as u32) << 16))
                    .collect();
                assert_eq!(a.row(i, cols), want, "{rows}x{cols}, row {i}");
            }
        }
    }

    #[test]
    fn the_vector_conversion_equals_the_portable_one() {
        if !supported() {
            return;
        }
        for cols in [1usize, 31, 32, 33, 64, 95, 576] {
            let rows = 5;
            let int8: Vec<i8> = (0..rows * cols)
                .map(|k| (k * 37 % 256) as u8 as i8)
                .collect();
            let fp8: Vec<u8> = (0..rows * cols).map(|k| (k * 53 % 256) as u8).collect();
            for codes in [Codes::Int8(&int8), Codes::Fp8(&fp8)] {
                let pairs = cols.div_ceil(2);
                let mut want = vec![0u32; 3 * pairs];
                let mut got = vec![7u32; 3 * pairs];
                convert_rows_portable(codes, cols, (1, 4), &mut want);
                // SAFETY: supported; rows 1..4 exist; the tile holds 3 rows of pairs.
                unsafe { convert_rows(codes, cols, (1, 4), &mut got) };
                assert_eq!(got, want, "{cols} columns, {codes:?}");
            }
        }
        // Every code converts exactly (bf16 NaN for E4M3's NaN codes).
        for c in 0..=255u8 {
            let v = crate::quant::fp8::e4m3_to_f32(c);
            let b = f32::from_bits((fp8_bf16(c) as u32) << 16);
            assert!(
                v == b || (v.is_nan() && b.is_nan()),
                "code {c:#x}: {v} vs {b}"
            );
        }
    }

    #[test]
    fn grouped_products_equal_the_scaled_codes_times_rounded_activations() {
        if !supported() {
            return;
        }
        for (m, n, cols) in [(1, 1, 32), (17, 7, 64), (65, 13, 576), (40, 6, 96)] {
            for (span, min) in [(32, false), (32, true), (16, false), (16, true)] {
                let mut r = rng((m * 100 + n + span) as u64);
                let x: Vec<f32> = (0..m * cols).map(|_| r()).collect();
                let a = if min {
                    Bf16Pairs::with_sums(&x, m, cols)
                } else {
                    Bf16Pairs::new(&x, m, cols)
                };
                let (pairs, ng) = (cols / 2, cols / span);
                let q: Vec<i8> = (0..n * cols).map(|_| (r() * 127.0) as i8).collect();
                let scales: Vec<f32> = (0..n * ng).map(|_| 0.001 + r().abs() * 0.05).collect();
                let offsets: Vec<f32> = (0..n * ng).map(|_| r() * 0.2).collect();
                let mut tile = vec![0u32; n * pairs];
                convert_rows_portable(Codes::Int8(&q), cols, (0, n), &mut tile);
                let ld = n + 2;
                let mut out = vec![f32::NAN; m * ld];
                let off = min.then_some(&offsets[..]);
                // SAFETY: supported; whole groups; the tile, scales and offsets hold n rows;
                // the sums where offsets are given; out [m, ld].
                unsafe { products_grouped(&a, &tile, n, span, &scales, off, out.as_mut_ptr(), ld) };
                for i in 0..m {
                    let xi = a.row(i, cols);
                    for rr in 0..n {
                        let w = |c: usize| {
                            let g = rr * ng + c / span;
                            scales[g] as f64 * q[rr * cols + c] as f64
                                + if min { offsets[g] as f64 } else { 0.0 }
                        };
                        let want: f64 = (0..cols).map(|c| xi[c] as f64 * w(c)).sum();
                        let norm: f64 = (0..cols).map(|c| (xi[c] as f64 * w(c)).abs()).sum();
                        let got = out[i * ld + rr] as f64;
                        assert!(
                            (got - want).abs() <= 1e-6 * norm + 1e-30,
                            "{m}x{n}x{cols} span {span} offsets {min}: ({i}, {rr}) {got} vs {want}"
                        );
                    }
                    assert!(out[i * ld + n..(i + 1) * ld].iter().all(|v| v.is_nan()));
                }
            }
        }
    }

    #[test]
    fn products_equal_the_sums_of_rounded_activations_and_exact_weights() {
        if !supported() {
            return;
        }
        for (m, n, cols) in [
            (1, 1, 2),
            (17, 13, 64),
            (65, 30, 576),
            (130, 25, 33),
            (32, 12, 7),
        ] {
            let mut r = rng((m * 1000 + n * 10 + cols) as u64);
            let x: Vec<f32> = (0..m * cols).map(|_| r()).collect();
            let q: Vec<i8> = (0..n * cols).map(|_| (r() * 127.0) as i8).collect();
            let f: Vec<u8> = (0..n * cols)
                .map(|_| (r() * 127.0) as i8 as u8 & 0xF7)
                .collect();
            let scales: Vec<f32> = (0..n).map(|_| 0.01 + r().abs()).collect();
            let a = Bf16Pairs::new(&x, m, cols);
            for codes in [Codes::Int8(&q), Codes::Fp8(&f)] {
                let pairs = cols.div_ceil(2);
                let mut tile = vec![0u32; n * pairs];
                convert_rows_portable(codes, cols, (0, n), &mut tile);
                let ld = n + 3;
                let mut out = vec![f32::NAN; m * ld];
                // SAFETY: supported; the tile holds n rows; out is [m, ld] with ld >= n.
                unsafe { products(&a, &tile, &scales, out.as_mut_ptr(), ld) };
                for i in 0..m {
                    let xi = a.row(i, cols);
                    for rr in 0..n {
                        let w = |c: usize| match codes {
                            Codes::Int8(q) => q[rr * cols + c] as f64,
                            Codes::Fp8(f) => {
                                crate::quant::fp8::e4m3_to_f32(f[rr * cols + c]) as f64
                            }
                        };
                        let want: f64 =
                            (0..cols).map(|c| xi[c] as f64 * w(c)).sum::<f64>() * scales[rr] as f64;
                        let norm: f64 = (0..cols).map(|c| (xi[c] as f64 * w(c)).abs()).sum::<f64>()
                            * scales[rr] as f64;
                        let got = out[i * ld + rr] as f64;
                        assert!(
                            (got - want).abs() <= 1e-6 * norm + 1e-30,
                            "{m}x{n}x{cols} {codes:?}: ({i}, {rr}) {got} vs {want}"
                        );
                    }
                    for c in n..ld {
                        assert!(out[i * ld + c].is_nan(), "wrote outside its columns");
                    }
                }
            }
        }
    }
}
