//! Mean cross-entropy of logits against target ids, fused (log-softmax, pick, mean), with
//! backward `dlogits = (softmax − onehot) · g / n`.

use candle_core::{CpuStorage, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use crate::cpu::{slice, slice_u32, PARALLEL_MIN_ELEMS};
use crate::rows::{exp_shifted_scaled, log_sum_exp};
use crate::{fused_ok, reference};

/// Per-row negative log-likelihood `[n]`.
struct RowNll;

impl CustomOp2 for RowNll {
    fn name(&self) -> &'static str {
        "skymoe-cross-entropy"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = slice(s1, l1)?;
        let t = slice_u32(s2, l2)?;
        let (n, v) = l1.shape().dims2()?;
        if t.len() != n {
            candle_core::bail!("cross_entropy: {n} rows but {} targets", t.len());
        }
        if let Some(bad) = t.iter().find(|&&id| id as usize >= v) {
            candle_core::bail!("cross_entropy: target {bad} out of range for {v} classes");
        }
        let nll = |(row, &id): (&[f32], &u32)| log_sum_exp(row) - row[id as usize];
        let out: Vec<f32> = if x.len() >= PARALLEL_MIN_ELEMS {
            x.par_chunks(v).zip(t.par_iter()).map(nll).collect()
        } else {
            x.chunks(v).zip(t.iter()).map(nll).collect()
        };
        Ok((CpuStorage::F32(out), Shape::from(n)))
    }

    fn bwd(
        &self,
        x: &Tensor,
        t: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let g = grad.contiguous()?;
        Ok((Some(x.apply_op3_no_bwd(t, &g, &RowNllBackward)?), None))
    }
}

/// One row of the backward pass: (output, logits), target, upstream gradient.
type BackwardRow<'a> = (((&'a mut [f32], &'a [f32]), &'a u32), &'a f32);

/// `dx[r] = (softmax(x[r]) − onehot(t[r])) · g[r]`.
struct RowNllBackward;

impl CustomOp3 for RowNllBackward {
    fn name(&self) -> &'static str {
        "skymoe-cross-entropy-bwd"
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
        let t = slice_u32(s2, l2)?;
        let g = slice(s3, l3)?;
        let (_, v) = l1.shape().dims2()?;
        let mut out = vec![0.0f32; x.len()];
        let run = |(((o, x), &id), &g): BackwardRow<'_>| {
            exp_shifted_scaled(o, x, log_sum_exp(x), g);
            o[id as usize] -= g;
        };
        if x.len() >= PARALLEL_MIN_ELEMS {
            out.par_chunks_mut(v)
                .zip(x.par_chunks(v))
                .zip(t.par_iter())
                .zip(g.par_iter())
                .for_each(run);
        } else {
            out.chunks_mut(v)
                .zip(x.chunks(v))
                .zip(t.iter())
                .zip(g.iter())
                .for_each(run);
        }
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
}

/// Mean cross-entropy of `logits [n, v]` against `targets [n]` (u32 ids), with backward to the
/// logits.
pub fn cross_entropy(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    if !fused_ok(&[logits]) || targets.dtype() != DType::U32 || logits.rank() != 2 {
        return reference::cross_entropy(logits, targets);
    }
    logits
        .contiguous()?
        .apply_op2(&targets.contiguous()?, RowNll)?
        .mean_all()
}
