//! LayerNorm over the last dimension with a backward pass: one kernel
//! forward, three backward (dx; the weight and bias gradients as chunked
//! column sums), where the composed candle version runs ~15 ops forward and
//! ~30 backward, and candle-nn's fused `layer_norm` has no backward at all
//! (its output carries no gradient to x, weight or bias).
//!
//! # Semantics
//! For each row x of length H (the last dimension):
//! `μ = Σx/H`, `σ² = Σ(x − μ)²/H` (biased, two passes), `r = 1/√(σ² + ε)`,
//! `x̂ = (x − μ)·r`, `y = x̂·w + b`, rounded once to x's dtype.
//! Backward, with `g = dy·w`:
//! `dx = r·(g − mean(g) − x̂·mean(g·x̂))`, `dw = Σ_rows dy·x̂`,
//! `db = Σ_rows dy`.
//!
//! x may be f32, bf16 or f16 (f64 on the CPU); the weight and bias are used
//! in f32 (f64 with f64 x) whatever their dtype — the cast is part of the
//! graph, so their gradients come back in their own dtype — which suits
//! mixed precision's f32 master weights under bf16 activations without a
//! cast kernel. The CPU implementation is the reference: f64 arithmetic,
//! one rounding of each output. The CUDA kernels sum in f32; the forward
//! saves each row's mean and 1/σ (f32) for the backward kernels, which
//! would otherwise recompute exactly those values with two passes over x
//! each.
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, CustomOp3, DType, Layout, Shape, Tensor};

use super::cpu::{from_f64, to_f64};
use crate::error::{check_float_dtype, param_err, shape_err, Error, Result};

/// `x̂·w + b` over the last dimension of `x`; see the module docs.
pub fn layer_norm(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
    const OP: &str = "layer_norm";
    check_float_dtype(OP, "x", x.dtype())?;
    check_float_dtype(OP, "weight", weight.dtype())?;
    check_float_dtype(OP, "bias", bias.dtype())?;
    if x.device().is_cuda() && x.dtype() == DType::F64 {
        return Err(Error::DType {
            op: OP,
            msg: "x is f64: the CUDA kernels take f32, bf16 or f16".into(),
        });
    }
    if !(eps.is_finite() && eps > 0.0) {
        return Err(param_err(
            OP,
            format!("eps must be finite and > 0, got {eps}"),
        ));
    }
    let h = match x.dims().last() {
        Some(&h) if h > 0 => h,
        _ => {
            return Err(shape_err(
                OP,
                format!("x must have a non-empty last dimension, got {:?}", x.dims()),
            ))
        }
    };
    for (t, name) in [(weight, "weight"), (bias, "bias")] {
        if t.dims() != [h] {
            return Err(shape_err(
                OP,
                format!(
                    "{name} has shape {:?}; expected [{h}] (x is {:?})",
                    t.dims(),
                    x.dims()
                ),
            ));
        }
        if !t.device().same_device(x.device()) {
            return Err(Error::Device {
                op: OP,
                msg: format!("{name} is not on x's device"),
            });
        }
    }
    if x.elem_count() == 0 {
        return Ok(x.clone());
    }
    let wdt = super::wide_dtype(x.dtype());
    let (w, b) = (weight.to_dtype(wdt)?, bias.to_dtype(wdt)?);
    let (x, w, b) = (x.contiguous()?, w.contiguous()?, b.contiguous()?);
    let fwd = Fwd {
        eps,
        h,
        // Only a forward that autograd records has a backward to save for.
        #[cfg(feature = "cuda")]
        save: x.track_op() || w.track_op() || b.track_op(),
        #[cfg(feature = "cuda")]
        saved: Default::default(),
    };
    Ok(x.apply_op3(&w, &b, fwd)?)
}

/// The forward's row statistics on CUDA, (mean, rstd) in f32 per row: the
/// backward kernels read them instead of two passes over x each.
#[cfg(feature = "cuda")]
type Saved = std::sync::Arc<candle_core::cuda_backend::cudarc::driver::CudaSlice<f32>>;

struct Fwd {
    eps: f64,
    h: usize,
    /// Whether the CUDA forward saves the statistics.
    #[cfg(feature = "cuda")]
    save: bool,
    /// Set by the CUDA forward (one op per call, so one forward each).
    #[cfg(feature = "cuda")]
    saved: std::sync::Mutex<Option<Saved>>,
}
/// dx from (x, w, dy).
struct Dx {
    eps: f64,
    h: usize,
    #[cfg(feature = "cuda")]
    saved: Option<Saved>,
}
/// `[dw; db]` (shape `[2, H]`, in `dtype`) from (x, dy).
struct Dwb {
    eps: f64,
    h: usize,
    dtype: DType,
    #[cfg(feature = "cuda")]
    saved: Option<Saved>,
}

/// μ and r of each row (f64).
fn stats(x: &[f64], h: usize, eps: f64) -> Vec<(f64, f64)> {
    x.chunks(h)
        .map(|row| {
            let mean = row.iter().sum::<f64>() / h as f64;
            let var = row.iter().map(|v| (v - mean) * (v - mean)).sum::<f64>() / h as f64;
            (mean, 1.0 / (var + eps).sqrt())
        })
        .collect()
}

impl CustomOp3 for Fwd {
    fn name(&self) -> &'static str {
        "tunefuse-layer-norm"
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
        let (x, w, b) = (to_f64(s1, l1)?, to_f64(s2, l2)?, to_f64(s3, l3)?);
        let h = self.h;
        let mut y = Vec::with_capacity(x.len());
        for (row, (mean, r)) in x.chunks(h).zip(stats(&x, h, self.eps)) {
            y.extend(
                row.iter()
                    .enumerate()
                    .map(|(c, v)| (v - mean) * r * w[c] + b[c]),
            );
        }
        Ok((from_f64(y, s1.dtype()), l1.shape().clone()))
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
        let rows = l1.shape().elem_count() / self.h;
        let saved = self
            .save
            .then(|| crate::cuda::alloc::<f32>(&s1.device, 2 * rows).map(std::sync::Arc::new))
            .transpose()?;
        let y = cuda::rows(
            "fwd",
            self.eps,
            self.h,
            (s1, l1),
            (s2, l2),
            (s3, l3),
            saved.as_ref(),
        )?;
        *self.saved.lock().unwrap_or_else(|e| e.into_inner()) = saved;
        Ok((y, l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let dy = dy.contiguous()?;
        let (eps, h) = (self.eps, self.h);
        #[cfg(feature = "cuda")]
        let saved = self.saved.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let dx_op = Dx {
            eps,
            h,
            #[cfg(feature = "cuda")]
            saved: saved.clone(),
        };
        let dx = x
            .track_op()
            .then(|| x.apply_op3_no_bwd(w, &dy, &dx_op))
            .transpose()?;
        if !(w.track_op() || b.track_op()) {
            return Ok((dx, None, None));
        }
        let dtype = w.dtype();
        let dwb_op = Dwb {
            eps,
            h,
            dtype,
            #[cfg(feature = "cuda")]
            saved,
        };
        let dwb = x.apply_op2_no_bwd(&dy, &dwb_op)?;
        Ok((dx, Some(dwb.get(0)?), Some(dwb.get(1)?)))
    }
}

impl CustomOp3 for Dx {
    fn name(&self) -> &'static str {
        "tunefuse-layer-norm-dx"
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
        let (x, w, dy) = (to_f64(s1, l1)?, to_f64(s2, l2)?, to_f64(s3, l3)?);
        let h = self.h;
        let mut dx = Vec::with_capacity(x.len());
        for ((row, d), (mean, r)) in x.chunks(h).zip(dy.chunks(h)).zip(stats(&x, h, self.eps)) {
            let g: Vec<f64> = d.iter().zip(&w).map(|(d, w)| d * w).collect();
            let xh: Vec<f64> = row.iter().map(|v| (v - mean) * r).collect();
            let mg = g.iter().sum::<f64>() / h as f64;
            let mgx = g.iter().zip(&xh).map(|(g, x)| g * x).sum::<f64>() / h as f64;
            dx.extend(g.iter().zip(&xh).map(|(g, x)| r * (g - mg - x * mgx)));
        }
        Ok((from_f64(dx, s1.dtype()), l1.shape().clone()))
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
            cuda::rows(
                "bwd_dx",
                self.eps,
                self.h,
                (s1, l1),
                (s2, l2),
                (s3, l3),
                self.saved.as_ref(),
            )?,
            l1.shape().clone(),
        ))
    }
}

impl CustomOp2 for Dwb {
    fn name(&self) -> &'static str {
        "tunefuse-layer-norm-dwb"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (x, dy) = (to_f64(s1, l1)?, to_f64(s2, l2)?);
        let h = self.h;
        let mut out = vec![0.0; 2 * h];
        for ((row, d), (mean, r)) in x.chunks(h).zip(dy.chunks(h)).zip(stats(&x, h, self.eps)) {
            for c in 0..h {
                out[c] += d[c] * (row[c] - mean) * r;
                out[h + c] += d[c];
            }
        }
        Ok((from_f64(out, self.dtype), Shape::from((2, h))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        if self.dtype != DType::F32 {
            candle_core::bail!("layer_norm: weight gradients are f32 on CUDA");
        }
        Ok((
            cuda::weight_grads(self.eps, self.h, (s1, l1), (s2, l2), self.saved.as_ref())?,
            Shape::from((2, self.h)),
        ))
    }
}

#[cfg(feature = "cuda")]
mod cuda {
    use super::Saved;
    use crate::cuda::{self as k, ptx};
    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::cudarc::driver::{DevicePtr, PushKernelArg};
    use candle_core::{CudaStorage, Layout, Result};

    const MODULE: &str = "tunefuse_layer_norm";
    const BLOCK: u32 = 256;
    /// Rows per block of the row kernels (one warp each) and per partial
    /// sum of the weight gradients; kernels/layer_norm.cu's WARPS and CHUNK.
    const WARPS: usize = 8;
    const CHUNK: usize = 64;

    /// The address of the saved statistics, or null.
    fn stats_ptr(dev: &candle_core::cuda_backend::CudaDevice, saved: Option<&Saved>) -> u64 {
        saved.map_or(0, |s| s.device_ptr(&dev.cuda_stream()).0)
    }

    /// The row kernels: `fwd` (x, w, b → y, writing the row statistics
    /// into `saved` when given) or `bwd_dx` (x, w, dy → dx, reading them
    /// from `saved` when given); the output has x's dtype and shape.
    pub(super) fn rows(
        which: &str,
        eps: f64,
        h: usize,
        x: (&CudaStorage, &Layout),
        w: (&CudaStorage, &Layout),
        third: (&CudaStorage, &Layout),
        saved: Option<&Saved>,
    ) -> Result<CudaStorage> {
        let dev = x.0.device().clone();
        let dtype = x.0.dtype();
        let name = format!("layer_norm_{which}_{}", k::suffix("layer_norm", dtype)?);
        let f = k::func(&dev, MODULE, ptx::LAYER_NORM, &name)?;
        let n = x.1.shape().elem_count();
        let rows = n / h;
        k::with_float_type!("layer_norm", dtype, T => {
            let xv = k::view::<T>("layer_norm", x.0, x.1)?;
            let wv = k::view::<f32>("layer_norm", w.0, w.1)?;
            let mut out = k::alloc::<T>(&dev, n)?;
            let (rows64, h32, eps32) = (rows as i64, h as i32, eps as f32);
            let mut b = f.builder();
            b.arg(&xv).arg(&wv);
            // fwd: the bias (f32); bwd_dx: dy (x's dtype).
            let bv;
            let dv;
            if which == "fwd" {
                bv = k::view::<f32>("layer_norm", third.0, third.1)?;
                b.arg(&bv);
            } else {
                dv = k::view::<T>("layer_norm", third.0, third.1)?;
                b.arg(&dv);
            }
            let stats = stats_ptr(&dev, saved);
            b.arg(&mut out).arg(&stats).arg(&rows64).arg(&h32).arg(&eps32);
            k::launch(&mut b, k::grid_for(rows.div_ceil(WARPS) * BLOCK as usize, BLOCK), BLOCK)?;
            Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()))
        })
    }

    /// `[dw; db]` in f32: partial column sums per CHUNK rows, added in
    /// chunk order by the grid's last block, in one launch.
    pub(super) fn weight_grads(
        eps: f64,
        h: usize,
        x: (&CudaStorage, &Layout),
        dy: (&CudaStorage, &Layout),
        saved: Option<&Saved>,
    ) -> Result<CudaStorage> {
        let dev = x.0.device().clone();
        let dtype = x.0.dtype();
        let rows = x.1.shape().elem_count() / h;
        let chunks = rows.div_ceil(CHUNK);
        if chunks > u32::MAX as usize {
            candle_core::bail!("layer_norm: {rows} rows exceed the grid");
        }
        let name = format!("layer_norm_bwd_wb_{}", k::suffix("layer_norm", dtype)?);
        let f = k::func(&dev, MODULE, ptx::LAYER_NORM, &name)?;
        let mut part = k::alloc::<f32>(&dev, chunks * 2 * h)?;
        let mut out = k::alloc::<f32>(&dev, 2 * h)?;
        let counter = k::ticket_counter(&dev)?;
        k::with_float_type!("layer_norm", dtype, T => {
            let xv = k::view::<T>("layer_norm", x.0, x.1)?;
            let dv = k::view::<T>("layer_norm", dy.0, dy.1)?;
            let (rows64, h32, eps32) = (rows as i64, h as i32, eps as f32);
            let mut b = f.builder();
            let stats = stats_ptr(&dev, saved);
            b.arg(&xv)
                .arg(&dv)
                .arg(&stats)
                .arg(&mut part)
                .arg(&mut out)
                .arg(&*counter)
                .arg(&rows64)
                .arg(&h32)
                .arg(&eps32);
            k::launch(&mut b, chunks as u32, BLOCK)?;
        });
        Ok(CudaStorage::wrap_cuda_slice(out, dev))
    }
}
