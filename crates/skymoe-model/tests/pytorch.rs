//! PyTorch checkpoints (`torch.save` zip files): views, dtypes, sharded models, conversion to
//! safetensors, and bad input that must give a clear error naming the file, never a panic or
//! code execution.

mod common;

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use common::{fixtures, max_abs_diff, reference};
use skymoe_model::weights::convert::convert_pytorch_dir;
use skymoe_model::weights::pytorch::{
    parse_pickle, parse_state_dict, read_all_from_bytes, PickleError, PytorchCheckpoint, TorchDtype,
};
use skymoe_model::weights::{SafetensorsCheckpoint, WeightSource};
use skymoe_model::{CausalLm, Checkpoint, ModelError};

fn pt() -> PathBuf {
    fixtures().join("pytorch")
}

fn copy_dir(src: &Path, dst: &Path) {
    std::fs::create_dir_all(dst).unwrap();
    for e in std::fs::read_dir(src).unwrap() {
        let e = e.unwrap();
        if e.file_type().unwrap().is_file() {
            std::fs::copy(e.path(), dst.join(e.file_name())).unwrap();
        }
    }
}

/// A scratch copy of a fixture directory.
fn scratch(src: &Path) -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("model");
    copy_dir(src, &dir);
    (tmp, dir)
}

/// The expected tensors of the odd-cases files: dtype, shape and bytes.
fn expected_odd() -> HashMap<String, (safetensors::Dtype, Vec<usize>, Vec<u8>)> {
    let bytes = std::fs::read(pt().join("odd_expected.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    st.tensors()
        .into_iter()
        .map(|(n, v)| (n, (v.dtype(), v.shape().to_vec(), v.data().to_vec())))
        .collect()
}

fn open_and_load(dir: &Path) -> Result<CausalLm, ModelError> {
    let ckpt = Checkpoint::open(dir, &Device::Cpu)?;
    CausalLm::load(&ckpt, &Device::Cpu)
}

fn err_of(dir: &Path) -> ModelError {
    match open_and_load(dir) {
        Ok(_) => panic!("{} must fail to load", dir.display()),
        Err(e) => e,
    }
}

/// A zip archive in torch's layout holding `pickle` as `archive/data.pkl` and the given
/// storages under `archive/data/`.
fn torch_zip(pickle: &[u8], storages: &[(&str, &[u8])]) -> Vec<u8> {
    let mut w = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    let opts =
        zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
    w.start_file("archive/data.pkl", opts).unwrap();
    w.write_all(pickle).unwrap();
    w.start_file("archive/byteorder", opts).unwrap();
    w.write_all(b"little").unwrap();
    for (key, data) in storages {
        w.start_file(format!("archive/data/{key}"), opts).unwrap();
        w.write_all(data).unwrap();
    }
    w.start_file("archive/version", opts).unwrap();
    w.write_all(b"3\n").unwrap();
    w.finish().unwrap().into_inner()
}

/// The llama fixture's directory with its weights replaced by `weights` as pytorch_model.bin.
fn llama_with_bin(weights: &[u8]) -> (tempfile::TempDir, PathBuf) {
    let (t, dir) = scratch(&pt().join("llama"));
    std::fs::write(dir.join("pytorch_model.bin"), weights).unwrap();
    (t, dir)
}

// --- views, dtypes and pickle variants ---------------------------------------------------

fn check_odd_file(name: &str) {
    let path = pt().join(name);
    let ckpt = PytorchCheckpoint::open_files(std::slice::from_ref(&path))
        .unwrap_or_else(|e| panic!("{name}: {e}"));
    let expected = expected_odd();
    let mut names = ckpt.names();
    names.sort();
    let mut want: Vec<&String> = expected.keys().collect();
    want.sort();
    assert_eq!(names.iter().collect::<Vec<_>>(), want, "{name}");
    for (t, (dtype, shape, bytes)) in &expected {
        let (d, s, b) = ckpt.raw(t).unwrap_or_else(|e| panic!("{name} {t}: {e}"));
        assert_eq!((&d, &s), (dtype, shape), "{name} {t}");
        assert!(&b == bytes, "{name} {t}: bytes differ");
    }
    // The same through the in-memory entry point.
    let all = read_all_from_bytes(&std::fs::read(&path).unwrap(), &path).unwrap();
    assert_eq!(all.len(), expected.len());
    for (t, _, b) in &all {
        assert!(&expected[t].2 == b, "{name} {t}: bytes differ in memory");
    }
}

#[test]
fn views_dtypes_and_shared_storages_read_exactly() {
    check_odd_file("odd.bin");
    let ckpt = PytorchCheckpoint::open_files(&[pt().join("odd.bin")]).unwrap();
    // The fixture really exercises views: shared storages, offsets, non-contiguous strides.
    let base = ckpt.record("base").unwrap();
    let tr = ckpt.record("transposed").unwrap();
    let cols = ckpt.record("columns").unwrap();
    assert_eq!(tr.storage.key, base.storage.key);
    assert!(!tr.is_contiguous());
    assert_eq!(cols.offset, 2);
    assert!(!cols.is_contiguous());
    assert_eq!(ckpt.record("rows").unwrap().offset, 6);
    assert_eq!(ckpt.dtype("half").unwrap(), TorchDtype::F16);
    assert_eq!(ckpt.dtype("bf16_permuted").unwrap(), TorchDtype::BF16);
    // Loading as tensors: f32/f16/bf16 load in their dtype, integers are refused for weights.
    let t = ckpt.load("half_transposed", &Device::Cpu).unwrap();
    assert_eq!(t.dtype(), DType::F16);
    assert_eq!(t.dims(), &[5, 3]);
    let s = ckpt.load("scalar", &Device::Cpu).unwrap();
    assert_eq!(s.to_scalar::<f32>().unwrap(), 3.25);
    match ckpt.load("int64", &Device::Cpu) {
        Err(ModelError::UnsupportedDtype { name, dtype }) => {
            assert_eq!((name.as_str(), dtype.as_str()), ("int64", "int64"))
        }
        other => panic!("expected UnsupportedDtype, got {:?}", other.map(|_| ())),
    }
}

#[test]
fn pickle_protocol_4_reads_the_same() {
    check_odd_file("odd_protocol4.bin");
}

#[test]
fn deflated_entries_read_the_same() {
    check_odd_file("odd_deflated.bin");
}

#[test]
fn state_dict_nested_in_a_training_checkpoint_is_found() {
    let ckpt = PytorchCheckpoint::open_files(&[pt().join("nested.bin")]).unwrap();
    let mut names = ckpt.names();
    names.sort();
    assert_eq!(names, ["h", "w"]);
    let expected = expected_odd();
    assert_eq!(ckpt.raw("w").unwrap().2, expected["base"].2);
    assert_eq!(ckpt.raw("h").unwrap().2, expected["half"].2);
}

// --- whole models --------------------------------------------------------------------------

#[test]
fn llama_bin_gives_the_safetensors_logits() {
    let dir = pt().join("llama");
    let ckpt = Checkpoint::open(&dir, &Device::Cpu).unwrap();
    let WeightSource::Pytorch(p) = &ckpt.weights else {
        panic!("expected PyTorch weights");
    };
    // The head is saved as a second tensor over the embedding's storage.
    assert_eq!(
        p.record("lm_head.weight").unwrap().storage,
        p.record("model.embed_tokens.weight").unwrap().storage
    );
    assert!(ckpt
        .weights
        .quantized("lm_head.weight", 320, 64)
        .unwrap()
        .is_none());
    assert_eq!(ckpt.weights.shape("lm_head.weight").unwrap(), [320, 64]);
    let model = CausalLm::load(&ckpt, &Device::Cpu).unwrap();
    let (tokens, expected) = reference(&fixtures().join("llama/reference.safetensors"));
    let logits = model.forward_tokens(&tokens, None).unwrap();
    let d = max_abs_diff(&logits, &expected);
    assert!(d <= 1e-4, "max |Δlogit| against transformers = {d:e}");

    let st = open_and_load(&fixtures().join("llama")).unwrap();
    let st_logits = st.forward_tokens(&tokens, None).unwrap();
    assert_eq!(max_abs_diff(&logits, &st_logits), 0.0);
}

#[test]
fn mixtral_bf16_shards_give_the_rounded_safetensors_logits() {
    let dir = pt().join("mixtral");
    let ckpt = Checkpoint::open(&dir, &Device::Cpu).unwrap();
    assert!(matches!(ckpt.weights, WeightSource::Pytorch(_)));
    let model = CausalLm::load(&ckpt, &Device::Cpu).unwrap();

    // The safetensors original with every tensor rounded to bf16 as torch rounds it.
    let mut original = Checkpoint::open(&fixtures().join("mixtral"), &Device::Cpu).unwrap();
    let names = original.weights.names();
    assert_eq!(names, ckpt.weights.names());
    let mut rounded = HashMap::new();
    for n in &names {
        let shape = original.weights.shape(n).unwrap();
        let t = original.weights.get(n, &shape, &Device::Cpu).unwrap();
        let t = t
            .to_dtype(DType::BF16)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap();
        let from_bin = ckpt.weights.get(n, &shape, &Device::Cpu).unwrap();
        assert_eq!(max_abs_diff(&t, &from_bin), 0.0, "{n}");
        rounded.insert(n.clone(), t);
    }
    original.weights = WeightSource::InMemory(rounded);
    let reference_model = CausalLm::load(&original, &Device::Cpu).unwrap();

    let (tokens, f32_logits) = reference(&fixtures().join("mixtral/reference.safetensors"));
    let logits = model.forward_tokens(&tokens, None).unwrap();
    let want = reference_model.forward_tokens(&tokens, None).unwrap();
    assert_eq!(max_abs_diff(&logits, &want), 0.0);
    // And bf16 weights stay close to the f32 model of transformers.
    let d = max_abs_diff(&logits, &f32_logits);
    assert!(d < 5e-2, "bf16 weights moved the logits by {d}");
}

#[test]
fn safetensors_win_when_both_are_present() {
    let (_t, dir) = scratch(&fixtures().join("llama"));
    // A .bin that would fail to load: it must not even be opened.
    std::fs::write(dir.join("pytorch_model.bin"), b"not a checkpoint").unwrap();
    let ckpt = Checkpoint::open(&dir, &Device::Cpu).unwrap();
    assert!(matches!(ckpt.weights, WeightSource::Safetensors(_)));
    CausalLm::load(&ckpt, &Device::Cpu).unwrap();
}

#[test]
fn no_weights_names_the_pytorch_files_too() {
    let (_t, dir) = scratch(&pt().join("llama"));
    std::fs::remove_file(dir.join("pytorch_model.bin")).unwrap();
    let err = err_of(&dir);
    assert!(matches!(err, ModelError::NoWeights { .. }), "{err}");
    let msg = err.to_string();
    assert!(msg.contains("pytorch_model.bin"), "{msg}");
    assert!(msg.contains("pytorch_model.bin.index.json"), "{msg}");
}

// --- bad input -----------------------------------------------------------------------------

#[test]
fn bin_that_is_not_a_zip_is_reported() {
    let (_t, dir) = llama_with_bin(b"this is plain text, not a checkpoint");
    let err = err_of(&dir);
    assert!(matches!(err, ModelError::CorruptWeights { .. }), "{err}");
    let msg = err.to_string();
    assert!(
        msg.contains("pytorch_model.bin") && msg.contains("not a zip"),
        "{msg}"
    );
}

/// `os.system('echo pwned')` as a pickle: GLOBAL 'os' 'system', then REDUCE.
const OS_SYSTEM: &[u8] = b"\x80\x02cos\nsystem\nq\x00X\x0a\x00\x00\x00echo pwned\x85R.";

#[test]
fn pickle_naming_an_unknown_global_is_refused() {
    let (_t, dir) = llama_with_bin(&torch_zip(OS_SYSTEM, &[]));
    let err = err_of(&dir);
    match &err {
        ModelError::UnsafePickle { path, global } => {
            assert_eq!(global, "os.system");
            assert!(path.ends_with("pytorch_model.bin"));
        }
        _ => panic!("wrong error: {err}"),
    }
    let msg = err.to_string();
    assert!(
        msg.contains("os.system") && msg.contains("pytorch_model.bin"),
        "{msg}"
    );

    // STACK_GLOBAL (protocol 4) is checked the same way.
    let p4 = b"\x80\x04\x8c\x08builtins\x8c\x04eval\x93\x8c\x011\x85R.";
    assert_eq!(
        parse_pickle(p4).unwrap_err(),
        PickleError::UnsafeGlobal("builtins.eval".into())
    );
}

#[test]
fn legacy_torch_file_is_reported() {
    let (_t, dir) = llama_with_bin(&std::fs::read(pt().join("legacy.bin")).unwrap());
    let err = err_of(&dir);
    assert!(
        matches!(err, ModelError::UnsupportedWeights { .. }),
        "{err}"
    );
    let msg = err.to_string();
    assert!(
        msg.contains("pytorch_model.bin") && msg.contains("legacy"),
        "{msg}"
    );
}

#[test]
fn truncated_shard_is_reported() {
    let (_t, dir) = scratch(&pt().join("mixtral"));
    let shard = dir.join("pytorch_model-00002-of-00004.bin");
    let bytes = std::fs::read(&shard).unwrap();
    std::fs::write(&shard, &bytes[..bytes.len() / 2]).unwrap();
    let err = err_of(&dir);
    assert!(matches!(err, ModelError::CorruptWeights { .. }), "{err}");
    assert!(
        err.to_string().contains("pytorch_model-00002-of-00004.bin"),
        "{err}"
    );
}

#[test]
fn index_naming_a_missing_shard_is_reported() {
    let (_t, dir) = scratch(&pt().join("mixtral"));
    std::fs::remove_file(dir.join("pytorch_model-00003-of-00004.bin")).unwrap();
    let err = err_of(&dir);
    assert!(matches!(err, ModelError::MissingShard { .. }), "{err}");
    let msg = err.to_string();
    assert!(
        msg.contains("pytorch_model-00003-of-00004.bin")
            && msg.contains("pytorch_model.bin.index.json"),
        "{msg}"
    );
}

#[test]
fn pickle_that_is_not_a_tensor_dict_is_reported() {
    // A list of two ints.
    let (_t, dir) = llama_with_bin(&torch_zip(b"\x80\x02]q\x00(K\x01K\x02e.", &[]));
    let err = err_of(&dir);
    assert!(
        matches!(err, ModelError::UnsupportedWeights { .. }),
        "{err}"
    );
    let msg = err.to_string();
    assert!(
        msg.contains("pytorch_model.bin") && msg.contains("a list"),
        "{msg}"
    );
    // A dict whose value is not a tensor.
    let e = parse_state_dict(b"\x80\x02}q\x00X\x01\x00\x00\x00wK\x05s.").unwrap_err();
    assert!(e.to_string().contains("`w` holds an int"), "{e}");
}

#[test]
fn view_past_its_storage_is_reported() {
    // {'w': _rebuild_tensor_v2(storage('0', FloatStorage, numel=2), 0, (4,), (1,), False, {})}
    let pickle = b"\x80\x02}q\x00X\x01\x00\x00\x00wctorch._utils\n_rebuild_tensor_v2\n\
((X\x07\x00\x00\x00storagectorch\nFloatStorage\nX\x01\x00\x00\x000X\x03\x00\x00\x00cpuK\x02tQ\
K\x00K\x04\x85K\x01\x85\x89}tRs.";
    let zip = torch_zip(pickle, &[("0", &[0u8; 8])]);
    let (_t, dir) = llama_with_bin(&zip);
    let err = err_of(&dir);
    assert!(matches!(err, ModelError::CorruptWeights { .. }), "{err}");
    assert!(err.to_string().contains("tensor w"), "{err}");
    // With the storage declared and stored at 4 elements, the same view reads.
    let mut pickle_ok = pickle.to_vec();
    let at = pickle_ok.windows(4).position(|w| w == b"K\x02tQ").unwrap();
    pickle_ok[at + 1] = 4;
    let zip = torch_zip(&pickle_ok, &[("0", &[0u8; 16])]);
    let all = read_all_from_bytes(&zip, Path::new("ok.bin")).unwrap();
    assert_eq!(all.len(), 1);
    assert_eq!(all[0].2.len(), 16);
}

/// Every prefix and many single-byte corruptions of a real checkpoint give an error or a
/// result — never a panic.
#[test]
fn corrupted_archives_never_panic() {
    let bytes = std::fs::read(pt().join("odd.bin")).unwrap();
    let label = Path::new("odd.bin");
    for n in (0..bytes.len()).step_by(7) {
        let _ = read_all_from_bytes(&bytes[..n], label);
    }
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    for _ in 0..3000 {
        let mut b = bytes.clone();
        for _ in 0..1 + next() % 4 {
            let i = (next() as usize) % b.len();
            b[i] = next() as u8;
        }
        let _ = read_all_from_bytes(&b, label);
    }
}

/// The pickle of the odd-cases file, mutated and truncated, never panics the machine.
#[test]
fn corrupted_pickles_never_panic() {
    let mut z = zip::ZipArchive::new(std::fs::File::open(pt().join("odd.bin")).unwrap()).unwrap();
    let mut pickle = Vec::new();
    std::io::Read::read_to_end(&mut z.by_name("odd/data.pkl").unwrap(), &mut pickle).unwrap();
    assert!(parse_state_dict(&pickle).is_ok());
    for n in 0..pickle.len() {
        assert!(parse_state_dict(&pickle[..n]).is_err());
    }
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    for _ in 0..20000 {
        let mut b = pickle.clone();
        for _ in 0..1 + next() % 3 {
            let i = (next() as usize) % b.len();
            b[i] = next() as u8;
        }
        let _ = parse_state_dict(&b);
    }
    // Deep nesting and huge declared lengths are refused without exhausting memory or stack.
    let mut deep = b"\x80\x02".to_vec();
    deep.extend(std::iter::repeat_n(b"(".as_slice(), 200_000).flatten());
    deep.extend(std::iter::repeat_n(b"t".as_slice(), 200_000).flatten());
    deep.push(b'.');
    assert!(parse_pickle(&deep).is_ok());
    assert!(parse_pickle(b"\x80\x02X\xff\xff\xff\xff").is_err());
    assert!(parse_pickle(b"\x80\x04\x8d\xff\xff\xff\xff\xff\xff\xff\xff").is_err());
    assert!(parse_pickle(b"\x80\x02h\x07.").is_err());
    // Nothing that would copy a large object per opcode: OrderedDict with items, long keys.
    let od_items = b"\x80\x02ccollections\nOrderedDict\n]\x85R.";
    assert!(parse_pickle(od_items).is_err());
    let mut long_key = b"\x80\x02(X\x07\x00\x00\x00storagectorch\nFloatStorage\nX".to_vec();
    long_key.extend(10_000u32.to_le_bytes());
    long_key.extend(std::iter::repeat_n(b'7', 10_000));
    long_key.extend(b"X\x03\x00\x00\x00cpuK\x01tQ.");
    let e = parse_pickle(&long_key).unwrap_err();
    assert!(e.to_string().contains("storage key"), "{e}");
    // Popping below a MARK is malformed, as in Python.
    assert!(parse_pickle(b"\x80\x02K\x01(0.").is_err());
}

// --- conversion ----------------------------------------------------------------------------

fn assert_same_tensors(bin: &PytorchCheckpoint, st: &SafetensorsCheckpoint) {
    let mut a = bin.names();
    let mut b = st.names();
    a.sort();
    b.sort();
    assert_eq!(a, b);
    for n in &a {
        let (d1, s1, b1) = bin.raw(n).unwrap();
        let (d2, s2, b2) = st.raw(n).unwrap();
        assert_eq!((d1, s1), (d2, s2), "{n}");
        assert!(b1 == b2, "{n}: bytes differ");
    }
}

fn no_temporaries(dir: &Path) {
    for e in std::fs::read_dir(dir).unwrap() {
        let name = e.unwrap().file_name().to_string_lossy().to_string();
        assert!(!name.contains(".tmp-"), "left behind: {name}");
    }
}

#[test]
fn convert_sharded_round_trips() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let src = pt().join("mixtral");
    let s = convert_pytorch_dir(&src, &out).unwrap();
    assert_eq!(s.weight_files.len(), 5);
    for k in 1..=4 {
        assert!(out
            .join(format!("model-{k:05}-of-00004.safetensors"))
            .is_file());
    }
    let index: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(out.join("model.safetensors.index.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(
        index["metadata"]["total_size"].as_u64(),
        Some(s.total_bytes)
    );
    assert_eq!(
        index["weight_map"]["lm_head.weight"],
        "model-00001-of-00004.safetensors"
    );
    assert!(out.join("config.json").is_file() && out.join("tokenizer.json").is_file());
    assert!(!out.join("pytorch_model.bin.index.json").exists());
    no_temporaries(&out);
    let bin = PytorchCheckpoint::open_dir(&src).unwrap();
    let st = SafetensorsCheckpoint::open_dir(&out).unwrap();
    assert_same_tensors(&bin, &st);
    assert_eq!(
        st.dtype("lm_head.weight").unwrap(),
        safetensors::Dtype::BF16
    );
    // The converted model runs, with the logits of the .bin model.
    let (tokens, _) = reference(&fixtures().join("mixtral/reference.safetensors"));
    let a = open_and_load(&src)
        .unwrap()
        .forward_tokens(&tokens, None)
        .unwrap();
    let b = open_and_load(&out)
        .unwrap()
        .forward_tokens(&tokens, None)
        .unwrap();
    assert_eq!(max_abs_diff(&a, &b), 0.0);
}

#[test]
fn convert_single_file_round_trips() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let src = pt().join("llama");
    convert_pytorch_dir(&src, &out).unwrap();
    let mut names: Vec<String> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .collect();
    names.sort();
    assert_eq!(
        names,
        ["config.json", "model.safetensors", "tokenizer.json"]
    );
    let bin = PytorchCheckpoint::open_dir(&src).unwrap();
    let st = SafetensorsCheckpoint::open_dir(&out).unwrap();
    assert_same_tensors(&bin, &st);
}

#[test]
fn convert_keeps_every_view_and_dtype() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::copy(pt().join("odd.bin"), src.join("pytorch_model.bin")).unwrap();
    std::fs::write(src.join("notes.txt"), "kept").unwrap();
    let out = tmp.path().join("out");
    convert_pytorch_dir(&src, &out).unwrap();
    assert_eq!(
        std::fs::read_to_string(out.join("notes.txt")).unwrap(),
        "kept"
    );
    let bytes = std::fs::read(out.join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let expected = expected_odd();
    assert_eq!(st.len(), expected.len());
    for (n, (d, s, b)) in &expected {
        let v = st.tensor(n).unwrap();
        assert_eq!((v.dtype(), v.shape()), (*d, s.as_slice()), "{n}");
        assert!(v.data() == b.as_slice(), "{n}");
    }
}

#[test]
fn convert_refuses_bad_targets() {
    let (_t, src) = scratch(&pt().join("llama"));
    let before: Vec<_> = std::fs::read_dir(&src).unwrap().collect();
    // The model directory itself.
    let err = convert_pytorch_dir(&src, &src).unwrap_err();
    assert!(err.to_string().contains("model directory itself"), "{err}");
    assert_eq!(std::fs::read_dir(&src).unwrap().count(), before.len());
    // A directory that already holds weights: left as it was.
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    std::fs::create_dir_all(&out).unwrap();
    std::fs::write(out.join("model.safetensors"), b"old").unwrap();
    let err = convert_pytorch_dir(&src, &out).unwrap_err();
    assert!(err.to_string().contains("already holds weights"), "{err}");
    assert_eq!(
        std::fs::read(out.join("model.safetensors")).unwrap(),
        b"old"
    );
    // A directory without PyTorch weights.
    let err = convert_pytorch_dir(&fixtures().join("llama"), &tmp.path().join("x")).unwrap_err();
    assert!(matches!(err, ModelError::NoWeights { .. }), "{err}");
    assert!(!tmp.path().join("x").exists());
    // An unsafe shard is refused before anything is written.
    std::fs::write(src.join("pytorch_model.bin"), torch_zip(OS_SYSTEM, &[])).unwrap();
    let err = convert_pytorch_dir(&src, &tmp.path().join("y")).unwrap_err();
    assert!(matches!(err, ModelError::UnsafePickle { .. }), "{err}");
    assert!(!tmp.path().join("y").exists());
    // A non-empty directory without weights is fine.
    let (_t2, src2) = scratch(&pt().join("llama"));
    let out2 = tmp.path().join("z");
    std::fs::create_dir_all(&out2).unwrap();
    std::fs::write(out2.join("README.md"), "notes").unwrap();
    convert_pytorch_dir(&src2, &out2).unwrap();
    assert!(out2.join("model.safetensors").is_file());
}
