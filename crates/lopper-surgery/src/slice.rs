//! Index-selecting the kept units of a layer, and of a whole model.

use std::borrow::Cow;

use burn::module::Param;
use burn::nn::Linear;
use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor, TensorData};

use crate::error::Result;
use lopper_core::{LayerPlan, LayerShape, MaskPlan};
use lopper_model::{Attention, DecoderLayer, Llama, Mlp, mean_of};

fn index<B: Backend>(ids: &[usize], device: &B::Device) -> Tensor<B, 1, Int> {
    let v: Vec<i64> = ids.iter().map(|&i| i as i64).collect();
    Tensor::from_data(TensorData::new(v, [ids.len()]), device)
}

/// A linear layer keeping only the `ids` of one side. burn stores `[in, out]`: `dim = 1` selects
/// outputs (HF rows), `dim = 0` selects inputs (HF columns). Biases follow the outputs.
fn select_linear<B: Backend>(lin: &Linear<B>, dim: usize, ids: &Tensor<B, 1, Int>) -> Linear<B> {
    let weight = lin.weight.val().select(dim, ids.clone());
    let bias = lin.bias.as_ref().map(|b| {
        let v = b.val();
        Param::from_tensor(if dim == 1 {
            v.select(0, ids.clone())
        } else {
            v
        })
    });
    Linear {
        weight: Param::from_tensor(weight),
        bias,
    }
}

/// The feature indices of kept KV groups: `(query dims, kv dims)`.
fn head_dims(groups: &[usize], src: &LayerShape) -> (Vec<usize>, Vec<usize>) {
    let (hd, rep) = (src.head_dim, src.n_rep());
    let q = groups
        .iter()
        .flat_map(|&g| (g * rep * hd)..((g + 1) * rep * hd))
        .collect();
    let kv = groups
        .iter()
        .flat_map(|&g| (g * hd)..((g + 1) * hd))
        .collect();
    (q, kv)
}

/// Layer `layer` (of shape `src`) keeping only what `keep` lists. A block that keeps nothing is
/// removed with its norm. Returns the layer unchanged when everything is kept.
pub fn slice_layer<'a, B: Backend>(
    layer: &'a DecoderLayer<B>,
    src: &LayerShape,
    keep: &LayerPlan,
) -> Cow<'a, DecoderLayer<B>> {
    let all_groups = keep.kv_groups.len() == src.n_kv_heads;
    let all_channels = keep.channels.len() == src.ffn_hidden;
    if all_groups && all_channels {
        return Cow::Borrowed(layer);
    }
    let (input_layernorm, self_attn) = match (&layer.input_layernorm, &layer.self_attn) {
        (Some(n), Some(a)) if !keep.kv_groups.is_empty() => {
            if all_groups {
                (Some(n.clone()), Some(a.clone()))
            } else {
                let device = a.q_proj.weight.device();
                let (q, kv) = head_dims(&keep.kv_groups, src);
                let (q, kv) = (index::<B>(&q, &device), index::<B>(&kv, &device));
                let n_kv_heads = keep.kv_groups.len();
                let attn = Attention {
                    q_proj: select_linear(&a.q_proj, 1, &q),
                    k_proj: select_linear(&a.k_proj, 1, &kv),
                    v_proj: select_linear(&a.v_proj, 1, &kv),
                    o_proj: select_linear(&a.o_proj, 0, &q),
                    n_heads: n_kv_heads * src.n_rep(),
                    n_kv_heads,
                    head_dim: src.head_dim,
                };
                (Some(n.clone()), Some(attn))
            }
        }
        _ => (None, None),
    };
    let (post_attention_layernorm, mlp) = match (&layer.post_attention_layernorm, &layer.mlp) {
        (Some(n), Some(m)) if !keep.channels.is_empty() => {
            if all_channels {
                (Some(n.clone()), Some(m.clone()))
            } else {
                let ids = index::<B>(&keep.channels, &m.gate_proj.weight.device());
                let mlp = Mlp {
                    gate_proj: select_linear(&m.gate_proj, 1, &ids),
                    up_proj: select_linear(&m.up_proj, 1, &ids),
                    down_proj: select_linear(&m.down_proj, 0, &ids),
                };
                (Some(n.clone()), Some(mlp))
            }
        }
        _ => (None, None),
    };
    Cow::Owned(DecoderLayer {
        input_layernorm,
        self_attn,
        post_attention_layernorm,
        mlp,
    })
}

/// The physically pruned model: the plan's shape first, then the kept weights, checked
/// against that shape. Norms, embeddings, RoPE and the LM head stay; removed layers are dropped
/// and the rest renumbered.
///
/// ```
/// use burn::tensor::ElementConversion;
/// use burn_flex::{Flex, FlexDevice};
/// use lopper_core::{MaskPlan, ModelShape, PruneUnit};
/// use lopper_model::{Llama, Masks};
///
/// let model = Llama::<Flex>::random(&ModelShape::tiny(), 0, &FlexDevice)?;
/// let removed = [
///     PruneUnit::KvGroup { layer: 0, group: 1 },
///     PruneUnit::Channel { layer: 2, index: 5 },
///     PruneUnit::Layer { layer: 1 },
/// ];
/// let plan = MaskPlan::from_removed(model.shape(), &removed)?;
/// let small = lopper_surgery::prune(&model, &plan)?;
/// assert_eq!(small.shape().n_layers(), 2);
/// assert_eq!(small.shape().layers[0].n_kv_heads, 1);
/// assert!(small.shape().num_params() < model.shape().num_params());
/// // Surgery equals masking: the cut model computes what the masked dense model computes.
/// let tokens = model.tokens(&[vec![1, 5, 9, 2, 7, 3]])?;
/// let masks = Masks::from_plan(&plan, &FlexDevice)?;
/// let cut = small.forward(tokens.clone());
/// let masked = model.forward_masked(tokens, Some(&masks))?;
/// let diff: f32 = (cut - masked).abs().max().into_scalar().elem();
/// assert!(diff < 1e-4, "{diff}");
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn prune<B: Backend>(model: &Llama<B>, plan: &MaskPlan) -> Result<Llama<B>> {
    plan.validate_against(model.shape())?;
    let shape = plan.pruned_shape();
    let layers = plan
        .kept_layers()
        .into_iter()
        .map(|i| {
            slice_layer(&model.layers[i], &plan.source.layers[i], &plan.layers[i]).into_owned()
        })
        .collect();
    let pruned = Llama::from_parts(
        model.embed_tokens.clone(),
        layers,
        model.norm.clone(),
        model.lm_head.clone(),
        shape,
    )?;
    tracing::debug!(
        params = pruned.shape().num_params(),
        dense = model.shape().num_params(),
        "surgery done"
    );
    Ok(pruned)
}

/// Logits of the model pruned by `plan`, without building the pruned model: each layer is sliced
/// just before it runs and dropped after, so memory stays at one layer's kept weights and the
/// compute falls with the units removed. Equal to `prune(model, plan)?.forward(tokens)`.
///
/// # Shapes
/// - `tokens`: `[batch, seq]` -> `[batch, seq, vocab]`
pub fn forward_kept<B: Backend>(
    model: &Llama<B>,
    plan: &MaskPlan,
    tokens: Tensor<B, 2, Int>,
) -> Result<Tensor<B, 3>> {
    plan.validate_against(model.shape())?;
    Ok(model.forward_layers(
        tokens,
        None,
        |_, _| {},
        |i, layer| slice_layer(layer, &plan.source.layers[i], &plan.layers[i]),
    )?)
}

/// Mean next-token cross-entropy (nats) of the model pruned by `plan` ([`forward_kept`]).
///
/// # Shapes
/// - `tokens`: `[batch, seq]` (seq >= 2) -> scalar
pub fn mean_loss_kept<B: Backend>(
    model: &Llama<B>,
    plan: &MaskPlan,
    tokens: Tensor<B, 2, Int>,
) -> Result<f64> {
    plan.validate_against(model.shape())?;
    let nll = model.token_nll_layers(tokens, None, |i, layer| {
        slice_layer(layer, &plan.source.layers[i], &plan.layers[i])
    })?;
    Ok(mean_of(nll)?)
}

/// Per-layer means over calibration tokens of the inputs of `o_proj` (per column, `n_heads *
/// head_dim`) and `down_proj` (per channel); empty for a layer without the block.
#[derive(Debug, Clone, PartialEq)]
pub struct InputMeans {
    /// `o_proj` input means per layer.
    pub o_proj: Vec<Vec<f64>>,
    /// `down_proj` input means per layer.
    pub down_proj: Vec<Vec<f64>>,
}

/// `bias[out] += sum over removed input columns j of mean[j] * W[j, out]` (burn layout `[in, out]`).
fn compensate<B: Backend>(lin: &Linear<B>, removed: &[usize], means: &[f64]) -> Result<Linear<B>> {
    let [n_in, n_out] = lin.weight.dims();
    if means.len() != n_in {
        return Err(lopper_model::Error::Input(format!(
            "bias compensation: {} input means for a projection of {n_in} inputs",
            means.len()
        ))
        .into());
    }
    let w: Vec<f32> = lin
        .weight
        .val()
        .into_data()
        .convert::<f32>()
        .to_vec()
        .map_err(|e| lopper_model::Error::Input(format!("{e:?}")))?;
    let mut b = vec![0f64; n_out];
    for &j in removed {
        let m = means[j];
        for (o, bo) in b.iter_mut().enumerate() {
            *bo += m * w[j * n_out + o] as f64;
        }
    }
    let device = lin.weight.device();
    let add = Tensor::<B, 1>::from_data(
        TensorData::new(
            b.into_iter().map(|x| x as f32).collect::<Vec<f32>>(),
            [n_out],
        ),
        &device,
    );
    let bias = match &lin.bias {
        Some(old) => old.val() + add,
        None => add,
    };
    Ok(Linear {
        weight: lin.weight.clone(),
        bias: Some(Param::from_tensor(bias)),
    })
}

/// [`prune`] with FLAP-style bias compensation: the mean contribution of every removed input
/// of `o_proj` / `down_proj` over the calibration tokens (`means`, from the dense model) is
/// added to that projection's bias, so the layer's output mean on the calibration set is kept.
/// A block removed whole has no projection left to carry it; its contribution is dropped.
pub fn prune_compensated<B: Backend>(
    model: &Llama<B>,
    plan: &MaskPlan,
    means: &InputMeans,
) -> Result<Llama<B>> {
    plan.validate_against(model.shape())?;
    let n = model.shape().n_layers();
    if means.o_proj.len() != n || means.down_proj.len() != n {
        return Err(lopper_model::Error::Input(format!(
            "bias compensation: input means for {} layers, the model has {n}",
            means.o_proj.len()
        ))
        .into());
    }
    let mut compensated = Vec::with_capacity(n);
    for (i, layer) in model.layers.iter().enumerate() {
        let (lp, ls) = (&plan.layers[i], &plan.source.layers[i]);
        let mut l = layer.clone();
        if let Some(a) = &mut l.self_attn {
            let (kept_q, _) = head_dims(&lp.kv_groups, ls);
            let removed: Vec<usize> = (0..ls.n_heads * ls.head_dim)
                .filter(|c| kept_q.binary_search(c).is_err())
                .collect();
            if !removed.is_empty() && !lp.kv_groups.is_empty() {
                a.o_proj = compensate(&a.o_proj, &removed, &means.o_proj[i])?;
            }
        }
        if let Some(m) = &mut l.mlp {
            let removed: Vec<usize> = (0..ls.ffn_hidden)
                .filter(|c| lp.channels.binary_search(c).is_err())
                .collect();
            if !removed.is_empty() && !lp.channels.is_empty() {
                m.down_proj = compensate(&m.down_proj, &removed, &means.down_proj[i])?;
            }
        }
        compensated.push(l);
    }
    let with_bias = Llama::from_parts(
        model.embed_tokens.clone(),
        compensated,
        model.norm.clone(),
        model.lm_head.clone(),
        model.shape().clone(),
    )?;
    prune(&with_bias, plan)
}
