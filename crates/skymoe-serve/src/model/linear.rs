//! A projection `y = x Wᵀ + b` over a quantised weight.

use skymoe_kernels::quant::QMatrix;

use super::ops::add_bias;

/// A (possibly stacked) projection with an optional f32 bias.
#[derive(Debug, Clone)]
pub struct QLinear {
    /// Weight `[out, in]`.
    pub weight: QMatrix,
    /// Bias `[out]`.
    pub bias: Option<Vec<f32>>,
}

impl QLinear {
    /// Apply to `m` rows of `x` (`[m, in]`); returns `[m, out]`.
    pub fn forward(&self, x: &[f32], m: usize) -> Vec<f32> {
        let mut y = vec![0f32; m * self.weight.rows()];
        self.weight.matmul(x, m, &mut y);
        if let Some(b) = &self.bias {
            add_bias(&mut y, b);
        }
        y
    }

    /// Output features.
    pub fn out_features(&self) -> usize {
        self.weight.rows()
    }
}
