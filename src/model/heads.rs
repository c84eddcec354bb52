//! Task heads on top of the encoder.
use candle_core::{DType, Device, Tensor};
use candle_nn::VarMap;

use super::bert::{first_token, mean_pool};
use super::family::HeadSpec;
use super::layers::{Dense, LayerNorm, Stream};
use crate::error::{param_err, Result};

/// How a sequence becomes one vector.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Pooling {
    /// The \[CLS\] (first) token.
    Cls,
    /// The mean over real tokens.
    Mean,
    /// `act(pooler.dense([CLS]))`: the family's own sequence-classification
    /// head (BERT: tanh of the pooler; RoBERTa: `classifier.dense`, tanh;
    /// ELECTRA: GELU; DistilBERT: `pre_classifier`, ReLU; ModernBERT:
    /// `head.norm(act(head.dense(pool)))` over its configured pooling), with the
    /// checkpoint's dense layer (a new one when it has none) trained as
    /// part of the head. The form a model exported to transformers computes.
    Pooler,
}

/// A family's head before its label layer: `norm(act(dense(pool)))` with
/// `spec`'s pooling (the first token, or the mean over `mask` `[B, L]`)
/// and activation, and the norm where the family has one.
pub fn family_pool(
    hidden: &Tensor,
    mask: &Tensor,
    dense: &Dense,
    norm: Option<&LayerNorm>,
    spec: &HeadSpec,
    s: &Stream,
) -> Result<Tensor> {
    let pooled = if spec.mean {
        mean_pool(hidden, mask)?
    } else {
        first_token(hidden)?
    };
    let y = spec.act.apply(&dense.forward(&pooled, s)?, s)?;
    match norm {
        Some(n) => n.forward(&y, s),
        None => Ok(y),
    }
}

/// How a head turns the last hidden states into one vector per example:
/// the pooling, and the pooler's dense layer (and norm) for
/// [`Pooling::Pooler`] (the encoder's `pooler.*` parameters, shared
/// through the varmap).
#[derive(Debug)]
pub struct Pool {
    /// Which vector stands for the sequence.
    pub pooling: Pooling,
    /// The dense layer of [`Pooling::Pooler`] (`pooler.dense.*`).
    pub pooler: Option<Dense>,
    /// The norm after the activation (`pooler.LayerNorm.*`, ModernBERT).
    pub norm: Option<LayerNorm>,
    /// The family's head: pooling, dense bias, activation and norm.
    pub spec: HeadSpec,
}

impl Pool {
    fn new(
        vb: &candle_nn::VarBuilder,
        hidden: usize,
        pooling: Pooling,
        spec: HeadSpec,
    ) -> Result<Self> {
        let (pooler, norm) = match pooling {
            Pooling::Pooler => {
                let p = vb.pp("pooler");
                let norm = match spec.norm {
                    Some((eps, bias)) => Some(LayerNorm::new_with(&p, hidden, eps, bias)?),
                    None => None,
                };
                (
                    Some(Dense::new_with(&p, "dense", hidden, hidden, spec.bias)?),
                    norm,
                )
            }
            _ => (None, None),
        };
        Ok(Self {
            pooling,
            pooler,
            norm,
            spec,
        })
    }

    fn forward(&self, hidden: &Tensor, mask: &Tensor, s: &Stream) -> Result<Tensor> {
        match (&self.pooler, self.pooling) {
            (Some(d), _) => family_pool(hidden, mask, d, self.norm.as_ref(), &self.spec, s),
            (None, Pooling::Mean) => mean_pool(hidden, mask),
            (None, _) => first_token(hidden),
        }
    }

    /// The name prefixes of the pooling's own parameters.
    pub fn prefixes(&self) -> &'static [&'static str] {
        if self.pooler.is_some() {
            &["pooler."]
        } else {
            &[]
        }
    }
}

/// Pooling, dropout, linear: logits `[B, classes]` (`classifier.*` parameters).
#[derive(Debug)]
pub struct ClassifierHead {
    /// Hidden states `[B, L, H]` to one vector `[B, H]` per example.
    pub pool: Pool,
    /// Dropout before the linear layer (train mode).
    pub dropout: f64,
    /// `classifier.*`: `[classes, H]` and `[classes]`.
    pub linear: Dense,
}

impl ClassifierHead {
    /// A new head in `varmap` for `classes` labels over hidden size
    /// `hidden`; fewer than 2 classes is an error.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        varmap: &VarMap,
        hidden: usize,
        classes: usize,
        pooling: Pooling,
        spec: HeadSpec,
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
            pool: Pool::new(&vb, hidden, pooling, spec)?,
            dropout,
            linear: Dense::new(&vb, "classifier", hidden, classes)?,
        })
    }

    /// Logits `[B, classes]` from hidden states `[B, L, H]` and the
    /// attention mask `[B, L]`: [`Self::pooled`], then [`Self::logits`].
    pub fn forward(&self, hidden: &Tensor, mask: &Tensor, s: &Stream) -> Result<Tensor> {
        self.logits(&self.pooled(hidden, mask, s)?, s)
    }

    /// The pooled vector `[B, H]` of each example: the head's part before
    /// its only random draw.
    pub fn pooled(&self, hidden: &Tensor, mask: &Tensor, s: &Stream) -> Result<Tensor> {
        self.pool.forward(hidden, mask, s)
    }

    /// Logits `[B, classes]` from pooled vectors: dropout (train mode),
    /// then the linear layer. Monte-Carlo dropout over the head alone
    /// re-runs only this on features computed once.
    pub fn logits(&self, pooled: &Tensor, s: &Stream) -> Result<Tensor> {
        self.linear.forward(&s.dropout(pooled, self.dropout)?, s)
    }
}

/// Pooling, dropout, linear to one value: predictions `[B]` (`regressor.*`).
#[derive(Debug)]
pub struct RegressionHead {
    /// Hidden states `[B, L, H]` to one vector `[B, H]` per example.
    pub pool: Pool,
    /// Dropout before the linear layer (train mode).
    pub dropout: f64,
    /// `regressor.*`: `[1, H]` and `[1]`.
    pub linear: Dense,
}

impl RegressionHead {
    /// A new one-output head in `varmap` over hidden size `hidden`.
    pub fn new(
        varmap: &VarMap,
        hidden: usize,
        pooling: Pooling,
        spec: HeadSpec,
        dropout: f64,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let vb = candle_nn::VarBuilder::from_varmap(varmap, dtype, device);
        Ok(Self {
            pool: Pool::new(&vb, hidden, pooling, spec)?,
            dropout,
            linear: Dense::new(&vb, "regressor", hidden, 1)?,
        })
    }

    /// Predictions `[B]` from hidden states `[B, L, H]` and the attention
    /// mask `[B, L]`.
    pub fn forward(&self, hidden: &Tensor, mask: &Tensor, s: &Stream) -> Result<Tensor> {
        let x = s.dropout(&self.pool.forward(hidden, mask, s)?, self.dropout)?;
        Ok(self.linear.forward(&x, s)?.squeeze(1)?)
    }
}

/// Dropout and a linear layer on every token: logits `[B, L, classes]`
/// (`classifier.*`, as transformers' `*ForTokenClassification` names it).
#[derive(Debug)]
pub struct TokenHead {
    /// Dropout before the linear layer (train mode).
    pub dropout: f64,
    /// `classifier.*`: `[classes, H]` and `[classes]`.
    pub linear: Dense,
}

impl TokenHead {
    /// A new head in `varmap` for `classes` tags over hidden size `hidden`;
    /// fewer than 2 tags is an error.
    pub fn new(
        varmap: &VarMap,
        hidden: usize,
        classes: usize,
        dropout: f64,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        if classes < 2 {
            return Err(param_err(
                "classifier",
                format!("token classification needs at least 2 tags, got {classes}"),
            ));
        }
        let vb = candle_nn::VarBuilder::from_varmap(varmap, dtype, device);
        Ok(Self {
            dropout,
            linear: Dense::new(&vb, "classifier", hidden, classes)?,
        })
    }

    /// Logits `[B, L, classes]` from hidden states `[B, L, H]`.
    pub fn forward(&self, hidden: &Tensor, s: &Stream) -> Result<Tensor> {
        let (b, l, h) = hidden.dims3()?;
        let x = s.dropout(&hidden.reshape((b * l, h))?, self.dropout)?;
        let y = self.linear.forward(&x, s)?;
        let c = y.dim(1)?;
        Ok(y.reshape((b, l, c))?)
    }
}
