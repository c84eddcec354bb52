//! `tunefuse cluster`: unsupervised fine-tuning for text clustering (Huang
//! et al., COLING 2020): Deep Embedded Clustering (Xie et al., ICML 2016)
//! on the encoder's sentence vectors, trained jointly with masked LM.
//!
//! **Vectors.** A text's vector is the mean of the last layer's hidden
//! states over its tokens.
//!
//! **Start.** k-means on the pretrained vectors: seeded k-means++
//! initialisation, Lloyd's iterations to a fixed point, the best of
//! `n_init` starts by inertia. Its centroids become the cluster centres μ,
//! trained from then on with the encoder.
//!
//! **DEC.** Soft assignments by Student's t with α degrees of freedom,
//! `q_ij ∝ (1 + ‖z_i − μ_j‖²/α)^(−(α+1)/2)` (α = 1), and the sharpened
//! target `p_ij ∝ q_ij² / f_j` with `f_j = Σ_i q_ij` over the whole
//! corpus. P is a constant: it is recomputed from every text (dropout off)
//! each `update_interval` steps, and the loss is KL(P‖Q) averaged over the
//! batch. Training stops early when fewer than `tol` of the texts changed
//! cluster between two refreshes (DEC's criterion).
//!
//! **MLM.** Each step also masks the batch's texts (BERT's 15 %, 80/10/10;
//! see [`super::mlm`]) and adds `mlm_weight` × the masked-LM loss, which
//! keeps the encoder a language model while DEC pulls its vectors into
//! clusters.
//!
//! **Scores.** Clustering accuracy (the best one-to-one map of clusters to
//! labels, by the Hungarian algorithm) and normalised mutual information
//! (arithmetic-mean normalisation, scikit-learn's default), of k-means on
//! the pretrained vectors, of DEC's assignments at each refresh, and of
//! k-means on the fine-tuned vectors. Labels are read for the scores only.
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{DType, Device, Tensor, Var, D};
use candle_nn::VarMap;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use super::callbacks::Event;
use super::config::{DeviceKind, Precision};
use super::data;
use super::mlm::{self, Draws, Masking, MlmBatch, MlmHead};
use super::optim::{AdamW, AdamWParams, Param, Schedule};
use crate::error::{format_err, io_err, param_err, Error, Result};
use crate::model::bert::mean_pool;
use crate::model::{Bert, Input, Outputs, TextTokenizer};

// ---------------------------------------------------------------------
// Scores.

/// Clustering accuracy: the fraction of texts whose cluster maps to their
/// label under the best one-to-one map of clusters to labels (Hungarian
/// algorithm on the contingency table). `truth` and `pred` are indices.
pub fn cluster_accuracy(truth: &[usize], pred: &[usize]) -> Result<f64> {
    check_pair(truth, pred)?;
    let n = 1 + truth.iter().chain(pred).copied().max().unwrap_or(0);
    let mut count = vec![vec![0i64; n]; n];
    for (&t, &p) in truth.iter().zip(pred) {
        count[p][t] += 1;
    }
    // Maximum matching = minimum of the negated counts.
    let cost: Vec<Vec<i64>> = count
        .iter()
        .map(|r| r.iter().map(|c| -c).collect())
        .collect();
    let assign = hungarian(&cost);
    let matched: i64 = assign.iter().enumerate().map(|(p, &t)| count[p][t]).sum();
    Ok(matched as f64 / truth.len() as f64)
}

fn check_pair(truth: &[usize], pred: &[usize]) -> Result<()> {
    if truth.len() != pred.len() || truth.is_empty() {
        return Err(param_err(
            "cluster",
            format!(
                "scores need as many predictions as labels, and at least one: {} labels, {} \
                 predictions",
                truth.len(),
                pred.len()
            ),
        ));
    }
    Ok(())
}

/// The minimum-cost perfect matching of a square cost matrix: for each
/// row, its column (the O(n³) Hungarian algorithm with potentials).
pub fn hungarian(cost: &[Vec<i64>]) -> Vec<usize> {
    let n = cost.len();
    const INF: i64 = i64::MAX / 4;
    // 1-based arrays: column 0 is the virtual start.
    let (mut u, mut v) = (vec![0i64; n + 1], vec![0i64; n + 1]);
    let mut row_of = vec![0usize; n + 1];
    let mut way = vec![0usize; n + 1];
    for i in 1..=n {
        row_of[0] = i;
        let mut j0 = 0;
        let mut minv = vec![INF; n + 1];
        let mut used = vec![false; n + 1];
        loop {
            used[j0] = true;
            let i0 = row_of[j0];
            let mut delta = INF;
            let mut j1 = 0;
            for j in 1..=n {
                if !used[j] {
                    let cur = cost[i0 - 1][j - 1] - u[i0] - v[j];
                    if cur < minv[j] {
                        minv[j] = cur;
                        way[j] = j0;
                    }
                    if minv[j] < delta {
                        delta = minv[j];
                        j1 = j;
                    }
                }
            }
            for j in 0..=n {
                if used[j] {
                    u[row_of[j]] += delta;
                    v[j] -= delta;
                } else {
                    minv[j] -= delta;
                }
            }
            j0 = j1;
            if row_of[j0] == 0 {
                break;
            }
        }
        loop {
            let j1 = way[j0];
            row_of[j0] = row_of[j1];
            j0 = j1;
            if j0 == 0 {
                break;
            }
        }
    }
    let mut out = vec![0; n];
    for j in 1..=n {
        if row_of[j] > 0 {
            out[row_of[j] - 1] = j - 1;
        }
    }
    out
}

/// Normalised mutual information with the arithmetic mean of the two
/// entropies as normaliser (scikit-learn's `normalized_mutual_info_score`
/// default); 1 when both labelings have a single class.
pub fn nmi(truth: &[usize], pred: &[usize]) -> Result<f64> {
    check_pair(truth, pred)?;
    let n = truth.len() as f64;
    let kt = 1 + truth.iter().max().copied().unwrap_or(0);
    let kp = 1 + pred.iter().max().copied().unwrap_or(0);
    let mut joint = vec![vec![0f64; kp]; kt];
    for (&t, &p) in truth.iter().zip(pred) {
        joint[t][p] += 1.0;
    }
    let a: Vec<f64> = joint.iter().map(|r| r.iter().sum()).collect();
    let b: Vec<f64> = (0..kp).map(|j| joint.iter().map(|r| r[j]).sum()).collect();
    let entropy = |c: &[f64]| -> f64 {
        c.iter()
            .filter(|&&x| x > 0.0)
            .map(|&x| -(x / n) * (x / n).ln())
            .sum()
    };
    let (ht, hp) = (entropy(&a), entropy(&b));
    let used = |c: &[f64]| c.iter().filter(|&&x| x > 0.0).count();
    if used(&a) == 1 && used(&b) == 1 {
        return Ok(1.0);
    }
    let mut mi = 0.0;
    for (t, row) in joint.iter().enumerate() {
        for (p, &c) in row.iter().enumerate() {
            if c > 0.0 {
                mi += (c / n) * ((n * c) / (a[t] * b[p])).ln();
            }
        }
    }
    let norm = (ht + hp) / 2.0;
    Ok(if norm > 0.0 {
        (mi / norm).max(0.0)
    } else {
        0.0
    })
}

// ---------------------------------------------------------------------
// k-means.

/// A k-means solution.
#[derive(Clone, Debug)]
pub struct KMeans {
    /// `k` centroids of the data's width.
    pub centroids: Vec<Vec<f32>>,
    /// The cluster of each point.
    pub assign: Vec<usize>,
    /// Sum of squared distances to the assigned centroids.
    pub inertia: f64,
}

fn sq_dist(a: &[f32], b: &[f32]) -> f64 {
    a.iter()
        .zip(b)
        .map(|(x, y)| {
            let d = (x - y) as f64;
            d * d
        })
        .sum()
}

/// The nearest centroid of each point and the total squared distance.
fn nearest(x: &[Vec<f32>], c: &[Vec<f32>]) -> (Vec<usize>, f64) {
    let r: Vec<(usize, f64)> = x
        .par_iter()
        .map(|p| {
            c.iter()
                .enumerate()
                .map(|(j, m)| (j, sq_dist(p, m)))
                .fold((0, f64::INFINITY), |a, b| if b.1 < a.1 { b } else { a })
        })
        .collect();
    let inertia = r.iter().map(|p| p.1).sum();
    (r.into_iter().map(|p| p.0).collect(), inertia)
}

/// k-means of the rows of `x`: `n_init` seeded k-means++ starts, each
/// refined by Lloyd's iterations until no point changes cluster (or
/// `max_iter`), the lowest inertia kept. An empty cluster is re-seeded
/// with the point farthest from its centroid. Errors: `k` of 0 or larger
/// than the number of points.
pub fn kmeans(
    x: &[Vec<f32>],
    k: usize,
    seed: u64,
    n_init: usize,
    max_iter: usize,
) -> Result<KMeans> {
    if k == 0 || k > x.len() {
        return Err(param_err(
            "clusters",
            format!(
                "the cluster count must be between 1 and the number of texts ({}), got {k}",
                x.len()
            ),
        ));
    }
    let mut best: Option<KMeans> = None;
    for run in 0..n_init.max(1) {
        let mut draws = Draws::new(seed, 0x6b6d_0000 + run as u64);
        let mut c = plus_plus(x, k, &mut draws);
        let mut assign = vec![usize::MAX; x.len()];
        let mut inertia = f64::INFINITY;
        for _ in 0..max_iter.max(1) {
            let (a, i) = nearest(x, &c);
            inertia = i;
            if a == assign {
                break;
            }
            assign = a;
            let w = x[0].len();
            let mut sums = vec![vec![0f64; w]; k];
            let mut counts = vec![0usize; k];
            for (p, &j) in x.iter().zip(&assign) {
                counts[j] += 1;
                for (s, v) in sums[j].iter_mut().zip(p) {
                    *s += *v as f64;
                }
            }
            for j in 0..k {
                if counts[j] == 0 {
                    let far = (0..x.len())
                        .max_by(|&a, &b| {
                            sq_dist(&x[a], &c[assign[a]]).total_cmp(&sq_dist(&x[b], &c[assign[b]]))
                        })
                        .expect("points");
                    c[j] = x[far].clone();
                } else {
                    c[j] = sums[j]
                        .iter()
                        .map(|s| (s / counts[j] as f64) as f32)
                        .collect();
                }
            }
        }
        if best.as_ref().is_none_or(|b| inertia < b.inertia) {
            let (assign, inertia) = nearest(x, &c);
            best = Some(KMeans {
                centroids: c,
                assign,
                inertia,
            });
        }
    }
    Ok(best.expect("at least one start"))
}

/// k-means++ seeding: the first centre uniformly, each next one with
/// probability proportional to the squared distance to the nearest centre
/// chosen so far.
fn plus_plus(x: &[Vec<f32>], k: usize, draws: &mut Draws) -> Vec<Vec<f32>> {
    let mut c = vec![x[draws.below(x.len())].clone()];
    let mut d: Vec<f64> = x.par_iter().map(|p| sq_dist(p, &c[0])).collect();
    while c.len() < k {
        let total: f64 = d.iter().sum();
        let next = if total > 0.0 {
            let mut r = draws.uniform() * total;
            let mut pick = x.len() - 1;
            for (i, di) in d.iter().enumerate() {
                if r < *di {
                    pick = i;
                    break;
                }
                r -= di;
            }
            pick
        } else {
            draws.below(x.len())
        };
        c.push(x[next].clone());
        let last = c.last().expect("a centre");
        d.par_iter_mut()
            .zip(x)
            .for_each(|(di, p)| *di = di.min(sq_dist(p, last)));
    }
    c
}

// ---------------------------------------------------------------------
// DEC.

/// Student's t soft assignments `[B, K]` of vectors `z` `[B, H]` to
/// centres `mu` `[K, H]` with `alpha` degrees of freedom; rows sum to 1.
pub fn soft_assign(z: &Tensor, mu: &Tensor, alpha: f64) -> Result<Tensor> {
    let z = z.to_dtype(DType::F32)?;
    let mu = mu.to_dtype(DType::F32)?;
    // ‖z − μ‖² = ‖z‖² − 2 z·μ + ‖μ‖².
    let zz = z.sqr()?.sum_keepdim(1)?;
    let mm = mu.sqr()?.sum_keepdim(1)?.t()?;
    let d = (zz.broadcast_add(&mm)? - (z.matmul(&mu.t()?)? * 2.0)?)?.relu()?;
    let q = ((d / alpha)? + 1.0)?.powf(-(alpha + 1.0) / 2.0)?;
    Ok(q.broadcast_div(&q.sum_keepdim(1)?)?)
}

/// DEC's target `p_ij = (q_ij² / f_j) / Σ_j' (q_ij'² / f_j')`, `f_j = Σ_i
/// q_ij`, from the soft assignments of the whole corpus `[N, K]`; a
/// constant (no gradient flows through it).
pub fn target_distribution(q: &Tensor) -> Result<Tensor> {
    let q = q.detach();
    let f = q.sum_keepdim(0)?;
    let w = q.sqr()?.broadcast_div(&f)?;
    Ok(w.broadcast_div(&w.sum_keepdim(1)?)?.detach())
}

/// KL(P‖Q) summed over clusters, averaged over the rows; `p` is taken as a
/// constant (zero entries of P contribute nothing).
pub fn dec_loss(p: &Tensor, q: &Tensor) -> Result<Tensor> {
    let p = p.detach();
    let tiny = 1e-12;
    let logp = p.clamp(tiny, 1.0)?.log()?;
    let logq = q.clamp(tiny, 1.0)?.log()?;
    Ok((p * (logp - logq)?)?.sum(D::Minus1)?.mean_all()?)
}

// ---------------------------------------------------------------------
// Data.

/// Texts and, when known, their labels (indices in order of first
/// appearance of the label's name; the names kept).
#[derive(Clone, Debug)]
pub struct Texts {
    /// One text a line of the file.
    pub texts: Vec<String>,
    /// The label index of each text.
    pub labels: Option<Vec<usize>>,
    /// The label names, by index.
    pub names: Vec<String>,
}

/// The STC² sets of the data folder (`clustering/stc/<Name>.txt` and
/// `<Name>_gnd.txt`).
pub const STC: [&str; 3] = ["SearchSnippets", "StackOverflow", "Biomedical"];

/// Reads one text a line (a leading UTF-8 BOM dropped) and, when given, a
/// parallel file of labels, one a line. Errors name the file and line: an
/// empty text, a blank label, or files of different lengths.
pub fn read_texts(texts: &Path, labels: Option<&Path>) -> Result<Texts> {
    let read = |p: &Path| -> Result<Vec<String>> {
        let raw = std::fs::read(p).map_err(|e| io_err(p, e))?;
        let s = String::from_utf8(raw).map_err(|e| format_err(p, format!("not UTF-8: {e}")))?;
        Ok(s.trim_start_matches('\u{feff}')
            .lines()
            .map(|l| l.trim_end_matches('\r').to_string())
            .collect())
    };
    let mut t = read(texts)?;
    while t.last().is_some_and(|l| l.trim().is_empty()) {
        t.pop();
    }
    if t.is_empty() {
        return Err(format_err(texts, "holds no text"));
    }
    if let Some(i) = t.iter().position(|l| l.trim().is_empty()) {
        return Err(format_err(texts, format!("line {}: an empty text", i + 1)));
    }
    let (labels, names) = match labels {
        None => (None, vec![]),
        Some(lp) => {
            let mut l = read(lp)?;
            while l.last().is_some_and(|x| x.trim().is_empty()) {
                l.pop();
            }
            if l.len() != t.len() {
                return Err(format_err(
                    lp,
                    format!(
                        "has {} labels for the {} texts of {}",
                        l.len(),
                        t.len(),
                        texts.display()
                    ),
                ));
            }
            let mut names: Vec<String> = vec![];
            let mut idx = Vec::with_capacity(l.len());
            for (i, name) in l.iter().enumerate() {
                let name = name.trim();
                if name.is_empty() {
                    return Err(format_err(lp, format!("line {}: an empty label", i + 1)));
                }
                let j = match names.iter().position(|n| n == name) {
                    Some(j) => j,
                    None => {
                        names.push(name.to_string());
                        names.len() - 1
                    }
                };
                idx.push(j);
            }
            (Some(idx), names)
        }
    };
    Ok(Texts {
        texts: t,
        labels,
        names,
    })
}

// ---------------------------------------------------------------------
// The run.

/// The settings of a clustering run.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Settings {
    /// The model directory.
    pub model: PathBuf,
    /// Where `cluster.json` and `assignments.txt` go.
    pub output: PathBuf,
    /// The texts, one a line.
    pub texts: PathBuf,
    /// Their labels, one a line (for the scores only).
    pub labels: Option<PathBuf>,
    /// Clusters (default: the number of distinct labels).
    pub clusters: Option<usize>,
    /// Use at most this many texts (a seeded draw).
    pub max_texts: Option<usize>,
    /// DEC steps (0: k-means on the pretrained vectors only).
    pub steps: usize,
    /// Texts per step.
    pub batch_size: usize,
    /// Peak learning rate of the encoder (linear warm-up and decay).
    pub lr: f64,
    /// Learning rate of the cluster centres and the masked-LM head.
    pub head_lr: f64,
    /// Steps between refreshes of the target P.
    pub update_interval: usize,
    /// Stop when fewer than this fraction of texts changed cluster
    /// between two refreshes.
    pub tol: f64,
    /// Student's t degrees of freedom.
    pub alpha: f64,
    /// Weight of the masked-LM term (0: DEC alone).
    pub mlm_weight: f64,
    /// Its masking rate.
    pub mask_rate: f64,
    /// k-means starts.
    pub n_init: usize,
    /// Tokens per text.
    pub max_len: usize,
    /// Seed of the draws and of the new parameters.
    pub seed: u64,
    /// Where to compute.
    pub device: DeviceKind,
    /// The activations' dtype.
    pub precision: Precision,
    /// Replace an existing report.
    pub overwrite: bool,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            model: PathBuf::new(),
            output: PathBuf::new(),
            texts: PathBuf::new(),
            labels: None,
            clusters: None,
            max_texts: None,
            steps: 1000,
            batch_size: 32,
            lr: 1e-5,
            head_lr: 1e-3,
            update_interval: 100,
            tol: 0.001,
            alpha: 1.0,
            mlm_weight: 1.0,
            mask_rate: 0.15,
            n_init: 10,
            max_len: 64,
            seed: 42,
            device: DeviceKind::Auto,
            precision: Precision::Auto,
            overwrite: false,
        }
    }
}

/// Scores of one clustering, when labels are known.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq)]
pub struct Scores {
    /// Clustering accuracy.
    pub acc: f64,
    /// Normalised mutual information.
    pub nmi: f64,
}

/// One refresh of the target.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Refresh {
    /// Steps done.
    pub step: usize,
    /// Fraction of texts whose cluster changed since the last refresh.
    pub changed: f64,
    /// Scores of DEC's assignments (argmax Q).
    pub scores: Option<Scores>,
    /// Mean DEC loss of the steps since the last refresh.
    pub dec_loss: Option<f64>,
    /// Mean masked-LM loss of those steps.
    pub mlm_loss: Option<f64>,
}

/// What a run found (`cluster.json`).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Report {
    /// The settings.
    pub settings: Settings,
    /// Texts clustered.
    pub texts: usize,
    /// Clusters.
    pub clusters: usize,
    /// k-means on the pretrained vectors.
    pub kmeans_before: Option<Scores>,
    /// DEC's assignments at the end.
    pub dec_after: Option<Scores>,
    /// k-means on the fine-tuned vectors.
    pub kmeans_after: Option<Scores>,
    /// Every refresh of the target.
    pub refreshes: Vec<Refresh>,
    /// Steps taken (fewer than asked when DEC converged).
    pub steps: usize,
    /// Wall seconds.
    pub seconds: f64,
}

/// Mean-pooled last-layer vectors of `texts` (dropout off), shortest
/// first in batches, back in the texts' order.
fn embed(
    bert: &Bert,
    tok: &TextTokenizer,
    texts: &[String],
    device: &Device,
) -> Result<Vec<Vec<f32>>> {
    let was = bert.stream.train();
    bert.stream.set_train(false);
    let mut order: Vec<usize> = (0..texts.len()).collect();
    order.sort_by_key(|&i| texts[i].len());
    let mut out = vec![vec![]; texts.len()];
    let r = (|| -> Result<()> {
        for chunk in order.chunks(128) {
            let batch: Vec<(&str, Option<&str>)> =
                chunk.iter().map(|&i| (texts[i].as_str(), None)).collect();
            let b = tok.batch(&batch, device)?;
            let h = bert
                .forward(&b.ids, Some(&b.token_types), &b.mask, Outputs::default())?
                .last_hidden
                .detach();
            let v = mean_pool(&h, &b.mask)?
                .to_dtype(DType::F32)?
                .to_vec2::<f32>()?;
            for (&i, row) in chunk.iter().zip(v) {
                out[i] = row;
            }
        }
        Ok(())
    })();
    bert.stream.set_train(was);
    r?;
    Ok(out)
}

fn scores(labels: Option<&Vec<usize>>, pred: &[usize]) -> Result<Option<Scores>> {
    labels
        .map(|l| {
            Ok(Scores {
                acc: cluster_accuracy(l, pred)?,
                nmi: nmi(l, pred)?,
            })
        })
        .transpose()
}

fn argmax_rows(q: &[Vec<f32>]) -> Vec<usize> {
    q.iter()
        .map(|r| {
            r.iter()
                .enumerate()
                .fold(
                    (0, f32::NEG_INFINITY),
                    |a, (j, &v)| if v > a.1 { (j, v) } else { a },
                )
                .0
        })
        .collect()
}

/// Runs the clustering (see the module docs); `on` receives progress.
pub fn cluster(s: Settings, mut on: impl FnMut(Event<'_>)) -> Result<Report> {
    let bad = |k: &'static str, m: String| Err(param_err(k, m));
    if !(s.alpha.is_finite() && s.alpha > 0.0) {
        return bad("alpha", format!("must be finite and > 0, got {}", s.alpha));
    }
    if !(s.mlm_weight.is_finite() && s.mlm_weight >= 0.0) {
        return bad(
            "mlm_weight",
            format!("must be finite and ≥ 0, got {}", s.mlm_weight),
        );
    }
    for (k, v) in [("lr", s.lr), ("head_lr", s.head_lr)] {
        if !(v.is_finite() && v > 0.0) {
            return bad(k, format!("must be finite and > 0, got {v}"));
        }
    }
    if s.batch_size == 0 || s.update_interval == 0 {
        return bad(
            "batch_size",
            "batch_size and update_interval must be at least 1".into(),
        );
    }
    if !(0.0..1.0).contains(&s.tol) {
        return bad("tol", format!("must be in [0, 1), got {}", s.tol));
    }
    Masking {
        rate: s.mask_rate,
        whole_word: false,
    }
    .validate()?;
    let report_path = s.output.join("cluster.json");
    if report_path.exists() && !s.overwrite {
        return Err(io_err(
            &report_path,
            "exists: choose another --output, or pass --overwrite to replace it",
        ));
    }
    let mut data = read_texts(&s.texts, s.labels.as_deref())?;
    if let Some(n) = s.max_texts {
        if n == 0 {
            return bad("max_texts", "must be at least 1".into());
        }
        let mut idx: Vec<usize> = (0..data.texts.len()).collect();
        data::shuffle(&mut idx, s.seed);
        idx.truncate(n);
        idx.sort_unstable();
        data.texts = idx.iter().map(|&i| data.texts[i].clone()).collect();
        data.labels = data.labels.map(|l| idx.iter().map(|&i| l[i]).collect());
    }
    let k = match (s.clusters, &data.labels) {
        (Some(k), _) => k,
        (None, Some(_)) => data.names.len(),
        (None, None) => {
            return bad(
                "clusters",
                "give the cluster count (--clusters), or labels to count".into(),
            )
        }
    };
    let n = data.texts.len();
    if k < 2 || k > n {
        return bad(
            "clusters",
            format!("must be between 2 and the number of texts ({n}), got {k}"),
        );
    }
    let device = s.device.device()?;
    let varmap = VarMap::new();
    let (bert, tok) =
        mlm::load_encoder(&s.model, &varmap, &device, s.max_len, s.precision, s.seed)?;
    let start = Instant::now();
    on(Event::Message(&format!(
        "clustering {n} texts into {k} clusters: encoding them"
    )));
    let z0 = embed(&bert, &tok, &data.texts, &device)?;
    let km = kmeans(&z0, k, s.seed, s.n_init, 300)?;
    let kmeans_before = scores(data.labels.as_ref(), &km.assign)?;
    if let Some(sc) = kmeans_before {
        on(Event::Message(&format!(
            "k-means on the pretrained vectors: ACC {:.4}, NMI {:.4}",
            sc.acc, sc.nmi
        )));
    }
    let mut report = Report {
        settings: s.clone(),
        texts: n,
        clusters: k,
        kmeans_before,
        dec_after: None,
        kmeans_after: None,
        refreshes: vec![],
        steps: 0,
        seconds: 0.0,
    };
    let mut assign = km.assign.clone();
    if s.steps > 0 {
        let pretrained = super::params::snapshot(&varmap)?;
        let use_mlm = s.mlm_weight > 0.0;
        let head = if use_mlm {
            Some(MlmHead::new(&varmap, &bert.config, &device)?)
        } else {
            None
        };
        super::params::init_new(&varmap, &pretrained, s.seed)?;
        if use_mlm {
            mlm::load_head(&varmap, &s.model, bert.family)?;
        }
        let flat: Vec<f32> = km.centroids.iter().flatten().copied().collect();
        let mu = Var::from_tensor(&Tensor::from_vec(flat, (k, z0[0].len()), &device)?)?;
        let mut params = mlm::all_params(&varmap, &["mlm."], s.lr, s.head_lr);
        params.push(Param {
            name: "dec.centroids".into(),
            var: mu.clone(),
            lr_scale: s.head_lr / s.lr,
            decay: false,
            anchor: None,
        });
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
        let mask_id = if use_mlm { Some(tok.mask_id()?) } else { None };
        let masking = Masking {
            rate: s.mask_rate,
            whole_word: false,
        };
        let mut draws = Draws::new(s.seed, 0x0064_6563);
        let refresh = |bert: &Bert| -> Result<(Tensor, Vec<usize>)> {
            let z = embed(bert, &tok, &data.texts, &device)?;
            let flat: Vec<f32> = z.iter().flatten().copied().collect();
            let zt = Tensor::from_vec(flat, (n, z[0].len()), &device)?;
            let q = soft_assign(&zt, mu.as_tensor(), s.alpha)?;
            let p = target_distribution(&q)?;
            Ok((p, argmax_rows(&q.to_vec2::<f32>()?)))
        };
        let (mut p, first) = refresh(&bert)?;
        assign = first;
        let mut order: Vec<usize> = vec![];
        let mut epoch = 0u64;
        let mut sums = (0f64, 0f64, 0usize);
        bert.stream.set_train(true);
        let mut step = 0;
        while step < s.steps {
            if crate::interrupt::requested() {
                return Err(Error::Interrupted(format!(
                    "stopped by a signal after step {step} of {}; nothing was written",
                    s.steps
                )));
            }
            if order.len() < s.batch_size {
                let mut more: Vec<usize> = (0..n).collect();
                data::shuffle(&mut more, s.seed.wrapping_add(epoch * 0x9E37_79B9));
                epoch += 1;
                order.extend(more);
            }
            let idx: Vec<usize> = order.drain(..s.batch_size.min(n)).collect();
            let texts: Vec<(&str, Option<&str>)> = idx
                .iter()
                .map(|&i| (data.texts[i].as_str(), None))
                .collect();
            let b = tok.batch(&texts, &device)?;
            let h = bert
                .forward(&b.ids, Some(&b.token_types), &b.mask, Outputs::default())?
                .last_hidden;
            let z = mean_pool(&h, &b.mask)?;
            let q = soft_assign(&z, mu.as_tensor(), s.alpha)?;
            let rows = Tensor::from_vec(
                idx.iter().map(|&i| i as u32).collect::<Vec<_>>(),
                idx.len(),
                &device,
            )?;
            let pb = p.index_select(&rows, 0)?;
            let dec = dec_loss(&pb, &q)?;
            let mut loss = dec.clone();
            let mut lm_value = None;
            if let (Some(head), Some(mask_id)) = (&head, mask_id) {
                let masked = idx
                    .iter()
                    .map(|&i| {
                        let e = tok.encode_spans(Input::Text(&data.texts[i]), None)?;
                        Ok(mlm::mask(
                            &e,
                            &|_| true,
                            &masking,
                            mask_id,
                            tok.vocab_size(),
                            &mut draws,
                        ))
                    })
                    .collect::<Result<Vec<_>>>()?;
                let mb = MlmBatch::new(&tok, &masked, &device)?;
                let hm = bert
                    .forward(
                        &mb.batch.ids,
                        Some(&mb.batch.token_types),
                        &mb.batch.mask,
                        Outputs::default(),
                    )?
                    .last_hidden;
                if let Some(l) = mb.loss(&bert, head, &hm)? {
                    loss = (loss + (&l * s.mlm_weight)?)?;
                    lm_value = Some(l);
                }
            }
            let lr = schedule.lr(s.lr, step as u64, s.steps as u64);
            let mut grads = loss.backward()?;
            bert.stream.route_grads(&mut grads)?;
            opt.clip_and_step(&grads, lr, 1.0, &bert.stream)?;
            step += 1;
            let d: f64 = dec.to_dtype(DType::F64)?.to_scalar()?;
            if !d.is_finite() {
                return Err(Error::NotFinite(format!(
                    "the DEC loss is {d} at step {step}: lower the learning rates"
                )));
            }
            sums.0 += d;
            if let Some(l) = lm_value {
                sums.1 += l.to_dtype(DType::F64)?.to_scalar::<f64>()?;
            }
            sums.2 += 1;
            on(Event::Step {
                step: step as u64,
                total: s.steps as u64,
                epoch: epoch.saturating_sub(1) as usize,
                loss: Some(d),
                lr,
                examples_per_s: (step * s.batch_size) as f64
                    / start.elapsed().as_secs_f64().max(1e-9),
                logged: step.is_multiple_of(10),
            });
            if step.is_multiple_of(s.update_interval) || step == s.steps {
                let (np, now) = refresh(&bert)?;
                p = np;
                let changed =
                    now.iter().zip(&assign).filter(|(a, b)| a != b).count() as f64 / n as f64;
                assign = now;
                let sc = scores(data.labels.as_ref(), &assign)?;
                let r = Refresh {
                    step,
                    changed,
                    scores: sc,
                    dec_loss: Some(sums.0 / sums.2 as f64),
                    mlm_loss: use_mlm.then(|| sums.1 / sums.2 as f64),
                };
                on(Event::Message(&format!(
                    "step {step}: {:.2} % changed cluster{}, DEC loss {:.4}{}",
                    100.0 * changed,
                    sc.map_or(String::new(), |x| format!(
                        ", ACC {:.4}, NMI {:.4}",
                        x.acc, x.nmi
                    )),
                    r.dec_loss.unwrap_or(f64::NAN),
                    r.mlm_loss
                        .map_or(String::new(), |m| format!(", MLM loss {m:.4}"))
                )));
                report.refreshes.push(r);
                sums = (0.0, 0.0, 0);
                if changed < s.tol {
                    on(Event::Message(&format!(
                        "converged: fewer than {} of the texts changed cluster",
                        s.tol
                    )));
                    break;
                }
            }
        }
        report.steps = step;
        report.dec_after = scores(data.labels.as_ref(), &assign)?;
        let z1 = embed(&bert, &tok, &data.texts, &device)?;
        let km1 = kmeans(&z1, k, s.seed, s.n_init, 300)?;
        report.kmeans_after = scores(data.labels.as_ref(), &km1.assign)?;
    }
    report.seconds = start.elapsed().as_secs_f64();
    std::fs::create_dir_all(&s.output).map_err(|e| io_err(&s.output, e))?;
    let lines: String = assign.iter().map(|a| format!("{a}\n")).collect();
    super::checkpoint::atomic_write(&s.output.join("assignments.txt"), lines.as_bytes())?;
    super::checkpoint::atomic_write(
        &report_path,
        serde_json::to_string_pretty(&report)
            .expect("the report serialises")
            .as_bytes(),
    )?;
    Ok(report)
}
