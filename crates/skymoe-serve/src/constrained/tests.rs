//! Tests of constrained decoding: token tables of real tokenizers, and generations from random
//! logits that must always parse and validate.

use std::path::Path;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};
use skymoe_model::sampling::{Sampler, SamplingParams};
use skymoe_model::Tokenizer;

use super::*;

fn fixture(rel: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../fixtures/reference")
        .join(rel)
}

fn mixtral_tokenizer() -> Tokenizer {
    Tokenizer::from_path(&fixture("mixtral")).expect("the fixture tokenizer loads")
}

fn mixtral_vocab() -> ConstraintVocab {
    let tok = mixtral_tokenizer();
    let n = tok.vocab_size();
    ConstraintVocab::from_tokenizer(&tok, n, &[1]).expect("a vocabulary")
}

/// Generate under `c` from random logits (uniform in [-4, 4]) with `params`; returns the text
/// and whether the constraint finished within `max_tokens`.
fn generate(
    vocab: &ConstraintVocab,
    c: &mut Constraint,
    seed: u64,
    params: SamplingParams,
    max_tokens: usize,
) -> (String, bool) {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut sampler = Sampler::new(params, seed);
    let mut bytes = Vec::new();
    let n = vocab.logits_len();
    for _ in 0..max_tokens {
        let mut logits: Vec<f32> = (0..n).map(|_| rng.random_range(-4.0..4.0)).collect();
        match c.apply(&mut logits).expect("a mask") {
            Step::Finished => return (String::from_utf8(bytes).expect("UTF-8"), true),
            Step::Sample => {}
        }
        let mut t = sampler.sample(&logits);
        if !c.allows(t).expect("mask") {
            t = c.first_allowed().expect("mask").expect("some token");
        }
        c.commit(t).expect("an allowed token commits");
        if c.is_eos(t) {
            return (String::from_utf8(bytes).expect("UTF-8"), true);
        }
        bytes.extend_from_slice(vocab.token_bytes(t));
        if c.is_finished() {
            return (String::from_utf8(bytes).expect("UTF-8"), true);
        }
    }
    (String::from_utf8_lossy(&bytes).into_owned(), false)
}

fn sampled() -> SamplingParams {
    SamplingParams {
        temperature: 1.0,
        ..SamplingParams::default()
    }
}

/// A JSON-schema validator for the keywords these tests use (`type`, `properties`,
/// `required`, `additionalProperties`, `enum`, `const`, `minimum`, `maximum`, `minLength`,
/// `maxLength`, `items`, `minItems`, `maxItems`, `anyOf`, local `$ref`).
fn validate(root: &Value, schema: &Value, v: &Value) -> Result<(), String> {
    let Some(s) = schema.as_object() else {
        return Ok(());
    };
    if let Some(r) = s.get("$ref").and_then(Value::as_str) {
        let mut target = root;
        for part in r.trim_start_matches("#/").split('/') {
            target = &target[part];
        }
        return validate(root, target, v);
    }
    if let Some(any) = s.get("anyOf").and_then(Value::as_array) {
        if !any.iter().any(|a| validate(root, a, v).is_ok()) {
            return Err(format!("{v} matches no anyOf branch"));
        }
    }
    if let Some(e) = s.get("enum").and_then(Value::as_array) {
        if !e.contains(v) {
            return Err(format!("{v} not in enum"));
        }
    }
    if let Some(c) = s.get("const") {
        if c != v {
            return Err(format!("{v} != const {c}"));
        }
    }
    if let Some(t) = s.get("type").and_then(Value::as_str) {
        let ok = match t {
            "object" => v.is_object(),
            "array" => v.is_array(),
            "string" => v.is_string(),
            "integer" => v.is_i64() || v.is_u64(),
            "number" => v.is_number(),
            "boolean" => v.is_boolean(),
            "null" => v.is_null(),
            _ => true,
        };
        if !ok {
            return Err(format!("{v} is not of type {t}"));
        }
    }
    if let Some(n) = v.as_f64() {
        if let Some(m) = s.get("minimum").and_then(Value::as_f64) {
            if n < m {
                return Err(format!("{n} < {m}"));
            }
        }
        if let Some(m) = s.get("maximum").and_then(Value::as_f64) {
            if n > m {
                return Err(format!("{n} > {m}"));
            }
        }
    }
    if let Some(st) = v.as_str() {
        let len = st.chars().count() as u64;
        if s.get("minLength")
            .and_then(Value::as_u64)
            .is_some_and(|m| len < m)
        {
            return Err(format!("{st:?} too short"));
        }
        if s.get("maxLength")
            .and_then(Value::as_u64)
            .is_some_and(|m| len > m)
        {
            return Err(format!("{st:?} too long"));
        }
    }
    if let Some(a) = v.as_array() {
        let len = a.len() as u64;
        if s.get("minItems")
            .and_then(Value::as_u64)
            .is_some_and(|m| len < m)
        {
            return Err("too few items".into());
        }
        if s.get("maxItems")
            .and_then(Value::as_u64)
            .is_some_and(|m| len > m)
        {
            return Err("too many items".into());
        }
        if let Some(items) = s.get("items") {
            for x in a {
                validate(root, items, x)?;
            }
        }
    }
    if let Some(o) = v.as_object() {
        let props = s.get("properties").and_then(Value::as_object);
        if let Some(req) = s.get("required").and_then(Value::as_array) {
            for r in req.iter().filter_map(Value::as_str) {
                if !o.contains_key(r) {
                    return Err(format!("missing {r}"));
                }
            }
        }
        for (k, x) in o {
            match props.and_then(|p| p.get(k)) {
                Some(ps) => validate(root, ps, x)?,
                None => {
                    if s.get("additionalProperties") == Some(&Value::Bool(false)) {
                        return Err(format!("unexpected property {k}"));
                    }
                }
            }
        }
    }
    Ok(())
}

fn person_schema() -> Value {
    json!({
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 8},
            "age": {"type": "integer", "minimum": 0, "maximum": 150},
            "role": {"enum": ["admin", "user", "guest"]},
            "tags": {"type": "array", "items": {"type": "string", "maxLength": 4}, "maxItems": 3},
            "address": {"$ref": "#/$defs/Address"},
            "active": {"type": "boolean"}
        },
        "required": ["name", "age", "role", "tags", "address", "active"],
        "additionalProperties": false,
        "$defs": {
            "Address": {
                "type": "object",
                "properties": {"city": {"type": "string", "maxLength": 6}, "zip": {"type": "integer", "minimum": 10000, "maximum": 99999}},
                "required": ["city", "zip"],
                "additionalProperties": false
            }
        }
    })
}

#[test]
fn byte_level_token_bytes_match_decoding() {
    let tok = mixtral_tokenizer();
    let bytes = token_bytes(tok.inner());
    assert_eq!(bytes.len(), tok.vocab_size());
    // Special tokens carry the marker; every other token spells what decoding it gives.
    assert_eq!(bytes[0], b"\xff<s>");
    assert_eq!(bytes[1], b"\xff</s>");
    let mut checked = 0;
    for (id, b) in bytes.iter().enumerate().skip(2) {
        let text = tok.decode(&[id as u32]).expect("decodes");
        if let Ok(s) = std::str::from_utf8(b) {
            assert_eq!(s, text, "token {id}");
            checked += 1;
        }
    }
    assert!(checked > 100, "{checked}");
    // A byte-level piece for a space (`Ġ`) is a space.
    let space = tok.encode_plain(" a").expect("encodes");
    let joined: Vec<u8> = space
        .iter()
        .flat_map(|&t| bytes[t as usize].clone())
        .collect();
    assert_eq!(joined, b" a");
}

#[test]
fn sentencepiece_token_bytes_use_spaces_and_byte_fallback() {
    let tok = Tokenizer::from_path(&fixture("sentencepiece/bpe")).expect("loads");
    let bytes = token_bytes(tok.inner());
    let text = "Hello wörld 🙂";
    let ids = tok.encode_plain(text).expect("encodes");
    let joined: Vec<u8> = ids
        .iter()
        .flat_map(|&t| bytes[t as usize].clone())
        .collect();
    // The SentencePiece dummy prefix adds a leading space.
    assert_eq!(String::from_utf8(joined).expect("UTF-8").trim_start(), text);
    assert_eq!(byte_fallback("<0x0A>"), Some(b'\n'));
    assert_eq!(byte_fallback("<0xZZ>"), None);
    assert_eq!(byte_fallback("<0x0A0>"), None);
}

#[test]
fn json_schema_outputs_always_parse_and_validate() {
    let vocab = mixtral_vocab();
    let schema = person_schema();
    let base = vocab
        .compile(&Grammar::json_schema(schema.clone(), true))
        .expect("the schema compiles");
    for seed in 0..24 {
        let params = if seed % 3 == 0 {
            SamplingParams::default()
        } else {
            sampled()
        };
        let mut c = base.clone();
        let (text, done) = generate(&vocab, &mut c, seed, params, 2000);
        assert!(done, "seed {seed}: unfinished {text}");
        let v: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}"));
        validate(&schema, &schema, &v).unwrap_or_else(|e| panic!("seed {seed}: {e}: {text}"));
        assert!(!text.contains(' ') || text.contains("\" ") || v.to_string().contains(' '));
    }
}

#[test]
fn json_object_outputs_are_objects() {
    let vocab = mixtral_vocab();
    let base = vocab.compile(&Grammar::JsonObject).expect("compiles");
    let mut finished = 0;
    for seed in 0..16 {
        let mut c = base.clone();
        let (text, done) = generate(&vocab, &mut c, 100 + seed, sampled(), 4000);
        if !done {
            continue;
        }
        finished += 1;
        match serde_json::from_str::<Value>(&text) {
            Ok(v) => assert!(v.is_object(), "{text}"),
            // Valid JSON whose numbers overflow an f64 (`1e999`): serde_json refuses them.
            Err(e) if e.to_string().starts_with("number out of range") => {
                assert!(text.starts_with('{') && text.ends_with('}'), "{text}")
            }
            Err(e) => panic!("{e}: {text}"),
        }
    }
    assert!(finished >= 8, "only {finished} of 16 finished");
}

#[test]
fn lark_grammar_and_eos_only_when_complete() {
    let vocab = mixtral_vocab();
    let mut c = vocab
        .compile(&Grammar::Lark(
            r#"start: "yes" | "no" | "maybe" "!"*"#.into(),
        ))
        .expect("compiles");
    // Nothing has been generated: EOS (id 1) is not allowed yet.
    assert!(!c.allows(1).expect("mask"));
    assert!(!c.is_accepting());
    let (text, done) = generate(&vocab, &mut c, 7, sampled(), 200);
    assert!(done);
    assert!(
        text == "yes" || text == "no" || text.starts_with("maybe"),
        "{text}"
    );
    assert!(c.is_finished());
}

#[test]
fn invalid_schemas_and_grammars_are_typed_errors() {
    let vocab = mixtral_vocab();
    for bad in [
        json!({"type": "frobnicate"}),
        json!({"type": "object", "properties": 5}),
        json!({"$ref": "#/$defs/Missing"}),
        json!({"type": "integer", "minimum": 5, "maximum": 1}),
        json!(5),
        json!(false),
        json!("string"),
    ] {
        match vocab.compile(&Grammar::json_schema(bad.clone(), true)) {
            Err(ConstraintError::InvalidSchema(msg)) => assert!(!msg.is_empty()),
            other => panic!("{bad}: {other:?}"),
        }
    }
    match vocab.compile(&Grammar::Lark("start: (".into())) {
        Err(ConstraintError::InvalidGrammar(_)) => {}
        other => panic!("{other:?}"),
    }
    assert!(matches!(
        vocab.compile(&Grammar::Lark("  ".into())),
        Err(ConstraintError::InvalidGrammar(_))
    ));
    // Unknown keywords: an error when strict, ignored otherwise.
    let odd = json!({"type": "string", "x-frob": 1, "contentEncoding": "base64"});
    assert!(vocab.compile(&Grammar::json_schema(odd, false)).is_ok());
}

#[test]
fn disallowed_tokens_are_rejected_and_padding_is_masked() {
    let tok = mixtral_tokenizer();
    // The model has more logits than the tokenizer has tokens.
    let n = tok.vocab_size() + 7;
    let vocab = ConstraintVocab::from_tokenizer(&tok, n, &[1, 9999]).expect("vocab");
    assert_eq!(vocab.eos(), &[1]);
    let mut c = vocab.compile(&Grammar::JsonObject).expect("compiles");
    let mut logits = vec![0.0f32; n];
    assert_eq!(c.apply(&mut logits).expect("mask"), Step::Sample);
    assert!(logits[tok.vocab_size()..]
        .iter()
        .all(|l| *l == f32::NEG_INFINITY));
    let allowed = c.allowed_tokens().expect("mask");
    assert!(!allowed.is_empty());
    for &t in &allowed {
        assert_eq!(vocab.token_bytes(t).first(), Some(&b'{'), "{t}");
    }
    let bad = tok.encode_plain("x").expect("encodes")[0];
    assert_eq!(c.commit(bad), Err(ConstraintError::Rejected(bad)));
    assert_eq!(
        c.commit(n as u32 - 1),
        Err(ConstraintError::Rejected(n as u32 - 1))
    );
}

#[test]
fn without_eos_the_end_is_reported_as_finished() {
    let tok = mixtral_tokenizer();
    let n = tok.vocab_size();
    let vocab = ConstraintVocab::from_tokenizer(&tok, n, &[]).expect("vocab");
    let mut c = vocab
        .compile(&Grammar::Lark(r#"start: "ok""#.into()))
        .expect("compiles");
    for t in tok.encode_plain("ok").expect("encodes") {
        let mut logits = vec![0.0f32; n];
        assert_eq!(c.apply(&mut logits).expect("mask"), Step::Sample);
        c.commit(t).expect("commits");
    }
    let mut logits = vec![0.0f32; n];
    assert_eq!(c.apply(&mut logits).expect("mask"), Step::Finished);
    assert!(c.is_accepting());
}

#[test]
fn vocabulary_errors_are_typed() {
    assert!(matches!(
        ConstraintVocab::from_token_bytes(Vec::new(), 0, &[]),
        Err(ConstraintError::Vocabulary(_))
    ));
    let v = ConstraintVocab::from_token_bytes(vec![b"a".to_vec(), b"b".to_vec()], 2, &[])
        .expect("a two-token vocabulary");
    assert_eq!(v.token_bytes(0), b"a");
    assert_eq!(v.token_bytes(5), b"");
}

#[test]
fn constraint_is_send_and_clone() {
    fn check<T: Send + Clone + 'static>() {}
    check::<Constraint>();
    check::<ConstraintVocab>();
}
