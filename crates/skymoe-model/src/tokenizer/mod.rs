//! Tokenizers: Hugging Face `tokenizer.json` through the `tokenizers` crate, SentencePiece
//! `tokenizer.model` files, and the tokenizers embedded in GGUF files (`tokenizer.ggml.*`:
//! byte-level BPE `gpt2` and SentencePiece `llama`).

pub mod charsmap;
pub mod files;
pub mod gguf;
pub mod sentencepiece;
mod special;
pub mod spm_proto;

use std::path::Path;

use crate::error::{ModelError, Result};
use crate::weights::GgufMetadata;

pub use files::{copy_tokenizer_files, has_tokenizer, TOKENIZER_FILES};
pub use sentencepiece::from_model_bytes;
pub use spm_proto::parse_model_proto;

use special::SpecialConfig;

/// A text tokenizer plus the special tokens a generator needs.
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    /// Beginning-of-sequence token to prepend, if the model wants one.
    pub bos_to_add: Option<u32>,
    /// End-of-sequence token to append when encoding with special tokens (`add_eos_token`);
    /// never added to generation prompts.
    pub eos_to_add: Option<u32>,
    /// Tokens that end generation.
    pub eos_ids: Vec<u32>,
}

fn tok_err(e: impl std::fmt::Display) -> ModelError {
    ModelError::Tokenizer(e.to_string())
}

/// Defaults for the special tokens when the directory's configs do not say.
struct SpecialDefaults {
    add_bos: bool,
    bos: Option<u32>,
    eos: Option<u32>,
}

impl Tokenizer {
    fn bare(inner: tokenizers::Tokenizer) -> Self {
        Tokenizer {
            inner,
            bos_to_add: None,
            eos_to_add: None,
            eos_ids: Vec::new(),
        }
    }

    /// Load `tokenizer.json`; `bos`/`eos` come from the model config or `tokenizer_config.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        let inner = tokenizers::Tokenizer::from_file(path)
            .map_err(|e| ModelError::Tokenizer(format!("{}: {e}", path.display())))?;
        Ok(Self::bare(inner))
    }

    /// Load a tokenizer from a path: a model directory (`tokenizer.json` or `tokenizer.model`
    /// plus `tokenizer_config.json`), a GGUF file (only its metadata is read), a
    /// `tokenizer.json` file or a `tokenizer.model` file (the configs beside it apply).
    pub fn from_path(path: &Path) -> Result<Self> {
        if path.is_dir() {
            return Self::for_model(path, None);
        }
        if !path.exists() {
            return Err(ModelError::io(
                path,
                std::io::Error::new(std::io::ErrorKind::NotFound, "no such file or directory"),
            ));
        }
        let ext = path
            .extension()
            .and_then(|e| e.to_str())
            .map(str::to_ascii_lowercase);
        let dir = path.parent().unwrap_or(Path::new("."));
        match ext.as_deref() {
            Some("gguf") => Self::from_gguf(&gguf::read_metadata(path)?),
            Some("json") => Self::with_specials(Self::from_file(path)?.inner, dir, None),
            Some("model") => Self::sentencepiece_file(path, dir),
            _ => Err(ModelError::Tokenizer(format!(
                "{}: expected a model directory, a .gguf file, tokenizer.json or tokenizer.model",
                path.display()
            ))),
        }
    }

    /// Find and load the tokenizer of a model: `tokenizer.json` (preferred) or
    /// `tokenizer.model` in a model directory, or the one embedded in a GGUF file. Special
    /// tokens come from `tokenizer_config.json` / `generation_config.json` / `config.json`
    /// where present.
    pub fn for_model(path: &Path, gguf: Option<&GgufMetadata>) -> Result<Self> {
        if let Some(m) = gguf {
            return Self::from_gguf(m);
        }
        let json = path.join("tokenizer.json");
        if json.is_file() {
            return Self::with_specials(Self::from_file(&json)?.inner, path, None);
        }
        let spm = path.join("tokenizer.model");
        if spm.is_file() {
            return Self::sentencepiece_file(&spm, path);
        }
        Err(ModelError::Tokenizer(format!(
            "no tokenizer.json or tokenizer.model in {}",
            path.display()
        )))
    }

    /// Load a SentencePiece `tokenizer.model` file; the special-token configs of `dir` apply
    /// (`add_bos_token` defaults to true, as for Llama tokenizers).
    fn sentencepiece_file(file: &Path, dir: &Path) -> Result<Self> {
        let bytes = std::fs::read(file).map_err(|e| ModelError::io(file, e))?;
        let model = from_model_bytes(&bytes)
            .map_err(|e| ModelError::Tokenizer(format!("{}: {e}", file.display())))?;
        let ts = &model.proto.trainer_spec;
        let defaults = SpecialDefaults {
            add_bos: true,
            bos: u32::try_from(ts.bos_id).ok(),
            eos: u32::try_from(ts.eos_id).ok(),
        };
        Self::with_specials(model.tokenizer, dir, Some(defaults))
    }

    /// Apply the special-token configs of `dir` to a pipeline.
    fn with_specials(
        mut inner: tokenizers::Tokenizer,
        dir: &Path,
        defaults: Option<SpecialDefaults>,
    ) -> Result<Self> {
        let cfg = SpecialConfig::read(dir)?;
        cfg.add_tokens_beyond(&mut inner)?;
        let id_of = |key: &str| cfg.token(key).and_then(|t| inner.token_to_id(t));
        let bos = id_of("bos_token").or(defaults.as_ref().and_then(|d| d.bos));
        let eos = id_of("eos_token").or(defaults.as_ref().and_then(|d| d.eos));
        let add_bos = cfg
            .flag("add_bos_token")
            .unwrap_or(defaults.as_ref().is_some_and(|d| d.add_bos));
        let add_eos = cfg.flag("add_eos_token").unwrap_or(false);
        let mut eos_ids: Vec<u32> = eos.into_iter().collect();
        eos_ids.extend_from_slice(cfg.eos_from_configs());
        eos_ids.sort_unstable();
        eos_ids.dedup();
        // If the post-processor already adds BOS/EOS, encode() does it; only add them by hand
        // otherwise.
        let with_specials = inner
            .encode("a", true)
            .map(|e| e.get_ids().to_vec())
            .unwrap_or_default();
        let bos_itself = bos.is_some_and(|b| with_specials.first() == Some(&b));
        let eos_itself = eos.is_some_and(|e| with_specials.last() == Some(&e));
        Ok(Tokenizer {
            inner,
            bos_to_add: if add_bos && !bos_itself { bos } else { None },
            eos_to_add: if add_eos && !eos_itself { eos } else { None },
            eos_ids,
        })
    }

    /// Build the tokenizer embedded in a GGUF file (`tokenizer.ggml.model` `gpt2` or `llama`).
    pub fn from_gguf(m: &GgufMetadata) -> Result<Self> {
        let g = gguf::from_metadata(m)?;
        let mut eos_ids: Vec<u32> = g.eos.into_iter().chain(g.eot).collect();
        eos_ids.sort_unstable();
        eos_ids.dedup();
        Ok(Tokenizer {
            inner: g.tokenizer,
            bos_to_add: if g.add_bos { g.bos } else { None },
            eos_to_add: if g.add_eos { g.eos } else { None },
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

    /// Encode text with the special tokens the tokenizer config asks for: BOS if
    /// `add_bos_token`, EOS if `add_eos_token` (what transformers' `tokenizer(text)` gives).
    pub fn encode_with_special_tokens(&self, text: &str) -> Result<Vec<u32>> {
        let mut ids = self.encode_prompt(text)?;
        ids.extend(self.eos_to_add);
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
