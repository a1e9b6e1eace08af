//! A linear layer `y = x Wᵀ + b` with the weight stored `[out, in]` as in PyTorch.

use candle_core::{Result, Tensor};

/// A dense projection.
#[derive(Debug, Clone)]
pub struct Linear {
    /// Weight `[out, in]`.
    pub weight: Tensor,
    /// Optional bias `[out]`.
    pub bias: Option<Tensor>,
}

impl Linear {
    /// A projection from its weight and optional bias.
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Self {
        Linear { weight, bias }
    }

    /// Apply to `x` of shape `[..., in]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = self.forward_without_bias(x)?;
        self.add_bias(&y)
    }

    /// Add the bias (if any) to `y` of shape `[..., out]`.
    pub fn add_bias(&self, y: &Tensor) -> Result<Tensor> {
        match &self.bias {
            Some(b) => y.broadcast_add(b),
            None => Ok(y.clone()),
        }
    }

    /// `x Wᵀ` without the bias (a row-parallel projection adds it after the reduction).
    pub fn forward_without_bias(&self, x: &Tensor) -> Result<Tensor> {
        let dims = x.dims().to_vec();
        let last = *dims.last().unwrap_or(&0);
        let rows = x.elem_count() / last.max(1);
        let x2 = x.reshape((rows, last))?;
        let y = x2.matmul(&self.weight.t()?)?;
        let mut out_dims = dims;
        if let Some(l) = out_dims.last_mut() {
            *l = self.weight.dim(0)?;
        }
        y.reshape(out_dims)
    }
}
