//! `tunefuse posttrain`: continued masked-LM training of a pretrained
//! encoder on unlabelled in-domain text, written out as a model directory
//! that any run starts from (`--model`).
//!
//! Two recipes of the fine-tuning literature are this loop with different
//! settings:
//! - **BERT-DAAT's post-training** (Du et al., ACL 2020): source and
//!   target text (two or more corpora, one domain each) with masked LM plus
//!   the domain-distinguishing task (`domain_task`): every input is a pair
//!   `[CLS] A [SEP] B` whose B comes from A's domain half of the time and
//!   from another domain otherwise, and a binary classifier on the pooled
//!   output predicts which; the loss is MLM + `domain_weight`·CE.
//! - **Tri-Train's pre-fine-tuning** (Zeng et al., Findings 2020): masked
//!   LM on in-domain sentences where only entity-candidate words can be
//!   chosen (probability rate × candidate), the candidates given per word in
//!   a file or found by distant labelling (see
//!   [`super::mlm::distant_candidates`]).
//!
//! One epoch is one pass over every text of the corpora (as the first
//! text of a pair with the domain task), in a seeded shuffle. The masking
//! is drawn afresh for each batch (dynamic masking). The output directory
//! holds `config.json` (the base's, with the family's masked-LM class as
//! its architecture), `model.safetensors` (the encoder and the masked-LM
//! head under transformers' names; the domain classifier is not kept), the
//! tokenizer files, and `posttrain.json` (the settings and the loss curve).
//! It is written once, atomically, at the end: an interrupted run leaves
//! nothing and is started again (there is no resume).
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{DType, Tensor};
use candle_nn::VarMap;
use serde::{Deserialize, Serialize};

use super::callbacks::Event;
use super::config::{DeviceKind, Precision};
use super::data::{self, Split, Task};
use super::mlm::{self, Draws, Masked, Masking, MlmBatch, MlmHead};
use super::optim::{AdamW, AdamWParams, Schedule};
use super::task::cross_entropy;
use crate::error::{format_err, io_err, param_err, Error, Result};
use crate::model::{Bert, ClassifierHead, Input, Outputs, Pooling};

/// One unlabelled text.
#[derive(Clone, Debug, PartialEq)]
pub enum Text {
    /// Raw text (split into words by the tokenizer).
    Raw(String),
    /// A sentence already split into words (a CoNLL file's).
    Words(Vec<String>),
}

impl Text {
    fn input(&self) -> Input<'_> {
        match self {
            Text::Raw(t) => Input::Text(t),
            Text::Words(w) => Input::Words(w),
        }
    }
}

/// The texts of one domain.
#[derive(Clone, Debug)]
pub struct Corpus {
    /// The spec it was read from.
    pub name: String,
    /// Its texts, in file order.
    pub texts: Vec<Text>,
}

/// Reads a corpus spec: a task of the data folder (`amazon:kitchen`,
/// `ner:ncbi-disease`, …) with an optional split after `@` (default
/// `train`), whose labels are dropped (a pair task gives both texts); or a
/// path to a text file, one text a line (blank lines skipped).
pub fn read_corpus(spec: &str, data_dir: Option<&Path>) -> Result<Corpus> {
    let path = Path::new(spec);
    let texts = if path.is_file() {
        let raw = std::fs::read(path).map_err(|e| io_err(path, e))?;
        let text =
            String::from_utf8(raw).map_err(|e| format_err(path, format!("not UTF-8: {e}")))?;
        text.trim_start_matches('\u{feff}')
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(|l| Text::Raw(l.to_string()))
            .collect()
    } else {
        let (task, split) = match spec.rsplit_once('@') {
            Some((t, s)) => (t, s.parse::<Split>()?),
            None => (spec, Split::Train),
        };
        let task: Task = task.parse().map_err(|e: Error| {
            param_err(
                "corpus",
                format!("{spec:?} is neither a file nor a task@split: {e}"),
            )
        })?;
        let dir = data::data_dir(data_dir)?;
        let set = data::load(&task, split, &dir)?;
        let mut out = vec![];
        for ex in set.examples {
            if !ex.words.is_empty() {
                out.push(Text::Words(ex.words));
            } else {
                out.push(Text::Raw(ex.text));
                if let Some(p) = ex.pair {
                    out.push(Text::Raw(p));
                }
            }
        }
        out
    };
    if texts.is_empty() {
        return Err(param_err("corpus", format!("{spec:?} holds no text")));
    }
    Ok(Corpus {
        name: spec.to_string(),
        texts,
    })
}

/// Which words masking may choose.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Candidates {
    /// Every word (BERT's masked LM).
    #[default]
    All,
    /// The words inside a span equal to an entity mention of this token
    /// task's training split (`ner:ncbi-disease`).
    Distant(String),
    /// Per-word 0/1 flags from this file (see
    /// [`super::mlm::read_candidates`]), in corpus order.
    File(PathBuf),
}

impl std::str::FromStr for Candidates {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        Ok(match s {
            "all" => Candidates::All,
            _ => match s.strip_prefix("distant:") {
                Some(t) => Candidates::Distant(t.to_string()),
                None if Path::new(s).is_file() => Candidates::File(PathBuf::from(s)),
                None => {
                    return Err(param_err(
                        "candidates",
                        format!(
                            "{s:?}: all, distant:<token task> (e.g. distant:ner:ncbi-disease), \
                             or an existing file of per-word 0/1 flags"
                        ),
                    ))
                }
            },
        })
    }
}

/// The settings of a post-training run.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Settings {
    /// The model directory to start from.
    pub model: PathBuf,
    /// Where the post-trained model directory goes.
    pub output: PathBuf,
    /// Corpus specs (see [`read_corpus`]), one domain each.
    pub corpora: Vec<String>,
    /// The data folder (else `TUNEFUSE_DATA`).
    pub data_dir: Option<PathBuf>,
    /// Which words masking may choose.
    pub candidates: Candidates,
    /// The probability of choosing a token (word).
    pub mask_rate: f64,
    /// Choose whole words.
    pub whole_word: bool,
    /// Adds BERT-DAAT's domain-distinguishing task (two corpora or more).
    pub domain_task: bool,
    /// Its weight in the loss.
    pub domain_weight: f64,
    /// Passes over the texts.
    pub epochs: usize,
    /// Texts per step.
    pub batch_size: usize,
    /// Peak learning rate (linear warm-up and decay).
    pub lr: f64,
    /// Peak learning rate of the new heads (the masked-LM head's transform
    /// and bias, the domain classifier); `None`: `lr`. A checkpoint without
    /// a masked-LM head (a sentence-embedding model) starts from a random
    /// one, whose first gradients are noise to the encoder: a higher rate
    /// here (1e-3, say) lets it learn before it steers the encoder.
    pub head_lr: Option<f64>,
    /// Steps at the start that train only the new heads, the encoder frozen
    /// (its embeddings, which are the masked-LM decoder, and its pooler too:
    /// no gradient is computed for them). A random
    /// masked-LM head's first gradients are noise that damages the encoder
    /// even at a higher head rate; warming the head up alone first avoids
    /// it. These steps have their own optimiser and linear schedule (peak
    /// `head_lr`); the rest of the run then starts the configured schedule
    /// afresh with every parameter. 0: none.
    #[serde(default)]
    pub head_warmup_steps: u64,
    /// A masked-LM head initialised here (the checkpoint has none) starts
    /// its decoder bias at the log unigram frequencies of the corpus's
    /// tokens (add-one smoothed), so its first predictions are the
    /// corpus's word frequencies rather than uniform over the vocabulary.
    #[serde(default = "yes")]
    pub prior_bias: bool,
    /// Fraction of the steps warming up.
    pub warmup: f64,
    /// AdamW's decoupled weight decay.
    pub weight_decay: f64,
    /// Gradient clipping by global norm (0: none).
    pub clip: f64,
    /// Tokens per input (pairs: both texts together).
    pub max_len: usize,
    /// Use at most this many texts of each corpus (a seeded draw).
    pub max_texts: Option<usize>,
    /// Seed of the shuffles, the masking and the new parameters.
    pub seed: u64,
    /// Where to compute.
    pub device: DeviceKind,
    /// The activations' dtype.
    pub precision: Precision,
    /// Report the loss every this many steps.
    pub log_every: usize,
    /// Replace a non-empty output directory.
    pub overwrite: bool,
}

/// The varmap prefixes of the new heads (the masked-LM head, the domain
/// classifier): trained at `head_lr`, not written as encoder weights.
const HEADS: [&str; 2] = ["mlm.", "classifier."];

fn yes() -> bool {
    true
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            model: PathBuf::new(),
            output: PathBuf::new(),
            corpora: vec![],
            data_dir: None,
            candidates: Candidates::All,
            mask_rate: 0.15,
            whole_word: false,
            domain_task: false,
            domain_weight: 1.0,
            epochs: 1,
            batch_size: 32,
            lr: 5e-5,
            head_lr: None,
            head_warmup_steps: 0,
            prior_bias: true,
            warmup: 0.1,
            weight_decay: 0.01,
            clip: 1.0,
            max_len: 128,
            max_texts: None,
            seed: 42,
            device: DeviceKind::Auto,
            precision: Precision::Auto,
            log_every: 20,
            overwrite: false,
        }
    }
}

impl Settings {
    /// Every setting in range and the inputs there; errors name the
    /// setting.
    pub fn validate(&self) -> Result<()> {
        Masking {
            rate: self.mask_rate,
            whole_word: self.whole_word,
        }
        .validate()?;
        let bad = |k: &'static str, m: String| Err(param_err(k, m));
        if self.corpora.is_empty() {
            return bad("corpus", "at least one corpus is needed".into());
        }
        if self.domain_task && self.corpora.len() < 2 {
            return bad(
                "domain_task",
                format!(
                    "the domain-distinguishing task needs two corpora or more (one per \
                     domain), got {}",
                    self.corpora.len()
                ),
            );
        }
        if !(self.domain_weight.is_finite() && self.domain_weight >= 0.0) {
            return bad(
                "domain_weight",
                format!("must be finite and ≥ 0, got {}", self.domain_weight),
            );
        }
        if self.epochs == 0 || self.batch_size == 0 {
            return bad("epochs", "epochs and batch_size must be at least 1".into());
        }
        if !(self.lr.is_finite() && self.lr > 0.0) {
            return bad("lr", format!("must be finite and > 0, got {}", self.lr));
        }
        if let Some(h) = self.head_lr {
            if !(h.is_finite() && h > 0.0) {
                return bad("head_lr", format!("must be finite and > 0, got {h}"));
            }
        }
        if !(0.0..1.0).contains(&self.warmup) {
            return bad("warmup", format!("must be in [0, 1), got {}", self.warmup));
        }
        if !(self.clip.is_finite() && self.clip >= 0.0) {
            return bad("clip", format!("must be finite and ≥ 0, got {}", self.clip));
        }
        if self.max_texts == Some(0) {
            return bad("max_texts", "must be at least 1".into());
        }
        if !self.model.join("config.json").is_file() {
            return Err(io_err(
                &self.model,
                "not a model directory (no config.json)",
            ));
        }
        Ok(())
    }
}

/// What a run did (also `posttrain.json` in the output directory).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Report {
    /// The settings.
    pub settings: Settings,
    /// Texts per corpus (after `max_texts`).
    pub texts: Vec<(String, usize)>,
    /// The fraction of words that are candidates (1 without candidates).
    pub candidate_words: f64,
    /// Whether the masked-LM head came from the base checkpoint (else it
    /// was initialised).
    pub head_loaded: bool,
    /// Optimiser steps.
    pub steps: u64,
    /// Tokens chosen for prediction, over all steps.
    pub predicted_tokens: u64,
    /// (step, mean masked-LM loss, mean domain loss) of each logged span.
    pub losses: Vec<(u64, f64, Option<f64>)>,
    /// Wall seconds.
    pub seconds: f64,
}

/// Post-trains `s.model` (see the module docs); `on` receives progress.
pub fn posttrain(s: Settings, mut on: impl FnMut(Event<'_>)) -> Result<Report> {
    s.validate()?;
    refuse_nonempty(&s.output, s.overwrite)?;
    // The texts, with their domain and per-word candidate flags.
    let mut texts: Vec<(usize, Text)> = vec![];
    let mut counts = vec![];
    for (d, spec) in s.corpora.iter().enumerate() {
        let mut c = read_corpus(spec, s.data_dir.as_deref())?;
        if let Some(n) = s.max_texts {
            data::shuffle(&mut c.texts, s.seed ^ d as u64);
            c.texts.truncate(n);
        }
        counts.push((c.name.clone(), c.texts.len()));
        texts.extend(c.texts.into_iter().map(|t| (d, t)));
    }
    let flags = candidate_flags(&s, &texts)?;
    let (cand, words) = flags.as_ref().map_or((1, 1), |f| {
        (
            f.iter().flatten().filter(|c| **c).count(),
            f.iter().map(Vec::len).sum::<usize>().max(1),
        )
    });
    let candidate_words = cand as f64 / words as f64;
    if flags.is_some() && cand == 0 {
        return Err(param_err(
            "candidates",
            "no word of the corpus is a candidate: nothing could be masked",
        ));
    }

    let device = s.device.device()?;
    let mut varmap = VarMap::new();
    let (mut bert, tok) =
        mlm::load_encoder(&s.model, &varmap, &device, s.max_len, s.precision, s.seed)?;
    let mask_id = tok.mask_id()?;
    let family = bert.family;
    mlm::checkpoint_names(family)?;
    let pretrained = super::params::snapshot(&varmap)?;
    let head = MlmHead::new(&varmap, &bert.config, &device)?;
    let domain_head = if s.domain_task {
        let pooling = if bert.pooler.is_some() {
            Pooling::Pooler
        } else {
            Pooling::Cls
        };
        Some(ClassifierHead::new(
            &varmap,
            bert.config.hidden_size,
            2,
            pooling,
            bert.head,
            bert.config.hidden_dropout_prob,
            DType::F32,
            &device,
        )?)
    } else {
        None
    };
    super::params::init_new(&varmap, &pretrained, s.seed)?;
    let head_loaded = mlm::load_head(&varmap, &s.model, family)?;
    if !head_loaded && s.prior_bias {
        let mut encoded = Vec::with_capacity(texts.len());
        for (_, t) in &texts {
            encoded.push(tok.encode_spans(t.input(), None)?);
        }
        let v = head.bias.elem_count();
        let prior = mlm::log_prior(&encoded, v);
        varmap.set_one(
            format!("{}.bias", mlm::PREFIX),
            Tensor::from_vec(prior, v, &device)?,
        )?;
    }
    on(Event::Message(&format!(
        "post-training on {} texts ({}); masked-LM head {}; {}",
        texts.len(),
        counts
            .iter()
            .map(|(n, c)| format!("{n}: {c}"))
            .collect::<Vec<_>>()
            .join(", "),
        if head_loaded {
            "from the checkpoint"
        } else if s.prior_bias {
            "initialised (the checkpoint has none), its bias at the corpus's log token frequencies"
        } else {
            "initialised (the checkpoint has none)"
        },
        if flags.is_some() {
            format!(
                "{:.1} % of the words are candidates",
                100.0 * candidate_words
            )
        } else {
            "every word a candidate".into()
        }
    )));
    let optimiser = |heads_only: bool| {
        let mut params = mlm::all_params(&varmap, &HEADS, s.lr, s.head_lr.unwrap_or(s.lr));
        if heads_only {
            params.retain(|p| HEADS.iter().any(|h| p.name.starts_with(h)));
        }
        AdamW::new(
            params,
            AdamWParams {
                lr: s.lr,
                weight_decay: s.weight_decay,
                ..Default::default()
            },
            None,
        )
    };
    let schedule = Schedule::Linear { warmup: s.warmup };
    let masking = Masking {
        rate: s.mask_rate,
        whole_word: s.whole_word,
    };
    let by_domain: Vec<Vec<usize>> = (0..s.corpora.len())
        .map(|d| (0..texts.len()).filter(|&i| texts[i].0 == d).collect())
        .collect();
    let per_epoch = texts.len().div_ceil(s.batch_size) as u64;
    let total = per_epoch * s.epochs as u64;
    let warm = s.head_warmup_steps;
    if warm >= total {
        return Err(param_err(
            "head_warmup_steps",
            format!(
                "{warm} head-only steps leave none for the encoder: the run has {total} \
                 ({} epoch(s) of {per_epoch})",
                s.epochs
            ),
        ));
    }
    let mut heads_only = warm > 0;
    let mut opt = optimiser(heads_only)?;
    if heads_only {
        bert.set_all_frozen(true)?;
        on(Event::Message(&format!(
            "the first {warm} steps train the heads alone (encoder frozen)"
        )));
    }
    let mut draws = Draws::new(s.seed, 0x006d_6c6d);
    let start = Instant::now();
    let (mut step, mut predicted, mut seen) = (0u64, 0u64, 0usize);
    let mut losses = vec![];
    let mut pending: Vec<Tensor> = vec![];
    bert.stream.set_train(true);
    for epoch in 0..s.epochs {
        let mut order: Vec<usize> = (0..texts.len()).collect();
        data::shuffle(&mut order, s.seed.wrapping_add(epoch as u64 * 0x9E37_79B9));
        for chunk in order.chunks(s.batch_size) {
            if crate::interrupt::requested() {
                return Err(Error::Interrupted(format!(
                    "stopped by a signal after step {step} of {total}; nothing was written \
                     (post-training has no resume: run it again)"
                )));
            }
            if heads_only && step >= warm {
                // The encoder joins with fresh moments for every parameter:
                // one optimiser step count for all keeps Adam's bias
                // correction right for parameters that start now.
                bert.set_all_frozen(false)?;
                opt = optimiser(false)?;
                heads_only = false;
                on(Event::Message(&format!(
                    "step {step}: head warm-up done, the encoder trains from here"
                )));
            }
            let mut rows: Vec<Masked> = Vec::with_capacity(chunk.len());
            let mut same: Vec<u32> = vec![];
            for &i in chunk {
                let (d, text) = &texts[i];
                let partner = if s.domain_task {
                    let want_same = draws.uniform() < 0.5;
                    let pool: Vec<usize> = if want_same {
                        by_domain[*d].clone()
                    } else {
                        (0..s.corpora.len())
                            .filter(|e| e != d)
                            .flat_map(|e| by_domain[e].clone())
                            .collect()
                    };
                    let j = pool[draws.below(pool.len())];
                    same.push(u32::from(texts[j].0 == *d));
                    Some(j)
                } else {
                    None
                };
                let enc = tok.encode_spans(text.input(), partner.map(|j| texts[j].1.input()))?;
                let members = [Some(i), partner];
                let is_candidate = |(q, w): (usize, usize)| match &flags {
                    None => true,
                    Some(f) => members[q]
                        .and_then(|m| f[m].get(w).copied())
                        .unwrap_or(false),
                };
                rows.push(mlm::mask(
                    &enc,
                    &is_candidate,
                    &masking,
                    mask_id,
                    tok.vocab_size(),
                    &mut draws,
                ));
            }
            let mb = MlmBatch::new(&tok, &rows, &device)?;
            predicted += mb.chosen as u64;
            let b = &mb.batch;
            let out = bert.forward(&b.ids, Some(&b.token_types), &b.mask, Outputs::default())?;
            let lm = mb.loss(&bert, &head, &out.last_hidden)?;
            let dom = match &domain_head {
                Some(h) => {
                    let logits = h.forward(&out.last_hidden, &b.mask, &bert.stream)?;
                    let labels = Tensor::from_vec(same, chunk.len(), &device)?;
                    Some(cross_entropy(&logits, &labels, 0.0)?)
                }
                None => None,
            };
            let zero = || Tensor::zeros((), DType::F32, &device);
            let loss = match (&lm, &dom) {
                (Some(l), Some(d)) => (l + (d * s.domain_weight)?)?,
                (Some(l), None) => l.clone(),
                (None, Some(d)) => (d * s.domain_weight)?,
                // No token chosen and no domain task: nothing to learn
                // from this batch.
                (None, None) => {
                    step += 1;
                    continue;
                }
            };
            let lr = if step < warm {
                schedule.lr(s.lr, step, warm)
            } else {
                schedule.lr(s.lr, step - warm, total - warm)
            };
            let mut grads = loss.backward()?;
            bert.stream.route_grads(&mut grads)?;
            let norm = opt.clip_and_step(&grads, lr, s.clip, &bert.stream)?;
            step += 1;
            seen += chunk.len();
            let lm_v = match &lm {
                Some(l) => l.detach(),
                None => zero()?,
            };
            let dom_v = match &dom {
                Some(d) => d.detach(),
                None => zero()?,
            };
            pending.push(Tensor::stack(
                &[
                    lm_v.to_dtype(DType::F64)?,
                    dom_v.to_dtype(DType::F64)?,
                    norm.to_dtype(DType::F64)?,
                    Tensor::new(f64::from(u8::from(lm.is_some())), &device)?,
                ],
                0,
            )?);
            if step.is_multiple_of(s.log_every.max(1) as u64) || step == total {
                let vals = Tensor::stack(&pending, 0)?.to_vec2::<f64>()?;
                pending.clear();
                let lm_n: f64 = vals.iter().map(|v| v[3]).sum();
                let lm_mean = vals.iter().map(|v| v[0]).sum::<f64>() / lm_n.max(1.0);
                let dom_mean = s
                    .domain_task
                    .then(|| vals.iter().map(|v| v[1]).sum::<f64>() / vals.len() as f64);
                if let Some(v) = vals
                    .iter()
                    .find(|v| !(v[0].is_finite() && v[1].is_finite() && v[2].is_finite()))
                {
                    return Err(Error::NotFinite(format!(
                        "post-training diverged by step {step}: loss {} / {}, gradient norm {}; \
                         nothing was written. Try a lower learning rate",
                        v[0], v[1], v[2]
                    )));
                }
                losses.push((step, lm_mean, dom_mean));
                on(Event::Step {
                    step,
                    total,
                    epoch,
                    loss: Some(lm_mean),
                    lr,
                    examples_per_s: seen as f64 / start.elapsed().as_secs_f64().max(1e-9),
                    logged: true,
                });
                if let Some(d) = dom_mean {
                    on(Event::Message(&format!(
                        "  step {step}: domain loss {d:.4}"
                    )));
                }
            }
        }
    }
    let report = Report {
        settings: s.clone(),
        texts: counts,
        candidate_words,
        head_loaded,
        steps: step,
        predicted_tokens: predicted,
        losses,
        seconds: start.elapsed().as_secs_f64(),
    };
    save(&s, &varmap, &bert, &report)?;
    on(Event::Message(&format!(
        "wrote {} ({} steps, {:.0} s)",
        s.output.display(),
        step,
        report.seconds
    )));
    Ok(report)
}

/// Refuses an output directory that exists and holds files, unless
/// `overwrite`.
pub(crate) fn refuse_nonempty(output: &Path, overwrite: bool) -> Result<()> {
    if output.exists()
        && !overwrite
        && std::fs::read_dir(output)
            .map_err(|e| io_err(output, e))?
            .next()
            .is_some()
    {
        return Err(io_err(
            output,
            "exists and is not empty: choose a new directory, or pass --overwrite to replace it",
        ));
    }
    Ok(())
}

/// Per-word candidate flags of every text (`None`: every word is one).
fn candidate_flags(s: &Settings, texts: &[(usize, Text)]) -> Result<Option<Vec<Vec<bool>>>> {
    if s.candidates == Candidates::All {
        return Ok(None);
    }
    let mut sentences = vec![];
    for (_, t) in texts {
        match t {
            Text::Words(w) => sentences.push(w.clone()),
            Text::Raw(_) => {
                return Err(param_err(
                    "candidates",
                    "entity candidates are per word: every corpus must be a token task's \
                     sentences (ner:…)",
                ))
            }
        }
    }
    Ok(Some(match &s.candidates {
        Candidates::All => unreachable!("handled above"),
        Candidates::File(p) => mlm::read_candidates(p, &sentences)?,
        Candidates::Distant(task) => {
            let t: Task = task.parse()?;
            if !t.is_token_task() {
                return Err(param_err(
                    "candidates",
                    format!("distant labelling reads entity mentions: {task} is not a token task"),
                ));
            }
            let dir = data::data_dir(s.data_dir.as_deref())?;
            let set = data::load(&t, Split::Train, &dir)?;
            let train: Vec<super::ner::Sentence> = set
                .examples
                .into_iter()
                .map(|e| super::ner::Sentence {
                    tags: e.tags.iter().map(|&i| set.labels[i].clone()).collect(),
                    words: e.words,
                })
                .collect();
            mlm::distant_candidates(&train, &sentences)
        }
    }))
}

/// Writes the output model directory atomically (see the module docs).
fn save(s: &Settings, varmap: &VarMap, bert: &Bert, report: &Report) -> Result<()> {
    let family = bert.family;
    write_model_dir(
        &s.output,
        &s.model,
        varmap,
        family,
        &HEADS,
        mlm::head_tensors(varmap, family)?,
        "ForMaskedLM",
        (
            "posttrain.json",
            serde_json::to_value(report).expect("the report serialises"),
        ),
    )
}

/// Writes a model directory that `--model` accepts, atomically: the
/// encoder's parameters of `varmap` (all but those under `skip`) under
/// `family`'s transformers names plus `extra` tensors, the base's
/// `config.json` with `architectures` the family's class with `class` in
/// place of `ForSequenceClassification` (`ForMaskedLM`, `Model`),
/// the base's tokenizer files, and a JSON report.
#[allow(clippy::too_many_arguments)]
pub(crate) fn write_model_dir(
    output: &Path,
    base: &Path,
    varmap: &VarMap,
    family: crate::model::Family,
    skip: &[&str],
    extra: Vec<(String, Tensor)>,
    class: &str,
    report: (&str, serde_json::Value),
) -> Result<()> {
    let body: Vec<(String, Tensor)> = {
        let data = varmap.data().lock().unwrap();
        let mut names: Vec<&String> = data
            .keys()
            .filter(|k| !skip.iter().any(|p| k.starts_with(p)))
            .collect();
        names.sort();
        names
            .into_iter()
            .map(|k| Ok((k.clone(), data[k].as_tensor().to_dtype(DType::F32)?)))
            .collect::<Result<_>>()?
    };
    let mut tensors = family.tensors_to_hf(body)?;
    tensors.extend(extra);
    let cfg_path = base.join("config.json");
    let text = std::fs::read_to_string(&cfg_path).map_err(|e| io_err(&cfg_path, e))?;
    let mut config: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| format_err(&cfg_path, format!("not JSON: {e}")))?;
    let arch = family
        .architecture()
        .replace("ForSequenceClassification", class);
    config["architectures"] = serde_json::json!([arch]);
    super::export::write_dir(
        output,
        base,
        &tensors,
        "model.safetensors",
        &[("config.json", config), report],
    )
}
