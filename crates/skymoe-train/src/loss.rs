//! Losses: next-token cross-entropy (composed from differentiable ops).

use candle_core::{Result, Tensor, D};

/// `log_softmax` over the last dimension: `x − max − log Σ exp(x − max)`.
pub fn log_softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?.detach();
    let shifted = x.broadcast_sub(&max)?;
    let lse = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?;
    shifted.broadcast_sub(&lse)
}

/// Mean cross-entropy of `logits` `[n, vocab]` against `targets` `[n]` (u32 ids); fused on
/// CPU, with backward.
pub fn cross_entropy(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    skymoe_kernels::cross_entropy(logits, targets)
}

/// Mean next-token cross-entropy of a sequence: position `i` predicts token `i + 1`.
pub fn next_token_loss(logits: &Tensor, tokens: &[u32]) -> Result<Tensor> {
    let n = tokens.len();
    if n < 2 {
        candle_core::bail!("next-token loss needs at least two tokens, got {n}");
    }
    let targets = Tensor::from_vec(tokens[1..].to_vec(), n - 1, logits.device())?;
    cross_entropy(&logits.narrow(0, 0, n - 1)?, &targets)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn cross_entropy_matches_hand_computation() -> Result<()> {
        let logits = Tensor::new(&[[1.0f32, 2.0, 3.0], [0.0, 0.0, 0.0]], &Device::Cpu)?;
        let targets = Tensor::new(&[2u32, 0], &Device::Cpu)?;
        let got = cross_entropy(&logits, &targets)?.to_scalar::<f32>()?;
        let l0 = -(3.0f32 - (1f32.exp() + 2f32.exp() + 3f32.exp()).ln());
        let l1 = 3f32.ln();
        assert!((got - (l0 + l1) / 2.0).abs() < 1e-6);
        Ok(())
    }
}
