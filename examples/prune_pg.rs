//! Load a model, score its units with a metric, run a short policy-gradient search started from
//! those scores, cut the model to the plan, and export it in the Hugging Face layout.
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
use lopper::importance::{Method, MethodSettings, method_plan};
use lopper::model::{ModelSpec, load, lopper_home};
use lopper::policy::{Hooks, Init, Optimizer, PgConfig, PgState, UnitSpace, search};
use lopper::surgery::{ExportFormat, ExportOptions, export, prune};

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

    // Score every KV group and MLP channel with LLM-BIP (one forward pass over 8 windows).
    let bip: Method = "llm-bip".parse()?;
    let metric = method_plan(
        model,
        &calib.windows[..8],
        bip,
        0.7,
        &MethodSettings::default(),
        |_| {},
    )?;
    let scores = metric.scores.expect("llm-bip scores every unit");

    // A short search at 30% sparsity from those scores (the reference runs thousands of steps).
    let mut cfg = PgConfig::new(0.3);
    cfg.optimizer = Optimizer::Adam;
    (cfg.lr_heads, cfg.lr_channels) = (0.01, 0.01);
    cfg.steps = 5;
    let space = UnitSpace::new(model.shape(), &cfg.units)?;
    let mut state = PgState::new(cfg, &space, &Init::Scores { scores })?;
    search(
        model,
        &calib.windows,
        &space,
        &mut state,
        Hooks {
            on_step: &mut |r, _| {
                println!(
                    "step {}: loss {:.4} baseline {:.4}",
                    r.step, r.loss, r.baseline
                );
                Ok(())
            },
            should_stop: &|| false,
            checkpoint: &mut |_| Ok(()),
            checkpoint_every: 0,
        },
    )?;

    // Cut the model to the final plan and write it out (safetensors + config + tokenizer).
    let plan = state.final_plan(&space)?;
    let pruned = prune(model, &plan)?;
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
