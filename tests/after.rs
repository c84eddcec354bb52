//! AFTER's domain-adversarial term: with λ = 0 the encoder trains exactly
//! as plain fine-tuning does while the domain classifier learns; with λ > 0
//! the encoder changes; the annealed λ follows DANN's schedule; bad
//! settings are refused before training, naming them; a checkpoint
//! evaluates without its auxiliary corpus.
mod common;

use std::collections::HashMap;

use candle_core::Tensor;
use tunefuse::train::methods::{AfterConfig, Method};
use tunefuse::train::run::Run;
use tunefuse::train::trainer::Config;

fn aux_file(dir: &std::path::Path) -> String {
    let p = dir.join("aux.txt");
    let lines: Vec<String> = (0..30)
        .map(|i| format!("the kettle number {i} boils water quickly and the lid fits"))
        .collect();
    std::fs::write(&p, lines.join("\n")).unwrap();
    p.to_string_lossy().into_owned()
}

fn params(run: &Run) -> HashMap<String, Tensor> {
    run.opt
        .params
        .iter()
        .map(|p| (p.name.clone(), p.var.as_tensor().copy().unwrap()))
        .collect()
}

fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// A run of the tiny model without dropout or clipping (so that an extra
/// head's gradients and an extra forward pass cannot change the encoder's
/// update by themselves).
fn run(dir: &tempfile::TempDir, out: &str, methods: Vec<Method>) -> Run {
    let cfg = Config {
        methods,
        dropout: Some(0.0),
        clip: 0.0,
        epochs: 1,
        ..common::small_run(dir, out, common::tiny_model_dir(dir.path()))
    };
    let mut r = Run::new(cfg).unwrap();
    r.fit(false, |_| ()).unwrap();
    r
}

#[test]
fn lambda_zero_is_plain_fine_tuning_and_lambda_above_zero_is_not() {
    let dir = common::scratch("after");
    let aux = aux_file(dir.path());
    let after = |lambda: f64| {
        Method::After(AfterConfig {
            aux: aux.clone(),
            lambda,
            ..Default::default()
        })
    };
    let plain = params(&run(&dir, "plain", vec![]));
    let zero_run = run(&dir, "zero", vec![after(0.0)]);
    let zero = params(&zero_run);
    let strong = params(&run(&dir, "strong", vec![after(1.0)]));
    let (mut compared, mut moved) = (0, 0.0f32);
    for (name, p) in &plain {
        let z = &zero[name];
        assert_eq!(max_diff(p, z), 0.0, "{name} differs with lambda = 0");
        compared += 1;
        if name.starts_with("encoder.") {
            moved = moved.max(max_diff(p, &strong[name]));
        }
    }
    assert!(compared > 10);
    assert!(moved > 0.0, "lambda = 1 left the encoder as plain training");
    // The domain classifier is trained (it moved from its initial value).
    let init = Run::new(Config {
        methods: vec![after(0.0)],
        dropout: Some(0.0),
        ..common::small_run(&dir, "init", common::tiny_model_dir(dir.path()))
    })
    .unwrap();
    let w0 = params(&init)["domain.classifier.weight"].clone();
    assert!(max_diff(&w0, &zero["domain.classifier.weight"]) > 0.0);
    let logged = std::fs::read_to_string(dir.path().join("zero/metrics.jsonl")).unwrap();
    assert!(
        logged.contains("\"after\""),
        "the term's value is not logged"
    );
}

#[test]
fn the_annealed_lambda_follows_dann() {
    let mut cfg = AfterConfig {
        aux: "x".into(),
        lambda: 0.5,
        anneal: true,
        gamma: 10.0,
    };
    assert_eq!(cfg.lambda_at(0.0), 0.0);
    let half = 0.5 * (2.0 / (1.0 + (-5.0f64).exp()) - 1.0);
    assert!((cfg.lambda_at(0.5) - half).abs() < 1e-15);
    assert!((cfg.lambda_at(1.0) - 0.5 * 0.999_909_2).abs() < 1e-6);
    // Before any step no gradient is reversed yet.
    let t = tunefuse::train::methods::after::After::new(cfg.clone());
    assert_eq!(t.lambda(), 0.0);
    cfg.anneal = false;
    assert_eq!(cfg.lambda_at(0.0), 0.5);
    assert_eq!(cfg.lambda_at(0.7), 0.5);
}

#[test]
fn bad_settings_are_refused_before_training() {
    let dir = common::scratch("after-bad");
    let model = common::tiny_model_dir(dir.path());
    let err = |m: AfterConfig| {
        let cfg = Config {
            methods: vec![Method::After(m)],
            ..common::small_run(&dir, "bad", model.clone())
        };
        match Run::new(cfg) {
            Ok(_) => panic!("accepted"),
            Err(e) => e.to_string(),
        }
    };
    let e = err(AfterConfig::default());
    assert!(
        e.contains("auxiliary corpus") && e.contains("after.aux"),
        "{e}"
    );
    let e = err(AfterConfig {
        aux: "sst2@dev".into(),
        ..Default::default()
    });
    assert!(e.contains("main task's own data"), "{e}");
    let e = err(AfterConfig {
        aux: "trec".into(),
        lambda: -0.1,
        ..Default::default()
    });
    assert!(e.contains("lambda") && e.contains("-0.1"), "{e}");
    let empty = dir.path().join("empty.txt");
    std::fs::write(&empty, "\n\n").unwrap();
    let e = err(AfterConfig {
        aux: empty.to_string_lossy().into_owned(),
        ..Default::default()
    });
    assert!(e.contains("holds no text"), "{e}");
    assert!(!dir.path().join("bad").exists());
}

#[test]
fn a_checkpoint_evaluates_on_its_auxiliary_domain() {
    // Training with the main task's own data as the auxiliary corpus is
    // refused; evaluating a checkpoint on its auxiliary (target) domain, as
    // cross-domain transfer is measured, is not.
    let dir = common::scratch("after-target");
    let model = common::tiny_model_dir(dir.path());
    let cfg = Config {
        task: "amazon:kitchen".into(),
        methods: vec![Method::After(AfterConfig {
            aux: "amazon:kitchen".into(),
            ..Default::default()
        })],
        ..common::small_run(&dir, "target", model)
    };
    let e = Run::new(cfg.clone())
        .err()
        .expect("training accepted")
        .to_string();
    assert!(e.contains("main task's own data"), "{e}");
    Run::for_checkpoint(cfg, vec!["0".into(), "1".into()]).unwrap();
}

#[test]
fn the_cli_trains_with_after_and_evaluates_its_checkpoint() {
    let dir = common::scratch("after-cli");
    let model = common::tiny_model_dir(dir.path());
    let aux = aux_file(dir.path());
    let out = dir.path().join("run");
    let set = format!("after.aux={aux}");
    let args = common::finetune_args(
        &model,
        &common::data_root(),
        &out,
        &[
            "--method",
            "after",
            "--set",
            &set,
            "--set",
            "after.anneal=true",
        ],
    );
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let o = common::cli(&args);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    // The checkpoint evaluates without reading the auxiliary corpus.
    std::fs::remove_file(&aux).unwrap();
    let best = out.join("best");
    let o = common::cli(&[
        "eval",
        "--checkpoint",
        best.to_str().unwrap(),
        "--data-dir",
        common::data_root().to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}
