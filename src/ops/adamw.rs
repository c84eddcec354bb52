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

/// The constants of one step for one tensor (f64; rounded to the
/// parameter's dtype by the op).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamWStep {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    /// Bias corrections `1 − β₁ᵗ` and `1 − β₂ᵗ` of step t (1-based).
    pub c1: f64,
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

/// The address of a tensor's storage (equal for views of one allocation).
fn storage_addr(t: &Tensor) -> usize {
    let (s, _) = t.storage_and_layout();
    &*s as *const candle_core::Storage as usize
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
