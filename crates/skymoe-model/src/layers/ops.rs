//! Small composed tensor functions (all with backward through candle's autograd).

use candle_core::{Result, Tensor};

/// Softmax over the last dimension (fused on CPU, with backward).
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    skymoe_kernels::softmax_last_dim(x)
}

/// Logistic sigmoid `1 / (1 + exp(-x))`.
pub fn sigmoid(x: &Tensor) -> Result<Tensor> {
    (x.neg()?.exp()? + 1.0)?.recip()
}
