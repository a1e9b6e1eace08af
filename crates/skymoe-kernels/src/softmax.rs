//! Softmax over the last dimension (optionally with a causal mask), fused, with backward
//! `dx = y · (g − Σ g·y)`.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use crate::cpu::{slice, PARALLEL_MIN_ELEMS};
use crate::rows::{softmax_backward_row, softmax_row};
use crate::{fused_ok, reference};

/// Softmax whose row `r` sees `visible(r)` leading entries.
struct Softmax {
    /// `Some((t, offset))`: causal over `[.., t, s]` rows, row `i` (mod t) sees `offset + i + 1`.
    causal: Option<(usize, usize)>,
}

impl Softmax {
    fn visible(&self, row: usize, width: usize) -> usize {
        match self.causal {
            Some((t, offset)) => (offset + row % t + 1).min(width),
            None => width,
        }
    }
}

impl CustomOp1 for Softmax {
    fn name(&self) -> &'static str {
        "skymoe-softmax"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = slice(s, l)?;
        let width = *l.dims().last().unwrap_or(&1);
        let mut out = x.to_vec();
        let run = |(r, row): (usize, &mut [f32])| softmax_row(row, self.visible(r, width));
        if out.len() >= PARALLEL_MIN_ELEMS {
            out.par_chunks_mut(width).enumerate().for_each(run);
        } else {
            out.chunks_mut(width).enumerate().for_each(run);
        }
        Ok((CpuStorage::F32(out), l.shape().clone()))
    }

    fn bwd(&self, _arg: &Tensor, res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let g = grad.contiguous()?;
        Ok(Some(res.apply_op2_no_bwd(&g, &SoftmaxBackward)?))
    }
}

/// `dx = y · (g − Σ g·y)` row by row.
struct SoftmaxBackward;

impl CustomOp2 for SoftmaxBackward {
    fn name(&self) -> &'static str {
        "skymoe-softmax-bwd"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let y = slice(s1, l1)?;
        let g = slice(s2, l2)?;
        let width = *l1.dims().last().unwrap_or(&1);
        let mut out = vec![0.0f32; y.len()];
        let run = |((o, y), g): ((&mut [f32], &[f32]), &[f32])| {
            o.copy_from_slice(g);
            softmax_backward_row(o, y, width);
        };
        if out.len() >= PARALLEL_MIN_ELEMS {
            out.par_chunks_mut(width)
                .zip(y.par_chunks(width))
                .zip(g.par_chunks(width))
                .for_each(run);
        } else {
            out.chunks_mut(width)
                .zip(y.chunks(width))
                .zip(g.chunks(width))
                .for_each(run);
        }
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
}

/// Softmax over the last dimension, with backward.
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    if !fused_ok(&[x]) {
        return reference::softmax_last_dim(x);
    }
    x.contiguous()?.apply_op1(Softmax { causal: None })
}

/// Causal softmax over the last dimension of `[..., t, s]` scores: query row `i` sees keys
/// `0..=offset + i`; masked entries are exactly 0. With backward.
pub fn causal_softmax(x: &Tensor, offset: usize) -> Result<Tensor> {
    if !fused_ok(&[x]) || x.rank() < 2 {
        return reference::causal_softmax(x, offset);
    }
    let t = x.dims()[x.rank() - 2];
    x.contiguous()?.apply_op1(Softmax {
        causal: Some((t, offset)),
    })
}
