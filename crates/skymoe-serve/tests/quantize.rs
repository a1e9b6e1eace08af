//! `quantize_checkpoint`: the layout it writes, that the result loads bit-exactly (served) and
//! dequantised (the autograd model), and that failures leave nothing behind.

use std::path::PathBuf;

use candle_core::Device;
use skymoe_kernels::quant::WeightFormat;
use skymoe_model::{CausalLm, Checkpoint};
use skymoe_serve::model::{LogitsFor, SeqChunk, ServeModel};
use skymoe_serve::quantize::{quantize_checkpoint, Fp8Scale};

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../fixtures/reference")
        .join(name)
}

fn logits(model: &ServeModel, tokens: &[u32]) -> Vec<f32> {
    let mut kv = model.new_kv_cache(16, 4, None);
    let blocks = kv.allocate(4).unwrap();
    model
        .forward(
            &[SeqChunk {
                tokens,
                start: 0,
                blocks: &blocks,
                logits: LogitsFor::All,
            }],
            &mut kv,
        )
        .unwrap()
        .remove(0)
}

fn max_rel(a: &[f32], b: &[f32]) -> f32 {
    let scale = b.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-6);
    a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs())) / scale
}

#[test]
fn quantised_checkpoints_load_exactly_and_dequantised() {
    let tokens = [3u32, 17, 42, 99, 7, 250, 11, 5];
    for fam in [
        "mixtral",
        "qwen2_moe",
        "skywork_moe_variant",
        "llama",
        "deepseek_v2",
        "deepseek_v3",
    ] {
        let src = fixture(fam);
        for (format, scale) in [
            (WeightFormat::Fp8, Fp8Scale::Channel),
            (WeightFormat::Fp8, Fp8Scale::Tensor),
            (WeightFormat::Int8, Fp8Scale::Channel),
            (WeightFormat::Q4, Fp8Scale::Channel),
            (WeightFormat::F16, Fp8Scale::Channel),
        ] {
            let dir = tempfile::tempdir().unwrap();
            let out = dir.path().join("q");
            let s = quantize_checkpoint(&src, &out, format, scale).unwrap();
            assert!(
                s.quantized > 0 && s.bytes_after < s.bytes_before,
                "{fam} {format}"
            );
            let ckpt = Checkpoint::open(&out, &Device::Cpu).unwrap();
            // Served as stored: the projections are the stored codes.
            let served = ServeModel::load(&ckpt, None).unwrap();
            assert_eq!(served.format, format);
            // ... read in place from the file's memory map, not copied (q/k/v and gate/up
            // stacked as parts). The embedding and LM head stay f32 in the file and are
            // converted at load; latent attention's per-head key and value matrices are
            // computed from `kv_b_proj` at load.
            let derived = |name: &str| {
                name == "embed"
                    || name == "lm_head"
                    || name.contains("absorb")
                    || name.contains("value_up")
            };
            let stored: Vec<_> = served
                .weight_matrices()
                .into_iter()
                .filter(|(name, m)| m.format() == format && !derived(name))
                .collect();
            assert!(!stored.is_empty(), "{fam} {format}");
            for (name, m) in &stored {
                assert!(m.is_shared(), "{fam} {format}: {name} was copied");
            }
            if scale == Fp8Scale::Channel {
                // The same as quantising the f32 model while loading it.
                let direct =
                    ServeModel::load(&Checkpoint::open(&src, &Device::Cpu).unwrap(), Some(format))
                        .unwrap();
                assert_eq!(
                    logits(&served, &tokens),
                    logits(&direct, &tokens),
                    "{fam} {format}"
                );
            }
            // The autograd model reads the same checkpoint dequantised: with f32 embeddings
            // and LM head on both sides the logits agree.
            let dequant = ServeModel::load(&ckpt, Some(WeightFormat::F32)).unwrap();
            let lm = CausalLm::load(&ckpt, &Device::Cpu).unwrap();
            let want = lm
                .forward_tokens(&tokens, None)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            let e = max_rel(&logits(&dequant, &tokens), &want);
            assert!(e < 1e-4, "{fam} {format} {scale:?}: {e}");
        }
    }
}

#[test]
fn fp8_layout_is_vllm_style() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("fp8");
    quantize_checkpoint(
        &fixture("mixtral"),
        &out,
        WeightFormat::Fp8,
        Fp8Scale::Tensor,
    )
    .unwrap();
    let bytes = std::fs::read(out.join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let w = st
        .tensor("model.layers.0.block_sparse_moe.experts.1.w2.weight")
        .unwrap();
    assert_eq!(w.dtype(), safetensors::Dtype::F8_E4M3);
    let s = st
        .tensor("model.layers.0.block_sparse_moe.experts.1.w2.weight_scale")
        .unwrap();
    assert_eq!((s.dtype(), s.shape()), (safetensors::Dtype::F32, &[][..]));
    // The router gate, norms and embeddings keep f32.
    for name in [
        "model.layers.0.block_sparse_moe.gate.weight",
        "model.embed_tokens.weight",
        "model.norm.weight",
    ] {
        assert_eq!(
            st.tensor(name).unwrap().dtype(),
            safetensors::Dtype::F32,
            "{name}"
        );
    }
    let cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg["quantization_config"]["quant_method"], "fp8");
    assert_eq!(cfg["quantization_config"]["activation_scheme"], "dynamic");
    assert!(out.join("tokenizer.json").is_file());
}

#[test]
fn failures_leave_no_output() {
    let dir = tempfile::tempdir().unwrap();
    // A truncated weight file.
    let src = dir.path().join("broken");
    std::fs::create_dir(&src).unwrap();
    std::fs::copy(
        fixture("llama").join("config.json"),
        src.join("config.json"),
    )
    .unwrap();
    let bytes = std::fs::read(fixture("llama").join("model.safetensors")).unwrap();
    std::fs::write(src.join("model.safetensors"), &bytes[..bytes.len() / 2]).unwrap();
    let out = dir.path().join("out");
    let e = quantize_checkpoint(&src, &out, WeightFormat::Int8, Fp8Scale::Channel).unwrap_err();
    assert!(!e.to_string().is_empty());
    assert!(!out.exists());
    // A missing scale for a quantised weight is named.
    let q = dir.path().join("q");
    quantize_checkpoint(&fixture("llama"), &q, WeightFormat::Int8, Fp8Scale::Channel).unwrap();
    let bytes = std::fs::read(q.join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let kept: Vec<(String, safetensors::tensor::TensorView<'_>)> = st
        .tensors()
        .into_iter()
        .filter(|(n, _)| n != "model.layers.1.mlp.up_proj.weight_scale")
        .collect();
    let damaged = dir.path().join("damaged");
    std::fs::create_dir(&damaged).unwrap();
    std::fs::copy(q.join("config.json"), damaged.join("config.json")).unwrap();
    safetensors::serialize_to_file(kept, None, &damaged.join("model.safetensors")).unwrap();
    let ckpt = Checkpoint::open(&damaged, &Device::Cpu).unwrap();
    let e = ServeModel::load(&ckpt, None).unwrap_err().to_string();
    assert!(e.contains("up_proj.weight_scale"), "{e}");
}
