//! Bad input on the real model file: every problem is an error that names the file and the fix.

mod common;

use common::{B, DEVICE, default_model_path};
use lopper_model::{ModelFiles, load_files};

fn load_err(bytes: &[u8]) -> String {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("broken.gguf");
    std::fs::write(&p, bytes).unwrap();
    load_files::<B>(&ModelFiles::Gguf(p), "broken", &DEVICE)
        .expect_err("must fail")
        .to_string()
}

#[test]
fn truncated_and_corrupt_copies_of_the_default_model_are_refused() {
    let real = std::fs::read(default_model_path()).unwrap();
    let e = load_err(&real[..real.len() / 2]);
    assert!(e.contains("broken.gguf") && e.contains("truncated"), "{e}");
    let e = load_err(&real[..1000]);
    assert!(e.contains("broken.gguf") && e.contains("truncated"), "{e}");
    let mut bad = real[..4096].to_vec();
    bad[0] = b'X';
    let e = load_err(&bad);
    assert!(e.contains("not a GGUF file"), "{e}");
    let mut v9 = real[..4096].to_vec();
    v9[4..8].copy_from_slice(&9u32.to_le_bytes());
    let e = load_err(&v9);
    assert!(e.contains("version 9 is not supported"), "{e}");
}
