use burn::module::Param;
use burn::tensor::{Tensor, TensorData};
use burn_flex::Flex;

use super::*;
use lopper_core::ModelShape;

type B = Flex;
const D: burn_flex::FlexDevice = burn_flex::FlexDevice;

fn windows() -> Vec<Vec<u32>> {
    (0..3)
        .map(|r| {
            (0..9)
                .map(|t| ((t * 13 + r * 7 + 1) % 128) as u32)
                .collect()
        })
        .collect()
}

#[test]
fn wanda_sp_matches_a_hand_computation_from_the_taps() {
    let model = Llama::<B>::random(&ModelShape::tiny(), 3, &D).unwrap();
    let s = wanda_sp(&model, &windows(), 2).unwrap();
    // Recompute layer 1 by hand: collect the taps of one full batch, then the formula.
    let t = model.tokens(&windows()).unwrap();
    let mut o_in = None;
    let mut d_in = None;
    model
        .forward_tapped(t, None, |i, p, x| {
            if i == 1 {
                let v: Vec<f32> = x.clone().into_data().to_vec().unwrap();
                match p {
                    Tap::OProjInput => o_in = Some(v),
                    Tap::DownProjInput => d_in = Some(v),
                    _ => {}
                }
            }
        })
        .unwrap();
    let (o_in, d_in) = (o_in.unwrap(), d_in.unwrap());
    let n = 27; // tokens
    let a = model.layers[1].self_attn.as_ref().unwrap();
    let wo: Vec<f32> = a.o_proj.weight.val().into_data().to_vec().unwrap(); // [32 in, 32 out]
    let (hidden, width) = (32, 32);
    let col = |j: usize| -> f64 {
        let msq = (0..n)
            .map(|r| (o_in[r * width + j] as f64).powi(2))
            .sum::<f64>()
            / n as f64;
        let wabs = (0..hidden)
            .map(|o| wo[j * hidden + o].abs() as f64)
            .sum::<f64>()
            / hidden as f64;
        wabs * msq.sqrt()
    };
    // Group 1 = query heads 2, 3 (head_dim 8): columns 16..32, mean over the 2 heads.
    let want = (16..32).map(col).sum::<f64>() / 2.0;
    assert!(
        (s.kv_groups[1][1] - want).abs() < 1e-4 * want.abs(),
        "{} vs {want}",
        s.kv_groups[1][1]
    );
    let m = model.layers[1].mlp.as_ref().unwrap();
    let wd: Vec<f32> = m.down_proj.weight.val().into_data().to_vec().unwrap(); // [48, 32]
    let c = 5;
    let msq = (0..n)
        .map(|r| (d_in[r * 48 + c] as f64).powi(2))
        .sum::<f64>()
        / n as f64;
    let wabs = (0..hidden)
        .map(|o| wd[c * hidden + o].abs() as f64)
        .sum::<f64>()
        / hidden as f64;
    let want = wabs * msq.sqrt();
    assert!(
        (s.channels[1][c] - want).abs() < 1e-4 * want,
        "{} vs {want}",
        s.channels[1][c]
    );
    s.check(model.shape()).unwrap();
}

#[test]
fn magnitude_scores_a_hand_built_channel() {
    let mut model = Llama::<B>::random(&ModelShape::tiny(), 3, &D).unwrap();
    // Channel 2 of layer 0: gate row all 1, up row all 2, down column all -1 (hidden 32).
    let m = model.layers[0].mlp.as_mut().unwrap();
    let set = |p: &mut Param<Tensor<B, 2>>, dim: usize, v: f32| {
        let w = p.val();
        let dims = w.dims();
        let mut data: Vec<f32> = w.into_data().to_vec().unwrap();
        for r in 0..dims[0] {
            for c in 0..dims[1] {
                if (dim == 1 && c == 2) || (dim == 0 && r == 2) {
                    data[r * dims[1] + c] = v;
                }
            }
        }
        *p = Param::from_tensor(Tensor::from_data(TensorData::new(data, dims), &D));
    };
    set(&mut m.gate_proj.weight, 1, 1.0);
    set(&mut m.up_proj.weight, 1, 2.0);
    set(&mut m.down_proj.weight, 0, -1.0);
    let l1 = magnitude(&model, Norm::L1).unwrap();
    assert!((l1.channels[0][2] - 32.0 * (1.0 + 2.0 + 1.0)).abs() < 1e-4);
    let l2 = magnitude(&model, Norm::L2).unwrap();
    assert!((l2.channels[0][2] - (32.0f64 * (1.0 + 4.0 + 1.0)).sqrt()).abs() < 1e-4);
}

#[test]
fn no_calibration_data_is_an_error() {
    let model = Llama::<B>::random(&ModelShape::tiny(), 3, &D).unwrap();
    assert!(
        wanda_sp(&model, &[], 2)
            .unwrap_err()
            .to_string()
            .contains("calibration")
    );
}

/// The o_proj / down_proj inputs of every layer on `windows` (one batch): (layer, tap, values,
/// width).
fn taps(model: &Llama<B>, windows: &[Vec<u32>]) -> Vec<(usize, Tap, Vec<f32>, usize)> {
    let mut out = Vec::new();
    model
        .forward_tapped(model.tokens(windows).unwrap(), None, |i, p, x| {
            let [_, w] = x.dims();
            out.push((i, p, x.clone().into_data().to_vec().unwrap(), w));
        })
        .unwrap();
    out
}

fn column(x: &[f32], w: usize, c: usize) -> Vec<f64> {
    (0..x.len() / w).map(|r| x[r * w + c] as f64).collect()
}

fn mean_var(v: &[f64]) -> (f64, f64) {
    let n = v.len() as f64;
    let m = v.iter().sum::<f64>() / n;
    (
        m,
        v.iter().map(|x| (x - m).powi(2)).sum::<f64>() / (n - 1.0),
    )
}

#[test]
fn flap_matches_a_hand_computation_from_the_taps() {
    let model = Llama::<B>::random(&ModelShape::tiny(), 5, &D).unwrap();
    // Batches of 2 windows: the per-batch moments must merge into the whole-set ones.
    let f = flap(&model, &windows(), 2).unwrap();
    let t = taps(&model, &windows());
    let (_, _, o_in, w) = t
        .iter()
        .find(|x| x.0 == 2 && x.1 == Tap::OProjInput)
        .unwrap();
    let a = model.layers[2].self_attn.as_ref().unwrap();
    let wo: Vec<f32> = a.o_proj.weight.val().into_data().to_vec().unwrap(); // [32 in, 32 out]
    let cols: Vec<f64> = (0..*w)
        .map(|j| {
            let (_, var) = mean_var(&column(o_in, *w, j));
            let wsq: f64 = (0..32).map(|o| (wo[j * 32 + o] as f64).powi(2)).sum();
            (var * wsq).powi(2)
        })
        .collect();
    let z = standardise(&cols);
    // Group 0 = query heads 0, 1 = columns 0..16 (head_dim 8): their mean.
    let want = z[..16].iter().sum::<f64>() / 16.0;
    assert!(
        (f.scores.kv_groups[2][0] - want).abs() < 1e-4,
        "{} vs {want}",
        f.scores.kv_groups[2][0]
    );
    // Standardised: each layer's columns have mean 0, so the two groups' means cancel.
    assert!((f.scores.kv_groups[2][0] + f.scores.kv_groups[2][1]).abs() < 1e-6);
    let (_, _, d_in, wd) = t
        .iter()
        .find(|x| x.0 == 0 && x.1 == Tap::DownProjInput)
        .unwrap();
    let m = model.layers[0].mlp.as_ref().unwrap();
    let wdn: Vec<f32> = m.down_proj.weight.val().into_data().to_vec().unwrap(); // [48, 32]
    let ch: Vec<f64> = (0..*wd)
        .map(|c| {
            let (_, var) = mean_var(&column(d_in, *wd, c));
            var * (0..32)
                .map(|o| (wdn[c * 32 + o] as f64).powi(2))
                .sum::<f64>()
        })
        .collect();
    let z = standardise(&ch);
    for c in [0, 7, 47] {
        assert!((f.scores.channels[0][c] - z[c]).abs() < 1e-4);
    }
    // Means for the compensation are the plain column means.
    let (mean, _) = mean_var(&column(d_in, *wd, 9));
    assert!((f.means.1[0][9] - mean).abs() < 1e-5);
}

#[test]
fn standardise_gives_zero_mean_unit_std() {
    let z = standardise(&[1.0, 2.0, 3.0, 10.0]);
    let (m, v) = mean_var(&z);
    assert!(m.abs() < 1e-12 && (v - 1.0).abs() < 1e-12);
    assert_eq!(standardise(&[4.0, 4.0]), vec![0.0, 0.0]);
}

#[test]
fn flap_bias_compensation_keeps_each_projection_output_mean() {
    let model = Llama::<B>::random(&ModelShape::tiny(), 6, &D).unwrap();
    let w = windows();
    let mp = method_plan(
        &model,
        &w,
        Method::Flap,
        0.5,
        &MethodSettings::default(),
        |_| {},
    )
    .unwrap();
    assert_eq!(mp.plan.meta["allocation"], "global-params");
    let means = mp.compensation.expect("FLAP compensates by default");
    let pruned = lopper_surgery::prune_compensated(
        &model,
        &mp.plan,
        &lopper_surgery::InputMeans {
            o_proj: means.0,
            down_proj: means.1,
        },
    )
    .unwrap();
    let out_mean = |lin: &burn::nn::Linear<B>, x: &[f32], w: usize, cols: &[usize]| -> Vec<f64> {
        let rows = x.len() / w;
        let xs: Vec<f32> = (0..rows)
            .flat_map(|r| cols.iter().map(move |&c| x[r * w + c]))
            .collect();
        let t = Tensor::<B, 2>::from_data(TensorData::new(xs, [rows, cols.len()]), &D);
        let y: Vec<f32> = lin.forward(t).mean_dim(0).into_data().to_vec().unwrap();
        y.into_iter().map(f64::from).collect()
    };
    let mut checked = 0;
    // Pruned layers are renumbered when a layer goes; the tiny plan keeps all three.
    assert_eq!(mp.plan.kept_layers().len(), 3);
    for (i, p, x, w) in taps(&model, &w) {
        let (lp, ls) = (&mp.plan.layers[i], &mp.plan.source.layers[i]);
        let (dense, small, kept) = match p {
            Tap::OProjInput if !lp.kv_groups.is_empty() => (
                &model.layers[i].self_attn.as_ref().unwrap().o_proj,
                &pruned.layers[i].self_attn.as_ref().unwrap().o_proj,
                lp.kv_groups
                    .iter()
                    .flat_map(|&g| g * ls.n_rep() * 8..(g + 1) * ls.n_rep() * 8)
                    .collect::<Vec<_>>(),
            ),
            Tap::DownProjInput if !lp.channels.is_empty() => (
                &model.layers[i].mlp.as_ref().unwrap().down_proj,
                &pruned.layers[i].mlp.as_ref().unwrap().down_proj,
                lp.channels.clone(),
            ),
            _ => continue,
        };
        let all: Vec<usize> = (0..w).collect();
        let (a, b) = (out_mean(dense, &x, w, &all), out_mean(small, &x, w, &kept));
        let d = a
            .iter()
            .zip(&b)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f64::max);
        assert!(d < 1e-5, "layer {i} {p:?}: output means differ by {d}");
        checked += 1;
    }
    assert!(checked >= 4, "only {checked} projections checked");
}

#[test]
fn random_scores_are_seeded() {
    let s = ModelShape::tiny();
    assert_eq!(random(&s, 1), random(&s, 1));
    assert_ne!(random(&s, 1), random(&s, 2));
    random(&s, 1).check(&s).unwrap();
}

#[test]
fn block_influence_matches_the_hidden_state_cosines() {
    let model = Llama::<B>::random(&ModelShape::tiny(), 7, &D).unwrap();
    let bi = block_influence(&model, &windows(), 2).unwrap();
    let mut hs: Vec<Vec<f32>> = Vec::new();
    model
        .forward_with_hidden(model.tokens(&windows()).unwrap(), None, |_, h| {
            hs.push(h.clone().into_data().to_vec().unwrap())
        })
        .unwrap();
    let hidden = 32;
    for l in 0..3 {
        let (a, b) = (&hs[l], &hs[l + 1]);
        let rows = a.len() / hidden;
        let cos: f64 = (0..rows)
            .map(|r| {
                let (x, y) = (
                    &a[r * hidden..(r + 1) * hidden],
                    &b[r * hidden..(r + 1) * hidden],
                );
                let dot: f64 = x.iter().zip(y).map(|(p, q)| *p as f64 * *q as f64).sum();
                let nx: f64 = x.iter().map(|p| (*p as f64).powi(2)).sum::<f64>().sqrt();
                let ny: f64 = y.iter().map(|p| (*p as f64).powi(2)).sum::<f64>().sqrt();
                dot / (nx * ny)
            })
            .sum::<f64>()
            / rows as f64;
        assert!(
            (bi[l] - (1.0 - cos)).abs() < 1e-5,
            "layer {l}: {} vs {}",
            bi[l],
            1.0 - cos
        );
    }
    assert_eq!(block_influence_order(&[0.3, 0.1, 0.2]), vec![1, 2, 0]);
}

fn six_layers() -> Llama<B> {
    let mut s = ModelShape::tiny();
    s.layers = vec![s.layers[0]; 6];
    Llama::<B>::random(&s, 8, &D).unwrap()
}

#[test]
fn sleb_removes_the_layer_whose_removal_hurts_least() {
    let model = six_layers();
    let w = windows();
    // keep 0.6 of 6 equal layers: 2 rounds (removing 33% is closest to 40%).
    let rounds = sleb(&model, &w, 2, 0.6, 1, |_| {}).unwrap();
    assert_eq!(rounds.len(), 2);
    // Round 1 by hand: the loss without each candidate (layers 1..=4), with surgery.
    let loss_without = |removed: &[usize]| {
        let units: Vec<lopper_core::PruneUnit> = removed
            .iter()
            .map(|&layer| lopper_core::PruneUnit::Layer { layer })
            .collect();
        let plan = lopper_core::MaskPlan::from_removed(model.shape(), &units).unwrap();
        let small = lopper_surgery::prune(&model, &plan).unwrap();
        small.mean_loss(small.tokens(&w).unwrap(), None).unwrap()
    };
    let (best, loss) = (1..5)
        .map(|l| (l, loss_without(&[l])))
        .min_by(|a, b| a.1.total_cmp(&b.1))
        .unwrap();
    assert_eq!(rounds[0].layer, best);
    assert!((rounds[0].loss - loss).abs() < 1e-4);
    assert!(
        rounds.iter().all(|r| r.layer != 0 && r.layer != 5),
        "barrier"
    );
    let second = loss_without(&[rounds[0].layer, rounds[1].layer]);
    assert!((rounds[1].loss - second).abs() < 1e-4);
    // The prefix cache changes no result: the uncached search (every trial from the
    // embeddings) gives the same rounds, with batches that do not divide the windows too.
    for batch in [2, 3] {
        let cached = sleb(&model, &w, batch, 0.6, 1, |_| {}).unwrap();
        let plain = crate::sleb_uncached(&model, &w, batch, 0.6, 1, |_| {}).unwrap();
        assert_eq!(cached.len(), plain.len());
        for (a, b) in cached.iter().zip(&plain) {
            assert_eq!(a.layer, b.layer);
            assert!((a.loss - b.loss).abs() < 1e-5, "{a:?} {b:?}");
        }
    }
}

#[test]
fn every_method_meets_its_sparsity() {
    let model = six_layers();
    let w = windows();
    let shape = model.shape().clone();
    for name in Method::NAMES {
        let m: Method = name.parse().unwrap();
        for keep in [0.5, 0.8] {
            // LLM-Pruner's protected first and last layers are tested on their own (layer
            // methods accept a skip of 0).
            let settings = MethodSettings {
                skip_layers: Some(0),
                ..MethodSettings::default()
            };
            let mp = method_plan(&model, &w, m, keep, &settings, |_| {}).unwrap();
            let p = &mp.plan;
            p.validate_against(&shape).unwrap();
            assert!(p.meta.contains_key("method") && p.meta.contains_key("allocation"));
            let ratio = p.kept_param_ratio();
            match m.default_allocation() {
                Some(lopper_core::Allocation::PerLayer) => {
                    // Exactly round(keep * n) of each type in every layer.
                    for lp in &p.layers {
                        assert_eq!(lp.kv_groups.len(), lopper_core::keep_count(keep, 2));
                        assert_eq!(lp.channels.len(), lopper_core::keep_count(keep, 48));
                    }
                }
                Some(_) => {
                    let group = shape
                        .unit_cost(lopper_core::PruneUnit::KvGroup { layer: 0, group: 0 }, 0)
                        .params as f64;
                    let gap = (ratio - keep).abs() * shape.decoder_linear_params() as f64;
                    assert!(
                        gap <= group / 2.0 + 1e-6,
                        "{name} keep {keep}: ratio {ratio}"
                    );
                }
                None => {
                    // Whole layers: the closest count of 6 equal layers.
                    let want = ((1.0 - keep) * 6.0_f64).round() as usize;
                    assert_eq!(6 - p.kept_layers().len(), want, "{name} keep {keep}");
                    assert!(mp.layer_values.is_some());
                }
            }
        }
    }
}

#[test]
fn bad_method_settings_are_refused() {
    let model = Llama::<B>::random(&ModelShape::tiny(), 3, &D).unwrap();
    let w = windows();
    let err = |m: Method, keep: f64, s: MethodSettings| {
        method_plan(&model, &w, m, keep, &s, |_| {})
            .unwrap_err()
            .to_string()
    };
    assert!(
        "obs"
            .parse::<Method>()
            .unwrap_err()
            .to_string()
            .contains("wanda-sp")
    );
    assert!(err(Method::WandaSp, 0.0, MethodSettings::default()).contains("sparsity"));
    let with_alloc = MethodSettings {
        allocation: Some(lopper_core::Allocation::Global),
        ..Default::default()
    };
    assert!(err(Method::Sleb, 0.5, with_alloc).contains("allocation"));
    let with_bias = MethodSettings {
        bias_compensation: Some(true),
        ..Default::default()
    };
    // Layer methods can be compensated: a removed layer's mean output goes to the previous kept
    // projection at surgery, so the means come back with the plan.
    let bi = method_plan(&model, &w, Method::BlockInfluence, 0.5, &with_bias, |_| {}).unwrap();
    assert!(bi.compensation.is_some());
    assert!(
        err(
            Method::Flap,
            0.5,
            MethodSettings {
                batch_size: 0,
                ..Default::default()
            }
        )
        .contains("batch")
    );
}
