//! `analyze`: linear CKA against the kernel (Gram-matrix) form of its
//! definition and its invariances; RSA's; a checkpoint whose encoder did
//! not move (every layer frozen, only the head trained) has CKA and RSA 1,
//! cosine distance 0 and attention JS 0 at every layer and a layer × layer
//! CKA matrix with 1 on its diagonal, one that trained does not; the layer
//! ablation of the unmoved encoder changes nothing; the files and plots of
//! --output.
mod common;

use candle_core::{DType, Device, Tensor};
use tunefuse::train::analyze::{linear_cka, rsa};

fn matrix(n: usize, p: usize, seed: u64) -> Tensor {
    let v = common::randn(n * p, seed, 1.0);
    common::tensor(&v, &[n, p], DType::F64, &Device::Cpu)
}

/// CKA as Kornblith et al. define it: HSIC of the centred Gram matrices
/// K = XXᵀ, L = YYᵀ, normalised.
fn cka_by_gram(x: &Tensor, y: &Tensor) -> f64 {
    let n = x.dim(0).unwrap();
    let h = (Tensor::eye(n, DType::F64, &Device::Cpu).unwrap()
        - Tensor::ones((n, n), DType::F64, &Device::Cpu).unwrap() / n as f64)
        .unwrap();
    let centred = |g: Tensor| h.matmul(&g).unwrap().matmul(&h).unwrap();
    let k = centred(x.matmul(&x.t().unwrap()).unwrap());
    let l = centred(y.matmul(&y.t().unwrap()).unwrap());
    let dot = |a: &Tensor, b: &Tensor| -> f64 {
        (a * b)
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f64>()
            .unwrap()
    };
    dot(&k, &l) / (dot(&k, &k).sqrt() * dot(&l, &l).sqrt())
}

#[test]
fn linear_cka_matches_its_definition_and_invariances() {
    let x = matrix(40, 6, 1);
    let y = (matrix(40, 6, 2) + (&x * 0.5).unwrap()).unwrap();
    let (got, want) = (linear_cka(&x, &y).unwrap(), cka_by_gram(&x, &y));
    assert!((got - want).abs() < 1e-12, "{got} vs {want}");
    assert!(got > 0.05 && got < 0.95, "{got}");
    // Invariant to an orthogonal map and isotropic scaling, and to a shift.
    let q = Tensor::new(
        &[[0.6f64, 0.8, 0.0], [-0.8, 0.6, 0.0], [0.0, 0.0, 1.0]],
        &Device::Cpu,
    )
    .unwrap();
    let x3 = matrix(30, 3, 5);
    let z = ((x3.matmul(&q).unwrap() * 3.0).unwrap() + 7.0).unwrap();
    assert!((linear_cka(&x3, &z).unwrap() - 1.0).abs() < 1e-12);
    assert!((linear_cka(&x, &x).unwrap() - 1.0).abs() < 1e-12);
    assert!(linear_cka(&x, &matrix(39, 6, 3)).is_err());
    assert!(linear_cka(
        &Tensor::ones((5, 2), DType::F64, &Device::Cpu).unwrap(),
        &x3.narrow(0, 0, 5).unwrap()
    )
    .is_err());
}

#[test]
fn rsa_is_one_for_the_same_geometry() {
    let x = matrix(30, 4, 1);
    assert!((rsa(&x, &x).unwrap() - 1.0).abs() < 1e-12);
    // Cosine distances ignore rotations and scale.
    let q = Tensor::new(
        &[
            [0.6f64, 0.8, 0.0, 0.0],
            [-0.8, 0.6, 0.0, 0.0],
            [0.0, 0.0, 0.0, 1.0],
            [0.0, 0.0, 1.0, 0.0],
        ],
        &Device::Cpu,
    )
    .unwrap();
    let z = (x.matmul(&q).unwrap() * 2.5).unwrap();
    assert!((rsa(&x, &z).unwrap() - 1.0).abs() < 1e-12);
    let r = rsa(&x, &matrix(30, 4, 2)).unwrap();
    assert!(r.abs() < 0.5, "{r}");
    assert!(rsa(&x, &matrix(29, 4, 2)).is_err());
    assert!(rsa(&matrix(2, 4, 1), &matrix(2, 4, 2)).is_err());
}

#[test]
fn analyze_sees_what_training_changed() {
    let dir = common::scratch("analyze");
    let model = common::tiny_model_dir(dir.path());
    let data = common::labelled_csv(
        dir.path(),
        &["a fine moving film,pos", "a dull tired film,neg"],
        16,
    );
    let bin = env!("CARGO_BIN_EXE_tunefuse");
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(model.join("config.json")).unwrap()).unwrap();
    let all = format!("freeze_layers={}", cfg["num_hidden_layers"]);
    let analyze = |tag: &str, extra: &[&str]| -> serde_json::Value {
        let out = dir.path().join(format!("run-{tag}"));
        let args = common::own_data_args(&model, &data, &data, &out, extra);
        let o = std::process::Command::new(bin)
            .args(&args)
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let best = out.join("best");
        let o = std::process::Command::new(bin)
            .args([
                "analyze",
                "--checkpoint",
                best.to_str().unwrap(),
                "--examples",
                "8",
                "--sample-tokens",
                "40",
                "--ablate",
                "--output",
                out.join("analysis").to_str().unwrap(),
            ])
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        serde_json::from_slice(&o.stdout).unwrap()
    };
    let same = analyze("frozen", &["--lr", "5e-2", "--set", &all]);
    let layers = same["layers"].as_array().unwrap();
    assert!(layers.len() >= 2 && same["tokens"].as_u64().unwrap() > 8);
    for l in layers {
        assert!((l["cka"].as_f64().unwrap() - 1.0).abs() < 1e-9, "{l}");
        assert!((l["rsa"].as_f64().unwrap() - 1.0).abs() < 1e-9, "{l}");
        assert!(l["cosine_distance"].as_f64().unwrap().abs() < 1e-9, "{l}");
    }
    assert_eq!(same["sample_tokens"], 40);
    let m = same["cka_matrix"].as_array().unwrap();
    assert_eq!(m.len(), layers.len());
    for (i, row) in m.iter().enumerate() {
        let row = row.as_array().unwrap();
        assert_eq!(row.len(), layers.len());
        assert!((row[i].as_f64().unwrap() - 1.0).abs() < 1e-9, "{same}");
        assert!(row
            .iter()
            .all(|v| (0.0..=1.0 + 1e-9).contains(&v.as_f64().unwrap())));
    }
    // Restoring pretrained layers the encoder never left changes nothing.
    let abl = same["ablation"].as_array().unwrap();
    assert_eq!(abl.len(), layers.len());
    assert!(
        abl.iter().all(|a| a["metric"] == abl[0]["metric"]),
        "{same}"
    );
    let files = dir.path().join("run-frozen/analysis");
    for f in [
        "analysis.json",
        "layers.csv",
        "attention_js.csv",
        "cka_matrix.csv",
        "ablation.csv",
        "layers.png",
        "attention_js.svg",
        "cka_matrix.png",
        "ablation.svg",
    ] {
        assert!(files.join(f).is_file(), "{f} missing");
    }
    let csv = std::fs::read_to_string(files.join("layers.csv")).unwrap();
    assert_eq!(csv.lines().count(), layers.len() + 1);
    assert!(
        csv.starts_with("layer,cka,rsa,cosine_distance\n0,1"),
        "{csv}"
    );
    for v in same["attention_js"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|r| r.as_array().unwrap())
    {
        assert!(v.as_f64().unwrap().abs() < 1e-9, "{same}");
    }
    let moved = analyze("trained", &["--lr", "5e-2"]);
    let top = moved["layers"].as_array().unwrap().last().unwrap().clone();
    assert!(top["cka"].as_f64().unwrap() < 0.999, "{moved}");
    assert!(top["cosine_distance"].as_f64().unwrap() > 1e-4, "{moved}");
    assert!(top["rsa"].as_f64().unwrap() < 0.999, "{moved}");
    let diag_top = moved["cka_matrix"]
        .as_array()
        .unwrap()
        .last()
        .unwrap()
        .as_array()
        .unwrap();
    assert!(
        diag_top.last().unwrap().as_f64().unwrap() < 0.999,
        "{moved}"
    );
    let abl = moved["ablation"].as_array().unwrap();
    assert_eq!(abl.len(), layers.len());
    assert!(abl
        .iter()
        .all(|a| a["metric"].as_f64().unwrap().is_finite()));
    let js_top: f64 = moved["attention_js"]
        .as_array()
        .unwrap()
        .last()
        .unwrap()
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap())
        .sum();
    assert!(js_top > 0.0 && js_top.is_finite(), "{moved}");
}
