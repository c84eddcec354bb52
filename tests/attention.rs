//! The attention-probabilities op's CPU reference: against candle's
//! composition (scale, mask add, softmax, dropout) in value and gradient,
//! by finite differences, with the dropout op's exact mask, and its errors.
mod common;

use candle_core::{DType, Device, Tensor, Var};
use common::*;
use tunefuse::ops::attention_probs;
use tunefuse::ops::mixout::{dropout, Rng};

const CPU: Device = Device::Cpu;
/// [B, H, Lq, L] scores and a [B, 1, 1, L] mask bias with padding.
const SHAPE: [usize; 4] = [2, 3, 5, 7];

fn inputs(dtype: DType) -> (Vec<f64>, Tensor, Tensor) {
    let n: usize = SHAPE.iter().product();
    let s = randn(n, 3, 4.0);
    // Example 0 pads its last two keys, example 1 none.
    let mut bias = vec![0.0; 2 * 7];
    bias[5] = -30000.0;
    bias[6] = -30000.0;
    let st = tensor(&s, &SHAPE, dtype, &CPU);
    let bt = tensor(&bias, &[2, 1, 1, 7], dtype, &CPU);
    (s, st, bt)
}

fn composed(s: &Tensor, bias: &Tensor, scale: f64) -> Tensor {
    candle_nn::ops::softmax(&(s * scale).unwrap().broadcast_add(bias).unwrap(), 3).unwrap()
}

#[test]
fn equals_the_composition_in_f64() {
    let (_, s, bias) = inputs(DType::F64);
    let s = Var::from_tensor(&s).unwrap();
    let n = s.elem_count();
    let w = tensor(&randn(n, 4, 1.0), &SHAPE, DType::F64, &CPU);
    let scale = 1.0 / 8f64.sqrt();
    let y = attention_probs(s.as_tensor(), &bias, scale, None).unwrap();
    let yc = composed(s.as_tensor(), &bias, scale);
    assert_close("probabilities", &to_f64(&y), &to_f64(&yc), 1e-16, 1e-14);
    // Masked keys get exactly nothing; every row sums to 1.
    let yv = to_f64(&y);
    for (r, row) in yv.chunks(7).enumerate() {
        assert!((row.iter().sum::<f64>() - 1.0).abs() < 1e-14, "row {r}");
        if r < 15 {
            assert_eq!((row[5], row[6]), (0.0, 0.0), "row {r} attends to padding");
        }
    }
    let g = (&y * &w).unwrap().sum_all().unwrap().backward().unwrap();
    let gc = (&yc * &w).unwrap().sum_all().unwrap().backward().unwrap();
    assert_close(
        "gradient",
        &to_f64(g.get(s.as_tensor()).unwrap()),
        &to_f64(gc.get(s.as_tensor()).unwrap()),
        1e-16,
        1e-13,
    );
}

#[test]
fn finite_differences_with_and_without_dropout() {
    let (sv, s, bias) = inputs(DType::F64);
    let n = sv.len();
    let w = randn(n, 5, 1.0);
    let wt = tensor(&w, &SHAPE, DType::F64, &CPU);
    let scale = 0.7;
    for drop in [None, Some((0.3, Rng { seed: 9, offset: 4 }))] {
        let x = Var::from_tensor(&s).unwrap();
        let y = attention_probs(x.as_tensor(), &bias, scale, drop).unwrap();
        let g = (&y * &wt).unwrap().sum_all().unwrap().backward().unwrap();
        let gx = to_f64(g.get(x.as_tensor()).unwrap());
        let f = |v: &[f64]| -> f64 {
            let t = tensor(v, &SHAPE, DType::F64, &CPU);
            let y = to_f64(&attention_probs(&t, &bias, scale, drop).unwrap());
            y.iter().zip(&w).map(|(a, b)| a * b).sum()
        };
        check_fd(
            &format!("dropout {drop:?}"),
            &sv,
            &[0, 3, 8, 40, 77, 130, 209],
            &gx,
            1e-8,
            1e-6,
            f,
        );
        // Masked keys receive no gradient (their probability is 0).
        assert!(gx.chunks(7).take(15).all(|r| r[5] == 0.0 && r[6] == 0.0));
    }
}

#[test]
fn dropout_is_the_dropout_ops_on_the_same_draws() {
    for dtype in [DType::F32, DType::BF16, DType::F16] {
        let (_, s, bias) = inputs(dtype);
        let rng = Rng {
            seed: 77,
            offset: 12,
        };
        let p = attention_probs(&s, &bias, 0.5, None).unwrap();
        let fused = attention_probs(&s, &bias, 0.5, Some((0.25, rng))).unwrap();
        let want = dropout(&p, 0.25, rng, true).unwrap();
        assert_eq!(fused.dtype(), dtype);
        assert_eq!(
            to_f64(&fused),
            to_f64(&want),
            "{dtype:?}: the fused dropout differs from the dropout op"
        );
        // The probabilities are computed in f32 and rounded once: within
        // f32's error (z = s·scale + bias carries |z|·u with |z| ≤ 16 here,
        // which exp passes on; the row sum of 7 terms and the division a
        // few more units) plus one unit of the dtype of the exact value.
        let c = composed(
            &s.to_dtype(DType::F64).unwrap(),
            &bias.to_dtype(DType::F64).unwrap(),
            0.5,
        );
        let ulp = match dtype {
            DType::F32 => 0.0,
            DType::BF16 => 2f64.powi(-7),
            _ => 2f64.powi(-10),
        };
        let rel = (16.0 + 7.0 + 4.0) * 2f64.powi(-24) + ulp;
        assert_close(&format!("{dtype:?}"), &to_f64(&p), &to_f64(&c), 1e-30, rel);
        // The backward through dropout equals the dropout op's backward
        // (its mask and scale on the gradient) followed by the op's
        // backward without dropout, bit for bit.
        let w = tensor(&randn(s.elem_count(), 6, 1.0), &SHAPE, dtype, &CPU);
        let grad = |fused: bool| -> Vec<f64> {
            let x = Var::from_tensor(&s).unwrap();
            let y = if fused {
                attention_probs(x.as_tensor(), &bias, 0.5, Some((0.25, rng))).unwrap()
            } else {
                let p = attention_probs(x.as_tensor(), &bias, 0.5, None).unwrap();
                dropout(&p, 0.25, rng, true).unwrap()
            };
            let g = (&y * &w)
                .unwrap()
                .to_dtype(DType::F64)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            to_f64(g.get(x.as_tensor()).unwrap())
        };
        let (a, b) = (grad(true), grad(false));
        assert!(a.iter().any(|v| *v != 0.0));
        assert_eq!(a, b, "{dtype:?}: gradient through the fused dropout");
    }
}

#[test]
fn bad_inputs_are_errors() {
    let (_, s, bias) = inputs(DType::F32);
    let msg = |r: tunefuse::Result<Tensor>| r.unwrap_err().to_string();
    let wrong = Tensor::zeros((4, 7), DType::F32, &CPU).unwrap();
    assert!(msg(attention_probs(&s, &wrong, 1.0, None)).contains("bias"));
    let wrong = Tensor::zeros((2, 6), DType::F32, &CPU).unwrap();
    assert!(msg(attention_probs(&s, &wrong, 1.0, None)).contains("bias"));
    let bf = bias.to_dtype(DType::BF16).unwrap();
    assert!(msg(attention_probs(&s, &bf, 1.0, None)).contains("must match"));
    assert!(msg(attention_probs(&s, &bias, f64::NAN, None)).contains("scale"));
    let rng = Rng { seed: 1, offset: 0 };
    assert!(msg(attention_probs(&s, &bias, 1.0, Some((1.0, rng)))).contains("p must be"));
    let ints = Tensor::zeros(SHAPE.to_vec(), DType::U32, &CPU).unwrap();
    assert!(attention_probs(&ints, &bias, 1.0, None).is_err());
}
