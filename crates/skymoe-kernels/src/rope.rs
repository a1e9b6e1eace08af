//! Rotary position embedding in Hugging Face's "rotate_half" layout, fused, with backward (the
//! rotation by the opposite angle).

use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use crate::cpu::{slice, PARALLEL_MIN_ELEMS};
use crate::{fused_ok, reference};

/// Where a row of the output reads its input: the same row (`[.., seq, head_dim]` in and
/// out), or with the sequence and head axes swapped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RowOrder {
    /// Output row r is input row r, at position r mod seq.
    Same,
    /// Input `[batch, seq, heads, head_dim]`, output `[batch, heads, seq, head_dim]`.
    ToHeads { heads: usize },
    /// Input `[batch, heads, seq, head_dim]`, output `[batch, seq, heads, head_dim]`.
    FromHeads { heads: usize },
}

impl RowOrder {
    /// The input row and the position of output row `r`, for sequences `seq` long.
    fn source(self, r: usize, seq: usize) -> (usize, usize) {
        match self {
            RowOrder::Same => (r, r % seq),
            RowOrder::ToHeads { heads } => {
                // r = (b·heads + h)·seq + t, read from (b·seq + t)·heads + h.
                let (bh, t) = (r / seq, r % seq);
                let (b, h) = (bh / heads, bh % heads);
                ((b * seq + t) * heads + h, t)
            }
            RowOrder::FromHeads { heads } => {
                // r = (b·seq + t)·heads + h, read from (b·heads + h)·seq + t.
                let (bt, h) = (r / heads, r % heads);
                let (b, t) = (bt / seq, bt % seq);
                ((b * heads + h) * seq + t, t)
            }
        }
    }

    /// The order that undoes this one (for the backward pass).
    fn inverse(self) -> Self {
        match self {
            RowOrder::Same => RowOrder::Same,
            RowOrder::ToHeads { heads } => RowOrder::FromHeads { heads },
            RowOrder::FromHeads { heads } => RowOrder::ToHeads { heads },
        }
    }
}

/// Rotate rows of `[.., seq, head_dim]` by the angles of their positions (reading them in
/// `order`).
struct Rope {
    /// `cos[t, i]` for `i < head_dim / 2` (the second half repeats the first).
    cos: Vec<f32>,
    /// `sin[t, i]` likewise.
    sin: Vec<f32>,
    seq: usize,
    half: usize,
    /// Rotate by −θ (the backward pass).
    inverse: bool,
    /// Where each output row is read from.
    order: RowOrder,
    /// The output's shape.
    out_shape: Shape,
}

impl Rope {
    fn rotate(&self, x: &[f32], out: &mut [f32]) {
        let d = 2 * self.half;
        let sign = if self.inverse { -1.0 } else { 1.0 };
        let run = |(r, o): (usize, &mut [f32])| {
            let (src, t) = self.order.source(r, self.seq);
            let x = &x[src * d..(src + 1) * d];
            let (c, s) = (
                &self.cos[t * self.half..(t + 1) * self.half],
                &self.sin[t * self.half..(t + 1) * self.half],
            );
            for i in 0..self.half {
                let (a, b) = (x[i], x[i + self.half]);
                let sn = sign * s[i];
                o[i] = a * c[i] - b * sn;
                o[i + self.half] = b * c[i] + a * sn;
            }
        };
        if x.len() >= PARALLEL_MIN_ELEMS {
            out.par_chunks_mut(d).enumerate().for_each(run);
        } else {
            out.chunks_mut(d).enumerate().for_each(run);
        }
    }
}

impl CustomOp1 for Rope {
    fn name(&self) -> &'static str {
        "skymoe-rope"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = slice(s, l)?;
        if self.out_shape.elem_count() != x.len() {
            candle_core::bail!("rope: {:?} does not fit {:?}", l.shape(), self.out_shape);
        }
        let mut out = vec![0.0f32; x.len()];
        self.rotate(x, &mut out);
        Ok((CpuStorage::F32(out), self.out_shape.clone()))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let inv = Rope {
            cos: self.cos.clone(),
            sin: self.sin.clone(),
            seq: self.seq,
            half: self.half,
            inverse: !self.inverse,
            order: self.order.inverse(),
            out_shape: arg.shape().clone(),
        };
        Ok(Some(grad.contiguous()?.apply_op1_no_bwd(&inv)?))
    }
}

/// Apply RoPE to `x` `[..., seq, head_dim]` with `cos`/`sin` tables `[seq, head_dim]` (the
/// rows of the positions of `x`, "rotate_half" layout: both halves equal), with backward to `x`.
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let dims = x.dims();
    if !fused_ok(&[x, cos, sin])
        || dims.len() < 2
        || cos.dims() != [dims[dims.len() - 2], dims[dims.len() - 1]]
        || dims[dims.len() - 1] == 0
        || !dims[dims.len() - 1].is_multiple_of(2)
    {
        return reference::rope(x, cos, sin);
    }
    let seq = dims[dims.len() - 2];
    rotate(x, cos, sin, seq, RowOrder::Same, x.shape().clone())
}

/// The forward rotation of `x` (rows of `head_dim`, even and non-zero, read in `order`) by the
/// first halves of the `[seq, head_dim]` tables, into `out_shape`, with its backward.
fn rotate(
    x: &Tensor,
    cos: &Tensor,
    sin: &Tensor,
    seq: usize,
    order: RowOrder,
    out_shape: Shape,
) -> Result<Tensor> {
    let half = cos.dim(1)? / 2;
    let half_rows = |t: &Tensor| -> Result<Vec<f32>> {
        t.narrow(1, 0, half)?
            .contiguous()?
            .flatten_all()?
            .to_vec1::<f32>()
    };
    let op = Rope {
        cos: half_rows(cos)?,
        sin: half_rows(sin)?,
        seq,
        half,
        inverse: false,
        order,
        out_shape,
    };
    x.contiguous()?.apply_op1(op)
}

/// [`rope`] of `x` `[batch, seq, heads, head_dim]` (a projection's output split into heads)
/// into `[batch, heads, seq, head_dim]`: the same as `rope(x.transpose(1, 2))` without the
/// copy that makes the transpose contiguous, in the forward or the backward pass.
pub fn rope_to_heads(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let &[batch, seq, heads, d] = x.dims() else {
        candle_core::bail!(
            "rope_to_heads: x {:?} is not [batch, seq, heads, head_dim]",
            x.dims()
        );
    };
    if !fused_ok(&[x, cos, sin]) || cos.dims() != [seq, d] || d == 0 || !d.is_multiple_of(2) {
        return rope(&x.transpose(1, 2)?.contiguous()?, cos, sin);
    }
    let out_shape = Shape::from((batch, heads, seq, d));
    rotate(x, cos, sin, seq, RowOrder::ToHeads { heads }, out_shape)
}
