//! GGUF files served as stored: llama.cpp's quantised blocks (Q4_K_M, Q5_K_M and their Q5_0/Q8_0
//! fallbacks, Q8_0, Q4_0, Q4_1; fixtures made by `tools/reference/make_gguf_quant_fixtures.py`)
//! are served from the file's memory map, and give the logits of an f32 model of the same
//! file's dequantised weights with f32 activations; with 8-bit activations (llama.cpp's
//! arithmetic, what decode uses) they stay within the activations' rounding of them. The
//! logits a user gets (the automatic choice of activations, an f16 KV cache) follow llama.cpp's
//! own logits on the same files, as a prompt and one token at a time.

use std::path::PathBuf;
use std::sync::Mutex;

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

/// Held by the tests that choose the ggml activations (a process-wide setting).
static ACTIVATIONS: Mutex<()> = Mutex::new(());

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

/// [`max_rel`] of each position's logits (`vocab` per position).
fn position_errors(a: &[f32], b: &[f32], vocab: usize) -> Vec<f32> {
    a.chunks(vocab)
        .zip(b.chunks(vocab))
        .map(|(a, b)| max_rel(a, b))
        .collect()
}

/// How far rounded activations move the logits `got` from `want`: the largest
/// [`position_errors`] in a dense model; their mean in an MoE, where a rounding may flip an
/// expert choice and so move one position's logits further.
fn rounding_error(moe: bool, got: &[f32], want: &[f32], vocab: usize) -> f32 {
    let e = position_errors(got, want, vocab);
    if moe {
        e.iter().sum::<f32>() / e.len() as f32
    } else {
        e.iter().fold(0f32, |m, &v| m.max(v))
    }
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
    let _activations = ACTIVATIONS.lock().unwrap_or_else(|e| e.into_inner());
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
        let moe = stored.config.moe.is_some();
        for (k, n) in [1, 12, 40, 100].into_iter().enumerate() {
            let got = logits(&stored, &tokens(n, vocab));
            let e = rounding_error(moe, &got, &f32_logits[k].0, vocab);
            eprintln!("{path} ({n} tokens, 8-bit activations): relative logit error {e:.2e}");
            assert!(
                e < INT8_TOLERANCE,
                "{path} ({n} tokens, 8-bit activations): relative logit error {e}"
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
            let e = rounding_error(moe, &prefill, &f32_logits[3].0, vocab);
            assert!(e < INT8_TOLERANCE, "{path}: {e}");
        }
    }
}

/// llama.cpp's logits (llama-cpp-python 0.3.36 through `make_gguf_quant_fixtures.py`) for
/// `tokens` of a quantised fixture, as a prompt and one token at a time, with each KV cache.
struct LlamaCppLogits {
    tokens: Vec<u32>,
    /// With llama.cpp's default f16 KV cache: (prompt, one token at a time).
    f16_cache: (Vec<f32>, Vec<f32>),
    /// With an f32 KV cache and no flash attention: (prompt, one token at a time).
    f32_cache: (Vec<f32>, Vec<f32>),
}

fn llama_cpp_logits(path: &str) -> LlamaCppLogits {
    let all = candle_core::safetensors::load(
        fixture("gguf_quant/llama_cpp_logits.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    let stem = path.rsplit('/').next().unwrap().trim_end_matches(".gguf");
    let flat = |what: &str| -> Vec<f32> {
        all[&format!("{stem}.{what}")]
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap()
    };
    let tokens = all[&format!("{stem}.tokens")]
        .to_vec1::<i64>()
        .unwrap()
        .into_iter()
        .map(|t| t as u32)
        .collect();
    LlamaCppLogits {
        tokens,
        f16_cache: (flat("prefill"), flat("decode")),
        f32_cache: (flat("prefill_f32kv"), flat("decode_f32kv")),
    }
}

/// Logits of `tokens` as one prompt and one token at a time, each from a fresh cache of
/// `kv` (the model's default where `None`).
fn prompt_and_steps(model: &ServeModel, tokens: &[u32], kv: Option<KvDtype>) -> [Vec<f32>; 2] {
    let n = tokens.len();
    let mut cache = model.new_kv_cache(8, 16, kv);
    let blocks = cache.allocate(cache.blocks_for(n)).unwrap();
    let prompt = SeqChunk {
        tokens,
        start: 0,
        blocks: &blocks,
        logits: LogitsFor::All,
    };
    let prefill = model.forward(&[prompt], &mut cache).unwrap().remove(0);
    let mut cache = model.new_kv_cache(8, 16, kv);
    let blocks = cache.allocate(cache.blocks_for(n)).unwrap();
    let mut steps = Vec::with_capacity(prefill.len());
    for i in 0..n {
        let step = SeqChunk {
            tokens: &tokens[i..i + 1],
            start: i,
            blocks: &blocks,
            logits: LogitsFor::Last,
        };
        steps.extend(model.forward(&[step], &mut cache).unwrap().remove(0));
    }
    [prefill, steps]
}

/// The quantised files give llama.cpp's own logits. With 8-bit activations and an f32 KV
/// cache both engines do the same arithmetic (llama.cpp's activation blocks and scales, its
/// integer products; f32 attention), so the logits agree up to the order of float additions,
/// as a prompt and one token at a time. As a user serves them (the automatic activations, an
/// f16 KV cache, as llama.cpp's default) the first position still agrees that closely; later
/// ones differ by llama.cpp's f16 rounding of the queries and attention weights, which the
/// next product's 8-bit rounding can carry to a step of its activations.
#[test]
fn stored_ggml_logits_follow_llama_cpp() {
    let _activations = ACTIVATIONS.lock().unwrap_or_else(|e| e.into_inner());
    for path in QUANTISED {
        let want = llama_cpp_logits(path);
        let ckpt = Checkpoint::open(&fixture(path), &Device::Cpu).unwrap();
        let model = ServeModel::load(&ckpt, None).unwrap();
        let vocab = model.config.vocab_size;
        let n = want.tokens.len();
        assert_eq!(want.f32_cache.0.len(), n * vocab, "{path}");
        set_activations(GgmlActivations::Int8);
        let same = prompt_and_steps(&model, &want.tokens, Some(KvDtype::F32));
        set_activations(GgmlActivations::Auto);
        let served = prompt_and_steps(&model, &want.tokens, None);
        // Whether the automatic choice takes 8-bit activations for every product of the
        // prompt and the steps here (portable code keeps f32 ones).
        let auto_int8 = GgmlType::ALL
            .iter()
            .all(|&ty| uses_int8(Isa::detect(), ty, 1) && uses_int8(Isa::detect(), ty, n));
        for (k, what) in ["prompt", "one token at a time"].into_iter().enumerate() {
            let theirs = [&want.f32_cache.0, &want.f32_cache.1][k];
            let e = max_rel(&same[k], theirs);
            eprintln!("{path} ({what}, f32 caches): max relative logit error {e:.2e}");
            assert!(
                e < SAME_ARITHMETIC_TOLERANCE,
                "{path} ({what}, f32 caches): {e}"
            );
            let theirs = [&want.f16_cache.0, &want.f16_cache.1][k];
            let per_position = position_errors(&served[k], theirs, vocab);
            let mean = per_position.iter().sum::<f32>() / n as f32;
            eprintln!(
                "{path} ({what}, f16 caches): max relative logit error {:.2e} at the first \
                 position, {mean:.2e} on average",
                per_position[0]
            );
            let first_bound = if auto_int8 {
                SAME_ARITHMETIC_TOLERANCE
            } else {
                INT8_TOLERANCE
            };
            assert!(
                per_position[0] < first_bound,
                "{path} ({what}, f16 caches): {}",
                per_position[0]
            );
            assert!(mean < INT8_TOLERANCE, "{path} ({what}, f16 caches): {mean}");
        }
    }
}

/// Largest relative logit error against llama.cpp doing the same arithmetic: float additions
/// in another order.
const SAME_ARITHMETIC_TOLERANCE: f32 = 1e-5;

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
