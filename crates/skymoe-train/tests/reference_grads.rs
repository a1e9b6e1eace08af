//! Loss and the gradient of every parameter against PyTorch for every model family.

use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use skymoe_model::Checkpoint;
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

fn check(family: &str) {
    let dir = fixtures().join(family);
    let dev = Device::Cpu;
    let ckpt = Checkpoint::open(&dir, &dev).unwrap();
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
        "{family}: loss {} vs {want_loss}",
        out.loss
    );
    let expected: Vec<&String> = reference
        .keys()
        .filter(|k| k.starts_with("grad."))
        .collect();
    assert_eq!(
        expected.len(),
        out.grads.len(),
        "{family}: every parameter needs a gradient"
    );
    let mut worst = (0.0f32, String::new());
    for (name, g) in &out.grads {
        let want = reference
            .get(&format!("grad.{name}"))
            .unwrap_or_else(|| panic!("{family}: no reference gradient for {name}"));
        assert_eq!(g.dims(), want.dims(), "{name}");
        let scale = max_abs(want);
        let err = max_abs(&(g - want).unwrap());
        // Relative to the tensor's own scale; an all-zero reference (an expert no token reached)
        // must be matched by an all-zero gradient.
        let rel = if scale > 0.0 { err / scale } else { err };
        if rel > worst.0 {
            worst = (rel, name.clone());
        }
        assert!(
            rel <= 1e-3,
            "{family}: gradient of {name} off by {rel:e} relative (max |ref| {scale:e})"
        );
    }
    eprintln!(
        "{family}: loss {} (ref {want_loss}), worst relative gradient error {:e} ({})",
        out.loss, worst.0, worst.1
    );
}

#[test]
fn llama_gradients_match_pytorch() {
    check("llama");
}

#[test]
fn mixtral_gradients_match_pytorch() {
    check("mixtral");
}

#[test]
fn qwen2_moe_gradients_match_pytorch() {
    check("qwen2_moe");
}

#[test]
fn qwen2_moe_norm_gradients_match_pytorch() {
    check("qwen2_moe_norm");
}

#[test]
fn qwen3_moe_gradients_match_pytorch() {
    check("qwen3_moe");
}

#[test]
fn olmoe_gradients_match_pytorch() {
    check("olmoe");
}

#[test]
fn deepseek_v2_gradients_match_pytorch() {
    check("deepseek_v2");
}

#[test]
fn deepseek_v3_gradients_match_pytorch() {
    check("deepseek_v3");
}

#[test]
fn skywork_moe_gradients_match_pytorch() {
    check("skywork_moe");
}

#[test]
fn skywork_moe_variant_gradients_match_pytorch() {
    check("skywork_moe_variant");
}

/// The gradient of every parameter of `family`'s fixture model for a fixed objective of its
/// logits, with the experts' weight gradients taken through the graph or handed over by each
/// layer's routing.
fn gradients_with_deferral(family: &str, defer: bool) -> Vec<(String, Tensor)> {
    let dir = fixtures().join(family);
    let dev = Device::Cpu;
    let ckpt = Checkpoint::open(&dir, &dev).unwrap();
    let params = TrainableParams::from_checkpoint(&ckpt, &dev).unwrap();
    let mut model = params.model(&ckpt.config, &dev).unwrap();
    model.set_deferred_expert_grads(defer);
    let v = ckpt.config.vocab_size as u32;
    let batch: Vec<Vec<u32>> = (0..2)
        .map(|b| (0..9).map(|i| (i * 7 + b * 3 + 1) % v).collect())
        .collect();
    let out = model.forward_batch(&batch, None).unwrap();
    let n = out.logits.elem_count();
    let probe: Vec<f32> = (0..n)
        .map(|i| ((i * 7919) % 1000) as f32 / 500.0 - 1.0)
        .collect();
    let probe = Tensor::from_vec(probe, out.logits.dims(), &dev).unwrap();
    let mut store = (&out.logits * &probe)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    let mut deferred = 0;
    for r in out.routings.iter().flatten() {
        if let Some(d) = &r.deferred_expert_grads {
            d.add_to(&mut store).unwrap();
            deferred += 1;
        }
    }
    assert_eq!(
        deferred > 0,
        defer,
        "{family}: deferral {defer} not honoured"
    );
    // Experts that received no token have no gradient either way (as in transformers).
    params
        .vars
        .iter()
        .filter_map(|(name, var)| Some((name.clone(), store.get(var.as_tensor())?.clone())))
        .collect()
}

#[test]
fn deferred_expert_weight_gradients_equal_the_graph_ones() {
    for family in ["mixtral", "qwen2_moe", "skywork_moe"] {
        let graph = gradients_with_deferral(family, false);
        let deferred = gradients_with_deferral(family, true);
        let names = |g: &[(String, Tensor)]| g.iter().map(|(n, _)| n.clone()).collect::<Vec<_>>();
        assert_eq!(
            names(&graph),
            names(&deferred),
            "{family}: parameters with a gradient"
        );
        assert!(graph.iter().any(|(n, _)| n.contains(".experts.")));
        for ((name, a), (other, b)) in graph.iter().zip(&deferred) {
            assert_eq!(name, other);
            let diff = max_abs(&(a - b).unwrap());
            assert!(
                diff <= 1e-6 * max_abs(a).max(1.0),
                "{family}: {name} differs by {diff}"
            );
        }
    }
}
