//! The bottleneck adapter against PyTorch (../shared/golden/adapter.json, all
//! four activation / scale cases, output and all five gradients): the
//! model's module and the op's CPU reference; finite differences, the LoRA
//! path (also with a different output width), the modules' initialisation,
//! input checks.
mod common;

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use common::*;
use tunefuse::model::config::Activation;
use tunefuse::model::layers::{Adapter, Lora, Stream};
use tunefuse::ops::adapter::{adapter, adapter_composed, Act, AdapterWeights};

fn var(v: &serde_json::Value, shape: &[usize]) -> Var {
    let flat: Vec<f64> = match v.as_array().unwrap()[0].as_array() {
        Some(_) => json_matrix(v).concat(),
        None => json_vec(v),
    };
    Var::from_tensor(&Tensor::from_vec(flat, shape, &Device::Cpu).unwrap()).unwrap()
}

fn act_of(name: &str) -> Act {
    match name {
        "gelu_erf" => Act::GeluErf,
        "gelu_tanh" => Act::GeluTanh,
        "relu" => Act::Relu,
        "silu" => Act::Silu,
        a => panic!("unknown activation {a}"),
    }
}

/// Runs `forward(x, [W_d, b_d, W_u, b_u], act, scale)` on every golden case
/// and checks y and all five gradients (for the golden dy) at 1e-9.
fn check_golden(what: &str, forward: impl Fn(&Tensor, &[Var; 4], Act, f64) -> Tensor) {
    let g = golden("adapter.json");
    let (t, d, r) = (6, 8, 3);
    let x = var(&g["x"], &[t, d]);
    let w = [
        var(&g["w_down"], &[r, d]),
        var(&g["b_down"], &[r]),
        var(&g["w_up"], &[d, r]),
        var(&g["b_up"], &[d]),
    ];
    let dy = Tensor::from_vec(json_matrix(&g["dy"]).concat(), (t, d), &Device::Cpu).unwrap();
    let cases = g["cases"].as_array().unwrap();
    assert_eq!(cases.len(), 4);
    for c in cases {
        let tag = format!("{what}, {} scale {}", c["act"], c["scale"]);
        let y = forward(
            x.as_tensor(),
            &w,
            act_of(c["act"].as_str().unwrap()),
            c["scale"].as_f64().unwrap(),
        );
        assert_close(
            &format!("{tag}: y"),
            &to_f64(&y),
            &json_matrix(&c["y"]).concat(),
            1e-9,
            1e-9,
        );
        let grads = (y * &dy).unwrap().sum_all().unwrap().backward().unwrap();
        let get = |v: &Var| to_f64(grads.get(v.as_tensor()).unwrap());
        let want = [
            ("dx", &x, json_matrix(&c["grad_x"]).concat()),
            ("dW_d", &w[0], json_matrix(&c["grad_w_down"]).concat()),
            ("db_d", &w[1], json_vec(&c["grad_b_down"])),
            ("dW_u", &w[2], json_matrix(&c["grad_w_up"]).concat()),
            ("db_u", &w[3], json_vec(&c["grad_b_up"])),
        ];
        for (name, v, expected) in want {
            assert_close(&format!("{tag}: {name}"), &get(v), &expected, 1e-9, 1e-9);
        }
    }
}

fn weights(w: &[Var; 4], act: Act, scale: f64) -> AdapterWeights {
    AdapterWeights {
        w_down: w[0].as_tensor().clone(),
        b_down: Some(w[1].as_tensor().clone()),
        w_up: w[2].as_tensor().clone(),
        b_up: Some(w[3].as_tensor().clone()),
        act,
        scale,
    }
}

#[test]
fn model_adapter_matches_pytorch() {
    check_golden("model Adapter", |x, w, act, scale| {
        let act = match act {
            Act::GeluErf => Activation::GeluErf,
            Act::GeluTanh => Activation::GeluTanh,
            Act::Relu => Activation::Relu,
            Act::Silu => Activation::Silu,
            Act::Identity => unreachable!("not in the golden file"),
        };
        let ad = Adapter {
            w_down: w[0].as_tensor().clone(),
            b_down: w[1].as_tensor().clone(),
            w_up: w[2].as_tensor().clone(),
            b_up: w[3].as_tensor().clone(),
            act,
            scale,
        };
        ad.forward(x, &Stream::new(0)).unwrap()
    });
}

#[test]
fn reference_op_matches_pytorch() {
    check_golden("reference op", |x, w, act, scale| {
        adapter(x, &weights(w, act, scale), None).unwrap()
    });
}

#[test]
fn composed_op_matches_pytorch() {
    check_golden("composed op", |x, w, act, scale| {
        adapter_composed(x, &weights(w, act, scale), None).unwrap()
    });
}

fn f64_tensor(n: usize, seed: u64, std: f64, dims: &[usize]) -> Tensor {
    tensor(&randn(n, seed, std), dims, DType::F64, &Device::Cpu)
}

#[test]
fn lora_path_equals_the_unfused_composition() {
    // A LoRA delta on a base layer's output: identity, no biases, explicit
    // residual; square (m = n) and rectangular (an intermediate projection).
    for (t, m, n, r) in [(5, 7, 7, 2), (4, 6, 9, 3)] {
        let x = Var::from_tensor(&f64_tensor(t * m, 1, 1.0, &[t, m])).unwrap();
        let base = Var::from_tensor(&f64_tensor(t * n, 2, 1.0, &[t, n])).unwrap();
        let a = Var::from_tensor(&f64_tensor(r * m, 3, 0.3, &[r, m])).unwrap();
        let b = Var::from_tensor(&f64_tensor(n * r, 4, 0.3, &[n, r])).unwrap();
        let dy = f64_tensor(t * n, 5, 1.0, &[t, n]);
        let w = AdapterWeights {
            w_down: a.as_tensor().clone(),
            b_down: None,
            w_up: b.as_tensor().clone(),
            b_up: None,
            act: Act::Identity,
            scale: 2.0,
        };
        let fused = adapter(x.as_tensor(), &w, Some(base.as_tensor())).unwrap();
        let composed = (base.as_tensor()
            + (x.as_tensor()
                .matmul(&a.as_tensor().t().unwrap())
                .unwrap()
                .matmul(&b.as_tensor().t().unwrap())
                .unwrap()
                * 2.0)
                .unwrap())
        .unwrap();
        let tag = format!("lora {t}x{m}->{n} r {r}");
        assert_eq!(fused.dims(), &[t, n]);
        assert_close(&tag, &to_f64(&fused), &to_f64(&composed), 1e-12, 1e-12);
        let g1 = (fused * &dy)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let g2 = (composed * &dy)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        for (name, v) in [("dx", &x), ("d base", &base), ("dA", &a), ("dB", &b)] {
            assert_close(
                &format!("{tag}: {name}"),
                &to_f64(g1.get(v.as_tensor()).unwrap()),
                &to_f64(g2.get(v.as_tensor()).unwrap()),
                1e-12,
                1e-12,
            );
        }
    }
}

#[test]
fn one_absent_bias_matches_the_composition() {
    // Without biases the op packs W_d and W_u alone; with one of the two it
    // packs the absent one as zeros. Both layouts against candle's
    // composition: y and the gradients of x and every weight present.
    let (t, d, r) = (4, 6, 3);
    for (with_bd, with_bu) in [(true, false), (false, true), (false, false)] {
        let v = |n: usize, seed: u64, std: f64, dims: &[usize]| {
            Var::from_tensor(&f64_tensor(n, seed, std, dims)).unwrap()
        };
        let x = v(t * d, 21, 1.0, &[t, d]);
        let wd = v(r * d, 22, 0.4, &[r, d]);
        let wu = v(d * r, 23, 0.4, &[d, r]);
        let bd = v(r, 24, 0.2, &[r]);
        let bu = v(d, 25, 0.2, &[d]);
        let w = AdapterWeights {
            w_down: wd.as_tensor().clone(),
            b_down: with_bd.then(|| bd.as_tensor().clone()),
            w_up: wu.as_tensor().clone(),
            b_up: with_bu.then(|| bu.as_tensor().clone()),
            act: Act::GeluErf,
            scale: 0.8,
        };
        let dy = f64_tensor(t * d, 26, 1.0, &[t, d]);
        let tag = format!("b_d {with_bd} b_u {with_bu}");
        let fused = adapter(x.as_tensor(), &w, None).unwrap();
        let composed = adapter_composed(x.as_tensor(), &w, None).unwrap();
        assert_close(&tag, &to_f64(&fused), &to_f64(&composed), 1e-12, 1e-12);
        let grads = |y: Tensor| (y * &dy).unwrap().sum_all().unwrap().backward().unwrap();
        let (g1, g2) = (grads(fused), grads(composed));
        let mut present = vec![("dx", &x), ("dW_d", &wd), ("dW_u", &wu)];
        if with_bd {
            present.push(("db_d", &bd));
        }
        if with_bu {
            present.push(("db_u", &bu));
        }
        for (name, var) in present {
            assert_close(
                &format!("{tag}: {name}"),
                &to_f64(g1.get(var.as_tensor()).unwrap()),
                &to_f64(g2.get(var.as_tensor()).unwrap()),
                1e-12,
                1e-12,
            );
        }
        // An absent bias is no parameter: autograd gives it no gradient.
        if !with_bd {
            assert!(g1.get(bd.as_tensor()).is_none(), "{tag}: db_d");
        }
    }
}

#[test]
fn modules_start_near_the_identity() {
    // adapter-bert's init: N(0, 1e-3) weights, zero biases: y ≈ x but not
    // exactly (the adapter must be trainable from the start).
    let vm = VarMap::new();
    let vb = VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu);
    let ad = Adapter::new(&vb.pp("ad"), 48, 8, Activation::GeluErf, 1.0).unwrap();
    let x = Tensor::randn(0f32, 1.0, (2, 5, 48), &Device::Cpu).unwrap();
    let y = ad.forward(&x, &Stream::new(0)).unwrap();
    let diff = max_abs_diff(&to_f64(&y), &to_f64(&x));
    assert!(
        diff > 0.0 && diff < 1e-4,
        "adapter at init moves x by {diff}"
    );
    for name in [
        "ad.down.weight",
        "ad.down.bias",
        "ad.up.weight",
        "ad.up.bias",
    ] {
        assert!(vm.data().lock().unwrap().contains_key(name), "{name}");
    }
    let std = to_f64(&ad.w_down);
    let rms = (std.iter().map(|v| v * v).sum::<f64>() / std.len() as f64).sqrt();
    assert!((rms - 1e-3).abs() < 2e-4, "W_d std {rms}, want 1e-3");
    // LoRA: B = 0, so the delta is exactly zero and base passes unchanged.
    let lora = Lora::new(&vb.pp("lora"), 48, 20, 4, 8.0).unwrap();
    assert_eq!(lora.scale, 2.0);
    let base = Tensor::randn(0f32, 1.0, (2, 5, 20), &Device::Cpu).unwrap();
    let delta = lora.forward(&x, &Stream::new(0)).unwrap();
    assert_eq!(delta.dims(), &[2, 5, 20]);
    assert_eq!(max_abs_diff(&to_f64(&delta), &vec![0.0; 200]), 0.0);
    assert_eq!(
        to_f64(&lora.add_to(&x, &base, &Stream::new(0)).unwrap()),
        to_f64(&base),
        "a new LoRA changes its layer"
    );
    // With B ≠ 0 the module computes base + (α/r)·x·Aᵀ·Bᵀ.
    let b = Tensor::randn(0f32, 1.0, (20, 4), &Device::Cpu).unwrap();
    let lora = Lora {
        b: b.clone(),
        ..lora
    };
    let want = (&base
        + (x.broadcast_matmul(&lora.a.t().unwrap())
            .unwrap()
            .broadcast_matmul(&b.t().unwrap())
            .unwrap()
            * 2.0)
            .unwrap())
    .unwrap();
    assert_close(
        "lora module",
        &to_f64(&lora.add_to(&x, &base, &Stream::new(0)).unwrap()),
        &to_f64(&want),
        1e-5,
        1e-5,
    );
    assert!(Lora::new(&vb.pp("bad"), 48, 20, 0, 8.0).is_err());
    assert!(Adapter::new(&vb.pp("bad2"), 48, 0, Activation::Relu, 1.0).is_err());
}

#[test]
fn finite_differences_and_leading_dims() {
    // x of shape [2, 3, d] (leading dims flattened to T rows), silu.
    let (d, r) = (5, 4);
    let xv = randn(2 * 3 * d, 7, 1.0);
    let wdv = randn(r * d, 8, 0.5);
    let mk = |xv: &[f64], wdv: &[f64]| {
        let w = AdapterWeights {
            w_down: tensor(wdv, &[r, d], candle_core::DType::F64, &Device::Cpu),
            b_down: Some(tensor(
                &randn(r, 9, 0.1),
                &[r],
                candle_core::DType::F64,
                &Device::Cpu,
            )),
            w_up: tensor(
                &randn(d * r, 10, 0.5),
                &[d, r],
                candle_core::DType::F64,
                &Device::Cpu,
            ),
            b_up: Some(tensor(
                &randn(d, 11, 0.1),
                &[d],
                candle_core::DType::F64,
                &Device::Cpu,
            )),
            act: Act::Silu,
            scale: 0.7,
        };
        (
            tensor(xv, &[2, 3, d], candle_core::DType::F64, &Device::Cpu),
            w,
        )
    };
    let (x, w) = mk(&xv, &wdv);
    let (xvar, wdvar) = (
        Var::from_tensor(&x).unwrap(),
        Var::from_tensor(&w.w_down).unwrap(),
    );
    let w2 = AdapterWeights {
        w_down: wdvar.as_tensor().clone(),
        ..w.clone()
    };
    let y = adapter(xvar.as_tensor(), &w2, None).unwrap();
    assert_eq!(y.dims(), &[2, 3, d]);
    let loss = |y: &Tensor| {
        y.sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f64>()
            .unwrap()
    };
    let g = y.sqr().unwrap().sum_all().unwrap().backward().unwrap();
    let (gx, gw) = (
        to_f64(g.get(xvar.as_tensor()).unwrap()),
        to_f64(g.get(wdvar.as_tensor()).unwrap()),
    );
    let via_x = |v: &[f64]| {
        let (x, w) = mk(v, &wdv);
        loss(&adapter(&x, &w, None).unwrap())
    };
    let via_wd = |v: &[f64]| {
        let (x, w) = mk(&xv, v);
        loss(&adapter(&x, &w, None).unwrap())
    };
    check_fd("dx", &xv, &[0, 7, 29], &gx, 1e-6, 1e-6, via_x);
    check_fd("dW_d", &wdv, &[0, 11, 19], &gw, 1e-6, 1e-6, via_wd);
}

#[test]
fn bad_inputs_are_errors() {
    let f = |dims: &[usize]| Tensor::zeros(dims, candle_core::DType::F32, &Device::Cpu).unwrap();
    let ok = AdapterWeights {
        w_down: f(&[4, 8]),
        b_down: Some(f(&[4])),
        w_up: f(&[8, 4]),
        b_up: Some(f(&[8])),
        act: Act::Relu,
        scale: 1.0,
    };
    let x = f(&[3, 8]);
    assert!(adapter(&x, &ok, None).is_ok());
    let msg = |w: &AdapterWeights, x: &Tensor, res: Option<&Tensor>| {
        adapter(x, w, res).unwrap_err().to_string()
    };
    assert!(msg(
        &AdapterWeights {
            w_down: f(&[0, 8]),
            w_up: f(&[8, 0]),
            b_down: None,
            ..ok.clone()
        },
        &x,
        None
    )
    .contains("r = 0"));
    assert!(msg(&ok, &f(&[3, 9]), None).contains("d = 9"));
    assert!(msg(
        &AdapterWeights {
            b_up: Some(f(&[7])),
            ..ok.clone()
        },
        &x,
        None
    )
    .contains("b_up"));
    let e = msg(&ok, &x.to_dtype(candle_core::DType::F64).unwrap(), None);
    assert!(e.contains("F64") && e.contains("F32"), "{e}");
    assert!(msg(&ok, &x, Some(&f(&[2, 8]))).contains("residual"));
    // A LoRA of another output width needs an explicit residual of that width.
    let wide = AdapterWeights {
        w_up: f(&[12, 4]),
        b_up: None,
        ..ok.clone()
    };
    assert!(msg(&wide, &x, None).contains("explicit residual"));
    assert!(msg(&wide, &x, Some(&f(&[3, 8]))).contains("[3, 12]"));
    assert_eq!(
        adapter(&x, &wide, Some(&f(&[3, 12]))).unwrap().dims(),
        &[3, 12]
    );
    let empty_w = AdapterWeights {
        w_down: f(&[4, 0]),
        w_up: f(&[0, 4]),
        b_down: None,
        b_up: None,
        ..ok.clone()
    };
    assert!(msg(&empty_w, &f(&[3, 0]), None).contains("d = 0"));
    // Empty batches are fine: zero rows in, zero rows out.
    assert_eq!(adapter(&f(&[0, 8]), &ok, None).unwrap().dims(), &[0, 8]);
    assert!(msg(
        &AdapterWeights {
            scale: f64::NAN,
            ..ok.clone()
        },
        &x,
        None
    )
    .contains("scale"));
}

/// The activation op (one kernel each way on CUDA) against its composition
/// from candle's ops, in f64 (the two compute the same formulas: agreement
/// to a few f64 ulps), its gradient by finite differences, and in f32 / bf16
/// (f32 arithmetic, rounded once) against the exact value.
#[test]
fn activation_op_matches_the_composition_and_finite_differences() {
    use tunefuse::ops::adapter::activation;
    let cpu = Device::Cpu;
    // Values across the activations' bends, including 0 and large |x|.
    let mut vals = randn(61, 7, 2.5);
    vals.extend([0.0, -0.0, 1e-8, -12.0, 12.0, 40.0, -40.0]);
    let n = vals.len();
    let w = randn(n, 8, 1.0);
    for act in [Act::GeluErf, Act::GeluTanh, Act::Relu, Act::Silu] {
        let x = Var::from_tensor(&tensor(&vals, &[n], DType::F64, &cpu)).unwrap();
        let wt = tensor(&w, &[n], DType::F64, &cpu);
        let y = activation(x.as_tensor(), act).unwrap();
        let yc = act.apply(x.as_tensor()).unwrap();
        assert_close(
            &format!("{act:?} value"),
            &to_f64(&y),
            &to_f64(&yc),
            1e-15,
            1e-14,
        );
        let g = (&y * &wt).unwrap().sum_all().unwrap().backward().unwrap();
        let gx = to_f64(g.get(x.as_tensor()).unwrap());
        let gc = (&yc * &wt).unwrap().sum_all().unwrap().backward().unwrap();
        let gcx = to_f64(gc.get(x.as_tensor()).unwrap());
        // Relu's derivative at exactly ±0 is 0 here (PyTorch's, and the
        // adapter kernels'), 1 in candle's backward (x ≥ 0): compared
        // elsewhere.
        let keep = |v: &[f64]| -> Vec<f64> {
            v.iter()
                .zip(&vals)
                .filter(|(_, x)| act != Act::Relu || **x != 0.0)
                .map(|(g, _)| *g)
                .collect()
        };
        assert_close(
            &format!("{act:?} gradient"),
            &keep(&gx),
            &keep(&gcx),
            1e-14,
            1e-13,
        );
        if act == Act::Relu {
            assert!(vals.iter().zip(&gx).all(|(x, g)| *x != 0.0 || *g == 0.0));
        }
        let f = |v: &[f64]| -> f64 {
            let t = tensor(v, &[n], DType::F64, &cpu);
            let y = to_f64(&activation(&t, act).unwrap());
            y.iter().zip(&w).map(|(a, b)| a * b).sum()
        };
        // Away from Relu's kink at 0 (entries 61.. hold 0 and ±0).
        check_fd(
            &format!("{act:?}"),
            &vals,
            &[0, 5, 17, 33, 60, 64, 65],
            &gx,
            1e-7,
            1e-6,
            f,
        );
        for dt in [DType::F32, DType::BF16] {
            let xd = tensor(&vals, &[n], dt, &cpu);
            // The exact (f64) value on the dtype's inputs: the op computes
            // in f32 (as the kernels do) and rounds once to the dtype. f32's
            // error: a few ulps of the terms, whose size is about |x| + 1
            // (1 + erf cancels for negative x); then one unit of the dtype.
            let want = to_f64(&act.apply(&xd.to_dtype(DType::F64).unwrap()).unwrap());
            let got = activation(&xd, act).unwrap();
            assert_eq!(got.dtype(), dt);
            let ulp = if dt == DType::BF16 {
                2f64.powi(-7)
            } else {
                2f64.powi(-23)
            };
            let xs = to_f64(&xd);
            assert_within(
                &format!("{act:?} {dt:?}"),
                &to_f64(&got),
                &want,
                |i| 4.0 * 2f64.powi(-24) * (xs[i].abs() + 1.0) + ulp * want[i].abs(),
                |i| format!("x = {}", xs[i]),
            );
        }
    }
}
