//! Adversarial perturbations of input embeddings (SMART, R3F, FreeLB, VAT):
//! masked noise initialisation and the fused ascent step.
//!
//! Shapes: embeddings and perturbations `[B, L, H]`, token mask `[B, L]`
//! (any dtype; non-zero = real token). Padding positions of every output are
//! exactly 0.
//!
//! * [`noise_init`]: Normal(0, σ) or Uniform(−σ, σ) per element from Philox
//!   (see [`crate::philox`]): element `i` of the flattened `[B, L, H]` tensor
//!   takes word `i % 4` of group `i / 4`. Uniform is `(2u − 1)·σ` with
//!   `u = (word >> 8)·2⁻²⁴`, bit-identical on CPU and GPU; Normal is
//!   Box–Muller on the word pairs (0, 1) and (2, 3) of a group (cosine for
//!   even, sine for odd elements, `u₁ = ((w >> 8) + 1)·2⁻²⁴`), equal on CPU
//!   and GPU up to float rounding.
//! * [`ascent_step`]: with ‖·‖ the l2 or l∞ norm over a unit (a token's H
//!   values, or an example's L·H values), masked positions excluded:
//!   - `Pgd { eps }`: δ' = proj_ε(δ + η·g/‖g‖) (l2: rescaled to radius ε when
//!     outside; l∞: clamped to ±ε; no projection when `eps` is `None`);
//!   - `Direction { eps0 }`: δ' = η·g/(‖g‖ + ε₀) (VAT power iteration; the
//!     SMART of mt-dnn's first release). ‖δ'‖ ≈ η.
//!   - `NormalizedStep { eps0 }`: δ' = (δ + η·g)/(‖δ + η·g‖ + ε₀)
//!     (smart-pytorch, and the current `perturbation.py` of mt-dnn).
//!     ‖δ'‖ ≈ 1 whatever σ and η are: they only weigh the initial noise
//!     against the gradient in the step's direction.
//!
//!   A zero gradient leaves `Pgd` at δ and gives `Direction` zeros. A unit
//!   whose gradient norm is not finite yields NaN outputs, and its example is
//!   flagged in the returned `[B]` u8 tensor so the trainer can skip the
//!   regulariser for that batch (as mt-dnn does).
//!
//! The CPU code here is the reference (f64, computed directly from the
//! formulas); the CUDA kernels compute the same in f32 from per-unit
//! statistics in one reduction pass and one update pass.
use std::sync::Mutex;

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, CustomOp3, DType, Layout, Shape, Storage, Tensor};

use super::cpu::{from_f64, to_f64};
use super::mixout::Rng;
use crate::error::{check_float_dtype, check_same, param_err, shape_err, Error, Result};
use crate::philox;

/// Distribution of the initial perturbation.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Noise {
    /// N(0, σ²).
    Normal {
        /// σ.
        sigma: f64,
    },
    /// U(−σ, σ).
    Uniform {
        /// σ.
        sigma: f64,
    },
}

/// The norm of an ascent step.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Norm {
    /// Steps normalised by the Euclidean norm; PGD projects onto the l2 ball.
    L2,
    /// Steps normalised by the largest |value|; PGD clamps to ±ε.
    Linf,
}

/// The unit a norm is taken over.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Granularity {
    /// Each token's H values.
    Token,
    /// All L·H values of an example.
    Example,
}

/// The update rule of an ascent step.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum StepMode {
    /// δ + η·g/‖g‖, then projected onto the ε-ball when `eps` is set (FreeLB, PGD).
    Pgd {
        /// The ball's radius ε (None: no projection).
        eps: Option<f64>,
    },
    /// η·g/(‖g‖ + ε₀): a step of size η (VAT; the SMART of mt-dnn's first release).
    Direction {
        /// ε₀ added to the norm.
        eps0: f64,
    },
    /// (δ + η·g)/(‖δ + η·g‖ + ε₀): a step of size 1 (smart-pytorch; mt-dnn's
    /// current SMART).
    NormalizedStep {
        /// ε₀ added to the norm.
        eps0: f64,
    },
}

/// One ascent step's configuration.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AscentStep {
    /// Step size η.
    pub eta: f64,
    /// The norm the step is normalised by.
    pub norm: Norm,
    /// Whether the norm is per token or per example.
    pub granularity: Granularity,
    /// The update rule.
    pub mode: StepMode,
}

impl AscentStep {
    /// Errors for η or ε negative or non-finite.
    pub fn validate(&self) -> Result<()> {
        let op = "ascent_step";
        let check = |name: &str, v: f64| {
            if v.is_finite() && v >= 0.0 {
                Ok(())
            } else {
                Err(param_err(
                    op,
                    format!("{name} must be finite and >= 0, got {v}"),
                ))
            }
        };
        check("step size eta", self.eta)?;
        match self.mode {
            StepMode::Pgd { eps: Some(e) } => check("pgd radius eps", e),
            StepMode::Pgd { eps: None } => Ok(()),
            StepMode::Direction { eps0 } | StepMode::NormalizedStep { eps0 } => check("eps0", eps0),
        }
    }

    fn params(&self) -> Params {
        let (mode, eps, has_eps) = match self.mode {
            StepMode::Pgd { eps } => (0, eps.unwrap_or(0.0), eps.is_some()),
            StepMode::Direction { eps0 } => (1, eps0, true),
            StepMode::NormalizedStep { eps0 } => (2, eps0, true),
        };
        Params {
            eta: self.eta,
            eps,
            mode,
            l2: self.norm == Norm::L2,
            has_eps,
            token: self.granularity == Granularity::Token,
        }
    }
}

#[derive(Clone, Copy, Debug)]
struct Params {
    eta: f64,
    eps: f64,
    mode: i32,
    l2: bool,
    has_eps: bool,
    token: bool,
}

/// `[B, L]` from a `[B, L, H]` shape, with the checks every op shares.
fn dims3(op: &'static str, dims: &[usize]) -> Result<(usize, usize, usize)> {
    let &[b, l, h] = dims else {
        return Err(shape_err(
            op,
            format!("expected embeddings of shape [B, L, H], got {dims:?}"),
        ));
    };
    if b == 0 || l == 0 || h == 0 {
        return Err(shape_err(op, format!("empty batch: shape {dims:?}")));
    }
    Ok((b, l, h))
}

/// The token mask as contiguous f32 `[B·L]`, checked against the shape.
fn token_mask(op: &'static str, mask: &Tensor, b: usize, l: usize) -> Result<Tensor> {
    if mask.dims() != [b, l] {
        return Err(shape_err(
            op,
            format!(
                "token mask has shape {:?}, expected [B, L] = [{b}, {l}]",
                mask.dims()
            ),
        ));
    }
    Ok(mask
        .detach()
        .flatten_all()?
        .to_dtype(DType::F32)?
        .contiguous()?)
}

// ------------------------------------------------------------------ noise

/// Masked noise of shape `[B, L, H]` and `dtype` on the mask's device.
pub fn noise_init(
    shape: &[usize],
    mask: &Tensor,
    noise: Noise,
    dtype: DType,
    rng: Rng,
) -> Result<Tensor> {
    let op = "noise_init";
    let (b, l, h) = dims3(op, shape)?;
    check_float_dtype(op, "output", dtype)?;
    let (normal, sigma) = match noise {
        Noise::Normal { sigma } => (true, sigma),
        Noise::Uniform { sigma } => (false, sigma),
    };
    if !(sigma.is_finite() && sigma >= 0.0) {
        return Err(param_err(
            op,
            format!("sigma must be finite and >= 0, got {sigma}"),
        ));
    }
    let mask = token_mask(op, mask, b, l)?;
    Ok(mask.apply_op1_no_bwd(&NoiseOp {
        shape: [b, l, h],
        normal,
        sigma: sigma as f32,
        rng,
        dtype,
    })?)
}

struct NoiseOp {
    shape: [usize; 3],
    normal: bool,
    sigma: f32,
    rng: Rng,
    dtype: DType,
}

/// The reference value of element `i` before masking.
fn noise_value(normal: bool, sigma: f32, rng: Rng, i: u64) -> f64 {
    let w = philox::group(rng.seed, rng.offset, i / 4);
    let k = (i % 4) as usize;
    if normal {
        let pair = k / 2 * 2;
        let u1 = f64::from((w[pair] >> 8) + 1) / f64::from(1u32 << 24);
        let u2 = f64::from(w[pair + 1] >> 8) / f64::from(1u32 << 24);
        let r = (-2.0 * u1.ln()).sqrt();
        let (s, c) = (2.0 * std::f64::consts::PI * u2).sin_cos();
        f64::from(sigma) * r * if k.is_multiple_of(2) { c } else { s }
    } else {
        // In f32 exactly as the kernel: (2u − 1)·σ.
        f64::from((2.0 * philox::uniform(w[k]) - 1.0) * sigma)
    }
}

impl CustomOp1 for NoiseOp {
    fn name(&self) -> &'static str {
        "tunefuse-noise-init"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let mask = to_f64(s, l)?;
        let h = self.shape[2];
        let n = self.shape.iter().product::<usize>();
        let vals = (0..n)
            .map(|i| {
                if mask[i / h] == 0.0 {
                    0.0
                } else {
                    noise_value(self.normal, self.sigma, self.rng, i as u64)
                }
            })
            .collect();
        Ok((from_f64(vals, self.dtype), Shape::from(self.shape.to_vec())))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        Ok((cuda::noise(self, s, l)?, Shape::from(self.shape.to_vec())))
    }
}

// ------------------------------------------------------------ ascent step

/// One fused ascent step. Returns the new perturbation (same shape and
/// dtype as `delta`) and a `[B]` u8 tensor that is 1 for examples where a
/// gradient norm was not finite.
pub fn ascent_step(
    delta: &Tensor,
    grad: &Tensor,
    mask: &Tensor,
    step: &AscentStep,
) -> Result<(Tensor, Tensor)> {
    let op = "ascent_step";
    step.validate()?;
    check_same(op, delta, grad, ("delta", "grad"))?;
    check_float_dtype(op, "delta", delta.dtype())?;
    let (b, l, _) = dims3(op, delta.dims())?;
    let mask = token_mask(op, mask, b, l)?;
    if !mask.device().same_device(delta.device()) {
        return Err(Error::Device {
            op,
            msg: "token mask is not on the embeddings' device".into(),
        });
    }
    let step_op = StepOp {
        p: step.params(),
        flags: Mutex::new(None),
    };
    let out = delta.detach().contiguous()?.apply_op3_no_bwd(
        &grad.detach().contiguous()?,
        &mask,
        &step_op,
    )?;
    let flags = step_op
        .flags
        .lock()
        .unwrap()
        .take()
        .expect("the step op stores its flags");
    Ok((
        out,
        Tensor::from_storage(flags, b, candle_core::op::BackpropOp::none(), false),
    ))
}

struct StepOp {
    p: Params,
    /// The `[B]` u8 flags the forward computed alongside the output.
    flags: Mutex<Option<Storage>>,
}

fn norm(l2: bool, v: impl Iterator<Item = f64>) -> f64 {
    if l2 {
        v.map(|x| x * x).sum::<f64>().sqrt()
    } else {
        v.fold(0.0, |m: f64, x| {
            if x.is_nan() || m.is_nan() {
                f64::NAN
            } else {
                m.max(x.abs())
            }
        })
    }
}

/// The reference update of one unit (`idx` = its unmasked positions).
fn step_unit(p: &Params, d: &[f64], g: &[f64], idx: &[usize], out: &mut [f64]) -> bool {
    let gn = norm(p.l2, idx.iter().map(|&i| g[i]));
    if !gn.is_finite() {
        idx.iter().for_each(|&i| out[i] = f64::NAN);
        return true;
    }
    match p.mode {
        0 => {
            let s = if gn > 0.0 { p.eta / gn } else { 0.0 };
            idx.iter().for_each(|&i| out[i] = d[i] + s * g[i]);
            if p.has_eps {
                if p.l2 {
                    let xn = norm(true, idx.iter().map(|&i| out[i]));
                    if xn > p.eps {
                        idx.iter().for_each(|&i| out[i] *= p.eps / xn);
                    }
                } else {
                    idx.iter()
                        .for_each(|&i| out[i] = out[i].clamp(-p.eps, p.eps));
                }
            }
        }
        1 => {
            let s = if gn > 0.0 { p.eta / (gn + p.eps) } else { 0.0 };
            idx.iter().for_each(|&i| out[i] = s * g[i]);
        }
        _ => {
            idx.iter().for_each(|&i| out[i] = d[i] + p.eta * g[i]);
            let yn = norm(p.l2, idx.iter().map(|&i| out[i]));
            let s = if yn + p.eps > 0.0 {
                1.0 / (yn + p.eps)
            } else {
                0.0
            };
            idx.iter().for_each(|&i| out[i] *= s);
        }
    }
    false
}

impl CustomOp3 for StepOp {
    fn name(&self) -> &'static str {
        "tunefuse-ascent-step"
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
        let (d, g, m) = (to_f64(s1, l1)?, to_f64(s2, l2)?, to_f64(s3, l3)?);
        let &[b, l, h] = l1.dims() else {
            candle_core::bail!("ascent_step: expected [B, L, H]")
        };
        let mut out = vec![0.0; d.len()];
        let mut flags = vec![0u8; b];
        for (bi, flag) in flags.iter_mut().enumerate() {
            let real: Vec<usize> = (0..l).filter(|&li| m[bi * l + li] != 0.0).collect();
            let units: Vec<Vec<usize>> = if self.p.token {
                real.iter()
                    .map(|&li| ((bi * l + li) * h..(bi * l + li + 1) * h).collect())
                    .collect()
            } else {
                vec![real
                    .iter()
                    .flat_map(|&li| (bi * l + li) * h..(bi * l + li + 1) * h)
                    .collect()]
            };
            for idx in units {
                if step_unit(&self.p, &d, &g, &idx, &mut out) {
                    *flag = 1;
                }
            }
        }
        *self.flags.lock().unwrap() = Some(Storage::Cpu(CpuStorage::U8(flags)));
        Ok((from_f64(out, s1.dtype()), l1.shape().clone()))
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
        let (out, flags) = cuda::step(&self.p, s1, l1, s2, l2, s3, l3)?;
        *self.flags.lock().unwrap() = Some(Storage::Cuda(flags));
        Ok((out, l1.shape().clone()))
    }
}

// ------------------------------------------------------------ the helper

/// Noise initialisation followed by K ascent steps: the loop SMART, FreeLB,
/// R3F and the calibration regulariser share.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Perturbation {
    /// The initial δ's distribution.
    pub noise: Noise,
    /// Each ascent step.
    pub step: AscentStep,
    /// K, the number of ascent steps (0 = noise only, as in R3F).
    pub steps: usize,
}

/// What [`Perturbation::run`] returns.
pub struct Perturbed {
    /// The final perturbation `[B, L, H]`.
    pub delta: Tensor,
    /// `[B]` u8: 1 where some step saw a non-finite gradient norm.
    pub nonfinite: Tensor,
}

impl Perturbed {
    /// Whether any example was flagged (reads one byte back from the device).
    pub fn any_nonfinite(&self) -> Result<bool> {
        Ok(self.nonfinite.max_all()?.to_scalar::<u8>()? != 0)
    }
}

impl Perturbation {
    /// Draws the noise (advancing `rng.offset` past it) and takes `steps`
    /// ascent steps, `grad_of(δ)` giving the gradient of the inner objective
    /// with respect to δ.
    pub fn run(
        &self,
        shape: &[usize],
        mask: &Tensor,
        dtype: DType,
        rng: &mut Rng,
        mut grad_of: impl FnMut(&Tensor) -> Result<Tensor>,
    ) -> Result<Perturbed> {
        self.step.validate()?;
        let mut delta = noise_init(shape, mask, self.noise, dtype, *rng)?;
        rng.offset += philox::counters_for(delta.elem_count());
        let mut nonfinite = Tensor::zeros(shape[0], DType::U8, mask.device())?;
        for _ in 0..self.steps {
            let g = grad_of(&delta)?;
            let (d, f) = ascent_step(&delta, &g, mask, &self.step)?;
            delta = d;
            nonfinite = nonfinite.maximum(&f)?;
        }
        Ok(Perturbed { delta, nonfinite })
    }
}

#[cfg(feature = "cuda")]
mod cuda {
    use super::{NoiseOp, Params};
    use crate::cuda::{self as k, ptx};
    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::cudarc::driver::PushKernelArg;
    use candle_core::{CudaStorage, Layout, Result};

    const MODULE: &str = "tunefuse_perturb";
    /// Statistics per example chunk: six f32 (kernels/perturb.cu `Stats`).
    const STATS_FLOATS: usize = 6;

    pub(super) fn noise(op: &NoiseOp, mask: &CudaStorage, ml: &Layout) -> Result<CudaStorage> {
        let dev = mask.device.clone();
        let m = k::view::<f32>("noise_init", mask, ml)?;
        let n = op.shape.iter().product::<usize>();
        let f = k::func(
            &dev,
            MODULE,
            ptx::PERTURB,
            &format!("perturb_noise_{}", k::suffix("noise_init", op.dtype)?),
        )?;
        k::with_float_type!("noise_init", op.dtype, T => {
            let mut out = k::alloc::<T>(&dev, n)?;
            let (n64, h, normal) = (n as i64, op.shape[2] as i64, i32::from(op.normal));
            let (seed, offset, base) = k::philox_args(&dev, op.rng.seed, op.rng.offset);
            let mut b = f.builder();
            b.arg(&mut out)
                .arg(&m)
                .arg(&n64)
                .arg(&h)
                .arg(&seed)
                .arg(&offset)
                .arg(&base)
                .arg(&op.sigma)
                .arg(&normal);
            // One thread per 16 bytes of elements (kernels/perturb.cu).
            let threads = n.div_ceil(k::per_16_bytes(op.dtype));
            k::launch(&mut b, k::grid_for(threads, 256), 256)?;
            Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()))
        })
    }

    /// Tokens (warps) per block of the token-unit step.
    const TOKEN_WARPS: u32 = 8;

    pub(super) fn step(
        p: &Params,
        s1: &CudaStorage,
        l1: &Layout,
        s2: &CudaStorage,
        l2: &Layout,
        s3: &CudaStorage,
        l3: &Layout,
    ) -> Result<(CudaStorage, CudaStorage)> {
        let dev = s1.device.clone();
        let &[b, l, h] = l1.dims() else {
            candle_core::bail!("ascent_step: expected [B, L, H]")
        };
        let suffix = k::suffix("ascent_step", s1.dtype())?;
        let mask = k::view::<f32>("ascent_step", s3, l3)?;
        let mut flags = dev.alloc_zeros::<u8>(b)?;
        let (l64, h64) = (l as i64, h as i64);
        let (eta, eps) = (p.eta as f32, p.eps as f32);
        let (mode, l2n, has_eps) = (p.mode, i32::from(p.l2), i32::from(p.has_eps));
        let out = k::with_float_type!("ascent_step", s1.dtype(), T => {
            let d = k::view::<T>("ascent_step", s1, l1)?;
            let g = k::view::<T>("ascent_step", s2, l2)?;
            let mut out = k::alloc::<T>(&dev, b * l * h)?;
            if p.token {
                let f = k::func(&dev, MODULE, ptx::PERTURB, &format!("perturb_token_{suffix}"))?;
                let mut bl = f.builder();
                let tokens = (b * l) as i64;
                bl.arg(&d).arg(&g).arg(&mask).arg(&mut out).arg(&mut flags).arg(&tokens);
                bl.arg(&l64).arg(&h64);
                bl.arg(&eta).arg(&eps).arg(&mode).arg(&l2n).arg(&has_eps);
                // One warp per token (kernels/perturb.cu), 8 per block.
                let blocks = (b * l).div_ceil(TOKEN_WARPS as usize) as u32;
                k::launch(&mut bl, blocks, 32 * TOKEN_WARPS)?;
            } else {
                // Chunks of >= 4096 elements, at most 1024 per example.
                let n = l * h;
                let chunks = n.div_ceil(4096).clamp(1, 1024);
                let chunk = n.div_ceil(chunks) as i64;
                let mut part = k::alloc::<f32>(&dev, b * chunks * STATS_FLOATS)?;
                let grid = (chunks as u32, b as u32);
                let f = k::func(&dev, MODULE, ptx::PERTURB, &format!("perturb_example_stats_{suffix}"))?;
                let mut bl = f.builder();
                bl.arg(&d).arg(&g).arg(&mask).arg(&mut part).arg(&l64).arg(&h64).arg(&chunk);
                bl.arg(&eta).arg(&eps).arg(&mode).arg(&l2n).arg(&has_eps);
                k::launch_2d(&mut bl, grid, 256)?;
                let f = k::func(&dev, MODULE, ptx::PERTURB, &format!("perturb_example_update_{suffix}"))?;
                let mut bl = f.builder();
                bl.arg(&d).arg(&g).arg(&mask).arg(&part).arg(&mut out).arg(&mut flags).arg(&l64).arg(&h64).arg(&chunk);
                bl.arg(&eta).arg(&eps).arg(&mode).arg(&l2n).arg(&has_eps);
                k::launch_2d(&mut bl, grid, 256)?;
            }
            CudaStorage::wrap_cuda_slice(out, dev.clone())
        });
        Ok((out, CudaStorage::wrap_cuda_slice(flags, dev)))
    }
}
