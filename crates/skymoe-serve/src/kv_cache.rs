//! The paged KV cache: keys and values of every layer in fixed-size blocks of positions; a
//! sequence owns a list of blocks (its block table), so sequences of any length share one
//! pool without fragmentation, and a finished or preempted sequence returns its blocks.

/// Key/value storage for all layers, in blocks of `block_size` positions.
pub struct KvCache {
    block_size: usize,
    num_blocks: usize,
    kv_dim: usize,
    keys: Vec<Vec<f32>>,
    values: Vec<Vec<f32>>,
    free: Vec<u32>,
}

impl KvCache {
    /// A pool of `num_blocks` blocks of `block_size` positions for `layers` layers whose keys
    /// and values are `kv_dim` wide (kv heads × head width). Memory is committed lazily by the
    /// operating system as blocks are first written.
    pub fn new(layers: usize, kv_dim: usize, block_size: usize, num_blocks: usize) -> Self {
        let per_layer = num_blocks * block_size * kv_dim;
        KvCache {
            block_size: block_size.max(1),
            num_blocks,
            kv_dim,
            keys: (0..layers).map(|_| vec![0.0; per_layer]).collect(),
            values: (0..layers).map(|_| vec![0.0; per_layer]).collect(),
            // Hand out low block numbers first.
            free: (0..num_blocks as u32).rev().collect(),
        }
    }

    /// Bytes one position takes over all layers (keys and values).
    pub fn bytes_per_position(layers: usize, kv_dim: usize) -> usize {
        layers * kv_dim * 2 * std::mem::size_of::<f32>()
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
        Some(self.free.split_off(at))
    }

    /// Return blocks to the pool.
    pub fn release(&mut self, blocks: &[u32]) {
        self.free.extend(blocks.iter().rev());
    }

    /// Index (in floats) of position `pos` of a sequence with block table `blocks`.
    pub(crate) fn offset(&self, blocks: &[u32], pos: usize) -> usize {
        let block = blocks[pos / self.block_size] as usize;
        (block * self.block_size + pos % self.block_size) * self.kv_dim
    }

    /// Store the key and value of position `pos` in `layer`.
    pub(crate) fn write(&mut self, layer: usize, blocks: &[u32], pos: usize, k: &[f32], v: &[f32]) {
        let o = self.offset(blocks, pos);
        self.keys[layer][o..o + self.kv_dim].copy_from_slice(k);
        self.values[layer][o..o + self.kv_dim].copy_from_slice(v);
    }

    /// Keys and values of `layer`.
    pub(crate) fn layer(&self, layer: usize) -> (&[f32], &[f32]) {
        (&self.keys[layer], &self.values[layer])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_are_allocated_and_returned() {
        let mut kv = KvCache::new(2, 4, 16, 3);
        assert_eq!(kv.blocks_for(33), 3);
        let a = kv.allocate(2).unwrap();
        assert_eq!(a.len(), 2);
        assert!(kv.allocate(2).is_none(), "only one block left");
        assert_eq!(kv.free_blocks(), 1);
        kv.write(1, &a, 17, &[1.0; 4], &[2.0; 4]);
        let o = kv.offset(&a, 17);
        assert_eq!(&kv.layer(1).0[o..o + 4], &[1.0; 4]);
        assert_eq!(&kv.layer(1).1[o..o + 4], &[2.0; 4]);
        kv.release(&a);
        assert_eq!(kv.free_blocks(), 3);
    }
}
