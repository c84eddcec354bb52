//! A run's configuration: the typed settings, their validation before any
//! training, the forms a TOML file may take, `--set key=value`, and the
//! differences between two configurations (what `--resume` and
//! `tunefuse results` refuse to mix).
//!
//! The settings of a run are flat top-level keys; the methods are a list of
//! [`Method`]s, each carrying its own settings. A file may write them in the
//! canonical form that runs record (`[[methods]]` tables with a `kind`) or
//! in the short form, a list of names with a section per method:
//!
//! ```toml
//! methods = ["smart", "bregman"]
//! [smart]
//! lambda = 2.0
//! ```
//!
//! The short form also takes the spellings of records written before the
//! method list was typed (`mixout = 0.1`, `adapter_r`, `lora_targets`,
//! `peft_layernorm`, `regression = true`, a `[bregman]` section with μ > 0
//! switching the proximal term on), so every recorded run still reads. A
//! user's file is read strictly (settings of a method that is not listed
//! are an error naming them); a recorded `config.toml` leniently, because
//! records of that time wrote every method's section whether it ran or not.
//! The flat layout departs from the nested `Config { data, model, optim, … }`
//! sketched in the design notes: it keeps every recorded file and recipe
//! readable and makes `--set lr=…` the same key as in TOML.
use std::path::{Path, PathBuf};

use candle_core::Device;
use serde::{Deserialize, Serialize};

use super::data::{Split, Task};
use super::files::DataFiles;
use super::methods::{self, Method};
use super::optim::{RecAdam, Schedule};
use super::task::HeadKind;
use crate::error::{format_err, param_err, Result};
use crate::model::Pooling;

/// Where the run computes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DeviceKind {
    /// CUDA device 0 when present, else the CPU.
    #[default]
    Auto,
    /// The CPU.
    Cpu,
    /// CUDA device 0 (an error without one).
    Cuda,
}

impl DeviceKind {
    /// The candle device this kind names.
    pub fn device(self) -> Result<Device> {
        Ok(match self {
            DeviceKind::Cpu => Device::Cpu,
            DeviceKind::Cuda => crate::cuda_device(0)?,
            DeviceKind::Auto => crate::cuda_if_available()?,
        })
    }
}

/// The activations' dtype (master weights and optimiser state stay f32).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// bf16 on CUDA, f32 on the CPU.
    #[default]
    Auto,
    /// f32 activations.
    F32,
    /// bf16 activations (CUDA).
    Bf16,
}

/// The model-selection metric.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Metric {
    #[default]
    /// Fraction of correct predictions.
    Accuracy,
    /// F1 averaged over classes.
    MacroF1,
    /// F1 of the positive class (binary tasks).
    F1,
    /// Matthews correlation.
    Mcc,
    /// Regression heads select on a correlation.
    Pearson,
    /// Spearman's rank correlation (regression).
    Spearman,
    /// Entity-level micro F1 as seqeval computes it (token classification).
    EntityF1,
    /// Quadratic weighted kappa (score head).
    Qwk,
}

impl Metric {
    /// The metric's name in configurations, logs and summaries.
    pub fn name(self) -> &'static str {
        match self {
            Metric::Accuracy => "accuracy",
            Metric::MacroF1 => "macro_f1",
            Metric::F1 => "f1",
            Metric::Mcc => "mcc",
            Metric::Pearson => "pearson",
            Metric::Spearman => "spearman",
            Metric::EntityF1 => "entity_f1",
            Metric::Qwk => "qwk",
        }
    }

    /// Whether a head of `kind` can be selected on this metric.
    fn fits(self, kind: HeadKind) -> bool {
        match kind {
            HeadKind::Regression => matches!(self, Metric::Pearson | Metric::Spearman),
            HeadKind::Token => matches!(self, Metric::EntityF1 | Metric::Accuracy),
            HeadKind::Score => matches!(self, Metric::Qwk | Metric::Pearson | Metric::Spearman),
            HeadKind::Classification => !matches!(
                self,
                Metric::Pearson | Metric::Spearman | Metric::EntityF1 | Metric::Qwk
            ),
        }
    }
}

/// The run configuration (every field settable from TOML, `--set` or a flag).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// A data reader's task name (`sst2`, `amazon:books`, …), or `files`
    /// for the user's own data in `train_file` / `dev_file` / `test_file`
    /// (the default when `train_file` is given).
    pub task: String,
    /// The pretrained model directory (Hugging Face layout).
    pub model: PathBuf,
    /// Where the built-in tasks' data lives (default: `TUNEFUSE_DATA`, else
    /// `../shared/data`).
    pub data_dir: Option<PathBuf>,
    /// Own data (task `files`): CSV, TSV or JSON Lines, one file per split
    /// (see [`super::files`] for the formats and the column defaults).
    pub train_file: Option<PathBuf>,
    /// The evaluation file of own data.
    pub dev_file: Option<PathBuf>,
    /// The test file of own data (`eval --split test`).
    pub test_file: Option<PathBuf>,
    /// The text column (default `sentence1`, else the first non-label one).
    pub text_column: Option<String>,
    /// A second text, for pair tasks (default `sentence2` with `sentence1`).
    pub text_pair_column: Option<String>,
    /// The label column (default `label`).
    pub label_column: Option<String>,
    /// The label set in index order (default: the training file's labels,
    /// sorted).
    pub labels: Option<Vec<String>>,
    /// The run directory: `metrics.jsonl`, `summary.json`, `config.toml`,
    /// `best/`, `last/`.
    pub output: PathBuf,
    /// Seeds data order, subsampling, initialisation, dropout and noise.
    pub seed: u64,
    /// Passes over the training set.
    pub epochs: usize,
    /// Examples per optimiser step (before accumulation).
    pub batch_size: usize,
    /// Batches accumulated per optimiser step.
    pub grad_accum: usize,
    /// Peak learning rate.
    pub lr: f64,
    /// AdamW's decoupled weight decay.
    pub weight_decay: f64,
    /// The learning-rate schedule.
    pub schedule: Schedule,
    /// Discriminative fine-tuning: lr of layer l is lr·ξ^(L−l) (ULMFiT uses 1/2.6).
    pub layer_lr_decay: Option<f64>,
    /// Gradual unfreezing: the top layer first, one more every epoch.
    pub gradual_unfreezing: bool,
    /// With gradual unfreezing: unfreeze one more layer every N optimiser
    /// steps instead of every epoch.
    pub unfreeze_every_steps: Option<u64>,
    /// Layer freezing as Grießhaber et al. (COLING 2020) study it: +k
    /// freezes the embeddings and the k encoder layers nearest the input,
    /// −k the k layers nearest the output, for the whole run (0: none).
    pub freeze_layers: i64,
    /// RecAdam's annealed pull towards the pretrained weights. It acts
    /// through the optimiser's update (the authors' form), not through a
    /// loss term, so it is an optimiser setting rather than a method.
    pub recadam: Option<RecAdam>,
    /// Tokens per example (longer ones are truncated).
    pub max_len: usize,
    /// Pad each batch to a multiple of this many tokens (at most
    /// `max_len`); 1: to its longest example. A few batch shapes instead of
    /// one per length: what a captured CUDA graph per shape needs, and
    /// tile-friendly GEMMs. The padding is masked.
    pub pad_to_multiple: usize,
    /// Gradient clipping by global norm (0 = off).
    pub clip: f64,
    /// Evaluate every N optimiser steps (0 = at the end of each epoch only).
    pub eval_every: usize,
    /// The score head's ListNet term (R2BERT's τ_e·MSE + (1 − τ_e)·ListNet);
    /// false: MSE alone.
    pub score_ranking: bool,
    /// Evaluate (and checkpoint) at the end of every epoch; when false, at
    /// the end of training only (and every `eval_every` steps). Active
    /// learning's rounds use only their final weights.
    pub eval_epochs: bool,
    /// Log every N optimiser steps.
    pub log_every: usize,
    /// Subsample the training set to this many examples (by seed).
    pub train_examples: Option<usize>,
    /// Or k examples per class (low-resource runs).
    pub k_per_class: Option<usize>,
    /// Subsample the evaluation set to this many examples (by seed).
    pub eval_examples: Option<usize>,
    /// The split evaluated during training (`dev`, or `test`).
    pub eval_split: Split,
    /// The task head: classification or regression (each example's label
    /// index as a real-valued target, e.g. SST-5's 0–4 scale).
    pub head: HeadKind,
    /// Model selection metric.
    pub metric: Metric,
    /// Stop after this many evaluations without improvement.
    pub patience: Option<usize>,
    /// Label smoothing ε of the cross-entropy.
    pub label_smoothing: f64,
    /// How the head pools the hidden states (`cls`, `mean`, `pooler`).
    pub pooling: Pooling,
    /// Hidden and attention dropout; default: the model's (or what a
    /// method asks for: none with mixout).
    pub dropout: Option<f64>,
    /// Where the run computes.
    pub device: DeviceKind,
    /// The activations' dtype.
    pub precision: Precision,
    /// Stop after the first checkpoint at or past this many optimiser steps
    /// (time-boxing; the run can be continued with `--resume`).
    pub stop_after: Option<u64>,
    /// Let a new run replace the run recorded in `output` (refused
    /// otherwise). A session's choice, never recorded.
    #[serde(skip_serializing)]
    pub overwrite: bool,
    /// Measure the wall time of each training-step phase (batch, forward,
    /// backward, clipping, optimiser, the rest) by synchronising the device
    /// at each boundary; reported per step in `summary.json` (`phase_ms`).
    /// The synchronisations remove the overlap of host and device work, so
    /// the run gets slower: for finding where the time goes, not for timing.
    pub phase_times: bool,
    /// On CUDA, capture the training step as a CUDA graph per batch shape
    /// and replay it: one graph launch per step instead of hundreds of
    /// launches (`crate::train::graph`). The second step of a shape is
    /// captured (the first fills the caches a capture needs); at most
    /// [`MAX_GRAPHS`] shapes are captured, each holding its own step's
    /// memory, so pad batches to a few lengths (`pad_to_multiple`). Covers
    /// the steps whose replay the step census checks: vanilla, SMART, R3F,
    /// FreeLB, mixout, adapters and LoRA with a classification head, no
    /// RecAdam, no gradual unfreezing, no `phase_times`; anything else
    /// (Bregman, manifold smoothing, AFTER among the methods) is refused.
    /// Not on by default until a GPU run has compared it with the eager
    /// step; on the CPU it does nothing.
    pub cuda_graph: bool,
    /// The methods combined (none: plain fine-tuning), each with its
    /// settings; applied in registry order whatever order they are listed in.
    pub methods: Vec<Method>,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            task: "sst2".into(),
            model: PathBuf::new(),
            data_dir: None,
            train_file: None,
            dev_file: None,
            test_file: None,
            text_column: None,
            text_pair_column: None,
            label_column: None,
            labels: None,
            output: PathBuf::from("runs/out"),
            seed: 1,
            epochs: 3,
            batch_size: 16,
            grad_accum: 1,
            lr: 1e-4,
            weight_decay: 0.01,
            schedule: Schedule::Linear { warmup: 0.1 },
            layer_lr_decay: None,
            gradual_unfreezing: false,
            unfreeze_every_steps: None,
            freeze_layers: 0,
            recadam: None,
            max_len: 128,
            pad_to_multiple: 1,
            clip: 1.0,
            eval_every: 0,
            eval_epochs: true,
            score_ranking: true,
            log_every: 10,
            train_examples: None,
            k_per_class: None,
            eval_examples: None,
            eval_split: Split::Dev,
            head: HeadKind::Classification,
            metric: Metric::Accuracy,
            patience: None,
            label_smoothing: 0.0,
            pooling: Pooling::Cls,
            dropout: None,
            device: DeviceKind::Auto,
            precision: Precision::Auto,
            stop_after: None,
            overwrite: false,
            phase_times: false,
            cuda_graph: false,
            methods: vec![],
        }
    }
}

/// The task name of the user's own data files.
pub const FILES_TASK: &str = "files";

/// Config keys that belong to one session of a run, not to the run: a
/// resumed run may change them (where the files are, on which device it
/// runs, when it stops, what it logs).
pub const SESSION_KEYS: [&str; 9] = [
    "output",
    "overwrite",
    "model",
    "data_dir",
    "device",
    "stop_after",
    "phase_times",
    "log_every",
    "cuda_graph",
];

/// The most batch shapes [`Config::cuda_graph`] captures in one run; steps
/// of further shapes run eagerly.
pub const MAX_GRAPHS: usize = 16;

/// How strictly [`Config::from_toml`] reads the short form's sections.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reading {
    /// A user's file: settings of a method that is not listed are an error.
    Strict,
    /// A recorded `config.toml`: they are dropped (older records wrote every
    /// method's section, run or not).
    Record,
}

/// The spellings, before the typed method list, of settings that now
/// belong to a method: (old top-level key, method, key in the method).
const LEGACY_KEYS: [(&str, &str, &str); 8] = [
    ("mixout", "mixout", "p"),
    ("adapter_r", "adapter", "r"),
    ("adapter_placement", "adapter", "placement"),
    ("lora_r", "lora", "r"),
    ("lora_alpha", "lora", "alpha"),
    ("lora_targets", "lora", "targets"),
    ("peft_layernorm", "adapter", "layernorm"),
    ("peft_layernorm", "lora", "layernorm"),
];

impl Config {
    /// Parses a TOML document in either form (see the module docs).
    pub fn from_toml(text: &str, reading: Reading) -> Result<Self> {
        let table: toml::Table =
            toml::from_str(text).map_err(|e| param_err("config", e.to_string()))?;
        Self::from_table(table, reading)
    }

    /// Reads a TOML file, naming it in every error.
    pub fn from_file(path: &Path, reading: Reading) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| crate::error::io_err(path, e))?;
        Self::from_toml(&text, reading).map_err(|e| format_err(path, e.to_string()))
    }

    fn from_table(mut table: toml::Table, reading: Reading) -> Result<Self> {
        normalise(&mut table, reading)?;
        let cfg = Self::deserialize(toml::Value::Table(table))
            .map_err(|e| param_err("config", e.to_string()))?;
        Ok(cfg)
    }

    /// The configuration as a TOML table (the canonical form).
    pub fn to_table(&self) -> Result<toml::Table> {
        match toml::Value::try_from(self).map_err(|e| param_err("config", e.to_string()))? {
            toml::Value::Table(t) => Ok(t),
            _ => Err(param_err("config", "does not serialise to a table")),
        }
    }

    /// The canonical TOML text (what a run records in `config.toml`).
    pub fn to_toml(&self) -> Result<String> {
        toml::to_string(self).map_err(|e| param_err("config", e.to_string()))
    }

    /// Sets one setting from `key=value` (`lr=2e-5`, `smart.lambda=2`,
    /// `schedule.warmup=0.06`); `value` is a TOML value, or a bare string.
    /// A method's settings are addressed by its name and exist only when it
    /// is in the method list.
    pub fn set(&mut self, assignment: &str) -> Result<()> {
        let bad = |m: String| param_err("--set", format!("{assignment}: {m}"));
        let (key, raw) = assignment
            .split_once('=')
            .ok_or_else(|| bad("expected key=value".into()))?;
        let (key, raw) = (key.trim(), raw.trim());
        let value = match toml::from_str::<toml::Table>(&format!("v = {raw}")) {
            Ok(mut t) => t.remove("v").expect("just parsed"),
            Err(_) => toml::Value::String(raw.to_string()),
        };
        let path: Vec<&str> = key.split('.').collect();
        if path.iter().any(|p| p.is_empty()) {
            return Err(bad("empty key".into()));
        }
        let mut table = self.to_table()?;
        if methods::NAMES.contains(&path[0]) {
            if path.len() != 2 {
                return Err(bad(format!(
                    "a setting of {} is {}.<key>",
                    path[0], path[0]
                )));
            }
            let entry = match table.get_mut("methods") {
                Some(toml::Value::Array(a)) => a
                    .iter_mut()
                    .filter_map(toml::Value::as_table_mut)
                    .find(|m| m.get("kind").and_then(toml::Value::as_str) == Some(path[0])),
                _ => None,
            }
            .ok_or_else(|| {
                bad(format!(
                    "{} is not in methods (add it with --method or to the list)",
                    path[0]
                ))
            })?;
            entry.insert(path[1].to_string(), value);
        } else {
            let mut t = &mut table;
            for p in &path[..path.len() - 1] {
                let slot = t
                    .entry(p.to_string())
                    .or_insert_with(|| toml::Value::Table(toml::Table::new()));
                t = slot
                    .as_table_mut()
                    .ok_or_else(|| bad(format!("{p} is not a section")))?;
            }
            t.insert(path[path.len() - 1].to_string(), value);
        }
        // `overwrite` is the session's choice and never serialised: the
        // round trip through the table would reset it.
        let overwrite = self.overwrite;
        *self = Self::from_table(table, Reading::Strict).map_err(|e| bad(e.to_string()))?;
        self.overwrite = overwrite;
        Ok(())
    }

    /// The method of `kind`'s name, when listed.
    pub fn method(&self, name: &str) -> Option<&Method> {
        self.methods.iter().find(|m| m.name() == name)
    }

    /// The listed methods' names (`vanilla` for none), for summaries.
    pub fn method_names(&self) -> Vec<String> {
        if self.methods.is_empty() {
            return vec!["vanilla".into()];
        }
        self.methods.iter().map(|m| m.name().to_string()).collect()
    }

    /// Replaces the method list by `names` (comma-separated, `vanilla` for
    /// none): a method already listed keeps its settings, a new one takes
    /// its defaults.
    pub fn set_methods(&mut self, names: &str) -> Result<()> {
        let mut out = vec![];
        for n in names.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            if n == "vanilla" {
                continue;
            }
            out.push(match self.method(n) {
                Some(m) => m.clone(),
                None => Method::from_name(n)?,
            });
        }
        self.methods = out;
        Ok(())
    }

    /// The settings (top-level keys) that this run does not read: the
    /// unfreezing period without gradual unfreezing.
    pub fn unused_keys(&self) -> Vec<&'static str> {
        let mut keys = vec![];
        if !self.gradual_unfreezing {
            keys.push("unfreeze_every_steps");
        }
        keys
    }

    /// The user's data files, when the task is `files`.
    pub fn data_files(&self) -> Option<DataFiles> {
        (self.task == FILES_TASK).then(|| DataFiles {
            train: self.train_file.clone().unwrap_or_default(),
            dev: self.dev_file.clone(),
            test: self.test_file.clone(),
            text_column: self.text_column.clone(),
            text_pair_column: self.text_pair_column.clone(),
            label_column: self.label_column.clone(),
            labels: self.labels.clone(),
            regression: self.head == HeadKind::Regression,
        })
    }

    /// What [`Config::cuda_graph`] covers: the steps whose replay the step
    /// census checks (no kernel argument that changes from one step of a
    /// shape to the next, nothing the host decides per step).
    fn check_cuda_graph(&self) -> Result<()> {
        let bad = |m: String| Err(param_err("config", m));
        if self.device == DeviceKind::Cpu {
            return bad("cuda_graph captures CUDA steps, and device = \"cpu\"".into());
        }
        if let Some(m) = self.methods.iter().find(|m| {
            !matches!(
                m,
                Method::Smart(_)
                    | Method::R3f(_)
                    | Method::Freelb(_)
                    | Method::Mixout(_)
                    | Method::Adapter(_)
                    | Method::Lora(_)
            )
        }) {
            return bad(format!(
                "cuda_graph covers vanilla, smart, r3f, freelb, mixout, adapter and lora, whose \
                 captured steps the step census checks; {} is not covered: drop cuda_graph or \
                 the method",
                m.name()
            ));
        }
        let refused = [
            (self.phase_times, "phase_times synchronises inside the step"),
            (self.recadam.is_some(), "recadam is not checked yet"),
            (
                self.gradual_unfreezing || self.unfreeze_every_steps.is_some(),
                "gradual unfreezing changes the trainable set between steps",
            ),
            (
                self.head != HeadKind::Classification,
                "only the classification head is checked yet",
            ),
        ];
        if let Some((_, why)) = refused.iter().find(|(on, _)| *on) {
            return bad(format!(
                "cuda_graph: {why}; drop cuda_graph or that setting"
            ));
        }
        Ok(())
    }

    /// Every check that can fail before training starts.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(param_err("config", m));
        match self.data_files() {
            Some(f) => {
                if self.train_file.is_none() {
                    return bad(format!(
                        "task = \"{FILES_TASK}\" reads your own data: give train_file \
                         (--train-file) and dev_file or test_file"
                    ));
                }
                f.validate()?;
            }
            None => {
                self.task.parse::<Task>()?;
                let own = [
                    ("train_file", self.train_file.is_some()),
                    ("dev_file", self.dev_file.is_some()),
                    ("test_file", self.test_file.is_some()),
                    ("text_column", self.text_column.is_some()),
                    ("text_pair_column", self.text_pair_column.is_some()),
                    ("label_column", self.label_column.is_some()),
                    ("labels", self.labels.is_some()),
                ];
                if let Some((key, _)) = own.iter().find(|(_, set)| *set) {
                    return bad(format!(
                        "{key} belongs to your own data files (task = \"{FILES_TASK}\"), \
                         and the task is the built-in reader {:?}: drop one of them",
                        self.task
                    ));
                }
            }
        }
        for m in &self.methods {
            m.validate()?;
        }
        methods::check_composition(&self.methods)?;
        if self.head == HeadKind::Regression {
            if let Some(m) = self
                .methods
                .iter()
                .find(|m| matches!(m, Method::Manifold(_)))
            {
                return bad(format!(
                    "{} (manifold smoothing) trains towards class distributions: it needs a \
                     classification head, and this run regresses",
                    m.name()
                ));
            }
        }
        let token_task = match self.data_files() {
            Some(_) => false,
            None => self.task.parse::<Task>()?.is_token_task(),
        };
        if token_task != (self.head == HeadKind::Token) {
            return bad(if token_task {
                format!(
                    "{} labels every word: it needs head = \"token\" (the command line sets \
                     it for a token task)",
                    self.task
                )
            } else {
                format!(
                    "head = \"token\" labels every word, and {} is not a token \
                     classification task (ner:conll2003, ner:ncbi-disease, ner:sciie)",
                    self.task
                )
            });
        }
        if self.head == HeadKind::Token {
            if let Some(m) = self
                .methods
                .iter()
                .find(|m| matches!(m, Method::Manifold(_)))
            {
                return bad(format!(
                    "{} (manifold smoothing) mixes sentence labels: it needs a sentence \
                     classification head, and this run tags words",
                    m.name()
                ));
            }
        }
        if self.freeze_layers != 0 {
            let other = if self.gradual_unfreezing {
                Some("gradual_unfreezing".to_string())
            } else {
                self.methods
                    .iter()
                    .find(|m| m.props().freezes_backbone)
                    .map(|m| m.name().to_string())
            };
            if let Some(other) = other {
                return bad(format!(
                    "freeze_layers = {} freezes fixed layers, and {other} decides what the \
                     backbone trains itself: use one or the other",
                    self.freeze_layers
                ));
            }
        }
        if self.gradual_unfreezing {
            if let Some(m) = self.methods.iter().find(|m| m.props().freezes_backbone) {
                return bad(format!(
                    "gradual_unfreezing thaws the backbone's layers one by one, and {} keeps \
                     the backbone frozen: use one or the other",
                    m.name()
                ));
            }
        }
        if !self.metric.fits(self.head) {
            return bad(format!(
                "a {} head cannot select on {}: classification takes accuracy, macro_f1, f1 or \
                 mcc, regression pearson or spearman, token classification entity_f1 or \
                 accuracy, a score head qwk, pearson or spearman",
                match self.head {
                    HeadKind::Classification => "classification",
                    HeadKind::Regression => "regression",
                    HeadKind::Token => "token",
                    HeadKind::Score => "score",
                },
                self.metric.name()
            ));
        }
        if self.head == HeadKind::Score && self.score_ranking && self.epochs < 3 {
            return bad(format!(
                "the score head's ranking schedule (R2BERT) moves from ranking at epoch 1 to \
                 regression from epoch E/2 and needs at least 3 epochs, got {}; or set \
                 score_ranking = false for regression alone",
                self.epochs
            ));
        }
        if self.head == HeadKind::Score
            && self
                .methods
                .iter()
                .any(|m| matches!(m, Method::Manifold(_)))
        {
            return bad(
                "manifold smoothing trains towards class distributions: it needs a \
                 classification head, and a score head regresses"
                    .into(),
            );
        }
        if self.cuda_graph {
            self.check_cuda_graph()?;
        }
        if self.head == HeadKind::Regression && self.label_smoothing > 0.0 {
            return bad("label_smoothing applies to classification, not regression".into());
        }
        if self.epochs == 0 || self.batch_size == 0 || self.grad_accum == 0 || self.max_len < 2 {
            return bad("epochs, batch_size and grad_accum must be >= 1, max_len >= 2".into());
        }
        if self.pad_to_multiple == 0 {
            return bad("pad_to_multiple must be >= 1 (1: pad to the longest example)".into());
        }
        // Written so that NaN fails every check: a NaN must never pass as
        // "off" (clip = NaN would otherwise disable clipping).
        if !(self.lr > 0.0 && self.lr.is_finite()) {
            return bad(format!("lr must be a finite number > 0, got {}", self.lr));
        }
        for (name, v) in [("weight_decay", self.weight_decay), ("clip", self.clip)] {
            if !(v >= 0.0 && v.is_finite()) {
                return bad(format!(
                    "{name} must be a finite number >= 0 (0 turns it off), got {v}"
                ));
            }
        }
        if let Some(r) = &self.recadam {
            let nonneg = |v: f64| v >= 0.0 && v.is_finite();
            if !(r.k > 0.0 && r.k.is_finite() && nonneg(r.t0) && nonneg(r.gamma)) {
                return bad(format!(
                    "recadam: k must be finite and > 0, t0 and gamma finite and >= 0 (a \
                     negative gamma pushes the weights away from the pretrained ones), got k = \
                     {}, t0 = {}, gamma = {}",
                    r.k, r.t0, r.gamma
                ));
            }
        }
        if !(0.0..1.0).contains(&self.label_smoothing) {
            return bad(format!(
                "label_smoothing must be in [0, 1), got {}",
                self.label_smoothing
            ));
        }
        if let Some(x) = self.layer_lr_decay {
            if !(x > 0.0 && x <= 1.0) {
                return bad(format!("layer_lr_decay must be in (0, 1], got {x}"));
            }
        }
        if let Some(p) = self.dropout {
            if !(0.0..1.0).contains(&p) {
                return bad(format!("dropout must be in [0, 1), got {p}"));
            }
        }
        if self.unfreeze_every_steps == Some(0) {
            return bad("unfreeze_every_steps must be >= 1".into());
        }
        self.schedule.validate()
    }
}

/// Brings a parsed document to the canonical form: legacy top-level keys
/// mapped, the short method list expanded into `[[methods]]` tables with
/// their sections; each method's table checked on its own, so an error
/// names the method (`smart: unknown field `lamda``).
fn normalise(t: &mut toml::Table, reading: Reading) -> Result<()> {
    let bad = |m: String| Err(param_err("config", m));
    // A file that names its training data reads it without `task = "files"`.
    if t.contains_key("train_file") && !t.contains_key("task") {
        t.insert("task".into(), FILES_TASK.into());
    }
    if let Some(v) = t.remove("regression") {
        match v {
            toml::Value::Boolean(true) => {
                t.insert("head".into(), "regression".into());
            }
            toml::Value::Boolean(false) => {}
            v => return bad(format!("regression must be true or false, got {v}")),
        }
    }
    let short = match t.get("methods") {
        None => Some(vec![]),
        Some(toml::Value::Array(a)) if a.iter().all(toml::Value::is_str) => Some(
            a.iter()
                .filter_map(toml::Value::as_str)
                .map(str::to_string)
                .collect::<Vec<_>>(),
        ),
        Some(toml::Value::Array(a)) if a.iter().all(toml::Value::is_table) => None,
        Some(v) => {
            return bad(format!(
                "methods must be a list of names or of [[methods]] tables, got {v}"
            ))
        }
    };
    let mut list: Vec<toml::Table> = vec![];
    if let Some(names) = short {
        for n in names.iter().filter(|n| *n != "vanilla") {
            Method::from_name(n)?;
            if list.iter().any(|m| m["kind"].as_str() == Some(n)) {
                return bad(format!("method {n} is listed twice"));
            }
            list.push(methods::kind_table(n));
        }
        fn listed(list: &[toml::Table], name: &str) -> Option<usize> {
            list.iter().position(|m| m["kind"].as_str() == Some(name))
        }
        // A section per method.
        for name in methods::NAMES {
            // `mixout = p` is the older spelling of mixout's one setting
            // (a legacy key, mapped below), not a section.
            if !t.get(name).is_some_and(toml::Value::is_table) {
                continue;
            }
            let Some(toml::Value::Table(section)) = t.remove(name) else {
                continue;
            };
            let i = match listed(&list, name) {
                Some(i) => i,
                // Before the method list was typed, μ > 0 switched the
                // proximal term on.
                None if name == "bregman"
                    && section
                        .get("mu")
                        .and_then(as_f64)
                        .is_some_and(|mu| mu > 0.0) =>
                {
                    list.push(methods::kind_table(name));
                    list.len() - 1
                }
                None if name == "bregman" && section.get("mu").and_then(as_f64) == Some(0.0) => {
                    continue
                }
                None if reading == Reading::Record => continue,
                None => {
                    return bad(format!(
                        "[{name}] sets {name}'s settings, but {name} is not in methods"
                    ))
                }
            };
            list[i].extend(section);
        }
        for (old, name, key) in LEGACY_KEYS {
            let Some(v) = t.get(old).cloned() else {
                continue;
            };
            match listed(&list, name) {
                Some(i) => {
                    list[i].entry(key).or_insert(v);
                }
                None if reading == Reading::Record => {}
                None if LEGACY_KEYS
                    .iter()
                    .any(|(o, n, _)| *o == old && listed(&list, n).is_some()) => {}
                None => {
                    return bad(format!(
                        "{old} is a setting of {}, which is not in methods",
                        LEGACY_KEYS
                            .iter()
                            .filter(|(o, ..)| *o == old)
                            .map(|(_, n, _)| *n)
                            .collect::<Vec<_>>()
                            .join(" or ")
                    ))
                }
            }
        }
        for (old, ..) in LEGACY_KEYS {
            t.remove(old);
        }
        t.insert(
            "methods".into(),
            toml::Value::Array(list.iter().cloned().map(toml::Value::Table).collect()),
        );
    } else {
        for name in methods::NAMES {
            if t.contains_key(name) {
                return bad(format!(
                    "[{name}] beside [[methods]] tables: put {name}'s settings in its \
                     [[methods]] table (kind = \"{name}\")"
                ));
            }
        }
        if let Some(toml::Value::Array(a)) = t.get("methods") {
            list = a.iter().filter_map(|v| v.as_table().cloned()).collect();
        }
    }
    for m in &list {
        let kind = m
            .get("kind")
            .and_then(toml::Value::as_str)
            .unwrap_or("(no kind)")
            .to_string();
        if !methods::NAMES.contains(&kind.as_str()) {
            Method::from_name(&kind)?;
        }
        Method::deserialize(toml::Value::Table(m.clone()))
            .map_err(|e| param_err("config", format!("method {kind}: {e}")))?;
    }
    Ok(())
}

fn as_f64(v: &toml::Value) -> Option<f64> {
    v.as_float().or_else(|| v.as_integer().map(|i| i as f64))
}

/// The settings in which two configurations differ, other than
/// [`SESSION_KEYS`] and settings that neither run reads
/// ([`Config::unused_keys`]), as `key: old → new` (nested keys dotted,
/// a method's settings as `methods.smart.lambda`; an unset option, or a
/// method one run does not list, reads `unset`).
pub fn config_differences(old: &Config, new: &Config) -> Result<Vec<String>> {
    let (unused_old, unused_new) = (old.unused_keys(), new.unused_keys());
    let ignored: Vec<&str> = SESSION_KEYS
        .into_iter()
        .chain(unused_old.into_iter().filter(|k| unused_new.contains(k)))
        .collect();
    let table = |c: &Config| -> Result<toml::Table> {
        let mut t = c.to_table()?;
        for k in &ignored {
            t.remove(*k);
        }
        // Methods by name, so a difference names the method and setting.
        let by_name: toml::Table = c
            .methods
            .iter()
            .map(|m| {
                let mut v =
                    toml::Value::try_from(m).map_err(|e| param_err("config", e.to_string()))?;
                if let Some(t) = v.as_table_mut() {
                    t.remove("kind");
                }
                Ok((m.name().to_string(), v))
            })
            .collect::<Result<_>>()?;
        t.insert("methods".into(), toml::Value::Table(by_name));
        Ok(t)
    };
    fn walk(prefix: &str, a: &toml::Table, b: &toml::Table, out: &mut Vec<String>) {
        let mut keys: Vec<&String> = a.keys().chain(b.keys()).collect();
        keys.sort();
        keys.dedup();
        for k in keys {
            let name = format!("{prefix}{k}");
            match (a.get(k), b.get(k)) {
                (Some(toml::Value::Table(x)), Some(toml::Value::Table(y))) => {
                    walk(&format!("{name}."), x, y, out)
                }
                (x, y) if x != y => {
                    let show =
                        |v: Option<&toml::Value>| v.map_or("unset".into(), |v| v.to_string());
                    out.push(format!("{name}: {} → {}", show(x), show(y)));
                }
                _ => {}
            }
        }
    }
    let mut out = vec![];
    walk("", &table(old)?, &table(new)?, &mut out);
    Ok(out)
}
