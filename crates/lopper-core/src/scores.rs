//! Per-unit importance scores: what metric methods produce and what the policy-gradient method
//! can start from. Higher means more important (keep first).

use serde::{Deserialize, Serialize};

use crate::{Error, LayerPlan, MaskPlan, ModelShape, Result};

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

    /// The plan keeping, in every layer, the `round(keep * n)` best KV groups and channels
    /// (per-layer uniform allocation).
    pub fn plan_per_layer(&self, shape: &ModelShape, keep: f64) -> Result<MaskPlan> {
        self.check(shape)?;
        let layers = shape
            .layers
            .iter()
            .enumerate()
            .map(|(i, l)| LayerPlan {
                kv_groups: top_k(&self.kv_groups[i], keep_count(keep, l.n_kv_heads)),
                channels: top_k(&self.channels[i], keep_count(keep, l.ffn_hidden)),
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
}
