//! The AdamW update of one parameter buffer in place (PyTorch's rule, decoupled weight decay),
//! compiled for AVX-512 and AVX2 as well as portably and chosen at run time.
//!
//! Every build performs the same IEEE operations on each element in the same order (products,
//! sums, quotients and a square root, none fused), so all give the same bits; the wide builds
//! only do sixteen or eight elements per instruction, which matters because the update's
//! divisions and square root make it slower than the memory it streams.

/// The scalars of one update.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWStep {
    /// Learning rate.
    pub lr: f32,
    /// First-moment decay.
    pub beta1: f32,
    /// Second-moment decay.
    pub beta2: f32,
    /// Added to the square root of the second moment.
    pub eps: f32,
    /// Weight decay (0 for parameters without it).
    pub decay: f32,
    /// `1 − beta1^t`.
    pub bias1: f32,
    /// `1 − beta2^t`.
    pub bias2: f32,
    /// Factor on every gradient (clipping and accumulation averaging).
    pub grad_scale: f32,
}

#[inline(always)]
fn update_generic(s: &AdamWStep, p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32]) {
    for (((p, &g), m), v) in p.iter_mut().zip(g).zip(m.iter_mut()).zip(v.iter_mut()) {
        let g = g * s.grad_scale;
        *m = s.beta1 * *m + (1.0 - s.beta1) * g;
        *v = s.beta2 * *v + (1.0 - s.beta2) * g * g;
        let mhat = *m / s.bias1;
        let vhat = *v / s.bias2;
        *p -= s.lr * (mhat / (vhat.sqrt() + s.eps) + s.decay * *p);
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn update_avx512(s: &AdamWStep, p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32]) {
    update_generic(s, p, g, m, v)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn update_avx2(s: &AdamWStep, p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32]) {
    update_generic(s, p, g, m, v)
}

/// One AdamW step over the parameters `p` with gradients `g` and moments `m`, `v`, all in
/// place: `m ← β₁m + (1−β₁)ĝ`, `v ← β₂v + (1−β₂)ĝ²`, `p ← p − lr·(m̂/(√v̂ + ε) + decay·p)` with
/// `ĝ = grad_scale·g`, `m̂ = m/bias1`, `v̂ = v/bias2`. Covers the shortest of the four slices.
pub fn adamw_update(s: &AdamWStep, p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        if is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU has AVX-512F (checked just above); the function is safe code
            // compiled with that feature.
            return unsafe { update_avx512(s, p, g, m, v) };
        }
        if is_x86_feature_detected!("avx2") {
            // SAFETY: as above, for AVX2.
            return unsafe { update_avx2(s, p, g, m, v) };
        }
    }
    update_generic(s, p, g, m, v)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An update of (parameters, first moments, second moments) in place.
    type Update<'a> = &'a dyn Fn(&mut [f32], &mut [f32], &mut [f32]);

    fn data(n: usize, seed: f32, scale: f32) -> Vec<f32> {
        (0..n)
            .map(|i| (i as f32 * 0.37 + seed).sin() * scale)
            .collect()
    }

    #[test]
    fn every_build_gives_the_portable_bits_and_the_formula() {
        let n = 1000 + 13;
        let s = AdamWStep {
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            decay: 0.1,
            bias1: 0.19,
            bias2: 0.0975,
            grad_scale: 0.7,
        };
        let g = data(n, 0.3, 0.05);
        let start = (data(n, 1.1, 1.0), data(n, 2.3, 0.01), data(n, 0.7, 1e-4));
        let run = |f: Update<'_>| {
            let (mut p, mut m, mut v) = start.clone();
            let v0: Vec<f32> = v.iter().map(|x| x.abs()).collect();
            v.copy_from_slice(&v0);
            f(&mut p, &mut m, &mut v);
            (p, m, v)
        };
        let plain = run(&|p, m, v| update_generic(&s, p, g.as_slice(), m, v));
        let dispatched = run(&|p, m, v| adamw_update(&s, p, g.as_slice(), m, v));
        assert_eq!(plain, dispatched);
        #[cfg(target_arch = "x86_64")]
        {
            if is_x86_feature_detected!("avx2") {
                // SAFETY: the CPU has AVX2.
                let avx2 = run(&|p, m, v| unsafe { update_avx2(&s, p, g.as_slice(), m, v) });
                assert_eq!(plain, avx2);
            }
        }
        // The formula, element by element in f64.
        let (p0, m0, v0) = run(&|_, _, _| {});
        for i in 0..n {
            let gi = g[i] as f64 * s.grad_scale as f64;
            let m = 0.9 * m0[i] as f64 + 0.1 * gi;
            let v = 0.95 * v0[i] as f64 + 0.05 * gi * gi;
            let (mh, vh) = (m / s.bias1 as f64, v / s.bias2 as f64);
            let p = p0[i] as f64 - 1e-3 * (mh / (vh.sqrt() + 1e-8) + 0.1 * p0[i] as f64);
            assert!((plain.0[i] as f64 - p).abs() < 1e-6, "{i}");
            assert!((plain.1[i] as f64 - m).abs() < 1e-7 && (plain.2[i] as f64 - v).abs() < 1e-9);
        }
    }
}
