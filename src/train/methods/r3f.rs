//! R3F (Aghajanyan et al., ICLR 2021): λ·KL_S(f(x + z), f(x)) with noise z
//! drawn once (no ascent), gradients through both sides.
use serde::{Deserialize, Serialize};

use crate::error::Result;
use crate::ops::perturb::{noise_init, Noise};
use crate::ops::sym_kl::{Reduction, SymKlGrad};
use crate::train::objective::{Ctx, Term, TermOut};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
/// R3F's settings (Aghajanyan et al., ICLR 2021).
pub struct R3fConfig {
    /// Weight λ (0: the term is skipped).
    pub lambda: f64,
    /// σ, the noise's scale.
    pub sigma: f64,
    /// The noise's distribution.
    pub noise: R3fNoise,
}

/// The distribution of z.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum R3fNoise {
    /// N(0, σ²).
    Normal,
    /// U(−σ, σ) (the paper's default).
    Uniform,
}

impl Default for R3fConfig {
    fn default() -> Self {
        Self {
            lambda: 1.0,
            sigma: 1e-5,
            noise: R3fNoise::Uniform,
        }
    }
}

impl R3fConfig {
    /// λ and σ finite and ≥ 0; an error naming the field.
    pub fn validate(&self) -> Result<()> {
        super::check_noise_and_weight("r3f", self.sigma, self.lambda)
    }
}

/// The R3F term.
pub struct R3f {
    cfg: R3fConfig,
}

impl R3f {
    /// A term with these settings.
    pub fn new(cfg: R3fConfig) -> Self {
        Self { cfg }
    }
}

impl Term for R3f {
    fn name(&self) -> &'static str {
        "r3f"
    }

    fn term(&mut self, ctx: &mut Ctx<'_>) -> Result<TermOut> {
        let r = &self.cfg;
        if r.lambda == 0.0 {
            return TermOut::skipped(0.0, ctx.batch.mask.device());
        }
        let embeds = ctx.embeds()?;
        let logits = ctx.clean()?;
        let noise = match r.noise {
            R3fNoise::Normal => Noise::Normal { sigma: r.sigma },
            R3fNoise::Uniform => Noise::Uniform { sigma: r.sigma },
        };
        let delta = noise_init(
            embeds.dims(),
            &ctx.batch.mask,
            noise,
            embeds.dtype(),
            *ctx.noise,
        )?;
        ctx.noise.offset += crate::philox::counters_for(delta.elem_count());
        let adv = ctx.forward(&(&embeds + delta)?)?;
        let pen = ctx.divergence(
            &adv,
            &logits,
            SymKlGrad::Full,
            Reduction::BatchMean,
            r.lambda,
        )?;
        Ok(TermOut {
            value: pen.detach(),
            loss: Some((pen * r.lambda)?),
        })
    }
}
