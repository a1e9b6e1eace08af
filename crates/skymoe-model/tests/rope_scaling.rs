//! Scaled rotary embeddings (`linear`, `dynamic`, `ntk`, `llama3`, `yarn`) against
//! transformers' logits: the fixtures of tools/reference/make_rope_fixtures.py, each a config
//! for the weights of fixtures/reference/llama.

mod common;

use std::path::Path;

use candle_core::quantized::gguf_file;
use candle_core::{Device, Tensor};
use common::{fixtures, max_abs_diff, reference};
use skymoe_model::{CausalLm, Checkpoint, ModelConfig};

const TOL: f32 = 1e-4;

const TYPES: [&str; 7] = [
    "linear",
    "dynamic",
    "ntk",
    "llama3",
    "yarn",
    "yarn_mscale",
    "yarn_attention_factor",
];

/// The llama fixture's weights under the config of `rope/<name>`.
fn checkpoint(name: &str) -> Checkpoint {
    let mut ckpt = Checkpoint::open(&fixtures().join("llama"), &Device::Cpu).unwrap();
    ckpt.config =
        ModelConfig::from_file(&fixtures().join("rope").join(name).join("config.json")).unwrap();
    ckpt
}

fn cached_reference(name: &str) -> Tensor {
    let path = fixtures()
        .join("rope")
        .join(name)
        .join("reference.safetensors");
    candle_core::safetensors::load(path, &Device::Cpu).unwrap()["logits_cached"].clone()
}

#[test]
fn every_rope_type_matches_transformers() {
    let mut worst = Vec::new();
    for name in TYPES {
        let model = CausalLm::load(&checkpoint(name), &Device::Cpu).unwrap();
        let (tokens, want) = reference(
            &fixtures()
                .join("rope")
                .join(name)
                .join("reference.safetensors"),
        );
        assert_eq!(tokens.len(), 24);
        let got = model.forward_tokens(&tokens, None).unwrap();
        let d = max_abs_diff(&got, &want);
        eprintln!("{name}: max |Δlogit| = {d:e}");
        worst.push((name, d));
        assert!(d <= TOL, "{name}: max |Δlogit| = {d:e} > {TOL:e}");
    }
    eprintln!("{worst:?}");
}

/// For every type but dynamic NTK the frequencies do not depend on the length, so decoding
/// through the KV cache gives the one-pass logits.
#[test]
fn static_types_decode_through_the_cache_as_in_one_pass() {
    for name in TYPES.iter().filter(|&&n| n != "dynamic") {
        let model = CausalLm::load(&checkpoint(name), &Device::Cpu).unwrap();
        let (tokens, want) = reference(
            &fixtures()
                .join("rope")
                .join(name)
                .join("reference.safetensors"),
        );
        let mut cache = model.new_cache();
        let mut rows = vec![model
            .forward_tokens(&tokens[..10], Some(&mut cache))
            .unwrap()];
        for &t in &tokens[10..] {
            rows.push(model.forward_tokens(&[t], Some(&mut cache)).unwrap());
        }
        let d = max_abs_diff(&Tensor::cat(&rows, 0).unwrap(), &want);
        assert!(d <= TOL, "{name}: cached decoding differs by {d:e}");
    }
}

/// Dynamic NTK with a KV cache: a 12-token prefill and then one token at a time, each pass
/// rotated with the base for its own end, equals transformers run the same way.
#[test]
fn dynamic_ntk_decoding_matches_transformers_cached_generation() {
    let model = CausalLm::load(&checkpoint("dynamic"), &Device::Cpu).unwrap();
    let (tokens, full) = reference(&fixtures().join("rope/dynamic/reference.safetensors"));
    let want = cached_reference("dynamic");
    let mut cache = model.new_cache();
    let mut rows = vec![model
        .forward_tokens(&tokens[..12], Some(&mut cache))
        .unwrap()];
    for &t in &tokens[12..] {
        rows.push(model.forward_tokens(&[t], Some(&mut cache)).unwrap());
    }
    let got = Tensor::cat(&rows, 0).unwrap();
    let d = max_abs_diff(&got, &want);
    eprintln!("dynamic (cached): max |Δlogit| = {d:e}");
    assert!(d <= TOL, "cached dynamic decoding differs by {d:e}");
    // The last step sees the whole sequence, with the same base as the one-pass forward, but
    // earlier keys were rotated with smaller bases.
    assert!(max_abs_diff(&got, &full) > 1e-3);
    // Within max_position_embeddings (8) the default frequencies apply: the prefix logits of a
    // short pass equal those of the unscaled llama fixture.
    let plain = CausalLm::load(
        &Checkpoint::open(&fixtures().join("llama"), &Device::Cpu).unwrap(),
        &Device::Cpu,
    )
    .unwrap();
    let a = model.forward_tokens(&tokens[..8], None).unwrap();
    let b = plain.forward_tokens(&tokens[..8], None).unwrap();
    assert!(max_abs_diff(&a, &b) <= 1e-6);
}

#[test]
fn scaled_position_limits() {
    // dynamic: factor 4 × max_position_embeddings 8
    let model = CausalLm::load(&checkpoint("dynamic"), &Device::Cpu).unwrap();
    assert!(model.forward_tokens(&[5; 32], None).is_ok());
    let err = model
        .forward_tokens(&[5; 33], None)
        .unwrap_err()
        .to_string();
    assert!(err.contains("32"), "{err}");
    // llama3: max_position_embeddings (64) as configured
    let model = CausalLm::load(&checkpoint("llama3"), &Device::Cpu).unwrap();
    assert!(model.forward_tokens(&[5; 65], None).is_err());
}

/// A copy of the f32 llama GGUF fixture with extra metadata (and optionally extra tensors).
fn gguf_with(
    dir: &Path,
    extra: &[(&str, gguf_file::Value)],
    extra_tensor: Option<(&str, Tensor)>,
) -> std::path::PathBuf {
    use candle_core::quantized::{GgmlDType, QTensor};
    let src = fixtures().join("gguf/llama-f32.gguf");
    let mut file = std::fs::File::open(&src).unwrap();
    let content = gguf_file::Content::read(&mut file).unwrap();
    let mut meta: Vec<(String, gguf_file::Value)> = content
        .metadata
        .iter()
        .filter(|(k, _)| !extra.iter().any(|(e, _)| e == k))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    meta.extend(extra.iter().map(|(k, v)| (k.to_string(), v.clone())));
    let mut tensors: Vec<(String, QTensor)> = content
        .tensor_infos
        .keys()
        .map(|n| {
            (
                n.clone(),
                content.tensor(&mut file, n, &Device::Cpu).unwrap(),
            )
        })
        .collect();
    if let Some((n, t)) = extra_tensor {
        tensors.push((
            n.to_string(),
            QTensor::quantize(&t, GgmlDType::F32).unwrap(),
        ));
    }
    let path = dir.join("scaled.gguf");
    let mut out = std::fs::File::create(&path).unwrap();
    let meta_refs: Vec<(&str, &gguf_file::Value)> =
        meta.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let tensor_refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    gguf_file::write(&mut out, &meta_refs, &tensor_refs).unwrap();
    path
}

#[test]
fn gguf_rope_scaling_keys_match_transformers() {
    use gguf_file::Value;
    let tmp = tempfile::tempdir().unwrap();
    let cases: [(&str, Vec<(&str, Value)>); 2] = [
        (
            "linear",
            vec![
                ("llama.context_length", Value::U32(32)),
                ("llama.rope.scaling.type", Value::String("linear".into())),
                ("llama.rope.scaling.factor", Value::F32(4.0)),
            ],
        ),
        (
            "yarn",
            vec![
                ("llama.context_length", Value::U32(32)),
                ("llama.rope.scaling.type", Value::String("yarn".into())),
                ("llama.rope.scaling.factor", Value::F32(4.0)),
                ("llama.rope.scaling.original_context_length", Value::U32(8)),
            ],
        ),
    ];
    for (name, meta) in cases {
        let path = gguf_with(tmp.path(), &meta, None);
        let ckpt = Checkpoint::open(&path, &Device::Cpu).unwrap();
        let expected =
            ModelConfig::from_file(&fixtures().join("rope").join(name).join("config.json"))
                .unwrap();
        assert_eq!(ckpt.config.rope_scaling, expected.rope_scaling, "{name}");
        let model = CausalLm::load(&ckpt, &Device::Cpu).unwrap();
        let (tokens, want) = reference(
            &fixtures()
                .join("rope")
                .join(name)
                .join("reference.safetensors"),
        );
        let d = max_abs_diff(&model.forward_tokens(&tokens, None).unwrap(), &want);
        eprintln!("gguf {name}: max |Δlogit| = {d:e}");
        assert!(d <= TOL, "gguf {name}: {d:e}");
    }
}

#[test]
fn gguf_rope_errors_are_clear() {
    use gguf_file::Value;
    let tmp = tempfile::tempdir().unwrap();
    let open_err = |meta: Vec<(&str, Value)>, t: Option<(&str, Tensor)>| {
        let path = gguf_with(tmp.path(), &meta, t);
        Checkpoint::open(&path, &Device::Cpu)
            .map(|_| ())
            .unwrap_err()
            .to_string()
    };
    let e = open_err(
        vec![("llama.rope.scaling.type", Value::String("longrope".into()))],
        None,
    );
    assert!(e.contains("longrope"), "{e}");
    let e = open_err(
        vec![("llama.rope.scaling.type", Value::String("linear".into()))],
        None,
    );
    assert!(e.contains("llama.rope.scaling.factor"), "{e}");
    let factors = Tensor::new(&[1f32, 1.0, 2.0, 4.0, 8.0, 8.0, 8.0, 8.0], &Device::Cpu).unwrap();
    let e = open_err(vec![], Some(("rope_freqs.weight", factors)));
    assert!(e.contains("rope_freqs.weight"), "{e}");
    // All-ones factors scale nothing and are accepted.
    let ones = Tensor::ones(8, candle_core::DType::F32, &Device::Cpu).unwrap();
    let path = gguf_with(tmp.path(), &[], Some(("rope_freqs.weight", ones)));
    let ckpt = Checkpoint::open(&path, &Device::Cpu).unwrap();
    assert_eq!(
        ckpt.config.rope_scaling,
        skymoe_model::config::RopeScaling::Default
    );
}
