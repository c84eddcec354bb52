//! The bottleneck adapter against PyTorch (../shared/golden/adapter.json, all
//! four activation / scale cases, output and all five gradients): the
//! model's composed module and the op's CPU reference; finite differences,
//! the LoRA path, input checks.
mod common;

use candle_core::{Device, Tensor, Var};
use common::*;
use tunefuse::model::config::Activation;
use tunefuse::model::layers::{Adapter, Dense, Stream};
use tunefuse::ops::adapter::{adapter, adapter_composed, Act, AdapterWeights};

fn var(v: &serde_json::Value, shape: &[usize]) -> Var {
    let flat: Vec<f64> = match v.as_array().unwrap()[0].as_array() {
        Some(_) => json_matrix(v).concat(),
        None => json_vec(v),
    };
    Var::from_tensor(&Tensor::from_vec(flat, shape, &Device::Cpu).unwrap()).unwrap()
}

fn dense(name: &str, w: &Var, b: &Var) -> Dense {
    Dense {
        name: name.into(),
        weight: w.as_tensor().clone(),
        bias: Some(b.as_tensor().clone()),
        frozen: false,
        mixout: None,
        lora: None,
    }
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
            down: dense("down", &w[0], &w[1]),
            up: dense("up", &w[2], &w[3]),
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

#[test]
fn lora_path_equals_the_unfused_composition() {
    // A LoRA delta on a base layer's output: identity, no biases, explicit residual.
    let (t, d, r) = (5, 7, 2);
    let x = Var::from_tensor(&tensor(
        &randn(t * d, 1, 1.0),
        &[t, d],
        candle_core::DType::F64,
        &Device::Cpu,
    ))
    .unwrap();
    let base = tensor(
        &randn(t * d, 2, 1.0),
        &[t, d],
        candle_core::DType::F64,
        &Device::Cpu,
    );
    let a = tensor(
        &randn(r * d, 3, 0.3),
        &[r, d],
        candle_core::DType::F64,
        &Device::Cpu,
    );
    let b = tensor(
        &randn(d * r, 4, 0.3),
        &[d, r],
        candle_core::DType::F64,
        &Device::Cpu,
    );
    let w = AdapterWeights {
        w_down: a.clone(),
        b_down: None,
        w_up: b.clone(),
        b_up: None,
        act: Act::Identity,
        scale: 2.0,
    };
    let y = adapter(x.as_tensor(), &w, Some(&base)).unwrap();
    let want = (&base
        + (x.as_tensor()
            .matmul(&a.t().unwrap())
            .unwrap()
            .matmul(&b.t().unwrap())
            .unwrap()
            * 2.0)
            .unwrap())
    .unwrap();
    assert_close("lora", &to_f64(&y), &to_f64(&want), 1e-12, 1e-12);
    let g1 = y.sum_all().unwrap().backward().unwrap();
    let x2 = Var::from_tensor(x.as_tensor()).unwrap();
    let want2 = (&base
        + (x2
            .as_tensor()
            .matmul(&a.t().unwrap())
            .unwrap()
            .matmul(&b.t().unwrap())
            .unwrap()
            * 2.0)
            .unwrap())
    .unwrap();
    let g2 = want2.sum_all().unwrap().backward().unwrap();
    assert_close(
        "lora dx",
        &to_f64(g1.get(x.as_tensor()).unwrap()),
        &to_f64(g2.get(x2.as_tensor()).unwrap()),
        1e-12,
        1e-12,
    );
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
