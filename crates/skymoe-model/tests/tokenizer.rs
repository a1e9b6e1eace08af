//! Tokenizers: `tokenizer.json` and the GGUF-embedded tokenizer agree with the Python
//! `tokenizers` reference on the fixture cases, and decoding round-trips.

mod common;

use candle_core::Device;
use common::fixtures;
use skymoe_model::tokenizer::TextStream;
use skymoe_model::{Checkpoint, Tokenizer};

fn cases() -> Vec<(String, Vec<u32>)> {
    let v: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("tokenizer_cases.json")).unwrap(),
    )
    .unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (
                c["text"].as_str().unwrap().to_string(),
                c["ids"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|x| x.as_u64().unwrap() as u32)
                    .collect(),
            )
        })
        .collect()
}

#[test]
fn tokenizer_json_matches_python_tokenizers() {
    let tok = Tokenizer::for_model(&fixtures().join("llama"), None).unwrap();
    let cases = cases();
    assert!(cases.len() >= 5);
    for (text, ids) in cases {
        assert_eq!(
            tok.encode_plain(&text).unwrap(),
            ids,
            "encoding of {text:?}"
        );
        assert_eq!(tok.decode(&ids).unwrap(), text, "decoding of {text:?}");
    }
}

#[test]
fn gguf_embedded_tokenizer_matches_tokenizer_json() {
    let ckpt = Checkpoint::open(&fixtures().join("gguf/llama-f32.gguf"), &Device::Cpu).unwrap();
    let tok = Tokenizer::for_model(&ckpt.path, ckpt.gguf_metadata.as_ref()).unwrap();
    assert_eq!(tok.eos_ids, vec![1]);
    for (text, ids) in cases() {
        assert_eq!(
            tok.encode_plain(&text).unwrap(),
            ids,
            "encoding of {text:?}"
        );
        assert_eq!(tok.decode(&ids).unwrap(), text, "decoding of {text:?}");
    }
}

#[test]
fn text_stream_never_splits_characters() {
    let tok = Tokenizer::for_model(&fixtures().join("llama"), None).unwrap();
    let text = "café naïve 日本 done";
    let ids = tok.encode_plain(text).unwrap();
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
