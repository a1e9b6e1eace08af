//! Tokenizers embedded in GGUF files (`tokenizer.ggml.*`): byte-level BPE (`gpt2`) and
//! SentencePiece-style vocabularies (`llama`), the latter reproducing llama.cpp's tokenizer.

use std::path::Path;

use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::AddedToken;

use super::sentencepiece::{build, Algorithm, Flavor, SpmSpec};
use super::spm_proto::{Piece, PieceType};
use crate::error::{ModelError, Result};
use crate::weights::GgufMetadata;

fn tok_err(e: impl std::fmt::Display) -> ModelError {
    ModelError::Tokenizer(e.to_string())
}

/// A GGUF tokenizer with the special-token settings of its metadata.
pub struct GgufTokenizer {
    /// The pipeline.
    pub tokenizer: tokenizers::Tokenizer,
    /// Beginning-of-sequence id, if any.
    pub bos: Option<u32>,
    /// Whether BOS is prepended.
    pub add_bos: bool,
    /// End-of-sequence id, if any.
    pub eos: Option<u32>,
    /// Whether EOS is appended.
    pub add_eos: bool,
    /// End-of-turn id, if any.
    pub eot: Option<u32>,
}

/// Read only the metadata of a GGUF file (no tensor data is loaded).
pub fn read_metadata(path: &Path) -> Result<GgufMetadata> {
    GgufMetadata::read(path)
}

/// Build the tokenizer embedded in GGUF metadata.
pub fn from_metadata(m: &GgufMetadata) -> Result<GgufTokenizer> {
    let model = m
        .string("tokenizer.ggml.model")
        .ok_or_else(|| tok_err("the GGUF file has no tokenizer.ggml.model"))?;
    let tokens = m
        .strings("tokenizer.ggml.tokens")
        .ok_or_else(|| tok_err("the GGUF file has no tokenizer.ggml.tokens (array of strings)"))?;
    let id = |key: &str| -> Result<Option<u32>> {
        match m.uint(key) {
            None => Ok(None),
            Some(v) if (v as usize) < tokens.len() => Ok(Some(v as u32)),
            Some(v) => Err(tok_err(format!(
                "{key} = {v} is outside the vocabulary of {} tokens",
                tokens.len()
            ))),
        }
    };
    let (tokenizer, default_add_bos) = match model {
        "gpt2" => (gpt2(m, &tokens)?, false),
        "llama" => (llama(m, &tokens)?, true),
        other => {
            return Err(tok_err(format!(
                "GGUF tokenizer model `{other}` is not supported; supported: gpt2 (byte-level \
                 BPE), llama (SentencePiece)"
            )))
        }
    };
    Ok(GgufTokenizer {
        tokenizer,
        bos: id("tokenizer.ggml.bos_token_id")?,
        add_bos: m
            .bool("tokenizer.ggml.add_bos_token")
            .unwrap_or(default_add_bos),
        eos: id("tokenizer.ggml.eos_token_id")?,
        add_eos: m.bool("tokenizer.ggml.add_eos_token").unwrap_or(false),
        eot: id("tokenizer.ggml.eot_token_id")?,
    })
}

fn token_types(m: &GgufMetadata, n: usize) -> Result<Vec<i64>> {
    match m.entries.get("tokenizer.ggml.token_type") {
        None => Ok(vec![1; n]),
        Some(_) => {
            let t = m
                .ints("tokenizer.ggml.token_type")
                .ok_or_else(|| tok_err("tokenizer.ggml.token_type is not an array of integers"))?;
            if t.len() != n {
                return Err(tok_err(format!(
                    "the GGUF vocabulary has {n} tokens but {} token types",
                    t.len()
                )));
            }
            Ok(t)
        }
    }
}

fn gpt2(m: &GgufMetadata, tokens: &[&str]) -> Result<tokenizers::Tokenizer> {
    let merges = m.strings("tokenizer.ggml.merges").unwrap_or_default();
    let types = token_types(m, tokens.len())?;
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
                .ok_or_else(|| tok_err(format!("malformed merge `{s}`")))
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
    Ok(inner)
}

/// A SentencePiece vocabulary as llama.cpp's converter writes it: tokens, scores, token types
/// and `add_space_prefix`; merged by score like llama.cpp's SPM tokenizer.
fn llama(m: &GgufMetadata, tokens: &[&str]) -> Result<tokenizers::Tokenizer> {
    let n = tokens.len();
    let scores: Vec<f32> = match m.entries.get("tokenizer.ggml.scores") {
        None => vec![0.0; n],
        Some(candle_core::quantized::gguf_file::Value::Array(a)) => a
            .iter()
            .map(|v| match v {
                candle_core::quantized::gguf_file::Value::F32(x) => Ok(*x),
                candle_core::quantized::gguf_file::Value::F64(x) => Ok(*x as f32),
                _ => Err(tok_err("tokenizer.ggml.scores holds a non-float value")),
            })
            .collect::<Result<_>>()?,
        Some(_) => return Err(tok_err("tokenizer.ggml.scores is not an array")),
    };
    if scores.len() != n {
        return Err(tok_err(format!(
            "the GGUF vocabulary has {n} tokens but {} scores",
            scores.len()
        )));
    }
    if let Some(i) = scores.iter().position(|s| !s.is_finite()) {
        return Err(tok_err(format!("the score of token {i} is not finite")));
    }
    let types = token_types(m, n)?;
    let pieces: Vec<Piece> = tokens
        .iter()
        .zip(&scores)
        .zip(&types)
        .map(|((t, &score), &ty)| Piece {
            piece: t.to_string(),
            score,
            // llama.cpp treats unknown type values as normal tokens.
            kind: PieceType::from_i64(ty).unwrap_or(PieceType::Normal),
        })
        .collect();
    let unk_id = match m.uint("tokenizer.ggml.unknown_token_id") {
        Some(v) if (v as usize) < n => Some(v as u32),
        Some(v) => {
            return Err(tok_err(format!(
                "tokenizer.ggml.unknown_token_id = {v} is outside the vocabulary of {n} tokens"
            )))
        }
        None => pieces
            .iter()
            .position(|p| p.kind == PieceType::Unknown)
            .map(|i| i as u32),
    };
    let byte_fallback = pieces.iter().any(|p| p.kind == PieceType::Byte);
    build(&SpmSpec {
        pieces: &pieces,
        algorithm: Algorithm::Bpe,
        byte_fallback,
        unk_id,
        charsmap: &[],
        remove_extra_whitespaces: false,
        add_dummy_prefix: m.bool("tokenizer.ggml.add_space_prefix").unwrap_or(true),
        escape_whitespaces: true,
        flavor: Flavor::LlamaCpp,
    })
}
