//! `cargo xtask prune` and `cargo xtask export`: search a plan, cut the model, write it out.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use burn::tensor::backend::Backend;
use clap::Args;
use lopper_core::{MaskPlan, UnitKind};
use lopper_data::Sampler;
use lopper_importance::{Method, MethodSettings};
use lopper_model::{Llama, Tokenizer};
use lopper_policy::{Baseline, Budget, Estimator, Judge, Optimizer, PgConfig, Schedule};
use lopper_sparse::InputRefit;

use crate::reconstruct::Reconstruct;
use lopper_surgery::{ExportFormat, ExportOptions};

use crate::backend::{DeviceList, Offload, PlacedJob, run_on_devices};
use crate::eval::parse_tasks;

#[derive(Debug, Clone, Args)]
pub struct PruneArgs {
    /// `default`, a .gguf file, a model directory, or hub:ORG/NAME[@REV].
    #[arg(long, default_value = "default")]
    pub model: String,
    /// Storage type of the weight matrices: f32, bf16 or f16 (activations and reductions stay f32).
    #[arg(long, default_value = "f32")]
    pub dtype: lopper_core::Dtype,
    /// pg (policy gradient) or a metric method: magnitude (L2), magnitude-l1, random, wanda-sp,
    /// flap, block-influence (ShortGPT), sleb, llm-pruner (Taylor, autodiff), llm-bip,
    /// mini-llm (SPSA, forward only), ifso; or a one-shot unstructured / N:M method: alps,
    /// sparsegpt, wanda (and magnitude with --pattern).
    #[arg(long, default_value = "pg")]
    pub method: String,
    /// One-shot methods: unstructured (a --sparsity fraction of every matrix) or N:M (2:4, 4:8).
    #[arg(long)]
    pub pattern: Option<String>,
    /// Metric methods: per-layer (every layer keeps the same fraction of its KV groups and of
    /// its channels), per-layer-params (every layer keeps the same fraction of its parameters:
    /// channels make up for the rounding of KV groups), global (per type over all layers) or
    /// global-params (all units ranked together by parameter weight, FLAP's
    /// AL-AM). Default: the method's own (global-params for flap, per-layer otherwise).
    #[arg(long)]
    pub allocation: Option<lopper_core::Allocation>,
    /// Calibration windows metric methods (and the metric init of pg) read.
    #[arg(long, default_value_t = 64)]
    pub metric_samples: usize,
    /// Unit metric methods: keep the first and last N layers whole and prune the others harder
    /// to the same overall sparsity (LLM-Pruner's layer range). Default: 1 for llm-pruner,
    /// 0 otherwise.
    #[arg(long)]
    pub skip_layers: Option<usize>,
    /// llm-pruner: element1 (|w g|, the reference default) or element2 (|w g - w F w / 2|
    /// with the Fisher diagonal from one backward pass per calibration window).
    #[arg(long, default_value = "element1")]
    pub taylor: String,
    /// mini-llm: SPSA perturbation directions per calibration batch.
    #[arg(long, default_value_t = 4)]
    pub spsa_samples: usize,
    /// mini-llm: SPSA perturbation size.
    #[arg(long, default_value_t = 1e-3)]
    pub spsa_eps: f64,
    /// ifso: lambda of H_ww^-1 ~ I / lambda (scales all scores alike; must be positive).
    #[arg(long, default_value_t = 1e-4)]
    pub ifso_lambda: f64,
    /// ifso: calibration mini-batches averaged.
    #[arg(long, default_value_t = 2)]
    pub ifso_batches: usize,
    /// Fraction of the prunable parameters to REMOVE (0.3 keeps 70%).
    #[arg(long)]
    pub sparsity: f64,
    /// pg settings to start from: `lopper` (the defaults measured best; see the README) or
    /// `reference` (the paper's code: heads and channels, per-type budget, SGD lr 2e-3, 40 steps
    /// of 2 masks x 4 windows, moving-average baseline, Wanda-sp sigmap init, no compensation,
    /// no held-out choice). Every flag below overrides the preset.
    #[arg(long, default_value = "lopper")]
    pub preset: String,
    /// Units searched: heads (KV groups), channels, layers (preset lopper: all three).
    #[arg(long)]
    pub units: Option<String>,
    /// per-type (each unit type keeps the same fraction) or params (one parameter budget).
    #[arg(long)]
    pub budget: Option<String>,
    /// auto (preset lopper: the plan of FLAP, LLM-BIP (exact size, or its paper counts fitted
    /// by its global order), block influence or a mix of block influence's layers and FLAP's
    /// units, whichever has the lowest held-out loss), a metric method (its plan at --sparsity
    /// under preset lopper, exact size for a per-layer method, its scores' per-layer sigmap
    /// under preset reference: wanda-sp, magnitude, magnitude-l1, flap, llm-pruner, llm-bip,
    /// mini-llm, ifso; layer methods sleb and block-influence start from their plan), uniform,
    /// random (sigmap of N(0,1)), a scores JSON file (UnitScores, e.g. a metric run's
    /// scores.json), or a plan.json (preset lopper: that plan; reference: kept units score 1,
    /// removed 0, then sigmap per layer).
    #[arg(long)]
    pub init: Option<String>,
    /// Start from the init's plan, so that step 0's plan is that plan (preset lopper), or
    /// from the per-layer sigmap of its scores (preset reference).
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    pub plan_start: Option<bool>,
    /// ref: (L-b)(m-s)/sqrt(s(1-s)) as the reference code; score: the exact score function;
    /// regression: a linear surrogate of the loss fitted to the pairs' loss differences (with
    /// --channel-block and --optimizer sgd; docs/methods.md 1.5).
    #[arg(long)]
    pub estimator: Option<String>,
    /// sgd (reference) or adam (lopper).
    #[arg(long)]
    pub optimizer: Option<String>,
    /// Baseline of the estimator: loo (leave-one-out among the step's masks; lopper) or moving
    /// (moving average across steps; reference).
    #[arg(long)]
    pub baseline: Option<String>,
    /// Sample each step's masks in antithetic pairs (`u` and `1 - u`).
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    pub antithetic: Option<bool>,
    /// Keep every probability in [F, 1 - F] so a unit driven out can come back (reference 0).
    #[arg(long)]
    pub prob_floor: Option<f64>,
    /// Search MLP channels in blocks of N, ordered by the start (0 or 1: one unit per channel;
    /// needs --budget params).
    #[arg(long)]
    pub channel_block: Option<usize>,
    /// Search each layer's MLP width (its --channel-block blocks share one probability, and
    /// a mask keeps the first of them in the start's order) instead of each block.
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    pub widths: Option<bool>,
    /// Score every sampled mask with its kept o_proj / down_proj refit from the dense model's
    /// input statistics (a one-pass stand-in for --reconstruct ls) instead of the bias
    /// compensation.
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    pub refit_proxy: Option<bool>,
    /// A plan start's band LO,HI: kept units start in [LO, HI], removed ones in [1-HI, 1-LO]
    /// (default 0.85,0.98; nearer 1, sampled masks stay nearer the plan).
    #[arg(long, value_parser = parse_band)]
    pub start_band: Option<(f64, f64)>,
    /// How the parameter budget projects the probabilities after each update: shift (every
    /// unit by the same amount; the reference) or cost (each unit by its share of the
    /// budget's parameters; docs/methods.md 1.7).
    #[arg(long)]
    pub projection: Option<String>,
    /// Entropy anneal: over the last N steps every logit grows 4-fold, so the sampled masks
    /// converge to the final plan (0: off).
    #[arg(long)]
    pub anneal: Option<usize>,
    /// Steps at the start that score masks without updating (the regression estimator
    /// collects its pairs; about one per unit); the schedule runs over the rest.
    #[arg(long)]
    pub warmup: Option<usize>,
    /// Calibration windows (the last N) held out from the search; the final plan is the
    /// search's or the initial plan, whichever has the lower loss on them (0: the search's).
    /// Preset lopper: 16, at most a quarter of --calib-samples.
    #[arg(long)]
    pub held_out: Option<usize>,
    /// How the held-out choice (and `--init auto`) scores its candidate plans: `masked` (as the
    /// search scores masks), `ls` (the best 3 by masked loss under either compensation rule
    /// are each cut and refit by least squares as `--reconstruct ls` cuts, on the first seven
    /// eighths of the cut's calibration windows (--recon-seq-len), and scored on the last
    /// eighth: the model the cut ships, on text its refit did not see; about 90 s per refit on
    /// the default model on 2 CPU cores; needs --reconstruct ls or obs), or `auto` (the
    /// default: ls under an ls or obs cut from sparsity 0.4, where on the default model it
    /// picks a start the masked loss ranks fifth and cuts WikiText-2 perplexity by 11% at 50%;
    /// masked below, where it shipped the same plan at 30% and traded 3% @128 for 6% @2048 at
    /// 20%).
    #[arg(long, default_value = "auto")]
    pub judge: String,
    /// Calibration data: c4, wikitext2, ptb, or a .json.gz/.jsonl/.txt file.
    #[arg(long, default_value = "c4")]
    pub calib: String,
    /// Calibration windows.
    #[arg(long, default_value_t = 256)]
    pub calib_samples: usize,
    /// concat-chunks (PG reference) or random-windows (Wanda/SparseGPT).
    #[arg(long, default_value = "concat-chunks")]
    pub sampler: String,
    /// Tokens per calibration window.
    #[arg(long, default_value_t = 128)]
    pub seq_len: usize,
    /// Windows per step and per forward of the metric methods (preset lopper 8, reference 4).
    #[arg(long)]
    pub batch_size: Option<usize>,
    /// Allow --seq-len (and --eval's 128-token windows) beyond the model's trained positions
    /// (max_position_embeddings).
    #[arg(long)]
    pub allow_longer_context: bool,
    /// Policy-gradient steps (preset lopper 60, reference 40).
    #[arg(long)]
    pub steps: Option<usize>,
    /// Masks sampled per step (K, default 2).
    #[arg(long)]
    pub samples_per_step: Option<usize>,
    /// Learning rate of the keep-probabilities, all unit types (preset lopper 0.01, reference
    /// 2e-3).
    #[arg(long)]
    pub lr: Option<f64>,
    /// Learning rate of KV-group probabilities (default: --lr).
    #[arg(long)]
    pub lr_heads: Option<f64>,
    /// Learning rate of channel probabilities (default: --lr).
    #[arg(long)]
    pub lr_channels: Option<f64>,
    /// Learning rate of layer probabilities (default: --lr).
    #[arg(long)]
    pub lr_layers: Option<f64>,
    /// cosine (to 0, the default) or constant.
    #[arg(long)]
    pub schedule: Option<String>,
    /// Seed of calibration sampling and mask sampling.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Seed of the search's mask sampling alone (default: --seed), so that runs on the same
    /// calibration windows measure the search's own spread.
    #[arg(long)]
    pub search_seed: Option<u64>,
    /// Checkpoint every N steps (and on Ctrl-C).
    #[arg(long, default_value_t = 10)]
    pub checkpoint_every: usize,
    /// Evaluate the pruned model on these tasks (as `cargo xtask eval --tasks`).
    #[arg(long)]
    pub eval: Option<String>,
    /// Limit for --eval tasks (first N windows / examples).
    #[arg(long)]
    pub eval_limit: Option<usize>,
    /// Stop (as Ctrl-C does: checkpoint, then exit with an error) once this many steps are done.
    #[arg(long, hide = true)]
    pub stop_after: Option<usize>,
    /// FLAP-style bias compensation: the calibration mean of every removed o_proj / down_proj
    /// input goes into that projection's bias, and a block removed whole carries its mean output
    /// into the previous kept projection. pg scores every sampled mask with it: `auto` (pg's
    /// default under preset lopper) judges the automatic start's candidates with and without
    /// it on the held-out windows and searches under the better rule. `--bias-compensation` or
    /// `--bias-compensation true|false|auto`; what the final cut does is --reconstruct's choice.
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    pub bias_compensation: Option<String>,
    /// What the cut does to the kept weights: `none` (the dense weights of the kept units),
    /// `bias` (FLAP's bias compensation, each block's kept only where it lowers the loss on
    /// the last 16 calibration windows by more than two standard errors of the per-window
    /// differences; the choices go to bias-compensation.json) or `ls` (every kept o_proj / down_proj refit, layer by
    /// layer, by damped least squares so the pruned residual stream follows the dense one on the
    /// calibration windows; on the default model at 30% it gives 21% lower WikiText-2
    /// perplexity than `bias` for pg and 34% for flap, for about two more CPU minutes), or
    /// `obs` (`ls`, with each layer's removed KV groups and MLP channels chosen by OBS within
    /// the plan's per-layer counts: greedily, by their exact cost to the layer's least-squares
    /// objective).
    /// Default: ls.
    #[arg(long)]
    pub reconstruct: Option<String>,
    /// With --reconstruct ls|obs: which layers also get their input projections (q/k/v,
    /// gate/up) refit so that from the pruned model's inputs they give what the dense layer's
    /// give from the dense inputs: `next` (the default: the layer after each block removed
    /// whole), `all` (every layer after the first change; a bare `--refit-inputs`) or `off`.
    /// On the default model `all` gained nothing on FLAP's plan, which removes no block, and
    /// lowered WikiText-2 perplexity where layers go: SLEB at 20% 117.16 -> 109.72, PG at 30%
    /// 142.68 -> 131.51 @128 (docs/methods.md section 5).
    #[arg(long, num_args = 0..=1, default_missing_value = "all")]
    pub refit_inputs: Option<InputRefit>,
    /// With --reconstruct ls|obs: tokens per window of the calibration the refit reads (the
    /// same tokens as --calib-samples x --seq-len, redrawn in longer windows; default 512,
    /// capped by the model's context). Windows of 128 tokens fit the short-context statistics
    /// only: on the default model 512 lowered WikiText-2 perplexity by 10% @128 and 26% @2048.
    #[arg(long)]
    pub recon_seq_len: Option<usize>,
    /// Continue the run in --out from its checkpoint.
    #[arg(long)]
    pub resume: bool,
    /// Replace an existing --out folder.
    #[arg(long)]
    pub force: bool,
    /// cpu, cuda or cuda:N, or several GPUs (cuda:0,cuda:1): the decoder layers split over
    /// them in balanced contiguous runs.
    #[arg(long, default_value = "cpu")]
    pub device: DeviceList,
    /// `cpu`: keep the dense model's decoder layers out of device memory and read each onto
    /// its device for its turn in every pass (scoring, search, surgery, reconstruction); the
    /// device holds the embedding, the LM head, one dense layer and the pruned model being
    /// built. Not for the methods that need every weight at once (magnitude, llm-pruner, ifso,
    /// mini-llm).
    #[arg(long, value_name = "WHERE")]
    pub offload: Option<Offload>,
    /// Run folder: plan.json, model/, report.md, kept_per_layer.png, eval.json; pg adds
    /// curve.jsonl, loss.png, checkpoint.json; metric methods add scores.json.
    #[arg(long)]
    pub out: PathBuf,
}

pub fn parse_band(s: &str) -> Result<(f64, f64)> {
    let v: Vec<f64> = s
        .split(',')
        .map(|x| x.trim().parse::<f64>())
        .collect::<std::result::Result<_, _>>()
        .map_err(|e| anyhow::anyhow!("--start-band `{s}`: {e}; give LO,HI such as 0.97,0.99"))?;
    match v[..] {
        [lo, hi] => Ok((lo, hi)),
        _ => bail!("--start-band `{s}`: give two numbers LO,HI such as 0.97,0.99"),
    }
}

fn parse_units(s: &str) -> Result<Vec<UnitKind>> {
    s.split(',')
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .map(|t| match t {
            "heads" => Ok(UnitKind::KvGroup),
            "channels" => Ok(UnitKind::Channel),
            "layers" => Ok(UnitKind::Layer),
            o => bail!("--units: unknown unit `{o}`; use heads, channels, layers"),
        })
        .collect()
}

impl PruneArgs {
    fn pg_config(&self) -> Result<PgConfig> {
        let base = PgConfig::preset(&self.preset, self.sparsity)?;
        let lr = self.lr;
        let compensation = self.compensation()?;
        // Small calibration sets hold out a quarter at most.
        let held_out = self
            .held_out
            .unwrap_or(base.held_out.min(self.calib_samples / 4));
        let cfg = PgConfig {
            sparsity: self.sparsity,
            units: match &self.units {
                Some(u) => parse_units(u)?,
                None => base.units.clone(),
            },
            budget: match &self.budget {
                Some(b) => b.parse::<Budget>()?,
                None => base.budget,
            },
            estimator: match self.estimator.as_deref() {
                None => base.estimator,
                Some("ref") => Estimator::Ref,
                Some("score") => Estimator::Score,
                Some("regression") => Estimator::Regression,
                Some(o) => bail!("--estimator `{o}`: use ref, score or regression"),
            },
            optimizer: match self.optimizer.as_deref() {
                None => base.optimizer,
                Some("sgd") => Optimizer::Sgd,
                Some("adam") => Optimizer::Adam,
                Some(o) => bail!("--optimizer `{o}`: use sgd or adam"),
            },
            lr_heads: self.lr_heads.or(lr).unwrap_or(base.lr_heads),
            lr_channels: self.lr_channels.or(lr).unwrap_or(base.lr_channels),
            lr_layers: self.lr_layers.or(lr).unwrap_or(base.lr_layers),
            schedule: match self.schedule.as_deref() {
                None => base.schedule,
                Some("cosine") => Schedule::Cosine,
                Some("constant") => Schedule::Constant,
                Some(o) => bail!("--schedule `{o}`: use cosine or constant"),
            },
            steps: self.steps.unwrap_or(base.steps),
            samples_per_step: self.samples_per_step.unwrap_or(base.samples_per_step),
            batch_size: self.batch_size.unwrap_or(base.batch_size),
            baseline: match &self.baseline {
                Some(b) => b.parse::<Baseline>()?,
                None => base.baseline,
            },
            antithetic: self.antithetic.unwrap_or(base.antithetic),
            prob_floor: self.prob_floor.unwrap_or(base.prob_floor),
            channel_block: self.channel_block.unwrap_or(base.channel_block),
            widths: self.widths.unwrap_or(base.widths),
            refit_proxy: self.refit_proxy.unwrap_or(base.refit_proxy),
            start_band: self.start_band.or(base.start_band),
            warmup: self.warmup.unwrap_or(base.warmup),
            projection: match &self.projection {
                Some(p) => p.parse()?,
                None => base.projection,
            },
            anneal: self.anneal.unwrap_or(base.anneal),
            compensation: compensation.map_or(base.compensation, |(on, _)| on),
            compensation_auto: compensation.map_or(base.compensation_auto, |(_, auto)| auto),
            held_out,
            // `auto` judges by least squares only where a held-out choice precedes a refit cut.
            judge: Judge::parse(
                &self.judge,
                self.sparsity,
                held_out > 0 && self.cut()?.refits(),
            )?,
            seed: self.search_seed.unwrap_or(self.seed),
            ..base
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// `--bias-compensation`: `(on, decided at the start)`, or the preset's (`None`).
    fn compensation(&self) -> Result<Option<(bool, bool)>> {
        Ok(match self.bias_compensation.as_deref() {
            None => None,
            Some("true") => Some((true, false)),
            Some("false") => Some((false, false)),
            Some("auto") => Some((true, true)),
            Some(o) => bail!("--bias-compensation `{o}`: use true, false or auto"),
        })
    }

    /// `--bias-compensation` of a metric method (`auto` is pg's alone).
    fn metric_compensation(&self) -> Result<Option<bool>> {
        Ok(match self.compensation()? {
            Some((_, true)) if self.method != "pg" => bail!(
                "--bias-compensation auto chooses the rule of a pg search; a metric method takes true or false"
            ),
            c => c.map(|(on, _)| on),
        })
    }

    /// `--reconstruct`, or its default (ls).
    fn cut(&self) -> Result<Reconstruct> {
        self.reconstruct.as_deref().unwrap_or("ls").parse()
    }

    /// `--refit-inputs` under the cut, or its default.
    fn input_refit(&self) -> Result<InputRefit> {
        self.cut()?.check_refit_inputs(self.refit_inputs)
    }

    /// `--init`, or the preset's.
    fn init(&self) -> &str {
        match (&self.init, self.preset.as_str(), self.plan_start) {
            (Some(i), _, _) => i,
            (None, "reference", _) | (None, _, Some(false)) => "wanda-sp",
            (None, _, _) => "auto",
        }
    }
}

/// The one-shot (unstructured / N:M) method and pattern, when `--method` or `--pattern` asks
/// for one: alps, sparsegpt, wanda, or magnitude with a `--pattern`.
fn one_shot(
    a: &PruneArgs,
) -> Result<Option<(lopper_sparse::SparseMethod, lopper_sparse::Pattern)>> {
    let is_one_shot = ["alps", "sparsegpt", "wanda"].contains(&a.method.as_str())
        || (a.pattern.is_some() && a.method == "magnitude");
    if !is_one_shot {
        anyhow::ensure!(
            a.pattern.is_none(),
            "--pattern is for the one-shot methods alps, sparsegpt, wanda and magnitude; {} prunes whole units",
            a.method
        );
        return Ok(None);
    }
    let pattern =
        lopper_sparse::Pattern::parse(a.pattern.as_deref().unwrap_or("unstructured"), a.sparsity)?;
    anyhow::ensure!(
        (pattern.sparsity() - a.sparsity).abs() < 1e-9,
        "--pattern {} zeroes {} of the weights but --sparsity is {}; pass --sparsity {}",
        a.pattern.as_deref().unwrap_or(""),
        pattern.sparsity(),
        a.sparsity,
        pattern.sparsity()
    );
    Ok(Some((a.method.parse()?, pattern)))
}

pub fn run(args: PruneArgs) -> Result<()> {
    let sparse = one_shot(&args)?;
    if sparse.is_none() {
        crate::methods::check_method(&args.method)?;
    }
    // Validate everything before loading anything.
    let cfg = args.pg_config()?;
    args.metric_compensation()?;
    args.input_refit()?;
    anyhow::ensure!(
        cfg.judge == Judge::Masked || args.cut()?.refits(),
        "--judge ls scores least-squares cuts: it needs --reconstruct ls or obs, not {}",
        args.cut()?
    );
    if let Some(r) = &args.reconstruct {
        r.parse::<Reconstruct>()?;
        anyhow::ensure!(
            sparse.is_none(),
            "--reconstruct is for structured methods; the one-shot methods ({}) reconstruct every matrix already",
            args.method
        );
    }
    let sampler: Sampler = args.sampler.parse()?;
    let eval_tasks = args.eval.as_deref().map(parse_tasks).transpose()?;
    anyhow::ensure!(args.calib_samples > 0, "--calib-samples must be at least 1");
    anyhow::ensure!(
        args.method != "pg" || cfg.held_out < args.calib_samples,
        "--held-out {} leaves no calibration window for the search out of --calib-samples {}; raise --calib-samples or lower --held-out",
        cfg.held_out,
        args.calib_samples
    );
    if args.offload.is_some() && sparse.is_none() {
        let scorer = if args.method == "pg" {
            args.init()
        } else {
            args.method.as_str()
        };
        refuse_offloaded(scorer)?;
    }
    check_out(&args.out, args.resume, args.force, "checkpoint.json")?;
    let device = args.device.clone();
    run_on_devices(
        &device,
        PruneJob {
            args,
            cfg,
            sampler,
            eval_tasks,
            sparse,
        },
    )
}

/// Checks a run folder before any work: an existing one is continued (`resume`, when it holds
/// `checkpoint`) or replaced (`force`, by [`prepare_out`] once the run is known to fit).
pub fn check_out(out: &Path, resume: bool, force: bool, checkpoint: &str) -> Result<()> {
    if out.exists() {
        if resume {
            anyhow::ensure!(
                out.join(checkpoint).is_file(),
                "--resume: {} has no {checkpoint} to continue from",
                out.display()
            );
        } else if !force {
            bail!(
                "{} already exists; pass --resume to continue its run, --force to start over, or choose another --out",
                out.display()
            );
        }
    } else if resume {
        bail!(
            "--resume: {} does not exist; start the run without --resume",
            out.display()
        );
    }
    Ok(())
}

/// The run folder, after every check passed: an existing one is replaced under `force` and
/// kept under `resume`. Refused, before anything is removed, when the folder's file system
/// cannot hold the `need` bytes the run will write there (`what`), counting the bytes a
/// replaced folder frees.
pub fn prepare_out(out: &Path, resume: bool, force: bool, need: u64, what: &str) -> Result<()> {
    let replaced = if force && !resume {
        lopper_core::disk::tree_bytes(out)
    } else {
        0
    };
    lopper_core::disk::ensure_disk_space(out, need, replaced, what)?;
    if out.exists() && force && !resume {
        std::fs::remove_dir_all(out).with_context(|| format!("removing {}", out.display()))?;
    }
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    Ok(())
}

/// About what `prune` writes: the model in its own storage type, the decoder's linear layers
/// cut by `sparsity` when the pruning is structured (unstructured pruning keeps dense
/// matrices), plus a margin for the tokenizer, plan, report and plots.
fn output_bytes(
    shape: &lopper_core::ModelShape,
    dtype: lopper_core::Dtype,
    sparsity: f64,
    unstructured: bool,
) -> u64 {
    let cut = if unstructured {
        0.0
    } else {
        shape.decoder_linear_params() as f64 * sparsity.clamp(0.0, 1.0)
    };
    let params = (shape.num_params() as f64 - cut).max(0.0) as u64;
    params * dtype.bytes() + (32 << 20)
}

/// `--offload` refuses a structured method (or PG's init) that needs every decoder weight at
/// once.
pub fn refuse_offloaded(scorer: &str) -> Result<()> {
    anyhow::ensure!(
        !RESIDENT_ONLY.contains(&scorer),
        "--offload cpu: {scorer} needs every decoder weight at once (its scores come from all the weights together, or from gradients through a trainable copy of the model), which offloaded layers are not; use pg (with --init auto, flap, llm-bip, wanda-sp, block-influence or sleb), flap, wanda-sp, llm-bip, block-influence, sleb, random or a one-shot method, or drop --offload"
    );
    Ok(())
}

/// Methods whose scores read every decoder weight at once; `--offload` refuses them.
const RESIDENT_ONLY: [&str; 5] = [
    "magnitude",
    "magnitude-l1",
    "llm-pruner",
    "ifso",
    "mini-llm",
];

struct PruneJob {
    sparse: Option<(lopper_sparse::SparseMethod, lopper_sparse::Pattern)>,
    args: PruneArgs,
    cfg: PgConfig,
    sampler: Sampler,
    eval_tasks: Option<Vec<crate::eval::Task>>,
}

pub fn write_json(path: &Path, v: &impl serde::Serialize) -> Result<()> {
    let mut s = serde_json::to_string_pretty(v)?;
    s.push('\n');
    lopper_core::write_atomic(path, s.as_bytes())?;
    Ok(())
}

impl PlacedJob for PruneJob {
    fn run<B: Backend>(self, devices: Vec<B::Device>, device_name: String) -> Result<()> {
        let a = &self.args;
        let started = Instant::now();
        let loaded = crate::loading::load_placed_model::<B>(
            &a.model,
            a.dtype,
            &devices,
            a.offload.is_some(),
        )?;
        let (model, tok) = (&loaded.model, &loaded.tokenizer);
        if model.is_offloaded() {
            // The pruned model is built resident, next to the embedding, the head and the one
            // dense layer in flight: it must fit too, before any work.
            crate::guard::pruned_fits::<B>(
                model.shape(),
                model.dtype(),
                if self.sparse.is_some() {
                    0.0
                } else {
                    a.sparsity
                },
                &devices,
                &a.model,
            )?;
        }
        crate::guard::context(
            model.shape(),
            a.seq_len,
            "--seq-len",
            a.allow_longer_context,
        )?;
        let batch_size = self.cfg.batch_size;
        crate::guard::forward_fits(model.shape(), batch_size, a.seq_len, "calibration")?;
        // The statistics the cut and the proxy hold, before the output folder is made.
        let how = a.cut()?;
        let inputs = how.check_refit_inputs(a.refit_inputs)?;
        if self.sparse.is_none() && how.refits() {
            crate::guard::ls_fits(model.shape(), how == Reconstruct::Obs, inputs)?;
        }
        if a.method == "pg" && self.cfg.refit_proxy {
            crate::guard::proxy_fits(model.shape())?;
        }
        if let Some(tasks) = &self.eval_tasks {
            crate::eval::EvalSettings::for_report(a.eval_limit, a.allow_longer_context)
                .guard(model.shape(), tasks)?;
        }
        prepare_out(
            &a.out,
            a.resume,
            a.force,
            output_bytes(
                model.shape(),
                model.dtype(),
                a.sparsity,
                self.sparse.is_some(),
            ),
            "the pruned model",
        )?;
        let calib = crate::methods::draw_calibration(
            tok,
            &a.calib,
            self.sampler,
            a.calib_samples,
            a.seq_len,
            a.seed,
        )?;
        let ls_calib = if self.sparse.is_none() && how.refits() {
            crate::reconstruct::ls_calibration(
                tok,
                model.shape(),
                &a.calib,
                self.sampler,
                (a.calib_samples, a.seq_len, batch_size),
                a.seed,
                a.recon_seq_len,
            )?
        } else {
            None
        };
        let resolved = serde_json::json!({
            "command": std::env::args().collect::<Vec<_>>().join(" "),
            "model": loaded.info,
            "dtype": a.dtype,
            "method": a.method,
            "pg": self.cfg,
            "init": a.init(),
            "calibration": calib.info,
            "ls_calibration": ls_calib.as_ref().map(|(c, _)| &c.info),
            "device": device_name,
            "offload": a.offload.is_some(),
            "checkpoint_every": a.checkpoint_every,
        });
        if let Some((method, pattern)) = self.sparse {
            return crate::sparse::run(
                a,
                model,
                tok,
                &calib.windows,
                method,
                pattern,
                &resolved,
                self.eval_tasks.as_deref(),
                &device_name,
                started,
            );
        }
        let keep = 1.0 - a.sparsity;
        let settings = MethodSettings {
            batch_size,
            seed: a.seed,
            allocation: a.allocation,
            bias_compensation: a.metric_compensation()?,
            sleb_barrier: 1,
            skip_layers: a.skip_layers,
            taylor: a.taylor.parse()?,
            spsa: lopper_importance::SpsaSettings {
                samples: a.spsa_samples,
                eps: a.spsa_eps,
                seed: a.seed,
            },
            ifso: lopper_importance::IfsoSettings {
                lambda: a.ifso_lambda,
                batches: a.ifso_batches,
            },
        };
        let mut curve_summary = None;
        let (plan, mut compensation) = if a.method == "pg" {
            anyhow::ensure!(
                a.allocation.is_none(),
                "--allocation is for metric methods; pg allocates globally through its budget (--budget)"
            );
            let out = crate::methods::run_pg(
                model,
                &calib.windows,
                &self.cfg,
                &crate::methods::PgInit {
                    name: a.init(),
                    plan_start: a.plan_start.unwrap_or(a.preset != "reference"),
                    metric_samples: a.metric_samples,
                    settings: &settings,
                },
                &crate::methods::PgRun {
                    dir: &a.out,
                    resume: a.resume,
                    stop_after: a.stop_after,
                    checkpoint_every: a.checkpoint_every,
                    meta: &resolved,
                    refit: ls_calib.as_ref().map(|(c, b)| (&c.windows[..], *b, inputs)),
                },
            )?;
            curve_summary = out.curve;
            (out.plan, out.means.map(|m| (m.o_proj, m.down_proj)))
        } else {
            let method: Method = a.method.parse()?;
            let mp = crate::methods::metric_plan(
                model,
                &calib.windows,
                method,
                keep,
                a.metric_samples,
                &settings,
            )?;
            if let Some(scores) = &mp.scores {
                write_json(&a.out.join("scores.json"), scores)?;
            }
            (mp.plan, mp.compensation)
        };
        if compensation.is_none() && how == Reconstruct::Bias {
            let n = calib.windows.len().min(a.metric_samples);
            compensation = Some(lopper_importance::input_means(
                model,
                &calib.windows[..n],
                batch_size,
            )?);
        }
        let means = compensation
            .map(|(o_proj, down_proj)| lopper_surgery::InputMeans { o_proj, down_proj });
        finish(
            a,
            model,
            tok,
            plan,
            Cut {
                how,
                inputs,
                means: means.as_ref(),
                // `ls_calib` exists only for a refitting cut.
                windows: ls_calib
                    .as_ref()
                    .map_or(&calib.windows, |(c, _)| &c.windows),
                batch_size: ls_calib.as_ref().map_or(batch_size, |(_, b)| *b),
            },
            &resolved,
            curve_summary,
            self.eval_tasks.as_deref(),
            &device_name,
            started,
        )
    }
}

/// How `finish` cuts the plan: `--reconstruct` and what it reads.
struct Cut<'a> {
    how: Reconstruct,
    /// The input refit of an `ls` / `obs` cut.
    inputs: InputRefit,
    means: Option<&'a lopper_surgery::InputMeans>,
    windows: &'a [Vec<u32>],
    batch_size: usize,
}

#[allow(clippy::too_many_arguments)]
fn finish<B: Backend>(
    a: &PruneArgs,
    model: &Llama<B>,
    tok: &Tokenizer,
    mut plan: MaskPlan,
    cut: Cut,
    resolved: &serde_json::Value,
    curve: crate::methods::CurveSummary,
    eval_tasks: Option<&[crate::eval::Task]>,
    device_name: &str,
    started: Instant,
) -> Result<()> {
    plan.meta.insert("seed".into(), a.seed.into());
    let warnings = plan.degeneracies();
    for w in &warnings {
        tracing::warn!("degenerate model at sparsity {}: {w}", a.sparsity);
    }
    if !warnings.is_empty() {
        plan.meta.insert("warnings".into(), warnings.clone().into());
    }
    plan.meta
        .insert("kept_param_ratio".into(), plan.kept_param_ratio().into());
    // Written before the cut too, so a failing reconstruction does not lose the plan.
    write_json(&a.out.join("plan.json"), &plan)?;
    crate::plots::kept_per_layer(&a.out.join("kept_per_layer.png"), &plan)?;
    let curve_path = a.out.join("curve.jsonl");
    if curve_path.is_file() {
        let records: Vec<lopper_policy::StepRecord> = std::fs::read_to_string(&curve_path)?
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect();
        crate::plots::loss_curve(&a.out.join("loss.png"), &records)?;
    }
    let done = crate::reconstruct::cut(
        model,
        &plan,
        cut.how,
        cut.means,
        cut.windows,
        cut.batch_size,
        cut.inputs,
    )?;
    done.update(&mut plan);
    done.write_reports(&a.out)?;
    let (pruned, recon, bias) = (done.model, done.reports, done.bias);
    plan.meta
        .insert("reconstruct".into(), cut.how.to_string().into());
    if cut.how.refits() {
        plan.meta
            .insert("refit_inputs".into(), cut.inputs.to_string().into());
    }
    plan.meta.insert(
        "bias_compensation".into(),
        (cut.how == Reconstruct::Bias).into(),
    );
    write_json(&a.out.join("plan.json"), &plan)?;
    let model_dir = a.out.join("model");
    lopper_surgery::export(
        &pruned,
        tok,
        Some(&plan),
        &ExportOptions {
            format: ExportFormat::Hf,
            force: true,
            provenance: resolved.clone(),
        },
        &model_dir,
    )?;
    let mut report = String::new();
    let dense = model.shape();
    let small = pruned.shape();
    report += &format!(
        "# lopper prune: {} at sparsity {}\n\nCommand: `{}`\n\n",
        a.method,
        a.sparsity,
        resolved["command"].as_str().unwrap_or("")
    );
    report += &format!(
        "| | dense | pruned | ratio |\n|---|---:|---:|---:|\n| parameters | {} | {} | {:.4} |\n| decoder linear parameters | {} | {} | {:.4} |\n| FLOPs/token (ctx 128) | {} | {} | {:.4} |\n\n",
        dense.num_params(),
        small.num_params(),
        small.num_params() as f64 / dense.num_params() as f64,
        dense.decoder_linear_params(),
        small.decoder_linear_params(),
        plan.kept_param_ratio(),
        dense.flops_per_token(128),
        small.flops_per_token(128),
        small.flops_per_token(128) as f64 / dense.flops_per_token(128) as f64,
    );
    if !warnings.is_empty() {
        report += "## Warnings\n\nThe plan is valid but leaves a degenerate model:\n\n";
        for w in &warnings {
            report += &format!("- {w}\n");
        }
        report += "\n";
    }
    report += "Kept per layer (source layer: KV groups / query heads / MLP channels):\n\n| layer | KV groups | heads | channels |\n|---:|---:|---:|---:|\n";
    for (i, (lp, ls)) in plan.layers.iter().zip(&plan.source.layers).enumerate() {
        report += &format!(
            "| {i} | {}/{} | {}/{} | {}/{} |\n",
            lp.kv_groups.len(),
            ls.n_kv_heads,
            lp.kv_groups.len() * ls.n_rep(),
            ls.n_heads,
            lp.channels.len(),
            ls.ffn_hidden
        );
    }
    if let Some(choice) = plan.meta.get("final_choice") {
        report += &format!(
            "\nFinal choice on held-out calibration windows (mean loss per candidate; `init` is the starting plan): `{choice}`\n"
        );
    }
    if let Some(r) = &recon {
        report += &crate::reconstruct::summary(cut.how, r);
    }
    if let Some(b) = &bias {
        report += &crate::reconstruct::bias_summary(b);
    }
    if let Some((first, Some(last))) = curve {
        report += &format!(
            "\nSearch: {} steps; sampled-mask loss {:.4} at the first step, {:.4} at the last (baseline {:.4}); mean entropy {:.4} nats; expected kept fraction {:.4}. Per-step values in `curve.jsonl`.\n",
            last.step + 1,
            first.unwrap_or(f64::NAN),
            last.loss,
            last.baseline,
            last.entropy,
            last.kept_fraction
        );
    }
    report += &format!(
        "\nCalibration: `{}`\n",
        serde_json::to_string(&resolved["calibration"])?
    );
    if !resolved["ls_calibration"].is_null() {
        report += &format!(
            "\nLeast-squares calibration (the same tokens in longer windows): `{}`\n",
            serde_json::to_string(&resolved["ls_calibration"])?
        );
    }
    if let Some(tasks) = eval_tasks {
        crate::eval::eval_into_report(
            &pruned,
            tok,
            tasks,
            &crate::eval::EvalSettings::for_report(a.eval_limit, a.allow_longer_context),
            &a.out.join("eval.json"),
            serde_json::json!({"plan": "plan.json", "params": small.num_params()}),
            device_name,
            &mut report,
        )?;
    }
    report += &format!(
        "\nWall time: {:.1} s on {device_name}{}.\n",
        started.elapsed().as_secs_f64(),
        crate::progress::peak_rss_note()
    );
    lopper_core::write_atomic(&a.out.join("report.md"), report.as_bytes())?;
    println!(
        "{}: kept {:.4} of the decoder linear parameters ({} -> {} parameters); model in {}",
        a.method,
        plan.kept_param_ratio(),
        dense.num_params(),
        small.num_params(),
        model_dir.display()
    );
    Ok(())
}

#[derive(Debug, Args)]
pub struct ExportArgs {
    /// `default`, a .gguf file, a model directory, or hub:ORG/NAME[@REV].
    #[arg(long, default_value = "default")]
    model: String,
    /// Storage type of the weight matrices, kept by `--format hf` (f32, bf16 or f16).
    #[arg(long, default_value = "f32")]
    dtype: lopper_core::Dtype,
    /// A plan.json made for this model (leave out to export the model as it is).
    #[arg(long)]
    plan: Option<PathBuf>,
    /// hf (lopper directory: safetensors + config.json + tokenizer.json; transformers loads it,
    /// with trust_remote_code when layers differ), vllm (the same files with vLLM's DeciLM
    /// `nemotron-nas` config: `vllm serve DIR --trust-remote-code`) or gguf (llama.cpp).
    #[arg(long, default_value = "hf")]
    format: String,
    /// GGUF tensor type of 2-D weights: f32, f16 or q8_0 (norms stay f32; rows that are not a
    /// multiple of 32 fall back from q8_0 to f16).
    #[arg(long, default_value = "f16")]
    gguf_type: String,
    /// With --plan: what the cut does to the kept weights, `none`, `bias`, `ls` or `obs` (as
    /// `prune --reconstruct`; they read calibration windows drawn as `prune` draws them).
    #[arg(long, default_value = "none")]
    reconstruct: String,
    /// With --reconstruct ls|obs: which layers' input projections are refit too, `next` (the
    /// default), `all` (a bare `--refit-inputs`) or `off` (as `prune --refit-inputs`).
    #[arg(long, num_args = 0..=1, default_missing_value = "all")]
    refit_inputs: Option<InputRefit>,
    /// With --reconstruct ls|obs: tokens per window of the refit's calibration (as `prune
    /// --recon-seq-len`; default 512).
    #[arg(long)]
    recon_seq_len: Option<usize>,
    /// Calibration data of --reconstruct bias|ls|obs: c4, wikitext2, ptb, or a file.
    #[arg(long, default_value = "c4")]
    calib: String,
    /// Calibration windows of --reconstruct bias|ls|obs.
    #[arg(long, default_value_t = 256)]
    calib_samples: usize,
    /// Tokens per calibration window.
    #[arg(long, default_value_t = 128)]
    seq_len: usize,
    /// Seed of the calibration sampling.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Calibration windows per forward pass.
    #[arg(long, default_value_t = 8)]
    batch_size: usize,
    /// cpu, cuda or cuda:N, or several GPUs (cuda:0,cuda:1): where the model is loaded, cut
    /// and reconstructed (layers split over several in balanced contiguous runs).
    #[arg(long, default_value = "cpu")]
    device: DeviceList,
    /// With --plan, `cpu`: keep the dense model's decoder layers out of device memory and read
    /// each onto its device for its turn (cut and reconstruction); only the cut model is built
    /// whole.
    #[arg(long, value_name = "WHERE")]
    offload: Option<Offload>,
    /// Replace an existing --out folder.
    #[arg(long)]
    force: bool,
    /// Output folder.
    #[arg(long)]
    out: PathBuf,
}

pub fn export(args: ExportArgs) -> Result<()> {
    let format = match args.format.as_str() {
        "hf" => ExportFormat::Hf,
        "gguf" => ExportFormat::Gguf(match args.gguf_type.as_str() {
            "f32" => lopper_model::gguf::GgmlType::F32,
            "f16" => lopper_model::gguf::GgmlType::F16,
            "q8_0" => lopper_model::gguf::GgmlType::Q8_0,
            o => bail!("--gguf-type `{o}`: use f32, f16 or q8_0"),
        }),
        "vllm" => ExportFormat::Vllm,
        o => bail!("--format `{o}`: use hf, vllm or gguf"),
    };
    if args.out.exists() && !args.force {
        bail!(
            "{} already exists; pass --force to replace it or choose another --out",
            args.out.display()
        );
    }
    let how: Reconstruct = args.reconstruct.parse()?;
    anyhow::ensure!(
        how == Reconstruct::None || args.plan.is_some(),
        "--reconstruct {how} reconstructs the cut of a plan: give --plan"
    );
    let inputs = how.check_refit_inputs(args.refit_inputs)?;
    anyhow::ensure!(
        args.calib_samples > 0 && args.batch_size > 0 && args.seq_len > 1,
        "--calib-samples and --batch-size must be at least 1 and --seq-len at least 2"
    );
    anyhow::ensure!(
        args.offload.is_none() || args.plan.is_some(),
        "--offload cpu exports the cut of a plan, which is built whole while the dense layers stream; exporting the whole model needs it resident: give --plan or drop --offload"
    );
    let plan = args.plan.as_deref().map(MaskPlan::load).transpose()?;
    let devices = args.device.clone();
    run_on_devices(
        &devices,
        ExportJob {
            args,
            plan,
            format,
            how,
            inputs,
        },
    )
}

struct ExportJob {
    args: ExportArgs,
    plan: Option<MaskPlan>,
    format: ExportFormat,
    how: Reconstruct,
    inputs: InputRefit,
}

impl PlacedJob for ExportJob {
    fn run<B: Backend>(mut self, devices: Vec<B::Device>, _device_name: String) -> Result<()> {
        let a = &self.args;
        let loaded = crate::loading::load_placed_model::<B>(
            &a.model,
            a.dtype,
            &devices,
            a.offload.is_some(),
        )?;
        if let Some(p) = &self.plan
            && loaded.model.is_offloaded()
        {
            // The cut model is built whole beside the one dense layer in flight: it must fit.
            p.validate_against(loaded.model.shape())?;
            crate::guard::pruned_fits::<B>(
                loaded.model.shape(),
                loaded.model.dtype(),
                1.0 - p.kept_param_ratio(),
                &devices,
                &a.model,
            )?;
        }
        if self.format == ExportFormat::Vllm {
            // A shape vLLM's DeciLM cannot hold is refused before the cut and its calibration.
            let shape = match &self.plan {
                Some(p) => {
                    p.validate_against(loaded.model.shape())?;
                    p.pruned_shape()
                }
                None => loaded.model.shape().clone(),
            };
            lopper_surgery::deci_config_json(&shape, &loaded.tokenizer)?;
        }
        let mut calibration = serde_json::Value::Null;
        let model = match &self.plan {
            Some(p) if self.how != Reconstruct::None => {
                p.validate_against(loaded.model.shape())?;
                crate::guard::context(loaded.model.shape(), a.seq_len, "--seq-len", false)?;
                crate::guard::forward_fits(
                    loaded.model.shape(),
                    a.batch_size,
                    a.seq_len,
                    "calibration",
                )?;
                let calib = crate::methods::draw_calibration(
                    &loaded.tokenizer,
                    &a.calib,
                    Sampler::ConcatChunks,
                    a.calib_samples,
                    a.seq_len,
                    a.seed,
                )?;
                calibration = serde_json::to_value(&calib.info)?;
                let ls_calib = if self.how.refits() {
                    crate::guard::ls_fits(
                        loaded.model.shape(),
                        self.how == Reconstruct::Obs,
                        self.inputs,
                    )?;
                    crate::reconstruct::ls_calibration(
                        &loaded.tokenizer,
                        loaded.model.shape(),
                        &a.calib,
                        Sampler::ConcatChunks,
                        (a.calib_samples, a.seq_len, a.batch_size),
                        a.seed,
                        a.recon_seq_len,
                    )?
                } else {
                    None
                };
                if let Some((c, _)) = &ls_calib {
                    calibration =
                        serde_json::json!({"calibration": calibration, "ls_calibration": c.info});
                }
                let means = match self.how {
                    Reconstruct::Bias => {
                        let (o_proj, down_proj) = lopper_importance::input_means(
                            &loaded.model,
                            &calib.windows,
                            a.batch_size,
                        )?;
                        Some(lopper_surgery::InputMeans { o_proj, down_proj })
                    }
                    _ => None,
                };
                let (windows, batch) = ls_calib
                    .as_ref()
                    .map_or((&calib.windows, a.batch_size), |(c, b)| (&c.windows, *b));
                let done = crate::reconstruct::cut(
                    &loaded.model,
                    p,
                    self.how,
                    means.as_ref(),
                    windows,
                    batch,
                    self.inputs,
                )?;
                if let Some(plan) = &mut self.plan {
                    done.update(plan);
                }
                done.model
            }
            Some(p) => lopper_surgery::prune(&loaded.model, p)?,
            None => loaded.model,
        };
        let provenance = serde_json::json!({
            "command": std::env::args().collect::<Vec<_>>().join(" "),
            "source": loaded.info,
            "reconstruct": self.how,
            "refit_inputs": self.inputs,
            "calibration": calibration,
        });
        lopper_surgery::export(
            &model,
            &loaded.tokenizer,
            self.plan.as_ref(),
            &ExportOptions {
                format: self.format,
                force: a.force,
                provenance,
            },
            &a.out,
        )?;
        println!(
            "exported {} parameters to {}",
            model.shape().num_params(),
            a.out.display()
        );
        Ok(())
    }
}
