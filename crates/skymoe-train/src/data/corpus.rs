//! Corpus reading: files and directories of documents, streamed one document at a time.
//!
//! - A `.jsonl` file (any case) holds one JSON value per line; a line that is an object with a
//!   string field `text` is a document. Blank lines, and lines that are valid JSON but have no
//!   string `text` (or an empty one), are skipped; the latter are counted in
//!   [`CorpusStats::skipped_lines`]. Malformed JSON is an error naming the file and line.
//! - Any other file is one document: its whole content.
//! - Directories are walked recursively in sorted order (byte-wise by name), skipping hidden
//!   entries (names starting with `.`) and anything that is neither a file nor a directory.
//!   Paths given explicitly are always read, hidden or not. Each file and directory is read
//!   once, at its first occurrence (naming it twice, or reaching it again through a symbolic
//!   link, does not repeat it; this also stops directory cycles).
//! - Text must be UTF-8 (a leading byte-order mark is dropped); anything else is an error
//!   naming the file (and the line, in JSONL), never lossy decoding.
//! - Empty documents are skipped.

use std::collections::HashSet;
use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::error::{DataError, Result};

/// A set of input files, resolved from files and directories.
#[derive(Debug, Clone)]
pub struct Corpus {
    inputs: Vec<PathBuf>,
    files: Vec<PathBuf>,
}

/// One document of a corpus.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Document {
    /// The text (UTF-8, non-empty).
    pub text: String,
    /// The file it came from.
    pub path: Arc<Path>,
    /// Its 1-based line, for JSONL files.
    pub line: Option<u64>,
}

/// Counts gathered while reading a corpus.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CorpusStats {
    /// Files opened so far.
    pub files: u64,
    /// Documents yielded.
    pub documents: u64,
    /// Bytes of UTF-8 text in the documents yielded.
    pub bytes: u64,
    /// JSONL lines that were valid JSON but held no (non-empty) string `text` field.
    pub skipped_lines: u64,
}

impl Corpus {
    /// Resolve `inputs` (files and directories) into the sorted list of files to read.
    ///
    /// Errors: [`DataError::NoInputs`] for an empty list, [`DataError::Io`] for a path that
    /// cannot be read. A corpus with no files is not an error here; reading it yields nothing.
    pub fn new<P: AsRef<Path>>(inputs: &[P]) -> Result<Self> {
        if inputs.is_empty() {
            return Err(DataError::NoInputs);
        }
        let inputs: Vec<PathBuf> = inputs.iter().map(|p| p.as_ref().to_path_buf()).collect();
        let mut walk = Walk::default();
        for input in &inputs {
            let meta = std::fs::metadata(input).map_err(|e| DataError::io(input, e))?;
            if meta.is_dir() {
                walk.dir(input)?;
            } else {
                walk.file(input)?;
            }
        }
        Ok(Corpus {
            inputs,
            files: walk.files,
        })
    }

    /// The paths the corpus was made from.
    pub fn inputs(&self) -> &[PathBuf] {
        &self.inputs
    }

    /// The files to read, in reading order.
    pub fn files(&self) -> &[PathBuf] {
        &self.files
    }

    /// Stream the documents, in order. The iterator stops after the first error.
    pub fn documents(&self) -> Documents<'_> {
        Documents {
            files: &self.files,
            next_file: 0,
            jsonl: None,
            stats: CorpusStats::default(),
            failed: false,
        }
    }

    /// The error for a corpus that yielded no documents.
    pub fn empty_error(&self) -> DataError {
        DataError::EmptyCorpus {
            inputs: self.inputs.clone(),
        }
    }
}

/// Collects the files to read, each once.
#[derive(Default)]
struct Walk {
    files: Vec<PathBuf>,
    /// Canonical paths of the files and directories seen.
    seen: HashSet<PathBuf>,
}

impl Walk {
    /// Whether `path` (by its canonical path) is new.
    fn first_visit(&mut self, path: &Path) -> Result<bool> {
        let canonical = std::fs::canonicalize(path).map_err(|e| DataError::io(path, e))?;
        let new = self.seen.insert(canonical);
        if !new {
            tracing::debug!("skipping {}: already read", path.display());
        }
        Ok(new)
    }

    fn file(&mut self, path: &Path) -> Result<()> {
        if self.first_visit(path)? {
            self.files.push(path.to_path_buf());
        }
        Ok(())
    }

    /// Add the files under `dir`, depth first, entries sorted by name.
    fn dir(&mut self, dir: &Path) -> Result<()> {
        if !self.first_visit(dir)? {
            return Ok(());
        }
        let mut entries = Vec::new();
        for entry in std::fs::read_dir(dir).map_err(|e| DataError::io(dir, e))? {
            let entry = entry.map_err(|e| DataError::io(dir, e))?;
            if entry.file_name().as_encoded_bytes().first() == Some(&b'.') {
                continue;
            }
            entries.push(entry.path());
        }
        entries.sort_by(|a, b| {
            a.file_name()
                .map(|n| n.as_encoded_bytes())
                .cmp(&b.file_name().map(|n| n.as_encoded_bytes()))
        });
        for path in entries {
            // Follows symbolic links.
            let meta = std::fs::metadata(&path).map_err(|e| DataError::io(&path, e))?;
            if meta.is_dir() {
                self.dir(&path)?;
            } else if meta.is_file() {
                self.file(&path)?;
            } else {
                tracing::debug!("skipping {}: not a regular file", path.display());
            }
        }
        Ok(())
    }
}

/// Whether a file is read as JSONL.
fn is_jsonl(path: &Path) -> bool {
    path.extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("jsonl"))
}

/// An open JSONL file being read line by line.
struct JsonlReader {
    path: Arc<Path>,
    reader: BufReader<File>,
    line: u64,
    buf: Vec<u8>,
}

/// Streaming iterator over the documents of a [`Corpus`]; yields `Result<Document>` and stops
/// after the first error.
pub struct Documents<'a> {
    files: &'a [PathBuf],
    next_file: usize,
    jsonl: Option<JsonlReader>,
    stats: CorpusStats,
    failed: bool,
}

impl Documents<'_> {
    /// Counts so far (final once the iterator is exhausted).
    pub fn stats(&self) -> CorpusStats {
        self.stats
    }

    /// The next document of the open JSONL file, or `None` at its end.
    fn next_jsonl(&mut self) -> Option<Result<Document>> {
        let r = self.jsonl.as_mut()?;
        loop {
            r.buf.clear();
            match r.reader.read_until(b'\n', &mut r.buf) {
                Ok(0) => {
                    self.jsonl = None;
                    return None;
                }
                Ok(_) => {}
                Err(e) => return Some(Err(DataError::io(&*r.path, e))),
            }
            r.line += 1;
            let line = r.line;
            let Ok(text) = std::str::from_utf8(&r.buf) else {
                return Some(Err(DataError::NotUtf8 {
                    path: r.path.to_path_buf(),
                    line: Some(line),
                }));
            };
            let text = if line == 1 { strip_bom(text) } else { text };
            if text.trim().is_empty() {
                continue;
            }
            let value: serde_json::Value = match serde_json::from_str(text) {
                Ok(v) => v,
                Err(e) => {
                    return Some(Err(DataError::BadJsonl {
                        path: r.path.to_path_buf(),
                        line,
                        reason: e.to_string(),
                    }))
                }
            };
            match value {
                serde_json::Value::Object(mut m) => match m.remove("text") {
                    Some(serde_json::Value::String(s)) if !s.is_empty() => {
                        self.stats.documents += 1;
                        self.stats.bytes += s.len() as u64;
                        return Some(Ok(Document {
                            text: s,
                            path: r.path.clone(),
                            line: Some(line),
                        }));
                    }
                    _ => self.stats.skipped_lines += 1,
                },
                _ => self.stats.skipped_lines += 1,
            }
        }
    }

    /// Open the next file: a JSONL file becomes the current reader (`Ok(None)`), any other
    /// file is read whole and returned (`Ok(Some)` unless empty).
    fn open_next_file(&mut self) -> Option<Result<Option<Document>>> {
        let path = self.files.get(self.next_file)?;
        self.next_file += 1;
        self.stats.files += 1;
        let shared: Arc<Path> = Arc::from(path.as_path());
        if is_jsonl(path) {
            let file = match File::open(path) {
                Ok(f) => f,
                Err(e) => return Some(Err(DataError::io(path, e))),
            };
            self.jsonl = Some(JsonlReader {
                path: shared,
                reader: BufReader::with_capacity(1 << 20, file),
                line: 0,
                buf: Vec::new(),
            });
            return Some(Ok(None));
        }
        let bytes = match std::fs::read(path) {
            Ok(b) => b,
            Err(e) => return Some(Err(DataError::io(path, e))),
        };
        let mut text = match String::from_utf8(bytes) {
            Ok(t) => t,
            Err(_) => {
                return Some(Err(DataError::NotUtf8 {
                    path: path.clone(),
                    line: None,
                }))
            }
        };
        if text.starts_with('\u{FEFF}') {
            text.drain(..'\u{FEFF}'.len_utf8());
        }
        if text.is_empty() {
            return Some(Ok(None));
        }
        self.stats.documents += 1;
        self.stats.bytes += text.len() as u64;
        Some(Ok(Some(Document {
            text,
            path: shared,
            line: None,
        })))
    }
}

impl Iterator for Documents<'_> {
    type Item = Result<Document>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.failed {
            return None;
        }
        let item = loop {
            if let Some(item) = self.next_jsonl() {
                break Some(item);
            }
            match self.open_next_file() {
                None => break None,
                Some(Ok(None)) => continue,
                Some(Ok(Some(doc))) => break Some(Ok(doc)),
                Some(Err(e)) => break Some(Err(e)),
            }
        };
        if matches!(item, Some(Err(_))) {
            self.failed = true;
            self.jsonl = None;
        }
        item
    }
}

fn strip_bom(s: &str) -> &str {
    s.strip_prefix('\u{FEFF}').unwrap_or(s)
}
