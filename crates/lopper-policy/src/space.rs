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
}

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
        })
    }

    /// Whether layer units are searched.
    pub fn has_layers(&self) -> bool {
        self.kinds.iter().any(|k| k.0 == UnitKind::Layer)
    }

    /// Expected kept parameters of the pool, as a fraction of it, under keep-probabilities `s`:
    /// `sum_l s_layer(l) * sum_{u in l} s_u c_u / pool` (`s_layer = 1` when layers are not
    /// searched; with only layers searched, each layer's units count as kept).
    pub fn expected_kept(&self, s: &[f64]) -> f64 {
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
        fine.iter().zip(&layer).map(|(f, l)| f * l).sum::<f64>() / self.pool
    }

    /// The plan of a binary mask over the units (`true` = keep).
    pub fn plan_of(&self, keep: &[bool]) -> MaskPlan {
        let mut plan = MaskPlan::keep_all(&self.shape);
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
        for (u, &k) in self.units.iter().zip(keep) {
            match *u {
                PruneUnit::KvGroup { layer, group } if k => groups[layer].push(group),
                PruneUnit::Channel { layer, index } if k => channels[layer].push(index),
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
                LayerPlan {
                    kv_groups: std::mem::take(&mut groups[i]),
                    channels: std::mem::take(&mut channels[i]),
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
