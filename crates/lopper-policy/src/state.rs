//! The search state, one step of the estimator, checkpoints and the final plan.

use std::path::Path;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::space::{Budget, UnitSpace, project, sigmap};
use crate::{Error, Result};
use lopper_core::{MaskPlan, PruneUnit, UnitKind, UnitScores, keep_count, top_k};

/// The gradient estimator.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Estimator {
    /// The reference code's `(L - b)(m - s) / sqrt(s(1 - s))`: REINFORCE preconditioned by
    /// `sqrt(s(1 - s))`.
    Ref,
    /// The exact score function of a Bernoulli, `(L - b)(m - s) / (s(1 - s))`.
    Score,
}

/// The update rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Optimizer {
    /// Plain SGD (the reference).
    Sgd,
    /// Adam (beta1 0.9, beta2 0.999, eps 1e-8).
    Adam,
}

/// Learning-rate schedule over the run's steps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Schedule {
    /// `lr * (1 + cos(pi t / T)) / 2` (the reference).
    Cosine,
    /// `lr` throughout.
    Constant,
}

/// How the keep-probabilities start.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "type")]
pub enum Init {
    /// Every probability = keep.
    Uniform,
    /// `sigmap` of standard-normal scores, per layer and type.
    Random,
    /// `sigmap` of a metric's scores, per layer and type (Wanda-sp by default).
    Scores {
        /// The scores.
        scores: UnitScores,
    },
}

/// The resolved settings of a search; written into every checkpoint and output.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PgConfig {
    /// Fraction of the pool's parameters removed (not kept).
    pub sparsity: f64,
    /// Searched unit kinds.
    pub units: Vec<UnitKind>,
    /// Budget.
    pub budget: Budget,
    /// Estimator.
    pub estimator: Estimator,
    /// Update rule.
    pub optimizer: Optimizer,
    /// Learning rate of KV-group probabilities.
    pub lr_heads: f64,
    /// Learning rate of channel probabilities.
    pub lr_channels: f64,
    /// Learning rate of layer probabilities.
    pub lr_layers: f64,
    /// Schedule.
    pub schedule: Schedule,
    /// Total steps.
    pub steps: usize,
    /// Masks sampled per step (K).
    pub samples_per_step: usize,
    /// Calibration windows per step.
    pub batch_size: usize,
    /// Moving-average window of the baseline (`b <- (1 - 1/w) b + (1/w) mean loss`).
    pub ma_window: f64,
    /// Seed of mask sampling (and of the random init).
    pub seed: u64,
}

impl PgConfig {
    /// The command line's defaults at `sparsity`: KV groups and MLP channels, one budget per
    /// type, the reference estimator with SGD at lr 2e-3 and a cosine schedule, 40 steps of
    /// 2 masks x 4 windows, baseline window 5, seed 42. Change the fields you need.
    pub fn new(sparsity: f64) -> Self {
        Self {
            sparsity,
            units: vec![UnitKind::KvGroup, UnitKind::Channel],
            budget: Budget::PerType,
            estimator: Estimator::Ref,
            optimizer: Optimizer::Sgd,
            lr_heads: 2e-3,
            lr_channels: 2e-3,
            lr_layers: 2e-3,
            schedule: Schedule::Cosine,
            steps: 40,
            samples_per_step: 2,
            batch_size: 4,
            ma_window: 5.0,
            seed: 42,
        }
    }

    /// The kept fraction.
    pub fn keep(&self) -> f64 {
        1.0 - self.sparsity
    }

    /// Checks every setting, naming the flag at fault.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::Config(m));
        if !(self.sparsity > 0.0 && self.sparsity < 1.0) {
            return bad(format!(
                "--sparsity {} is impossible: give the fraction of parameters to remove, strictly between 0 and 1",
                self.sparsity
            ));
        }
        if self.samples_per_step < 1 || self.batch_size < 1 || self.steps < 1 {
            return bad(
                "--steps, --samples-per-step and --batch-size must each be at least 1".into(),
            );
        }
        for lr in [self.lr_heads, self.lr_channels, self.lr_layers] {
            if !(lr.is_finite() && lr > 0.0) {
                return bad(format!("--lr {lr} must be a positive number"));
            }
        }
        if self.ma_window < 1.0 {
            return bad(format!(
                "the baseline window {} must be at least 1",
                self.ma_window
            ));
        }
        if self.units.contains(&UnitKind::Layer) && self.budget == Budget::PerType {
            return bad(
                "--units layers needs --budget params: a per-type layer budget would remove layers on top of the per-type head and channel budgets"
                    .into(),
            );
        }
        Ok(())
    }

    fn lr(&self, kind: UnitKind) -> f64 {
        match kind {
            UnitKind::KvGroup => self.lr_heads,
            UnitKind::Channel => self.lr_channels,
            _ => self.lr_layers,
        }
    }
}

/// One step's record (a line of `curve.jsonl`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepRecord {
    /// Step index (0-based).
    pub step: usize,
    /// Loss of each sampled mask (NaN ones dropped).
    pub losses: Vec<f64>,
    /// Mean of the losses.
    pub loss: f64,
    /// Baseline after this step's update.
    pub baseline: f64,
    /// Learning rate used (of the KV-group probabilities).
    pub lr: f64,
    /// Mean binary entropy of the probabilities (nats).
    pub entropy: f64,
    /// Expected kept fraction of the pool's parameters.
    pub kept_fraction: f64,
}

/// Adam moments.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Moments {
    m: Vec<f64>,
    v: Vec<f64>,
}

/// Everything a search needs to continue bit-identically.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PgState {
    /// Resolved settings.
    pub config: PgConfig,
    /// Keep-probability per unit of the [`UnitSpace`].
    pub probs: Vec<f64>,
    /// Moving-average baseline (`None` before the first step).
    pub baseline: Option<f64>,
    /// Steps done (the next step's index; also the schedule position).
    pub step: usize,
    /// Next calibration window to read.
    pub cursor: usize,
    /// Mask-sampling RNG.
    rng: ChaCha8Rng,
    adam: Option<Moments>,
    /// Free-form run metadata kept with the state (model, calibration, command).
    #[serde(default)]
    pub meta: serde_json::Value,
}

/// Mean binary entropy (nats).
pub fn binary_entropy(s: &[f64]) -> f64 {
    let h = |p: f64| {
        let p = p.clamp(1e-12, 1.0 - 1e-12);
        -(p * p.ln() + (1.0 - p) * (1.0 - p).ln())
    };
    s.iter().map(|&p| h(p)).sum::<f64>() / s.len().max(1) as f64
}

const EPS: f64 = 1e-7;
/// Layer keep-probabilities start here: high, but off 1 (where the estimator's gradient vanishes).
const LAYER_INIT: f64 = 0.95;

impl PgState {
    /// A fresh state: initial probabilities from `init`, projected onto the budget.
    pub fn new(config: PgConfig, space: &UnitSpace, init: &Init) -> Result<Self> {
        config.validate()?;
        let keep = config.keep();
        let mut rng = ChaCha8Rng::seed_from_u64(config.seed);
        let shape = &space.shape;
        let mut probs = vec![keep; space.units.len()];
        let per_layer = |scores: &dyn Fn(&PruneUnit) -> f64, probs: &mut Vec<f64>| {
            for &(kind, start, end) in &space.kinds {
                if kind == UnitKind::Layer {
                    continue;
                }
                for layer in 0..shape.n_layers() {
                    let idx: Vec<usize> = (start..end)
                        .filter(|&i| space.units[i].layer() == layer)
                        .collect();
                    let m: Vec<f64> = idx.iter().map(|&i| scores(&space.units[i])).collect();
                    for (&i, p) in idx.iter().zip(sigmap(&m, keep)) {
                        probs[i] = p;
                    }
                }
            }
        };
        match init {
            Init::Uniform => {}
            Init::Random => {
                let normals: Vec<f64> = (0..space.units.len())
                    .map(|_| standard_normal(&mut rng))
                    .collect();
                let lookup: std::collections::HashMap<PruneUnit, f64> =
                    space.units.iter().copied().zip(normals).collect();
                per_layer(&|u| lookup[u], &mut probs);
            }
            Init::Scores { scores } => {
                scores.check(shape)?;
                per_layer(
                    &|u| match *u {
                        PruneUnit::KvGroup { layer, group } => scores.kv_groups[layer][group],
                        PruneUnit::Channel { layer, index } => scores.channels[layer][index],
                        _ => 0.0,
                    },
                    &mut probs,
                );
            }
        }
        for (u, p) in space.units.iter().zip(&mut probs) {
            if matches!(u, PruneUnit::Layer { .. }) {
                *p = LAYER_INIT;
            }
        }
        let mut state = Self {
            adam: (config.optimizer == Optimizer::Adam).then(|| Moments {
                m: vec![0.0; probs.len()],
                v: vec![0.0; probs.len()],
            }),
            config,
            probs,
            baseline: None,
            step: 0,
            cursor: 0,
            rng: ChaCha8Rng::seed_from_u64(0),
            meta: serde_json::Value::Null,
        };
        // The sampling stream is independent of the init's draws.
        state.rng = ChaCha8Rng::seed_from_u64(state.config.seed ^ 0x9e37_79b9_7f4a_7c15);
        state.project(space);
        Ok(state)
    }

    /// Projects the probabilities onto the budget.
    pub fn project(&mut self, space: &UnitSpace) {
        let keep = self.config.keep();
        match self.config.budget {
            Budget::PerType => {
                for &(_, start, end) in &space.kinds {
                    let n = (end - start) as f64;
                    project(
                        &mut self.probs[start..end],
                        keep * n,
                        &|s: &[f64]| s.iter().sum(),
                        1e-3,
                        20,
                        false,
                    );
                }
            }
            Budget::Params => {
                project(
                    &mut self.probs,
                    keep,
                    &|s: &[f64]| space.expected_kept(s),
                    1e-6,
                    60,
                    true,
                );
            }
        }
    }

    /// Learning rate of `kind` at the current step.
    pub fn lr(&self, kind: UnitKind) -> f64 {
        let base = self.config.lr(kind);
        match self.config.schedule {
            Schedule::Constant => base,
            Schedule::Cosine => {
                let t = self.step as f64 / self.config.steps as f64;
                base * (1.0 + (std::f64::consts::PI * t).cos()) / 2.0
            }
        }
    }

    /// Draws one binary mask (`true` = keep) from the current probabilities.
    pub fn sample(&mut self) -> Vec<bool> {
        let rng = &mut self.rng;
        self.probs
            .iter()
            .map(|&s| rng.random::<f64>() < s)
            .collect()
    }

    /// One step: sample K masks, score each with `loss(plan)` (forward passes only), update the
    /// baseline, estimate the gradient, update and project. A mask whose loss is not finite is
    /// dropped; if every one is, the step changes nothing but the step counter.
    pub fn step(
        &mut self,
        space: &UnitSpace,
        loss: &mut dyn FnMut(&MaskPlan) -> Result<f64>,
    ) -> Result<StepRecord> {
        let k = self.config.samples_per_step;
        let masks: Vec<Vec<bool>> = (0..k).map(|_| self.sample()).collect();
        let mut scored = Vec::with_capacity(k);
        for m in masks {
            let plan = space.plan_of(&m);
            let l = if plan.validate().is_ok() {
                loss(&plan)?
            } else {
                f64::NAN
            };
            if l.is_finite() {
                scored.push((m, l));
            } else {
                tracing::warn!(
                    step = self.step,
                    "a sampled mask gave a non-finite loss; dropped"
                );
            }
        }
        let lr_heads = self.lr(UnitKind::KvGroup);
        if !scored.is_empty() {
            let mean = scored.iter().map(|x| x.1).sum::<f64>() / scored.len() as f64;
            let lambda = 1.0 / self.config.ma_window;
            let b = self.baseline.unwrap_or(mean);
            let b = (1.0 - lambda) * b + lambda * mean;
            self.baseline = Some(b);
            let norm = 1.0 / (scored.len().saturating_sub(1).max(1)) as f64;
            let mut grad = vec![0.0; self.probs.len()];
            for (m, l) in &scored {
                for ((g, &s), &keep) in grad.iter_mut().zip(&self.probs).zip(m) {
                    let var = (s + EPS) * (1.0 - s + EPS);
                    let denom = match self.config.estimator {
                        Estimator::Ref => var.sqrt(),
                        Estimator::Score => var,
                    };
                    *g += norm * (l - b) * (keep as u8 as f64 - s) / denom;
                }
            }
            let lrs: Vec<f64> = space
                .kinds
                .iter()
                .map(|&(kind, _, _)| self.lr(kind))
                .collect();
            let t = (self.step + 1) as f64;
            for (ki, &(_, start, end)) in space.kinds.iter().enumerate() {
                for (i, &g) in grad.iter().enumerate().take(end).skip(start) {
                    let step = match &mut self.adam {
                        None => g,
                        Some(a) => {
                            a.m[i] = 0.9 * a.m[i] + 0.1 * g;
                            a.v[i] = 0.999 * a.v[i] + 0.001 * g * g;
                            let mh = a.m[i] / (1.0 - 0.9f64.powf(t));
                            let vh = a.v[i] / (1.0 - 0.999f64.powf(t));
                            mh / (vh.sqrt() + 1e-8)
                        }
                    };
                    self.probs[i] -= lrs[ki] * step;
                }
            }
            self.project(space);
        }
        let losses: Vec<f64> = scored.iter().map(|x| x.1).collect();
        let record = StepRecord {
            step: self.step,
            loss: if losses.is_empty() {
                f64::NAN
            } else {
                losses.iter().sum::<f64>() / losses.len() as f64
            },
            losses,
            baseline: self.baseline.unwrap_or(f64::NAN),
            lr: lr_heads,
            entropy: binary_entropy(&self.probs),
            kept_fraction: space.expected_kept(&self.probs),
        };
        self.step += 1;
        Ok(record)
    }

    /// The calibration windows of the next step (cycling through `n` windows), advancing the cursor.
    pub fn next_batch(&mut self, n: usize) -> Vec<usize> {
        let b = self.config.batch_size;
        let ids = (0..b).map(|j| (self.cursor + j) % n).collect();
        self.cursor = (self.cursor + b) % n;
        ids
    }

    /// The deterministic plan: per type, the `round(keep * n)` most probable units globally
    /// (ties to the lower index); with a parameter budget, units are removed from the least
    /// probable up while the removed parameters stay within the budget (a removed layer takes
    /// its remaining units with it).
    pub fn final_plan(&self, space: &UnitSpace) -> Result<MaskPlan> {
        let keep = self.config.keep();
        let mut mask = vec![true; self.probs.len()];
        match self.config.budget {
            Budget::PerType => {
                for &(_, start, end) in &space.kinds {
                    let s = &self.probs[start..end];
                    mask[start..end].iter_mut().for_each(|m| *m = false);
                    for i in top_k(s, keep_count(keep, s.len())) {
                        mask[start + i] = true;
                    }
                }
            }
            Budget::Params => {
                let target = self.config.sparsity * space.pool;
                let mut order: Vec<usize> = (0..self.probs.len()).collect();
                order.sort_by(|&a, &b| self.probs[a].total_cmp(&self.probs[b]).then(b.cmp(&a)));
                let mut removed = 0.0;
                let n_layers = space.shape.n_layers();
                let mut layer_gone = vec![false; n_layers];
                // Pool parameters still kept in each layer.
                let mut layer_left = vec![0.0; n_layers];
                let only_layers = space.kinds.iter().all(|k| k.0 == UnitKind::Layer);
                for (u, &c) in space.units.iter().zip(&space.cost) {
                    if !matches!(u, PruneUnit::Layer { .. }) || only_layers {
                        layer_left[u.layer()] += c;
                    }
                }
                let slack = space
                    .cost
                    .iter()
                    .copied()
                    .filter(|&c| c > 0.0)
                    .fold(f64::INFINITY, f64::min);
                for i in order {
                    let u = space.units[i];
                    let l = u.layer();
                    if layer_gone[l] {
                        continue;
                    }
                    let saves = match u {
                        PruneUnit::Layer { .. } => layer_left[l],
                        _ => space.cost[i],
                    };
                    if removed + saves > target + 0.5 * slack {
                        continue;
                    }
                    mask[i] = false;
                    removed += saves;
                    match u {
                        PruneUnit::Layer { .. } => {
                            layer_gone[l] = true;
                            layer_left[l] = 0.0;
                        }
                        _ => layer_left[l] -= saves,
                    }
                }
            }
        }
        let mut plan = space.plan_of(&mask);
        plan.validate()?;
        plan.meta.insert("method".into(), "pg".into());
        plan.meta
            .insert("sparsity".into(), self.config.sparsity.into());
        plan.meta.insert("steps".into(), self.step.into());
        Ok(plan)
    }

    /// The state as JSON (every f64 round-trips exactly).
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("serialisable")
    }

    /// Writes the state atomically.
    pub fn save(&self, path: &Path) -> Result<()> {
        lopper_core::write_atomic(path, self.to_json().as_bytes())?;
        Ok(())
    }

    /// Reads a state written by [`PgState::save`], checking it fits `space`.
    pub fn load(path: &Path, space: &UnitSpace) -> Result<Self> {
        let err = |msg: String| Error::Checkpoint {
            path: path.to_owned(),
            msg,
        };
        let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
        let s: Self = serde_json::from_str(&text)
            .map_err(|e| err(format!("not a lopper PG checkpoint: {e}")))?;
        if s.probs.len() != space.units.len() {
            return Err(err(format!(
                "{} probabilities for {} units: the checkpoint belongs to another model or --units",
                s.probs.len(),
                space.units.len()
            )));
        }
        Ok(s)
    }
}

/// A standard normal draw (Box-Muller), reproducible across platforms.
fn standard_normal(rng: &mut ChaCha8Rng) -> f64 {
    let u1: f64 = rng.random::<f64>().max(f64::MIN_POSITIVE);
    let u2: f64 = rng.random::<f64>();
    (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
}
