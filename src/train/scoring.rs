//! Essay scoring as R2BERT (Yang et al., Findings 2020) frames it: the
//! pieces that do not depend on the trainer.
//! - ASAP's `training_set_rel3.tsv` reader (Latin-1, tab-separated, header
//!   `essay_id essay_set essay … domain1_score …`), each prompt's score
//!   range, the min-max normalisation to [0, 1] and back, and the 5-fold
//!   split id files of Taghipour & Ng (2016) (`fold_k/{train,dev,test}_ids.txt`).
//! - Quadratic weighted kappa exactly as scikit-learn's
//!   `cohen_kappa_score(a, b, weights="quadratic")` computes it.
//! - The batch-wise top-1 ListNet loss −Σ softmax(y)·log softmax(ŷ).
//! - The schedule τ_e = 1 / (1 + exp(γ(E/2 − e))) of the combined loss
//!   τ_e·MSE + (1 − τ_e)·ListNet, γ chosen so that τ_1 = 10⁻⁶: ranking
//!   first, regression later.
use std::collections::HashMap;
use std::path::Path;

use candle_core::{Tensor, D};

use crate::error::{format_err, io_err, param_err, Result};

/// ASAP's eight prompts' `domain1_score` ranges (inclusive).
pub const ASAP_RANGES: [(i64, i64); 8] = [
    (2, 12),
    (1, 6),
    (0, 3),
    (0, 3),
    (0, 4),
    (0, 4),
    (0, 30),
    (0, 60),
];

/// One ASAP essay.
#[derive(Clone, Debug, PartialEq)]
pub struct Essay {
    /// `essay_id`.
    pub id: u64,
    /// `essay_set`: the prompt, 1–8.
    pub prompt: usize,
    /// The essay's text.
    pub text: String,
    /// `domain1_score`, within the prompt's range.
    pub score: i64,
}

impl Essay {
    /// The score min-max normalised over the prompt's range, in [0, 1].
    pub fn normalised(&self) -> f64 {
        let (lo, hi) = ASAP_RANGES[self.prompt - 1];
        (self.score - lo) as f64 / (hi - lo) as f64
    }
}

/// A prediction in [0, 1] back on prompt `prompt`'s integer scale
/// (rounded to the nearest score, clamped to the range).
pub fn rescale(prompt: usize, p: f64) -> i64 {
    let (lo, hi) = ASAP_RANGES[prompt - 1];
    ((p.clamp(0.0, 1.0) * (hi - lo) as f64).round() as i64 + lo).clamp(lo, hi)
}

/// Reads ASAP's `training_set_rel3.tsv` (Latin-1). Errors name the line: a
/// missing column, a prompt outside 1–8, a score outside its prompt's range.
pub fn read_asap(path: &Path) -> Result<Vec<Essay>> {
    let bytes = std::fs::read(path).map_err(|e| io_err(path, e))?;
    // Latin-1: every byte is the code point of the same value.
    let text: String = bytes.iter().map(|&b| b as char).collect();
    let mut lines = text.lines().enumerate();
    let header: Vec<&str> = lines
        .next()
        .map(|(_, l)| l.split('\t').map(str::trim).collect())
        .ok_or_else(|| format_err(path, "empty file"))?;
    let col = |name: &str| {
        header
            .iter()
            .position(|h| *h == name)
            .ok_or_else(|| format_err(path, format!("the header has no {name:?} column")))
    };
    let (ci, cs, ct, cd) = (
        col("essay_id")?,
        col("essay_set")?,
        col("essay")?,
        col("domain1_score")?,
    );
    let mut out = vec![];
    for (i, line) in lines {
        if line.trim().is_empty() {
            continue;
        }
        let at = |m: String| format_err(path, format!("line {}: {m}", i + 1));
        let f: Vec<&str> = line.split('\t').collect();
        let get = |c: usize, name: &str| {
            f.get(c)
                .map(|s| s.trim())
                .ok_or_else(|| at(format!("no {name} column ({} fields)", f.len())))
        };
        let id: u64 = get(ci, "essay_id")?
            .parse()
            .map_err(|_| at(format!("essay_id {:?} is not a number", f[ci])))?;
        let prompt: usize = get(cs, "essay_set")?
            .parse()
            .ok()
            .filter(|p| (1..=8).contains(p))
            .ok_or_else(|| at(format!("essay_set {:?} is not a prompt 1-8", f[cs])))?;
        let score: i64 = get(cd, "domain1_score")?
            .parse()
            .map_err(|_| at(format!("domain1_score {:?} is not an integer", f[cd])))?;
        let (lo, hi) = ASAP_RANGES[prompt - 1];
        if !(lo..=hi).contains(&score) {
            return Err(at(format!(
                "essay {id}: score {score} is outside prompt {prompt}'s range {lo}-{hi}"
            )));
        }
        out.push(Essay {
            id,
            prompt,
            text: get(ct, "essay")?.to_string(),
            score,
        });
    }
    Ok(out)
}

/// The essays of fold `k`'s train, dev and test id files in `dir`
/// (`fold_k/{train,dev,test}_ids.txt`); an id without an essay is an error.
pub fn asap_fold(dir: &Path, k: usize, essays: &[Essay]) -> Result<[Vec<Essay>; 3]> {
    let by_id: HashMap<u64, &Essay> = essays.iter().map(|e| (e.id, e)).collect();
    let read = |split: &str| -> Result<Vec<Essay>> {
        let path = dir.join(format!("fold_{k}/{split}_ids.txt"));
        let text = std::fs::read_to_string(&path).map_err(|e| io_err(&path, e))?;
        text.lines()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty())
            .map(|(i, l)| {
                let id: u64 = l.trim().parse().map_err(|_| {
                    format_err(&path, format!("line {}: {l:?} is not an essay id", i + 1))
                })?;
                by_id.get(&id).map(|e| (*e).clone()).ok_or_else(|| {
                    format_err(
                        &path,
                        format!("line {}: essay {id} is not in the essays file", i + 1),
                    )
                })
            })
            .collect()
    };
    Ok([read("train")?, read("dev")?, read("test")?])
}

/// Quadratic weighted kappa of two integer ratings, as scikit-learn's
/// `cohen_kappa_score(a, b, weights="quadratic")`: the labels are the
/// sorted values either rater used, the weights (i − j)² over their
/// indices, κ = 1 − Σ w·O / Σ w·E with E the outer product of the
/// marginals over the count. Undefined (an error) when both use one value
/// only.
pub fn quadratic_weighted_kappa(a: &[i64], b: &[i64]) -> Result<f64> {
    if a.len() != b.len() || a.is_empty() {
        return Err(param_err(
            "qwk",
            format!(
                "needs two equally long non-empty ratings, got {} and {}",
                a.len(),
                b.len()
            ),
        ));
    }
    let mut labels: Vec<i64> = a.iter().chain(b).copied().collect();
    labels.sort_unstable();
    labels.dedup();
    let k = labels.len();
    if k < 2 {
        return Err(param_err(
            "qwk",
            "both ratings use one value only: kappa is undefined",
        ));
    }
    let idx = |v: i64| labels.binary_search(&v).expect("collected");
    let mut o = vec![vec![0f64; k]; k];
    for (&x, &y) in a.iter().zip(b) {
        o[idx(x)][idx(y)] += 1.0;
    }
    let n = a.len() as f64;
    let rows: Vec<f64> = o.iter().map(|r| r.iter().sum()).collect();
    let cols: Vec<f64> = (0..k).map(|j| o.iter().map(|r| r[j]).sum()).collect();
    let (mut num, mut den) = (0.0, 0.0);
    for i in 0..k {
        for j in 0..k {
            let w = ((i as f64) - (j as f64)).powi(2);
            num += w * o[i][j];
            den += w * cols[i] * rows[j] / n;
        }
    }
    Ok(1.0 - num / den)
}

/// The batch-wise top-1 ListNet loss −Σ softmax(y)·log softmax(ŷ) of
/// predictions `pred` and targets `target` `[B]` (f32 scalar).
pub fn listnet_loss(pred: &Tensor, target: &Tensor) -> Result<Tensor> {
    let p = candle_nn::ops::softmax(&target.to_dtype(candle_core::DType::F32)?, D::Minus1)?;
    let logq = candle_nn::ops::log_softmax(&pred.to_dtype(candle_core::DType::F32)?, D::Minus1)?;
    Ok((p * logq)?.sum_all()?.neg()?)
}

/// τ_e of epoch `e` (1-based) of `epochs` (at least 3): γ = ln(10⁶ − 1) /
/// (E/2 − 1), so τ_1 = 10⁻⁶ and τ_{E/2} = 1/2.
pub fn r2bert_tau(e: usize, epochs: usize) -> Result<f64> {
    if epochs < 3 {
        return Err(param_err(
            "epochs",
            format!(
                "R2BERT's schedule moves from ranking (epoch 1) to regression (epoch E/2 and \
                 later) and needs at least 3 epochs, got {epochs}"
            ),
        ));
    }
    let half = epochs as f64 / 2.0;
    let gamma = (1e6f64 - 1.0).ln() / (half - 1.0);
    Ok(1.0 / (1.0 + (gamma * (half - e as f64)).exp()))
}
