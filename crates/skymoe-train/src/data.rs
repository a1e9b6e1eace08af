//! Training data: corpora, tokenizer training, memory-mapped token files, packed batches.
//!
//! The pipeline is
//!
//! 1. [`Corpus`]: files and directories of `.jsonl` (one `{"text": ...}` object per line) and
//!    plain-text files (one document per file), streamed one document at a time;
//! 2. [`train_tokenizer`]: a byte-level BPE tokenizer trained on a corpus, saved as
//!    `tokenizer.json`;
//! 3. [`TokenFile`]: the corpus tokenized once into a flat file of little-endian `u32` ids
//!    (documents separated by an end-of-sequence token), memory-mapped for reading;
//! 4. [`PackedDataset`]: the token stream cut into windows of `seq_len + 1` tokens, split into
//!    train and validation sets, and served in a per-epoch shuffled order that is a pure
//!    function of `(seed, consumed)`, so a run resumes exactly from one integer.

mod atomic;
mod corpus;
mod error;
mod packed;
mod rng;
mod token_file;
mod tokenizer;

pub use corpus::{Corpus, CorpusStats, Document, Documents};
pub use error::{DataError, Result};
pub use packed::{batch_tensors, PackedDataset, ValBatches};
pub use token_file::{TokenFile, TokenFileStats, TOKEN_FILE_HEADER_LEN, TOKEN_FILE_MAGIC};
pub use tokenizer::{train_bpe, train_tokenizer, TokenizerStats, MIN_MERGE_FREQUENCY};
