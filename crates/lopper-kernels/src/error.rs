use std::path::{Path, PathBuf};

/// Errors of the kernels: installing the BLAS, and operands that do not fit their storage.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Operand shapes or storage that a product cannot use.
    #[error("matrix product: {0}")]
    Shape(String),
    /// Installing from PyPI failed.
    #[error(transparent)]
    Core(#[from] lopper_core::Error),
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

impl Error {
    pub(crate) fn io(path: &Path, source: std::io::Error) -> Self {
        Self::Io {
            path: path.to_path_buf(),
            source,
        }
    }
}

/// Result alias of this crate.
pub type Result<T> = std::result::Result<T, Error>;
