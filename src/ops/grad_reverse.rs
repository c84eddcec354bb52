//! Gradient reversal (Ganin & Lempitsky, ICML 2015): the identity forward,
//! −λ·g backward, between an encoder and a domain classifier so that the
//! classifier learns to tell the domains apart while the encoder learns to
//! make them indistinguishable (AFTER, DANN, BERT-DAAT).
//!
//! Built from candle's autograd rather than a custom kernel:
//! `sg(x) − λ·(x − sg(x))`, with `sg` the stop-gradient (detach). Its
//! value is x bit for bit for finite x, −0 included (x − sg(x) is +0, λ·(+0)
//! is +0 as candle scales, and a − (+0) is a for every a), and its gradient
//! with respect to x is −λ; on a pooled `[B, H]` vector the three
//! elementwise ops cost nothing worth a kernel.
use candle_core::Tensor;

use crate::error::{param_err, Result};

/// `x` forward; `−lambda · g` to `x` backward. `lambda` must be finite
/// (0 cuts the gradient: the layers below learn nothing from what follows).
pub fn grad_reverse(x: &Tensor, lambda: f64) -> Result<Tensor> {
    if !lambda.is_finite() {
        return Err(param_err(
            "grad_reverse",
            format!("lambda must be finite, got {lambda}"),
        ));
    }
    let stop = x.detach();
    Ok((&stop - ((x - &stop)? * lambda)?)?)
}

/// DANN's schedule of λ over training progress `p` in [0, 1]:
/// `2 / (1 + e^(−γ·p)) − 1` (γ = 10 in Ganin & Lempitsky; AFTER anneals
/// with its own γ), rising from 0 to nearly 1.
pub fn dann_lambda(p: f64, gamma: f64) -> f64 {
    2.0 / (1.0 + (-gamma * p.clamp(0.0, 1.0)).exp()) - 1.0
}
