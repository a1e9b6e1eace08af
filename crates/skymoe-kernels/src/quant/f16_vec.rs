//! Vector operations between f32 activations and f16 values (an f16 KV cache's keys and
//! values), converting on the fly (F16C where the CPU has it).

use half::f16;
use half::slice::HalfFloatSliceExt;

use super::kernels::Isa;

/// `Σ x[i]·w[i]`.
///
/// # Panics
/// If the lengths differ.
pub fn dot_f16(x: &[f32], w: &[f16]) -> f32 {
    assert_eq!(x.len(), w.len(), "dot_f16 lengths");
    let bits = w.reinterpret_cast();
    let (mut sum, done) = match Isa::detect() {
        #[cfg(target_arch = "x86_64")]
        isa @ (Isa::Avx2 | Isa::Avx512) => {
            // SAFETY: `detect` returns only supported instruction sets; both slices hold
            // `x.len()` elements.
            unsafe { super::x86::dot_f16(isa, bits.as_ptr(), x.as_ptr(), x.len()) }
        }
        _ => (0.0, 0),
    };
    for (a, b) in x[done..].iter().zip(&w[done..]) {
        sum += a * b.to_f32();
    }
    sum
}

/// `y[i] += a·w[i]`.
///
/// # Panics
/// If the lengths differ.
pub fn axpy_f16(a: f32, w: &[f16], y: &mut [f32]) {
    assert_eq!(w.len(), y.len(), "axpy_f16 lengths");
    let bits = w.reinterpret_cast();
    let done = match Isa::detect() {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 | Isa::Avx512 => {
            // SAFETY: `detect` returns only supported instruction sets (both include AVX2,
            // FMA and F16C); both slices hold `y.len()` elements.
            unsafe { super::x86::axpy_f16(a, bits.as_ptr(), y.as_mut_ptr(), y.len()) }
        }
        _ => 0,
    };
    for (v, b) in y[done..].iter_mut().zip(&w[done..]) {
        *v += a * b.to_f32();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn f16_dot_and_axpy_equal_converting_first() {
        for n in [1usize, 7, 8, 31, 64, 100, 257] {
            let x: Vec<f32> = (0..n).map(|i| ((i * 37) % 19) as f32 / 7.0 - 1.3).collect();
            let w: Vec<f16> = (0..n)
                .map(|i| f16::from_f32(((i * 11) % 23) as f32 / 5.0 - 2.1))
                .collect();
            let want: f64 = x.iter().zip(&w).map(|(a, b)| *a as f64 * b.to_f64()).sum();
            let got = dot_f16(&x, &w) as f64;
            assert!(
                (got - want).abs() <= 1e-5 * (1.0 + want.abs()),
                "n {n}: {got} vs {want}"
            );
            let mut y = x.clone();
            axpy_f16(0.75, &w, &mut y);
            for i in 0..n {
                // One fused multiply-add per element: the same rounding as mul_add.
                let want = 0.75f32.mul_add(w[i].to_f32(), x[i]);
                assert!(
                    (y[i] - want).abs() <= f32::EPSILON * want.abs().max(1.0),
                    "n {n} i {i}"
                );
            }
        }
    }
}
