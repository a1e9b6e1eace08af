//! Causal attention of one layer over the paged KV cache, for a batch of sequence chunks.

use rayon::prelude::*;

use super::ops::{axpy, dot, softmax};
use crate::kv_cache::KvCache;

/// Rotary position embedding tables (Hugging Face "rotate_half" layout).
#[derive(Debug, Clone)]
pub struct Rope {
    cos: Vec<f32>,
    sin: Vec<f32>,
    half: usize,
    max_positions: usize,
}

impl Rope {
    /// Tables for `max_positions` positions of heads `head_dim` wide, computed in f32 as
    /// transformers does (`inv_freq = 1/θ^(2i/d)`, angle `= pos · inv_freq`).
    pub fn new(head_dim: usize, theta: f64, max_positions: usize) -> Self {
        let half = head_dim / 2;
        let inv: Vec<f32> = (0..half)
            .map(|i| 1.0f32 / (theta as f32).powf((2 * i) as f32 / head_dim as f32))
            .collect();
        let mut cos = Vec::with_capacity(max_positions * half);
        let mut sin = Vec::with_capacity(max_positions * half);
        for p in 0..max_positions {
            for f in &inv {
                let a = p as f32 * f;
                cos.push(a.cos());
                sin.push(a.sin());
            }
        }
        Rope {
            cos,
            sin,
            half,
            max_positions,
        }
    }

    /// Positions covered.
    pub fn max_positions(&self) -> usize {
        self.max_positions
    }

    /// Rotate one head vector in place for position `pos`.
    pub fn apply(&self, x: &mut [f32], pos: usize) {
        let h = self.half;
        let (c, s) = (
            &self.cos[pos * h..(pos + 1) * h],
            &self.sin[pos * h..(pos + 1) * h],
        );
        for i in 0..h {
            let (a, b) = (x[i], x[i + h]);
            x[i] = a * c[i] - b * s[i];
            x[i + h] = b * c[i] + a * s[i];
        }
    }
}

/// Where one chunk of a sequence sits in the batch and in the cache.
#[derive(Debug, Clone, Copy)]
pub struct ChunkPlacement<'a> {
    /// First row of the chunk in the batch's activations.
    pub row: usize,
    /// Tokens in the chunk.
    pub len: usize,
    /// Position of its first token (positions before it are already cached).
    pub start: usize,
    /// The sequence's block table.
    pub blocks: &'a [u32],
}

/// Shapes of the attention heads this process computes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeadShape {
    /// Query heads held here.
    pub heads: usize,
    /// Key/value heads held here.
    pub kv_heads: usize,
    /// Head width.
    pub head_dim: usize,
    /// Global index of the first query head held here (0 without tensor parallelism).
    pub first_head: usize,
    /// Global index of the first kv head held here.
    pub first_kv_head: usize,
    /// Query heads per kv head in the whole model.
    pub group: usize,
}

impl HeadShape {
    /// Local kv head read by local query head `h`.
    fn kv_of(&self, h: usize) -> usize {
        (self.first_head + h) / self.group.max(1) - self.first_kv_head
    }
}

/// Attention of every query row of `q` (`[n, heads·head_dim]`, RoPE applied) over the cached
/// keys and values of `layer` (the chunk's own ones already written), causally. Returns
/// `[n, heads·head_dim]`.
pub fn attend(
    q: &[f32],
    chunks: &[ChunkPlacement<'_>],
    kv: &KvCache,
    layer: usize,
    shape: HeadShape,
) -> Vec<f32> {
    let (heads, hd) = (shape.heads, shape.head_dim);
    let qdim = heads * hd;
    let n: usize = chunks.iter().map(|c| c.len).sum();
    let scale = 1.0 / (hd as f32).sqrt();
    let (keys, values) = kv.layer(layer);
    let tasks: Vec<(usize, usize)> = (0..chunks.len())
        .flat_map(|c| (0..heads).map(move |h| (c, h)))
        .collect();
    let results: Vec<(usize, usize, Vec<f32>)> = tasks
        .par_iter()
        .map(|&(c, h)| {
            let ch = &chunks[c];
            let g = shape.kv_of(h);
            let mut out = vec![0f32; ch.len * hd];
            let mut scores = Vec::with_capacity(ch.start + ch.len);
            for t in 0..ch.len {
                let qv = &q[(ch.row + t) * qdim + h * hd..(ch.row + t) * qdim + (h + 1) * hd];
                let last = ch.start + t;
                scores.clear();
                for pos in 0..=last {
                    let o = kv.offset(ch.blocks, pos) + g * hd;
                    scores.push(dot(qv, &keys[o..o + hd]) * scale);
                }
                softmax(&mut scores);
                let ov = &mut out[t * hd..(t + 1) * hd];
                for (pos, &p) in scores.iter().enumerate() {
                    let o = kv.offset(ch.blocks, pos) + g * hd;
                    axpy(p, &values[o..o + hd], ov);
                }
            }
            (c, h, out)
        })
        .collect();
    let mut att = vec![0f32; n * qdim];
    for (c, h, out) in results {
        let ch = &chunks[c];
        for t in 0..ch.len {
            att[(ch.row + t) * qdim + h * hd..(ch.row + t) * qdim + (h + 1) * hd]
                .copy_from_slice(&out[t * hd..(t + 1) * hd]);
        }
    }
    att
}
