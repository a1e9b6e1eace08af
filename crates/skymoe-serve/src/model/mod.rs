//! The served model: the same architectures as `skymoe_model::CausalLm`, with weights in a
//! [`WeightFormat`] (f32, f16, int8, fp8, q4), activations in f32, no autograd, and a paged KV
//! cache. One forward pass runs a batch of sequence chunks (prompts being prefilled and
//! sequences decoding one token) through every projection as one matrix.

mod attention;
mod linear;
mod load;
mod mla;
mod moe;
pub mod ops;
mod tp;

use std::sync::Arc;

use skymoe_kernels::quant::{QMatrix, WeightFormat};
use skymoe_model::ModelConfig;

pub use attention::{attend, ChunkPlacement, HeadShape, Rope};
pub use linear::QLinear;
pub use load::{head_format, stored_format};
pub use mla::{MlaLayer, MlaQueries};
pub use moe::{Ffn, Mlp, MoeFfn, RouterGate};
pub use tp::{split_by_weights, TensorParallel, TpComm};

use crate::error::{Result, ServeError};
use crate::kv_cache::{KvCache, KvDtype};
use ops::{add_in_place, rms_norm};

/// A layer's attention projections before `o_proj`.
#[derive(Debug, Clone)]
pub enum LayerAttention {
    /// Grouped-query attention.
    Gqa {
        /// q, k and v stacked: `[(heads + 2·kv_heads)·head_dim, hidden]`.
        qkv: QLinear,
        /// q and k norm weights, when the config has a q/k norm (`head_dim` each per head;
        /// the whole projections' otherwise).
        qk_norm: Option<(Vec<f32>, Vec<f32>)>,
    },
    /// Multi-head latent attention over a latent cache.
    Mla(Box<MlaLayer>),
}

/// One decoder layer.
#[derive(Debug, Clone)]
pub struct ServeLayer {
    /// Norm before attention.
    pub input_norm: Vec<f32>,
    /// The attention projections.
    pub attention: LayerAttention,
    /// Output projection.
    pub o: QLinear,
    /// Norm before the feed-forward block.
    pub post_norm: Vec<f32>,
    /// The feed-forward block.
    pub ffn: Ffn,
}

/// Normalise q and k of one token's `[q | k | v]` row (per head or over each projection, as
/// the config says) and clamp q, k and v to `±clip_qkv`, before RoPE.
/// With `across_ranks`, a per-projection norm split over tensor-parallel ranks: the row's
/// mean squares of q and k over the whole projections (summed over the ranks).
fn qk_norm_and_clip(
    row: &mut [f32],
    qdim: usize,
    kvd: usize,
    qk_norm: Option<&(Vec<f32>, Vec<f32>)>,
    c: &skymoe_model::ModelConfig,
    eps: f32,
    across_ranks: Option<(f32, f32)>,
) {
    if let Some((qw, kw)) = qk_norm {
        let (qs, kvs) = row.split_at_mut(qdim);
        let ks = &mut kvs[..kvd];
        match across_ranks {
            Some((q_ms, k_ms)) => {
                let (rq, rk) = (1.0 / (q_ms + eps).sqrt(), 1.0 / (k_ms + eps).sqrt());
                qs.iter_mut().zip(qw).for_each(|(x, w)| *x = w * (*x * rq));
                ks.iter_mut().zip(kw).for_each(|(x, w)| *x = w * (*x * rk));
            }
            None => {
                // A per-head weight is `head_dim` long; a per-projection one spans the
                // projection.
                let (qn, kn) = (rms_norm(qs, qw, eps), rms_norm(ks, kw, eps));
                qs.copy_from_slice(&qn);
                ks.copy_from_slice(&kn);
            }
        }
    }
    if let Some(clip) = c.clip_qkv {
        let clip = clip as f32;
        for x in row[..qdim + 2 * kvd].iter_mut() {
            *x = x.clamp(-clip, clip);
        }
    }
}

/// Which logits a chunk wants back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogitsFor {
    /// None (a prompt chunk that is not the prompt's last).
    None,
    /// The last position's.
    Last,
    /// Every position's (perplexity).
    All,
}

/// A piece of one sequence to run: its new tokens, where they start, and its block table
/// (covering at least `start + tokens.len()` positions).
#[derive(Debug, Clone, Copy)]
pub struct SeqChunk<'a> {
    /// New tokens.
    pub tokens: &'a [u32],
    /// Position of the first new token (earlier positions are in the cache).
    pub start: usize,
    /// The sequence's KV blocks.
    pub blocks: &'a [u32],
    /// Which logits to return.
    pub logits: LogitsFor,
}

/// A model ready to serve.
#[derive(Debug, Clone)]
pub struct ServeModel {
    /// The architecture and sizes.
    pub config: ModelConfig,
    /// The weight format of the projections.
    pub format: WeightFormat,
    embed: Arc<QMatrix>,
    lm_head: Arc<QMatrix>,
    final_norm: Vec<f32>,
    layers: Vec<ServeLayer>,
    rope: Rope,
    shape: HeadShape,
    tp: Option<TensorParallel>,
}

impl ServeModel {
    /// The attention heads this process computes.
    pub fn head_shape(&self) -> HeadShape {
        self.shape
    }

    /// Width of one position's keys (or values) in one layer, on this process (with latent
    /// attention, of its one cached row).
    pub fn kv_dim(&self) -> usize {
        self.shape.kv_heads * self.shape.head_dim
    }

    /// The tensor-parallel group, if the model is split over processes.
    pub fn tensor_parallel(&self) -> Option<&TensorParallel> {
        self.tp.as_ref()
    }

    /// Decoder layers.
    pub fn num_layers(&self) -> usize {
        self.layers.len()
    }

    /// Longest sequence the model handles.
    pub fn context_length(&self) -> usize {
        self.rope.max_positions()
    }

    /// A KV cache for this model of `num_blocks` blocks of `block_size` positions, its
    /// entries stored as `dtype` (`None`: [`KvDtype::auto`] for the model's weights).
    pub fn new_kv_cache(
        &self,
        block_size: usize,
        num_blocks: usize,
        dtype: Option<KvDtype>,
    ) -> KvCache {
        let dtype = self.kv_dtype(dtype);
        if self.config.mla.is_some() {
            return KvCache::new_latent(
                self.layers.len(),
                self.kv_dim(),
                block_size,
                num_blocks,
                dtype,
            );
        }
        // Head by head within a block: a decoding step reads each kv head's run of positions,
        // its keys dimension by dimension (the scores of a block's positions in one register).
        KvCache::new(
            self.layers.len(),
            self.kv_dim(),
            block_size,
            num_blocks,
            dtype,
        )
        .with_head_width(self.shape.head_dim)
        .with_keys_by_dimension()
    }

    /// `dtype`, or the automatic choice for this model's weights.
    pub fn kv_dtype(&self, dtype: Option<KvDtype>) -> KvDtype {
        dtype.unwrap_or_else(|| KvDtype::auto(self.format))
    }

    /// Bytes of weight storage.
    pub fn weight_bytes(&self) -> usize {
        let mats = |l: &ServeLayer| {
            let ffn = match &l.ffn {
                Ffn::Dense(m) => m.gate_up.storage_bytes() + m.down.storage_bytes(),
                Ffn::Moe(moe) => {
                    moe.experts
                        .iter()
                        .map(|m| m.gate_up.storage_bytes() + m.down.storage_bytes())
                        .sum::<usize>()
                        + moe.shared.as_ref().map_or(0, |(m, _)| {
                            m.gate_up.storage_bytes() + m.down.storage_bytes()
                        })
                }
            };
            let attention = match &l.attention {
                LayerAttention::Gqa { qkv, .. } => qkv.weight.storage_bytes(),
                LayerAttention::Mla(m) => m.storage_bytes(),
            };
            attention + l.o.weight.storage_bytes() + ffn
        };
        let head = if Arc::ptr_eq(&self.embed, &self.lm_head) {
            0
        } else {
            self.lm_head.storage_bytes()
        };
        self.embed.storage_bytes() + head + self.layers.iter().map(mats).sum::<usize>()
    }

    /// Bytes of weights one decode step of a single sequence reads: every attention and dense
    /// projection, the router, `top_k` routed experts (of average size) and the shared expert
    /// of each MoE block, the LM head, and one embedding row — what batch-1 decode streams
    /// from memory per token, the numerator of its share of the memory bandwidth.
    pub fn decode_bytes_per_token(&self) -> usize {
        let mlp = |m: &Mlp| m.gate_up.storage_bytes() + m.down.storage_bytes();
        let layer = |l: &ServeLayer| {
            let ffn = match &l.ffn {
                Ffn::Dense(m) => mlp(m),
                Ffn::Moe(moe) => {
                    let routed: usize = moe.experts.iter().map(mlp).sum();
                    let active =
                        routed * moe.top_k.min(moe.experts.len()) / moe.experts.len().max(1);
                    let gate = match &moe.gate {
                        RouterGate::Linear(w) => w.storage_bytes(),
                        RouterGate::TwoLayer(a, b) => a.storage_bytes() + b.storage_bytes(),
                    };
                    active + gate + moe.shared.as_ref().map_or(0, |(m, _)| mlp(m))
                }
            };
            let attention = match &l.attention {
                LayerAttention::Gqa { qkv, .. } => qkv.weight.storage_bytes(),
                LayerAttention::Mla(m) => m.storage_bytes(),
            };
            attention + l.o.weight.storage_bytes() + ffn
        };
        let embed_row = self.embed.storage_bytes() / self.embed.rows().max(1);
        embed_row + self.lm_head.storage_bytes() + self.layers.iter().map(layer).sum::<usize>()
    }

    /// [`ServeModel::forward`] on the leading rank of a tensor-parallel group: first send the
    /// inputs to the other ranks (waiting in [`ServeModel::follow`]). Without tensor
    /// parallelism, just the forward pass.
    pub fn forward_led(&self, chunks: &[SeqChunk<'_>], kv: &mut KvCache) -> Result<Vec<Vec<f32>>> {
        if let Some(tp) = &self.tp {
            let plan = tp::StepPlan {
                chunks: chunks
                    .iter()
                    .map(|c| {
                        let code = match c.logits {
                            LogitsFor::None => 0,
                            LogitsFor::Last => 1,
                            LogitsFor::All => 2,
                        };
                        (c.start, c.tokens.to_vec(), c.blocks.to_vec(), code)
                    })
                    .collect(),
            };
            self.send_plan(tp, Some(&plan))?;
        }
        self.forward(chunks, kv)
    }

    fn send_plan(&self, tp: &TensorParallel, plan: Option<&tp::StepPlan>) -> Result<()> {
        let (mut header, mut body) = tp::StepPlan::encode(plan)?;
        let err = |e: String| ServeError::Comm(format!("broadcast: {e}"));
        tp.comm.broadcast(&mut header, 0).map_err(err)?;
        if !body.is_empty() {
            tp.comm.broadcast(&mut body, 0).map_err(err)?;
        }
        Ok(())
    }

    /// Send the waiting ranks an empty step, so that their collective watchdog sees traffic
    /// while the server is idle (leading rank only).
    pub fn keep_followers_alive(&self) -> Result<()> {
        match &self.tp {
            Some(tp) => self.send_plan(tp, Some(&tp::StepPlan::default())),
            None => Ok(()),
        }
    }

    /// Tell the ranks waiting in [`ServeModel::follow`] to stop (leading rank only).
    pub fn release_followers(&self) -> Result<()> {
        match &self.tp {
            Some(tp) => self.send_plan(tp, None),
            None => Ok(()),
        }
    }

    /// On a non-leading rank of a tensor-parallel group: run the forward passes the leading
    /// rank sends, until it releases this rank. Returns the number of passes run.
    pub fn follow(&self, kv: &mut KvCache) -> Result<usize> {
        let Some(tp) = &self.tp else {
            return Ok(0);
        };
        let err = |e: String| ServeError::Comm(format!("broadcast: {e}"));
        let mut passes = 0;
        loop {
            let mut header = vec![0f32; 4];
            tp.comm.broadcast(&mut header, 0).map_err(err)?;
            let Some(len) = tp::StepPlan::body_len(&header) else {
                return Ok(passes);
            };
            let mut body = vec![0f32; len];
            if len > 0 {
                tp.comm.broadcast(&mut body, 0).map_err(err)?;
            }
            let plan = tp::StepPlan::decode(&header, &body)?;
            if plan.chunks.is_empty() {
                continue;
            }
            let chunks: Vec<SeqChunk<'_>> = plan
                .chunks
                .iter()
                .map(|(start, t, b, l)| SeqChunk {
                    tokens: t,
                    start: *start,
                    blocks: b,
                    logits: match l {
                        0 => LogitsFor::None,
                        1 => LogitsFor::Last,
                        _ => LogitsFor::All,
                    },
                })
                .collect();
            self.forward(&chunks, kv)?;
            passes += 1;
        }
    }

    /// Under tensor parallelism with a q/k norm over the whole projections: each row's mean
    /// squares of q and of k over all ranks' heads (`[q, k]` per row), each kv head counted
    /// once (by the rank holding its group's first query head). `None` otherwise.
    fn projection_norm_squares(
        &self,
        qkv: &[f32],
        n: usize,
        has_norm: bool,
    ) -> Result<Option<Vec<f32>>> {
        let Some(tp) = self
            .tp
            .as_ref()
            .filter(|_| has_norm && self.config.qk_norm == skymoe_model::QkNorm::PerProjection)
        else {
            return Ok(None);
        };
        let s = self.shape;
        let (hd, qdim) = (s.head_dim, s.heads * s.head_dim);
        let width = qdim + 2 * s.kv_heads * hd;
        let owned: Vec<bool> = (0..s.kv_heads)
            .map(|j| {
                let first_query = (s.first_kv_head + j) * s.group;
                (s.first_head..s.first_head + s.heads).contains(&first_query)
            })
            .collect();
        let mut sums = vec![0f32; 2 * n];
        for (r, row) in qkv.chunks_exact(width).take(n).enumerate() {
            sums[2 * r] = ops::dot(&row[..qdim], &row[..qdim]);
            for (j, _) in owned.iter().enumerate().filter(|(_, o)| **o) {
                let k = &row[qdim + j * hd..qdim + (j + 1) * hd];
                sums[2 * r + 1] += ops::dot(k, k);
            }
        }
        tp.all_reduce(&mut sums)?;
        let c = &self.config;
        let (q_all, k_all) = (
            (c.num_attention_heads * hd) as f32,
            (c.num_key_value_heads * hd) as f32,
        );
        for pair in sums.chunks_exact_mut(2) {
            pair[0] /= q_all;
            pair[1] /= k_all;
        }
        Ok(Some(sums))
    }

    fn check(&self, chunks: &[SeqChunk<'_>], kv: &KvCache) -> Result<()> {
        for c in chunks {
            if c.tokens.is_empty() {
                return Err(ServeError::InvalidInput("a chunk has no tokens".into()));
            }
            if let Some(bad) = c
                .tokens
                .iter()
                .find(|&&t| t as usize >= self.config.vocab_size)
            {
                return Err(ServeError::InvalidInput(format!(
                    "token id {bad} is out of range for a vocabulary of {}",
                    self.config.vocab_size
                )));
            }
            let end = c.start + c.tokens.len();
            if end > self.context_length() {
                return Err(ServeError::InvalidInput(format!(
                    "sequence of {end} positions exceeds the model's maximum of {}",
                    self.context_length()
                )));
            }
            if kv.blocks_for(end) > c.blocks.len() {
                return Err(ServeError::InvalidInput(format!(
                    "{} KV blocks cannot hold {end} positions",
                    c.blocks.len()
                )));
            }
            if let Some(b) = c.blocks.iter().find(|&&b| b as usize >= kv.total_blocks()) {
                return Err(ServeError::InvalidInput(format!(
                    "KV block {b} is not in the cache"
                )));
            }
        }
        Ok(())
    }

    /// Run a batch of chunks, writing their keys and values into `kv`; returns the logits
    /// each chunk asked for (empty, `[vocab]` or `[len, vocab]`).
    ///
    /// Without tensor parallelism the pass runs on a worker of the thread pool: a decode step
    /// runs a few hundred small parallel products, and from inside the pool each one is a
    /// work-stealing split among workers that are still spinning, instead of a hand-off from
    /// a foreign thread that sleeps and wakes around every product. A tensor-parallel pass
    /// stays on the calling thread, since it blocks in collectives (ranks run as threads of
    /// one process would otherwise hold every worker while waiting for each other).
    pub fn forward(&self, chunks: &[SeqChunk<'_>], kv: &mut KvCache) -> Result<Vec<Vec<f32>>> {
        if self.tp.is_none() && rayon::current_thread_index().is_none() {
            return rayon::scope(|_| self.forward_on_worker(chunks, kv));
        }
        self.forward_on_worker(chunks, kv)
    }

    fn forward_on_worker(
        &self,
        chunks: &[SeqChunk<'_>],
        kv: &mut KvCache,
    ) -> Result<Vec<Vec<f32>>> {
        self.check(chunks, kv)?;
        let c = &self.config;
        let (hsz, hd) = (c.hidden_size, c.head_dim);
        let shape = self.head_shape();
        let (qdim, kvd) = (shape.heads * hd, self.kv_dim());
        let eps = c.rms_norm_eps as f32;
        let mut placements = Vec::with_capacity(chunks.len());
        let mut row = 0;
        for ch in chunks {
            placements.push(ChunkPlacement {
                row,
                len: ch.tokens.len(),
                start: ch.start,
                blocks: ch.blocks,
            });
            row += ch.tokens.len();
        }
        let n = row;
        let mut x = vec![0f32; n * hsz];
        for (i, &t) in chunks.iter().flat_map(|c| c.tokens).enumerate() {
            self.embed
                .dequantize_row(t as usize, &mut x[i * hsz..(i + 1) * hsz]);
        }
        // Dynamic NTK rotates each chunk with the base for its own end position.
        let chunk_rope: Vec<_> = placements
            .iter()
            .map(|p| self.rope.chunk_table(p.start, p.len))
            .collect();
        for (li, layer) in self.layers.iter().enumerate() {
            let hn = rms_norm(&x, &layer.input_norm, eps);
            let att = match &layer.attention {
                LayerAttention::Mla(mla) => {
                    mla.forward(&hn, n, &placements, &chunk_rope, &self.rope, kv, li, shape)
                }
                LayerAttention::Gqa { qkv, qk_norm } => {
                    let mut qkv = qkv.forward(&hn, n);
                    let width = qdim + 2 * kvd;
                    let across = self.projection_norm_squares(&qkv, n, qk_norm.is_some())?;
                    let mut q = vec![0f32; n * qdim];
                    for (p, table) in placements.iter().zip(&chunk_rope) {
                        let table = table.as_ref();
                        for t in 0..p.len {
                            let pos = p.start + t;
                            let r = &mut qkv[(p.row + t) * width..(p.row + t + 1) * width];
                            let ms = across
                                .as_ref()
                                .map(|a| (a[2 * (p.row + t)], a[2 * (p.row + t) + 1]));
                            qk_norm_and_clip(r, qdim, kvd, qk_norm.as_ref(), c, eps, ms);
                            let (qs, kvs) = r.split_at_mut(qdim);
                            for head in qs.chunks_exact_mut(hd) {
                                self.rope.apply(table, head, pos);
                            }
                            let (ks, vs) = kvs.split_at_mut(kvd);
                            for head in ks.chunks_exact_mut(hd) {
                                self.rope.apply(table, head, pos);
                            }
                            kv.write(li, p.blocks, pos, ks, vs);
                            q[(p.row + t) * qdim..(p.row + t + 1) * qdim].copy_from_slice(qs);
                        }
                    }
                    attend(&q, &placements, kv, li, shape)
                }
            };
            let mut o = layer.o.forward(&att, n);
            if let Some(tp) = &self.tp {
                tp.all_reduce(&mut o)?;
            }
            add_in_place(&mut x, &o);
            let hn = rms_norm(&x, &layer.post_norm, eps);
            let mut f = layer.ffn.forward(&hn, n);
            if let Some(tp) = &self.tp {
                tp.all_reduce(&mut f)?;
            }
            add_in_place(&mut x, &f);
        }
        // Logits only for the rows that want them.
        let mut rows = Vec::new();
        for (ch, p) in chunks.iter().zip(&placements) {
            match ch.logits {
                LogitsFor::None => {}
                LogitsFor::Last => rows.push(p.row + p.len - 1),
                LogitsFor::All => rows.extend(p.row..p.row + p.len),
            }
        }
        let mut picked = Vec::with_capacity(rows.len() * hsz);
        for &r in &rows {
            picked.extend_from_slice(&x[r * hsz..(r + 1) * hsz]);
        }
        let normed = rms_norm(&picked, &self.final_norm, eps);
        let vocab = c.vocab_size;
        let mut logits = vec![0f32; rows.len() * vocab];
        self.lm_head.matmul(&normed, rows.len(), &mut logits);
        let mut out = Vec::with_capacity(chunks.len());
        let mut at = 0;
        for (ch, p) in chunks.iter().zip(&placements) {
            let count = match ch.logits {
                LogitsFor::None => 0,
                LogitsFor::Last => 1,
                LogitsFor::All => p.len,
            };
            out.push(logits[at * vocab..(at + count) * vocab].to_vec());
            at += count;
        }
        Ok(out)
    }
}
