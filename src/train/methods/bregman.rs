//! Bregman proximal point optimisation (Jiang et al., ACL 2020, SMART's
//! second half): a slowly moving copy θ̃ of the trained parameters
//! (θ̃ ← β·θ̃ + (1 − β)·θ after every optimiser step; β = 0 is the paper's
//! "vanilla" variant, θ̃ = the previous iterate) and the penalty
//! μ·ℓ_s(f(x; θ), f(x; θ̃)), ℓ_s the symmetric KL (squared error for a
//! regression head) with θ̃'s side detached.
use candle_core::Tensor;
use serde::{Deserialize, Serialize};

use crate::error::{param_err, Result};
use crate::ops::sym_kl::{Reduction, SymKlGrad};
use crate::train::objective::{Ctx, Term, TermOut};
use crate::train::optim::Param;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
/// The Bregman proximal point term's settings (SMART's mean teacher).
pub struct BregmanConfig {
    /// μ, the weight of the proximal term (0: skipped, logged as 0).
    pub mu: f64,
    /// β, the momentum of θ̃, in [0, 1).
    pub beta: f64,
}

impl Default for BregmanConfig {
    fn default() -> Self {
        Self {
            mu: 1.0,
            beta: 0.99,
        }
    }
}

impl BregmanConfig {
    /// μ finite and ≥ 0, β in [0, 1); otherwise an error showing both.
    pub fn validate(&self) -> Result<()> {
        if !(self.mu >= 0.0 && self.mu.is_finite() && (0.0..1.0).contains(&self.beta)) {
            return Err(param_err(
                "bregman",
                format!(
                    "needs mu >= 0 and beta in [0, 1), got mu {} beta {}",
                    self.mu, self.beta
                ),
            ));
        }
        Ok(())
    }
}

/// The proximal term μ·KL_S(f(θ), f(θ̃)) with θ̃ the momentum average of θ.
pub struct Bregman {
    cfg: BregmanConfig,
    /// θ̃, one tensor per optimised parameter (in the optimiser's order).
    teacher: Vec<Tensor>,
}

impl Bregman {
    /// A term with these settings.
    pub fn new(cfg: BregmanConfig) -> Self {
        Self {
            cfg,
            teacher: vec![],
        }
    }
}

/// Puts θ̃ into the live parameters for one forward pass, with dropout off,
/// and puts θ and the train mode back when dropped: on the error path too,
/// so a failed teacher pass never leaves the model holding θ̃.
struct Swapped<'a> {
    params: &'a [Param],
    saved: Vec<Tensor>,
    stream: &'a crate::model::Stream,
    was_training: bool,
}

impl<'a> Swapped<'a> {
    fn new(
        params: &'a [Param],
        values: &[Tensor],
        stream: &'a crate::model::Stream,
    ) -> Result<Self> {
        let saved = params
            .iter()
            .map(|p| p.var.as_tensor().detach().copy())
            .collect::<candle_core::Result<Vec<_>>>()?;
        let was_training = stream.train();
        let guard = Self {
            params,
            saved,
            stream,
            was_training,
        };
        for (p, t) in params.iter().zip(values) {
            p.var.set(t)?;
        }
        stream.refresh_shadows()?;
        stream.set_train(false);
        Ok(guard)
    }
}

impl Drop for Swapped<'_> {
    fn drop(&mut self) {
        self.stream.set_train(self.was_training);
        for (p, t) in self.params.iter().zip(&self.saved) {
            // Same shape and dtype as the value taken from it: cannot fail.
            let _ = p.var.set(t);
        }
        // As the values put back are θ's own, this only rewrites the bf16
        // copies with what they held before the teacher pass.
        let _ = self.stream.refresh_shadows();
    }
}

impl Term for Bregman {
    fn name(&self) -> &'static str {
        "bregman"
    }

    fn start(&mut self, params: &[Param]) -> Result<()> {
        self.teacher = params
            .iter()
            .map(|p| p.var.as_tensor().detach().copy())
            .collect::<candle_core::Result<_>>()?;
        Ok(())
    }

    fn term(&mut self, ctx: &mut Ctx<'_>) -> Result<TermOut> {
        if self.cfg.mu == 0.0 {
            // Weighs nothing: skipped (no teacher pass), logged as 0.
            return TermOut::skipped(0.0, ctx.batch.mask.device());
        }
        let teacher = {
            let _swap = Swapped::new(ctx.params, &self.teacher, &ctx.model.bert.stream)?;
            let e = ctx.model.embed(ctx.batch)?;
            ctx.forward(&e)?.detach()
        };
        let logits = ctx.clean()?;
        let mu = self.cfg.mu;
        let prox = ctx.divergence(
            &logits,
            &teacher,
            SymKlGrad::Detached,
            Reduction::BatchMean,
            mu,
        )?;
        Ok(TermOut {
            value: prox.detach(),
            loss: Some((prox * mu)?),
        })
    }

    /// θ̃ ← β·θ̃ + (1 − β)·θ.
    fn after_step(&mut self, params: &[Param]) -> Result<()> {
        let beta = self.cfg.beta;
        for (t, p) in self.teacher.iter_mut().zip(params) {
            *t = ((&*t * beta)? + (p.var.as_tensor().detach() * (1.0 - beta))?)?;
        }
        Ok(())
    }

    fn state(&self, params: &[Param]) -> Vec<(String, Tensor)> {
        params
            .iter()
            .zip(&self.teacher)
            .map(|(p, t)| (format!("teacher.{}", p.name), t.clone()))
            .collect()
    }

    fn load_state(&mut self, params: &[Param], get: &dyn Fn(&str) -> Result<Tensor>) -> Result<()> {
        self.teacher = params
            .iter()
            .map(|p| get(&format!("teacher.{}", p.name)))
            .collect::<Result<_>>()?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// A teacher pass that fails half-way still leaves θ and the train mode
    /// as they were.
    #[test]
    fn a_failed_teacher_pass_restores_the_live_parameters() {
        let theta = Tensor::new(&[1.0f32, 2.0], &Device::Cpu).unwrap();
        let var = Var::from_tensor(&theta).unwrap();
        let params = [Param {
            name: "w".into(),
            var: var.clone(),
            lr_scale: 1.0,
            decay: true,
            anchor: None,
        }];
        let teacher = [Tensor::new(&[5.0f32, 6.0], &Device::Cpu).unwrap()];
        let stream = crate::model::Stream::new(0);
        stream.set_train(true);
        let pass = || -> Result<()> {
            let _swap = Swapped::new(&params, &teacher, &stream)?;
            assert_eq!(var.as_tensor().to_vec1::<f32>()?, [5.0, 6.0]);
            assert!(!stream.train(), "the teacher runs without dropout");
            Err(param_err("test", "the forward pass failed"))
        };
        assert!(pass().is_err());
        assert_eq!(var.as_tensor().to_vec1::<f32>().unwrap(), [1.0, 2.0]);
        assert!(stream.train());
    }
}
