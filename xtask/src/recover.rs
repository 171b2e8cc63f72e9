//! `cargo xtask recover`: LoRA or full fine-tuning of a pruned model, with cross-entropy and/or
//! distillation from the dense teacher; checkpoints, resume, report, export.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use burn::tensor::backend::Backend;
use clap::Args;
use lopper_core::MaskPlan;
use lopper_model::Llama;
use lopper_recover::{Adapt, Distill, RecoverConfig, Recovery, StepRecord};
use lopper_surgery::{ExportFormat, ExportOptions};

use crate::backend::{DeviceList, PlacedJob, run_on_devices};
use crate::prune::write_json;

#[derive(Debug, Args)]
pub struct RecoverArgs {
    /// The pruned model to train: a model directory (`prune`'s `model/`), a .gguf file, or
    /// `default`.
    #[arg(long)]
    model: String,
    /// The dense model it was pruned from (the distillation teacher), or `none` to train on
    /// cross-entropy alone (required when the model is not a pruned version of a teacher).
    #[arg(long, default_value = "default")]
    teacher: String,
    /// lora (adapters on every kept linear, merged at the end) or full (every weight).
    #[arg(long, default_value = "lora")]
    method: String,
    /// ce (next-token cross-entropy), kd (distillation from the teacher) or ce+kd. ce is the
    /// default: on the 30% model it recovered more than kd in fewer CPU minutes
    /// (docs/results/recovery-smollm2-135m.md).
    #[arg(long, default_value = "ce")]
    loss: String,
    /// Training text: c4 (the staged C4 sample) or a file (.json.gz / .jsonl with a `text`
    /// field, or plain text). Never an evaluation set.
    #[arg(long, default_value = "c4")]
    data: String,
    /// Optimiser steps.
    #[arg(long, default_value_t = 200)]
    steps: usize,
    /// Windows per optimiser step.
    #[arg(long, default_value_t = 8)]
    batch_size: usize,
    /// Windows per forward/backward pass (the gradient of a step is accumulated over them).
    #[arg(long, default_value_t = 4)]
    micro_batch: usize,
    /// Tokens per window.
    #[arg(long, default_value_t = 128)]
    seq_len: usize,
    /// Peak learning rate (AdamW); default 1e-3 for lora, 5e-5 for full.
    #[arg(long)]
    lr: Option<f64>,
    /// Linear warm-up steps (default: a twentieth of --steps).
    #[arg(long)]
    warmup: Option<usize>,
    /// The cosine decay ends at lr times this.
    #[arg(long, default_value_t = 0.1)]
    min_lr_ratio: f64,
    /// AdamW's decoupled weight decay.
    #[arg(long, default_value_t = 0.0)]
    weight_decay: f64,
    /// Clip the global gradient norm to this (0: no clipping).
    #[arg(long, default_value_t = 1.0)]
    clip_norm: f64,
    /// LoRA rank.
    #[arg(long, default_value_t = 8)]
    rank: usize,
    /// LoRA alpha (the update is alpha / rank * A B).
    #[arg(long, default_value_t = 16.0)]
    alpha: f64,
    /// Distillation temperature.
    #[arg(long, default_value_t = 1.0)]
    temperature: f64,
    /// Distil only the teacher's k most likely tokens per position (default: the full
    /// vocabulary).
    #[arg(long)]
    top_k: Option<usize>,
    /// Weight of the distillation term in ce+kd.
    #[arg(long, default_value_t = 1.0)]
    kd_weight: f64,
    /// Seed of the window order and of the adapters' initialisation.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Windows of the training text held out (never trained on) for the before/after loss.
    #[arg(long, default_value_t = 32)]
    held_out: usize,
    /// Also evaluate before and after on these tasks (as `eval --tasks`, 128-token windows).
    #[arg(long)]
    eval: Option<String>,
    /// With --eval: only the first N windows / examples of each task.
    #[arg(long)]
    eval_limit: Option<usize>,
    /// Checkpoint every N steps (and on Ctrl-C).
    #[arg(long, default_value_t = 50)]
    checkpoint_every: usize,
    /// Also write the LoRA adapters (PEFT layout) to `adapters/`.
    #[arg(long)]
    keep_adapters: bool,
    /// Stop (checkpointed, as on Ctrl-C) once this many steps are done.
    #[arg(long)]
    stop_after: Option<usize>,
    /// Storage type of the teacher's weights: f32, bf16 or f16. The teacher only runs forward
    /// passes, so a narrow type costs its logits a rounding and saves most of its time; what
    /// trains (adapters, or every weight with --method full) stays f32.
    #[arg(long, default_value = "f32")]
    dtype: lopper_core::Dtype,
    /// cpu, cuda or cuda:N, or several GPUs (cuda:0,cuda:1): the student's and the teacher's
    /// decoder layers split over them in balanced contiguous runs.
    #[arg(long, default_value = "cpu")]
    device: DeviceList,
    /// Output folder.
    #[arg(long)]
    out: PathBuf,
    /// Replace an existing --out folder.
    #[arg(long)]
    force: bool,
    /// Continue the run checkpointed in --out.
    #[arg(long)]
    resume: bool,
}

/// A resumed run must distil from the teacher it started with, in the same storage type, or
/// its continuation would not be the run it claims to be.
fn same_teacher(
    out: &std::path::Path,
    teacher: &Option<String>,
    dtype: lopper_core::Dtype,
) -> Result<()> {
    let path = out.join("settings.json");
    let Ok(text) = std::fs::read_to_string(&path) else {
        return Ok(());
    };
    let v: serde_json::Value = serde_json::from_str(&text)
        .with_context(|| format!("{} is not valid JSON", path.display()))?;
    let was_teacher = v["teacher"].as_str().map(String::from);
    // Runs from before --dtype had an f32 teacher.
    let was_dtype = v["teacher_dtype"].as_str().unwrap_or("f32");
    anyhow::ensure!(
        was_teacher == *teacher && was_dtype == dtype.to_string(),
        "the run in {} distils from --teacher {} with --dtype {was_dtype}; resume it with the same (this command: --teacher {} --dtype {dtype})",
        out.display(),
        was_teacher.as_deref().unwrap_or("none"),
        teacher.as_deref().unwrap_or("none"),
    );
    Ok(())
}

/// `--method`: LoRA of `rank` and `alpha`, or full.
fn adapt(method: &str, rank: usize, alpha: f64) -> Result<Adapt> {
    Ok(match method {
        "lora" => Adapt::Lora { rank, alpha },
        "full" => Adapt::Full,
        o => bail!("--method `{o}`: use lora or full"),
    })
}

/// The default peak learning rate of each method.
fn default_lr(adapt: Adapt) -> f64 {
    match adapt {
        Adapt::Lora { .. } => 1e-3,
        Adapt::Full => 5e-5,
    }
}

/// The recovery of `compare`'s `NAME+recover` cells: `recover`'s defaults but for the flags it
/// takes.
pub fn compare_config(
    method: &str,
    loss: &str,
    steps: usize,
    batch_size: usize,
    lr: Option<f64>,
    seed: u64,
) -> Result<RecoverConfig> {
    let d = RecoverConfig::default();
    let adapt = adapt(method, 8, 16.0).context("--recover-method")?;
    let cfg = RecoverConfig {
        adapt,
        loss: loss.parse().context("--recover-loss")?,
        steps,
        batch_size,
        micro_batch: d.micro_batch.min(batch_size),
        lr: lr.unwrap_or(default_lr(adapt)),
        warmup: steps / 20,
        seed,
        ..d
    };
    cfg.validate().context("--recover-*")?;
    Ok(cfg)
}

impl RecoverArgs {
    fn config(&self) -> Result<RecoverConfig> {
        let adapt = adapt(&self.method, self.rank, self.alpha)?;
        let lr = self.lr.unwrap_or(default_lr(adapt));
        let cfg = RecoverConfig {
            adapt,
            loss: self.loss.parse()?,
            distill: Distill {
                temperature: self.temperature,
                top_k: self.top_k,
                weight: self.kd_weight,
            },
            steps: self.steps,
            batch_size: self.batch_size,
            micro_batch: self.micro_batch.min(self.batch_size),
            lr,
            warmup: self.warmup.unwrap_or(self.steps / 20),
            min_lr_ratio: self.min_lr_ratio,
            weight_decay: self.weight_decay,
            clip_norm: (self.clip_norm > 0.0).then_some(self.clip_norm),
            seed: self.seed,
        };
        cfg.validate()?;
        Ok(cfg)
    }
}

/// Evaluation corpora: recovery never trains on them.
const EVAL_SETS: [&str; 3] = ["wikitext2", "ptb", "ptb_valid"];

/// Refuses evaluation corpora as training data.
pub fn check_data(data: &str) -> Result<()> {
    anyhow::ensure!(
        !EVAL_SETS.contains(&data),
        "--data {data}: that is an evaluation set; recovery never trains on evaluation data. Use c4 or a file of training text"
    );
    Ok(())
}

/// Every window of `seq_len` tokens of the training text `data`, in the order of `seed`:
/// training reads them in turn.
pub fn training_windows(
    tok: &lopper_model::Tokenizer,
    data: &str,
    seq_len: usize,
    seed: u64,
) -> Result<lopper_data::Calibration> {
    check_data(data)?;
    let dirs = lopper_data::DataDirs::from_env(&lopper_model::lopper_home());
    let (path, docs) = lopper_data::load_documents(data, &dirs)?;
    let encode = |t: &str| tok.encode(t).map_err(|e| e.to_string());
    Ok(lopper_data::all_windows(
        data, &path, &docs, &encode, seq_len, seed,
    )?)
}

pub fn run(args: RecoverArgs) -> Result<()> {
    let cfg = args.config()?;
    check_data(&args.data)?;
    let teacher = (args.teacher != "none").then(|| args.teacher.clone());
    anyhow::ensure!(
        teacher.is_some() || !cfg.loss.needs_teacher(),
        "--loss {} distils from a teacher; give --teacher (the dense model) or use --loss ce",
        cfg.loss
    );
    anyhow::ensure!(args.seq_len >= 2, "--seq-len must be at least 2");
    anyhow::ensure!(
        args.held_out > 0,
        "--held-out must be at least 1: the report compares the loss before and after on windows never trained on"
    );
    anyhow::ensure!(
        args.checkpoint_every > 0,
        "--checkpoint-every must be at least 1"
    );
    let eval_tasks = args
        .eval
        .as_deref()
        .map(crate::eval::parse_tasks)
        .transpose()?;
    crate::prune::check_out(
        &args.out,
        args.resume,
        args.force,
        "recover-checkpoint.json",
    )?;
    let device = args.device.clone();
    run_on_devices(
        &device,
        RecoverJob {
            args,
            cfg,
            teacher,
            eval_tasks,
        },
    )
}

struct RecoverJob {
    args: RecoverArgs,
    cfg: RecoverConfig,
    teacher: Option<String>,
    eval_tasks: Option<Vec<crate::eval::Task>>,
}

/// The plan recorded in a lopper model directory's `lopper.json`, if any.
fn plan_of(model: &str) -> Option<MaskPlan> {
    let text = std::fs::read_to_string(Path::new(model).join("lopper.json")).ok()?;
    let v: serde_json::Value = serde_json::from_str(&text).ok()?;
    serde_json::from_value(v.get("plan")?.clone()).ok()
}

/// Mean next-token loss of `model` on `windows`.
fn held_out_loss<B: Backend>(model: &Llama<B>, windows: &[Vec<u32>], batch: usize) -> Result<f64> {
    let p = lopper_eval::perplexity(model, windows, batch, None, |_| {})?;
    Ok(p.nll_sum / p.tokens as f64)
}

impl PlacedJob for RecoverJob {
    fn run<B: Backend>(self, devices: Vec<B::Device>, device_name: String) -> Result<()> {
        let (a, cfg) = (&self.args, self.cfg);
        let started = Instant::now();
        let student = crate::loading::load_placed_model::<B>(
            &a.model,
            lopper_core::Dtype::F32,
            &devices,
            false,
        )?;
        let plan = plan_of(&a.model);
        let teacher = match &self.teacher {
            Some(t) => {
                let teacher = crate::loading::load_placed_model::<B>(t, a.dtype, &devices, false)
                    .with_context(|| format!("loading teacher `{t}`"))?;
                let (s, d) = (student.model.shape(), teacher.model.shape());
                anyhow::ensure!(
                    s.vocab_size == d.vocab_size,
                    "the teacher `{t}` has a vocabulary of {} tokens and the model {}; distillation needs the same tokenizer. Give the dense model the student was pruned from, or --teacher none --loss ce",
                    d.vocab_size,
                    s.vocab_size
                );
                let pruned_from_it = match &plan {
                    Some(p) => p.source == *d,
                    None => s == d,
                };
                anyhow::ensure!(
                    pruned_from_it,
                    "`{}` is not a pruned version of the teacher `{t}` ({}); give the dense model it was pruned from, or train without a teacher: --teacher none --loss ce",
                    a.model,
                    if plan.is_some() {
                        "its plan was made for another shape"
                    } else {
                        "it has no plan and another shape"
                    }
                );
                Some(teacher.model)
            }
            None => None,
        };
        let shape = student.model.shape().clone();
        crate::guard::context(&shape, a.seq_len, "--seq-len", false)?;
        crate::guard::forward_fits(
            &shape,
            cfg.micro_batch,
            a.seq_len,
            "training (--micro-batch)",
        )?;
        if let Some(tasks) = &self.eval_tasks {
            crate::eval::EvalSettings::for_report(a.eval_limit, false).guard(&shape, tasks)?;
        }
        let data = training_windows(&student.tokenizer, &a.data, a.seq_len, a.seed)?;
        let (path, documents) = (data.info.path.clone(), data.info.documents);
        let need = cfg.windows_needed() + a.held_out;
        anyhow::ensure!(
            data.windows.len() >= need,
            "--data {} has {} windows of {} tokens; --steps {} x --batch-size {} needs {} plus --held-out {} = {need}. Lower --steps or --batch-size, or give more text",
            a.data,
            data.windows.len(),
            a.seq_len,
            cfg.steps,
            cfg.batch_size,
            cfg.windows_needed(),
            a.held_out
        );
        let held_out = &data.windows[data.windows.len() - a.held_out..];
        let train_windows = &data.windows[..cfg.windows_needed()];
        // The model in f32, and while checkpointing two generations of the trained weights
        // with AdamW's two moments (f32 each).
        let checkpoints = if cfg.steps > a.checkpoint_every {
            2 * 3 * 4 * cfg.adapt.trainable_params(&shape)
        } else {
            0
        };
        crate::prune::prepare_out(
            &a.out,
            a.resume,
            a.force,
            shape.num_params() * 4 + checkpoints + (32 << 20),
            "the recovered model and its checkpoints",
        )?;
        if a.resume {
            same_teacher(&a.out, &self.teacher, a.dtype)?;
        }
        let meta = serde_json::json!({
            "command": std::env::args().collect::<Vec<_>>().join(" "),
            "model": student.info,
            "teacher": self.teacher,
            "teacher_dtype": a.dtype,
            "config": cfg,
            "data": {
                "source": a.data,
                "path": path,
                "documents": documents,
                "windows_available": data.windows.len(),
                "seq_len": a.seq_len,
                "order_seed": a.seed,
                "train_windows": format!("the first {} of the seeded order", train_windows.len()),
                "held_out_windows": format!("the last {} of the seeded order", held_out.len()),
            },
            "device": device_name,
        });
        write_json(&a.out.join("settings.json"), &meta)?;
        let batch = cfg.micro_batch.max(1);
        let before = held_out_loss(&student.model, held_out, batch)?;
        let teacher_loss = teacher
            .as_ref()
            .map(|t| held_out_loss(t, held_out, batch))
            .transpose()?;
        let eval_settings = crate::eval::EvalSettings::for_report(a.eval_limit, false);
        let eval_before = match &self.eval_tasks {
            Some(tasks) => Some(crate::eval::evaluate(
                &student.model,
                &student.tokenizer,
                tasks,
                &eval_settings,
            )?),
            None => None,
        };
        let trained = train(
            &student.model,
            teacher.as_ref(),
            cfg,
            train_windows,
            &TrainRun {
                dir: &a.out,
                resume: a.resume,
                stop_after: a.stop_after,
                checkpoint_every: a.checkpoint_every,
            },
        )?;
        let (run, records, train_seconds, first_step) = (
            trained.run,
            trained.records,
            trained.seconds,
            trained.first_step,
        );
        let recovered = run.model()?;
        let after = held_out_loss(&recovered, held_out, batch)?;
        let eval_after = match &self.eval_tasks {
            Some(tasks) => Some(crate::eval::evaluate(
                &recovered,
                &student.tokenizer,
                tasks,
                &eval_settings,
            )?),
            None => None,
        };
        if let (Some((b, _)), Some((r, _))) = (&eval_before, &eval_after) {
            write_json(
                &a.out.join("eval.json"),
                &serde_json::json!({
                    "protocol": eval_settings.protocol(&device_name),
                    "before": b,
                    "after": r,
                }),
            )?;
        }
        let model_dir = a.out.join("model");
        lopper_surgery::export(
            &recovered,
            &student.tokenizer,
            plan.as_ref(),
            &ExportOptions {
                format: ExportFormat::Hf,
                force: true,
                provenance: serde_json::json!({"recover": meta}),
            },
            &model_dir,
        )?;
        if a.keep_adapters
            && let Some(ad) = run.adapters()?
        {
            write_adapters(&a.out.join("adapters"), &ad)?;
        }
        let mut report = format!(
            "# lopper recover: {} with {}\n\nCommand: `{}`\n\n",
            a.method,
            cfg.loss,
            meta["command"].as_str().unwrap_or("")
        );
        report += &format!(
            "Model: `{}` ({} parameters); teacher: `{}`{}. Trained parameters: {} (f32).\n\n",
            a.model,
            shape.num_params(),
            self.teacher.as_deref().unwrap_or("none"),
            if self.teacher.is_some() {
                format!(" (weights in {})", a.dtype)
            } else {
                String::new()
            },
            run.trainable_params()?
        );
        report += &format!(
            "Training data: `{}` ({} documents, {} windows of {} tokens in a seeded order, seed {}); trained on the first {} ({} steps x {} windows, {} tokens), held out the last {}. No evaluation set is read for training.\n\n",
            path.display(),
            documents,
            data.windows.len(),
            a.seq_len,
            a.seed,
            train_windows.len(),
            cfg.steps,
            cfg.batch_size,
            train_windows.len() * (a.seq_len - 1),
            held_out.len()
        );
        report += "| held-out loss (nats/token) | value | perplexity |\n|---|---:|---:|\n";
        if let Some(t) = teacher_loss {
            report += &format!("| teacher | {t:.4} | {:.2} |\n", t.exp());
        }
        report += &format!(
            "| before recovery | {before:.4} | {:.2} |\n| after recovery | {after:.4} | {:.2} |\n\n",
            before.exp(),
            after.exp()
        );
        if let (Some((_, tb)), Some((_, ta))) = (&eval_before, &eval_after) {
            report +=
                "## Evaluation before recovery\n\n| task | result | seconds |\n|---|---|---:|\n";
            for row in tb {
                report += &format!("{row}\n");
            }
            report +=
                "\n## Evaluation after recovery\n\n| task | result | seconds |\n|---|---|---:|\n";
            for row in ta {
                report += &format!("{row}\n");
            }
            report += "\n";
            println!("after recovery:");
            crate::eval::print_table(ta);
        }
        if let (Some(f), Some(l)) = (records.first(), records.last()) {
            report += &format!(
                "Training: {} steps; loss {:.4} at the first step, {:.4} at the last; per-step values in `curve.jsonl`, plot in `loss.png`. This session trained {} steps in {train_seconds:.1} s ({:.0} tokens/s).\n",
                l.step + 1,
                f.loss,
                l.loss,
                cfg.steps - first_step,
                ((cfg.steps - first_step) * cfg.batch_size * (a.seq_len - 1)) as f64
                    / train_seconds.max(1e-9)
            );
        }
        report += &format!(
            "\nWall time: {:.1} s on {device_name}{}.\n",
            started.elapsed().as_secs_f64(),
            crate::progress::peak_rss_note()
        );
        lopper_core::write_atomic(&a.out.join("report.md"), report.as_bytes())?;
        // The run is complete: its checkpoint is no longer needed.
        remove_checkpoint(&a.out);
        println!(
            "recovered: held-out loss {before:.4} -> {after:.4} (ppl {:.2} -> {:.2}); model in {}",
            before.exp(),
            after.exp(),
            model_dir.display()
        );
        Ok(())
    }
}

/// Where and how [`train`] runs.
pub struct TrainRun<'a> {
    /// The folder of `curve.jsonl` and the checkpoint.
    pub dir: &'a Path,
    /// Continue from the checkpoint in `dir` when there is one.
    pub resume: bool,
    /// Stop (checkpointed) once this many steps are done.
    pub stop_after: Option<usize>,
    /// Checkpoint every N steps (and on Ctrl-C).
    pub checkpoint_every: usize,
}

/// A finished [`train`].
pub struct Trained<B: Backend> {
    pub run: Recovery<B>,
    /// Every step's record, resumed steps included.
    pub records: Vec<StepRecord>,
    /// Seconds this call trained.
    pub seconds: f64,
    /// The step this call started from.
    pub first_step: usize,
}

/// Trains `student` for `cfg.steps` steps on `windows` (read in order, `cfg.batch_size` per
/// step), continuing a checkpoint in `run.dir` under `run.resume`: a progress bar, every step
/// appended to `curve.jsonl`, checkpoints every `run.checkpoint_every` steps and on Ctrl-C
/// (then an error that says how to resume); loss.png at the end.
pub fn train<B: Backend>(
    student: &Llama<B>,
    teacher: Option<&Llama<B>>,
    cfg: RecoverConfig,
    windows: &[Vec<u32>],
    run: &TrainRun,
) -> Result<Trained<B>> {
    anyhow::ensure!(
        windows.len() >= cfg.windows_needed(),
        "{} training windows for {} steps of {}",
        windows.len(),
        cfg.steps,
        cfg.batch_size
    );
    let mut rec = if run.resume && Recovery::<B>::has_checkpoint(run.dir) {
        let r = Recovery::resume(student, cfg, run.dir)?;
        tracing::info!(step = r.step(), "resuming recovery");
        r
    } else {
        Recovery::new(student, cfg)?
    };
    tracing::info!(
        trainable = rec.trainable_params()?,
        windows = windows.len(),
        "recovery: {:?} with {}",
        cfg.adapt,
        cfg.loss
    );
    let mut curve = crate::methods::open_curve(run.dir, rec.step())?;
    let stop = crate::methods::ctrl_c_flag();
    let bar = crate::progress::bar(
        cfg.steps as u64,
        "recover [{bar:30}] step {pos}/{len} {msg} eta {eta}",
    )?;
    bar.set_position(rec.step() as u64);
    let started = Instant::now();
    let first_step = rec.step();
    while rec.step() < cfg.steps {
        if stop.load(Ordering::SeqCst) || run.stop_after.is_some_and(|n| rec.step() >= n) {
            rec.save(run.dir)?;
            bar.finish_and_clear();
            bail!(
                "interrupted at step {}; checkpoint written to {}; run the same command again{} to continue",
                rec.step(),
                run.dir.display(),
                if run.resume { "" } else { " with --resume" }
            );
        }
        let s = rec.step();
        let batch = &windows[s * cfg.batch_size..(s + 1) * cfg.batch_size];
        let r = rec.train_step(batch, teacher)?;
        writeln!(curve, "{}", serde_json::to_string(&r)?)
            .and_then(|_| curve.flush())
            .context("writing curve.jsonl")?;
        bar.set_position(rec.step() as u64);
        bar.set_message(format!("loss {:.4} lr {:.2e}", r.loss, r.lr));
        if rec.step() % run.checkpoint_every == 0 && rec.step() < cfg.steps {
            rec.save(run.dir)?;
        }
    }
    bar.finish_and_clear();
    let seconds = started.elapsed().as_secs_f64();
    let records: Vec<StepRecord> = std::fs::read_to_string(run.dir.join("curve.jsonl"))?
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    loss_plot(&run.dir.join("loss.png"), &records)?;
    Ok(Trained {
        run: rec,
        records,
        seconds,
        first_step,
    })
}

/// Deletes a finished run's checkpoint files from `dir`.
pub fn remove_checkpoint(dir: &Path) {
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with("recover-") {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
}

/// The training loss per step (and its ce / kd parts) with a 20-step moving average.
fn loss_plot(path: &Path, records: &[StepRecord]) -> Result<()> {
    let avg = |f: &dyn Fn(&StepRecord) -> Option<f64>| -> Vec<(f64, f64)> {
        let pts: Vec<(f64, f64)> = records
            .iter()
            .filter_map(|r| f(r).map(|v| (r.step as f64, v)))
            .collect();
        (0..pts.len())
            .map(|i| {
                let s = i.saturating_sub(19);
                let m = pts[s..=i].iter().map(|p| p.1).sum::<f64>() / (i - s + 1) as f64;
                (pts[i].0, m)
            })
            .collect()
    };
    let mut series = vec![("loss (20-step mean)".to_string(), avg(&|r| Some(r.loss)))];
    if records.iter().any(|r| r.kd.is_some()) && records.iter().any(|r| r.ce.is_some()) {
        series.push(("ce (20-step mean)".into(), avg(&|r| r.ce)));
        series.push(("kd (20-step mean)".into(), avg(&|r| r.kd)));
    }
    crate::plots::series(
        path,
        "recovery: training loss",
        ("step", "nats/token"),
        &series,
        false,
    )
}

/// PEFT's `adapter_model.safetensors` and `adapter_config.json`.
fn write_adapters<B: Backend>(dir: &Path, ad: &lopper_recover::LoraAdapters<B>) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let (tensors, config) = ad.peft()?;
    let bytes: Vec<(String, Vec<usize>, Vec<u8>)> = tensors
        .into_iter()
        .map(|(n, t)| {
            let bytes = t.data.iter().flat_map(|x| x.to_le_bytes()).collect();
            (n, t.shape, bytes)
        })
        .collect();
    let views: Vec<(String, safetensors::tensor::TensorView)> = bytes
        .iter()
        .map(|(n, d, b)| {
            Ok((
                n.clone(),
                safetensors::tensor::TensorView::new(safetensors::Dtype::F32, d.clone(), b)?,
            ))
        })
        .collect::<Result<_>>()?;
    let st = safetensors::serialize(views, None)?;
    lopper_core::write_atomic(&dir.join("adapter_model.safetensors"), &st)?;
    write_json(&dir.join("adapter_config.json"), &config)
}
