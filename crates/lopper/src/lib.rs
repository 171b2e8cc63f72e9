#![doc = include_str!("../README.md")]

pub use lopper_core as core;

#[cfg(feature = "data")]
pub use lopper_data as data;
#[cfg(feature = "eval")]
pub use lopper_eval as eval;
#[cfg(feature = "importance")]
pub use lopper_importance as importance;
#[cfg(feature = "model")]
pub use lopper_kernels as kernels;
#[cfg(feature = "model")]
pub use lopper_model as model;
#[cfg(feature = "policy")]
pub use lopper_policy as policy;
#[cfg(feature = "recover")]
pub use lopper_recover as recover;
#[cfg(feature = "sparse")]
pub use lopper_sparse as sparse;
#[cfg(feature = "surgery")]
pub use lopper_surgery as surgery;

/// The burn version lopper is built on, for naming backends and tensors.
pub use burn;

/// Backends lopper's examples and command line use.
#[cfg(feature = "flex")]
pub mod backend {
    pub use burn_flex::{Flex, FlexDevice};
}
