//! Evaluation metrics for fine-tuning: classification quality, correlation
//! for regression, calibration (NLL, Brier, ECE with its per-bin table) and
//! out-of-distribution detection (AUROC / AUPR from max-softmax-probability
//! or entropy scores), plus reliability diagrams and score histograms as PNG
//! and SVG. Definitions follow scikit-learn's where it has one (named per
//! function); the tests pin values computed with it.

use crate::error::{param_err, Result};

fn check_len(what: &'static str, a: usize, b: usize) -> Result<()> {
    if a != b {
        return Err(param_err(
            what,
            format!("lengths differ: {a} predictions, {b} labels"),
        ));
    }
    if a == 0 {
        return Err(param_err(what, "no examples"));
    }
    Ok(())
}

/// Fraction of `preds` equal to `labels`.
pub fn accuracy(preds: &[usize], labels: &[usize]) -> Result<f64> {
    check_len("accuracy", preds.len(), labels.len())?;
    Ok(preds.iter().zip(labels).filter(|(p, l)| p == l).count() as f64 / preds.len() as f64)
}

/// `confusion[true][pred]`.
pub fn confusion(preds: &[usize], labels: &[usize], classes: usize) -> Result<Vec<Vec<usize>>> {
    check_len("confusion", preds.len(), labels.len())?;
    let mut m = vec![vec![0; classes]; classes];
    for (&p, &l) in preds.iter().zip(labels) {
        if p >= classes || l >= classes {
            return Err(param_err(
                "confusion",
                format!(
                    "class index {} out of range for {classes} classes",
                    p.max(l)
                ),
            ));
        }
        m[l][p] += 1;
    }
    Ok(m)
}

/// F1 of class `c` from a confusion matrix (0 when undefined, as sklearn's
/// `zero_division=0`).
fn f1_of(m: &[Vec<usize>], c: usize) -> f64 {
    let tp = m[c][c] as f64;
    let fp: f64 = (0..m.len())
        .filter(|&t| t != c)
        .map(|t| m[t][c] as f64)
        .sum();
    let fn_: f64 = (0..m.len())
        .filter(|&p| p != c)
        .map(|p| m[c][p] as f64)
        .sum();
    if tp == 0.0 {
        0.0
    } else {
        2.0 * tp / (2.0 * tp + fp + fn_)
    }
}

/// Unweighted mean of per-class F1 (sklearn `f1_score(average="macro")`).
pub fn macro_f1(preds: &[usize], labels: &[usize], classes: usize) -> Result<f64> {
    let m = confusion(preds, labels, classes)?;
    Ok((0..classes).map(|c| f1_of(&m, c)).sum::<f64>() / classes as f64)
}

/// F1 of the positive class (sklearn `f1_score(pos_label=positive)`).
pub fn f1_positive(preds: &[usize], labels: &[usize], positive: usize) -> Result<f64> {
    let classes = preds
        .iter()
        .chain(labels)
        .max()
        .copied()
        .unwrap_or(0)
        .max(positive)
        + 1;
    Ok(f1_of(&confusion(preds, labels, classes)?, positive))
}

/// Matthews correlation (sklearn `matthews_corrcoef`, Gorodkin's multiclass
/// form; 0 when undefined).
pub fn matthews(preds: &[usize], labels: &[usize], classes: usize) -> Result<f64> {
    let m = confusion(preds, labels, classes)?;
    let s = preds.len() as f64;
    let c: f64 = (0..classes).map(|k| m[k][k] as f64).sum();
    let t: Vec<f64> = (0..classes)
        .map(|k| m[k].iter().sum::<usize>() as f64)
        .collect();
    let p: Vec<f64> = (0..classes)
        .map(|k| (0..classes).map(|r| m[r][k]).sum::<usize>() as f64)
        .collect();
    let tp: f64 = t.iter().zip(&p).map(|(a, b)| a * b).sum();
    let den = ((s * s - p.iter().map(|x| x * x).sum::<f64>())
        * (s * s - t.iter().map(|x| x * x).sum::<f64>()))
    .sqrt();
    Ok(if den == 0.0 { 0.0 } else { (c * s - tp) / den })
}

/// Pearson correlation (NaN when a side is constant, like scipy).
pub fn pearson(x: &[f64], y: &[f64]) -> Result<f64> {
    check_len("pearson", x.len(), y.len())?;
    let n = x.len() as f64;
    let (mx, my) = (x.iter().sum::<f64>() / n, y.iter().sum::<f64>() / n);
    let (mut sxy, mut sxx, mut syy) = (0.0, 0.0, 0.0);
    for (a, b) in x.iter().zip(y) {
        sxy += (a - mx) * (b - my);
        sxx += (a - mx) * (a - mx);
        syy += (b - my) * (b - my);
    }
    Ok(sxy / (sxx * syy).sqrt())
}

/// Ranks from 1, ties given their average rank.
fn ranks(x: &[f64]) -> Vec<f64> {
    let mut idx: Vec<usize> = (0..x.len()).collect();
    idx.sort_by(|&a, &b| x[a].total_cmp(&x[b]));
    let mut r = vec![0.0; x.len()];
    let mut i = 0;
    while i < idx.len() {
        let mut j = i;
        while j + 1 < idx.len() && x[idx[j + 1]] == x[idx[i]] {
            j += 1;
        }
        let avg = (i + j) as f64 / 2.0 + 1.0;
        for k in i..=j {
            r[idx[k]] = avg;
        }
        i = j + 1;
    }
    r
}

/// Spearman rank correlation (Pearson of average ranks, like scipy).
pub fn spearman(x: &[f64], y: &[f64]) -> Result<f64> {
    check_len("spearman", x.len(), y.len())?;
    pearson(&ranks(x), &ranks(y))
}

fn check_probs(what: &'static str, probs: &[Vec<f64>], labels: &[usize]) -> Result<()> {
    check_len(what, probs.len(), labels.len())?;
    for (i, (p, &l)) in probs.iter().zip(labels).enumerate() {
        if l >= p.len() {
            return Err(param_err(
                what,
                format!("example {i}: label {l} but only {} classes", p.len()),
            ));
        }
        if p.iter().any(|v| !v.is_finite()) {
            return Err(param_err(
                what,
                format!("example {i}: probabilities are not finite: {p:?}"),
            ));
        }
    }
    Ok(())
}

/// Mean negative log-likelihood of the labels (probabilities clipped at
/// 1e-15 like sklearn's `log_loss`).
pub fn nll(probs: &[Vec<f64>], labels: &[usize]) -> Result<f64> {
    check_probs("nll", probs, labels)?;
    Ok(probs
        .iter()
        .zip(labels)
        .map(|(p, &l)| -p[l].max(1e-15).ln())
        .sum::<f64>()
        / probs.len() as f64)
}

/// Multiclass Brier score: mean over examples of Σ_k (p_k − 1[y = k])²
/// (Brier 1950). For two classes it is twice sklearn's `brier_score_loss`.
pub fn brier(probs: &[Vec<f64>], labels: &[usize]) -> Result<f64> {
    check_probs("brier", probs, labels)?;
    let s: f64 = probs
        .iter()
        .zip(labels)
        .map(|(p, &l)| {
            p.iter()
                .enumerate()
                .map(|(k, &v)| (v - f64::from(u8::from(k == l))).powi(2))
                .sum::<f64>()
        })
        .sum();
    Ok(s / probs.len() as f64)
}

/// One bin of a reliability table.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct Bin {
    /// The bin's lower confidence bound (exclusive).
    pub lower: f64,
    /// Its upper bound (inclusive).
    pub upper: f64,
    /// Examples in the bin.
    pub count: usize,
    /// Accuracy of the examples in the bin (0 when empty).
    pub accuracy: f64,
    /// Mean confidence (max probability) in the bin (0 when empty).
    pub confidence: f64,
}

/// Expected calibration error and its per-bin table.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct Calibration {
    /// Σ over bins of (count / n)·|accuracy − confidence|.
    pub ece: f64,
    /// The bins, lowest confidence first.
    pub bins: Vec<Bin>,
}

impl Calibration {
    /// Mean confidence over all examples (the bins' confidences weighted
    /// by their counts); NaN when there are none.
    pub fn confidence(&self) -> f64 {
        let n: usize = self.bins.iter().map(|b| b.count).sum();
        let s: f64 = self
            .bins
            .iter()
            .map(|b| b.count as f64 * b.confidence)
            .sum();
        s / n as f64
    }
}

/// ECE over `n_bins` equal-width confidence bins (Guo et al. 2017): bin b
/// holds confidences in (b/n, (b+1)/n] (the first also holds 0);
/// ECE = Σ_b (n_b / N)·|acc_b − conf_b|. The standard choice is 15 bins.
pub fn calibration(probs: &[Vec<f64>], labels: &[usize], n_bins: usize) -> Result<Calibration> {
    check_probs("ece", probs, labels)?;
    if n_bins == 0 {
        return Err(param_err("ece", "n_bins must be at least 1"));
    }
    let mut count = vec![0usize; n_bins];
    let mut correct = vec![0.0; n_bins];
    let mut conf = vec![0.0; n_bins];
    for (p, &l) in probs.iter().zip(labels) {
        let arg = argmax(p);
        let c = p[arg];
        let b = ((c * n_bins as f64).ceil() as usize).clamp(1, n_bins) - 1;
        count[b] += 1;
        correct[b] += f64::from(u8::from(arg == l));
        conf[b] += c;
    }
    let n = probs.len() as f64;
    let mut ece = 0.0;
    let bins = (0..n_bins)
        .map(|b| {
            let k = count[b] as f64;
            let (acc, cf) = if count[b] > 0 {
                (correct[b] / k, conf[b] / k)
            } else {
                (0.0, 0.0)
            };
            ece += k / n * (acc - cf).abs();
            Bin {
                lower: b as f64 / n_bins as f64,
                upper: (b + 1) as f64 / n_bins as f64,
                count: count[b],
                accuracy: acc,
                confidence: cf,
            }
        })
        .collect();
    Ok(Calibration { ece, bins })
}

/// Area under the ROC curve of `scores` for `positive` examples
/// (sklearn `roc_auc_score`; ties count one half).
pub fn auroc(scores: &[f64], positive: &[bool]) -> Result<f64> {
    check_len("auroc", scores.len(), positive.len())?;
    let r = ranks(scores);
    let np = positive.iter().filter(|&&p| p).count() as f64;
    let nn = scores.len() as f64 - np;
    if np == 0.0 || nn == 0.0 {
        return Err(param_err(
            "auroc",
            "needs both positive and negative examples",
        ));
    }
    let rank_sum: f64 = r
        .iter()
        .zip(positive)
        .filter(|(_, &p)| p)
        .map(|(r, _)| r)
        .sum();
    Ok((rank_sum - np * (np + 1.0) / 2.0) / (np * nn))
}

/// Average precision of `scores` for `positive` examples (sklearn
/// `average_precision_score`: Σ_k (R_k − R_{k−1})·P_k over thresholds).
pub fn aupr(scores: &[f64], positive: &[bool]) -> Result<f64> {
    check_len("aupr", scores.len(), positive.len())?;
    let np = positive.iter().filter(|&&p| p).count() as f64;
    if np == 0.0 {
        return Err(param_err("aupr", "needs positive examples"));
    }
    let mut idx: Vec<usize> = (0..scores.len()).collect();
    idx.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]));
    let (mut tp, mut fp, mut prev_recall, mut ap) = (0.0, 0.0, 0.0, 0.0);
    let mut i = 0;
    while i < idx.len() {
        // All examples sharing a score enter at one threshold.
        let s = scores[idx[i]];
        while i < idx.len() && scores[idx[i]] == s {
            if positive[idx[i]] {
                tp += 1.0
            } else {
                fp += 1.0
            }
            i += 1;
        }
        let recall = tp / np;
        ap += (recall - prev_recall) * tp / (tp + fp);
        prev_recall = recall;
    }
    Ok(ap)
}

/// Maximum softmax probability of each row.
pub fn max_prob(probs: &[Vec<f64>]) -> Vec<f64> {
    probs
        .iter()
        .map(|p| p.iter().cloned().fold(f64::NEG_INFINITY, f64::max))
        .collect()
}

/// Entropy −Σ p log p of each row (natural log).
pub fn entropy(probs: &[Vec<f64>]) -> Vec<f64> {
    probs
        .iter()
        .map(|p| {
            -p.iter()
                .filter(|&&v| v > 0.0)
                .map(|v| v * v.ln())
                .sum::<f64>()
        })
        .collect()
}

/// The false-positive rate at a true-positive rate of at least `tpr`:
/// with the in-distribution examples as positives and a higher `score`
/// meaning "in", the threshold is the highest score that keeps at least
/// `tpr` of `positives` at or above it, and the rate is the fraction of
/// `negatives` at or above that threshold (FPR at 95 % TPR for
/// `tpr = 0.95`, Hendrycks & Gimpel's convention).
pub fn fpr_at_tpr(positives: &[f64], negatives: &[f64], tpr: f64) -> Result<f64> {
    if positives.is_empty() || negatives.is_empty() {
        return Err(param_err(
            "fpr_at_tpr",
            "needs both positive and negative examples",
        ));
    }
    if !(tpr > 0.0 && tpr <= 1.0) {
        return Err(param_err(
            "fpr_at_tpr",
            format!("tpr must be in (0, 1], got {tpr}"),
        ));
    }
    let mut pos = positives.to_vec();
    pos.sort_by(|a, b| b.total_cmp(a));
    // The k-th highest positive score keeps k of them (ties keep more).
    let k = ((tpr * pos.len() as f64).ceil() as usize).clamp(1, pos.len());
    let threshold = pos[k - 1];
    let above = negatives.iter().filter(|&&s| s >= threshold).count();
    Ok(above as f64 / negatives.len() as f64)
}

/// Kong et al.'s (EMNLP 2020) normalised bounded area under the
/// calibration curve: an example whose `confidence` is below τ is flagged
/// (as out of distribution, or as misclassified); the F1 of flagging the
/// examples where `flag` is true is averaged over τ = 0, 0.02, …, `tau_max`
/// as their reference code sums it (F1(τ)·0.02 over the grid, divided by
/// `tau_max`; F1 is 0 where nothing is flagged correctly). `tau_max` must be
/// a multiple of 0.02 in (0, 1].
pub fn nbaucc(confidence: &[f64], flag: &[bool], tau_max: f64) -> Result<f64> {
    check_len("nbaucc", confidence.len(), flag.len())?;
    let steps = (tau_max / 0.02).round();
    if !(tau_max > 0.0 && tau_max <= 1.0) || (steps * 0.02 - tau_max).abs() > 1e-9 {
        return Err(param_err(
            "nbaucc",
            format!("tau_max must be a multiple of 0.02 in (0, 1], got {tau_max}"),
        ));
    }
    let positives = flag.iter().filter(|&&f| f).count() as f64;
    let mut sum = 0.0;
    for i in 0..=steps as usize {
        let tau = i as f64 * 0.02;
        let (mut tp, mut fp) = (0.0, 0.0);
        for (&c, &f) in confidence.iter().zip(flag) {
            if c < tau {
                if f {
                    tp += 1.0
                } else {
                    fp += 1.0
                }
            }
        }
        let fnn = positives - tp;
        let f1 = if tp == 0.0 {
            0.0
        } else {
            2.0 * tp / (2.0 * tp + fp + fnn)
        };
        sum += f1 * 0.02;
    }
    Ok(sum / tau_max)
}

/// How well confidence tells misclassified examples from correct ones.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct Misclassification {
    /// AUROC of the confidence (largest probability) for correct vs wrong.
    pub auroc: f64,
    /// [`nbaucc`] of flagging the wrong predictions, τ up to 0.5.
    pub nbaucc_05: f64,
    /// [`nbaucc`], τ up to 1.
    pub nbaucc_1: f64,
}

/// Misclassification detection by confidence (Hendrycks & Gimpel 2017;
/// Kong et al. 2020): needs both correct and wrong predictions.
pub fn misclassification(probs: &[Vec<f64>], labels: &[usize]) -> Result<Misclassification> {
    check_probs("misclassification", probs, labels)?;
    let conf = max_prob(probs);
    let correct: Vec<bool> = probs
        .iter()
        .zip(labels)
        .map(|(p, &y)| argmax(p) == y)
        .collect();
    let wrong: Vec<bool> = correct.iter().map(|c| !c).collect();
    Ok(Misclassification {
        auroc: auroc(&conf, &correct)?,
        nbaucc_05: nbaucc(&conf, &wrong, 0.5)?,
        nbaucc_1: nbaucc(&conf, &wrong, 1.0)?,
    })
}

/// The predicted class of a probability row: the index of the largest
/// value (the last of ties, as every metric here counts it; 0 for an empty
/// row).
pub fn argmax(p: &[f64]) -> usize {
    p.iter()
        .enumerate()
        .max_by(|a, b| a.1.total_cmp(b.1))
        .map_or(0, |m| m.0)
}

/// Temperature scaling of predictive distributions: `softmax(log p / t)`,
/// which is `softmax(z / t)` of the logits z the probabilities came from
/// (the log-probabilities differ from the logits by one constant per row).
/// A zero probability stays zero.
pub fn apply_temperature(probs: &[Vec<f64>], t: f64) -> Vec<Vec<f64>> {
    probs
        .iter()
        .map(|p| {
            let z: Vec<f64> = p.iter().map(|v| v.ln() / t).collect();
            let m = z.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let e: Vec<f64> = z.iter().map(|v| (v - m).exp()).collect();
            let sum: f64 = e.iter().sum();
            e.into_iter().map(|v| v / sum).collect()
        })
        .collect()
}

/// The temperature in [0.05, 20] that minimises the negative
/// log-likelihood of `labels` under [`apply_temperature`] (Guo et al.
/// 2017): a golden-section search over log t, where the likelihood is
/// unimodal (it is convex in 1/t). Needs at least one example.
pub fn fit_temperature(probs: &[Vec<f64>], labels: &[usize]) -> Result<f64> {
    check_probs("temperature", probs, labels)?;
    if probs.is_empty() {
        return Err(param_err("temperature", "needs at least one example"));
    }
    let loss = |u: f64| nll(&apply_temperature(probs, u.exp()), labels);
    let (mut a, mut b) = (0.05f64.ln(), 20f64.ln());
    let r = (5f64.sqrt() - 1.0) / 2.0;
    let (mut c, mut d) = (b - r * (b - a), a + r * (b - a));
    let (mut fc, mut fd) = (loss(c)?, loss(d)?);
    // 60 steps shrink the bracket by 0.618⁶⁰ ≈ 3e-13 of its width.
    for _ in 0..60 {
        if fc <= fd {
            (b, d, fd) = (d, c, fc);
            c = b - r * (b - a);
            fc = loss(c)?;
        } else {
            (a, c, fc) = (c, d, fd);
            d = a + r * (b - a);
            fd = loss(d)?;
        }
    }
    Ok(((a + b) / 2.0).exp())
}

/// Out-of-distribution detection from in- and out-of-distribution
/// predictive distributions.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct OodScores {
    /// AUROC with OOD as the positive class.
    pub auroc: f64,
    /// AUPR with in-distribution as positive (higher confidence = in).
    pub aupr_in: f64,
    /// AUPR with OOD as positive.
    pub aupr_out: f64,
    /// The fraction of OOD examples kept when 95 % of the in-distribution
    /// ones are ([`fpr_at_tpr`]).
    pub fpr_at_95_tpr: f64,
    /// [`nbaucc`] of flagging OOD examples by confidence (the largest
    /// probability, whatever the score), τ up to 0.5.
    pub nbaucc_05: f64,
    /// The same, τ up to 1.
    pub nbaucc_1: f64,
}

/// Which per-example score detects OOD inputs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OodScore {
    /// Low max-softmax-probability means OOD (Hendrycks & Gimpel 2017).
    MaxProb,
    /// High entropy means OOD.
    Entropy,
}

/// OOD detection by `score`: the out-of-distribution examples are the
/// positives of AUROC and AUPR-out, the in-distribution ones of AUPR-in
/// and of the true-positive rate of FPR@95.
pub fn ood_detection(
    in_probs: &[Vec<f64>],
    out_probs: &[Vec<f64>],
    score: OodScore,
) -> Result<OodScores> {
    // "OOD-ness": higher means more likely out of distribution.
    let ood = |p: &[Vec<f64>]| match score {
        OodScore::MaxProb => max_prob(p).into_iter().map(|v| -v).collect::<Vec<_>>(),
        OodScore::Entropy => entropy(p),
    };
    let scores: Vec<f64> = ood(in_probs).into_iter().chain(ood(out_probs)).collect();
    let is_out: Vec<bool> = (0..scores.len()).map(|i| i >= in_probs.len()).collect();
    let neg: Vec<f64> = scores.iter().map(|s| -s).collect();
    let is_in: Vec<bool> = is_out.iter().map(|o| !o).collect();
    let conf: Vec<f64> = max_prob(in_probs)
        .into_iter()
        .chain(max_prob(out_probs))
        .collect();
    let (inn, out) = neg.split_at(in_probs.len());
    Ok(OodScores {
        auroc: auroc(&scores, &is_out)?,
        aupr_in: aupr(&neg, &is_in)?,
        aupr_out: aupr(&scores, &is_out)?,
        fpr_at_95_tpr: fpr_at_tpr(inn, out, 0.95)?,
        nbaucc_05: nbaucc(&conf, &is_out, 0.5)?,
        nbaucc_1: nbaucc(&conf, &is_out, 1.0)?,
    })
}

// The plots live beside the metrics they draw.
pub use super::plots::{plot_curve, plot_histograms, plot_reliability};
