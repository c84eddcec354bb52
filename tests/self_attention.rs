//! The one-op self-attention's CPU reference: against the composition it
//! replaces (head split, Q·Kᵀ, the attention-probabilities op, P·V, merge)
//! in value and in the gradients of q, k and v, with and without dropout
//! (the same draws), by finite differences, and its errors.
mod common;

use candle_core::{DType, Device, Tensor, Var};
use common::*;
use tunefuse::ops::mixout::Rng;
use tunefuse::ops::self_attention::self_attention_packed;
use tunefuse::ops::{attention_probs, self_attention};

const CPU: Device = Device::Cpu;
/// Batch 2, 5 tokens, 3 heads of 4.
const B: usize = 2;
const L: usize = 5;
const HEADS: usize = 3;
const DH: usize = 4;
const H: usize = HEADS * DH;

/// q, k, v values and the [B, L] key mask: example 0 pads its last two
/// tokens.
fn inputs() -> ([Vec<f64>; 3], Vec<f64>) {
    let n = B * L * H;
    let mut bias = vec![0.0; B * L];
    bias[3] = -30000.0;
    bias[4] = -30000.0;
    (
        [randn(n, 11, 1.5), randn(n, 12, 1.5), randn(n, 13, 1.0)],
        bias,
    )
}

fn composed(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    bias: &Tensor,
    scale: f64,
    drop: Option<(f64, Rng)>,
) -> Tensor {
    let split = |t: &Tensor| {
        t.reshape((B, L, HEADS, DH))
            .unwrap()
            .transpose(1, 2)
            .unwrap()
            .contiguous()
            .unwrap()
    };
    let (q, k, v) = (split(q), split(k), split(v));
    let scores = q.matmul(&k.t().unwrap().contiguous().unwrap()).unwrap();
    let bias = bias.reshape((B, 1, 1, L)).unwrap();
    let p = attention_probs(&scores, &bias, scale, drop).unwrap();
    p.matmul(&v)
        .unwrap()
        .transpose(1, 2)
        .unwrap()
        .contiguous()
        .unwrap()
        .reshape((B, L, H))
        .unwrap()
}

/// Value and the gradients of q, k, v of `f` against weights `w`.
fn value_and_grads(
    f: impl Fn(&Tensor, &Tensor, &Tensor) -> Tensor,
    x: &[Vec<f64>; 3],
    w: &Tensor,
) -> (Vec<f64>, [Vec<f64>; 3]) {
    let vars: Vec<Var> = x
        .iter()
        .map(|v| Var::from_tensor(&tensor(v, &[B, L, H], DType::F64, &CPU)).unwrap())
        .collect();
    let y = f(
        vars[0].as_tensor(),
        vars[1].as_tensor(),
        vars[2].as_tensor(),
    );
    let g = (&y * w).unwrap().sum_all().unwrap().backward().unwrap();
    let grad = |i: usize| to_f64(g.get(vars[i].as_tensor()).expect("a gradient"));
    (to_f64(&y), [grad(0), grad(1), grad(2)])
}

#[test]
fn equals_the_composition_in_f64_with_and_without_dropout() {
    let (x, bias) = inputs();
    let bt = tensor(&bias, &[B, L], DType::F64, &CPU);
    let w = tensor(&randn(B * L * H, 14, 1.0), &[B, L, H], DType::F64, &CPU);
    let scale = 1.0 / (DH as f64).sqrt();
    for drop in [None, Some((0.3, Rng { seed: 7, offset: 5 }))] {
        let fused = |q: &Tensor, k: &Tensor, v: &Tensor| {
            self_attention(q, k, v, &bt, HEADS, scale, drop).unwrap()
        };
        let comp = |q: &Tensor, k: &Tensor, v: &Tensor| composed(q, k, v, &bt, scale, drop);
        let (y1, g1) = value_and_grads(fused, &x, &w);
        let (y0, g0) = value_and_grads(comp, &x, &w);
        assert_close(&format!("{drop:?} value"), &y1, &y0, 1e-14, 1e-12);
        for (name, (a, c)) in ["q", "k", "v"].iter().zip(g1.iter().zip(&g0)) {
            assert_close(&format!("{drop:?} d{name}"), a, c, 1e-14, 1e-11);
            assert!(a.iter().any(|v| *v != 0.0), "d{name} is all zero");
        }
        // Padded keys get no attention, so their keys and values no
        // gradient from example 0.
        for j in 3..5 {
            for gk in [&g1[1], &g1[2]] {
                assert!(gk[j * H..(j + 1) * H].iter().all(|v| *v == 0.0), "key {j}");
            }
        }
    }
}

/// q, k, v `[B, L, H]` side by side in `[B, L, 3H]` rows.
fn pack(x: &[Vec<f64>; 3]) -> Vec<f64> {
    (0..B * L)
        .flat_map(|r| {
            x.iter()
                .flat_map(move |v| v[r * H..(r + 1) * H].iter().copied())
        })
        .collect()
}

#[test]
fn packed_equals_the_op_on_the_parts_bit_for_bit() {
    // The packed form's value is the op's on the three parts, and its
    // gradient is dq, dk, dv packed the same way: exactly, in every dtype
    // and with dropout (one computation, two layouts).
    let (x, bias) = inputs();
    let wv = randn(B * L * H, 16, 1.0);
    for dt in [DType::F64, DType::F32, DType::BF16] {
        let bt = tensor(&bias, &[B, L], dt, &CPU);
        let w = tensor(&wv, &[B, L, H], dt, &CPU);
        for drop in [None, Some((0.3, Rng { seed: 9, offset: 2 }))] {
            let parts: Vec<Var> = x
                .iter()
                .map(|v| Var::from_tensor(&tensor(v, &[B, L, H], dt, &CPU)).unwrap())
                .collect();
            let [q, k, v] = [0, 1, 2].map(|i| parts[i].as_tensor());
            let y0 = self_attention(q, k, v, &bt, HEADS, 0.5, drop).unwrap();
            let g0 = (&y0 * &w).unwrap().sum_all().unwrap().backward().unwrap();
            let g0: [Vec<f64>; 3] = [q, k, v].map(|t| to_f64(g0.get(t).unwrap()));

            let qkv = Var::from_tensor(&tensor(&pack(&x), &[B, L, 3 * H], dt, &CPU)).unwrap();
            let y1 = self_attention_packed(qkv.as_tensor(), &bt, HEADS, 0.5, drop).unwrap();
            assert_eq!(y1.dims(), [B, L, H]);
            let g1 = (&y1 * &w).unwrap().sum_all().unwrap().backward().unwrap();
            let g1 = to_f64(g1.get(qkv.as_tensor()).unwrap());
            assert_eq!(to_f64(&y1), to_f64(&y0), "{dt:?} {drop:?} value");
            assert_eq!(g1, pack(&g0), "{dt:?} {drop:?} gradient");
            assert!(g1.iter().any(|v| *v != 0.0));
        }
    }
}

#[test]
fn finite_differences_with_dropout() {
    let (x, bias) = inputs();
    let bt = tensor(&bias, &[B, L], DType::F64, &CPU);
    let wv = randn(B * L * H, 15, 1.0);
    let w = tensor(&wv, &[B, L, H], DType::F64, &CPU);
    let drop = Some((0.25, Rng { seed: 3, offset: 0 }));
    let f = |q: &Tensor, k: &Tensor, v: &Tensor| {
        self_attention(q, k, v, &bt, HEADS, 0.6, drop).unwrap()
    };
    let (_, grads) = value_and_grads(f, &x, &w);
    for (which, g) in grads.iter().enumerate() {
        let loss = |vals: &[f64]| -> f64 {
            let mut xs = x.clone();
            xs[which] = vals.to_vec();
            let t = |i: usize| tensor(&xs[i], &[B, L, H], DType::F64, &CPU);
            let y = to_f64(&f(&t(0), &t(1), &t(2)));
            y.iter().zip(&wv).map(|(a, b)| a * b).sum()
        };
        check_fd(
            &format!("input {which}"),
            &x[which],
            &[0, 5, 17, 40, 61, 99, 119],
            g,
            1e-8,
            1e-6,
            loss,
        );
    }
}

#[test]
fn low_precision_stays_within_rounding_of_f64() {
    // In f32 the op is f32 arithmetic rounded once; in bf16 the
    // probabilities and the output are rounded to bf16: within a few units
    // of the dtype of the f64 result, relative to the output's magnitude.
    let (x, bias) = inputs();
    let scale = 0.5;
    let run = |dt: DType| {
        let t = |v: &Vec<f64>| tensor(v, &[B, L, H], dt, &CPU);
        let bt = tensor(&bias, &[B, L], dt, &CPU);
        to_f64(&self_attention(&t(&x[0]), &t(&x[1]), &t(&x[2]), &bt, HEADS, scale, None).unwrap())
    };
    let exact = run(DType::F64);
    let vmax = x[2].iter().fold(0f64, |m, v| m.max(v.abs()));
    for (dt, unit) in [(DType::F32, 2f64.powi(-23)), (DType::BF16, 2f64.powi(-7))] {
        // Inputs rounded to the dtype move the result by about a unit
        // times the magnitudes; L + dh terms of accumulation a few more.
        let tol = 4.0 * (L + DH) as f64 * unit * vmax;
        let got = run(dt);
        assert_close(&format!("{dt:?}"), &got, &exact, tol, 0.0);
    }
}

#[test]
fn short_sequences_fit_the_kernels_and_long_ones_do_not() {
    use tunefuse::ops::self_attention::fits;
    assert!(fits(128, 32) && fits(256, 32) && fits(128, 64));
    assert!(!fits(512, 64) && !fits(4096, 32));
    // The documented limits: 305 tokens at head width 32, 168 at 64.
    assert!(fits(305, 32) && !fits(306, 32) && fits(168, 64) && !fits(169, 64));
}

#[test]
fn bad_inputs_are_errors() {
    let (x, bias) = inputs();
    let t = |v: &Vec<f64>| tensor(v, &[B, L, H], DType::F32, &CPU);
    let (q, k, v) = (t(&x[0]), t(&x[1]), t(&x[2]));
    let bt = tensor(&bias, &[B, L], DType::F32, &CPU);
    let msg = |r: tunefuse::Result<Tensor>| r.unwrap_err().to_string();
    assert!(msg(self_attention(&q, &k, &v, &bt, 5, 1.0, None)).contains("multiple of 5 heads"));
    assert!(msg(self_attention(&q, &k, &v, &bt, 0, 1.0, None)).contains("heads"));
    let short = Tensor::zeros((B, L - 1), DType::F32, &CPU).unwrap();
    assert!(msg(self_attention(&q, &k, &v, &short, HEADS, 1.0, None)).contains("key mask"));
    let kb = k.to_dtype(DType::BF16).unwrap();
    assert!(msg(self_attention(&q, &kb, &v, &bt, HEADS, 1.0, None)).contains("k is"));
    let bb = bt.to_dtype(DType::BF16).unwrap();
    assert!(msg(self_attention(&q, &k, &v, &bb, HEADS, 1.0, None)).contains("must match"));
    assert!(msg(self_attention(&q, &k, &v, &bt, HEADS, f64::INFINITY, None)).contains("scale"));
    let rng = Rng { seed: 1, offset: 0 };
    assert!(msg(self_attention(
        &q,
        &k,
        &v,
        &bt,
        HEADS,
        1.0,
        Some((1.0, rng))
    ))
    .contains("p must"));
    let flat = q.reshape((B * L, H)).unwrap();
    assert!(msg(self_attention(&flat, &flat, &flat, &bt, HEADS, 1.0, None)).contains("[B, L, H]"));
    // The packed form: rows of 3H, and the same checks.
    let qkv = Tensor::cat(&[&q, &k, &v], 2).unwrap();
    let odd = qkv.narrow(2, 0, 3 * H - 1).unwrap();
    assert!(msg(self_attention_packed(&odd, &bt, HEADS, 1.0, None)).contains("3H"));
    assert!(msg(self_attention_packed(&flat, &bt, HEADS, 1.0, None)).contains("[B, L, 3H]"));
    assert!(msg(self_attention_packed(&qkv, &short, HEADS, 1.0, None)).contains("key mask"));
    assert!(msg(self_attention_packed(&qkv, &bt, 5, 1.0, None)).contains("multiple of 5 heads"));
}
