//! Active learning: the acquisition functions (BALD's bounds, the
//! uncertainty scores, the top-q query, the unlabelled pool), Monte-Carlo
//! dropout's passes, whole runs on a tiny model (no example acquired twice,
//! the labelled set grows by `query` a round, a resumed or extended run
//! equals an uninterrupted one), the learning-curve table, and the
//! settings that cannot run.
mod common;

use common::*;
use tunefuse::train::active::{
    active_learn, bald, collect_curves, curves_table, top_q, uncertainty, unlabelled_pool, McScope,
    Record, Settings, Strategy,
};
use tunefuse::train::trainer::{Config, Run};

#[test]
fn bald_is_a_mutual_information() {
    let same = vec![vec![0.3, 0.7]; 5];
    assert!(bald(&same).abs() < 1e-15);
    let split = vec![vec![1.0, 0.0], vec![0.0, 1.0]];
    assert!((bald(&split) - std::f64::consts::LN_2).abs() < 1e-15);
    // Never negative, never above ln C, on random samples.
    for seed in 0..50 {
        let r = randn(4 * 3, seed, 1.0);
        let passes: Vec<Vec<f64>> = r
            .chunks(3)
            .map(|z| {
                let e: Vec<f64> = z.iter().map(|x| x.exp()).collect();
                let s: f64 = e.iter().sum();
                e.iter().map(|x| x / s).collect()
            })
            .collect();
        let b = bald(&passes);
        assert!((0.0..=3f64.ln()).contains(&b), "{b}");
    }
}

#[test]
fn uncertainty_scores_rank_the_unsure_first() {
    let sure = [0.95, 0.04, 0.01];
    let torn = [0.45, 0.44, 0.11];
    let flat = [0.34, 0.33, 0.33];
    for s in [
        Strategy::LeastConfidence,
        Strategy::Margin,
        Strategy::Entropy,
    ] {
        let (a, b, c) = (
            uncertainty(s, &sure),
            uncertainty(s, &torn),
            uncertainty(s, &flat),
        );
        assert!(a < b && a < c, "{s:?}: {a} {b} {c}");
    }
    assert!((uncertainty(Strategy::LeastConfidence, &sure) - 0.05).abs() < 1e-12);
    assert!((uncertainty(Strategy::Margin, &torn) + 0.01).abs() < 1e-12);
    // Margin sees the top two only; entropy sees the whole distribution.
    assert!(uncertainty(Strategy::Margin, &torn) > uncertainty(Strategy::Margin, &flat) - 0.01);
    assert!(uncertainty(Strategy::Entropy, &flat) > uncertainty(Strategy::Entropy, &torn));
}

#[test]
fn the_query_takes_the_top_q_once_each() {
    let scores = randn(200, 7, 1.0);
    let q = top_q(&scores, 30).unwrap();
    assert_eq!(q.len(), 30);
    let mut sorted = q.clone();
    sorted.sort_unstable();
    sorted.dedup();
    assert_eq!(sorted.len(), 30, "duplicates in {q:?}");
    let worst_taken = q.iter().map(|&i| scores[i]).fold(f64::INFINITY, f64::min);
    let best_left = (0..200)
        .filter(|i| !q.contains(i))
        .map(|i| scores[i])
        .fold(f64::NEG_INFINITY, f64::max);
    assert!(worst_taken >= best_left);
    assert!(q.windows(2).all(|w| scores[w[0]] >= scores[w[1]]));
    // Ties in position order; bad queries are errors.
    assert_eq!(top_q(&[1.0, 2.0, 2.0, 0.0], 2).unwrap(), vec![1, 2]);
    let e = top_q(&[1.0, 2.0], 3).unwrap_err().to_string();
    assert!(e.contains("larger than the pool of 2"), "{e}");
    assert!(top_q(&[1.0, f64::NAN], 1).is_err());
    // The pool never holds a labelled example, and its cap is a seeded draw.
    let labelled = [3, 9, 10, 57];
    let pool = unlabelled_pool(60, &labelled, None, 1);
    assert_eq!(pool.len(), 56);
    assert!(pool.iter().all(|i| !labelled.contains(i)));
    let capped = unlabelled_pool(60, &labelled, Some(20), 1);
    assert_eq!(capped.len(), 20);
    assert!(capped.iter().all(|i| pool.contains(i)));
    assert_eq!(capped, unlabelled_pool(60, &labelled, Some(20), 1));
    assert_ne!(capped, unlabelled_pool(60, &labelled, Some(20), 2));
}

fn settings(strategy: Strategy, rounds: usize) -> Settings {
    Settings {
        strategy,
        start: 8,
        query: 8,
        rounds,
        pool_cap: Some(40),
        passes: 6,
        scope: McScope::Head,
    }
}

fn cfg(dir: &tempfile::TempDir, out: &str) -> Config {
    Config {
        epochs: 2,
        train_examples: Some(60),
        eval_examples: Some(16),
        eval_every: 0,
        ..small_run(dir, out, tiny_model_dir(dir.path()))
    }
}

#[test]
fn mc_dropout_passes_differ_and_eval_mode_does_not() {
    let dir = scratch("active-mc");
    let run = Run::new(cfg(&dir, "mc")).unwrap();
    for scope in [McScope::Head, McScope::Full] {
        let s = run.mc_samples(&run.eval, 4, scope).unwrap();
        assert_eq!((s.len(), s[0].len(), s[0][0].len()), (16, 4, 2));
        assert!(
            s.iter().any(|p| p[0] != p[1]),
            "{scope:?}: every pass gave the same probabilities"
        );
        assert!(s
            .iter()
            .flatten()
            .all(|p| (p.iter().sum::<f64>() - 1.0).abs() < 1e-5));
    }
    assert_eq!(
        run.predict(&run.eval).unwrap(),
        run.predict(&run.eval).unwrap()
    );
    // The stochastic passes leave the run in the mode it was in.
    assert!(!run.bert.stream.train());
}

fn comparable(r: &Record) -> Vec<(usize, usize, f64, Vec<usize>)> {
    r.rounds
        .iter()
        .map(|x| (x.round, x.labels, x.metric, x.acquired.clone()))
        .collect()
}

#[test]
fn rounds_acquire_new_examples_and_resume_exactly() {
    let dir = scratch("active-runs");
    for strategy in [Strategy::Bald, Strategy::Entropy, Strategy::Random] {
        let c = cfg(&dir, &format!("grid/{}-s1", strategy.name()));
        let rec = active_learn(c.clone(), settings(strategy, 2), false, |_| ()).unwrap();
        assert_eq!(rec.rounds.len(), 3);
        assert_eq!(rec.labelled.len(), 8 + 2 * 8);
        let mut seen = rec.labelled.clone();
        seen.sort_unstable();
        seen.dedup();
        assert_eq!(seen.len(), rec.labelled.len(), "an example acquired twice");
        for (i, r) in rec.rounds.iter().enumerate() {
            assert_eq!(r.labels, 8 + 8 * i);
            assert_eq!(r.labelled_classes.iter().sum::<usize>(), r.labels);
            assert_eq!(r.acquired_classes.iter().sum::<usize>(), r.acquired.len());
            assert!(r.metric.is_finite());
            // What a round acquires was not labelled before it.
            assert!(r
                .acquired
                .iter()
                .all(|a| !rec.labelled[..r.labels].contains(a)));
        }
        assert_eq!(rec.rounds[2].acquired.len(), 0);
        assert_eq!(rec.rounds[0].pool, 40);
        assert!(c.output.join("curve.png").is_file() && c.output.join("curve.svg").is_file());
        assert!(!c.output.join("round-00/last").exists());
        // Two epochs, evaluated once: at the end (eval_epochs = false).
        let log = std::fs::read_to_string(c.output.join("round-00/metrics.jsonl")).unwrap();
        let evals = log.lines().filter(|l| l.contains("\"eval\"")).count();
        assert_eq!(evals, 1, "{log}");
        assert!(c.output.join("round-02/best/model.safetensors").is_file());
        // A new run does not replace it.
        let e = active_learn(c, settings(strategy, 2), false, |_| ())
            .unwrap_err()
            .to_string();
        assert!(e.contains("--resume"), "{e}");
    }
    let full = active_learn(
        cfg(&dir, "full"),
        settings(Strategy::Bald, 2),
        false,
        |_| (),
    )
    .unwrap();
    // Extended from one round to two.
    let part = cfg(&dir, "part");
    active_learn(part.clone(), settings(Strategy::Bald, 1), false, |_| ()).unwrap();
    let more = active_learn(part.clone(), settings(Strategy::Bald, 2), true, |_| ()).unwrap();
    assert_eq!(comparable(&more), comparable(&full));
    assert_eq!(more.labelled, full.labelled);
    // Stopped during round 1: the resume starts that round again.
    let cut = cfg(&dir, "cut");
    let e = active_learn(cut.clone(), settings(Strategy::Bald, 2), false, |e| {
        if let tunefuse::train::trainer::Event::Message(m) = e {
            if m.starts_with("round 1: fine-tuning") {
                tunefuse::interrupt::request();
            }
        }
    })
    .unwrap_err();
    tunefuse::interrupt::clear();
    assert!(e.to_string().contains("during round 1"), "{e}");
    let resumed = active_learn(cut, settings(Strategy::Bald, 2), true, |_| ()).unwrap();
    assert_eq!(comparable(&resumed), comparable(&full));
    // Other settings do not resume it.
    let mut other = settings(Strategy::Entropy, 3);
    let e = active_learn(part.clone(), other.clone(), true, |_| ())
        .unwrap_err()
        .to_string();
    assert!(e.contains("only --rounds may change"), "{e}");
    other.strategy = Strategy::Bald;
    let e = active_learn(Config { lr: 1e-3, ..part }, other, true, |_| ())
        .unwrap_err()
        .to_string();
    assert!(e.contains("another fine-tuning configuration"), "{e}");

    // The curves of the three strategies' runs and their table.
    let curves = collect_curves(&[dir.path().join("grid")]).unwrap();
    let labels: Vec<&str> = curves.iter().map(|c| c.label.as_str()).collect();
    assert_eq!(labels, ["bald", "entropy", "random"]);
    assert_eq!(curves[0].points.len(), 3);
    let table = curves_table(&curves);
    assert!(
        table.contains("| 24 |") && table.contains("bald (1 seeds)"),
        "{table}"
    );
}

#[test]
fn settings_that_cannot_run_are_refused() {
    let dir = scratch("active-bad");
    let run = |s: Settings| {
        active_learn(cfg(&dir, "bad"), s, false, |_| ())
            .unwrap_err()
            .to_string()
    };
    let base = settings(Strategy::Bald, 2);
    let cases = [
        (
            Settings {
                start: 0,
                ..base.clone()
            },
            "start = 0",
        ),
        (
            Settings {
                query: 0,
                ..base.clone()
            },
            "query = 0",
        ),
        (
            Settings {
                passes: 1,
                ..base.clone()
            },
            "at least 2",
        ),
        (
            Settings {
                query: 50,
                ..base.clone()
            },
            "larger than pool_cap",
        ),
        (
            Settings {
                rounds: 7,
                ..base.clone()
            },
            "pool of unlabelled examples runs out",
        ),
        (
            Settings {
                pool_cap: Some(0),
                ..base.clone()
            },
            "pool_cap = 0",
        ),
    ];
    for (s, want) in cases {
        let e = run(s);
        assert!(e.contains(want), "{want:?} not in {e}");
    }
    let e = active_learn(
        Config {
            head: tunefuse::train::trainer::HeadKind::Regression,
            metric: tunefuse::train::trainer::Metric::Pearson,
            ..cfg(&dir, "reg")
        },
        base,
        false,
        |_| (),
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("classification head"), "{e}");
    assert!("bold"
        .parse::<Strategy>()
        .unwrap_err()
        .to_string()
        .contains("bald"));
}

#[test]
fn the_cli_runs_rounds_and_draws_the_curves() {
    let dir = scratch("active-cli");
    let model = tiny_model_dir(dir.path());
    let data = labelled_csv(
        dir.path(),
        &[
            "a fine moving film,pos",
            "a dull tired film,neg",
            "fine and warm,pos",
        ],
        30,
    );
    let bin = env!("CARGO_BIN_EXE_tunefuse");
    let runs = dir.path().join("runs");
    for seed in ["1", "2"] {
        let out = runs.join(format!("margin-s{seed}"));
        let mut args = own_data_args(&model, &data, &data, &out, &["--seed", seed]);
        args[0] = "active".into();
        args.extend(
            [
                "--strategy",
                "margin",
                "--start",
                "4",
                "--query",
                "6",
                "--rounds",
                "2",
            ]
            .map(String::from),
        );
        let o = std::process::Command::new(bin)
            .args(&args)
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&o.stdout);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        assert!(
            stdout.contains("round  labels") && stdout.contains("   16  "),
            "{stdout}"
        );
    }
    let stem = dir.path().join("curves");
    let o = std::process::Command::new(bin)
        .args([
            "curves",
            runs.to_str().unwrap(),
            "--output",
            stem.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    let table = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(
        table.contains("margin (2 seeds)") && table.contains("| 10 |"),
        "{table}"
    );
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(stem.with_extension("json")).unwrap())
            .unwrap();
    assert_eq!(json[0]["seeds"], serde_json::json!([1, 2]));
    assert_eq!(json[0]["points"].as_array().unwrap().len(), 3);
    assert!(stem.with_extension("png").is_file() && stem.with_extension("svg").is_file());
    // A bad strategy names the choices.
    let mut args = own_data_args(&model, &data, &data, &runs.join("x-s1"), &[]);
    args[0] = "active".into();
    args.extend(["--strategy", "bold"].map(String::from));
    let o = std::process::Command::new(bin)
        .args(&args)
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("least_confidence"));
}
