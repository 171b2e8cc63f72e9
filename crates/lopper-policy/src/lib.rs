#![doc = include_str!("../README.md")]

mod run;
mod space;
mod state;

pub use run::{Choice, Hooks, Judged, RefitWindows, choose, judge_plans, search, search_with};
pub use space::{BlockLayout, Budget, Projection, UnitSpace, project, project_weighted, sigmap};
pub use state::{
    ANNEAL_GAIN, Baseline, DEFAULT_START_BAND, Estimator, Init, Judge, LS_JUDGE_FROM, Optimizer,
    PgConfig, PgState, Schedule, StepRecord, binary_entropy, block_layout,
};

/// Errors of the policy-gradient search.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Plan errors.
    #[error(transparent)]
    Core(#[from] lopper_core::Error),
    /// Model errors.
    #[error(transparent)]
    Model(#[from] lopper_model::Error),
    /// Surgery errors.
    #[error(transparent)]
    Surgery(#[from] lopper_surgery::Error),
    /// Least-squares judge errors.
    #[error(transparent)]
    Reconstruct(#[from] lopper_sparse::Error),
    /// Settings that cannot work; the message names the flag.
    #[error("{0}")]
    Config(String),
    /// A checkpoint that cannot be read or does not belong to this run.
    #[error("checkpoint {path}: {msg}")]
    Checkpoint {
        /// The file.
        path: std::path::PathBuf,
        /// What is wrong.
        msg: String,
    },
}

/// Result alias of this crate.
pub type Result<T> = std::result::Result<T, Error>;

#[cfg(test)]
mod tests;
