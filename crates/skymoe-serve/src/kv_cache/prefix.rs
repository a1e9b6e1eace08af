//! Block accounting for the engine, with automatic prefix caching.
//!
//! [`BlockPool`] hands out the KV cache's block numbers to sequences and takes them back. A
//! block is reference-counted: with prefix caching, a full block of prompt positions is
//! shared by every running sequence whose tokens up to and including that block are the
//! same, and it returns to the free pool only when the last of them releases it.
//!
//! A computed full block is registered under a key that covers its tokens and its whole
//! prefix: the chained hash `key(parent key, this block's token ids)`. A lookup walks a new
//! prompt's full blocks from the first and stops at the first miss; on every hit the stored
//! token ids and the identity of the parent block (its number and the generation of its
//! contents) are compared with the prompt's, so a hash collision can never hand out keys
//! and values computed for other tokens. Only full blocks are registered, and a sequence only
//! ever writes positions after its last full, registered block, so shared blocks are never
//! written (no copy-on-write is needed).
//!
//! A released block that holds registered contents stays in the index and can be taken
//! again by a later request with the same prefix, until the allocator needs it: free blocks
//! without cached contents are handed out first, then cached ones least recently released
//! first (a sequence releases its blocks last first, so a prefix outlives its extensions).
//! Handing a block out for new contents removes it from the index and bumps its generation,
//! so nothing can match its old contents afterwards.

use std::collections::hash_map::DefaultHasher;
use std::collections::{BTreeMap, HashMap};
use std::hash::{Hash, Hasher};

/// A registered block as a sequence holds it: its number, the generation of its contents
/// and its key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockRef {
    /// The block number.
    pub block: u32,
    generation: u64,
    key: u64,
}

impl BlockRef {
    /// The block's chained key.
    pub fn key(&self) -> u64 {
        self.key
    }
}

/// Counters of the prefix cache since the pool was created.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PrefixCacheStats {
    /// Prompt tokens of the sequences looked up (every admission, readmissions after
    /// preemption included).
    pub queried_tokens: u64,
    /// Of those, tokens whose keys and values were found in the cache.
    pub hit_tokens: u64,
    /// Full blocks that could have been shared (every full block before the one holding a
    /// prompt's last token).
    pub queried_blocks: u64,
    /// Of those, blocks found in the cache.
    pub hit_blocks: u64,
    /// Cached blocks whose contents were dropped to make room.
    pub evictions: u64,
}

/// What a registered block holds, to verify a lookup hit exactly.
#[derive(Debug)]
struct Cached {
    key: u64,
    /// The parent block's number and generation (`None` for a sequence's first block).
    parent: Option<(u32, u64)>,
    tokens: Box<[u32]>,
}

#[derive(Debug, Default)]
struct BlockMeta {
    /// Sequences holding the block.
    refs: u32,
    /// Bumped whenever the block is handed out for new contents.
    generation: u64,
    cached: Option<Cached>,
    /// Position in the LRU order while the block is free and cached.
    stamp: Option<u64>,
}

/// The key of a full block whose parent block has key `parent` (`None`: the sequence's
/// first block) and whose positions hold `tokens`.
pub fn block_key(parent: Option<u64>, tokens: &[u32]) -> u64 {
    let mut h = DefaultHasher::new();
    match parent {
        Some(p) => {
            1u8.hash(&mut h);
            p.hash(&mut h);
        }
        None => 0u8.hash(&mut h),
    }
    tokens.hash(&mut h);
    h.finish()
}

/// Reference-counted KV blocks with an index of cached full blocks (see the module docs).
#[derive(Debug)]
pub struct BlockPool {
    block_size: usize,
    enabled: bool,
    meta: Vec<BlockMeta>,
    /// Free blocks without cached contents.
    free_plain: Vec<u32>,
    /// Free blocks with cached contents, least recently released first.
    free_cached: BTreeMap<u64, u32>,
    next_stamp: u64,
    /// Key → the block registered under it.
    index: HashMap<u64, u32>,
    /// Keys of blocks being computed by running sequences (with multiplicity).
    pending: HashMap<u64, u32>,
    stats: PrefixCacheStats,
}

impl BlockPool {
    /// `num_blocks` free blocks of `block_size` positions; `prefix_caching` turns sharing
    /// on (off: a plain allocator, lookups always miss and nothing is registered).
    pub fn new(num_blocks: usize, block_size: usize, prefix_caching: bool) -> Self {
        BlockPool {
            block_size: block_size.max(1),
            enabled: prefix_caching,
            meta: (0..num_blocks).map(|_| BlockMeta::default()).collect(),
            // Hand out low block numbers first.
            free_plain: (0..num_blocks as u32).rev().collect(),
            free_cached: BTreeMap::new(),
            next_stamp: 0,
            index: HashMap::new(),
            pending: HashMap::new(),
            stats: PrefixCacheStats::default(),
        }
    }

    /// Whether prefix caching is on.
    pub fn prefix_caching(&self) -> bool {
        self.enabled
    }

    /// Positions per block.
    pub fn block_size(&self) -> usize {
        self.block_size
    }

    /// Blocks in the pool.
    pub fn total_blocks(&self) -> usize {
        self.meta.len()
    }

    /// Blocks no sequence holds (cached or not).
    pub fn free_blocks(&self) -> usize {
        self.free_plain.len() + self.free_cached.len()
    }

    /// Blocks held by at least one sequence.
    pub fn used_blocks(&self) -> usize {
        self.total_blocks() - self.free_blocks()
    }

    /// Blocks whose contents are registered in the index (held or free).
    pub fn cached_blocks(&self) -> usize {
        self.index.len()
    }

    /// Sequences holding `block` (0 for a free or unknown block).
    pub fn refs(&self, block: u32) -> u32 {
        self.meta.get(block as usize).map_or(0, |m| m.refs)
    }

    /// Whether a sequence may write `block`: it holds it alone and it is not registered.
    pub fn is_writable(&self, block: u32) -> bool {
        self.meta
            .get(block as usize)
            .is_some_and(|m| m.refs == 1 && m.cached.is_none())
    }

    /// The counters.
    pub fn stats(&self) -> PrefixCacheStats {
        self.stats
    }

    /// Blocks needed to hold `positions` positions.
    pub fn blocks_for(&self, positions: usize) -> usize {
        positions.div_ceil(self.block_size)
    }

    /// Full blocks of a prompt of `len` tokens that may be taken from the cache: every full
    /// block before the one holding its last token, which is always computed (its logits
    /// are needed, and the partial or last block is the sequence's own to write).
    pub fn shareable_blocks(&self, len: usize) -> usize {
        len.saturating_sub(1) / self.block_size
    }

    /// Extend `keys` with the chained keys of the full blocks of `tokens` it does not cover
    /// yet (`keys` holds the keys of the first blocks of these same tokens).
    pub fn extend_keys(&self, tokens: &[u32], keys: &mut Vec<u64>) {
        let full = tokens.len() / self.block_size;
        while keys.len() < full {
            let i = keys.len();
            let block = &tokens[i * self.block_size..(i + 1) * self.block_size];
            keys.push(block_key(keys.last().copied(), block));
        }
    }

    /// The cached blocks that hold the first shareable blocks of `tokens`, in order,
    /// verified against their stored tokens and parents; `keys` are the chained keys of
    /// `tokens`' full blocks ([`BlockPool::extend_keys`]). Empty when caching is off.
    pub fn lookup(&self, tokens: &[u32], keys: &[u64]) -> Vec<BlockRef> {
        let mut hits: Vec<BlockRef> = Vec::new();
        if !self.enabled {
            return hits;
        }
        let n = self.shareable_blocks(tokens.len()).min(keys.len());
        for (i, &key) in keys.iter().enumerate().take(n) {
            let Some(&b) = self.index.get(&key) else {
                break;
            };
            let parent = hits.last().map(|p| (p.block, p.generation));
            let block = &tokens[i * self.block_size..(i + 1) * self.block_size];
            let m = &self.meta[b as usize];
            match &m.cached {
                Some(c) if c.key == key && c.parent == parent && *c.tokens == *block => {
                    hits.push(BlockRef {
                        block: b,
                        generation: m.generation,
                        key,
                    })
                }
                _ => break,
            }
        }
        hits
    }

    /// Whether the block with key `key` is being computed by a running sequence (a request
    /// with that prefix does better to wait for it than to compute it again).
    pub fn is_pending(&self, key: u64) -> bool {
        self.enabled && self.pending.contains_key(&key)
    }

    /// Note that a running sequence is computing blocks with these keys.
    pub fn mark_pending(&mut self, keys: &[u64]) {
        if !self.enabled {
            return;
        }
        for &k in keys {
            *self.pending.entry(k).or_insert(0) += 1;
        }
    }

    /// Undo [`BlockPool::mark_pending`] for these keys (computed, or the sequence left).
    pub fn unmark_pending(&mut self, keys: &[u64]) {
        for k in keys {
            if let Some(n) = self.pending.get_mut(k) {
                *n -= 1;
                if *n == 0 {
                    self.pending.remove(k);
                }
            }
        }
    }

    /// Count one lookup of a prompt of `tokens` tokens that found `hits` blocks.
    pub fn record_query(&mut self, tokens: usize, hits: usize) {
        if !self.enabled {
            return;
        }
        self.stats.queried_tokens += tokens as u64;
        self.stats.hit_tokens += (hits * self.block_size) as u64;
        self.stats.queried_blocks += self.shareable_blocks(tokens) as u64;
        self.stats.hit_blocks += hits as u64;
    }

    /// Take the blocks `hits` (from [`BlockPool::lookup`], just before) and `fresh` new
    /// blocks: the block table hits first. `None`, taking nothing, when there are not enough
    /// free blocks (the hits that are free count against them).
    pub fn acquire(&mut self, hits: &[BlockRef], fresh: usize) -> Option<Vec<u32>> {
        let valid = hits.iter().all(|h| {
            self.meta.get(h.block as usize).is_some_and(|m| {
                m.generation == h.generation && m.cached.as_ref().is_some_and(|c| c.key == h.key)
            })
        });
        if !valid {
            return None;
        }
        let idle_hits = hits
            .iter()
            .filter(|h| self.meta[h.block as usize].refs == 0)
            .count();
        if fresh > self.free_blocks() - idle_hits {
            return None;
        }
        let mut table = Vec::with_capacity(hits.len() + fresh);
        for h in hits {
            let m = &mut self.meta[h.block as usize];
            if m.refs == 0 {
                if let Some(stamp) = m.stamp.take() {
                    self.free_cached.remove(&stamp);
                }
            }
            m.refs += 1;
            table.push(h.block);
        }
        for _ in 0..fresh {
            let b = self.take_free()?;
            table.push(b);
        }
        Some(table)
    }

    /// Take `n` new blocks (no sharing), or `None` taking nothing.
    pub fn allocate(&mut self, n: usize) -> Option<Vec<u32>> {
        self.acquire(&[], n)
    }

    /// One free block for new contents: an uncached one if any, else the least recently
    /// released cached one, whose contents leave the index.
    fn take_free(&mut self) -> Option<u32> {
        let b = match self.free_plain.pop() {
            Some(b) => b,
            None => {
                let (_, b) = self.free_cached.pop_first()?;
                self.stats.evictions += 1;
                b
            }
        };
        self.forget(b);
        let m = &mut self.meta[b as usize];
        m.stamp = None;
        m.generation += 1;
        m.refs = 1;
        Some(b)
    }

    /// Remove `b`'s contents from the index.
    fn forget(&mut self, b: u32) {
        if let Some(c) = self.meta[b as usize].cached.take() {
            if self.index.get(&c.key) == Some(&b) {
                self.index.remove(&c.key);
            }
        }
    }

    /// A sequence lets go of its block table: each block's count drops, and blocks no
    /// sequence holds any more become free (the table's last blocks first in the LRU order).
    pub fn release(&mut self, blocks: &[u32]) {
        for &b in blocks.iter().rev() {
            let Some(m) = self.meta.get_mut(b as usize) else {
                continue;
            };
            if m.refs == 0 {
                continue;
            }
            m.refs -= 1;
            if m.refs > 0 {
                continue;
            }
            if m.cached.is_some() {
                let stamp = self.next_stamp;
                self.next_stamp += 1;
                m.stamp = Some(stamp);
                self.free_cached.insert(stamp, b);
            } else {
                self.free_plain.push(b);
            }
        }
    }

    /// Register the computed full block `block` (held by the caller, with the tokens
    /// `tokens`, chained key `key`) after `parent` (`None` for a sequence's first block).
    /// Returns the registered block to use as the parent of the sequence's next block: this
    /// one, or an equal block registered before (this one then stays private). `None` when
    /// caching is off or the block cannot be registered.
    pub fn register(
        &mut self,
        parent: Option<BlockRef>,
        block: u32,
        key: u64,
        tokens: &[u32],
    ) -> Option<BlockRef> {
        if !self.enabled || tokens.len() != self.block_size {
            return None;
        }
        let parent_id = parent.map(|p| (p.block, p.generation));
        if let Some(p) = parent {
            // The parent must still hold the contents the sequence computed after.
            let m = self.meta.get(p.block as usize)?;
            if m.generation != p.generation || m.cached.as_ref().map(|c| c.key) != Some(p.key) {
                return None;
            }
        }
        if let Some(&e) = self.index.get(&key) {
            let m = &self.meta[e as usize];
            let equal = m
                .cached
                .as_ref()
                .is_some_and(|c| c.key == key && c.parent == parent_id && *c.tokens == *tokens);
            if equal {
                return Some(BlockRef {
                    block: e,
                    generation: m.generation,
                    key,
                });
            }
            // A stale entry (its parent was reused) or a hash collision: replace it.
            self.unregister(e);
        }
        let m = self.meta.get_mut(block as usize)?;
        if m.refs == 0 || m.cached.is_some() {
            return None;
        }
        m.cached = Some(Cached {
            key,
            parent: parent_id,
            tokens: tokens.into(),
        });
        let generation = m.generation;
        self.index.insert(key, block);
        Some(BlockRef {
            block,
            generation,
            key,
        })
    }

    /// Drop `b`'s registration (it keeps its contents for the sequences holding it).
    fn unregister(&mut self, b: u32) {
        self.forget(b);
        let m = &mut self.meta[b as usize];
        if let Some(stamp) = m.stamp.take() {
            self.free_cached.remove(&stamp);
            self.free_plain.push(b);
        }
    }

    /// Whether every block is free and nothing is pending (an idle engine).
    pub fn is_idle(&self) -> bool {
        self.free_blocks() == self.total_blocks()
            && self.meta.iter().all(|m| m.refs == 0)
            && self.pending.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(pool: &BlockPool, tokens: &[u32]) -> Vec<u64> {
        let mut k = Vec::new();
        pool.extend_keys(tokens, &mut k);
        k
    }

    /// Admit `tokens` as the engine does: lookup, acquire, then register every full block.
    fn admit(pool: &mut BlockPool, tokens: &[u32]) -> (Vec<u32>, usize) {
        let k = keys(pool, tokens);
        let hits = pool.lookup(tokens, &k);
        let fresh = pool.blocks_for(tokens.len() + 1) - hits.len();
        let table = pool.acquire(&hits, fresh).expect("room");
        pool.record_query(tokens.len(), hits.len());
        let bs = pool.block_size();
        let mut chain = hits.last().copied();
        for i in hits.len()..tokens.len() / bs {
            if i > 0 && chain.is_none() {
                break;
            }
            chain = pool.register(chain, table[i], k[i], &tokens[i * bs..(i + 1) * bs]);
        }
        (table, hits.len())
    }

    #[test]
    fn shared_prefix_blocks_are_reference_counted() {
        let mut pool = BlockPool::new(8, 4, true);
        let a: Vec<u32> = (0..10).collect();
        let (ta, hits) = admit(&mut pool, &a);
        assert_eq!((ta.len(), hits), (3, 0));
        assert_eq!(pool.cached_blocks(), 2);
        // Same first 8 tokens, different tail: the two full blocks are shared.
        let b: Vec<u32> = (0..8).chain([50, 51, 52]).collect();
        let (tb, hits) = admit(&mut pool, &b);
        assert_eq!(hits, 2);
        assert_eq!(&tb[..2], &ta[..2]);
        assert_ne!(tb[2], ta[2]);
        assert_eq!(pool.refs(ta[0]), 2);
        assert!(!pool.is_writable(ta[0]) && pool.is_writable(tb[2]));
        pool.release(&ta);
        assert_eq!(pool.refs(ta[0]), 1, "still held by b");
        assert_eq!(pool.used_blocks(), 3);
        pool.release(&tb);
        assert!(pool.is_idle());
        // Free, but still cached: a third request reuses them.
        let (tc, hits) = admit(&mut pool, &a);
        assert_eq!((hits, &tc[..2]), (2, &ta[..2]));
        pool.release(&tc);
        assert!(pool.is_idle());
        let st = pool.stats();
        assert_eq!(
            (st.queried_blocks, st.hit_blocks, st.hit_tokens),
            (6, 4, 16)
        );
    }

    #[test]
    fn the_block_holding_the_last_token_is_never_shared() {
        let mut pool = BlockPool::new(8, 4, true);
        let a: Vec<u32> = (0..8).collect();
        let (ta, _) = admit(&mut pool, &a);
        // A prompt of exactly two blocks: only the first comes from the cache.
        let (tb, hits) = admit(&mut pool, &a);
        assert_eq!(hits, 1);
        assert_eq!(tb[0], ta[0]);
        assert_ne!(tb[1], ta[1]);
        pool.release(&ta);
        pool.release(&tb);
        assert!(pool.is_idle());
    }

    #[test]
    fn eviction_takes_uncached_blocks_first_then_the_least_recent() {
        let mut pool = BlockPool::new(4, 2, true);
        let a = [1u32, 2, 3, 4, 5];
        let (ta, _) = admit(&mut pool, &a); // 3 blocks, 2 of them cached
        pool.release(&ta);
        assert_eq!((pool.free_blocks(), pool.cached_blocks()), (4, 2));
        // Two new blocks: the uncached ones go first, the cached prefix survives.
        let t = pool.allocate(2).unwrap();
        assert_eq!(pool.cached_blocks(), 2);
        assert_eq!(pool.stats().evictions, 0);
        // One more: the least recently released cached block is the prompt's second
        // (released before its first), so the first block stays findable.
        let u = pool.allocate(1).unwrap();
        assert_eq!(u, vec![ta[1]]);
        assert_eq!(pool.stats().evictions, 1);
        let k = keys(&pool, &a);
        let hits = pool.lookup(&a, &k);
        assert_eq!(hits.len(), 1);
        assert_eq!(hits[0].block, ta[0]);
        pool.release(&t);
        pool.release(&u);
        assert!(pool.is_idle());
    }

    #[test]
    fn an_evicted_block_is_never_matched_again() {
        let mut pool = BlockPool::new(3, 2, true);
        let a = [1u32, 2, 3, 4, 5];
        let (ta, _) = admit(&mut pool, &a);
        pool.release(&ta);
        // Take every block: the cached ones are overwritten with other contents.
        let all = pool.allocate(3).unwrap();
        assert_eq!(pool.cached_blocks(), 0);
        let k = keys(&pool, &a);
        assert!(pool.lookup(&a, &k).is_empty());
        pool.release(&all);
        // Register the second block again under a parent that is no longer the original.
        let b = [9u32, 9, 3, 4, 5];
        let (tb, hits) = admit(&mut pool, &b);
        assert_eq!(hits, 0);
        pool.release(&tb);
        assert!(pool.lookup(&a, &k).is_empty());
        assert!(pool.is_idle());
    }

    #[test]
    fn a_hash_collision_is_caught_by_the_stored_tokens() {
        let mut pool = BlockPool::new(4, 2, true);
        let a = [1u32, 2, 3];
        let (ta, _) = admit(&mut pool, &a);
        // Forge a prompt whose first block has a's key but other tokens.
        let b = [7u32, 8, 3];
        let forged = keys(&pool, &a);
        assert!(pool.lookup(&b, &forged).is_empty());
        // And a stale parent: a's first block registered, then the parent identity changes.
        let hits = pool.lookup(&a, &forged);
        assert_eq!(hits.len(), 1);
        pool.release(&ta);
        let _all = pool.allocate(4).unwrap();
        assert!(
            pool.acquire(&hits, 0).is_none(),
            "a stale lookup is refused"
        );
    }

    #[test]
    fn disabled_caching_is_a_plain_allocator() {
        let mut pool = BlockPool::new(4, 2, false);
        let a = [1u32, 2, 3, 4, 5];
        let (ta, _) = admit(&mut pool, &a);
        pool.release(&ta);
        let (tb, hits) = admit(&mut pool, &a);
        assert_eq!(hits, 0);
        assert_eq!(pool.cached_blocks(), 0);
        assert_eq!(pool.stats(), PrefixCacheStats::default());
        assert!(pool.allocate(2).is_none(), "3 of 4 blocks are held");
        pool.release(&tb);
        assert!(pool.is_idle());
    }

    #[test]
    fn pending_keys_are_counted() {
        let mut pool = BlockPool::new(4, 2, true);
        pool.mark_pending(&[5, 5, 6]);
        assert!(pool.is_pending(5) && pool.is_pending(6));
        pool.unmark_pending(&[5, 6]);
        assert!(pool.is_pending(5) && !pool.is_pending(6));
        pool.unmark_pending(&[5]);
        assert!(pool.is_idle());
    }
}
