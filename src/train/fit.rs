//! The loop: epochs of shuffled batches, a step per gradient-accumulation
//! group, evaluation and checkpoints on their cadence, the callbacks around
//! them. It names no method: the objective and the callbacks carry them.
use std::time::Instant;

use candle_core::Tensor;
use serde::{Deserialize, Serialize};

use super::callbacks::{self, Control, EvalInfo, Event, StepInfo};
use super::checkpoint::{self, State};
use super::data;
use super::evaluate::{nan_as_null, Eval};
use super::metrics;
use super::run::Run;
use super::step::PhaseTimes;
use crate::error::{io_err, Error, Result};

/// What a run reports at the end.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Summary {
    /// The task (or `files`).
    pub task: String,
    /// The methods' names, in registry order.
    pub methods: Vec<String>,
    /// Optimiser steps taken.
    pub steps: u64,
    /// The step of the best evaluation (`best/`).
    pub best_step: u64,
    #[serde(with = "nan_as_null")]
    /// The best value of the selection metric.
    pub best: f64,
    /// The selection metric's name.
    pub metric: String,
    /// Evaluation of the final weights.
    pub last: Eval,
    /// Training examples after subsampling.
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

/// The end of a divergence error: what was kept, what to try.
const DIVERGED: &str = ". Nothing after the last evaluation was saved (best/ and last/ hold \
    the weights it saw). Try a lower learning rate, gradient clipping (clip), or precision \
    = \"f32\"";

impl Run {
    /// Trains to the end (or until a callback stops it), resuming from
    /// `last/` when asked; `on` receives progress.
    pub fn fit(&mut self, resume: bool, mut on: impl FnMut(Event<'_>)) -> Result<Summary> {
        let on: &mut dyn FnMut(Event<'_>) = &mut on;
        let out = self.cfg.output.clone();
        if resume {
            checkpoint::check_resumes(&self.cfg, &out.join("config.toml"))?;
        } else if !self.cfg.overwrite {
            refuse_to_replace(&out)?;
        }
        std::fs::create_dir_all(&out).map_err(|e| io_err(&out, e))?;
        checkpoint::atomic_write(&out.join("config.toml"), self.cfg.to_toml()?.as_bytes())?;
        let n = self.train.examples.len();
        let (batch_size, accum) = (self.cfg.batch_size, self.cfg.grad_accum);
        let per_epoch = n.div_ceil(batch_size).div_ceil(accum) as u64;
        let total = per_epoch * self.cfg.epochs as u64;
        let mut st = State::start(self);
        if resume {
            st = checkpoint::load_last(self, &out.join("last"))?;
            on(Event::Message(&format!(
                "resumed at epoch {} batch {} (step {})",
                st.epoch, st.batch, st.step
            )));
        }
        let mut cbs = callbacks::standard(self, resume.then_some(st.step))?;
        let terms = self.objective.names();
        let start = Instant::now();
        // Wall time of earlier sessions of a resumed run.
        let before = st.seconds;
        let mut phases = PhaseTimes::new(&self.device, self.cfg.phase_times);
        let mut seen = 0usize;
        let mut stop = false;
        let mut losses = Vec::new();
        // (step, [loss, terms…, grad norm]) on the device, not yet read.
        let mut pending: Vec<(u64, Tensor)> = Vec::new();
        let mut last_eval: Option<Eval> = None;
        while st.epoch < self.cfg.epochs && !stop {
            let mut order: Vec<usize> = (0..n).collect();
            data::shuffle(
                &mut order,
                self.cfg.seed.wrapping_add(st.epoch as u64 * 0x9E37_79B9),
            );
            let batches: Vec<&[usize]> = order.chunks(batch_size).collect();
            // Only an empty epoch can start past its end (a resumed state
            // is checked): move on rather than spin.
            if st.batch >= batches.len() {
                st.epoch += 1;
                st.batch = 0;
                continue;
            }
            while st.batch < batches.len() {
                // Logging, evaluation and checkpoints of the previous step.
                phases.mark("rest (logging, evaluation, checkpoints)")?;
                if crate::interrupt::requested() {
                    // Between steps the state is one a resume continues
                    // from exactly (State::check holds).
                    flush(&mut pending, &mut losses)?;
                    st.capture(self, before + start.elapsed().as_secs_f64());
                    checkpoint::save_last(self, &out.join("last"), &st)?;
                    return Err(Error::Interrupted(format!(
                        "stopped by a signal after step {} of {total}; {} holds the run's state: \
                         continue it with --resume",
                        st.step,
                        out.join("last").display()
                    )));
                }
                self.bert.stream.set_train(true);
                self.freezing.apply_at(&mut self.bert, st.epoch, st.step)?;
                self.head.at_epoch(st.epoch, self.cfg.epochs)?;
                let group = &batches[st.batch..(st.batch + accum).min(batches.len())];
                let lr = self.cfg.schedule.lr(self.cfg.lr, st.step, total);
                let s = self.step(group, lr, &mut phases)?;
                seen += s.examples;
                st.step += 1;
                st.batch += group.len();
                pending.push((st.step, s.values));
                let logged =
                    st.step.is_multiple_of(self.cfg.log_every.max(1) as u64) || st.step == total;
                // One host sync per logged step reads every step's values.
                let read = if logged {
                    flush(&mut pending, &mut losses)?.pop()
                } else {
                    None
                };
                let info = StepInfo {
                    step: st.step,
                    total,
                    epoch: st.epoch,
                    lr,
                    examples_per_s: seen as f64 / start.elapsed().as_secs_f64().max(1e-9),
                    logged,
                    values: read.as_deref(),
                    terms: &terms,
                };
                for cb in &mut cbs {
                    cb.on_step(self, &mut st, &info, on)?;
                }
                let epoch_end = st.batch >= batches.len();
                let every = self.cfg.eval_every as u64;
                let at_epoch_end =
                    epoch_end && (self.cfg.eval_epochs || st.epoch + 1 >= self.cfg.epochs);
                if !(every > 0 && st.step.is_multiple_of(every) || at_epoch_end) {
                    if epoch_end {
                        st.epoch += 1;
                        st.batch = 0;
                        break;
                    }
                    continue;
                }
                // Nothing diverged is evaluated or saved: the steps' losses
                // are read (one sync) and the outputs checked.
                flush(&mut pending, &mut losses)?;
                let (ev, cal) = self.evaluate(&self.eval).map_err(|e| match e {
                    Error::NotFinite(m) => Error::NotFinite(format!(
                        "training diverged by step {}: {m}{DIVERGED}",
                        st.step
                    )),
                    e => e,
                })?;
                let score = ev.get(self.cfg.metric);
                st.history.push((st.step, score));
                let info = EvalInfo {
                    step: st.step,
                    epoch: st.epoch,
                    eval: &ev,
                    calibration: cal.as_ref(),
                    score,
                };
                for cb in &mut cbs {
                    stop |= cb.on_eval(self, &mut st, &info, on)? == Control::Stop;
                }
                last_eval = Some(ev);
                if epoch_end {
                    st.epoch += 1;
                    st.batch = 0;
                }
                st.capture(self, before + start.elapsed().as_secs_f64());
                checkpoint::save_last(self, &out.join("last"), &st)?;
                for cb in &mut cbs {
                    stop |= cb.on_checkpoint(self, &st, on)? == Control::Stop;
                }
                if stop || epoch_end {
                    break;
                }
            }
        }
        flush(&mut pending, &mut losses)?;
        #[cfg(feature = "cuda")]
        if let Some(m) = self.graphs.report() {
            on(Event::Message(&m));
        }
        // The loop ends right after an evaluation, unless a resumed run had
        // nothing left to do.
        let ev = match last_eval {
            Some(ev) => ev,
            None => self.evaluate(&self.eval)?.0,
        };
        let metric = self.cfg.metric.name();
        // A resumed session plots the steps it trained (keeping an earlier
        // session's plot when it trained none).
        if !losses.is_empty() {
            metrics::plot_curve(&out.join("loss"), "training loss", &losses)?;
        }
        metrics::plot_curve(&out.join("metric"), metric, &st.history)?;
        let summary = Summary {
            task: self.cfg.task.clone(),
            methods: self.cfg.method_names(),
            steps: st.step,
            best_step: st.best_step,
            best: st.best.unwrap_or(f64::NAN),
            metric: metric.to_string(),
            last: ev,
            train_examples: n,
            seconds: before + start.elapsed().as_secs_f64(),
            phase_ms: phases.report(),
        };
        let path = out.join("summary.json");
        checkpoint::atomic_write(
            &path,
            serde_json::to_string_pretty(&summary).unwrap().as_bytes(),
        )?;
        Ok(summary)
    }
}

/// Reads the pending per-step values back in one transfer, appends each
/// step's loss to `losses` and returns the values in step order; a step
/// whose loss or gradient norm is not finite is an [`Error::NotFinite`]
/// naming it (the run has diverged: its parameters are no longer usable).
fn flush(pending: &mut Vec<(u64, Tensor)>, losses: &mut Vec<(u64, f64)>) -> Result<Vec<Vec<f64>>> {
    if pending.is_empty() {
        return Ok(vec![]);
    }
    let rows: Vec<Tensor> = pending.iter().map(|(_, t)| t.clone()).collect();
    let vals = Tensor::stack(&rows, 0)?.to_vec2::<f64>()?;
    for ((step, _), v) in pending.iter().zip(&vals) {
        let (loss, norm) = (v[0], v[v.len() - 1]);
        if !(loss.is_finite() && norm.is_finite()) {
            return Err(Error::NotFinite(format!(
                "training diverged at step {step}: the loss is {loss}, the gradient norm {norm}{DIVERGED}"
            )));
        }
        losses.push((*step, loss));
    }
    pending.clear();
    Ok(vals)
}

/// What a run leaves in its output directory.
const RUN_FILES: [&str; 7] = [
    "config.toml",
    "metrics.jsonl",
    "summary.json",
    "best",
    "last",
    "best.old",
    "last.old",
];

/// A new run does not replace another run's record: `out` may not hold
/// one unless the run is resumed or `overwrite` is set.
fn refuse_to_replace(out: &std::path::Path) -> Result<()> {
    let found: Vec<&str> = RUN_FILES
        .into_iter()
        .filter(|f| out.join(f).exists())
        .collect();
    if found.is_empty() {
        return Ok(());
    }
    Err(crate::error::param_err(
        "output",
        format!(
            "{} holds a run ({}): continue it with --resume, choose another --output, or \
             replace it with --overwrite",
            out.display(),
            found.join(", ")
        ),
    ))
}
