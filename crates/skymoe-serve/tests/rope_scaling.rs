//! The served model with scaled rotary embeddings against transformers' logits (the fixtures
//! of tools/reference/make_rope_fixtures.py, configs for the weights of
//! fixtures/reference/llama), in one pass, chunked, and, for dynamic NTK, decoding through the
//! paged KV cache.

use std::path::PathBuf;

use candle_core::Device;
use skymoe_kernels::quant::WeightFormat;
use skymoe_model::{Checkpoint, ModelConfig};
use skymoe_serve::model::{LogitsFor, SeqChunk, ServeModel};

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

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/reference")
}

fn model(name: &str) -> ServeModel {
    let mut ckpt = Checkpoint::open(&fixtures().join("llama"), &Device::Cpu).unwrap();
    ckpt.config =
        ModelConfig::from_file(&fixtures().join("rope").join(name).join("config.json")).unwrap();
    ServeModel::load(&ckpt, Some(WeightFormat::F32)).unwrap()
}

/// `tokens`, `logits` and, if stored, `logits_cached` of a fixture.
fn reference(name: &str) -> (Vec<u32>, Vec<f32>, Option<Vec<f32>>) {
    let t = candle_core::safetensors::load(
        fixtures()
            .join("rope")
            .join(name)
            .join("reference.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    let tokens = t["tokens"]
        .to_vec1::<i64>()
        .unwrap()
        .into_iter()
        .map(|v| v as u32)
        .collect();
    let flat = |k: &str| {
        t.get(k)
            .map(|x| x.flatten_all().unwrap().to_vec1::<f32>().unwrap())
    };
    (tokens, flat("logits").unwrap(), flat("logits_cached"))
}

fn max_abs(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs()))
}

/// Run `tokens` as consecutive chunks of the given lengths through one sequence's cache, and
/// return the logits of every position.
fn run_chunks(model: &ServeModel, tokens: &[u32], lens: &[usize]) -> Vec<f32> {
    let mut kv = model.new_kv_cache(4, 16, None);
    let blocks = kv.allocate(kv.blocks_for(tokens.len())).unwrap();
    let mut out = Vec::new();
    let mut start = 0;
    for &len in lens {
        let chunk = SeqChunk {
            tokens: &tokens[start..start + len],
            start,
            blocks: &blocks,
            logits: LogitsFor::All,
        };
        out.extend(model.forward(&[chunk], &mut kv).unwrap().remove(0));
        start += len;
    }
    assert_eq!(start, tokens.len());
    out
}

#[test]
fn every_rope_type_matches_transformers() {
    for name in TYPES {
        let m = model(name);
        let (tokens, want, _) = reference(name);
        let got = run_chunks(&m, &tokens, &[tokens.len()]);
        let d = max_abs(&got, &want);
        eprintln!("{name}: max |Δlogit| = {d:e}");
        assert!(d <= TOL, "{name}: max |Δlogit| = {d:e} > {TOL:e}");
        if name != "dynamic" {
            // Chunked prefill and decoding give the same logits for length-independent types.
            let mut lens = vec![10, 6];
            lens.extend(std::iter::repeat_n(1, tokens.len() - 16));
            let d = max_abs(&run_chunks(&m, &tokens, &lens), &want);
            assert!(d <= TOL, "{name}: chunked run differs by {d:e}");
        }
    }
}

/// Dynamic NTK through the paged cache: a 12-token prefill and then one token per step, each
/// step rotated with the base for its own end, equals transformers' cached generation.
#[test]
fn dynamic_ntk_decoding_matches_transformers_cached_generation() {
    let m = model("dynamic");
    let (tokens, full, cached) = reference("dynamic");
    let cached = cached.expect("logits_cached");
    let mut lens = vec![12];
    lens.extend(std::iter::repeat_n(1, tokens.len() - 12));
    let got = run_chunks(&m, &tokens, &lens);
    let d = max_abs(&got, &cached);
    eprintln!("dynamic (cached): max |Δlogit| = {d:e}");
    assert!(d <= TOL, "cached dynamic decoding differs by {d:e}");
    assert!(max_abs(&got, &full) > 1e-3);
    assert_eq!(m.context_length(), 32);
}

/// Two sequences of different lengths in one batch each get their own dynamic base.
#[test]
fn dynamic_ntk_batches_sequences_of_different_lengths() {
    let m = model("dynamic");
    let (tokens, full, _) = reference("dynamic");
    let short = &tokens[..12];
    let alone_short = run_chunks(&m, short, &[12]);
    let mut kv = m.new_kv_cache(4, 16, None);
    let a = kv.allocate(kv.blocks_for(tokens.len())).unwrap();
    let b = kv.allocate(kv.blocks_for(short.len())).unwrap();
    let out = m
        .forward(
            &[
                SeqChunk {
                    tokens: &tokens,
                    start: 0,
                    blocks: &a,
                    logits: LogitsFor::All,
                },
                SeqChunk {
                    tokens: short,
                    start: 0,
                    blocks: &b,
                    logits: LogitsFor::All,
                },
            ],
            &mut kv,
        )
        .unwrap();
    assert!(max_abs(&out[0], &full) <= TOL);
    assert!(max_abs(&out[1], &alone_short) <= 1e-6);
}
