//! Metrics against hand-computable cases and scikit-learn / scipy.
//!
//! Reference values come from scikit-learn 1.9.1 and scipy on the inputs
//! below (script: `accuracy_score`, `f1_score(average="macro")`,
//! `f1_score` (binary), `matthews_corrcoef`, `pearsonr`, `spearmanr`,
//! `roc_auc_score`, `average_precision_score`, `log_loss`, the multiclass
//! Brier sum, and ECE with 15 equal-width bins written out in numpy).
mod common;

use tunefuse::train::metrics::*;

const LABELS: [usize; 12] = [0, 1, 2, 2, 1, 0, 1, 2, 0, 0, 1, 2];
const PREDS: [usize; 12] = [0, 2, 2, 1, 1, 0, 1, 2, 1, 0, 0, 2];

fn probs() -> Vec<Vec<f64>> {
    [
        [0.7, 0.2, 0.1],
        [0.1, 0.3, 0.6],
        [0.2, 0.2, 0.6],
        [0.3, 0.4, 0.3],
        [0.25, 0.5, 0.25],
        [0.9, 0.05, 0.05],
        [0.3, 0.6, 0.1],
        [0.1, 0.1, 0.8],
        [0.4, 0.45, 0.15],
        [0.5, 0.3, 0.2],
        [0.35, 0.33, 0.32],
        [0.05, 0.05, 0.9],
    ]
    .iter()
    .map(|r| r.to_vec())
    .collect()
}

fn close(a: f64, b: f64) {
    assert!((a - b).abs() < 1e-12, "{a} vs {b}");
}

#[test]
fn classification_metrics_match_sklearn() {
    close(accuracy(&PREDS, &LABELS).unwrap(), 0.6666666666666666);
    close(macro_f1(&PREDS, &LABELS, 3).unwrap(), 0.6666666666666666);
    close(matthews(&PREDS, &LABELS, 3).unwrap(), 0.5);
    let bl = [1, 0, 1, 1, 0, 0, 1, 0, 1, 1];
    let bp = [1, 0, 0, 1, 0, 1, 1, 0, 1, 0];
    close(f1_positive(&bp, &bl, 1).unwrap(), 0.7272727272727273);
    close(matthews(&bp, &bl, 2).unwrap(), 0.408248290463863);
}

#[test]
fn hand_computable_cases() {
    // Perfect and inverted binary predictions.
    close(matthews(&[0, 1, 1, 0], &[0, 1, 1, 0], 2).unwrap(), 1.0);
    close(matthews(&[1, 0, 0, 1], &[0, 1, 1, 0], 2).unwrap(), -1.0);
    // Constant predictions: MCC undefined, reported 0 (as sklearn).
    close(matthews(&[1, 1, 1, 1], &[0, 1, 1, 0], 2).unwrap(), 0.0);
    // F1: tp 1, fp 1, fn 1 -> 2/(2+1+1).
    close(f1_positive(&[1, 1, 0], &[1, 0, 1], 1).unwrap(), 0.5);
    close(nll(&[vec![0.5, 0.5]], &[0]).unwrap(), 2f64.ln());
    close(
        brier(&[vec![1.0, 0.0], vec![0.0, 1.0]], &[0, 0]).unwrap(),
        1.0,
    );
    // A perfectly ranked score: AUROC 1, AP 1; reversed: AUROC 0.
    close(auroc(&[0.9, 0.8, 0.1], &[true, true, false]).unwrap(), 1.0);
    close(aupr(&[0.9, 0.8, 0.1], &[true, true, false]).unwrap(), 1.0);
    close(auroc(&[0.1, 0.2, 0.9], &[true, true, false]).unwrap(), 0.0);
    close(entropy(&[vec![0.5, 0.5]])[0], 2f64.ln());
    // A calibrated-by-construction case: confidence 0.75, 3 of 4 right.
    let p = vec![vec![0.75, 0.25]; 4];
    close(calibration(&p, &[0, 0, 0, 1], 15).unwrap().ece, 0.0);
}

#[test]
fn correlation_matches_scipy() {
    let x = [1.0, 2.0, 2.0, 3.5, 4.0, 4.0, 7.0, 0.5];
    let y = [2.0, 1.0, 3.0, 3.0, 5.0, 4.5, 9.0, 0.0];
    close(pearson(&x, &y).unwrap(), 0.9546553340287597);
    close(spearman(&x, &y).unwrap(), 0.9394111922831736);
}

#[test]
fn ranking_metrics_match_sklearn_with_ties() {
    let scores = [0.9, 0.8, 0.8, 0.7, 0.6, 0.6, 0.6, 0.3, 0.2, 0.1];
    let pos = [
        true, true, false, true, false, true, false, false, true, false,
    ];
    close(auroc(&scores, &pos).unwrap(), 0.7);
    close(aupr(&scores, &pos).unwrap(), 0.7087301587301587);
}

#[test]
fn calibration_metrics_match_reference() {
    let p = probs();
    close(nll(&p, &LABELS).unwrap(), 0.6359486750223421);
    close(brier(&p, &LABELS).unwrap(), 0.36198333333333327);
    let cal = calibration(&p, &LABELS, 15).unwrap();
    close(cal.ece, 0.2583333333333333);
    assert_eq!(cal.bins.len(), 15);
    assert_eq!(cal.bins.iter().map(|b| b.count).sum::<usize>(), 12);
    // Bin (0.4, 0.4667] holds confidences 0.4 (no: 0.4 is in (0.333, 0.4]),
    // 0.45: the row [0.4, 0.45, 0.15] predicted 1, label 0.
    let b = &cal.bins[6];
    assert_eq!((b.count, b.accuracy), (1, 0.0));
    close(b.confidence, 0.45);
    // Mean of the rows' largest probabilities, summed by hand: 7.3 / 12.
    close(cal.confidence(), 7.3 / 12.0);
}

#[test]
fn ood_detection_scores() {
    // In-distribution: confident; OOD: flat. MSP and entropy separate them.
    let inn = vec![vec![0.9, 0.1], vec![0.8, 0.2], vec![0.95, 0.05]];
    let out = vec![vec![0.5, 0.5], vec![0.6, 0.4]];
    for s in [OodScore::MaxProb, OodScore::Entropy] {
        let r = ood_detection(&inn, &out, s).unwrap();
        close(r.auroc, 1.0);
        close(r.aupr_in, 1.0);
        close(r.aupr_out, 1.0);
    }
}

#[test]
fn bad_inputs_are_errors() {
    assert!(accuracy(&[0, 1], &[0])
        .unwrap_err()
        .to_string()
        .contains("lengths differ"));
    assert!(accuracy(&[], &[])
        .unwrap_err()
        .to_string()
        .contains("no examples"));
    assert!(macro_f1(&[0, 5], &[0, 1], 2)
        .unwrap_err()
        .to_string()
        .contains("out of range"));
    assert!(nll(&[vec![f64::NAN, 1.0]], &[0])
        .unwrap_err()
        .to_string()
        .contains("not finite"));
    assert!(nll(&[vec![0.5, 0.5]], &[2])
        .unwrap_err()
        .to_string()
        .contains("label 2"));
    assert!(auroc(&[0.1, 0.2], &[true, true]).is_err());
}

#[test]
fn plots_are_written() {
    // TUNEFUSE_KEEP_PLOTS=DIR keeps the plots for a look; otherwise they go
    // to a scratch directory removed at the end.
    let scratch = common::scratch("plots");
    let dir = std::env::var_os("TUNEFUSE_KEEP_PLOTS")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| scratch.path().to_path_buf());
    std::fs::create_dir_all(&dir).unwrap();
    let cal = calibration(&probs(), &LABELS, 15).unwrap();
    plot_reliability(&dir.join("reliability"), &cal, "test").unwrap();
    // No points (a resumed run with nothing left to train) or one point:
    // a unit range, drawn at once.
    tunefuse::train::metrics::plot_curve(&dir.join("empty"), "loss", &[]).unwrap();
    tunefuse::train::metrics::plot_curve(&dir.join("one"), "loss", &[(3, 0.5)]).unwrap();
    let inn = max_prob(&probs());
    plot_histograms(
        &dir.join("msp"),
        &[("in", &inn), ("out", &[0.4, 0.5, 0.45])],
        "max prob",
    )
    .unwrap();
    for f in ["reliability.png", "reliability.svg", "msp.png", "msp.svg"] {
        let len = std::fs::metadata(dir.join(f)).map(|m| m.len()).unwrap_or(0);
        assert!(len > 1000, "{f} is {len} bytes");
    }
    let svg = std::fs::read_to_string(dir.join("reliability.svg")).unwrap();
    assert!(
        svg.contains("ECE 0.258") && svg.contains("confidence"),
        "the SVG carries its title and axis"
    );
    let png = std::fs::read(dir.join("msp.png")).unwrap();
    assert_eq!(&png[1..4], b"PNG");
}

#[test]
fn results_table_aggregates_seeds() {
    use tunefuse::train::report::{collect, mean_std, table};
    let (m, s) = mean_std(&[1.0, 2.0, 3.0]);
    assert_eq!((m, s), (2.0, 1.0));
    assert_eq!(mean_std(&[5.0]), (5.0, 0.0));
    let scratch = common::scratch("report");
    let dir = scratch.path();
    // `conf`: the mean confidence, absent from records that predate it.
    let run = |name: &str, acc: f64, ece: f64, conf: Option<f64>, secs: f64| {
        let d = dir.join(name);
        std::fs::create_dir_all(&d).unwrap();
        let summary = serde_json::json!({
            "task": "sst2", "methods": ["smart"], "steps": 10, "best_step": 10, "best": acc,
            "metric": "accuracy", "train_examples": 100, "seconds": secs,
            "last": {"accuracy": acc, "macro_f1": acc, "f1": acc, "mcc": 0.5, "nll": 0.4,
                     "brier": 0.2, "ece": ece, "confidence": conf},
        });
        std::fs::write(d.join("summary.json"), summary.to_string()).unwrap();
        let seed = name.rsplit_once("-s").map_or("1", |(_, s)| s);
        std::fs::write(
            d.join("config.toml"),
            format!("epochs = 2\nseed = {seed}\n"),
        )
        .unwrap();
    };
    run("smart-s1", 0.80, 0.10, Some(0.70), 100.0);
    run("smart-s2", 0.82, 0.12, Some(0.73), 140.0);
    run("lora-s3", 0.75, 0.05, None, 60.0);
    std::fs::create_dir_all(dir.join("lora-s4")).unwrap(); // unfinished: left out
    let runs = collect(dir).unwrap();
    assert_eq!(runs.len(), 3);
    let t = table(&runs);
    assert_eq!(
        t.lines().nth(1),
        Some("|---|---|---|---|---|---|---|"),
        "{t}"
    );
    assert!(
        t.contains("| smart | 1, 2 | 81.0 ± 1.4 | 0.110 ± 0.014 | 71.5 | 80.0 / 82.0 | 60 s |"),
        "{t}"
    );
    assert!(
        t.contains("| lora | 3 | 75.0 ± — | 0.050 ± — | — | 75.0 | 30 s |"),
        "{t}"
    );
    // Regression runs (no accuracy, a Pearson) get their own table.
    let d = dir.join("reg-s1");
    std::fs::create_dir_all(&d).unwrap();
    let summary = serde_json::json!({
        "task": "sst5", "methods": ["vanilla"], "steps": 10, "best_step": 10, "best": 0.667,
        "metric": "pearson", "train_examples": 100, "seconds": 90.0,
        "last": {"accuracy": null, "macro_f1": null, "f1": null, "mcc": null, "nll": null,
                 "brier": null, "ece": null, "pearson": 0.667, "spearman": 0.67, "mse": 0.98},
    });
    std::fs::write(d.join("summary.json"), summary.to_string()).unwrap();
    std::fs::write(d.join("config.toml"), "epochs = 3\n").unwrap();
    let t = table(&collect(dir).unwrap());
    let (class, reg) = t.split_once("\n\n").expect("two tables");
    assert!(
        class.contains("| smart | 1, 2 |") && !class.contains("reg"),
        "{t}"
    );
    assert!(reg.starts_with("| run | seeds | dev Pearson"), "{t}");
    assert!(
        reg.contains("| reg | 1 | 0.667 ± — | 0.980 ± — | 0.667 | 30 s |"),
        "{t}"
    );
    std::fs::remove_dir_all(&d).unwrap();
    // Seeds of one label must share every other setting: a changed
    // recipe beside older seeds is an error naming the run and the setting.
    run("smart-s3", 0.9, 0.1, None, 100.0);
    std::fs::write(
        dir.join("smart-s3/config.toml"),
        "epochs = 2\nseed = 3\nlr = 2e-4\n",
    )
    .unwrap();
    let e = collect(dir).unwrap_err().to_string();
    assert!(
        e.contains("smart-s3") && e.contains("lr: 0.0001 → 0.0002"),
        "{e}"
    );
    std::fs::remove_dir_all(dir.join("smart-s3")).unwrap();
    // A folder not named <label>-s<seed> is an error naming it.
    run("oops", 0.5, 0.1, None, 1.0);
    let e = collect(dir).unwrap_err().to_string();
    assert!(e.contains("oops"), "{e}");
}

/// A fixed pseudo-random stream in [0, 1) (a 64-bit LCG's top bits).
fn uniform(n: usize, seed: u64) -> Vec<f64> {
    let mut x = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (x >> 11) as f64 / (1u64 << 53) as f64
        })
        .collect()
}

/// NBAUCC, AUROC and FPR@95 against direct computations from their
/// definitions: F1 from precision and recall at each τ of the grid, AUROC
/// as the fraction of (positive, negative) pairs ranked right (ties ½),
/// FPR@95 as the least false-positive rate over every threshold that
/// keeps 95 % of the positives.
#[test]
fn detection_metrics_match_brute_force() {
    let n = 300;
    // Confidences on a coarse grid, so that ties and τ boundaries occur.
    let conf: Vec<f64> = uniform(n, 1)
        .iter()
        .map(|u| (0.3 + 0.7 * u) * 50.0)
        .map(|v| v.round() / 50.0)
        .collect();
    let flag: Vec<bool> = uniform(n, 2)
        .iter()
        .zip(&conf)
        .map(|(u, c)| *u > *c - 0.1)
        .collect();
    for tau_max in [0.5, 1.0] {
        let mut sum = 0.0;
        for i in 0..=((tau_max / 0.02) as usize) {
            let tau = i as f64 * 0.02;
            let pred: Vec<bool> = conf.iter().map(|&c| c < tau).collect();
            let tp = pred.iter().zip(&flag).filter(|(p, f)| **p && **f).count() as f64;
            let predicted = pred.iter().filter(|p| **p).count() as f64;
            let actual = flag.iter().filter(|f| **f).count() as f64;
            let f1 = if tp == 0.0 {
                0.0
            } else {
                let (prec, rec) = (tp / predicted, tp / actual);
                2.0 * prec * rec / (prec + rec)
            };
            sum += f1 * 0.02;
        }
        let got = nbaucc(&conf, &flag, tau_max).unwrap();
        assert!(
            (got - sum / tau_max).abs() < 1e-12,
            "{got} vs {}",
            sum / tau_max
        );
        assert!(got > 0.0 && got < 1.0, "{got}");
    }
    let (mut right, mut pairs) = (0.0, 0.0);
    for i in 0..n {
        for j in 0..n {
            if flag[i] && !flag[j] {
                pairs += 1.0;
                right += if conf[i] > conf[j] {
                    1.0
                } else if conf[i] == conf[j] {
                    0.5
                } else {
                    0.0
                };
            }
        }
    }
    close(auroc(&conf, &flag).unwrap(), right / pairs);
    let pos: Vec<f64> = conf
        .iter()
        .zip(&flag)
        .filter(|(_, f)| **f)
        .map(|(c, _)| *c)
        .collect();
    let neg: Vec<f64> = conf
        .iter()
        .zip(&flag)
        .filter(|(_, f)| !**f)
        .map(|(c, _)| *c)
        .collect();
    let mut best = f64::INFINITY;
    for &t in &conf {
        let kept = pos.iter().filter(|&&p| p >= t).count() as f64 / pos.len() as f64;
        if kept >= 0.95 {
            best = best.min(neg.iter().filter(|&&v| v >= t).count() as f64 / neg.len() as f64);
        }
    }
    close(fpr_at_tpr(&pos, &neg, 0.95).unwrap(), best);
    assert!(nbaucc(&conf, &flag, 0.3).is_ok());
    assert!(nbaucc(&conf, &flag, 0.55).is_err());
    assert!(fpr_at_tpr(&pos, &[], 0.95).is_err());
}

/// Temperature scaling of an over-confident model lowers the NLL and
/// leaves every prediction (so the accuracy) as it was; t = 1 changes
/// nothing.
#[test]
fn temperature_scaling_lowers_nll_and_keeps_predictions() {
    let n = 400;
    let u = uniform(3 * n, 7);
    let mut probs = Vec::new();
    let mut labels = Vec::new();
    for i in 0..n {
        // Sharp logits, right 70 % of the time.
        let z: Vec<f64> = (0..3).map(|k| 8.0 * u[3 * i + k]).collect();
        let m = z.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let e: Vec<f64> = z.iter().map(|v| (v - m).exp()).collect();
        let s: f64 = e.iter().sum();
        let p: Vec<f64> = e.iter().map(|v| v / s).collect();
        let top = (0..3).max_by(|&a, &b| p[a].total_cmp(&p[b])).unwrap();
        labels.push(if u[3 * i] < 0.7 { top } else { (top + 1) % 3 });
        probs.push(p);
    }
    let t = fit_temperature(&probs, &labels).unwrap();
    let scaled = apply_temperature(&probs, t);
    assert!(t > 1.0, "an over-confident model is softened: t = {t}");
    assert!(nll(&scaled, &labels).unwrap() < nll(&probs, &labels).unwrap());
    let pred = |p: &[Vec<f64>]| -> Vec<usize> {
        p.iter()
            .map(|r| (0..r.len()).max_by(|&a, &b| r[a].total_cmp(&r[b])).unwrap())
            .collect()
    };
    assert_eq!(pred(&scaled), pred(&probs));
    // The fitted t is the minimum: a little either side is worse.
    let at = |t: f64| nll(&apply_temperature(&probs, t), &labels).unwrap();
    assert!(at(t) <= at(t * 1.01) && at(t) <= at(t / 1.01));
    for (a, b) in apply_temperature(&probs, 1.0)
        .iter()
        .flatten()
        .zip(probs.iter().flatten())
    {
        assert!((a - b).abs() < 1e-12);
    }
    let m = misclassification(&probs, &labels).unwrap();
    assert!(m.auroc > 0.0 && m.auroc < 1.0 && m.nbaucc_05 >= 0.0);
}
