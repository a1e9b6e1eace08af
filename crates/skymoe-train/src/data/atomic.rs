//! Atomic file writes: a temporary file in the target's directory, fsynced and renamed over
//! the target, so an interrupted write never leaves a partial file under the final name.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use super::error::{DataError, Result};

/// Write `target` atomically: `fill` writes the content into a fresh temporary file beside
/// `target` (its name starts with a dot, so corpus readers skip it); the file is then
/// fsynced, renamed over `target`, and the directory fsynced. On any error the temporary file
/// is removed and `target` is left untouched. `fill` gets the temporary file and its path (for
/// error messages).
pub(crate) fn write_atomically_with<T>(
    target: &Path,
    fill: impl FnOnce(&mut File, &Path) -> Result<T>,
) -> Result<T> {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let name = target.file_name().ok_or_else(|| {
        DataError::InvalidArgument(format!("{} is not a file path", target.display()))
    })?;
    let dir = parent_dir(target);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let tmp = dir.join(format!(
        ".{}.tmp-{}-{n}",
        name.to_string_lossy(),
        std::process::id()
    ));
    let mut file = OpenOptions::new()
        .write(true)
        .read(true)
        .create_new(true)
        .open(&tmp)
        .map_err(|e| DataError::io(&tmp, e))?;
    let guard = RemoveOnDrop(Some(tmp.clone()));
    let written = fill(&mut file, &tmp).and_then(|v| {
        file.sync_all().map_err(|e| DataError::io(&tmp, e))?;
        Ok(v)
    });
    // Close before renaming or removing (required on some platforms).
    drop(file);
    let value = written?;
    std::fs::rename(&tmp, target).map_err(|e| DataError::io(target, e))?;
    guard.disarm();
    // The rename is durable once the directory entry is; not every platform lets a directory
    // be opened and synced, so this is best effort.
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(value)
}

/// Write `bytes` to `target` atomically.
pub(crate) fn write_atomically(target: &Path, bytes: &[u8]) -> Result<()> {
    write_atomically_with(target, |f, tmp| {
        f.write_all(bytes).map_err(|e| DataError::io(tmp, e))
    })
}

/// Removes the temporary file unless disarmed.
struct RemoveOnDrop(Option<PathBuf>);

impl RemoveOnDrop {
    fn disarm(mut self) {
        self.0 = None;
    }
}

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// The directory a relative or absolute file path lives in (`.` for a bare file name).
fn parent_dir(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}
