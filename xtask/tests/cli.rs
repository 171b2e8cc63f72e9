//! The command line, run as a user runs it.

use std::process::Command;

fn xtask(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_xtask"))
        .args(args)
        .env("LOPPER_LOG", "warn")
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn info_on_the_default_model_prints_shape_and_counts() {
    let (ok, out, err) = xtask(&["info", "--model", "default"]);
    assert!(ok, "{err}");
    assert!(out.contains("134515008 total"), "{out}");
    assert!(out.contains("106168320 decoder linear"), "{out}");
    assert!(
        out.contains("90 KV groups, 46080 MLP channels, 30 layers"),
        "{out}"
    );
    assert!(out.contains("0-29") && out.contains("1536"), "{out}");
    let (ok, out, _) = xtask(&["info", "--model", "default", "--json"]);
    assert!(ok);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["params"]["total"], 134_515_008);
    assert_eq!(v["model"]["gguf"]["tensor_types"]["Q4_1"], 210);
}

#[test]
fn bad_model_ids_are_clear_errors_not_panics() {
    let (ok, _, err) = xtask(&["info", "--model", "/nonexistent/model.gguf"]);
    assert!(!ok);
    assert!(
        err.contains("not found") && !err.contains("panicked"),
        "{err}"
    );
    let (ok, _, err) = xtask(&["info", "--model", "hub:not-an-id"]);
    assert!(!ok && err.contains("ORG/NAME"), "{err}");
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("junk.gguf");
    std::fs::write(&p, b"definitely not a model").unwrap();
    let (ok, _, err) = xtask(&["info", "--model", p.to_str().unwrap()]);
    assert!(
        !ok && err.contains("junk.gguf") && err.contains("not a GGUF file"),
        "{err}"
    );
}

#[test]
fn bench_forward_prints_a_table() {
    let (ok, out, err) = xtask(&[
        "bench", "forward", "--model", "default", "--shapes", "1x16,2x8", "--runs", "1",
        "--warmup", "0",
    ]);
    assert!(ok, "{err}");
    assert!(
        out.contains("| batch x seq | seconds | tokens/s | GFLOP/s |"),
        "{out}"
    );
    assert!(
        out.contains("| 1 x 16 |") && out.contains("| 2 x 8 |"),
        "{out}"
    );
}

#[test]
fn unknown_devices_and_missing_cuda_are_clear_errors() {
    let (ok, _, err) = xtask(&["bench", "forward", "--device", "tpu"]);
    assert!(!ok && err.contains("unknown device `tpu`"), "{err}");
    if !cfg!(feature = "cuda") {
        let (ok, _, err) = xtask(&["bench", "forward", "--device", "cuda", "--runs", "1"]);
        assert!(!ok && err.contains("no CUDA support"), "{err}");
    }
}

#[test]
fn setup_without_python_says_what_to_do() {
    let home = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_xtask"))
        .args(["setup"])
        .env("PATH", "/nonexistent")
        .env("LOPPER_HOME", home.path())
        .env("LOPPER_LOG", "warn")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("cannot run python3") && err.contains("sha256"),
        "{err}"
    );
    // Nothing half-installed is left under the final name.
    assert!(
        !home
            .path()
            .join("models/SmolLM2-135M-Instruct.Q4_1.gguf")
            .exists()
    );
}

fn data_dir() -> String {
    std::env::var("LOPPER_DATA_DIR")
        .unwrap_or_else(|_| format!("{}/../../shared/datasets", env!("CARGO_MANIFEST_DIR")))
}

#[test]
fn eval_writes_results_and_protocol_as_json() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("eval.json");
    let o = Command::new(env!("CARGO_BIN_EXE_xtask"))
        .args([
            "eval",
            "--model",
            "default",
            "--tasks",
            "wikitext2",
            "--limit",
            "2",
            "--seq-len",
            "64",
            "--out",
        ])
        .arg(&out)
        .env("LOPPER_DATA_DIR", data_dir())
        .env("LOPPER_LOG", "warn")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(stdout.contains("| wikitext2 |"), "{stdout}");
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
    let r = &v["results"]["wikitext2"];
    assert_eq!(r["windows"], 2);
    assert_eq!(r["tokens"], 2 * 63);
    assert!(r["ppl"].as_f64().unwrap() > 1.0);
    assert_eq!(v["protocol"]["bos"], "none");
    assert_eq!(v["protocol"]["seq_len"], 64);
}

#[test]
fn eval_refuses_bad_settings_before_any_work() {
    let (ok, _, err) = xtask(&["eval", "--tasks", "wikitext3"]);
    assert!(!ok && err.contains("unknown task `wikitext3`"), "{err}");
    let (ok, _, err) = xtask(&["eval", "--tasks", "wikitext2", "--limit", "0"]);
    assert!(!ok && err.contains("--limit 0"), "{err}");
    let (ok, _, err) = xtask(&["eval", "--tasks", "c4"]);
    assert!(!ok && err.contains("not implemented yet"), "{err}");
    let (ok, _, err) = xtask(&["eval", "--tasks", "wikitext2", "--bos", "sometimes"]);
    assert!(!ok && err.contains("unknown BOS policy"), "{err}");
}

#[test]
fn eval_scores_a_multiple_choice_task() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("mc.json");
    let o = Command::new(env!("CARGO_BIN_EXE_xtask"))
        .args(["eval", "--tasks", "arc_easy", "--limit", "3", "--out"])
        .arg(&out)
        .env("LOPPER_DATA_DIR", data_dir())
        .env("LOPPER_LOG", "warn")
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
    let r = &v["results"]["arc_easy"];
    assert_eq!(r["n"], 3);
    for k in ["acc", "acc_stderr", "acc_norm", "acc_norm_stderr"] {
        assert!(r[k].is_number(), "{k}: {r}");
    }
}
