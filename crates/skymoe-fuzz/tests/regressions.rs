//! Every seed and every committed fuzz input (`fixtures/fuzz/<target>/`, among them the inputs
//! that once crashed, hung or over-allocated) runs through its target without a panic, within
//! a time limit and under the allocation limit; then a few hundred fixed mutants of them do.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use skymoe_fuzz::alloc::LimitAlloc;
use skymoe_fuzz::mutate::Mutator;
use skymoe_fuzz::targets::seeds;
use skymoe_fuzz::Target;

#[global_allocator]
static ALLOC: LimitAlloc = LimitAlloc::new();

/// Longest one input may take (the slowest seed takes well under a second in release).
const LIMIT: Duration = Duration::from_secs(30);
/// Mutants run per target.
const MUTANTS: usize = 300;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures")
}

fn replay(target: Target) {
    let inputs = seeds(target, &fixtures());
    assert!(!inputs.is_empty(), "no seeds for {}", target.name());
    let run = |label: &str, input: &[u8]| {
        let t = Instant::now();
        let r = std::panic::catch_unwind(|| target.run(input));
        assert!(r.is_ok(), "{}: {label} panicked", target.name());
        assert!(
            t.elapsed() < LIMIT,
            "{}: {label} took {:?}",
            target.name(),
            t.elapsed()
        );
    };
    for (label, input) in &inputs {
        run(label, input);
    }
    let mut m = Mutator::new(0x5eed, 1 << 20);
    for i in 0..MUTANTS {
        let (label, base) = &inputs[i % inputs.len()];
        let other = &inputs[(i * 7 + 3) % inputs.len()].1;
        let mut input = base.clone();
        m.mutate(&mut input, other, target.dictionary());
        run(&format!("mutant {i} of {label}"), &input);
    }
}

#[test]
fn safetensors_inputs() {
    replay(Target::Safetensors);
}

#[test]
fn gguf_inputs() {
    replay(Target::Gguf);
}

#[test]
fn pytorch_inputs() {
    replay(Target::Pytorch);
}

#[test]
fn pickle_inputs() {
    replay(Target::Pickle);
}

#[test]
fn sentencepiece_inputs() {
    replay(Target::Sentencepiece);
}

#[test]
fn multi_file_inputs_round_trip() {
    let packed = skymoe_fuzz::targets::pack(&[("a.json", b"{}"), ("b.bin", b"\x00\x01")]);
    let files = skymoe_fuzz::targets::unpack(&packed, "x");
    assert_eq!(files.len(), 2);
    assert_eq!(files[0], ("a.json".to_string(), &b"{}"[..]));
    assert_eq!(files[1], ("b.bin".to_string(), &b"\x00\x01"[..]));
    // Names that could leave the directory are dropped.
    let packed = skymoe_fuzz::targets::pack(&[("../x", b"1"), (".hidden", b"2"), ("ok", b"3")]);
    let files = skymoe_fuzz::targets::unpack(&packed, "x");
    assert_eq!(files, vec![("ok".to_string(), &b"3"[..])]);
    assert_eq!(
        skymoe_fuzz::targets::unpack(b"plain", "model.safetensors"),
        vec![("model.safetensors".to_string(), &b"plain"[..])]
    );
}

#[test]
fn qwen2_mlp_only_layers_are_checked_in_linear_time() {
    // Found by fuzzing: each of 65536 layers scanned a list of a million `mlp_only_layers`.
    let mut v: serde_json::Value = serde_json::from_slice(
        &std::fs::read(fixtures().join("reference/qwen2_moe/config.json")).unwrap(),
    )
    .unwrap();
    v["num_hidden_layers"] = 65536.into();
    v["mlp_only_layers"] = vec![70_000u32; 1_000_000].into();
    let t = Instant::now();
    let c = skymoe_model::ModelConfig::from_json(&v, Path::new("config.json")).unwrap();
    assert_eq!(c.num_hidden_layers, 65536);
    assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
    v["num_hidden_layers"] = (skymoe_model::config::MAX_HIDDEN_LAYERS + 1).into();
    assert!(skymoe_model::ModelConfig::from_json(&v, Path::new("config.json")).is_err());
}
