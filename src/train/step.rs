//! One optimiser step: the micro-batches of a gradient-accumulation group,
//! each through the objective and its backward pass, the gradients summed,
//! their norm and clipping, the optimiser's update, and the methods' after-
//! step hooks. It knows the objective only through [`super::objective`].
use std::time::Instant;

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor};

use super::objective::{Batch, Ctx};
use super::optim::add_param_grads;
use super::run::Run;
use crate::error::Result;

/// What a step leaves for the log, on the device until read.
pub struct StepOut {
    /// `[loss, term values…, gradient norm]` (f64): the objective and each
    /// term averaged over the micro-batches.
    pub values: Tensor,
    /// Examples in the step.
    pub examples: usize,
}

impl Run {
    /// One optimiser step over the micro-batches `group` (example indices
    /// of the training set) at learning rate `lr`; with
    /// [`super::config::Config::cuda_graph`] on CUDA, a replay of the
    /// step captured for the batches' shape where there is one.
    pub fn step(
        &mut self,
        group: &[&[usize]],
        lr: f64,
        phases: &mut PhaseTimes,
    ) -> Result<StepOut> {
        #[cfg(feature = "cuda")]
        if self.cfg.cuda_graph && self.device.is_cuda() {
            return super::graph::step(self, group, lr);
        }
        let batches = self.batches(group)?;
        phases.mark("batch (unfreezing, tokens to the device)")?;
        Ok(StepOut {
            values: self.eager_step(&batches, lr, phases)?,
            examples: group.iter().map(|idx| idx.len()).sum(),
        })
    }

    /// The step over `batches` (on the device) run as it comes: its draws
    /// begun, [`Run::compute`], its draws ended. Returns its values.
    pub(super) fn eager_step(
        &mut self,
        batches: &[Batch],
        lr: f64,
        phases: &mut PhaseTimes,
    ) -> Result<Tensor> {
        self.begin_draws()?;
        let values = self.compute(batches, lr, phases)?;
        self.end_draws()?;
        Ok(values)
    }

    /// The micro-batches `group` of the training set on the run's device.
    pub(super) fn batches(&self, group: &[&[usize]]) -> Result<Vec<Batch>> {
        group
            .iter()
            .map(|idx| self.batch(&self.train, idx))
            .collect()
    }

    /// Starts a step's draws (dropout's stream and the perturbations'):
    /// on CUDA they then start from counters in device memory, so the
    /// step's kernels' arguments repeat at every step of one shape.
    pub(super) fn begin_draws(&mut self) -> Result<()> {
        self.bert.stream.begin_step(&self.device)?;
        self.noise_anchor.begin(&self.device, self.noise)?;
        Ok(())
    }

    /// Ends the draws begun by [`Run::begin_draws`] (on CUDA one launch
    /// per stream that moves its device counter past the step's draws).
    pub(super) fn end_draws(&mut self) -> Result<()> {
        self.bert.stream.end_step()?;
        self.noise_anchor.end(self.noise)?;
        Ok(())
    }

    /// The draws of a step that a replayed CUDA graph runs: `draws` from
    /// dropout's stream and `noise_draws` from the perturbations', as the
    /// captured step took them (the graph moves the device counters).
    #[cfg(feature = "cuda")]
    pub(super) fn replayed_draws(&mut self, draws: u64, noise_draws: u64) -> Result<()> {
        self.bert.stream.replayed_step(&self.device, draws)?;
        self.noise = self
            .noise_anchor
            .replayed(&self.device, self.noise, noise_draws)?;
        Ok(())
    }

    /// The device work of one step over `batches`: each micro-batch through
    /// the objective and its backward pass, the gradients summed, their
    /// norm and clipping, the optimiser's update and the terms' after-step
    /// hooks. Returns `[loss, term values…, gradient norm]` (f64, on the
    /// device): the objective and each term averaged over the micro-batches.
    /// Nothing in it reads the device or uploads what changes from step to
    /// step, so that it can be captured as a CUDA graph.
    pub(super) fn compute(
        &mut self,
        batches: &[Batch],
        lr: f64,
        phases: &mut PhaseTimes,
    ) -> Result<Tensor> {
        let mut acc: Option<GradStore> = None;
        // The objective and the terms' values stay on the device (f64,
        // summed over the micro-batches in order) until the step is logged.
        let mut sums: Option<Vec<Tensor>> = None;
        let share = 1.0 / batches.len() as f64;
        for b in batches {
            // After the batch's own upload: its contents differ every step.
            let _cache = crate::upload_cache(&self.device);
            let obj = {
                let _r = crate::nvtx::range("forward (+ regularisers)");
                let model = super::objective::TaskModel {
                    bert: &self.bert,
                    head: &self.head,
                };
                let mut ctx = Ctx::new(model, b, &self.opt.params, &mut self.noise);
                self.objective.loss(&mut ctx)?
            };
            phases.mark("forward (+ regularisers)")?;
            let loss = (obj.loss * share)?;
            let mut vals = vec![loss.detach().to_dtype(DType::F64)?];
            for v in obj.values {
                vals.push((v.to_dtype(DType::F64)? * share)?);
            }
            sums = Some(match sums {
                None => vals,
                Some(s) => s
                    .into_iter()
                    .zip(vals)
                    .map(|(a, b)| a + b)
                    .collect::<candle_core::Result<_>>()?,
            });
            let mut g = {
                let _r = crate::nvtx::range("backward");
                loss.backward()?
            };
            self.bert.stream.route_grads(&mut g)?;
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
            phases.mark("backward")?;
        }
        let grads = acc.expect("at least one micro-batch");
        let _cache = crate::upload_cache(&self.device);
        let norm = {
            let _r = crate::nvtx::range("gradient norm, clipping, optimizer step");
            self.opt
                .clip_and_step(&grads, lr, self.cfg.clip, &self.bert.stream)?
        };
        phases.mark("gradient norm, clipping, optimizer step")?;
        phases.step_done();
        for t in &mut self.objective.terms {
            t.after_step(&self.opt.params)?;
        }
        let mut vals = sums.expect("a micro-batch");
        vals.push(norm);
        Ok(Tensor::stack(&vals, 0)?)
    }
}

/// Wall time per training-step phase for `Config::phase_times`: each mark
/// synchronises the device and adds the time since the previous mark to the
/// phase. Off, it costs nothing and does nothing.
pub struct PhaseTimes {
    dev: Option<Device>,
    last: Instant,
    /// (phase, total seconds) in first-seen order.
    acc: Vec<(&'static str, f64)>,
    steps: u64,
}

impl PhaseTimes {
    /// Timing on `dev` when `on` (each mark synchronises the device), or a
    /// no-op.
    pub fn new(dev: &Device, on: bool) -> Self {
        Self {
            dev: on.then(|| dev.clone()),
            last: Instant::now(),
            acc: Vec::new(),
            steps: 0,
        }
    }

    /// Ends the current phase, attributing its time to `phase`.
    pub fn mark(&mut self, phase: &'static str) -> Result<()> {
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

    /// Counts one finished step (the per-step averages' denominator).
    pub fn step_done(&mut self) {
        self.steps += 1;
    }

    /// Milliseconds per step of each phase; `None` when off or no step ran.
    pub fn report(&self) -> Option<Vec<(String, f64)>> {
        (self.dev.is_some() && self.steps > 0).then(|| {
            self.acc
                .iter()
                .map(|(p, t)| (p.to_string(), t * 1e3 / self.steps as f64))
                .collect()
        })
    }
}
