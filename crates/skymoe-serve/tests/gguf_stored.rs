//! GGUF files served as stored: llama.cpp's quantised blocks (Q4_K_M, Q5_K_M and their Q5_0/Q8_0
//! fallbacks, Q8_0, Q4_0, Q4_1; fixtures made by `tools/reference/make_gguf_quant_fixtures.py`)
//! are served from the file's memory map, and give the logits of an f32 model of the same
//! file's dequantised weights with f32 activations; with 8-bit activations (llama.cpp's
//! arithmetic, what decode uses) they stay within the activations' rounding of them.

use std::path::PathBuf;

use candle_core::Device;
use skymoe_kernels::ggml::{set_activations, uses_int8, GgmlActivations, GgmlType};
use skymoe_kernels::quant::{Isa, MatrixFormat, WeightFormat};
use skymoe_model::weights::WeightSource;
use skymoe_model::Checkpoint;
use skymoe_serve::kv_cache::KvDtype;
use skymoe_serve::model::{stored_format, LogitsFor, SeqChunk, ServeModel};

fn fixture(path: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../fixtures/reference")
        .join(path)
}

/// Every quantised GGUF fixture: (path, whether it has a 256-wide k-quant mix).
const QUANTISED: [&str; 7] = [
    "gguf_quant/llama-q4_k_m.gguf",
    "gguf_quant/mixtral-q4_k_m.gguf",
    "gguf_quant/wide-q4_k_m.gguf",
    "gguf_quant/wide-q5_k_m.gguf",
    "gguf/llama-q8_0.gguf",
    "gguf/llama-q4_0.gguf",
    "gguf/llama-q4_1.gguf",
];

fn logits(model: &ServeModel, tokens: &[u32]) -> Vec<f32> {
    // An f32 cache for both models, so that only the weights' arithmetic differs.
    let mut kv = model.new_kv_cache(8, 16, Some(KvDtype::F32));
    let blocks = kv.allocate(kv.blocks_for(tokens.len())).unwrap();
    let chunk = SeqChunk {
        tokens,
        start: 0,
        blocks: &blocks,
        logits: LogitsFor::All,
    };
    model.forward(&[chunk], &mut kv).unwrap().remove(0)
}

fn max_rel(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    let scale = b.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-6);
    a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs())) / scale
}

fn tokens(n: usize, vocab: usize) -> Vec<u32> {
    (0..n).map(|i| ((i * 37 + 5) % vocab) as u32).collect()
}

/// Bytes of the file's tensors in the ggml types the kernels serve.
fn ggml_tensor_bytes(ckpt: &Checkpoint) -> usize {
    ckpt.weights
        .names()
        .iter()
        .filter_map(|n| ckpt.weights.gguf_raw(n).unwrap())
        .filter(|r| GgmlType::from_id(r.ggml_type).is_some())
        .map(|r| r.bytes)
        .sum()
}

#[test]
fn stored_ggml_logits_equal_the_dequantised_f32_model() {
    for path in QUANTISED {
        let ckpt = Checkpoint::open(&fixture(path), &Device::Cpu).unwrap();
        let stored = ServeModel::load(&ckpt, None).unwrap();
        let f32m = ServeModel::load(&ckpt, Some(WeightFormat::F32)).unwrap();
        assert_eq!(f32m.format, WeightFormat::F32);
        // Matrices not served as ggml blocks would be f16; GGUF quantised models get an f16
        // cache by default, as in llama.cpp.
        assert_eq!(stored.format, WeightFormat::F16, "{path}");
        assert_eq!(stored_format(&ckpt), WeightFormat::F16, "{path}");
        assert_eq!(stored.kv_dtype(None), KvDtype::F16, "{path}");
        // Every projection, the embedding and the LM head are the file's blocks.
        for (name, m) in stored.weight_matrices() {
            assert!(m.format().is_ggml(), "{path}: {name} is {}", m.format());
            assert!(m.try_data().is_none());
        }
        for (name, m) in f32m.weight_matrices() {
            assert_eq!(m.format(), WeightFormat::F32, "{path}: {name}");
        }
        // Resident weight bytes: exactly the file's quantised tensors.
        assert_eq!(stored.weight_bytes(), ggml_tensor_bytes(&ckpt), "{path}");
        assert!(stored.weight_bytes() * 3 < f32m.weight_bytes(), "{path}");
        let vocab = stored.config.vocab_size;
        // f32 activations: the stored blocks give the f32 model's logits, i.e. the weights are
        // read exactly as gguf dequantises them (12 positions run the fused kernels, 40 and
        // 100 the dequantised tiles and a GEMM).
        set_activations(GgmlActivations::F32);
        let mut f32_logits = Vec::new();
        for n in [1, 12, 40, 100] {
            let t = tokens(n, vocab);
            let want = logits(&f32m, &t);
            let got = logits(&stored, &t);
            let e = max_rel(&got, &want);
            eprintln!("{path} ({n} tokens, f32 activations): max relative logit error {e:.2e}");
            assert!(
                e < 1e-4,
                "{path} ({n} tokens): max relative logit error {e}"
            );
            f32_logits.push((want, got));
        }
        // 8-bit activations (every product quantises its activation rows as llama.cpp does):
        // the logits move by the activations' rounding only.
        set_activations(GgmlActivations::Int8);
        let mut int8_logits = Vec::new();
        for (k, n) in [1, 12, 40, 100].into_iter().enumerate() {
            let got = logits(&stored, &tokens(n, vocab));
            let e = max_rel(&got, &f32_logits[k].0);
            eprintln!("{path} ({n} tokens, 8-bit activations): max relative logit error {e:.2e}");
            assert!(
                e < INT8_TOLERANCE,
                "{path} ({n} tokens, 8-bit activations): max relative logit error {e}"
            );
            int8_logits.push(got);
        }
        // The automatic choice: 8-bit activations for one token (decode), f32 ones for a
        // prefill of 100 (beyond `int8_max_rows` of every type) in a dense model; an MoE's
        // experts see fewer rows each and may take 8-bit ones.
        set_activations(GgmlActivations::Auto);
        // (Portable code, e.g. under SKYMOE_ISA=scalar, keeps f32 activations.)
        let decode = if uses_int8(Isa::detect(), GgmlType::Q8_0, 1) {
            &int8_logits[0]
        } else {
            &f32_logits[0].1
        };
        assert_eq!(&logits(&stored, &tokens(1, vocab)), decode, "{path}");
        let prefill = logits(&stored, &tokens(100, vocab));
        // ggml blocks with many rows on AVX512-BF16 take bf16 activations (exact codes, their
        // multipliers and offsets in f32): the logits move by the activations' rounding only.
        if skymoe_kernels::quant::uses_bf16_tiles(Isa::detect(), 100) {
            let e = max_rel(&prefill, &f32_logits[3].0);
            eprintln!("{path} (100 tokens, bf16 activations): max relative logit error {e:.2e}");
            assert!(e < BF16_TOLERANCE, "{path}: {e}");
        } else if stored.config.moe.is_none() {
            assert_eq!(prefill, f32_logits[3].1, "{path}");
        } else {
            assert!(
                max_rel(&prefill, &f32_logits[3].0) < INT8_TOLERANCE,
                "{path}"
            );
        }
    }
}

/// Largest relative logit error 8-bit activations may add (SmolLM2-sized fixtures; see
/// `skymoe_kernels::ggml` for the arithmetic).
const INT8_TOLERANCE: f32 = 5e-2;

/// Largest relative logit error bf16 activations may add (at most 2⁻⁹ relative per value,
/// against about 2⁻⁸ of the block's largest for 8-bit ones).
const BF16_TOLERANCE: f32 = 2e-2;

#[test]
fn k_quant_mixes_stack_into_row_segments() {
    let ckpt = Checkpoint::open(&fixture("gguf_quant/wide-q4_k_m.gguf"), &Device::Cpu).unwrap();
    let model = ServeModel::load(&ckpt, None).unwrap();
    let mats: std::collections::HashMap<String, _> = model.weight_matrices().into_iter().collect();
    // llama.cpp's Q4_K_M: q and k in Q4_K, v in Q6_K; gate and up in Q4_K, down in Q6_K.
    let qkv = mats["layers.0.qkv"];
    assert_eq!(qkv.format(), MatrixFormat::GgmlMixed);
    let types: Vec<GgmlType> = qkv
        .ggml_segments()
        .unwrap()
        .iter()
        .map(|s| s.ty())
        .collect();
    assert_eq!(types, [GgmlType::Q4K, GgmlType::Q4K, GgmlType::Q6K]);
    assert_eq!(
        mats["layers.0.mlp.gate_up"].format(),
        MatrixFormat::Ggml(GgmlType::Q4K)
    );
    assert_eq!(
        mats["layers.0.mlp.down"].format(),
        MatrixFormat::Ggml(GgmlType::Q6K)
    );
    let formats = model.weight_formats();
    assert!(formats.contains_key("gguf:mixed") && formats.contains_key("gguf:Q6_K"));
    let q5 = Checkpoint::open(&fixture("gguf_quant/wide-q5_k_m.gguf"), &Device::Cpu).unwrap();
    let model = ServeModel::load(&q5, None).unwrap();
    let mats: std::collections::HashMap<String, _> = model.weight_matrices().into_iter().collect();
    assert_eq!(
        mats["layers.0.mlp.gate_up"].format(),
        MatrixFormat::Ggml(GgmlType::Q5K)
    );
}

/// The served blocks are the file's bytes in the memory map (no copy), except the q/k rows,
/// which are un-permuted into a copy.
#[test]
fn weights_are_read_in_place_from_the_map() {
    for (path, matrix, tensor) in [
        (
            "gguf_quant/wide-q4_k_m.gguf",
            "layers.0.mlp.down",
            "model.layers.0.mlp.down_proj.weight",
        ),
        (
            "gguf_quant/mixtral-q4_k_m.gguf",
            "layers.1.experts.2.down",
            "model.layers.1.block_sparse_moe.experts.2.w2.weight",
        ),
    ] {
        let ckpt = Checkpoint::open(&fixture(path), &Device::Cpu).unwrap();
        let WeightSource::Gguf(g) = &ckpt.weights else {
            panic!("{path} is not read as GGUF");
        };
        let raw = g.raw(tensor).unwrap().unwrap();
        assert_eq!(raw.permuted_heads, None);
        let model = ServeModel::load(&ckpt, None).unwrap();
        let m = model
            .weight_matrices()
            .into_iter()
            .find(|(n, _)| n == matrix)
            .unwrap()
            .1;
        let [seg] = m.ggml_segments().unwrap() else {
            panic!("{matrix}: one segment expected");
        };
        assert_eq!(seg.storage_bytes(), raw.bytes);
        assert_eq!(
            seg.blocks().as_ptr(),
            g.file_bytes()[raw.offset..].as_ptr(),
            "{path}: {matrix} is not read in place"
        );
        let q = g
            .raw("model.layers.0.self_attn.q_proj.weight")
            .unwrap()
            .unwrap();
        assert_eq!(q.permuted_heads, Some(model.config.num_attention_heads));
        assert_eq!(q.row_order().len(), q.shape[0]);
    }
}

/// Files in float types (and, alike, ggml types the kernels do not serve) load dequantised,
/// in the format of the file's floats.
#[test]
fn float_gguf_files_fall_back_to_dequantised_formats() {
    for (path, format) in [
        ("gguf/llama-f32.gguf", WeightFormat::F32),
        ("gguf/mixtral-f16.gguf", WeightFormat::F16),
    ] {
        let ckpt = Checkpoint::open(&fixture(path), &Device::Cpu).unwrap();
        assert_eq!(stored_format(&ckpt), format, "{path}");
        let model = ServeModel::load(&ckpt, None).unwrap();
        assert_eq!(model.format, format);
        for (name, m) in model.weight_matrices() {
            assert_eq!(m.format(), format, "{path}: {name}");
        }
    }
}

/// A requested format re-quantises a quantised GGUF file as before.
#[test]
fn a_requested_format_requantises() {
    let ckpt = Checkpoint::open(&fixture("gguf_quant/llama-q4_k_m.gguf"), &Device::Cpu).unwrap();
    let model = ServeModel::load(&ckpt, Some(WeightFormat::Int8)).unwrap();
    for (name, m) in model.weight_matrices() {
        assert_eq!(m.format(), WeightFormat::Int8, "{name}");
    }
}
