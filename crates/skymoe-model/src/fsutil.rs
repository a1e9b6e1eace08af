//! Writing files and directories so that an interrupted run never leaves a half-written one
//! under the final name. Each function takes the caller's constructor for I/O errors, so
//! every crate reports them in its own error type.

use std::fs::File;
use std::io::Write;
use std::path::Path;

/// Write `bytes` to `path` and flush them to disk.
pub fn write_synced<E>(
    path: &Path,
    bytes: &[u8],
    io_err: impl Fn(&Path, std::io::Error) -> E,
) -> Result<(), E> {
    let mut f = File::create(path).map_err(|e| io_err(path, e))?;
    f.write_all(bytes).map_err(|e| io_err(path, e))?;
    f.sync_all().map_err(|e| io_err(path, e))
}

/// Create `final_dir` atomically: `fill` writes into a temporary sibling directory which is
/// then renamed into place (replacing an older directory of that name). On failure the
/// temporary directory is removed and `final_dir` is untouched.
pub fn write_dir_atomically<E>(
    final_dir: &Path,
    io_err: impl Fn(&Path, std::io::Error) -> E,
    fill: impl FnOnce(&Path) -> Result<(), E>,
) -> Result<(), E> {
    let parent = match final_dir.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    std::fs::create_dir_all(parent).map_err(|e| io_err(parent, e))?;
    let name = final_dir
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_default();
    let tmp = parent.join(format!(".{name}.partial-{}", std::process::id()));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(|e| io_err(&tmp, e))?;
    }
    std::fs::create_dir_all(&tmp).map_err(|e| io_err(&tmp, e))?;
    if let Err(e) = fill(&tmp) {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e);
    }
    if final_dir.exists() {
        std::fs::remove_dir_all(final_dir).map_err(|e| io_err(final_dir, e))?;
    }
    std::fs::rename(&tmp, final_dir).map_err(|e| io_err(final_dir, e))?;
    File::open(parent)
        .and_then(|f| f.sync_all())
        .map_err(|e| io_err(parent, e))
}
