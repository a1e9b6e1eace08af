//! Row primitives of the fused kernels: softmax of a row and its backward, log-sum-exp, dot
//! products and sums of squares, written over 16 independent lanes so that they vectorise,
//! and compiled for AVX2+FMA (chosen at run time) on x86-64.
//!
//! The lanes change the order of the additions against a plain left-to-right loop, so sums
//! differ from one in the last bits; every function here gives the same bits on every CPU
//! (the AVX2 build and the portable one run the same lane order, and `exp` is the
//! polynomial of [`crate::vexp`], not libm's).

use crate::vexp::exp;

/// Independent accumulators per reduction: two AVX2 vectors (or one AVX-512 vector).
const LANES: usize = 16;

/// The maximum of `x` (NaN ignored, as `f32::max` does); −∞ for an empty slice.
#[inline(always)]
fn max_generic(x: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; LANES];
    let chunks = x.chunks_exact(LANES);
    let tail = chunks.remainder();
    for c in chunks {
        for i in 0..LANES {
            acc[i] = if c[i] > acc[i] { c[i] } else { acc[i] };
        }
    }
    for (a, &v) in acc.iter_mut().zip(tail) {
        *a = if v > *a { v } else { *a };
    }
    acc.iter().copied().fold(f32::NEG_INFINITY, f32::max)
}

/// The sum of the lanes in a fixed order (pairwise).
#[inline(always)]
fn lane_sum(acc: [f32; LANES]) -> f32 {
    let mut w = acc;
    let mut n = LANES;
    while n > 1 {
        n /= 2;
        for i in 0..n {
            w[i] += w[i + n];
        }
    }
    w[0]
}

/// `x[i] = exp(x[i] − shift)` in place; returns the sum of the new values.
#[inline(always)]
fn exp_shifted_in_place(x: &mut [f32], shift: f32) -> f32 {
    let mut acc = [0.0f32; LANES];
    let mut chunks = x.chunks_exact_mut(LANES);
    for c in &mut chunks {
        for i in 0..LANES {
            c[i] = exp(c[i] - shift);
            acc[i] += c[i];
        }
    }
    for (a, v) in acc.iter_mut().zip(chunks.into_remainder()) {
        *v = exp(*v - shift);
        *a += *v;
    }
    lane_sum(acc)
}

/// `Σ exp(x[i] − shift)`.
#[inline(always)]
fn exp_sum(x: &[f32], shift: f32) -> f32 {
    let mut acc = [0.0f32; LANES];
    let chunks = x.chunks_exact(LANES);
    let tail = chunks.remainder();
    for c in chunks {
        for i in 0..LANES {
            acc[i] += exp(c[i] - shift);
        }
    }
    for (a, &v) in acc.iter_mut().zip(tail) {
        *a += exp(v - shift);
    }
    lane_sum(acc)
}

/// `Σ a[i]·b[i]` over the shorter length.
#[inline(always)]
fn dot_generic(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let mut acc = [0.0f32; LANES];
    let (ca, cb) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let (ta, tb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for i in 0..LANES {
            acc[i] += x[i] * y[i];
        }
    }
    for ((acc, &x), &y) in acc.iter_mut().zip(ta).zip(tb) {
        *acc += x * y;
    }
    lane_sum(acc)
}

/// `Σ a[i]·b[i]·c[i]` over the shortest length.
#[inline(always)]
fn dot3_generic(a: &[f32], b: &[f32], c: &[f32]) -> f32 {
    let n = a.len().min(b.len()).min(c.len());
    let (a, b, c) = (&a[..n], &b[..n], &c[..n]);
    let mut acc = [0.0f32; LANES];
    let (ca, cb, cc) = (
        a.chunks_exact(LANES),
        b.chunks_exact(LANES),
        c.chunks_exact(LANES),
    );
    let (ta, tb, tc) = (ca.remainder(), cb.remainder(), cc.remainder());
    for ((x, y), z) in ca.zip(cb).zip(cc) {
        for i in 0..LANES {
            acc[i] += x[i] * y[i] * z[i];
        }
    }
    for (((acc, &x), &y), &z) in acc.iter_mut().zip(ta).zip(tb).zip(tc) {
        *acc += x * y * z;
    }
    lane_sum(acc)
}

#[inline(always)]
fn softmax_row_generic(row: &mut [f32], visible: usize) {
    let (head, tail) = row.split_at_mut(visible.min(row.len()));
    let max = max_generic(head);
    let inv = 1.0 / exp_shifted_in_place(head, max);
    head.iter_mut().for_each(|v| *v *= inv);
    tail.fill(0.0);
}

#[inline(always)]
fn softmax_backward_row_generic(g: &mut [f32], y: &[f32], visible: usize) {
    let vis = visible.min(g.len()).min(y.len());
    let (head, tail) = g.split_at_mut(vis);
    let c = dot_generic(head, &y[..vis]);
    for (g, &p) in head.iter_mut().zip(&y[..vis]) {
        *g = p * (*g - c);
    }
    tail.fill(0.0);
}

#[inline(always)]
fn log_sum_exp_generic(row: &[f32]) -> f32 {
    let max = max_generic(row);
    max + exp_sum(row, max).ln()
}

#[inline(always)]
fn exp_minus_max_generic(row: &mut [f32]) -> (f32, f32) {
    let max = max_generic(row);
    (max, exp_shifted_in_place(row, max))
}

#[inline(always)]
fn exp_shifted_scaled_generic(out: &mut [f32], x: &[f32], shift: f32, scale: f32) {
    for (o, &v) in out.iter_mut().zip(x) {
        *o = exp(v - shift) * scale;
    }
}

#[inline(always)]
fn sum_of_squares_generic(x: &[f32]) -> f64 {
    // f32 lanes over blocks short enough to stay accurate, each block's sum added in f64.
    const BLOCK: usize = 1024;
    let mut total = 0.0f64;
    for block in x.chunks(BLOCK) {
        total += dot_generic(block, block) as f64;
    }
    total
}

/// Each primitive compiled twice: portable, and for AVX2+FMA, chosen at run time.
macro_rules! dispatched {
    ($( $(#[$doc:meta])* pub fn $name:ident($($arg:ident: $ty:ty),*) $(-> $ret:ty)? => $generic:ident; )*) => {
        $(
            $(#[$doc])*
            pub fn $name($($arg: $ty),*) $(-> $ret)? {
                #[cfg(target_arch = "x86_64")]
                if avx2_fma() {
                    #[target_feature(enable = "avx2,fma")]
                    unsafe fn avx2($($arg: $ty),*) $(-> $ret)? {
                        $generic($($arg),*)
                    }
                    // SAFETY: the CPU has AVX2 and FMA (checked just above); the function is
                    // safe code compiled with those features.
                    return unsafe { avx2($($arg),*) };
                }
                $generic($($arg),*)
            }
        )*
    };
}

dispatched! {
    /// Softmax of `row` in place over its first `visible` entries; the rest become 0.
    pub fn softmax_row(row: &mut [f32], visible: usize) => softmax_row_generic;
    /// The softmax backward of one row in place: `g = y · (g − Σ g·y)` over the first
    /// `visible` entries, 0 after them.
    pub fn softmax_backward_row(g: &mut [f32], y: &[f32], visible: usize)
        => softmax_backward_row_generic;
    /// `log Σ exp(row[i])`, shifted by the row's maximum.
    pub fn log_sum_exp(row: &[f32]) -> f32 => log_sum_exp_generic;
    /// `row[i] = exp(row[i] − max)` with `max` the row's maximum; returns `max` and the
    /// sum of the new entries (the softmax before its division, as an attention split over
    /// parts of the positions needs it to merge the parts).
    pub fn exp_minus_max(row: &mut [f32]) -> (f32, f32) => exp_minus_max_generic;
    /// `out[i] = exp(x[i] − shift) · scale`.
    pub fn exp_shifted_scaled(out: &mut [f32], x: &[f32], shift: f32, scale: f32)
        => exp_shifted_scaled_generic;
    /// `Σ a[i]·b[i]` over the shorter of the two.
    pub fn dot(a: &[f32], b: &[f32]) -> f32 => dot_generic;
    /// `Σ a[i]·b[i]·c[i]` over the shortest of the three.
    pub fn dot3(a: &[f32], b: &[f32], c: &[f32]) -> f32 => dot3_generic;
    /// `Σ x[i]²`, summed in f32 lanes over blocks of 1024 and in f64 across blocks.
    pub fn sum_of_squares(x: &[f32]) -> f64 => sum_of_squares_generic;
}

/// Whether the CPU has AVX2 and FMA (the row kernels of this module and of `vexp` need both).
#[cfg(target_arch = "x86_64")]
pub(crate) fn avx2_fma() -> bool {
    is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(n: usize, seed: f32) -> Vec<f32> {
        (0..n)
            .map(|i| (i as f32 * 0.61 + seed).sin() * 7.0)
            .collect()
    }

    #[test]
    fn softmax_row_matches_f64_softmax_and_zeroes_the_masked_tail() {
        for n in [1usize, 3, 15, 16, 17, 64, 255] {
            for vis in [1, n / 2 + 1, n] {
                let x = data(n, n as f32);
                let mut got = x.clone();
                softmax_row(&mut got, vis);
                let max = x[..vis]
                    .iter()
                    .copied()
                    .fold(f64::NEG_INFINITY, |m, v| m.max(v as f64));
                let sum: f64 = x[..vis].iter().map(|&v| (v as f64 - max).exp()).sum();
                for i in 0..n {
                    let want = if i < vis {
                        (x[i] as f64 - max).exp() / sum
                    } else {
                        0.0
                    };
                    assert!(
                        (got[i] as f64 - want).abs() <= 1e-6 * want.max(1e-30) + 1e-12,
                        "n {n} vis {vis} i {i}: {} vs {want}",
                        got[i]
                    );
                }
            }
        }
    }

    #[test]
    fn exp_minus_max_is_the_softmax_before_its_division() {
        for n in [1usize, 15, 16, 17, 100] {
            let x = data(n, 0.9);
            let mut e = x.clone();
            let (max, sum) = exp_minus_max(&mut e);
            let want_max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            assert_eq!(max, want_max);
            let mut p = x.clone();
            softmax_row(&mut p, n);
            let total: f64 = e.iter().map(|&v| v as f64).sum();
            assert!(
                (sum as f64 - total).abs() <= 1e-6 * total,
                "n {n}: sum {sum} vs {total}"
            );
            for i in 0..n {
                let want = (x[i] as f64 - max as f64).exp();
                assert!(
                    (e[i] as f64 - want).abs() <= 1e-6 * want + 1e-30,
                    "n {n} i {i}"
                );
                assert!(
                    (e[i] / sum - p[i]).abs() <= 1e-6,
                    "n {n} i {i}: the softmax"
                );
            }
        }
    }

    #[test]
    fn softmax_backward_row_matches_the_formula() {
        let n = 37;
        let mut y = data(n, 0.3);
        softmax_row(&mut y, n);
        let g0 = data(n, 1.7);
        for vis in [5, n] {
            let mut g = g0.clone();
            softmax_backward_row(&mut g, &y, vis);
            let c: f64 = (0..vis).map(|i| g0[i] as f64 * y[i] as f64).sum();
            for i in 0..n {
                let want = if i < vis {
                    y[i] as f64 * (g0[i] as f64 - c)
                } else {
                    0.0
                };
                assert!((g[i] as f64 - want).abs() < 1e-6, "{i}: {} vs {want}", g[i]);
            }
        }
    }

    #[test]
    fn reductions_match_f64_sums() {
        for n in [0usize, 1, 16, 33, 1000, 5000] {
            let (a, b) = (data(n, 0.1), data(n, 2.2));
            let want_dot: f64 = a.iter().zip(&b).map(|(&x, &y)| x as f64 * y as f64).sum();
            assert!((dot(&a, &b) as f64 - want_dot).abs() < 1e-4 * (1.0 + want_dot.abs()));
            let c = data(n, 3.3);
            let want_dot3: f64 = (0..n)
                .map(|i| a[i] as f64 * b[i] as f64 * c[i] as f64)
                .sum();
            assert!((dot3(&a, &b, &c) as f64 - want_dot3).abs() < 1e-4 * (1.0 + want_dot3.abs()));
            let want_sq: f64 = a.iter().map(|&x| x as f64 * x as f64).sum();
            assert!((sum_of_squares(&a) - want_sq).abs() < 1e-6 * (1.0 + want_sq));
            if n > 0 {
                let max = a
                    .iter()
                    .copied()
                    .fold(f64::NEG_INFINITY, |m, v| m.max(v as f64));
                let want_lse = max + a.iter().map(|&v| (v as f64 - max).exp()).sum::<f64>().ln();
                assert!((log_sum_exp(&a) as f64 - want_lse).abs() < 1e-5 * (1.0 + want_lse.abs()));
            }
        }
        let mut out = vec![0.0f32; 20];
        let x = data(20, 0.5);
        exp_shifted_scaled(&mut out, &x, 1.5, 0.25);
        for (o, &v) in out.iter().zip(&x) {
            let want = (((v - 1.5) as f64).exp() * 0.25) as f32;
            assert!((o - want).abs() <= 4.0 * f32::EPSILON * want.abs());
        }
    }

    #[test]
    fn the_avx2_build_gives_the_portable_bits() {
        let x = data(301, 0.9);
        let y = data(301, 4.0);
        let mut a = x.clone();
        let mut b = x.clone();
        softmax_row(&mut a, 250);
        softmax_row_generic(&mut b, 250);
        assert_eq!(a, b);
        assert_eq!(dot(&x, &y).to_bits(), dot_generic(&x, &y).to_bits());
        assert_eq!(
            dot3(&x, &y, &a).to_bits(),
            dot3_generic(&x, &y, &a).to_bits()
        );
        assert_eq!(log_sum_exp(&x).to_bits(), log_sum_exp_generic(&x).to_bits());
        assert_eq!(
            sum_of_squares(&x).to_bits(),
            sum_of_squares_generic(&x).to_bits()
        );
    }

    #[test]
    fn nan_is_ignored_by_the_maximum_and_empty_rows_are_harmless() {
        assert_eq!(max_generic(&[1.0, f32::NAN, 3.0]), 3.0);
        assert_eq!(max_generic(&[]), f32::NEG_INFINITY);
        let mut empty: [f32; 0] = [];
        softmax_row(&mut empty, 0);
        let mut row = [1.0f32, 2.0];
        softmax_row(&mut row, 0);
        assert_eq!(row, [0.0, 0.0]);
    }
}
