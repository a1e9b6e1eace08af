//! `skymoe convert`: PyTorch model directories to safetensors, end to end through the binary.

mod common;

use std::path::Path;

use common::{assert_clean_failure, fixtures, skymoe};
use skymoe_model::weights::{PytorchCheckpoint, SafetensorsCheckpoint};

fn convert(model: &Path, out: &Path) -> std::process::Output {
    skymoe(&[
        "convert",
        "--model",
        model.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ])
}

fn file_names(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .collect();
    names.sort();
    names
}

fn assert_same_tensors(src: &Path, out: &Path) {
    let bin = PytorchCheckpoint::open_dir(src).unwrap();
    let st = SafetensorsCheckpoint::open_dir(out).unwrap();
    let mut names = bin.names();
    names.sort();
    let mut st_names = st.names();
    st_names.sort();
    assert_eq!(names, st_names);
    for n in &names {
        let (d1, s1, b1) = bin.raw(n).unwrap();
        let (d2, s2, b2) = st.raw(n).unwrap();
        assert_eq!((d1, s1), (d2, s2), "{n}");
        assert!(b1 == b2, "{n}: bytes differ");
    }
}

#[test]
fn convert_sharded_model_and_run_it() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("mixtral");
    let src = fixtures().join("pytorch/mixtral");
    let o = convert(&src, &out);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(
        file_names(&out),
        [
            "config.json",
            "model-00001-of-00004.safetensors",
            "model-00002-of-00004.safetensors",
            "model-00003-of-00004.safetensors",
            "model-00004-of-00004.safetensors",
            "model.safetensors.index.json",
            "tokenizer.json",
        ]
    );
    assert_same_tensors(&src, &out);
    let index: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(out.join("model.safetensors.index.json")).unwrap(),
    )
    .unwrap();
    let total = index["metadata"]["total_size"].as_u64().unwrap();
    let pt_index: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(src.join("pytorch_model.bin.index.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(Some(total), pt_index["metadata"]["total_size"].as_u64());
    // The converted directory is a model every verb takes.
    let o = skymoe(&["inspect", "--model", out.to_str().unwrap(), "--json"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

#[test]
fn convert_single_file_model() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("llama");
    let src = fixtures().join("pytorch/llama");
    let o = convert(&src, &out);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(
        file_names(&out),
        ["config.json", "model.safetensors", "tokenizer.json"]
    );
    assert_same_tensors(&src, &out);
}

#[test]
fn convert_refuses_bad_targets() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    std::fs::create_dir_all(&src).unwrap();
    for e in std::fs::read_dir(fixtures().join("pytorch/llama")).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), src.join(e.file_name())).unwrap();
    }
    let before = file_names(&src);
    assert_clean_failure(&convert(&src, &src), "model directory itself");
    assert_eq!(file_names(&src), before);

    let out = tmp.path().join("out");
    std::fs::create_dir_all(&out).unwrap();
    std::fs::write(out.join("model.safetensors"), b"old").unwrap();
    assert_clean_failure(&convert(&src, &out), "already holds weights");
    assert_eq!(
        std::fs::read(out.join("model.safetensors")).unwrap(),
        b"old"
    );

    assert_clean_failure(
        &convert(&fixtures().join("llama"), &tmp.path().join("x")),
        "pytorch_model.bin",
    );
    assert!(!tmp.path().join("x").exists());
}
