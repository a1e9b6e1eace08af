//! Losses: next-token cross-entropy (the fused kernel of `skymoe-kernels`, with backward).

use candle_core::{Result, Tensor};

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
