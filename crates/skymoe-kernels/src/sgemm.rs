//! A safe, single-threaded f32 matrix product over strided slices (the `gemm` crate's
//! kernels), for callers that multiply many small matrices in parallel themselves.

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
    product(a, b, alpha, out, out_stride, false);
}

/// `out[i * out_stride + j] += alpha · Σ_k a(i, k) · b(k, j)`: as [`sgemm`], but adding to the
/// output's contents.
///
/// # Panics
/// As [`sgemm`].
pub fn sgemm_add(a: View<'_>, b: View<'_>, alpha: f32, out: &mut [f32], out_stride: usize) {
    product(a, b, alpha, out, out_stride, true);
}

/// The product of [`sgemm`] (`add`: false) or [`sgemm_add`] (true).
fn product(a: View<'_>, b: View<'_>, alpha: f32, out: &mut [f32], out_stride: usize, add: bool) {
    let (m, k, n) = (a.rows, a.cols, b.cols);
    assert_eq!(b.rows, k, "inner dimensions");
    assert!(
        View::fits(m, k, a.row_stride, a.col_stride, a.data.len())
            && View::fits(k, n, b.row_stride, b.col_stride, b.data.len())
            && View::fits(m, n, out_stride, 1, out.len()),
        "matrix view out of bounds"
    );
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !add {
            for i in 0..m {
                out[i * out_stride..i * out_stride + n].fill(0.0);
            }
        }
        return;
    }
    // SAFETY: every element the product reads or writes lies inside its slice (asserted
    // above), the output does not alias the inputs (a `&mut` borrow); without `add` the
    // output's old contents are never read, with it they are read inside the same slice.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            out.as_mut_ptr(),
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
