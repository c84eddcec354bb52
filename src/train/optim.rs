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
use crate::ops::{adamw_state, adamw_step, AdamWStep};

/// RecAdam (Chen et al., EMNLP 2020), for the parameters that have a
/// pretrained value (new ones such as the head train with plain AdamW): the
/// objective
/// `λ(t)·task + (1 − λ(t))·(γ/2)·‖θ − θ*‖²` with
/// `λ(t) = 1/(1 + exp(−k(t − t₀)))`, applied as in the authors' optimiser:
/// the step is `λ(t)·m̂/(√v̂ + ε) + (1 − λ(t))·γ·(θ − θ*)` with the Adam
/// moments of the task gradient, so it composes with decoupled weight decay.
/// With λ ≡ 1 (t₀ → −∞) it is AdamW.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RecAdam {
    /// The sigmoid's steepness k.
    pub k: f64,
    /// The step t₀ where λ = ½.
    pub t0: f64,
    /// The pull's strength γ towards the pretrained weights.
    pub gamma: f64,
}

impl RecAdam {
    /// λ(t) = 1 / (1 + e^(−k·(t − t₀))).
    pub fn lambda(&self, t: u64) -> f64 {
        1.0 / (1.0 + (-self.k * (t as f64 - self.t0)).exp())
    }
}

/// AdamW hyper-parameters.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamWParams {
    /// Learning rate.
    pub lr: f64,
    /// β₁ of the first moment.
    pub beta1: f64,
    /// β₂ of the second moment.
    pub beta2: f64,
    /// ε added to √v̂.
    pub eps: f64,
    /// Decoupled weight decay.
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
    /// The parameter's name in the varmap.
    pub name: String,
    /// The variable the step updates in place.
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
    /// The trainable parameters, sorted by name.
    pub params: Vec<Param>,
    /// Hyper-parameters.
    pub hp: AdamWParams,
    /// RecAdam's annealing, when on.
    pub recadam: Option<RecAdam>,
    /// Completed steps.
    pub step: u64,
    /// `[m; v]` of each parameter (see [`adamw_state`]), updated in place.
    state: Vec<Tensor>,
    /// The multi-tensor step's device table, kept across steps.
    #[cfg(feature = "cuda")]
    tables: crate::ops::adamw::multi::TableCache,
    /// The parameters (by index) the last multi-tensor step updated: the
    /// step a captured CUDA graph repeats ([`AdamW::stage_scalars`]).
    #[cfg(feature = "cuda")]
    multi_plan: Option<Vec<usize>>,
}

impl AdamW {
    /// An optimiser over `params`; hyper-parameters out of range are an
    /// error naming them.
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
        let state = params
            .iter()
            .map(|p| adamw_state(p.var.as_tensor()))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            params,
            hp,
            recadam,
            step: 0,
            state,
            #[cfg(feature = "cuda")]
            tables: Default::default(),
            #[cfg(feature = "cuda")]
            multi_plan: None,
        })
    }

    /// One update with base learning rate `lr` from `grads`, each gradient
    /// multiplied by `scale` (one element on the device, e.g. from
    /// [`clip_scale`]) when given. Parameters without a gradient are left
    /// alone, their moments untouched. Each tensor is updated in place by the
    /// fused [`adamw_step`] (two kernels instead of ~16 composed ops).
    pub fn step(
        &mut self,
        grads: &candle_core::backprop::GradStore,
        lr: f64,
        scale: Option<&Tensor>,
    ) -> Result<()> {
        self.step += 1;
        // The scale in the parameters' dtype, converted once.
        let mut scale_as: Option<Tensor> = None;
        for (i, c) in self.plan(grads, lr, self.step) {
            let p = &self.params[i];
            let g = grads
                .get(p.var.as_tensor())
                .expect("planned with a gradient");
            let scale = match scale {
                None => None,
                Some(s) => {
                    if scale_as.as_ref().is_none_or(|c| c.dtype() != p.var.dtype()) {
                        scale_as = Some(s.to_dtype(p.var.dtype())?);
                    }
                    scale_as.as_ref()
                }
            };
            let anchor = c.recadam.and(p.anchor.as_ref());
            adamw_step(p.var.as_tensor(), &self.state[i], g, scale, anchor, &c)?;
        }
        Ok(())
    }

    /// The global gradient norm of `grads` (an f64 scalar on the device),
    /// then one [`Self::step`] with the gradients clipped to `max_norm`
    /// (0: no clipping). The same as [`grad_norm`], [`clip_scale`] and
    /// [`Self::step`] in turn; on CUDA, with f32 parameters, all three in
    /// three launches for every tensor at once
    /// (`crate::ops::adamw::multi::clip_and_step`).
    ///
    /// The mixed-precision weight copies of `stream`
    /// ([`crate::model::Stream::compute_weight`]) are rewritten from the
    /// updated parameters: in the same pass on CUDA, after it otherwise.
    pub fn clip_and_step(
        &mut self,
        grads: &candle_core::backprop::GradStore,
        lr: f64,
        max_norm: f64,
        stream: &crate::model::Stream,
    ) -> Result<Tensor> {
        #[cfg(feature = "cuda")]
        {
            use crate::ops::adamw::{multi, AdamWTensor};
            let t = self.step + 1;
            let plan = self.plan(grads, lr, t);
            let indices: Vec<usize> = plan.iter().map(|(i, _)| *i).collect();
            let shadows: Vec<Option<Tensor>> = plan
                .iter()
                .map(|(i, _)| stream.shadow_of(self.params[*i].var.as_tensor()))
                .collect();
            let items: Vec<AdamWTensor<'_>> = plan
                .into_iter()
                .zip(&shadows)
                .map(|((i, step), shadow)| {
                    let p = &self.params[i];
                    AdamWTensor {
                        param: p.var.as_tensor(),
                        state: &self.state[i],
                        grad: grads
                            .get(p.var.as_tensor())
                            .expect("planned with a gradient"),
                        anchor: step.recadam.and(p.anchor.as_ref()),
                        shadow: shadow.as_ref(),
                        step,
                    }
                })
                .collect();
            if let Some(norm) = multi::clip_and_step(&items, max_norm, &mut self.tables)? {
                self.step = t;
                self.multi_plan = Some(indices);
                return Ok(norm);
            }
            self.multi_plan = None;
        }
        let norm = grad_norm(grads, &self.params)?;
        let scale = clip_scale(&norm, max_norm)?;
        self.step(grads, lr, scale.as_ref())?;
        stream.refresh_shadows()?;
        Ok(norm)
    }

    /// Writes the scalars of the next step at learning rate `lr` (its bias
    /// corrections and each group's rates) into the device buffer the
    /// multi-tensor step reads, for the parameters the last multi-tensor
    /// step updated: ahead of a step captured into a CUDA graph (whose
    /// [`AdamW::clip_and_step`] then finds them in place) and of each
    /// replay. An error when no multi-tensor step ran yet.
    #[cfg(feature = "cuda")]
    pub fn stage_scalars(&mut self, lr: f64) -> Result<()> {
        let Some(indices) = self.multi_plan.clone() else {
            return Err(param_err(
                "cuda_graph",
                "a captured step needs the multi-tensor optimiser step (CUDA, f32 parameters \
                 with their moments, at most 1,024 tensors), and the last step did not take it",
            ));
        };
        let steps: Vec<AdamWStep> = self
            .plan_of(&indices, lr, self.step + 1)
            .into_iter()
            .map(|(_, s)| s)
            .collect();
        let candle_core::Device::Cuda(dev) = self.params[indices[0]].var.device() else {
            return Err(param_err(
                "cuda_graph",
                "the parameters are not on a CUDA device",
            ));
        };
        if !crate::ops::adamw::multi::stage_scalars(dev, &steps, &mut self.tables)? {
            return Err(param_err(
                "cuda_graph",
                "the step's scalars no longer fit the multi-tensor step's groups",
            ));
        }
        Ok(())
    }

    /// Counts a step that a replayed CUDA graph took (its scalars staged
    /// by [`AdamW::stage_scalars`]).
    #[cfg(feature = "cuda")]
    pub fn replayed_step(&mut self) {
        self.step += 1;
    }

    /// Keeps the multi-tensor step's current device table alive while the
    /// pin lives: a captured CUDA graph's launches hold its address.
    #[cfg(feature = "cuda")]
    pub fn pin_table(&self) -> Option<crate::ops::adamw::multi::TablePin> {
        self.tables.pin()
    }

    /// The constants of step `t` (1-based) for each parameter with a
    /// gradient, by index.
    fn plan(
        &self,
        grads: &candle_core::backprop::GradStore,
        lr: f64,
        step: u64,
    ) -> Vec<(usize, AdamWStep)> {
        let with_grad = (0..self.params.len())
            .filter(|&i| grads.get(self.params[i].var.as_tensor()).is_some())
            .collect::<Vec<_>>();
        self.plan_of(&with_grad, lr, step)
    }

    /// [`AdamW::plan`] for the parameters `indices`.
    fn plan_of(&self, indices: &[usize], lr: f64, step: u64) -> Vec<(usize, AdamWStep)> {
        let t = step as i32;
        let (b1, b2) = (self.hp.beta1, self.hp.beta2);
        let (c1, c2) = (1.0 - b1.powi(t), 1.0 - b2.powi(t));
        let mut out = Vec::with_capacity(indices.len());
        for &i in indices {
            let p = &self.params[i];
            let lr_i = lr * p.lr_scale;
            // RecAdam's update (Chen et al.'s reference code): the moments
            // see the task gradient; the Adam step is weighted by λ(t) and
            // the pull (1 − λ(t))·γ·(θ − θ*) is added beside it.
            let recadam = match (&self.recadam, &p.anchor) {
                (Some(r), Some(_)) => {
                    let lam = r.lambda(step);
                    Some((lam, (1.0 - lam) * r.gamma))
                }
                _ => None,
            };
            out.push((
                i,
                AdamWStep {
                    beta1: b1,
                    beta2: b2,
                    eps: self.hp.eps,
                    c1,
                    c2,
                    lr: lr_i,
                    decay: (p.decay && self.hp.weight_decay > 0.0)
                        .then_some(lr_i * self.hp.weight_decay),
                    recadam,
                },
            ));
        }
        out
    }

    /// The moments by parameter name (`m.<name>`, `v.<name>`, each in the
    /// parameter's shape), for checkpoints: copies, since the optimiser
    /// updates its state in place.
    pub fn state(&self) -> Result<HashMap<String, Tensor>> {
        let mut s = HashMap::new();
        for (i, p) in self.params.iter().enumerate() {
            for (k, key) in ["m", "v"].into_iter().enumerate() {
                let t = self.state[i].get(k)?.reshape(p.var.dims())?.copy()?;
                s.insert(format!("{key}.{}", p.name), t);
            }
        }
        Ok(s)
    }

    /// Restores moments saved by [`AdamW::state`] and the step count.
    pub fn load_state(&mut self, state: &HashMap<String, Tensor>, step: u64) -> Result<()> {
        for (i, p) in self.params.iter().enumerate() {
            let mut mv = Vec::with_capacity(2);
            for key in [format!("m.{}", p.name), format!("v.{}", p.name)] {
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
                mv.push(
                    t.to_dtype(p.var.dtype())?
                        .to_device(p.var.device())?
                        .flatten_all()?,
                );
            }
            self.state[i] = Tensor::stack(&mv, 0)?;
        }
        self.step = step;
        Ok(())
    }
}

/// The global l2 norm of the gradients of `params`, entirely on the device
/// (no host sync), as a scalar f64 tensor: one f32 squared sum per
/// parameter, summed in f64 in parameter order.
pub fn grad_norm(grads: &candle_core::backprop::GradStore, params: &[Param]) -> Result<Tensor> {
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
    if sums.is_empty() {
        let dev = params
            .first()
            .map_or(candle_core::Device::Cpu, |p| p.var.device().clone());
        return Ok(Tensor::zeros((), candle_core::DType::F64, &dev)?);
    }
    Ok(Tensor::cat(&sums, 0)?
        .to_dtype(candle_core::DType::F64)?
        .sum_all()?
        .sqrt()?)
}

/// The factor that clips gradients of global norm `norm` (from
/// [`grad_norm`]) to at most `max_norm`, left on the device (a scalar f64
/// tensor: `max/(norm + 1e-6)` when norm > max, else 1), for
/// [`AdamW::step`]'s `scale`. `None` when `max_norm` is 0 (no clipping).
pub fn clip_scale(norm: &Tensor, max_norm: f64) -> Result<Option<Tensor>> {
    if max_norm <= 0.0 {
        return Ok(None);
    }
    let dev = norm.device();
    let k = (Tensor::new(max_norm, dev)? / (norm + 1e-6)?)?;
    Ok(Some(
        norm.gt(max_norm)?
            .where_cond(&k, &Tensor::new(1f64, dev)?)?,
    ))
}

/// Learning-rate schedules: `lr(step)` for steps 0..total.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Schedule {
    /// The same rate throughout.
    Constant,
    /// Linear warm-up over `warmup` of the steps, then linear decay to 0.
    Linear {
        /// Fraction of the steps spent warming up.
        warmup: f64,
    },
    /// Linear warm-up, then cosine decay to 0.
    Cosine {
        /// Fraction of the steps spent warming up.
        warmup: f64,
    },
    /// ULMFiT's slanted triangular rates (Howard & Ruder 2018): rise for
    /// `cut_frac` of the steps, fall after, from lr/ratio to lr and back.
    SlantedTriangular {
        /// Fraction of the steps spent rising.
        cut_frac: f64,
        /// How much smaller the lowest rate is than the peak.
        ratio: f64,
    },
}

impl Schedule {
    /// Warm-up in [0, 1), cut_frac in (0, 1), ratio ≥ 1; otherwise an error
    /// showing the schedule.
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

/// `into[p] += scale·from[p]` for each parameter `p` with a gradient in
/// `from` (the other entries of `from`, intermediate tensors, are left out).
pub fn add_param_grads(
    into: &mut candle_core::backprop::GradStore,
    from: &candle_core::backprop::GradStore,
    params: &[Param],
    scale: f64,
) -> Result<()> {
    for p in params {
        let t = p.var.as_tensor();
        if let Some(g) = from.get(t) {
            // In the parameter's dtype: mixed precision's bf16 weight
            // gradients are summed (and scaled) in f32.
            let g = g.to_dtype(p.var.dtype())?;
            let g = if scale == 1.0 { g } else { (g * scale)? };
            let sum = match into.get(t) {
                Some(a) => (a.to_dtype(p.var.dtype())? + g)?,
                None => g,
            };
            into.insert(t, sum);
        }
    }
    Ok(())
}
