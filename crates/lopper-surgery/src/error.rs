use std::path::PathBuf;

/// Errors of surgery and export.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Plan or shape errors.
    #[error(transparent)]
    Core(#[from] lopper_core::Error),
    /// Model errors.
    #[error(transparent)]
    Model(#[from] lopper_model::Error),
    /// The output folder exists.
    #[error("{0} already exists; choose another --out folder or pass --force to replace it")]
    OutputExists(PathBuf),
    /// Writing the output failed; nothing was left under the final name.
    #[error("writing {path}: {source} (nothing was written under the final name)")]
    Write {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The export cannot express this model.
    #[error("export: {0}")]
    Unsupported(String),
}

/// Result alias of this crate.
pub type Result<T> = std::result::Result<T, Error>;
