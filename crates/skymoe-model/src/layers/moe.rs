//! The MoE feed-forward block: router → dispatch (tokens grouped by expert) → experts →
//! weighted combine, plus the optional sigmoid-gated shared expert of Qwen2-MoE.
//! Dropless: every token reaches all of its top-k experts.

use candle_core::{Result, Tensor};

use super::ffn::SwiGlu;
use super::linear::Linear;
use super::ops::sigmoid;
use super::router::{Router, Routing};

/// A shared expert that every token passes through, scaled by `sigmoid(gate x)`.
#[derive(Debug, Clone)]
pub struct SharedExpert {
    /// The expert.
    pub ffn: SwiGlu,
    /// The scalar gate `[1, hidden]`.
    pub gate: Linear,
}

/// A sparse MoE feed-forward block.
#[derive(Debug, Clone)]
pub struct MoeBlock {
    /// The router.
    pub router: Router,
    /// The routed experts.
    pub experts: Vec<SwiGlu>,
    /// The shared expert, if any.
    pub shared: Option<SharedExpert>,
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
        let expert_input = if self.router.config.multiply_input_by_top_k {
            (&xs * k as f64)?
        } else {
            xs.clone()
        };
        let flat_weights = routing.weights.flatten_all()?;
        let mut out = xs.zeros_like()?;
        let dev = xs.device();
        for (e, (rows, slots)) in
            group_by_expert(&routing.experts, &routing.kept, k, self.experts.len())
                .into_iter()
                .enumerate()
        {
            if rows.is_empty() {
                continue;
            }
            let n = rows.len();
            let rows = Tensor::from_vec(rows, n, dev)?;
            let slots = Tensor::from_vec(slots, n, dev)?;
            let y = self.experts[e].forward(&expert_input.index_select(&rows, 0)?)?;
            let w = flat_weights.index_select(&slots, 0)?.unsqueeze(1)?;
            out = out.index_add(&rows, &y.broadcast_mul(&w)?, 0)?;
        }
        if let Some(shared) = &self.shared {
            let s = shared.ffn.forward(&xs)?;
            let g = sigmoid(&shared.gate.forward(&xs)?)?;
            out = (out + s.broadcast_mul(&g)?)?;
        }
        Ok((out.reshape(dims)?, routing))
    }
}
