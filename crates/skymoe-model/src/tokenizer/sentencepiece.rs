//! SentencePiece vocabularies as `tokenizers` pipelines.
//!
//! Two sources share one builder: a `tokenizer.model` file, where the `sentencepiece` library
//! is the reference, and a GGUF `llama` vocabulary, where llama.cpp's tokenizer is. The
//! pipeline follows the fast-tokenizer conversion of Llama-style vocabularies:
//!
//! * normalizer: the precompiled character map (if any), SentencePiece's whitespace clean-up
//!   (`remove_extra_whitespaces`: trim, collapse runs of spaces), the dummy prefix `▁` and the
//!   escaping of spaces as `▁`;
//! * model: BPE whose merges are derived from the piece scores (the higher the score of the
//!   merged piece, the earlier the merge), or Unigram, both with byte fallback when the
//!   vocabulary has it and consecutive unknown characters fused into one `<unk>`;
//! * added tokens: control and unknown pieces as special tokens, user-defined pieces as
//!   ordinary added tokens (matched after normalisation for `tokenizer.model`, as
//!   SentencePiece does, and in the raw text for GGUF, as llama.cpp does);
//! * decoder: `▁` back to spaces, byte pieces back to bytes, and the dummy prefix removed.

use tokenizers::decoders::byte_fallback::ByteFallback;
use tokenizers::decoders::fuse::Fuse;
use tokenizers::decoders::sequence::Sequence as DecoderSequence;
use tokenizers::decoders::strip::Strip as DecoderStrip;
use tokenizers::decoders::DecoderWrapper;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::models::unigram::Unigram;
use tokenizers::models::ModelWrapper;
use tokenizers::normalizers::replace::ReplacePattern;
use tokenizers::normalizers::{NormalizerWrapper, Prepend, Replace, Sequence};
use tokenizers::{AddedToken, NormalizedString, Normalizer};

use super::charsmap;
use super::spm_proto::{parse_model_proto, ModelProto, ModelType, Piece, PieceType};
use crate::error::{ModelError, Result};

/// Pieces longer than this (in bytes) are never the result of a merge. Real vocabularies stay
/// far below it; the bound keeps merge derivation linear in the size of hostile input.
const MAX_MERGED_PIECE_BYTES: usize = 1024;

/// The segmentation algorithm.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Algorithm {
    /// BPE over piece scores.
    Bpe,
    /// Unigram language model (Viterbi over piece scores).
    Unigram,
}

/// Whose behaviour a pipeline reproduces where the two differ.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flavor {
    /// The `sentencepiece` library: merges only into normal and user-defined pieces,
    /// user-defined pieces matched in the normalised text.
    SentencePiece,
    /// llama.cpp: merges into any token of the vocabulary, user-defined tokens matched in the
    /// raw text and every text fragment given the space prefix.
    LlamaCpp,
}

/// Everything the builder needs to know about a SentencePiece-style vocabulary.
#[derive(Debug, Clone)]
pub struct SpmSpec<'a> {
    /// The vocabulary, in id order.
    pub pieces: &'a [Piece],
    /// BPE or Unigram.
    pub algorithm: Algorithm,
    /// Whether unknown characters become `<0xXX>` byte pieces.
    pub byte_fallback: bool,
    /// Id of the unknown piece.
    pub unk_id: Option<u32>,
    /// The precompiled character map (empty: none).
    pub charsmap: &'a [u8],
    /// Trim and collapse spaces.
    pub remove_extra_whitespaces: bool,
    /// Put `▁` in front of the text.
    pub add_dummy_prefix: bool,
    /// Write spaces as `▁`.
    pub escape_whitespaces: bool,
    /// Whose behaviour to follow.
    pub flavor: Flavor,
}

fn tok_err(e: impl std::fmt::Display) -> ModelError {
    ModelError::Tokenizer(e.to_string())
}

/// Build a `tokenizers` pipeline for a SentencePiece-style vocabulary.
pub fn build(spec: &SpmSpec<'_>) -> Result<tokenizers::Tokenizer> {
    if spec.pieces.is_empty() {
        return Err(tok_err("the vocabulary is empty"));
    }
    let n = spec.pieces.len();
    if u32::try_from(n).is_err() {
        return Err(tok_err(format!("vocabulary of {n} pieces is too large")));
    }
    if let Some(u) = spec.unk_id {
        if u as usize >= n {
            return Err(tok_err(format!(
                "unknown-token id {u} is outside the vocabulary of {n}"
            )));
        }
    }
    let mut ids = Vocab::default();
    for (i, p) in spec.pieces.iter().enumerate() {
        if let Some(prev) = ids.insert(p.piece.clone(), i as u32) {
            return Err(tok_err(format!(
                "piece {:?} appears twice in the vocabulary (ids {prev} and {i})",
                p.piece
            )));
        }
    }
    let model: ModelWrapper = match spec.algorithm {
        Algorithm::Bpe => bpe_model(spec, ids)?.into(),
        Algorithm::Unigram => unigram_model(spec)?.into(),
    };
    let mut tok = tokenizers::Tokenizer::new(model);
    let norm = normalizer(spec)?;
    tok.with_normalizer(Some(norm.clone())).map_err(tok_err)?;
    tok.with_decoder(Some(decoder(spec)));
    let specials: Vec<AddedToken> = spec
        .pieces
        .iter()
        .filter(|p| matches!(p.kind, PieceType::Control | PieceType::Unknown))
        .filter(|p| !p.piece.is_empty())
        .map(|p| AddedToken::from(p.piece.clone(), true))
        .collect();
    tok.add_special_tokens(specials).map_err(tok_err)?;
    let user: Vec<AddedToken> = spec
        .pieces
        .iter()
        .filter(|p| p.kind == PieceType::UserDefined && !p.piece.is_empty())
        // A piece the normaliser erases (say " " with whitespace clean-up) can never match,
        // and an empty pattern would match everywhere.
        .filter(|p| flavor_raw(spec) || !normalizes_to_nothing(&norm, &p.piece))
        .map(|p| {
            AddedToken::from(p.piece.clone(), false)
                .normalized(spec.flavor == Flavor::SentencePiece)
        })
        .collect();
    tok.add_tokens(user).map_err(tok_err)?;
    Ok(tok)
}

/// Whether user-defined pieces are matched in the raw text (llama.cpp) rather than in the
/// normalised text (SentencePiece).
fn flavor_raw(spec: &SpmSpec<'_>) -> bool {
    spec.flavor == Flavor::LlamaCpp
}

fn normalizes_to_nothing(norm: &NormalizerWrapper, text: &str) -> bool {
    let mut n = NormalizedString::from(text);
    norm.normalize(&mut n).is_err() || n.get().is_empty()
}

/// BPE with merges ordered by the score of the merged piece (highest first), then by the ids of
/// the merged piece and of its two halves.
fn bpe_model(spec: &SpmSpec<'_>, vocab: Vocab) -> Result<BPE> {
    let mut merges: Vec<(f32, u32, u32, u32)> = Vec::new();
    for (t, p) in spec.pieces.iter().enumerate() {
        let target = match spec.flavor {
            Flavor::SentencePiece => {
                matches!(p.kind, PieceType::Normal | PieceType::UserDefined)
            }
            Flavor::LlamaCpp => true,
        };
        if !target || p.piece.len() > MAX_MERGED_PIECE_BYTES {
            continue;
        }
        for (i, _) in p.piece.char_indices().skip(1) {
            let (l, r) = p.piece.split_at(i);
            if let (Some(&li), Some(&ri)) = (vocab.get(l), vocab.get(r)) {
                merges.push((p.score, t as u32, li, ri));
            }
        }
    }
    merges.sort_by(|a, b| {
        b.0.total_cmp(&a.0)
            .then(a.1.cmp(&b.1))
            .then(a.2.cmp(&b.2))
            .then(a.3.cmp(&b.3))
    });
    let piece = |i: u32| spec.pieces[i as usize].piece.clone();
    let merges: Vec<(String, String)> = merges
        .into_iter()
        .map(|(_, _, l, r)| (piece(l), piece(r)))
        .collect();
    let mut builder = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .fuse_unk(true)
        .byte_fallback(spec.byte_fallback);
    if let Some(u) = spec.unk_id {
        builder = builder.unk_token(piece(u));
    }
    builder.build().map_err(tok_err)
}

/// Unigram over the normal pieces' scores. Control, unknown, byte and unused pieces are never
/// produced from text by SentencePiece, so they get a score no path can prefer; the penalty of
/// unknown characters is computed, as SentencePiece does, from the normal pieces only.
fn unigram_model(spec: &SpmSpec<'_>) -> Result<Unigram> {
    const NEVER: f64 = -1e10;
    let vocab: Vec<(String, f64)> = spec
        .pieces
        .iter()
        .map(|p| {
            let score = match p.kind {
                PieceType::Normal | PieceType::UserDefined => f64::from(p.score),
                _ => NEVER,
            };
            (p.piece.clone(), score)
        })
        .collect();
    let min_normal = spec
        .pieces
        .iter()
        .filter(|p| p.kind == PieceType::Normal)
        .map(|p| f64::from(p.score))
        .fold(f64::INFINITY, f64::min);
    let mut model = Unigram::from(vocab, spec.unk_id.map(|u| u as usize), spec.byte_fallback)
        .map_err(tok_err)?;
    model.min_score = if min_normal.is_finite() {
        min_normal
    } else {
        0.0
    };
    Ok(model)
}

fn replace(pattern: ReplacePattern, content: &str) -> Result<NormalizerWrapper> {
    Ok(Replace::new(pattern, content).map_err(tok_err)?.into())
}

fn normalizer(spec: &SpmSpec<'_>) -> Result<NormalizerWrapper> {
    let mut steps: Vec<NormalizerWrapper> = Vec::new();
    if !spec.charsmap.is_empty() {
        steps.push(charsmap::precompiled(spec.charsmap)?.into());
    }
    let space = if spec.escape_whitespaces { "▁" } else { " " };
    if spec.remove_extra_whitespaces {
        // SentencePiece drops leading spaces and keeps one space of each inner run ...
        steps.push(replace(ReplacePattern::Regex("^ +".into()), "")?);
        steps.push(replace(ReplacePattern::Regex(" {2,}".into()), " ")?);
    }
    if spec.escape_whitespaces {
        steps.push(replace(ReplacePattern::String(" ".into()), "▁")?);
    }
    if spec.add_dummy_prefix {
        steps.push(dummy_prefix(spec, space)?);
    }
    if spec.remove_extra_whitespaces {
        // ... and, once spaces are escaped, every trailing space symbol.
        steps.push(replace(
            ReplacePattern::Regex(format!("{}+$", regex_literal(space))),
            "",
        )?);
    }
    Ok(Sequence::new(steps).into())
}

/// Longest alternation of user-defined pieces put into the dummy-prefix rule; beyond it the
/// prefix is added unconditionally.
const MAX_USER_DEFINED_PATTERN_BYTES: usize = 1 << 16;

/// The dummy prefix. User-defined pieces are matched in the normalised text, and `tokenizers`
/// normalises their own text to find them; the prefix must not be put in front of that text,
/// so for SentencePiece it is added to any text except one that is exactly a user-defined
/// piece.
fn dummy_prefix(spec: &SpmSpec<'_>, space: &str) -> Result<NormalizerWrapper> {
    let user: Vec<String> = if spec.flavor == Flavor::SentencePiece {
        spec.pieces
            .iter()
            .filter(|p| p.kind == PieceType::UserDefined && !p.piece.is_empty())
            .map(|p| regex_literal(&p.piece.replace(' ', space)))
            .collect()
    } else {
        Vec::new()
    };
    let pattern_len: usize = user.iter().map(|u| u.len() + 1).sum();
    if user.is_empty() || pattern_len > MAX_USER_DEFINED_PATTERN_BYTES {
        return Ok(Prepend::new(space.to_string()).into());
    }
    replace(
        ReplacePattern::Regex(format!("^(?!(?:{})$)", user.join("|"))),
        space,
    )
}

/// A regex matching `s` literally: every character written as a `\x{..}` escape.
fn regex_literal(s: &str) -> String {
    s.chars()
        .map(|c| format!("\\x{{{:X}}}", c as u32))
        .collect()
}

fn decoder(spec: &SpmSpec<'_>) -> DecoderWrapper {
    let mut steps: Vec<DecoderWrapper> = Vec::new();
    if spec.escape_whitespaces {
        // A plain string pattern always compiles.
        if let Ok(r) = Replace::new("▁", " ") {
            steps.push(DecoderWrapper::Replace(r));
        }
    }
    steps.push(ByteFallback::new().into());
    steps.push(Fuse::new().into());
    if spec.remove_extra_whitespaces {
        // SentencePiece drops every leading space symbol when it removes extra whitespace.
        steps.push(DecoderStrip::new(' ', usize::MAX, 0).into());
    } else if spec.add_dummy_prefix {
        steps.push(DecoderStrip::new(' ', 1, 0).into());
    }
    DecoderSequence::new(steps).into()
}

/// A `tokenizer.model` file decoded and turned into a pipeline.
pub struct SentencePieceModel {
    /// The decoded protobuf.
    pub proto: ModelProto,
    /// The `tokenizers` pipeline that reproduces the `sentencepiece` library.
    pub tokenizer: tokenizers::Tokenizer,
}

/// Decode the bytes of a `tokenizer.model` file and build its pipeline.
///
/// Never panics on any input; every problem is a [`ModelError::Tokenizer`].
pub fn from_model_bytes(bytes: &[u8]) -> Result<SentencePieceModel> {
    let proto = parse_model_proto(bytes)?;
    let ts = &proto.trainer_spec;
    let algorithm = match ts.model_type {
        ModelType::Bpe => Algorithm::Bpe,
        ModelType::Unigram => Algorithm::Unigram,
        other => {
            return Err(tok_err(format!(
                "SentencePiece model type {other:?} is not supported; supported: BPE, Unigram"
            )))
        }
    };
    if ts.treat_whitespace_as_suffix {
        return Err(tok_err(
            "SentencePiece models with treat_whitespace_as_suffix are not supported",
        ));
    }
    let ns = &proto.normalizer_spec;
    let unk_id = u32::try_from(ts.unk_id).ok();
    let tokenizer = build(&SpmSpec {
        pieces: &proto.pieces,
        algorithm,
        byte_fallback: ts.byte_fallback,
        unk_id,
        charsmap: &ns.precompiled_charsmap,
        remove_extra_whitespaces: ns.remove_extra_whitespaces,
        add_dummy_prefix: ns.add_dummy_prefix,
        escape_whitespaces: ns.escape_whitespaces,
        flavor: Flavor::SentencePiece,
    })?;
    Ok(SentencePieceModel { proto, tokenizer })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn piece(s: &str, score: f32, kind: PieceType) -> Piece {
        Piece {
            piece: s.into(),
            score,
            kind,
        }
    }

    fn spec(pieces: &[Piece], algorithm: Algorithm) -> SpmSpec<'_> {
        SpmSpec {
            pieces,
            algorithm,
            byte_fallback: false,
            unk_id: Some(0),
            charsmap: &[],
            remove_extra_whitespaces: false,
            add_dummy_prefix: true,
            escape_whitespaces: true,
            flavor: Flavor::SentencePiece,
        }
    }

    fn vocab() -> Vec<Piece> {
        vec![
            piece("<unk>", 0.0, PieceType::Unknown),
            piece("<s>", 0.0, PieceType::Control),
            piece("▁", -1.0, PieceType::Normal),
            piece("a", -2.0, PieceType::Normal),
            piece("b", -3.0, PieceType::Normal),
            piece("▁a", -4.0, PieceType::Normal),
            piece("▁ab", -5.0, PieceType::Normal),
            piece("ab", -6.0, PieceType::Normal),
        ]
    }

    #[test]
    fn bpe_merges_follow_scores() {
        let v = vocab();
        let tok = build(&spec(&v, Algorithm::Bpe)).unwrap();
        let ids = tok.encode("ab ab", false).unwrap().get_ids().to_vec();
        // "▁a" (-4) is merged before "ab" (-6), then "▁ab" (-5).
        assert_eq!(ids, vec![6, 6]);
        assert_eq!(tok.decode(&ids, true).unwrap(), "ab ab");
        // An unknown character run is fused into one <unk>.
        let ids = tok.encode("axyb", false).unwrap().get_ids().to_vec();
        assert_eq!(ids, vec![5, 0, 4]);
    }

    #[test]
    fn unigram_prefers_the_best_path() {
        let v = vocab();
        let tok = build(&spec(&v, Algorithm::Unigram)).unwrap();
        let ids = tok.encode("ab", false).unwrap().get_ids().to_vec();
        assert_eq!(ids, vec![6]);
        assert_eq!(tok.decode(&ids, true).unwrap(), "ab");
    }

    #[test]
    fn duplicate_pieces_are_rejected() {
        let mut v = vocab();
        v.push(piece("a", -9.0, PieceType::Normal));
        let e = build(&spec(&v, Algorithm::Bpe)).unwrap_err().to_string();
        assert!(e.contains("appears twice"), "{e}");
    }

    #[test]
    fn garbage_bytes_give_errors() {
        for bytes in [
            &b""[..],
            b"\x00",
            b"not a model at all",
            &[0x0a, 0xff, 0x01],
        ] {
            assert!(from_model_bytes(bytes).is_err());
        }
    }

    #[test]
    fn random_vocabularies_never_panic() {
        let alphabet = [
            "", "a", "b", "▁", "ab", "▁a", "<0x61>", "<s>", "é", " ", "\u{0}",
        ];
        let kinds = [
            PieceType::Normal,
            PieceType::Unknown,
            PieceType::Control,
            PieceType::UserDefined,
            PieceType::Unused,
            PieceType::Byte,
        ];
        let mut state = 0x1234_5678_9abc_def1u64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for _ in 0..500 {
            let n = 1 + (next() % 12) as usize;
            let mut pieces: Vec<Piece> = Vec::new();
            for _ in 0..n {
                let text: String = (0..1 + next() % 3)
                    .map(|_| alphabet[(next() % alphabet.len() as u64) as usize])
                    .collect();
                if pieces.iter().any(|p| p.piece == text) {
                    continue;
                }
                pieces.push(piece(
                    &text,
                    -((next() % 100) as f32) / 10.0,
                    kinds[(next() % kinds.len() as u64) as usize],
                ));
            }
            let r = next();
            let s = SpmSpec {
                pieces: &pieces,
                algorithm: if r & 1 == 0 {
                    Algorithm::Bpe
                } else {
                    Algorithm::Unigram
                },
                byte_fallback: r & 2 != 0,
                unk_id: (r & 4 != 0).then_some(((r >> 8) % pieces.len() as u64) as u32),
                charsmap: &[],
                remove_extra_whitespaces: r & 16 != 0,
                add_dummy_prefix: r & 32 != 0,
                escape_whitespaces: r & 64 != 0,
                flavor: if r & 128 != 0 {
                    Flavor::SentencePiece
                } else {
                    Flavor::LlamaCpp
                },
            };
            if let Ok(tok) = build(&s) {
                for text in ["", " ", "ab ab", " a<s>b  ", "éa\u{0}b▁", "xyz"] {
                    if let Ok(e) = tok.encode(text, true) {
                        let _ = tok.decode(e.get_ids(), true);
                        let _ = tok.decode(e.get_ids(), false);
                    }
                }
            }
        }
    }
}
