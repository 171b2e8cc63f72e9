//! Structured reconstruction: after a structural plan, the kept `o_proj` and `down_proj` of
//! every layer are refit by damped least squares so that the pruned model's residual stream
//! follows the dense model's on calibration text (no fine-tuning).
//!
//! Layer by layer, in order, two residual streams run over the calibration windows: the dense
//! model's and the pruned model's, the latter through the layers already reconstructed. For a
//! kept projection `P` of block `b` (attention or MLP) with kept inputs `X` (its input columns
//! that the plan keeps, computed on the pruned stream) the target is
//!
//! `T = r_dense(after b) - r_pruned(before b)`
//!
//! the update that would bring the pruned residual stream back onto the dense one. It holds the
//! dense block's own output, the outputs of blocks removed whole since the last kept projection
//! (so a removed layer's update is folded into the next kept projection, per token, not only
//! its mean) and the drift left by earlier layers. `P`'s weights `W` (`[kept inputs, hidden]`)
//! and bias `b` solve
//!
//! `min ||X W + 1 b^T - T||^2 + lambda ||W - W0||^2`,
//!
//! ridge towards the dense weights `W0` of the kept inputs, `lambda = damp * mean(diag(X^T X))`
//! (SparseGPT's convention; `damp = 0.01` by default), the bias undamped. With a plan that keeps
//! everything nothing is refit and the model is the dense one.
//!
//! Every projection also gets the *bias refit* candidate (`W0` with the least-squares bias, which
//! is never worse than FLAP's mean compensation on the same data) and the plain cut (`W0`, `b0`);
//! their calibration errors are reported, and the least-squares solution is used only when its
//! error is not above the bias refit's (it always is below without damping). A Gram matrix that
//! Cholesky cannot factor gets ten times the damping, up to six times, with a warning; a solution
//! that is not finite is never written (the bias refit is used and the report says so).

use std::time::Instant;

use burn::module::Param;
use burn::nn::Linear;
use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorData};
use faer::linalg::matmul::triangular::BlockStructure;
use faer::linalg::solvers::Solve;
use faer::{Mat, Side};
use lopper_core::MaskPlan;
use lopper_model::{DecoderLayer, LayerStepper, Llama, Tap};

use crate::{Error, Result, host_mat};

/// Settings of [`reconstruct`].
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct ReconSettings {
    /// Calibration windows per forward pass.
    pub batch_size: usize,
    /// Ridge towards the dense weights, as a fraction of the mean diagonal of `X^T X`.
    pub damp: f64,
}

impl Default for ReconSettings {
    fn default() -> Self {
        Self {
            batch_size: 4,
            damp: 0.01,
        }
    }
}

/// Which solution a projection ended with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Chosen {
    /// The damped least-squares weights and bias.
    LeastSquares,
    /// The dense weights of the kept inputs with the least-squares bias.
    BiasRefit,
}

/// What reconstruction did to one projection.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct ProjectionReport {
    /// Source decoder layer.
    pub layer: usize,
    /// `o_proj` or `down_proj`.
    pub name: &'static str,
    /// Kept input columns.
    pub inputs: usize,
    /// Calibration tokens.
    pub tokens: usize,
    /// `||prediction - T||^2 / ||T||^2` of the plain cut (dense weights and bias of the kept inputs).
    pub rel_error_cut: f64,
    /// The same for the bias refit.
    pub rel_error_bias: f64,
    /// The same for the least-squares solution.
    pub rel_error_ls: f64,
    /// The damping the solve used (raised from the setting when the Gram matrix needed it).
    pub damp: f64,
    /// The solution written.
    pub chosen: Chosen,
    /// Seconds of this projection (its share of forward passes and the solve).
    pub seconds: f64,
}

/// Sufficient statistics of one least-squares problem, accumulated in f64 over batches.
struct Stats {
    /// `[X 1]^T [X 1]`, `(k + 1) x (k + 1)`.
    g: Mat<f64>,
    /// `[X 1]^T T`, `(k + 1) x out`.
    c: Mat<f64>,
    /// `||T||^2`.
    tt: f64,
}

impl Stats {
    fn new(k: usize, out: usize) -> Self {
        Self {
            g: Mat::zeros(k + 1, k + 1),
            c: Mat::zeros(k + 1, out),
            tt: 0.0,
        }
    }

    fn tokens(&self) -> usize {
        let k = self.g.nrows() - 1;
        self.g[(k, k)].round() as usize
    }

    /// Adds one batch: `x` `[n, k]` kept inputs, `t` `[n, out]` targets. The products are taken
    /// in f64 on the host (an f32 Gram matrix limits the solution to about 1e-6 relative).
    fn add<B: Backend>(&mut self, x: Tensor<B, 2>, t: Tensor<B, 2>) -> Result<()> {
        let [n, k] = x.dims();
        let out = self.c.ncols();
        let x = host_mat(x, false)?;
        let t = host_mat(t, false)?;
        // [X 1]
        let a = Mat::from_fn(n, k + 1, |i, j| if j < k { x[(i, j)] } else { 1.0 });
        // Only the lower triangle of the symmetric Gram matrix: half the products (the
        // Cholesky solve reads no more; `symmetric` mirrors it where the whole one is needed).
        faer::linalg::matmul::triangular::matmul(
            self.g.as_mut(),
            BlockStructure::TriangularLower,
            faer::Accum::Add,
            a.transpose(),
            BlockStructure::Rectangular,
            a.as_ref(),
            BlockStructure::Rectangular,
            1.0,
            faer::Par::rayon(0),
        );
        faer::linalg::matmul::matmul(
            self.c.as_mut(),
            faer::Accum::Add,
            a.transpose(),
            t.as_ref(),
            1.0,
            faer::Par::rayon(0),
        );
        debug_assert_eq!(t.ncols(), out);
        self.tt += t.squared_norm_l2();
        Ok(())
    }

    /// The whole Gram matrix (`g` holds its lower triangle).
    fn symmetric(&self) -> Mat<f64> {
        Mat::from_fn(self.g.nrows(), self.g.ncols(), |i, j| {
            if i >= j {
                self.g[(i, j)]
            } else {
                self.g[(j, i)]
            }
        })
    }

    /// `||[X 1] theta - T||^2` for `theta = [W; b^T]`.
    fn error(&self, theta: &Mat<f64>) -> f64 {
        let gt = &self.symmetric() * theta;
        let mut quad = 0.0;
        let mut cross = 0.0;
        for i in 0..theta.nrows() {
            for j in 0..theta.ncols() {
                quad += gt[(i, j)] * theta[(i, j)];
                cross += self.c[(i, j)] * theta[(i, j)];
            }
        }
        (quad - 2.0 * cross + self.tt).max(0.0)
    }

    /// The dense `theta0 = [W0; b0^T]` with its bias replaced by the least-squares bias.
    fn bias_refit(&self, theta0: &Mat<f64>) -> Mat<f64> {
        let k = self.g.nrows() - 1;
        let n = self.g[(k, k)].max(1.0);
        let mut th = theta0.clone();
        for j in 0..th.ncols() {
            let wx: f64 = (0..k).map(|i| self.g[(k, i)] * theta0[(i, j)]).sum();
            th[(k, j)] = (self.c[(k, j)] - wx) / n;
        }
        th
    }

    /// Damped least squares towards `theta0`; the damping actually used.
    fn solve(&self, theta0: &Mat<f64>, damp: f64, what: &str) -> Result<(Mat<f64>, f64)> {
        let k = self.g.nrows() - 1;
        let mean_diag = (0..k).map(|i| self.g[(i, i)]).sum::<f64>() / k.max(1) as f64;
        let mut damp = damp;
        for attempt in 0..7 {
            let lambda = damp * mean_diag.max(1e-12);
            let mut g = self.g.clone();
            let mut rhs = self.c.clone();
            for i in 0..k {
                g[(i, i)] += lambda;
                for j in 0..rhs.ncols() {
                    rhs[(i, j)] += lambda * theta0[(i, j)];
                }
            }
            if let Ok(llt) = g.llt(Side::Lower) {
                let theta = llt.solve(&rhs);
                if (0..theta.nrows()).all(|i| (0..theta.ncols()).all(|j| theta[(i, j)].is_finite()))
                {
                    return Ok((theta, damp));
                }
            }
            if attempt < 6 {
                tracing::warn!(
                    "{what}: the Gram matrix of its kept inputs is ill-conditioned at damping {damp}; raising it to {}",
                    damp * 10.0
                );
                damp *= 10.0;
            }
        }
        Err(Error::Invalid(format!(
            "{what}: no finite least-squares solution even at damping {damp}; the calibration inputs are degenerate (use more calibration windows, or --reconstruct bias)"
        )))
    }
}

/// `[W; b^T]` of a burn linear (`[in, out]`) keeping all its inputs.
fn theta_of<B: Backend>(lin: &Linear<B>) -> Result<Mat<f64>> {
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

/// The refit layer, its weight in `old`'s storage type (the bias is f32, as every bias).
fn linear_of<B: Backend>(theta: &Mat<f64>, old: &Linear<B>) -> Linear<B> {
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

/// Solves one projection from its statistics; the new linear and its report.
fn refit<B: Backend>(
    lin: &Linear<B>,
    stats: &Stats,
    s: &ReconSettings,
    (layer, name): (usize, &'static str),
    started: Instant,
) -> Result<(Linear<B>, ProjectionReport)> {
    let theta0 = theta_of(lin)?;
    let what = format!("layer {layer} {name}");
    let tokens = stats.tokens();
    let k = theta0.nrows() - 1;
    if tokens < 10 * (k + 1) {
        // Measured on the default model: 4 tokens per input fit the calibration text and lose to
        // the bias refit on held-out text; 12 per input win.
        tracing::warn!(
            "{what}: {tokens} calibration tokens for {k} kept inputs; least squares may fit the calibration text more than the language (give at least {} tokens: more calibration windows)",
            10 * (k + 1)
        );
    }
    let (ls, damp) = stats.solve(&theta0, s.damp, &what)?;
    let bias = stats.bias_refit(&theta0);
    let tt = stats.tt.max(f64::MIN_POSITIVE);
    let (e_cut, e_bias, e_ls) = (
        stats.error(&theta0) / tt,
        stats.error(&bias) / tt,
        stats.error(&ls) / tt,
    );
    let chosen = if e_ls <= e_bias {
        Chosen::LeastSquares
    } else {
        Chosen::BiasRefit
    };
    let theta = match chosen {
        Chosen::LeastSquares => &ls,
        Chosen::BiasRefit => &bias,
    };
    let report = ProjectionReport {
        layer,
        name,
        inputs: k,
        tokens,
        rel_error_cut: e_cut,
        rel_error_bias: e_bias,
        rel_error_ls: e_ls,
        damp,
        chosen,
        seconds: started.elapsed().as_secs_f64(),
    };
    tracing::debug!(?report, "projection reconstructed");
    Ok((linear_of(theta, lin), report))
}

/// One calibration batch: its stepper and the two residual streams entering the current layer.
struct Stream<B: Backend> {
    stepper: LayerStepper<B>,
    dense: Tensor<B, 2>,
    pruned: Tensor<B, 2>,
}

/// The layer with only its attention block (to tap `o_proj`'s input without running the MLP).
fn attention_only<B: Backend>(layer: &DecoderLayer<B>) -> DecoderLayer<B> {
    DecoderLayer {
        input_layernorm: layer.input_layernorm.clone(),
        self_attn: layer.self_attn.clone(),
        post_attention_layernorm: None,
        mlp: None,
    }
}

/// Which projections [`reconstruct`] refits, per source layer: `(o_proj, down_proj)`. A kept
/// block is refit when it is cut itself or any block before it was; layers before the first
/// change stay dense.
pub fn refits(plan: &MaskPlan) -> Vec<(bool, bool)> {
    let mut changed = false;
    plan.layers
        .iter()
        .zip(&plan.source.layers)
        .map(|(keep, src)| {
            let attn_cut = keep.kv_groups.len() != src.n_kv_heads;
            let o = !keep.kv_groups.is_empty() && (changed || attn_cut);
            changed |= attn_cut;
            let mlp_cut = keep.channels.len() != src.ffn_hidden;
            let d = !keep.channels.is_empty() && (changed || mlp_cut);
            changed |= mlp_cut;
            (o, d)
        })
        .collect()
}

/// The model `plan` cuts from `model`, with every kept `o_proj` / `down_proj` refit by damped
/// least squares on `windows` (see the module documentation), and one report per refit
/// projection (`on_projection` sees each as it is done). One layer's statistics live at a time;
/// the two residual streams of all windows are held (`2 x windows x seq x hidden` floats).
pub fn reconstruct<B: Backend>(
    model: &Llama<B>,
    plan: &MaskPlan,
    windows: &[Vec<u32>],
    settings: &ReconSettings,
    mut on_projection: impl FnMut(&ProjectionReport),
) -> Result<(Llama<B>, Vec<ProjectionReport>)> {
    if windows.is_empty() || settings.batch_size == 0 {
        return Err(Error::Invalid(
            "reconstruction needs at least one calibration window and a batch size of at least 1"
                .into(),
        ));
    }
    if !(settings.damp.is_finite() && settings.damp > 0.0) {
        return Err(Error::Invalid(format!(
            "reconstruction damping {} is impossible: give a positive fraction such as 0.01",
            settings.damp
        )));
    }
    plan.validate_against(model.shape())
        .map_err(|e| Error::Invalid(e.to_string()))?;
    let hidden = model.shape().hidden_size;
    let mut streams: Vec<Stream<B>> = Vec::new();
    for batch in windows.chunks(settings.batch_size) {
        let t = model.tokens(batch)?;
        let [b, seq] = t.dims();
        let x = model.embed(t);
        streams.push(Stream {
            stepper: model.stepper(b, seq),
            dense: x.clone(),
            pruned: x,
        });
    }
    let mut reports = Vec::new();
    let mut layers = Vec::new();
    let to_refit = refits(plan);
    for (l, &(refit_o, refit_down)) in to_refit.iter().enumerate() {
        let (src, keep) = (&plan.source.layers[l], &plan.layers[l]);
        let dense_layer = &model.layers[l];
        let whole = keep.kv_groups.len() == src.n_kv_heads && keep.channels.len() == src.ffn_hidden;
        if whole && !refit_o && !refit_down {
            for s in &mut streams {
                s.dense = s.stepper.forward(dense_layer, s.dense.clone(), |_, _| {});
                s.pruned = s.dense.clone();
            }
            layers.push(dense_layer.clone());
            continue;
        }
        // The dense stream: the residual after attention, and after the layer.
        let mut mid_dense = Vec::with_capacity(streams.len());
        for s in &mut streams {
            let mut mid = None;
            let out = s.stepper.forward(dense_layer, s.dense.clone(), |tap, x| {
                if tap == Tap::OProjInput
                    && let Some(a) = &dense_layer.self_attn
                {
                    mid = Some(lopper_kernels::linear(&a.o_proj, x.clone()));
                }
            });
            let attn = mid.ok_or_else(|| {
                Error::Invalid(format!("layer {l}: the dense layer has no attention block"))
            })?;
            mid_dense.push(s.dense.clone() + attn);
            s.dense = out;
        }
        let mut layer = lopper_surgery::slice_layer(dense_layer, src, keep).into_owned();
        // Attention: o_proj refit (if the block survives and anything changed before it).
        if let Some(a) = &layer.self_attn
            && refit_o
        {
            let started = Instant::now();
            let probe = attention_only(&layer);
            let mut stats = Stats::new(a.o_proj.weight.dims()[0], hidden);
            for (s, mid) in streams.iter().zip(&mid_dense) {
                let mut x_k = None;
                s.stepper.forward(&probe, s.pruned.clone(), |tap, x| {
                    if tap == Tap::OProjInput {
                        x_k = Some(x.clone());
                    }
                });
                let x_k = x_k
                    .ok_or_else(|| Error::Invalid(format!("layer {l}: no input reached o_proj")))?;
                stats.add(x_k, mid.clone() - s.pruned.clone())?;
            }
            let (o, r) = refit(&a.o_proj, &stats, settings, (l, "o_proj"), started)?;
            on_projection(&r);
            reports.push(r);
            if let Some(a) = &mut layer.self_attn {
                a.o_proj = o;
            }
        }
        // MLP: down_proj refit against the dense residual after the layer.
        if let Some(m) = &layer.mlp
            && refit_down
        {
            let started = Instant::now();
            let mut stats = Stats::new(m.down_proj.weight.dims()[0], hidden);
            for s in &streams {
                let (mut mid, mut x_k) = (None, None);
                s.stepper
                    .forward(&layer, s.pruned.clone(), |tap, x| match tap {
                        Tap::OProjInput => {
                            if let Some(a) = &layer.self_attn {
                                mid = Some(lopper_kernels::linear(&a.o_proj, x.clone()));
                            }
                        }
                        Tap::DownProjInput => x_k = Some(x.clone()),
                        _ => {}
                    });
                let mid = match mid {
                    Some(attn) => s.pruned.clone() + attn,
                    None => s.pruned.clone(),
                };
                let x_k = x_k.ok_or_else(|| {
                    Error::Invalid(format!("layer {l}: no input reached down_proj"))
                })?;
                stats.add(x_k, s.dense.clone() - mid)?;
            }
            let (d, r) = refit(&m.down_proj, &stats, settings, (l, "down_proj"), started)?;
            on_projection(&r);
            reports.push(r);
            if let Some(m) = &mut layer.mlp {
                m.down_proj = d;
            }
        }
        for s in &mut streams {
            s.pruned = s.stepper.forward(&layer, s.pruned.clone(), |_, _| {});
        }
        if !(keep.kv_groups.is_empty() && keep.channels.is_empty()) {
            layers.push(layer);
        }
    }
    let kept = plan.kept_layers();
    // Layers kept whole before the first change were pushed as they are; all-removed layers
    // were skipped: what is left lines up with the plan's kept layers.
    if layers.len() != kept.len() {
        return Err(Error::Invalid(format!(
            "reconstruction built {} layers for a plan that keeps {}",
            layers.len(),
            kept.len()
        )));
    }
    let out = Llama::from_parts(
        model.embed_tokens.clone(),
        layers,
        model.norm.clone(),
        model.lm_head.clone(),
        plan.pruned_shape(),
    )?;
    Ok((out, reports))
}
