//! Typed errors of the report module.

use std::path::PathBuf;

/// Everything that can go wrong while reading a run's metrics or writing its report.
#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    /// The run directory does not exist or is not a directory.
    #[error("run directory {path} does not exist or is not a directory")]
    MissingRunDir {
        /// The path given.
        path: PathBuf,
    },
    /// The run directory has no `metrics.jsonl`.
    #[error("no metrics log in run directory {dir}: expected {path}")]
    MissingMetrics {
        /// The run directory.
        dir: PathBuf,
        /// The metrics file that was expected.
        path: PathBuf,
    },
    /// A file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A line of the metrics log is not a valid record.
    #[error("{path}: line {line}: {reason}")]
    Malformed {
        /// The metrics file.
        path: PathBuf,
        /// The 1-based line number.
        line: usize,
        /// What is wrong.
        reason: String,
    },
    /// The metrics log holds no training record.
    #[error("{path} has no training records (lines with \"kind\":\"train\")")]
    NoTrainRecords {
        /// The metrics file.
        path: PathBuf,
    },
    /// An output file or directory could not be written.
    #[error("cannot write {path}: {source}")]
    Write {
        /// The file or directory.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A plot could not be drawn or encoded.
    #[error("cannot draw {path}: {reason}")]
    Plot {
        /// The image file.
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },
    /// The embedded plot font could not be loaded.
    #[error("the embedded plot font could not be loaded")]
    Font,
    /// A comparison was asked for with no runs.
    #[error("a comparison needs at least one run")]
    NoRuns,
}
