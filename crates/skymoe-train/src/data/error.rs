//! Typed errors of the data pipeline.

use std::path::{Path, PathBuf};

/// Result of the data pipeline.
pub type Result<T> = std::result::Result<T, DataError>;

/// Everything that can go wrong while reading corpora, training tokenizers, writing or reading
/// token files, and packing batches.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// No input paths were given.
    #[error("no input files or directories given")]
    NoInputs,
    /// A file or directory could not be read or written.
    #[error("cannot access {path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// Input text is not valid UTF-8.
    #[error("{} is not valid UTF-8{}", path.display(), fmt_line(*line))]
    NotUtf8 {
        /// The file.
        path: PathBuf,
        /// The 1-based line, for JSONL files.
        line: Option<u64>,
    },
    /// A JSONL line is not valid JSON.
    #[error("invalid JSONL {}, line {line}: {reason}", path.display())]
    BadJsonl {
        /// The file.
        path: PathBuf,
        /// The 1-based line.
        line: u64,
        /// What is wrong.
        reason: String,
    },
    /// The inputs hold no (non-empty) documents.
    #[error("no documents found in {}", fmt_paths(inputs))]
    EmptyCorpus {
        /// The inputs given.
        inputs: Vec<PathBuf>,
    },
    /// The token stream is too short to make even one training window.
    #[error("too few tokens: the token file has {have} tokens, at least {need} are needed (seq_len + 1)")]
    TooFewTokens {
        /// Tokens available.
        have: u64,
        /// Tokens needed.
        need: u64,
    },
    /// A token file is malformed or truncated.
    #[error("corrupt or truncated token file {}: {reason}", path.display())]
    CorruptTokenFile {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The tokenizer failed to train, serialise or encode.
    #[error("tokenizer error: {0}")]
    Tokenizer(String),
    /// An argument is out of range (a vocabulary too small, a zero sequence length, ...).
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// Building a tensor from a batch failed.
    #[error("tensor error: {0}")]
    Tensor(#[from] candle_core::Error),
}

impl DataError {
    /// An [`DataError::Io`] for `path`.
    pub fn io(path: impl AsRef<Path>, source: std::io::Error) -> Self {
        DataError::Io {
            path: path.as_ref().to_path_buf(),
            source,
        }
    }
}

fn fmt_line(line: Option<u64>) -> String {
    line.map(|l| format!(" (line {l})")).unwrap_or_default()
}

fn fmt_paths(paths: &[PathBuf]) -> String {
    paths
        .iter()
        .map(|p| p.display().to_string())
        .collect::<Vec<_>>()
        .join(", ")
}
