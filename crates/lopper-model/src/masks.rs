//! Masks: the tensor form of a [`MaskPlan`], handed to [`crate::Llama::forward_masked`] as an
//! argument (never stored in the model).

use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorData};

use crate::error::{Error, Result};
use lopper_core::{MaskPlan, ModelShape};

/// Masks for one layer. Head masks are per *query* head (the finest structure the attention
/// output has); a KV-group mask is the same value on the group's `n_rep` query heads
/// ([`LayerMasks::from_kv_groups`]). Values need not be binary (relaxed masks).
#[derive(Debug, Clone)]
pub struct LayerMasks<B: Backend> {
    /// `[n_heads]`: multiplies each query head's attention output before `o_proj`.
    pub heads: Option<Tensor<B, 1>>,
    /// `[ffn_hidden]`: multiplies `silu(gate) * up` before `down_proj`.
    pub channels: Option<Tensor<B, 1>>,
    /// Scale of the attention residual branch; 0 skips the block entirely.
    pub attn: f32,
    /// Scale of the MLP residual branch; 0 skips the block entirely.
    pub mlp: f32,
}

impl<B: Backend> LayerMasks<B> {
    /// Masks that change nothing.
    pub fn none() -> Self {
        Self {
            heads: None,
            channels: None,
            attn: 1.0,
            mlp: 1.0,
        }
    }

    /// Whether the mask tensors live on `device` (masks without tensors live everywhere).
    pub fn is_on(&self, device: &B::Device) -> bool {
        [&self.heads, &self.channels]
            .into_iter()
            .flatten()
            .all(|t| t.device() == *device)
    }

    /// The masks with their tensors on `device` (for a layer placed there).
    pub fn to_device(&self, device: &B::Device) -> Self {
        Self {
            heads: self.heads.clone().map(|t| t.to_device(device)),
            channels: self.channels.clone().map(|t| t.to_device(device)),
            attn: self.attn,
            mlp: self.mlp,
        }
    }

    /// Head masks from one value per KV group, repeated over each group's query heads.
    pub fn from_kv_groups(groups: &[f32], n_rep: usize, device: &B::Device) -> Tensor<B, 1> {
        let heads: Vec<f32> = groups
            .iter()
            .flat_map(|&g| std::iter::repeat_n(g, n_rep))
            .collect();
        let n = heads.len();
        Tensor::from_data(TensorData::new(heads, [n]), device)
    }
}

/// Masks for every layer of a model.
#[derive(Debug, Clone)]
pub struct Masks<B: Backend> {
    /// One entry per layer.
    pub layers: Vec<LayerMasks<B>>,
}

impl<B: Backend> Masks<B> {
    /// Masks that change nothing, for a model of `shape`.
    pub fn none(shape: &ModelShape) -> Self {
        Self {
            layers: (0..shape.n_layers()).map(|_| LayerMasks::none()).collect(),
        }
    }

    /// All-ones masks (every head and channel mask present and 1).
    pub fn ones(shape: &ModelShape, device: &B::Device) -> Self {
        let layers = shape
            .layers
            .iter()
            .map(|l| LayerMasks {
                heads: l.has_attn().then(|| Tensor::ones([l.n_heads], device)),
                channels: l.has_mlp().then(|| Tensor::ones([l.ffn_hidden], device)),
                attn: 1.0,
                mlp: 1.0,
            })
            .collect();
        Self { layers }
    }

    /// The binary masks of `plan` for its source model. A layer that keeps no KV group has its
    /// attention branch skipped; one that keeps no channel has its MLP branch skipped.
    pub fn from_plan(plan: &MaskPlan, device: &B::Device) -> Result<Self> {
        plan.validate()?;
        let layers = plan
            .layers
            .iter()
            .zip(&plan.source.layers)
            .map(|(lp, ls)| {
                let mut groups = vec![0f32; ls.n_kv_heads];
                lp.kv_groups.iter().for_each(|&g| groups[g] = 1.0);
                let mut channels = vec![0f32; ls.ffn_hidden];
                lp.channels.iter().for_each(|&c| channels[c] = 1.0);
                LayerMasks {
                    heads: ls
                        .has_attn()
                        .then(|| LayerMasks::from_kv_groups(&groups, ls.n_rep(), device)),
                    channels: ls.has_mlp().then(|| {
                        Tensor::from_data(TensorData::new(channels, [ls.ffn_hidden]), device)
                    }),
                    attn: if lp.kv_groups.is_empty() { 0.0 } else { 1.0 },
                    mlp: if lp.channels.is_empty() { 0.0 } else { 1.0 },
                }
            })
            .collect();
        Ok(Self { layers })
    }

    /// Checks that the masks fit `shape`.
    pub fn check(&self, shape: &ModelShape) -> Result<()> {
        if self.layers.len() != shape.n_layers() {
            return Err(Error::MaskShape(format!(
                "{} layer masks for a model of {} layers",
                self.layers.len(),
                shape.n_layers()
            )));
        }
        for (i, (m, l)) in self.layers.iter().zip(&shape.layers).enumerate() {
            if let Some(h) = &m.heads {
                let [n] = h.dims();
                if n != l.n_heads {
                    return Err(Error::MaskShape(format!(
                        "layer {i}: head mask of {n} entries for {} query heads",
                        l.n_heads
                    )));
                }
            }
            if let Some(c) = &m.channels {
                let [n] = c.dims();
                if n != l.ffn_hidden {
                    return Err(Error::MaskShape(format!(
                        "layer {i}: channel mask of {n} entries for {} MLP channels",
                        l.ffn_hidden
                    )));
                }
            }
            if !(m.attn.is_finite() && m.mlp.is_finite()) {
                return Err(Error::MaskShape(format!(
                    "layer {i}: block scales must be finite"
                )));
            }
        }
        Ok(())
    }
}
