//! A model split over two devices runs every step of a pruning run (evaluation, every metric
//! method, the policy-gradient search, bias compensation and its check, least-squares
//! reconstruction, surgery) with the unsplit model's results. The two devices are burn's
//! dispatch backend over Flex and ndarray: distinct devices on the CPU, whose tensors panic
//! when they meet in one op, so a step that forgets to move a tensor to a layer's device fails
//! here as it would on two GPUs.

mod common;

use burn::tensor::Tensor;
use burn_dispatch::{Dispatch, DispatchDevice};
use lopper_core::{MaskPlan, ModelShape, UnitKind};
use lopper_importance::{Method, MethodSettings, method_plan};
use lopper_model::{DeviceMap, Llama, Masks};
use lopper_policy::{Init, PgConfig, PgState, UnitSpace};

type D = Dispatch;

fn devices() -> Vec<DispatchDevice> {
    vec![
        DispatchDevice::Flex(Default::default()),
        DispatchDevice::NdArray(Default::default()),
    ]
}

/// Seeded token windows of the tiny model's vocabulary.
fn windows(n: usize, len: usize, vocab: usize, seed: u64) -> Vec<Vec<u32>> {
    let mut s = seed;
    (0..n)
        .map(|_| {
            (0..len)
                .map(|_| {
                    s = s
                        .wrapping_mul(6_364_136_223_846_793_005)
                        .wrapping_add(1_442_695_040_888_963_407);
                    ((s >> 33) % vocab as u64) as u32
                })
                .collect()
        })
        .collect()
}

fn values<const N: usize>(t: Tensor<D, N>) -> Vec<f32> {
    t.into_data().convert::<f32>().to_vec().unwrap()
}

fn assert_close(a: &[f32], b: &[f32], what: &str) {
    assert_eq!(a.len(), b.len(), "{what}");
    let d = a
        .iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs() / (1.0 + y.abs()))
        .fold(0.0f32, f32::max);
    assert!(d < 1e-4, "{what}: the split model differs by {d}");
}

fn logits(model: &Llama<D>, t: &[Vec<u32>]) -> Vec<f32> {
    values(model.forward(model.tokens(t).unwrap()))
}

/// The dense model's calibration input means of every o_proj and down_proj.
fn means(model: &Llama<D>, calib: &[Vec<u32>]) -> lopper_surgery::InputMeans {
    let (o_proj, down_proj) = lopper_importance::input_means(model, calib, 4).unwrap();
    lopper_surgery::InputMeans { o_proj, down_proj }
}

/// A short search over KV groups, channels and layers, every mask scored with bias
/// compensation.
fn pg_plan(model: &Llama<D>, calib: &[Vec<u32>]) -> (MaskPlan, Vec<f64>) {
    let units = [UnitKind::KvGroup, UnitKind::Channel, UnitKind::Layer];
    let space = UnitSpace::new(model.shape(), &units).unwrap();
    let cfg = PgConfig {
        units: units.to_vec(),
        steps: 3,
        batch_size: 2,
        compensation: true,
        compensation_auto: false,
        ..PgConfig::preset("lopper", 0.3).unwrap()
    };
    let mut state = PgState::new(cfg, &space, &Init::Uniform).unwrap();
    let means = means(model, calib);
    let losses = common::search_losses(model, calib, Some(&means), &space, &mut state);
    (state.final_plan(&space).unwrap(), losses)
}

/// Each of `methods` plans `a` (placed or offloaded) as it plans the resident `b`, at 30%.
fn same_plans(a: &Llama<D>, b: &Llama<D>, calib: &[Vec<u32>], methods: &[Method]) {
    let settings = MethodSettings {
        batch_size: 4,
        ..MethodSettings::default()
    };
    for &method in methods {
        let pa = method_plan(a, calib, method, 0.7, &settings, |_| {}).unwrap();
        let pb = method_plan(b, calib, method, 0.7, &settings, |_| {}).unwrap();
        assert_eq!(pa.plan.layers, pb.plan.layers, "{method:?}");
    }
}

#[test]
fn a_model_split_over_two_devices_runs_every_pruning_step_as_the_unsplit_model() {
    let shape = ModelShape::tiny();
    let devices = devices();
    let plain = Llama::<D>::random(&shape, 3, &devices[0]).unwrap();
    let calib = windows(12, 16, shape.vocab_size, 7);
    let plain_pg = pg_plan(&plain, &calib);
    // A run that changes device once, and one that goes back and forth.
    for map in [vec![0, 1, 1], vec![1, 0, 1]] {
        let placed = plain
            .clone()
            .place(&devices, &DeviceMap::new(map.clone(), 2).unwrap())
            .unwrap();
        for (i, &d) in map.iter().enumerate() {
            assert_eq!(placed.layer_device(i), Some(devices[d].clone()), "{map:?}");
        }
        assert_close(
            &logits(&placed, &calib[..2]),
            &logits(&plain, &calib[..2]),
            "logits",
        );
        // Masks made on device 0 reach every layer.
        let mut plan = MaskPlan::keep_all(&shape);
        plan.layers[1].channels.retain(|&c| c % 4 != 0);
        plan.layers[2].kv_groups.retain(|&g| g != 1);
        let masks = Masks::from_plan(&plan, &devices[0]).unwrap();
        let t = plain.tokens(&calib[..2]).unwrap();
        assert_close(
            &values(placed.forward_masked(t.clone(), Some(&masks)).unwrap()),
            &values(plain.forward_masked(t, Some(&masks)).unwrap()),
            "masked logits",
        );
        // Evaluation: perplexity, and the log-likelihoods of multiple-choice continuations
        // (read off the last layer's device).
        let ppl = |m: &Llama<D>| lopper_eval::perplexity(m, &calib, 4, None, |_| {}).unwrap();
        assert!((ppl(&placed).nll_sum - ppl(&plain).nll_sum).abs() < 1e-3);
        let tok = lopper_model::Tokenizer::word_level(shape.vocab_size);
        let requests: Vec<(String, String)> = (0..6)
            .map(|i| {
                (
                    format!("t{i} t{} t7", i + 3),
                    format!(" t{} t{}", i * 5, i + 1),
                )
            })
            .collect();
        let ll = |m: &Llama<D>| {
            lopper_eval::loglikelihoods(m, &tok, &requests, 4, |_| {})
                .unwrap()
                .into_iter()
                .map(|(l, _)| l as f32)
                .collect::<Vec<_>>()
        };
        assert_close(&ll(&placed), &ll(&plain), "multiple-choice log-likelihoods");
        // Every metric method.
        same_plans(
            &placed,
            &plain,
            &calib,
            &[
                Method::Flap,
                Method::WandaSp,
                Method::LlmBip,
                Method::BlockInfluence,
                Method::Sleb,
                Method::LlmPruner,
                Method::MiniLlm,
                Method::Ifso,
            ],
        );
        // The search: the same sampled masks, losses and plan.
        let (plan_pg, losses) = pg_plan(&placed, &calib);
        assert_eq!(plan_pg.layers, plain_pg.0.layers, "{map:?}");
        let d = losses
            .iter()
            .zip(&plain_pg.1)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f64::max);
        assert!(d < 1e-4, "search losses differ by {d}");
        // Compensation, its check, the least-squares cut and plain surgery: the cut models
        // stay split and compute what the unsplit ones do.
        let (means, plain_means) = (means(&placed, &calib), means(&plain, &calib));
        let (extra, sel) =
            lopper_surgery::select_compensation(&placed, &plan_pg, &means, &calib, 4, |_| {})
                .unwrap();
        let (plain_extra, plain_sel) =
            lopper_surgery::select_compensation(&plain, &plan_pg, &plain_means, &calib, 4, |_| {})
                .unwrap();
        assert!(
            (sel.loss_chosen - plain_sel.loss_chosen).abs() < 1e-4,
            "{sel:?}"
        );
        let check = &calib[..2];
        let biased = lopper_surgery::prune_with_biases(&placed, &plan_pg, &extra).unwrap();
        let plain_biased =
            lopper_surgery::prune_with_biases(&plain, &plan_pg, &plain_extra).unwrap();
        assert_close(
            &logits(&biased, check),
            &logits(&plain_biased, check),
            "compensated cut",
        );
        for (obs, inputs) in [
            (false, lopper_sparse::InputRefit::Off),
            (true, lopper_sparse::InputRefit::All),
        ] {
            let settings = lopper_sparse::ReconSettings {
                obs,
                inputs,
                ..Default::default()
            };
            let (ls, _, _) =
                lopper_sparse::reconstruct(&placed, &plan_pg, &calib, &settings, |_| {}).unwrap();
            let (plain_ls, _, _) =
                lopper_sparse::reconstruct(&plain, &plan_pg, &calib, &settings, |_| {}).unwrap();
            assert_close(
                &logits(&ls, check),
                &logits(&plain_ls, check),
                &format!("ls cut (obs {obs}, inputs {inputs})"),
            );
        }
        // One-shot unstructured pruning, layer by layer on the pruned stream.
        for method in [
            lopper_sparse::SparseMethod::Wanda,
            lopper_sparse::SparseMethod::SparseGpt,
        ] {
            let settings = lopper_sparse::SparseSettings::default();
            let pattern = lopper_sparse::Pattern::Unstructured(0.5);
            let (a, _) =
                lopper_sparse::prune_model(&placed, &calib, method, pattern, &settings, |_| {})
                    .unwrap();
            let (b, _) =
                lopper_sparse::prune_model(&plain, &calib, method, pattern, &settings, |_| {})
                    .unwrap();
            assert_close(
                &logits(&a, check),
                &logits(&b, check),
                &format!("{method:?}"),
            );
        }
        let cut = lopper_surgery::prune(&placed, &plan_pg).unwrap();
        assert_close(
            &logits(&cut, check),
            &logits(&lopper_surgery::prune(&plain, &plan_pg).unwrap(), check),
            "cut",
        );
        for (i, &d) in map.iter().enumerate() {
            assert_eq!(cut.layer_device(i), Some(devices[d].clone()), "cut {map:?}");
        }
    }
}

#[test]
fn recovery_of_a_split_model_trains_and_resumes_as_the_unsplit_one() {
    use lopper_recover::{Adapt, LossKind, RecoverConfig, Recovery};
    let shape = ModelShape::tiny();
    let devices = devices();
    let teacher = Llama::<D>::random(&shape, 5, &devices[0]).unwrap();
    let mut plan = MaskPlan::keep_all(&shape);
    plan.layers[1].channels.retain(|&c| c % 3 != 0);
    plan.layers[2].kv_groups.retain(|&g| g != 0);
    let student = lopper_surgery::prune(&teacher, &plan).unwrap();
    let map = DeviceMap::new(vec![0, 1, 1], 2).unwrap();
    let place = |m: &Llama<D>| m.clone().place(&devices, &map).unwrap();
    let (placed_student, placed_teacher) = (place(&student), place(&teacher));
    let batch = windows(4, 16, shape.vocab_size, 11);
    let lora = Adapt::Lora {
        rank: 4,
        alpha: 8.0,
    };
    for (adapt, loss) in [
        (lora, LossKind::Ce),
        (lora, LossKind::Kd),
        (Adapt::Full, LossKind::CeKd),
    ] {
        let cfg = RecoverConfig {
            adapt,
            loss,
            steps: 3,
            batch_size: 4,
            micro_batch: 2,
            lr: 1e-3,
            warmup: 1,
            ..RecoverConfig::default()
        };
        let what = format!("{adapt:?} {loss:?}");
        let train = |s: &Llama<D>, t: &Llama<D>, dir: &std::path::Path| {
            let mut r = Recovery::new(s, cfg).unwrap();
            let mut losses: Vec<f32> = (0..2)
                .map(|_| r.train_step(&batch, Some(t)).unwrap().loss as f32)
                .collect();
            // Checkpointed and resumed into a fresh copy of the student.
            r.save(dir).unwrap();
            let mut r = Recovery::resume(s, cfg, dir).unwrap();
            losses.push(r.train_step(&batch, Some(t)).unwrap().loss as f32);
            (losses, r.model().unwrap())
        };
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let (split_losses, split_model) = train(&placed_student, &placed_teacher, a.path());
        let (losses, model) = train(&student, &teacher, b.path());
        assert_close(&split_losses, &losses, &format!("{what}: training losses"));
        assert_close(
            &logits(&split_model, &batch[..2]),
            &logits(&model, &batch[..2]),
            &format!("{what}: the trained model"),
        );
        for (i, &d) in map.layers().iter().enumerate() {
            assert_eq!(
                split_model.layer_device(i),
                Some(devices[d].clone()),
                "{what}"
            );
        }
    }
}

/// Offloaded layers (left in their source and read onto their device for each turn, here over
/// the two devices) serve every pruning step that reads layers one at a time: scoring, the
/// search, compensation, surgery, least squares and one-shot pruning give the resident
/// model's results, and the cut model is resident. What needs every weight at once is refused
/// with a message that names the offload.
#[test]
fn an_offloaded_model_runs_every_pruning_step_as_the_resident_one() {
    let shape = ModelShape::tiny();
    let devices = devices();
    let map = DeviceMap::new(vec![0, 1, 1], 2).unwrap();
    let plain = Llama::<D>::random(&shape, 5, &devices[0]).unwrap();
    let source: lopper_model::SharedSource = std::sync::Arc::new(plain.to_host_weights());
    let off =
        Llama::<D>::offloaded(&shape, source, &devices, &map, lopper_core::Dtype::F32).unwrap();
    assert!(off.is_offloaded());
    let calib = windows(12, 16, shape.vocab_size, 11);
    let check = &calib[..2];
    assert_close(&logits(&off, check), &logits(&plain, check), "logits");
    same_plans(
        &off,
        &plain,
        &calib,
        &[
            Method::Flap,
            Method::WandaSp,
            Method::LlmBip,
            Method::BlockInfluence,
            Method::Sleb,
            Method::Random,
        ],
    );
    let settings = MethodSettings {
        batch_size: 4,
        ..MethodSettings::default()
    };
    for method in [
        Method::Magnitude(lopper_importance::Norm::L2),
        Method::LlmPruner,
        Method::MiniLlm,
        Method::Ifso,
    ] {
        let e = method_plan(&off, &calib, method, 0.7, &settings, |_| {})
            .err()
            .unwrap_or_else(|| panic!("{method:?} ran on offloaded layers"))
            .to_string();
        assert!(
            e.contains("offloaded") && e.contains("--offload"),
            "{method:?}: {e}"
        );
    }
    // The search: the same sampled masks, losses and plan.
    let (plan, losses) = pg_plan(&off, &calib);
    let (plain_plan, plain_losses) = pg_plan(&plain, &calib);
    assert_eq!(plan.layers, plain_plan.layers);
    let d = losses
        .iter()
        .zip(&plain_losses)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f64::max);
    assert!(d < 1e-4, "search losses differ by {d}");
    // Compensation and its check, surgery, least squares: resident cut models, the resident
    // model's results.
    let (m, plain_m) = (means(&off, &calib), means(&plain, &calib));
    let (extra, sel) =
        lopper_surgery::select_compensation(&off, &plan, &m, &calib, 4, |_| {}).unwrap();
    let (plain_extra, plain_sel) =
        lopper_surgery::select_compensation(&plain, &plan, &plain_m, &calib, 4, |_| {}).unwrap();
    assert!((sel.loss_chosen - plain_sel.loss_chosen).abs() < 1e-4);
    let biased = lopper_surgery::prune_with_biases(&off, &plan, &extra).unwrap();
    assert!(!biased.is_offloaded());
    assert_close(
        &logits(&biased, check),
        &logits(
            &lopper_surgery::prune_with_biases(&plain, &plan, &plain_extra).unwrap(),
            check,
        ),
        "compensated cut",
    );
    let cut = lopper_surgery::prune(&off, &plan).unwrap();
    assert!(!cut.is_offloaded());
    assert_close(
        &logits(&cut, check),
        &logits(&lopper_surgery::prune(&plain, &plan).unwrap(), check),
        "cut",
    );
    for (i, d) in [0, 1, 1].into_iter().enumerate() {
        if plan.kept_layers().contains(&i) {
            let k = plan.kept_layers().iter().position(|&j| j == i).unwrap();
            assert_eq!(
                cut.layer_device(k),
                Some(devices[d].clone()),
                "cut layer {i}"
            );
        }
    }
    for obs in [false, true] {
        let settings = lopper_sparse::ReconSettings {
            obs,
            ..Default::default()
        };
        let (ls, _, _) =
            lopper_sparse::reconstruct(&off, &plan, &calib, &settings, |_| {}).unwrap();
        let (plain_ls, _, _) =
            lopper_sparse::reconstruct(&plain, &plan, &calib, &settings, |_| {}).unwrap();
        assert!(!ls.is_offloaded());
        assert_close(
            &logits(&ls, check),
            &logits(&plain_ls, check),
            &format!("ls cut (obs {obs})"),
        );
    }
    let pattern = lopper_sparse::Pattern::Unstructured(0.5);
    let sparse = lopper_sparse::SparseSettings::default();
    let method = lopper_sparse::SparseMethod::SparseGpt;
    let (a, _) =
        lopper_sparse::prune_model(&off, &calib, method, pattern, &sparse, |_| {}).unwrap();
    let (b, _) =
        lopper_sparse::prune_model(&plain, &calib, method, pattern, &sparse, |_| {}).unwrap();
    assert!(!a.is_offloaded());
    assert_close(&logits(&a, check), &logits(&b, check), "one-shot");
}
