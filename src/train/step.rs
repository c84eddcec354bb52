//! One optimiser step: the micro-batches of a gradient-accumulation group,
//! each through the objective and its backward pass, the gradients summed,
//! their norm and clipping, the optimiser's update, and the methods' after-
//! step hooks. It knows the objective only through [`super::objective`].
use std::time::Instant;

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor};

use super::objective::Ctx;
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
    /// of the training set) at learning rate `lr`.
    pub fn step(
        &mut self,
        group: &[&[usize]],
        lr: f64,
        phases: &mut PhaseTimes,
    ) -> Result<StepOut> {
        // On CUDA the step's draws start from a device counter, so their
        // kernels' arguments repeat at every step of one shape.
        self.bert.stream.begin_step(&self.device)?;
        self.noise_anchor.begin(&self.device, self.noise)?;
        let mut acc: Option<GradStore> = None;
        // The objective and the terms' values stay on the device (f64,
        // summed over the micro-batches in order) until the step is logged.
        let mut sums: Option<Vec<Tensor>> = None;
        let mut examples = 0;
        let share = 1.0 / group.len() as f64;
        for idx in group {
            let b = self.batch(&self.train, idx)?;
            phases.mark("batch (unfreezing, tokens to the device)")?;
            // After the batch's own upload: its contents differ every step.
            let _cache = crate::upload_cache(&self.device);
            let obj = {
                let _r = crate::nvtx::range("forward (+ regularisers)");
                let model = super::objective::TaskModel {
                    bert: &self.bert,
                    head: &self.head,
                };
                let mut ctx = Ctx::new(model, &b, &self.opt.params, &mut self.noise);
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
            examples += idx.len();
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
        self.bert.stream.end_step()?;
        self.noise_anchor.end(self.noise)?;
        let mut vals = sums.expect("a micro-batch");
        vals.push(norm);
        Ok(StepOut {
            values: Tensor::stack(&vals, 0)?,
            examples,
        })
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
