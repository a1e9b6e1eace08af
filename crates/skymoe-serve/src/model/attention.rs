//! Causal attention of one layer over the paged KV cache, for a batch of sequence chunks.

use rayon::prelude::*;

use skymoe_kernels::sgemm::{sgemm, View};

use skymoe_model::layers::rope::{RopeSpec, RopeTable};
use skymoe_model::ModelConfig;

use super::ops::softmax;
use crate::kv_cache::KvCache;

/// Rotary position embedding tables (Hugging Face "rotate_half" layout), computed by
/// [`RopeSpec`] as for every other executor, scaled variants included.
#[derive(Debug, Clone)]
pub struct Rope {
    spec: RopeSpec,
    table: RopeTable,
}

impl Rope {
    /// The tables of a model configuration: positions `0..max_positions()`.
    pub fn new(config: &ModelConfig) -> Self {
        let spec = RopeSpec::from_config(config);
        let table = spec.table();
        Rope { spec, table }
    }

    /// Positions covered.
    pub fn max_positions(&self) -> usize {
        self.table.rows()
    }

    /// The table of a chunk at positions `start..start + len` when it differs from the
    /// shared one (dynamic NTK beyond `max_position_embeddings`: the base for the length
    /// `start + len`); `None` otherwise.
    pub fn chunk_table(&self, start: usize, len: usize) -> Option<RopeTable> {
        self.spec.span_table(start, len)
    }

    /// Rotate one head vector in place for position `pos`, with the chunk's own table if it
    /// has one.
    pub fn apply(&self, chunk: Option<&RopeTable>, x: &mut [f32], pos: usize) {
        chunk.unwrap_or(&self.table).apply(x, pos);
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
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct HeadShape {
    /// Query heads held here.
    pub heads: usize,
    /// Key/value heads held here.
    pub kv_heads: usize,
    /// Width of a query and key head.
    pub head_dim: usize,
    /// Width of a value head (equal to `head_dim` but for latent attention, whose values are
    /// the leading `value_dim` elements of its keys).
    pub value_dim: usize,
    /// Softmax scale of the scores.
    pub scale: f32,
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

/// Query rows per attention task: a long prompt chunk is split into blocks of this many
/// rows, so that one prompt's heads keep every thread busy.
const QUERY_BLOCK: usize = 64;

/// Blocks of at least this many query rows use matrix products (scores `Q·Kᵀ`, then `P·V`);
/// shorter ones (decoding) take one dot product per cached position.
const GEMM_MIN_ROWS: usize = 8;

/// One attention task: query rows `t0..t0 + rows` of chunk `chunk`, head `head`.
#[derive(Debug, Clone, Copy)]
struct Task {
    chunk: usize,
    head: usize,
    t0: usize,
    rows: usize,
}

/// Attention of every query row of `q` (`[n, heads·head_dim]`, RoPE applied) over the cached
/// keys and values of `layer` (the chunk's own ones already written), causally. Returns
/// `[n, heads·value_dim]`.
pub fn attend(
    q: &[f32],
    chunks: &[ChunkPlacement<'_>],
    kv: &KvCache,
    layer: usize,
    shape: HeadShape,
) -> Vec<f32> {
    let (heads, vd) = (shape.heads, shape.value_dim);
    let n: usize = chunks.iter().map(|c| c.len).sum();
    let mut tasks = Vec::new();
    for (chunk, ch) in chunks.iter().enumerate() {
        for head in 0..heads {
            for t0 in (0..ch.len).step_by(QUERY_BLOCK) {
                let rows = (ch.len - t0).min(QUERY_BLOCK);
                tasks.push(Task {
                    chunk,
                    head,
                    t0,
                    rows,
                });
            }
        }
    }
    let inp = LayerInputs {
        q,
        kv,
        layer,
        shape,
    };
    let results: Vec<(Task, Vec<f32>)> = tasks
        .par_iter()
        .map(|&task| {
            let out = if task.rows >= GEMM_MIN_ROWS {
                attend_by_products(inp, &chunks[task.chunk], task)
            } else {
                attend_by_rows(inp, &chunks[task.chunk], task)
            };
            (task, out)
        })
        .collect();
    let width = heads * vd;
    let mut att = vec![0f32; n * width];
    for (task, out) in results {
        let ch = &chunks[task.chunk];
        let h = task.head;
        for r in 0..task.rows {
            let row = ch.row + task.t0 + r;
            att[row * width + h * vd..row * width + (h + 1) * vd]
                .copy_from_slice(&out[r * vd..(r + 1) * vd]);
        }
    }
    att
}

/// What every attention task of one layer reads: the queries (`[n, heads·head_dim]`), the
/// cache and the layer.
#[derive(Clone, Copy)]
struct LayerInputs<'a> {
    q: &'a [f32],
    kv: &'a KvCache,
    layer: usize,
    shape: HeadShape,
}

impl LayerInputs<'_> {
    /// Head width, width of a query row, and the kv head that `task`'s head reads.
    fn dims(&self, task: Task) -> (usize, usize, usize) {
        let hd = self.shape.head_dim;
        (hd, self.shape.heads * hd, self.shape.kv_of(task.head))
    }

    /// The keys and values `task` reads (its kv head, positions up to its last row's),
    /// `[positions, head_dim]` and `[positions, value_dim]` in f32.
    fn head_cache(&self, ch: &ChunkPlacement<'_>, task: Task) -> (Vec<f32>, Vec<f32>) {
        let (hd, _, g) = self.dims(task);
        let len = ch.start + task.t0 + task.rows;
        let (mut k, mut v) = (Vec::new(), Vec::new());
        self.kv.gather(
            self.layer,
            ch.blocks,
            len,
            g * hd,
            (hd, self.shape.value_dim),
            &mut k,
            &mut v,
        );
        (k, v)
    }
}

/// One task's output `[rows, head_dim]`, one query row at a time, reading the cache in
/// place (a decoding row reads each cached position once).
fn attend_by_rows(inp: LayerInputs<'_>, ch: &ChunkPlacement<'_>, task: Task) -> Vec<f32> {
    let (hd, qdim, g) = inp.dims(task);
    let vd = inp.shape.value_dim;
    let (q, kv, h) = (inp.q, inp.kv, task.head);
    let scale = inp.shape.scale;
    let mut out = vec![0f32; task.rows * vd];
    let mut scores = Vec::with_capacity(ch.start + task.t0 + task.rows);
    for r in 0..task.rows {
        let t = task.t0 + r;
        let qv = &q[(ch.row + t) * qdim + h * hd..(ch.row + t) * qdim + (h + 1) * hd];
        let len = ch.start + t + 1;
        scores.clear();
        scores.resize(len, 0.0);
        // The cached positions one block at a time (each block's rows in one call).
        for (pos, n) in kv.block_runs(len) {
            kv.rows(inp.layer, false, ch.blocks, pos, n, g * hd, hd)
                .dots(qv, &mut scores[pos..pos + n]);
        }
        for s in scores.iter_mut() {
            *s *= scale;
        }
        softmax(&mut scores);
        let ov = &mut out[r * vd..(r + 1) * vd];
        for (pos, n) in kv.block_runs(len) {
            kv.rows(inp.layer, true, ch.blocks, pos, n, g * hd, vd)
                .axpy_into(&scores[pos..pos + n], ov);
        }
    }
    out
}

/// One task's output `[rows, head_dim]` by matrix products: the head's keys and values up
/// to the block's last position gathered from the paged cache, scores `Q·Kᵀ/√d` masked
/// causally and soft-maxed per row, then `P·V`.
fn attend_by_products(inp: LayerInputs<'_>, ch: &ChunkPlacement<'_>, task: Task) -> Vec<f32> {
    let (hd, qdim, _) = inp.dims(task);
    let vd = inp.shape.value_dim;
    let (q, h, rows) = (inp.q, task.head, task.rows);
    let len = ch.start + task.t0 + rows;
    let (k, v) = inp.head_cache(ch, task);
    let first = (ch.row + task.t0) * qdim + h * hd;
    let queries = View::row_major(&q[first..], rows, hd, qdim);
    let keys_t = View::transpose_of(&k, hd, len, hd);
    let mut scores = vec![0f32; rows * len];
    sgemm(queries, keys_t, inp.shape.scale, &mut scores, len);
    for (r, row) in scores.chunks_exact_mut(len).enumerate() {
        // Query row r sits at position start + t0 + r and sees positions 0..=that.
        let visible = ch.start + task.t0 + r + 1;
        softmax(&mut row[..visible]);
        row[visible..].fill(0.0);
    }
    let probs = View::row_major(&scores, rows, len, len);
    let vals = View::row_major(&v, len, vd, vd);
    let mut out = vec![0f32; rows * vd];
    sgemm(probs, vals, 1.0, &mut out, vd);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kv_cache::KvDtype;

    fn values(n: usize, seed: usize) -> Vec<f32> {
        (0..n)
            .map(|i| (((i + seed) * 7919) % 2003) as f32 / 1001.0 - 1.0)
            .collect()
    }

    /// Attention by products equals attention row by row over a cache built by `make`.
    fn check_products_against_rows(shape: HeadShape, make: impl Fn(KvDtype) -> KvCache) {
        let (start, len) = (9, 70);
        let kv_dim = shape.kv_heads * shape.head_dim;
        // Both cache element types (the f16 one read back as the same f32 values by both).
        for dtype in [KvDtype::F32, KvDtype::F16] {
            let mut kv = make(dtype);
            let _spare = kv.allocate(3).unwrap();
            let blocks = kv.allocate(kv.blocks_for(start + len)).unwrap();
            let (k, v) = (
                values((start + len) * kv_dim, 1),
                values((start + len) * kv_dim, 2),
            );
            for pos in 0..start + len {
                let r = pos * kv_dim..(pos + 1) * kv_dim;
                kv.write(0, &blocks, pos, &k[r.clone()], &v[r]);
            }
            let q = values(len * shape.heads * shape.head_dim, 3);
            let ch = ChunkPlacement {
                row: 0,
                len,
                start,
                blocks: &blocks,
            };
            for head in 0..shape.heads {
                for (t0, rows) in [(0, 64), (64, 6), (3, 20)] {
                    let task = Task {
                        chunk: 0,
                        head,
                        t0,
                        rows,
                    };
                    let inp = LayerInputs {
                        q: &q,
                        kv: &kv,
                        layer: 0,
                        shape,
                    };
                    let a = attend_by_products(inp, &ch, task);
                    let b = attend_by_rows(inp, &ch, task);
                    assert_eq!(
                        (a.len(), b.len()),
                        (rows * shape.value_dim, rows * shape.value_dim)
                    );
                    let err = a
                        .iter()
                        .zip(&b)
                        .fold(0f32, |m, (x, y)| m.max((x - y).abs()));
                    assert!(err < 1e-5, "{dtype}: head {head} rows {t0}+{rows}: {err}");
                }
            }
        }
    }

    #[test]
    fn products_equal_row_by_row_attention() {
        // 4 query heads over 2 kv heads of 16, a chunk of 70 rows after 9 cached positions,
        // blocks of 4 positions handed out out of order.
        let shape = HeadShape {
            heads: 4,
            kv_heads: 2,
            head_dim: 16,
            value_dim: 16,
            scale: 0.25,
            first_head: 0,
            first_kv_head: 0,
            group: 2,
        };
        check_products_against_rows(shape, |dtype| KvCache::new(1, 32, 4, 40, dtype));
        // The same with each block stored head by head, as the served model stores it.
        check_products_against_rows(shape, |dtype| {
            KvCache::new(1, 32, 4, 40, dtype).with_head_width(16)
        });
    }

    #[test]
    fn latent_attention_products_equal_rows() {
        // Latent attention's shape: 4 heads over one cached row of 12 (latent of 8, rotary
        // key of 4), values the latent.
        let shape = HeadShape {
            heads: 4,
            kv_heads: 1,
            head_dim: 12,
            value_dim: 8,
            scale: 0.3,
            first_head: 0,
            first_kv_head: 0,
            group: 4,
        };
        check_products_against_rows(shape, |dtype| KvCache::new_latent(1, 12, 4, 40, dtype));
    }
}
