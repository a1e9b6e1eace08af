//! Errors of the planner.

use thiserror::Error;

/// Why a plan could not be made.
#[derive(Debug, Error)]
pub enum PlanError {
    /// The model could not be read or is not one the planner knows.
    #[error("model: {0}")]
    Model(String),
    /// A cluster description is missing, unreadable or has impossible numbers.
    #[error("cluster: {0}")]
    Cluster(String),
    /// The job (batch, sequence length, precision, ...) is inconsistent.
    #[error("job: {0}")]
    Job(String),
    /// A parallel layout does not fit the model or the cluster.
    #[error("layout: {0}")]
    Layout(String),
}

/// Result type of the planner.
pub type Result<T> = std::result::Result<T, PlanError>;
