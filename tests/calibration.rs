//! `calibrate` and `eval`'s calibration and detection options on a tiny
//! model trained on a CSV file: the stored temperature is applied (the
//! accuracy unchanged, the dev NLL the fitted one), refused for other
//! weights and beside MC dropout; MC dropout averages stochastic passes;
//! OOD detection against TREC's test set (from ../shared/data) reports
//! every score and writes the histograms.
mod common;

use std::path::Path;
use std::process::{Command, Output};

fn tunefuse(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_tunefuse"))
        .args(args)
        .output()
        .unwrap()
}

fn ok(args: &[&str]) -> serde_json::Value {
    let o = tunefuse(args);
    assert!(
        o.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    serde_json::from_slice(&o.stdout).unwrap()
}

fn err(args: &[&str]) -> String {
    let o = tunefuse(args);
    assert!(!o.status.success(), "{args:?} should fail");
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn temperature_mc_dropout_and_ood_detection() {
    let dir = common::scratch("calibration");
    let model = common::tiny_model_dir(dir.path());
    let mut train = String::from("text,label\n");
    for i in 0..48 {
        let (t, l) = [
            ("a fine moving film", "pos"),
            ("a dull tired film", "neg"),
            ("fine acting and a warm story", "pos"),
            ("tired jokes and a dull plot", "neg"),
        ][i % 4];
        train.push_str(&format!("{t} {i},{l}\n"));
    }
    let data = dir.path().join("t.csv");
    std::fs::write(&data, train).unwrap();
    let out = dir.path().join("run");
    let args = common::own_data_args(&model, &data, &data, &out, &["--lr", "1e-3"]);
    let a: Vec<&str> = args.iter().map(String::as_str).collect();
    let o = tunefuse(&a);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let best = out.join("best");
    let best = s(&best);

    let predict = || -> Vec<serde_json::Value> {
        let o = tunefuse(&["predict", "--checkpoint", best, "--file", s(&data)]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        String::from_utf8(o.stdout)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    };
    let before = predict();
    let plain = ok(&["eval", "--checkpoint", best]);
    assert!(plain.get("temperature").is_none(), "{plain}");
    let t = ok(&["calibrate", "--checkpoint", best]);
    let temp = t["temperature"].as_f64().unwrap();
    assert!(temp > 0.05 && temp < 20.0, "{t}");
    assert!(t["nll_after"].as_f64() <= t["nll_before"].as_f64(), "{t}");
    // eval applies it: the accuracy is the same, the NLL the fitted one.
    let scaled = ok(&["eval", "--checkpoint", best]);
    assert_eq!(scaled["temperature"].as_f64(), Some(temp));
    assert_eq!(scaled["accuracy"], plain["accuracy"]);
    let (nll, fitted) = (
        scaled["nll"].as_f64().unwrap(),
        t["nll_after"].as_f64().unwrap(),
    );
    assert!((nll - fitted).abs() < 1e-9, "{nll} vs {fitted}");
    assert_eq!(
        ok(&["eval", "--checkpoint", best, "--no-temperature"])["nll"],
        plain["nll"]
    );
    // predict applies it too: the same predictions, softened or sharpened
    // probabilities.
    let after = predict();
    for (a, b) in after.iter().zip(&before) {
        assert_eq!(a["predicted"], b["predicted"]);
    }
    assert_ne!(after[0]["probabilities"], before[0]["probabilities"]);
    // MC dropout is a separate baseline.
    let e = err(&["eval", "--checkpoint", best, "--mc-dropout", "4"]);
    assert!(e.contains("--no-temperature"), "{e}");
    let mc = ok(&[
        "eval",
        "--checkpoint",
        best,
        "--mc-dropout",
        "4",
        "--no-temperature",
    ]);
    assert_eq!(mc["mc_dropout"], 4);
    assert_ne!(
        mc["nll"], plain["nll"],
        "dropout passes change the probabilities"
    );
    // OOD detection against TREC's test questions.
    let data_root = common::data_root();
    let stem = dir.path().join("conf");
    let r = ok(&[
        "eval",
        "--checkpoint",
        best,
        "--ood",
        "trec",
        "--ood-examples",
        "40",
        "--data-dir",
        s(&data_root),
        "--plot",
        s(&stem),
    ]);
    let trec = &r["ood"]["trec"];
    for k in [
        "auroc",
        "aupr_in",
        "aupr_out",
        "fpr_at_95_tpr",
        "nbaucc_05",
        "nbaucc_1",
    ] {
        let v = trec[k].as_f64().unwrap_or_else(|| panic!("{k}: {r}"));
        assert!((0.0..=1.0).contains(&v), "{k} = {v}");
    }
    assert!(stem.with_extension("png").exists() && stem.with_extension("svg").exists());
    let e = err(&["eval", "--checkpoint", best, "--ood", "imdb"]);
    assert!(e.contains("imdb") && e.contains("trec"), "{e}");
    // A temperature fitted for other weights is refused.
    let tf = Path::new(best).join("temperature.json");
    let mut rec: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&tf).unwrap()).unwrap();
    rec["model_fingerprint"] = "0000".into();
    std::fs::write(&tf, rec.to_string()).unwrap();
    let e = err(&["eval", "--checkpoint", best]);
    assert!(
        e.contains("calibrate") && e.contains("other weights"),
        "{e}"
    );
}

/// `freeze_layers`: −1 leaves the top layer as it was, +1 the embeddings
/// and the bottom layer; every other weight of the backbone trains.
#[test]
fn freeze_layers_keeps_those_layers_pretrained() {
    let dir = common::scratch("freeze-layers");
    let model = common::tiny_model_dir(dir.path());
    let data = common::labelled_csv(dir.path(), &["a fine film,pos", "a dull film,neg"], 16);
    let load = |p: &Path| candle_core::safetensors::load(p, &candle_core::Device::Cpu).unwrap();
    let base = load(&model.join("model.safetensors"));
    let layers = base
        .keys()
        .filter_map(|k| {
            k.strip_prefix("encoder.layer.")?
                .split('.')
                .next()?
                .parse::<usize>()
                .ok()
        })
        .max()
        .unwrap()
        + 1;
    for k in [-1i64, 1] {
        let out = dir.path().join(format!("run{k}"));
        let args = common::own_data_args(
            &model,
            &data,
            &data,
            &out,
            &["--lr", "1e-2", "--set", &format!("freeze_layers={k}")],
        );
        let a: Vec<&str> = args.iter().map(String::as_str).collect();
        let o = tunefuse(&a);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let best = load(&out.join("best/model.safetensors"));
        let frozen = |name: &str| -> bool {
            let layer = name
                .strip_prefix("encoder.layer.")
                .and_then(|r| r.split('.').next()?.parse::<usize>().ok());
            match (k, layer) {
                (-1, Some(l)) => l + 1 == layers,
                (1, Some(l)) => l == 0,
                (1, None) => name.starts_with("embeddings."),
                _ => false,
            }
        };
        let (mut kept, mut moved) = (0, 0);
        // The checkpoint holds what the optimiser trained: a frozen
        // parameter is absent, or (were it saved) unchanged.
        for (name, w) in &base {
            let d = best
                .get(name)
                .map(|t| common::max_abs_diff(&common::to_f64(t), &common::to_f64(w)));
            if frozen(name) {
                assert!(
                    d.is_none_or(|d| d == 0.0),
                    "freeze_layers={k}: {name} moved by {d:?}"
                );
                kept += 1;
            } else if name.contains(".weight") && !name.starts_with("pooler.") {
                assert!(d.is_some(), "freeze_layers={k}: {name} was not trained");
                moved += usize::from(d.is_some_and(|d| d > 0.0));
            }
        }
        assert!(
            kept > 0 && moved > 0,
            "freeze_layers={k}: {kept} kept, {moved} moved"
        );
    }
}

/// Kong et al.'s pieces: soft cross-entropy on one-hot targets is the
/// cross-entropy; −H reaches −log K at uniform outputs; mixed labels are
/// distributions; a signed step stays in its box.
#[test]
fn manifold_smoothing_pieces() {
    use candle_core::{Device, Tensor};
    use tunefuse::train::methods::manifold::*;
    let dev = Device::Cpu;
    let logits = Tensor::new(&[[1.0f32, -0.5, 2.0], [0.3, 0.1, -1.0]], &dev).unwrap();
    let labels = Tensor::new(&[2u32, 0], &dev).unwrap();
    let y = mixed_labels(&[2, 0], &[0, 2], 3, 0.0);
    let y = Tensor::from_vec(y, (2, 3), &dev).unwrap();
    let soft: f32 = soft_cross_entropy(&logits, &y)
        .unwrap()
        .to_scalar()
        .unwrap();
    let hard: f32 = tunefuse::train::trainer::cross_entropy(&logits, &labels, 0.0)
        .unwrap()
        .to_scalar()
        .unwrap();
    assert!((soft - hard).abs() < 1e-6, "{soft} vs {hard}");
    let flat = Tensor::zeros((4, 5), candle_core::DType::F32, &dev).unwrap();
    let h: f32 = neg_entropy(&flat).unwrap().to_scalar().unwrap();
    assert!((h + 5f32.ln()).abs() < 1e-6, "{h}");
    let sharp = Tensor::new(&[[50.0f32, 0.0]], &dev).unwrap();
    let h: f32 = neg_entropy(&sharp).unwrap().to_scalar().unwrap();
    assert!(h.abs() < 1e-6 && h <= 0.0, "{h}");
    let m = mixed_labels(&[1, 0, 2], &[2, 0, 1], 3, 0.1);
    for row in m.chunks(3) {
        assert!((row.iter().sum::<f32>() - 1.0).abs() < 1e-6, "{row:?}");
    }
    assert_eq!(&m[3..6], &[1.0, 0.0, 0.0], "a partner of the same class");
    let centre = Tensor::new(&[0.5f32, -0.2, 0.0, 1.0], &dev).unwrap();
    let start = Tensor::new(&[0.50008f32, -0.20009, 0.00002, 0.99991], &dev).unwrap();
    let g = Tensor::new(&[1.0f32, -3.0, 0.0, 2.0], &dev).unwrap();
    let x: Vec<f32> = signed_step(&start, &g, 1e-4, &centre, 1e-4)
        .unwrap()
        .to_vec1()
        .unwrap();
    let c: Vec<f32> = centre.to_vec1().unwrap();
    for (a, b) in x.iter().zip(&c) {
        assert!(
            (a - b).abs() <= 1e-4 + 1e-7,
            "{x:?} left the box around {c:?}"
        );
    }
    // The step went the gradient's way where the box allowed.
    assert!(x[2] > 0.0 && x[1] < -0.2);
}

/// The manifold term trains a classifier, logs under its name, and is
/// refused for a regression head.
#[test]
fn manifold_smoothing_trains_and_refuses_regression() {
    let dir = common::scratch("manifold");
    let model = common::tiny_model_dir(dir.path());
    let data = common::labelled_csv(dir.path(), &["a fine film,1", "a dull film,0"], 16);
    let out = dir.path().join("run");
    let args = common::own_data_args(&model, &data, &data, &out, &["--method", "manifold"]);
    let a: Vec<&str> = args.iter().map(String::as_str).collect();
    let o = tunefuse(&a);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let log = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    let step: serde_json::Value = log
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .find(|l| l.get("terms").is_some())
        .unwrap();
    let v = step["terms"]["manifold"].as_f64().unwrap();
    assert!(v.is_finite(), "{step}");
    let out = dir.path().join("reg");
    let args = common::own_data_args(
        &model,
        &data,
        &data,
        &out,
        &["--method", "manifold", "--regression"],
    );
    let a: Vec<&str> = args.iter().map(String::as_str).collect();
    let e = err(&a);
    assert!(
        e.contains("manifold") && e.contains("classification"),
        "{e}"
    );
}
