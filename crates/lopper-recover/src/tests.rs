use burn::backend::Autodiff;
use burn::tensor::{Tensor, TensorData};
use burn_flex::{Flex, FlexDevice};
use lopper_core::ModelShape;
use lopper_model::{LINEAR_NAMES, Llama};

use super::*;

type B = Flex;

fn tiny(seed: u64) -> Llama<B> {
    Llama::<B>::random(&ModelShape::tiny(), seed, &FlexDevice).unwrap()
}

/// A tiny model with one MLP removed and a narrower layer: recovery works on pruned shapes.
fn pruned_tiny(seed: u64) -> Llama<B> {
    let mut shape = ModelShape::tiny();
    shape.layers[1].ffn_hidden = 24;
    shape.layers[2].n_kv_heads = 1;
    shape.layers[2].n_heads = 2;
    Llama::<B>::random(&shape, seed, &FlexDevice).unwrap()
}

fn windows(n: usize, len: usize, salt: usize) -> Vec<Vec<u32>> {
    (0..n)
        .map(|w| {
            (0..len)
                .map(|t| ((w * 31 + t * 7 + salt * 13 + (t * t) % 5) % 128) as u32)
                .collect()
        })
        .collect()
}

fn logits(m: &Llama<B>, batch: &[Vec<u32>]) -> Vec<f32> {
    m.forward(m.tokens(batch).unwrap())
        .into_data()
        .to_vec::<f32>()
        .unwrap()
}

fn weights(m: &Llama<B>) -> Vec<(String, Vec<f32>)> {
    m.to_host_weights()
        .tensors
        .into_iter()
        .map(|(n, t)| (n, t.data))
        .collect()
}

fn lora(rank: usize) -> RecoverConfig {
    RecoverConfig {
        adapt: Adapt::Lora {
            rank,
            alpha: 2.0 * rank as f64,
        },
        loss: LossKind::Ce,
        steps: 12,
        batch_size: 4,
        micro_batch: 2,
        lr: 1e-2,
        warmup: 2,
        ..RecoverConfig::default()
    }
}

#[test]
fn lora_with_zero_b_leaves_the_model_unchanged_at_step_zero() {
    let m = pruned_tiny(3);
    let run = Recovery::new(&m, lora(4)).unwrap();
    let batch = windows(2, 10, 0);
    assert_eq!(logits(&run.model().unwrap(), &batch), logits(&m, &batch));
    let a = run.adapters().unwrap().unwrap();
    // 3 layers x 7 linears, A random and B zero.
    assert_eq!(a.slots.len(), 21);
    assert!(a.a.iter().all(|p| p.val().abs().max().into_scalar() > 0.0));
    assert!(a.b.iter().all(|p| p.val().abs().max().into_scalar() == 0.0));
    assert_eq!(run.trainable_params().unwrap(), a.num_params());
    // What the disk check plans with, from the shape alone.
    let adapt = lora(4).adapt;
    assert_eq!(adapt.trainable_params(m.shape()), a.num_params() as u64);
    assert_eq!(
        Adapt::Full.trainable_params(m.shape()),
        burn::module::Module::num_params(&m) as u64
    );
}

#[test]
fn merged_weights_equal_base_plus_scaled_a_b() {
    let m = pruned_tiny(4);
    let cfg = lora(3);
    let mut run = Recovery::new(&m, cfg).unwrap();
    let data = windows(8, 12, 1);
    for s in 0..3 {
        run.train_step(&data[s * 2..s * 2 + 4], None).unwrap();
    }
    let merged = run.model().unwrap();
    let ad = run.adapters().unwrap().unwrap();
    assert!(ad.b.iter().any(|p| p.val().abs().max().into_scalar() > 0.0));
    let scale = 2.0; // alpha / rank
    let mut checked = 0;
    for (i, &(l, k)) in ad.slots.iter().enumerate() {
        let w0 = m.layers[l].linears()[k].unwrap().weight.val();
        let w = merged.layers[l].linears()[k].unwrap().weight.val();
        let [din, dout] = w0.dims();
        let (a, b) = (
            ad.a[i].val().into_data().to_vec::<f32>().unwrap(),
            ad.b[i].val().into_data().to_vec::<f32>().unwrap(),
        );
        let (w0, w) = (
            w0.into_data().to_vec::<f32>().unwrap(),
            w.into_data().to_vec::<f32>().unwrap(),
        );
        for r in 0..din {
            for c in 0..dout {
                let ab: f64 = (0..3)
                    .map(|j| a[r * 3 + j] as f64 * b[j * dout + c] as f64)
                    .sum();
                let want = w0[r * dout + c] as f64 + scale * ab;
                let got = w[r * dout + c] as f64;
                assert!(
                    (got - want).abs() <= 1e-6 * (1.0 + want.abs()),
                    "layer {l} {} [{r},{c}]: {got} vs {want}",
                    LINEAR_NAMES[k]
                );
            }
        }
        checked += 1;
    }
    assert_eq!(checked, 21);
    // Only the adapted linears changed: embeddings and norms are the base's.
    let (before, after) = (weights(&m), weights(&merged));
    for ((n, x), (_, y)) in before.iter().zip(&after) {
        if !n.contains("proj") {
            assert_eq!(x, y, "{n} changed");
        }
    }
}

fn mean_loss(m: &Llama<B>, batch: &[Vec<u32>]) -> f64 {
    m.mean_loss(m.tokens(batch).unwrap(), None).unwrap()
}

#[test]
fn full_and_lora_training_reduce_the_loss_on_a_fixed_batch() {
    let m = pruned_tiny(5);
    let batch = windows(4, 16, 2);
    let before = mean_loss(&m, &batch);
    for cfg in [
        RecoverConfig {
            adapt: Adapt::Full,
            lr: 3e-3,
            ..lora(1)
        },
        lora(4),
    ] {
        let mut run = Recovery::new(&m, cfg).unwrap();
        let mut records = Vec::new();
        for _ in 0..cfg.steps {
            records.push(run.train_step(&batch, None).unwrap());
        }
        let after = mean_loss(&run.model().unwrap(), &batch);
        assert!(
            after < before - 0.5,
            "{:?}: loss {before} -> {after}",
            cfg.adapt
        );
        // The step's reported loss is the model's loss on the batch before the step.
        assert!((records[0].loss - before).abs() < 1e-4, "{records:?}");
        assert_eq!(records[0].tokens, 4 * 15);
        assert!(records.iter().all(|r| r.grad_norm > 0.0 && r.ce.is_some()));
        assert_eq!(records[1].lr, cfg.lr);
    }
}

#[test]
fn kd_with_the_teacher_equal_to_the_student_is_zero() {
    let m = pruned_tiny(6);
    let batch = windows(4, 10, 3);
    for top_k in [None, Some(5)] {
        for temperature in [1.0, 2.0] {
            let cfg = RecoverConfig {
                loss: LossKind::Kd,
                distill: Distill {
                    temperature,
                    top_k,
                    weight: 1.0,
                },
                ..lora(2)
            };
            let mut run = Recovery::new(&m, cfg).unwrap();
            let r = run.train_step(&batch, Some(&m)).unwrap();
            assert!(r.loss.abs() < 1e-6, "{top_k:?} T={temperature}: {r:?}");
            assert!(r.grad_norm < 1e-4, "{r:?}");
            assert_eq!((r.ce, r.kd.map(|k| k.abs() < 1e-6)), (None, Some(true)));
        }
    }
}

#[test]
fn kd_loss_is_the_temperature_scaled_kl_of_the_teacher_to_the_student() {
    type A = Autodiff<B>;
    let (rows, vocab) = (3, 7);
    let s: Vec<f32> = (0..rows * vocab)
        .map(|i| ((i * 37 % 11) as f32 - 5.0) * 0.3)
        .collect();
    let t: Vec<f32> = (0..rows * vocab)
        .map(|i| ((i * 53 % 13) as f32 - 6.0) * 0.25)
        .collect();
    let softmax = |x: &[f64]| {
        let m = x.iter().cloned().fold(f64::MIN, f64::max);
        let z: f64 = x.iter().map(|v| (v - m).exp()).sum();
        x.iter().map(|v| (v - m).exp() / z).collect::<Vec<_>>()
    };
    for (temp, k) in [(1.0, None), (2.0, None), (1.5, Some(3))] {
        let mut want = 0.0;
        for r in 0..rows {
            let sr: Vec<f64> = s[r * vocab..(r + 1) * vocab]
                .iter()
                .map(|&v| v as f64)
                .collect();
            let tr: Vec<f64> = t[r * vocab..(r + 1) * vocab]
                .iter()
                .map(|&v| v as f64)
                .collect();
            // The teacher's top-k columns (all columns without k).
            let mut idx: Vec<usize> = (0..vocab).collect();
            idx.sort_by(|&a, &b| tr[b].total_cmp(&tr[a]));
            idx.truncate(k.unwrap_or(vocab));
            let p = softmax(&idx.iter().map(|&i| tr[i] / temp).collect::<Vec<_>>());
            let q = softmax(&idx.iter().map(|&i| sr[i] / temp).collect::<Vec<_>>());
            want += p
                .iter()
                .zip(&q)
                .map(|(p, q)| p * (p.ln() - q.ln()))
                .sum::<f64>();
        }
        want *= temp * temp / rows as f64;
        let st = Tensor::<A, 2>::from_data(TensorData::new(s.clone(), [rows, vocab]), &FlexDevice);
        let tt = Tensor::<B, 2>::from_data(TensorData::new(t.clone(), [rows, vocab]), &FlexDevice);
        let d = Distill {
            temperature: temp,
            top_k: k,
            weight: 1.0,
        };
        // The fused pass (lopper-kernels, over the full vocabulary) and burn's ops give the
        // value above and the same gradient with respect to the student.
        let run = || {
            let st = st.clone().require_grad();
            let loss = kd_loss(st.clone(), tt.clone(), &d);
            let grads = loss.backward();
            let g: Vec<f32> = st.grad(&grads).unwrap().into_data().to_vec().unwrap();
            (loss.into_scalar() as f64, g)
        };
        let (got, grad) = run();
        let (slow, slow_grad) = lopper_kernels::portable(run);
        for v in [got, slow] {
            assert!((v - want).abs() < 1e-5, "T={temp} k={k:?}: {v} vs {want}");
        }
        let worst = grad
            .iter()
            .zip(&slow_grad)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(
            worst < 1e-6,
            "T={temp} k={k:?}: gradients differ by {worst}"
        );
        assert!(grad.iter().any(|g| g.abs() > 1e-3), "{grad:?}");
        assert!(want > 0.01);
    }
}

#[test]
fn distillation_moves_the_student_towards_the_teacher() {
    let teacher = pruned_tiny(7);
    let student = pruned_tiny(8);
    let batch = windows(4, 12, 4);
    for loss in [LossKind::Kd, LossKind::CeKd] {
        let cfg = RecoverConfig {
            loss,
            adapt: Adapt::Full,
            lr: 1e-2,
            steps: 20,
            ..lora(1)
        };
        let mut run = Recovery::new(&student, cfg).unwrap();
        let first = run.train_step(&batch, Some(&teacher)).unwrap();
        let mut last = first.clone();
        for _ in 1..cfg.steps {
            last = run.train_step(&batch, Some(&teacher)).unwrap();
        }
        let (k0, k1) = (first.kd.unwrap(), last.kd.unwrap());
        if loss == LossKind::Kd {
            assert!(k1 < 0.5 * k0, "kd {k0} -> {k1}");
            assert_eq!((first.loss, first.ce), (k0, None));
        } else {
            assert!(last.loss < 0.5 * first.loss, "{first:?} -> {last:?}");
            assert!(
                (first.loss - first.ce.unwrap() - k0).abs() < 1e-5,
                "{first:?}"
            );
        }
    }
}

#[test]
fn a_resumed_run_is_bit_identical_to_one_that_never_stopped() {
    let m = pruned_tiny(9);
    let teacher = tiny(10);
    let data = windows(24, 10, 5);
    for cfg in [
        RecoverConfig {
            loss: LossKind::CeKd,
            steps: 6,
            ..lora(2)
        },
        RecoverConfig {
            adapt: Adapt::Full,
            steps: 6,
            lr: 1e-3,
            ..lora(1)
        },
    ] {
        let batch = |s: usize| &data[s * 4..s * 4 + 4];
        let mut straight = Recovery::new(&m, cfg).unwrap();
        let mut want = Vec::new();
        for s in 0..6 {
            want.push(straight.train_step(batch(s), Some(&teacher)).unwrap());
        }
        let dir = tempfile::tempdir().unwrap();
        let mut first = Recovery::new(&m, cfg).unwrap();
        for s in 0..3 {
            first.train_step(batch(s), Some(&teacher)).unwrap();
        }
        first.save(dir.path()).unwrap();
        // A later save replaces the files of the earlier one.
        first.train_step(batch(3), Some(&teacher)).unwrap();
        drop(first);
        assert!(Recovery::<B>::has_checkpoint(dir.path()));
        let mut resumed = Recovery::resume(&m, cfg, dir.path()).unwrap();
        assert_eq!(resumed.step(), 3);
        let mut got = Vec::new();
        for s in 3..6 {
            got.push(resumed.train_step(batch(s), Some(&teacher)).unwrap());
        }
        for (g, w) in got.iter().zip(&want[3..]) {
            assert_eq!(
                (g.step, g.loss, g.grad_norm, g.lr),
                (w.step, w.loss, w.grad_norm, w.lr)
            );
        }
        assert_eq!(
            weights(&resumed.model().unwrap()),
            weights(&straight.model().unwrap()),
            "{:?}",
            cfg.adapt
        );
        // Different settings are refused.
        let other = RecoverConfig {
            lr: cfg.lr * 2.0,
            ..cfg
        };
        let e = Recovery::resume(&m, other, dir.path()).unwrap_err();
        assert!(e.to_string().contains("same flags"), "{e}");
        resumed.save(dir.path()).unwrap();
        let bins = std::fs::read_dir(dir.path())
            .unwrap()
            .filter(|e| {
                e.as_ref()
                    .unwrap()
                    .file_name()
                    .to_string_lossy()
                    .ends_with(".bin")
            })
            .count();
        assert_eq!(bins, 2);
    }
}

#[test]
fn the_learning_rate_warms_up_then_decays_to_its_floor() {
    let cfg = RecoverConfig {
        steps: 11,
        warmup: 2,
        lr: 1.0,
        min_lr_ratio: 0.1,
        ..RecoverConfig::default()
    };
    assert_eq!(cfg.lr_at(0), 0.5);
    assert_eq!(cfg.lr_at(1), 1.0);
    assert!((cfg.lr_at(10) - 0.1).abs() < 1e-12);
    assert!((cfg.lr_at(6) - 0.55).abs() < 1e-12);
    let lrs: Vec<f64> = (1..11).map(|s| cfg.lr_at(s)).collect();
    assert!(lrs.windows(2).all(|w| w[1] <= w[0]), "{lrs:?}");
}

#[test]
fn impossible_settings_and_inputs_are_refused_with_the_flag() {
    let ok = RecoverConfig::default();
    ok.validate().unwrap();
    for (cfg, flag) in [
        (
            RecoverConfig {
                adapt: Adapt::Lora {
                    rank: 0,
                    alpha: 1.0,
                },
                ..ok
            },
            "--rank",
        ),
        (RecoverConfig { steps: 0, ..ok }, "--steps"),
        (
            RecoverConfig {
                micro_batch: 0,
                ..ok
            },
            "--micro-batch",
        ),
        (RecoverConfig { lr: f64::NAN, ..ok }, "--lr"),
        (RecoverConfig { warmup: 500, ..ok }, "--warmup"),
        (
            RecoverConfig {
                distill: Distill {
                    top_k: Some(0),
                    ..Distill::default()
                },
                ..ok
            },
            "--top-k",
        ),
        (
            RecoverConfig {
                clip_norm: Some(-1.0),
                ..ok
            },
            "--clip-norm",
        ),
    ] {
        let e = cfg.validate().unwrap_err().to_string();
        assert!(e.contains(flag), "{e}");
    }
    let m = pruned_tiny(11);
    let e = Recovery::new(
        &m,
        RecoverConfig {
            adapt: Adapt::Lora {
                rank: 40,
                alpha: 1.0,
            },
            ..ok
        },
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("--rank 40"), "{e}");
    let kd = RecoverConfig {
        loss: LossKind::Kd,
        ..ok
    };
    let mut run = Recovery::new(&m, kd).unwrap();
    let e = run
        .train_step(&windows(2, 8, 0), None)
        .unwrap_err()
        .to_string();
    assert!(e.contains("--teacher"), "{e}");
    let mut wide = ModelShape::tiny();
    wide.vocab_size = 256;
    let other = Llama::<B>::random(&wide, 1, &FlexDevice).unwrap();
    let e = run
        .train_step(&windows(2, 8, 0), Some(&other))
        .unwrap_err()
        .to_string();
    assert!(e.contains("vocabulary"), "{e}");
    assert!(run.train_step(&[vec![1]], Some(&m)).is_err());
    assert!("mse".parse::<LossKind>().is_err());
    assert_eq!("ce+kd".parse::<LossKind>().unwrap(), LossKind::CeKd);
}

#[test]
fn peft_adapters_have_peft_names_and_layouts() {
    let m = tiny(12);
    let run = Recovery::new(&m, lora(2)).unwrap();
    let (tensors, config) = run.adapters().unwrap().unwrap().peft().unwrap();
    assert_eq!(tensors.len(), 2 * 21);
    let (name, t) = &tensors[0];
    assert_eq!(
        name,
        "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    );
    assert_eq!(t.shape, vec![2, 32]);
    let (name, t) = &tensors[13];
    let (dims, data) = (&t.shape, &t.data);
    assert_eq!(
        name,
        "base_model.model.model.layers.0.mlp.down_proj.lora_B.weight"
    );
    assert_eq!(dims, &vec![32, 2]);
    assert!(data.iter().all(|&v| v == 0.0));
    assert_eq!(config["r"], 2);
    assert_eq!(config["lora_alpha"], 4.0);
}
