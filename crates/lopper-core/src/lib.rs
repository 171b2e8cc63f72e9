#![doc = include_str!("../README.md")]

pub mod disk;
mod dtype;
mod error;
pub mod memory;
mod plan;
pub mod pypi;
mod scores;
mod shape;
mod units;

pub use dtype::Dtype;
pub use error::{Error, Result};
pub use plan::{LayerPlan, MASK_PLAN_FORMAT_VERSION, MaskPlan, write_atomic};
pub use pypi::lopper_home;
pub use scores::{Allocation, UnitScores, check_keep, keep_count, plan_drop_layers, top_k};
pub use shape::{LayerShape, ModelShape, RopeConfig, RopeScaling};
pub use units::{PruneUnit, UnitCost, UnitKind};
