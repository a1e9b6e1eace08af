//! Typed errors of the training crate.

use std::path::PathBuf;

/// Everything that can stop training.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    /// Model loading or running failed.
    #[error(transparent)]
    Model(#[from] skymoe_model::ModelError),
    /// A tensor operation failed.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    /// The data pipeline failed.
    #[error(transparent)]
    Data(#[from] crate::data::DataError),
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A file could not be written (a full disk, a read-only directory, ...).
    #[error("cannot write {path}: {reason}")]
    Write {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },
    /// Synchronisation with the other data-parallel replicas failed.
    #[error("replica synchronisation: {0}")]
    Replica(String),
    /// The run configuration is invalid.
    #[error("invalid training configuration: {0}")]
    Config(String),
    /// The loss became NaN or infinite.
    #[error("the loss became {value} at step {step}; training stopped. The last good checkpoint is {}", last_checkpoint.as_ref().map(|p| p.display().to_string()).unwrap_or_else(|| "none (no checkpoint was written yet)".into()))]
    NonFiniteLoss {
        /// The optimiser step.
        step: u64,
        /// The offending value.
        value: f32,
        /// The newest checkpoint, untouched.
        last_checkpoint: Option<PathBuf>,
    },
    /// A checkpoint is incomplete or inconsistent.
    #[error("bad checkpoint {path}: {reason}")]
    BadCheckpoint {
        /// The checkpoint directory.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
}

/// Result type of the training crate.
pub type Result<T> = std::result::Result<T, TrainError>;

impl TrainError {
    /// Shorthand for [`TrainError::Io`].
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        TrainError::Io {
            path: path.into(),
            source,
        }
    }
}
