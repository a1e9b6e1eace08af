//! A checkpoint with DeepSeek-V3-style selection biases (`…gate.e_score_correction_bias`):
//! the serving model and the autograd model route with them alike, and they change the routing.

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{Device, Tensor};
use skymoe_kernels::quant::WeightFormat;
use skymoe_model::layers::router::selection_bias_name;
use skymoe_model::{CausalLm, Checkpoint};
use skymoe_serve::model::{LogitsFor, SeqChunk, ServeModel};

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../fixtures/reference")
        .join(name)
}

fn served(model: &ServeModel, tokens: &[u32]) -> Vec<f32> {
    let mut kv = model.new_kv_cache(4, 16, None);
    let blocks = kv.allocate(kv.blocks_for(tokens.len())).unwrap();
    let chunk = SeqChunk {
        tokens,
        start: 0,
        blocks: &blocks,
        logits: LogitsFor::All,
    };
    model.forward(&[chunk], &mut kv).unwrap().remove(0)
}

fn autograd(ckpt: &Checkpoint, tokens: &[u32]) -> Vec<f32> {
    CausalLm::load(ckpt, &Device::Cpu)
        .unwrap()
        .forward_tokens(tokens, None)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
}

fn max_abs(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs()))
}

#[test]
fn selection_bias_routes_alike_in_both_executors_and_changes_the_routing() {
    let dev = Device::Cpu;
    let src = fixture("mixtral");
    let plain = Checkpoint::open(&src, &dev).unwrap();
    // The fixture's tensors in one file, plus a nonzero bias for every MoE layer.
    let mut tensors: HashMap<String, Tensor> = HashMap::new();
    for entry in std::fs::read_dir(&src).unwrap() {
        let p = entry.unwrap().path();
        let name = p.file_name().unwrap().to_string_lossy().to_string();
        if name.starts_with("model-") && name.ends_with(".safetensors") {
            tensors.extend(candle_core::safetensors::load(&p, &dev).unwrap());
        }
    }
    let c = &plain.config;
    let e = c.moe.as_ref().unwrap().num_experts;
    let mut layers = 0;
    for l in (0..c.num_hidden_layers).filter(|&l| c.is_moe_layer(l)) {
        // Large enough to override the gate: push the last expert up and the first down.
        let mut b = vec![0f32; e];
        b[e - 1] = 0.6;
        b[0] = -0.6;
        let name = selection_bias_name(&c.moe_names(l).gate);
        assert!(name.ends_with("block_sparse_moe.gate.e_score_correction_bias"));
        tensors.insert(name, Tensor::from_vec(b, e, &dev).unwrap());
        layers += 1;
    }
    assert!(layers > 0);
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(src.join("config.json"), dir.path().join("config.json")).unwrap();
    candle_core::safetensors::save(&tensors, dir.path().join("model.safetensors")).unwrap();
    let biased = Checkpoint::open(dir.path(), &dev).unwrap();

    let tokens: Vec<u32> = (0..12)
        .map(|i| (i * 37 + 5) % c.vocab_size as u32)
        .collect();
    let serve_biased = ServeModel::load(&biased, Some(WeightFormat::F32)).unwrap();
    let got = served(&serve_biased, &tokens);
    let want = autograd(&biased, &tokens);
    let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
    let d = max_abs(&got, &want);
    assert!(
        d <= 1e-4 * scale,
        "serving vs autograd with bias: max |Δ| {d}"
    );

    // Without the bias, the logits differ: the bias changed selections.
    let unbiased = autograd(&plain, &tokens);
    let moved = max_abs(&want, &unbiased);
    assert!(
        moved > 1e-2 * scale,
        "the bias did not change the logits ({moved})"
    );
    let serve_plain = ServeModel::load(&plain, Some(WeightFormat::F32)).unwrap();
    assert!(max_abs(&served(&serve_plain, &tokens), &unbiased) <= 1e-4 * scale);

    // And the autograd router's own choices move towards the favoured expert.
    let model = CausalLm::load(&biased, &dev).unwrap();
    let out = model
        .forward_batch(std::slice::from_ref(&tokens), None)
        .unwrap();
    let r = out.routings.iter().flatten().next().unwrap();
    assert_ne!(r.experts, r.score_experts);
    assert!(r.expert_counts[e - 1] > r.score_counts()[e - 1]);
}
