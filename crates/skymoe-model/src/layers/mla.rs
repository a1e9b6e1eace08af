//! Multi-head latent attention (DeepSeek-V2/V3), as differentiable tensor ops.
//!
//! Each token is projected to a latent of `kv_lora_rank` (normalised) and one rotary key of
//! `qk_rope_head_dim` shared by all heads; the cache keeps only these two. Keys and values of
//! every head are decompressed from the latent by `kv_b_proj`: a head's key is its
//! `qk_nope_head_dim` decompressed dimensions followed by the shared rotary key, its value
//! `v_head_dim` decompressed dimensions. Queries come from `q_proj`, or from the low-rank
//! `q_b_proj(norm(q_a_proj(x)))`, split the same way into plain and rotary dimensions.
//!
//! DeepSeek's checkpoints lay the rotary dimensions out as interleaved pairs; they are
//! de-interleaved (a fixed permutation applied to queries and keys alike, which leaves every
//! score unchanged) before the "rotate_half" rotary embedding shared with the other families.

use candle_core::{DType, Result, Tensor};

use super::attention::LayerKv;
use super::linear::Linear;
use super::norm::RmsNorm;
use super::rotary::RotaryEmbedding;
use crate::config::MlaConfig;

/// How queries are projected.
#[derive(Debug, Clone)]
pub enum MlaQuery {
    /// One projection `q_proj` `[heads·(nope + rope), hidden]`.
    Direct(Linear),
    /// `q_b_proj(q_a_layernorm(q_a_proj x))`: `[q_lora_rank, hidden]`, a norm of
    /// `q_lora_rank`, `[heads·(nope + rope), q_lora_rank]`.
    LowRank {
        /// `q_a_proj`.
        down: Linear,
        /// `q_a_layernorm`.
        norm: RmsNorm,
        /// `q_b_proj`.
        up: Linear,
    },
}

impl MlaQuery {
    /// The queries of `x`; `split` marks the input of the head-split projection (Megatron's
    /// *f* under tensor parallelism: the replicated part before it gets full gradients).
    fn forward(&self, x: &Tensor, split: impl Fn(&Tensor) -> Result<Tensor>) -> Result<Tensor> {
        match self {
            MlaQuery::Direct(q) => q.forward(&split(x)?),
            MlaQuery::LowRank { down, norm, up } => {
                up.forward(&split(&norm.forward(&down.forward(x)?)?)?)
            }
        }
    }
}

/// The latent attention block of one decoder layer.
#[derive(Debug, Clone)]
pub struct MlaAttention {
    /// The query projection(s).
    pub query: MlaQuery,
    /// `kv_a_proj_with_mqa` `[kv_lora_rank + rope, hidden]`: the latent, then the rotary key.
    pub kv_down: Linear,
    /// `kv_a_layernorm` over the latent.
    pub kv_norm: RmsNorm,
    /// `kv_b_proj` `[heads·(nope + v), kv_lora_rank]`: each head's plain key dimensions, then
    /// its value.
    pub kv_up: Linear,
    /// `o_proj` `[hidden, heads·v]`.
    pub o_proj: Linear,
    /// Query heads (on this rank, under tensor parallelism).
    pub num_heads: usize,
    /// The dimensions.
    pub dims: MlaConfig,
    /// Softmax scale of the scores.
    pub scale: f64,
    /// The tensor-parallel group the heads are split over, if any: each rank holds its heads'
    /// rows of `q_proj`/`q_b_proj` and `kv_b_proj` and columns of `o_proj`, and computes the
    /// latent, its norm and the rotary key (replicated) itself.
    pub tp: Option<crate::parallel::TensorParallel>,
}

/// The permutation taking interleaved pairs `(x0, x1), (x2, x3), …` to halves
/// `(x0, x2, …, x1, x3, …)`.
fn deinterleave_index(width: usize, device: &candle_core::Device) -> Result<Tensor> {
    let order: Vec<u32> = (0..width as u32)
        .step_by(2)
        .chain((1..width as u32).step_by(2))
        .collect();
    Tensor::from_vec(order, width, device)
}

impl MlaAttention {
    /// Rotate `x` `[batch, heads, seq, rope]` at positions from `offset`.
    fn rotate(&self, x: &Tensor, rotary: &RotaryEmbedding, offset: usize) -> Result<Tensor> {
        let x = if self.dims.rope_interleave {
            let idx = deinterleave_index(self.dims.qk_rope_head_dim, x.device())?;
            x.contiguous()?.index_select(&idx, 3)?
        } else {
            x.clone()
        };
        rotary.apply(&x.contiguous()?, offset)
    }

    /// Attend over `x` `[batch, seq, hidden]` whose first position is `offset` (the length of
    /// `cache`, if any). Appends this call's latents and rotary keys to `cache`.
    pub fn forward(
        &self,
        x: &Tensor,
        rotary: &RotaryEmbedding,
        offset: usize,
        cache: Option<&mut Option<LayerKv>>,
    ) -> Result<Tensor> {
        let (b, t, _) = x.dims3()?;
        let nh = self.num_heads;
        let d = self.dims;
        let (nope, rope, vd, r) = (
            d.qk_nope_head_dim,
            d.qk_rope_head_dim,
            d.v_head_dim,
            d.kv_lora_rank,
        );
        let dq = nope + rope;
        // Under tensor parallelism the latent, its norm and the rotary key are computed on
        // every rank; the gradients reaching them from this rank's heads are summed over the
        // group where they enter the head-split computation.
        let split = |t: &Tensor| -> Result<Tensor> {
            match &self.tp {
                Some(tp) => tp.copy_in(&t.contiguous()?),
                None => Ok(t.clone()),
            }
        };
        let q = self
            .query
            .forward(x, split)?
            .reshape((b, t, nh, dq))?
            .transpose(1, 2)?;
        let q_nope = q.narrow(3, 0, nope)?;
        let q_rot = self.rotate(&q.narrow(3, nope, rope)?, rotary, offset)?;
        let kv = self.kv_down.forward(x)?;
        let mut latent = self.kv_norm.forward(&kv.narrow(2, 0, r)?.contiguous()?)?;
        let k_rot = kv
            .narrow(2, r, rope)?
            .reshape((b, t, 1, rope))?
            .transpose(1, 2)?;
        let mut k_rot = self.rotate(&k_rot, rotary, offset)?;
        if let Some(slot) = cache {
            if let Some(LayerKv::Latent {
                latent: prev_latent,
                rope_key: prev_key,
            }) = slot.as_ref()
            {
                latent = Tensor::cat(&[prev_latent, &latent], 1)?;
                k_rot = Tensor::cat(&[prev_key, &k_rot], 2)?;
            }
            *slot = Some(LayerKv::Latent {
                latent: latent.clone(),
                rope_key: k_rot.clone(),
            });
        }
        let s = latent.dim(1)?;
        let (latent, k_rot) = (split(&latent)?, split(&k_rot)?);
        let kv_heads = self
            .kv_up
            .forward(&latent)?
            .reshape((b, s, nh, nope + vd))?
            .transpose(1, 2)?;
        let k_nope = kv_heads.narrow(3, 0, nope)?;
        let v = kv_heads.narrow(3, nope, vd)?;
        let k = Tensor::cat(&[&k_nope, &k_rot.broadcast_as((b, nh, s, rope))?], 3)?;
        let q = Tensor::cat(&[&q_nope, &q_rot], 3)?;
        // The fused attention takes one width for queries, keys and values: the narrower side
        // is padded with zeros (which add nothing to the scores, and to the outputs only
        // columns that are cut off again).
        let width = dq.max(vd);
        let pad = |x: &Tensor, from: usize, len: usize| -> Result<Tensor> {
            if from == width {
                return x.contiguous();
            }
            let zeros = Tensor::zeros((b, nh, len, width - from), DType::F32, x.device())?;
            Tensor::cat(&[x, &zeros], 3)?.contiguous()
        };
        let out = skymoe_kernels::causal_attention(
            &pad(&q, dq, t)?,
            &pad(&k, dq, s)?,
            &pad(&v, vd, s)?,
            self.scale,
            s - t,
        )?;
        let out = if width == vd {
            out
        } else {
            out.reshape((b, t, nh, width))?
                .narrow(3, 0, vd)?
                .reshape((b, t, nh * vd))?
        };
        match &self.tp {
            Some(tp) => tp.reduce_out(&self.o_proj.forward(&out)?),
            None => self.o_proj.forward(&out),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deinterleaving_takes_even_then_odd_positions() -> Result<()> {
        let idx = deinterleave_index(6, &candle_core::Device::Cpu)?;
        assert_eq!(idx.to_vec1::<u32>()?, vec![0, 2, 4, 1, 3, 5]);
        Ok(())
    }
}
