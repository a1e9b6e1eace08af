//! The fuzz targets: one per file parser, each taking arbitrary bytes, writing them where the
//! parser expects a file when it reads from disk, and exercising everything a load does with
//! what the parser returns. A target returns normally on every input; a panic, a hang or an
//! allocation over the limit is a bug in the parser.
//!
//! Several parsers read a directory (a safetensors or PyTorch index with its shards). Their
//! targets accept a small multi-file container, see [`pack`]: bytes that start with
//! [`FILE_MARK`] are split into named files; any other input is the one weights file.

use std::cell::RefCell;
use std::collections::HashSet;
use std::hash::{Hash, Hasher};
use std::io::{Cursor, Read, Write};
use std::path::{Path, PathBuf};

use candle_core::Device;
use skymoe_model::tokenizer::gguf::read_metadata;
use skymoe_model::weights::pytorch::{
    parse_state_dict, read_all_from_bytes, PytorchCheckpoint, TensorRecord,
};
use skymoe_model::weights::{quantized, GgufCheckpoint, SafetensorsCheckpoint};
use skymoe_model::{ModelConfig, Tokenizer};

/// Starts every file of a multi-file input: `FILE_MARK name '\n' bytes`, repeated.
pub const FILE_MARK: &[u8] = b"@@skymoe-fuzz-file ";

/// Most files a multi-file input may hold.
const MAX_FILES: usize = 16;

/// Largest total of storage bytes the pickle target builds an archive around.
const MAX_SYNTHETIC_STORAGE: usize = 4 << 20;

/// The parsers under test.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Target {
    /// Safetensors headers and `model.safetensors.index.json` with its shards
    /// (`SafetensorsCheckpoint::open_dir`, then every tensor read, loaded and, when stored
    /// quantised, dequantised); `config.json` when present.
    Safetensors,
    /// GGUF files (`GgufCheckpoint::open`) and the tokenizer in their metadata
    /// (`Tokenizer::from_gguf`, then encoding and decoding).
    Gguf,
    /// `torch.save` zip archives (`read_all_from_bytes`), or a directory of shards with
    /// `pytorch_model.bin.index.json` (`PytorchCheckpoint::open_dir`, every tensor loaded).
    Pytorch,
    /// The pickle machine and state-dict records on a bare `data.pkl`; what it accepts is
    /// wrapped in a well-formed archive and read end to end.
    Pickle,
    /// SentencePiece `tokenizer.model` protobufs (`Tokenizer::from_path`, then encoding and
    /// decoding).
    Sentencepiece,
}

impl Target {
    /// Every target.
    pub const ALL: [Target; 5] = [
        Target::Safetensors,
        Target::Gguf,
        Target::Pytorch,
        Target::Pickle,
        Target::Sentencepiece,
    ];

    /// The target's name (also its directory under `fixtures/fuzz/`).
    pub fn name(self) -> &'static str {
        match self {
            Target::Safetensors => "safetensors",
            Target::Gguf => "gguf",
            Target::Pytorch => "pytorch",
            Target::Pickle => "pickle",
            Target::Sentencepiece => "sentencepiece",
        }
    }

    /// The target of this name.
    pub fn from_name(name: &str) -> Option<Target> {
        Self::ALL.into_iter().find(|t| t.name() == name)
    }

    /// Run the target on one input. Errors from the parser are the expected outcome of most
    /// inputs; this returns normally unless the parser has a bug. The result is a
    /// fingerprint of what happened (which steps succeeded, and the kind of each error),
    /// which a fuzzer without coverage instrumentation can use to tell new behaviour.
    pub fn run(self, data: &[u8]) -> u64 {
        let mut o = Outcome::default();
        match self {
            Target::Safetensors => safetensors(data, &mut o),
            Target::Gguf => gguf(data, &mut o),
            Target::Pytorch => pytorch(data, &mut o),
            Target::Pickle => pickle(data, &mut o),
            Target::Sentencepiece => sentencepiece(data, &mut o),
        }
        o.hash
    }

    /// Tokens the mutator splices into inputs of this target: names and values its format
    /// gives meaning to.
    pub fn dictionary(self) -> &'static [&'static [u8]] {
        match self {
            Target::Safetensors => &[
                b"__metadata__",
                b"\"dtype\":",
                b"\"shape\":",
                b"\"data_offsets\":",
                b"\"F32\"",
                b"\"F16\"",
                b"\"BF16\"",
                b"\"F8_E4M3\"",
                b"\"I8\"",
                b"\"U8\"",
                b"\"I64\"",
                b"\"BOOL\"",
                b"[]",
                b"[0]",
                b"[18446744073709551615]",
                b"[4294967296,4294967296]",
                b"weight_map",
                b"_scale",
                b"../",
                b"/",
                b"model.safetensors",
                b"\"num_hidden_layers\":",
                b"\"num_experts\":",
            ],
            Target::Gguf => &[
                b"GGUF",
                b"general.architecture",
                b"general.alignment",
                b"llama",
                b"llama.block_count",
                b"llama.embedding_length",
                b"llama.feed_forward_length",
                b"llama.attention.head_count",
                b"llama.attention.head_count_kv",
                b"llama.attention.key_length",
                b"llama.expert_count",
                b"llama.expert_used_count",
                b"llama.vocab_size",
                b"llama.rope.scaling.type",
                b"yarn",
                b"tokenizer.ggml.model",
                b"tokenizer.ggml.tokens",
                b"tokenizer.ggml.scores",
                b"tokenizer.ggml.token_type",
                b"tokenizer.ggml.merges",
                b"tokenizer.ggml.bos_token_id",
                b"gpt2",
                b"blk.0.ffn_gate_exps.weight",
                b"blk.0.attn_q.weight",
                b"token_embd.weight",
                b"rope_freqs.weight",
            ],
            Target::Pytorch | Target::Pickle => &[
                b"PK\x03\x04",
                b"PK\x01\x02",
                b"PK\x05\x06",
                b"PK\x06\x06",
                b"PK\x06\x07",
                b"data.pkl",
                b"archive/data/0",
                b"byteorder",
                b"big",
                b"\x80\x02",
                b"ctorch._utils\n_rebuild_tensor_v2\n",
                b"ctorch\nFloatStorage\n",
                b"ctorch\nBFloat16Storage\n",
                b"ccollections\nOrderedDict\n",
                b"ctorch._utils\n_rebuild_parameter\n",
                b"cos\nsystem\n",
                b"X\x07\x00\x00\x00storage",
                b"(",
                b"t",
                b"R",
                b"Q",
                b"h\x00",
                b"J\xff\xff\xff\x7f",
                b"\x8a\x08\xff\xff\xff\xff\xff\xff\xff\x7f",
                b"\x94",
                b"s",
                b"u",
                b"}",
                b".",
            ],
            Target::Sentencepiece => &[
                b"\x0a\x05\x0a\x01a\x15\x00\x00\x80\xbf",
                b"\x12",
                b"\x1a",
                b"\x22",
                b"\x18\x01",
                b"\x18\x02",
                b"\x18\x06",
                b"<0x41>",
                b"<unk>",
                b"\xe2\x96\x81",
                b"\xff\xff\xff\xff\x0f",
                b"\xff\xff\xff\xff\xff\xff\xff\xff\xff\x01",
            ],
        }
    }
}

thread_local! {
    static SCRATCH: RefCell<Option<tempfile::TempDir>> = const { RefCell::new(None) };
}

/// Whether `SKYMOE_FUZZ_TRACE` asks for every error to be printed (to see what the outcome
/// fingerprints are made of).
fn trace() -> bool {
    static TRACE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *TRACE.get_or_init(|| std::env::var_os("SKYMOE_FUZZ_TRACE").is_some())
}

/// A running fingerprint of a target's steps and their outcomes.
#[derive(Debug, Default)]
struct Outcome {
    hash: u64,
}

impl Outcome {
    /// Record that `step` succeeded, or failed with an error of this kind: the plain words of
    /// its message (names, numbers, paths and quoted text taken out, so that only the kind of
    /// error counts).
    fn step<T, E: std::fmt::Display>(&mut self, step: &str, r: &Result<T, E>) -> bool {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        self.hash.hash(&mut h);
        step.hash(&mut h);
        match r {
            Ok(_) => 0u8.hash(&mut h),
            Err(e) => {
                let mut msg = e.to_string();
                if trace() {
                    eprintln!("{step}: {msg}");
                }
                // Quoted text comes from the input (names, globals): not a kind of error.
                for q in ['`', '"', '\'', '[', '{'] {
                    let close = match q {
                        '[' => ']',
                        '{' => '}',
                        q => q,
                    };
                    while let Some(a) = msg.find(q) {
                        let end = msg[a + 1..]
                            .find(close)
                            .map_or(msg.len(), |b| a + 1 + b + 1);
                        msg.replace_range(a..end, " ");
                    }
                }
                // Names follow these nouns unquoted; skip the word after them.
                const NAMED: [&str; 6] = ["tensor", "entry", "storage", "key", "piece", "token"];
                let mut skip = false;
                let mut words = 0;
                for word in msg.split(|c: char| c.is_whitespace() || ",;:()".contains(c)) {
                    if word.is_empty() || std::mem::take(&mut skip) {
                        continue;
                    }
                    skip = NAMED.contains(&word);
                    if word.len() >= 3 && word.bytes().all(|b| b.is_ascii_lowercase()) {
                        word.hash(&mut h);
                        words += 1;
                        if words == 6 {
                            break;
                        }
                    }
                }
            }
        }
        self.hash = h.finish();
        r.is_ok()
    }
}

/// An empty scratch directory for this thread (in memory where the system offers it),
/// emptied before each use.
fn with_scratch<T>(f: impl FnOnce(&Path) -> T) -> T {
    let dir = SCRATCH.with(|cell| {
        let mut slot = cell.borrow_mut();
        if slot.is_none() {
            let shm = Path::new("/dev/shm");
            let base = if shm.is_dir() {
                shm.to_path_buf()
            } else {
                std::env::temp_dir()
            };
            let dir = tempfile::Builder::new()
                .prefix("skymoe-fuzz-")
                .tempdir_in(base)
                .or_else(|_| tempfile::Builder::new().prefix("skymoe-fuzz-").tempdir())
                .expect("cannot create a scratch directory for fuzzing");
            *slot = Some(dir);
        }
        slot.as_ref()
            .map(|d| d.path().to_path_buf())
            .unwrap_or_default()
    });
    if let Ok(entries) = std::fs::read_dir(&dir) {
        for e in entries.flatten() {
            let _ = std::fs::remove_file(e.path());
        }
    }
    f(&dir)
}

/// Build a multi-file input from named files.
pub fn pack(files: &[(&str, &[u8])]) -> Vec<u8> {
    let mut out = Vec::new();
    for (name, bytes) in files {
        out.extend_from_slice(FILE_MARK);
        out.extend_from_slice(name.as_bytes());
        out.push(b'\n');
        out.extend_from_slice(bytes);
    }
    out
}

/// Split an input into named files: a multi-file input into its files (those with an
/// unusable name dropped), anything else into one file called `default`.
pub fn unpack<'a>(data: &'a [u8], default: &str) -> Vec<(String, &'a [u8])> {
    if !data.starts_with(FILE_MARK) {
        return vec![(default.to_string(), data)];
    }
    let mut starts = Vec::new();
    let mut i = 0;
    while i + FILE_MARK.len() <= data.len() {
        if data[i..].starts_with(FILE_MARK) {
            starts.push(i);
            i += FILE_MARK.len();
        } else {
            i += 1;
        }
    }
    let mut files = Vec::new();
    let mut seen = HashSet::new();
    for (k, &s) in starts.iter().enumerate() {
        let end = starts.get(k + 1).copied().unwrap_or(data.len());
        let body = &data[s + FILE_MARK.len()..end];
        let (name, bytes) = match body.iter().position(|&b| b == b'\n') {
            Some(nl) => (&body[..nl], &body[nl + 1..]),
            None => (body, &body[body.len()..]),
        };
        let Ok(name) = std::str::from_utf8(name) else {
            continue;
        };
        let usable = !name.is_empty()
            && name.len() <= 100
            && !name.starts_with('.')
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
        if usable && seen.insert(name.to_string()) && files.len() < MAX_FILES {
            files.push((name.to_string(), bytes));
        }
    }
    files
}

fn write_files(dir: &Path, files: &[(String, &[u8])]) -> Vec<PathBuf> {
    files
        .iter()
        .filter_map(|(name, bytes)| {
            let p = dir.join(name);
            std::fs::write(&p, bytes).ok().map(|_| p)
        })
        .collect()
}

fn safetensors(data: &[u8], o: &mut Outcome) {
    with_scratch(|dir| {
        let files = unpack(data, "model.safetensors");
        write_files(dir, &files);
        let config = dir.join("config.json");
        if config.is_file() {
            o.step("config", &ModelConfig::from_file(&config));
        }
        let st = SafetensorsCheckpoint::open_dir(dir);
        o.step("open", &st);
        let Ok(st) = st else {
            return;
        };
        let mut names = st.names();
        names.sort();
        for name in &names {
            o.step("dtype", &st.dtype(name));
            o.step("raw", &st.raw(name));
            o.step("load", &st.load(name, &Device::Cpu));
            if let Ok([rows, cols]) = st.shape(name).as_deref() {
                for cols in [*cols, cols.saturating_mul(2)] {
                    let q = quantized::read_qmatrix(&st, name, *rows, cols);
                    o.step("qmatrix", &q);
                    if let Ok(Some(q)) = q {
                        let _ = q.dequantize();
                    }
                }
            }
        }
    })
}

/// Text every tokenizer target encodes: plain words, digits, spaces, a control token's
/// spelling, a character outside most vocabularies, and a fragment of the input itself.
fn probe_text(data: &[u8]) -> String {
    let tail = &data[data.len().saturating_sub(24)..];
    format!(
        "Hello,  world! 123 <s></s> \u{2581}x \u{1F600}\n\t{}",
        String::from_utf8_lossy(tail)
    )
}

/// Run `f` on a thread of its own and wait for it, passing a panic on. The `tokenizers`
/// crate keeps a per-thread cache for every BPE model that has encoded on a thread and never
/// frees it when the model is dropped; a short-lived thread takes the cache with it, so that
/// a long fuzzing run does not grow by a few KB per BPE vocabulary.
fn on_own_thread<T: Send>(f: impl FnOnce() -> T + Send) -> T {
    std::thread::scope(|s| match s.spawn(f).join() {
        Ok(v) => v,
        Err(panic) => std::panic::resume_unwind(panic),
    })
}

fn exercise_tokenizer(tok: &Tokenizer, data: &[u8], o: &mut Outcome) {
    let text = probe_text(data);
    for ids in [
        tok.encode_prompt(&text),
        tok.encode_plain(&text),
        tok.encode_with_special_tokens(&text),
    ] {
        o.step("encode", &ids);
        if let Ok(ids) = ids {
            o.step("decode", &tok.decode(&ids));
        }
    }
    let n = tok.vocab_size().min(64) as u32;
    o.step("decode-vocab", &tok.decode(&(0..n).collect::<Vec<_>>()));
    o.step("decode-outside", &tok.decode(&[u32::MAX, n]));
}

fn gguf(data: &[u8], o: &mut Outcome) {
    with_scratch(|dir| {
        let path = dir.join("model.gguf");
        if std::fs::write(&path, data).is_err() {
            return;
        }
        let meta = read_metadata(&path);
        o.step("metadata", &meta);
        if let Ok(meta) = meta {
            on_own_thread(|| {
                let tok = Tokenizer::from_gguf(&meta);
                o.step("tokenizer", &tok);
                if let Ok(tok) = tok {
                    exercise_tokenizer(&tok, data, o);
                }
            });
        }
        let ckpt = GgufCheckpoint::open(&path, &Device::Cpu);
        o.step("open", &ckpt);
        // Tensors are read lazily from the map: read each one (a few), dequantised and as
        // the served ggml matrix with one product.
        if let Ok(ckpt) = ckpt {
            for name in ckpt.weights.names().into_iter().take(8) {
                o.step("tensor", &ckpt.weights.load(&name, &Device::Cpu));
                let m = ckpt.weights.ggml_matrix(&name);
                o.step("ggml-matrix", &m);
                if let Ok(Some(m)) = m {
                    if m.rows().saturating_mul(m.cols()) <= 1 << 20 {
                        let x = vec![0.5f32; m.cols()];
                        let mut y = vec![0f32; m.rows()];
                        m.matmul(&x, 1, &mut y);
                    }
                }
            }
        }
    })
}

fn pytorch(data: &[u8], o: &mut Outcome) {
    if !data.starts_with(FILE_MARK) {
        o.step(
            "read",
            &read_all_from_bytes(data, Path::new("pytorch_model.bin")),
        );
        return;
    }
    with_scratch(|dir| {
        let files = unpack(data, "pytorch_model.bin");
        write_files(dir, &files);
        let ck = PytorchCheckpoint::open_dir(dir);
        o.step("open", &ck);
        let Ok(ck) = ck else {
            return;
        };
        let mut names = ck.names();
        names.sort();
        for name in &names {
            o.step("shape", &ck.shape(name));
            o.step("raw", &ck.raw(name));
            o.step("load", &ck.load(name, &Device::Cpu));
        }
    })
}

/// A well-formed `torch.save` archive around `pkl`, with zero-filled storages of the sizes
/// its records ask for (`None` when they ask for too much).
fn archive_around(pkl: &[u8], records: &[(String, TensorRecord)], big: bool) -> Option<Vec<u8>> {
    let mut sizes: Vec<(String, usize)> = Vec::new();
    let mut total = 0usize;
    for (_, t) in records {
        if sizes.iter().any(|(k, _)| *k == t.storage.key) {
            continue;
        }
        let n = t.storage.nbytes()?;
        total = total.checked_add(n)?;
        if total > MAX_SYNTHETIC_STORAGE {
            return None;
        }
        sizes.push((t.storage.key.clone(), n));
    }
    let mut zip = zip::ZipWriter::new(Cursor::new(Vec::new()));
    let opts =
        zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
    zip.start_file("archive/data.pkl", opts).ok()?;
    zip.write_all(pkl).ok()?;
    zip.start_file("archive/byteorder", opts).ok()?;
    zip.write_all(if big { b"big" } else { b"little" }).ok()?;
    for (key, n) in &sizes {
        zip.start_file(format!("archive/data/{key}"), opts).ok()?;
        // A recognisable pattern rather than zeros, so gathering mistakes change the bytes.
        let pattern: Vec<u8> = (0..*n).map(|i| (i % 251) as u8).collect();
        zip.write_all(&pattern).ok()?;
    }
    Some(zip.finish().ok()?.into_inner())
}

fn pickle(data: &[u8], o: &mut Outcome) {
    let records = parse_state_dict(data);
    o.step("state_dict", &records);
    let Ok(records) = records else {
        return;
    };
    let big = data.len() % 2 == 1;
    if let Some(zip) = archive_around(data, &records, big) {
        o.step(
            "read",
            &read_all_from_bytes(&zip, Path::new("pytorch_model.bin")),
        );
    }
}

fn sentencepiece(data: &[u8], o: &mut Outcome) {
    with_scratch(|dir| {
        let path = dir.join("tokenizer.model");
        if std::fs::write(&path, data).is_err() {
            return;
        }
        on_own_thread(|| {
            let tok = Tokenizer::from_path(&path);
            o.step("tokenizer", &tok);
            if let Ok(tok) = tok {
                exercise_tokenizer(&tok, data, o);
            }
        });
    })
}

/// Seed inputs for a target, built from the fixtures under `fixtures` (the repository's
/// `fixtures/` directory): the reference checkpoints and tokenizers for each format, and the
/// committed corpus and regression inputs under `fixtures/fuzz/<target>/`. Deduplicated, in a
/// stable order, each with a label saying where it came from.
pub fn seeds(target: Target, fixtures: &Path) -> Vec<(String, Vec<u8>)> {
    let mut files = Vec::new();
    walk(&fixtures.join("reference"), &mut files);
    files.sort();
    let mut out: Vec<(String, Vec<u8>)> = Vec::new();
    let label = |p: &Path| p.strip_prefix(fixtures).unwrap_or(p).display().to_string();
    let file_name = |p: &Path| {
        p.file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    };
    let ext = |p: &Path| p.extension().map(|e| e.to_string_lossy().into_owned());
    match target {
        Target::Safetensors => {
            for f in &files {
                let name = file_name(f);
                let dir = f.parent().unwrap_or(Path::new("."));
                if name == "model.safetensors" || name == "model.safetensors.index.json" {
                    let mut parts: Vec<(String, Vec<u8>)> = Vec::new();
                    for sib in ["config.json", name.as_str()] {
                        if let Ok(b) = std::fs::read(dir.join(sib)) {
                            parts.push((sib.to_string(), b));
                        }
                    }
                    if name.ends_with(".json") {
                        for s in files.iter().filter(|s| s.parent() == Some(dir)) {
                            let n = file_name(s);
                            if n.starts_with("model-") && n.ends_with(".safetensors") {
                                if let Ok(b) = std::fs::read(s) {
                                    parts.push((n, b));
                                }
                            }
                        }
                    }
                    let refs: Vec<(&str, &[u8])> = parts
                        .iter()
                        .map(|(n, b)| (n.as_str(), b.as_slice()))
                        .collect();
                    out.push((label(dir), pack(&refs)));
                    if let Some(small) = shrink_safetensors_dir(&parts) {
                        out.push((format!("{} (a few tensors)", label(dir)), small));
                    }
                } else if ext(f).as_deref() == Some("safetensors") {
                    // Small single files stand on their own as `model.safetensors`.
                    if let Ok(b) = std::fs::read(f) {
                        if b.len() <= 64 << 10 {
                            out.push((label(f), b));
                        }
                    }
                }
            }
        }
        Target::Gguf => {
            for f in files.iter().filter(|f| ext(f).as_deref() == Some("gguf")) {
                if let Ok(b) = std::fs::read(f) {
                    out.push((label(f), b));
                }
            }
        }
        Target::Pytorch => {
            for f in &files {
                let name = file_name(f);
                let dir = f.parent().unwrap_or(Path::new("."));
                if name == "pytorch_model.bin.index.json" {
                    let mut parts: Vec<(String, Vec<u8>)> = Vec::new();
                    if let Ok(b) = std::fs::read(f) {
                        parts.push((name.clone(), b));
                    }
                    for s in files.iter().filter(|s| s.parent() == Some(dir)) {
                        let n = file_name(s);
                        if n.starts_with("pytorch_model-") && n.ends_with(".bin") {
                            if let Ok(b) = std::fs::read(s) {
                                parts.push((n, b));
                            }
                        }
                    }
                    let refs: Vec<(&str, &[u8])> = parts
                        .iter()
                        .map(|(n, b)| (n.as_str(), b.as_slice()))
                        .collect();
                    out.push((label(f), pack(&refs)));
                } else if ext(f).as_deref() == Some("bin") {
                    if let Ok(b) = std::fs::read(f) {
                        out.push((label(f), b));
                    }
                }
            }
        }
        Target::Pickle => {
            for f in files.iter().filter(|f| ext(f).as_deref() == Some("bin")) {
                let Ok(b) = std::fs::read(f) else { continue };
                match zip::ZipArchive::new(Cursor::new(&b)) {
                    Ok(mut z) => {
                        for i in 0..z.len() {
                            let Ok(mut e) = z.by_index(i) else { continue };
                            if e.name().is_ok_and(|n| n.ends_with("/data.pkl")) {
                                let mut pkl = Vec::new();
                                if e.read_to_end(&mut pkl).is_ok() {
                                    out.push((format!("{}:data.pkl", label(f)), pkl));
                                }
                            }
                        }
                    }
                    Err(_) => out.push((label(f), b)),
                }
            }
        }
        Target::Sentencepiece => {
            for f in files.iter().filter(|f| file_name(f) == "tokenizer.model") {
                if let Ok(b) = std::fs::read(f) {
                    out.push((label(f), b));
                }
            }
        }
    }
    let mut own = Vec::new();
    walk(&fixtures.join("fuzz").join(target.name()), &mut own);
    own.sort();
    for f in own {
        if let Ok(b) = std::fs::read(&f) {
            out.push((label(&f), b));
        }
    }
    let mut seen = HashSet::new();
    out.retain(|(_, b)| seen.insert(b.clone()));
    out
}

/// A safetensors file with only the (at most `keep`) smallest tensors of `bytes`, and their
/// names: small seeds run many times faster than whole checkpoints.
fn shrink_safetensors(bytes: &[u8], keep: usize) -> Option<(Vec<u8>, Vec<String>)> {
    let n = u64::from_le_bytes(bytes.get(..8)?.try_into().ok()?) as usize;
    let header: serde_json::Value = serde_json::from_slice(bytes.get(8..8 + n)?).ok()?;
    let data = &bytes[8 + n..];
    let mut tensors: Vec<(&String, &serde_json::Value, usize, usize)> = header
        .as_object()?
        .iter()
        .filter(|(k, _)| k.as_str() != "__metadata__")
        .filter_map(|(k, v)| {
            let o = v.get("data_offsets")?;
            let (a, b) = (o.get(0)?.as_u64()? as usize, o.get(1)?.as_u64()? as usize);
            (a <= b && b <= data.len()).then_some((k, v, a, b))
        })
        .collect();
    tensors.sort_by_key(|&(k, _, a, b)| (b - a, k.clone()));
    tensors.truncate(keep);
    let mut out_header = serde_json::Map::new();
    if let Some(m) = header.get("__metadata__") {
        out_header.insert("__metadata__".into(), m.clone());
    }
    let mut out_data = Vec::new();
    for &(k, v, a, b) in &tensors {
        let mut v = v.clone();
        let start = out_data.len();
        out_data.extend_from_slice(&data[a..b]);
        v["data_offsets"] = serde_json::json!([start, out_data.len()]);
        out_header.insert(k.clone(), v);
    }
    let mut text = serde_json::to_vec(&out_header).ok()?;
    while text.len() % 8 != 0 {
        text.push(b' ');
    }
    let mut out = (text.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&text);
    out.extend_from_slice(&out_data);
    Some((out, tensors.iter().map(|t| t.0.clone()).collect()))
}

/// A model directory (as named files) cut down to a few tensors per file, its index (if
/// any) listing only those, packed as one input.
fn shrink_safetensors_dir(parts: &[(String, Vec<u8>)]) -> Option<Vec<u8>> {
    let mut files: Vec<(String, Vec<u8>)> = Vec::new();
    let mut weight_map = serde_json::Map::new();
    for (name, bytes) in parts {
        if name.ends_with(".safetensors") {
            let (small, names) = shrink_safetensors(bytes, 3)?;
            for t in names {
                weight_map.insert(t, name.clone().into());
            }
            files.push((name.clone(), small));
        } else if name != "model.safetensors.index.json" {
            files.push((name.clone(), bytes.clone()));
        }
    }
    if parts
        .iter()
        .any(|(n, _)| n == "model.safetensors.index.json")
    {
        let index = serde_json::json!({ "metadata": {}, "weight_map": weight_map });
        files.push((
            "model.safetensors.index.json".into(),
            serde_json::to_vec(&index).ok()?,
        ));
    }
    let refs: Vec<(&str, &[u8])> = files
        .iter()
        .map(|(n, b)| (n.as_str(), b.as_slice()))
        .collect();
    Some(pack(&refs))
}

fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let p = e.path();
        if p.is_dir() {
            walk(&p, out);
        } else if p.is_file() && p.file_name().is_none_or(|n| n != "README.md") {
            out.push(p);
        }
    }
}
