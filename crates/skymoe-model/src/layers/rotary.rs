//! Rotary position embedding in Hugging Face's "rotate_half" layout, as differentiable tensor
//! ops. The frequencies (default or scaled) come from [`RopeSpec`].

use candle_core::{Device, Result, Tensor};

use super::rope::{RopeSpec, RopeTable};
use crate::config::ModelConfig;

/// Precomputed cos/sin tables `[positions, head_dim]`, and the rotary spec they came from
/// (dynamic NTK computes other tables for passes that end beyond `max_position_embeddings`).
#[derive(Debug, Clone)]
pub struct RotaryEmbedding {
    cos: Tensor,
    sin: Tensor,
    spec: RopeSpec,
}

/// A table's `[rows, head_dim]` cos and sin tensors (each half-row repeated, as
/// `cat(freqs, freqs)` in transformers).
fn tensors(t: &RopeTable, device: &Device) -> Result<(Tensor, Tensor)> {
    let rows = t.rows();
    let widen = |half_rows: &[f32]| -> Vec<f32> {
        let mut out = Vec::with_capacity(half_rows.len() * 2);
        for row in half_rows.chunks_exact(t.half.max(1)) {
            out.extend_from_slice(row);
            out.extend_from_slice(row);
        }
        out
    };
    Ok((
        Tensor::from_vec(widen(&t.cos), (rows, 2 * t.half), device)?,
        Tensor::from_vec(widen(&t.sin), (rows, 2 * t.half), device)?,
    ))
}

impl RotaryEmbedding {
    /// Default (unscaled) tables for positions `0..max_positions` of heads `head_dim` wide.
    pub fn new(head_dim: usize, theta: f64, max_positions: usize, device: &Device) -> Result<Self> {
        Self::from_spec(
            RopeSpec {
                head_dim,
                theta,
                max_position_embeddings: max_positions.max(1),
                scaling: super::rope::RopeScaling::Default,
            },
            device,
        )
    }

    /// The rotary embedding of a model configuration, scaling included.
    pub fn from_config(config: &ModelConfig, device: &Device) -> Result<Self> {
        Self::from_spec(RopeSpec::from_config(config), device)
    }

    /// Tables for `spec`, covering positions `0..spec.max_positions()`.
    pub fn from_spec(spec: RopeSpec, device: &Device) -> Result<Self> {
        let (cos, sin) = tensors(&spec.table(), device)?;
        Ok(RotaryEmbedding { cos, sin, spec })
    }

    /// Number of positions the tables cover (the longest sequence accepted).
    pub fn max_positions(&self) -> usize {
        self.cos.dims()[0]
    }

    /// The spec the tables were computed from.
    pub fn spec(&self) -> &RopeSpec {
        &self.spec
    }

    /// Rotate `x` of shape `[batch, heads, seq, head_dim]` whose first position is `offset`.
    /// With dynamic NTK, a pass ending beyond `max_position_embeddings` is rotated with the
    /// base for its end `offset + seq` (see the module docs of [`super::rope`]).
    pub fn apply(&self, x: &Tensor, offset: usize) -> Result<Tensor> {
        let (cos, sin) = self.tables(offset, x.dim(2)?, x.device())?;
        skymoe_kernels::rope(x, &cos, &sin)
    }

    /// Rotate `x` of shape `[batch, seq, heads, head_dim]` (a projection split into heads)
    /// into `[batch, heads, seq, head_dim]`: [`RotaryEmbedding::apply`] of its transpose,
    /// without copying the transpose first.
    pub fn apply_to_heads(&self, x: &Tensor, offset: usize) -> Result<Tensor> {
        let (cos, sin) = self.tables(offset, x.dim(1)?, x.device())?;
        skymoe_kernels::rope_to_heads(x, &cos, &sin)
    }

    /// The cos and sin rows of positions `offset .. offset + seq`.
    fn tables(&self, offset: usize, seq: usize, device: &Device) -> Result<(Tensor, Tensor)> {
        if let Some(t) = self.spec.span_table(offset, seq) {
            return tensors(&t, device);
        }
        Ok((
            self.cos.narrow(0, offset, seq)?,
            self.sin.narrow(0, offset, seq)?,
        ))
    }
}
