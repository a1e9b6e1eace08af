//! Plain compositions of candle ops: the definitions the fused kernels are tested against, and
//! the fallback on devices without a fused kernel.

use candle_core::{Result, Tensor, D};

/// `w · x / sqrt(mean(x²) + eps)` over the last dimension.
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    let ms = x.sqr()?.mean_keepdim(D::Minus1)?;
    let inv = (ms + eps)?.sqrt()?.recip()?;
    x.broadcast_mul(&inv)?.broadcast_mul(w)
}

/// Softmax over the last dimension.
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?.detach();
    let e = x.broadcast_sub(&max)?.exp()?;
    let sum = e.sum_keepdim(D::Minus1)?;
    e.broadcast_div(&sum)
}

/// Softmax over the last dimension of `[..., t, s]` scores where query row `i` sees keys
/// `0..=offset + i` only (`offset = s − t` for a KV cache of `s − t` positions).
pub fn causal_softmax(x: &Tensor, offset: usize) -> Result<Tensor> {
    let dims = x.dims();
    let (t, s) = (dims[dims.len() - 2], dims[dims.len() - 1]);
    let mask: Vec<f32> = (0..t)
        .flat_map(|i| {
            (0..s).map(move |j| {
                if j > offset + i {
                    f32::NEG_INFINITY
                } else {
                    0.0
                }
            })
        })
        .collect();
    let mask = Tensor::from_vec(mask, (t, s), x.device())?.to_dtype(x.dtype())?;
    softmax_last_dim(&x.broadcast_add(&mask)?)
}

/// `silu(a) · b`.
pub fn silu_mul(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    a.silu()? * b
}

/// Mean cross-entropy of `logits [n, v]` against `targets [n]` (u32).
pub fn cross_entropy(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let max = logits.max_keepdim(D::Minus1)?.detach();
    let shifted = logits.broadcast_sub(&max)?;
    let lse = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?;
    let logp = shifted.broadcast_sub(&lse)?;
    logp.gather(&targets.unsqueeze(1)?, 1)?.mean_all()?.neg()
}

/// RoPE, "rotate_half" layout: `x · cos + rotate_half(x) · sin` with `rotate_half([a, b]) =
/// [−b, a]`; `cos`/`sin` are `[seq, head_dim]`.
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let d = x.dim(D::Minus1)?;
    let half = d / 2;
    let x1 = x.narrow(D::Minus1, 0, half)?;
    let x2 = x.narrow(D::Minus1, half, half)?;
    let rotated = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
    x.broadcast_mul(cos)? + rotated.broadcast_mul(sin)?
}
