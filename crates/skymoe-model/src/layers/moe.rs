//! The MoE feed-forward block: router → dispatch (tokens grouped by expert) → experts →
//! weighted combine, plus the optional shared expert (sigmoid-gated in Qwen2-MoE, ungated in
//! DeepSeek).
//! Dropless: every token reaches all of its top-k experts.

use candle_core::{Result, Tensor};

use super::ffn::SwiGlu;
use super::linear::Linear;
use super::ops::sigmoid;
use super::router::{Router, Routing};
use crate::parallel::{ExpertParallel, TensorParallel};

/// A shared expert that every token passes through, scaled by `sigmoid(gate x)` when it has
/// a gate (Qwen2-MoE), added as it is otherwise (DeepSeek).
#[derive(Debug, Clone)]
pub struct SharedExpert {
    /// The expert.
    pub ffn: SwiGlu,
    /// The scalar gate `[1, hidden]`, if any.
    pub gate: Option<Linear>,
}

/// A sparse MoE feed-forward block.
#[derive(Debug, Clone)]
pub struct MoeBlock {
    /// The router.
    pub router: Router,
    /// The routed experts held here (all of them without expert parallelism).
    pub experts: Vec<SwiGlu>,
    /// The index among all routed experts of each expert in `experts`.
    pub expert_ids: Vec<usize>,
    /// Routed experts in the layer.
    pub num_experts: usize,
    /// The shared expert, if any.
    pub shared: Option<SharedExpert>,
    /// The tensor-parallel group the experts are split or spread over, if any: each rank
    /// computes its part of the combined output and the parts are summed.
    pub tp: Option<TensorParallel>,
    /// The expert-parallel group across data-parallel ranks, if any: tokens travel to their
    /// experts' ranks and back (`experts` holds this rank's share).
    pub ep: Option<ExpertParallel>,
    /// Hand the experts' weight gradients over in [`Routing::deferred_expert_grads`] instead
    /// of through the autograd graph (whose `backward` then leaves them out): the caller adds
    /// them with [`DeferredExpertGrads::add_to`]. Saves the graph the gradient of the stacked
    /// weights; for callers that do add them (the trainer), off by default.
    pub defer_expert_weight_grads: bool,
}

/// Expert weight gradients that a layer's backward pass left in a sink, and the weights they
/// belong to.
#[derive(Debug, Clone)]
pub struct DeferredExpertGrads {
    sink: skymoe_kernels::WeightGradSink,
    /// Gate, up and down projection weights of each local expert, in stacking order.
    weights: Vec<(Tensor, Tensor, Tensor)>,
}

impl DeferredExpertGrads {
    /// Add the gradients of the latest backward pass to `store`, each under its weight (summed
    /// with a gradient already there); nothing if no backward pass reached the layer.
    pub fn add_to(&self, store: &mut candle_core::backprop::GradStore) -> Result<()> {
        let Some(grads) = self.sink.take() else {
            return Ok(());
        };
        for ((gate, up, down), (d_gate, d_up, d_down)) in self.weights.iter().zip(grads) {
            for (weight, grad) in [(gate, d_gate), (up, d_up), (down, d_down)] {
                let sum = match store.get(weight) {
                    Some(prev) => (prev + grad)?,
                    None => grad,
                };
                store.insert(weight, sum);
            }
        }
        Ok(())
    }
}

/// Tokens assigned to each expert: for expert `e`, the token rows and the flat
/// `token · top_k + slot` positions of their combine weights. Assignments with
/// `kept[a] == false` (dropped by the capacity limit) are left out.
pub fn group_by_expert(
    experts: &[u32],
    kept: &[bool],
    top_k: usize,
    num_experts: usize,
) -> Vec<(Vec<u32>, Vec<u32>)> {
    let mut groups = vec![(Vec::new(), Vec::new()); num_experts];
    for (flat, &e) in experts.iter().enumerate() {
        if !kept.get(flat).copied().unwrap_or(true) {
            continue;
        }
        if let Some(g) = groups.get_mut(e as usize) {
            g.0.push((flat / top_k) as u32);
            g.1.push(flat as u32);
        }
    }
    groups
}

impl MoeBlock {
    /// `out` plus the shared expert's output for `xe`, scaled by its gate values `gate` when
    /// it has a gate; `out` itself without a shared expert.
    fn add_shared(&self, out: Tensor, xe: &Tensor, gate: Option<&Tensor>) -> Result<Tensor> {
        let Some(shared) = &self.shared else {
            return Ok(out);
        };
        let s = shared.ffn.forward(xe)?;
        match gate {
            Some(g) => out + s.broadcast_mul(g)?,
            None => out + s,
        }
    }

    /// Apply to `x` of shape `[batch, seq, hidden]` without dropping; returns the output and
    /// the routing.
    pub fn forward(&self, x: &Tensor) -> Result<(Tensor, Routing)> {
        self.forward_with_capacity(x, None)
    }

    /// Apply with a capacity factor (`None` or ≤ 0: dropless). Dropped assignments contribute
    /// nothing; the residual stream carries their tokens.
    pub fn forward_with_capacity(
        &self,
        x: &Tensor,
        capacity_factor: Option<f64>,
    ) -> Result<(Tensor, Routing)> {
        let dims = x.dims().to_vec();
        let h = *dims.last().unwrap_or(&0);
        let xs = x.reshape((x.elem_count() / h.max(1), h))?;
        let mut routing = self.router.route(&xs)?;
        routing.apply_capacity(capacity_factor);
        let k = routing.top_k;
        // Under tensor parallelism the router runs on every rank alike; the experts' input
        // and the combine weights pass through `copy_in` so that their gradients, partial on
        // each rank, are summed over the group.
        // One joint `copy_in` per block, so every rank runs its backward all-reduces in the
        // same order whatever experts its tokens reached.
        let shared_gate = match &self.shared {
            Some(SharedExpert {
                gate: Some(gate), ..
            }) => Some(sigmoid(&gate.forward(&xs)?)?),
            _ => None,
        };
        let (xe, weights, shared_gate, joined) = match &self.tp {
            Some(tp) => {
                let mut pieces = vec![xs.clone(), routing.weights.clone()];
                pieces.extend(shared_gate.iter().cloned());
                let joined = tp.copy_in(&Tensor::cat(&pieces, 1)?)?;
                (
                    joined.narrow(1, 0, h)?.contiguous()?,
                    joined.narrow(1, h, k)?.contiguous()?,
                    shared_gate
                        .as_ref()
                        .map(|_| joined.narrow(1, h + k, 1)?.contiguous())
                        .transpose()?,
                    Some(joined),
                )
            }
            None => (xs.clone(), routing.weights.clone(), shared_gate, None),
        };
        let expert_input = if self.router.config.multiply_input_by_top_k {
            (&xe * k as f64)?
        } else {
            xe.clone()
        };
        let flat_weights = weights.flatten_all()?;
        let mut out = xs.zeros_like()?;
        let dev = xs.device();
        if let Some(ep) = &self.ep {
            // Under tensor parallelism the group's ranks hold the same tokens: each dispatches
            // its share of the rows, and `reduce_out` below joins the shares.
            let share = self.tp.as_ref().map(|tp| (tp.rank(), tp.size()));
            out = self.dispatch_to_ranks(ep, &routing, &expert_input, &flat_weights, out, share)?;
            out = self.add_shared(out, &xe, shared_gate.as_ref())?;
            if let (Some(tp), Some(joined)) = (&self.tp, &joined) {
                let sum = joined.sum_all()?;
                let anchor = sum.mul(&sum.zeros_like()?)?;
                out = tp.reduce_out(&out.broadcast_add(&anchor)?)?;
            }
            return Ok((out.reshape(dims)?, routing));
        }
        let groups = group_by_expert(&routing.experts, &routing.kept, k, self.num_experts);
        let defer = self.defer_expert_weight_grads
            && matches!(xs.device(), candle_core::Device::Cpu)
            && xs.dtype() == candle_core::DType::F32;
        // The local experts that received tokens: the others take no part in the product and
        // get no gradient (as in transformers, so AdamW leaves them alone).
        let active: Vec<usize> = (0..self.experts.len())
            .filter(|&j| {
                self.expert_ids
                    .get(j)
                    .and_then(|&e| groups.get(e))
                    .is_some_and(|g| !g.0.is_empty())
            })
            .collect();
        if !active.is_empty() && self.experts_groupable() {
            // All active local experts in one grouped operation: rows sorted by expert.
            let (mut rows, mut slots, mut offsets) = (Vec::new(), Vec::new(), vec![0]);
            for &j in &active {
                if let Some((r, s)) = self.expert_ids.get(j).and_then(|&e| groups.get(e)) {
                    rows.extend_from_slice(r);
                    slots.extend_from_slice(s);
                }
                offsets.push(rows.len());
            }
            if !rows.is_empty() {
                let n = rows.len();
                let rows = Tensor::from_vec(rows, n, dev)?;
                let slots = Tensor::from_vec(slots, n, dev)?;
                let x_sorted = expert_input.index_select(&rows, 0)?;
                let y = if defer {
                    // Each expert's weights read where they lie; their gradients come back
                    // through the sink.
                    let sink = skymoe_kernels::WeightGradSink::default();
                    let weights: Vec<(Tensor, Tensor, Tensor)> = active
                        .iter()
                        .map(|&j| &self.experts[j])
                        .map(|x| {
                            (
                                x.gate.weight.clone(),
                                x.up.weight.clone(),
                                x.down.weight.clone(),
                            )
                        })
                        .collect();
                    let y = skymoe_kernels::grouped_swiglu_to_sink(
                        &x_sorted, &weights, &offsets, &sink,
                    )?;
                    routing.deferred_expert_grads = Some(DeferredExpertGrads { sink, weights });
                    y
                } else {
                    let (w13, w2) = self.stacked_expert_weights(&active)?;
                    skymoe_kernels::grouped_swiglu(&x_sorted, &w13, &w2, &offsets)?
                };
                let w = flat_weights.index_select(&slots, 0)?.unsqueeze(1)?;
                out = out.index_add(&rows, &y.broadcast_mul(&w)?, 0)?;
            }
        } else {
            out = self.experts_one_by_one(&groups, &expert_input, &flat_weights, out)?;
        }
        out = self.add_shared(out, &xe, shared_gate.as_ref())?;
        if let (Some(tp), Some(joined)) = (&self.tp, &joined) {
            // Keep the `copy_in` in the graph even when none of this rank's experts received a
            // token, so that its backward all-reduce runs on every rank.
            // (A zero tensor, not the constant 0: backprop prunes affine ops scaling by zero.)
            let sum = joined.sum_all()?;
            let anchor = sum.mul(&sum.zeros_like()?)?;
            out = tp.reduce_out(&out.broadcast_add(&anchor)?)?;
        }
        Ok((out.reshape(dims)?, routing))
    }

    /// Whether the local experts can run as one grouped operation: none has a bias, every
    /// gate and up projection is `[ffn, hidden]` and every down projection `[hidden, ffn]`,
    /// as the first expert's.
    fn experts_groupable(&self) -> bool {
        let Some(first) = self.experts.first() else {
            return false;
        };
        let (gate, down) = (first.gate.weight.dims(), first.down.weight.dims());
        let transposed = matches!((gate, down), (&[f, h], &[h2, f2]) if f == f2 && h == h2);
        transposed
            && self.experts.iter().all(|expert| {
                [&expert.gate, &expert.up, &expert.down]
                    .iter()
                    .all(|l| l.bias.is_none())
                    && expert.gate.weight.dims() == gate
                    && expert.up.weight.dims() == gate
                    && expert.down.weight.dims() == down
            })
    }

    /// The local experts at positions `which` stacked for [`skymoe_kernels::grouped_swiglu`]:
    /// gate over up projection per expert (`[experts, 2·ffn, hidden]`) and the down
    /// projections (`[experts, hidden, ffn]`), in the autograd graph. For
    /// [`Self::experts_groupable`] experts.
    fn stacked_expert_weights(&self, which: &[usize]) -> Result<(Tensor, Tensor)> {
        let mut w13 = Vec::with_capacity(2 * which.len());
        let mut w2 = Vec::with_capacity(which.len());
        for expert in which.iter().filter_map(|&j| self.experts.get(j)) {
            w13.push(expert.gate.weight.clone());
            w13.push(expert.up.weight.clone());
            w2.push(expert.down.weight.clone());
        }
        let w13 = Tensor::cat(&w13, 0)?;
        let (rows, hidden) = w13.dims2()?;
        let e = w2.len().max(1);
        Ok((w13.reshape((e, rows / e, hidden))?, Tensor::stack(&w2, 0)?))
    }

    /// The local experts one after the other, each on the rows routed to it, combined into
    /// `out`.
    fn experts_one_by_one(
        &self,
        groups: &[(Vec<u32>, Vec<u32>)],
        expert_input: &Tensor,
        flat_weights: &Tensor,
        mut out: Tensor,
    ) -> Result<Tensor> {
        let dev = expert_input.device();
        for (expert, &e) in self.experts.iter().zip(&self.expert_ids) {
            let Some((rows, slots)) = groups.get(e).filter(|g| !g.0.is_empty()) else {
                continue;
            };
            let n = rows.len();
            let rows = Tensor::from_vec(rows.clone(), n, dev)?;
            let slots = Tensor::from_vec(slots.clone(), n, dev)?;
            let y = expert.forward(&expert_input.index_select(&rows, 0)?)?;
            let w = flat_weights.index_select(&slots, 0)?.unsqueeze(1)?;
            out = out.index_add(&rows, &y.broadcast_mul(&w)?, 0)?;
        }
        Ok(out)
    }

    /// Expert parallelism across ranks holding different tokens: send each kept assignment's
    /// input row to the rank of its expert, run this rank's experts on what arrives, send the
    /// outputs back and combine them with the routing weights into `out`.
    fn dispatch_to_ranks(
        &self,
        ep: &ExpertParallel,
        routing: &Routing,
        expert_input: &Tensor,
        flat_weights: &Tensor,
        out: Tensor,
        share: Option<(usize, usize)>,
    ) -> Result<Tensor> {
        let dev = expert_input.device();
        let h = expert_input.dim(1)?;
        let n = ep.size();
        let per = self.num_experts / n;
        let mut groups = group_by_expert(
            &routing.experts,
            &routing.kept,
            routing.top_k,
            self.num_experts,
        );
        if let Some((rank, size)) = share {
            // This rank dispatches the rows `r` with `r mod size = rank`.
            for (rows, slots) in groups.iter_mut() {
                let keep: Vec<bool> = rows.iter().map(|&r| r as usize % size == rank).collect();
                let mut k = keep.iter();
                rows.retain(|_| *k.next().unwrap_or(&false));
                let mut k = keep.iter();
                slots.retain(|_| *k.next().unwrap_or(&false));
            }
        }
        // Rows in the order of their experts (so of their destination ranks).
        let (mut rows, mut slots, mut counts) = (Vec::new(), Vec::new(), Vec::new());
        let mut send_rows = vec![0usize; n];
        for (e, (r, s)) in groups.iter().enumerate() {
            counts.push(r.len());
            send_rows[e / per] += r.len();
            rows.extend_from_slice(r);
            slots.extend_from_slice(s);
        }
        let received = ep.exchange_counts(&counts, per)?;
        let recv_rows: Vec<usize> = (0..n)
            .map(|src| received[src * per..(src + 1) * per].iter().sum())
            .collect();
        let sent = rows.len();
        // Every message carries one padding row after the real ones, so that no tensor on
        // the path is empty (backprop skips empty tensors, and every rank must run both
        // exchanges' backward, in the same order).
        let pad = Tensor::zeros((1, h), expert_input.dtype(), dev)?;
        let mut pieces = Vec::with_capacity(2 * n);
        let mut at = 0u32;
        for &c in &send_rows {
            let idx: Vec<u32> = (at..at + c as u32).map(|r| rows[r as usize]).collect();
            if c > 0 {
                pieces.push(expert_input.index_select(&Tensor::from_vec(idx, c, dev)?, 0)?);
            }
            pieces.push(pad.clone());
            at += c as u32;
        }
        let x_send = Tensor::cat(&pieces, 0)?;
        let plus_one = |v: &[usize]| v.iter().map(|c| c + 1).collect::<Vec<_>>();
        let x_recv = ep.exchange(&x_send, plus_one(&send_rows), plus_one(&recv_rows))?;
        // Received rows: from each source, this rank's experts in order, then the padding.
        let total = x_recv.dim(0)?;
        let mut y_recv = Tensor::zeros((total, h), x_recv.dtype(), dev)?;
        for (j, expert) in self.experts.iter().enumerate() {
            let mut idx = Vec::new();
            let mut offset = 0;
            for src in 0..n {
                let before: usize = received[src * per..src * per + j].iter().sum();
                let c = received[src * per + j];
                idx.extend((offset + before..offset + before + c).map(|x| x as u32));
                offset += recv_rows[src] + 1;
            }
            if idx.is_empty() {
                continue;
            }
            let k = idx.len();
            let idx = Tensor::from_vec(idx, k, dev)?;
            let y = expert.forward(&x_recv.index_select(&idx, 0)?)?;
            y_recv = y_recv.index_add(&idx, &y, 0)?;
        }
        // Tie each exchange's output into what follows with a zero-valued term (a zero tensor,
        // not the constant 0, which backprop prunes) so that its backward always runs.
        let tie = |t: &Tensor| -> Result<Tensor> {
            let s = t.sum_all()?;
            s.mul(&s.zeros_like()?)
        };
        let y_recv = y_recv.broadcast_add(&tie(&x_recv)?)?;
        let y_back = ep.exchange(&y_recv, plus_one(&recv_rows), plus_one(&send_rows))?;
        let mut out = out.broadcast_add(&tie(&y_back)?)?;
        if sent > 0 {
            // The real rows of what came back, in the order they were sent.
            let mut real = Vec::with_capacity(sent);
            let mut offset = 0u32;
            for &c in &send_rows {
                real.extend(offset..offset + c as u32);
                offset += c as u32 + 1;
            }
            let y = y_back.index_select(&Tensor::from_vec(real, sent, dev)?, 0)?;
            let rows = Tensor::from_vec(rows, sent, dev)?;
            let w = flat_weights
                .index_select(&Tensor::from_vec(slots, sent, dev)?, 0)?
                .unsqueeze(1)?;
            out = out.index_add(&rows, &y.broadcast_mul(&w)?, 0)?;
        }
        Ok(out)
    }
}
