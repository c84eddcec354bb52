//! Meta Fine-Tuning: typicality is 1 for a point on both centroids and
//! follows the ½/½ cosine formula; the corruption layers are the
//! reference's for 12 blocks and scale with depth; the meta-learner trains
//! on the tiny model, writes a model directory that fine-tuning starts
//! from, and refuses bad settings with their name.
mod common;

use tunefuse::train::mft::{corruption_layers, meta_finetune, typicality, Settings};

#[test]
fn typicality_is_one_on_both_centroids_and_follows_the_formula() {
    // Domain 0 and 1, class 0 and 1; every point of a (domain, class) is
    // its centroid, and both domains' centroids of a class coincide.
    let emb = vec![
        vec![1.0, 0.0],
        vec![1.0, 0.0],
        vec![0.0, 1.0],
        vec![0.0, 1.0],
    ];
    let w = typicality(&emb, &[0, 1, 0, 1], &[0, 0, 1, 1]);
    for x in &w {
        assert!((x - 1.0).abs() < 1e-12, "{w:?}");
    }
    // An off-centre point: ½·cos(e, own centroid) + ½·cos(e, other domain's).
    let emb = vec![vec![1.0, 0.0], vec![1.0, 1.0], vec![0.0, 1.0]];
    let w = typicality(&emb, &[0, 0, 1], &[0, 0, 0]);
    // Domain 0's centroid (1, 0.5); domain 1's (0, 1).
    let cos = |a: [f64; 2], b: [f64; 2]| {
        (a[0] * b[0] + a[1] * b[1]) / ((a[0].hypot(a[1])) * (b[0].hypot(b[1])))
    };
    let want0 = 0.5 * cos([1.0, 0.0], [1.0, 0.5]) + 0.5 * cos([1.0, 0.0], [0.0, 1.0]);
    let want1 = 0.5 * cos([1.0, 1.0], [1.0, 0.5]) + 0.5 * cos([1.0, 1.0], [0.0, 1.0]);
    assert!(
        (w[0] - want0).abs() < 1e-6 && (w[1] - want1).abs() < 1e-6,
        "{w:?}"
    );
    // A class no other domain has: the own-centroid cosine alone.
    let w = typicality(&[vec![2.0, 0.0], vec![0.0, 3.0]], &[0, 1], &[0, 1]);
    assert_eq!(w, vec![1.0, 1.0]);
}

#[test]
fn corruption_layers_are_the_references_and_scale_with_depth() {
    assert_eq!(corruption_layers(12), vec![2, 5, 8, 11]);
    assert_eq!(corruption_layers(6), vec![1, 2, 4, 5]);
    assert_eq!(corruption_layers(3), vec![0, 1, 2]);
    assert_eq!(corruption_layers(1), vec![0]);
}

#[test]
fn shuffled_domain_labels_are_a_permutation_of_the_batchs() {
    use tunefuse::train::mft::shuffled;
    use tunefuse::train::mlm::Draws;
    let labels: Vec<u32> = (0..40).map(|i| (i % 3) as u32).collect();
    let mut draws = Draws::new(7, 1);
    let mut moved = 0;
    for _ in 0..50 {
        let p = shuffled(&labels, &mut draws);
        let (mut a, mut b) = (p.clone(), labels.clone());
        a.sort_unstable();
        b.sort_unstable();
        assert_eq!(a, b, "not a permutation of the batch's labels");
        moved += usize::from(p != labels);
    }
    // Draws advance: the orders are not the identity (or all alike).
    assert!(moved >= 45, "only {moved} of 50 shuffles moved a label");
    assert!(shuffled(&[], &mut draws).is_empty());
}

fn settings(dir: &tempfile::TempDir, out: &str, domains: &[&str]) -> Settings {
    Settings {
        model: common::tiny_model_dir(dir.path()),
        output: dir.path().join(out),
        domains: domains.iter().map(|s| s.to_string()).collect(),
        data_dir: Some(common::data_root()),
        epochs: 1,
        batch_size: 8,
        max_len: 32,
        max_examples: Some(16),
        device: tunefuse::train::config::DeviceKind::Cpu,
        log_every: 1,
        ..Default::default()
    }
}

#[test]
fn the_meta_learner_trains_and_writes_a_model_fine_tuning_starts_from() {
    let dir = common::scratch("mft");
    let s = settings(&dir, "meta", &["amazon:books", "amazon:dvd"]);
    let r = meta_finetune(s, |_| {}).unwrap();
    assert_eq!(r.steps, 4);
    assert_eq!(r.examples.len(), 2);
    assert_eq!(r.layers, vec![0, 1, 2]);
    let (lo, mean, hi) = r.weights;
    assert!(
        lo <= mean && mean <= hi && hi <= 1.0 + 1e-9 && lo > -1.0,
        "{:?}",
        r.weights
    );
    assert!(r.losses.iter().all(|l| l.1.is_finite() && l.2 > 0.0));
    let out = dir.path().join("meta");
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg["architectures"][0], "BertModel");
    assert!(out.join("mft.json").exists());
    let stored =
        candle_core::safetensors::load(out.join("model.safetensors"), &candle_core::Device::Cpu)
            .unwrap();
    assert!(stored
        .keys()
        .all(|k| !k.contains("mft.") && !k.contains("classifier")));
    // Per-domain fine-tuning from the meta-learner.
    let cfg = tunefuse::train::trainer::Config {
        task: "amazon:books".into(),
        epochs: 1,
        ..common::small_run(&dir, "books", out.clone())
    };
    tunefuse::train::run::Run::new(cfg)
        .unwrap()
        .fit(false, |_| ())
        .unwrap();
}

#[test]
fn bad_settings_are_refused_with_their_name() {
    let dir = common::scratch("mft-bad");
    let err = |s: Settings| meta_finetune(s, |_| {}).unwrap_err().to_string();
    let e = err(settings(&dir, "o", &["amazon:books"]));
    assert!(e.contains("two domains"), "{e}");
    let e = err(settings(&dir, "o", &["amazon:books", "trec"]));
    assert!(e.contains("labels") && e.contains("share"), "{e}");
    let e = err(settings(&dir, "o", &["amazon:books", "amazon:books"]));
    assert!(e.contains("listed twice"), "{e}");
    let e = err(settings(&dir, "o", &["amazon:books", "ner:ncbi-disease"]));
    assert!(e.contains("token task"), "{e}");
    let e = err(Settings {
        corruption_weight: f64::INFINITY,
        ..settings(&dir, "o", &["amazon:books", "amazon:dvd"])
    });
    assert!(e.contains("corruption_weight"), "{e}");
    assert!(!dir.path().join("o").exists());
}
