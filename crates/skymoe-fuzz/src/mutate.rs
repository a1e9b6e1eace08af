//! Byte-level mutations for binary formats with length fields and JSON headers: bit flips,
//! byte and integer overwrites (boundary values written over what may be a length or offset,
//! in every width), arithmetic on integers, insertion, deletion, duplication, truncation,
//! splicing of two inputs, dictionary tokens, and decimal numbers rewritten in text.

/// A small, fast, seedable generator (SplitMix64).
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A generator from a seed.
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A number in `0..n` (0 when `n` is 0).
    pub fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            (self.next_u64() % n as u64) as usize
        }
    }

    /// True with probability `1/n`.
    pub fn one_in(&mut self, n: usize) -> bool {
        self.below(n) == 0
    }
}

/// Values that break size and offset arithmetic.
const INTERESTING: [u64; 22] = [
    0,
    1,
    2,
    3,
    7,
    8,
    16,
    32,
    64,
    0x7f,
    0x80,
    0xff,
    0x100,
    0x7fff,
    0xffff,
    0x1_0000,
    0x7fff_ffff,
    0x8000_0000,
    0xffff_ffff,
    0x1_0000_0000,
    0x7fff_ffff_ffff_ffff,
    u64::MAX,
];

/// Decimal spellings written over numbers in text (JSON headers and indexes).
const NUMBERS: [&str; 14] = [
    "0",
    "1",
    "-1",
    "2",
    "255",
    "65536",
    "2147483647",
    "4294967295",
    "4294967296",
    "9223372036854775807",
    "18446744073709551615",
    "18446744073709551616",
    "1e300",
    "0.5",
];

/// Mutates inputs of at most `max_len` bytes.
#[derive(Debug, Clone)]
pub struct Mutator {
    /// The random source.
    pub rng: Rng,
    /// Longest input produced.
    pub max_len: usize,
}

impl Mutator {
    /// A mutator with its own generator.
    pub fn new(seed: u64, max_len: usize) -> Self {
        Mutator {
            rng: Rng::new(seed),
            max_len,
        }
    }

    /// A position in `0..len`, biased towards the first and last 4 KiB where headers, length
    /// fields and zip directories live.
    fn pos(&mut self, len: usize) -> usize {
        if len == 0 {
            return 0;
        }
        match self.rng.below(10) {
            0..=4 => self.rng.below(len.min(4096)),
            5 | 6 => len - 1 - self.rng.below(len.min(4096)),
            7 => self.rng.below(len.min(64)),
            _ => self.rng.below(len),
        }
    }

    fn interesting(&mut self, len: usize) -> u64 {
        match self.rng.below(8) {
            0 => len as u64 + self.rng.below(3) as u64,
            1 => (len as u64).wrapping_sub(self.rng.below(9) as u64),
            2 => self.rng.next_u64(),
            _ => {
                let v = INTERESTING[self.rng.below(INTERESTING.len())];
                if self.rng.one_in(4) {
                    v.wrapping_neg()
                } else {
                    v
                }
            }
        }
    }

    /// Apply a few random mutations to `data`; `other` is a second input for splicing and
    /// `dict` a list of tokens of the format.
    pub fn mutate(&mut self, data: &mut Vec<u8>, other: &[u8], dict: &[&[u8]]) {
        let rounds = 1 + if self.rng.one_in(4) {
            self.rng.below(8)
        } else {
            self.rng.below(2)
        };
        for _ in 0..rounds {
            self.mutate_once(data, other, dict);
        }
        data.truncate(self.max_len);
    }

    fn mutate_once(&mut self, data: &mut Vec<u8>, other: &[u8], dict: &[&[u8]]) {
        let len = data.len();
        match self.rng.below(15) {
            // Flip one bit.
            0 if len > 0 => {
                let i = self.pos(len);
                data[i] ^= 1 << self.rng.below(8);
            }
            // Set one byte.
            1 if len > 0 => {
                let i = self.pos(len);
                data[i] = self.rng.next_u64() as u8;
            }
            // Write a boundary integer (1, 2, 4 or 8 bytes, either byte order).
            2..=4 if len > 0 => {
                let width = 1 << self.rng.below(4);
                let v = self.interesting(len);
                let bytes = if self.rng.one_in(5) {
                    v.to_be_bytes()[8 - width..].to_vec()
                } else {
                    v.to_le_bytes()[..width].to_vec()
                };
                let i = self.pos(len);
                let end = (i + width).min(len);
                data[i..end].copy_from_slice(&bytes[..end - i]);
            }
            // Add or subtract a little from a little-endian integer.
            5 if len >= 4 => {
                let width = if self.rng.one_in(2) { 4 } else { 8.min(len) };
                let i = self.pos(len - width + 1).min(len - width);
                let mut buf = [0u8; 8];
                buf[..width].copy_from_slice(&data[i..i + width]);
                let v = u64::from_le_bytes(buf);
                let delta = 1 + self.rng.below(64) as u64;
                let v = if self.rng.one_in(2) {
                    v.wrapping_add(delta)
                } else {
                    v.wrapping_sub(delta)
                };
                data[i..i + width].copy_from_slice(&v.to_le_bytes()[..width]);
            }
            // Insert random bytes or a run of one byte.
            6 => {
                let max = if self.rng.one_in(8) { 256 } else { 8 };
                let n = 1 + self.rng.below(max);
                let i = self.pos(len + 1).min(len);
                let fill: Vec<u8> = if self.rng.one_in(2) {
                    vec![self.rng.next_u64() as u8; n]
                } else {
                    (0..n).map(|_| self.rng.next_u64() as u8).collect()
                };
                data.splice(i..i, fill);
            }
            // Delete a range.
            7 if len > 1 => {
                let i = self.pos(len);
                let max = if self.rng.one_in(4) { 4096 } else { 16 };
                let n = 1 + self.rng.below((len - i).min(max));
                data.drain(i..(i + n).min(len));
            }
            // Copy a range elsewhere (overwrite or insert).
            8 if len > 1 => {
                let from = self.pos(len);
                let n = 1 + self.rng.below((len - from).min(64));
                let chunk = data[from..from + n].to_vec();
                let to = self.pos(len);
                if self.rng.one_in(2) {
                    data.splice(to..to, chunk);
                } else {
                    let end = (to + n).min(len);
                    data[to..end].copy_from_slice(&chunk[..end - to]);
                }
            }
            // Truncate.
            9 if len > 0 => {
                let keep = if self.rng.one_in(2) {
                    self.rng.below(len)
                } else {
                    len - 1 - self.rng.below(len.min(64))
                };
                data.truncate(keep);
            }
            // Splice: this input's head with another's tail, or a chunk of the other pasted in.
            10 if !other.is_empty() => {
                if self.rng.one_in(2) {
                    let cut = self.pos(len + 1).min(len);
                    let from = self.rng.below(other.len());
                    data.truncate(cut);
                    data.extend_from_slice(&other[from..]);
                } else {
                    let from = self.rng.below(other.len());
                    let n = 1 + self.rng.below((other.len() - from).min(256));
                    let to = self.pos(len + 1).min(len);
                    data.splice(to..to, other[from..from + n].iter().copied());
                }
            }
            // A token of the format, inserted or written over.
            11 | 12 if !dict.is_empty() => {
                let tok = dict[self.rng.below(dict.len())];
                let i = self.pos(len + 1).min(len);
                if self.rng.one_in(2) || i + tok.len() > len {
                    data.splice(i..i, tok.iter().copied());
                } else {
                    data[i..i + tok.len()].copy_from_slice(tok);
                }
            }
            // A decimal number in text replaced by a boundary spelling.
            13 | 14 => {
                let start = self.pos(len + 1).min(len);
                let Some(off) = data[start..].iter().position(u8::is_ascii_digit) else {
                    return;
                };
                let a = start + off;
                let b = a + data[a..].iter().take_while(|c| c.is_ascii_digit()).count();
                let n = NUMBERS[self.rng.below(NUMBERS.len())];
                data.splice(a..b, n.bytes());
            }
            _ => {
                if len > 0 {
                    let i = self.pos(len);
                    data[i] = data[i].wrapping_add(1);
                } else {
                    data.push(self.rng.next_u64() as u8);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mutations_stay_within_bounds() {
        let mut m = Mutator::new(7, 300);
        let other: Vec<u8> = (0..=255).collect();
        let dict: &[&[u8]] = &[b"abc", b"\"shape\":"];
        let mut data = b"{\"a\":{\"data_offsets\":[0,16]}}".to_vec();
        for _ in 0..20_000 {
            m.mutate(&mut data, &other, dict);
            assert!(data.len() <= 300);
            if data.is_empty() {
                data.push(b'1');
            }
        }
    }

    #[test]
    fn the_generator_is_deterministic() {
        let mut a = Rng::new(3);
        let mut b = Rng::new(3);
        assert!((0..100).all(|_| a.next_u64() == b.next_u64()));
        assert!((0..100).all(|_| a.below(10) < 10));
    }
}
