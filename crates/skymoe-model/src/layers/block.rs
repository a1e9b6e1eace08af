//! One decoder layer: pre-norm attention and pre-norm feed-forward (dense or MoE), each with a
//! residual connection.

use candle_core::{Result, Tensor};

use super::attention::{AttentionBlock, LayerKv};
use super::ffn::SwiGlu;
use super::moe::MoeBlock;
use super::norm::RmsNorm;
use super::rotary::RotaryEmbedding;
use super::router::Routing;
use crate::parallel::TensorParallel;

/// The feed-forward half of a layer.
#[derive(Debug, Clone)]
pub enum FeedForward {
    /// A dense SwiGLU.
    Dense(SwiGlu),
    /// A sparse MoE block.
    Moe(Box<MoeBlock>),
}

/// A decoder layer.
#[derive(Debug, Clone)]
pub struct DecoderLayer {
    /// Norm before attention.
    pub input_norm: RmsNorm,
    /// Self-attention.
    pub attention: AttentionBlock,
    /// Norm before the feed-forward block.
    pub post_attention_norm: RmsNorm,
    /// Feed-forward block.
    pub ffn: FeedForward,
    /// The tensor-parallel group a dense FFN's columns are split over, if any.
    pub tp: Option<TensorParallel>,
}

impl DecoderLayer {
    /// Apply to `x` `[batch, seq, hidden]`; returns the new residual stream and, for an MoE
    /// layer, its routing. `capacity_factor` limits tokens per expert (`None`: dropless).
    pub fn forward(
        &self,
        x: &Tensor,
        rotary: &RotaryEmbedding,
        offset: usize,
        cache: Option<&mut Option<LayerKv>>,
        capacity_factor: Option<f64>,
    ) -> Result<(Tensor, Option<Routing>)> {
        let a = self
            .attention
            .forward(&self.input_norm.forward(x)?, rotary, offset, cache)?;
        let x = (x + a)?;
        let h = self.post_attention_norm.forward(&x)?;
        let (f, routing) = match &self.ffn {
            FeedForward::Dense(ffn) => match &self.tp {
                Some(tp) => (tp.reduce_out(&ffn.forward(&tp.copy_in(&h)?)?)?, None),
                None => (ffn.forward(&h)?, None),
            },
            FeedForward::Moe(moe) => {
                let (y, r) = moe.forward_with_capacity(&h, capacity_factor)?;
                (y, Some(r))
            }
        };
        Ok(((x + f)?, routing))
    }
}
