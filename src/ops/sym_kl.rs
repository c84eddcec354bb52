//! Symmetric KL between two sets of logits (R3F, SMART) and the
//! one-directional KL of SMART's inner ascent loop.
//!
//! For logits `a, b` of shape `[..., V]` (rows = product of the leading dims),
//! p = softmax(a), q = softmax(b) per row, d = a − b:
//!
//! * `sym_kl`: `KL(p‖q) + KL(q‖p) = Σ (p − q)·d` per row, with gradients
//!   - [`SymKlGrad::Full`] (R3F): `∂a = p⊙(d − E_p[d]) + (p − q)`,
//!     `∂b = q⊙(E_q[d] − d) + (q − p)`;
//!   - [`SymKlGrad::Detached`] (SMART, mt-dnn `SymKlCriterion`): each KL's
//!     target is detached, `∂a = p − q`, `∂b = q − p`.
//! * `kl(input, target)`: PyTorch's `F.kl_div(log_softmax(input),
//!   softmax(target))`, i.e. `KL(softmax(target) ‖ softmax(input))`, with a
//!   gradient to `input` only: `softmax(input) − softmax(target)`.
//!
//! Reductions: [`Reduction::BatchMean`] (sum over counted rows / their number,
//! 0 when no row counts), [`Reduction::Sum`], [`Reduction::None`] (one value
//! per row, shape = leading dims). An optional row mask (any dtype, one entry
//! per row, non-zero = counted) drops rows: their loss and gradients are 0.
//! Entries whose softmax weight is exactly 0 contribute nothing, so a
//! vocabulary entry that is −inf in both inputs is ignored; NaN propagates to
//! the loss. The loss is f32 (f64 for f64 inputs on CPU); gradients have the
//! inputs' dtype.
//!
//! On CUDA, when an input takes part in autograd, the forward kernel also
//! writes the gradients (one pass over the logits for loss and gradients),
//! computed for an incoming gradient of [`SymKlOptions::expected_grad`];
//! backward then only rescales rows whose incoming gradient differs from it,
//! so pass `expected_grad = λ` when the loss enters the objective as `λ·loss`.
//! A rescaled gradient is rounded twice (to the dtype for `expected_grad`,
//! then after scaling by k = incoming / expected): up to about (|k| + 1)/2
//! units in the last place instead of 1/2, which in f16's subnormal range
//! (|g| < 6.1e-5) is an absolute (|k| + 1)·3e-8. Measured on an H200: `kl`
//! (whose expected gradient is 1) under an incoming 2.5 with batchmean gave
//! 2⁻²³ where 2.23e-7 was due. Rows whose incoming gradient equals the
//! expected one are left untouched, so matching `expected_grad` avoids it.
//! On CPU, `cpu_fwd` and the gradient op's CPU code below are the reference
//! that defines these semantics.
//!
//! # Example: an R3F-style penalty `λ·sym_kl(clean, noisy)`
//! ```
//! use candle_core::{Device, Tensor, Var};
//! use tunefuse::ops::sym_kl::{sym_kl, SymKlGrad, SymKlOptions};
//!
//! # fn main() -> tunefuse::Result<()> {
//! let dev = Device::Cpu;
//! let clean = Var::from_tensor(&Tensor::randn(0f32, 1.0, (8, 2), &dev)?)?;
//! let noisy = Var::from_tensor(&Tensor::randn(0f32, 1.0, (8, 2), &dev)?)?;
//! let lambda = 0.5f32;
//! let opts = SymKlOptions { grad: SymKlGrad::Full, expected_grad: lambda, ..Default::default() };
//! let penalty = (sym_kl(clean.as_tensor(), noisy.as_tensor(), &opts)? * lambda as f64)?;
//! let grads = penalty.backward()?;
//! assert_eq!(grads.get(clean.as_tensor()).unwrap().dims(), &[8, 2]);
//! # Ok(())
//! # }
//! ```
use std::sync::Mutex;

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, CustomOp3, DType, Layout, Shape, Tensor};

use super::cpu::{from_f64, to_f64};
use crate::error::{check_float_dtype, check_same, param_err, shape_err, Result};

/// Gradient convention of [`sym_kl`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum SymKlGrad {
    /// Gradients through both sides (R3F).
    #[default]
    Full,
    /// Each KL term's target detached (SMART / mt-dnn).
    Detached,
}

/// How per-row losses are combined.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Reduction {
    /// Sum over counted rows divided by their number (0 if none counts).
    #[default]
    BatchMean,
    /// Sum over counted rows.
    Sum,
    /// One loss per row.
    None,
}

/// Options of [`sym_kl`].
#[derive(Clone, Debug)]
pub struct SymKlOptions {
    /// Which sides the gradient flows to.
    pub grad: SymKlGrad,
    /// How rows are reduced.
    pub reduction: Reduction,
    /// One entry per row (shape = leading dims of the logits); 0 drops a row.
    pub row_mask: Option<Tensor>,
    /// The gradient the loss is expected to receive in backward (λ when the
    /// objective holds `λ·loss`). Only a performance hint: any other incoming
    /// gradient gives the same result, at the price of one more pass.
    pub expected_grad: f32,
}

impl Default for SymKlOptions {
    fn default() -> Self {
        Self {
            grad: SymKlGrad::Full,
            reduction: Reduction::BatchMean,
            row_mask: None,
            expected_grad: 1.0,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    SymFull = 0,
    SymDetached = 1,
    Kl = 2,
}

impl Mode {
    fn grads(self) -> usize {
        if self == Mode::Kl {
            1
        } else {
            2
        }
    }
}

/// Symmetric KL between logits `a` and `b` (same shape `[..., V]`, same
/// dtype and device). See the module docs for the math.
pub fn sym_kl(a: &Tensor, b: &Tensor, opts: &SymKlOptions) -> Result<Tensor> {
    let mode = match opts.grad {
        SymKlGrad::Full => Mode::SymFull,
        SymKlGrad::Detached => Mode::SymDetached,
    };
    run(
        "sym_kl",
        mode,
        a,
        b,
        opts.reduction,
        opts.row_mask.as_ref(),
        opts.expected_grad,
    )
}

/// `KL(softmax(target) ‖ softmax(input))` with a gradient to `input` only
/// (PyTorch's `kl_div(log_softmax(input), softmax(target))`).
pub fn kl(
    input: &Tensor,
    target: &Tensor,
    reduction: Reduction,
    row_mask: Option<&Tensor>,
) -> Result<Tensor> {
    run(
        "kl",
        Mode::Kl,
        input,
        &target.detach(),
        reduction,
        row_mask,
        1.0,
    )
}

fn run(
    name: &'static str,
    mode: Mode,
    a: &Tensor,
    b: &Tensor,
    reduction: Reduction,
    row_mask: Option<&Tensor>,
    expected_grad: f32,
) -> Result<Tensor> {
    check_same(name, a, b, ("a", "b"))?;
    check_float_dtype(name, "a", a.dtype())?;
    let dims = a.dims();
    let Some((&v, lead)) = dims.split_last() else {
        return Err(shape_err(
            name,
            "logits must have at least one dimension [.., V], got a scalar",
        ));
    };
    if v == 0 {
        return Err(shape_err(
            name,
            format!("V = 0: logits of shape {dims:?} have an empty last dimension"),
        ));
    }
    let rows: usize = lead.iter().product();
    if !expected_grad.is_finite() || expected_grad == 0.0 {
        return Err(param_err(
            name,
            format!("expected_grad must be finite and non-zero, got {expected_grad}"),
        ));
    }
    let mask = match row_mask {
        None => None,
        Some(m) => {
            if m.elem_count() != rows {
                return Err(shape_err(
                    name,
                    format!("row mask has shape {:?} ({} entries) but the logits {dims:?} have {rows} rows", m.dims(), m.elem_count()),
                ));
            }
            if !m.device().same_device(a.device()) {
                return Err(crate::Error::Device {
                    op: name,
                    msg: "row mask is not on the logits' device".into(),
                });
            }
            Some(
                m.detach()
                    .flatten_all()?
                    .to_dtype(DType::F32)?
                    .contiguous()?,
            )
        }
    };
    let out_shape: Vec<usize> = if reduction == Reduction::None {
        lead.to_vec()
    } else {
        vec![]
    };
    let fuse = a.device().is_cuda() && (a.track_op() || (mode != Mode::Kl && b.track_op()));
    let op = KlOp {
        cfg: Cfg {
            mode,
            reduction,
            rows,
            v,
            mask,
            expected_grad,
        },
        out_shape,
        fuse,
        cache: Mutex::new(None),
    };
    Ok(a.contiguous()?.apply_op2(&b.contiguous()?, op)?)
}

#[derive(Clone, Debug)]
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
struct Cfg {
    mode: Mode,
    reduction: Reduction,
    rows: usize,
    v: usize,
    mask: Option<Tensor>,
    expected_grad: f32,
}

impl Cfg {
    fn counted(&self, mask: &Option<Vec<f32>>, r: usize) -> bool {
        mask.as_ref().is_none_or(|m| m[r] != 0.0)
    }

    fn mask_host(&self) -> candle_core::Result<Option<Vec<f32>>> {
        self.mask.as_ref().map(|m| m.to_vec1::<f32>()).transpose()
    }

    /// Factor every row's loss is multiplied by in the reduced loss.
    fn row_weight(&self, mask: &Option<Vec<f32>>) -> f64 {
        match self.reduction {
            Reduction::BatchMean => {
                let n = (0..self.rows).filter(|&r| self.counted(mask, r)).count();
                1.0 / n.max(1) as f64
            }
            Reduction::Sum | Reduction::None => 1.0,
        }
    }
}

#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
struct KlOp {
    cfg: Cfg,
    out_shape: Vec<usize>,
    fuse: bool,
    /// Gradients written by the CUDA forward (fused mode), taken by backward.
    #[cfg(feature = "cuda")]
    cache: Mutex<Option<Vec<candle_core::CudaStorage>>>,
    #[cfg(not(feature = "cuda"))]
    cache: Mutex<Option<()>>,
}

// ---------------------------------------------------------------- reference

/// Per-row statistics of the reference: log-sum-exp of a and b.
fn lse(x: &[f64]) -> f64 {
    let m = x.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    if m == f64::NEG_INFINITY {
        return m;
    }
    m + x.iter().map(|&v| (v - m).exp()).sum::<f64>().ln()
}

/// `w·x`, exactly 0 when the weight is 0 (x may be infinite there).
fn wterm(w: f64, x: f64) -> f64 {
    if w == 0.0 {
        0.0
    } else {
        w * x
    }
}

fn softmax(x: &[f64]) -> Vec<f64> {
    let l = lse(x);
    x.iter().map(|&v| (v - l).exp()).collect()
}

/// The loss of one row.
fn row_loss(mode: Mode, a: &[f64], b: &[f64]) -> f64 {
    let (la, lb) = (lse(a), lse(b));
    let mut s = 0.0;
    for (&x, &y) in a.iter().zip(b) {
        let (p, q) = ((x - la).exp(), (y - lb).exp());
        s += match mode {
            // Σ (p − q)(a − b)
            Mode::SymFull | Mode::SymDetached => wterm(p, x - y) - wterm(q, x - y),
            // Σ q (log q − log p)
            Mode::Kl => wterm(q, (y - lb) - (x - la)),
        };
    }
    s
}

/// Gradients of one row's loss times `f`: (∂a, ∂b).
fn row_grad(mode: Mode, a: &[f64], b: &[f64], f: f64, ga: &mut [f64], gb: &mut [f64]) {
    let (p, q) = (softmax(a), softmax(b));
    let d: Vec<f64> = a.iter().zip(b).map(|(x, y)| x - y).collect();
    let ep: f64 = p.iter().zip(&d).map(|(&w, &x)| wterm(w, x)).sum();
    let eq: f64 = q.iter().zip(&d).map(|(&w, &x)| wterm(w, x)).sum();
    for i in 0..a.len() {
        let (g_a, g_b) = match mode {
            Mode::SymFull => (
                wterm(p[i], d[i] - ep) + (p[i] - q[i]),
                wterm(q[i], eq - d[i]) + (q[i] - p[i]),
            ),
            Mode::SymDetached | Mode::Kl => (p[i] - q[i], q[i] - p[i]),
        };
        ga[i] = f * g_a;
        gb[i] = f * g_b;
    }
}

impl CustomOp2 for KlOp {
    fn name(&self) -> &'static str {
        "tunefuse-sym-kl"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let c = &self.cfg;
        let (a, b) = (to_f64(s1, l1)?, to_f64(s2, l2)?);
        let mask = c.mask_host()?;
        let per_row: Vec<f64> = (0..c.rows)
            .map(|r| {
                if c.counted(&mask, r) {
                    row_loss(
                        c.mode,
                        &a[r * c.v..(r + 1) * c.v],
                        &b[r * c.v..(r + 1) * c.v],
                    )
                } else {
                    0.0
                }
            })
            .collect();
        let out = if c.reduction == Reduction::None {
            per_row
        } else {
            vec![per_row.iter().sum::<f64>() * c.row_weight(&mask)]
        };
        Ok((
            from_f64(out, super::wide_dtype(s1.dtype())),
            Shape::from(self.out_shape.clone()),
        ))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let (loss, grads) = cuda::forward(&self.cfg, s1, l1, s2, l2, self.fuse)?;
        if let Some(g) = grads {
            *self.cache.lock().unwrap() = Some(g);
        }
        Ok((loss, Shape::from(self.out_shape.clone())))
    }

    fn bwd(
        &self,
        a: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let c = &self.cfg;
        #[cfg(feature = "cuda")]
        {
            let cached = self.cache.lock().unwrap().take();
            if let Some(g) = cached {
                let mut g = cuda::rescale(c, g, grad_res, a.dims())?;
                let ga = g.remove(0);
                return Ok((Some(ga), g.pop()));
            }
        }
        let g = a.apply_op3_no_bwd(b, &grad_res.contiguous()?, &KlGradOp { cfg: c.clone() })?;
        let ga = g.get(0)?;
        let gb = if c.mode.grads() == 2 {
            Some(g.get(1)?)
        } else {
            None
        };
        Ok((Some(ga), gb))
    }
}

/// Gradients of the loss for an incoming gradient `grad_res` (scalar for the
/// reduced losses, one per row for `None`): output `[k, ..a.dims()]`, k = 2
/// for the symmetric modes (∂a, ∂b), 1 for `kl` (∂input).
struct KlGradOp {
    cfg: Cfg,
}

impl CustomOp3 for KlGradOp {
    fn name(&self) -> &'static str {
        "tunefuse-sym-kl-grad"
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
        let c = &self.cfg;
        let (a, b, g) = (to_f64(s1, l1)?, to_f64(s2, l2)?, to_f64(s3, l3)?);
        let mask = c.mask_host()?;
        let w = c.row_weight(&mask);
        let n = c.rows * c.v;
        let k = c.mode.grads();
        let mut out = vec![0.0; k * n];
        let (oa, ob) = out.split_at_mut(n);
        let mut scratch = vec![0.0; c.v];
        for r in 0..c.rows {
            if !c.counted(&mask, r) {
                continue;
            }
            let f = w * if c.reduction == Reduction::None {
                g[r]
            } else {
                g[0]
            };
            let rg = r * c.v..(r + 1) * c.v;
            let gb = if k == 2 {
                &mut ob[rg.clone()]
            } else {
                &mut scratch[..]
            };
            row_grad(c.mode, &a[rg.clone()], &b[rg.clone()], f, &mut oa[rg], gb);
        }
        let mut shape = vec![k];
        shape.extend(l1.dims());
        Ok((from_f64(out, s1.dtype()), Shape::from(shape)))
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
        let out = cuda::grad(&self.cfg, s1, l1, s2, l2, s3, l3)?;
        let mut shape = vec![self.cfg.mode.grads()];
        shape.extend(l1.dims());
        Ok((out, Shape::from(shape)))
    }
}

#[cfg(feature = "cuda")]
mod cuda {
    use super::{Cfg, Reduction};
    use crate::cuda::{self as k, ptx};
    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::cudarc::driver::{
        CudaSlice, CudaView, CudaViewMut, DeviceRepr, PushKernelArg,
    };
    use candle_core::cuda_backend::{CudaDType, CudaDevice};
    use candle_core::{CudaStorage, DType, Layout, Result, Storage, Tensor};

    const MODULE: &str = "tunefuse_sym_kl";

    /// Host-side part of the reduction weight (1/rows for batchmean without
    /// a mask) and whether the device must count the masked rows instead.
    fn weights(c: &Cfg) -> (f32, bool) {
        match (c.reduction, c.mask.is_some()) {
            (Reduction::BatchMean, false) => (1.0 / c.rows.max(1) as f32, false),
            (Reduction::BatchMean, true) => (1.0, true),
            _ => (1.0, false),
        }
    }

    fn cuda_view<'a>(what: &str, s: &'a Storage, l: &Layout) -> Result<CudaView<'a, f32>> {
        match s {
            Storage::Cuda(cs) => k::view::<f32>("sym_kl", cs, l),
            _ => candle_core::bail!("sym_kl: {what} is not on the CUDA device"),
        }
    }

    fn inv_count(
        dev: &CudaDevice,
        c: &Cfg,
        mask: Option<&CudaView<'_, f32>>,
    ) -> Result<Option<CudaSlice<f32>>> {
        let Some(mask) = mask.filter(|_| weights(c).1) else {
            return Ok(None);
        };
        let mut out = k::alloc::<f32>(dev, 1)?;
        let f = k::func(dev, MODULE, ptx::SYM_KL, "sym_kl_inv_count")?;
        let rows = c.rows as i64;
        let mut b = f.builder();
        b.arg(mask).arg(&rows).arg(&mut out);
        k::launch(&mut b, 1, 1024)?;
        Ok(Some(out))
    }

    /// Everything one launch of the main kernel reads and writes.
    struct Args<'v, T> {
        a: CudaView<'v, T>,
        b: CudaView<'v, T>,
        /// 16-byte accesses possible: candle's allocations are at least
        /// 256-byte aligned, so only the views' start offsets matter.
        aligned: bool,
        mask: Option<&'v CudaView<'v, f32>>,
        gscale: Option<(CudaView<'v, f32>, i64)>,
        inv: Option<CudaView<'v, f32>>,
        gmul: f32,
    }

    fn launch_main<T: CudaDType + DeviceRepr + candle_core::WithDType>(
        dev: &CudaDevice,
        c: &Cfg,
        x: &Args<'_, T>,
        loss: Option<&mut CudaViewMut<'_, f32>>,
        ga: Option<&mut CudaViewMut<'_, T>>,
        gb: Option<&mut CudaViewMut<'_, T>>,
    ) -> Result<()> {
        let warp = c.v <= 1024;
        let name = format!(
            "sym_kl_{}_{}_{}",
            k::suffix("sym_kl", T::DTYPE)?,
            if x.aligned { "vw" } else { "v1" },
            if warp { "warp" } else { "block" }
        );
        let f = k::func(dev, MODULE, ptx::SYM_KL, &name)?;
        let (rows, v, mode) = (c.rows as i64, c.v as i64, c.mode as i32);
        let stride = x.gscale.as_ref().map(|g| g.1).unwrap_or(0);
        let mut bld = f.builder();
        bld.arg(&x.a).arg(&x.b).arg(&rows).arg(&v);
        k::arg_opt(&mut bld, x.mask);
        k::arg_opt(&mut bld, x.gscale.as_ref().map(|g| &g.0));
        bld.arg(&stride);
        k::arg_opt(&mut bld, x.inv.as_ref());
        bld.arg(&x.gmul).arg(&mode);
        k::arg_opt_mut(&mut bld, loss);
        k::arg_opt_mut(&mut bld, ga);
        k::arg_opt_mut(&mut bld, gb);
        // Warp mode: 8 rows per 256-thread block; block mode: a row per block.
        let (grid, block) = if warp {
            (c.rows.div_ceil(8), 256)
        } else {
            (c.rows, 1024)
        };
        k::launch(&mut bld, grid as u32, block)
    }

    fn aligned<T>(offsets: &[usize]) -> bool {
        offsets
            .iter()
            .all(|o| (o * std::mem::size_of::<T>()).is_multiple_of(16))
    }

    /// Per-row or reduced loss; with `fuse`, also the gradients for an
    /// incoming gradient of `expected_grad`.
    pub(super) fn forward(
        c: &Cfg,
        s1: &CudaStorage,
        l1: &Layout,
        s2: &CudaStorage,
        l2: &Layout,
        fuse: bool,
    ) -> Result<(CudaStorage, Option<Vec<CudaStorage>>)> {
        let dev = s1.device.clone();
        let guard = c.mask.as_ref().map(|m| m.storage_and_layout());
        let mask = guard
            .as_ref()
            .map(|g| cuda_view("row mask", &g.0, g.1))
            .transpose()?;
        let inv = inv_count(&dev, c, mask.as_ref())?;
        let (w, _) = weights(c);
        let mut per_row = k::alloc::<f32>(&dev, c.rows)?;
        let n = c.rows * c.v;
        let grads = k::with_float_type!("sym_kl", s1.dtype(), T => {
                let x = Args::<T> {
                    a: k::view("sym_kl", s1, l1)?,
                    b: k::view("sym_kl", s2, l2)?,
                    aligned: aligned::<T>(&[l1.start_offset(), l2.start_offset()]),
                    mask: mask.as_ref(),
                    gscale: None,
                    inv: inv.as_ref().map(|s| s.slice(..)),
                    gmul: c.expected_grad * w,
                };
                let mut ga = if fuse { Some(k::alloc::<T>(&dev, n)?) } else { None };
                let mut gb = if fuse && c.mode.grads() == 2 { Some(k::alloc::<T>(&dev, n)?) } else { None };
                launch_main(
                    &dev,
                    c,
                    &x,
                    Some(&mut per_row.slice_mut(..)),
                    ga.as_mut().map(|g| g.slice_mut(..)).as_mut(),
                    gb.as_mut().map(|g| g.slice_mut(..)).as_mut(),
                )?;
                let grads: Vec<CudaStorage> = ga
                    .into_iter()
                    .chain(gb)
                    .map(|g| CudaStorage::wrap_cuda_slice(g, dev.clone()))
                    .collect();
                (!grads.is_empty()).then_some(grads)
        });
        let loss = if c.reduction == Reduction::None {
            per_row
        } else {
            let mut out = k::alloc::<f32>(&dev, 1)?;
            let f = k::func(&dev, MODULE, ptx::SYM_KL, "sym_kl_reduce")?;
            let rows = c.rows as i64;
            let inv_v = inv.as_ref().map(|s| s.slice(..));
            let mut b = f.builder();
            b.arg(&per_row).arg(&rows);
            k::arg_opt(&mut b, inv_v.as_ref());
            b.arg(&w).arg(&mut out);
            k::launch(&mut b, 1, 1024)?;
            out
        };
        Ok((CudaStorage::wrap_cuda_slice(loss, dev), grads))
    }

    /// Backward from gradients cached by the forward: rows whose incoming
    /// gradient differs from `expected_grad` are rescaled in place.
    pub(super) fn rescale(
        c: &Cfg,
        grads: Vec<CudaStorage>,
        grad_res: &Tensor,
        dims: &[usize],
    ) -> Result<Vec<Tensor>> {
        let grad_res = grad_res.to_dtype(DType::F32)?.contiguous()?;
        let guard = grad_res.storage_and_layout();
        let gview = cuda_view("incoming gradient", &guard.0, guard.1)?;
        let stride: i64 = if c.reduction == Reduction::None { 1 } else { 0 };
        let (rows, v) = (c.rows as i64, c.v as i64);
        let mut out = Vec::new();
        for mut g in grads {
            let dev = g.device.clone();
            let name = format!("sym_kl_rescale_{}", k::suffix("sym_kl", g.dtype())?);
            let f = k::func(&dev, MODULE, ptx::SYM_KL, &name)?;
            k::with_float_type!("sym_kl", g.dtype(), T => {
                let s = g.as_cuda_slice_mut::<T>()?;
                let mut b = f.builder();
                b.arg(s).arg(&rows).arg(&v).arg(&gview).arg(&stride).arg(&c.expected_grad);
                k::launch(&mut b, k::grid_for(c.rows, 1), 256)?;
            });
            out.push(Tensor::from_storage(
                Storage::Cuda(g),
                dims,
                candle_core::op::BackpropOp::none(),
                false,
            ));
        }
        Ok(out)
    }

    /// Gradients for the incoming gradient in `s3`, as `[k, rows·V]`.
    pub(super) fn grad(
        c: &Cfg,
        s1: &CudaStorage,
        l1: &Layout,
        s2: &CudaStorage,
        l2: &Layout,
        s3: &CudaStorage,
        l3: &Layout,
    ) -> Result<CudaStorage> {
        let dev = s1.device.clone();
        let guard = c.mask.as_ref().map(|m| m.storage_and_layout());
        let mask = guard
            .as_ref()
            .map(|g| cuda_view("row mask", &g.0, g.1))
            .transpose()?;
        let inv = inv_count(&dev, c, mask.as_ref())?;
        let stride: i64 = if c.reduction == Reduction::None { 1 } else { 0 };
        let n = c.rows * c.v;
        Ok(k::with_float_type!("sym_kl", s1.dtype(), T => {
                let x = Args::<T> {
                    a: k::view("sym_kl", s1, l1)?,
                    b: k::view("sym_kl", s2, l2)?,
                    // ∂b starts n elements into the output buffer.
                    aligned: aligned::<T>(&[l1.start_offset(), l2.start_offset(), n]),
                    mask: mask.as_ref(),
                    gscale: Some((k::view("sym_kl backward", s3, l3)?, stride)),
                    inv: inv.as_ref().map(|s| s.slice(..)),
                    gmul: weights(c).0,
                };
                let mut out = k::alloc::<T>(&dev, c.mode.grads() * n)?;
                {
                    let (mut ga, mut gb) = out.split_at_mut(n);
                    let gb = if c.mode.grads() == 2 {
                        Some(&mut gb)
                    } else {
                        None
                    };
                    launch_main(&dev, c, &x, None, Some(&mut ga), gb)?;
                }
                CudaStorage::wrap_cuda_slice(out, dev.clone())
        }))
    }
}
