//! skymoe-train: backpropagation through every model family, losses, training-time routing,
//! optimiser, data pipeline, trainer, checkpoints, metrics and reports.

pub mod aux_loss;
pub mod checkpoint;
pub mod data;
pub mod demo;
pub mod error;
pub mod experiments;
pub mod grads;
pub mod loss;
pub mod optim;
pub mod params;
pub mod report;
pub mod run_config;
pub mod sharded;
pub mod trainer;
pub mod upcycle;

pub use error::{Result, TrainError};
pub use grads::{loss_and_grads, LossAndGrads};
pub use params::TrainableParams;
pub use run_config::RunConfig;
pub use trainer::{Observer, StepMetrics, Trainer, ValMetrics};
