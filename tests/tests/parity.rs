//! Parity with Hugging Face transformers on the real default model (SmolLM2-135M-Instruct,
//! Q4_1 GGUF). Golden values: tests/fixtures/smollm2_golden.json (see its README).

#![allow(clippy::print_stderr)] // the measured gaps are reported, not only asserted

mod common;

use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorData};
use common::{default_model, default_model_path, floats, golden, ids};
use lopper_model::gguf::GgufFile;
use lopper_model::{Llama, Masks};

fn paragraph_ids() -> Vec<u32> {
    ids(&golden()["tokenization"]["texts"]["paragraph"]["ids_canonical_digit_split"])
}

#[test]
fn tokenizer_reproduces_the_reference_ids() {
    let tok = &default_model().tokenizer;
    for name in ["short", "paragraph", "mixed"] {
        let t = &golden()["tokenization"]["texts"][name];
        let text = t["text"].as_str().unwrap();
        let got = tok.encode(text).unwrap();
        assert_eq!(
            got,
            ids(&t["ids_canonical_digit_split"]),
            "token ids of `{name}`"
        );
        assert_eq!(
            tok.decode(&got).unwrap(),
            text,
            "decode round trip of `{name}`"
        );
    }
    assert_eq!(tok.bos_id, Some(1));
    assert_eq!(tok.eos_id, Some(2));
}

#[test]
fn dequantised_tensors_match_the_reference_spot_checks() {
    let file = GgufFile::open(&default_model_path()).unwrap();
    assert_eq!(file.version, 3);
    let checks = golden()["gguf_layout"]["dequant_spot_checks"]
        .as_object()
        .unwrap();
    for (name, c) in checks {
        let info = file.tensor_info(name).unwrap();
        assert_eq!(
            info.offset,
            c["data_offset_in_file"].as_u64().unwrap(),
            "{name} offset"
        );
        assert_eq!(
            format!("{:?}", info.ggml_type),
            c["ggml_type"].as_str().unwrap()
        );
        let (shape, data) = file.dequantize(name).unwrap();
        let want_shape: Vec<usize> = ids(&c["row_major_shape"])
            .iter()
            .map(|&x| x as usize)
            .collect();
        assert_eq!(shape, want_shape, "{name} shape");
        let sum: f64 = data.iter().map(|&x| x as f64).sum();
        let sum_sq: f64 = data.iter().map(|&x| (x as f64).powi(2)).sum();
        let rel = |a: f64, b: f64| (a - b).abs() / b.abs().max(1.0);
        assert!(
            rel(sum, c["sum"].as_f64().unwrap()) < 1e-9,
            "{name} sum {sum}"
        );
        assert!(
            rel(sum_sq, c["sum_sq"].as_f64().unwrap()) < 1e-9,
            "{name} sum_sq {sum_sq}"
        );
        let first = c.get("row0_first8").or(c.get("first8")).unwrap();
        for (a, b) in data.iter().zip(floats(first)) {
            assert!(
                (*a as f64 - b).abs() < 1e-12,
                "{name} first values: {a} vs {b}"
            );
        }
        if let Some(r1) = c.get("row1_first8") {
            let cols = shape[1];
            for (a, b) in data[cols..cols + 8].iter().zip(floats(r1)) {
                assert!((*a as f64 - b).abs() < 1e-12, "{name} row 1: {a} vs {b}");
            }
        }
    }
}

fn paragraph_forward_matches_transformers<B: Backend>(m: &Llama<B>) {
    let g = &golden()["paragraph_forward"];
    let tokens = m.tokens(&[paragraph_ids()]).unwrap();
    let logits = m.forward(tokens.clone());
    let [_, seq, vocab] = logits.dims();
    assert_eq!((seq, vocab), (100, 49152));
    let data: Vec<f32> = logits.clone().into_data().to_vec().unwrap();
    let row = |p: usize| &data[p * vocab..(p + 1) * vocab];

    let loss = m.mean_loss(tokens, None).unwrap();
    let want = g["mean_ce_loss_f64_from_f32_logits"].as_f64().unwrap();
    assert!((loss - want).abs() < 1e-3, "loss {loss} vs {want}");

    let mut worst: f64 = 0.0;
    for item in g["last3_top10"].as_array().unwrap() {
        let p = item["position"].as_u64().unwrap() as usize;
        for (id, want) in ids(&item["ids"]).iter().zip(floats(&item["logits"])) {
            let got = row(p)[*id as usize] as f64;
            worst = worst.max((got - want).abs());
            assert!(
                (got - want).abs() < 2e-2,
                "position {p} id {id}: {got} vs {want}"
            );
        }
    }
    let argmax = ids(&g["argmax_per_position"]);
    let agree = (0..seq)
        .filter(|&p| {
            let r = row(p);
            let best = (0..vocab).max_by(|&a, &b| r[a].total_cmp(&r[b])).unwrap();
            best as u32 == argmax[p]
        })
        .count();
    assert!(
        agree * 100 >= 98 * seq,
        "argmax agrees at {agree}/{seq} positions"
    );
    // Shown with `cargo test -- --nocapture`: the measured gaps, not just pass/fail.
    eprintln!(
        "paragraph: loss {loss:.6} vs {want:.6} (|diff| {:.1e}); top-10 logits max |diff| {worst:.1e}; argmax {agree}/{seq}",
        (loss - want).abs()
    );
}

fn hidden_states_match_transformers_checkpoints<B: Backend>(m: &Llama<B>) {
    let g = &golden()["paragraph_forward"]["hidden_state_checkpoints"];
    let tokens = m.tokens(&[paragraph_ids()]).unwrap();
    let mut seen = Vec::new();
    m.forward_with_hidden(tokens, None, |i, h| {
        if [0, 1, 15, 30].contains(&i) {
            seen.push((i, h.clone().into_data().to_vec::<f32>().unwrap()));
        }
    })
    .unwrap();
    let key = |i| match i {
        0 => "embedding_output(hidden_states[0])",
        1 => "after_layer_0(hidden_states[1])",
        15 => "after_layer_14(hidden_states[15])",
        _ => "after_layer_29_and_final_norm(hidden_states[30])",
    };
    for (i, h) in seen {
        let c = &g[key(i)];
        let l2 = |p: usize| {
            h[p * 576..(p + 1) * 576]
                .iter()
                .map(|x| (*x as f64).powi(2))
                .sum::<f64>()
                .sqrt()
        };
        for (p, k) in [(0, "pos0_l2"), (99, "pos_last_l2")] {
            let want = c[k].as_f64().unwrap();
            assert!(
                (l2(p) - want).abs() <= 1e-3 * want.max(1.0),
                "layer {i} {k}: {} vs {want}",
                l2(p)
            );
        }
        // Element errors scale with the vector's magnitude (reduced-precision f32 matmuls on
        // GPUs show ~1e-3 of the RMS), so the tolerance is relative to the position's RMS.
        let rms = c["pos0_l2"].as_f64().unwrap() / 576f64.sqrt();
        for (a, b) in h[..8].iter().zip(floats(&c["pos0_first8"])) {
            assert!(
                (*a as f64 - b).abs() <= 1e-3 * rms.max(1.0),
                "layer {i} pos0: {a} vs {b}"
            );
        }
    }
}

fn masked_loss<B: Backend>(m: &Llama<B>, cases: &str) -> f64 {
    let shape = m.shape();
    let device = m.device();
    let mut masks = Masks::<B>::none(shape);
    for case in cases.chars() {
        match case {
            // Layer 3: drop query heads 0 and 4 (their outputs contribute nothing to o_proj).
            'a' => {
                let mut heads = vec![1f32; 9];
                heads[0] = 0.0;
                heads[4] = 0.0;
                masks.layers[3].heads =
                    Some(Tensor::from_data(TensorData::new(heads, [9]), &device));
            }
            // Layer 10: drop MLP channels 0..768.
            'b' => {
                let ch: Vec<f32> = (0..1536).map(|i| if i < 768 { 0.0 } else { 1.0 }).collect();
                masks.layers[10].channels =
                    Some(Tensor::from_data(TensorData::new(ch, [1536]), &device));
            }
            // Skip the MLP branch of layer 20 and the attention branch of layer 25.
            'c' => {
                masks.layers[20].mlp = 0.0;
                masks.layers[25].attn = 0.0;
            }
            _ => unreachable!(),
        }
    }
    let tokens = m.tokens(&[paragraph_ids()]).unwrap();
    m.mean_loss(tokens, Some(&masks)).unwrap()
}

fn masked_forward_reproduces_the_four_reference_cases<B: Backend>(m: &Llama<B>) {
    let g = &golden()["masked_forward"];
    for case in ["a", "b", "c", "abc"] {
        let want = g[case]["mean_ce_loss_f64"].as_f64().unwrap();
        let got = masked_loss(m, case);
        assert!((got - want).abs() < 2e-3, "case {case}: {got} vs {want}");
        eprintln!(
            "masked case {case}: loss {got:.6} vs {want:.6} (|diff| {:.1e})",
            (got - want).abs()
        );
    }
}

fn all_ones_masks_equal_the_plain_forward<B: Backend>(m: &Llama<B>) {
    let tokens = m.tokens(&[paragraph_ids()[..32].to_vec()]).unwrap();
    let plain = m.forward(tokens.clone()).into_data();
    let ones = Masks::<B>::ones(m.shape(), &m.device());
    let masked = m.forward_masked(tokens, Some(&ones)).unwrap().into_data();
    assert_eq!(plain, masked);
}

/// Each forward check, written once, runs on every compiled backend: Flex always, CUDA with
/// the `cuda` feature (on a machine with a GPU).
macro_rules! on_every_backend {
    ($($check:ident),* $(,)?) => {
        mod flex {
            $(#[test] fn $check() { super::$check(&crate::common::default_model().model) })*
        }
        #[cfg(feature = "cuda")]
        mod cuda {
            $(#[test] fn $check() { super::$check(&crate::common::cuda_model().model) })*
        }
    };
}

on_every_backend!(
    paragraph_forward_matches_transformers,
    hidden_states_match_transformers_checkpoints,
    masked_forward_reproduces_the_four_reference_cases,
    all_ones_masks_equal_the_plain_forward,
);
