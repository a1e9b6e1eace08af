//! Token files: a corpus tokenized once into a flat array of `u32` token ids, memory-mapped
//! for reading.
//!
//! The format is described on [`TokenFile`].

use std::fs::File;
use std::io::{BufWriter, Read, Seek, SeekFrom, Write};
use std::ops::Range;
use std::path::{Path, PathBuf};

use super::atomic::write_atomically_with;
use super::corpus::Corpus;
use super::error::{DataError, Result};

/// The first 8 bytes of every token file.
pub const TOKEN_FILE_MAGIC: [u8; 8] = *b"SKYMOETK";
/// The size of the header that precedes the token ids.
pub const TOKEN_FILE_HEADER_LEN: usize = 64;
/// The format version this build writes and reads.
const VERSION: u32 = 1;
/// Stored in place of the end-of-sequence id when there is none.
const NO_EOS: u32 = u32::MAX;
/// Documents are tokenized in batches (in parallel) of at most this many documents...
const BATCH_DOCS: usize = 1024;
/// ... or this many bytes of text.
const BATCH_BYTES: usize = 8 << 20;

/// What [`TokenFile::build`] wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenFileStats {
    /// Tokens written (end-of-sequence tokens included).
    pub tokens: u64,
    /// Documents tokenized.
    pub documents: u64,
    /// Bytes of text tokenized.
    pub bytes: u64,
    /// Files read.
    pub files: u64,
    /// Vocabulary size recorded in the header.
    pub vocab_size: u32,
    /// The file written.
    pub path: PathBuf,
}

/// The parsed header of a token file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Header {
    n_tokens: u64,
    n_documents: u64,
    vocab_size: u32,
    eos_id: Option<u32>,
}

impl Header {
    fn encode(&self) -> [u8; TOKEN_FILE_HEADER_LEN] {
        let mut h = [0u8; TOKEN_FILE_HEADER_LEN];
        h[0..8].copy_from_slice(&TOKEN_FILE_MAGIC);
        h[8..12].copy_from_slice(&VERSION.to_le_bytes());
        h[12..16].copy_from_slice(&(TOKEN_FILE_HEADER_LEN as u32).to_le_bytes());
        h[16..24].copy_from_slice(&self.n_tokens.to_le_bytes());
        h[24..32].copy_from_slice(&self.n_documents.to_le_bytes());
        h[32..36].copy_from_slice(&self.vocab_size.to_le_bytes());
        h[36..40].copy_from_slice(&self.eos_id.unwrap_or(NO_EOS).to_le_bytes());
        h
    }

    /// Parse and check a header against the file size.
    fn decode(h: &[u8; TOKEN_FILE_HEADER_LEN], file_len: u64, path: &Path) -> Result<Header> {
        let corrupt = |reason: String| DataError::CorruptTokenFile {
            path: path.to_path_buf(),
            reason,
        };
        let u32_at = |o: usize| u32::from_le_bytes([h[o], h[o + 1], h[o + 2], h[o + 3]]);
        let u64_at = |o: usize| (u64::from(u32_at(o + 4)) << 32) | u64::from(u32_at(o));
        if h[0..8] != TOKEN_FILE_MAGIC {
            return Err(corrupt(
                "not a skymoe token file (bad magic bytes)".to_string(),
            ));
        }
        let version = u32_at(8);
        if version != VERSION {
            return Err(corrupt(format!(
                "unsupported format version {version}; this build reads version {VERSION}"
            )));
        }
        let header_len = u32_at(12);
        if header_len as usize != TOKEN_FILE_HEADER_LEN {
            return Err(corrupt(format!(
                "header length {header_len}, expected {TOKEN_FILE_HEADER_LEN}"
            )));
        }
        let n_tokens = u64_at(16);
        let n_documents = u64_at(24);
        let vocab_size = u32_at(32);
        let eos = u32_at(36);
        let expected = n_tokens
            .checked_mul(4)
            .and_then(|b| b.checked_add(TOKEN_FILE_HEADER_LEN as u64));
        if expected != Some(file_len) {
            let why = match expected {
                Some(e) if e > file_len => "truncated",
                _ => "size mismatch",
            };
            return Err(corrupt(format!(
                "{why}: the header says {n_tokens} tokens ({} bytes with the header) but the \
                 file is {file_len} bytes",
                expected.map_or_else(|| "overflowing".to_string(), |e| e.to_string())
            )));
        }
        if n_tokens == 0 {
            return Err(corrupt("the file holds no tokens".to_string()));
        }
        if usize::try_from(n_tokens).is_err() {
            return Err(corrupt(format!(
                "{n_tokens} tokens cannot be addressed on this machine"
            )));
        }
        if vocab_size == 0 {
            return Err(corrupt("vocabulary size is 0".to_string()));
        }
        let eos_id = (eos != NO_EOS).then_some(eos);
        if let Some(e) = eos_id {
            if e >= vocab_size {
                return Err(corrupt(format!(
                    "end-of-sequence id {e} is outside the vocabulary of {vocab_size}"
                )));
            }
        }
        Ok(Header {
            n_tokens,
            n_documents,
            vocab_size,
            eos_id,
        })
    }
}

/// Where the ids live.
enum Storage {
    /// Zero-copy: the file mapped into memory (little-endian machines).
    #[cfg(target_endian = "little")]
    Mapped(memmap2::Mmap),
    /// Decoded into memory (big-endian machines).
    #[cfg(not(target_endian = "little"))]
    Owned(Vec<u32>),
}

/// A token file opened for reading.
///
/// Layout (all integers little-endian):
///
/// | offset | size | field |
/// | --- | --- | --- |
/// | 0 | 8 | magic `SKYMOETK` |
/// | 8 | 4 | format version (1) |
/// | 12 | 4 | header length in bytes (64) |
/// | 16 | 8 | number of tokens `n` |
/// | 24 | 8 | number of documents |
/// | 32 | 4 | vocabulary size (every id is below it) |
/// | 36 | 4 | end-of-sequence id appended after each document, `u32::MAX` if none |
/// | 40 | 24 | reserved, zero |
/// | 64 | 4·n | the token ids |
///
/// The header is 64 bytes, a multiple of 4, and a memory map starts on a page boundary, so the
/// ids are 4-byte aligned in memory and are exposed as `&[u32]` without copying (on
/// little-endian machines; a big-endian machine decodes them into memory at open).
///
/// Token files are written once (under a temporary name, then renamed) and must not be
/// modified in place while open: the map would see the change.
pub struct TokenFile {
    path: PathBuf,
    header: Header,
    storage: Storage,
}

impl std::fmt::Debug for TokenFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenFile")
            .field("path", &self.path)
            .field("tokens", &self.header.n_tokens)
            .field("documents", &self.header.n_documents)
            .field("vocab_size", &self.header.vocab_size)
            .field("eos_id", &self.header.eos_id)
            .finish()
    }
}

impl TokenFile {
    /// Tokenize the documents of `inputs` one batch at a time with `tokenizer` (no
    /// post-processing: no BOS or other template tokens), append `eos_id` after each document
    /// if given, and write the ids to a token file at `out_path` (atomically: temporary file,
    /// fsync, rename). Memory stays bounded by one batch of documents whatever the corpus size.
    ///
    /// The vocabulary size recorded is the tokenizer's (added tokens included), or one past the
    /// largest id written if that is larger.
    ///
    /// Errors: unreadable or malformed input, an `eos_id` the tokenizer does not know
    /// ([`DataError::InvalidArgument`]), a tokenizer failure, an empty corpus or one that
    /// tokenizes to nothing ([`DataError::EmptyCorpus`]), a write failure. Nothing is written
    /// on error.
    pub fn build<P: AsRef<Path>>(
        inputs: &[P],
        tokenizer: &tokenizers::Tokenizer,
        eos_id: Option<u32>,
        out_path: &Path,
    ) -> Result<TokenFileStats> {
        let corpus = Corpus::new(inputs)?;
        if let Some(e) = eos_id {
            if e == NO_EOS || tokenizer.id_to_token(e).is_none() {
                return Err(DataError::InvalidArgument(format!(
                    "end-of-sequence id {e} is not in the tokenizer's vocabulary"
                )));
            }
        }
        let base_vocab = u32::try_from(tokenizer.get_vocab_size(true)).map_err(|_| {
            DataError::InvalidArgument("the tokenizer's vocabulary exceeds 2^32 tokens".into())
        })?;
        write_atomically_with(out_path, |file, tmp| {
            let io = |e| DataError::io(tmp, e);
            let mut w = BufWriter::with_capacity(1 << 22, &mut *file);
            w.write_all(&[0u8; TOKEN_FILE_HEADER_LEN]).map_err(io)?;
            let mut sink = Sink {
                w,
                tmp,
                tokens: 0,
                max_id: None,
            };
            let mut docs = corpus.documents();
            let mut batch: Vec<String> = Vec::new();
            let mut batch_bytes = 0usize;
            for doc in docs.by_ref() {
                let doc = doc?;
                batch_bytes += doc.text.len();
                batch.push(doc.text);
                if batch.len() >= BATCH_DOCS || batch_bytes >= BATCH_BYTES {
                    sink.encode(tokenizer, &batch, eos_id)?;
                    batch.clear();
                    batch_bytes = 0;
                }
            }
            sink.encode(tokenizer, &batch, eos_id)?;
            let stats = docs.stats();
            if stats.documents == 0 || sink.tokens == 0 {
                return Err(corpus.empty_error());
            }
            let vocab_size = match sink.max_id {
                Some(m) if m >= base_vocab => {
                    tracing::warn!(
                        "token id {m} is outside the tokenizer's vocabulary size {base_vocab}; \
                         recording a vocabulary of {}",
                        u64::from(m) + 1
                    );
                    m.checked_add(1).ok_or_else(|| {
                        DataError::Tokenizer(format!("token id {m} does not fit the format"))
                    })?
                }
                _ => base_vocab,
            };
            let header = Header {
                n_tokens: sink.tokens,
                n_documents: stats.documents,
                vocab_size,
                eos_id,
            };
            sink.w.flush().map_err(io)?;
            drop(sink);
            file.seek(SeekFrom::Start(0)).map_err(io)?;
            file.write_all(&header.encode()).map_err(io)?;
            Ok(TokenFileStats {
                tokens: header.n_tokens,
                documents: stats.documents,
                bytes: stats.bytes,
                files: stats.files,
                vocab_size,
                path: out_path.to_path_buf(),
            })
        })
    }

    /// Open a token file: read and check the header against the file size, then map the ids.
    ///
    /// Errors: [`DataError::Io`] if it cannot be read, [`DataError::CorruptTokenFile`] for bad
    /// magic bytes, an unknown version, a size that disagrees with the header (truncation), or
    /// an empty file.
    pub fn open(path: &Path) -> Result<TokenFile> {
        let mut file = File::open(path).map_err(|e| DataError::io(path, e))?;
        let file_len = file.metadata().map_err(|e| DataError::io(path, e))?.len();
        if file_len < TOKEN_FILE_HEADER_LEN as u64 {
            return Err(DataError::CorruptTokenFile {
                path: path.to_path_buf(),
                reason: format!(
                    "the file is {file_len} bytes, shorter than the {TOKEN_FILE_HEADER_LEN}-byte header"
                ),
            });
        }
        let mut raw = [0u8; TOKEN_FILE_HEADER_LEN];
        file.read_exact(&mut raw)
            .map_err(|e| DataError::io(path, e))?;
        let header = Header::decode(&raw, file_len, path)?;
        let storage = Self::load(&file, path, header.n_tokens)?;
        Ok(TokenFile {
            path: path.to_path_buf(),
            header,
            storage,
        })
    }

    #[cfg(target_endian = "little")]
    fn load(file: &File, path: &Path, n_tokens: u64) -> Result<Storage> {
        // SAFETY: the map is read-only and lives as long as `TokenFile`. Memory-mapping is
        // only unsound if the file is truncated or rewritten while mapped; token files are
        // written once under a temporary name and renamed into place, never modified in place,
        // which is the contract we document for them.
        let map = unsafe { memmap2::Mmap::map(file) }.map_err(|e| DataError::io(path, e))?;
        let expected = TOKEN_FILE_HEADER_LEN as u64 + n_tokens * 4;
        if map.len() as u64 != expected {
            return Err(DataError::CorruptTokenFile {
                path: path.to_path_buf(),
                reason: format!(
                    "the file changed size while being opened ({} bytes, expected {expected})",
                    map.len()
                ),
            });
        }
        let storage = Storage::Mapped(map);
        // Maps start on page boundaries and the header is a multiple of 4 bytes, so this never
        // fails in practice; it is checked because `ids` relies on it.
        if raw_ids(&storage).is_none() {
            return Err(DataError::CorruptTokenFile {
                path: path.to_path_buf(),
                reason: "the token ids are not 4-byte aligned in memory".to_string(),
            });
        }
        Ok(storage)
    }

    #[cfg(not(target_endian = "little"))]
    fn load(file: &File, path: &Path, n_tokens: u64) -> Result<Storage> {
        let mut bytes = Vec::new();
        let mut f = file;
        f.seek(SeekFrom::Start(TOKEN_FILE_HEADER_LEN as u64))
            .and_then(|_| f.read_to_end(&mut bytes))
            .map_err(|e| DataError::io(path, e))?;
        if bytes.len() as u64 != n_tokens * 4 {
            return Err(DataError::CorruptTokenFile {
                path: path.to_path_buf(),
                reason: "the file changed size while being opened".to_string(),
            });
        }
        Ok(Storage::Owned(
            bytes
                .chunks_exact(4)
                .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
        ))
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Number of tokens (at least 1).
    pub fn len(&self) -> usize {
        self.header.n_tokens as usize
    }

    /// Always false: an empty token file is rejected at open.
    pub fn is_empty(&self) -> bool {
        self.header.n_tokens == 0
    }

    /// The vocabulary size: every id is below it.
    pub fn vocab_size(&self) -> u32 {
        self.header.vocab_size
    }

    /// The end-of-sequence id appended after each document, if any.
    pub fn eos_id(&self) -> Option<u32> {
        self.header.eos_id
    }

    /// Number of documents tokenized into the file.
    pub fn num_documents(&self) -> u64 {
        self.header.n_documents
    }

    /// All token ids.
    pub fn tokens(&self) -> &[u32] {
        match &self.storage {
            #[cfg(target_endian = "little")]
            Storage::Mapped(_) => raw_ids(&self.storage).unwrap_or(&[]),
            #[cfg(not(target_endian = "little"))]
            Storage::Owned(v) => v,
        }
    }

    /// The ids in `range`, or `None` if it is out of bounds.
    pub fn get(&self, range: Range<usize>) -> Option<&[u32]> {
        self.tokens().get(range)
    }

    /// Check every id against the vocabulary size (reads the whole file).
    pub fn verify(&self) -> Result<()> {
        let v = self.header.vocab_size;
        match self.tokens().iter().position(|&t| t >= v) {
            None => Ok(()),
            Some(i) => Err(DataError::CorruptTokenFile {
                path: self.path.clone(),
                reason: format!(
                    "token {i} is id {}, outside the vocabulary of {v}",
                    self.tokens()[i]
                ),
            }),
        }
    }
}

/// The mapped ids as `u32`s, or `None` if they are misaligned.
#[cfg(target_endian = "little")]
fn raw_ids(storage: &Storage) -> Option<&[u32]> {
    let Storage::Mapped(map) = storage;
    let bytes = map.get(TOKEN_FILE_HEADER_LEN..)?;
    // SAFETY: every bit pattern is a valid `u32`, and `align_to` only puts correctly aligned,
    // in-bounds memory in the middle slice. The ids are stored little-endian and this code
    // is only compiled for little-endian targets, so the values are read as written.
    let (head, ids, tail) = unsafe { bytes.align_to::<u32>() };
    (head.is_empty() && tail.is_empty()).then_some(ids)
}

/// Buffered output of token ids.
struct Sink<'a, W: Write> {
    w: W,
    tmp: &'a Path,
    tokens: u64,
    max_id: Option<u32>,
}

impl<W: Write> Sink<'_, W> {
    /// Tokenize a batch of documents (in parallel) and write their ids, each document followed
    /// by `eos_id` if given.
    fn encode(
        &mut self,
        tokenizer: &tokenizers::Tokenizer,
        batch: &[String],
        eos_id: Option<u32>,
    ) -> Result<()> {
        if batch.is_empty() {
            return Ok(());
        }
        let inputs: Vec<&str> = batch.iter().map(String::as_str).collect();
        let encodings = tokenizer
            .encode_batch_fast(inputs, false)
            .map_err(|e| DataError::Tokenizer(e.to_string()))?;
        let mut bytes = Vec::new();
        for enc in &encodings {
            bytes.clear();
            let ids = enc.get_ids().iter().copied().chain(eos_id);
            for id in ids {
                bytes.extend_from_slice(&id.to_le_bytes());
                self.max_id = Some(self.max_id.map_or(id, |m| m.max(id)));
                self.tokens += 1;
            }
            self.w
                .write_all(&bytes)
                .map_err(|e| DataError::io(self.tmp, e))?;
        }
        Ok(())
    }
}
