//! How much a run may still write to disk: checked before a run starts, so that an output that
//! cannot fit is refused with a figure instead of failing after the work is done.

use std::path::{Path, PathBuf};

use crate::memory::{human, parse_bytes};
use crate::{Error, Result};

/// The environment variable that caps the free disk space lopper plans with (bytes, or a number
/// with a `K`, `M`, `G` or `T` suffix, as [`crate::memory::LIMIT_VAR`] takes it). It takes
/// precedence over what the file system reports; tests use it to emulate a full disk.
pub const DISK_LIMIT_VAR: &str = "LOPPER_DISK_LIMIT";

/// The nearest folder at or above `path` that exists (the one whose file system a new `path`
/// would be written to).
fn existing_ancestor(path: &Path) -> PathBuf {
    let abs = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
    abs.ancestors()
        .find(|p| p.exists())
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("/"))
}

/// Free bytes on the file system that `path` (or its nearest existing parent) lives on, as an
/// unprivileged process may use them: [`DISK_LIMIT_VAR`] if set, else `statvfs`. `Ok(None)`
/// where the system cannot tell.
pub fn available_disk_bytes(path: &Path) -> Result<Option<u64>> {
    if let Some(v) = std::env::var_os(DISK_LIMIT_VAR) {
        let s = v.to_string_lossy();
        return parse_bytes(&s).map(Some).ok_or_else(|| {
            Error::Invalid(format!(
                "{DISK_LIMIT_VAR}={s} is not a byte count; give bytes or a number with K, M, G or T (e.g. 2G, 512MiB)"
            ))
        });
    }
    Ok(statvfs_free(&existing_ancestor(path)))
}

#[cfg(unix)]
fn statvfs_free(path: &Path) -> Option<u64> {
    let s = rustix::fs::statvfs(path).ok()?;
    Some(s.f_bavail.saturating_mul(s.f_frsize))
}

#[cfg(not(unix))]
fn statvfs_free(_path: &Path) -> Option<u64> {
    None
}

/// Bytes held by the files under `path` (0 when it does not exist); links are not followed.
pub fn tree_bytes(path: &Path) -> u64 {
    let Ok(meta) = std::fs::symlink_metadata(path) else {
        return 0;
    };
    if !meta.is_dir() {
        return meta.len();
    }
    std::fs::read_dir(path)
        .map(|entries| {
            entries
                .filter_map(|e| e.ok())
                .map(|e| tree_bytes(&e.path()))
                .sum()
        })
        .unwrap_or(0)
}

/// Refuses to start writing about `need` bytes of `what` under `out` when its file system has
/// less free space; `replaced` bytes already there are freed first (a folder that `--force`
/// replaces). Passes where the free space cannot be read.
pub fn ensure_disk_space(out: &Path, need: u64, replaced: u64, what: &str) -> Result<()> {
    let Some(free) = available_disk_bytes(out)? else {
        return Ok(());
    };
    let free = free.saturating_add(replaced);
    if need > free {
        return Err(Error::Invalid(format!(
            "{what} needs about {} under {}, but its file system has {} free; free some space there or write to another disk",
            human(need),
            out.display(),
            human(free)
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_file_systems_free_space_is_read_for_paths_not_yet_made() {
        let dir = std::env::temp_dir();
        let free = statvfs_free(&existing_ancestor(&dir.join("not/yet/made")));
        if cfg!(unix) {
            assert!(free.is_some_and(|f| f > 0), "{free:?}");
        }
    }

    #[test]
    fn a_folder_holds_the_bytes_of_its_files() {
        let dir = tempfile_dir();
        std::fs::create_dir_all(dir.join("a/b")).unwrap();
        std::fs::write(dir.join("a/x"), vec![0u8; 1000]).unwrap();
        std::fs::write(dir.join("a/b/y"), vec![0u8; 24]).unwrap();
        assert_eq!(tree_bytes(&dir.join("a")), 1024);
        assert_eq!(tree_bytes(&dir.join("a/x")), 1000);
        assert_eq!(tree_bytes(&dir.join("missing")), 0);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    fn tempfile_dir() -> PathBuf {
        let dir = std::env::temp_dir().join(format!("lopper-disk-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }
}
