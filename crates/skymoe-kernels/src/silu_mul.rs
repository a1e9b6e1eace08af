//! The SwiGLU activation `silu(a) · b`, fused, with backward
//! `da = g · b · σ(a)·(1 + a·(1 − σ(a)))`, `db = g · silu(a)`.

use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use crate::cpu::{slice, PARALLEL_MIN_ELEMS};
use crate::{fused_ok, reference};

fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

const CHUNK: usize = 4096;

struct SiluMul;

impl CustomOp2 for SiluMul {
    fn name(&self) -> &'static str {
        "skymoe-silu-mul"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let a = slice(s1, l1)?;
        let b = slice(s2, l2)?;
        if a.len() != b.len() {
            candle_core::bail!(
                "silu_mul: shapes {:?} and {:?} differ",
                l1.dims(),
                l2.dims()
            );
        }
        let mut out = vec![0.0f32; a.len()];
        let run = |((o, a), b): ((&mut [f32], &[f32]), &[f32])| {
            for i in 0..o.len() {
                o[i] = a[i] * sigmoid(a[i]) * b[i];
            }
        };
        if a.len() >= PARALLEL_MIN_ELEMS {
            out.par_chunks_mut(CHUNK)
                .zip(a.par_chunks(CHUNK))
                .zip(b.par_chunks(CHUNK))
                .for_each(run);
        } else {
            out.chunks_mut(CHUNK)
                .zip(a.chunks(CHUNK))
                .zip(b.chunks(CHUNK))
                .for_each(run);
        }
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(
        &self,
        a: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let g = grad.contiguous()?;
        let da = a.apply_op3_no_bwd(b, &g, &SiluMulBackward { wrt_b: false })?;
        let db = a.apply_op3_no_bwd(b, &g, &SiluMulBackward { wrt_b: true })?;
        Ok((Some(da), Some(db)))
    }
}

/// One chunk of the backward pass: output, a, b, upstream gradient.
type BackwardChunk<'a> = (((&'a mut [f32], &'a [f32]), &'a [f32]), &'a [f32]);

struct SiluMulBackward {
    wrt_b: bool,
}

impl CustomOp3 for SiluMulBackward {
    fn name(&self) -> &'static str {
        "skymoe-silu-mul-bwd"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let a = slice(s1, l1)?;
        let b = slice(s2, l2)?;
        let g = slice(s3, l3)?;
        let mut out = vec![0.0f32; a.len()];
        let wrt_b = self.wrt_b;
        let run = |(((o, a), b), g): BackwardChunk<'_>| {
            for i in 0..o.len() {
                let s = sigmoid(a[i]);
                o[i] = if wrt_b {
                    g[i] * a[i] * s
                } else {
                    g[i] * b[i] * s * (1.0 + a[i] * (1.0 - s))
                };
            }
        };
        if a.len() >= PARALLEL_MIN_ELEMS {
            out.par_chunks_mut(CHUNK)
                .zip(a.par_chunks(CHUNK))
                .zip(b.par_chunks(CHUNK))
                .zip(g.par_chunks(CHUNK))
                .for_each(run);
        } else {
            out.chunks_mut(CHUNK)
                .zip(a.chunks(CHUNK))
                .zip(b.chunks(CHUNK))
                .zip(g.chunks(CHUNK))
                .for_each(run);
        }
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
}

/// `silu(a) · b` elementwise, with backward for both.
pub fn silu_mul(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    if !fused_ok(&[a, b]) || a.dims() != b.dims() {
        return reference::silu_mul(a, b);
    }
    a.contiguous()?.apply_op2(&b.contiguous()?, SiluMul)
}
