//! Helpers shared by the integration tests.
#![allow(dead_code)]
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use tunefuse::philox;

/// `../shared/golden` beside the checkout, or `TUNEFUSE_GOLDEN`.
pub fn golden(name: &str) -> serde_json::Value {
    let dir = std::env::var_os("TUNEFUSE_GOLDEN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/golden"));
    let path = dir.join(name);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "golden file {} unreadable ({e}); set TUNEFUSE_GOLDEN",
            path.display()
        )
    });
    serde_json::from_str(&text).unwrap()
}

pub fn json_matrix(v: &serde_json::Value) -> Vec<Vec<f64>> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|r| {
            r.as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_f64().unwrap())
                .collect()
        })
        .collect()
}

pub fn json_vec(v: &serde_json::Value) -> Vec<f64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect()
}

/// Deterministic standard-normal-ish values (Box–Muller on Philox words).
pub fn randn(n: usize, seed: u64, scale: f64) -> Vec<f64> {
    (0..n)
        .map(|i| {
            let g = philox::group(seed, 0, i as u64);
            let u1 = (f64::from(g[0]) + 1.0) / 4294967297.0;
            let u2 = f64::from(g[1]) / 4294967296.0;
            scale * (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
        })
        .collect()
}

pub fn tensor(vals: &[f64], shape: &[usize], dtype: DType, dev: &Device) -> Tensor {
    Tensor::from_vec(vals.to_vec(), shape, &Device::Cpu)
        .unwrap()
        .to_dtype(dtype)
        .unwrap()
        .to_device(dev)
        .unwrap()
}

pub fn to_f64(t: &Tensor) -> Vec<f64> {
    t.to_device(&Device::Cpu)
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

/// Fails with the worst offending index unless |x − y| ≤ atol + rtol·|y|.
pub fn assert_close(what: &str, x: &[f64], y: &[f64], atol: f64, rtol: f64) {
    assert_within(
        what,
        x,
        y,
        |i| atol + rtol * y[i].abs(),
        |_| format!("atol {atol}, rtol {rtol}"),
    );
}

/// Fails with the element exceeding its allowance `allowed(i)` by most,
/// unless |x − y| ≤ allowed(i) everywhere; NaN against NaN passes, NaN
/// against a number counts as the worst. `note(i)` ends the message.
pub fn assert_within(
    what: &str,
    x: &[f64],
    y: &[f64],
    allowed: impl Fn(usize) -> f64,
    note: impl Fn(usize) -> String,
) {
    assert_eq!(x.len(), y.len(), "{what}: lengths differ");
    let mut worst: Option<(usize, f64)> = None;
    for (i, (&a, &b)) in x.iter().zip(y).enumerate() {
        if a.is_nan() && b.is_nan() {
            continue;
        }
        let excess = (a - b).abs() - allowed(i);
        let excess = if excess.is_nan() {
            f64::INFINITY
        } else {
            excess
        };
        if excess > 0.0 && worst.is_none_or(|(_, w)| excess > w) {
            worst = Some((i, excess));
        }
    }
    if let Some((i, _)) = worst {
        panic!(
            "{what}: element {i} is {} but expected {} ({})",
            x[i],
            y[i],
            note(i)
        );
    }
}

/// The CUDA device, or None with the reason printed (tests then skip).
pub fn cuda_device() -> Option<Device> {
    if !cfg!(feature = "cuda") {
        eprintln!("skipped: built without the `cuda` feature");
        return None;
    }
    match tunefuse::cuda_device(0) {
        Ok(d) => Some(d),
        Err(e) => {
            eprintln!("skipped: no CUDA device ({e})");
            None
        }
    }
}

/// A fresh directory under the system's temporary directory, named
/// `tunefuse-<what>-XXXXXX`, removed with everything in it when the guard
/// drops: also when the test fails, so a failing run leaves no checkpoints
/// behind (a trainer test writes hundreds of MB).
pub fn scratch(what: &str) -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix(&format!("tunefuse-{what}-"))
        .tempdir()
        .expect("cannot create a scratch directory under the temporary directory")
}

/// The all-MiniLM-L6-v2 directory: `TUNEFUSE_MODEL_DIR`, or fetched (once,
/// then cached) by `scripts/fetch-model.sh`.
///
/// Resolved once per test process: the script hashes the 90 MB weights on
/// every call, and tests that run in parallel would otherwise run it side
/// by side.
pub fn minilm_dir() -> PathBuf {
    static DIR: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    DIR.get_or_init(resolve_minilm_dir).clone()
}

fn resolve_minilm_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("TUNEFUSE_MODEL_DIR") {
        return PathBuf::from(d);
    }
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let out = std::process::Command::new("bash")
        .arg(root.join("scripts/fetch-model.sh"))
        .output()
        .expect("cannot run scripts/fetch-model.sh");
    assert!(
        out.status.success(),
        "fetch-model.sh failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    PathBuf::from(String::from_utf8(out.stdout).unwrap().trim())
}

/// `../shared/data` beside the checkout, or `TUNEFUSE_DATA`.
pub fn data_root() -> PathBuf {
    std::env::var_os("TUNEFUSE_DATA")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/data"))
}

/// [CLS] vectors, normalised mean-pooled embeddings and sentence 0's first
/// three token vectors of the golden sentences, run on `dev` in `dtype`
/// with the weights of `model_dir` (cast to `dtype`).
pub fn minilm_outputs(
    model_dir: &std::path::Path,
    dev: &Device,
    dtype: DType,
) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    use tunefuse::model::bert::{l2_normalize, mean_pool};
    use tunefuse::model::{Bert, Outputs, TextTokenizer};
    let vm = candle_nn::VarMap::new();
    let bert = Bert::from_pretrained(model_dir, &vm, dtype, dev).unwrap();
    let tok = TextTokenizer::from_file(&model_dir.join("tokenizer.json"), 128).unwrap();
    let sentences = golden_sentences();
    let texts: Vec<(&str, Option<&str>)> = sentences.iter().map(|s| (s.as_str(), None)).collect();
    let b = tok.batch(&texts, dev).unwrap();
    let h = bert
        .forward(&b.ids, Some(&b.token_types), &b.mask, Outputs::default())
        .unwrap()
        .last_hidden;
    let cls = h.narrow(1, 0, 1).unwrap().squeeze(1).unwrap();
    let emb = l2_normalize(&mean_pool(&h.to_dtype(DType::F32).unwrap(), &b.mask).unwrap()).unwrap();
    let t3 = h.get(0).unwrap().narrow(0, 0, 3).unwrap();
    (to_f64(&cls), to_f64(&emb), to_f64(&t3))
}

/// Largest absolute difference.
pub fn max_abs_diff(a: &[f64], b: &[f64]) -> f64 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f64::max)
}

/// The sentences of the MiniLM golden file.
pub fn golden_sentences() -> Vec<String> {
    golden("minilm_l6_v2.json")["sentences"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_str().unwrap().to_string())
        .collect()
}

/// Central differences (step 1e-6) of `f` at entries `at` of `x`, against
/// the analytic gradient: |fd − g| ≤ atol + rtol·|fd|.
pub fn check_fd(
    what: &str,
    x: &[f64],
    at: &[usize],
    grad: &[f64],
    atol: f64,
    rtol: f64,
    f: impl Fn(&[f64]) -> f64,
) {
    let h = 1e-6;
    for &i in at {
        let (mut xp, mut xm) = (x.to_vec(), x.to_vec());
        xp[i] += h;
        xm[i] -= h;
        let fd = (f(&xp) - f(&xm)) / (2.0 * h);
        assert!(
            (fd - grad[i]).abs() <= atol + rtol * fd.abs(),
            "{what}: entry {i}: finite difference {fd} vs analytic {}",
            grad[i]
        );
    }
}

/// Runs every case of a grid to the end and fails once with all the cases
/// that failed, so one GPU run reports the whole picture rather than the
/// first mismatch. Each failing case's panic is also printed as it happens.
#[derive(Default)]
pub struct Failures {
    cases: usize,
    failed: Vec<String>,
}

impl Failures {
    /// Runs one case; a panic inside it is recorded, not propagated.
    pub fn check(&mut self, case: impl FnOnce()) {
        self.cases += 1;
        if let Err(e) = std::panic::catch_unwind(std::panic::AssertUnwindSafe(case)) {
            let msg = e
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "(non-string panic)".into());
            self.failed.push(msg);
        }
    }

    /// Panics listing the failed cases (the first 40), if any.
    pub fn finish(self, what: &str) {
        if self.failed.is_empty() {
            eprintln!("{what}: {} cases passed", self.cases);
            return;
        }
        let shown: Vec<&str> = self.failed.iter().take(40).map(|s| s.as_str()).collect();
        panic!(
            "{what}: {} of {} cases failed:\n  {}",
            self.failed.len(),
            self.cases,
            shown.join("\n  ")
        );
    }
}

/// AdamW constants of step `t` (1-based; β₁ 0.9, β₂ 0.999, ε 1e-8, lr
/// 3e-4·t), with weight decay 0.01 and RecAdam's λ(t) (k 0.5, t₀ 2, γ 5000)
/// when asked: the steps the AdamW tests take.
pub fn adamw_test_step(t: i32, decay: bool, recadam: bool) -> tunefuse::ops::AdamWStep {
    let lr = 3e-4 * t as f64;
    let lam = 1.0 / (1.0 + (-0.5f64 * (t as f64 - 2.0)).exp());
    tunefuse::ops::AdamWStep {
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        c1: 1.0 - 0.9f64.powi(t),
        c2: 1.0 - 0.999f64.powi(t),
        lr,
        decay: decay.then_some(lr * 0.01),
        recadam: recadam.then_some((lam, (1.0 - lam) * 5000.0)),
    }
}

/// A tiny random BERT in the Hugging Face layout (config.json,
/// model.safetensors, and MiniLM's tokenizer.json, so real text tokenises):
/// 3 layers, hidden 32, 4 heads, weights drawn from a fixed Philox stream.
/// For trainer invariants that need a model, not a pretrained one: it runs
/// a step in milliseconds where MiniLM takes most of a second.
pub fn tiny_model_dir(parent: &std::path::Path) -> PathBuf {
    use tunefuse::model::{Bert, BertConfig};
    let dir = parent.join("tiny-bert");
    if dir.join("model.safetensors").exists() {
        return dir;
    }
    std::fs::create_dir_all(&dir).unwrap();
    let cfg = serde_json::json!({
        "model_type": "bert", "vocab_size": 30522, "hidden_size": 32,
        "num_hidden_layers": 3, "num_attention_heads": 4, "intermediate_size": 64,
        "hidden_act": "gelu", "hidden_dropout_prob": 0.1, "attention_probs_dropout_prob": 0.1,
        "max_position_embeddings": 64, "type_vocab_size": 2, "layer_norm_eps": 1e-12,
        "pad_token_id": 0,
    });
    std::fs::write(dir.join("config.json"), cfg.to_string()).unwrap();
    let bc = BertConfig::from_file(&dir.join("config.json")).unwrap();
    let vm = candle_nn::VarMap::new();
    Bert::new(&bc, &vm, DType::F32, &Device::Cpu, false).unwrap();
    let data = vm.data().lock().unwrap();
    let mut names: Vec<&String> = data.keys().collect();
    names.sort();
    for (i, name) in names.into_iter().enumerate() {
        let v = &data[name];
        let n = v.elem_count();
        let vals: Vec<f64> = if name.ends_with("LayerNorm.weight") {
            randn(n, 1000 + i as u64, 0.02)
                .iter()
                .map(|x| 1.0 + x)
                .collect()
        } else if name.ends_with("bias") {
            vec![0.0; n]
        } else {
            randn(n, 1000 + i as u64, 0.05)
        };
        v.set(&tensor(&vals, v.dims(), DType::F32, &Device::Cpu))
            .unwrap();
    }
    drop(data);
    vm.save(dir.join("model.safetensors")).unwrap();
    std::fs::copy(
        minilm_dir().join("tokenizer.json"),
        dir.join("tokenizer.json"),
    )
    .unwrap();
    dir
}

/// A small CPU SST-2 run of `model` writing to `out` inside `dir` (24
/// training and 24 evaluation sentences, batch 8, 2 epochs, max length 32,
/// evaluated every 2 steps, every step logged): the scratch directory
/// removes every checkpoint when the test ends.
pub fn small_run(
    dir: &tempfile::TempDir,
    out: &str,
    model: PathBuf,
) -> tunefuse::train::trainer::Config {
    use tunefuse::train::trainer::{Config, DeviceKind};
    Config {
        task: "sst2".into(),
        model,
        data_dir: Some(data_root()),
        output: dir.path().join(out),
        epochs: 2,
        batch_size: 8,
        train_examples: Some(24),
        eval_examples: Some(24),
        eval_every: 2,
        log_every: 1,
        max_len: 32,
        device: DeviceKind::Cpu,
        ..Config::default()
    }
}

/// The settings of the tests that drive the `tunefuse` binary: 24 SST-2
/// sentences, batch 8 (3 batches an epoch), 2 epochs, evaluated and
/// checkpointed every 2 steps.
pub const BASE: [&str; 18] = [
    "--device",
    "cpu",
    "--train-examples",
    "24",
    "--batch-size",
    "8",
    "--epochs",
    "2",
    "--max-len",
    "32",
    "--set",
    "eval_examples=8",
    "--set",
    "log_every=1",
    "--set",
    "eval_every=2",
    "--seed",
    "1",
];

/// The arguments of `tunefuse finetune` of `model` on the data folder
/// `data` into `out`: [`BASE`], then `extra`. A flag of `BASE` that `extra`
/// gives again is taken from `extra` (the parser refuses a flag given
/// twice); a `--set` of `extra` comes later and so wins.
pub fn finetune_args(
    model: &std::path::Path,
    data: &std::path::Path,
    out: &std::path::Path,
    extra: &[&str],
) -> Vec<String> {
    with_defaults(
        &[("--model", model), ("--data-dir", data), ("--output", out)],
        &BASE,
        extra,
    )
}

/// The arguments of `tunefuse finetune` of `model` on the user's own data
/// files `train` and `dev` into `out`: one CPU epoch, batch 8, max length
/// 16, then `extra` (a flag of these that `extra` gives again is taken
/// from `extra`).
pub fn own_data_args(
    model: &std::path::Path,
    train: &std::path::Path,
    dev: &std::path::Path,
    out: &std::path::Path,
    extra: &[&str],
) -> Vec<String> {
    with_defaults(
        &[
            ("--model", model),
            ("--train-file", train),
            ("--dev-file", dev),
            ("--output", out),
        ],
        &[
            "--device",
            "cpu",
            "--epochs",
            "1",
            "--batch-size",
            "8",
            "--max-len",
            "16",
        ],
        extra,
    )
}

/// `finetune`, the `paths` flags, the `defaults` flag pairs that `extra`
/// does not give again (`--set` pairs always stay: later ones win), then
/// `extra`.
fn with_defaults(
    paths: &[(&str, &std::path::Path)],
    defaults: &[&str],
    extra: &[&str],
) -> Vec<String> {
    let mut a: Vec<String> = vec!["finetune".into()];
    for (flag, p) in paths {
        a.push(flag.to_string());
        a.push(p.to_str().unwrap().to_string());
    }
    for pair in defaults.chunks(2) {
        let overridden = pair[0] != "--set"
            && extra
                .iter()
                .any(|e| *e == pair[0] || e.starts_with(&format!("{}=", pair[0])));
        if !overridden {
            a.extend(pair.iter().map(|x| x.to_string()));
        }
    }
    a.extend(extra.iter().map(|x| x.to_string()));
    a
}

/// `dir/t.csv`: a `text,label` header and `n` rows cycling through `rows`
/// (each `text,label`): the small own-data training file the CLI tests use.
pub fn labelled_csv(dir: &std::path::Path, rows: &[&str], n: usize) -> PathBuf {
    let mut text = String::from("text,label\n");
    for i in 0..n {
        text.push_str(rows[i % rows.len()]);
        text.push('\n');
    }
    let path = dir.join("t.csv");
    std::fs::write(&path, text).unwrap();
    path
}

/// Runs the `tunefuse` binary with `args` and returns its output.
pub fn cli(args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_tunefuse"))
        .args(args)
        .output()
        .unwrap()
}
