//! Converting a PyTorch model directory to safetensors: each `.bin` shard becomes a
//! `.safetensors` shard of the same tensors in their stored dtype, the index is rewritten, and
//! every other file of the directory (config, tokenizer, ...) is copied. Every file is written
//! to a temporary name in the output directory, flushed to disk and renamed into place.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use super::pytorch::{PytorchCheckpoint, INDEX_FILE};
use crate::error::{ModelError, Result};

/// Name of the index of a sharded safetensors checkpoint.
const SAFETENSORS_INDEX: &str = "model.safetensors.index.json";

/// What a conversion wrote.
#[derive(Debug, Clone)]
pub struct ConvertSummary {
    /// The output directory.
    pub out: PathBuf,
    /// The safetensors files written (and the index, when sharded), in order.
    pub weight_files: Vec<PathBuf>,
    /// Number of tensors written.
    pub tensors: usize,
    /// Bytes of tensor data written.
    pub total_bytes: u64,
    /// The other files copied from the model directory.
    pub copied: Vec<PathBuf>,
}

/// The safetensors name of a PyTorch weight file: `pytorch_model-00001-of-00002.bin` →
/// `model-00001-of-00002.safetensors`, `pytorch_model.bin` → `model.safetensors`.
pub fn safetensors_name(bin_name: &str) -> String {
    let stem = bin_name.strip_suffix(".bin").unwrap_or(bin_name);
    match stem.strip_prefix("pytorch_model") {
        Some(rest) => format!("model{rest}.safetensors"),
        None => format!("{stem}.safetensors"),
    }
}

/// Whether a file name is a weight file or a weight index of any format skymoe reads.
fn is_weight_file(name: &str) -> bool {
    [".safetensors", ".bin", ".gguf", ".pt", ".pth"]
        .iter()
        .any(|ext| name.ends_with(ext))
        || name == INDEX_FILE
        || name == SAFETENSORS_INDEX
}

fn file_name(p: &Path) -> String {
    p.file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_default()
}

/// Check that `out` may receive the conversion of `src`, creating it if needed.
fn prepare_out(src: &Path, out: &Path) -> Result<()> {
    let refuse = |reason: String| {
        ModelError::InvalidInput(format!("output directory {}: {reason}", out.display()))
    };
    if out.exists() {
        if !out.is_dir() {
            return Err(refuse("it is not a directory".into()));
        }
        let same = match (src.canonicalize(), out.canonicalize()) {
            (Ok(a), Ok(b)) => a == b,
            _ => false,
        };
        if same {
            return Err(refuse("it is the model directory itself".into()));
        }
        let entries = std::fs::read_dir(out).map_err(|e| ModelError::io(out, e))?;
        for e in entries {
            let e = e.map_err(|e| ModelError::io(out, e))?;
            let name = e.file_name().to_string_lossy().to_string();
            if is_weight_file(&name) {
                return Err(refuse(format!("it already holds weights ({name})")));
            }
        }
        Ok(())
    } else {
        std::fs::create_dir_all(out).map_err(|e| ModelError::io(out, e))
    }
}

/// Write `path` through a temporary sibling: `fill` writes the content, which is flushed to
/// disk before the rename. On failure the temporary file is removed.
fn write_atomically(
    path: &Path,
    fill: impl FnOnce(&mut BufWriter<File>) -> Result<()>,
) -> Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let tmp = dir.join(format!(".{}.tmp-{}", file_name(path), std::process::id()));
    let result = (|| {
        let f = File::create(&tmp).map_err(|e| ModelError::io(&tmp, e))?;
        let mut w = BufWriter::new(f);
        fill(&mut w)?;
        let f = w
            .into_inner()
            .map_err(|e| ModelError::io(&tmp, e.into_error()))?;
        f.sync_all().map_err(|e| ModelError::io(&tmp, e))?;
        std::fs::rename(&tmp, path).map_err(|e| ModelError::io(path, e))
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Write the tensors `names` of `ckpt` as one safetensors file; returns the data bytes.
fn write_shard(ckpt: &PytorchCheckpoint, names: &[String], path: &Path) -> Result<u64> {
    let mut header = serde_json::Map::new();
    let mut sizes = Vec::with_capacity(names.len());
    let mut offset = 0usize;
    for name in names {
        let t = ckpt.record(name)?;
        let dtype = t
            .dtype
            .safetensors()
            .ok_or_else(|| ModelError::UnsupportedDtype {
                name: name.clone(),
                dtype: t.dtype.name().to_string(),
            })?;
        let size = t
            .numel()
            .and_then(|n| n.checked_mul(t.dtype.size()))
            .ok_or_else(|| ModelError::InvalidInput(format!("tensor {name} is too large")))?;
        let end = offset
            .checked_add(size)
            .ok_or_else(|| ModelError::InvalidInput("checkpoint is too large".into()))?;
        header.insert(
            name.clone(),
            serde_json::json!({
                "dtype": dtype,
                "shape": t.shape,
                "data_offsets": [offset, end],
            }),
        );
        sizes.push(size);
        offset = end;
    }
    header.insert("__metadata__".into(), serde_json::json!({ "format": "pt" }));
    let mut header = serde_json::to_vec(&header)
        .map_err(|e| ModelError::InvalidInput(format!("cannot encode a header: {e}")))?;
    header.resize(header.len().next_multiple_of(8), b' ');
    write_atomically(path, |w| {
        let io = |e| ModelError::io(path, e);
        w.write_all(&(header.len() as u64).to_le_bytes())
            .map_err(io)?;
        w.write_all(&header).map_err(io)?;
        for (name, &size) in names.iter().zip(&sizes) {
            let (_, _, bytes) = ckpt.raw(name)?;
            if bytes.len() != size {
                return Err(ModelError::InvalidInput(format!(
                    "tensor {name} read {} bytes, expected {size}",
                    bytes.len()
                )));
            }
            w.write_all(&bytes).map_err(io)?;
        }
        Ok(())
    })?;
    Ok(offset as u64)
}

/// Convert the PyTorch weights of model directory `src` to safetensors in `out` (created if
/// needed), copying the directory's other files. Refuses to write into `src` itself or into a
/// directory that already holds weights.
pub fn convert_pytorch_dir(src: &Path, out: &Path) -> Result<ConvertSummary> {
    if !src.is_dir() {
        return Err(ModelError::io(
            src,
            std::io::Error::new(std::io::ErrorKind::NotFound, "no such directory"),
        ));
    }
    let sharded = src.join(INDEX_FILE).is_file();
    let files = PytorchCheckpoint::dir_files(src)?;
    // Every shard is parsed (and refused if unsafe or corrupt) before anything is written.
    let ckpt = PytorchCheckpoint::open_files(&files)?;
    prepare_out(src, out)?;

    let mut weight_files = Vec::new();
    let mut weight_map = BTreeMap::new();
    let (mut tensors, mut total_bytes) = (0usize, 0u64);
    for file in ckpt.files() {
        let target_name = if sharded {
            safetensors_name(&file_name(&file))
        } else {
            "model.safetensors".to_string()
        };
        let target = out.join(&target_name);
        if weight_files.contains(&target) {
            return Err(ModelError::InvalidInput(format!(
                "two shards would both be written to {target_name}"
            )));
        }
        let mut names = ckpt.names_in(&file);
        names.sort();
        total_bytes += write_shard(&ckpt, &names, &target)?;
        tensors += names.len();
        for n in names {
            weight_map.insert(n, target_name.clone());
        }
        weight_files.push(target);
    }
    if sharded {
        let index = serde_json::json!({
            "metadata": { "total_size": total_bytes },
            "weight_map": weight_map,
        });
        let text = serde_json::to_vec_pretty(&index)
            .map_err(|e| ModelError::InvalidInput(format!("cannot encode the index: {e}")))?;
        let path = out.join(SAFETENSORS_INDEX);
        write_atomically(&path, |w| {
            w.write_all(&text).map_err(|e| ModelError::io(&path, e))
        })?;
        weight_files.push(path);
    }

    let mut copied = Vec::new();
    let mut entries: Vec<PathBuf> = std::fs::read_dir(src)
        .map_err(|e| ModelError::io(src, e))?
        .map(|e| e.map(|e| e.path()).map_err(|e| ModelError::io(src, e)))
        .collect::<Result<_>>()?;
    entries.sort();
    for p in entries {
        let name = file_name(&p);
        if !p.is_file() || is_weight_file(&name) {
            continue;
        }
        let target = out.join(&name);
        write_atomically(&target, |w| {
            let mut f = File::open(&p).map_err(|e| ModelError::io(&p, e))?;
            std::io::copy(&mut f, w).map_err(|e| ModelError::io(&p, e))?;
            Ok(())
        })?;
        copied.push(target);
    }
    File::open(out)
        .and_then(|f| f.sync_all())
        .map_err(|e| ModelError::io(out, e))?;
    Ok(ConvertSummary {
        out: out.to_path_buf(),
        weight_files,
        tensors,
        total_bytes,
        copied,
    })
}
