//! The search loop on a model: batches, checkpoints, interruption.

use burn::tensor::backend::Backend;

use crate::Result;
use crate::space::UnitSpace;
use crate::state::{PgState, StepRecord};
use lopper_model::Llama;
use lopper_surgery::mean_loss_kept;

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
/// ([`mean_loss_kept`]), so a step's cost falls with sparsity; the model is never modified.
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
/// let mut cfg = PgConfig::new(0.5);
/// cfg.steps = 3;
/// let space = UnitSpace::new(model.shape(), &cfg.units)?;
/// let mut state = PgState::new(cfg, &space, &Init::Uniform)?;
/// let mut losses = Vec::new();
/// let finished = search(&model, &windows, &space, &mut state, Hooks {
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
    space: &UnitSpace,
    state: &mut PgState,
    hooks: Hooks<'_>,
) -> Result<bool> {
    if windows.is_empty() {
        return Err(crate::Error::Config("no calibration windows".into()));
    }
    while state.step < state.config.steps {
        if (hooks.should_stop)() {
            (hooks.checkpoint)(state)?;
            return Ok(false);
        }
        let ids = state.next_batch(windows.len());
        let rows: Vec<Vec<u32>> = ids.iter().map(|&i| windows[i].clone()).collect();
        let tokens = model.tokens(&rows)?;
        let record = state.step(space, &mut |plan| {
            Ok(mean_loss_kept(model, plan, tokens.clone())?)
        })?;
        (hooks.on_step)(&record, state)?;
        if hooks.checkpoint_every > 0 && state.step.is_multiple_of(hooks.checkpoint_every) {
            (hooks.checkpoint)(state)?;
        }
    }
    (hooks.checkpoint)(state)?;
    Ok(true)
}
