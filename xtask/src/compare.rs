//! `cargo xtask compare`: every method at every sparsity under one protocol, cached per cell.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use burn::tensor::backend::Backend;
use clap::Args;
use lopper_core::MaskPlan;
use lopper_data::{BosPolicy, Calibration, Sampler};
use lopper_importance::{Method, MethodSettings};
use lopper_model::Llama;
use lopper_policy::{Judge, Optimizer, PgConfig};
use lopper_sparse::InputRefit;
use serde::{Deserialize, Serialize};

use crate::backend::{DeviceList, PlacedJob, run_on_devices};
use crate::eval::{EvalSettings, Task, evaluate, parse_tasks};
use crate::reconstruct::Reconstruct;

#[derive(Debug, Clone, Args)]
pub struct CompareArgs {
    /// `default`, a .gguf file, a model directory, or hub:ORG/NAME[@REV].
    #[arg(long, default_value = "default")]
    model: String,
    /// Storage type of the weight matrices: f32, bf16 or f16 (activations and reductions stay f32).
    #[arg(long, default_value = "f32")]
    pub dtype: lopper_core::Dtype,
    /// Methods: dense, pg, magnitude, magnitude-l1, random, wanda-sp, flap, block-influence, sleb,
    /// llm-pruner, llm-bip, mini-llm, ifso (structured; `pg:INIT` picks the search's initialisation, `NAME+bias` adds bias
    /// compensation), and the one-shot unstructured / N:M methods alps, sparsegpt, wanda,
    /// magnitude:unstructured (`alps:2:4` for N:M: one cell at the pattern's sparsity).
    #[arg(
        long,
        default_value = "dense,magnitude,wanda-sp,flap,block-influence,sleb,pg"
    )]
    methods: String,
    /// Sparsities (fractions of the prunable parameters removed).
    #[arg(long, default_value = "0.2,0.3,0.5")]
    sparsity: String,
    /// Evaluation tasks (as `cargo xtask eval --tasks`); perplexity tasks run at every --seq-lens.
    #[arg(long, default_value = "wikitext2,ptb")]
    tasks: String,
    /// Window lengths of the perplexity tasks.
    #[arg(long, default_value = "128,2048")]
    seq_lens: String,
    /// First N windows of each perplexity task, first N examples of each multiple-choice task.
    #[arg(long)]
    limit: Option<usize>,
    /// Overrides --limit for perplexity tasks: one value, or one per --seq-lens entry
    /// (`--seq-lens 128,2048 --ppl-limit 400,16`).
    #[arg(long)]
    ppl_limit: Option<String>,
    /// Overrides --limit for multiple-choice tasks and lambada.
    #[arg(long)]
    mc_limit: Option<usize>,
    /// Seed of calibration sampling, the random method and the policy-gradient search.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Calibration data shared by every method: c4, wikitext2, ptb or a file.
    #[arg(long, default_value = "c4")]
    calib: String,
    /// Calibration windows (the policy-gradient search cycles through all of them).
    #[arg(long, default_value_t = 256)]
    calib_samples: usize,
    /// concat-chunks (PG reference) or random-windows (Wanda/SparseGPT).
    #[arg(long, default_value = "concat-chunks")]
    sampler: String,
    /// Tokens per calibration window.
    #[arg(long, default_value_t = 128)]
    calib_seq_len: usize,
    /// `+ls` / `+obs` cells: tokens per window of the refit's calibration (the same tokens as
    /// --calib-samples x --calib-seq-len redrawn in longer windows; default 512, capped by the
    /// model's context).
    #[arg(long)]
    recon_seq_len: Option<usize>,
    /// `+ls` / `+obs` cells: which layers' input projections are refit too, `next` (the
    /// default: the layer after each block removed whole), `all` or `off` (as `prune
    /// --refit-inputs`).
    #[arg(long)]
    refit_inputs: Option<InputRefit>,
    /// Calibration windows the metric and one-shot methods read (the first N).
    #[arg(long, default_value_t = 64)]
    metric_samples: usize,
    /// Windows per forward pass (metrics and evaluation).
    #[arg(long, default_value_t = 8)]
    batch_size: usize,
    /// Methods that allocate per layer (wanda-sp, llm-bip, llm-pruner, mini-llm, magnitude,
    /// random) keep the asked fraction of every layer's parameters (`--allocation
    /// per-layer-params`: channels make up for the rounding of a few KV groups), so that every
    /// cell has the size its sparsity says; without it they keep their papers' per-layer
    /// counts (on SmolLM2 0.5417 of the parameters at 0.5).
    #[arg(long)]
    exact_size: bool,
    /// Policy-gradient settings (as `prune --preset`): lopper or reference.
    #[arg(long, default_value = "lopper")]
    pg_preset: String,
    /// Policy-gradient steps (default: the preset's).
    #[arg(long)]
    pg_steps: Option<usize>,
    /// Policy-gradient learning rate (default: the preset's).
    #[arg(long)]
    pg_lr: Option<f64>,
    /// Policy-gradient optimizer: adam or sgd (default: the preset's).
    #[arg(long)]
    pg_optimizer: Option<String>,
    /// Windows per policy-gradient step (default: the preset's).
    #[arg(long)]
    pg_batch_size: Option<usize>,
    /// Search MLP channels in blocks of N (0 or 1: one unit per channel; default: the preset's).
    #[arg(long)]
    pg_channel_block: Option<usize>,
    /// Search per-layer MLP widths in steps of --pg-channel-block (as `prune --widths`;
    /// default: the preset's).
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    pg_widths: Option<bool>,
    /// How the parameter budget projects pg probabilities: shift or cost (as `prune
    /// --projection`; default: the preset's).
    #[arg(long)]
    pg_projection: Option<String>,
    /// Entropy anneal over the last N pg steps (as `prune --anneal`; default: the preset's).
    #[arg(long)]
    pg_anneal: Option<usize>,
    /// How pg cells with a least-squares cut (`pg+ls`, `pg+obs`) judge their held-out choice:
    /// auto (the default: ls from sparsity 0.4, masked below), masked or ls (as `prune
    /// --judge`); other pg cells judge masked.
    #[arg(long, default_value = "auto")]
    pg_judge: String,
    /// Policy-gradient initialisation (as `prune --init`; default: the preset's).
    #[arg(long)]
    pg_init: Option<String>,
    /// `NAME+recover` cells: lora or full (as `recover --method`).
    #[arg(long, default_value = "lora")]
    recover_method: String,
    /// `NAME+recover` cells: ce, kd or ce+kd (the dense model is the teacher).
    #[arg(long, default_value = "ce")]
    recover_loss: String,
    /// `NAME+recover` cells: optimiser steps on every --calib window of --calib-seq-len tokens
    /// (not an evaluation set).
    #[arg(long, default_value_t = 100)]
    recover_steps: usize,
    /// `NAME+recover` cells: windows per step.
    #[arg(long, default_value_t = 8)]
    recover_batch_size: usize,
    /// `NAME+recover` cells: peak learning rate (default: recover's for the method).
    #[arg(long)]
    recover_lr: Option<f64>,
    /// cpu, cuda or cuda:N, or several GPUs (cuda:0,cuda:1): the decoder layers split over
    /// them in balanced contiguous runs.
    #[arg(long, default_value = "cpu")]
    device: DeviceList,
    /// `cpu`: keep the dense model's decoder layers out of device memory and read each onto
    /// its device for its turn (scoring, search, cuts, the dense cell's evaluation); each
    /// cell's pruned model is built whole. Not for the methods that need every weight at once
    /// (magnitude, llm-pruner, ifso, mini-llm) or `+recover`.
    #[arg(long, value_name = "WHERE")]
    offload: Option<crate::backend::Offload>,
    /// Delete DIR first (otherwise finished cells are reused).
    #[arg(long)]
    force: bool,
    /// Compute nothing: write the results from the finished cells of DIR (a run still going, or
    /// one that was stopped), listing the missing ones.
    #[arg(long, conflicts_with = "force")]
    report_only: bool,
    /// Output folder: results.json, results.md, ppl_vs_sparsity.png, accuracy_vs_sparsity.png,
    /// settings.json, cells/<method>@<sparsity>/.
    #[arg(long)]
    out: PathBuf,
}

fn is_f32(d: &lopper_core::Dtype) -> bool {
    *d == lopper_core::Dtype::F32
}

/// The settings every cell depends on; a folder made with other settings is refused.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Settings {
    model: String,
    /// The weights' storage type (absent in comparisons made before `--dtype`: f32).
    #[serde(default, skip_serializing_if = "is_f32")]
    dtype: lopper_core::Dtype,
    tasks: String,
    seq_lens: Vec<usize>,
    ppl_limit: Option<usize>,
    /// Per --seq-lens entry, when --ppl-limit gave one per length.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    ppl_limits: Vec<usize>,
    mc_limit: Option<usize>,
    seed: u64,
    calib: String,
    calib_samples: usize,
    sampler: String,
    calib_seq_len: usize,
    metric_samples: usize,
    batch_size: usize,
    pg: PgConfig,
    pg_init: String,
    #[serde(default = "reference_preset")]
    pg_preset: String,
    /// The recovery of `NAME+recover` cells (present only when one is asked for), trained on
    /// every `calib` window of `calib_seq_len` tokens in the order of `seed`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    recover: Option<lopper_recover::RecoverConfig>,
    /// Tokens per window of the `+ls` / `+obs` cells' calibration (absent in comparisons made
    /// before `--recon-seq-len`, whose refits read the calibration windows).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    recon_seq_len: Option<usize>,
    /// The input refit of the `+ls` / `+obs` cells (absent in comparisons made before it,
    /// whose cells refit no input projection).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    refit_inputs: Option<InputRefit>,
    /// `--exact-size` (absent in comparisons made before it: off).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    exact_size: bool,
    /// Under `--pg-judge auto`, the sparsity from which pg cells with a least-squares cut judge
    /// by least squares (`lopper_policy::LS_JUDGE_FROM`; below it, and in comparisons made
    /// before `auto`, `pg.judge`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pg_judge_from: Option<f64>,
}

impl Settings {
    /// The input refit of the `+ls` / `+obs` cells (none in comparisons made before it).
    fn input_refit(&self) -> InputRefit {
        self.refit_inputs.unwrap_or(InputRefit::Off)
    }
}

/// Folders made before presets existed ran the reference settings.
fn reference_preset() -> String {
    "reference".into()
}

/// One finished cell, as cached in `cells/<id>/cell.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Cell {
    method: String,
    sparsity: f64,
    kept_param_ratio: f64,
    params: u64,
    allocation: String,
    bias_compensation: bool,
    /// What the cut did to the kept weights (cells made before `+ls` existed: from
    /// `bias_compensation`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    reconstruct: Option<Reconstruct>,
    /// Task results keyed `wikitext2@128`, `boolq`, ..., as `cargo xtask eval` writes them.
    results: serde_json::Map<String, serde_json::Value>,
    llm_pruner_average: Option<f64>,
    /// One-shot methods: mean relative reconstruction error of the decoder linears (per linear in
    /// the cell's sparsity.json).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    rel_error: Option<f64>,
    seconds_plan: f64,
    /// Peak resident memory of the process while this cell planned (the high-water mark is reset
    /// before each cell: it includes the dense model and the calibration held in memory).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    plan_peak_mib: Option<f64>,
    /// Resident memory when the cell started planning: `plan_peak_mib` minus this is what the
    /// method itself added.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    plan_start_mib: Option<f64>,
    seconds_eval: f64,
    device: String,
    /// The evaluated model's [`eval_fingerprint`] (cells made before it was recorded: none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    eval_fingerprint: Option<f64>,
}

impl Cell {
    /// The cell's perplexity on the result `key` (for example `wikitext2@128`), if it has one.
    fn ppl(&self, key: &str) -> Option<f64> {
        self.results.get(key).and_then(|r| r["ppl"].as_f64())
    }
}

/// A cell's evaluation so far, written to `cells/<id>/eval-partial.json` as each task finishes
/// and removed when the cell is: a run interrupted in a cell's evaluation evaluates only the
/// tasks it had not finished. Read back only for a model with the same [`eval_fingerprint`].
#[derive(Debug, Default, Serialize, Deserialize)]
struct PartialEval {
    fingerprint: f64,
    /// Results by key (`wikitext2@128`, `boolq`), as the cell records them.
    results: serde_json::Map<String, serde_json::Value>,
    /// Seconds each of them took.
    seconds: BTreeMap<String, f64>,
}

const PARTIAL_EVAL: &str = "eval-partial.json";

/// The mean next-token loss of a fixed 32-token row (token ids spread over the vocabulary):
/// any change to the evaluated model's weights, or to the arithmetic that runs it, changes it,
/// so an interrupted cell's finished tasks are reused only for the very model they scored.
fn eval_fingerprint<B: Backend>(model: &Llama<B>) -> Result<f64> {
    let shape = model.shape();
    let len = shape.max_position_embeddings.clamp(2, 32);
    let row: Vec<u32> = (0..len as u64)
        .map(|i| ((i * 7919 + 11) % shape.vocab_size as u64) as u32)
        .collect();
    Ok(model.mean_loss(model.tokens(&[row])?, None)?)
}

/// The finished tasks of an interrupted evaluation of the model whose fingerprint is `fp`
/// (none where there is no partial file, or it is of another model).
fn read_partial(path: &Path, fp: f64) -> PartialEval {
    let fresh = PartialEval {
        fingerprint: fp,
        ..PartialEval::default()
    };
    let Ok(text) = std::fs::read_to_string(path) else {
        return fresh;
    };
    match serde_json::from_str::<PartialEval>(&text) {
        Ok(p) if p.fingerprint.to_bits() == fp.to_bits() => {
            tracing::info!(
                path = %path.display(),
                tasks = p.results.keys().cloned().collect::<Vec<_>>().join(","),
                "finished tasks of an interrupted evaluation reused"
            );
            p
        }
        Ok(_) => {
            tracing::info!(path = %path.display(), "a partial evaluation of another model ignored");
            fresh
        }
        Err(e) => {
            tracing::warn!(path = %path.display(), "an unreadable partial evaluation ignored: {e}");
            fresh
        }
    }
}

/// The time a comparison has left, from the mean time of the cells it computed whole (a cell
/// takes minutes to hours: indicatif's own estimate decays between two of them). A cell that
/// resumed an interrupted evaluation is left out of the mean: it took only its rest.
struct CellClock {
    todo: u64,
    whole: u64,
    spent: std::time::Duration,
}

impl CellClock {
    fn new(todo: u64) -> Self {
        Self {
            todo,
            whole: 0,
            spent: std::time::Duration::ZERO,
        }
    }

    /// A cell computed in `took`; `resumed`: its evaluation resumed an interrupted one.
    fn record(&mut self, resumed: bool, took: std::time::Duration) {
        if !resumed {
            self.whole += 1;
            self.spent += took;
        }
    }

    /// The time the cells after the first `computed` take (`None` before a whole cell, or once
    /// every cell is done).
    fn left(&self, computed: u64) -> Option<std::time::Duration> {
        (computed < self.todo)
            .then(|| crate::progress::time_left(self.spent, self.whole, self.todo - computed))
            .flatten()
    }
}

/// Whether a structured cell kept more of the parameters than its sparsity allows (a
/// per-layer plan that cannot split a layer's KV groups finely enough): it is then not
/// comparable with cells of its nominal sparsity. One-shot cells keep every shape.
fn keeps_more(c: &Cell) -> bool {
    c.rel_error.is_none() && c.kept_param_ratio > 1.0 - c.sparsity + 0.005
}

fn parse_list<T: std::str::FromStr>(s: &str, what: &str) -> Result<Vec<T>>
where
    T::Err: std::fmt::Display,
{
    let v: Vec<T> = s
        .split(',')
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .map(|t| {
            t.parse::<T>()
                .map_err(|e| anyhow::anyhow!("{what} `{t}`: {e}"))
        })
        .collect::<Result<_>>()?;
    anyhow::ensure!(!v.is_empty(), "{what} is empty");
    Ok(v)
}

/// A `--methods` entry: `dense`, or `NAME[:INIT][+none|+bias|+ls|+obs]`: `pg:flap` is the
/// policy-gradient search started from FLAP's scores (instead of `--pg-init`), `+bias` adds
/// FLAP-style bias compensation at surgery, checked block by block against the calibration
/// loss (FLAP has it already), `+ls` refits every kept
/// o_proj / down_proj by least squares on the calibration windows, `+obs` also lets OBS choose
/// which KV groups and channels go within the plan's per-layer counts, `+none` cuts only.
///
/// One-shot methods (weights zeroed in place, no structure removed): `alps`, `sparsegpt`,
/// `wanda` (unstructured at each --sparsity), `NAME:unstructured`, and `NAME:N:M` (one cell at
/// the pattern's sparsity); `magnitude:unstructured` is unstructured magnitude pruning.
#[derive(Debug, Clone, PartialEq)]
struct Spec {
    base: String,
    init: Option<String>,
    bias: Option<bool>,
    /// `+none`, `+bias`, `+ls` or `+obs`: what the cut does to the kept weights (default: bias where the
    /// method compensates, none otherwise).
    recon: Option<Reconstruct>,
    /// One-shot method and its pattern (`unstructured` or `N:M`).
    oneshot: Option<(lopper_sparse::SparseMethod, String)>,
    /// `+recover`: recovery training after the cut (the compare's `--recover-*` settings).
    recover: bool,
}

impl Spec {
    fn parse(full: &str) -> Result<Self> {
        let (s, recover) = match full.strip_suffix("+recover") {
            Some(r) => (r, true),
            None => (full, false),
        };
        let spec = Self::parse_cut(s)?;
        anyhow::ensure!(
            !recover || (spec.oneshot.is_none() && spec.base != "dense"),
            "--methods: `{full}`: +recover trains a structurally pruned model; it does not apply to dense or one-shot methods"
        );
        Ok(Self { recover, ..spec })
    }

    /// A spec without `+recover`.
    fn parse_cut(s: &str) -> Result<Self> {
        let (rest, recon) = match s.rsplit_once('+') {
            Some((r, how)) => (
                r,
                Some(
                    how.parse::<Reconstruct>()
                        .with_context(|| format!("--methods: `{s}`"))?,
                ),
            ),
            None => (s, None),
        };
        let bias = (recon == Some(Reconstruct::Bias)).then_some(true);
        let (base, init) = match rest.split_once(':') {
            Some((b, i)) => (b, Some(i.to_string())),
            None => (rest, None),
        };
        let oneshot = match (base, &init) {
            ("alps" | "sparsegpt" | "wanda", _) | ("magnitude", Some(_)) => {
                let pattern = init.clone().unwrap_or_else(|| "unstructured".into());
                lopper_sparse::Pattern::parse(&pattern, 0.5)
                    .with_context(|| format!("--methods: `{s}`"))?;
                anyhow::ensure!(
                    recon.is_none(),
                    "--methods: `{s}`: one-shot methods reconstruct every matrix already; a +suffix does not apply"
                );
                Some((base.parse::<lopper_sparse::SparseMethod>()?, pattern))
            }
            _ => None,
        };
        if oneshot.is_some() {
            return Ok(Self {
                base: base.into(),
                init: None,
                bias: None,
                recon: None,
                oneshot,
                recover: false,
            });
        }
        if base == "dense" {
            anyhow::ensure!(
                init.is_none() && recon.is_none(),
                "--methods: `{s}`: dense takes no init or +suffix"
            );
        } else {
            crate::methods::check_method(base)
                .with_context(|| format!("--methods: `{s}` (or dense)"))?;
        }
        anyhow::ensure!(
            init.is_none() || base == "pg",
            "--methods: `{s}`: only pg takes an initialisation (pg:flap, pg:magnitude, ...)"
        );
        Ok(Self {
            base: base.into(),
            init,
            bias,
            recon,
            oneshot: None,
            recover: false,
        })
    }

    /// The one-shot pattern at `sparsity` (N:M patterns fix their own).
    fn pattern(&self, sparsity: f64) -> Result<Option<lopper_sparse::Pattern>> {
        self.oneshot
            .as_ref()
            .map(|(_, p)| lopper_sparse::Pattern::parse(p, sparsity).map_err(Into::into))
            .transpose()
    }
}

fn cell_id(method: &str, sparsity: f64) -> String {
    if method == "dense" {
        "dense".into()
    } else {
        format!("{method}@{sparsity}")
    }
}

pub fn run(args: CompareArgs) -> Result<()> {
    let methods: Vec<String> = parse_list(&args.methods, "--methods")?;
    for m in &methods {
        Spec::parse(m)?;
    }
    if args.offload.is_some() {
        for m in &methods {
            let spec = Spec::parse(m)?;
            anyhow::ensure!(
                !spec.recover,
                "--offload cpu: `{m}` trains a copy of every layer, which offloaded layers are not; leave +recover out or drop --offload"
            );
            if spec.oneshot.is_none() && spec.base != "dense" {
                let default_init =
                    args.pg_init
                        .as_deref()
                        .unwrap_or(if args.pg_preset == "reference" {
                            "wanda-sp"
                        } else {
                            "auto"
                        });
                crate::prune::refuse_offloaded(match spec.base.as_str() {
                    "pg" => spec.init.as_deref().unwrap_or(default_init),
                    b => b,
                })?;
            }
        }
    }
    let sparsities: Vec<f64> = parse_list(&args.sparsity, "--sparsity")?;
    for &s in &sparsities {
        anyhow::ensure!(
            (0.0..1.0).contains(&s),
            "--sparsity {s} is impossible: give fractions in [0, 1) (0.3 removes 30%)"
        );
    }
    let tasks = parse_tasks(&args.tasks)?;
    let seq_lens: Vec<usize> = parse_list(&args.seq_lens, "--seq-lens")?;
    anyhow::ensure!(
        seq_lens.iter().all(|&l| l >= 2),
        "--seq-lens must be at least 2"
    );
    let ppl_limits: Vec<usize> = match &args.ppl_limit {
        Some(l) => parse_list(l, "--ppl-limit")?,
        None => Vec::new(),
    };
    anyhow::ensure!(
        ppl_limits.len() <= 1 || ppl_limits.len() == seq_lens.len(),
        "--ppl-limit gives {} limits for {} --seq-lens; give one, or one per length",
        ppl_limits.len(),
        seq_lens.len()
    );
    anyhow::ensure!(
        !ppl_limits.contains(&0),
        "a limit of 0 evaluates nothing; give a positive limit or leave it out"
    );
    for l in [args.limit, args.mc_limit] {
        anyhow::ensure!(
            l != Some(0),
            "a limit of 0 evaluates nothing; give a positive limit or leave it out"
        );
    }
    anyhow::ensure!(
        args.batch_size > 0 && args.calib_samples > 0,
        "--batch-size and --calib-samples must be at least 1"
    );
    let sampler: Sampler = args.sampler.parse()?;
    // The sparsity is set per cell; the stored settings carry a fixed placeholder.
    let base = PgConfig::preset(&args.pg_preset, 0.5)
        .with_context(|| format!("--pg-preset `{}`", args.pg_preset))?;
    let lr = args.pg_lr;
    let pg = PgConfig {
        optimizer: match args.pg_optimizer.as_deref() {
            None => base.optimizer,
            Some("adam") => Optimizer::Adam,
            Some("sgd") => Optimizer::Sgd,
            Some(o) => bail!("--pg-optimizer `{o}`: use adam or sgd"),
        },
        lr_heads: lr.unwrap_or(base.lr_heads),
        lr_channels: lr.unwrap_or(base.lr_channels),
        lr_layers: lr.unwrap_or(base.lr_layers),
        steps: args.pg_steps.unwrap_or(base.steps),
        batch_size: args.pg_batch_size.unwrap_or(base.batch_size),
        channel_block: args.pg_channel_block.unwrap_or(base.channel_block),
        widths: args.pg_widths.unwrap_or(base.widths),
        anneal: args.pg_anneal.unwrap_or(base.anneal),
        projection: match &args.pg_projection {
            Some(p) => p.parse()?,
            None => base.projection,
        },
        held_out: base.held_out.min(args.calib_samples / 4),
        // `auto` is masked here and least squares from `pg_judge_from` (per cell, by its cut).
        judge: Judge::parse(&args.pg_judge, 0.0, false)?,
        seed: args.seed,
        ..base
    };
    pg.validate()?;
    // Only a held-out choice has something to judge (the reference preset has none).
    let pg_judge_from =
        (args.pg_judge == "auto" && pg.held_out > 0).then_some(lopper_policy::LS_JUDGE_FROM);
    let settings = Settings {
        model: args.model.clone(),
        tasks: args.tasks.clone(),
        seq_lens: seq_lens.clone(),
        dtype: args.dtype,
        ppl_limit: match ppl_limits[..] {
            [l] => Some(l),
            [] => args.limit,
            _ => None,
        },
        ppl_limits: if ppl_limits.len() > 1 {
            ppl_limits
        } else {
            Vec::new()
        },
        mc_limit: args.mc_limit.or(args.limit),
        seed: args.seed,
        calib: args.calib.clone(),
        calib_samples: args.calib_samples,
        sampler: args.sampler.clone(),
        calib_seq_len: args.calib_seq_len,
        recon_seq_len: Some(
            args.recon_seq_len
                .unwrap_or(crate::reconstruct::RECON_SEQ_LEN),
        ),
        refit_inputs: Some(args.refit_inputs.unwrap_or_default()),
        metric_samples: args.metric_samples,
        batch_size: args.batch_size,
        pg,
        pg_init: args.pg_init.clone().unwrap_or_else(|| {
            if args.pg_preset == "reference" {
                "wanda-sp"
            } else {
                "auto"
            }
            .into()
        }),
        pg_preset: args.pg_preset.clone(),
        exact_size: args.exact_size,
        pg_judge_from,
        recover: if methods.iter().any(|m| m.ends_with("+recover")) {
            crate::recover::check_data(&args.calib).context("+recover trains on --calib")?;
            Some(crate::recover::compare_config(
                &args.recover_method,
                &args.recover_loss,
                args.recover_steps,
                args.recover_batch_size,
                args.recover_lr,
                args.seed,
            )?)
        } else {
            None
        },
    };
    let settings_path = args.out.join("settings.json");
    if args.force && args.out.exists() {
        std::fs::remove_dir_all(&args.out)
            .with_context(|| format!("removing {}", args.out.display()))?;
    }
    if settings_path.is_file() {
        let mut old: Settings = serde_json::from_str(&std::fs::read_to_string(&settings_path)?)
            .with_context(|| format!("reading {}", settings_path.display()))?;
        if !has_refit_cells(&args.out)? {
            // Made before `--recon-seq-len` or `--refit-inputs`: without a finished `+ls` /
            // `+obs` cell nothing in it depends on the refit, so it takes the new settings.
            old.recon_seq_len = old.recon_seq_len.or(settings.recon_seq_len);
            old.refit_inputs = old.refit_inputs.or(settings.refit_inputs);
        }
        if old != settings {
            bail!(
                "{} holds a comparison made with other settings ({}); use the same settings to add or resume cells, another --out, or --force to start over",
                args.out.display(),
                settings_path.display()
            );
        }
    } else if args.report_only {
        bail!(
            "{} holds no comparison (no settings.json): run without --report-only first",
            args.out.display()
        );
    } else if args.out.exists() && std::fs::read_dir(&args.out)?.next().is_some() {
        bail!(
            "{} exists and is not a comparison folder; choose another --out or pass --force",
            args.out.display()
        );
    }
    std::fs::create_dir_all(args.out.join("cells"))?;
    crate::prune::write_json(&settings_path, &settings)?;
    let mut cells: Vec<(String, f64)> = Vec::new();
    for m in &methods {
        if m == "dense" {
            cells.push((m.clone(), 0.0));
        } else if let Some(lopper_sparse::Pattern::NM { n, m: g }) = Spec::parse(m)?.pattern(0.5)? {
            cells.push((m.clone(), 1.0 - n as f64 / g as f64));
        } else {
            cells.extend(sparsities.iter().map(|&s| (m.clone(), s)));
        }
    }
    if args.report_only {
        let mut done = Vec::new();
        let mut missing = Vec::new();
        for (m, sp) in &cells {
            let id = cell_id(m, *sp);
            match read_cell(&args.out, &id)? {
                Some(c) => done.push(c),
                None => missing.push(id),
            }
        }
        anyhow::ensure!(
            !done.is_empty(),
            "{} has none of these cells finished: run without --report-only first",
            args.out.display()
        );
        let device = done[0].device.clone();
        write_results(&args.out, &settings, &done, &device, &missing)?;
        println!("{}", std::fs::read_to_string(args.out.join("results.md"))?);
        return Ok(());
    }
    let device = args.device.clone();
    run_on_devices(
        &device,
        CompareJob {
            scores: Default::default(),
            pg_plans: Default::default(),
            layer_orders: Default::default(),
            args,
            settings,
            cells,
            tasks,
            sampler,
        },
    )
}

/// Unit scores and compensation means per method spec, computed by the first cell that needs
/// them.
type ScoreCache = std::cell::RefCell<
    BTreeMap<
        String,
        (
            lopper_core::UnitScores,
            Option<lopper_importance::InputStats>,
        ),
    >,
>;

/// Layer methods' removal orders by base method (`sleb`, `block-influence`), searched once to
/// the run's largest sparsity: the order is greedy and does not depend on the target, so each
/// smaller sparsity's plan is a prefix of it (the rule of [`lopper_core::plan_drop_layers`]).
type LayerOrderCache = std::cell::RefCell<BTreeMap<String, Vec<usize>>>;

/// A layer method's removal order as a run stores it: searched to `sparsity`.
#[derive(Serialize, Deserialize)]
struct StoredOrder {
    sparsity: f64,
    order: Vec<usize>,
}

/// The cache key of a spec: its base method and bias flag.
fn method_spec(spec: &Spec) -> String {
    match spec.bias {
        Some(true) => format!("{}+bias", spec.base),
        _ => spec.base.clone(),
    }
}

/// Plans of finished pg searches by [`pg_key`]: `pg+none`, `pg` and `pg+ls` at one sparsity run
/// one search and differ only in the cut.
type PgCache =
    std::cell::RefCell<BTreeMap<String, (MaskPlan, Option<lopper_importance::InputStats>)>>;

/// The search a pg spec runs at `sparsity`: its init and judge, not its cut. The bias flag is
/// not part of it either: the search compensates as the preset says (`PgConfig::compensation`),
/// and the cut alone reads the flag, so `pg+none`, `pg` and `pg+bias` share one search.
fn pg_key(spec: &Spec, init: &str, sparsity: f64, judge: Judge) -> String {
    format!("{}:{init}@{sparsity}/{judge:?}", spec.base)
}

/// The judge of a pg spec's held-out choice at `sparsity`: `--pg-judge` where the cut refits
/// by least squares (`+ls`, `+obs`; under `auto` least squares from `st.pg_judge_from`), the
/// masked loss otherwise.
fn pg_judge(spec: &Spec, st: &Settings, sparsity: f64) -> Judge {
    match spec.recon {
        Some(r) if r.refits() => match st.pg_judge_from {
            Some(from) if sparsity >= from => Judge::ls(),
            _ => st.pg.judge,
        },
        _ => Judge::Masked,
    }
}

struct CompareJob {
    scores: ScoreCache,
    pg_plans: PgCache,
    layer_orders: LayerOrderCache,
    args: CompareArgs,
    settings: Settings,
    cells: Vec<(String, f64)>,
    tasks: Vec<Task>,
    sampler: Sampler,
}

/// Windows per evaluation forward at `seq_len`: long windows run fewer at a time.
fn eval_batch(batch_size: usize, seq_len: usize) -> usize {
    if seq_len > 512 {
        1.max(batch_size / 8)
    } else {
        batch_size
    }
}

impl PlacedJob for CompareJob {
    fn run<B: Backend>(self, devices: Vec<B::Device>, device_name: String) -> Result<()> {
        let a = &self.args;
        let st = &self.settings;
        let loaded = crate::loading::load_placed_model::<B>(
            &a.model,
            a.dtype,
            &devices,
            a.offload.is_some(),
        )?;
        let (model, tok) = (&loaded.model, &loaded.tokenizer);
        if model.is_offloaded() {
            // Each cell's pruned model is built whole beside the streamed layers: the largest
            // of them (the least sparse structured cell; a one-shot cell keeps every weight)
            // must fit, before any cell.
            let least = self
                .cells
                .iter()
                .filter(|(m, _)| m != "dense")
                .map(|(m, s)| match Spec::parse(m) {
                    Ok(spec) if spec.oneshot.is_some() => 0.0,
                    _ => *s,
                })
                .fold(f64::INFINITY, f64::min);
            if least.is_finite() {
                crate::guard::pruned_fits::<B>(
                    model.shape(),
                    model.dtype(),
                    least,
                    &devices,
                    &a.model,
                )?;
            }
        }
        // Every forward the cells will run must fit, checked before the first cell.
        let shape = model.shape();
        crate::guard::context(shape, st.calib_seq_len, "--calib-seq-len", false)?;
        crate::guard::forward_fits(shape, st.batch_size, st.calib_seq_len, "calibration")?;
        for &l in &st.seq_lens {
            crate::guard::context(shape, l, "--seq-lens", false)?;
            crate::guard::forward_fits(shape, eval_batch(st.batch_size, l), l, "perplexity")?;
        }
        if let Some(l) = a.recon_seq_len {
            crate::guard::context(shape, l, "--recon-seq-len", false)?;
        }
        let cuts: Vec<Reconstruct> = self.cells.iter().filter_map(|(m, _)| cut_of(m)).collect();
        if cuts.iter().any(|c| c.refits()) {
            crate::guard::ls_fits(shape, cuts.contains(&Reconstruct::Obs), st.input_refit())?;
        }
        let mut calib: Option<Calibration> = None;
        // The `+ls` / `+obs` cells' calibration and batch, drawn for the first of them.
        let mut ls_calib: Option<Option<(Calibration, usize)>> = None;
        // The bar counts the cells to compute: finished ones take no time and would make its
        // rate (and the time left) meaningless.
        let cached = self
            .cells
            .iter()
            .filter(|(m, s)| {
                a.out
                    .join("cells")
                    .join(cell_id(m, *s))
                    .join("cell.json")
                    .is_file()
            })
            .count();
        let bar = crate::progress::bar(
            (self.cells.len() - cached) as u64,
            &format!(
                "cells to compute [{{bar:30}}] {{pos}}/{{len}} ({cached} finished before) {{msg}}"
            ),
        )?;
        let mut clock = CellClock::new((self.cells.len() - cached) as u64);
        let mut done: Vec<Cell> = Vec::new();
        for (i, (method, sparsity)) in self.cells.iter().enumerate() {
            let id = cell_id(method, *sparsity);
            let dir = a.out.join("cells").join(&id);
            let cell_path = dir.join("cell.json");
            let left = clock.left(bar.position()).map_or(String::new(), |rest| {
                format!(", about {} left", indicatif::HumanDuration(rest))
            });
            bar.set_message(format!("{id}{left}"));
            if let Some(cell) = read_cell(&a.out, &id)? {
                tracing::info!(cell = id, "cached");
                done.push(cell);
                continue;
            }
            let (cell_started, resumed) = (Instant::now(), dir.join(PARTIAL_EVAL).is_file());
            std::fs::create_dir_all(&dir)?;
            if calib.is_none() && method != "dense" {
                calib = Some(crate::methods::draw_calibration(
                    tok,
                    &st.calib,
                    self.sampler,
                    st.calib_samples,
                    st.calib_seq_len,
                    st.seed,
                )?);
            }
            if ls_calib.is_none() && Spec::parse(method)?.recon.is_some_and(Reconstruct::refits) {
                ls_calib = Some(crate::reconstruct::ls_calibration(
                    tok,
                    shape,
                    &st.calib,
                    self.sampler,
                    (st.calib_samples, st.calib_seq_len, st.batch_size),
                    st.seed,
                    a.recon_seq_len,
                )?);
            }
            let cell = self.cell(
                model,
                tok,
                calib.as_ref(),
                ls_calib.as_ref().and_then(Option::as_ref),
                method,
                *sparsity,
                &dir,
                &device_name,
            )?;
            crate::prune::write_json(&cell_path, &cell)?;
            // The cell is whole: its partial evaluation is not needed any more.
            let _ = std::fs::remove_file(dir.join(PARTIAL_EVAL));
            done.push(cell);
            bar.inc(1);
            clock.record(resumed, cell_started.elapsed());
            // The table so far: an interrupted run keeps a report of what it finished.
            let rest: Vec<String> = self.cells[i + 1..]
                .iter()
                .map(|(m, sp)| cell_id(m, *sp))
                .collect();
            if !rest.is_empty() {
                write_results(&a.out, st, &done, &device_name, &rest)?;
            }
        }
        bar.finish_and_clear();
        write_results(&a.out, st, &done, &device_name, &[])?;
        println!("{}", std::fs::read_to_string(a.out.join("results.md"))?);
        Ok(())
    }
}

impl CompareJob {
    /// A layer method's removal order (kept in memory for the run's later cells), searched once
    /// to the largest sparsity of the run's cells of the same method: every smaller sparsity's
    /// plan is a prefix of it. The order is kept in `DIR/layer-orders/<method>.json` with the
    /// sparsity it reached, so a later run on the same settings (`settings.json` pins the
    /// calibration) that asks for no deeper sparsity reads it instead of searching again.
    fn layer_order<B: Backend>(
        &self,
        model: &Llama<B>,
        windows: &[Vec<u32>],
        spec: &Spec,
        method: Method,
        sparsity: f64,
        settings: &MethodSettings,
    ) -> Result<Vec<usize>> {
        if let Some(order) = self.layer_orders.borrow().get(&spec.base) {
            tracing::info!(
                method = spec.base.as_str(),
                "layer order reused from an earlier cell"
            );
            return Ok(order.clone());
        }
        let order =
            self.stored_or_searched_order(model, windows, spec, method, sparsity, settings)?;
        self.layer_orders
            .borrow_mut()
            .insert(spec.base.clone(), order.clone());
        Ok(order)
    }

    /// [`CompareJob::layer_order`] when this run has none yet: read from `DIR/layer-orders/`
    /// or searched (and stored there).
    fn stored_or_searched_order<B: Backend>(
        &self,
        model: &Llama<B>,
        windows: &[Vec<u32>],
        spec: &Spec,
        method: Method,
        sparsity: f64,
        settings: &MethodSettings,
    ) -> Result<Vec<usize>> {
        let deepest = self
            .cells
            .iter()
            .filter(|(c, _)| Spec::parse(c).is_ok_and(|s| s.base == spec.base))
            .map(|&(_, s)| s)
            .fold(sparsity, f64::max);
        let path = self
            .args
            .out
            .join("layer-orders")
            .join(format!("{}.json", spec.base));
        if let Ok(text) = std::fs::read_to_string(&path) {
            let stored: StoredOrder = serde_json::from_str(&text)
                .with_context(|| format!("{} is not a layer order; delete it", path.display()))?;
            if stored.sparsity >= deepest {
                tracing::info!(path = %path.display(), "layer order read from an earlier run");
                return Ok(stored.order);
            }
        }
        let mp = crate::methods::metric_plan(
            model,
            windows,
            method,
            1.0 - deepest,
            self.settings.metric_samples,
            &MethodSettings {
                bias_compensation: Some(false),
                ..settings.clone()
            },
        )?;
        let order: Vec<usize> = mp
            .plan
            .meta
            .get("removed_layers")
            .and_then(|v| serde_json::from_value(v.clone()).ok())
            .context("a layer method's plan records its removal order")?;
        std::fs::create_dir_all(path.parent().expect("a file in a folder"))?;
        crate::prune::write_json(
            &path,
            &StoredOrder {
                sparsity: deepest,
                order: order.clone(),
            },
        )?;
        Ok(order)
    }

    #[allow(clippy::too_many_arguments)]
    fn cell<B: Backend>(
        &self,
        model: &Llama<B>,
        tok: &lopper_model::Tokenizer,
        calib: Option<&Calibration>,
        ls_calib: Option<&(Calibration, usize)>,
        method: &str,
        sparsity: f64,
        dir: &Path,
        device_name: &str,
    ) -> Result<Cell> {
        let st = &self.settings;
        let peak_known = crate::progress::reset_peak_rss();
        let plan_start_mib = crate::progress::rss_mib().filter(|_| peak_known);
        let t = Instant::now();
        let keep = 1.0 - sparsity;
        let settings = MethodSettings {
            batch_size: st.batch_size,
            seed: st.seed,
            ..MethodSettings::default()
        };
        let spec = Spec::parse(method)?;
        let settings = MethodSettings {
            bias_compensation: spec.bias,
            allocation: match spec.base.parse::<Method>() {
                Ok(m)
                    if st.exact_size
                        && m.default_allocation() == Some(lopper_core::Allocation::PerLayer) =>
                {
                    Some(lopper_core::Allocation::PerLayerParams)
                }
                _ => None,
            },
            ..settings
        };
        let windows = || calib.map_or(&[][..], |c| &c.windows[..]);
        // One-shot methods: (pruned model, overall sparsity, mean relative error).
        let oneshot = match (&spec.oneshot, spec.pattern(sparsity)?) {
            (Some((sm, _)), Some(pattern)) => {
                let n = windows().len().min(st.metric_samples);
                let (pruned, reports) = crate::sparse::solve(
                    model,
                    &windows()[..n],
                    *sm,
                    pattern,
                    st.batch_size,
                    &dir.join("sparsity.json"),
                    &serde_json::json!({"compare": st, "method": method, "sparsity": sparsity}),
                )?;
                let (overall, err) = crate::sparse::summary(&reports);
                Some((pruned, overall, err))
            }
            _ => None,
        };
        let judge = pg_judge(&spec, st, sparsity);
        let search_key = pg_key(
            &spec,
            spec.init.as_deref().unwrap_or(&st.pg_init),
            sparsity,
            judge,
        );
        let (plan, mut means): (Option<MaskPlan>, _) = match spec.base.as_str() {
            _ if oneshot.is_some() => (None, None),
            "dense" => (None, None),
            "pg" if let Some((plan, means)) = self.pg_plans.borrow().get(&search_key).cloned() => {
                tracing::info!(
                    method,
                    "plan of the same search reused from an earlier cell"
                );
                (Some(plan), means)
            }
            "pg" => {
                let cfg = PgConfig {
                    sparsity,
                    judge,
                    ..st.pg.clone()
                };
                // `dtype` at the top, where a resumed search checks it (`prune` records it there).
                let meta =
                    serde_json::json!({"compare": st, "sparsity": sparsity, "dtype": st.dtype});
                let out = crate::methods::run_pg(
                    model,
                    windows(),
                    &cfg,
                    &crate::methods::PgInit {
                        name: spec.init.as_deref().unwrap_or(&st.pg_init),
                        plan_start: st.pg_preset != "reference",
                        metric_samples: st.metric_samples,
                        settings: &settings,
                    },
                    &crate::methods::PgRun {
                        dir,
                        resume: dir.join("checkpoint.json").is_file(),
                        stop_after: None,
                        checkpoint_every: 25,
                        meta: &meta,
                        refit: ls_calib.map(|(c, b)| (&c.windows[..], *b, st.input_refit())),
                    },
                )?;
                let means = out.means.map(|m| (m.o_proj, m.down_proj));
                self.pg_plans
                    .borrow_mut()
                    .insert(search_key.clone(), (out.plan.clone(), means.clone()));
                (Some(out.plan), means)
            }
            m => {
                let method = m.parse::<Method>()?;
                // Unit scores do not depend on the sparsity: score once per method spec.
                let cached = (!method.removes_layers())
                    .then(|| self.scores.borrow().get(&method_spec(&spec)).cloned())
                    .flatten();
                match cached {
                    _ if method.removes_layers() => {
                        let order =
                            self.layer_order(model, windows(), &spec, method, sparsity, &settings)?;
                        let plan = lopper_core::plan_drop_layers(
                            model.shape(),
                            &order,
                            keep,
                            method.name(),
                        )?;
                        (Some(plan), None)
                    }
                    Some((scores, comp)) => {
                        let plan = lopper_importance::plan_from_scores(
                            model.shape(),
                            method,
                            &scores,
                            keep,
                            &settings,
                        )?;
                        tracing::info!(method = m, "scores reused from an earlier cell");
                        (Some(plan), comp)
                    }
                    _ => {
                        let mp = crate::methods::metric_plan(
                            model,
                            windows(),
                            method,
                            keep,
                            st.metric_samples,
                            &settings,
                        )?;
                        if let Some(sc) = &mp.scores {
                            self.scores
                                .borrow_mut()
                                .insert(method_spec(&spec), (sc.clone(), mp.compensation.clone()));
                        }
                        (Some(mp.plan), mp.compensation)
                    }
                }
            }
        };
        if means.is_none() && spec.bias == Some(true) {
            let n = windows().len().min(st.metric_samples);
            means = Some(lopper_importance::input_means(
                model,
                &windows()[..n],
                st.batch_size,
            )?);
        }
        let how = spec.recon.unwrap_or(if means.is_some() {
            Reconstruct::Bias
        } else {
            Reconstruct::None
        });
        let (pruned, allocation) = match (&plan, &oneshot) {
            (None, Some((m, _, _))) => (
                Some(m.clone()),
                if spec.base == "wanda" {
                    "per output row"
                } else {
                    "per matrix"
                }
                .to_string(),
            ),
            (None, None) => (None, "none".to_string()),
            (Some(p), _) => {
                crate::prune::write_json(&dir.join("plan.json"), p)?;
                let means = means.as_ref().map(|(o, d)| lopper_surgery::InputMeans {
                    o_proj: o.clone(),
                    down_proj: d.clone(),
                });
                let (fit, batch) = match ls_calib {
                    Some((c, b)) if how.refits() => (&c.windows[..], *b),
                    _ => (windows(), st.batch_size),
                };
                let done = crate::reconstruct::cut(
                    model,
                    p,
                    how,
                    means.as_ref(),
                    fit,
                    batch,
                    st.input_refit(),
                )?;
                if done.chosen.is_some() {
                    let mut p = p.clone();
                    done.update(&mut p);
                    crate::prune::write_json(&dir.join("plan.json"), &p)?;
                }
                done.write_reports(dir)?;
                let pruned = done.model;
                let alloc = p
                    .meta
                    .get("allocation")
                    .and_then(|v| v.as_str())
                    .unwrap_or("global (pg)");
                (Some(pruned), alloc.to_string())
            }
        };
        let pruned = match (pruned, &st.recover) {
            (Some(p), Some(cfg)) if spec.recover => {
                let windows =
                    crate::recover::training_windows(tok, &st.calib, st.calib_seq_len, st.seed)?;
                anyhow::ensure!(
                    windows.windows.len() >= cfg.windows_needed(),
                    "+recover: --calib {} has {} windows of {} tokens; --recover-steps {} x --recover-batch-size {} needs {}",
                    st.calib,
                    windows.windows.len(),
                    st.calib_seq_len,
                    cfg.steps,
                    cfg.batch_size,
                    cfg.windows_needed()
                );
                // Its own folder: a pg cell's search writes curve.jsonl and loss.png too.
                let rdir = dir.join("recover");
                std::fs::create_dir_all(&rdir)
                    .with_context(|| format!("creating {}", rdir.display()))?;
                let trained = crate::recover::train(
                    &p,
                    Some(model),
                    *cfg,
                    &windows.windows,
                    &crate::recover::TrainRun {
                        dir: &rdir,
                        resume: true,
                        stop_after: None,
                        checkpoint_every: 25,
                    },
                )?;
                let recovered = trained.run.model()?;
                crate::recover::remove_checkpoint(&rdir);
                Some(recovered)
            }
            (p, _) => p,
        };
        // The cut (its reconstruction, and recovery) is part of the plan's time and memory.
        let seconds_plan = t.elapsed().as_secs_f64();
        // The kernel does not update its high-water mark on every release of pages (memory the
        // allocator hands back with madvise), so VmHWM can read below a VmRSS taken after the
        // reset (221.07 against 221.27 MiB in one CI run); the peak is at least that start.
        let plan_peak_mib = crate::progress::peak_rss_mib()
            .filter(|_| peak_known)
            .map(|p| plan_start_mib.map_or(p, |s| p.max(s)));
        let eval_model = pruned.as_ref().unwrap_or(model);
        let t = Instant::now();
        let fingerprint = eval_fingerprint(eval_model)?;
        let partial_path = dir.join(PARTIAL_EVAL);
        let mut partial = read_partial(&partial_path, fingerprint);
        let mut seconds_eval = t.elapsed().as_secs_f64();
        let (ppl, mc): (Vec<Task>, Vec<Task>) =
            self.tasks.iter().partition(|t| matches!(t, Task::Ppl(_)));
        let mut runs: Vec<(Vec<Task>, usize, Option<usize>)> = st
            .seq_lens
            .iter()
            .filter(|_| !ppl.is_empty())
            .enumerate()
            .map(|(i, &l)| {
                (
                    ppl.clone(),
                    l,
                    st.ppl_limits.get(i).copied().or(st.ppl_limit),
                )
            })
            .collect();
        if !mc.is_empty() {
            runs.push((mc.clone(), st.seq_lens[0], st.mc_limit));
        }
        for (tasks, seq_len, limit) in runs {
            let es = EvalSettings {
                seq_len,
                bos: BosPolicy::None,
                limit,
                batch_size: eval_batch(st.batch_size, seq_len),
                allow_longer_context: false,
            };
            // One task at a time (tasks are scored independently), each kept as it finishes.
            for task in tasks {
                let key = match task {
                    Task::Ppl(_) => format!("{}@{seq_len}", crate::eval::task_key(task)),
                    _ => crate::eval::task_key(task).to_string(),
                };
                if let Some(secs) = partial.seconds.get(&key)
                    && partial.results.contains_key(&key)
                {
                    seconds_eval += secs;
                    continue;
                }
                let t = Instant::now();
                let (mut r, _) = evaluate(eval_model, tok, &[task], &es)?;
                let secs = t.elapsed().as_secs_f64();
                let v = r
                    .remove(crate::eval::task_key(task))
                    .context("an evaluation returns its task's result")?;
                partial.results.insert(key.clone(), v);
                partial.seconds.insert(key, secs);
                seconds_eval += secs;
                crate::prune::write_json(&partial_path, &partial)?;
            }
        }
        let mut results = partial.results;
        let llm_pruner_average = crate::eval::insert_llm_pruner_average(&mut results);
        let shape = eval_model.shape();
        let cell = Cell {
            method: method.into(),
            sparsity,
            kept_param_ratio: match (&plan, &oneshot) {
                (Some(p), _) => p.kept_param_ratio(),
                (None, Some((_, overall, _))) => 1.0 - overall,
                (None, None) => 1.0,
            },
            params: shape.num_params(),
            allocation,
            bias_compensation: plan.is_some() && how == Reconstruct::Bias,
            reconstruct: plan.as_ref().map(|_| how),
            results,
            llm_pruner_average,
            rel_error: oneshot.as_ref().map(|o| o.2),
            seconds_plan,
            plan_peak_mib,
            plan_start_mib,
            seconds_eval,
            device: device_name.into(),
            eval_fingerprint: Some(fingerprint),
        };
        tracing::info!(
            method,
            sparsity,
            seconds = seconds_plan + cell.seconds_eval,
            "cell finished"
        );
        Ok(cell)
    }
}

/// The metric of a task in the LLM-Pruner convention.
fn task_metric(task: &str) -> &'static str {
    match task {
        "hellaswag" | "arc_challenge" | "openbookqa" => "acc_norm",
        _ => "acc",
    }
}

/// Column keys of the table, in task order: perplexity tasks at each length, then the rest.
fn columns(st: &Settings) -> Result<Vec<(String, String)>> {
    let mut cols = Vec::new();
    let tasks = parse_tasks(&st.tasks)?;
    for t in &tasks {
        if let Task::Ppl(c) = t {
            for l in &st.seq_lens {
                cols.push((format!("{}@{l}", c.name()), "ppl".to_string()));
            }
        }
    }
    for t in &tasks {
        match t {
            Task::Mc(m) => cols.push((m.name().to_string(), task_metric(m.name()).to_string())),
            Task::Lambada => cols.push(("lambada".into(), "acc".into())),
            Task::Ppl(_) => {}
        }
    }
    Ok(cols)
}

/// The cut a method names with its suffix (`+ls`, `+bias`, ...), if it names one.
fn cut_of(method: &str) -> Option<Reconstruct> {
    Spec::parse(method).ok().and_then(|s| s.recon)
}

/// The lowest perplexity at each sparsity on every perplexity column: the best cell (every
/// cell tied with it), its ratio to the dense model, and the next cell with its ratio to the
/// best, so that a table of many cells says at a glance which method wins where and by how
/// much. Only cells that removed what they were asked to are ranked; one that kept more is
/// named under the table. The dense cell is the reference, not a contender.
fn best_per_sparsity(cells: &[Cell], ppl: &[&str]) -> String {
    let pruned: Vec<&Cell> = cells.iter().filter(|c| c.method != "dense").collect();
    let mut sparsities: Vec<f64> = pruned.iter().map(|c| c.sparsity).collect();
    sparsities.sort_by(f64::total_cmp);
    sparsities.dedup();
    if ppl.is_empty() || sparsities.is_empty() {
        return String::new();
    }
    let dense = cells.iter().find(|c| c.method == "dense");
    let mut md = format!(
        "\nBest perplexity per sparsity on each column: the lowest cell (with any cell tied with it) and its ratio to dense, then the next cell and its ratio to the best. Only the cells that removed what they were asked to are ranked.\n\n| sparsity | {} |\n|---:|{}\n",
        ppl.join(" | "),
        "---|".repeat(ppl.len())
    );
    let mut not_compared = String::new();
    for &s in &sparsities {
        let here: Vec<&Cell> = pruned.iter().copied().filter(|c| c.sparsity == s).collect();
        md += &format!("| {s} |");
        for k in ppl {
            let mut ranked: Vec<(&str, f64)> = here
                .iter()
                .filter(|c| !keeps_more(c))
                .filter_map(|c| c.ppl(k).map(|v| (c.method.as_str(), v)))
                .collect();
            ranked.sort_by(|a, b| a.1.total_cmp(&b.1).then(a.0.cmp(b.0)));
            let Some(&(_, best)) = ranked.first() else {
                md += " – |";
                continue;
            };
            let tied: Vec<&str> = ranked
                .iter()
                .take_while(|(_, v)| *v == best)
                .map(|(m, _)| *m)
                .collect();
            md += &format!(" **{}** {best:.2}", tied.join(" = "));
            if let Some(d) = dense.and_then(|d| d.ppl(k)) {
                md += &format!(" ({:.2}x dense)", best / d);
            }
            if let Some((m, v)) = ranked.get(tied.len()) {
                md += &format!("; next {m} {v:.2} ({:.2}x)", v / best);
            }
            md += " |";
        }
        md += "\n";
        for c in here.iter().filter(|c| keeps_more(c)) {
            let v = c.ppl(ppl[0]).map_or("–".into(), |v| format!("{v:.2}"));
            not_compared += &format!(
                "- sparsity {s}, not compared: {} keeps {:.4} of the parameters ({} {v})\n",
                c.method, c.kept_param_ratio, ppl[0]
            );
        }
    }
    if !not_compared.is_empty() {
        md += "\n";
        md += &not_compared;
    }
    md
}

/// The cuts of one plan side by side (issue 18's question: does `ls` beat `bias`, and `bias`
/// `none`?): a row per method and sparsity that has at least two cuts among `cells`, each cut's
/// perplexities on the `ppl` columns, and whether `ls < bias < none` holds on each column
/// (`–` where one of the three is missing). Recovered and one-shot cells are left out. Empty when
/// no plan has two cuts.
fn cuts_side_by_side(cells: &[Cell], ppl: &[&str]) -> String {
    const CUTS: [Reconstruct; 4] = [
        Reconstruct::None,
        Reconstruct::Bias,
        Reconstruct::Ls,
        Reconstruct::Obs,
    ];
    type Row<'a> = BTreeMap<usize, &'a Cell>;
    let mut rows: BTreeMap<(String, String), Row> = BTreeMap::new();
    for c in cells {
        if c.method == "dense" || c.rel_error.is_some() || c.method.ends_with("+recover") {
            continue;
        }
        let cut = c.reconstruct.unwrap_or(if c.bias_compensation {
            Reconstruct::Bias
        } else {
            Reconstruct::None
        });
        let base = match cut_of(&c.method) {
            Some(_) => c.method.rsplit_once('+').map_or(&*c.method, |(b, _)| b),
            None => &c.method,
        };
        let i = CUTS
            .iter()
            .position(|&k| k == cut)
            .expect("every cut is listed");
        rows.entry((base.to_string(), format!("{}", c.sparsity)))
            .or_default()
            .insert(i, c);
    }
    rows.retain(|_, r| r.len() >= 2);
    if rows.is_empty() || ppl.is_empty() {
        return String::new();
    }
    let used: Vec<usize> = (0..CUTS.len())
        .filter(|i| rows.values().any(|r| r.contains_key(i)))
        .collect();
    let mut md = format!(
        "\nThe cuts of each plan side by side (perplexity {}; `ls < bias < none`: whether the least-squares cut is below the bias compensation and that below no compensation, on each of those columns):\n\n| method | sparsity |",
        ppl.join(" / ")
    );
    for &i in &used {
        md += &format!(" {} |", CUTS[i]);
    }
    md += " ls < bias < none |\n|---|---:|";
    md += &"---:|".repeat(used.len());
    md += "---|\n";
    for ((base, sparsity), row) in &rows {
        md += &format!("| {base} | {sparsity} |");
        for i in &used {
            md += &match row.get(i) {
                Some(c) => {
                    let v: Vec<String> = ppl
                        .iter()
                        .map(|k| c.ppl(k).map_or("–".into(), |v| format!("{v:.2}")))
                        .collect();
                    format!(" {} |", v.join(" / "))
                }
                None => " – |".into(),
            };
        }
        let order: Vec<&str> = ppl
            .iter()
            .map(|k| {
                let at = |i: usize| row.get(&i).and_then(|c| c.ppl(k));
                match (at(2), at(1), at(0)) {
                    (Some(ls), Some(bias), Some(none)) if ls < bias && bias < none => "yes",
                    (Some(_), Some(_), Some(_)) => "no",
                    _ => "–",
                }
            })
            .collect();
        md += &format!(" {} |\n", order.join(" / "));
    }
    md
}

/// Whether a comparison folder holds a finished `+ls` / `+obs` cell.
fn has_refit_cells(out: &Path) -> Result<bool> {
    let cells = out.join("cells");
    if !cells.is_dir() {
        return Ok(false);
    }
    for e in std::fs::read_dir(&cells)? {
        let e = e?;
        let name = e.file_name().to_string_lossy().into_owned();
        let method = name.split('@').next().unwrap_or_default();
        if cut_of(method).is_some_and(Reconstruct::refits) && e.path().join("cell.json").is_file() {
            return Ok(true);
        }
    }
    Ok(false)
}

/// The finished cell `id` of the comparison in `out`, if there is one.
fn read_cell(out: &Path, id: &str) -> Result<Option<Cell>> {
    let path = out.join("cells").join(id).join("cell.json");
    if !path.is_file() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(&path)?;
    Ok(Some(serde_json::from_str(&text).with_context(|| {
        format!(
            "reading {} (delete the cell's folder to compute it again)",
            path.display()
        )
    })?))
}

/// results.json, results.md and the plots from `cells`; `missing` names the cells of the
/// requested grid not finished yet (a partial table says so).
fn write_results(
    out: &Path,
    st: &Settings,
    cells: &[Cell],
    device: &str,
    missing: &[String],
) -> Result<()> {
    let cols = columns(st)?;
    let has_avg = cells.iter().any(|c| c.llm_pruner_average.is_some());
    let has_err = cells.iter().any(|c| c.rel_error.is_some());
    let mut md = String::from("# lopper compare\n\n");
    if !missing.is_empty() {
        md += &format!(
            "**Partial**: {} of {} cells finished; missing: {}.\n\n",
            cells.len(),
            cells.len() + missing.len(),
            missing.join(", ")
        );
    }
    md += &format!(
        "Model `{}`; calibration {} ({} windows of {} tokens, {} sampler, seed {}; metric methods read the first {}); perplexity windows: {}; multiple-choice examples: {}; device {device}. Perplexity: `cargo xtask eval` protocol (BOS none). Accuracy: acc for boolq, piqa, winogrande, arc_easy, lambada; acc_norm for hellaswag, arc_challenge, openbookqa (LLM-Pruner convention). PG: {} steps, {:?} lr {}, batch {}, init {}.\n\n",
        st.model,
        st.calib,
        st.calib_samples,
        st.calib_seq_len,
        st.sampler,
        st.seed,
        st.metric_samples,
        if st.ppl_limits.is_empty() {
            st.ppl_limit
                .map_or("all".into(), |l| format!("the first {l}"))
        } else {
            st.seq_lens
                .iter()
                .zip(&st.ppl_limits)
                .map(|(s, l)| format!("the first {l} at {s}"))
                .collect::<Vec<_>>()
                .join(", ")
        },
        st.mc_limit
            .map_or("all".into(), |l| format!("the first {l}")),
        st.pg.steps,
        st.pg.optimizer,
        st.pg.lr_heads,
        st.pg.batch_size,
        st.pg_init,
    );
    if let Some(l) = st.recon_seq_len {
        md += &format!(
            "`+ls` / `+obs` cells refit on the same calibration tokens redrawn as windows of {l} tokens (`--recon-seq-len`, capped by the model's context), input projections refit: {} (`--refit-inputs`).\n\n",
            st.input_refit()
        );
    }
    if let Some(r) = &st.recover {
        md += &format!(
            "`+recover` cells: after the cut, {} steps of {} windows ({} tokens each, every window of the calibration text in the order of seed {}, each read once; {} tokens in all) of `recover` with {}, loss {}, peak lr {}, the dense model as the teacher; their `plan s` includes it.\n\n",
            r.steps,
            r.batch_size,
            st.calib_seq_len,
            r.seed,
            r.windows_needed() * (st.calib_seq_len - 1),
            match r.adapt {
                lopper_recover::Adapt::Lora { rank, alpha } =>
                    format!("LoRA rank {rank}, alpha {alpha}"),
                lopper_recover::Adapt::Full => "full fine-tuning".into(),
            },
            r.loss,
            r.lr
        );
    }
    md += "`plan s`: seconds to score and plan (a unit method scores once and its later sparsities reuse the scores; a layer method, SLEB or block influence, searches its removal order once, to the run's largest sparsity, in its first cell, and cuts every sparsity from that order). `plan peak MiB`: peak resident memory of the process during that phase, its high-water mark reset before each cell; it includes what the process already held (dense model, calibration windows, memory the allocator kept from earlier cells), and `(+N)` is the rise over the resident memory at the cell's start, what the method itself needed. `eval s`: seconds of the evaluation.\n\n";
    if has_err {
        md += "One-shot methods (alps, sparsegpt, wanda, NAME:PATTERN) zero individual weights of the decoder linears: their sparsity is the fraction of those weights set to zero, the model keeps its shape, and `rel. err` is the mean over the linears of ||XW^T - XW0^T||^2 / ||XW0^T||^2 on the calibration inputs (per linear in cells/<id>/sparsity.json).\n\n";
    }
    md += "| method | sparsity | allocation | kept params | params |";
    for (k, m) in &cols {
        md += &format!(" {k} ({m}) |");
    }
    if has_avg {
        md += " 7-task avg (± s.e.) |";
    }
    if has_err {
        md += " rel. err |";
    }
    md += " plan s | plan peak MiB | eval s |\n|---|---:|---|---:|---:|";
    md += &"---:|".repeat(cols.len() + usize::from(has_avg) + usize::from(has_err));
    md += "---:|---:|---:|\n";
    for c in cells {
        md += &format!(
            "| {}{} | {} | {} | {:.4} | {} |",
            c.method,
            if c.bias_compensation && !c.method.contains('+') {
                " (+bias)"
            } else {
                ""
            },
            c.sparsity,
            c.allocation,
            c.kept_param_ratio,
            c.params
        );
        for (k, m) in &cols {
            let v = c
                .results
                .get(k)
                .and_then(|r| r.get(m))
                .and_then(|v| v.as_f64());
            md += &match v {
                Some(v) if m == "ppl" => format!(" {v:.2} |"),
                Some(v) => format!(" {v:.4} |"),
                None => " – |".into(),
            };
        }
        if has_avg {
            let se = crate::eval::llm_pruner_average_stderr(&c.results)
                .map_or(String::new(), |se| format!(" ± {se:.4}"));
            md += &c
                .llm_pruner_average
                .map_or(" – |".into(), |v| format!(" {v:.4}{se} |"));
        }
        if has_err {
            md += &c.rel_error.map_or(" – |".into(), |v| format!(" {v:.5} |"));
        }
        md += &format!(
            " {:.1} | {} | {:.1} |\n",
            c.seconds_plan,
            match (c.plan_peak_mib, c.plan_start_mib) {
                (Some(p), Some(s)) => format!("{p:.0} (+{:.0})", p - s),
                (Some(p), None) => format!("{p:.0}"),
                _ => "–".into(),
            },
            c.seconds_eval
        );
    }
    let ppl: Vec<&str> = cols
        .iter()
        .filter(|(_, m)| m == "ppl")
        .map(|(k, _)| k.as_str())
        .collect();
    md += &best_per_sparsity(cells, &ppl);
    md += &cuts_side_by_side(cells, &ppl);
    if has_err {
        md += &per_layer_errors(out, cells)?;
    }
    lopper_core::write_atomic(&out.join("results.md"), md.as_bytes())?;
    crate::prune::write_json(
        &out.join("results.json"),
        &serde_json::json!({"settings": st, "cells": cells, "missing": missing}),
    )?;
    // Plots: one line per method over sparsity (dense at 0 joins every line).
    let dense = cells.iter().find(|c| c.method == "dense");
    let line = |value: &dyn Fn(&Cell) -> Option<f64>| -> Vec<(String, Vec<(f64, f64)>)> {
        let mut by: BTreeMap<&str, Vec<(f64, f64)>> = BTreeMap::new();
        for c in cells.iter().filter(|c| c.method != "dense") {
            if let Some(v) = value(c) {
                by.entry(&c.method).or_default().push((c.sparsity, v));
            }
        }
        by.into_iter()
            .map(|(m, mut pts)| {
                if let Some(v) = dense.and_then(value) {
                    pts.push((0.0, v));
                }
                pts.sort_by(|a, b| a.0.total_cmp(&b.0));
                (m.to_string(), pts)
            })
            .collect()
    };
    if let Some((k, _)) = cols.iter().find(|(_, m)| m == "ppl") {
        crate::plots::series(
            &out.join("ppl_vs_sparsity.png"),
            &format!("{k} perplexity vs sparsity"),
            (
                "sparsity (fraction of prunable parameters removed)",
                "perplexity (log scale)",
            ),
            &line(&|c| c.ppl(k)),
            true,
        )?;
    }
    if has_avg {
        crate::plots::series(
            &out.join("accuracy_vs_sparsity.png"),
            "7-task average accuracy vs sparsity",
            (
                "sparsity (fraction of prunable parameters removed)",
                "average accuracy",
            ),
            &line(&|c| c.llm_pruner_average),
            false,
        )?;
    }
    Ok(())
}

/// The per-layer table of the one-shot cells: mean relative reconstruction error of each
/// layer's linears (from each cell's `sparsity.json`).
fn per_layer_errors(out: &Path, cells: &[Cell]) -> Result<String> {
    let mut cols: Vec<(String, Vec<f64>)> = Vec::new();
    for c in cells.iter().filter(|c| c.rel_error.is_some()) {
        let path = out
            .join("cells")
            .join(cell_id(&c.method, c.sparsity))
            .join("sparsity.json");
        let json: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(&path)
                .with_context(|| format!("reading {}", path.display()))?,
        )?;
        let mut per: BTreeMap<u64, (f64, f64)> = BTreeMap::new();
        for l in json["linears"].as_array().into_iter().flatten() {
            let (Some(layer), Some(e)) = (l["layer"].as_u64(), l["rel_error"].as_f64()) else {
                continue;
            };
            let slot = per.entry(layer).or_default();
            *slot = (slot.0 + e, slot.1 + 1.0);
        }
        cols.push((
            format!("{}@{}", c.method, c.sparsity),
            per.values().map(|(s, n)| s / n).collect(),
        ));
    }
    let n = cols.iter().map(|c| c.1.len()).max().unwrap_or(0);
    let mut md = String::from(
        "\nMean relative reconstruction error of each layer's seven linears (one-shot cells):\n\n| layer |",
    );
    for (k, _) in &cols {
        md += &format!(" {k} |");
    }
    md += &format!("\n|---:|{}\n", "---:|".repeat(cols.len()));
    for l in 0..n {
        md += &format!("| {l} |");
        for (_, v) in &cols {
            md += &v.get(l).map_or(" – |".into(), |e| format!(" {e:.4} |"));
        }
        md += "\n";
    }
    Ok(md)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cell(method: &str, sparsity: f64, cut: Option<Reconstruct>, wt2: &[f64]) -> Cell {
        let mut results = serde_json::Map::new();
        for (k, v) in ["wikitext2@128", "wikitext2@2048"].iter().zip(wt2) {
            results.insert(k.to_string(), serde_json::json!({ "ppl": v }));
        }
        Cell {
            method: method.into(),
            sparsity,
            kept_param_ratio: 1.0 - sparsity,
            params: 1,
            allocation: "global".into(),
            bias_compensation: cut == Some(Reconstruct::Bias),
            reconstruct: cut,
            results,
            llm_pruner_average: None,
            rel_error: None,
            seconds_plan: 0.0,
            plan_peak_mib: None,
            plan_start_mib: None,
            seconds_eval: 0.0,
            device: "cpu".into(),
            eval_fingerprint: None,
        }
    }

    #[test]
    fn the_time_left_comes_from_the_cells_computed_whole() {
        use std::time::Duration;
        let mut clock = CellClock::new(4);
        assert_eq!(clock.left(0), None);
        // A resumed cell took only the rest of its evaluation: no rate yet.
        clock.record(true, Duration::from_secs(60));
        assert_eq!(clock.left(1), None);
        clock.record(false, Duration::from_secs(600));
        assert_eq!(clock.left(2), Some(Duration::from_secs(1200)));
        clock.record(false, Duration::from_secs(1000));
        assert_eq!(clock.left(3), Some(Duration::from_secs(800)));
        assert_eq!(clock.left(4), None);
    }

    #[test]
    fn the_best_cell_of_each_sparsity_is_named_with_its_margin() {
        use Reconstruct::Ls;
        // LLM-BIP's per-layer plan kept more than 70%: named, never ranked.
        let mut wide = cell("llm-bip", 0.3, None, &[10.0, 5.0]);
        wide.kept_param_ratio = 0.72;
        let cells = [
            cell("dense", 0.0, None, &[50.0, 20.0]),
            cell("pg+ls", 0.2, Some(Ls), &[80.0, 30.0]),
            cell("flap+ls", 0.2, Some(Ls), &[80.0, 36.0]),
            cell("sleb", 0.2, None, &[100.0, 33.0]),
            cell("pg+ls", 0.3, Some(Ls), &[120.0, 60.0]),
            cell("flap", 0.3, None, &[150.0, 45.0]),
            wide,
        ];
        let md = best_per_sparsity(&cells, &["wikitext2@128", "wikitext2@2048"]);
        let rows: Vec<&str> = md.lines().filter(|l| l.starts_with("| ")).collect();
        assert_eq!(
            rows,
            [
                "| sparsity | wikitext2@128 | wikitext2@2048 |",
                "| 0.2 | **flap+ls = pg+ls** 80.00 (1.60x dense); next sleb 100.00 (1.25x) | **pg+ls** 30.00 (1.50x dense); next sleb 33.00 (1.10x) |",
                "| 0.3 | **pg+ls** 120.00 (2.40x dense); next flap 150.00 (1.25x) | **flap** 45.00 (2.25x dense); next pg+ls 60.00 (1.33x) |",
            ],
            "{md}"
        );
        assert!(
            md.contains("- sparsity 0.3, not compared: llm-bip keeps 0.7200 of the parameters (wikitext2@128 10.00)"),
            "{md}"
        );
        // A column no cell has reads `–`; without perplexity columns or pruned cells, nothing.
        let md = best_per_sparsity(&cells[..2], &["wikitext2@128", "ptb@128"]);
        assert!(
            md.contains("| 0.2 | **pg+ls** 80.00 (1.60x dense) | – |"),
            "{md}"
        );
        assert_eq!(best_per_sparsity(&cells, &[]), "");
        assert_eq!(best_per_sparsity(&cells[..1], &["wikitext2@128"]), "");
    }

    #[test]
    fn the_cuts_of_a_plan_stand_side_by_side_with_their_order() {
        use Reconstruct::{Ls, None as Plain, Obs};
        // FLAP as its paper cuts: bias, with no suffix and no `reconstruct` (an older cell).
        let mut flap = cell("flap", 0.2, None, &[100.0, 40.0]);
        flap.bias_compensation = true;
        let cells = [
            cell("dense", 0.0, None, &[50.0, 20.0]),
            flap,
            cell("flap+none", 0.2, Some(Plain), &[120.0, 39.0]),
            cell("flap+ls", 0.2, Some(Ls), &[90.0, 35.0]),
            cell("pg+ls", 0.2, Some(Ls), &[80.0, 30.0]),
            cell("pg+obs", 0.2, Some(Obs), &[79.0, 31.0]),
            // One cut alone, a recovered cell: no row.
            cell("sleb", 0.2, Some(Plain), &[130.0, 60.0]),
            cell("pg+ls+recover", 0.2, Some(Ls), &[60.0, 25.0]),
        ];
        let md = cuts_side_by_side(&cells, &["wikitext2@128", "wikitext2@2048"]);
        let rows: Vec<&str> = md.lines().filter(|l| l.starts_with("| ")).collect();
        assert_eq!(
            rows,
            [
                "| method | sparsity | none | bias | ls | obs | ls < bias < none |",
                "| flap | 0.2 | 120.00 / 39.00 | 100.00 / 40.00 | 90.00 / 35.00 | – | yes / no |",
                "| pg | 0.2 | – | – | 80.00 / 30.00 | 79.00 / 31.00 | – / – |",
            ],
            "{md}"
        );
        assert!(
            md.contains("perplexity wikitext2@128 / wikitext2@2048"),
            "{md}"
        );
        // Without FLAP's cells, PG's row alone; with no plan cut two ways, nothing.
        let pg = cuts_side_by_side(&cells[4..], &["wikitext2@128"]);
        assert!(
            pg.contains("| pg | 0.2 | 80.00 | 79.00 | – |") && !pg.contains("flap"),
            "{pg}"
        );
        assert_eq!(cuts_side_by_side(&cells[5..], &["wikitext2@128"]), "");
    }
}
