//! Clustering: accuracy and NMI equal scipy's / scikit-learn's on toys
//! (tests/data/clustering.json, written by scripts/cluster-golden.py), the
//! Hungarian map undoes a permutation, k-means recovers separated blobs,
//! DEC's soft assignments and target are distributions with P sharper than
//! Q and no gradient through P, the readers refuse bad files, and
//! `tunefuse cluster` runs on the tiny model and refuses bad settings.
mod common;

use candle_core::{Device, Tensor, Var};
use tunefuse::train::cluster::{
    cluster, cluster_accuracy, dec_loss, hungarian, kmeans, nmi, read_texts, soft_assign,
    target_distribution, Settings,
};

#[test]
fn accuracy_and_nmi_equal_scikit_learn() {
    let text = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/clustering.json"),
    )
    .unwrap();
    let cases: Vec<serde_json::Value> = serde_json::from_str(&text).unwrap();
    assert!(cases.len() >= 9);
    let ints = |v: &serde_json::Value| -> Vec<usize> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as usize)
            .collect()
    };
    for c in &cases {
        let (t, p) = (ints(&c["truth"]), ints(&c["pred"]));
        let (want_nmi, want_acc) = (c["nmi"].as_f64().unwrap(), c["acc"].as_f64().unwrap());
        let got = nmi(&t, &p).unwrap();
        assert!(
            (got - want_nmi).abs() < 1e-12,
            "NMI {got} vs {want_nmi} on {t:?} {p:?}"
        );
        let got = cluster_accuracy(&t, &p).unwrap();
        assert!(
            (got - want_acc).abs() < 1e-12,
            "ACC {got} vs {want_acc} on {t:?} {p:?}"
        );
    }
}

#[test]
fn a_permuted_labelling_has_accuracy_and_nmi_one() {
    let truth: Vec<usize> = (0..60).map(|i| i % 6).collect();
    let perm = [4, 0, 5, 1, 3, 2];
    let pred: Vec<usize> = truth.iter().map(|&t| perm[t]).collect();
    assert_eq!(cluster_accuracy(&truth, &pred).unwrap(), 1.0);
    assert!((nmi(&truth, &pred).unwrap() - 1.0).abs() < 1e-12);
    // The matching itself: the cost of row i is lowest at column perm[i].
    let cost: Vec<Vec<i64>> = (0..6)
        .map(|i| {
            (0..6)
                .map(|j| if j == perm[i] { -5 } else { (i * j) as i64 })
                .collect()
        })
        .collect();
    assert_eq!(hungarian(&cost), perm.to_vec());
    assert!(cluster_accuracy(&truth, &pred[..10]).is_err());
}

#[test]
fn kmeans_recovers_separated_blobs_and_refuses_impossible_counts() {
    let mut x = vec![];
    let mut truth = vec![];
    for c in 0..4 {
        for i in 0..25 {
            let j = (i as f32 * 0.37).sin() * 0.3;
            x.push(vec![10.0 * c as f32 + j, -5.0 * c as f32 - j, j]);
            truth.push(c);
        }
    }
    let km = kmeans(&x, 4, 1, 3, 100).unwrap();
    assert_eq!(cluster_accuracy(&truth, &km.assign).unwrap(), 1.0);
    assert!(km.inertia < 100.0 * 0.3 * 0.3 * 3.0);
    let e = kmeans(&x, 101, 1, 1, 10).unwrap_err().to_string();
    assert!(e.contains("101") && e.contains("(100)"), "{e}");
}

fn entropy(rows: &[Vec<f32>]) -> f64 {
    rows.iter()
        .flat_map(|r| {
            r.iter()
                .filter(|&&p| p > 0.0)
                .map(|&p| -(p as f64) * (p as f64).ln())
        })
        .sum::<f64>()
        / rows.len() as f64
}

#[test]
fn dec_soft_assignments_and_target_are_distributions_and_p_is_sharper_and_constant() {
    let dev = Device::Cpu;
    let z = Var::from_tensor(&Tensor::randn(0f32, 1.0, (40, 6), &dev).unwrap()).unwrap();
    let mu = Tensor::randn(0f32, 1.0, (5, 6), &dev).unwrap();
    let q = soft_assign(z.as_tensor(), &mu, 1.0).unwrap();
    // Against the formula, element by element.
    let zv = z.as_tensor().to_vec2::<f32>().unwrap();
    let mv = mu.to_vec2::<f32>().unwrap();
    let qv = q.to_vec2::<f32>().unwrap();
    for (i, zi) in zv.iter().enumerate() {
        let k: Vec<f64> = mv
            .iter()
            .map(|m| {
                let d: f64 = zi
                    .iter()
                    .zip(m)
                    .map(|(a, b)| ((a - b) as f64).powi(2))
                    .sum();
                1.0 / (1.0 + d)
            })
            .collect();
        let s: f64 = k.iter().sum();
        for j in 0..5 {
            assert!((qv[i][j] as f64 - k[j] / s).abs() < 1e-5);
        }
    }
    let p = target_distribution(&q).unwrap();
    let pv = p.to_vec2::<f32>().unwrap();
    for (pr, qr) in pv.iter().zip(&qv) {
        assert!((pr.iter().sum::<f32>() - 1.0).abs() < 1e-5);
        assert!((qr.iter().sum::<f32>() - 1.0).abs() < 1e-5);
    }
    assert!(entropy(&pv) < entropy(&qv), "P is not sharper than Q");
    // No gradient flows through P: the loss with P computed from Q in the
    // same graph has the gradient of the loss with P a constant copy.
    let g1 = dec_loss(&p, &q).unwrap().backward().unwrap();
    let constant = Tensor::from_vec(pv.concat(), (40, 5), &dev).unwrap();
    let q2 = soft_assign(z.as_tensor(), &mu, 1.0).unwrap();
    let g2 = dec_loss(&constant, &q2).unwrap().backward().unwrap();
    let a = g1.get(z.as_tensor()).unwrap();
    let b = g2.get(z.as_tensor()).unwrap();
    let d = (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(d < 1e-7, "gradients differ by {d}");
    // KL(P‖P) = 0.
    let zero = dec_loss(&p, &p).unwrap().to_scalar::<f32>().unwrap();
    assert!(zero.abs() < 1e-6);
}

#[test]
fn the_readers_name_bad_lines() {
    let dir = common::scratch("cluster-read");
    let t = dir.path().join("t.txt");
    let l = dir.path().join("l.txt");
    std::fs::write(&t, "\u{feff}first text\nsecond\nthird\n").unwrap();
    std::fs::write(&l, "3\n1\n3\n").unwrap();
    let r = read_texts(&t, Some(&l)).unwrap();
    assert_eq!(r.texts[0], "first text");
    assert_eq!(r.labels, Some(vec![0, 1, 0]));
    assert_eq!(r.names, vec!["3", "1"]);
    std::fs::write(&l, "3\n1\n").unwrap();
    let e = read_texts(&t, Some(&l)).unwrap_err().to_string();
    assert!(e.contains("2 labels for the 3 texts"), "{e}");
    std::fs::write(&l, "3\n\n1\n").unwrap();
    let e = read_texts(&t, Some(&l)).unwrap_err().to_string();
    assert!(e.contains("line 2: an empty label"), "{e}");
    std::fs::write(&t, "a\n\nb\n").unwrap();
    let e = read_texts(&t, None).unwrap_err().to_string();
    assert!(e.contains("line 2: an empty text"), "{e}");
}

#[test]
fn the_stc_files_read() {
    let dir = common::data_root().join("clustering/stc");
    let r = read_texts(
        &dir.join("SearchSnippets.txt"),
        Some(&dir.join("SearchSnippets_gnd.txt")),
    )
    .unwrap();
    assert_eq!(r.texts.len(), 12_340);
    assert_eq!(r.names.len(), 8);
    assert!(!r.texts[0].starts_with('\u{feff}'));
}

fn toy(dir: &std::path::Path) -> (std::path::PathBuf, std::path::PathBuf) {
    let (t, l) = (dir.join("t.txt"), dir.join("l.txt"));
    let mut texts = vec![];
    let mut labels = vec![];
    for i in 0..12 {
        texts.push(format!("the football match ended {i} to nil in the rain"));
        labels.push("sport");
        texts.push(format!("the central bank raised rates by {i} points"));
        labels.push("money");
    }
    std::fs::write(&t, texts.join("\n")).unwrap();
    std::fs::write(&l, labels.join("\n")).unwrap();
    (t, l)
}

#[test]
fn cluster_runs_dec_with_mlm_on_the_tiny_model() {
    let dir = common::scratch("cluster");
    let model = common::tiny_model_dir(dir.path());
    let (t, l) = toy(dir.path());
    let out = dir.path().join("out");
    let s = Settings {
        model: model.clone(),
        output: out.clone(),
        texts: t.clone(),
        labels: Some(l.clone()),
        steps: 6,
        batch_size: 8,
        update_interval: 3,
        tol: 0.0,
        n_init: 2,
        max_len: 24,
        device: tunefuse::train::config::DeviceKind::Cpu,
        ..Default::default()
    };
    let r = cluster(s.clone(), |_| {}).unwrap();
    assert_eq!((r.texts, r.clusters, r.steps), (24, 2, 6));
    assert_eq!(r.refreshes.len(), 2);
    assert!(r.refreshes[0].mlm_loss.is_some() && r.refreshes[0].dec_loss.unwrap() >= 0.0);
    for sc in [r.kmeans_before, r.dec_after, r.kmeans_after] {
        let sc = sc.unwrap();
        assert!((0.5..=1.0).contains(&sc.acc) && (0.0..=1.0).contains(&sc.nmi));
    }
    assert!(out.join("cluster.json").exists());
    let a = std::fs::read_to_string(out.join("assignments.txt")).unwrap();
    assert_eq!(a.lines().count(), 24);
    let e = cluster(s.clone(), |_| {}).unwrap_err().to_string();
    assert!(e.contains("--overwrite"), "{e}");
    let e = cluster(
        Settings {
            clusters: Some(25),
            overwrite: true,
            ..s.clone()
        },
        |_| {},
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("number of texts (24)") && e.contains("25"),
        "{e}"
    );
    let e = cluster(
        Settings {
            labels: None,
            overwrite: true,
            ..s.clone()
        },
        |_| {},
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("--clusters"), "{e}");
    let e = cluster(
        Settings {
            alpha: -1.0,
            overwrite: true,
            ..s
        },
        |_| {},
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("alpha"), "{e}");
}

#[test]
fn the_cli_clusters_without_fine_tuning() {
    let dir = common::scratch("cluster-cli");
    let model = common::tiny_model_dir(dir.path());
    let (t, l) = toy(dir.path());
    let out = dir.path().join("o");
    let o = common::cli(&[
        "cluster",
        "--model",
        model.to_str().unwrap(),
        "--output",
        out.to_str().unwrap(),
        "--texts",
        t.to_str().unwrap(),
        "--labels",
        l.to_str().unwrap(),
        "--steps",
        "0",
        "--device",
        "cpu",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(
        stdout.contains("k-means, pretrained vectors:  ACC"),
        "{stdout}"
    );
    let o = common::cli(&[
        "cluster", "--model", "m", "--output", "o", "--stc", "nosuch",
    ]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("SearchSnippets"));
}
