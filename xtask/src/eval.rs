//! `cargo xtask eval`: perplexity with the protocol written next to the numbers.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};
use burn::tensor::backend::Backend;
use clap::Args;
use indicatif::ProgressBar;
use lopper_data::{BosPolicy, DataDirs, McTask, PerplexityCorpus, windows};
use lopper_model::{Llama, Tokenizer, lopper_home};

use crate::backend::{DeviceList, Offload, PlacedJob, run_on_devices};

#[derive(Debug, Clone, Copy)]
pub enum Task {
    Ppl(PerplexityCorpus),
    Mc(McTask),
    Lambada,
}

#[derive(Debug, Args)]
pub struct EvalArgs {
    /// `default`, a .gguf file, a model directory, or hub:ORG/NAME[@REV].
    #[arg(long, default_value = "default")]
    model: String,
    /// Storage type of the weight matrices: f32, bf16 or f16 (activations and reductions stay f32).
    #[arg(long, default_value = "f32")]
    pub dtype: lopper_core::Dtype,
    /// Comma-separated tasks: wikitext2, ptb, ptb_valid, c4 (perplexity); boolq, piqa,
    /// hellaswag, arc_easy, arc_challenge, openbookqa, winogrande, lambada (zero-shot).
    #[arg(long, default_value = "wikitext2,ptb")]
    tasks: String,
    /// Window length in tokens (128: LLM-Pruner/FLAP/PG; 2048: SparseGPT/Wanda).
    #[arg(long, default_value_t = 128)]
    seq_len: usize,
    /// BOS policy: none (plain slices of the token stream) or window (BOS starts every window).
    #[arg(long, default_value = "none")]
    bos: String,
    /// Only the first N windows of a perplexity task, the first N examples of a multiple-choice task.
    #[arg(long)]
    limit: Option<usize>,
    /// Windows per forward pass.
    #[arg(long, default_value_t = 8)]
    batch_size: usize,
    /// Allow --seq-len beyond the model's trained positions (max_position_embeddings).
    #[arg(long)]
    allow_longer_context: bool,
    /// cpu, cuda, cuda:N, or a list of GPUs (cuda:0,cuda:1) over which the decoder layers are
    /// split in balanced contiguous runs.
    #[arg(long, default_value = "cpu")]
    device: DeviceList,
    /// `cpu`: keep the decoder layers out of device memory (in the checkpoint's memory map, or
    /// the generator of a synthetic model) and read each onto its device for its turn: the
    /// device holds the embedding, the LM head and one layer.
    #[arg(long, value_name = "WHERE")]
    offload: Option<Offload>,
    /// Write the results as JSON here (atomically).
    #[arg(long)]
    out: Option<PathBuf>,
}

/// Parses `--tasks`.
pub fn parse_tasks(list: &str) -> Result<Vec<Task>> {
    let mut tasks = Vec::new();
    for t in list.split(',').map(str::trim).filter(|t| !t.is_empty()) {
        match McTask::from_task(t) {
            _ if t == "lambada" => tasks.push(Task::Lambada),
            Some(m) => tasks.push(Task::Mc(m)),
            None => tasks.push(Task::Ppl(PerplexityCorpus::from_task(t).map_err(|_| {
                anyhow::anyhow!("unknown task `{t}`; tasks are wikitext2, ptb, ptb_valid, c4, boolq, piqa, hellaswag, arc_easy, arc_challenge, openbookqa, winogrande, lambada")
            })?)),
        }
    }
    anyhow::ensure!(!tasks.is_empty(), "--tasks is empty");
    Ok(tasks)
}

/// How tasks are evaluated.
#[derive(Debug, Clone)]
pub struct EvalSettings {
    pub seq_len: usize,
    pub bos: BosPolicy,
    pub limit: Option<usize>,
    pub batch_size: usize,
    pub allow_longer_context: bool,
}

impl EvalSettings {
    /// What `prune --eval` runs: 128-token windows, 8 per forward.
    pub fn for_report(limit: Option<usize>, allow_longer_context: bool) -> Self {
        Self {
            seq_len: 128,
            bos: BosPolicy::None,
            limit,
            batch_size: 8,
            allow_longer_context,
        }
    }

    /// [`crate::guard`]'s checks for the perplexity tasks among `tasks`, before any work.
    pub fn guard(&self, shape: &lopper_core::ModelShape, tasks: &[Task]) -> Result<()> {
        if tasks.iter().any(|t| matches!(t, Task::Ppl(_))) {
            crate::guard::context(shape, self.seq_len, "--seq-len", self.allow_longer_context)?;
            // A --limit smaller than the batch runs fewer rows at once.
            let rows = self
                .limit
                .map_or(self.batch_size, |l| l.min(self.batch_size));
            crate::guard::forward_fits(shape, rows, self.seq_len, "perplexity")?;
        }
        Ok(())
    }

    fn check(&self) -> Result<()> {
        anyhow::ensure!(
            self.limit != Some(0),
            "--limit 0 evaluates nothing; give a positive limit or leave it out"
        );
        anyhow::ensure!(self.batch_size > 0, "--batch-size must be at least 1");
        Ok(())
    }

    /// The protocol record written next to the numbers.
    pub fn protocol(&self, device_name: &str) -> serde_json::Value {
        serde_json::json!({
            "multiple_choice": "lm-evaluation-harness 0.4 semantics: its prompt templates, target delimiter \" \", choices and answer mapping; zero-shot; log-likelihood of each continuation given its context (lm-eval's _encode_pair split, no BOS); acc = argmax of summed log-prob, acc_norm = argmax of log-prob / choice length in characters; winogrande scores the shared suffix after each substituted option",
            "perplexity": "rows joined as the HF rows are joined in the pruning literature (wikitext2: lines with their trailing newline, blank lines empty, joined by \"\\n\\n\"; ptb: space-normalised lines joined by \" \"), tokenised once, non-overlapping windows of seq_len, remainder dropped, mean NLL over all predicted tokens, exp",
            "seq_len": self.seq_len,
            "bos": self.bos,
            "limit": self.limit,
            "batch_size": self.batch_size,
            "device": device_name,
            "command": std::env::args().collect::<Vec<_>>().join(" "),
        })
    }
}

pub fn run(args: EvalArgs) -> Result<()> {
    let tasks = parse_tasks(&args.tasks)?;
    let settings = EvalSettings {
        seq_len: args.seq_len,
        bos: args.bos.parse()?,
        limit: args.limit,
        batch_size: args.batch_size,
        allow_longer_context: args.allow_longer_context,
    };
    settings.check()?;
    let device = args.device.clone();
    run_on_devices(
        &device,
        EvalJob {
            args,
            tasks,
            settings,
        },
    )
}

struct EvalJob {
    args: EvalArgs,
    tasks: Vec<Task>,
    settings: EvalSettings,
}

impl PlacedJob for EvalJob {
    fn run<B: Backend>(self, devices: Vec<B::Device>, device_name: String) -> Result<()> {
        let a = &self.args;
        let loaded = crate::loading::load_placed_model::<B>(
            &a.model,
            a.dtype,
            &devices,
            a.offload.is_some(),
        )?;
        let (results, table) = evaluate(
            &loaded.model,
            &loaded.tokenizer,
            &self.tasks,
            &self.settings,
        )?;
        let out = serde_json::json!({
            "model": loaded.info,
            "dtype": a.dtype,
            "protocol": self.settings.protocol(&device_name),
            "results": results,
            "peak_rss_mib": crate::progress::peak_rss_mib(),
        });
        if let Some(path) = &a.out {
            lopper_core::write_atomic(path, serde_json::to_string_pretty(&out)?.as_bytes())?;
        }
        print_table(&table);
        Ok(())
    }
}

/// Evaluates a pruned model at 128 tokens for `prune --eval`: writes `eval.json` (with `model`
/// and the protocol), prints the table and appends it to `report` under `heading`.
#[allow(clippy::too_many_arguments)]
pub fn eval_into_report<B: Backend>(
    model: &Llama<B>,
    tokenizer: &Tokenizer,
    tasks: &[Task],
    settings: &EvalSettings,
    out: &std::path::Path,
    model_info: serde_json::Value,
    device_name: &str,
    report: &mut String,
) -> Result<()> {
    let (results, table) = evaluate(model, tokenizer, tasks, settings)?;
    crate::prune::write_json(
        out,
        &serde_json::json!({
            "model": model_info,
            "protocol": settings.protocol(device_name),
            "results": results,
        }),
    )?;
    *report +=
        "\n## Evaluation of the pruned model\n\n| task | result | seconds |\n|---|---|---:|\n";
    for row in &table {
        *report += row;
        *report += "\n";
    }
    print_table(&table);
    Ok(())
}

/// Prints the markdown table of [`evaluate`].
pub fn print_table(table: &[String]) {
    println!("| task | result | seconds |");
    println!("|---|---|---:|");
    for row in table {
        println!("{row}");
    }
}

/// Evaluates `model` on `tasks`: the results by task, and one markdown row per task.
pub fn evaluate<B: Backend>(
    model: &Llama<B>,
    tokenizer: &Tokenizer,
    tasks: &[Task],
    a: &EvalSettings,
) -> Result<(serde_json::Map<String, serde_json::Value>, Vec<String>)> {
    {
        a.guard(model.shape(), tasks)?;
        let dirs = DataDirs::from_env(&lopper_home());
        let mut results = serde_json::Map::new();
        let mut table = Vec::new();
        // Log-likelihoods of (context, continuation) requests, with a progress bar.
        let score = |reqs: &[(String, String)], name: &str| -> Result<Vec<(f64, bool)>> {
            let bar = bar(reqs.len(), name, "requests")?;
            let lls = lopper_eval::loglikelihoods(model, tokenizer, reqs, a.batch_size, |d| {
                bar.set_position(d as u64)
            })?;
            bar.finish_and_clear();
            Ok(lls)
        };
        for &task in tasks {
            let start = Instant::now();
            match task {
                Task::Ppl(corpus) => {
                    let (path, text, n_rows) = corpus.load(&dirs)?;
                    let ids = tokenizer.encode(&text)?;
                    let win = windows(&ids, a.seq_len, a.bos, tokenizer.bos_id, a.limit)
                        .with_context(|| format!("task {}", corpus.name()))?;
                    let bar = bar(win.len(), corpus.name(), "windows")?;
                    let p = lopper_eval::perplexity(model, &win, a.batch_size, None, |d| {
                        bar.set_position(d as u64)
                    })?;
                    bar.finish_and_clear();
                    let secs = start.elapsed().as_secs_f64();
                    results.insert(
                        corpus.name().into(),
                        serde_json::json!({
                            "ppl": p.ppl, "seq_len": a.seq_len, "windows": p.windows, "tokens": p.tokens,
                            "nll_sum": p.nll_sum, "file": path, "rows": n_rows, "stream_tokens": ids.len(),
                            "seconds": secs,
                        }),
                    );
                    table.push(format!(
                        "| {} | ppl {:.3} (seq_len {}, {} windows, {} tokens) | {secs:.1} |",
                        corpus.name(),
                        p.ppl,
                        a.seq_len,
                        p.windows,
                        p.tokens
                    ));
                }
                Task::Lambada => {
                    let (path, mut reqs) = lopper_data::load_lambada(&dirs)?;
                    if let Some(l) = a.limit {
                        reqs.truncate(l);
                    }
                    let lls = score(&reqs, "lambada")?;
                    let n = lls.len();
                    let acc = lls.iter().filter(|l| l.1).count() as f64 / n as f64;
                    let acc_stderr = if n > 1 {
                        (acc * (1.0 - acc) / (n - 1) as f64).sqrt()
                    } else {
                        0.0
                    };
                    let ppl = (-lls.iter().map(|l| l.0).sum::<f64>() / n as f64).exp();
                    let secs = start.elapsed().as_secs_f64();
                    results.insert(
                        "lambada".into(),
                        serde_json::json!({"acc": acc, "acc_stderr": acc_stderr, "ppl": ppl, "n": n, "file": path, "seconds": secs}),
                    );
                    table.push(format!(
                        "| lambada | acc {acc:.4} ± {acc_stderr:.4}, ppl {ppl:.3} (n {n}) | {secs:.1} |"
                    ));
                }
                Task::Mc(mc) => {
                    let (path, mut docs) = mc.load(&dirs)?;
                    if let Some(l) = a.limit {
                        docs.truncate(l);
                    }
                    let requests: Vec<(String, String)> = docs
                        .iter()
                        .flat_map(|d| d.requests.iter().cloned())
                        .collect();
                    let lls = score(&requests, mc.name())?;
                    let s = lopper_eval::mc_scores_of_requests(
                        &lls,
                        docs.iter()
                            .map(|d| (d.requests.len(), &d.choices[..], d.gold)),
                    );
                    let secs = start.elapsed().as_secs_f64();
                    let norm = |v: f64| {
                        if mc.has_acc_norm() {
                            serde_json::json!(v)
                        } else {
                            serde_json::Value::Null
                        }
                    };
                    results.insert(
                        mc.name().into(),
                        serde_json::json!({
                            "acc": s.acc, "acc_stderr": s.acc_stderr,
                            "acc_norm": norm(s.acc_norm), "acc_norm_stderr": norm(s.acc_norm_stderr),
                            "n": s.n, "file": path, "seconds": secs,
                        }),
                    );
                    let norm_txt = if mc.has_acc_norm() {
                        format!(", acc_norm {:.4} ± {:.4}", s.acc_norm, s.acc_norm_stderr)
                    } else {
                        String::new()
                    };
                    table.push(format!(
                        "| {} | acc {:.4} ± {:.4}{norm_txt} (n {}) | {secs:.1} |",
                        mc.name(),
                        s.acc,
                        s.acc_stderr,
                        s.n
                    ));
                }
            }
        }
        if let Some(avg) = insert_llm_pruner_average(&mut results) {
            let se = llm_pruner_average_stderr(&results)
                .map_or(String::new(), |se| format!(" ± {se:.4}"));
            table.push(format!(
                "| 7-task average (LLM-Pruner convention: acc for boolq, piqa, winogrande, arc_easy; acc_norm for hellaswag, arc_challenge, openbookqa) | {avg:.4}{se} | |"
            ));
        }
        Ok((results, table))
    }
}

/// The metric the LLM-Pruner / FLAP / PG tables report per task.
const LLM_PRUNER_CONVENTION: &[(&str, &str)] = &[
    ("boolq", "acc"),
    ("piqa", "acc"),
    ("hellaswag", "acc_norm"),
    ("winogrande", "acc"),
    ("arc_easy", "acc"),
    ("arc_challenge", "acc_norm"),
    ("openbookqa", "acc_norm"),
];

/// The mean of the seven tasks' metrics in the LLM-Pruner convention, when all seven were run.
pub fn llm_pruner_average(results: &serde_json::Map<String, serde_json::Value>) -> Option<f64> {
    let vals: Option<Vec<f64>> = LLM_PRUNER_CONVENTION
        .iter()
        .map(|(t, m)| results.get(*t)?.get(*m)?.as_f64())
        .collect();
    vals.map(|v| v.iter().sum::<f64>() / v.len() as f64)
}

/// The standard error of [`llm_pruner_average`]: the seven tasks' examples are independent, so
/// it is the root of the sum of their squared standard errors over seven.
pub fn llm_pruner_average_stderr(
    results: &serde_json::Map<String, serde_json::Value>,
) -> Option<f64> {
    let var: Option<f64> = LLM_PRUNER_CONVENTION
        .iter()
        .map(|(t, m)| {
            let se = results.get(*t)?.get(format!("{m}_stderr"))?.as_f64()?;
            Some(se * se)
        })
        .sum();
    var.map(|v| v.sqrt() / LLM_PRUNER_CONVENTION.len() as f64)
}

/// Adds `llm_pruner_average` (its value, its standard error and the metric of each task) to
/// `results` where all seven tasks are there, and returns the average.
pub fn insert_llm_pruner_average(
    results: &mut serde_json::Map<String, serde_json::Value>,
) -> Option<f64> {
    let avg = llm_pruner_average(results)?;
    let stderr = llm_pruner_average_stderr(results);
    results.insert(
        "llm_pruner_average".into(),
        serde_json::json!({"value": avg, "stderr": stderr, "metrics": LLM_PRUNER_CONVENTION}),
    );
    Some(avg)
}

/// The key of `task`'s result (`wikitext2`, `boolq`, `lambada`).
pub fn task_key(task: Task) -> &'static str {
    match task {
        Task::Ppl(c) => c.name(),
        Task::Mc(m) => m.name(),
        Task::Lambada => "lambada",
    }
}

fn bar(len: usize, name: &str, unit: &str) -> Result<ProgressBar> {
    let b = crate::progress::bar(
        len as u64,
        &format!("{{msg}} [{{bar:30}}] {{pos}}/{{len}} {unit}, eta {{eta}}"),
    )?;
    b.set_message(name.to_string());
    Ok(b)
}
