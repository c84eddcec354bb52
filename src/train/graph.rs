//! The training step as CUDA graphs ([`Config::cuda_graph`]): one graph
//! per batch shape, captured from a step and replayed at the later steps of
//! that shape, so that a step costs the host one graph launch instead of
//! the hundreds of launches, copies and library calls of an eager step.
//!
//! A replay runs the captured launches with their captured arguments. What
//! changes from step to step therefore lives in device memory that the
//! graph reads, refilled before each launch:
//! - the batch: the capture's own batch tensors stay with the graph, and
//!   each replay writes the new batch into them (one host-to-device copy
//!   per storage: ids, types, mask and class labels share one);
//! - the optimiser's scalars (learning rate, bias corrections):
//!   [`AdamW::stage_scalars`] writes them into the buffer the multi-tensor
//!   step reads;
//! - the Philox counters of dropout and the perturbations: their kernels
//!   take offsets relative to counters in device memory, which the graph's
//!   last launches move on by the step's draws; the host's record of the
//!   streams moves on by the draws the capture counted.
//!
//! The step's values (loss, terms, gradient norm) are written into a
//! buffer that outlives the graph and copied out after each replay, since
//! the training loop reads them only when it logs.
//!
//! The first step of a shape runs eagerly (it fills the caches a capture
//! needs: kernel functions, uploaded layouts, cuBLASLt plans, the weights'
//! copies, the optimiser's table); the second is captured and launched;
//! later ones replay. What a capture may contain is checked by the step
//! census's stand-in, which refuses what the driver refuses inside a
//! capture (host copies, synchronisations, frees of memory from before it)
//! and a relaunch while memory the graph allocated is still held.
//!
//! [`Config::cuda_graph`]: super::config::Config::cuda_graph
//! [`AdamW::stage_scalars`]: super::optim::AdamW::stage_scalars
use std::collections::{HashMap, HashSet};

use candle_core::cuda_backend::cudarc::driver::{sys, CudaGraph};
use candle_core::cuda_backend::WrapErr;
use candle_core::{DType, Device, Tensor};

use super::config::MAX_GRAPHS;
use super::objective::Batch;
use super::run::Run;
use super::step::{PhaseTimes, StepOut};
use crate::error::{param_err, Result};

/// A step's shape: each micro-batch's rows and padded length, and whether
/// the model is in train mode (dropout on).
type Key = (Vec<(usize, usize)>, bool);

/// The shapes seen and the steps captured.
#[derive(Default)]
pub(crate) struct StepGraphs {
    seen: HashSet<Key>,
    graphs: HashMap<Key, Captured>,
    /// Steps replayed, and steps run eagerly (each shape's first, and
    /// those of shapes past [`MAX_GRAPHS`]).
    replayed: u64,
    eager: u64,
    /// Graphs captured and later dropped as stale (see [`step`]).
    dropped: u64,
    /// The weight copies' generation the graphs were captured at
    /// (`Stream::copies_generation`).
    generation: u64,
}

impl StepGraphs {
    /// How the steps ran, for the end of a run: `None` when no step went
    /// through the graphs.
    pub(crate) fn report(&self) -> Option<String> {
        let captured = self.graphs.len() as u64 + self.dropped;
        let total = self.replayed + self.eager + captured;
        (total > 0).then(|| {
            let full = if self.seen.len() > self.graphs.len() {
                format!(
                    "; {} shapes ran eagerly only (seen once, or past the {MAX_GRAPHS} graphs a \
                     run keeps; padding batches to fewer lengths, pad_to_multiple, makes fewer)",
                    self.seen.len() - self.graphs.len()
                )
            } else {
                String::new()
            };
            let dropped = if self.dropped > 0 {
                format!(
                    "; {} graphs dropped after the weight copies changed (their shapes are \
                     captured again when they recur)",
                    self.dropped
                )
            } else {
                String::new()
            };
            format!(
                "cuda_graph: of {total} steps {} replayed, {captured} captured, {} eager{full}\
                 {dropped}",
                self.replayed, self.eager
            )
        })
    }
}

/// One captured step.
struct Captured {
    graph: CudaGraph,
    /// The batch tensors the graph reads, refilled before each replay.
    inputs: Vec<Batch>,
    /// `[loss, term values…, gradient norm]` as the graph writes them.
    out: Tensor,
    /// Philox counters the step draws from dropout's stream and from the
    /// perturbations' stream.
    draws: u64,
    noise_draws: u64,
    /// The optimiser's device table the graph's launches read, kept alive
    /// for them.
    _table: Option<crate::ops::adamw::multi::TablePin>,
}

/// One optimiser step of `run` over `group` at learning rate `lr`, as a
/// replay, a capture or an eager step (see the module docs).
pub(super) fn step(run: &mut Run, group: &[&[usize]], lr: f64) -> Result<StepOut> {
    let examples = group.iter().map(|idx| idx.len()).sum();
    // The batch on the host: its shape picks the graph, its contents are
    // what a replay uploads.
    let host = group
        .iter()
        .map(|idx| run.batch_on(&run.train, idx, &Device::Cpu))
        .collect::<Result<Vec<_>>>()?;
    let shapes = host
        .iter()
        .map(|b| Ok((b.ids.dim(0)?, b.ids.dim(1)?)))
        .collect::<Result<Vec<_>>>()?;
    let key = (shapes, run.bert.stream.train());
    // A graph repeats the optimiser's plan of its capture, which rewrites
    // the weight copies that existed then: once copies were made or packed
    // since (an evaluation makes them for layers that train without them,
    // mixout's), every graph is stale. They are dropped, and each shape is
    // run eagerly (the optimiser's table then names the new copies) and
    // captured again.
    let generation = run.bert.stream.copies_generation();
    if generation != run.graphs.generation {
        let g = &mut run.graphs;
        g.dropped += g.graphs.len() as u64;
        g.graphs.clear();
        g.seen.clear();
        g.generation = generation;
    }
    if run.graphs.graphs.contains_key(&key) {
        return replay(run, &key, &host, lr, examples);
    }
    let capture = run.graphs.seen.contains(&key) && run.graphs.graphs.len() < MAX_GRAPHS;
    run.graphs.seen.insert(key.clone());
    // The device batch of an eager or captured step is tokenised again
    // (a shape's first two steps); a replay uploads the host's.
    let batches = run.batches(group)?;
    let values = if capture {
        capture_step(run, key, batches, lr)?
    } else {
        run.graphs.eager += 1;
        run.eager_step(&batches, lr, &mut PhaseTimes::new(&run.device, false))?
    };
    // Copies this step made itself (a shape's first step makes the layers'
    // copies on first use) are in its optimiser plan and so in any graph
    // captured from now on.
    run.graphs.generation = run.bert.stream.copies_generation();
    Ok(StepOut { values, examples })
}

/// Captures the step over `batches` (already on the device, and from then
/// on the graph's inputs), launches it once (a capture runs nothing) and
/// keeps it under `key`; returns the step's values. On failure the host's
/// record of the step (the optimiser's step count, the random streams'
/// positions) is put back, so that nothing counts a step the device did
/// not run.
fn capture_step(run: &mut Run, key: Key, batches: Vec<Batch>, lr: f64) -> Result<Tensor> {
    let (step0, pos0, noise0) = (run.opt.step, run.bert.stream.position(), run.noise);
    match capture_and_launch(run, batches, lr) {
        Ok((captured, values)) => {
            run.graphs.graphs.insert(key, captured);
            Ok(values)
        }
        Err(e) => {
            // The anchors' device counters then differ from the restored
            // positions (or already hold them), so the next step uploads
            // them where needed.
            run.opt.step = step0;
            run.bert.stream.set_position(pos0);
            run.noise = noise0;
            Err(e)
        }
    }
}

/// [`capture_step`]'s work: the captured step and its values.
fn capture_and_launch(run: &mut Run, batches: Vec<Batch>, lr: f64) -> Result<(Captured, Tensor)> {
    let Device::Cuda(dev) = run.device.clone() else {
        return Err(param_err("cuda_graph", "a CUDA graph needs a CUDA device"));
    };
    let stream = dev.cuda_stream();
    // Everything the step uploads happens before the capture: the
    // optimiser's scalars, the Philox counters where they moved.
    run.opt.stage_scalars(lr)?;
    run.begin_draws()?;
    let (draws0, noise0) = (run.bert.stream.position().offset, run.noise.offset);
    let len = run.objective.names().len() + 2;
    let out = Tensor::zeros(len, DType::F64, &run.device)?;
    stream
        .begin_capture(sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
        .w()?;
    let captured = (|| -> Result<()> {
        let values = run.compute(&batches, lr, &mut PhaseTimes::new(&run.device, false))?;
        run.end_draws()?;
        if values.elem_count() != len {
            return Err(param_err(
                "cuda_graph",
                format!(
                    "the step wrote {} values, and {len} were expected",
                    values.elem_count()
                ),
            ));
        }
        crate::cuda::copy_into(&out, &values)?;
        // Every tensor of the step is dropped here, inside the capture,
        // so that the graph frees what it allocated.
        Ok(())
    })();
    // A failed free inside the capture is recorded by cudarc rather than
    // returned: collected here, it would otherwise stop end_capture before
    // the capture ends. The capture is ended whatever happened, so that the
    // stream is usable.
    let recorded = stream.context().check_err();
    let graph = stream.end_capture(sys::CUgraphInstantiate_flags(0));
    let failed = |e: String| {
        param_err(
            "cuda_graph",
            format!("capturing the training step as a CUDA graph failed: {e}"),
        )
    };
    captured.map_err(|e| failed(e.to_string()))?;
    recorded.map_err(|e| failed(format!("{e} (recorded during the capture)")))?;
    let graph = graph
        .map_err(|e| {
            param_err(
                "cuda_graph",
                format!(
                    "ending the capture of the training step failed ({e}): the step did \
                     something a CUDA graph cannot hold; run without cuda_graph"
                ),
            )
        })?
        .ok_or_else(|| param_err("cuda_graph", "the captured training step is empty"))?;
    graph.launch().w()?;
    let values = out.copy()?;
    let captured = Captured {
        graph,
        inputs: batches,
        out,
        draws: run.bert.stream.position().offset - draws0,
        noise_draws: run.noise.offset - noise0,
        _table: run.opt.pin_table(),
    };
    Ok((captured, values))
}

/// Replays the step captured under `key` on the batch `host` (on the CPU).
fn replay(run: &mut Run, key: &Key, host: &[Batch], lr: f64, examples: usize) -> Result<StepOut> {
    let g = &run.graphs.graphs[key];
    for (d, h) in g.inputs.iter().zip(host) {
        crate::cuda::upload_into(&[
            (&d.ids, &h.ids),
            (&d.types, &h.types),
            (&d.mask, &h.mask),
            (&d.labels, &h.labels),
        ])?;
    }
    let (draws, noise_draws) = (g.draws, g.noise_draws);
    run.graphs.replayed += 1;
    run.opt.stage_scalars(lr)?;
    run.replayed_draws(draws, noise_draws)?;
    let g = &run.graphs.graphs[key];
    g.graph.launch().w()?;
    run.opt.replayed_step();
    Ok(StepOut {
        values: g.out.copy()?,
        examples,
    })
}
