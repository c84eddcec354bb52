//! Bottleneck adapter (Houlsby / Pfeiffer) and LoRA delta:
//! `y = residual + s·(act(x·W_dᵀ + b_d)·W_uᵀ + b_u)`, x `[.., m]` flattened
//! to T rows, W_d `[r, m]`, b_d `[r]`, W_u `[n, r]`, b_u `[n]`; the residual
//! is x itself (adapters, n = m) or a given `[.., n]` tensor (a LoRA delta
//! added to a base layer's output, with act = identity and no biases).
//!
//! Backward (for an incoming dy): du = s·dy; dW_u = duᵀ·z, db_u = Σ_t du;
//! dz = du·W_u; dh = dz ⊙ act'(h); dW_d = dhᵀ·x, db_d = Σ_t dh;
//! dx = dh·W_d (+ dy when the residual is x); d residual = dy.
//!
//! The CPU custom op is the reference that defines these semantics (f64
//! accumulation). On CUDA the fused kernels of `kernels/adapter.cu` run it
//! (tensor cores for bf16/f16, f32 on CUDA cores; the file's header has the
//! design): the forward reads x once (plus once more from L2 for the
//! residual) and keeps the T×r hidden tile on chip; it saves the
//! pre-activation h (T×r f32, small) for the backward rather than
//! recomputing it, which would read all of x again. Without an incoming
//! tensor that needs it nothing is saved: candle drops the op with the graph.
//! With an explicit residual the op takes it as a third input, so the LoRA
//! sum is fused too.
use std::borrow::Cow;
use std::sync::Mutex;

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Shape, Tensor};

use super::cpu::{from_f64, to_f32, to_f64};
use crate::error::{check_float_dtype, param_err, shape_err, Error, Result};

/// The activation of the bottleneck.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Act {
    /// The exact (erf) GELU.
    GeluErf,
    /// The tanh approximation of GELU.
    GeluTanh,
    /// max(0, x).
    Relu,
    /// x·σ(x).
    Silu,
    /// No activation (LoRA).
    Identity,
}

impl Act {
    /// The activation on a tensor, composed from candle's ops (the fused
    /// form is [`activation`]). Under autograd both GELUs are composed from
    /// erf / tanh, whose backward passes are exact, because candle's fused
    /// `gelu_erf` and `gelu` backward passes use 6-digit constants (0.398942
    /// for 1/√(2π), 0.797885 for √(2/π)): a relative gradient error near
    /// 1e-6, which the adapter golden test against PyTorch exposed.
    pub fn apply(self, x: &Tensor) -> Result<Tensor> {
        Ok(match self {
            Act::GeluErf if x.track_op() => {
                ((x * 0.5)? * ((x / std::f64::consts::SQRT_2)?.erf()? + 1.0)?)?
            }
            Act::GeluTanh if x.track_op() => {
                ((x * 0.5)? * (((x + (x.powf(3.0)? * 0.044715)?)? * K_TANH)?.tanh()? + 1.0)?)?
            }
            Act::GeluErf => x.gelu_erf()?,
            Act::GeluTanh => x.gelu()?,
            Act::Relu => x.relu()?,
            Act::Silu => x.silu()?,
            Act::Identity => x.clone(),
        })
    }

    fn f(self, h: f64) -> f64 {
        match self {
            Act::GeluErf => 0.5 * h * (1.0 + erf(h / std::f64::consts::SQRT_2)),
            Act::GeluTanh => 0.5 * h * (1.0 + (K_TANH * (h + 0.044715 * h * h * h)).tanh()),
            Act::Relu => h.max(0.0),
            Act::Silu => h / (1.0 + (-h).exp()),
            Act::Identity => h,
        }
    }

    fn df(self, h: f64) -> f64 {
        match self {
            Act::GeluErf => {
                0.5 * (1.0 + erf(h / std::f64::consts::SQRT_2))
                    + h * (-0.5 * h * h).exp() / (2.0 * std::f64::consts::PI).sqrt()
            }
            Act::GeluTanh => {
                let t = (K_TANH * (h + 0.044715 * h * h * h)).tanh();
                0.5 * (1.0 + t) + 0.5 * h * (1.0 - t * t) * K_TANH * (1.0 + 3.0 * 0.044715 * h * h)
            }
            Act::Relu => {
                if h > 0.0 {
                    1.0
                } else {
                    0.0
                }
            }
            Act::Silu => {
                let sg = 1.0 / (1.0 + (-h).exp());
                sg * (1.0 + h * (1.0 - sg))
            }
            Act::Identity => 1.0,
        }
    }
}

/// √(2/π).
const K_TANH: f64 = 0.797_884_560_802_865_4;

impl Act {
    /// [`Act::f`] in f32, as `act_f` of kernels/adapter.cu computes it.
    fn f32(self, h: f32) -> f32 {
        use candle_core::cpu::erf::erf_f32;
        match self {
            Act::GeluErf => 0.5 * h * (1.0 + erf_f32(h * std::f32::consts::FRAC_1_SQRT_2)),
            Act::GeluTanh => 0.5 * h * (1.0 + (K_TANH as f32 * (h + 0.044715 * h * h * h)).tanh()),
            Act::Relu => h.max(0.0),
            Act::Silu => h / (1.0 + (-h).exp()),
            Act::Identity => h,
        }
    }

    /// [`Act::df`] in f32, as `act_df` of kernels/adapter.cu computes it.
    fn df32(self, h: f32) -> f32 {
        use candle_core::cpu::erf::erf_f32;
        match self {
            Act::GeluErf => {
                0.5 * (1.0 + erf_f32(h * std::f32::consts::FRAC_1_SQRT_2))
                    + h * (-0.5 * h * h).exp() * 0.398_942_3
            }
            Act::GeluTanh => {
                let t = (K_TANH as f32 * (h + 0.044715 * h * h * h)).tanh();
                0.5 * (1.0 + t) + 0.5 * h * (1.0 - t * t) * K_TANH as f32 * (1.0 + 0.134145 * h * h)
            }
            Act::Relu => {
                if h > 0.0 {
                    1.0
                } else {
                    0.0
                }
            }
            Act::Silu => {
                let sg = 1.0 / (1.0 + (-h).exp());
                sg * (1.0 + h * (1.0 - sg))
            }
            Act::Identity => 1.0,
        }
    }
}

/// `act(x)` elementwise, with a backward of its own: `dx = g·act'(x)`.
///
/// Semantics (the CPU op): each element in W (f64 for f64 tensors, f32
/// otherwise), `f` and `f'` as written in [`Act`]'s formulas, rounded once
/// to x's dtype; the gradient `g·f'(x)` likewise. In f32 the formulas and
/// constants are the CUDA kernels' (`act_fwd_*`, `act_bwd_*` of
/// kernels/adapter.cu, the adapter's own activation code: one kernel each
/// way), which differ from the CPU only in the erff / tanhf / expf
/// implementations. The
/// composition from candle's ops costs five kernels forward and about a
/// dozen backward for GELU, which the BERT encoder runs in every layer.
pub fn activation(x: &Tensor, act: Act) -> Result<Tensor> {
    check_float_dtype("activation", "x", x.dtype())?;
    if act == Act::Identity {
        return Ok(x.clone());
    }
    let x = x.contiguous()?;
    Ok(x.apply_op1(ActOp(act))?)
}

/// The forward of [`activation`].
struct ActOp(Act);
/// Its backward: `(x, g) ↦ g·act'(x)`.
struct ActGrad(Act);

impl candle_core::CustomOp1 for ActOp {
    fn name(&self) -> &'static str {
        "tunefuse-act"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        use rayon::prelude::*;
        let a = self.0;
        let y: Vec<f64> = match s {
            CpuStorage::F64(_) => to_f64(s, l)?.par_iter().map(|&h| a.f(h)).collect(),
            _ => to_f32(s, l)?.par_iter().map(|&h| a.f32(h) as f64).collect(),
        };
        Ok((from_f64(y, s.dtype()), l.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        Ok((cuda::act(self.0, (s, l), None)?, l.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, g: &Tensor) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(
            x.apply_op2_no_bwd(&g.contiguous()?, &ActGrad(self.0))?,
        ))
    }
}

impl CustomOp2 for ActGrad {
    fn name(&self) -> &'static str {
        "tunefuse-act-grad"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        use rayon::prelude::*;
        let a = self.0;
        let dx: Vec<f64> = match xs {
            CpuStorage::F64(_) => {
                let (x, g) = (to_f64(xs, xl)?, to_f64(gs, gl)?);
                x.par_iter().zip(&g).map(|(&h, &gi)| gi * a.df(h)).collect()
            }
            _ => {
                let (x, g) = (to_f32(xs, xl)?, to_f32(gs, gl)?);
                x.par_iter()
                    .zip(&g)
                    .map(|(&h, &gi)| (gi * a.df32(h)) as f64)
                    .collect()
            }
        };
        Ok((from_f64(dx, xs.dtype()), xl.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        xs: &candle_core::CudaStorage,
        xl: &Layout,
        gs: &candle_core::CudaStorage,
        gl: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        Ok((
            cuda::act(self.0, (xs, xl), Some((gs, gl)))?,
            xl.shape().clone(),
        ))
    }
}

/// erf in f64 (candle's implementation, the one its erf op uses).
fn erf(x: f64) -> f64 {
    candle_core::cpu::erf::erf_f64(x)
}

/// The parameters of one adapter call.
#[derive(Clone, Debug)]
pub struct AdapterWeights {
    /// `[r, m]` for x `[.., m]`.
    pub w_down: Tensor,
    /// `[r]`, or none (LoRA).
    pub b_down: Option<Tensor>,
    /// `[n, r]`: n = m for adapters (the residual is x); a LoRA delta may
    /// map m to another width n (its residual is the base layer's output).
    pub w_up: Tensor,
    /// `[n]`, or none (LoRA).
    pub b_up: Option<Tensor>,
    /// The bottleneck's activation.
    pub act: Act,
    /// The scale s of the up-projection's output.
    pub scale: f64,
}

/// Widths of one call: x `[T, m]`, bottleneck r, output `[T, n]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Dims {
    m: usize,
    n: usize,
    r: usize,
    /// Whether the packed weights carry the biases b_d and b_u. LoRA has
    /// neither, and packing two zero vectors per call would cost two fills
    /// and two copies for nothing; a lone absent bias is packed as zeros.
    bias: bool,
}

impl Dims {
    /// Elements of the packed weights.
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    fn packed_len(self) -> usize {
        self.r * self.m + self.n * self.r + if self.bias { self.r + self.n } else { 0 }
    }
}

impl AdapterWeights {
    /// The widths after checking every shape and dtype against `x`.
    fn check(&self, x: &Tensor, residual: Option<&Tensor>) -> Result<Dims> {
        let op = "adapter";
        check_float_dtype(op, "x", x.dtype())?;
        let m = *x
            .dims()
            .last()
            .ok_or_else(|| shape_err(op, "x is a scalar; expected [.., d]"))?;
        let (r, m_w) = self.w_down.dims2().map_err(|_| {
            shape_err(
                op,
                format!("w_down must be [r, d], got {:?}", self.w_down.dims()),
            )
        })?;
        if r == 0 {
            return Err(param_err(op, "bottleneck r = 0"));
        }
        if m == 0 {
            return Err(shape_err(op, "x has d = 0 features"));
        }
        let n = match self.w_up.dims2() {
            Ok((n, r_u)) if r_u == r && m_w == m && n > 0 => n,
            _ => {
                return Err(shape_err(
                    op,
                    format!(
                        "x has d = {m}; w_down {:?} and w_up {:?} need [r, {m}] and [n, r]",
                        self.w_down.dims(),
                        self.w_up.dims()
                    ),
                ))
            }
        };
        if residual.is_none() && n != m {
            return Err(shape_err(
                op,
                format!(
                    "w_up {:?} maps to width {n} but the residual is x (d = {m}); \
                     pass an explicit residual of width {n}",
                    self.w_up.dims()
                ),
            ));
        }
        for (name, b, len) in [("b_down", &self.b_down, r), ("b_up", &self.b_up, n)] {
            if let Some(b) = b {
                if b.dims() != [len] {
                    return Err(shape_err(
                        op,
                        format!("{name} must be [{len}], got {:?}", b.dims()),
                    ));
                }
            }
        }
        let all = [
            Some(&self.w_down),
            Some(&self.w_up),
            self.b_down.as_ref(),
            self.b_up.as_ref(),
            residual,
        ];
        for t in all.into_iter().flatten() {
            if t.dtype() != x.dtype() {
                return Err(Error::DType {
                    op,
                    msg: format!(
                        "x is {:?} but a weight or the residual is {:?}",
                        x.dtype(),
                        t.dtype()
                    ),
                });
            }
            if !t.device().same_device(x.device()) {
                return Err(param_err(
                    op,
                    format!(
                        "x is on {:?} but a weight or the residual is on {:?}",
                        x.device().location(),
                        t.device().location()
                    ),
                ));
            }
        }
        if let Some(res) = residual {
            let mut want = x.dims().to_vec();
            *want.last_mut().unwrap() = n;
            if res.dims() != want {
                return Err(shape_err(
                    op,
                    format!("residual {:?} must be {want:?}", res.dims()),
                ));
            }
        }
        if !self.scale.is_finite() {
            return Err(param_err(
                op,
                format!("scale must be finite, got {}", self.scale),
            ));
        }
        Ok(Dims {
            m,
            n,
            r,
            bias: self.b_down.is_some() || self.b_up.is_some(),
        })
    }

    /// All parameters in one flat tensor: W_d, b_d, W_u, b_u (W_d, W_u
    /// when neither bias exists; zeros for one absent bias), so the op has
    /// two inputs and autograd reaches each weight through the concatenation.
    fn packed(&self, dims: Dims) -> Result<Tensor> {
        if !dims.bias {
            return Ok(Tensor::cat(
                &[self.w_down.flatten_all()?, self.w_up.flatten_all()?],
                0,
            )?);
        }
        let zeros = |n: usize| Tensor::zeros(n, self.w_down.dtype(), self.w_down.device());
        let bd = match &self.b_down {
            Some(b) => b.clone(),
            None => zeros(dims.r)?,
        };
        let bu = match &self.b_up {
            Some(b) => b.clone(),
            None => zeros(dims.n)?,
        };
        Ok(Tensor::cat(
            &[self.w_down.flatten_all()?, bd, self.w_up.flatten_all()?, bu],
            0,
        )?)
    }
}

/// Largest bottleneck the CUDA kernels take; wider ones run
/// [`adapter_composed`] on CUDA.
pub const MAX_CUDA_R: usize = 256;

/// The adapter as one custom op: `residual + s·(act(x·W_dᵀ + b_d)·W_uᵀ +
/// b_u)` with residual = x when `residual` is `None`, differentiable in x,
/// the residual and every weight. On the CPU this is the f64 reference
/// (exact, slow: naive loops); on CUDA (f32, bf16, f16; r ≤ [`MAX_CUDA_R`])
/// the fused kernels of `kernels/adapter.cu`. [`adapter_fast`] picks the
/// fastest path per device.
pub fn adapter(x: &Tensor, w: &AdapterWeights, residual: Option<&Tensor>) -> Result<Tensor> {
    let dims = w.check(x, residual)?;
    let fused = x.device().is_cpu() || (x.device().is_cuda() && dims.r <= MAX_CUDA_R);
    if !fused {
        return adapter_composed(x, w, residual);
    }
    let op = AdapterOp {
        cfg: Cfg {
            dims,
            act: w.act,
            scale: w.scale,
            residual_is_x: residual.is_none(),
        },
        hidden: Mutex::new(None),
    };
    let x = x.contiguous()?;
    let packed = w.packed(dims)?;
    Ok(match residual {
        None => x.apply_op2(&packed, op)?,
        Some(res) => x.apply_op3(&packed, &res.contiguous()?, op)?,
    })
}

/// What the model's modules use: the fused op on CUDA, the composition of
/// candle ops (its matrix products are multithreaded gemm) elsewhere.
pub fn adapter_fast(x: &Tensor, w: &AdapterWeights, residual: Option<&Tensor>) -> Result<Tensor> {
    if x.device().is_cuda() {
        adapter(x, w, residual)
    } else {
        adapter_composed(x, w, residual)
    }
}

/// The same math from candle ops (the baseline of the benchmarks, the CPU
/// path of the model, and the path for r > [`MAX_CUDA_R`] on CUDA).
pub fn adapter_composed(
    x: &Tensor,
    w: &AdapterWeights,
    residual: Option<&Tensor>,
) -> Result<Tensor> {
    w.check(x, residual)?;
    let lin = |x: &Tensor, wt: &Tensor, b: &Option<Tensor>| -> Result<Tensor> {
        let y = x.broadcast_matmul(&wt.t()?)?;
        Ok(match b {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        })
    };
    let h = lin(x, &w.w_down, &w.b_down)?;
    let z = w.act.apply(&h)?;
    let u = (lin(&z, &w.w_up, &w.b_up)? * w.scale)?;
    Ok((u + residual.unwrap_or(x))?)
}

/// What the forward and gradient ops share: widths, activation, scale and
/// where the residual comes from.
#[derive(Clone, Copy, Debug)]
struct Cfg {
    dims: Dims,
    act: Act,
    scale: f64,
    /// Whether the residual is x itself (two-input op) or a third input.
    residual_is_x: bool,
}

/// The op: inputs x and the packed weights, plus the residual as a third
/// input when it is not x (LoRA).
struct AdapterOp {
    cfg: Cfg,
    /// The pre-activations h `[T, RP]` (f32) the CUDA forward saves for the
    /// backward of this graph node.
    hidden: Mutex<Option<Tensor>>,
}

/// W_d, b_d, W_u and b_u of packed weights (the reference's view).
type Unpacked<'a> = (&'a [f64], Cow<'a, [f64]>, &'a [f64], Cow<'a, [f64]>);

impl Cfg {
    /// W_d, b_d, W_u, b_u of the packed weights; without biases b_d and b_u
    /// are zeros.
    fn unpack<'a>(&self, p: &'a [f64]) -> Unpacked<'a> {
        let Dims { m, n, r, .. } = self.dims;
        let (wd, bd, wu, bu) = self.offsets();
        let bias = |off: Option<usize>, len: usize| match off {
            Some(o) => Cow::Borrowed(&p[o..o + len]),
            None => Cow::Owned(vec![0.0; len]),
        };
        (
            &p[wd..wd + r * m],
            bias(bd, r),
            &p[wu..wu + n * r],
            bias(bu, n),
        )
    }

    /// Offsets of W_d, b_d, W_u and b_u in the packed weights (b_d's and
    /// b_u's are None without biases).
    fn offsets(&self) -> (usize, Option<usize>, usize, Option<usize>) {
        let Dims { m, n, r, bias } = self.dims;
        if bias {
            (0, Some(r * m), r * m + r, Some(r * m + r + n * r))
        } else {
            (0, None, r * m, None)
        }
    }

    /// Pre-activations h `[T, r]` of the reference.
    fn hidden_ref(&self, x: &[f64], wd: &[f64], bd: &[f64]) -> Vec<f64> {
        let Dims { m, r, .. } = self.dims;
        let t = x.len() / m;
        let mut h = vec![0.0; t * r];
        for i in 0..t {
            for k in 0..r {
                h[i * r + k] = bd[k] + (0..m).map(|j| x[i * m + j] * wd[k * m + j]).sum::<f64>();
            }
        }
        h
    }

    /// The reference forward: `base + s·(act(h)·W_uᵀ + b_u)`, base `[T, n]`.
    fn cpu_forward(&self, x: &[f64], p: &[f64], base: &[f64]) -> Vec<f64> {
        let (wd, bd, wu, bu) = self.unpack(p);
        let Dims { m, n, r, .. } = self.dims;
        let h = self.hidden_ref(x, wd, &bd);
        let t = x.len() / m;
        let mut y = vec![0.0; t * n];
        for i in 0..t {
            for j in 0..n {
                let u = bu[j]
                    + (0..r)
                        .map(|k| self.act.f(h[i * r + k]) * wu[j * r + k])
                        .sum::<f64>();
                y[i * n + j] = base[i * n + j] + self.scale * u;
            }
        }
        y
    }

    /// The output shape: x's with the last dimension n.
    fn out_shape(&self, l: &Layout) -> Shape {
        let mut dims = l.dims().to_vec();
        *dims.last_mut().unwrap() = self.dims.n;
        Shape::from(dims)
    }
}

impl AdapterOp {
    fn grad_op(&self) -> AdapterGradOp {
        AdapterGradOp {
            cfg: self.cfg,
            hidden: self
                .hidden
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone(),
        }
    }

    /// (dx, d packed) for the incoming gradient `dy`.
    fn grads(
        &self,
        x: &Tensor,
        packed: &Tensor,
        dy: &Tensor,
    ) -> candle_core::Result<(Tensor, Tensor)> {
        let g = x.apply_op3_no_bwd(packed, &dy.contiguous()?, &self.grad_op())?;
        let len = x.elem_count();
        Ok((
            g.narrow(0, 0, len)?.reshape(x.shape())?,
            g.narrow(0, len, packed.elem_count())?,
        ))
    }

    /// The fused forward; saves h for this node's backward.
    #[cfg(feature = "cuda")]
    fn cuda_forward(
        &self,
        x: (&candle_core::CudaStorage, &Layout),
        p: (&candle_core::CudaStorage, &Layout),
        res: (&candle_core::CudaStorage, &Layout),
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let (y, h) = cuda::forward(&self.cfg, x, p, res)?;
        *self.hidden.lock().unwrap_or_else(|e| e.into_inner()) = Some(h);
        Ok((y, self.cfg.out_shape(x.1)))
    }
}

impl CustomOp2 for AdapterOp {
    fn name(&self) -> &'static str {
        "tunefuse-adapter"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (x, p) = (to_f64(s1, l1)?, to_f64(s2, l2)?);
        let y = self.cfg.cpu_forward(&x, &p, &x);
        Ok((from_f64(y, s1.dtype()), self.cfg.out_shape(l1)))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        self.cuda_forward((s1, l1), (s2, l2), (s1, l1))
    }

    fn bwd(
        &self,
        x: &Tensor,
        packed: &Tensor,
        _res: &Tensor,
        dy: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let (dx, dp) = self.grads(x, packed, dy)?;
        Ok((Some(dx), Some(dp)))
    }
}

impl CustomOp3 for AdapterOp {
    fn name(&self) -> &'static str {
        "tunefuse-adapter-residual"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (x, p, res) = (to_f64(s1, l1)?, to_f64(s2, l2)?, to_f64(s3, l3)?);
        let y = self.cfg.cpu_forward(&x, &p, &res);
        Ok((from_f64(y, s1.dtype()), self.cfg.out_shape(l1)))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        self.cuda_forward((s1, l1), (s2, l2), (s3, l3))
    }

    fn bwd(
        &self,
        x: &Tensor,
        packed: &Tensor,
        _residual: &Tensor,
        _res: &Tensor,
        dy: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (dx, dp) = self.grads(x, packed, dy)?;
        Ok((Some(dx), Some(dp), Some(dy.clone())))
    }
}

/// Gradients `[dx (T·m), d packed]` in one flat tensor, for an incoming
/// gradient dy `[T, n]` (the third input).
struct AdapterGradOp {
    cfg: Cfg,
    /// h saved by the CUDA forward of the same graph node.
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    hidden: Option<Tensor>,
}

impl CustomOp3 for AdapterGradOp {
    fn name(&self) -> &'static str {
        "tunefuse-adapter-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let o = &self.cfg;
        let (x, p, dy) = (to_f64(s1, l1)?, to_f64(s2, l2)?, to_f64(s3, l3)?);
        let (wd, bd, wu, _) = o.unpack(&p);
        let Dims { m, n, r, .. } = o.dims;
        let t = x.len() / m;
        let h = o.hidden_ref(&x, wd, &bd);
        let (mut dx, mut dp) = (vec![0.0; x.len()], vec![0.0; p.len()]);
        let (dwd_off, dbd_off, dwu_off, dbu_off) = o.offsets();
        for i in 0..t {
            // du = s·dy; dW_u += duᵀ z; db_u += du; dz = du·W_u; dh = dz ⊙ act'(h).
            let du: Vec<f64> = (0..n).map(|j| o.scale * dy[i * n + j]).collect();
            let mut dh = vec![0.0; r];
            for k in 0..r {
                let z = o.act.f(h[i * r + k]);
                let mut dz = 0.0;
                for j in 0..n {
                    dp[dwu_off + j * r + k] += du[j] * z;
                    dz += du[j] * wu[j * r + k];
                }
                dh[k] = dz * o.act.df(h[i * r + k]);
                if let Some(off) = dbd_off {
                    dp[off + k] += dh[k];
                }
            }
            if let Some(off) = dbu_off {
                for (j, du) in du.iter().enumerate() {
                    dp[off + j] += du;
                }
            }
            for j in 0..m {
                // The residual x adds dy (then n = m).
                let mut v = if o.residual_is_x { dy[i * n + j] } else { 0.0 };
                for k in 0..r {
                    dp[dwd_off + k * m + j] += dh[k] * x[i * m + j];
                    v += dh[k] * wd[k * m + j];
                }
                dx[i * m + j] = v;
            }
        }
        dx.extend(dp);
        let len = dx.len();
        Ok((from_f64(dx, s1.dtype()), Shape::from(len)))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let out = cuda::backward(self, (s1, l1), (s2, l2), (s3, l3))?;
        let len = l1.shape().elem_count() + self.cfg.dims.packed_len();
        Ok((out, Shape::from(len)))
    }
}

/// Shared-memory bytes of the three kernels for `elem`-byte operands and
/// warp tiles of 16·`nf` columns: the `Plan` formulas of
/// `kernels/adapter.cu` (each kernel traps if launched with less).
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
fn smem_plan(elem: usize, nf: usize) -> [usize; 3] {
    let rnd = |b: usize| (b + 127) & !127;
    let (bt, kc, nc, kt) = (64, 32, 64, 32);
    let rp = 16 * nf;
    let p = if elem == 2 { 8 } else { 1 };
    let (lk, lr, ln, lh, lc) = (kc + p, rp + p, nc + p, rp + 4, nc + 4);
    let s = elem;
    let fwd_r1 = (rnd(bt * lk * s) + rnd(rp * lk * s))
        .max(rnd(bt * lh * 4))
        .max(rnd(nc * lr * s) + rnd(bt * lc * 4));
    let rows_r1 = (rnd(bt * lk * s) + rnd(kc * lr * s))
        .max(rnd(bt * lh * 4))
        .max(rnd(rp * ln * s) + rnd(bt * lc * 4));
    let weights = (rnd(kt * ln * s) + rnd(kt * lr * s)).max(rnd(nc * lh * 4));
    [
        fwd_r1 + rnd(bt * lr * s),
        rows_r1 + rnd(bt * lr * s),
        weights,
    ]
}

/// Warp-tile width in 16-column blocks for bottleneck r (r ≤ 256).
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
fn tile_blocks(r: usize) -> usize {
    r.div_ceil(16).next_power_of_two()
}

#[cfg(feature = "cuda")]
mod cuda {
    use super::{smem_plan, tile_blocks, AdapterGradOp, Cfg, Dims};
    use crate::cuda::{self as k, ptx};
    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::cudarc::driver::{CudaView, PushKernelArg};
    use candle_core::cuda_backend::CudaDevice;
    use candle_core::{CudaStorage, DType, Layout, Result, Storage, Tensor};

    const MODULE: &str = "tunefuse_adapter";
    const ROWS: usize = 64;
    const THREADS: u32 = 128;

    /// `act_fwd_<dtype>` (y = act(x)), or with a gradient g `act_bwd_<dtype>`
    /// (dx = g·act'(x)); contiguous inputs of one dtype and shape.
    pub(super) fn act(
        act: super::Act,
        x: (&CudaStorage, &Layout),
        g: Option<(&CudaStorage, &Layout)>,
    ) -> Result<CudaStorage> {
        let dev = x.0.device.clone();
        let n = x.1.shape().elem_count();
        let dtype = x.0.dtype();
        let which = if g.is_some() { "bwd" } else { "fwd" };
        if let Some((gs, gl)) = g {
            if gs.dtype() != dtype || gl.shape() != x.1.shape() {
                candle_core::bail!(
                    "activation: gradient {:?} {:?} for x {dtype:?} {:?}",
                    gs.dtype(),
                    gl.dims(),
                    x.1.dims()
                );
            }
        }
        let f = k::func(
            &dev,
            MODULE,
            ptx::ADAPTER,
            &format!("act_{which}_{}", k::suffix("activation", dtype)?),
        )?;
        k::with_float_type!("activation", dtype, T => {
            let xv = k::view::<T>("activation", x.0, x.1)?;
            let gv = g.map(|(s, l)| k::view::<T>("activation", s, l)).transpose()?;
            let mut y = k::alloc::<T>(&dev, n)?;
            if n > 0 {
                let (n64, code) = (n as i64, act as i32);
                let mut b = f.builder();
                b.arg(&xv);
                if let Some(gv) = gv.as_ref() {
                    b.arg(gv);
                }
                b.arg(&mut y).arg(&n64).arg(&code);
                k::launch(&mut b, k::grid_for(n, 256), 256)?;
            }
            Ok(CudaStorage::wrap_cuda_slice(y, dev.clone()))
        })
    }

    /// What the launches of one call share.
    struct Geometry {
        nf: usize,
        vec: bool,
        smem: [usize; 3],
    }

    fn geometry(dims: Dims, elem: usize, offsets: &[usize]) -> Geometry {
        let nf = tile_blocks(dims.r);
        Geometry {
            nf,
            // 16-byte accesses: every row of x, dy, the residual, W_d and W_u
            // starts on an 8-element boundary.
            vec: [dims.m, dims.n, dims.r]
                .iter()
                .chain(offsets)
                .all(|v| v.is_multiple_of(8)),
            smem: smem_plan(elem, nf),
        }
    }

    fn kernel(
        dev: &CudaDevice,
        g: &Geometry,
        which: &str,
        dtype: DType,
        smem: usize,
    ) -> Result<k::Kernel> {
        let name = format!(
            "adapter_{which}_{}_nf{}_v{}",
            k::suffix("adapter", dtype)?,
            g.nf,
            g.vec as u8
        );
        let f = k::func(dev, MODULE, ptx::ADAPTER, &name)?;
        f.allow_smem(smem as u32)?;
        Ok(f)
    }

    fn f32_view<'a>(s: &'a Storage, l: &Layout) -> Result<CudaView<'a, f32>> {
        match s {
            Storage::Cuda(c) => Ok(c.as_cuda_slice::<f32>()?.slice(l.start_offset()..)),
            _ => candle_core::bail!("adapter: the saved pre-activations are not on the GPU"),
        }
    }

    /// y and the pre-activations h `[T, RP]` in f32.
    pub(super) fn forward(
        c: &Cfg,
        x: (&CudaStorage, &Layout),
        p: (&CudaStorage, &Layout),
        res: (&CudaStorage, &Layout),
    ) -> Result<(CudaStorage, Tensor)> {
        let (dev, dims) = (x.0.device.clone(), c.dims);
        let t = x.1.shape().elem_count() / dims.m;
        let mut offsets = vec![x.1.start_offset(), p.1.start_offset()];
        offsets.push(res.1.start_offset());
        let g = geometry(dims, x.0.dtype().size_in_bytes(), &offsets);
        let rp = 16 * g.nf;
        let mut h = k::alloc::<f32>(&dev, t * rp)?;
        let f = kernel(&dev, &g, "fwd", x.0.dtype(), g.smem[0])?;
        let y = k::with_float_type!("adapter", x.0.dtype(), T => {
            let xv = k::view::<T>("adapter", x.0, x.1)?;
            let pv = k::view::<T>("adapter", p.0, p.1)?;
            let rv = k::view::<T>("adapter", res.0, res.1)?;
            let mut y = k::alloc::<T>(&dev, t * dims.n)?;
            if t > 0 {
                let (nrows, m, n, r) = (t as i64, dims.m as i32, dims.n as i32, dims.r as i32);
                let (scale, act, bias) = (c.scale as f32, c.act as i32, dims.bias as i32);
                let mut b = f.builder();
                b.arg(&xv).arg(&pv).arg(&rv).arg(&mut y);
                b.arg(&mut h).arg(&nrows).arg(&m).arg(&n).arg(&r).arg(&scale).arg(&act);
                b.arg(&bias);
                k::launch_smem(&mut b, (t.div_ceil(ROWS) as u32, 1), THREADS, g.smem[0] as u32)?;
            }
            CudaStorage::wrap_cuda_slice(y, dev.clone())
        });
        let h = Tensor::from_storage(
            Storage::Cuda(CudaStorage::wrap_cuda_slice(h, dev)),
            (t, rp),
            candle_core::op::BackpropOp::none(),
            false,
        );
        Ok((y, h))
    }

    /// `[dx, d packed]` for the incoming gradient dy.
    pub(super) fn backward(
        o: &AdapterGradOp,
        x: (&CudaStorage, &Layout),
        p: (&CudaStorage, &Layout),
        dy: (&CudaStorage, &Layout),
    ) -> Result<CudaStorage> {
        let dev = x.0.device.clone();
        let dtype = x.0.dtype();
        let dims = o.cfg.dims;
        let t = x.1.shape().elem_count() / dims.m;
        let offsets = [x.1.start_offset(), p.1.start_offset(), dy.1.start_offset()];
        let g = geometry(dims, dtype.size_in_bytes(), &offsets);
        let rp = 16 * g.nf;
        let p_len = dims.packed_len();
        let Some(h) = o.hidden.clone() else {
            candle_core::bail!("adapter: backward without the forward's saved pre-activations")
        };
        let (hs, hl) = h.storage_and_layout();
        let hv = f32_view(&hs, hl)?;
        let rows = kernel(&dev, &g, "bwd_rows", dtype, g.smem[1])?;
        let weights = kernel(&dev, &g, "bwd_weights", dtype, g.smem[2])?;
        let cast = k::func(
            &dev,
            MODULE,
            ptx::ADAPTER,
            &format!("adapter_cast_{}", k::suffix("adapter", dtype)?),
        )?;
        // f32 accumulators of the weight gradients, laid out like p.
        let mut gacc = dev.alloc_zeros::<f32>(p_len)?;
        let (nrows, m, n, r) = (t as i64, dims.m as i32, dims.n as i32, dims.r as i32);
        let c = &o.cfg;
        let (scale, act, res_is_x) = (c.scale as f32, c.act as i32, c.residual_is_x as i32);
        let bias = dims.bias as i32;
        // Row slices of the weight reduction: about two blocks per SM of an
        // H100/H200 (132 SMs), at least 32 rows each.
        let col_blocks = dims.m.max(dims.n).div_ceil(64);
        let splits = 264usize
            .div_ceil(col_blocks)
            .clamp(1, t.div_ceil(32).max(1));
        let rows_per = (t.div_ceil(splits).div_ceil(32) * 32).max(32);
        let splits = t.div_ceil(rows_per);
        let out = k::with_float_type!("adapter", dtype, T => {
            let xv = k::view::<T>("adapter", x.0, x.1)?;
            let pv = k::view::<T>("adapter", p.0, p.1)?;
            let dyv = k::view::<T>("adapter", dy.0, dy.1)?;
            let mut out = k::alloc::<T>(&dev, t * dims.m + p_len)?;
            let mut dh = k::alloc::<T>(&dev, t * rp)?;
            if t > 0 {
                let mut dx = out.slice_mut(..t * dims.m);
                let mut b = rows.builder();
                b.arg(&dyv).arg(&pv).arg(&hv).arg(&mut dx).arg(&mut dh).arg(&mut gacc);
                b.arg(&nrows).arg(&m).arg(&n).arg(&r).arg(&scale).arg(&act).arg(&res_is_x);
                b.arg(&bias);
                k::launch_smem(&mut b, (t.div_ceil(ROWS) as u32, 1), THREADS, g.smem[1] as u32)?;
                let rows_per = rows_per as i64;
                let mut b = weights.builder();
                b.arg(&xv).arg(&dyv).arg(&hv).arg(&dh).arg(&mut gacc);
                b.arg(&nrows).arg(&m).arg(&n).arg(&r).arg(&scale).arg(&act).arg(&rows_per);
                b.arg(&bias);
                k::launch_smem(
                    &mut b,
                    (col_blocks as u32, splits as u32),
                    THREADS,
                    g.smem[2] as u32,
                )?;
            }
            let mut dp = out.slice_mut(t * dims.m..);
            let len = p_len as i64;
            let mut b = cast.builder();
            b.arg(&gacc).arg(&mut dp).arg(&len);
            k::launch(&mut b, k::grid_for(p_len, 256), 256)?;
            CudaStorage::wrap_cuda_slice(out, dev.clone())
        });
        Ok(out)
    }
}
