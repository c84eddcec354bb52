//! CPU reference of the symmetric KL: golden values from PyTorch, finite
//! differences, properties and input checks.
mod common;

use candle_core::{DType, Device, Tensor, Var};
use common::*;
use tunefuse::ops::sym_kl::{kl, sym_kl, Reduction, SymKlGrad, SymKlOptions};

const CPU: Device = Device::Cpu;

fn opts(grad: SymKlGrad, reduction: Reduction) -> SymKlOptions {
    SymKlOptions {
        grad,
        reduction,
        ..Default::default()
    }
}

fn golden_inputs() -> (Tensor, Tensor, serde_json::Value) {
    let g = golden("sym_kl.json");
    let a: Vec<f64> = json_matrix(&g["a"]).concat();
    let b: Vec<f64> = json_matrix(&g["b"]).concat();
    (
        tensor(&a, &[4, 11], DType::F64, &CPU),
        tensor(&b, &[4, 11], DType::F64, &CPU),
        g,
    )
}

/// Loss and the gradients candle's autograd returns for it.
fn loss_and_grads(a: &Tensor, b: &Tensor, o: &SymKlOptions) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    let (va, vb) = (Var::from_tensor(a).unwrap(), Var::from_tensor(b).unwrap());
    let loss = sym_kl(va.as_tensor(), vb.as_tensor(), o).unwrap();
    let grads = loss.sum_all().unwrap().backward().unwrap();
    (
        to_f64(&loss),
        to_f64(grads.get(va.as_tensor()).unwrap()),
        to_f64(grads.get(vb.as_tensor()).unwrap()),
    )
}

#[test]
fn golden_full_and_detached() {
    let (a, b, g) = golden_inputs();
    let per_row = sym_kl(&a, &b, &opts(SymKlGrad::Full, Reduction::None)).unwrap();
    assert_close(
        "per-row loss",
        &to_f64(&per_row),
        &json_vec(&g["per_row"]),
        1e-9,
        1e-9,
    );

    let (loss, ga, gb) = loss_and_grads(&a, &b, &opts(SymKlGrad::Full, Reduction::BatchMean));
    assert_close(
        "batchmean loss",
        &loss,
        &[g["loss_batchmean"].as_f64().unwrap()],
        1e-9,
        1e-9,
    );
    assert_close(
        "full grad_a",
        &ga,
        &json_matrix(&g["full"]["grad_a"]).concat(),
        1e-9,
        1e-9,
    );
    assert_close(
        "full grad_b",
        &gb,
        &json_matrix(&g["full"]["grad_b"]).concat(),
        1e-9,
        1e-9,
    );

    let (loss, ga, gb) = loss_and_grads(&a, &b, &opts(SymKlGrad::Detached, Reduction::BatchMean));
    assert_close(
        "detached loss",
        &loss,
        &[g["detached"]["loss"].as_f64().unwrap()],
        1e-9,
        1e-9,
    );
    assert_close(
        "detached grad_a",
        &ga,
        &json_matrix(&g["detached"]["grad_a"]).concat(),
        1e-9,
        1e-9,
    );
    assert_close(
        "detached grad_b",
        &gb,
        &json_matrix(&g["detached"]["grad_b"]).concat(),
        1e-9,
        1e-9,
    );
}

/// Central differences of a scalar function of one f64 tensor at a few
/// entries, against the analytic gradient `grad`.
fn check_fd_at(what: &str, x: &[f64], shape: &[usize], grad: &[f64], f: impl Fn(&Tensor) -> f64) {
    let n = x.len();
    check_fd(
        what,
        x,
        &[0, 1, n / 3, n / 2, n - 2, n - 1],
        grad,
        1e-7,
        1e-6,
        |v| f(&tensor(v, shape, DType::F64, &CPU)),
    );
}

/// Incoming weights per row, so `Reduction::None` is checked with an
/// incoming gradient that differs across rows.
fn weighted(loss: &Tensor, w: &Tensor) -> Tensor {
    if loss.rank() == 0 {
        loss.clone()
    } else {
        (loss * w).unwrap().sum_all().unwrap()
    }
}

#[test]
fn finite_differences_every_mode_and_reduction() {
    let shape = [2, 3, 9];
    let n = 54;
    let (xa, xb) = (randn(n, 1, 2.0), randn(n, 2, 2.0));
    let (a, b) = (
        tensor(&xa, &shape, DType::F64, &CPU),
        tensor(&xb, &shape, DType::F64, &CPU),
    );
    let w = tensor(&randn(6, 3, 1.0), &[2, 3], DType::F64, &CPU);
    let mask = Tensor::new(&[[1u8, 0, 1], [1, 1, 0]], &CPU).unwrap();
    for reduction in [Reduction::BatchMean, Reduction::Sum, Reduction::None] {
        for row_mask in [None, Some(mask.clone())] {
            let o = SymKlOptions {
                grad: SymKlGrad::Full,
                reduction,
                row_mask: row_mask.clone(),
                expected_grad: 1.0,
            };
            let tag = format!("{reduction:?} mask={}", row_mask.is_some());
            let (va, vb) = (Var::from_tensor(&a).unwrap(), Var::from_tensor(&b).unwrap());
            let loss = weighted(&sym_kl(va.as_tensor(), vb.as_tensor(), &o).unwrap(), &w);
            let g = loss.backward().unwrap();
            let (ga, gb) = (
                to_f64(g.get(va.as_tensor()).unwrap()),
                to_f64(g.get(vb.as_tensor()).unwrap()),
            );
            let f = |x: &Tensor, y: &Tensor| to_f64(&weighted(&sym_kl(x, y, &o).unwrap(), &w))[0];
            check_fd_at(&format!("full ∂a {tag}"), &xa, &shape, &ga, |x| f(x, &b));
            check_fd_at(&format!("full ∂b {tag}"), &xb, &shape, &gb, |y| f(&a, y));

            // Detached: ∂a is the gradient of KL(q‖p) with q fixed, i.e. of
            // kl(a, b) in a; ∂b that of kl(b, a) in b.
            let o = SymKlOptions {
                grad: SymKlGrad::Detached,
                ..o.clone()
            };
            let (va, vb) = (Var::from_tensor(&a).unwrap(), Var::from_tensor(&b).unwrap());
            let loss = weighted(&sym_kl(va.as_tensor(), vb.as_tensor(), &o).unwrap(), &w);
            let g = loss.backward().unwrap();
            let (ga, gb) = (
                to_f64(g.get(va.as_tensor()).unwrap()),
                to_f64(g.get(vb.as_tensor()).unwrap()),
            );
            let k = |x: &Tensor, y: &Tensor| {
                to_f64(&weighted(
                    &kl(x, y, reduction, row_mask.as_ref()).unwrap(),
                    &w,
                ))[0]
            };
            check_fd_at(&format!("detached ∂a {tag}"), &xa, &shape, &ga, |x| {
                k(x, &b)
            });
            check_fd_at(&format!("detached ∂b {tag}"), &xb, &shape, &gb, |y| {
                k(y, &a)
            });

            // kl: gradient to the input only.
            let (vi, vt) = (Var::from_tensor(&a).unwrap(), Var::from_tensor(&b).unwrap());
            let loss = weighted(
                &kl(vi.as_tensor(), vt.as_tensor(), reduction, row_mask.as_ref()).unwrap(),
                &w,
            );
            let g = loss.backward().unwrap();
            assert!(
                g.get(vt.as_tensor()).is_none(),
                "kl must not send a gradient to its target"
            );
            check_fd_at(
                &format!("kl ∂input {tag}"),
                &xa,
                &shape,
                &to_f64(g.get(vi.as_tensor()).unwrap()),
                |x| k(x, &b),
            );
        }
    }
}

#[test]
fn kl_matches_definition() {
    // KL(softmax(t) ‖ softmax(i)) written out for one row.
    let (i, t) = ([0.3, -1.0, 2.0], [1.0, 0.5, -0.5]);
    let sm = |x: &[f64]| {
        let z: f64 = x.iter().map(|v| v.exp()).sum();
        x.iter().map(|v| v.exp() / z).collect::<Vec<_>>()
    };
    let (p, q) = (sm(&i), sm(&t));
    let want: f64 = q.iter().zip(&p).map(|(q, p)| q * (q / p).ln()).sum();
    let got = kl(
        &tensor(&i, &[1, 3], DType::F64, &CPU),
        &tensor(&t, &[1, 3], DType::F64, &CPU),
        Reduction::Sum,
        None,
    )
    .unwrap();
    assert_close("kl", &to_f64(&got), &[want], 1e-12, 1e-12);
}

#[test]
fn properties() {
    let shape = [5, 17];
    let (xa, xb) = (randn(85, 7, 3.0), randn(85, 8, 3.0));
    let none = opts(SymKlGrad::Full, Reduction::None);
    for dtype in [DType::F64, DType::F32, DType::BF16, DType::F16] {
        let (a, b) = (
            tensor(&xa, &shape, dtype, &CPU),
            tensor(&xb, &shape, dtype, &CPU),
        );
        let rows = to_f64(&sym_kl(&a, &b, &none).unwrap());
        assert!(
            rows.iter().all(|&v| v >= 0.0),
            "{dtype:?}: sym KL negative: {rows:?}"
        );
        let same = to_f64(&sym_kl(&a, &a, &none).unwrap());
        assert!(
            same.iter().all(|&v| v == 0.0),
            "{dtype:?}: sym KL of a with itself is {same:?}, not exactly 0"
        );
    }
    // Invariant to a constant added to a row (f64, where the shift is exact enough).
    let (a, b) = (
        tensor(&xa, &shape, DType::F64, &CPU),
        tensor(&xb, &shape, DType::F64, &CPU),
    );
    let base = to_f64(&sym_kl(&a, &b, &none).unwrap());
    let shifted = to_f64(&sym_kl(&(&a + 100.0).unwrap(), &(&b - 37.5).unwrap(), &none).unwrap());
    assert_close("shift invariance", &shifted, &base, 1e-10, 1e-10);
}

#[test]
fn stable_at_large_logits() {
    // ±1e4 logits: softmaxes are one-hot-like; the loss must stay finite.
    let xa: Vec<f64> = (0..40)
        .map(|i| {
            if i % 7 == 0 {
                1e4
            } else if i % 3 == 0 {
                -1e4
            } else {
                (i as f64) * 0.1
            }
        })
        .collect();
    let xb: Vec<f64> = (0..40)
        .map(|i| if i % 5 == 0 { 1e4 } else { -(i as f64) * 0.2 })
        .collect();
    for dtype in [DType::F64, DType::F32] {
        let (a, b) = (
            tensor(&xa, &[4, 10], dtype, &CPU),
            tensor(&xb, &[4, 10], dtype, &CPU),
        );
        let (loss, ga, gb) = loss_and_grads(&a, &b, &opts(SymKlGrad::Full, Reduction::None));
        assert!(
            loss.iter().chain(&ga).chain(&gb).all(|v| v.is_finite()),
            "{dtype:?}: non-finite values at ±1e4 logits"
        );
    }
}

#[test]
fn entries_minus_inf_in_both_are_ignored() {
    let xa = [0.5, f64::NEG_INFINITY, -1.0, 2.0, f64::NEG_INFINITY];
    let xb = [1.5, f64::NEG_INFINITY, 0.0, -2.0, f64::NEG_INFINITY];
    let keep = [0.5, -1.0, 2.0];
    let keepb = [1.5, 0.0, -2.0];
    let o = opts(SymKlGrad::Full, Reduction::Sum);
    let (loss, ga, _) = loss_and_grads(
        &tensor(&xa, &[1, 5], DType::F64, &CPU),
        &tensor(&xb, &[1, 5], DType::F64, &CPU),
        &o,
    );
    let (want, wa, _) = loss_and_grads(
        &tensor(&keep, &[1, 3], DType::F64, &CPU),
        &tensor(&keepb, &[1, 3], DType::F64, &CPU),
        &o,
    );
    assert_close("masked loss", &loss, &want, 1e-12, 1e-12);
    assert_close("masked grad", &[ga[0], ga[2], ga[3]], &wa, 1e-12, 1e-12);
    assert_eq!(
        (ga[1], ga[4]),
        (0.0, 0.0),
        "masked entries must get zero gradient"
    );
    // Only one side -inf: the KL is genuinely infinite.
    let xb2 = [1.5, 0.0, 0.0, -2.0, f64::NEG_INFINITY];
    let inf = sym_kl(
        &tensor(&xa, &[1, 5], DType::F64, &CPU),
        &tensor(&xb2, &[1, 5], DType::F64, &CPU),
        &o,
    )
    .unwrap();
    assert_eq!(to_f64(&inf)[0], f64::INFINITY);
}

#[test]
fn nan_propagates() {
    let xa = [0.5, f64::NAN, -1.0, 0.0, 1.0, 2.0];
    let xb = [0.0; 6];
    let rows = sym_kl(
        &tensor(&xa, &[2, 3], DType::F32, &CPU),
        &tensor(&xb, &[2, 3], DType::F32, &CPU),
        &opts(SymKlGrad::Full, Reduction::None),
    )
    .unwrap();
    let rows = to_f64(&rows);
    assert!(
        rows[0].is_nan() && rows[1].is_finite(),
        "NaN must reach its row's loss only: {rows:?}"
    );
}

#[test]
fn row_mask_and_batchmean() {
    let (xa, xb) = (randn(12, 11, 1.0), randn(12, 12, 1.0));
    let (a, b) = (
        tensor(&xa, &[3, 4], DType::F64, &CPU),
        tensor(&xb, &[3, 4], DType::F64, &CPU),
    );
    let rows = to_f64(&sym_kl(&a, &b, &opts(SymKlGrad::Full, Reduction::None)).unwrap());
    let mask = Tensor::new(&[1f32, 0.0, 1.0], &CPU).unwrap();
    let o = |r| SymKlOptions {
        reduction: r,
        row_mask: Some(mask.clone()),
        ..Default::default()
    };
    let mean = to_f64(&sym_kl(&a, &b, &o(Reduction::BatchMean)).unwrap())[0];
    let sum = to_f64(&sym_kl(&a, &b, &o(Reduction::Sum)).unwrap())[0];
    let none = to_f64(&sym_kl(&a, &b, &o(Reduction::None)).unwrap());
    assert_close("masked sum", &[sum], &[rows[0] + rows[2]], 1e-12, 1e-12);
    assert_close(
        "masked batchmean",
        &[mean],
        &[(rows[0] + rows[2]) / 2.0],
        1e-12,
        1e-12,
    );
    assert_eq!(none[1], 0.0);
    // All rows masked: batchmean is 0, not NaN.
    let zero = Tensor::zeros(3, DType::U8, &CPU).unwrap();
    let o = SymKlOptions {
        row_mask: Some(zero),
        ..Default::default()
    };
    assert_eq!(to_f64(&sym_kl(&a, &b, &o).unwrap())[0], 0.0);
}

#[test]
fn bad_inputs_are_errors() {
    let a = Tensor::zeros((2, 3), DType::F32, &CPU).unwrap();
    let msg = |r: tunefuse::Result<Tensor>| r.unwrap_err().to_string();
    let e = msg(sym_kl(
        &a,
        &Tensor::zeros((2, 4), DType::F32, &CPU).unwrap(),
        &SymKlOptions::default(),
    ));
    assert!(e.contains("[2, 3]") && e.contains("[2, 4]"), "{e}");
    let e = msg(sym_kl(
        &a,
        &Tensor::zeros((2, 3), DType::F16, &CPU).unwrap(),
        &SymKlOptions::default(),
    ));
    assert!(e.contains("F32") && e.contains("F16"), "{e}");
    let z = Tensor::zeros((2, 0), DType::F32, &CPU).unwrap();
    let e = msg(sym_kl(&z, &z, &SymKlOptions::default()));
    assert!(e.contains("V = 0"), "{e}");
    let i = Tensor::zeros((2, 3), DType::U32, &CPU).unwrap();
    let e = msg(sym_kl(&i, &i, &SymKlOptions::default()));
    assert!(e.contains("U32"), "{e}");
    let s = Tensor::new(1f32, &CPU).unwrap();
    assert!(msg(sym_kl(&s, &s, &SymKlOptions::default())).contains("scalar"));
    let o = SymKlOptions {
        row_mask: Some(Tensor::ones(3, DType::F32, &CPU).unwrap()),
        ..Default::default()
    };
    let e = msg(sym_kl(&a, &a, &o));
    assert!(e.contains("row mask") && e.contains("2 rows"), "{e}");
    let o = SymKlOptions {
        expected_grad: f32::NAN,
        ..Default::default()
    };
    assert!(msg(sym_kl(&a, &a, &o)).contains("expected_grad"));
}

#[test]
fn empty_batch_gives_zero_loss() {
    let z = Tensor::zeros((0, 5), DType::F32, &CPU).unwrap();
    let loss = sym_kl(&z, &z, &SymKlOptions::default()).unwrap();
    assert_eq!(to_f64(&loss), vec![0.0]);
    let rows = sym_kl(&z, &z, &opts(SymKlGrad::Full, Reduction::None)).unwrap();
    assert_eq!(rows.dims(), &[0]);
}

#[test]
fn composed_baseline_matches_reference() {
    // The candle-composed version the benches compare against computes the
    // same loss and gradients.
    let (xa, xb) = (randn(3 * 50, 21, 2.0), randn(3 * 50, 22, 2.0));
    let (a, b) = (
        tensor(&xa, &[3, 50], DType::F64, &CPU),
        tensor(&xb, &[3, 50], DType::F64, &CPU),
    );
    let (loss, ga, gb) = loss_and_grads(&a, &b, &SymKlOptions::default());
    let (va, vb) = (Var::from_tensor(&a).unwrap(), Var::from_tensor(&b).unwrap());
    let c = tunefuse::bench::sym_kl_composed(va.as_tensor(), vb.as_tensor()).unwrap();
    let g = c.backward().unwrap();
    assert_close("composed loss", &to_f64(&c), &loss, 1e-12, 1e-10);
    assert_close(
        "composed ∂a",
        &to_f64(g.get(va.as_tensor()).unwrap()),
        &ga,
        1e-12,
        1e-10,
    );
    assert_close(
        "composed ∂b",
        &to_f64(g.get(vb.as_tensor()).unwrap()),
        &gb,
        1e-12,
        1e-10,
    );
}
