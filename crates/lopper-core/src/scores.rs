//! Per-unit importance scores: what metric methods produce and what the policy-gradient method
//! can start from. Higher means more important (keep first).

use serde::{Deserialize, Serialize};

use crate::{Error, LayerPlan, MaskPlan, ModelShape, PruneUnit, Result, UnitKind};

/// How per-unit scores become a plan at a requested keep fraction.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Allocation {
    /// Every layer keeps `round(keep * n)` KV groups and channels (scores compared within a layer).
    PerLayer,
    /// Every layer keeps `keep` of its parameters: `round(keep * n)` KV groups as
    /// [`Allocation::PerLayer`], and as many channels as bring the layer's kept parameters
    /// closest to `keep` of them, so that the rounding of a few KV groups per layer (3 in
    /// SmolLM2, where `per-layer` keeps 0.5417 at 0.5) does not change the model's size.
    PerLayerParams,
    /// Each unit type keeps `round(keep * n)` units over the whole model (scores compared across
    /// layers, so layers end up with different widths).
    Global,
    /// KV groups and channels ranked together, each weighing its parameter count; the best
    /// prefix whose kept parameters come closest to `keep` of the pool is kept (FLAP's AL-AM
    /// structure; the scores must be comparable across types and layers, e.g. standardised).
    GlobalParams,
}

impl Allocation {
    /// The name used on the command line and in outputs.
    pub fn name(self) -> &'static str {
        match self {
            Allocation::PerLayer => "per-layer",
            Allocation::PerLayerParams => "per-layer-params",
            Allocation::Global => "global",
            Allocation::GlobalParams => "global-params",
        }
    }
}

impl std::str::FromStr for Allocation {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "per-layer" => Ok(Allocation::PerLayer),
            "per-layer-params" => Ok(Allocation::PerLayerParams),
            "global" => Ok(Allocation::Global),
            "global-params" => Ok(Allocation::GlobalParams),
            o => Err(Error::InvalidPlan(format!(
                "unknown allocation `{o}`; use per-layer, per-layer-params, global or global-params"
            ))),
        }
    }
}

/// Checks a keep fraction: in (0, 1].
pub fn check_keep(keep: f64) -> Result<()> {
    if !(keep > 0.0 && keep <= 1.0) {
        return Err(Error::InvalidPlan(format!(
            "keep fraction {keep} is impossible: the sparsity must be in [0, 1) (0.3 removes 30%)"
        )));
    }
    Ok(())
}

/// Importance of every KV group and MLP channel, per layer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UnitScores {
    /// The method that produced them.
    pub method: String,
    /// `kv_groups[layer][group]`.
    pub kv_groups: Vec<Vec<f64>>,
    /// `channels[layer][channel]`.
    pub channels: Vec<Vec<f64>>,
}

/// Indices of the `k` largest values, sorted ascending; ties go to the lower index.
pub fn top_k(values: &[f64], k: usize) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..values.len()).collect();
    idx.sort_by(|&a, &b| values[b].total_cmp(&values[a]).then(a.cmp(&b)));
    idx.truncate(k);
    idx.sort_unstable();
    idx
}

/// `round(keep * n)`, the number of units a keep fraction means.
pub fn keep_count(keep: f64, n: usize) -> usize {
    ((keep * n as f64).round() as usize).min(n)
}

impl UnitScores {
    /// Checks that the scores fit `shape` and are finite.
    pub fn check(&self, shape: &ModelShape) -> Result<()> {
        let bad = |m: String| {
            Err(Error::InvalidPlan(format!(
                "scores of `{}`: {m}",
                self.method
            )))
        };
        if self.kv_groups.len() != shape.n_layers() || self.channels.len() != shape.n_layers() {
            return bad(format!(
                "{} layers of scores for {} layers",
                self.kv_groups.len(),
                shape.n_layers()
            ));
        }
        for (i, l) in shape.layers.iter().enumerate() {
            if self.kv_groups[i].len() != l.n_kv_heads || self.channels[i].len() != l.ffn_hidden {
                return bad(format!("layer {i} has the wrong number of scores"));
            }
            if self.kv_groups[i]
                .iter()
                .chain(&self.channels[i])
                .any(|v| !v.is_finite())
            {
                return bad(format!("layer {i} has a non-finite score"));
            }
        }
        Ok(())
    }

    /// The plan that keeps the best units under `allocation`, recorded in the plan's meta.
    pub fn plan(&self, shape: &ModelShape, keep: f64, allocation: Allocation) -> Result<MaskPlan> {
        let mut plan = match allocation {
            Allocation::PerLayer => self.plan_per_layer(shape, keep)?,
            Allocation::PerLayerParams => self.plan_per_layer_params(shape, keep)?,
            Allocation::Global => self.plan_global(shape, keep)?,
            Allocation::GlobalParams => self.plan_global_params(shape, keep)?,
        };
        plan.meta
            .insert("allocation".into(), allocation.name().into());
        plan.meta
            .insert("method".into(), self.method.clone().into());
        Ok(plan)
    }

    /// [`UnitScores::plan`] with the layers in `protected` kept whole (LLM-Pruner's skipped first
    /// and last layers), the others pruned harder so that the model still loses `1 - keep` of
    /// its prunable parameters. Per-layer allocation keeps `keep'` of every unprotected layer,
    /// where `(1 - keep') * P_unprotected = (1 - keep) * P_all`; global allocations rank the
    /// protected units first. An impossible budget (the protected layers alone hold more than
    /// `keep`) is an error.
    pub fn plan_protected(
        &self,
        shape: &ModelShape,
        keep: f64,
        allocation: Allocation,
        protected: &[usize],
    ) -> Result<MaskPlan> {
        if protected.is_empty() {
            return self.plan(shape, keep, allocation);
        }
        self.check(shape)?;
        check_keep(keep)?;
        if let Some(&l) = protected.iter().find(|&&l| l >= shape.n_layers()) {
            return Err(Error::InvalidPlan(format!(
                "protected layer {l} does not exist in a {}-layer model",
                shape.n_layers()
            )));
        }
        let (mut all, mut prot) = (0.0, 0.0);
        for kind in [UnitKind::KvGroup, UnitKind::Channel] {
            for u in shape.units(kind) {
                let c = shape.unit_cost(u, 0).params as f64;
                all += c;
                if protected.contains(&u.layer()) {
                    prot += c;
                }
            }
        }
        let inner_keep = 1.0 - (1.0 - keep) * all / (all - prot).max(1.0);
        if inner_keep <= 0.0 || inner_keep.is_nan() || prot / all > keep + 1e-12 {
            return Err(Error::InvalidPlan(format!(
                "keeping layers {protected:?} whole ({:.1}% of the prunable parameters) leaves too little to remove {:.1}%; lower the sparsity or protect fewer layers",
                100.0 * prot / all,
                100.0 * (1.0 - keep)
            )));
        }
        let mut plan = match allocation {
            Allocation::PerLayer | Allocation::PerLayerParams => {
                let mut plan = self.plan(shape, inner_keep, allocation)?;
                for &l in protected {
                    plan.layers[l].kv_groups = (0..shape.layers[l].n_kv_heads).collect();
                    plan.layers[l].channels = (0..shape.layers[l].ffn_hidden).collect();
                }
                plan.validate()?;
                plan
            }
            _ => {
                let mut s = self.clone();
                for &l in protected {
                    s.kv_groups[l].fill(f64::MAX);
                    s.channels[l].fill(f64::MAX);
                }
                s.plan(shape, keep, allocation)?
            }
        };
        plan.meta
            .insert("protected_layers".into(), serde_json::json!(protected));
        Ok(plan)
    }

    /// A plan that removes both whole layers and units: layers first, in `layer_order`, for
    /// about `layer_share` of the removed parameters ([`plan_drop_layers`]), then units of the
    /// remaining layers under `allocation` for the rest, so that the model loses `1 - keep` of
    /// its prunable parameters in all.
    pub fn plan_with_layers(
        &self,
        shape: &ModelShape,
        keep: f64,
        allocation: Allocation,
        layer_order: &[usize],
        layer_share: f64,
    ) -> Result<MaskPlan> {
        check_keep(keep)?;
        if !(0.0..=1.0).contains(&layer_share) {
            return Err(Error::InvalidPlan(format!(
                "a layer share of {layer_share} is not a fraction"
            )));
        }
        let removal = 1.0 - keep;
        let layers = plan_drop_layers(shape, layer_order, 1.0 - layer_share * removal, "layers")?;
        let dropped: Vec<usize> = (0..shape.n_layers())
            .filter(|l| !layers.kept_layers().contains(l))
            .collect();
        let gone = 1.0 - layers.kept_param_ratio();
        let mut plan = if removal - gone > 1e-9 {
            let mut plan =
                self.plan_protected(shape, 1.0 - (removal - gone), allocation, &dropped)?;
            for &l in &dropped {
                plan.layers[l].kv_groups.clear();
                plan.layers[l].channels.clear();
            }
            plan
        } else {
            layers
        };
        plan.validate()?;
        plan.meta
            .insert("method".into(), format!("{}+layers", self.method).into());
        plan.meta
            .insert("removed_layers".into(), serde_json::json!(dropped));
        plan.meta.insert("layer_share".into(), layer_share.into());
        Ok(plan)
    }

    /// The score of a KV group or channel unit.
    fn of(&self, u: PruneUnit) -> f64 {
        match u {
            PruneUnit::KvGroup { layer, group } => self.kv_groups[layer][group],
            PruneUnit::Channel { layer, index } => self.channels[layer][index],
            _ => unreachable!("only KV groups and channels carry scores"),
        }
    }

    fn plan_of_kept(
        shape: &ModelShape,
        kept: impl IntoIterator<Item = PruneUnit>,
    ) -> Result<MaskPlan> {
        let mut layers: Vec<LayerPlan> = shape
            .layers
            .iter()
            .map(|_| LayerPlan {
                kv_groups: Vec::new(),
                channels: Vec::new(),
            })
            .collect();
        for u in kept {
            match u {
                PruneUnit::KvGroup { layer, group } => layers[layer].kv_groups.push(group),
                PruneUnit::Channel { layer, index } => layers[layer].channels.push(index),
                _ => {}
            }
        }
        for l in &mut layers {
            l.kv_groups.sort_unstable();
            l.channels.sort_unstable();
        }
        let plan = MaskPlan {
            layers,
            ..MaskPlan::keep_all(shape)
        };
        plan.validate()?;
        Ok(plan)
    }

    /// Global per-type allocation: the `round(keep * n)` best units of each type over all layers.
    fn plan_global(&self, shape: &ModelShape, keep: f64) -> Result<MaskPlan> {
        self.check(shape)?;
        check_keep(keep)?;
        let mut kept = Vec::new();
        for kind in [UnitKind::KvGroup, UnitKind::Channel] {
            let units = shape.units(kind);
            let vals: Vec<f64> = units.iter().map(|&u| self.of(u)).collect();
            kept.extend(
                top_k(&vals, keep_count(keep, units.len()))
                    .into_iter()
                    .map(|i| units[i]),
            );
        }
        Self::plan_of_kept(shape, kept)
    }

    /// Joint ranking weighted by parameters (FLAP AL-AM).
    fn plan_global_params(&self, shape: &ModelShape, keep: f64) -> Result<MaskPlan> {
        self.check(shape)?;
        check_keep(keep)?;
        let units: Vec<PruneUnit> = [UnitKind::KvGroup, UnitKind::Channel]
            .iter()
            .flat_map(|&k| shape.units(k))
            .collect();
        let vals: Vec<f64> = units.iter().map(|&u| self.of(u)).collect();
        let mut order: Vec<usize> = (0..units.len()).collect();
        order.sort_by(|&a, &b| vals[b].total_cmp(&vals[a]).then(a.cmp(&b)));
        let cost: Vec<f64> = order
            .iter()
            .map(|&i| shape.unit_cost(units[i], 0).params as f64)
            .collect();
        let target = keep * cost.iter().sum::<f64>();
        let (mut best, mut best_gap, mut cum) = (0, target, 0.0);
        for (n, c) in cost.iter().enumerate() {
            cum += c;
            if (cum - target).abs() < best_gap {
                (best, best_gap) = (n + 1, (cum - target).abs());
            }
        }
        Self::plan_of_kept(shape, order[..best].iter().map(|&i| units[i]))
    }

    /// [`Allocation::PerLayerParams`]'s plan: in every layer the `round(keep * n)` best KV
    /// groups, and the best channels in the number that brings the layer's kept parameters
    /// closest to `keep` of them (at least one where `per-layer` would keep one).
    pub fn plan_per_layer_params(&self, shape: &ModelShape, keep: f64) -> Result<MaskPlan> {
        let h = shape.hidden_size;
        self.plan_counts(shape, keep, |l| {
            let kv = keep_count(keep, l.n_kv_heads);
            let attn_kept = if l.n_kv_heads == 0 {
                0.0
            } else {
                l.attn_params(h) as f64 * kv as f64 / l.n_kv_heads as f64
            };
            let target = keep * (l.attn_params(h) + l.mlp_params(h)) as f64;
            let ch = ((target - attn_kept) / (3.0 * h as f64)).round().max(0.0) as usize;
            (
                kv,
                ch.clamp(keep_count(keep, l.ffn_hidden).min(1), l.ffn_hidden),
            )
        })
    }

    /// The plan keeping, in every layer, the `round(keep * n)` best KV groups and channels
    /// (per-layer uniform allocation).
    pub fn plan_per_layer(&self, shape: &ModelShape, keep: f64) -> Result<MaskPlan> {
        self.plan_counts(shape, keep, |l| {
            (
                keep_count(keep, l.n_kv_heads),
                keep_count(keep, l.ffn_hidden),
            )
        })
    }

    /// The plan keeping, in every layer, the best `count(layer)` = `(KV groups, channels)`.
    fn plan_counts(
        &self,
        shape: &ModelShape,
        keep: f64,
        count: impl Fn(&crate::LayerShape) -> (usize, usize),
    ) -> Result<MaskPlan> {
        self.check(shape)?;
        check_keep(keep)?;
        let layers = shape
            .layers
            .iter()
            .enumerate()
            .map(|(i, l)| {
                let (kv, ch) = count(l);
                LayerPlan {
                    kv_groups: top_k(&self.kv_groups[i], kv),
                    channels: top_k(&self.channels[i], ch),
                }
            })
            .collect();
        let plan = MaskPlan {
            layers,
            ..MaskPlan::keep_all(shape)
        };
        plan.validate()?;
        Ok(plan)
    }
}

/// The plan that removes whole layers, taken in `removal_order` (most removable first), as long
/// as each further removal brings the removed fraction of the decoder linear parameters closer
/// to `1 - keep`; at least one layer is always kept. Records `method` and the allocation.
pub fn plan_drop_layers(
    shape: &ModelShape,
    removal_order: &[usize],
    keep: f64,
    method: &str,
) -> Result<MaskPlan> {
    check_keep(keep)?;
    let h = shape.hidden_size;
    let layer_params =
        |l: usize| shape.layers[l].attn_params(h) as f64 + shape.layers[l].mlp_params(h) as f64;
    let total = shape.decoder_linear_params() as f64;
    let target = (1.0 - keep) * total;
    let (mut removed, mut gone) = (Vec::new(), 0.0);
    for &l in removal_order {
        if l >= shape.n_layers() || removed.contains(&l) {
            return Err(Error::InvalidPlan(format!(
                "layer removal order names layer {l} twice or out of range ({} layers)",
                shape.n_layers()
            )));
        }
        let next = gone + layer_params(l);
        if removed.len() + 1 >= shape.n_layers() || (next - target).abs() >= (gone - target).abs() {
            break;
        }
        gone = next;
        removed.push(l);
    }
    let units: Vec<PruneUnit> = removed
        .iter()
        .map(|&layer| PruneUnit::Layer { layer })
        .collect();
    let mut plan = MaskPlan::from_removed(shape, &units)?;
    plan.meta.insert("method".into(), method.into());
    plan.meta.insert("allocation".into(), "layers".into());
    plan.meta.insert(
        "removed_layers".into(),
        serde_json::Value::from(removed.clone()),
    );
    Ok(plan)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn top_k_breaks_ties_by_index() {
        assert_eq!(top_k(&[1.0, 3.0, 3.0, 0.5], 2), vec![1, 2]);
        assert_eq!(top_k(&[2.0, 2.0, 2.0], 2), vec![0, 1]);
        assert_eq!(keep_count(0.5, 3), 2);
    }

    #[test]
    fn per_layer_plans_keep_the_best_units() {
        let s = ModelShape::tiny();
        let scores = UnitScores {
            method: "t".into(),
            kv_groups: s
                .layers
                .iter()
                .map(|l| (0..l.n_kv_heads).map(|g| g as f64).collect())
                .collect(),
            channels: s
                .layers
                .iter()
                .map(|l| (0..l.ffn_hidden).map(|c| -(c as f64)).collect())
                .collect(),
        };
        let p = scores.plan_per_layer(&s, 0.5).unwrap();
        assert_eq!(p.layers[0].kv_groups, vec![1]);
        assert_eq!(p.layers[2].channels, (0..24).collect::<Vec<_>>());
        let mut bad = scores.clone();
        bad.channels[1].pop();
        assert!(bad.plan_per_layer(&s, 0.5).is_err());
    }

    #[test]
    fn per_layer_params_plans_meet_the_budget_where_kv_groups_round() {
        // SmolLM2-135M's layers: 3 KV groups of 3 query heads, 1536 channels.
        let s = ModelShape {
            hidden_size: 576,
            layers: vec![
                crate::LayerShape {
                    n_heads: 9,
                    n_kv_heads: 3,
                    head_dim: 64,
                    ffn_hidden: 1536,
                };
                30
            ],
            ..ModelShape::tiny()
        };
        let scores = layered(&s);
        for keep in [0.8, 0.7, 0.5] {
            let uniform = scores.plan(&s, keep, Allocation::PerLayer).unwrap();
            let exact = scores.plan(&s, keep, Allocation::PerLayerParams).unwrap();
            assert_eq!(exact.meta["allocation"], "per-layer-params");
            // One channel of one layer is 3 * 576 of the layer's 3.5M parameters.
            assert!(
                (exact.kept_param_ratio() - keep).abs() < 1e-3,
                "{keep}: {}",
                exact.kept_param_ratio()
            );
            assert!((uniform.kept_param_ratio() - keep).abs() > 0.005, "{keep}");
            for (e, u) in exact.layers.iter().zip(&uniform.layers) {
                // The same KV groups; the channels are the best ones, a prefix of the ranking.
                assert_eq!(e.kv_groups, u.kv_groups);
                let (short, long) = if e.channels.len() < u.channels.len() {
                    (&e.channels, &u.channels)
                } else {
                    (&u.channels, &e.channels)
                };
                assert!(short.iter().all(|c| long.contains(c)));
            }
        }
        // Where the KV groups split exactly it is the per-layer plan.
        let s = ModelShape::tiny();
        let scores = layered(&s);
        assert_eq!(
            scores
                .plan(&s, 0.5, Allocation::PerLayerParams)
                .unwrap()
                .layers,
            scores.plan(&s, 0.5, Allocation::PerLayer).unwrap().layers
        );
    }

    /// Scores where layer `l`'s units score `l` plus a small index term, so global allocations
    /// must favour the last layers.
    fn layered(s: &ModelShape) -> UnitScores {
        UnitScores {
            method: "layered".into(),
            kv_groups: (0..s.n_layers())
                .map(|l| {
                    (0..s.layers[l].n_kv_heads)
                        .map(|g| l as f64 + 0.1 * g as f64)
                        .collect()
                })
                .collect(),
            channels: (0..s.n_layers())
                .map(|l| {
                    (0..s.layers[l].ffn_hidden)
                        .map(|c| l as f64 + 1e-3 * c as f64)
                        .collect()
                })
                .collect(),
        }
    }

    #[test]
    fn global_allocation_keeps_the_best_units_of_each_type_anywhere() {
        let s = ModelShape::tiny(); // 3 layers, 2 KV groups and 48 channels each
        let p = layered(&s).plan(&s, 0.5, Allocation::Global).unwrap();
        // 3 of 6 KV groups: layer 2 (both) then layer 1 group 1.
        assert_eq!(p.layers[2].kv_groups, vec![0, 1]);
        assert_eq!(p.layers[1].kv_groups, vec![1]);
        assert!(p.layers[0].kv_groups.is_empty());
        // 72 of 144 channels: all of layer 2, the top 24 of layer 1.
        assert_eq!(p.layers[2].channels.len(), 48);
        assert_eq!(p.layers[1].channels, (24..48).collect::<Vec<_>>());
        assert_eq!(p.meta["allocation"], "global");
    }

    #[test]
    fn mixed_plans_drop_layers_for_their_share_and_units_for_the_rest() {
        let mut s = ModelShape::tiny();
        s.layers = vec![s.layers[0]; 8];
        let sc = UnitScores {
            method: "m".into(),
            kv_groups: (0..8).map(|l| vec![l as f64, 10.0 + l as f64]).collect(),
            channels: (0..8)
                .map(|l| (0..48).map(|c| (l * 48 + c) as f64).collect())
                .collect(),
        };
        let order = [5, 2, 7, 0, 1, 3, 4, 6];
        let total = s.decoder_linear_params() as f64;
        let group = s
            .unit_cost(PruneUnit::KvGroup { layer: 0, group: 0 }, 0)
            .params as f64;
        for (share, dropped) in [(0.0, vec![]), (0.5, vec![5, 2]), (1.0, vec![5, 2, 7, 0])] {
            let p = sc
                .plan_with_layers(&s, 0.5, Allocation::GlobalParams, &order, share)
                .unwrap();
            // The share's layers go whole (units may empty more layers: these scores are
            // layered).
            let gone: Vec<usize> = (0..8).filter(|l| !p.kept_layers().contains(l)).collect();
            let mut want = dropped.clone();
            want.sort();
            assert!(
                want.iter().all(|l| gone.contains(l)),
                "share {share}: {gone:?}"
            );
            // Half of the parameters in all, within one KV group.
            assert!(
                ((1.0 - p.kept_param_ratio()) * total - 0.5 * total).abs() <= group,
                "share {share}: {}",
                p.kept_param_ratio()
            );
            assert_eq!(p.meta["removed_layers"], serde_json::json!(want));
        }
        assert!(
            sc.plan_with_layers(&s, 0.5, Allocation::GlobalParams, &order, 1.5)
                .is_err()
        );
    }

    #[test]
    fn global_params_allocation_meets_the_parameter_budget() {
        let s = ModelShape::tiny();
        for keep in [0.2, 0.5, 0.8] {
            let p = layered(&s)
                .plan(&s, keep, Allocation::GlobalParams)
                .unwrap();
            // The kept parameters are within one KV group (the largest unit) of the target.
            let group = s
                .unit_cost(PruneUnit::KvGroup { layer: 0, group: 0 }, 0)
                .params as f64;
            let total = s.decoder_linear_params() as f64;
            let gap = (p.kept_param_ratio() - keep).abs() * total;
            assert!(gap <= group / 2.0 + 1e-9, "keep {keep}: gap {gap}");
            // Ranking is joint: a kept unit never scores below a removed one.
            let sc = layered(&s);
            let kept_min = p
                .layers
                .iter()
                .enumerate()
                .flat_map(|(l, lp)| lp.channels.iter().map(move |&c| (l, c)))
                .map(|(l, c)| sc.channels[l][c])
                .fold(f64::INFINITY, f64::min);
            let removed_max = p
                .removed_units()
                .into_iter()
                .filter_map(|u| match u {
                    PruneUnit::Channel { layer, index } => Some(sc.channels[layer][index]),
                    _ => None,
                })
                .fold(f64::NEG_INFINITY, f64::max);
            assert!(kept_min >= removed_max);
        }
        assert!(layered(&s).plan(&s, 0.0, Allocation::Global).is_err());
        assert!(layered(&s).plan(&s, 1.5, Allocation::PerLayer).is_err());
    }

    #[test]
    fn dropping_layers_follows_the_order_and_the_budget() {
        let s = ModelShape::tiny();
        let p = plan_drop_layers(&s, &[1, 0, 2], 0.6, "t").unwrap();
        // 40% of 3 equal layers: one layer (33%) is closer than two (67%).
        assert_eq!(p.kept_layers(), vec![0, 2]);
        let p = plan_drop_layers(&s, &[2, 1, 0], 0.01, "t").unwrap();
        assert_eq!(p.kept_layers().len(), 1, "one layer is always kept");
        assert!(plan_drop_layers(&s, &[1, 1], 0.3, "t").is_err());
        assert!(plan_drop_layers(&s, &[5], 0.3, "t").is_err());
    }
}
