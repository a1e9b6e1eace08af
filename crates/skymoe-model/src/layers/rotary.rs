//! Rotary position embedding in Hugging Face's "rotate_half" layout.

use candle_core::{DType, Device, Result, Tensor};

/// Precomputed cos/sin tables.
#[derive(Debug, Clone)]
pub struct RotaryEmbedding {
    cos: Tensor,
    sin: Tensor,
}

impl RotaryEmbedding {
    /// Tables for positions `0..max_positions` of heads of width `head_dim`.
    pub fn new(head_dim: usize, theta: f64, max_positions: usize, device: &Device) -> Result<Self> {
        let half = head_dim / 2;
        // As in transformers: inv_freq = 1 / theta^(2i/d) in f32, angle = pos * inv_freq in f32.
        let inv_freq: Vec<f32> = (0..half)
            .map(|i| 1.0f32 / (theta as f32).powf((2 * i) as f32 / head_dim as f32))
            .collect();
        let mut cos = Vec::with_capacity(max_positions * head_dim);
        let mut sin = Vec::with_capacity(max_positions * head_dim);
        for p in 0..max_positions {
            for rep in 0..2 {
                let _ = rep;
                for f in &inv_freq {
                    let a = p as f32 * f;
                    cos.push(a.cos());
                    sin.push(a.sin());
                }
            }
        }
        Ok(RotaryEmbedding {
            cos: Tensor::from_vec(cos, (max_positions, head_dim), device)?.to_dtype(DType::F32)?,
            sin: Tensor::from_vec(sin, (max_positions, head_dim), device)?.to_dtype(DType::F32)?,
        })
    }

    /// Number of positions the tables cover.
    pub fn max_positions(&self) -> usize {
        self.cos.dims()[0]
    }

    /// Rotate `x` of shape `[batch, heads, seq, head_dim]` whose first position is `offset`.
    pub fn apply(&self, x: &Tensor, offset: usize) -> Result<Tensor> {
        let seq = x.dim(2)?;
        let cos = self.cos.narrow(0, offset, seq)?;
        let sin = self.sin.narrow(0, offset, seq)?;
        skymoe_kernels::rope(x, &cos, &sin)
    }
}
