//! Bottleneck adapters (Houlsby et al., ICML 2019; Pfeiffer et al. 2021):
//! a down-projection to r, the activation, an up-projection and a residual
//! in each encoder layer, trained with the backbone frozen. The adapters'
//! parameters are named `…adapter…`; the fused adapter op runs them.
use candle_nn::VarMap;
use serde::{Deserialize, Serialize};

use crate::error::{param_err, Result};
use crate::model::{AdapterPlacement, Bert};
use crate::train::objective::ModelTransform;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
/// Bottleneck adapters' settings (Houlsby et al. 2019; Pfeiffer et al. 2021).
pub struct AdapterConfig {
    /// The bottleneck width r (>= 1).
    pub r: usize,
    /// `houlsby` (after attention and feed-forward) or `pfeiffer` (after
    /// the feed-forward only).
    pub placement: AdapterPlacement,
    /// Also train the backbone's LayerNorms (otherwise frozen with it).
    pub layernorm: bool,
}

impl Default for AdapterConfig {
    fn default() -> Self {
        Self {
            r: 64,
            placement: AdapterPlacement::Houlsby,
            layernorm: false,
        }
    }
}

impl AdapterConfig {
    /// r ≥ 1; an error naming it.
    pub fn validate(&self) -> Result<()> {
        if self.r == 0 {
            return Err(param_err("adapter", "r must be >= 1"));
        }
        Ok(())
    }
}

impl ModelTransform for AdapterConfig {
    fn apply(&self, bert: &mut Bert, varmap: &VarMap) -> Result<()> {
        bert.add_adapters(varmap, self.placement, self.r, 1.0)
    }

    fn owns(&self, name: &str) -> bool {
        name.contains(".adapter.")
    }

    fn trains_layernorm(&self) -> bool {
        self.layernorm
    }
}
