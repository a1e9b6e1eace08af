//! Causal multi-head attention with grouped-query heads, RoPE and an optional KV cache;
//! optionally an RMSNorm of q and k (per head or over the whole projection) and a clamp of
//! q, k and v.

use candle_core::{Result, Tensor};

use super::linear::Linear;
use super::norm::RmsNorm;
use super::rotary::RotaryEmbedding;
use crate::config::QkNorm;
use crate::parallel::TensorParallel;

/// What one layer keeps of the positions seen so far.
#[derive(Debug, Clone)]
pub enum LayerKv {
    /// Keys and values of the kv heads, each `[batch, kv_heads, seq, head_dim]`.
    Heads {
        /// Cached keys (after RoPE).
        k: Tensor,
        /// Cached values.
        v: Tensor,
    },
    /// Multi-head latent attention's normalised latents `[batch, seq, kv_lora_rank]` and
    /// rotary keys `[batch, 1, seq, qk_rope_head_dim]` (after RoPE).
    Latent {
        /// Cached latents.
        latent: Tensor,
        /// Cached rotary keys.
        rope_key: Tensor,
    },
}

/// The attention block of a decoder layer: grouped-query or multi-head latent attention.
#[derive(Debug, Clone)]
pub enum AttentionBlock {
    /// Grouped-query attention.
    Gqa(Attention),
    /// Multi-head latent attention (DeepSeek-V2/V3).
    Mla(super::mla::MlaAttention),
}

impl AttentionBlock {
    /// Attend over `x` `[batch, seq, hidden]` from position `offset`, appending to `cache`.
    pub fn forward(
        &self,
        x: &Tensor,
        rotary: &RotaryEmbedding,
        offset: usize,
        cache: Option<&mut Option<LayerKv>>,
    ) -> Result<Tensor> {
        match self {
            AttentionBlock::Gqa(a) => a.forward(x, rotary, offset, cache),
            AttentionBlock::Mla(a) => a.forward(x, rotary, offset, cache),
        }
    }
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
    /// How q and k are normalised before RoPE ([`QkNorm::None`]: not at all).
    pub qk_norm: QkNorm,
    /// The q and k norms (with [`QkNorm::PerHead`], weights of `head_dim`; with
    /// [`QkNorm::PerProjection`], of the whole projections).
    pub qk_norms: Option<(RmsNorm, RmsNorm)>,
    /// Clamp q, k and v to `±clip` after the projections and the q/k norm.
    pub clip_qkv: Option<f64>,
}

/// `x` with a norm applied over its last dimension; under tensor parallelism the norm's
/// weight is shared by the heads of every rank, so its gradient is summed over the group.
fn norm_last(x: &Tensor, norm: &RmsNorm, tp: Option<&TensorParallel>) -> Result<Tensor> {
    match tp {
        Some(tp) => RmsNorm::new(tp.copy_in(&norm.weight)?, norm.eps).forward(x),
        None => norm.forward(x),
    }
}

/// RMSNorm over the last dimension of a projection whose columns are split evenly over a
/// tensor-parallel group: `x · w / √(mean over all ranks' columns of x² + eps)`, with `norm`
/// holding this rank's part of the weight.
fn norm_across_ranks(x: &Tensor, norm: &RmsNorm, tp: &TensorParallel) -> Result<Tensor> {
    let width = x.dim(candle_core::D::Minus1)? * tp.size();
    let squares = tp.sum_shared(&x.sqr()?.sum_keepdim(candle_core::D::Minus1)?)?;
    let scale = ((squares / width as f64)? + norm.eps)?.sqrt()?.recip()?;
    x.broadcast_mul(&scale)?.broadcast_mul(&norm.weight)
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
        let (mut q, mut k, mut v) = (
            self.q_proj.forward(x)?,
            self.k_proj.forward(x)?,
            self.v_proj.forward(x)?,
        );
        let tp = self.tp.as_ref();
        match (&self.qk_norms, self.qk_norm) {
            (Some((qn, kn)), QkNorm::PerProjection) => match tp {
                None => {
                    q = qn.forward(&q)?;
                    k = kn.forward(&k)?;
                }
                // The norm spans every head: the sum of squares over this rank's heads is
                // summed over the group, then each rank scales its own heads.
                Some(tp) => {
                    q = norm_across_ranks(&q, qn, tp)?;
                    k = norm_across_ranks(&k, kn, tp)?;
                }
            },
            (Some((qn, kn)), QkNorm::PerHead) => {
                q = norm_last(&q.reshape((b, t, nh, hd))?, qn, tp)?.reshape((b, t, nh * hd))?;
                k = norm_last(&k.reshape((b, t, nkv, hd))?, kn, tp)?.reshape((b, t, nkv * hd))?;
            }
            _ => {}
        }
        if let Some(c) = self.clip_qkv {
            q = q.clamp(-c, c)?;
            k = k.clamp(-c, c)?;
            v = v.clamp(-c, c)?;
        }
        // Rotated straight into [batch, heads, seq, head_dim].
        let q = rotary.apply_to_heads(&q.reshape((b, t, nh, hd))?, offset)?;
        let mut k = rotary.apply_to_heads(&k.reshape((b, t, nkv, hd))?, offset)?;
        let mut v = v.reshape((b, t, nkv, hd))?.transpose(1, 2)?.contiguous()?;
        if let Some(slot) = cache {
            if let Some(LayerKv::Heads { k: pk, v: pv }) = slot.as_ref() {
                k = Tensor::cat(&[pk, &k], 2)?;
                v = Tensor::cat(&[pv, &v], 2)?;
            }
            *slot = Some(LayerKv::Heads {
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
