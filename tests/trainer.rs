//! The trainer on the real MiniLM and SST-2 (tiny subsamples, CPU):
//! learning happens, resume reproduces an uninterrupted run exactly, the
//! methods run, and bad configurations fail before training.
mod common;

use common::*;
use tunefuse::train::optim::{AdamW, AdamWParams, Param, RecAdam, Schedule};
use tunefuse::train::trainer::{Config, Run};

fn tiny(out: &str, methods: &[&str]) -> Config {
    Config {
        task: "sst2".into(),
        model: minilm_dir(),
        data_dir: Some(data_root()),
        output: std::env::temp_dir().join(format!("tunefuse-trainer-{out}-{}", std::process::id())),
        methods: methods.iter().map(|s| s.to_string()).collect(),
        epochs: 2,
        batch_size: 8,
        train_examples: Some(24),
        eval_examples: Some(24),
        eval_every: 2,
        log_every: 1,
        max_len: 32,
        device: "cpu".into(),
        ..Config::default()
    }
}

fn lines(cfg: &Config) -> Vec<serde_json::Value> {
    std::fs::read_to_string(cfg.output.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn resume_reproduces_an_uninterrupted_run() {
    // SMART with Bregman proximal point: the resumed state includes the
    // optimiser moments, the dropout and noise streams and θ̃.
    let mut full = tiny("full", &["smart"]);
    full.bregman.mu = 1.0;
    full.bregman.beta = 0.5;
    let s_full = Run::new(full.clone()).unwrap().fit(false, |_| ()).unwrap();
    // The same run, stopped after step 2 and resumed.
    let mut cut = tiny("cut", &["smart"]);
    cut.bregman = full.bregman.clone();
    cut.stop_after = Some(2);
    Run::new(cut.clone()).unwrap().fit(false, |_| ()).unwrap();
    cut.stop_after = None;
    let s_cut = Run::new(cut.clone()).unwrap().fit(true, |_| ()).unwrap();
    assert_eq!(s_full.steps, 6);
    assert_eq!(s_cut.steps, s_full.steps);
    assert_eq!(s_cut.last, s_full.last, "final evaluation after resume");
    assert_eq!(s_cut.best, s_full.best);
    let strip = |v: Vec<serde_json::Value>| -> Vec<serde_json::Value> {
        v.into_iter()
            .map(|mut l| {
                l.as_object_mut().unwrap().remove("examples_per_s");
                l
            })
            .collect()
    };
    assert_eq!(
        strip(lines(&cut)),
        strip(lines(&full)),
        "every logged loss and evaluation"
    );
    for f in [
        "summary.json",
        "config.toml",
        "best/model.safetensors",
        "best/checkpoint.json",
        "last/trainer.json",
        "loss.png",
        "metric.svg",
        "reliability.png",
    ] {
        assert!(full.output.join(f).exists(), "{f} missing");
    }
    // The best checkpoint evaluates to the recorded score.
    let ev =
        tunefuse::train::trainer::evaluate_checkpoint(&full.output.join("best"), None, "dev", None)
            .unwrap();
    assert!(ev.accuracy >= 0.0 && ev.accuracy <= 1.0);
    std::fs::remove_dir_all(&full.output).ok();
    std::fs::remove_dir_all(&cut.output).ok();
}

#[test]
fn methods_run_and_peft_trains_only_new_parameters() {
    for methods in [
        &["smart"][..],
        &["r3f"],
        &["mixout"],
        &["adapter"],
        &["lora"],
        &["smart", "mixout"],
    ] {
        let mut cfg = tiny(&methods.join("-"), methods);
        cfg.epochs = 1;
        cfg.train_examples = Some(8);
        cfg.eval_examples = Some(8);
        let mut run = Run::new(cfg.clone()).unwrap();
        if methods.contains(&"adapter") || methods.contains(&"lora") {
            assert!(run.opt.params.iter().all(|p| p.name.contains("adapter")
                || p.name.contains("lora_")
                || p.name.starts_with("classifier.")));
        }
        let s = run.fit(false, |_| ()).unwrap();
        assert_eq!(s.steps, 1, "{methods:?}");
        let l = lines(&cfg);
        let pen = l[0]["penalty"].as_f64().unwrap();
        if methods.contains(&"smart") || methods.contains(&"r3f") {
            assert!(pen > 0.0 && pen.is_finite(), "{methods:?}: penalty {pen}");
        }
        std::fs::remove_dir_all(&cfg.output).ok();
    }
}

#[test]
fn bad_configurations_fail_before_training() {
    let base = tiny("bad", &["vanilla"]);
    let cases: Vec<(Config, &str)> = vec![
        (
            Config {
                methods: vec!["dance".into()],
                ..base.clone()
            },
            "unknown method",
        ),
        (
            Config {
                methods: vec!["mixout".into(), "adapter".into()],
                ..base.clone()
            },
            "cannot be combined",
        ),
        (
            Config {
                task: "imdb".into(),
                ..base.clone()
            },
            "unknown task",
        ),
        (
            Config {
                lr: -1.0,
                ..base.clone()
            },
            "lr",
        ),
        (
            Config {
                metric: "bleu".into(),
                ..base.clone()
            },
            "unknown metric",
        ),
        (
            Config {
                model: "/nonexistent".into(),
                ..base.clone()
            },
            "config.json",
        ),
        (
            Config {
                data_dir: Some("/nonexistent".into()),
                ..base.clone()
            },
            "not a directory",
        ),
        (
            Config {
                schedule: Schedule::Linear { warmup: 1.5 },
                ..base.clone()
            },
            "schedule",
        ),
    ];
    for (cfg, want) in cases {
        let e = Run::new(cfg).err().expect("an error").to_string();
        assert!(e.contains(want), "expected {want:?} in {e}");
    }
}

#[test]
fn schedules() {
    let lin = Schedule::Linear { warmup: 0.1 };
    assert!((lin.lr(1.0, 0, 100) - 0.1).abs() < 1e-12);
    assert!((lin.lr(1.0, 9, 100) - 1.0).abs() < 1e-12);
    assert!((lin.lr(1.0, 55, 100) - 0.5).abs() < 1e-12);
    let cos = Schedule::Cosine { warmup: 0.0 };
    assert!((cos.lr(1.0, 50, 100) - 0.5).abs() < 1e-12);
    // Slanted triangular: lr/ratio at 0, lr at the cut, back towards lr/ratio.
    let st = Schedule::SlantedTriangular {
        cut_frac: 0.1,
        ratio: 32.0,
    };
    assert!((st.lr(1.0, 0, 100) - 1.0 / 32.0).abs() < 1e-12);
    assert!((st.lr(1.0, 10, 100) - 1.0).abs() < 1e-12);
    assert!(st.lr(1.0, 99, 100) < 0.05);
    assert!(Schedule::SlantedTriangular {
        cut_frac: 0.0,
        ratio: 32.0
    }
    .validate()
    .is_err());
}

#[test]
fn adamw_and_recadam_steps_match_the_formulas() {
    use candle_core::{Device, Tensor, Var};
    let v = Var::from_tensor(&Tensor::new(&[1.0f64, -2.0], &Device::Cpu).unwrap()).unwrap();
    let anchor = Tensor::new(&[0.5f64, -1.0], &Device::Cpu).unwrap();
    let hp = AdamWParams {
        lr: 0.1,
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay: 0.01,
    };
    let r = RecAdam {
        k: 0.5,
        t0: 10.0,
        gamma: 2.0,
    };
    let mut opt = AdamW::new(
        vec![Param {
            name: "w".into(),
            var: v.clone(),
            lr_scale: 1.0,
            decay: true,
            anchor: Some(anchor),
        }],
        hp,
        Some(r),
    )
    .unwrap();
    let loss = (v.as_tensor() * Tensor::new(&[3.0f64, 4.0], &Device::Cpu).unwrap())
        .unwrap()
        .sum_all()
        .unwrap();
    let g = loss.backward().unwrap();
    opt.step(&g, 0.1).unwrap();
    // First step: m̂ = g', v̂ = g'², so the Adam update is sign(g')·lr (up to eps).
    let lam = 1.0 / (1.0 + (0.5f64 * 9.0).exp());
    let gp = [
        lam * 3.0 + (1.0 - lam) * 2.0 * 0.5,
        // (θ − θ*) = (1 − 0.5, −2 − (−1)) = (0.5, −1).
        lam * 4.0 - (1.0 - lam) * 2.0,
    ];
    let want: Vec<f64> = [1.0f64, -2.0]
        .iter()
        .zip(gp)
        .map(|(t, g)| t - 0.1 * g / (g.abs() + 1e-8) - 0.1 * 0.01 * t)
        .collect();
    let got = v.as_tensor().to_vec1::<f64>().unwrap();
    assert!(
        (got[0] - want[0]).abs() < 1e-12 && (got[1] - want[1]).abs() < 1e-12,
        "{got:?} vs {want:?}"
    );
}

#[test]
fn bf16_mixed_precision_step_runs() {
    // The CUDA default (bf16 activations, f32 master weights), on the CPU.
    let mut cfg = tiny("bf16", &["smart"]);
    cfg.precision = "bf16".into();
    cfg.epochs = 1;
    cfg.train_examples = Some(8);
    cfg.eval_examples = Some(8);
    let s = Run::new(cfg.clone()).unwrap().fit(false, |_| ()).unwrap();
    assert_eq!(s.steps, 1);
    let l = lines(&cfg);
    assert!(
        l[0]["loss"].as_f64().unwrap().is_finite() && l[0]["penalty"].as_f64().unwrap() > 0.0,
        "{:?}",
        l[0]
    );
    std::fs::remove_dir_all(&cfg.output).ok();
}

#[test]
fn readme_config_example_parses_and_validates() {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let start = readme
        .find("```toml\n")
        .expect("a TOML example in the README")
        + 8;
    let end = start + readme[start..].find("```").unwrap();
    let mut cfg: Config = toml::from_str(&readme[start..end]).unwrap();
    cfg.model = minilm_dir();
    cfg.validate().unwrap();
    assert!(cfg.has("smart") && cfg.bregman.mu == 1.0 && cfg.gradual_unfreezing);
}

#[test]
fn ulmfit_and_recadam_options_train() {
    let mut cfg = tiny("ulmfit", &["vanilla"]);
    cfg.epochs = 1;
    cfg.train_examples = Some(8);
    cfg.eval_examples = Some(8);
    cfg.schedule = Schedule::SlantedTriangular {
        cut_frac: 0.1,
        ratio: 32.0,
    };
    cfg.layer_lr_decay = Some(1.0 / 2.6);
    cfg.gradual_unfreezing = true;
    cfg.recadam = Some(RecAdam {
        k: 0.5,
        t0: 10.0,
        gamma: 1.0,
    });
    let mut run = Run::new(cfg.clone()).unwrap();
    let p = |run: &Run, name: &str| {
        let data = run.varmap.data().lock().unwrap();
        data[name]
            .as_tensor()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
    };
    let (emb0, top0) = (
        p(&run, "embeddings.word_embeddings.weight"),
        p(&run, "encoder.layer.5.output.dense.weight"),
    );
    // Discriminative rates lr_l = lr·ξ^(L−l): the top layer (l = L = 6) and
    // the head get lr, layer 5 (encoder.layer.4) lr·ξ, the embeddings (l = 0) lr·ξ^6.
    let scale = |n: &str| {
        run.opt
            .params
            .iter()
            .find(|q| q.name == n)
            .unwrap()
            .lr_scale
    };
    assert_eq!(scale("encoder.layer.5.output.dense.weight"), 1.0);
    assert!((scale("encoder.layer.4.output.dense.weight") - 1.0 / 2.6).abs() < 1e-12);
    assert!((scale("embeddings.word_embeddings.weight") - (1.0f64 / 2.6).powi(6)).abs() < 1e-12);
    assert_eq!(scale("classifier.weight"), 1.0);
    run.fit(false, |_| ()).unwrap();
    // Epoch 0 of gradual unfreezing trains only the top layer (and the head).
    assert_eq!(
        p(&run, "embeddings.word_embeddings.weight"),
        emb0,
        "embeddings are frozen in epoch 0"
    );
    assert_ne!(
        p(&run, "encoder.layer.5.output.dense.weight"),
        top0,
        "the top layer trains"
    );
    std::fs::remove_dir_all(&cfg.output).ok();
}
