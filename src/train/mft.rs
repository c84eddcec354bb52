//! `tunefuse mft`: the meta-learner of Meta Fine-Tuning (Wang et al.,
//! EMNLP 2020; reference alibaba/EasyTransfer `scripts/meta_finetune`),
//! trained on the pooled labelled data of several domains and written as a
//! model directory; each domain is then fine-tuned from it with plain
//! `finetune --model <dir>` (the reference: 6 epochs, no domain loss).
//!
//! **Typicality.** Before training, every example is embedded by the
//! pretrained encoder (BERT's pooler output, tanh(dense(\[CLS\])), where the
//! checkpoint has a pooler; the \[CLS\] hidden state otherwise). With
//! c\[d, y\] the mean embedding of domain d's examples of class y, an
//! example of domain d and class y weighs
//! `½·cos(e, c[d, y]) + ½·cos(e, mean_{d' ≠ d} c[d', y])` (the mean over
//! the other domains that have class y; the first term alone where none
//! has), unnormalised, as the reference computes it. The task loss is the
//! batch mean of weight × cross-entropy.
//!
//! **Domain corruption.** The hidden states of four layers (the reference's
//! blocks 2, 5, 8, 11 of 12: the last of each quarter of the depth, so
//! blocks 1, 2, 4, 5 of a 6-layer model) are mean-pooled, the example's
//! learned domain embedding is added, and one linear domain classifier,
//! shared by the layers, is trained towards the batch's domain labels in a
//! random permutation (drawn afresh per layer). Fitting random domains
//! pushes the layers towards carrying no domain information. The loss is
//! `weight` (0.1) × the mean over the layers of that cross-entropy, added to
//! the task loss; nothing is reversed.
//!
//! Departures from the reference: the mean pooling is over the real tokens
//! (the reference averages padding too), and the selection of layers is
//! scaled to the model's depth.
//!
//! The output directory holds the encoder (the task and domain heads are
//! not kept: each domain's fine-tuning starts its own head), the base's
//! configuration and tokenizer, and `mft.json` (settings, the typicality
//! weights' summary, the loss curve).
use std::path::PathBuf;
use std::time::Instant;

use candle_core::{DType, Tensor};
use candle_nn::VarMap;
use serde::{Deserialize, Serialize};

use super::callbacks::Event;
use super::config::{DeviceKind, Precision};
use super::data::{self, Split, Task};
use super::mlm::{self, Draws};
use super::optim::{AdamW, AdamWParams, Schedule};
use super::task::cross_entropy;
use crate::error::{param_err, Error, Result};
use crate::model::bert::{first_token, mean_pool};
use crate::model::{Bert, ClassifierHead, Dense, Outputs, Pooling, TextTokenizer};

/// The settings of a meta-learner run.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Settings {
    /// The model directory to start from.
    pub model: PathBuf,
    /// Where the meta-learner's model directory goes.
    pub output: PathBuf,
    /// The domains: classification tasks with the same labels
    /// (`amazon:books`, `amazon:dvd`, …); their training splits are pooled.
    pub domains: Vec<String>,
    /// The data folder (else `TUNEFUSE_DATA`).
    pub data_dir: Option<PathBuf>,
    /// Weight of the domain-corruption loss (the reference's 0.1).
    pub corruption_weight: f64,
    /// Weight examples by typicality (off: plain cross-entropy).
    pub typicality: bool,
    /// Passes over the pooled data (the reference: 2).
    pub epochs: usize,
    /// Examples per step.
    pub batch_size: usize,
    /// Peak learning rate (linear warm-up over 10 % of the steps, then
    /// linear decay).
    pub lr: f64,
    /// Learning rate of the new heads (task and domain classifiers, domain
    /// embeddings); `None`: `lr`.
    pub head_lr: Option<f64>,
    /// Tokens per input.
    pub max_len: usize,
    /// Use at most this many examples of each domain (a seeded draw).
    pub max_examples: Option<usize>,
    /// Seed of the shuffles, the permutations and the new parameters.
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

impl Default for Settings {
    fn default() -> Self {
        Self {
            model: PathBuf::new(),
            output: PathBuf::new(),
            domains: vec![],
            data_dir: None,
            corruption_weight: 0.1,
            typicality: true,
            epochs: 2,
            batch_size: 32,
            lr: 2e-5,
            head_lr: None,
            max_len: 128,
            max_examples: None,
            seed: 42,
            device: DeviceKind::Auto,
            precision: Precision::Auto,
            log_every: 20,
            overwrite: false,
        }
    }
}

/// What a run did (`mft.json`).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Report {
    /// The settings.
    pub settings: Settings,
    /// Examples per domain.
    pub examples: Vec<(String, usize)>,
    /// The encoder blocks (0-based) whose states the corruption loss reads.
    pub layers: Vec<usize>,
    /// Minimum, mean and maximum typicality weight.
    pub weights: (f64, f64, f64),
    /// (step, mean weighted task loss, mean corruption loss) per logged span.
    pub losses: Vec<(u64, f64, f64)>,
    /// Optimiser steps.
    pub steps: u64,
    /// Wall seconds.
    pub seconds: f64,
}

/// The blocks (0-based) the corruption loss reads in a model of `layers`
/// blocks: the last of each quarter of the depth (2, 5, 8, 11 of 12),
/// without repeats.
pub fn corruption_layers(layers: usize) -> Vec<usize> {
    let mut v: Vec<usize> = (1..=4)
        .map(|k| (layers * k).div_ceil(4).max(1) - 1)
        .collect();
    v.dedup();
    v
}

fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let (mut ab, mut aa, mut bb) = (0f64, 0f64, 0f64);
    for (x, y) in a.iter().zip(b) {
        let (x, y) = (*x as f64, *y as f64);
        ab += x * y;
        aa += x * x;
        bb += y * y;
    }
    if aa == 0.0 || bb == 0.0 {
        0.0
    } else {
        ab / (aa.sqrt() * bb.sqrt())
    }
}

/// Typicality weights (see the module docs) of examples with embeddings
/// `emb`, domains `domain` and classes `class`.
pub fn typicality(emb: &[Vec<f32>], domain: &[usize], class: &[usize]) -> Vec<f64> {
    let nd = 1 + domain.iter().max().copied().unwrap_or(0);
    let nc = 1 + class.iter().max().copied().unwrap_or(0);
    let w = emb.first().map_or(0, Vec::len);
    let mut sum = vec![vec![vec![0f64; w]; nc]; nd];
    let mut count = vec![vec![0usize; nc]; nd];
    for ((e, &d), &c) in emb.iter().zip(domain).zip(class) {
        count[d][c] += 1;
        for (s, v) in sum[d][c].iter_mut().zip(e) {
            *s += *v as f64;
        }
    }
    let centre = |d: usize, c: usize| -> Vec<f32> {
        sum[d][c]
            .iter()
            .map(|s| (s / count[d][c].max(1) as f64) as f32)
            .collect()
    };
    let mut own = vec![vec![vec![]; nc]; nd];
    let mut others: Vec<Vec<Option<Vec<f32>>>> = vec![vec![None; nc]; nd];
    for d in 0..nd {
        for c in 0..nc {
            own[d][c] = centre(d, c);
            let rest: Vec<Vec<f32>> = (0..nd)
                .filter(|&e| e != d && count[e][c] > 0)
                .map(|e| centre(e, c))
                .collect();
            if !rest.is_empty() {
                let m: Vec<f32> = (0..w)
                    .map(|i| rest.iter().map(|r| r[i]).sum::<f32>() / rest.len() as f32)
                    .collect();
                others[d][c] = Some(m);
            }
        }
    }
    emb.iter()
        .zip(domain)
        .zip(class)
        .map(|((e, &d), &c)| {
            let a = cosine(e, &own[d][c]);
            match &others[d][c] {
                Some(o) => 0.5 * a + 0.5 * cosine(e, o),
                None => a,
            }
        })
        .collect()
}

/// The batch's domain labels in a random order (Fisher–Yates on `draws`):
/// the corruption loss's targets, a permutation of `labels`.
pub fn shuffled(labels: &[u32], draws: &mut Draws) -> Vec<u32> {
    let mut perm = labels.to_vec();
    for i in (1..perm.len()).rev() {
        perm.swap(i, draws.below(i + 1));
    }
    perm
}

/// Trains the meta-learner (see the module docs); `on` receives progress.
pub fn meta_finetune(s: Settings, mut on: impl FnMut(Event<'_>)) -> Result<Report> {
    let bad = |k: &'static str, m: String| Err(param_err(k, m));
    if s.domains.len() < 2 {
        return bad(
            "domains",
            format!(
                "meta fine-tuning pools two domains or more, got {}",
                s.domains.len()
            ),
        );
    }
    if !(s.corruption_weight.is_finite() && s.corruption_weight >= 0.0) {
        return bad(
            "corruption_weight",
            format!("must be finite and ≥ 0, got {}", s.corruption_weight),
        );
    }
    if !(s.lr.is_finite() && s.lr > 0.0) || s.head_lr.is_some_and(|h| !(h.is_finite() && h > 0.0)) {
        return bad("lr", "learning rates must be finite and > 0".into());
    }
    if s.epochs == 0 || s.batch_size == 0 {
        return bad("epochs", "epochs and batch_size must be at least 1".into());
    }
    super::posttrain::refuse_nonempty(&s.output, s.overwrite)?;
    // The pooled examples: text, class, domain.
    let dir = data::data_dir(s.data_dir.as_deref())?;
    let mut labels: Option<Vec<String>> = None;
    let mut texts: Vec<(String, Option<String>)> = vec![];
    let (mut class, mut domain) = (vec![], vec![]);
    let mut counts = vec![];
    for (d, spec) in s.domains.iter().enumerate() {
        if s.domains[..d].contains(spec) {
            return bad("domains", format!("{spec} is listed twice"));
        }
        let task: Task = spec.parse()?;
        if task.is_token_task() {
            return bad(
                "domains",
                format!("{spec} is a token task: meta fine-tuning trains a sentence classifier"),
            );
        }
        let mut set = data::load(&task, Split::Train, &dir)?;
        match &labels {
            None => labels = Some(set.labels.clone()),
            Some(l) if *l != set.labels => {
                return bad(
                    "domains",
                    format!(
                        "{spec}'s labels {:?} differ from {}'s {l:?}: the domains must share \
                         their classes",
                        set.labels, s.domains[0]
                    ),
                )
            }
            Some(_) => {}
        }
        if let Some(n) = s.max_examples {
            set = set.subsample(n, s.seed ^ d as u64);
        }
        counts.push((spec.clone(), set.examples.len()));
        for e in set.examples {
            texts.push((e.text, e.pair));
            class.push(e.label);
            domain.push(d);
        }
    }
    let labels = labels.expect("two domains or more");
    if labels.len() < 2 {
        return bad(
            "domains",
            "the domains' task needs two classes or more".into(),
        );
    }
    let device = s.device.device()?;
    let varmap = VarMap::new();
    let (bert, tok) =
        mlm::load_encoder(&s.model, &varmap, &device, s.max_len, s.precision, s.seed)?;
    let layers = corruption_layers(bert.layers.len());
    let start = Instant::now();
    let n = texts.len();
    on(Event::Message(&format!(
        "meta fine-tuning on {n} examples of {} domains; corruption loss on blocks {layers:?}",
        s.domains.len()
    )));
    let weights = if s.typicality {
        on(Event::Message("typicality: embedding every example"));
        let emb = embed(&bert, &tok, &texts, &device)?;
        typicality(&emb, &domain, &class)
    } else {
        vec![1.0; n]
    };
    let wmin = weights.iter().copied().fold(f64::INFINITY, f64::min);
    let wmax = weights.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let wmean = weights.iter().sum::<f64>() / n as f64;
    let pretrained = super::params::snapshot(&varmap)?;
    let pooling = if bert.pooler.is_some() {
        Pooling::Pooler
    } else {
        Pooling::Cls
    };
    let h = bert.config.hidden_size;
    let nd = s.domains.len();
    let head = ClassifierHead::new(
        &varmap,
        h,
        labels.len(),
        pooling,
        bert.head,
        bert.config.hidden_dropout_prob,
        DType::F32,
        &device,
    )?;
    let vb = candle_nn::VarBuilder::from_varmap(&varmap, DType::F32, &device);
    let dom_head = Dense::new(&vb, "mft.domain", h, nd)?;
    let dom_emb = vb.get_with_hints(
        (nd, h),
        "mft.domain_embedding",
        candle_nn::Init::Randn {
            mean: 0.0,
            stdev: 0.02,
        },
    )?;
    super::params::init_new(&varmap, &pretrained, s.seed)?;
    let params = mlm::all_params(
        &varmap,
        &["classifier.", "mft."],
        s.lr,
        s.head_lr.unwrap_or(s.lr),
    );
    let mut opt = AdamW::new(
        params,
        AdamWParams {
            lr: s.lr,
            weight_decay: 0.01,
            ..Default::default()
        },
        None,
    )?;
    let schedule = Schedule::Linear { warmup: 0.1 };
    let total = (n.div_ceil(s.batch_size) * s.epochs) as u64;
    let mut draws = Draws::new(s.seed, 0x006d_6674);
    let (mut step, mut seen) = (0u64, 0usize);
    let mut losses = vec![];
    let mut pending: Vec<Tensor> = vec![];
    let want = Outputs {
        hidden_states: true,
        attentions: false,
    };
    bert.stream.set_train(true);
    for epoch in 0..s.epochs {
        let mut order: Vec<usize> = (0..n).collect();
        data::shuffle(&mut order, s.seed.wrapping_add(epoch as u64 * 0x9E37_79B9));
        for idx in order.chunks(s.batch_size) {
            if crate::interrupt::requested() {
                return Err(Error::Interrupted(format!(
                    "stopped by a signal after step {step} of {total}; nothing was written"
                )));
            }
            let batch: Vec<(&str, Option<&str>)> = idx
                .iter()
                .map(|&i| (texts[i].0.as_str(), texts[i].1.as_deref()))
                .collect();
            let b = tok.batch(&batch, &device)?;
            let out = bert.forward(&b.ids, Some(&b.token_types), &b.mask, want)?;
            let hs = out.hidden_states.expect("asked for");
            let logits = head.forward(&out.last_hidden, &b.mask, &bert.stream)?;
            let y = Tensor::from_vec(
                idx.iter().map(|&i| class[i] as u32).collect::<Vec<_>>(),
                idx.len(),
                &device,
            )?;
            let w = Tensor::from_vec(
                idx.iter().map(|&i| weights[i] as f32).collect::<Vec<_>>(),
                idx.len(),
                &device,
            )?;
            let logp = candle_nn::ops::log_softmax(&logits.to_dtype(DType::F32)?, 1)?;
            let ce = logp.gather(&y.unsqueeze(1)?, 1)?.squeeze(1)?.neg()?;
            let task = (ce * &w)?.mean_all()?;
            let d_ids: Vec<u32> = idx.iter().map(|&i| domain[i] as u32).collect();
            let d_t = Tensor::from_vec(d_ids.clone(), idx.len(), &device)?;
            let emb_rows = dom_emb.embedding(&d_t)?;
            let mut corrupt = Tensor::zeros((), DType::F32, &device)?;
            for &l in &layers {
                let pooled = mean_pool(&hs[l + 1], &b.mask)?.to_dtype(DType::F32)?;
                let x = (pooled + &emb_rows)?;
                let target = Tensor::from_vec(shuffled(&d_ids, &mut draws), idx.len(), &device)?;
                let l_ce = cross_entropy(&dom_head.forward(&x, &bert.stream)?, &target, 0.0)?;
                corrupt = (corrupt + l_ce)?;
            }
            let corrupt = (corrupt / layers.len() as f64)?;
            let loss = (&task + (&corrupt * s.corruption_weight)?)?;
            let lr = schedule.lr(s.lr, step, total);
            let mut grads = loss.backward()?;
            bert.stream.route_grads(&mut grads)?;
            opt.clip_and_step(&grads, lr, 1.0, &bert.stream)?;
            step += 1;
            seen += idx.len();
            pending.push(Tensor::stack(
                &[
                    task.detach().to_dtype(DType::F64)?,
                    corrupt.detach().to_dtype(DType::F64)?,
                ],
                0,
            )?);
            if step.is_multiple_of(s.log_every.max(1) as u64) || step == total {
                let vals = Tensor::stack(&pending, 0)?.to_vec2::<f64>()?;
                pending.clear();
                let k = vals.len() as f64;
                let (t, c) = (
                    vals.iter().map(|v| v[0]).sum::<f64>() / k,
                    vals.iter().map(|v| v[1]).sum::<f64>() / k,
                );
                if !(t.is_finite() && c.is_finite()) {
                    return Err(Error::NotFinite(format!(
                        "meta fine-tuning diverged by step {step} (losses {t}, {c}); nothing \
                         was written. Try a lower learning rate"
                    )));
                }
                losses.push((step, t, c));
                on(Event::Step {
                    step,
                    total,
                    epoch,
                    loss: Some(t),
                    lr,
                    examples_per_s: seen as f64 / start.elapsed().as_secs_f64().max(1e-9),
                    logged: true,
                });
            }
        }
    }
    let report = Report {
        settings: s.clone(),
        examples: counts,
        layers,
        weights: (wmin, wmean, wmax),
        losses,
        steps: step,
        seconds: start.elapsed().as_secs_f64(),
    };
    super::posttrain::write_model_dir(
        &s.output,
        &s.model,
        &varmap,
        bert.family,
        &["classifier.", "mft."],
        vec![],
        "Model",
        (
            "mft.json",
            serde_json::to_value(&report).expect("the report serialises"),
        ),
    )?;
    on(Event::Message(&format!(
        "wrote {} ({step} steps, {:.0} s)",
        s.output.display(),
        report.seconds
    )));
    Ok(report)
}

/// The typicality embedding of each text (dropout off): the pooler output
/// where the encoder has a pooler, the \[CLS\] hidden state otherwise.
fn embed(
    bert: &Bert,
    tok: &TextTokenizer,
    texts: &[(String, Option<String>)],
    device: &candle_core::Device,
) -> Result<Vec<Vec<f32>>> {
    let was = bert.stream.train();
    bert.stream.set_train(false);
    let mut order: Vec<usize> = (0..texts.len()).collect();
    order.sort_by_key(|&i| texts[i].0.len() + texts[i].1.as_ref().map_or(0, String::len));
    let mut out = vec![vec![]; texts.len()];
    let r = (|| -> Result<()> {
        for chunk in order.chunks(64) {
            let batch: Vec<(&str, Option<&str>)> = chunk
                .iter()
                .map(|&i| (texts[i].0.as_str(), texts[i].1.as_deref()))
                .collect();
            let b = tok.batch(&batch, device)?;
            let h = bert
                .forward(&b.ids, Some(&b.token_types), &b.mask, Outputs::default())?
                .last_hidden
                .detach();
            let v = match bert.pool(&h, &b.mask)? {
                Some(p) => p,
                None => first_token(&h)?,
            };
            for (&i, row) in chunk.iter().zip(v.to_dtype(DType::F32)?.to_vec2::<f32>()?) {
                out[i] = row;
            }
        }
        Ok(())
    })();
    bert.stream.set_train(was);
    r?;
    Ok(out)
}
