//! skymoe-kernels: fused forward+backward operations that candle lacks (RMSNorm, softmax,
//! causal softmax, RoPE, SwiGLU activation, cross-entropy, causal attention, the routed experts of
//! an MoE layer).
//!
//! Each public function computes the same value as a composition of candle's generic tensor
//! ops (the "reference" functions in [`reference`]), but in one pass over memory, and carries
//! a backward pass (candle's own fused ops such as `softmax_last_dim` or `rms_norm` carry none).
//! On CPU with contiguous f32 inputs the fused kernel runs; anything else (other devices or
//! dtypes) falls back to the reference composition, which candle differentiates itself.

pub mod adamw;
mod cpu;
pub mod decode_attention;
pub mod ggml;
pub mod quant;
pub mod reference;
pub mod rows;
pub mod sgemm;

mod attention;
mod cross_entropy;
mod grouped_swiglu;
mod rms_norm;
mod rope;
mod silu_mul;
mod softmax;
mod vexp;

pub use attention::{causal_attention, reference_causal_attention};
pub use cross_entropy::cross_entropy;
pub use grouped_swiglu::{
    grouped_swiglu, grouped_swiglu_to_sink, reference_grouped_swiglu, ExpertTensors, WeightGradSink,
};
pub use rms_norm::rms_norm;
pub use rope::{rope, rope_to_heads};
pub use silu_mul::silu_mul;
pub use softmax::{causal_softmax, softmax_last_dim};
pub use vexp::silu_mul_rows;

use candle_core::{DType, Device, Tensor};

/// Whether the fused CPU kernels apply to these tensors.
pub(crate) fn fused_ok(ts: &[&Tensor]) -> bool {
    ts.iter()
        .all(|t| matches!(t.device(), Device::Cpu) && t.dtype() == DType::F32)
}
