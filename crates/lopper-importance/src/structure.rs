//! FLAP, random scores and the layer-removal methods (ShortGPT block influence, SLEB).

use burn::tensor::Tensor;
use burn::tensor::backend::Backend;
use lopper_core::{MaskPlan, ModelShape, PruneUnit, UnitScores};
use lopper_model::{Llama, Tap, weight_f32};
use rand::{Rng, SeedableRng};

use crate::{Error, InputStats, Result, group_scores, host};

/// Per-column mean and sample variance over calibration tokens of the inputs of `o_proj` and
/// `down_proj`, per layer (empty for a missing block).
#[derive(Debug, Clone, PartialEq)]
pub struct InputMoments {
    /// Means: `(o_proj[layer][column], down_proj[layer][channel])`.
    pub mean: InputStats,
    /// Sample variances (divided by `tokens - 1`), same layout.
    pub var: InputStats,
    /// Calibration tokens seen.
    pub tokens: usize,
}

/// Running per-column moments, merged batch by batch with Chan et al.'s pairwise update in f64
/// (each batch's own mean and centred sum of squares come from the device in f32, so large
/// means do not cancel the variance away).
#[derive(Debug, Clone, Default)]
struct Running {
    n: f64,
    mean: Vec<f64>,
    m2: Vec<f64>,
}

impl Running {
    fn merge(&mut self, n_b: f64, mean_b: &[f64], m2_b: &[f64]) {
        if self.n == 0.0 {
            (self.n, self.mean, self.m2) = (n_b, mean_b.to_vec(), m2_b.to_vec());
            return;
        }
        let n = self.n + n_b;
        for j in 0..self.mean.len() {
            let delta = mean_b[j] - self.mean[j];
            self.mean[j] += delta * n_b / n;
            self.m2[j] += m2_b[j] + delta * delta * self.n * n_b / n;
        }
        self.n = n;
    }
}

/// [`InputMoments`] of the dense model on `windows`.
pub fn input_moments<B: Backend>(
    model: &Llama<B>,
    windows: &[Vec<u32>],
    batch_size: usize,
) -> Result<InputMoments> {
    crate::check_calibration(windows, batch_size)?;
    let n_layers = model.shape().n_layers();
    let mut run: Vec<[Running; 2]> = vec![Default::default(); n_layers];
    let mut tokens = 0usize;
    for batch in windows.chunks(batch_size) {
        let t = model.tokens(batch)?;
        let [b, s] = t.dims();
        tokens += b * s;
        let mut parts: Vec<(usize, usize, Tensor<B, 2>, Tensor<B, 2>)> = Vec::new();
        model.forward_tapped(t, None, |i, point, x| {
            let slot = match point {
                Tap::OProjInput => 0,
                Tap::DownProjInput => 1,
                _ => return,
            };
            let mean = x.clone().mean_dim(0);
            let m2 = (x.clone() - mean.clone()).powi_scalar(2).sum_dim(0);
            parts.push((i, slot, mean, m2));
        })?;
        for (i, slot, mean, m2) in parts {
            run[i][slot].merge((b * s) as f64, &host(mean)?, &host(m2)?);
        }
    }
    let denom = (tokens.max(2) - 1) as f64;
    let (mut mean, mut var) = ((Vec::new(), Vec::new()), (Vec::new(), Vec::new()));
    for [o, d] in run {
        var.0.push(o.m2.iter().map(|m| m / denom).collect());
        var.1.push(d.m2.iter().map(|m| m / denom).collect());
        mean.0.push(o.mean);
        mean.1.push(d.mean);
    }
    Ok(InputMoments { mean, var, tokens })
}

/// `(x - mean) / std` over one layer's values (unbiased std, as `torch.std`); all zeros when
/// the values do not vary.
pub fn standardise(v: &[f64]) -> Vec<f64> {
    let n = v.len() as f64;
    if v.len() < 2 {
        return vec![0.0; v.len()];
    }
    let mean = v.iter().sum::<f64>() / n;
    let std = (v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0)).sqrt();
    if std == 0.0 || !std.is_finite() {
        return vec![0.0; v.len()];
    }
    v.iter().map(|x| (x - mean) / std).collect()
}

/// FLAP scores and the calibration means its bias compensation needs.
#[derive(Debug, Clone)]
pub struct Flap {
    /// Standardised per-layer scores (comparable across layers and between KV groups and
    /// channels, for the `global-params` allocation).
    pub scores: UnitScores,
    /// The dense model's input means of `o_proj` and `down_proj`.
    pub means: InputStats,
}

/// FLAP's fluctuation metric (WIFV). For every input column `j` of `o_proj` and `down_proj`:
/// `S_j = Var_tokens(x_j) * ||W[:, j]||^2` (the squared norm of the weights that read column
/// `j`), squared once more for `o_proj` as the reference does; standardised across each
/// layer's columns; a KV group scores the mean of its query heads' standardised columns.
pub fn flap<B: Backend>(model: &Llama<B>, windows: &[Vec<u32>], batch_size: usize) -> Result<Flap> {
    let m = input_moments(model, windows, batch_size)?;
    let shape = model.shape();
    let mut kv_groups = Vec::new();
    let mut channels = Vec::new();
    // Sum over outputs of W^2 per input column (burn layout [in, out]).
    let col_sq = |w: Tensor<B, 2>| host(w.powi_scalar(2).sum_dim(1));
    for (i, ls) in shape.layers.iter().enumerate() {
        let layer = model.layer(i)?;
        kv_groups.push(match &layer.self_attn {
            Some(a) => {
                let w = col_sq(weight_f32(&a.o_proj))?;
                let cols: Vec<f64> = w
                    .iter()
                    .zip(&m.var.0[i])
                    .map(|(w, v)| (w * v).powi(2))
                    .collect();
                let z = standardise(&cols);
                // Mean over the group's columns = sum over its heads / (rep * head_dim).
                group_scores(&z, ls)
                    .into_iter()
                    .map(|s| s / ls.head_dim as f64)
                    .collect()
            }
            None => Vec::new(),
        });
        channels.push(match &layer.mlp {
            Some(mlp) => {
                let w = col_sq(weight_f32(&mlp.down_proj))?;
                let cols: Vec<f64> = w.iter().zip(&m.var.1[i]).map(|(w, v)| w * v).collect();
                standardise(&cols)
            }
            None => Vec::new(),
        });
    }
    Ok(Flap {
        scores: UnitScores {
            method: "flap".into(),
            kv_groups,
            channels,
        },
        means: m.mean,
    })
}

/// Uniform random scores in `[0, 1)` from a seeded ChaCha8 stream (KV groups first, then
/// channels, layer by layer): the `random` baseline.
pub fn random(shape: &ModelShape, seed: u64) -> UnitScores {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let mut draw = |n: usize| -> Vec<f64> { (0..n).map(|_| rng.random::<f64>()).collect() };
    let kv_groups = shape.layers.iter().map(|l| draw(l.n_kv_heads)).collect();
    let channels = shape.layers.iter().map(|l| draw(l.ffn_hidden)).collect();
    UnitScores {
        method: "random".into(),
        kv_groups,
        channels,
    }
}

/// ShortGPT's block influence of every layer: `BI_l = 1 - mean over tokens of cos(h_l, h_{l+1})`,
/// with `h_l` the residual stream entering layer `l`. As in implementations that read Hugging
/// Face's `hidden_states`, the state after the last layer is the final-normed one.
pub fn block_influence<B: Backend>(
    model: &Llama<B>,
    windows: &[Vec<u32>],
    batch_size: usize,
) -> Result<Vec<f64>> {
    crate::check_calibration(windows, batch_size)?;
    let n = model.shape().n_layers();
    let mut sums: Vec<Option<Tensor<B, 1>>> = vec![None; n];
    let mut tokens = 0usize;
    for batch in windows.chunks(batch_size) {
        let t = model.tokens(batch)?;
        let [b, s] = t.dims();
        tokens += b * s;
        let mut prev: Option<Tensor<B, 2>> = None;
        model.forward_with_hidden(t, None, |i, h| {
            if let Some(p) = prev.take() {
                // On a placed model consecutive hidden states can sit on different devices.
                let p = p.to_device(&h.device());
                let dot = (p.clone() * h.clone()).sum_dim(1);
                let norms = (p.powi_scalar(2).sum_dim(1) * h.clone().powi_scalar(2).sum_dim(1))
                    .sqrt()
                    .clamp_min(1e-12);
                let cos = (dot / norms).sum_dim(0).reshape([1]);
                let slot = &mut sums[i - 1];
                *slot = Some(match slot.take() {
                    Some(acc) => acc + cos,
                    None => cos,
                });
            }
            prev = Some(h.clone());
        })?;
    }
    sums.into_iter()
        .map(|s| {
            let s = s.ok_or_else(|| Error::Invalid("no hidden states were seen".into()))?;
            Ok(1.0 - host(s)?[0] / tokens as f64)
        })
        .collect()
}

/// The layers in the order ShortGPT removes them: lowest block influence first (ties to the
/// lower index).
pub fn block_influence_order(bi: &[f64]) -> Vec<usize> {
    let mut order: Vec<usize> = (0..bi.len()).collect();
    order.sort_by(|&a, &b| bi[a].total_cmp(&bi[b]).then(a.cmp(&b)));
    order
}

/// One SLEB round: the layer removed and the calibration loss without it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SlebRound {
    /// Layer removed this round.
    pub layer: usize,
    /// Calibration loss of the model with every layer removed so far.
    pub loss: f64,
}

/// SLEB's greedy block elimination: each round tries removing every remaining layer except
/// the first and last `barrier` layers, and removes for good the one whose removal leaves the
/// lowest calibration loss. Rounds stop once another removal would move the removed fraction of
/// decoder parameters away from `1 - keep` (the rule of [`lopper_core::plan_drop_layers`]).
///
/// No work is done twice: the residual stream entering every layer of the current model is
/// kept per batch ([`PrefixCache`]), so a trial that removes layer `l` runs only the layers
/// after `l` (and the LM head), and after a round only the layers after the removed one are
/// recomputed. The result equals running the pruned model from its embeddings each time. The
/// cache holds `layers x windows x seq x hidden` f32 values (566 MiB for the default model at
/// 64 x 128); when that is over half the memory available, the search runs uncached.
pub fn sleb<B: Backend>(
    model: &Llama<B>,
    windows: &[Vec<u32>],
    batch_size: usize,
    keep: f64,
    barrier: usize,
    on_round: impl FnMut(&SlebRound),
) -> Result<Vec<SlebRound>> {
    let shape = model.shape();
    let tokens: usize = windows.iter().map(Vec::len).sum();
    let bytes = (shape.n_layers() * tokens * shape.hidden_size * 4) as u64;
    let available = lopper_core::memory::available_bytes().ok().flatten();
    let cached = prefix_cache_fits(bytes, available);
    if !cached {
        tracing::warn!(
            cache = %lopper_core::memory::human(bytes),
            available = %lopper_core::memory::human(available.unwrap_or(0)),
            "sleb: the prefix cache would not fit; every trial runs from the embeddings"
        );
    }
    sleb_with(model, windows, batch_size, keep, barrier, on_round, cached)
}

/// Whether a prefix cache of `bytes` may be kept: at most half the memory available (unknown
/// availability: yes).
fn prefix_cache_fits(bytes: u64, available: Option<u64>) -> bool {
    available.is_none_or(|a| bytes <= a / 2)
}

/// [`sleb`] without the prefix cache: every trial runs the pruned model from its embeddings.
/// The reference the cached search is checked and timed against (`cargo xtask bench sleb`).
pub fn sleb_uncached<B: Backend>(
    model: &Llama<B>,
    windows: &[Vec<u32>],
    batch_size: usize,
    keep: f64,
    barrier: usize,
    on_round: impl FnMut(&SlebRound),
) -> Result<Vec<SlebRound>> {
    sleb_with(model, windows, batch_size, keep, barrier, on_round, false)
}

fn sleb_with<B: Backend>(
    model: &Llama<B>,
    windows: &[Vec<u32>],
    batch_size: usize,
    keep: f64,
    barrier: usize,
    mut on_round: impl FnMut(&SlebRound),
    cached: bool,
) -> Result<Vec<SlebRound>> {
    crate::check_calibration(windows, batch_size)?;
    lopper_core::check_keep(keep)?;
    let shape = model.shape();
    let n = shape.n_layers();
    let h = shape.hidden_size;
    let params = |l: usize| (shape.layers[l].attn_params(h) + shape.layers[l].mlp_params(h)) as f64;
    let target = (1.0 - keep) * shape.decoder_linear_params() as f64;
    let mut rounds: Vec<SlebRound> = Vec::new();
    let mut removed: Vec<usize> = Vec::new();
    let mut gone = 0.0;
    let mut cache = cached
        .then(|| PrefixCache::new(model, windows, batch_size))
        .transpose()?;
    loop {
        let candidates: Vec<usize> = (barrier..n.saturating_sub(barrier))
            .filter(|l| !removed.contains(l))
            .collect();
        if candidates.is_empty() || removed.len() + 1 >= n {
            break;
        }
        let mut best: Option<SlebRound> = None;
        for &l in &candidates {
            let loss = match &cache {
                Some(c) => c.loss_without(model, &removed, l)?,
                None => {
                    let mut trial = removed.clone();
                    trial.push(l);
                    loss_without(model, windows, batch_size, &trial)?
                }
            };
            if best.is_none_or(|b| loss < b.loss) {
                best = Some(SlebRound { layer: l, loss });
            }
        }
        let best = best.expect("candidates is not empty");
        let next = gone + params(best.layer);
        if (next - target).abs() >= (gone - target).abs() {
            break;
        }
        gone = next;
        removed.push(best.layer);
        if let Some(c) = &mut cache {
            c.remove(model, &removed, best.layer)?;
        }
        on_round(&best);
        rounds.push(best);
    }
    Ok(rounds)
}

/// Mean next-token loss of the model without `removed` layers over all `windows`, each batch
/// run from its embeddings.
fn loss_without<B: Backend>(
    model: &Llama<B>,
    windows: &[Vec<u32>],
    batch_size: usize,
    removed: &[usize],
) -> Result<f64> {
    let units: Vec<PruneUnit> = removed
        .iter()
        .map(|&layer| PruneUnit::Layer { layer })
        .collect();
    let plan = MaskPlan::from_removed(model.shape(), &units)?;
    Ok(lopper_surgery::windows_loss_kept(
        model, &plan, None, windows, batch_size,
    )?)
}

/// Per calibration batch, the residual stream entering each layer of a model from which some
/// layers are removed; what layer-removal searches reuse between trials.
struct PrefixCache<B: Backend> {
    batches: Vec<CachedBatch<B>>,
    windows: usize,
}

struct CachedBatch<B: Backend> {
    tokens: Tensor<B, 2, burn::tensor::Int>,
    rows: usize,
    stepper: lopper_model::LayerStepper<B>,
    /// `inputs[i]`: the stream entering layer `i` (`None` for removed layers).
    inputs: Vec<Option<Tensor<B, 2>>>,
}

impl<B: Backend> PrefixCache<B> {
    /// The dense model's streams for every batch.
    fn new(model: &Llama<B>, windows: &[Vec<u32>], batch_size: usize) -> Result<Self> {
        let n = model.shape().n_layers();
        let seq = windows[0].len();
        let mut batches = Vec::new();
        let mut streams = Vec::new();
        for rows in windows.chunks(batch_size) {
            let tokens = model.tokens(rows)?;
            streams.push(model.embed(tokens.clone()));
            batches.push(CachedBatch {
                stepper: model.stepper(rows.len(), seq),
                inputs: vec![None; n],
                rows: rows.len(),
                tokens,
            });
        }
        let mut cache = Self {
            batches,
            windows: windows.len(),
        };
        cache.refill(model, &[], 0, streams)?;
        Ok(cache)
    }

    /// Runs the kept layers from `from` on over every batch, storing the stream entering each.
    fn refill(
        &mut self,
        model: &Llama<B>,
        removed: &[usize],
        from: usize,
        streams: Vec<Tensor<B, 2>>,
    ) -> Result<()> {
        let steppers: Vec<_> = self.batches.iter().map(|b| &b.stepper).collect();
        let mut entering: Vec<(usize, usize, Tensor<B, 2>)> = Vec::new();
        run_kept(&steppers, model, removed, from, streams, |k, i, x| {
            entering.push((k, i, x.clone()))
        })?;
        for (k, i, x) in entering {
            self.batches[k].inputs[i] = Some(x);
        }
        Ok(())
    }

    /// Mean calibration loss with `removed` and `extra` gone: each batch starts from the stream
    /// entering `extra` and runs the kept layers after it.
    fn loss_without(&self, model: &Llama<B>, removed: &[usize], extra: usize) -> Result<f64> {
        let streams = self
            .batches
            .iter()
            .map(|b| {
                b.inputs[extra]
                    .clone()
                    .expect("a candidate layer is not removed")
            })
            .collect();
        let steppers: Vec<_> = self.batches.iter().map(|b| &b.stepper).collect();
        let out = run_kept(&steppers, model, removed, extra + 1, streams, |_, _, _| {})?;
        let mut sum = 0.0;
        for (b, x) in self.batches.iter().zip(out) {
            sum += lopper_model::mean_of(model.stream_nll(x, b.tokens.clone()))? * b.rows as f64;
        }
        Ok(sum / self.windows as f64)
    }

    /// `layer` is now removed (it is the last entry of `removed`): recompute the streams after it.
    fn remove(&mut self, model: &Llama<B>, removed: &[usize], layer: usize) -> Result<()> {
        let streams = self
            .batches
            .iter_mut()
            .map(|b| b.inputs[layer].take().expect("the layer was kept"))
            .collect();
        self.refill(model, removed, layer + 1, streams)
    }
}

/// The streams leaving the last layer, from `streams[k]` (batch `k`, run by `steppers[k]`)
/// entering layer `from` through every later layer not in `removed`; `on_input(k, i, x)` sees
/// the stream of batch `k` entering each layer `i` run. Layer by layer over all batches, so an
/// offloaded layer is read once.
fn run_kept<B: Backend>(
    steppers: &[&lopper_model::LayerStepper<B>],
    model: &Llama<B>,
    removed: &[usize],
    from: usize,
    mut streams: Vec<Tensor<B, 2>>,
    mut on_input: impl FnMut(usize, usize, &Tensor<B, 2>),
) -> Result<Vec<Tensor<B, 2>>> {
    for i in (from..model.shape().n_layers()).filter(|i| !removed.contains(i)) {
        let layer = model.layer(i)?;
        for (k, (stepper, x)) in steppers.iter().zip(&mut streams).enumerate() {
            on_input(k, i, x);
            *x = stepper.forward(&layer, x.clone(), |_, _| {});
        }
    }
    Ok(streams)
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_prefix_cache_takes_at_most_half_the_memory() {
        assert!(super::prefix_cache_fits(100, Some(200)));
        assert!(!super::prefix_cache_fits(101, Some(200)));
        assert!(super::prefix_cache_fits(u64::MAX, None));
    }
}
