//! The bottleneck adapter (composed from candle ops until the fused kernel
//! lands) against PyTorch: ../shared/golden/adapter.json, all four
//! activation / scale cases, output and all five gradients.
mod common;

use candle_core::{Device, Tensor, Var};
use common::*;
use tunefuse::model::config::Activation;
use tunefuse::model::layers::{Adapter, Dense, Stream};

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
