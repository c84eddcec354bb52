//! Bottleneck adapter (Houlsby / Pfeiffer) and LoRA delta:
//! `y = residual + s·(act(x·W_dᵀ + b_d)·W_uᵀ + b_u)`, x `[.., d]` flattened
//! to T rows, W_d `[r, d]`, b_d `[r]`, W_u `[d, r]`, b_u `[d]`; the residual
//! is x itself (adapters) or a given tensor (a LoRA delta added to a base
//! layer's output, with act = identity and no biases).
//!
//! Backward (for an incoming dy): du = s·dy; dW_u = duᵀ·z, db_u = Σ_t du;
//! dz = du·W_u; dh = dz ⊙ act'(h); dW_d = dhᵀ·x, db_d = Σ_t dh;
//! dx = dh·W_d (+ dy when the residual is x); d residual = dy.
//!
//! Status: the CPU custom op below is the reference that defines these
//! semantics (f64 accumulation). The fused CUDA kernel (DESIGN.md: x read
//! once, the T×r hidden tile on chip, tensor cores for bf16/f16) is not
//! written yet; on CUDA [`adapter`] runs [`adapter_composed`], the same math
//! from candle ops.
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Shape, Tensor};

use super::cpu::{from_f64, to_f64};
use crate::error::{check_float_dtype, param_err, shape_err, Error, Result};

/// The activation of the bottleneck.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Act {
    GeluErf,
    GeluTanh,
    Relu,
    Silu,
    Identity,
}

impl Act {
    /// The activation on a tensor. Under autograd both GELUs are composed
    /// from erf / tanh, whose backward passes are exact, because candle's
    /// fused `gelu_erf` and `gelu` backward passes use 6-digit constants
    /// (0.398942 for 1/√(2π), 0.797885 for √(2/π)): a relative gradient
    /// error near 1e-6, which the adapter golden test against PyTorch exposed.
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

/// erf in f64 (candle's implementation, the one its erf op uses).
fn erf(x: f64) -> f64 {
    candle_core::cpu::erf::erf_f64(x)
}

/// The parameters of one adapter call.
#[derive(Clone, Debug)]
pub struct AdapterWeights {
    /// `[r, d]`.
    pub w_down: Tensor,
    /// `[r]`, or none (LoRA).
    pub b_down: Option<Tensor>,
    /// `[d, r]`.
    pub w_up: Tensor,
    /// `[d]`, or none (LoRA).
    pub b_up: Option<Tensor>,
    pub act: Act,
    pub scale: f64,
}

impl AdapterWeights {
    /// (d, r) after checking every shape and dtype against `x`.
    fn check(&self, x: &Tensor, residual: Option<&Tensor>) -> Result<(usize, usize)> {
        let op = "adapter";
        check_float_dtype(op, "x", x.dtype())?;
        let d = *x
            .dims()
            .last()
            .ok_or_else(|| shape_err(op, "x is a scalar; expected [.., d]"))?;
        let (r, d_w) = self.w_down.dims2().map_err(|_| {
            shape_err(
                op,
                format!("w_down must be [r, d], got {:?}", self.w_down.dims()),
            )
        })?;
        if r == 0 {
            return Err(param_err(op, "bottleneck r = 0"));
        }
        if d_w != d || self.w_up.dims() != [d, r] {
            return Err(shape_err(
                op,
                format!(
                    "x has d = {d}; w_down {:?} and w_up {:?} need [r, d] and [d, r]",
                    self.w_down.dims(),
                    self.w_up.dims()
                ),
            ));
        }
        for (name, b, n) in [("b_down", &self.b_down, r), ("b_up", &self.b_up, d)] {
            if let Some(b) = b {
                if b.dims() != [n] {
                    return Err(shape_err(
                        op,
                        format!("{name} must be [{n}], got {:?}", b.dims()),
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
        }
        if let Some(res) = residual {
            if res.dims() != x.dims() {
                return Err(shape_err(
                    op,
                    format!(
                        "residual {:?} must have x's shape {:?}",
                        res.dims(),
                        x.dims()
                    ),
                ));
            }
        }
        if !self.scale.is_finite() {
            return Err(param_err(
                op,
                format!("scale must be finite, got {}", self.scale),
            ));
        }
        Ok((d, r))
    }

    /// All parameters in one flat tensor: W_d, b_d, W_u, b_u (zeros for
    /// absent biases), so the op has two inputs and autograd reaches each
    /// weight through the concatenation.
    fn packed(&self, d: usize, r: usize) -> Result<Tensor> {
        let zeros = |n: usize| Tensor::zeros(n, self.w_down.dtype(), self.w_down.device());
        let bd = match &self.b_down {
            Some(b) => b.clone(),
            None => zeros(r)?,
        };
        let bu = match &self.b_up {
            Some(b) => b.clone(),
            None => zeros(d)?,
        };
        Ok(Tensor::cat(
            &[self.w_down.flatten_all()?, bd, self.w_up.flatten_all()?, bu],
            0,
        )?)
    }
}

/// The adapter: `residual + s·(act(x·W_dᵀ + b_d)·W_uᵀ + b_u)` with
/// residual = x when `residual` is `None`. Differentiable in x, the residual
/// and every weight.
pub fn adapter(x: &Tensor, w: &AdapterWeights, residual: Option<&Tensor>) -> Result<Tensor> {
    let (d, r) = w.check(x, residual)?;
    if x.device().is_cuda() {
        return adapter_composed(x, w, residual);
    }
    let op = AdapterOp {
        d,
        r,
        act: w.act,
        scale: w.scale,
        residual_is_x: residual.is_none(),
    };
    let core = x.contiguous()?.apply_op2(&w.packed(d, r)?, op)?;
    Ok(match residual {
        None => core,
        Some(res) => (core + res)?,
    })
}

/// The same math from candle ops (the baseline, and the CUDA path until the
/// fused kernel exists).
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

struct AdapterOp {
    d: usize,
    r: usize,
    act: Act,
    scale: f64,
    /// Whether the op adds x itself (adapters) or nothing (the caller adds
    /// an explicit residual outside the op).
    residual_is_x: bool,
}

impl AdapterOp {
    fn unpack<'a>(&self, p: &'a [f64]) -> (&'a [f64], &'a [f64], &'a [f64], &'a [f64]) {
        let (d, r) = (self.d, self.r);
        let (wd, rest) = p.split_at(r * d);
        let (bd, rest) = rest.split_at(r);
        let (wu, bu) = rest.split_at(d * r);
        (wd, bd, wu, bu)
    }

    /// Pre-activations h `[T, r]` of the reference.
    fn hidden(&self, x: &[f64], wd: &[f64], bd: &[f64]) -> Vec<f64> {
        let (d, r) = (self.d, self.r);
        let t = x.len() / d;
        let mut h = vec![0.0; t * r];
        for i in 0..t {
            for k in 0..r {
                h[i * r + k] = bd[k] + (0..d).map(|j| x[i * d + j] * wd[k * d + j]).sum::<f64>();
            }
        }
        h
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
        let (wd, bd, wu, bu) = self.unpack(&p);
        let (d, r) = (self.d, self.r);
        let h = self.hidden(&x, wd, bd);
        let mut y = vec![0.0; x.len()];
        for i in 0..x.len() / d {
            for j in 0..d {
                let u = bu[j]
                    + (0..r)
                        .map(|k| self.act.f(h[i * r + k]) * wu[j * r + k])
                        .sum::<f64>();
                y[i * d + j] = if self.residual_is_x {
                    x[i * d + j]
                } else {
                    0.0
                } + self.scale * u;
            }
        }
        Ok((from_f64(y, s1.dtype()), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        packed: &Tensor,
        _res: &Tensor,
        dy: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let g = x.apply_op3_no_bwd(
            packed,
            &dy.contiguous()?,
            &AdapterGradOp {
                op: self.clone_cfg(),
            },
        )?;
        let n = x.elem_count();
        Ok((
            Some(g.narrow(0, 0, n)?.reshape(x.shape())?),
            Some(g.narrow(0, n, packed.elem_count())?),
        ))
    }
}

impl AdapterOp {
    fn clone_cfg(&self) -> AdapterOp {
        AdapterOp {
            d: self.d,
            r: self.r,
            act: self.act,
            scale: self.scale,
            residual_is_x: self.residual_is_x,
        }
    }
}

/// Gradients `[dx (T·d), d packed]` in one flat tensor.
struct AdapterGradOp {
    op: AdapterOp,
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
        let o = &self.op;
        let (x, p, dy) = (to_f64(s1, l1)?, to_f64(s2, l2)?, to_f64(s3, l3)?);
        let (wd, bd, wu, _) = o.unpack(&p);
        let (d, r) = (o.d, o.r);
        let t = x.len() / d;
        let h = o.hidden(&x, wd, bd);
        let (mut dx, mut dp) = (vec![0.0; x.len()], vec![0.0; p.len()]);
        let (dwd_off, dbd_off, dwu_off, dbu_off) = (0, r * d, r * d + r, r * d + r + d * r);
        for i in 0..t {
            // du = s·dy; dW_u += duᵀ z; db_u += du; dz = du·W_u; dh = dz ⊙ act'(h).
            let du: Vec<f64> = (0..d).map(|j| o.scale * dy[i * d + j]).collect();
            let mut dh = vec![0.0; r];
            for k in 0..r {
                let z = o.act.f(h[i * r + k]);
                let mut dz = 0.0;
                for j in 0..d {
                    dp[dwu_off + j * r + k] += du[j] * z;
                    dz += du[j] * wu[j * r + k];
                }
                dh[k] = dz * o.act.df(h[i * r + k]);
                dp[dbd_off + k] += dh[k];
            }
            for j in 0..d {
                dp[dbu_off + j] += du[j];
                let mut v = if o.residual_is_x { dy[i * d + j] } else { 0.0 };
                for k in 0..r {
                    dp[dwd_off + k * d + j] += dh[k] * x[i * d + j];
                    v += dh[k] * wd[k * d + j];
                }
                dx[i * d + j] = v;
            }
        }
        dx.extend(dp);
        let n = dx.len();
        Ok((from_f64(dx, s1.dtype()), Shape::from(n)))
    }
}
