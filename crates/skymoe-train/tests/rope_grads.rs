//! Gradients through scaled rotary embeddings against PyTorch: the loss and the gradients of
//! layer 0's q/k projections stored by tools/reference/make_rope_fixtures.py.

use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use skymoe_model::{Checkpoint, ModelConfig};
use skymoe_train::{loss_and_grads, TrainableParams};

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/reference")
}

fn max_abs(t: &Tensor) -> f32 {
    t.abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

#[test]
fn gradients_through_every_rope_type_match_pytorch() {
    let dev = Device::Cpu;
    for name in [
        "linear",
        "dynamic",
        "ntk",
        "llama3",
        "yarn",
        "yarn_mscale",
        "yarn_attention_factor",
    ] {
        let dir = fixtures().join("rope").join(name);
        let mut ckpt = Checkpoint::open(&fixtures().join("llama"), &dev).unwrap();
        ckpt.config = ModelConfig::from_file(&dir.join("config.json")).unwrap();
        let params = TrainableParams::from_checkpoint(&ckpt, &dev).unwrap();
        let reference =
            candle_core::safetensors::load(dir.join("reference.safetensors"), &dev).unwrap();
        let tokens: Vec<u32> = reference["tokens"]
            .to_dtype(DType::I64)
            .unwrap()
            .to_vec1::<i64>()
            .unwrap()
            .iter()
            .map(|&t| t as u32)
            .collect();
        let out = loss_and_grads(&params, &ckpt.config, &tokens, &dev).unwrap();
        let want_loss = reference["loss"].to_scalar::<f32>().unwrap();
        assert!(
            (out.loss - want_loss).abs() <= 1e-5 * want_loss.abs().max(1.0),
            "{name}: loss {} vs {want_loss}",
            out.loss
        );
        let mut worst = 0f32;
        for (key, want) in reference.iter().filter(|(k, _)| k.starts_with("grad.")) {
            let g = &out.grads[key.trim_start_matches("grad.")];
            let rel = max_abs(&(g - want).unwrap()) / max_abs(want);
            worst = worst.max(rel);
            assert!(rel <= 1e-3, "{name}: gradient of {key} off by {rel:e}");
        }
        eprintln!(
            "{name}: loss {} (ref {want_loss}), worst relative q/k gradient error {worst:e}",
            out.loss
        );
    }
}
