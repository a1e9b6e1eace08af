//! The MoE router: gate logits → (optional gating logit normalisation) → softmax → top-k →
//! (optional) renormalisation.

use candle_core::{DType, Result, Tensor, D};

use super::linear::Linear;
use super::ops::softmax_last_dim;
use crate::config::RouterConfig;

/// The gate network: one bias-free linear layer, or Linear → Tanh → Linear (Skywork
/// `moe_2layer_gate`).
#[derive(Debug, Clone)]
pub enum Gate {
    /// `z = W x`.
    Linear(Linear),
    /// `z = W₂ tanh(W₁ x)`.
    TwoLayer(Linear, Linear),
}

impl Gate {
    /// Gate logits `[tokens, experts]` for `x` `[tokens, hidden]`, in f32.
    pub fn logits(&self, x: &Tensor) -> Result<Tensor> {
        let x = x.to_dtype(DType::F32)?;
        match self {
            Gate::Linear(l) => l.forward(&x),
            Gate::TwoLayer(a, b) => b.forward(&a.forward(&x)?.tanh()?),
        }
    }
}

/// The outcome of routing a batch of tokens.
#[derive(Debug, Clone)]
pub struct Routing {
    /// Raw gate logits `[tokens, experts]`.
    pub logits: Tensor,
    /// Gate probabilities after normalisation and softmax `[tokens, experts]`.
    pub probs: Tensor,
    /// Selected experts, `top_k` per token, token-major, in descending probability.
    pub experts: Vec<u32>,
    /// Combine weights of the selected experts `[tokens, top_k]` (differentiable).
    pub weights: Tensor,
    /// Experts per token.
    pub top_k: usize,
}

/// A router: gate network plus routing rule.
#[derive(Debug, Clone)]
pub struct Router {
    /// The gate network.
    pub gate: Gate,
    /// The routing rule.
    pub config: RouterConfig,
    /// Experts per token.
    pub top_k: usize,
}

impl Router {
    /// Gating logit normalisation: `λ · (z − mean z) / std z` with the unbiased std.
    pub fn normalize_logits(z: &Tensor, lambda: f64) -> Result<Tensor> {
        let mean = z.mean_keepdim(D::Minus1)?;
        let std = z.var_keepdim(D::Minus1)?.sqrt()?;
        z.broadcast_sub(&mean)?.broadcast_div(&std)? * lambda
    }

    /// Route `x` `[tokens, hidden]`.
    pub fn route(&self, x: &Tensor) -> Result<Routing> {
        let logits = self.gate.logits(x)?;
        let z = match self.config.logits_norm_std {
            Some(lambda) => Self::normalize_logits(&logits, lambda)?,
            None => logits.clone(),
        };
        let probs = softmax_last_dim(&z)?;
        let experts = top_k_indices(&probs.detach().to_vec2::<f32>()?, self.top_k);
        let n = probs.dim(0)?;
        let idx = Tensor::from_vec(experts.clone(), (n, self.top_k), probs.device())?;
        let mut weights = probs.gather(&idx, 1)?;
        if self.config.normalize_top_k {
            let sum = weights.sum_keepdim(D::Minus1)?;
            weights = weights.broadcast_div(&sum)?;
        }
        Ok(Routing {
            logits,
            probs,
            experts,
            weights,
            top_k: self.top_k,
        })
    }
}

/// Indices of the `k` largest values of each row, in descending order; ties go to the lower
/// index (as a stable sort would).
pub fn top_k_indices(rows: &[Vec<f32>], k: usize) -> Vec<u32> {
    let mut out = Vec::with_capacity(rows.len() * k);
    let mut order: Vec<u32> = Vec::new();
    for row in rows {
        order.clear();
        order.extend(0..row.len() as u32);
        order.sort_by(|&a, &b| {
            row[b as usize]
                .partial_cmp(&row[a as usize])
                .unwrap_or(std::cmp::Ordering::Equal)
                .then(a.cmp(&b))
        });
        out.extend_from_slice(&order[..k.min(order.len())]);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn top_k_picks_largest_in_order_with_stable_ties() {
        let rows = vec![vec![0.1, 0.5, 0.2, 0.5], vec![0.9, 0.0, 0.05, 0.05]];
        assert_eq!(top_k_indices(&rows, 2), vec![1, 3, 0, 2]);
    }

    #[test]
    fn logits_norm_matches_hand_computation() -> Result<()> {
        let z = Tensor::new(&[[1.0f32, 2.0, 3.0, 6.0]], &candle_core::Device::Cpu)?;
        let got = Router::normalize_logits(&z, 2.0)?.to_vec2::<f32>()?;
        let mean = 3.0f32;
        let std = ((4.0 + 1.0 + 0.0 + 9.0) / 3.0f32).sqrt();
        for (g, v) in got[0].iter().zip([1.0f32, 2.0, 3.0, 6.0]) {
            assert!((g - 2.0 * (v - mean) / std).abs() < 1e-6);
        }
        Ok(())
    }
}
