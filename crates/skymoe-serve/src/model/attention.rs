//! Causal attention of one layer over the paged KV cache, for a batch of sequence chunks.

use rayon::prelude::*;

use skymoe_kernels::decode_attention::{add_weighted_rows, scores_by_dim};
use skymoe_kernels::rows::exp_minus_max;
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

    /// The local query heads that read local kv head `kv` (consecutive).
    fn heads_of(&self, kv: usize) -> std::ops::Range<usize> {
        let group = self.group.max(1);
        let first = ((self.first_kv_head + kv) * group).saturating_sub(self.first_head);
        let end = ((self.first_kv_head + kv + 1) * group).saturating_sub(self.first_head);
        first.min(self.heads)..end.min(self.heads)
    }
}

/// Query rows per attention task: a long prompt chunk is split into blocks of this many
/// rows, so that one prompt's heads keep every thread busy.
const QUERY_BLOCK: usize = 64;

/// Blocks of at least this many query rows use matrix products (scores `Q·Kᵀ`, then `P·V`);
/// shorter ones (decoding) take one dot product per cached position.
const GEMM_MIN_ROWS: usize = 8;

/// A decoding step's cached positions are split into parts (whole blocks, at least this
/// many positions each) when a layer has fewer kv groups to attend than twice the threads,
/// so that one sequence's attention keeps every thread busy; the parts' softmaxes are merged
/// by their maxima and sums.
const MIN_PART_POSITIONS: usize = 128;

/// How many runs of consecutive blocks ahead the grouped decoding path prefetches the first
/// block of (where the block table jumps).
const PREFETCH_RUNS: usize = 2;

/// One attention task: query rows `t0..t0 + rows` of chunk `chunk`, head `head`.
#[derive(Debug, Clone, Copy)]
struct Task {
    chunk: usize,
    head: usize,
    t0: usize,
    rows: usize,
}

/// One task of the grouped decoding path (a cache whose keys are stored by dimension, fewer
/// than [`GEMM_MIN_ROWS`] query rows): query rows `t0..t0 + rows` of chunk `chunk`, every
/// query head of local kv head `kv`, over the cached positions `from..to` (whole blocks but
/// the last).
#[derive(Debug, Clone, Copy)]
struct GroupTask {
    chunk: usize,
    kv: usize,
    t0: usize,
    rows: usize,
    from: usize,
    to: usize,
}

/// What a [`GroupTask`] computes for each of its rows and the group's heads (row by row,
/// head by head): the maximum score `max`, the sum of `exp(score − max)` and the sum of the
/// values weighted by those exponentials (`[rows · heads, value_dim]`, not yet divided). A
/// row that sees none of the part's positions has sum 0.
struct PartialAttention {
    max: Vec<f32>,
    sum: Vec<f32>,
    weighted: Vec<f32>,
}

/// The work of one layer: whole heads (prompt blocks, or any rows of a cache read position
/// by position) or grouped decoding parts.
#[derive(Debug, Clone, Copy)]
enum Work {
    Head(Task),
    Group(GroupTask),
}

/// The output of one [`Work`].
enum WorkOut {
    Head(Vec<f32>),
    Group(PartialAttention),
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
    let grouped = kv.keys_by_dimension();
    let mut work = Vec::new();
    // Row blocks of the grouped decoding path: (chunk, t0, rows).
    let mut decoding = Vec::new();
    for (chunk, ch) in chunks.iter().enumerate() {
        for t0 in (0..ch.len).step_by(QUERY_BLOCK) {
            let rows = (ch.len - t0).min(QUERY_BLOCK);
            if grouped && rows < GEMM_MIN_ROWS {
                decoding.push((chunk, t0, rows));
                continue;
            }
            for head in 0..heads {
                work.push(Work::Head(Task {
                    chunk,
                    head,
                    t0,
                    rows,
                }));
            }
        }
    }
    let units = decoding.len() * shape.kv_heads;
    let threads = rayon::current_num_threads();
    for &(chunk, t0, rows) in &decoding {
        let len = chunks[chunk].start + t0 + rows;
        let parts = parts_of_positions(units, threads, len);
        let per_part = kv.blocks_for(len).div_ceil(parts) * kv.block_size();
        for kv_head in 0..shape.kv_heads {
            for from in (0..len).step_by(per_part) {
                work.push(Work::Group(GroupTask {
                    chunk,
                    kv: kv_head,
                    t0,
                    rows,
                    from,
                    to: (from + per_part).min(len),
                }));
            }
        }
    }
    let inp = LayerInputs {
        q,
        kv,
        layer,
        shape,
    };
    let results: Vec<(Work, WorkOut)> = work
        .par_iter()
        .map(|&w| {
            let out = match w {
                Work::Head(task) if task.rows >= GEMM_MIN_ROWS => {
                    WorkOut::Head(attend_by_products(inp, &chunks[task.chunk], task))
                }
                Work::Head(task) => WorkOut::Head(attend_by_rows(inp, &chunks[task.chunk], task)),
                Work::Group(task) => WorkOut::Group(attend_group(inp, &chunks[task.chunk], task)),
            };
            (w, out)
        })
        .collect();
    let width = heads * vd;
    let mut att = vec![0f32; n * width];
    // The grouped parts' running maxima and sums, row by row and head by head (sum 0: no
    // part seen yet, or a head computed whole).
    let (mut max, mut sum) = if decoding.is_empty() {
        (Vec::new(), Vec::new())
    } else {
        (vec![f32::NEG_INFINITY; n * heads], vec![0f32; n * heads])
    };
    for (w, out) in results {
        match (w, out) {
            (Work::Head(task), WorkOut::Head(out)) => {
                let ch = &chunks[task.chunk];
                let h = task.head;
                for r in 0..task.rows {
                    let row = ch.row + task.t0 + r;
                    att[row * width + h * vd..row * width + (h + 1) * vd]
                        .copy_from_slice(&out[r * vd..(r + 1) * vd]);
                }
            }
            (Work::Group(task), WorkOut::Group(part)) => {
                let ch = &chunks[task.chunk];
                let group = shape.heads_of(task.kv);
                for r in 0..task.rows {
                    let row = ch.row + task.t0 + r;
                    for (i, h) in group.clone().enumerate() {
                        let k = r * group.len() + i;
                        let s = row * heads + h;
                        merge_part(
                            (&mut max[s], &mut sum[s]),
                            &mut att[row * width + h * vd..row * width + (h + 1) * vd],
                            (part.max[k], part.sum[k]),
                            &part.weighted[k * vd..(k + 1) * vd],
                        );
                    }
                }
            }
            _ => unreachable!("each work's output is of its kind"),
        }
    }
    for (s, out) in sum.iter().zip(att.chunks_exact_mut(vd)) {
        if *s > 0.0 {
            let inv = 1.0 / s;
            out.iter_mut().for_each(|v| *v *= inv);
        }
    }
    att
}

/// Parts to split a decoding row block's `len` cached positions into, when a layer has
/// `units` (row block, kv head) pairs for `threads` threads: enough for two tasks a thread,
/// none shorter than [`MIN_PART_POSITIONS`].
fn parts_of_positions(units: usize, threads: usize, len: usize) -> usize {
    if units >= 2 * threads {
        return 1;
    }
    (2 * threads)
        .div_ceil(units.max(1))
        .min(len / MIN_PART_POSITIONS)
        .max(1)
}

/// Fold one part's maximum, sum and weighted values into a row-head's running ones (`out`
/// holds the running weighted values, all relative to the running maximum).
fn merge_part(
    (max, sum): (&mut f32, &mut f32),
    out: &mut [f32],
    (part_max, part_sum): (f32, f32),
    part: &[f32],
) {
    if part_sum == 0.0 {
        return;
    }
    if *sum == 0.0 {
        out.copy_from_slice(part);
        (*max, *sum) = (part_max, part_sum);
        return;
    }
    let m = max.max(part_max);
    let (a, b) = ((*max - m).exp(), (part_max - m).exp());
    for (o, p) in out.iter_mut().zip(part) {
        *o = *o * a + p * b;
    }
    (*max, *sum) = (m, *sum * a + part_sum * b);
}

/// A [`GroupTask`]'s rows over its part of the cache: the scores of the group's query heads
/// against each block's keys (stored by dimension) at once, their exponentials relative to
/// each row-head's maximum, and the values weighted by them, each value row converted once
/// for the whole group.
fn attend_group(
    inp: LayerInputs<'_>,
    ch: &ChunkPlacement<'_>,
    task: GroupTask,
) -> PartialAttention {
    let (hd, vd) = (inp.shape.head_dim, inp.shape.value_dim);
    let qdim = inp.shape.heads * hd;
    let group = inp.shape.heads_of(task.kv);
    let g = group.len();
    let kv = inp.kv;
    let span = task.to - task.from;
    let mut out = PartialAttention {
        max: vec![f32::NEG_INFINITY; task.rows * g],
        sum: vec![0f32; task.rows * g],
        weighted: vec![0f32; task.rows * g * vd],
    };
    let mut scores = vec![0f32; g * span];
    for r in 0..task.rows {
        let t = task.t0 + r;
        // Query row t sits at position start + t and sees positions up to it.
        let visible = (ch.start + t + 1).min(task.to);
        if visible <= task.from {
            continue;
        }
        let seen = visible - task.from;
        let qrow = (ch.row + t) * qdim;
        let qs = &inp.q[qrow + group.start * hd..qrow + group.end * hd];
        // Runs of blocks that follow one another in the pool, each read by one call.
        let runs = kv.consecutive_runs(ch.blocks, task.from, visible);
        // The runs whose first block to prefetch before reading run i: the one
        // PREFETCH_RUNS ahead (all of the first ones before run 0). Each run after the first
        // starts where the block table jumps, which the hardware prefetchers do not see
        // coming.
        let jumps = |i: usize| {
            let first = if i == 0 { 1 } else { i + PREFETCH_RUNS };
            (first..(i + PREFETCH_RUNS + 1).min(runs.len()))
                .map(|j| (runs[j].0, runs[j].1.min(kv.rows_in_block(runs[j].0))))
        };
        let keys = |&(pos, n): &(usize, usize)| {
            kv.key_columns(inp.layer, ch.blocks, pos, n, task.kv * hd, hd)
        };
        let values = |&(pos, n): &(usize, usize)| {
            kv.rows(inp.layer, true, ch.blocks, pos, n, task.kv * hd, vd)
                .cached()
        };
        for (i, run) in runs.iter().enumerate() {
            // Blocks that do not follow their predecessor in the pool, which the hardware
            // prefetchers do not see coming, asked for ahead.
            for ahead in jumps(i) {
                keys(&ahead).0.prefetch();
            }
            let (k, layout) = keys(run);
            let at = run.0 - task.from;
            scores_by_dim(
                qs,
                hd,
                inp.shape.scale,
                k,
                layout,
                run.1,
                &mut scores[at..],
                span,
            );
        }
        for i in 0..g {
            let (m, s) = exp_minus_max(&mut scores[i * span..i * span + seen]);
            out.max[r * g + i] = m;
            out.sum[r * g + i] = s;
        }
        let y = &mut out.weighted[r * g * vd..(r + 1) * g * vd];
        for (i, run) in runs.iter().enumerate() {
            for ahead in jumps(i) {
                values(&ahead).0.prefetch();
            }
            let (v, stride) = values(run);
            add_weighted_rows(&scores[run.0 - task.from..], span, v, stride, run.1, y, vd);
        }
    }
    out
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

    /// The keys and values `task` reads (its kv head, positions up to its last row's) in
    /// f32: the keys transposed, `[head_dim, positions]`, and the values
    /// `[positions, value_dim]`.
    fn head_cache(&self, ch: &ChunkPlacement<'_>, task: Task) -> (Vec<f32>, Vec<f32>) {
        let (hd, _, g) = self.dims(task);
        let len = ch.start + task.t0 + task.rows;
        let (mut k, mut v) = (Vec::new(), Vec::new());
        self.kv
            .gather_keys_transposed(self.layer, ch.blocks, len, g * hd, hd, &mut k);
        self.kv.gather(
            self.layer,
            ch.blocks,
            len,
            g * hd,
            (0, self.shape.value_dim),
            &mut Vec::new(),
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
    let keys_t = View::row_major(&k, hd, len, len);
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
        // Every cache element type (the f16 and fp8 ones read back as the same f32 values by
        // both).
        for dtype in [KvDtype::F32, KvDtype::F16, KvDtype::Int8] {
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
    fn grouped_decoding_equals_attention_head_by_head() {
        // Keys stored by dimension (the grouped path, with the positions split into parts
        // for a long sequence) against keys stored by position (row by row and by products),
        // for decoding chunks, a prompt chunk with a short tail of rows, and the heads of one
        // tensor-parallel rank (global heads 2..8 over kv heads 0..3 in groups of 3: the
        // first group held in part).
        for (shape, kv_dim) in [
            (
                HeadShape {
                    heads: 6,
                    kv_heads: 2,
                    head_dim: 32,
                    value_dim: 32,
                    scale: 0.2,
                    first_head: 0,
                    first_kv_head: 0,
                    group: 3,
                },
                64,
            ),
            (
                HeadShape {
                    heads: 6,
                    kv_heads: 3,
                    head_dim: 16,
                    value_dim: 16,
                    scale: 0.3,
                    first_head: 2,
                    first_kv_head: 0,
                    group: 3,
                },
                48,
            ),
        ] {
            for h in 0..shape.heads {
                assert!(shape.heads_of(shape.kv_of(h)).contains(&h), "head {h}");
            }
            // Blocks of 16 positions (the default: one AVX-512 register of scores), of 5 (all
            // partial registers) and of 24 (one whole register and a partial one).
            for (dtype, block) in [
                (KvDtype::F32, 16),
                (KvDtype::F16, 16),
                (KvDtype::F16, 5),
                (KvDtype::F32, 24),
                (KvDtype::Int8, 16),
                (KvDtype::Int8, 5),
            ] {
                let make =
                    || KvCache::new(1, kv_dim, block, 200, dtype).with_head_width(shape.head_dim);
                let (mut by_pos, mut by_dim) = (make(), make().with_keys_by_dimension());
                // Chunks: one decoding row after 700 cached positions, one after 5, and 70
                // prompt rows after 20 (a block of 64 rows and a tail of 6).
                let spans = [(700usize, 1usize), (5, 1), (20, 70)];
                let mut tables = Vec::new();
                for (i, &(start, len)) in spans.iter().enumerate() {
                    let need = by_pos.blocks_for(start + len);
                    let _gap = by_pos.allocate(i + 1).unwrap();
                    let mut blocks = by_pos.allocate(need).unwrap();
                    let _ = by_dim.allocate(i + 1 + need);
                    // The long sequence's table jumps block by block in its middle and runs
                    // in order around it.
                    if need > 20 {
                        blocks[10..20].reverse();
                    }
                    for pos in 0..start + len {
                        let k = values(kv_dim, pos * 3 + i);
                        let v = values(kv_dim, pos * 5 + i + 1);
                        by_pos.write(0, &blocks, pos, &k, &v);
                        by_dim.write(0, &blocks, pos, &k, &v);
                    }
                    tables.push(blocks);
                }
                let mut row = 0;
                let chunks: Vec<ChunkPlacement<'_>> = spans
                    .iter()
                    .zip(&tables)
                    .map(|(&(start, len), blocks)| {
                        row += len;
                        ChunkPlacement {
                            row: row - len,
                            len,
                            start,
                            blocks,
                        }
                    })
                    .collect();
                let q = values(row * shape.heads * shape.head_dim, 7);
                let want = attend(&q, &chunks, &by_pos, 0, shape);
                // The long sequence alone on four threads: its 701 positions in 3–4 parts.
                assert!(parts_of_positions(shape.kv_heads, 4, 701) >= 3);
                let four = rayon::ThreadPoolBuilder::new()
                    .num_threads(4)
                    .build()
                    .unwrap();
                for chunk in [&chunks[..], &chunks[..1]] {
                    let got = four.install(|| attend(&q, chunk, &by_dim, 0, shape));
                    let rows: usize = chunk.iter().map(|c| c.len).sum();
                    assert_eq!(got.len(), rows * shape.heads * shape.value_dim);
                    let err = got.iter().zip(&want).fold(0f32, |m, (x, y)| {
                        if x.is_nan() {
                            f32::INFINITY
                        } else {
                            m.max((x - y).abs())
                        }
                    });
                    assert!(err < 1e-5, "{dtype} blocks of {block} {shape:?}: {err}");
                }
            }
        }
    }

    #[test]
    fn positions_are_split_only_for_too_few_tasks() {
        // Enough (row block, kv head) pairs for two tasks a thread: no split.
        assert_eq!(parts_of_positions(8, 4, 10_000), 1);
        // One sequence's three kv heads on two threads: two parts each, if long enough.
        assert_eq!(parts_of_positions(3, 2, 1200), 2);
        assert_eq!(parts_of_positions(3, 2, 200), 1);
        // One kv head on 16 threads: at most one part per 128 positions.
        assert_eq!(parts_of_positions(1, 16, 1000), 7);
        assert_eq!(parts_of_positions(1, 16, 100_000), 32);
        assert_eq!(parts_of_positions(0, 2, 5), 1);
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
