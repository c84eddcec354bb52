//! Mixout (Lee et al., ICLR 2020) and dropout from one counter-based RNG.
//!
//! Mixout of a weight `w` towards its pretrained value `u` with probability
//! `p`: `w̃ = u + M ⊙ (w − u) / (1 − p)`, `M ~ Bernoulli(1 − p)` per element,
//! equal to the paper's `(M⊙w + (1−M)⊙u − p·u)/(1−p)`. The gradient is the
//! analytic `∂w̃/∂w = M/(1 − p)` (the reference implementation
//! bloodwass/mixout omits the `1/(1 − p)`), and `∂w̃/∂u = 1 − M/(1 − p)`.
//! Dropout: `y = M ⊙ x / (1 − p)`. Dropout before a residual add, fused:
//! `y = dropout(x) + r`, with the dropout's output rounded to x's dtype
//! before the add, so it equals the two ops composed bit for bit.
//!
//! `M` is drawn from Philox4x32-10 keyed by `seed`, with counters starting at
//! `offset` (see [`crate::philox`] for the exact mapping): nothing is stored,
//! backward regenerates the mask, and the CPU reference here draws the same
//! bits as the CUDA kernel, whose arithmetic avoids fused multiply-adds so the
//! outputs are bit-identical too. Eval mode (`train = false`) and p = 0
//! return the input unchanged (p = 0 is the identity; computing
//! `u + (w − u)` would round).
//!
//! # Example
//! ```
//! use candle_core::{Device, Tensor, Var};
//! use tunefuse::ops::mixout::{mixout, Rng};
//! use tunefuse::philox;
//!
//! # fn main() -> tunefuse::Result<()> {
//! let pretrained = Tensor::randn(0f32, 0.02, (16, 16), &Device::Cpu)?;
//! let w = Var::from_tensor(&pretrained)?;
//! let mut rng = Rng { seed: 42, offset: 0 };
//! let w_tilde = mixout(w.as_tensor(), &pretrained, 0.1, rng, true)?;
//! // The next call with this seed continues the stream.
//! rng.offset += philox::counters_for(w_tilde.elem_count());
//! let grads = w_tilde.sum_all()?.backward()?;
//! assert!(grads.get(w.as_tensor()).is_some());
//! # Ok(())
//! # }
//! ```
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Shape, Tensor, WithDType};

use super::cpu::contiguous;
use crate::error::{check_float_dtype, check_same, param_err, Result};
use crate::philox;
use rayon::prelude::*;

/// The random stream of one call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rng {
    /// The Philox key.
    pub seed: u64,
    /// First Philox counter of the call; advance it by
    /// [`philox::counters_for`]`(n)` between calls that share a seed.
    pub offset: u64,
}

/// Parameters checked once: probability and its derived constants.
#[derive(Clone, Copy, Debug)]
pub(crate) struct DropParams {
    pub(crate) threshold: u32,
    pub(crate) scale: f32,
    pub(crate) rng: Rng,
}

pub(crate) fn drop_params(op: &'static str, p: f64, rng: Rng) -> Result<DropParams> {
    if p.is_nan() {
        return Err(param_err(op, "p is NaN; it must be in [0, 1)"));
    }
    if !(0.0..1.0).contains(&p) {
        return Err(param_err(op, format!("p must be in [0, 1), got {p}")));
    }
    Ok(DropParams {
        threshold: philox::keep_threshold(p),
        scale: (1.0 / (1.0 - p)) as f32,
        rng,
    })
}

/// Mixout of `w` (the trained weight) towards `u` (its pretrained value).
/// `w` and `u` must have the same shape, dtype and device.
pub fn mixout(w: &Tensor, u: &Tensor, p: f64, rng: Rng, train: bool) -> Result<Tensor> {
    check_same("mixout", w, u, ("w", "u"))?;
    check_half_or_f32("mixout", w.dtype())?;
    let d = drop_params("mixout", p, rng)?;
    if !train || p == 0.0 || w.elem_count() == 0 {
        return Ok(w.clone());
    }
    Ok(w.contiguous()?
        .apply_op2(&u.contiguous()?, PairOp(Pair::Mixout, d))?)
}

/// Dropout of `x` with probability `p`, scaled by `1/(1 − p)`.
pub fn dropout(x: &Tensor, p: f64, rng: Rng, train: bool) -> Result<Tensor> {
    check_half_or_f32("dropout", x.dtype())?;
    let d = drop_params("dropout", p, rng)?;
    if !train || p == 0.0 || x.elem_count() == 0 {
        return Ok(x.clone());
    }
    Ok(x.contiguous()?.apply_op1(DropoutOp(d))?)
}

/// `dropout(x) + r` in one pass: [`dropout`]'s output for `x` and `rng`
/// (the same draws), rounded to x's dtype, plus the residual `r`, rounded
/// once more, which is exactly what the two ops compute composed. The
/// gradient is dropout's for `x` and the identity for `r`. Eval mode and
/// p = 0 give `x + r`. `x` and `r` must have the same shape, dtype and
/// device.
pub fn dropout_add(x: &Tensor, r: &Tensor, p: f64, rng: Rng, train: bool) -> Result<Tensor> {
    check_same("dropout_add", x, r, ("x", "r"))?;
    check_half_or_f32("dropout_add", x.dtype())?;
    let d = drop_params("dropout_add", p, rng)?;
    if !train || p == 0.0 || x.elem_count() == 0 {
        return Ok((x + r)?);
    }
    Ok(x.contiguous()?
        .apply_op2(&r.contiguous()?, PairOp(Pair::DropoutAdd, d))?)
}

/// The keep mask (1 = kept) the ops draw for `n` elements, on the CPU: what
/// tests compare kernels against.
pub fn keep_mask(n: usize, p: f64, rng: Rng) -> Result<Vec<bool>> {
    let d = drop_params("keep_mask", p, rng)?;
    Ok((0..n as u64)
        .map(|i| philox::keep(rng.seed, rng.offset, i, d.threshold))
        .collect())
}

/// The ops compute in f32 (bit-identical on CPU and GPU), so f64 is refused
/// rather than silently rounded.
fn check_half_or_f32(op: &'static str, dtype: candle_core::DType) -> Result<()> {
    check_float_dtype(op, "input", dtype)?;
    if dtype == candle_core::DType::F64 {
        return Err(crate::Error::DType {
            op,
            msg: "input is f64; mixout and dropout take f32, bf16 or f16".into(),
        });
    }
    Ok(())
}

struct DropoutOp(DropParams);

/// The two-input ops: mixout of x = w towards u, and dropout of x plus the
/// residual u.
#[derive(Clone, Copy)]
enum Pair {
    Mixout,
    DropoutAdd,
}
struct PairOp(Pair, DropParams);

/// Elements per parallel task of the CPU path (a multiple of 4: whole
/// Philox blocks).
const CPU_CHUNK: usize = 1 << 14;

/// Applies `f(keep_i, x_i, u_i, round)` in f32 over contiguous inputs of one
/// dtype, where `keep_i` is element i's draw from `d` and `round` rounds an
/// f32 to the storage dtype (for an intermediate the kernels round): in
/// parallel over chunks, one Philox block per four elements.
fn map_cpu(
    d: &DropParams,
    s1: &CpuStorage,
    l1: &Layout,
    s2: Option<(&CpuStorage, &Layout)>,
    f: impl Fn(bool, f32, f32, &dyn Fn(f32) -> f32) -> f32 + Sync,
) -> candle_core::Result<CpuStorage> {
    // `round` takes the f32 result to the storage dtype, rounding once like
    // the kernels (half's `from_f32` is correctly rounded; its `from_f64`,
    // which candle's `WithDType::from_f64` uses, is not: see `cpu::from_f64`).
    macro_rules! go {
        ($v:expr, $variant:ident, $round:expr) => {{
            let x = contiguous($v, l1)?;
            let u = match s2 {
                Some((CpuStorage::$variant(u), l2)) => Some(contiguous(u, l2)?),
                Some(_) => candle_core::bail!("inputs have different dtypes"),
                None => None,
            };
            let mut out = vec![Default::default(); x.len()];
            out.par_chunks_mut(CPU_CHUNK)
                .enumerate()
                .for_each(|(c, out)| {
                    let first = c * CPU_CHUNK;
                    let mut words = vec![0u32; out.len()];
                    philox::fill_words(d.rng.seed, d.rng.offset, first as u64, &mut words);
                    for (j, (o, w)) in out.iter_mut().zip(&words).enumerate() {
                        let i = first + j;
                        let ui = u.map_or(0.0, |u| u[i].to_f64() as f32);
                        let keep = philox::kept(*w, d.threshold);
                        let mid = |v: f32| $round(v).to_f64() as f32;
                        *o = $round(f(keep, x[i].to_f64() as f32, ui, &mid));
                    }
                });
            CpuStorage::$variant(out)
        }};
    }
    Ok(match s1 {
        CpuStorage::F32(v) => go!(v, F32, |y: f32| y),
        CpuStorage::BF16(v) => go!(v, BF16, half::bf16::from_f32),
        CpuStorage::F16(v) => go!(v, F16, half::f16::from_f32),
        other => candle_core::bail!("unsupported dtype {:?}", other.dtype()),
    })
}

impl CustomOp2 for PairOp {
    fn name(&self) -> &'static str {
        match self.0 {
            Pair::Mixout => "tunefuse-mixout",
            Pair::DropoutAdd => "tunefuse-dropout-add",
        }
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (pair, d) = (self.0, self.1);
        let out = map_cpu(&d, s1, l1, Some((s2, l2)), |keep, x, u, round| match pair {
            // u + M·(w − u)/(1 − p), w = x
            Pair::Mixout if keep => u + (x - u) * d.scale,
            Pair::Mixout => u,
            // dropout(x) as the dropout op stores it, + the residual u
            Pair::DropoutAdd => round(if keep { x * d.scale } else { 0.0 }) + u,
        })?;
        Ok((out, l1.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let kernel = match self.0 {
            Pair::Mixout => "mixout",
            Pair::DropoutAdd => "dropout_add",
        };
        Ok((
            cuda::launch(kernel, &self.1, s1, l1, Some((s2, l2)))?,
            l1.shape().clone(),
        ))
    }

    fn bwd(
        &self,
        _x: &Tensor,
        u: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        // ∂/∂x is M/(1 − p) in both: dropout of the incoming gradient, same
        // bits. ∂/∂u: 1 − M/(1 − p) for mixout, 1 for the residual.
        let gx = grad.contiguous()?.apply_op1_no_bwd(&DropoutOp(self.1))?;
        let gu = match self.0 {
            Pair::Mixout => u.track_op().then(|| grad - &gx).transpose()?,
            Pair::DropoutAdd => Some(grad.clone()),
        };
        Ok((Some(gx), gu))
    }
}

impl CustomOp1 for DropoutOp {
    fn name(&self) -> &'static str {
        "tunefuse-dropout"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let d = self.0;
        let out = map_cpu(
            &d,
            s,
            l,
            None,
            |keep, x, _, _| {
                if keep {
                    x * d.scale
                } else {
                    0.0
                }
            },
        )?;
        Ok((out, l.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        Ok((
            cuda::launch("dropout", &self.0, s, l, None)?,
            l.shape().clone(),
        ))
    }

    fn bwd(
        &self,
        _x: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(grad.contiguous()?.apply_op1(DropoutOp(self.0))?))
    }
}

#[cfg(feature = "cuda")]
pub(crate) mod cuda {
    use super::DropParams;
    use crate::cuda::{self as k, ptx};
    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::cudarc::driver::PushKernelArg;
    use candle_core::{CudaStorage, Layout, Result};

    /// The module of kernels/mixout.cu (also `philox_advance`'s, launched
    /// by `crate::cuda::PhiloxAnchor`).
    pub(crate) const MODULE: &str = "tunefuse_mixout";
    const BLOCK: u32 = 256;

    /// `<op>_<dtype>` (op: mixout, dropout or dropout_add), with the second
    /// operand `u` of mixout and dropout_add.
    pub(super) fn launch(
        op: &'static str,
        d: &DropParams,
        s: &CudaStorage,
        l: &Layout,
        u: Option<(&CudaStorage, &Layout)>,
    ) -> Result<CudaStorage> {
        let dev = s.device.clone();
        let n = l.shape().elem_count();
        let f = k::func(
            &dev,
            MODULE,
            ptx::MIXOUT,
            &format!("{op}_{}", k::suffix(op, s.dtype())?),
        )?;
        k::with_float_type!(op, s.dtype(), T => {
            let x = k::view::<T>(op, s, l)?;
            let uv = u.map(|(s, l)| k::view::<T>(op, s, l)).transpose()?;
            let mut y = k::alloc::<T>(&dev, n)?;
            let n64 = n as i64;
            let (seed, offset, base) = k::philox_args(&dev, d.rng.seed, d.rng.offset);
            let mut b = f.builder();
            b.arg(&x);
            if let Some(uv) = uv.as_ref() {
                b.arg(uv);
            }
            b.arg(&mut y)
                .arg(&n64)
                .arg(&seed)
                .arg(&offset)
                .arg(&base)
                .arg(&d.threshold)
                .arg(&d.scale);
            // One thread per 16 bytes of elements (kernels/mixout.cu).
            let threads = n.div_ceil(k::per_16_bytes(s.dtype()));
            k::launch(&mut b, k::grid_for(threads, BLOCK), BLOCK)?;
            Ok(CudaStorage::wrap_cuda_slice(y, dev.clone()))
        })
    }
}
