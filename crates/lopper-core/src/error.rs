use std::path::PathBuf;

/// Errors of the core vocabulary: invalid shapes and mask plans.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A shape is internally inconsistent.
    #[error("invalid model shape: {0}")]
    InvalidShape(String),
    /// A mask plan does not fit the model it is applied to.
    #[error("mask plan does not fit the model: {0}")]
    PlanMismatch(String),
    /// A setting that cannot work, with the fix.
    #[error("{0}")]
    Invalid(String),
    /// A mask plan is malformed on its own (duplicates, unsorted ids, nothing kept).
    #[error("invalid mask plan: {0}")]
    InvalidPlan(String),
    /// A plan file has a format version this build does not read.
    #[error(
        "mask plan format version {found} is not supported (this build reads version {supported}); re-create the plan with this version of lopper"
    )]
    UnsupportedPlanVersion {
        /// Version found in the file.
        found: u32,
        /// Version this build reads.
        supported: u32,
    },
    /// JSON (de)serialisation failed.
    #[error("{context}: {source}")]
    Json {
        /// What was being read or written.
        context: String,
        /// The serde error.
        #[source]
        source: serde_json::Error,
    },
    /// Installing a file (from PyPI) failed; the message says what to do instead.
    #[error("{0}")]
    Setup(String),
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
}

/// Result alias of this crate.
pub type Result<T> = std::result::Result<T, Error>;
