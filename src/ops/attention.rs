//! Attention probabilities in one op: `dropout(softmax(s·scale + bias))`
//! over the last dimension, with its own backward.
//!
//! The encoder's attention computed them with four kernels forward (the
//! scale, the mask add, softmax, dropout) and about nine backward
//! (dropout's, softmax's closed form in f32 with its casts, the scale's);
//! this op is one kernel each way on CUDA (kernels/attention.cu), and its
//! backward recomputes the probabilities from the scores instead of
//! keeping them.
//!
//! # Semantics (the CPU op)
//! For scores `s` `[.., L]` (rows `R`, any float dtype T) and `bias`
//! `[B, L]` in any shape with `B·L` elements, `R` a multiple of `B` (row r
//! takes bias row `r / (R/B)`: the `[B, 1, 1, L]` mask of `[B, H, L, L]`
//! scores):
//!
//! ```text
//! z = s·scale + bias                      in W (f64 for f64, else f32)
//! p = round_T(exp(z − max z) / Σ exp(z − max z))   in W
//! y = p                                    without dropout
//! y = keep ? round_T(p ·₃₂ k) : 0          with dropout (k = 1/(1 − prob) in f32,
//!                                          ·₃₂ an f32 product; f64 for f64)
//! ```
//!
//! `keep` is the dropout op's mask for the `R·L` elements with the given
//! [`Rng`] ([`crate::ops::mixout::dropout`] on `p` draws the same bits), so
//! with dropout the op equals that composition given the same `p`. The
//! backward, for an incoming gradient `g`:
//!
//! ```text
//! d = keep ? round_T(g ·₃₂ k) : 0          (g without dropout)
//! ds = round_T(scale · p · (d − Σ d·p))    in W
//! ```
//!
//! and no gradient for `bias` (the mask). W is the arithmetic of the CUDA
//! kernels too (f32); they differ from the CPU op in the exp
//! implementation and the order of the row sums, by a few f32 ulps before
//! the rounding to T.
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, CustomOp3, DType, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::cpu::{bf16_rn, f16_rn, from_f64, to_f32, to_f64};
use super::mixout::{drop_params, DropParams, Rng};
use crate::error::{check_companion, check_float_dtype, param_err, shape_err, Result};
use crate::philox;

/// `dropout(softmax(scores·scale + bias))` over the last dimension (see the
/// module docs). `dropout`: `Some((p, rng))` applies dropout with
/// probability `p` drawn from `rng` (the caller advances its stream by
/// [`philox::counters_for`] of the element count, as for the dropout op);
/// `None` or `p = 0` returns the probabilities.
pub fn attention_probs(
    scores: &Tensor,
    bias: &Tensor,
    scale: f64,
    dropout: Option<(f64, Rng)>,
) -> Result<Tensor> {
    const OP: &str = "attention_probs";
    check_float_dtype(OP, "scores", scores.dtype())?;
    check_companion(OP, (bias, "bias"), (scores, "scores"))?;
    if !scale.is_finite() {
        return Err(param_err(OP, format!("scale must be finite, got {scale}")));
    }
    let l = *scores
        .dims()
        .last()
        .ok_or_else(|| shape_err(OP, "scores must have at least one dimension"))?;
    let rows = scores.elem_count() / l.max(1);
    let brows = bias.elem_count() / l.max(1);
    if l == 0 || rows == 0 {
        return Ok(scores.clone());
    }
    if bias.elem_count() != brows * l || brows == 0 || !rows.is_multiple_of(brows) {
        return Err(shape_err(
            OP,
            format!(
                "bias {:?} is not [B, {l}] rows for scores {:?} (rows a multiple of B)",
                bias.dims(),
                scores.dims()
            ),
        ));
    }
    if l > i32::MAX as usize {
        return Err(shape_err(OP, format!("rows of {l} elements are too long")));
    }
    let drop = match dropout {
        Some((p, rng)) if p != 0.0 => Some(drop_params(OP, p, rng)?),
        Some((p, rng)) => {
            drop_params(OP, p, rng)?;
            None
        }
        None => None,
    };
    let op = Probs(Cfg {
        scale,
        l,
        rows_per_bias: rows / brows,
        drop,
    });
    Ok(scores.contiguous()?.apply_op2(&bias.contiguous()?, op)?)
}

#[derive(Clone, Copy, Debug)]
struct Cfg {
    scale: f64,
    l: usize,
    rows_per_bias: usize,
    drop: Option<DropParams>,
}

struct Probs(Cfg);
struct ProbsGrad(Cfg);

/// `x` rounded to `dtype` (as an f64).
pub(super) fn round(dtype: DType, x: f64) -> f64 {
    match dtype {
        DType::F64 => x,
        DType::F32 => x as f32 as f64,
        DType::BF16 => bf16_rn(x).to_f64(),
        _ => f16_rn(x).to_f64(),
    }
}

/// `x ·₃₂ k` rounded to `dtype`: the dropout op's product (f64 for f64).
pub(super) fn dropped(dtype: DType, x: f64, d: &DropParams) -> f64 {
    match dtype {
        DType::F64 => x * (d.scale as f64),
        _ => round(dtype, ((x as f32) * d.scale) as f64),
    }
}

/// The arithmetic type of the CPU op: f64 for f64 tensors, f32 otherwise
/// (what the kernels use).
pub(super) trait Real:
    Copy
    + Send
    + Sync
    + PartialOrd
    + std::ops::Add<Output = Self>
    + std::ops::Sub<Output = Self>
    + std::ops::Mul<Output = Self>
    + std::ops::Div<Output = Self>
{
    const ZERO: Self;
    const NEG_INF: Self;
    fn of(x: f64) -> Self;
    fn wide(self) -> f64;
    fn exp(self) -> Self;
    /// A storage's elements in this type (exact).
    fn read(s: &CpuStorage, l: &Layout) -> candle_core::Result<Vec<Self>>;
}

impl Real for f32 {
    const ZERO: Self = 0.0;
    const NEG_INF: Self = f32::NEG_INFINITY;
    fn of(x: f64) -> Self {
        x as f32
    }
    fn wide(self) -> f64 {
        self as f64
    }
    fn exp(self) -> Self {
        f32::exp(self)
    }
    fn read(s: &CpuStorage, l: &Layout) -> candle_core::Result<Vec<Self>> {
        to_f32(s, l)
    }
}

impl Real for f64 {
    const ZERO: Self = 0.0;
    const NEG_INF: Self = f64::NEG_INFINITY;
    fn of(x: f64) -> Self {
        x
    }
    fn wide(self) -> f64 {
        self
    }
    fn exp(self) -> Self {
        f64::exp(self)
    }
    fn read(s: &CpuStorage, l: &Layout) -> candle_core::Result<Vec<Self>> {
        to_f64(s, l)
    }
}

/// The dropout op's keep mask of elements `first..first + n` of a call.
pub(super) fn keep_run(d: &DropParams, first: usize, n: usize) -> Vec<bool> {
    // fill_words starts at a whole Philox block (a multiple of 4).
    let skip = first % 4;
    let mut words = vec![0u32; skip + n];
    philox::fill_words(d.rng.seed, d.rng.offset, (first - skip) as u64, &mut words);
    words[skip..]
        .iter()
        .map(|&w| philox::kept(w, d.threshold))
        .collect()
}

impl Cfg {
    /// Row `r`'s probabilities, rounded to `dtype`.
    fn probs<R: Real>(&self, dtype: DType, s: &[R], bias: &[R], r: usize, out: &mut [R]) {
        let l = self.l;
        let b = &bias[(r / self.rows_per_bias) * l..][..l];
        let scale = R::of(self.scale);
        for ((o, &x), &m) in out.iter_mut().zip(&s[r * l..][..l]).zip(b) {
            *o = x * scale + m;
        }
        let m = out
            .iter()
            .copied()
            .fold(R::NEG_INF, |a, b| if b > a { b } else { a });
        let mut sum = R::ZERO;
        for o in out.iter_mut() {
            *o = (*o - m).exp();
            sum = sum + *o;
        }
        for o in out.iter_mut() {
            *o = R::of(round(dtype, (*o / sum).wide()));
        }
    }

    /// The keep mask of row `r`.
    fn keep(&self, d: &DropParams, r: usize) -> Vec<bool> {
        keep_run(d, r * self.l, self.l)
    }

    /// The CPU op on storages, in the arithmetic type of their dtype: the
    /// forward, or with the incoming gradient `g` the backward.
    fn cpu(
        &self,
        s: (&CpuStorage, &Layout),
        bias: (&CpuStorage, &Layout),
        g: Option<&[f64]>,
    ) -> candle_core::Result<CpuStorage> {
        fn go<R: Real>(
            c: &Cfg,
            s: (&CpuStorage, &Layout),
            bias: (&CpuStorage, &Layout),
            g: Option<&[f64]>,
        ) -> candle_core::Result<Vec<f64>> {
            let dtype = s.0.dtype();
            let (s, b) = (R::read(s.0, s.1)?, R::read(bias.0, bias.1)?);
            Ok(match g {
                None => c.forward_cpu(dtype, &s, &b),
                Some(g) => c.backward_cpu(dtype, &s, &b, g),
            })
        }
        let dtype = s.0.dtype();
        let out = match dtype {
            DType::F64 => go::<f64>(self, s, bias, g)?,
            _ => go::<f32>(self, s, bias, g)?,
        };
        Ok(from_f64(out, dtype))
    }

    fn forward_cpu<R: Real>(&self, dtype: DType, s: &[R], bias: &[R]) -> Vec<f64> {
        let mut y = vec![0.0; s.len()];
        y.par_chunks_mut(self.l).enumerate().for_each(|(r, out)| {
            let mut p = vec![R::ZERO; self.l];
            self.probs(dtype, s, bias, r, &mut p);
            for (o, pi) in out.iter_mut().zip(&p) {
                *o = pi.wide();
            }
            if let Some(d) = &self.drop {
                for (o, k) in out.iter_mut().zip(self.keep(d, r)) {
                    *o = if k { dropped(dtype, *o, d) } else { 0.0 };
                }
            }
        });
        y
    }

    fn backward_cpu<R: Real>(&self, dtype: DType, s: &[R], bias: &[R], g: &[f64]) -> Vec<f64> {
        let l = self.l;
        let scale = R::of(self.scale);
        let mut ds = vec![0.0; s.len()];
        ds.par_chunks_mut(l).enumerate().for_each(|(r, out)| {
            let mut p = vec![R::ZERO; l];
            self.probs(dtype, s, bias, r, &mut p);
            let gr = &g[r * l..][..l];
            let d: Vec<R> = match &self.drop {
                None => gr.iter().map(|&x| R::of(x)).collect(),
                Some(dp) => gr
                    .iter()
                    .zip(self.keep(dp, r))
                    .map(|(&x, k)| R::of(if k { dropped(dtype, x, dp) } else { 0.0 }))
                    .collect(),
            };
            let mut dot = R::ZERO;
            for (a, b) in d.iter().zip(&p) {
                dot = dot + *a * *b;
            }
            for ((o, &di), &pi) in out.iter_mut().zip(&d).zip(&p) {
                *o = round(dtype, (scale * pi * (di - dot)).wide());
            }
        });
        ds
    }
}

impl CustomOp2 for Probs {
    fn name(&self) -> &'static str {
        "tunefuse-attention-probs"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        Ok((self.0.cpu((s1, l1), (s2, l2), None)?, l1.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        Ok((
            cuda::launch(&self.0, (s1, l1), (s2, l2), None)?,
            l1.shape().clone(),
        ))
    }

    fn bwd(
        &self,
        s: &Tensor,
        bias: &Tensor,
        _y: &Tensor,
        g: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let ds = s.apply_op3_no_bwd(bias, &g.contiguous()?, &ProbsGrad(self.0))?;
        Ok((Some(ds), None))
    }
}

impl CustomOp3 for ProbsGrad {
    fn name(&self) -> &'static str {
        "tunefuse-attention-probs-grad"
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
        let g = to_f64(s3, l3)?;
        Ok((
            self.0.cpu((s1, l1), (s2, l2), Some(&g))?,
            l1.shape().clone(),
        ))
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
        Ok((
            cuda::launch(&self.0, (s1, l1), (s2, l2), Some((s3, l3)))?,
            l1.shape().clone(),
        ))
    }
}

#[cfg(feature = "cuda")]
mod cuda {
    use super::Cfg;
    use crate::cuda::{self as k, ptx};
    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::cudarc::driver::PushKernelArg;
    use candle_core::{CudaStorage, Layout, Result};

    const MODULE: &str = "tunefuse_attention";
    /// Four warps, one row each.
    const BLOCK: u32 = 128;

    /// `attn_probs_fwd_<dtype>`, or with the incoming gradient
    /// `attn_probs_bwd_<dtype>`.
    pub(super) fn launch(
        c: &Cfg,
        s: (&CudaStorage, &Layout),
        bias: (&CudaStorage, &Layout),
        g: Option<(&CudaStorage, &Layout)>,
    ) -> Result<CudaStorage> {
        const OP: &str = "attention_probs";
        let dev = s.0.device.clone();
        let dtype = s.0.dtype();
        let n = s.1.shape().elem_count();
        let rows = n / c.l;
        let which = if g.is_some() { "bwd" } else { "fwd" };
        let f = k::func(
            &dev,
            MODULE,
            ptx::ATTENTION,
            &format!("attn_probs_{which}_{}", k::suffix(OP, dtype)?),
        )?;
        k::with_float_type!(OP, dtype, T => {
            let sv = k::view::<T>(OP, s.0, s.1)?;
            let bv = k::view::<T>(OP, bias.0, bias.1)?;
            let gv = g.map(|(gs, gl)| k::view::<T>(OP, gs, gl)).transpose()?;
            let mut y = k::alloc::<T>(&dev, n)?;
            let (rows64, l32, rpb) = (rows as i64, c.l as i32, c.rows_per_bias as i64);
            let scale = c.scale as f32;
            let drop = i32::from(c.drop.is_some());
            let ((seed, offset, base), threshold, dscale) = match &c.drop {
                Some(d) => (k::philox_args(&dev, d.rng.seed, d.rng.offset), d.threshold, d.scale),
                None => ((0u64, 0u64, 0u64), 0u32, 1f32),
            };
            let mut b = f.builder();
            b.arg(&sv).arg(&bv);
            if let Some(gv) = gv.as_ref() {
                b.arg(gv);
            }
            b.arg(&mut y)
                .arg(&rows64)
                .arg(&l32)
                .arg(&rpb)
                .arg(&scale)
                .arg(&drop)
                .arg(&seed)
                .arg(&offset)
                .arg(&base)
                .arg(&threshold)
                .arg(&dscale);
            let warps = (BLOCK / 32) as usize;
            k::launch(&mut b, rows.div_ceil(warps) as u32, BLOCK)?;
            Ok(CudaStorage::wrap_cuda_slice(y, dev.clone()))
        })
    }
}
