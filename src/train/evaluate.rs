//! Evaluation: predictions of a run's model on a dataset, the metrics its
//! task head computes from them, and the evaluation of a saved checkpoint.
use std::path::Path;

use candle_core::DType;
use serde::{Deserialize, Serialize};

use super::checkpoint;
use super::config::Metric;
use super::data::{Dataset, Split};
use super::metrics;
use super::run::Run;
use crate::error::{param_err, Error, Result};

/// f64 values that may be NaN (a metric undefined for the run, e.g. F1 of a
/// multi-class task or accuracy of a regression): JSON has no NaN, so it is
/// written as `null` and read back as NaN.
pub(crate) mod nan_as_null {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &f64, s: S) -> Result<S::Ok, S::Error> {
        if v.is_nan() {
            s.serialize_none()
        } else {
            s.serialize_f64(*v)
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
        Ok(Option::<f64>::deserialize(d)?.unwrap_or(f64::NAN))
    }
}

/// Evaluation results: the classification metrics (NaN for regression)
/// and the regression ones (NaN for classification; absent from older
/// summaries). Two evaluations are equal when every value has the same
/// bits (so NaN, "undefined", equals NaN).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Eval {
    #[serde(with = "nan_as_null")]
    /// Fraction of correct predictions.
    pub accuracy: f64,
    #[serde(with = "nan_as_null")]
    /// F1 averaged over classes.
    pub macro_f1: f64,
    #[serde(with = "nan_as_null")]
    /// F1 of the positive class (binary tasks; NaN otherwise).
    pub f1: f64,
    #[serde(with = "nan_as_null")]
    /// Matthews correlation coefficient.
    pub mcc: f64,
    #[serde(with = "nan_as_null")]
    /// Mean negative log-likelihood of the true class.
    pub nll: f64,
    #[serde(with = "nan_as_null")]
    /// Multiclass Brier score: mean over examples of Σ_k (p_k − 1[y = k])².
    pub brier: f64,
    #[serde(with = "nan_as_null")]
    /// Expected calibration error over 15 equal-width bins.
    pub ece: f64,
    /// Mean confidence (largest class probability); above the accuracy
    /// the model is over-confident, below it under-confident. Absent
    /// (null) in records written before it was added.
    #[serde(with = "nan_as_null", default = "nan")]
    pub confidence: f64,
    #[serde(with = "nan_as_null", default = "nan")]
    /// Pearson correlation of predictions and targets (regression).
    pub pearson: f64,
    #[serde(with = "nan_as_null", default = "nan")]
    /// Spearman rank correlation (regression).
    pub spearman: f64,
    #[serde(with = "nan_as_null", default = "nan")]
    /// Mean squared error (regression).
    pub mse: f64,
}

fn nan() -> f64 {
    f64::NAN
}

impl PartialEq for Eval {
    fn eq(&self, o: &Self) -> bool {
        let v = |e: &Eval| {
            [
                e.accuracy,
                e.macro_f1,
                e.f1,
                e.mcc,
                e.nll,
                e.brier,
                e.ece,
                e.confidence,
                e.pearson,
                e.spearman,
                e.mse,
            ]
            .map(f64::to_bits)
        };
        v(self) == v(o)
    }
}

impl Eval {
    /// Every metric NaN (undefined).
    pub(crate) fn undefined() -> Self {
        Self {
            accuracy: f64::NAN,
            macro_f1: f64::NAN,
            f1: f64::NAN,
            mcc: f64::NAN,
            nll: f64::NAN,
            brier: f64::NAN,
            ece: f64::NAN,
            confidence: f64::NAN,
            pearson: f64::NAN,
            spearman: f64::NAN,
            mse: f64::NAN,
        }
    }

    /// One line for logs: the classification or the regression metrics.
    pub fn brief(&self) -> String {
        if self.accuracy.is_nan() && !self.pearson.is_nan() {
            format!(
                "Pearson {:.4}, Spearman {:.4}, MSE {:.4}",
                self.pearson, self.spearman, self.mse
            )
        } else {
            format!(
                "accuracy {:.4}, ECE {:.4}, confidence {:.4}",
                self.accuracy, self.ece, self.confidence
            )
        }
    }

    /// The value of a selection metric.
    pub fn get(&self, m: Metric) -> f64 {
        match m {
            Metric::Accuracy => self.accuracy,
            Metric::MacroF1 => self.macro_f1,
            Metric::F1 => self.f1,
            Metric::Mcc => self.mcc,
            Metric::Pearson => self.pearson,
            Metric::Spearman => self.spearman,
        }
    }
}

impl Run {
    /// Class probabilities on a dataset (eval mode); for regression, one
    /// predicted value per example.
    pub fn predict(&self, ds: &Dataset) -> Result<Vec<Vec<f64>>> {
        let was = self.bert.stream.train();
        self.bert.stream.set_train(false);
        let mut out = Vec::with_capacity(ds.examples.len());
        let idx: Vec<usize> = (0..ds.examples.len()).collect();
        let result = (|| -> Result<()> {
            let model = self.model();
            for chunk in idx.chunks(64) {
                let b = self.batch(ds, chunk)?;
                let _cache = crate::upload_cache(&self.device);
                let logits = model.forward(&model.embed(&b)?, &b.mask)?;
                let p = self.head.predictions(&logits)?;
                out.extend(p.to_dtype(DType::F64)?.to_vec2::<f64>()?);
            }
            Ok(())
        })();
        self.bert.stream.set_train(was);
        result.map(|()| out)
    }

    /// Metrics on a dataset, and the reliability table (classification).
    pub fn evaluate(&self, ds: &Dataset) -> Result<(Eval, Option<metrics::Calibration>)> {
        let probs = self.predict(ds)?;
        let bad: Vec<usize> = (0..probs.len())
            .filter(|&i| probs[i].iter().any(|p| !p.is_finite()))
            .collect();
        if let Some(&first) = bad.first() {
            return Err(Error::NotFinite(format!(
                "the model's outputs are not finite for {} of {} examples (the first: \
                 example {first}, {:?}): its weights hold NaN or infinity",
                bad.len(),
                probs.len(),
                probs[first]
            )));
        }
        self.head.metrics(&probs, ds)
    }
}

/// Evaluates a `best/` checkpoint: rebuilds the run from the configuration
/// stored with it (base model, methods), loads the trained parameters and
/// evaluates on `split` of `task` (default: the checkpoint's task), or on
/// `file`, a data file in the columns of the checkpoint's own data files.
/// `base`: the base model, when it is not where the checkpoint records it.
pub fn evaluate_checkpoint(
    dir: &Path,
    task: Option<&str>,
    split: &str,
    data_dir: Option<&Path>,
    file: Option<&Path>,
    base: Option<&Path>,
) -> Result<Eval> {
    let run = checkpoint_run(dir, task, split.parse::<Split>()?, data_dir, file, base)?;
    Ok(run.evaluate(&run.eval)?.0)
}

/// One example's prediction: its label (or target) and the model's class
/// probabilities (or predicted value).
#[derive(Clone, Debug, Serialize)]
pub struct Prediction {
    /// The example's text.
    pub text: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    /// Its second text, for pair tasks.
    pub pair: Option<String>,
    /// The label's name (classification) or the target (regression).
    pub label: serde_json::Value,
    /// The most probable label (classification) or the predicted value.
    pub predicted: serde_json::Value,
    /// Class probabilities in label order (empty for regression).
    pub probabilities: Vec<f64>,
}

/// The predictions of a `best/` checkpoint on `file`, a data file in the
/// columns of the checkpoint's own data files.
/// `base`: the base model, when it is not where the checkpoint records it.
pub fn predict_checkpoint(dir: &Path, file: &Path, base: Option<&Path>) -> Result<Vec<Prediction>> {
    let run = checkpoint_run(dir, None, Split::Dev, None, Some(file), base)?;
    let probs = run.predict(&run.eval)?;
    let regression = run.cfg.head == super::task::HeadKind::Regression;
    Ok(run
        .eval
        .examples
        .iter()
        .zip(probs)
        .map(|(e, p)| {
            let (label, predicted, probabilities) = if regression {
                (e.value.into(), p[0].into(), vec![])
            } else {
                let best = p
                    .iter()
                    .enumerate()
                    .max_by(|a, b| a.1.total_cmp(b.1))
                    .map_or(0, |m| m.0);
                (
                    run.eval.labels[e.label].clone().into(),
                    run.eval.labels[best].clone().into(),
                    p,
                )
            };
            Prediction {
                text: e.text.clone(),
                pair: e.pair.clone(),
                label,
                predicted,
                probabilities,
            }
        })
        .collect())
}

/// The run of a `best/` checkpoint with its trained parameters, evaluating
/// on `split` of `task` (default: the checkpoint's) or on `file`.
fn checkpoint_run(
    dir: &Path,
    task: Option<&str>,
    split: Split,
    data_dir: Option<&Path>,
    file: Option<&Path>,
    base: Option<&Path>,
) -> Result<Run> {
    let rec = checkpoint::read_checkpoint(dir, base)?;
    let mut cfg = rec.cfg;
    cfg.eval_split = split;
    if let Some(t) = task {
        // Another task's data: the checkpoint's own files do not apply.
        if t != cfg.task {
            cfg.task = t.to_string();
            cfg.train_file = None;
            cfg.dev_file = None;
            cfg.test_file = None;
            cfg.text_column = None;
            cfg.text_pair_column = None;
            cfg.label_column = None;
            cfg.labels = None;
        }
    }
    if let Some(f) = file {
        if cfg.data_files().is_none() {
            return Err(param_err(
                "eval",
                format!(
                    "--file reads a file in the columns and labels of a run on its own data \
                     files, and this checkpoint was trained on the task {:?}",
                    cfg.task
                ),
            ));
        }
        cfg.dev_file = Some(f.to_path_buf());
        cfg.eval_split = Split::Dev;
        // The whole file: the run's evaluation subsample was of its own
        // dev file.
        cfg.eval_examples = None;
    }
    if data_dir.is_some() {
        cfg.data_dir = data_dir.map(Path::to_path_buf);
    }
    // Only the evaluation data is read: the checkpoint's labels size the
    // head, so the run's training data need not be there any more.
    let run = Run::for_checkpoint(cfg, rec.labels)?;
    checkpoint::load_params(&run, &dir.join("model.safetensors"))?;
    Ok(run)
}
