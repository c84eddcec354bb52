//! Probing: the linear probe separates a separable toy set perfectly; the
//! SentEval file reader and its errors; the SentLen, BShift and word-content
//! tasks are built as defined (bins, one adjacent swap, exactly one chosen
//! word), balanced and reproducible; `tunefuse probe` on a tiny checkpoint.
mod common;

use candle_core::{DType, Device};
use common::*;
use tunefuse::train::probing::{build, fit_probe, read_senteval, ProbeTask};

#[test]
fn a_probe_separates_separable_classes() {
    // Three classes, each a cluster around its own corner, in 8 dimensions.
    let make = |n: usize, seed: u64| {
        let noise = randn(n * 8, seed, 0.3);
        let mut x = vec![0.0; n * 8];
        let mut y = vec![0usize; n];
        for i in 0..n {
            y[i] = i % 3;
            for d in 0..8 {
                x[i * 8 + d] = noise[i * 8 + d] + if d == y[i] { 4.0 } else { 0.0 };
            }
        }
        (tensor(&x, &[n, 8], DType::F32, &Device::Cpu), y)
    };
    let ((x, y), (dx, dy), (tx, ty)) = (make(90, 1), make(30, 2), make(60, 3));
    let fit = fit_probe((&x, &y), (&dx, &dy), (&tx, &ty), 3).unwrap();
    assert_eq!((fit.dev, fit.test), (1.0, 1.0));
    // Labels unrelated to the features: near chance on test.
    let shuffled: Vec<usize> = (0..60).map(|i| (i * 7 / 3) % 3).collect();
    let fit = fit_probe((&x, &y), (&dx, &dy), (&tx, &shuffled), 3).unwrap();
    assert!(fit.test < 0.7, "{fit:?}");
}

#[test]
fn senteval_files_are_read_and_bad_ones_named() {
    let dir = scratch("senteval");
    let good = dir.path().join("sentence_length.txt");
    std::fs::write(
        &good,
        "tr\t0\ta short one .\ntr\t1\ta much longer sentence than that .\n\
         va\t0\tshort again .\nte\t1\tanother longer sentence for the test .\n",
    )
    .unwrap();
    let set = read_senteval(&good).unwrap();
    assert_eq!(set.labels, ["0", "1"]);
    assert_eq!((set.train.len(), set.dev.len(), set.test.len()), (2, 1, 1));
    assert_eq!(
        set.train[1],
        ("a much longer sentence than that .".into(), 1)
    );
    assert_eq!(set.name, "sentence_length");
    let bad = dir.path().join("bad.txt");
    std::fs::write(&bad, "tr\t0\tfine .\nxx\t1\tbad tag .\n").unwrap();
    let e = read_senteval(&bad).unwrap_err().to_string();
    assert!(
        e.contains("line 2") && e.contains("unknown split tag \"xx\""),
        "{e}"
    );
    std::fs::write(&bad, "tr\t0\tfine .\nte 1 no tabs\n").unwrap();
    let e = read_senteval(&bad).unwrap_err().to_string();
    assert!(e.contains("line 2") && e.contains("expected"), "{e}");
    std::fs::write(&bad, "tr\t0\tfine .\nte\t1\tno dev .\n").unwrap();
    assert!(read_senteval(&bad)
        .unwrap_err()
        .to_string()
        .contains("no `va`"));
}

/// Sentences of 3 to 32 words over a vocabulary of 900 alphabetic words
/// with Zipf-like frequencies.
fn corpus(n: usize) -> Vec<String> {
    let word = |k: usize| {
        let a = b'a' + (k % 26) as u8;
        let b = b'a' + (k / 26 % 26) as u8;
        let c = b'a' + (k / 676 % 26) as u8;
        String::from_utf8(vec![a, b, c, b'x']).unwrap()
    };
    (0..n)
        .map(|i| {
            let len = 3 + (randn(1, i as u64, 1.0)[0].abs() * 9.0) as usize % 30;
            (0..len)
                .map(|j| {
                    let u = (randn(1, (i * 64 + j) as u64 + 99_991, 1.0)[0].abs() * 1e6) as usize;
                    // Zipf-like: small ranks far more often.
                    word(u % 30 * (u / 30 % 30) + u % 7)
                })
                .collect::<Vec<_>>()
                .join(" ")
        })
        .collect()
}

#[test]
fn probing_tasks_are_built_as_defined() {
    let text = corpus(6000);
    let words = |s: &str| s.split_whitespace().count();
    // SentLen: the bin of the length, as many of each bin.
    let set = build(ProbeTask::SentLen, &text, (300, 60, 60), 30, 1).unwrap();
    assert_eq!(set.labels.len(), 6);
    let bins = [(5, 8), (9, 12), (13, 16), (17, 20), (21, 25), (26, 28)];
    let mut counts = [0usize; 6];
    for (s, y) in set.train.iter().chain(&set.dev).chain(&set.test) {
        let (lo, hi) = bins[*y];
        assert!((lo..=hi).contains(&words(s)), "{s:?} in bin {y}");
        counts[*y] += 1;
    }
    assert!(counts.iter().all(|&c| c == counts[0]), "{counts:?}");
    assert_eq!(
        set,
        build(ProbeTask::SentLen, &text, (300, 60, 60), 30, 1).unwrap()
    );
    assert_ne!(
        set,
        build(ProbeTask::SentLen, &text, (300, 60, 60), 30, 2).unwrap()
    );
    // BShift: intact sentences are the corpus's; the others are one
    // adjacent swap of one of them.
    let set = build(ProbeTask::BShift, &text, (300, 60, 60), 30, 1).unwrap();
    let originals: std::collections::HashSet<&str> = text.iter().map(String::as_str).collect();
    let mut inverted = 0;
    for (s, y) in set.train.iter().chain(&set.test) {
        if *y == 0 {
            assert!(originals.contains(s.as_str()));
            continue;
        }
        inverted += 1;
        let w: Vec<&str> = s.split_whitespace().collect();
        let undone = (0..w.len() - 1).any(|j| {
            let mut v = w.clone();
            v.swap(j, j + 1);
            w[j] != w[j + 1] && originals.contains(v.join(" ").as_str())
        });
        assert!(undone, "{s:?} is not one swap from a corpus sentence");
    }
    assert!((120..240).contains(&inverted), "{inverted} of 360 inverted");
    // Word content: exactly one of the chosen words, which is the label.
    let set = build(ProbeTask::WordContent, &text, (300, 60, 60), 10, 1).unwrap();
    assert_eq!(set.labels.len(), 10);
    for (s, y) in set.train.iter().chain(&set.dev).chain(&set.test) {
        let hits: Vec<&String> = set
            .labels
            .iter()
            .filter(|l| s.split_whitespace().any(|w| w == l.as_str()))
            .collect();
        assert_eq!(hits, [&set.labels[*y]], "{s:?}");
    }
    // Too few sentences, or an empty split, are named.
    let e = build(ProbeTask::SentLen, &text[..5], (300, 60, 60), 30, 1)
        .unwrap_err()
        .to_string();
    assert!(e.contains("too few"), "{e}");
    assert!(build(ProbeTask::BShift, &text, (300, 0, 60), 30, 1).is_err());
    assert!("bshfit"
        .parse::<ProbeTask>()
        .unwrap_err()
        .to_string()
        .contains("sentlen"));
}

#[test]
fn probe_runs_on_a_checkpoint() {
    let dir = scratch("probe-cli");
    let model = tiny_model_dir(dir.path());
    let data = labelled_csv(
        dir.path(),
        &["a fine moving film,pos", "a dull tired film,neg"],
        16,
    );
    let bin = env!("CARGO_BIN_EXE_tunefuse");
    let out = dir.path().join("run");
    let o = std::process::Command::new(bin)
        .args(own_data_args(&model, &data, &data, &out, &[]))
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let file = dir.path().join("probe.txt");
    let mut rows = String::new();
    for (i, s) in corpus(400).iter().enumerate() {
        let tag = ["tr", "tr", "tr", "va", "te"][i % 5];
        rows.push_str(&format!(
            "{tag}\t{}\t{s}\n",
            usize::from(s.split_whitespace().count() > 12)
        ));
    }
    std::fs::write(&file, rows).unwrap();
    let report = dir.path().join("probe-out");
    let o = std::process::Command::new(bin)
        .args([
            "probe",
            "--checkpoint",
            out.join("best").to_str().unwrap(),
            "--senteval",
            file.to_str().unwrap(),
            "--output",
            report.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let r: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let layers = r["pretrained"].as_array().unwrap();
    assert_eq!(layers.len(), 4);
    assert_eq!(r["fine_tuned"].as_array().unwrap().len(), 4);
    for l in layers.iter().chain(r["fine_tuned"].as_array().unwrap()) {
        for k in ["cls", "mean"] {
            assert!((0.0..=1.0).contains(&l[k].as_f64().unwrap()), "{l}");
        }
    }
    for ext in ["json", "csv", "png", "svg"] {
        assert!(report.join(format!("probe.{ext}")).is_file(), "{ext}");
    }
}
