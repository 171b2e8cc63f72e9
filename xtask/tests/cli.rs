//! The command line, run as a user runs it.

use std::process::Command;

mod common;
use common::{xtask, xtask_env};

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
fn the_blas_can_be_missing_turned_off_or_broken_and_the_commands_still_run() {
    let logits = |env: &[(&str, &str)]| {
        let (ok, out, err) = xtask_env(&["logits", "--text", "The capital of France is"], env);
        assert!(ok, "{err}");
        (out, err)
    };
    let (ok, out, err) = xtask(&["info", "--model", "default"]);
    assert!(ok, "{err}");
    assert!(
        out.contains("matmul     oneDNN 3.2.0") && out.contains("+ oneMKL 2024.2"),
        "{out}"
    );
    let (with_blas, _) = logits(&[]);
    // The top-3 token ids (logits differ in the last digits between the products).
    let top = |s: &str| -> Vec<String> {
        s.lines()
            .skip_while(|l| !l.contains("top next tokens"))
            .skip(1)
            .filter_map(|l| l.split_whitespace().next().map(str::to_string))
            .take(3)
            .collect()
    };
    assert_eq!(top(&with_blas).len(), 3, "{with_blas}");
    // Off: the portable gemm, same top tokens.
    let (ok, out, _) = xtask_env(&["info", "--model", "default"], &[("LOPPER_BLAS", "off")]);
    assert!(
        ok && out.contains("portable gemm: LOPPER_BLAS=off"),
        "{out}"
    );
    let (without, _) = logits(&[("LOPPER_BLAS", "off")]);
    assert_eq!(top(&with_blas), top(&without), "{with_blas}\n{without}");
    let dir = tempfile::tempdir().unwrap();
    let junk = |name: &str| {
        let p = dir.path().join(name);
        std::fs::write(&p, b"not a shared library").unwrap();
        p.to_str().unwrap().to_string()
    };
    let (bad_mkl, bad_dnnl) = (junk("libmkl_rt.so.2"), junk("libdnnl.so.3"));
    // oneMKL missing or broken, oneDNN off: named, with the fix, then the portable gemm.
    for (mkl, want) in [
        (
            "/nonexistent/libmkl_rt.so.2",
            "no oneMKL at /nonexistent/libmkl_rt.so.2",
        ),
        (bad_mkl.as_str(), "does not load"),
    ] {
        let env = [("LOPPER_BLAS", mkl), ("LOPPER_DNNL", "off")];
        let (ok, out, _) = xtask_env(&["info", "--model", "default"], &env);
        assert!(
            ok && out.contains(want)
                && out.contains("cargo xtask setup")
                && out.contains("portable gemm"),
            "{out}"
        );
        assert_eq!(top(&logits(&env).0), top(&with_blas), "{mkl}");
    }
    // oneDNN missing or broken: named, the products on oneMKL.
    for (dnnl, want) in [
        (
            "/nonexistent/libdnnl.so.3",
            "no oneDNN at /nonexistent/libdnnl.so.3",
        ),
        (bad_dnnl.as_str(), "does not load"),
    ] {
        let env = [("LOPPER_DNNL", dnnl)];
        let (ok, out, _) = xtask_env(&["info", "--model", "default"], &env);
        assert!(ok && out.contains("matmul     oneMKL 2024.2"), "{out}");
        assert!(
            out.contains(want) && out.contains("products run on oneMKL"),
            "{out}"
        );
        assert_eq!(top(&logits(&env).0), top(&with_blas), "{dnnl}");
    }
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
    assert!(out.contains("weights in f32"), "{out}");
    // bf16 weights: the same table.
    let (ok, bf16, err) = xtask(&[
        "bench", "forward", "--model", "default", "--dtype", "bf16", "--shapes", "1x16", "--runs",
        "1", "--warmup", "0",
    ]);
    assert!(
        ok && bf16.contains("weights in bf16") && bf16.contains("| 1 x 16 |"),
        "{err}{bf16}"
    );
    assert!(
        out.contains("| batch x seq | seconds | tokens/s | GFLOP/s |"),
        "{out}"
    );
    assert!(
        out.contains("| 1 x 16 |") && out.contains("| 2 x 8 |"),
        "{out}"
    );
    // The BLAS and the portable gemm side by side.
    let (ok, out, err) = xtask(&[
        "bench",
        "forward",
        "--model",
        "default",
        "--shapes",
        "1x16",
        "--runs",
        "1",
        "--warmup",
        "0",
        "--rounds",
        "1",
        "--portable",
    ]);
    assert!(ok, "{err}");
    assert!(
        out.contains("portable tokens/s | BLAS / portable |"),
        "{out}"
    );
    assert!(
        out.contains("matrix products: oneDNN 3.2.0 (bf16 dot products) + oneMKL 2024.2")
            || out.contains("matrix products: oneDNN 3.2.0 (bf16 on AMX tiles: brg:")
            || out.contains("matrix products: oneDNN 3.2.0 + oneMKL 2024.2"),
        "{out}"
    );
    // The backward pass, with and without the BLAS.
    let (ok, out, err) = xtask(&[
        "bench",
        "forward",
        "--backward",
        "--shapes",
        "3x8",
        "--runs",
        "1",
        "--warmup",
        "0",
        "--rounds",
        "1",
        "--portable",
    ]);
    assert!(ok, "{err}");
    assert!(
        out.contains("backward benchmark") && out.contains("| 3 x 8 |"),
        "{out}"
    );
    let (ok, _, err) = xtask(&["bench", "forward", "--vs-torch", "/nonexistent/python3"]);
    assert!(!ok && err.contains("--vs-torch names a Python"), "{err}");
}

#[test]
fn bench_matmul_prints_every_path() {
    let (ok, out, err) = xtask(&["bench", "matmul", "--shapes", "8x16x4,3x5x7", "--runs", "1"]);
    assert!(ok, "{err}");
    assert!(
        out.contains("| 8 x 16 x 4 |") && out.contains("| 3 x 5 x 7 |"),
        "{out}"
    );
    assert!(out.contains("BLAS f32 / portable"), "{out}");
    let (ok, _, err) = xtask(&["bench", "matmul", "--shapes", "8x16"]);
    assert!(!ok && err.contains("MxKxN"), "{err}");
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

/// `eval` of the default model on the first `limit` WikiText-2 windows of 64 tokens, from the
/// repository's data only.
fn eval_wikitext2(limit: usize) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_xtask"));
    c.args([
        "eval",
        "--model",
        "default",
        "--tasks",
        "wikitext2",
        "--seq-len",
        "64",
    ])
    .args(["--limit", &limit.to_string()])
    .env_remove("LOPPER_DATA_DIR")
    .env("LOPPER_NO_HUB", "1");
    c
}

#[test]
fn eval_writes_results_and_protocol_as_json() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("eval.json");
    let o = eval_wikitext2(2)
        .arg("--out")
        .arg(&out)
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
    let (ok, _, err) = xtask(&["eval", "--tasks", "wikitext2", "--bos", "sometimes"]);
    assert!(!ok && err.contains("unknown BOS policy"), "{err}");
    let o = Command::new(env!("CARGO_BIN_EXE_xtask"))
        .args(["eval", "--model", "default", "--tasks", "wikitext2"])
        .env("LOPPER_PROGRESS_SECS", "soon")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("LOPPER_PROGRESS_SECS=\"soon\" is not a number"),
        "{err}"
    );
    assert!(
        !err.contains("loaded"),
        "checked before the model is read: {err}"
    );
}

#[test]
fn progress_is_logged_where_the_bars_cannot_be_drawn() {
    // stderr is a pipe here, as in CI or under nohup: the bars are hidden and each one is
    // logged as a line every LOPPER_PROGRESS_SECS seconds (48 windows take several seconds even
    // on the fastest CPU we use).
    let o = eval_wikitext2(48)
        .env("LOPPER_PROGRESS_SECS", "1")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    let line = err
        .lines()
        .find(|l| l.contains("/48 windows, eta "))
        .unwrap_or_else(|| panic!("no progress line: {err}"));
    assert!(
        line.contains("wikitext2") && line.contains("(elapsed "),
        "{line}"
    );
    assert!(!line.contains("{"), "{line}");
}

#[test]
fn eval_scores_multiple_choice_tasks_c4_and_the_seven_task_average() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("mc.json");
    let o = Command::new(env!("CARGO_BIN_EXE_xtask"))
        .args([
            "eval",
            "--tasks",
            "arc_easy,boolq,piqa,hellaswag,winogrande,arc_challenge,openbookqa,c4",
            "--limit",
            "3",
            "--seq-len",
            "32",
            "--out",
        ])
        .arg(&out)
        .env_remove("LOPPER_DATA_DIR")
        .env("LOPPER_NO_HUB", "1")
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
    let res = &v["results"];
    let want = (["boolq", "piqa", "winogrande", "arc_easy"]
        .iter()
        .map(|t| res[*t]["acc"].as_f64().unwrap())
        .sum::<f64>()
        + ["hellaswag", "arc_challenge", "openbookqa"]
            .iter()
            .map(|t| res[*t]["acc_norm"].as_f64().unwrap())
            .sum::<f64>())
        / 7.0;
    assert!((res["llm_pruner_average"]["value"].as_f64().unwrap() - want).abs() < 1e-12);
    // Its standard error: the seven tasks' errors added in quadrature, over seven.
    let var: f64 = ["boolq", "piqa", "winogrande", "arc_easy"]
        .iter()
        .map(|t| res[*t]["acc_stderr"].as_f64().unwrap().powi(2))
        .chain(
            ["hellaswag", "arc_challenge", "openbookqa"]
                .iter()
                .map(|t| res[*t]["acc_norm_stderr"].as_f64().unwrap().powi(2)),
        )
        .sum();
    let se = res["llm_pruner_average"]["stderr"].as_f64().unwrap();
    assert!(se > 0.0 && (se - var.sqrt() / 7.0).abs() < 1e-12, "{se}");
    assert_eq!(res["c4"]["windows"], 3);
    assert!(res["c4"]["ppl"].as_f64().unwrap().is_finite());
    assert_eq!(res["c4"]["rows"], 1000);
}

/// A tiny random model directory (word-level tokenizer over `t0`..`t127`) and a calibration
/// text file of those words.
fn tiny_model_dir(root: &std::path::Path) -> (String, String) {
    model_dir(root, &lopper_core::ModelShape::tiny(), "tiny")
}

/// A random model of `shape` as an HF directory `root/name`, and a calibration text file.
fn model_dir(
    root: &std::path::Path,
    shape: &lopper_core::ModelShape,
    name: &str,
) -> (String, String) {
    type B = burn_flex::Flex;
    let model = lopper_model::Llama::<B>::random(shape, 11, &burn_flex::FlexDevice).unwrap();
    let tok = lopper_model::Tokenizer::word_level(128);
    let dir = root.join(name);
    let opts = lopper_surgery::ExportOptions {
        format: lopper_surgery::ExportFormat::Hf,
        force: false,
        provenance: serde_json::Value::Null,
    };
    lopper_surgery::export(&model, &tok, None, &opts, &dir).unwrap();
    let text: String = (0..40)
        .map(|d| {
            let words: Vec<String> = (0..30)
                .map(|w| format!("t{}", (d * 37 + w * 11) % 128))
                .collect();
            words.join(" ") + "\n\n"
        })
        .collect();
    let calib = root.join("calib.txt");
    std::fs::write(&calib, text).unwrap();
    (dir.to_str().unwrap().into(), calib.to_str().unwrap().into())
}

fn prune_args<'a>(model: &'a str, calib: &'a str, out: &'a str, steps: &'a str) -> Vec<&'a str> {
    vec![
        "prune",
        "--model",
        model,
        "--calib",
        calib,
        "--calib-samples",
        "12",
        "--seq-len",
        "16",
        "--batch-size",
        "2",
        "--steps",
        steps,
        "--sparsity",
        "0.5",
        "--lr",
        "0.05",
        "--checkpoint-every",
        "3",
        "--out",
        out,
    ]
}

/// A 3-step `prune_args` run into `root/name` with `extra` flags, which must succeed.
fn prune_variant(
    root: &std::path::Path,
    (model, calib): (&str, &str),
    name: &str,
    extra: &[&str],
) -> std::path::PathBuf {
    let out = root.join(name);
    let mut args = prune_args(model, calib, out.to_str().unwrap(), "3");
    args.extend(extra);
    let (ok, _, err) = xtask(&args);
    assert!(ok, "{err}");
    out
}

#[test]
fn the_search_seed_changes_the_masks_and_not_the_calibration() {
    let root = tempfile::tempdir().unwrap();
    let (model, calib) = tiny_model_dir(root.path());
    let run = |name: &str, extra: &[&str]| {
        let out = prune_variant(root.path(), (&model, &calib), name, extra);
        let curve = std::fs::read_to_string(out.join("curve.jsonl")).unwrap();
        let plan = lopper_core::MaskPlan::load(&out.join("plan.json")).unwrap();
        let init = plan.meta["final_choice"]["candidates"][1].clone();
        (curve, init)
    };
    let (base, base_init) = run("base", &[]);
    // The default (auto) compensation judged every candidate both ways; the search ran under
    // the rule it recorded, which the checkpoint holds.
    let dir = root.path().join("base");
    let plan = lopper_core::MaskPlan::load(&dir.join("plan.json")).unwrap();
    let init = &plan.meta["final_choice"]["init"];
    let (on, off) = (
        init["init_candidates"].as_object().unwrap(),
        init["init_candidates_uncompensated"].as_object().unwrap(),
    );
    assert_eq!(
        on.keys().collect::<Vec<_>>(),
        off.keys().collect::<Vec<_>>()
    );
    let best = |m: &serde_json::Map<String, serde_json::Value>| {
        m.values()
            .map(|v| v.as_f64().unwrap())
            .fold(f64::INFINITY, f64::min)
    };
    let chosen = init["search_compensation"].as_bool().unwrap();
    assert_eq!(chosen, best(on) <= best(off), "{init}");
    let ckpt: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("checkpoint.json")).unwrap())
            .unwrap();
    assert_eq!(ckpt["config"]["compensation"], chosen);
    assert_eq!(ckpt["config"]["compensation_auto"], true);
    let (same, _) = run("same", &["--search-seed", "42"]);
    let (other, other_init) = run("other", &["--search-seed", "7"]);
    assert_eq!(base, same, "--search-seed defaults to --seed");
    assert_ne!(base, other, "another search seed samples other masks");
    // The start's held-out loss reads only the calibration windows: the same in both.
    assert_eq!(base_init[0], "init");
    assert_eq!(base_init, other_init);
}

#[test]
fn prune_pg_on_the_tiny_model_writes_a_complete_run_folder() {
    let root = tempfile::tempdir().unwrap();
    let (model, calib) = tiny_model_dir(root.path());
    let out = root.path().join("run");
    let out_s = out.to_str().unwrap();
    let mut args = prune_args(&model, &calib, out_s, "5");
    args.extend([
        "--eval",
        "wikitext2",
        "--eval-limit",
        "2",
        "--bias-compensation",
        // The tiny model has 64 positions; --eval reads 128-token windows.
        "--allow-longer-context",
    ]);
    let (ok, stdout, err) = xtask(&args);
    assert!(ok, "{err}");
    assert!(stdout.contains("kept 0.5"), "{stdout}");
    let plan = lopper_core::MaskPlan::load(&out.join("plan.json")).unwrap();
    assert!(
        (plan.kept_param_ratio() - 0.5).abs() < 0.02,
        "{}",
        plan.kept_param_ratio()
    );
    assert_eq!(
        std::fs::read_to_string(out.join("curve.jsonl"))
            .unwrap()
            .lines()
            .count(),
        5
    );
    let report = std::fs::read_to_string(out.join("report.md")).unwrap();
    assert!(
        report.contains("Kept per layer") && report.contains("wikitext2"),
        "{report}"
    );
    let eval: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("eval.json")).unwrap()).unwrap();
    assert!(
        eval["results"]["wikitext2"]["ppl"]
            .as_f64()
            .unwrap()
            .is_finite()
    );
    // The exported model loads, with the plan's shape.
    let (ok, info, err) = xtask(&[
        "info",
        "--model",
        out.join("model").to_str().unwrap(),
        "--json",
    ]);
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(&info).unwrap();
    // Bias compensation: the exported model carries o_proj / down_proj biases (and zero ones).
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("model/config.json")).unwrap())
            .unwrap();
    assert_eq!(cfg["mlp_bias"], true);
    assert_eq!(v["params"]["total"], plan.pruned_shape().num_params());
    // The default preset starts from the best metric plan (chosen on held-out windows, with
    // compensation) and reports its final choice between that plan and the search's.
    let meta = &plan.meta;
    let choice = &meta["final_choice"];
    assert!(
        ["search", "init"].contains(&choice["chosen"].as_str().unwrap()),
        "{choice}"
    );
    assert_eq!(choice["windows"], 3);
    // FLAP, LLM-BIP, block influence and three mixes of block influence's layers with FLAP's units.
    assert_eq!(
        choice["init"]["init_candidates"].as_object().unwrap().len(),
        6
    );
    assert!(report.contains("Final choice"), "{report}");
    // At 50% with the least-squares cut, `--judge auto` (the default) judges by least squares:
    // the best three starts by masked loss (fewer where candidates coincide) are cut by least
    // squares and scored; the lowest is the start, and the final choice scores both finalists
    // the same way (masked losses beside).
    let judged = out.clone();
    assert_eq!(choice["judge"]["type"], "reconstructed", "{choice}");
    let refit = choice["init"]["init_candidates_ls"].as_object().unwrap();
    // Candidates with equal plans share their losses: at most three distinct refits.
    let mut distinct: Vec<f64> = refit.values().map(|v| v.as_f64().unwrap()).collect();
    distinct.sort_by(f64::total_cmp);
    distinct.dedup();
    assert!((1..=3).contains(&distinct.len()), "{choice}");
    let best_ls = refit
        .values()
        .map(|v| v.as_f64().unwrap())
        .fold(f64::INFINITY, f64::min);
    let start = choice["init"]["method"].as_str().unwrap();
    assert_eq!(refit[start].as_f64().unwrap(), best_ls, "{choice}");
    // The start's loss is reused by the final choice.
    assert_eq!(
        choice["candidates"][1][1].as_f64().unwrap(),
        best_ls,
        "{choice}"
    );
    assert_eq!(choice["masked"].as_array().unwrap().len(), 2, "{choice}");
    // The refits read the cut's own (longer) windows, the last eighth of them held out to
    // score on.
    let ck: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(judged.join("checkpoint.json")).unwrap())
            .unwrap();
    let ls_calib = &ck["meta"]["ls_calibration"];
    let n = |v: &serde_json::Value| v.as_u64().unwrap();
    let refit = &choice["refit"];
    assert!(n(&ls_calib["seq_len"]) > 16, "{ls_calib}");
    assert_eq!(n(&refit[2]), n(&ls_calib["seq_len"]), "{choice}");
    assert_eq!(
        n(&refit[0]) + n(&refit[1]),
        n(&ls_calib["samples"]),
        "{choice}"
    );
    assert_eq!(
        n(&refit[1]),
        (n(&ls_calib["samples"]) / 8).max(1),
        "{choice}"
    );
    let variant =
        |name: &str, extra: &[&str]| prune_variant(root.path(), (&model, &calib), name, extra);
    // --judge masked: the masked losses alone decide.
    let masked = variant("masked", &["--judge", "masked"]);
    let plan_m = lopper_core::MaskPlan::load(&masked.join("plan.json")).unwrap();
    let choice = &plan_m.meta["final_choice"];
    assert_eq!(choice["judge"]["type"], "masked", "{choice}");
    assert!(
        choice["init"].get("init_candidates_ls").is_none() && choice.get("refit").is_none(),
        "{choice}"
    );
    // --preset reference: the paper's code settings, no held-out choice, no compensation.
    let reference = variant("reference", &["--preset", "reference"]);
    let ck: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(reference.join("checkpoint.json")).unwrap())
            .unwrap();
    assert_eq!(ck["config"]["baseline"], "moving");
    assert_eq!(ck["config"]["held_out"], 0);
    assert_eq!(ck["config"]["compensation"], false);
    assert_eq!(ck["config"]["judge"]["type"], "masked");
    let plan_r = lopper_core::MaskPlan::load(&reference.join("plan.json")).unwrap();
    assert!(!plan_r.meta.contains_key("final_choice"));
    // Running again into the same folder is refused without --resume/--force.
    let (ok, _, err) = xtask(&prune_args(&model, &calib, out_s, "5"));
    assert!(
        !ok && err.contains("--resume") && err.contains("--force"),
        "{err}"
    );
}

#[test]
fn an_interrupted_prune_resumes_to_the_same_plan() {
    let root = tempfile::tempdir().unwrap();
    let (model, calib) = tiny_model_dir(root.path());
    let full = root.path().join("full");
    let (ok, _, err) = xtask(&prune_args(&model, &calib, full.to_str().unwrap(), "8"));
    assert!(ok, "{err}");
    let part = root.path().join("part");
    let part_s = part.to_str().unwrap();
    let mut args = prune_args(&model, &calib, part_s, "8");
    args.extend(["--stop-after", "4"]);
    let (ok, _, err) = xtask(&args);
    assert!(
        !ok && err.contains("interrupted at step 4") && err.contains("--resume"),
        "{err}"
    );
    assert!(!part.join("plan.json").exists());
    // Resuming with other settings is refused.
    let mut other = prune_args(&model, &calib, part_s, "8");
    other.extend(["--resume", "--seed", "7"]);
    let (ok, _, err) = xtask(&other);
    // The refusal names the setting that differs, and nothing else.
    assert!(
        !ok && err.contains("differ") && err.contains("seed: checkpoint 42, now 7"),
        "{err}"
    );
    assert!(!err.contains("steps:"), "{err}");
    // So is resuming in another storage type.
    let mut other = prune_args(&model, &calib, part_s, "8");
    other.extend(["--resume", "--dtype", "bf16"]);
    let (ok, _, err) = xtask(&other);
    assert!(
        !ok && err.contains("dtype (\"bf16\")") && err.contains("(\"f32\")"),
        "{err}"
    );
    let mut resume = prune_args(&model, &calib, part_s, "8");
    resume.push("--resume");
    // A plan can seed another run (--init PLAN), with per-type learning rates.
    let seeded = root.path().join("seeded");
    let full_plan = full.join("plan.json");
    let mut args = prune_args(&model, &calib, seeded.to_str().unwrap(), "2");
    args.extend(["--init", full_plan.to_str().unwrap(), "--lr-heads", "0.001"]);
    let (ok, _, err) = xtask(&args);
    assert!(ok, "{err}");
    let (ok, _, err) = xtask(&resume);
    assert!(ok, "{err}");
    let read = |d: &std::path::Path, f: &str| std::fs::read_to_string(d.join(f)).unwrap();
    let probs = |d: &std::path::Path| -> serde_json::Value {
        serde_json::from_str::<serde_json::Value>(&read(d, "checkpoint.json")).unwrap()["probs"]
            .clone()
    };
    assert_eq!(probs(&full), probs(&part));
    assert_eq!(read(&full, "plan.json"), read(&part, "plan.json"));
    assert_eq!(read(&full, "curve.jsonl"), read(&part, "curve.jsonl"));
    // A search over channel blocks resumes into the same blocks and the same plan.
    let blocked = |dir: &std::path::Path, extra: &[&'static str]| {
        let mut args = prune_args(&model, &calib, dir.to_str().unwrap(), "8");
        args.extend(["--channel-block", "8"]);
        args.extend(extra);
        xtask(&args)
    };
    let (bfull, bpart) = (root.path().join("bfull"), root.path().join("bpart"));
    let (ok, _, err) = blocked(&bfull, &[]);
    assert!(ok, "{err}");
    let (ok, _, err) = blocked(&bpart, &["--stop-after", "4"]);
    assert!(!ok && err.contains("interrupted at step 4"), "{err}");
    let (ok, _, err) = blocked(&bpart, &["--resume"]);
    assert!(ok, "{err}");
    let ckpt: serde_json::Value = serde_json::from_str(&read(&bfull, "checkpoint.json")).unwrap();
    let layout = ckpt["channel_blocks"]
        .as_array()
        .expect("the blocks are checkpointed");
    // 48 channels: blocks of 8 cut from each side of the start's boundary (6 or 7 per layer).
    assert!(
        layout
            .iter()
            .all(|l| (6..=7).contains(&l.as_array().unwrap().len())),
        "{layout:?}"
    );
    assert_eq!(probs(&bfull), probs(&bpart));
    assert_eq!(read(&bfull, "plan.json"), read(&bpart, "plan.json"));
    // So does a search over per-layer widths (its fitted start's size is checkpointed).
    let (wfull, wpart) = (root.path().join("wfull"), root.path().join("wpart"));
    let (ok, _, err) = blocked(&wfull, &["--widths"]);
    assert!(ok, "{err}");
    let (ok, _, err) = blocked(&wpart, &["--widths", "--stop-after", "4"]);
    assert!(!ok && err.contains("interrupted at step 4"), "{err}");
    let (ok, _, err) = blocked(&wpart, &["--widths", "--resume"]);
    assert!(ok, "{err}");
    let ckpt: serde_json::Value = serde_json::from_str(&read(&wfull, "checkpoint.json")).unwrap();
    assert!(ckpt["keep_target"].is_f64(), "{}", ckpt["keep_target"]);
    assert_eq!(probs(&wfull), probs(&wpart));
    assert_eq!(read(&wfull, "plan.json"), read(&wpart, "plan.json"));
    // A search scored through the refit proxy resumes bit-identically too, and its masks score
    // other losses than the masked search's.
    let proxied = |dir: &std::path::Path, extra: &[&'static str]| {
        let mut args = prune_args(&model, &calib, dir.to_str().unwrap(), "8");
        args.push("--refit-proxy");
        args.extend(extra);
        xtask(&args)
    };
    let (pfull, ppart) = (root.path().join("pfull"), root.path().join("ppart"));
    let (ok, _, err) = proxied(&pfull, &[]);
    assert!(ok, "{err}");
    let (ok, _, err) = proxied(&ppart, &["--stop-after", "4"]);
    assert!(!ok && err.contains("interrupted at step 4"), "{err}");
    let (ok, _, err) = proxied(&ppart, &["--resume"]);
    assert!(ok, "{err}");
    let ckpt: serde_json::Value = serde_json::from_str(&read(&pfull, "checkpoint.json")).unwrap();
    assert_eq!(ckpt["config"]["refit_proxy"], true);
    assert_eq!(probs(&pfull), probs(&ppart));
    assert_eq!(read(&pfull, "curve.jsonl"), read(&ppart, "curve.jsonl"));
    assert_ne!(read(&pfull, "curve.jsonl"), read(&full, "curve.jsonl"));
}

#[test]
fn bench_pg_gradient_prints_signal_and_noise_per_estimator() {
    let root = tempfile::tempdir().unwrap();
    let (model, _) = tiny_model_dir(root.path());
    let (ok, out, err) = xtask(&[
        "bench",
        "pg-gradient",
        "--model",
        &model,
        "--reps",
        "4",
        "--batch-size",
        "2",
        "--seq-len",
        "16",
        "--blocks",
        "1,8,w8",
    ]);
    assert!(ok, "{err}");
    assert!(
        out.contains("| signal / noise | cos(half means) |"),
        "{out}"
    );
    for row in [
        "| channels | moving baseline, independent masks (reference) |",
        "| channels | leave-one-out, antithetic pairs (lopper) |",
        "| blocks of 8 | leave-one-out, antithetic pairs (lopper) |",
        // The tiny model's 3 layers: 3 widths, 6 KV groups and 3 layers.
        "| widths in steps of 8 | leave-one-out, antithetic pairs (lopper) | 12 |",
    ] {
        assert!(out.contains(row), "{row}\n{out}");
    }
    // The noise column is a number, positive: sampled masks differ.
    let noise: f64 = out
        .lines()
        .find(|l| l.starts_with("| blocks of 8 | leave"))
        .and_then(|l| l.split('|').nth(5))
        .and_then(|c| c.trim().parse().ok())
        .expect("a noise figure");
    assert!(noise > 0.0, "{out}");
    let (ok, _, err) = xtask(&["bench", "pg-gradient", "--model", &model, "--blocks", "0"]);
    assert!(!ok && err.contains("--blocks `0`"), "{err}");
    let (ok, _, err) = xtask(&["bench", "pg-gradient", "--model", &model, "--blocks", "w1"]);
    assert!(!ok && err.contains("--blocks `w1`"), "{err}");
    let (ok, _, err) = xtask(&["bench", "pg-gradient", "--model", &model, "--init", "sleb"]);
    assert!(!ok && err.contains("layer method"), "{err}");
}

#[test]
fn prune_refuses_bad_settings_before_any_work() {
    let root = tempfile::tempdir().unwrap();
    let out = root.path().join("x");
    let o = out.to_str().unwrap();
    for (args, want) in [
        (vec!["prune", "--sparsity", "1.5", "--out", o], "--sparsity"),
        (
            vec![
                "prune",
                "--sparsity",
                "0.3",
                "--units",
                "layers",
                "--budget",
                "per-type",
                "--out",
                o,
            ],
            "--budget params",
        ),
        (
            vec!["prune", "--sparsity", "0.3", "--units", "rows", "--out", o],
            "unknown unit",
        ),
        (
            vec![
                "prune",
                "--sparsity",
                "0.3",
                "--channel-block",
                "64",
                "--budget",
                "per-type",
                "--units",
                "heads,channels",
                "--out",
                o,
            ],
            "--channel-block 64 needs --budget params",
        ),
        (
            vec![
                "prune",
                "--sparsity",
                "0.3",
                "--projection",
                "cost",
                "--budget",
                "per-type",
                "--units",
                "heads,channels",
                "--out",
                o,
            ],
            "--projection cost weighs units by their parameters and needs --budget params",
        ),
        (
            vec![
                "prune",
                "--sparsity",
                "0.3",
                "--projection",
                "euclid",
                "--out",
                o,
            ],
            "unknown --projection `euclid`: use shift or cost",
        ),
        (
            vec!["prune", "--sparsity", "0.3", "--anneal", "100", "--out", o],
            "--anneal 100 is longer than the 60 steps that update",
        ),
        (
            vec![
                "prune",
                "--sparsity",
                "0.3",
                "--start-band",
                "0.9",
                "--out",
                o,
            ],
            "--start-band `0.9`: give two numbers",
        ),
        (
            vec![
                "prune",
                "--sparsity",
                "0.3",
                "--start-band",
                "0.3,0.9",
                "--out",
                o,
            ],
            "--start-band 0.3,0.9",
        ),
        (
            vec!["prune", "--sparsity", "0.3", "--preset", "fast", "--out", o],
            "--preset",
        ),
        (
            vec![
                "prune",
                "--sparsity",
                "0.3",
                "--samples-per-step",
                "1",
                "--out",
                o,
            ],
            "--samples-per-step",
        ),
        (
            vec![
                "prune",
                "--sparsity",
                "0.3",
                "--calib-samples",
                "8",
                "--held-out",
                "8",
                "--out",
                o,
            ],
            "--held-out",
        ),
        (
            vec!["prune", "--sparsity", "0.3", "--method", "obs", "--out", o],
            "--method",
        ),
        (
            vec!["prune", "--sparsity", "0.3", "--judge", "best", "--out", o],
            "--judge",
        ),
        (
            vec![
                "prune",
                "--sparsity",
                "0.3",
                "--bias-compensation",
                "maybe",
                "--out",
                o,
            ],
            "true, false or auto",
        ),
        (
            vec![
                "prune",
                "--sparsity",
                "0.3",
                "--method",
                "flap",
                "--bias-compensation",
                "auto",
                "--out",
                o,
            ],
            "a metric method takes true or false",
        ),
        (
            vec![
                "prune",
                "--sparsity",
                "0.3",
                "--judge",
                "ls",
                "--reconstruct",
                "bias",
                "--out",
                o,
            ],
            "--reconstruct ls or obs",
        ),
        (
            vec!["prune", "--sparsity", "0.3", "--resume", "--out", o],
            "does not exist",
        ),
    ] {
        let (ok, _, err) = xtask(&args);
        assert!(
            !ok && err.contains(want) && !err.contains("panicked"),
            "{args:?}: {err}"
        );
        assert!(!out.exists(), "{args:?} created the output");
    }
}

#[test]
fn export_writes_gguf_and_refuses_bad_plans() {
    let root = tempfile::tempdir().unwrap();
    let (model, calib) = tiny_model_dir(root.path());
    let shape = lopper_core::ModelShape::tiny();
    let mut plan = lopper_core::MaskPlan::keep_all(&shape);
    plan.layers[1].channels.truncate(20);
    let plan_path = root.path().join("plan.json");
    plan.save(&plan_path).unwrap();
    let out = root.path().join("g");
    let o = out.to_str().unwrap();
    let p = plan_path.to_str().unwrap();
    let (ok, _, err) = xtask(&[
        "export",
        "--model",
        &model,
        "--plan",
        p,
        "--format",
        "gguf",
        "--gguf-type",
        "q8_0",
        "--out",
        o,
    ]);
    // The word-level test tokenizer cannot be written to GGUF: a named error, nothing written.
    assert!(
        !ok && err.contains("byte-level BPE") && !out.exists(),
        "{err}"
    );
    let (ok, _, err) = xtask(&[
        "export", "--model", &model, "--plan", p, "--format", "hf", "--out", o,
    ]);
    assert!(ok, "{err}");
    let (ok, _, err) = xtask(&["export", "--model", &model, "--plan", p, "--out", o]);
    assert!(!ok && err.contains("--force"), "{err}");
    // vLLM's DeciLM layout: the plan keeps every query head, so it fits.
    let v = root.path().join("vllm");
    let (ok, _, err) = xtask(&[
        "export",
        "--model",
        &model,
        "--plan",
        p,
        "--format",
        "vllm",
        "--out",
        v.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(v.join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg["block_configs"][1]["ffn"]["intermediate_size"], 20);
    // The cut refit by least squares on calibration text; the export records how.
    // `--refit-inputs` takes off / next / all (false and true too); the default under a
    // least-squares cut is `next`.
    for (how, inputs, recorded) in [
        ("ls", Some("false"), "off"),
        ("obs", Some("true"), "all"),
        ("ls", None, "next"),
    ] {
        let dir = root.path().join(format!("{how}-{recorded}"));
        let mut args = vec![
            "export",
            "--model",
            &model,
            "--plan",
            p,
            "--reconstruct",
            how,
            "--calib",
            &calib,
            "--calib-samples",
            "6",
            "--seq-len",
            "16",
            "--out",
            dir.to_str().unwrap(),
        ];
        if let Some(i) = inputs {
            args.extend(["--refit-inputs", i]);
        }
        let (ok, _, err) = xtask(&args);
        assert!(ok, "{err}");
        let meta: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("lopper.json")).unwrap())
                .unwrap();
        assert_eq!(meta["provenance"]["reconstruct"], how, "{meta}");
        assert_eq!(meta["provenance"]["refit_inputs"], recorded, "{meta}");
    }
    let (ok, _, err) = xtask(&[
        "export",
        "--model",
        &model,
        "--reconstruct",
        "ls",
        "--out",
        o,
        "--force",
    ]);
    assert!(!ok && err.contains("give --plan"), "{err}");
    // A plan for another model.
    let mut other = lopper_core::ModelShape::tiny();
    other.layers[0].ffn_hidden = 40;
    lopper_core::MaskPlan::keep_all(&other)
        .save(&plan_path)
        .unwrap();
    let (ok, _, err) = xtask(&[
        "export", "--model", &model, "--plan", p, "--out", o, "--force",
    ]);
    assert!(!ok && err.contains("another model"), "{err}");
    // Plans that remove everything, or list a unit twice, are refused when read.
    let mut empty = lopper_core::MaskPlan::keep_all(&shape);
    for l in &mut empty.layers {
        l.kv_groups.clear();
        l.channels.clear();
    }
    std::fs::write(&plan_path, serde_json::to_string(&empty).unwrap()).unwrap();
    let (ok, _, err) = xtask(&[
        "export", "--model", &model, "--plan", p, "--out", o, "--force",
    ]);
    assert!(!ok && err.contains("removes every layer"), "{err}");
    let mut dup = lopper_core::MaskPlan::keep_all(&shape);
    dup.layers[0].kv_groups = vec![1, 1];
    std::fs::write(&plan_path, serde_json::to_string(&dup).unwrap()).unwrap();
    let (ok, _, err) = xtask(&[
        "export", "--model", &model, "--plan", p, "--out", o, "--force",
    ]);
    assert!(!ok && !err.contains("panicked"), "{err}");
    let (ok, _, err) = xtask(&[
        "export", "--model", &model, "--plan", p, "--format", "onnx", "--out", o, "--force",
    ]);
    assert!(!ok && err.contains("hf, vllm or gguf"), "{err}");
}

#[test]
fn logits_and_the_pruned_benchmark_run_on_the_tiny_model() {
    let root = tempfile::tempdir().unwrap();
    let (model, _) = tiny_model_dir(root.path());
    let out = root.path().join("l.json");
    let (ok, stdout, err) = xtask(&[
        "logits",
        "--model",
        &model,
        "--ids",
        "1,5,9",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(ok && stdout.contains("3 tokens"), "{err}");
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
    assert_eq!(v["logits"].as_array().unwrap().len(), 3);
    assert_eq!(v["logits"][0].as_array().unwrap().len(), 128);
    let (ok, _, err) = xtask(&["logits", "--model", &model, "--ids", "1,x"]);
    assert!(!ok && err.contains("`x`"), "{err}");
    let (ok, stdout, err) = xtask(&[
        "bench",
        "pruned",
        "--model",
        &model,
        "--dtype",
        "bf16",
        "--sparsity",
        "0.5",
        "--shapes",
        "2x8",
        "--runs",
        "1",
    ]);
    assert!(ok, "{err}");
    assert!(
        stdout.contains("weights MiB (bf16)")
            && stdout.contains("| dense |")
            && stdout.contains("| uniform | 0.5 |")
            && stdout.contains("random heterogeneous"),
        "{stdout}"
    );
    let (ok, stdout, err) = xtask(&[
        "bench",
        "pg-step",
        "--model",
        &model,
        "--dtype",
        "bf16",
        "--sparsity",
        "0.5",
        "--batch-size",
        "2",
        "--seq-len",
        "8",
        "--samples-per-step",
        "2",
        "--runs",
        "1",
    ]);
    assert!(ok && stdout.contains("| 0.5 |"), "{err}{stdout}");
}

#[test]
fn metric_methods_prune_the_tiny_model() {
    let root = tempfile::tempdir().unwrap();
    let (model, calib) = tiny_model_dir(root.path());
    let run = |method: &str, extra: &[&str]| {
        let out = root.path().join(method);
        let mut args = prune_args(&model, &calib, out.to_str().unwrap(), "1");
        args.retain(|a| *a != "--steps" && *a != "1" && *a != "--lr" && *a != "0.05");
        args.extend(["--method", method]);
        args.extend(extra);
        let (ok, stdout, err) = xtask(&args);
        (ok, stdout, err, out)
    };
    // FLAP: global parameter-weighted allocation and bias compensation by default.
    let (ok, _, err, out) = run("flap", &[]);
    assert!(ok, "{err}");
    let plan = lopper_core::MaskPlan::load(&out.join("plan.json")).unwrap();
    assert_eq!(plan.meta["allocation"], "global-params");
    assert!((plan.kept_param_ratio() - 0.5).abs() < 0.1);
    let scores: lopper_core::UnitScores =
        serde_json::from_str(&std::fs::read_to_string(out.join("scores.json")).unwrap()).unwrap();
    assert_eq!(scores.method, "flap");
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("model/config.json")).unwrap())
            .unwrap();
    assert_eq!(cfg["mlp_bias"], true);
    // Bias compensation, each block's checked against the calibration loss: every decision in
    // bias-compensation.json, never above FLAP's rule or no compensation, and in the report.
    let (ok, _, err, out) = run("flap", &["--reconstruct", "bias", "--force"]);
    assert!(ok, "{err}");
    let plan = lopper_core::MaskPlan::load(&out.join("plan.json")).unwrap();
    assert_eq!(plan.meta["bias_compensation"], true);
    let sel: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("bias-compensation.json")).unwrap())
            .unwrap();
    let blocks = sel["blocks"].as_array().unwrap();
    assert!(!blocks.is_empty(), "{sel}");
    let loss = |k: &str| sel[k].as_f64().unwrap();
    assert!(
        loss("loss_chosen") <= loss("loss_all").min(loss("loss_none")),
        "{sel}"
    );
    let kept = blocks.iter().filter(|b| b["kept"] == true).count();
    let report = std::fs::read_to_string(out.join("report.md")).unwrap();
    assert!(
        report.contains(&format!("kept for {kept} of {} blocks", blocks.len())),
        "{report}"
    );
    // Least-squares reconstruction at the cut: every refit projection reported, the plan says so.
    let (ok, _, err, out) = run("flap", &["--reconstruct", "ls", "--force"]);
    assert!(ok, "{err}");
    let plan = lopper_core::MaskPlan::load(&out.join("plan.json")).unwrap();
    assert_eq!(plan.meta["reconstruct"], "ls");
    let recon: Vec<serde_json::Value> =
        serde_json::from_str(&std::fs::read_to_string(out.join("reconstruction.json")).unwrap())
            .unwrap();
    assert!(!recon.is_empty());
    for r in &recon {
        assert!(r["rel_error_ls"].as_f64().unwrap() <= r["rel_error_bias"].as_f64().unwrap());
    }
    let report = std::fs::read_to_string(out.join("report.md")).unwrap();
    assert!(report.contains("Reconstruction (ls)"), "{report}");
    // It fits on the calibration's tokens redrawn in longer windows (512, capped by the
    // model's context), recorded in the model's provenance and the report.
    let provenance = |out: &std::path::Path| -> serde_json::Value {
        serde_json::from_str::<serde_json::Value>(
            &std::fs::read_to_string(out.join("model/lopper.json")).unwrap(),
        )
        .unwrap()["provenance"]
            .clone()
    };
    let context = lopper_core::ModelShape::tiny().max_position_embeddings;
    let ls = provenance(&out)["ls_calibration"].clone();
    assert_eq!(ls["seq_len"], 512.min(context).max(16), "{ls}");
    assert!(ls["samples"].as_u64().unwrap() * ls["seq_len"].as_u64().unwrap() >= 12 * 16);
    assert!(report.contains("Least-squares calibration"), "{report}");
    // The calibration's own windows on request; a window past the model's context refused.
    let (ok, _, err, out) = run(
        "flap",
        &["--reconstruct", "ls", "--recon-seq-len", "16", "--force"],
    );
    assert!(ok, "{err}");
    assert!(provenance(&out)["ls_calibration"].is_null());
    let too_long = (context + 1).to_string();
    let args = [
        "--reconstruct",
        "ls",
        "--recon-seq-len",
        &too_long,
        "--force",
    ];
    let (ok, _, err, _) = run("flap", &args);
    assert!(!ok && err.contains("--recon-seq-len"), "{err}");
    // OBS chooses the units within the same per-layer counts; the input projections are refit
    // too on request; plan.json records the units OBS chose.
    let args = ["--reconstruct", "obs", "--refit-inputs", "--force"];
    let (ok, _, err, out) = run("flap", &args);
    assert!(ok, "{err}");
    let chosen = lopper_core::MaskPlan::load(&out.join("plan.json")).unwrap();
    assert_eq!(chosen.meta["reconstruct"], "obs");
    assert_eq!(chosen.meta["refit_inputs"], "all");
    for (a, b) in chosen.layers.iter().zip(&plan.layers) {
        assert_eq!(
            (a.kv_groups.len(), a.channels.len()),
            (b.kv_groups.len(), b.channels.len())
        );
    }
    let recon: Vec<serde_json::Value> =
        serde_json::from_str(&std::fs::read_to_string(out.join("reconstruction.json")).unwrap())
            .unwrap();
    assert!(
        recon.iter().any(|r| r["name"] == "gate/up_proj"),
        "{recon:?}"
    );
    let report = std::fs::read_to_string(out.join("report.md")).unwrap();
    assert!(report.contains("Reconstruction (obs)"), "{report}");
    for (bad, want) in [
        (&["--reconstruct", "full"][..], "none, bias, ls or obs"),
        (
            &["--reconstruct", "bias", "--refit-inputs"][..],
            "needs --reconstruct ls or obs",
        ),
    ] {
        let mut args = bad.to_vec();
        args.push("--force");
        let (ok, _, err, _) = run("flap", &args);
        assert!(
            !ok && err.contains(want) && !err.contains("panicked"),
            "{err}"
        );
    }
    // ... which can be switched off, and the allocation chosen.
    let (ok, _, err, out) = run(
        "wanda-sp",
        &["--allocation", "global", "--bias-compensation", "false"],
    );
    assert!(ok, "{err}");
    let plan = lopper_core::MaskPlan::load(&out.join("plan.json")).unwrap();
    assert_eq!(plan.meta["allocation"], "global");
    // SLEB on 3 layers (first and last protected): removes layer 1 at sparsity 0.5.
    let (ok, _, err, out) = run("sleb", &[]);
    assert!(ok, "{err}");
    let plan = lopper_core::MaskPlan::load(&out.join("plan.json")).unwrap();
    assert_eq!(plan.kept_layers(), vec![0, 2]);
    // Layer methods refuse an allocation.
    let (ok, _, err, _) = run("block-influence", &["--allocation", "global"]);
    assert!(!ok && err.contains("allocation"), "{err}");
    // Gradient-informed and bound methods. LLM-Pruner keeps the first and last layers whole by
    // default, which on 3 layers cannot remove half of the model: a clear error, then the flag.
    let (ok, _, err, _) = run("llm-pruner", &[]);
    assert!(!ok && err.contains("lower the sparsity"), "{err}");
    for (method, extra) in [
        (
            "llm-pruner",
            &["--skip-layers", "0", "--taylor", "element2", "--force"][..],
        ),
        ("llm-bip", &[][..]),
        ("mini-llm", &["--spsa-samples", "2"][..]),
        ("ifso", &["--ifso-batches", "1"][..]),
    ] {
        let (ok, _, err, out) = run(method, extra);
        assert!(ok, "{method}: {err}");
        let plan = lopper_core::MaskPlan::load(&out.join("plan.json")).unwrap();
        assert!((plan.kept_param_ratio() - 0.5).abs() < 0.1, "{method}");
        let scores: lopper_core::UnitScores =
            serde_json::from_str(&std::fs::read_to_string(out.join("scores.json")).unwrap())
                .unwrap();
        assert!(scores.method.starts_with(method), "{}", scores.method);
        let report = std::fs::read_to_string(out.join("report.md")).unwrap();
        assert!(report.contains("peak resident memory"), "{report}");
    }
    let (ok, _, err, _) = run("ifso", &["--ifso-lambda=-1", "--force"]);
    assert!(!ok && err.contains("lambda"), "{err}");
    let (ok, _, err, _) = run("llm-pruner", &["--taylor", "third", "--force"]);
    assert!(!ok && err.contains("element1"), "{err}");
}

fn compare_args<'a>(
    model: &'a str,
    calib: &'a str,
    out: &'a str,
    methods: &'a str,
) -> Vec<&'a str> {
    vec![
        "compare",
        "--model",
        model,
        "--methods",
        methods,
        "--sparsity",
        "0.3,0.5",
        "--tasks",
        "wikitext2,boolq",
        "--seq-lens",
        "16,32",
        "--limit",
        "2",
        "--calib",
        calib,
        "--calib-samples",
        "8",
        "--calib-seq-len",
        "16",
        "--batch-size",
        "2",
        "--pg-steps",
        "3",
        "--pg-batch-size",
        "2",
        "--out",
        out,
    ]
}

#[test]
fn compare_with_exact_size_gives_per_layer_methods_the_asked_size() {
    let root = tempfile::tempdir().unwrap();
    // Three KV groups per layer: a per-layer plan keeps 2 of 3 at 0.5.
    let mut shape = lopper_core::ModelShape::tiny();
    for l in &mut shape.layers {
        (l.n_heads, l.n_kv_heads) = (3, 3);
    }
    let (model, calib) = model_dir(root.path(), &shape, "three");
    let kept = |exact: bool| {
        let out = root.path().join(format!("exact-{exact}"));
        let mut args = compare_args(&model, &calib, out.to_str().unwrap(), "llm-bip,wanda-sp");
        let i = args.iter().position(|a| *a == "--sparsity").unwrap();
        args[i + 1] = "0.5";
        if exact {
            args.push("--exact-size");
        }
        let (ok, _, err) = xtask(&args);
        assert!(ok, "{err}");
        let settings = std::fs::read_to_string(out.join("settings.json")).unwrap();
        assert_eq!(settings.contains("exact_size"), exact, "{settings}");
        ["llm-bip@0.5", "wanda-sp@0.5"].map(|id| {
            let plan =
                lopper_core::MaskPlan::load(&out.join("cells").join(id).join("plan.json")).unwrap();
            (plan.kept_param_ratio(), plan.meta["allocation"].clone())
        })
    };
    for (ratio, allocation) in kept(false) {
        assert!(ratio > 0.52, "{ratio}");
        assert_eq!(allocation, "per-layer");
    }
    for (ratio, allocation) in kept(true) {
        assert!((ratio - 0.5).abs() < 0.02, "{ratio}");
        assert_eq!(allocation, "per-layer-params");
    }
}

#[test]
fn a_pg_plan_start_from_a_per_layer_method_keeps_its_per_layer_sizes() {
    // Three KV groups per layer: LLM-BIP's paper allocation keeps 2 of 3 at 0.5, more than the
    // budget. The start is its exact-size variant (every layer keeps half its parameters), not
    // the paper plan cut back to the budget by the global score order (which empties some
    // layers' MLPs and keeps others' whole).
    let root = tempfile::tempdir().unwrap();
    let mut shape = lopper_core::ModelShape::tiny();
    for l in &mut shape.layers {
        (l.n_heads, l.n_kv_heads) = (3, 3);
    }
    let (model, calib) = model_dir(root.path(), &shape, "three");
    let out = root.path().join("pg");
    let mut args = prune_args(&model, &calib, out.to_str().unwrap(), "1");
    args.extend(["--init", "llm-bip", "--reconstruct", "none"]);
    let (ok, _, err) = xtask(&args);
    assert!(ok, "{err}");
    let ckpt: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("checkpoint.json")).unwrap())
            .unwrap();
    let start = lopper_core::MaskPlan::from_json(&ckpt["init_plan"].to_string()).unwrap();
    assert_eq!(start.meta["allocation"], "per-layer-params");
    // Every layer keeps 2 KV groups and (the budget's last few channels aside) the same
    // number of channels.
    let kv: Vec<usize> = start.layers.iter().map(|l| l.kv_groups.len()).collect();
    let ch: Vec<usize> = start.layers.iter().map(|l| l.channels.len()).collect();
    assert_eq!(kv, [2, 2, 2], "{ch:?}");
    let spread = ch.iter().max().unwrap() - ch.iter().min().unwrap();
    assert!(spread <= 2, "channels per layer {ch:?}");
}

#[test]
fn compare_searches_a_layer_order_once_and_cuts_each_sparsity_from_it() {
    let root = tempfile::tempdir().unwrap();
    let mut shape = lopper_core::ModelShape::tiny();
    shape.layers = vec![shape.layers[0]; 6];
    let (model, calib) = model_dir(root.path(), &shape, "six");
    let removed = |out: &std::path::Path, id: &str| {
        let plan =
            lopper_core::MaskPlan::load(&out.join("cells").join(id).join("plan.json")).unwrap();
        plan.meta["removed_layers"].clone()
    };
    let run = |name: &str, sparsity: &'static str| {
        let out = root.path().join(name);
        let mut args = compare_args(&model, &calib, out.to_str().unwrap(), "sleb,sleb+bias");
        let i = args.iter().position(|a| *a == "--sparsity").unwrap();
        args[i + 1] = sparsity;
        let (ok, _, err) = xtask_env(&args, &[("LOPPER_LOG", "info")]);
        assert!(ok, "{err}");
        (out, err)
    };
    // One greedy search to 50% serves the 30% cells and the +bias cells.
    let (both, err) = run("both", "0.3,0.5");
    assert_eq!(err.matches("layer order reused").count(), 3, "{err}");
    let (alone, _) = run("alone", "0.3");
    let deep = removed(&both, "sleb@0.5");
    let short = removed(&both, "sleb@0.3");
    assert_eq!(short, removed(&alone, "sleb@0.3"));
    assert_eq!(removed(&both, "sleb+bias@0.3"), short);
    let (deep, short) = (deep.as_array().unwrap(), short.as_array().unwrap());
    assert!(short.len() < deep.len(), "{short:?} {deep:?}");
    assert_eq!(&deep[..short.len()], &short[..]);
    // A later run in the same folder that adds a shallower sparsity reads the stored order
    // (searched to 50%) instead of searching; its 20% plan is the one a run at 20% alone gets.
    let (_, err) = run("both", "0.2,0.3,0.5");
    assert_eq!(
        err.matches("layer order read from an earlier run").count(),
        1,
        "{err}"
    );
    let (alone20, _) = run("alone20", "0.2");
    assert_eq!(removed(&both, "sleb@0.2"), removed(&alone20, "sleb@0.2"));
    // A deeper sparsity than stored searches again.
    let (_, err) = run("alone", "0.3,0.5");
    assert_eq!(
        err.matches("layer order read from an earlier run").count(),
        0,
        "{err}"
    );
    assert_eq!(removed(&both, "sleb@0.5"), removed(&alone, "sleb@0.5"));
}

#[test]
fn compare_cells_that_differ_in_the_cut_alone_share_one_pg_search() {
    let root = tempfile::tempdir().unwrap();
    let (model, calib) = tiny_model_dir(root.path());
    let out = root.path().join("cmp");
    let mut args = compare_args(&model, &calib, out.to_str().unwrap(), "pg+none,pg+bias,pg");
    let i = args.iter().position(|a| *a == "--sparsity").unwrap();
    args[i + 1] = "0.3";
    let (ok, _, err) = xtask_env(&args, &[("LOPPER_LOG", "info")]);
    assert!(ok, "{err}");
    assert_eq!(
        err.matches("plan of the same search reused").count(),
        2,
        "{err}"
    );
    let layers = |id: &str| {
        let plan =
            lopper_core::MaskPlan::load(&out.join("cells").join(id).join("plan.json")).unwrap();
        serde_json::to_value(&plan.layers).unwrap()
    };
    assert_eq!(layers("pg+none@0.3"), layers("pg+bias@0.3"));
    assert_eq!(layers("pg+none@0.3"), layers("pg@0.3"));
    // An interrupted cell (its search checkpointed, no cell.json) resumes its search in the
    // next run, with the same plan.
    let before = layers("pg+none@0.3");
    std::fs::remove_file(out.join("cells/pg+none@0.3/cell.json")).unwrap();
    args[i - 1] = "pg+none";
    let (ok, _, err) = xtask_env(&args, &[("LOPPER_LOG", "info")]);
    assert!(ok, "{err}");
    assert!(err.contains("resuming"), "{err}");
    assert_eq!(layers("pg+none@0.3"), before);
}

#[test]
fn an_interrupted_cell_evaluation_keeps_its_finished_tasks() {
    let root = tempfile::tempdir().unwrap();
    let (model, calib) = tiny_model_dir(root.path());
    let out = root.path().join("cmp");
    let mut args = compare_args(&model, &calib, out.to_str().unwrap(), "flap");
    let i = args.iter().position(|a| *a == "--sparsity").unwrap();
    args[i + 1] = "0.3";
    let (ok, _, err) = xtask(&args);
    assert!(ok, "{err}");
    let dir = out.join("cells/flap@0.3");
    let read = || -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(dir.join("cell.json")).unwrap()).unwrap()
    };
    let first = read();
    assert!(
        !dir.join("eval-partial.json").exists(),
        "removed once the cell is whole"
    );
    let fp = first["eval_fingerprint"].as_f64().unwrap();
    // Interrupted after its first task: the next run scores only the others.
    let partial = |fp: f64| {
        let mut r = first["results"]["wikitext2@16"].clone();
        r["ppl"] = serde_json::json!(12345.0);
        let p = serde_json::json!({"fingerprint": fp, "results": {"wikitext2@16": r},
            "seconds": {"wikitext2@16": 7.0}});
        std::fs::remove_file(dir.join("cell.json")).unwrap();
        std::fs::write(dir.join("eval-partial.json"), p.to_string()).unwrap();
    };
    partial(fp);
    let (ok, _, err) = xtask_env(&args, &[("LOPPER_LOG", "info")]);
    assert!(ok, "{err}");
    assert!(
        err.contains("finished tasks of an interrupted evaluation reused"),
        "{err}"
    );
    let second = read();
    assert_eq!(second["eval_fingerprint"], first["eval_fingerprint"]);
    assert_eq!(second["results"]["wikitext2@16"]["ppl"], 12345.0);
    for k in ["wikitext2@32", "boolq"] {
        assert_eq!(
            second["results"][k]["ppl"], first["results"][k]["ppl"],
            "{k}"
        );
        assert_eq!(
            second["results"][k]["acc"], first["results"][k]["acc"],
            "{k}"
        );
    }
    assert!(second["seconds_eval"].as_f64().unwrap() >= 7.0);
    assert!(!dir.join("eval-partial.json").exists());
    // The finished tasks of another model are not reused.
    partial(fp + 1.0);
    let (ok, _, err) = xtask_env(&args, &[("LOPPER_LOG", "info")]);
    assert!(ok, "{err}");
    assert!(
        err.contains("a partial evaluation of another model ignored"),
        "{err}"
    );
    assert_eq!(
        read()["results"]["wikitext2@16"]["ppl"],
        first["results"]["wikitext2@16"]["ppl"]
    );
}

#[test]
fn compare_fills_the_table_and_reuses_finished_cells() {
    let root = tempfile::tempdir().unwrap();
    let (model, calib) = tiny_model_dir(root.path());
    let out = root.path().join("cmp");
    let o = out.to_str().unwrap();
    let (ok, stdout, err) = xtask(&compare_args(
        &model,
        &calib,
        o,
        "dense,flap,block-influence,pg:magnitude+bias",
    ));
    assert!(ok, "{err}");
    assert!(stdout.contains("| flap (+bias) | 0.3 |"), "{stdout}");
    assert!(!stdout.contains("**Partial**"), "{stdout}");
    let results: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("results.json")).unwrap()).unwrap();
    let cells = results["cells"].as_array().unwrap();
    assert_eq!(cells.len(), 1 + 3 * 2);
    for c in cells {
        for k in ["wikitext2@16", "wikitext2@32"] {
            assert!(c["results"][k]["ppl"].as_f64().unwrap().is_finite(), "{c}");
        }
        assert!(c["results"]["boolq"]["acc"].as_f64().is_some());
        let s = c["sparsity"].as_f64().unwrap();
        let kept = c["kept_param_ratio"].as_f64().unwrap();
        assert!((kept - (1.0 - s)).abs() < 0.2, "{c}");
    }
    assert!(out.join("ppl_vs_sparsity.png").is_file());
    let listing: Vec<String> = std::fs::read_dir(out.join("cells"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        out.join("cells/pg:magnitude+bias@0.5/curve.jsonl")
            .is_file(),
        "{listing:?}"
    );
    let pg = cells
        .iter()
        .find(|c| c["method"] == "pg:magnitude+bias")
        .unwrap();
    assert_eq!(pg["bias_compensation"], true);
    // A second run reuses every cell; adding a method computes only its cells.
    let stamp = |p: &str| {
        std::fs::metadata(out.join("cells").join(p).join("cell.json"))
            .unwrap()
            .modified()
            .unwrap()
    };
    let before = stamp("pg:magnitude+bias@0.3");
    let (ok, _, err) = xtask(&compare_args(
        &model,
        &calib,
        o,
        "dense,flap,block-influence,pg:magnitude+bias,random,llm-bip,wanda,alps:2:4,magnitude,pg:magnitude,flap+ls",
    ));
    assert!(ok, "{err}");
    assert!(out.join("cells/flap+ls@0.5/reconstruction.json").is_file());
    // A structured cell that kept more than its sparsity allows is named, not ranked.
    let md = std::fs::read_to_string(out.join("results.md")).unwrap();
    let results: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("results.json")).unwrap()).unwrap();
    let over: Vec<String> = results["cells"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| {
            c["rel_error"].is_null()
                && c["kept_param_ratio"].as_f64().unwrap()
                    > 1.0 - c["sparsity"].as_f64().unwrap() + 0.005
        })
        .map(|c| c["method"].as_str().unwrap().to_string())
        .collect();
    assert!(!over.is_empty(), "{md}");
    let best = md.split("Best ").nth(1).unwrap();
    let best_rows: Vec<&str> = best.lines().filter(|l| l.starts_with("| ")).collect();
    for m in &over {
        assert!(
            best.contains(&format!("not compared: {m} keeps")),
            "{m}: {best}"
        );
        for entry in best_rows.iter().flat_map(|r| r.split(" | ")) {
            let ranked = entry.split("**").nth(1).unwrap_or("");
            assert!(!ranked.split(" = ").any(|n| n == m), "{m}: {best}");
            assert!(!entry.contains(&format!("next {m} ")), "{m}: {best}");
        }
    }
    assert_eq!(stamp("pg:magnitude+bias@0.3"), before);
    // pg:magnitude starts from the magnitude plan: the same search as pg:magnitude+bias (the
    // default preset compensates inside the search either way).
    let layers = |id: &str| {
        let plan =
            lopper_core::MaskPlan::load(&out.join("cells").join(id).join("plan.json")).unwrap();
        serde_json::to_value(&plan.layers).unwrap()
    };
    assert_eq!(layers("pg:magnitude@0.3"), layers("pg:magnitude+bias@0.3"));
    let results: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("results.json")).unwrap()).unwrap();
    let cells = results["cells"].as_array().unwrap();
    // random, llm-bip, magnitude and pg:magnitude at both sparsities, wanda (unstructured) at
    // both, alps:2:4 once.
    assert_eq!(cells.len(), 9 + 2 + 2 + 2 + 2 + 1 + 2);
    // flap+ls refits the same plan as flap: same kept parameters, its own weights.
    for sp in [0.3, 0.5] {
        let cell = |m: &str| {
            cells
                .iter()
                .find(|c| c["method"] == m && c["sparsity"] == sp)
                .unwrap()
        };
        assert_eq!(
            cell("flap")["kept_param_ratio"],
            cell("flap+ls")["kept_param_ratio"]
        );
        assert_eq!(cell("flap+ls")["reconstruct"], "ls");
        assert_eq!(cell("flap")["reconstruct"], "bias");
    }
    for c in cells
        .iter()
        .filter(|c| c["method"] == "wanda" || c["method"] == "alps:2:4")
    {
        let err = c["rel_error"].as_f64().unwrap();
        assert!(err > 0.0 && err < 1.0, "{c}");
        // One-shot: the model keeps its shape, a fraction of its linear weights is zero.
        let s = c["sparsity"].as_f64().unwrap();
        assert!(
            (c["kept_param_ratio"].as_f64().unwrap() - (1.0 - s)).abs() < 0.01,
            "{c}"
        );
        assert!(
            c["results"]["wikitext2@16"]["ppl"]
                .as_f64()
                .unwrap()
                .is_finite()
        );
    }
    assert!(
        cells
            .iter()
            .any(|c| c["method"] == "alps:2:4" && c["sparsity"] == 0.5)
    );
    assert!(out.join("cells/alps:2:4@0.5/sparsity.json").is_file());
    let md = std::fs::read_to_string(out.join("results.md")).unwrap();
    // Each computed cell records its planning peak memory (the high-water mark is reset per cell).
    assert!(md.contains("| plan s | plan peak MiB | eval s |"), "{md}");
    for c in cells {
        let peak = c["plan_peak_mib"].as_f64().unwrap();
        let start = c["plan_start_mib"].as_f64().unwrap();
        assert!(start > 1.0 && peak >= start && peak < 100_000.0, "{c}");
    }
    assert!(
        md.contains("Mean relative reconstruction error of each layer")
            && md.contains("| alps:2:4@0.5 |"),
        "{md}"
    );
    // --report-only computes nothing: the table of the finished cells, the missing ones listed.
    let mut report = compare_args(&model, &calib, o, "dense,flap,sleb");
    report.push("--report-only");
    let (ok, stdout, err) = xtask(&report);
    assert!(ok, "{err}");
    assert!(
        stdout.contains("**Partial**: 3 of 5 cells finished; missing: sleb@0.3, sleb@0.5."),
        "{stdout}"
    );
    assert!(!out.join("cells/sleb@0.3").exists());
    let results: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("results.json")).unwrap()).unwrap();
    assert_eq!(results["cells"].as_array().unwrap().len(), 3);
    assert_eq!(results["missing"].as_array().unwrap().len(), 2);
    let elsewhere = root.path().join("nothing");
    let mut report = compare_args(&model, &calib, elsewhere.to_str().unwrap(), "dense");
    report.push("--report-only");
    let (ok, _, err) = xtask(&report);
    assert!(!ok && err.contains("holds no comparison"), "{err}");
    assert!(!elsewhere.exists());
    // Other settings in the same folder are refused.
    let mut other = compare_args(&model, &calib, o, "dense");
    other.extend(["--seed", "3"]);
    let (ok, _, err) = xtask(&other);
    assert!(!ok && err.contains("other settings"), "{err}");
    // Bad lists fail before any work.
    for (bad, want) in [
        ("dense,obs", "obs"),
        ("flap:magnitude", "only pg"),
        ("alps:3:2", "N:M"),
        ("wanda+bias", "+bias"),
        ("flap+best", "none, bias, ls or obs"),
    ] {
        let (ok, _, err) = xtask(&compare_args(&model, &calib, o, bad));
        assert!(!ok && err.contains(want), "{bad}: {err}");
    }
    // `+obs`: the cell's plan holds the units OBS chose, in FLAP's per-layer counts.
    let obs = root.path().join("obs");
    let (ok, _, err) = xtask(&compare_args(
        &model,
        &calib,
        obs.to_str().unwrap(),
        "flap+ls,flap+obs",
    ));
    assert!(ok, "{err}");
    for s in ["0.3", "0.5"] {
        let plan = |m: &str| {
            lopper_core::MaskPlan::load(&obs.join(format!("cells/{m}@{s}/plan.json"))).unwrap()
        };
        let (ls, chosen) = (plan("flap+ls"), plan("flap+obs"));
        for (a, b) in chosen.layers.iter().zip(&ls.layers) {
            assert_eq!(
                (a.kv_groups.len(), a.channels.len()),
                (b.kv_groups.len(), b.channels.len())
            );
        }
        assert!(
            obs.join(format!("cells/flap+obs@{s}/reconstruction.json"))
                .is_file()
        );
    }
}

#[test]
fn compare_two_methods_on_the_real_model() {
    let root = tempfile::tempdir().unwrap();
    let out = root.path().join("cmp");
    let (ok, stdout, err) = xtask(&[
        "compare",
        "--methods",
        "flap,pg",
        "--sparsity",
        "0.3",
        "--tasks",
        "wikitext2,boolq",
        "--seq-lens",
        "128",
        "--limit",
        "4",
        // Most of the time is the paired compensation test, on every calibration window.
        "--calib-samples",
        "4",
        "--metric-samples",
        "4",
        "--pg-steps",
        "3",
        "--pg-batch-size",
        "2",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    let results: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("results.json")).unwrap()).unwrap();
    let cells = results["cells"].as_array().unwrap();
    assert_eq!(cells.len(), 2);
    for c in cells {
        let kept = c["kept_param_ratio"].as_f64().unwrap();
        assert!((kept - 0.7).abs() < 0.01, "{c}");
        let ppl = c["results"]["wikitext2@128"]["ppl"].as_f64().unwrap();
        // Pruning 30% hurts, but the model still predicts far better than uniform (49,152).
        assert!(ppl > 45.0 && ppl < 20_000.0, "{c}");
        assert_eq!(c["results"]["boolq"]["n"], 4);
    }
    assert!(
        stdout.contains("Best perplexity per sparsity on each column"),
        "{stdout}"
    );
}

#[test]
fn one_shot_sparsegpt_2_4_on_the_real_model() {
    let root = tempfile::tempdir().unwrap();
    let out = root.path().join("sgpt");
    let (ok, stdout, err) = xtask(&[
        "prune",
        "--method",
        "sparsegpt",
        "--pattern",
        "2:4",
        "--sparsity",
        "0.5",
        "--calib-samples",
        "4",
        "--eval",
        "wikitext2",
        "--eval-limit",
        "4",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    assert!(
        stdout.contains("0.5000 of the decoder linear weights are zero"),
        "{stdout}"
    );
    let s: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("sparsity.json")).unwrap()).unwrap();
    let linears = s["linears"].as_array().unwrap();
    assert_eq!(linears.len(), 30 * 7);
    for l in linears {
        // 2:4 zeroes exactly half; a kept weight may itself be 0 in the quantised checkpoint.
        let sp = l["sparsity"].as_f64().unwrap();
        assert!((0.5..0.501).contains(&sp), "{l}");
        let e = l["rel_error"].as_f64().unwrap();
        assert!(e > 0.0 && e < 1.0, "{l}");
    }
    let eval: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("eval.json")).unwrap()).unwrap();
    let ppl = eval["results"]["wikitext2"]["ppl"].as_f64().unwrap();
    // 2:4 with 4 calibration windows costs a lot (508 measured), far from uniform (49,152).
    assert!(ppl > 45.0 && ppl < 5000.0, "{ppl}");
    // --sparsity must agree with the pattern; --pattern is for one-shot methods only.
    for (args, want) in [
        (
            vec![
                "prune",
                "--method",
                "wanda",
                "--pattern",
                "2:4",
                "--sparsity",
                "0.3",
                "--out",
                "x",
            ],
            "--sparsity 0.5",
        ),
        (
            vec![
                "prune",
                "--method",
                "flap",
                "--pattern",
                "2:4",
                "--sparsity",
                "0.5",
                "--out",
                "x",
            ],
            "--pattern is for",
        ),
        (
            vec![
                "prune",
                "--method",
                "alps",
                "--pattern",
                "4:2",
                "--sparsity",
                "0.5",
                "--out",
                "x",
            ],
            "N:M",
        ),
    ] {
        let (ok, _, err) = xtask(&args);
        assert!(!ok && err.contains(want), "{args:?}: {err}");
    }
}

#[test]
fn bench_solvers_prints_a_row_per_method_and_shape() {
    let (ok, out, err) = xtask(&["bench", "solvers", "--shapes", "8x16,4x8", "--tokens", "64"]);
    assert!(ok, "{err}");
    for m in ["Magnitude", "Wanda", "SparseGpt", "Alps"] {
        assert_eq!(out.matches(&format!("| {m} |")).count(), 2, "{out}");
    }
    let (ok, _, err) = xtask(&["bench", "solvers", "--shapes", "8y16"]);
    assert!(!ok && err.contains("OUTxIN"), "{err}");
}

#[test]
fn contexts_beyond_the_model_positions_are_refused_before_any_work() {
    let (ok, _, err) = xtask(&[
        "eval",
        "--model",
        "default",
        "--tasks",
        "wikitext2",
        "--seq-len",
        "100000",
        "--limit",
        "1",
    ]);
    assert!(
        !ok && err.contains("--seq-len 100000")
            && err.contains("8192 positions")
            && err.contains("--allow-longer-context"),
        "{err}"
    );
    let root = tempfile::tempdir().unwrap();
    let (model, calib) = tiny_model_dir(root.path());
    let out = root.path().join("long");
    let mut args = prune_args(&model, &calib, out.to_str().unwrap(), "1");
    let at = args.iter().position(|a| *a == "16").unwrap();
    args[at] = "65";
    let (ok, _, err) = xtask(&args);
    assert!(!ok && err.contains("64 positions"), "{err}");
    assert!(!out.exists());
}

#[test]
fn batches_that_cannot_fit_in_memory_are_refused_with_the_figure_and_the_flag() {
    // The limit is the memory available when each check runs: enough for the default model's
    // weights (621 MiB with loading), not for these forwards.
    let limit = [("LOPPER_MEMORY_LIMIT", "700MiB")];
    let (ok, _, err) = xtask_env(
        &[
            "eval",
            "--model",
            "default",
            "--tasks",
            "wikitext2",
            "--seq-len",
            "2048",
            "--batch-size",
            "8",
        ],
        &limit,
    );
    assert!(
        !ok && err.contains("needs about")
            && err.contains("700.0 MiB is available (LOPPER_MEMORY_LIMIT)")
            && err.contains("--seq-len"),
        "{err}"
    );
    // A batch that is too large alone: the message names the batch size that fits.
    let (ok, _, err) = xtask_env(
        &[
            "eval",
            "--model",
            "default",
            "--tasks",
            "wikitext2",
            "--seq-len",
            "128",
            "--batch-size",
            "64",
        ],
        &[("LOPPER_MEMORY_LIMIT", "1G")],
    );
    assert!(!ok && err.contains("lower --batch-size to"), "{err}");
    let (ok, _, err) = xtask_env(
        &[
            "bench", "forward", "--model", "default", "--shapes", "8x1024",
        ],
        &[("LOPPER_MEMORY_LIMIT", "700MiB")],
    );
    assert!(!ok && err.contains("bench 8x1024"), "{err}");
    let (ok, _, err) = xtask_env(
        &["eval", "--model", "default", "--tasks", "wikitext2"],
        &[("LOPPER_MEMORY_LIMIT", "a lot")],
    );
    assert!(!ok && err.contains("not a byte count"), "{err}");
    // The tiny model's prune refuses the same way, before any output.
    let root = tempfile::tempdir().unwrap();
    let (model, calib) = tiny_model_dir(root.path());
    let out = root.path().join("small");
    let mut args = prune_args(&model, &calib, out.to_str().unwrap(), "1");
    // An earlier run in the folder survives a refused --force run.
    std::fs::create_dir_all(&out).unwrap();
    std::fs::write(out.join("plan.json"), "{}").unwrap();
    args.push("--force");
    // 64-token windows: the tiny model's weights (141 KiB with loading) fit, the forward not.
    let at = args.iter().position(|a| *a == "16").unwrap();
    args[at] = "64";
    let (ok, _, err) = xtask_env(&args, &[("LOPPER_MEMORY_LIMIT", "300K")]);
    assert!(
        !ok && err.contains("calibration: a forward of 2 x 64"),
        "{err}"
    );
    assert_eq!(
        std::fs::read_to_string(out.join("plan.json")).unwrap(),
        "{}"
    );
}

#[test]
fn a_least_squares_cut_or_refit_proxy_too_large_for_memory_is_refused_before_any_work() {
    // A wide MLP on a small model: 9 MiB of weights, but least squares on down_proj's 8,192
    // inputs holds Gram matrices of 8,193^2 f64 (537 MB each).
    let root = tempfile::tempdir().unwrap();
    let mut shape = lopper_core::ModelShape::tiny();
    for l in &mut shape.layers {
        l.ffn_hidden = 8192;
    }
    let (model, calib) = model_dir(root.path(), &shape, "wide");
    let limit = [("LOPPER_MEMORY_LIMIT", "1G")];
    let out = root.path().join("pg");
    let mut args = prune_args(&model, &calib, out.to_str().unwrap(), "1");
    args.extend(["--reconstruct", "ls"]);
    let (ok, _, err) = xtask_env(&args, &limit);
    assert!(
        !ok && err.contains("least-squares cut holds about 2.0 GiB")
            && err.contains("8192 inputs")
            && err.contains("1.0 GiB is available (LOPPER_MEMORY_LIMIT)")
            && err.contains("--reconstruct bias"),
        "{err}"
    );
    // No output folder is made: the next try needs no --force.
    assert!(!out.exists());
    // compare refuses before its first cell.
    let cmp = root.path().join("cmp");
    let args = compare_args(&model, &calib, cmp.to_str().unwrap(), "flap,flap+ls");
    let (ok, _, err) = xtask_env(&args, &limit);
    assert!(!ok && err.contains("--reconstruct ls"), "{err}");
    assert!(
        !cmp.join("cells")
            .join("flap@0.3")
            .join("cell.json")
            .exists()
    );
    // The refit proxy keeps every layer's inverse Gram matrix (three of 537 MB here) and one
    // being accumulated: the search refuses before its first step, and says how to go on.
    let mut args = prune_args(&model, &calib, out.to_str().unwrap(), "1");
    args.extend(["--reconstruct", "bias", "--refit-proxy"]);
    let (ok, _, err) = xtask_env(&args, &limit);
    assert!(
        !ok && err.contains("--refit-proxy holds about 2.0 GiB")
            && err.contains("1.0 GiB is available (LOPPER_MEMORY_LIMIT)")
            && err.contains("search without --refit-proxy"),
        "{err}"
    );
    assert!(!out.exists());
    // The same prune with a cut that needs no statistics, and no proxy, runs.
    let mut args = prune_args(&model, &calib, out.to_str().unwrap(), "1");
    args.extend(["--reconstruct", "bias"]);
    let (ok, _, err) = xtask_env(&args, &limit);
    assert!(ok, "{err}");
}

#[test]
fn outputs_that_cannot_fit_on_disk_are_refused_before_any_work() {
    let root = tempfile::tempdir().unwrap();
    let (model, calib) = tiny_model_dir(root.path());
    let out = root.path().join("full");
    // An earlier run in the folder survives a refused --force run; its bytes count as free.
    std::fs::create_dir_all(&out).unwrap();
    std::fs::write(out.join("plan.json"), "{}").unwrap();
    let mut args = prune_args(&model, &calib, out.to_str().unwrap(), "1");
    args.push("--force");
    let (ok, _, err) = xtask_env(&args, &[("LOPPER_DISK_LIMIT", "1M")]);
    assert!(
        !ok && err.contains("the pruned model needs about")
            && err.contains("1.0 MiB free")
            && err.contains("write to another disk"),
        "{err}"
    );
    assert_eq!(
        std::fs::read_to_string(out.join("plan.json")).unwrap(),
        "{}"
    );
    // The export knows its exact size: refused with nothing written, then written with room.
    let o = root.path().join("exported");
    let export = ["export", "--model", &model, "--out", o.to_str().unwrap()];
    let (ok, _, err) = xtask_env(&export, &[("LOPPER_DISK_LIMIT", "20K")]);
    assert!(
        !ok && err.contains("the exported model needs about") && !o.exists(),
        "{err}"
    );
    let leftovers: Vec<_> = std::fs::read_dir(root.path())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().contains("partial"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    let (ok, _, err) = xtask_env(&export, &[("LOPPER_DISK_LIMIT", "plenty")]);
    assert!(!ok && err.contains("not a byte count"), "{err}");
    let (ok, _, err) = xtask_env(&export, &[("LOPPER_DISK_LIMIT", "100M")]);
    assert!(ok && o.join("model.safetensors").is_file(), "{err}");
}

#[test]
fn a_degenerate_plan_is_kept_with_a_warning_in_the_report() {
    let root = tempfile::tempdir().unwrap();
    let (model, calib) = tiny_model_dir(root.path());
    let out = root.path().join("thin");
    let mut args = prune_args(&model, &calib, out.to_str().unwrap(), "1");
    args.retain(|a| !["--steps", "1", "--lr", "0.05", "0.5", "--sparsity"].contains(a));
    args.extend([
        "--method",
        "magnitude",
        "--allocation",
        "global",
        "--sparsity",
        "0.8",
    ]);
    let (ok, _, err) = xtask(&args);
    assert!(ok, "{err}");
    let report = std::fs::read_to_string(out.join("report.md")).unwrap();
    assert!(
        report.contains("## Warnings") && report.contains("keep no KV group"),
        "{report}"
    );
    let plan = lopper_core::MaskPlan::load(&out.join("plan.json")).unwrap();
    assert!(!plan.degeneracies().is_empty());
    assert!(
        plan.meta["warnings"]
            .as_array()
            .is_some_and(|w| !w.is_empty())
    );
}

#[test]
fn a_missing_plan_names_the_file_and_the_os_error_once() {
    let root = tempfile::tempdir().unwrap();
    let missing = root.path().join("nope.json");
    let (ok, _, err) = xtask(&[
        "export",
        "--plan",
        missing.to_str().unwrap(),
        "--out",
        root.path().join("x").to_str().unwrap(),
    ]);
    assert!(!ok && err.contains("nope.json"), "{err}");
    assert_eq!(err.matches("No such file or directory").count(), 1, "{err}");
}

/// The tiny model with a third of layer 1's channels and one KV group of layer 2 cut away
/// (exported with its plan), and the tiny model itself: a pruned student and its teacher.
fn tiny_pruned_pair(root: &std::path::Path) -> (String, String, String) {
    let (teacher, calib) = tiny_model_dir(root);
    let mut plan = lopper_core::MaskPlan::keep_all(&lopper_core::ModelShape::tiny());
    plan.layers[1].channels.truncate(32);
    plan.layers[2].kv_groups.truncate(1);
    let plan_path = root.join("cut.json");
    plan.save(&plan_path).unwrap();
    let student = root.join("student");
    let (ok, _, err) = xtask(&[
        "export",
        "--model",
        &teacher,
        "--plan",
        plan_path.to_str().unwrap(),
        "--out",
        student.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    (student.to_str().unwrap().into(), teacher, calib)
}

/// `recover` on the tiny pair; each `--flag value` of `overrides` replaces the default's (a
/// flag followed by another flag, or last, is a switch and is appended).
fn recover_args<'a>(
    student: &'a str,
    teacher: &'a str,
    calib: &'a str,
    out: &'a str,
    overrides: &[&'a str],
) -> Vec<&'a str> {
    let mut args = vec![
        "recover",
        "--model",
        student,
        "--teacher",
        teacher,
        "--data",
        calib,
        "--loss",
        "ce+kd",
        "--steps",
        "6",
        "--batch-size",
        "2",
        "--micro-batch",
        "1",
        "--seq-len",
        "16",
        "--held-out",
        "3",
        "--lr",
        "0.01",
        "--checkpoint-every",
        "2",
        "--out",
        out,
    ];
    let mut i = 0;
    while i < overrides.len() {
        let flag = overrides[i];
        match overrides.get(i + 1).filter(|v| !v.starts_with("--")) {
            Some(value) => {
                match args.iter().position(|a| *a == flag) {
                    Some(p) => args[p + 1] = value,
                    None => args.extend([flag, value]),
                }
                i += 2;
            }
            None => {
                args.push(flag);
                i += 1;
            }
        }
    }
    args
}

#[test]
fn recover_trains_the_pruned_tiny_model_and_resumes_bit_identically() {
    let root = tempfile::tempdir().unwrap();
    let (student, teacher, calib) = tiny_pruned_pair(root.path());
    let full = root.path().join("full");
    let args = recover_args(
        &student,
        &teacher,
        &calib,
        full.to_str().unwrap(),
        &["--keep-adapters"],
    );
    let (ok, stdout, err) = xtask(&args);
    assert!(ok, "{err}");
    assert!(stdout.contains("recovered: held-out loss"), "{stdout}");
    let read = |d: &std::path::Path, f: &str| std::fs::read(d.join(f)).unwrap();
    let curve = String::from_utf8(read(&full, "curve.jsonl")).unwrap();
    let records: Vec<serde_json::Value> = curve
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(records.len(), 6);
    assert!(
        records
            .iter()
            .all(|r| r["ce"].is_number() && r["kd"].is_number())
    );
    let report = String::from_utf8(read(&full, "report.md")).unwrap();
    for want in [
        "before recovery",
        "after recovery",
        "teacher",
        "No evaluation set",
    ] {
        assert!(report.contains(want), "{want}: {report}");
    }
    assert!(full.join("loss.png").is_file());
    // The recovered model loads, keeps the student's shape and records its plan.
    let (ok, info, err) = xtask(&[
        "info",
        "--model",
        full.join("model").to_str().unwrap(),
        "--json",
    ]);
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(&info).unwrap();
    let (_, sinfo, _) = xtask(&["info", "--model", &student, "--json"]);
    let s: serde_json::Value = serde_json::from_str(&sinfo).unwrap();
    assert_eq!(v["params"]["total"], s["params"]["total"]);
    let meta: serde_json::Value =
        serde_json::from_slice(&read(&full.join("model"), "lopper.json")).unwrap();
    assert!(meta["plan"].is_object() && meta["provenance"]["recover"].is_object());
    // PEFT adapters: rank 8 on the 3 x 7 linears.
    let cfg: serde_json::Value =
        serde_json::from_slice(&read(&full.join("adapters"), "adapter_config.json")).unwrap();
    assert_eq!(
        (cfg["r"].as_u64(), cfg["peft_type"].as_str()),
        (Some(8), Some("LORA"))
    );
    let st = read(&full.join("adapters"), "adapter_model.safetensors");
    let st = safetensors::SafeTensors::deserialize(&st).unwrap();
    assert_eq!(st.len(), 42);
    // A finished run keeps no checkpoint.
    assert!(!full.join("recover-checkpoint.json").exists());

    // Interrupted after 3 steps, then resumed: the same curve and the same weights.
    let part = root.path().join("part");
    let part_s = part.to_str().unwrap();
    let args = recover_args(&student, &teacher, &calib, part_s, &["--stop-after", "3"]);
    let (ok, _, err) = xtask(&args);
    assert!(
        !ok && err.contains("interrupted at step 3") && err.contains("--resume"),
        "{err}"
    );
    assert!(part.join("recover-checkpoint.json").is_file() && !part.join("model").exists());
    let other = recover_args(
        &student,
        &teacher,
        &calib,
        part_s,
        &["--resume", "--rank", "4"],
    );
    let (ok, _, err) = xtask(&other);
    assert!(!ok && err.contains("same flags"), "{err}");
    let other = recover_args(
        &student,
        &teacher,
        &calib,
        part_s,
        &["--resume", "--dtype", "bf16"],
    );
    let (ok, _, err) = xtask(&other);
    assert!(
        !ok && err.contains("--dtype f32; resume it with the same"),
        "{err}"
    );
    let resume = recover_args(&student, &teacher, &calib, part_s, &["--resume"]);
    let (ok, _, err) = xtask(&resume);
    assert!(ok, "{err}");
    let strip_seconds = |d: &std::path::Path| -> Vec<serde_json::Value> {
        String::from_utf8(read(d, "curve.jsonl"))
            .unwrap()
            .lines()
            .map(|l| {
                let mut v: serde_json::Value = serde_json::from_str(l).unwrap();
                v.as_object_mut().unwrap().remove("seconds");
                v
            })
            .collect()
    };
    assert_eq!(strip_seconds(&full), strip_seconds(&part));
    assert_eq!(
        read(&full.join("model"), "model.safetensors"),
        read(&part.join("model"), "model.safetensors")
    );

    // Full fine-tuning on cross-entropy alone, with no teacher.
    let ce = root.path().join("ce");
    let args = recover_args(
        &student,
        "none",
        &calib,
        ce.to_str().unwrap(),
        &[
            "--loss", "ce", "--method", "full", "--steps", "2", "--lr", "0.001",
        ],
    );
    let (ok, _, err) = xtask(&args);
    assert!(ok, "{err}");
    let report = std::fs::read_to_string(ce.join("report.md")).unwrap();
    assert!(report.contains("teacher: `none`"), "{report}");
}

#[test]
fn recover_refuses_bad_input_before_any_work() {
    let root = tempfile::tempdir().unwrap();
    let (student, teacher, calib) = tiny_pruned_pair(root.path());
    // A teacher with another vocabulary, and one of another shape (not what it was cut from).
    let export = |shape: &lopper_core::ModelShape, name: &str| {
        let m = lopper_model::Llama::<burn_flex::Flex>::random(shape, 3, &burn_flex::FlexDevice)
            .unwrap();
        let tok = lopper_model::Tokenizer::word_level(shape.vocab_size);
        let dir = root.path().join(name);
        let opts = lopper_surgery::ExportOptions {
            format: lopper_surgery::ExportFormat::Hf,
            force: false,
            provenance: serde_json::Value::Null,
        };
        lopper_surgery::export(&m, &tok, None, &opts, &dir).unwrap();
        dir.to_str().unwrap().to_string()
    };
    let mut wide = lopper_core::ModelShape::tiny();
    wide.vocab_size = 256;
    let wide = export(&wide, "wide");
    let mut other = lopper_core::ModelShape::tiny();
    other.layers[0].ffn_hidden = 64;
    let other = export(&other, "other");
    let out = root.path().join("x");
    let o = out.to_str().unwrap();
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["--data", "wikitext2"], "evaluation set"),
        (vec!["--teacher", "none", "--loss", "kd"], "--teacher"),
        (vec!["--teacher", &wide], "vocabulary"),
        (vec!["--teacher", &other], "--teacher none"),
        (vec!["--steps", "1000"], "windows"),
        (vec!["--method", "qlora"], "lora or full"),
        (vec!["--rank", "0"], "--rank"),
        (vec!["--lr", "0"], "--lr"),
        (vec!["--loss", "mse"], "unknown loss"),
        (vec!["--top-k", "0"], "--top-k"),
        (vec!["--resume"], "does not exist"),
    ];
    for (extra, want) in cases {
        let args = recover_args(&student, &teacher, &calib, o, &extra);
        let (ok, _, err) = xtask(&args);
        assert!(
            !ok && err.contains(want),
            "{extra:?}: want `{want}` in {err}"
        );
        assert!(!err.contains("panicked"), "{err}");
        assert!(!out.exists(), "{extra:?} wrote {o}");
    }
    // The numbers of too little data.
    let args = recover_args(&student, &teacher, &calib, o, &["--steps", "1000"]);
    let (_, _, err) = xtask(&args);
    assert!(err.contains("2000 plus --held-out 3"), "{err}");
}

#[test]
fn recover_on_the_real_model_lowers_the_held_out_loss() {
    let root = tempfile::tempdir().unwrap();
    // A crude cut of the default model: every layer loses its last quarter of MLP channels.
    let (ok, info, err) = xtask(&["info", "--model", "default", "--json"]);
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(&info).unwrap();
    let shape: lopper_core::ModelShape = serde_json::from_value(v["shape"].clone()).unwrap();
    let mut plan = lopper_core::MaskPlan::keep_all(&shape);
    for l in &mut plan.layers {
        l.channels.truncate(l.channels.len() * 3 / 4);
    }
    let plan_path = root.path().join("plan.json");
    plan.save(&plan_path).unwrap();
    let student = root.path().join("student");
    let (ok, _, err) = xtask(&[
        "export",
        "--plan",
        plan_path.to_str().unwrap(),
        "--out",
        student.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    let out = root.path().join("rec");
    let (ok, stdout, err) = xtask(&[
        "recover",
        "--model",
        student.to_str().unwrap(),
        "--steps",
        "4",
        "--batch-size",
        "4",
        "--micro-batch",
        "2",
        "--held-out",
        "8",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    let report = std::fs::read_to_string(out.join("report.md")).unwrap();
    let loss = |row: &str| -> f64 {
        let line = report.lines().find(|l| l.starts_with(row)).unwrap();
        line.split('|').nth(2).unwrap().trim().parse().unwrap()
    };
    let (teacher, before, after) = (
        loss("| teacher"),
        loss("| before recovery"),
        loss("| after recovery"),
    );
    // Training on the text (the default, cross-entropy) wins back part of what the cut lost.
    assert!(
        teacher < before && after < before - 0.01,
        "{stdout}\n{report}"
    );
    // The recovered model exports to GGUF like any pruned one, and loads back the same size.
    let gguf = root.path().join("gguf");
    let (ok, _, err) = xtask(&[
        "export",
        "--model",
        out.join("model").to_str().unwrap(),
        "--format",
        "gguf",
        "--out",
        gguf.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    let params = |m: &str| -> serde_json::Value {
        let (ok, info, err) = xtask(&["info", "--model", m, "--json"]);
        assert!(ok, "{err}");
        serde_json::from_str::<serde_json::Value>(&info).unwrap()["params"]["total"].clone()
    };
    assert_eq!(
        params(gguf.join("model.gguf").to_str().unwrap()),
        params(student.to_str().unwrap())
    );
}

#[test]
fn compare_recovers_cells_with_the_suffix_and_shares_their_search() {
    let root = tempfile::tempdir().unwrap();
    let (model, calib) = tiny_model_dir(root.path());
    let out = root.path().join("cmp");
    let o = out.to_str().unwrap();
    let mut args = compare_args(&model, &calib, o, "pg+ls,pg+ls+recover,flap+recover");
    args.extend([
        "--recover-steps",
        "3",
        "--recover-batch-size",
        "2",
        "--recover-lr",
        "0.01",
        "--pg-judge",
        "ls",
    ]);
    let (ok, stdout, err) = xtask(&args);
    assert!(ok, "{err}");
    assert!(
        stdout.contains("`+recover` cells: after the cut, 3 steps of 2 windows"),
        "{stdout}"
    );
    let results: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("results.json")).unwrap()).unwrap();
    let cells = results["cells"].as_array().unwrap();
    assert_eq!(cells.len(), 6);
    let ppl = |m: &str, s: f64| {
        cells
            .iter()
            .find(|c| c["method"] == m && c["sparsity"] == s)
            .unwrap()["results"]["wikitext2@16"]["ppl"]
            .as_f64()
            .unwrap()
    };
    for s in [0.3, 0.5] {
        // One search, then two models: the recovered one differs from the cut.
        assert_ne!(ppl("pg+ls", s), ppl("pg+ls+recover", s));
        let dir = out.join(format!("cells/pg+ls+recover@{s}"));
        let lines = std::fs::read_to_string(dir.join("recover/curve.jsonl")).unwrap();
        assert_eq!(lines.lines().count(), 3);
        assert!(!dir.join("curve.jsonl").exists(), "the search ran again");
        assert!(!dir.join("recover/recover-checkpoint.json").exists());
        // --pg-judge ls: the search's held-out choice scored least-squares cuts.
        let plan =
            lopper_core::MaskPlan::load(&out.join(format!("cells/pg+ls@{s}/plan.json"))).unwrap();
        assert_eq!(plan.meta["final_choice"]["judge"]["type"], "reconstructed");
    }
    for (methods, want) in [
        ("dense+recover", "+recover"),
        ("alps+recover", "+recover"),
        ("flap+best+recover", "none, bias, ls or obs"),
    ] {
        let (ok, _, err) = xtask(&compare_args(&model, &calib, o, methods));
        assert!(!ok && err.contains(want), "{methods}: {err}");
    }
    let mut args = compare_args(&model, "wikitext2", o, "flap+recover");
    args.push("--force");
    let (ok, _, err) = xtask(&args);
    assert!(!ok && err.contains("evaluation set"), "{err}");
}

#[test]
fn compare_with_offloaded_layers_gives_the_resident_runs_results() {
    let root = tempfile::tempdir().unwrap();
    let (model, calib) = model_dir(root.path(), &lopper_core::ModelShape::tiny(), "offload");
    let methods = "dense,pg,flap,sleb+ls,llm-bip+bias,block-influence,sparsegpt";
    let run = |name: &str, extra: &[&str]| {
        let out = root.path().join(name);
        let mut args = compare_args(&model, &calib, out.to_str().unwrap(), methods);
        args.extend_from_slice(extra);
        let (ok, _, err) = xtask(&args);
        assert!(ok, "{name}: {err}");
        let cells = out.join("cells");
        let mut found: Vec<(String, serde_json::Value)> = std::fs::read_dir(&cells)
            .unwrap()
            .map(|e| {
                let e = e.unwrap();
                let cell: serde_json::Value = serde_json::from_str(
                    &std::fs::read_to_string(e.path().join("cell.json")).unwrap(),
                )
                .unwrap();
                let id = e.file_name().to_string_lossy().into_owned();
                // Every number but the times.
                let mut results = cell["results"].as_object().unwrap().clone();
                for r in results.values_mut() {
                    r.as_object_mut().unwrap().remove("seconds");
                }
                (id, serde_json::json!([results, cell["params"]]))
            })
            .collect();
        found.sort_by(|a, b| a.0.cmp(&b.0));
        found
    };
    let resident = run("resident", &[]);
    let offloaded = run("offloaded", &["--offload", "cpu"]);
    assert_eq!(resident.len(), 13);
    assert_eq!(resident, offloaded);
    // Refused before any cell: a method that reads every weight at once, and +recover.
    for (methods, want) in [
        ("dense,llm-pruner", "needs every decoder weight at once"),
        ("pg:magnitude", "needs every decoder weight at once"),
        ("flap+recover", "trains a copy of every layer"),
    ] {
        let out = root.path().join("refused");
        let mut args = compare_args(&model, &calib, out.to_str().unwrap(), methods);
        args.extend_from_slice(&["--offload", "cpu"]);
        let (ok, _, err) = xtask(&args);
        assert!(!ok && err.contains(want), "{methods}: {err}");
        assert!(!out.exists(), "{methods}");
    }
}
