//! tunefuse: fused CUDA kernels and a candle trainer for robust and
//! parameter-efficient fine-tuning of pretrained transformer encoders.
//!
//! Every fused op lives in [`ops`]: a public function with documented shapes,
//! a candle custom op whose CPU code is the reference that defines the
//! semantics, the CUDA kernel (with the `cuda` feature) and the backward pass,
//! so the ops work inside candle autograd on CPU and GPU alike.
pub mod bench;
#[cfg(feature = "cuda")]
pub mod census;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod error;
pub mod model;
pub mod nvtx;
pub mod ops;
pub mod philox;
pub mod train;

pub use error::{Error, Result};

/// Makes glibc's malloc keep freed memory for reuse instead of returning it
/// to the kernel, for CPU training in this process.
///
/// candle's CPU backend allocates a new buffer for every op's result, many
/// of them megabytes. By default glibc serves those above its (adaptive)
/// mmap threshold with fresh mappings and trims the heap after large frees,
/// so the kernel zero-fills the same memory again every step: on the
/// development machine about a quarter of a MiniLM run's CPU time was system time,
/// mostly page faults. This sets the mmap threshold to glibc's maximum
/// (32 MiB) and turns trimming off; the process keeps its peak heap. The
/// `tunefuse` binary calls it at start-up; a program that links the library
/// may call it once, early. Returns whether both settings were accepted
/// (always false off glibc, where it does nothing).
pub fn keep_freed_memory() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: mallopt only changes allocator parameters; it is
        // thread-safe and any value is accepted or refused (returns 0).
        unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20) == 1
                && libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX) == 1
        }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        false
    }
}
