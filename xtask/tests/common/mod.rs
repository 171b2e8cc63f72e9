//! What every CLI test file shares: running the command line as a user runs it.

#![allow(dead_code)]

use std::process::Command;

/// Runs the CLI: (success, stdout, stderr).
pub fn xtask(args: &[&str]) -> (bool, String, String) {
    xtask_env(args, &[])
}

/// Runs the CLI with extra environment variables: (success, stdout, stderr).
pub fn xtask_env(args: &[&str], env: &[(&str, &str)]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_xtask"))
        .args(args)
        .env("LOPPER_LOG", "warn")
        // Data comes from the checkout's datasets/ alone: no variable, no hub.
        .env_remove("LOPPER_DATA_DIR")
        .env("LOPPER_NO_HUB", "1")
        .envs(env.iter().copied())
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}
