//! Named entities: entity extraction and scores equal seqeval's (1.2.2,
//! default mode) on hand-made sequences (IOB1, IOB2, partial matches, type
//! mismatches, across sentences) and random ones (tests/data/seqeval.json,
//! written by scripts/seqeval-golden.py); the CoNLL reader on the data
//! folder's three corpora and its errors; first-subword label alignment;
//! the token loss and divergence count the labelled tokens only; a token
//! task trains (plain, SMART, R3F), evaluates and refuses what it cannot.
mod common;

use std::path::Path;

use tunefuse::train::ner::{
    align_first_subword, entities, entity_scores, mentions, read_conll, robustness, Scheme,
};

fn strings(v: &serde_json::Value) -> Vec<Vec<String>> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|s| {
            s.as_array()
                .unwrap()
                .iter()
                .map(|t| t.as_str().unwrap().to_string())
                .collect()
        })
        .collect()
}

#[test]
fn entity_scores_equal_seqeval() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/seqeval.json");
    let cases: Vec<serde_json::Value> =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    assert!(cases.len() >= 16);
    for c in &cases {
        let name = c["name"].as_str().unwrap();
        let (truth, pred) = (strings(&c["truth"]), strings(&c["pred"]));
        let want: Vec<(String, usize, usize)> = c["entities"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| {
                (
                    e[0].as_str().unwrap().to_string(),
                    e[1].as_u64().unwrap() as usize,
                    e[2].as_u64().unwrap() as usize,
                )
            })
            .collect();
        assert_eq!(entities(&truth), want, "{name}");
        let s = entity_scores(&truth, &pred).unwrap();
        for (got, key) in [
            (s.micro.precision, "precision"),
            (s.micro.recall, "recall"),
            (s.micro.f1, "f1"),
        ] {
            let want = c[key].as_f64().unwrap();
            assert!((got - want).abs() < 1e-12, "{name} {key}: {got} vs {want}");
        }
        let types = c["per_type"].as_object().unwrap();
        assert_eq!(
            s.per_type.keys().collect::<Vec<_>>(),
            types.keys().collect::<Vec<_>>(),
            "{name}"
        );
        for (ty, v) in types {
            let got = s.per_type[ty];
            assert!(
                (got.f1 - v["f1"].as_f64().unwrap()).abs() < 1e-12,
                "{name} {ty}"
            );
            assert!((got.precision - v["precision"].as_f64().unwrap()).abs() < 1e-12);
            assert_eq!(
                got.support as u64,
                v["support"].as_u64().unwrap(),
                "{name} {ty}"
            );
        }
    }
    assert!(entity_scores(&[vec!["O".into()]], &[]).is_err());
    assert!(entity_scores(&[vec!["O".into()]], &[vec![]]).is_err());
}

#[test]
fn conll_files_read_and_bad_ones_named() {
    let data = common::data_root().join("ner");
    let conll = read_conll(&data.join("conll2003/dev.txt"), Scheme::Iob2, true).unwrap();
    // The data README's counts: 3,250 sentences, 5,942 entities, 51,362 tokens.
    assert_eq!(conll.len(), 3250);
    assert_eq!(conll.iter().map(|s| s.words.len()).sum::<usize>(), 51_362);
    let tags: Vec<Vec<String>> = conll.iter().map(|s| s.tags.clone()).collect();
    assert_eq!(entities(&tags).len(), 5942);
    assert_eq!(conll[0].words[0], "CRICKET");
    let ncbi = read_conll(&data.join("ncbi-disease/dev.txt"), Scheme::Iob2, true).unwrap();
    assert_eq!(ncbi.len(), 923);
    let ncbi_tags: Vec<Vec<String>> = ncbi.iter().map(|s| s.tags.clone()).collect();
    assert_eq!(entities(&ncbi_tags).len(), 787);
    // SciERC is IOB1: strict IOB2 refuses it, IOB1 reads it.
    let sci = data.join("sciie/dev.txt");
    let e = read_conll(&sci, Scheme::Iob2, true)
        .unwrap_err()
        .to_string();
    assert!(e.contains("strict IOB2") && e.contains("line "), "{e}");
    let sci = read_conll(&sci, Scheme::Iob1, true).unwrap();
    assert_eq!(sci.len(), 275);
    let sci_tags: Vec<Vec<String>> = sci.iter().map(|s| s.tags.clone()).collect();
    assert_eq!(entities(&sci_tags).len(), 808);

    let dir = common::scratch("conll");
    let write = |text: &str| {
        let p = dir.path().join("bad.txt");
        std::fs::write(&p, text).unwrap();
        p
    };
    let e = read_conll(&write("EU NNP B-ORG\nrejects VBZ\n"), Scheme::Iob2, false)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("line 2: 2 columns") && e.contains("bad.txt"),
        "{e}"
    );
    let e = read_conll(&write("EU NNP X-ORG\n"), Scheme::Iob2, false)
        .unwrap_err()
        .to_string();
    assert!(e.contains("line 1: unknown tag \"X-ORG\""), "{e}");
    let e = read_conll(&write("EU O\nrejects I-ORG\n"), Scheme::Iob2, true)
        .unwrap_err()
        .to_string();
    assert!(e.contains("line 2: I-ORG after O"), "{e}");
    assert!(read_conll(&write("EU O\nrejects I-ORG\n"), Scheme::Iob2, false).is_ok());
    let e = read_conll(&write("-DOCSTART- -X- O\n\n"), Scheme::Iob2, false)
        .unwrap_err()
        .to_string();
    assert!(e.contains("no sentence"), "{e}");
}

#[test]
fn labels_go_on_the_first_subword() {
    // [CLS] Hawking ##s visited Cam ##bri ##dge [SEP]
    let word_ids = [
        None,
        Some(0),
        Some(0),
        Some(1),
        Some(2),
        Some(2),
        Some(2),
        None,
    ];
    let got = align_first_subword(&word_ids, &[3, 0, 5]);
    assert_eq!(
        got,
        [None, Some(3), None, Some(0), Some(5), None, None, None]
    );
    // Words cut by truncation have no label position at all.
    assert_eq!(
        align_first_subword(&[None, Some(0), None], &[1, 2]),
        [None, Some(1), None]
    );
}

#[test]
fn token_loss_is_the_mean_over_labelled_positions() {
    use candle_core::{DType, Device, Tensor};
    let logits_v = common::randn(2 * 3 * 4, 5, 1.0);
    let logits = common::tensor(&logits_v, &[2, 3, 4], DType::F32, &Device::Cpu);
    let labels = Tensor::new(&[[2f32, -1.0, 0.0], [-1.0, 3.0, -1.0]], &Device::Cpu).unwrap();
    let got = tunefuse::train::task::token_cross_entropy(&logits, &labels, 0.0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap() as f64;
    let nll = |row: usize, tag: usize| {
        let z = &logits_v[row * 4..row * 4 + 4];
        let lse = z.iter().map(|v| v.exp()).sum::<f64>().ln();
        lse - z[tag]
    };
    let want = (nll(0, 2) + nll(2, 0) + nll(4, 3)) / 3.0;
    assert!((got - want).abs() < 1e-5, "{got} vs {want}");
}

#[test]
fn named_entities_train_evaluate_and_refuse_what_they_cannot() {
    use tunefuse::train::trainer::{Config, HeadKind, Metric, Run};
    let dir = common::scratch("ner-run");
    let model = common::tiny_model_dir(dir.path());
    // The batch's labels: each kept word's tag on its first subword, −1
    // elsewhere ([CLS], later subwords, [SEP], padding).
    let cfg = Config {
        task: "ner:conll2003".into(),
        head: HeadKind::Token,
        metric: Metric::EntityF1,
        train_examples: Some(16),
        eval_examples: Some(16),
        ..common::small_run(&dir, "lib", model.clone())
    };
    let run = Run::new(cfg.clone()).unwrap();
    let b = run.batch(&run.train, &[0, 1, 2, 3]).unwrap();
    let labels: Vec<Vec<f32>> = b.labels.to_vec2().unwrap();
    for (r, row) in labels.iter().enumerate() {
        let e = &run.train.examples[r];
        assert_eq!(row[0], -1.0);
        let tagged: Vec<usize> = row
            .iter()
            .filter(|&&v| v >= 0.0)
            .map(|&v| v as usize)
            .collect();
        assert_eq!(tagged, e.tags[..tagged.len()], "row {r}");
        assert!(
            tagged.len() == e.tags.len() || row.len() == 32,
            "words lost untruncated"
        );
    }
    // The library refuses a sentence head on a token task, and the smoothness terms.
    let e = Run::new(Config {
        head: HeadKind::Classification,
        metric: Metric::Accuracy,
        ..cfg.clone()
    })
    .err()
    .unwrap()
    .to_string();
    assert!(e.contains("head = \"token\""), "{e}");

    let out = dir.path().join("cli");
    let data = common::data_root();
    let base = [
        "finetune",
        "--model",
        model.to_str().unwrap(),
        "--task",
        "ner:conll2003",
        "--data-dir",
        data.to_str().unwrap(),
        "--device",
        "cpu",
        "--train-examples",
        "24",
        "--set",
        "eval_examples=24",
        "--epochs",
        "1",
        "--batch-size",
        "8",
        "--max-len",
        "32",
        "--lr",
        "1e-3",
        "--output",
        out.to_str().unwrap(),
    ];
    let o = common::cli(&base);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("summary.json")).unwrap()).unwrap();
    assert_eq!(summary["metric"], "entity_f1");
    let f1 = summary["last"]["entity_f1"].as_f64().unwrap();
    assert!((0.0..=1.0).contains(&f1));
    assert!(summary["last"]["accuracy"].as_f64().unwrap() > 0.0);
    // eval of the best checkpoint reproduces the best evaluation.
    let best = out.join("best");
    let o = common::cli(&["eval", "--checkpoint", best.to_str().unwrap()]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let ev: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(
        ev["entity_f1"].as_f64().unwrap(),
        summary["best"].as_f64().unwrap()
    );
    let o = common::cli(&[
        "eval",
        "--checkpoint",
        best.to_str().unwrap(),
        "--resplits",
        "3",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let ev: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let r = &ev["ner_robustness"];
    assert_eq!(r["resplit_f1"].as_array().unwrap().len(), 3, "{ev}");
    assert!(r["seen"]["support"].as_u64().unwrap() + r["unseen"]["support"].as_u64().unwrap() > 0);
    for (args, want) in [
        (
            vec![
                "eval",
                "--checkpoint",
                best.to_str().unwrap(),
                "--mc-dropout",
                "4",
            ],
            "tags words",
        ),
        (
            vec!["calibrate", "--checkpoint", best.to_str().unwrap()],
            "regresses, scores or tags",
        ),
        (
            vec![
                "export",
                "--checkpoint",
                best.to_str().unwrap(),
                "--output",
                "x",
            ],
            "not exported yet",
        ),
    ] {
        let o = common::cli(&args);
        assert!(!o.status.success(), "{args:?}");
        let e = String::from_utf8_lossy(&o.stderr);
        assert!(e.contains(want), "{args:?}: {e}");
    }
    // SMART and R3F regularise every labelled token's distribution.
    for m in ["smart", "r3f"] {
        let mut args = base.to_vec();
        args.extend(["--method", m, "--overwrite"]);
        let o = common::cli(&args);
        assert!(
            o.status.success(),
            "{m}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        let log = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
        let term: Vec<f64> = log
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter_map(|v| v["terms"][m].as_f64())
            .collect();
        assert!(
            !term.is_empty() && term.iter().all(|t| t.is_finite() && *t > 0.0),
            "{m}: {log}"
        );
    }
    let mut manifold = base.to_vec();
    manifold.extend(["--method", "manifold", "--overwrite"]);
    let o = common::cli(&manifold);
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && e.contains("mixes sentence labels"),
        "{e}"
    );
}

#[test]
fn the_token_divergence_counts_labelled_tokens_only() {
    use candle_core::{DType, Device, Tensor};
    use tunefuse::ops::sym_kl::{Reduction, SymKlGrad};
    use tunefuse::train::trainer::{Config, HeadKind, Metric, Run};
    let dir = common::scratch("ner-div");
    let cfg = Config {
        task: "ner:conll2003".into(),
        head: HeadKind::Token,
        metric: Metric::EntityF1,
        train_examples: Some(8),
        eval_examples: Some(8),
        ..common::small_run(&dir, "div", common::tiny_model_dir(dir.path()))
    };
    let run = Run::new(cfg).unwrap();
    let (b, l, c) = (2, 3, run.train.labels.len());
    let av = common::randn(b * l * c, 1, 1.0);
    let bv = common::randn(b * l * c, 2, 1.0);
    let a = common::tensor(&av, &[b, l, c], DType::F32, &Device::Cpu);
    let bb = common::tensor(&bv, &[b, l, c], DType::F32, &Device::Cpu);
    let labels = Tensor::new(&[[-1f32, 2.0, 0.0], [1.0, -1.0, -1.0]], &Device::Cpu).unwrap();
    let rows = run.head.divergence_rows(&labels).unwrap();
    let got = run
        .head
        .divergence(
            &a,
            &bb,
            SymKlGrad::Full,
            Reduction::BatchMean,
            1.0,
            rows.as_ref(),
        )
        .unwrap()
        .to_scalar::<f32>()
        .unwrap() as f64;
    let softmax = |z: &[f64]| {
        let e: Vec<f64> = z.iter().map(|v| v.exp()).collect();
        let s: f64 = e.iter().sum();
        e.into_iter().map(|v| v / s).collect::<Vec<_>>()
    };
    let sym = |r: usize| {
        let (x, y) = (&av[r * c..(r + 1) * c], &bv[r * c..(r + 1) * c]);
        let (p, q) = (softmax(x), softmax(y));
        (0..c).map(|k| (p[k] - q[k]) * (x[k] - y[k])).sum::<f64>()
    };
    let want = (sym(1) + sym(2) + sym(3)) / 3.0;
    assert!((got - want).abs() < 1e-5, "{got} vs {want}");
}

#[test]
fn robustness_splits_seen_and_unseen_mentions() {
    let v = |x: &[&str]| x.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    let train = mentions(&[(v(&["John", "Smith", "said"]), v(&["B-PER", "I-PER", "O"]))]);
    assert!(train.contains(&("PER".to_string(), "John Smith".to_string())));
    let words = vec![
        v(&["John", "Smith", "met", "Acme"]),
        v(&["Acme", "hired", "Jane"]),
    ];
    let truth = vec![
        v(&["B-PER", "I-PER", "O", "B-ORG"]),
        v(&["B-ORG", "O", "B-PER"]),
    ];
    let pred = vec![
        v(&["B-PER", "I-PER", "O", "O"]),
        v(&["B-ORG", "O", "B-LOC"]),
    ];
    let r = robustness(&words, &truth, &pred, &train, 4, 1).unwrap();
    // Seen: John Smith, predicted right.
    assert_eq!(
        (r.seen.precision, r.seen.recall, r.seen.support),
        (1.0, 1.0, 1)
    );
    // Unseen: Acme twice and Jane; one Acme found, Jane predicted as LOC.
    assert_eq!(r.unseen.support, 3);
    assert!((r.unseen.recall - 1.0 / 3.0).abs() < 1e-12);
    assert!((r.unseen.precision - 0.5).abs() < 1e-12);
    assert_eq!(r.resplit_f1.len(), 4);
    // A perfect tagger scores 1 on every half.
    let r = robustness(&words, &truth, &truth, &train, 5, 2).unwrap();
    assert!(r.resplit_f1.iter().all(|&f| f == 1.0) && r.resplit_std == 0.0);
    assert!(robustness(&words[..1], &truth[..1], &truth[..1], &train, 2, 1).is_err());
}
