//! FreeLB (Zhu et al., ICLR 2020): K ascent steps on an input-embedding
//! perturbation δ (l2 per example, projected onto the ε-ball when ε > 0),
//! the task loss averaged over the K perturbed inputs so the parameter
//! gradients accumulate across the steps. It replaces how the task loss is
//! estimated, so it is an [`Estimator`].
use candle_core::backprop::GradStore;
use candle_core::{Tensor, Var};
use serde::{Deserialize, Serialize};

use crate::error::{param_err, Result};
use crate::ops::perturb::{
    ascent_step, noise_init, AscentStep, Granularity, Noise, Norm, StepMode,
};
use crate::train::objective::{Ctx, Estimate, Estimator};
use crate::train::optim::add_param_grads;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
/// FreeLB's settings (Zhu et al., ICLR 2020).
pub struct FreeLbConfig {
    /// K, the number of perturbed passes (>= 1).
    pub steps: usize,
    /// Ascent step size η.
    pub eta: f64,
    /// Radius ε of the l2 ball (per example); 0 = no projection.
    pub eps: f64,
    /// Half-width of the uniform initial perturbation.
    pub init: f64,
}

impl Default for FreeLbConfig {
    fn default() -> Self {
        Self {
            steps: 2,
            eta: 1e-1,
            eps: 0.0,
            init: 1e-2,
        }
    }
}

impl FreeLbConfig {
    /// K ≥ 1 and η, ε, the initial width finite and ≥ 0; otherwise an error
    /// showing the settings.
    pub fn validate(&self) -> Result<()> {
        let nonneg = |v: f64| v >= 0.0 && v.is_finite();
        if !(self.steps > 0 && nonneg(self.eta) && nonneg(self.eps) && nonneg(self.init)) {
            return Err(param_err(
                "freelb",
                format!("needs steps >= 1 and eta, eps, init >= 0: {self:?}"),
            ));
        }
        Ok(())
    }
}

/// The estimator: the task loss averaged over K perturbed passes.
pub struct FreeLb {
    cfg: FreeLbConfig,
}

impl FreeLb {
    /// An estimator with these settings.
    pub fn new(cfg: FreeLbConfig) -> Self {
        Self { cfg }
    }
}

impl Estimator for FreeLb {
    /// Each of the first K − 1 passes is back-propagated once, for δ's
    /// gradient and its share of the parameter gradients (returned in
    /// [`Estimate::grads`]); only the last pass is left to the step's
    /// backward, so a step costs K backward passes, not 2K − 1. A pass whose
    /// δ gradient is not finite ends the ascent there (the estimate still
    /// averages K passes, at the last finite δ).
    fn task_loss(&mut self, ctx: &mut Ctx<'_>) -> Result<Estimate> {
        let f = &self.cfg;
        let embeds = ctx.embeds()?;
        let mut delta = noise_init(
            embeds.dims(),
            &ctx.batch.mask,
            Noise::Uniform { sigma: f.init },
            embeds.dtype(),
            *ctx.noise,
        )?;
        ctx.noise.offset += crate::philox::counters_for(delta.elem_count());
        let step = AscentStep {
            eta: f.eta,
            norm: Norm::L2,
            granularity: Granularity::Example,
            mode: StepMode::Pgd {
                eps: (f.eps > 0.0).then_some(f.eps),
            },
        };
        let pass = |delta: &Tensor| -> Result<Tensor> {
            let out = ctx.forward(&(&embeds + delta)?)?;
            Ok((ctx.head().loss(&out, &ctx.batch.labels)? / f.steps as f64)?)
        };
        // The earlier passes' loss values (detached) and parameter gradients.
        let mut done: Option<Tensor> = None;
        let mut grads = GradStore::default();
        // Set (on the device) once an ascent step saw a non-finite gradient
        // norm: δ then stays where it was for the remaining passes. Never
        // read back: the step needs no host synchronisation.
        let mut stopped: Option<Tensor> = None;
        for _ in 1..f.steps {
            let _r = crate::nvtx::range("freelb ascent step");
            let d = Var::from_tensor(&delta)?;
            let loss = pass(d.as_tensor())?;
            let mut g = loss.backward()?;
            ctx.model.bert.stream.route_grads(&mut g)?;
            add_param_grads(&mut grads, &g, ctx.params, 1.0)?;
            done = Some(match done {
                None => loss.detach(),
                Some(t) => (t + loss.detach())?,
            });
            let dg = g.get(d.as_tensor()).cloned().unwrap_or(delta.zeros_like()?);
            let (next, flags) = ascent_step(&delta, &dg, &ctx.batch.mask, &step)?;
            let stop = match stopped {
                None => flags.max_all()?,
                Some(s) => s.maximum(&flags.max_all()?)?,
            };
            delta = stop
                .broadcast_as(delta.shape())?
                .where_cond(&delta, &next)?;
            stopped = Some(stop);
        }
        let last = pass(&delta)?;
        Ok(Estimate {
            loss: match done {
                None => last,
                Some(t) => (t + last)?,
            },
            grads: (f.steps > 1).then_some(grads),
        })
    }
}
