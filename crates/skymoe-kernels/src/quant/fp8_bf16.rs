//! FP8 (E4M3) products with bf16 activations and AVX-512 BF16 dot products, for few
//! activation rows (decode steps, small batches) on CPUs with AVX512-BF16 and VBMI.
//!
//! Every 64 codes of a weight row are decoded to their exact bf16 values by two byte-table
//! lookups (`vpermi2b` over the 128 magnitudes: the low and the high byte of each value's
//! bf16 bits; the sign bit is OR-ed in) and paired with the activations, rounded to bf16 once
//! per product, by `vdpbf16ps`: each bf16·bf16 product is exact in f32 and added to one of 16
//! f32 accumulators (per 64 codes, two vectors of 32 pairs). Unpacking the two byte vectors
//! into 16-bit values works within 128-bit lanes, so the 64 values come out as codes
//! `0-7, 16-23, 32-39, 48-55` then `8-15, 24-31, 40-47, 56-63`: the activations are stored in
//! that order ([`Bf16Activations`]). The row's scale multiplies the sum.
//!
//! Against the f32 path (codes decoded through f16 and multiplied by FMA, 16 at a time) this
//! takes about a third of the instructions per weight; the activations lose the bits beyond
//! bf16's 8 (relative rounding error at most 2⁻⁹ each). Used for 1 to 64 activation rows,
//! where it measured faster; `SKYMOE_GGML_ACTIVATIONS=f32` keeps f32 activations everywhere.
//!
//! One activation row (batch-1 decode) is bound by the memory, but the f32 path, at about 16 G
//! weights/s per core from cache, only just keeps up with one core's share of it; this kernel
//! runs at about 29 and then streams from memory as fast as the f32 path once it requests its
//! weights further ahead and into L2 (8 KiB, `prefetcht1`; at 4 KiB into L1, as the other
//! kernels do, it streamed ~10% slower than the f32 path).

use super::fp8::e4m3_to_f32;

/// Columns per block of the kernel.
pub(crate) const BLOCK: usize = 64;

/// bf16 bits of the E4M3 magnitudes `0 ..= 127` (exact: three mantissa bits fit in bf16's
/// seven, and 2⁻⁹ ..= 448 in its exponent range); code `0x7F` is NaN.
pub(crate) fn e4m3_bf16_table() -> [u16; 128] {
    let mut t = [0u16; 128];
    for (k, v) in t.iter_mut().enumerate() {
        let f = e4m3_to_f32(k as u8);
        *v = if f.is_nan() {
            0x7FC0
        } else {
            (f.to_bits() >> 16) as u16
        };
    }
    t
}

/// `x` rounded to bf16 (to nearest, ties to even; NaN stays NaN).
pub(crate) fn to_bf16(x: f32) -> u16 {
    if x.is_nan() {
        return 0x7FC0;
    }
    let b = x.to_bits();
    ((b + 0x7FFF + ((b >> 16) & 1)) >> 16) as u16
}

/// The value of bf16 bits.
#[cfg(test)]
pub(crate) fn bf16_to_f32(h: u16) -> f32 {
    f32::from_bits((h as u32) << 16)
}

/// Where column `c` of a block goes in the kernel's order (see the module documentation).
fn position(c: usize) -> usize {
    let (lane, byte) = (c / 16, c % 16);
    if byte < 8 {
        lane * 8 + byte
    } else {
        32 + lane * 8 + byte - 8
    }
}

/// Activation rows rounded to bf16, each 64-column block in the kernel's order.
#[derive(Debug, Clone)]
pub(crate) struct Bf16Activations {
    /// Rows.
    pub rows: usize,
    /// Columns (a multiple of [`BLOCK`]).
    pub cols: usize,
    /// `[rows, cols]` bf16 bits, permuted within each block.
    pub data: Vec<u16>,
}

impl Bf16Activations {
    /// Round `rows` rows of `x` (`[rows, cols]`, `cols` a multiple of [`BLOCK`]).
    pub fn new(x: &[f32], rows: usize, cols: usize) -> Self {
        assert!(cols.is_multiple_of(BLOCK) && x.len() == rows * cols);
        let mut data = vec![0u16; rows * cols];
        for (src, dst) in x.chunks_exact(BLOCK).zip(data.chunks_exact_mut(BLOCK)) {
            for (c, &v) in src.iter().enumerate() {
                dst[position(c)] = to_bf16(v);
            }
        }
        Bf16Activations { rows, cols, data }
    }

    /// Row `i` back in column order, as f32 (the activations the products use).
    #[cfg(test)]
    pub fn row(&self, i: usize) -> Vec<f32> {
        let mut out = vec![0f32; self.cols];
        for (b, blk) in self.data[i * self.cols..(i + 1) * self.cols]
            .chunks_exact(BLOCK)
            .enumerate()
        {
            for c in 0..BLOCK {
                out[b * BLOCK + c] = bf16_to_f32(blk[position(c)]);
            }
        }
        out
    }
}

/// Whether this CPU runs the kernels (AVX-512 F/BW/VL with BF16 and VBMI).
pub(crate) fn supported() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        super::Isa::Avx512.supported()
            && is_x86_feature_detected!("avx512vl")
            && is_x86_feature_detected!("avx512bf16")
            && is_x86_feature_detected!("avx512vbmi")
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

#[cfg(target_arch = "x86_64")]
pub(crate) use x86::rows_dots;

/// No kernels on other targets ([`supported`] is false there, so nothing calls this).
///
/// # Safety
/// Never called.
#[cfg(not(target_arch = "x86_64"))]
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn rows_dots(
    _q: &[u8],
    _scales: &[f32],
    _x: &Bf16Activations,
    _i0: usize,
    _g: usize,
    _out: *mut f32,
    _ld: usize,
    _rows: (usize, usize),
) {
    unreachable!("no BF16 kernels on this target")
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::{e4m3_bf16_table, Bf16Activations, BLOCK};

    /// The byte tables of the lookups: low and high bytes of the 128 magnitudes' bf16 bits,
    /// each as two 64-byte vectors (codes 0-63, 64-127).
    struct Tables {
        lo: [[u8; 64]; 2],
        hi: [[u8; 64]; 2],
    }

    /// How far ahead of a one-row product's reads its weights are requested, into L2.
    const ONE_ROW_PREFETCH_BYTES: usize = 8192;

    fn tables() -> &'static Tables {
        static T: std::sync::OnceLock<Tables> = std::sync::OnceLock::new();
        T.get_or_init(|| {
            let t = e4m3_bf16_table();
            let mut out = Tables {
                lo: [[0; 64]; 2],
                hi: [[0; 64]; 2],
            };
            for (k, &v) in t.iter().enumerate() {
                out.lo[k / 64][k % 64] = v as u8;
                out.hi[k / 64][k % 64] = (v >> 8) as u8;
            }
            out
        })
    }

    /// Dot products of activation rows `i0 .. i0 + M` of `x` with the FP8 row at `w`
    /// (`x.cols` codes), before the row's scale.
    ///
    /// # Safety
    /// The CPU supports AVX-512 F/BW, VBMI and BF16; `w` points at `x.cols` readable bytes;
    /// `i0 + M <= x.rows`.
    #[target_feature(enable = "avx512f,avx512bw,avx512vbmi,avx512bf16,avx2,fma,f16c")]
    unsafe fn dots<const M: usize>(
        w: *const u8,
        x: &Bf16Activations,
        i0: usize,
        t: &Tables,
    ) -> [f32; M] {
        let cols = x.cols;
        // SAFETY (whole body): the tables are 64-byte arrays; `w` holds `cols` bytes and the
        // activation rows i0 .. i0 + M hold `cols` values each (the caller's guarantee);
        // every block read below is inside them.
        unsafe {
            let lo0 = _mm512_loadu_si512(t.lo[0].as_ptr() as *const _);
            let lo1 = _mm512_loadu_si512(t.lo[1].as_ptr() as *const _);
            let hi0 = _mm512_loadu_si512(t.hi[0].as_ptr() as *const _);
            let hi1 = _mm512_loadu_si512(t.hi[1].as_ptr() as *const _);
            let sign = _mm512_set1_epi8(-128);
            let mut acc = [[_mm512_setzero_ps(); 2]; M];
            let xs = x.data.as_ptr().add(i0 * cols);
            let mut c = 0;
            while c < cols {
                if M == 1 {
                    // One activation row streams the weights faster than the memory delivers
                    // them: request further ahead, into L2 (see `ONE_ROW_PREFETCH_BYTES`).
                    _mm_prefetch::<_MM_HINT_T1>(
                        w.wrapping_add(c + ONE_ROW_PREFETCH_BYTES) as *const i8
                    );
                } else {
                    crate::quant::x86::prefetch_ahead(w.add(c), BLOCK);
                }
                let code = _mm512_loadu_si512(w.add(c) as *const _);
                let lo = _mm512_permutex2var_epi8(lo0, code, lo1);
                // The high byte with the code's sign: hi | (code & 0x80).
                let hi = _mm512_ternarylogic_epi32::<0xF8>(
                    _mm512_permutex2var_epi8(hi0, code, hi1),
                    code,
                    sign,
                );
                let wa: __m512bh = std::mem::transmute(_mm512_unpacklo_epi8(lo, hi));
                let wb: __m512bh = std::mem::transmute(_mm512_unpackhi_epi8(lo, hi));
                for (i, a) in acc.iter_mut().enumerate() {
                    let xp = xs.add(i * cols + c);
                    let xa: __m512bh = std::mem::transmute(_mm512_loadu_si512(xp as *const _));
                    let xb: __m512bh =
                        std::mem::transmute(_mm512_loadu_si512(xp.add(32) as *const _));
                    a[0] = _mm512_dpbf16_ps(a[0], wa, xa);
                    a[1] = _mm512_dpbf16_ps(a[1], wb, xb);
                }
                c += BLOCK;
            }
            acc.map(|a| _mm512_reduce_add_ps(_mm512_add_ps(a[0], a[1])))
        }
    }

    /// Products of activation rows `i0 .. i0 + g` (`g` at most 8) of `x` with the FP8 rows
    /// `r0 .. r1` of `q` (rows of `x.cols` codes, one scale per row in `scales`), element
    /// `(i, r)` written at `out + (i0 + i)·ld + r`.
    ///
    /// # Safety
    /// [`super::supported`]; `q` holds rows up to `r1` and `scales` a scale for each;
    /// `i0 + g <= x.rows`; the output elements are in bounds and written by nobody else
    /// meanwhile.
    #[allow(clippy::too_many_arguments)]
    pub(crate) unsafe fn rows_dots(
        q: &[u8],
        scales: &[f32],
        x: &Bf16Activations,
        i0: usize,
        g: usize,
        out: *mut f32,
        ld: usize,
        (r0, r1): (usize, usize),
    ) {
        let cols = x.cols;
        debug_assert!(i0 + g <= x.rows && r1 * cols <= q.len() && r1 <= scales.len());
        let t = tables();
        macro_rules! go {
            ($($m:literal)*) => {
                match g {
                    $($m => {
                        for r in r0..r1 {
                            // SAFETY: the caller's guarantees: row r's codes are in `q`, the
                            // activation rows exist, the CPU runs the kernel.
                            let d = unsafe { dots::<$m>(q.as_ptr().add(r * cols), x, i0, t) };
                            for (i, v) in d.into_iter().enumerate() {
                                // SAFETY: an in-bounds element of the caller's share.
                                unsafe { *out.add((i0 + i) * ld + r) = v * scales[r] };
                            }
                        }
                    })*
                    _ => unreachable!("at most 8 activation rows"),
                }
            };
        }
        go!(1 2 3 4 5 6 7 8);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::fp8::e4m3_to_f32;
    use crate::quant::{Isa, QMatrix};

    /// Dequantised weights times the bf16-rounded activations, accumulated in f64.
    fn reference(mat: &QMatrix, a: &Bf16Activations) -> Vec<f32> {
        let w = mat.dequantize();
        let (rows, cols) = (mat.rows(), mat.cols());
        let mut out = vec![0f32; a.rows * rows];
        for i in 0..a.rows {
            let x = a.row(i);
            for r in 0..rows {
                out[i * rows + r] = x
                    .iter()
                    .zip(&w[r * cols..(r + 1) * cols])
                    .map(|(&x, &w)| x as f64 * w as f64)
                    .sum::<f64>() as f32;
            }
        }
        out
    }

    #[test]
    fn bf16_products_equal_the_reference_with_rounded_activations() {
        if !supported() {
            return;
        }
        let (rows, cols) = (37, 576);
        // Every code's magnitude appears (subnormals, zero, the largest), both signs.
        let codes: Vec<u8> = (0..rows * cols)
            .map(|i| ((i * 37 + i / 7) % 256) as u8)
            .map(|c| if c & 0x7F == 0x7F { 0x7E } else { c })
            .collect();
        let scales: Vec<f32> = (0..rows).map(|r| 0.01 * (r + 1) as f32).collect();
        let mat = QMatrix::from_fp8(codes, &scales, rows, cols).unwrap();
        let weights = mat.dequantize();
        assert!(weights.iter().all(|w| w.is_finite()));
        // Rows the few-row path takes (more take the bf16 tiles, tested in `bf16_tiles`).
        for m in [1, 2, 5, 8, 9, 16] {
            let x: Vec<f32> = (0..m * cols)
                .map(|i| ((i * 7919) % 1013) as f32 / 506.0 - 1.0)
                .collect();
            assert!(crate::quant::kernels::fp8_uses_bf16(Isa::Avx512, cols, m));
            let a = Bf16Activations::new(&x, m, cols);
            let want = reference(&mat, &a);
            let mut got = vec![f32::NAN; m * rows];
            mat.matmul_with(Isa::Avx512, &x, m, &mut got);
            let num: f64 = got
                .iter()
                .zip(&want)
                .map(|(g, w)| ((g - w) as f64).powi(2))
                .sum();
            let den: f64 = want.iter().map(|w| (*w as f64).powi(2)).sum();
            let e = (num / den).sqrt();
            assert!(e < 1e-6, "m={m}: rel err {e}");
        }
    }

    #[test]
    fn the_table_holds_every_magnitude_exactly_and_rounding_is_to_nearest_even() {
        let t = e4m3_bf16_table();
        for (k, &v) in t.iter().enumerate() {
            let want = e4m3_to_f32(k as u8);
            if want.is_nan() {
                assert!(bf16_to_f32(v).is_nan());
            } else {
                assert_eq!(bf16_to_f32(v), want, "code {k}");
            }
        }
        assert_eq!(to_bf16(1.0), 0x3F80);
        // 1 + 2⁻⁸ is halfway between 1 and 1 + 2⁻⁷: to even (1).
        assert_eq!(to_bf16(1.0 + 1.0 / 256.0), 0x3F80);
        assert_eq!(to_bf16(1.0 + 3.0 / 256.0), 0x3F82);
        assert!(bf16_to_f32(to_bf16(f32::NAN)).is_nan());
        assert_eq!(bf16_to_f32(to_bf16(-2.5)), -2.5);
    }

    #[test]
    fn activations_keep_every_value_in_the_kernel_order() {
        let (rows, cols) = (3, 128);
        // Integers below 256 are exact in bf16; each appears once per block.
        let x: Vec<f32> = (0..rows * cols).map(|i| ((i * 3) % 251) as f32).collect();
        let a = Bf16Activations::new(&x, rows, cols);
        for i in 0..rows {
            assert_eq!(a.row(i), x[i * cols..(i + 1) * cols].to_vec());
        }
        let mut seen: Vec<usize> = (0..BLOCK).map(position).collect();
        seen.sort_unstable();
        assert_eq!(seen, (0..BLOCK).collect::<Vec<_>>());
    }
}
