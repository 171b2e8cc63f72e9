//! `cargo xtask eval`: perplexity with the protocol written next to the numbers.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use burn::tensor::backend::Backend;
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use lopper_data::{BosPolicy, DataDirs, PerplexityCorpus, windows};
use lopper_model::{ModelSpec, load, lopper_home};

use crate::backend::{DeviceChoice, Job, run_on};

/// Multiple-choice tasks of the evaluation issue, not built yet.
const MC_TASKS: &[&str] = &[
    "boolq",
    "piqa",
    "hellaswag",
    "winogrande",
    "arc_easy",
    "arc_challenge",
    "openbookqa",
    "lambada",
    "c4",
];

#[derive(Debug, Args)]
pub struct EvalArgs {
    /// `default`, a .gguf file, a model directory, or hub:ORG/NAME[@REV].
    #[arg(long, default_value = "default")]
    model: String,
    /// Comma-separated tasks: wikitext2, ptb, ptb_valid.
    #[arg(long, default_value = "wikitext2,ptb")]
    tasks: String,
    /// Window length in tokens (128: LLM-Pruner/FLAP/PG; 2048: SparseGPT/Wanda).
    #[arg(long, default_value_t = 128)]
    seq_len: usize,
    /// BOS policy: none (plain slices of the token stream) or window (BOS starts every window).
    #[arg(long, default_value = "none")]
    bos: String,
    /// Evaluate only the first N windows of each task.
    #[arg(long)]
    limit: Option<usize>,
    /// Windows per forward pass.
    #[arg(long, default_value_t = 8)]
    batch_size: usize,
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    device: DeviceChoice,
    /// Write the results as JSON here (atomically).
    #[arg(long)]
    out: Option<PathBuf>,
}

pub fn run(args: EvalArgs) -> Result<()> {
    let mut tasks = Vec::new();
    for t in args
        .tasks
        .split(',')
        .map(str::trim)
        .filter(|t| !t.is_empty())
    {
        if MC_TASKS.contains(&t) {
            bail!(
                "task `{t}` is not implemented yet (this build evaluates perplexity on wikitext2, ptb and ptb_valid)"
            );
        }
        tasks.push(PerplexityCorpus::from_task(t)?);
    }
    anyhow::ensure!(!tasks.is_empty(), "--tasks is empty");
    let bos: BosPolicy = args.bos.parse()?;
    anyhow::ensure!(
        args.limit != Some(0),
        "--limit 0 evaluates nothing; give a positive limit or leave it out"
    );
    anyhow::ensure!(args.batch_size > 0, "--batch-size must be at least 1");
    let device = args.device;
    run_on(device, EvalJob { args, tasks, bos })
}

struct EvalJob {
    args: EvalArgs,
    tasks: Vec<PerplexityCorpus>,
    bos: BosPolicy,
}

impl Job for EvalJob {
    fn run<B: Backend>(self, device: B::Device, device_name: String) -> Result<()> {
        let a = &self.args;
        let spec: ModelSpec = a.model.parse()?;
        let loaded = load::<B>(&spec, &device).with_context(|| format!("loading `{}`", a.model))?;
        let dirs = DataDirs::from_env(&lopper_home());
        let mut results = serde_json::Map::new();
        let mut rows = Vec::new();
        for task in &self.tasks {
            let start = Instant::now();
            let (path, text, n_rows) = task.load(&dirs)?;
            let ids = loaded.tokenizer.encode(&text)?;
            let win = windows(&ids, a.seq_len, self.bos, loaded.tokenizer.bos_id, a.limit)
                .with_context(|| format!("task {}", task.name()))?;
            let bar = ProgressBar::new(win.len() as u64).with_style(ProgressStyle::with_template(
                "{msg} [{bar:30}] {pos}/{len} windows, eta {eta}",
            )?);
            bar.set_message(task.name());
            let p = lopper_eval::perplexity(&loaded.model, &win, a.batch_size, None, |d| {
                bar.set_position(d as u64)
            })?;
            bar.finish_and_clear();
            let secs = start.elapsed().as_secs_f64();
            results.insert(
                task.name().into(),
                serde_json::json!({
                    "ppl": p.ppl, "seq_len": a.seq_len, "windows": p.windows, "tokens": p.tokens,
                    "nll_sum": p.nll_sum, "file": path, "rows": n_rows, "stream_tokens": ids.len(),
                    "seconds": secs,
                }),
            );
            rows.push((task.name(), p, secs));
        }
        let out = serde_json::json!({
            "model": loaded.info,
            "protocol": {
                "perplexity": "rows joined as the HF rows are joined in the pruning literature (wikitext2: lines with their trailing newline, blank lines empty, joined by \"\\n\\n\"; ptb: space-normalised lines joined by \" \"), tokenised once, non-overlapping windows of seq_len, remainder dropped, mean NLL over all predicted tokens, exp",
                "seq_len": a.seq_len,
                "bos": self.bos,
                "limit": a.limit,
                "batch_size": a.batch_size,
                "device": device_name,
                "command": std::env::args().collect::<Vec<_>>().join(" "),
            },
            "results": results,
        });
        if let Some(path) = &a.out {
            lopper_core::write_atomic(path, serde_json::to_string_pretty(&out)?.as_bytes())?;
        }
        println!("| task | ppl | seq_len | windows | tokens | seconds |");
        println!("|---|---:|---:|---:|---:|---:|");
        for (name, p, secs) in rows {
            println!(
                "| {name} | {:.3} | {} | {} | {} | {secs:.1} |",
                p.ppl, a.seq_len, p.windows, p.tokens
            );
        }
        Ok(())
    }
}
