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

/// cuBLASLt for the dense layers' GEMMs with a bias epilogue. The handle,
/// a workspace, and per GEMM shape the descriptors and the algorithm
/// cuBLASLt's heuristic chose are made once per device and kept for the
/// process, so that a call is two library calls (the bias pointer, the
/// GEMM) and no heuristic query; the shapes are one per dense-layer width
/// and padded batch length, a few hundred at most.
mod lt {
    use std::collections::HashMap;

    use candle_core::cuda_backend::cudarc::cublaslt::{result, sys};
    use candle_core::cuda_backend::cudarc::driver::CudaSlice;
    use candle_core::DType;

    /// Workspace offered to the algorithms (NVIDIA's recommendation for
    /// Hopper; the stand-in's algorithm needs none).
    pub(super) const WORKSPACE: usize = 32 << 20;

    /// One shape: y `[m, n]` = x `[m, k]`·Wᵀ + b.
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
    pub(super) struct Shape {
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

    /// One device's handle, workspace and plans.
    pub(super) struct Device {
        pub handle: sys::cublasLtHandle_t,
        pub workspace: CudaSlice<u8>,
        pub plans: HashMap<Shape, Plan>,
    }

    // SAFETY: the raw handles are only used under the mutex that holds the
    // device's entry, on the one stream candle's device runs.
    unsafe impl Send for Device {}

    fn err(what: &str, e: result::CublasError) -> candle_core::Error {
        candle_core::Error::Msg(format!("cuBLASLt {what}: {e:?}"))
    }

    /// Sets a descriptor attribute from a plain value.
    unsafe fn set<T>(
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

    /// Row-major y `[m, n]` is column-major yᵀ `[n, m]` = op(A)·B with A = W
    /// (stored column-major as `[k, n]`, transposed) and B = x (column-major
    /// `[k, m]`); the bias epilogue adds along yᵀ's rows, y's columns.
    pub(super) fn plan(dev: &Device, s: Shape) -> candle_core::Result<Plan> {
        use sys::cublasLtMatmulDescAttributes_t as A;
        let ty = match s.dtype {
            DType::BF16 => sys::cudaDataType_t::CUDA_R_16BF,
            _ => sys::cudaDataType_t::CUDA_R_16F,
        };
        let (m, n, k) = (s.m as u64, s.n as u64, s.k as u64);
        let desc = result::create_matmul_desc(
            sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
            sys::cudaDataType_t::CUDA_R_32F,
        )
        .map_err(|e| err("descriptor", e))?;
        let layout = |rows: u64, cols: u64, ld: u64| {
            result::create_matrix_layout(ty, rows, cols, ld as i64).map_err(|e| err("layout", e))
        };
        let (a, b, c) = (layout(k, n, k)?, layout(k, m, k)?, layout(n, m, n)?);
        // SAFETY: the descriptors were just created; each attribute gets a
        // value of the type the cuBLASLt documentation gives it.
        unsafe {
            // cublasOperation_t: CUBLAS_OP_N = 0, CUBLAS_OP_T = 1.
            set(desc, A::CUBLASLT_MATMUL_DESC_TRANSA, &1i32)?;
            set(desc, A::CUBLASLT_MATMUL_DESC_TRANSB, &0i32)?;
            set(
                desc,
                A::CUBLASLT_MATMUL_DESC_EPILOGUE,
                &(sys::cublasLtEpilogue_t::CUBLASLT_EPILOGUE_BIAS as u32),
            )?;
            let pref = result::create_matmul_pref().map_err(|e| err("preference", e))?;
            result::set_matmul_pref_attribute(
                pref,
                sys::cublasLtMatmulPreferenceAttributes_t::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                &WORKSPACE as *const usize as *const _,
                std::mem::size_of::<usize>(),
            )
            .map_err(|e| err("preference", e))?;
            let h = result::get_matmul_algo_heuristic(dev.handle, desc, a, b, c, c, pref)
                .map_err(|e| err(&format!("algorithm for {s:?}"), e));
            result::destroy_matmul_pref(pref).map_err(|e| err("preference", e))?;
            Ok(Plan {
                desc,
                a,
                b,
                c,
                algo: h?.algo,
            })
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
    let handle = result::create_handle()
        .map_err(|e| candle_core::Error::Msg(format!("cuBLASLt handle: {e:?}")))?;
    let d = Arc::new(Mutex::new(lt::Device {
        handle,
        workspace: alloc::<u8>(dev, lt::WORKSPACE)?,
        plans: HashMap::new(),
    }));
    map.insert(dev.id(), d.clone());
    Ok(d)
}

/// `x·Wᵀ + b` for x `[m, k]`, W `[n, k]` and b `[n]` (contiguous, one
/// half-precision dtype) as one cuBLASLt GEMM whose epilogue adds the bias:
/// the bias is added to the f32 accumulator before the one rounding to the
/// output dtype (the GEMM-then-add composition rounds twice), and no
/// separate add kernel runs. `None` where this does not apply: f32 (which
/// cuBLASLt would run in TF32) and f64, strided inputs, or a buffer not on
/// the 256-byte boundary cuBLASLt's algorithm choice assumes by default;
/// the caller then composes the GEMM and the add.
pub(crate) fn linear_bias_lt(
    x: (&CudaStorage, &Layout),
    w: (&CudaStorage, &Layout),
    b: (&CudaStorage, &Layout),
) -> Result<Option<CudaStorage>> {
    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::cudarc::cublaslt::result;
    use candle_core::cuda_backend::cudarc::driver::{DevicePtr, DevicePtrMut};
    let dtype = x.0.dtype();
    if !matches!(dtype, DType::BF16 | DType::F16)
        || w.0.dtype() != dtype
        || b.0.dtype() != dtype
        || ![x.1, w.1, b.1].iter().all(|l| l.is_contiguous())
    {
        return Ok(None);
    }
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
    let aligned = [x.1, w.1, b.1]
        .iter()
        .all(|l| (l.start_offset() * dtype.size_in_bytes()).is_multiple_of(256));
    if !aligned || m == 0 || n == 0 || k == 0 {
        return Ok(None);
    }
    let dev = x.0.device.clone();
    let stream = dev.cuda_stream();
    let state = blas_lt(&dev)?;
    let mut guard = state.lock().unwrap_or_else(|e| e.into_inner());
    let d = &mut *guard;
    let shape = lt::Shape { dtype, m, n, k };
    if !d.plans.contains_key(&shape) {
        let p = lt::plan(d, shape)?;
        d.plans.insert(shape, p);
    }
    let p = &d.plans[&shape];
    macro_rules! run {
        ($t:ty) => {{
            let xv = view::<$t>("linear", x.0, x.1)?;
            let wv = view::<$t>("linear", w.0, w.1)?;
            let bv = view::<$t>("linear", b.0, b.1)?;
            let mut y = alloc::<$t>(&dev, m * n)?;
            let (alpha, beta) = (1f32, 0f32);
            {
                let (xp, _rx) = xv.device_ptr(&stream);
                let (wp, _rw) = wv.device_ptr(&stream);
                let (bp, _rb) = bv.device_ptr(&stream);
                let (yp, _ry) = y.device_ptr_mut(&stream);
                let (ws, _rws) = d.workspace.device_ptr_mut(&stream);
                // SAFETY: the plan's layouts describe exactly these buffers
                // (W n·k, x m·k, y m·n elements, b n), all on candle's stream,
                // which the GEMM is queued on; the descriptor is this shape's
                // own and only used under the device's lock.
                unsafe {
                    use candle_core::cuda_backend::cudarc::cublaslt::sys;
                    result::set_matmul_desc_attribute(
                        p.desc,
                        sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_BIAS_POINTER,
                        &bp as *const _ as *const _,
                        std::mem::size_of_val(&bp),
                    )
                    .and_then(|()| {
                        result::matmul(
                            d.handle,
                            p.desc,
                            &alpha as *const f32 as *const _,
                            &beta as *const f32 as *const _,
                            wp as *const _,
                            p.a,
                            xp as *const _,
                            p.b,
                            yp as *const _,
                            p.c,
                            yp as *mut _,
                            p.c,
                            &p.algo,
                            ws as *mut _,
                            lt::WORKSPACE,
                            stream.cu_stream() as *mut _,
                        )
                    })
                    .map_err(|e| candle_core::Error::Msg(format!("cuBLASLt matmul: {e:?}")))?;
                }
            }
            CudaStorage::wrap_cuda_slice(y, dev.clone())
        }};
    }
    Ok(Some(match dtype {
        DType::BF16 => run!(half::bf16),
        _ => run!(half::f16),
    }))
}
