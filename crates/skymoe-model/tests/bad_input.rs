//! Bad input gives a typed, explanatory error — never a panic.

mod common;

use std::path::{Path, PathBuf};

use candle_core::Device;
use common::fixtures;
use skymoe_model::{CausalLm, Checkpoint, ModelError};

fn copy_dir(src: &Path, dst: &Path) {
    std::fs::create_dir_all(dst).unwrap();
    for e in std::fs::read_dir(src).unwrap() {
        let e = e.unwrap();
        if e.file_type().unwrap().is_file() {
            std::fs::copy(e.path(), dst.join(e.file_name())).unwrap();
        }
    }
}

fn scratch(family: &str) -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join(family);
    copy_dir(&fixtures().join(family), &dir);
    (tmp, dir)
}

fn open_and_load(dir: &Path) -> Result<CausalLm, ModelError> {
    let ckpt = Checkpoint::open(dir, &Device::Cpu)?;
    CausalLm::load(&ckpt, &Device::Cpu)
}

fn edit_config(dir: &Path, f: impl FnOnce(&mut serde_json::Value)) {
    let p = dir.join("config.json");
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    f(&mut v);
    std::fs::write(&p, serde_json::to_string_pretty(&v).unwrap()).unwrap();
}

#[test]
fn missing_weights_file_is_reported() {
    let (_t, dir) = scratch("llama");
    std::fs::remove_file(dir.join("model.safetensors")).unwrap();
    let err = open_and_load(&dir).map(|_| ()).expect_err("must fail");
    assert!(matches!(err, ModelError::NoWeights { .. }), "{err}");
    assert!(err.to_string().contains("model.safetensors"), "{err}");
}

#[test]
fn missing_model_path_is_reported() {
    let err = open_and_load(Path::new("/nonexistent/model"))
        .map(|_| ())
        .expect_err("must fail");
    assert!(matches!(err, ModelError::Io { .. }), "{err}");
}

#[test]
fn truncated_safetensors_is_reported() {
    let (_t, dir) = scratch("llama");
    let p = dir.join("model.safetensors");
    let bytes = std::fs::read(&p).unwrap();
    std::fs::write(&p, &bytes[..bytes.len() / 2]).unwrap();
    let err = open_and_load(&dir).map(|_| ()).expect_err("must fail");
    assert!(matches!(err, ModelError::CorruptWeights { .. }), "{err}");
    assert!(err.to_string().contains("model.safetensors"), "{err}");
}

#[test]
fn corrupt_safetensors_header_is_reported() {
    let (_t, dir) = scratch("llama");
    let p = dir.join("model.safetensors");
    let mut bytes = std::fs::read(&p).unwrap();
    for b in bytes.iter_mut().skip(8).take(64) {
        *b = b'#';
    }
    std::fs::write(&p, &bytes).unwrap();
    let err = open_and_load(&dir).map(|_| ()).expect_err("must fail");
    assert!(matches!(err, ModelError::CorruptWeights { .. }), "{err}");
}

#[test]
fn tiny_garbage_safetensors_is_reported() {
    let (_t, dir) = scratch("llama");
    std::fs::write(dir.join("model.safetensors"), b"abc").unwrap();
    let err = open_and_load(&dir).map(|_| ()).expect_err("must fail");
    assert!(matches!(err, ModelError::CorruptWeights { .. }), "{err}");
}

#[test]
fn missing_shard_is_reported() {
    let (_t, dir) = scratch("mixtral");
    let shard = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| {
            let n = p.file_name().unwrap().to_string_lossy().to_string();
            n.ends_with(".safetensors") && n.contains("-of-")
        })
        .expect("the mixtral fixture is sharded");
    std::fs::remove_file(&shard).unwrap();
    let err = open_and_load(&dir).map(|_| ()).expect_err("must fail");
    assert!(matches!(err, ModelError::MissingShard { .. }), "{err}");
    assert!(
        err.to_string()
            .contains(&*shard.file_name().unwrap().to_string_lossy()),
        "{err}"
    );
}

#[test]
fn missing_tensor_is_reported() {
    let (_t, dir) = scratch("llama");
    let p = dir.join("model.safetensors");
    let mut map = candle_core::safetensors::load(&p, &Device::Cpu).unwrap();
    map.remove("model.layers.1.self_attn.k_proj.weight")
        .unwrap();
    candle_core::safetensors::save(&map, &p).unwrap();
    let err = open_and_load(&dir).map(|_| ()).expect_err("must fail");
    match &err {
        ModelError::MissingTensor { name } => {
            assert_eq!(name, "model.layers.1.self_attn.k_proj.weight")
        }
        _ => panic!("wrong error: {err}"),
    }
}

#[test]
fn shape_mismatch_is_reported() {
    let (_t, dir) = scratch("llama");
    edit_config(&dir, |v| {
        let i = v["intermediate_size"].as_u64().unwrap();
        v["intermediate_size"] = (i * 2).into();
    });
    let err = open_and_load(&dir).map(|_| ()).expect_err("must fail");
    assert!(matches!(err, ModelError::ShapeMismatch { .. }), "{err}");
}

#[test]
fn unknown_architecture_lists_supported_ones() {
    let (_t, dir) = scratch("llama");
    edit_config(&dir, |v| {
        v["architectures"] = serde_json::json!(["GPTNeoXForCausalLM"]);
        v["model_type"] = "gpt_neox".into();
    });
    let err = open_and_load(&dir).map(|_| ()).expect_err("must fail");
    assert!(
        matches!(err, ModelError::UnsupportedArchitecture { .. }),
        "{err}"
    );
    let msg = err.to_string();
    for name in [
        "GPTNeoXForCausalLM",
        "LlamaForCausalLM",
        "MixtralForCausalLM",
        "Qwen2MoeForCausalLM",
        "SkyworkForCausalLM",
    ] {
        assert!(msg.contains(name), "{msg} should name {name}");
    }
}

#[test]
fn invalid_config_json_is_reported() {
    let (_t, dir) = scratch("llama");
    std::fs::write(dir.join("config.json"), "{ not json").unwrap();
    let err = open_and_load(&dir).map(|_| ()).expect_err("must fail");
    assert!(matches!(err, ModelError::Config { .. }), "{err}");
}

#[test]
fn out_of_vocab_and_empty_tokens_are_rejected() {
    let model = open_and_load(&fixtures().join("llama")).unwrap();
    let v = model.config.vocab_size as u32;
    let err = model
        .forward_tokens(&[1, v], None)
        .map(|_| ())
        .expect_err("must fail");
    assert!(matches!(err, ModelError::InvalidInput(_)), "{err}");
    assert!(err.to_string().contains(&v.to_string()), "{err}");
    let err = model
        .forward_tokens(&[], None)
        .map(|_| ())
        .expect_err("must fail");
    assert!(matches!(err, ModelError::InvalidInput(_)), "{err}");
}

#[test]
fn truncated_gguf_is_reported() {
    let tmp = tempfile::tempdir().unwrap();
    let bytes = std::fs::read(fixtures().join("gguf/llama-q8_0.gguf")).unwrap();
    for cut in [bytes.len() - 100, bytes.len() / 2, 200, 10] {
        let p = tmp.path().join(format!("cut{cut}.gguf"));
        std::fs::write(&p, &bytes[..cut]).unwrap();
        let err = Checkpoint::open(&p, &Device::Cpu)
            .map(|_| ())
            .expect_err("must fail");
        assert!(
            matches!(err, ModelError::CorruptWeights { .. }),
            "cut at {cut}: {err}"
        );
    }
}

#[test]
fn corrupt_gguf_is_reported() {
    let tmp = tempfile::tempdir().unwrap();
    let mut bytes = std::fs::read(fixtures().join("gguf/llama-f32.gguf")).unwrap();
    // A string length in the header set to something absurd.
    bytes[24..32].copy_from_slice(&u64::MAX.to_le_bytes());
    let p = tmp.path().join("bad.gguf");
    std::fs::write(&p, &bytes).unwrap();
    let err = Checkpoint::open(&p, &Device::Cpu)
        .map(|_| ())
        .expect_err("must fail");
    assert!(matches!(err, ModelError::CorruptWeights { .. }), "{err}");
    std::fs::write(&p, b"NOTAGGUFFILE____").unwrap();
    let err = Checkpoint::open(&p, &Device::Cpu)
        .map(|_| ())
        .expect_err("must fail");
    assert!(matches!(err, ModelError::CorruptWeights { .. }), "{err}");
}

#[test]
fn gguf_of_unsupported_architecture_is_reported() {
    use candle_core::quantized::gguf_file::{self, Value};
    use candle_core::quantized::{GgmlDType, QTensor};
    let tmp = tempfile::tempdir().unwrap();
    let p = tmp.path().join("gpt2.gguf");
    let t = QTensor::quantize(
        &candle_core::Tensor::zeros((4, 32), candle_core::DType::F32, &Device::Cpu).unwrap(),
        GgmlDType::F32,
    )
    .unwrap();
    let arch = Value::String("gpt2".into());
    let mut f = std::fs::File::create(&p).unwrap();
    gguf_file::write(
        &mut f,
        &[("general.architecture", &arch)],
        &[("token_embd.weight", &t)],
    )
    .unwrap();
    drop(f);
    let err = Checkpoint::open(&p, &Device::Cpu)
        .map(|_| ())
        .expect_err("must fail");
    assert!(
        matches!(err, ModelError::UnsupportedArchitecture { .. }),
        "{err}"
    );
    assert!(err.to_string().contains("gpt2"), "{err}");
}

#[test]
fn two_layer_gate_setting_must_match_the_router_tensors() {
    // The Skywork config class defaults to a two-layer gate: a config without the key over a
    // one-layer gate's weights is named as such, not reported as a bare missing tensor.
    let (_t, dir) = scratch("skywork_moe");
    edit_config(&dir, |v| {
        v.as_object_mut().unwrap().remove("moe_2layer_gate");
    });
    let err = open_and_load(&dir)
        .map(|_| ())
        .expect_err("must fail")
        .to_string();
    assert!(
        err.contains("moe_2layer_gate") && err.contains("one-layer"),
        "{err}"
    );
    let (_t, dir) = scratch("skywork_moe_variant");
    edit_config(&dir, |v| v["moe_2layer_gate"] = false.into());
    let err = open_and_load(&dir)
        .map(|_| ())
        .expect_err("must fail")
        .to_string();
    assert!(
        err.contains("moe_2layer_gate") && err.contains("two-layer"),
        "{err}"
    );
}
