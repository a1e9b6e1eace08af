//! Shared helpers of the integration tests.
#![allow(dead_code)]

use std::path::PathBuf;

use candle_core::{Device, Tensor};

/// The committed reference fixtures written by tools/reference/make_fixtures.py.
pub fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/reference")
}

/// `tokens` and `logits` of a reference file.
pub fn reference(path: &std::path::Path) -> (Vec<u32>, Tensor) {
    let map = candle_core::safetensors::load(path, &Device::Cpu).expect("reference file");
    let tokens: Vec<u32> = map["tokens"]
        .to_dtype(candle_core::DType::I64)
        .unwrap()
        .to_vec1::<i64>()
        .unwrap()
        .into_iter()
        .map(|t| t as u32)
        .collect();
    (tokens, map["logits"].clone())
}

/// Largest absolute difference of two tensors of the same shape.
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims(), "shape mismatch");
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}
