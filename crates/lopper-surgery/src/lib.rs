#![doc = include_str!("../README.md")]

mod error;
pub mod export;
mod select;
mod slice;

pub use error::{Error, Result};
pub use export::{ExportFormat, ExportOptions, config_json, deci_config_json, export};
pub use select::{
    BiasChoice, BiasSelection, GAIN_Z, compensated_blocks, select_compensation, significant_gain,
};
pub use slice::{
    InputMeans, LayerBias, compensation_biases, forward_kept, head_dims, mean_loss_kept, prune,
    prune_compensated, prune_with_biases, slice_layer, slice_layer_biased, windows_loss_kept,
};

#[cfg(test)]
mod tests;
