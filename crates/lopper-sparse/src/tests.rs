use faer::Mat;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::solve::*;
use super::*;

fn randn(rng: &mut ChaCha8Rng, r: usize, c: usize) -> Mat<f64> {
    Mat::from_fn(r, c, |_, _| {
        // Box-Muller.
        let (u, v): (f64, f64) = (rng.random::<f64>().max(1e-12), rng.random::<f64>());
        (-2.0 * u.ln()).sqrt() * (2.0 * std::f64::consts::PI * v).cos()
    })
}

/// A well-conditioned Gram matrix `X^T X` of `n` correlated samples.
fn gram(rng: &mut ChaCha8Rng, n: usize, d: usize) -> Mat<f64> {
    let x = randn(rng, n, d);
    let mix = randn(rng, d, d);
    let x = &x * &mix;
    x.transpose() * &x
}

fn zeros_of(w: &Mat<f64>) -> usize {
    (0..w.nrows())
        .flat_map(|i| (0..w.ncols()).map(move |j| (i, j)))
        .filter(|&(i, j)| w[(i, j)] == 0.0)
        .count()
}

/// The least-squares optimum on a fixed support, by the normal equations row by row:
/// `W[r, S] = (H_SS)^-1 (H W0^T)_S`.
fn optimum_on_support(
    w0: &Mat<f64>,
    h: &Mat<f64>,
    keep: &dyn Fn(usize, usize) -> bool,
) -> Mat<f64> {
    let (rows, cols) = (w0.nrows(), w0.ncols());
    let hw = h * w0.transpose();
    let mut w = Mat::zeros(rows, cols);
    for r in 0..rows {
        let s: Vec<usize> = (0..cols).filter(|&j| keep(r, j)).collect();
        let hs = Mat::from_fn(s.len(), s.len(), |a, b| h[(s[a], s[b])]);
        let rhs = Mat::from_fn(s.len(), 1, |a, _| hw[(s[a], r)]);
        let inv = {
            use faer::linalg::solvers::DenseSolveCore;
            hs.llt(faer::Side::Lower).unwrap().inverse()
        };
        let sol = &inv * &rhs;
        for (a, &j) in s.iter().enumerate() {
            w[(r, j)] = sol[(a, 0)];
        }
    }
    w
}

#[test]
fn n_m_projection_keeps_exactly_n_of_every_m() {
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    let w = randn(&mut rng, 6, 16);
    let h = gram(&mut rng, 64, 16);
    for (n, m) in [(2, 4), (4, 8), (1, 4)] {
        let p = Pattern::NM { n, m };
        for out in [
            magnitude(&w, p),
            wanda(&w, &h, p),
            sparsegpt(&w, &h, p, 0.01, 8).unwrap(),
        ] {
            for r in 0..6 {
                for g in (0..16).step_by(m) {
                    let nz = (g..g + m).filter(|&j| out[(r, j)] != 0.0).count();
                    assert_eq!(nz, n, "{n}:{m} row {r} group {g}");
                }
            }
        }
        let (a, _) = alps(&w, &h, p, &AlpsSettings::default()).unwrap();
        for r in 0..6 {
            for g in (0..16).step_by(m) {
                assert!((g..g + m).filter(|&j| a[(r, j)] != 0.0).count() <= n);
            }
        }
    }
    // The largest magnitudes of each group survive.
    let w = Mat::from_fn(1, 4, |_, j| [0.1, -3.0, 2.0, 0.5][j]);
    let out = magnitude(&w, Pattern::NM { n: 2, m: 4 });
    assert_eq!(
        (0..4).map(|j| out[(0, j)]).collect::<Vec<_>>(),
        vec![0.0, -3.0, 2.0, 0.0]
    );
}

#[test]
fn magnitude_and_wanda_hit_the_requested_sparsity_exactly() {
    let mut rng = ChaCha8Rng::seed_from_u64(2);
    let w = randn(&mut rng, 10, 20);
    let h = gram(&mut rng, 50, 20);
    for sp in [0.3, 0.5, 0.7] {
        let p = Pattern::Unstructured(sp);
        assert_eq!(zeros_of(&magnitude(&w, p)), (sp * 200.0).round() as usize);
        let wd = wanda(&w, &h, p);
        assert_eq!(zeros_of(&wd), 10 * (sp * 20.0).round() as usize);
        // Wanda's budget is per output row.
        for r in 0..10 {
            assert_eq!(
                (0..20).filter(|&j| wd[(r, j)] == 0.0).count(),
                (sp * 20.0).round() as usize
            );
        }
    }
    // Wanda weighs by the input norm: a large weight on a dead input goes first.
    let w = Mat::from_fn(1, 2, |_, j| [5.0, 1.0][j]);
    let h = Mat::from_fn(2, 2, |i, j| if i == j { [1e-4, 1.0][i] } else { 0.0 });
    let out = wanda(&w, &h, Pattern::Unstructured(0.5));
    assert_eq!((out[(0, 0)], out[(0, 1)]), (0.0, 1.0));
}

#[test]
fn conjugate_gradient_on_a_fixed_support_equals_the_direct_solve() {
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    let (nin, nout) = (12, 3);
    let h = gram(&mut rng, 60, nin);
    let b0 = randn(&mut rng, nin, nout);
    let rhs = &h * &b0;
    let keep: Vec<bool> = (0..nin * nout).map(|i| i % 3 != 0).collect();
    let mut b = Mat::zeros(nin, nout);
    cg_on_support(&h, &rhs, &mut b, &keep, 200, 1e-14);
    // Direct: per column, solve H_SS b_S = rhs_S.
    let w0 = b0.transpose().to_owned();
    let want = optimum_on_support(&w0, &h, &|r, j| keep[r * nin + j]);
    for i in 0..nin {
        for o in 0..nout {
            assert!(
                (b[(i, o)] - want[(o, i)]).abs() < 1e-6,
                "({i},{o}): {} vs {}",
                b[(i, o)],
                want[(o, i)]
            );
        }
    }
}

#[test]
fn admm_reaches_the_optimum_of_the_known_support() {
    // W0 already sparse: the optimum of min ||X W^T - X W0^T||^2 with W0's sparsity is W0 itself
    // on W0's support, which ADMM must find and keep.
    let mut rng = ChaCha8Rng::seed_from_u64(4);
    let (out, inp) = (4, 16);
    let dense = randn(&mut rng, out, inp);
    let w0 = Mat::from_fn(out, inp, |i, j| {
        if (i + j) % 2 == 0 {
            dense[(i, j)] * 3.0
        } else {
            0.0
        }
    });
    let h = gram(&mut rng, 200, inp);
    let s = AlpsSettings {
        damp: 0.0,
        ..AlpsSettings::default()
    };
    let (w, trace) = alps(&w0, &h, Pattern::Unstructured(0.5), &s).unwrap();
    assert!(trace.iterations >= 1);
    for i in 0..out {
        for j in 0..inp {
            assert!(
                (w[(i, j)] - w0[(i, j)]).abs() < 1e-6,
                "({i},{j}) {} vs {}",
                w[(i, j)],
                w0[(i, j)]
            );
        }
    }
    assert!(relative_error(&w, &w0, &h) < 1e-12);
    // On a dense target, ALPS's result is the least-squares optimum on its own support (the CG
    // refit converged) and beats magnitude pruning's reconstruction.
    let w0 = randn(&mut rng, out, inp);
    let s = AlpsSettings {
        damp: 0.0,
        cg_iter: 100,
        cg_rtol: 1e-12,
        ..AlpsSettings::default()
    };
    let (w, _) = alps(&w0, &h, Pattern::Unstructured(0.5), &s).unwrap();
    assert_eq!(zeros_of(&w), 32);
    let opt = optimum_on_support(&w0, &h, &|r, j| w[(r, j)] != 0.0);
    for i in 0..out {
        for j in 0..inp {
            assert!((w[(i, j)] - opt[(i, j)]).abs() < 1e-6);
        }
    }
    let e_alps = relative_error(&w, &w0, &h);
    let e_mag = relative_error(&magnitude(&w0, Pattern::Unstructured(0.5)), &w0, &h);
    assert!(e_alps < e_mag, "alps {e_alps} vs magnitude {e_mag}");
}

#[test]
fn sparsegpt_matches_a_direct_obs_sweep_on_a_tiny_layer() {
    // Reference: the OBS column sweep with explicit inverses, no Cholesky and no blocks. Column
    // j is fixed using the inverse of H over the columns not yet fixed, F_j = {j, j+1, ...}:
    // e = (w_j - q_j) / [H_Fj^-1]_00 and w_t -= e [H_Fj^-1]_(0, t-j); the group's mask is chosen
    // at its first column by w_c^2 / [H_Fc^-1]_00. SparseGPT reads all of these from one
    // Cholesky factor of H^-1 and updates lazily in blocks; the results must agree.
    use faer::linalg::solvers::DenseSolveCore;
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    let (rows, cols) = (3, 8);
    let w0 = randn(&mut rng, rows, cols);
    let h = gram(&mut rng, 40, cols);
    let hd = damped(&h, 0.01).unwrap();
    let inv_from = |j: usize| -> Mat<f64> {
        let sub = Mat::from_fn(cols - j, cols - j, |a, b| hd[(j + a, j + b)]);
        sub.llt(faer::Side::Lower).unwrap().inverse()
    };
    let invs: Vec<Mat<f64>> = (0..cols).map(inv_from).collect();
    for (pattern, m) in [
        (Pattern::NM { n: 1, m: 2 }, 2),
        (Pattern::NM { n: 2, m: 4 }, 4),
    ] {
        let Pattern::NM { n, .. } = pattern else {
            unreachable!()
        };
        // Block 3 does not align with the groups: lazy updates cross group boundaries.
        let got = sparsegpt(&w0, &h, pattern, 0.01, 3).unwrap();
        for r in 0..rows {
            let mut w: Vec<f64> = (0..cols).map(|j| w0[(r, j)]).collect();
            let mut keep = vec![true; cols];
            for j in 0..cols {
                if j % m == 0 {
                    let score: Vec<f64> =
                        (j..j + m).map(|c| w[c].powi(2) / invs[c][(0, 0)]).collect();
                    let mut order: Vec<usize> = (0..m).collect();
                    order.sort_by(|&a, &b| score[b].total_cmp(&score[a]).then(a.cmp(&b)));
                    for (rank, &o) in order.iter().enumerate() {
                        keep[j + o] = rank < n;
                    }
                }
                let q = if keep[j] { w[j] } else { 0.0 };
                let e = (w[j] - q) / invs[j][(0, 0)];
                for t in j + 1..cols {
                    w[t] -= e * invs[j][(0, t - j)];
                }
                w[j] = q;
            }
            for j in 0..cols {
                assert!(
                    (got[(r, j)] - w[j]).abs() < 1e-9,
                    "{pattern:?} ({r},{j}): {} vs {}",
                    got[(r, j)],
                    w[j]
                );
            }
        }
    }
    // Unstructured: the block's threshold is global over the block and the sparsity exact.
    let got = sparsegpt(&w0, &h, Pattern::Unstructured(0.5), 0.01, 4).unwrap();
    assert_eq!(zeros_of(&got), 12);
}

#[test]
fn patterns_and_methods_parse_with_clear_errors() {
    assert_eq!(
        Pattern::parse("2:4", 0.0).unwrap(),
        Pattern::NM { n: 2, m: 4 }
    );
    assert_eq!(Pattern::parse("unstructured", 0.7).unwrap().sparsity(), 0.7);
    assert!(
        Pattern::parse("4:2", 0.0)
            .unwrap_err()
            .to_string()
            .contains("N:M")
    );
    assert!(
        Pattern::parse("unstructured", 1.2)
            .unwrap_err()
            .to_string()
            .contains("sparsity")
    );
    assert!(
        "obs"
            .parse::<SparseMethod>()
            .unwrap_err()
            .to_string()
            .contains("alps")
    );
    let mut rng = ChaCha8Rng::seed_from_u64(6);
    let h = gram(&mut rng, 20, 6);
    assert!(
        damped(&h, -1.0)
            .unwrap_err()
            .to_string()
            .contains("damping")
    );
    let w = randn(&mut rng, 2, 6);
    let e = prune_matrix(
        &w,
        &h,
        SparseMethod::Wanda,
        Pattern::NM { n: 2, m: 4 },
        &SparseSettings::default(),
    );
    assert!(e.unwrap_err().to_string().contains("divide"));
}

#[test]
fn the_model_driver_prunes_every_linear_of_the_tiny_model() {
    type B = burn_flex::Flex;
    let model =
        Llama::<B>::random(&lopper_core::ModelShape::tiny(), 9, &burn_flex::FlexDevice).unwrap();
    let windows: Vec<Vec<u32>> = (0..4)
        .map(|r| {
            (0..16)
                .map(|t| ((t * 7 + r * 13 + 3) % 128) as u32)
                .collect()
        })
        .collect();
    let mut seen = 0;
    for method in [
        SparseMethod::Magnitude,
        SparseMethod::Wanda,
        SparseMethod::SparseGpt,
        SparseMethod::Alps,
    ] {
        let (pruned, reports) = prune_model(
            &model,
            &windows,
            method,
            Pattern::Unstructured(0.5),
            &SparseSettings {
                batch_size: 2,
                ..Default::default()
            },
            |_| seen += 1,
        )
        .unwrap();
        assert_eq!(reports.len(), 3 * 7);
        for r in &reports {
            assert!((r.sparsity - 0.5).abs() < 0.02, "{method:?} {r:?}");
            assert!(r.rel_error.is_finite() && r.rel_error > 0.0);
        }
        // The pruned model has the dense shape and runs.
        assert_eq!(pruned.shape(), model.shape());
        let t = pruned.tokens(&windows).unwrap();
        assert!(pruned.mean_loss(t, None).unwrap().is_finite());
        if method == SparseMethod::Alps {
            // Reconstruction-aware solvers beat magnitude on every linear of the first layer.
            let (_, mag) = prune_model(
                &model,
                &windows,
                SparseMethod::Magnitude,
                Pattern::Unstructured(0.5),
                &SparseSettings {
                    batch_size: 2,
                    ..Default::default()
                },
                |_| {},
            )
            .unwrap();
            for (a, m) in reports.iter().zip(&mag).take(7) {
                assert!(
                    a.rel_error <= m.rel_error + 1e-9,
                    "{} {} vs {}",
                    a.name,
                    a.rel_error,
                    m.rel_error
                );
            }
        }
    }
    assert_eq!(seen, 4 * 21);
    assert!(
        prune_model(
            &model,
            &[],
            SparseMethod::Wanda,
            Pattern::Unstructured(0.5),
            &SparseSettings::default(),
            |_| {}
        )
        .is_err()
    );
}

mod structured {
    use burn::module::Param;
    use burn::tensor::{ElementConversion, Tensor};
    use lopper_core::{MaskPlan, ModelShape, PruneUnit};

    use crate::structured::{
        Chosen, InputRefit, ProjectionReport, ReconSettings, input_refits, projections, reconstruct,
    };
    use lopper_model::Llama;

    pub(super) type B = burn_flex::Flex;

    pub(super) fn windows(n: usize, len: usize) -> Vec<Vec<u32>> {
        (0..n)
            .map(|r| {
                (0..len)
                    .map(|t| ((t * 7 + r * 13 + t * t * 3 + r * r) % 128) as u32)
                    .collect()
            })
            .collect()
    }

    fn max_diff(a: Tensor<B, 3>, b: Tensor<B, 3>) -> (f32, f32) {
        let scale: f32 = b.clone().abs().max().into_scalar().elem();
        let d: f32 = (a - b).abs().max().into_scalar().elem();
        (d, scale)
    }

    pub(super) fn model() -> Llama<B> {
        Llama::<B>::random(&ModelShape::tiny(), 9, &burn_flex::FlexDevice).unwrap()
    }

    /// Copies `from`'s columns `src` over `dst` in a burn `[in, out]` weight.
    fn copy_cols(p: &mut Param<Tensor<B, 2>>, src: std::ops::Range<usize>, dst: usize) {
        let w = p.val();
        let block = w.clone().narrow(1, src.start, src.len());
        let rows = w.dims()[0];
        *p = Param::from_tensor(w.slice_assign([0..rows, dst..dst + src.len()], block));
    }

    /// The tiny model with two removals its dense inputs make redundant, and the plan that
    /// removes them. Layer 1: KV group 1 (query heads 2, 3; KV head 1) computes what group 0
    /// computes, so removing it is exactly undone by o_proj. Layer 2: channel 5 copies channel 3.
    pub(super) fn redundant() -> (Llama<B>, MaskPlan) {
        let mut model = model();
        {
            let a = model.layers[1].self_attn.as_mut().unwrap();
            copy_cols(&mut a.q_proj.weight, 0..16, 16);
            copy_cols(&mut a.k_proj.weight, 0..8, 8);
            copy_cols(&mut a.v_proj.weight, 0..8, 8);
            let m = model.layers[2].mlp.as_mut().unwrap();
            copy_cols(&mut m.gate_proj.weight, 3..4, 5);
            copy_cols(&mut m.up_proj.weight, 3..4, 5);
        }
        let removed = [
            PruneUnit::KvGroup { layer: 1, group: 1 },
            PruneUnit::Channel { layer: 2, index: 5 },
        ];
        let plan = MaskPlan::from_removed(model.shape(), &removed).unwrap();
        (model, plan)
    }

    #[test]
    fn a_plan_that_keeps_everything_gives_the_dense_model() {
        let model = model();
        let w = windows(4, 16);
        let plan = MaskPlan::from_removed(model.shape(), &[]).unwrap();
        let (out, _, reports) =
            reconstruct(&model, &plan, &w, &ReconSettings::default(), |_| {}).unwrap();
        assert!(reports.is_empty());
        let t = model.tokens(&w).unwrap();
        let (d, _) = max_diff(out.forward(t.clone()), model.forward(t));
        assert_eq!(d, 0.0);
    }

    #[test]
    fn least_squares_recovers_an_exactly_reachable_target() {
        let (model, plan) = redundant();
        let w = windows(8, 16);
        let s = ReconSettings {
            batch_size: 3,
            damp: 1e-9,
            ..ReconSettings::default()
        };
        let (ls, _, reports) = reconstruct(&model, &plan, &w, &s, |_| {}).unwrap();
        let t = model.tokens(&w).unwrap();
        let dense = model.forward(t.clone());
        let (d_ls, scale) = max_diff(ls.forward(t.clone()), dense.clone());
        let cut = lopper_surgery::prune(&model, &plan).unwrap();
        let (d_cut, _) = max_diff(cut.forward(t), dense);
        assert!(d_ls / scale < 1e-6, "ls {d_ls} of {scale}");
        assert!(
            d_cut / scale > 1e-3,
            "the cut alone must differ: {d_cut} of {scale}"
        );
        // Both refit projections hit their targets; the bias alone cannot.
        // (Layer 1's down_proj is refit too: only f32 rounding separates its inputs.)
        for r in &reports {
            assert!(r.rel_error_ls < 1e-9, "{r:?}");
            assert_eq!(r.chosen, Chosen::LeastSquares);
        }
        for (layer, name) in [(1, "o_proj"), (2, "down_proj")] {
            let r = reports
                .iter()
                .find(|r| r.layer == layer && r.name == name)
                .unwrap();
            assert!(r.rel_error_bias > 1e-4, "{r:?}");
        }
    }

    #[test]
    fn obs_removes_the_redundant_units_instead_of_the_plans_choice() {
        let mut model = model();
        // Layer 1: KV group 1 (query heads 2, 3; o_proj inputs 16..32) adds nothing to the
        // residual. Layer 2: channel 5 copies channel 3, so removing either is undone by
        // down_proj. The plan removes KV group 0 and channel 0, which carry their own signal.
        {
            let o = &mut model.layers[1].self_attn.as_mut().unwrap().o_proj.weight;
            let w = o.val();
            let cols = w.dims()[1];
            let zeros = Tensor::zeros([16, cols], &w.device());
            *o = Param::from_tensor(w.slice_assign([16..32, 0..cols], zeros));
            let m = model.layers[2].mlp.as_mut().unwrap();
            copy_cols(&mut m.gate_proj.weight, 3..4, 5);
            copy_cols(&mut m.up_proj.weight, 3..4, 5);
        }
        let removed = [
            PruneUnit::KvGroup { layer: 1, group: 0 },
            PruneUnit::Channel { layer: 2, index: 0 },
        ];
        let plan = MaskPlan::from_removed(model.shape(), &removed).unwrap();
        let w = windows(8, 16);
        let run = |obs| {
            let s = ReconSettings {
                batch_size: 3,
                damp: 1e-9,
                obs,
                ..ReconSettings::default()
            };
            reconstruct(&model, &plan, &w, &s, |_| {}).unwrap()
        };
        let (ls, same, ls_reports) = run(false);
        assert_eq!(same, plan, "without obs the plan is kept");
        let (obs, chosen, obs_reports) = run(true);
        // Same budget, the redundant units chosen.
        assert_eq!(chosen.layers[1].kv_groups, [0]);
        let removed: Vec<usize> = (0..model.shape().layers[2].ffn_hidden)
            .filter(|c| !chosen.layers[2].channels.contains(c))
            .collect();
        assert!(removed == [3] || removed == [5], "{removed:?}");
        assert_eq!(chosen.layers[0], plan.layers[0]);
        assert_eq!(chosen.layers[1].channels, plan.layers[1].channels);
        assert_eq!(obs.shape(), &chosen.pruned_shape());
        let err = |r: &[ProjectionReport], layer, name| {
            r.iter()
                .find(|r| r.layer == layer && r.name == name)
                .unwrap()
                .rel_error_ls
        };
        for (layer, name) in [(1, "o_proj"), (2, "down_proj")] {
            assert!(err(&obs_reports, layer, name) < 1e-9, "{obs_reports:?}");
            assert!(err(&ls_reports, layer, name) > 1e-4, "{ls_reports:?}");
        }
        let t = model.tokens(&w).unwrap();
        let dense = model.forward(t.clone());
        let (d_obs, scale) = max_diff(obs.forward(t.clone()), dense.clone());
        let (d_ls, _) = max_diff(ls.forward(t), dense);
        assert!(
            d_obs / scale < 1e-5 && d_obs < d_ls,
            "obs {d_obs}, ls {d_ls}"
        );
    }

    #[test]
    fn least_squares_never_loses_to_the_bias_refit_or_the_cut() {
        let model = model();
        let removed = [
            PruneUnit::KvGroup { layer: 0, group: 1 },
            PruneUnit::Channel { layer: 0, index: 2 },
            PruneUnit::Channel {
                layer: 0,
                index: 40,
            },
            PruneUnit::Layer { layer: 1 },
            PruneUnit::Channel { layer: 2, index: 7 },
        ];
        let plan = MaskPlan::from_removed(model.shape(), &removed).unwrap();
        let w = windows(6, 16);
        for damp in [1e-6, 0.01, 1.0] {
            let s = ReconSettings {
                batch_size: 4,
                damp,
                ..ReconSettings::default()
            };
            let mut seen = 0;
            let (ls, _, reports) = reconstruct(&model, &plan, &w, &s, |_| seen += 1).unwrap();
            // Layer 0's two projections, and layer 2's (after a removed layer) both, with its
            // input projections under the default `next`.
            assert_eq!(reports.len(), 6);
            assert_eq!(seen, 6);
            for r in &reports {
                assert!(r.rel_error_ls <= r.rel_error_bias + 1e-12, "{r:?}");
                assert!(r.rel_error_bias <= r.rel_error_cut + 1e-12, "{r:?}");
            }
            // The whole model: closer to the dense logits than the plain cut.
            let t = model.tokens(&w).unwrap();
            let dense = model.forward(t.clone());
            let (d_ls, _) = max_diff(ls.forward(t.clone()), dense.clone());
            let cut = lopper_surgery::prune(&model, &plan).unwrap();
            let (d_cut, _) = max_diff(cut.forward(t), dense);
            assert!(d_ls < d_cut, "damp {damp}: ls {d_ls} vs cut {d_cut}");
            assert_eq!(ls.shape(), &plan.pruned_shape());
        }
    }

    #[test]
    fn input_refits_are_counted_reported_and_never_lose_to_the_cut() {
        let model = model();
        let removed = [
            PruneUnit::KvGroup { layer: 0, group: 1 },
            PruneUnit::Layer { layer: 1 },
            PruneUnit::Channel { layer: 2, index: 7 },
        ];
        let plan = MaskPlan::from_removed(model.shape(), &removed).unwrap();
        let w = windows(8, 16);
        for inputs in [InputRefit::Off, InputRefit::Next, InputRefit::All] {
            let s = ReconSettings {
                batch_size: 4,
                inputs,
                ..ReconSettings::default()
            };
            let mut seen = 0;
            let (out, _, reports) = reconstruct(&model, &plan, &w, &s, |_| seen += 1).unwrap();
            assert_eq!(reports.len(), projections(&plan, &s));
            assert_eq!(seen, reports.len());
            let names: Vec<(usize, &str)> = reports.iter().map(|r| (r.layer, r.name)).collect();
            let want: &[(usize, &str)] = match inputs {
                InputRefit::Off => &[
                    (0, "o_proj"),
                    (0, "down_proj"),
                    (2, "o_proj"),
                    (2, "down_proj"),
                ],
                // Only the layer after the removed layer 1.
                InputRefit::Next => &[
                    (0, "o_proj"),
                    (0, "down_proj"),
                    (2, "q/k/v_proj"),
                    (2, "o_proj"),
                    (2, "gate/up_proj"),
                    (2, "down_proj"),
                ],
                // Layer 0's attention reads the embeddings (unchanged); its MLP reads the cut
                // attention's output; layer 2 reads what the cut layers 0 and 1 left.
                InputRefit::All => &[
                    (0, "o_proj"),
                    (0, "gate/up_proj"),
                    (0, "down_proj"),
                    (2, "q/k/v_proj"),
                    (2, "o_proj"),
                    (2, "gate/up_proj"),
                    (2, "down_proj"),
                ],
            };
            assert_eq!(names, want, "{inputs}");
            for r in &reports {
                assert!(r.rel_error_ls <= r.rel_error_cut + 1e-12, "{r:?}");
            }
            assert_eq!(out.shape(), &plan.pruned_shape());
            let t = model.tokens(&w).unwrap();
            let y: f32 = out.forward(t).abs().max().into_scalar().elem();
            assert!(y.is_finite());
        }
    }

    #[test]
    fn next_refits_the_layer_after_each_block_removed_whole() {
        let model = model();
        let shape = model.shape();
        let groups = shape.layers[0].n_kv_heads;
        let channels = shape.layers[0].ffn_hidden;
        let attn = |layer| (0..groups).map(move |group| PruneUnit::KvGroup { layer, group });
        let mlp = |layer| (0..channels).map(move |index| PruneUnit::Channel { layer, index });
        let next = |removed: Vec<PruneUnit>| {
            let plan = MaskPlan::from_removed(shape, &removed).unwrap();
            input_refits(&plan, InputRefit::Next)
        };
        let n = shape.layers.len();
        let only = |hits: &[(usize, (bool, bool))]| {
            let mut v = vec![(false, false); n];
            for &(l, h) in hits {
                v[l] = h;
            }
            v
        };
        // Attention of layer 0 removed: its own MLP is the next kept block.
        assert_eq!(next(attn(0).collect()), only(&[(0, (false, true))]));
        // MLP of layer 0 removed: layer 1 from its attention on.
        assert_eq!(next(mlp(0).collect()), only(&[(1, (true, true))]));
        // Layers 0 and 1 removed whole: one refit, in layer 2.
        assert_eq!(
            next(attn(0).chain(mlp(0)).chain(attn(1)).chain(mlp(1)).collect()),
            only(&[(2, (true, true))])
        );
        // Units cut but no block removed: nothing.
        assert_eq!(
            next(vec![
                PruneUnit::KvGroup { layer: 0, group: 0 },
                PruneUnit::Channel { layer: 1, index: 3 }
            ]),
            only(&[])
        );
        // Off never refits; All refits every block after the first change.
        let plan = MaskPlan::from_removed(shape, &mlp(0).collect::<Vec<_>>()).unwrap();
        assert_eq!(input_refits(&plan, InputRefit::Off), only(&[]));
        let all = input_refits(&plan, InputRefit::All);
        assert!(all[1..].iter().all(|&h| h == (true, true)), "{all:?}");
    }

    #[test]
    fn rank_deficient_calibration_gives_finite_weights() {
        let model = model();
        let removed = [
            PruneUnit::KvGroup { layer: 0, group: 0 },
            PruneUnit::Channel { layer: 1, index: 0 },
        ];
        let plan = MaskPlan::from_removed(model.shape(), &removed).unwrap();
        // Four tokens for 40+ kept inputs; and one token repeated (every row of X the same).
        for w in [vec![vec![3u32, 9, 1, 4]], vec![vec![5u32; 12]; 2]] {
            let (ls, _, reports) =
                reconstruct(&model, &plan, &w, &ReconSettings::default(), |_| {}).unwrap();
            assert!(!reports.is_empty());
            for r in &reports {
                assert!(r.rel_error_ls.is_finite() && r.rel_error_ls <= r.rel_error_bias + 1e-9);
            }
            let t = ls.tokens(&windows(2, 8)).unwrap();
            let y = ls.forward(t);
            let finite: f32 = y.clone().abs().max().into_scalar().elem();
            assert!(finite.is_finite(), "{finite}");
        }
    }

    #[test]
    fn impossible_settings_are_refused_before_work() {
        let model = model();
        let plan = MaskPlan::from_removed(model.shape(), &[]).unwrap();
        let w = windows(2, 8);
        let e = reconstruct(&model, &plan, &[], &ReconSettings::default(), |_| {});
        assert!(e.unwrap_err().to_string().contains("calibration window"));
        for damp in [0.0, -1.0, f64::NAN] {
            let s = ReconSettings {
                batch_size: 2,
                damp,
                ..ReconSettings::default()
            };
            let e = reconstruct(&model, &plan, &w, &s, |_| {});
            assert!(e.unwrap_err().to_string().contains("damping"));
        }
        let other = Llama::<B>::random(
            &ModelShape {
                hidden_size: 16,
                ..ModelShape::tiny()
            },
            1,
            &burn_flex::FlexDevice,
        )
        .unwrap();
        assert!(reconstruct(&other, &plan, &w, &ReconSettings::default(), |_| {}).is_err());
    }
}

mod proxy {
    use burn::tensor::ElementConversion;
    use faer::Mat;
    use faer::linalg::solvers::Solve;
    use lopper_core::{MaskPlan, ModelShape, PruneUnit};
    use lopper_model::{Llama, Tap};

    use crate::RefitProxy;
    use crate::proxy::theta_of;

    use super::structured::{B, model, windows};

    /// The dense model's inputs of layer `layer`'s projection at `tap`, `[tokens, k]`.
    fn inputs(model: &Llama<B>, w: &[Vec<u32>], layer: usize, tap: Tap) -> Mat<f64> {
        let mut rows: Vec<Vec<f64>> = Vec::new();
        model
            .forward_tapped(model.tokens(w).unwrap(), None, |i, p, x| {
                if i == layer && p == tap {
                    let [n, k] = x.dims();
                    let v: Vec<f32> = x.clone().into_data().to_vec().unwrap();
                    rows.extend(
                        (0..n).map(|r| v[r * k..(r + 1) * k].iter().map(|&a| a as f64).collect()),
                    );
                }
            })
            .unwrap();
        Mat::from_fn(rows.len(), rows[0].len(), |r, j| rows[r][j])
    }

    #[test]
    fn a_plan_that_keeps_everything_scores_the_dense_model() {
        let model = model();
        let w = windows(4, 16);
        let proxy = RefitProxy::collect(&model, &w, 2, 0.01).unwrap();
        let plan = MaskPlan::from_removed(model.shape(), &[]).unwrap();
        let layers = proxy.layers(&model, &plan).unwrap();
        assert!(
            layers
                .iter()
                .all(|l| l.o_proj.is_none() && l.down_proj.is_none())
        );
        let t = model.tokens(&w).unwrap();
        let dense = model.mean_loss(t.clone(), None).unwrap();
        assert_eq!(proxy.mean_loss(&model, &plan, t).unwrap(), dense);
    }

    #[test]
    fn the_refit_is_the_damped_least_squares_fit_on_the_dense_inputs() {
        let model = model();
        let w = windows(6, 16);
        let damp = 0.05;
        let proxy = RefitProxy::collect(&model, &w, 4, damp).unwrap();
        let removed = [
            PruneUnit::Channel { layer: 0, index: 2 },
            PruneUnit::Channel { layer: 0, index: 9 },
            PruneUnit::Channel {
                layer: 0,
                index: 17,
            },
            PruneUnit::KvGroup { layer: 1, group: 0 },
        ];
        let plan = MaskPlan::from_removed(model.shape(), &removed).unwrap();
        let layers = proxy.layers(&model, &plan).unwrap();
        for (layer, tap, kept) in [
            (0, Tap::DownProjInput, plan.layers[0].channels.clone()),
            (
                1,
                Tap::OProjInput,
                lopper_surgery::head_dims(&plan.layers[1].kv_groups, &plan.source.layers[1]).0,
            ),
        ] {
            let l = model.layer(layer).unwrap();
            let lin = match tap {
                Tap::DownProjInput => &l.mlp.as_ref().unwrap().down_proj,
                _ => &l.self_attn.as_ref().unwrap().o_proj,
            };
            let theta0 = theta_of(lin).unwrap();
            let x = inputs(&model, &w, layer, tap);
            let (n, k) = (x.nrows(), x.ncols());
            let a = Mat::from_fn(n, k + 1, |r, j| if j < k { x[(r, j)] } else { 1.0 });
            let target = &a * &theta0;
            let g = a.transpose() * &a;
            let lambda = damp * (0..k).map(|j| g[(j, j)]).sum::<f64>() / k as f64;
            // The normal equations of the kept inputs and the bias, written out.
            let cols: Vec<usize> = kept.iter().copied().chain([k]).collect();
            let a_s = Mat::from_fn(n, cols.len(), |r, j| a[(r, cols[j])]);
            let mut lhs = a_s.transpose() * &a_s;
            let mut rhs = a_s.transpose() * &target;
            for j in 0..cols.len() - 1 {
                lhs[(j, j)] += lambda;
                for c in 0..rhs.ncols() {
                    rhs[(j, c)] += lambda * theta0[(cols[j], c)];
                }
            }
            let want = lhs.llt(faer::Side::Lower).unwrap().solve(&rhs);
            let got = theta_of(match tap {
                Tap::DownProjInput => layers[layer].down_proj.as_ref().unwrap(),
                _ => layers[layer].o_proj.as_ref().unwrap(),
            })
            .unwrap();
            let scale = want.norm_max();
            let diff = (&got - &want).norm_max();
            assert!(
                diff / scale < 1e-5,
                "layer {layer} {tap:?}: {diff} of {scale}"
            );
            // And it differs from the plain slice.
            let plain = Mat::from_fn(cols.len(), theta0.ncols(), |r, c| theta0[(cols[r], c)]);
            assert!((&plain - &want).norm_max() / scale > 1e-3);
        }
    }

    #[test]
    fn removals_the_dense_inputs_make_redundant_are_undone() {
        let (model, plan) = super::structured::redundant();
        let w = windows(8, 16);
        let proxy = RefitProxy::collect(&model, &w, 3, 1e-9).unwrap();
        let t = model.tokens(&w).unwrap();
        let dense = model.forward(t.clone());
        let refits = proxy.layers(&model, &plan).unwrap();
        let refit = model
            .forward_layers(
                t.clone(),
                None,
                |_, _| {},
                |i, l| crate::refit_layer(l, &plan.source.layers[i], &plan.layers[i], &refits[i]),
            )
            .unwrap();
        let cut = lopper_surgery::forward_kept(&model, &plan, t.clone()).unwrap();
        let scale: f32 = dense.clone().abs().max().into_scalar().elem();
        let d_refit: f32 = (refit - dense.clone()).abs().max().into_scalar().elem();
        let d_cut: f32 = (cut - dense).abs().max().into_scalar().elem();
        assert!(d_refit / scale < 1e-5, "refit {d_refit} of {scale}");
        assert!(
            d_cut / scale > 1e-3,
            "the cut alone must differ: {d_cut} of {scale}"
        );
        let loss = proxy.mean_loss(&model, &plan, t.clone()).unwrap();
        let dense_loss = model.mean_loss(t, None).unwrap();
        assert!((loss - dense_loss).abs() < 1e-5, "{loss} vs {dense_loss}");
    }

    #[test]
    fn a_block_removed_whole_carries_its_mean_output_as_the_bias_rule_does() {
        let model = model();
        let w = windows(4, 16);
        let proxy = RefitProxy::collect(&model, &w, 2, 0.01).unwrap();
        let n_ch = model.shape().layers[2].ffn_hidden;
        let removed: Vec<PruneUnit> = (0..n_ch)
            .map(|index| PruneUnit::Channel { layer: 2, index })
            .collect();
        let plan = MaskPlan::from_removed(model.shape(), &removed).unwrap();
        let layers = proxy.layers(&model, &plan).unwrap();
        assert!(layers[2].down_proj.is_none());
        let got = theta_of(
            layers[2]
                .o_proj
                .as_ref()
                .expect("the carry lands on o_proj"),
        )
        .unwrap();
        // The bias rule's carry, from the dense inputs' means.
        let mean = |layer: usize, tap: Tap| {
            let x = inputs(&model, &w, layer, tap);
            (0..x.ncols())
                .map(|j| (0..x.nrows()).map(|r| x[(r, j)]).sum::<f64>() / x.nrows() as f64)
                .collect::<Vec<f64>>()
        };
        let n = model.shape().n_layers();
        let means = lopper_surgery::InputMeans {
            o_proj: (0..n).map(|i| mean(i, Tap::OProjInput)).collect(),
            down_proj: (0..n).map(|i| mean(i, Tap::DownProjInput)).collect(),
        };
        let extra = lopper_surgery::compensation_biases(&model, &plan, &means).unwrap();
        let extra: Vec<f32> = extra[2]
            .o_proj
            .clone()
            .unwrap()
            .into_data()
            .to_vec()
            .unwrap();
        let dense = theta_of(&model.layer(2).unwrap().self_attn.as_ref().unwrap().o_proj).unwrap();
        let b = dense.nrows() - 1;
        for (j, e) in extra.iter().enumerate() {
            let want = dense[(b, j)] + *e as f64;
            assert!(
                (got[(b, j)] - want).abs() < 1e-4 * (1.0 + want.abs()),
                "{j}: {} vs {want}",
                got[(b, j)]
            );
            // The attention itself keeps its dense weights.
            assert_eq!(got[(0, j)], dense[(0, j)]);
        }
    }

    #[test]
    fn the_statistics_size_is_what_a_guard_can_refuse_before_work() {
        // The tiny model: 3 layers of o_proj (32 inputs) and down_proj (48), hidden 32, plus
        // one Gram matrix being accumulated.
        let tiny = ModelShape::tiny();
        let l = tiny.layers[0];
        let (o, d, h) = (l.n_heads * l.head_dim, l.ffn_hidden, tiny.hidden_size);
        let per = |k: usize| ((k + 1) * (k + 1) + (k + 1) * h) as u64 * 8;
        let widest = o.max(d) as u64 + 1;
        assert_eq!(
            RefitProxy::host_bytes(&tiny),
            tiny.layers.len() as u64 * (per(o) + per(d)) + widest * widest * 8
        );
        // A Llama-3-8B shape needs about 76 GB: more than the machines it runs on hold.
        let mut big = tiny.clone();
        big.hidden_size = 4096;
        big.layers = vec![
            lopper_core::LayerShape {
                n_heads: 32,
                n_kv_heads: 8,
                head_dim: 128,
                ffn_hidden: 14336,
            };
            32
        ];
        let gb = RefitProxy::host_bytes(&big) as f64 / 1e9;
        assert!((70.0..85.0).contains(&gb), "{gb} GB");
    }

    #[test]
    fn impossible_settings_are_refused() {
        let model = model();
        assert!(RefitProxy::collect(&model, &[], 2, 0.01).is_err());
        assert!(RefitProxy::collect(&model, &windows(2, 8), 0, 0.01).is_err());
        assert!(RefitProxy::collect(&model, &windows(2, 8), 2, 0.0).is_err());
        let proxy = RefitProxy::collect(&model, &windows(2, 8), 2, 0.01).unwrap();
        let mut shape = ModelShape::tiny();
        shape.layers.pop();
        let other = Llama::<B>::random(&shape, 1, &burn_flex::FlexDevice).unwrap();
        let plan = MaskPlan::from_removed(other.shape(), &[]).unwrap();
        assert!(proxy.layers(&other, &plan).is_err());
    }
}
