#![doc = include_str!("../README.md")]

use std::time::Instant;

use burn::module::Param;
use burn::nn::Linear;
use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorData};
use faer::Mat;
use lopper_model::{DecoderLayer, LayerStepper, Llama, Tap};

pub mod proxy;
pub mod solve;
pub mod structured;
/// The linear-algebra crate of the solver API ([`prune_matrix`] takes `faer::Mat`).
pub use faer;
pub use proxy::{LayerRefit, RefitProxy, refit_layer};
pub use solve::AlpsSettings;
pub use structured::{
    Chosen, DAMP_GRID, HELD_OUT_EVERY, HeldOutReport, InputRefit, LS_GRAMS, ProjectionReport,
    ReconSettings, input_refits, ls_grams, ls_host_bytes, projections, reconstruct, refits,
};

/// Errors of one-shot sparse pruning.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Model errors.
    #[error(transparent)]
    Model(#[from] lopper_model::Error),
    /// Settings or data that cannot work.
    #[error("{0}")]
    Invalid(String),
}

/// Result alias of this crate.
pub type Result<T> = std::result::Result<T, Error>;

/// Which weights may stay non-zero.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub enum Pattern {
    /// A fraction `sparsity` of each matrix's weights is zero.
    Unstructured(f64),
    /// At most `n` non-zeros in every `m` consecutive inputs of each output row.
    NM {
        /// Kept per group.
        n: usize,
        /// Group size.
        m: usize,
    },
}

impl Pattern {
    /// `unstructured` (with `sparsity`) or `N:M` such as `2:4`.
    pub fn parse(s: &str, sparsity: f64) -> Result<Self> {
        if s == "unstructured" {
            if !(0.0..1.0).contains(&sparsity) {
                return Err(Error::Invalid(format!(
                    "sparsity {sparsity} is impossible: give a fraction in [0, 1) (0.7 zeroes 70% of the weights)"
                )));
            }
            return Ok(Pattern::Unstructured(sparsity));
        }
        let bad = || {
            Error::Invalid(format!(
                "pattern `{s}`: use unstructured or N:M with 0 < N < M (2:4, 4:8)"
            ))
        };
        let (n, m) = s.split_once(':').ok_or_else(bad)?;
        let (n, m): (usize, usize) = (n.parse().map_err(|_| bad())?, m.parse().map_err(|_| bad())?);
        if n == 0 || n >= m {
            return Err(bad());
        }
        Ok(Pattern::NM { n, m })
    }

    /// The fraction of zeros the pattern asks for.
    pub fn sparsity(self) -> f64 {
        match self {
            Pattern::Unstructured(s) => s,
            Pattern::NM { n, m } => 1.0 - n as f64 / m as f64,
        }
    }
}

/// The one-shot methods.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum SparseMethod {
    /// Smallest `|W|` per matrix.
    Magnitude,
    /// `|W| * ||x||` per output row (Sun et al. 2023).
    Wanda,
    /// OBS-style sweep with weight updates (Frantar & Alistarh 2023).
    SparseGpt,
    /// ADMM + conjugate gradient on the support (Meng et al. 2024).
    Alps,
}

impl std::str::FromStr for SparseMethod {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        Ok(match s {
            "magnitude" => SparseMethod::Magnitude,
            "wanda" => SparseMethod::Wanda,
            "sparsegpt" => SparseMethod::SparseGpt,
            "alps" => SparseMethod::Alps,
            o => {
                return Err(Error::Invalid(format!(
                    "unknown one-shot method `{o}`; use magnitude, wanda, sparsegpt or alps"
                )));
            }
        })
    }
}

/// Settings of [`prune_model`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SparseSettings {
    /// Calibration windows per forward pass.
    pub batch_size: usize,
    /// SparseGPT damping (fraction of the mean diagonal of H).
    pub damp: f64,
    /// SparseGPT column block.
    pub block: usize,
    /// ALPS settings.
    pub alps: AlpsSettings,
}

impl Default for SparseSettings {
    fn default() -> Self {
        Self {
            batch_size: 4,
            damp: 0.01,
            block: 128,
            alps: AlpsSettings::default(),
        }
    }
}

/// What pruning did to one linear layer.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct LinearReport {
    /// Decoder layer.
    pub layer: usize,
    /// `q_proj`, ..., `down_proj`.
    pub name: &'static str,
    /// Outputs x inputs.
    pub shape: [usize; 2],
    /// Fraction of zero weights after pruning.
    pub sparsity: f64,
    /// `||X W^T - X W0^T||^2 / ||X W0^T||^2` on this layer's calibration inputs.
    pub rel_error: f64,
    /// Solver wall time.
    pub seconds: f64,
    /// ALPS iterations (0 for other methods).
    pub iterations: usize,
}

fn host_mat<B: Backend>(t: Tensor<B, 2>, transpose: bool) -> Result<Mat<f64>> {
    let [r, c] = t.dims();
    let v: Vec<f32> = t
        .into_data()
        .convert::<f32>()
        .to_vec()
        .map_err(|e| Error::Invalid(format!("reading weights back: {e:?}")))?;
    Ok(if transpose {
        Mat::from_fn(c, r, |i, j| v[j * c + i] as f64)
    } else {
        Mat::from_fn(r, c, |i, j| v[i * c + j] as f64)
    })
}

/// Solves one linear: `W0` is `[out, in]`, `h` is `[in, in]`.
pub fn prune_matrix(
    w0: &Mat<f64>,
    h: &Mat<f64>,
    method: SparseMethod,
    pattern: Pattern,
    s: &SparseSettings,
) -> Result<(Mat<f64>, usize)> {
    prune_matrix_with(w0, h, None, method, pattern, s)
}

/// [`prune_matrix`] reusing an ALPS factorisation of `h` (linears that share an input share it).
fn prune_matrix_with(
    w0: &Mat<f64>,
    h: &Mat<f64>,
    factor: Option<&solve::AlpsFactor>,
    method: SparseMethod,
    pattern: Pattern,
    s: &SparseSettings,
) -> Result<(Mat<f64>, usize)> {
    if let Pattern::NM { m, .. } = pattern
        && !w0.ncols().is_multiple_of(m)
    {
        return Err(Error::Invalid(format!(
            "{m} does not divide the {} inputs of a layer; pick M that divides every width",
            w0.ncols()
        )));
    }
    Ok(match method {
        SparseMethod::Magnitude => (solve::magnitude(w0, pattern), 0),
        SparseMethod::Wanda => (solve::wanda(w0, h, pattern), 0),
        SparseMethod::SparseGpt => (solve::sparsegpt(w0, h, pattern, s.damp, s.block)?, 0),
        SparseMethod::Alps => {
            let (w, t) = match factor {
                Some(f) => solve::alps_factored(w0, f, pattern, &s.alps)?,
                None => solve::alps(w0, h, pattern, &s.alps)?,
            };
            (w, t.iterations)
        }
    })
}

/// The pruned copy of `lin` (burn layout `[in, out]`), and its report.
fn prune_linear<B: Backend>(
    lin: &Linear<B>,
    (h, factor): (&Mat<f64>, Option<&solve::AlpsFactor>),
    (layer, name): (usize, &'static str),
    method: SparseMethod,
    pattern: Pattern,
    s: &SparseSettings,
) -> Result<(Linear<B>, LinearReport)> {
    let t = Instant::now();
    let w0 = host_mat(lin.weight.val(), true)?; // [out, in]
    let (w, iterations) = prune_matrix_with(&w0, h, factor, method, pattern, s)?;
    let (out, inp) = (w.nrows(), w.ncols());
    let zeros = (0..out * inp)
        .filter(|&i| w[(i / inp, i % inp)] == 0.0)
        .count();
    let report = LinearReport {
        layer,
        name,
        shape: [out, inp],
        sparsity: zeros as f64 / (out * inp) as f64,
        rel_error: solve::relative_error(&w, &w0, h),
        seconds: t.elapsed().as_secs_f64(),
        iterations,
    };
    // Back to burn's [in, out].
    let data: Vec<f32> = (0..inp * out)
        .map(|k| w[(k % out, k / out)] as f32)
        .collect();
    // In the layer's own storage type.
    let weight = Tensor::<B, 2>::from_data(TensorData::new(data, [inp, out]), &lin.weight.device())
        .cast(lin.weight.val().dtype());
    Ok((
        Linear {
            weight: Param::from_tensor(weight),
            bias: lin.bias.clone(),
        },
        report,
    ))
}

/// Layer-wise sequential one-shot pruning of every linear in the decoder: for layer `l`, the
/// calibration windows run through the already-pruned layers `0..l` and the Gram matrices
/// `H = sum x x^T` of the four inputs of layer `l` (attention input, `o_proj` input, MLP input,
/// `down_proj` input) are accumulated in one pass; then its seven linears are solved and the
/// pruned layer feeds layer `l + 1`. Embeddings, norms and the LM head are kept.
pub fn prune_model<B: Backend>(
    model: &Llama<B>,
    windows: &[Vec<u32>],
    method: SparseMethod,
    pattern: Pattern,
    settings: &SparseSettings,
    mut on_linear: impl FnMut(&LinearReport),
) -> Result<(Llama<B>, Vec<LinearReport>)> {
    if windows.is_empty() || settings.batch_size == 0 {
        return Err(Error::Invalid(
            "one-shot pruning needs at least one calibration window and a batch size of at least 1"
                .into(),
        ));
    }
    let n = model.shape().n_layers();
    let mut pruned: Vec<DecoderLayer<B>> = Vec::with_capacity(n);
    let mut reports = Vec::new();
    // The residual stream entering the current layer, per calibration batch, computed by the
    // already-pruned layers: each layer runs twice (dense with taps, then pruned), not the
    // whole prefix again.
    let mut streams: Vec<(LayerStepper<B>, Tensor<B, 2>)> = Vec::new();
    for batch in windows.chunks(settings.batch_size) {
        let t = model.tokens(batch)?;
        let [b, seq] = t.dims();
        streams.push((model.stepper(b, seq), model.embed(t)));
    }
    for l in 0..n {
        // The dense layer: the model's own, or read for its turn when offloaded.
        let src = model.layer(l)?;
        let mut grams: [Option<Tensor<B, 2>>; 4] = [None, None, None, None];
        for (stepper, x) in &streams {
            stepper.forward(&src, x.clone(), |tap, x| {
                let slot = match tap {
                    Tap::AttnInput => 0,
                    Tap::OProjInput => 1,
                    Tap::MlpInput => 2,
                    Tap::DownProjInput => 3,
                };
                let g = lopper_kernels::matmul(x.clone().transpose(), x.clone());
                grams[slot] = Some(match grams[slot].take() {
                    Some(acc) => acc + g,
                    None => g,
                });
            });
        }
        let grams: Vec<Option<Mat<f64>>> = grams
            .into_iter()
            .map(|g| g.map(|g| host_mat(g, false)).transpose())
            .collect::<Result<_>>()?;
        // ALPS factors each input's Gram matrix once for all the linears reading it.
        let factors: Vec<Option<solve::AlpsFactor>> = grams
            .iter()
            .map(|g| match (g, method) {
                (Some(h), SparseMethod::Alps) => {
                    solve::AlpsFactor::new(h, settings.alps.damp).map(Some)
                }
                _ => Ok(None),
            })
            .collect::<Result<_>>()?;
        let mut layer = src.clone().into_owned();
        let mut run = |lin: &Linear<B>, g: usize, name: &'static str| -> Result<Linear<B>> {
            let h = grams[g].as_ref().ok_or_else(|| {
                Error::Invalid(format!("layer {l}: no calibration inputs reached {name}"))
            })?;
            let (p, r) = prune_linear(
                lin,
                (h, factors[g].as_ref()),
                (l, name),
                method,
                pattern,
                settings,
            )?;
            on_linear(&r);
            reports.push(r);
            Ok(p)
        };
        if let (Some(a), Some(dst)) = (&src.self_attn, layer.self_attn.as_mut()) {
            dst.q_proj = run(&a.q_proj, 0, "q_proj")?;
            dst.k_proj = run(&a.k_proj, 0, "k_proj")?;
            dst.v_proj = run(&a.v_proj, 0, "v_proj")?;
            dst.o_proj = run(&a.o_proj, 1, "o_proj")?;
        }
        if let (Some(m), Some(dst)) = (&src.mlp, layer.mlp.as_mut()) {
            dst.gate_proj = run(&m.gate_proj, 2, "gate_proj")?;
            dst.up_proj = run(&m.up_proj, 2, "up_proj")?;
            dst.down_proj = run(&m.down_proj, 3, "down_proj")?;
        }
        for (stepper, x) in &mut streams {
            *x = stepper.forward(&layer, x.clone(), |_, _| {});
        }
        pruned.push(layer);
    }
    // Every layer resident now (an offloaded model's included).
    let out = Llama::from_parts(
        model.embed_tokens.clone(),
        pruned,
        model.norm.clone(),
        model.lm_head.clone(),
        model.shape().clone(),
    )?;
    Ok((out, reports))
}

#[cfg(test)]
mod tests;
