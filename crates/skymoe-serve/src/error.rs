//! Errors of the serving library.

use skymoe_kernels::quant::QuantError;
use skymoe_model::ModelError;

/// What can go wrong loading or running a served model.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// Reading the checkpoint or its config failed.
    #[error(transparent)]
    Model(#[from] ModelError),
    /// A weight could not be quantised or a stored quantised weight is malformed.
    #[error(transparent)]
    Quant(#[from] QuantError),
    /// Bad input to the model (token ids, positions, cache blocks).
    #[error("invalid input: {0}")]
    InvalidInput(String),
    /// A collective between tensor-parallel ranks failed.
    #[error("tensor parallelism: {0}")]
    Comm(String),
    /// A tensor operation failed.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: std::path::PathBuf,
        /// The cause.
        source: std::io::Error,
    },
}

/// Result type of the serving library.
pub type Result<T> = std::result::Result<T, ServeError>;
