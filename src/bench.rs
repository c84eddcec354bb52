//! Op benchmarks shared by `tunefuse bench`, `benches/ops.rs` and the GPU
//! script: the fused ops at the target shapes of the kernel benchmarks, the same math
//! composed from candle ops (the baseline, also checked against the
//! reference in the tests), the measured copy bandwidth that is the floor,
//! and the one results table (with the PyTorch peers when given).
use std::collections::HashMap;
use std::time::Instant;

use candle_core::{DType, Device, Tensor, Var};

use crate::ops::adamw::{adamw_state, adamw_step, AdamWStep};
use crate::ops::adapter::{adapter, adapter_composed, Act, AdapterWeights};
use crate::ops::mixout::{dropout, mixout, Rng};
use crate::ops::perturb::{
    ascent_step, noise_init, AscentStep, Granularity, Noise, Norm, StepMode,
};
use crate::ops::sym_kl::{sym_kl, SymKlGrad, SymKlOptions};
use crate::Result;

/// The symmetric KL composed from candle ops (batchmean, full gradients
/// through autograd): the baseline the fused op is measured against.
pub fn sym_kl_composed(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let (la, lb) = (
        candle_nn::ops::log_softmax(a, candle_core::D::Minus1)?,
        candle_nn::ops::log_softmax(b, candle_core::D::Minus1)?,
    );
    let (p, q) = (la.exp()?, lb.exp()?);
    let rows = (a.elem_count() / a.dim(candle_core::D::Minus1)?) as f64;
    Ok((((p - q)? * (la - lb)?)?.sum_all()? / rows)?)
}

/// Mixout composed from candle ops: a Bernoulli mask from `rand`, then
/// `u + M ⊙ (w − u) / (1 − p)`.
pub fn mixout_composed(w: &Tensor, u: &Tensor, p: f64) -> Result<Tensor> {
    let r = Tensor::rand(0f32, 1f32, w.shape(), w.device())?.to_dtype(w.dtype())?;
    let m = r.ge(p)?.to_dtype(w.dtype())?;
    Ok((u + ((m * (w - u)?)? * (1.0 / (1.0 - p)))?)?)
}

/// LayerNorm composed from candle ops, as the model ran it before the fused
/// op: statistics in f32 (f64 for f64 x), x̂ rounded to x's dtype, then the
/// weight and bias cast to it. The baseline of [`crate::ops::layer_norm()`].
pub fn layer_norm_composed(x: &Tensor, w: &Tensor, b: &Tensor, eps: f64) -> Result<Tensor> {
    use candle_core::D;
    let dtype = x.dtype();
    let inner = crate::ops::wide_dtype(dtype);
    let x = x.to_dtype(inner)?;
    let mean = x.mean_keepdim(D::Minus1)?;
    let xc = x.broadcast_sub(&mean)?;
    let var = xc.sqr()?.mean_keepdim(D::Minus1)?;
    let y = xc.broadcast_div(&(var + eps)?.sqrt()?)?.to_dtype(dtype)?;
    Ok(y.broadcast_mul(&w.to_dtype(dtype)?)?
        .broadcast_add(&b.to_dtype(dtype)?)?)
}

/// One AdamW step composed from candle ops (the optimiser's update before
/// the fused op, one op per line): returns the new parameter, m and v. The
/// clipping `scale` multiplies the gradient in its own dtype first. The
/// fused [`adamw_step`] equals it bit for bit (tests/adamw.rs).
pub fn adamw_composed(
    theta: &Tensor,
    m: &Tensor,
    v: &Tensor,
    g: &Tensor,
    scale: Option<&Tensor>,
    anchor: Option<&Tensor>,
    c: &AdamWStep,
) -> Result<(Tensor, Tensor, Tensor)> {
    let g = match scale {
        Some(k) => g.broadcast_mul(&k.to_dtype(g.dtype())?)?,
        None => g.clone(),
    };
    let g = g.to_dtype(theta.dtype())?;
    let (b1, b2) = (c.beta1, c.beta2);
    let m = ((m * b1)? + (&g * (1.0 - b1))?)?;
    let v = ((v * b2)? + (g.sqr()? * (1.0 - b2))?)?;
    let mut update = ((&m / c.c1)? / ((&v / c.c2)?.sqrt()? + c.eps)?)?;
    if let (Some((lam, pull)), Some(a)) = (c.recadam, anchor) {
        update = ((update * lam)? + ((theta - a)? * pull)?)?;
    }
    let mut next = (theta - (update * c.lr)?)?;
    if let Some(d) = c.decay {
        next = (next - (theta * d)?)?;
    }
    Ok((next, m, v))
}

/// LayerNorm forward + backward at MiniLM's width (T = 16384 rows of 384 on
/// CUDA, 512 on CPU), bf16 x with f32 weight and bias (mixed precision),
/// fused and composed. Floor: x and y forward, x, dy and dx backward
/// (5·T·H elements).
fn layer_norm_cases(dev: &Device) -> Result<Vec<Case>> {
    let (t, h) = (if dev.is_cuda() { 16384 } else { 512 }, 384);
    let mut out = Vec::new();
    for fused in [true, false] {
        let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (t, h), dev)?.to_dtype(DType::BF16)?)?;
        let w = Var::from_tensor(&(Tensor::randn(0f32, 0.1, h, dev)? + 1.0)?)?;
        let b = Var::from_tensor(&Tensor::randn(0f32, 0.1, h, dev)?)?;
        out.push(Case {
            op: if fused {
                "layer_norm fwd+bwd"
            } else {
                "layer_norm composed fwd+bwd"
            },
            shape: format!("{t}x{h}"),
            dtype: DType::BF16,
            bytes: 5 * t * h * 2,
            flops: None,
            run: Box::new(move || {
                let y = if fused {
                    crate::ops::layer_norm(x.as_tensor(), w.as_tensor(), b.as_tensor(), 1e-12)?
                } else {
                    layer_norm_composed(x.as_tensor(), w.as_tensor(), b.as_tensor(), 1e-12)?
                };
                y.backward()?;
                Ok(())
            }),
        });
    }
    Ok(out)
}

/// The parameter shapes of all-MiniLM-L6-v2 plus a two-class head (22.7M
/// parameters in 103 tensors): what the optimiser updates every step.
pub fn minilm_param_shapes() -> Vec<Vec<usize>> {
    let h = 384;
    let mut s = vec![vec![30522, h], vec![512, h], vec![2, h], vec![h], vec![h]];
    for _ in 0..6 {
        for _ in 0..4 {
            s.extend([vec![h, h], vec![h]]);
        }
        s.extend([vec![4 * h, h], vec![4 * h], vec![h, 4 * h], vec![h]]);
        s.extend([vec![h], vec![h], vec![h], vec![h]]);
    }
    s.extend([vec![2, h], vec![2]]);
    s
}

/// The AdamW step over MiniLM's tensors, fused or composed, with a clipping
/// scale and weight decay (no RecAdam). Floor: read p, g, m, v and write p,
/// m, v once (28 bytes per f32 parameter); the fused op makes two passes
/// (36 bytes).
fn adamw_case(dev: &Device, fused: bool) -> Result<Case> {
    let shapes = minilm_param_shapes();
    let n: usize = shapes.iter().map(|s| s.iter().product::<usize>()).sum();
    let mut params = Vec::new();
    for s in &shapes {
        let p = Tensor::randn(0f32, 0.02, s.as_slice(), dev)?;
        let g = Tensor::randn(0f32, 1e-3, s.as_slice(), dev)?;
        let st = adamw_state(&p)?;
        let (m, v) = (p.zeros_like()?, p.zeros_like()?);
        params.push((Var::from_tensor(&p)?, g, st, m, v));
    }
    let scale = Tensor::new(0.5f32, dev)?;
    let c = AdamWStep {
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        c1: 0.1,
        c2: 0.001,
        lr: 1e-4,
        decay: Some(1e-6),
        recadam: None,
    };
    Ok(Case {
        op: if fused {
            "adamw step"
        } else {
            "adamw composed step"
        },
        shape: format!("minilm {} tensors", shapes.len()),
        dtype: DType::F32,
        bytes: 28 * n,
        flops: None,
        run: Box::new(move || {
            for (p, g, st, m, v) in params.iter_mut() {
                if fused {
                    adamw_step(p.as_tensor(), st, g, Some(&scale), None, &c)?;
                } else {
                    let (np, nm, nv) =
                        adamw_composed(p.as_tensor(), m, v, g, Some(&scale), None, &c)?;
                    p.set(&np)?;
                    (*m, *v) = (nm, nv);
                }
            }
            Ok(())
        }),
    })
}

/// A pgd/l2/token ascent step composed from candle ops (ε-ball projection,
/// padding zeroed): the baseline of the fused step. `mask` is `[B, L]` f32.
pub fn ascent_step_composed(
    delta: &Tensor,
    grad: &Tensor,
    mask: &Tensor,
    eta: f64,
    eps: f64,
) -> Result<Tensor> {
    let m = mask.unsqueeze(2)?;
    let gn = grad.sqr()?.sum_keepdim(2)?.sqrt()?;
    let x = (delta + (grad.broadcast_div(&gn)? * eta)?)?;
    let xn = x.sqr()?.sum_keepdim(2)?.sqrt()?;
    let k = (xn.recip()? * eps)?.clamp(0.0, 1.0)?;
    Ok(x.broadcast_mul(&k)?.broadcast_mul(&m)?)
}

/// One benchmark: a closure running the op once, and the minimum bytes it
/// must move (what the GB/s figures are computed from).
pub struct Case {
    /// The op's name in the table.
    pub op: &'static str,
    /// The shape, as the table prints it.
    pub shape: String,
    /// The dtype.
    pub dtype: DType,
    /// The minimum bytes one run reads and writes.
    pub bytes: usize,
    /// Floating-point operations of one run, for ops with matrix products.
    pub flops: Option<f64>,
    /// Runs the op once.
    pub run: Box<dyn FnMut() -> Result<()>>,
}

fn dtype_name(d: DType) -> &'static str {
    match d {
        DType::F32 => "f32",
        DType::BF16 => "bf16",
        DType::F16 => "f16",
        DType::F64 => "f64",
        _ => "other",
    }
}

/// The target shapes on CUDA; smaller ones on CPU so the
/// command finishes in seconds.
pub fn cases(dev: &Device) -> Result<Vec<Case>> {
    let gpu = dev.is_cuda();
    let mut out = Vec::new();
    let (rows, v) = if gpu { (16384, 30522) } else { (64, 30522) };
    for dtype in [DType::BF16, DType::F32] {
        let a = Var::from_tensor(&Tensor::randn(0f32, 3.0, (rows, v), dev)?.to_dtype(dtype)?)?;
        let b = Var::from_tensor(&Tensor::randn(0f32, 3.0, (rows, v), dev)?.to_dtype(dtype)?)?;
        out.push(Case {
            op: "sym_kl fwd+bwd",
            shape: format!("{rows}x{v}"),
            dtype,
            bytes: 4 * rows * v * dtype.size_in_bytes(),
            flops: None,
            run: Box::new(move || {
                let o = SymKlOptions {
                    grad: SymKlGrad::Full,
                    ..Default::default()
                };
                let loss = sym_kl(a.as_tensor(), b.as_tensor(), &o)?;
                loss.backward()?;
                Ok(())
            }),
        });
    }
    let n = if gpu { 110_000_000 } else { 4_000_000 };
    let w = Tensor::randn(0f32, 0.02, n, dev)?;
    let u = Tensor::randn(0f32, 0.02, n, dev)?;
    let g = Tensor::randn(0f32, 1.0, n, dev)?;
    out.push(Case {
        op: "mixout fwd+bwd",
        shape: format!("{n}"),
        dtype: DType::F32,
        bytes: 5 * n * 4,
        flops: None,
        run: Box::new(move || {
            // Forward, then exactly what backward runs for ∂w (dropout of
            // the incoming gradient with the same bits).
            let rng = Rng { seed: 1, offset: 0 };
            mixout(&w, &u, 0.1, rng, true)?;
            dropout(&g, 0.1, rng, true)?;
            Ok(())
        }),
    });
    let (b, l, h) = if gpu { (32, 512, 768) } else { (4, 128, 768) };
    let mask = Tensor::ones((b, l), DType::F32, dev)?;
    for dtype in [DType::F32, DType::BF16] {
        let delta = Tensor::randn(0f32, 0.01, (b, l, h), dev)?.to_dtype(dtype)?;
        let grad = Tensor::randn(0f32, 1.0, (b, l, h), dev)?.to_dtype(dtype)?;
        let mask = mask.clone();
        out.push(Case {
            op: "ascent step pgd l2 token",
            shape: format!("{b}x{l}x{h}"),
            dtype,
            bytes: 3 * b * l * h * dtype.size_in_bytes() + b * l * 4,
            flops: None,
            run: Box::new(move || {
                let s = AscentStep {
                    eta: 1e-3,
                    norm: Norm::L2,
                    granularity: Granularity::Token,
                    mode: StepMode::Pgd { eps: Some(1e-2) },
                };
                ascent_step(&delta, &grad, &mask, &s)?;
                Ok(())
            }),
        });
    }
    out.push(Case {
        op: "noise init normal",
        shape: format!("{b}x{l}x{h}"),
        dtype: DType::F32,
        bytes: b * l * h * 4 + b * l * 4,
        flops: None,
        run: Box::new(move || {
            noise_init(
                &[b, l, h],
                &mask,
                Noise::Normal { sigma: 1e-5 },
                DType::F32,
                Rng { seed: 3, offset: 0 },
            )?;
            Ok(())
        }),
    });
    let shape = (32, 128, 768);
    let x = Tensor::randn(0f32, 1.0, shape, dev)?.to_dtype(DType::BF16)?;
    out.push(Case {
        op: "dropout fwd",
        shape: "32x128x768".into(),
        dtype: DType::BF16,
        bytes: 2 * x.elem_count() * 2,
        flops: None,
        run: Box::new(move || {
            dropout(&x, 0.1, Rng { seed: 2, offset: 0 }, true)?;
            Ok(())
        }),
    });
    out.extend(adapter_cases(dev)?);
    out.extend(layer_norm_cases(dev)?);
    out.push(adamw_case(dev, true)?);
    out.push(adamw_case(dev, false)?);
    Ok(out)
}

/// The adapter forward + backward (Houlsby bottleneck, GELU, biases), fused
/// and composed, at T = 16384, d ∈ {768, 1024}, r = 64 on CUDA (T = 512 on
/// CPU). Floor: x and y in the forward, x, dy and dx in the backward (5·T·d
/// elements; weights and h are small). FLOPs: 12·T·d·r (two products
/// forward, four backward). The backward starts from `y.backward()`, whose
/// incoming gradient of ones costs one T×d fill that the floor does not
/// count (the PyTorch peers pass a preallocated dy).
pub fn adapter_cases(dev: &Device) -> Result<Vec<Case>> {
    let t = if dev.is_cuda() { 16384 } else { 512 };
    let r = 64;
    let mut out = Vec::new();
    for d in [768, 1024] {
        for dtype in [DType::BF16, DType::F32] {
            for fused in [true, false] {
                let v = |dims: &[usize], std: f32| -> Result<Var> {
                    Ok(Var::from_tensor(
                        &Tensor::randn(0f32, std, dims, dev)?.to_dtype(dtype)?,
                    )?)
                };
                let x = v(&[t, d], 1.0)?;
                let w = AdapterWeights {
                    w_down: v(&[r, d], 0.03)?.as_tensor().clone(),
                    b_down: Some(v(&[r], 0.01)?.as_tensor().clone()),
                    w_up: v(&[d, r], 0.1)?.as_tensor().clone(),
                    b_up: Some(v(&[d], 0.01)?.as_tensor().clone()),
                    act: Act::GeluErf,
                    scale: 1.0,
                };
                out.push(Case {
                    op: if fused {
                        "adapter fwd+bwd"
                    } else {
                        "adapter composed fwd+bwd"
                    },
                    shape: format!("{t}x{d} r{r}"),
                    dtype,
                    bytes: 5 * t * d * dtype.size_in_bytes(),
                    flops: Some(12.0 * (t * d * r) as f64),
                    run: Box::new(move || {
                        let y = if fused {
                            adapter(x.as_tensor(), &w, None)?
                        } else {
                            adapter_composed(x.as_tensor(), &w, None)?
                        };
                        y.backward()?;
                        Ok(())
                    }),
                });
            }
        }
    }
    Ok(out)
}

/// Median milliseconds of one run, over `reps` timings of `iters` runs each
/// (after warm-up), synchronising the device around each timing.
pub fn time_ms(
    dev: &Device,
    f: &mut dyn FnMut() -> Result<()>,
    iters: usize,
    reps: usize,
) -> Result<f64> {
    for _ in 0..2 {
        f()?;
    }
    dev.synchronize()?;
    let mut t = Vec::with_capacity(reps);
    for _ in 0..reps {
        let start = Instant::now();
        for _ in 0..iters {
            f()?;
        }
        dev.synchronize()?;
        t.push(start.elapsed().as_secs_f64() * 1e3 / iters as f64);
    }
    t.sort_by(f64::total_cmp);
    Ok(t[t.len() / 2])
}

/// Device-to-device copy bandwidth in GB/s (bytes read + written), the floor
/// every memory-bound op is compared with.
pub fn copy_bandwidth(dev: &Device) -> Result<f64> {
    let n = if dev.is_cuda() { 256 << 20 } else { 32 << 20 };
    let x = Tensor::zeros(n, DType::F32, dev)?;
    let ms = time_ms(dev, &mut || Ok(x.copy().map(|_| ())?), 10, 5)?;
    Ok(2.0 * (n * 4) as f64 / (ms * 1e-3) / 1e9)
}

/// The name of the device, for the table.
pub fn device_name(dev: &Device) -> String {
    match dev {
        #[cfg(feature = "cuda")]
        Device::Cuda(d) => d
            .cuda_stream()
            .context()
            .name()
            .unwrap_or_else(|_| "CUDA device".into()),
        _ => format!(
            "CPU ({} threads)",
            std::thread::available_parallelism().map_or(1, |n| n.get())
        ),
    }
}

/// One measured row of the table.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct Row {
    /// The op's name.
    pub op: String,
    /// The shape.
    pub shape: String,
    /// The dtype.
    pub dtype: String,
    /// Median milliseconds per run.
    pub ms: f64,
    /// Achieved GB/s of the minimum bytes.
    pub gbps: f64,
    /// Achieved TFLOP/s, for ops with matrix products.
    #[serde(default)]
    pub tflops: Option<f64>,
}

/// Runs every case whose label ("op shape dtype", as printed) contains
/// `only` (every case when `None`) and returns its row.
pub fn run_all(
    dev: &Device,
    only: Option<&str>,
    mut progress: impl FnMut(&str),
) -> Result<Vec<Row>> {
    let mut rows = Vec::new();
    for mut c in cases(dev)? {
        let label = format!("{} {} {}", c.op, c.shape, dtype_name(c.dtype));
        if only.is_some_and(|o| !label.contains(o)) {
            continue;
        }
        progress(&label);
        let iters = if dev.is_cuda() { 20 } else { 3 };
        let ms = time_ms(dev, &mut c.run, iters, 5)?;
        rows.push(Row {
            op: c.op.into(),
            shape: c.shape,
            dtype: dtype_name(c.dtype).into(),
            ms,
            gbps: c.bytes as f64 / (ms * 1e-3) / 1e9,
            tflops: c.flops.map(|f| f / (ms * 1e-3) / 1e12),
        });
    }
    if rows.is_empty() {
        if let Some(o) = only {
            return Err(crate::error::param_err(
                "bench",
                format!("no benchmark case matches --only {o:?}"),
            ));
        }
    }
    Ok(rows)
}

/// PyTorch timings by (op, shape, dtype): (eager ms, torch.compile ms), as
/// written by `bench/torch_peers.py`.
pub type Peers = HashMap<(String, String, String), (Option<f64>, Option<f64>)>;

/// Reads the peers file; entries are `{op, shape, dtype, eager_ms, compile_ms}`.
pub fn load_peers(path: &std::path::Path) -> std::result::Result<Peers, String> {
    #[derive(serde::Deserialize)]
    struct Entry {
        op: String,
        shape: String,
        dtype: String,
        eager_ms: Option<f64>,
        compile_ms: Option<f64>,
    }
    #[derive(serde::Deserialize)]
    struct File {
        results: Vec<Entry>,
    }
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read peers file {}: {e}", path.display()))?;
    let f: File = serde_json::from_str(&text)
        .map_err(|e| format!("peers file {} is malformed: {e}", path.display()))?;
    Ok(f.results
        .into_iter()
        .map(|e| ((e.op, e.shape, e.dtype), (e.eager_ms, e.compile_ms)))
        .collect())
}

/// Reads what `tunefuse bench --json` wrote: (device, copy GB/s, rows).
pub fn load_ours(path: &std::path::Path) -> std::result::Result<(String, f64, Vec<Row>), String> {
    #[derive(serde::Deserialize)]
    struct File {
        device: String,
        copy_gbps: f64,
        results: Vec<Row>,
    }
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read results file {}: {e}", path.display()))?;
    let f: File = serde_json::from_str(&text)
        .map_err(|e| format!("results file {} is malformed: {e}", path.display()))?;
    Ok((f.device, f.copy_gbps, f.results))
}

/// The one table: op, shape, dtype, ours, GB/s, % of copy bandwidth, the
/// PyTorch peers and our speed-up over them.
pub fn table(device: &str, copy_gbps: f64, rows: &[Row], peers: &Peers) -> String {
    let fmt = |x: Option<f64>| x.map_or("-".to_string(), |v| format!("{v:.3}"));
    let mut s = format!("device: {device}; measured copy bandwidth {copy_gbps:.0} GB/s\n");
    s.push_str("| op | shape | dtype | ours ms | GB/s | % of copy | TFLOP/s | eager ms | compile ms | vs eager | vs compile |\n");
    s.push_str("|---|---|---|---|---|---|---|---|---|---|---|\n");
    for r in rows {
        let (eager, compile) = peers
            .get(&(r.op.clone(), r.shape.clone(), r.dtype.clone()))
            .cloned()
            .unwrap_or((None, None));
        let speed = |p: Option<f64>| p.map_or("-".to_string(), |p| format!("{:.2}x", p / r.ms));
        s.push_str(&format!(
            "| {} | {} | {} | {:.3} | {:.1} | {:.0}% | {} | {} | {} | {} | {} |\n",
            r.op,
            r.shape,
            r.dtype,
            r.ms,
            r.gbps,
            100.0 * r.gbps / copy_gbps,
            r.tflops.map_or("-".to_string(), |f| format!("{f:.1}")),
            fmt(eager),
            fmt(compile),
            speed(eager),
            speed(compile)
        ));
    }
    s
}
