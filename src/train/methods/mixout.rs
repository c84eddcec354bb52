//! Mixout (Lee et al., ICLR 2020): during training each dense weight's
//! entries are replaced by their pretrained values with probability p (and
//! the result rescaled), a dropout towards the pretrained model rather than
//! towards zero. Dropout is off by default with it, as in the paper.
use candle_nn::VarMap;
use serde::{Deserialize, Serialize};

use crate::error::{param_err, Result};
use crate::model::Bert;
use crate::train::objective::ModelTransform;

/// Why mixout refuses a method that freezes the backbone.
pub const NEEDS_FULL_WEIGHTS: &str =
    "mixout pulls the full weights towards their pretrained values";

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
/// Mixout's settings (Lee et al., ICLR 2020).
pub struct MixoutConfig {
    /// The probability p of taking the pretrained value, in [0, 1).
    pub p: f64,
}

impl Default for MixoutConfig {
    fn default() -> Self {
        Self { p: 0.1 }
    }
}

impl MixoutConfig {
    /// p in [0, 1); an error naming it.
    pub fn validate(&self) -> Result<()> {
        if !(0.0..1.0).contains(&self.p) {
            return Err(param_err(
                "mixout",
                format!("p must be in [0, 1), got {}", self.p),
            ));
        }
        Ok(())
    }
}

impl ModelTransform for MixoutConfig {
    fn apply(&self, bert: &mut Bert, _varmap: &VarMap) -> Result<()> {
        bert.enable_mixout(self.p)
    }

    fn default_dropout(&self) -> Option<f64> {
        Some(0.0)
    }
}
