//! Probing (Conneau et al. 2018; Mosbach et al. 2020, "On the Interplay
//! Between Fine-tuning and Sentence-Level Probing"): a linear classifier
//! trained on frozen per-layer sentence vectors (\[CLS\] and the mean over
//! real tokens) of the pretrained model and of a fine-tuned checkpoint,
//! and its test accuracy per layer.
//!
//! SentEval's probing files are read as they are (`tr|va|te`, tab, label,
//! tab, sentence). Where they are not at hand, three of its tasks are built
//! the way Conneau et al. define them, seeded, from any sentences (e.g. the
//! SST-2 and AG News texts of the data folder), keeping sentences of 5 to 28
//! whitespace-separated words:
//! - **SentLen**: the sentence's length in words, in Conneau et al.'s six
//!   bins 5–8, 9–12, 13–16, 17–20, 21–25, 26–28, balanced over the bins;
//! - **BShift**: half the sentences have two adjacent (different) words
//!   swapped at a random position (label `I`), the others are intact (`O`);
//! - **WC** (word content): `words` mid-frequency words (by default the 30
//!   ranked 300 to 329 among the sentences' lowercased alphabetic words of
//!   at least three letters; Conneau et al. take 1 000 ranked 2 000–3 000
//!   of a much larger corpus); the sentences that contain exactly one of
//!   them, labelled by that word, at most an equal share per word.
//!
//! The examples are shuffled by the seed and split into train, dev and test
//! in the asked proportions.
//!
//! The probe is multinomial logistic regression on standardised features
//! (the training split's mean and deviation), trained full-batch with Adam
//! (learning rate 0.01, L2 1e-4, 300 steps); the step with the best dev
//! accuracy (checked every 10 steps) gives the test accuracy.
use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor, D};
use serde::Serialize;

use super::data::{self, Split, Task};
use super::evaluate::checkpoint_run;
use crate::error::{format_err, io_err, param_err, Result};
use crate::model::bert::{first_token, mean_pool};
use crate::model::{Bert, Outputs, TextTokenizer};

/// Labelled sentences in three splits.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ProbeSet {
    /// The task's name.
    pub name: String,
    /// The label names in index order.
    pub labels: Vec<String>,
    /// (sentence, label index) for fitting the probe.
    pub train: Vec<(String, usize)>,
    /// For choosing the probe's training step.
    pub dev: Vec<(String, usize)>,
    /// For the reported accuracy.
    pub test: Vec<(String, usize)>,
}

/// A probing task built from sentences.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProbeTask {
    /// Length in words, six bins.
    SentLen,
    /// Two adjacent words swapped or not.
    BShift,
    /// Which of a fixed set of mid-frequency words the sentence contains.
    WordContent,
}

impl ProbeTask {
    /// The name on the command line and in reports.
    pub fn name(self) -> &'static str {
        match self {
            ProbeTask::SentLen => "sentlen",
            ProbeTask::BShift => "bshift",
            ProbeTask::WordContent => "wc",
        }
    }
}

impl std::str::FromStr for ProbeTask {
    type Err = crate::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "sentlen" => Ok(ProbeTask::SentLen),
            "bshift" => Ok(ProbeTask::BShift),
            "wc" | "word_content" => Ok(ProbeTask::WordContent),
            _ => Err(param_err(
                "probe",
                format!("unknown probing task {s:?}: sentlen, bshift or wc"),
            )),
        }
    }
}

/// Reads a SentEval probing file: one example a line, `tr`, `va` or `te`,
/// a tab, the label, a tab, the sentence. Labels are indexed in sorted
/// order.
pub fn read_senteval(path: &Path) -> Result<ProbeSet> {
    let text = std::fs::read_to_string(path).map_err(|e| io_err(path, e))?;
    let mut rows: Vec<(usize, String, String)> = vec![];
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let mut parts = line.splitn(3, '\t');
        let (tag, label, sentence) = match (parts.next(), parts.next(), parts.next()) {
            (Some(t), Some(l), Some(s)) => (t, l, s),
            _ => {
                return Err(format_err(
                    path,
                    format!("line {}: expected `tr|va|te<TAB>label<TAB>sentence`", i + 1),
                ))
            }
        };
        let split = match tag.trim() {
            "tr" => 0,
            "va" => 1,
            "te" => 2,
            t => {
                return Err(format_err(
                    path,
                    format!("line {}: unknown split tag {t:?} (tr, va or te)", i + 1),
                ))
            }
        };
        rows.push((split, label.trim().to_string(), sentence.trim().to_string()));
    }
    let mut labels: Vec<String> = rows.iter().map(|r| r.1.clone()).collect();
    labels.sort();
    labels.dedup();
    let mut set = ProbeSet {
        name: path
            .file_stem()
            .map_or("senteval".into(), |s| s.to_string_lossy().into_owned()),
        labels,
        ..Default::default()
    };
    for (split, label, sentence) in rows {
        let y = set.labels.binary_search(&label).expect("collected above");
        [&mut set.train, &mut set.dev, &mut set.test][split].push((sentence, y));
    }
    for (name, s) in [("tr", &set.train), ("va", &set.dev), ("te", &set.test)] {
        if s.is_empty() {
            return Err(format_err(path, format!("no `{name}` example")));
        }
    }
    if set.labels.len() < 2 {
        return Err(format_err(path, "a probing task needs at least two labels"));
    }
    Ok(set)
}

/// The texts of `tasks` (every split each has) in `dir`, for building
/// probing tasks: the first text of each example, duplicates removed, in
/// reading order.
pub fn task_sentences(tasks: &[Task], dir: &Path) -> Result<Vec<String>> {
    let mut seen = std::collections::HashSet::new();
    let mut out = vec![];
    for t in tasks {
        let mut any = false;
        for split in [Split::Train, Split::Dev, Split::Test] {
            // A split the task does not have is skipped; a file that is
            // there and unreadable is an error.
            let ds = match data::load(t, split, dir) {
                Ok(d) => d,
                Err(e) if e.to_string().contains("has no") => continue,
                Err(e) => return Err(e),
            };
            any = true;
            for e in ds.examples {
                if seen.insert(e.text.clone()) {
                    out.push(e.text);
                }
            }
        }
        if !any {
            return Err(param_err(
                "probe",
                format!("{t:?} has no split in {}", dir.display()),
            ));
        }
    }
    Ok(out)
}

const BINS: [(usize, usize); 6] = [(5, 8), (9, 12), (13, 16), (17, 20), (21, 25), (26, 28)];

/// Builds `task` from `sentences` (see the module docs): `sizes` =
/// (train, dev, test) examples asked for; fewer are taken, in the same
/// proportions, when the sentences do not allow as many.
pub fn build(
    task: ProbeTask,
    sentences: &[String],
    sizes: (usize, usize, usize),
    words: usize,
    seed: u64,
) -> Result<ProbeSet> {
    let total = sizes.0 + sizes.1 + sizes.2;
    if sizes.0 == 0 || sizes.1 == 0 || sizes.2 == 0 {
        return Err(param_err(
            "probe",
            format!("every split needs examples, asked for {sizes:?}"),
        ));
    }
    let mut pool: Vec<Vec<&str>> = sentences
        .iter()
        .map(|s| s.split_whitespace().collect::<Vec<_>>())
        .filter(|w| (5..=28).contains(&w.len()))
        .collect();
    data::shuffle(&mut pool, seed);
    let (labels, mut examples): (Vec<String>, Vec<(String, usize)>) = match task {
        ProbeTask::SentLen => {
            let labels = BINS.iter().map(|(a, b)| format!("{a}-{b}")).collect();
            let per = total.div_ceil(BINS.len());
            let mut taken = [0usize; 6];
            let ex = pool
                .iter()
                .filter_map(|w| {
                    let b = BINS
                        .iter()
                        .position(|(a, z)| (*a..=*z).contains(&w.len()))?;
                    taken[b] += 1;
                    (taken[b] <= per).then(|| (w.join(" "), b))
                })
                .collect::<Vec<_>>();
            // Balanced: as many of each bin as the rarest allows.
            let least = taken.iter().map(|&t| t.min(per)).min().unwrap_or(0);
            let mut kept = [0usize; 6];
            let ex = ex
                .into_iter()
                .filter(|(_, b)| {
                    kept[*b] += 1;
                    kept[*b] <= least
                })
                .collect();
            (labels, ex)
        }
        ProbeTask::BShift => {
            let mut ex = vec![];
            for (i, w) in pool.iter().enumerate().take(total) {
                let r = crate::philox::group(seed, 2, i as u64);
                if r[0] & 1 == 0 {
                    ex.push((w.join(" "), 0));
                    continue;
                }
                let places: Vec<usize> = (0..w.len() - 1).filter(|&j| w[j] != w[j + 1]).collect();
                if places.is_empty() {
                    continue;
                }
                let j = places[r[1] as usize % places.len()];
                let mut v = w.clone();
                v.swap(j, j + 1);
                ex.push((v.join(" "), 1));
            }
            (vec!["O".to_string(), "I".to_string()], ex)
        }
        ProbeTask::WordContent => {
            let word = |w: &str| -> Option<String> {
                let w = w.to_lowercase();
                (w.len() >= 3 && w.chars().all(|c| c.is_alphabetic())).then_some(w)
            };
            let mut freq: HashMap<String, usize> = HashMap::new();
            for s in &pool {
                for w in s.iter().filter_map(|w| word(w)) {
                    *freq.entry(w).or_default() += 1;
                }
            }
            let mut ranked: Vec<(String, usize)> = freq.into_iter().collect();
            ranked.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
            if words < 2 || ranked.len() < 300 + words {
                return Err(param_err(
                    "probe",
                    format!(
                        "word content takes the {words} words ranked 300 to {} by frequency, \
                         and the sentences hold {} distinct words (needs at least 2 words)",
                        299 + words,
                        ranked.len()
                    ),
                ));
            }
            let chosen: Vec<String> = ranked[300..300 + words]
                .iter()
                .map(|r| r.0.clone())
                .collect();
            let per = total.div_ceil(words);
            let mut taken = vec![0usize; words];
            let ex = pool
                .iter()
                .filter_map(|s| {
                    let hits: Vec<usize> = s
                        .iter()
                        .filter_map(|w| word(w))
                        .filter_map(|w| chosen.iter().position(|c| *c == w))
                        .collect();
                    let first = *hits.first()?;
                    if hits.iter().any(|&h| h != first) {
                        return None;
                    }
                    taken[first] += 1;
                    (taken[first] <= per).then(|| (s.join(" "), first))
                })
                .collect();
            (chosen, ex)
        }
    };
    data::shuffle(&mut examples, seed ^ 0x005e_7ea1);
    let n = examples.len().min(total);
    let scale = n as f64 / total as f64;
    let (tr, dv) = (
        (sizes.0 as f64 * scale) as usize,
        (sizes.1 as f64 * scale) as usize,
    );
    let te = n.saturating_sub(tr + dv);
    if tr < 2 || dv == 0 || te == 0 {
        return Err(param_err(
            "probe",
            format!(
                "the sentences give only {} examples of {} (from {} sentences of 5 to 28 \
                 words): too few to split",
                examples.len(),
                task.name(),
                pool.len()
            ),
        ));
    }
    examples.truncate(n);
    let test = examples.split_off(tr + dv);
    let dev = examples.split_off(tr);
    Ok(ProbeSet {
        name: task.name().to_string(),
        labels,
        train: examples,
        dev,
        test,
    })
}

/// A fitted probe's accuracies.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct ProbeFit {
    /// On the test split, at the step chosen on dev.
    pub test: f64,
    /// The best dev accuracy (the chosen step's).
    pub dev: f64,
}

/// Multinomial logistic regression of `y` on rows of `x` (see the module
/// docs), chosen on (`dx`, `dy`), scored on (`tx`, `ty`).
pub fn fit_probe(
    (x, y): (&Tensor, &[usize]),
    (dx, dy): (&Tensor, &[usize]),
    (tx, ty): (&Tensor, &[usize]),
    classes: usize,
) -> Result<ProbeFit> {
    let dev = x.device();
    let (x, dx, tx) = (
        x.to_dtype(DType::F32)?,
        dx.to_dtype(DType::F32)?,
        tx.to_dtype(DType::F32)?,
    );
    let (n, h) = x.dims2()?;
    let mean = x.mean_keepdim(0)?;
    let sd = x
        .broadcast_sub(&mean)?
        .sqr()?
        .mean_keepdim(0)?
        .sqrt()?
        .clamp(1e-6, f32::INFINITY)?;
    let norm = |t: &Tensor| -> Result<Tensor> { Ok(t.broadcast_sub(&mean)?.broadcast_div(&sd)?) };
    let (x, dx, tx) = (norm(&x)?, norm(&dx)?, norm(&tx)?);
    let onehot = {
        let mut v = vec![0f32; n * classes];
        for (i, &c) in y.iter().enumerate() {
            v[i * classes + c] = 1.0;
        }
        Tensor::from_vec(v, (n, classes), dev)?
    };
    let mut w = Tensor::zeros((h, classes), DType::F32, dev)?;
    let mut b = Tensor::zeros(classes, DType::F32, dev)?;
    let zeros = || -> Result<(Tensor, Tensor)> {
        Ok((
            Tensor::zeros((h, classes), DType::F32, dev)?,
            Tensor::zeros(classes, DType::F32, dev)?,
        ))
    };
    let ((mut mw, mut mb), (mut vw, mut vb)) = (zeros()?, zeros()?);
    let (lr, l2, b1, b2, eps) = (0.01f64, 1e-4f64, 0.9f64, 0.999f64, 1e-8f64);
    let accuracy = |t: &Tensor, labels: &[usize], w: &Tensor, b: &Tensor| -> Result<f64> {
        let pred: Vec<u32> = t
            .matmul(w)?
            .broadcast_add(b)?
            .argmax(D::Minus1)?
            .to_vec1()?;
        let right = pred
            .iter()
            .zip(labels)
            .filter(|(p, l)| **p as usize == **l)
            .count();
        Ok(right as f64 / labels.len().max(1) as f64)
    };
    let mut best = ProbeFit {
        test: f64::NAN,
        dev: -1.0,
    };
    for step in 1..=300 {
        let p = candle_nn::ops::softmax_last_dim(&x.matmul(&w)?.broadcast_add(&b)?)?;
        let g = ((p - &onehot)? / n as f64)?;
        let gw = (x.t()?.matmul(&g)? + (&w * l2)?)?;
        let gb = g.sum(0)?;
        let adam = |m: &mut Tensor, v: &mut Tensor, g: &Tensor| -> Result<Tensor> {
            *m = ((&*m * b1)? + (g * (1.0 - b1))?)?;
            *v = ((&*v * b2)? + (g.sqr()? * (1.0 - b2))?)?;
            let mh = (&*m / (1.0 - b1.powi(step)))?;
            let vh = (&*v / (1.0 - b2.powi(step)))?;
            Ok(((mh / (vh.sqrt()? + eps)?)? * lr)?)
        };
        w = (&w - adam(&mut mw, &mut vw, &gw)?)?;
        b = (&b - adam(&mut mb, &mut vb, &gb)?)?;
        if step % 10 == 0 {
            let d = accuracy(&dx, dy, &w, &b)?;
            if d > best.dev {
                best = ProbeFit {
                    dev: d,
                    test: accuracy(&tx, ty, &w, &b)?,
                };
            }
        }
    }
    Ok(best)
}

/// Per layer (0: the embeddings output), the \[CLS\] and mean-pooled
/// sentence vectors `[n, H]` of `texts` under `bert` (eval mode).
fn layer_features(
    bert: &Bert,
    tok: &TextTokenizer,
    texts: &[&str],
    device: &Device,
) -> Result<Vec<(Tensor, Tensor)>> {
    let was = bert.stream.train();
    bert.stream.set_train(false);
    let want = Outputs {
        hidden_states: true,
        attentions: false,
    };
    let mut order: Vec<usize> = (0..texts.len()).collect();
    order.sort_by_key(|&i| texts[i].len());
    let result = (|| -> Result<Vec<(Tensor, Tensor)>> {
        let mut parts: Vec<(Vec<Tensor>, Vec<Tensor>)> = vec![];
        for chunk in order.chunks(64) {
            let batch: Vec<(&str, Option<&str>)> =
                chunk.iter().map(|&i| (texts[i], None)).collect();
            let b = tok.batch(&batch, device)?;
            let out = bert.forward(&b.ids, Some(&b.token_types), &b.mask, want)?;
            let hs = out.hidden_states.expect("asked for");
            if parts.is_empty() {
                parts = vec![(vec![], vec![]); hs.len()];
            }
            for (l, h) in hs.iter().enumerate() {
                // Detached: a kept vector would otherwise keep the graph of
                // every chunk's forward (its activations) alive.
                let h = &h.detach();
                parts[l].0.push(first_token(h)?.to_dtype(DType::F32)?);
                parts[l]
                    .1
                    .push(mean_pool(h, &b.mask)?.to_dtype(DType::F32)?);
            }
        }
        // Back to the texts' order.
        let mut inverse = vec![0u32; order.len()];
        for (pos, &i) in order.iter().enumerate() {
            inverse[i] = pos as u32;
        }
        let inverse = Tensor::new(inverse.as_slice(), device)?;
        parts
            .into_iter()
            .map(|(c, m)| {
                Ok((
                    Tensor::cat(&c, 0)?.index_select(&inverse, 0)?,
                    Tensor::cat(&m, 0)?.index_select(&inverse, 0)?,
                ))
            })
            .collect()
    })();
    bert.stream.set_train(was);
    result
}

/// One layer's probe accuracies (test split).
#[derive(Clone, Copy, Debug, Serialize)]
pub struct ProbeLayer {
    /// 0: the embeddings output; l: encoder layer l.
    pub layer: usize,
    /// On the \[CLS\] vector.
    pub cls: f64,
    /// On the mean over real tokens.
    pub mean: f64,
}

/// A probing task run on a checkpoint and its base.
#[derive(Clone, Debug, Serialize)]
pub struct ProbeReport {
    /// The task's name.
    pub task: String,
    /// Its labels.
    pub classes: usize,
    /// Examples in train, dev and test.
    pub sizes: (usize, usize, usize),
    /// Test accuracy of always answering the training split's most
    /// frequent label.
    pub majority: f64,
    /// The pretrained model's layers.
    pub pretrained: Vec<ProbeLayer>,
    /// The fine-tuned checkpoint's layers.
    pub fine_tuned: Vec<ProbeLayer>,
}

/// Probes every layer of the `best/` checkpoint `dir` and of its base on
/// `set`. `data_dir`: the data folder, when not the one the checkpoint
/// records; `base`: the base model, when it has moved.
pub fn probe_checkpoint(
    dir: &Path,
    set: &ProbeSet,
    data_dir: Option<&Path>,
    base: Option<&Path>,
) -> Result<ProbeReport> {
    let run = checkpoint_run(dir, None, Split::Dev, data_dir, None, base)?;
    let varmap = candle_nn::VarMap::new();
    let pre = Bert::from_pretrained(&run.cfg.model, &varmap, DType::F32, &run.device)?;
    fn texts(s: &[(String, usize)]) -> Vec<&str> {
        s.iter().map(|e| e.0.as_str()).collect()
    }
    let labels = |s: &[(String, usize)]| s.iter().map(|e| e.1).collect::<Vec<_>>();
    let (ytr, ydv, yte) = (labels(&set.train), labels(&set.dev), labels(&set.test));
    let mut counts = vec![0usize; set.labels.len()];
    ytr.iter().for_each(|&y| counts[y] += 1);
    let top = (0..counts.len()).max_by_key(|&c| counts[c]).unwrap_or(0);
    let majority = yte.iter().filter(|&&y| y == top).count() as f64 / yte.len().max(1) as f64;
    let probe = |bert: &Bert| -> Result<Vec<ProbeLayer>> {
        let f = |s| layer_features(bert, &run.tok, &texts(s), &run.device);
        let (ftr, fdv, fte) = (f(&set.train)?, f(&set.dev)?, f(&set.test)?);
        (0..ftr.len())
            .map(|l| {
                let fit = |pick: fn(&(Tensor, Tensor)) -> &Tensor| {
                    fit_probe(
                        (pick(&ftr[l]), &ytr),
                        (pick(&fdv[l]), &ydv),
                        (pick(&fte[l]), &yte),
                        set.labels.len(),
                    )
                };
                Ok(ProbeLayer {
                    layer: l,
                    cls: fit(|p| &p.0)?.test,
                    mean: fit(|p| &p.1)?.test,
                })
            })
            .collect()
    };
    Ok(ProbeReport {
        task: set.name.clone(),
        classes: set.labels.len(),
        sizes: (set.train.len(), set.dev.len(), set.test.len()),
        majority,
        pretrained: probe(&pre)?,
        fine_tuned: probe(&run.bert)?,
    })
}

/// Writes a report into `dir`: `<task>.json`, `<task>.csv` (layer, then the
/// pretrained and fine-tuned \[CLS\] and mean accuracies) and `<task>.png` /
/// `.svg` (the four curves by layer, the majority baseline's line).
pub fn write_probe(dir: &Path, r: &ProbeReport) -> Result<()> {
    use super::checkpoint::atomic_write;
    use super::plots::{plot_curves, Series};
    std::fs::create_dir_all(dir).map_err(|e| io_err(dir, e))?;
    let stem = dir.join(&r.task);
    atomic_write(
        &stem.with_extension("json"),
        serde_json::to_string_pretty(r).unwrap().as_bytes(),
    )?;
    let mut csv =
        String::from("layer,pretrained_cls,pretrained_mean,fine_tuned_cls,fine_tuned_mean\n");
    for (p, f) in r.pretrained.iter().zip(&r.fine_tuned) {
        csv.push_str(&format!(
            "{},{},{},{},{}\n",
            p.layer, p.cls, p.mean, f.cls, f.mean
        ));
    }
    atomic_write(&stem.with_extension("csv"), csv.as_bytes())?;
    let series = |name: &str, layers: &[ProbeLayer], f: fn(&ProbeLayer) -> f64| Series {
        name: name.to_string(),
        points: layers.iter().map(|l| (l.layer as f64, f(l), 0.0)).collect(),
    };
    let n = r.pretrained.len().saturating_sub(1) as f64;
    plot_curves(
        &stem,
        &format!("{} probe accuracy by layer", r.task),
        "layer (0: embeddings)",
        &[
            series("pretrained [CLS]", &r.pretrained, |l| l.cls),
            series("pretrained mean", &r.pretrained, |l| l.mean),
            series("fine-tuned [CLS]", &r.fine_tuned, |l| l.cls),
            series("fine-tuned mean", &r.fine_tuned, |l| l.mean),
            Series {
                name: "majority".into(),
                points: vec![(0.0, r.majority, 0.0), (n, r.majority, 0.0)],
            },
        ],
    )
}
