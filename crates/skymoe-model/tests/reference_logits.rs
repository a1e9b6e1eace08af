//! The forward pass of every family against Hugging Face transformers / PyTorch.

mod common;

use candle_core::{Device, Tensor};
use common::{fixtures, max_abs_diff, reference};
use skymoe_model::{CausalLm, Checkpoint};

const TOL: f32 = 1e-4;

fn check_dir(name: &str) {
    let dir = fixtures().join(name);
    let ckpt = Checkpoint::open(&dir, &Device::Cpu).unwrap_or_else(|e| panic!("{name}: {e}"));
    let model = CausalLm::load(&ckpt, &Device::Cpu).unwrap_or_else(|e| panic!("{name}: {e}"));
    let (tokens, expected) = reference(&dir.join("reference.safetensors"));
    let logits = model.forward_tokens(&tokens, None).unwrap();
    let d = max_abs_diff(&logits, &expected);
    let scale = max_abs_diff(&expected, &expected.zeros_like().unwrap());
    eprintln!("{name}: max |Δlogit| = {d:e} (max |logit| = {scale})");
    assert!(scale > 0.5, "{name}: reference logits are degenerate");
    assert!(d <= TOL, "{name}: max |Δlogit| = {d:e} > {TOL:e}");
    check_kv_cache(name, &model, &tokens, &logits);
}

/// Token-by-token decoding and chunked prefill through the KV cache give the logits of one
/// full forward pass.
fn check_kv_cache(name: &str, model: &CausalLm, tokens: &[u32], full: &Tensor) {
    let mut cache = model.new_cache();
    let rows: Vec<Tensor> = tokens
        .iter()
        .map(|&t| model.forward_tokens(&[t], Some(&mut cache)).unwrap())
        .collect();
    let stepwise = Tensor::cat(&rows, 0).unwrap();
    let d = max_abs_diff(&stepwise, full);
    assert!(d <= TOL, "{name}: token-by-token decoding differs by {d:e}");
    assert_eq!(cache.len(), tokens.len());

    let mut cache = model.new_cache();
    let split = tokens.len() / 2 + 1;
    let a = model
        .forward_tokens(&tokens[..split], Some(&mut cache))
        .unwrap();
    let b = model
        .forward_tokens(&tokens[split..], Some(&mut cache))
        .unwrap();
    let d = max_abs_diff(&Tensor::cat(&[a, b], 0).unwrap(), full);
    assert!(d <= TOL, "{name}: chunked prefill differs by {d:e}");
}

#[test]
fn llama_matches_transformers() {
    check_dir("llama");
}

#[test]
fn mixtral_sharded_matches_transformers() {
    check_dir("mixtral");
}

#[test]
fn qwen2_moe_matches_transformers() {
    check_dir("qwen2_moe");
}

#[test]
fn qwen2_moe_normalised_with_dense_layer_matches_transformers() {
    check_dir("qwen2_moe_norm");
}

#[test]
fn skywork_moe_matches_reference() {
    check_dir("skywork_moe");
}

#[test]
fn skywork_moe_variant_matches_reference() {
    check_dir("skywork_moe_variant");
}

#[test]
fn qwen3_moe_per_head_qk_norm_with_dense_layer_matches_transformers() {
    check_dir("qwen3_moe");
}

#[test]
fn olmoe_projection_qk_norm_and_clip_qkv_match_transformers() {
    check_dir("olmoe");
}

#[test]
fn deepseek_v2_latent_attention_grouped_softmax_router_matches_transformers() {
    check_dir("deepseek_v2");
}

#[test]
fn deepseek_v3_latent_attention_biased_sigmoid_router_yarn_matches_transformers() {
    check_dir("deepseek_v3");
}

#[test]
fn gguf_qwen3moe_f16_matches_transformers() {
    check_gguf("qwen3moe-f16.gguf");
}

#[test]
fn gguf_deepseek2_v2_with_kv_b_matches_transformers() {
    check_gguf("deepseek2-v2-f32.gguf");
}

#[test]
fn gguf_deepseek2_v3_with_split_kv_b_and_selection_bias_matches_transformers() {
    check_gguf("deepseek2-v3-f16.gguf");
}

#[test]
fn gguf_olmoe_f32_matches_transformers() {
    check_gguf("olmoe-f32.gguf");
}

/// The GGUF files of the new families read back as the safetensors checkpoints: the same
/// config (q/k norm, clip, dense layers among MoE layers) and, for the f32 file, the same
/// tensors bit for bit.
#[test]
fn gguf_qwen3moe_and_olmoe_equal_their_safetensors_models() {
    for (dir, file, exact) in [
        ("olmoe", "gguf/olmoe-f32.gguf", true),
        ("qwen3_moe", "gguf/qwen3moe-f16.gguf", false),
        ("deepseek_v2", "gguf/deepseek2-v2-f32.gguf", true),
        ("deepseek_v3", "gguf/deepseek2-v3-f16.gguf", false),
    ] {
        let st = Checkpoint::open(&fixtures().join(dir), &Device::Cpu).unwrap();
        let gg = Checkpoint::open(&fixtures().join(file), &Device::Cpu).unwrap();
        let (a, b) = (&st.config, &gg.config);
        assert_eq!(a.architecture, b.architecture, "{file}");
        assert_eq!(a.qk_norm, b.qk_norm, "{file}");
        // GGUF stores the clamp as an f32.
        let close = match (a.clip_qkv, b.clip_qkv) {
            (Some(x), Some(y)) => (x - y).abs() < 1e-6,
            (x, y) => x == y,
        };
        assert!(close, "{file}: clip {:?} vs {:?}", a.clip_qkv, b.clip_qkv);
        assert_eq!(a.head_dim, b.head_dim, "{file}");
        assert_eq!(a.mla, b.mla, "{file}");
        assert_eq!(a.rope_scaling.name(), b.rope_scaling.name(), "{file}");
        assert_eq!(a.moe, b.moe, "{file}");
        assert_eq!(a.qkv_bias, b.qkv_bias, "{file}");
        assert_eq!(a.param_specs(), b.param_specs(), "{file}");
        if exact {
            for spec in a.param_specs() {
                let x = st
                    .weights
                    .get(&spec.name, &spec.shape, &Device::Cpu)
                    .unwrap();
                let y = gg
                    .weights
                    .get(&spec.name, &spec.shape, &Device::Cpu)
                    .unwrap();
                assert_eq!(max_abs_diff(&x, &y), 0.0, "{file}: {}", spec.name);
            }
        }
    }
}

fn check_gguf(file: &str) {
    let path = fixtures().join("gguf").join(file);
    let ckpt = Checkpoint::open(&path, &Device::Cpu).unwrap_or_else(|e| panic!("{file}: {e}"));
    let model = CausalLm::load(&ckpt, &Device::Cpu).unwrap_or_else(|e| panic!("{file}: {e}"));
    let stem = file.trim_end_matches(".gguf");
    let (tokens, expected) = reference(
        &fixtures()
            .join("gguf")
            .join(format!("{stem}.reference.safetensors")),
    );
    let logits = model.forward_tokens(&tokens, None).unwrap();
    let d = max_abs_diff(&logits, &expected);
    eprintln!("{file}: max |Δlogit| = {d:e}");
    assert!(d <= TOL, "{file}: max |Δlogit| = {d:e} > {TOL:e}");
    check_kv_cache(file, &model, &tokens, &logits);
}

#[test]
fn gguf_llama_f32_matches_transformers() {
    check_gguf("llama-f32.gguf");
}

#[test]
fn gguf_mixtral_f16_stacked_experts_matches_transformers() {
    check_gguf("mixtral-f16.gguf");
}

#[test]
fn gguf_llama_q8_0_matches_dequantised_reference() {
    check_gguf("llama-q8_0.gguf");
}

#[test]
fn gguf_llama_q4_0_matches_dequantised_reference() {
    check_gguf("llama-q4_0.gguf");
}

#[test]
fn gguf_llama_q4_1_matches_dequantised_reference() {
    check_gguf("llama-q4_1.gguf");
}

#[test]
fn gguf_f32_equals_safetensors_model() {
    let st = Checkpoint::open(&fixtures().join("llama"), &Device::Cpu).unwrap();
    let gg = Checkpoint::open(&fixtures().join("gguf/llama-f32.gguf"), &Device::Cpu).unwrap();
    assert_eq!(st.config.hidden_size, gg.config.hidden_size);
    assert_eq!(st.config.num_key_value_heads, gg.config.num_key_value_heads);
    assert_eq!(st.config.tie_word_embeddings, gg.config.tie_word_embeddings);
    for spec in st.config.param_specs() {
        let a = st
            .weights
            .get(&spec.name, &spec.shape, &Device::Cpu)
            .unwrap();
        let b = gg
            .weights
            .get(&spec.name, &spec.shape, &Device::Cpu)
            .unwrap();
        assert_eq!(
            max_abs_diff(&a, &b),
            0.0,
            "{} differs after GGUF round trip",
            spec.name
        );
    }
}

/// Half-precision checkpoints load (converted to f32 at load) and stay close to the f32 model.
#[test]
fn f16_and_bf16_safetensors_load() {
    let src = fixtures().join("qwen2_moe");
    let (tokens, expected) = reference(&src.join("reference.safetensors"));
    for (dtype, tol) in [
        (candle_core::DType::F16, 0.02f32),
        (candle_core::DType::BF16, 0.15),
    ] {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::copy(src.join("config.json"), tmp.path().join("config.json")).unwrap();
        let map =
            candle_core::safetensors::load(src.join("model.safetensors"), &Device::Cpu).unwrap();
        let half: std::collections::HashMap<String, Tensor> = map
            .into_iter()
            .map(|(k, v)| (k, v.to_dtype(dtype).unwrap()))
            .collect();
        candle_core::safetensors::save(&half, tmp.path().join("model.safetensors")).unwrap();
        let ckpt = Checkpoint::open(tmp.path(), &Device::Cpu).unwrap();
        let model = CausalLm::load(&ckpt, &Device::Cpu).unwrap();
        assert_eq!(model.embed.dtype(), candle_core::DType::F32);
        let d = max_abs_diff(&model.forward_tokens(&tokens, None).unwrap(), &expected);
        assert!(d < tol, "{dtype:?}: max |Δlogit| {d}");
        assert!(d > 0.0, "{dtype:?}: rounding must show");
    }
}

/// A batch of sequences gives each sequence's own logits; the position limit applies per sequence.
#[test]
fn batched_forward_equals_single_sequences() {
    let dir = fixtures().join("qwen2_moe");
    let ckpt = Checkpoint::open(&dir, &Device::Cpu).unwrap();
    let model = CausalLm::load(&ckpt, &Device::Cpu).unwrap();
    let (tokens, expected) = reference(&dir.join("reference.safetensors"));
    let mut other = tokens.clone();
    other.reverse();
    let out = model
        .forward_batch(&[tokens.clone(), other.clone()], None)
        .unwrap();
    let a = out.logits.get(0).unwrap();
    let b = out.logits.get(1).unwrap();
    assert!(max_abs_diff(&a, &expected) <= TOL);
    let single = model.forward_tokens(&other, None).unwrap();
    assert!(max_abs_diff(&b, &single) <= TOL);
    // Many sequences whose total length exceeds the position limit are fine.
    let limit = model.config.max_position_embeddings;
    let n = limit / tokens.len() + 2;
    let many: Vec<Vec<u32>> = (0..n).map(|_| tokens.clone()).collect();
    assert!(model.forward_batch(&many, None).is_ok());
}
