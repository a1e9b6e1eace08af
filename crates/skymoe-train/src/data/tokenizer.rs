//! Byte-level BPE tokenizer training (GPT-2 style) with the `tokenizers` crate.
//!
//! The tokenizer splits text with the GPT-2 regex (`ByteLevel` pre-tokenizer, no prefix space),
//! maps every byte to a printable character, and learns BPE merges over those. All 256 byte
//! symbols are in the vocabulary whether or not the corpus uses them, so any text (any
//! language, any UTF-8) encodes without unknown tokens and decodes back exactly. The special
//! tokens come first in the vocabulary (ids `0..k`, in the order given) and are matched as
//! whole units in text.

use std::path::{Path, PathBuf};
use std::str::FromStr;

use tokenizers::models::bpe::{BpeTrainerBuilder, BPE};
use tokenizers::normalizers::NormalizerWrapper;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::{AddedToken, TokenizerBuilder, TokenizerImpl};

use super::atomic::write_atomically;
use super::corpus::{Corpus, CorpusStats, Documents};
use super::error::{DataError, Result};

/// Pairs seen fewer times than this are never merged, so the vocabulary can come out smaller
/// than asked for on a small corpus.
pub const MIN_MERGE_FREQUENCY: u64 = 2;

/// Number of byte symbols every byte-level vocabulary holds.
const BYTE_ALPHABET: usize = 256;

/// What [`train_tokenizer`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenizerStats {
    /// Vocabulary size of the trained tokenizer, special tokens included (at most the size
    /// asked for).
    pub vocab_size: usize,
    /// The corpus counts (files, documents, bytes, skipped lines).
    pub corpus: CorpusStats,
    /// Where `tokenizer.json` was written.
    pub path: PathBuf,
}

type BpeTokenizer = TokenizerImpl<BPE, NormalizerWrapper, ByteLevel, ByteLevel, ByteLevel>;

fn tok_err(e: impl std::fmt::Display) -> DataError {
    DataError::Tokenizer(e.to_string())
}

/// Train a byte-level BPE tokenizer of at most `vocab_size` tokens (special tokens and the 256
/// byte symbols included) on the documents of `inputs`, and write it as a Hugging Face
/// `tokenizer.json` to `out_path` (atomically: temporary file, fsync, rename).
///
/// Errors: bad arguments ([`DataError::InvalidArgument`]: a vocabulary too small for the byte
/// alphabet and the specials, an empty or repeated special token), unreadable or malformed
/// input, an empty corpus ([`DataError::EmptyCorpus`]), or a write failure. Nothing is written
/// on error.
pub fn train_tokenizer<P: AsRef<Path>, S: AsRef<str>>(
    inputs: &[P],
    vocab_size: usize,
    special_tokens: &[S],
    out_path: &Path,
) -> Result<TokenizerStats> {
    let corpus = Corpus::new(inputs)?;
    let (tokenizer, corpus_stats) = train_bpe(&corpus, vocab_size, special_tokens)?;
    let json = tokenizer.to_string(true).map_err(tok_err)?;
    // Check the file will load before replacing anything.
    tokenizers::Tokenizer::from_str(&json).map_err(tok_err)?;
    write_atomically(out_path, json.as_bytes())?;
    Ok(TokenizerStats {
        vocab_size: tokenizer.get_vocab_size(true),
        corpus: corpus_stats,
        path: out_path.to_path_buf(),
    })
}

/// Train a byte-level BPE tokenizer on `corpus` in memory (see [`train_tokenizer`]), returning
/// it with the corpus counts.
pub fn train_bpe<S: AsRef<str>>(
    corpus: &Corpus,
    vocab_size: usize,
    special_tokens: &[S],
) -> Result<(tokenizers::Tokenizer, CorpusStats)> {
    let specials = check_specials(special_tokens)?;
    let minimum = BYTE_ALPHABET + specials.len();
    if vocab_size < minimum {
        return Err(DataError::InvalidArgument(format!(
            "vocabulary size {vocab_size} is too small: the {BYTE_ALPHABET} byte symbols and {} \
             special token(s) need at least {minimum}",
            specials.len()
        )));
    }
    if u32::try_from(vocab_size).is_err() {
        return Err(DataError::InvalidArgument(format!(
            "vocabulary size {vocab_size} does not fit token ids of 32 bits"
        )));
    }
    let mut trainer = BpeTrainerBuilder::new()
        .vocab_size(vocab_size)
        .min_frequency(MIN_MERGE_FREQUENCY)
        .show_progress(false)
        .special_tokens(
            specials
                .iter()
                .map(|s| AddedToken::from(s.clone(), true))
                .collect(),
        )
        .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
        .build();
    let mut tokenizer: BpeTokenizer = TokenizerBuilder::new()
        .with_model(BPE::default())
        .with_normalizer(None)
        .with_pre_tokenizer(Some(ByteLevel::new(false, true, true)))
        .with_post_processor(Some(ByteLevel::new(false, true, true)))
        .with_decoder(Some(ByteLevel::default()))
        .build()
        .map_err(tok_err)?;

    let mut outcome = Outcome::default();
    let texts = Texts {
        docs: corpus.documents(),
        outcome: &mut outcome,
    };
    let trained = tokenizer.train(&mut trainer, texts).map(|_| ());
    // A read error ends the stream early; report it rather than what the trainer made of
    // the truncated stream.
    if let Some(e) = outcome.error {
        return Err(e);
    }
    trained.map_err(tok_err)?;
    if outcome.stats.documents == 0 {
        return Err(corpus.empty_error());
    }
    Ok((tokenizer.into(), outcome.stats))
}

/// Validate special tokens: non-empty, no repeats.
fn check_specials<S: AsRef<str>>(special_tokens: &[S]) -> Result<Vec<String>> {
    let mut out: Vec<String> = Vec::with_capacity(special_tokens.len());
    for s in special_tokens {
        let s = s.as_ref();
        if s.is_empty() {
            return Err(DataError::InvalidArgument(
                "a special token is the empty string".into(),
            ));
        }
        if out.iter().any(|o| o == s) {
            return Err(DataError::InvalidArgument(format!(
                "special token {s:?} is given twice"
            )));
        }
        out.push(s.to_string());
    }
    Ok(out)
}

/// How the document stream fed to the trainer ended.
#[derive(Default)]
struct Outcome {
    error: Option<DataError>,
    stats: CorpusStats,
}

/// The documents' texts, for the trainer; the first error ends the stream and is kept.
struct Texts<'a, 'b> {
    docs: Documents<'a>,
    outcome: &'b mut Outcome,
}

impl Iterator for Texts<'_, '_> {
    type Item = String;

    fn next(&mut self) -> Option<String> {
        let item = self.docs.next();
        self.outcome.stats = self.docs.stats();
        match item? {
            Ok(doc) => Some(doc.text),
            Err(e) => {
                self.outcome.error = Some(e);
                None
            }
        }
    }
}
