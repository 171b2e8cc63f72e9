//! Unit scores from the least-squares cut's own objective: what removing each KV group and MLP
//! channel costs once the rest of its projection is refit (ZipLM's and SlimGPT's criterion),
//! made comparable across layers, so that a global allocation can give every layer its width.
//!
//! For each `o_proj` and `down_proj`, with `A = [X 1]` its inputs over the dense model's
//! calibration tokens and `theta0` its dense weights, greedy Optimal Brain Surgeon removal
//! ([`crate::structured`]'s `obs_order`, on the target `A theta0`) removes every unit of the
//! projection in turn (a KV group as its query heads' columns, a channel alone), each time the
//! one whose removal, with the remaining weights refit, raises
//! `||A theta - A theta0||^2 + lambda ||W - W0||^2` least. The `t`-th removal's cost `c_t` is
//! divided by the energy of the dense residual stream after the layer (`sum ||r||^2` over the
//! same tokens: every block writes into that stream, and the next norm sees its relative
//! change) and by the unit's parameter count. A unit's score is the running maximum of those
//! over its projection's order up to its own removal, so the order within a projection is kept
//! by any threshold, and ranking every unit of the model by score (the `global-params`
//! allocation) removes, at each step, the unit with the least refit cost per parameter.
//!
//! Layers are processed one at a time, each batch's residual stream kept between them, so one
//! layer's Gram matrices are held at a time.

use burn::tensor::backend::Backend;
use faer::Mat;
use lopper_core::{PruneUnit, UnitScores};
use lopper_model::{Llama, Tap};

use crate::proxy::{add_gram, theta_of};
use crate::structured::Stats;
use crate::{Error, Result, host_mat};

/// Scores every KV group and MLP channel of the dense `model` by its refit cost (module docs),
/// over `windows` in batches of `batch_size`, with the least-squares cut's damping `damp`.
/// `on_layer(layer, layers)` is called as each layer finishes.
pub fn obs_scores<B: Backend>(
    model: &Llama<B>,
    windows: &[Vec<u32>],
    batch_size: usize,
    damp: f64,
    mut on_layer: impl FnMut(usize, usize),
) -> Result<UnitScores> {
    if windows.is_empty() || batch_size == 0 {
        return Err(Error::Invalid(
            "OBS scores need calibration windows and a batch size of at least 1".into(),
        ));
    }
    if !(damp.is_finite() && damp > 0.0) {
        return Err(Error::Invalid(format!(
            "OBS scores: the damping must be a positive number, got {damp}"
        )));
    }
    let shape = model.shape().clone();
    let n = shape.n_layers();
    let mut streams = Vec::new();
    for batch in windows.chunks(batch_size) {
        let t = model.tokens(batch)?;
        let [b, seq] = t.dims();
        streams.push((model.stepper(b, seq), model.embed(t)));
    }
    let mut scores = UnitScores {
        method: "obs".into(),
        kv_groups: shape
            .layers
            .iter()
            .map(|l| vec![0.0; l.n_kv_heads])
            .collect(),
        channels: shape
            .layers
            .iter()
            .map(|l| vec![0.0; l.ffn_hidden])
            .collect(),
    };
    for l in 0..n {
        let layer = model.layer(l)?;
        let layer = &*layer;
        // [X 1]^T [X 1] of o_proj's and down_proj's inputs, and the residual energy after.
        let mut grams: [Option<Mat<f64>>; 2] = [None, None];
        let mut energy = 0.0;
        let mut failed = None;
        for (stepper, x) in &mut streams {
            let out = stepper.forward(layer, layer.on_device(x.clone()), |tap, t| {
                let slot = match tap {
                    Tap::OProjInput => 0,
                    Tap::DownProjInput => 1,
                    _ => return,
                };
                if failed.is_some() {
                    return;
                }
                match host_mat(t.clone(), false) {
                    Ok(x) => {
                        let (rows, k) = (x.nrows(), x.ncols());
                        let a =
                            Mat::from_fn(rows, k + 1, |r, j| if j < k { x[(r, j)] } else { 1.0 });
                        add_gram(
                            grams[slot].get_or_insert_with(|| Mat::zeros(k + 1, k + 1)),
                            &a,
                        );
                    }
                    Err(e) => failed = Some(e),
                }
            });
            if let Some(e) = failed.take() {
                return Err(e);
            }
            energy += lopper_model::mean_of(out.clone() * out.clone())?
                * out.dims().iter().product::<usize>() as f64;
            *x = out;
        }
        let energy = energy.max(f64::MIN_POSITIVE);
        let src = shape.layers[l];
        if let (Some(a), Some(g)) = (&layer.self_attn, grams[0].take()) {
            let width = src.n_rep() * src.head_dim;
            let groups: Vec<Vec<usize>> = (0..src.n_kv_heads)
                .map(|g| (g * width..(g + 1) * width).collect())
                .collect();
            let params = shape
                .unit_cost(PruneUnit::KvGroup { layer: l, group: 0 }, 0)
                .params as f64;
            let theta0 = theta_of(&a.o_proj)?;
            let stats = Stats::dense_target(g, &theta0);
            let (order, costs) = stats.obs_order(
                &theta0,
                damp,
                &groups,
                groups.len(),
                &format!("layer {l} o_proj (OBS scores)"),
            )?;
            place(&mut scores.kv_groups[l], &order, &costs, energy * params);
        }
        if let (Some(m), Some(g)) = (&layer.mlp, grams[1].take()) {
            let groups: Vec<Vec<usize>> = (0..src.ffn_hidden).map(|c| vec![c]).collect();
            let params = shape
                .unit_cost(PruneUnit::Channel { layer: l, index: 0 }, 0)
                .params as f64;
            let theta0 = theta_of(&m.down_proj)?;
            let stats = Stats::dense_target(g, &theta0);
            let (order, costs) = stats.obs_order(
                &theta0,
                damp,
                &groups,
                groups.len(),
                &format!("layer {l} down_proj (OBS scores)"),
            )?;
            place(&mut scores.channels[l], &order, &costs, energy * params);
        }
        on_layer(l + 1, n);
    }
    scores
        .check(&shape)
        .map_err(|e| Error::Invalid(e.to_string()))?;
    Ok(scores)
}

/// Writes the scores of one projection's removal `order`: the running maximum of `cost / scale`,
/// strictly increasing, so that the order survives any threshold.
fn place(out: &mut [f64], order: &[usize], costs: &[f64], scale: f64) {
    let mut run = 0.0_f64;
    for (&u, &c) in order.iter().zip(costs) {
        let c = if c.is_finite() { c / scale } else { f64::MAX };
        run = c.max(run.next_up());
        out[u] = run;
    }
}

#[cfg(test)]
mod tests {
    use super::place;

    #[test]
    fn scores_keep_each_projections_removal_order() {
        let mut s = vec![0.0; 4];
        // Removed 2, 0, 3, 1 with costs that dip: the later removal never scores lower.
        place(&mut s, &[2, 0, 3, 1], &[4.0, 2.0, 8.0, f64::INFINITY], 2.0);
        assert_eq!(s[2], 2.0);
        assert!(s[0] > 2.0 && s[0] < 2.0 + 1e-12);
        assert_eq!(s[3], 4.0);
        assert_eq!(s[1], f64::MAX);
    }
}
