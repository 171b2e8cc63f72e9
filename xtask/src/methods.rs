//! The pruning methods as the commands run them: the policy-gradient search with its run
//! folder (checkpoint, curve, progress bar), and the metric methods of `lopper-importance`.

use std::io::Write;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use burn::tensor::backend::Backend;
use lopper_core::{MaskPlan, ModelShape, UnitScores};
use lopper_importance::{Method, MethodPlan, MethodSettings};
use lopper_model::Llama;
use lopper_policy::{Hooks, Init, Judge, PgConfig, PgState, RefitWindows};
use lopper_sparse::InputRefit;
use lopper_surgery::InputMeans;

/// Every `--method` name: `pg` and the metric methods.
pub fn method_names() -> String {
    std::iter::once("pg")
        .chain(Method::NAMES.iter().copied())
        .collect::<Vec<_>>()
        .join(", ")
}

/// Checks a `--method` name before anything is loaded.
pub fn check_method(name: &str) -> Result<()> {
    if name != "pg" && name.parse::<Method>().is_err() {
        bail!(
            "--method `{name}` is not available; use one of {}",
            method_names()
        );
    }
    Ok(())
}

/// A metric method's plan, timed and logged. `windows` is the calibration set; metric methods
/// read at most `metric_samples` of its windows.
pub fn metric_plan<B: Backend>(
    model: &Llama<B>,
    windows: &[Vec<u32>],
    method: Method,
    keep: f64,
    metric_samples: usize,
    settings: &MethodSettings,
) -> Result<MethodPlan> {
    let t = Instant::now();
    let n = windows.len().min(metric_samples);
    let mp = lopper_importance::method_plan(model, &windows[..n], method, keep, settings, |m| {
        tracing::info!("{m}")
    })?;
    tracing::info!(
        method = method.name(),
        windows = n,
        seconds = t.elapsed().as_secs_f64(),
        "metric plan computed"
    );
    Ok(mp)
}

/// How a policy-gradient search starts: `--init` and the preset's reading of it.
pub struct PgInit<'a> {
    /// `--init`: auto, uniform, random, a method, a scores or plan file.
    pub name: &'a str,
    /// Start from a method's (or file's) plan, so that step 0's plan is that plan (preset
    /// lopper); otherwise from the per-layer sigmap of its scores (preset reference).
    pub plan_start: bool,
    /// Calibration windows the metric methods read (the first N of the search's).
    pub metric_samples: usize,
    /// Settings of the metric methods.
    pub settings: &'a MethodSettings,
}

/// The policy-gradient initialisation of `init` at the kept fraction `keep`. `windows` are the
/// search's calibration windows; `held_out` (or, without any, the first 16 search windows)
/// decide `auto` under the config's judge (`lopper_policy::judge_plans`: with `means` as the
/// search will score masks, or after a least-squares cut on `refit`, by default the search's
/// windows and `held_out`). Also
/// returns whether the search compensates: `cfg.compensation`, or under
/// [`PgConfig::compensation_auto`] with `auto` the rule under which the best candidate scored
/// best (each candidate judged with and without compensation).
pub fn pg_init<B: Backend>(
    init: &PgInit,
    model: &Llama<B>,
    windows: &[Vec<u32>],
    held_out: &[Vec<u32>],
    refit: Option<RefitWindows>,
    means: Option<&InputMeans>,
    cfg: &PgConfig,
) -> Result<(Init, Option<lopper_policy::Judged>, bool)> {
    let shape = model.shape();
    let keep = cfg.keep();
    // A plan start is fitted to the parameter budget, so a method that allocates per layer
    // starts from its exact-size variant (`per-layer-params`: every layer keeps the asked
    // fraction of its parameters) rather than its paper's per-layer counts, which keep more
    // (0.54 of the default model at 0.5) and would be cut back to the budget by the search's
    // global order, not by the method's (unless `--allocation` names one).
    let plan_settings = |method: Method| MethodSettings {
        allocation: init
            .settings
            .allocation
            .or(match method.default_allocation() {
                Some(lopper_core::Allocation::PerLayer) if init.plan_start => {
                    Some(lopper_core::Allocation::PerLayerParams)
                }
                a => a,
            }),
        ..init.settings.clone()
    };
    let metric = |method: Method, keep: f64| {
        metric_plan(
            model,
            windows,
            method,
            keep,
            init.metric_samples,
            &plan_settings(method),
        )
    };
    let start = match init.name {
        "uniform" => Init::Uniform,
        "random" => Init::Random,
        "auto" => {
            anyhow::ensure!(
                init.plan_start,
                "--init auto starts from a method's plan, which --preset reference does not do; name the init (e.g. --init wanda-sp)"
            );
            let flap = metric(Method::Flap, keep)?;
            let llm_bip = metric(Method::LlmBip, keep)?;
            // (name, plan, scores ordering its units when it is fitted to the budget)
            let mut candidates: Vec<(String, MaskPlan, Option<UnitScores>)> = vec![
                ("flap".into(), flap.plan, flap.scores.clone()),
                ("llm-bip".into(), llm_bip.plan, llm_bip.scores.clone()),
            ];
            // LLM-BIP's paper counts too (2 of 3 KV groups at 0.5: 4% over the budget), which
            // the search's state fits by LLM-BIP's global order: a different, uneven plan
            // (on the default model at 50% it empties most of layers 1-3's MLPs and removes
            // 5 more KV groups), judged beside the exact-size one.
            if let (None, Some(sc)) = (init.settings.allocation, &llm_bip.scores) {
                let paper = sc.plan(shape, keep, lopper_core::Allocation::PerLayer)?;
                if paper.layers != candidates[1].1.layers {
                    candidates.push(("llm-bip@per-layer".into(), paper, llm_bip.scores));
                }
            }
            if cfg.units.contains(&lopper_core::UnitKind::Layer) {
                let bi = metric(Method::BlockInfluence, keep)?;
                let order = lopper_importance::block_influence_order(
                    bi.layer_values.as_deref().unwrap_or_default(),
                );
                candidates.push(("block-influence".into(), bi.plan, flap.scores.clone()));
                // Mixed starts: block influence's layers for part of the budget, FLAP's units
                // (global-params) for the rest.
                if let Some(sc) = &flap.scores {
                    for share in [0.25, 0.5, 0.75] {
                        let plan = sc.plan_with_layers(
                            shape,
                            keep,
                            lopper_core::Allocation::GlobalParams,
                            &order,
                            share,
                        )?;
                        candidates.push((
                            format!("flap+block-influence@{share}"),
                            plan,
                            flap.scores.clone(),
                        ));
                    }
                }
            }
            // Each candidate as the search would start from it: fitted to the budget (a
            // per-layer plan such as LLM-BIP's keeps a little more or less than it), so the
            // judge compares plans of equal size, and the plan it picks is the search's start.
            let fitted: Vec<MaskPlan> = candidates
                .iter()
                .map(|(_, plan, scores)| {
                    let start = Init::Plan {
                        plan: plan.clone(),
                        scores: scores.clone(),
                    };
                    let space = cfg.space(shape, &start)?;
                    Ok(PgState::new(cfg.clone(), &space, &start)?
                        .init_plan
                        .expect("a plan start keeps its plan"))
                })
                .collect::<Result<_>>()?;
            let judge = if held_out.is_empty() {
                &windows[..windows.len().min(16)]
            } else {
                held_out
            };
            let plans: Vec<&MaskPlan> = fitted.iter().collect();
            let refit = refit.unwrap_or(RefitWindows {
                fit: windows,
                held_out: judge,
                batch_size: cfg.batch_size,
                inputs: InputRefit::default(),
            });
            // First every candidate's masked loss under the search's rule, and under
            // compensation_auto without compensation too.
            let masked_cfg = |compensation| PgConfig {
                compensation,
                judge: Judge::Masked,
                ..cfg.clone()
            };
            let on = masked_cfg(cfg.compensation);
            let (mut judged, mut i) =
                lopper_policy::judge_plans(model, &plans, &[], means, refit, judge, &on)?;
            let mut masked = serde_json::Map::new();
            for ((name, _, _), j) in candidates.iter().zip(&judged) {
                tracing::info!(init = name.as_str(), loss = j.masked, "candidate start");
                masked.insert(name.clone(), j.masked.into());
            }
            let mut compensation = cfg.compensation;
            let mut uncompensated = serde_json::Map::new();
            let off = if cfg.compensation && cfg.compensation_auto {
                let (off, j) = lopper_policy::judge_plans(
                    model,
                    &plans,
                    &[],
                    None,
                    refit,
                    judge,
                    &masked_cfg(false),
                )?;
                for ((name, _, _), o) in candidates.iter().zip(&off) {
                    tracing::info!(
                        init = name.as_str(),
                        loss = o.masked,
                        "candidate start, uncompensated"
                    );
                    uncompensated.insert(name.clone(), o.masked.into());
                }
                Some((off, j))
            } else {
                None
            };
            let mut refit_losses = serde_json::Map::new();
            match cfg.judge {
                // The start is the candidate of the lowest loss under either rule, and the
                // search takes that rule.
                Judge::Masked => {
                    if let Some((off, j)) = off
                        && off[j].masked < judged[i].masked
                    {
                        tracing::info!(
                            init = candidates[j].0.as_str(),
                            loss = off[j].masked,
                            compensated = judged[i].masked,
                            "the best start scores best without bias compensation: the search runs without it"
                        );
                        (judged, i, compensation) = (off, j, false);
                    }
                }
                // A refit model has no compensation: the best `top` candidates by their
                // masked loss under either rule are refit and the lowest refit loss is the
                // start; the search then scores masks under the rule whose masked loss of that
                // start is lower.
                Judge::Reconstructed { .. } => {
                    let known: Vec<Option<lopper_policy::Judged>> = judged
                        .iter()
                        .enumerate()
                        .map(|(k, j)| {
                            let best = off
                                .as_ref()
                                .map_or(j.masked, |(o, _)| j.masked.min(o[k].masked));
                            Some(lopper_policy::Judged {
                                masked: best,
                                reconstructed: None,
                            })
                        })
                        .collect();
                    let (refit_judged, r) = lopper_policy::judge_plans(
                        model, &plans, &known, means, refit, judge, cfg,
                    )?;
                    for ((name, _, _), j) in candidates.iter().zip(&refit_judged) {
                        if let Some(l) = j.reconstructed {
                            tracing::info!(init = name.as_str(), ls = l, "candidate start refit");
                            refit_losses.insert(name.clone(), l.into());
                        }
                    }
                    i = r;
                    if let Some((off, _)) = &off
                        && off[i].masked < judged[i].masked
                    {
                        judged[i].masked = off[i].masked;
                        compensation = false;
                    }
                    judged[i].reconstructed = refit_judged[i].reconstructed;
                }
            }
            let (name, mut plan, scores) = candidates.swap_remove(i);
            plan.meta.insert("method".into(), name.into());
            plan.meta.insert("init_candidates".into(), masked.into());
            if !uncompensated.is_empty() {
                // Both rules' losses, and the one the search runs under.
                plan.meta
                    .insert("init_candidates_uncompensated".into(), uncompensated.into());
                plan.meta
                    .insert("search_compensation".into(), compensation.into());
            }
            if !refit_losses.is_empty() {
                // The held-out loss after a least-squares cut (the judge's ranking).
                plan.meta
                    .insert("init_candidates_ls".into(), refit_losses.into());
            }
            return Ok((Init::Plan { plan, scores }, Some(judged[i]), compensation));
        }
        m if m.parse::<Method>().is_ok() => {
            let method: Method = m.parse()?;
            if init.plan_start {
                let mp = metric(method, keep)?;
                let mut plan = mp.plan;
                plan.meta.insert("method".into(), m.into());
                Init::Plan {
                    plan,
                    scores: mp.scores,
                }
            } else {
                if method.removes_layers() {
                    bail!(
                        "--init {m}: a layer-removal method has no per-unit scores; start from its plan instead (`--init DIR/plan.json`, or --preset lopper)"
                    );
                }
                let mp = metric(method, 0.5)?;
                Init::Scores {
                    scores: mp.scores.expect("unit methods give scores"),
                }
            }
        }
        file => {
            let text = std::fs::read_to_string(file).with_context(|| {
                format!(
                    "--init `{file}` is neither auto, uniform, random, a method ({}) nor a readable scores or plan file",
                    Method::NAMES.join(", ")
                )
            })?;
            match serde_json::from_str::<UnitScores>(&text) {
                Ok(scores) => Init::Scores { scores },
                Err(_) if init.plan_start => {
                    let plan = MaskPlan::from_json(&text).with_context(|| {
                        format!("--init {file}: neither a UnitScores nor a mask plan JSON file")
                    })?;
                    plan.validate_against(shape)?;
                    Init::Plan { plan, scores: None }
                }
                Err(_) => Init::Scores {
                    scores: plan_scores(&text, shape).with_context(|| {
                        format!("--init {file}: neither a UnitScores nor a mask plan JSON file")
                    })?,
                },
            }
        }
    };
    Ok((start, None, cfg.compensation))
}

/// Scores from a plan: 1 for kept units, 0 for removed ones (then `sigmap` per layer, like the
/// reference's init from another method's mask).
fn plan_scores(json: &str, shape: &ModelShape) -> Result<UnitScores> {
    let plan = MaskPlan::from_json(json)?;
    plan.validate_against(shape)?;
    let bit = |keep: bool| if keep { 1.0 } else { 0.0 };
    Ok(UnitScores {
        method: "plan".into(),
        kv_groups: plan
            .layers
            .iter()
            .zip(&shape.layers)
            .map(|(lp, ls)| {
                (0..ls.n_kv_heads)
                    .map(|g| bit(lp.kv_groups.contains(&g)))
                    .collect()
            })
            .collect(),
        channels: plan
            .layers
            .iter()
            .zip(&shape.layers)
            .map(|(lp, ls)| {
                (0..ls.ffn_hidden)
                    .map(|c| bit(lp.channels.binary_search(&c).is_ok()))
                    .collect()
            })
            .collect(),
    })
}

/// The first sampled-mask loss and the last step of a finished search.
pub type CurveSummary = Option<(Option<f64>, Option<lopper_policy::StepRecord>)>;

/// Where and how a policy-gradient search keeps its state.
pub struct PgRun<'a> {
    /// Folder of `checkpoint.json` and `curve.jsonl`.
    pub dir: &'a Path,
    /// Continue from `dir/checkpoint.json` (its settings must equal `cfg`).
    pub resume: bool,
    /// Stop as Ctrl-C does once this many steps are done (tests).
    pub stop_after: Option<usize>,
    /// Checkpoint every N steps.
    pub checkpoint_every: usize,
    /// Resolved settings stored in the checkpoint.
    pub meta: &'a serde_json::Value,
    /// The windows a least-squares cut of the result reads, with their batch size and the
    /// cut's input refit, where they differ from the search's: the least-squares judge refits
    /// on the first seven eighths of them and scores on the rest.
    pub refit: Option<(&'a [Vec<u32>], usize, InputRefit)>,
}

/// The least-squares judge's windows from the cut's ([`PgRun::refit`]): the refit reads the
/// first seven eighths, the refit model is scored on the last eighth (at least one window), so
/// the judge ranks plans by the model the cut ships, on text its refit did not see.
fn judge_refit(refit: Option<(&[Vec<u32>], usize, InputRefit)>) -> Option<RefitWindows<'_>> {
    let (windows, batch_size, inputs) = refit?;
    if windows.len() < 2 {
        return None;
    }
    let (fit, held_out) = windows.split_at(windows.len() - (windows.len() / 8).max(1));
    Some(RefitWindows {
        fit,
        held_out,
        batch_size,
        inputs,
    })
}

/// The settings two serialised configs disagree on, as `key: checkpoint's value, now value`
/// (every key of either; the whole values where they are not both objects).
fn settings_diff(was: &serde_json::Value, now: &serde_json::Value) -> String {
    let (Some(a), Some(b)) = (was.as_object(), now.as_object()) else {
        return format!("checkpoint {was}, now {now}");
    };
    let none = serde_json::Value::Null;
    let mut keys: Vec<&String> = a.keys().chain(b.keys()).collect();
    keys.sort();
    keys.dedup();
    keys.into_iter()
        .filter_map(|k| {
            let (x, y) = (a.get(k).unwrap_or(&none), b.get(k).unwrap_or(&none));
            (x != y).then(|| format!("{k}: checkpoint {x}, now {y}"))
        })
        .collect::<Vec<_>>()
        .join("; ")
}

/// What a finished search hands back.
pub struct PgOutcome {
    /// The final plan (the held-out choice, when the config makes one).
    pub plan: MaskPlan,
    /// First loss and last step of the search.
    pub curve: CurveSummary,
    /// The calibration means the search compensated with (the exported model uses them too).
    pub means: Option<InputMeans>,
}

/// Runs (or resumes) the policy-gradient search and returns its final plan. The last
/// `cfg.held_out` calibration windows are held out for the final choice; the search and the
/// metric init read the others. Every step goes to `curve.jsonl`; the state is checkpointed
/// every `checkpoint_every` steps and on Ctrl-C, after which this returns an error that says
/// how to resume.
pub fn run_pg<B: Backend>(
    model: &Llama<B>,
    windows: &[Vec<u32>],
    cfg: &PgConfig,
    init: &PgInit,
    run: &PgRun,
) -> Result<PgOutcome> {
    anyhow::ensure!(
        cfg.held_out < windows.len(),
        "--held-out {} leaves no calibration window for the search out of {}; raise --calib-samples or lower --held-out",
        cfg.held_out,
        windows.len()
    );
    let (search_windows, held_out) = windows.split_at(windows.len() - cfg.held_out);
    let refit = judge_refit(run.refit);
    let ckpt = run.dir.join("checkpoint.json");
    // A resumed run's checkpoint is read and checked before any pass over the model.
    let resumed = if run.resume {
        let (s, space) = PgState::load(&ckpt, model.shape())?;
        // Under compensation_auto the checkpoint holds the rule the start chose.
        let expected = PgConfig {
            compensation: if cfg.compensation_auto {
                s.config.compensation
            } else {
                cfg.compensation
            },
            ..cfg.clone()
        };
        if s.config != expected {
            anyhow::bail!(
                "--resume: the settings differ from the checkpoint's ({}); resume with the same flags, or start over with --force",
                settings_diff(
                    &serde_json::to_value(&s.config)?,
                    &serde_json::to_value(&expected)?
                )
            );
        }
        for key in ["model", "dtype", "calibration", "init"] {
            // Only what this run records is checked: a comparison's cell records its settings
            // under `compare` (and its dtype at the top too since 2026-12-05).
            let Some(now) = run.meta.get(key) else {
                continue;
            };
            let was = s
                .meta
                .get(key)
                .or_else(|| s.meta.get("compare").and_then(|c| c.get(key)))
                .cloned()
                // Checkpoints from before `--dtype` existed ran in f32.
                .or_else(|| {
                    (key == "dtype" && s.meta.is_object()).then(|| serde_json::json!("f32"))
                });
            anyhow::ensure!(
                was.as_ref().is_none_or(|w| w == now),
                "--resume: this run's {key} ({now}) is not the checkpoint's ({}); resume with the same --model, --dtype and calibration flags, or start over with --force",
                was.map_or("none".into(), |v| v.to_string()),
            );
        }
        Some((s, space))
    } else {
        None
    };
    let means = if cfg.compensation {
        let n = search_windows.len().min(init.metric_samples);
        let (o_proj, down_proj) =
            lopper_importance::input_means(model, &search_windows[..n], cfg.batch_size)?;
        Some(InputMeans { o_proj, down_proj })
    } else {
        None
    };
    // Its memory was checked by the command (`guard::proxy_fits`) before any work.
    let proxy = if cfg.refit_proxy {
        let n = search_windows.len().min(init.metric_samples);
        let t = Instant::now();
        let p = lopper_sparse::RefitProxy::collect(
            model,
            &search_windows[..n],
            cfg.batch_size,
            lopper_sparse::ReconSettings::default().damp,
        )?;
        tracing::info!(
            seconds = t.elapsed().as_secs_f64(),
            windows = n,
            "refit proxy statistics"
        );
        Some(p)
    } else {
        None
    };
    let (mut state, space) = if let Some((s, space)) = resumed {
        tracing::info!(step = s.step, "resuming");
        (s, space)
    } else {
        let (start, judged, compensation) = pg_init(
            init,
            model,
            search_windows,
            held_out,
            refit,
            means.as_ref(),
            cfg,
        )?;
        let cfg = PgConfig {
            compensation,
            ..cfg.clone()
        };
        let space = cfg.space(model.shape(), &start)?;
        let mut s = PgState::new(cfg, &space, &start)?;
        s.init_judged = judged;
        s.meta = run.meta.clone();
        (s, space)
    };
    let mut curve = open_curve(run.dir, state.step)?;
    let stop = ctrl_c_flag();
    let bar = crate::progress::bar(
        cfg.steps as u64,
        "pg [{bar:30}] step {pos}/{len} {msg} eta {eta}",
    )?;
    bar.set_position(state.step as u64);
    let mut first_loss = None;
    let mut last = None;
    let finished = lopper_policy::search_with(
        model,
        search_windows,
        means.as_ref(),
        proxy.as_ref(),
        &space,
        &mut state,
        Hooks {
            on_step: &mut |r, _| {
                writeln!(curve, "{}", serde_json::to_string(r).expect("serialisable"))
                    .and_then(|_| curve.flush())
                    .map_err(|e| {
                        lopper_policy::Error::Config(format!("writing curve.jsonl: {e}"))
                    })?;
                bar.set_position(r.step as u64 + 1);
                bar.set_message(format!("loss {:.4} baseline {:.4}", r.loss, r.baseline));
                first_loss.get_or_insert(r.loss);
                last = Some(r.clone());
                Ok(())
            },
            should_stop: &|| {
                stop.load(Ordering::SeqCst)
                    || run.stop_after.is_some_and(|n| bar.position() as usize >= n)
            },
            checkpoint: &mut |s| s.save(&ckpt),
            checkpoint_every: run.checkpoint_every,
        },
    )?;
    bar.finish_and_clear();
    if !finished {
        bail!(
            "interrupted at step {}; checkpoint written to {}; run the same command again{} to continue",
            state.step,
            ckpt.display(),
            if run.resume { "" } else { " with --resume" }
        );
    }
    let (plan, _) = lopper_policy::choose(
        model,
        refit.unwrap_or(RefitWindows {
            fit: search_windows,
            held_out,
            batch_size: cfg.batch_size,
            inputs: InputRefit::default(),
        }),
        held_out,
        means.as_ref(),
        &space,
        &state,
    )?;
    Ok(PgOutcome {
        plan,
        curve: Some((first_loss, last)),
        means,
    })
}

/// `dir/curve.jsonl` opened for appending, its lines at or after `step` dropped (a resumed run
/// writes them again).
pub fn open_curve(dir: &Path, step: usize) -> Result<std::fs::File> {
    let path = dir.join("curve.jsonl");
    keep_curve_until(&path, step)?;
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .with_context(|| format!("opening {}", path.display()))
}

/// A flag that Ctrl-C sets: long runs check it between steps, checkpoint and stop. A second
/// Ctrl-C while the checkpoint is written is ignored; SIGKILL loses at most the steps since the
/// last checkpoint. Only the first handler of a process is installed.
pub fn ctrl_c_flag() -> Arc<AtomicBool> {
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    let _ = ctrlc::set_handler(move || flag.store(true, Ordering::SeqCst));
    stop
}

/// Drops curve lines at or after `step` (a resumed run rewrites them).
fn keep_curve_until(path: &Path, step: usize) -> Result<()> {
    if !path.is_file() {
        return Ok(());
    }
    let text = std::fs::read_to_string(path)?;
    let kept: String = text
        .lines()
        .filter(|l| {
            serde_json::from_str::<serde_json::Value>(l)
                .ok()
                .and_then(|v| v["step"].as_u64())
                .is_some_and(|s| (s as usize) < step)
        })
        .map(|l| format!("{l}\n"))
        .collect();
    lopper_core::write_atomic(path, kept.as_bytes())?;
    Ok(())
}

/// Draws the calibration windows (`--calib`, `--sampler`, ...) with the model's tokenizer.
pub fn draw_calibration(
    tok: &lopper_model::Tokenizer,
    calib: &str,
    sampler: lopper_data::Sampler,
    samples: usize,
    seq_len: usize,
    seed: u64,
) -> Result<lopper_data::Calibration> {
    let dirs = lopper_data::DataDirs::from_env(&lopper_model::lopper_home());
    let (path, docs) = lopper_data::load_documents(calib, &dirs)?;
    let encode = |t: &str| tok.encode(t).map_err(|e| e.to_string());
    let c = lopper_data::sample(
        calib, &path, &docs, &encode, sampler, samples, seq_len, seed,
    )?;
    tracing::info!(windows = c.windows.len(), seq_len, "calibration data drawn");
    Ok(c)
}
