//! `skymoe upcycle`: the upcycled model computes the dense model's function (no noise), for
//! both layouts and both gate initialisations, from safetensors and GGUF; bad requests fail.

mod common;

use std::path::Path;

use candle_core::{Device, Tensor};
use common::{assert_clean_failure, fixtures, skymoe};
use skymoe_model::{CausalLm, Checkpoint, Tokenizer};

fn logits(model: &Path, tokens: &[u32]) -> Tensor {
    let ckpt = Checkpoint::open(model, &Device::Cpu).unwrap();
    CausalLm::load(&ckpt, &Device::Cpu)
        .unwrap()
        .forward_tokens(tokens, None)
        .unwrap()
}

fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
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

const TOKENS: [u32; 10] = [0, 45, 319, 17, 290, 128, 256, 3, 318, 77];

#[test]
fn upcycled_models_compute_the_dense_function() {
    let tmp = tempfile::tempdir().unwrap();
    let dense = fixtures().join("llama");
    let want = logits(&dense, &TOKENS);
    for (arch, gate, extra) in [
        ("skywork", "zeros", "1"),
        ("skywork", "normal:0.5", "2"),
        ("mixtral", "zeros", "0"),
        ("mixtral", "normal:1.0", "0"),
    ] {
        let out = tmp.path().join(format!("{arch}-{gate}"));
        let o = skymoe(&[
            "upcycle",
            "--from",
            dense.to_str().unwrap(),
            "--experts",
            "8",
            "--top-k",
            "2",
            "--arch",
            arch,
            "--gate-init",
            gate,
            "--gate-norm-std",
            extra,
            "--seed",
            "3",
            "--out",
            out.to_str().unwrap(),
        ]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let ck = Checkpoint::open(&out, &Device::Cpu).unwrap();
        let m = ck.config.moe.as_ref().unwrap();
        assert_eq!((m.num_experts, m.top_k), (8, 2));
        assert!(out.join("tokenizer.json").exists());
        // Skywork checkpoints carry transformers remote code (auto_map) so transformers loads them.
        let cfg: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap())
                .unwrap();
        let remote = [
            "configuration_skywork_moe.py",
            "modeling_skywork_moe.py",
            "skywork_moe_ref.py",
        ];
        if arch == "skywork" {
            assert_eq!(
                cfg["auto_map"]["AutoModelForCausalLM"],
                "modeling_skywork_moe.SkyworkForCausalLM"
            );
            assert!(remote.iter().all(|f| out.join(f).exists()));
        } else {
            assert!(cfg.get("auto_map").is_none() && remote.iter().all(|f| !out.join(f).exists()));
        }
        let got = logits(&out, &TOKENS);
        let d = max_diff(&got, &want);
        assert!(
            d <= 1e-5,
            "{arch} {gate}: upcycled logits differ from dense by {d}"
        );
    }
}

#[test]
fn upcycling_a_gguf_keeps_function_and_tokenizer() {
    let tmp = tempfile::tempdir().unwrap();
    let gguf = fixtures().join("gguf/llama-f32.gguf");
    let out = tmp.path().join("moe");
    let o = skymoe(&[
        "upcycle",
        "--from",
        gguf.to_str().unwrap(),
        "--experts",
        "4",
        "--top-k",
        "1",
        "--arch",
        "mixtral",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let d = max_diff(&logits(&out, &TOKENS), &logits(&gguf, &TOKENS));
    assert!(d <= 1e-5, "differs by {d}");
    let ck = Checkpoint::open(&gguf, &Device::Cpu).unwrap();
    let from_gguf = Tokenizer::for_model(&ck.path, ck.gguf_metadata.as_ref()).unwrap();
    let written = Tokenizer::for_model(&out, None).unwrap();
    let text = "Hello world, café naïve 日本!\nsecond line";
    assert_eq!(
        written.encode_plain(text).unwrap(),
        from_gguf.encode_plain(text).unwrap()
    );
}

#[test]
fn expert_noise_makes_experts_differ() {
    let tmp = tempfile::tempdir().unwrap();
    let dense = fixtures().join("llama");
    let out = tmp.path().join("noisy");
    let o = skymoe(&[
        "upcycle",
        "--from",
        dense.to_str().unwrap(),
        "--experts",
        "4",
        "--top-k",
        "2",
        "--expert-noise",
        "0.02",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let w = candle_core::safetensors::load(out.join("model.safetensors"), &Device::Cpu).unwrap();
    let a = &w["model.layers.0.block_sparse_moe.experts.0.w1.weight"];
    let b = &w["model.layers.0.block_sparse_moe.experts.1.w1.weight"];
    assert!(max_diff(a, b) > 1e-3);
    let d = max_diff(&logits(&out, &TOKENS), &logits(&dense, &TOKENS));
    assert!(d > 1e-4, "noise should change the function (Δ {d})");
}

#[test]
fn bad_requests_are_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let dense = fixtures().join("llama");
    let out = tmp.path().join("x");
    let d = dense.to_str().unwrap();
    let o = out.to_str().unwrap();
    assert_clean_failure(
        &skymoe(&[
            "upcycle",
            "--from",
            d,
            "--experts",
            "2",
            "--top-k",
            "4",
            "--out",
            o,
        ]),
        "must be at least --top-k",
    );
    assert_clean_failure(
        &skymoe(&[
            "upcycle",
            "--from",
            d,
            "--experts",
            "2",
            "--top-k",
            "0",
            "--out",
            o,
        ]),
        "at least 1",
    );
    let moe = fixtures().join("mixtral");
    assert_clean_failure(
        &skymoe(&[
            "upcycle",
            "--from",
            moe.to_str().unwrap(),
            "--experts",
            "8",
            "--top-k",
            "2",
            "--out",
            o,
        ]),
        "dense Llama",
    );
    assert_clean_failure(
        &skymoe(&[
            "upcycle",
            "--from",
            d,
            "--experts",
            "8",
            "--top-k",
            "2",
            "--gate-init",
            "uniform",
            "--out",
            o,
        ]),
        "unknown gate init",
    );
    assert!(!out.exists(), "nothing may be written on error");
}

fn upcycle_ok(args: &[&str]) {
    let mut all = vec!["upcycle"];
    all.extend_from_slice(args);
    let o = skymoe(&all);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

/// Fine-grained experts: the dense FFN split into column segments, one per expert. With a
/// zero gate and top-k equal to the segment count the selected experts are the segments, so
/// the Skywork and Mixtral layouts compute the dense model exactly; Qwen3-MoE's MoE blocks
/// compute the dense FFNs exactly, while its new q/k norm changes attention.
#[test]
fn fine_grained_upcycling_keeps_the_dense_ffn() {
    let tmp = tempfile::tempdir().unwrap();
    let dense = fixtures().join("llama");
    let want = logits(&dense, &TOKENS);
    for (arch, experts, k, segments) in [("skywork", "6", "3", "3"), ("mixtral", "4", "2", "2")] {
        let out = tmp.path().join(arch);
        upcycle_ok(&[
            "--from",
            dense.to_str().unwrap(),
            "--experts",
            experts,
            "--top-k",
            k,
            "--segments",
            segments,
            "--arch",
            arch,
            "--gate-init",
            "zeros",
            "--out",
            out.to_str().unwrap(),
        ]);
        let ck = Checkpoint::open(&out, &Device::Cpu).unwrap();
        let width = 96 / segments.parse::<usize>().unwrap();
        assert_eq!(
            ck.config.moe.as_ref().unwrap().expert_intermediate_size,
            width
        );
        let d = max_diff(&logits(&out, &TOKENS), &want);
        assert!(
            d <= 1e-5,
            "{arch}: upcycled logits differ from dense by {d}"
        );
    }
    let out = tmp.path().join("qwen3");
    upcycle_ok(&[
        "--from",
        dense.to_str().unwrap(),
        "--experts",
        "6",
        "--top-k",
        "3",
        "--segments",
        "3",
        "--arch",
        "qwen3_moe",
        "--out",
        out.to_str().unwrap(),
    ]);
    let dense_model = CausalLm::load(
        &Checkpoint::open(&dense, &Device::Cpu).unwrap(),
        &Device::Cpu,
    )
    .unwrap();
    let ck = Checkpoint::open(&out, &Device::Cpu).unwrap();
    assert_eq!(ck.config.architecture, skymoe_model::Architecture::Qwen3Moe);
    assert_eq!(ck.config.qk_norm, skymoe_model::QkNorm::PerHead);
    let moe_model = CausalLm::load(&ck, &Device::Cpu).unwrap();
    let x = Tensor::randn(0f32, 1.0, (1, 5, 64), &Device::Cpu).unwrap();
    for (a, b) in dense_model.layers.iter().zip(&moe_model.layers) {
        use skymoe_model::layers::block::FeedForward;
        let (FeedForward::Dense(ffn), FeedForward::Moe(moe)) = (&a.ffn, &b.ffn) else {
            panic!("expected a dense and an MoE feed-forward block");
        };
        let d = max_diff(&ffn.forward(&x).unwrap(), &moe.forward(&x).unwrap().0);
        assert!(
            d <= 1e-5,
            "qwen3_moe: MoE block differs from the dense FFN by {d}"
        );
    }
    // The q/k norm is new: attention, hence the logits, change.
    assert!(max_diff(&logits(&out, &TOKENS), &want) > 1e-3);
}

#[test]
fn layouts_that_cannot_start_from_a_dense_llama_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let dense = fixtures().join("llama");
    let out = tmp.path().join("x");
    let args = |arch: &'static str, segments: &'static str| {
        vec![
            "upcycle".to_string(),
            "--from".into(),
            dense.to_str().unwrap().into(),
            "--experts".into(),
            "4".into(),
            "--top-k".into(),
            "2".into(),
            "--segments".into(),
            segments.into(),
            "--arch".into(),
            arch.into(),
            "--out".into(),
            out.to_str().unwrap().into(),
        ]
    };
    let run = |a: Vec<String>| skymoe(&a.iter().map(String::as_str).collect::<Vec<_>>());
    assert_clean_failure(&run(args("deepseek_v3", "1")), "latent attention");
    assert_clean_failure(&run(args("qwen3_moe", "5")), "--segments (5) must divide");
    assert!(!out.exists());
}
