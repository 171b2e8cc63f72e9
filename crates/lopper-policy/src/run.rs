//! The search loop on a model: batches, checkpoints, interruption.

use burn::tensor::backend::Backend;

use serde::{Deserialize, Serialize};

use crate::space::UnitSpace;
use crate::state::{Judge, PgConfig, PgState, StepRecord};
use crate::{Error, Result};
use lopper_core::MaskPlan;
use lopper_model::Llama;
use lopper_sparse::RefitProxy;
use lopper_surgery::{InputMeans, mean_loss_kept, windows_loss_kept};

/// Callbacks of a search.
#[allow(missing_debug_implementations)]
pub struct Hooks<'a> {
    /// Called after every step with its record and the new state.
    pub on_step: &'a mut dyn FnMut(&StepRecord, &PgState) -> Result<()>,
    /// Polled before every step; `true` checkpoints and returns.
    pub should_stop: &'a dyn Fn() -> bool,
    /// Writes a checkpoint.
    pub checkpoint: &'a mut dyn FnMut(&PgState) -> Result<()>,
    /// Checkpoint every this many steps (0: only at the end and on stop).
    pub checkpoint_every: usize,
}

/// Runs `state` to `state.config.steps` on `model` with the calibration `windows`. Each step
/// scores its sampled masks with forward passes of the model sliced to the kept units
/// ([`mean_loss_kept`], with the bias compensation of `means` when the config asks for it), so
/// a step's cost falls with sparsity; the model is never modified.
/// Returns `false` when stopped early (after checkpointing).
///
/// ```
/// use burn_flex::{Flex, FlexDevice};
/// use lopper_core::ModelShape;
/// use lopper_model::Llama;
/// use lopper_policy::{Hooks, Init, PgConfig, PgState, UnitSpace, search};
///
/// let model = Llama::<Flex>::random(&ModelShape::tiny(), 0, &FlexDevice)?;
/// let windows: Vec<Vec<u32>> = (0..8)
///     .map(|w| (0..16).map(|t| (w * 16 + t * 5) % 128).collect())
///     .collect();
/// let mut cfg = PgConfig::reference(0.5);
/// cfg.steps = 3;
/// let space = UnitSpace::new(model.shape(), &cfg.units)?;
/// let mut state = PgState::new(cfg, &space, &Init::Uniform)?;
/// let mut losses = Vec::new();
/// let finished = search(&model, &windows, None, &space, &mut state, Hooks {
///     on_step: &mut |r, _| {
///         losses.push(r.loss);
///         Ok(())
///     },
///     should_stop: &|| false,
///     checkpoint: &mut |_| Ok(()),
///     checkpoint_every: 0,
/// })?;
/// assert!(finished && state.step == 3);
/// assert!(losses.len() == 3 && losses.iter().all(|l| l.is_finite()));
/// // The final plan keeps half of the KV groups and half of the MLP channels, over all layers.
/// let plan = state.final_plan(&space)?;
/// assert!((plan.kept_param_ratio() - 0.5).abs() < 1e-9);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn search<B: Backend>(
    model: &Llama<B>,
    windows: &[Vec<u32>],
    means: Option<&InputMeans>,
    space: &UnitSpace,
    state: &mut PgState,
    hooks: Hooks<'_>,
) -> Result<bool> {
    search_with(model, windows, means, None, space, state, hooks)
}

/// [`search`], with the statistics of the refit proxy that a config with
/// [`PgConfig::refit_proxy`] scores its masks with ([`lopper_sparse::RefitProxy::mean_loss`]).
pub fn search_with<B: Backend>(
    model: &Llama<B>,
    windows: &[Vec<u32>],
    means: Option<&InputMeans>,
    proxy: Option<&RefitProxy>,
    space: &UnitSpace,
    state: &mut PgState,
    hooks: Hooks<'_>,
) -> Result<bool> {
    if windows.is_empty() {
        return Err(Error::Config("no calibration windows".into()));
    }
    let means = compensation(state, means)?;
    let proxy = match (state.config.refit_proxy, proxy) {
        (false, _) => None,
        (true, Some(p)) => Some(p),
        (true, None) => {
            return Err(Error::Config(
                "a search that scores masks through the refit proxy needs its statistics (RefitProxy::collect on the dense model)".into(),
            ));
        }
    };
    while state.step < state.config.steps {
        if (hooks.should_stop)() {
            (hooks.checkpoint)(state)?;
            return Ok(false);
        }
        let ids = state.next_batch(windows.len());
        let rows: Vec<Vec<u32>> = ids.iter().map(|&i| windows[i].clone()).collect();
        let tokens = model.tokens(&rows)?;
        let record = state.step(space, &mut |plan| match proxy {
            Some(p) => Ok(p.mean_loss(model, plan, tokens.clone())?),
            None => Ok(mean_loss_kept(model, plan, means, tokens.clone())?),
        })?;
        (hooks.on_step)(&record, state)?;
        if hooks.checkpoint_every > 0 && state.step.is_multiple_of(hooks.checkpoint_every) {
            (hooks.checkpoint)(state)?;
        }
    }
    (hooks.checkpoint)(state)?;
    Ok(true)
}

fn compensation<'a>(
    state: &PgState,
    means: Option<&'a InputMeans>,
) -> Result<Option<&'a InputMeans>> {
    if !state.config.compensation {
        return Ok(None);
    }
    means.map(Some).ok_or_else(|| {
        Error::Config(
            "bias compensation inside the search needs the calibration input means of the dense model"
                .into(),
        )
    })
}

/// The final choice of a search: every candidate plan's mean loss on the held-out windows.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Choice {
    /// `(candidate, held-out loss)` under the judge: `search` (the top-k plan of the final
    /// probabilities) and, for a plan start, `init`.
    pub candidates: Vec<(String, f64)>,
    /// The chosen candidate.
    pub chosen: String,
    /// Held-out windows scored.
    pub windows: usize,
    /// The initial plan's provenance (its `meta`: method, candidates of an automatic start).
    pub init: serde_json::Value,
    /// How the candidates were scored.
    #[serde(default)]
    pub judge: Judge,
    /// Under a least-squares judge, the candidates' masked losses too.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub masked: Vec<(String, f64)>,
    /// Under a least-squares judge, `(windows refit on, windows the refit model was scored
    /// on, tokens per window)`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refit: Option<(usize, usize, usize)>,
}

/// A candidate plan's held-out losses: masked (as the search scores masks), and after a
/// least-squares cut where the judge made one.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Judged {
    /// Mean loss of the masked model (with the search's compensation when on).
    pub masked: f64,
    /// Mean loss of the least-squares cut model (`None`: not refit).
    pub reconstructed: Option<f64>,
}

impl Judged {
    /// The loss the judge ranks by: the reconstructed loss where there is one; candidates the
    /// least-squares judge did not refit rank after every refit one.
    pub fn score(&self, judge: Judge) -> f64 {
        match judge {
            Judge::Masked => self.masked,
            Judge::Reconstructed { .. } => self.reconstructed.unwrap_or(f64::INFINITY),
        }
    }
}

/// The calibration a least-squares judge ([`Judge::Reconstructed`]) refits each candidate on
/// and scores the refit model on. The refit should read the windows the shipped cut reads (on
/// the default model the cut's 512-token windows rank plans differently from the search's
/// 128-token ones), and the scoring windows must be apart from them.
#[derive(Debug, Clone, Copy)]
pub struct RefitWindows<'a> {
    /// Windows the refit reads (the first `windows` of them, as the judge says).
    pub fit: &'a [Vec<u32>],
    /// Windows the refit model is scored on.
    pub held_out: &'a [Vec<u32>],
    /// Windows per forward pass over these windows.
    pub batch_size: usize,
    /// Which input projections the shipped cut refits as well.
    pub inputs: lopper_sparse::InputRefit,
}

/// Scores candidate plans on the `held_out` windows as `cfg.judge` says. Every plan gets its
/// masked loss (with `means` when `cfg.compensation`); under [`Judge::Reconstructed`] the best
/// `top` of them (distinct plans only) are also cut and refit by least squares on the first
/// `windows` of `refit.fit`, and the refit model is scored on `refit.held_out`. `known[i]`,
/// where given, is plan `i`'s losses from an earlier call on the same windows (they are
/// reused, not recomputed). Returns one [`Judged`] per plan and the index of the best one by
/// [`Judged::score`] (ties to the earlier plan).
#[allow(clippy::too_many_arguments)]
pub fn judge_plans<B: Backend>(
    model: &Llama<B>,
    plans: &[&MaskPlan],
    known: &[Option<Judged>],
    means: Option<&InputMeans>,
    refit: RefitWindows,
    held_out: &[Vec<u32>],
    cfg: &PgConfig,
) -> Result<(Vec<Judged>, usize)> {
    if plans.is_empty() {
        return Err(Error::Config("no candidate plan to judge".into()));
    }
    let means = if cfg.compensation {
        Some(means.ok_or_else(|| {
            Error::Config(
                "judging with bias compensation needs the calibration input means of the dense model"
                    .into(),
            )
        })?)
    } else {
        None
    };
    // One score per distinct plan (the search often ends on its start): `class[i]` is the
    // first plan equal to plan `i`, and a known loss of any plan stands for its whole class.
    let n = plans.len();
    let class: Vec<usize> = (0..n)
        .map(|i| {
            (0..i)
                .find(|&j| plans[j].layers == plans[i].layers)
                .unwrap_or(i)
        })
        .collect();
    let mut scored: Vec<Option<Judged>> = vec![None; n];
    for (i, k) in known.iter().enumerate().take(n) {
        if let Some(k) = k {
            scored[class[i]] = Some(*k);
        }
    }
    let reps: Vec<usize> = (0..n).filter(|&i| class[i] == i).collect();
    for &i in &reps {
        if scored[i].is_none() {
            let masked = windows_loss_kept(model, plans[i], means, held_out, cfg.batch_size)?;
            scored[i] = Some(Judged {
                masked,
                reconstructed: None,
            });
        }
    }
    let mut judged: Vec<Judged> = reps
        .iter()
        .map(|&i| scored[i].expect("every distinct plan is scored"))
        .collect();
    if let Judge::Reconstructed { windows, top } = cfg.judge {
        let fit = &refit.fit[..windows.min(refit.fit.len())];
        if fit.is_empty() || refit.held_out.is_empty() || refit.batch_size == 0 {
            return Err(Error::Config(
                "the least-squares judge needs calibration windows to refit on and to score on, and a batch size of at least 1".into(),
            ));
        }
        let mut order: Vec<usize> = (0..reps.len()).collect();
        order.sort_by(|&a, &b| judged[a].masked.total_cmp(&judged[b].masked));
        let todo: Vec<usize> = order
            .into_iter()
            .take(top)
            .filter(|&r| judged[r].reconstructed.is_none())
            .collect();
        for (done, &r) in todo.iter().enumerate() {
            // Minutes each on a CPU, with no other output: say which one runs.
            tracing::info!(
                candidate = reps[r],
                masked = judged[r].masked,
                "least-squares judge: refitting candidate {} of {}",
                done + 1,
                todo.len()
            );
            let settings = lopper_sparse::ReconSettings {
                batch_size: refit.batch_size,
                inputs: refit.inputs,
                ..lopper_sparse::ReconSettings::default()
            };
            let (cut, _, _) =
                lopper_sparse::reconstruct(model, plans[reps[r]], fit, &settings, |_| {})?;
            let all = MaskPlan::keep_all(cut.shape());
            let loss = windows_loss_kept(&cut, &all, None, refit.held_out, refit.batch_size)?;
            tracing::info!(
                candidate = reps[r],
                reconstructed = loss,
                "least-squares judge: held-out loss after the cut"
            );
            judged[r].reconstructed = Some(loss);
        }
    }
    let judged: Vec<Judged> = class
        .iter()
        .map(|c| judged[reps.binary_search(c).expect("a class is a distinct plan")])
        .collect();
    let best = (0..plans.len())
        .min_by(|&a, &b| {
            judged[a]
                .score(cfg.judge)
                .total_cmp(&judged[b].score(cfg.judge))
                .then(a.cmp(&b))
        })
        .expect("at least one plan");
    Ok((judged, best))
}

/// The plan a finished search returns: its top-k plan ([`PgState::final_plan`]), or, when the
/// config holds windows out and the search started from a plan, whichever of the two scores
/// better under the config's [`Judge`] ([`judge_plans`]: on the `held_out` windows as the
/// search scores masks, or after a least-squares cut on `refit`; ties to the search's plan).
/// `None` as the choice when nothing was compared.
pub fn choose<B: Backend>(
    model: &Llama<B>,
    refit: RefitWindows,
    held_out: &[Vec<u32>],
    means: Option<&InputMeans>,
    space: &UnitSpace,
    state: &PgState,
) -> Result<(MaskPlan, Option<Choice>)> {
    let searched = state.final_plan(space)?;
    let init = match &state.init_plan {
        Some(p) if state.config.held_out > 0 && !held_out.is_empty() => p,
        _ => return Ok((searched, None)),
    };
    let cfg = &state.config;
    let (judged, best) = judge_plans(
        model,
        &[&searched, init],
        &[None, state.init_judged],
        means,
        refit,
        held_out,
        cfg,
    )?;
    let (ls, li) = (judged[0].score(cfg.judge), judged[1].score(cfg.judge));
    tracing::info!(
        search = ls,
        init = li,
        "held-out loss of the final candidates"
    );
    let use_init = best == 1;
    let (masked, refit) = match cfg.judge {
        Judge::Masked => (Vec::new(), None),
        Judge::Reconstructed { windows, .. } => (
            vec![
                ("search".into(), judged[0].masked),
                ("init".into(), judged[1].masked),
            ],
            Some((
                windows.min(refit.fit.len()),
                refit.held_out.len(),
                refit.held_out.first().map_or(0, Vec::len),
            )),
        ),
    };
    let choice = Choice {
        candidates: vec![("search".into(), ls), ("init".into(), li)],
        chosen: if use_init { "init" } else { "search" }.into(),
        windows: held_out.len(),
        init: serde_json::to_value(&init.meta).expect("serialisable"),
        judge: cfg.judge,
        masked,
        refit,
    };
    let mut plan = if use_init {
        let mut p = init.clone();
        p.meta = searched.meta.clone();
        p
    } else {
        searched
    };
    plan.meta.insert(
        "final_choice".into(),
        serde_json::to_value(&choice).expect("serialisable"),
    );
    Ok((plan, Some(choice)))
}
