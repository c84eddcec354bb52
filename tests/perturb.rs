//! CPU reference of the perturbation ops: PyTorch goldens, properties, noise
//! statistics, non-finite flags, the `Perturbation` loop, input checks.
mod common;

use candle_core::{DType, Device, Tensor};
use common::*;
use tunefuse::ops::mixout::Rng;
use tunefuse::ops::perturb::*;

const CPU: Device = Device::Cpu;

fn json3(v: &serde_json::Value) -> Vec<f64> {
    v.as_array()
        .unwrap()
        .iter()
        .flat_map(|m| json_matrix(m).concat())
        .collect()
}

fn step(eta: f64, norm: Norm, granularity: Granularity, mode: StepMode) -> AscentStep {
    AscentStep {
        eta,
        norm,
        granularity,
        mode,
    }
}

#[test]
fn golden_cases() {
    let g = golden("perturb.json");
    let shape = [2, 3, 5];
    let delta = tensor(&json3(&g["delta"]), &shape, DType::F64, &CPU);
    let grad = tensor(&json3(&g["grad"]), &shape, DType::F64, &CPU);
    let mask = tensor(&json_matrix(&g["mask"]).concat(), &[2, 3], DType::F64, &CPU);
    let cases = g["cases"].as_array().unwrap();
    assert_eq!(cases.len(), 12);
    for c in cases {
        let eps = c
            .get("eps")
            .or(c.get("epsilon"))
            .and_then(|v| v.as_f64())
            .unwrap();
        let mode = match c["mode"].as_str().unwrap() {
            "pgd" => StepMode::Pgd { eps: Some(eps) },
            "direction" => StepMode::Direction { eps0: eps },
            "normalized_step" => StepMode::NormalizedStep { eps0: eps },
            m => panic!("unknown mode {m}"),
        };
        let norm = if c["norm"] == "l2" {
            Norm::L2
        } else {
            Norm::Linf
        };
        let gran = if c["granularity"] == "token" {
            Granularity::Token
        } else {
            Granularity::Example
        };
        let s = step(c["step_size"].as_f64().unwrap(), norm, gran, mode);
        let (out, flags) = ascent_step(&delta, &grad, &mask, &s).unwrap();
        // The golden inputs are stored with 10 decimals (±5e-11). normalized_step
        // divides by |delta + eta g| ~ 1e-2, which turns that into ~5e-9 on
        // outputs of order 1; the other modes keep it at ~1e-10.
        let tol = if matches!(mode, StepMode::NormalizedStep { .. }) {
            1e-8
        } else {
            1e-9
        };
        assert_close(
            &format!("{s:?}"),
            &to_f64(&out),
            &json3(&c["out"]),
            tol,
            0.0,
        );
        assert_eq!(to_f64(&flags), vec![0.0, 0.0]);
    }
}

fn unit_norms(x: &[f64], l: usize, h: usize, l2: bool, token: bool) -> Vec<f64> {
    let unit = if token { h } else { l * h };
    x.chunks(unit)
        .map(|u| {
            if l2 {
                u.iter().map(|v| v * v).sum::<f64>().sqrt()
            } else {
                u.iter().fold(0.0f64, |m, v| m.max(v.abs()))
            }
        })
        .collect()
}

#[test]
fn properties() {
    let (b, l, h) = (3, 4, 7);
    let n = b * l * h;
    let delta = tensor(&randn(n, 1, 0.01), &[b, l, h], DType::F64, &CPU);
    let grad_v = randn(n, 2, 1.0);
    let grad = tensor(&grad_v, &[b, l, h], DType::F64, &CPU);
    let maskv: Vec<f64> = (0..b * l)
        .map(|i| if i % 4 == 3 { 0.0 } else { 1.0 })
        .collect();
    let mask = tensor(&maskv, &[b, l], DType::F64, &CPU);
    let masked = |x: &[f64]| (0..n).filter(|&i| maskv[i / h] == 0.0).all(|i| x[i] == 0.0);
    for norm in [Norm::L2, Norm::Linf] {
        for gran in [Granularity::Token, Granularity::Example] {
            let (l2, token) = (norm == Norm::L2, gran == Granularity::Token);
            let tag = format!("{norm:?} {gran:?}");
            // pgd output within the eps-ball.
            let eps = 0.05;
            let (out, _) = ascent_step(
                &delta,
                &grad,
                &mask,
                &step(0.3, norm, gran, StepMode::Pgd { eps: Some(eps) }),
            )
            .unwrap();
            let out = to_f64(&out);
            assert!(
                unit_norms(&out, l, h, l2, token)
                    .iter()
                    .all(|&v| v <= eps * (1.0 + 1e-12)),
                "{tag}: pgd outside the ball"
            );
            assert!(masked(&out), "{tag}: pgd wrote padding");
            // direction: norm eta |g| / (|g| + eps0).
            let (eta, eps0) = (0.02, 0.5);
            let (out, _) = ascent_step(
                &delta,
                &grad,
                &mask,
                &step(eta, norm, gran, StepMode::Direction { eps0 }),
            )
            .unwrap();
            let out = to_f64(&out);
            let gm: Vec<f64> = (0..n).map(|i| grad_v[i] * maskv[i / h]).collect();
            let want: Vec<f64> = unit_norms(&gm, l, h, l2, token)
                .iter()
                .map(|&g| eta * g / (g + eps0))
                .collect();
            assert_close(
                &format!("{tag}: direction norms"),
                &unit_norms(&out, l, h, l2, token),
                &want,
                1e-14,
                1e-12,
            );
            assert!(masked(&out), "{tag}: direction wrote padding");
            // A zero gradient: pgd stays at delta (masked), direction gives 0.
            let zero = Tensor::zeros((b, l, h), DType::F64, &CPU).unwrap();
            let (out, _) = ascent_step(
                &delta,
                &zero,
                &mask,
                &step(0.3, norm, gran, StepMode::Pgd { eps: None }),
            )
            .unwrap();
            let dv = to_f64(&delta);
            let want: Vec<f64> = (0..n).map(|i| dv[i] * maskv[i / h]).collect();
            assert_eq!(to_f64(&out), want, "{tag}: pgd with zero gradient");
            let (out, flags) = ascent_step(
                &delta,
                &zero,
                &mask,
                &step(0.3, norm, gran, StepMode::Direction { eps0: 0.0 }),
            )
            .unwrap();
            assert!(
                to_f64(&out).iter().all(|&v| v == 0.0),
                "{tag}: direction of zero gradient"
            );
            assert_eq!(
                to_f64(&flags),
                vec![0.0; b],
                "{tag}: zero gradient is finite"
            );
        }
    }
}

#[test]
fn nonfinite_gradients_are_flagged() {
    let (b, l, h) = (3, 2, 4);
    let mut g = randn(b * l * h, 5, 1.0);
    g[l * h + 3] = f64::INFINITY; // example 1, token 0
    g[2 * l * h + h + 1] = f64::NAN; // example 2, token 1
    let grad = tensor(&g, &[b, l, h], DType::F32, &CPU);
    let delta = Tensor::zeros((b, l, h), DType::F32, &CPU).unwrap();
    let mask = Tensor::ones((b, l), DType::U8, &CPU).unwrap();
    for gran in [Granularity::Token, Granularity::Example] {
        for norm in [Norm::L2, Norm::Linf] {
            let (out, flags) = ascent_step(
                &delta,
                &grad,
                &mask,
                &step(0.1, norm, gran, StepMode::Direction { eps0: 1e-6 }),
            )
            .unwrap();
            assert_eq!(to_f64(&flags), vec![0.0, 1.0, 1.0], "{norm:?} {gran:?}");
            let out = to_f64(&out);
            assert!(
                out[..l * h].iter().all(|v| v.is_finite()),
                "example 0 must be untouched"
            );
            assert!(
                out[l * h..l * h + h].iter().all(|v| v.is_nan()),
                "the flagged unit is NaN"
            );
        }
    }
}

#[test]
fn noise_statistics_and_mask() {
    let (b, l, h) = (4, 64, 96);
    let maskv: Vec<f64> = (0..b * l)
        .map(|i| if i % 10 == 9 { 0.0 } else { 1.0 })
        .collect();
    let mask = tensor(&maskv, &[b, l], DType::F32, &CPU);
    let sigma = 0.3;
    for noise in [Noise::Normal { sigma }, Noise::Uniform { sigma }] {
        for dtype in [DType::F32, DType::BF16, DType::F16] {
            let x = to_f64(
                &noise_init(
                    &[b, l, h],
                    &mask,
                    noise,
                    dtype,
                    Rng {
                        seed: 11,
                        offset: 0,
                    },
                )
                .unwrap(),
            );
            let real: Vec<f64> = (0..x.len())
                .filter(|&i| maskv[i / h] != 0.0)
                .map(|i| x[i])
                .collect();
            assert!(
                (0..x.len())
                    .filter(|&i| maskv[i / h] == 0.0)
                    .all(|i| x[i] == 0.0),
                "{noise:?}: padding not zero"
            );
            let n = real.len() as f64;
            let mean = real.iter().sum::<f64>() / n;
            let sd = (real.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / n).sqrt();
            let want_sd = match noise {
                Noise::Normal { .. } => sigma,
                Noise::Uniform { .. } => sigma / 3f64.sqrt(),
            };
            // ~22k samples: the mean's std is sd/148; 5 sigma.
            assert!(
                mean.abs() < 5.0 * want_sd / n.sqrt(),
                "{noise:?} {dtype:?}: mean {mean}"
            );
            assert!(
                (sd / want_sd - 1.0).abs() < 0.02,
                "{noise:?} {dtype:?}: std {sd} vs {want_sd}"
            );
            if let Noise::Uniform { .. } = noise {
                // Rounding to the dtype is monotone: |x| <= sigma (as f32)
                // gives |round(x)| <= round(sigma).
                let bound = to_f64(&tensor(&[sigma as f32 as f64], &[1], dtype, &CPU))[0];
                let worst = real.iter().fold(0.0f64, |m, v| m.max(v.abs()));
                assert!(
                    worst <= bound,
                    "{dtype:?}: uniform out of bounds: {worst} > {bound}"
                );
            }
        }
    }
    // Different offsets give different noise; the same seed and offset the same.
    let m1 = Tensor::ones((1, 8), DType::F32, &CPU).unwrap();
    let draw = |offset: u64| {
        to_f64(
            &noise_init(
                &[1, 8, 8],
                &m1,
                Noise::Normal { sigma: 1.0 },
                DType::F32,
                Rng { seed: 1, offset },
            )
            .unwrap(),
        )
    };
    assert_eq!(draw(0), draw(0));
    assert_ne!(draw(0), draw(16));
}

#[test]
fn perturbation_loop_is_init_then_steps() {
    let (b, l, h) = (2, 3, 4);
    let mask = Tensor::new(&[[1u8, 1, 0], [1, 0, 0]], &CPU).unwrap();
    let p = Perturbation {
        noise: Noise::Uniform { sigma: 1e-3 },
        step: step(
            0.1,
            Norm::L2,
            Granularity::Token,
            StepMode::Pgd { eps: Some(0.5) },
        ),
        steps: 3,
    };
    // Inner objective: <delta, t> for a fixed t, so grad = t at every step.
    let t = tensor(&randn(b * l * h, 9, 1.0), &[b, l, h], DType::F32, &CPU);
    let mut rng = Rng { seed: 3, offset: 0 };
    let mut calls = 0;
    let res = p.run(&[b, l, h], &mask, DType::F32, &mut rng, |_| {
        calls += 1;
        Ok(t.clone())
    });
    let res = res.unwrap();
    assert_eq!(calls, 3);
    assert_eq!(
        rng.offset,
        (b * l * h).div_ceil(4) as u64,
        "the noise consumed its counters"
    );
    let mut d = noise_init(
        &[b, l, h],
        &mask,
        p.noise,
        DType::F32,
        Rng { seed: 3, offset: 0 },
    )
    .unwrap();
    for _ in 0..3 {
        d = ascent_step(&d, &t, &mask, &p.step).unwrap().0;
    }
    assert_eq!(to_f64(&res.delta), to_f64(&d));
    assert!(!res.any_nonfinite().unwrap());
}

#[test]
fn bad_inputs_are_errors() {
    let d = Tensor::zeros((2, 3, 4), DType::F32, &CPU).unwrap();
    let m = Tensor::ones((2, 3), DType::F32, &CPU).unwrap();
    let ok = step(
        0.1,
        Norm::L2,
        Granularity::Token,
        StepMode::Pgd { eps: Some(0.1) },
    );
    let msg = |r: tunefuse::Result<(Tensor, Tensor)>| r.expect_err("an error").to_string();
    let e = msg(ascent_step(
        &d,
        &Tensor::zeros((2, 3, 5), DType::F32, &CPU).unwrap(),
        &m,
        &ok,
    ));
    assert!(e.contains("[2, 3, 4]") && e.contains("[2, 3, 5]"), "{e}");
    let e = msg(ascent_step(&d, &d.to_dtype(DType::F16).unwrap(), &m, &ok));
    assert!(e.contains("F16"), "{e}");
    let e = msg(ascent_step(
        &d,
        &d,
        &Tensor::ones((3, 2), DType::F32, &CPU).unwrap(),
        &ok,
    ));
    assert!(e.contains("token mask") && e.contains("[3, 2]"), "{e}");
    for bad in [
        step(
            -0.1,
            Norm::L2,
            Granularity::Token,
            StepMode::Pgd { eps: None },
        ),
        step(
            f64::NAN,
            Norm::L2,
            Granularity::Token,
            StepMode::Pgd { eps: None },
        ),
        step(
            0.1,
            Norm::L2,
            Granularity::Token,
            StepMode::Pgd { eps: Some(-1.0) },
        ),
        step(
            0.1,
            Norm::L2,
            Granularity::Token,
            StepMode::Direction {
                eps0: f64::INFINITY,
            },
        ),
        step(
            0.1,
            Norm::L2,
            Granularity::Token,
            StepMode::NormalizedStep { eps0: -1e-6 },
        ),
    ] {
        let e = msg(ascent_step(&d, &d, &m, &bad));
        assert!(e.contains("must be finite and >= 0"), "{bad:?}: {e}");
    }
    let empty = Tensor::zeros((0, 3, 4), DType::F32, &CPU).unwrap();
    let e = msg(ascent_step(
        &empty,
        &empty,
        &Tensor::zeros((0, 3), DType::F32, &CPU).unwrap(),
        &ok,
    ));
    assert!(e.contains("empty batch"), "{e}");
    let e = msg(ascent_step(&m, &m, &m, &ok));
    assert!(e.contains("[B, L, H]"), "{e}");
    let e = noise_init(
        &[2, 3, 4],
        &m,
        Noise::Normal { sigma: -1.0 },
        DType::F32,
        Rng { seed: 0, offset: 0 },
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("sigma"), "{e}");
    let e = noise_init(
        &[2, 3, 4],
        &m,
        Noise::Normal { sigma: 1.0 },
        DType::U8,
        Rng { seed: 0, offset: 0 },
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("U8"), "{e}");
}

#[test]
fn composed_baseline_matches_reference() {
    let (b, l, h) = (2, 5, 6);
    let delta = tensor(&randn(b * l * h, 31, 0.01), &[b, l, h], DType::F64, &CPU);
    let grad = tensor(&randn(b * l * h, 32, 1.0), &[b, l, h], DType::F64, &CPU);
    let mask = tensor(
        &[1.0, 1.0, 1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0],
        &[b, l],
        DType::F64,
        &CPU,
    );
    let s = step(
        0.02,
        Norm::L2,
        Granularity::Token,
        StepMode::Pgd { eps: Some(0.015) },
    );
    let (want, _) = ascent_step(&delta, &grad, &mask, &s).unwrap();
    let got = tunefuse::bench::ascent_step_composed(&delta, &grad, &mask, 0.02, 0.015).unwrap();
    assert_close("composed pgd", &to_f64(&got), &to_f64(&want), 1e-15, 1e-12);
}
