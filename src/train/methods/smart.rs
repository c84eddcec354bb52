//! SMART's smoothness-inducing adversarial regulariser (Jiang et al., ACL
//! 2020): λ·ℓ_s(f(x + δ*), f(x)) with δ* found by K ascent steps on
//! ℓ_s(f(x + δ), f(x)) from Gaussian noise. The defaults are those of
//! smart-pytorch and of mt-dnn's current code: σ = 1e-5, one l∞-normalised
//! step per token (`normalized_step`) with η = 1e-3, λ = 1. mt-dnn's first
//! release took a step of size η instead (`direction`); `bench/RESULTS.md`
//! compares the two on SST-2 and RTE.
use candle_core::Var;
use serde::{Deserialize, Serialize};

use crate::error::Result;
use crate::ops::perturb::{AscentStep, Granularity, Noise, Norm, Perturbation, StepMode};
use crate::ops::sym_kl::{Reduction, SymKlGrad};
use crate::train::objective::{Ctx, Term, TermOut};

/// SMART's settings.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SmartConfig {
    /// Weight λ_s of the smoothness penalty (0: the term is skipped).
    pub lambda: f64,
    /// Std of the initial noise on the input embeddings.
    pub sigma: f64,
    /// Ascent step size η.
    pub eta: f64,
    /// Number of ascent steps K.
    pub steps: usize,
    /// The norm of the ascent step.
    pub norm: Norm,
    /// Per token or per example.
    pub granularity: Granularity,
    /// The ascent step's rule.
    pub mode: SmartMode,
    /// ε₀ of direction / normalized_step, or the pgd radius.
    pub eps: f64,
    /// How the penalty reduces the batch's rows.
    pub reduction: SmartReduction,
}

/// The ascent step ([`StepMode`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SmartMode {
    /// η·g/‖g‖, a perturbation of size η (mt-dnn's first release).
    Direction,
    /// (δ + η·g)/‖δ + η·g‖, of size 1 (smart-pytorch, mt-dnn's current code).
    NormalizedStep,
    /// The paper's Algorithm 1: δ + η·g/‖g‖ projected onto the ε-ball.
    Pgd,
}

/// How the final penalty combines the batch's rows. The inner ascent loss
/// is always the batch mean, as in both reference implementations (the
/// ascent step normalises its gradient anyway).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SmartReduction {
    /// The mean over rows (mt-dnn).
    Batchmean,
    /// The sum over rows (smart-pytorch's `sym_kl_loss`): on a batch of B
    /// rows B times the batch mean, so the same λ weighs it B times as much.
    Sum,
}

impl Default for SmartConfig {
    fn default() -> Self {
        Self {
            lambda: 1.0,
            sigma: 1e-5,
            eta: 1e-3,
            steps: 1,
            norm: Norm::Linf,
            granularity: Granularity::Token,
            mode: SmartMode::NormalizedStep,
            eps: 1e-6,
            reduction: SmartReduction::Batchmean,
        }
    }
}

impl SmartConfig {
    /// The ascent step these settings describe.
    pub fn step(&self) -> AscentStep {
        AscentStep {
            eta: self.eta,
            norm: self.norm,
            granularity: self.granularity,
            mode: match self.mode {
                SmartMode::Direction => StepMode::Direction { eps0: self.eps },
                SmartMode::NormalizedStep => StepMode::NormalizedStep { eps0: self.eps },
                SmartMode::Pgd => StepMode::Pgd {
                    eps: Some(self.eps),
                },
            },
        }
    }

    /// Every setting in range; an error naming the field.
    pub fn validate(&self) -> Result<()> {
        // Without an ascent step the term is random-noise smoothing: that
        // is r3f, not a SMART run with its adversarial part switched off.
        if self.steps == 0 {
            return Err(crate::error::param_err(
                "smart",
                "steps must be >= 1 (the K ascent steps of the perturbation), got 0; for \
                 noise without ascent use the r3f method",
            ));
        }
        self.step().validate()?;
        super::check_noise_and_weight("smart", self.sigma, self.lambda)
    }
}

/// The SMART term.
pub struct Smart {
    cfg: SmartConfig,
}

impl Smart {
    /// A term with these settings.
    pub fn new(cfg: SmartConfig) -> Self {
        Self { cfg }
    }
}

impl Term for Smart {
    fn name(&self) -> &'static str {
        "smart"
    }

    fn term(&mut self, ctx: &mut Ctx<'_>) -> Result<TermOut> {
        let s = &self.cfg;
        if s.lambda == 0.0 {
            return TermOut::skipped(0.0, ctx.batch.mask.device());
        }
        let embeds = ctx.embeds()?;
        let logits = ctx.clean()?;
        let (bsz, len, hid) = embeds.dims3()?;
        let smart = Perturbation {
            noise: Noise::Normal { sigma: s.sigma },
            step: s.step(),
            steps: s.steps,
        };
        let target = logits.detach();
        let clean = embeds.detach();
        let mut rng = *ctx.noise;
        let mask = &ctx.batch.mask;
        let delta = {
            let ctx = &*ctx;
            smart.run(&[bsz, len, hid], mask, embeds.dtype(), &mut rng, |delta| {
                let _r = crate::nvtx::range("smart ascent step");
                // Only δ's gradient is used: the weights' are not computed.
                let _off = ctx.model.bert.stream.without_weight_grads();
                let d = Var::from_tensor(delta)?;
                let adv = ctx.forward(&(&clean + d.as_tensor())?)?;
                let inner = ctx.ascent_loss(&adv, &target)?;
                Ok(inner
                    .backward()?
                    .get(d.as_tensor())
                    .cloned()
                    .unwrap_or(delta.zeros_like()?))
            })?
        };
        *ctx.noise = rng;
        // A non-finite gradient norm in any example's ascent skips the
        // penalty (it adds 0 and is logged as NaN). Decided on the device,
        // without reading the flag back: δ is zeroed first so that the
        // skipped branch stays finite (a NaN times the zero gradient of the
        // unselected branch would still be NaN), and selections are exact,
        // so an unflagged step computes what it always did.
        let skip = delta.nonfinite.max_all()?;
        let delta = skip
            .broadcast_as(delta.delta.shape())?
            .where_cond(&delta.delta.zeros_like()?, &delta.delta)?;
        let adv = ctx.forward(&(&embeds + delta)?)?;
        let red = match s.reduction {
            SmartReduction::Batchmean => Reduction::BatchMean,
            SmartReduction::Sum => Reduction::Sum,
        };
        let pen = ctx.divergence(&adv, &logits, SymKlGrad::Detached, red, s.lambda)?;
        let weighted = (&pen * s.lambda)?;
        let pen = pen.detach();
        Ok(TermOut {
            value: skip.where_cond(&pen.affine(0.0, f64::NAN)?, &pen)?,
            loss: Some(skip.where_cond(&weighted.zeros_like()?, &weighted)?),
        })
    }
}
