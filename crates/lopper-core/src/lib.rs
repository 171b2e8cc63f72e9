#![doc = include_str!("../README.md")]

mod error;
mod plan;
mod scores;
mod shape;
mod units;

pub use error::{Error, Result};
pub use plan::{LayerPlan, MASK_PLAN_FORMAT_VERSION, MaskPlan, write_atomic};
pub use scores::{UnitScores, keep_count, top_k};
pub use shape::{LayerShape, ModelShape, RopeConfig, RopeScaling};
pub use units::{PruneUnit, UnitCost, UnitKind};
