//! skymoe-train: backpropagation through every model family, losses and trainable parameters.

pub mod grads;
pub mod loss;
pub mod params;

pub use grads::{loss_and_grads, LossAndGrads};
pub use params::TrainableParams;
