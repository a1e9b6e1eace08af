//! Typed errors of the model crate.

use std::path::PathBuf;

/// Everything that can go wrong while reading configs, weights or tokenizers, or running a model.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// A file could not be read.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// `config.json` is not valid JSON or lacks a required key.
    #[error("invalid config {path}: {reason}")]
    Config {
        /// The config file (or a description of where the config came from).
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The architecture named by the config is not one skymoe implements.
    #[error(
        "unsupported architecture {found}; supported: {}",
        crate::families::supported_names()
    )]
    UnsupportedArchitecture {
        /// What the config says.
        found: String,
    },
    /// A weights file is malformed or truncated.
    #[error("corrupt or truncated weights file {path}: {reason}")]
    CorruptWeights {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A shard named in `model.safetensors.index.json` is missing.
    #[error("missing shard {shard} named in {index}")]
    MissingShard {
        /// The index file.
        index: PathBuf,
        /// The missing shard file.
        shard: PathBuf,
    },
    /// The model directory or file has no weights skymoe can read.
    #[error(
        "no weights found at {path}: expected model.safetensors, model.safetensors.index.json, \
         pytorch_model.bin, pytorch_model.bin.index.json or a .gguf file"
    )]
    NoWeights {
        /// The path given.
        path: PathBuf,
    },
    /// A pickled checkpoint names a global outside what PyTorch tensor rebuilding uses; it is
    /// refused rather than run.
    #[error(
        "refusing to load {path}: its pickle names the global `{global}`, which a PyTorch \
         state dict does not use (loading never runs code from a checkpoint)"
    )]
    UnsafePickle {
        /// The file.
        path: PathBuf,
        /// The global, as `module.name`.
        global: String,
    },
    /// A weights file in a format or layout skymoe does not read.
    #[error("unsupported weights file {path}: {reason}")]
    UnsupportedWeights {
        /// The file.
        path: PathBuf,
        /// What it is and what is expected instead.
        reason: String,
    },
    /// A tensor the model needs is not in the checkpoint.
    #[error("tensor {name} is missing from the checkpoint")]
    MissingTensor {
        /// The checkpoint name of the tensor.
        name: String,
    },
    /// A tensor's shape disagrees with the config.
    #[error("tensor {name} has shape {found:?} but the config implies {expected:?}")]
    ShapeMismatch {
        /// The checkpoint name of the tensor.
        name: String,
        /// The shape the config implies.
        expected: Vec<usize>,
        /// The shape in the file.
        found: Vec<usize>,
    },
    /// A tensor is stored in a dtype skymoe cannot read.
    #[error("tensor {name} has unsupported dtype {dtype}")]
    UnsupportedDtype {
        /// The checkpoint name of the tensor.
        name: String,
        /// The dtype as the file names it.
        dtype: String,
    },
    /// Invalid input to the model (token ids, empty prompts, ...).
    #[error("invalid input: {0}")]
    InvalidInput(String),
    /// Tokenizer problem.
    #[error("tokenizer error: {0}")]
    Tokenizer(String),
    /// An error from the tensor library.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

/// Result type of the model crate.
pub type Result<T> = std::result::Result<T, ModelError>;

impl ModelError {
    /// Shorthand for [`ModelError::Io`].
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        ModelError::Io {
            path: path.into(),
            source,
        }
    }

    /// Shorthand for [`ModelError::CorruptWeights`].
    pub fn corrupt(path: impl Into<PathBuf>, reason: impl Into<String>) -> Self {
        ModelError::CorruptWeights {
            path: path.into(),
            reason: reason.into(),
        }
    }

    /// Shorthand for [`ModelError::Config`].
    pub fn config(path: impl Into<PathBuf>, reason: impl Into<String>) -> Self {
        ModelError::Config {
            path: path.into(),
            reason: reason.into(),
        }
    }
}
