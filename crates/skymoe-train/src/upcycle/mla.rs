//! Multi-head latent attention (DeepSeek-V2/V3) initialised from a dense Llama attention.
//!
//! Llama's head `h` scores `q_h · k_j` (kv head `j = h / group`) after rotating every pair of
//! dimensions `(i, i + d/2)` at frequency `θ^(−2i/d)`. Latent attention rotates only
//! `qk_rope_head_dim = r` dimensions per head, whose key is one vector shared by all heads,
//! and decompresses the rest of the key (`qk_nope_head_dim = d − r`) and the value from a
//! normalised latent. The conversion:
//!
//! - **Rotary dimensions.** MLA's pair `p` turns at `θ^(−2p/r)`, which is Llama's pair
//!   `p · d/r`: those `r/2` pairs of each head keep their rotation (laid out as interleaved
//!   pairs, as DeepSeek's checkpoints store them). The shared rotary key is the mean of the kv
//!   heads' rows, exact when the dense model has one kv head.
//! - **Plain dimensions.** The other `d − r` dimensions of each head lose their rotation: the
//!   attention changes unless `r = d`.
//! - **Latent.** The plain key rows and the value rows of every kv head, with the input norm's
//!   weight folded in (`M = [W_k,nope; W_v] · diag(w_norm)`), act on the unit-RMS normalised
//!   hidden state `n`. With `kv_lora_rank` equal to the hidden size the latent is `n` itself
//!   (`kv_a_proj = diag(1/w_norm)`), its RMS norm is the identity up to epsilon, and
//!   `kv_b_proj` holds `M`: lossless. With a smaller rank, a truncated SVD `M ≈ U Σ Vᵀ` gives
//!   `kv_a_proj = Vᵀ diag(1/w_norm)` and `kv_b_proj = U Σ`, the best rank-`R` approximation
//!   before the latent norm (which then rescales each token's latent).
//! - **Query** rows are Llama's, reordered; `o_proj` is Llama's; the softmax scale
//!   `1/√(qk_nope_head_dim + qk_rope_head_dim) = 1/√d` is unchanged.
//!
//! So the attention is preserved exactly (up to the norms' epsilon) when the dense model has a
//! single kv head, every dimension stays rotary (`r = d`) and the latent is lossless; every
//! other setting starts close to Llama's attention, not equal.

use candle_core::{Device, Tensor};
use nalgebra::DMatrix;
use skymoe_model::layers::TensorLoader;
use skymoe_model::names;
use skymoe_model::ModelConfig;

use crate::error::{Result, TrainError};

/// The latent attention's shape, chosen by the caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LatentShape {
    /// Width of the key/value latent (`kv_lora_rank`).
    pub kv_lora_rank: usize,
    /// Rotary dimensions per head (`qk_rope_head_dim`).
    pub rope_dim: usize,
}

impl LatentShape {
    /// Check the shape against a dense model with heads of `head_dim` and `hidden` inputs.
    pub fn check(&self, dense: &ModelConfig) -> Result<()> {
        let (d, hidden) = (dense.head_dim, dense.hidden_size);
        let r = self.rope_dim;
        if r == 0 || !r.is_multiple_of(2) || !d.is_multiple_of(r) {
            return Err(TrainError::Config(format!(
                "--rope-dim ({r}) must be an even divisor of the head dimension ({d}): latent \
                 attention's rotary pairs then turn at frequencies Llama's heads have"
            )));
        }
        let kv_rows = dense.num_key_value_heads * (2 * d - r);
        let rank = self.kv_lora_rank;
        if rank == 0 || (rank != hidden && rank > kv_rows.min(hidden)) {
            return Err(TrainError::Config(format!(
                "--kv-lora-rank ({rank}) must be the hidden size ({hidden}; a lossless latent) or \
                 at most {} (a truncated SVD of the {kv_rows} plain-key and value rows)",
                kv_rows.min(hidden)
            )));
        }
        Ok(())
    }
}

/// Row order within one Llama head: the rotary rows as interleaved pairs (MLA's pair `p` is
/// Llama's pair `p · d/r`: rows `p·d/r` and `p·d/r + d/2`), and the remaining (plain) rows in
/// order.
pub fn head_rows(head_dim: usize, rope_dim: usize) -> (Vec<usize>, Vec<usize>) {
    let (d, r) = (head_dim, rope_dim);
    let stride = d / r;
    let mut rope = Vec::with_capacity(r);
    for p in 0..r / 2 {
        rope.push(p * stride);
        rope.push(p * stride + d / 2);
    }
    let plain = (0..d).filter(|i| !rope.contains(i)).collect();
    (rope, plain)
}

/// A row-major matrix read from the dense checkpoint.
struct Rows {
    data: Vec<f32>,
    cols: usize,
}

impl Rows {
    fn load(weights: &dyn TensorLoader, name: &str, rows: usize, cols: usize) -> Result<Self> {
        let data = weights
            .tensor(name, &[rows, cols])?
            .flatten_all()?
            .to_vec1::<f32>()?;
        Ok(Rows { data, cols })
    }

    fn row(&self, i: usize) -> &[f32] {
        &self.data[i * self.cols..(i + 1) * self.cols]
    }
}

fn tensor(data: Vec<f32>, rows: usize, cols: usize, device: &Device) -> Result<Tensor> {
    Ok(Tensor::from_vec(data, (rows, cols), device)?)
}

/// Layer `l`'s latent attention tensors (names and layout of `mla_cfg`) from the dense
/// model's attention and input norm.
pub fn latent_attention(
    dense: &ModelConfig,
    mla_cfg: &ModelConfig,
    l: usize,
    weights: &dyn TensorLoader,
    device: &Device,
) -> Result<Vec<(String, Tensor)>> {
    let m = mla_cfg
        .mla
        .ok_or_else(|| TrainError::Config("the target layout has no latent attention".into()))?;
    let (hidden, heads, kv_heads, d) = (
        dense.hidden_size,
        dense.num_attention_heads,
        dense.num_key_value_heads,
        dense.head_dim,
    );
    let (r, rank) = (m.qk_rope_head_dim, m.kv_lora_rank);
    let group = heads / kv_heads.max(1);
    let attn = |p: &str| names::layer(l, &format!("self_attn.{p}.weight"));
    let wq = Rows::load(weights, &attn("q_proj"), heads * d, hidden)?;
    let wk = Rows::load(weights, &attn("k_proj"), kv_heads * d, hidden)?;
    let wv = Rows::load(weights, &attn("v_proj"), kv_heads * d, hidden)?;
    let norm_name = names::layer(l, "input_layernorm.weight");
    let w_norm = weights.tensor(&norm_name, &[hidden])?.to_vec1::<f32>()?;
    if let Some(i) = w_norm.iter().position(|w| !w.is_normal()) {
        return Err(TrainError::Config(format!(
            "{norm_name}[{i}] is {}: the input norm cannot be folded into the latent",
            w_norm[i]
        )));
    }
    let (rope_rows, plain_rows) = head_rows(d, r);

    // Queries: each head's plain rows, then its rotary rows.
    let mut q = Vec::with_capacity(heads * d * hidden);
    for h in 0..heads {
        for &i in plain_rows.iter().chain(&rope_rows) {
            q.extend_from_slice(wq.row(h * d + i));
        }
    }
    // The shared rotary key: the kv heads' rotary rows, averaged.
    let mut k_rope = vec![0f32; r * hidden];
    for (t, &i) in rope_rows.iter().enumerate() {
        let out = &mut k_rope[t * hidden..(t + 1) * hidden];
        for j in 0..kv_heads {
            for (o, &x) in out.iter_mut().zip(wk.row(j * d + i)) {
                *o += x / kv_heads as f32;
            }
        }
    }
    // M: per kv head its plain key rows then its value rows, times the input norm's weight.
    let per_head = plain_rows.len() + d;
    let kv_rows = kv_heads * per_head;
    let mut folded = DMatrix::<f64>::zeros(kv_rows, hidden);
    for j in 0..kv_heads {
        let sources = plain_rows
            .iter()
            .map(|&i| wk.row(j * d + i))
            .chain((0..d).map(|i| wv.row(j * d + i)));
        for (t, src) in sources.enumerate() {
            for (c, (&x, &w)) in src.iter().zip(&w_norm).enumerate() {
                folded[(j * per_head + t, c)] = f64::from(x) * f64::from(w);
            }
        }
    }
    // The latent: down (`[rank, hidden]`, applied to the normalised hidden state times the
    // norm weight) and up (`[kv_rows, rank]`).
    let (down, up) = if rank == hidden {
        let mut down = DMatrix::<f64>::zeros(hidden, hidden);
        for c in 0..hidden {
            down[(c, c)] = 1.0;
        }
        (down, folded)
    } else {
        let svd = folded.svd(true, true);
        let (Some(u), Some(v_t)) = (svd.u, svd.v_t) else {
            return Err(TrainError::Config(
                "the singular value decomposition of the key/value projections failed".into(),
            ));
        };
        // The `rank` largest singular values and their vectors.
        let sigma = &svd.singular_values;
        let mut order: Vec<usize> = (0..sigma.len()).collect();
        order.sort_by(|&a, &b| sigma[b].total_cmp(&sigma[a]));
        let mut down = DMatrix::<f64>::zeros(rank, hidden);
        let mut up = DMatrix::<f64>::zeros(kv_rows, rank);
        for (t, &s) in order.iter().take(rank).enumerate() {
            down.row_mut(t).copy_from(&v_t.row(s));
            up.column_mut(t).copy_from(&(u.column(s) * sigma[s]));
        }
        (down, up)
    };
    let mut kv_a = Vec::with_capacity((rank + r) * hidden);
    for i in 0..rank {
        for c in 0..hidden {
            kv_a.push((down[(i, c)] / f64::from(w_norm[c])) as f32);
        }
    }
    kv_a.extend_from_slice(&k_rope);
    // kv_b: every query head takes its kv head's rows.
    let mut kv_b = Vec::with_capacity(heads * per_head * rank);
    for h in 0..heads {
        let j = h / group.max(1);
        for t in 0..per_head {
            for c in 0..rank {
                kv_b.push(up[(j * per_head + t, c)] as f32);
            }
        }
    }
    let n = names::mla(l);
    Ok(vec![
        (n.q_proj, tensor(q, heads * d, hidden, device)?),
        (n.kv_a_proj, tensor(kv_a, rank + r, hidden, device)?),
        (
            n.kv_a_norm,
            Tensor::ones(rank, candle_core::DType::F32, device)?,
        ),
        (n.kv_b_proj, tensor(kv_b, heads * per_head, rank, device)?),
        (
            n.o_proj,
            weights.tensor(&attn("o_proj"), &[hidden, heads * d])?,
        ),
    ])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rotary_rows_are_llamas_pairs_at_mla_frequencies() {
        // d = 8, r = 4: MLA pairs 0 and 1 are Llama pairs 0 and 2 (rows 0/4 and 2/6).
        let (rope, plain) = head_rows(8, 4);
        assert_eq!(rope, vec![0, 4, 2, 6]);
        assert_eq!(plain, vec![1, 3, 5, 7]);
        let (rope, plain) = head_rows(8, 8);
        assert_eq!(rope, vec![0, 4, 1, 5, 2, 6, 3, 7]);
        assert!(plain.is_empty());
        // Frequencies: MLA pair p of r turns at θ^(−2p/r), Llama pair i of d at θ^(−2i/d).
        let (d, r) = (16usize, 4usize);
        let (rope, _) = head_rows(d, r);
        for p in 0..r / 2 {
            let i = rope[2 * p];
            assert_eq!(rope[2 * p + 1], i + d / 2);
            assert!(((2 * p) as f64 / r as f64 - (2 * i) as f64 / d as f64).abs() < 1e-12);
        }
    }
}
