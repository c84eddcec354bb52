//! Philox known answers, and the CPU reference of mixout, dropout and the
//! fused dropout + residual add: statistics over seeds, masks shared by
//! forward and backward, input checks.
mod common;

use candle_core::{DType, Device, Tensor, Var};
use common::*;
use tunefuse::ops::mixout::{dropout, dropout_add, keep_mask, mixout, Rng};
use tunefuse::philox;

const CPU: Device = Device::Cpu;

#[test]
fn philox_known_answers() {
    // Random123 tests/kat_vectors, philox4x32_10.
    let kat: [([u32; 4], [u32; 2], [u32; 4]); 3] = [
        (
            [0, 0, 0, 0],
            [0, 0],
            [0x6627e8d5, 0xe169c58d, 0xbc57ac4c, 0x9b00dbd8],
        ),
        (
            [u32::MAX; 4],
            [u32::MAX; 2],
            [0x408f276d, 0x41c83b0e, 0xa20bc7c6, 0x6d5451fd],
        ),
        (
            [0x243f6a88, 0x85a308d3, 0x13198a2e, 0x03707344],
            [0xa4093822, 0x299f31d0],
            [0xd16cfe09, 0x94fdcceb, 0x5001e420, 0x24126ea1],
        ),
    ];
    for (c, k, want) in kat {
        assert_eq!(
            philox::philox4x32_10(c, k),
            want,
            "counter {c:x?} key {k:x?}"
        );
    }
}

#[test]
fn element_mapping() {
    // Element i is word i % 4 of counter offset + i / 4; offsets chain.
    let (seed, offset) = (0x1234_5678_9abc_def0, 10);
    let g = philox::group(seed, offset, 2);
    assert_eq!(philox::word(seed, offset, 9), g[1]);
    assert_eq!(philox::word(seed, offset + 2, 1), g[1]);
    assert_eq!(philox::counters_for(9), 3);
    assert_eq!(philox::uniform(0xffff_ffff), 1.0 - 2f32.powi(-24));
}

fn kept_fraction(mask: &[bool]) -> f64 {
    mask.iter().filter(|&&k| k).count() as f64 / mask.len() as f64
}

#[test]
fn keep_fraction_over_seeds() {
    let n = 20_000;
    for p in [0.0, 0.1, 0.5, 0.9] {
        let mut total = 0.0;
        for seed in 0..20u64 {
            let f = kept_fraction(&keep_mask(n, p, Rng { seed, offset: 0 }).unwrap());
            // One seed: binomial std sqrt(p(1-p)/n) <= 0.0036; 6 sigma.
            assert!((f - (1.0 - p)).abs() < 0.022, "p={p} seed={seed}: kept {f}");
            total += f;
        }
        let mean = total / 20.0;
        assert!((mean - (1.0 - p)).abs() < 0.005, "p={p}: mean kept {mean}");
    }
}

#[test]
fn mixout_is_unbiased_and_matches_its_mask() {
    let n = 4096;
    let (w, u) = (randn(n, 1, 1.0), randn(n, 2, 1.0));
    let (tw, tu) = (
        tensor(&w, &[64, 64], DType::F32, &CPU),
        tensor(&u, &[64, 64], DType::F32, &CPU),
    );
    let p = 0.3;
    let seeds = 400;
    let mut mean = vec![0.0; n];
    for seed in 0..seeds {
        let rng = Rng { seed, offset: 5 };
        let y = to_f64(&mixout(&tw, &tu, p, rng, true).unwrap());
        let mask = keep_mask(n, p, rng).unwrap();
        for i in 0..n {
            // Element by element: u where dropped, u + (w − u)/(1 − p) where kept.
            let want = if mask[i] {
                (u[i] as f32 + (w[i] as f32 - u[i] as f32) * (1.0 / 0.7f64) as f32) as f64
            } else {
                u[i] as f32 as f64
            };
            assert_eq!(y[i], want, "seed {seed} element {i}");
            mean[i] += y[i] / seeds as f64;
        }
    }
    // E[w̃] = w: the average over seeds of each element, and over elements.
    let err: Vec<f64> = mean.iter().zip(&w).map(|(m, w)| m - w).collect();
    let avg_err = err.iter().sum::<f64>() / n as f64;
    assert!(
        avg_err.abs() < 0.01,
        "mean of w̃ − w over elements: {avg_err}"
    );
    let sd = (p / (1.0 - p) / seeds as f64).sqrt(); // per-element std of the mean, per unit |w − u|
    let bad = err
        .iter()
        .zip(w.iter().zip(&u))
        .filter(|(e, (w, u))| e.abs() > 5.0 * sd * (*w - *u).abs() + 1e-6)
        .count();
    assert!(
        bad < n / 1000,
        "{bad} elements whose mean over seeds is off by more than 5 sigma"
    );
}

#[test]
fn eval_mode_is_identity() {
    let (w, u) = (
        Tensor::ones(7, DType::F32, &CPU).unwrap(),
        Tensor::zeros(7, DType::F32, &CPU).unwrap(),
    );
    let rng = Rng { seed: 1, offset: 0 };
    assert_eq!(
        to_f64(&mixout(&w, &u, 0.9, rng, false).unwrap()),
        vec![1.0; 7]
    );
    assert_eq!(to_f64(&dropout(&w, 0.9, rng, false).unwrap()), vec![1.0; 7]);
}

#[test]
fn backward_regenerates_the_forward_mask() {
    let n = 1000;
    let (w, u) = (randn(n, 3, 1.0), randn(n, 4, 1.0));
    let p = 0.4;
    let rng = Rng {
        seed: 77,
        offset: 123,
    };
    let mask = keep_mask(n, p, rng).unwrap();
    let vw = Var::from_tensor(&tensor(&w, &[n], DType::F32, &CPU)).unwrap();
    let vu = Var::from_tensor(&tensor(&u, &[n], DType::F32, &CPU)).unwrap();
    let y = mixout(vw.as_tensor(), vu.as_tensor(), p, rng, true).unwrap();
    let g = y.sum_all().unwrap().backward().unwrap();
    let (gw, gu) = (
        to_f64(g.get(vw.as_tensor()).unwrap()),
        to_f64(g.get(vu.as_tensor()).unwrap()),
    );
    let s = (1.0 / (1.0 - p)) as f32 as f64;
    for i in 0..n {
        assert_eq!(gw[i], if mask[i] { s } else { 0.0 }, "∂w̃/∂w at {i}");
        assert!((gu[i] - (1.0 - gw[i])).abs() < 1e-6, "∂w̃/∂u at {i}");
    }
    // Finite difference of the linear map (exact up to f32 rounding).
    let yv = to_f64(&y);
    let mut w2 = w.clone();
    let i = mask.iter().position(|&k| k).unwrap();
    w2[i] += 0.5;
    let y2 = to_f64(
        &mixout(
            &tensor(&w2, &[n], DType::F32, &CPU),
            &tensor(&u, &[n], DType::F32, &CPU),
            p,
            rng,
            true,
        )
        .unwrap(),
    );
    assert!(((y2[i] - yv[i]) / 0.5 - gw[i]).abs() < 1e-5);

    // Dropout: forward mask and backward mask agree.
    let x = Var::from_tensor(&Tensor::ones(n, DType::F32, &CPU).unwrap()).unwrap();
    let y = dropout(x.as_tensor(), p, rng, true).unwrap();
    let g = y.sum_all().unwrap().backward().unwrap();
    assert_eq!(to_f64(&y), to_f64(g.get(x.as_tensor()).unwrap()));
    assert_eq!(
        to_f64(&y).iter().map(|&v| v != 0.0).collect::<Vec<_>>(),
        mask
    );
}

#[test]
fn chunked_masks_match_the_per_element_draw() {
    // The ops draw four elements per Philox block, chunk by chunk in
    // parallel; keep_mask draws each element on its own. Sizes around the
    // block and chunk (16,384) boundaries, an offset, every dtype.
    let p = 0.3;
    let s = (1.0 / (1.0 - p)) as f32 as f64;
    for n in [1, 3, 4, 5, 16_383, 16_384, 16_389, 3 * 16_384 + 7] {
        let rng = Rng {
            seed: 0xfeed_0000_0000_0001 + n as u64,
            offset: 1_000_003,
        };
        let mask = keep_mask(n, p, rng).unwrap();
        for dtype in [DType::F32, DType::BF16, DType::F16] {
            let x = Tensor::ones(n, dtype, &CPU).unwrap();
            let y = to_f64(&dropout(&x, p, rng, true).unwrap());
            let s = to_f64(
                &Tensor::new(&[s as f32], &CPU)
                    .unwrap()
                    .to_dtype(dtype)
                    .unwrap(),
            )[0];
            for i in 0..n {
                assert_eq!(y[i], if mask[i] { s } else { 0.0 }, "{dtype:?} n={n} i={i}");
            }
            let (w, u) = (x.affine(3.0, 0.0).unwrap(), x.affine(-1.0, 0.0).unwrap());
            let m = to_f64(&mixout(&w, &u, p, rng, true).unwrap());
            for i in 0..n {
                assert_eq!(m[i] == -1.0, !mask[i], "mixout {dtype:?} n={n} i={i}");
            }
        }
    }
}

#[test]
fn dropout_statistics_and_dtypes() {
    let n = 50_000;
    for dtype in [DType::F32, DType::BF16, DType::F16] {
        let x = Tensor::ones(n, dtype, &CPU).unwrap();
        let y = to_f64(&dropout(&x, 0.25, Rng { seed: 9, offset: 0 }, true).unwrap());
        let kept = y.iter().filter(|&&v| v != 0.0).count() as f64 / n as f64;
        assert!((kept - 0.75).abs() < 0.01, "{dtype:?}: kept {kept}");
        let mean = y.iter().sum::<f64>() / n as f64;
        assert!((mean - 1.0).abs() < 0.02, "{dtype:?}: mean {mean}");
    }
}

#[test]
fn offsets_give_independent_masks() {
    let a = keep_mask(4000, 0.5, Rng { seed: 3, offset: 0 }).unwrap();
    let b = keep_mask(
        4000,
        0.5,
        Rng {
            seed: 3,
            offset: philox::counters_for(4000),
        },
    )
    .unwrap();
    let agree = a.iter().zip(&b).filter(|(x, y)| x == y).count() as f64 / 4000.0;
    assert!(
        (agree - 0.5).abs() < 0.05,
        "masks of consecutive calls agree on {agree}"
    );
}

#[test]
fn bad_inputs_are_errors() {
    let w = Tensor::zeros((2, 3), DType::F32, &CPU).unwrap();
    let rng = Rng { seed: 0, offset: 0 };
    let msg = |r: tunefuse::Result<Tensor>| r.unwrap_err().to_string();
    for p in [1.0, -0.1, 1.5, f64::NAN] {
        let e = msg(mixout(&w, &w, p, rng, true));
        assert!(e.contains("p "), "p={p}: {e}");
        assert!(msg(dropout(&w, p, rng, true)).contains("p "));
    }
    let e = msg(mixout(
        &w,
        &Tensor::zeros((3, 2), DType::F32, &CPU).unwrap(),
        0.1,
        rng,
        true,
    ));
    assert!(e.contains("[2, 3]") && e.contains("[3, 2]"), "{e}");
    let e = msg(mixout(
        &w,
        &w.to_dtype(DType::BF16).unwrap(),
        0.1,
        rng,
        true,
    ));
    assert!(e.contains("BF16"), "{e}");
    let e = msg(dropout(&w.to_dtype(DType::F64).unwrap(), 0.1, rng, true));
    assert!(e.contains("f64"), "{e}");
    let e = msg(dropout(&w.to_dtype(DType::U8).unwrap(), 0.1, rng, true));
    assert!(e.contains("U8"), "{e}");
    let e = msg(dropout_add(&w, &w.t().unwrap(), 0.1, rng, true));
    assert!(e.contains("[2, 3]") && e.contains("[3, 2]"), "{e}");
    let e = msg(dropout_add(
        &w,
        &w.to_dtype(DType::F16).unwrap(),
        0.1,
        rng,
        true,
    ));
    assert!(e.contains("F16"), "{e}");
    assert!(msg(dropout_add(&w, &w, 1.0, rng, true)).contains("p "));
}

#[test]
fn dropout_add_equals_dropout_then_add_bit_for_bit() {
    // The fused op rounds the dropped value to the dtype before the add,
    // as the composition stores it: equal bits in every dtype, and the
    // same gradients (dropout's mask for x, the identity for r).
    let n = 40_003;
    let rng = Rng {
        seed: 77,
        offset: 5,
    };
    for dtype in [DType::F32, DType::BF16, DType::F16] {
        let draw =
            |seed: u64| Var::from_tensor(&tensor(&randn(n, seed, 1.0), &[n], dtype, &CPU)).unwrap();
        let (x, r) = (draw(1), draw(2));
        let fused = dropout_add(x.as_tensor(), r.as_tensor(), 0.1, rng, true).unwrap();
        let composed = (dropout(x.as_tensor(), 0.1, rng, true).unwrap() + r.as_tensor()).unwrap();
        assert_eq!(fused.dtype(), dtype);
        let (f, c) = (to_f64(&fused), to_f64(&composed));
        let differ = f
            .iter()
            .zip(&c)
            .filter(|(a, b)| a.to_bits() != b.to_bits())
            .count();
        assert_eq!(differ, 0, "{dtype:?}: {differ} of {n} elements differ");
        let dy = tensor(&randn(n, 3, 1.0), &[n], dtype, &CPU);
        let grads = |y: &Tensor| (y * &dy).unwrap().sum_all().unwrap().backward().unwrap();
        let (g1, g2) = (grads(&fused), grads(&composed));
        for (name, v) in [("dx", &x), ("dr", &r)] {
            assert_eq!(
                to_f64(g1.get(v.as_tensor()).unwrap()),
                to_f64(g2.get(v.as_tensor()).unwrap()),
                "{dtype:?}: {name}"
            );
        }
        // Some elements were dropped and some kept: the test saw both branches.
        let kept = keep_mask(n, 0.1, rng).unwrap();
        assert!(kept.iter().any(|&k| k) && kept.iter().any(|&k| !k));
        // Eval mode and p = 0: the plain sum.
        for (p, train) in [(0.1, false), (0.0, true)] {
            let y = dropout_add(x.as_tensor(), r.as_tensor(), p, rng, train).unwrap();
            let sum = (x.as_tensor() + r.as_tensor()).unwrap();
            assert_eq!(to_f64(&y), to_f64(&sum), "{dtype:?} p={p} train={train}");
        }
    }
}
