//! RMSNorm `w · x / sqrt(mean(x²) + eps)`, fused, with backward
//! `dx = inv · (w·g − x · inv² · mean(x·w·g))`, `dw = Σ_rows g · x · inv`.

use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use crate::cpu::{slice, PARALLEL_MIN_ELEMS};
use crate::{fused_ok, reference};

fn inv_rms(row: &[f32], eps: f64) -> f32 {
    let ms = crate::rows::dot(row, row) / row.len() as f32;
    1.0 / (ms + eps as f32).sqrt()
}

struct RmsNorm {
    eps: f64,
}

impl CustomOp2 for RmsNorm {
    fn name(&self) -> &'static str {
        "skymoe-rms-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = slice(s1, l1)?;
        let w = slice(s2, l2)?;
        let h = w.len();
        if *l1.dims().last().unwrap_or(&0) != h {
            candle_core::bail!("rms_norm: weight of {h} for rows of {:?}", l1.dims());
        }
        let mut out = vec![0.0f32; x.len()];
        let run = |(o, x): (&mut [f32], &[f32])| {
            let inv = inv_rms(x, self.eps);
            for i in 0..h {
                o[i] = x[i] * inv * w[i];
            }
        };
        if x.len() >= PARALLEL_MIN_ELEMS {
            out.par_chunks_mut(h).zip(x.par_chunks(h)).for_each(run);
        } else {
            out.chunks_mut(h).zip(x.chunks(h)).for_each(run);
        }
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let g = grad.contiguous()?;
        let dx = x.apply_op3_no_bwd(
            w,
            &g,
            &RmsNormBackward {
                eps: self.eps,
                wrt_weight: false,
            },
        )?;
        let dw = x.apply_op3_no_bwd(
            w,
            &g,
            &RmsNormBackward {
                eps: self.eps,
                wrt_weight: true,
            },
        )?;
        Ok((Some(dx), Some(dw)))
    }
}

struct RmsNormBackward {
    eps: f64,
    wrt_weight: bool,
}

impl CustomOp3 for RmsNormBackward {
    fn name(&self) -> &'static str {
        "skymoe-rms-norm-bwd"
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
        let x = slice(s1, l1)?;
        let w = slice(s2, l2)?;
        let g = slice(s3, l3)?;
        let h = w.len();
        if self.wrt_weight {
            // dw = Σ_rows g · x · inv, summed per thread then combined.
            let partial = |acc: Vec<f32>, (x, g): (&[f32], &[f32])| {
                let mut acc = acc;
                let inv = inv_rms(x, self.eps);
                for i in 0..h {
                    acc[i] += g[i] * x[i] * inv;
                }
                acc
            };
            // Fixed blocks of rows summed in a fixed order: the result does not depend on how
            // the threads were scheduled, so training is bit-for-bit reproducible.
            const BLOCK_ROWS: usize = 64;
            let block = |(x, g): (&[f32], &[f32])| {
                x.chunks(h).zip(g.chunks(h)).fold(vec![0.0f32; h], partial)
            };
            let partials: Vec<Vec<f32>> = if x.len() >= PARALLEL_MIN_ELEMS {
                x.par_chunks(h * BLOCK_ROWS)
                    .zip(g.par_chunks(h * BLOCK_ROWS))
                    .map(block)
                    .collect()
            } else {
                x.chunks(h * BLOCK_ROWS)
                    .zip(g.chunks(h * BLOCK_ROWS))
                    .map(block)
                    .collect()
            };
            let mut dw = vec![0.0f32; h];
            for p in partials {
                dw.iter_mut().zip(p).for_each(|(a, b)| *a += b);
            }
            return Ok((CpuStorage::F32(dw), l2.shape().clone()));
        }
        let mut out = vec![0.0f32; x.len()];
        let run = |((o, x), g): ((&mut [f32], &[f32]), &[f32])| {
            let inv = inv_rms(x, self.eps);
            let dot = crate::rows::dot3(x, w, g) / h as f32;
            let k = inv * inv * inv * dot;
            for i in 0..h {
                o[i] = inv * w[i] * g[i] - x[i] * k;
            }
        };
        if x.len() >= PARALLEL_MIN_ELEMS {
            out.par_chunks_mut(h)
                .zip(x.par_chunks(h))
                .zip(g.par_chunks(h))
                .for_each(run);
        } else {
            out.chunks_mut(h)
                .zip(x.chunks(h))
                .zip(g.chunks(h))
                .for_each(run);
        }
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
}

/// RMSNorm over the last dimension with scale `w`, with backward for both.
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    if !fused_ok(&[x, w]) {
        return reference::rms_norm(x, w, eps);
    }
    x.contiguous()?.apply_op2(&w.contiguous()?, RmsNorm { eps })
}
