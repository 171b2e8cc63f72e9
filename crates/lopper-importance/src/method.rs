//! One entry point for every forward-only structured method: scores (or a layer order) and the
//! plan at a requested keep fraction.

use burn::tensor::backend::Backend;
use lopper_core::{Allocation, MaskPlan, UnitScores};
use lopper_model::Llama;

use crate::{Error, IfsoSettings, InputStats, Norm, Result, SpsaSettings, Taylor};

/// The forward-only structured pruning methods.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    /// Weight norm of each unit.
    Magnitude(Norm),
    /// Seeded uniform random scores.
    Random,
    /// Structured Wanda.
    WandaSp,
    /// FLAP: fluctuation metric, standardised, global parameter-weighted structure, bias
    /// compensation.
    Flap,
    /// ShortGPT: remove the layers of lowest block influence.
    BlockInfluence,
    /// SLEB: greedy layer removal by calibration loss.
    Sleb,
    /// LLM-Pruner: Taylor importance from autodiff gradients of the calibration loss.
    LlmPruner,
    /// LLM-BIP: block-output change, bounded in one forward pass.
    LlmBip,
    /// MINI-LLM: weight x SPSA gradient x activation, forward passes only.
    MiniLlm,
    /// IFSO: influence-function estimate of the loss change after retraining.
    Ifso,
}

impl Method {
    /// Every method, as named on the command line.
    pub const NAMES: &[&str] = &[
        "magnitude",
        "magnitude-l1",
        "random",
        "wanda-sp",
        "flap",
        "block-influence",
        "sleb",
        "llm-pruner",
        "llm-bip",
        "mini-llm",
        "ifso",
    ];

    /// The command-line name.
    pub fn name(self) -> &'static str {
        match self {
            Method::Magnitude(Norm::L2) => "magnitude",
            Method::Magnitude(Norm::L1) => "magnitude-l1",
            Method::Random => "random",
            Method::WandaSp => "wanda-sp",
            Method::Flap => "flap",
            Method::BlockInfluence => "block-influence",
            Method::Sleb => "sleb",
            Method::LlmPruner => "llm-pruner",
            Method::LlmBip => "llm-bip",
            Method::MiniLlm => "mini-llm",
            Method::Ifso => "ifso",
        }
    }

    /// Whether the method removes whole layers (and has no per-unit scores).
    pub fn removes_layers(self) -> bool {
        matches!(self, Method::BlockInfluence | Method::Sleb)
    }

    /// Whether the method reads calibration activations.
    pub fn needs_calibration(self) -> bool {
        !matches!(self, Method::Magnitude(_) | Method::Random)
    }

    /// The allocation the method's paper uses.
    pub fn default_allocation(self) -> Option<Allocation> {
        match self {
            Method::Flap | Method::Ifso => Some(Allocation::GlobalParams),
            Method::BlockInfluence | Method::Sleb => None,
            _ => Some(Allocation::PerLayer),
        }
    }
}

impl std::str::FromStr for Method {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        Ok(match s {
            "magnitude" | "magnitude-l2" => Method::Magnitude(Norm::L2),
            "magnitude-l1" => Method::Magnitude(Norm::L1),
            "random" => Method::Random,
            "wanda-sp" => Method::WandaSp,
            "flap" => Method::Flap,
            "block-influence" => Method::BlockInfluence,
            "sleb" => Method::Sleb,
            "llm-pruner" => Method::LlmPruner,
            "llm-bip" => Method::LlmBip,
            "mini-llm" => Method::MiniLlm,
            "ifso" => Method::Ifso,
            o => {
                return Err(Error::Invalid(format!(
                    "unknown method `{o}`; metric methods are {}",
                    Method::NAMES.join(", ")
                )));
            }
        })
    }
}

/// Settings of [`method_plan`].
#[derive(Debug, Clone)]
pub struct MethodSettings {
    /// Calibration windows per forward pass.
    pub batch_size: usize,
    /// Seed of `random`.
    pub seed: u64,
    /// Allocation; `None` takes the method's own ([`Method::default_allocation`]).
    pub allocation: Option<Allocation>,
    /// Bias compensation at surgery; `None` takes the method's own (on for FLAP only).
    pub bias_compensation: Option<bool>,
    /// SLEB never removes the first and last `sleb_barrier` layers (1 in the reference).
    pub sleb_barrier: usize,
    /// Unit methods: the first and last this many layers are kept whole (LLM-Pruner's
    /// block-wise range); `None` takes the method's own (1 for llm-pruner, 0 otherwise).
    pub skip_layers: Option<usize>,
    /// LLM-Pruner's Taylor variant.
    pub taylor: Taylor,
    /// MINI-LLM's SPSA estimate.
    pub spsa: SpsaSettings,
    /// IFSO's damping and batches.
    pub ifso: IfsoSettings,
}

impl Default for MethodSettings {
    fn default() -> Self {
        Self {
            batch_size: 4,
            seed: 0,
            allocation: None,
            bias_compensation: None,
            sleb_barrier: 1,
            skip_layers: None,
            taylor: Taylor::default(),
            spsa: SpsaSettings::default(),
            ifso: IfsoSettings::default(),
        }
    }
}

/// What a method produced.
#[derive(Debug, Clone)]
pub struct MethodPlan {
    /// The plan, with method, allocation and (for layer methods) removed layers in its meta.
    pub plan: MaskPlan,
    /// Per-unit scores (not for layer methods).
    pub scores: Option<UnitScores>,
    /// Per-layer values: block influence, or SLEB's loss after each removal round.
    pub layer_values: Option<Vec<f64>>,
    /// Calibration input means for bias compensation, when it is on.
    pub compensation: Option<InputStats>,
}

/// The plan of a unit method's `scores` at `keep`, under the method's allocation and protected
/// layers (what [`method_plan`] does after scoring; scores do not depend on `keep`, so one
/// scoring serves every sparsity).
pub fn plan_from_scores(
    shape: &lopper_core::ModelShape,
    method: Method,
    scores: &UnitScores,
    keep: f64,
    settings: &MethodSettings,
) -> Result<MaskPlan> {
    let alloc = settings
        .allocation
        .or(method.default_allocation())
        .ok_or_else(|| {
            Error::Invalid(format!(
                "{} removes whole layers and has no unit scores",
                method.name()
            ))
        })?;
    let skip = settings
        .skip_layers
        .unwrap_or(usize::from(method == Method::LlmPruner));
    let n = shape.n_layers();
    if 2 * skip >= n && skip > 0 {
        return Err(Error::Invalid(format!(
            "--skip-layers {skip} keeps all {n} layers whole; nothing is left to prune"
        )));
    }
    let protected: Vec<usize> = (0..skip).chain(n.saturating_sub(skip)..n).collect();
    Ok(scores.plan_protected(shape, keep, alloc, &protected)?)
}

/// Runs `method` on the dense `model` and returns its plan keeping `keep` of the prunable
/// parameters. `windows` is the calibration set (unused by magnitude and random);
/// `on_progress(message)` reports long steps (SLEB rounds).
pub fn method_plan<B: Backend>(
    model: &Llama<B>,
    windows: &[Vec<u32>],
    method: Method,
    keep: f64,
    settings: &MethodSettings,
    mut on_progress: impl FnMut(&str),
) -> Result<MethodPlan> {
    lopper_core::check_keep(keep)?;
    let shape = model.shape();
    if method.removes_layers() {
        if settings.allocation.is_some() {
            return Err(Error::Invalid(format!(
                "{} removes whole layers; --allocation does not apply to it",
                method.name()
            )));
        }
        if settings.skip_layers.is_some_and(|k| k > 0) {
            return Err(Error::Invalid(format!(
                "{} removes whole layers; --skip-layers applies to unit methods",
                method.name()
            )));
        }
    }
    let compensate = settings.bias_compensation.unwrap_or(method == Method::Flap);
    let allocation = settings.allocation.or(method.default_allocation());
    let (scores, mut means) = match method {
        Method::Magnitude(norm) => (Some(crate::magnitude(model, norm)?), None),
        Method::Random => (Some(crate::random(shape, settings.seed)), None),
        Method::WandaSp => (
            Some(crate::wanda_sp(model, windows, settings.batch_size)?),
            None,
        ),
        Method::Flap => {
            let f = crate::flap(model, windows, settings.batch_size)?;
            (Some(f.scores), Some(f.means))
        }
        Method::LlmPruner => (
            Some(crate::llm_pruner(
                model,
                windows,
                settings.batch_size,
                settings.taylor,
            )?),
            None,
        ),
        Method::LlmBip => (
            Some(crate::llm_bip(model, windows, settings.batch_size)?),
            None,
        ),
        Method::MiniLlm => {
            let spsa = SpsaSettings {
                seed: settings.seed,
                ..settings.spsa
            };
            (
                Some(crate::mini_llm(model, windows, settings.batch_size, &spsa)?),
                None,
            )
        }
        Method::Ifso => (
            Some(crate::ifso(
                model,
                windows,
                settings.batch_size,
                &settings.ifso,
            )?),
            None,
        ),
        Method::BlockInfluence | Method::Sleb => (None, None),
    };
    if let (Some(scores), Some(_)) = (scores, allocation) {
        let plan = plan_from_scores(shape, method, &scores, keep, settings)?;
        if compensate && means.is_none() {
            means = Some(crate::input_means(model, windows, settings.batch_size)?);
        }
        return Ok(MethodPlan {
            plan,
            scores: Some(scores),
            layer_values: None,
            compensation: if compensate { means } else { None },
        });
    }
    let (order, values) = if method == Method::BlockInfluence {
        let bi = crate::block_influence(model, windows, settings.batch_size)?;
        (crate::block_influence_order(&bi), bi)
    } else {
        let rounds = crate::sleb(
            model,
            windows,
            settings.batch_size,
            keep,
            settings.sleb_barrier,
            |r| {
                on_progress(&format!(
                    "sleb: removed layer {} (loss {:.4})",
                    r.layer, r.loss
                ))
            },
        )?;
        (
            rounds.iter().map(|r| r.layer).collect(),
            rounds.iter().map(|r| r.loss).collect(),
        )
    };
    let plan = lopper_core::plan_drop_layers(shape, &order, keep, method.name())?;
    // A removed layer's mean output goes to the previous kept projection at surgery.
    let compensation = if compensate {
        Some(crate::input_means(model, windows, settings.batch_size)?)
    } else {
        None
    };
    Ok(MethodPlan {
        plan,
        scores: None,
        layer_values: Some(values),
        compensation,
    })
}
