#![doc = include_str!("../README.md")]

use burn::tensor::Tensor;
use burn::tensor::backend::Backend;

use lopper_core::{ModelShape, UnitScores};
use lopper_model::{Llama, Tap};

/// Errors of importance metrics.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Model errors.
    #[error(transparent)]
    Model(#[from] lopper_model::Error),
    /// Plan errors.
    #[error(transparent)]
    Plan(#[from] lopper_core::Error),
    /// Surgery errors.
    #[error(transparent)]
    Surgery(#[from] lopper_surgery::Error),
    /// Settings that cannot work.
    #[error("{0}")]
    Invalid(String),
}

/// Result alias of this crate.
pub type Result<T> = std::result::Result<T, Error>;

pub mod bip;
pub mod gradient;
mod method;
mod structure;
pub use bip::llm_bip;
pub use gradient::{IfsoSettings, SpsaSettings, Taylor, ifso, llm_pruner, mini_llm};
pub use method::{Method, MethodPlan, MethodSettings, method_plan, plan_from_scores};
pub use structure::{
    Flap, InputMoments, SlebRound, block_influence, block_influence_order, flap, input_moments,
    random, sleb, sleb_uncached, standardise,
};

pub(crate) fn check_calibration(windows: &[Vec<u32>], batch_size: usize) -> Result<()> {
    if windows.is_empty() || batch_size == 0 {
        return Err(Error::Invalid(
            "importance metrics need at least one calibration window and a batch size of at least 1".into(),
        ));
    }
    Ok(())
}

fn host<B: Backend, const D: usize>(t: Tensor<B, D>) -> Result<Vec<f64>> {
    let v: Vec<f32> = t
        .into_data()
        .convert::<f32>()
        .to_vec()
        .map_err(|e| Error::Invalid(format!("reading scores back: {e:?}")))?;
    Ok(v.into_iter().map(f64::from).collect())
}

/// Per-layer, per-column values: `(o_proj inputs, down_proj inputs)`.
pub type InputStats = (Vec<Vec<f64>>, Vec<Vec<f64>>);

/// Mean over calibration tokens of `x^2` for every input column of `o_proj` and `down_proj`:
/// `(attn[layer][column], mlp[layer][channel])`. Layers without a block get empty vectors.
pub fn input_sq_means<B: Backend>(
    model: &Llama<B>,
    windows: &[Vec<u32>],
    batch_size: usize,
) -> Result<InputStats> {
    input_column_means(model, windows, batch_size, |x| x.powi_scalar(2))
}

/// Mean over calibration tokens of every input column of `o_proj` and `down_proj` (what
/// FLAP-style bias compensation adds back for removed columns).
pub fn input_means<B: Backend>(
    model: &Llama<B>,
    windows: &[Vec<u32>],
    batch_size: usize,
) -> Result<InputStats> {
    input_column_means(model, windows, batch_size, |x| x)
}

/// Mean over calibration tokens of `f(x)` for every input column of `o_proj` and `down_proj`.
fn input_column_means<B: Backend>(
    model: &Llama<B>,
    windows: &[Vec<u32>],
    batch_size: usize,
    f: impl Fn(Tensor<B, 2>) -> Tensor<B, 2>,
) -> Result<InputStats> {
    check_calibration(windows, batch_size)?;
    let n_layers = model.shape().n_layers();
    let mut attn: Vec<Option<Tensor<B, 2>>> = vec![None; n_layers];
    let mut mlp: Vec<Option<Tensor<B, 2>>> = vec![None; n_layers];
    let mut tokens = 0usize;
    for batch in windows.chunks(batch_size) {
        let t = model.tokens(batch)?;
        let [b, s] = t.dims();
        tokens += b * s;
        model.forward_tapped(t, None, |i, point, x| {
            if !matches!(point, Tap::OProjInput | Tap::DownProjInput) {
                return;
            }
            let sq = f(x.clone()).sum_dim(0);
            let slot = match point {
                Tap::OProjInput => &mut attn[i],
                Tap::DownProjInput => &mut mlp[i],
                _ => return,
            };
            *slot = Some(match slot.take() {
                Some(acc) => acc + sq,
                None => sq,
            });
        })?;
    }
    let finish = |v: Vec<Option<Tensor<B, 2>>>| -> Result<Vec<Vec<f64>>> {
        v.into_iter()
            .map(|t| match t {
                Some(t) => Ok(host(t)?.into_iter().map(|x| x / tokens as f64).collect()),
                None => Ok(Vec::new()),
            })
            .collect()
    };
    Ok((finish(attn)?, finish(mlp)?))
}

/// Mean over output rows of `|W|` for each input column of a burn `[in, out]` weight.
fn col_abs_mean<B: Backend>(w: Tensor<B, 2>) -> Result<Vec<f64>> {
    host(w.abs().mean_dim(1))
}

/// Per-KV-group scores from per-column values of a layer's `o_proj` input: summed over each
/// head's dims, averaged over the group's query heads.
fn group_scores(cols: &[f64], shape: &lopper_core::LayerShape) -> Vec<f64> {
    let (hd, rep) = (shape.head_dim, shape.n_rep());
    (0..shape.n_kv_heads)
        .map(|g| {
            let heads =
                (g * rep..(g + 1) * rep).map(|h| cols[h * hd..(h + 1) * hd].iter().sum::<f64>());
            heads.sum::<f64>() / rep as f64
        })
        .collect()
}

/// Structured Wanda scores from calibration activations of the dense model.
pub fn wanda_sp<B: Backend>(
    model: &Llama<B>,
    windows: &[Vec<u32>],
    batch_size: usize,
) -> Result<UnitScores> {
    let (attn_sq, mlp_sq) = input_sq_means(model, windows, batch_size)?;
    let shape: &ModelShape = model.shape();
    let mut kv_groups = Vec::new();
    let mut channels = Vec::new();
    for (i, ls) in shape.layers.iter().enumerate() {
        let layer = model.layer(i)?;
        kv_groups.push(match &layer.self_attn {
            Some(a) => {
                let w = col_abs_mean(lopper_model::weight_f32(&a.o_proj))?;
                let cols: Vec<f64> = w
                    .iter()
                    .zip(&attn_sq[i])
                    .map(|(w, x)| w * x.sqrt())
                    .collect();
                group_scores(&cols, ls)
            }
            None => Vec::new(),
        });
        channels.push(match &layer.mlp {
            Some(m) => {
                let w = col_abs_mean(lopper_model::weight_f32(&m.down_proj))?;
                w.iter()
                    .zip(&mlp_sq[i])
                    .map(|(w, x)| w * x.sqrt())
                    .collect()
            }
            None => Vec::new(),
        });
    }
    Ok(UnitScores {
        method: "wanda-sp".into(),
        kv_groups,
        channels,
    })
}

/// The norm a magnitude score uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Norm {
    /// Sum of absolute values.
    L1,
    /// Square root of the sum of squares.
    L2,
}

/// Magnitude scores: the norm of all weights a unit owns.
pub fn magnitude<B: Backend>(model: &Llama<B>, norm: Norm) -> Result<UnitScores> {
    let salience = gradient::linear_weights(model)?
        .into_iter()
        .map(|ws| {
            ws.map(|w| {
                w.map(|w| match norm {
                    Norm::L1 => w.abs(),
                    Norm::L2 => w.powi_scalar(2),
                })
            })
        })
        .collect();
    let (kv, ch) = gradient::unit_sums(model.shape(), &salience)?;
    let finish = |v: Vec<Vec<f64>>| -> Vec<Vec<f64>> {
        v.into_iter()
            .map(|l| l.into_iter().map(|x| finish_norm(x, norm)).collect())
            .collect()
    };
    Ok(UnitScores {
        method: match norm {
            Norm::L1 => "magnitude-l1".into(),
            Norm::L2 => "magnitude-l2".into(),
        },
        kv_groups: finish(kv),
        channels: finish(ch),
    })
}

fn finish_norm(sum: f64, norm: Norm) -> f64 {
    match norm {
        Norm::L1 => sum,
        Norm::L2 => sum.sqrt(),
    }
}

#[cfg(test)]
mod gradient_tests;
#[cfg(test)]
mod tests;
