//! The LayerNorm op's CPU reference: against the composed candle formula in
//! f64, against finite differences, in mixed precision (bf16 x, f32
//! weights), with frozen weights, and its errors. The MiniLM golden tests
//! (tests/model.rs) check it inside the model against Hugging Face.
mod common;

use candle_core::{DType, Device, Tensor, Var};
use common::*;
use tunefuse::ops::layer_norm;

/// The composed LayerNorm the model ran before (f64 throughout for f64 x).
fn composed(x: &Tensor, w: &Tensor, b: &Tensor, eps: f64) -> Tensor {
    tunefuse::bench::layer_norm_composed(x, w, b, eps).unwrap()
}

fn var(vals: &[f64], shape: &[usize], dtype: DType) -> Var {
    Var::from_tensor(&tensor(vals, shape, dtype, &Device::Cpu)).unwrap()
}

#[test]
fn equals_the_composed_formula_in_f64_with_gradients() {
    for (shape, offset) in [
        (vec![1, 1], 0.0),
        (vec![3, 7], 0.0),
        (vec![2, 5, 384], 0.0),
        (vec![4, 1000], 300.0),
    ] {
        let h = *shape.last().unwrap();
        let n: usize = shape.iter().product();
        let mut xv = randn(n, 1, 2.0);
        xv.iter_mut().for_each(|v| *v += offset);
        let x = var(&xv, &shape, DType::F64);
        let w = var(&randn(h, 2, 1.0), &[h], DType::F64);
        let b = var(&randn(h, 3, 1.0), &[h], DType::F64);
        let r = tensor(&randn(n, 4, 1.0), &shape, DType::F64, &Device::Cpu);
        let eps = 1e-12;
        let run = |f: &dyn Fn(&Tensor, &Tensor, &Tensor) -> Tensor| {
            let y = f(x.as_tensor(), w.as_tensor(), b.as_tensor());
            let g = (&y * &r).unwrap().sum_all().unwrap().backward().unwrap();
            let grads: Vec<Vec<f64>> = [&x, &w, &b]
                .iter()
                .map(|v| to_f64(g.get(v.as_tensor()).unwrap()))
                .collect();
            (to_f64(&y), grads)
        };
        let (y, g) = run(&|x, w, b| layer_norm(x, w, b, eps).unwrap());
        let (yc, gc) = run(&|x, w, b| composed(x, w, b, eps));
        let what = format!("{shape:?} offset {offset}");
        // Both are f64 computations of the same formula: only the
        // summation order differs (and the composed form loses digits to
        // cancellation at a large offset, hence the offset-scaled atol).
        let tol = 1e-12 * (1.0 + offset);
        assert_close(&format!("y {what}"), &y, &yc, tol, 1e-12);
        for (k, name) in ["dx", "dw", "db"].iter().enumerate() {
            let scale = gc[k].iter().fold(1.0f64, |m, v| m.max(v.abs()));
            assert_close(
                &format!("{name} {what}"),
                &g[k],
                &gc[k],
                tol * scale * 10.0,
                1e-10,
            );
        }
    }
}

#[test]
fn gradients_match_finite_differences() {
    let (rows, h) = (3, 6);
    let xv = randn(rows * h, 11, 1.5);
    let wv = randn(h, 12, 1.0);
    let bv = randn(h, 13, 1.0);
    let rv = randn(rows * h, 14, 1.0);
    let eps = 1e-5;
    let loss = |xv: &[f64], wv: &[f64], bv: &[f64]| {
        let y = layer_norm(
            &tensor(xv, &[rows, h], DType::F64, &Device::Cpu),
            &tensor(wv, &[h], DType::F64, &Device::Cpu),
            &tensor(bv, &[h], DType::F64, &Device::Cpu),
            eps,
        )
        .unwrap();
        to_f64(&y).iter().zip(&rv).map(|(a, b)| a * b).sum::<f64>()
    };
    let (x, w, b) = (
        var(&xv, &[rows, h], DType::F64),
        var(&wv, &[h], DType::F64),
        var(&bv, &[h], DType::F64),
    );
    let y = layer_norm(x.as_tensor(), w.as_tensor(), b.as_tensor(), eps).unwrap();
    let r = tensor(&rv, &[rows, h], DType::F64, &Device::Cpu);
    let g = (y * r).unwrap().sum_all().unwrap().backward().unwrap();
    let all: Vec<usize> = (0..rows * h).collect();
    check_fd(
        "dx",
        &xv,
        &all,
        &to_f64(g.get(x.as_tensor()).unwrap()),
        1e-7,
        1e-6,
        |v| loss(v, &wv, &bv),
    );
    check_fd(
        "dw",
        &wv,
        &all[..h],
        &to_f64(g.get(w.as_tensor()).unwrap()),
        1e-7,
        1e-6,
        |v| loss(&xv, v, &bv),
    );
    check_fd(
        "db",
        &bv,
        &all[..h],
        &to_f64(g.get(b.as_tensor()).unwrap()),
        1e-7,
        1e-6,
        |v| loss(&xv, &wv, v),
    );
}

#[test]
fn mixed_precision_rounds_each_output_once() {
    // bf16 activations with f32 master weights: y and dx in bf16, dw and
    // db in f32, each the f64 result rounded once.
    let (rows, h) = (5, 48);
    let xv: Vec<f64> = to_f64(&tensor(
        &randn(rows * h, 21, 2.0),
        &[rows * h],
        DType::BF16,
        &Device::Cpu,
    ));
    let x = var(&xv, &[rows, h], DType::BF16);
    let w = var(&randn(h, 22, 1.0), &[h], DType::F32);
    let b = var(&randn(h, 23, 1.0), &[h], DType::F32);
    let y = layer_norm(x.as_tensor(), w.as_tensor(), b.as_tensor(), 1e-12).unwrap();
    assert_eq!(y.dtype(), DType::BF16);
    let dyv = to_f64(&tensor(
        &randn(rows * h, 24, 1.0),
        &[rows * h],
        DType::BF16,
        &Device::Cpu,
    ));
    let dy = tensor(&dyv, &[rows, h], DType::BF16, &Device::Cpu);
    let g = (y.to_dtype(DType::F32).unwrap() * dy.to_dtype(DType::F32).unwrap())
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    // The same in f64, then rounded.
    let (x64, w64, b64) = (
        var(&xv, &[rows, h], DType::F64),
        var(&to_f64(w.as_tensor()), &[h], DType::F64),
        var(&to_f64(b.as_tensor()), &[h], DType::F64),
    );
    let y64 = layer_norm(x64.as_tensor(), w64.as_tensor(), b64.as_tensor(), 1e-12).unwrap();
    let g64 = (&y64 * tensor(&dyv, &[rows, h], DType::F64, &Device::Cpu))
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    let round = |t: &Tensor, d: DType| to_f64(&t.to_dtype(d).unwrap());
    // f64 → bf16 through candle's cast may double-round; allow one unit.
    let ulp = |v: &[f64]| {
        v.iter()
            .map(|x| x.abs() * 2f64.powi(-7))
            .collect::<Vec<_>>()
    };
    let want_y = round(&y64, DType::BF16);
    let a = ulp(&want_y);
    assert_within(
        "y",
        &to_f64(&y),
        &want_y,
        |i| a[i],
        |_| "one bf16 unit".into(),
    );
    let gx = g.get(x.as_tensor()).unwrap();
    assert_eq!(gx.dtype(), DType::BF16);
    let want = round(g64.get(x64.as_tensor()).unwrap(), DType::BF16);
    let a = ulp(&want);
    assert_within(
        "dx",
        &to_f64(gx),
        &want,
        |i| a[i],
        |_| "one bf16 unit".into(),
    );
    for (v, v64, name) in [(&w, &w64, "dw"), (&b, &b64, "db")] {
        let gv = g.get(v.as_tensor()).unwrap();
        assert_eq!(gv.dtype(), DType::F32, "{name}");
        let want = to_f64(g64.get(v64.as_tensor()).unwrap());
        assert_close(name, &to_f64(gv), &want, 0.0, 2f64.powi(-23));
    }
}

#[test]
fn frozen_weights_get_no_gradient() {
    let x = var(&randn(12, 31, 1.0), &[3, 4], DType::F32);
    let w = Tensor::ones(4, DType::F32, &Device::Cpu).unwrap();
    let b = Tensor::zeros(4, DType::F32, &Device::Cpu).unwrap();
    let y = layer_norm(x.as_tensor(), &w, &b, 1e-5).unwrap();
    let g = (y * tensor(&randn(12, 32, 1.0), &[3, 4], DType::F32, &Device::Cpu))
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    assert!(g.get(x.as_tensor()).is_some());
    assert!(g.get(&w).is_none() && g.get(&b).is_none());
}

#[test]
fn bad_input_is_refused_with_a_clear_error() {
    let dev = Device::Cpu;
    let x = Tensor::zeros((2, 4), DType::F32, &dev).unwrap();
    let w = Tensor::ones(4, DType::F32, &dev).unwrap();
    let e = |r: tunefuse::Result<Tensor>| r.unwrap_err().to_string();
    let s = e(layer_norm(
        &x,
        &Tensor::ones(3, DType::F32, &dev).unwrap(),
        &w,
        1e-5,
    ));
    assert!(s.contains("weight has shape [3]; expected [4]"), "{s}");
    let s = e(layer_norm(
        &x,
        &w,
        &Tensor::ones((1, 4), DType::F32, &dev).unwrap(),
        1e-5,
    ));
    assert!(s.contains("bias has shape [1, 4]"), "{s}");
    let s = e(layer_norm(&x, &w, &w, 0.0));
    assert!(s.contains("eps"), "{s}");
    let s = e(layer_norm(&x, &w, &w, f64::NAN));
    assert!(s.contains("eps"), "{s}");
    let s = e(layer_norm(
        &Tensor::zeros((2, 0), DType::F32, &dev).unwrap(),
        &w,
        &w,
        1e-5,
    ));
    assert!(s.contains("non-empty last dimension"), "{s}");
    let s = e(layer_norm(&x.to_dtype(DType::U32).unwrap(), &w, &w, 1e-5));
    assert!(s.contains("U32"), "{s}");
    // No rows: nothing to normalise, an empty result.
    let y = layer_norm(
        &Tensor::zeros((0, 4), DType::F32, &dev).unwrap(),
        &w,
        &w,
        1e-5,
    )
    .unwrap();
    assert_eq!(y.dims(), &[0, 4]);
}
