//! A safe, single-threaded f32 matrix product over strided slices (the `gemm` crate's
//! kernels), for callers that multiply many small matrices in parallel themselves.

use std::mem::MaybeUninit;

/// A matrix view: `data[i * row_stride + j * col_stride]` is element `(i, j)` of a
/// `rows × cols` matrix.
#[derive(Debug, Clone, Copy)]
pub struct View<'a> {
    /// The elements.
    pub data: &'a [f32],
    /// Rows.
    pub rows: usize,
    /// Columns.
    pub cols: usize,
    /// Distance between rows.
    pub row_stride: usize,
    /// Distance between columns.
    pub col_stride: usize,
}

impl<'a> View<'a> {
    /// A row-major `rows × cols` matrix whose rows start `row_stride` apart.
    pub fn row_major(data: &'a [f32], rows: usize, cols: usize, row_stride: usize) -> Self {
        View {
            data,
            rows,
            cols,
            row_stride,
            col_stride: 1,
        }
    }

    /// The transpose of row-major `cols × rows` data whose rows start `row_stride` apart, as a
    /// `rows × cols` matrix.
    pub fn transpose_of(data: &'a [f32], rows: usize, cols: usize, row_stride: usize) -> Self {
        View {
            data,
            rows,
            cols,
            row_stride: 1,
            col_stride: row_stride,
        }
    }

    /// Whether every element lies inside `len` floats.
    fn fits(rows: usize, cols: usize, row_stride: usize, col_stride: usize, len: usize) -> bool {
        rows == 0 || cols == 0 || (rows - 1) * row_stride + (cols - 1) * col_stride < len
    }
}

/// `out[i * out_stride + j] = alpha · Σ_k a(i, k) · b(k, j)` for an `a.rows × b.cols` result,
/// overwriting `out`.
///
/// # Panics
/// If the shapes disagree or a view or the output reaches past its slice (a programming
/// error of the caller, not a data error).
pub fn sgemm(a: View<'_>, b: View<'_>, alpha: f32, out: &mut [f32], out_stride: usize) {
    // SAFETY: `out` is `out.len()` initialised floats that nothing else borrows.
    unsafe { product(a, b, alpha, out.as_mut_ptr(), out.len(), out_stride, false) }
}

/// `out[i * out_stride + j] += alpha · Σ_k a(i, k) · b(k, j)`: as [`sgemm`], but adding to the
/// output's contents.
///
/// # Panics
/// As [`sgemm`].
pub fn sgemm_add(a: View<'_>, b: View<'_>, alpha: f32, out: &mut [f32], out_stride: usize) {
    // SAFETY: as in `sgemm`.
    unsafe { product(a, b, alpha, out.as_mut_ptr(), out.len(), out_stride, true) }
}

/// As [`sgemm`], into floats that need not be initialised (a buffer allocated without
/// zeroing): every element `out[i * out_stride + j]` (`i < a.rows`, `j < b.cols`) is written
/// and none is read, so those elements are initialised afterwards.
///
/// # Panics
/// As [`sgemm`].
pub fn sgemm_uninit(
    a: View<'_>,
    b: View<'_>,
    alpha: f32,
    out: &mut [MaybeUninit<f32>],
    out_stride: usize,
) {
    // SAFETY: `out` is `out.len()` floats that nothing else borrows; without `add` nothing is
    // read from them.
    unsafe {
        product(
            a,
            b,
            alpha,
            out.as_mut_ptr().cast::<f32>(),
            out.len(),
            out_stride,
            false,
        )
    }
}

/// The product of [`sgemm`] (`add`: false) or [`sgemm_add`] (true) into the `out_len` floats
/// at `out`.
///
/// # Safety
/// `out` must be valid for writes of `out_len` floats that nothing else accesses during the
/// call, and, with `add`, for reads of them as initialised floats.
unsafe fn product(
    a: View<'_>,
    b: View<'_>,
    alpha: f32,
    out: *mut f32,
    out_len: usize,
    out_stride: usize,
    add: bool,
) {
    let (m, k, n) = (a.rows, a.cols, b.cols);
    assert_eq!(b.rows, k, "inner dimensions");
    assert!(
        View::fits(m, k, a.row_stride, a.col_stride, a.data.len())
            && View::fits(k, n, b.row_stride, b.col_stride, b.data.len())
            && View::fits(m, n, out_stride, 1, out_len),
        "matrix view out of bounds"
    );
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !add {
            for i in 0..m {
                for j in 0..n {
                    // SAFETY: element i·out_stride + j is inside the output (asserted above),
                    // which the caller lets us write.
                    unsafe { out.add(i * out_stride + j).write(0.0) };
                }
            }
        }
        return;
    }
    // SAFETY: every element the product reads or writes lies inside its slice or the output
    // (asserted above); the output is the caller's to write (and, with `add`, to read) and
    // does not alias the inputs (shared borrows here, exclusive ones there); without `add`
    // the output's old contents are never read.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            out,
            1,
            out_stride as isize,
            add,
            a.data.as_ptr(),
            a.col_stride as isize,
            a.row_stride as isize,
            b.data.as_ptr(),
            b.col_stride as isize,
            b.row_stride as isize,
            if add { 1.0f32 } else { 0.0f32 },
            alpha,
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strided_product_matches_a_plain_loop() {
        let (m, k, n) = (5, 7, 3);
        let a: Vec<f32> = (0..m * k).map(|i| (i as f32 * 0.37).sin()).collect();
        // b stored transposed: b(kk, j) = bt[j * k + kk].
        let bt: Vec<f32> = (0..n * k).map(|i| (i as f32 * 0.11).cos()).collect();
        let mut out = vec![f32::NAN; m * (n + 2)];
        sgemm(
            View {
                data: &a,
                rows: m,
                cols: k,
                row_stride: k,
                col_stride: 1,
            },
            View {
                data: &bt,
                rows: k,
                cols: n,
                row_stride: 1,
                col_stride: k,
            },
            0.5,
            &mut out,
            n + 2,
        );
        for i in 0..m {
            for j in 0..n {
                let want: f32 = (0..k).map(|kk| a[i * k + kk] * bt[j * k + kk]).sum::<f32>() * 0.5;
                assert!((out[i * (n + 2) + j] - want).abs() < 1e-5);
            }
        }
    }

    #[test]
    fn accumulating_product_adds_to_the_output() {
        let a = [1.0f32, 2.0, 3.0, 4.0];
        let b = [0.5f32, -1.0, 2.0, 0.25];
        fn square(data: &[f32]) -> View<'_> {
            View {
                data,
                rows: 2,
                cols: 2,
                row_stride: 2,
                col_stride: 1,
            }
        }
        let mut out = [10.0f32, 20.0, 30.0, 40.0];
        sgemm_add(square(&a), square(&b), 2.0, &mut out, 2);
        // a·b = [[4.5, -0.5], [9.5, -2]].
        assert_eq!(out, [19.0, 19.0, 49.0, 36.0]);
    }

    #[test]
    fn product_into_unfilled_floats_writes_every_element() {
        let (m, k, n, stride) = (4, 5, 3, 3);
        let a: Vec<f32> = (0..m * k).map(|i| (i as f32 * 0.3).sin()).collect();
        let b: Vec<f32> = (0..k * n).map(|i| (i as f32 * 0.7).cos()).collect();
        let (av, bv) = (View::row_major(&a, m, k, k), View::row_major(&b, k, n, n));
        let mut want = vec![0f32; m * stride];
        sgemm(av, bv, 1.5, &mut want, stride);
        let mut out = vec![MaybeUninit::<f32>::uninit(); m * stride];
        sgemm_uninit(av, bv, 1.5, &mut out, stride);
        // SAFETY: the stride equals the width, so the product wrote every element.
        let got: Vec<f32> = out.iter().map(|v| unsafe { v.assume_init() }).collect();
        assert_eq!(got, want);
        // An empty inner dimension writes zeros.
        let mut out = vec![MaybeUninit::<f32>::uninit(); 6];
        sgemm_uninit(
            View::row_major(&[], 2, 0, 0),
            View::row_major(&[], 0, 3, 3),
            1.0,
            &mut out,
            3,
        );
        // SAFETY: as above.
        assert!(out.iter().all(|v| unsafe { v.assume_init() } == 0.0));
    }

    #[test]
    #[should_panic(expected = "out of bounds")]
    fn views_past_their_slice_are_refused() {
        let a = [1f32; 4];
        let mut out = [0f32; 4];
        let square = View {
            data: &a,
            rows: 2,
            cols: 2,
            row_stride: 2,
            col_stride: 1,
        };
        // A 2x3 right-hand side with columns 2 apart reaches element 5 of 4.
        let tall = View {
            cols: 3,
            row_stride: 1,
            col_stride: 2,
            ..square
        };
        sgemm(square, tall, 1.0, &mut out, 2);
    }
}
