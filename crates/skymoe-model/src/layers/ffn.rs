//! The SwiGLU feed-forward network `down(silu(gate x) · up x)`: dense FFNs, routed experts and
//! shared experts alike (Mixtral/Skywork name the three matrices w1, w3, w2).

use candle_core::{Result, Tensor};

use super::linear::Linear;

/// A SwiGLU feed-forward network.
#[derive(Debug, Clone)]
pub struct SwiGlu {
    /// `gate_proj` / `w1`: `[ffn, hidden]`.
    pub gate: Linear,
    /// `up_proj` / `w3`: `[ffn, hidden]`.
    pub up: Linear,
    /// `down_proj` / `w2`: `[hidden, ffn]`.
    pub down: Linear,
}

impl SwiGlu {
    /// Apply to `x` of shape `[..., hidden]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let g = self.gate.forward(x)?;
        let u = self.up.forward(x)?;
        self.down.forward(&skymoe_kernels::silu_mul(&g, &u)?)
    }
}
