//! Tokenizers: Hugging Face `tokenizer.json` through the `tokenizers` crate, or the tokenizer
//! embedded in a GGUF file (`tokenizer.ggml.*`, byte-level BPE "gpt2" style).

use std::path::Path;

use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::AddedToken;

use crate::error::{ModelError, Result};
use crate::weights::GgufMetadata;

/// A text tokenizer plus the special tokens a generator needs.
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    /// Beginning-of-sequence token to prepend, if the model wants one.
    pub bos_to_add: Option<u32>,
    /// Tokens that end generation.
    pub eos_ids: Vec<u32>,
}

fn tok_err(e: impl std::fmt::Display) -> ModelError {
    ModelError::Tokenizer(e.to_string())
}

impl Tokenizer {
    /// Load `tokenizer.json`; `bos`/`eos` come from the model config or `tokenizer_config.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        let inner = tokenizers::Tokenizer::from_file(path)
            .map_err(|e| ModelError::Tokenizer(format!("{}: {e}", path.display())))?;
        Ok(Tokenizer {
            inner,
            bos_to_add: None,
            eos_ids: Vec::new(),
        })
    }

    /// Find and load the tokenizer of a model: `tokenizer.json` in a model directory, or the
    /// one embedded in a GGUF file. Special tokens come from `tokenizer_config.json` /
    /// `generation_config.json` / `config.json` where present.
    pub fn for_model(path: &Path, gguf: Option<&GgufMetadata>) -> Result<Self> {
        if let Some(m) = gguf {
            return Self::from_gguf(m);
        }
        let file = path.join("tokenizer.json");
        if !file.exists() {
            return Err(ModelError::Tokenizer(format!(
                "no tokenizer.json in {}",
                path.display()
            )));
        }
        let mut tok = Self::from_file(&file)?;
        let read = |name: &str| -> Option<serde_json::Value> {
            let text = std::fs::read_to_string(path.join(name)).ok()?;
            serde_json::from_str(&text).ok()
        };
        let tcfg = read("tokenizer_config.json");
        let token_id = |v: Option<&serde_json::Value>| -> Option<u32> {
            match v? {
                serde_json::Value::String(s) => tok.inner.token_to_id(s),
                serde_json::Value::Object(o) => o
                    .get("content")?
                    .as_str()
                    .and_then(|s| tok.inner.token_to_id(s)),
                _ => None,
            }
        };
        let bos = tcfg.as_ref().and_then(|c| token_id(c.get("bos_token")));
        let add_bos = tcfg
            .as_ref()
            .and_then(|c| c.get("add_bos_token"))
            .and_then(|v| v.as_bool())
            .unwrap_or(false);
        let mut eos: Vec<u32> = tcfg
            .as_ref()
            .and_then(|c| token_id(c.get("eos_token")))
            .into_iter()
            .collect();
        for name in ["generation_config.json", "config.json"] {
            if let Some(v) = read(name).and_then(|c| c.get("eos_token_id").cloned()) {
                match v {
                    serde_json::Value::Number(n) => eos.extend(n.as_u64().map(|x| x as u32)),
                    serde_json::Value::Array(a) => {
                        eos.extend(a.iter().filter_map(|x| x.as_u64()).map(|x| x as u32))
                    }
                    _ => {}
                }
            }
        }
        eos.sort_unstable();
        eos.dedup();
        // If the post-processor already adds BOS, encode() does it; only add it by hand otherwise.
        let adds_itself = bos.is_some_and(|b| {
            tok.inner
                .encode("a", true)
                .map(|e| e.get_ids().first() == Some(&b))
                .unwrap_or(false)
        });
        tok.bos_to_add = if add_bos && !adds_itself { bos } else { None };
        tok.eos_ids = eos;
        Ok(tok)
    }

    /// Build the tokenizer embedded in a GGUF file.
    pub fn from_gguf(m: &GgufMetadata) -> Result<Self> {
        let model = m.string("tokenizer.ggml.model").ok_or_else(|| {
            ModelError::Tokenizer("the GGUF file has no tokenizer.ggml.model".into())
        })?;
        if model != "gpt2" {
            return Err(ModelError::Tokenizer(format!(
                "GGUF tokenizer model `{model}` is not supported; supported: gpt2 (byte-level BPE)"
            )));
        }
        let tokens = m.strings("tokenizer.ggml.tokens").ok_or_else(|| {
            ModelError::Tokenizer("the GGUF file has no tokenizer.ggml.tokens".into())
        })?;
        let merges = m.strings("tokenizer.ggml.merges").unwrap_or_default();
        let types = m.ints("tokenizer.ggml.token_type").unwrap_or_default();
        let vocab: Vocab = tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (t.to_string(), i as u32))
            .collect();
        let merges: Vec<(String, String)> = merges
            .iter()
            .map(|s| {
                s.split_once(' ')
                    .map(|(a, b)| (a.to_string(), b.to_string()))
                    .ok_or_else(|| ModelError::Tokenizer(format!("malformed merge `{s}`")))
            })
            .collect::<Result<_>>()?;
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .build()
            .map_err(tok_err)?;
        let mut inner = tokenizers::Tokenizer::new(bpe);
        let byte_level = ByteLevel::new(false, true, true);
        let pre: PreTokenizerWrapper = match m.string("tokenizer.ggml.pre") {
            // SmolLM and similar split digits one by one before the GPT-2 regex.
            Some("smollm") | Some("starcoder") | Some("refact") => {
                Sequence::new(vec![Digits::new(true).into(), byte_level.into()]).into()
            }
            _ => byte_level.into(),
        };
        inner.with_pre_tokenizer(Some(pre));
        inner.with_decoder(Some(ByteLevelDecoder::default()));
        // Control (3) and user-defined (4) tokens are matched whole, as llama.cpp does.
        let specials: Vec<AddedToken> = tokens
            .iter()
            .enumerate()
            .filter(|(i, _)| matches!(types.get(*i), Some(3) | Some(4)))
            .map(|(_, t)| AddedToken::from(t.to_string(), true))
            .collect();
        inner.add_special_tokens(specials).map_err(tok_err)?;
        let bos = m.uint("tokenizer.ggml.bos_token_id").map(|x| x as u32);
        let add_bos = m.bool("tokenizer.ggml.add_bos_token").unwrap_or(false);
        let mut eos_ids: Vec<u32> = m
            .uint("tokenizer.ggml.eos_token_id")
            .map(|x| x as u32)
            .into_iter()
            .collect();
        eos_ids.extend(m.uint("tokenizer.ggml.eot_token_id").map(|x| x as u32));
        eos_ids.dedup();
        Ok(Tokenizer {
            inner,
            bos_to_add: if add_bos { bos } else { None },
            eos_ids,
        })
    }

    /// Encode text to ids, without any special tokens.
    pub fn encode_plain(&self, text: &str) -> Result<Vec<u32>> {
        Ok(self
            .inner
            .encode(text, false)
            .map_err(tok_err)?
            .get_ids()
            .to_vec())
    }

    /// Encode a prompt: the tokenizer's own special tokens plus BOS where the model wants it.
    pub fn encode_prompt(&self, text: &str) -> Result<Vec<u32>> {
        let mut ids = self
            .inner
            .encode(text, true)
            .map_err(tok_err)?
            .get_ids()
            .to_vec();
        if let Some(b) = self.bos_to_add {
            if ids.first() != Some(&b) {
                ids.insert(0, b);
            }
        }
        Ok(ids)
    }

    /// Decode ids to text, skipping special tokens.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner.decode(ids, true).map_err(tok_err)
    }

    /// Number of tokens, including added ones.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// The underlying `tokenizers` tokenizer.
    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }
}

/// Streams decoded text token by token without splitting multi-byte characters.
pub struct TextStream {
    ids: Vec<u32>,
    printed: usize,
}

impl Default for TextStream {
    fn default() -> Self {
        Self::new()
    }
}

impl TextStream {
    /// An empty stream.
    pub fn new() -> Self {
        TextStream {
            ids: Vec::new(),
            printed: 0,
        }
    }

    /// Add a token; returns the newly completed text, if any.
    pub fn push(&mut self, tok: &Tokenizer, id: u32) -> Result<Option<String>> {
        self.ids.push(id);
        let text = tok.decode(&self.ids)?;
        if text.len() > self.printed
            && !text.ends_with('\u{FFFD}')
            && text.is_char_boundary(self.printed)
        {
            let new = text[self.printed..].to_string();
            self.printed = text.len();
            Ok(Some(new))
        } else {
            Ok(None)
        }
    }
}
