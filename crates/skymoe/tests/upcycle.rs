//! `skymoe upcycle`: the upcycled model computes the dense model's function (no noise), for
//! both layouts and both gate initialisations, from safetensors and GGUF; bad requests fail.

mod common;

use std::path::Path;

use candle_core::{Device, Tensor};
use common::{assert_clean_failure, fixtures, max_abs, skymoe};
use skymoe_model::{CausalLm, Checkpoint, Tokenizer};

fn logits(model: &Path, tokens: &[u32]) -> Tensor {
    let ckpt = Checkpoint::open(model, &Device::Cpu).unwrap();
    CausalLm::load(&ckpt, &Device::Cpu)
        .unwrap()
        .forward_tokens(tokens, None)
        .unwrap()
}

fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    max_abs(&(a - b).unwrap())
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
    let ck = Checkpoint::open(&out, &Device::Cpu).unwrap();
    assert_eq!(ck.config.architecture, skymoe_model::Architecture::Qwen3Moe);
    assert_eq!(ck.config.qk_norm, skymoe_model::QkNorm::PerHead);
    assert_moe_blocks_compute_the_dense_ffns(&dense, &ck, "qwen3_moe");
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
    assert_clean_failure(&run(args("deepseek_v2", "1")), "not deepseek_v2");
    assert_clean_failure(&run(args("qwen3_moe", "5")), "--segments (5) must divide");
    let with = |arch: &'static str, extra: &[&str]| {
        let mut a = args(arch, "1");
        a.extend(extra.iter().map(|s| s.to_string()));
        run(a)
    };
    // Latent attention's shape must fit the dense heads (head dim 16, 2 kv heads, hidden 64).
    assert_clean_failure(&with("deepseek_v3", &["--rope-dim", "6"]), "--rope-dim (6)");
    assert_clean_failure(&with("deepseek_v3", &["--rope-dim", "0"]), "--rope-dim (0)");
    assert_clean_failure(
        &with("deepseek_v3", &["--kv-lora-rank", "63"]),
        "--kv-lora-rank (63)",
    );
    assert_clean_failure(
        &with("deepseek_v3", &["--dense-layers", "3"]),
        "--dense-layers (3)",
    );
    assert_clean_failure(&with("skywork", &["--rope-dim", "8"]), "--rope-dim shape");
    assert_clean_failure(
        &with("mixtral", &["--dense-layers", "1"]),
        "--dense-layers needs",
    );
    assert!(!out.exists());
}

/// Every MoE block of the upcycled checkpoint `moe` computes the dense FFN of its layer in the
/// model at `dense` (within 1e-5, on random inputs).
fn assert_moe_blocks_compute_the_dense_ffns(dense: &Path, moe: &Checkpoint, what: &str) {
    use skymoe_model::layers::block::FeedForward;
    let dense_model = CausalLm::load(
        &Checkpoint::open(dense, &Device::Cpu).unwrap(),
        &Device::Cpu,
    )
    .unwrap();
    let moe_model = CausalLm::load(moe, &Device::Cpu).unwrap();
    let hidden = moe.config.hidden_size;
    let x = Tensor::randn(0f32, 1.0, (1, 5, hidden), &Device::Cpu).unwrap();
    for (a, b) in dense_model.layers.iter().zip(&moe_model.layers) {
        let (FeedForward::Dense(ffn), FeedForward::Moe(block)) = (&a.ffn, &b.ffn) else {
            panic!("{what}: expected a dense and an MoE feed-forward block");
        };
        let d = max_diff(&ffn.forward(&x).unwrap(), &block.forward(&x).unwrap().0);
        assert!(
            d <= 1e-5,
            "{what}: MoE block differs from the dense FFN by {d}"
        );
    }
}

/// The test Llama cut to one kv head (multi-query attention): its first kv head's key and
/// value rows serve every query head.
fn multi_query_llama(dir: &Path) -> std::path::PathBuf {
    let src = fixtures().join("llama");
    let out = dir.join("llama-mqa");
    std::fs::create_dir_all(&out).unwrap();
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("config.json")).unwrap()).unwrap();
    cfg["num_key_value_heads"] = 1.into();
    // The latent's RMS norm sees the unit-RMS hidden state `h/√(ms(h) + ε)`; with this
    // model's tiny activations an ε of 1e-5 alone would move its RMS by 1%.
    cfg["rms_norm_eps"] = 1e-10.into();
    std::fs::write(out.join("config.json"), cfg.to_string()).unwrap();
    std::fs::copy(src.join("tokenizer.json"), out.join("tokenizer.json")).unwrap();
    let mut t =
        candle_core::safetensors::load(src.join("model.safetensors"), &Device::Cpu).unwrap();
    for (name, w) in t.iter_mut() {
        if name.ends_with("k_proj.weight") || name.ends_with("v_proj.weight") {
            *w = w.narrow(0, 0, 16).unwrap().contiguous().unwrap();
        }
    }
    candle_core::safetensors::save(&t, out.join("model.safetensors")).unwrap();
    out
}

/// DeepSeek-V3 from a dense Llama: the dense FFN becomes the shared expert and the routed
/// experts its segments, so with a zero gate and top-k = segments every MoE block computes
/// the dense FFN; latent attention keeps Llama's attention exactly for one kv head, every
/// dimension rotary and a lossless latent. Checked through the autograd model, the serving
/// model's KV-cached decode, and against the dense FFN block by block.
#[test]
fn deepseek_v3_upcycling_keeps_the_dense_function_where_the_layout_allows() {
    let tmp = tempfile::tempdir().unwrap();
    let dense = multi_query_llama(tmp.path());
    let want = logits(&dense, &TOKENS);
    let out = tmp.path().join("v3");
    upcycle_ok(&[
        "--from",
        dense.to_str().unwrap(),
        "--experts",
        "6",
        "--top-k",
        "3",
        "--segments",
        "3",
        "--dense-layers",
        "1",
        "--arch",
        "deepseek_v3",
        "--out",
        out.to_str().unwrap(),
    ]);
    let ck = Checkpoint::open(&out, &Device::Cpu).unwrap();
    assert_eq!(
        ck.config.architecture,
        skymoe_model::Architecture::DeepseekV3
    );
    let mla = ck.config.mla.unwrap();
    assert_eq!(
        (mla.kv_lora_rank, mla.qk_rope_head_dim, mla.qk_nope_head_dim),
        (64, 16, 0)
    );
    let moe = ck.config.moe.as_ref().unwrap();
    assert_eq!(moe.shared_expert_intermediate_size, Some(96));
    assert_eq!(moe.moe_layers, vec![false, true, true]);
    let d = max_diff(&logits(&out, &TOKENS), &want);
    assert!(
        d <= 1e-4,
        "upcycled DeepSeek-V3 logits differ from dense by {d}"
    );
    // The serving model (absorbed latent attention, a latent KV cache), one token at a time.
    let served = served_decode(&ck);
    let d = max_diff(&served, &want);
    assert!(
        d <= 1e-4,
        "served upcycled DeepSeek-V3 differs from dense by {d}"
    );

    // With a GQA model, a compressed latent and partly rotary heads the MoE blocks still
    // compute the dense FFNs; attention changes.
    let gqa = fixtures().join("llama");
    let out = tmp.path().join("v3-gqa");
    upcycle_ok(&[
        "--from",
        gqa.to_str().unwrap(),
        "--experts",
        "4",
        "--top-k",
        "2",
        "--segments",
        "2",
        "--kv-lora-rank",
        "24",
        "--rope-dim",
        "8",
        "--arch",
        "deepseek_v3",
        "--out",
        out.to_str().unwrap(),
    ]);
    let ck = Checkpoint::open(&out, &Device::Cpu).unwrap();
    let mla = ck.config.mla.unwrap();
    assert_eq!(
        (mla.kv_lora_rank, mla.qk_rope_head_dim, mla.qk_nope_head_dim),
        (24, 8, 8)
    );
    assert_moe_blocks_compute_the_dense_ffns(&gqa, &ck, "deepseek_v3");
    let d = max_diff(&logits(&out, &TOKENS), &logits(&gqa, &TOKENS));
    assert!(
        d > 1e-3,
        "partly rotary attention cannot equal Llama's ({d})"
    );
}

/// The serving model's logits of [`TOKENS`], fed one token at a time through its KV cache.
fn served_decode(ckpt: &Checkpoint) -> Tensor {
    use skymoe_serve::model::{LogitsFor, SeqChunk, ServeModel};
    let model = ServeModel::load(ckpt, Some(skymoe_kernels::quant::WeightFormat::F32)).unwrap();
    let mut kv = model.new_kv_cache(4, 16, None);
    let blocks = kv.allocate(kv.blocks_for(TOKENS.len())).unwrap();
    let mut rows = Vec::new();
    for (i, t) in TOKENS.iter().enumerate() {
        let chunk = SeqChunk {
            tokens: std::slice::from_ref(t),
            start: i,
            blocks: &blocks,
            logits: LogitsFor::Last,
        };
        rows.extend(model.forward(&[chunk], &mut kv).unwrap().remove(0));
    }
    let vocab = rows.len() / TOKENS.len();
    Tensor::from_vec(rows, (TOKENS.len(), vocab), &Device::Cpu).unwrap()
}
