//! The trainer on SST-2 subsamples (CPU). Invariants of the loop and the
//! methods run on a tiny random BERT (tests/common `tiny_model_dir`), in
//! milliseconds per step; the real MiniLM is kept for what needs a
//! pretrained model: an exact resume of a SMART + Bregman run and the 75 %
//! SST-2 recipe.
mod common;

use common::*;
use tempfile::TempDir;
use tunefuse::train::methods::Method;
use tunefuse::train::optim::{AdamW, AdamWParams, Param, RecAdam, Schedule};
use tunefuse::train::trainer::{
    BregmanConfig, Config, FreeLbConfig, HeadKind, Metric, Precision, Run, SmartConfig, SmartMode,
    SmartReduction,
};

/// [`small_run`] with `methods`.
fn config(dir: &TempDir, out: &str, methods: &str, model: std::path::PathBuf) -> Config {
    let mut c = small_run(dir, out, model);
    c.set_methods(methods).unwrap();
    c
}

/// On the real MiniLM.
fn minilm(dir: &TempDir, out: &str, methods: &str) -> Config {
    config(dir, out, methods, minilm_dir())
}

/// On the tiny random BERT (hidden size 32: adapters at r = 16, a
/// bottleneck no wider than the layer).
fn tiny(dir: &TempDir, out: &str, methods: &str) -> Config {
    let mut c = config(dir, out, methods, tiny_model_dir(dir.path()));
    if c.method("adapter").is_some() {
        c.set("adapter.r=16").unwrap();
    }
    c
}

/// The settings of `cfg`'s method `name`, to change in place.
fn method<'a>(cfg: &'a mut Config, name: &str) -> &'a mut Method {
    cfg.methods
        .iter_mut()
        .find(|m| m.name() == name)
        .unwrap_or_else(|| panic!("{name} is not listed"))
}

fn smart(cfg: &mut Config) -> &mut SmartConfig {
    match method(cfg, "smart") {
        Method::Smart(s) => s,
        _ => unreachable!(),
    }
}

/// A parameter's current values, by name.
fn param(run: &Run, name: &str) -> Vec<f32> {
    run.varmap.data().lock().unwrap()[name]
        .as_tensor()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
}

fn lines(cfg: &Config) -> Vec<serde_json::Value> {
    std::fs::read_to_string(cfg.output.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// Each logged step's value of term `name`.
fn term(cfg: &Config, name: &str) -> Vec<f64> {
    lines(cfg)
        .iter()
        .filter_map(|l| l.get("terms"))
        .map(|t| {
            t.get(name)
                .unwrap_or_else(|| panic!("no {name} in {t}"))
                .as_f64()
                .unwrap()
        })
        .collect()
}

/// The logged (step) lines without their timing field.
fn steps_of(cfg: &Config) -> Vec<serde_json::Value> {
    lines(cfg)
        .into_iter()
        .map(|mut l| {
            l.as_object_mut().unwrap().remove("examples_per_s");
            l
        })
        .collect()
}

/// One epoch over `train` SST-2 sentences on the tiny model, evaluated on `eval`.
fn one_epoch(dir: &TempDir, name: &str, methods: &str, train: usize, eval: usize) -> Config {
    let mut cfg = tiny(dir, name, methods);
    cfg.epochs = 1;
    cfg.train_examples = Some(train);
    cfg.eval_examples = Some(eval);
    cfg
}

fn short(dir: &TempDir, name: &str, methods: &str) -> Config {
    let mut cfg = one_epoch(dir, name, methods, 16, 8);
    cfg.dropout = Some(0.0);
    cfg
}

fn fit(cfg: &Config) -> tunefuse::train::trainer::Summary {
    Run::new(cfg.clone()).unwrap().fit(false, |_| ()).unwrap()
}

/// Runs `full` uninterrupted and `cut` (the same run in another folder)
/// stopped after step 2 and resumed, and requires the same record.
fn resumes_exactly(full: &Config, cut: &Config) {
    let s_full = fit(full);
    let mut cut = cut.clone();
    cut.stop_after = Some(2);
    fit(&cut);
    cut.stop_after = None;
    let s_cut = Run::new(cut.clone()).unwrap().fit(true, |_| ()).unwrap();
    assert_eq!(s_full.steps, 6);
    assert_eq!(s_cut.steps, s_full.steps);
    assert_eq!(s_cut.last, s_full.last, "final evaluation after resume");
    assert_eq!(s_cut.best, s_full.best);
    assert_eq!(
        steps_of(&cut),
        steps_of(full),
        "every logged loss, term and evaluation"
    );
}

#[test]
fn resume_reproduces_an_uninterrupted_run() {
    let dir = scratch("trainer");
    // SMART with Bregman proximal point on the real MiniLM: the resumed
    // state includes the optimiser moments, the dropout and noise streams
    // and θ̃.
    let mut full = minilm(&dir, "full", "smart,bregman");
    *method(&mut full, "bregman") = Method::Bregman(BregmanConfig { mu: 1.0, beta: 0.5 });
    let mut cut = full.clone();
    cut.output = dir.path().join("cut");
    resumes_exactly(&full, &cut);
    // Resuming with other settings is refused before anything is written,
    // naming each difference; a session's settings (here stop_after) may
    // change.
    let recorded = std::fs::read_to_string(cut.output.join("config.toml")).unwrap();
    let mut other = cut.clone();
    other.lr = 2e-4;
    other.set("smart.mode=direction").unwrap();
    other.stop_after = Some(1);
    let err = Run::new(other)
        .unwrap()
        .fit(true, |_| ())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("lr: 0.0001 → 0.0002")
            && err.contains(r#"methods.smart.mode: "normalized_step" → "direction""#)
            && !err.contains("stop_after"),
        "{err}"
    );
    assert_eq!(
        std::fs::read_to_string(cut.output.join("config.toml")).unwrap(),
        recorded
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
    // The Bregman term is logged under its own name beside SMART's.
    assert!(term(&full, "bregman")
        .iter()
        .all(|v| v.is_finite() && *v >= 0.0));
    assert!(term(&full, "smart").iter().all(|v| *v > 0.0));
    // The best checkpoint evaluates to the recorded score.
    let ev = tunefuse::train::trainer::evaluate_checkpoint(
        &full.output.join("best"),
        None,
        "dev",
        None,
        None,
        None,
    )
    .unwrap();
    let s: tunefuse::train::trainer::Summary =
        serde_json::from_str(&std::fs::read_to_string(full.output.join("summary.json")).unwrap())
            .unwrap();
    assert_eq!(ev.accuracy, s.best);
}

#[test]
fn a_composed_run_resumes_exactly_and_keeps_its_session_time() {
    let dir = scratch("trainer");
    let full = tiny(&dir, "full", "smart,bregman,adapter");
    let mut cut = full.clone();
    cut.output = dir.path().join("cut");
    resumes_exactly(&full, &cut);
    // The checkpoint carries the run's wall time into a resumed run:
    // pretend the time before the checkpoint was 1000 s, and resume the
    // finished run (nothing left to do: one evaluation, the time added).
    let state = cut.output.join("last/trainer.json");
    let mut js: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&state).unwrap()).unwrap();
    assert!(js["seconds"].as_f64().unwrap() > 0.0, "{js}");
    js["seconds"] = 1000.0.into();
    std::fs::write(&state, js.to_string()).unwrap();
    let t = std::time::Instant::now();
    let s = Run::new(cut.clone()).unwrap().fit(true, |_| ()).unwrap();
    let session = t.elapsed().as_secs_f64();
    assert!(
        s.seconds > 1000.0 && s.seconds <= 1000.0 + session,
        "{} s after {session} s resumed",
        s.seconds
    );
}

#[test]
fn methods_compose_and_log_each_term_under_its_name() {
    let dir = scratch("trainer");
    for methods in [
        "smart",
        "r3f",
        "freelb",
        "bregman",
        "mixout",
        "adapter",
        "lora",
        "manifold",
        "smart,r3f",
        "smart,freelb",
        "manifold,lora",
        "smart,bregman,adapter,lora",
        "r3f,mixout",
    ] {
        let cfg = one_epoch(&dir, &methods.replace(',', "-"), methods, 8, 8);
        let mut run = Run::new(cfg.clone()).unwrap();
        let peft = methods.contains("adapter") || methods.contains("lora");
        if peft {
            assert!(
                run.opt.params.iter().all(|p| p.name.contains(".adapter.")
                    || p.name.contains("lora_")
                    || p.name.starts_with("classifier.")),
                "{methods}: only new parameters and the head train"
            );
        }
        let s = run.fit(false, |_| ()).unwrap();
        assert_eq!(s.steps, 1, "{methods}");
        let l = &lines(&cfg)[0];
        let terms = l["terms"].as_object().unwrap();
        // (serde_json writes an object's keys sorted.)
        let want: Vec<&str> = ["bregman", "manifold", "r3f", "smart"]
            .into_iter()
            .filter(|t| methods.contains(t))
            .collect();
        assert_eq!(
            terms.keys().map(String::as_str).collect::<Vec<_>>(),
            want,
            "{methods}: {l}"
        );
        for (name, v) in terms {
            let v = v.as_f64().unwrap();
            // θ̃ = θ before the first step, so the proximal term is only
            // the teacher's missing dropout: small, not necessarily 0.
            let ok = if name == "bregman" { v >= 0.0 } else { v > 0.0 };
            assert!(ok && v.is_finite(), "{methods}: {name} = {v}");
        }
    }
}

#[test]
fn bad_configurations_fail_before_training() {
    let dir = scratch("trainer");
    let base = tiny(&dir, "bad", "vanilla");
    let cases: Vec<(Config, &str)> = vec![
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
                metric: Metric::Pearson,
                ..base.clone()
            },
            "pearson",
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
        (
            {
                let mut c = base.clone();
                c.set_methods("mixout,lora").unwrap();
                c
            },
            "cannot be combined",
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
    opt.step(&g, 0.1, None).unwrap();
    // First step: m̂ = g, v̂ = g², so the Adam step is g/(|g| + ε); RecAdam
    // weights it by λ(1) and adds (1 − λ(1))·γ·(θ − θ*), θ − θ* = (0.5, −1).
    let lam = 1.0 / (1.0 + (0.5f64 * 9.0).exp());
    let pull = [0.5, -1.0];
    let want: Vec<f64> = [1.0f64, -2.0]
        .iter()
        .zip([3.0f64, 4.0])
        .zip(pull)
        .map(|((t, g), d)| {
            t - 0.1 * (lam * g / (g.abs() + 1e-8) + (1.0 - lam) * 2.0 * d) - 0.1 * 0.01 * t
        })
        .collect();
    let got = v.as_tensor().to_vec1::<f64>().unwrap();
    assert!(
        (got[0] - want[0]).abs() < 1e-12 && (got[1] - want[1]).abs() < 1e-12,
        "{got:?} vs {want:?}"
    );
}

#[test]
fn recadam_with_lambda_one_and_gamma_zero_is_adamw() {
    // One might expect "RecAdam with γ = 0 equals AdamW". Under RecAdam's
    // definition (the authors' optimiser) γ = 0 still scales each Adam step
    // by λ(t) < 1 early on, so the two differ; they coincide when λ ≡ 1
    // (t₀ far in the past), which is what this checks, bit for bit.
    use candle_core::{Device, Tensor, Var};
    let run = |rec: Option<RecAdam>| {
        let v =
            Var::from_tensor(&Tensor::new(&[0.3f64, -1.2, 2.0], &Device::Cpu).unwrap()).unwrap();
        let anchor = Some(v.as_tensor().copy().unwrap());
        let mut opt = AdamW::new(
            vec![Param {
                name: "w".into(),
                var: v.clone(),
                lr_scale: 1.0,
                decay: true,
                anchor,
            }],
            AdamWParams::default(),
            rec,
        )
        .unwrap();
        for k in 0..5 {
            let target = Tensor::new(&[1.0f64, 0.5 * k as f64, -1.0], &Device::Cpu).unwrap();
            let loss = (v.as_tensor() - target)
                .unwrap()
                .sqr()
                .unwrap()
                .sum_all()
                .unwrap();
            opt.step(&loss.backward().unwrap(), 1e-2, None).unwrap();
        }
        v.as_tensor().to_vec1::<f64>().unwrap()
    };
    let adamw = run(None);
    assert_eq!(
        run(Some(RecAdam {
            k: 1.0,
            t0: -1e4,
            gamma: 0.0
        })),
        adamw
    );
    // With λ(t) < 1 and γ = 0 the steps are smaller: not AdamW.
    assert_ne!(
        run(Some(RecAdam {
            k: 0.5,
            t0: 10.0,
            gamma: 0.0
        })),
        adamw
    );
}

#[test]
fn bf16_mixed_precision_step_runs() {
    let dir = scratch("trainer");
    // The CUDA default (bf16 activations, f32 master weights), on the CPU.
    let mut cfg = one_epoch(&dir, "bf16", "smart", 8, 8);
    cfg.precision = Precision::Bf16;
    let s = fit(&cfg);
    assert_eq!(s.steps, 1);
    let l = lines(&cfg);
    assert!(
        l[0]["loss"].as_f64().unwrap().is_finite() && term(&cfg, "smart")[0] > 0.0,
        "{:?}",
        l[0]
    );
}

#[test]
fn ulmfit_and_recadam_options_train() {
    let dir = scratch("trainer");
    let mut cfg = one_epoch(&dir, "ulmfit", "vanilla", 8, 8);
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
    let (emb0, top0) = (
        param(&run, "embeddings.word_embeddings.weight"),
        param(&run, "encoder.layer.2.output.dense.weight"),
    );
    // Discriminative rates lr_l = lr·ξ^(L−l): the top layer (l = L = 3) and
    // the head get lr, layer 2 (encoder.layer.1) lr·ξ, the embeddings (l = 0) lr·ξ^3.
    let scale = |n: &str| {
        run.opt
            .params
            .iter()
            .find(|q| q.name == n)
            .unwrap()
            .lr_scale
    };
    assert_eq!(scale("encoder.layer.2.output.dense.weight"), 1.0);
    assert!((scale("encoder.layer.1.output.dense.weight") - 1.0 / 2.6).abs() < 1e-12);
    assert!((scale("embeddings.word_embeddings.weight") - (1.0f64 / 2.6).powi(3)).abs() < 1e-12);
    assert_eq!(scale("classifier.weight"), 1.0);
    run.fit(false, |_| ()).unwrap();
    // Epoch 0 of gradual unfreezing trains only the top layer (and the head).
    assert_eq!(
        param(&run, "embeddings.word_embeddings.weight"),
        emb0,
        "embeddings are frozen in epoch 0"
    );
    assert_ne!(
        param(&run, "encoder.layer.2.output.dense.weight"),
        top0,
        "the top layer trains"
    );
}

#[test]
fn methods_change_what_they_should() {
    let dir = scratch("trainer");
    // SMART with σ = η = 0: the perturbed input is the clean one, so the
    // smoothness penalty is exactly 0 (dropout off, so both passes agree).
    let mut zero = short(&dir, "smart0", "smart");
    smart(&mut zero).sigma = 0.0;
    smart(&mut zero).eta = 0.0;
    fit(&zero);
    let pens = term(&zero, "smart");
    assert!(
        !pens.is_empty() && pens.iter().all(|&p| p == 0.0),
        "{pens:?}"
    );
    // The first logged step (penalty, objective) of a SMART run whose
    // settings `set` changes.
    let first_step = |name: &str, set: &dyn Fn(&mut SmartConfig)| {
        let mut c = short(&dir, name, "smart");
        set(smart(&mut c));
        fit(&c);
        let l = &lines(&c)[0];
        (term(&c, "smart")[0], l["loss"].as_f64().unwrap())
    };
    // The step mode reaches the trainer: mt-dnn's first release's direction
    // step moves each token by η = 1e-3, the default normalised step by 1
    // (l∞), so the first batch's penalty differs by orders of magnitude.
    let (small, _) = first_step("smart-direction", &|s| s.mode = SmartMode::Direction);
    let (unit, _) = first_step("smart-normalized_step", &|s| {
        s.mode = SmartMode::NormalizedStep
    });
    assert!(
        small.is_finite() && unit > 1e3 * small.abs(),
        "direction {small}, normalized_step {unit}"
    );
    // smart-pytorch's `sum` reduction: on a batch of B = 8 the penalty is
    // 8 times the batch mean, so the objective with λ = 1 is batchmean's
    // with λ = 8 (first step: same parameters, same noise).
    let (sum_pen, sum_loss) = first_step("smart-sum", &|s| s.reduction = SmartReduction::Sum);
    let (mean_pen, mean_loss) = first_step("smart-mean8", &|s| {
        s.reduction = SmartReduction::Batchmean;
        s.lambda = 8.0;
    });
    let rel = |a: f64, b: f64| (a - b).abs() / b.abs();
    assert!(
        mean_pen > 0.0 && rel(sum_pen, 8.0 * mean_pen) < 1e-5,
        "sum {sum_pen}, batchmean {mean_pen}"
    );
    assert!(rel(sum_loss, mean_loss) < 1e-5, "{sum_loss} vs {mean_loss}");
    // Mixout with p = 0 is plain training, step for step.
    let plain = short(&dir, "plain", "vanilla");
    let mut mix0 = short(&dir, "mix0", "mixout");
    mix0.set("mixout.p=0.0").unwrap();
    fit(&plain);
    fit(&mix0);
    assert_eq!(steps_of(&mix0), steps_of(&plain));
    // FreeLB with no initial noise and η = 0 never leaves the clean input:
    // its loss (the mean over K = 2 identical passes) and the gradients it
    // accumulates over them are plain training's, step for step.
    let mut free0 = short(&dir, "freelb0", "freelb");
    *method(&mut free0, "freelb") = Method::Freelb(FreeLbConfig {
        steps: 2,
        eta: 0.0,
        eps: 0.0,
        init: 0.0,
    });
    fit(&free0);
    assert_eq!(steps_of(&free0), steps_of(&plain));
    // Also with two micro-batches per step: the gradients of FreeLB's
    // ascent passes take the micro-batch's share like the rest.
    let accum = |c: &Config, name: &str| Config {
        output: dir.path().join(name),
        grad_accum: 2,
        batch_size: 4,
        ..c.clone()
    };
    let (plain2, free2) = (accum(&plain, "plain-accum"), accum(&free0, "freelb0-accum"));
    for c in [&plain2, &free2] {
        fit(c);
    }
    assert_eq!(steps_of(&free2), steps_of(&plain2));
    // With η > 0 the second pass sees the input moved up the loss's
    // gradient (l2 per example, within ε): the mean loss rises above the
    // clean one, and training takes a different path.
    let mut free = free0.clone();
    free.output = dir.path().join("freelb");
    free.set("freelb.eta=0.5").unwrap();
    free.set("freelb.eps=0.5").unwrap();
    fit(&free);
    let (adv, clean) = (steps_of(&free), steps_of(&plain));
    assert!(
        adv[0]["loss"].as_f64().unwrap() > clean[0]["loss"].as_f64().unwrap(),
        "{} vs {}",
        adv[0],
        clean[0]
    );
    assert_ne!(adv, clean);
    // Bregman with μ = 0 weighs nothing: plain training, step for step,
    // apart from the logged term (0).
    let mut breg0 = short(&dir, "bregman0", "bregman");
    breg0.set("bregman.mu=0.0").unwrap();
    fit(&breg0);
    let strip = |c: &Config| {
        steps_of(c)
            .into_iter()
            .map(|mut l| {
                l.as_object_mut().unwrap().remove("terms");
                l
            })
            .collect::<Vec<_>>()
    };
    assert_eq!(strip(&breg0), strip(&plain));
    assert!(term(&breg0, "bregman").iter().all(|&v| v == 0.0));
    // Frozen parameters do not move: LoRA trains only its own matrices and the head.
    let lora = short(&dir, "lora-frozen", "lora");
    let mut run = Run::new(lora.clone()).unwrap();
    let (q0, b0) = (
        param(&run, "encoder.layer.0.attention.self.query.weight"),
        param(&run, "encoder.layer.0.attention.self.query.lora_B"),
    );
    run.fit(false, |_| ()).unwrap();
    assert_eq!(
        param(&run, "encoder.layer.0.attention.self.query.weight"),
        q0,
        "a frozen backbone weight moved"
    );
    assert_ne!(
        param(&run, "encoder.layer.0.attention.self.query.lora_B"),
        b0,
        "LoRA's B must train"
    );
}

#[test]
fn regression_trains_with_squared_error_smoothness() {
    let dir = scratch("trainer");
    // SST-5's 0–4 labels as scores: one-output head, MSE; SMART's penalty
    // is the squared error of the outputs, exactly 0 with σ = η = 0 and
    // positive otherwise; R3F and the Bregman term run on it too.
    let reg = |name: &str, methods: &str| {
        let mut c = short(&dir, name, methods);
        c.task = "sst5".into();
        c.head = HeadKind::Regression;
        c.metric = Metric::Pearson;
        c
    };
    let mut zero = reg("reg-smart0", "smart");
    smart(&mut zero).sigma = 0.0;
    smart(&mut zero).eta = 0.0;
    let mut with_smart = reg("reg-smart", "smart,bregman");
    smart(&mut with_smart).sigma = 1e-2;
    let r3f = reg("reg-r3f", "r3f");
    for (c, name) in [(&zero, "smart"), (&with_smart, "smart"), (&r3f, "r3f")] {
        let mut run = Run::new(c.clone()).unwrap();
        assert!(
            run.opt
                .params
                .iter()
                .any(|p| p.name.starts_with("regressor.")),
            "the regression head trains"
        );
        let s = run.fit(false, |_| ()).unwrap();
        assert!(
            s.last.pearson.is_finite() && s.last.mse.is_finite(),
            "{:?}",
            s.last
        );
        assert!(
            s.last.accuracy.is_nan() && s.last.ece.is_nan(),
            "{:?}",
            s.last
        );
        assert_eq!(s.metric, "pearson");
        // summary.json (accuracy etc. written as null) reads back.
        let text = std::fs::read_to_string(c.output.join("summary.json")).unwrap();
        let back: tunefuse::train::trainer::Summary = serde_json::from_str(&text).unwrap();
        assert!(
            (back.last.pearson - s.last.pearson).abs() <= 1e-15,
            "{back:?}"
        );
        assert!(back.last.accuracy.is_nan());
        let pens = term(c, name);
        assert!(!pens.is_empty());
        if c.output == zero.output {
            assert!(pens.iter().all(|&p| p == 0.0), "{pens:?}");
        } else {
            assert!(pens.iter().all(|&p| p > 0.0 && p.is_finite()), "{pens:?}");
        }
    }
    assert!(term(&with_smart, "bregman").iter().all(|p| p.is_finite()));
    // Regression selects on pearson / spearman, without label smoothing.
    let mut bad = reg("reg-bad", "vanilla");
    bad.metric = Metric::Accuracy;
    assert!(bad.validate().unwrap_err().to_string().contains("pearson"));
    let mut bad = reg("reg-bad", "vanilla");
    bad.label_smoothing = 0.1;
    assert!(bad
        .validate()
        .unwrap_err()
        .to_string()
        .contains("label_smoothing"));
}

#[test]
fn multi_class_summary_reads_back() {
    let dir = scratch("trainer");
    // F1 is undefined for SST-5's five classes (NaN, written as null):
    // `tunefuse results` must still read the summary.
    let mut c = short(&dir, "sst5-class", "vanilla");
    c.task = "sst5".into();
    let s = fit(&c);
    assert!(s.last.f1.is_nan() && s.last.accuracy.is_finite());
    let results = dir.path().join("results");
    let run_dir = results.join("vanilla-s1");
    std::fs::create_dir_all(&run_dir).unwrap();
    for f in ["summary.json", "config.toml"] {
        std::fs::copy(c.output.join(f), run_dir.join(f)).unwrap();
    }
    let runs = tunefuse::train::report::collect(&results).unwrap();
    assert_eq!(runs.len(), 1);
    assert!(runs[0].summary.last.f1.is_nan());
}

#[test]
fn sst2_vanilla_recipe_reaches_75_percent_on_cpu() {
    let dir = scratch("trainer");
    // The first row of the reference runs: 1,000 sampled SST-2 sentences,
    // 3 epochs, lr 1e-4, batch 16, AdamW wd 0.01, linear warm-up 10 %,
    // clip 1, max length 128 (PyTorch: 78.9 / 81.8 over two seeds).
    let cfg = Config {
        train_examples: Some(1000),
        eval_examples: None,
        epochs: 3,
        batch_size: 16,
        max_len: 128,
        eval_every: 0,
        log_every: 50,
        ..minilm(&dir, "sst2-recipe", "vanilla")
    };
    let s = fit(&cfg);
    eprintln!(
        "SST-2 1k vanilla: dev accuracy {:.4}, ECE {:.4}, {:.0} s",
        s.last.accuracy, s.last.ece, s.seconds
    );
    assert!(s.last.accuracy >= 0.75, "dev accuracy {}", s.last.accuracy);
}

#[test]
fn peft_layernorm_and_step_wise_unfreezing() {
    let dir = scratch("trainer");
    let mut cfg = short(&dir, "peft-ln", "adapter");
    cfg.set("adapter.layernorm=true").unwrap();
    let run = Run::new(cfg.clone()).unwrap();
    let names: Vec<&str> = run.opt.params.iter().map(|p| p.name.as_str()).collect();
    assert!(
        names.contains(&"encoder.layer.0.output.LayerNorm.weight"),
        "LayerNorms train with the adapter's layernorm"
    );
    assert!(
        !names.iter().any(|n| n.ends_with("query.weight")),
        "dense weights stay frozen"
    );
    // Adapters or LoRA with gradual unfreezing would have two owners of the
    // frozen flags: refused before any model is loaded.
    cfg.gradual_unfreezing = true;
    let e = Run::new(cfg).err().expect("refused").to_string();
    assert!(
        e.contains("gradual_unfreezing") && e.contains("adapter"),
        "{e}"
    );
    // Unfreezing every step: after 2 steps of 3 layers, layers 1-2 have
    // trained and layer 0 has not.
    let mut cfg = short(&dir, "unfreeze-steps", "vanilla");
    cfg.gradual_unfreezing = true;
    cfg.unfreeze_every_steps = Some(1);
    cfg.batch_size = 8; // 16 examples: 2 steps
    let mut run = Run::new(cfg.clone()).unwrap();
    let before: Vec<Vec<f32>> = (0..3)
        .map(|i| param(&run, &format!("encoder.layer.{i}.output.dense.weight")))
        .collect();
    run.fit(false, |_| ()).unwrap();
    let moved: Vec<bool> = (0..3)
        .map(|i| param(&run, &format!("encoder.layer.{i}.output.dense.weight")) != before[i])
        .collect();
    assert_eq!(moved, vec![false, true, true]);
}

#[test]
fn phase_times_report_every_phase_and_change_nothing_else() {
    let dir = scratch("trainer");
    let plain = tiny(&dir, "plain", "vanilla");
    let mut timed = tiny(&dir, "phases", "vanilla");
    timed.phase_times = true;
    let s_plain = fit(&plain);
    let s_timed = fit(&timed);
    assert!(s_plain.phase_ms.is_none(), "off by default");
    let phases = s_timed.phase_ms.clone().expect("phase_ms with phase_times");
    let names: Vec<&str> = phases.iter().map(|(p, _)| p.as_str()).collect();
    assert_eq!(
        names,
        [
            "rest (logging, evaluation, checkpoints)",
            "batch (unfreezing, tokens to the device)",
            "forward (+ regularisers)",
            "backward",
            "gradient norm, clipping, optimizer step",
        ]
    );
    for (p, ms) in &phases {
        assert!(ms.is_finite() && *ms >= 0.0, "{p}: {ms}");
    }
    // Forward and backward take measurable time even on the tiny model.
    assert!(phases[2].1 > 0.0 && phases[3].1 > 0.0, "{phases:?}");
    // Synchronising changes no result.
    assert_eq!(s_timed.last, s_plain.last);
    assert_eq!(steps_of(&timed), steps_of(&plain));
    let written: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(timed.output.join("summary.json")).unwrap())
            .unwrap();
    assert_eq!(written["phase_ms"].as_array().map(Vec::len), Some(5));
}

#[test]
fn a_diverged_run_stops_with_an_error_and_keeps_its_checkpoints() {
    let dir = scratch("trainer");
    // lr 1e8 without clipping: the weights blow up after one step and the
    // loss is not finite soon after. Evaluating only at the end, the loss
    // stops the run.
    let mut cfg = one_epoch(&dir, "diverge", "vanilla", 32, 16);
    cfg.lr = 1e8;
    cfg.clip = 0.0;
    cfg.eval_every = 0;
    let error_of = |c: &Config| {
        Run::new(c.clone())
            .unwrap()
            .fit(false, |_| ())
            .unwrap_err()
            .to_string()
    };
    let e = error_of(&cfg);
    assert!(e.contains("training diverged at step "), "{e}");
    assert!(
        !cfg.output.join("best").exists(),
        "no evaluation, nothing saved"
    );
    // Evaluating every step: step 1's weights are saved, the non-finite
    // weights after a later update are neither evaluated into the metrics
    // nor saved, and step 1's checkpoint still loads and evaluates.
    cfg.output = dir.path().join("diverge-eval");
    cfg.eval_every = 1;
    let e = error_of(&cfg);
    assert!(e.contains("training diverged"), "{e}");
    let ev = tunefuse::train::trainer::evaluate_checkpoint(
        &cfg.output.join("best"),
        None,
        "dev",
        None,
        None,
        None,
    )
    .unwrap();
    assert!(ev.accuracy.is_finite() && ev.nll.is_finite(), "{ev:?}");
    let evals = lines(&cfg)
        .into_iter()
        .filter(|l| l.get("eval").is_some())
        .count();
    assert!(evals >= 1, "step 1 was evaluated");
}

/// Resumes `cfg` (stopped after step 2) with `last/trainer.json` edited by
/// `edit`, and returns the refusal.
fn resume_edited(cfg: &Config, edit: impl Fn(&mut serde_json::Value)) -> String {
    let path = cfg.output.join("last/trainer.json");
    let saved = std::fs::read_to_string(&path).unwrap();
    let mut js: serde_json::Value = serde_json::from_str(&saved).unwrap();
    edit(&mut js);
    std::fs::write(&path, js.to_string()).unwrap();
    let err = Run::new(cfg.clone())
        .unwrap()
        .fit(true, |_| ())
        .expect_err("an impossible state must be refused")
        .to_string();
    std::fs::write(&path, saved).unwrap();
    err
}

#[test]
fn a_resume_from_a_state_the_run_cannot_be_in_is_refused() {
    let dir = scratch("trainer");
    // 24 examples, batch 8: 3 batches an epoch, 2 epochs, evaluations at
    // steps 2, 3 (epoch end), 4 and 6.
    let mut cut = tiny(&dir, "cut", "vanilla");
    cut.stop_after = Some(2);
    fit(&cut);
    cut.stop_after = None;
    // (what, field of trainer.json, value, expected in the refusal)
    let cases: [(&str, &str, serde_json::Value, &str); 6] = [
        (
            "batch far past the end",
            "batch",
            99999.into(),
            "batch 99999 is past the 3 batches",
        ),
        (
            "batch at the end",
            "batch",
            3.into(),
            "batch 3 is past the 3 batches",
        ),
        (
            "epoch past the run",
            "epoch",
            99.into(),
            "epoch 99 batch 2 is past the run's 2 epochs",
        ),
        (
            "step against position",
            "step",
            1.into(),
            "step 1 does not match epoch 0 batch 2",
        ),
        ("step 2^63", "step", (1u64 << 63).into(), "does not match"),
        (
            "best no evaluation saw",
            "best",
            0.99.into(),
            "best Some(0.99) at step 2 is not one of the recorded evaluations",
        ),
    ];
    for (what, key, value, want) in cases {
        let err = resume_edited(&cut, |j| j[key] = value.clone());
        assert!(
            err.contains(want) && err.contains("trainer.json"),
            "{what}: {err}"
        );
    }
    // The untouched state still resumes, to the end.
    let s = Run::new(cut.clone()).unwrap().fit(true, |_| ()).unwrap();
    assert_eq!(s.steps, 6);
}

#[test]
fn a_new_run_does_not_replace_a_recorded_one_unless_told() {
    let dir = scratch("trainer");
    let cfg = short(&dir, "run", "vanilla");
    fit(&cfg);
    let summary = std::fs::read(cfg.output.join("summary.json")).unwrap();
    let best = std::fs::read(cfg.output.join("best/model.safetensors")).unwrap();
    let mut other = cfg.clone();
    other.lr = 3e-4;
    let err = Run::new(other.clone())
        .unwrap()
        .fit(false, |_| ())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("holds a run")
            && err.contains("config.toml")
            && err.contains("best")
            && err.contains("--overwrite"),
        "{err}"
    );
    assert_eq!(
        std::fs::read(cfg.output.join("summary.json")).unwrap(),
        summary
    );
    assert_eq!(
        std::fs::read(cfg.output.join("best/model.safetensors")).unwrap(),
        best
    );
    other.overwrite = true;
    fit(&other);
    // Not part of the record.
    let recorded = std::fs::read_to_string(cfg.output.join("config.toml")).unwrap();
    assert!(
        recorded.contains("lr = 0.0003") && !recorded.contains("overwrite"),
        "{recorded}"
    );
}

#[test]
fn a_checkpoint_left_between_its_renames_is_recovered_on_resume() {
    let dir = scratch("trainer");
    let full = tiny(&dir, "full", "vanilla");
    let s_full = fit(&full);
    let mut cut = full.clone();
    cut.output = dir.path().join("cut");
    cut.stop_after = Some(2);
    fit(&cut);
    cut.stop_after = None;
    // What a kill between atomic_dir's two renames leaves: the complete old
    // checkpoint as last.old, the new one (here none) not yet in place.
    std::fs::rename(cut.output.join("last"), cut.output.join("last.old")).unwrap();
    let s_cut = Run::new(cut.clone()).unwrap().fit(true, |_| ()).unwrap();
    assert_eq!(s_cut.last, s_full.last);
    assert_eq!(steps_of(&cut), steps_of(&full));
    assert!(!cut.output.join("last.old").exists());
}

#[test]
fn a_smart_step_whose_ascent_is_not_finite_adds_nothing() {
    // Noise of scale 1e30 overflows the inner pass, so every ascent step is
    // flagged: the penalty is skipped on the device (no host read) and
    // logged as NaN (null), and the run, without dropout, trains exactly as
    // vanilla does.
    let dir = scratch("trainer");
    let vanilla = short(&dir, "vanilla", "vanilla");
    let mut smart = short(&dir, "smart", "smart");
    smart.set("smart.sigma=1e30").unwrap();
    fit(&vanilla);
    fit(&smart);
    let pick = |cfg: &Config, key: &str| -> Vec<serde_json::Value> {
        lines(cfg)
            .iter()
            .filter(|l| l.get("terms").is_some())
            .map(|l| l[key].clone())
            .collect()
    };
    let skipped: Vec<serde_json::Value> = lines(&smart)
        .iter()
        .filter_map(|l| l.get("terms").map(|t| t["smart"].clone()))
        .collect();
    assert!(
        !skipped.is_empty() && skipped.iter().all(|v| v.is_null()),
        "{skipped:?}"
    );
    for key in ["loss", "grad_norm"] {
        assert_eq!(pick(&smart, key), pick(&vanilla, key), "{key}");
    }
}
