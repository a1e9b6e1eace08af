//! Register-blocked products of f16 and f32 weight rows with several activation rows
//! (AVX-512): decode steps of many sequences and small batches.
//!
//! The fused kernels take one weight row at a time and multiply it with up to eight
//! activation rows: each 16 weights decoded feed as many FMAs as there are activation rows,
//! but every FMA needs an activation vector loaded for it, so they run at about half the
//! FMA rate. Here one kernel call takes [`NR`] weight rows and up to [`MR`] activation rows
//! and keeps `NR · MR` accumulators (16 lanes each) in registers: per 16 columns it decodes
//! `NR` weight vectors and loads `MR` activation vectors for `NR · MR` FMAs. Both operands
//! are read along their rows (the `[out, in]` weight layout as stored, no packing); each
//! accumulator is summed across its lanes once at the end of the row.
//!
//! A task's activation rows go in blocks of [`MR`] (a block, `MR` rows of `cols` f32, stays
//! in the first-level cache) over all of the task's weight rows (which stay in the
//! second-level cache after the first block has read them from memory). The result equals
//! the dequantise-then-multiply product up to f32 summation order.

/// Weight rows per kernel call.
pub(crate) const NR: usize = 3;

/// Most activation rows per kernel call.
pub(crate) const MR: usize = 8;

/// Weight rows per task: a multiple of [`NR`], about 56 KiB of f16 rows of 576 columns.
pub(crate) const TASK_ROWS: usize = 16 * NR;

#[cfg(target_arch = "x86_64")]
pub(crate) use x86::rows_products;

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::{MR, NR};
    use crate::quant::QData;

    /// Weights decoded 16 at a time into f32 lanes.
    trait Weight: Copy {
        /// # Safety
        /// `p` points at 16 readable weights.
        unsafe fn load16(p: *const Self) -> __m512;
        /// One weight as f32.
        fn value(self) -> f32;
    }

    impl Weight for f32 {
        #[inline(always)]
        unsafe fn load16(p: *const f32) -> __m512 {
            // SAFETY: the caller's guarantee; the CPU runs AVX-512 F (every caller is
            // compiled for it).
            unsafe { _mm512_loadu_ps(p) }
        }
        fn value(self) -> f32 {
            self
        }
    }

    impl Weight for u16 {
        #[inline(always)]
        unsafe fn load16(p: *const u16) -> __m512 {
            // SAFETY: as above (16 f16 values are 32 bytes).
            unsafe { _mm512_cvtph_ps(_mm256_loadu_si256(p as *const __m256i)) }
        }
        fn value(self) -> f32 {
            half::f16::from_bits(self).to_f32()
        }
    }

    /// The dot products of activation rows `x + i·cols` (`i < M`) with the weight rows `w[j]`
    /// (`j < NR`) over the whole vectors of `cols`, as `[i][j]`, and the columns covered.
    ///
    /// # Safety
    /// The CPU supports AVX-512 F and F16C; each `w[j]` points at `cols` weights and `x` at
    /// `M` rows of `cols` activations.
    #[target_feature(enable = "avx512f,avx512bw,avx2,fma,f16c")]
    unsafe fn block<T: Weight, const M: usize>(
        w: [*const T; NR],
        x: *const f32,
        cols: usize,
        prefetch: bool,
    ) -> ([[f32; NR]; M], usize) {
        let mut acc = [[_mm512_setzero_ps(); NR]; M];
        let mut c = 0;
        // SAFETY (whole body): every access is below `cols` in a weight row or an activation
        // row (the caller's guarantee).
        unsafe {
            while c + 16 <= cols {
                if prefetch {
                    for p in w {
                        crate::quant::x86::prefetch_ahead(
                            p.add(c) as *const u8,
                            16 * size_of::<T>(),
                        );
                    }
                }
                let wv: [__m512; NR] = std::array::from_fn(|j| T::load16(w[j].add(c)));
                for (i, a) in acc.iter_mut().enumerate() {
                    let xv = _mm512_loadu_ps(x.add(i * cols + c));
                    for (aj, wj) in a.iter_mut().zip(&wv) {
                        *aj = _mm512_fmadd_ps(*wj, xv, *aj);
                    }
                }
                c += 16;
            }
        }
        (acc.map(|a| a.map(|v| _mm512_reduce_add_ps(v))), c)
    }

    /// [`block`] for `M` activation rows from `i0`, weight rows `rb .. rb + NR` (those past
    /// `r1` read row `r1 - 1` again and are not written), element `(i, r)` written at
    /// `out + i·ld + r`, the columns past the whole vectors added in scalar code.
    ///
    /// # Safety
    /// As [`rows_products`], with `i0 + M <= m` and `rb < r1`.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f,avx512bw,avx2,fma,f16c")]
    unsafe fn block_out<T: Weight, const M: usize>(
        w: &[T],
        cols: usize,
        x: &[f32],
        i0: usize,
        (rb, r1): (usize, usize),
        out: *mut f32,
        ld: usize,
        prefetch: bool,
    ) {
        let rows: [usize; NR] = std::array::from_fn(|j| (rb + j).min(r1 - 1));
        let xs = &x[i0 * cols..(i0 + M) * cols];
        // SAFETY: every row in `rows` is below r1 <= the matrix's rows, so `cols` weights
        // from its start are in `w`; `xs` holds M rows of `cols`.
        let (mut d, done) = unsafe {
            block::<T, M>(
                rows.map(|r| w.as_ptr().add(r * cols)),
                xs.as_ptr(),
                cols,
                prefetch,
            )
        };
        if done < cols {
            for (i, di) in d.iter_mut().enumerate() {
                let xi = &xs[i * cols..(i + 1) * cols];
                for (dj, &r) in di.iter_mut().zip(&rows) {
                    let wr = &w[r * cols..(r + 1) * cols];
                    *dj += (done..cols).map(|c| xi[c] * wr[c].value()).sum::<f32>();
                }
            }
        }
        for (i, di) in d.iter().enumerate() {
            for (j, &v) in di.iter().enumerate().take(r1 - rb) {
                // SAFETY: an in-bounds element of the caller's share (i0 + i < m,
                // rb + j < r1).
                unsafe { *out.add((i0 + i) * ld + rb + j) = v };
            }
        }
    }

    /// Products of the `m` activation rows of `x` (`[m, cols]`) with weight rows `r0 .. r1`
    /// of `data` (f16 or f32 rows of `cols`), element `(i, r)` written at `out + i·ld + r`.
    /// Returns false (and writes nothing) for other weight formats.
    ///
    /// # Safety
    /// The CPU supports AVX-512 F/BW and F16C; `data` holds at least `r1` rows of `cols`,
    /// `x` at least `m` rows; the elements `i·ld + r` (`i < m`, `r0 <= r < r1`) from `out`
    /// are in bounds and written by nobody else meanwhile.
    #[allow(clippy::too_many_arguments)]
    pub(crate) unsafe fn rows_products(
        data: &QData,
        cols: usize,
        x: &[f32],
        m: usize,
        out: *mut f32,
        ld: usize,
        (r0, r1): (usize, usize),
    ) -> bool {
        fn run<T: Weight>(
            w: &[T],
            (cols, x, m, out, ld): (usize, &[f32], usize, *mut f32, usize),
            (r0, r1): (usize, usize),
        ) {
            for i0 in (0..m).step_by(MR) {
                // The first block of activation rows reads the weights from memory: it asks
                // for them ahead; the later blocks find them in cache.
                let prefetch = i0 == 0;
                for rb in (r0..r1).step_by(NR) {
                    macro_rules! go {
                        ($($g:literal)*) => {
                            match (m - i0).min(MR) {
                                // SAFETY: the caller's guarantees (the CPU, the bounds of
                                // `w`, `x` and the output), passed on; i0 + g <= m, rb < r1.
                                $($g => unsafe {
                                    block_out::<T, $g>(w, cols, x, i0, (rb, r1), out, ld, prefetch)
                                },)*
                                _ => unreachable!("1 to MR activation rows"),
                            }
                        };
                    }
                    go!(1 2 3 4 5 6 7 8);
                }
            }
        }
        match data {
            QData::F16(w) => run::<u16>(w, (cols, x, m, out, ld), (r0, r1)),
            QData::F32(w) => run::<f32>(w, (cols, x, m, out, ld), (r0, r1)),
            _ => return false,
        }
        true
    }
}
