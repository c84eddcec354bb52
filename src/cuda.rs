//! The one place that loads our PTX, picks launch shapes and adapts cudarc
//! errors (compiled only with the `cuda` feature).
use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};
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
    /// The dynamic shared memory the function was allowed so far (shared
    /// by every handle of the function).
    smem: Arc<AtomicU32>,
}

impl Kernel {
    pub(crate) fn builder(&self) -> LaunchArgs<'_> {
        self.stream.launch_builder(&self.func)
    }

    /// Lets the kernel use `bytes` of dynamic shared memory (launches above
    /// 48 KiB must opt in; sm_90 allows up to 227 KiB per block). The
    /// attribute stays with the function, so it is set only when a launch
    /// needs more than any before.
    pub(crate) fn allow_smem(&self, bytes: u32) -> Result<()> {
        if bytes > 48 * 1024 && bytes > self.smem.load(Ordering::Relaxed) {
            use candle_core::cuda_backend::cudarc::driver::sys::CUfunction_attribute_enum as A;
            self.func
                .set_attribute(
                    A::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                    bytes as i32,
                )
                .w()?;
            self.smem.fetch_max(bytes, Ordering::Relaxed);
        }
        Ok(())
    }
}

/// A module's functions, looked up once each.
struct Loaded {
    module: Arc<CudaModule>,
    funcs: HashMap<String, (CudaFunction, Arc<AtomicU32>)>,
}

type ModuleCache = Mutex<HashMap<(DeviceId, &'static str), Loaded>>;

/// Kernel `name` of module `module` (PTX text `ptx`): each module is loaded
/// once per device and each function looked up once (a launch otherwise
/// pays a driver lookup by name, `cuModuleGetFunction`, every time).
pub(crate) fn func(
    dev: &CudaDevice,
    module: &'static str,
    ptx: &'static str,
    name: &str,
) -> Result<Kernel> {
    static MODULES: OnceLock<ModuleCache> = OnceLock::new();
    let stream = dev.cuda_stream();
    let mut cache = MODULES
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    let loaded = match cache.entry((dev.id(), module)) {
        std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
        std::collections::hash_map::Entry::Vacant(e) => e.insert(Loaded {
            module: stream.context().load_module(ptx.into()).w()?,
            funcs: HashMap::new(),
        }),
    };
    let (func, smem) = match loaded.funcs.get(name) {
        Some(f) => f.clone(),
        None => {
            let f = (
                loaded.module.load_function(name).w()?,
                Arc::new(AtomicU32::new(0)),
            );
            loaded.funcs.insert(name.to_string(), f.clone());
            f
        }
    };
    Ok(Kernel { func, stream, smem })
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

/// The device address and byte length of the whole storage under CUDA
/// tensor `t` (of every view of it, not only `t`'s elements).
fn storage_span(t: &candle_core::Tensor) -> Result<(CudaDevice, u64, usize)> {
    use candle_core::cuda_backend::cudarc::driver::DevicePtr;
    let (st, _) = t.storage_and_layout();
    let candle_core::Storage::Cuda(cs) = &*st else {
        candle_core::bail!("expected a CUDA tensor, got one on {:?}", t.device())
    };
    let stream = cs.device.cuda_stream();
    macro_rules! span {
        ($t:ty) => {{
            let s = cs.as_cuda_slice::<$t>()?;
            (s.device_ptr(&stream).0, s.len() * std::mem::size_of::<$t>())
        }};
    }
    // With one stream and event tracking off (crate::cuda_device) the
    // pointer guards record nothing; stream order keeps every use in order.
    let (ptr, bytes) = match t.dtype() {
        DType::U8 => span!(u8),
        DType::U32 => span!(u32),
        DType::I64 => span!(i64),
        DType::F32 => span!(f32),
        DType::F64 => span!(f64),
        DType::BF16 => span!(half::bf16),
        DType::F16 => span!(half::f16),
        dt => candle_core::bail!("no storage span for dtype {dt:?}"),
    };
    Ok((cs.device.clone(), ptr, bytes))
}

/// The bytes of the whole storage under CPU tensor `t`.
fn host_bytes(t: &candle_core::Tensor, f: impl FnOnce(&[u8]) -> Result<()>) -> Result<()> {
    let (st, _) = t.storage_and_layout();
    let candle_core::Storage::Cpu(cs) = &*st else {
        candle_core::bail!("expected a CPU tensor, got one on {:?}", t.device())
    };
    fn raw<T>(v: &[T]) -> &[u8] {
        // SAFETY: a slice of plain numbers, every byte initialised.
        unsafe { std::slice::from_raw_parts(v.as_ptr().cast::<u8>(), std::mem::size_of_val(v)) }
    }
    let b = match t.dtype() {
        DType::U8 => raw(cs.as_slice::<u8>()?),
        DType::U32 => raw(cs.as_slice::<u32>()?),
        DType::I64 => raw(cs.as_slice::<i64>()?),
        DType::F32 => raw(cs.as_slice::<f32>()?),
        DType::F64 => raw(cs.as_slice::<f64>()?),
        DType::BF16 => raw(cs.as_slice::<half::bf16>()?),
        DType::F16 => raw(cs.as_slice::<half::f16>()?),
        dt => candle_core::bail!("no host bytes for dtype {dt:?}"),
    };
    f(b)
}

/// Writes host tensors into device tensors in place, pair by pair
/// `(device, host)`: what a captured CUDA graph reads from fixed
/// addresses (a step's batch) refilled before a replay. Each pair must
/// agree in dtype, shape and layout, and the storages be shared alike on
/// both sides (views of one buffer, as a tokenised batch's ids, types and
/// mask are); each distinct storage is then copied whole, in one
/// host-to-device copy on the device's stream.
pub fn upload_into(pairs: &[(&candle_core::Tensor, &candle_core::Tensor)]) -> Result<()> {
    // (host storage, device storage) already written.
    let mut done: Vec<(usize, u64)> = Vec::new();
    for (i, (dst, src)) in pairs.iter().enumerate() {
        if dst.dtype() != src.dtype()
            || dst.dims() != src.dims()
            || dst.layout().stride() != src.layout().stride()
            || dst.layout().start_offset() != src.layout().start_offset()
        {
            candle_core::bail!(
                "upload_into: pair {i} differs: device {:?} {:?} (strides {:?}, offset {}) and \
                 host {:?} {:?} (strides {:?}, offset {})",
                dst.dtype(),
                dst.dims(),
                dst.layout().stride(),
                dst.layout().start_offset(),
                src.dtype(),
                src.dims(),
                src.layout().stride(),
                src.layout().start_offset()
            );
        }
        let (dev, ptr, bytes) = storage_span(dst)?;
        let host = crate::ops::storage_addr(src);
        match done.iter().find(|(h, d)| *h == host || *d == ptr) {
            Some(&(h, d)) if h == host && d == ptr => continue,
            Some(_) => candle_core::bail!(
                "upload_into: pair {i} shares a storage on one side only: the device and host \
                 tensors are not laid out alike"
            ),
            None => {}
        }
        let stream = dev.cuda_stream();
        host_bytes(src, |b| {
            if b.len() != bytes {
                candle_core::bail!(
                    "upload_into: pair {i}: the host storage holds {} bytes, the device's {bytes}",
                    b.len()
                );
            }
            // SAFETY: `ptr` is the start of a device allocation of `bytes`
            // bytes, on this stream; the pageable source is staged by the
            // driver before the call returns.
            unsafe {
                candle_core::cuda_backend::cudarc::driver::result::memcpy_htod_async(
                    ptr,
                    b,
                    stream.cu_stream(),
                )
            }
            .w()
        })?;
        done.push((host, ptr));
    }
    Ok(())
}

/// Copies CUDA tensor `src`'s elements over `dst`'s in place (both
/// contiguous, one dtype and element count, one device), in one
/// device-to-device copy: a captured graph's output written into a buffer
/// that outlives the graph, or that buffer read out after a replay.
pub fn copy_into(dst: &candle_core::Tensor, src: &candle_core::Tensor) -> Result<()> {
    if dst.dtype() != src.dtype()
        || dst.elem_count() != src.elem_count()
        || !dst.is_contiguous()
        || !src.is_contiguous()
    {
        candle_core::bail!(
            "copy_into: {:?} {:?} and {:?} {:?} are not two contiguous tensors of one dtype and \
             size",
            dst.dtype(),
            dst.dims(),
            src.dtype(),
            src.dims()
        );
    }
    let size = dst.dtype().size_in_bytes();
    let (dev, d, _) = storage_span(dst)?;
    let (_, s, _) = storage_span(src)?;
    let (d, s) = (
        d + (dst.layout().start_offset() * size) as u64,
        s + (src.layout().start_offset() * size) as u64,
    );
    let stream = dev.cuda_stream();
    // SAFETY: both ranges lie in live allocations on this stream (the
    // offsets and counts of contiguous tensors of their storages).
    unsafe {
        candle_core::cuda_backend::cudarc::driver::result::memcpy_dtod_async(
            d,
            s,
            dst.elem_count() * size,
            stream.cu_stream(),
        )
    }
    .w()
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

/// Elements of `dtype` in 16 bytes: what the kernels written for 16-byte
/// accesses give each thread.
pub(crate) fn per_16_bytes(dtype: DType) -> usize {
    16 / dtype.size_in_bytes()
}

/// Philox starts in device memory, per (device, seed): the device address
/// of an anchored step's counter and the start it holds.
type Anchors = HashMap<(DeviceId, u64), (u64, u64)>;

fn anchors() -> std::sync::MutexGuard<'static, Anchors> {
    static ANCHORS: OnceLock<Mutex<Anchors>> = OnceLock::new();
    ANCHORS
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|e| e.into_inner())
}

/// The `(seed, offset, base)` kernel arguments of a Philox draw keyed by
/// `seed` that starts at counter `offset` (kernels/common.cuh
/// `philox_offset`). While a [`PhiloxAnchor`] holds a step's start for
/// `seed` on this device and the draw is at or after it: the offset
/// relative to that start and the address of the device counter holding
/// it; otherwise the absolute offset and a null base. The kernel adds the
/// two, so the counters, and the draws, are the same either way.
pub(crate) fn philox_args(dev: &CudaDevice, seed: u64, offset: u64) -> (u64, u64, u64) {
    match anchors().get(&(dev.id(), seed)) {
        Some(&(base, start)) if offset >= start => (seed, offset - start, base),
        _ => (seed, offset, 0),
    }
}

/// A Philox counter in device memory that holds where a training step's
/// draws start, so that the step's kernels take offsets relative to it.
/// Those arguments are the same at every step of one shape, which a CUDA
/// graph captured from one step needs to draw fresh masks when replayed;
/// the counter itself moves on by the step's draws in the step's last
/// launch ([`PhiloxAnchor::end`]). Without an anchor the kernels take the
/// absolute offsets, with the same result.
pub struct PhiloxAnchor {
    dev: CudaDevice,
    counter: CudaSlice<u64>,
    /// What the counter holds once every launch queued so far has run.
    holds: u64,
    /// The seed and start of the step in progress.
    active: Option<(u64, u64)>,
}

impl std::fmt::Debug for PhiloxAnchor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PhiloxAnchor")
            .field("holds", &self.holds)
            .field("active", &self.active)
            .finish()
    }
}

impl PhiloxAnchor {
    /// A counter on `dev`.
    pub fn new(dev: &CudaDevice) -> Result<Self> {
        Ok(Self {
            dev: dev.clone(),
            counter: dev.alloc_zeros::<u64>(1)?,
            holds: 0,
            active: None,
        })
    }

    fn address(&self) -> u64 {
        use candle_core::cuda_backend::cudarc::driver::DevicePtr;
        self.counter.device_ptr(&self.dev.cuda_stream()).0
    }

    /// Starts a step whose draws keyed by `seed` begin at `offset`: the
    /// counter is uploaded only when it does not already hold `offset`
    /// (the first step, a step after one that failed, or after draws
    /// outside the steps, e.g. Monte Carlo dropout in an evaluation, or a
    /// resume).
    pub fn begin(&mut self, seed: u64, offset: u64) -> Result<()> {
        // A step that failed before its end leaves its window open: drop
        // it without moving the counter (which still holds that step's
        // start, as `holds` says), so the check below uploads.
        if let Some((seed, _)) = self.active.take() {
            self.release(seed);
        }
        if self.holds != offset {
            self.dev
                .cuda_stream()
                .memcpy_htod(&[offset], &mut self.counter)
                .w()?;
            self.holds = offset;
        }
        anchors().insert((self.dev.id(), seed), (self.address(), offset));
        self.active = Some((seed, offset));
        Ok(())
    }

    /// Ends the step in progress, whose draws reached `offset`: moves the
    /// device counter on by the counters drawn (one launch, whose argument
    /// is again the same at every step of one shape).
    pub fn end(&mut self, offset: u64) -> Result<()> {
        let n = self.close(offset)?;
        if n > 0 {
            let f = func(
                &self.dev,
                crate::ops::mixout::cuda::MODULE,
                ptx::MIXOUT,
                "philox_advance",
            )?;
            let mut b = f.builder();
            b.arg(&mut self.counter).arg(&n);
            launch(&mut b, 1, 1)?;
        }
        Ok(())
    }

    /// Ends the step in progress, whose draws reached `offset`, as a
    /// replayed CUDA graph runs it: the graph holds the launch that moves
    /// the device counter (captured by [`PhiloxAnchor::end`]), so only the
    /// host's record of the counter follows here.
    pub fn end_replayed(&mut self, offset: u64) -> Result<()> {
        self.close(offset).map(|_| ())
    }

    /// Closes the step in progress at `offset`: the counters it drew, which
    /// the device counter holds once the step's launches have run.
    fn close(&mut self, offset: u64) -> Result<u64> {
        let Some((seed, start)) = self.active.take() else {
            return Ok(0);
        };
        self.release(seed);
        if offset < start {
            candle_core::bail!(
                "Philox stream moved back during a step (from {start} to {offset}): draws \
                 would repeat"
            );
        }
        let n = offset - start;
        self.holds += n;
        Ok(n)
    }

    fn release(&self, seed: u64) {
        let mut a = anchors();
        if a.get(&(self.dev.id(), seed)).map(|e| e.0) == Some(self.address()) {
            a.remove(&(self.dev.id(), seed));
        }
    }
}

impl Drop for PhiloxAnchor {
    fn drop(&mut self) {
        if let Some((seed, _)) = self.active.take() {
            self.release(seed);
        }
    }
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

/// Bytes of the workspace given to cuBLAS (NVIDIA's size for Hopper,
/// what cuBLAS takes by default there).
const CUBLAS_WORKSPACE: usize = 32 << 20;

/// Gives candle's cuBLAS handle on `dev` a workspace of its own, kept for
/// the process. cuBLAS otherwise takes its workspace from a pool it may
/// grow on the fly, an allocation that a CUDA graph capture cannot
/// contain; with one set explicitly, the GEMMs of a captured step use
/// memory that outlives every graph (as PyTorch does for its graphs).
pub(crate) fn set_cublas_workspace(dev: &CudaDevice) -> Result<()> {
    type Workspaces = Mutex<HashMap<DeviceId, CudaSlice<u8>>>;
    static WORKSPACES: OnceLock<Workspaces> = OnceLock::new();
    let mut map = WORKSPACES
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    if map.contains_key(&dev.id()) {
        return Ok(());
    }
    let ws = alloc::<u8>(dev, CUBLAS_WORKSPACE)?;
    let stream = dev.cuda_stream();
    {
        use candle_core::cuda_backend::cudarc::driver::DevicePtr;
        let (ptr, _g) = ws.device_ptr(&stream);
        let blas = dev.cublas_handle();
        use candle_core::cuda_backend::cudarc::cublas::sys;
        // SAFETY: the handle is candle's for this device, bound to its one
        // stream; the workspace is kept in the map for the process, so it
        // outlives every use of the handle.
        let status = unsafe {
            sys::cublasSetWorkspace_v2(
                *blas.handle(),
                ptr as *mut std::ffi::c_void,
                CUBLAS_WORKSPACE,
            )
        };
        if status != sys::cublasStatus_t::CUBLAS_STATUS_SUCCESS {
            candle_core::bail!("cuBLAS workspace: {status:?}");
        }
    }
    map.insert(dev.id(), ws);
    Ok(())
}

/// cuBLASLt for the dense layers' GEMMs with a bias epilogue. The handle,
/// a workspace, and per GEMM shape the descriptors and the algorithm
/// cuBLASLt's heuristic chose (or that it found none) are made once per
/// device and kept for the process, so that a call is two library calls
/// (the bias pointer, the GEMM) and no heuristic query; the shapes are one
/// per dense-layer width and padded batch length, a few hundred at most.
mod lt {
    use std::collections::HashMap;

    use candle_core::cuda_backend::cudarc::cublaslt::{result, sys};
    use candle_core::cuda_backend::cudarc::driver::CudaSlice;
    use candle_core::DType;

    /// Workspace offered to the algorithms (NVIDIA's recommendation for
    /// Hopper; the stand-in's algorithm needs none).
    pub(super) const WORKSPACE: usize = 32 << 20;

    /// Which GEMM of a dense layer `y = x·Wᵀ + b` (x `[m, k]`, W `[n, k]`).
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
    pub(super) enum Kind {
        /// The forward, `y = x·Wᵀ + b`, the bias added by the epilogue.
        Bias,
        /// The weight gradient `dW = gᵀ·x` `[n, k]` with the bias gradient
        /// `db = Σ_rows g` from the same GEMM (epilogue `BGRADB`).
        BiasGrad,
    }

    /// One GEMM: kind, dtype and the layer's m, n, k.
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
    pub(super) struct Shape {
        pub kind: Kind,
        pub dtype: DType,
        pub m: usize,
        pub n: usize,
        pub k: usize,
    }

    /// The descriptors and algorithm of one shape.
    pub(super) struct Plan {
        pub desc: sys::cublasLtMatmulDesc_t,
        pub a: sys::cublasLtMatrixLayout_t,
        pub b: sys::cublasLtMatrixLayout_t,
        pub c: sys::cublasLtMatrixLayout_t,
        pub algo: sys::cublasLtMatmulAlgo_t,
    }

    /// One device's handle, workspace and plans (`None`: cuBLASLt has no
    /// algorithm for that shape; the caller composes it).
    pub(super) struct Device {
        pub handle: sys::cublasLtHandle_t,
        pub workspace: CudaSlice<u8>,
        pub plans: HashMap<Shape, Option<Plan>>,
    }

    // SAFETY: the raw handles are only used under the mutex that holds the
    // device's entry, on the one stream candle's device runs.
    unsafe impl Send for Device {}

    pub(super) fn err(what: &str, e: result::CublasError) -> candle_core::Error {
        candle_core::Error::Msg(format!("cuBLASLt {what}: {e:?}"))
    }

    /// Sets a descriptor attribute from a plain value.
    pub(super) unsafe fn set<T>(
        desc: sys::cublasLtMatmulDesc_t,
        attr: sys::cublasLtMatmulDescAttributes_t,
        v: &T,
    ) -> candle_core::Result<()> {
        result::set_matmul_desc_attribute(
            desc,
            attr,
            v as *const T as *const _,
            std::mem::size_of::<T>(),
        )
        .map_err(|e| err("descriptor", e))
    }

    /// The plan of a shape. Row-major matrices are read as column-major
    /// transposes. `Bias`: y `[m, n]` is yᵀ `[n, m]` = op(A)·B with A = W
    /// (stored `[k, n]`, transposed) and B = x (`[k, m]`); the bias runs
    /// along yᵀ's rows, y's columns. `BiasGrad`: dW `[n, k]` is dWᵀ `[k, n]`
    /// = A·op(B) with A = x (`[k, m]`) and B = g (stored `[n, m]`,
    /// transposed); `BGRADB` sums op(B) over the GEMM's reduced dimension
    /// (the m rows), one value per column of dWᵀ: db `[n]`.
    pub(super) fn plan(dev: &Device, s: Shape) -> candle_core::Result<Option<Plan>> {
        use sys::cublasLtEpilogue_t as E;
        use sys::cublasLtMatmulDescAttributes_t as A;
        let ty = match s.dtype {
            DType::BF16 => sys::cudaDataType_t::CUDA_R_16BF,
            _ => sys::cudaDataType_t::CUDA_R_16F,
        };
        let (m, n, k) = (s.m as u64, s.n as u64, s.k as u64);
        // (transa, transb, epilogue, A, B, C layouts as rows, cols, ld)
        type L = (u64, u64, u64);
        let (ta, tb, epi, la, lb, lc): (i32, i32, E, L, L, L) = match s.kind {
            Kind::Bias => (
                1,
                0,
                E::CUBLASLT_EPILOGUE_BIAS,
                (k, n, k),
                (k, m, k),
                (n, m, n),
            ),
            Kind::BiasGrad => (
                0,
                1,
                E::CUBLASLT_EPILOGUE_BGRADB,
                (k, m, k),
                (n, m, n),
                (k, n, k),
            ),
        };
        let desc = result::create_matmul_desc(
            sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
            sys::cudaDataType_t::CUDA_R_32F,
        )
        .map_err(|e| err("descriptor", e))?;
        let layout = |(rows, cols, ld): L| {
            result::create_matrix_layout(ty, rows, cols, ld as i64).map_err(|e| err("layout", e))
        };
        let (a, b, c) = (layout(la)?, layout(lb)?, layout(lc)?);
        // SAFETY: the descriptors were just created; each attribute gets a
        // value of the type the cuBLASLt documentation gives it
        // (cublasOperation_t: N = 0, T = 1).
        unsafe {
            set(desc, A::CUBLASLT_MATMUL_DESC_TRANSA, &ta)?;
            set(desc, A::CUBLASLT_MATMUL_DESC_TRANSB, &tb)?;
            set(desc, A::CUBLASLT_MATMUL_DESC_EPILOGUE, &(epi as u32))?;
            let pref = result::create_matmul_pref().map_err(|e| err("preference", e))?;
            result::set_matmul_pref_attribute(
                pref,
                sys::cublasLtMatmulPreferenceAttributes_t::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                &WORKSPACE as *const usize as *const _,
                std::mem::size_of::<usize>(),
            )
            .map_err(|e| err("preference", e))?;
            let h = result::get_matmul_algo_heuristic(dev.handle, desc, a, b, c, c, pref);
            result::destroy_matmul_pref(pref).map_err(|e| err("preference", e))?;
            match h {
                Ok(h) => Ok(Some(Plan {
                    desc,
                    a,
                    b,
                    c,
                    algo: h.algo,
                })),
                Err(result::CublasError(sys::cublasStatus_t::CUBLAS_STATUS_NOT_SUPPORTED)) => {
                    for l in [a, b, c] {
                        result::destroy_matrix_layout(l).map_err(|e| err("layout", e))?;
                    }
                    result::destroy_matmul_desc(desc).map_err(|e| err("descriptor", e))?;
                    Ok(None)
                }
                Err(e) => Err(err(&format!("algorithm for {s:?}"), e)),
            }
        }
    }
}

/// The device's cuBLASLt state ([`lt`]), made on first use.
fn blas_lt(dev: &CudaDevice) -> Result<Arc<Mutex<lt::Device>>> {
    type Devices = Mutex<HashMap<DeviceId, Arc<Mutex<lt::Device>>>>;
    static DEVICES: OnceLock<Devices> = OnceLock::new();
    let mut map = DEVICES
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    if let Some(d) = map.get(&dev.id()) {
        return Ok(d.clone());
    }
    use candle_core::cuda_backend::cudarc::cublaslt::result;
    let handle = result::create_handle().map_err(|e| lt::err("handle", e))?;
    let d = Arc::new(Mutex::new(lt::Device {
        handle,
        workspace: alloc::<u8>(dev, lt::WORKSPACE)?,
        plans: HashMap::new(),
    }));
    map.insert(dev.id(), d.clone());
    Ok(d)
}

/// Runs the plan of `shape` (made on first use): `out = op(A)·op(B)` with
/// the epilogue's vector at `vector` (the bias it reads, or the bias
/// gradient it writes). `Ok(false)` when cuBLASLt has no algorithm for the
/// shape: nothing ran.
///
/// # Safety
/// `a`, `b`, `out` and `vector` must be device pointers on `dev`'s stream to
/// buffers of the sizes the shape's kind gives them (see `lt::plan`).
unsafe fn run_lt(
    dev: &CudaDevice,
    shape: lt::Shape,
    a: u64,
    b: u64,
    out: u64,
    vector: u64,
) -> Result<bool> {
    use candle_core::cuda_backend::cudarc::cublaslt::{result, sys};
    use candle_core::cuda_backend::cudarc::driver::DevicePtrMut;
    let stream = dev.cuda_stream();
    let state = blas_lt(dev)?;
    let mut guard = state.lock().unwrap_or_else(|e| e.into_inner());
    let d = &mut *guard;
    if !d.plans.contains_key(&shape) {
        let p = lt::plan(d, shape)?;
        d.plans.insert(shape, p);
    }
    let Some(p) = &d.plans[&shape] else {
        return Ok(false);
    };
    let (alpha, beta) = (1f32, 0f32);
    let (ws, _rws) = d.workspace.device_ptr_mut(&stream);
    lt::set(
        p.desc,
        sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_BIAS_POINTER,
        &vector,
    )?;
    result::matmul(
        d.handle,
        p.desc,
        &alpha as *const f32 as *const _,
        &beta as *const f32 as *const _,
        a as *const _,
        p.a,
        b as *const _,
        p.b,
        out as *const _,
        p.c,
        out as *mut _,
        p.c,
        &p.algo,
        ws as *mut _,
        lt::WORKSPACE,
        stream.cu_stream() as *mut _,
    )
    .map_err(|e| lt::err("matmul", e))?;
    Ok(true)
}

/// Whether cuBLASLt takes these operands: one half-precision dtype,
/// contiguous, each starting on the 256-byte boundary its algorithm
/// choice assumes by default (f32 stays with cuBLAS: cuBLASLt would run it
/// in TF32).
fn lt_operands(dtype: DType, ops: &[(&CudaStorage, &Layout)]) -> bool {
    use candle_core::backend::BackendStorage;
    matches!(dtype, DType::BF16 | DType::F16)
        && ops.iter().all(|(s, l)| {
            s.dtype() == dtype
                && l.is_contiguous()
                && (l.start_offset() * dtype.size_in_bytes()).is_multiple_of(256)
        })
}

/// Runs `shape`'s plan on operand storages `a` and `b` into a new buffer of
/// `out_len` elements; the epilogue's vector is `bias` when given (an
/// input), else the output from element `vector_at` on (the bias gradient
/// it writes). `None` when cuBLASLt has no algorithm for the shape.
fn lt_gemm(
    shape: lt::Shape,
    a: (&CudaStorage, &Layout),
    b: (&CudaStorage, &Layout),
    bias: Option<(&CudaStorage, &Layout)>,
    out_len: usize,
    vector_at: usize,
) -> Result<Option<CudaStorage>> {
    fn typed<T: CudaDType + DeviceRepr>(
        shape: lt::Shape,
        a: (&CudaStorage, &Layout),
        b: (&CudaStorage, &Layout),
        bias: Option<(&CudaStorage, &Layout)>,
        out_len: usize,
        vector_at: usize,
    ) -> Result<Option<CudaStorage>> {
        use candle_core::cuda_backend::cudarc::driver::{DevicePtr, DevicePtrMut};
        let dev = a.0.device.clone();
        let stream = dev.cuda_stream();
        let av = view::<T>("linear", a.0, a.1)?;
        let bv = view::<T>("linear", b.0, b.1)?;
        let biasv = bias.map(|(s, l)| view::<T>("linear", s, l)).transpose()?;
        let mut out = alloc::<T>(&dev, out_len)?;
        let ran = {
            let (ap, _ra) = av.device_ptr(&stream);
            let (bp, _rb) = bv.device_ptr(&stream);
            let bias_ptr = biasv.as_ref().map(|v| v.device_ptr(&stream));
            let (op, _ro) = out.device_ptr_mut(&stream);
            let vector = match &bias_ptr {
                Some((p, _)) => *p,
                None => op + (vector_at * std::mem::size_of::<T>()) as u64,
            };
            // SAFETY: the callers size the operands and the output as the
            // shape's kind reads and writes them (see `lt::plan`); all are on
            // candle's stream.
            unsafe { run_lt(&dev, shape, ap, bp, op, vector)? }
        };
        Ok(ran.then(|| CudaStorage::wrap_cuda_slice(out, dev)))
    }
    match shape.dtype {
        DType::BF16 => typed::<half::bf16>(shape, a, b, bias, out_len, vector_at),
        _ => typed::<half::f16>(shape, a, b, bias, out_len, vector_at),
    }
}

/// `x·Wᵀ + b` for x `[m, k]`, W `[n, k]` and b `[n]` as one cuBLASLt GEMM
/// whose epilogue adds the bias: the bias is added to the f32 accumulator
/// before the one rounding to the output dtype (the GEMM-then-add
/// composition rounds twice), and no separate add kernel runs. `None` where
/// this does not apply ([`lt_operands`], empty sizes, no algorithm): the
/// caller composes the GEMM and the add.
pub(crate) fn linear_bias_lt(
    x: (&CudaStorage, &Layout),
    w: (&CudaStorage, &Layout),
    b: (&CudaStorage, &Layout),
) -> Result<Option<CudaStorage>> {
    use candle_core::backend::BackendStorage;
    let dtype = x.0.dtype();
    let (m, k) = x.1.shape().dims2()?;
    let (n, kw) = w.1.shape().dims2()?;
    if kw != k || b.1.dims() != [n] {
        candle_core::bail!(
            "linear: weight {:?} and bias {:?} for inputs {:?}",
            w.1.dims(),
            b.1.dims(),
            x.1.dims()
        );
    }
    if !lt_operands(dtype, &[x, w, b]) || m == 0 || n == 0 || k == 0 {
        return Ok(None);
    }
    let kind = lt::Kind::Bias;
    // A = W, B = x; y m·n elements.
    lt_gemm(
        lt::Shape {
            kind,
            dtype,
            m,
            n,
            k,
        },
        w,
        x,
        Some(b),
        m * n,
        0,
    )
}

/// The weight and bias gradients of `y = x·Wᵀ + b` for the incoming
/// gradient g `[m, n]` and x `[m, k]` in one cuBLASLt GEMM: `[dW (n·k),
/// db (n)]` in one buffer of x's dtype, dW = gᵀ·x in W's layout and db =
/// Σ_rows g from the GEMM's `BGRADB` epilogue (no separate sum kernel).
/// `None` where this does not apply (as [`linear_bias_lt`]).
pub(crate) fn linear_grads_lt(
    x: (&CudaStorage, &Layout),
    g: (&CudaStorage, &Layout),
) -> Result<Option<CudaStorage>> {
    use candle_core::backend::BackendStorage;
    let dtype = x.0.dtype();
    let (m, k) = x.1.shape().dims2()?;
    let (mg, n) = g.1.shape().dims2()?;
    if mg != m {
        candle_core::bail!(
            "linear: gradient {:?} for inputs {:?}",
            g.1.dims(),
            x.1.dims()
        );
    }
    // db starts n·k elements in: on the 256-byte boundary when n·k is.
    let db_aligned = (n * k * dtype.size_in_bytes()).is_multiple_of(256);
    if !lt_operands(dtype, &[x, g]) || !db_aligned || m == 0 || n == 0 || k == 0 {
        return Ok(None);
    }
    let kind = lt::Kind::BiasGrad;
    // A = x, B = g; dW n·k elements, then db.
    lt_gemm(
        lt::Shape {
            kind,
            dtype,
            m,
            n,
            k,
        },
        x,
        g,
        None,
        n * k + n,
        n * k,
    )
}
