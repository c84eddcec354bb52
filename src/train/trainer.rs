//! The fine-tuning loop: a pretrained BERT encoder plus a classification
//! head, trained on one of the data readers' tasks with AdamW or RecAdam, a
//! learning-rate schedule, optional discriminative rates and gradual
//! unfreezing, and any combination of the robust / parameter-efficient
//! methods: SMART's smoothness-inducing adversarial regulariser, R3F,
//! mixout, bottleneck adapters and LoRA.
//!
//! Output directory: `config.toml` (the resolved configuration),
//! `metrics.jsonl` (a line per logged step and per evaluation),
//! `summary.json`, `best/` (the best checkpoint on the chosen metric),
//! `last/` (the resumable state) and loss / metric / reliability plots.
//! Checkpoints are written to a temporary directory and renamed into place.
use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor, D};
use candle_nn::VarMap;
use serde::{Deserialize, Serialize};

use super::data::{self, Dataset, Split, Task};
use super::metrics;
use super::optim::{clip_scale, grad_norm, AdamW, AdamWParams, Param, RecAdam, Schedule};
use crate::error::{format_err, io_err, param_err, Error, Result};
use crate::model::{
    AdapterPlacement, Bert, ClassifierHead, Outputs, Pooling, RegressionHead, TextTokenizer,
};
use crate::ops::mixout::Rng;
use crate::ops::perturb::{
    ascent_step, noise_init, AscentStep, Granularity, Noise, Norm, Perturbation, StepMode,
};
use crate::ops::sym_kl::{kl, sym_kl, Reduction, SymKlGrad, SymKlOptions};

/// SMART (Jiang et al. 2020) settings. The defaults are those of
/// smart-pytorch and of mt-dnn's current code: σ = 1e-5, one l∞-normalised
/// step per token (`normalized_step`, a perturbation of l∞ norm 1 per token)
/// with η = 1e-3, λ = 1. An earlier mt-dnn took a step of size η
/// instead (`direction`): on 1,000 SST-2 sentences (3 seeds) that version
/// left the dev ECE near plain fine-tuning's, the normalised step about
/// halved it at the same accuracy, as SMART lowers it in the reference runs
/// of issue #6 (`bench/RESULTS.md`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SmartConfig {
    /// Weight λ_s of the smoothness penalty.
    pub lambda: f64,
    /// Std of the initial noise on the input embeddings.
    pub sigma: f64,
    /// Ascent step size η.
    pub eta: f64,
    /// Number of ascent steps K.
    pub steps: usize,
    /// `l2` or `linf`.
    pub norm: String,
    /// `token` or `example`.
    pub granularity: String,
    /// The ascent step ([`StepMode`]): `direction` (η·g/‖g‖, a perturbation
    /// of size η; an earlier mt-dnn), `normalized_step`
    /// ((δ + η·g)/‖δ + η·g‖, of size 1; smart-pytorch and mt-dnn's current
    /// code) or `pgd` (the paper's Algorithm 1: δ + η·g/‖g‖ projected onto
    /// the ε-ball, ε = `eps`). `bench/RESULTS.md` compares them.
    pub mode: String,
    /// ε₀ of direction / normalized_step, or the pgd radius.
    pub eps: f64,
    /// How the final penalty combines the batch's rows: `batchmean` (the
    /// mean over rows; mt-dnn) or `sum` (smart-pytorch's `sym_kl_loss`,
    /// whose default reduction is `sum`: on a batch of B rows, B times the
    /// batchmean penalty, so the same λ weighs it B times as much). The
    /// inner ascent loss is always the batch mean, as in both (the ascent
    /// step normalises its gradient anyway). `bench/RESULTS.md` compares
    /// the two.
    pub reduction: String,
}

impl Default for SmartConfig {
    fn default() -> Self {
        Self {
            lambda: 1.0,
            sigma: 1e-5,
            eta: 1e-3,
            steps: 1,
            norm: "linf".into(),
            granularity: "token".into(),
            mode: "normalized_step".into(),
            eps: 1e-6,
            reduction: "batchmean".into(),
        }
    }
}

/// Bregman proximal point optimisation of SMART: a slowly moving copy θ̃ of
/// the trained parameters (θ̃ ← β·θ̃ + (1 − β)·θ after every step; β = 0 is
/// the paper's "vanilla" variant, θ̃ = the previous iterate) and the penalty
/// μ·ℓ_s(f(x; θ), f(x; θ̃)), ℓ_s the symmetric KL with θ̃'s side detached.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BregmanConfig {
    /// μ; 0 switches the proximal term off.
    pub mu: f64,
    /// β, the momentum of θ̃.
    pub beta: f64,
}

impl Default for BregmanConfig {
    fn default() -> Self {
        Self {
            mu: 0.0,
            beta: 0.99,
        }
    }
}

/// One batch's objective as the methods build it.
struct Objective {
    /// What the backward pass runs on; its value is the whole objective.
    loss: Tensor,
    /// The regulariser's value for the log (NaN when skipped).
    penalty: Option<Tensor>,
    /// Parameter gradients of terms already back-propagated (FreeLB's
    /// ascent passes), to add to those of `loss`.
    grads: Option<GradStore>,
}

impl Objective {
    fn new(loss: Tensor, penalty: Option<Tensor>) -> Self {
        Self {
            loss,
            penalty,
            grads: None,
        }
    }
}

/// `into[p] += scale·from[p]` for each parameter `p` with a gradient in
/// `from` (the other entries of `from`, intermediate tensors, are left out).
fn add_param_grads(
    into: &mut GradStore,
    from: &GradStore,
    params: &[Param],
    scale: f64,
) -> Result<()> {
    for p in params {
        let t = p.var.as_tensor();
        if let Some(g) = from.get(t) {
            let g = if scale == 1.0 {
                g.clone()
            } else {
                (g * scale)?
            };
            let sum = match into.get(t) {
                Some(a) => (a + g)?,
                None => g,
            };
            into.insert(t, sum);
        }
    }
    Ok(())
}

/// FreeLB (Zhu et al. 2020): K ascent steps on the input-embedding
/// perturbation with ε-ball projection, the task loss averaged over the K
/// perturbed inputs so parameter gradients accumulate across the steps.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FreeLbConfig {
    pub steps: usize,
    /// Ascent step size η.
    pub eta: f64,
    /// Radius ε of the l2 ball (per example); 0 = no projection.
    pub eps: f64,
    /// Half-width of the uniform initial perturbation.
    pub init: f64,
}

impl Default for FreeLbConfig {
    fn default() -> Self {
        Self {
            steps: 2,
            eta: 1e-1,
            eps: 0.0,
            init: 1e-2,
        }
    }
}

/// R3F (Aghajanyan et al. 2021) settings.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct R3fConfig {
    pub lambda: f64,
    pub sigma: f64,
    /// `normal` or `uniform`.
    pub noise: String,
}

impl Default for R3fConfig {
    fn default() -> Self {
        Self {
            lambda: 1.0,
            sigma: 1e-5,
            noise: "uniform".into(),
        }
    }
}

/// Config keys that belong to one session of a run, not to the run: a
/// resumed run may change them (where the files are, on which device it
/// runs, when it stops, what it logs).
pub const SESSION_KEYS: [&str; 7] = [
    "output",
    "model",
    "data_dir",
    "device",
    "stop_after",
    "phase_times",
    "log_every",
];

/// The settings in which two configurations differ, other than
/// [`SESSION_KEYS`] and the settings that neither run uses
/// ([`Config::unused_keys`]: a vanilla run recorded before a SMART default
/// changed still matches a vanilla run after it), as `key: old → new`
/// (nested keys dotted, e.g. `smart.mode`; an unset option reads `unset`).
pub fn config_differences(old: &Config, new: &Config) -> Result<Vec<String>> {
    let (unused_old, unused_new) = (old.unused_keys(), new.unused_keys());
    let ignored: Vec<&str> = SESSION_KEYS
        .into_iter()
        .chain(unused_old.into_iter().filter(|k| unused_new.contains(k)))
        .collect();
    let table = |c: &Config| -> Result<toml::Table> {
        let toml::Value::Table(mut t) =
            toml::Value::try_from(c).map_err(|e| param_err("config", e.to_string()))?
        else {
            return Err(param_err("config", "does not serialise to a table"));
        };
        for k in &ignored {
            match k.split_once('.') {
                Some((section, key)) => {
                    if let Some(toml::Value::Table(s)) = t.get_mut(section) {
                        s.remove(key);
                    }
                }
                None => {
                    t.remove(*k);
                }
            }
        }
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

/// The run configuration (every field settable from TOML or the CLI).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub task: String,
    pub model: PathBuf,
    pub data_dir: Option<PathBuf>,
    pub output: PathBuf,
    /// Methods to combine: vanilla, smart, r3f, mixout, adapter, lora.
    pub methods: Vec<String>,
    pub seed: u64,
    pub epochs: usize,
    pub batch_size: usize,
    pub grad_accum: usize,
    pub lr: f64,
    pub weight_decay: f64,
    pub schedule: Schedule,
    /// Discriminative fine-tuning: lr of layer l is lr·ξ^(L−l) (ULMFiT uses 1/2.6).
    pub layer_lr_decay: Option<f64>,
    /// Gradual unfreezing: the top layer first, one more every epoch.
    pub gradual_unfreezing: bool,
    /// With gradual unfreezing: unfreeze one more layer every N optimiser
    /// steps instead of every epoch.
    pub unfreeze_every_steps: Option<u64>,
    /// With adapters / LoRA: also train the LayerNorms of the backbone.
    pub peft_layernorm: bool,
    pub recadam: Option<RecAdam>,
    pub max_len: usize,
    /// Gradient clipping by global norm (0 = off).
    pub clip: f64,
    /// Evaluate every N optimiser steps (0 = at the end of each epoch only).
    pub eval_every: usize,
    /// Log every N optimiser steps.
    pub log_every: usize,
    /// Subsample the training set to this many examples (by seed).
    pub train_examples: Option<usize>,
    /// Or k examples per class (low-resource runs).
    pub k_per_class: Option<usize>,
    /// Subsample the evaluation set to this many examples (by seed).
    pub eval_examples: Option<usize>,
    pub eval_split: String,
    /// Model selection metric: accuracy, macro_f1, f1, mcc.
    pub metric: String,
    /// Stop after this many evaluations without improvement.
    pub patience: Option<usize>,
    pub label_smoothing: f64,
    /// `cls` or `mean`.
    pub pooling: String,
    /// Hidden and attention dropout; default: the model's (0 with mixout).
    pub dropout: Option<f64>,
    pub mixout: f64,
    pub adapter_r: usize,
    /// `houlsby` or `pfeiffer`.
    pub adapter_placement: String,
    pub lora_r: usize,
    pub lora_alpha: f64,
    pub lora_targets: Vec<String>,
    pub smart: SmartConfig,
    pub bregman: BregmanConfig,
    pub r3f: R3fConfig,
    pub freelb: FreeLbConfig,
    /// `cpu`, `cuda` or `auto`.
    pub device: String,
    /// Activations: `f32`, `bf16` (f32 master weights and optimiser state),
    /// or `auto` (bf16 on CUDA, f32 on CPU).
    pub precision: String,
    /// Stop after the first checkpoint at or past this many optimiser steps
    /// (time-boxing; the run can be continued with `--resume`).
    pub stop_after: Option<u64>,
    /// Measure the wall time of each training-step phase (batch, forward,
    /// backward, clipping, optimiser, the rest) by synchronising the device
    /// at each boundary; reported per step in `summary.json` (`phase_ms`).
    /// The synchronisations remove the overlap of host and device work, so
    /// the run gets slower: for finding where the time goes, not for timing.
    pub phase_times: bool,
    /// Regression instead of classification: each example's label index
    /// becomes a real-valued target (SST-5's 0–4 sentiment scale, say), the
    /// head has one output and the loss is the mean squared error; SMART,
    /// R3F and the Bregman term then measure squared error instead of KL
    /// (SMART's regression form). Select on `pearson` or `spearman`.
    pub regression: bool,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            task: "sst2".into(),
            model: PathBuf::new(),
            data_dir: None,
            output: PathBuf::from("runs/out"),
            methods: vec!["vanilla".into()],
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
            peft_layernorm: false,
            recadam: None,
            max_len: 128,
            clip: 1.0,
            eval_every: 0,
            log_every: 10,
            train_examples: None,
            k_per_class: None,
            eval_examples: None,
            eval_split: "dev".into(),
            metric: "accuracy".into(),
            patience: None,
            label_smoothing: 0.0,
            pooling: "cls".into(),
            dropout: None,
            mixout: 0.1,
            adapter_r: 64,
            adapter_placement: "houlsby".into(),
            lora_r: 8,
            lora_alpha: 16.0,
            lora_targets: vec!["query".into(), "value".into()],
            smart: SmartConfig::default(),
            bregman: BregmanConfig::default(),
            r3f: R3fConfig::default(),
            freelb: FreeLbConfig::default(),
            device: "auto".into(),
            precision: "auto".into(),
            stop_after: None,
            phase_times: false,
            regression: false,
        }
    }
}

const METHODS: [&str; 7] = [
    "vanilla", "smart", "r3f", "freelb", "mixout", "adapter", "lora",
];
const SELECT: [&str; 4] = ["accuracy", "macro_f1", "f1", "mcc"];
const SELECT_REGRESSION: [&str; 2] = ["pearson", "spearman"];

impl Config {
    pub fn has(&self, m: &str) -> bool {
        self.methods.iter().any(|x| x == m)
    }

    /// The settings (top-level keys or whole sections, `section.key` for one
    /// key of a section) that this run does not read: those of the methods
    /// it does not use, θ̃'s momentum without the Bregman term, the
    /// unfreezing period without gradual unfreezing.
    pub fn unused_keys(&self) -> Vec<&'static str> {
        let mut keys = vec![];
        let per_method: [(&str, &[&'static str]); 6] = [
            ("smart", &["smart"]),
            ("r3f", &["r3f"]),
            ("freelb", &["freelb"]),
            ("mixout", &["mixout"]),
            ("adapter", &["adapter_r", "adapter_placement"]),
            ("lora", &["lora_r", "lora_alpha", "lora_targets"]),
        ];
        for (m, k) in per_method {
            if !self.has(m) {
                keys.extend_from_slice(k);
            }
        }
        if !self.has("adapter") && !self.has("lora") {
            keys.push("peft_layernorm");
        }
        if self.bregman.mu == 0.0 {
            keys.push("bregman.beta");
        }
        if !self.gradual_unfreezing {
            keys.push("unfreeze_every_steps");
        }
        keys
    }

    /// Every check that can fail before training starts.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(param_err("config", m));
        self.task.parse::<Task>()?;
        self.eval_split.parse::<Split>()?;
        for m in &self.methods {
            if !METHODS.contains(&m.as_str()) {
                return bad(format!("unknown method {m:?} (one of {METHODS:?})"));
            }
        }
        if self.has("mixout") && (self.has("adapter") || self.has("lora")) {
            return bad("mixout pulls the full weights towards their pretrained values; it cannot be combined with adapter or lora, which freeze them".into());
        }
        if [self.has("smart"), self.has("r3f"), self.has("freelb")]
            .iter()
            .filter(|&&b| b)
            .count()
            > 1
        {
            return bad(
                "smart, r3f and freelb are alternative adversarial regularisers: pick one".into(),
            );
        }
        let nonneg = |v: f64| v >= 0.0 && v.is_finite();
        let freelb_ok = self.freelb.steps > 0
            && nonneg(self.freelb.eta)
            && nonneg(self.freelb.eps)
            && nonneg(self.freelb.init);
        if self.has("freelb") && !freelb_ok {
            return bad(format!(
                "freelb needs steps >= 1 and eta, eps, init >= 0: {:?}",
                self.freelb
            ));
        }
        if !(nonneg(self.bregman.mu) && (0.0..1.0).contains(&self.bregman.beta)) {
            return bad(format!(
                "bregman needs mu >= 0 and beta in [0, 1): {:?}",
                self.bregman
            ));
        }
        if self.regression {
            if !SELECT_REGRESSION.contains(&self.metric.as_str()) {
                return bad(format!(
                    "regression selects on {SELECT_REGRESSION:?}, got metric {:?}",
                    self.metric
                ));
            }
            if self.label_smoothing > 0.0 {
                return bad("label_smoothing applies to classification, not regression".into());
            }
        } else if !SELECT.contains(&self.metric.as_str()) {
            return bad(format!(
                "unknown metric {:?} (one of {SELECT:?}; {SELECT_REGRESSION:?} with regression)",
                self.metric
            ));
        }
        if self.epochs == 0 || self.batch_size == 0 || self.grad_accum == 0 || self.max_len < 2 {
            return bad("epochs, batch_size and grad_accum must be >= 1, max_len >= 2".into());
        }
        if !(self.lr > 0.0 && self.lr.is_finite()) || self.weight_decay < 0.0 || self.clip < 0.0 {
            return bad(format!(
                "lr {} must be > 0, weight_decay {} and clip {} >= 0",
                self.lr, self.weight_decay, self.clip
            ));
        }
        if !(0.0..1.0).contains(&self.label_smoothing) || !(0.0..1.0).contains(&self.mixout) {
            return bad("label_smoothing and mixout must be in [0, 1)".into());
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
        if self.has("adapter") && self.adapter_r == 0 || self.has("lora") && self.lora_r == 0 {
            return bad("adapter_r and lora_r must be >= 1".into());
        }
        self.schedule.validate()?;
        self.pooling()?;
        self.placement()?;
        if !matches!(self.precision.as_str(), "auto" | "f32" | "bf16") {
            return bad(format!(
                "precision must be auto, f32 or bf16, got {:?}",
                self.precision
            ));
        }
        if self.has("smart") {
            self.smart_step()?.validate()?;
            self.smart_reduction()?;
            if self.smart.sigma < 0.0 || self.smart.lambda < 0.0 {
                return bad("smart sigma and lambda must be >= 0".into());
            }
        }
        if self.has("r3f") && !matches!(self.r3f.noise.as_str(), "normal" | "uniform") {
            return bad(format!(
                "r3f noise must be normal or uniform, got {:?}",
                self.r3f.noise
            ));
        }
        Ok(())
    }

    fn pooling(&self) -> Result<Pooling> {
        match self.pooling.as_str() {
            "cls" => Ok(Pooling::Cls),
            "mean" => Ok(Pooling::Mean),
            p => Err(param_err(
                "config",
                format!("pooling must be cls or mean, got {p:?}"),
            )),
        }
    }

    fn placement(&self) -> Result<AdapterPlacement> {
        match self.adapter_placement.as_str() {
            "houlsby" => Ok(AdapterPlacement::Houlsby),
            "pfeiffer" => Ok(AdapterPlacement::Pfeiffer),
            p => Err(param_err(
                "config",
                format!("adapter_placement must be houlsby or pfeiffer, got {p:?}"),
            )),
        }
    }

    /// The reduction of SMART's penalty ([`SmartConfig::reduction`]).
    fn smart_reduction(&self) -> Result<Reduction> {
        match self.smart.reduction.as_str() {
            "batchmean" => Ok(Reduction::BatchMean),
            "sum" => Ok(Reduction::Sum),
            r => Err(param_err(
                "smart",
                format!("reduction must be batchmean or sum, got {r:?}"),
            )),
        }
    }

    fn smart_step(&self) -> Result<AscentStep> {
        let s = &self.smart;
        let norm = match s.norm.as_str() {
            "l2" => Norm::L2,
            "linf" => Norm::Linf,
            n => {
                return Err(param_err(
                    "smart",
                    format!("norm must be l2 or linf, got {n:?}"),
                ))
            }
        };
        let granularity = match s.granularity.as_str() {
            "token" => Granularity::Token,
            "example" => Granularity::Example,
            g => {
                return Err(param_err(
                    "smart",
                    format!("granularity must be token or example, got {g:?}"),
                ))
            }
        };
        let mode = match s.mode.as_str() {
            "direction" => StepMode::Direction { eps0: s.eps },
            "normalized_step" => StepMode::NormalizedStep { eps0: s.eps },
            "pgd" => StepMode::Pgd { eps: Some(s.eps) },
            m => {
                return Err(param_err(
                    "smart",
                    format!("mode must be direction, normalized_step or pgd, got {m:?}"),
                ))
            }
        };
        Ok(AscentStep {
            eta: s.eta,
            norm,
            granularity,
            mode,
        })
    }

    pub fn device(&self) -> Result<Device> {
        match self.device.as_str() {
            "cpu" => Ok(Device::Cpu),
            "cuda" => Ok(Device::new_cuda(0)?),
            "auto" => Ok(Device::cuda_if_available(0)?),
            d => Err(param_err(
                "config",
                format!("device must be cpu, cuda or auto, got {d:?}"),
            )),
        }
    }
}

/// f64 values that may be NaN (a metric undefined for the run, e.g. F1 of a
/// multi-class task or accuracy of a regression): JSON has no NaN, so it is
/// written as `null` and read back as NaN.
mod nan_as_null {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &f64, s: S) -> Result<S::Ok, S::Error> {
        if v.is_nan() {
            s.serialize_none()
        } else {
            s.serialize_f64(*v)
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
        Ok(Option::<f64>::deserialize(d)?.unwrap_or(f64::NAN))
    }
}

/// Evaluation results: the classification metrics (NaN for regression)
/// and the regression ones (NaN for classification; absent from older
/// summaries). Two evaluations are equal when every value has the same
/// bits (so NaN, "undefined", equals NaN).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Eval {
    #[serde(with = "nan_as_null")]
    pub accuracy: f64,
    #[serde(with = "nan_as_null")]
    pub macro_f1: f64,
    #[serde(with = "nan_as_null")]
    pub f1: f64,
    #[serde(with = "nan_as_null")]
    pub mcc: f64,
    #[serde(with = "nan_as_null")]
    pub nll: f64,
    #[serde(with = "nan_as_null")]
    pub brier: f64,
    #[serde(with = "nan_as_null")]
    pub ece: f64,
    /// Mean confidence (largest class probability); above the accuracy
    /// the model is over-confident, below it under-confident. Absent
    /// (null) in records written before it was added.
    #[serde(with = "nan_as_null", default = "nan")]
    pub confidence: f64,
    #[serde(with = "nan_as_null", default = "nan")]
    pub pearson: f64,
    #[serde(with = "nan_as_null", default = "nan")]
    pub spearman: f64,
    #[serde(with = "nan_as_null", default = "nan")]
    pub mse: f64,
}

fn nan() -> f64 {
    f64::NAN
}

impl PartialEq for Eval {
    fn eq(&self, o: &Self) -> bool {
        let v = |e: &Eval| {
            [
                e.accuracy,
                e.macro_f1,
                e.f1,
                e.mcc,
                e.nll,
                e.brier,
                e.ece,
                e.confidence,
                e.pearson,
                e.spearman,
                e.mse,
            ]
            .map(f64::to_bits)
        };
        v(self) == v(o)
    }
}

impl Eval {
    /// Every metric NaN (undefined).
    fn undefined() -> Self {
        Self {
            accuracy: f64::NAN,
            macro_f1: f64::NAN,
            f1: f64::NAN,
            mcc: f64::NAN,
            nll: f64::NAN,
            brier: f64::NAN,
            ece: f64::NAN,
            confidence: f64::NAN,
            pearson: f64::NAN,
            spearman: f64::NAN,
            mse: f64::NAN,
        }
    }

    /// One line for logs: the classification or the regression metrics.
    pub fn brief(&self) -> String {
        if self.accuracy.is_nan() && !self.pearson.is_nan() {
            format!(
                "Pearson {:.4}, Spearman {:.4}, MSE {:.4}",
                self.pearson, self.spearman, self.mse
            )
        } else {
            format!(
                "accuracy {:.4}, ECE {:.4}, confidence {:.4}",
                self.accuracy, self.ece, self.confidence
            )
        }
    }

    fn get(&self, m: &str) -> f64 {
        match m {
            "macro_f1" => self.macro_f1,
            "f1" => self.f1,
            "mcc" => self.mcc,
            "pearson" => self.pearson,
            "spearman" => self.spearman,
            _ => self.accuracy,
        }
    }
}

/// The prediction head: class logits `[B, C]`, or one value per example
/// `[B]` for regression.
pub enum Head {
    Classifier(ClassifierHead),
    Regressor(RegressionHead),
}

/// The trainer's own state, saved with every checkpoint.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
struct State {
    epoch: usize,
    /// Batches done in `epoch`.
    batch: usize,
    step: u64,
    dropout_rng: (u64, u64),
    noise_rng: (u64, u64),
    best: Option<f64>,
    best_step: u64,
    evals_since_best: usize,
    history: Vec<(u64, f64)>,
    /// Wall seconds of the run up to this checkpoint, summed over the
    /// sessions a resumed run took (0 in checkpoints older than the field).
    #[serde(default)]
    seconds: f64,
}

/// The model, head and optimiser of a run.
pub struct Run {
    pub cfg: Config,
    pub bert: Bert,
    pub head: Head,
    pub varmap: VarMap,
    pub tok: TextTokenizer,
    pub opt: AdamW,
    pub train: Dataset,
    pub eval: Dataset,
    device: Device,
    noise: Rng,
    /// θ̃ of Bregman proximal point, one tensor per optimised parameter.
    teacher: Option<Vec<Tensor>>,
}

/// One batch on the device, plus its labels.
struct Batch {
    ids: Tensor,
    types: Tensor,
    mask: Tensor,
    labels: Tensor,
}

impl Run {
    /// Validates, loads data, model and tokenizer, applies the methods.
    pub fn new(cfg: Config) -> Result<Self> {
        cfg.validate()?;
        let device = cfg.device()?;
        let dir = data::data_dir(cfg.data_dir.as_deref())?;
        let task: Task = cfg.task.parse()?;
        let mut train = data::load(&task, Split::Train, &dir)?;
        let mut eval = data::load(&task, cfg.eval_split.parse()?, &dir)?;
        if let Some(n) = cfg.eval_examples {
            eval = eval.subsample(n, cfg.seed);
        }
        if let Some(k) = cfg.k_per_class {
            train = train.k_per_class(k, cfg.seed);
        }
        if let Some(n) = cfg.train_examples {
            train = train.subsample(n, cfg.seed);
        }
        if train.examples.is_empty() || eval.examples.is_empty() {
            return Err(param_err("data", "empty training or evaluation set"));
        }
        for f in ["config.json", "model.safetensors", "tokenizer.json"] {
            if !cfg.model.join(f).exists() {
                return Err(io_err(
                    &cfg.model.join(f),
                    "missing: --model must be a Hugging Face BERT directory",
                ));
            }
        }
        let varmap = VarMap::new();
        let mut bert = Bert::from_pretrained(&cfg.model, &varmap, DType::F32, &device)?;
        let tok = TextTokenizer::from_file(&cfg.model.join("tokenizer.json"), cfg.max_len)?;
        let dropout = cfg.dropout.unwrap_or(if cfg.has("mixout") {
            0.0
        } else {
            bert.config.hidden_dropout_prob
        });
        bert.config.hidden_dropout_prob = dropout;
        bert.config.attention_probs_dropout_prob = cfg.dropout.unwrap_or(if cfg.has("mixout") {
            0.0
        } else {
            bert.config.attention_probs_dropout_prob
        });
        bert.stream.set_position(Rng {
            seed: cfg.seed,
            offset: 0,
        });
        let bf16 = cfg.precision == "bf16" || (cfg.precision == "auto" && device.is_cuda());
        bert.stream.set_compute_dtype(bf16.then_some(DType::BF16));
        let pretrained: HashMap<String, Tensor> = varmap
            .data()
            .lock()
            .unwrap()
            .iter()
            .map(|(k, v)| Ok((k.clone(), v.as_tensor().detach().copy()?)))
            .collect::<Result<_>>()?;
        if cfg.has("mixout") {
            bert.enable_mixout(cfg.mixout)?;
        }
        let peft = cfg.has("adapter") || cfg.has("lora");
        if peft {
            bert.freeze_all()?;
            if cfg.peft_layernorm {
                bert.embeddings.norm.frozen = false;
                for l in &mut bert.layers {
                    l.attn_norm.frozen = false;
                    l.out_norm.frozen = false;
                }
            }
        }
        if cfg.has("adapter") {
            bert.add_adapters(&varmap, cfg.placement()?, cfg.adapter_r, 1.0)?;
        }
        if cfg.has("lora") {
            let t: Vec<&str> = cfg.lora_targets.iter().map(String::as_str).collect();
            bert.add_lora(&varmap, &t, cfg.lora_r, cfg.lora_alpha)?;
        }
        let head = if cfg.regression {
            Head::Regressor(RegressionHead::new(
                &varmap,
                bert.config.hidden_size,
                cfg.pooling()?,
                dropout,
                DType::F32,
                &device,
            )?)
        } else {
            Head::Classifier(ClassifierHead::new(
                &varmap,
                bert.config.hidden_size,
                train.labels.len(),
                cfg.pooling()?,
                dropout,
                DType::F32,
                &device,
            )?)
        };
        init_new_params(&varmap, &pretrained, cfg.seed)?;
        let layers = bert.layers.len();
        let params = {
            let data = varmap.data().lock().unwrap();
            let mut names: Vec<&String> = data.keys().collect();
            names.sort();
            names
                .into_iter()
                .filter(|n| {
                    !n.starts_with("pooler.")
                        && (!peft
                            || n.contains("adapter")
                            || n.contains("lora_")
                            || n.starts_with("classifier.")
                            || n.starts_with("regressor.")
                            || (cfg.peft_layernorm && n.contains("LayerNorm")))
                })
                .map(|n| Param {
                    name: n.clone(),
                    var: data[n].clone(),
                    lr_scale: cfg
                        .layer_lr_decay
                        .map_or(1.0, |xi| xi.powi((layers - layer_of(n, layers)) as i32)),
                    decay: !(n.ends_with("bias") || n.contains("LayerNorm")),
                    anchor: pretrained.get(n).cloned(),
                })
                .collect::<Vec<_>>()
        };
        let recadam = cfg.recadam;
        let opt = AdamW::new(
            params,
            AdamWParams {
                lr: cfg.lr,
                weight_decay: cfg.weight_decay,
                ..Default::default()
            },
            recadam,
        )?;
        let noise = Rng {
            seed: cfg.seed ^ 0x005e_ed0f_5a77,
            offset: 0,
        };
        let teacher = if cfg.bregman.mu > 0.0 {
            Some(
                opt.params
                    .iter()
                    .map(|p| p.var.as_tensor().detach().copy())
                    .collect::<candle_core::Result<Vec<_>>>()?,
            )
        } else {
            None
        };
        Ok(Self {
            cfg,
            bert,
            head,
            varmap,
            tok,
            opt,
            train,
            eval,
            device,
            noise,
            teacher,
        })
    }

    fn batch(&self, ds: &Dataset, idx: &[usize]) -> Result<Batch> {
        let texts: Vec<(&str, Option<&str>)> = idx
            .iter()
            .map(|&i| (ds.examples[i].text.as_str(), ds.examples[i].pair.as_deref()))
            .collect();
        let b = self.tok.batch(&texts, &self.device)?;
        let labels = if self.cfg.regression {
            Tensor::new(
                idx.iter()
                    .map(|&i| ds.examples[i].label as f32)
                    .collect::<Vec<_>>(),
                &self.device,
            )?
        } else {
            Tensor::new(
                idx.iter()
                    .map(|&i| ds.examples[i].label as u32)
                    .collect::<Vec<_>>(),
                &self.device,
            )?
        };
        Ok(Batch {
            ids: b.ids,
            types: b.token_types,
            mask: b.mask,
            labels,
        })
    }

    fn logits(&self, embeds: &Tensor, mask: &Tensor) -> Result<Tensor> {
        let h = self
            .bert
            .forward_from_embeddings(embeds, mask, Outputs::default())?
            .last_hidden;
        match &self.head {
            Head::Classifier(c) => c.forward(&h, mask, &self.bert.stream),
            Head::Regressor(r) => r.forward(&h, mask, &self.bert.stream),
        }
    }

    /// The task loss: cross-entropy (with label smoothing), or the mean
    /// squared error for regression.
    fn task_loss(&self, out: &Tensor, labels: &Tensor) -> Result<Tensor> {
        if self.cfg.regression {
            squared_error(out, labels)
        } else {
            cross_entropy(out, labels, self.cfg.label_smoothing)
        }
    }

    /// The smoothness divergence between outputs `a` and `b`: the symmetric
    /// KL of the fused op (gradients as `grad` says, rows reduced as
    /// `reduction` says, the op's expected incoming gradient `weight`) for
    /// classification; the mean squared error for regression (its gradient,
    /// 2(a − b)/B and the opposite, is what both gradient modes give there),
    /// times the number of rows B for `sum`.
    fn divergence(
        &self,
        a: &Tensor,
        b: &Tensor,
        grad: SymKlGrad,
        reduction: Reduction,
        weight: f64,
    ) -> Result<Tensor> {
        if self.cfg.regression {
            let mse = squared_error(a, b)?;
            return Ok(match reduction {
                Reduction::Sum => (mse * a.dim(0)? as f64)?,
                _ => mse,
            });
        }
        let opts = SymKlOptions {
            grad,
            reduction,
            expected_grad: weight as f32,
            ..Default::default()
        };
        sym_kl(a, b, &opts)
    }

    /// Logits of θ̃ (Bregman proximal point): the parameters are swapped in
    /// for one forward pass without dropout, then restored.
    fn teacher_logits(&self, b: &Batch) -> Result<Option<Tensor>> {
        let Some(teacher) = &self.teacher else {
            return Ok(None);
        };
        let saved: Vec<Tensor> = self
            .opt
            .params
            .iter()
            .map(|p| p.var.as_tensor().detach().copy())
            .collect::<candle_core::Result<_>>()?;
        for (p, t) in self.opt.params.iter().zip(teacher) {
            p.var.set(t)?;
        }
        let was = self.bert.stream.train();
        self.bert.stream.set_train(false);
        let e = self.bert.forward_embeddings(&b.ids, Some(&b.types))?;
        let out = self.logits(&e, &b.mask).map(|l| l.detach());
        self.bert.stream.set_train(was);
        for (p, t) in self.opt.params.iter().zip(&saved) {
            p.var.set(t)?;
        }
        Ok(Some(out?))
    }

    /// θ̃ ← β·θ̃ + (1 − β)·θ after an optimiser step.
    fn update_teacher(&mut self) -> Result<()> {
        let beta = self.cfg.bregman.beta;
        if let Some(teacher) = &mut self.teacher {
            for (t, p) in teacher.iter_mut().zip(&self.opt.params) {
                *t = ((&*t * beta)? + (p.var.as_tensor().detach() * (1.0 - beta))?)?;
            }
        }
        Ok(())
    }

    /// Task loss plus the regularisers for one batch.
    fn loss(&mut self, b: &Batch) -> Result<Objective> {
        let teacher = self.teacher_logits(b)?;
        let (obj, clean) = self.loss_inner(b)?;
        let Some(t) = teacher else {
            return Ok(obj);
        };
        // FreeLB has no clean pass: the proximal term then runs one.
        let logits = match clean {
            Some(l) => l,
            None => {
                let e = self.bert.forward_embeddings(&b.ids, Some(&b.types))?;
                self.logits(&e, &b.mask)?
            }
        };
        let mu = self.cfg.bregman.mu;
        let prox = self.divergence(&logits, &t, SymKlGrad::Detached, Reduction::BatchMean, mu)?;
        Ok(Objective {
            loss: (obj.loss + (prox * mu)?)?,
            ..obj
        })
    }

    /// Task loss and adversarial regulariser; also the clean logits when
    /// the method computed them.
    fn loss_inner(&mut self, b: &Batch) -> Result<(Objective, Option<Tensor>)> {
        let embeds = self.bert.forward_embeddings(&b.ids, Some(&b.types))?;
        if self.cfg.has("freelb") {
            return Ok((self.freelb_loss(b, &embeds)?, None));
        }
        let logits = self.logits(&embeds, &b.mask)?;
        let task = self.task_loss(&logits, &b.labels)?;
        let (bsz, len, hid) = embeds.dims3()?;
        let shape = [bsz, len, hid];
        if self.cfg.has("smart") && self.cfg.smart.lambda > 0.0 {
            let s = &self.cfg.smart;
            let smart = Perturbation {
                noise: Noise::Normal { sigma: s.sigma },
                step: self.cfg.smart_step()?,
                steps: s.steps,
            };
            let target = logits.detach();
            let clean = embeds.detach();
            let mut rng = self.noise;
            let delta = smart.run(&shape, &b.mask, embeds.dtype(), &mut rng, |delta| {
                let _r = crate::nvtx::range("smart ascent step");
                let d = candle_core::Var::from_tensor(delta)?;
                let adv = self.logits(&(&clean + d.as_tensor())?, &b.mask)?;
                let inner = if self.cfg.regression {
                    squared_error(&adv, &target)?
                } else {
                    kl(&adv, &target, Reduction::BatchMean, None)?
                };
                Ok(inner
                    .backward()?
                    .get(d.as_tensor())
                    .cloned()
                    .unwrap_or(delta.zeros_like()?))
            })?;
            self.noise = rng;
            if delta.any_nonfinite()? {
                // Skipped: the penalty is logged as NaN.
                let nan = Tensor::new(f32::NAN, logits.device())?;
                return Ok((Objective::new(task, Some(nan)), Some(logits)));
            }
            let adv = self.logits(&(&embeds + delta.delta)?, &b.mask)?;
            let lam = s.lambda;
            let red = self.cfg.smart_reduction()?;
            let pen = self.divergence(&adv, &logits, SymKlGrad::Detached, red, lam)?;
            let v = pen.detach();
            let loss = (task + (pen * lam)?)?;
            return Ok((Objective::new(loss, Some(v)), Some(logits)));
        }
        if self.cfg.has("r3f") && self.cfg.r3f.lambda > 0.0 {
            let r = &self.cfg.r3f;
            let noise = if r.noise == "normal" {
                Noise::Normal { sigma: r.sigma }
            } else {
                Noise::Uniform { sigma: r.sigma }
            };
            let delta = noise_init(&shape, &b.mask, noise, embeds.dtype(), self.noise)?;
            self.noise.offset += crate::philox::counters_for(delta.elem_count());
            let adv = self.logits(&(&embeds + delta)?, &b.mask)?;
            let lam = r.lambda;
            let pen = self.divergence(&adv, &logits, SymKlGrad::Full, Reduction::BatchMean, lam)?;
            let v = pen.detach();
            let loss = (task + (pen * lam)?)?;
            return Ok((Objective::new(loss, Some(v)), Some(logits)));
        }
        Ok((Objective::new(task, None), Some(logits)))
    }

    /// FreeLB: the task loss averaged over K perturbed inputs, δ ascending
    /// along each pass's gradient (pgd, l2 per example, ε-ball when ε > 0).
    /// Each of the first K − 1 passes is back-propagated once, for δ's
    /// gradient and its share of the parameter gradients (returned in
    /// [`Objective::grads`]); only the last pass is left to the caller's
    /// backward, so a step costs K backward passes, not 2K − 1. A pass
    /// whose δ gradient is not finite ends the ascent there (the objective
    /// still averages K passes, at the last finite δ).
    fn freelb_loss(&mut self, b: &Batch, embeds: &Tensor) -> Result<Objective> {
        let f = self.cfg.freelb.clone();
        let (bsz, len, hid) = embeds.dims3()?;
        let mut delta = noise_init(
            &[bsz, len, hid],
            &b.mask,
            Noise::Uniform { sigma: f.init },
            embeds.dtype(),
            self.noise,
        )?;
        self.noise.offset += crate::philox::counters_for(delta.elem_count());
        let step = AscentStep {
            eta: f.eta,
            norm: Norm::L2,
            granularity: Granularity::Example,
            mode: StepMode::Pgd {
                eps: (f.eps > 0.0).then_some(f.eps),
            },
        };
        let pass = |delta: &Tensor| -> Result<Tensor> {
            let logits = self.logits(&(embeds + delta)?, &b.mask)?;
            Ok((self.task_loss(&logits, &b.labels)? / f.steps as f64)?)
        };
        // The earlier passes' loss values (detached) and parameter gradients.
        let mut done: Option<Tensor> = None;
        let mut grads = GradStore::default();
        let mut ascending = true;
        for _ in 1..f.steps {
            let _r = crate::nvtx::range("freelb ascent step");
            let d = candle_core::Var::from_tensor(&delta)?;
            let loss = pass(d.as_tensor())?;
            let g = loss.backward()?;
            add_param_grads(&mut grads, &g, &self.opt.params, 1.0)?;
            done = Some(match done {
                None => loss.detach(),
                Some(t) => (t + loss.detach())?,
            });
            if ascending {
                let dg = g.get(d.as_tensor()).cloned().unwrap_or(delta.zeros_like()?);
                let (next, flags) = ascent_step(&delta, &dg, &b.mask, &step)?;
                if flags.max_all()?.to_scalar::<u8>()? != 0 {
                    ascending = false;
                } else {
                    delta = next;
                }
            }
        }
        let last = pass(&delta)?;
        Ok(Objective {
            loss: match done {
                None => last,
                Some(t) => (t + last)?,
            },
            penalty: None,
            grads: (f.steps > 1).then_some(grads),
        })
    }

    /// Class probabilities on a dataset (eval mode); for regression, one
    /// predicted value per example.
    pub fn predict(&self, ds: &Dataset) -> Result<Vec<Vec<f64>>> {
        let was = self.bert.stream.train();
        self.bert.stream.set_train(false);
        let mut out = Vec::with_capacity(ds.examples.len());
        let idx: Vec<usize> = (0..ds.examples.len()).collect();
        for chunk in idx.chunks(64) {
            let b = self.batch(ds, chunk)?;
            let embeds = self.bert.forward_embeddings(&b.ids, Some(&b.types))?;
            let out_b = self.logits(&embeds, &b.mask)?.to_dtype(DType::F32)?;
            let p = if self.cfg.regression {
                out_b.unsqueeze(1)?
            } else {
                candle_nn::ops::softmax_last_dim(&out_b)?
            };
            out.extend(p.to_dtype(DType::F64)?.to_vec2::<f64>()?);
        }
        self.bert.stream.set_train(was);
        Ok(out)
    }

    /// Metrics on a dataset, and the reliability table (classification).
    pub fn evaluate(&self, ds: &Dataset) -> Result<(Eval, Option<metrics::Calibration>)> {
        let probs = self.predict(ds)?;
        let bad: Vec<usize> = (0..probs.len())
            .filter(|&i| probs[i].iter().any(|p| !p.is_finite()))
            .collect();
        if let Some(&first) = bad.first() {
            return Err(Error::NotFinite(format!(
                "the model's outputs are not finite for {} of {} examples (the first: \
                 example {first}, {:?}): its weights hold NaN or infinity",
                bad.len(),
                probs.len(),
                probs[first]
            )));
        }
        let labels: Vec<usize> = ds.examples.iter().map(|e| e.label).collect();
        if self.cfg.regression {
            let pred: Vec<f64> = probs.iter().map(|p| p[0]).collect();
            let target: Vec<f64> = labels.iter().map(|&l| l as f64).collect();
            let mse = pred
                .iter()
                .zip(&target)
                .map(|(p, t)| (p - t) * (p - t))
                .sum::<f64>()
                / pred.len() as f64;
            return Ok((
                Eval {
                    pearson: metrics::pearson(&pred, &target)?,
                    spearman: metrics::spearman(&pred, &target)?,
                    mse,
                    ..Eval::undefined()
                },
                None,
            ));
        }
        let preds: Vec<usize> = probs
            .iter()
            .map(|p| {
                p.iter()
                    .enumerate()
                    .max_by(|a, b| a.1.total_cmp(b.1))
                    .unwrap()
                    .0
            })
            .collect();
        let k = ds.labels.len();
        let cal = metrics::calibration(&probs, &labels, 15)?;
        Ok((
            Eval {
                accuracy: metrics::accuracy(&preds, &labels)?,
                macro_f1: metrics::macro_f1(&preds, &labels, k)?,
                f1: if k == 2 {
                    metrics::f1_positive(&preds, &labels, 1)?
                } else {
                    f64::NAN
                },
                mcc: metrics::matthews(&preds, &labels, k)?,
                nll: metrics::nll(&probs, &labels)?,
                brier: metrics::brier(&probs, &labels)?,
                ece: cal.ece,
                confidence: cal.confidence(),
                ..Eval::undefined()
            },
            Some(cal),
        ))
    }

    /// Stage 0 trains only the top layer (and the head); each later stage
    /// one more layer below (stages are epochs, or `unfreeze_every_steps`).
    fn apply_unfreezing(&mut self, stage: usize) -> Result<()> {
        if !self.cfg.gradual_unfreezing {
            return Ok(());
        }
        let l = self.bert.layers.len();
        for unit in 0..=l {
            self.bert.set_frozen(unit, unit + stage < l)?;
        }
        Ok(())
    }

    /// Trains to the end (or early stop), resuming from `last/` when asked.
    pub fn fit(&mut self, resume: bool, mut on: impl FnMut(Event<'_>)) -> Result<Summary> {
        let out = self.cfg.output.clone();
        if resume {
            self.check_resumes(&out.join("config.toml"))?;
        }
        std::fs::create_dir_all(&out).map_err(|e| io_err(&out, e))?;
        std::fs::write(
            out.join("config.toml"),
            toml::to_string(&self.cfg).map_err(|e| param_err("config", e.to_string()))?,
        )
        .map_err(|e| io_err(&out, e))?;
        let n = self.train.examples.len();
        let per_epoch = n
            .div_ceil(self.cfg.batch_size)
            .div_ceil(self.cfg.grad_accum) as u64;
        let total = per_epoch * self.cfg.epochs as u64;
        let mut st = State {
            epoch: 0,
            batch: 0,
            step: 0,
            dropout_rng: (self.cfg.seed, 0),
            noise_rng: (self.noise.seed, 0),
            best: None,
            best_step: 0,
            evals_since_best: 0,
            history: vec![],
            seconds: 0.0,
        };
        let metrics_path = out.join("metrics.jsonl");
        if resume {
            st = self.load_last(&out.join("last"))?;
            msg(
                &mut on,
                &format!(
                    "resumed at epoch {} batch {} (step {})",
                    st.epoch, st.batch, st.step
                ),
            );
        } else {
            std::fs::write(&metrics_path, "").map_err(|e| io_err(&metrics_path, e))?;
        }
        let mut mlog = std::fs::OpenOptions::new()
            .append(true)
            .open(&metrics_path)
            .map_err(|e| io_err(&metrics_path, e))?;
        let mut line = |v: serde_json::Value| -> Result<()> {
            writeln!(mlog, "{v}").map_err(|e| io_err(&metrics_path, e))
        };
        let start = Instant::now();
        // Wall time of earlier sessions of a resumed run.
        let before = st.seconds;
        let mut phases = PhaseTimes::new(&self.device, self.cfg.phase_times);
        let mut seen = 0usize;
        let mut stop = false;
        let mut losses = Vec::new();
        // (step, [loss, penalty, grad norm]) on the device, not yet read.
        let mut pending: Vec<(u64, Tensor)> = Vec::new();
        let mut last_eval: Option<Eval> = None;
        while st.epoch < self.cfg.epochs && !stop {
            let mut order: Vec<usize> = (0..n).collect();
            data::shuffle(
                &mut order,
                self.cfg.seed.wrapping_add(st.epoch as u64 * 0x9E37_79B9),
            );
            let batches: Vec<&[usize]> = order.chunks(self.cfg.batch_size).collect();
            while st.batch < batches.len() {
                // Logging, evaluation and checkpoints of the previous step.
                phases.mark("rest (logging, evaluation, checkpoints)")?;
                self.bert.stream.set_train(true);
                let stage = match self.cfg.unfreeze_every_steps {
                    Some(n) => (st.step / n.max(1)) as usize,
                    None => st.epoch,
                };
                self.apply_unfreezing(stage)?;
                let group: Vec<&[usize]> =
                    batches[st.batch..(st.batch + self.cfg.grad_accum).min(batches.len())].to_vec();
                let mut acc: Option<GradStore> = None;
                // Loss and penalty stay on the device (f64, summed over the
                // micro-batches in order) until the next logged step.
                let (mut loss_sum, mut pen_sum): (Option<Tensor>, Option<Tensor>) = (None, None);
                for idx in &group {
                    let b = self.batch(&self.train, idx)?;
                    phases.mark("batch (unfreezing, tokens to the device)")?;
                    let obj = {
                        let _r = crate::nvtx::range("forward (+ regularisers)");
                        self.loss(&b)?
                    };
                    phases.mark("forward (+ regularisers)")?;
                    let share = 1.0 / group.len() as f64;
                    let loss = (obj.loss * share)?;
                    let l = loss.detach().to_dtype(DType::F64)?;
                    let p = match obj.penalty {
                        Some(p) => (p.to_dtype(DType::F64)? * share)?,
                        None => l.zeros_like()?,
                    };
                    loss_sum = Some(match loss_sum {
                        None => l,
                        Some(s) => (s + l)?,
                    });
                    pen_sum = Some(match pen_sum {
                        None => p,
                        Some(s) => (s + p)?,
                    });
                    let mut g = {
                        let _r = crate::nvtx::range("backward");
                        loss.backward()?
                    };
                    if let Some(pre) = &obj.grads {
                        add_param_grads(&mut g, pre, &self.opt.params, share)?;
                    }
                    acc = Some(match acc {
                        None => g,
                        Some(mut a) => {
                            add_param_grads(&mut a, &g, &self.opt.params, 1.0)?;
                            a
                        }
                    });
                    seen += idx.len();
                    phases.mark("backward")?;
                }
                let grads = acc.expect("at least one micro-batch");
                let norm = grad_norm(&grads, &self.opt.params)?;
                let scale = clip_scale(&norm, self.cfg.clip)?;
                phases.mark("gradient norm and clipping")?;
                let lr = self.cfg.schedule.lr(self.cfg.lr, st.step, total);
                {
                    let _r = crate::nvtx::range("optimizer step");
                    self.opt.step(&grads, lr, scale.as_ref())?;
                }
                phases.mark("optimizer step")?;
                phases.step_done();
                self.update_teacher()?;
                st.step += 1;
                st.batch += group.len();
                pending.push((
                    st.step,
                    Tensor::stack(
                        &[
                            loss_sum.expect("a micro-batch"),
                            pen_sum.expect("a micro-batch"),
                            norm,
                        ],
                        0,
                    )?,
                ));
                let logged =
                    st.step.is_multiple_of(self.cfg.log_every.max(1) as u64) || st.step == total;
                // One host sync per logged step reads every step's values.
                let read = if logged {
                    let vals = flush(&mut pending, &mut losses)?;
                    vals.last().copied()
                } else {
                    None
                };
                let eps = seen as f64 / start.elapsed().as_secs_f64().max(1e-9);
                if let Some([loss, pen, norm]) = read {
                    line(
                        serde_json::json!({"step": st.step, "epoch": st.epoch, "loss": loss, "penalty": pen, "lr": lr, "grad_norm": norm, "examples_per_s": eps}),
                    )?;
                }
                on(Event::Step {
                    step: st.step,
                    total,
                    epoch: st.epoch,
                    loss: read.map(|v| v[0]),
                    lr,
                    examples_per_s: eps,
                    logged,
                });
                let epoch_end = st.batch >= batches.len();
                if (self.cfg.eval_every > 0 && st.step.is_multiple_of(self.cfg.eval_every as u64))
                    || epoch_end
                {
                    // Nothing diverged is evaluated or saved: the steps'
                    // losses are read (one sync) and the outputs checked.
                    flush(&mut pending, &mut losses)?;
                    let (ev, cal) = self.evaluate(&self.eval).map_err(|e| match e {
                        Error::NotFinite(m) => Error::NotFinite(format!(
                            "training diverged by step {}: {m}{DIVERGED}",
                            st.step
                        )),
                        e => e,
                    })?;
                    let score = ev.get(&self.cfg.metric);
                    last_eval = Some(ev.clone());
                    st.history.push((st.step, score));
                    line(serde_json::json!({"eval": ev, "step": st.step, "epoch": st.epoch}))?;
                    // The selection metric first, unless the brief line
                    // already shows it.
                    let brief = ev.brief();
                    let metric = &self.cfg.metric;
                    let text = if brief.to_lowercase().contains(&format!("{metric} ")) {
                        brief
                    } else {
                        format!("{metric} {score:.4}, {brief}")
                    };
                    msg(&mut on, &format!("eval step {}: {text}", st.step));
                    if st.best.is_none_or(|b| score > b) {
                        st.best = Some(score);
                        st.best_step = st.step;
                        st.evals_since_best = 0;
                        self.save_params(&out.join("best"))?;
                        if let Some(cal) = &cal {
                            std::fs::write(
                                out.join("best_calibration.json"),
                                serde_json::to_string_pretty(cal).unwrap(),
                            )
                            .map_err(|e| io_err(&out, e))?;
                            metrics::plot_reliability(
                                &out.join("reliability"),
                                cal,
                                &format!("{} {}", self.cfg.task, self.cfg.eval_split),
                            )?;
                        }
                    } else {
                        st.evals_since_best += 1;
                        if self.cfg.patience.is_some_and(|p| st.evals_since_best >= p) {
                            msg(
                                &mut on,
                                &format!(
                                    "early stop: {} evaluations without improvement",
                                    st.evals_since_best
                                ),
                            );
                            stop = true;
                        }
                    }
                    if epoch_end {
                        st.epoch += 1;
                        st.batch = 0;
                    }
                    let p = self.bert.stream.position();
                    st.dropout_rng = (p.seed, p.offset);
                    st.noise_rng = (self.noise.seed, self.noise.offset);
                    st.seconds = before + start.elapsed().as_secs_f64();
                    self.save_last(&out.join("last"), &st)?;
                    if self.cfg.stop_after.is_some_and(|n| st.step >= n) {
                        msg(
                            &mut on,
                            &format!(
                                "stopping after step {} (stop_after); continue with --resume",
                                st.step
                            ),
                        );
                        stop = true;
                    }
                    if stop || epoch_end {
                        break;
                    }
                }
            }
        }
        flush(&mut pending, &mut losses)?;
        // The loop ends right after an evaluation, unless a resumed run had
        // nothing left to do.
        let ev = match last_eval {
            Some(ev) => ev,
            None => self.evaluate(&self.eval)?.0,
        };
        metrics::plot_curve(&out.join("loss"), "training loss", &losses)?;
        metrics::plot_curve(&out.join("metric"), &self.cfg.metric, &st.history)?;
        let summary = Summary {
            task: self.cfg.task.clone(),
            methods: self.cfg.methods.clone(),
            steps: st.step,
            best_step: st.best_step,
            best: st.best.unwrap_or(f64::NAN),
            metric: self.cfg.metric.clone(),
            last: ev,
            train_examples: n,
            seconds: before + start.elapsed().as_secs_f64(),
            phase_ms: phases.report(),
        };
        std::fs::write(
            out.join("summary.json"),
            serde_json::to_string_pretty(&summary).unwrap(),
        )
        .map_err(|e| io_err(&out, e))?;
        Ok(summary)
    }

    /// The trained parameters (all, or only the new ones for adapters /
    /// LoRA) as safetensors, atomically.
    fn save_params(&self, dir: &Path) -> Result<()> {
        let tensors: HashMap<String, Tensor> = self
            .opt
            .params
            .iter()
            .map(|p| (p.name.clone(), p.var.as_tensor().clone()))
            .collect();
        atomic_dir(dir, |tmp| {
            candle_core::safetensors::save(&tensors, tmp.join("model.safetensors"))
                .map_err(|e| io_err(tmp, e))?;
            let meta = serde_json::json!({"base_model": self.cfg.model, "labels": self.train.labels, "config": self.cfg});
            std::fs::write(tmp.join("checkpoint.json"), meta.to_string())
                .map_err(|e| io_err(tmp, e))
        })
    }

    fn save_last(&self, dir: &Path, st: &State) -> Result<()> {
        let mut tensors: HashMap<String, Tensor> = self
            .opt
            .params
            .iter()
            .map(|p| (format!("param.{}", p.name), p.var.as_tensor().clone()))
            .collect();
        tensors.extend(
            self.opt
                .state()?
                .into_iter()
                .map(|(k, v)| (format!("opt.{k}"), v)),
        );
        if let Some(teacher) = &self.teacher {
            for (p, t) in self.opt.params.iter().zip(teacher) {
                tensors.insert(format!("teacher.{}", p.name), t.clone());
            }
        }
        atomic_dir(dir, |tmp| {
            candle_core::safetensors::save(&tensors, tmp.join("state.safetensors"))
                .map_err(|e| io_err(tmp, e))?;
            std::fs::write(tmp.join("trainer.json"), serde_json::to_string(st).unwrap())
                .map_err(|e| io_err(tmp, e))
        })
    }

    /// `--resume` continues the run recorded in `path` (its `config.toml`)
    /// only with the same settings: anything else would silently mix two
    /// recipes in one run (a different schedule length, seed, method…) and
    /// overwrite the record of the first. Settings of the session rather
    /// than of the run may differ ([`SESSION_KEYS`]).
    fn check_resumes(&self, path: &Path) -> Result<()> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| io_err(path, format!("{e} (nothing to resume)")))?;
        let was: Config = toml::from_str(&text).map_err(|e| format_err(path, e.to_string()))?;
        let diffs = config_differences(&was, &self.cfg)?;
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

    fn load_last(&mut self, dir: &Path) -> Result<State> {
        let tj = dir.join("trainer.json");
        let text = std::fs::read_to_string(&tj)
            .map_err(|e| io_err(&tj, format!("{e} (nothing to resume)")))?;
        let st: State = serde_json::from_str(&text).map_err(|e| format_err(&tj, e.to_string()))?;
        let sp = dir.join("state.safetensors");
        let t = candle_core::safetensors::load(&sp, &self.device)
            .map_err(|e| format_err(&sp, e.to_string()))?;
        for p in &self.opt.params {
            let key = format!("param.{}", p.name);
            let v = t
                .get(&key)
                .ok_or_else(|| format_err(&sp, format!("lacks {key}")))?;
            p.var.set(v)?;
        }
        let opt: HashMap<String, Tensor> = t
            .iter()
            .filter_map(|(k, v)| k.strip_prefix("opt.").map(|k| (k.to_string(), v.clone())))
            .collect();
        self.opt.load_state(&opt, st.step)?;
        if let Some(teacher) = &mut self.teacher {
            for (p, slot) in self.opt.params.iter().zip(teacher.iter_mut()) {
                let key = format!("teacher.{}", p.name);
                *slot = t
                    .get(&key)
                    .ok_or_else(|| format_err(&sp, format!("lacks {key}")))?
                    .clone();
            }
        }
        self.bert.stream.set_position(Rng {
            seed: st.dropout_rng.0,
            offset: st.dropout_rng.1,
        });
        self.noise = Rng {
            seed: st.noise_rng.0,
            offset: st.noise_rng.1,
        };
        Ok(st)
    }
}

/// Seeded initialisation of the parameters the checkpoint did not provide
/// (head, adapters, LoRA), so a run is reproducible from its seed: biases
/// and LoRA's B zero, LoRA's A uniform ±1/√fan_in (Kaiming-uniform, a = √5),
/// adapter weights N(0, 1e-3) (adapter-bert), other weights N(0, 0.02)
/// (BERT's initializer range).
fn init_new_params(varmap: &VarMap, pretrained: &HashMap<String, Tensor>, seed: u64) -> Result<()> {
    let data = varmap.data().lock().unwrap();
    let mut names: Vec<&String> = data
        .keys()
        .filter(|k| !pretrained.contains_key(*k))
        .collect();
    names.sort();
    for (i, name) in names.into_iter().enumerate() {
        let var = &data[name];
        let n = var.elem_count();
        let fan_in = var.dims().last().copied().unwrap_or(1).max(1) as f64;
        // One Philox stream per parameter: key = seed, counters from i << 40.
        let rng = Rng {
            seed,
            offset: (i as u64) << 40,
        };
        let normal = |std: f64| -> Vec<f64> {
            (0..n as u64)
                .map(|k| {
                    let w = crate::philox::group(rng.seed, rng.offset, k);
                    let u1 = (f64::from(w[0] >> 8) + 1.0) / f64::from(1u32 << 24);
                    let u2 = f64::from(w[1] >> 8) / f64::from(1u32 << 24);
                    std * (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
                })
                .collect()
        };
        let vals: Vec<f64> = if name.ends_with("bias") || name.ends_with("lora_B") {
            vec![0.0; n]
        } else if name.ends_with("lora_A") {
            let b = 1.0 / fan_in.sqrt();
            (0..n as u64)
                .map(|k| {
                    (2.0 * f64::from(crate::philox::uniform(crate::philox::word(
                        rng.seed, rng.offset, k,
                    ))) - 1.0)
                        * b
                })
                .collect()
        } else if name.contains("adapter") {
            normal(1e-3)
        } else {
            normal(0.02)
        };
        let t = Tensor::from_vec(vals, var.shape(), &Device::Cpu)?
            .to_dtype(var.dtype())?
            .to_device(var.device())?;
        var.set(&t)?;
    }
    Ok(())
}

/// Layer index of a parameter for discriminative rates: embeddings 0,
/// encoder layer i → i + 1, everything above the encoder → `layers`.
fn layer_of(name: &str, layers: usize) -> usize {
    if name.starts_with("embeddings.") {
        return 0;
    }
    name.strip_prefix("encoder.layer.")
        .and_then(|r| r.split('.').next())
        .and_then(|i| i.parse::<usize>().ok())
        .map_or(layers, |i| i + 1)
}

/// Writes a directory by filling `dir.tmp` and renaming it over `dir`.
fn atomic_dir(dir: &Path, fill: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let tmp = dir.with_extension("tmp");
    let old = dir.with_extension("old");
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).map_err(|e| io_err(&tmp, e))?;
    fill(&tmp)?;
    if dir.exists() {
        let _ = std::fs::remove_dir_all(&old);
        std::fs::rename(dir, &old).map_err(|e| io_err(dir, e))?;
    }
    std::fs::rename(&tmp, dir).map_err(|e| io_err(dir, e))?;
    let _ = std::fs::remove_dir_all(&old);
    Ok(())
}

/// Mean over the batch of `(a − b)²` (f32), for outputs `[B]`.
pub fn squared_error(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let d = (a.to_dtype(DType::F32)? - b.to_dtype(DType::F32)?)?;
    Ok(d.sqr()?.mean_all()?)
}

/// Mean cross-entropy with label smoothing ε: (1 − ε)·NLL + ε·mean(−log p).
pub fn cross_entropy(logits: &Tensor, labels: &Tensor, smoothing: f64) -> Result<Tensor> {
    let logp = candle_nn::ops::log_softmax(&logits.to_dtype(DType::F32)?, D::Minus1)?;
    let nll = logp
        .gather(&labels.unsqueeze(1)?, 1)?
        .squeeze(1)?
        .neg()?
        .mean_all()?;
    if smoothing == 0.0 {
        return Ok(nll);
    }
    let uniform = logp.mean(D::Minus1)?.neg()?.mean_all()?;
    Ok(((nll * (1.0 - smoothing))? + (uniform * smoothing)?)?)
}

fn msg(on: &mut impl FnMut(Event<'_>), m: &str) {
    on(Event::Message(m))
}

/// Progress of [`Run::fit`], for a progress bar or log lines.
#[derive(Clone, Copy, Debug)]
pub enum Event<'a> {
    /// After every optimiser step; `logged` on the steps written to
    /// `metrics.jsonl` (every `log_every`).
    Step {
        step: u64,
        total: u64,
        epoch: usize,
        /// The step's loss, on logged steps only (reading it back every
        /// step would make the host wait for the device).
        loss: Option<f64>,
        lr: f64,
        examples_per_s: f64,
        logged: bool,
    },
    /// Evaluations, checkpoints, early stopping, resumption.
    Message(&'a str),
}

/// The end of a divergence error: what was kept, what to try.
const DIVERGED: &str = ". Nothing after the last evaluation was saved (best/ and last/ hold \
    the weights it saw). Try a lower learning rate, gradient clipping (clip), or precision \
    = \"f32\"";

/// Reads the pending per-step values back in one transfer, appends each
/// step's loss to `losses` and returns the values in step order; a step
/// whose loss or gradient norm is not finite is an [`Error::NotFinite`]
/// naming it (the run has diverged: its parameters are no longer usable).
fn flush(pending: &mut Vec<(u64, Tensor)>, losses: &mut Vec<(u64, f64)>) -> Result<Vec<[f64; 3]>> {
    if pending.is_empty() {
        return Ok(vec![]);
    }
    let rows: Vec<Tensor> = pending.iter().map(|(_, t)| t.clone()).collect();
    let vals = Tensor::stack(&rows, 0)?.to_vec2::<f64>()?;
    let out: Vec<[f64; 3]> = vals.iter().map(|v| [v[0], v[1], v[2]]).collect();
    for ((step, _), v) in pending.iter().zip(&out) {
        if !(v[0].is_finite() && v[2].is_finite()) {
            return Err(Error::NotFinite(format!(
                "training diverged at step {step}: the loss is {}, the gradient norm {}{DIVERGED}",
                v[0], v[2]
            )));
        }
        losses.push((*step, v[0]));
    }
    pending.clear();
    Ok(out)
}

/// What a run reports at the end.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Summary {
    pub task: String,
    pub methods: Vec<String>,
    pub steps: u64,
    pub best_step: u64,
    #[serde(with = "nan_as_null")]
    pub best: f64,
    pub metric: String,
    /// Evaluation of the final weights.
    pub last: Eval,
    pub train_examples: usize,
    /// Wall seconds of training and evaluation (from the start of `fit`, the
    /// model loaded), summed over the sessions of a resumed run; the time
    /// between its last checkpoint and an interruption is not counted (that
    /// work was redone).
    pub seconds: f64,
    /// With `phase_times`: mean wall milliseconds per optimiser step of each
    /// phase, in step order.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase_ms: Option<Vec<(String, f64)>>,
}

/// Wall time per training-step phase for `Config::phase_times`: each mark
/// synchronises the device and adds the time since the previous mark to the
/// phase. Off, it costs nothing and does nothing.
struct PhaseTimes {
    dev: Option<Device>,
    last: Instant,
    /// (phase, total seconds) in first-seen order.
    acc: Vec<(&'static str, f64)>,
    steps: u64,
}

impl PhaseTimes {
    fn new(dev: &Device, on: bool) -> Self {
        Self {
            dev: on.then(|| dev.clone()),
            last: Instant::now(),
            acc: Vec::new(),
            steps: 0,
        }
    }

    /// Ends the current phase, attributing its time to `phase`.
    fn mark(&mut self, phase: &'static str) -> Result<()> {
        let Some(dev) = &self.dev else { return Ok(()) };
        dev.synchronize()?;
        let now = Instant::now();
        let dt = (now - self.last).as_secs_f64();
        self.last = now;
        match self.acc.iter_mut().find(|(p, _)| *p == phase) {
            Some((_, t)) => *t += dt,
            None => self.acc.push((phase, dt)),
        }
        Ok(())
    }

    fn step_done(&mut self) {
        self.steps += 1;
    }

    /// Milliseconds per step of each phase; `None` when off or no step ran.
    fn report(&self) -> Option<Vec<(String, f64)>> {
        (self.dev.is_some() && self.steps > 0).then(|| {
            self.acc
                .iter()
                .map(|(p, t)| (p.to_string(), t * 1e3 / self.steps as f64))
                .collect()
        })
    }
}

/// Evaluates a `best/` checkpoint: rebuilds the run from the configuration
/// stored with it (base model, methods), loads the trained parameters and
/// evaluates on `split` of `task` (default: the checkpoint's task).
pub fn evaluate_checkpoint(
    dir: &Path,
    task: Option<&str>,
    split: &str,
    data_dir: Option<&Path>,
) -> Result<Eval> {
    let meta_path = dir.join("checkpoint.json");
    let text = std::fs::read_to_string(&meta_path).map_err(|e| io_err(&meta_path, e))?;
    let meta: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| format_err(&meta_path, e.to_string()))?;
    let mut cfg: Config = serde_json::from_value(meta["config"].clone())
        .map_err(|e| format_err(&meta_path, e.to_string()))?;
    if let Some(t) = task {
        cfg.task = t.to_string();
    }
    cfg.eval_split = split.to_string();
    if data_dir.is_some() {
        cfg.data_dir = data_dir.map(Path::to_path_buf);
    }
    let run = Run::new(cfg)?;
    let wp = dir.join("model.safetensors");
    let t = candle_core::safetensors::load(&wp, &run.device)
        .map_err(|e| format_err(&wp, format!("not a readable safetensors file: {e}")))?;
    for p in &run.opt.params {
        let v = t
            .get(&p.name)
            .ok_or_else(|| format_err(&wp, format!("lacks {}", p.name)))?;
        if v.dims() != p.var.dims() {
            return Err(format_err(
                &wp,
                format!(
                    "{} has shape {:?}, model {:?}",
                    p.name,
                    v.dims(),
                    p.var.dims()
                ),
            ));
        }
        p.var.set(v)?;
    }
    Ok(run.evaluate(&run.eval)?.0)
}
