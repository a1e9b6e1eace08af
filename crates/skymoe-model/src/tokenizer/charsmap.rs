//! Checks a SentencePiece `precompiled_charsmap` before it is handed to the `Precompiled`
//! normalizer of the `tokenizers` crate.
//!
//! The charsmap is a little-endian `u32` byte length, a double-array trie of that many bytes
//! (`u32` units), and a blob of NUL-terminated replacement strings. The normalizer indexes the
//! trie and the blob without bounds checks, so a malformed map would make it panic or allocate
//! without limit; this module walks every reachable trie node once and rejects any map whose
//! lookups could leave the trie or split a UTF-8 character of the blob.

use tokenizers::normalizers::precompiled::Precompiled;

use crate::error::{ModelError, Result};

fn bad(reason: impl std::fmt::Display) -> ModelError {
    ModelError::Tokenizer(format!("invalid precompiled_charsmap: {reason}"))
}

// The unit layout of darts-clone, as the normalizer reads it.
fn has_leaf(u: u32) -> bool {
    (u >> 8) & 1 == 1
}

fn value(u: u32) -> usize {
    (u & ((1u32 << 31) - 1)) as usize
}

fn label(u: u32) -> u32 {
    u & ((1u32 << 31) | 0xff)
}

fn offset(u: u32) -> usize {
    ((u >> 10) as usize) << ((u & (1 << 9)) >> 6)
}

/// Validate a charsmap and build the normalizer from it.
pub fn precompiled(charsmap: &[u8]) -> Result<Precompiled> {
    let (head, rest) = charsmap
        .split_first_chunk::<4>()
        .ok_or_else(|| bad("shorter than its 4-byte header"))?;
    let trie_bytes = u32::from_le_bytes(*head) as usize;
    if !trie_bytes.is_multiple_of(4) || trie_bytes > rest.len() || trie_bytes == 0 {
        return Err(bad(format!(
            "trie size {trie_bytes} does not fit the {} bytes that follow",
            rest.len()
        )));
    }
    let (trie, blob) = rest.split_at(trie_bytes);
    let units: Vec<u32> = trie
        .chunks_exact(4)
        .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    let normalized =
        std::str::from_utf8(blob).map_err(|_| bad("replacement strings are not UTF-8"))?;
    check_trie(&units, normalized)?;
    Precompiled::from(charsmap).map_err(bad)
}

/// Visit every node a prefix search can reach; every probe must stay inside the array.
fn check_trie(units: &[u32], normalized: &str) -> Result<()> {
    let n = units.len();
    let mut visited = vec![false; n];
    let mut stack = vec![offset(units[0])];
    while let Some(base) = stack.pop() {
        // A search probes base ^ c for every byte c in 1..=255.
        if (base | 0xff) >= n {
            return Err(bad("a trie node points outside the trie"));
        }
        if std::mem::replace(&mut visited[base], true) {
            continue;
        }
        for c in 1..=255u32 {
            let pos = base ^ c as usize;
            let unit = units[pos];
            if label(unit) != c {
                continue;
            }
            let next = pos ^ offset(unit);
            if has_leaf(unit) {
                let leaf = units
                    .get(next)
                    .ok_or_else(|| bad("a trie leaf points outside the trie"))?;
                let start = value(*leaf);
                if !normalized.is_char_boundary(start) {
                    return Err(bad("a replacement starts outside its strings"));
                }
            }
            if next < n && !visited[next] {
                stack.push(next);
            } else if next >= n {
                return Err(bad("a trie node points outside the trie"));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_short_and_inconsistent_maps() {
        assert!(precompiled(&[]).is_err());
        assert!(precompiled(&[1, 2]).is_err());
        // Claims a trie of 4 GiB.
        assert!(precompiled(&[0xff, 0xff, 0xff, 0xff, 0, 0, 0, 0]).is_err());
        // A one-unit trie: every probe from the root leaves the array.
        assert!(precompiled(&[4, 0, 0, 0, 0, 0, 0, 0]).is_err());
    }

    #[test]
    fn accepts_an_empty_256_unit_trie() {
        // Root with offset 0 and no children: nothing maps, nothing can go out of bounds.
        let mut map = (1024u32).to_le_bytes().to_vec();
        map.extend(std::iter::repeat_n(0u8, 1024));
        let p = precompiled(&map).unwrap();
        assert_eq!(p.transform("a"), None);
    }
}
