//! Rotary position embedding in Hugging Face's "rotate_half" layout, fused, with backward (the
//! rotation by the opposite angle).

use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use crate::cpu::{slice, PARALLEL_MIN_ELEMS};
use crate::{fused_ok, reference};

/// Rotate rows of `[.., seq, head_dim]` by the angles of their positions.
struct Rope {
    /// `cos[t, i]` for `i < head_dim / 2` (the second half repeats the first).
    cos: Vec<f32>,
    /// `sin[t, i]` likewise.
    sin: Vec<f32>,
    seq: usize,
    half: usize,
    /// Rotate by −θ (the backward pass).
    inverse: bool,
}

impl Rope {
    fn rotate(&self, x: &[f32], out: &mut [f32]) {
        let d = 2 * self.half;
        let sign = if self.inverse { -1.0 } else { 1.0 };
        let run = |(r, (o, x)): (usize, (&mut [f32], &[f32]))| {
            let t = r % self.seq;
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
            out.par_chunks_mut(d)
                .zip(x.par_chunks(d))
                .enumerate()
                .for_each(run);
        } else {
            out.chunks_mut(d).zip(x.chunks(d)).enumerate().for_each(run);
        }
    }
}

impl CustomOp1 for Rope {
    fn name(&self) -> &'static str {
        "skymoe-rope"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = slice(s, l)?;
        let mut out = vec![0.0f32; x.len()];
        self.rotate(x, &mut out);
        Ok((CpuStorage::F32(out), l.shape().clone()))
    }

    fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let inv = Rope {
            cos: self.cos.clone(),
            sin: self.sin.clone(),
            seq: self.seq,
            half: self.half,
            inverse: !self.inverse,
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
        || !dims[dims.len() - 1].is_multiple_of(2)
    {
        return reference::rope(x, cos, sin);
    }
    let (seq, d) = (dims[dims.len() - 2], dims[dims.len() - 1]);
    let half = d / 2;
    let first_half = |t: &Tensor| -> Result<Vec<f32>> {
        t.narrow(1, 0, half)?
            .contiguous()?
            .flatten_all()?
            .to_vec1::<f32>()
    };
    let op = Rope {
        cos: first_half(cos)?,
        sin: first_half(sin)?,
        seq,
        half,
        inverse: false,
    };
    x.contiguous()?.apply_op1(op)
}
