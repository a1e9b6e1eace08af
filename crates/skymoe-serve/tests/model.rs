//! The served model against Hugging Face transformers' logits (the reference fixtures), and
//! batched, chunked, paged execution against running each sequence alone.

use std::path::PathBuf;

use candle_core::Device;
use skymoe_kernels::quant::WeightFormat;
use skymoe_model::Checkpoint;
use skymoe_serve::kv_cache::KvDtype;
use skymoe_serve::model::{LogitsFor, SeqChunk, ServeModel};

const FAMILIES: [&str; 10] = [
    "llama",
    "mixtral",
    "qwen2_moe",
    "qwen2_moe_norm",
    "skywork_moe",
    "skywork_moe_variant",
    "qwen3_moe",
    "olmoe",
    "deepseek_v2",
    "deepseek_v3",
];

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../fixtures/reference")
        .join(name)
}

fn reference(name: &str) -> (Vec<u32>, Vec<f32>) {
    let t =
        candle_core::safetensors::load(fixture(name).join("reference.safetensors"), &Device::Cpu)
            .unwrap();
    let tokens: Vec<u32> = t["tokens"]
        .to_vec1::<i64>()
        .unwrap()
        .into_iter()
        .map(|v| v as u32)
        .collect();
    let logits = t["logits"].flatten_all().unwrap().to_vec1::<f32>().unwrap();
    (tokens, logits)
}

fn max_rel(a: &[f32], b: &[f32]) -> f32 {
    let scale = b.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-6);
    a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs())) / scale
}

fn run_alone(model: &ServeModel, tokens: &[u32]) -> Vec<f32> {
    run_alone_with(model, tokens, None)
}

fn run_alone_with(model: &ServeModel, tokens: &[u32], kv_dtype: Option<KvDtype>) -> Vec<f32> {
    let mut kv = model.new_kv_cache(4, 16, kv_dtype);
    let blocks = kv.allocate(kv.blocks_for(tokens.len())).unwrap();
    let chunk = SeqChunk {
        tokens,
        start: 0,
        blocks: &blocks,
        logits: LogitsFor::All,
    };
    model.forward(&[chunk], &mut kv).unwrap().remove(0)
}

#[test]
fn f32_logits_match_transformers_for_every_family() {
    for fam in FAMILIES {
        let ckpt = Checkpoint::open(&fixture(fam), &Device::Cpu).unwrap();
        let model = ServeModel::load(&ckpt, Some(WeightFormat::F32)).unwrap();
        let (tokens, want) = reference(fam);
        let got = run_alone(&model, &tokens);
        let e = max_rel(&got, &want);
        assert!(e < 1e-4, "{fam}: max relative logit error {e}");
    }
}

/// The GGUF files of the q/k-norm families serve the logits transformers gives for their
/// weights as stored.
#[test]
fn gguf_qwen3moe_and_olmoe_serve_transformers_logits() {
    for stem in ["qwen3moe-f16", "olmoe-f32"] {
        let dir = fixture("gguf");
        let ckpt = Checkpoint::open(&dir.join(format!("{stem}.gguf")), &Device::Cpu).unwrap();
        let model = ServeModel::load(&ckpt, Some(WeightFormat::F32)).unwrap();
        let t = candle_core::safetensors::load(
            dir.join(format!("{stem}.reference.safetensors")),
            &Device::Cpu,
        )
        .unwrap();
        let tokens: Vec<u32> = t["tokens"]
            .to_vec1::<i64>()
            .unwrap()
            .into_iter()
            .map(|v| v as u32)
            .collect();
        let want = t["logits"].flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let e = max_rel(&run_alone(&model, &tokens), &want);
        assert!(e < 1e-4, "{stem}: max relative logit error {e}");
    }
}

#[test]
fn an_f16_kv_cache_stays_close_to_transformers_and_is_the_default_for_quantised_weights() {
    for fam in FAMILIES {
        let ckpt = Checkpoint::open(&fixture(fam), &Device::Cpu).unwrap();
        let model = ServeModel::load(&ckpt, Some(WeightFormat::F32)).unwrap();
        assert_eq!(
            model.kv_dtype(None),
            KvDtype::F32,
            "f32 weights keep an f32 cache"
        );
        let (tokens, want) = reference(fam);
        let got = run_alone_with(&model, &tokens, Some(KvDtype::F16));
        // Measured 3e-4 to 5.5e-4 (f32 cache: below 1e-4).
        let e = max_rel(&got, &want);
        assert!(
            e < 2e-3,
            "{fam}: max relative logit error {e} with an f16 cache"
        );
        let exact = run_alone_with(&model, &tokens, Some(KvDtype::F32));
        assert_ne!(got, exact, "{fam}: the f16 cache rounds");
        for format in [WeightFormat::F16, WeightFormat::Int8, WeightFormat::Fp8] {
            let q = ServeModel::load(&ckpt, Some(format)).unwrap();
            assert_eq!(q.kv_dtype(None), KvDtype::F16, "{fam} {format}");
        }
    }
}

#[test]
fn an_int8_kv_cache_stays_close_to_transformers() {
    for fam in FAMILIES {
        let ckpt = Checkpoint::open(&fixture(fam), &Device::Cpu).unwrap();
        let model = ServeModel::load(&ckpt, Some(WeightFormat::F32)).unwrap();
        let (tokens, want) = reference(fam);
        let got = run_alone_with(&model, &tokens, Some(KvDtype::Int8));
        // Measured 3.4e-3 to 1.7e-2 of the largest logit on these random models (an f16
        // cache: below 5.5e-4; an unscaled FP8 cache: up to 0.41).
        let e = max_rel(&got, &want);
        assert!(
            e < 3e-2,
            "{fam}: max relative logit error {e} with an int8 cache"
        );
        let f16 = run_alone_with(&model, &tokens, Some(KvDtype::F16));
        assert_ne!(got, f16, "{fam}: the int8 cache rounds further");
    }
}

#[test]
fn batched_chunked_decoding_equals_each_sequence_alone() {
    for fam in ["mixtral", "qwen2_moe", "skywork_moe_variant"] {
        let ckpt = Checkpoint::open(&fixture(fam), &Device::Cpu).unwrap();
        let model = ServeModel::load(&ckpt, Some(WeightFormat::F32)).unwrap();
        let vocab = model.config.vocab_size;
        let a: Vec<u32> = (0..11).map(|i| (i * 37 + 5) % vocab as u32).collect();
        let b: Vec<u32> = (0..7).map(|i| (i * 101 + 9) % vocab as u32).collect();
        let want_a = run_alone(&model, &a);
        let want_b = run_alone(&model, &b);
        // Block size 4 over a shared pool, blocks interleaved between the two sequences.
        let mut kv = model.new_kv_cache(4, 8, None);
        let mut ba = Vec::new();
        let mut bb = Vec::new();
        for _ in 0..3 {
            ba.extend(kv.allocate(1).unwrap());
            bb.extend(kv.allocate(1).unwrap());
        }
        // Step 1: prefill a[0..6] (no logits) with b[0..3].
        let out = model
            .forward(
                &[
                    SeqChunk {
                        tokens: &a[0..6],
                        start: 0,
                        blocks: &ba,
                        logits: LogitsFor::None,
                    },
                    SeqChunk {
                        tokens: &b[0..3],
                        start: 0,
                        blocks: &bb,
                        logits: LogitsFor::Last,
                    },
                ],
                &mut kv,
            )
            .unwrap();
        assert!(out[0].is_empty());
        assert!(
            max_rel(&out[1], &want_b[2 * vocab..3 * vocab]) < 1e-5,
            "{fam}: b prefill"
        );
        // Then one position at a time for b while a finishes its prompt, then both decode.
        let mut pa = 6;
        let mut pb = 3;
        while pa < a.len() || pb < b.len() {
            let mut chunks = Vec::new();
            let mut which = Vec::new();
            if pa < a.len() {
                let len = if pa == 6 { 3 } else { 1 };
                chunks.push(SeqChunk {
                    tokens: &a[pa..pa + len],
                    start: pa,
                    blocks: &ba,
                    logits: LogitsFor::All,
                });
                which.push(('a', pa, len));
            }
            if pb < b.len() {
                chunks.push(SeqChunk {
                    tokens: &b[pb..pb + 1],
                    start: pb,
                    blocks: &bb,
                    logits: LogitsFor::Last,
                });
                which.push(('b', pb, 1));
            }
            let out = model.forward(&chunks, &mut kv).unwrap();
            for ((seq, start, len), logits) in which.into_iter().zip(out) {
                let want = if seq == 'a' { &want_a } else { &want_b };
                let first = if seq == 'a' { start } else { start + len - 1 };
                let e = max_rel(&logits, &want[first * vocab..(start + len) * vocab]);
                assert!(e < 1e-5, "{fam}: {seq} at {start}: {e}");
                if seq == 'a' {
                    pa += len;
                } else {
                    pb += len;
                }
            }
        }
    }
}

#[test]
fn bad_chunks_are_errors() {
    let ckpt = Checkpoint::open(&fixture("mixtral"), &Device::Cpu).unwrap();
    let model = ServeModel::load(&ckpt, Some(WeightFormat::Int8)).unwrap();
    let mut kv = model.new_kv_cache(4, 2, None);
    let blocks = kv.allocate(1).unwrap();
    let run = |tokens: &[u32], blocks: &[u32], kv: &mut skymoe_serve::kv_cache::KvCache| {
        model
            .forward(
                &[SeqChunk {
                    tokens,
                    start: 0,
                    blocks,
                    logits: LogitsFor::Last,
                }],
                kv,
            )
            .unwrap_err()
            .to_string()
    };
    assert!(run(&[1, 100000], &blocks, &mut kv).contains("out of range"));
    assert!(run(&[1, 2, 3, 4, 5], &blocks, &mut kv).contains("KV blocks"));
    assert!(run(&[], &blocks, &mut kv).contains("no tokens"));
    assert!(run(&[1], &[7], &mut kv).contains("not in the cache"));
}

/// The weights a batch-1 decode step reads (the numerator of `skymoe bench`'s share of the
/// memory bandwidth), counted from the Mixtral fixture's configuration: per layer the
/// attention, the router and top-k of the experts; the LM head; one embedding row.
#[test]
fn decode_bytes_per_token_count_the_active_weights() {
    let ckpt = Checkpoint::open(&fixture("mixtral"), &Device::Cpu).unwrap();
    let model = ServeModel::load(&ckpt, Some(WeightFormat::F32)).unwrap();
    // hidden 64, 4 heads (head_dim 16) and 2 kv heads, 4 experts of width 32, top-2, 3
    // layers, vocabulary 320 with an untied LM head.
    let (h, kv, f, experts, top_k, layers, vocab) = (64, 32, 32, 4, 2, 3, 320);
    let attention = h * (h + 2 * kv) + h * h;
    let layer = attention + experts * h + top_k * 3 * h * f;
    let want = 4 * (layers * layer + vocab * h + h);
    assert_eq!(model.decode_bytes_per_token(), want);
    assert!(model.decode_bytes_per_token() < model.weight_bytes());
}

/// `eval --decode`'s scoring: windows of different lengths decoded side by side, token by
/// token, score as the same windows run as prompts (f32 weights and cache: the same sums in
/// another order); a window of one token is refused.
#[test]
fn decoded_windows_score_as_prompts_do() {
    use skymoe_serve::eval::{windows_nll, Scoring};
    for fam in ["mixtral", "deepseek_v2"] {
        let ckpt = Checkpoint::open(&fixture(fam), &Device::Cpu).unwrap();
        let model = ServeModel::load(&ckpt, Some(WeightFormat::F32)).unwrap();
        let vocab = model.config.vocab_size as u32;
        let tokens: Vec<u32> = (0..40).map(|i| (i * 29 + 3) % vocab).collect();
        let windows: Vec<&[u32]> = vec![&tokens[0..9], &tokens[9..29], &tokens[29..31]];
        let kv = Some(KvDtype::F32);
        let (prompts, n) = windows_nll(&model, &windows, 2, kv, Scoring::Prompts).unwrap();
        let (decoded, m) = windows_nll(&model, &windows, 2, kv, Scoring::Decoded).unwrap();
        assert_eq!((n, m), (8 + 19 + 1, 8 + 19 + 1));
        assert!(
            (decoded - prompts).abs() <= 1e-5 * prompts,
            "{fam}: {decoded} decoded, {prompts} as prompts"
        );
        // Windows one by one give the same sums.
        let (alone, _) = windows_nll(&model, &windows, 1, kv, Scoring::Decoded).unwrap();
        assert!((alone - decoded).abs() <= 1e-5 * decoded, "{fam}");
        let short: Vec<&[u32]> = vec![&tokens[0..5], &tokens[5..6]];
        assert!(windows_nll(&model, &short, 2, kv, Scoring::Decoded).is_err());
        assert!(windows_nll(&model, &short, 2, kv, Scoring::Prompts).is_err());
    }
}
