#![doc = include_str!("../README.md")]

mod config;
mod error;
pub mod gguf;
mod hostweights;
mod masks;
mod model;
mod placement;
mod resolve;
pub mod synthetic;
mod tokenizer;
pub mod weights;

pub use config::{
    LOPPER_MODEL_TYPE, SUPPORTED_MODEL_TYPES, hf_config_json, shape_from_gguf,
    shape_from_hf_config, shape_from_hf_config_text,
};
pub use error::{Error, Result};
pub use hostweights::{HostWeights, SafetensorsLayout};
pub use masks::{LayerMasks, Masks};
pub use model::{
    Attention, DecoderLayer, ForwardMemory, LINEAR_NAMES, LayerStepper, Llama, Mlp, NLL_ROWS,
    RmsNorm, Rope, Tap, WeightMemory, burn_dtype, mean_of, next_token_nll, nll_from_logits,
    tokens_tensor, weight_f32,
};
pub use placement::{DeviceMap, LayerStream, SharedSource, layer_params};
pub use resolve::{
    HubOptions, Inspected, LoadedModel, ModelFiles, ModelInfo, ModelSpec, default_model,
    default_model_path, ensure_default_model, inspect, install_default_model, load, load_files,
    load_files_in, load_in, load_inspected_in, load_placed, lopper_home, resolve, sha256_file,
    shape_for_dir,
};
pub use synthetic::{SyntheticModel, SyntheticWeights};
pub use tokenizer::Tokenizer;
pub use weights::{GgufSource, HostTensor, RandomWeights, WeightSource};

impl<B: burn::tensor::backend::Backend> Llama<B> {
    /// A model of `shape` with seeded random weights (the same values on every backend).
    pub fn random(shape: &lopper_core::ModelShape, seed: u64, device: &B::Device) -> Result<Self> {
        Self::from_weights(shape, &RandomWeights::new(shape, seed), device)
    }
}

#[cfg(test)]
mod tests;
