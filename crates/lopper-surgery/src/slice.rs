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

/// The feature indices of kept KV groups: `(query dims, kv dims)`; the query dims are the
/// kept inputs of `o_proj`, in the order a sliced layer keeps them.
pub fn head_dims(groups: &[usize], src: &LayerShape) -> (Vec<usize>, Vec<usize>) {
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
            let layer = model.layer(i)?;
            Ok(slice_layer(&layer, &plan.source.layers[i], &plan.layers[i]).into_owned())
        })
        .collect::<Result<_>>()?;
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

/// Mean next-token cross-entropy (nats) of the model pruned by `plan` ([`forward_kept`]); with
/// `means`, of the model [`prune_compensated`] would build (the biases of
/// [`compensation_biases`] added while each layer is sliced).
///
/// # Shapes
/// - `tokens`: `[batch, seq]` (seq >= 2) -> scalar
pub fn mean_loss_kept<B: Backend>(
    model: &Llama<B>,
    plan: &MaskPlan,
    means: Option<&InputMeans>,
    tokens: Tensor<B, 2, Int>,
) -> Result<f64> {
    plan.validate_against(model.shape())?;
    let extra = match means {
        Some(m) => compensation_biases(model, plan, m)?,
        None => Vec::new(),
    };
    let none = LayerBias::default();
    let nll = model.token_nll_layers(tokens, None, |i, layer| {
        slice_layer_biased(
            layer,
            &plan.source.layers[i],
            &plan.layers[i],
            extra.get(i).unwrap_or(&none),
        )
    })?;
    Ok(mean_of(nll)?)
}

/// [`mean_loss_kept`] over all of `windows`, `batch_size` windows per forward pass, each window
/// weighing the same (windows of one length: the mean over their tokens).
pub fn windows_loss_kept<B: Backend>(
    model: &Llama<B>,
    plan: &MaskPlan,
    means: Option<&InputMeans>,
    windows: &[Vec<u32>],
    batch_size: usize,
) -> Result<f64> {
    if windows.is_empty() || batch_size == 0 {
        return Err(lopper_model::Error::Input(
            "a loss over no windows (or batches of 0 windows) is undefined".into(),
        )
        .into());
    }
    let mut sum = 0.0;
    for batch in windows.chunks(batch_size) {
        sum += mean_loss_kept(model, plan, means, model.tokens(batch)?)? * batch.len() as f64;
    }
    Ok(sum / windows.len() as f64)
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

/// Extra biases of one layer's `o_proj` and `down_proj` (output width = hidden size).
#[derive(Debug, Clone)]
pub struct LayerBias<B: Backend> {
    /// Added to `o_proj`'s bias.
    pub o_proj: Option<Tensor<B, 1>>,
    /// Added to `down_proj`'s bias.
    pub down_proj: Option<Tensor<B, 1>>,
}

impl<B: Backend> Default for LayerBias<B> {
    fn default() -> Self {
        Self {
            o_proj: None,
            down_proj: None,
        }
    }
}

/// `slot += v`. On a placed model a removed block's mean output can come from another layer's
/// device: it joins the slot's ([`with_extra_bias`] moves the sum to its projection's).
fn add_bias<B: Backend>(slot: &mut Option<Tensor<B, 1>>, v: Tensor<B, 1>) {
    *slot = Some(match slot.take() {
        Some(old) => {
            let v = v.to_device(&old.device());
            old + v
        }
        None => v,
    });
}

/// `W^T (means restricted to cols)` (+ the projection's own bias when `with_bias`): the mean
/// output of a projection fed only the columns `cols` (burn layout `[in, out]`).
fn mean_output<B: Backend>(
    lin: &Linear<B>,
    cols: &[usize],
    means: &[f64],
    with_bias: bool,
) -> Result<Tensor<B, 1>> {
    let [n_in, n_out] = lin.weight.dims();
    if means.len() != n_in {
        return Err(lopper_model::Error::Input(format!(
            "bias compensation: {} input means for a projection of {n_in} inputs",
            means.len()
        ))
        .into());
    }
    let mut v = vec![0f32; n_in];
    for &j in cols {
        v[j] = means[j] as f32;
    }
    let device = lin.weight.device();
    let v = Tensor::<B, 2>::from_data(TensorData::new(v, [1, n_in]), &device);
    let mut out = v.matmul(lopper_model::weight_f32(lin)).reshape([n_out]);
    if with_bias && let Some(b) = &lin.bias {
        out = out + b.val();
    }
    Ok(out)
}

/// FLAP-style bias compensation of `plan`, one rule for the search and the exported model. The
/// calibration means of the dense model's `o_proj` / `down_proj` inputs (`means`) stand in for
/// what the plan removes:
/// - a block that keeps some of its heads or channels gets the mean contribution of the removed
///   ones added to its own projection's bias;
/// - a block removed whole (all its heads or channels, or its layer) has its whole mean output
///   carried into the bias of the nearest earlier kept block's projection, so the residual
///   stream after that block carries the same mean as the dense model's. Before the first kept
///   block there is no projection to carry it; it is dropped.
pub fn compensation_biases<B: Backend>(
    model: &Llama<B>,
    plan: &MaskPlan,
    means: &InputMeans,
) -> Result<Vec<LayerBias<B>>> {
    plan.validate_against(model.shape())?;
    let n = model.shape().n_layers();
    if means.o_proj.len() != n || means.down_proj.len() != n {
        return Err(lopper_model::Error::Input(format!(
            "bias compensation: input means for {} layers, the model has {n}",
            means.o_proj.len()
        ))
        .into());
    }
    let mut out: Vec<LayerBias<B>> = (0..n).map(|_| LayerBias::default()).collect();
    // Mean outputs of blocks removed whole, waiting for the nearest earlier kept block.
    let mut carry: Option<Tensor<B, 1>> = None;
    for i in (0..n).rev() {
        let (lp, ls) = (&plan.layers[i], &plan.source.layers[i]);
        let layer = model.layer(i)?;
        // Blocks in reverse order within the layer: the MLP comes after the attention.
        if let Some(m) = &layer.mlp {
            let removed: Vec<usize> = (0..ls.ffn_hidden)
                .filter(|c| lp.channels.binary_search(c).is_err())
                .collect();
            if lp.channels.is_empty() {
                let all: Vec<usize> = (0..ls.ffn_hidden).collect();
                add_bias(
                    &mut carry,
                    mean_output(&m.down_proj, &all, &means.down_proj[i], true)?,
                );
            } else {
                if !removed.is_empty() {
                    let v = mean_output(&m.down_proj, &removed, &means.down_proj[i], false)?;
                    add_bias(&mut out[i].down_proj, v);
                }
                if let Some(c) = carry.take() {
                    add_bias(&mut out[i].down_proj, c);
                }
            }
        }
        if let Some(a) = &layer.self_attn {
            let width = ls.n_heads * ls.head_dim;
            if lp.kv_groups.is_empty() {
                let all: Vec<usize> = (0..width).collect();
                add_bias(
                    &mut carry,
                    mean_output(&a.o_proj, &all, &means.o_proj[i], true)?,
                );
            } else {
                let (kept_q, _) = head_dims(&lp.kv_groups, ls);
                let removed: Vec<usize> = (0..width)
                    .filter(|c| kept_q.binary_search(c).is_err())
                    .collect();
                if !removed.is_empty() {
                    let v = mean_output(&a.o_proj, &removed, &means.o_proj[i], false)?;
                    add_bias(&mut out[i].o_proj, v);
                }
                if let Some(c) = carry.take() {
                    add_bias(&mut out[i].o_proj, c);
                }
            }
        }
    }
    Ok(out)
}

fn with_extra_bias<B: Backend>(lin: &Linear<B>, extra: &Option<Tensor<B, 1>>) -> Linear<B> {
    match extra {
        None => lin.clone(),
        Some(v) => {
            let v = v.clone().to_device(&lin.weight.device());
            Linear {
                weight: lin.weight.clone(),
                bias: Some(Param::from_tensor(match &lin.bias {
                    Some(b) => b.val() + v,
                    None => v,
                })),
            }
        }
    }
}

/// [`slice_layer`], then `extra` added to the kept `o_proj` / `down_proj` biases.
pub fn slice_layer_biased<'a, B: Backend>(
    layer: &'a DecoderLayer<B>,
    src: &LayerShape,
    keep: &LayerPlan,
    extra: &LayerBias<B>,
) -> Cow<'a, DecoderLayer<B>> {
    let sliced = slice_layer(layer, src, keep);
    if extra.o_proj.is_none() && extra.down_proj.is_none() {
        return sliced;
    }
    Cow::Owned(with_layer_bias(sliced.into_owned(), extra))
}

/// `layer` with `extra` added to its o_proj / down_proj biases (a block it lacks gets nothing).
pub(crate) fn with_layer_bias<B: Backend>(
    mut layer: DecoderLayer<B>,
    extra: &LayerBias<B>,
) -> DecoderLayer<B> {
    if let Some(a) = &mut layer.self_attn {
        a.o_proj = with_extra_bias(&a.o_proj, &extra.o_proj);
    }
    if let Some(m) = &mut layer.mlp {
        m.down_proj = with_extra_bias(&m.down_proj, &extra.down_proj);
    }
    layer
}

/// [`prune`] with FLAP-style bias compensation ([`compensation_biases`]): the exported model
/// carries the biases the search scored.
pub fn prune_compensated<B: Backend>(
    model: &Llama<B>,
    plan: &MaskPlan,
    means: &InputMeans,
) -> Result<Llama<B>> {
    prune_with_biases(model, plan, &compensation_biases(model, plan, means)?)
}

/// [`prune`], then `extra[i]` (one per source layer, from [`compensation_biases`] or
/// [`crate::select_compensation`]) added to each kept layer's o_proj / down_proj biases.
pub fn prune_with_biases<B: Backend>(
    model: &Llama<B>,
    plan: &MaskPlan,
    extra: &[LayerBias<B>],
) -> Result<Llama<B>> {
    plan.validate_against(model.shape())?;
    if extra.len() != plan.layers.len() {
        return Err(lopper_model::Error::Input(format!(
            "{} layers of compensation biases for a plan of {} layers",
            extra.len(),
            plan.layers.len()
        ))
        .into());
    }
    let layers = plan
        .kept_layers()
        .into_iter()
        .map(|i| {
            let layer = model.layer(i)?;
            Ok(
                slice_layer_biased(&layer, &plan.source.layers[i], &plan.layers[i], &extra[i])
                    .into_owned(),
            )
        })
        .collect::<Result<_>>()?;
    Ok(Llama::from_parts(
        model.embed_tokens.clone(),
        layers,
        model.norm.clone(),
        model.lm_head.clone(),
        plan.pruned_shape(),
    )?)
}
