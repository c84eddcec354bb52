//! The one place that loads our PTX, picks launch shapes and adapts cudarc
//! errors (compiled only with the `cuda` feature).
use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use candle_core::cuda_backend::cudarc::driver::{
    CudaFunction, CudaModule, CudaSlice, CudaStream, CudaView, CudaViewMut, DeviceRepr, LaunchArgs,
    PushKernelArg,
};
use candle_core::cuda_backend::{CudaDType, CudaDevice, DeviceId, WrapErr};
use candle_core::{CudaStorage, DType, Layout, Result};

/// PTX of every `kernels/*.cu`, embedded by build.rs.
pub mod ptx {
    include!(concat!(env!("OUT_DIR"), "/ptx.rs"));
}

/// A kernel of one of our modules, bound to the device's stream.
pub(crate) struct Kernel {
    func: CudaFunction,
    stream: Arc<CudaStream>,
}

impl Kernel {
    pub(crate) fn builder(&self) -> LaunchArgs<'_> {
        self.stream.launch_builder(&self.func)
    }

    /// Lets the kernel use `bytes` of dynamic shared memory (launches above
    /// 48 KiB must opt in; sm_90 allows up to 227 KiB per block).
    pub(crate) fn allow_smem(&self, bytes: u32) -> Result<()> {
        if bytes > 48 * 1024 {
            use candle_core::cuda_backend::cudarc::driver::sys::CUfunction_attribute_enum as A;
            self.func
                .set_attribute(
                    A::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                    bytes as i32,
                )
                .w()?;
        }
        Ok(())
    }
}

type ModuleCache = Mutex<HashMap<(DeviceId, &'static str), Arc<CudaModule>>>;

/// Loads kernel `name` of module `module` (PTX text `ptx`), loading each
/// module once per device.
pub(crate) fn func(
    dev: &CudaDevice,
    module: &'static str,
    ptx: &'static str,
    name: &str,
) -> Result<Kernel> {
    static MODULES: OnceLock<ModuleCache> = OnceLock::new();
    let stream = dev.cuda_stream();
    let mdl = {
        let mut cache = MODULES
            .get_or_init(Default::default)
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        match cache.get(&(dev.id(), module)) {
            Some(m) => m.clone(),
            None => {
                let m = stream.context().load_module(ptx.into()).w()?;
                cache.insert((dev.id(), module), m.clone());
                m
            }
        }
    };
    Ok(Kernel {
        func: mdl.load_function(name).w()?,
        stream,
    })
}

/// Evaluates `$body` with the type alias `$t` bound to the Rust type of a
/// float dtype our kernels take (f32, f16, bf16); other dtypes are an error
/// naming `$op`.
macro_rules! with_float_type {
    ($op:expr, $dtype:expr, $t:ident => $body:expr) => {
        match $dtype {
            candle_core::DType::F32 => {
                type $t = f32;
                $body
            }
            candle_core::DType::F16 => {
                type $t = half::f16;
                $body
            }
            candle_core::DType::BF16 => {
                type $t = half::bf16;
                $body
            }
            other => candle_core::bail!(
                "{}: no CUDA kernel for dtype {other:?} (f32, bf16, f16 are supported)",
                $op
            ),
        }
    };
}
pub(crate) use with_float_type;

/// Kernel-name suffix of a dtype; errors for dtypes our kernels lack.
pub(crate) fn suffix(op: &str, dtype: DType) -> Result<&'static str> {
    match dtype {
        DType::F32 => Ok("f32"),
        DType::F16 => Ok("f16"),
        DType::BF16 => Ok("bf16"),
        other => candle_core::bail!(
            "{op}: no CUDA kernel for dtype {other:?} (f32, bf16, f16 are supported)"
        ),
    }
}

/// A contiguous view of a storage from its layout's start offset.
pub(crate) fn view<'a, T: CudaDType>(
    op: &str,
    s: &'a CudaStorage,
    l: &Layout,
) -> Result<CudaView<'a, T>> {
    if !l.is_contiguous() {
        candle_core::bail!(
            "{op}: input must be contiguous, got strides {:?} for shape {:?}",
            l.stride(),
            l.dims()
        );
    }
    Ok(s.as_cuda_slice::<T>()?.slice(l.start_offset()..))
}

/// Pushes an optional device pointer: the view's address or a null pointer.
pub(crate) fn arg_opt<'a, 'b: 'a, 'c: 'b, T>(
    b: &mut LaunchArgs<'a>,
    v: Option<&'b CudaView<'c, T>>,
) {
    const NULL: u64 = 0;
    match v {
        Some(v) => {
            b.arg(v);
        }
        None => {
            b.arg(&NULL);
        }
    }
}

/// Same as [`arg_opt`] for an output view.
pub(crate) fn arg_opt_mut<'a, 'b: 'a, 'c: 'b, T>(
    b: &mut LaunchArgs<'a>,
    v: Option<&'b mut CudaViewMut<'c, T>>,
) {
    const NULL: u64 = 0;
    match v {
        Some(v) => {
            b.arg(v);
        }
        None => {
            b.arg(&NULL);
        }
    }
}

/// Allocates `n` elements that the next kernel fully writes.
pub(crate) fn alloc<T: DeviceRepr>(dev: &CudaDevice, n: usize) -> Result<CudaSlice<T>> {
    // SAFETY: every caller launches a kernel that writes all `n` elements
    // before the buffer is read.
    unsafe { dev.alloc::<T>(n.max(1)) }
}

/// The device's ticket counter for last-block reductions (a kernel whose
/// last block to finish combines every block's partial result): one u32,
/// zeroed once, which each such kernel leaves at zero again (`atomicInc`
/// wraps on the last ticket). One stream runs them one at a time, so one
/// counter per device serves them all, and no memset is spent per launch.
pub(crate) fn ticket_counter(dev: &CudaDevice) -> Result<Arc<CudaSlice<u32>>> {
    type Counters = Mutex<HashMap<DeviceId, Arc<CudaSlice<u32>>>>;
    static COUNTERS: OnceLock<Counters> = OnceLock::new();
    let mut map = COUNTERS
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    if let Some(c) = map.get(&dev.id()) {
        return Ok(c.clone());
    }
    let c = Arc::new(dev.alloc_zeros::<u32>(1)?);
    map.insert(dev.id(), c.clone());
    Ok(c)
}

/// Launch a built argument list.
pub(crate) fn launch(b: &mut LaunchArgs<'_>, grid: u32, block: u32) -> Result<()> {
    launch_smem(b, (grid, 1), block, 0)
}

/// Launch on a 2-D grid (x, y).
pub(crate) fn launch_2d(b: &mut LaunchArgs<'_>, grid: (u32, u32), block: u32) -> Result<()> {
    launch_smem(b, grid, block, 0)
}

/// Launch on a 2-D grid with `smem` bytes of dynamic shared memory (the
/// kernel must have been given [`Kernel::allow_smem`] for more than 48 KiB).
pub(crate) fn launch_smem(
    b: &mut LaunchArgs<'_>,
    grid: (u32, u32),
    block: u32,
    smem: u32,
) -> Result<()> {
    if grid.1 > 65535 {
        candle_core::bail!("grid y dimension {} exceeds 65535", grid.1);
    }
    let cfg = candle_core::cuda_backend::cudarc::driver::LaunchConfig {
        grid_dim: (grid.0.max(1), grid.1.max(1), 1),
        block_dim: (block, 1, 1),
        shared_mem_bytes: smem,
    };
    // SAFETY: argument lists are built next to the kernel signatures they
    // match (same order, sizes and pointer element types), and every buffer
    // passed outlives the launch on candle's stream.
    unsafe { b.launch(cfg) }.w()?;
    Ok(())
}

/// A grid covering `n` work items with `block` threads, capped for
/// grid-stride loops at a few waves of the device.
pub(crate) fn grid_for(n: usize, block: u32) -> u32 {
    let blocks = n.div_ceil(block as usize).max(1);
    blocks.min(132 * 32) as u32
}
