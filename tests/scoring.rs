//! Essay scoring's pieces: quadratic weighted kappa equals scikit-learn's
//! (tests/data/qwk.json, written by scripts/qwk-golden.py) and is 1 on
//! perfect agreement; ListNet's gradient vanishes at ŷ = y and the loss
//! ignores a constant added to ŷ; τ_1 ≈ 10⁻⁶ and τ_{E/2} = 1/2; the ASAP
//! reader (Latin-1, per-prompt ranges, fold id files) and its errors.
mod common;

use std::path::Path;

use candle_core::{DType, Device, Var};
use tunefuse::train::scoring::{
    asap_fold, listnet_loss, quadratic_weighted_kappa, r2bert_tau, read_asap, rescale,
};

#[test]
fn qwk_equals_scikit_learn() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/qwk.json");
    let cases: Vec<serde_json::Value> =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let ints = |v: &serde_json::Value| -> Vec<i64> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_i64().unwrap())
            .collect()
    };
    for c in &cases {
        let got = quadratic_weighted_kappa(&ints(&c["a"]), &ints(&c["b"])).unwrap();
        let want = c["qwk"].as_f64().unwrap();
        assert!((got - want).abs() < 1e-12, "{c}: {got}");
    }
    assert_eq!(
        quadratic_weighted_kappa(&[3, 5, 9], &[3, 5, 9]).unwrap(),
        1.0
    );
    assert!(quadratic_weighted_kappa(&[2, 2], &[2, 2]).is_err());
    assert!(quadratic_weighted_kappa(&[1, 2], &[1]).is_err());
}

#[test]
fn listnet_and_the_schedule() {
    let y = common::tensor(&[0.1, 0.9, 0.4, 0.6], &[4], DType::F32, &Device::Cpu);
    let v = Var::from_tensor(&y.clone()).unwrap();
    let loss = listnet_loss(v.as_tensor(), &y).unwrap();
    let g = loss.backward().unwrap();
    let grad = common::to_f64(g.get(v.as_tensor()).unwrap());
    assert!(grad.iter().all(|x| x.abs() < 1e-7), "{grad:?}");
    let shifted = (v.as_tensor() + 3.0).unwrap();
    let a = listnet_loss(&shifted, &y)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!((a - loss.to_scalar::<f32>().unwrap()).abs() < 1e-6);
    // A worse ranking costs more.
    let bad = common::tensor(&[0.9, 0.1, 0.6, 0.4], &[4], DType::F32, &Device::Cpu);
    assert!(listnet_loss(&bad, &y).unwrap().to_scalar::<f32>().unwrap() > a);
    for epochs in [4, 10, 30] {
        assert!((r2bert_tau(1, epochs).unwrap() - 1e-6).abs() < 1e-12);
        if epochs % 2 == 0 {
            assert!((r2bert_tau(epochs / 2, epochs).unwrap() - 0.5).abs() < 1e-12);
        }
        assert!(r2bert_tau(epochs, epochs).unwrap() > 0.5);
    }
    assert!(r2bert_tau(1, 2).is_err());
}

#[test]
fn asap_files_are_read_and_bad_ones_named() {
    let dir = common::scratch("asap");
    let tsv = dir.path().join("training_set_rel3.tsv");
    let mut bytes = b"essay_id\tessay_set\tessay\trater1_domain1\tdomain1_score\n".to_vec();
    bytes.extend(b"1\t1\tDear local newspaper, caf\xe9s matter.\t4\t8\n");
    bytes.extend(b"2\t1\tComputers help.\t3\t2\n");
    bytes.extend(b"2978\t2\tCensorship in libraries.\t3\t6\n");
    bytes.extend(b"20716\t8\tA long story.\t30\t45\n");
    std::fs::write(&tsv, &bytes).unwrap();
    let essays = read_asap(&tsv).unwrap();
    assert_eq!(essays.len(), 4);
    assert_eq!(essays[0].text, "Dear local newspaper, caf\u{e9}s matter.");
    assert_eq!((essays[0].prompt, essays[0].score), (1, 8));
    assert!((essays[0].normalised() - 0.6).abs() < 1e-12);
    assert!((essays[2].normalised() - 1.0).abs() < 1e-12);
    assert_eq!(rescale(1, 0.6), 8);
    assert_eq!(rescale(8, 0.75), 45);
    assert_eq!(rescale(2, 1.7), 6);
    let folds = dir.path().join("folds");
    std::fs::create_dir_all(folds.join("fold_0")).unwrap();
    std::fs::write(folds.join("fold_0/train_ids.txt"), "1\n2978\n").unwrap();
    std::fs::write(folds.join("fold_0/dev_ids.txt"), "2\n").unwrap();
    std::fs::write(folds.join("fold_0/test_ids.txt"), "20716\n").unwrap();
    let [tr, dv, te] = asap_fold(&folds, 0, &essays).unwrap();
    assert_eq!((tr.len(), dv.len(), te.len()), (2, 1, 1));
    assert_eq!(te[0].prompt, 8);
    std::fs::write(folds.join("fold_0/test_ids.txt"), "20716\n99\n").unwrap();
    let e = asap_fold(&folds, 0, &essays).unwrap_err().to_string();
    assert!(
        e.contains("line 2: essay 99 is not in the essays file"),
        "{e}"
    );
    // The data folder's real fold files parse (ids only: the essays are not here).
    let real = common::data_root().join("aes/asap/fold_0/test_ids.txt");
    let ids = std::fs::read_to_string(real).unwrap();
    assert!(ids.lines().all(|l| l.trim().parse::<u64>().is_ok()));
    std::fs::write(
        &tsv,
        b"essay_id\tessay_set\tessay\tdomain1_score\n7\t3\tShort.\t4\n",
    )
    .unwrap();
    let e = read_asap(&tsv).unwrap_err().to_string();
    assert!(
        e.contains("line 2") && e.contains("outside prompt 3's range 0-3"),
        "{e}"
    );
    std::fs::write(&tsv, b"essay_id\tessay_set\tessay\n").unwrap();
    assert!(read_asap(&tsv)
        .unwrap_err()
        .to_string()
        .contains("domain1_score"));
}

#[test]
fn the_score_head_trains_with_the_schedule() {
    use tunefuse::train::task::HeadKind;
    use tunefuse::train::trainer::{Config, Metric, Run};
    let dir = common::scratch("score");
    let model = common::tiny_model_dir(dir.path());
    // The loss is τ·MSE + (1 − τ)·ListNet with the epoch's τ.
    let cfg = Config {
        task: "sst5".into(),
        head: HeadKind::Score,
        metric: Metric::Qwk,
        epochs: 4,
        train_examples: Some(16),
        eval_examples: Some(16),
        ..common::small_run(&dir, "lib", model.clone())
    };
    let run = Run::new(cfg).unwrap();
    let b = run.batch(&run.train, &[0, 1, 2, 3, 4, 5]).unwrap();
    let labels = common::to_f64(&b.labels);
    assert!(labels.iter().all(|v| (0.0..=1.0).contains(v)));
    let want: Vec<f64> = (0..6)
        .map(|i| run.train.examples[i].label as f64 / 4.0)
        .collect();
    common::assert_close("normalised targets", &labels, &want, 1e-6, 0.0);
    let out = common::tensor(
        &[0.2, 0.5, 0.9, 0.1, 0.4, 0.6],
        &[6],
        DType::F32,
        &Device::Cpu,
    );
    let mse = tunefuse::train::task::squared_error(&out, &b.labels)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap() as f64;
    let rank = listnet_loss(&out, &b.labels)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap() as f64;
    for epoch in 0..4 {
        run.head.at_epoch(epoch, 4).unwrap();
        let tau = r2bert_tau(epoch + 1, 4).unwrap();
        let got = run
            .head
            .loss(&out, &b.labels)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap() as f64;
        assert!(
            (got - (tau * mse + (1.0 - tau) * rank)).abs() < 1e-5,
            "epoch {epoch}"
        );
    }

    let out = dir.path().join("cli");
    let data = common::data_root();
    let base = [
        "finetune",
        "--model",
        model.to_str().unwrap(),
        "--task",
        "sst5",
        "--score",
        "--data-dir",
        data.to_str().unwrap(),
        "--device",
        "cpu",
        "--train-examples",
        "24",
        "--set",
        "eval_examples=24",
        "--batch-size",
        "8",
        "--max-len",
        "16",
        "--output",
        out.to_str().unwrap(),
    ];
    let mut args = base.to_vec();
    args.extend(["--epochs", "3"]);
    let o = common::cli(&args);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let s: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("summary.json")).unwrap()).unwrap();
    assert_eq!(s["metric"], "qwk");
    let qwk = s["last"]["qwk"].as_f64().unwrap();
    assert!((-1.0..=1.0).contains(&qwk), "{s}");
    assert!(s["last"]["pearson"].as_f64().unwrap().is_finite());
    let mut args = base.to_vec();
    args.extend(["--epochs", "2", "--overwrite"]);
    let e = String::from_utf8_lossy(&common::cli(&args).stderr).into_owned();
    assert!(e.contains("at least 3 epochs"), "{e}");
    args.extend(["--set", "score_ranking=false"]);
    let o = common::cli(&args);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let e = String::from_utf8_lossy(
        &common::cli(&[
            "export",
            "--checkpoint",
            out.join("best").to_str().unwrap(),
            "--output",
            "x",
        ])
        .stderr,
    )
    .into_owned();
    assert!(e.contains("sigmoid"), "{e}");
}
