//! The prunable units, enumerated in one place.

use serde::{Deserialize, Serialize};

use crate::ModelShape;

/// The kinds of coupled groups lopper prunes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum UnitKind {
    /// One KV head with its `n_rep` query heads: q rows, k/v rows, o_proj columns.
    KvGroup,
    /// One SwiGLU channel: a gate row, an up row and a down_proj column.
    Channel,
    /// A layer's whole attention block (its input norm included).
    AttnBlock,
    /// A layer's whole MLP block (its input norm included).
    MlpBlock,
    /// A whole decoder layer.
    Layer,
}

impl UnitKind {
    /// All kinds, finest first.
    pub const ALL: [UnitKind; 5] = [
        UnitKind::KvGroup,
        UnitKind::Channel,
        UnitKind::AttnBlock,
        UnitKind::MlpBlock,
        UnitKind::Layer,
    ];
}

/// One prunable unit of a model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum PruneUnit {
    /// KV group `group` of layer `layer`.
    KvGroup {
        /// Layer index.
        layer: usize,
        /// KV head index within the layer.
        group: usize,
    },
    /// MLP channel `index` of layer `layer`.
    Channel {
        /// Layer index.
        layer: usize,
        /// Channel index within the layer.
        index: usize,
    },
    /// The attention block of layer `layer`.
    AttnBlock {
        /// Layer index.
        layer: usize,
    },
    /// The MLP block of layer `layer`.
    MlpBlock {
        /// Layer index.
        layer: usize,
    },
    /// Decoder layer `layer`.
    Layer {
        /// Layer index.
        layer: usize,
    },
}

impl PruneUnit {
    /// The unit's kind.
    pub fn kind(&self) -> UnitKind {
        match self {
            PruneUnit::KvGroup { .. } => UnitKind::KvGroup,
            PruneUnit::Channel { .. } => UnitKind::Channel,
            PruneUnit::AttnBlock { .. } => UnitKind::AttnBlock,
            PruneUnit::MlpBlock { .. } => UnitKind::MlpBlock,
            PruneUnit::Layer { .. } => UnitKind::Layer,
        }
    }
    /// The layer the unit lives in.
    pub fn layer(&self) -> usize {
        match *self {
            PruneUnit::KvGroup { layer, .. }
            | PruneUnit::Channel { layer, .. }
            | PruneUnit::AttnBlock { layer }
            | PruneUnit::MlpBlock { layer }
            | PruneUnit::Layer { layer } => layer,
        }
    }
}

/// What removing a unit saves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct UnitCost {
    /// Parameters removed with the unit (norm weights of removed blocks included).
    pub params: u64,
    /// Forward FLOPs per token saved, for a token attending over the given context.
    pub flops_per_token: u64,
}

impl ModelShape {
    /// Every unit of `kind` in this model, in layer order then index order.
    pub fn units(&self, kind: UnitKind) -> Vec<PruneUnit> {
        let mut out = Vec::new();
        for (layer, l) in self.layers.iter().enumerate() {
            match kind {
                UnitKind::KvGroup => {
                    out.extend((0..l.n_kv_heads).map(|group| PruneUnit::KvGroup { layer, group }))
                }
                UnitKind::Channel => {
                    out.extend((0..l.ffn_hidden).map(|index| PruneUnit::Channel { layer, index }))
                }
                UnitKind::AttnBlock if l.has_attn() => out.push(PruneUnit::AttnBlock { layer }),
                UnitKind::MlpBlock if l.has_mlp() => out.push(PruneUnit::MlpBlock { layer }),
                UnitKind::Layer if l.has_attn() || l.has_mlp() => {
                    out.push(PruneUnit::Layer { layer })
                }
                _ => {}
            }
        }
        out
    }

    /// Parameters and per-token FLOPs that removing `unit` saves, for a token attending over
    /// `context` positions. Panics if the unit is out of range (enumerate with [`ModelShape::units`]).
    pub fn unit_cost(&self, unit: PruneUnit, context: usize) -> UnitCost {
        let h = self.hidden_size as u64;
        let l = &self.layers[unit.layer()];
        let (hd, rep) = (l.head_dim as u64, l.n_rep() as u64);
        let group = || {
            // q and o: rep heads each; k and v: one head each.
            let params = h * hd * (2 * rep + 2);
            UnitCost {
                params,
                flops_per_token: 2 * params + 4 * rep * hd * context as u64,
            }
        };
        let channel = || UnitCost {
            params: 3 * h,
            flops_per_token: 6 * h,
        };
        let scale = |c: UnitCost, n: usize| UnitCost {
            params: c.params * n as u64,
            flops_per_token: c.flops_per_token * n as u64,
        };
        let norm = |present: bool| if present { h } else { 0 };
        match unit {
            PruneUnit::KvGroup { .. } => group(),
            PruneUnit::Channel { .. } => channel(),
            PruneUnit::AttnBlock { .. } => {
                let c = scale(group(), l.n_kv_heads);
                UnitCost {
                    params: c.params + norm(l.has_attn()),
                    ..c
                }
            }
            PruneUnit::MlpBlock { .. } => {
                let c = scale(channel(), l.ffn_hidden);
                UnitCost {
                    params: c.params + norm(l.has_mlp()),
                    ..c
                }
            }
            PruneUnit::Layer { layer } => {
                let a = self.unit_cost(PruneUnit::AttnBlock { layer }, context);
                let m = self.unit_cost(PruneUnit::MlpBlock { layer }, context);
                UnitCost {
                    params: a.params + m.params,
                    flops_per_token: a.flops_per_token + m.flops_per_token,
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn units_are_enumerated_per_layer() {
        let s = ModelShape::tiny();
        assert_eq!(s.units(UnitKind::KvGroup).len(), 3 * 2);
        assert_eq!(s.units(UnitKind::Channel).len(), 3 * 48);
        assert_eq!(s.units(UnitKind::Layer).len(), 3);
        assert_eq!(
            s.units(UnitKind::KvGroup)[3],
            PruneUnit::KvGroup { layer: 1, group: 1 }
        );
    }

    #[test]
    fn unit_costs_add_up_to_the_model() {
        let s = ModelShape::tiny();
        let total: u64 = UnitKind::ALL[..2]
            .iter()
            .flat_map(|&k| s.units(k))
            .map(|u| s.unit_cost(u, 0).params)
            .sum();
        assert_eq!(total, s.decoder_linear_params());
        let layers: u64 = s
            .units(UnitKind::Layer)
            .into_iter()
            .map(|u| s.unit_cost(u, 7).flops_per_token)
            .sum();
        assert_eq!(layers + 2 * 32 * 128, s.flops_per_token(7));
        let layer_params: u64 = s
            .units(UnitKind::Layer)
            .into_iter()
            .map(|u| s.unit_cost(u, 0).params)
            .sum();
        assert_eq!(
            layer_params,
            s.num_params() - 2 * s.embedding_params() - s.hidden_size as u64
        );
    }

    #[test]
    fn unit_json_is_tagged() {
        let u = PruneUnit::Channel { layer: 2, index: 5 };
        let j = serde_json::to_string(&u).unwrap();
        assert_eq!(j, r#"{"kind":"channel","layer":2,"index":5}"#);
        assert_eq!(serde_json::from_str::<PruneUnit>(&j).unwrap(), u);
    }
}
