//! The results table of a grid of runs (`tunefuse results DIR`): runs are
//! the subfolders `<label>-s<seed>` of DIR holding a `summary.json` (and the
//! `config.toml` the run resolved); one row per label with the mean ± sample
//! standard deviation over its seeds of the final dev accuracy and ECE (— for
//! a single seed), the mean confidence (above the accuracy: over-confident;
//! — where a record predates it), and the mean wall time per epoch;
//! regression runs get a second table with Pearson and MSE instead.
use std::collections::BTreeMap;
use std::path::Path;

use crate::error::{format_err, io_err, Result};
use crate::train::config::{config_differences, Config, Reading};
use crate::train::fit::Summary;

/// One finished run.
#[derive(Clone, Debug)]
pub struct RunResult {
    /// The run's label in the table (its method recipe).
    pub label: String,
    /// Its seed.
    pub seed: u64,
    /// Its `summary.json`.
    pub summary: Summary,
    /// The settings the run resolved (its `config.toml`).
    pub config: Config,
}

/// Every finished run under `dir` (folders without `summary.json` are
/// unfinished and left out), sorted by label then seed.
pub fn collect(dir: &Path) -> Result<Vec<RunResult>> {
    let entries = std::fs::read_dir(dir).map_err(|e| io_err(dir, e))?;
    let mut out = Vec::new();
    for e in entries {
        let path = e.map_err(|e| io_err(dir, e))?.path();
        let sum_path = path.join("summary.json");
        if !sum_path.is_file() {
            continue;
        }
        let name = path.file_name().unwrap_or_default().to_string_lossy();
        let (label, seed) = name
            .rsplit_once("-s")
            .and_then(|(l, s)| Some((l.to_string(), s.parse::<u64>().ok()?)))
            .ok_or_else(|| format_err(&path, "run folders are named <label>-s<seed>"))?;
        let text = std::fs::read_to_string(&sum_path).map_err(|e| io_err(&sum_path, e))?;
        let summary: Summary =
            serde_json::from_str(&text).map_err(|e| format_err(&sum_path, e.to_string()))?;
        let cfg_path = path.join("config.toml");
        let config = Config::from_file(&cfg_path, Reading::Record)?;
        if config.epochs == 0 {
            return Err(format_err(&cfg_path, "no positive `epochs`"));
        }
        out.push(RunResult {
            label,
            seed,
            summary,
            config,
        });
    }
    out.sort_by(|a, b| (&a.label, a.seed).cmp(&(&b.label, b.seed)));
    // A label's seeds are pooled, so they must be runs of one recipe: a
    // changed recipe left beside older seeds would otherwise be averaged
    // with them silently.
    for w in out.windows(2) {
        let (a, b) = (&w[0], &w[1]);
        if a.label != b.label {
            continue;
        }
        let same_seed = Config {
            seed: a.config.seed,
            ..b.config.clone()
        };
        let diffs = config_differences(&a.config, &same_seed)?;
        if !diffs.is_empty() {
            return Err(format_err(
                &dir.join(format!("{}-s{}", b.label, b.seed)),
                format!(
                    "its settings differ from seed {}'s ({}); runs of one label are pooled, \
                     so give a different recipe another label",
                    a.seed,
                    diffs.join("; ")
                ),
            ));
        }
    }
    Ok(out)
}

/// Mean and sample standard deviation (0 for one value).
pub fn mean_std(v: &[f64]) -> (f64, f64) {
    let n = v.len() as f64;
    let mean = v.iter().sum::<f64>() / n;
    if v.len() < 2 {
        return (mean, 0.0);
    }
    let var = v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0);
    (mean, var.sqrt())
}

/// The markdown tables: for classification runs, label, seeds, dev
/// accuracy (%) and ECE as mean ± std, the mean dev confidence (%, — unless
/// every seed recorded one), each seed's accuracy and wall time per epoch;
/// for regression runs (a label whose runs have a Pearson and no accuracy) a
/// second table with dev Pearson and MSE in place of accuracy and ECE, and
/// no confidence.
pub fn table(runs: &[RunResult]) -> String {
    let mut by: BTreeMap<&str, Vec<&RunResult>> = BTreeMap::new();
    for r in runs {
        by.entry(&r.label).or_default().push(r);
    }
    let is_regression = |rs: &[&RunResult]| {
        rs.iter()
            .all(|r| r.summary.last.accuracy.is_nan() && !r.summary.last.pearson.is_nan())
    };
    let (reg, class): (Vec<_>, Vec<_>) = by.into_iter().partition(|(_, rs)| is_regression(rs));
    let mut s = String::new();
    if !class.is_empty() {
        s += &rows(
            "| run | seeds | dev accuracy % (mean ± std) | dev ECE (mean ± std) | dev confidence % (mean) | accuracy per seed | wall time / epoch |",
            &class,
            |r| (100.0 * r.summary.last.accuracy, r.summary.last.ece),
            (1, 3),
            Some(&|r: &RunResult| 100.0 * r.summary.last.confidence),
        );
    }
    if !reg.is_empty() {
        if !s.is_empty() {
            s.push('\n');
        }
        s += &rows(
            "| run | seeds | dev Pearson (mean ± std) | dev MSE (mean ± std) | Pearson per seed | wall time / epoch |",
            &reg,
            |r| (r.summary.last.pearson, r.summary.last.mse),
            (3, 3),
            None,
        );
    }
    s
}

/// One table: a row per label with the mean ± std of the two values `f`
/// gives per run (printed with `digits` decimals), the mean of `extra`
/// (one decimal; — when a run has none) when given, the first value per
/// seed, and the mean wall time per epoch. `header` names every column.
fn rows(
    header: &str,
    labels: &[(&str, Vec<&RunResult>)],
    f: impl Fn(&RunResult) -> (f64, f64),
    digits: (usize, usize),
    extra: Option<&dyn Fn(&RunResult) -> f64>,
) -> String {
    let (d1, d2) = digits;
    let columns = header.matches('|').count() - 1;
    let mut s = format!("{header}\n|{}\n", "---|".repeat(columns));
    for (label, rs) in labels {
        let (first, second): (Vec<f64>, Vec<f64>) = rs.iter().map(|r| f(r)).unzip();
        let per_epoch: Vec<f64> = rs
            .iter()
            .map(|r| r.summary.seconds / r.config.epochs as f64)
            .collect();
        let (m1, sd1) = mean_std(&first);
        let (m2, sd2) = mean_std(&second);
        // One seed has no spread to report.
        let (sd1, sd2) = if rs.len() < 2 {
            ("—".to_string(), "—".to_string())
        } else {
            (format!("{sd1:.d1$}"), format!("{sd2:.d2$}"))
        };
        let seeds: Vec<String> = rs.iter().map(|r| r.seed.to_string()).collect();
        let each: Vec<String> = first.iter().map(|a| format!("{a:.d1$}")).collect();
        let extra = extra.map_or(String::new(), |g| {
            let v: Vec<f64> = rs.iter().map(|r| g(r)).collect();
            if v.iter().any(|x| x.is_nan()) {
                " — |".to_string()
            } else {
                format!(" {:.1} |", mean_std(&v).0)
            }
        });
        s += &format!(
            "| {label} | {} | {m1:.d1$} ± {sd1} | {m2:.d2$} ± {sd2} |{extra} {} | {:.0} s |\n",
            seeds.join(", "),
            each.join(" / "),
            mean_std(&per_epoch).0
        );
    }
    s
}
