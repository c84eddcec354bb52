//! Named-entity data and metrics: a reader for CoNLL-style column files,
//! entity extraction and scores exactly as `seqeval` computes them in its
//! default mode, and the first-subword alignment of word labels.
//!
//! **Entities.** `seqeval.metrics.sequence_labeling.get_entities` (default,
//! not strict): the sentences are joined with an `O` between them, and a
//! chunk ends or starts by the conlleval rules on (previous tag, tag,
//! previous type, type): a `B` always starts one, an `I` after `O` or after
//! another type starts one (so IOB1 and IOB2 both read), a type change ends
//! one. Precision, recall and F1 are micro-averaged over the (type, start,
//! end) triples; a ratio whose denominator is 0 is 0, as seqeval's default
//! `zero_division` gives.
//!
//! **Files.** One token a line in whitespace-separated columns (the tag in
//! the last), a blank line between sentences, `-DOCSTART-` lines (and the
//! blank line after them) skipped. Every line of a file must have the first
//! line's column count.
use std::collections::{BTreeMap, HashSet};
use std::path::Path;

use serde::Serialize;

use crate::error::{format_err, io_err, param_err, Result};

/// A tag scheme the reader accepts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scheme {
    /// `B-` starts every entity (`O`, `B-T`, `I-T`); with strict checking,
    /// an `I-T` must follow `B-T` or `I-T`.
    Iob2,
    /// `I-` runs are entities, `B-` only where one directly follows another
    /// of its type.
    Iob1,
}

/// One sentence: its words and their tags.
#[derive(Clone, Debug, PartialEq)]
pub struct Sentence {
    /// The tokens of the first column.
    pub words: Vec<String>,
    /// The tags of the last column.
    pub tags: Vec<String>,
}

/// The prefix and type of a tag: `('O', "")`, `('B', "PER")`.
fn split_tag(tag: &str) -> Option<(char, &str)> {
    if tag == "O" {
        return Some(('O', ""));
    }
    let (p, t) = tag.split_once('-')?;
    match p {
        "B" | "I" if !t.is_empty() => Some((p.chars().next()?, t)),
        _ => None,
    }
}

/// Reads a CoNLL-style column file (see the module docs). `strict`:
/// checks the tags against `scheme` (IOB2: no `I-T` unless after `B-T` or
/// `I-T`). Errors name the file and line.
pub fn read_conll(path: &Path, scheme: Scheme, strict: bool) -> Result<Vec<Sentence>> {
    let text = std::fs::read_to_string(path).map_err(|e| io_err(path, e))?;
    let text = text.strip_prefix('\u{feff}').unwrap_or(&text);
    let mut out = vec![];
    let mut cur = Sentence {
        words: vec![],
        tags: vec![],
    };
    let mut columns: Option<usize> = None;
    let flush = |cur: &mut Sentence, out: &mut Vec<Sentence>| {
        if !cur.words.is_empty() {
            out.push(std::mem::replace(
                cur,
                Sentence {
                    words: vec![],
                    tags: vec![],
                },
            ));
        }
    };
    for (i, line) in text.lines().enumerate() {
        let at = |m: String| format_err(path, format!("line {}: {m}", i + 1));
        let line = line.trim_end_matches('\r');
        if line.trim().is_empty() {
            flush(&mut cur, &mut out);
            continue;
        }
        let cols: Vec<&str> = line.split_whitespace().collect();
        if cols[0] == "-DOCSTART-" {
            flush(&mut cur, &mut out);
            continue;
        }
        match columns {
            None if cols.len() < 2 => {
                return Err(at(format!(
                    "{} column: a token and its tag are at least 2",
                    cols.len()
                )))
            }
            None => columns = Some(cols.len()),
            Some(n) if n != cols.len() => {
                return Err(at(format!(
                    "{} columns, and the file's first line has {n}",
                    cols.len()
                )))
            }
            _ => {}
        }
        let tag = cols[cols.len() - 1];
        let Some((p, t)) = split_tag(tag) else {
            return Err(at(format!(
                "unknown tag {tag:?}: the tag column holds O, B-<type> or I-<type> (IOB1 or \
                 IOB2)"
            )));
        };
        if strict && scheme == Scheme::Iob2 && p == 'I' {
            let prev = cur.tags.last().and_then(|x| split_tag(x));
            if !matches!(prev, Some((q, u)) if q != 'O' && u == t) {
                return Err(at(format!(
                    "{tag} after {}: in strict IOB2 an I- tag continues a B- or I- tag of \
                     its type",
                    cur.tags.last().map_or("a sentence start", String::as_str)
                )));
            }
        }
        cur.words.push(cols[0].to_string());
        cur.tags.push(tag.to_string());
    }
    flush(&mut cur, &mut out);
    if out.is_empty() {
        return Err(format_err(path, "no sentence"));
    }
    Ok(out)
}

/// The entities of tag sequences as seqeval's default `get_entities`
/// finds them: (type, start, end inclusive), offsets into the sentences
/// joined with one `O` between them.
pub fn entities(seqs: &[Vec<String>]) -> Vec<(String, usize, usize)> {
    let flat: Vec<&str> = seqs
        .iter()
        .flat_map(|s| s.iter().map(String::as_str).chain(std::iter::once("O")))
        .chain(std::iter::once("O"))
        .collect();
    let parts = |t: &str| -> (char, String) {
        let prefix = t.chars().next().unwrap_or('O');
        let rest: String = t.chars().skip(1).collect();
        // seqeval: chunk[1:].split('-', maxsplit=1)[-1] or '_'
        let ty = match rest.split_once('-') {
            Some((_, after)) => after.to_string(),
            None => rest,
        };
        (prefix, if ty.is_empty() { "_".into() } else { ty })
    };
    let mut chunks = vec![];
    let (mut prev_tag, mut prev_type) = ('O', String::from("_"));
    let mut begin = 0;
    for (i, t) in flat.iter().enumerate() {
        let (tag, ty) = parts(t);
        let end = matches!(prev_tag, 'E' | 'S')
            || matches!((prev_tag, tag), ('B' | 'I', 'B' | 'S' | 'O'))
            || (prev_tag != 'O' && prev_tag != '.' && prev_type != ty);
        if end {
            chunks.push((prev_type.clone(), begin, i - 1));
        }
        let start = matches!(tag, 'B' | 'S')
            || matches!((prev_tag, tag), ('E' | 'S' | 'O', 'E' | 'I'))
            || (tag != 'O' && tag != '.' && prev_type != ty);
        if start {
            begin = i;
        }
        prev_tag = tag;
        prev_type = ty;
    }
    chunks
}

/// Precision, recall and F1 of one type (or of all, micro-averaged).
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct Prf {
    /// Correct predicted entities over predicted entities.
    pub precision: f64,
    /// Correct predicted entities over true entities.
    pub recall: f64,
    /// Their harmonic mean.
    pub f1: f64,
    /// True entities.
    pub support: usize,
}

fn prf(correct: usize, predicted: usize, truth: usize) -> Prf {
    let ratio = |a: usize, b: usize| if b == 0 { 0.0 } else { a as f64 / b as f64 };
    let (p, r) = (ratio(correct, predicted), ratio(correct, truth));
    Prf {
        precision: p,
        recall: r,
        f1: if p + r == 0.0 {
            0.0
        } else {
            2.0 * p * r / (p + r)
        },
        support: truth,
    }
}

/// Entity-level scores as seqeval computes them.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct EntityScores {
    /// Micro-averaged over every entity.
    pub micro: Prf,
    /// Per entity type (of the true or the predicted entities).
    pub per_type: BTreeMap<String, Prf>,
}

/// Scores of predicted tag sequences against the true ones (the same
/// sentence lengths).
pub fn entity_scores(truth: &[Vec<String>], pred: &[Vec<String>]) -> Result<EntityScores> {
    if truth.len() != pred.len() {
        return Err(param_err(
            "entity_scores",
            format!(
                "{} true sentences against {} predicted",
                truth.len(),
                pred.len()
            ),
        ));
    }
    if let Some(i) = (0..truth.len()).find(|&i| truth[i].len() != pred[i].len()) {
        return Err(param_err(
            "entity_scores",
            format!(
                "sentence {i}: {} true tags against {} predicted",
                truth[i].len(),
                pred[i].len()
            ),
        ));
    }
    let t: HashSet<_> = entities(truth).into_iter().collect();
    let p: HashSet<_> = entities(pred).into_iter().collect();
    let types: std::collections::BTreeSet<&String> = t.iter().chain(&p).map(|e| &e.0).collect();
    let per_type = types
        .into_iter()
        .map(|ty| {
            let count =
                |s: &HashSet<(String, usize, usize)>| s.iter().filter(|e| &e.0 == ty).count();
            let correct = t.iter().filter(|e| &e.0 == ty && p.contains(*e)).count();
            (ty.clone(), prf(correct, count(&p), count(&t)))
        })
        .collect();
    Ok(EntityScores {
        micro: prf(t.intersection(&p).count(), p.len(), t.len()),
        per_type,
    })
}

/// Token-classification targets from a tokenisation's word ids: the label
/// of its word on the first subword of each word, `None` (ignored by the
/// loss and the metrics) on later subwords and special tokens.
pub fn align_first_subword(
    word_ids: &[Option<usize>],
    word_labels: &[usize],
) -> Vec<Option<usize>> {
    let mut prev = None;
    word_ids
        .iter()
        .map(|w| {
            let label = match *w {
                Some(i) if Some(i) != prev => word_labels.get(i).copied(),
                _ => None,
            };
            prev = *w;
            label
        })
        .collect()
}

/// The robustness analysis the "Rigorous Study" of NER evaluation asks for:
/// the spread of entity F1 over random re-splits of the evaluation set, and
/// the scores on mentions seen and unseen in training.
#[derive(Clone, Debug, Serialize)]
pub struct Robustness {
    /// Entity F1 of each random half of the evaluation sentences.
    pub resplit_f1: Vec<f64>,
    /// Their mean.
    pub resplit_mean: f64,
    /// Their sample standard deviation.
    pub resplit_std: f64,
    /// Entities whose (type, words) occur among the training set's
    /// entities: precision over the predicted such entities, recall over
    /// the true ones.
    pub seen: Prf,
    /// The other entities.
    pub unseen: Prf,
}

/// The entities of one sentence's tags as (type, first word, last word).
fn sentence_entities(tags: &[String]) -> Vec<(String, usize, usize)> {
    entities(std::slice::from_ref(&tags.to_vec()))
}

/// The (type, surface) of every entity of tagged sentences.
pub fn mentions(sents: &[(Vec<String>, Vec<String>)]) -> HashSet<(String, String)> {
    sents
        .iter()
        .flat_map(|(words, tags)| {
            sentence_entities(tags)
                .into_iter()
                .map(move |(t, a, b)| (t, words[a..=b].join(" ")))
        })
        .collect()
}

/// See [`Robustness`]: `words`, `truth` and `pred` per sentence, `train`
/// the training set's mentions; `resplits` random halves drawn by `seed`.
pub fn robustness(
    words: &[Vec<String>],
    truth: &[Vec<String>],
    pred: &[Vec<String>],
    train: &HashSet<(String, String)>,
    resplits: usize,
    seed: u64,
) -> Result<Robustness> {
    let n = truth.len();
    if resplits > 0 && n < 2 {
        return Err(param_err(
            "resplits",
            "re-splitting needs at least two evaluation sentences",
        ));
    }
    let mut resplit_f1 = vec![];
    for k in 0..resplits {
        let mut idx: Vec<usize> = (0..n).collect();
        super::data::shuffle(&mut idx, seed.wrapping_add(k as u64) ^ 0x0e5e_9117);
        idx.truncate(n / 2);
        let t: Vec<Vec<String>> = idx.iter().map(|&i| truth[i].clone()).collect();
        let p: Vec<Vec<String>> = idx.iter().map(|&i| pred[i].clone()).collect();
        resplit_f1.push(entity_scores(&t, &p)?.micro.f1);
    }
    let (resplit_mean, resplit_std) = if resplit_f1.is_empty() {
        (f64::NAN, f64::NAN)
    } else {
        super::report::mean_std(&resplit_f1)
    };
    // Per sentence, the entities as sets, each marked seen or not.
    let (mut correct, mut predicted, mut true_n) = ([0usize; 2], [0usize; 2], [0usize; 2]);
    for i in 0..n {
        let seen = |e: &(String, usize, usize)| -> usize {
            usize::from(!train.contains(&(e.0.clone(), words[i][e.1..=e.2].join(" "))))
        };
        let t: HashSet<_> = sentence_entities(&truth[i]).into_iter().collect();
        let p: HashSet<_> = sentence_entities(&pred[i]).into_iter().collect();
        for e in &t {
            true_n[seen(e)] += 1;
            if p.contains(e) {
                correct[seen(e)] += 1;
            }
        }
        for e in &p {
            predicted[seen(e)] += 1;
        }
    }
    Ok(Robustness {
        resplit_f1,
        resplit_mean,
        resplit_std,
        seen: prf(correct[0], predicted[0], true_n[0]),
        unseen: prf(correct[1], predicted[1], true_n[1]),
    })
}
