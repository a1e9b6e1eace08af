//! The container of a `torch.save` file: a zip archive with `<prefix>/data.pkl` (the pickle),
//! `<prefix>/data/<key>` (one entry per storage, stored uncompressed) and `<prefix>/byteorder`.
//!
//! Indexing reads the central directory and the pickle only; tensor bytes are read later,
//! straight from the file for a stored entry.

use std::collections::HashMap;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

use zip::{CompressionMethod, ZipArchive};

use super::layout::{gather, swap_to_little_endian};
use super::pickle::PickleError;
use super::records::{parse_state_dict, TensorRecord};
use crate::error::{ModelError, Result};

/// Largest `data.pkl` read (a state dict of a million tensors needs a few hundred MB).
const MAX_PICKLE_BYTES: u64 = 1 << 30;

/// The first bytes of a file written by `torch.save(..., _use_new_zipfile_serialization=False)`:
/// a protocol-2 pickle of the legacy magic number 0x1950a86a20f9469cfc6c.
const LEGACY_MAGIC: [u8; 14] = [
    0x80, 0x02, 0x8a, 0x0a, 0x6c, 0xfc, 0x9c, 0x46, 0xf9, 0x20, 0x6a, 0xa8, 0x50, 0x19,
];

/// Where a storage's bytes lie in the archive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StorageEntry {
    /// Full entry name in the zip.
    pub entry: String,
    /// Offset of the entry's data in the file.
    pub data_start: u64,
    /// Uncompressed size in bytes.
    pub size: u64,
    /// Whether the entry is stored uncompressed (so ranges can be read in place).
    pub stored: bool,
}

/// The index of one `torch.save` zip file: its tensors and where their storages lie.
#[derive(Debug, Clone)]
pub struct TorchArchive {
    /// Tensors in the order the state dict lists them.
    pub tensors: Vec<(String, TensorRecord)>,
    /// Storage key → entry.
    pub storages: HashMap<String, StorageEntry>,
    /// Whether the storages are big-endian (`byteorder` says `big`).
    pub big_endian: bool,
}

fn pickle_error(path: &Path, e: PickleError) -> ModelError {
    match e {
        PickleError::UnsafeGlobal(global) => ModelError::UnsafePickle {
            path: path.to_path_buf(),
            global,
        },
        PickleError::Malformed { .. } => ModelError::corrupt(path, e.to_string()),
        PickleError::Unsupported(reason) => ModelError::UnsupportedWeights {
            path: path.to_path_buf(),
            reason,
        },
    }
}

fn zip_error(path: &Path, e: zip::result::ZipError) -> ModelError {
    ModelError::corrupt(path, format!("not a readable zip archive: {e}"))
}

/// Refuse files that are not zip archives with a message saying what they are.
fn check_magic<R: Read + Seek>(reader: &mut R, path: &Path) -> Result<()> {
    let mut head = Vec::with_capacity(LEGACY_MAGIC.len());
    reader
        .by_ref()
        .take(LEGACY_MAGIC.len() as u64)
        .read_to_end(&mut head)
        .map_err(|e| ModelError::io(path, e))?;
    reader
        .seek(SeekFrom::Start(0))
        .map_err(|e| ModelError::io(path, e))?;
    if head.starts_with(b"PK\x03\x04") || head.starts_with(b"PK\x05\x06") {
        return Ok(());
    }
    let unsupported = |reason: &str| ModelError::UnsupportedWeights {
        path: path.to_path_buf(),
        reason: reason.to_string(),
    };
    if head == LEGACY_MAGIC {
        return Err(unsupported(
            "a legacy PyTorch file (saved with _use_new_zipfile_serialization=False); \
             re-save it with torch.save's default (zip) format",
        ));
    }
    if head.first() == Some(&0x80) {
        return Err(unsupported(
            "a bare pickle, not the zip archive torch.save writes",
        ));
    }
    Err(ModelError::corrupt(
        path,
        "not a zip archive (torch.save writes zip archives)",
    ))
}

impl TorchArchive {
    /// Index the torch zip file at `path`.
    pub fn open(path: &Path) -> Result<Self> {
        let f = std::fs::File::open(path).map_err(|e| ModelError::io(path, e))?;
        Self::from_reader(std::io::BufReader::new(f), path)
    }

    /// Index a torch zip archive from any reader; `path` names it in errors.
    pub fn from_reader<R: Read + Seek>(mut reader: R, path: &Path) -> Result<Self> {
        check_magic(&mut reader, path)?;
        let file_len = reader
            .seek(SeekFrom::End(0))
            .map_err(|e| ModelError::io(path, e))?;
        reader
            .seek(SeekFrom::Start(0))
            .map_err(|e| ModelError::io(path, e))?;
        let mut zip = ZipArchive::new(reader).map_err(|e| zip_error(path, e))?;

        let mut prefix: Option<String> = None;
        for name in zip.file_names() {
            let Ok(name) = name else { continue };
            let Some(p) = name.strip_suffix("/data.pkl") else {
                continue;
            };
            if p.contains('/') {
                continue;
            }
            if prefix.is_some() {
                return Err(ModelError::corrupt(path, "the archive holds two data.pkl"));
            }
            prefix = Some(p.to_string());
        }
        let prefix = prefix.ok_or_else(|| ModelError::UnsupportedWeights {
            path: path.to_path_buf(),
            reason: "a zip archive without <name>/data.pkl, not a torch.save file".into(),
        })?;

        let pickle = read_entry(
            &mut zip,
            &format!("{prefix}/data.pkl"),
            path,
            MAX_PICKLE_BYTES,
        )?;
        let big_endian = match zip.index_for_name(&format!("{prefix}/byteorder")) {
            None => false,
            Some(_) => {
                let order = read_entry(&mut zip, &format!("{prefix}/byteorder"), path, 16)?;
                match order.as_slice() {
                    b"little" => false,
                    b"big" => true,
                    _ => {
                        return Err(ModelError::corrupt(
                            path,
                            "byteorder is neither little nor big",
                        ))
                    }
                }
            }
        };

        let data_dir = format!("{prefix}/data/");
        let mut storages = HashMap::new();
        for i in 0..zip.len() {
            let f = zip.by_index_raw(i).map_err(|e| zip_error(path, e))?;
            let Ok(name) = f.name() else { continue };
            let Some(key) = name.strip_prefix(&data_dir) else {
                continue;
            };
            let key = key.to_string();
            let entry = name.to_string();
            if f.encrypted() {
                return Err(ModelError::UnsupportedWeights {
                    path: path.to_path_buf(),
                    reason: format!("entry {entry} is encrypted"),
                });
            }
            let stored = f.compression() == CompressionMethod::Stored;
            let data_start = f
                .data_start()
                .ok_or_else(|| ModelError::corrupt(path, format!("entry {entry} has no data")))?;
            if data_start
                .checked_add(f.compressed_size())
                .is_none_or(|e| e > file_len)
            {
                return Err(ModelError::corrupt(
                    path,
                    format!("entry {entry} runs past the end of the file"),
                ));
            }
            if stored && f.compressed_size() != f.size() {
                return Err(ModelError::corrupt(
                    path,
                    format!("stored entry {entry} has two sizes"),
                ));
            }
            storages.insert(
                key,
                StorageEntry {
                    entry,
                    data_start,
                    size: f.size(),
                    stored,
                },
            );
        }

        let tensors = parse_state_dict(&pickle).map_err(|e| pickle_error(path, e))?;
        for (name, t) in &tensors {
            let bad =
                |reason: String| ModelError::corrupt(path, format!("tensor {name}: {reason}"));
            let entry = storages.get(&t.storage.key).ok_or_else(|| {
                bad(format!(
                    "its storage data/{} is not in the archive",
                    t.storage.key
                ))
            })?;
            let need = t
                .storage
                .nbytes()
                .ok_or_else(|| bad("storage size overflows".into()))?;
            if (need as u64) > entry.size {
                return Err(bad(format!(
                    "its storage data/{} holds {} bytes but should hold {need}",
                    t.storage.key, entry.size
                )));
            }
            t.byte_span().map_err(bad)?;
        }
        Ok(TorchArchive {
            tensors,
            storages,
            big_endian,
        })
    }

    /// A tensor's elements in row-major order and little-endian, read from `path`.
    pub fn tensor_bytes(&self, path: &Path, name: &str, t: &TensorRecord) -> Result<Vec<u8>> {
        let f = std::fs::File::open(path).map_err(|e| ModelError::io(path, e))?;
        self.tensor_bytes_from(f, path, name, t)
    }

    /// As [`TorchArchive::tensor_bytes`], from any reader over the same archive.
    pub fn tensor_bytes_from<R: Read + Seek>(
        &self,
        reader: R,
        path: &Path,
        name: &str,
        t: &TensorRecord,
    ) -> Result<Vec<u8>> {
        let bad = |reason: String| ModelError::corrupt(path, format!("tensor {name}: {reason}"));
        let (start, end) = t.byte_span().map_err(bad)?;
        let span = self.read_storage_range_from(reader, path, &t.storage.key, start, end)?;
        let mut bytes =
            gather(t, &span).ok_or_else(|| bad("its view does not fit its storage".into()))?;
        if self.big_endian {
            swap_to_little_endian(&mut bytes, t.dtype);
        }
        Ok(bytes)
    }

    /// The bytes `[start, end)` of a tensor's storage, read from `path` (for a stored entry, in
    /// place; a compressed entry is inflated).
    pub fn read_storage_range(
        &self,
        path: &Path,
        key: &str,
        start: usize,
        end: usize,
    ) -> Result<Vec<u8>> {
        let f = std::fs::File::open(path).map_err(|e| ModelError::io(path, e))?;
        self.read_storage_range_from(f, path, key, start, end)
    }

    /// As [`TorchArchive::read_storage_range`], from any reader over the same archive.
    pub fn read_storage_range_from<R: Read + Seek>(
        &self,
        mut reader: R,
        path: &Path,
        key: &str,
        start: usize,
        end: usize,
    ) -> Result<Vec<u8>> {
        let entry = self.storages.get(key).ok_or_else(|| {
            ModelError::corrupt(path, format!("storage data/{key} is not in the archive"))
        })?;
        let len = end
            .checked_sub(start)
            .filter(|_| end as u64 <= entry.size)
            .ok_or_else(|| {
                ModelError::corrupt(path, format!("bytes {start}..{end} of storage data/{key}"))
            })?;
        if entry.stored {
            let mut buf = vec![0u8; len];
            reader
                .seek(SeekFrom::Start(entry.data_start + start as u64))
                .and_then(|_| reader.read_exact(&mut buf))
                .map_err(|e| ModelError::io(path, e))?;
            return Ok(buf);
        }
        let mut zip = ZipArchive::new(reader).map_err(|e| zip_error(path, e))?;
        let all = read_entry(&mut zip, &entry.entry, path, entry.size)?;
        all.get(start..end).map(<[u8]>::to_vec).ok_or_else(|| {
            ModelError::corrupt(
                path,
                format!("entry {} is shorter than it says", entry.entry),
            )
        })
    }
}

/// Read (and inflate) a whole entry of at most `max` bytes, checking its declared size.
fn read_entry<R: Read + Seek>(
    zip: &mut ZipArchive<R>,
    name: &str,
    path: &Path,
    max: u64,
) -> Result<Vec<u8>> {
    let f = zip.by_name(name).map_err(|e| match e {
        zip::result::ZipError::UnsupportedArchive(_)
        | zip::result::ZipError::CompressionMethodNotSupported(_) => {
            ModelError::UnsupportedWeights {
                path: path.to_path_buf(),
                reason: format!("entry {name}: {e}"),
            }
        }
        e => zip_error(path, e),
    })?;
    let declared = f.size();
    if declared > max {
        return Err(ModelError::UnsupportedWeights {
            path: path.to_path_buf(),
            reason: format!("entry {name} is {declared} bytes, more than the {max} allowed"),
        });
    }
    let mut out = Vec::new();
    f.take(declared.saturating_add(1))
        .read_to_end(&mut out)
        .map_err(|e| ModelError::corrupt(path, format!("entry {name}: {e}")))?;
    if out.len() as u64 != declared {
        return Err(ModelError::corrupt(
            path,
            format!("entry {name} holds {} bytes but says {declared}", out.len()),
        ));
    }
    Ok(out)
}
