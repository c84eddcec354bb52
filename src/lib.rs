//! tunefuse: fused CUDA kernels and a candle trainer for robust and
//! parameter-efficient fine-tuning of pretrained transformer encoders.
//!
//! Every fused op lives in [`ops`]: a public function with documented shapes,
//! a candle custom op whose CPU code is the reference that defines the
//! semantics, the CUDA kernel (with the `cuda` feature) and the backward pass,
//! so the ops work inside candle autograd on CPU and GPU alike.
pub mod bench;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod error;
pub mod model;
pub mod nvtx;
pub mod ops;
pub mod philox;
pub mod train;

pub use error::{Error, Result};
