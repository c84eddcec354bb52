//! Pool-based active learning (Grießhaber, Maucher & Vu, COLING 2020):
//! start from `start` labelled examples of the training set (a seeded
//! draw), fine-tune from the pretrained weights, score the unlabelled pool
//! with an acquisition function, move the top `query` of it into the
//! labelled set (their labels are the training set's: a simulated
//! annotator), and repeat for `rounds` rounds.
//!
//! Every round trains a fresh model on the labelled set with the run's
//! configuration (any method, `freeze_layers` included) into
//! `<output>/round-NN`, and its dev metric is that of the final weights:
//! with a few hundred labels there is no held-out set to select on in a
//! real low-resource setting, so the curve does not select on dev either.
//! The same weights score the pool.
//!
//! `<output>/active.json` holds the settings, the labelled set and every
//! finished round (metrics, the acquired examples and their class balance),
//! written atomically after each round: an interrupted run resumes at the
//! start of the round it was in, and a finished one can be extended by
//! more rounds.
use std::path::{Path, PathBuf};
use std::str::FromStr;

use candle_core::{DType, Tensor};
use serde::{Deserialize, Serialize};

use super::callbacks::Event;
use super::checkpoint;
use super::config::Config;
use super::data::{self, Dataset};
use super::evaluate::{nan_as_null, Eval};
use super::metrics;
use super::plots::{plot_curves, Series};
use super::run::{self, Run};
use super::task::{HeadKind, TaskHead};
use crate::error::{io_err, param_err, Error, Result};
use crate::model::Outputs;

/// How the pool is scored: the examples with the highest scores are
/// acquired.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Strategy {
    /// A seeded uniform draw: the baseline every strategy is measured against.
    Random,
    /// 1 − max_c p(c): the least confident prediction first.
    LeastConfidence,
    /// −(p₁ − p₂), the gap between the two most probable classes: the
    /// smallest gap first.
    Margin,
    /// The entropy of the predicted distribution.
    Entropy,
    /// BALD (Houlsby et al. 2011) with Monte-Carlo dropout (Gal et al.
    /// 2017): the mutual information between the prediction and the
    /// weights, H(mean of p_t) − mean of H(p_t) over the stochastic passes.
    Bald,
}

impl Strategy {
    /// The name on the command line and in records.
    pub fn name(self) -> &'static str {
        match self {
            Strategy::Random => "random",
            Strategy::LeastConfidence => "least_confidence",
            Strategy::Margin => "margin",
            Strategy::Entropy => "entropy",
            Strategy::Bald => "bald",
        }
    }
}

impl FromStr for Strategy {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        Ok(match s {
            "random" => Strategy::Random,
            "least_confidence" | "least-confidence" => Strategy::LeastConfidence,
            "margin" => Strategy::Margin,
            "entropy" => Strategy::Entropy,
            "bald" => Strategy::Bald,
            _ => {
                return Err(param_err(
                    "strategy",
                    format!(
                        "unknown acquisition strategy {s:?}: random, least_confidence, \
                         margin, entropy or bald"
                    ),
                ))
            }
        })
    }
}

/// Where BALD's Monte-Carlo dropout draws its masks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum McScope {
    /// Only the head's dropout: the encoder's pooled features are computed
    /// once per example (eval mode) and only the head's dropout and linear
    /// layer run `passes` times, as Grießhaber et al. do to make BALD
    /// affordable on a large pool.
    Head,
    /// Every dropout of the encoder and the head: `passes` full forward
    /// passes.
    Full,
}

impl FromStr for McScope {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "head" => Ok(McScope::Head),
            "full" => Ok(McScope::Full),
            _ => Err(param_err(
                "mc_scope",
                format!("unknown Monte-Carlo dropout scope {s:?}: head or full"),
            )),
        }
    }
}

/// The settings of an active-learning run (the fine-tuning of each round is
/// the run's [`Config`]).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Settings {
    /// How the pool is scored.
    pub strategy: Strategy,
    /// Labelled examples before the first round (a seeded draw).
    pub start: usize,
    /// Examples acquired per round.
    pub query: usize,
    /// Acquisition rounds: the run trains `rounds + 1` models, on `start`,
    /// `start + query`, … `start + rounds·query` labels. Not part of what a
    /// resumed run must agree on: a finished run can be extended.
    pub rounds: usize,
    /// Score at most this many unlabelled examples a round (a seeded draw
    /// from the pool, new every round): Grießhaber et al. cap it at 20 000.
    pub pool_cap: Option<usize>,
    /// Stochastic passes of BALD (the paper's 50).
    pub passes: usize,
    /// Where BALD's dropout acts.
    pub scope: McScope,
}

impl Settings {
    /// Errors naming a setting that cannot run.
    pub fn validate(&self) -> Result<()> {
        if self.start == 0 {
            return Err(param_err(
                "start",
                "start = 0: active learning needs at least one labelled example to train \
                 its first model",
            ));
        }
        if self.query == 0 {
            return Err(param_err(
                "query",
                "query = 0 acquires nothing: a round needs at least one example",
            ));
        }
        if self.pool_cap == Some(0) {
            return Err(param_err(
                "pool_cap",
                "pool_cap = 0 leaves no example to score",
            ));
        }
        if self.strategy == Strategy::Bald && self.passes < 2 {
            return Err(param_err(
                "passes",
                format!(
                    "BALD measures disagreement between stochastic passes and needs at least \
                     2, got {}",
                    self.passes
                ),
            ));
        }
        if let Some(cap) = self.pool_cap {
            if self.query > cap {
                return Err(param_err(
                    "query",
                    format!(
                        "query = {} is larger than pool_cap = {cap}: a round cannot \
                         acquire more examples than it scores",
                        self.query
                    ),
                ));
            }
        }
        Ok(())
    }

    /// Whether a resumed run may continue under `other`: everything but the
    /// number of rounds agrees.
    fn agrees(&self, other: &Settings) -> bool {
        Settings {
            rounds: 0,
            ..self.clone()
        } == Settings {
            rounds: 0,
            ..other.clone()
        }
    }
}

/// One finished round.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Round {
    /// 0 for the model trained on the start set.
    pub round: usize,
    /// Labelled examples the round's model trained on.
    pub labels: usize,
    /// The selection metric of the final weights on the evaluation split.
    #[serde(with = "nan_as_null")]
    pub metric: f64,
    /// Every metric of the final weights.
    pub eval: Eval,
    /// Examples per class of the labelled set the round trained on.
    pub labelled_classes: Vec<usize>,
    /// Unlabelled examples scored (0 after the last round).
    pub pool: usize,
    /// The acquired examples, as indices into the training set, best first.
    pub acquired: Vec<usize>,
    /// Examples per class of the acquired ones.
    pub acquired_classes: Vec<usize>,
    /// Wall seconds of the round (training, evaluation, scoring).
    pub seconds: f64,
}

/// What `active.json` holds.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Record {
    /// The active-learning settings.
    pub settings: Settings,
    /// The fine-tuning configuration of every round (TOML, output and
    /// overwrite left out), which a resumed run must repeat.
    pub config: String,
    /// The selection metric's name.
    pub metric: String,
    /// The label names in index order.
    pub label_names: Vec<String>,
    /// Examples in the training set the labels are drawn from.
    pub train_examples: usize,
    /// The labelled set, as indices into the training set, in the order
    /// they were labelled (the start set first).
    pub labelled: Vec<usize>,
    /// The finished rounds.
    pub rounds: Vec<Round>,
}

impl Record {
    /// The learning curve: (labels, metric) of every finished round.
    pub fn curve(&self) -> Vec<(u64, f64)> {
        self.rounds
            .iter()
            .map(|r| (r.labels as u64, r.metric))
            .collect()
    }
}

/// Reads `<dir>/active.json`.
pub fn read_record(dir: &Path) -> Result<Record> {
    let path = dir.join("active.json");
    let text = std::fs::read_to_string(&path).map_err(|e| io_err(&path, e))?;
    serde_json::from_str(&text)
        .map_err(|e| io_err(&path, format!("not an active-learning record: {e}")))
}

/// BALD of one example from its stochastic passes' class probabilities:
/// H(mean) − mean H, clamped at 0 (it is non-negative by the concavity of
/// the entropy; rounding can leave a tiny negative value).
pub fn bald(passes: &[Vec<f64>]) -> f64 {
    if passes.is_empty() {
        return 0.0;
    }
    let classes = passes[0].len();
    let t = passes.len() as f64;
    let mean: Vec<f64> = (0..classes)
        .map(|c| passes.iter().map(|p| p[c]).sum::<f64>() / t)
        .collect();
    let h = |p: &[f64]| -> f64 {
        p.iter()
            .filter(|&&x| x > 0.0)
            .map(|&x| -x * x.ln())
            .sum::<f64>()
    };
    let expected = passes.iter().map(|p| h(p)).sum::<f64>() / t;
    (h(&mean) - expected).max(0.0)
}

/// The score of one example's class probabilities under an uncertainty
/// strategy (higher: acquired first). Random and BALD are not scored here.
pub fn uncertainty(strategy: Strategy, p: &[f64]) -> f64 {
    let mut sorted = p.to_vec();
    sorted.sort_by(|a, b| b.total_cmp(a));
    let top = sorted.first().copied().unwrap_or(0.0);
    match strategy {
        Strategy::LeastConfidence => 1.0 - top,
        Strategy::Margin => -(top - sorted.get(1).copied().unwrap_or(0.0)),
        _ => metrics::entropy(&[p.to_vec()])[0],
    }
}

/// The positions of the `q` highest scores, highest first; equal scores
/// in position order. A score that is not a number is an error (it would
/// sort arbitrarily).
pub fn top_q(scores: &[f64], q: usize) -> Result<Vec<usize>> {
    if let Some(i) = scores.iter().position(|s| s.is_nan()) {
        return Err(Error::NotFinite(format!(
            "the acquisition score of pool example {i} is NaN: the model's outputs are not \
             finite"
        )));
    }
    if q > scores.len() {
        return Err(param_err(
            "query",
            format!(
                "query = {q} is larger than the pool of {} unlabelled examples",
                scores.len()
            ),
        ));
    }
    let mut order: Vec<usize> = (0..scores.len()).collect();
    order.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]).then(a.cmp(&b)));
    order.truncate(q);
    Ok(order)
}

/// The unlabelled examples of a training set of `n` (ascending), at most
/// `cap` of them drawn by `seed`.
pub fn unlabelled_pool(n: usize, labelled: &[usize], cap: Option<usize>, seed: u64) -> Vec<usize> {
    let mut taken = vec![false; n];
    labelled.iter().for_each(|&i| taken[i] = true);
    let mut pool: Vec<usize> = (0..n).filter(|&i| !taken[i]).collect();
    if let Some(cap) = cap.filter(|&c| c < pool.len()) {
        data::shuffle(&mut pool, seed);
        pool.truncate(cap);
        pool.sort_unstable();
    }
    pool
}

impl Run {
    /// Per example of `ds`, the class probabilities of `passes` passes with
    /// dropout on: `[example][pass][class]`. With [`McScope::Head`] the
    /// encoder runs once in eval mode and only the head's dropout and
    /// linear layer are re-run. Regression heads have no class
    /// probabilities: an error.
    pub fn mc_samples(
        &self,
        ds: &Dataset,
        passes: usize,
        scope: McScope,
    ) -> Result<Vec<Vec<Vec<f64>>>> {
        let TaskHead::Classify { head, .. } = &self.head else {
            return Err(param_err(
                "mc_dropout",
                "Monte-Carlo dropout samples class probabilities, and this run regresses",
            ));
        };
        if passes == 0 {
            return Err(param_err("mc_dropout", "needs at least one pass"));
        }
        let s = &self.bert.stream;
        let was = s.train();
        let mut out = vec![vec![]; ds.examples.len()];
        let result = (|| -> Result<()> {
            let model = self.model();
            for chunk in super::evaluate::by_length(ds).chunks(64) {
                let b = self.batch(ds, chunk)?;
                let _cache = crate::upload_cache(&self.device);
                let mut passes_p: Vec<Tensor> = Vec::with_capacity(passes);
                match scope {
                    McScope::Head => {
                        s.set_train(false);
                        let h = self
                            .bert
                            .forward_from_embeddings(
                                &model.embed(&b)?,
                                &b.mask,
                                Outputs::default(),
                            )?
                            .last_hidden;
                        let pooled = head.pooled(&h, &b.mask, s)?.detach();
                        s.set_train(true);
                        for _ in 0..passes {
                            let logits = head.logits(&pooled, s)?;
                            passes_p.push(self.head.predictions(&logits.detach())?);
                        }
                    }
                    McScope::Full => {
                        s.set_train(true);
                        for _ in 0..passes {
                            let logits = model.forward(&model.embed(&b)?, &b.mask)?;
                            passes_p.push(self.head.predictions(&logits.detach())?);
                        }
                    }
                }
                // [B, passes, C], read back once a chunk.
                let all = Tensor::stack(&passes_p, 1)?.to_dtype(DType::F64)?;
                for (&i, rows) in chunk.iter().zip(all.to_vec3::<f64>()?) {
                    out[i] = rows;
                }
            }
            Ok(())
        })();
        s.set_train(was);
        result.map(|()| out)
    }

    /// The acquisition scores of `ds` under `strategy` (higher: acquired
    /// first); `seed` drives the random strategy.
    pub fn acquisition_scores(
        &self,
        ds: &Dataset,
        strategy: Strategy,
        passes: usize,
        scope: McScope,
        seed: u64,
    ) -> Result<Vec<f64>> {
        Ok(match strategy {
            Strategy::Random => (0..ds.examples.len())
                .map(|i| {
                    let w = crate::philox::group(seed, 1, i as u64);
                    f64::from(w[0]) / f64::from(u32::MAX)
                })
                .collect(),
            Strategy::Bald => self
                .mc_samples(ds, passes, scope)?
                .iter()
                .map(|p| bald(p))
                .collect(),
            s => {
                if !matches!(self.head, TaskHead::Classify { .. }) {
                    return Err(param_err(
                        "strategy",
                        format!(
                            "{} scores class probabilities, and this run regresses",
                            s.name()
                        ),
                    ));
                }
                self.predict(ds)?
                    .iter()
                    .map(|p| uncertainty(s, p))
                    .collect()
            }
        })
    }
}

/// The rounds' configuration as a resumed run must repeat it.
fn config_text(cfg: &Config) -> Result<String> {
    let mut c = cfg.clone();
    c.output = PathBuf::new();
    c.overwrite = false;
    c.to_toml()
}

/// Runs (or resumes) active learning with `cfg` for every round's
/// fine-tuning, writing into `cfg.output`; `on` receives progress.
pub fn active_learn(
    cfg: Config,
    settings: Settings,
    resume: bool,
    mut on: impl FnMut(Event<'_>),
) -> Result<Record> {
    let on: &mut dyn FnMut(Event<'_>) = &mut on;
    settings.validate()?;
    cfg.validate()?;
    if cfg.head != HeadKind::Classification {
        return Err(param_err(
            "head",
            "active learning scores class probabilities: it needs a classification head",
        ));
    }
    let out = cfg.output.clone();
    let state = out.join("active.json");
    let config = config_text(&cfg)?;
    let (train, eval) = run::load_sets(&cfg, None)?;
    let n = train.examples.len();
    let mut rec = if resume {
        let mut rec = read_record(&out)?;
        if !rec.settings.agrees(&settings) {
            return Err(param_err(
                "resume",
                format!(
                    "{} was written with other active-learning settings ({:?}) than these \
                     ({settings:?}); only --rounds may change on --resume",
                    state.display(),
                    rec.settings
                ),
            ));
        }
        if rec.config != config {
            return Err(param_err(
                "resume",
                format!(
                    "{} was written with another fine-tuning configuration: resume with the \
                     same flags (and config file), or start a new --output",
                    state.display()
                ),
            ));
        }
        if rec.train_examples != n {
            return Err(param_err(
                "resume",
                format!(
                    "{} drew its labels from {} training examples, and the training set now \
                     holds {n}",
                    state.display(),
                    rec.train_examples
                ),
            ));
        }
        on(Event::Message(&format!(
            "resuming active learning after round {} ({} labels)",
            rec.rounds.len().saturating_sub(1),
            rec.labelled.len()
        )));
        rec.settings.rounds = settings.rounds;
        // A finished run's last round acquired nothing: extended, it is
        // trained again (the same model: every draw is seeded) to score
        // the pool.
        if rec
            .rounds
            .last()
            .is_some_and(|r| r.acquired.is_empty() && r.round < settings.rounds)
        {
            rec.rounds.pop();
        }
        rec
    } else {
        if state.exists() && !cfg.overwrite {
            return Err(param_err(
                "output",
                format!(
                    "{} holds an active-learning run: continue it with --resume, choose \
                     another --output, or replace it with --overwrite",
                    out.display()
                ),
            ));
        }
        let mut order: Vec<usize> = (0..n).collect();
        data::shuffle(&mut order, cfg.seed ^ 0xac71_7e00);
        order.truncate(settings.start);
        Record {
            settings: settings.clone(),
            config,
            metric: cfg.metric.name().to_string(),
            label_names: train.labels.clone(),
            train_examples: n,
            labelled: order,
            rounds: vec![],
        }
    };
    let needed = settings.start + settings.rounds * settings.query;
    if needed > n {
        return Err(param_err(
            "rounds",
            format!(
                "start + rounds × query = {} + {} × {} = {needed} labels, and the training \
                 set of {} holds {n} examples: the pool of unlabelled examples runs out",
                settings.start, settings.rounds, settings.query, cfg.task
            ),
        ));
    }
    std::fs::create_dir_all(&out).map_err(|e| io_err(&out, e))?;
    let subset = |idx: &[usize]| Dataset {
        name: train.name.clone(),
        labels: train.labels.clone(),
        examples: idx.iter().map(|&i| train.examples[i].clone()).collect(),
    };
    let classes = |idx: &[usize]| subset(idx).class_counts();
    for r in rec.rounds.len()..=settings.rounds {
        let start = std::time::Instant::now();
        let mut rcfg = cfg.clone();
        rcfg.output = out.join(format!("round-{r:02}"));
        rcfg.overwrite = true;
        rcfg.train_examples = None;
        rcfg.k_per_class = None;
        // Only the final weights count: no evaluation (nor checkpoint) at
        // the end of the earlier epochs.
        rcfg.eval_epochs = false;
        let labelled = subset(&rec.labelled);
        on(Event::Message(&format!(
            "round {r}: fine-tuning on {} labels",
            labelled.examples.len()
        )));
        let mut run = Run::with_data(rcfg.clone(), labelled, eval.clone())?;
        let summary = run.fit(false, &mut *on).map_err(|e| match e {
            Error::Interrupted(_) => Error::Interrupted(format!(
                "active learning stopped during round {r}; {} holds the finished rounds: \
                 continue with --resume (the round starts again)",
                state.display()
            )),
            e => e,
        })?;
        let metric = summary.last.get(cfg.metric);
        let (pool_n, acquired) = if r < settings.rounds {
            let pool = unlabelled_pool(
                n,
                &rec.labelled,
                settings.pool_cap,
                cfg.seed.wrapping_add(r as u64) ^ 0x9001,
            );
            let pool_ds = subset(&pool);
            let scores = run.acquisition_scores(
                &pool_ds,
                settings.strategy,
                settings.passes,
                settings.scope,
                cfg.seed.wrapping_add(r as u64),
            )?;
            let best = top_q(&scores, settings.query)?;
            (pool.len(), best.iter().map(|&j| pool[j]).collect())
        } else {
            (0, vec![])
        };
        drop(run);
        let round = Round {
            round: r,
            labels: rec.labelled.len(),
            metric,
            eval: summary.last,
            labelled_classes: classes(&rec.labelled),
            pool: pool_n,
            acquired_classes: classes(&acquired),
            acquired,
            seconds: start.elapsed().as_secs_f64(),
        };
        on(Event::Message(&format!(
            "round {r}: {} labels, {} {metric:.4}; acquired {} of {} (classes {:?})",
            round.labels,
            rec.metric,
            round.acquired.len(),
            pool_n,
            round.acquired_classes
        )));
        rec.labelled.extend(&round.acquired);
        rec.rounds.push(round);
        checkpoint::atomic_write(
            &state,
            serde_json::to_string_pretty(&rec).unwrap().as_bytes(),
        )?;
        // An earlier round's weights are not needed again (its record is
        // kept): ten rounds of checkpoints would be ten model copies on
        // disk. The last round's stay, for use and inspection.
        for d in ["best", "last"].into_iter().filter(|_| r < settings.rounds) {
            let p = rcfg.output.join(d);
            if p.exists() {
                std::fs::remove_dir_all(&p).map_err(|e| io_err(&p, e))?;
            }
        }
    }
    let series = Series {
        name: String::new(),
        points: rec.curve().iter().map(|p| (p.0 as f64, p.1, 0.0)).collect(),
    };
    plot_curves(
        &out.join("curve"),
        &format!("{} by labels ({})", rec.metric, settings.strategy.name()),
        "labels",
        &[series],
    )?;
    Ok(rec)
}

/// The learning curve of one label over its seeds.
#[derive(Clone, Debug, Serialize)]
pub struct Curve {
    /// The runs' label (their folder name before `-s<seed>`).
    pub label: String,
    /// The strategy of its runs.
    pub strategy: Strategy,
    /// The selection metric's name.
    pub metric: String,
    /// The seeds pooled.
    pub seeds: Vec<u64>,
    /// Per label count: (labels, mean, sample std, runs that reached it).
    pub points: Vec<(usize, f64, f64, usize)>,
    /// Per label count, the mean share of each class among the acquired
    /// examples of the round that trained on it (empty after the last).
    pub acquired_share: Vec<Vec<f64>>,
}

/// The curves of the active-learning runs in `dirs`: each is a run folder
/// named `<label>-s<seed>` holding active.json, or a folder of them. The
/// seeds of a label are pooled, so they must share their settings (but
/// for the number of rounds).
pub fn collect_curves(dirs: &[PathBuf]) -> Result<Vec<Curve>> {
    let mut runs: Vec<(String, u64, PathBuf, Record)> = vec![];
    for dir in dirs {
        let folders: Vec<PathBuf> = if dir.join("active.json").is_file() {
            vec![dir.clone()]
        } else {
            let mut v = vec![];
            for e in std::fs::read_dir(dir).map_err(|e| io_err(dir, e))? {
                let p = e.map_err(|e| io_err(dir, e))?.path();
                if p.join("active.json").is_file() {
                    v.push(p);
                }
            }
            v
        };
        for path in folders {
            let name = path.file_name().unwrap_or_default().to_string_lossy();
            let (label, seed) = name
                .rsplit_once("-s")
                .and_then(|(l, s)| Some((l.to_string(), s.parse::<u64>().ok()?)))
                .ok_or_else(|| {
                    crate::error::format_err(
                        &path,
                        "active-learning run folders are named <label>-s<seed>",
                    )
                })?;
            let rec = read_record(&path)?;
            runs.push((label, seed, path, rec));
        }
    }
    if runs.is_empty() {
        return Err(param_err(
            "curves",
            format!("no active-learning run (active.json) in {dirs:?}"),
        ));
    }
    runs.sort_by(|a, b| (&a.0, a.1).cmp(&(&b.0, b.1)));
    let mut curves: Vec<Curve> = vec![];
    for group in runs.chunk_by(|a, b| a.0 == b.0) {
        let first = &group[0].3;
        for (_, seed, path, rec) in &group[1..] {
            if !rec.settings.agrees(&first.settings) || rec.metric != first.metric {
                return Err(crate::error::format_err(
                    &path.join("active.json"),
                    format!(
                        "its settings ({:?}, {}) differ from seed {}'s ({:?}, {}); runs of one \
                         label are pooled, so give another recipe another label",
                        rec.settings, rec.metric, group[0].1, first.settings, first.metric
                    ),
                ));
            }
            let _ = seed;
        }
        let mut counts: Vec<usize> = group
            .iter()
            .flat_map(|g| g.3.rounds.iter().map(|r| r.labels))
            .collect();
        counts.sort_unstable();
        counts.dedup();
        let classes = first.label_names.len();
        let mut points = vec![];
        let mut shares = vec![];
        for &c in &counts {
            let rounds: Vec<&Round> = group
                .iter()
                .filter_map(|g| g.3.rounds.iter().find(|r| r.labels == c))
                .collect();
            let vals: Vec<f64> = rounds.iter().map(|r| r.metric).collect();
            let (mean, std) = super::report::mean_std(&vals);
            points.push((c, mean, std, vals.len()));
            let mut share = vec![0.0; classes];
            let acquiring: Vec<&&Round> =
                rounds.iter().filter(|r| !r.acquired.is_empty()).collect();
            for r in &acquiring {
                for (k, &n) in r.acquired_classes.iter().enumerate() {
                    share[k] += n as f64 / r.acquired.len() as f64 / acquiring.len() as f64;
                }
            }
            shares.push(if acquiring.is_empty() { vec![] } else { share });
        }
        curves.push(Curve {
            label: group[0].0.clone(),
            strategy: first.settings.strategy,
            metric: first.metric.clone(),
            seeds: group.iter().map(|g| g.1).collect(),
            points,
            acquired_share: shares,
        });
    }
    Ok(curves)
}

/// A markdown table of the curves: one row per label count, one column
/// per label (mean ± std over its seeds, in %, for accuracy-like metrics).
pub fn curves_table(curves: &[Curve]) -> String {
    let mut counts: Vec<usize> = curves
        .iter()
        .flat_map(|c| c.points.iter().map(|p| p.0))
        .collect();
    counts.sort_unstable();
    counts.dedup();
    let mut t = String::from("| labels |");
    for c in curves {
        t.push_str(&format!(" {} ({} seeds) |", c.label, c.seeds.len()));
    }
    t.push_str("\n|---:|");
    t.push_str(&"---:|".repeat(curves.len()));
    t.push('\n');
    for n in counts {
        t.push_str(&format!("| {n} |"));
        for c in curves {
            match c.points.iter().find(|p| p.0 == n) {
                Some(&(_, m, sd, k)) if k > 1 => {
                    t.push_str(&format!(" {:.1} ± {:.1} |", 100.0 * m, 100.0 * sd))
                }
                Some(&(_, m, _, _)) => t.push_str(&format!(" {:.1} |", 100.0 * m)),
                None => t.push_str(" — |"),
            }
        }
        t.push('\n');
    }
    t
}

/// Writes the curves as JSON to `path` and plots them to the same stem
/// (.png, .svg).
pub fn write_curves(path: &Path, curves: &[Curve]) -> Result<()> {
    let json = path.with_extension("json");
    checkpoint::atomic_write(
        &json,
        serde_json::to_string_pretty(curves).unwrap().as_bytes(),
    )?;
    let series: Vec<Series> = curves
        .iter()
        .map(|c| Series {
            name: format!("{} ({} seeds)", c.label, c.seeds.len()),
            points: c.points.iter().map(|p| (p.0 as f64, p.1, p.2)).collect(),
        })
        .collect();
    let metric = curves.first().map_or("metric", |c| c.metric.as_str());
    plot_curves(path, &format!("{metric} by labels"), "labels", &series)
}
