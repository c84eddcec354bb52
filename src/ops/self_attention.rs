//! Multi-head self-attention of short sequences in one op, on the
//! `[B, L, H]` layout the dense layers produce, with its own backward.
//!
//! The encoder's attention, composed, splits Q, K and V into heads with
//! three layout copies, multiplies Q·Kᵀ and P·V as batched GEMMs around the
//! attention-probabilities op and copies the context back: seven launches
//! forward and about nine backward per layer. This op is one kernel forward
//! and two backward on CUDA (kernels/self_attention.cu), for sequences
//! whose per-head keys and values fit in shared memory ([`fits`]: up to a
//! few hundred tokens); longer ones stay composed.
//!
//! # Semantics (the CPU op)
//! `q`, `k`, `v` `[B, L, H]` of one float dtype T, `H = heads·dh`, head `h`
//! the columns `h·dh .. (h+1)·dh`; `bias` `[B, L]` in any shape with `B·L`
//! elements (the additive key mask). In W (f64 for f64, else f32), for each
//! batch row b, head h and query i:
//!
//! ```text
//! z_j  = (Σ_d q_id·k_jd)·scale + bias_j           sums in order of d
//! p_j  = round_T(exp(z_j − max z) / Σ exp(z − max z))
//! pd_j = keep_ij ? round_T(p_j ·₃₂ k) : 0          with dropout (else p_j)
//! y_id = round_T(Σ_j pd_j·v_jd)                     sums in order of j
//! ```
//!
//! `keep` is the dropout op's mask over the `[B, heads, L, L]`
//! probabilities (element `((b·heads + h)·L + i)·L + j`): the same draws as
//! [`crate::ops::attention_probs`] on the composed path's scores for the
//! same [`Rng`], which advances by [`philox::counters_for`]`(B·heads·L²)`.
//! The backward, for an incoming gradient `g` `[B, L, H]`, in W without
//! intermediate rounding:
//!
//! ```text
//! d_j   = keep_ij ? (Σ_d g_id·v_jd) ·₃₂ k : 0       (no dropout: the sum)
//! ds_ij = scale·p_j·(d_j − Σ_j d_j·p_j)
//! dq_i  = round_T(Σ_j ds_ij·k_j)       dk_j = round_T(Σ_i ds_ij·q_i)
//! dv_j  = round_T(Σ_i pd_ij·g_i)
//! ```
//!
//! and no gradient for `bias`.
//!
//! [`self_attention_packed`] is the same op on one `[B, L, 3H]` tensor
//! holding q, k and v side by side in each row (the output of one fused
//! query/key/value layer); its gradient is `[B, L, 3H]` likewise, so the
//! fused layer's backward takes it as it is, where three layers would each
//! compute a gradient of their common input and add them up.
//!
//! The CUDA kernels compute the same in f32
//! with the same orders of summation; they differ from the CPU op in the
//! `exp` implementation and fused multiply-adds, by a few f32 ulps before
//! the rounding to T. Against the composed path the op differs by the
//! rounding of the scores, of dP and of ds to T, which the composition
//! makes between its kernels and this op does not.
//!
//! [`philox::counters_for`]: crate::philox::counters_for
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, CustomOp3, DType, Layout, Shape, Storage, Tensor};
use rayon::prelude::*;

use super::attention::{dropped, keep_run, round, Real};
use super::cpu::from_f64;
use super::mixout::{drop_params, DropParams, Rng};
use crate::error::{check_companion, check_float_dtype, check_same, param_err, shape_err, Result};

const OP: &str = "self_attention";

/// Shared memory the CUDA kernels may use per block: the per-head keys and
/// values in f32 must fit (sm_90 allows 227 KiB; a third of that leaves
/// room for two blocks per multiprocessor).
const SMEM_LIMIT: usize = 100 * 1024;

/// Warps per block of the CUDA kernels.
const WARPS: usize = 8;

/// Bytes of shared memory of the forward kernel and of the backward row
/// and column kernels, for `l` tokens and heads of width `dh`.
fn smem_bytes(l: usize, dh: usize) -> [usize; 3] {
    let staged = 2 * l * (dh + 1);
    [
        4 * (staged + WARPS * (dh + l)),
        4 * (staged + WARPS * 2 * (dh + l)),
        4 * staged,
    ]
}

/// Whether the CUDA kernels take sequences of `l` tokens and heads of
/// width `dh` (their keys and values are staged in shared memory): e.g.
/// up to 305 tokens at `dh` 32 (MiniLM), 168 at `dh` 64 (BERT-base; the
/// backward row kernel's staging is the bound). The
/// CPU op has no limit.
pub fn fits(l: usize, dh: usize) -> bool {
    smem_bytes(l, dh).iter().all(|&b| b <= SMEM_LIMIT)
}

/// `dropout(softmax(q·kᵀ·scale + bias))·v` per head, on `[B, L, H]`
/// tensors (see the module docs). `dropout`: `Some((p, rng))` drops
/// probabilities with probability `p` from `rng`; `None` or `p = 0` does
/// not.
pub fn self_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    bias: &Tensor,
    heads: usize,
    scale: f64,
    dropout: Option<(f64, Rng)>,
) -> Result<Tensor> {
    check_float_dtype(OP, "q", q.dtype())?;
    check_same(OP, q, k, ("q", "k"))?;
    check_same(OP, q, v, ("q", "v"))?;
    let (b, l, h) = q
        .dims3()
        .map_err(|_| shape_err(OP, format!("q must be [B, L, H], got {:?}", q.dims())))?;
    let Some(cfg) = plan(q, (b, l, h), bias, heads, scale, dropout, false)? else {
        return Ok(q.zeros_like()?);
    };
    let op = Attend {
        cfg,
        bias: bias.contiguous()?,
    };
    Ok(q.contiguous()?
        .apply_op3(&k.contiguous()?, &v.contiguous()?, op)?)
}

/// [`self_attention()`] on q, k and v packed side by side in one `[B, L,
/// 3H]` tensor (columns `0..H`, `H..2H`, `2H..3H` of each row): the output
/// of a fused query/key/value layer. The result is `[B, L, H]`, equal to
/// the op on the three parts; the gradient is `[B, L, 3H]` in the same
/// packing.
pub fn self_attention_packed(
    qkv: &Tensor,
    bias: &Tensor,
    heads: usize,
    scale: f64,
    dropout: Option<(f64, Rng)>,
) -> Result<Tensor> {
    check_float_dtype(OP, "qkv", qkv.dtype())?;
    let (b, l, h3) = qkv
        .dims3()
        .map_err(|_| shape_err(OP, format!("qkv must be [B, L, 3H], got {:?}", qkv.dims())))?;
    if !h3.is_multiple_of(3) {
        return Err(shape_err(
            OP,
            format!("qkv {:?}: the last dimension must be 3H", qkv.dims()),
        ));
    }
    let Some(cfg) = plan(qkv, (b, l, h3 / 3), bias, heads, scale, dropout, true)? else {
        return Ok(qkv.narrow(2, 0, h3 / 3)?.zeros_like()?);
    };
    let op = Attend {
        cfg,
        bias: bias.contiguous()?,
    };
    Ok(qkv.contiguous()?.apply_op1(op)?)
}

/// The checks both forms share, and the op's configuration; `None` for an
/// empty input.
fn plan(
    x: &Tensor,
    (b, l, h): (usize, usize, usize),
    bias: &Tensor,
    heads: usize,
    scale: f64,
    dropout: Option<(f64, Rng)>,
    packed: bool,
) -> Result<Option<Cfg>> {
    if heads == 0 || !h.is_multiple_of(heads) {
        return Err(shape_err(
            OP,
            format!("hidden size {h} is not a multiple of {heads} heads"),
        ));
    }
    check_companion(OP, (bias, "bias"), (x, "the input"))?;
    if bias.elem_count() != b * l {
        return Err(shape_err(
            OP,
            format!(
                "bias {:?} is not the [{b}, {l}] key mask of the input {:?}",
                bias.dims(),
                x.dims()
            ),
        ));
    }
    if !scale.is_finite() {
        return Err(param_err(OP, format!("scale must be finite, got {scale}")));
    }
    if l > i32::MAX as usize / l.max(1) {
        return Err(shape_err(OP, format!("{l} tokens are too many")));
    }
    let drop = match dropout {
        Some((p, rng)) if p != 0.0 => Some(drop_params(OP, p, rng)?),
        Some((p, rng)) => {
            drop_params(OP, p, rng)?;
            None
        }
        None => None,
    };
    if b * l * h == 0 {
        return Ok(None);
    }
    Ok(Some(Cfg {
        b,
        l,
        heads,
        dh: h / heads,
        scale,
        drop,
        packed,
    }))
}

#[derive(Clone, Copy, Debug)]
struct Cfg {
    b: usize,
    l: usize,
    heads: usize,
    dh: usize,
    scale: f64,
    drop: Option<DropParams>,
    /// The input is one `[B, L, 3H]` tensor ([`self_attention_packed`]).
    packed: bool,
}

/// The forward op on (q, k, v), or on the packed qkv; the key mask rides
/// along (no gradient).
struct Attend {
    cfg: Cfg,
    bias: Tensor,
}

/// The backward on (q, k, v): `[3, B, L, H]` = dq, dk, dv; on the packed
/// qkv: `[B, L, 3H]`.
struct AttendGrad {
    cfg: Cfg,
    bias: Tensor,
    g: Tensor,
}

/// The storage of a tensor an op holds, of the backend `pick` takes out.
fn held<S, R>(
    t: &Tensor,
    what: &str,
    pick: impl Fn(&Storage) -> Option<&S>,
    f: impl FnOnce(&S, &Layout) -> candle_core::Result<R>,
) -> candle_core::Result<R> {
    let (st, l) = t.storage_and_layout();
    let Some(s) = pick(&st) else {
        candle_core::bail!("{OP}: {what} is on another device than q")
    };
    f(s, l)
}

fn cpu_of(s: &Storage) -> Option<&CpuStorage> {
    match s {
        Storage::Cpu(c) => Some(c),
        _ => None,
    }
}

impl Cfg {
    fn h(&self) -> usize {
        self.heads * self.dh
    }

    /// Row `(b, h, i)`'s probabilities rounded to T (`p`), after dropout
    /// (`pd`), and the row's keep mask (with dropout).
    fn row<R: Real>(&self, dtype: DType, x: &Qkv<R>, bh: usize, i: usize) -> Row<R> {
        let (l, dh, hh) = (self.l, self.dh, self.h());
        let (b, h) = (bh / self.heads, bh % self.heads);
        let at = |j: usize| (b * l + j) * hh + h * dh;
        let qi = &x.q[at(i)..][..dh];
        let scale = R::of(self.scale);
        let mut z: Vec<R> = (0..l)
            .map(|j| {
                let kj = &x.k[at(j)..][..dh];
                let mut dot = R::ZERO;
                for (a, c) in qi.iter().zip(kj) {
                    dot = dot + *a * *c;
                }
                dot * scale + x.bias[b * l + j]
            })
            .collect();
        let m = z
            .iter()
            .copied()
            .fold(R::NEG_INF, |a, c| if c > a { c } else { a });
        let mut sum = R::ZERO;
        for e in z.iter_mut() {
            *e = (*e - m).exp();
            sum = sum + *e;
        }
        let p: Vec<R> = z
            .iter()
            .map(|&e| R::of(round(dtype, (e / sum).wide())))
            .collect();
        let keep = self.drop.as_ref().map(|d| keep_run(d, (bh * l + i) * l, l));
        let pd = match (&self.drop, &keep) {
            (Some(d), Some(k)) => p
                .iter()
                .zip(k)
                .map(|(&pj, &kept)| {
                    R::of(if kept {
                        dropped(dtype, pj.wide(), d)
                    } else {
                        0.0
                    })
                })
                .collect(),
            _ => p.clone(),
        };
        Row { p, pd, keep }
    }

    /// The forward on CPU storages.
    fn forward_cpu<R: Real>(&self, dtype: DType, x: &Qkv<R>) -> Vec<f64> {
        let (l, dh, hh) = (self.l, self.dh, self.h());
        let per_head: Vec<Vec<f64>> = (0..self.b * self.heads)
            .into_par_iter()
            .map(|bh| {
                let (b, h) = (bh / self.heads, bh % self.heads);
                let mut out = vec![0.0; l * dh];
                for i in 0..l {
                    let pd = self.row(dtype, x, bh, i).pd;
                    for d in 0..dh {
                        let mut acc = R::ZERO;
                        for (j, &pj) in pd.iter().enumerate() {
                            acc = acc + pj * x.v[(b * l + j) * hh + h * dh + d];
                        }
                        out[i * dh + d] = acc.wide();
                    }
                }
                out
            })
            .collect();
        let mut y = vec![0.0; self.b * l * hh];
        self.scatter(&per_head, &mut y);
        y
    }

    /// Per-head `[L, dh]` blocks into their `[B, L, H]` places.
    fn scatter(&self, per_head: &[Vec<f64>], y: &mut [f64]) {
        let (l, dh, hh) = (self.l, self.dh, self.h());
        for (bh, block) in per_head.iter().enumerate() {
            let (b, h) = (bh / self.heads, bh % self.heads);
            for i in 0..l {
                y[(b * l + i) * hh + h * dh..][..dh].copy_from_slice(&block[i * dh..][..dh]);
            }
        }
    }

    /// The backward on CPU storages: dq, dk, dv one after the other.
    fn backward_cpu<R: Real>(&self, dtype: DType, x: &Qkv<R>, g: &[R]) -> Vec<f64> {
        let (l, dh, hh) = (self.l, self.dh, self.h());
        let per_head: Vec<[Vec<f64>; 3]> = (0..self.b * self.heads)
            .into_par_iter()
            .map(|bh| {
                let (b, h) = (bh / self.heads, bh % self.heads);
                let at = |j: usize| (b * l + j) * hh + h * dh;
                // ds and pd of the whole [L, L] block, then the sums.
                let (mut ds, mut pds) = (vec![R::ZERO; l * l], vec![R::ZERO; l * l]);
                for i in 0..l {
                    let Row { p, pd, keep } = self.row(dtype, x, bh, i);
                    let gi = &g[at(i)..][..dh];
                    let d: Vec<R> = (0..l)
                        .map(|j| {
                            let mut dp = R::ZERO;
                            for (a, c) in gi.iter().zip(&x.v[at(j)..][..dh]) {
                                dp = dp + *a * *c;
                            }
                            match (&keep, &self.drop) {
                                (Some(kp), Some(dr)) if kp[j] => R::of(dp.wide() * dr.scale as f64),
                                (Some(_), _) => R::ZERO,
                                _ => dp,
                            }
                        })
                        .collect();
                    let mut dot = R::ZERO;
                    for (a, c) in d.iter().zip(&p) {
                        dot = dot + *a * *c;
                    }
                    let scale = R::of(self.scale);
                    for j in 0..l {
                        ds[i * l + j] = scale * p[j] * (d[j] - dot);
                        pds[i * l + j] = pd[j];
                    }
                }
                // out_a = Σ_c w(a, c)·src_c: w's rows (rows_of_w) or columns.
                let sum = |w: &[R], rows_of_w: bool, src: &[R]| {
                    let mut out = vec![0.0; l * dh];
                    for a in 0..l {
                        for dd in 0..dh {
                            let mut acc = R::ZERO;
                            for c in 0..l {
                                let wv = if rows_of_w {
                                    w[a * l + c]
                                } else {
                                    w[c * l + a]
                                };
                                acc = acc + wv * src[at(c) + dd];
                            }
                            out[a * dh + dd] = acc.wide();
                        }
                    }
                    out
                };
                [
                    sum(&ds, true, &x.k),
                    sum(&ds, false, &x.q),
                    sum(&pds, false, g),
                ]
            })
            .collect();
        let n = self.b * l * hh;
        let mut out = vec![0.0; 3 * n];
        for (w, chunk) in out.chunks_mut(n).enumerate() {
            let blocks: Vec<Vec<f64>> = per_head.iter().map(|b| b[w].clone()).collect();
            self.scatter(&blocks, chunk);
        }
        out
    }

    /// The op on CPU storages: `inputs` are q, k, v, or the packed qkv.
    fn cpu(
        &self,
        inputs: &[(&CpuStorage, &Layout)],
        bias: (&CpuStorage, &Layout),
        g: Option<(&CpuStorage, &Layout)>,
    ) -> candle_core::Result<CpuStorage> {
        fn go<R: Real>(
            c: &Cfg,
            inputs: &[(&CpuStorage, &Layout)],
            bias: (&CpuStorage, &Layout),
            g: Option<(&CpuStorage, &Layout)>,
        ) -> candle_core::Result<Vec<f64>> {
            let dtype = inputs[0].0.dtype();
            let [q, k, v] = match inputs {
                [one] => c.unpack(R::read(one.0, one.1)?),
                [q, k, v] => [R::read(q.0, q.1)?, R::read(k.0, k.1)?, R::read(v.0, v.1)?],
                _ => candle_core::bail!("{OP}: one or three inputs"),
            };
            let x = Qkv {
                q,
                k,
                v,
                bias: R::read(bias.0, bias.1)?,
            };
            Ok(match g {
                None => c.forward_cpu(dtype, &x),
                Some((gs, gl)) => {
                    let grads = c.backward_cpu(dtype, &x, &R::read(gs, gl)?);
                    if c.packed {
                        c.pack(&grads)
                    } else {
                        grads
                    }
                }
            })
        }
        let dtype = inputs[0].0.dtype();
        let out = match dtype {
            DType::F64 => go::<f64>(self, inputs, bias, g)?,
            _ => go::<f32>(self, inputs, bias, g)?,
        };
        Ok(from_f64(out, dtype))
    }

    /// q, k, v `[B, L, H]` each from the packed `[B, L, 3H]` rows.
    fn unpack<T: Copy>(&self, qkv: Vec<T>) -> [Vec<T>; 3] {
        let h = self.h();
        let part = |w: usize| {
            qkv.chunks(3 * h)
                .flat_map(|row| row[w * h..][..h].iter().copied())
                .collect()
        };
        [part(0), part(1), part(2)]
    }

    /// The stacked `[3, B, L, H]` dq, dk, dv as packed `[B, L, 3H]` rows.
    fn pack(&self, stacked: &[f64]) -> Vec<f64> {
        let h = self.h();
        let n = stacked.len() / 3;
        let mut out = Vec::with_capacity(stacked.len());
        for r in 0..n / h {
            for w in 0..3 {
                out.extend_from_slice(&stacked[w * n + r * h..][..h]);
            }
        }
        out
    }
}

/// One query row of the CPU op.
struct Row<R> {
    p: Vec<R>,
    pd: Vec<R>,
    keep: Option<Vec<bool>>,
}

/// The CPU op's inputs in its arithmetic type.
struct Qkv<R> {
    q: Vec<R>,
    k: Vec<R>,
    v: Vec<R>,
    bias: Vec<R>,
}

impl Attend {
    /// The context on CPU storages of q, k, v or the packed qkv.
    fn on_cpu(&self, inputs: &[(&CpuStorage, &Layout)]) -> candle_core::Result<CpuStorage> {
        held(&self.bias, "bias", cpu_of, |bs, bl| {
            self.cfg.cpu(inputs, (bs, bl), None)
        })
    }

    /// The context on CUDA storages of q, k, v or the packed qkv.
    #[cfg(feature = "cuda")]
    fn on_cuda(
        &self,
        inputs: &[(&candle_core::CudaStorage, &Layout)],
    ) -> candle_core::Result<candle_core::CudaStorage> {
        held(&self.bias, "bias", cuda::of, |bs, bl| {
            cuda::forward(&self.cfg, inputs, (bs, bl))
        })
    }

    /// The backward op for the incoming gradient `g`.
    fn grad(&self, g: &Tensor) -> candle_core::Result<AttendGrad> {
        Ok(AttendGrad {
            cfg: self.cfg,
            bias: self.bias.clone(),
            g: g.contiguous()?,
        })
    }
}

impl AttendGrad {
    /// dq, dk, dv (stacked, or packed) on CPU storages.
    fn on_cpu(&self, inputs: &[(&CpuStorage, &Layout)]) -> candle_core::Result<CpuStorage> {
        held(&self.bias, "bias", cpu_of, |bs, bl| {
            held(&self.g, "the gradient", cpu_of, |gs, gl| {
                self.cfg.cpu(inputs, (bs, bl), Some((gs, gl)))
            })
        })
    }

    /// dq, dk, dv (stacked, or packed) on CUDA storages.
    #[cfg(feature = "cuda")]
    fn on_cuda(
        &self,
        inputs: &[(&candle_core::CudaStorage, &Layout)],
    ) -> candle_core::Result<candle_core::CudaStorage> {
        held(&self.bias, "bias", cuda::of, |bs, bl| {
            held(&self.g, "the gradient", cuda::of, |gs, gl| {
                cuda::backward(&self.cfg, inputs, (bs, bl), (gs, gl))
            })
        })
    }
}

impl CustomOp3 for Attend {
    fn name(&self) -> &'static str {
        "tunefuse-self-attention"
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
        let y = self.on_cpu(&[(s1, l1), (s2, l2), (s3, l3)])?;
        Ok((y, l1.shape().clone()))
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
        let y = self.on_cuda(&[(s1, l1), (s2, l2), (s3, l3)])?;
        Ok((y, l1.shape().clone()))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        _y: &Tensor,
        g: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let grads = q.apply_op3_no_bwd(k, v, &self.grad(g)?)?;
        Ok((
            Some(grads.get(0)?),
            Some(grads.get(1)?),
            Some(grads.get(2)?),
        ))
    }
}

impl CustomOp3 for AttendGrad {
    fn name(&self) -> &'static str {
        "tunefuse-self-attention-grad"
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
        let out = self.on_cpu(&[(s1, l1), (s2, l2), (s3, l3)])?;
        Ok((out, grads_shape(l1)))
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
        let out = self.on_cuda(&[(s1, l1), (s2, l2), (s3, l3)])?;
        Ok((out, grads_shape(l1)))
    }
}

impl CustomOp1 for Attend {
    fn name(&self) -> &'static str {
        "tunefuse-self-attention-packed"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        Ok((self.on_cpu(&[(s, l)])?, context_shape(&self.cfg)))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        Ok((self.on_cuda(&[(s, l)])?, context_shape(&self.cfg)))
    }

    fn bwd(&self, qkv: &Tensor, _y: &Tensor, g: &Tensor) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(qkv.apply_op1_no_bwd(&self.grad(g)?)?))
    }
}

impl CustomOp1 for AttendGrad {
    fn name(&self) -> &'static str {
        "tunefuse-self-attention-packed-grad"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        Ok((self.on_cpu(&[(s, l)])?, l.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        Ok((self.on_cuda(&[(s, l)])?, l.shape().clone()))
    }
}

/// `[B, L, H]`: the context's shape.
fn context_shape(c: &Cfg) -> Shape {
    (c.b, c.l, c.h()).into()
}

/// `[3, B, L, H]` for inputs of layout `l`.
fn grads_shape(l: &Layout) -> Shape {
    let mut dims = vec![3];
    dims.extend_from_slice(l.dims());
    dims.into()
}

#[cfg(feature = "cuda")]
mod cuda {
    use super::{smem_bytes, Cfg, WARPS};
    use crate::cuda::{self as k, ptx};
    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::cudarc::driver::{CudaView, PushKernelArg};
    use candle_core::cuda_backend::{CudaDType, CudaDevice};
    use candle_core::{CudaStorage, Layout, Result, Storage};

    const MODULE: &str = "tunefuse_self_attention";
    const OP: &str = super::OP;

    pub(super) fn of(s: &Storage) -> Option<&CudaStorage> {
        match s {
            Storage::Cuda(c) => Some(c),
            _ => None,
        }
    }

    fn check(c: &Cfg) -> Result<[u32; 3]> {
        if !super::fits(c.l, c.dh) {
            candle_core::bail!(
                "{OP}: {} tokens with heads of {} do not fit the CUDA kernel's shared memory \
                 (see ops::self_attention::fits)",
                c.l,
                c.dh
            );
        }
        Ok(smem_bytes(c.l, c.dh).map(|b| b as u32))
    }

    /// The drop arguments: (on, (seed, offset, base), threshold, scale).
    fn drop_args(dev: &CudaDevice, c: &Cfg) -> (i32, (u64, u64, u64), u32, f32) {
        match &c.drop {
            Some(d) => (
                1,
                k::philox_args(dev, d.rng.seed, d.rng.offset),
                d.threshold,
                d.scale,
            ),
            None => (0, (0, 0, 0), 0, 1.0),
        }
    }

    /// The views of q, k, v (three tensors, or the parts of the packed
    /// one), the key mask, and the row stride of q, k, v.
    fn views<'a, T: CudaDType>(
        c: &Cfg,
        inputs: &[(&'a CudaStorage, &Layout)],
        bias: (&'a CudaStorage, &Layout),
    ) -> Result<([CudaView<'a, T>; 4], i64)> {
        let bv = k::view::<T>(OP, bias.0, bias.1)?;
        match inputs {
            [x] => {
                let (x, h) = (k::view::<T>(OP, x.0, x.1)?, c.h());
                Ok((
                    [x.slice(..), x.slice(h..), x.slice(2 * h..), bv],
                    3 * h as i64,
                ))
            }
            [q, kk, v] => Ok((
                [
                    k::view::<T>(OP, q.0, q.1)?,
                    k::view::<T>(OP, kk.0, kk.1)?,
                    k::view::<T>(OP, v.0, v.1)?,
                    bv,
                ],
                c.h() as i64,
            )),
            _ => candle_core::bail!("{OP}: one or three inputs"),
        }
    }

    pub(super) fn forward(
        c: &Cfg,
        inputs: &[(&CudaStorage, &Layout)],
        bias: (&CudaStorage, &Layout),
    ) -> Result<CudaStorage> {
        let smem = check(c)?;
        let dev = inputs[0].0.device.clone();
        let dtype = inputs[0].0.dtype();
        let n = c.b * c.l * c.h();
        let f = k::func(
            &dev,
            MODULE,
            ptx::SELF_ATTENTION,
            &format!("self_attn_fwd_{}", k::suffix(OP, dtype)?),
        )?;
        f.allow_smem(smem[0])?;
        k::with_float_type!(OP, dtype, T => {
            let ([q, kk, v, bv], ld) = views::<T>(c, inputs, bias)?;
            let mut y = k::alloc::<T>(&dev, n)?;
            let (l, heads, dh) = (c.l as i32, c.heads as i32, c.dh as i32);
            let scale = c.scale as f32;
            let (on, (seed, offset, base), threshold, dscale) = drop_args(&dev, c);
            let mut b = f.builder();
            b.arg(&q).arg(&kk).arg(&v).arg(&bv).arg(&mut y).arg(&ld)
                .arg(&l).arg(&heads).arg(&dh).arg(&scale)
                .arg(&on).arg(&seed).arg(&offset).arg(&base).arg(&threshold).arg(&dscale);
            k::launch_smem(&mut b, ((c.b * c.heads) as u32, 1), 32 * WARPS as u32, smem[0])?;
            Ok(CudaStorage::wrap_cuda_slice(y, dev.clone()))
        })
    }

    pub(super) fn backward(
        c: &Cfg,
        inputs: &[(&CudaStorage, &Layout)],
        bias: (&CudaStorage, &Layout),
        g: (&CudaStorage, &Layout),
    ) -> Result<CudaStorage> {
        let smem = check(c)?;
        let dev = inputs[0].0.device.clone();
        let dtype = inputs[0].0.dtype();
        let n = c.b * c.l * c.h();
        let sfx = k::suffix(OP, dtype)?;
        let rows = k::func(
            &dev,
            MODULE,
            ptx::SELF_ATTENTION,
            &format!("self_attn_bwd_rows_{sfx}"),
        )?;
        let cols = k::func(
            &dev,
            MODULE,
            ptx::SELF_ATTENTION,
            &format!("self_attn_bwd_cols_{sfx}"),
        )?;
        rows.allow_smem(smem[1])?;
        cols.allow_smem(smem[2])?;
        let blocks = ((c.b * c.heads) as u32, 1);
        k::with_float_type!(OP, dtype, T => {
            let ([q, kk, v, bv], ld) = views::<T>(c, inputs, bias)?;
            // dq, dk, dv: stacked [3, B, L, H], or packed rows [B, L, 3H].
            let (part, ldo) = if c.packed {
                (c.h() as i64, 3 * c.h() as i64)
            } else {
                (n as i64, c.h() as i64)
            };
            let gv = k::view::<T>(OP, g.0, g.1)?;
            let mut out = k::alloc::<T>(&dev, 3 * n)?;
            let mut ds = k::alloc::<f32>(&dev, c.b * c.heads * c.l * c.l)?;
            let mut pd = k::alloc::<f32>(&dev, c.b * c.heads * c.l * c.l)?;
            let (l, heads, dh) = (c.l as i32, c.heads as i32, c.dh as i32);
            let scale = c.scale as f32;
            let (on, (seed, offset, base), threshold, dscale) = drop_args(&dev, c);
            let mut b = rows.builder();
            b.arg(&q).arg(&kk).arg(&v).arg(&bv).arg(&gv).arg(&mut out).arg(&mut ds).arg(&mut pd)
                .arg(&ld).arg(&ldo).arg(&l).arg(&heads).arg(&dh).arg(&scale)
                .arg(&on).arg(&seed).arg(&offset).arg(&base).arg(&threshold).arg(&dscale);
            k::launch_smem(&mut b, blocks, 32 * WARPS as u32, smem[1])?;
            let mut b = cols.builder();
            b.arg(&q).arg(&gv).arg(&ds).arg(&pd).arg(&mut out).arg(&part).arg(&ld).arg(&ldo)
                .arg(&l).arg(&heads).arg(&dh);
            k::launch_smem(&mut b, blocks, 32 * WARPS as u32, smem[2])?;
            Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()))
        })
    }
}
