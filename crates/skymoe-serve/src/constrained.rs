//! Constrained decoding: grammars that decide, token by token, which tokens the sampler may
//! pick, so that the generated text always belongs to a language — JSON that validates
//! against a JSON schema (`response_format` `json_schema`), any JSON object (`json_object`),
//! tool calls whose arguments validate against the function's parameters, or a Lark grammar.
//!
//! The grammars are compiled and run by [`llguidance`] (an Earley parser over a lexer of
//! derivative-based regular expressions, the engine llama.cpp and vLLM use). It works on the
//! bytes each token spells, held in a prefix tree of the vocabulary ([`ConstraintVocab`], built
//! once per model): for each step it walks the tree and the parser together and returns the
//! set of tokens whose bytes keep the text a prefix of some sentence of the language.
//!
//! A [`Constraint`] follows one generation: [`Constraint::apply`] sets the logits of every
//! token it does not allow to −∞ before sampling (or says the sentence is complete), and
//! [`Constraint::commit`] advances it over the token that was sampled. End-of-sequence tokens
//! are allowed exactly when the text so far is a complete sentence; once no other token can
//! follow, the constraint is finished.
//!
//! JSON is generated compactly (no whitespace between tokens, `,` and `:` as separators), so
//! a schema whose strings, numbers and arrays are bounded has a bounded length.

use std::fmt;
use std::sync::Arc;

use llguidance::api::TopLevelGrammar;
use llguidance::toktrie::{SimpleVob, TokEnv, TokRxInfo, TokTrie, TokenizerEnv};
use llguidance::{Matcher, ParserFactory};
use serde_json::{json, Value};
use skymoe_model::Tokenizer;

/// Longest error message kept from the grammar compiler (its messages can quote whole
/// grammars).
const MAX_MESSAGE: usize = 600;

/// Why a constraint could not be built or followed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConstraintError {
    /// The JSON schema is malformed, unsatisfiable, or uses features that cannot be enforced.
    #[error("invalid JSON schema: {0}")]
    InvalidSchema(String),
    /// The grammar does not compile.
    #[error("invalid grammar: {0}")]
    InvalidGrammar(String),
    /// The vocabulary cannot be turned into the prefix tree the grammars run on.
    #[error("the vocabulary cannot be used for constrained decoding: {0}")]
    Vocabulary(String),
    /// The token that was committed is not one the constraint allowed.
    #[error("token {0} is not allowed by the constraint")]
    Rejected(u32),
    /// The grammar engine failed while following the generation.
    #[error("constrained decoding failed: {0}")]
    Engine(String),
}

/// A short, one-paragraph form of a grammar compiler's message.
fn short(msg: impl fmt::Display) -> String {
    let s = msg.to_string();
    let s = s.trim();
    if s.len() <= MAX_MESSAGE {
        return s.to_string();
    }
    let mut end = MAX_MESSAGE;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

/// What the generated text must be.
#[derive(Debug, Clone, PartialEq)]
pub enum Grammar {
    /// Any JSON object (`response_format: {"type": "json_object"}`).
    JsonObject,
    /// JSON valid against `schema`. With `strict`, keywords that cannot be enforced are an
    /// error; without, they are ignored (the rest is still enforced).
    JsonSchema {
        /// The JSON schema (an object or a boolean).
        schema: Value,
        /// Refuse schemas with keywords that cannot be enforced.
        strict: bool,
    },
    /// A grammar in llguidance's Lark dialect (which can embed JSON schemas with `%json`).
    Lark(String),
}

impl Grammar {
    /// JSON valid against `schema`, checked strictly.
    pub fn json_schema(schema: Value, strict: bool) -> Self {
        Grammar::JsonSchema { schema, strict }
    }

    /// The grammar as llguidance's top-level grammar description.
    fn to_llguidance(&self) -> Result<TopLevelGrammar, ConstraintError> {
        match self {
            Grammar::JsonObject => Ok(TopLevelGrammar::from_json_schema(with_options(
                json!({"type": "object"}),
                true,
            )?)),
            Grammar::JsonSchema { schema, strict } => Ok(TopLevelGrammar::from_json_schema(
                with_options(schema.clone(), *strict)?,
            )),
            Grammar::Lark(src) => {
                if src.trim().is_empty() {
                    return Err(ConstraintError::InvalidGrammar(
                        "the grammar is empty".into(),
                    ));
                }
                Ok(TopLevelGrammar::from_lark(src.clone()))
            }
        }
    }

    /// The error a compilation failure of this grammar is reported as.
    fn error(&self, msg: impl fmt::Display) -> ConstraintError {
        match self {
            Grammar::Lark(_) => ConstraintError::InvalidGrammar(short(msg)),
            _ => ConstraintError::InvalidSchema(short(msg)),
        }
    }
}

/// `schema` with the generation options every JSON constraint uses: compact separators, no
/// free whitespace, and (unless `strict`) unsupported keywords ignored.
fn with_options(schema: Value, strict: bool) -> Result<Value, ConstraintError> {
    let mut schema = match schema {
        Value::Bool(true) => json!({}),
        Value::Bool(false) => {
            return Err(ConstraintError::InvalidSchema(
                "the schema `false` accepts no value".into(),
            ))
        }
        Value::Object(o) => Value::Object(o),
        other => {
            return Err(ConstraintError::InvalidSchema(format!(
                "a JSON schema must be an object or a boolean, not {}",
                json_kind(&other)
            )))
        }
    };
    let options = json!({
        "whitespace_flexible": false,
        "item_separator": ",",
        "key_separator": ":",
        "lenient": !strict,
    });
    if let Some(o) = schema.as_object_mut() {
        o.insert("x-guidance".to_string(), options);
    }
    Ok(schema)
}

/// The JSON type name of a value, for messages.
pub(crate) fn json_kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

// ---------------------------------------------------------------------------------------
// The vocabulary

/// The tokenizer environment llguidance runs on: the prefix tree of token bytes, with greedy
/// longest-match tokenisation (only used for text the grammar forces, which skymoe does not
/// ask for).
struct TrieEnv {
    trie: TokTrie,
}

impl TokenizerEnv for TrieEnv {
    fn tok_trie(&self) -> &TokTrie {
        &self.trie
    }

    fn tokenize_bytes(&self, s: &[u8]) -> Vec<u32> {
        self.trie.greedy_tokenize(s)
    }

    fn tokenize_is_canonical(&self) -> bool {
        false
    }
}

/// A model's vocabulary prepared for constrained decoding: the bytes every token id spells,
/// in a prefix tree, with the end-of-sequence tokens and a compiler for grammars over it.
/// Build it once per model (it walks the whole vocabulary) and share it.
#[derive(Clone)]
pub struct ConstraintVocab {
    factory: Arc<ParserFactory>,
    /// Logits per step (ids at or beyond it are never sampled).
    logits_len: usize,
    /// End-of-sequence ids inside the logits.
    eos: Vec<u32>,
}

impl fmt::Debug for ConstraintVocab {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConstraintVocab")
            .field("logits_len", &self.logits_len)
            .field("eos", &self.eos)
            .finish()
    }
}

impl ConstraintVocab {
    /// The vocabulary of `tokenizer` for a model that produces `logits_len` logits per step;
    /// `eos` are the ids that end generation (ids outside the logits are ignored; with none
    /// left, a constraint reports its end through [`Step::Finished`] only).
    pub fn from_tokenizer(
        tokenizer: &Tokenizer,
        logits_len: usize,
        eos: &[u32],
    ) -> Result<Self, ConstraintError> {
        let bytes = token_bytes(tokenizer.inner());
        Self::from_token_bytes(bytes, logits_len, eos)
    }

    /// A vocabulary from the bytes of each token id (an empty entry is a token that is never
    /// allowed; special tokens start with byte `0xFF`, so no grammar over text produces
    /// them). `logits_len` and `eos` as in [`ConstraintVocab::from_tokenizer`].
    pub fn from_token_bytes(
        mut tokens: Vec<Vec<u8>>,
        logits_len: usize,
        eos: &[u32],
    ) -> Result<Self, ConstraintError> {
        if logits_len == 0 {
            return Err(ConstraintError::Vocabulary(
                "the vocabulary is empty".into(),
            ));
        }
        // Ids beyond the logits are never sampled: drop their bytes.
        tokens.resize(logits_len, Vec::new());
        let mut eos_in: Vec<u32> = eos
            .iter()
            .copied()
            .filter(|&e| (e as usize) < logits_len)
            .collect();
        eos_in.sort_unstable();
        eos_in.dedup();
        // llguidance needs an end-of-sequence id; without one, a virtual id past the logits
        // stands in (it is never sampled: the end shows as `Step::Finished`).
        let trie_eos = match eos_in.first() {
            Some(&e) => e,
            None => {
                tokens.push(Vec::new());
                (tokens.len() - 1) as u32
            }
        };
        for &e in &eos_in {
            // End-of-sequence ids spell nothing the grammar could produce.
            if let Some(t) = tokens.get_mut(e as usize) {
                if t.first() != Some(&TokTrie::SPECIAL_TOKEN_MARKER) {
                    t.clear();
                }
            }
        }
        let vocab_size = u32::try_from(tokens.len())
            .map_err(|_| ConstraintError::Vocabulary("too many tokens".into()))?;
        let eos_list = if eos_in.is_empty() {
            vec![trie_eos]
        } else {
            eos_in.clone()
        };
        let built = std::panic::catch_unwind(move || {
            let info = TokRxInfo::new(vocab_size, trie_eos);
            TokTrie::from(&info, &tokens).with_eos_tokens(&eos_list)
        });
        let trie = built
            .map_err(|_| ConstraintError::Vocabulary("the token table is inconsistent".into()))?;
        let env: TokEnv = Arc::new(TrieEnv { trie });
        let mut factory =
            ParserFactory::new_simple(&env).map_err(|e| ConstraintError::Vocabulary(short(e)))?;
        factory.quiet();
        Ok(ConstraintVocab {
            factory: Arc::new(factory),
            logits_len,
            eos: eos_in,
        })
    }

    /// Logits per step this vocabulary was built for.
    pub fn logits_len(&self) -> usize {
        self.logits_len
    }

    /// The end-of-sequence ids a constraint allows once its sentence is complete.
    pub fn eos(&self) -> &[u32] {
        &self.eos
    }

    /// The bytes token `id` spells (special tokens start with `0xFF`).
    pub fn token_bytes(&self, id: u32) -> &[u8] {
        let trie = self.factory.tok_env().tok_trie();
        if (id as usize) < trie.vocab_size() {
            trie.token(id)
        } else {
            &[]
        }
    }

    /// Compile `grammar` into a constraint for one generation. Errors are
    /// [`ConstraintError::InvalidSchema`] / [`ConstraintError::InvalidGrammar`] with the
    /// compiler's reason.
    pub fn compile(&self, grammar: &Grammar) -> Result<Constraint, ConstraintError> {
        let top = grammar.to_llguidance()?;
        let factory = self.factory.clone();
        let parser =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| factory.create_parser(top)))
                .map_err(|_| grammar.error("the grammar compiler failed"))?
                .map_err(|e| grammar.error(e))?;
        let matcher = Matcher::new(Ok(parser));
        if let Some(e) = matcher.get_error() {
            return Err(grammar.error(e));
        }
        Ok(Constraint {
            matcher,
            logits_len: self.logits_len,
            eos: self.eos.clone(),
            mask: None,
            finished: false,
        })
    }
}

/// The bytes each token of a `tokenizers` pipeline spells, by id (over its whole vocabulary,
/// added tokens included).
///
/// Byte-level BPE pieces (`Ġ`-style, GPT-2's byte-to-character table) are mapped back to
/// bytes; otherwise pieces are text with `▁` for a space and `<0xNN>` byte-fallback pieces
/// for single bytes. Special added tokens get the `0xFF` marker; other added tokens spell
/// their content.
pub fn token_bytes(tok: &tokenizers::Tokenizer) -> Vec<Vec<u8>> {
    let n = tok.get_vocab_size(true);
    let byte_level = tok
        .get_decoder()
        .and_then(|d| serde_json::to_value(d).ok())
        .is_some_and(|d| mentions_type(&d, "ByteLevel"));
    let unicode_to_byte = byte_level.then(byte_level_table);
    let mut out: Vec<Vec<u8>> = vec![Vec::new(); n];
    let mut done = vec![false; n];
    for (id, added) in tok.get_added_tokens_decoder() {
        let Some(slot) = out.get_mut(id as usize) else {
            continue;
        };
        let mut bytes = Vec::with_capacity(added.content.len() + 1);
        if added.special {
            bytes.push(TokTrie::SPECIAL_TOKEN_MARKER);
        }
        bytes.extend_from_slice(added.content.as_bytes());
        *slot = bytes;
        done[id as usize] = true;
    }
    for id in 0..n {
        if done[id] {
            continue;
        }
        let Some(piece) = tok.id_to_token(id as u32) else {
            continue;
        };
        out[id] = match &unicode_to_byte {
            Some(table) => piece
                .chars()
                .map(&table)
                .collect::<Option<Vec<u8>>>()
                // A piece outside the byte alphabet spells nothing a grammar could want.
                .unwrap_or_default(),
            None => match byte_fallback(&piece) {
                Some(b) => vec![b],
                None => piece.replace('\u{2581}', " ").into_bytes(),
            },
        };
    }
    out
}

/// Whether a serialised decoder (or a sequence of them) contains one of type `ty`.
fn mentions_type(v: &Value, ty: &str) -> bool {
    match v {
        Value::Object(o) => {
            o.get("type").and_then(Value::as_str) == Some(ty)
                || o.values().any(|x| mentions_type(x, ty))
        }
        Value::Array(a) => a.iter().any(|x| mentions_type(x, ty)),
        _ => false,
    }
}

/// The byte of a `<0xNN>` byte-fallback piece.
fn byte_fallback(piece: &str) -> Option<u8> {
    let hex = piece.strip_prefix("<0x")?.strip_suffix('>')?;
    if hex.len() != 2 {
        return None;
    }
    u8::from_str_radix(hex, 16).ok()
}

/// The inverse of GPT-2's byte-to-character table: printable Latin-1 bytes stand for
/// themselves, the other 68 bytes for U+0100 onwards in byte order.
fn byte_level_table() -> impl Fn(char) -> Option<u8> {
    let mut map = std::collections::HashMap::with_capacity(256);
    let mut next = 0x100u32;
    for b in 0..=255u8 {
        let printable = matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
        let c = if printable {
            char::from(b)
        } else {
            let c = char::from_u32(next).unwrap_or('\u{FFFD}');
            next += 1;
            c
        };
        map.insert(c, b);
    }
    move |c| map.get(&c).copied()
}

// ---------------------------------------------------------------------------------------
// One generation

/// What to do at a decoding step of a constrained generation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Sample from the masked logits.
    Sample,
    /// The text is a complete sentence and nothing may follow: end the generation.
    Finished,
}

/// The grammar state of one generation. Clones continue independently (one per choice when
/// a request asks for several).
pub struct Constraint {
    matcher: Matcher,
    logits_len: usize,
    eos: Vec<u32>,
    /// The mask of the current step, until a token is committed.
    mask: Option<SimpleVob>,
    finished: bool,
}

impl Clone for Constraint {
    fn clone(&self) -> Self {
        Constraint {
            matcher: self.matcher.clone(),
            logits_len: self.logits_len,
            eos: self.eos.clone(),
            mask: self.mask.clone(),
            finished: self.finished,
        }
    }
}

impl fmt::Debug for Constraint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Constraint")
            .field("logits_len", &self.logits_len)
            .field("finished", &self.finished)
            .finish_non_exhaustive()
    }
}

impl Constraint {
    /// The set of tokens allowed at this step (computed once per step).
    fn mask(&mut self) -> Result<&SimpleVob, ConstraintError> {
        if self.mask.is_none() {
            let m = self
                .matcher
                .compute_mask_or_eos()
                .map_err(|e| ConstraintError::Engine(short(e)))?;
            self.mask = Some(m);
        }
        self.mask
            .as_ref()
            .ok_or_else(|| ConstraintError::Engine("no mask".into()))
    }

    /// Whether `token` is allowed at this step.
    pub fn allows(&mut self, token: u32) -> Result<bool, ConstraintError> {
        let limit = self.logits_len;
        let m = self.mask()?;
        Ok((token as usize) < limit && (token as usize) < m.len() && m.is_allowed(token))
    }

    /// The tokens allowed at this step, in increasing order (end-of-sequence ids included
    /// when the text is complete).
    pub fn allowed_tokens(&mut self) -> Result<Vec<u32>, ConstraintError> {
        let limit = self.logits_len;
        let m = self.mask()?;
        let mut out = Vec::new();
        m.iter_set_entries(|i| {
            if i < limit {
                out.push(i as u32)
            }
        });
        Ok(out)
    }

    /// Set the logits of the tokens this step does not allow to −∞. Returns
    /// [`Step::Finished`] when the text is complete and only the end of the sequence may
    /// follow (the logits are then left as they are).
    pub fn apply(&mut self, logits: &mut [f32]) -> Result<Step, ConstraintError> {
        if self.finished || self.matcher.is_stopped() {
            self.finished = true;
            return Ok(Step::Finished);
        }
        let limit = self.logits_len.min(logits.len());
        let eos = std::mem::take(&mut self.eos);
        let result = (|| {
            let m = self.mask()?;
            let words = m.as_slice();
            let mut any_text = false;
            for (w, &bits) in words.iter().enumerate() {
                let base = w * 32;
                if base >= limit {
                    break;
                }
                if bits == u32::MAX && base + 32 <= limit {
                    any_text = true;
                    continue;
                }
                for bit in 0..32 {
                    let i = base + bit;
                    if i >= limit {
                        break;
                    }
                    if bits & (1 << bit) == 0 {
                        logits[i] = f32::NEG_INFINITY;
                    } else if !any_text && !eos.contains(&(i as u32)) {
                        any_text = true;
                    }
                }
            }
            for l in logits.iter_mut().skip(limit) {
                *l = f32::NEG_INFINITY;
            }
            Ok(if any_text {
                Step::Sample
            } else {
                Step::Finished
            })
        })();
        self.eos = eos;
        if result == Ok(Step::Finished) {
            self.finished = true;
        }
        result
    }

    /// Whether `token` ends the sequence (an end-of-sequence id of the vocabulary).
    pub fn is_eos(&self, token: u32) -> bool {
        self.eos.contains(&token)
    }

    /// Advance over the sampled `token`, which must be one this step allows.
    /// An end-of-sequence token finishes the constraint.
    pub fn commit(&mut self, token: u32) -> Result<(), ConstraintError> {
        if !self.allows(token)? {
            return Err(ConstraintError::Rejected(token));
        }
        self.mask = None;
        if self.is_eos(token) {
            self.finished = true;
            return Ok(());
        }
        self.matcher
            .consume_token(token)
            .map_err(|e| ConstraintError::Engine(short(e)))?;
        if self.matcher.is_stopped() {
            self.finished = true;
        }
        Ok(())
    }

    /// The first allowed token that is not an end-of-sequence id, if any (a fallback when
    /// sampling produced a token the mask excludes, as it can with non-finite logits).
    pub fn first_allowed(&mut self) -> Result<Option<u32>, ConstraintError> {
        let limit = self.logits_len;
        let eos = self.eos.clone();
        let m = self.mask()?;
        let mut first = None;
        m.iter_set_entries(|i| {
            if first.is_none() && i < limit && !eos.contains(&(i as u32)) {
                first = Some(i as u32);
            }
        });
        Ok(first.or_else(|| eos.first().copied()))
    }

    /// Whether the text so far is a complete sentence of the grammar.
    pub fn is_accepting(&mut self) -> bool {
        self.finished || self.matcher.is_accepting().unwrap_or(false)
    }

    /// Whether nothing more may be generated (the sentence is complete and cannot grow, or an
    /// end-of-sequence token was committed).
    pub fn is_finished(&self) -> bool {
        self.finished || self.matcher.is_stopped()
    }
}

#[cfg(test)]
mod tests;
