#![doc = include_str!("../README.md")]

pub mod attention;
mod autodiff;
pub mod blas;
pub mod dnnl;
mod error;
pub mod loss;
pub mod math;
pub mod matmul;
pub mod norm;
mod primitive;
pub mod swiglu;

pub use attention::{AttentionShape, RopeTables, causal_attention};
pub use blas::{Blas, MatRef, blas, blas_status, describe, install_mkl};
pub use dnnl::install_dnnl;
pub use error::{Error, Result};
pub use loss::{kl_div, nll};
pub use matmul::{linear, matmul, portable, products_on_blas, set_blas_enabled};
pub use norm::rms_norm;
pub use swiglu::swiglu;
