//! Tests of the gradient-informed methods (LLM-Pruner, IFSO, MINI-LLM) and LLM-BIP's bound.

use burn::tensor::{Distribution, Tensor, TensorData};
use burn_flex::Flex;

use super::*;
use crate::gradient::{
    PerLinear, WINDOWS_PER_BACKWARD, linear_grads, linear_weights, mask_grads, spsa_gradient,
    with_linear_weights,
};
use lopper_core::{Allocation, ModelShape};
use lopper_model::LayerMasks;

type B = Flex;
const D: burn_flex::FlexDevice = burn_flex::FlexDevice;

fn windows() -> Vec<Vec<u32>> {
    (0..4)
        .map(|r| {
            (0..9)
                .map(|t| ((t * 13 + r * 7 + 1) % 128) as u32)
                .collect()
        })
        .collect()
}

fn tiny() -> Llama<B> {
    Llama::<B>::random(&ModelShape::tiny(), 5, &D).unwrap()
}

/// Host copy of a `[in, out]` tensor.
fn hv(t: &Tensor<B, 2>) -> Vec<f32> {
    t.clone().into_data().to_vec().unwrap()
}

/// Loss of `model` on all windows with one weight of linear `k` of `layer` moved by `h`.
fn loss_moved(model: &Llama<B>, layer: usize, k: usize, idx: usize, h: f32) -> f64 {
    let mut w = linear_weights(model).unwrap();
    let t = w[layer][k].take().unwrap();
    let dims = t.dims();
    let mut v = hv(&t);
    v[idx] += h;
    w[layer][k] = Some(Tensor::from_data(TensorData::new(v, dims), &D));
    let m = with_linear_weights(model, w, false);
    m.mean_loss(m.tokens(&windows()).unwrap(), None).unwrap()
}

/// `sum |w * g_fd|` over the listed weights `(linear, flat index)` of `layer`.
fn fd_score(model: &Llama<B>, layer: usize, weights: &[(usize, usize)]) -> f64 {
    let w = linear_weights(model).unwrap();
    let h = 1e-2;
    weights
        .iter()
        .map(|&(k, i)| {
            let wv = hv(w[layer][k].as_ref().unwrap())[i] as f64;
            let g = (loss_moved(model, layer, k, i, h) - loss_moved(model, layer, k, i, -h))
                / (2.0 * h as f64);
            (wv * g).abs()
        })
        .collect::<Vec<_>>()
        .iter()
        .sum()
}

#[test]
fn taylor_scores_equal_finite_difference_estimates() {
    let model = tiny();
    // Batches of 3 and 1 windows: the batch gradients are weighted into the full-set gradient.
    let s = llm_pruner(&model, &windows(), 3, Taylor::Element1).unwrap();
    let (hidden, ffn, layer) = (32, 48, 1);
    // Channel 7: gate and up columns 7 ([in, out] = [32, 48]), down row 7 ([48, 32]).
    let c = 7;
    let mut ws: Vec<(usize, usize)> = Vec::new();
    ws.extend((0..hidden).map(|i| (4, i * ffn + c)));
    ws.extend((0..hidden).map(|i| (5, i * ffn + c)));
    ws.extend((0..hidden).map(|o| (6, c * hidden + o)));
    let want = fd_score(&model, layer, &ws);
    let got = s.channels[layer][c];
    assert!(
        (got - want).abs() < 0.02 * want,
        "channel: autodiff {got} vs finite differences {want}"
    );
    // KV group 1: query heads 2, 3 (q columns and o rows 16..32), k / v columns 8..16.
    let mut ws: Vec<(usize, usize)> = Vec::new();
    for i in 0..hidden {
        ws.extend((16..32).map(|j| (0, i * 32 + j)));
        ws.extend((8..16).map(|j| (1, i * 16 + j)));
        ws.extend((8..16).map(|j| (2, i * 16 + j)));
    }
    ws.extend((16..32).flat_map(|j| (0..hidden).map(move |o| (3, j * hidden + o))));
    let want = fd_score(&model, layer, &ws);
    let got = s.kv_groups[layer][1];
    assert!(
        (got - want).abs() < 0.02 * want,
        "KV group: autodiff {got} vs finite differences {want}"
    );
}

#[test]
fn batch_gradients_accumulate_over_backward_chunks() {
    // Four windows are two backward passes; the result is the batch's mean-loss gradient, the
    // mean of the single-window gradients (equal lengths).
    let (model, w) = (tiny(), windows());
    assert!(w.len() > WINDOWS_PER_BACKWARD);
    let ad = gradient::autodiff_copy(&model, true).unwrap();
    let (loss, g) = linear_grads(&ad, &w, None).unwrap();
    let per: Vec<(f64, PerLinear<B>)> = w
        .chunks(1)
        .map(|x| linear_grads(&ad, x, None).unwrap())
        .collect();
    let mean_loss = per.iter().map(|p| p.0).sum::<f64>() / per.len() as f64;
    assert!(
        (loss - mean_loss).abs() < 1e-5 * mean_loss,
        "{loss} vs {mean_loss}"
    );
    for (layer, k) in [(0, 0), (0, 3), (1, 4), (1, 6)] {
        let got = hv(g[layer][k].as_ref().unwrap());
        let want: Vec<f32> = (0..got.len())
            .map(|i| {
                per.iter()
                    .map(|p| hv(p.1[layer][k].as_ref().unwrap())[i])
                    .sum::<f32>()
                    / per.len() as f32
            })
            .collect();
        let scale = want.iter().fold(0f32, |m, x| m.max(x.abs()));
        assert!(scale > 0.0);
        for (a, b) in got.iter().zip(&want) {
            assert!((a - b).abs() < 1e-4 * scale, "{layer}/{k}: {a} vs {b}");
        }
    }
    // The same for the gradients with respect to the unit masks (IFSO).
    let ad = gradient::autodiff_copy(&model, false).unwrap();
    let (kv, ch) = mask_grads(&ad, &w).unwrap();
    let per: Vec<_> = w.chunks(1).map(|x| mask_grads(&ad, x).unwrap()).collect();
    for l in 0..kv.len() {
        for (j, got) in kv[l].iter().enumerate() {
            let want = per.iter().map(|p| p.0[l][j]).sum::<f64>() / per.len() as f64;
            assert!(
                (got - want).abs() < 1e-4 * want.abs().max(1e-3),
                "kv {l}/{j}"
            );
        }
        assert_eq!(ch[l].len(), per[0].1[l].len());
        for (j, got) in ch[l].iter().enumerate() {
            let want = per.iter().map(|p| p.1[l][j]).sum::<f64>() / per.len() as f64;
            assert!(
                (got - want).abs() < 1e-4 * want.abs().max(1e-3),
                "ch {l}/{j}"
            );
        }
    }
}

#[test]
fn element2_adds_the_fisher_term_from_per_window_gradients() {
    let model = tiny();
    let s = llm_pruner(&model, &windows(), 2, Taylor::Element2).unwrap();
    // By hand: per-window gradients, their mean g and F = mean g_s^2; channel 3 of layer 0.
    let ad = gradient::autodiff_copy(&model, true).unwrap();
    let per: Vec<PerLinear<B>> = windows()
        .chunks(1)
        .map(|w| linear_grads(&ad, w, None).unwrap().1)
        .collect();
    let w = linear_weights(&model).unwrap();
    let (layer, c, hidden, ffn) = (0, 3, 32, 48);
    let mut want = 0.0;
    for (k, idx) in (0..hidden)
        .map(|i| (4, i * ffn + c))
        .chain((0..hidden).map(|i| (5, i * ffn + c)))
        .chain((0..hidden).map(|o| (6, c * hidden + o)))
    {
        let wv = hv(w[layer][k].as_ref().unwrap())[idx] as f64;
        let gs: Vec<f64> = per
            .iter()
            .map(|p| hv(p[layer][k].as_ref().unwrap())[idx] as f64)
            .collect();
        let g = gs.iter().sum::<f64>() / gs.len() as f64;
        let f = gs.iter().map(|x| x * x).sum::<f64>() / gs.len() as f64;
        want += (wv * g - 0.5 * wv * f * wv).abs();
    }
    let got = s.channels[layer][c];
    assert!((got - want).abs() < 1e-4 * want, "{got} vs {want}");
    let first = llm_pruner(&model, &windows(), 2, Taylor::Element1).unwrap();
    assert_ne!(first.channels, s.channels);
}

fn cosine(a: &PerLinear<B>, b: &PerLinear<B>) -> f64 {
    let (mut ab, mut aa, mut bb) = (0.0, 0.0, 0.0);
    for (x, y) in a.iter().zip(b) {
        for k in 0..7 {
            if let (Some(x), Some(y)) = (&x[k], &y[k]) {
                for (p, q) in hv(x).iter().zip(hv(y)) {
                    let (p, q) = (*p as f64, q as f64);
                    ab += p * q;
                    aa += p * p;
                    bb += q * q;
                }
            }
        }
    }
    ab / (aa.sqrt() * bb.sqrt())
}

#[test]
fn spsa_estimates_converge_to_the_true_gradient() {
    let model = tiny();
    let w = windows();
    // The true gradient of the mean loss (one batch of all windows) restricted to layer 2.
    let ad = gradient::autodiff_copy(&model, true).unwrap();
    let (_, mut truth) = linear_grads(&ad, &w, None).unwrap();
    truth[0] = Default::default();
    truth[1] = Default::default();
    let est = |samples| {
        let s = SpsaSettings {
            samples,
            eps: 1e-3,
            seed: 11,
        };
        spsa_gradient(&model, &w, 4, &s, Some(&[2])).unwrap()
    };
    let few = cosine(&est(8), &truth);
    let many = cosine(&est(2048), &truth);
    // 7,680 perturbed weights: the expected cosine is about sqrt(n / (n + 7680)).
    assert!(many > 0.3, "cosine with 2048 directions: {many}");
    assert!(
        many > 2.0 * few.abs(),
        "8 directions {few}, 2048 directions {many}"
    );
    // Seeded: the same seed gives the same estimate.
    assert!((cosine(&est(8), &est(8)) - 1.0).abs() < 1e-12);
}

#[test]
fn bip_bound_holds_on_random_inputs() {
    let model = tiny();
    let shape = model.shape().clone();
    let (b, seq) = (2, 9);
    let stepper = model.stepper(b, seq);
    for (l, scale) in [(0, 0.05), (1, 1.0), (2, 20.0)] {
        let layer = &model.layers[l];
        let ls = &shape.layers[l];
        let x = Tensor::<B, 2>::random([b * seq, 32], Distribution::Normal(0.0, scale), &D);
        let mut taps = Vec::new();
        let y = stepper.forward(layer, x.clone(), |p, v| taps.push((p, v.clone())));
        let terms = bip::block_terms(layer, ls, &x, &taps);
        let bound = hv(&terms.group_bound.unwrap());
        for g in 0..ls.n_kv_heads {
            let mut groups = vec![1.0; ls.n_kv_heads];
            groups[g] = 0.0;
            let masks = LayerMasks {
                heads: Some(LayerMasks::<B>::from_kv_groups(&groups, ls.n_rep(), &D)),
                ..LayerMasks::none()
            };
            let dy = stepper.forward_masked(layer, x.clone(), &masks) - y.clone();
            let exact = hv(&dy.powi_scalar(2).sum_dim(1).sqrt().reshape([b * seq, 1]));
            let mut tight = 0.0f64;
            for t in 0..b * seq {
                let u = bound[t * ls.n_kv_heads + g];
                assert!(
                    exact[t] <= u * (1.0 + 1e-4) + 1e-6,
                    "layer {l} group {g} token {t}: |dY| {} > bound {u}",
                    exact[t]
                );
                tight = tight.max((exact[t] / u) as f64);
            }
            assert!(tight > 0.0, "the bound is not vacuous-zero");
        }
        // Channels: the score is exact.
        let ch = hv(&terms.channel_sq.unwrap());
        let c = 11;
        let mut cm = vec![1.0f32; ls.ffn_hidden];
        cm[c] = 0.0;
        let masks = LayerMasks {
            channels: Some(Tensor::from_data(TensorData::new(cm, [ls.ffn_hidden]), &D)),
            ..LayerMasks::none()
        };
        let dy = stepper.forward_masked(layer, x.clone(), &masks) - y.clone();
        let exact = hv(&dy.powi_scalar(2).sum_dim(1).reshape([b * seq, 1]));
        // dY is the difference of two f32 forwards of size |Y|: compare norms, with a floor of
        // f32 rounding relative to |Y| (a channel whose removal changes Y by less than that
        // cannot be checked more closely).
        let y_norm = hv(&y
            .clone()
            .powi_scalar(2)
            .sum_dim(1)
            .sqrt()
            .reshape([b * seq, 1]));
        for t in 0..b * seq {
            let want = ch[t * ls.ffn_hidden + c];
            let (got, want_norm) = (exact[t].sqrt(), want.sqrt());
            assert!(
                (got - want_norm).abs() <= 1e-3 * want_norm + 1e-5 * y_norm[t],
                "channel {c} token {t}: |dY| {got} vs {want_norm} (|Y| {})",
                y_norm[t]
            );
        }
    }
}

#[test]
fn every_gradient_method_meets_its_sparsity() {
    let model = tiny();
    let shape = model.shape().clone();
    let settings = MethodSettings {
        batch_size: 2,
        spsa: SpsaSettings {
            samples: 2,
            ..SpsaSettings::default()
        },
        ..MethodSettings::default()
    };
    for method in [
        Method::LlmPruner,
        Method::LlmBip,
        Method::MiniLlm,
        Method::Ifso,
    ] {
        // LLM-Pruner keeps the first and last layers whole (2/3 of the tiny model): keep 0.8.
        let keep = if method == Method::LlmPruner {
            0.8
        } else {
            0.5
        };
        let mp = method_plan(&model, &windows(), method, keep, &settings, |_| {}).unwrap();
        let scores = mp.scores.as_ref().unwrap();
        scores.check(&shape).unwrap();
        let plan = &mp.plan;
        match method {
            Method::LlmPruner => {
                // First and last layers whole; the middle one loses what the model must lose.
                for l in [0, 2] {
                    assert_eq!(plan.layers[l].kv_groups.len(), 2);
                    assert_eq!(plan.layers[l].channels.len(), 48);
                }
                // keep' = 1 - 0.2 * 3 = 0.4 of the middle layer.
                assert_eq!(plan.layers[1].kv_groups.len(), 1);
                assert_eq!(plan.layers[1].channels.len(), 19);
                assert!(
                    (plan.kept_param_ratio() - 0.8).abs() < 0.05,
                    "{}",
                    plan.kept_param_ratio()
                );
            }
            Method::Ifso => {
                // Global parameter budget: within one KV group of the target.
                let group = 32.0 * 8.0 * 6.0;
                let pool = 3.0 * (2.0 * group + 48.0 * 96.0);
                assert!((plan.kept_param_ratio() - 0.5).abs() <= group / pool);
            }
            _ => {
                for l in 0..3 {
                    assert_eq!(plan.layers[l].kv_groups.len(), 1);
                    assert_eq!(plan.layers[l].channels.len(), 24);
                }
            }
        }
    }
    // The skip flag applies to every unit method.
    let s = MethodSettings {
        skip_layers: Some(1),
        allocation: Some(Allocation::PerLayer),
        ..settings.clone()
    };
    let mp = method_plan(&model, &windows(), Method::LlmBip, 0.8, &s, |_| {}).unwrap();
    assert_eq!(mp.plan.layers[0].channels.len(), 48);
    assert_eq!(mp.plan.layers[2].channels.len(), 48);
}

#[test]
fn bad_gradient_settings_are_clear_errors() {
    let model = tiny();
    let err = |m: Method, s: &MethodSettings, w: &[Vec<u32>]| {
        method_plan(&model, w, m, 0.5, s, |_| {})
            .unwrap_err()
            .to_string()
    };
    let base = MethodSettings::default();
    let e = err(
        Method::Ifso,
        &MethodSettings {
            ifso: IfsoSettings {
                lambda: -1e-4,
                ..IfsoSettings::default()
            },
            ..base.clone()
        },
        &windows(),
    );
    assert!(e.contains("lambda") && e.contains("positive"), "{e}");
    let e = err(
        Method::MiniLlm,
        &MethodSettings {
            spsa: SpsaSettings {
                samples: 0,
                ..SpsaSettings::default()
            },
            ..base.clone()
        },
        &windows(),
    );
    assert!(e.contains("at least one perturbation"), "{e}");
    let e = err(
        Method::MiniLlm,
        &MethodSettings {
            spsa: SpsaSettings {
                eps: 0.0,
                ..SpsaSettings::default()
            },
            ..base.clone()
        },
        &windows(),
    );
    assert!(e.contains("perturbation size"), "{e}");
    for m in [
        Method::LlmPruner,
        Method::LlmBip,
        Method::MiniLlm,
        Method::Ifso,
    ] {
        let e = err(m, &base, &[]);
        assert!(e.contains("at least one calibration window"), "{m:?}: {e}");
    }
    let e = err(
        Method::LlmPruner,
        &MethodSettings {
            skip_layers: Some(2),
            ..base.clone()
        },
        &windows(),
    );
    assert!(e.contains("nothing is left to prune"), "{e}");
    // Protecting too much for the budget.
    let e = method_plan(
        &model,
        &windows(),
        Method::LlmBip,
        0.2,
        &MethodSettings {
            skip_layers: Some(1),
            ..base.clone()
        },
        |_| {},
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("lower the sparsity"), "{e}");
}
