//! Every model family lopper reads, against transformers: tiny random checkpoints written by
//! `scripts/make_family_fixtures.py` (transformers' own classes, float32) with their logits.

use std::path::PathBuf;

use burn_flex::{Flex, FlexDevice};
use lopper_core::Dtype;
use lopper_model::{ModelFiles, load_files_in};

fn fixture(family: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join(format!("../../tests/fixtures/families/{family}"))
}

/// lopper's logits for the fixture's ids, in `dtype`, and transformers' (flattened).
fn logits(family: &str, dtype: Dtype) -> (Vec<f32>, Vec<f32>) {
    let dir = fixture(family);
    let reference: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("logits.json")).unwrap()).unwrap();
    let ids: Vec<u32> = reference["ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as u32)
        .collect();
    let want: Vec<f32> = reference["logits"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|row| {
            row.as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_f64().unwrap() as f32)
        })
        .collect();
    let loaded =
        load_files_in::<Flex>(&ModelFiles::HfDir(dir), family, &FlexDevice, dtype).unwrap();
    let got: Vec<f32> = loaded
        .model
        .forward(loaded.model.tokens(&[ids]).unwrap())
        .into_data()
        .to_vec()
        .unwrap();
    (got, want)
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

const FAMILIES: [&str; 4] = ["llama2", "llama3", "mistral", "qwen2"];

/// lopper's logits of every family in `dtype` within `tol` of the largest reference logit.
fn check_all(dtype: Dtype, tol: f32) {
    for family in FAMILIES {
        let (got, want) = logits(family, dtype);
        let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
        let d = max_diff(&got, &want);
        assert!(
            d < tol * scale,
            "{family} {dtype}: max |diff| {d} (scale {scale})"
        );
    }
}

#[test]
fn every_family_matches_transformers_logits() {
    // f32 on both sides, different summation orders; the fixture rounds to 1e-6.
    check_all(Dtype::F32, 1e-4);
}

#[test]
fn every_family_loads_in_bf16_close_to_f32() {
    check_all(Dtype::Bf16, 0.05);
}

#[test]
fn the_qwen2_fixture_has_qkv_biases_and_a_tied_head() {
    let dir = fixture("qwen2");
    let loaded =
        load_files_in::<Flex>(&ModelFiles::HfDir(dir), "qwen2", &FlexDevice, Dtype::F32).unwrap();
    let attn = loaded.model.layers[0].self_attn.as_ref().unwrap();
    assert!(attn.q_proj.bias.is_some() && attn.k_proj.bias.is_some() && attn.v_proj.bias.is_some());
    assert!(attn.o_proj.bias.is_none());
    assert!(loaded.model.lm_head.is_none(), "tied");
}
