use std::path::PathBuf;

/// Errors of model loading and running. Every variant names the file, tensor or key at fault.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Shape or plan errors from `lopper-core`.
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
    /// A GGUF file is malformed or uses something this build does not read.
    #[error("GGUF file {path}: {msg}")]
    Gguf {
        /// The file.
        path: PathBuf,
        /// What is wrong, and how to fix it.
        msg: String,
    },
    /// A safetensors checkpoint is malformed.
    #[error("safetensors file {path}: {msg}")]
    Safetensors {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        msg: String,
    },
    /// A `config.json` is missing keys or has values lopper cannot use.
    #[error("model config {path}: {msg}")]
    Config {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        msg: String,
    },
    /// A weight the shape needs is absent from the checkpoint.
    #[error(
        "tensor `{name}` is missing from {source_desc}; the checkpoint does not match a LLaMA-family model of this shape"
    )]
    MissingTensor {
        /// HF name of the tensor.
        name: String,
        /// The checkpoint.
        source_desc: String,
    },
    /// A weight has another shape than the model shape implies.
    #[error("tensor `{name}` in {source_desc} has shape {got:?}, expected {expected:?}")]
    TensorShape {
        /// HF name of the tensor.
        name: String,
        /// The checkpoint.
        source_desc: String,
        /// Shape the model needs (HF layout, `[out, in]`).
        expected: Vec<usize>,
        /// Shape found.
        got: Vec<usize>,
    },
    /// Tokenizer could not be built or used.
    #[error("tokenizer ({what}): {msg}")]
    Tokenizer {
        /// Which tokenizer (file or source).
        what: String,
        /// What went wrong.
        msg: String,
    },
    /// Masks handed to the forward do not fit the model.
    #[error("masks do not fit the model: {0}")]
    MaskShape(String),
    /// Input tokens are invalid (empty, out of vocabulary).
    #[error("invalid input: {0}")]
    Input(String),
    /// A model id could not be resolved to files.
    #[error("{0}")]
    Resolve(String),
    /// Installing the default model failed.
    #[error("setting up the default model: {0}")]
    Setup(String),
}

/// Result alias of this crate.
pub type Result<T> = std::result::Result<T, Error>;

pub(crate) fn io_err(path: &std::path::Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| Error::Io {
        path: path.to_owned(),
        source,
    }
}
