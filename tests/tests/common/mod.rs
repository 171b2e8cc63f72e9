//! Shared helpers of the end-to-end tests.
#![allow(dead_code)]

use std::path::PathBuf;
use std::sync::OnceLock;

use burn_flex::{Flex, FlexDevice};
use lopper_model::{LoadedModel, ModelFiles, load_files};

pub type B = Flex;
pub const DEVICE: FlexDevice = FlexDevice;

/// The golden fixture computed with HF transformers.
pub fn golden() -> &'static serde_json::Value {
    static G: OnceLock<serde_json::Value> = OnceLock::new();
    G.get_or_init(|| {
        let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures/smollm2_golden.json");
        serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
    })
}

/// Path of the real default model, installed through the project's own setup if missing.
pub fn default_model_path() -> PathBuf {
    lopper_model::ensure_default_model(&lopper_model::lopper_home())
        .expect("installing the default model (cargo xtask setup) failed")
}

/// The real default model, loaded once per test binary.
pub fn default_model() -> &'static LoadedModel<B> {
    static M: OnceLock<LoadedModel<B>> = OnceLock::new();
    M.get_or_init(|| {
        load_files(&ModelFiles::Gguf(default_model_path()), "default", &DEVICE)
            .expect("loading the default model")
    })
}

pub fn ids(v: &serde_json::Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

pub fn floats(v: &serde_json::Value) -> Vec<f64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect()
}

/// The real default model on CUDA device 0, loaded once per test binary.
#[cfg(feature = "cuda")]
pub fn cuda_model() -> &'static LoadedModel<burn::backend::Cuda> {
    static M: OnceLock<LoadedModel<burn::backend::Cuda>> = OnceLock::new();
    M.get_or_init(|| {
        let device = burn::backend::cuda::CudaDevice::new(0);
        load_files(&ModelFiles::Gguf(default_model_path()), "default", &device)
            .expect("loading the default model on CUDA")
    })
}

/// The repository's own `datasets/` (no environment variable, no hub).
pub fn data_dirs() -> lopper_data::DataDirs {
    lopper_data::DataDirs::checkout().expect("the repository's datasets/ folder")
}

/// `n` calibration windows of `len` tokens drawn from C4 sample documents `docs` (disjoint
/// ranges give disjoint text), tokenized by the default model.
pub fn c4_windows(
    docs: std::ops::Range<usize>,
    sampler: lopper_data::Sampler,
    n: usize,
    len: usize,
    seed: u64,
) -> lopper_data::Calibration {
    let m = default_model();
    let (path, all) = lopper_data::load_documents("c4", &data_dirs()).unwrap();
    let encode = |t: &str| m.tokenizer.encode(t).map_err(|e| e.to_string());
    lopper_data::sample("c4", &path, &all[docs], &encode, sampler, n, len, seed).unwrap()
}

/// Runs `state`'s search to its last step on `windows` (no checkpoints), asserting that it
/// finished; the loss of every sampled mask, in order.
pub fn search_losses<Bk: burn::tensor::backend::Backend>(
    model: &lopper_model::Llama<Bk>,
    windows: &[Vec<u32>],
    means: Option<&lopper_surgery::InputMeans>,
    space: &lopper_policy::UnitSpace,
    state: &mut lopper_policy::PgState,
) -> Vec<f64> {
    let mut losses = Vec::new();
    let done = lopper_policy::search(
        model,
        windows,
        means,
        space,
        state,
        lopper_policy::Hooks {
            on_step: &mut |r, _| {
                losses.extend(r.losses.clone());
                Ok(())
            },
            should_stop: &|| false,
            checkpoint: &mut |_| Ok(()),
            checkpoint_every: 0,
        },
    )
    .unwrap();
    assert!(done, "the search stopped early");
    losses
}
