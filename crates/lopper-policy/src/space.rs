//! The searched units, budgets and the projection.

use serde::{Deserialize, Serialize};

use crate::{Error, Result};
use lopper_core::{LayerPlan, MaskPlan, ModelShape, PruneUnit, UnitKind};

/// What the sparsity constraint counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Budget {
    /// Each unit type keeps the same fraction of its units, globally across layers (reference).
    PerType,
    /// One budget in parameters across all unit types: the expected kept parameters of the
    /// searched pool equal `keep` times the pool, so heads, channels and layers trade freely.
    Params,
}

impl std::str::FromStr for Budget {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "per-type" => Ok(Self::PerType),
            "params" => Ok(Self::Params),
            o => Err(Error::Config(format!(
                "unknown --budget `{o}`: use per-type or params"
            ))),
        }
    }
}

/// How a parameter budget projects the probabilities after each update.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Projection {
    /// Every probability moves by the same shift `s_i - v` (the reference's projection). It is
    /// exact in the metric that weights each unit by its parameters, so a cheap unit pays as
    /// much of the budget as an expensive one.
    #[default]
    Shift,
    /// Each probability moves by its share of the budget, `s_i - v * d_i / mean(d)` with
    /// `d_i` the derivative of the expected kept parameters by `s_i`
    /// ([`UnitSpace::expected_kept_grad`]): the Euclidean projection onto the budget, linearised
    /// at the current probabilities. A unit that holds many parameters pays more of an
    /// overspent budget.
    Cost,
}

impl std::str::FromStr for Projection {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "shift" => Ok(Self::Shift),
            "cost" => Ok(Self::Cost),
            o => Err(Error::Config(format!(
                "unknown --projection `{o}`: use shift or cost"
            ))),
        }
    }
}

/// The searched units in one flat vector: KV groups (layer-major), then channels, then layers.
#[derive(Debug, Clone, PartialEq)]
pub struct UnitSpace {
    /// The source model.
    pub shape: ModelShape,
    /// Every searched unit.
    pub units: Vec<PruneUnit>,
    /// Parameters each unit owns (a layer unit: the whole layer).
    pub cost: Vec<f64>,
    /// `(kind, start, end)` of each searched kind's slice.
    pub kinds: Vec<(UnitKind, usize, usize)>,
    /// Parameters of the pool the sparsity is measured on (the fine units searched).
    pub pool: f64,
    /// With channels searched in blocks: the channels of each unit (empty for KV groups and
    /// layers; a block's unit is `Channel { layer, index }` with `index` its first channel).
    /// `None`: one channel per channel unit.
    pub blocks: Option<Vec<Vec<usize>>>,
    /// With only layers searched from a plan start: the heads and channels each layer keeps
    /// (the start's; a layer the start drops keeps all of its own if it comes back), fixed
    /// during the search. Each layer unit then costs what its layer keeps. `None`: every head
    /// and channel of a kept layer is kept.
    pub base: Option<MaskPlan>,
}

/// Channel blocks per layer: `layout[l]` lists layer `l`'s blocks of MLP channel indices.
pub type BlockLayout = Vec<Vec<Vec<usize>>>;

impl UnitSpace {
    /// The units of `kinds` (`KvGroup`, `Channel`, `Layer`) in `shape`.
    pub fn new(shape: &ModelShape, kinds: &[UnitKind]) -> Result<Self> {
        let mut units = Vec::new();
        let mut cost = Vec::new();
        let mut slices = Vec::new();
        for kind in [UnitKind::KvGroup, UnitKind::Channel, UnitKind::Layer] {
            if !kinds.contains(&kind) {
                continue;
            }
            let start = units.len();
            for u in shape.units(kind) {
                let l = &shape.layers[u.layer()];
                let h = shape.hidden_size as f64;
                cost.push(match u {
                    PruneUnit::Layer { .. } => {
                        (l.attn_params(shape.hidden_size) + l.mlp_params(shape.hidden_size)) as f64
                    }
                    PruneUnit::KvGroup { .. } => h * l.head_dim as f64 * (2 * l.n_rep() + 2) as f64,
                    _ => 3.0 * h,
                });
                units.push(u);
            }
            slices.push((kind, start, units.len()));
        }
        if let Some(k) = kinds
            .iter()
            .find(|k| !matches!(k, UnitKind::KvGroup | UnitKind::Channel | UnitKind::Layer))
        {
            return Err(Error::Config(format!(
                "--units: {k:?} cannot be searched; use heads, channels, layers"
            )));
        }
        if units.is_empty() {
            return Err(Error::Config(
                "--units selects no prunable unit in this model".into(),
            ));
        }
        let fine: f64 = units
            .iter()
            .zip(&cost)
            .filter(|(u, _)| !matches!(u, PruneUnit::Layer { .. }))
            .map(|(_, c)| c)
            .sum();
        let pool = if fine > 0.0 {
            fine
        } else {
            shape.decoder_linear_params() as f64
        };
        Ok(Self {
            shape: shape.clone(),
            units,
            cost,
            kinds: slices,
            pool,
            blocks: None,
            base: None,
        })
    }

    /// This layers-only space with the heads and channels of `plan` fixed inside each layer
    /// ([`UnitSpace::base`]). Refused when heads or channels are searched.
    pub fn with_base(self, plan: &MaskPlan) -> Result<Self> {
        if self.kinds.iter().any(|k| k.0 != UnitKind::Layer) {
            return Err(Error::Config(
                "a fixed within-layer plan needs --units layers alone".into(),
            ));
        }
        plan.validate_against(&self.shape)?;
        let all = MaskPlan::keep_all(&self.shape);
        let mut base = plan.clone();
        base.meta.clear();
        for (lp, full) in base.layers.iter_mut().zip(&all.layers) {
            if lp.kv_groups.is_empty() && lp.channels.is_empty() {
                *lp = full.clone();
            }
        }
        let h = self.shape.hidden_size;
        let kept = base.pruned_shape();
        let cost = self
            .units
            .iter()
            .map(|u| {
                let l = &kept.layers[u.layer()];
                (l.attn_params(h) + l.mlp_params(h)) as f64
            })
            .collect();
        Ok(Self {
            cost,
            base: Some(base),
            ..self
        })
    }

    /// Pool parameters that no searched unit can bring back: the fixed within-layer removals
    /// of [`UnitSpace::base`] (0 without one).
    pub fn fixed_removed(&self) -> f64 {
        match self.base {
            Some(_) => self.pool - self.cost.iter().sum::<f64>(),
            None => 0.0,
        }
    }

    /// This space with each layer's MLP channels searched in the blocks of `layout` (one unit
    /// per block, costing its channels; the pool is unchanged). Every layer's blocks must be
    /// non-empty and cover its channels exactly once. Without channel units this is `self`.
    pub fn with_channel_blocks(self, layout: &BlockLayout) -> Result<Self> {
        let Some(&(_, start, end)) = self.kinds.iter().find(|k| k.0 == UnitKind::Channel) else {
            return Ok(self);
        };
        if layout.len() != self.shape.n_layers() {
            return Err(Error::Config(format!(
                "channel blocks for {} layers; the model has {}",
                layout.len(),
                self.shape.n_layers()
            )));
        }
        let h = self.shape.hidden_size as f64;
        let mut units = self.units[..start].to_vec();
        let mut cost = self.cost[..start].to_vec();
        let mut blocks = vec![Vec::new(); start];
        for (layer, (lb, ls)) in layout.iter().zip(&self.shape.layers).enumerate() {
            let mut seen = vec![false; ls.ffn_hidden];
            for b in lb {
                if b.is_empty()
                    || b.iter()
                        .any(|&c| c >= ls.ffn_hidden || std::mem::replace(&mut seen[c], true))
                {
                    return Err(Error::Config(format!(
                        "layer {layer}: channel blocks must be non-empty, within its {} channels and disjoint",
                        ls.ffn_hidden
                    )));
                }
                units.push(PruneUnit::Channel { layer, index: b[0] });
                cost.push(3.0 * h * b.len() as f64);
                blocks.push(b.clone());
            }
            if seen.iter().any(|s| !s) {
                return Err(Error::Config(format!(
                    "layer {layer}: the channel blocks leave channels out"
                )));
            }
        }
        let new_end = units.len();
        units.extend_from_slice(&self.units[end..]);
        cost.extend_from_slice(&self.cost[end..]);
        blocks.resize(units.len(), Vec::new());
        let shift = new_end as isize - end as isize;
        let kinds = self
            .kinds
            .iter()
            .map(|&(k, s, e)| match k {
                UnitKind::Channel => (k, s, new_end),
                _ if s >= end => (
                    k,
                    (s as isize + shift) as usize,
                    (e as isize + shift) as usize,
                ),
                _ => (k, s, e),
            })
            .collect();
        Ok(Self {
            units,
            cost,
            kinds,
            blocks: Some(blocks),
            ..self
        })
    }

    /// The MLP channels unit `i` stands for (one for an unblocked channel unit; none for
    /// KV groups and layers).
    pub fn channels_of(&self, i: usize) -> Vec<usize> {
        match (&self.blocks, self.units[i]) {
            (Some(b), _) => b[i].clone(),
            (None, PruneUnit::Channel { index, .. }) => vec![index],
            _ => Vec::new(),
        }
    }

    /// The channel blocks per layer (`None` when channels are not blocked).
    pub fn layout(&self) -> Option<BlockLayout> {
        let blocks = self.blocks.as_ref()?;
        let mut layout = vec![Vec::new(); self.shape.n_layers()];
        for (u, b) in self.units.iter().zip(blocks) {
            if let PruneUnit::Channel { layer, .. } = *u {
                layout[layer].push(b.clone());
            }
        }
        Some(layout)
    }

    /// Each layer's channel units (indices into `units`), in the space's order (with blocks:
    /// the start's, most important first); layers without channel units are left out.
    pub fn channel_groups(&self) -> Vec<Vec<usize>> {
        let mut groups = vec![Vec::new(); self.shape.n_layers()];
        for (i, u) in self.units.iter().enumerate() {
            if let PruneUnit::Channel { layer, .. } = *u {
                groups[layer].push(i);
            }
        }
        groups.retain(|g| !g.is_empty());
        groups
    }

    /// Unit `i`'s score under per-unit `scores`: a channel block's mean.
    pub fn score(&self, scores: &lopper_core::UnitScores, i: usize) -> f64 {
        match self.units[i] {
            PruneUnit::KvGroup { layer, group } => scores.kv_groups[layer][group],
            PruneUnit::Channel { layer, .. } => {
                let ch = self.channels_of(i);
                ch.iter().map(|&c| scores.channels[layer][c]).sum::<f64>() / ch.len() as f64
            }
            _ => 0.0,
        }
    }

    /// Whether layer units are searched.
    pub fn has_layers(&self) -> bool {
        self.kinds.iter().any(|k| k.0 == UnitKind::Layer)
    }

    /// Expected kept parameters of the pool, as a fraction of it, under keep-probabilities `s`:
    /// `sum_l s_layer(l) * sum_{u in l} s_u c_u / pool` (`s_layer = 1` when layers are not
    /// searched; with only layers searched, each layer's units count as kept).
    pub fn expected_kept(&self, s: &[f64]) -> f64 {
        let (fine, layer) = self.layer_sums(s);
        fine.iter().zip(&layer).map(|(f, l)| f * l).sum::<f64>() / self.pool
    }

    /// Per layer: the expected kept parameters of its fine units (its whole cost when only
    /// layers are searched) and its layer probability (1 when layers are not searched).
    fn layer_sums(&self, s: &[f64]) -> (Vec<f64>, Vec<f64>) {
        let n_layers = self.shape.n_layers();
        let mut fine = vec![0.0; n_layers];
        let mut layer = vec![1.0; n_layers];
        let only_layers = self.kinds.iter().all(|k| k.0 == UnitKind::Layer);
        for ((u, &c), &p) in self.units.iter().zip(&self.cost).zip(s) {
            match u {
                PruneUnit::Layer { layer: l } => {
                    layer[*l] = p;
                    if only_layers {
                        fine[*l] = c;
                    }
                }
                _ => fine[u.layer()] += p * c,
            }
        }
        (fine, layer)
    }

    /// The derivative of [`UnitSpace::expected_kept`] by each probability in `s`: a head or
    /// channel unit's cost times its layer's probability; a layer unit's, the expected kept
    /// parameters of its units (its whole cost when only layers are searched). In pool
    /// fractions.
    pub fn expected_kept_grad(&self, s: &[f64]) -> Vec<f64> {
        let (fine, layer) = self.layer_sums(s);
        self.units
            .iter()
            .zip(&self.cost)
            .map(|(u, &c)| match u {
                PruneUnit::Layer { layer: l } => fine[*l] / self.pool,
                _ => c * layer[u.layer()] / self.pool,
            })
            .collect()
    }

    /// The plan of a binary mask over the units (`true` = keep).
    pub fn plan_of(&self, keep: &[bool]) -> MaskPlan {
        let mut plan = self
            .base
            .clone()
            .unwrap_or_else(|| MaskPlan::keep_all(&self.shape));
        let mut dropped_layers = vec![false; self.shape.n_layers()];
        let mut groups: Vec<Vec<usize>> = plan.layers.iter().map(|l| l.kv_groups.clone()).collect();
        let mut channels: Vec<Vec<usize>> =
            plan.layers.iter().map(|l| l.channels.clone()).collect();
        let searched = |k| self.kinds.iter().any(|x| x.0 == k);
        if searched(UnitKind::KvGroup) {
            groups.iter_mut().for_each(Vec::clear);
        }
        if searched(UnitKind::Channel) {
            channels.iter_mut().for_each(Vec::clear);
        }
        for (i, (u, &k)) in self.units.iter().zip(keep).enumerate() {
            match *u {
                PruneUnit::KvGroup { layer, group } if k => groups[layer].push(group),
                // No allocation per unit: this runs for every sampled mask.
                PruneUnit::Channel { layer, index } if k => match &self.blocks {
                    Some(b) => channels[layer].extend_from_slice(&b[i]),
                    None => channels[layer].push(index),
                },
                PruneUnit::Layer { layer } if !k => dropped_layers[layer] = true,
                _ => {}
            }
        }
        for (i, lp) in plan.layers.iter_mut().enumerate() {
            *lp = if dropped_layers[i] {
                LayerPlan {
                    kv_groups: vec![],
                    channels: vec![],
                }
            } else {
                let mut channels = std::mem::take(&mut channels[i]);
                channels.sort_unstable();
                LayerPlan {
                    kv_groups: std::mem::take(&mut groups[i]),
                    channels,
                }
            };
        }
        plan
    }
}

/// Projects `s` onto the budget by the reference's rule: find a shift `v >= 0` with
/// `f(clamp(s - v, 0, 1)) = k` by bisection on `[0, max s]`, stopping when `|f - k| < tol` or
/// after `max_iter` halvings; when `f(clamp(s)) < k` already, only clamp (the reference never
/// raises probabilities). With `raise`, the shift may be negative too (bisection on
/// `[min s - 1, max s]`), which makes it an exact projection from either side. Values are
/// clamped to `bounds` (the reference: `(0, 1)`).
/// `f` must fall as `v` grows. Returns the shift used.
pub fn project(
    s: &mut [f64],
    k: f64,
    f: &dyn Fn(&[f64]) -> f64,
    tol: f64,
    max_iter: usize,
    raise: bool,
    bounds: (f64, f64),
) -> f64 {
    let shifted = |s: &[f64], v: f64| -> Vec<f64> {
        s.iter()
            .map(|x| (x - v).clamp(bounds.0, bounds.1))
            .collect()
    };
    let mut v = 0.0;
    let low = if raise {
        s.iter().copied().fold(f64::INFINITY, f64::min) - 1.0
    } else {
        0.0
    };
    if raise || f(&shifted(s, 0.0)) - k >= 0.0 {
        let (mut a, mut b) = (low, s.iter().copied().fold(0.0, f64::max));
        for _ in 0..max_iter {
            v = (a + b) / 2.0;
            let g = f(&shifted(s, v)) - k;
            if g.abs() < tol {
                break;
            }
            if g < 0.0 {
                b = v;
            } else {
                a = v;
            }
        }
    }
    let out = shifted(s, if raise { v } else { v.max(0.0) });
    s.copy_from_slice(&out);
    v
}

/// Projects `s` onto `f(s) = k` along the weights `w`: `s_i <- clamp(s_i - v * w_i, bounds)`,
/// with `v` found by bisection (`f` must increase in every `s_i`; `w_i >= 0`, and a unit of
/// weight 0 does not move). Returns `v`. With every `w_i = 1` this is [`project`]'s shift.
pub fn project_weighted(
    s: &mut [f64],
    k: f64,
    f: &dyn Fn(&[f64]) -> f64,
    w: &[f64],
    tol: f64,
    max_iter: usize,
    bounds: (f64, f64),
) -> f64 {
    let Some(w_min) = w
        .iter()
        .copied()
        .filter(|&x| x > 0.0)
        .min_by(f64::total_cmp)
    else {
        return 0.0;
    };
    let shifted = |s: &[f64], v: f64| -> Vec<f64> {
        s.iter()
            .zip(w)
            .map(|(x, wi)| (x - v * wi).clamp(bounds.0, bounds.1))
            .collect()
    };
    // At -1/w_min every weighted unit is at its upper bound, at 1/w_min at its lower one.
    let (mut a, mut b) = (-1.0 / w_min, 1.0 / w_min);
    let mut v = 0.0;
    if (f(&shifted(s, 0.0)) - k).abs() >= tol {
        for _ in 0..max_iter {
            v = (a + b) / 2.0;
            let g = f(&shifted(s, v)) - k;
            if g.abs() < tol {
                break;
            }
            if g < 0.0 {
                b = v;
            } else {
                a = v;
            }
        }
    }
    let out = shifted(s, v);
    s.copy_from_slice(&out);
    v
}

/// The reference's `sigmap`: `z = (m - mean) / (std + 1e-8)` (unbiased std), `s = sigmoid(z)`,
/// shifted so that `mean(s) = keep`, clamped to `[0, 1]`.
pub fn sigmap(metric: &[f64], keep: f64) -> Vec<f64> {
    let n = metric.len();
    if n == 0 {
        return Vec::new();
    }
    let mean = metric.iter().sum::<f64>() / n as f64;
    let var = if n > 1 {
        metric.iter().map(|m| (m - mean).powi(2)).sum::<f64>() / (n - 1) as f64
    } else {
        0.0
    };
    let std = var.sqrt();
    let sig: Vec<f64> = metric
        .iter()
        .map(|m| 1.0 / (1.0 + (-(m - mean) / (std + 1e-8)).exp()))
        .collect();
    let shift = keep - sig.iter().sum::<f64>() / n as f64;
    sig.iter().map(|x| (x + shift).clamp(0.0, 1.0)).collect()
}
