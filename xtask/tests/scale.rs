//! Scale: storage types, synthetic models of real shapes, the memory plan and its refusals.

mod common;
use common::{xtask, xtask_env};

fn json(out: &str) -> serde_json::Value {
    serde_json::from_str(out).unwrap_or_else(|e| panic!("{e}: {out}"))
}

fn memory_plan(model: &str, dtype: &str, batch: &str, seq: &str) -> serde_json::Value {
    let (ok, out, err) = xtask(&[
        "info",
        "--model",
        model,
        "--memory",
        "--dtype",
        dtype,
        "--batch-size",
        batch,
        "--seq-len",
        seq,
        "--json",
    ]);
    assert!(ok, "{err}");
    json(&out)["memory"].clone()
}

/// `synthetic:DIR/config.json` for a config written there: a model of that shape with seeded
/// random weights.
fn synthetic_config(dir: &std::path::Path, config: &str) -> String {
    let cfg = dir.join("config.json");
    std::fs::write(&cfg, config).unwrap();
    format!("synthetic:{}", cfg.display())
}

#[test]
fn every_builtin_synthetic_model_has_its_shape_and_a_memory_plan_without_loading() {
    for name in [
        "llama-3.2-1b",
        "llama-3.1-8b",
        "llama-2-7b",
        "llama-2-13b",
        "llama-2-70b",
        "mistral-7b",
        "qwen2.5-7b",
    ] {
        let (ok, out, err) = xtask(&["info", "--model", &format!("synthetic:{name}")]);
        assert!(ok, "{name}: {err}");
        assert!(out.contains("format     synthetic"), "{out}");
    }
    // 8.03 B parameters: 2 bytes each in bf16, 4 in f32; synthetic weights are generated in
    // place (nothing extra while loading).
    let bf16 = memory_plan("synthetic:llama-3.1-8b", "bf16", "1", "128");
    let w = bf16["weights"].as_f64().unwrap();
    assert!((w / 16.06e9 - 1.0).abs() < 0.005, "{bf16}");
    assert_eq!(bf16["loading_extra"], 0);
    let f32 = memory_plan("synthetic:llama-3.1-8b", "f32", "1", "128");
    let ratio = f32["weights"].as_f64().unwrap() / w;
    assert!((ratio - 2.0).abs() < 0.001, "{ratio}");
    // Files hand tensors over as f32: the largest one (the default model's embedding) in flight.
    let d = memory_plan("default", "f32", "8", "128");
    assert_eq!(d["loading_extra"], 49152 * 576 * 4);
    // The text plan names the parts and the verdict.
    let (ok, out, _) = xtask(&[
        "info",
        "--model",
        "synthetic:llama-2-70b",
        "--memory",
        "--dtype",
        "bf16",
    ]);
    assert!(ok);
    assert!(
        out.contains("memory plan") && out.contains("68.98 B parameters"),
        "{out}"
    );
}

#[test]
fn a_model_that_cannot_fit_is_refused_before_any_weight_is_read() {
    // 70 B parameters need 128 GiB in bf16: no storage type fits, the message says what would.
    let (ok, _, err) = xtask(&[
        "eval",
        "--model",
        "synthetic:llama-2-70b",
        "--dtype",
        "bf16",
        "--tasks",
        "wikitext2",
        "--limit",
        "1",
    ]);
    assert!(!ok);
    assert!(
        err.contains("--offload") && err.contains("info --model synthetic:llama-2-70b --memory"),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");
    // 1.24 B parameters in f32 (4.9 GB) on a 3 GiB machine: bf16 fits, and is named.
    let (ok, _, err) = xtask_env(
        &[
            "eval",
            "--model",
            "synthetic:llama-3.2-1b",
            "--tasks",
            "wikitext2",
            "--limit",
            "1",
        ],
        &[("LOPPER_MEMORY_LIMIT", "3G")],
    );
    assert!(!ok);
    assert!(
        err.contains("--dtype bf16") && err.contains("LOPPER_MEMORY_LIMIT"),
        "{err}"
    );
}

#[test]
fn bad_synthetic_ids_and_dtypes_are_clear_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let gpt2_id = synthetic_config(
        tmp.path(),
        r#"{"model_type":"gpt2","vocab_size":100,"hidden_size":8,"intermediate_size":16,
        "num_hidden_layers":1,"num_attention_heads":2,"rms_norm_eps":1e-5}"#,
    );
    for (model, dtype, want) in [
        ("synthetic:", "f32", "synthetic:NAME"),
        ("synthetic:gpt-2", "f32", "llama-3.1-8b"),
        (gpt2_id.as_str(), "f32", "llama, mistral, qwen2"),
        ("synthetic:llama-3.2-1b", "f8", "use f32, bf16 or f16"),
    ] {
        let (ok, _, err) = xtask(&[
            "eval",
            "--model",
            model,
            "--dtype",
            dtype,
            "--tasks",
            "wikitext2",
            "--limit",
            "1",
        ]);
        assert!(!ok, "{model}");
        assert!(err.contains(want), "{model}: {err}");
        assert!(!err.contains("panicked"), "{err}");
    }
}

/// Runs eval and returns its JSON (results, dtype, peak resident memory).
fn eval_json(model: &str, dtype: &str, limit: &str, batch: &str) -> serde_json::Value {
    eval_json_with(model, dtype, limit, batch, &[])
}

/// [`eval_json`] with `extra` flags.
fn eval_json_with(
    model: &str,
    dtype: &str,
    limit: &str,
    batch: &str,
    extra: &[&str],
) -> serde_json::Value {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("eval.json");
    let mut args = vec![
        "eval",
        "--model",
        model,
        "--dtype",
        dtype,
        "--tasks",
        "wikitext2",
        "--limit",
        limit,
        "--batch-size",
        batch,
        "--out",
        out.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    let (ok, _, err) = xtask(&args);
    assert!(ok, "{model} {dtype}: {err}");
    json(&std::fs::read_to_string(&out).unwrap())
}

#[test]
fn narrow_weights_keep_the_default_models_perplexity() {
    let ppl = |v: &serde_json::Value| v["results"]["wikitext2"]["ppl"].as_f64().unwrap();
    let f32 = eval_json("default", "f32", "8", "8");
    for (dtype, tol) in [("f16", 0.01), ("bf16", 0.02)] {
        let v = eval_json("default", dtype, "8", "8");
        assert_eq!(v["dtype"], dtype);
        let r = ppl(&v) / ppl(&f32);
        assert!(
            (r - 1.0).abs() < tol,
            "{dtype}: {} vs f32 {}",
            ppl(&v),
            ppl(&f32)
        );
        assert!(r != 1.0, "{dtype}: the rounding must show");
    }
}

#[test]
fn the_default_model_exported_in_f16_keeps_its_perplexity() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("f16");
    let (ok, _, err) = xtask(&[
        "export",
        "--model",
        "default",
        "--dtype",
        "f16",
        "--format",
        "hf",
        "--out",
        dir.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    let config = std::fs::read_to_string(dir.join("config.json")).unwrap();
    assert!(config.contains("\"torch_dtype\": \"float16\""), "{config}");
    // Half the weight bytes of f32 (the norm scales stay f32).
    let bytes = std::fs::metadata(dir.join("model.safetensors"))
        .unwrap()
        .len();
    assert!(
        (bytes as f64 / (134_515_008.0 * 2.0) - 1.0).abs() < 0.01,
        "{bytes}"
    );
    let ppl = |v: &serde_json::Value| v["results"]["wikitext2"]["ppl"].as_f64().unwrap();
    let f32 = ppl(&eval_json("default", "f32", "8", "8"));
    let f16 = ppl(&eval_json(dir.to_str().unwrap(), "f16", "8", "8"));
    assert!(
        (f16 / f32 - 1.0).abs() < 0.01,
        "f16 directory {f16} vs f32 {f32}"
    );
}

#[test]
fn the_memory_plan_matches_the_measured_peak() {
    for (model, dtype, limit, batch) in [
        ("default", "f32", "8", "8"),
        ("synthetic:llama-3.2-1b", "bf16", "1", "1"),
    ] {
        let plan = memory_plan(model, dtype, batch, "128");
        let planned = plan["host_total"].as_f64().unwrap() / (1u64 << 20) as f64;
        let measured = eval_json(model, dtype, limit, batch)["peak_rss_mib"]
            .as_f64()
            .expect("the peak is read on Linux");
        let r = measured / planned;
        assert!(
            (r - 1.0).abs() < 0.15,
            "{model} {dtype}: planned {planned:.0} MiB, measured {measured:.0} MiB"
        );
    }
}

#[test]
fn a_synthetic_config_file_prunes_cuts_and_exports_in_bf16() {
    let tmp = tempfile::tempdir().unwrap();
    // A small Qwen2-style model: q/k/v biases, untied head.
    let model = synthetic_config(
        tmp.path(),
        r#"{"model_type":"qwen2","vocab_size":300,"hidden_size":64,"intermediate_size":96,
        "num_hidden_layers":3,"num_attention_heads":4,"num_key_value_heads":2,
        "rms_norm_eps":1e-6,"rope_theta":1000000.0,"tie_word_embeddings":false,
        "max_position_embeddings":512}"#,
    );
    let out = tmp.path().join("run");
    let (ok, stdout, err) = xtask(&[
        "prune",
        "--model",
        &model,
        "--dtype",
        "bf16",
        "--method",
        "pg",
        "--sparsity",
        "0.3",
        "--steps",
        "2",
        "--calib-samples",
        "4",
        "--seq-len",
        "32",
        "--batch-size",
        "2",
        "--eval",
        "wikitext2",
        "--eval-limit",
        "2",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(ok, "{err}\n{stdout}");
    assert!(out.join("plan.json").is_file());
    let dir = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect::<Vec<_>>();
    assert!(out.join("model").is_dir(), "{dir:?}");
}

#[test]
fn offloaded_layers_give_the_resident_results_in_a_fraction_of_the_memory() {
    // A synthetic 1.24 B model in bf16: 2.5 GB of weights resident; offloaded, the embedding
    // (tied head) and one 60 M-parameter layer at a time.
    let run = |extra: &[&str]| {
        let v = eval_json_with("synthetic:llama-3.2-1b", "bf16", "2", "2", extra);
        (v["results"].clone(), v["peak_rss_mib"].as_f64().unwrap())
    };
    let (resident, resident_mib) = run(&[]);
    let (offloaded, offloaded_mib) = run(&["--offload", "cpu"]);
    assert_eq!(resident["wikitext2"]["ppl"], offloaded["wikitext2"]["ppl"]);
    assert!(
        offloaded_mib < 0.5 * resident_mib,
        "offloaded {offloaded_mib} MiB, resident {resident_mib} MiB"
    );
    // The memory plan says what an offloaded 70 B model keeps: embedding, LM head and its
    // largest layer (855.6 M parameters) in bf16.
    let (ok, out, err) = xtask(&[
        "info",
        "--model",
        "synthetic:llama-2-70b",
        "--memory",
        "--dtype",
        "bf16",
        "--offload",
        "cpu",
        "--json",
    ]);
    assert!(ok, "{err}");
    let m = &json(&out)["memory"];
    let want = (2 * 262_144_000 + 855_638_016) as f64 * 2.0;
    let got = m["weights"].as_f64().unwrap();
    assert!(got >= want && got < want * 1.002, "{got} vs {want}: {m}");
    assert_eq!(m["offload"], true);
}

#[test]
fn a_gpu_list_is_planned_per_device_and_bad_lists_are_clear_errors() {
    let (ok, out, err) = xtask(&[
        "info",
        "--model",
        "synthetic:llama-2-70b",
        "--memory",
        "--dtype",
        "bf16",
        "--batch-size",
        "1",
        "--device",
        "cuda:0,cuda:1",
        "--json",
    ]);
    assert!(ok, "{err}");
    let m = &json(&out)["memory"];
    let devices = m["devices"].as_array().unwrap();
    assert_eq!(devices.len(), 2);
    let w: Vec<f64> = devices
        .iter()
        .map(|d| d["weights"].as_f64().unwrap())
        .collect();
    // Balanced: the two halves of 138 GB differ by less than one layer (1.7 GB).
    assert!((w[0] - w[1]).abs() < 1.72e9, "{w:?}");
    assert!(
        ((w[0] + w[1]) / m["weights"].as_f64().unwrap() - 1.0).abs() < 1e-3,
        "{m}"
    );
    assert_eq!(devices[1]["device"], "cuda:1");
    for (args, want) in [
        (
            &["eval", "--device", "cpu,cuda:0"][..],
            "a list of devices is a list of GPUs",
        ),
        (&["eval", "--device", "cuda:0,cuda:0"], "cuda:0 twice"),
        (&["eval", "--device", "cuda:0,gpu"], "unknown device `gpu`"),
        (
            &["bench", "forward", "--device", "cuda:0,cuda:1"],
            "taken by eval, logits, prune, compare and recover",
        ),
        (&["eval", "--offload", "disk"], "possible values: cpu"),
    ] {
        let (ok, _, err) = xtask(args);
        assert!(!ok, "{args:?}");
        assert!(err.contains(want), "{args:?}: {err}");
        assert!(!err.contains("panicked"), "{err}");
    }
    if !cfg!(feature = "cuda") {
        let (ok, _, err) = xtask(&["eval", "--device", "cuda:0,cuda:1", "--limit", "1"]);
        assert!(!ok && err.contains("no CUDA support"), "{err}");
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("run");
        let (ok, _, err) = xtask(&[
            "prune",
            "--method",
            "flap",
            "--sparsity",
            "0.3",
            "--device",
            "cuda:0,cuda:1",
            "--out",
            out.to_str().unwrap(),
        ]);
        assert!(!ok && err.contains("no CUDA support"), "{err}");
        assert!(
            !out.exists(),
            "nothing is written before the devices are checked"
        );
    }
}

/// `synthetic:` a 4-layer LLaMA config written in `dir` (GQA, untied head).
fn small_llama(dir: &std::path::Path) -> String {
    synthetic_config(
        dir,
        r#"{"model_type":"llama","vocab_size":400,"hidden_size":128,"intermediate_size":256,
        "num_hidden_layers":4,"num_attention_heads":4,"num_key_value_heads":2,
        "rms_norm_eps":1e-5,"rope_theta":10000.0,"tie_word_embeddings":false,
        "max_position_embeddings":256}"#,
    )
}

#[test]
fn prune_with_offloaded_layers_writes_the_resident_runs_model() {
    let tmp = tempfile::tempdir().unwrap();
    let model = small_llama(tmp.path());
    let prune = |name: &str, extra: &[&str]| {
        let out = tmp.path().join(name);
        let mut args = vec![
            "prune",
            "--model",
            &model,
            "--method",
            "pg",
            "--sparsity",
            "0.3",
            "--steps",
            "3",
            "--calib-samples",
            "12",
            "--held-out",
            "4",
            "--seq-len",
            "32",
            "--batch-size",
            "4",
            "--out",
            out.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        let (ok, _, err) = xtask(&args);
        assert!(ok, "{name}: {err}");
        out
    };
    // lopper's preset (starts from FLAP, LLM-BIP and block influence, compensation inside the
    // search, held-out choice) and the least-squares cut.
    let resident = prune("resident", &[]);
    let offloaded = prune("offloaded", &["--offload", "cpu"]);
    let plan = |d: &std::path::Path| {
        json(&std::fs::read_to_string(d.join("plan.json")).unwrap())["layers"].clone()
    };
    assert_eq!(plan(&resident), plan(&offloaded));
    let weights = |d: &std::path::Path| std::fs::read(d.join("model/model.safetensors")).unwrap();
    assert!(
        weights(&resident) == weights(&offloaded),
        "the offloaded run's model differs from the resident run's"
    );
    // A method that reads every weight at once is refused before anything is written.
    let out = tmp.path().join("refused");
    let (ok, _, err) = xtask(&[
        "prune",
        "--model",
        &model,
        "--method",
        "llm-pruner",
        "--sparsity",
        "0.3",
        "--offload",
        "cpu",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(
        !ok && err.contains("needs every decoder weight at once"),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");
    assert!(!out.exists());
}

#[test]
fn export_of_a_plan_with_offloaded_layers_writes_the_resident_exports_files() {
    let tmp = tempfile::tempdir().unwrap();
    let model = small_llama(tmp.path());
    let calib = [
        "--calib-samples",
        "8",
        "--seq-len",
        "32",
        "--batch-size",
        "4",
    ];
    let run = |args: &[&str]| {
        let mut all = args.to_vec();
        all.extend_from_slice(&calib);
        let (ok, _, err) = xtask(&all);
        assert!(ok, "{args:?}: {err}");
    };
    let plan_dir = tmp.path().join("plan");
    run(&[
        "prune",
        "--model",
        &model,
        "--method",
        "flap",
        "--sparsity",
        "0.3",
        "--out",
        plan_dir.to_str().unwrap(),
    ]);
    let plan = plan_dir.join("plan.json");
    for (how, format, file) in [
        ("ls", "hf", "model.safetensors"),
        ("bias", "gguf", "model.gguf"),
    ] {
        let export = |name: &str, extra: &[&str]| {
            let out = tmp.path().join(format!("{how}-{name}"));
            let mut args = vec![
                "export",
                "--model",
                &model,
                "--plan",
                plan.to_str().unwrap(),
                "--reconstruct",
                how,
                "--format",
                format,
                "--out",
                out.to_str().unwrap(),
            ];
            args.extend_from_slice(extra);
            run(&args);
            std::fs::read(out.join(file)).unwrap()
        };
        let resident = export("resident", &[]);
        let offloaded = export("offloaded", &["--offload", "cpu"]);
        assert!(
            resident == offloaded,
            "{how} {format}: the offloaded export's {file} differs from the resident one's"
        );
    }
    // The whole model cannot be exported with its layers offloaded: refused, nothing written.
    let out = tmp.path().join("whole");
    let (ok, _, err) = xtask(&[
        "export",
        "--model",
        &model,
        "--offload",
        "cpu",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(
        !ok && err.contains("give --plan or drop --offload"),
        "{err}"
    );
    assert!(!out.exists());
}

#[test]
fn the_least_squares_statistics_planned_bound_the_measured_rise() {
    // A wide MLP and little else, so that the least-squares cut's f64 Gram matrices of
    // down_proj's 4,096 inputs (128 MiB each) dominate what the cut adds to the process.
    let tmp = tempfile::tempdir().unwrap();
    let model = synthetic_config(
        tmp.path(),
        r#"{"model_type":"llama","vocab_size":512,"hidden_size":256,"intermediate_size":4096,
        "num_hidden_layers":2,"num_attention_heads":4,"num_key_value_heads":2,
        "rms_norm_eps":1e-5,"rope_theta":10000.0,"tie_word_embeddings":true,
        "max_position_embeddings":2048}"#,
    );
    // A light cut keeps almost every channel: the widest solve is nearly the dense width the
    // plan assumes (it is made before any plan exists).
    let sparsity = "0.02";
    let (ok, out, err) = xtask(&[
        "info",
        "--model",
        &model,
        "--memory",
        "--sparsity",
        sparsity,
        "--json",
    ]);
    assert!(ok, "{err}");
    let planned = json(&out)["memory"]["ls_statistics"].as_f64().unwrap() / (1u64 << 20) as f64;
    let peak = |cut: &str| -> f64 {
        let dir = tmp.path().join(cut);
        let (ok, _, err) = xtask(&[
            "prune",
            "--model",
            &model,
            "--method",
            "flap",
            "--sparsity",
            sparsity,
            "--reconstruct",
            cut,
            "--calib-samples",
            "16",
            "--out",
            dir.to_str().unwrap(),
        ]);
        assert!(ok, "{err}");
        let report = std::fs::read_to_string(dir.join("report.md")).unwrap();
        let (_, rest) = report
            .split_once("peak resident memory ")
            .unwrap_or_else(|| panic!("no peak in the report: {report}"));
        rest.split_whitespace().next().unwrap().parse().unwrap()
    };
    // The same prune cut by bias compensation holds no statistics: the difference is the cut's.
    let rise = peak("ls") - peak("bias");
    // An upper bound (the check before any work must not pass a cut that cannot fit), and not
    // a loose one (nor refuse a cut that fits by far): 385 MiB against 552 when written.
    assert!(
        rise <= planned * 1.05 && rise >= planned * 0.5,
        "planned {planned:.0} MiB of least-squares statistics, measured a rise of {rise:.0} MiB"
    );
}

#[test]
fn the_memory_plan_adds_the_cut_model_at_a_sparsity() {
    let plan = |extra: &[&str]| {
        let mut args = vec![
            "info",
            "--model",
            "synthetic:llama-2-70b",
            "--memory",
            "--dtype",
            "bf16",
            "--offload",
            "cpu",
            "--batch-size",
            "1",
            "--json",
        ];
        args.extend_from_slice(extra);
        let (ok, out, err) = xtask(&args);
        assert!(ok, "{err}");
        json(&out)
    };
    let bare = plan(&[]);
    let cut = plan(&["--sparsity", "0.5"]);
    let linear = bare["params"]["decoder_linear"].as_u64().unwrap();
    // Half the decoder's linear weights in bf16, on top of the offloaded plan's host total.
    let pruned = cut["memory"]["pruned"].as_u64().unwrap();
    assert_eq!(pruned, linear / 2 * 2);
    assert!(bare["memory"]["pruned"].is_null());
    // And the default least-squares cut's statistics: at least four f64 Gram matrices of
    // down_proj's 28,672 inputs (26 GB).
    let ls = cut["memory"]["ls_statistics"].as_u64().unwrap();
    assert!((4 * 28_672 * 28_672 * 8..40 << 30).contains(&ls), "{ls}");
    assert!(bare["memory"]["ls_statistics"].is_null());
    let total = |v: &serde_json::Value| v["memory"]["host_total"].as_u64().unwrap();
    assert_eq!(total(&cut), total(&bare) + pruned + ls);
    let (ok, _, err) = xtask(&[
        "info",
        "--model",
        "synthetic:llama-2-70b",
        "--memory",
        "--sparsity",
        "1",
    ]);
    assert!(!ok && err.contains("impossible"), "{err}");
}
