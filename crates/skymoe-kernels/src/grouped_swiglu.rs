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

use std::mem::MaybeUninit;
use std::sync::{Arc, Mutex};

use candle_core::{CpuStorage, CustomOp1, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use crate::cpu::{cpu_tensor, filled, filled_mut, slice, slices, unfilled, with_slices};
use crate::sgemm::{sgemm_add, sgemm_uninit, View};
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
fn split_rows<'a, T>(
    mut buf: &'a mut [T],
    width: usize,
    blocks: &[(usize, usize, usize)],
) -> Vec<&'a mut [T]> {
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

/// Where [`grouped_swiglu_to_sink`] leaves the weight gradients of its backward pass: for
/// each expert, in the order its weights were given, the gradients of its gate, up and down
/// projections.
#[derive(Debug, Clone, Default)]
pub struct WeightGradSink(Arc<Mutex<Option<Vec<ExpertTensors>>>>);

/// One expert's gate (`[ffn, hidden]`), up (`[ffn, hidden]`) and down (`[hidden, ffn]`)
/// projections: its weights, or their gradients.
pub type ExpertTensors = (Tensor, Tensor, Tensor);

impl WeightGradSink {
    /// The gradients of the latest backward pass through the operation, if one ran; taking
    /// them empties the sink.
    pub fn take(&self) -> Option<Vec<ExpertTensors>> {
        self.0.lock().ok().and_then(|mut g| g.take())
    }
}

/// One expert's weights as the kernels read them, row-major: gate and up `[ffn, hidden]`,
/// down `[hidden, ffn]`.
#[derive(Debug, Clone, Copy)]
struct ExpertWeights<'a> {
    gate: &'a [f32],
    up: &'a [f32],
    down: &'a [f32],
}

/// Where the backward pass writes one expert's weight gradients (shaped as its weights; the
/// backward pass writes every element).
struct ExpertGradsMut<'a> {
    gate: &'a mut [MaybeUninit<f32>],
    up: &'a mut [MaybeUninit<f32>],
    down: &'a mut [MaybeUninit<f32>],
}

/// The experts of stacked weights `w13 [experts, 2·ffn, hidden]` and `w2 [experts, hidden,
/// ffn]`.
fn stacked_experts<'a>(w13: &'a [f32], w2: &'a [f32], d: Dims) -> Vec<ExpertWeights<'a>> {
    let (fh, w13_len) = (d.ffn * d.hidden, 2 * d.ffn * d.hidden);
    (0..d.experts)
        .map(|e| {
            let w13e = &w13[e * w13_len..(e + 1) * w13_len];
            ExpertWeights {
                gate: &w13e[..fh],
                up: &w13e[fh..],
                down: &w2[e * fh..(e + 1) * fh],
            }
        })
        .collect()
}

/// The per-expert parts of stacked gradients `dw13` and `dw2` (shaped as in
/// [`stacked_experts`]).
fn stacked_grads<'a>(
    mut dw13: &'a mut [MaybeUninit<f32>],
    mut dw2: &'a mut [MaybeUninit<f32>],
    d: Dims,
) -> Vec<ExpertGradsMut<'a>> {
    let fh = d.ffn * d.hidden;
    let mut out = Vec::with_capacity(d.experts);
    for _ in 0..d.experts {
        let (gate, rest) = std::mem::take(&mut dw13).split_at_mut(fh);
        let (up, rest) = rest.split_at_mut(fh);
        dw13 = rest;
        let (down, rest) = std::mem::take(&mut dw2).split_at_mut(fh);
        dw2 = rest;
        out.push(ExpertGradsMut { gate, up, down });
    }
    out
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

/// The output `[rows, hidden]` of the experts `experts` (expert `e`'s rows at
/// `offsets[e]..offsets[e + 1]` of `x`), and what the backward pass needs.
fn forward(
    experts: &[ExpertWeights<'_>],
    offsets: &[usize],
    x: &[f32],
    d: Dims,
) -> (Saved, Vec<f32>) {
    let (h, f) = (d.hidden, d.ffn);
    let blocks = row_blocks(offsets);
    let mut gu = unfilled(d.rows * 2 * f);
    let mut act = unfilled(d.rows * f);
    let mut sig = unfilled(d.rows * f);
    let mut y = unfilled(d.rows * h);
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
            let w = experts[e];
            let xb = View::row_major(&x[r0 * h..r1 * h], n, h, h);
            // [g, u] = x · [gate; up]ᵀ, the gate in the first f columns.
            sgemm_uninit(xb, View::transpose_of(w.gate, h, f, h), 1.0, gu, 2 * f);
            let up = View::transpose_of(w.up, h, f, h);
            sgemm_uninit(xb, up, 1.0, &mut gu[f..], 2 * f);
            // SAFETY: the two products wrote columns 0..f and f..2f of each of the block's
            // rows: all of it.
            let gu = unsafe { filled_mut(gu) };
            swiglu_rows(gu, act, sig, f);
            // SAFETY: `swiglu_rows` wrote every element of the block's rows of both.
            let act = unsafe { filled_mut(act) };
            sgemm_uninit(
                View::row_major(act, n, f, f),
                View::transpose_of(w.down, f, h, f),
                1.0,
                y,
                h,
            );
        });
    // SAFETY: the row blocks cover every row (`row_blocks` walks the offsets from 0 to
    // `rows`), and each block's products and `swiglu_rows` wrote its rows of `gu`, `y`,
    // `act` and `sig` whole.
    let (gu, y, act, sig) = unsafe { (filled(gu), filled(y), filled(act), filled(sig)) };
    (Saved { gu, act, sig }, y)
}

/// Which weight gradient a task of the backward pass's weight phase computes.
#[derive(Debug, Clone, Copy)]
enum WeightPart {
    /// Rows of the gate (`0`) or up (`ffn`) projection's gradient from this column of dGU.
    GateUp(usize),
    /// Rows of the down projection's gradient.
    Down,
}

/// The gradient of the rows for the upstream gradient `dy`; the experts' weight gradients
/// go to `grads` (zero for experts without rows).
fn backward(
    experts: &[ExpertWeights<'_>],
    offsets: &[usize],
    x: &[f32],
    saved: &Saved,
    dy: &[f32],
    d: Dims,
    grads: &mut [ExpertGradsMut<'_>],
) -> Vec<f32> {
    let (h, f) = (d.hidden, d.ffn);
    let (gu, act) = (&saved.gu, &saved.act);
    let blocks = row_blocks(offsets);
    // Row phase: the gradient of [g, u] and of the rows.
    let mut dgu = unfilled(d.rows * 2 * f);
    let mut dx = unfilled(d.rows * h);
    let dgu_parts = split_rows(&mut dgu, 2 * f, &blocks);
    let dx_parts = split_rows(&mut dx, h, &blocks);
    blocks
        .par_iter()
        .zip(dgu_parts)
        .zip(dx_parts)
        .for_each(|((&(e, r0, r1), dgu), dx)| {
            let n = r1 - r0;
            let w = experts[e];
            let gub = &gu[r0 * 2 * f..r1 * 2 * f];
            // dA = dY · down (down is [h, f]).
            let mut da = unfilled(n * f);
            sgemm_uninit(
                View::row_major(&dy[r0 * h..r1 * h], n, h, h),
                View::row_major(w.down, h, f, f),
                1.0,
                &mut da,
                f,
            );
            // SAFETY: the product wrote all n × f elements.
            let da = unsafe { filled(da) };
            swiglu_backward_rows(gub, &saved.sig[r0 * f..r1 * f], &da, dgu, f);
            // SAFETY: `swiglu_backward_rows` wrote every element of the block's rows.
            let dgu = unsafe { filled_mut(dgu) };
            // dX = dG · gate + dU · up (both [f, h]).
            sgemm_uninit(
                View::row_major(dgu, n, f, 2 * f),
                View::row_major(w.gate, f, h, h),
                1.0,
                dx,
                h,
            );
            // SAFETY: the product wrote the block's rows of dX whole.
            let dx = unsafe { filled_mut(dx) };
            sgemm_add(
                View::row_major(&dgu[f..], n, f, 2 * f),
                View::row_major(w.up, f, h, h),
                1.0,
                dx,
                h,
            );
        });
    // Weight phase: d gate[e] and d up[e] = dGUᵀ · X, d down[e] = dYᵀ · A over the expert's
    // rows, in blocks of output rows. Experts without rows get zero gradients.
    // SAFETY: the row blocks cover every row, and `swiglu_backward_rows` wrote each block's
    // rows of dGU whole.
    let dgu = unsafe { filled(dgu) };
    let dgu = &dgu;
    let mut tasks: Vec<(usize, WeightPart, usize, &mut [MaybeUninit<f32>])> = Vec::new();
    for (e, g) in grads.iter_mut().enumerate() {
        if offsets[e + 1] == offsets[e] {
            for out in [&mut *g.gate, &mut *g.up, &mut *g.down] {
                out.fill(MaybeUninit::new(0.0));
            }
            continue;
        }
        for (col, out) in [(0, &mut *g.gate), (f, &mut *g.up)] {
            for (i, out) in out.chunks_mut((WEIGHT_BLOCK * h).max(1)).enumerate() {
                tasks.push((e, WeightPart::GateUp(col), i * WEIGHT_BLOCK, out));
            }
        }
        for (i, out) in g.down.chunks_mut((WEIGHT_BLOCK * f).max(1)).enumerate() {
            tasks.push((e, WeightPart::Down, i * WEIGHT_BLOCK, out));
        }
    }
    tasks.into_par_iter().for_each(|(e, part, row, out)| {
        let (r0, r1) = (offsets[e], offsets[e + 1]);
        let n = r1 - r0;
        match part {
            WeightPart::GateUp(col) => {
                let rows = out.len() / h;
                let a = View::transpose_of(&dgu[r0 * 2 * f + col + row..], rows, n, 2 * f);
                sgemm_uninit(a, View::row_major(&x[r0 * h..r1 * h], n, h, h), 1.0, out, h);
            }
            WeightPart::Down => {
                let rows = out.len() / f;
                let a = View::transpose_of(&dy[r0 * h + row..], rows, n, h);
                sgemm_uninit(
                    a,
                    View::row_major(&act[r0 * f..r1 * f], n, f, f),
                    1.0,
                    out,
                    f,
                );
            }
        }
    });
    // SAFETY: the row blocks cover every row, and each block's products wrote its rows of dX.
    unsafe { filled(dx) }
}

/// The grouped experts on stacked weight tensors, differentiable in all three arguments.
struct GroupedSwiGlu {
    offsets: Vec<usize>,
    /// Kept by the forward pass for the backward pass.
    saved: Mutex<Option<Arc<Saved>>>,
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
        let (kept, y) = forward(&stacked_experts(w13, w2, d), &self.offsets, x, d);
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
            let experts = stacked_experts(w13v, w2v, d);
            let kept = match saved {
                Some(kept) => kept,
                None => Arc::new(forward(&experts, &self.offsets, xv, d).0),
            };
            let mut dw13 = unfilled(w13v.len());
            let mut dw2 = unfilled(w2v.len());
            let mut grads = stacked_grads(&mut dw13, &mut dw2, d);
            let dx = backward(&experts, &self.offsets, xv, &kept, dy, d, &mut grads);
            // SAFETY: the experts' parts cover both buffers (`stacked_grads`), and the
            // backward pass wrote every expert's gradients whole.
            Ok((dx, unsafe { filled(dw13) }, unsafe { filled(dw2) }))
        })?;
        Ok((
            Some(cpu_tensor(dx, x.dims())),
            Some(cpu_tensor(dw13, w13.dims())),
            Some(cpu_tensor(dw2, w2.dims())),
        ))
    }
}

/// The grouped experts on each expert's own weight tensors, read in place: differentiable in
/// the rows only, the weight gradients going to a sink.
struct GroupedSwiGluToSink {
    offsets: Vec<usize>,
    /// Gate, up and down projection of each expert (contiguous CPU f32).
    weights: Vec<ExpertTensors>,
    ffn: usize,
    sink: WeightGradSink,
    /// Kept by the forward pass for the backward pass.
    saved: Mutex<Option<Arc<Saved>>>,
}

impl GroupedSwiGluToSink {
    fn dims(&self, x: &[usize]) -> Result<Dims> {
        let &[rows, hidden] = x else {
            candle_core::bail!("grouped_swiglu_to_sink: rows {x:?} are not [n, hidden]");
        };
        Ok(Dims {
            rows,
            hidden,
            ffn: self.ffn,
            experts: self.weights.len(),
        })
    }

    /// Call `f` with the experts' weights and the elements of `extra`.
    fn with_weights<R>(
        &self,
        extra: &[&Tensor],
        f: impl FnOnce(&[ExpertWeights<'_>], &[&[f32]]) -> Result<R>,
    ) -> Result<R> {
        let mut all: Vec<&Tensor> = Vec::with_capacity(3 * self.weights.len() + extra.len());
        for (gate, up, down) in &self.weights {
            all.extend([gate, up, down]);
        }
        all.extend(extra);
        with_slices(&all, |s| {
            let (w, rest) = s.split_at(3 * self.weights.len());
            let experts: Vec<ExpertWeights<'_>> = w
                .chunks_exact(3)
                .map(|p| ExpertWeights {
                    gate: p[0],
                    up: p[1],
                    down: p[2],
                })
                .collect();
            f(&experts, rest)
        })
    }
}

impl CustomOp1 for GroupedSwiGluToSink {
    fn name(&self) -> &'static str {
        "skymoe-grouped-swiglu-to-sink"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout) -> Result<(CpuStorage, Shape)> {
        let d = self.dims(l1.dims())?;
        let x = slice(s1, l1)?;
        let (kept, y) =
            self.with_weights(&[], |experts, _| Ok(forward(experts, &self.offsets, x, d)))?;
        if let Ok(mut saved) = self.saved.lock() {
            *saved = Some(Arc::new(kept));
        }
        Ok((CpuStorage::F32(y), Shape::from((d.rows, d.hidden))))
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let d = self.dims(x.dims())?;
        let saved = self.saved.lock().ok().and_then(|s| s.clone());
        let fh = d.ffn * d.hidden;
        let (dx, owned) = self.with_weights(&[x, grad], |experts, s| {
            let (xv, dy) = (s[0], s[1]);
            let kept = match saved {
                Some(kept) => kept,
                None => Arc::new(forward(experts, &self.offsets, xv, d).0),
            };
            let mut owned: Vec<[Vec<MaybeUninit<f32>>; 3]> = (0..d.experts)
                .map(|_| [unfilled(fh), unfilled(fh), unfilled(fh)])
                .collect();
            let mut grads: Vec<ExpertGradsMut<'_>> = owned
                .iter_mut()
                .map(|[gate, up, down]| ExpertGradsMut { gate, up, down })
                .collect();
            let dx = backward(experts, &self.offsets, xv, &kept, dy, d, &mut grads);
            Ok((dx, owned))
        })?;
        let grads = owned
            .into_iter()
            .map(|[gate, up, down]| {
                // SAFETY: the backward pass wrote every expert's gradients whole.
                let [gate, up, down] = unsafe { [filled(gate), filled(up), filled(down)] };
                (
                    cpu_tensor(gate, &[d.ffn, d.hidden]),
                    cpu_tensor(up, &[d.ffn, d.hidden]),
                    cpu_tensor(down, &[d.hidden, d.ffn]),
                )
            })
            .collect();
        if let Ok(mut slot) = self.sink.0.lock() {
            *slot = Some(grads);
        }
        Ok(Some(cpu_tensor(dx, x.dims())))
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
            saved: Mutex::new(None),
        },
    )
}

/// [`grouped_swiglu`] on each expert's own weights (`weights[e]`: the gate `[ffn, hidden]`,
/// up `[ffn, hidden]` and down `[hidden, ffn]` projections of the expert whose rows are
/// `offsets[e]..offsets[e + 1]`), read where they lie instead of stacked into a copy. Its
/// backward pass hands the weight gradients to `sink` instead of to the autograd graph
/// (which receives only the rows' gradient). On CPU f32 only (an error elsewhere).
pub fn grouped_swiglu_to_sink(
    x: &Tensor,
    weights: &[ExpertTensors],
    offsets: &[usize],
    sink: &WeightGradSink,
) -> Result<Tensor> {
    let Some((first, _, _)) = weights.first() else {
        candle_core::bail!("grouped_swiglu_to_sink: no experts");
    };
    let (ffn, hidden) = first.dims2()?;
    let all: Vec<&Tensor> = std::iter::once(x)
        .chain(weights.iter().flat_map(|(g, u, d)| [g, u, d]))
        .collect();
    if !fused_ok(&all) {
        candle_core::bail!("grouped_swiglu_to_sink: CPU f32 tensors only");
    }
    // The shapes of stacked weights, checked as the stacked operation checks them.
    let e = weights.len();
    for (gate, up, down) in weights {
        if gate.dims() != [ffn, hidden]
            || up.dims() != [ffn, hidden]
            || down.dims() != [hidden, ffn]
        {
            candle_core::bail!(
                "grouped_swiglu_to_sink: expert weights {:?}, {:?}, {:?} are not [{ffn}, {hidden}], [{ffn}, {hidden}], [{hidden}, {ffn}]",
                gate.dims(),
                up.dims(),
                down.dims()
            );
        }
    }
    check_dims(x.dims(), &[e, 2 * ffn, hidden], &[e, hidden, ffn], offsets)?;
    let weights = weights
        .iter()
        .map(|(g, u, d)| Ok((g.contiguous()?, u.contiguous()?, d.contiguous()?)))
        .collect::<Result<Vec<_>>>()?;
    x.contiguous()?.apply_op1(GroupedSwiGluToSink {
        offsets: offsets.to_vec(),
        weights,
        ffn,
        sink: sink.clone(),
        saved: Mutex::new(None),
    })
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::max_abs_diff as max_diff;
    use candle_core::{Device, Var};

    fn rand(shape: &[usize], seed: u64) -> Tensor {
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n)
            .map(|i| ((i as u64 * 2654435761 + seed * 97) % 1000) as f32 / 2000.0 - 0.25)
            .collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    /// Every output and gradient is written (the unfilled buffers start as NaN under test) and
    /// equals the composition of candle ops: an expert without rows, experts of more rows than
    /// a row block, widths that the weight blocks do not divide.
    #[test]
    fn outputs_allocated_without_zeroing_are_written_whole() {
        let offsets = [0usize, 300, 300, 301, 620];
        let (h, f, e) = (24usize, WEIGHT_BLOCK + 20, 4usize);
        let x = Var::from_tensor(&rand(&[620, h], 1)).unwrap();
        let w13 = Var::from_tensor(&rand(&[e, 2 * f, h], 2)).unwrap();
        let w2 = Var::from_tensor(&rand(&[e, h, f], 3)).unwrap();
        let probe = rand(&[620, h], 4);
        let fused = grouped_swiglu(&x, &w13, &w2, &offsets).unwrap();
        let plain = reference_grouped_swiglu(&x, &w13, &w2, &offsets).unwrap();
        assert!(max_diff(&fused, &plain) < 1e-5);
        let gf = (fused * &probe)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let gp = (plain * &probe)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        for v in [&x, &w13, &w2] {
            let (a, b) = (gf.get(v).unwrap(), gp.get(v).unwrap());
            assert!(
                max_diff(a, b) < 1e-4,
                "gradient differs by {}",
                max_diff(a, b)
            );
        }
        // The expert without rows has zero weight gradients.
        let empty = gf.get(&w13).unwrap().get(1).unwrap();
        assert_eq!(
            empty
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap(),
            0.0
        );
        // The same through the sink, per expert.
        let weights: Vec<ExpertTensors> = (0..e)
            .map(|i| {
                let w = w13.get(i).unwrap();
                (
                    w.narrow(0, 0, f).unwrap(),
                    w.narrow(0, f, f).unwrap(),
                    w2.get(i).unwrap(),
                )
            })
            .collect();
        let sink = WeightGradSink::default();
        let y = grouped_swiglu_to_sink(&x, &weights, &offsets, &sink).unwrap();
        let gs = (y * &probe).unwrap().sum_all().unwrap().backward().unwrap();
        assert_eq!(max_diff(gs.get(&x).unwrap(), gf.get(&x).unwrap()), 0.0);
        for (i, (g, u, d)) in sink.take().unwrap().iter().enumerate() {
            let w = gf.get(&w13).unwrap().get(i).unwrap();
            assert_eq!(max_diff(g, &w.narrow(0, 0, f).unwrap()), 0.0);
            assert_eq!(max_diff(u, &w.narrow(0, f, f).unwrap()), 0.0);
            assert_eq!(max_diff(d, &gf.get(&w2).unwrap().get(i).unwrap()), 0.0);
        }
    }
}
