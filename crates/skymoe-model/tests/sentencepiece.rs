//! SentencePiece tokenizers: `tokenizer.model` files agree with the `sentencepiece` library and
//! GGUF `llama` vocabularies agree with llama.cpp, on the cases of
//! `fixtures/reference/sentencepiece/<model>/cases.json` (written by
//! tools/reference/make_tokenizer_fixtures.py); corrupt input gives clear errors.

mod common;

use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::{self, Value};
use common::fixtures;
use skymoe_model::tokenizer::{copy_tokenizer_files, TextStream};
use skymoe_model::Tokenizer;

const MODELS: [&str; 3] = ["bpe", "unigram", "unigram_unk"];

fn dir(name: &str) -> PathBuf {
    fixtures().join("sentencepiece").join(name)
}

struct Case {
    text: String,
    spm_ids: Vec<u32>,
    spm_decoded: String,
    /// llama.cpp's ids, ids with BOS and decoding, where the model has a GGUF file.
    gguf: Option<(Vec<u32>, Vec<u32>, String)>,
}

fn ids(v: &serde_json::Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

fn cases(name: &str) -> Vec<Case> {
    let text = std::fs::read_to_string(dir(name).join("cases.json")).unwrap();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .map(|c| Case {
            text: c["text"].as_str().unwrap().into(),
            spm_ids: ids(&c["spm_ids"]),
            spm_decoded: c["spm_decoded"].as_str().unwrap().into(),
            gguf: c.get("gguf_ids").map(|g| {
                (
                    ids(g),
                    ids(&c["gguf_ids_bos"]),
                    c["gguf_decoded"].as_str().unwrap().into(),
                )
            }),
        })
        .collect()
}

#[test]
fn tokenizer_model_matches_sentencepiece() {
    let mut failures = Vec::new();
    let mut checked = 0;
    for name in MODELS {
        let d = dir(name);
        assert!(!d.join("tokenizer.json").exists());
        let tok = Tokenizer::for_model(&d, None).unwrap();
        assert_eq!(tok.bos_to_add, Some(1), "{name}");
        assert_eq!(tok.eos_to_add, None, "{name}");
        assert_eq!(tok.eos_ids, vec![2], "{name}");
        let cases = cases(name);
        assert!(cases.len() >= 25);
        for c in cases {
            checked += 1;
            let got = tok.encode_plain(&c.text).unwrap();
            if got != c.spm_ids {
                failures.push(format!(
                    "{name}: encode {:?}: got {got:?}, sentencepiece {:?}",
                    c.text, c.spm_ids
                ));
            }
            let with_bos = tok.encode_with_special_tokens(&c.text).unwrap();
            assert_eq!(with_bos.first(), Some(&1));
            assert_eq!(&with_bos[1..], &got[..]);
            // sentencepiece writes <unk> as " ⁇ "; transformers-style decoding skips it.
            if !c.spm_ids.contains(&0) {
                let text = tok.decode(&c.spm_ids).unwrap();
                if text != c.spm_decoded {
                    failures.push(format!(
                        "{name}: decode of {:?}: got {text:?}, sentencepiece {:?}",
                        c.text, c.spm_decoded
                    ));
                }
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {checked} cases differ:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn gguf_llama_vocabulary_matches_llama_cpp() {
    let mut failures = Vec::new();
    let mut checked = 0;
    // Only the byte-fallback models have a GGUF file (llama.cpp aborts on unknown characters
    // otherwise).
    for name in ["bpe", "unigram"] {
        let tok = Tokenizer::from_path(&dir(name).join("vocab.gguf")).unwrap();
        assert_eq!(tok.bos_to_add, Some(1), "{name}");
        assert_eq!(tok.eos_ids, vec![2], "{name}");
        for c in cases(name) {
            let (ids, ids_bos, decoded) = c.gguf.expect("llama.cpp reference");
            checked += 1;
            let got = tok.encode_plain(&c.text).unwrap();
            if got != ids {
                failures.push(format!(
                    "{name}: encode {:?}: got {got:?}, llama.cpp {ids:?}",
                    c.text
                ));
            }
            let with_bos = tok.encode_prompt(&c.text).unwrap();
            if with_bos != ids_bos {
                failures.push(format!(
                    "{name}: encode with BOS {:?}: got {with_bos:?}, llama.cpp {ids_bos:?}",
                    c.text
                ));
            }
            let text = tok.decode(&ids).unwrap();
            if text != decoded {
                failures.push(format!(
                    "{name}: decode of {:?}: got {text:?}, llama.cpp {decoded:?}",
                    c.text
                ));
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {checked} cases differ:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn byte_fallback_round_trips_and_streams_whole_characters() {
    let tok = Tokenizer::for_model(&dir("bpe"), None).unwrap();
    let text = "Unseen: ꙮ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢, 日本語 and 🤖\ttabs\n  spaces  ";
    let ids = tok.encode_plain(text).unwrap();
    assert_eq!(tok.decode(&ids).unwrap(), text);
    let mut stream = TextStream::new();
    let mut out = String::new();
    for id in ids {
        if let Some(piece) = stream.push(&tok, id).unwrap() {
            assert!(!piece.contains('\u{FFFD}'));
            out.push_str(&piece);
        }
    }
    assert_eq!(out, text);
}

#[test]
fn user_defined_pieces_are_single_tokens() {
    let tok = Tokenizer::for_model(&dir("bpe"), None).unwrap();
    let sep = tok.inner().token_to_id("<sep>").unwrap();
    let ids = tok.encode_plain("a<sep>b").unwrap();
    assert!(ids.contains(&sep), "{ids:?}");
    // User-defined pieces are not special: decoding keeps them.
    assert_eq!(tok.decode(&ids).unwrap(), "a<sep>b");
}

#[test]
fn tokenizer_config_flags_and_added_tokens_apply() {
    let tmp = tempfile::tempdir().unwrap();
    copy_tokenizer_files(&dir("bpe"), tmp.path()).unwrap();
    let cfg_path = tmp.path().join("tokenizer_config.json");
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&cfg_path).unwrap()).unwrap();
    cfg["add_bos_token"] = false.into();
    cfg["add_eos_token"] = true.into();
    cfg["added_tokens_decoder"]["512"] = serde_json::json!({
        "content": "<|im_start|>", "special": true, "normalized": false,
        "lstrip": false, "rstrip": false, "single_word": false
    });
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();
    let tok = Tokenizer::for_model(tmp.path(), None).unwrap();
    assert_eq!(tok.bos_to_add, None);
    assert_eq!(tok.eos_to_add, Some(2));
    assert_eq!(tok.vocab_size(), 513);
    let ids = tok.encode_with_special_tokens("<|im_start|>hi").unwrap();
    assert_eq!(ids.first(), Some(&512));
    assert_eq!(ids.last(), Some(&2));
    // An added token whose id leaves a gap is an error, not a silent renumbering.
    cfg["added_tokens_decoder"]["600"] = serde_json::json!({"content": "<x>", "special": true});
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();
    let e = Tokenizer::for_model(tmp.path(), None)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("next free id"), "{e}");
}

fn corrupt_model_error(bytes: &[u8]) -> String {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::write(tmp.path().join("tokenizer.model"), bytes).unwrap();
    Tokenizer::for_model(tmp.path(), None)
        .err()
        .expect("a corrupt tokenizer.model must not load")
        .to_string()
}

#[test]
fn corrupt_tokenizer_model_is_a_clear_error() {
    let good = std::fs::read(dir("bpe").join("tokenizer.model")).unwrap();
    for cut in [1, 10, good.len() / 3, good.len() / 2, good.len() - 1] {
        let e = corrupt_model_error(&good[..cut]);
        assert!(e.contains("tokenizer.model"), "{e}");
        assert!(e.contains("SentencePiece"), "{e}");
    }
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let random: Vec<u8> = (0..4096)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 24) as u8
        })
        .collect();
    let e = corrupt_model_error(&random);
    assert!(e.contains("SentencePiece"), "{e}");
    // Flipping bytes anywhere never panics (errors or a different model are both fine).
    let charsmap_model = std::fs::read(dir("unigram").join("tokenizer.model")).unwrap();
    for (i, model) in [good, charsmap_model].iter().enumerate() {
        for k in 0..300usize {
            let mut m = model.clone();
            let at = (k * 7919 + i * 31) % m.len();
            m[at] ^= (k as u8) | 1;
            if let Ok(t) = skymoe_model::tokenizer::from_model_bytes(&m) {
                let _ = t.tokenizer.encode("Hello  wörld 123", false);
            }
        }
    }
}

fn write_gguf(path: &Path, entries: &[(&str, Value)]) {
    let meta: Vec<(&str, &Value)> = entries.iter().map(|(k, v)| (*k, v)).collect();
    let mut f = std::fs::File::create(path).unwrap();
    gguf_file::write(&mut f, &meta, &[]).unwrap();
}

#[test]
fn gguf_vocabulary_with_mismatched_scores_is_a_clear_error() {
    let tmp = tempfile::tempdir().unwrap();
    let tokens = |n: usize| Value::Array((0..n).map(|i| Value::String(format!("t{i}"))).collect());
    let scores = |n: usize| Value::Array((0..n).map(|i| Value::F32(-(i as f32))).collect());
    let path = tmp.path().join("bad.gguf");
    write_gguf(
        &path,
        &[
            ("general.architecture", Value::String("llama".into())),
            ("tokenizer.ggml.model", Value::String("llama".into())),
            ("tokenizer.ggml.tokens", tokens(4)),
            ("tokenizer.ggml.scores", scores(3)),
        ],
    );
    let e = Tokenizer::from_path(&path).err().unwrap().to_string();
    assert!(e.contains("4 tokens but 3 scores"), "{e}");
    // Mismatched token types, and a BOS id outside the vocabulary.
    write_gguf(
        &path,
        &[
            ("tokenizer.ggml.model", Value::String("llama".into())),
            ("tokenizer.ggml.tokens", tokens(4)),
            ("tokenizer.ggml.scores", scores(4)),
            (
                "tokenizer.ggml.token_type",
                Value::Array(vec![Value::I32(1); 5]),
            ),
        ],
    );
    let e = Tokenizer::from_path(&path).err().unwrap().to_string();
    assert!(e.contains("4 tokens but 5 token types"), "{e}");
    write_gguf(
        &path,
        &[
            ("tokenizer.ggml.model", Value::String("llama".into())),
            ("tokenizer.ggml.tokens", tokens(4)),
            ("tokenizer.ggml.bos_token_id", Value::U32(9)),
        ],
    );
    let e = Tokenizer::from_path(&path).err().unwrap().to_string();
    assert!(e.contains("bos_token_id = 9"), "{e}");
    // A well-formed minimal vocabulary loads.
    write_gguf(
        &path,
        &[
            ("tokenizer.ggml.model", Value::String("llama".into())),
            ("tokenizer.ggml.tokens", tokens(4)),
            ("tokenizer.ggml.scores", scores(4)),
        ],
    );
    assert_eq!(Tokenizer::from_path(&path).unwrap().vocab_size(), 4);
}

#[test]
fn pipelines_survive_a_tokenizer_json_round_trip() {
    // Upcycling and quantising a GGUF model write its tokenizer as tokenizer.json.
    let sources = [
        Tokenizer::for_model(&dir("bpe"), None).unwrap(),
        Tokenizer::for_model(&dir("unigram"), None).unwrap(),
        Tokenizer::from_path(&dir("bpe").join("vocab.gguf")).unwrap(),
        Tokenizer::from_path(&dir("unigram").join("vocab.gguf")).unwrap(),
    ];
    for tok in sources {
        let json = tok.inner().to_string(false).unwrap();
        let back: tokenizers::Tokenizer = json.parse().unwrap();
        for c in cases("bpe") {
            let a = tok.encode_plain(&c.text).unwrap();
            let b = back
                .encode(c.text.as_str(), false)
                .unwrap()
                .get_ids()
                .to_vec();
            assert_eq!(a, b, "{:?}", c.text);
            assert_eq!(tok.decode(&a).unwrap(), back.decode(&b, true).unwrap());
        }
    }
}
