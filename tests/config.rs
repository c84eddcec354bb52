//! Run configurations: the typed method registry, the forms a TOML file may
//! take (canonical, short, the records of older binaries), `--set`, the
//! refusals that come before any training, and the differences that
//! `--resume` and `tunefuse results` compare. No model is loaded.
use tunefuse::train::config::{config_differences, Config, DeviceKind, Reading};
use tunefuse::train::methods::{Method, SmartReduction};
use tunefuse::train::trainer::{BregmanConfig, HeadKind, LoraConfig, MixoutConfig, SmartConfig};

fn strict(text: &str) -> Result<Config, String> {
    Config::from_toml(text, Reading::Strict).map_err(|e| e.to_string())
}

fn strict_err(text: &str) -> String {
    match strict(text) {
        Ok(c) => panic!("{text:?} was accepted: {c:?}"),
        Err(e) => e,
    }
}

fn invalid(cfg: &Config) -> String {
    cfg.validate().expect_err("refused").to_string()
}

#[test]
fn every_recorded_run_config_still_reads() {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/bench/runs");
    let mut n = 0;
    let mut stack = vec![std::path::PathBuf::from(root)];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else if p.file_name().is_some_and(|f| f == "config.toml") {
                let cfg = Config::from_file(&p, Reading::Record).unwrap();
                cfg.validate()
                    .unwrap_or_else(|e| panic!("{}: {e}", p.display()));
                // A record's folder names its recipe: the method list matches.
                let label = p.parent().unwrap().file_name().unwrap().to_string_lossy();
                let label = label.trim_start_matches("partial-");
                let first = label.split('-').next().unwrap();
                match first {
                    "vanilla" | "recadam" | "ulmfit" => {}
                    m => assert!(
                        cfg.method(m).is_some(),
                        "{}: {:?}",
                        p.display(),
                        cfg.methods
                    ),
                }
                if label.starts_with("smart-sum") {
                    let Some(Method::Smart(s)) = cfg.method("smart") else {
                        panic!("{label}")
                    };
                    assert_eq!(s.reduction, SmartReduction::Sum);
                }
                n += 1;
            }
        }
    }
    assert!(n >= 50, "only {n} recorded configs found");
}

#[test]
fn a_legacy_record_maps_every_setting_to_its_method() {
    let old = r#"
task = "sst5"
methods = ["lora"]
regression = true
metric = "pearson"
mixout = 0.3
adapter_r = 16
lora_r = 4
lora_alpha = 8.0
lora_targets = ["query"]
peft_layernorm = true
[smart]
mode = "direction"
[bregman]
mu = 0.5
beta = 0.9
"#;
    // A user's file may not set a method it does not list…
    let e = strict_err(old);
    assert!(e.contains("[smart]") && e.contains("not in methods"), "{e}");
    let e = strict_err("methods = [\"lora\"]\nmixout = 0.3\n");
    assert!(e.contains("mixout") && e.contains("not in methods"), "{e}");
    // …a record of an older binary, which wrote every section, may.
    let cfg = Config::from_toml(old, Reading::Record).unwrap();
    assert_eq!(cfg.head, HeadKind::Regression);
    assert_eq!(
        cfg.methods,
        vec![
            Method::Lora(LoraConfig {
                r: 4,
                alpha: 8.0,
                targets: vec!["query".into()],
                layernorm: true,
            }),
            // mu > 0 switched the proximal term on before it was a method.
            Method::Bregman(BregmanConfig { mu: 0.5, beta: 0.9 }),
        ]
    );
    cfg.validate().unwrap();
}

#[test]
fn the_short_form_and_the_canonical_form_agree_and_round_trip() {
    let short = strict(
        "methods = [\"smart\", \"mixout\"]\nlr = 2e-5\n[smart]\nlambda = 2.0\n[mixout]\np = 0.2\n",
    )
    .unwrap();
    let canonical = strict(
        "lr = 2e-5\n[[methods]]\nkind = \"mixout\"\np = 0.2\n[[methods]]\nkind = \"smart\"\nlambda = 2.0\n",
    )
    .unwrap();
    assert_eq!(short.method("smart"), canonical.method("smart"));
    assert_eq!(
        short.method("mixout"),
        Some(&Method::Mixout(MixoutConfig { p: 0.2 }))
    );
    let text = short.to_toml().unwrap();
    assert!(
        text.contains("[[methods]]") && text.contains("kind = \"smart\""),
        "{text}"
    );
    assert_eq!(strict(&text).unwrap(), short);
    assert_eq!(Config::from_toml(&text, Reading::Record).unwrap(), short);
}

#[test]
fn misspelt_unknown_and_mistyped_settings_are_errors_naming_them() {
    let e = strict_err("methods = [\"smart\"]\n[smart]\nlamda = 2.0\n");
    assert!(e.contains("smart") && e.contains("lamda"), "{e}");
    let e = strict_err("[[methods]]\nkind = \"smart\"\nlamda = 2.0\n");
    assert!(e.contains("smart") && e.contains("lamda"), "{e}");
    let e = strict_err("methods = [\"smrat\"]\n");
    assert!(e.contains("smrat") && e.contains("unknown method"), "{e}");
    let e = strict_err("[[methods]]\nkind = \"smrat\"\n");
    assert!(e.contains("smrat"), "{e}");
    let e = strict_err("methods = [\"smart\"]\n[smart]\nlambda = \"big\"\n");
    assert!(e.contains("smart") && e.contains("invalid type"), "{e}");
    let e = strict_err("methods = [\"smart\"]\n[smart]\nnorm = \"l3\"\n");
    assert!(e.contains("l3") && e.contains("linf"), "{e}");
    let e = strict_err("precision = \"fp8\"\n");
    assert!(e.contains("fp8") && e.contains("bf16"), "{e}");
    let e = strict_err("pooling = \"max\"\n");
    assert!(e.contains("max") && e.contains("mean"), "{e}");
    let e = strict_err("epoch = 3\n");
    assert!(e.contains("epoch"), "{e}");
    let e = strict_err("methods = [\"r3f\"]\n[smart]\nlambda = 2.0\n");
    assert!(e.contains("[smart]") && e.contains("not in methods"), "{e}");
    let e = strict_err("methods = [\"smart\", \"smart\"]\n");
    assert!(e.contains("twice"), "{e}");
}

#[test]
fn set_reaches_every_setting_and_only_listed_methods() {
    let mut cfg = Config::default();
    cfg.set_methods("smart,bregman").unwrap();
    cfg.set("smart.lambda=2").unwrap();
    cfg.set("smart.mode=direction").unwrap();
    cfg.set("lr=2e-5").unwrap();
    cfg.set("schedule.warmup=0.06").unwrap();
    cfg.set("device=cpu").unwrap();
    let Some(Method::Smart(s)) = cfg.method("smart").cloned() else {
        panic!()
    };
    assert_eq!(s.lambda, 2.0);
    assert_eq!(format!("{:?}", s.mode), "Direction");
    assert_eq!(cfg.lr, 2e-5);
    assert_eq!(cfg.device, DeviceKind::Cpu);
    assert_eq!(
        cfg.schedule,
        tunefuse::train::optim::Schedule::Linear { warmup: 0.06 }
    );
    // A listed method keeps its settings when the list changes.
    cfg.set_methods("bregman,smart,mixout").unwrap();
    assert_eq!(cfg.method("smart"), Some(&Method::Smart(s.clone())));
    let e = cfg.set("r3f.lambda=2").unwrap_err().to_string();
    assert!(e.contains("r3f is not in methods"), "{e}");
    let e = cfg.set("smart.lamda=2").unwrap_err().to_string();
    assert!(e.contains("lamda"), "{e}");
    let e = cfg.set("device=gpu").unwrap_err().to_string();
    assert!(e.contains("gpu"), "{e}");
    let e = cfg.set("lr").unwrap_err().to_string();
    assert!(e.contains("key=value"), "{e}");
    let e = cfg.set_methods("smart,nope").unwrap_err().to_string();
    assert!(e.contains("nope"), "{e}");
}

#[test]
fn compositions_the_math_refuses_are_refused_with_a_reason() {
    let with = |names: &str| {
        let mut c = Config::default();
        c.set_methods(names).unwrap();
        c
    };
    for ok in [
        "smart,r3f",
        "smart,freelb",
        "smart,bregman,adapter,lora",
        "r3f,mixout",
        "freelb,bregman",
    ] {
        with(ok).validate().unwrap_or_else(|e| panic!("{ok}: {e}"));
    }
    let e = invalid(&with("mixout,adapter"));
    assert!(
        e.contains("mixout") && e.contains("adapter") && e.contains("freezes"),
        "{e}"
    );
    let e = invalid(&with("lora,mixout"));
    assert!(e.contains("mixout") && e.contains("lora"), "{e}");
    // Two estimators: FreeLB twice is the only pair today; build it by hand.
    let mut two = with("freelb");
    two.methods.push(two.methods[0].clone());
    let e = invalid(&two);
    assert!(e.contains("twice"), "{e}");
    // Gradual unfreezing would thaw what adapters and LoRA keep frozen.
    let mut gu = with("adapter");
    gu.gradual_unfreezing = true;
    let e = invalid(&gu);
    assert!(
        e.contains("gradual_unfreezing") && e.contains("adapter"),
        "{e}"
    );
    // Ranges are each method's own.
    let mut bad = with("smart");
    bad.methods[0] = Method::Smart(SmartConfig {
        lambda: -1.0,
        ..Default::default()
    });
    assert!(invalid(&bad).contains("lambda"));
    let mut c = with("vanilla");
    c.head = HeadKind::Regression;
    let e = invalid(&c);
    assert!(e.contains("regression") && e.contains("pearson"), "{e}");
    let mut c = with("vanilla");
    c.pad_to_multiple = 0;
    assert!(invalid(&c).contains("pad_to_multiple"));
    c.set("pad_to_multiple=16").unwrap();
    c.validate().unwrap();
}

/// `cuda_graph` covers the steps the census checks (vanilla, SMART, R3F,
/// FreeLB, mixout, adapters, LoRA with a classification head) and refuses,
/// naming it, what it does not.
#[test]
fn cuda_graph_is_refused_where_a_replay_is_not_checked() {
    let with = |names: &str| {
        let mut c = Config::default();
        c.set_methods(names).unwrap();
        c.set("cuda_graph = true").unwrap();
        c
    };
    for ok in [
        "vanilla",
        "smart",
        "lora",
        "smart,lora",
        "r3f",
        "smart,freelb",
        "r3f,mixout",
        "adapter",
    ] {
        with(ok).validate().unwrap_or_else(|e| panic!("{ok}: {e}"));
    }
    for m in ["bregman", "manifold"] {
        let e = invalid(&with(&format!("smart,{m}")));
        assert!(e.contains("cuda_graph") && e.contains(m), "{m}: {e}");
    }
    let mut c = with("vanilla");
    c.phase_times = true;
    assert!(invalid(&c).contains("phase_times"));
    let mut c = with("vanilla");
    c.gradual_unfreezing = true;
    assert!(invalid(&c).contains("unfreezing"));
    let mut c = with("vanilla");
    c.set("recadam = { k = 0.5, t0 = 250, gamma = 1.0 }")
        .unwrap();
    assert!(invalid(&c).contains("recadam"));
    let mut c = with("vanilla");
    c.device = DeviceKind::Cpu;
    assert!(invalid(&c).contains("cpu"));
    let mut c = with("vanilla");
    c.head = HeadKind::Regression;
    c.metric = tunefuse::train::trainer::Metric::Pearson;
    assert!(invalid(&c).contains("classification head"));
}

/// Resume and `tunefuse results` compare what two runs compute: the
/// settings of a method neither run lists do not exist, so they are no
/// difference; a method's settings are named by the method.
#[test]
fn config_differences_name_the_method_and_setting() {
    let diff = |a: &Config, b: &Config| config_differences(a, b).unwrap();
    let vanilla = Config::default();
    // A vanilla run recorded by an older binary, with every method's section.
    let old = Config::from_toml(
        "lora_r = 4\nmixout = 0.3\nunfreeze_every_steps = 7\n[smart]\nmode = \"direction\"\n\
         [bregman]\nmu = 0.0\nbeta = 0.5\n[r3f]\nlambda = 2.0\n",
        Reading::Record,
    )
    .unwrap();
    assert_eq!(diff(&old, &vanilla), Vec::<String>::new());
    let mut smart = vanilla.clone();
    smart.set_methods("smart").unwrap();
    let mut smart2 = smart.clone();
    smart2.set("smart.mode=direction").unwrap();
    assert_eq!(
        diff(&smart2, &smart),
        ["methods.smart.mode: \"direction\" → \"normalized_step\""]
    );
    let d = diff(&vanilla, &smart);
    assert!(
        d.len() == 1 && d[0].starts_with("methods.smart: unset →"),
        "{d:?}"
    );
    let mut gu = vanilla.clone();
    gu.gradual_unfreezing = true;
    let mut gu_old = gu.clone();
    gu_old.unfreeze_every_steps = Some(7);
    assert_eq!(diff(&gu_old, &gu), ["unfreeze_every_steps: 7 → unset"]);
    // Session keys never count.
    let mut moved = vanilla.clone();
    moved.output = "elsewhere".into();
    moved.device = DeviceKind::Cuda;
    assert_eq!(diff(&vanilla, &moved), Vec::<String>::new());
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
    let cfg = Config::from_toml(&readme[start..end], Reading::Strict).unwrap();
    cfg.validate().unwrap();
    assert!(cfg.method("smart").is_some() && cfg.method("bregman").is_some());
}

#[test]
fn recipes_parse_strictly() {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/bench/recipes");
    let mut n = 0;
    for row in std::fs::read_dir(root).unwrap() {
        for f in std::fs::read_dir(row.unwrap().path()).unwrap() {
            let p = f.unwrap().path();
            let cfg = Config::from_file(&p, Reading::Strict)
                .unwrap_or_else(|e| panic!("{}: {e}", p.display()));
            cfg.validate()
                .unwrap_or_else(|e| panic!("{}: {e}", p.display()));
            n += 1;
        }
    }
    assert!(n >= 20, "{n} recipes");
}

#[test]
fn a_setting_that_is_not_a_number_never_passes_as_off() {
    // NaN fails every comparison, so a check written as "< 0 is bad" lets
    // it through and `clip = nan` silently disables clipping.
    for (set, name) in [
        ("clip=nan", "clip"),
        ("clip=inf", "clip"),
        ("weight_decay=nan", "weight_decay"),
        ("lr=nan", "lr"),
    ] {
        let mut cfg = Config::default();
        cfg.set(set).unwrap();
        let e = invalid(&cfg);
        assert!(e.contains(name), "{set}: {e}");
    }
    for (methods, set, name) in [
        ("smart", "smart.lambda=nan", "lambda"),
        ("smart", "smart.sigma=nan", "sigma"),
        ("smart", "smart.lambda=inf", "lambda"),
        ("r3f", "r3f.lambda=nan", "lambda"),
        ("r3f", "r3f.sigma=nan", "sigma"),
    ] {
        let mut cfg = Config::default();
        cfg.set_methods(methods).unwrap();
        cfg.set(set).unwrap();
        let e = invalid(&cfg);
        assert!(e.contains(methods) && e.contains(name), "{set}: {e}");
    }
    for (set, why) in [
        ("recadam={ k = 0.5, t0 = 250, gamma = -1.0 }", "gamma"),
        ("recadam={ k = 0.5, t0 = -5, gamma = 1.0 }", "t0"),
        ("recadam={ k = nan, t0 = 250, gamma = 1.0 }", "k"),
    ] {
        let mut cfg = Config::default();
        cfg.set(set).unwrap();
        let e = invalid(&cfg);
        assert!(e.contains("recadam") && e.contains(why), "{set}: {e}");
    }
}
