//! Prune with a one-shot method: SparseGPT zeroes half of every decoder linear's weights,
//! updating the rest to reproduce each layer's output on calibration text; then compare
//! WikiText-2 perplexity before and after.
//!
//! ```text
//! cargo run --release -p lopper --example one_shot [-- MODEL]
//! ```
#![allow(clippy::print_stdout)]

use anyhow::Result;
use lopper::backend::{Flex, FlexDevice};
use lopper::data::{
    BosPolicy, DataDirs, PerplexityCorpus, Sampler, load_documents, sample, windows,
};
use lopper::eval::perplexity;
use lopper::model::{ModelSpec, load, lopper_home};
use lopper::sparse::{Pattern, SparseMethod, SparseSettings, prune_model};

fn main() -> Result<()> {
    let spec: ModelSpec = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "default".into())
        .parse()?;
    let loaded = load::<Flex>(&spec, &FlexDevice)?;
    let (model, tok) = (&loaded.model, &loaded.tokenizer);
    let dirs = DataDirs::from_env(&lopper_home());

    // 16 calibration windows of 128 tokens, drawn as SparseGPT and Wanda draw them.
    let (path, docs) = load_documents("c4", &dirs)?;
    let encode = |t: &str| tok.encode(t).map_err(|e| e.to_string());
    let calib = sample(
        "c4",
        &path,
        &docs,
        &encode,
        Sampler::RandomWindows,
        16,
        128,
        0,
    )?;

    let (sparse, reports) = prune_model(
        model,
        &calib.windows,
        SparseMethod::SparseGpt,
        Pattern::parse("unstructured", 0.5)?,
        &SparseSettings::default(),
        |r| {
            println!(
                "layer {} {}: rel. error {:.4}",
                r.layer, r.name, r.rel_error
            )
        },
    )?;
    let mean_err = reports.iter().map(|r| r.rel_error).sum::<f64>() / reports.len() as f64;

    let (_, text, _) = PerplexityCorpus::Wikitext2.load(&dirs)?;
    let w = windows(&tok.encode(&text)?, 128, BosPolicy::None, None, Some(20))?;
    let dense = perplexity(model, &w, 8, None, |_| {})?;
    let pruned = perplexity(&sparse, &w, 8, None, |_| {})?;
    println!(
        "SparseGPT 50%: mean rel. error {mean_err:.4}; wikitext2 @128 ppl {:.3} -> {:.3}",
        dense.ppl, pruned.ppl
    );
    Ok(())
}
