//! Load a model, plan it with a metric, run a short policy-gradient search started from that
//! plan (lopper's preset: compensated masks, held-out final choice), cut the model to the chosen
//! plan with the same compensation, and export it in the Hugging Face layout.
//!
//! ```text
//! cargo run --release -p lopper --example prune_pg [-- MODEL OUT_DIR]
//! ```
//!
//! MODEL is `default` (SmolLM2-135M-Instruct, installed by `cargo xtask setup`), a `.gguf` file,
//! a model folder or `hub:ORG/NAME`. The calibration text is the C4 sample in `datasets/`.
#![allow(clippy::print_stdout)]

use std::path::PathBuf;

use anyhow::Result;
use lopper::backend::{Flex, FlexDevice};
use lopper::data::{DataDirs, Sampler, load_documents, sample};
use lopper::importance::{Method, MethodSettings, input_means, method_plan};
use lopper::model::{ModelSpec, load, lopper_home};
use lopper::policy::{Hooks, Init, PgConfig, PgState, RefitWindows, choose, search};
use lopper::surgery::{ExportFormat, ExportOptions, InputMeans, export, prune_compensated};

fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let spec: ModelSpec = args.next().unwrap_or_else(|| "default".into()).parse()?;
    let out = args
        .next()
        .map(PathBuf::from)
        .unwrap_or_else(|| std::env::temp_dir().join("lopper-example-prune-pg"));

    // The model and its tokenizer, on burn's portable CPU backend.
    let device = FlexDevice;
    let loaded = load::<Flex>(&spec, &device)?;
    let (model, tok) = (&loaded.model, &loaded.tokenizer);

    // 32 calibration windows of 128 tokens from the C4 sample, seeded.
    let dirs = DataDirs::from_env(&lopper_home());
    let (path, docs) = load_documents("c4", &dirs)?;
    let encode = |t: &str| tok.encode(t).map_err(|e| e.to_string());
    let calib = sample(
        "c4",
        &path,
        &docs,
        &encode,
        Sampler::ConcatChunks,
        32,
        128,
        42,
    )?;

    // The last 8 windows are held out for the final choice; the rest feed the metric and search.
    let (windows, held_out) = calib.windows.split_at(24);

    // LLM-BIP's plan at 30% sparsity (one forward pass over 8 windows) and its unit scores.
    let bip: Method = "llm-bip".parse()?;
    let metric = method_plan(
        model,
        &windows[..8],
        bip,
        0.7,
        &MethodSettings::default(),
        |_| {},
    )?;
    let start = Init::Plan {
        plan: metric.plan,
        scores: metric.scores,
    };

    // The dense model's calibration means: every sampled mask is scored with bias compensation.
    let (o_proj, down_proj) = input_means(model, &windows[..8], 4)?;
    let means = InputMeans { o_proj, down_proj };

    // A short search with lopper's defaults (the reference runs thousands of steps).
    let mut cfg = PgConfig::new(0.3);
    cfg.steps = 5;
    cfg.held_out = held_out.len();
    // The searched units (with the preset's channel blocks, ordered by the start).
    let space = cfg.space(model.shape(), &start)?;
    let mut state = PgState::new(cfg, &space, &start)?;
    search(
        model,
        windows,
        Some(&means),
        &space,
        &mut state,
        Hooks {
            on_step: &mut |r, _| {
                println!("step {}: sampled losses {:?}", r.step, r.losses);
                Ok(())
            },
            should_stop: &|| false,
            checkpoint: &mut |_| Ok(()),
            checkpoint_every: 0,
        },
    )?;

    // The search's plan or the starting plan, whichever is better on the held-out windows
    // (masked, the preset's judge; a least-squares judge would refit on `refit`).
    let refit = RefitWindows {
        fit: windows,
        held_out,
        batch_size: 4,
        inputs: Default::default(),
    };
    let (plan, choice) = choose(model, refit, held_out, Some(&means), &space, &state)?;
    if let Some(c) = &choice {
        println!("held-out losses {:?}: chose {}", c.candidates, c.chosen);
    }

    // Cut the model to the plan with the compensation the search scored, and write it out
    // (safetensors + config + tokenizer).
    let pruned = prune_compensated(model, &plan, &means)?;
    export(
        &pruned,
        tok,
        Some(&plan),
        &ExportOptions {
            format: ExportFormat::Hf,
            force: true,
            provenance: serde_json::json!({"example": "prune_pg", "model": spec.to_string()}),
        },
        &out,
    )?;
    println!(
        "kept {:.4} of the decoder linear parameters ({} -> {} parameters); written to {}",
        plan.kept_param_ratio(),
        model.shape().num_params(),
        pruned.shape().num_params(),
        out.display()
    );
    Ok(())
}
