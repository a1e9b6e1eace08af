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

/// The rows `j < n` of `w` laid `stride` apart, each `len` long, checked to be inside `w`.
fn check_rows(w: &[f16], stride: usize, n: usize, len: usize) {
    if n > 0 {
        assert!(
            len <= stride || n == 1,
            "rows of {len} overlap at a stride of {stride}"
        );
        assert!(
            (n - 1) * stride + len <= w.len(),
            "{n} rows of {len} at a stride of {stride} exceed {} values",
            w.len()
        );
    }
}

/// `out[j] = Σ_i x[i]·w[j·stride + i]` for every `j < out.len()`: the dot products of `x` with
/// rows of `w` laid `stride` apart (one kv head's keys of consecutive cached positions), in
/// one call.
///
/// # Panics
/// If the rows do not fit in `w`.
pub fn dot_f16_rows(x: &[f32], w: &[f16], stride: usize, out: &mut [f32]) {
    let len = x.len();
    check_rows(w, stride, out.len(), len);
    #[cfg(target_arch = "x86_64")]
    if matches!(Isa::detect(), Isa::Avx2 | Isa::Avx512) {
        // SAFETY: `detect` returns only supported instruction sets (both include AVX2, FMA
        // and F16C); the rows are inside `w` (checked above), `x` holds `len` values and
        // `out` `out.len()`.
        unsafe {
            super::x86::dot_f16_rows(
                w.reinterpret_cast().as_ptr(),
                stride,
                x.as_ptr(),
                len,
                out.as_mut_ptr(),
                out.len(),
            )
        };
        return;
    }
    for (j, o) in out.iter_mut().enumerate() {
        let row = &w[j * stride..j * stride + len];
        *o = x.iter().zip(row).map(|(a, b)| a * b.to_f32()).sum();
    }
}

/// `y[i] += Σ_j a[j]·w[j·stride + i]` for `j < a.len()`, the rows added in order with the
/// bits of [`axpy_f16`] called row after row: the probability-weighted sum of one kv head's
/// values of consecutive cached positions, in one call.
///
/// # Panics
/// If the rows do not fit in `w`.
pub fn axpy_f16_rows(a: &[f32], w: &[f16], stride: usize, y: &mut [f32]) {
    let len = y.len();
    check_rows(w, stride, a.len(), len);
    #[cfg(target_arch = "x86_64")]
    if matches!(Isa::detect(), Isa::Avx2 | Isa::Avx512) {
        // SAFETY: as in `dot_f16_rows`: the instruction set is supported and the rows, `a`
        // and `y` are in bounds.
        unsafe {
            super::x86::axpy_f16_rows(
                a.as_ptr(),
                a.len(),
                w.reinterpret_cast().as_ptr(),
                stride,
                y.as_mut_ptr(),
                len,
            )
        };
        return;
    }
    for (j, &aj) in a.iter().enumerate() {
        let row = &w[j * stride..j * stride + len];
        for (v, b) in y.iter_mut().zip(row) {
            *v += aj * b.to_f32();
        }
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

    #[test]
    fn strided_rows_equal_one_row_at_a_time() {
        for (len, stride, n) in [
            (64, 192, 16),
            (64, 64, 5),
            (128, 130, 7),
            (13, 20, 3),
            (8, 8, 1),
            (64, 192, 0),
        ] {
            let w: Vec<f16> = (0..(n.max(1) - 1) * stride + len)
                .map(|i| f16::from_f32(((i * 11) % 23) as f32 / 5.0 - 2.1))
                .collect();
            let x: Vec<f32> = (0..len)
                .map(|i| ((i * 37) % 19) as f32 / 7.0 - 1.3)
                .collect();
            let mut got = vec![f32::NAN; n];
            dot_f16_rows(&x, &w, stride, &mut got);
            for (j, g) in got.iter().enumerate() {
                let row = &w[j * stride..j * stride + len];
                let want: f64 = x.iter().zip(row).map(|(a, b)| *a as f64 * b.to_f64()).sum();
                assert!(
                    (*g as f64 - want).abs() <= 1e-5 * (1.0 + want.abs()),
                    "len {len} row {j}: {g} vs {want}"
                );
            }
            let a: Vec<f32> = (0..n).map(|j| 0.1 + j as f32 / 9.0).collect();
            let mut y: Vec<f32> = (0..len).map(|i| i as f32 / 3.0 - 4.0).collect();
            let mut want = y.clone();
            for (j, &aj) in a.iter().enumerate() {
                axpy_f16(aj, &w[j * stride..j * stride + len], &mut want);
            }
            axpy_f16_rows(&a, &w, stride, &mut y);
            assert_eq!(y, want, "len {len} stride {stride} rows {n}: the same bits");
        }
    }

    #[test]
    #[should_panic(expected = "exceed")]
    fn rows_past_the_end_are_refused() {
        let w = vec![f16::ZERO; 100];
        dot_f16_rows(&[0.0; 64], &w, 64, &mut [0.0; 2]);
    }
}
