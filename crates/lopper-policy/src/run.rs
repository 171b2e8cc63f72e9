//! The search loop on a model: batches, checkpoints, interruption.

use burn::tensor::backend::Backend;

use serde::{Deserialize, Serialize};

use crate::space::UnitSpace;
use crate::state::{PgState, StepRecord};
use crate::{Error, Result};
use lopper_core::MaskPlan;
use lopper_model::Llama;
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
    if windows.is_empty() {
        return Err(Error::Config("no calibration windows".into()));
    }
    let means = compensation(state, means)?;
    while state.step < state.config.steps {
        if (hooks.should_stop)() {
            (hooks.checkpoint)(state)?;
            return Ok(false);
        }
        let ids = state.next_batch(windows.len());
        let rows: Vec<Vec<u32>> = ids.iter().map(|&i| windows[i].clone()).collect();
        let tokens = model.tokens(&rows)?;
        let record = state.step(space, &mut |plan| {
            Ok(mean_loss_kept(model, plan, means, tokens.clone())?)
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
    /// `(candidate, held-out loss)`: `search` (the top-k plan of the final probabilities) and,
    /// for a plan start, `init`.
    pub candidates: Vec<(String, f64)>,
    /// The chosen candidate.
    pub chosen: String,
    /// Held-out windows scored.
    pub windows: usize,
    /// The initial plan's provenance (its `meta`: method, candidates of an automatic start).
    pub init: serde_json::Value,
}

/// The plan a finished search returns: its top-k plan ([`PgState::final_plan`]), or, when the
/// config holds windows out and the search started from a plan, whichever of the two has the
/// lower mean loss on the `held_out` windows (scored as the search scores masks, ties to the
/// search's plan). `None` as the choice when nothing was compared.
pub fn choose<B: Backend>(
    model: &Llama<B>,
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
    let means = compensation(state, means)?;
    let loss = |plan: &MaskPlan| -> Result<f64> {
        Ok(windows_loss_kept(
            model,
            plan,
            means,
            held_out,
            state.config.batch_size,
        )?)
    };
    let (ls, li) = (loss(&searched)?, loss(init)?);
    tracing::info!(
        search = ls,
        init = li,
        "held-out loss of the final candidates"
    );
    let use_init = li < ls;
    let choice = Choice {
        candidates: vec![("search".into(), ls), ("init".into(), li)],
        chosen: if use_init { "init" } else { "search" }.into(),
        windows: held_out.len(),
        init: serde_json::to_value(&init.meta).expect("serialisable"),
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
