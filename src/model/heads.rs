//! Task heads on top of the encoder.
use candle_core::{DType, Device, Tensor};
use candle_nn::VarMap;

use super::bert::mean_pool;
use super::layers::{Dense, Stream};
use crate::error::{param_err, Result};

/// How a sequence becomes one vector.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Pooling {
    /// The [CLS] (first) token.
    Cls,
    /// The mean over real tokens.
    Mean,
}

fn pool(hidden: &Tensor, mask: &Tensor, pooling: Pooling) -> Result<Tensor> {
    match pooling {
        Pooling::Cls => Ok(hidden.narrow(1, 0, 1)?.squeeze(1)?.contiguous()?),
        Pooling::Mean => mean_pool(hidden, mask),
    }
}

/// Pooling, dropout, linear: logits `[B, classes]` (`classifier.*` parameters).
#[derive(Debug)]
pub struct ClassifierHead {
    pub pooling: Pooling,
    pub dropout: f64,
    pub linear: Dense,
}

impl ClassifierHead {
    pub fn new(
        varmap: &VarMap,
        hidden: usize,
        classes: usize,
        pooling: Pooling,
        dropout: f64,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        if classes < 2 {
            return Err(param_err(
                "classifier",
                format!("needs at least 2 classes, got {classes}"),
            ));
        }
        let vb = candle_nn::VarBuilder::from_varmap(varmap, dtype, device);
        Ok(Self {
            pooling,
            dropout,
            linear: Dense::new(&vb, "classifier", hidden, classes)?,
        })
    }

    pub fn forward(&self, hidden: &Tensor, mask: &Tensor, s: &Stream) -> Result<Tensor> {
        let x = s.dropout(&pool(hidden, mask, self.pooling)?, self.dropout)?;
        self.linear.forward(&x, s)
    }
}

/// Pooling, dropout, linear to one value: predictions `[B]` (`regressor.*`).
#[derive(Debug)]
pub struct RegressionHead {
    pub pooling: Pooling,
    pub dropout: f64,
    pub linear: Dense,
}

impl RegressionHead {
    pub fn new(
        varmap: &VarMap,
        hidden: usize,
        pooling: Pooling,
        dropout: f64,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let vb = candle_nn::VarBuilder::from_varmap(varmap, dtype, device);
        Ok(Self {
            pooling,
            dropout,
            linear: Dense::new(&vb, "regressor", hidden, 1)?,
        })
    }

    pub fn forward(&self, hidden: &Tensor, mask: &Tensor, s: &Stream) -> Result<Tensor> {
        let x = s.dropout(&pool(hidden, mask, self.pooling)?, self.dropout)?;
        Ok(self.linear.forward(&x, s)?.squeeze(1)?)
    }
}
