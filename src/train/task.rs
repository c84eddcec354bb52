//! Task heads: what the encoder's output becomes, the task loss, the
//! divergence the smoothness terms measure between two outputs, the label
//! tensor of a batch and the metrics of an evaluation. One enum arm per
//! kind of task, so the loop and the methods never ask which task runs.
use candle_core::{DType, Device, Tensor, D};
use candle_nn::VarMap;
use serde::{Deserialize, Serialize};

use super::data::Dataset;
use super::evaluate::Eval;
use super::metrics;
use crate::error::Result;
use crate::model::family::HeadSpec;
use crate::model::{ClassifierHead, Pooling, RegressionHead, Stream, TokenHead};
use crate::ops::sym_kl::{kl, sym_kl, Reduction, SymKlGrad, SymKlOptions};

/// The kind of task head a run trains.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HeadKind {
    /// Class logits `[B, C]`, cross-entropy (with label smoothing).
    #[default]
    Classification,
    /// Each example's label index as a real-valued target (SST-5's 0–4
    /// scale, say): one output `[B]`, the mean squared error as loss; the
    /// smoothness terms measure squared error instead of KL (SMART's
    /// regression form).
    Regression,
    /// A tag for every word (named entities): logits `[B, L, tags]` on
    /// every subword, cross-entropy on each word's first subword, entity
    /// scores as seqeval computes them.
    Token,
    /// An ordinal score (R2BERT, Yang et al. 2020): the sigmoid of a linear
    /// layer on the pooled vector, trained towards the label index min-max
    /// normalised over the label scale (index / (labels − 1)) with
    /// τ_e·MSE + (1 − τ_e)·ListNet (`score_ranking`; MSE alone without);
    /// quadratic weighted kappa on the rescaled integer scores, Pearson and
    /// Spearman.
    Score,
}

/// A built head and its loss settings.
pub enum TaskHead {
    /// Class logits, trained with cross-entropy.
    Classify {
        /// The head.
        head: ClassifierHead,
        /// Label smoothing ε of the cross-entropy.
        label_smoothing: f64,
    },
    /// One value per example, trained with the squared error.
    Regress(RegressionHead),
    /// A score in (0, 1), trained with MSE and ListNet.
    Score {
        /// The linear layer on the pooled vector (its sigmoid is the score).
        head: RegressionHead,
        /// Points on the label scale.
        levels: usize,
        /// Adds R2BERT's ListNet term.
        ranking: bool,
        /// τ of the current epoch (f64 bits): the weight of MSE.
        tau: std::sync::atomic::AtomicU64,
    },
    /// A tag per token, trained with the cross-entropy of the labelled
    /// (first) subwords.
    Tokens {
        /// The head.
        head: TokenHead,
        /// Label smoothing ε of the cross-entropy.
        label_smoothing: f64,
    },
}

impl TaskHead {
    /// The head (parameters `classifier.*` or `regressor.*` in `varmap`).
    /// `score_ranking`: the score head's ListNet term.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        kind: HeadKind,
        varmap: &VarMap,
        hidden: usize,
        classes: usize,
        pooling: Pooling,
        spec: HeadSpec,
        dropout: f64,
        label_smoothing: f64,
        score_ranking: bool,
        device: &Device,
    ) -> Result<Self> {
        let regressor =
            || RegressionHead::new(varmap, hidden, pooling, spec, dropout, DType::F32, device);
        Ok(match kind {
            HeadKind::Classification => TaskHead::Classify {
                head: ClassifierHead::new(
                    varmap,
                    hidden,
                    classes,
                    pooling,
                    spec,
                    dropout,
                    DType::F32,
                    device,
                )?,
                label_smoothing,
            },
            HeadKind::Score => {
                if classes < 2 {
                    return Err(crate::error::param_err(
                        "head",
                        format!("a score head needs a scale of at least 2 labels, got {classes}"),
                    ));
                }
                TaskHead::Score {
                    head: regressor()?,
                    levels: classes,
                    ranking: score_ranking,
                    tau: std::sync::atomic::AtomicU64::new(1f64.to_bits()),
                }
            }
            HeadKind::Token => TaskHead::Tokens {
                head: TokenHead::new(varmap, hidden, classes, dropout, DType::F32, device)?,
                label_smoothing,
            },
            HeadKind::Regression => TaskHead::Regress(regressor()?),
        })
    }

    /// The prefixes of the head's parameter names: its linear layer's, and
    /// the pooler's when it pools through one.
    pub fn prefixes(&self) -> Vec<&'static str> {
        let (linear, pool) = match self {
            TaskHead::Classify { head, .. } => ("classifier.", &head.pool),
            TaskHead::Regress(r) | TaskHead::Score { head: r, .. } => ("regressor.", &r.pool),
            TaskHead::Tokens { .. } => return vec!["classifier."],
        };
        let mut v = vec![linear];
        v.extend(pool.prefixes());
        v
    }

    /// Logits `[B, classes]` or predictions `[B]` from hidden states
    /// `[B, L, H]` and the attention mask `[B, L]`.
    pub fn forward(&self, hidden: &Tensor, mask: &Tensor, s: &Stream) -> Result<Tensor> {
        match self {
            TaskHead::Classify { head, .. } => head.forward(hidden, mask, s),
            TaskHead::Regress(r) => r.forward(hidden, mask, s),
            TaskHead::Score { head, .. } => {
                Ok(candle_nn::ops::sigmoid(&head.forward(hidden, mask, s)?)?)
            }
            TaskHead::Tokens { head, .. } => head.forward(hidden, s),
        }
    }

    /// The labels of `idx` as the loss takes them: class indices (u32) or
    /// real-valued targets (f32).
    pub fn labels(&self, ds: &Dataset, idx: &[usize], device: &Device) -> Result<Tensor> {
        Ok(match self {
            TaskHead::Tokens { .. } => {
                return Err(crate::error::param_err(
                    "labels",
                    "token labels follow the tokenisation's word ids: Run::batch builds them",
                ))
            }
            TaskHead::Classify { .. } => Tensor::new(Self::class_ids(ds, idx), device)?,
            TaskHead::Regress(_) => Tensor::new(
                idx.iter()
                    .map(|&i| ds.examples[i].value as f32)
                    .collect::<Vec<_>>(),
                device,
            )?,
            TaskHead::Score { levels, .. } => Tensor::new(
                idx.iter()
                    .map(|&i| ds.examples[i].label as f32 / (*levels - 1) as f32)
                    .collect::<Vec<_>>(),
                device,
            )?,
        })
    }

    /// The class indices of examples `idx` of `ds` (what
    /// [`TaskHead::labels`] holds for a classification head).
    pub fn class_ids(ds: &Dataset, idx: &[usize]) -> Vec<u32> {
        idx.iter().map(|&i| ds.examples[i].label as u32).collect()
    }

    /// The task loss: cross-entropy (with label smoothing), or the mean
    /// squared error.
    pub fn loss(&self, out: &Tensor, labels: &Tensor) -> Result<Tensor> {
        match self {
            TaskHead::Classify {
                label_smoothing, ..
            } => cross_entropy(out, labels, *label_smoothing),
            TaskHead::Regress(_) => squared_error(out, labels),
            TaskHead::Score { ranking, tau, .. } => {
                let mse = squared_error(out, labels)?;
                if !*ranking {
                    return Ok(mse);
                }
                let tau = f64::from_bits(tau.load(std::sync::atomic::Ordering::Relaxed));
                let rank = super::scoring::listnet_loss(out, labels)?;
                Ok(((mse * tau)? + (rank * (1.0 - tau))?)?)
            }
            TaskHead::Tokens {
                label_smoothing, ..
            } => token_cross_entropy(out, labels, *label_smoothing),
        }
    }

    /// The smoothness divergence between outputs `a` and `b`: the symmetric
    /// KL of the fused op (gradients as `grad` says, rows reduced as
    /// `reduction` says, the op's expected incoming gradient `weight`) for
    /// classification; the mean squared error for regression (its
    /// gradient, 2(a − b)/B and the opposite, is what both gradient modes
    /// give there), times the number of rows B for `sum`. For token
    /// classification the rows are the tokens `[B, L]`, and `rows` (1 on
    /// labelled tokens) says which count: the mean is over them.
    pub fn divergence(
        &self,
        a: &Tensor,
        b: &Tensor,
        grad: SymKlGrad,
        reduction: Reduction,
        weight: f64,
        rows: Option<&Tensor>,
    ) -> Result<Tensor> {
        if let TaskHead::Regress(_) | TaskHead::Score { .. } = self {
            let mse = squared_error(a, b)?;
            return Ok(match reduction {
                Reduction::Sum => (mse * a.dim(0)? as f64)?,
                _ => mse,
            });
        }
        let opts = SymKlOptions {
            grad,
            reduction,
            expected_grad: weight as f32,
            row_mask: rows.cloned(),
        };
        sym_kl(a, b, &opts)
    }

    /// The loss an adversarial ascent climbs: KL(target ‖ adv) (batch
    /// mean; for tokens, the mean over the `rows` that count), or the
    /// squared error for regression.
    pub fn ascent_loss(
        &self,
        adv: &Tensor,
        target: &Tensor,
        rows: Option<&Tensor>,
    ) -> Result<Tensor> {
        match self {
            TaskHead::Classify { .. } | TaskHead::Tokens { .. } => {
                kl(adv, target, Reduction::BatchMean, rows)
            }
            TaskHead::Regress(_) | TaskHead::Score { .. } => squared_error(adv, target),
        }
    }

    /// Sets what depends on the epoch (0-based `epoch` of `epochs`): the
    /// score head's τ.
    pub fn at_epoch(&self, epoch: usize, epochs: usize) -> Result<()> {
        if let TaskHead::Score {
            ranking: true, tau, ..
        } = self
        {
            let t = super::scoring::r2bert_tau(epoch + 1, epochs)?;
            tau.store(t.to_bits(), std::sync::atomic::Ordering::Relaxed);
        }
        Ok(())
    }

    /// The rows a divergence counts for this batch's `labels`: for token
    /// classification the labelled tokens (1, else 0) `[B, L]`; every row
    /// (`None`) otherwise.
    pub fn divergence_rows(&self, labels: &Tensor) -> Result<Option<Tensor>> {
        Ok(match self {
            TaskHead::Tokens { .. } => Some(labels.ge(0.0)?.to_dtype(DType::F32)?),
            _ => None,
        })
    }

    /// What evaluation reads from one batch's outputs: class probabilities,
    /// or the one predicted value per example.
    pub fn predictions(&self, out: &Tensor) -> Result<Tensor> {
        let out = out.to_dtype(DType::F32)?;
        Ok(match self {
            TaskHead::Classify { .. } | TaskHead::Tokens { .. } => {
                candle_nn::ops::softmax_last_dim(&out)?
            }
            TaskHead::Regress(_) | TaskHead::Score { .. } => out.unsqueeze(1)?,
        })
    }

    /// The metrics of predictions against `ds`'s labels (or regression
    /// targets), and the reliability table for classification.
    pub fn metrics(
        &self,
        probs: &[Vec<f64>],
        ds: &Dataset,
    ) -> Result<(Eval, Option<metrics::Calibration>)> {
        if let TaskHead::Tokens { .. } = self {
            return Err(crate::error::param_err(
                "metrics",
                "token classification is scored per word (Run::evaluate), not per example",
            ));
        }
        let pred: Vec<f64> = probs.iter().map(|p| p[0]).collect();
        if let TaskHead::Score { levels, .. } = self {
            let top = (*levels - 1) as f64;
            let target: Vec<f64> = ds.examples.iter().map(|e| e.label as f64 / top).collect();
            let rated: Vec<i64> = pred
                .iter()
                .map(|p| (p.clamp(0.0, 1.0) * top).round() as i64)
                .collect();
            let truth: Vec<i64> = ds.examples.iter().map(|e| e.label as i64).collect();
            return Ok((
                Eval {
                    qwk: super::scoring::quadratic_weighted_kappa(&rated, &truth)
                        .unwrap_or(f64::NAN),
                    ..regression_eval(&pred, &target)?
                },
                None,
            ));
        }
        if let TaskHead::Regress(_) = self {
            let target: Vec<f64> = ds.examples.iter().map(|e| e.value).collect();
            return Ok((regression_eval(&pred, &target)?, None));
        }
        let labels: &[usize] = &ds.examples.iter().map(|e| e.label).collect::<Vec<_>>();
        let classes = ds.labels.len();
        let preds: Vec<usize> = probs.iter().map(|p| metrics::argmax(p)).collect();
        let cal = metrics::calibration(probs, labels, 15)?;
        Ok((
            Eval {
                accuracy: metrics::accuracy(&preds, labels)?,
                macro_f1: metrics::macro_f1(&preds, labels, classes)?,
                f1: if classes == 2 {
                    metrics::f1_positive(&preds, labels, 1)?
                } else {
                    f64::NAN
                },
                mcc: metrics::matthews(&preds, labels, classes)?,
                nll: metrics::nll(probs, labels)?,
                brier: metrics::brier(probs, labels)?,
                ece: cal.ece,
                confidence: cal.confidence(),
                ..Eval::undefined()
            },
            Some(cal),
        ))
    }
}

/// Token cross-entropy with label smoothing ε over logits `[B, L, C]` and
/// labels `[B, L]` (f32: the tag index, −1 where no label is: later
/// subwords, special tokens, padding): the mean over labelled positions.
pub fn token_cross_entropy(logits: &Tensor, labels: &Tensor, smoothing: f64) -> Result<Tensor> {
    let (b, l, c) = logits.dims3()?;
    let logp = candle_nn::ops::log_softmax(
        &logits.to_dtype(DType::F32)?.reshape((b * l, c))?,
        D::Minus1,
    )?;
    let labels = labels.to_dtype(DType::F32)?.reshape(b * l)?;
    let valid = labels.ge(0.0)?.to_dtype(DType::F32)?;
    let safe = labels.relu()?.to_dtype(DType::U32)?;
    let count = valid.sum_all()?.clamp(1.0, f64::INFINITY)?;
    let nll = logp.gather(&safe.unsqueeze(1)?, 1)?.squeeze(1)?.neg()?;
    let mut loss = (nll * &valid)?.sum_all()?;
    if smoothing > 0.0 {
        let uniform = (logp.mean(D::Minus1)?.neg()? * &valid)?.sum_all()?;
        loss = ((loss * (1.0 - smoothing))? + (uniform * smoothing)?)?;
    }
    Ok(loss.broadcast_div(&count)?)
}

/// Pearson, Spearman and mean squared error of predictions against
/// targets (every other metric undefined).
fn regression_eval(pred: &[f64], target: &[f64]) -> Result<Eval> {
    let mse = pred
        .iter()
        .zip(target)
        .map(|(p, t)| (p - t) * (p - t))
        .sum::<f64>()
        / pred.len() as f64;
    Ok(Eval {
        pearson: metrics::pearson(pred, target)?,
        spearman: metrics::spearman(pred, target)?,
        mse,
        ..Eval::undefined()
    })
}

/// Mean over the batch of `(a − b)²` (f32), for outputs `[B]`.
pub fn squared_error(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let d = (a.to_dtype(DType::F32)? - b.to_dtype(DType::F32)?)?;
    Ok(d.sqr()?.mean_all()?)
}

/// Mean cross-entropy with label smoothing ε: (1 − ε)·NLL + ε·mean(−log p).
pub fn cross_entropy(logits: &Tensor, labels: &Tensor, smoothing: f64) -> Result<Tensor> {
    let logp = candle_nn::ops::log_softmax(&logits.to_dtype(DType::F32)?, D::Minus1)?;
    let nll = logp
        .gather(&labels.unsqueeze(1)?, 1)?
        .squeeze(1)?
        .neg()?
        .mean_all()?;
    if smoothing == 0.0 {
        return Ok(nll);
    }
    let uniform = logp.mean(D::Minus1)?.neg()?.mean_all()?;
    Ok(((nll * (1.0 - smoothing))? + (uniform * smoothing)?)?)
}
