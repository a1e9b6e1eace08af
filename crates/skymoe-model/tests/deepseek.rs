//! DeepSeek-V2/V3 inputs that must be refused clearly, and the parts of the published layout
//! that are skipped (multi-token-prediction layers).

mod common;

use std::collections::HashMap;
use std::path::Path;

use candle_core::{Device, Tensor};
use common::{fixtures, max_abs_diff, reference};
use skymoe_model::{CausalLm, Checkpoint, ModelConfig};

fn config_json(family: &str) -> serde_json::Value {
    let text = std::fs::read_to_string(fixtures().join(family).join("config.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn parse_err(v: serde_json::Value) -> String {
    ModelConfig::from_json(&v, Path::new("config.json"))
        .map(|_| "accepted".to_string())
        .unwrap_or_else(|e| e.to_string())
}

#[test]
fn contradictory_family_fields_are_errors() {
    let cases: [(&str, &str, serde_json::Value, &str); 9] = [
        (
            "deepseek_v3",
            "n_group",
            3.into(),
            "must divide the number of experts",
        ),
        (
            "deepseek_v3",
            "topk_group",
            5.into(),
            "topk_group (5) must be between 1 and n_group (4)",
        ),
        (
            "deepseek_v3",
            "num_experts_per_tok",
            6.into(),
            "cannot hold the top-6 experts",
        ),
        (
            "deepseek_v3",
            "qk_head_dim",
            30.into(),
            "is not qk_nope_head_dim + qk_rope_head_dim",
        ),
        ("deepseek_v3", "qk_rope_head_dim", 7.into(), "must be even"),
        (
            "deepseek_v3",
            "num_key_value_heads",
            2.into(),
            "differs from num_attention_heads",
        ),
        (
            "deepseek_v3",
            "scoring_func",
            "softmax".into(),
            "DeepSeek-V3 routers score with sigmoid",
        ),
        (
            "deepseek_v2",
            "topk_method",
            "noaux_tc".into(),
            "`noaux_tc` is DeepSeek-V3's",
        ),
        (
            "deepseek_v2",
            "attention_bias",
            true.into(),
            "carry no biases",
        ),
    ];
    for (family, key, value, needle) in cases {
        let mut v = config_json(family);
        v[key] = value;
        let err = parse_err(v);
        assert!(err.contains(needle), "{family} {key}: {err}");
    }
    let mut v = config_json("deepseek_v2");
    v.as_object_mut().unwrap().remove("topk_group");
    assert!(
        parse_err(v).contains("n_group"),
        "group_limited_greedy without topk_group"
    );
}

/// A copy of a fixture directory whose `model.safetensors` is rewritten by `edit`, and whose
/// `config.json` by `edit_config`.
fn edited_copy(
    family: &str,
    edit: impl FnOnce(&mut HashMap<String, Tensor>),
    edit_config: impl FnOnce(&mut serde_json::Value),
) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let src = fixtures().join(family);
    std::fs::copy(
        src.join("tokenizer.json"),
        dir.path().join("tokenizer.json"),
    )
    .unwrap();
    let mut config = config_json(family);
    edit_config(&mut config);
    std::fs::write(dir.path().join("config.json"), config.to_string()).unwrap();
    let mut tensors =
        candle_core::safetensors::load(src.join("model.safetensors"), &Device::Cpu).unwrap();
    edit(&mut tensors);
    candle_core::safetensors::save(&tensors, dir.path().join("model.safetensors")).unwrap();
    dir
}

#[test]
fn a_v3_checkpoint_without_its_selection_bias_is_an_error() {
    let dir = edited_copy(
        "deepseek_v3",
        |t| t.retain(|name, _| !name.ends_with("e_score_correction_bias")),
        |_| {},
    );
    let ckpt = Checkpoint::open(dir.path(), &Device::Cpu).unwrap();
    let err = CausalLm::load(&ckpt, &Device::Cpu).unwrap_err().to_string();
    assert!(
        err.contains("model.layers.1.mlp.gate.e_score_correction_bias")
            && err.contains("select with a bias"),
        "{err}"
    );
}

#[test]
fn multi_token_prediction_layers_are_skipped() {
    // DeepSeek-V3 publishes its MTP module as the layer after the last decoder layer.
    let dir = edited_copy(
        "deepseek_v3",
        |t| {
            let h = Tensor::ones((64, 128), candle_core::DType::F32, &Device::Cpu).unwrap();
            t.insert("model.layers.3.eh_proj.weight".into(), h);
            let n = Tensor::ones(64, candle_core::DType::F32, &Device::Cpu).unwrap();
            t.insert("model.layers.3.enorm.weight".into(), n);
        },
        |c| c["num_nextn_predict_layers"] = 1.into(),
    );
    let ckpt = Checkpoint::open(dir.path(), &Device::Cpu).unwrap();
    assert_eq!(ckpt.config.mtp_layers, 1);
    assert_eq!(ckpt.config.num_hidden_layers, 3);
    let model = CausalLm::load(&ckpt, &Device::Cpu).unwrap();
    let (tokens, expected) = reference(&fixtures().join("deepseek_v3/reference.safetensors"));
    let logits = model.forward_tokens(&tokens, None).unwrap();
    assert!(max_abs_diff(&logits, &expected) < 1e-4);
    // Written back, the count survives.
    let back = ModelConfig::from_json(&ckpt.config.to_hf_json(), Path::new("x")).unwrap();
    assert_eq!(back.mtp_layers, 1);
}

/// A copy of a committed GGUF fixture with one byte string of its header replaced by another
/// of the same length (renaming a tensor).
fn renamed_gguf(file: &str, from: &str, to: &str) -> tempfile::TempDir {
    assert_eq!(from.len(), to.len());
    let mut bytes = std::fs::read(fixtures().join("gguf").join(file)).unwrap();
    let at = bytes
        .windows(from.len())
        .position(|w| w == from.as_bytes())
        .unwrap_or_else(|| panic!("{from} not in {file}"));
    bytes[at..at + to.len()].copy_from_slice(to.as_bytes());
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join(file), bytes).unwrap();
    dir
}

#[test]
fn a_gguf_missing_a_latent_attention_tensor_is_an_error() {
    let dir = renamed_gguf(
        "deepseek2-v2-f32.gguf",
        "blk.0.attn_kv_a_mqa.weight",
        "blk.0.attn_kv_a_xxx.weight",
    );
    let ckpt = Checkpoint::open(&dir.path().join("deepseek2-v2-f32.gguf"), &Device::Cpu).unwrap();
    let err = CausalLm::load(&ckpt, &Device::Cpu).unwrap_err().to_string();
    assert!(
        err.contains("model.layers.0.self_attn.kv_a_proj_with_mqa.weight")
            && err.contains("missing"),
        "{err}"
    );
    // Half of a split kv_b_proj.
    let dir = renamed_gguf(
        "deepseek2-v3-f16.gguf",
        "blk.1.attn_v_b.weight",
        "blk.1.attn_v_x.weight",
    );
    let err = Checkpoint::open(&dir.path().join("deepseek2-v3-f16.gguf"), &Device::Cpu)
        .map(|_| String::new())
        .unwrap_or_else(|e| e.to_string());
    assert!(err.contains("only one of attn_k_b and attn_v_b"), "{err}");
}

#[test]
fn latent_attention_splits_its_heads_over_tensor_parallel_ranks() {
    // Rank 0 of two (collectives are not reached when only building the model).
    #[derive(Debug)]
    struct Two;
    impl skymoe_model::parallel::ShardComm for Two {
        fn rank(&self) -> usize {
            0
        }
        fn size(&self) -> usize {
            2
        }
        fn all_reduce_sum(&self, _: &mut [f32]) -> Result<(), String> {
            Ok(())
        }
    }
    let ckpt = Checkpoint::open(&fixtures().join("deepseek_v2"), &Device::Cpu).unwrap();
    let sharding = skymoe_model::parallel::Sharding {
        tp: skymoe_model::parallel::TensorParallel {
            comm: std::sync::Arc::new(Two),
        },
        whole_experts: true,
    };
    let whole = skymoe_model::model::CheckpointLoader::new(&ckpt.weights, &Device::Cpu);
    let parts = skymoe_model::parallel::parts(&ckpt.config, 0, 2, true);
    let loader = skymoe_model::parallel::SliceLoader {
        inner: &whole,
        parts: &parts,
    };
    let model =
        CausalLm::from_loader_sharded(ckpt.config.clone(), &loader, &Device::Cpu, Some(&sharding))
            .unwrap();
    let skymoe_model::layers::attention::AttentionBlock::Mla(mla) = &model.layers[0].attention
    else {
        panic!("expected latent attention");
    };
    // 2 of 4 heads: q_proj rows 2·(16 + 8), kv_b_proj rows 2·(16 + 12), o_proj columns 2·12;
    // the latent projection whole.
    assert_eq!(mla.num_heads, 2);
    let dims = |t: &Tensor| t.dims().to_vec();
    let skymoe_model::layers::mla::MlaQuery::Direct(q) = &mla.query else {
        panic!("DeepSeek-V2's fixture has no query bottleneck");
    };
    assert_eq!(dims(&q.weight), vec![48, 64]);
    assert_eq!(dims(&mla.kv_up.weight), vec![56, 32]);
    assert_eq!(dims(&mla.o_proj.weight), vec![64, 24]);
    assert_eq!(dims(&mla.kv_down.weight), vec![40, 64]);
}
