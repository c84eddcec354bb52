//! Fused AdamW step, in place: one pass updates both moments, one pass the
//! parameter, instead of the ~16 elementwise candle ops (each a kernel
//! launch and an allocation on CUDA) per parameter tensor of the composed
//! update. [`crate::train::optim::AdamW`] drives it over every trainable
//! tensor; the gradient-clipping factor and RecAdam's pull towards the
//! pretrained weights are folded in.
//!
//! # Semantics
//! For a parameter `p` of dtype T (f32 or f64), its state `[m; v]` (one
//! tensor of shape `[2, n]`, same dtype) and a gradient `g` (converted to T,
//! then multiplied by the optional `scale` converted to T), every operation
//! below rounds to T, in this order — exactly the composed candle update
//! `m = m·β₁ + g·(1 − β₁)` … (scalar operands rounded to T as candle's
//! `affine` rounds them, `x·c + 0`), so the two agree bit for bit (a test
//! holds the CPU op to that; the CUDA kernels use explicit round-to-nearest
//! intrinsics, no FMA contraction, so they agree too):
//!
//! ```text
//! m ← (m·β₁ + 0) + (g·(1−β₁) + 0)
//! v ← (v·β₂ + 0) + ((g·g)·(1−β₂) + 0)
//! u = (m·(1/c₁) + 0) / (√(v·(1/c₂) + 0) + ε)          c₁ = 1−β₁ᵗ, c₂ = 1−β₂ᵗ
//! RecAdam:  u ← (u·λ + 0) + ((p − p*)·((1−λ)·γ) + 0)   (p* the anchor)
//! p' = p − (u·lr + 0)
//! decay:    p' ← p' − (p·(lr·wd) + 0)
//! ```
//!
//! Parameters are f32 or f64 (master weights; mixed precision keeps them in
//! f32), because the moments and the update need that precision; bf16/f16
//! parameters are refused with an error.
use candle_core::{CpuStorage, DType, InplaceOp2, InplaceOp3, Layout, Tensor, WithDType};

use crate::error::{check_same, param_err, shape_err, Error, Result};
use crate::ops::storage_addr;

/// The constants of one step for one tensor (f64; rounded to the
/// parameter's dtype by the op).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamWStep {
    /// β₁.
    pub beta1: f64,
    /// β₂.
    pub beta2: f64,
    /// ε.
    pub eps: f64,
    /// Bias corrections `1 − β₁ᵗ` and `1 − β₂ᵗ` of step t (1-based).
    pub c1: f64,
    /// `1 − β₂ᵗ`.
    pub c2: f64,
    /// This tensor's learning rate.
    pub lr: f64,
    /// Decoupled weight decay: `Some(lr·wd)` when it applies.
    pub decay: Option<f64>,
    /// RecAdam: `Some((λ(t), (1 − λ(t))·γ))`, with an anchor.
    pub recadam: Option<(f64, f64)>,
}

impl AdamWStep {
    fn validate(&self) -> Result<()> {
        let finite = [self.beta1, self.beta2, self.eps, self.c1, self.c2, self.lr]
            .iter()
            .chain(self.decay.iter())
            .chain(self.recadam.iter().flat_map(|(a, b)| [a, b]))
            .all(|x| x.is_finite());
        let ok = finite
            && (0.0..1.0).contains(&self.beta1)
            && (0.0..1.0).contains(&self.beta2)
            && self.eps > 0.0
            && self.c1 > 0.0
            && self.c2 > 0.0
            && self.lr >= 0.0;
        if ok {
            Ok(())
        } else {
            Err(param_err(
                "adamw_step",
                format!("constants out of range: {self:?}"),
            ))
        }
    }
}

/// Zeroed AdamW state `[m; v]` (shape `[2, n]`) for `param`.
pub fn adamw_state(param: &Tensor) -> Result<Tensor> {
    Ok(Tensor::zeros(
        (2, param.elem_count()),
        param.dtype(),
        param.device(),
    )?)
}

/// One AdamW step on `param`, in place, updating its `state` (from
/// [`adamw_state`]) too. `grad` has the parameter's shape (any float dtype);
/// `scale` (one element, e.g. the clipping factor, left on the device) multiplies
/// it; `anchor` (the pretrained value) must be given exactly when
/// `step.recadam` is. See the module docs for the arithmetic.
pub fn adamw_step(
    param: &Tensor,
    state: &Tensor,
    grad: &Tensor,
    scale: Option<&Tensor>,
    anchor: Option<&Tensor>,
    step: &AdamWStep,
) -> Result<()> {
    const OP: &str = "adamw_step";
    step.validate()?;
    let dtype = param.dtype();
    if !matches!(dtype, DType::F32 | DType::F64) {
        return Err(Error::DType {
            op: OP,
            msg: format!(
                "parameter is {dtype:?}; AdamW keeps f32 or f64 parameters (master weights)"
            ),
        });
    }
    if !param.is_contiguous() {
        return Err(shape_err(OP, "parameter must be contiguous"));
    }
    if state.dims() != [2, param.elem_count()] || !state.is_contiguous() {
        return Err(shape_err(
            OP,
            format!(
                "state must be a contiguous [2, {}] tensor (m; v), got {:?}",
                param.elem_count(),
                state.dims()
            ),
        ));
    }
    if state.dtype() != dtype || !state.device().same_device(param.device()) {
        return Err(Error::DType {
            op: OP,
            msg: format!(
                "state is {:?} on {:?}, parameter {dtype:?} on {:?}",
                state.dtype(),
                state.device().location(),
                param.device().location()
            ),
        });
    }
    if grad.dims() != param.dims() {
        return Err(shape_err(
            OP,
            format!(
                "gradient has shape {:?}, parameter {:?}",
                grad.dims(),
                param.dims()
            ),
        ));
    }
    let grad = grad.to_dtype(dtype)?.contiguous()?;
    check_same(OP, param, &grad, ("parameter", "gradient"))?;
    let scale = match scale {
        None => None,
        Some(s) if s.elem_count() != 1 => {
            return Err(shape_err(
                OP,
                format!("scale must have one element, got shape {:?}", s.dims()),
            ))
        }
        Some(s) => {
            let s = s.to_dtype(dtype)?.flatten_all()?;
            if !s.device().same_device(param.device()) {
                return Err(Error::Device {
                    op: OP,
                    msg: "scale is not on the parameter's device".into(),
                });
            }
            Some(s)
        }
    };
    let anchor = match (anchor, step.recadam) {
        (Some(a), Some(_)) => {
            check_same(OP, param, a, ("parameter", "anchor"))?;
            Some(a.contiguous()?)
        }
        (None, None) => None,
        _ => {
            return Err(param_err(
                OP,
                "an anchor must be given exactly when RecAdam's constants are",
            ))
        }
    };
    // Both in-place destinations must own their memory: checked before
    // either is written, so a refused call changes nothing.
    let addrs: Vec<usize> = [
        Some(param),
        Some(state),
        Some(&grad),
        scale.as_ref(),
        anchor.as_ref(),
    ]
    .into_iter()
    .flatten()
    .map(storage_addr)
    .collect();
    for (i, name) in ["parameter", "state"].into_iter().enumerate() {
        if addrs
            .iter()
            .enumerate()
            .any(|(j, &a)| j != i && a == addrs[i])
        {
            return Err(param_err(
                OP,
                format!("the {name} shares memory with another operand; it is updated in place"),
            ));
        }
    }
    if param.elem_count() == 0 {
        return Ok(());
    }
    let moments = Moments(*step);
    match &scale {
        Some(s) => state.inplace_op3(&grad, s, &moments)?,
        None => state.inplace_op2(&grad, &moments)?,
    }
    let update = Update(*step);
    match &anchor {
        Some(a) => param.inplace_op3(state, a, &update)?,
        None => param.inplace_op2(state, &update)?,
    }
    Ok(())
}

/// One tensor of a multi-tensor step (`multi::clip_and_step`).
#[derive(Clone, Copy, Debug)]
pub struct AdamWTensor<'a> {
    /// The parameter, updated in place.
    pub param: &'a Tensor,
    /// Its `[m; v]` from [`adamw_state`].
    pub state: &'a Tensor,
    /// f32, or bf16 (mixed precision's weight gradients, widened exactly).
    pub grad: &'a Tensor,
    /// The pretrained value, exactly when `step.recadam` is given.
    pub anchor: Option<&'a Tensor>,
    /// A bf16 copy of the parameter, rewritten as `bf16(new value)` in the
    /// same pass (`crate::model::Stream::compute_weight`).
    pub shadow: Option<&'a Tensor>,
    /// The step's constants.
    pub step: AdamWStep,
}

/// The arithmetic of the module docs in a float type.
trait Real: WithDType {
    fn sqrt(self) -> Self;
}
impl Real for f32 {
    fn sqrt(self) -> Self {
        f32::sqrt(self)
    }
}
impl Real for f64 {
    fn sqrt(self) -> Self {
        f64::sqrt(self)
    }
}

/// `[m; v]` ← the moments after gradient `g` (times `scale`).
fn moments_cpu<T: Real>(mv: &mut [T], g: &[T], scale: Option<T>, c: &AdamWStep) {
    let n = g.len();
    let (m, v) = mv.split_at_mut(n);
    let t = T::from_f64;
    let (b1, ob1, b2, ob2, zero) = (
        t(c.beta1),
        t(1.0 - c.beta1),
        t(c.beta2),
        t(1.0 - c.beta2),
        T::zero(),
    );
    for i in 0..n {
        let gi = match scale {
            Some(k) => g[i] * k,
            None => g[i],
        };
        m[i] = (m[i] * b1 + zero) + (gi * ob1 + zero);
        v[i] = (v[i] * b2 + zero) + ((gi * gi) * ob2 + zero);
    }
}

/// `p` ← the AdamW (RecAdam) update from the new moments.
fn update_cpu<T: Real>(p: &mut [T], mv: &[T], anchor: Option<&[T]>, c: &AdamWStep) {
    let n = p.len();
    let (m, v) = mv.split_at(n);
    let t = T::from_f64;
    let (ic1, ic2, eps, lr, zero) = (t(1.0 / c.c1), t(1.0 / c.c2), t(c.eps), t(c.lr), T::zero());
    let rec = c.recadam.map(|(lam, pull)| (t(lam), t(pull)));
    let dlr = c.decay.map(t);
    for i in 0..n {
        let mh = m[i] * ic1 + zero;
        let vh = v[i] * ic2 + zero;
        let mut u = mh / (vh.sqrt() + eps);
        if let (Some((lam, pull)), Some(a)) = (rec, anchor) {
            u = (u * lam + zero) + ((p[i] - a[i]) * pull + zero);
        }
        let old = p[i];
        let mut next = old - (u * lr + zero);
        if let Some(d) = dlr {
            next -= old * d + zero;
        }
        p[i] = next;
    }
}

/// The contiguous elements of a layout, mutable.
fn slice_mut<'a, T: WithDType>(v: &'a mut [T], l: &Layout) -> candle_core::Result<&'a mut [T]> {
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&mut v[a..b]),
        None => candle_core::bail!("adamw_step: destination must be contiguous"),
    }
}

use super::cpu::contiguous;

/// One in-place pass of the step: `dst` updated from a source and an
/// optional second one, all in the parameter's dtype. (The kernel items are
/// used by the `cuda` feature only.)
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
trait Pass {
    /// The candle op's name and the kernel's (without the dtype suffix).
    const NAME: &'static str;
    const KERNEL: &'static str;
    /// Elements of `dst` per parameter element (the state holds m and v).
    const DST_PER_PARAM: usize;
    fn apply<T: Real>(&self, dst: &mut [T], a: &[T], b: Option<&[T]>);
    /// The kernel's scalar arguments after `n` (each rounded to the
    /// parameter's dtype), and its trailing int flag if it has one.
    fn consts(&self) -> (Vec<f64>, Option<i32>);
}

/// In place on the state; sources: the gradient (and the scale).
struct Moments(AdamWStep);
/// In place on the parameter; sources: the state (and the anchor).
struct Update(AdamWStep);

impl Pass for Moments {
    const NAME: &'static str = "tunefuse-adamw-moments";
    const KERNEL: &'static str = "adamw_moments";
    const DST_PER_PARAM: usize = 2;
    fn apply<T: Real>(&self, mv: &mut [T], g: &[T], scale: Option<&[T]>) {
        moments_cpu(mv, g, scale.map(|k| k[0]), &self.0);
    }
    fn consts(&self) -> (Vec<f64>, Option<i32>) {
        let c = &self.0;
        (vec![c.beta1, 1.0 - c.beta1, c.beta2, 1.0 - c.beta2], None)
    }
}

impl Pass for Update {
    const NAME: &'static str = "tunefuse-adamw-update";
    const KERNEL: &'static str = "adamw_update";
    const DST_PER_PARAM: usize = 1;
    fn apply<T: Real>(&self, p: &mut [T], mv: &[T], anchor: Option<&[T]>) {
        update_cpu(p, mv, anchor, &self.0);
    }
    fn consts(&self) -> (Vec<f64>, Option<i32>) {
        let c = &self.0;
        let (lam, pull) = c.recadam.unwrap_or((1.0, 0.0));
        let consts = vec![
            1.0 / c.c1,
            1.0 / c.c2,
            c.eps,
            c.lr,
            lam,
            pull,
            c.decay.unwrap_or(0.0),
        ];
        (consts, Some(i32::from(c.decay.is_some())))
    }
}

/// A pass on the CPU: f32 or f64 throughout.
fn cpu<P: Pass>(
    pass: &P,
    dst: &mut CpuStorage,
    dl: &Layout,
    (a, al): (&CpuStorage, &Layout),
    b: Option<(&CpuStorage, &Layout)>,
) -> candle_core::Result<()> {
    fn run<P: Pass, T: Real>(
        pass: &P,
        dst: &mut [T],
        dl: &Layout,
        (a, al): (&[T], &Layout),
        b: Option<(&CpuStorage, &Layout)>,
    ) -> candle_core::Result<()> {
        let b = b
            .map(|(b, bl)| contiguous(b.as_slice::<T>()?, bl))
            .transpose()?;
        pass.apply(slice_mut(dst, dl)?, contiguous(a, al)?, b);
        Ok(())
    }
    match (dst, a) {
        (CpuStorage::F32(d), CpuStorage::F32(a)) => run(pass, d, dl, (a, al), b),
        (CpuStorage::F64(d), CpuStorage::F64(a)) => run(pass, d, dl, (a, al), b),
        _ => candle_core::bail!("adamw_step: operands must all be f32 or all f64"),
    }
}

/// Both arities of a pass (its second source is optional: the scale of
/// `Moments`, the anchor of `Update`): `InplaceOp2` without it,
/// `InplaceOp3` with it.
macro_rules! optional_source_op {
    ($ty:ident) => {
        impl InplaceOp2 for $ty {
            fn name(&self) -> &'static str {
                <$ty as Pass>::NAME
            }
            fn cpu_fwd(
                &self,
                dst: &mut CpuStorage,
                dl: &Layout,
                a: &CpuStorage,
                al: &Layout,
            ) -> candle_core::Result<()> {
                cpu(self, dst, dl, (a, al), None)
            }
            #[cfg(feature = "cuda")]
            fn cuda_fwd(
                &self,
                dst: &mut candle_core::CudaStorage,
                dl: &Layout,
                a: &candle_core::CudaStorage,
                al: &Layout,
            ) -> candle_core::Result<()> {
                cuda::launch(self, dst, dl, (a, al), None)
            }
        }

        impl InplaceOp3 for $ty {
            fn name(&self) -> &'static str {
                <$ty as Pass>::NAME
            }
            fn cpu_fwd(
                &self,
                dst: &mut CpuStorage,
                dl: &Layout,
                a: &CpuStorage,
                al: &Layout,
                b: &CpuStorage,
                bl: &Layout,
            ) -> candle_core::Result<()> {
                cpu(self, dst, dl, (a, al), Some((b, bl)))
            }
            #[cfg(feature = "cuda")]
            fn cuda_fwd(
                &self,
                dst: &mut candle_core::CudaStorage,
                dl: &Layout,
                a: &candle_core::CudaStorage,
                al: &Layout,
                b: &candle_core::CudaStorage,
                bl: &Layout,
            ) -> candle_core::Result<()> {
                cuda::launch(self, dst, dl, (a, al), Some((b, bl)))
            }
        }
    };
}

optional_source_op!(Moments);
optional_source_op!(Update);

#[cfg(feature = "cuda")]
mod cuda {
    use super::Pass;
    use crate::cuda::{self as k, ptx};
    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::cudarc::driver::{DeviceRepr, PushKernelArg};
    use candle_core::cuda_backend::CudaDType;
    use candle_core::{CudaStorage, DType, Layout, Result, WithDType};

    const MODULE: &str = "tunefuse_adamw";
    const BLOCK: u32 = 256;

    /// `<kernel>_<f32|f64>(T* dst, const T* a, const T* b or null, int64 n,
    /// T consts..., [int flag])` over the n parameter elements.
    pub(super) fn launch<P: Pass>(
        pass: &P,
        dst: &mut CudaStorage,
        dl: &Layout,
        a: (&CudaStorage, &Layout),
        b: Option<(&CudaStorage, &Layout)>,
    ) -> Result<()> {
        let dev = dst.device.clone();
        let dtype = dst.dtype();
        let suffix = match dtype {
            DType::F32 => "f32",
            DType::F64 => "f64",
            other => candle_core::bail!("adamw_step: parameter dtype {other:?} (f32 or f64)"),
        };
        let f = k::func(&dev, MODULE, ptx::ADAMW, &format!("{}_{suffix}", P::KERNEL))?;
        if dtype == DType::F64 {
            go::<f64, P>(pass, &f, dst, dl, a, b)
        } else {
            go::<f32, P>(pass, &f, dst, dl, a, b)
        }
    }

    fn go<T: CudaDType + DeviceRepr + WithDType, P: Pass>(
        pass: &P,
        f: &k::Kernel,
        dst: &mut CudaStorage,
        dl: &Layout,
        a: (&CudaStorage, &Layout),
        b: Option<(&CudaStorage, &Layout)>,
    ) -> Result<()> {
        let n = dl.shape().elem_count() / P::DST_PER_PARAM;
        let (consts, flag) = pass.consts();
        let consts: Vec<T> = consts.iter().map(|&x| T::from_f64(x)).collect();
        let av = k::view::<T>("adamw_step", a.0, a.1)?;
        let bv = b
            .map(|(s, l)| k::view::<T>("adamw_step", s, l))
            .transpose()?;
        let mut d = dst.as_cuda_slice_mut::<T>()?.slice_mut(dl.start_offset()..);
        let n64 = n as i64;
        let mut bld = f.builder();
        bld.arg(&mut d).arg(&av);
        k::arg_opt(&mut bld, bv.as_ref());
        bld.arg(&n64);
        for x in &consts {
            bld.arg(x);
        }
        if let Some(flag) = flag.as_ref() {
            bld.arg(flag);
        }
        k::launch(&mut bld, k::grid_for(n, BLOCK), BLOCK)
    }
}

/// The optimiser step over every trainable tensor at once on CUDA: the
/// global gradient norm, the clipping factor and AdamW in three launches and
/// one host→device copy (a table of the tensors), where the per-tensor path
/// takes about five launches per tensor (~520 for MiniLM's 103 tensors).
///
/// Same arithmetic as the per-tensor path: AdamW element by element exactly
/// as [`adamw_step`] (bit for bit: the update reads the moments the same
/// thread just wrote, the values the second per-tensor kernel re-reads);
/// the norm sums squares in f32 over chunks of 64 Ki elements and the
/// chunks in f64, where the per-tensor path sums each tensor in f32 and the
/// tensors in f64 (the two agree to f32 rounding of the partial sums); the
/// clipping factor is `train::optim::clip_scale`'s.
#[cfg(feature = "cuda")]
pub mod multi {
    use super::{AdamWStep, AdamWTensor};
    use crate::cuda::{self as k, ptx};
    use crate::error::Result;
    use crate::ops::storage_addr;
    use candle_core::backend::BackendDevice;
    use candle_core::cuda_backend::cudarc::driver::{DevicePtr, PushKernelArg};
    use candle_core::cuda_backend::{CudaDevice, CudaStorage};
    use candle_core::op::BackpropOp;
    use candle_core::{DType, Storage, Tensor};

    /// Elements per chunk (one block each).
    const CHUNK: usize = 1 << 16;
    const BLOCK: u32 = 256;
    const MODULE: &str = "tunefuse_adamw";

    /// `MtTensor` of kernels/adamw.cu: what stays put from step to step.
    #[repr(C)]
    #[derive(Clone, Copy, Default)]
    struct MtTensor {
        p: u64,
        mv: u64,
        anchor: u64,
        shadow: u64,
        n: i64,
        group: i32,
        decay: i32,
        g_bf16: i32,
        pad: i32,
    }
    /// `MtGroup` of kernels/adamw.cu: one step's scalars of a set of
    /// tensors.
    #[repr(C)]
    #[derive(Clone, Copy, Default, PartialEq)]
    struct MtGroup {
        lr: f32,
        lam: f32,
        pull: f32,
        dlr: f32,
    }
    /// Distinct scalar sets one launch carries (`MT_GROUPS`): layer-wise
    /// learning rates with and without decay need 2·(layers + 2).
    const GROUPS: usize = 256;
    /// Tensors one launch carries (`MT_TENSORS`).
    const TENSORS: usize = 1024;
    /// `MtStep` of kernels/adamw.cu, passed by value (8 KB, within the
    /// 32 KB of kernel parameters that CUDA 12.1+ allows on sm_70+).
    #[repr(C)]
    #[derive(Clone, Copy)]
    struct MtStep {
        grad: [u64; TENSORS],
    }
    /// `MtScalars` of kernels/adamw.cu: the step's scalars, written into a
    /// device buffer before the launch ([`TableCache`] keeps it).
    #[repr(C)]
    #[derive(Clone, Copy)]
    struct MtScalars {
        ic1: f32,
        ic2: f32,
        pad: [f32; 2],
        group: [MtGroup; GROUPS],
    }
    // SAFETY: plain `repr(C)` data, laid out as the kernel's struct.
    unsafe impl candle_core::cuda_backend::cudarc::driver::DeviceRepr for MtStep {}
    /// `MtChunk` of kernels/adamw.cu.
    #[repr(C)]
    #[derive(Clone, Copy)]
    struct MtChunk {
        tensor: i32,
        pad: i32,
        start: i64,
    }
    const _: () = assert!(std::mem::size_of::<MtTensor>() == 56);
    const _: () = assert!(std::mem::size_of::<MtChunk>() == 16);
    const _: () = assert!(std::mem::size_of::<MtStep>() == 8 * TENSORS);
    const _: () = assert!(std::mem::size_of::<MtScalars>() == 16 + 16 * GROUPS);
    /// Bytes of an `MtScalars` whose first `groups` groups are used.
    const fn scalars_len(groups: usize) -> usize {
        std::mem::offset_of!(MtScalars, group) + groups * std::mem::size_of::<MtGroup>()
    }

    /// The device and the first element's address of a contiguous f32
    /// CUDA tensor; `None` for any other tensor.
    fn address(t: &Tensor) -> Option<(CudaDevice, u64)> {
        address_of(t, DType::F32)
    }

    /// [`address`] for a contiguous CUDA tensor of dtype `dt` (f32 or
    /// bf16).
    fn address_of(t: &Tensor, dt: DType) -> Option<(CudaDevice, u64)> {
        if t.dtype() != dt || !t.is_contiguous() {
            return None;
        }
        let (st, l) = t.storage_and_layout();
        let Storage::Cuda(cs) = &*st else { return None };
        let stream = cs.device.cuda_stream();
        // With one stream and event tracking off (crate::cuda_device) the
        // returned guard records nothing; stream order keeps the kernel
        // after every earlier write and before any later free.
        let ptr = match dt {
            DType::F32 => cs.as_cuda_slice::<f32>().ok()?.device_ptr(&stream).0,
            DType::BF16 => cs.as_cuda_slice::<half::bf16>().ok()?.device_ptr(&stream).0,
            _ => return None,
        };
        Some((
            cs.device.clone(),
            ptr + (dt.size_in_bytes() * l.start_offset()) as u64,
        ))
    }

    /// The bytes of a `repr(C)` slice without padding (MtTensor, MtChunk,
    /// MtScalars).
    fn bytes<T: Copy>(v: &[T]) -> &[u8] {
        // SAFETY: T is one of the padding-free repr(C) structs above (their
        // explicit pad fields fill every gap), so every byte is initialised.
        unsafe { std::slice::from_raw_parts(v.as_ptr().cast::<u8>(), std::mem::size_of_val(v)) }
    }

    /// The bytes of the `MtScalars` of a step whose tensors take `steps`
    /// (in table order; they share β₁, β₂, ε and the bias corrections, as
    /// [`clip_and_step`] checks), and each tensor's scalar group; `None`
    /// for more than `GROUPS` distinct sets.
    fn scalars_of(steps: &[AdamWStep], cache: &mut TableCache) -> Option<(Vec<u8>, Vec<usize>)> {
        let s0 = steps.first()?;
        let per: Vec<MtGroup> = steps
            .iter()
            .map(|st| {
                let (lam, pull) = st.recadam.unwrap_or((1.0, 0.0));
                MtGroup {
                    lr: st.lr as f32,
                    lam: lam as f32,
                    pull: pull as f32,
                    dlr: st.decay.unwrap_or(0.0) as f32,
                }
            })
            .collect();
        let groups = cache.grouping(&per)?;
        let mut sc = MtScalars {
            ic1: (1.0 / s0.c1) as f32,
            ic2: (1.0 / s0.c2) as f32,
            pad: [0.0; 2],
            group: [MtGroup::default(); GROUPS],
        };
        let mut ngroups = 0;
        for (&g, s) in groups.iter().zip(&per) {
            sc.group[g] = *s;
            ngroups = ngroups.max(g + 1);
        }
        let b = bytes(std::slice::from_ref(&sc))[..scalars_len(ngroups)].to_vec();
        Some((b, groups))
    }

    /// Writes the scalars of a step whose tensors take `steps` (in the
    /// order [`clip_and_step`] receives them) into the buffer its launch
    /// reads on `dev`, ahead of the step: a step captured into a CUDA
    /// graph, or the replay of one, takes its scalars from there, and
    /// [`clip_and_step`] then finds them in place and uploads nothing
    /// (a capture cannot contain the upload). `Ok(false)`, with nothing
    /// written, where the multi-tensor form would not take the scalars.
    pub fn stage_scalars(
        dev: &CudaDevice,
        steps: &[AdamWStep],
        cache: &mut TableCache,
    ) -> Result<bool> {
        let before = cache.groups.clone();
        let Some((sc, groups)) = scalars_of(steps, cache) else {
            return Ok(false);
        };
        // New groups would name other slots than the table holds (the
        // next multi-tensor step uploads a table that matches; a captured
        // graph holds the old one).
        if before.as_ref() != Some(&groups) {
            return Ok(false);
        }
        cache.scalars(dev, &sc)?;
        Ok(true)
    }

    /// Clips by `max_norm` (0: no clipping) and takes one AdamW step of
    /// every item; returns the global gradient norm (an f64 scalar on the
    /// device). `Ok(None)`, with nothing done, when the multi-tensor form
    /// does not apply (not every tensor a contiguous f32 CUDA tensor of
    /// matching shape, steps not sharing β₁, β₂, ε and the bias corrections,
    /// an in-place operand sharing memory, more than 1,024 tensors or 256
    /// distinct sets of learning rate, decay and RecAdam weights, or no
    /// items): the caller then takes the per-tensor path, which also reports
    /// any invalid input.
    ///
    /// `cache` keeps the last table uploaded: while the parameters, their
    /// moments, copies and anchors stay where they are (they live as long
    /// as the optimiser), a step uploads nothing.
    pub fn clip_and_step(
        items: &[AdamWTensor<'_>],
        max_norm: f64,
        cache: &mut TableCache,
    ) -> Result<Option<Tensor>> {
        let Some(first) = items.first() else {
            return Ok(None);
        };
        if items.len() > TENSORS {
            return Ok(None);
        }
        let s0 = first.step;
        let mut dev = None;
        let mut tensors = Vec::with_capacity(items.len());
        let mut grads = MtStep { grad: [0; TENSORS] };
        for it in items {
            let st = it.step;
            let n = it.param.elem_count();
            let same = (st.beta1, st.beta2, st.eps, st.c1, st.c2)
                == (s0.beta1, s0.beta2, s0.eps, s0.c1, s0.c2);
            if !same
                || st.validate().is_err()
                || it.grad.dims() != it.param.dims()
                || it.state.dims() != [2, n]
                || it.anchor.is_some() != st.recadam.is_some()
                || it.anchor.is_some_and(|a| a.dims() != it.param.dims())
            {
                return Ok(None);
            }
            let g_bf16 = it.grad.dtype() == DType::BF16;
            let (Some((d, p)), Some((_, mv)), Some((_, g))) = (
                address(it.param),
                address(it.state),
                address_of(it.grad, it.grad.dtype()),
            ) else {
                return Ok(None);
            };
            let shadow = match it.shadow {
                Some(s) if s.dims() != it.param.dims() => return Ok(None),
                Some(s) => match address_of(s, DType::BF16) {
                    Some((_, s)) => s,
                    None => return Ok(None),
                },
                None => 0,
            };
            let anchor = match it.anchor {
                Some(a) => match address(a) {
                    Some((_, a)) => a,
                    None => return Ok(None),
                },
                None => 0,
            };
            match &dev {
                None => dev = Some(d),
                Some(d0) if d0.same_device(&d) => {}
                Some(_) => return Ok(None),
            }
            // The in-place operands (the parameter, its state, its copy)
            // own their memory.
            let own: Vec<usize> = [Some(it.param), Some(it.state), it.shadow]
                .into_iter()
                .flatten()
                .map(storage_addr)
                .collect();
            let others = [Some(it.grad), it.anchor]
                .into_iter()
                .flatten()
                .map(storage_addr)
                .collect::<Vec<_>>();
            let shared = own.iter().enumerate().any(|(i, a)| own[..i].contains(a));
            if shared || own.iter().any(|a| others.contains(a)) {
                return Ok(None);
            }
            grads.grad[tensors.len()] = g;
            tensors.push(MtTensor {
                p,
                mv,
                anchor,
                shadow,
                n: n as i64,
                group: 0,
                decay: st.decay.is_some() as i32,
                g_bf16: g_bf16 as i32,
                pad: 0,
            });
        }
        let dev = dev.expect("at least one item");
        let steps: Vec<AdamWStep> = items.iter().map(|it| it.step).collect();
        let Some((sc, groups)) = scalars_of(&steps, cache) else {
            return Ok(None);
        };
        for (t, &g) in tensors.iter_mut().zip(&groups) {
            t.group = g as i32;
        }
        let sc_ptr = cache.scalars(&dev, &sc)?;
        let Some(table) = cache.get(&dev, &tensors)? else {
            // Only empty tensors: a zero norm, nothing to update.
            let zero = Tensor::zeros((), DType::F64, &candle_core::Device::Cuda(dev))?;
            return Ok(Some(zero));
        };
        let stream = dev.cuda_stream();
        let out = k::alloc::<f64>(&dev, 2)?;
        let partial = k::alloc::<f64>(&dev, table.chunks as usize)?;
        let (base, _g1) = table.buf.device_ptr(&stream);
        let (ts, cs) = (base, base + table.chunks_at);
        let (partial_ptr, _g2) = partial.device_ptr(&stream);
        let (out_ptr, _g3) = out.device_ptr(&stream);
        let chunk = CHUNK as i64;
        let nchunks = table.chunks;

        let f = k::func(&dev, MODULE, ptx::ADAMW, "sumsq_multi_f32")?;
        let mut b = f.builder();
        b.arg(&ts)
            .arg(&cs)
            .arg(&chunk)
            .arg(&partial_ptr)
            .arg(&grads);
        k::launch(&mut b, nchunks, BLOCK)?;

        let f = k::func(&dev, MODULE, ptx::ADAMW, "norm_scale_f64")?;
        let nparts = nchunks as i32;
        let mut b = f.builder();
        b.arg(&partial_ptr)
            .arg(&nparts)
            .arg(&max_norm)
            .arg(&out_ptr);
        k::launch(&mut b, 1, BLOCK)?;

        // The factor is out[1]; without clipping no scale is passed (the
        // per-tensor path's `scale: None`).
        let scale_ptr: u64 = if max_norm > 0.0 { out_ptr + 8 } else { 0 };
        let c = |x: f64| x as f32;
        let (b1, ob1, b2, ob2) = (
            c(s0.beta1),
            c(1.0 - s0.beta1),
            c(s0.beta2),
            c(1.0 - s0.beta2),
        );
        let eps = c(s0.eps);
        let f = k::func(&dev, MODULE, ptx::ADAMW, "adamw_multi_f32")?;
        let mut b = f.builder();
        b.arg(&ts).arg(&cs).arg(&chunk).arg(&scale_ptr);
        for x in [&b1, &ob1, &b2, &ob2, &eps] {
            b.arg(x);
        }
        b.arg(&sc_ptr).arg(&grads);
        k::launch(&mut b, nchunks, BLOCK)?;
        drop((_g1, _g2, _g3));

        let out = Tensor::from_storage(
            Storage::Cuda(CudaStorage::wrap_cuda_slice(out, dev)),
            2,
            BackpropOp::none(),
            false,
        );
        Ok(Some(out.get(0)?))
    }

    /// The tensors' table and its chunks on the device, in one upload.
    struct Table {
        /// Shared with the CUDA graphs captured while it was current
        /// ([`TableCache::pin`]), whose launches hold its address.
        buf: std::sync::Arc<candle_core::cuda_backend::cudarc::driver::CudaSlice<u8>>,
        /// Byte offset of the chunks.
        chunks_at: u64,
        chunks: u32,
    }

    impl Table {
        /// The table's bytes (tensors, then chunks), the chunks' offset and
        /// count; `None` when no tensor has an element (nothing to launch).
        fn layout(tensors: &[MtTensor]) -> Option<(Vec<u8>, u64, u32)> {
            let mut chunks = Vec::new();
            for (i, t) in tensors.iter().enumerate() {
                for start in (0..t.n as usize).step_by(CHUNK) {
                    chunks.push(MtChunk {
                        tensor: i as i32,
                        pad: 0,
                        start: start as i64,
                    });
                }
            }
            if chunks.is_empty() {
                return None;
            }
            let mut bytes_ = bytes(tensors).to_vec();
            bytes_.extend_from_slice(bytes(&chunks));
            Some((
                bytes_,
                std::mem::size_of_val(tensors) as u64,
                chunks.len() as u32,
            ))
        }

        /// `None` when no tensor has an element (nothing to launch).
        fn upload(dev: &CudaDevice, tensors: &[MtTensor]) -> Result<Option<Self>> {
            let Some((bytes_, chunks_at, chunks)) = Self::layout(tensors) else {
                return Ok(None);
            };
            Ok(Some(Self::from_bytes(dev, &bytes_, chunks_at, chunks)?))
        }

        fn from_bytes(dev: &CudaDevice, b: &[u8], chunks_at: u64, chunks: u32) -> Result<Self> {
            let buf = dev
                .cuda_stream()
                .clone_htod(b)
                .map_err(candle_core::Error::wrap)?;
            Ok(Self {
                buf: std::sync::Arc::new(buf),
                chunks_at,
                chunks,
            })
        }
    }

    /// A table kept alive by [`TableCache::pin`].
    pub struct TablePin(
        #[allow(dead_code)]
        std::sync::Arc<candle_core::cuda_backend::cudarc::driver::CudaSlice<u8>>,
    );

    /// The last multi-tensor table uploaded, with its bytes and device (an
    /// optimiser keeps one across steps; see [`clip_and_step`]). A table is
    /// reused only when its bytes are equal, which covers every address and
    /// size it holds, so a stale one is never read.
    #[derive(Default)]
    pub struct TableCache {
        last: Option<(CudaDevice, Vec<u8>, Table)>,
        uploads: u64,
        /// The device buffer of the step's scalars (an `MtScalars`), with
        /// the bytes last written into it.
        scalars: Option<(
            CudaDevice,
            candle_core::cuda_backend::cudarc::driver::CudaSlice<u8>,
            Vec<u8>,
        )>,
        /// The group of each tensor in the last table (see
        /// [`TableCache::grouping`]).
        groups: Option<Vec<usize>>,
    }

    impl TableCache {
        /// The device table of `tensors`, uploaded unless the last one
        /// holds the same bytes on the same device; `None` when no tensor
        /// has an element.
        fn get(&mut self, dev: &CudaDevice, tensors: &[MtTensor]) -> Result<Option<&Table>> {
            let Some((bytes_, chunks_at, chunks)) = Table::layout(tensors) else {
                return Ok(None);
            };
            let hit = matches!(&self.last, Some((d, b, _)) if d.same_device(dev) && *b == bytes_);
            if !hit {
                let table = Table::from_bytes(dev, &bytes_, chunks_at, chunks)?;
                self.last = Some((dev.clone(), bytes_, table));
                self.uploads += 1;
            }
            Ok(self.last.as_ref().map(|(_, _, t)| t))
        }

        /// The scalar group of each tensor, given each tensor's scalars:
        /// the last grouping while it still holds (tensors that shared a
        /// group still have equal scalars), else one group per distinct set
        /// in order of first use; `None` for more than `GROUPS` sets. Groups
        /// whose values happen to coincide at some step (a learning rate
        /// decayed to zero) stay apart, so the table, which names each
        /// tensor's group, stays the one uploaded, as a captured CUDA graph
        /// needs.
        fn grouping(&mut self, per: &[MtGroup]) -> Option<Vec<usize>> {
            if let Some(g) = &self.groups {
                let mut value: Vec<Option<MtGroup>> = vec![None; GROUPS];
                let holds = g.len() == per.len()
                    && g.iter()
                        .zip(per)
                        .all(|(&k, s)| *value[k].get_or_insert(*s) == *s);
                if holds {
                    return Some(g.clone());
                }
            }
            let mut values: Vec<MtGroup> = Vec::new();
            let mut g = Vec::with_capacity(per.len());
            for s in per {
                match values.iter().position(|q| q == s) {
                    Some(k) => g.push(k),
                    None if values.len() < GROUPS => {
                        values.push(*s);
                        g.push(values.len() - 1);
                    }
                    None => return None,
                }
            }
            self.groups = Some(g.clone());
            Some(g)
        }

        /// Writes a step's scalars (the used prefix of an `MtScalars`) into
        /// the device buffer kept for them and returns its address: one
        /// small host-to-device copy per step, in stream order after the
        /// previous step's launch that read them, and none when the buffer
        /// already holds these bytes (staged by [`stage_scalars`]). The
        /// launch then passes the same address every step.
        fn scalars(&mut self, dev: &CudaDevice, b: &[u8]) -> Result<u64> {
            if !matches!(&self.scalars, Some((d, _, _)) if d.same_device(dev)) {
                let buf = dev.alloc_zeros::<u8>(std::mem::size_of::<MtScalars>())?;
                self.scalars = Some((dev.clone(), buf, Vec::new()));
            }
            let (_, buf, held) = self.scalars.as_mut().expect("set above");
            let stream = dev.cuda_stream();
            if held.as_slice() != b {
                stream
                    .memcpy_htod(b, &mut buf.slice_mut(..b.len()))
                    .map_err(candle_core::Error::wrap)?;
                *held = b.to_vec();
            }
            let (ptr, _g) = buf.device_ptr(&stream);
            Ok(ptr)
        }

        /// Tables uploaded so far (one for a run whose parameters, moments
        /// and copies stay where they are).
        pub fn uploads(&self) -> u64 {
            self.uploads
        }

        /// Keeps the current table alive for as long as the returned pin:
        /// a CUDA graph captured from a step holds the table's address in
        /// its launches, and a later step that uploads another table (one
        /// whose gradients come in another dtype) would otherwise free it.
        pub fn pin(&self) -> Option<TablePin> {
            self.last.as_ref().map(|(_, _, t)| TablePin(t.buf.clone()))
        }
    }

    /// `copy ← bf16(master)` for every `(master, copy)` pair in one launch
    /// (and one upload). `Ok(false)`, with nothing done, when the form does
    /// not apply (a master not a contiguous f32 CUDA tensor, a copy not a
    /// contiguous bf16 one of its shape, not one device, no pairs).
    pub fn cast_multi(pairs: &[(&Tensor, &Tensor)]) -> Result<bool> {
        let mut dev: Option<CudaDevice> = None;
        let mut tensors = Vec::with_capacity(pairs.len());
        for (master, copy) in pairs {
            if master.dims() != copy.dims() {
                return Ok(false);
            }
            let (Some((d, p)), Some((d2, shadow))) =
                (address(master), address_of(copy, DType::BF16))
            else {
                return Ok(false);
            };
            if !d.same_device(&d2) || dev.as_ref().is_some_and(|d0| !d0.same_device(&d)) {
                return Ok(false);
            }
            dev.get_or_insert(d);
            tensors.push(MtTensor {
                p,
                shadow,
                n: master.elem_count() as i64,
                ..Default::default()
            });
        }
        let Some(dev) = dev else { return Ok(false) };
        let Some(table) = Table::upload(&dev, &tensors)? else {
            return Ok(true);
        };
        let stream = dev.cuda_stream();
        let (base, _g) = table.buf.device_ptr(&stream);
        let (ts, cs) = (base, base + table.chunks_at);
        let chunk = CHUNK as i64;
        let f = k::func(&dev, MODULE, ptx::ADAMW, "cast_multi_f32_bf16")?;
        let mut b = f.builder();
        b.arg(&ts).arg(&cs).arg(&chunk);
        k::launch(&mut b, table.chunks, BLOCK)?;
        Ok(true)
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        fn g(lr: f32) -> MtGroup {
            MtGroup {
                lr,
                lam: 1.0,
                pull: 0.0,
                dlr: 0.0,
            }
        }

        /// Groups by value at first; then the grouping stays while it holds,
        /// also when two groups' values coincide (a rate decayed to zero),
        /// and is rebuilt when a group's tensors come apart.
        #[test]
        fn the_grouping_stays_while_it_holds() {
            let mut c = TableCache::default();
            assert_eq!(c.grouping(&[g(1.0), g(2.0), g(1.0)]), Some(vec![0, 1, 0]));
            assert_eq!(c.grouping(&[g(0.5), g(0.7), g(0.5)]), Some(vec![0, 1, 0]));
            assert_eq!(c.grouping(&[g(0.0), g(0.0), g(0.0)]), Some(vec![0, 1, 0]));
            // Tensors 0 and 2 differ now: by value again.
            assert_eq!(c.grouping(&[g(1.0), g(1.0), g(3.0)]), Some(vec![0, 0, 1]));
            // Another number of tensors: by value.
            assert_eq!(c.grouping(&[g(1.0)]), Some(vec![0]));
            let many: Vec<MtGroup> = (0..=GROUPS).map(|i| g(i as f32)).collect();
            assert_eq!(c.grouping(&many), None);
        }
    }
}
