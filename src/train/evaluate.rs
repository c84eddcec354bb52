//! Evaluation: predictions of a run's model on a dataset, the metrics its
//! task head computes from them, and the evaluation of a saved checkpoint:
//! with its fitted temperature (`calibrate`), Monte-Carlo dropout,
//! misclassification detection and out-of-distribution detection against
//! other tasks' test sets.
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Tensor};
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
    #[serde(with = "nan_as_null", default = "nan")]
    /// Entity-level micro F1, seqeval's (token classification; `accuracy`
    /// is then the accuracy over words).
    pub entity_f1: f64,
    #[serde(with = "nan_as_null", default = "nan")]
    /// Entity-level micro precision (token classification).
    pub entity_precision: f64,
    #[serde(with = "nan_as_null", default = "nan")]
    /// Entity-level micro recall (token classification).
    pub entity_recall: f64,
    #[serde(with = "nan_as_null", default = "nan")]
    /// Quadratic weighted kappa of the rescaled integer scores (score head).
    pub qwk: f64,
    /// Entity F1 per type (token classification).
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub entity_f1_by_type: std::collections::BTreeMap<String, f64>,
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
                e.entity_f1,
                e.entity_precision,
                e.entity_recall,
                e.qwk,
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
            entity_f1: f64::NAN,
            entity_precision: f64::NAN,
            entity_recall: f64::NAN,
            qwk: f64::NAN,
            entity_f1_by_type: Default::default(),
        }
    }

    /// One line for logs: the classification or the regression metrics.
    pub fn brief(&self) -> String {
        if !self.entity_f1.is_nan() {
            format!(
                "entity F1 {:.4} (P {:.4}, R {:.4}), word accuracy {:.4}",
                self.entity_f1, self.entity_precision, self.entity_recall, self.accuracy
            )
        } else if !self.qwk.is_nan() {
            format!(
                "QWK {:.4}, Pearson {:.4}, Spearman {:.4}",
                self.qwk, self.pearson, self.spearman
            )
        } else if self.accuracy.is_nan() && !self.pearson.is_nan() {
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
            Metric::EntityF1 => self.entity_f1,
            Metric::Qwk => self.qwk,
        }
    }
}

impl Run {
    /// Class probabilities on a dataset (eval mode); for regression, one
    /// predicted value per example.
    pub fn predict(&self, ds: &Dataset) -> Result<Vec<Vec<f64>>> {
        self.predict_passes(ds, false, 1)
    }

    /// Monte-Carlo dropout (Gal & Ghahramani 2016): the class
    /// probabilities averaged over `passes` forward passes with dropout on
    /// (the fused dropout of every layer and of the head, drawn from the
    /// run's stream; a mixout run also samples its mixing).
    pub fn predict_sampled(&self, ds: &Dataset, passes: usize) -> Result<Vec<Vec<f64>>> {
        if passes == 0 {
            return Err(param_err("mc_dropout", "needs at least one pass"));
        }
        self.predict_passes(ds, true, passes)
    }

    fn predict_passes(&self, ds: &Dataset, dropout: bool, passes: usize) -> Result<Vec<Vec<f64>>> {
        if let super::task::TaskHead::Tokens { .. } = self.head {
            return Err(param_err(
                "predict",
                "per-example class probabilities: a token-classification run is evaluated by \
                 its entity scores (eval), and predict, calibrate, MC dropout, OOD detection and \
                 active learning take sentence tasks",
            ));
        }
        let was = self.bert.stream.train();
        self.bert.stream.set_train(dropout);
        let mut out = vec![vec![]; ds.examples.len()];
        let result = (|| -> Result<()> {
            let model = self.model();
            for chunk in by_length(ds).chunks(64) {
                let b = self.batch(ds, chunk)?;
                let _cache = crate::upload_cache(&self.device);
                // The passes are summed on the device: one read-back a chunk.
                let mut sum: Option<Tensor> = None;
                for _ in 0..passes {
                    let logits = model.forward(&model.embed(&b)?, &b.mask)?;
                    let p = self
                        .head
                        .predictions(&logits.detach())?
                        .to_dtype(DType::F64)?;
                    sum = Some(match sum {
                        None => p,
                        Some(s) => (s + p)?,
                    });
                }
                let sum = sum.ok_or_else(|| param_err("predict", "needs at least one pass"))?;
                let mean = if passes > 1 {
                    (sum / passes as f64)?
                } else {
                    sum
                };
                for (&i, row) in chunk.iter().zip(mean.to_vec2::<f64>()?) {
                    out[i] = row;
                }
            }
            Ok(())
        })();
        self.bert.stream.set_train(was);
        result.map(|()| out)
    }

    /// Metrics on a dataset, and the reliability table (classification).
    pub fn evaluate(&self, ds: &Dataset) -> Result<(Eval, Option<metrics::Calibration>)> {
        if let super::task::TaskHead::Tokens { .. } = self.head {
            return Ok((self.evaluate_tokens(ds)?, None));
        }
        let probs = self.predict(ds)?;
        check_finite(&probs)?;
        self.head.metrics(&probs, ds)
    }
}

impl Run {
    /// Token classification: each word's tag is the argmax at its first
    /// subword; the words truncation cut off are predicted `O` (their
    /// entities count as missed). Word accuracy, the NLL over the labelled
    /// subwords, entity precision, recall and F1 as seqeval computes them,
    /// and F1 per entity type.
    fn evaluate_tokens(&self, ds: &Dataset) -> Result<Eval> {
        Ok(self.tag(ds)?.0)
    }

    /// The token evaluation (see `evaluate`), and each sentence's predicted
    /// tags.
    pub fn tag(&self, ds: &Dataset) -> Result<(Eval, Vec<Vec<usize>>)> {
        let was = self.bert.stream.train();
        self.bert.stream.set_train(false);
        let result = (|| -> Result<(Eval, Vec<Vec<usize>>)> {
            let model = self.model();
            let o = ds.labels.iter().position(|l| l == "O").unwrap_or(0);
            let mut preds: Vec<Vec<usize>> = vec![vec![]; ds.examples.len()];
            let (mut nll, mut counted) = (0.0f64, 0usize);
            for chunk in by_length(ds).chunks(64) {
                let crate::model::WordBatch {
                    batch: b, word_ids, ..
                } = self.word_batch(ds, chunk)?;
                let _cache = crate::upload_cache(&self.device);
                let embeds = self.bert.forward_embeddings(&b.ids, Some(&b.token_types))?;
                let logits = model.forward(&embeds, &b.mask)?.to_dtype(DType::F32)?;
                let logp = candle_nn::ops::log_softmax(&logits, candle_core::D::Minus1)?;
                let best: Vec<Vec<u32>> = logp.argmax(candle_core::D::Minus1)?.to_vec2()?;
                let logp: Vec<Vec<Vec<f32>>> = logp.to_vec3()?;
                for (r, &i) in chunk.iter().enumerate() {
                    let tags = &ds.examples[i].tags;
                    let mut pred = vec![o; tags.len()];
                    let mut prev = None;
                    for (t, w) in word_ids[r].iter().enumerate() {
                        if let Some(w) = *w {
                            if prev != Some(w) && w < tags.len() {
                                pred[w] = best[r][t] as usize;
                                nll -= f64::from(logp[r][t][tags[w]]);
                                counted += 1;
                            }
                        }
                        prev = *w;
                    }
                    preds[i] = pred;
                }
            }
            if !nll.is_finite() {
                return Err(Error::NotFinite(format!(
                    "the model's token log-probabilities are not finite (NLL {nll}): its \
                     weights hold NaN or infinity"
                )));
            }
            let names = |v: &[usize]| v.iter().map(|&c| ds.labels[c].clone()).collect::<Vec<_>>();
            let truth: Vec<Vec<String>> = ds.examples.iter().map(|e| names(&e.tags)).collect();
            let pred: Vec<Vec<String>> = preds.iter().map(|p| names(p)).collect();
            let scores = super::ner::entity_scores(&truth, &pred)?;
            let words: usize = ds.examples.iter().map(|e| e.tags.len()).sum();
            let right: usize = ds
                .examples
                .iter()
                .zip(&preds)
                .map(|(e, p)| e.tags.iter().zip(p).filter(|(a, b)| a == b).count())
                .sum();
            Ok((
                Eval {
                    accuracy: right as f64 / words.max(1) as f64,
                    nll: nll / counted.max(1) as f64,
                    entity_f1: scores.micro.f1,
                    entity_precision: scores.micro.precision,
                    entity_recall: scores.micro.recall,
                    entity_f1_by_type: scores
                        .per_type
                        .iter()
                        .map(|(k, v)| (k.clone(), v.f1))
                        .collect(),
                    ..Eval::undefined()
                },
                preds,
            ))
        })();
        self.bert.stream.set_train(was);
        result
    }
}

/// The examples of `ds` shortest first (by characters, a proxy for
/// tokens), so that inference batches of neighbours pad little: the
/// padding of a batch of random lengths was most of an evaluation's work.
pub(crate) fn by_length(ds: &Dataset) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..ds.examples.len()).collect();
    idx.sort_by_key(|&i| {
        let e = &ds.examples[i];
        e.text.len() + e.pair.as_ref().map_or(0, String::len)
    });
    idx
}

/// An error naming the examples whose outputs are not finite.
fn check_finite(probs: &[Vec<f64>]) -> Result<()> {
    let bad: Vec<usize> = (0..probs.len())
        .filter(|&i| probs[i].iter().any(|p| !p.is_finite()))
        .collect();
    match bad.first() {
        None => Ok(()),
        Some(&first) => Err(Error::NotFinite(format!(
            "the model's outputs are not finite for {} of {} examples (the first: \
             example {first}, {:?}): its weights hold NaN or infinity",
            bad.len(),
            probs.len(),
            probs[first]
        ))),
    }
}

/// What `eval` does beyond the metrics of one deterministic pass.
#[derive(Clone, Debug)]
pub struct EvalOptions {
    /// Built-in tasks whose test sets are scored as out-of-distribution
    /// inputs against the evaluation split (e.g. `trec`, `snli`, `agnews`).
    pub ood: Vec<String>,
    /// Score at most this many examples of each OOD set (a seeded subsample).
    pub ood_examples: Option<usize>,
    /// Monte-Carlo dropout passes (1: one deterministic pass).
    pub mc_dropout: usize,
    /// Apply the temperature `calibrate` stored with the checkpoint, when
    /// it has one.
    pub temperature: bool,
    /// Write the confidence histograms (in-distribution and each OOD set)
    /// to this path stem (`.png` and `.svg`).
    pub plot: Option<PathBuf>,
    /// Token classification: entity F1 on this many random halves of the
    /// evaluation sentences, and the scores on mentions seen and unseen in
    /// training (0: neither).
    pub resplits: usize,
}

impl Default for EvalOptions {
    fn default() -> Self {
        Self {
            ood: vec![],
            ood_examples: None,
            mc_dropout: 1,
            temperature: true,
            plot: None,
            resplits: 0,
        }
    }
}

/// `eval`'s report: the metrics (at the top level, as [`Eval`]), how the
/// probabilities were made, and the detection scores.
#[derive(Clone, Debug, Serialize)]
pub struct EvalReport {
    /// The metrics of the evaluation split.
    #[serde(flatten)]
    pub eval: Eval,
    /// The temperature applied (from `calibrate`), if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub temperature: Option<f64>,
    /// The Monte-Carlo dropout passes averaged, when more than one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mc_dropout: Option<usize>,
    /// Misclassification detection by confidence (classification with both
    /// right and wrong predictions).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub misclassification: Option<metrics::Misclassification>,
    /// OOD detection by the largest probability, per OOD task.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub ood: BTreeMap<String, metrics::OodScores>,
    /// Token classification with `resplits`: the spread over re-splits and
    /// the seen / unseen mention scores.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ner_robustness: Option<super::ner::Robustness>,
}

/// The temperature fitted by `calibrate`, stored beside the checkpoint's
/// weights (`temperature.json`).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Temperature {
    /// The fitted temperature t (probabilities become softmax(z / t)).
    pub temperature: f64,
    /// What it was fitted on: the task and split, or the file.
    pub fitted_on: String,
    /// The examples it was fitted on.
    pub examples: usize,
    /// NLL before scaling.
    pub nll_before: f64,
    /// NLL after scaling.
    pub nll_after: f64,
    /// ECE (15 bins) before scaling.
    pub ece_before: f64,
    /// ECE after scaling.
    pub ece_after: f64,
    /// [`checkpoint::fingerprint`] of the weights it was fitted for: a
    /// checkpoint rewritten since (a resumed run's new best) does not
    /// inherit it.
    pub model_fingerprint: String,
}

/// The file `calibrate` writes into a checkpoint directory.
pub const TEMPERATURE_FILE: &str = "temperature.json";

/// Reads a checkpoint's stored temperature, if it has one; an error when
/// the file is unreadable or was fitted for other weights.
pub fn read_temperature(dir: &Path) -> Result<Option<Temperature>> {
    let path = dir.join(TEMPERATURE_FILE);
    if !path.exists() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(&path).map_err(|e| crate::error::io_err(&path, e))?;
    let t: Temperature =
        serde_json::from_str(&text).map_err(|e| crate::error::format_err(&path, e.to_string()))?;
    if t.model_fingerprint != checkpoint::fingerprint(dir)? {
        return Err(crate::error::format_err(
            &path,
            "was fitted for other weights than this checkpoint's model.safetensors (the \
             checkpoint was rewritten since): run `tunefuse calibrate` again, or pass \
             --no-temperature",
        ));
    }
    if !(t.temperature.is_finite() && t.temperature > 0.0) {
        return Err(crate::error::format_err(
            &path,
            format!(
                "temperature must be a finite number > 0, got {}",
                t.temperature
            ),
        ));
    }
    Ok(Some(t))
}

/// The temperature `eval` and `predict` apply to the run of checkpoint
/// `dir`: the stored one, for a classifier ([`read_temperature`]).
fn applied_temperature(run: &Run, dir: &Path) -> Result<Option<f64>> {
    if run.cfg.head != super::task::HeadKind::Classification {
        return Ok(None);
    }
    Ok(read_temperature(dir)?.map(|t| t.temperature))
}

/// Fits a temperature on `split` of the checkpoint's task (or `file`) and
/// stores it in the checkpoint directory (written atomically), where
/// `eval` applies it. Evaluating on the split it was fitted on measures
/// the fit, not calibration on new data: fit on dev, evaluate on test,
/// where the task has both.
pub fn calibrate_checkpoint(
    dir: &Path,
    split: &str,
    data_dir: Option<&Path>,
    file: Option<&Path>,
    base: Option<&Path>,
) -> Result<Temperature> {
    let run = checkpoint_run(dir, None, split.parse::<Split>()?, data_dir, file, base)?;
    if run.cfg.head != super::task::HeadKind::Classification {
        return Err(param_err(
            "calibrate",
            "temperature scaling applies to a classifier's probabilities; this checkpoint \
             regresses, scores or tags",
        ));
    }
    let probs = run.predict(&run.eval)?;
    check_finite(&probs)?;
    let labels: Vec<usize> = run.eval.examples.iter().map(|e| e.label).collect();
    let t = metrics::fit_temperature(&probs, &labels)?;
    let scaled = metrics::apply_temperature(&probs, t);
    let rec = Temperature {
        temperature: t,
        fitted_on: match file {
            Some(f) => f.display().to_string(),
            None => format!("{} {}", run.cfg.task, run.cfg.eval_split.name()),
        },
        examples: labels.len(),
        nll_before: metrics::nll(&probs, &labels)?,
        nll_after: metrics::nll(&scaled, &labels)?,
        ece_before: metrics::calibration(&probs, &labels, 15)?.ece,
        ece_after: metrics::calibration(&scaled, &labels, 15)?.ece,
        model_fingerprint: checkpoint::fingerprint(dir)?,
    };
    let text = serde_json::to_string_pretty(&rec).expect("serialisable");
    checkpoint::atomic_write(&dir.join(TEMPERATURE_FILE), text.as_bytes())?;
    Ok(rec)
}

/// Evaluates a `best/` checkpoint as [`evaluate_checkpoint`] does, with
/// `opts`: its stored temperature, Monte-Carlo dropout, misclassification
/// detection, OOD detection against other tasks' test sets (the
/// in-distribution side is the evaluation split; a pair of texts is read
/// as its first text by a model of single texts), confidence histograms.
#[allow(clippy::too_many_arguments)]
pub fn report_checkpoint(
    dir: &Path,
    task: Option<&str>,
    split: &str,
    data_dir: Option<&Path>,
    file: Option<&Path>,
    base: Option<&Path>,
    opts: &EvalOptions,
) -> Result<EvalReport> {
    let run = checkpoint_run(dir, task, split.parse::<Split>()?, data_dir, file, base)?;
    let classifies = run.cfg.head == super::task::HeadKind::Classification;
    let bad = |m: String| Err(param_err("eval", m));
    if run.cfg.head == super::task::HeadKind::Token {
        if opts.mc_dropout > 1 || !opts.ood.is_empty() || opts.plot.is_some() {
            return bad(
                "Monte-Carlo dropout, OOD detection and confidence plots score sentence \
                 classifiers; this checkpoint tags words"
                    .into(),
            );
        }
        let (eval, preds) = run.tag(&run.eval)?;
        let ner_robustness = if opts.resplits > 0 {
            let data = super::data::data_dir(run.cfg.data_dir.as_deref())?;
            let task: super::data::Task = run.cfg.task.parse()?;
            let train = super::data::load(&task, Split::Train, &data)?;
            let named = |ds: &Dataset, tags: &[usize]| {
                tags.iter()
                    .map(|&t| ds.labels[t].clone())
                    .collect::<Vec<_>>()
            };
            let seen = super::ner::mentions(
                &train
                    .examples
                    .iter()
                    .map(|e| (e.words.clone(), named(&train, &e.tags)))
                    .collect::<Vec<_>>(),
            );
            let ds = &run.eval;
            let words: Vec<Vec<String>> = ds.examples.iter().map(|e| e.words.clone()).collect();
            let truth: Vec<Vec<String>> = ds.examples.iter().map(|e| named(ds, &e.tags)).collect();
            let pred: Vec<Vec<String>> = preds.iter().map(|p| named(ds, p)).collect();
            Some(super::ner::robustness(
                &words,
                &truth,
                &pred,
                &seen,
                opts.resplits,
                run.cfg.seed,
            )?)
        } else {
            None
        };
        return Ok(EvalReport {
            eval,
            temperature: None,
            mc_dropout: None,
            misclassification: None,
            ood: BTreeMap::new(),
            ner_robustness,
        });
    }
    if opts.resplits > 0 {
        return bad(
            "--resplits analyses entity scores: it needs a token-classification checkpoint".into(),
        );
    }
    if !classifies && (opts.mc_dropout > 1 || !opts.ood.is_empty()) {
        return bad(
            "Monte-Carlo dropout and OOD detection score a classifier's probabilities; this \
             checkpoint regresses"
                .into(),
        );
    }
    if opts.mc_dropout == 0 {
        return bad("--mc-dropout needs at least one pass".into());
    }
    let temperature = if opts.temperature {
        applied_temperature(&run, dir)?
    } else {
        None
    };
    if temperature.is_some() && opts.mc_dropout > 1 {
        return bad(format!(
            "the checkpoint has a fitted temperature ({TEMPERATURE_FILE}) and Monte-Carlo \
             dropout was asked for: they are separate baselines; pass --no-temperature to \
             evaluate MC dropout"
        ));
    }
    let own = run.cfg.task.parse::<super::data::Task>().ok();
    // A model of single texts reads a pair task's examples as their first text.
    let single = run.eval.examples.iter().all(|e| e.pair.is_none());
    let mut sets = Vec::new();
    for name in &opts.ood {
        let task = name.parse::<super::data::Task>()?;
        if own.as_ref() == Some(&task) {
            return bad(format!(
                "--ood {name} is the checkpoint's own task: out-of-distribution data must \
                 come from another task"
            ));
        }
        let data = super::data::data_dir(run.cfg.data_dir.as_deref())?;
        let mut ds = super::data::load(&task, Split::Test, &data)?;
        if let Some(n) = opts.ood_examples {
            ds = ds.subsample(n, run.cfg.seed);
        }
        if ds.examples.is_empty() {
            return bad(format!("the OOD set {name} is empty"));
        }
        // Its labels are not the model's: every example is scored, none is
        // compared with a label.
        for e in &mut ds.examples {
            e.label = 0;
            if single {
                e.pair = None;
            }
        }
        ds.labels = run.eval.labels.clone();
        sets.push((name.clone(), ds));
    }
    let probs_of = |ds: &Dataset| -> Result<Vec<Vec<f64>>> {
        let p = if opts.mc_dropout > 1 {
            run.predict_sampled(ds, opts.mc_dropout)?
        } else {
            run.predict(ds)?
        };
        check_finite(&p)?;
        Ok(match temperature {
            Some(t) => metrics::apply_temperature(&p, t),
            None => p,
        })
    };
    let probs = probs_of(&run.eval)?;
    let (eval, _) = run.head.metrics(&probs, &run.eval)?;
    let labels: Vec<usize> = run.eval.examples.iter().map(|e| e.label).collect();
    let misclassification = if classifies {
        metrics::misclassification(&probs, &labels).ok()
    } else {
        None
    };
    let mut ood = BTreeMap::new();
    let mut hist: Vec<(String, Vec<f64>)> =
        vec![("in-distribution".into(), metrics::max_prob(&probs))];
    for (name, ds) in &sets {
        let p = probs_of(ds)?;
        ood.insert(
            name.clone(),
            metrics::ood_detection(&probs, &p, metrics::OodScore::MaxProb)?,
        );
        hist.push((name.clone(), metrics::max_prob(&p)));
    }
    if let Some(stem) = &opts.plot {
        let sets: Vec<(&str, &[f64])> = hist.iter().map(|(n, v)| (n.as_str(), &v[..])).collect();
        metrics::plot_histograms(stem, &sets, "confidence (largest probability)")?;
    }
    Ok(EvalReport {
        eval,
        temperature,
        mc_dropout: (opts.mc_dropout > 1).then_some(opts.mc_dropout),
        misclassification,
        ood,
        ner_robustness: None,
    })
}

/// Evaluates a `best/` checkpoint: rebuilds the run from the configuration
/// stored with it (base model, methods), loads the trained parameters and
/// evaluates on `split` of `task` (default: the checkpoint's task), or on
/// `file`, a data file in the columns of the checkpoint's own data files,
/// with the temperature `calibrate` stored with it (when it has one).
/// `base`: the base model, when it is not where the checkpoint records it.
pub fn evaluate_checkpoint(
    dir: &Path,
    task: Option<&str>,
    split: &str,
    data_dir: Option<&Path>,
    file: Option<&Path>,
    base: Option<&Path>,
) -> Result<Eval> {
    let opts = EvalOptions::default();
    Ok(report_checkpoint(dir, task, split, data_dir, file, base, &opts)?.eval)
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
/// columns of the checkpoint's own data files (with the temperature
/// `calibrate` stored with it, when it has one).
/// `base`: the base model, when it is not where the checkpoint records it.
pub fn predict_checkpoint(dir: &Path, file: &Path, base: Option<&Path>) -> Result<Vec<Prediction>> {
    let run = checkpoint_run(dir, None, Split::Dev, None, Some(file), base)?;
    let regression = matches!(
        run.cfg.head,
        super::task::HeadKind::Regression | super::task::HeadKind::Score
    );
    let mut probs = run.predict(&run.eval)?;
    if let Some(t) = applied_temperature(&run, dir)? {
        probs = metrics::apply_temperature(&probs, t);
    }
    Ok(run
        .eval
        .examples
        .iter()
        .zip(probs)
        .map(|(e, p)| {
            let (label, predicted, probabilities) = if regression {
                (e.value.into(), p[0].into(), vec![])
            } else {
                let best = metrics::argmax(&p);
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
pub(crate) fn checkpoint_run(
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
