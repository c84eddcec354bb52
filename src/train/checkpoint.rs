//! Checkpoints: `best/` (the trained parameters and what is needed to
//! rebuild the model) and `last/` (everything a resumed run needs: the
//! parameters, the optimiser's and the methods' state, the random streams'
//! positions and the trainer's counters). Both are written to a temporary
//! directory and renamed into place, so a crash never leaves a half-written
//! checkpoint where a good one was.
use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::Tensor;
use serde::{Deserialize, Serialize};

use super::config::{config_differences, Config, Reading};
use super::run::Run;
use crate::error::{format_err, io_err, param_err, Result};
use crate::model::bert::check_stored;
use crate::ops::mixout::Rng;

/// The trainer's own state, saved with every checkpoint.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct State {
    /// The epoch in progress.
    pub epoch: usize,
    /// Batches done in `epoch`.
    pub batch: usize,
    /// Optimiser steps done.
    pub step: u64,
    /// The dropout stream's (seed, offset).
    pub dropout_rng: (u64, u64),
    /// The perturbations' stream's (seed, offset).
    pub noise_rng: (u64, u64),
    /// The best selection metric so far.
    pub best: Option<f64>,
    /// The step it was reached at.
    pub best_step: u64,
    /// Evaluations since then (early stopping's patience).
    pub evals_since_best: usize,
    /// Every evaluation's (step, metric).
    pub history: Vec<(u64, f64)>,
    /// Wall seconds of the run up to this checkpoint, summed over the
    /// sessions a resumed run took (0 in checkpoints older than the field).
    #[serde(default)]
    pub seconds: f64,
}

impl State {
    /// A run's state before its first step.
    pub fn start(run: &Run) -> Self {
        Self {
            epoch: 0,
            batch: 0,
            step: 0,
            dropout_rng: (run.cfg.seed, 0),
            noise_rng: (run.noise.seed, 0),
            best: None,
            best_step: 0,
            evals_since_best: 0,
            history: vec![],
            seconds: 0.0,
        }
    }

    /// Takes the random streams' positions from `run` and the run's wall
    /// time so far, as a checkpoint of this state records them.
    pub fn capture(&mut self, run: &Run, seconds: f64) {
        let p = run.bert.stream.position();
        self.dropout_rng = (p.seed, p.offset);
        self.noise_rng = (run.noise.seed, run.noise.offset);
        self.seconds = seconds;
    }

    /// Whether this state is one a run of `cfg` over `n` training examples
    /// can be in: a position inside the schedule, a step count that matches
    /// it, and a best score that is one of the recorded evaluations.
    pub fn check(&self, cfg: &Config, n: usize) -> std::result::Result<(), String> {
        let batches = n.div_ceil(cfg.batch_size);
        let per_epoch = batches.div_ceil(cfg.grad_accum) as u64;
        // A finished run is at (epochs, 0): resuming it only evaluates.
        if self.epoch > cfg.epochs || (self.epoch == cfg.epochs && self.batch != 0) {
            return Err(format!(
                "epoch {} batch {} is past the run's {} epochs",
                self.epoch, self.batch, cfg.epochs
            ));
        }
        if self.batch >= batches.max(1) {
            return Err(format!(
                "batch {} is past the {batches} batches of an epoch",
                self.batch
            ));
        }
        let want = self.epoch as u64 * per_epoch + self.batch.div_ceil(cfg.grad_accum) as u64;
        if self.step != want {
            return Err(format!(
                "step {} does not match epoch {} batch {} (that position is step {want})",
                self.step, self.epoch, self.batch
            ));
        }
        if self
            .history
            .iter()
            .any(|(s, v)| *s > self.step || !v.is_finite())
        {
            return Err(
                "the evaluation history has a step after the current one or a \
                 non-finite score"
                    .into(),
            );
        }
        match self.best {
            None if self.history.is_empty() => {}
            Some(b)
                if self
                    .history
                    .iter()
                    .any(|&(s, v)| s == self.best_step && v == b) => {}
            _ => {
                return Err(format!(
                    "best {:?} at step {} is not one of the recorded evaluations",
                    self.best, self.best_step
                ))
            }
        }
        Ok(())
    }
}

/// Writes a directory by filling `dir.tmp` and renaming it over `dir`,
/// crash-safe: the files and `dir.tmp` are fsynced before the renames and
/// the parent after them. A kill leaves `dir` complete (old or new) or,
/// between the two renames, the old one complete under `dir.old`, which
/// [`recover`] puts back.
pub fn atomic_dir(dir: &Path, fill: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let tmp = dir.with_extension("tmp");
    let old = dir.with_extension("old");
    recover(dir)?;
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).map_err(|e| io_err(&tmp, e))?;
    fill(&tmp)?;
    sync_tree(&tmp)?;
    crash_test_pause();
    if dir.exists() {
        let _ = std::fs::remove_dir_all(&old);
        std::fs::rename(dir, &old).map_err(|e| io_err(dir, e))?;
        crash_test_pause();
    }
    std::fs::rename(&tmp, dir).map_err(|e| io_err(dir, e))?;
    if let Some(parent) = dir.parent() {
        sync_dir(parent)?;
    }
    let _ = std::fs::remove_dir_all(&old);
    Ok(())
}

/// For the crash test (`tests/kill.rs`): with `TUNEFUSE_CHECKPOINT_PAUSE_MS`
/// set, a checkpoint write pauses that long with its new copy complete but
/// not yet in place, and again between its two renames, so that kills land
/// inside the write often enough to be tested. Unset, it does nothing.
fn crash_test_pause() {
    static PAUSE: std::sync::OnceLock<Option<std::time::Duration>> = std::sync::OnceLock::new();
    let pause = PAUSE.get_or_init(|| {
        std::env::var("TUNEFUSE_CHECKPOINT_PAUSE_MS")
            .ok()
            .and_then(|v| v.parse().ok())
            .map(std::time::Duration::from_millis)
    });
    if let Some(d) = pause {
        std::thread::sleep(*d);
    }
}

/// Puts back a checkpoint directory that a kill between [`atomic_dir`]'s
/// two renames left as `dir.old` only (the new one is then still `dir.tmp`,
/// possibly incomplete, and is not trusted). Nothing to do otherwise.
pub fn recover(dir: &Path) -> Result<()> {
    let old = dir.with_extension("old");
    if !dir.exists() && old.is_dir() {
        std::fs::rename(&old, dir).map_err(|e| io_err(&old, e))?;
        if let Some(parent) = dir.parent() {
            sync_dir(parent)?;
        }
    }
    Ok(())
}

/// Writes `path` crash-safe: a temporary file in the same directory,
/// fsynced, renamed over `path`, the directory fsynced.
pub fn atomic_write(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let mut f = std::fs::File::create(&tmp).map_err(|e| io_err(&tmp, e))?;
    f.write_all(bytes).map_err(|e| io_err(&tmp, e))?;
    f.sync_all().map_err(|e| io_err(&tmp, e))?;
    drop(f);
    std::fs::rename(&tmp, path).map_err(|e| io_err(path, e))?;
    if let Some(parent) = path.parent() {
        sync_dir(parent)?;
    }
    Ok(())
}

/// fsyncs every file under `dir` and the directory itself.
fn sync_tree(dir: &Path) -> Result<()> {
    for entry in std::fs::read_dir(dir).map_err(|e| io_err(dir, e))? {
        let path = entry.map_err(|e| io_err(dir, e))?.path();
        if path.is_dir() {
            sync_tree(&path)?;
        } else {
            std::fs::File::open(&path)
                .and_then(|f| f.sync_all())
                .map_err(|e| io_err(&path, e))?;
        }
    }
    sync_dir(dir)
}

/// fsyncs a directory (its entries: renames and new files in it).
fn sync_dir(dir: &Path) -> Result<()> {
    let d = if dir.as_os_str().is_empty() {
        Path::new(".")
    } else {
        dir
    };
    std::fs::File::open(d)
        .and_then(|f| f.sync_all())
        .map_err(|e| io_err(d, e))
}

/// `best/`: the trained parameters (all, or only the new ones when the
/// backbone is frozen) as safetensors, with the base model, the labels and
/// the configuration in `checkpoint.json`.
pub fn save_params(run: &Run, dir: &Path) -> Result<()> {
    let tensors: HashMap<String, Tensor> = run
        .opt
        .params
        .iter()
        .map(|p| (p.name.clone(), p.var.as_tensor().clone()))
        .collect();
    atomic_dir(dir, |tmp| {
        candle_core::safetensors::save(&tensors, tmp.join("model.safetensors"))
            .map_err(|e| io_err(tmp, e))?;
        let meta = serde_json::json!({
            "base_model": run.cfg.model,
            "base_model_relative": relative_to(&run.cfg.model, dir),
            "base_fingerprint": run.base_fingerprint,
            "labels": run.train.labels,
            "config": run.cfg,
        });
        std::fs::write(tmp.join("checkpoint.json"), meta.to_string()).map_err(|e| io_err(tmp, e))
    })
}

/// The path of `target` relative to the directory `dir` (both made
/// absolute first), so a checkpoint finds its base model after the run and
/// the model move together; `None` when either cannot be resolved.
fn relative_to(target: &Path, dir: &Path) -> Option<PathBuf> {
    let target = std::fs::canonicalize(target).ok()?;
    let parent = dir.parent().filter(|p| !p.as_os_str().is_empty());
    let dir = std::fs::canonicalize(parent.unwrap_or(Path::new(".")))
        .ok()?
        .join(dir.file_name()?);
    let (t, d): (Vec<_>, Vec<_>) = (target.components().collect(), dir.components().collect());
    let common = t.iter().zip(&d).take_while(|(a, b)| a == b).count();
    let mut rel = PathBuf::new();
    for _ in common..d.len() {
        rel.push("..");
    }
    for c in &t[common..] {
        rel.push(c);
    }
    Some(rel)
}

/// A fingerprint of a model directory's `model.safetensors`: FNV-1a over
/// its size, its header (every tensor's name, dtype, shape and offsets)
/// and 16 samples of 4 KiB spread over the data. It tells whether a
/// directory holds the base model a checkpoint was trained from without
/// reading gigabytes; it is not a cryptographic hash.
pub fn fingerprint(model_dir: &Path) -> Result<String> {
    use std::io::{Read, Seek, SeekFrom};
    let path = model_dir.join("model.safetensors");
    let mut f = std::fs::File::open(&path).map_err(|e| io_err(&path, e))?;
    let size = f.metadata().map_err(|e| io_err(&path, e))?.len();
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut eat = |bytes: &[u8]| {
        for &b in bytes {
            h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
        }
    };
    eat(&size.to_le_bytes());
    let mut n = [0u8; 8];
    f.read_exact(&mut n).map_err(|e| io_err(&path, e))?;
    let header = u64::from_le_bytes(n).min(size.saturating_sub(8));
    let mut buf = vec![0u8; header as usize];
    f.read_exact(&mut buf).map_err(|e| io_err(&path, e))?;
    eat(&buf);
    let data = 8 + header;
    let span = size - data;
    let mut sample = vec![0u8; 4096.min(span as usize)];
    for i in 0..16u64 {
        let at = data + (span - sample.len() as u64) * i / 15;
        f.seek(SeekFrom::Start(at)).map_err(|e| io_err(&path, e))?;
        f.read_exact(&mut sample).map_err(|e| io_err(&path, e))?;
        eat(&sample);
    }
    Ok(format!("{h:016x}"))
}

/// The checkpoint's recorded configuration, labels and base model.
pub(crate) struct Recorded {
    /// The run's configuration, its `model` the base model found.
    pub cfg: Config,
    pub labels: Vec<String>,
    pub base: PathBuf,
}

/// Reads `dir/checkpoint.json` (the configuration through the one
/// legacy-aware reader) and finds the base model: `base` when given, else
/// the path the run was given, else the path relative to the checkpoint
/// (where it is when the run and the model moved together); each checked
/// against the recorded fingerprint, so a moved or replaced base is an
/// error that says what is missing rather than a silently different model.
pub(crate) fn read_checkpoint(dir: &Path, base: Option<&Path>) -> Result<Recorded> {
    let meta_path = dir.join("checkpoint.json");
    let text = std::fs::read_to_string(&meta_path).map_err(|e| io_err(&meta_path, e))?;
    let meta: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| format_err(&meta_path, e.to_string()))?;
    let table = match json_to_toml(&meta["config"]) {
        Some(toml::Value::Table(t)) => t,
        _ => return Err(format_err(&meta_path, "lacks the run's config")),
    };
    let text = toml::to_string(&table).map_err(|e| format_err(&meta_path, e.to_string()))?;
    let mut cfg = Config::from_toml(&text, Reading::Record)
        .map_err(|e| format_err(&meta_path, e.to_string()))?;
    let labels = meta["labels"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_str().map(str::to_string))
                .collect()
        })
        .ok_or_else(|| format_err(&meta_path, "lacks the label names (labels)"))?;
    let want = meta["base_fingerprint"].as_str();
    let mut candidates: Vec<(PathBuf, &str)> = vec![];
    match base {
        Some(b) => candidates.push((b.to_path_buf(), "given with --base-model")),
        None => {
            candidates.push((cfg.model.clone(), "as the run was given it"));
            if let Some(rel) = meta["base_model_relative"].as_str() {
                candidates.push((dir.join(rel), "relative to the checkpoint"));
            }
        }
    }
    let mut tried = vec![];
    for (path, how) in &candidates {
        if !path.join("model.safetensors").is_file() {
            tried.push(format!("{} ({how}): no model.safetensors", path.display()));
            continue;
        }
        match want {
            Some(w) if fingerprint(path)? != w => tried.push(format!(
                "{} ({how}): a different model (its fingerprint is not {w})",
                path.display()
            )),
            _ => {
                cfg.model = path.clone();
                return Ok(Recorded {
                    base: path.clone(),
                    cfg,
                    labels,
                });
            }
        }
    }
    Err(format_err(
        &meta_path,
        format!(
            "the base model this checkpoint was trained from is not found: {}; pass \
             --base-model DIR with the model directory it was trained from",
            tried.join("; ")
        ),
    ))
}

/// JSON as TOML: nulls (unset options) are left out, as TOML has none.
fn json_to_toml(v: &serde_json::Value) -> Option<toml::Value> {
    use serde_json::Value as J;
    Some(match v {
        J::Null => return None,
        J::Bool(b) => toml::Value::Boolean(*b),
        J::Number(n) => match n.as_i64() {
            Some(i) => toml::Value::Integer(i),
            None => toml::Value::Float(n.as_f64()?),
        },
        J::String(s) => toml::Value::String(s.clone()),
        J::Array(a) => toml::Value::Array(a.iter().filter_map(json_to_toml).collect()),
        J::Object(o) => toml::Value::Table(
            o.iter()
                .filter_map(|(k, v)| Some((k.clone(), json_to_toml(v)?)))
                .collect(),
        ),
    })
}

/// Loads the parameters of a `best/` checkpoint into `run`, checking names
/// and shapes.
pub fn load_params(run: &Run, path: &Path) -> Result<()> {
    let t = candle_core::safetensors::load(path, &run.device)
        .map_err(|e| format_err(path, format!("not a readable safetensors file: {e}")))?;
    for p in &run.opt.params {
        let v = t
            .get(&p.name)
            .ok_or_else(|| format_err(path, format!("lacks {}", p.name)))?;
        check_stored(path, &p.name, v, p.var.as_tensor())?;
        p.var.set(v)?;
    }
    run.bert.stream.refresh_shadows()
}

/// `last/`: parameters (`param.*`), optimiser state (`opt.*`), the methods'
/// state (under their own keys) and the trainer's state.
pub fn save_last(run: &Run, dir: &Path, st: &State) -> Result<()> {
    let params = &run.opt.params;
    let mut tensors: HashMap<String, Tensor> = params
        .iter()
        .map(|p| (format!("param.{}", p.name), p.var.as_tensor().clone()))
        .collect();
    tensors.extend(
        run.opt
            .state()?
            .into_iter()
            .map(|(k, v)| (format!("opt.{k}"), v)),
    );
    for t in &run.objective.terms {
        tensors.extend(t.state(params));
    }
    atomic_dir(dir, |tmp| {
        candle_core::safetensors::save(&tensors, tmp.join("state.safetensors"))
            .map_err(|e| io_err(tmp, e))?;
        std::fs::write(tmp.join("trainer.json"), serde_json::to_string(st).unwrap())
            .map_err(|e| io_err(tmp, e))
    })
}

/// Restores what [`save_last`] wrote and returns the trainer's state.
pub fn load_last(run: &mut Run, dir: &Path) -> Result<State> {
    recover(dir)?;
    let tj = dir.join("trainer.json");
    let text = std::fs::read_to_string(&tj)
        .map_err(|e| io_err(&tj, format!("{e} (nothing to resume)")))?;
    let st: State = serde_json::from_str(&text).map_err(|e| format_err(&tj, e.to_string()))?;
    st.check(&run.cfg, run.train.examples.len()).map_err(|m| {
        format_err(
            &tj,
            format!("{m}; this is not a state the run can be in, so it is not resumed"),
        )
    })?;
    let sp = dir.join("state.safetensors");
    let t = candle_core::safetensors::load(&sp, &run.device)
        .map_err(|e| format_err(&sp, e.to_string()))?;
    let get = |key: &str| -> Result<Tensor> {
        t.get(key)
            .cloned()
            .ok_or_else(|| format_err(&sp, format!("lacks {key}")))
    };
    for p in &run.opt.params {
        let key = format!("param.{}", p.name);
        let v = get(&key)?;
        check_stored(&sp, &key, &v, p.var.as_tensor())?;
        p.var.set(&v)?;
    }
    run.bert.stream.refresh_shadows()?;
    let opt: HashMap<String, Tensor> = t
        .iter()
        .filter_map(|(k, v)| k.strip_prefix("opt.").map(|k| (k.to_string(), v.clone())))
        .collect();
    // The optimiser's and the methods' own checks name the tensor; the
    // file is added here.
    let in_file = |e: crate::Error| format_err(&sp, e.to_string());
    run.opt.load_state(&opt, st.step).map_err(in_file)?;
    for term in &mut run.objective.terms {
        term.load_state(&run.opt.params, &get).map_err(in_file)?;
    }
    run.bert.stream.set_position(Rng {
        seed: st.dropout_rng.0,
        offset: st.dropout_rng.1,
    });
    run.noise = Rng {
        seed: st.noise_rng.0,
        offset: st.noise_rng.1,
    };
    Ok(st)
}

/// `--resume` continues the run recorded in `path` (its `config.toml`)
/// only with the same settings: anything else would silently mix two
/// recipes in one run (a different schedule length, seed, method…) and
/// overwrite the record of the first. Settings of the session rather than
/// of the run may differ ([`super::config::SESSION_KEYS`]).
pub fn check_resumes(cfg: &Config, path: &Path) -> Result<()> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| io_err(path, format!("{e} (nothing to resume)")))?;
    let was =
        Config::from_toml(&text, Reading::Record).map_err(|e| format_err(path, e.to_string()))?;
    let diffs = config_differences(&was, cfg)?;
    if diffs.is_empty() {
        return Ok(());
    }
    Err(param_err(
        "resume",
        format!(
            "the run in {} was started with other settings ({}); resume it with the \
             settings of its config.toml, or start a new run with another --output",
            path.parent().unwrap_or(path).display(),
            diffs.join("; ")
        ),
    ))
}
