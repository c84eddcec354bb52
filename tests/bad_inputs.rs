//! The standing bad-input suite: each case writes one defect into a copy of
//! the tiny random model, a small data folder, a run directory or the
//! command line, runs the built `tunefuse` binary under a timeout and
//! checks what a user would see. A refused case must exit non-zero with a
//! message that names the culprit (the file, the setting, the value) and
//! no panic, backtrace or abort; an accepted case must exit 0 and have done
//! what was asked. Nothing may hang.
//!
//! The test prints a table of outcomes per class of input; the counts in
//! `bench/RELIABILITY.md` are copied from it.
mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use common::{data_root, finetune_args, scratch, tiny_model_dir};
use serde_json::Value;

/// A clean tiny run takes about half a second on 2 cores; a case that has
/// not finished after this long is counted as a hang.
const TIMEOUT: Duration = Duration::from_secs(90);

/// The shared inputs every case copies from (never edited in place).
struct Fixture {
    _dir: tempfile::TempDir,
    model: PathBuf,
    data: PathBuf,
    /// A run stopped by `stop_after` at step 2 of 6 (epoch 0, batch 2).
    mid: PathBuf,
    /// A finished run of the same settings (6 steps).
    done: PathBuf,
}

fn tunefuse() -> Command {
    Command::new(env!("CARGO_BIN_EXE_tunefuse"))
}

fn s(p: &Path) -> String {
    p.to_str().unwrap().to_string()
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let dst = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &dst);
        } else {
            std::fs::copy(e.path(), dst).unwrap();
        }
    }
}

/// The first `n` lines of a real data file, written under `data`.
fn copy_head(data: &Path, rel: &str, n: usize) {
    let text = std::fs::read(data_root().join(rel)).unwrap();
    let mut lines = 0;
    let end = text
        .iter()
        .position(|&b| {
            lines += (b == b'\n') as usize;
            lines == n
        })
        .map_or(text.len(), |i| i + 1);
    let dst = data.join(rel);
    std::fs::create_dir_all(dst.parent().unwrap()).unwrap();
    std::fs::write(dst, &text[..end]).unwrap();
}

fn run_ok(args: &[String]) {
    let out = tunefuse().args(args).output().unwrap();
    assert!(
        out.status.success(),
        "fixture run {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

impl Fixture {
    fn new() -> Self {
        let dir = scratch("bad-inputs");
        let model = tiny_model_dir(dir.path());
        let data = dir.path().join("data");
        copy_head(&data, "glue/SST-2/train.tsv", 41);
        copy_head(&data, "glue/SST-2/dev.tsv", 17);
        let mid = dir.path().join("mid");
        run_ok(&finetune_args(
            &model,
            &data,
            &mid,
            &["--set", "stop_after=2"],
        ));
        let done = dir.path().join("done");
        run_ok(&finetune_args(&model, &data, &done, &[]));
        Fixture {
            _dir: dir,
            model,
            data,
            mid,
            done,
        }
    }
}

/// One case's own directory and the copies it edits.
struct Ctx<'a> {
    fx: &'a Fixture,
    dir: PathBuf,
}

impl Ctx<'_> {
    /// A copy of the tiny model to edit.
    fn model(&self) -> PathBuf {
        let m = self.dir.join("model");
        copy_dir(&self.fx.model, &m);
        m
    }
    /// A copy of the small data folder to edit.
    fn data(&self) -> PathBuf {
        let d = self.dir.join("data");
        copy_dir(&self.fx.data, &d);
        d
    }
    /// A copy of the run stopped at step 2.
    fn mid(&self) -> PathBuf {
        let r = self.dir.join("run");
        copy_dir(&self.fx.mid, &r);
        r
    }
    /// A copy of the finished run.
    fn done(&self) -> PathBuf {
        let r = self.dir.join("run");
        copy_dir(&self.fx.done, &r);
        r
    }
    fn out(&self) -> PathBuf {
        self.dir.join("out")
    }
    /// A new run of the pristine model and data with `extra` flags.
    fn plain(&self, extra: &[&str]) -> Vec<String> {
        finetune_args(&self.fx.model, &self.fx.data, &self.out(), extra)
    }
    fn with_model(&self, model: &Path, extra: &[&str]) -> Vec<String> {
        finetune_args(model, &self.fx.data, &self.out(), extra)
    }
    fn with_data(&self, data: &Path, extra: &[&str]) -> Vec<String> {
        finetune_args(&self.fx.model, data, &self.out(), extra)
    }
    /// `--resume` of the run in `run`.
    fn resume(&self, run: &Path) -> Vec<String> {
        finetune_args(&self.fx.model, &self.fx.data, run, &["--resume"])
    }
    /// A TOML config file holding `text`, and a run that reads it.
    fn toml(&self, text: &str) -> Vec<String> {
        let p = self.dir.join("run.toml");
        std::fs::write(&p, text).unwrap();
        self.plain(&["--config", p.to_str().unwrap()])
    }
}

fn edit_json(path: &Path, f: impl FnOnce(&mut Value)) {
    let mut v: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    f(&mut v);
    std::fs::write(path, v.to_string()).unwrap();
}

/// Rewrites a safetensors file's JSON header (same data bytes).
fn edit_header(path: &Path, f: impl FnOnce(&mut serde_json::Map<String, Value>)) {
    let bytes = std::fs::read(path).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let mut h: Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    f(h.as_object_mut().unwrap());
    let mut text = h.to_string().into_bytes();
    // The header is padded with spaces to a multiple of 8, as writers do.
    while !text.len().is_multiple_of(8) {
        text.push(b' ');
    }
    let mut out = (text.len() as u64).to_le_bytes().to_vec();
    out.extend(text);
    out.extend(&bytes[8 + n..]);
    std::fs::write(path, out).unwrap();
}

/// Loads a safetensors file, lets `f` change the tensors, saves it back.
fn edit_tensors(
    path: &Path,
    f: impl FnOnce(&mut std::collections::HashMap<String, candle_core::Tensor>),
) {
    let mut t = candle_core::safetensors::load(path, &candle_core::Device::Cpu).unwrap();
    f(&mut t);
    candle_core::safetensors::save(&t, path).unwrap();
}

fn trainer_json(run: &Path, f: impl FnOnce(&mut Value)) {
    edit_json(&run.join("last/trainer.json"), f)
}

fn summary(dir: &Path) -> Result<Value, String> {
    let p = dir.join("summary.json");
    let text = std::fs::read_to_string(&p).map_err(|e| format!("{}: {e}", p.display()))?;
    serde_json::from_str(&text).map_err(|e| e.to_string())
}

/// The run in `dir` finished all 6 steps.
fn finished(dir: &Path) -> Result<(), String> {
    let s = summary(dir)?;
    if s["steps"] == 6 {
        Ok(())
    } else {
        Err(format!("summary.json says {} steps, not 6", s["steps"]))
    }
}

/// The run in `dir` trained on all 40 sentences of the small SST-2 file.
fn all_40(dir: &Path) -> Result<(), String> {
    let s = summary(dir)?;
    if s["train_examples"] == 40 {
        Ok(())
    } else {
        Err(format!(
            "summary.json says {} training examples, not 40",
            s["train_examples"]
        ))
    }
}

/// The metrics log of `dir` without the timing field, line by line.
fn log_lines(dir: &Path) -> Vec<String> {
    std::fs::read_to_string(dir.join("metrics.jsonl"))
        .unwrap_or_default()
        .lines()
        .map(|l| {
            let mut v: Value = serde_json::from_str(l).unwrap();
            if let Some(o) = v.as_object_mut() {
                o.remove("examples_per_s");
            }
            v.to_string()
        })
        .collect()
}

type Check = fn(&Path, &Fixture) -> Result<(), String>;

enum Want {
    /// Exit non-zero; stderr holds every one of these.
    Refuse(&'static [&'static str]),
    /// Refused as above, and afterwards this check of the case's directory.
    RefuseThen(&'static [&'static str], Check),
    /// Exit 0, then this check of the case's directory.
    Accept(Check),
}

/// Prepares a case's inputs in its directory and returns the command line.
type Setup = dyn Fn(&Ctx) -> Vec<String> + Send + Sync;

struct Case {
    class: &'static str,
    name: &'static str,
    setup: Box<Setup>,
    want: Want,
}

fn case(
    class: &'static str,
    name: &'static str,
    setup: impl Fn(&Ctx) -> Vec<String> + Send + Sync + 'static,
    want: Want,
) -> Case {
    Case {
        class,
        name,
        setup: Box::new(setup),
        want,
    }
}

use Want::{Accept, Refuse, RefuseThen};

fn cases() -> Vec<Case> {
    let mut v = vec![];
    v.extend(flag_cases());
    v.extend(toml_cases());
    v.extend(model_cases());
    v.extend(data_cases());
    v.extend(output_cases());
    v.extend(checkpoint_cases());
    v.extend(other_command_cases());
    v
}

fn flag_cases() -> Vec<Case> {
    let c = "flags";
    let out_done = |d: &Path, _: &Fixture| finished(&d.join("out"));
    let mut v = vec![
        case(
            c,
            "unknown flag",
            |x| x.plain(&["--lrr", "1e-4"]),
            Refuse(&["--lrr"]),
        ),
        case(
            c,
            "negative lr",
            |x| x.plain(&["--lr", "-1e-4"]),
            Refuse(&["lr", "-0.0001", "> 0"]),
        ),
        case(
            c,
            "lr = nan",
            |x| x.plain(&["--lr", "nan"]),
            Refuse(&["lr", "NaN"]),
        ),
        case(
            c,
            "lr = inf",
            |x| x.plain(&["--lr", "inf"]),
            Refuse(&["lr", "inf"]),
        ),
        case(
            c,
            "lr not a number",
            |x| x.plain(&["--lr", "fast"]),
            Refuse(&["--lr", "fast"]),
        ),
        case(
            c,
            "epochs 0",
            |x| x.plain(&["--epochs", "0"]),
            Refuse(&["epochs", ">= 1"]),
        ),
        case(
            c,
            "epochs negative",
            |x| x.plain(&["--epochs", "-1"]),
            Refuse(&["--epochs", "-1"]),
        ),
        case(
            c,
            "batch size 0",
            |x| x.plain(&["--batch-size", "0"]),
            Refuse(&["batch_size", ">= 1"]),
        ),
        case(
            c,
            "max len 1",
            |x| x.plain(&["--max-len", "1"]),
            Refuse(&["max_len", ">= 2"]),
        ),
        case(
            c,
            "max len past the model's positions",
            |x| x.plain(&["--max-len", "100000"]),
            Refuse(&["max_len", "100000", "max_position_embeddings", "64"]),
        ),
        case(
            c,
            "train examples 0",
            |x| x.plain(&["--train-examples", "0"]),
            Refuse(&["train_examples", "0"]),
        ),
        case(
            c,
            "train examples above the file's",
            |x| x.plain(&["--train-examples", "1000000"]),
            // A subsample larger than the set is the whole set: 40 examples,
            // 5 batches an epoch, 10 steps.
            Accept(|d, _| {
                let s = summary(&d.join("out"))?;
                if s["train_examples"] == 40 && s["steps"] == 10 {
                    Ok(())
                } else {
                    Err(format!("summary {s}"))
                }
            }),
        ),
        case(
            c,
            "unknown method",
            |x| x.plain(&["--method", "smrt"]),
            Refuse(&["smrt"]),
        ),
        case(
            c,
            "mixout with a frozen backbone",
            |x| x.plain(&["--method", "mixout,adapter"]),
            Refuse(&["mixout", "adapter"]),
        ),
        case(
            c,
            "unknown task",
            |x| x.plain(&["--task", "sst3"]),
            Refuse(&["sst3"]),
        ),
        case(
            c,
            "unknown amazon domain",
            |x| x.plain(&["--task", "amazon:toys"]),
            Refuse(&["amazon:toys"]),
        ),
        case(
            c,
            "unknown device",
            |x| x.plain(&["--device", "tpu"]),
            Refuse(&["tpu"]),
        ),
        case(
            c,
            "unknown setting",
            |x| x.plain(&["--set", "learning_rate=1e-4"]),
            Refuse(&["learning_rate"]),
        ),
        case(
            c,
            "setting without a value",
            |x| x.plain(&["--set", "lr"]),
            Refuse(&["lr", "key=value"]),
        ),
        case(
            c,
            "setting of a method not listed",
            |x| x.plain(&["--set", "smart.lambda=2"]),
            Refuse(&["smart"]),
        ),
        case(
            c,
            "setting of the wrong type",
            |x| x.plain(&["--set", "epochs=two"]),
            Refuse(&["epochs", "two"]),
        ),
        case(
            c,
            "unknown metric",
            |x| x.plain(&["--metric", "auc"]),
            Refuse(&["auc"]),
        ),
        case(
            c,
            "regression metric on a classification head",
            |x| x.plain(&["--metric", "pearson"]),
            Refuse(&["pearson", "classification"]),
        ),
        case(
            c,
            "resume and overwrite together",
            |x| x.plain(&["--resume", "--overwrite"]),
            Refuse(&["--resume", "--overwrite"]),
        ),
        case(
            c,
            "negative seed",
            |x| x.plain(&["--seed", "-3"]),
            Refuse(&["--seed", "-3"]),
        ),
        case(
            c,
            "no model",
            |x| {
                let mut a = x.plain(&[]);
                a.drain(1..3);
                a
            },
            Refuse(&["--model"]),
        ),
        case(
            c,
            "lr written --lr=-1e-4",
            |x| x.plain(&["--lr=-1e-4"]),
            Refuse(&["lr", "-0.0001"]),
        ),
        case(
            c,
            "a method's setting out of range by --set",
            |x| x.plain(&["--method", "smart", "--set", "smart.eta=-1"]),
            Refuse(&["eta", "-1"]),
        ),
        case(
            c,
            "a valid run (control)",
            |x| x.plain(&[]),
            Accept(out_done),
        ),
    ];
    // A GPU build may have the device, and then the run is valid.
    if !cfg!(feature = "cuda") {
        v.push(case(
            c,
            "cuda on a CPU build",
            |x| x.plain(&["--device", "cuda"]),
            Refuse(&["cuda"]),
        ));
    }
    v
}

fn toml_cases() -> Vec<Case> {
    let c = "TOML config";
    vec![
        case(
            c,
            "missing config file",
            |x| x.plain(&["--config", "/nonexistent/run.toml"]),
            Refuse(&["/nonexistent/run.toml"]),
        ),
        case(
            c,
            "not TOML",
            |x| x.toml("lr = = 3\n"),
            Refuse(&["run.toml"]),
        ),
        case(
            c,
            "misspelt key",
            |x| x.toml("lerning_rate = 1e-4\n"),
            Refuse(&["lerning_rate"]),
        ),
        case(
            c,
            "wrong type",
            |x| x.toml("lr = \"fast\"\n"),
            Refuse(&["lr"]),
        ),
        case(
            c,
            "lr = nan",
            |x| x.toml("lr = nan\n"),
            Refuse(&["lr", "NaN"]),
        ),
        case(
            c,
            "clip = nan",
            |x| x.toml("clip = nan\n"),
            Refuse(&["clip", "NaN"]),
        ),
        case(
            c,
            "clip negative",
            |x| x.toml("clip = -1.0\n"),
            Refuse(&["clip", "-1"]),
        ),
        case(
            c,
            "weight_decay = inf",
            |x| x.toml("weight_decay = inf\n"),
            Refuse(&["weight_decay", "inf"]),
        ),
        case(
            c,
            "smart lambda = nan",
            |x| x.toml("methods = [\"smart\"]\n[smart]\nlambda = nan\n"),
            Refuse(&["lambda", "NaN"]),
        ),
        case(
            c,
            "smart sigma negative",
            |x| x.toml("methods = [\"smart\"]\n[smart]\nsigma = -1e-5\n"),
            Refuse(&["sigma", "-0.00001"]),
        ),
        case(
            c,
            "smart steps 0",
            |x| x.toml("methods = [\"smart\"]\n[smart]\nsteps = 0\n"),
            Refuse(&["steps", "0"]),
        ),
        case(
            c,
            "smart norm unknown",
            |x| x.toml("methods = [\"smart\"]\n[smart]\nnorm = \"l3\"\n"),
            Refuse(&["l3"]),
        ),
        case(
            c,
            "smart misspelt setting",
            |x| x.toml("methods = [\"smart\"]\n[smart]\nlamda = 1.0\n"),
            Refuse(&["smart", "lamda"]),
        ),
        case(
            c,
            "r3f lambda = nan",
            |x| x.toml("methods = [\"r3f\"]\n[r3f]\nlambda = nan\n"),
            Refuse(&["lambda", "NaN"]),
        ),
        case(
            c,
            "r3f sigma = nan",
            |x| x.toml("methods = [\"r3f\"]\n[r3f]\nsigma = nan\n"),
            Refuse(&["sigma", "NaN"]),
        ),
        case(
            c,
            "freelb steps 0",
            |x| x.toml("methods = [\"freelb\"]\n[freelb]\nsteps = 0\n"),
            Refuse(&["steps", "0"]),
        ),
        case(
            c,
            "bregman beta above 1",
            |x| x.toml("methods = [\"bregman\"]\n[bregman]\nbeta = 1.5\n"),
            Refuse(&["beta", "1.5"]),
        ),
        case(
            c,
            "mixout p = 1",
            |x| x.toml("methods = [\"mixout\"]\n[mixout]\np = 1.0\n"),
            Refuse(&["p", "1"]),
        ),
        case(
            c,
            "adapter r huge",
            |x| x.toml("methods = [\"adapter\"]\n[adapter]\nr = 100000000\n"),
            Refuse(&["100000000", "32"]),
        ),
        case(
            c,
            "lora r above the layer",
            |x| x.toml("methods = [\"lora\"]\n[lora]\nr = 1000\n"),
            Refuse(&["1000", "32"]),
        ),
        case(
            c,
            "recadam gamma negative",
            |x| x.toml("recadam = { k = 0.5, t0 = 250.0, gamma = -5000.0 }\n"),
            Refuse(&["recadam", "gamma", "-5000"]),
        ),
        case(
            c,
            "recadam t0 negative",
            |x| x.toml("recadam = { k = 0.5, t0 = -1.0, gamma = 5000.0 }\n"),
            Refuse(&["recadam", "t0", "-1"]),
        ),
        case(
            c,
            "unfreeze_every_steps 0",
            |x| x.toml("gradual_unfreezing = true\nunfreeze_every_steps = 0\n"),
            Refuse(&["unfreeze_every_steps"]),
        ),
        case(
            c,
            "unknown schedule",
            |x| x.toml("schedule = { kind = \"cosine_restarts\" }\n"),
            Refuse(&["cosine_restarts"]),
        ),
        case(
            c,
            "warmup above 1",
            |x| x.toml("schedule = { kind = \"linear\", warmup = 1.5 }\n"),
            Refuse(&["warmup", "1.5"]),
        ),
        case(
            c,
            "layer_lr_decay 0",
            |x| x.toml("layer_lr_decay = 0.0\n"),
            Refuse(&["layer_lr_decay", "0"]),
        ),
        case(
            c,
            "dropout 1",
            |x| x.toml("dropout = 1.0\n"),
            Refuse(&["dropout", "1"]),
        ),
        case(
            c,
            "label_smoothing negative",
            |x| x.toml("label_smoothing = -0.1\n"),
            Refuse(&["label_smoothing", "-0.1"]),
        ),
        case(
            c,
            "grad_accum 0",
            |x| x.toml("grad_accum = 0\n"),
            Refuse(&["grad_accum"]),
        ),
        case(
            c,
            "method listed twice",
            |x| x.toml("methods = [\"smart\", \"smart\"]\n"),
            Refuse(&["smart", "twice"]),
        ),
        case(
            c,
            "unknown precision",
            |x| x.toml("precision = \"f8\"\n"),
            Refuse(&["f8"]),
        ),
        case(
            c,
            "negative integer",
            |x| x.toml("eval_every = -2\n"),
            Refuse(&["eval_every"]),
        ),
        case(
            c,
            "freeze_layers with lora",
            |x| x.toml("methods = [\"lora\"]\nfreeze_layers = -1\n"),
            Refuse(&["freeze_layers", "lora"]),
        ),
        case(
            c,
            "freeze_layers beyond the model",
            |x| x.toml("freeze_layers = -9\n"),
            Refuse(&["freeze_layers", "-9", "layers"]),
        ),
        case(
            c,
            "gradual unfreezing with adapters",
            |x| x.toml("methods = [\"adapter\"]\ngradual_unfreezing = true\n"),
            Refuse(&["gradual_unfreezing", "adapter"]),
        ),
        case(
            c,
            "a valid config (control)",
            |x| x.toml("methods = [\"smart\"]\nlr = 2e-4\n[smart]\nlambda = 2.0\n"),
            Accept(|d, _| {
                finished(&d.join("out"))?;
                let t = std::fs::read_to_string(d.join("out/config.toml")).unwrap();
                if t.contains("lambda = 2.0") && t.contains("lr = 0.0002") {
                    Ok(())
                } else {
                    Err(format!("config.toml does not record the settings:\n{t}"))
                }
            }),
        ),
    ]
}

fn model_cases() -> Vec<Case> {
    let c = "model directory";
    fn cfg_edit(x: &Ctx, f: fn(&mut Value)) -> Vec<String> {
        let m = x.model();
        edit_json(&m.join("config.json"), f);
        x.with_model(&m, &[])
    }
    vec![
        case(
            c,
            "missing directory",
            |x| x.with_model(Path::new("/nonexistent/model"), &[]),
            Refuse(&["/nonexistent/model"]),
        ),
        case(
            c,
            "missing config.json",
            |x| {
                let m = x.model();
                std::fs::remove_file(m.join("config.json")).unwrap();
                x.with_model(&m, &[])
            },
            Refuse(&["config.json"]),
        ),
        case(
            c,
            "config.json not JSON",
            |x| {
                let m = x.model();
                std::fs::write(m.join("config.json"), "{hidden_size: 32").unwrap();
                x.with_model(&m, &[])
            },
            Refuse(&["config.json"]),
        ),
        case(
            c,
            "config.json lacks hidden_size",
            |x| {
                cfg_edit(x, |v| {
                    v.as_object_mut().unwrap().remove("hidden_size");
                })
            },
            Refuse(&["config.json", "hidden_size"]),
        ),
        case(
            c,
            "heads do not divide hidden size",
            |x| cfg_edit(x, |v| v["num_attention_heads"] = 5.into()),
            Refuse(&["config.json", "num_attention_heads", "5"]),
        ),
        case(
            c,
            "intermediate_size 10^15",
            |x| {
                cfg_edit(x, |v| {
                    v["intermediate_size"] = 1_000_000_000_000_000u64.into()
                })
            },
            Refuse(&["config.json", "1000000000000000"]),
        ),
        case(
            c,
            "hidden size that the weights do not have",
            |x| cfg_edit(x, |v| v["hidden_size"] = 48.into()),
            Refuse(&["model.safetensors", "shape"]),
        ),
        case(
            c,
            "more layers than the weights hold",
            |x| cfg_edit(x, |v| v["num_hidden_layers"] = 4.into()),
            Refuse(&["model.safetensors", "encoder.layer.3"]),
        ),
        case(
            c,
            "unknown activation",
            |x| cfg_edit(x, |v| v["hidden_act"] = "swish2".into()),
            Refuse(&["config.json", "swish2"]),
        ),
        case(
            c,
            "vocabulary smaller than the tokenizer's",
            |x| {
                let m = x.model();
                edit_json(&m.join("config.json"), |v| v["vocab_size"] = 100.into());
                edit_tensors(&m.join("model.safetensors"), |t| {
                    let w = t["embeddings.word_embeddings.weight"]
                        .narrow(0, 0, 100)
                        .unwrap();
                    t.insert("embeddings.word_embeddings.weight".into(), w);
                });
                x.with_model(&m, &[])
            },
            Refuse(&["config.json", "vocab_size 100", "30522", "tokenizer.json"]),
        ),
        case(
            c,
            "position table shorter than max_len",
            |x| {
                let m = x.model();
                edit_json(&m.join("config.json"), |v| {
                    v["max_position_embeddings"] = 16.into()
                });
                edit_tensors(&m.join("model.safetensors"), |t| {
                    let k = "embeddings.position_embeddings.weight";
                    let w = t[k].narrow(0, 0, 16).unwrap();
                    t.insert(k.into(), w);
                });
                x.with_model(&m, &[])
            },
            Refuse(&["config.json", "max_position_embeddings 16", "max_len 32"]),
        ),
        case(
            c,
            "negative layer_norm_eps",
            |x| cfg_edit(x, |v| v["layer_norm_eps"] = (-1.0).into()),
            Refuse(&["layer_norm_eps"]),
        ),
        case(
            c,
            "missing model.safetensors",
            |x| {
                let m = x.model();
                std::fs::remove_file(m.join("model.safetensors")).unwrap();
                x.with_model(&m, &[])
            },
            Refuse(&["model.safetensors"]),
        ),
        case(
            c,
            "truncated model.safetensors",
            |x| {
                let m = x.model();
                let p = m.join("model.safetensors");
                let b = std::fs::read(&p).unwrap();
                std::fs::write(&p, &b[..b.len() / 2]).unwrap();
                x.with_model(&m, &[])
            },
            Refuse(&["model.safetensors"]),
        ),
        case(
            c,
            "model.safetensors of garbage",
            |x| {
                let m = x.model();
                std::fs::write(m.join("model.safetensors"), vec![0xffu8; 4096]).unwrap();
                x.with_model(&m, &[])
            },
            Refuse(&["model.safetensors"]),
        ),
        case(
            c,
            "a tensor missing",
            |x| {
                let m = x.model();
                edit_tensors(&m.join("model.safetensors"), |t| {
                    t.retain(|k, _| !k.contains("layer.1.attention.self.query.weight"));
                });
                x.with_model(&m, &[])
            },
            Refuse(&["layer.1.attention.self.query.weight"]),
        ),
        case(
            c,
            "a float tensor relabelled I32",
            |x| {
                let m = x.model();
                edit_header(&m.join("model.safetensors"), |h| {
                    let k = h
                        .keys()
                        .find(|k| k.contains("layer.0.output.dense.weight"))
                        .unwrap()
                        .clone();
                    h.get_mut(&k).unwrap()["dtype"] = "I32".into();
                });
                x.with_model(&m, &[])
            },
            Refuse(&["layer.0.output.dense.weight", "I32"]),
        ),
        case(
            c,
            "header shape that disagrees with the bytes",
            |x| {
                let m = x.model();
                edit_header(&m.join("model.safetensors"), |h| {
                    let k = h
                        .keys()
                        .find(|k| k.contains("layer.0.output.dense.weight"))
                        .unwrap()
                        .clone();
                    h.get_mut(&k).unwrap()["shape"] = serde_json::json!([64, 64]);
                });
                x.with_model(&m, &[])
            },
            Refuse(&["model.safetensors"]),
        ),
        case(
            c,
            "a weight holding NaN",
            |x| {
                let m = x.model();
                edit_tensors(&m.join("model.safetensors"), |t| {
                    let k = t
                        .keys()
                        .find(|k| k.contains("layer.2.intermediate.dense.weight"))
                        .unwrap()
                        .clone();
                    let w = &t[&k];
                    let nan = (w.zeros_like().unwrap() / 0.0).unwrap();
                    t.insert(k, nan);
                });
                x.with_model(&m, &[])
            },
            Refuse(&["layer.2.intermediate.dense.weight", "NaN"]),
        ),
        case(
            c,
            "missing tokenizer.json",
            |x| {
                let m = x.model();
                std::fs::remove_file(m.join("tokenizer.json")).unwrap();
                x.with_model(&m, &[])
            },
            Refuse(&["tokenizer.json"]),
        ),
        case(
            c,
            "tokenizer.json of garbage",
            |x| {
                let m = x.model();
                std::fs::write(m.join("tokenizer.json"), "{\"model\": 3}").unwrap();
                x.with_model(&m, &[])
            },
            Refuse(&["tokenizer.json"]),
        ),
        case(
            c,
            "weights stored as bf16 (accepted, trained in f32)",
            |x| {
                let m = x.model();
                edit_tensors(&m.join("model.safetensors"), |t| {
                    for v in t.values_mut() {
                        *v = v.to_dtype(candle_core::DType::BF16).unwrap();
                    }
                });
                x.with_model(&m, &[])
            },
            Accept(|d, _| finished(&d.join("out"))),
        ),
    ]
}

fn data_cases() -> Vec<Case> {
    let c = "data files";
    const TRAIN: &str = "glue/SST-2/train.tsv";
    fn edit(x: &Ctx, rel: &str, f: fn(String) -> String) -> Vec<String> {
        let d = x.data();
        let p = d.join(rel);
        let t = std::fs::read_to_string(&p).unwrap();
        std::fs::write(&p, f(t)).unwrap();
        x.with_data(&d, &[])
    }
    /// A data folder with the first lines of the real `files`, run on `task`.
    fn task(x: &Ctx, task: &str, files: &[(&str, usize)], f: fn(&Path)) -> Vec<String> {
        let d = x.dir.join("data");
        for (rel, n) in files {
            copy_head(&d, rel, *n);
        }
        f(&d);
        x.with_data(&d, &["--task", task])
    }
    fn replace(p: &Path, rel: &str, from: &str, to: &str) {
        let t = std::fs::read_to_string(p.join(rel)).unwrap();
        std::fs::write(p.join(rel), t.replacen(from, to, 1)).unwrap();
    }
    vec![
        case(
            c,
            "missing data folder",
            |x| x.with_data(Path::new("/nonexistent/data"), &[]),
            Refuse(&["/nonexistent/data"]),
        ),
        case(
            c,
            "missing train file",
            |x| {
                let d = x.data();
                std::fs::remove_file(d.join(TRAIN)).unwrap();
                x.with_data(&d, &[])
            },
            Refuse(&["SST-2/train.tsv"]),
        ),
        case(
            c,
            "missing dev file",
            |x| {
                let d = x.data();
                std::fs::remove_file(d.join("glue/SST-2/dev.tsv")).unwrap();
                x.with_data(&d, &[])
            },
            Refuse(&["SST-2/dev.tsv"]),
        ),
        case(
            c,
            "SST-2 without its header",
            |x| edit(x, TRAIN, |t| t.split_once('\n').unwrap().1.to_string()),
            Refuse(&["SST-2/train.tsv", "sentence", "label"]),
        ),
        case(
            c,
            "a row without a label column",
            |x| edit(x, TRAIN, |t| t.replacen("\t1\n", "\n", 1)),
            Refuse(&["SST-2/train.tsv", "line"]),
        ),
        case(
            c,
            "a label that is not a number",
            |x| edit(x, TRAIN, |t| t.replacen("\t1\n", "\tpositive\n", 1)),
            Refuse(&["SST-2/train.tsv", "positive"]),
        ),
        case(
            c,
            "a label out of range",
            |x| edit(x, TRAIN, |t| t.replacen("\t1\n", "\t7\n", 1)),
            Refuse(&["SST-2/train.tsv", "7"]),
        ),
        case(
            c,
            "header only",
            |x| {
                edit(x, TRAIN, |t| {
                    t.split_inclusive('\n').next().unwrap().to_string()
                })
            },
            Refuse(&["SST-2/train.tsv", "no examples"]),
        ),
        case(
            c,
            "empty file",
            |x| edit(x, TRAIN, |_| String::new()),
            Refuse(&["SST-2/train.tsv"]),
        ),
        case(
            c,
            "a byte that is not UTF-8 (that line read as Latin-1, as documented)",
            |x| {
                let d = x.data();
                let p = d.join(TRAIN);
                let mut b = std::fs::read(&p).unwrap();
                let i = b.iter().position(|&c| c == b'\n').unwrap() + 3;
                b[i] = 0xff;
                std::fs::write(&p, b).unwrap();
                x.with_data(&d, &["--train-examples", "1000"])
            },
            Accept(|d, _| all_40(&d.join("out"))),
        ),
        case(
            c,
            "CRLF line ends (accepted)",
            |x| edit(x, TRAIN, |t| t.replace('\n', "\r\n")),
            Accept(|d, _| {
                finished(&d.join("out"))?;
                let s = summary(&d.join("out"))?;
                (s["train_examples"] == 24)
                    .then_some(())
                    .ok_or(format!("{s}"))
            }),
        ),
        case(
            c,
            "a UTF-8 byte-order mark (accepted)",
            |x| edit(x, TRAIN, |t| format!("\u{feff}{t}")),
            Accept(|d, _| finished(&d.join("out"))),
        ),
        case(
            c,
            "a blank line inside (skipped, as pandas does)",
            |x| {
                let d = x.data();
                let p = d.join(TRAIN);
                let t = std::fs::read_to_string(&p).unwrap();
                std::fs::write(&p, t.replacen("\t1\n", "\t1\n\n", 1)).unwrap();
                x.with_data(&d, &["--train-examples", "1000"])
            },
            Accept(|d, _| all_40(&d.join("out"))),
        ),
        case(
            c,
            "an extra column",
            |x| edit(x, TRAIN, |t| t.replacen("\t1\n", "\t1\textra\n", 1)),
            Refuse(&["SST-2/train.tsv", "line"]),
        ),
        case(
            c,
            "RTE without its header",
            |x| {
                task(
                    x,
                    "rte",
                    &[
                        ("glue/RTE/train.tsv", 30),
                        ("glue/RTE/val.tsv", 5),
                        ("glue/RTE/dev.tsv", 12),
                    ],
                    |d| {
                        let p = d.join("glue/RTE/train.tsv");
                        let t = std::fs::read_to_string(&p).unwrap();
                        std::fs::write(&p, t.split_once('\n').unwrap().1).unwrap();
                    },
                )
            },
            Refuse(&["RTE/train.tsv", "sentence1"]),
        ),
        case(
            c,
            "RTE label unknown",
            |x| {
                task(
                    x,
                    "rte",
                    &[
                        ("glue/RTE/train.tsv", 30),
                        ("glue/RTE/val.tsv", 5),
                        ("glue/RTE/dev.tsv", 12),
                    ],
                    |d| {
                        replace(
                            d,
                            "glue/RTE/train.tsv",
                            "\tnot_entailment",
                            "\tcontradiction",
                        )
                    },
                )
            },
            Refuse(&["RTE/train.tsv", "contradiction"]),
        ),
        case(
            c,
            "CoLA row with three columns",
            |x| {
                task(
                    x,
                    "cola",
                    &[
                        ("glue/CoLA/train.tsv", 30),
                        ("glue/CoLA/val.tsv", 5),
                        ("glue/CoLA/dev.tsv", 12),
                    ],
                    |d| replace(d, "glue/CoLA/train.tsv", "\t\t", "\t"),
                )
            },
            Refuse(&["CoLA/train.tsv", "line 1"]),
        ),
        case(
            c,
            "TREC line without a label",
            |x| {
                task(
                    x,
                    "trec",
                    &[
                        ("ood/TREC/train_5500.label", 30),
                        ("ood/TREC/TREC_10.label", 12),
                    ],
                    |d| replace(d, "ood/TREC/train_5500.label", "DESC:manner ", ""),
                )
            },
            Refuse(&["train_5500.label", "line 1"]),
        ),
        case(
            c,
            "MRPC quality that is not 0 or 1",
            |x| {
                task(
                    x,
                    "mrpc",
                    &[("glue/MRPC/train.tsv", 30), ("glue/MRPC/dev.tsv", 12)],
                    |d| {
                        let p = d.join("glue/MRPC/train.tsv");
                        let t = std::fs::read_to_string(&p).unwrap();
                        let (head, rest) = t.split_once('\n').unwrap();
                        std::fs::write(&p, format!("{head}\nx{}", &rest[1..])).unwrap();
                    },
                )
            },
            Refuse(&["MRPC/train.tsv", "line 2"]),
        ),
        case(
            c,
            "SST-5 label outside 0-4",
            |x| {
                task(
                    x,
                    "sst5",
                    &[
                        ("extra/SST-5/sentiment-train", 30),
                        ("extra/SST-5/sentiment-dev", 12),
                    ],
                    |d| {
                        let p = d.join("extra/SST-5/sentiment-train");
                        let t = std::fs::read_to_string(&p).unwrap();
                        std::fs::write(&p, format!("9{}", &t[1..])).unwrap();
                    },
                )
            },
            Refuse(&["sentiment-train", "9"]),
        ),
        case(
            c,
            "Amazon review with an unterminated quote",
            |x| {
                task(
                    x,
                    "amazon:books",
                    &[("amazon/books/train.tsv", 1), ("amazon/books/dev.tsv", 1)],
                    |d| {
                        let p = d.join("amazon/books/train.tsv");
                        let mut t = std::fs::read_to_string(&p).unwrap();
                        t.push_str("\"a review that never ends\t1\n");
                        std::fs::write(&p, t).unwrap();
                    },
                )
            },
            Refuse(&["books/train.tsv", "quote"]),
        ),
        case(
            c,
            "fewer examples than one class needs (k_per_class)",
            |x| x.plain(&["--set", "k_per_class=1000"]),
            Refuse(&["k_per_class", "1000"]),
        ),
        case(
            c,
            "no data folder given",
            |x| {
                let mut a = x.plain(&[]);
                a.drain(3..5);
                a
            },
            Refuse(&["TUNEFUSE_DATA", "--data-dir"]),
        ),
    ]
}

fn output_cases() -> Vec<Case> {
    let c = "output directory";
    vec![
        case(
            c,
            "output is a file",
            |x| {
                std::fs::write(x.out(), "not a folder").unwrap();
                x.plain(&[])
            },
            Refuse(&["out"]),
        ),
        case(
            c,
            "output under a file",
            |x| {
                let f = x.dir.join("file");
                std::fs::write(&f, "x").unwrap();
                finetune_args(&x.fx.model, &x.fx.data, &f.join("run"), &[])
            },
            Refuse(&["file/run"]),
        ),
        case(
            c,
            "output holds a finished run",
            |x| {
                let r = x.done();
                finetune_args(&x.fx.model, &x.fx.data, &r, &["--lr", "3e-4"])
            },
            Refuse(&["holds a run", "--overwrite"]),
        ),
        case(
            c,
            "the refused run left the old one as it was",
            |x| {
                let r = x.done();
                finetune_args(&x.fx.model, &x.fx.data, &r, &["--lr", "3e-4"])
            },
            RefuseThen(&["holds a run"], |d, fx| {
                let same = |f: &str| {
                    std::fs::read(d.join("run").join(f)).ok() == std::fs::read(fx.done.join(f)).ok()
                };
                [
                    "config.toml",
                    "metrics.jsonl",
                    "summary.json",
                    "best/model.safetensors",
                    "last/trainer.json",
                ]
                .into_iter()
                .find(|f| !same(f))
                .map_or(Ok(()), |f| Err(format!("{f} changed")))
            }),
        ),
        case(
            c,
            "--overwrite replaces a finished run",
            |x| {
                let r = x.done();
                finetune_args(
                    &x.fx.model,
                    &x.fx.data,
                    &r,
                    &["--lr", "3e-4", "--overwrite"],
                )
            },
            Accept(|d, fx| {
                finished(&d.join("run"))?;
                let t = std::fs::read_to_string(d.join("run/config.toml")).unwrap();
                let (new, old) = (log_lines(&d.join("run")), log_lines(&fx.done));
                if !t.contains("lr = 0.0003") {
                    return Err("config.toml is not the new run's".into());
                }
                if new.len() != old.len() || new == old {
                    return Err("metrics.jsonl is not one new run's log".into());
                }
                Ok(())
            }),
        ),
        case(
            c,
            "an output folder holding other files (accepted)",
            |x| {
                std::fs::create_dir_all(x.out()).unwrap();
                std::fs::write(x.out().join("notes.txt"), "mine").unwrap();
                x.plain(&[])
            },
            Accept(|d, _| {
                finished(&d.join("out"))?;
                (std::fs::read_to_string(d.join("out/notes.txt")).unwrap() == "mine")
                    .then_some(())
                    .ok_or("notes.txt was changed".into())
            }),
        ),
        case(
            c,
            "--resume of an empty folder",
            |x| {
                std::fs::create_dir_all(x.out()).unwrap();
                x.resume(&x.out())
            },
            Refuse(&["config.toml", "nothing to resume"]),
        ),
        case(
            c,
            "--resume with other settings",
            |x| {
                let r = x.mid();
                let mut a = x.resume(&r);
                a.extend(["--lr".into(), "3e-4".into()]);
                a
            },
            Refuse(&["other settings", "lr"]),
        ),
        case(
            c,
            "--resume finishes a stopped run exactly",
            |x| x.resume(&x.mid()),
            Accept(|d, fx| {
                finished(&d.join("run"))?;
                (log_lines(&d.join("run")) == log_lines(&fx.done))
                    .then_some(())
                    .ok_or("the resumed run's log differs from the uninterrupted one".into())
            }),
        ),
        case(
            c,
            "--resume of a finished run only evaluates",
            |x| x.resume(&x.done()),
            Accept(|d, fx| {
                finished(&d.join("run"))?;
                (log_lines(&d.join("run")) == log_lines(&fx.done))
                    .then_some(())
                    .ok_or("resuming a finished run changed its log".into())
            }),
        ),
    ]
}

fn checkpoint_cases() -> Vec<Case> {
    let c = "checkpoints";
    fn state(x: &Ctx, f: fn(&mut Value)) -> Vec<String> {
        let r = x.mid();
        trainer_json(&r, f);
        x.resume(&r)
    }
    fn tensors(
        x: &Ctx,
        f: fn(&mut std::collections::HashMap<String, candle_core::Tensor>),
    ) -> Vec<String> {
        let r = x.mid();
        edit_tensors(&r.join("last/state.safetensors"), f);
        x.resume(&r)
    }
    fn first_key(
        t: &std::collections::HashMap<String, candle_core::Tensor>,
        prefix: &str,
    ) -> String {
        let mut k: Vec<&String> = t.keys().filter(|k| k.starts_with(prefix)).collect();
        k.sort();
        k[0].clone()
    }
    vec![
        case(
            c,
            "batch 99999",
            |x| state(x, |v| v["batch"] = 99999.into()),
            Refuse(&["trainer.json", "batch 99999"]),
        ),
        case(
            c,
            "batch = batches per epoch",
            |x| state(x, |v| v["batch"] = 3.into()),
            Refuse(&["trainer.json", "batch 3"]),
        ),
        case(
            c,
            "epoch 99",
            |x| state(x, |v| v["epoch"] = 99.into()),
            Refuse(&["trainer.json", "epoch 99"]),
        ),
        case(
            c,
            "batch and step disagree",
            |x| state(x, |v| v["batch"] = 1.into()),
            Refuse(&["trainer.json", "step 2"]),
        ),
        case(
            c,
            "step 2^63",
            |x| state(x, |v| v["step"] = (1u64 << 63).into()),
            Refuse(&["trainer.json", "9223372036854775808"]),
        ),
        case(
            c,
            "step 2^64 - 1",
            |x| state(x, |v| v["step"] = u64::MAX.into()),
            Refuse(&["trainer.json", "18446744073709551615"]),
        ),
        case(
            c,
            "a best score no evaluation gave",
            |x| state(x, |v| v["best"] = 0.99.into()),
            Refuse(&["trainer.json", "best"]),
        ),
        case(
            c,
            "history with a step in the future",
            |x| {
                state(x, |v| {
                    v["history"]
                        .as_array_mut()
                        .unwrap()
                        .push(serde_json::json!([5, 0.5]))
                })
            },
            Refuse(&["trainer.json", "history"]),
        ),
        case(
            c,
            "history score null",
            |x| state(x, |v| v["history"][0][1] = Value::Null),
            Refuse(&["trainer.json"]),
        ),
        case(
            c,
            "trainer.json not JSON",
            |x| {
                let r = x.mid();
                std::fs::write(r.join("last/trainer.json"), "{\"epoch\": 0,").unwrap();
                x.resume(&r)
            },
            Refuse(&["trainer.json"]),
        ),
        case(
            c,
            "trainer.json lacks a field",
            |x| {
                state(x, |v| {
                    v.as_object_mut().unwrap().remove("step");
                })
            },
            Refuse(&["trainer.json", "step"]),
        ),
        case(
            c,
            "trainer.json missing",
            |x| {
                let r = x.mid();
                std::fs::remove_file(r.join("last/trainer.json")).unwrap();
                x.resume(&r)
            },
            Refuse(&["trainer.json", "nothing to resume"]),
        ),
        case(
            c,
            "state.safetensors missing",
            |x| {
                let r = x.mid();
                std::fs::remove_file(r.join("last/state.safetensors")).unwrap();
                x.resume(&r)
            },
            Refuse(&["state.safetensors"]),
        ),
        case(
            c,
            "state.safetensors truncated",
            |x| {
                let r = x.mid();
                let p = r.join("last/state.safetensors");
                let b = std::fs::read(&p).unwrap();
                std::fs::write(&p, &b[..b.len() - 100]).unwrap();
                x.resume(&r)
            },
            Refuse(&["state.safetensors"]),
        ),
        case(
            c,
            "a parameter missing from the state",
            |x| {
                tensors(x, |t| {
                    let k = first_key(t, "param.");
                    t.remove(&k);
                })
            },
            Refuse(&["state.safetensors", "lacks param."]),
        ),
        case(
            c,
            "a parameter of the wrong shape",
            |x| {
                tensors(x, |t| {
                    let k = first_key(t, "param.encoder");
                    let w = t[&k].flatten_all().unwrap();
                    let n = w.elem_count();
                    t.insert(k, w.narrow(0, 0, n - 1).unwrap());
                })
            },
            Refuse(&["state.safetensors", "param.encoder", "shape"]),
        ),
        case(
            c,
            "an optimiser moment of the wrong shape",
            |x| {
                tensors(x, |t| {
                    let k = first_key(t, "opt.");
                    let w = t[&k].flatten_all().unwrap();
                    let n = w.elem_count();
                    t.insert(k, w.narrow(0, 0, n - 1).unwrap());
                })
            },
            Refuse(&["state.safetensors", "optimiser state m.", "shape"]),
        ),
        case(
            c,
            "a parameter holding NaN",
            |x| {
                tensors(x, |t| {
                    let k = first_key(t, "param.encoder");
                    let nan = (t[&k].zeros_like().unwrap() / 0.0).unwrap();
                    t.insert(k, nan);
                })
            },
            Refuse(&["state.safetensors", "param.encoder", "NaN"]),
        ),
        case(
            c,
            "a parameter stored as I64",
            |x| {
                tensors(x, |t| {
                    let k = first_key(t, "param.encoder");
                    let i = t[&k].to_dtype(candle_core::DType::I64).unwrap();
                    t.insert(k, i);
                })
            },
            Refuse(&["state.safetensors", "param.encoder", "I64"]),
        ),
        case(
            c,
            "config.toml of the run missing",
            |x| {
                let r = x.mid();
                std::fs::remove_file(r.join("config.toml")).unwrap();
                x.resume(&r)
            },
            Refuse(&["config.toml", "nothing to resume"]),
        ),
        case(
            c,
            "config.toml of the run edited",
            |x| {
                let r = x.mid();
                let p = r.join("config.toml");
                let t = std::fs::read_to_string(&p).unwrap();
                std::fs::write(&p, t.replace("lr = 0.0001", "lr = 0.0005")).unwrap();
                x.resume(&r)
            },
            Refuse(&["other settings", "lr"]),
        ),
        case(
            c,
            "config.toml of the run not TOML",
            |x| {
                let r = x.mid();
                std::fs::write(r.join("config.toml"), "lr = = 1").unwrap();
                x.resume(&r)
            },
            Refuse(&["config.toml"]),
        ),
        case(
            c,
            "last/ moved to last.old/ by a kill between renames",
            |x| {
                let r = x.mid();
                std::fs::rename(r.join("last"), r.join("last.old")).unwrap();
                x.resume(&r)
            },
            Accept(|d, fx| {
                finished(&d.join("run"))?;
                (log_lines(&d.join("run")) == log_lines(&fx.done))
                    .then_some(())
                    .ok_or(
                        "the run recovered from last.old differs from the uninterrupted one".into(),
                    )
            }),
        ),
        case(
            c,
            "a half-written last.tmp/ beside last/",
            |x| {
                let r = x.mid();
                std::fs::create_dir_all(r.join("last.tmp")).unwrap();
                std::fs::write(r.join("last.tmp/state.safetensors"), b"partial").unwrap();
                x.resume(&r)
            },
            Accept(|d, fx| {
                finished(&d.join("run"))?;
                (log_lines(&d.join("run")) == log_lines(&fx.done))
                    .then_some(())
                    .ok_or("a stray last.tmp changed the resumed run".into())
            }),
        ),
        case(
            c,
            "a half-written best.tmp/ beside best/",
            |x| {
                let r = x.mid();
                std::fs::create_dir_all(r.join("best.tmp")).unwrap();
                std::fs::write(r.join("best.tmp/model.safetensors"), b"partial").unwrap();
                x.resume(&r)
            },
            Accept(|d, _| {
                finished(&d.join("run"))?;
                candle_core::safetensors::load(
                    d.join("run/best/model.safetensors"),
                    &candle_core::Device::Cpu,
                )
                .map(|_| ())
                .map_err(|e| format!("best/ unreadable after the resume: {e}"))
            }),
        ),
    ]
}

fn other_command_cases() -> Vec<Case> {
    let c = "other commands";
    vec![
        case(
            c,
            "eval of a missing checkpoint",
            |_| {
                vec![
                    "eval".into(),
                    "--checkpoint".into(),
                    "/nonexistent/best".into(),
                ]
            },
            Refuse(&["/nonexistent/best"]),
        ),
        case(
            c,
            "eval of a checkpoint without checkpoint.json",
            |x| {
                let r = x.done();
                std::fs::remove_file(r.join("best/checkpoint.json")).unwrap();
                vec![
                    "eval".into(),
                    "--checkpoint".into(),
                    s(&r.join("best")),
                    "--data-dir".into(),
                    s(&x.fx.data),
                ]
            },
            Refuse(&["checkpoint.json"]),
        ),
        case(
            c,
            "eval of a checkpoint with a mis-shaped tensor",
            |x| {
                let r = x.done();
                edit_tensors(&r.join("best/model.safetensors"), |t| {
                    let mut keys: Vec<String> = t.keys().cloned().collect();
                    keys.sort();
                    let k = keys.into_iter().find(|k| k.contains("encoder")).unwrap();
                    let w = t[&k].flatten_all().unwrap();
                    let n = w.elem_count();
                    t.insert(k, w.narrow(0, 0, n - 1).unwrap());
                });
                vec![
                    "eval".into(),
                    "--checkpoint".into(),
                    s(&r.join("best")),
                    "--data-dir".into(),
                    s(&x.fx.data),
                ]
            },
            Refuse(&["model.safetensors", "shape"]),
        ),
        case(
            c,
            "eval on an unknown split",
            |x| {
                vec![
                    "eval".into(),
                    "--checkpoint".into(),
                    s(&x.fx.done.join("best")),
                    "--data-dir".into(),
                    s(&x.fx.data),
                    "--split".into(),
                    "valid".into(),
                ]
            },
            Refuse(&["valid", "train, dev, test"]),
        ),
        case(
            c,
            "eval of a good checkpoint (control)",
            |x| {
                vec![
                    "eval".into(),
                    "--checkpoint".into(),
                    s(&x.fx.done.join("best")),
                    "--data-dir".into(),
                    s(&x.fx.data),
                ]
            },
            Accept(|d, _| {
                let out = std::fs::read_to_string(d.join("stdout")).unwrap();
                let v: Value = serde_json::from_str(&out).map_err(|e| e.to_string())?;
                v["accuracy"]
                    .as_f64()
                    .filter(|a| (0.0..=1.0).contains(a))
                    .map(|_| ())
                    .ok_or(format!("no accuracy in {out}"))
            }),
        ),
        case(
            c,
            "convert to an unknown dtype",
            |x| {
                vec![
                    "convert-checkpoint".into(),
                    "--input".into(),
                    s(&x.fx.model),
                    "--output".into(),
                    s(&x.out()),
                    "--dtype".into(),
                    "f8".into(),
                ]
            },
            Refuse(&["f8"]),
        ),
        case(
            c,
            "convert a missing model",
            |x| {
                vec![
                    "convert-checkpoint".into(),
                    "--input".into(),
                    "/nonexistent/model".into(),
                    "--output".into(),
                    s(&x.out()),
                ]
            },
            Refuse(&["/nonexistent/model"]),
        ),
        case(
            c,
            "convert onto its own input",
            |x| {
                let m = x.model();
                vec![
                    "convert-checkpoint".into(),
                    "--input".into(),
                    s(&m),
                    "--output".into(),
                    s(&m),
                ]
            },
            Refuse(&["--output", "--input"]),
        ),
        case(
            c,
            "results of a folder without runs",
            |x| {
                std::fs::create_dir_all(x.out()).unwrap();
                vec!["results".into(), s(&x.out())]
            },
            Refuse(&["no finished runs"]),
        ),
        case(
            c,
            "table of a malformed results file",
            |x| {
                let p = x.dir.join("ours.json");
                std::fs::write(&p, "{\"device\": ").unwrap();
                vec!["table".into(), "--ours".into(), s(&p)]
            },
            Refuse(&["ours.json"]),
        ),
    ]
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Outcome {
    /// Refused with a message naming the culprit.
    Clear,
    /// Accepted and did what was asked.
    Handled,
    Panic,
    Hang,
    /// Accepted (exit 0) although it should have been refused.
    Silent,
    /// Refused, but the message does not name the culprit.
    Unclear,
    /// Refused although it is valid, or accepted and did something else.
    Wrong,
}

/// Runs `args` with stdout and stderr in `dir`; None when it timed out.
fn run_case(dir: &Path, args: &[String]) -> Option<std::process::ExitStatus> {
    let mut child = tunefuse()
        .args(args)
        .env_remove("TUNEFUSE_DATA")
        .env("RUST_BACKTRACE", "0")
        .stdout(std::fs::File::create(dir.join("stdout")).unwrap())
        .stderr(std::fs::File::create(dir.join("stderr")).unwrap())
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    let start = Instant::now();
    loop {
        if let Some(st) = child.try_wait().unwrap() {
            return Some(st);
        }
        if start.elapsed() > TIMEOUT {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn judge(
    c: &Case,
    dir: &Path,
    fx: &Fixture,
    status: Option<std::process::ExitStatus>,
) -> (Outcome, String) {
    use std::os::unix::process::ExitStatusExt;
    let Some(status) = status else {
        return (Outcome::Hang, format!("no exit after {TIMEOUT:?}"));
    };
    let err = std::fs::read_to_string(dir.join("stderr")).unwrap_or_default();
    if status.signal().is_some() || err.contains("panicked") || err.contains("stack backtrace") {
        return (Outcome::Panic, format!("{status}: {err}"));
    }
    match &c.want {
        Refuse(words) | RefuseThen(words, _) => {
            if status.success() {
                return (Outcome::Silent, format!("exit 0: {err}"));
            }
            let missing: Vec<&&str> = words.iter().filter(|w| !err.contains(**w)).collect();
            if !missing.is_empty() {
                return (Outcome::Unclear, format!("lacks {missing:?}: {err}"));
            }
            match &c.want {
                RefuseThen(_, check) => match check(dir, fx) {
                    Ok(()) => (Outcome::Clear, String::new()),
                    Err(m) => (Outcome::Wrong, m),
                },
                _ => (Outcome::Clear, String::new()),
            }
        }
        Accept(check) => {
            if !status.success() {
                return (Outcome::Wrong, format!("refused: {err}"));
            }
            match check(dir, fx) {
                Ok(()) => (Outcome::Handled, String::new()),
                Err(m) => (Outcome::Wrong, m),
            }
        }
    }
}

#[test]
fn every_bad_input_gets_a_clear_error_and_every_good_one_runs() {
    let fx = Fixture::new();
    let root = scratch("bad-input-cases");
    let cases = cases();
    let next = AtomicUsize::new(0);
    let results: Mutex<Vec<(usize, Outcome, String)>> = Mutex::new(vec![]);
    std::thread::scope(|sc| {
        for _ in 0..2 {
            sc.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::SeqCst);
                let Some(c) = cases.get(i) else { break };
                let dir = root.path().join(format!("case{i:03}"));
                std::fs::create_dir_all(&dir).unwrap();
                let ctx = Ctx {
                    fx: &fx,
                    dir: dir.clone(),
                };
                let args = (c.setup)(&ctx);
                let status = run_case(&dir, &args);
                let (o, why) = judge(c, &dir, &fx, status);
                results.lock().unwrap().push((i, o, why));
            });
        }
    });
    let mut results = results.into_inner().unwrap();
    results.sort_by_key(|r| r.0);
    // The table of outcomes per class, for bench/RELIABILITY.md.
    let mut classes: Vec<&str> = vec![];
    for c in &cases {
        if !classes.contains(&c.class) {
            classes.push(c.class);
        }
    }
    use Outcome::*;
    let kinds = [Clear, Handled, Panic, Hang, Silent, Unclear, Wrong];
    eprintln!(
        "| class | cases | clear errors | handled | panics | hangs | silent | unclear | wrong |"
    );
    eprintln!("|---|---|---|---|---|---|---|---|---|");
    let mut total = [0usize; 7];
    for class in &classes {
        let mut n = [0usize; 7];
        for (i, o, _) in &results {
            if cases[*i].class == *class {
                n[kinds.iter().position(|k| k == o).unwrap()] += 1;
            }
        }
        for (t, x) in total.iter_mut().zip(n) {
            *t += x;
        }
        let row: Vec<String> = n.iter().map(|x| x.to_string()).collect();
        eprintln!(
            "| {class} | {} | {} |",
            n.iter().sum::<usize>(),
            row.join(" | ")
        );
    }
    let row: Vec<String> = total.iter().map(|x| x.to_string()).collect();
    eprintln!("| all | {} | {} |", cases.len(), row.join(" | "));
    let failed: Vec<String> = results
        .iter()
        .filter(|(_, o, _)| !matches!(o, Clear | Handled))
        .map(|(i, o, why)| {
            let why: String = why.chars().take(600).collect();
            format!("[{}] {}: {o:?}: {why}", cases[*i].class, cases[*i].name)
        })
        .collect();
    assert!(
        failed.is_empty(),
        "{} of {} cases failed:\n{}",
        failed.len(),
        cases.len(),
        failed.join("\n")
    );
}
