//! Causal attention with grouped-query heads as one operation, with backward:
//! `out = softmax(scale · Q Kᵀ + causal mask) V` per head, query row `i` seeing keys
//! `0..=offset + i`; query head `h` reads key/value head `h / (heads / kv_heads)`.
//!
//! One operation instead of a chain of products, scaling, reshapes, a softmax and transposes:
//! the scores of a head are never copied or given to the autograd graph, masked key blocks
//! are skipped, the output is written directly in `[batch, seq, heads · head_dim]` order, and
//! heads run in parallel.

use std::mem::MaybeUninit;
use std::sync::{Arc, Mutex};

use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use crate::cpu::{cpu_tensor, filled, filled_mut, slice, slices, unfilled};
use crate::rows::{softmax_backward_row, softmax_row};
use crate::sgemm::{sgemm, sgemm_add, sgemm_uninit, View};
use crate::{fused_ok, reference};

/// Query rows per block: a block's products stop at the last key its last row sees.
const QUERY_BLOCK: usize = 64;

/// The shapes of one call.
#[derive(Debug, Clone, Copy)]
struct Dims {
    batch: usize,
    heads: usize,
    kv_heads: usize,
    /// Query positions.
    t: usize,
    /// Key positions.
    s: usize,
    head_dim: usize,
}

fn check_dims(q: &[usize], k: &[usize], v: &[usize], offset: usize) -> Result<Dims> {
    let (&[batch, heads, t, head_dim], &[kb, kv_heads, s, kd]) = (q, k) else {
        candle_core::bail!(
            "causal_attention: q {q:?} and k {k:?} are not [b, heads, seq, head_dim]"
        );
    };
    if k != v
        || kb != batch
        || kd != head_dim
        || kv_heads == 0
        || heads % kv_heads != 0
        || offset + t != s
    {
        candle_core::bail!(
            "causal_attention: shapes q {q:?}, k {k:?}, v {v:?} (offset {offset}) disagree"
        );
    }
    Ok(Dims {
        batch,
        heads,
        kv_heads,
        t,
        s,
        head_dim,
    })
}

struct CausalAttention {
    scale: f32,
    offset: usize,
    /// The probabilities of every head (`[batch · heads, t, s]`, zero where masked), kept by
    /// the forward pass for the backward pass.
    saved_probs: Mutex<Option<Arc<Vec<f32>>>>,
}

impl CausalAttention {
    /// Keys visible to query row `i`.
    fn visible(&self, i: usize, s: usize) -> usize {
        (self.offset + i + 1).min(s)
    }

    /// The output `[batch, t, heads · head_dim]` and the probabilities.
    fn forward(&self, q: &[f32], k: &[f32], v: &[f32], d: Dims) -> (Vec<f32>, Vec<f32>) {
        let (t, s, hd) = (d.t, d.s, d.head_dim);
        let rep = d.heads / d.kv_heads;
        if t == 0 || hd == 0 {
            // No queries or empty heads: an empty output (and nothing to split into heads).
            return (Vec::new(), vec![0.0; d.batch * d.heads * t * s]);
        }
        // Both written whole below, so allocated without zeroing.
        let mut probs = unfilled(d.batch * d.heads * t * s);
        // Per head `[t, head_dim]`, reordered into the output afterwards.
        let mut per_head = unfilled(d.batch * d.heads * t * hd);
        probs
            .par_chunks_mut(t * s)
            .zip(per_head.par_chunks_mut(t * hd))
            .enumerate()
            .for_each(|(bh, (p, o))| {
                let (b, h) = (bh / d.heads, bh % d.heads);
                let kv = b * d.kv_heads + h / rep;
                let qh = &q[bh * t * hd..(bh + 1) * t * hd];
                let kh = &k[kv * s * hd..(kv + 1) * s * hd];
                let vh = &v[kv * s * hd..(kv + 1) * s * hd];
                for r0 in (0..t).step_by(QUERY_BLOCK) {
                    let r1 = (r0 + QUERY_BLOCK).min(t);
                    let n = r1 - r0;
                    let kend = self.visible(r1 - 1, s);
                    let pb = &mut p[r0 * s..r1 * s];
                    sgemm_uninit(
                        View::row_major(&qh[r0 * hd..r1 * hd], n, hd, hd),
                        View::transpose_of(kh, hd, kend, hd),
                        self.scale,
                        pb,
                        s,
                    );
                    for (i, row) in pb.chunks_mut(s).enumerate() {
                        let (seen, masked) = row.split_at_mut(kend);
                        // SAFETY: the product wrote the row's first `kend` scores.
                        softmax_row(unsafe { filled_mut(seen) }, self.visible(r0 + i, s));
                        masked.fill(MaybeUninit::new(0.0));
                    }
                    // SAFETY: every row of the block was written whole just above.
                    let pb = unsafe { filled_mut(pb) };
                    sgemm_uninit(
                        View::row_major(pb, n, kend, s),
                        View::row_major(vh, kend, hd, hd),
                        1.0,
                        &mut o[r0 * hd..r1 * hd],
                        hd,
                    );
                }
            });
        // SAFETY: the query blocks cover every row of every head, and each block's products
        // (and softmax and masking) wrote its rows of both whole.
        let (probs, per_head) = unsafe { (filled(probs), filled(per_head)) };
        let mut out = unfilled(d.batch * t * d.heads * hd);
        for (bh, o) in per_head.chunks(t * hd).enumerate() {
            let (b, h) = (bh / d.heads, bh % d.heads);
            for (i, row) in o.chunks(hd).enumerate() {
                let at = ((b * t + i) * d.heads + h) * hd;
                for (dst, &v) in out[at..at + hd].iter_mut().zip(row) {
                    *dst = MaybeUninit::new(v);
                }
            }
        }
        // SAFETY: every (batch, position, head) row of the output was copied just above.
        let out = unsafe { filled(out) };
        (out, probs)
    }

    /// Gradients of q, k and v for the output gradient `dout` (`[batch, t, heads · head_dim]`).
    #[allow(clippy::too_many_arguments)]
    fn backward(
        &self,
        q: &[f32],
        k: &[f32],
        v: &[f32],
        probs: &[f32],
        dout: &[f32],
        d: Dims,
    ) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
        let (t, s, hd) = (d.t, d.s, d.head_dim);
        let rep = d.heads / d.kv_heads;
        let row = d.heads * hd;
        if t == 0 || hd == 0 {
            // Nothing reached the output: every gradient is zero (or empty).
            return (vec![0.0; q.len()], vec![0.0; k.len()], vec![0.0; v.len()]);
        }
        // Written whole by the products below; dK and dV are sums, so they start at zero.
        let mut dq = unfilled(q.len());
        let mut dk = vec![0.0f32; k.len()];
        let mut dv = vec![0.0f32; v.len()];
        // One task per key/value head: it owns that head's dK, dV and its query heads' dQ.
        dq.par_chunks_mut(rep * t * hd)
            .zip(dk.par_chunks_mut(s * hd))
            .zip(dv.par_chunks_mut(s * hd))
            .enumerate()
            .for_each(|(kv, ((dq, dk), dv))| {
                let b = kv / d.kv_heads;
                let kh = &k[kv * s * hd..(kv + 1) * s * hd];
                let vh = &v[kv * s * hd..(kv + 1) * s * hd];
                let mut ds = vec![0.0f32; QUERY_BLOCK * s];
                for j in 0..rep {
                    let h = (kv % d.kv_heads) * rep + j;
                    let bh = b * d.heads + h;
                    let qh = &q[bh * t * hd..(bh + 1) * t * hd];
                    let ph = &probs[bh * t * s..(bh + 1) * t * s];
                    let dqh = &mut dq[j * t * hd..(j + 1) * t * hd];
                    for r0 in (0..t).step_by(QUERY_BLOCK) {
                        let r1 = (r0 + QUERY_BLOCK).min(t);
                        let n = r1 - r0;
                        let kend = self.visible(r1 - 1, s);
                        // The output gradient of these rows for head h.
                        let go = &dout[(b * t + r0) * row + h * hd..];
                        let go = View::row_major(go, n, hd, row);
                        let pb = &ph[r0 * s..r1 * s];
                        // dP = dO · Vᵀ, then dS = P ∘ (dP − Σ P ∘ dP) row by row.
                        let dsb = &mut ds[..n * kend];
                        sgemm(go, View::transpose_of(vh, hd, kend, hd), 1.0, dsb, kend);
                        for (i, (dsr, pr)) in dsb.chunks_mut(kend).zip(pb.chunks(s)).enumerate() {
                            softmax_backward_row(dsr, pr, self.visible(r0 + i, s));
                        }
                        let dsv = View::row_major(dsb, n, kend, kend);
                        // dQ = scale · dS · K; dK += scale · dSᵀ · Q; dV += Pᵀ · dO.
                        sgemm_uninit(
                            dsv,
                            View::row_major(kh, kend, hd, hd),
                            self.scale,
                            &mut dqh[r0 * hd..r1 * hd],
                            hd,
                        );
                        sgemm_add(
                            View::transpose_of(dsb, kend, n, kend),
                            View::row_major(&qh[r0 * hd..r1 * hd], n, hd, hd),
                            self.scale,
                            &mut dk[..kend * hd],
                            hd,
                        );
                        sgemm_add(
                            View::transpose_of(pb, kend, n, s),
                            go,
                            1.0,
                            &mut dv[..kend * hd],
                            hd,
                        );
                    }
                }
            });
        // SAFETY: each query head's blocks cover all its rows of dQ, each written whole by
        // its product.
        (unsafe { filled(dq) }, dk, dv)
    }
}

impl CustomOp3 for CausalAttention {
    fn name(&self) -> &'static str {
        "skymoe-causal-attention"
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
        let d = check_dims(l1.dims(), l2.dims(), l3.dims(), self.offset)?;
        let (q, k, v) = (slice(s1, l1)?, slice(s2, l2)?, slice(s3, l3)?);
        let (out, probs) = self.forward(q, k, v, d);
        if let Ok(mut saved) = self.saved_probs.lock() {
            *saved = Some(Arc::new(probs));
        }
        Ok((
            CpuStorage::F32(out),
            Shape::from((d.batch, d.t, d.heads * d.head_dim)),
        ))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let d = check_dims(q.dims(), k.dims(), v.dims(), self.offset)?;
        let saved = self.saved_probs.lock().ok().and_then(|p| p.clone());
        let (dq, dk, dv) = slices([q, k, v, grad], |[qv, kv, vv, g]| {
            let probs = match saved {
                Some(p) => p,
                None => Arc::new(self.forward(qv, kv, vv, d).1),
            };
            Ok(self.backward(qv, kv, vv, &probs, g, d))
        })?;
        Ok((
            Some(cpu_tensor(dq, q.dims())),
            Some(cpu_tensor(dk, k.dims())),
            Some(cpu_tensor(dv, v.dims())),
        ))
    }
}

/// Causal attention of `q [batch, heads, t, head_dim]` over `k`, `v`
/// `[batch, kv_heads, offset + t, head_dim]` (`heads` a multiple of `kv_heads`; query head `h`
/// reads key/value head `h / (heads / kv_heads)`): query row `i` sees keys `0..=offset + i`,
/// scores are scaled by `scale`. Returns `[batch, t, heads · head_dim]`. Differentiable in
/// q, k and v.
pub fn causal_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    offset: usize,
) -> Result<Tensor> {
    check_dims(q.dims(), k.dims(), v.dims(), offset)?;
    if !fused_ok(&[q, k, v]) {
        return reference_causal_attention(q, k, v, scale, offset);
    }
    q.contiguous()?.apply_op3(
        &k.contiguous()?,
        &v.contiguous()?,
        CausalAttention {
            scale: scale as f32,
            offset,
            saved_probs: Mutex::new(None),
        },
    )
}

/// [`causal_attention`] as a composition of candle ops (grouped products, a masked softmax,
/// transposes), which candle differentiates itself: the definition the fused operation is
/// tested against, and the path on other devices and dtypes.
pub fn reference_causal_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    offset: usize,
) -> Result<Tensor> {
    let d = check_dims(q.dims(), k.dims(), v.dims(), offset)?;
    let rep = d.heads / d.kv_heads;
    let (b, t, s, hd) = (d.batch, d.t, d.s, d.head_dim);
    // Group the query heads that share a kv head: [b, kv_heads, rep·t, hd].
    let qg = q.reshape((b, d.kv_heads, rep * t, hd))?;
    let scores = (qg.matmul(&k.t()?)? * scale)?.reshape((b, d.heads, t, s))?;
    let probs = reference::causal_softmax(&scores, offset)?.reshape((b, d.kv_heads, rep * t, s))?;
    probs
        .matmul(v)?
        .reshape((b, d.heads, t, hd))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape((b, t, d.heads * hd))
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device, Tensor, Var};

    use super::*;
    use crate::cpu::max_abs_diff as max_diff;

    /// No queries, or heads of width 0, give empty or zero outputs, not a panic.
    #[test]
    fn empty_shapes_are_answered() -> Result<()> {
        let dev = Device::Cpu;
        for (t, offset, hd) in [(0, 3, 4), (3, 0, 0)] {
            let q = Var::from_tensor(&Tensor::zeros((1, 2, t, hd), DType::F32, &dev)?)?;
            let k = Var::from_tensor(&Tensor::ones((1, 1, offset + t, hd), DType::F32, &dev)?)?;
            let y = causal_attention(q.as_tensor(), k.as_tensor(), k.as_tensor(), 0.5, offset)?;
            assert_eq!(y.dims(), [1, t, 2 * hd]);
            let grads = y.sum_all()?.backward()?;
            let dk = grads.get(&k).expect("a gradient for k");
            assert_eq!(dk.dims(), k.dims());
            assert!(dk
                .flatten_all()?
                .to_vec1::<f32>()?
                .iter()
                .all(|&g| g == 0.0));
        }
        Ok(())
    }

    /// Under test the buffers allocated without zeroing start as NaN: the output and the
    /// gradients match the composed reference only if every element was written.
    #[test]
    fn outputs_allocated_without_zeroing_are_written_whole() -> Result<()> {
        let dev = Device::Cpu;
        // Two query blocks (the second partial) behind a cache offset, grouped heads.
        let (b, heads, kv_heads, t, offset, hd) = (2, 4, 2, QUERY_BLOCK + 7, 5, 8);
        let s = offset + t;
        let q = Var::from_tensor(&Tensor::randn(0f32, 1.0, (b, heads, t, hd), &dev)?)?;
        let k = Var::from_tensor(&Tensor::randn(0f32, 1.0, (b, kv_heads, s, hd), &dev)?)?;
        let v = Var::from_tensor(&Tensor::randn(0f32, 1.0, (b, kv_heads, s, hd), &dev)?)?;
        let probe = Tensor::randn(0f32, 1.0, (b, t, heads * hd), &dev)?;
        let scale = 0.35;
        let fused = causal_attention(q.as_tensor(), k.as_tensor(), v.as_tensor(), scale, offset)?;
        let plain =
            reference_causal_attention(q.as_tensor(), k.as_tensor(), v.as_tensor(), scale, offset)?;
        assert!(max_diff(&fused, &plain) < 1e-5);
        let gf = (fused * &probe)?.sum_all()?.backward()?;
        let gp = (plain * &probe)?.sum_all()?.backward()?;
        for var in [&q, &k, &v] {
            let (a, b) = (gf.get(var).unwrap(), gp.get(var).unwrap());
            assert!(
                max_diff(a, b) < 1e-4,
                "gradient differs by {}",
                max_diff(a, b)
            );
        }
        Ok(())
    }
}
