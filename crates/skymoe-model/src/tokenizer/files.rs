//! The files that make up a model directory's tokenizer, and copying them to another model
//! directory (upcycled, quantised or trained checkpoints).

use std::path::Path;

use crate::error::{ModelError, Result};

/// The tokenizer files of a Hugging Face model directory, in the order they are copied.
pub const TOKENIZER_FILES: [&str; 6] = [
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
];

/// Whether a model directory has a tokenizer skymoe can load (`tokenizer.json` or
/// `tokenizer.model`).
pub fn has_tokenizer(dir: &Path) -> bool {
    dir.join("tokenizer.json").is_file() || dir.join("tokenizer.model").is_file()
}

/// Copy the [`TOKENIZER_FILES`] that exist in the directory `from` into the directory `to`;
/// returns the names copied. Each copy is synced to disk. A `from` that is not a directory (a
/// GGUF file) copies nothing.
pub fn copy_tokenizer_files(from: &Path, to: &Path) -> Result<Vec<&'static str>> {
    let mut copied = Vec::new();
    if !from.is_dir() {
        return Ok(copied);
    }
    for name in TOKENIZER_FILES {
        let src = from.join(name);
        if src.is_file() {
            let dst = to.join(name);
            std::fs::copy(&src, &dst)
                .and_then(|_| std::fs::File::open(&dst)?.sync_all())
                .map_err(|e| ModelError::io(&dst, e))?;
            copied.push(name);
        }
    }
    Ok(copied)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copies_only_what_exists() {
        let from = tempfile::tempdir().unwrap();
        let to = tempfile::tempdir().unwrap();
        std::fs::write(from.path().join("tokenizer.model"), b"x").unwrap();
        std::fs::write(from.path().join("tokenizer_config.json"), b"{}").unwrap();
        std::fs::write(from.path().join("config.json"), b"{}").unwrap();
        let copied = copy_tokenizer_files(from.path(), to.path()).unwrap();
        assert_eq!(copied, vec!["tokenizer.model", "tokenizer_config.json"]);
        assert!(has_tokenizer(to.path()));
        assert!(!to.path().join("config.json").exists());
        let none = copy_tokenizer_files(&from.path().join("model.gguf"), to.path()).unwrap();
        assert!(none.is_empty());
    }
}
