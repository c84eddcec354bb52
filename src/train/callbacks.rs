//! What happens around the loop's steps and evaluations, each in its own
//! callback: the metrics log, progress reports, the best checkpoint, early
//! stopping and time-boxing. A callback returns [`Control::Stop`] to end
//! the run after the current checkpoint; the loop itself decides nothing.
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use super::checkpoint::{self, State};
use super::evaluate::Eval;
use super::metrics::{self, Calibration};
use super::run::Run;
use crate::error::{io_err, Result};

/// Whether the run goes on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Control {
    /// Go on training.
    Continue,
    /// Stop after this point (early stopping, time-boxing).
    Stop,
}

/// Progress of a run, for a progress bar or log lines.
#[derive(Clone, Copy, Debug)]
pub enum Event<'a> {
    /// After every optimiser step; `logged` on the steps written to
    /// `metrics.jsonl` (every `log_every`).
    Step {
        /// Optimiser steps done.
        step: u64,
        /// Steps the run will take.
        total: u64,
        /// The epoch in progress.
        epoch: usize,
        /// The step's loss, on logged steps only (reading it back every
        /// step would make the host wait for the device).
        loss: Option<f64>,
        /// The learning rate of the step.
        lr: f64,
        /// Training throughput over the last steps.
        examples_per_s: f64,
        /// Whether the step was written to `metrics.jsonl`.
        logged: bool,
    },
    /// Evaluations, checkpoints, early stopping, resumption.
    Message(&'a str),
}

/// One optimiser step, as the callbacks see it.
pub struct StepInfo<'a> {
    /// Optimiser steps done.
    pub step: u64,
    /// Steps the run will take.
    pub total: u64,
    /// The epoch in progress.
    pub epoch: usize,
    /// The learning rate of the step.
    pub lr: f64,
    /// Training throughput over the last steps.
    pub examples_per_s: f64,
    /// Whether this step is logged (then `values` holds its values).
    pub logged: bool,
    /// `[loss, term values…, gradient norm]`, on logged steps.
    pub values: Option<&'a [f64]>,
    /// The terms' names, in `values` order.
    pub terms: &'a [&'static str],
}

/// One evaluation.
pub struct EvalInfo<'a> {
    /// The step evaluated after.
    pub step: u64,
    /// The epoch in progress.
    pub epoch: usize,
    /// The metrics.
    pub eval: &'a Eval,
    /// The reliability table (classification).
    pub calibration: Option<&'a Calibration>,
    /// The selection metric's value.
    pub score: f64,
}

/// Where progress goes (the CLI's bar, a test's collector).
pub type Sink<'a> = &'a mut dyn FnMut(Event<'_>);

/// Something a run does at its steps, evaluations and checkpoints
/// (logging, progress, the best checkpoint, early stopping); every method
/// has a default that does nothing.
pub trait Callback {
    /// After every optimiser step.
    fn on_step(&mut self, _run: &Run, _st: &mut State, _s: &StepInfo, _on: Sink) -> Result<()> {
        Ok(())
    }
    /// After every evaluation; [`Control::Stop`] ends the run.
    fn on_eval(
        &mut self,
        _run: &Run,
        _st: &mut State,
        _e: &EvalInfo,
        _on: Sink,
    ) -> Result<Control> {
        Ok(Control::Continue)
    }
    /// After `last/` is written.
    fn on_checkpoint(&mut self, _run: &Run, _st: &State, _on: Sink) -> Result<Control> {
        Ok(Control::Continue)
    }
}

/// The callbacks every run has, in the order they act.
/// `resumed_at` is the step of the checkpoint a resumed run continues from.
pub fn standard(run: &Run, resumed_at: Option<u64>) -> Result<Vec<Box<dyn Callback>>> {
    let out = &run.cfg.output;
    let mut cbs: Vec<Box<dyn Callback>> = vec![
        Box::new(MetricsLog::open(&out.join("metrics.jsonl"), resumed_at)?),
        Box::new(Progress),
        Box::new(BestCheckpoint {
            dir: out.to_path_buf(),
        }),
    ];
    if let Some(p) = run.cfg.patience {
        cbs.push(Box::new(EarlyStopping { patience: p }));
    }
    if let Some(n) = run.cfg.stop_after {
        cbs.push(Box::new(StopAfter { step: n }));
    }
    Ok(cbs)
}

/// `metrics.jsonl`: a line per logged step (loss, each term's value under
/// its name, learning rate, gradient norm, throughput) and per evaluation.
pub struct MetricsLog {
    path: PathBuf,
    file: File,
}

impl MetricsLog {
    /// A new log, or the one a run resumed at step `resumed_at` appends
    /// to. That one is first cut back to the lines of steps up to the
    /// checkpoint: a run killed after it had logged later steps (or in the
    /// middle of a line) redoes those steps, and would otherwise log them
    /// twice, after a torn line.
    pub fn open(path: &Path, resumed_at: Option<u64>) -> Result<Self> {
        match resumed_at {
            None => std::fs::write(path, "").map_err(|e| io_err(path, e))?,
            Some(step) => {
                let text = match std::fs::read_to_string(path) {
                    Ok(t) => t,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
                    Err(e) => return Err(io_err(path, e)),
                };
                let kept: String = text
                    .split_inclusive('\n')
                    .filter(|l| {
                        l.ends_with('\n')
                            && serde_json::from_str::<serde_json::Value>(l)
                                .ok()
                                .and_then(|v| v["step"].as_u64())
                                .is_some_and(|s| s <= step)
                    })
                    .collect();
                if kept.len() != text.len() {
                    checkpoint::atomic_write(path, kept.as_bytes())?;
                }
            }
        }
        let file = std::fs::OpenOptions::new()
            .append(true)
            .open(path)
            .map_err(|e| io_err(path, e))?;
        Ok(Self {
            path: path.to_path_buf(),
            file,
        })
    }

    fn line(&mut self, v: serde_json::Value) -> Result<()> {
        writeln!(self.file, "{v}").map_err(|e| io_err(&self.path, e))
    }
}

impl Callback for MetricsLog {
    fn on_step(&mut self, _run: &Run, _st: &mut State, s: &StepInfo, _on: Sink) -> Result<()> {
        let Some(v) = s.values else { return Ok(()) };
        let terms: serde_json::Map<String, serde_json::Value> = s
            .terms
            .iter()
            .zip(&v[1..])
            .map(|(n, x)| (n.to_string(), serde_json::json!(x)))
            .collect();
        self.line(serde_json::json!({
            "step": s.step, "epoch": s.epoch, "loss": v[0], "terms": terms, "lr": s.lr,
            "grad_norm": v[v.len() - 1], "examples_per_s": s.examples_per_s,
        }))
    }

    fn on_eval(&mut self, _run: &Run, _st: &mut State, e: &EvalInfo, _on: Sink) -> Result<Control> {
        self.line(serde_json::json!({"eval": e.eval, "step": e.step, "epoch": e.epoch}))?;
        Ok(Control::Continue)
    }
}

/// Step events and one line per evaluation.
pub struct Progress;

impl Callback for Progress {
    fn on_step(&mut self, _run: &Run, _st: &mut State, s: &StepInfo, on: Sink) -> Result<()> {
        on(Event::Step {
            step: s.step,
            total: s.total,
            epoch: s.epoch,
            loss: s.values.map(|v| v[0]),
            lr: s.lr,
            examples_per_s: s.examples_per_s,
            logged: s.logged,
        });
        Ok(())
    }

    fn on_eval(&mut self, run: &Run, _st: &mut State, e: &EvalInfo, on: Sink) -> Result<Control> {
        // The selection metric first, unless the brief line shows it.
        let brief = e.eval.brief();
        let metric = run.cfg.metric.name();
        let text = if brief.to_lowercase().contains(&format!("{metric} ")) {
            brief
        } else {
            format!("{metric} {:.4}, {brief}", e.score)
        };
        on(Event::Message(&format!("eval step {}: {text}", e.step)));
        Ok(Control::Continue)
    }
}

/// `best/` (and its reliability table and diagram) whenever the selection
/// metric improves; counts the evaluations since the last improvement.
pub struct BestCheckpoint {
    dir: PathBuf,
}

impl Callback for BestCheckpoint {
    fn on_eval(&mut self, run: &Run, st: &mut State, e: &EvalInfo, _on: Sink) -> Result<Control> {
        if !st.best.is_none_or(|b| e.score > b) {
            st.evals_since_best += 1;
            return Ok(Control::Continue);
        }
        st.best = Some(e.score);
        st.best_step = e.step;
        st.evals_since_best = 0;
        checkpoint::save_params(run, &self.dir.join("best"))?;
        if let Some(cal) = e.calibration {
            let path = self.dir.join("best_calibration.json");
            std::fs::write(&path, serde_json::to_string_pretty(cal).unwrap())
                .map_err(|e| io_err(&path, e))?;
            metrics::plot_reliability(
                &self.dir.join("reliability"),
                cal,
                &format!("{} {}", run.cfg.task, run.cfg.eval_split.name()),
            )?;
        }
        Ok(Control::Continue)
    }
}

/// Stops after `patience` evaluations without improvement.
pub struct EarlyStopping {
    /// Evaluations without improvement tolerated.
    pub patience: usize,
}

impl Callback for EarlyStopping {
    fn on_eval(&mut self, _run: &Run, st: &mut State, _e: &EvalInfo, on: Sink) -> Result<Control> {
        if st.evals_since_best == 0 || st.evals_since_best < self.patience {
            return Ok(Control::Continue);
        }
        on(Event::Message(&format!(
            "early stop: {} evaluations without improvement",
            st.evals_since_best
        )));
        Ok(Control::Stop)
    }
}

/// Time-boxing: stops at the first checkpoint at or past `step`.
pub struct StopAfter {
    /// The step from which the next checkpoint ends the run.
    pub step: u64,
}

impl Callback for StopAfter {
    fn on_checkpoint(&mut self, _run: &Run, st: &State, on: Sink) -> Result<Control> {
        if st.step < self.step {
            return Ok(Control::Continue);
        }
        on(Event::Message(&format!(
            "stopping after step {} (stop_after); continue with --resume",
            st.step
        )));
        Ok(Control::Stop)
    }
}
