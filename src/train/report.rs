//! The results table of a grid of runs (`tunefuse results DIR`): runs are
//! the subfolders `<label>-s<seed>` of DIR holding a `summary.json` (and the
//! `config.toml` the run resolved); one row per label with the mean ± sample
//! standard deviation over its seeds of the final dev accuracy and ECE (— for
//! a single seed), and the mean wall time per epoch.
use std::collections::BTreeMap;
use std::path::Path;

use crate::error::{format_err, io_err, Result};
use crate::train::trainer::Summary;

/// One finished run.
#[derive(Clone, Debug)]
pub struct RunResult {
    pub label: String,
    pub seed: u64,
    pub summary: Summary,
    pub epochs: usize,
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
        let cfg = std::fs::read_to_string(&cfg_path).map_err(|e| io_err(&cfg_path, e))?;
        let cfg: toml::Value =
            toml::from_str(&cfg).map_err(|e| format_err(&cfg_path, e.to_string()))?;
        let epochs =
            cfg.get("epochs")
                .and_then(|v| v.as_integer())
                .filter(|&e| e > 0)
                .ok_or_else(|| format_err(&cfg_path, "no positive `epochs`"))? as usize;
        out.push(RunResult {
            label,
            seed,
            summary,
            epochs,
        });
    }
    out.sort_by(|a, b| (&a.label, a.seed).cmp(&(&b.label, b.seed)));
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

/// The markdown table: label, seeds, dev accuracy (%) and ECE as mean ± std,
/// each seed's accuracy, and wall time per epoch.
pub fn table(runs: &[RunResult]) -> String {
    let mut by: BTreeMap<&str, Vec<&RunResult>> = BTreeMap::new();
    for r in runs {
        by.entry(&r.label).or_default().push(r);
    }
    let mut s = String::from(
        "| run | seeds | dev accuracy % (mean ± std) | dev ECE (mean ± std) | accuracy per seed | wall time / epoch |\n\
         |---|---|---|---|---|---|\n",
    );
    for (label, rs) in by {
        let acc: Vec<f64> = rs.iter().map(|r| 100.0 * r.summary.last.accuracy).collect();
        let ece: Vec<f64> = rs.iter().map(|r| r.summary.last.ece).collect();
        let per_epoch: Vec<f64> = rs
            .iter()
            .map(|r| r.summary.seconds / r.epochs as f64)
            .collect();
        let (am, asd) = mean_std(&acc);
        let (em, esd) = mean_std(&ece);
        // One seed has no spread to report.
        let (asd, esd) = if rs.len() < 2 {
            ("—".to_string(), "—".to_string())
        } else {
            (format!("{asd:.1}"), format!("{esd:.3}"))
        };
        let seeds: Vec<String> = rs.iter().map(|r| r.seed.to_string()).collect();
        let each: Vec<String> = acc.iter().map(|a| format!("{a:.1}")).collect();
        s += &format!(
            "| {label} | {} | {am:.1} ± {asd} | {em:.3} ± {esd} | {} | {:.0} s |\n",
            seeds.join(", "),
            each.join(" / "),
            mean_std(&per_epoch).0
        );
    }
    s
}
