use burn_flex::Flex;

use super::*;
use lopper_core::{MaskPlan, ModelShape, PruneUnit, UnitKind, keep_count, top_k};
use lopper_model::Llama;

type B = Flex;
const D: burn_flex::FlexDevice = burn_flex::FlexDevice;

fn config(budget: Budget, units: Vec<UnitKind>) -> PgConfig {
    PgConfig {
        sparsity: 0.5,
        units,
        budget,
        estimator: Estimator::Ref,
        optimizer: Optimizer::Sgd,
        lr_heads: 0.05,
        lr_channels: 0.05,
        lr_layers: 0.05,
        schedule: Schedule::Cosine,
        steps: 8,
        samples_per_step: 2,
        batch_size: 2,
        ..PgConfig::reference(0.5)
    }
}

fn fine() -> Vec<UnitKind> {
    vec![UnitKind::KvGroup, UnitKind::Channel]
}

#[test]
fn projection_meets_the_sum_within_bounds() {
    let mut s: Vec<f64> = (0..100)
        .map(|i| (i as f64 * 0.37).sin().abs() * 1.4)
        .collect();
    let v = project(
        &mut s,
        30.0,
        &|x: &[f64]| x.iter().sum(),
        1e-3,
        20,
        false,
        (0.0, 1.0),
    );
    assert!(v > 0.0);
    assert!(s.iter().all(|&x| (0.0..=1.0).contains(&x)));
    assert!(
        (s.iter().sum::<f64>() - 30.0).abs() < 1e-2,
        "{}",
        s.iter().sum::<f64>()
    );
    // More iterations converge further.
    let mut t: Vec<f64> = (0..100)
        .map(|i| (i as f64 * 0.37).sin().abs() * 1.4)
        .collect();
    project(
        &mut t,
        30.0,
        &|x: &[f64]| x.iter().sum(),
        1e-9,
        80,
        false,
        (0.0, 1.0),
    );
    assert!((t.iter().sum::<f64>() - 30.0).abs() < 1e-6);
    // Already feasible (sum below the budget, inside [0, 1]): untouched.
    let mut u = vec![0.2, 0.5, 0.9];
    let before = u.clone();
    assert_eq!(
        project(
            &mut u,
            2.0,
            &|x: &[f64]| x.iter().sum(),
            1e-3,
            20,
            false,
            (0.0, 1.0)
        ),
        0.0
    );
    assert_eq!(u, before);
    // Out of bounds below the budget: only clamped, never raised.
    let mut w = vec![-0.5, 0.3];
    project(
        &mut w,
        1.5,
        &|x: &[f64]| x.iter().sum(),
        1e-3,
        20,
        false,
        (0.0, 1.0),
    );
    assert_eq!(w, vec![0.0, 0.3]);
    // The exact mode raises them.
    let mut r = vec![0.2, 0.5];
    project(
        &mut r,
        1.5,
        &|x: &[f64]| x.iter().sum(),
        1e-9,
        80,
        true,
        (0.0, 1.0),
    );
    assert!((r.iter().sum::<f64>() - 1.5).abs() < 1e-8 && (r[1] - r[0] - 0.3).abs() < 1e-8);
}

#[test]
fn weighted_projection_with_unit_weights_is_the_shift() {
    let start: Vec<f64> = (0..60).map(|i| (i as f64 * 0.53).cos().abs()).collect();
    let sum = |x: &[f64]| x.iter().sum::<f64>();
    let (mut a, mut b) = (start.clone(), start.clone());
    project(&mut a, 20.0, &sum, 1e-10, 200, true, (0.01, 0.99));
    project_weighted(&mut b, 20.0, &sum, &[1.0; 60], 1e-10, 200, (0.01, 0.99));
    for (x, y) in a.iter().zip(&b) {
        assert!((x - y).abs() < 1e-8, "{x} {y}");
    }
    // Weight 0 never moves; weight 2 moves twice as far as weight 1 (away from the bounds).
    let mut c = vec![0.5, 0.5, 0.5];
    project_weighted(&mut c, 1.2, &sum, &[0.0, 1.0, 2.0], 1e-12, 200, (0.0, 1.0));
    assert_eq!(c[0], 0.5);
    assert!((c[2] - 0.5 - 2.0 * (c[1] - 0.5)).abs() < 1e-9, "{c:?}");
    assert!((sum(&c) - 1.2).abs() < 1e-10);
    // No weighted unit: nothing moves.
    let mut d = vec![0.5, 0.7];
    assert_eq!(
        project_weighted(&mut d, 0.1, &sum, &[0.0, 0.0], 1e-9, 60, (0.0, 1.0)),
        0.0
    );
    assert_eq!(d, vec![0.5, 0.7]);
}

#[test]
fn the_expected_kept_gradient_is_its_derivative() {
    let all = vec![UnitKind::KvGroup, UnitKind::Channel, UnitKind::Layer];
    for kinds in [all, vec![UnitKind::Layer], fine()] {
        let space = UnitSpace::new(&ModelShape::tiny(), &kinds).unwrap();
        let s: Vec<f64> = (0..space.units.len())
            .map(|i| 0.2 + 0.6 * ((i * 7919) % 101) as f64 / 100.0)
            .collect();
        let g = space.expected_kept_grad(&s);
        let h = 1e-6;
        for i in 0..s.len() {
            let (mut up, mut down) = (s.clone(), s.clone());
            up[i] += h;
            down[i] -= h;
            let fd = (space.expected_kept(&up) - space.expected_kept(&down)) / (2.0 * h);
            assert!(
                (fd - g[i]).abs() < 1e-7,
                "{kinds:?} unit {i}: {fd} {}",
                g[i]
            );
        }
    }
}

#[test]
fn the_cost_projection_meets_the_budget_and_charges_expensive_units_more() {
    let shape = ModelShape::tiny();
    let units = vec![UnitKind::KvGroup, UnitKind::Channel, UnitKind::Layer];
    let space = UnitSpace::new(&shape, &units).unwrap();
    let cfg = PgConfig {
        projection: Projection::Cost,
        prob_floor: 0.01,
        ..config(Budget::Params, units.clone())
    };
    let mut state = PgState::new(cfg.clone(), &space, &Init::Uniform).unwrap();
    assert!((space.expected_kept(&state.probs) - cfg.keep()).abs() < 1e-6);
    // From every probability at 0.9 (over budget), each unit falls in proportion to its
    // derivative of the budget: a layer most, then a KV group, then a channel.
    state.probs.iter_mut().for_each(|p| *p = 0.9);
    let d = space.expected_kept_grad(&state.probs);
    state.project(&space);
    assert!((space.expected_kept(&state.probs) - cfg.keep()).abs() < 1e-6);
    let drop = |kind: UnitKind| {
        let i = space.units.iter().position(|u| u.kind() == kind).unwrap();
        (0.9 - state.probs[i], d[i])
    };
    let (layer, kv, ch) = (
        drop(UnitKind::Layer),
        drop(UnitKind::KvGroup),
        drop(UnitKind::Channel),
    );
    assert!(
        layer.0 > kv.0 && kv.0 > ch.0 && ch.0 > 0.0,
        "{layer:?} {kv:?} {ch:?}"
    );
    // Unclamped units fall in the ratio of their derivatives.
    assert!(
        (kv.0 / ch.0 - kv.1 / ch.1).abs() < 1e-6 * kv.1 / ch.1,
        "{kv:?} {ch:?}"
    );
    // The shift moves every unit alike.
    let mut shift = PgState::new(
        PgConfig {
            projection: Projection::Shift,
            ..cfg
        },
        &space,
        &Init::Uniform,
    )
    .unwrap();
    shift.probs.iter_mut().for_each(|p| *p = 0.9);
    shift.project(&space);
    assert!((shift.probs[0] - shift.probs[shift.probs.len() - 1]).abs() < 1e-12);
}

#[test]
fn sigmap_keeps_order_and_hits_the_mean() {
    let m = [3.0, -1.0, 0.5, 10.0, 2.0];
    let s = sigmap(&m, 0.6);
    assert!((s.iter().sum::<f64>() / 5.0 - 0.6).abs() < 1e-12);
    assert!(s[3] > s[0] && s[0] > s[4] && s[4] > s[2] && s[2] > s[1]);
    // z-scores: the largest is sigmoid((10 - 2.9) / std) shifted.
    let mean = 2.9;
    let std = (m.iter().map(|x| (x - mean) * (x - mean)).sum::<f64>() / 4.0).sqrt();
    let sig = |x: f64| 1.0 / (1.0 + (-(x - mean) / (std + 1e-8)).exp());
    let shift = 0.6 - m.iter().map(|&x| sig(x)).sum::<f64>() / 5.0;
    assert!((s[3] - (sig(10.0) + shift)).abs() < 1e-12);
}

/// A toy objective with a known optimum: the loss of a mask is the total weight of the removed
/// units, so the best plan at keep 0.5 keeps the heaviest half of each type.
fn toy_converges(estimator: Estimator, optimizer: Optimizer, lr: f64) {
    let shape = ModelShape::tiny();
    let space = UnitSpace::new(&shape, &fine()).unwrap();
    let weight: Vec<f64> = (0..space.units.len())
        .map(|i| ((i * 7919) % 97) as f64 / 97.0 + 0.01)
        .collect();
    let mut cfg = config(Budget::PerType, fine());
    (
        cfg.estimator,
        cfg.optimizer,
        cfg.steps,
        cfg.samples_per_step,
    ) = (estimator, optimizer, 1500, 4);
    (cfg.lr_heads, cfg.lr_channels) = (lr, lr);
    let mut state = PgState::new(cfg, &space, &Init::Uniform).unwrap();
    let lookup: std::collections::HashMap<PruneUnit, f64> = space
        .units
        .iter()
        .copied()
        .zip(weight.iter().copied())
        .collect();
    for _ in 0..state.config.steps {
        state
            .step(&space, &mut |plan| {
                Ok(plan.removed_units().iter().map(|u| lookup[u]).sum::<f64>() / 10.0)
            })
            .unwrap();
    }
    let plan = state.final_plan(&space).unwrap();
    for &(_, start, end) in &space.kinds {
        let w = &weight[start..end];
        let best: Vec<PruneUnit> = top_k(w, keep_count(0.5, w.len()))
            .into_iter()
            .map(|i| space.units[start + i])
            .collect();
        let removed = plan.removed_units();
        let wrong = best.iter().filter(|u| removed.contains(u)).count();
        assert!(
            wrong <= w.len() / 20,
            "{estimator:?}/{optimizer:?}: {wrong} of the best {} units removed",
            best.len()
        );
    }
}

#[test]
fn the_reference_estimator_finds_the_known_optimum() {
    toy_converges(Estimator::Ref, Optimizer::Sgd, 0.05);
}

#[test]
fn the_score_estimator_finds_the_known_optimum() {
    toy_converges(Estimator::Score, Optimizer::Sgd, 0.01);
}

#[test]
fn adam_finds_the_known_optimum() {
    toy_converges(Estimator::Ref, Optimizer::Adam, 0.01);
}

#[test]
fn per_type_plans_meet_the_budget_exactly() {
    let shape = ModelShape::tiny();
    let space = UnitSpace::new(&shape, &fine()).unwrap();
    for sparsity in [0.2, 0.3, 0.5, 0.7] {
        let mut cfg = config(Budget::PerType, fine());
        cfg.sparsity = sparsity;
        let state = PgState::new(cfg, &space, &Init::Random).unwrap();
        let plan = state.final_plan(&space).unwrap();
        let groups: usize = plan.layers.iter().map(|l| l.kv_groups.len()).sum();
        let chans: usize = plan.layers.iter().map(|l| l.channels.len()).sum();
        assert_eq!(groups, keep_count(1.0 - sparsity, 6));
        assert_eq!(chans, keep_count(1.0 - sparsity, 144));
        let probs: f64 = state.probs[..6].iter().sum();
        assert!((probs - 6.0 * (1.0 - sparsity)).abs() < 1e-2);
    }
}

#[test]
fn parameter_budgets_with_layers_remove_the_requested_parameters() {
    let shape = ModelShape::tiny();
    let units = vec![UnitKind::KvGroup, UnitKind::Channel, UnitKind::Layer];
    let space = UnitSpace::new(&shape, &units).unwrap();
    let mut cfg = config(Budget::Params, units);
    cfg.sparsity = 0.4;
    let mut state = PgState::new(cfg, &space, &Init::Random).unwrap();
    assert!((space.expected_kept(&state.probs) - 0.6).abs() < 1e-5);
    // Make layer 1 the least wanted unit: the plan drops it whole.
    let li = space
        .units
        .iter()
        .position(|u| *u == PruneUnit::Layer { layer: 1 })
        .unwrap();
    state.probs[li] = 0.0;
    let plan = state.final_plan(&space).unwrap();
    assert!(plan.layers[1].kv_groups.is_empty() && plan.layers[1].channels.is_empty());
    let removed = 1.0 - plan.kept_param_ratio();
    let slack = space.cost.iter().copied().fold(f64::INFINITY, f64::min) / space.pool;
    assert!((removed - 0.4).abs() <= slack, "removed {removed}");
    // Per-type budgets refuse layers with a clear message.
    let e = PgState::new(
        config(Budget::PerType, vec![UnitKind::Layer]),
        &space,
        &Init::Uniform,
    )
    .unwrap_err();
    assert!(e.to_string().contains("--budget params"), "{e}");
}

#[test]
fn impossible_sparsities_are_refused() {
    let space = UnitSpace::new(&ModelShape::tiny(), &fine()).unwrap();
    for s in [0.0, 1.0, 1.5, -0.1, f64::NAN] {
        let mut cfg = config(Budget::PerType, fine());
        cfg.sparsity = s;
        let e = PgState::new(cfg, &space, &Init::Uniform)
            .unwrap_err()
            .to_string();
        assert!(e.contains("--sparsity"), "{e}");
    }
}

fn windows() -> Vec<Vec<u32>> {
    (0..6)
        .map(|r| {
            (0..10)
                .map(|t| ((t * 29 + r * 11 + 3) % 128) as u32)
                .collect()
        })
        .collect()
}

fn run_to(
    model: &Llama<B>,
    space: &UnitSpace,
    state: &mut PgState,
    stop_at: Option<usize>,
    ckpt: &mut Option<String>,
) {
    run_with(model, None, space, state, stop_at, ckpt);
}

fn run_with(
    model: &Llama<B>,
    means: Option<&lopper_surgery::InputMeans>,
    space: &UnitSpace,
    state: &mut PgState,
    stop_at: Option<usize>,
    ckpt: &mut Option<String>,
) {
    let stop = |s: &PgState| stop_at.is_some_and(|n| s.step >= n);
    let step_ptr = std::cell::Cell::new(state.step);
    search(
        model,
        &windows(),
        means,
        space,
        state,
        Hooks {
            on_step: &mut |_, s| {
                step_ptr.set(s.step);
                Ok(())
            },
            should_stop: &|| stop_at.is_some_and(|n| step_ptr.get() >= n),
            checkpoint: &mut |s| {
                // A SIGKILL loses everything after the last periodic checkpoint: emulate it by
                // not checkpointing on stop.
                if !stop(s) || s.step == s.config.steps {
                    *ckpt = Some(s.to_json());
                }
                Ok(())
            },
            checkpoint_every: 3,
        },
    )
    .unwrap();
}

#[test]
fn an_interrupted_and_resumed_search_is_bit_identical() {
    let model = Llama::<B>::random(&ModelShape::tiny(), 5, &D).unwrap();
    let space = UnitSpace::new(model.shape(), &fine()).unwrap();
    let init = Init::Random;
    let mut full = PgState::new(config(Budget::PerType, fine()), &space, &init).unwrap();
    let mut ck = None;
    run_to(&model, &space, &mut full, None, &mut ck);
    assert_eq!(full.step, 8);
    // Interrupted at step 5 without a final checkpoint (the last one was at step 3).
    let mut part = PgState::new(config(Budget::PerType, fine()), &space, &init).unwrap();
    let mut ck2 = None;
    run_to(&model, &space, &mut part, Some(5), &mut ck2);
    let mut resumed: PgState = serde_json::from_str(ck2.as_ref().unwrap()).unwrap();
    assert_eq!(resumed.step, 3);
    run_to(&model, &space, &mut resumed, None, &mut ck2);
    assert_eq!(resumed.probs, full.probs);
    assert_eq!(resumed.baseline, full.baseline);
    assert_eq!(
        resumed.final_plan(&space).unwrap(),
        full.final_plan(&space).unwrap()
    );
    // The search moved the probabilities away from their start.
    let start = PgState::new(config(Budget::PerType, fine()), &space, &init).unwrap();
    assert_ne!(start.probs, full.probs);
}

fn all_units() -> Vec<UnitKind> {
    vec![UnitKind::KvGroup, UnitKind::Channel, UnitKind::Layer]
}

/// A plan removing a layer, a KV group and some channels, and a config whose budget is exactly
/// what that plan removes.
fn plan_start(shape: &ModelShape, space: &UnitSpace) -> (MaskPlan, PgConfig) {
    let mut removed = vec![
        PruneUnit::Layer { layer: 1 },
        PruneUnit::KvGroup { layer: 0, group: 1 },
    ];
    removed.extend((0..20).map(|index| PruneUnit::Channel {
        layer: 2,
        index: index * 2,
    }));
    let plan = MaskPlan::from_removed(shape, &removed).unwrap();
    let space_removed: f64 = space
        .units
        .iter()
        .zip(&space.cost)
        .filter(|(u, _)| match **u {
            PruneUnit::Layer { .. } => false,
            PruneUnit::KvGroup { layer, group } => {
                layer == 1 || !plan.layers[layer].kv_groups.contains(&group)
            }
            PruneUnit::Channel { layer, index } => {
                layer == 1 || plan.layers[layer].channels.binary_search(&index).is_err()
            }
            _ => false,
        })
        .map(|(_, c)| c)
        .sum();
    let mut cfg = PgConfig::new(space_removed / space.pool);
    cfg.steps = 6;
    cfg.batch_size = 2;
    cfg.held_out = 2;
    (plan, cfg)
}

/// A plan start from `plan` ranked by [`scores_of`].
fn scored_start(plan: &MaskPlan, shape: &ModelShape) -> Init {
    Init::Plan {
        plan: plan.clone(),
        scores: Some(scores_of(shape)),
    }
}

fn scores_of(shape: &ModelShape) -> lopper_core::UnitScores {
    lopper_core::UnitScores {
        method: "test".into(),
        kv_groups: shape
            .layers
            .iter()
            .enumerate()
            .map(|(l, s)| (0..s.n_kv_heads).map(|g| (l * 7 + g * 3) as f64).collect())
            .collect(),
        channels: shape
            .layers
            .iter()
            .enumerate()
            .map(|(l, s)| {
                (0..s.ffn_hidden)
                    .map(|c| ((c * 13 + l * 5) % 17) as f64)
                    .collect()
            })
            .collect(),
    }
}

#[test]
fn a_plan_start_makes_step_zero_plan_the_init_plan() {
    let shape = ModelShape::tiny();
    let space = UnitSpace::new(&shape, &all_units()).unwrap();
    let (plan, cfg) = plan_start(&shape, &space);
    let init = scored_start(&plan, &shape);
    let state = PgState::new(cfg, &space, &init).unwrap();
    let start = state.final_plan(&space).unwrap();
    assert_eq!(start.layers, plan.layers);
    // Every probability is inside the floor, and kept units sit above removed ones.
    assert!(state.probs.iter().all(|&p| (0.01..=0.99).contains(&p)));
    assert!((space.expected_kept(&state.probs) - state.config.keep()).abs() < 1e-4);
    // Within a band, the scores' order is kept (layer 2's kept channels).
    let sc = scores_of(&shape);
    let kept2: Vec<usize> = (0..space.units.len())
        .filter(|&i| {
            matches!(space.units[i], PruneUnit::Channel { layer: 2, index } if index % 2 == 1 || index >= 40)
        })
        .collect();
    for &a in &kept2 {
        for &b in &kept2 {
            let (PruneUnit::Channel { index: ia, .. }, PruneUnit::Channel { index: ib, .. }) =
                (space.units[a], space.units[b])
            else {
                unreachable!()
            };
            if sc.channels[2][ia] < sc.channels[2][ib] {
                assert!(state.probs[a] <= state.probs[b]);
            }
        }
    }
}

#[test]
fn the_leave_one_out_baseline_ignores_batch_difficulty() {
    // The same masks scored with losses shifted by a per-step constant give the same update
    // under leave-one-out, and a different one under the moving average.
    let shape = ModelShape::tiny();
    let space = UnitSpace::new(&shape, &fine()).unwrap();
    let loss = |plan: &MaskPlan| -> f64 {
        plan.layers
            .iter()
            .map(|l| l.channels.iter().filter(|&&c| c < 24).count() as f64)
            .sum::<f64>()
            * 0.01
    };
    for (baseline, invariant) in [(Baseline::LeaveOneOut, true), (Baseline::Moving, false)] {
        let mut cfg = config(Budget::PerType, fine());
        cfg.baseline = baseline;
        let mut a = PgState::new(cfg.clone(), &space, &Init::Random).unwrap();
        let mut b = PgState::new(cfg, &space, &Init::Random).unwrap();
        for step in 0..4 {
            let shift = [0.0, 5.0, -3.0, 9.0][step];
            a.step(&space, &mut |p| Ok(loss(p))).unwrap();
            b.step(&space, &mut |p| Ok(loss(p) + shift)).unwrap();
        }
        let diff = a
            .probs
            .iter()
            .zip(&b.probs)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f64::max);
        assert_eq!(diff < 1e-9, invariant, "{baseline:?}: {diff}");
    }
}

#[test]
fn antithetic_pairs_mirror_each_other_and_the_floor_holds() {
    let shape = ModelShape::tiny();
    let space = UnitSpace::new(&shape, &fine()).unwrap();
    let mut cfg = config(Budget::PerType, fine());
    cfg.sparsity = 0.5;
    cfg.antithetic = true;
    cfg.samples_per_step = 4;
    cfg.prob_floor = 0.05;
    cfg.lr_channels = 0.5;
    cfg.lr_heads = 0.5;
    let mut state = PgState::new(cfg, &space, &Init::Uniform).unwrap();
    let masks = state.sample_step();
    assert_eq!(masks.len(), 4);
    // At p = 0.5 the mirror of u < 0.5 is u > 0.5: the pair are complements.
    for pair in masks.chunks(2) {
        assert!(pair[0].iter().zip(&pair[1]).all(|(a, b)| a != b));
    }
    assert_ne!(masks[0], masks[2]);
    for _ in 0..6 {
        state
            .step(&space, &mut |p| {
                Ok(p.layers
                    .iter()
                    .map(|l| l.channels.len() as f64)
                    .sum::<f64>()
                    * -0.1)
            })
            .unwrap();
    }
    assert!(state.probs.iter().all(|&p| (0.05..=0.95).contains(&p)));
    assert!(state.probs.iter().any(|&p| p == 0.95 || p == 0.05));
    // Odd K with antithetic pairs, and leave-one-out with one mask, are refused.
    let mut bad = config(Budget::PerType, fine());
    bad.antithetic = true;
    bad.samples_per_step = 3;
    assert!(bad.validate().unwrap_err().to_string().contains("even"));
    let mut bad = config(Budget::PerType, fine());
    bad.baseline = Baseline::LeaveOneOut;
    bad.samples_per_step = 1;
    assert!(
        bad.validate()
            .unwrap_err()
            .to_string()
            .contains("--samples-per-step")
    );
}

fn random_means(shape: &ModelShape) -> lopper_surgery::InputMeans {
    let v = |n: usize, l: usize| {
        (0..n)
            .map(|i| ((i * 31 + l * 7) % 11) as f64 * 0.1 - 0.5)
            .collect()
    };
    lopper_surgery::InputMeans {
        o_proj: shape
            .layers
            .iter()
            .enumerate()
            .map(|(l, s)| v(s.n_heads * s.head_dim, l))
            .collect(),
        down_proj: shape
            .layers
            .iter()
            .enumerate()
            .map(|(l, s)| v(s.ffn_hidden, l))
            .collect(),
    }
}

#[test]
fn the_default_search_resumes_bit_identically_and_chooses_on_held_out_windows() {
    let model = Llama::<B>::random(&ModelShape::tiny(), 5, &D).unwrap();
    let shape = model.shape().clone();
    let space = UnitSpace::new(&shape, &all_units()).unwrap();
    let (plan, cfg) = plan_start(&shape, &space);
    let init = scored_start(&plan, &shape);
    let means = random_means(&shape);
    let mut full = PgState::new(cfg.clone(), &space, &init).unwrap();
    let mut ck = None;
    run_with(&model, Some(&means), &space, &mut full, None, &mut ck);
    let mut part = PgState::new(cfg.clone(), &space, &init).unwrap();
    let mut ck2 = None;
    run_with(&model, Some(&means), &space, &mut part, Some(4), &mut ck2);
    let mut resumed: PgState = serde_json::from_str(ck2.as_ref().unwrap()).unwrap();
    run_with(&model, Some(&means), &space, &mut resumed, None, &mut ck2);
    assert_eq!(resumed.probs, full.probs);
    assert_eq!(resumed.init_plan, full.init_plan);
    // The search without means is refused when the config compensates.
    let mut fresh = PgState::new(cfg, &space, &init).unwrap();
    let e = search(
        &model,
        &windows(),
        None,
        &space,
        &mut fresh,
        Hooks {
            on_step: &mut |_, _| Ok(()),
            should_stop: &|| false,
            checkpoint: &mut |_| Ok(()),
            checkpoint_every: 0,
        },
    )
    .unwrap_err();
    assert!(e.to_string().contains("input means"), "{e}");
    assert_eq!(fresh.step, 0);
    // The choice picks the candidate with the lower held-out loss, and says so.
    let held: Vec<Vec<u32>> = windows()[..2].to_vec();
    // The least-squares judge reads its own windows, longer than the search's (as the shipped
    // cut's are): two of 20 tokens to refit on, one to score on.
    let fit: Vec<Vec<u32>> = windows()[2..].chunks(2).map(|w| w.concat()).collect();
    let scored: Vec<Vec<u32>> = vec![windows()[..2].concat()];
    let refit = RefitWindows {
        fit: &fit,
        held_out: &scored,
        batch_size: 1,
        inputs: lopper_sparse::InputRefit::default(),
    };
    let mut masked_state = full.clone();
    masked_state.config.judge = Judge::Masked;
    let (chosen, choice) =
        choose(&model, refit, &held, Some(&means), &space, &masked_state).unwrap();
    let choice = choice.expect("a plan start with held-out windows compares");
    let loss_of = |p: &MaskPlan| {
        lopper_surgery::mean_loss_kept(&model, p, Some(&means), model.tokens(&held).unwrap())
            .unwrap()
    };
    let searched = full.final_plan(&space).unwrap();
    let init_plan = full.init_plan.clone().unwrap();
    let (ls, li) = (loss_of(&searched), loss_of(&init_plan));
    assert!(
        (choice.candidates[0].1 - ls).abs() < 1e-9 && (choice.candidates[1].1 - li).abs() < 1e-9
    );
    let expect = if li < ls { &init_plan } else { &searched };
    assert_eq!(chosen.layers, expect.layers);
    assert_eq!(choice.chosen, if li < ls { "init" } else { "search" });
    assert!(chosen.meta.contains_key("final_choice"));
    assert!(choice.masked.is_empty());
    assert_eq!(choice.refit, None);
    // The least-squares judge cuts each candidate, refits it on the first fit windows (here
    // all: 3 asked, 2 there) and scores the refit model on its own windows; the masked losses
    // are kept beside.
    let mut ls_state = full.clone();
    let judge = Judge::Reconstructed { windows: 3, top: 2 };
    ls_state.config.judge = judge;
    let (chosen, choice) = choose(&model, refit, &held, Some(&means), &space, &ls_state).unwrap();
    let choice = choice.unwrap();
    assert_eq!(choice.refit, Some((2, 1, 20)));
    let refit_loss = |p: &MaskPlan| {
        let settings = lopper_sparse::ReconSettings {
            batch_size: 1,
            ..Default::default()
        };
        let (cut, _, _) = lopper_sparse::reconstruct(&model, p, &fit, &settings, |_| {}).unwrap();
        let all = MaskPlan::keep_all(cut.shape());
        lopper_surgery::windows_loss_kept(&cut, &all, None, &scored, 1).unwrap()
    };
    let (rs, ri) = (refit_loss(&searched), refit_loss(&init_plan));
    assert!(rs.is_finite() && ri.is_finite());
    assert!(
        (choice.candidates[0].1 - rs).abs() < 1e-9 && (choice.candidates[1].1 - ri).abs() < 1e-9,
        "{:?} vs {rs} {ri}",
        choice.candidates
    );
    assert!((choice.masked[0].1 - ls).abs() < 1e-9 && (choice.masked[1].1 - li).abs() < 1e-9);
    assert_eq!(choice.judge, judge);
    let expect = if ri < rs { &init_plan } else { &searched };
    assert_eq!(chosen.layers, expect.layers);
    // Two different plans: the refit losses rank them; with top 1 only the better masked one
    // is refit, so it wins.
    let other = MaskPlan::from_removed(
        &shape,
        &(0..24)
            .map(|index| PruneUnit::Channel { layer: 0, index })
            .chain([PruneUnit::KvGroup { layer: 2, group: 0 }])
            .collect::<Vec<_>>(),
    )
    .unwrap();
    let judge = |plans: &[&MaskPlan], known: &[Option<Judged>], cfg: &PgConfig| {
        judge_plans(&model, plans, known, Some(&means), refit, &held, cfg).unwrap()
    };
    let pair = [&init_plan, &other];
    let (judged, best) = judge(&pair, &[], &ls_state.config);
    let (r0, r1) = (refit_loss(&init_plan), refit_loss(&other));
    assert!(
        (r0 - r1).abs() > 1e-9,
        "the test needs two different losses"
    );
    assert_eq!(judged[0].reconstructed, Some(r0));
    assert_eq!(judged[1].reconstructed, Some(r1));
    assert_eq!(best, usize::from(r1 < r0));
    ls_state.config.judge = Judge::Reconstructed { windows: 3, top: 1 };
    let (judged, best) = judge(&pair, &[], &ls_state.config);
    let first = usize::from(judged[1].masked < judged[0].masked);
    assert_eq!(best, first);
    assert!(judged[first].reconstructed.is_some() && judged[1 - first].reconstructed.is_none());
    // Losses already known are reused, not recomputed.
    let fake = Judged {
        masked: 0.25,
        reconstructed: Some(0.125),
    };
    let (judged, best) = judge(&pair, &[None, Some(fake)], &ls_state.config);
    assert_eq!((best, judged[1]), (1, fake));
    // A known loss stands for an equal plan too: nothing is refit.
    let (judged, _) = judge(&[&other, &other], &[None, Some(fake)], &ls_state.config);
    assert_eq!(judged[0].reconstructed, fake.reconstructed);
    // Equal plans are scored once and tie to the first.
    let (judged, best) = judge(&[&init_plan, &init_plan], &[], &ls_state.config);
    assert_eq!(
        (best, judged[0], judged[1].reconstructed),
        (0, judged[1], judged[0].reconstructed)
    );
}

#[test]
fn channel_blocks_keep_the_start_exact_and_survive_a_checkpoint() {
    let shape = ModelShape::tiny();
    let unblocked = UnitSpace::new(&shape, &all_units()).unwrap();
    let (plan, mut cfg) = plan_start(&shape, &unblocked);
    cfg.channel_block = 8;
    let init = scored_start(&plan, &shape);
    let space = cfg.space(&shape, &init).unwrap();
    let channel_units = |s: &UnitSpace| {
        s.units
            .iter()
            .filter(|u| matches!(u, PruneUnit::Channel { .. }))
            .count()
    };
    // Fewer, larger units over the same pool.
    assert!(channel_units(&space) * 4 < channel_units(&unblocked));
    assert_eq!(space.pool, unblocked.pool);
    let total: f64 = space.cost.iter().sum();
    assert!((total - unblocked.cost.iter().sum::<f64>()).abs() < 1e-6);
    // Each block holds at most 8 channels and never mixes the start's kept and removed ones.
    for (i, u) in space.units.iter().enumerate() {
        if let PruneUnit::Channel { layer, .. } = *u {
            let ch = space.channels_of(i);
            assert!(!ch.is_empty() && ch.len() <= 8);
            let lp = &plan.layers[layer];
            let dropped = lp.kv_groups.is_empty() && lp.channels.is_empty();
            let kept = ch
                .iter()
                .filter(|c| dropped || lp.channels.binary_search(c).is_ok())
                .count();
            assert!(kept == 0 || kept == ch.len(), "layer {layer}: {ch:?}");
        }
    }
    // The start is exactly representable: step 0's plan is the start.
    let state = PgState::new(cfg.clone(), &space, &init).unwrap();
    assert_eq!(state.final_plan(&space).unwrap().layers, plan.layers);
    // A state and a space that disagree on blocks are refused.
    let mut plain = cfg.clone();
    plain.channel_block = 0;
    assert!(PgState::new(plain, &space, &init).is_err());
    // A checkpoint rebuilds the same space.
    let path = std::env::temp_dir().join(format!("lopper-blocks-{}.json", std::process::id()));
    state.save(&path).unwrap();
    let (back, rebuilt) = PgState::load(&path, &shape).unwrap();
    std::fs::remove_file(&path).ok();
    assert_eq!(rebuilt, space);
    assert_eq!(back, state);
    // Sampled plans are unions of whole blocks and the budget holds.
    let mut state = back;
    let mut seen = 0;
    state
        .step(&space, &mut |p| {
            for (i, u) in space.units.iter().enumerate() {
                if let PruneUnit::Channel { layer, .. } = *u {
                    let ch = space.channels_of(i);
                    let k = ch
                        .iter()
                        .filter(|c| p.layers[layer].channels.binary_search(c).is_ok())
                        .count();
                    assert!(k == 0 || k == ch.len());
                }
            }
            seen += 1;
            Ok(seen as f64)
        })
        .unwrap();
    assert_eq!(seen, cfg.samples_per_step);
    let end = state.final_plan(&space).unwrap();
    assert!((end.kept_param_ratio() - cfg.keep()).abs() < 0.05);
}

#[test]
fn widths_search_one_width_per_layer_from_the_start() {
    let shape = ModelShape::tiny();
    // Heads and channels: the dropped layer 1 is a layer of width 0 without heads.
    let unblocked = UnitSpace::new(&shape, &fine()).unwrap();
    let (plan, mut cfg) = plan_start(&shape, &unblocked);
    cfg.units = fine();
    cfg.channel_block = 4;
    cfg.widths = true;
    cfg.steps = 12;
    cfg.lr_channels = 0.05;
    let init = scored_start(&plan, &shape);
    let space = cfg.space(&shape, &init).unwrap();
    let groups = space.channel_groups();
    assert_eq!(groups.iter().map(Vec::len).collect::<Vec<_>>(), [12; 3]);
    let mut state = PgState::new(cfg.clone(), &space, &init).unwrap();
    let tied = |s: &PgState| {
        groups
            .iter()
            .all(|g| g.iter().all(|&i| s.probs[i] == s.probs[g[0]]))
    };
    assert!(tied(&state));
    // Layer 2 keeps 28 of its 48 channels: 7 of 12 blocks, exactly (the search holds the
    // start's expected size); step 0's plan is the start.
    let width = |s: &PgState, l: usize| s.width(s.probs[groups[l][0]], 12);
    assert!(
        (width(&state, 2) - 7.0).abs() < 1e-9,
        "{}",
        width(&state, 2)
    );
    assert!(
        (width(&state, 0) - 12.0).abs() < 1e-9,
        "{}",
        width(&state, 0)
    );
    assert_eq!(state.final_plan(&space).unwrap().layers, plan.layers);
    // A budget that asks two blocks more than the start removes is met at the layers' edges,
    // not by a kept head.
    let tighter = PgConfig {
        sparsity: cfg.sparsity + 2.0 * space.cost[groups[0][0]] / space.pool,
        ..cfg.clone()
    };
    let fitted = PgState::new(tighter, &space, &init).unwrap();
    let fitted = fitted.final_plan(&space).unwrap();
    for (a, b) in fitted.layers.iter().zip(&plan.layers) {
        assert_eq!(a.kv_groups, b.kv_groups);
        assert!(
            a.channels
                .iter()
                .all(|c| b.channels.binary_search(c).is_ok())
        );
    }
    let kept = |p: &MaskPlan| p.layers.iter().map(|l| l.channels.len()).sum::<usize>();
    assert_eq!(kept(&fitted) + 8, kept(&plan));
    // Masks keep a prefix of each layer's blocks (the start's order), of varying width; a loss
    // that grows with layer 2's width moves its width down, and the budget holds.
    let mut seen = std::collections::BTreeSet::new();
    let start2 = width(&state, 2);
    for _ in 0..cfg.steps {
        state
            .step(&space, &mut |p| {
                for g in &groups {
                    let lp = &p.layers[space.units[g[0]].layer()];
                    if lp.kv_groups.is_empty() && lp.channels.is_empty() {
                        continue;
                    }
                    let kept: Vec<bool> = g
                        .iter()
                        .map(|&i| {
                            let ch = space.channels_of(i);
                            let k = ch
                                .iter()
                                .filter(|c| lp.channels.binary_search(c).is_ok())
                                .count();
                            assert!(k == 0 || k == ch.len());
                            k > 0
                        })
                        .collect();
                    let k = kept.iter().filter(|&&x| x).count();
                    assert!(kept[..k].iter().all(|&x| x), "not a prefix: {kept:?}");
                    seen.insert((g[0], k));
                }
                Ok(p.layers[2].channels.len() as f64 / 48.0)
            })
            .unwrap();
        assert!(tied(&state));
        let target = state.keep_target.unwrap();
        assert!((space.expected_kept(&state.probs) - target).abs() < 1e-4);
    }
    assert!(seen.iter().filter(|(g, _)| *g == groups[2][0]).count() > 2);
    assert!(
        width(&state, 2) < start2 - 1.0,
        "{start2} -> {}",
        width(&state, 2)
    );
    let end = state.final_plan(&space).unwrap();
    assert!(end.layers[2].channels.len() < plan.layers[2].channels.len());
    assert!((end.kept_param_ratio() - cfg.keep()).abs() < 0.05);
    // A checkpoint resumes the same search.
    let path = std::env::temp_dir().join(format!("lopper-widths-{}.json", std::process::id()));
    state.save(&path).unwrap();
    let (mut back, rebuilt) = PgState::load(&path, &shape).unwrap();
    std::fs::remove_file(&path).ok();
    assert_eq!(rebuilt, space);
    assert_eq!(back, state);
    let mut loss = |p: &MaskPlan| Ok(p.layers[2].channels.len() as f64);
    state.config.steps += 1;
    back.config.steps += 1;
    state.step(&space, &mut loss).unwrap();
    back.step(&space, &mut loss).unwrap();
    assert_eq!(back.to_json(), state.to_json());
    // Widths need blocks and a per-unit estimator.
    for (block, est, anneal) in [
        (0, Estimator::Ref, 0),
        (4, Estimator::Regression, 0),
        (4, Estimator::Ref, 3),
    ] {
        let bad = PgConfig {
            channel_block: block,
            estimator: est,
            anneal,
            ..cfg.clone()
        };
        assert!(bad.validate().unwrap_err().to_string().contains("--widths"));
    }
}

#[test]
fn channel_blocks_must_partition_each_layer() {
    let shape = ModelShape::tiny();
    let space = UnitSpace::new(&shape, &fine()).unwrap();
    let whole = |n: usize| -> Vec<Vec<usize>> { (0..n).map(|c| vec![c]).collect() };
    let mut layout: BlockLayout = shape.layers.iter().map(|l| whole(l.ffn_hidden)).collect();
    assert!(space.clone().with_channel_blocks(&layout).is_ok());
    // Uniform starts cut contiguous blocks, ordered by index.
    let uniform = block_layout(&shape, &Init::Uniform, 16);
    assert_eq!(uniform[0][1], (16..32).collect::<Vec<_>>());
    layout[1][3] = vec![2];
    let err = space.clone().with_channel_blocks(&layout).unwrap_err();
    assert!(err.to_string().contains("layer 1"), "{err}");
    layout[1][3] = vec![3];
    layout[0].pop();
    let err = space.clone().with_channel_blocks(&layout).unwrap_err();
    assert!(err.to_string().contains("leave channels out"), "{err}");
    layout.pop();
    assert!(space.with_channel_blocks(&layout).is_err());
    // Blocks need a parameter budget.
    let mut cfg = config(Budget::PerType, fine());
    cfg.channel_block = 8;
    assert!(
        cfg.validate()
            .unwrap_err()
            .to_string()
            .contains("--budget params")
    );
}

#[test]
fn a_narrower_start_band_keeps_the_plan_and_samples_nearer_it() {
    let shape = ModelShape::tiny();
    let space = UnitSpace::new(&shape, &all_units()).unwrap();
    let (plan, cfg) = plan_start(&shape, &space);
    let init = scored_start(&plan, &shape);
    let flips = |cfg: PgConfig| {
        let mut state = PgState::new(cfg, &space, &init).unwrap();
        assert_eq!(state.final_plan(&space).unwrap().layers, plan.layers);
        let start: Vec<bool> = state.probs.iter().map(|&p| p > 0.5).collect();
        (0..50)
            .map(|_| {
                let m = state.sample();
                m.iter().zip(&start).filter(|(a, b)| a != b).count()
            })
            .sum::<usize>()
    };
    let mut narrow = cfg.clone();
    narrow.start_band = Some((0.97, 0.99));
    let (wide, near) = (flips(cfg.clone()), flips(narrow));
    assert!(
        near * 3 < wide,
        "flips per 50 masks: {near} (narrow) vs {wide}"
    );
    let mut bad = cfg;
    bad.start_band = Some((0.4, 0.9));
    assert!(
        bad.validate()
            .unwrap_err()
            .to_string()
            .contains("--start-band")
    );
    bad.start_band = Some((0.9, 0.995));
    assert!(bad.validate().is_err(), "above 1 - the probability floor");
}

#[test]
fn the_regression_estimator_recovers_additive_unit_effects() {
    // A loss that is a sum of per-unit effects: removing unit i costs delta_i.
    let shape = ModelShape::tiny();
    let space = UnitSpace::new(&shape, &fine()).unwrap();
    let n = space.units.len();
    let delta: Vec<f64> = (0..n).map(|i| ((i * 37 % 101) as f64) / 1000.0).collect();
    let index: std::collections::HashMap<PruneUnit, usize> = space
        .units
        .iter()
        .enumerate()
        .map(|(i, &u)| (u, i))
        .collect();
    let loss = |plan: &MaskPlan| -> f64 {
        let mut l = 3.0;
        for (layer, lp) in plan.layers.iter().enumerate() {
            for g in 0..shape.layers[layer].n_kv_heads {
                if !lp.kv_groups.contains(&g) {
                    l += delta[index[&PruneUnit::KvGroup { layer, group: g }]];
                }
            }
            for c in 0..shape.layers[layer].ffn_hidden {
                if lp.channels.binary_search(&c).is_err() {
                    l += delta[index[&PruneUnit::Channel { layer, index: c }]];
                }
            }
        }
        l
    };
    let corr = |a: &[f64], b: &[f64]| {
        let m = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
        let (ma, mb) = (m(a), m(b));
        let cov: f64 = a.iter().zip(b).map(|(x, y)| (x - ma) * (y - mb)).sum();
        let va: f64 = a.iter().map(|x| (x - ma).powi(2)).sum();
        let vb: f64 = b.iter().map(|y| (y - mb).powi(2)).sum();
        cov / (va * vb).sqrt()
    };
    let truth: Vec<f64> = delta.iter().map(|d| -d).collect();
    let mean_cost = space.cost.iter().sum::<f64>() / n as f64;
    let mut found = Vec::new();
    for estimator in [Estimator::Regression, Estimator::Ref] {
        let mut cfg = config(Budget::Params, fine());
        cfg.estimator = estimator;
        cfg.baseline = Baseline::LeaveOneOut;
        cfg.antithetic = true;
        cfg.sparsity = 0.3;
        let mut state = PgState::new(cfg, &space, &Init::Uniform).unwrap();
        let mut sum = vec![0.0; n];
        let mut last = Vec::new();
        let steps = 2 * n;
        for _ in 0..steps {
            let (g, _) = state.estimate(&space, &mut |p| Ok(loss(p))).unwrap();
            sum.iter_mut()
                .zip(&g)
                .for_each(|(s, x)| *s += x / steps as f64);
            last = g;
        }
        let est = match estimator {
            // The surrogate's coefficients, the cost weighting undone.
            Estimator::Regression => last
                .iter()
                .zip(&space.cost)
                .map(|(g, c)| g * c / mean_cost)
                .collect(),
            _ => sum,
        };
        found.push(corr(&est, &truth));
    }
    // 2n pairs: the surrogate is nearly exact; the score-function mean is still noise-bound.
    assert!(found[0] > 0.95, "regression: {found:?}");
    assert!(found[1] < found[0] - 0.2, "ref: {found:?}");
    // Too many units for the matrix are refused with the fix.
    let mut cfg = config(Budget::Params, fine());
    cfg.estimator = Estimator::Regression;
    let big = ModelShape {
        layers: vec![shape.layers[0]; 100],
        ..shape.clone()
    };
    let space = UnitSpace::new(&big, &fine()).unwrap();
    let err = PgState::new(cfg.clone(), &space, &Init::Uniform).unwrap_err();
    assert!(err.to_string().contains("--channel-block"), "{err}");
    cfg.samples_per_step = 3;
    assert!(cfg.validate().unwrap_err().to_string().contains("in pairs"));
}

#[test]
fn warmup_steps_score_masks_without_moving_the_probabilities() {
    let shape = ModelShape::tiny();
    let space = UnitSpace::new(&shape, &fine()).unwrap();
    let mut cfg = config(Budget::Params, fine());
    cfg.estimator = Estimator::Regression;
    cfg.warmup = 3;
    cfg.steps = 5;
    let mut state = PgState::new(cfg.clone(), &space, &Init::Uniform).unwrap();
    let start = state.probs.clone();
    let loss = |p: &MaskPlan| Ok(p.layers.iter().map(|l| l.channels.len()).sum::<usize>() as f64);
    let mut scored = 0;
    for _ in 0..3 {
        let r = state.step(&space, &mut |p| loss(p)).unwrap();
        scored += r.losses.len();
    }
    assert_eq!(scored, 6);
    assert_eq!(state.probs, start, "warm-up steps do not update");
    state.step(&space, &mut |p| loss(p)).unwrap();
    assert_ne!(state.probs, start, "the first step after the warm-up does");
    cfg.warmup = 5;
    assert!(cfg.validate().unwrap_err().to_string().contains("--warmup"));
}

#[test]
fn a_layers_only_search_keeps_the_start_heads_and_channels_fixed() {
    let shape = ModelShape::tiny();
    let all = UnitSpace::new(&shape, &all_units()).unwrap();
    let (plan, mut cfg) = plan_start(&shape, &all);
    cfg.units = vec![UnitKind::Layer];
    let init = scored_start(&plan, &shape);
    let space = cfg.space(&shape, &init).unwrap();
    assert!(space.base.is_some() && space.units.len() == shape.n_layers());
    // Each layer unit costs what the start keeps in it (all of a layer the start drops).
    assert!(space.fixed_removed() > 0.0);
    let state = PgState::new(cfg.clone(), &space, &init).unwrap();
    assert_eq!(state.final_plan(&space).unwrap().layers, plan.layers);
    // Sampled plans drop or keep whole layers; a kept layer has the start's units (or all of
    // them where the start dropped it).
    let mut state = state;
    let mut seen = 0;
    state
        .step(&space, &mut |p| {
            for (l, lp) in p.layers.iter().enumerate() {
                let gone = lp.kv_groups.is_empty() && lp.channels.is_empty();
                let start = &plan.layers[l];
                let start_gone = start.kv_groups.is_empty() && start.channels.is_empty();
                assert!(gone || start_gone || lp == start, "layer {l}");
            }
            seen += 1;
            Ok(seen as f64)
        })
        .unwrap();
    // A checkpoint rebuilds the same space.
    let path = std::env::temp_dir().join(format!("lopper-base-{}.json", std::process::id()));
    state.save(&path).unwrap();
    let (back, rebuilt) = PgState::load(&path, &shape).unwrap();
    std::fs::remove_file(&path).ok();
    assert_eq!(rebuilt, space);
    assert_eq!(back, state);
    // Heads or channels searched too: no fixed base.
    assert!(space.clone().with_base(&plan).is_ok());
    assert!(all.with_base(&plan).is_err());
}

#[test]
fn an_entropy_anneal_sharpens_the_last_steps_toward_the_final_plan() {
    let shape = ModelShape::tiny();
    let all = UnitSpace::new(&shape, &all_units()).unwrap();
    let (plan, mut cfg) = plan_start(&shape, &all);
    cfg.steps = 8;
    cfg.anneal = 4;
    let init = scored_start(&plan, &shape);
    let space = cfg.space(&shape, &init).unwrap();
    let mut state = PgState::new(cfg.clone(), &space, &init).unwrap();
    let start_plan = state.final_plan(&space).unwrap();
    // Every mask scores the same: the gradient is zero, only the anneal moves anything.
    let mut entropies = vec![binary_entropy(&state.probs)];
    for _ in 0..cfg.steps {
        state.step(&space, &mut |_| Ok(1.0)).unwrap();
        entropies.push(binary_entropy(&state.probs));
        assert!((space.expected_kept(&state.probs) - cfg.keep()).abs() < 1e-5);
    }
    for w in entropies[..5].windows(2) {
        assert!((w[0] - w[1]).abs() < 1e-5, "{entropies:?}");
    }
    for w in entropies[4..].windows(2) {
        assert!(w[1] < w[0], "{entropies:?}");
    }
    assert!(entropies[8] < 0.5 * entropies[4], "{entropies:?}");
    assert_eq!(state.final_plan(&space).unwrap().layers, start_plan.layers);
    // Kept units end near the ceiling, removed ones near the floor.
    let kept = state.probs.iter().filter(|&&p| p > 0.5).count();
    let sharp = state
        .probs
        .iter()
        .filter(|&&p| !(0.1..=0.9).contains(&p))
        .count();
    assert!(
        kept > 0 && sharp as f64 > 0.9 * state.probs.len() as f64,
        "{:?}",
        state.probs
    );
    cfg.anneal = 9;
    assert!(
        cfg.validate()
            .unwrap_err()
            .to_string()
            .contains("--anneal 9")
    );
}
