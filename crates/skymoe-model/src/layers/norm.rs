//! RMSNorm as in Hugging Face Llama: `w · x / sqrt(mean(x²) + eps)`, computed in f32.

use candle_core::{Result, Tensor};

/// Root-mean-square layer normalisation.
#[derive(Debug, Clone)]
pub struct RmsNorm {
    /// Scale `[hidden]`.
    pub weight: Tensor,
    /// Epsilon added to the mean square.
    pub eps: f64,
}

impl RmsNorm {
    /// A norm from its scale and epsilon.
    pub fn new(weight: Tensor, eps: f64) -> Self {
        RmsNorm { weight, eps }
    }

    /// Normalise over the last dimension.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        skymoe_kernels::rms_norm(x, &self.weight, self.eps)
    }
}
