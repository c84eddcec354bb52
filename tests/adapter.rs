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

#[test]
fn adapter_matches_pytorch() {
    let g = golden("adapter.json");
    let (t, d, r) = (6, 8, 3);
    let x = var(&g["x"], &[t, d]);
    let (wd, bd) = (var(&g["w_down"], &[r, d]), var(&g["b_down"], &[r]));
    let (wu, bu) = (var(&g["w_up"], &[d, r]), var(&g["b_up"], &[d]));
    let dy = Tensor::from_vec(json_matrix(&g["dy"]).concat(), (t, d), &Device::Cpu).unwrap();
    let cases = g["cases"].as_array().unwrap();
    assert_eq!(cases.len(), 4);
    for c in cases {
        let act = match c["act"].as_str().unwrap() {
            "gelu_erf" => Activation::GeluErf,
            "gelu_tanh" => Activation::GeluTanh,
            "relu" => Activation::Relu,
            "silu" => Activation::Silu,
            a => panic!("unknown activation {a}"),
        };
        let scale = c["scale"].as_f64().unwrap();
        let ad = Adapter {
            down: dense("down", &wd, &bd),
            up: dense("up", &wu, &bu),
            act,
            scale,
        };
        let y = ad.forward(x.as_tensor(), &Stream::new(0)).unwrap();
        let tag = format!("{act:?} scale {scale}");
        assert_close(
            &format!("{tag}: y"),
            &to_f64(&y),
            &json_matrix(&c["y"]).concat(),
            1e-9,
            1e-9,
        );
        let grads = (y * &dy).unwrap().sum_all().unwrap().backward().unwrap();
        let get = |v: &Var| to_f64(grads.get(v.as_tensor()).unwrap());
        assert_close(
            &format!("{tag}: dx"),
            &get(&x),
            &json_matrix(&c["grad_x"]).concat(),
            1e-9,
            1e-9,
        );
        assert_close(
            &format!("{tag}: dW_d"),
            &get(&wd),
            &json_matrix(&c["grad_w_down"]).concat(),
            1e-9,
            1e-9,
        );
        assert_close(
            &format!("{tag}: db_d"),
            &get(&bd),
            &json_vec(&c["grad_b_down"]),
            1e-9,
            1e-9,
        );
        assert_close(
            &format!("{tag}: dW_u"),
            &get(&wu),
            &json_matrix(&c["grad_w_up"]).concat(),
            1e-9,
            1e-9,
        );
        assert_close(
            &format!("{tag}: db_u"),
            &get(&bu),
            &json_vec(&c["grad_b_up"]),
            1e-9,
            1e-9,
        );
    }
}

// ------------------------------------------------- the adapter op (CPU reference)

fn golden_weights(g: &serde_json::Value, act: Act, scale: f64) -> (Var, AdapterWeights, [Var; 4]) {
    let (t, d, r) = (6, 8, 3);
    let x = var(&g["x"], &[t, d]);
    let (wd, bd) = (var(&g["w_down"], &[r, d]), var(&g["b_down"], &[r]));
    let (wu, bu) = (var(&g["w_up"], &[d, r]), var(&g["b_up"], &[d]));
    let w = AdapterWeights {
        w_down: wd.as_tensor().clone(),
        b_down: Some(bd.as_tensor().clone()),
        w_up: wu.as_tensor().clone(),
        b_up: Some(bu.as_tensor().clone()),
        act,
        scale,
    };
    (x, w, [wd, bd, wu, bu])
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

#[test]
fn reference_op_matches_pytorch() {
    let g = golden("adapter.json");
    let dy = Tensor::from_vec(json_matrix(&g["dy"]).concat(), (6, 8), &Device::Cpu).unwrap();
    for c in g["cases"].as_array().unwrap() {
        let (x, w, [wd, bd, wu, bu]) = golden_weights(
            &g,
            act_of(c["act"].as_str().unwrap()),
            c["scale"].as_f64().unwrap(),
        );
        let tag = format!("{} scale {}", c["act"], c["scale"]);
        let y = adapter(x.as_tensor(), &w, None).unwrap();
        assert_close(
            &format!("{tag}: y"),
            &to_f64(&y),
            &json_matrix(&c["y"]).concat(),
            1e-9,
            1e-9,
        );
        let grads = (y * &dy).unwrap().sum_all().unwrap().backward().unwrap();
        let get = |v: &Var| to_f64(grads.get(v.as_tensor()).unwrap());
        assert_close(
            &format!("{tag}: dx"),
            &get(&x),
            &json_matrix(&c["grad_x"]).concat(),
            1e-9,
            1e-9,
        );
        assert_close(
            &format!("{tag}: dW_d"),
            &get(&wd),
            &json_matrix(&c["grad_w_down"]).concat(),
            1e-9,
            1e-9,
        );
        assert_close(
            &format!("{tag}: db_d"),
            &get(&bd),
            &json_vec(&c["grad_b_down"]),
            1e-9,
            1e-9,
        );
        assert_close(
            &format!("{tag}: dW_u"),
            &get(&wu),
            &json_matrix(&c["grad_w_up"]).concat(),
            1e-9,
            1e-9,
        );
        assert_close(
            &format!("{tag}: db_u"),
            &get(&bu),
            &json_vec(&c["grad_b_up"]),
            1e-9,
            1e-9,
        );
        // The composed baseline computes the same.
        let yc = adapter_composed(x.as_tensor(), &w, None).unwrap();
        assert_close(
            &format!("{tag}: composed"),
            &to_f64(&yc),
            &json_matrix(&c["y"]).concat(),
            1e-9,
            1e-9,
        );
    }
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
    let h = 1e-6;
    for i in [0, 7, 29] {
        let (mut p, mut m) = (xv.clone(), xv.clone());
        p[i] += h;
        m[i] -= h;
        let (xp, wp) = mk(&p, &wdv);
        let (xm, wm) = mk(&m, &wdv);
        let fd = (loss(&adapter(&xp, &wp, None).unwrap())
            - loss(&adapter(&xm, &wm, None).unwrap()))
            / (2.0 * h);
        assert!(
            (fd - gx[i]).abs() < 1e-6 * (1.0 + fd.abs()),
            "dx[{i}]: {fd} vs {}",
            gx[i]
        );
    }
    for i in [0, 11, 19] {
        let (mut p, mut m) = (wdv.clone(), wdv.clone());
        p[i] += h;
        m[i] -= h;
        let (xp, wp) = mk(&xv, &p);
        let (xm, wm) = mk(&xv, &m);
        let fd = (loss(&adapter(&xp, &wp, None).unwrap())
            - loss(&adapter(&xm, &wm, None).unwrap()))
            / (2.0 * h);
        assert!(
            (fd - gw[i]).abs() < 1e-6 * (1.0 + fd.abs()),
            "dW_d[{i}]: {fd} vs {}",
            gw[i]
        );
    }
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
