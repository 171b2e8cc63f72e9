//! Gradient-informed importance: LLM-Pruner's Taylor scores (backward passes through burn's
//! autodiff), IFSO's influence-function scores (finite-difference Hessian-vector products of
//! autodiff gradients) and MINI-LLM's feature-map sensitivity (a zeroth-order SPSA gradient from
//! forward passes only).
//!
//! The libraries stay backend-generic: a method that differentiates builds an
//! `Autodiff<B>` copy of the model on the model's own device, where only the decoder's linear
//! weights (or the masks) require gradients.

use burn::backend::Autodiff;
use burn::module::{Param, ParamId};
use burn::nn::Linear;
use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor, TensorData};
use lopper_core::{ModelShape, UnitScores};
use lopper_model::{DecoderLayer, Llama, Masks, Tap};
use rand::{Rng, SeedableRng};

use crate::{Error, Result, host};

/// The seven projections of a decoder layer, in the order every per-linear array uses.
pub const LINEARS: [&str; 7] = lopper_model::LINEAR_NAMES;

/// Which calibration input each of [`LINEARS`] reads (index into `[attn, o_proj, mlp, down]`).
const INPUT_OF: [usize; 7] = [0, 0, 0, 1, 2, 2, 3];

/// Whether a linear's units are its outputs (q, k, v, gate, up: burn `[in, out]` columns) or
/// its inputs (o, down: rows).
const UNIT_ON_OUTPUTS: [bool; 7] = [true, true, true, false, true, true, false];

/// Per-layer values of every KV group and every channel: `(kv_groups, channels)`.
pub type UnitValues = (Vec<Vec<f64>>, Vec<Vec<f64>>);

/// One tensor per projection of each layer (burn layout `[in, out]`), `None` where the block is
/// absent.
pub type PerLinear<B> = Vec<[Option<Tensor<B, 2>>; 7]>;

pub(crate) fn layer_linears<B: Backend>(l: &DecoderLayer<B>) -> [Option<&Linear<B>>; 7] {
    l.linears()
}

/// Every decoder linear weight of `model`, in f32 whatever its storage type (all at once: a
/// model whose layers are offloaded is refused).
pub fn linear_weights<B: Backend>(model: &Llama<B>) -> Result<PerLinear<B>> {
    model.require_resident("every decoder weight at once (gradients and perturbations)")?;
    Ok(model
        .layers
        .iter()
        .map(|l| layer_linears(l).map(|lin| lin.map(lopper_model::weight_f32)))
        .collect())
}

/// A copy of `model` whose decoder linear weights are `weights` (same shapes); when `grad`,
/// they require gradients (the model must then be on an autodiff backend to record them).
pub fn with_linear_weights<B: Backend>(
    model: &Llama<B>,
    weights: PerLinear<B>,
    grad: bool,
) -> Llama<B> {
    let mut out = model.clone();
    for (layer, ws) in out.layers.iter_mut().zip(weights) {
        for (lin, w) in layer.linears_mut().into_iter().zip(ws) {
            if let (Some(lin), Some(w)) = (lin, w) {
                lin.weight = Param::initialized(ParamId::new(), w.set_require_grad(grad));
            }
        }
    }
    out
}

/// `f(a, b)` for every linear present in both.
fn zip_linear<B: Backend>(
    a: &PerLinear<B>,
    b: &PerLinear<B>,
    f: impl Fn(Tensor<B, 2>, Tensor<B, 2>) -> Tensor<B, 2>,
) -> PerLinear<B> {
    a.iter()
        .zip(b)
        .map(|(x, y)| {
            std::array::from_fn(|k| match (&x[k], &y[k]) {
                (Some(x), Some(y)) => Some(f(x.clone(), y.clone())),
                _ => None,
            })
        })
        .collect()
}

/// `a + scale * b`, per linear.
fn axpy<B: Backend>(a: &PerLinear<B>, b: &PerLinear<B>, scale: f32) -> PerLinear<B> {
    zip_linear(a, b, |x, y| x + y * scale)
}

/// `acc + scale * b` per linear (`scale * b` when there is no `acc` yet), taking both by value:
/// a tensor nobody else holds is updated in place, so accumulating gradients allocates no fresh
/// copy of every decoder weight per backward pass.
fn accumulate<B: Backend>(acc: Option<PerLinear<B>>, b: PerLinear<B>, scale: f32) -> PerLinear<B> {
    let scaled = |y: Tensor<B, 2>| if scale == 1.0 { y } else { y * scale };
    match acc {
        None => b.into_iter().map(|y| y.map(|y| y.map(scaled))).collect(),
        Some(a) => a
            .into_iter()
            .zip(b)
            .map(|(x, y)| {
                let mut pairs = x.into_iter().zip(y);
                std::array::from_fn(|_| match pairs.next() {
                    Some((Some(x), Some(y))) => Some(x + scaled(y)),
                    _ => None,
                })
            })
            .collect(),
    }
}

/// `f(t)` applied to every present tensor.
fn map_linear<B: Backend>(
    a: &PerLinear<B>,
    f: impl Fn(Tensor<B, 2>) -> Tensor<B, 2>,
) -> PerLinear<B> {
    a.iter()
        .map(|x| std::array::from_fn(|k| x[k].clone().map(&f)))
        .collect()
}

/// `sum a * b` over every present tensor, and `sum a^2` (for norms).
fn dot<B: Backend>(a: &PerLinear<B>, b: &PerLinear<B>) -> Result<f64> {
    let mut acc = 0.0;
    for (x, y) in a.iter().zip(b) {
        for k in 0..7 {
            if let (Some(x), Some(y)) = (&x[k], &y[k]) {
                acc += host((x.clone() * y.clone()).sum())?[0];
            }
        }
    }
    Ok(acc)
}

/// The model on `Autodiff<B>` (same device); only decoder linear weights require gradients
/// when `linear_grads`, nothing otherwise.
pub fn autodiff_copy<B: Backend>(
    model: &Llama<B>,
    linear_grads: bool,
) -> Result<Llama<Autodiff<B>>> {
    // The copy keeps the model's placement: every layer on its own device.
    let mut ad: Llama<Autodiff<B>> = model.placed_copy()?;
    ad.embed_tokens.weight = ad.embed_tokens.weight.clone().set_require_grad(false);
    ad.norm.weight = ad.norm.weight.clone().set_require_grad(false);
    if let Some(h) = ad.lm_head.as_mut() {
        h.weight = h.weight.clone().set_require_grad(false);
    }
    for l in &mut ad.layers {
        for n in [
            l.input_layernorm.as_mut(),
            l.post_attention_layernorm.as_mut(),
        ]
        .into_iter()
        .flatten()
        {
            n.weight = n.weight.clone().set_require_grad(false);
        }
    }
    let w = linear_weights(&ad)?;
    Ok(with_linear_weights(&ad, w, linear_grads))
}

fn tokens<B: Backend>(model: &Llama<B>, batch: &[Vec<u32>]) -> Result<Tensor<B, 2, Int>> {
    Ok(model.tokens(batch)?)
}

/// Windows per backward pass. A batch's gradient is accumulated over chunks of at most this
/// many windows (weighted by their predicted tokens, so the result is the batch's), which bounds
/// the activations autodiff keeps, the bulk of a backward pass's memory (about 0.3 GiB per
/// 128-token window on the default model, mostly the 49,152-wide logits), whatever the batch.
pub const WINDOWS_PER_BACKWARD: usize = 2;

/// The chunks of `batch` that one backward pass each handles, with each chunk's share of the
/// batch's predicted tokens (the weight of its mean loss in the batch's).
fn backward_chunks(batch: &[Vec<u32>]) -> impl Iterator<Item = (&[Vec<u32>], f64)> {
    let predicted = |c: &[Vec<u32>]| c.iter().map(|w| w.len().saturating_sub(1)).sum::<usize>();
    let total = predicted(batch).max(1) as f64;
    batch
        .chunks(WINDOWS_PER_BACKWARD)
        .map(move |c| (c, predicted(c) as f64 / total))
}

/// Mean next-token loss of `ad` on `batch` (under `masks`) and its gradient with respect to
/// every decoder linear weight (on the inner backend), accumulated over chunks of
/// [`WINDOWS_PER_BACKWARD`] windows.
pub fn linear_grads<B: Backend>(
    ad: &Llama<Autodiff<B>>,
    batch: &[Vec<u32>],
    masks: Option<&Masks<Autodiff<B>>>,
) -> Result<(f64, PerLinear<B>)> {
    let mut value = 0.0;
    let mut acc: Option<PerLinear<B>> = None;
    for (chunk, w) in backward_chunks(batch) {
        let loss = ad.token_nll(tokens(ad, chunk)?, masks)?.mean();
        value += w * host(loss.clone().inner())?[0];
        let mut grads = loss.backward();
        let g: PerLinear<B> = ad
            .layers
            .iter()
            .map(|l| {
                layer_linears(l).map(|lin| {
                    // Taken out of the container (then nothing else holds it), in f32 whatever
                    // the weights' storage type.
                    lin.and_then(|lin| lin.weight.val().grad_remove(&mut grads))
                        .map(|g| g.cast(burn::tensor::DType::F32))
                })
            })
            .collect();
        acc = Some(accumulate(acc, g, w as f32));
    }
    let g = acc.ok_or_else(|| Error::Invalid("a gradient of an empty batch".into()))?;
    Ok((value, g))
}

/// Per-unit sums of a per-weight salience (burn `[in, out]` per linear): a KV group sums its
/// query heads' q columns and o rows and its k / v columns; a channel sums its gate and up
/// columns and its down row (LLM-Pruner's dependency groups, group reduction `sum`).
pub fn unit_sums<B: Backend>(shape: &ModelShape, salience: &PerLinear<B>) -> Result<UnitValues> {
    let mut kv = Vec::new();
    let mut ch = Vec::new();
    for (ls, sal) in shape.layers.iter().zip(salience) {
        let mut red: [Option<Vec<f64>>; 7] = Default::default();
        for k in 0..7 {
            if let Some(t) = &sal[k] {
                let dim = if UNIT_ON_OUTPUTS[k] { 0 } else { 1 };
                red[k] = Some(host(t.clone().sum_dim(dim))?);
            }
        }
        kv.push(match (&red[0], &red[1], &red[2], &red[3]) {
            (Some(q), Some(k), Some(v), Some(o)) => {
                let (hd, rep) = (ls.head_dim, ls.n_rep());
                (0..ls.n_kv_heads)
                    .map(|g| {
                        let qo: f64 = (g * rep * hd..(g + 1) * rep * hd)
                            .map(|j| q[j] + o[j])
                            .sum();
                        qo + (g * hd..(g + 1) * hd).map(|j| k[j] + v[j]).sum::<f64>()
                    })
                    .collect()
            }
            _ => Vec::new(),
        });
        ch.push(match (&red[4], &red[5], &red[6]) {
            (Some(g), Some(u), Some(d)) => (0..ls.ffn_hidden).map(|c| g[c] + u[c] + d[c]).collect(),
            _ => Vec::new(),
        });
    }
    Ok((kv, ch))
}

/// LLM-Pruner's Taylor importance variants (`--taylor`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Taylor {
    /// `|w * g|` per weight (`param_first`, the reference default).
    #[default]
    Element1,
    /// `|w * g - 1/2 * w * F * w|` per weight with `F` the empirical Fisher diagonal
    /// `(1/n) sum_s g_s^2` over calibration windows (`param_mix`).
    Element2,
}

impl std::str::FromStr for Taylor {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "element1" => Ok(Taylor::Element1),
            "element2" => Ok(Taylor::Element2),
            o => Err(Error::Invalid(format!(
                "Taylor variant `{o}`: use element1 (first order) or element2 (with the Fisher diagonal)"
            ))),
        }
    }
}

/// The calibration gradient `g` (of the mean loss over all `windows`, accumulated by
/// [`linear_grads`]) and, for [`Taylor::Element2`], the Fisher diagonal from one backward pass
/// per window.
fn calibration_grads<B: Backend>(
    ad: &Llama<Autodiff<B>>,
    windows: &[Vec<u32>],
    batch_size: usize,
    fisher: bool,
) -> Result<(PerLinear<B>, Option<PerLinear<B>>)> {
    crate::check_calibration(windows, batch_size)?;
    if !fisher {
        return Ok((linear_grads(ad, windows, None)?.1, None));
    }
    let n = windows.len() as f32;
    let (mut g, mut f): (Option<PerLinear<B>>, Option<PerLinear<B>>) = (None, None);
    for window in windows.chunks(1) {
        let (_, gw) = linear_grads(ad, window, None)?;
        // Equal-length windows: each window's gradient weighs 1/n in the mean.
        let sq = map_linear(&gw, |t| t.powi_scalar(2));
        g = Some(accumulate(g, gw, 1.0 / n));
        f = Some(accumulate(f, sq, 1.0 / n));
    }
    Ok((g.expect("at least one window"), f))
}

/// LLM-Pruner (Ma et al. 2023) Taylor scores of every KV group and channel: gradients of the
/// calibration loss from burn's autodiff, per-weight salience by `variant`, summed over each
/// coupled group. Memory: the model, an autodiff copy with one gradient per decoder linear,
/// one accumulator (two for element2) and the activations of [`WINDOWS_PER_BACKWARD`] windows,
/// whatever `batch_size`.
pub fn llm_pruner<B: Backend>(
    model: &Llama<B>,
    windows: &[Vec<u32>],
    batch_size: usize,
    variant: Taylor,
) -> Result<UnitScores> {
    let ad = autodiff_copy(model, true)?;
    let (g, f) = calibration_grads(&ad, windows, batch_size, variant == Taylor::Element2)?;
    drop(ad);
    let w = linear_weights(model)?;
    let first = zip_linear(&w, &g, |w, g| w * g);
    let salience = match f {
        None => map_linear(&first, |t| t.abs()),
        Some(f) => {
            // |w g - 1/2 w F w|
            let second = zip_linear(&w, &f, |w, f| w.powi_scalar(2) * f * 0.5);
            map_linear(&axpy(&first, &second, -1.0), |t| t.abs())
        }
    };
    let (kv_groups, channels) = unit_sums(model.shape(), &salience)?;
    Ok(UnitScores {
        method: match variant {
            Taylor::Element1 => "llm-pruner".into(),
            Taylor::Element2 => "llm-pruner-element2".into(),
        },
        kv_groups,
        channels,
    })
}

/// Masks with every head and channel entry equal to `value`, requiring gradients when `grad`.
fn uniform_masks<B: Backend>(
    shape: &ModelShape,
    value: f32,
    grad: bool,
    device: &B::Device,
) -> Masks<B> {
    let mut m = Masks::<B>::ones(shape, device);
    for l in &mut m.layers {
        l.heads = l.heads.take().map(|t| (t * value).set_require_grad(grad));
        l.channels = l
            .channels
            .take()
            .map(|t| (t * value).set_require_grad(grad));
    }
    m
}

/// `d loss / d mask` per KV group (summed over the group's query heads) and per channel,
/// accumulated over chunks of [`WINDOWS_PER_BACKWARD`] windows.
pub(crate) fn mask_grads<B: Backend>(
    ad: &Llama<Autodiff<B>>,
    batch: &[Vec<u32>],
) -> Result<UnitValues> {
    let shape = ad.shape();
    let mut kv: Vec<Vec<f64>> = shape.layers.iter().map(|_| Vec::new()).collect();
    let mut ch = kv.clone();
    for (chunk, w) in backward_chunks(batch) {
        let masks = uniform_masks::<Autodiff<B>>(shape, 1.0, true, &ad.device());
        let loss = ad.token_nll(tokens(ad, chunk)?, Some(&masks))?.mean();
        let grads = loss.backward();
        let get = |t: &Option<Tensor<Autodiff<B>, 1>>| -> Result<Vec<f64>> {
            match t.as_ref().and_then(|t| t.grad(&grads)) {
                Some(g) => host(g),
                None => Ok(Vec::new()),
            }
        };
        let add = |acc: &mut Vec<f64>, v: Vec<f64>| {
            acc.resize(v.len(), 0.0);
            acc.iter_mut().zip(v).for_each(|(a, x)| *a += w * x);
        };
        for (l, (lm, ls)) in masks.layers.iter().zip(&shape.layers).enumerate() {
            let heads = get(&lm.heads)?;
            let rep = ls.n_rep();
            let groups = if heads.is_empty() {
                Vec::new()
            } else {
                (0..ls.n_kv_heads)
                    .map(|g| heads[g * rep..(g + 1) * rep].iter().sum())
                    .collect()
            };
            add(&mut kv[l], groups);
            add(&mut ch[l], get(&lm.channels)?);
        }
    }
    Ok((kv, ch))
}

/// Settings of [`ifso`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct IfsoSettings {
    /// `lambda` of `H_ww^-1 ~ I / lambda` (the reference: its weight decay, 1e-4). It scales
    /// every score alike, so it changes no ranking; it must be positive.
    pub lambda: f64,
    /// Calibration mini-batches whose `|score|` is averaged (2 in the reference).
    pub batches: usize,
}

impl Default for IfsoSettings {
    fn default() -> Self {
        Self {
            lambda: 1e-4,
            batches: 2,
        }
    }
}

/// IFSO (Cheng et al., TPAMI 2024), adapted from CNN input channels to LLM units. Every KV
/// group and MLP channel gets a mask `m` (1 = kept) on its output (the head outputs before
/// `o_proj`, `silu(gate) * up` before `down_proj`); the influence-function estimate of the loss
/// change after retraining uses `H_mw H_ww^-1 H_wm` with `H_ww^-1 ~ I / lambda`:
///
/// - `u = H_wm 1 / lambda = [grad_w L(m + R 1) - grad_w L(m - R 1)] / (2 R lambda)`,
///   `R = 0.01 / ||1||`;
/// - `score = H_mw u = [grad_m L(w + R' u) - grad_m L(w - R' u)] / (2 R')`,
///   `R' = 0.01 / ||u||` (central differences, as the reference);
/// - `|score|` averaged over `batches` calibration mini-batches, then divided by the square
///   root of the unit's parameter count (the reference divides by the square root of the
///   activations or FLOPs a channel removes; per token both are proportional to the unit's
///   parameters here).
///
/// `w` are the decoder's linear weights; gradients come from burn's autodiff. The reference
/// then prunes one channel at a time between training iterations; one-shot, the scores rank all
/// units together (global parameter allocation by default).
pub fn ifso<B: Backend>(
    model: &Llama<B>,
    windows: &[Vec<u32>],
    batch_size: usize,
    s: &IfsoSettings,
) -> Result<UnitScores> {
    crate::check_calibration(windows, batch_size)?;
    if !(s.lambda > 0.0 && s.lambda.is_finite()) {
        return Err(Error::Invalid(format!(
            "IFSO damping lambda {} is impossible: give a positive value (the reference uses 1e-4)",
            s.lambda
        )));
    }
    if s.batches == 0 {
        return Err(Error::Invalid(
            "IFSO needs at least one calibration mini-batch (--ifso-batches)".into(),
        ));
    }
    let shape = model.shape().clone();
    let device = model.device();
    let ad = autodiff_copy(model, true)?;
    let n_masks: usize = shape
        .layers
        .iter()
        .map(|l| usize::from(l.has_attn()) * l.n_heads + usize::from(l.has_mlp()) * l.ffn_hidden)
        .sum();
    let r = 0.01 / (n_masks as f64).sqrt();
    let w0 = linear_weights(&ad)?;
    let mut kv_acc: Vec<Vec<f64>> = shape
        .layers
        .iter()
        .map(|l| vec![0.0; l.n_kv_heads])
        .collect();
    let mut ch_acc: Vec<Vec<f64>> = shape
        .layers
        .iter()
        .map(|l| vec![0.0; l.ffn_hidden])
        .collect();
    let batches: Vec<&[Vec<u32>]> = windows.chunks(batch_size).take(s.batches).collect();
    for batch in &batches {
        // u = H_wm 1 / lambda.
        let grad_at = |v: f32| -> Result<PerLinear<B>> {
            let m = uniform_masks::<Autodiff<B>>(&shape, v, false, &device);
            Ok(linear_grads(&ad, batch, Some(&m))?.1)
        };
        let (gp, gm) = (grad_at(1.0 + r as f32)?, grad_at(1.0 - r as f32)?);
        let u = map_linear(&axpy(&gp, &gm, -1.0), |t| t / (2.0 * r * s.lambda) as f32);
        let un = dot(&u, &u)?.sqrt();
        if !(un > 0.0 && un.is_finite()) {
            return Err(Error::Invalid(format!(
                "IFSO: the mixed Hessian-vector product has norm {un}; the calibration loss does not depend on the masks"
            )));
        }
        let r2 = 0.01 / un;
        let w_inner: PerLinear<B> = w0
            .iter()
            .map(|x| std::array::from_fn(|k| x[k].clone().map(|t| t.inner())))
            .collect();
        let at = |sign: f32| -> Result<UnitValues> {
            let w = axpy(&w_inner, &u, sign * r2 as f32);
            let w: PerLinear<Autodiff<B>> = w
                .into_iter()
                .map(|x| x.map(|t| t.map(Tensor::from_inner)))
                .collect();
            mask_grads(&with_linear_weights(&ad, w, false), batch)
        };
        let ((kp, cp), (km, cm)) = (at(1.0)?, at(-1.0)?);
        for l in 0..shape.n_layers() {
            for (j, acc) in kv_acc[l].iter_mut().enumerate().take(kp[l].len()) {
                *acc += ((kp[l][j] - km[l][j]) / (2.0 * r2)).abs() / batches.len() as f64;
            }
            for (j, acc) in ch_acc[l].iter_mut().enumerate().take(cp[l].len()) {
                *acc += ((cp[l][j] - cm[l][j]) / (2.0 * r2)).abs() / batches.len() as f64;
            }
        }
    }
    for (l, ls) in shape.layers.iter().enumerate() {
        let kv_cost = (shape.hidden_size * ls.head_dim * (2 * ls.n_rep() + 2)) as f64;
        let ch_cost = (3 * shape.hidden_size) as f64;
        kv_acc[l].iter_mut().for_each(|v| *v /= kv_cost.sqrt());
        ch_acc[l].iter_mut().for_each(|v| *v /= ch_cost.sqrt());
    }
    Ok(UnitScores {
        method: "ifso".into(),
        kv_groups: kv_acc,
        channels: ch_acc,
    })
}

/// Settings of the SPSA gradient estimate ([`spsa_gradient`], [`mini_llm`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SpsaSettings {
    /// Perturbation directions per calibration batch.
    pub samples: usize,
    /// Perturbation size `eps` (MeZO's 1e-3).
    pub eps: f64,
    /// Seed of the directions.
    pub seed: u64,
}

impl Default for SpsaSettings {
    fn default() -> Self {
        Self {
            samples: 4,
            eps: 1e-3,
            seed: 0,
        }
    }
}

/// `z ~ N(0, I)` for every present linear (Box-Muller on a seeded ChaCha8 stream, on the host,
/// so that a seed means the same directions on every backend).
fn normal_like<B: Backend>(shapes: &PerLinear<B>, seed: u64) -> PerLinear<B> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    shapes
        .iter()
        .map(|x| {
            std::array::from_fn(|k| {
                x[k].as_ref().map(|t| {
                    let dims = t.dims();
                    let n = dims[0] * dims[1];
                    let mut v = Vec::with_capacity(n + 1);
                    while v.len() < n {
                        let (a, b): (f64, f64) = (rng.random(), rng.random());
                        let rad = (-2.0 * (1.0 - a).ln()).sqrt();
                        let th = std::f64::consts::TAU * b;
                        v.push((rad * th.cos()) as f32);
                        v.push((rad * th.sin()) as f32);
                    }
                    v.truncate(n);
                    // On the device of the weight it perturbs (a placed model's layer).
                    Tensor::from_data(TensorData::new(v, dims), &t.device())
                })
            })
        })
        .collect()
}

/// The zeroth-order (SPSA, MeZO-style) estimate of the calibration-loss gradient with respect
/// to the decoder's linear weights, from forward passes only:
/// `g = mean over batches and directions of [L(W + eps z) - L(W - eps z)] / (2 eps) * z`,
/// `z ~ N(0, I)` seeded per (batch, direction). `layers` restricts the perturbation to some
/// layers (the others get no estimate). Memory: the model, one direction and the accumulator.
pub fn spsa_gradient<B: Backend>(
    model: &Llama<B>,
    windows: &[Vec<u32>],
    batch_size: usize,
    s: &SpsaSettings,
    layers: Option<&[usize]>,
) -> Result<PerLinear<B>> {
    crate::check_calibration(windows, batch_size)?;
    if s.samples == 0 {
        return Err(Error::Invalid(
            "the SPSA estimate needs at least one perturbation per batch (--spsa-samples)".into(),
        ));
    }
    if !(s.eps > 0.0 && s.eps.is_finite()) {
        return Err(Error::Invalid(format!(
            "SPSA perturbation size {} is impossible: give a small positive value (1e-3)",
            s.eps
        )));
    }
    let mut w0 = linear_weights(model)?;
    if let Some(keep) = layers {
        for (l, w) in w0.iter_mut().enumerate() {
            if !keep.contains(&l) {
                *w = Default::default();
            }
        }
    }
    let batches: Vec<&[Vec<u32>]> = windows.chunks(batch_size).collect();
    let total = (batches.len() * s.samples) as f32;
    let mut acc: Option<PerLinear<B>> = None;
    let all = linear_weights(model)?;
    // A perturbed copy: untouched layers keep their weights.
    let perturbed = |z: &PerLinear<B>, scale: f32| -> Llama<B> {
        let full: PerLinear<B> = all
            .iter()
            .cloned()
            .zip(axpy(&w0, z, scale))
            .map(|(orig, new)| std::array::from_fn(|k| new[k].clone().or(orig[k].clone())))
            .collect();
        with_linear_weights(model, full, false)
    };
    for (bi, batch) in batches.iter().enumerate() {
        let t = model.tokens(batch)?;
        for k in 0..s.samples {
            let seed = s
                .seed
                .wrapping_mul(0x9e37_79b9_7f4a_7c15)
                .wrapping_add((bi * s.samples + k) as u64);
            let z = normal_like(&w0, seed);
            let lp = perturbed(&z, s.eps as f32).mean_loss(t.clone(), None)?;
            let lm = perturbed(&z, -s.eps as f32).mean_loss(t.clone(), None)?;
            let c = ((lp - lm) / (2.0 * s.eps)) as f32 / total;
            acc = Some(match acc {
                Some(a) => axpy(&a, &z, c),
                None => map_linear(&z, |t| t * c),
            });
        }
    }
    Ok(acc.expect("at least one batch"))
}

/// Root-mean-square over calibration tokens of every input column of the four linear inputs
/// (`[attention, o_proj, MLP, down_proj]`) per layer.
pub fn input_rms<B: Backend>(
    model: &Llama<B>,
    windows: &[Vec<u32>],
    batch_size: usize,
) -> Result<Vec<[Vec<f64>; 4]>> {
    crate::check_calibration(windows, batch_size)?;
    let n = model.shape().n_layers();
    let mut acc: Vec<[Option<Tensor<B, 2>>; 4]> = (0..n).map(|_| Default::default()).collect();
    let mut tokens = 0usize;
    for batch in windows.chunks(batch_size) {
        let t = model.tokens(batch)?;
        let [b, s] = t.dims();
        tokens += b * s;
        model.forward_tapped(t, None, |i, tap, x| {
            let slot = match tap {
                Tap::AttnInput => 0,
                Tap::OProjInput => 1,
                Tap::MlpInput => 2,
                Tap::DownProjInput => 3,
            };
            let sq = x.clone().powi_scalar(2).sum_dim(0);
            acc[i][slot] = Some(match acc[i][slot].take() {
                Some(a) => a + sq,
                None => sq,
            });
        })?;
    }
    acc.into_iter()
        .map(|slots| {
            let mut out: [Vec<f64>; 4] = Default::default();
            for (o, t) in out.iter_mut().zip(slots) {
                if let Some(t) = t {
                    *o = host(t)?
                        .into_iter()
                        .map(|v| (v / tokens as f64).sqrt())
                        .collect();
                }
            }
            Ok(out)
        })
        .collect()
}

/// MINI-LLM (Cheng et al. 2024) feature-map sensitivity with a forward-only gradient. The
/// combination implemented (the paper's Eq. 9 is not in our notes):
///
/// `S_{ij} = |W_ij * g_ij| * rms_t(x_{t,i})` for each weight from input `i` of a linear, where
/// `g` is the SPSA estimate of the loss gradient ([`spsa_gradient`]) and `rms_t(x_i)` the root
/// mean square of input feature `i` over the calibration tokens (the activation term; the RMS
/// rather than the signed mean, which cancels for zero-mean features). A unit's score is the
/// sum over the weights of its coupled group (as LLM-Pruner), and layers are pruned uniformly
/// (per-layer allocation by default), as the paper does.
pub fn mini_llm<B: Backend>(
    model: &Llama<B>,
    windows: &[Vec<u32>],
    batch_size: usize,
    s: &SpsaSettings,
) -> Result<UnitScores> {
    let g = spsa_gradient(model, windows, batch_size, s, None)?;
    let rms = input_rms(model, windows, batch_size)?;
    let w = linear_weights(model)?;
    let salience: PerLinear<B> = w
        .iter()
        .zip(&g)
        .zip(&rms)
        .map(|((w, g), r)| {
            std::array::from_fn(|k| match (&w[k], &g[k]) {
                (Some(w), Some(g)) => {
                    let x: Vec<f32> = r[INPUT_OF[k]].iter().map(|&v| v as f32).collect();
                    let n = x.len();
                    // burn [in, out]: the input feature is the row.
                    let col = Tensor::<B, 2>::from_data(TensorData::new(x, [n, 1]), &w.device());
                    Some((w.clone() * g.clone()).abs() * col)
                }
                _ => None,
            })
        })
        .collect();
    let (kv_groups, channels) = unit_sums(model.shape(), &salience)?;
    Ok(UnitScores {
        method: "mini-llm".into(),
        kv_groups,
        channels,
    })
}
