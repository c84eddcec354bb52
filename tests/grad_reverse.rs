//! Gradient reversal: the value is the input bit for bit; the gradient
//! reaching the input is −λ times the one reaching the output, while a
//! domain classifier after it gets its own gradient unreversed; λ = 0 cuts
//! the input's gradient; DANN's λ schedule.
use candle_core::{Device, Tensor, Var};
use tunefuse::ops::{dann_lambda, grad_reverse};

fn setup() -> (Var, Var, Tensor) {
    let dev = Device::Cpu;
    let x =
        Var::from_tensor(&Tensor::new(&[[0.3f32, -1.2, 2.5], [1e-8, 7.0, -0.0]], &dev).unwrap())
            .unwrap();
    let w =
        Var::from_tensor(&Tensor::new(&[[0.5f32, -0.25, 1.0], [2.0, 0.1, -0.3]], &dev).unwrap())
            .unwrap();
    let labels = Tensor::new(&[1u32, 0], &dev).unwrap();
    (x, w, labels)
}

/// Cross-entropy of a linear domain classifier on `h`, and the gradients
/// of x and w.
fn grads(h: &Tensor, x: &Var, w: &Var, labels: &Tensor) -> (Vec<Vec<f32>>, Vec<Vec<f32>>) {
    let logits = h.matmul(&w.as_tensor().t().unwrap()).unwrap();
    let loss = tunefuse::train::trainer::cross_entropy(&logits, labels, 0.0).unwrap();
    let g = loss.backward().unwrap();
    let gx = g
        .get(x.as_tensor())
        .map(|t| t.to_vec2().unwrap())
        .unwrap_or_else(|| vec![vec![0.0; 3]; 2]);
    (gx, g.get(w.as_tensor()).unwrap().to_vec2().unwrap())
}

#[test]
fn identity_forward_reversed_backward() {
    let (x, w, labels) = setup();
    let y = grad_reverse(x.as_tensor(), 0.7).unwrap();
    let (a, b): (Vec<Vec<f32>>, Vec<Vec<f32>>) =
        (y.to_vec2().unwrap(), x.as_tensor().to_vec2().unwrap());
    for (p, q) in a.iter().flatten().zip(b.iter().flatten()) {
        assert_eq!(p.to_bits(), q.to_bits(), "{p} vs {q}");
    }
    let (gx_plain, gw_plain) = grads(x.as_tensor(), &x, &w, &labels);
    let (gx_rev, gw_rev) = grads(&y, &x, &w, &labels);
    for (r, p) in gx_rev.iter().flatten().zip(gx_plain.iter().flatten()) {
        assert!((r + 0.7 * p).abs() < 1e-6, "{r} vs -0.7·{p}");
    }
    assert!(gx_plain.iter().flatten().any(|v| v.abs() > 1e-3));
    // The classifier after the reversal learns as it would without it.
    assert_eq!(gw_rev, gw_plain);
    // λ = 0: no gradient reaches the input.
    let y0 = grad_reverse(x.as_tensor(), 0.0).unwrap();
    let (gx0, _) = grads(&y0, &x, &w, &labels);
    assert!(gx0.iter().flatten().all(|v| *v == 0.0), "{gx0:?}");
    assert!(grad_reverse(x.as_tensor(), f64::NAN).is_err());
}

#[test]
fn dann_schedule() {
    assert_eq!(dann_lambda(0.0, 10.0), 0.0);
    assert!((dann_lambda(1.0, 10.0) - (2.0 / (1.0 + (-10f64).exp()) - 1.0)).abs() < 1e-15);
    assert!(dann_lambda(0.5, 10.0) > 0.98 && dann_lambda(0.1, 10.0) < 0.5);
    let mut prev = -1.0;
    for i in 0..=20 {
        let l = dann_lambda(i as f64 / 20.0, 10.0);
        assert!(l > prev && (0.0..1.0).contains(&l));
        prev = l;
    }
}
