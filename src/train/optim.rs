//! Optimisers and learning-rate schedules.
//!
//! [`AdamW`] keeps its state (moments, step) as tensors so a checkpoint can
//! save and restore it exactly; parameter groups carry their own learning
//! rate multiplier (discriminative fine-tuning). With [`RecAdam`] settings
//! it applies Recall-and-Learn's annealed pull towards the pretrained
//! weights through the update, so it composes with decoupled weight decay.
use std::collections::HashMap;

use candle_core::{Tensor, Var};

use crate::error::{param_err, Result};

/// RecAdam (Chen et al., EMNLP 2020), for the parameters that have a
/// pretrained value (new ones such as the head train with plain AdamW): the
/// objective
/// `λ(t)·task + (1 − λ(t))·(γ/2)·‖θ − θ*‖²` with
/// `λ(t) = 1/(1 + exp(−k(t − t₀)))`, applied as in the authors' optimiser:
/// the step is `λ(t)·m̂/(√v̂ + ε) + (1 − λ(t))·γ·(θ − θ*)` with the Adam
/// moments of the task gradient, so it composes with decoupled weight decay.
/// With λ ≡ 1 (t₀ → −∞) it is AdamW.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct RecAdam {
    pub k: f64,
    pub t0: f64,
    pub gamma: f64,
}

impl RecAdam {
    pub fn lambda(&self, t: u64) -> f64 {
        1.0 / (1.0 + (-self.k * (t as f64 - self.t0)).exp())
    }
}

/// AdamW hyper-parameters.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamWParams {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for AdamWParams {
    fn default() -> Self {
        Self {
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.01,
        }
    }
}

/// One trainable parameter.
pub struct Param {
    pub name: String,
    pub var: Var,
    /// Multiplier of the base learning rate (discriminative fine-tuning).
    pub lr_scale: f64,
    /// Whether weight decay applies (not to biases and LayerNorm weights).
    pub decay: bool,
    /// The pretrained value, for RecAdam (`None` for new parameters).
    pub anchor: Option<Tensor>,
}

/// AdamW with parameter groups and optional RecAdam.
pub struct AdamW {
    pub params: Vec<Param>,
    pub hp: AdamWParams,
    pub recadam: Option<RecAdam>,
    /// Completed steps.
    pub step: u64,
    m: Vec<Tensor>,
    v: Vec<Tensor>,
}

impl AdamW {
    pub fn new(params: Vec<Param>, hp: AdamWParams, recadam: Option<RecAdam>) -> Result<Self> {
        let ok = hp.lr >= 0.0
            && hp.lr.is_finite()
            && (0.0..1.0).contains(&hp.beta1)
            && (0.0..1.0).contains(&hp.beta2)
            && hp.eps > 0.0
            && hp.weight_decay >= 0.0;
        if !ok {
            return Err(param_err(
                "adamw",
                format!("hyper-parameters out of range: {hp:?}"),
            ));
        }
        if params.is_empty() {
            return Err(param_err("adamw", "no trainable parameters"));
        }
        let m = params
            .iter()
            .map(|p| p.var.zeros_like())
            .collect::<candle_core::Result<Vec<_>>>()?;
        let v = params
            .iter()
            .map(|p| p.var.zeros_like())
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Self {
            params,
            hp,
            recadam,
            step: 0,
            m,
            v,
        })
    }

    /// One update with base learning rate `lr` from `grads` (parameters
    /// without a gradient are left alone, their moments untouched).
    pub fn step(&mut self, grads: &candle_core::backprop::GradStore, lr: f64) -> Result<()> {
        self.step += 1;
        let t = self.step as i32;
        let (b1, b2) = (self.hp.beta1, self.hp.beta2);
        let (c1, c2) = (1.0 - b1.powi(t), 1.0 - b2.powi(t));
        for (i, p) in self.params.iter().enumerate() {
            let Some(g) = grads.get(p.var.as_tensor()) else {
                continue;
            };
            let theta = p.var.as_tensor();
            let g = g.to_dtype(theta.dtype())?;
            let m = ((&self.m[i] * b1)? + (&g * (1.0 - b1))?)?;
            let v = ((&self.v[i] * b2)? + (g.sqr()? * (1.0 - b2))?)?;
            let lr_i = lr * p.lr_scale;
            let mut update = ((&m / c1)? / ((&v / c2)?.sqrt()? + self.hp.eps)?)?;
            if let (Some(r), Some(anchor)) = (&self.recadam, &p.anchor) {
                // RecAdam's update (Chen et al.'s reference code): the moments
                // see the task gradient; the Adam step is weighted by λ(t) and
                // the pull (1 − λ(t))·γ·(θ − θ*) is added beside it.
                let lam = r.lambda(self.step);
                update = ((update * lam)? + ((theta - anchor)? * ((1.0 - lam) * r.gamma))?)?;
            }
            let mut next = (theta - (update * lr_i)?)?;
            if p.decay && self.hp.weight_decay > 0.0 {
                next = (next - (theta * (lr_i * self.hp.weight_decay))?)?;
            }
            p.var.set(&next)?;
            self.m[i] = m;
            self.v[i] = v;
        }
        Ok(())
    }

    /// The moments by parameter name (`m.<name>`, `v.<name>`), for checkpoints.
    pub fn state(&self) -> HashMap<String, Tensor> {
        let mut s = HashMap::new();
        for (i, p) in self.params.iter().enumerate() {
            s.insert(format!("m.{}", p.name), self.m[i].clone());
            s.insert(format!("v.{}", p.name), self.v[i].clone());
        }
        s
    }

    /// Restores moments saved by [`AdamW::state`] and the step count.
    pub fn load_state(&mut self, state: &HashMap<String, Tensor>, step: u64) -> Result<()> {
        for (i, p) in self.params.iter().enumerate() {
            for (buf, key) in [
                (&mut self.m[i], format!("m.{}", p.name)),
                (&mut self.v[i], format!("v.{}", p.name)),
            ] {
                let t = state
                    .get(&key)
                    .ok_or_else(|| param_err("resume", format!("optimiser state lacks {key}")))?;
                if t.dims() != p.var.dims() {
                    return Err(param_err(
                        "resume",
                        format!(
                            "optimiser state {key} has shape {:?}, parameter {:?}",
                            t.dims(),
                            p.var.dims()
                        ),
                    ));
                }
                *buf = t.to_dtype(p.var.dtype())?.to_device(p.var.device())?;
            }
        }
        self.step = step;
        Ok(())
    }
}

/// Scales every gradient so their global l2 norm is at most `max_norm`
/// (0: no clipping), entirely on the device: no host sync. Returns the norm
/// before clipping as a scalar f64 tensor (the caller reads it back with
/// whatever else it logs). The arithmetic is the host's: one f32 squared sum
/// per parameter, summed in f64 in parameter order, k = max/(norm + 1e-6)
/// applied when norm > max.
pub fn clip_grad_norm(
    grads: &mut candle_core::backprop::GradStore,
    params: &[Param],
    max_norm: f64,
) -> Result<Tensor> {
    let sums = params
        .iter()
        .filter_map(|p| grads.get(p.var.as_tensor()))
        .map(|g| {
            Ok(g.to_dtype(candle_core::DType::F32)?
                .sqr()?
                .sum_all()?
                .reshape(1)?)
        })
        .collect::<Result<Vec<Tensor>>>()?;
    let Some(first) = sums.first() else {
        let dev = params
            .first()
            .map_or(candle_core::Device::Cpu, |p| p.var.device().clone());
        return Ok(Tensor::zeros((), candle_core::DType::F64, &dev)?);
    };
    let dev = first.device().clone();
    let norm = Tensor::cat(&sums, 0)?
        .to_dtype(candle_core::DType::F64)?
        .sum_all()?
        .sqrt()?;
    if max_norm > 0.0 {
        let k = (Tensor::new(max_norm, &dev)? / (&norm + 1e-6)?)?;
        let k = norm
            .gt(max_norm)?
            .where_cond(&k, &Tensor::new(1f64, &dev)?)?;
        for p in params {
            if let Some(g) = grads.remove(p.var.as_tensor()) {
                let scaled = g.broadcast_mul(&k.to_dtype(g.dtype())?)?;
                grads.insert(p.var.as_tensor(), scaled);
            }
        }
    }
    Ok(norm)
}

/// Learning-rate schedules: `lr(step)` for steps 0..total.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Schedule {
    Constant,
    /// Linear warm-up over `warmup` of the steps, then linear decay to 0.
    Linear {
        warmup: f64,
    },
    /// Linear warm-up, then cosine decay to 0.
    Cosine {
        warmup: f64,
    },
    /// ULMFiT's slanted triangular rates (Howard & Ruder 2018): rise for
    /// `cut_frac` of the steps, fall after, from lr/ratio to lr and back.
    SlantedTriangular {
        cut_frac: f64,
        ratio: f64,
    },
}

impl Schedule {
    pub fn validate(&self) -> Result<()> {
        let ok = match *self {
            Schedule::Constant => true,
            Schedule::Linear { warmup } | Schedule::Cosine { warmup } => {
                (0.0..1.0).contains(&warmup)
            }
            Schedule::SlantedTriangular { cut_frac, ratio } => {
                cut_frac > 0.0 && cut_frac < 1.0 && ratio >= 1.0
            }
        };
        if ok {
            Ok(())
        } else {
            Err(param_err("schedule", format!("out of range: {self:?}")))
        }
    }

    /// The learning rate at `step` (0-based) of `total`, for base rate `lr`.
    pub fn lr(&self, lr: f64, step: u64, total: u64) -> f64 {
        let (t, n) = (step as f64, total.max(1) as f64);
        let warm = |w: f64| (w * n).floor();
        match *self {
            Schedule::Constant => lr,
            Schedule::Linear { warmup } => {
                let w = warm(warmup);
                if t < w {
                    lr * (t + 1.0) / w
                } else {
                    lr * ((n - t) / (n - w).max(1.0)).max(0.0)
                }
            }
            Schedule::Cosine { warmup } => {
                let w = warm(warmup);
                if t < w {
                    lr * (t + 1.0) / w
                } else {
                    let progress = (t - w) / (n - w).max(1.0);
                    lr * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos())
                }
            }
            Schedule::SlantedTriangular { cut_frac, ratio } => {
                let cut = (n * cut_frac).floor().max(1.0);
                let p = if t < cut {
                    t / cut
                } else {
                    1.0 - (t - cut) / (cut * (1.0 / cut_frac - 1.0)).max(1.0)
                };
                lr * (1.0 + p.max(0.0) * (ratio - 1.0)) / ratio
            }
        }
    }
}
