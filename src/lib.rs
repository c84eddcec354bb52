//! tunefuse: fused CUDA kernels and a candle trainer for robust and
//! parameter-efficient fine-tuning of pretrained transformer encoders.
//!
//! Every fused op lives in [`ops`]: a public function with documented shapes,
//! a candle custom op whose CPU code is the reference that defines the
//! semantics, the CUDA kernel (with the `cuda` feature) and the backward pass,
//! so the ops work inside candle autograd on CPU and GPU alike.
//!
//! Every public item is documented: CI's clippy run (`-D warnings`) fails
//! on one that is not.
#![warn(missing_docs)]
pub mod bench;
#[cfg(feature = "cuda")]
pub mod census;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod error;
pub mod interrupt;
pub mod model;
pub mod nvtx;
pub mod ops;
pub mod philox;
pub mod train;

pub use error::{Error, Result};

/// CUDA device `ordinal` as tunefuse uses it: one stream, without cudarc's
/// per-buffer event tracking.
///
/// candle's device runs everything (its kernels, ours, cuBLAS, cuRAND) on
/// one stream, yet cudarc, seeing a stream created beside the default one,
/// tracks every buffer with two events (two `cuEventCreate` at allocation,
/// two `cuEventDestroy` at free: ~10,000 driver calls of a vanilla MiniLM
/// step, see `bench/step_census.json`). On one stream, stream order alone
/// keeps uses, copies and frees in order, so the tracking is turned off
/// before the first buffer. cuBLAS gets a workspace of its own, which a
/// captured CUDA graph needs (see [`train::config::Config::cuda_graph`]). Without
/// the `cuda` feature this is candle's "not compiled with CUDA" error.
pub fn cuda_device(ordinal: usize) -> candle_core::Result<candle_core::Device> {
    let dev = candle_core::Device::new_cuda(ordinal)?;
    #[cfg(feature = "cuda")]
    if let candle_core::Device::Cuda(d) = &dev {
        // SAFETY: every launch and copy tunefuse makes goes to this device's
        // one stream (candle's ops, cuda.rs's kernels, cuBLAS and cuRAND are
        // all bound to it), which is the condition cudarc states.
        unsafe { d.disable_event_tracking() };
        cuda::set_cublas_workspace(d)?;
    }
    Ok(dev)
}

/// While the returned guard lives, candle keeps what the thread uploads to
/// the device in device memory, keyed by its contents: the shape-and-stride
/// vector of every strided kernel (a broadcast add, a transposed copy:
/// about 200 uploads and allocations of a MiniLM training step otherwise)
/// and host data of at most 4 KiB (a scalar such as the clipping bound),
/// which it then copies on the device. A training step repeats the same
/// layouts for a padded length, so after the first step of each length it
/// uploads only its batch. Upload the batch before taking the guard: data
/// whose contents change every step would otherwise fill the cache (the
/// step census shows it: host-to-device copies inside the guard that do not
/// fall away after the first steps). This is also what CUDA graph capture
/// needs (no host copies inside a capture). On the CPU, or without the
/// `cuda` feature, it does nothing.
#[cfg(feature = "cuda")]
pub fn upload_cache(dev: &candle_core::Device) -> Option<impl Sized> {
    match dev {
        candle_core::Device::Cuda(d) => Some(d.enable_cuda_graph_htod_cache()),
        _ => None,
    }
}

/// See the `cuda` build's `upload_cache`: without CUDA there is nothing to
/// keep.
#[cfg(not(feature = "cuda"))]
pub fn upload_cache(_dev: &candle_core::Device) -> Option<()> {
    None
}

/// [`cuda_device`] 0 when CUDA is compiled in and a device is present, else
/// the CPU.
pub fn cuda_if_available() -> candle_core::Result<candle_core::Device> {
    if candle_core::utils::cuda_is_available() {
        cuda_device(0)
    } else {
        Ok(candle_core::Device::Cpu)
    }
}

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
