//! The paged KV cache: keys and values of every layer in fixed-size blocks of positions; a
//! sequence owns a list of blocks (its block table), so sequences of any length share one
//! pool without fragmentation, and a finished or preempted sequence returns its blocks.
//! Entries are stored in f32, f16 or int8 with a scale per position and head ([`KvDtype`]);
//! readers get f32. The engine hands blocks
//! out through a [`BlockPool`], which shares full prompt blocks between sequences with the
//! same prefix ([`prefix`]).

pub mod prefix;

pub use prefix::{BlockPool, BlockRef, PrefixCacheStats};

use std::fmt;
use std::str::FromStr;

use half::f16;
use half::slice::HalfFloatSliceExt;
use skymoe_kernels::decode_attention::{Cached, KeyBlocks};

/// The element type of the cached keys and values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KvDtype {
    /// 4 bytes an element, exactly the computed values.
    F32,
    /// 2 bytes an element (half the memory and the reads), rounded to nearest.
    F16,
    /// 1 byte an element and an f32 scale per position and kv head (its largest magnitude
    /// over 127, as llama.cpp's `q8_0` scales blocks of 32): each element rounded to the
    /// nearest multiple of the scale. About half of f16's memory and reads.
    Int8,
}

impl KvDtype {
    /// The choice for `--kv-cache-dtype auto`: f32 for f32 weights (where outputs are compared
    /// with a full-precision reference), else f16, as vLLM keeps the cache in the activations'
    /// 16-bit type and llama.cpp in f16.
    pub fn auto(weights: skymoe_kernels::quant::WeightFormat) -> KvDtype {
        match weights {
            skymoe_kernels::quant::WeightFormat::F32 => KvDtype::F32,
            _ => KvDtype::F16,
        }
    }

    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            KvDtype::F32 => 4,
            KvDtype::F16 => 2,
            KvDtype::Int8 => 1,
        }
    }

    /// The name on the command line.
    pub fn name(self) -> &'static str {
        match self {
            KvDtype::F32 => "f32",
            KvDtype::F16 => "f16",
            KvDtype::Int8 => "int8",
        }
    }
}

impl fmt::Display for KvDtype {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for KvDtype {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "f32" | "float32" => Ok(KvDtype::F32),
            "f16" | "float16" | "half" => Ok(KvDtype::F16),
            "int8" | "i8" | "q8_0" => Ok(KvDtype::Int8),
            _ => Err(format!(
                "unknown KV cache dtype {s:?} (expected f32, f16 or int8)"
            )),
        }
    }
}

/// One layer's keys or values for the whole pool.
enum Plane {
    F32(Vec<f32>),
    F16(Vec<f16>),
    /// Integers and one scale per position and head ([`ScaleLayout`]).
    Int8 {
        q: Vec<i8>,
        scales: Vec<f32>,
        layout: ScaleLayout,
    },
}

/// Where an int8 plane keeps the scale of each stored head of each position: entries of one
/// head and position share a scale, and the scales of a head's consecutive positions in a
/// block lie one after the other.
#[derive(Debug, Clone, Copy, PartialEq)]
struct ScaleLayout {
    /// Entries of one head of one position.
    head_width: usize,
    block_size: usize,
    /// The plane stores each head's run of a block dimension by dimension.
    by_dim: bool,
}

impl ScaleLayout {
    /// The index of the scale of entry `e`.
    fn of(&self, e: usize) -> usize {
        let hw = self.head_width.max(1);
        if self.by_dim {
            // Runs of hw·block_size entries, element d of the run's position j at
            // d·block_size + j.
            (e / (hw * self.block_size)) * self.block_size + e % self.block_size
        } else {
            e / hw
        }
    }

    /// Scales a plane of `len` entries holds.
    fn count(&self, len: usize) -> usize {
        len / self.head_width.max(1)
    }
}

/// The int8 integers of `src` and their scale: the largest magnitude over 127, each value
/// rounded to the nearest multiple of it (as llama.cpp quantises a `q8_0` block).
fn quantize_int8(src: &[f32], mut put: impl FnMut(usize, i8)) -> f32 {
    let amax = src.iter().fold(0f32, |m, x| m.max(x.abs()));
    let scale = amax / 127.0;
    let inv = if scale > 0.0 { 1.0 / scale } else { 0.0 };
    for (i, &x) in src.iter().enumerate() {
        put(i, (x * inv).round().clamp(-127.0, 127.0) as i8);
    }
    scale
}

impl Plane {
    fn new(dtype: KvDtype, len: usize, layout: ScaleLayout) -> Plane {
        // Zeroed allocations: the operating system commits the pages as they are written.
        match dtype {
            KvDtype::F32 => Plane::F32(vec![0.0; len]),
            KvDtype::F16 => Plane::F16(vec![f16::ZERO; len]),
            KvDtype::Int8 => Plane::Int8 {
                q: vec![0; len],
                scales: vec![0.0; layout.count(len)],
                layout,
            },
        }
    }

    /// Give an int8 plane's scales a new layout (before anything is written).
    fn set_layout(&mut self, new: ScaleLayout) {
        if let Plane::Int8 { q, scales, layout } = self {
            *layout = new;
            *scales = vec![0.0; new.count(q.len())];
        }
    }

    fn write(&mut self, at: usize, src: &[f32]) {
        match self {
            Plane::F32(p) => p[at..at + src.len()].copy_from_slice(src),
            Plane::F16(p) => p[at..at + src.len()].convert_from_f32_slice(src),
            Plane::Int8 { q, scales, layout } => {
                let row = &mut q[at..at + src.len()];
                scales[layout.of(at)] = quantize_int8(src, |i, v| row[i] = v);
            }
        }
    }

    /// Read `dst.len()` entries from `at`: within one stored head of one position, or (keys
    /// stored by dimension) one element of consecutive positions of a block.
    fn read(&self, at: usize, dst: &mut [f32]) {
        match self {
            Plane::F32(p) => dst.copy_from_slice(&p[at..at + dst.len()]),
            Plane::F16(p) => p[at..at + dst.len()].convert_to_f32_slice(dst),
            Plane::Int8 { q, scales, layout } => {
                // Reads stay within one head of one position (one scale), or for keys stored
                // by dimension within one element of a block's positions (consecutive scales).
                let first = layout.of(at);
                let q = &q[at..at + dst.len()];
                if layout.by_dim {
                    let scales = &scales[first..first + dst.len()];
                    for ((x, &v), &s) in dst.iter_mut().zip(q).zip(scales) {
                        *x = v as f32 * s;
                    }
                } else {
                    let s = scales[first];
                    for (x, &v) in dst.iter_mut().zip(q) {
                        *x = v as f32 * s;
                    }
                }
            }
        }
    }

    /// Write `src[i]` at `at + i·stride`.
    fn write_strided(&mut self, at: usize, stride: usize, src: &[f32]) {
        match self {
            Plane::F32(p) => src
                .iter()
                .enumerate()
                .for_each(|(i, &x)| p[at + i * stride] = x),
            Plane::F16(p) => src
                .iter()
                .enumerate()
                .for_each(|(i, &x)| p[at + i * stride] = f16::from_f32(x)),
            Plane::Int8 { q, scales, layout } => {
                scales[layout.of(at)] = quantize_int8(src, |i, v| q[at + i * stride] = v);
            }
        }
    }

    /// Read `dst[i]` from `at + i·stride`: the elements of one stored head of one position.
    fn read_strided(&self, at: usize, stride: usize, dst: &mut [f32]) {
        match self {
            Plane::F32(p) => dst
                .iter_mut()
                .enumerate()
                .for_each(|(i, x)| *x = p[at + i * stride]),
            Plane::F16(p) => dst
                .iter_mut()
                .enumerate()
                .for_each(|(i, x)| *x = p[at + i * stride].to_f32()),
            // A strided read is one position's head stored by dimension: one scale.
            Plane::Int8 { q, scales, layout } => {
                let s = scales[layout.of(at)];
                dst.iter_mut()
                    .enumerate()
                    .for_each(|(i, x)| *x = q[at + i * stride] as f32 * s);
            }
        }
    }

    /// The entries `at..end`.
    fn cached(&self, at: usize, end: usize) -> Cached<'_> {
        match self {
            Plane::F32(p) => Cached::F32(&p[at..end]),
            Plane::F16(p) => Cached::F16(&p[at..end]),
            Plane::Int8 { q, scales, layout } => Cached::Int8 {
                q: &q[at..end],
                scales: &scales[layout.of(at)..],
            },
        }
    }
}

/// One kv head's keys or values of consecutive positions within one block, as stored: row
/// `j` is the `width` values from `j·stride`.
pub(crate) enum KvRows<'a> {
    F32(&'a [f32], usize, usize),
    F16(&'a [f16], usize, usize),
    /// Integers, the scales of the rows from the first, stride and width.
    Int8(&'a [i8], &'a [f32], usize, usize),
}

impl<'a> KvRows<'a> {
    /// `out[j] = Σ x[i]·row_j[i]` for every row (`out.len()` of them).
    pub(crate) fn dots(&self, x: &[f32], out: &mut [f32]) {
        match *self {
            KvRows::F32(p, stride, width) => {
                for (j, o) in out.iter_mut().enumerate() {
                    *o = crate::model::ops::dot(x, &p[j * stride..j * stride + width]);
                }
            }
            KvRows::F16(p, stride, width) => {
                skymoe_kernels::quant::dot_f16_rows(&x[..width], p, stride, out)
            }
            KvRows::Int8(p, scales, stride, width) => {
                let mut row = vec![0f32; width];
                for (j, o) in out.iter_mut().enumerate() {
                    Plane::widen(&p[j * stride..j * stride + width], &mut row);
                    *o = scales[j] * crate::model::ops::dot(x, &row);
                }
            }
        }
    }

    /// `y[i] += Σ_j a[j]·row_j[i]` over the rows (`a.len()` of them), in order.
    pub(crate) fn axpy_into(&self, a: &[f32], y: &mut [f32]) {
        match *self {
            KvRows::F32(p, stride, width) => {
                for (j, &aj) in a.iter().enumerate() {
                    crate::model::ops::axpy(aj, &p[j * stride..j * stride + width], y);
                }
            }
            KvRows::F16(p, stride, width) => {
                skymoe_kernels::quant::axpy_f16_rows(a, p, stride, &mut y[..width])
            }
            KvRows::Int8(p, scales, stride, width) => {
                let mut row = vec![0f32; width];
                for (j, &aj) in a.iter().enumerate() {
                    Plane::widen(&p[j * stride..j * stride + width], &mut row);
                    crate::model::ops::axpy(aj * scales[j], &row, y);
                }
            }
        }
    }

    /// The entries from the first row's, and the distance between rows.
    pub(crate) fn cached(self) -> (Cached<'a>, usize) {
        match self {
            KvRows::F32(p, stride, _) => (Cached::F32(p), stride),
            KvRows::F16(p, stride, _) => (Cached::F16(p), stride),
            KvRows::Int8(q, scales, stride, _) => (Cached::Int8 { q, scales }, stride),
        }
    }
}

impl Plane {
    /// Rows of `width` from `at`, `stride` apart, `n` of them.
    fn rows(&self, at: usize, stride: usize, n: usize, width: usize) -> KvRows<'_> {
        let end = at + n.saturating_sub(1) * stride + width;
        match self {
            Plane::F32(p) => KvRows::F32(&p[at..end], stride, width),
            Plane::F16(p) => KvRows::F16(&p[at..end], stride, width),
            Plane::Int8 { q, scales, layout } => {
                KvRows::Int8(&q[at..end], &scales[layout.of(at)..], stride, width)
            }
        }
    }

    /// Integers to f32 (before their scale).
    fn widen(q: &[i8], out: &mut [f32]) {
        out.iter_mut().zip(q).for_each(|(x, &v)| *x = v as f32);
    }
}

/// Key/value storage for all layers, in blocks of `block_size` positions. Stored head by head
/// (see [`KvCache::with_head_width`]), each kv head's blocks lie together in a layer's plane
/// and a block's positions of one head one after the other, so that a decoding step reads a
/// head's keys and values of consecutive blocks as one run.
pub struct KvCache {
    block_size: usize,
    num_blocks: usize,
    kv_dim: usize,
    /// Width of one kv head as stored (`kv_dim`: a block is position by position).
    head_width: usize,
    /// Values are the first elements of the keys (multi-head latent attention caches one
    /// latent per position, which is both); `values` is then empty.
    values_in_keys: bool,
    /// Each head's run of keys in a block is stored dimension by dimension (element `d` of
    /// the run's position `j` at `d·block_size + j`; see [`KvCache::with_keys_by_dimension`]).
    keys_by_dim: bool,
    dtype: KvDtype,
    keys: Vec<Plane>,
    values: Vec<Plane>,
    free: Vec<u32>,
}

impl KvCache {
    /// A pool of `num_blocks` blocks of `block_size` positions for `layers` layers whose keys
    /// and values are `kv_dim` wide (kv heads × head width), stored as `dtype`. Memory is
    /// committed lazily by the operating system as blocks are first written.
    pub fn new(
        layers: usize,
        kv_dim: usize,
        block_size: usize,
        num_blocks: usize,
        dtype: KvDtype,
    ) -> Self {
        let block_size = block_size.max(1);
        let per_layer = num_blocks * block_size * kv_dim;
        KvCache {
            block_size,
            num_blocks,
            kv_dim,
            head_width: kv_dim,
            values_in_keys: false,
            keys_by_dim: false,
            dtype,
            keys: (0..layers)
                .map(|_| Plane::new(dtype, per_layer, Self::position_layout(kv_dim, block_size)))
                .collect(),
            values: (0..layers)
                .map(|_| Plane::new(dtype, per_layer, Self::position_layout(kv_dim, block_size)))
                .collect(),
            // Hand out low block numbers first.
            free: (0..num_blocks as u32).rev().collect(),
        }
    }

    /// A pool for multi-head latent attention: one row of `width` values per position and
    /// layer (the latent, then the rotary key), read both as keys and, its leading part, as
    /// values.
    pub fn new_latent(
        layers: usize,
        width: usize,
        block_size: usize,
        num_blocks: usize,
        dtype: KvDtype,
    ) -> Self {
        let mut kv = KvCache::new(0, width, block_size, num_blocks, dtype);
        let per_layer = num_blocks * kv.block_size * width;
        let layout = Self::position_layout(width, kv.block_size);
        kv.keys = (0..layers)
            .map(|_| Plane::new(dtype, per_layer, layout))
            .collect();
        kv.values_in_keys = true;
        kv
    }

    /// Bytes one position takes over all layers, for `values_per_position` cached values per
    /// layer (keys and values together; see `ModelConfig::kv_cache_width`) in
    /// `heads_per_position` stored heads (keys and values: 2 per kv head; 1 for a latent
    /// cache), each of which has a scale in an int8 cache.
    pub fn bytes_per_position(
        layers: usize,
        values_per_position: usize,
        heads_per_position: usize,
        dtype: KvDtype,
    ) -> usize {
        let scales = match dtype {
            KvDtype::Int8 => heads_per_position * std::mem::size_of::<f32>(),
            _ => 0,
        };
        layers * (values_per_position * dtype.size() + scales)
    }

    /// The scale layout of a plane stored position by position in heads of `head_width`.
    fn position_layout(head_width: usize, block_size: usize) -> ScaleLayout {
        ScaleLayout {
            head_width,
            block_size: block_size.max(1),
            by_dim: false,
        }
    }

    /// Give the planes' scales the layout the cache now has.
    fn relayout(&mut self) {
        let values = Self::position_layout(self.head_width, self.block_size);
        let keys = ScaleLayout {
            by_dim: self.keys_by_dim,
            ..values
        };
        self.keys.iter_mut().for_each(|p| p.set_layout(keys));
        self.values.iter_mut().for_each(|p| p.set_layout(values));
    }

    /// The element type of the entries.
    pub fn dtype(&self) -> KvDtype {
        self.dtype
    }

    /// Positions per block.
    pub fn block_size(&self) -> usize {
        self.block_size
    }

    /// Blocks in the pool.
    pub fn total_blocks(&self) -> usize {
        self.num_blocks
    }

    /// Blocks not owned by any sequence.
    pub fn free_blocks(&self) -> usize {
        self.free.len()
    }

    /// Blocks needed to hold `positions` positions.
    pub fn blocks_for(&self, positions: usize) -> usize {
        positions.div_ceil(self.block_size)
    }

    /// Take `n` free blocks, or `None` (taking nothing) if fewer are free.
    pub fn allocate(&mut self, n: usize) -> Option<Vec<u32>> {
        if n > self.free.len() {
            return None;
        }
        let at = self.free.len() - n;
        // In increasing order, as a growing sequence takes them one at a time: a sequence's
        // blocks then tend to lie one after the other in each head's plane.
        let mut blocks = self.free.split_off(at);
        blocks.reverse();
        Some(blocks)
    }

    /// Return blocks to the pool.
    pub fn release(&mut self, blocks: &[u32]) {
        self.free.extend(blocks.iter().rev());
    }

    /// Store the cache head by head, for kv heads of `width` values (a divisor of the width of
    /// a position): each head's blocks lie together in a layer's plane (block `b` of head `h`
    /// at `(h·blocks + b)·block_size·width`), a block's `block_size` positions of the head one
    /// after the other. Without it (or for a `width` that does not divide a position) a block
    /// is stored position by position, as one head as wide as a position.
    pub fn with_head_width(mut self, width: usize) -> Self {
        if width > 0 && self.kv_dim.is_multiple_of(width) {
            self.head_width = width;
            self.relayout();
        }
        self
    }

    /// Store each head's keys of a block dimension by dimension, as vLLM lays out its key
    /// cache: element `d` of the block's positions lie one after the other, so that a
    /// decoding step computes the scores of consecutive positions in one vector register
    /// ([`skymoe_kernels::decode_attention::scores_by_dim`]). Values stay position by
    /// position (they are summed row by row). Not for a latent cache, whose values are read
    /// from its keys.
    pub fn with_keys_by_dimension(mut self) -> Self {
        self.keys_by_dim = !self.values_in_keys && self.head_width > 0;
        self.relayout();
        self
    }

    /// Whether keys are stored dimension by dimension ([`KvCache::with_keys_by_dimension`]).
    pub fn keys_by_dimension(&self) -> bool {
        self.keys_by_dim
    }

    /// Index (in elements) of the run of positions of `from`'s head in the block of position
    /// `pos` of a sequence with block table `blocks`, and `from`'s place in the head.
    fn run_offset(&self, blocks: &[u32], pos: usize, from: usize) -> (usize, usize) {
        let block = blocks[pos / self.block_size] as usize;
        let (head, within) = self.head_of(from);
        (
            (head * self.num_blocks + block) * self.head_width * self.block_size,
            within,
        )
    }

    /// Index (in elements) of element `from` of position `pos`'s value (or key, for a cache
    /// whose keys are stored position by position) of a sequence with block table `blocks`:
    /// its block, its head's run of positions in the block, its position in the run, and its
    /// place in the head.
    fn offset(&self, blocks: &[u32], pos: usize, from: usize) -> usize {
        let (run, within) = self.run_offset(blocks, pos, from);
        run + (pos % self.block_size) * self.head_width + within
    }

    /// Index of element `from` of position `pos`'s key, and the distance between the key's
    /// consecutive elements.
    fn key_offset(&self, blocks: &[u32], pos: usize, from: usize) -> (usize, usize) {
        if self.keys_by_dim {
            let (run, within) = self.run_offset(blocks, pos, from);
            (
                run + within * self.block_size + pos % self.block_size,
                self.block_size,
            )
        } else {
            (self.offset(blocks, pos, from), 1)
        }
    }

    /// The stored head of element `from` of a position, and its place in the head (a cache
    /// with nothing per position has one empty head).
    fn head_of(&self, from: usize) -> (usize, usize) {
        match self.head_width {
            0 => (0, from),
            hw => (from / hw, from % hw),
        }
    }

    /// Check that `width` elements from `from` stay within one stored head.
    fn check_within_head(&self, from: usize, width: usize) {
        assert!(
            self.head_of(from).1 + width <= self.head_width,
            "elements {from}..{} cross a kv head of {}",
            from + width,
            self.head_width
        );
    }

    /// Store the key and value of position `pos` in `layer` (a latent cache keeps only `k`).
    ///
    /// # Panics
    /// If `pos` is past the blocks of `blocks`, or `k` or `v` is shorter than a position.
    pub fn write(&mut self, layer: usize, blocks: &[u32], pos: usize, k: &[f32], v: &[f32]) {
        let hw = self.head_width;
        for head in 0..self.kv_dim.checked_div(hw).unwrap_or(0) {
            let (o, r) = (
                self.offset(blocks, pos, head * hw),
                head * hw..(head + 1) * hw,
            );
            match self.key_offset(blocks, pos, head * hw) {
                (ko, 1) => self.keys[layer].write(ko, &k[r.clone()]),
                (ko, stride) => self.keys[layer].write_strided(ko, stride, &k[r.clone()]),
            }
            if !self.values_in_keys {
                self.values[layer].write(o, &v[r]);
            }
        }
    }

    /// The plane values are read from.
    fn value_plane(&self, layer: usize) -> &Plane {
        if self.values_in_keys {
            &self.keys[layer]
        } else {
            &self.values[layer]
        }
    }

    /// Positions from `pos` to the end of its block: the most [`KvCache::rows`] returns at
    /// once.
    pub(crate) fn rows_in_block(&self, pos: usize) -> usize {
        self.block_size - pos % self.block_size
    }

    /// Positions `0..len` as runs `(pos, n)` that each stay within one block (what
    /// [`KvCache::rows`] takes), in order.
    pub(crate) fn block_runs(&self, len: usize) -> impl Iterator<Item = (usize, usize)> + '_ {
        let mut pos = 0;
        std::iter::from_fn(move || {
            (pos < len).then(|| {
                let n = self.rows_in_block(pos).min(len - pos);
                pos += n;
                (pos - n, n)
            })
        })
    }

    /// Positions `from..to` as runs `(pos, n)` whose blocks follow one another in the pool
    /// (what [`KvCache::rows`] and [`KvCache::key_columns`] take at once), in order: a new run
    /// starts where the block table jumps (and after a first block entered at `from`, if
    /// `from` is not a block's first position).
    pub(crate) fn consecutive_runs(
        &self,
        blocks: &[u32],
        from: usize,
        to: usize,
    ) -> Vec<(usize, usize)> {
        let bs = self.block_size;
        let mut runs: Vec<(usize, usize)> = Vec::new();
        let mut pos = from;
        while pos < to {
            let n = self.rows_in_block(pos).min(to - pos);
            match runs.last_mut() {
                // A run that starts within a block stays in it (see `check_run`).
                Some(last)
                    if last.0.is_multiple_of(bs)
                        && blocks[pos / bs] == blocks[pos / bs - 1].wrapping_add(1) =>
                {
                    last.1 += n
                }
                _ => runs.push((pos, n)),
            }
            pos += n;
        }
        runs
    }

    /// Check that positions `pos .. pos + n` of a sequence lie in one block or in blocks that
    /// follow one another in the pool, starting at a block's first position.
    fn check_run(&self, blocks: &[u32], pos: usize, n: usize) {
        if n <= self.rows_in_block(pos) {
            return;
        }
        let bs = self.block_size;
        assert!(
            pos.is_multiple_of(bs),
            "positions {pos}..{} cross a block from within one",
            pos + n
        );
        for b in pos / bs + 1..(pos + n).div_ceil(bs) {
            assert!(
                blocks[b] == blocks[b - 1].wrapping_add(1),
                "positions {pos}..{} cross a block that does not follow its predecessor",
                pos + n
            );
        }
    }

    /// The keys (`value: false`) or values of positions `pos .. pos + n` of a sequence (block
    /// table `blocks`) in `layer`, in `pos`'s block or blocks following it in the pool (see
    /// [`KvCache::consecutive_runs`]): the `width` elements starting at `from` of each (one
    /// kv head).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn rows(
        &self,
        layer: usize,
        value: bool,
        blocks: &[u32],
        pos: usize,
        n: usize,
        from: usize,
        width: usize,
    ) -> KvRows<'_> {
        self.check_run(blocks, pos, n);
        self.check_within_head(from, width);
        assert!(
            value || !self.keys_by_dim,
            "keys stored by dimension are read as columns"
        );
        let plane = if value {
            self.value_plane(layer)
        } else {
            &self.keys[layer]
        };
        plane.rows(
            self.offset(blocks, pos, from),
            // Positions of one head's run of a block lie a head's width apart.
            self.head_width,
            n,
            width,
        )
    }

    /// The keys of positions `pos .. pos + n` of a sequence (block table `blocks`) in
    /// `layer`, in `pos`'s block or blocks following it in the pool (see
    /// [`KvCache::consecutive_runs`]), from element `from` of each (one kv head, `width`
    /// elements), stored by dimension: element `d` of position `pos + j` is entry
    /// `layout.entry(d, j)` of the returned entries.
    ///
    /// # Panics
    /// If the keys are stored position by position, the positions cross a block that does
    /// not follow its predecessor (or start within a block they leave), or the elements
    /// cross a head.
    pub(crate) fn key_columns(
        &self,
        layer: usize,
        blocks: &[u32],
        pos: usize,
        n: usize,
        from: usize,
        width: usize,
    ) -> (Cached<'_>, KeyBlocks) {
        assert!(self.keys_by_dim, "keys are stored position by position");
        self.check_run(blocks, pos, n);
        self.check_within_head(from, width);
        let (at, stride) = self.key_offset(blocks, pos, from);
        let layout = KeyBlocks {
            block: stride,
            pitch: self.head_width * self.block_size,
        };
        let end = match (width, n) {
            (0, _) | (_, 0) => at,
            _ => at + layout.entry(width - 1, n - 1) + 1,
        };
        (self.keys[layer].cached(at, end), layout)
    }

    /// The keys of positions `0..len` of a sequence (block table `blocks`) in `layer`, from
    /// element `from` of each (one kv head, `width` elements), transposed: `[width, len]`
    /// row-major (element `d` of position `p` at `d·len + p`), replacing the contents of
    /// `keys`. From a cache storing keys by dimension this converts each block's dimensions
    /// as whole runs.
    pub(crate) fn gather_keys_transposed(
        &self,
        layer: usize,
        blocks: &[u32],
        len: usize,
        from: usize,
        width: usize,
        keys: &mut Vec<f32>,
    ) {
        self.check_within_head(from, width);
        keys.resize(len * width, 0.0);
        let mut row = vec![0f32; width];
        for (pos, n) in self.block_runs(len) {
            if self.keys_by_dim {
                let (at, stride) = self.key_offset(blocks, pos, from);
                for d in 0..width {
                    let out = &mut keys[d * len + pos..d * len + pos + n];
                    self.keys[layer].read(at + d * stride, out);
                }
                continue;
            }
            for j in 0..n {
                self.keys[layer].read(self.offset(blocks, pos + j, from), &mut row);
                for (d, &x) in row.iter().enumerate() {
                    keys[d * len + pos + j] = x;
                }
            }
        }
    }

    /// The keys and values of positions `0..len` of a sequence (block table `blocks`) for
    /// the elements starting at `from` within a position (one kv head), `width` of keys and
    /// `value_width` of values, in f32, `[len, width]` and `[len, value_width]` row-major,
    /// replacing the contents of `keys` and `values`.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn gather(
        &self,
        layer: usize,
        blocks: &[u32],
        len: usize,
        from: usize,
        (width, value_width): (usize, usize),
        keys: &mut Vec<f32>,
        values: &mut Vec<f32>,
    ) {
        self.check_within_head(from, width.max(value_width));
        keys.resize(len * width, 0.0);
        values.resize(len * value_width, 0.0);
        let value_plane = self.value_plane(layer);
        for pos in 0..len {
            let o = self.offset(blocks, pos, from);
            let key = &mut keys[pos * width..(pos + 1) * width];
            match self.key_offset(blocks, pos, from) {
                (ko, 1) => self.keys[layer].read(ko, key),
                (ko, stride) => self.keys[layer].read_strided(ko, stride, key),
            }
            value_plane.read(o, &mut values[pos * value_width..(pos + 1) * value_width]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_are_allocated_and_returned() {
        let mut kv = KvCache::new(2, 4, 16, 3, KvDtype::F32);
        assert_eq!(kv.blocks_for(33), 3);
        let a = kv.allocate(2).unwrap();
        assert_eq!(a.len(), 2);
        assert!(kv.allocate(2).is_none(), "only one block left");
        assert_eq!(kv.free_blocks(), 1);
        kv.write(1, &a, 17, &[1.0, 2.0, 3.0, 4.0], &[5.0, 6.0, 7.0, 8.0]);
        let (mut k, mut v) = (Vec::new(), Vec::new());
        kv.gather(1, &a, 18, 1, (2, 2), &mut k, &mut v);
        assert_eq!(k.len(), 36);
        assert_eq!(&k[34..], &[2.0, 3.0]);
        assert_eq!(&v[34..], &[6.0, 7.0]);
        kv.release(&a);
        assert_eq!(kv.free_blocks(), 3);
    }

    #[test]
    fn a_latent_cache_reads_values_from_its_keys() {
        let mut kv = KvCache::new_latent(2, 5, 4, 3, KvDtype::F32);
        let blocks = kv.allocate(2).unwrap();
        kv.write(1, &blocks, 6, &[1.0, 2.0, 3.0, 4.0, 5.0], &[]);
        let (mut k, mut v) = (Vec::new(), Vec::new());
        kv.gather(1, &blocks, 7, 0, (5, 3), &mut k, &mut v);
        assert_eq!(
            (&k[30..], &v[18..]),
            (&[1.0, 2.0, 3.0, 4.0, 5.0][..], &[1.0, 2.0, 3.0][..])
        );
        let mut dot = [0f32];
        kv.rows(1, true, &blocks, 6, 1, 0, 3)
            .dots(&[1.0, 1.0, 1.0], &mut dot);
        assert_eq!(dot, [6.0]);
        assert!(kv.values.is_empty(), "no value planes");
    }

    #[test]
    fn rows_of_a_block_read_what_gather_reads() {
        // Two kv heads of width 3 (kv_dim 6), blocks of 4 positions out of order, stored
        // position by position and head by head.
        for (dtype, heads) in [
            (KvDtype::F32, false),
            (KvDtype::F16, false),
            (KvDtype::F32, true),
            (KvDtype::F16, true),
            (KvDtype::Int8, false),
            (KvDtype::Int8, true),
        ] {
            let mut kv = KvCache::new(1, 6, 4, 5, dtype);
            if heads {
                kv = kv.with_head_width(3);
            }
            let blocks = [4u32, 1, 3];
            let row = |p: usize, v: f32| -> Vec<f32> {
                (0..6).map(|i| v * (p * 6 + i) as f32 / 8.0).collect()
            };
            for p in 0..11 {
                kv.write(0, &blocks, p, &row(p, 1.0), &row(p, -0.5));
            }
            let (mut k, mut v) = (Vec::new(), Vec::new());
            kv.gather(0, &blocks, 11, 3, (3, 3), &mut k, &mut v);
            let x = [0.5f32, -1.0, 2.0];
            let runs: Vec<(usize, usize)> = kv.block_runs(11).collect();
            assert_eq!(runs, [(0, 4), (4, 4), (8, 3)]);
            for (pos, n) in runs {
                let mut got = vec![0f32; n];
                kv.rows(0, false, &blocks, pos, n, 3, 3).dots(&x, &mut got);
                for (j, g) in got.iter().enumerate() {
                    let want: f32 = (0..3).map(|i| x[i] * k[(pos + j) * 3 + i]).sum();
                    assert!(
                        (g - want).abs() <= 1e-5 * want.abs().max(1.0),
                        "{dtype:?} {pos}+{j}"
                    );
                }
                let a: Vec<f32> = (0..n).map(|j| 0.25 + j as f32).collect();
                let mut y = [1.0f32; 3];
                kv.rows(0, true, &blocks, pos, n, 3, 3)
                    .axpy_into(&a, &mut y);
                for (i, yi) in y.iter().enumerate() {
                    let want: f32 = 1.0 + (0..n).map(|j| a[j] * v[(pos + j) * 3 + i]).sum::<f32>();
                    assert!(
                        (yi - want).abs() <= 1e-5 * want.abs().max(1.0),
                        "{dtype:?} {pos}"
                    );
                }
            }
        }
    }

    #[test]
    fn key_columns_read_what_gather_reads() {
        // Two kv heads of 5 (kv_dim 10), blocks of 4 positions out of order, keys stored by
        // dimension: each block's columns give the scores gather's keys give.
        for dtype in [KvDtype::F32, KvDtype::F16, KvDtype::Int8] {
            let mut by_pos = KvCache::new(2, 10, 4, 6, dtype).with_head_width(5);
            let mut kv = KvCache::new(2, 10, 4, 6, dtype)
                .with_head_width(5)
                .with_keys_by_dimension();
            let blocks = [5u32, 2, 3];
            for layer in 0..2 {
                for p in 0..11 {
                    let k: Vec<f32> = (0..10)
                        .map(|i| ((p * 10 + i + layer) as f32).sin())
                        .collect();
                    kv.write(layer, &blocks, p, &k, &k);
                    by_pos.write(layer, &blocks, p, &k, &k);
                }
            }
            let x = [0.5f32, -1.0, 2.0, 0.25, -0.75];
            for (layer, head) in [(0, 0), (1, 1)] {
                let (mut k, mut v) = (Vec::new(), Vec::new());
                kv.gather(layer, &blocks, 11, head * 5, (5, 5), &mut k, &mut v);
                // The transposed gather, from both layouts, is gather's keys transposed.
                for cache in [&kv, &by_pos] {
                    let mut kt = Vec::new();
                    cache.gather_keys_transposed(layer, &blocks, 11, head * 5, 5, &mut kt);
                    for p in 0..11 {
                        for d in 0..5 {
                            assert_eq!(kt[d * 11 + p], k[p * 5 + d], "{dtype:?} {p} {d}");
                        }
                    }
                }
                // Blocks 2 and 3 follow one another: one run of 7 positions.
                let runs = kv.consecutive_runs(&blocks, 0, 11);
                assert_eq!(runs, [(0, 4), (4, 7)]);
                // Entered within a block, the first run stays in it.
                assert_eq!(kv.consecutive_runs(&blocks, 6, 11), [(6, 2), (8, 3)]);
                for (pos, n) in runs {
                    let (cols, layout) = kv.key_columns(layer, &blocks, pos, n, head * 5, 5);
                    assert_eq!(layout.block, 4);
                    let mut got = vec![0f32; n];
                    skymoe_kernels::decode_attention::scores_by_dim(
                        &x, 5, 1.0, cols, layout, n, &mut got, n,
                    );
                    for (j, g) in got.iter().enumerate() {
                        let want: f32 = (0..5).map(|i| x[i] * k[(pos + j) * 5 + i]).sum();
                        assert!(
                            (g - want).abs() <= 1e-5,
                            "{dtype:?} {layer} {head} {pos}+{j}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    #[should_panic(expected = "read as columns")]
    fn keys_by_dimension_are_not_read_as_rows() {
        let kv = KvCache::new(1, 6, 4, 5, KvDtype::F32)
            .with_head_width(3)
            .with_keys_by_dimension();
        let _ = kv.rows(0, false, &[0, 1], 0, 2, 0, 3);
    }

    #[test]
    fn blocks_are_stored_head_by_head() {
        // Two heads of 2 in blocks of 3 positions: each head's blocks lie together, a block
        // holding the head's three positions one after the other; a width that does not
        // divide a position keeps the position order.
        let mut kv = KvCache::new(1, 4, 3, 2, KvDtype::F32).with_head_width(2);
        let mut by_dim = KvCache::new(1, 4, 3, 2, KvDtype::F32)
            .with_head_width(2)
            .with_keys_by_dimension();
        assert!(by_dim.keys_by_dimension() && !kv.keys_by_dimension());
        for pos in 0..6 {
            let p = pos as f32;
            let (k, v) = (
                [p, p + 0.1, p + 0.2, p + 0.3],
                [-p, -p - 0.1, -p - 0.2, -p - 0.3],
            );
            kv.write(0, &[1, 0], pos, &k, &v);
            by_dim.write(0, &[1, 0], pos, &k, &v);
        }
        let entries = |kv: &KvCache, values: bool| -> Vec<f32> {
            match if values { &kv.values[0] } else { &kv.keys[0] } {
                Plane::F32(p) => p.clone(),
                _ => unreachable!(),
            }
        };
        let by_position = [
            3.0, 3.1, 4.0, 4.1, 5.0, 5.1, 0.0, 0.1, 1.0, 1.1, 2.0, 2.1, // head 0: blocks 0, 1
            3.2, 3.3, 4.2, 4.3, 5.2, 5.3, 0.2, 0.3, 1.2, 1.3, 2.2, 2.3, // head 1: blocks 0, 1
        ];
        // Keys by dimension: element 0 of the block's three positions, then element 1.
        let keys_by_dim = [
            3.0, 4.0, 5.0, 3.1, 4.1, 5.1, 0.0, 1.0, 2.0, 0.1, 1.1, 2.1, // head 0
            3.2, 4.2, 5.2, 3.3, 4.3, 5.3, 0.2, 1.2, 2.2, 0.3, 1.3, 2.3, // head 1
        ];
        let close = |got: Vec<f32>, want: &[f32], sign: f32| {
            assert_eq!(got.len(), want.len());
            for (g, w) in got.iter().zip(want) {
                assert!((g - sign * w).abs() < 1e-6, "{got:?}");
            }
        };
        close(entries(&kv, false), &by_position, 1.0);
        close(entries(&kv, true), &by_position, -1.0);
        close(entries(&by_dim, false), &keys_by_dim, 1.0);
        close(entries(&by_dim, true), &by_position, -1.0);
        for kv in [&kv, &by_dim] {
            let (mut k, mut v) = (Vec::new(), Vec::new());
            kv.gather(0, &[1, 0], 5, 2, (2, 2), &mut k, &mut v);
            assert_eq!(k.len(), 10);
            assert!((k[8] - 4.2).abs() < 1e-6 && (v[9] + 4.3).abs() < 1e-6);
        }
        // A latent cache's values are its keys: they stay position by position.
        assert!(!KvCache::new_latent(1, 4, 3, 2, KvDtype::F32)
            .with_keys_by_dimension()
            .keys_by_dimension());
        assert_eq!(
            KvCache::new(1, 4, 3, 2, KvDtype::F32)
                .with_head_width(3)
                .head_width,
            4
        );
    }

    #[test]
    fn a_cache_without_values_per_position_writes_and_reads_nothing() {
        let mut kv = KvCache::new(1, 0, 4, 2, KvDtype::F16).with_head_width(0);
        let blocks = kv.allocate(2).unwrap();
        kv.write(0, &blocks, 5, &[], &[]);
        let (mut k, mut v) = (Vec::new(), Vec::new());
        kv.gather(0, &blocks, 6, 0, (0, 0), &mut k, &mut v);
        assert!(k.is_empty() && v.is_empty());
    }

    #[test]
    #[should_panic(expected = "cross a kv head")]
    fn rows_may_not_cross_a_head() {
        let kv = KvCache::new(1, 6, 4, 5, KvDtype::F32).with_head_width(3);
        let _ = kv.rows(0, false, &[0, 1], 0, 2, 2, 3);
    }

    #[test]
    #[should_panic(expected = "cross a block")]
    fn rows_may_not_cross_a_block() {
        let kv = KvCache::new(1, 6, 4, 5, KvDtype::F32);
        let _ = kv.rows(0, false, &[0, 1], 2, 3, 0, 6);
    }

    #[test]
    fn f16_entries_are_the_values_rounded_to_f16_at_half_the_size() {
        let mut kv = KvCache::new(1, 3, 2, 4, KvDtype::F16);
        assert_eq!(KvCache::bytes_per_position(1, 6, 2, KvDtype::F16), 12);
        assert_eq!(KvCache::bytes_per_position(1, 6, 2, KvDtype::F32), 24);
        // Blocks out of order: positions 0-1 in block 3, 2-3 in block 0.
        let blocks = [3u32, 0];
        let key = |p: usize| [0.1 * p as f32, -1.0e-3, 3.0e4 + p as f32];
        for p in 0..4 {
            let k = key(p);
            let v = k.map(|x| -x);
            kv.write(0, &blocks, p, &k, &v);
        }
        let (mut k, mut v) = (Vec::new(), Vec::new());
        kv.gather(0, &blocks, 4, 0, (3, 3), &mut k, &mut v);
        for p in 0..4 {
            for (j, &x) in key(p).iter().enumerate() {
                let rounded = f16::from_f32(x).to_f32();
                assert_eq!(k[p * 3 + j], rounded);
                assert_eq!(v[p * 3 + j], -rounded);
            }
        }
        assert_eq!("F16".parse::<KvDtype>(), Ok(KvDtype::F16));
        assert!("bf8".parse::<KvDtype>().is_err());
    }

    #[test]
    fn int8_entries_are_each_heads_values_rounded_to_a_multiple_of_its_scale() {
        // Two scales per position (two heads of 2) and their integers, in every layout.
        assert_eq!(
            KvCache::bytes_per_position(2, 8, 4, KvDtype::Int8),
            2 * (8 + 16)
        );
        let key = |p: usize| [0.1 * p as f32 + 0.3, -3.0e-3, 500.0 + p as f32, -1.25];
        for (heads, by_dim) in [(false, false), (true, false), (true, true)] {
            let mut kv = KvCache::new(2, 4, 3, 4, KvDtype::Int8);
            if heads {
                kv = kv.with_head_width(2);
            }
            if by_dim {
                kv = kv.with_keys_by_dimension();
            }
            let blocks = [2u32, 0];
            for layer in 0..2 {
                for p in 0..5 {
                    let k = key(p + layer);
                    kv.write(layer, &blocks, p, &k, &k.map(|x| -2.0 * x));
                }
            }
            // The scale of each stored head: its largest magnitude over 127.
            let width = if heads { 2 } else { 4 };
            for layer in 0..2 {
                let (mut k, mut v) = (Vec::new(), Vec::new());
                for from in (0..4).step_by(width) {
                    kv.gather(layer, &blocks, 5, from, (width, width), &mut k, &mut v);
                    for p in 0..5 {
                        let head = &key(p + layer)[from..from + width];
                        let scale = head.iter().fold(0f32, |m, x| m.max(x.abs())) / 127.0;
                        for (i, &x) in head.iter().enumerate() {
                            let want = (x / scale).round() * scale;
                            let got = (k[p * width + i], v[p * width + i]);
                            let tol = 1e-6 * scale.max(1.0);
                            assert!(
                                (got.0 - want).abs() <= tol
                                    && (got.1 + 2.0 * want).abs() <= 2.0 * tol,
                                "{heads} {by_dim} layer {layer} pos {p} {}: {got:?} vs {want}",
                                from + i
                            );
                            assert!((got.0 - x).abs() <= scale / 2.0 + tol);
                        }
                    }
                }
            }
        }
        assert_eq!("q8_0".parse::<KvDtype>(), Ok(KvDtype::Int8));
        assert_eq!(KvDtype::Int8.to_string(), "int8");
    }
}
