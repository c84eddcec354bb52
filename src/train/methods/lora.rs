//! LoRA (Hu et al., ICLR 2022): W x + (α/r)·B A x on the targeted dense
//! layers, A and B the only new parameters (`…lora_A`, `…lora_B`), the
//! backbone frozen. B starts at zero, so training starts at the
//! pretrained model.
use candle_nn::VarMap;
use serde::{Deserialize, Serialize};

use crate::error::{param_err, Result};
use crate::model::Bert;
use crate::train::objective::ModelTransform;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
/// LoRA's settings (Hu et al. 2021).
pub struct LoraConfig {
    /// The rank r (>= 1).
    pub r: usize,
    /// α; the update is scaled by α/r.
    pub alpha: f64,
    /// The dense layers that get an update, by name (`query`, `value`, …).
    pub targets: Vec<String>,
    /// Also train the backbone's LayerNorms (otherwise frozen with it).
    pub layernorm: bool,
}

impl Default for LoraConfig {
    fn default() -> Self {
        Self {
            r: 8,
            alpha: 16.0,
            targets: vec!["query".into(), "value".into()],
            layernorm: false,
        }
    }
}

impl LoraConfig {
    /// r ≥ 1, a finite α, at least one target; otherwise an error showing them.
    pub fn validate(&self) -> Result<()> {
        if self.r == 0 || !(self.alpha.is_finite()) || self.targets.is_empty() {
            return Err(param_err(
                "lora",
                format!(
                    "needs r >= 1, a finite alpha and at least one target, got r {} alpha {} targets {:?}",
                    self.r, self.alpha, self.targets
                ),
            ));
        }
        Ok(())
    }
}

impl ModelTransform for LoraConfig {
    fn apply(&self, bert: &mut Bert, varmap: &VarMap) -> Result<()> {
        let t: Vec<&str> = self.targets.iter().map(String::as_str).collect();
        bert.add_lora(varmap, &t, self.r, self.alpha)?;
        Ok(())
    }

    fn owns(&self, name: &str) -> bool {
        name.contains("lora_")
    }

    fn trains_layernorm(&self) -> bool {
        self.layernorm
    }
}
