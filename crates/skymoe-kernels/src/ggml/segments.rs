//! Products with a stack of ggml matrices: the row segments of one projection stored as
//! separate tensors (q, k and v; an expert's gate and up), each in its own type. The
//! segments' tasks run as one set over the pool, as the parts of a stacked skymoe matrix do:
//! a decode step synchronises the threads once per projection, not once per segment.

use rayon::prelude::*;

use super::{
    blocks, effective, int_isa, use_int8, GgmlMatrix, Isa, OutPtr, Q8Activations,
    FUSED_MAX_CHUNKED_ROWS, Q8_TASK_ROWS,
};
use crate::quant::bf16_tiles::{self, Bf16Pairs};

/// How one segment's product runs.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Path {
    /// Integer products with the shared 8-bit activations.
    Int8,
    /// The bf16 tiles with the shared bf16 activation pairs.
    Bf16Tiles,
    /// f32 activations (fused kernels for few rows, dequantised tiles and a GEMM for many).
    F32,
}

/// `out[i·ld + col0(s) + r] = (x · Wₛᵀ)[i, r]` for the row segments `segments` of a stacked
/// matrix (all `cols` wide; segment `s` writes columns `col0(s) .. col0(s) + rows(s)`, the
/// segments one after the other from column 0), each with the activations
/// [`super::activations`] chooses for its type; the activation rows are quantised once for
/// all the segments that use 8-bit ones.
///
/// # Panics
/// When the segments' widths differ from `x.len() / m`, their rows exceed `ld`, or `out` is
/// shorter than `m·ld`.
pub fn matmul_segments_with(
    isa: Isa,
    segments: &[GgmlMatrix],
    x: &[f32],
    m: usize,
    out: &mut [f32],
    ld: usize,
) {
    matmul_segments_at(isa, segments, x, m, out, ld, 0);
}

/// [`matmul_segments_with`] from column `col0`.
pub(super) fn matmul_segments_at(
    isa: Isa,
    segments: &[GgmlMatrix],
    x: &[f32],
    m: usize,
    out: &mut [f32],
    ld: usize,
    col0: usize,
) {
    let Some(first) = segments.first() else {
        return;
    };
    let cols = first.cols;
    assert!(
        segments.iter().all(|s| s.cols == cols),
        "segments of different widths"
    );
    assert_eq!(Some(x.len()), m.checked_mul(cols), "activation length");
    let rows: usize = segments.iter().map(|s| s.rows).sum();
    assert!(
        col0.checked_add(rows).is_some_and(|end| end <= ld),
        "columns {col0}..{col0}+{rows} outside an output row of {ld}"
    );
    assert!(
        m.checked_mul(ld).is_some_and(|n| n <= out.len()),
        "output length"
    );
    if m == 0 || rows == 0 {
        return;
    }
    if cols == 0 {
        for row in out.chunks_mut(ld).take(m) {
            row[col0..col0 + rows].fill(0.0);
        }
        return;
    }
    let eff = effective(isa);
    let paths: Vec<Path> = segments
        .iter()
        .map(|s| {
            if use_int8(eff, s.ty, m) {
                Path::Int8
            } else if s.ty.block_elems().is_multiple_of(32)
                && cols.is_multiple_of(32)
                && crate::quant::uses_bf16_tiles(eff, m)
            {
                // Many rows on AVX512-BF16: exact bf16 codes, the multipliers and offsets in
                // f32, bf16 activations (see `quant::bf16_tiles`).
                Path::Bf16Tiles
            } else {
                Path::F32
            }
        })
        .collect();
    let need = |k: bool| {
        segments
            .iter()
            .zip(&paths)
            .any(|(s, &p)| p == Path::Int8 && (s.ty.block_elems() == 256) == k)
    };
    let a = paths
        .contains(&Path::Int8)
        .then(|| Q8Activations::new(x, m, cols, need(false), need(true)));
    let with_sums = segments
        .iter()
        .zip(&paths)
        .any(|(s, &p)| p == Path::Bf16Tiles && blocks::has_min(s.ty));
    let pairs = paths.contains(&Path::Bf16Tiles).then(|| {
        assert!(bf16_tiles::supported(), "no AVX512-BF16 here");
        if with_sums {
            Bf16Pairs::with_sums(x, m, cols)
        } else {
            Bf16Pairs::new(x, m, cols)
        }
    });
    let kind = int_isa(eff);
    // (segment, its first output column, its weight rows r0..r1)
    let mut tasks = Vec::new();
    let mut c0 = col0;
    for (s, (seg, &path)) in segments.iter().zip(&paths).enumerate() {
        let step = match path {
            Path::Int8 => Q8_TASK_ROWS,
            Path::Bf16Tiles => bf16_tiles::task_rows(cols),
            Path::F32 => seg.f32_task_rows(m),
        };
        for r0 in (0..seg.rows).step_by(step) {
            tasks.push((s, c0, r0, (r0 + step).min(seg.rows)));
        }
        c0 += seg.rows;
    }
    let base = OutPtr(out.as_mut_ptr());
    let run = |&(s, c0, r0, r1): &(usize, usize, usize, usize)| {
        let seg = &segments[s];
        // Element (i, r) of segment s is at i·ld + c0 + r: in bounds (c0 + r < col0 + rows ≤
        // ld, i < m, m·ld ≤ out.len(), asserted above) and written by this task only
        // (segments own disjoint columns, tasks disjoint rows of a segment).
        let ptr = OutPtr(base.at(c0));
        match (paths[s], &a, &pairs) {
            (Path::Int8, Some(a), _) => seg.q8_task(kind, a, r0, r1, ptr, ld),
            (Path::Bf16Tiles, _, Some(p)) => seg.bf16_task(p, r0, r1, ptr, ld),
            _ if m <= FUSED_MAX_CHUNKED_ROWS => seg.f32_fused_task(eff, x, m, r0, r1, ptr, ld),
            _ => seg.f32_tile_task(eff, x, m, r0, r1, ptr, ld),
        }
    };
    if tasks.len() <= 1 || rows * m * cols < 1 << 15 || crate::quant::kept_on_this_thread() {
        tasks.iter().for_each(run);
    } else {
        tasks.par_iter().for_each(run);
    }
}
