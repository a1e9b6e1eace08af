//! The routed experts of an MoE layer as one operation: rows of `x` grouped by expert (the
//! rows of expert `e` are `offsets[e]..offsets[e + 1]`) each pass through their expert's
//! SwiGLU `down(silu(gate x) · up x)`, with a backward pass for the rows and for every
//! expert's weights.
//!
//! One operation instead of a graph of gathers, products and activations per expert: the
//! backward pass allocates one gradient per argument (not one per expert and use), and the
//! work of all experts is spread over the thread pool in row blocks, so that small experts and
//! a second core are not left idle. The gate and up projections of expert `e` are stacked as
//! `w13[e] = [gate; up]` (`[2·ffn, hidden]`), the down projections as `w2[e]` (`[hidden, ffn]`).

use std::sync::{Arc, Mutex};

use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use crate::cpu::{cpu_tensor, slice, slices};
use crate::sgemm::{sgemm, View};
use crate::vexp::{swiglu_backward_rows, swiglu_rows};
use crate::{fused_ok, silu_mul};

/// Rows per task in the row-parallel phases.
const ROW_BLOCK: usize = 256;
/// Output rows of a weight gradient per task.
const WEIGHT_BLOCK: usize = 512;

/// The shapes of one call: rows, hidden width, expert FFN width, experts.
#[derive(Debug, Clone, Copy)]
struct Dims {
    rows: usize,
    hidden: usize,
    ffn: usize,
    experts: usize,
}

fn check_dims(x: &[usize], w13: &[usize], w2: &[usize], offsets: &[usize]) -> Result<Dims> {
    let (&[rows, hidden], &[experts, ffn2, h13], &[e2, h2, ffn]) = (x, w13, w2) else {
        candle_core::bail!("grouped_swiglu: shapes x {x:?}, w13 {w13:?}, w2 {w2:?} are not [n, h], [e, 2f, h], [e, h, f]");
    };
    if h13 != hidden || h2 != hidden || e2 != experts || ffn2 != 2 * ffn {
        candle_core::bail!("grouped_swiglu: shapes x {x:?}, w13 {w13:?}, w2 {w2:?} disagree");
    }
    if offsets.len() != experts + 1
        || offsets.first() != Some(&0)
        || offsets.last() != Some(&rows)
        || offsets.windows(2).any(|w| w[0] > w[1])
    {
        candle_core::bail!(
            "grouped_swiglu: offsets {offsets:?} do not split {rows} rows over {experts} experts"
        );
    }
    Ok(Dims {
        rows,
        hidden,
        ffn,
        experts,
    })
}

/// Row blocks `(expert, first row, end row)` covering every expert's rows in order.
fn row_blocks(offsets: &[usize]) -> Vec<(usize, usize, usize)> {
    let mut blocks = Vec::new();
    for (e, w) in offsets.windows(2).enumerate() {
        let mut r = w[0];
        while r < w[1] {
            let end = (r + ROW_BLOCK).min(w[1]);
            blocks.push((e, r, end));
            r = end;
        }
    }
    blocks
}

/// Cut `buf` (rows of `width` floats) into the row ranges of `blocks`, in order.
fn split_rows<'a>(
    mut buf: &'a mut [f32],
    width: usize,
    blocks: &[(usize, usize, usize)],
) -> Vec<&'a mut [f32]> {
    let mut parts = Vec::with_capacity(blocks.len());
    let mut at = blocks.first().map_or(0, |b| b.1);
    for &(_, r0, r1) in blocks {
        let skip = (r0 - at) * width;
        let (_, rest) = std::mem::take(&mut buf).split_at_mut(skip);
        let (part, rest) = rest.split_at_mut((r1 - r0) * width);
        parts.push(part);
        buf = rest;
        at = r1;
    }
    parts
}

/// Where [`grouped_swiglu_to_sink`] leaves the weight gradients of its backward pass:
/// `d w13` (`[experts, 2·ffn, hidden]`) and `d w2` (`[experts, hidden, ffn]`).
#[derive(Debug, Clone, Default)]
pub struct WeightGradSink(Arc<Mutex<Option<(Tensor, Tensor)>>>);

impl WeightGradSink {
    /// The gradients of the latest backward pass through the operation, if one ran; taking
    /// them empties the sink.
    pub fn take(&self) -> Option<(Tensor, Tensor)> {
        self.0.lock().ok().and_then(|mut g| g.take())
    }
}

struct GroupedSwiGlu {
    offsets: Vec<usize>,
    /// When set, the weight gradients go here instead of to the autograd graph.
    sink: Option<WeightGradSink>,
    /// The gate and up projections of every row (`[rows, 2·ffn]`), their SwiGLU activations
    /// and the gates' sigmoids (`[rows, ffn]`), kept by the forward pass for the backward pass.
    saved: Mutex<Option<Arc<Saved>>>,
}

/// What the forward pass keeps for the backward pass.
struct Saved {
    /// The gate and up projections of every row, `[rows, 2·ffn]`.
    gu: Vec<f32>,
    /// `silu(gate) · up` of every row, `[rows, ffn]`.
    act: Vec<f32>,
    /// `σ(gate)` of every row, `[rows, ffn]`.
    sig: Vec<f32>,
}

impl GroupedSwiGlu {
    /// The output `[rows, hidden]` and what the backward pass needs.
    fn forward(&self, x: &[f32], w13: &[f32], w2: &[f32], d: Dims) -> (Saved, Vec<f32>) {
        let (h, f) = (d.hidden, d.ffn);
        let blocks = row_blocks(&self.offsets);
        let mut gu = vec![0.0f32; d.rows * 2 * f];
        let mut act = vec![0.0f32; d.rows * f];
        let mut sig = vec![0.0f32; d.rows * f];
        let mut y = vec![0.0f32; d.rows * h];
        let gu_parts = split_rows(&mut gu, 2 * f, &blocks);
        let act_parts = split_rows(&mut act, f, &blocks);
        let sig_parts = split_rows(&mut sig, f, &blocks);
        let y_parts = split_rows(&mut y, h, &blocks);
        blocks
            .par_iter()
            .zip(gu_parts)
            .zip(act_parts)
            .zip(sig_parts)
            .zip(y_parts)
            .for_each(|((((&(e, r0, r1), gu), act), sig), y)| {
                let n = r1 - r0;
                let xb = View::row_major(&x[r0 * h..r1 * h], n, h, h);
                let w13e = &w13[e * 2 * f * h..(e + 1) * 2 * f * h];
                sgemm(xb, View::transpose_of(w13e, h, 2 * f, h), 1.0, gu, 2 * f);
                swiglu_rows(gu, act, sig, f);
                let w2e = &w2[e * h * f..(e + 1) * h * f];
                sgemm(
                    View::row_major(act, n, f, f),
                    View::transpose_of(w2e, f, h, f),
                    1.0,
                    y,
                    h,
                );
            });
        (Saved { gu, act, sig }, y)
    }

    /// Gradients of the rows, of `w13` and of `w2` for the upstream gradient `dy`.
    fn backward(
        &self,
        x: &[f32],
        w13: &[f32],
        w2: &[f32],
        saved: &Saved,
        dy: &[f32],
        d: Dims,
    ) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
        let (h, f) = (d.hidden, d.ffn);
        let (gu, act) = (&saved.gu, &saved.act);
        let blocks = row_blocks(&self.offsets);
        // Row phase: the gradient of [g, u] and of the rows.
        let mut dgu = vec![0.0f32; d.rows * 2 * f];
        let mut dx = vec![0.0f32; d.rows * h];
        let dgu_parts = split_rows(&mut dgu, 2 * f, &blocks);
        let dx_parts = split_rows(&mut dx, h, &blocks);
        blocks
            .par_iter()
            .zip(dgu_parts)
            .zip(dx_parts)
            .for_each(|((&(e, r0, r1), dgu), dx)| {
                let n = r1 - r0;
                let gub = &gu[r0 * 2 * f..r1 * 2 * f];
                let w2e = &w2[e * h * f..(e + 1) * h * f];
                // dA = dY · W2 (W2 is [h, f]).
                let mut da = vec![0.0f32; n * f];
                sgemm(
                    View::row_major(&dy[r0 * h..r1 * h], n, h, h),
                    View::row_major(w2e, h, f, f),
                    1.0,
                    &mut da,
                    f,
                );
                swiglu_backward_rows(gub, &saved.sig[r0 * f..r1 * f], &da, dgu, f);
                // dX = dGU · W13 (W13 is [2f, h]).
                let w13e = &w13[e * 2 * f * h..(e + 1) * 2 * f * h];
                sgemm(
                    View::row_major(dgu, n, 2 * f, 2 * f),
                    View::row_major(w13e, 2 * f, h, h),
                    1.0,
                    dx,
                    h,
                );
            });
        // Weight phase: dW13[e] = dGUᵀ · X and dW2[e] = dYᵀ · A over the expert's rows, in
        // blocks of output rows. Experts without rows keep zero gradients.
        let mut dw13 = vec![0.0f32; d.experts * 2 * f * h];
        let mut dw2 = vec![0.0f32; d.experts * h * f];
        let offsets = &self.offsets;
        let dgu = &dgu;
        let w13_tasks = dw13.chunks_mut(2 * f * h).enumerate().flat_map(|(e, out)| {
            out.chunks_mut(WEIGHT_BLOCK * h)
                .enumerate()
                .map(move |(i, out)| (0u8, e, i * WEIGHT_BLOCK, out))
        });
        let w2_tasks = dw2.chunks_mut(h * f).enumerate().flat_map(|(e, out)| {
            out.chunks_mut(WEIGHT_BLOCK * f)
                .enumerate()
                .map(move |(i, out)| (1u8, e, i * WEIGHT_BLOCK, out))
        });
        let tasks: Vec<(u8, usize, usize, &mut [f32])> = w13_tasks
            .chain(w2_tasks)
            .filter(|t| offsets[t.1 + 1] > offsets[t.1])
            .collect();
        tasks.into_par_iter().for_each(|(kind, e, row, out)| {
            let (r0, r1) = (offsets[e], offsets[e + 1]);
            let n = r1 - r0;
            if kind == 0 {
                // Rows `row..` of dW13[e] ([2f, h]).
                let rows = out.len() / h;
                let a = View::transpose_of(&dgu[r0 * 2 * f + row..], rows, n, 2 * f);
                sgemm(a, View::row_major(&x[r0 * h..r1 * h], n, h, h), 1.0, out, h);
            } else {
                let rows = out.len() / f;
                let a = View::transpose_of(&dy[r0 * h + row..], rows, n, h);
                sgemm(
                    a,
                    View::row_major(&act[r0 * f..r1 * f], n, f, f),
                    1.0,
                    out,
                    f,
                );
            }
        });
        (dx, dw13, dw2)
    }
}

impl CustomOp3 for GroupedSwiGlu {
    fn name(&self) -> &'static str {
        "skymoe-grouped-swiglu"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let d = check_dims(l1.dims(), l2.dims(), l3.dims(), &self.offsets)?;
        let (x, w13, w2) = (slice(s1, l1)?, slice(s2, l2)?, slice(s3, l3)?);
        let (kept, y) = self.forward(x, w13, w2, d);
        if let Ok(mut saved) = self.saved.lock() {
            *saved = Some(Arc::new(kept));
        }
        Ok((CpuStorage::F32(y), Shape::from((d.rows, d.hidden))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w13: &Tensor,
        w2: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let d = check_dims(x.dims(), w13.dims(), w2.dims(), &self.offsets)?;
        let saved = self.saved.lock().ok().and_then(|s| s.clone());
        let (dx, dw13, dw2) = slices([x, w13, w2, grad], |[xv, w13v, w2v, dy]| {
            let kept = match saved {
                Some(kept) => kept,
                None => Arc::new(self.forward(xv, w13v, w2v, d).0),
            };
            Ok(self.backward(xv, w13v, w2v, &kept, dy, d))
        })?;
        let (dw13, dw2) = (cpu_tensor(dw13, w13.dims()), cpu_tensor(dw2, w2.dims()));
        let dx = Some(cpu_tensor(dx, x.dims()));
        match &self.sink {
            Some(sink) => {
                if let Ok(mut slot) = sink.0.lock() {
                    *slot = Some((dw13, dw2));
                }
                Ok((dx, None, None))
            }
            None => Ok((dx, Some(dw13), Some(dw2))),
        }
    }
}

/// The routed experts' SwiGLU over rows grouped by expert: `x [n, hidden]` (expert `e`'s rows
/// at `offsets[e]..offsets[e + 1]`), `w13 [experts, 2·ffn, hidden]` (each expert's gate
/// projection stacked over its up projection), `w2 [experts, hidden, ffn]`; returns
/// `[n, hidden]`, row `i` being `w2[e] · (silu(gate_e x_i) · up_e x_i)` for its expert `e`.
/// Differentiable in all three tensors.
pub fn grouped_swiglu(x: &Tensor, w13: &Tensor, w2: &Tensor, offsets: &[usize]) -> Result<Tensor> {
    check_dims(x.dims(), w13.dims(), w2.dims(), offsets)?;
    if !fused_ok(&[x, w13, w2]) {
        return reference_grouped_swiglu(x, w13, w2, offsets);
    }
    x.contiguous()?.apply_op3(
        &w13.contiguous()?,
        &w2.contiguous()?,
        GroupedSwiGlu {
            offsets: offsets.to_vec(),
            sink: None,
            saved: Mutex::new(None),
        },
    )
}

/// [`grouped_swiglu`] whose backward pass hands the weight gradients to `sink` instead of to
/// the autograd graph (which then receives only the rows' gradient): for weights stacked from
/// many variables, whose gradients the caller splits itself, this saves the graph a gradient
/// of the stacked copy. On CPU f32 only (an error elsewhere).
pub fn grouped_swiglu_to_sink(
    x: &Tensor,
    w13: &Tensor,
    w2: &Tensor,
    offsets: &[usize],
    sink: &WeightGradSink,
) -> Result<Tensor> {
    check_dims(x.dims(), w13.dims(), w2.dims(), offsets)?;
    if !fused_ok(&[x, w13, w2]) {
        candle_core::bail!("grouped_swiglu_to_sink: CPU f32 tensors only");
    }
    x.contiguous()?.apply_op3(
        &w13.contiguous()?,
        &w2.contiguous()?,
        GroupedSwiGlu {
            offsets: offsets.to_vec(),
            sink: Some(sink.clone()),
            saved: Mutex::new(None),
        },
    )
}

/// [`grouped_swiglu`] as a composition of candle ops (one product chain per expert), which
/// candle differentiates itself: the definition the fused operation is tested against, and the
/// path on other devices and dtypes.
pub fn reference_grouped_swiglu(
    x: &Tensor,
    w13: &Tensor,
    w2: &Tensor,
    offsets: &[usize],
) -> Result<Tensor> {
    let d = check_dims(x.dims(), w13.dims(), w2.dims(), offsets)?;
    let mut parts = Vec::with_capacity(d.experts);
    for e in 0..d.experts {
        let n = offsets[e + 1] - offsets[e];
        if n == 0 {
            continue;
        }
        let xe = x.narrow(0, offsets[e], n)?;
        let w13e = w13.get(e)?;
        let g = xe.matmul(&w13e.narrow(0, 0, d.ffn)?.t()?)?;
        let u = xe.matmul(&w13e.narrow(0, d.ffn, d.ffn)?.t()?)?;
        parts.push(silu_mul(&g, &u)?.matmul(&w2.get(e)?.t()?)?);
    }
    if parts.is_empty() {
        return Tensor::zeros((0, d.hidden), x.dtype(), x.device());
    }
    Tensor::cat(&parts, 0)
}
