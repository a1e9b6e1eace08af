//! skymoe-train: backpropagation through every model family, losses, training-time routing,
//! optimiser, data pipeline, trainer, checkpoints, metrics and reports.

pub mod data;
pub mod grads;
pub mod loss;
pub mod optim;
pub mod params;
pub mod report;

pub use grads::{loss_and_grads, LossAndGrads};
pub use params::TrainableParams;
