//! `skymoe tokenizer encode` / `decode` on SentencePiece model directories and GGUF files:
//! the ids equal the references of `fixtures/reference/sentencepiece/*/cases.json` with the
//! special tokens the tokenizer config asks for, decoding round-trips, and bad input fails
//! cleanly.

mod common;

use std::path::PathBuf;

use common::{assert_clean_failure, fixtures, skymoe};

fn spm_dir(name: &str) -> PathBuf {
    fixtures().join("sentencepiece").join(name)
}

fn run_ok(args: &[&str]) -> String {
    let out = skymoe(args);
    assert!(
        out.status.success(),
        "skymoe {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn encode(model: &str, text: &str) -> Vec<u32> {
    let out = run_ok(&["tokenizer", "encode", "--model", model, "--text", text]);
    serde_json::from_str(out.trim_end()).unwrap()
}

fn decode(model: &str, ids: &[u32]) -> String {
    let list: Vec<String> = ids.iter().map(u32::to_string).collect();
    let out = run_ok(&[
        "tokenizer",
        "decode",
        "--model",
        model,
        "--ids",
        &list.join(","),
    ]);
    out.strip_suffix('\n').unwrap_or(&out).to_string()
}

fn cases(name: &str) -> Vec<serde_json::Value> {
    let text = std::fs::read_to_string(spm_dir(name).join("cases.json")).unwrap();
    serde_json::from_str::<serde_json::Value>(&text)
        .unwrap()
        .as_array()
        .unwrap()
        .clone()
}

fn ids(v: &serde_json::Value) -> Vec<u32> {
    serde_json::from_value(v.clone()).unwrap()
}

#[test]
fn encode_and_decode_a_tokenizer_model_directory() {
    let dir = spm_dir("bpe");
    let model = dir.to_str().unwrap();
    for c in cases("bpe").iter().filter(|c| {
        let t = c["text"].as_str().unwrap();
        t.contains("Romeo") || t.contains("日本") || t.contains("  ")
    }) {
        let text = c["text"].as_str().unwrap();
        // add_bos_token: true, add_eos_token: false.
        let mut expected = vec![1];
        expected.extend(ids(&c["spm_ids"]));
        assert_eq!(encode(model, text), expected, "{text:?}");
        assert_eq!(decode(model, &expected), text, "{text:?}");
    }
}

#[test]
fn encode_and_decode_a_gguf_file() {
    let file = spm_dir("bpe").join("vocab.gguf");
    let model = file.to_str().unwrap();
    let c = cases("bpe")
        .into_iter()
        .find(|c| c["text"] == "before <sep> after")
        .unwrap();
    let with_bos = ids(&c["gguf_ids_bos"]);
    assert_eq!(encode(model, "before <sep> after"), with_bos);
    assert_eq!(
        decode(model, &ids(&c["gguf_ids"])),
        c["gguf_decoded"].as_str().unwrap()
    );
}

#[test]
fn add_eos_token_is_honoured() {
    let tmp = tempfile::tempdir().unwrap();
    skymoe_model::tokenizer::copy_tokenizer_files(&spm_dir("unigram"), tmp.path()).unwrap();
    let cfg = tmp.path().join("tokenizer_config.json");
    let text = std::fs::read_to_string(&cfg)
        .unwrap()
        .replace("\"add_eos_token\": false", "\"add_eos_token\": true");
    std::fs::write(&cfg, text).unwrap();
    let got = encode(tmp.path().to_str().unwrap(), "Hello world");
    assert_eq!(got.first(), Some(&1));
    assert_eq!(got.last(), Some(&2));
    assert_eq!(decode(tmp.path().to_str().unwrap(), &got), "Hello world");
}

#[test]
fn bad_input_fails_cleanly() {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::write(
        tmp.path().join("tokenizer.model"),
        b"\x0a\xff\xff\xff\x0fgarbage",
    )
    .unwrap();
    let out = skymoe(&[
        "tokenizer",
        "encode",
        "--model",
        tmp.path().to_str().unwrap(),
        "--text",
        "hi",
    ]);
    assert_clean_failure(&out, "invalid SentencePiece model");
    let model = spm_dir("bpe");
    let out = skymoe(&[
        "tokenizer",
        "decode",
        "--model",
        model.to_str().unwrap(),
        "--ids",
        "1,x,3",
    ]);
    assert_clean_failure(&out, "invalid token id `x`");
    let out = skymoe(&[
        "tokenizer",
        "decode",
        "--model",
        model.to_str().unwrap(),
        "--ids",
        "99999",
    ]);
    assert_clean_failure(&out, "outside the vocabulary");
    let empty = tempfile::tempdir().unwrap();
    let out = skymoe(&[
        "tokenizer",
        "encode",
        "--model",
        empty.path().to_str().unwrap(),
        "--text",
        "hi",
    ]);
    assert_clean_failure(&out, "no tokenizer.json or tokenizer.model");
}

#[test]
fn upcycling_a_tokenizer_model_directory_carries_the_tokenizer() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("dense");
    std::fs::create_dir(&src).unwrap();
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(fixtures().join("llama").join(f), src.join(f)).unwrap();
    }
    skymoe_model::tokenizer::copy_tokenizer_files(&spm_dir("bpe"), &src).unwrap();
    assert!(!src.join("tokenizer.json").exists());
    let out = tmp.path().join("moe");
    let o = skymoe(&[
        "upcycle",
        "--from",
        src.to_str().unwrap(),
        "--experts",
        "2",
        "--top-k",
        "1",
        "--arch",
        "mixtral",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    for f in ["tokenizer.model", "tokenizer_config.json"] {
        assert!(out.join(f).is_file(), "{f} missing from the upcycled model");
    }
    let text = "O Romeo, Romeo! 日本";
    assert_eq!(
        encode(out.to_str().unwrap(), text),
        encode(src.to_str().unwrap(), text)
    );
}
