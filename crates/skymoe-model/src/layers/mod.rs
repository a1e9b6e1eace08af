//! The building blocks of a decoder layer, each written with differentiable tensor ops so the
//! same code serves inference and training.

pub mod attention;
pub mod block;
pub mod ffn;
pub mod linear;
pub mod mla;
pub mod moe;
pub mod norm;
pub mod ops;
pub mod rope;
pub mod rotary;
pub mod router;

/// Loads a named tensor of a given shape; implemented by checkpoints and by trainers that
/// hand out trainable variables.
pub trait TensorLoader {
    /// The tensor `name` with shape `shape`, or an error naming what is wrong.
    fn tensor(&self, name: &str, shape: &[usize]) -> crate::error::Result<candle_core::Tensor>;
    /// Whether a tensor of this name exists.
    fn contains(&self, name: &str) -> bool;
}
