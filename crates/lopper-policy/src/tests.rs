use burn_flex::Flex;

use super::*;
use lopper_core::{ModelShape, PruneUnit, UnitKind, keep_count, top_k};
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
        ma_window: 5.0,
        seed: 42,
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
    let v = project(&mut s, 30.0, &|x: &[f64]| x.iter().sum(), 1e-3, 20, false);
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
    project(&mut t, 30.0, &|x: &[f64]| x.iter().sum(), 1e-9, 80, false);
    assert!((t.iter().sum::<f64>() - 30.0).abs() < 1e-6);
    // Already feasible (sum below the budget, inside [0, 1]): untouched.
    let mut u = vec![0.2, 0.5, 0.9];
    let before = u.clone();
    assert_eq!(
        project(&mut u, 2.0, &|x: &[f64]| x.iter().sum(), 1e-3, 20, false),
        0.0
    );
    assert_eq!(u, before);
    // Out of bounds below the budget: only clamped, never raised.
    let mut w = vec![-0.5, 0.3];
    project(&mut w, 1.5, &|x: &[f64]| x.iter().sum(), 1e-3, 20, false);
    assert_eq!(w, vec![0.0, 0.3]);
    // The exact mode raises them.
    let mut r = vec![0.2, 0.5];
    project(&mut r, 1.5, &|x: &[f64]| x.iter().sum(), 1e-9, 80, true);
    assert!((r.iter().sum::<f64>() - 1.5).abs() < 1e-8 && (r[1] - r[0] - 0.3).abs() < 1e-8);
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
    let stop = |s: &PgState| stop_at.is_some_and(|n| s.step >= n);
    let step_ptr = std::cell::Cell::new(state.step);
    search(
        model,
        &windows(),
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
