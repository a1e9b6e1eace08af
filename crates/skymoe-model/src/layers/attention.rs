//! Causal multi-head attention with grouped-query heads, RoPE and an optional KV cache.

use candle_core::{Result, Tensor};

use super::linear::Linear;
use super::rotary::RotaryEmbedding;
use crate::parallel::TensorParallel;

/// Keys and values of the positions seen so far, for one layer: `[batch, kv_heads, seq, head_dim]`.
#[derive(Debug, Clone)]
pub struct LayerKv {
    /// Cached keys (after RoPE).
    pub k: Tensor,
    /// Cached values.
    pub v: Tensor,
}

/// The attention block of one decoder layer.
#[derive(Debug, Clone)]
pub struct Attention {
    /// Query projection `[heads·head_dim, hidden]`.
    pub q_proj: Linear,
    /// Key projection `[kv_heads·head_dim, hidden]`.
    pub k_proj: Linear,
    /// Value projection `[kv_heads·head_dim, hidden]`.
    pub v_proj: Linear,
    /// Output projection `[hidden, heads·head_dim]`.
    pub o_proj: Linear,
    /// Query heads (on this rank, under tensor parallelism).
    pub num_heads: usize,
    /// Key/value heads (on this rank).
    pub num_kv_heads: usize,
    /// The tensor-parallel group the heads are split over, if any.
    pub tp: Option<TensorParallel>,
    /// Head width.
    pub head_dim: usize,
}

impl Attention {
    /// Attend over `x` of shape `[batch, seq, hidden]` whose first position is `offset`
    /// (the length of `cache`, if any). Appends this call's keys and values to `cache`.
    pub fn forward(
        &self,
        x: &Tensor,
        rotary: &RotaryEmbedding,
        offset: usize,
        cache: Option<&mut Option<LayerKv>>,
    ) -> Result<Tensor> {
        let (b, t, _) = x.dims3()?;
        let (nh, nkv, hd) = (self.num_heads, self.num_kv_heads, self.head_dim);
        let x = &match &self.tp {
            Some(tp) => tp.copy_in(x)?,
            None => x.clone(),
        };
        let q = self
            .q_proj
            .forward(x)?
            .reshape((b, t, nh, hd))?
            .transpose(1, 2)?
            .contiguous()?;
        let k = self
            .k_proj
            .forward(x)?
            .reshape((b, t, nkv, hd))?
            .transpose(1, 2)?
            .contiguous()?;
        let v = self
            .v_proj
            .forward(x)?
            .reshape((b, t, nkv, hd))?
            .transpose(1, 2)?
            .contiguous()?;
        let q = rotary.apply(&q, offset)?;
        let mut k = rotary.apply(&k, offset)?;
        let mut v = v;
        if let Some(slot) = cache {
            if let Some(prev) = slot.as_ref() {
                k = Tensor::cat(&[&prev.k, &k], 2)?;
                v = Tensor::cat(&[&prev.v, &v], 2)?;
            }
            *slot = Some(LayerKv {
                k: k.clone(),
                v: v.clone(),
            });
        }
        let s = k.dim(2)?;
        let scale = 1.0 / (hd as f64).sqrt();
        let out = skymoe_kernels::causal_attention(&q, &k, &v, scale, s - t)?;
        match &self.tp {
            Some(tp) => {
                let partial = self.o_proj.forward_without_bias(&out)?;
                self.o_proj.add_bias(&tp.reduce_out(&partial)?)
            }
            None => self.o_proj.forward(&out),
        }
    }
}
