//! Incremental detokenisation: the text each new token adds, without splitting multi-byte
//! characters and with the context of the previous tokens (byte-level BPE and SentencePiece
//! decoders depend on it), decoding only a short window per token.

use skymoe_model::Tokenizer;

/// Turns a growing list of token ids into text deltas.
#[derive(Debug, Default)]
pub struct Detokenizer {
    ids: Vec<u32>,
    prefix: usize,
    read: usize,
}

impl Detokenizer {
    /// Add a token; returns the text it completes (possibly empty).
    pub fn push(&mut self, tok: &Tokenizer, id: u32) -> String {
        self.ids.push(id);
        let before = tok
            .decode(&self.ids[self.prefix..self.read])
            .unwrap_or_default();
        let now = tok.decode(&self.ids[self.prefix..]).unwrap_or_default();
        if now.len() > before.len()
            && !now.ends_with('\u{FFFD}')
            && now.is_char_boundary(before.len())
        {
            let delta = now[before.len()..].to_string();
            self.prefix = self.read;
            self.read = self.ids.len();
            delta
        } else {
            String::new()
        }
    }
}
