//! A one-pass stand-in for the least-squares cut, cheap enough to score every mask of a search
//! with ([`RefitProxy`]).
//!
//! The least-squares cut ([`crate::reconstruct`]) refits each kept `o_proj` / `down_proj` on the
//! pruned model's own inputs, layer after layer: about 90 s per plan on the default model and 2
//! CPU cores. The proxy refits the same projections from the *dense* model's input statistics,
//! collected once: with `A = [X 1]` a projection's calibration inputs (and a constant column for
//! its bias), `G = A^T A + lambda I_k` the damped Gram matrix (`lambda = damp * mean(diag)`, the
//! bias undamped, as the cut damps) and `theta = [W; b^T]` its dense weights, the refit that
//! keeps inputs `S` and drops `R` is
//!
//! `theta'[S + bias] = theta[S + bias] - Ginv[S + bias, R] Ginv[R, R]^-1 theta[R]`
//!
//! (Hassibi and Stork's optimal brain surgeon update for a set of inputs): the minimiser of
//! `||A' theta' - A theta||^2 + lambda ||W' - W[S]||^2` over the kept inputs `A'`. Its cost per
//! plan is a Cholesky factor of `Ginv[R, R]` and one product per projection, with no pass over
//! calibration text. Blocks removed whole carry their dense mean output into the bias of the nearest earlier
//! kept block, as [`lopper_surgery::compensation_biases`] does. A plan that keeps everything
//! gets the dense model.
//!
//! What it leaves out, against the cut: the drift of the pruned model's inputs (each refit
//! reads the dense model's inputs, not the pruned one's), the input projections' refit and the
//! held-out choice of damping.

use std::borrow::Cow;

use burn::module::Param;
use burn::nn::Linear;
use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor, TensorData};
use faer::linalg::matmul::triangular::BlockStructure;
use faer::linalg::solvers::Solve;
use faer::{Mat, Side};
use lopper_core::{LayerPlan, LayerShape, MaskPlan, ModelShape};
use lopper_model::{DecoderLayer, Llama, Tap, mean_of};
use lopper_surgery::{head_dims, slice_layer};

use crate::{Error, Result, host_mat};

/// One projection's dense statistics: what a refit of any subset of its inputs needs.
#[derive(Debug, Clone)]
struct Block {
    /// `(G + lambda I_k)^-1`, `(k + 1) x (k + 1)`, the last row and column the bias's.
    ginv: Mat<f64>,
    /// The dense `[W; b^T]`, `(k + 1) x out`.
    theta: Mat<f64>,
    /// The dense block's mean output over the calibration tokens (`mean(x) W + b`).
    mean_out: Vec<f64>,
}

impl Block {
    /// The refit weights keeping `kept` (sorted input indices; nothing removed gives `None`).
    fn refit(&self, kept: &[usize]) -> Result<Option<Mat<f64>>> {
        let k = self.ginv.nrows() - 1;
        if kept.len() == k {
            return Ok(None);
        }
        let mut is_kept = vec![false; k];
        for &j in kept {
            is_kept[j] = true;
        }
        let removed: Vec<usize> = (0..k).filter(|&j| !is_kept[j]).collect();
        let keep: Vec<usize> = kept.iter().copied().chain([k]).collect();
        let out = self.theta.ncols();
        let hrr = Mat::from_fn(removed.len(), removed.len(), |a, b| {
            self.ginv[(removed[a], removed[b])]
        });
        let theta_r = Mat::from_fn(removed.len(), out, |a, j| self.theta[(removed[a], j)]);
        let z = hrr
            .llt(Side::Lower)
            .map_err(|_| {
                Error::Invalid(
                    "the refit proxy: the inverse Gram matrix of the removed inputs is not positive definite (raise the damping)"
                        .into(),
                )
            })?
            .solve(&theta_r);
        let hkr = Mat::from_fn(keep.len(), removed.len(), |a, b| {
            self.ginv[(keep[a], removed[b])]
        });
        let mut theta = Mat::from_fn(keep.len(), out, |a, j| self.theta[(keep[a], j)]);
        faer::linalg::matmul::matmul(
            theta.as_mut(),
            faer::Accum::Add,
            hkr.as_ref(),
            z.as_ref(),
            -1.0,
            faer::Par::rayon(0),
        );
        Ok(Some(theta))
    }
}

#[derive(Debug, Clone, Default)]
struct ProxyLayer {
    o_proj: Option<Block>,
    down_proj: Option<Block>,
}

/// The dense model's input statistics of every `o_proj` and `down_proj`, from which
/// [`RefitProxy::layers`] refits any plan's kept projections in one pass (module docs).
#[derive(Debug, Clone)]
pub struct RefitProxy {
    layers: Vec<ProxyLayer>,
    damp: f64,
}

/// One layer's refit projections under a plan: `None` keeps the sliced dense projection.
#[derive(Debug, Clone)]
pub struct LayerRefit<B: Backend> {
    /// The kept `o_proj` (inputs: the kept heads' dimensions, in order).
    pub o_proj: Option<Linear<B>>,
    /// The kept `down_proj` (inputs: the kept channels, in order).
    pub down_proj: Option<Linear<B>>,
}

impl<B: Backend> Default for LayerRefit<B> {
    fn default() -> Self {
        Self {
            o_proj: None,
            down_proj: None,
        }
    }
}

/// Adds `a^T a` to the lower triangle of `g`.
pub(crate) fn add_gram(g: &mut Mat<f64>, a: &Mat<f64>) {
    faer::linalg::matmul::triangular::matmul(
        g.as_mut(),
        BlockStructure::TriangularLower,
        faer::Accum::Add,
        a.transpose(),
        BlockStructure::Rectangular,
        a.as_ref(),
        BlockStructure::Rectangular,
        1.0,
        faer::Par::rayon(0),
    );
}

/// `[W; b^T]` of a burn linear (`[in, out]`).
pub(crate) fn theta_of<B: Backend>(lin: &Linear<B>) -> Result<Mat<f64>> {
    let w = host_mat(lin.weight.val(), false)?;
    let (k, out) = (w.nrows(), w.ncols());
    let b = match &lin.bias {
        Some(b) => Some(host_mat(b.val().reshape([1, out]), false)?),
        None => None,
    };
    Ok(Mat::from_fn(k + 1, out, |i, j| {
        if i < k {
            w[(i, j)]
        } else {
            b.as_ref().map_or(0.0, |b| b[(0, j)])
        }
    }))
}

/// The linear of `theta = [W; b^T]`, its weight in `old`'s storage type (the bias is f32, as
/// every bias).
pub(crate) fn linear_of<B: Backend>(theta: &Mat<f64>, old: &Linear<B>) -> Linear<B> {
    let device = &old.weight.device();
    let (k, out) = (theta.nrows() - 1, theta.ncols());
    let w: Vec<f32> = (0..k * out)
        .map(|i| theta[(i / out, i % out)] as f32)
        .collect();
    let b: Vec<f32> = (0..out).map(|j| theta[(k, j)] as f32).collect();
    Linear {
        weight: Param::from_tensor(
            Tensor::<B, 2>::from_data(TensorData::new(w, [k, out]), device)
                .cast(old.weight.val().dtype()),
        ),
        bias: Some(Param::from_tensor(Tensor::from_data(
            TensorData::new(b, [out]),
            device,
        ))),
    }
}

/// The kept inputs of a layer's `o_proj` and `down_proj` under `keep`.
fn kept_inputs(src: &LayerShape, keep: &LayerPlan) -> (Vec<usize>, Vec<usize>) {
    (head_dims(&keep.kv_groups, src).0, keep.channels.clone())
}

impl RefitProxy {
    /// Host bytes the statistics of `shape` take: per layer, the inverse Gram matrix and the
    /// weights of both projections in f64, plus one Gram matrix being accumulated.
    pub fn host_bytes(shape: &ModelShape) -> u64 {
        let per = |k: usize, out: usize| ((k + 1) * (k + 1) + (k + 1) * out) as u64 * 8;
        let widest = shape
            .layers
            .iter()
            .map(|l| l.ffn_hidden.max(l.n_heads * l.head_dim))
            .max()
            .unwrap_or(0) as u64;
        let layers: u64 = shape
            .layers
            .iter()
            .map(|l| {
                per(l.n_heads * l.head_dim, shape.hidden_size)
                    + per(l.ffn_hidden, shape.hidden_size)
            })
            .sum();
        layers + (widest + 1) * (widest + 1) * 8
    }

    /// Collects the dense model's statistics over `windows` (`batch_size` per forward pass) and
    /// inverts each damped Gram matrix (`damp` times its mean diagonal on the inputs' part).
    pub fn collect<B: Backend>(
        model: &Llama<B>,
        windows: &[Vec<u32>],
        batch_size: usize,
        damp: f64,
    ) -> Result<Self> {
        if windows.is_empty() || batch_size == 0 {
            return Err(Error::Invalid(
                "the refit proxy needs calibration windows and a batch size of at least 1".into(),
            ));
        }
        if !(damp.is_finite() && damp > 0.0) {
            return Err(Error::Invalid(format!(
                "the refit proxy's damping must be a positive number, got {damp}"
            )));
        }
        let n = model.shape().n_layers();
        // Lower triangles of [X 1]^T [X 1] per layer and projection.
        let mut grams: Vec<[Option<Mat<f64>>; 2]> = (0..n).map(|_| [None, None]).collect();
        let mut failed: Option<Error> = None;
        for batch in windows.chunks(batch_size) {
            model.forward_tapped(model.tokens(batch)?, None, |i, point, x| {
                let slot = match point {
                    Tap::OProjInput => 0,
                    Tap::DownProjInput => 1,
                    _ => return,
                };
                if failed.is_some() {
                    return;
                }
                match host_mat(x.clone(), false) {
                    Ok(x) => {
                        let (rows, k) = (x.nrows(), x.ncols());
                        let a =
                            Mat::from_fn(rows, k + 1, |r, j| if j < k { x[(r, j)] } else { 1.0 });
                        let g = grams[i][slot].get_or_insert_with(|| Mat::zeros(k + 1, k + 1));
                        add_gram(g, &a);
                    }
                    Err(e) => failed = Some(e),
                }
            })?;
            if let Some(e) = failed.take() {
                return Err(e);
            }
        }
        let mut layers = Vec::with_capacity(n);
        for (i, [o, d]) in grams.into_iter().enumerate() {
            let layer = model.layer(i)?;
            let block = |g: Option<Mat<f64>>, lin: Option<&Linear<B>>, what: &str| match (g, lin) {
                (Some(g), Some(lin)) => {
                    Some(Self::block(g, lin, damp, &format!("layer {i} {what}"))).transpose()
                }
                _ => Ok(None),
            };
            layers.push(ProxyLayer {
                o_proj: block(o, layer.self_attn.as_ref().map(|a| &a.o_proj), "o_proj")?,
                down_proj: block(d, layer.mlp.as_ref().map(|m| &m.down_proj), "down_proj")?,
            });
        }
        Ok(Self { layers, damp })
    }

    fn block<B: Backend>(g: Mat<f64>, lin: &Linear<B>, damp: f64, what: &str) -> Result<Block> {
        let k = g.nrows() - 1;
        // The bias row of the lower triangle: the token count and each input's sum.
        let tokens = g[(k, k)].max(1.0);
        let mean: Vec<f64> = (0..k).map(|j| g[(k, j)] / tokens).collect();
        let theta = theta_of(lin)?;
        let out = theta.ncols();
        let mean_out = (0..out)
            .map(|c| theta[(k, c)] + (0..k).map(|j| mean[j] * theta[(j, c)]).sum::<f64>())
            .collect();
        // The least-squares cut's damping rule (raised tenfold while Cholesky fails); only
        // its factor is used here, the right-hand side of a fit has no target to read.
        let stats = crate::structured::Stats::gram(g, out);
        let (llt, _, _) = stats.damped(&theta, damp, &format!("refit proxy, {what}"))?;
        Ok(Block {
            ginv: llt.solve(Mat::<f64>::identity(k + 1, k + 1)),
            theta,
            mean_out,
        })
    }

    /// The damping the statistics were inverted at (as asked; a block that needed more warned).
    pub fn damp(&self) -> f64 {
        self.damp
    }

    /// The refit projections of every layer under `plan` (module docs).
    pub fn layers<B: Backend>(
        &self,
        model: &Llama<B>,
        plan: &MaskPlan,
    ) -> Result<Vec<LayerRefit<B>>> {
        plan.validate_against(model.shape())
            .map_err(|e| Error::Invalid(e.to_string()))?;
        let n = self.layers.len();
        if n != model.shape().n_layers() {
            return Err(Error::Invalid(format!(
                "the refit proxy holds {n} layers, the model has {}",
                model.shape().n_layers()
            )));
        }
        let mut out: Vec<LayerRefit<B>> = (0..n).map(|_| LayerRefit::default()).collect();
        // The mean outputs of blocks removed whole, waiting for the nearest earlier kept block.
        let mut carry: Option<Vec<f64>> = None;
        let add = |carry: &mut Option<Vec<f64>>, v: &[f64]| match carry {
            Some(c) => c.iter_mut().zip(v).for_each(|(a, b)| *a += b),
            None => *carry = Some(v.to_vec()),
        };
        for i in (0..n).rev() {
            let (src, keep) = (&plan.source.layers[i], &plan.layers[i]);
            let layer = model.layer(i)?;
            let (kept_o, kept_d) = kept_inputs(src, keep);
            let p = &self.layers[i];
            // The MLP comes after the attention: blocks in reverse order.
            let blocks = [
                (
                    p.down_proj.as_ref(),
                    layer.mlp.as_ref().map(|m| &m.down_proj),
                    kept_d,
                    1,
                ),
                (
                    p.o_proj.as_ref(),
                    layer.self_attn.as_ref().map(|a| &a.o_proj),
                    kept_o,
                    0,
                ),
            ];
            for (stats, lin, kept, slot) in blocks {
                let (Some(stats), Some(lin)) = (stats, lin) else {
                    continue;
                };
                if kept.is_empty() {
                    add(&mut carry, &stats.mean_out);
                    continue;
                }
                let refit = stats.refit(&kept)?;
                if refit.is_none() && carry.is_none() {
                    continue;
                }
                let mut theta = match refit {
                    Some(t) => t,
                    None => stats.theta.clone(),
                };
                if let Some(c) = carry.take() {
                    let b = theta.nrows() - 1;
                    for (j, v) in c.iter().enumerate() {
                        theta[(b, j)] += v;
                    }
                }
                let lin = linear_of(&theta, lin);
                match slot {
                    0 => out[i].o_proj = Some(lin),
                    _ => out[i].down_proj = Some(lin),
                }
            }
        }
        Ok(out)
    }

    /// Mean next-token cross-entropy (nats) of the model `plan` prunes, its kept projections
    /// refit by the proxy ([`RefitProxy::layers`]), sliced layer by layer as
    /// [`lopper_surgery::mean_loss_kept`] does.
    ///
    /// # Shapes
    /// - `tokens`: `[batch, seq]` (seq >= 2) -> scalar
    pub fn mean_loss<B: Backend>(
        &self,
        model: &Llama<B>,
        plan: &MaskPlan,
        tokens: Tensor<B, 2, Int>,
    ) -> Result<f64> {
        let refits = self.layers(model, plan)?;
        let nll = model.token_nll_layers(tokens, None, |i, layer| {
            refit_layer(layer, &plan.source.layers[i], &plan.layers[i], &refits[i])
        })?;
        Ok(mean_of(nll)?)
    }

    /// [`RefitProxy::mean_loss`] over all of `windows`, `batch_size` per forward pass, each
    /// window weighing the same.
    pub fn windows_loss<B: Backend>(
        &self,
        model: &Llama<B>,
        plan: &MaskPlan,
        windows: &[Vec<u32>],
        batch_size: usize,
    ) -> Result<f64> {
        if windows.is_empty() || batch_size == 0 {
            return Err(Error::Invalid(
                "a loss over no windows (or batches of 0 windows) is undefined".into(),
            ));
        }
        let mut sum = 0.0;
        for batch in windows.chunks(batch_size) {
            sum += self.mean_loss(model, plan, model.tokens(batch)?)? * batch.len() as f64;
        }
        Ok(sum / windows.len() as f64)
    }
}

/// `layer` sliced to `keep` with `refit`'s projections in place of the sliced ones.
pub fn refit_layer<'a, B: Backend>(
    layer: &'a DecoderLayer<B>,
    src: &LayerShape,
    keep: &LayerPlan,
    refit: &LayerRefit<B>,
) -> Cow<'a, DecoderLayer<B>> {
    let sliced = slice_layer(layer, src, keep);
    if refit.o_proj.is_none() && refit.down_proj.is_none() {
        return sliced;
    }
    let mut l = sliced.into_owned();
    if let (Some(a), Some(o)) = (&mut l.self_attn, &refit.o_proj) {
        a.o_proj = o.clone();
    }
    if let (Some(m), Some(d)) = (&mut l.mlp, &refit.down_proj) {
        m.down_proj = d.clone();
    }
    Cow::Owned(l)
}
