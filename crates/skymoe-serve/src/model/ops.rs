//! Element-wise operations on f32 rows, written so the compiler vectorises them.

/// Dot product with eight independent partial sums (vectorisable).
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let ca = a.chunks_exact(8);
    let cb = b.chunks_exact(8);
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    let tail: f32 = ra.iter().zip(rb).map(|(x, y)| x * y).sum();
    acc.iter().sum::<f32>() + tail
}

/// `y += a · x`.
pub fn axpy(a: f32, x: &[f32], y: &mut [f32]) {
    for (yi, xi) in y.iter_mut().zip(x) {
        *yi += a * xi;
    }
}

/// RMSNorm of each row of `x` (rows of `weight.len()`), as Hugging Face computes it in f32:
/// `x · rsqrt(mean(x²) + eps) · weight`.
pub fn rms_norm(x: &[f32], weight: &[f32], eps: f32) -> Vec<f32> {
    let h = weight.len();
    let mut out = vec![0f32; x.len()];
    for (row, o) in x.chunks_exact(h).zip(out.chunks_exact_mut(h)) {
        let ms = dot(row, row) / h as f32;
        let r = 1.0 / (ms + eps).sqrt();
        for ((oi, xi), wi) in o.iter_mut().zip(row).zip(weight) {
            *oi = wi * (xi * r);
        }
    }
    out
}

/// SiLU(gate) · up for rows laid out `[gate (f) | up (f)]`; returns rows of `f`.
pub fn silu_mul_rows(gate_up: &[f32], f: usize) -> Vec<f32> {
    let rows = gate_up.len() / (2 * f).max(1);
    let mut out = vec![0f32; rows * f];
    if f > 0 {
        // The SwiGLU rows training uses too (vectorised exponential, AVX2+FMA where present).
        skymoe_kernels::silu_mul_rows(&gate_up[..rows * 2 * f], &mut out, f);
    }
    out
}

/// In-place softmax of a row.
pub fn softmax(v: &mut [f32]) {
    // The row kernel training uses too (16 lanes, AVX2+FMA where the CPU has them).
    skymoe_kernels::rows::softmax_row(v, v.len());
}

/// Add `b` to every row of `x`.
pub fn add_bias(x: &mut [f32], b: &[f32]) {
    for row in x.chunks_exact_mut(b.len()) {
        for (xi, bi) in row.iter_mut().zip(b) {
            *xi += bi;
        }
    }
}

/// `x += y` element-wise.
pub fn add_in_place(x: &mut [f32], y: &[f32]) {
    for (a, b) in x.iter_mut().zip(y) {
        *a += b;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dot_matches_a_plain_sum() {
        let a: Vec<f32> = (0..37).map(|i| i as f32 * 0.5 - 3.0).collect();
        let b: Vec<f32> = (0..37).map(|i| (i as f32).sin()).collect();
        let want: f64 = a.iter().zip(&b).map(|(x, y)| *x as f64 * *y as f64).sum();
        assert!((dot(&a, &b) as f64 - want).abs() < 1e-4);
    }

    #[test]
    fn softmax_sums_to_one_and_keeps_order() {
        let mut v = vec![1001.0, 1003.0, 998.0, 1010.0];
        softmax(&mut v);
        assert!((v.iter().sum::<f32>() - 1.0).abs() < 1e-6);
        assert!(v[3] > 0.99 && v[1] > v[0] && v[0] > v[2] && v[2] > 0.0);
    }
}
