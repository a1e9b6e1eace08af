//! Models named by Hugging Face hub id (`org/name`), resolved offline from the local hub cache
//! exactly where transformers finds them with `HF_HUB_OFFLINE=1`. Nothing is ever downloaded.
//!
//! The cache directory is `$HF_HUB_CACHE` (or the older `$HUGGINGFACE_HUB_CACHE`), else
//! `$HF_HOME/hub`, else `$XDG_CACHE_HOME/huggingface/hub`, else `~/.cache/huggingface/hub`.
//! A repository `org/name` lives in `models--org--name/`; `refs/<revision>` holds the commit
//! hash of a branch or tag, and `snapshots/<commit>/` the files of that commit.
//!
//! `org/name` resolves to the snapshot of `refs/main`; `org/name@rev` to the snapshot of the
//! branch or tag `rev`, or to `snapshots/rev` when `rev` is a commit hash.

use std::path::{Path, PathBuf};

/// Why a hub id could not be resolved.
#[derive(Debug, thiserror::Error)]
pub enum HubError {
    /// The id is not in the local cache (or its snapshot is incomplete).
    #[error(
        "model `{id}` is not a local path and was not found in the Hugging Face cache \
         (skymoe never downloads; fetch it first, e.g. `huggingface-cli download {repo}`); looked in: {}",
        .looked.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ")
    )]
    NotCached {
        /// The id as given.
        id: String,
        /// The repository part of the id.
        repo: String,
        /// Every place looked at, in order.
        looked: Vec<PathBuf>,
    },
}

/// The hub cache directory from the environment, as huggingface_hub computes it.
pub fn cache_dir() -> Option<PathBuf> {
    cache_dir_from(|k| std::env::var_os(k))
}

fn cache_dir_from(env: impl Fn(&str) -> Option<std::ffi::OsString>) -> Option<PathBuf> {
    let set = |k: &str| env(k).filter(|v| !v.is_empty()).map(PathBuf::from);
    set("HF_HUB_CACHE")
        .or_else(|| set("HUGGINGFACE_HUB_CACHE"))
        .or_else(|| set("HF_HOME").map(|h| h.join("hub")))
        .or_else(|| set("XDG_CACHE_HOME").map(|c| c.join("huggingface").join("hub")))
        .or_else(|| set("HOME").map(|h| h.join(".cache").join("huggingface").join("hub")))
}

/// Split `org/name[@rev]` into repository and revision, or `None` when `s` is not shaped like
/// a hub id (one slash, two non-empty parts of letters, digits, `-`, `_` and `.`, not `.`/`..`).
pub fn parse_hub_id(s: &str) -> Option<(&str, &str)> {
    let (repo, rev) = match s.split_once('@') {
        Some((repo, rev)) if !rev.is_empty() && !rev.contains(['/', '\\']) && rev != ".." => {
            (repo, rev)
        }
        Some(_) => return None,
        None => (s, "main"),
    };
    let (org, name) = repo.split_once('/')?;
    let part_ok = |p: &str| {
        !p.is_empty()
            && p != "."
            && p != ".."
            && p.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    };
    (part_ok(org) && part_ok(name)).then_some((repo, rev))
}

/// Resolve a model argument: an existing path is returned as it is; otherwise a hub id
/// `org/name[@rev]` is looked up in the local cache ([`cache_dir`]).
pub fn resolve_model_path(arg: &Path) -> Result<PathBuf, HubError> {
    resolve_in(arg, cache_dir().as_deref())
}

/// [`resolve_model_path`] against an explicit cache directory (`None`: no cache known).
pub fn resolve_in(arg: &Path, cache: Option<&Path>) -> Result<PathBuf, HubError> {
    if arg.exists() {
        return Ok(arg.to_path_buf());
    }
    let text = arg.to_string_lossy();
    let Some((repo, rev)) = parse_hub_id(&text) else {
        // Not an id: leave the missing path to the loader, which names it in its error.
        return Ok(arg.to_path_buf());
    };
    let mut looked = vec![arg.to_path_buf()];
    if let Some(cache) = cache {
        let repo_dir = cache.join(format!("models--{}", repo.replace('/', "--")));
        let snapshots = repo_dir.join("snapshots");
        let by_ref = repo_dir.join("refs").join(rev);
        looked.push(by_ref.clone());
        let commit = std::fs::read_to_string(&by_ref)
            .ok()
            .map(|c| c.trim().to_string())
            .filter(|c| parse_commit(c));
        let candidates = commit
            .into_iter()
            .chain(parse_commit(rev).then(|| rev.to_string()));
        for c in candidates {
            let snap = snapshots.join(&c);
            looked.push(snap.clone());
            if snap.is_dir() {
                return Ok(snap);
            }
        }
    }
    Err(HubError::NotCached {
        repo: repo.to_string(),
        id: text.to_string(),
        looked,
    })
}

/// Whether `s` looks like a git commit hash (hex, 7 to 64 characters).
fn parse_commit(s: &str) -> bool {
    (7..=64).contains(&s.len()) && s.chars().all(|c| c.is_ascii_hexdigit())
}

#[cfg(test)]
mod tests {
    use super::*;

    const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";

    fn cache_with(repo: &str, refs: &[(&str, &str)], snapshots: &[&str]) -> tempfile::TempDir {
        let d = tempfile::tempdir().unwrap();
        let r = d
            .path()
            .join(format!("models--{}", repo.replace('/', "--")));
        std::fs::create_dir_all(r.join("refs")).unwrap();
        for (name, commit) in refs {
            std::fs::write(r.join("refs").join(name), commit).unwrap();
        }
        for s in snapshots {
            std::fs::create_dir_all(r.join("snapshots").join(s)).unwrap();
            std::fs::write(r.join("snapshots").join(s).join("config.json"), "{}").unwrap();
        }
        d
    }

    #[test]
    fn ids_are_recognised() {
        assert_eq!(
            parse_hub_id("Skywork/Skywork-13B-base"),
            Some(("Skywork/Skywork-13B-base", "main"))
        );
        assert_eq!(parse_hub_id("a/b@v1.0"), Some(("a/b", "v1.0")));
        for bad in [
            "plain", "a/b/c", "/abs", "./x", "../x", "a/", "/b", "a b/c", "a/b@", "a/b@x/y",
        ] {
            assert_eq!(parse_hub_id(bad), None, "{bad}");
        }
    }

    #[test]
    fn main_ref_resolves_to_its_snapshot() {
        let c = cache_with("Skywork/Skywork-MoE-Base", &[("main", COMMIT)], &[COMMIT]);
        let p = resolve_in(Path::new("Skywork/Skywork-MoE-Base"), Some(c.path())).unwrap();
        assert_eq!(
            p,
            c.path()
                .join("models--Skywork--Skywork-MoE-Base/snapshots")
                .join(COMMIT)
        );
        // A revision by commit, and by a named ref.
        let p = resolve_in(
            Path::new(&format!("Skywork/Skywork-MoE-Base@{COMMIT}")),
            Some(c.path()),
        )
        .unwrap();
        assert!(p.ends_with(COMMIT));
    }

    #[test]
    fn missing_id_lists_places_looked() {
        let c = cache_with("org/other", &[("main", COMMIT)], &[COMMIT]);
        let err = resolve_in(Path::new("org/missing"), Some(c.path()))
            .unwrap_err()
            .to_string();
        assert!(err.contains("org/missing"), "{err}");
        assert!(err.contains("models--org--missing"), "{err}");
        assert!(err.contains("never downloads"), "{err}");
        // A ref pointing at an absent snapshot is not found either.
        let c = cache_with("org/x", &[("main", COMMIT)], &[]);
        let err = resolve_in(Path::new("org/x"), Some(c.path()))
            .unwrap_err()
            .to_string();
        assert!(err.contains(COMMIT), "{err}");
    }

    #[test]
    fn existing_paths_win_and_non_ids_pass_through() {
        let d = tempfile::tempdir().unwrap();
        assert_eq!(resolve_in(d.path(), None).unwrap(), d.path());
        let missing = Path::new("no_such_dir_here");
        assert_eq!(resolve_in(missing, None).unwrap(), missing);
    }

    #[test]
    fn cache_dir_follows_huggingface_hub_precedence() {
        use std::ffi::OsString;
        let env = |pairs: &'static [(&'static str, &'static str)]| {
            move |k: &str| {
                pairs
                    .iter()
                    .find(|(n, _)| *n == k)
                    .map(|(_, v)| OsString::from(v))
            }
        };
        assert_eq!(
            cache_dir_from(env(&[("HF_HUB_CACHE", "/c"), ("HF_HOME", "/h")])),
            Some(PathBuf::from("/c"))
        );
        assert_eq!(
            cache_dir_from(env(&[("HF_HOME", "/h"), ("HOME", "/home/u")])),
            Some(PathBuf::from("/h/hub"))
        );
        assert_eq!(
            cache_dir_from(env(&[("HOME", "/home/u")])),
            Some(PathBuf::from("/home/u/.cache/huggingface/hub"))
        );
    }
}
