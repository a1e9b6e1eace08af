//! An exponential that compilers vectorise (no call into libm), and the SwiGLU activation and
//! its derivative over whole rows on top of it, compiled for AVX2+FMA when the CPU has them.
//!
//! `exp(x) = 2^k · p(r)` with `k = round(x / ln 2)`, `r = x − k·ln 2` (ln 2 split in two
//! parts) and the degree-6 polynomial of Cephes' `expf` for `p`: within 2 ulp of `f32::exp`
//! over `[-87, 88]`; NaN stays NaN.

use std::mem::MaybeUninit;

/// `exp(x)` for f32, vectorisable; see the module documentation for its accuracy.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // 1.5 · 2^23: adding and subtracting it rounds to the nearest integer.
    const ROUND: f32 = 12_582_912.0;
    // Written as comparisons (not `max`/`min`) so that NaN passes through.
    let x = if x > 88.3 { 88.3 } else { x };
    let x = if x < -87.3 { -87.3 } else { x };
    // `x·log₂e + 1.5·2²³` holds k = round(x·log₂e) in its low mantissa bits: k is read from
    // the bits with integer arithmetic, which vectorises (a float-to-int cast does not: Rust's
    // saturating `as i32` became one scalar conversion per lane).
    let shifted = x * LOG2E + ROUND;
    let k = shifted - ROUND;
    let r = x - k * LN2_HI - k * LN2_LO;
    let mut p = 1.987_569_1e-4f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 0.5;
    let e = p * r * r + r + 1.0;
    // 2^k from k + 127 in the exponent field; the clamps keep k + 127 within 1..=254.
    let biased = shifted
        .to_bits()
        .wrapping_sub(ROUND.to_bits())
        .wrapping_add(127);
    let scale = f32::from_bits(biased << 23);
    e * scale
}

#[inline(always)]
fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + exp(-x))
}

#[inline(always)]
fn swiglu_rows_generic(
    gu: &[f32],
    act: &mut [MaybeUninit<f32>],
    sig: &mut [MaybeUninit<f32>],
    ffn: usize,
) {
    for ((a, sg), gu) in act
        .chunks_exact_mut(ffn)
        .zip(sig.chunks_exact_mut(ffn))
        .zip(gu.chunks_exact(2 * ffn))
    {
        let (g, u) = gu.split_at(ffn);
        for (((a, sg), &g), &u) in a.iter_mut().zip(sg.iter_mut()).zip(g).zip(u) {
            let s = sigmoid(g);
            *sg = MaybeUninit::new(s);
            *a = MaybeUninit::new(g * s * u);
        }
    }
}

#[inline(always)]
fn silu_mul_rows_generic(gu: &[f32], act: &mut [f32], ffn: usize) {
    for (a, gu) in act.chunks_exact_mut(ffn).zip(gu.chunks_exact(2 * ffn)) {
        let (g, u) = gu.split_at(ffn);
        for ((a, &g), &u) in a.iter_mut().zip(g).zip(u) {
            *a = g * sigmoid(g) * u;
        }
    }
}

#[inline(always)]
fn swiglu_backward_rows_generic(
    gu: &[f32],
    sig: &[f32],
    da: &[f32],
    dgu: &mut [MaybeUninit<f32>],
    ffn: usize,
) {
    for (((dgu, gu), sig), da) in dgu
        .chunks_exact_mut(2 * ffn)
        .zip(gu.chunks_exact(2 * ffn))
        .zip(sig.chunks_exact(ffn))
        .zip(da.chunks_exact(ffn))
    {
        let (g, u) = gu.split_at(ffn);
        let (dg, du) = dgu.split_at_mut(ffn);
        for i in 0..ffn {
            let s = sig[i];
            du[i] = MaybeUninit::new(da[i] * g[i] * s);
            dg[i] = MaybeUninit::new(da[i] * u[i] * s * (1.0 + g[i] * (1.0 - s)));
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn swiglu_rows_avx2(
    gu: &[f32],
    act: &mut [MaybeUninit<f32>],
    sig: &mut [MaybeUninit<f32>],
    ffn: usize,
) {
    swiglu_rows_generic(gu, act, sig, ffn)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn silu_mul_rows_avx2(gu: &[f32], act: &mut [f32], ffn: usize) {
    silu_mul_rows_generic(gu, act, ffn)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn swiglu_backward_rows_avx2(
    gu: &[f32],
    sig: &[f32],
    da: &[f32],
    dgu: &mut [MaybeUninit<f32>],
    ffn: usize,
) {
    swiglu_backward_rows_generic(gu, sig, da, dgu, ffn)
}

/// `act = silu(g) · u` for rows of `gu = [g, u]` (rows of `2·ffn`; `act` rows of `ffn`), and
/// `sig = σ(g)` (rows of `ffn`) for the backward pass. Every element of `act` and `sig` is
/// written (none read), so they may start uninitialised.
pub fn swiglu_rows(
    gu: &[f32],
    act: &mut [MaybeUninit<f32>],
    sig: &mut [MaybeUninit<f32>],
    ffn: usize,
) {
    #[cfg(target_arch = "x86_64")]
    if crate::rows::avx2_fma() {
        // SAFETY: the CPU has AVX2 and FMA (checked just above); the function is safe code
        // compiled with those features.
        return unsafe { swiglu_rows_avx2(gu, act, sig, ffn) };
    }
    swiglu_rows_generic(gu, act, sig, ffn)
}

/// `act = silu(g) · u` for rows of `gu = [g, u]` (rows of `2·ffn`; `act` rows of `ffn`), the
/// same values as [`swiglu_rows`] without keeping σ(g) (inference).
pub fn silu_mul_rows(gu: &[f32], act: &mut [f32], ffn: usize) {
    #[cfg(target_arch = "x86_64")]
    if crate::rows::avx2_fma() {
        // SAFETY: as in `swiglu_rows`.
        return unsafe { silu_mul_rows_avx2(gu, act, ffn) };
    }
    silu_mul_rows_generic(gu, act, ffn)
}

/// The gradient of `[g, u]` from the gradient `da` of `silu(g) · u`, given `sig = σ(g)` as
/// [`swiglu_rows`] left it: `dg = da · u · σ(g)·(1 + g·(1 − σ(g)))`, `du = da · silu(g)`, row by
/// row. Every element of `dgu` is written (none read), so it may start uninitialised.
pub fn swiglu_backward_rows(
    gu: &[f32],
    sig: &[f32],
    da: &[f32],
    dgu: &mut [MaybeUninit<f32>],
    ffn: usize,
) {
    #[cfg(target_arch = "x86_64")]
    if crate::rows::avx2_fma() {
        // SAFETY: as in `swiglu_rows`.
        return unsafe { swiglu_backward_rows_avx2(gu, sig, da, dgu, ffn) };
    }
    swiglu_backward_rows_generic(gu, sig, da, dgu, ffn)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_is_within_two_ulp_of_libm() {
        let mut worst = 0.0f64;
        let mut x = -87.0f32;
        while x < 88.0 {
            let (got, want) = (exp(x) as f64, (x as f64).exp());
            worst = worst.max((got - want).abs() / want);
            x += 0.000_37;
        }
        assert!(worst < 2.5e-7, "relative error {worst}");
        assert!(exp(f32::NAN).is_nan());
        assert_eq!(exp(0.0), 1.0);
        assert!(exp(-200.0) < 1e-37 && exp(200.0) > 1e38 && exp(200.0).is_finite());
    }

    /// The exponential with k converted by a float-to-int cast: what `exp` computed before it
    /// read k from the bits.
    fn exp_by_cast(x: f32) -> f32 {
        let x = if x > 88.3 { 88.3 } else { x };
        let x = if x < -87.3 { -87.3 } else { x };
        let k = (x * std::f32::consts::LOG2_E + 12_582_912.0) - 12_582_912.0;
        let r = x - k * 0.693_359_4 - k * -2.121_944_4e-4;
        let mut p = 1.987_569_1e-4f32;
        for c in [
            1.398_199_9e-3,
            8.333_452e-3,
            4.166_579_6e-2,
            1.666_666_5e-1,
            0.5,
        ] {
            p = p * r + c;
        }
        (p * r * r + r + 1.0) * f32::from_bits(((k as i32 + 127) as u32) << 23)
    }

    #[test]
    fn exp_reads_k_from_the_bits_as_the_cast_did() {
        let mut x = -100.0f32;
        while x < 100.0 {
            assert_eq!(exp(x).to_bits(), exp_by_cast(x).to_bits(), "x = {x}");
            x += 0.000_71;
        }
        for x in [
            -87.3f32,
            -87.29,
            88.29,
            88.3,
            -0.0,
            f32::MIN,
            f32::MAX,
            1e-30,
        ] {
            assert_eq!(exp(x).to_bits(), exp_by_cast(x).to_bits(), "x = {x}");
        }
        for x in [f32::INFINITY, f32::NEG_INFINITY] {
            assert_eq!(exp(x), exp_by_cast(x));
        }
    }

    #[test]
    fn swiglu_rows_match_the_scalar_formula_on_every_isa() {
        let ffn = 37;
        let rows = 3;
        let gu: Vec<f32> = (0..rows * 2 * ffn)
            .map(|i| ((i * 7919) % 2000) as f32 / 100.0 - 10.0)
            .collect();
        let da: Vec<f32> = (0..rows * ffn).map(|i| (i as f32 * 0.37).sin()).collect();
        let silu = |g: f32| g / (1.0 + (-g).exp());
        let mut want_act = vec![0.0f32; rows * ffn];
        let mut want_dgu = vec![0.0f32; rows * 2 * ffn];
        for r in 0..rows {
            for i in 0..ffn {
                let (g, u) = (gu[r * 2 * ffn + i], gu[r * 2 * ffn + ffn + i]);
                let s = 1.0 / (1.0 + (-g).exp());
                want_act[r * ffn + i] = silu(g) * u;
                let d = da[r * ffn + i];
                want_dgu[r * 2 * ffn + i] = d * u * s * (1.0 + g * (1.0 - s));
                want_dgu[r * 2 * ffn + ffn + i] = d * silu(g);
            }
        }
        let close = |a: &[f32], b: &[f32]| {
            a.iter()
                .zip(b)
                .all(|(x, y)| (x - y).abs() <= 1e-5 * y.abs().max(1.0))
        };
        // Outputs start as NaN: an element left unwritten would fail the comparisons.
        let nan = |n: usize| vec![MaybeUninit::new(f32::NAN); n];
        let init = |v: Vec<MaybeUninit<f32>>| -> Vec<f32> {
            // SAFETY: every element was initialised (to NaN, then by the kernels).
            v.into_iter().map(|x| unsafe { x.assume_init() }).collect()
        };
        let (mut act, mut sig, mut dgu) = (nan(rows * ffn), nan(rows * ffn), nan(rows * 2 * ffn));
        swiglu_rows_generic(&gu, &mut act, &mut sig, ffn);
        let sig = init(sig);
        swiglu_backward_rows_generic(&gu, &sig, &da, &mut dgu, ffn);
        let (act, dgu) = (init(act), init(dgu));
        assert!(close(&act, &want_act) && close(&dgu, &want_dgu));
        let (mut act2, mut sig2, mut dgu2) =
            (nan(rows * ffn), nan(rows * ffn), nan(rows * 2 * ffn));
        swiglu_rows(&gu, &mut act2, &mut sig2, ffn);
        let sig2 = init(sig2);
        swiglu_backward_rows(&gu, &sig2, &da, &mut dgu2, ffn);
        let (act2, dgu2) = (init(act2), init(dgu2));
        assert!(close(&act2, &want_act) && close(&dgu2, &want_dgu));
        // The forward without σ(g) gives the same bits, on both builds.
        let (mut act3, mut act4) = (vec![0.0f32; rows * ffn], vec![0.0f32; rows * ffn]);
        silu_mul_rows(&gu, &mut act3, ffn);
        silu_mul_rows_generic(&gu, &mut act4, ffn);
        assert_eq!((&act3, &act4), (&act2, &act2));
        // The AVX2 build gives the portable build's bits.
        assert_eq!((act, sig, dgu), (act2, sig2, dgu2));
    }
}
