//! Multi-head latent attention (DeepSeek-V2/V3) over a latent cache.
//!
//! The cache holds, per position and layer, the normalised latent (`kv_lora_rank`) and the
//! rotated shared key (`qk_rope_head_dim`), as vLLM and llama.cpp keep it: never the
//! decompressed keys and values. Attention runs in the latent space ("absorbed" form): a
//! head's plain query is mapped through the transpose of its key decompression
//! (`W_UK[h]ᵀ q`, `kv_lora_rank` wide) and joined with its rotated query, so scores are dot
//! products with the cached rows; the weighted sum of cached latents is then decompressed by
//! the head's value matrix `W_UV[h]`. This equals decompressing every cached position's key
//! and value (transformers' form) up to rounding.

use skymoe_kernels::quant::{QMatrix, WeightFormat};
use skymoe_model::config::{MlaConfig, MLA_NORM_EPS};

use super::attention::{attend, ChunkPlacement, HeadShape, Rope};
use super::ops::rms_norm;
use crate::error::Result;
use crate::kv_cache::KvCache;

/// How queries are projected.
#[derive(Debug, Clone)]
pub enum MlaQueries {
    /// `q_proj` `[heads·(nope + rope), hidden]`.
    Direct(QMatrix),
    /// `q_b_proj(norm(q_a_proj x))`: the norm weight and `q_b_proj` `[heads·(nope + rope),
    /// q_lora_rank]` (`q_a_proj` is stacked into [`MlaLayer::down`]).
    LowRank {
        /// `q_a_layernorm`.
        norm: Vec<f32>,
        /// `q_b_proj`.
        up: QMatrix,
    },
}

/// One layer's latent attention weights.
#[derive(Debug, Clone)]
pub struct MlaLayer {
    /// The projections of the hidden state into latents: `q_a_proj` (with a query
    /// bottleneck) stacked over `kv_a_proj_with_mqa`.
    pub down: QMatrix,
    /// The query projection.
    pub queries: MlaQueries,
    /// `kv_a_layernorm`.
    pub kv_norm: Vec<f32>,
    /// For each head, `W_UK[h]ᵀ` `[kv_lora_rank, nope]`: plain query → latent space.
    pub key_absorb: Vec<QMatrix>,
    /// For each head, `W_UV[h]` `[v_head_dim, kv_lora_rank]`: latent → value.
    pub value_up: Vec<QMatrix>,
    /// The dimensions.
    pub dims: MlaConfig,
}

/// Reorder interleaved rotary pairs `(x0, x1), (x2, x3), …` into halves `(x0, x2, …, x1,
/// x3, …)`, the layout the rotary tables rotate (queries and keys alike, so scores keep).
fn deinterleave(x: &mut [f32]) {
    let mut tmp = Vec::with_capacity(x.len());
    tmp.extend(x.iter().step_by(2));
    tmp.extend(x.iter().skip(1).step_by(2));
    x.copy_from_slice(&tmp);
}

/// Rows `rows` × `cols` of a row-major matrix with `stride` columns starting at column `from`.
fn columns(x: &[f32], rows: usize, stride: usize, from: usize, cols: usize) -> Vec<f32> {
    let mut out = Vec::with_capacity(rows * cols);
    for r in 0..rows {
        out.extend_from_slice(&x[r * stride + from..r * stride + from + cols]);
    }
    out
}

impl MlaLayer {
    /// Build from `kv_b_proj` in f32 (`[all heads·(nope + v), kv_lora_rank]`) the absorbed
    /// key and value matrices of `heads`, in `format`.
    pub fn split_kv_up(
        kv_up: &[f32],
        heads: std::ops::Range<usize>,
        dims: &MlaConfig,
        format: WeightFormat,
    ) -> Result<(Vec<QMatrix>, Vec<QMatrix>)> {
        let (nope, vd, r) = (dims.qk_nope_head_dim, dims.v_head_dim, dims.kv_lora_rank);
        let mut absorb = Vec::with_capacity(heads.len());
        let mut values = Vec::with_capacity(heads.len());
        for h in heads {
            let base = h * (nope + vd) * r;
            let key = &kv_up[base..base + nope * r];
            // Transpose [nope, r] → [r, nope].
            let mut t = vec![0f32; r * nope];
            for i in 0..nope {
                for j in 0..r {
                    t[j * nope + i] = key[i * r + j];
                }
            }
            absorb.push(QMatrix::quantize(&t, r, nope, format)?);
            let value = &kv_up[base + nope * r..base + (nope + vd) * r];
            values.push(QMatrix::quantize(value, vd, r, format)?);
        }
        Ok((absorb, values))
    }

    /// The attention heads as the paged attention sees them: one cached row of latent and
    /// rotary key per position, read by every head, its latent part as the values.
    pub fn head_shape(&self, heads: usize, scale: f64) -> HeadShape {
        HeadShape {
            heads,
            kv_heads: 1,
            head_dim: self.dims.cache_width(),
            value_dim: self.dims.kv_lora_rank,
            scale: scale as f32,
            first_head: 0,
            first_kv_head: 0,
            group: heads,
        }
    }

    /// Attend for `n` rows of normalised hidden states `x` (`[n, hidden]`): write each row's
    /// latent and rotary key into `kv` (layer `layer`), attend, and return the heads' values
    /// `[n, heads·v_head_dim]` (the input of `o_proj`).
    #[allow(clippy::too_many_arguments)]
    pub fn forward(
        &self,
        x: &[f32],
        n: usize,
        placements: &[ChunkPlacement<'_>],
        chunk_rope: &[Option<skymoe_model::layers::rope::RopeTable>],
        rope: &Rope,
        kv: &mut KvCache,
        layer: usize,
        shape: HeadShape,
    ) -> Vec<f32> {
        let d = &self.dims;
        let heads = shape.heads;
        let (nope, rot, r, vd) = (
            d.qk_nope_head_dim,
            d.qk_rope_head_dim,
            d.kv_lora_rank,
            d.v_head_dim,
        );
        let dq = nope + rot;
        let eps = MLA_NORM_EPS as f32;
        let width = self.down.rows();
        let mut down = vec![0f32; n * width];
        self.down.matmul(x, n, &mut down);
        let q_lora = width - r - rot;
        let q = match &self.queries {
            MlaQueries::Direct(w) => {
                let mut q = vec![0f32; n * w.rows()];
                w.matmul(x, n, &mut q);
                q
            }
            MlaQueries::LowRank { norm, up } => {
                let qa = rms_norm(&columns(&down, n, width, 0, q_lora), norm, eps);
                let mut q = vec![0f32; n * up.rows()];
                up.matmul(&qa, n, &mut q);
                q
            }
        };
        // The cache rows: normalised latent, then the rotated shared key.
        let cw = r + rot;
        let latents = rms_norm(&columns(&down, n, width, q_lora, r), &self.kv_norm, eps);
        let mut queries = vec![0f32; n * heads * cw];
        for (p, table) in placements.iter().zip(chunk_rope) {
            let table = table.as_ref();
            for t in 0..p.len {
                let row = p.row + t;
                let pos = p.start + t;
                let mut cache_row = Vec::with_capacity(cw);
                cache_row.extend_from_slice(&latents[row * r..(row + 1) * r]);
                cache_row.extend_from_slice(&down[row * width + q_lora + r..(row + 1) * width]);
                let key = &mut cache_row[r..];
                if d.rope_interleave {
                    deinterleave(key);
                }
                rope.apply(table, key, pos);
                kv.write(layer, p.blocks, pos, &cache_row, &[]);
                for h in 0..heads {
                    let src = &q[row * heads * dq + h * dq + nope..row * heads * dq + (h + 1) * dq];
                    let dst = &mut queries[(row * heads + h) * cw + r..(row * heads + h + 1) * cw];
                    dst.copy_from_slice(src);
                    if d.rope_interleave {
                        deinterleave(dst);
                    }
                    rope.apply(table, dst, pos);
                }
            }
        }
        // Plain queries into the latent space, head by head.
        let mut lat = vec![0f32; n * r];
        for (h, absorb) in self.key_absorb.iter().enumerate() {
            let q_nope = columns(&q, n, heads * dq, h * dq, nope);
            absorb.matmul(&q_nope, n, &mut lat);
            for row in 0..n {
                queries[(row * heads + h) * cw..(row * heads + h) * cw + r]
                    .copy_from_slice(&lat[row * r..(row + 1) * r]);
            }
        }
        let att = attend(&queries, placements, kv, layer, shape);
        // Each head's weighted latent through its value matrix.
        let mut out = vec![0f32; n * heads * vd];
        let mut v = vec![0f32; n * vd];
        for (h, up) in self.value_up.iter().enumerate() {
            up.matmul(&columns(&att, n, heads * r, h * r, r), n, &mut v);
            for row in 0..n {
                out[(row * heads + h) * vd..(row * heads + h + 1) * vd]
                    .copy_from_slice(&v[row * vd..(row + 1) * vd]);
            }
        }
        out
    }

    /// Bytes of weight storage.
    pub fn storage_bytes(&self) -> usize {
        let q = match &self.queries {
            MlaQueries::Direct(w) => w.storage_bytes(),
            MlaQueries::LowRank { up, .. } => up.storage_bytes(),
        };
        self.down.storage_bytes()
            + q
            + self
                .key_absorb
                .iter()
                .chain(&self.value_up)
                .map(QMatrix::storage_bytes)
                .sum::<usize>()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deinterleave_splits_even_and_odd_positions() {
        let mut x = [0.0, 1.0, 2.0, 3.0, 4.0, 5.0];
        deinterleave(&mut x);
        assert_eq!(x, [0.0, 2.0, 4.0, 1.0, 3.0, 5.0]);
    }

    #[test]
    fn kv_up_splits_into_transposed_keys_and_values() {
        let dims = MlaConfig {
            q_lora_rank: None,
            kv_lora_rank: 3,
            qk_nope_head_dim: 2,
            qk_rope_head_dim: 2,
            v_head_dim: 1,
            rope_interleave: true,
        };
        // Two heads of (2 key rows + 1 value row) × 3.
        let w: Vec<f32> = (0..18).map(|x| x as f32).collect();
        let (k, v) = MlaLayer::split_kv_up(&w, 0..2, &dims, WeightFormat::F32).unwrap();
        assert_eq!(k[1].dequantize(), vec![9.0, 12.0, 10.0, 13.0, 11.0, 14.0]);
        assert_eq!(v[1].dequantize(), vec![15.0, 16.0, 17.0]);
        assert_eq!(
            (k[0].rows(), k[0].cols(), v[0].rows(), v[0].cols()),
            (3, 2, 1, 3)
        );
    }
}
