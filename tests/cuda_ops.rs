//! CUDA kernels against the CPU reference. Every test prints why it skipped
//! when there is no GPU (or no `cuda` feature); `scripts/gpu-run.sh` runs
//! them on the lent GPU machine.
//!
//! Inputs are drawn on the device, cast to the dtype under test, and the same
//! values are given to the CPU reference, so differences come from the
//! kernels' f32 arithmetic and the rounding of their outputs only. Large
//! batches are checked on a sample of rows (rows are independent; the
//! sample always includes the first and last rows).
mod common;

use candle_core::{DType, Device, IndexOp, Tensor, Var};
use common::*;
use tunefuse::ops::adapter::{adapter, adapter_composed, Act, AdapterWeights};
use tunefuse::ops::mixout::{dropout, dropout_add, keep_mask, mixout, Rng};
use tunefuse::ops::perturb::{
    ascent_step, noise_init, AscentStep, Granularity, Noise, Norm, StepMode,
};
use tunefuse::ops::sym_kl::{kl, sym_kl, Reduction, SymKlGrad, SymKlOptions};

const ROWS: [usize; 5] = [1, 7, 123, 1025, 16384];
const VOCAB: [usize; 8] = [2, 3, 7, 1023, 1025, 30522, 50265, 128256];
/// The reduced set compute-sanitizer runs (`TUNEFUSE_TEST_QUICK=1`): every
/// kernel variant (warp / block, scalar / 16-byte) at small sizes.
const QUICK_ROWS: [usize; 2] = [1, 9];
const QUICK_VOCAB: [usize; 4] = [3, 1023, 1025, 4104];

fn quick() -> bool {
    std::env::var_os("TUNEFUSE_TEST_QUICK").is_some()
}
/// `TUNEFUSE_TEST_QUICK=tiny`: the adapter and LoRA grids shrink to two
/// shapes per dtype, for compute-sanitizer's racecheck, under which the
/// quick grid did not finish in 90 s on an H200.
fn tiny() -> bool {
    std::env::var("TUNEFUSE_TEST_QUICK").is_ok_and(|v| v == "tiny")
}
/// Device memory the test may take for one shape: inputs, two gradients and
/// the f32 random source. Larger combinations are skipped and named.
const MAX_BYTES: usize = 30 << 30;

/// Unit roundoff of a storage dtype: the relative error of storing a value.
fn unit_roundoff(dtype: DType) -> f64 {
    match dtype {
        DType::F32 => 2f64.powi(-24),
        DType::BF16 => 2f64.powi(-8),
        DType::F16 => 2f64.powi(-11),
        _ => unreachable!(),
    }
}

/// Smallest absolute spacing the dtype can represent near 0 (f16 subnormals;
/// the grads of a 128k vocabulary are around 1e-5 and below).
fn abs_floor(dtype: DType) -> f64 {
    if dtype == DType::F16 {
        2f64.powi(-24)
    } else {
        0.0
    }
}

fn sample_rows(rows: usize) -> Vec<usize> {
    if rows <= 64 {
        return (0..rows).collect();
    }
    let mut r = vec![
        0,
        1,
        rows / 3,
        rows / 2,
        rows - 2,
        rows - 1,
        (rows * 7) / 11,
    ];
    r.sort();
    r.dedup();
    r
}

fn rows_of(t: &Tensor, idx: &[usize]) -> Tensor {
    let ids = Tensor::new(
        idx.iter().map(|&i| i as u32).collect::<Vec<_>>(),
        t.device(),
    )
    .unwrap();
    t.index_select(&ids, 0)
        .unwrap()
        .to_device(&Device::Cpu)
        .unwrap()
}

/// Loss (f32 accumulation over up to 128k terms with __expf: relative error
/// ~1e-5 at most) and gradients (rounded to the dtype on store) against the
/// f64 reference.
fn compare(what: &str, dtype: DType, got: &[f64], want: &[f64], is_grad: bool) {
    if is_grad {
        let scale = want.iter().fold(0.0f64, |m, v| m.max(v.abs()));
        assert_close(
            what,
            got,
            want,
            1e-5 * scale + abs_floor(dtype),
            2.0 * unit_roundoff(dtype),
        );
    } else {
        assert_close(what, got, want, 1e-4, 1e-4);
    }
}

#[derive(Clone, Copy, Debug)]
enum Which {
    Sym(SymKlGrad),
    Kl,
}

fn loss_of(w: Which, a: &Tensor, b: &Tensor, reduction: Reduction, expected_grad: f32) -> Tensor {
    match w {
        Which::Sym(grad) => sym_kl(
            a,
            b,
            &SymKlOptions {
                grad,
                reduction,
                row_mask: None,
                expected_grad,
            },
        )
        .unwrap(),
        Which::Kl => kl(a, b, reduction, None).unwrap(),
    }
}

/// Forward, fused forward+backward with per-row incoming gradients, the
/// recomputing backward, and batchmean, on one shape.
fn check_shape(dev: &Device, dtype: DType, rows: usize, v: usize) {
    let a = Tensor::randn(0f32, 3.0, (rows, v), dev)
        .unwrap()
        .to_dtype(dtype)
        .unwrap();
    let b = Tensor::randn(0f32, 3.0, (rows, v), dev)
        .unwrap()
        .to_dtype(dtype)
        .unwrap();
    let w = Tensor::randn(0f32, 1.0, rows, dev).unwrap();
    let idx = sample_rows(rows);
    let (ca, cb, cw) = (
        rows_of(&a, &idx),
        rows_of(&b, &idx),
        rows_of(&w.unsqueeze(1).unwrap(), &idx).squeeze(1).unwrap(),
    );
    for which in [
        Which::Sym(SymKlGrad::Full),
        Which::Sym(SymKlGrad::Detached),
        Which::Kl,
    ] {
        let tag = format!("{which:?} {dtype:?} {rows}x{v}");
        // Reference on the sampled rows.
        let (ra, rb) = (
            Var::from_tensor(&ca.to_dtype(DType::F64).unwrap()).unwrap(),
            Var::from_tensor(&cb.to_dtype(DType::F64).unwrap()).unwrap(),
        );
        let rloss = loss_of(which, ra.as_tensor(), rb.as_tensor(), Reduction::None, 1.0);
        let rg = (&rloss * cw.to_dtype(DType::F64).unwrap())
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let rga = to_f64(rg.get(ra.as_tensor()).unwrap());
        let rgb = rg.get(rb.as_tensor()).map(to_f64);

        // Forward only (no autograd: loss kernel alone).
        let per_row = loss_of(which, &a, &b, Reduction::None, 1.0);
        compare(
            &format!("{tag}: per-row loss"),
            dtype,
            &to_f64(&rows_of(&per_row.unsqueeze(1).unwrap(), &idx)),
            &to_f64(&rloss),
            false,
        );

        // Fused forward (gradients for an incoming 1.0), then rows rescaled
        // by their incoming weight in backward.
        let (va, vb) = (Var::from_tensor(&a).unwrap(), Var::from_tensor(&b).unwrap());
        let loss = loss_of(which, va.as_tensor(), vb.as_tensor(), Reduction::None, 1.0);
        let total = (&loss * &w).unwrap().sum_all().unwrap();
        for pass in ["fused", "recomputed"] {
            // The first backward uses the gradients cached by the forward,
            // the second recomputes them with the gradient kernel.
            let g = total.backward().unwrap();
            let ga = to_f64(&rows_of(g.get(va.as_tensor()).unwrap(), &idx));
            compare(&format!("{tag}: ∂a ({pass})"), dtype, &ga, &rga, true);
            match (&rgb, g.get(vb.as_tensor())) {
                (Some(want), Some(gb)) => compare(
                    &format!("{tag}: ∂b ({pass})"),
                    dtype,
                    &to_f64(&rows_of(gb, &idx)),
                    want,
                    true,
                ),
                (None, None) => {}
                (want, got) => panic!(
                    "{tag}: ∂b present in reference: {}, in kernel: {}",
                    want.is_some(),
                    got.is_some()
                ),
            }
        }

        // batchmean with the expected incoming gradient: no rescale pass.
        // `kl` has no expected_grad option (it is 1); the rescale path, with
        // its second rounding, is what the per-row checks above exercise.
        let incoming = match which {
            Which::Sym(_) => 2.5,
            Which::Kl => 1.0,
        };
        let (va, vb) = (Var::from_tensor(&a).unwrap(), Var::from_tensor(&b).unwrap());
        let mean = loss_of(
            which,
            va.as_tensor(),
            vb.as_tensor(),
            Reduction::BatchMean,
            incoming as f32,
        );
        let g = (&mean * incoming).unwrap().backward().unwrap();
        let full_rows = to_f64(&per_row);
        let want_mean = full_rows.iter().sum::<f64>() / rows as f64;
        compare(
            &format!("{tag}: batchmean"),
            dtype,
            &to_f64(&mean),
            &[want_mean],
            false,
        );
        let rg1 = rloss.sum_all().unwrap().backward().unwrap();
        let want: Vec<f64> = to_f64(rg1.get(ra.as_tensor()).unwrap())
            .iter()
            .map(|x| x * incoming / rows as f64)
            .collect();
        compare(
            &format!("{tag}: batchmean ∂a"),
            dtype,
            &to_f64(&rows_of(g.get(va.as_tensor()).unwrap(), &idx)),
            &want,
            true,
        );
    }
}

#[test]
fn sym_kl_kernels_match_reference() {
    let Some(dev) = cuda_device() else { return };
    let mut skipped = Vec::new();
    let mut fails = Failures::default();
    let (rows_set, vocab_set): (&[usize], &[usize]) = if quick() {
        (&QUICK_ROWS, &QUICK_VOCAB)
    } else {
        (&ROWS, &VOCAB)
    };
    for dtype in [DType::F32, DType::BF16, DType::F16] {
        for &rows in rows_set {
            for &v in vocab_set {
                let bytes = rows * v * (4 * dtype.size_in_bytes() + 4);
                if bytes > MAX_BYTES {
                    skipped.push(format!("{dtype:?} {rows}x{v} ({} GiB)", bytes >> 30));
                    continue;
                }
                fails.check(|| check_shape(&dev, dtype, rows, v));
            }
        }
    }
    eprintln!(
        "sym_kl: skipped as too large for the memory budget: {}",
        if skipped.is_empty() {
            "none".into()
        } else {
            skipped.join(", ")
        }
    );
    fails.finish("sym_kl");
}

#[test]
fn sym_kl_row_mask_and_unaligned_views() {
    let Some(dev) = cuda_device() else { return };
    for dtype in [DType::F32, DType::BF16, DType::F16] {
        for v in [5, 1024, 4099] {
            let rows = 37;
            // Views starting one row (an odd number of elements) in.
            let big_a = Tensor::randn(0f32, 2.0, (rows + 1, v), &dev)
                .unwrap()
                .to_dtype(dtype)
                .unwrap();
            let big_b = Tensor::randn(0f32, 2.0, (rows + 1, v), &dev)
                .unwrap()
                .to_dtype(dtype)
                .unwrap();
            let (a, b) = (big_a.i(1..).unwrap(), big_b.i(1..).unwrap());
            let mask: Vec<u8> = (0..rows).map(|r| u8::from(r % 3 != 1)).collect();
            let o = SymKlOptions {
                row_mask: Some(Tensor::new(mask.as_slice(), &dev).unwrap()),
                ..Default::default()
            };
            let (va, vb) = (Var::from_tensor(&a).unwrap(), Var::from_tensor(&b).unwrap());
            let loss = sym_kl(va.as_tensor(), vb.as_tensor(), &o).unwrap();
            let g = loss.backward().unwrap();
            let cpu = |t: &Tensor| {
                Var::from_tensor(
                    &t.to_device(&Device::Cpu)
                        .unwrap()
                        .to_dtype(DType::F64)
                        .unwrap(),
                )
                .unwrap()
            };
            let (ra, rb) = (cpu(&a), cpu(&b));
            let oc = SymKlOptions {
                row_mask: Some(Tensor::new(mask.as_slice(), &Device::Cpu).unwrap()),
                ..Default::default()
            };
            let rloss = sym_kl(ra.as_tensor(), rb.as_tensor(), &oc).unwrap();
            let rg = rloss.backward().unwrap();
            let tag = format!("masked {dtype:?} {rows}x{v}");
            compare(
                &format!("{tag}: loss"),
                dtype,
                &to_f64(&loss),
                &to_f64(&rloss),
                false,
            );
            compare(
                &format!("{tag}: ∂a"),
                dtype,
                &to_f64(g.get(va.as_tensor()).unwrap()),
                &to_f64(rg.get(ra.as_tensor()).unwrap()),
                true,
            );
            compare(
                &format!("{tag}: ∂b"),
                dtype,
                &to_f64(g.get(vb.as_tensor()).unwrap()),
                &to_f64(rg.get(rb.as_tensor()).unwrap()),
                true,
            );
        }
    }
}

#[test]
fn sym_kl_extremes_on_device() {
    let Some(dev) = cuda_device() else { return };
    let xa = [0.5, f64::NEG_INFINITY, -1e4, 1e4, 2.0, 0.0, f64::NAN, 1.0];
    let xb = [1.5, f64::NEG_INFINITY, 1e4, -1e4, -2.0, 0.0, 0.0, 1.0];
    let mut fails = Failures::default();
    for dtype in [DType::F32, DType::BF16, DType::F16] {
        fails.check(|| {
            let (a, b) = (
                tensor(&xa, &[2, 4], dtype, &dev),
                tensor(&xb, &[2, 4], dtype, &dev),
            );
            let (ca, cb) = (
                tensor(&xa, &[2, 4], dtype, &Device::Cpu),
                tensor(&xb, &[2, 4], dtype, &Device::Cpu),
            );
            let o = SymKlOptions {
                reduction: Reduction::None,
                ..Default::default()
            };
            let got = to_f64(&sym_kl(&a, &b, &o).unwrap());
            let want = to_f64(&sym_kl(&ca, &cb, &o).unwrap());
            assert!(
                got[1].is_nan() && want[1].is_nan(),
                "{dtype:?}: NaN row: {got:?}"
            );
            compare(
                &format!("{dtype:?} ±1e4 / -inf row"),
                dtype,
                &got[..1],
                &want[..1],
                false,
            );
        });
    }
    fails.finish("sym_kl extremes");
}

#[test]
fn mixout_and_dropouts_bit_identical_to_cpu() {
    let Some(dev) = cuda_device() else { return };
    let mut fails = Failures::default();
    for dtype in [DType::F32, DType::BF16, DType::F16] {
        let sizes: &[usize] = if quick() {
            &[1, 7, 1025]
        } else {
            &[1, 7, 123, 1025, 30522, (1 << 20) + 3]
        };
        for &n in sizes {
            for p in [0.1, 0.5] {
                fails.check(|| {
                    let rng = Rng {
                        seed: 0xfeed_beef ^ n as u64,
                        offset: 17,
                    };
                    let w = Tensor::randn(0f32, 1.0, n + 1, &dev)
                        .unwrap()
                        .to_dtype(dtype)
                        .unwrap();
                    let u = Tensor::randn(0f32, 1.0, n + 1, &dev)
                        .unwrap()
                        .to_dtype(dtype)
                        .unwrap();
                    // Aligned (from 0) and unaligned (from 1) views.
                    for start in [0, 1] {
                        let (w, u) = (
                            w.narrow(0, start, n).unwrap(),
                            u.narrow(0, start, n).unwrap(),
                        );
                        let (cw, cu) = (
                            w.to_device(&Device::Cpu).unwrap(),
                            u.to_device(&Device::Cpu).unwrap(),
                        );
                        let tag = format!("{dtype:?} n={n} p={p} start={start}");
                        let got = to_f64(&mixout(&w, &u, p, rng, true).unwrap());
                        let want = to_f64(&mixout(&cw, &cu, p, rng, true).unwrap());
                        assert!(got == want, "{tag}: mixout differs from the CPU reference");
                        let got = to_f64(&dropout(&w, p, rng, true).unwrap());
                        let want = to_f64(&dropout(&cw, p, rng, true).unwrap());
                        assert!(got == want, "{tag}: dropout differs from the CPU reference");
                        let got = to_f64(&dropout_add(&w, &u, p, rng, true).unwrap());
                        let want = to_f64(&dropout_add(&cw, &cu, p, rng, true).unwrap());
                        assert!(
                            got == want,
                            "{tag}: dropout_add differs from the CPU reference"
                        );
                    }
                    // The mask itself, through dropout of ones, and in backward.
                    let ones = Var::from_tensor(&Tensor::ones(n, dtype, &dev).unwrap()).unwrap();
                    let y = dropout(ones.as_tensor(), p, rng, true).unwrap();
                    let mask: Vec<bool> = to_f64(&y).iter().map(|&v| v != 0.0).collect();
                    assert_eq!(
                        mask,
                        keep_mask(n, p, rng).unwrap(),
                        "{dtype:?} n={n}: dropout mask"
                    );
                    let g = y.sum_all().unwrap().backward().unwrap();
                    assert_eq!(
                        to_f64(g.get(ones.as_tensor()).unwrap()),
                        to_f64(&y),
                        "{dtype:?} n={n}: backward mask"
                    );
                });
            }
        }
    }
    fails.finish("mixout / dropout / dropout_add");
}

/// Draws inside a training step take their Philox start from a device
/// counter (`StepAnchor`, kernels/common.cuh `philox_offset`): over steps
/// of several sizes, with draws between steps that the counter did not see
/// (Monte Carlo dropout in an evaluation) and a draw from before the step's
/// start, dropout, dropout_add, mixout and the noise (f32 and bf16, element
/// by element and in 16-byte chunks) equal the CPU's absolute draws bit for
/// bit, and anchored attention dropout equals the same op unanchored, so
/// the counter holds the host's offset at every step and `end` moves it
/// past exactly the step's draws (also when a step is split by an end and a
/// begin at the same position).
#[test]
fn anchored_draws_equal_the_cpus_across_steps() {
    use tunefuse::model::StepAnchor;
    use tunefuse::ops::attention_probs;
    let Some(dev) = cuda_device() else { return };
    let seed = 0x0a11_c0de;
    let mut anchor = StepAnchor::default();
    let mut pos = 5u64;
    let n = 1025;
    let x = Tensor::randn(0f32, 1.0, n, &dev)
        .unwrap()
        .to_dtype(DType::BF16)
        .unwrap();
    let u = Tensor::randn(0f32, 1.0, n, &dev)
        .unwrap()
        .to_dtype(DType::BF16)
        .unwrap();
    let (cx, cu) = (
        x.to_device(&Device::Cpu).unwrap(),
        u.to_device(&Device::Cpu).unwrap(),
    );
    let mask_cpu = Tensor::ones((2, 3), DType::F32, &Device::Cpu).unwrap();
    let mask = mask_cpu.to_device(&dev).unwrap();
    let s = Tensor::randn(0f32, 1.0, (2, 2, 5, 5), &dev).unwrap();
    let bias = Tensor::zeros((2, 1, 1, 5), DType::F32, &dev).unwrap();
    for (step, draws) in [3usize, 1, 3, 2].into_iter().enumerate() {
        if step == 2 {
            // Draws outside the steps: the next begin uploads the counter.
            pos += 1000;
        }
        anchor.begin(&dev, Rng { seed, offset: pos }).unwrap();
        for d in 0..draws {
            let rng = Rng { seed, offset: pos };
            let tag = format!("step {step} draw {d} at {pos}");
            assert_eq!(
                to_f64(&dropout(&x, 0.1, rng, true).unwrap()),
                to_f64(&dropout(&cx, 0.1, rng, true).unwrap()),
                "{tag}: dropout"
            );
            assert_eq!(
                to_f64(&dropout_add(&x, &u, 0.1, rng, true).unwrap()),
                to_f64(&dropout_add(&cx, &cu, 0.1, rng, true).unwrap()),
                "{tag}: dropout_add"
            );
            assert_eq!(
                to_f64(&mixout(&x, &u, 0.1, rng, true).unwrap()),
                to_f64(&mixout(&cx, &cu, 0.1, rng, true).unwrap()),
                "{tag}: mixout"
            );
            // The noise at H = 7 (element by element) and 16 (16-byte
            // chunks in both dtypes).
            let noise = Noise::Uniform { sigma: 0.5 };
            for (h, dt) in [(7, DType::F32), (16, DType::F32), (16, DType::BF16)] {
                assert_eq!(
                    to_f64(&noise_init(&[2, 3, h], &mask, noise, dt, rng).unwrap()),
                    to_f64(&noise_init(&[2, 3, h], &mask_cpu, noise, dt, rng).unwrap()),
                    "{tag}: noise {dt:?} H={h}"
                );
            }
            // Attention dropout: anchored equals unanchored on the device.
            let anchored = to_f64(&attention_probs(&s, &bias, 0.125, Some((0.1, rng))).unwrap());
            anchor.end(Rng { seed, offset: pos }).unwrap();
            let absolute = to_f64(&attention_probs(&s, &bias, 0.125, Some((0.1, rng))).unwrap());
            anchor.begin(&dev, Rng { seed, offset: pos }).unwrap();
            assert_eq!(anchored, absolute, "{tag}: attention dropout");
            pos += tunefuse::philox::counters_for(n);
        }
        // A draw from before the step's start takes its absolute offset.
        let early = Rng { seed, offset: 1 };
        assert_eq!(
            to_f64(&dropout(&x, 0.5, early, true).unwrap()),
            to_f64(&dropout(&cx, 0.5, early, true).unwrap()),
            "step {step}: a draw before the anchor"
        );
        anchor.end(Rng { seed, offset: pos }).unwrap();
    }
}

// ------------------------------------------------------------ AdamW

/// Bit patterns (as f64, which holds f32 exactly, signs of zeros included).
fn bit_patterns(t: &Tensor) -> Vec<u64> {
    to_f64(t).iter().map(|x| x.to_bits()).collect()
}

#[test]
fn adamw_kernels_bit_identical_to_cpu() {
    use tunefuse::ops::{adamw_state, adamw_step};
    let Some(dev) = cuda_device() else { return };
    let mut fails = Failures::default();
    let sizes: &[usize] = if quick() {
        &[1, 7, 1025]
    } else {
        // The last runs the grid-stride loop twice (the grid is capped at
        // 132 x 32 blocks of 256 threads).
        &[1, 7, 123, 1025, 30522, (1 << 21) + 3]
    };
    for dtype in [DType::F32, DType::F64] {
        for &n in sizes {
            for variant in 0..8u64 {
                let (scaled, recadam, decay) =
                    (variant & 1 != 0, variant & 2 != 0, variant & 4 != 0);
                fails.check(|| {
                    let draw = |scale: f64| {
                        (Tensor::randn(0f32, 1.0, n + 1, &dev).unwrap() * scale)
                            .unwrap()
                            .to_dtype(dtype)
                            .unwrap()
                    };
                    // The parameter is a view from element 1 of a larger
                    // tensor (an offset, and unaligned), updated in place.
                    let big = draw(1.0);
                    let p = big.narrow(0, 1, n).unwrap();
                    let anchor = draw(1.0).narrow(0, 0, n).unwrap();
                    let state = adamw_state(&p).unwrap();
                    let cbig = big.to_device(&Device::Cpu).unwrap();
                    let cp = cbig.narrow(0, 1, n).unwrap();
                    let canchor = anchor.to_device(&Device::Cpu).unwrap();
                    let cstate = adamw_state(&cp).unwrap();
                    for t in 1..=3i32 {
                        // Gradients over magnitudes, half of them exactly 0;
                        // in the last step a bf16 gradient (converted).
                        let mut g = draw(10f64.powi(t - 3))
                            .narrow(0, 0, n)
                            .unwrap()
                            .relu()
                            .unwrap();
                        if t == 3 {
                            g = g.to_dtype(DType::BF16).unwrap();
                        }
                        let cg = g.to_device(&Device::Cpu).unwrap();
                        let k = Tensor::new(0.37f64 + 0.1 * t as f64, &dev).unwrap();
                        let ck = k.to_device(&Device::Cpu).unwrap();
                        let c = adamw_test_step(t, decay, recadam);
                        adamw_step(
                            &p,
                            &state,
                            &g,
                            scaled.then_some(&k),
                            recadam.then_some(&anchor),
                            &c,
                        )
                        .unwrap();
                        adamw_step(
                            &cp,
                            &cstate,
                            &cg,
                            scaled.then_some(&ck),
                            recadam.then_some(&canchor),
                            &c,
                        )
                        .unwrap();
                        let tag = format!("{dtype:?} n={n} variant {variant} step {t}");
                        assert!(
                            bit_patterns(&big) == bit_patterns(&cbig),
                            "{tag}: parameter differs from the CPU op"
                        );
                        assert!(
                            bit_patterns(&state) == bit_patterns(&cstate),
                            "{tag}: moments differ from the CPU op"
                        );
                    }
                });
            }
        }
    }
    fails.finish("adamw");
}

/// The multi-tensor optimiser step (one table, three launches for every
/// tensor) against the per-tensor CPU op: the norm to f32 rounding of the
/// chunk sums, the clipping factor by clip_scale's formula, and then every
/// parameter and moment bit for bit (given the same factor). Tensors span
/// one to four chunks of 64 Ki elements, are views at an offset, and mix
/// decay, no decay and RecAdam, f32 and bf16 gradients (mixed precision's
/// weight gradients), with and without a bf16 copy of the parameter, which
/// must come out as the CPU's bf16 cast of the new parameter. Three steps
/// over the same parameters upload the table once (each step's gradient
/// addresses travel as the kernels' argument; its bias corrections,
/// learning rates and RecAdam weights are written into the cache's device
/// buffer, so a stale buffer shows at steps 2 and 3); a step over other
/// parameters uploads the table again and updates them.
#[cfg(feature = "cuda")]
#[test]
fn multi_tensor_clip_and_step_matches_the_per_tensor_op() {
    use tunefuse::ops::adamw::{multi, AdamWTensor};
    use tunefuse::ops::{adamw_state, adamw_step};
    let Some(dev) = cuda_device() else { return };
    let sizes: &[usize] = if quick() {
        &[1, 7, 65537]
    } else {
        &[1, 7, 1025, 65536, 65537, 200_003]
    };
    let mut fails = Failures::default();
    for max_norm in [0.0, 1.0, 1e6] {
        fails.check(|| {
            let draw = |n: usize, scale: f64| {
                (Tensor::randn(0f32, 1.0, n, &dev).unwrap() * scale).unwrap()
            };
            // (the larger tensor the parameter is a view of, anchor, state)
            let bigs: Vec<Tensor> = sizes.iter().map(|&n| draw(n + 1, 1.0)).collect();
            let params: Vec<Tensor> = bigs
                .iter()
                .zip(sizes)
                .map(|(b, &n)| b.narrow(0, 1, n).unwrap())
                .collect();
            let anchors: Vec<Tensor> = sizes.iter().map(|&n| draw(n, 1.0)).collect();
            let states: Vec<Tensor> = params.iter().map(|p| adamw_state(p).unwrap()).collect();
            let cpu = |t: &Tensor| t.to_device(&Device::Cpu).unwrap();
            let cbigs: Vec<Tensor> = bigs.iter().map(cpu).collect();
            let cparams: Vec<Tensor> = cbigs
                .iter()
                .zip(sizes)
                .map(|(b, &n)| b.narrow(0, 1, n).unwrap())
                .collect();
            let canchors: Vec<Tensor> = anchors.iter().map(cpu).collect();
            let cstates: Vec<Tensor> = cparams.iter().map(|p| adamw_state(p).unwrap()).collect();
            // The copies keep their memory from step to step, as a training
            // run's do; the gradients are new tensors at every step, as a
            // backward pass's are. Steps 2 and 3 reuse the first step's table
            // with their own gradients and scalars.
            let shadows: Vec<Tensor> = sizes
                .iter()
                .map(|&n| Tensor::zeros(n, DType::BF16, &dev).unwrap())
                .collect();
            let mut cache = multi::TableCache::default();
            for t in 1..=3i32 {
                let grads: Vec<Tensor> = sizes
                    .iter()
                    .enumerate()
                    .map(|(i, &n)| {
                        let g = draw(n, 10f64.powi(t - 2)).relu().unwrap();
                        if i % 2 == 1 {
                            g.to_dtype(DType::BF16).unwrap()
                        } else {
                            g
                        }
                    })
                    .collect();
                let steps: Vec<_> = (0..sizes.len())
                    .map(|i| adamw_test_step(t, i % 2 == 0, i % 3 == 1))
                    .collect();
                let items: Vec<AdamWTensor<'_>> = (0..sizes.len())
                    .map(|i| AdamWTensor {
                        param: &params[i],
                        state: &states[i],
                        grad: &grads[i],
                        anchor: steps[i].recadam.and(Some(&anchors[i])),
                        shadow: (i % 3 != 2).then_some(&shadows[i]),
                        step: steps[i],
                    })
                    .collect();
                let norm = multi::clip_and_step(&items, max_norm, &mut cache)
                    .unwrap()
                    .expect("the multi-tensor form applies to contiguous f32 CUDA tensors");
                let norm = norm.to_scalar::<f64>().unwrap();
                let want: f64 = grads
                    .iter()
                    .flat_map(to_f64)
                    .map(|g| g * g)
                    .sum::<f64>()
                    .sqrt();
                let tag = format!("max_norm {max_norm} step {t}");
                assert!(
                    (norm - want).abs() <= 1e-5 * want,
                    "{tag}: norm {norm}, f64 reference {want}"
                );
                let factor = (max_norm > 0.0 && norm > max_norm).then(|| max_norm / (norm + 1e-6));
                let k = Tensor::new(factor.unwrap_or(1.0), &Device::Cpu).unwrap();
                for i in 0..sizes.len() {
                    adamw_step(
                        &cparams[i],
                        &cstates[i],
                        &cpu(&grads[i]),
                        (max_norm > 0.0).then_some(&k),
                        steps[i].recadam.and(Some(&canchors[i])),
                        &steps[i],
                    )
                    .unwrap();
                    let what = format!("{tag} tensor {i} (n = {})", sizes[i]);
                    assert!(
                        bit_patterns(&bigs[i]) == bit_patterns(&cbigs[i]),
                        "{what}: parameter differs from the CPU op"
                    );
                    assert!(
                        bit_patterns(&states[i]) == bit_patterns(&cstates[i]),
                        "{what}: moments differ from the CPU op"
                    );
                    if i % 3 != 2 {
                        let want = cparams[i].to_dtype(DType::BF16).unwrap();
                        assert!(
                            bit_patterns(&shadows[i]) == bit_patterns(&want),
                            "{what}: the bf16 copy is not bf16(new parameter)"
                        );
                    }
                }
            }
            assert_eq!(
                cache.uploads(),
                1,
                "max_norm {max_norm}: three steps over the same parameters uploaded the table more than once"
            );
            // Other parameters: the cached table must not serve them.
            let others: Vec<Tensor> = sizes.iter().map(|&n| draw(n, 1.0)).collect();
            let ostates: Vec<Tensor> = others.iter().map(|p| adamw_state(p).unwrap()).collect();
            let ograds: Vec<Tensor> = sizes.iter().map(|&n| draw(n, 0.1)).collect();
            let step = adamw_test_step(4, true, false);
            let items: Vec<AdamWTensor<'_>> = (0..sizes.len())
                .map(|i| AdamWTensor {
                    param: &others[i],
                    state: &ostates[i],
                    grad: &ograds[i],
                    anchor: None,
                    shadow: None,
                    step,
                })
                .collect();
            let before = others.iter().map(cpu).collect::<Vec<_>>();
            let norm = multi::clip_and_step(&items, max_norm, &mut cache)
                .unwrap()
                .expect("the multi-tensor form applies")
                .to_scalar::<f64>()
                .unwrap();
            assert_eq!(cache.uploads(), 2, "max_norm {max_norm}: other parameters reused the table");
            let factor = (max_norm > 0.0 && norm > max_norm).then(|| max_norm / (norm + 1e-6));
            let k = Tensor::new(factor.unwrap_or(1.0), &Device::Cpu).unwrap();
            for (i, cp) in before.iter().enumerate() {
                let cs = adamw_state(cp).unwrap();
                let g = cpu(&ograds[i]);
                adamw_step(cp, &cs, &g, (max_norm > 0.0).then_some(&k), None, &step).unwrap();
                assert!(
                    bit_patterns(&others[i]) == bit_patterns(cp),
                    "max_norm {max_norm}: other tensor {i} differs from the CPU op"
                );
            }
        });
    }
    fails.finish("multi-tensor step");
}

/// The copies' refresh (one launch for every pair) against the CPU's cast:
/// masters that are views at an offset, one to four chunks, NaN, ±inf and
/// values that round up, to even and into the exponent.
#[cfg(feature = "cuda")]
#[test]
fn multi_tensor_cast_matches_the_cpu_cast() {
    use candle_core::Var;
    use tunefuse::ops::cast_into;
    let Some(dev) = cuda_device() else { return };
    let sizes = [1usize, 7, 65537, 200_003];
    let special = [
        f32::NAN,
        f32::INFINITY,
        -f32::INFINITY,
        1.0039062,
        1.0058594,
        3.3895314e38,
        -0.0,
    ];
    let masters: Vec<Tensor> = sizes
        .iter()
        .map(|&n| {
            let mut v: Vec<f32> = Tensor::randn(0f32, 3.0, n + 2, &Device::Cpu)
                .unwrap()
                .to_vec1()
                .unwrap();
            for (k, x) in special.iter().enumerate().take(n) {
                v[1 + k] = *x;
            }
            Tensor::from_vec(v, n + 2, &dev)
                .unwrap()
                .narrow(0, 1, n)
                .unwrap()
        })
        .collect();
    let copies: Vec<Var> = sizes
        .iter()
        .map(|&n| Var::zeros(n, DType::BF16, &dev).unwrap())
        .collect();
    // Masters 1 and 2 also go into one packed copy, at rows 0 and 7 (a
    // fused layer's copy): each to its rows.
    let packed = Var::zeros(sizes[1] + sizes[2], DType::BF16, &dev).unwrap();
    let mut pairs: Vec<(&Tensor, &Var, Option<usize>)> = masters
        .iter()
        .zip(&copies)
        .map(|(m, c)| (m, c, None))
        .collect();
    pairs.push((&masters[1], &packed, Some(0)));
    pairs.push((&masters[2], &packed, Some(sizes[1])));
    cast_into(&pairs).unwrap();
    // Bits compared as bf16 (a NaN matches any NaN: the payloads of the
    // CPU's and the device's conversions may differ).
    let bits = |t: &Tensor| -> Vec<Option<u16>> {
        let v: Vec<half::bf16> = t.to_device(&Device::Cpu).unwrap().to_vec1().unwrap();
        v.iter()
            .map(|x| (!x.is_nan()).then(|| x.to_bits()))
            .collect()
    };
    for (i, (m, c)) in masters.iter().zip(&copies).enumerate() {
        let want = m
            .to_device(&Device::Cpu)
            .unwrap()
            .to_dtype(DType::BF16)
            .unwrap();
        assert!(
            bits(c.as_tensor()) == bits(&want),
            "pair {i} (n = {}): the copy is not the CPU's bf16 cast",
            sizes[i]
        );
    }
    for (i, at) in [(1, 0), (2, sizes[1])] {
        let rows = packed.narrow(0, at, sizes[i]).unwrap();
        let want = masters[i]
            .to_device(&Device::Cpu)
            .unwrap()
            .to_dtype(DType::BF16)
            .unwrap();
        assert!(
            bits(&rows) == bits(&want),
            "master {i}'s rows of the packed copy"
        );
    }
}

// ------------------------------------------------------------ LayerNorm

/// LayerNorm forward and backward (x in the dtype, f32 weights) against the
/// f64 reference on the same values. Allowances follow the kernels' f32
/// arithmetic: a row sum of H terms (n terms in order per lane, then a
/// shuffle tree over the lanes, exact where it adds a lane's zero) errs by
/// at most (n − 1 + ⌈log₂ lanes used⌉)·u₃₂ of the sum of magnitudes;
/// K = 2 + H/32 + log₂H covers that for both ways the kernels walk a row
/// (element c to lane c % 32: n = ⌈H/32⌉; packs of 16 bytes, N elements,
/// pack p to lane p % 32: n = ⌈H/(32N)⌉·N), checked per shape below;
/// x − μ carries |μ|·u₃₂ (so |μ|·r counts beside |x̂|); outputs round once to
/// the dtype (2·u_dtype). The weight gradients sum CHUNK = 64 rows in order,
/// then the chunks in order.
fn check_layer_norm(dev: &Device, dtype: DType, rows: usize, h: usize, offset: f64) {
    use tunefuse::ops::layer_norm;
    let x = ((Tensor::randn(0f32, 1.5, (rows, h), dev).unwrap() + offset).unwrap())
        .to_dtype(dtype)
        .unwrap();
    let x = Var::from_tensor(&x).unwrap();
    let w = Var::from_tensor(&(Tensor::randn(0f32, 0.2, h, dev).unwrap() + 1.0).unwrap()).unwrap();
    let b = Var::from_tensor(&Tensor::randn(0f32, 0.1, h, dev).unwrap()).unwrap();
    let dy = Tensor::randn(0f32, 1.0, (rows, h), dev)
        .unwrap()
        .to_dtype(dtype)
        .unwrap();
    let y = layer_norm(x.as_tensor(), w.as_tensor(), b.as_tensor(), 1e-12).unwrap();
    let g = (y.to_dtype(DType::F32).unwrap() * dy.to_dtype(DType::F32).unwrap())
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    let got = |t: &Tensor| to_f64(t);
    let (gy, gdx, gdw, gdb) = (
        got(&y),
        got(g.get(x.as_tensor()).unwrap()),
        got(g.get(w.as_tensor()).unwrap()),
        got(g.get(b.as_tensor()).unwrap()),
    );
    // The reference on the same values, in f64.
    let cpu = |t: &Tensor| {
        Var::from_tensor(
            &t.to_device(&Device::Cpu)
                .unwrap()
                .to_dtype(DType::F64)
                .unwrap(),
        )
        .unwrap()
    };
    let (x64, w64, b64) = (cpu(x.as_tensor()), cpu(w.as_tensor()), cpu(b.as_tensor()));
    let dy64 = cpu(&dy);
    let y64 = layer_norm(x64.as_tensor(), w64.as_tensor(), b64.as_tensor(), 1e-12).unwrap();
    let g64 = (&y64 * dy64.as_tensor())
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    let (ry, rdx, rdw, rdb) = (
        to_f64(&y64),
        to_f64(g64.get(x64.as_tensor()).unwrap()),
        to_f64(g64.get(w64.as_tensor()).unwrap()),
        to_f64(g64.get(b64.as_tensor()).unwrap()),
    );
    let (xv, wv, bv, dyv) = (
        to_f64(x64.as_tensor()),
        to_f64(w64.as_tensor()),
        to_f64(b64.as_tensor()),
        to_f64(dy64.as_tensor()),
    );
    let (u, ud) = (2f64.powi(-24), unit_roundoff(dtype));
    let k = 2.0 + h as f64 / 32.0 + (h as f64).log2();
    let pack = 16 / dtype.size_in_bytes();
    let (per_lane, lanes) = if h.is_multiple_of(pack) {
        (h.div_ceil(32 * pack) * pack, (h / pack).min(32))
    } else {
        (h.div_ceil(32), h.min(32))
    };
    let roundings = per_lane - 1 + lanes.next_power_of_two().trailing_zeros() as usize;
    assert!(
        roundings as f64 <= k,
        "K = {k} does not cover {per_lane} terms per lane and {lanes} lanes at H = {h}"
    );
    // Per row: r, |μ|·r + 1, mean|g|, mean(|g|·(|x̂| + |μ|r + 1)).
    let mut xh = vec![0.0; rows * h];
    let mut row = Vec::with_capacity(rows);
    for i in 0..rows {
        let xs = &xv[i * h..(i + 1) * h];
        let mean = xs.iter().sum::<f64>() / h as f64;
        let var = xs.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / h as f64;
        let r = 1.0 / (var + 1e-12).sqrt();
        let off = mean.abs() * r + 1.0;
        let (mut mg, mut mgx) = (0.0, 0.0);
        for c in 0..h {
            xh[i * h + c] = (xs[c] - mean) * r;
            let gm = (dyv[i * h + c] * wv[c]).abs();
            mg += gm / h as f64;
            mgx += gm * (xh[i * h + c].abs() + off) / h as f64;
        }
        row.push((r, off, mg, mgx));
    }
    let tag = format!("{dtype:?} {rows}x{h} offset {offset}");
    assert_within(
        &format!("y {tag}"),
        &gy,
        &ry,
        |i| {
            let (_, off, _, _) = row[i / h];
            2.0 * ud * ry[i].abs()
                + 4.0 * k * u * (wv[i % h].abs() * (xh[i].abs() + off) + bv[i % h].abs())
        },
        |_| "f32 row sums, one rounding".into(),
    );
    assert_within(
        &format!("dx {tag}"),
        &gdx,
        &rdx,
        |i| {
            let (r, off, mg, mgx) = row[i / h];
            let gi = (dyv[i] * wv[i % h]).abs();
            2.0 * ud * rdx[i].abs() + 8.0 * k * u * r * (gi + mg + (xh[i].abs() + off) * mgx)
        },
        |_| "f32 row sums, one rounding".into(),
    );
    let chunks = rows.div_ceil(64) as f64;
    let terms = 4.0 * (64.0 + chunks + k) * u;
    let col = |c: usize, f: &dyn Fn(usize) -> f64| (0..rows).map(|i| f(i * h + c)).sum::<f64>();
    assert_within(
        &format!("dw {tag}"),
        &gdw,
        &rdw,
        |c| u * rdw[c].abs() + terms * col(c, &|j| dyv[j].abs() * (xh[j].abs() + row[j / h].1)),
        |_| "chunked f32 column sums".into(),
    );
    assert_within(
        &format!("db {tag}"),
        &gdb,
        &rdb,
        |c| u * rdb[c].abs() + terms * col(c, &|j| dyv[j].abs()),
        |_| "chunked f32 column sums".into(),
    );
}

#[test]
fn layer_norm_kernels_match_reference() {
    let Some(dev) = cuda_device() else { return };
    let mut fails = Failures::default();
    let (rows, hs): (&[usize], &[usize]) = if quick() {
        (&[1, 9, 130], &[1, 33, 384])
    } else {
        (
            &[1, 7, 123, 1025, 16384],
            &[1, 7, 33, 384, 1000, 1024, 4096],
        )
    };
    for dtype in [DType::F32, DType::BF16, DType::F16] {
        for &r in rows {
            for &h in hs {
                if r * h > 1 << 22 {
                    continue; // the f64 reference's memory and time
                }
                for offset in [0.0, 30.0] {
                    fails.check(|| check_layer_norm(&dev, dtype, r, h, offset));
                }
            }
        }
    }
    fails.finish("layer_norm");
}

// ------------------------------------------------------------ perturbation

/// Examples compared with the reference: all of a small batch, three of 32.
fn sample_examples(b: usize) -> Vec<usize> {
    if b <= 3 {
        (0..b).collect()
    } else {
        vec![0, b / 2 + 1, b - 1]
    }
}

#[test]
fn ascent_step_kernels_match_reference() {
    let Some(dev) = cuda_device() else { return };
    let mut fails = Failures::default();
    let (bs, ls, hs): (&[usize], &[usize], &[usize]) = if quick() {
        (&[1, 3], &[1, 7], &[1, 7, 384])
    } else {
        (&[1, 3, 32], &[1, 7, 128, 512], &[1, 7, 384, 768, 1024])
    };
    let modes = [
        StepMode::Pgd { eps: Some(0.05) },
        StepMode::Pgd { eps: None },
        StepMode::Direction { eps0: 1e-6 },
        StepMode::NormalizedStep { eps0: 1e-6 },
    ];
    for dtype in [DType::F32, DType::BF16, DType::F16] {
        for &b in bs {
            for &l in ls {
                for &h in hs {
                    let delta = (Tensor::randn(0f32, 0.02, (b, l, h), &dev).unwrap())
                        .to_dtype(dtype)
                        .unwrap();
                    let grad = Tensor::randn(0f32, 1.0, (b, l, h), &dev)
                        .unwrap()
                        .to_dtype(dtype)
                        .unwrap();
                    // Every example keeps its first token; others are padding at random.
                    let keep = Tensor::rand(0f32, 1.0, (b, l), &dev)
                        .unwrap()
                        .ge(0.3)
                        .unwrap();
                    let first = Tensor::ones((b, 1), DType::U8, &dev).unwrap();
                    let mask = if l > 1 {
                        Tensor::cat(&[&first, &keep.narrow(1, 1, l - 1).unwrap()], 1).unwrap()
                    } else {
                        first
                    };
                    let idx = sample_examples(b);
                    let (cd, cg, cm) = (
                        rows_of(&delta, &idx),
                        rows_of(&grad, &idx),
                        rows_of(&mask, &idx),
                    );
                    for norm in [Norm::L2, Norm::Linf] {
                        for granularity in [Granularity::Token, Granularity::Example] {
                            for mode in modes {
                                fails.check(|| {
                                    let s = AscentStep {
                                        eta: 0.01,
                                        norm,
                                        granularity,
                                        mode,
                                    };
                                    let tag = format!("{s:?} {dtype:?} {b}x{l}x{h}");
                                    let (out, flags) =
                                        ascent_step(&delta, &grad, &mask, &s).unwrap();
                                    let (want, wflags) = ascent_step(&cd, &cg, &cm, &s).unwrap();
                                    let want = to_f64(&want);
                                    let scale = want.iter().fold(0.0f64, |m, v| m.max(v.abs()));
                                    // f32 statistics (pgd's projection radius comes
                                    // from an expansion of |delta + beta g|^2) and
                                    // rounding of the output to the dtype.
                                    assert_close(
                                        &tag,
                                        &to_f64(&rows_of(&out, &idx)),
                                        &want,
                                        1e-5 * scale + abs_floor(dtype),
                                        2.0 * unit_roundoff(dtype),
                                    );
                                    assert_eq!(
                                        to_f64(&rows_of(&flags.unsqueeze(1).unwrap(), &idx)),
                                        to_f64(&wflags),
                                        "{tag}: flags"
                                    );
                                });
                            }
                        }
                    }
                }
            }
        }
    }
    fails.finish("ascent step");
}

#[test]
fn ascent_step_flags_nonfinite_on_device() {
    let Some(dev) = cuda_device() else { return };
    let (b, l, h) = (3, 4, 33);
    let mut g = randn(b * l * h, 1, 1.0);
    g[l * h + 5] = f64::INFINITY;
    g[2 * l * h + 2 * h] = f64::NAN;
    for dtype in [DType::F32, DType::BF16, DType::F16] {
        let grad = tensor(&g, &[b, l, h], dtype, &dev);
        let delta = Tensor::zeros((b, l, h), dtype, &dev).unwrap();
        let mask = Tensor::ones((b, l), DType::F32, &dev).unwrap();
        for granularity in [Granularity::Token, Granularity::Example] {
            let s = AscentStep {
                eta: 0.1,
                norm: Norm::L2,
                granularity,
                mode: StepMode::Direction { eps0: 1e-6 },
            };
            let (_, flags) = ascent_step(&delta, &grad, &mask, &s).unwrap();
            assert_eq!(
                to_f64(&flags),
                vec![0.0, 1.0, 1.0],
                "{dtype:?} {granularity:?}"
            );
        }
    }
}

#[test]
fn noise_kernels_match_reference() {
    let Some(dev) = cuda_device() else { return };
    let mut fails = Failures::default();
    let shapes: &[(usize, usize, usize)] = if quick() {
        &[(1, 7, 5), (3, 7, 384)]
    } else {
        &[(1, 1, 1), (1, 7, 5), (3, 7, 384), (32, 512, 768)]
    };
    for dtype in [DType::F32, DType::BF16, DType::F16] {
        for &(b, l, h) in shapes {
            fails.check(|| {
                let mask_cpu = Tensor::rand(0f32, 1.0, (b, l), &Device::Cpu)
                    .unwrap()
                    .ge(0.2)
                    .unwrap();
                let mask = mask_cpu.to_device(&dev).unwrap();
                let rng = Rng {
                    seed: 0x5eed ^ (b * l * h) as u64,
                    offset: 3,
                };
                let sigma = 0.7;
                let tag = format!("{dtype:?} {b}x{l}x{h}");
                // Uniform: the same bits.
                let got = to_f64(
                    &noise_init(&[b, l, h], &mask, Noise::Uniform { sigma }, dtype, rng).unwrap(),
                );
                let want = to_f64(
                    &noise_init(&[b, l, h], &mask_cpu, Noise::Uniform { sigma }, dtype, rng)
                        .unwrap(),
                );
                assert!(got == want, "{tag}: uniform noise differs from the CPU's");
                // Normal: f32 log / sincospi against f64 (|z| < 6), then rounding.
                let got = to_f64(
                    &noise_init(&[b, l, h], &mask, Noise::Normal { sigma }, dtype, rng).unwrap(),
                );
                let want = to_f64(
                    &noise_init(&[b, l, h], &mask_cpu, Noise::Normal { sigma }, dtype, rng)
                        .unwrap(),
                );
                assert_close(
                    &format!("{tag}: normal noise"),
                    &got,
                    &want,
                    6.0 * sigma * 4e-6 + abs_floor(dtype),
                    2.0 * unit_roundoff(dtype),
                );
            });
        }
    }
    fails.finish("noise");
}

// ------------------------------------------------------------ adapter

/// `got` against the f64 `want` on the device (tensors up to 16384×4096):
/// every element within atol + rtol·|want|, atol relative to the largest
/// |want|. The kernels round z = act(h) and dh to the dtype before the
/// second product (as any bf16/f16 implementation does), so the error of a
/// sum is a few units of roundoff of its largest terms, not of each element.
///
/// `extra` is added to each element's allowance (see [`adapter_allowance`]).
fn close_on_device(what: &str, got: &Tensor, want: &Tensor, dtype: DType, extra: &Tensor) {
    let u = unit_roundoff(dtype);
    let got = got.to_dtype(DType::F64).unwrap();
    let scale = want
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f64>()
        .unwrap();
    let (atol, rtol) = ((1e-5 + 4.0 * u) * scale, 2.0 * u);
    let allowed = (((want.abs().unwrap() * rtol).unwrap() + atol).unwrap() + extra).unwrap();
    let excess = ((&got - want).unwrap().abs().unwrap() - &allowed)
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f64>()
        .unwrap();
    let finite = got
        .sum_all()
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
        .is_finite();
    if excess > 0.0 || !finite {
        // Names the worst element (the host copy only happens on failure).
        let a = to_f64(&allowed);
        assert_within(
            what,
            &to_f64(&got),
            &to_f64(want),
            |i| a[i],
            |i| format!("allowed ±{:e}; max|want| {scale:e}", a[i]),
        );
        panic!("{what}: non-finite output");
    }
}

/// Per-element allowance, beyond the scale-relative tolerance, for each
/// output of the adapter (y, then the gradients in `check_adapter`'s order):
///
/// 1. f32 accumulation (the kernels and candle's GEMMs sum in f32 for every
///    dtype): 2u₃₂ × the output evaluated on magnitudes — every product and
///    sum on |operands|, the activation through bounds on its slope
///    (|act'| ≤ 1.2 for every act here; |act''| ≤ 0.8 for the GELUs and SiLU,
///    0 for ReLU and the identity). |fl(Σ aᵢbᵢ) − Σ aᵢbᵢ| ≤ γₙ Σ|aᵢbᵢ|: the
///    scale-relative tolerance alone misses outputs made of cancelling terms
///    (at T = 1, r = 1 every element of dW_u is s·dyᵢ·act(h) for one dot
///    product h). candle's plain f32 composition failed the scale-relative
///    bound on 1–2 % of random draws of such shapes (CPU, 2026-11-26).
/// 2. The rounding of z = act(h) and dh to the dtype before the second
///    products: 2u_dtype × those products on magnitudes.
/// 3. ReLU's kink: where h is within its f32 error of 0, either side is a
///    right answer and dh may jump by the whole s·|dz|; that jump, carried
///    to dx, dW_d and db_d at full size. (On the H200, T = 16384 — a
///    million h values — had such elements at 1000–4096-wide inputs.)
#[allow(clippy::too_many_arguments)]
fn adapter_allowance(
    x: &Tensor,
    w_d: &Tensor,
    w_u: &Tensor,
    biases: Option<(&Tensor, &Tensor)>,
    res: Option<&Tensor>,
    dy: &Tensor,
    act: Act,
    s: f64,
    dtype: DType,
) -> Vec<Tensor> {
    let u32_ = 2f64.powi(-24);
    let ud = unit_roundoff(dtype);
    let a = |t: &Tensor| t.abs().unwrap();
    let mm = |p: &Tensor, q: &Tensor| p.matmul(q).unwrap();
    let add = |p: &Tensor, q: &Tensor| (p + q).unwrap();
    let mul = |p: &Tensor, k: f64| (p * k).unwrap();
    let (l1, l2) = match act {
        Act::Relu | Act::Identity => (1.2, 0.0),
        _ => (1.2, 0.8),
    };
    let (xm, wdm, wum, dym) = (a(x), a(w_d), a(w_u), a(dy));
    let (wdmt, wumt) = (wdm.t().unwrap(), wum.t().unwrap());
    let mut h = mm(x, &w_d.t().unwrap());
    let mut hm = mm(&xm, &wdmt);
    if let Some((b_d, _)) = biases {
        h = h.broadcast_add(b_d).unwrap();
        hm = hm.broadcast_add(&a(b_d)).unwrap();
    }
    let z = a(&act.apply(&h).unwrap());
    let dz = mm(dy, w_u);
    let (ka, kr) = (2.0 * u32_, 2.0 * ud);
    // z's allowance, carried into y and dW_u: its f32 sums on magnitudes
    // (1) and its rounding to the dtype (2).
    let z_allow = add(&mul(&add(&z, &mul(&hm, l1)), ka), &mul(&z, kr));
    // dh's: (1), (2) and ReLU's jump (3; z = relu(h) itself is continuous),
    // carried into dx, dW_d and db_d.
    let dh_sums = mul(
        &add(
            &mul(&mm(&dym, &wum), l1),
            &mul(&(a(&dz) * &hm).unwrap(), l2),
        ),
        s,
    );
    let near0 = if act == Act::Relu {
        a(&h)
            .le(&mul(&hm, 4.0 * u32_))
            .unwrap()
            .to_dtype(DType::F64)
            .unwrap()
    } else {
        h.zeros_like().unwrap()
    };
    let jump = mul(&(a(&dz) * near0).unwrap(), s);
    let dh_allow = add(&add(&mul(&dh_sums, ka), &mul(&a(&dz), kr * s * l1)), &jump);

    let mut up = mm(&z_allow, &wumt);
    if let Some((_, b_u)) = biases {
        up = up.broadcast_add(&mul(&a(b_u), ka)).unwrap();
    }
    let y = add(&mul(&res.map_or_else(|| xm.clone(), a), ka), &mul(&up, s));
    let mut dx = mm(&dh_allow, &wdm);
    if res.is_none() {
        dx = add(&dx, &mul(&dym, ka));
    }
    let mut out = vec![
        y,
        dx,
        mm(&dh_allow.t().unwrap(), &xm),
        mul(&mm(&dym.t().unwrap(), &z_allow), s),
    ];
    if biases.is_some() {
        out.push(dh_allow.sum(0).unwrap());
        out.push(mul(&dym.sum(0).unwrap(), ka * s));
    } else {
        out.push(mul(&dym, ka)); // d base = dy, passed through
    }
    out
}

/// One adapter (or LoRA, when `lora`) call on the device against the same
/// math in f64 (candle's composition, which tests/adapter.rs checks against
/// the CPU reference and PyTorch): y and every gradient. `offset` > 0 runs x
/// as an unaligned view (start offset not a multiple of 8 elements).
#[allow(clippy::too_many_arguments)]
fn check_adapter(
    dev: &Device,
    dtype: DType,
    act: Act,
    (t, m, n, r): (usize, usize, usize, usize),
    lora: bool,
    offset: usize,
) {
    let tag = format!(
        "adapter {act:?} {dtype:?} T {t} {m}->{n} r {r}{}{}",
        if lora { " lora" } else { "" },
        if offset > 0 { " unaligned" } else { "" }
    );
    let draw = |dims: &[usize], std: f64| {
        Tensor::randn(0f32, std as f32, dims, dev)
            .unwrap()
            .to_dtype(dtype)
            .unwrap()
    };
    let x_all = draw(&[t * m + offset], 1.0);
    let mut params = vec![
        draw(&[r, m], 1.0 / (m as f64).sqrt()),
        draw(&[n, r], 1.0 / (r as f64).sqrt()),
    ];
    if lora {
        params.push(draw(&[t, n], 1.0)); // the base layer's output
    } else {
        params.push(draw(&[r], 0.1));
        params.push(draw(&[n], 0.1));
    }
    let dy = draw(&[t, n], 1.0);
    let scale = if lora { 2.0 } else { 0.5 };
    // Runs the call with every input as a Var of `dt`; returns y and the
    // gradients of Σ y·dy for x and each parameter.
    let run = |dt: DType, fused: bool| -> (Tensor, Vec<Tensor>) {
        // x is a view at `offset` elements into a Var (a Var made from the
        // view itself would be a fresh, aligned copy).
        let xv = Var::from_tensor(&x_all.to_dtype(dt).unwrap()).unwrap();
        let x = xv
            .as_tensor()
            .narrow(0, offset, t * m)
            .unwrap()
            .reshape((t, m))
            .unwrap();
        let vs: Vec<Var> = params
            .iter()
            .map(|p| Var::from_tensor(&p.to_dtype(dt).unwrap()).unwrap())
            .collect();
        let w = AdapterWeights {
            w_down: vs[0].as_tensor().clone(),
            w_up: vs[1].as_tensor().clone(),
            b_down: (!lora).then(|| vs[2].as_tensor().clone()),
            b_up: (!lora).then(|| vs[3].as_tensor().clone()),
            act,
            scale,
        };
        let res = lora.then(|| vs[2].as_tensor().clone());
        let y = if fused {
            adapter(&x, &w, res.as_ref()).unwrap()
        } else {
            adapter_composed(&x, &w, res.as_ref()).unwrap()
        };
        let g = (&y * dy.to_dtype(dt).unwrap())
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let dx = g.get(xv.as_tensor()).unwrap();
        let mut grads = vec![dx
            .narrow(0, offset, t * m)
            .unwrap()
            .reshape((t, m))
            .unwrap()];
        grads.extend(vs.iter().map(|v| g.get(v.as_tensor()).unwrap().clone()));
        (y, grads)
    };
    let (y, grads) = run(dtype, true);
    let (want_y, want_grads) = run(DType::F64, false);
    let f64_of = |t: &Tensor| t.to_dtype(DType::F64).unwrap();
    let x64 = f64_of(
        &x_all
            .narrow(0, offset, t * m)
            .unwrap()
            .reshape((t, m))
            .unwrap(),
    );
    let p64: Vec<Tensor> = params.iter().map(f64_of).collect();
    let terms = adapter_allowance(
        &x64,
        &p64[0],
        &p64[1],
        (!lora).then(|| (&p64[2], &p64[3])),
        lora.then(|| &p64[2]),
        &f64_of(&dy),
        act,
        scale,
        dtype,
    );
    assert_eq!(y.dims(), &[t, n], "{tag}");
    close_on_device(&format!("{tag}: y"), &y, &want_y, dtype, &terms[0]);
    let names: &[&str] = if lora {
        &["dx", "dA", "dB", "d base"]
    } else {
        &["dx", "dW_d", "dW_u", "db_d", "db_u"]
    };
    for (((name, g), w), m) in names.iter().zip(&grads).zip(&want_grads).zip(&terms[1..]) {
        assert_eq!(g.dtype(), dtype, "{tag}: {name}");
        assert_eq!(g.dims(), m.dims(), "{tag}: {name} (allowance)");
        close_on_device(&format!("{tag}: {name}"), g, w, dtype, m);
    }
}

#[test]
fn adapter_kernels_match_reference() {
    let Some(dev) = cuda_device() else { return };
    let acts = [
        Act::GeluErf,
        Act::GeluTanh,
        Act::Relu,
        Act::Silu,
        Act::Identity,
    ];
    // 13: a width off the 16-byte path; 100 and 1: bottlenecks off the tiles.
    let (acts, ts, ms, rs): (&[Act], &[usize], &[usize], &[usize]) = if tiny() {
        (&acts[..1], &[129], &[13, 1000], &[100])
    } else if quick() {
        (&acts[1..2], &[1, 129], &[13, 1000], &[8, 100])
    } else {
        (
            &acts,
            &[1, 7, 129, 16384],
            &[8, 13, 384, 768, 1000, 1024, 4096],
            &[1, 8, 64, 100, 256],
        )
    };
    let mut n = 0;
    let mut fails = Failures::default();
    for dtype in [DType::F32, DType::BF16, DType::F16] {
        for &act in acts {
            for &t in ts {
                for &m in ms {
                    for &r in rs {
                        fails.check(|| check_adapter(&dev, dtype, act, (t, m, m, r), false, 0));
                        n += 1;
                    }
                }
            }
        }
        // An unaligned x on an otherwise vectorisable shape; r above the
        // kernels' limit (the composed fallback).
        fails.check(|| check_adapter(&dev, dtype, Act::GeluErf, (129, 384, 384, 64), false, 3));
        fails.check(|| check_adapter(&dev, dtype, Act::Relu, (7, 384, 384, 300), false, 0));
    }
    eprintln!("adapter: {n} shapes × 3 dtypes checked");
    fails.finish("adapter");
}

#[test]
fn lora_kernels_match_reference() {
    let Some(dev) = cuda_device() else { return };
    let (ts, rs): (&[usize], &[usize]) = if quick() {
        (&[7], &[8, 100])
    } else {
        (&[7, 16384], &[8, 100])
    };
    let mut fails = Failures::default();
    for dtype in [DType::F32, DType::BF16, DType::F16] {
        let shapes: &[(usize, usize)] = if tiny() {
            &[(384, 1536), (1000, 13)]
        } else {
            &[(384, 384), (384, 1536), (1536, 384), (1000, 13)]
        };
        for &(m, n) in shapes {
            for &t in ts {
                for &r in rs {
                    fails
                        .check(|| check_adapter(&dev, dtype, Act::Identity, (t, m, n, r), true, 0));
                }
            }
        }
    }
    fails.finish("lora");
}

// ------------------------------------------------------------ MiniLM golden

/// The model gpu-pack.sh carries (bf16 weights) or TUNEFUSE_MODEL_DIR.
fn carried_model() -> Option<std::path::PathBuf> {
    let dir = std::env::var_os("TUNEFUSE_MODEL_DIR").map(std::path::PathBuf::from)?;
    dir.join("model.safetensors").exists().then_some(dir)
}

#[test]
fn minilm_golden_on_device() {
    let Some(dev) = cuda_device() else { return };
    let Some(dir) = carried_model() else {
        eprintln!(
            "skipped: TUNEFUSE_MODEL_DIR does not hold a model (scripts/gpu-pack.sh packs one)"
        );
        return;
    };
    let g = golden("minilm_l6_v2.json");
    let want_emb = json_matrix(&g["sentence_embedding"]).concat();
    let want_cls = json_matrix(&g["cls"]).concat();
    // f32 compute: the same weights on CPU and GPU agree to f32 accuracy.
    let (c_cls, c_emb, c_t3) = minilm_outputs(&dir, &Device::Cpu, DType::F32);
    let (g_cls, g_emb, g_t3) = minilm_outputs(&dir, &dev, DType::F32);
    assert_close("f32 [CLS] GPU vs CPU", &g_cls, &c_cls, 1e-4, 0.0);
    assert_close("f32 embeddings GPU vs CPU", &g_emb, &c_emb, 1e-4, 0.0);
    assert_close("f32 tokens GPU vs CPU", &g_t3, &c_t3, 1e-4, 0.0);
    // Against the fp32 golden, the carried weights are bf16-rounded: report
    // that deviation, which bounds what weight rounding alone costs.
    eprintln!(
        "bf16 weights, f32 compute: max |emb - golden| = {:.3e}, |cls - golden| = {:.3e}",
        max_abs_diff(&g_emb, &want_emb),
        max_abs_diff(&g_cls, &want_cls)
    );
    // bf16 compute: within twice the error of the plain CPU bf16 path.
    let (_, cpu16, _) = minilm_outputs(&dir, &Device::Cpu, DType::BF16);
    let (_, gpu16, _) = minilm_outputs(&dir, &dev, DType::BF16);
    let (e_cpu, e_gpu) = (
        max_abs_diff(&cpu16, &want_emb),
        max_abs_diff(&gpu16, &want_emb),
    );
    eprintln!("bf16 compute: max |emb - golden| CPU {e_cpu:.3e}, GPU {e_gpu:.3e}");
    assert!(
        e_gpu <= 2.0 * e_cpu.max(1e-3),
        "GPU bf16 error {e_gpu} exceeds twice the CPU bf16 error {e_cpu}"
    );
}

// ------------------------------------------------------------ attention softmax

/// The model's differentiable softmax on the device: its value is a copy of
/// candle's fused softmax (bit for bit), and its gradient is the closed form
/// `y·(g − Σ g·y)` of that value, here evaluated in f64 from the device's own
/// `y`; the device computes it in f32 and rounds it to the dtype.
#[test]
fn attention_softmax_on_device() {
    use tunefuse::model::layers::softmax_last_dim;
    let Some(dev) = cuda_device() else { return };
    let mut fails = Failures::default();
    for dtype in [DType::F32, DType::BF16, DType::F16] {
        for shape in [[1usize, 1, 1, 1], [2, 3, 17, 33], [2, 12, 128, 128]] {
            fails.check(|| {
                let tag = format!("{dtype:?} {shape:?}");
                let scores = Tensor::randn(0f32, 3.0, &shape, &dev)
                    .unwrap()
                    .to_dtype(dtype)
                    .unwrap();
                let w = Tensor::randn(0f32, 1.0, &shape, &dev).unwrap();
                let v = Var::from_tensor(&scores).unwrap();
                let p = softmax_last_dim(v.as_tensor()).unwrap();
                let fused = candle_nn::ops::softmax_last_dim(&scores).unwrap();
                assert!(
                    to_f64(&p) == to_f64(&fused),
                    "{tag}: value is not candle's fused softmax"
                );
                let loss = (p.to_dtype(DType::F32).unwrap() * &w)
                    .unwrap()
                    .sum_all()
                    .unwrap();
                let got = to_f64(loss.backward().unwrap().get(v.as_tensor()).unwrap());
                // The gradient reaching the op is w rounded to the dtype.
                let (y, g) = (to_f64(&p), to_f64(&w.to_dtype(dtype).unwrap()));
                let n = shape[3];
                let u = unit_roundoff(dtype);
                for (r, (yr, gr)) in y.chunks(n).zip(g.chunks(n)).enumerate() {
                    let dot: f64 = yr.iter().zip(gr).map(|(y, g)| y * g).sum();
                    let gmax = gr.iter().fold(0.0f64, |m, g| m.max(g.abs()));
                    for c in 0..n {
                        let want = yr[c] * (gr[c] - dot);
                        // Output rounding (f16: subnormal spacing near 0),
                        // plus the f32 sum over the row (at most n·2⁻²⁴ of
                        // Σ|g·y| ≤ gmax, n ≤ 128).
                        let tol = u * want.abs() + abs_floor(dtype) + 1e-5 * gmax * yr[c];
                        let d = got[r * n + c];
                        assert!(
                            (d - want).abs() <= tol,
                            "{tag} row {r} col {c}: gradient {d}, closed form {want}"
                        );
                    }
                }
            });
        }
    }
    fails.finish("attention softmax");
}

/// A frozen layer's linear (`model::layers::linear` with W and b detached)
/// on the device. The value: in f32 candle's matmul + bias bit for bit; in
/// half precision cuBLASLt's GEMM with the bias in its epilogue, within one
/// rounding to the dtype plus f32 accumulation (`k·2⁻²⁴·Σ|x||w|`) of the
/// f64 product of the same operands. The input gradient is candle's own
/// matmul backward (`g·W`) bit for bit, without the weight's gradient;
/// f32/bf16/f16 and bf16 activations over f32 weights (mixed precision),
/// odd shapes up to MiniLM's FFN. The trainable layer (`linear_on`, its
/// own op) gives the same value, and in half precision weight and bias
/// gradients within one rounding of the f64 ones.
#[test]
fn frozen_linear_on_device() {
    use tunefuse::model::layers::linear;
    let Some(dev) = cuda_device() else { return };
    let mut fails = Failures::default();
    for (xd, wd) in [
        (DType::F32, DType::F32),
        (DType::BF16, DType::BF16),
        (DType::F16, DType::F16),
        (DType::BF16, DType::F32),
    ] {
        for (rows, din, dout) in [
            (1usize, 3usize, 1usize),
            (37, 33, 17),
            (16 * 128, 384, 1536),
        ] {
            fails.check(|| {
                let tag = format!("x {xd:?} W {wd:?} [{rows}, {din}] -> {dout}");
                let x = Tensor::randn(0f32, 1.0, (2, rows, din), &dev)
                    .unwrap()
                    .to_dtype(xd)
                    .unwrap();
                let w = Tensor::randn(0f32, 0.05, (dout, din), &dev)
                    .unwrap()
                    .to_dtype(wd)
                    .unwrap();
                let b = Tensor::randn(0f32, 0.05, dout, &dev)
                    .unwrap()
                    .to_dtype(wd)
                    .unwrap();
                let r = Tensor::randn(0f32, 1.0, (2 * rows, dout), &dev).unwrap();
                let (ours, theirs) = (Var::from_tensor(&x).unwrap(), Var::from_tensor(&x).unwrap());
                let p = linear(ours.as_tensor(), &w, Some(&b)).unwrap();
                let q = theirs
                    .as_tensor()
                    .reshape((2 * rows, din))
                    .unwrap()
                    .matmul(&w.to_dtype(xd).unwrap().t().unwrap())
                    .unwrap()
                    .broadcast_add(&b.to_dtype(xd).unwrap())
                    .unwrap();
                if xd == DType::F32 {
                    assert!(to_f64(&p) == to_f64(&q), "{tag}: value");
                } else {
                    let f64_of = |t: &Tensor| t.to_dtype(DType::F64).unwrap();
                    let (x64, w64, b64) = (
                        f64_of(&x.reshape((2 * rows, din)).unwrap()),
                        f64_of(&w.to_dtype(xd).unwrap()),
                        f64_of(&b.to_dtype(xd).unwrap()),
                    );
                    let want = to_f64(
                        &x64.matmul(&w64.t().unwrap())
                            .unwrap()
                            .broadcast_add(&b64)
                            .unwrap(),
                    );
                    let mag = to_f64(
                        &x64.abs()
                            .unwrap()
                            .matmul(&w64.abs().unwrap().t().unwrap())
                            .unwrap()
                            .broadcast_add(&b64.abs().unwrap())
                            .unwrap(),
                    );
                    let u = if xd == DType::BF16 {
                        2f64.powi(-8)
                    } else {
                        2f64.powi(-11)
                    };
                    let acc = din as f64 * 2f64.powi(-24);
                    let got = to_f64(&p);
                    let bad = (0..got.len())
                        .filter(|&i| {
                            (got[i] - want[i]).abs() > u * want[i].abs() + acc * mag[i] + 1e-30
                        })
                        .count();
                    assert_eq!(
                        bad, 0,
                        "{tag}: {bad} values beyond one rounding of the product"
                    );
                }
                let loss = |y: &Tensor| {
                    (y.reshape((2 * rows, dout))
                        .unwrap()
                        .to_dtype(DType::F32)
                        .unwrap()
                        * &r)
                        .unwrap()
                        .sum_all()
                        .unwrap()
                };
                // The trainable layer (its own op with the bias, on a fused
                // stream) computes the same value with the same GEMM.
                let fused = tunefuse::model::Stream::new(0);
                fused.set_fused_ops(Some(true));
                let (wv, bv) = (Var::from_tensor(&w).unwrap(), Var::from_tensor(&b).unwrap());
                let t = tunefuse::model::layers::linear_on(
                    &x,
                    &wv.as_tensor().to_dtype(xd).unwrap(),
                    Some(&bv.as_tensor().to_dtype(xd).unwrap()),
                    &fused,
                )
                .unwrap();
                assert!(to_f64(&t) == to_f64(&p), "{tag}: trainable value");
                if xd != DType::F32 {
                    // Its weight and bias gradients (in half precision one
                    // GEMM with the bias gradient in its epilogue): within one
                    // rounding to the dtype plus f32 accumulation over the rows
                    // of the f64 gᵀ·x and Σ_rows g, g being r rounded to xd.
                    let gr = t
                        .reshape((2 * rows, dout))
                        .unwrap()
                        .to_dtype(DType::F32)
                        .unwrap();
                    let grads = (gr * &r).unwrap().sum_all().unwrap().backward().unwrap();
                    let f64_of = |t: &Tensor| t.to_dtype(DType::F64).unwrap();
                    let g64 = f64_of(&r.to_dtype(xd).unwrap());
                    let x64 = f64_of(&x.reshape((2 * rows, din)).unwrap());
                    let u = if xd == DType::BF16 {
                        2f64.powi(-8)
                    } else {
                        2f64.powi(-11)
                    };
                    let acc = (2 * rows) as f64 * 2f64.powi(-24);
                    let within = |what: &str, got: &Tensor, want: Tensor, mag: Tensor| {
                        let (got, want, mag) = (to_f64(got), to_f64(&want), to_f64(&mag));
                        let bad = (0..got.len())
                            .filter(|&i| {
                                (got[i] - want[i]).abs() > u * want[i].abs() + acc * mag[i] + 1e-30
                            })
                            .count();
                        assert_eq!(bad, 0, "{tag}: {bad} of {} {what} out of bounds", got.len());
                    };
                    within(
                        "weight gradients",
                        grads.get(wv.as_tensor()).unwrap(),
                        g64.t().unwrap().matmul(&x64).unwrap(),
                        g64.abs()
                            .unwrap()
                            .t()
                            .unwrap()
                            .matmul(&x64.abs().unwrap())
                            .unwrap(),
                    );
                    within(
                        "bias gradients",
                        grads.get(bv.as_tensor()).unwrap(),
                        g64.sum(0).unwrap(),
                        g64.abs().unwrap().sum(0).unwrap(),
                    );
                }
                let (gp, gq) = (loss(&p).backward().unwrap(), loss(&q).backward().unwrap());
                assert!(
                    to_f64(gp.get(ours.as_tensor()).unwrap())
                        == to_f64(gq.get(theirs.as_tensor()).unwrap()),
                    "{tag}: input gradient is not candle's g·W"
                );
                assert!(
                    gp.get_ids().count() + 2 <= gq.get_ids().count(),
                    "{tag}: the weight's gradient was computed"
                );
            });
        }
    }
    fails.finish("frozen linear");
}

// ------------------------------------------------------------ upload cache

/// Strided candle ops (a broadcast add, transposed copies, a batched matmul
/// of a transposed view) and their backward at one sequence length, on
/// inputs that depend only on the shape: the values and the gradient.
fn strided_ops(dev: &Device, len: usize) -> Vec<f32> {
    let n = 4 * len * 6 * 8;
    let vals: Vec<f32> = (0..n)
        .map(|i| ((i * 7919) % 101) as f32 / 50.0 - 1.0)
        .collect();
    let x = Var::from_tensor(&Tensor::from_vec(vals, (4, len, 6, 8), dev).unwrap()).unwrap();
    let b = Tensor::from_vec((0..8).map(|i| i as f32 / 8.0).collect(), 8, dev).unwrap();
    let y = x
        .as_tensor()
        .broadcast_add(&b)
        .unwrap()
        .transpose(1, 2)
        .unwrap()
        .contiguous()
        .unwrap();
    let s = y.matmul(&y.transpose(2, 3).unwrap()).unwrap();
    let g = s.sqr().unwrap().sum_all().unwrap().backward().unwrap();
    let mut out = s.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    out.extend(
        g.get(x.as_tensor())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap(),
    );
    out
}

/// What the training step runs under `tunefuse::upload_cache` (the layouts'
/// uploads kept on the device and reused by content) gives the same bits as
/// without it, when the cache is filled and when it is hit, at two lengths
/// in turn so that a wrong entry would be read.
#[test]
fn upload_cache_leaves_strided_ops_bit_identical() {
    let Some(dev) = cuda_device() else { return };
    let plain: Vec<Vec<f32>> = [5, 9].iter().map(|&l| strided_ops(&dev, l)).collect();
    let cache = tunefuse::upload_cache(&dev);
    assert!(cache.is_some(), "no upload cache on a CUDA device");
    for round in 0..2 {
        for (i, &l) in [5, 9].iter().enumerate() {
            let got = strided_ops(&dev, l);
            let same = got
                .iter()
                .zip(&plain[i])
                .all(|(a, b)| a.to_bits() == b.to_bits());
            assert!(
                same && got.len() == plain[i].len(),
                "length {l}, round {round}: results differ under the upload cache"
            );
        }
    }
    // The guard (`cache`) lives to here.
}

/// The activation kernels (`act_fwd_*`, `act_bwd_*`) against the CPU op
/// (f64, rounded once). Allowance per element: 8 f32 ulps of the value
/// (erff / tanhf / expf and a few f32 operations), an absolute 1e-6·(1 +
/// |g|) for the gradient's terms of size about 1 that cancel where GELU's
/// f' crosses zero (5e-7 for the value's), and for bf16 / f16 one ulp of
/// the dtype (the f32 and the f64 value may round to neighbours).
#[test]
fn activation_kernels_match_the_cpu_op() {
    use tunefuse::ops::adapter::activation;
    let Some(dev) = cuda_device() else { return };
    let n = if quick() { 4099 } else { (1 << 20) | 5 };
    let mut vals = randn(n, 11, 3.0);
    vals[..6].copy_from_slice(&[0.0, -0.0, 12.0, -12.0, 40.0, -40.0]);
    let gvals = randn(n, 12, 1.0);
    let mut fails = Failures::default();
    for act in [Act::GeluErf, Act::GeluTanh, Act::Relu, Act::Silu] {
        for dt in [DType::F32, DType::BF16, DType::F16] {
            fails.check(|| {
                let ulp = match dt {
                    DType::F32 => 0.0,
                    DType::BF16 => 2f64.powi(-7),
                    _ => 2f64.powi(-10),
                };
                let rel = 8.0 * 2f64.powi(-23) + ulp;
                let x = Var::from_tensor(&tensor(&vals, &[n], dt, &dev)).unwrap();
                let xc = Var::from_tensor(&tensor(&vals, &[n], dt, &Device::Cpu)).unwrap();
                let g = tensor(&gvals, &[n], dt, &dev);
                let gc = tensor(&gvals, &[n], dt, &Device::Cpu);
                let gv = to_f64(&gc);
                let y = activation(x.as_tensor(), act).unwrap();
                let yc = to_f64(&activation(xc.as_tensor(), act).unwrap());
                let tag = format!("{act:?} {dt:?}");
                assert_within(
                    &format!("{tag} value"),
                    &to_f64(&y),
                    &yc,
                    |i| 5e-7 + rel * yc[i].abs(),
                    |i| format!("x = {}", vals[i]),
                );
                let dx = (&y * &g).unwrap().sum_all().unwrap().backward().unwrap();
                let dxc = (activation(xc.as_tensor(), act).unwrap() * &gc)
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .backward()
                    .unwrap();
                let want = to_f64(dxc.get(xc.as_tensor()).unwrap());
                assert_within(
                    &format!("{tag} gradient"),
                    &to_f64(dx.get(x.as_tensor()).unwrap()),
                    &want,
                    |i| 1e-6 * (1.0 + gv[i].abs()) + rel * want[i].abs(),
                    |i| format!("x = {}, g = {}", vals[i], gv[i]),
                );
            });
        }
    }
    fails.finish("activation kernels");
}

/// The attention-probabilities kernels against the CPU op, with and without
/// dropout, at encoder shapes (one key, a warp's worth, several warps per
/// row; a padded example). The dropout mask must be the same element for
/// element; values within 8 f32 ulps (expf and the row sum) plus, for bf16
/// / f16, one unit of the dtype; gradients within 8 f32 ulps of the terms
/// of `scale·p·(d − Σ d·p)` (which cancel) plus one unit of the dtype.
/// The gradients of Σ y·g, summed in f32.
fn grads_of_weighted_sum(y: &Tensor, g: &Tensor) -> candle_core::backprop::GradStore {
    (y * g)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap()
}

#[test]
fn attention_probs_kernels_match_the_cpu_op() {
    use tunefuse::ops::attention_probs;
    let Some(dev) = cuda_device() else { return };
    let mut fails = Failures::default();
    let shapes: &[(usize, usize, usize)] = &[(2, 3, 1), (2, 4, 32), (3, 2, 77), (2, 12, 128)];
    for &(b, h, l) in shapes {
        for dt in [DType::F32, DType::BF16, DType::F16] {
            for drop in [None, Some((0.1, Rng { seed: 5, offset: 3 }))] {
                fails.check(|| {
                    let n = b * h * l * l;
                    let sv = randn(n, 21, 3.0);
                    let mut bias = vec![0.0; b * l];
                    // Example 0 pads its last third.
                    bias[l - l / 3..l].fill(-30000.0);
                    let gv = randn(n, 22, 1.0);
                    let scale = 0.125;
                    let shape = [b, h, l, l];
                    let run = |d: &Device| {
                        let s = Var::from_tensor(&tensor(&sv, &shape, dt, d)).unwrap();
                        let bt = tensor(&bias, &[b, 1, 1, l], dt, d);
                        let g = tensor(&gv, &shape, dt, d);
                        let y = attention_probs(s.as_tensor(), &bt, scale, drop).unwrap();
                        let grads = grads_of_weighted_sum(&y, &g);
                        (to_f64(&y), to_f64(grads.get(s.as_tensor()).unwrap()))
                    };
                    let (y, ds) = run(&dev);
                    let (yc, dsc) = run(&Device::Cpu);
                    let tag = format!("[{b}, {h}, {l}, {l}] {dt:?} dropout {drop:?}");
                    let ulp = match dt {
                        DType::F32 => 0.0,
                        DType::BF16 => 2f64.powi(-7),
                        _ => 2f64.powi(-10),
                    };
                    let u32_ = 8.0 * 2f64.powi(-23);
                    for (i, (a, c)) in y.iter().zip(&yc).enumerate() {
                        assert!(
                            (*a == 0.0) == (*c == 0.0) || c.abs() < 1e-30,
                            "{tag}: element {i} dropped on one side only ({a} vs {c})"
                        );
                    }
                    assert_within(
                        &format!("{tag} value"),
                        &y,
                        &yc,
                        |i| (u32_ + ulp) * yc[i].abs() + 1e-30,
                        |i| format!("row {}", i / l),
                    );
                    // The probabilities before dropout, and per row Σ|g·p|,
                    // which bounds the cancelling terms.
                    let pc = to_f64(
                        &attention_probs(
                            &tensor(&sv, &shape, dt, &Device::Cpu),
                            &tensor(&bias, &[b, 1, 1, l], dt, &Device::Cpu),
                            scale,
                            None,
                        )
                        .unwrap(),
                    );
                    let k = drop.map_or(1.0, |(p, _)| 1.0 / (1.0 - p));
                    let row_mag: Vec<f64> = (0..n / l)
                        .map(|r| {
                            (0..l)
                                .map(|j| (gv[r * l + j] * k * pc[r * l + j]).abs())
                                .sum()
                        })
                        .collect();
                    assert_within(
                        &format!("{tag} gradient"),
                        &ds,
                        &dsc,
                        |i| {
                            let p = pc[i].abs().max(1e-30);
                            u32_ * scale * p * (gv[i].abs() * k + row_mag[i / l])
                                + ulp * dsc[i].abs()
                                + 1e-30
                        },
                        |i| format!("row {}", i / l),
                    );
                });
            }
        }
    }
    fails.finish("attention probabilities");
}

/// The one-op self-attention's kernels (one forward, two backward) against
/// its CPU op, on sequences from 1 token to 256, heads of 8 to 64, with and
/// without dropout. Both compute in f32 and round to T at the same places,
/// but `expf` and fused multiply-adds move the scores by a few f32 ulps,
/// which can flip the rounding of a probability to T; each output is a sum
/// over up to L such terms. Allowed: one unit of T of the element, plus
/// (4 units of T + 256 f32 ulps) of the largest element of the tensor. A
/// wrong row, head, mask element or index moves elements by about that
/// largest value. On each device the packed form (one `[B, L, 3H]` input)
/// equals the three-tensor form bit for bit.
#[test]
fn self_attention_kernels_match_the_cpu_op() {
    use tunefuse::ops::self_attention;
    use tunefuse::ops::self_attention::self_attention_packed;
    let Some(dev) = cuda_device() else { return };
    let mut fails = Failures::default();
    // (batch, heads, dh, tokens)
    let shapes: &[(usize, usize, usize, usize)] = &[
        (2, 2, 8, 1),
        (2, 4, 32, 33),
        (3, 12, 32, 128),
        (2, 12, 64, 128),
        (2, 6, 32, 256),
    ];
    for &(b, heads, dh, l) in shapes {
        for dt in [DType::F32, DType::BF16, DType::F16] {
            for drop in [None, Some((0.1, Rng { seed: 8, offset: 2 }))] {
                fails.check(|| {
                    let h = heads * dh;
                    let n = b * l * h;
                    let x = [randn(n, 31, 1.0), randn(n, 32, 1.0), randn(n, 33, 1.0)];
                    let gv = randn(n, 34, 1.0);
                    let mut bias = vec![0.0; b * l];
                    // Example 0 pads its last third.
                    bias[l - l / 3..l].fill(-30000.0);
                    let scale = 1.0 / (dh as f64).sqrt();
                    let run = |d: &Device| {
                        let vars: Vec<Var> = x
                            .iter()
                            .map(|v| Var::from_tensor(&tensor(v, &[b, l, h], dt, d)).unwrap())
                            .collect();
                        let bt = tensor(&bias, &[b, l], dt, d);
                        let g = tensor(&gv, &[b, l, h], dt, d);
                        let y = self_attention(
                            vars[0].as_tensor(),
                            vars[1].as_tensor(),
                            vars[2].as_tensor(),
                            &bt,
                            heads,
                            scale,
                            drop,
                        )
                        .unwrap();
                        let backward = |y: &Tensor| grads_of_weighted_sum(y, &g);
                        let grads = backward(&y);
                        let mut out = vec![to_f64(&y)];
                        for v in &vars {
                            out.push(to_f64(grads.get(v.as_tensor()).unwrap()));
                        }
                        // The packed form ([B, L, 3H] in, [B, L, 3H] gradient
                        // out) runs the same arithmetic with other strides:
                        // bit-identical to the three-tensor form.
                        let parts: Vec<&Tensor> = vars.iter().map(|v| v.as_tensor()).collect();
                        let qkv = Var::from_tensor(&Tensor::cat(&parts, 2).unwrap()).unwrap();
                        let yp = self_attention_packed(qkv.as_tensor(), &bt, heads, scale, drop)
                            .unwrap();
                        let gp = backward(&yp);
                        let gp = gp.get(qkv.as_tensor()).unwrap();
                        assert_eq!(to_f64(&yp), out[0], "{d:?} packed value");
                        for (w, want) in out[1..].iter().enumerate() {
                            let part = gp.narrow(2, w * h, h).unwrap();
                            assert_eq!(&to_f64(&part), want, "{d:?} packed gradient {w}");
                        }
                        out
                    };
                    let got = run(&dev);
                    let want = run(&Device::Cpu);
                    let ulp = match dt {
                        DType::F32 => 0.0,
                        DType::BF16 => 2f64.powi(-7),
                        _ => 2f64.powi(-10),
                    };
                    let rel = 4.0 * ulp + 256.0 * 2f64.powi(-23);
                    for (name, (a, c)) in ["y", "dq", "dk", "dv"].iter().zip(got.iter().zip(&want))
                    {
                        let max = c.iter().fold(0f64, |m, v| m.max(v.abs()));
                        assert_within(
                            &format!("[{b}, {l}, {heads}x{dh}] {dt:?} dropout {drop:?} {name}"),
                            a,
                            c,
                            |i| ulp * c[i].abs() + rel * max + 1e-30,
                            |i| format!("token {}, column {}", (i / h) % l, i % h),
                        );
                    }
                });
            }
        }
    }
    fails.finish("self-attention");
}

/// A run with `cuda_graph` equals the same run without it step for step:
/// every method it covers (vanilla, SMART, LoRA, R3F, FreeLB, mixout,
/// adapters) on MiniLM, SST-2 batches of 8 padded to 32 tokens (one
/// shape, so step 1 is captured and steps 2 on replay it). Three steps on
/// three batches at the schedule's rates, an evaluation, then three on one
/// batch at learning rate 0 (the weights stay put): their losses must
/// differ from one another (fresh dropout masks at every replay) and equal
/// the eager run's. The evaluation makes weight copies where training made
/// none (mixout's layers), which makes the graphs stale: they are dropped
/// and captured again; the two runs' evaluations must agree too. A replay runs the captured kernels with the captured
/// arguments, so the methods whose reductions are ordered should agree
/// exactly; 1e-6 relative is a margin for rounding-level differences we do
/// not expect. The adapter kernels (adapters and LoRA) sum their weight
/// gradients' row slices with float atomics, whose order differs between
/// any two runs, eager ones too: a few bf16 gradient elements round one
/// step apart, which moves the gradient norm by far less than 1e-4
/// relative and an Adam update (about lr = 1e-4 per element) by about
/// 4e-7; their tolerances are those.
#[test]
fn captured_steps_equal_eager_steps() {
    use tunefuse::train::trainer::{Config, DeviceKind, Run};
    let Some(_dev) = cuda_device() else { return };
    for methods in ["", "smart", "lora", "r3f", "freelb", "mixout", "adapter"] {
        let mut cfg = Config {
            model: minilm_dir(),
            task: "sst2".into(),
            data_dir: Some(data_root()),
            batch_size: 8,
            max_len: 32,
            pad_to_multiple: 32,
            train_examples: Some(24),
            eval_examples: Some(8),
            device: DeviceKind::Cuda,
            ..Config::default()
        };
        cfg.set_methods(methods).unwrap();
        let mut eager = Run::new(cfg.clone()).unwrap();
        cfg.cuda_graph = true;
        let mut graph = Run::new(cfg).unwrap();
        let order: Vec<usize> = (0..24).collect();
        let batches: Vec<&[usize]> = order.chunks(8).collect();
        let plan: Vec<(&[usize], f64)> = vec![
            (batches[0], 1e-4),
            (batches[1], 8e-5),
            (batches[2], 6e-5),
            (batches[0], 0.0),
            (batches[0], 0.0),
            (batches[0], 0.0),
        ];
        let name = if methods.is_empty() {
            "vanilla"
        } else {
            methods
        };
        let (rtol, weight_atol) = if methods == "lora" || methods == "adapter" {
            (1e-4, 1e-6)
        } else {
            (1e-6, 1e-7)
        };
        let mut frozen_losses = Vec::new();
        for (i, (idx, lr)) in plan.into_iter().enumerate() {
            let mut vals = Vec::new();
            for run in [&mut eager, &mut graph] {
                run.bert.stream.set_train(true);
                let mut phases = tunefuse::train::step::PhaseTimes::new(&run.device, false);
                let out = run.step(&[idx], lr, &mut phases).unwrap();
                vals.push(to_f64(&out.values));
            }
            assert_close(
                &format!("{name} step {i}: [loss, terms…, grad norm]"),
                &vals[1],
                &vals[0],
                0.0,
                rtol,
            );
            assert_eq!(
                eager.bert.stream.position().offset,
                graph.bert.stream.position().offset,
                "{name} step {i}: dropout's stream"
            );
            if lr == 0.0 {
                frozen_losses.push(vals[1][0]);
            }
            if i == 2 {
                let (a, b) = (
                    eager.evaluate(&eager.eval).unwrap().0,
                    graph.evaluate(&graph.eval).unwrap().0,
                );
                assert_close(
                    &format!("{name}: evaluation after step {i} (NLL, accuracy)"),
                    &[b.nll, b.accuracy],
                    &[a.nll, a.accuracy],
                    0.0,
                    rtol,
                );
            }
        }
        for w in frozen_losses.windows(2) {
            assert_ne!(
                w[0], w[1],
                "{name}: two replays on one batch with the weights unchanged gave one loss: \
                 the dropout masks repeated"
            );
        }
        for (a, b) in eager.opt.params.iter().zip(&graph.opt.params) {
            assert_close(
                &format!("{name}: {} after the steps", a.name),
                &to_f64(&b.var.as_tensor().flatten_all().unwrap()),
                &to_f64(&a.var.as_tensor().flatten_all().unwrap()),
                weight_atol,
                1e-6,
            );
        }
        eprintln!("{name}: captured and replayed steps equal the eager steps");
    }
}
