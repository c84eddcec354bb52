//! The methods a run can combine, and the one registry of them.
//!
//! A method is one of three kinds, each a small trait of
//! [`crate::train::objective`]:
//! - a **term** adds a weighted loss to the objective (SMART, R3F, the
//!   Bregman proximal term, Kong et al.'s manifold smoothing, AFTER's
//!   domain-adversarial term);
//! - an **estimator** replaces how the task loss is estimated (FreeLB's K
//!   perturbed passes); a run has at most one;
//! - a **model transform** changes the model and owns the parameters it
//!   creates (mixout, adapters, LoRA).
//!
//! [`Method`] is the registry: one serde-tagged variant per method, each with
//! its own settings (`deny_unknown_fields`, so a misspelt setting is an error
//! naming it). Adding a method is one file here, one variant and one arm in
//! [`Method::build`]; the loop does not change. Which methods combine is
//! decided by the properties they declare ([`Props`]), not by pairs of names.
use serde::{Deserialize, Serialize};

use crate::error::{param_err, Result};
use crate::train::objective::{Estimator, ModelTransform, Term};

pub mod adapter;
pub mod after;
pub mod bregman;
pub mod freelb;
pub mod lora;
pub mod manifold;
pub mod mixout;
pub mod r3f;
pub mod smart;

pub use adapter::AdapterConfig;
pub use after::AfterConfig;
pub use bregman::BregmanConfig;
pub use freelb::FreeLbConfig;
pub use lora::LoraConfig;
pub use manifold::ManifoldConfig;
pub use mixout::MixoutConfig;
pub use r3f::R3fConfig;
pub use smart::{SmartConfig, SmartMode, SmartReduction};

/// One method and its settings. In TOML: `[[methods]]` tables with a `kind`
/// (`smart`, `r3f`, `freelb`, `bregman`, `manifold`, `after`, `mixout`,
/// `adapter`, `lora`) and the
/// method's settings beside it. The variants are in the order the objective
/// applies them, whatever order a configuration lists them in.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Method {
    /// SMART's smoothness-inducing adversarial regulariser.
    Smart(SmartConfig),
    /// R3F's noise-only smoothness term.
    R3f(R3fConfig),
    /// FreeLB's K-step adversarial estimator of the task loss.
    Freelb(FreeLbConfig),
    /// The Bregman proximal point term (SMART's mean teacher).
    Bregman(BregmanConfig),
    /// Kong et al.'s on- and off-manifold calibration terms.
    Manifold(ManifoldConfig),
    /// AFTER's / DANN's domain-adversarial term on an auxiliary corpus.
    After(AfterConfig),
    /// Mixout towards the pretrained weights.
    Mixout(MixoutConfig),
    /// Bottleneck adapters (backbone frozen).
    Adapter(AdapterConfig),
    /// LoRA deltas (backbone frozen).
    Lora(LoraConfig),
}

/// The names [`Method::from_name`] takes (and `vanilla`, no method).
pub const NAMES: [&str; 9] = [
    "smart", "r3f", "freelb", "bregman", "manifold", "after", "mixout", "adapter", "lora",
];

/// What a method is, for composition rules and assembly.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// Adds a weighted loss to the objective.
    Term,
    /// Replaces how the task loss is estimated (at most one per run).
    Estimator,
    /// Changes the model and owns the parameters it adds.
    Transform,
}

/// The properties a method declares; [`check_composition`] decides from
/// these alone which combinations are refused.
#[derive(Clone, Copy, Debug)]
pub struct Props {
    /// Term, estimator or transform.
    pub role: Role,
    /// Freezes the pretrained backbone (only new parameters train).
    pub freezes_backbone: bool,
    /// Needs the full pretrained weights to train; with the reason, for the
    /// error when combined with a method that freezes them.
    pub needs_trained_backbone: Option<&'static str>,
}

/// A built method, ready for the objective or the model.
pub enum Built {
    /// A term of the objective.
    Term(Box<dyn Term>),
    /// The task loss's estimator.
    Estimator(Box<dyn Estimator>),
    /// A change to the model.
    Transform(Box<dyn ModelTransform>),
}

impl Method {
    /// The method with its default settings, by name (`--method`).
    pub fn from_name(name: &str) -> Result<Self> {
        // The registry is the enum: a table holding only the tag gives the
        // variant with every setting at its default.
        Self::deserialize(toml::Value::Table(kind_table(name))).map_err(|_| {
            param_err(
                "config",
                format!("unknown method {name:?} (vanilla or one of {NAMES:?})"),
            )
        })
    }

    /// The method's name (`--method`, the `kind` of its TOML table, its log key).
    pub fn name(&self) -> &'static str {
        match self {
            Method::Smart(_) => "smart",
            Method::R3f(_) => "r3f",
            Method::Freelb(_) => "freelb",
            Method::Bregman(_) => "bregman",
            Method::Manifold(_) => "manifold",
            Method::After(_) => "after",
            Method::Mixout(_) => "mixout",
            Method::Adapter(_) => "adapter",
            Method::Lora(_) => "lora",
        }
    }

    /// The method's own range checks.
    pub fn validate(&self) -> Result<()> {
        match self {
            Method::Smart(c) => c.validate(),
            Method::R3f(c) => c.validate(),
            Method::Freelb(c) => c.validate(),
            Method::Bregman(c) => c.validate(),
            Method::Manifold(c) => c.validate(),
            Method::After(c) => c.validate(),
            Method::Mixout(c) => c.validate(),
            Method::Adapter(c) => c.validate(),
            Method::Lora(c) => c.validate(),
        }
    }

    /// The properties composition is decided from.
    pub fn props(&self) -> Props {
        let (role, freezes_backbone, needs_trained_backbone) = match self {
            Method::Smart(_)
            | Method::R3f(_)
            | Method::Bregman(_)
            | Method::Manifold(_)
            | Method::After(_) => (Role::Term, false, None),
            Method::Freelb(_) => (Role::Estimator, false, None),
            Method::Mixout(_) => (Role::Transform, false, Some(mixout::NEEDS_FULL_WEIGHTS)),
            Method::Adapter(_) | Method::Lora(_) => (Role::Transform, true, None),
        };
        Props {
            role,
            freezes_backbone,
            needs_trained_backbone,
        }
    }

    /// The term, estimator or transform of this method.
    pub fn build(&self) -> Built {
        match self {
            Method::Smart(c) => Built::Term(Box::new(smart::Smart::new(c.clone()))),
            Method::R3f(c) => Built::Term(Box::new(r3f::R3f::new(c.clone()))),
            Method::Bregman(c) => Built::Term(Box::new(bregman::Bregman::new(c.clone()))),
            Method::Manifold(c) => Built::Term(Box::new(manifold::Manifold::new(c.clone()))),
            Method::After(c) => Built::Term(Box::new(after::After::new(c.clone()))),
            Method::Freelb(c) => Built::Estimator(Box::new(freelb::FreeLb::new(c.clone()))),
            Method::Mixout(c) => Built::Transform(Box::new(c.clone())),
            Method::Adapter(c) => Built::Transform(Box::new(c.clone())),
            Method::Lora(c) => Built::Transform(Box::new(c.clone())),
        }
    }

    /// The variant's position in the registry: the order in which terms are
    /// added to the objective and transforms applied to the model, so a
    /// run does not depend on the order its methods are listed in.
    pub fn rank(&self) -> usize {
        NAMES
            .iter()
            .position(|n| *n == self.name())
            .expect("every method is named")
    }
}

/// Refuses combinations the math does not allow, from the declared
/// properties: a method twice, two estimators, a method that needs the
/// full weights trained beside one that freezes them.
pub fn check_composition(methods: &[Method]) -> Result<()> {
    let bad = |m: String| Err(param_err("config", m));
    for (i, m) in methods.iter().enumerate() {
        if methods[..i].iter().any(|o| o.name() == m.name()) {
            return bad(format!("method {} is listed twice", m.name()));
        }
    }
    let estimators: Vec<&str> = methods
        .iter()
        .filter(|m| m.props().role == Role::Estimator)
        .map(Method::name)
        .collect();
    if estimators.len() > 1 {
        return bad(format!(
            "{} each replace how the task loss is estimated: a run takes at most one of them",
            estimators.join(" and ")
        ));
    }
    for m in methods {
        let Some(why) = m.props().needs_trained_backbone else {
            continue;
        };
        if let Some(f) = methods.iter().find(|o| o.props().freezes_backbone) {
            return bad(format!(
                "{} cannot be combined with {}: {why}, and {} freezes them",
                m.name(),
                f.name(),
                f.name()
            ));
        }
    }
    Ok(())
}

/// Whether any of `methods` freezes the pretrained backbone.
pub fn freezes_backbone(methods: &[Method]) -> bool {
    methods.iter().any(|m| m.props().freezes_backbone)
}

/// The noise scale σ and term weight λ of the perturbation terms (SMART,
/// R3F): finite and ≥ 0, so that NaN can never pass as "off".
pub(crate) fn check_noise_and_weight(method: &'static str, sigma: f64, lambda: f64) -> Result<()> {
    let ok = |v: f64| v >= 0.0 && v.is_finite();
    if ok(sigma) && ok(lambda) {
        return Ok(());
    }
    Err(param_err(
        method,
        format!(
            "sigma and lambda must be finite numbers >= 0 (lambda = 0 turns the term off), got \
             sigma {sigma} lambda {lambda}"
        ),
    ))
}

/// A method's table holding only its tag: deserialised, the method with
/// every setting at its default (the config reader adds sections and legacy
/// keys to it first).
pub(crate) fn kind_table(name: &str) -> toml::Table {
    let mut t = toml::Table::new();
    t.insert("kind".into(), name.into());
    t
}
