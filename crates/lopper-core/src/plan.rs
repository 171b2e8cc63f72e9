//! Mask plans: which units a pruned model keeps.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::{Error, LayerShape, ModelShape, PruneUnit, Result, UnitKind};

/// The `format_version` this build writes and reads.
pub const MASK_PLAN_FORMAT_VERSION: u32 = 1;

/// The kept units of one layer: sorted, unique indices into the source layer.
/// An empty `kv_groups` removes the attention block; an empty `channels` removes the MLP block;
/// both empty removes the layer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayerPlan {
    /// Kept KV groups (each brings its query heads).
    pub kv_groups: Vec<usize>,
    /// Kept MLP channels.
    pub channels: Vec<usize>,
}

/// Which units of a model are kept. The API boundary between pruning methods and surgery:
/// versioned JSON that names the shape it was made for.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MaskPlan {
    /// File format version ([`MASK_PLAN_FORMAT_VERSION`]).
    pub format_version: u32,
    /// The shape of the model the plan was made for.
    pub source: ModelShape,
    /// One entry per source layer.
    pub layers: Vec<LayerPlan>,
    /// Free-form provenance (method, sparsity, seed, ...).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub meta: BTreeMap<String, serde_json::Value>,
}

impl MaskPlan {
    /// The plan that keeps everything of `shape`.
    pub fn keep_all(shape: &ModelShape) -> Self {
        Self {
            format_version: MASK_PLAN_FORMAT_VERSION,
            source: shape.clone(),
            layers: shape
                .layers
                .iter()
                .map(|l| LayerPlan {
                    kv_groups: (0..l.n_kv_heads).collect(),
                    channels: (0..l.ffn_hidden).collect(),
                })
                .collect(),
            meta: BTreeMap::new(),
        }
    }

    /// The plan that removes exactly `removed` from `shape`. Duplicate or out-of-range units are
    /// errors; a unit inside an also-removed block or layer is allowed.
    pub fn from_removed(shape: &ModelShape, removed: &[PruneUnit]) -> Result<Self> {
        let mut seen = std::collections::HashSet::new();
        let mut plan = Self::keep_all(shape);
        for &u in removed {
            if !seen.insert(u) {
                return Err(Error::InvalidPlan(format!("unit {u:?} is listed twice")));
            }
            let l = u.layer();
            let Some(ls) = shape.layers.get(l) else {
                return Err(Error::InvalidPlan(format!(
                    "unit {u:?} names layer {l}, but the model has {} layers",
                    shape.n_layers()
                )));
            };
            let lp = &mut plan.layers[l];
            match u {
                PruneUnit::KvGroup { group, .. } => {
                    check_range("KV group", group, ls.n_kv_heads, l)?;
                    lp.kv_groups.retain(|&g| g != group);
                }
                PruneUnit::Channel { index, .. } => {
                    check_range("MLP channel", index, ls.ffn_hidden, l)?;
                    lp.channels.retain(|&c| c != index);
                }
                PruneUnit::AttnBlock { .. } => lp.kv_groups.clear(),
                PruneUnit::MlpBlock { .. } => lp.channels.clear(),
                PruneUnit::Layer { .. } => {
                    lp.kv_groups.clear();
                    lp.channels.clear();
                }
            }
        }
        plan.validate()?;
        Ok(plan)
    }

    /// Checks the plan on its own: version, one entry per layer, sorted unique in-range ids,
    /// and at least one block kept somewhere.
    pub fn validate(&self) -> Result<()> {
        if self.format_version != MASK_PLAN_FORMAT_VERSION {
            return Err(Error::UnsupportedPlanVersion {
                found: self.format_version,
                supported: MASK_PLAN_FORMAT_VERSION,
            });
        }
        self.source.validate()?;
        if self.layers.len() != self.source.n_layers() {
            return Err(Error::InvalidPlan(format!(
                "the plan has {} layer entries but its source model has {} layers",
                self.layers.len(),
                self.source.n_layers()
            )));
        }
        for (i, (lp, ls)) in self.layers.iter().zip(&self.source.layers).enumerate() {
            check_sorted_in_range("kv_groups", &lp.kv_groups, ls.n_kv_heads, i)?;
            check_sorted_in_range("channels", &lp.channels, ls.ffn_hidden, i)?;
        }
        if self
            .layers
            .iter()
            .all(|l| l.kv_groups.is_empty() && l.channels.is_empty())
        {
            return Err(Error::InvalidPlan(
                "the plan removes every layer; keep at least one attention or MLP block".into(),
            ));
        }
        Ok(())
    }

    /// Checks that the plan was made for `shape` (and is valid).
    pub fn validate_against(&self, shape: &ModelShape) -> Result<()> {
        if let Some(diff) = describe_shape_difference(&self.source, shape) {
            return Err(Error::PlanMismatch(format!(
                "the plan was made for another model ({diff}); make the plan on this model"
            )));
        }
        self.validate()
    }

    /// What makes the pruned model degenerate, one sentence each: no attention block left
    /// anywhere (the model cannot mix information across positions), or a kept layer with no
    /// KV group or no MLP channel. Such plans are valid; reports show these as warnings.
    pub fn degeneracies(&self) -> Vec<String> {
        let kept = self.kept_layers();
        let mut out = Vec::new();
        if !kept.is_empty() && kept.iter().all(|&i| self.layers[i].kv_groups.is_empty()) {
            out.push(
                "no kept layer has an attention block: every token is predicted from itself alone"
                    .to_string(),
            );
        }
        let list = |v: Vec<usize>| {
            v.iter()
                .map(usize::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        };
        let no_attn: Vec<usize> = kept
            .iter()
            .copied()
            .filter(|&i| self.layers[i].kv_groups.is_empty())
            .collect();
        if !no_attn.is_empty() && no_attn.len() < kept.len() {
            out.push(format!(
                "{} kept layer(s) keep no KV group (attention removed): {}",
                no_attn.len(),
                list(no_attn)
            ));
        }
        let no_mlp: Vec<usize> = kept
            .iter()
            .copied()
            .filter(|&i| self.layers[i].channels.is_empty())
            .collect();
        if !no_mlp.is_empty() {
            out.push(format!(
                "{} kept layer(s) keep no MLP channel (MLP removed): {}",
                no_mlp.len(),
                list(no_mlp)
            ));
        }
        out
    }

    /// Indices of the source layers that keep at least one block (the layers of the pruned model).
    pub fn kept_layers(&self) -> Vec<usize> {
        self.layers
            .iter()
            .enumerate()
            .filter(|(_, l)| !(l.kv_groups.is_empty() && l.channels.is_empty()))
            .map(|(i, _)| i)
            .collect()
    }

    /// The shape of the pruned model: kept layers only, each with its kept widths.
    pub fn pruned_shape(&self) -> ModelShape {
        let layers = self
            .kept_layers()
            .into_iter()
            .map(|i| {
                let (lp, ls) = (&self.layers[i], &self.source.layers[i]);
                let n_kv_heads = lp.kv_groups.len();
                LayerShape {
                    n_heads: n_kv_heads * ls.n_rep(),
                    n_kv_heads,
                    head_dim: ls.head_dim,
                    ffn_hidden: lp.channels.len(),
                }
            })
            .collect();
        ModelShape {
            layers,
            ..self.source.clone()
        }
    }

    /// The removed units, at the finest granularity (KV groups and channels).
    pub fn removed_units(&self) -> Vec<PruneUnit> {
        let mut out = Vec::new();
        for (layer, (lp, ls)) in self.layers.iter().zip(&self.source.layers).enumerate() {
            out.extend(
                complement(&lp.kv_groups, ls.n_kv_heads)
                    .map(|group| PruneUnit::KvGroup { layer, group }),
            );
            out.extend(
                complement(&lp.channels, ls.ffn_hidden)
                    .map(|index| PruneUnit::Channel { layer, index }),
            );
        }
        out
    }

    /// Fraction of units of `kind` (KV groups or channels) that are kept.
    pub fn kept_fraction(&self, kind: UnitKind) -> f64 {
        let (kept, total) = self
            .layers
            .iter()
            .zip(&self.source.layers)
            .map(|(lp, ls)| match kind {
                UnitKind::KvGroup => (lp.kv_groups.len(), ls.n_kv_heads),
                UnitKind::Channel => (lp.channels.len(), ls.ffn_hidden),
                UnitKind::AttnBlock => (!lp.kv_groups.is_empty() as usize, ls.has_attn() as usize),
                UnitKind::MlpBlock => (!lp.channels.is_empty() as usize, ls.has_mlp() as usize),
                UnitKind::Layer => (
                    !(lp.kv_groups.is_empty() && lp.channels.is_empty()) as usize,
                    1,
                ),
            })
            .fold((0, 0), |(a, b), (k, t)| (a + k, b + t));
        if total == 0 {
            1.0
        } else {
            kept as f64 / total as f64
        }
    }

    /// Kept fraction of the prunable (decoder linear) parameters.
    pub fn kept_param_ratio(&self) -> f64 {
        self.pruned_shape().decoder_linear_params() as f64
            / self.source.decoder_linear_params() as f64
    }

    /// Whether every layer of the pruned model has the same shape.
    pub fn is_uniform(&self) -> bool {
        let s = self.pruned_shape();
        s.layers.windows(2).all(|w| w[0] == w[1])
    }

    /// Parses a plan from JSON and validates it on its own.
    pub fn from_json(json: &str) -> Result<Self> {
        // Read the version first so that a future format gets the version error, not a field error.
        #[derive(Deserialize)]
        struct Version {
            format_version: Option<u32>,
        }
        let json_err = |source| Error::Json {
            context: "parsing a mask plan".into(),
            source,
        };
        let v: Version = serde_json::from_str(json).map_err(json_err)?;
        match v.format_version {
            Some(MASK_PLAN_FORMAT_VERSION) => {}
            Some(found) => {
                return Err(Error::UnsupportedPlanVersion {
                    found,
                    supported: MASK_PLAN_FORMAT_VERSION,
                });
            }
            None => {
                return Err(Error::InvalidPlan(
                    "no `format_version` field: this is not a lopper mask plan".into(),
                ));
            }
        }
        let plan: Self = serde_json::from_str(json).map_err(json_err)?;
        plan.validate()?;
        Ok(plan)
    }

    /// Pretty JSON.
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).expect("a mask plan always serialises")
    }

    /// Reads and validates a plan file.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|source| Error::Io {
            path: path.to_owned(),
            source,
        })?;
        Self::from_json(&text).map_err(|e| match e {
            Error::Json { source, .. } => Error::Json {
                context: format!("parsing mask plan {}", path.display()),
                source,
            },
            e => e,
        })
    }

    /// Writes the plan atomically (temporary file in the same folder, then rename).
    pub fn save(&self, path: &Path) -> Result<()> {
        write_atomic(path, self.to_json().as_bytes())
    }
}

/// Writes `bytes` to `path` atomically: a temporary file in the same folder, synced, then renamed.
/// On failure nothing is left under `path`'s name.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    let io = |source| Error::Io {
        path: path.to_owned(),
        source,
    };
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned());
    let tmp = dir.join(format!(
        ".{}.tmp-{}",
        name.unwrap_or_default(),
        std::process::id()
    ));
    let result = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.map_err(io)
}

fn complement(kept: &[usize], n: usize) -> impl Iterator<Item = usize> + '_ {
    (0..n).filter(move |i| kept.binary_search(i).is_err())
}

fn check_range(what: &str, i: usize, n: usize, layer: usize) -> Result<()> {
    if i >= n {
        return Err(Error::InvalidPlan(format!(
            "{what} {i} of layer {layer} is out of range (the layer has {n})"
        )));
    }
    Ok(())
}

fn check_sorted_in_range(what: &str, ids: &[usize], n: usize, layer: usize) -> Result<()> {
    for w in ids.windows(2) {
        if w[0] >= w[1] {
            return Err(Error::InvalidPlan(format!(
                "layer {layer}: `{what}` must be sorted and unique, found {} before {}",
                w[0], w[1]
            )));
        }
    }
    if let Some(&last) = ids.last()
        && last >= n
    {
        return Err(Error::InvalidPlan(format!(
            "layer {layer}: `{what}` id {last} is out of range (the layer has {n})"
        )));
    }
    Ok(())
}

fn describe_shape_difference(a: &ModelShape, b: &ModelShape) -> Option<String> {
    if a == b {
        return None;
    }
    Some(if a.n_layers() != b.n_layers() {
        format!("{} layers vs {} layers", a.n_layers(), b.n_layers())
    } else if a.hidden_size != b.hidden_size {
        format!("hidden size {} vs {}", a.hidden_size, b.hidden_size)
    } else if a.vocab_size != b.vocab_size {
        format!("vocabulary {} vs {}", a.vocab_size, b.vocab_size)
    } else if let Some(i) = (0..a.n_layers()).find(|&i| a.layers[i] != b.layers[i]) {
        format!("layer {i} is {:?} vs {:?}", a.layers[i], b.layers[i])
    } else {
        "norm epsilon, RoPE or embedding settings differ".into()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check_err(plan: Result<MaskPlan>, needle: &str) {
        let e = plan.expect_err("should fail").to_string();
        assert!(e.contains(needle), "error {e:?} should mention {needle:?}");
    }

    #[test]
    fn keep_all_is_the_source_shape() {
        let s = ModelShape::tiny();
        let p = MaskPlan::keep_all(&s);
        p.validate_against(&s).unwrap();
        assert_eq!(p.pruned_shape(), s);
        assert_eq!(p.kept_param_ratio(), 1.0);
        assert!(p.removed_units().is_empty());
        assert!(p.is_uniform());
    }

    #[test]
    fn removed_units_round_trip_and_shapes_follow() {
        let s = ModelShape::tiny();
        let removed = vec![
            PruneUnit::KvGroup { layer: 0, group: 1 },
            PruneUnit::Channel { layer: 2, index: 7 },
            PruneUnit::Channel { layer: 2, index: 0 },
        ];
        let p = MaskPlan::from_removed(&s, &removed).unwrap();
        let mut back = p.removed_units();
        back.sort();
        let mut want = removed.clone();
        want.sort();
        assert_eq!(back, want);
        let ps = p.pruned_shape();
        assert_eq!(ps.layers[0].n_kv_heads, 1);
        assert_eq!(ps.layers[0].n_heads, 2);
        assert_eq!(ps.layers[2].ffn_hidden, 46);
        assert!(!p.is_uniform());
        let expect = s.decoder_linear_params()
            - s.unit_cost(removed[0], 0).params
            - 2 * s.unit_cost(removed[1], 0).params;
        assert_eq!(ps.decoder_linear_params(), expect);
    }

    #[test]
    fn removing_a_layer_drops_it_from_the_shape() {
        let s = ModelShape::tiny();
        let p = MaskPlan::from_removed(&s, &[PruneUnit::Layer { layer: 1 }]).unwrap();
        assert_eq!(p.kept_layers(), vec![0, 2]);
        assert_eq!(p.pruned_shape().n_layers(), 2);
        let p = MaskPlan::from_removed(&s, &[PruneUnit::AttnBlock { layer: 1 }]).unwrap();
        let ps = p.pruned_shape();
        assert_eq!(ps.n_layers(), 3);
        assert!(!ps.layers[1].has_attn() && ps.layers[1].has_mlp());
        ps.validate().unwrap();
    }

    #[test]
    fn degenerate_plans_are_named() {
        let s = ModelShape::tiny();
        assert!(MaskPlan::keep_all(&s).degeneracies().is_empty());
        let p = MaskPlan::from_removed(&s, &[PruneUnit::AttnBlock { layer: 1 }]).unwrap();
        let d = p.degeneracies();
        assert_eq!(d.len(), 1);
        assert!(
            d[0].contains("no KV group") && d[0].ends_with(": 1"),
            "{d:?}"
        );
        let attn: Vec<_> = (0..s.n_layers())
            .map(|layer| PruneUnit::AttnBlock { layer })
            .collect();
        let d = MaskPlan::from_removed(&s, &attn).unwrap().degeneracies();
        assert!(
            d.len() == 1 && d[0].contains("no kept layer has an attention block"),
            "{d:?}"
        );
        let p = MaskPlan::from_removed(&s, &[PruneUnit::MlpBlock { layer: 2 }]).unwrap();
        let d = p.degeneracies();
        assert!(
            d.len() == 1 && d[0].contains("no MLP channel") && d[0].ends_with(": 2"),
            "{d:?}"
        );
    }

    #[test]
    fn bad_plans_are_refused_with_clear_errors() {
        let s = ModelShape::tiny();
        let all: Vec<_> = s.units(UnitKind::Layer);
        check_err(MaskPlan::from_removed(&s, &all), "removes every layer");
        check_err(
            MaskPlan::from_removed(
                &s,
                &[
                    PruneUnit::Channel { layer: 0, index: 1 },
                    PruneUnit::Channel { layer: 0, index: 1 },
                ],
            ),
            "listed twice",
        );
        check_err(
            MaskPlan::from_removed(&s, &[PruneUnit::KvGroup { layer: 0, group: 2 }]),
            "out of range",
        );
        check_err(
            MaskPlan::from_removed(&s, &[PruneUnit::Layer { layer: 3 }]),
            "the model has 3 layers",
        );
        let mut p = MaskPlan::keep_all(&s);
        p.layers[1].channels = vec![3, 2];
        check_err(MaskPlan::from_json(&p.to_json()), "sorted and unique");
        let mut p = MaskPlan::keep_all(&s);
        p.layers[1].channels.push(48);
        check_err(MaskPlan::from_json(&p.to_json()), "out of range");
        let mut p = MaskPlan::keep_all(&s);
        p.format_version = 99;
        check_err(MaskPlan::from_json(&p.to_json()), "format version 99");
        check_err(
            MaskPlan::from_json("{\"layers\": []}"),
            "not a lopper mask plan",
        );
        check_err(MaskPlan::from_json("{not json"), "parsing a mask plan");
    }

    #[test]
    fn a_plan_for_another_model_is_refused() {
        let s = ModelShape::tiny();
        let p = MaskPlan::keep_all(&s);
        let mut other = s.clone();
        other.layers[2].ffn_hidden = 64;
        let e = p.validate_against(&other).unwrap_err().to_string();
        assert!(e.contains("another model") && e.contains("layer 2"), "{e}");
    }

    #[test]
    fn json_round_trip_and_atomic_save() {
        let s = ModelShape::tiny();
        let mut p = MaskPlan::from_removed(&s, &[PruneUnit::MlpBlock { layer: 0 }]).unwrap();
        p.meta.insert("method".into(), "test".into());
        let dir = std::env::temp_dir().join(format!("lopper-core-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("plan.json");
        p.save(&path).unwrap();
        assert_eq!(MaskPlan::load(&path).unwrap(), p);
        assert_eq!(
            std::fs::read_dir(&dir).unwrap().count(),
            1,
            "no temporary file left"
        );
        let e = MaskPlan::load(&dir.join("missing.json"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("missing.json"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
