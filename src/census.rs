//! The step census: what one training step asks of the GPU, counted call by
//! call (kernel launches, memsets, copies each way, allocations, events,
//! synchronisations, cuBLAS and cuRAND calls) and the host time spent
//! outside the CUDA libraries.
//!
//! The counts come from `census/census.c`, LD_PRELOADed into a `cuda` build
//! (`scripts/step-census.sh`): on a machine without a GPU as a stand-in for
//! the libraries (no kernel runs, the counts are exact), on a GPU machine as
//! an interposer in front of the real driver. This module reads its running
//! totals between steps; it fails with a clear error when the library is not
//! loaded.
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::{Deserialize, Serialize};

use crate::error::{param_err, Result};
use crate::train::trainer::{Config, Run};

/// The per-step counts that must not rise (the CI ratchet), in table order.
/// `gpu_ops` is kernels + memsets + copies + cuBLAS + cuRAND calls: the
/// operations a CUDA graph would hold.
pub const COUNTS: [&str; 13] = [
    "gpu_ops",
    "kernels",
    "memsets",
    "htod",
    "dtoh",
    "dtod",
    "cublas",
    "curand",
    "allocs",
    "frees",
    "events",
    "syncs",
    "unsupported",
];

/// One census case: a method combination at a batch shape.
#[derive(Clone, Debug)]
pub struct Case {
    /// The case's name in the table and in `bench/step_census.json`.
    pub name: &'static str,
    /// `--method` form: comma-separated, empty for vanilla.
    pub methods: &'static str,
    /// The task whose data the steps run on.
    pub task: &'static str,
    /// Tokens per example.
    pub max_len: usize,
    /// Further `--set` assignments.
    pub sets: &'static [&'static str],
}

/// Every method at batch 32 on SST-2 (its sentences pad to ~30–60 tokens),
/// one long-sequence case (Amazon reviews truncated at 256 tokens), and
/// vanilla with batches padded to multiples of 16 tokens.
pub const CASES: &[Case] = &[
    case("vanilla", "", "sst2", 128, &[]),
    case("smart", "smart", "sst2", 128, &[]),
    case("r3f", "r3f", "sst2", 128, &[]),
    case("freelb", "freelb", "sst2", 128, &[]),
    case("bregman+smart", "smart,bregman", "sst2", 128, &[]),
    case("mixout", "mixout", "sst2", 128, &[]),
    case("adapter", "adapter", "sst2", 128, &[]),
    case("lora", "lora", "sst2", 128, &[]),
    case(
        "recadam",
        "",
        "sst2",
        128,
        &["recadam = { k = 0.5, t0 = 250, gamma = 1.0 }"],
    ),
    case("vanilla-long", "", "amazon:books", 256, &[]),
    // Lengths padded to multiples of 16: the shapes a step meets repeat.
    case("vanilla-pad16", "", "sst2", 128, &["pad_to_multiple = 16"]),
];

const fn case(
    name: &'static str,
    methods: &'static str,
    task: &'static str,
    max_len: usize,
    sets: &'static [&'static str],
) -> Case {
    Case {
        name,
        methods,
        task,
        max_len,
        sets,
    }
}

/// The census library's running totals.
#[derive(Clone, Debug, Deserialize)]
pub struct Totals {
    /// "stand-in" or "interposer".
    pub mode: String,
    /// Nanoseconds spent inside the counted libraries.
    pub inside_ns: u64,
    /// Calls per category (kernels, memsets, allocations, copies, syncs, …).
    pub categories: BTreeMap<String, u64>,
    /// Bytes per category (copies and memsets).
    pub bytes: BTreeMap<String, u64>,
    /// Floating-point operations of the GEMMs asked for.
    pub gemm_flops: u64,
    /// Calls per library function.
    pub calls: BTreeMap<String, u64>,
    /// Launches per kernel name.
    pub kernels: BTreeMap<String, u64>,
}

/// Reads the totals of the census library loaded into this process.
pub fn read() -> Result<Totals> {
    type Json = unsafe extern "C" fn(*mut u8, usize) -> usize;
    let this = libloading::os::unix::Library::this();
    // SAFETY: the symbol, when present, is census.c's function of this type.
    let f: libloading::os::unix::Symbol<Json> = unsafe { this.get(b"tunefuse_census_json\0") }
        .map_err(|_| {
            param_err(
                "census",
                "the step census needs its library loaded: run scripts/step-census.sh (it builds \
                 census/census.c and sets LD_PRELOAD)",
            )
        })?;
    let mut buf = vec![0u8; 1 << 16];
    loop {
        // SAFETY: buf is writable for buf.len() bytes.
        let need = unsafe { f(buf.as_mut_ptr(), buf.len()) };
        if need <= buf.len() {
            buf.truncate(need - 1);
            break;
        }
        buf = vec![0u8; need];
    }
    serde_json::from_slice(&buf).map_err(|e| {
        param_err(
            "census",
            format!("the census library wrote unreadable totals: {e}"),
        )
    })
}

/// What one case's steady-state steps asked for, per step.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CaseCensus {
    /// The case's name.
    pub name: String,
    /// Its methods (`--method` form).
    pub methods: String,
    /// Its task.
    pub task: String,
    /// Examples per step.
    pub batch_size: usize,
    /// Tokens per example.
    pub max_len: usize,
    /// Mean per measured step of each of [`COUNTS`] and the other categories.
    pub per_step: BTreeMap<String, f64>,
    /// Whether every measured step had the same counts (a step that
    /// differs is a warm-up effect or data-dependent control flow).
    pub steady: bool,
    /// Host time per step outside the CUDA libraries (the caller's own
    /// overhead: candle, cudarc, tunefuse), microseconds.
    pub host_us: f64,
    /// Wall time per step including the libraries, microseconds.
    pub wall_us: f64,
    /// Bytes per step of each category.
    pub bytes_per_step: BTreeMap<String, f64>,
    /// GEMM work per step, GFLOP.
    pub gemm_gflop_per_step: f64,
    /// The most launched kernels, launches per step.
    pub top_kernels: Vec<(String, f64)>,
    /// Every library function called in a step, calls per step.
    pub calls_per_step: BTreeMap<String, f64>,
}

fn diff(a: &BTreeMap<String, u64>, b: &BTreeMap<String, u64>) -> BTreeMap<String, u64> {
    b.iter()
        .map(|(k, v)| (k.clone(), v - a.get(k).copied().unwrap_or(0)))
        .filter(|(_, v)| *v > 0)
        .collect()
}

fn with_gpu_ops(mut c: BTreeMap<String, u64>) -> BTreeMap<String, u64> {
    let ops = [
        "kernels", "memsets", "htod", "dtoh", "dtod", "cublas", "curand",
    ]
    .iter()
    .map(|k| c.get(*k).copied().unwrap_or(0))
    .sum();
    c.insert("gpu_ops".into(), ops);
    c
}

fn mean(steps: &[BTreeMap<String, u64>]) -> BTreeMap<String, f64> {
    let mut m = BTreeMap::new();
    for s in steps {
        for (k, v) in s {
            *m.entry(k.clone()).or_insert(0.0) += *v as f64 / steps.len() as f64;
        }
    }
    m
}

/// Runs `warmup + steps` optimiser steps of `case` at `batch_size` on the
/// CUDA device and returns the census of the last `steps`.
pub fn run_case(
    case: &Case,
    model: &Path,
    data_dir: Option<PathBuf>,
    batch_size: usize,
    warmup: usize,
    steps: usize,
) -> Result<CaseCensus> {
    if steps == 0 {
        return Err(param_err(
            "census",
            "the census needs at least one measured step",
        ));
    }
    let mut cfg = Config {
        model: model.to_path_buf(),
        task: case.task.to_string(),
        data_dir,
        batch_size,
        max_len: case.max_len,
        train_examples: Some(batch_size * (warmup + steps)),
        eval_examples: Some(batch_size),
        ..Config::default()
    };
    cfg.set("device=cuda")?;
    cfg.set_methods(case.methods)?;
    for s in case.sets {
        cfg.set(s)?;
    }
    let mut run = Run::new(cfg)?;
    let n = run.train.examples.len();
    if n < batch_size * (warmup + steps) {
        return Err(param_err(
            "census",
            format!(
                "{}: {n} training examples, the census needs {}",
                case.task,
                batch_size * (warmup + steps)
            ),
        ));
    }
    let order: Vec<usize> = (0..n).collect();
    let lr = run.cfg.lr;
    let mut phases = super::train::step::PhaseTimes::new(&run.device, false);
    // The steps' values stay alive as in the training loop, which reads
    // them only when it logs.
    let mut kept = Vec::new();
    let (mut counts, mut calls, mut kernels, mut bytes) = (vec![], vec![], vec![], vec![]);
    let (mut host_ns, mut wall_ns, mut flops) = (0u128, 0u128, 0u64);
    for i in 0..warmup + steps {
        let group = [&order[i * batch_size..(i + 1) * batch_size]];
        run.bert.stream.set_train(true);
        let before = read()?;
        let t = Instant::now();
        kept.push(run.step(&group, lr, &mut phases)?.values);
        let wall = t.elapsed().as_nanos();
        let after = read()?;
        if i < warmup {
            continue;
        }
        let inside = (after.inside_ns - before.inside_ns) as u128;
        wall_ns += wall;
        host_ns += wall.saturating_sub(inside);
        flops += after.gemm_flops - before.gemm_flops;
        counts.push(with_gpu_ops(diff(&before.categories, &after.categories)));
        calls.push(diff(&before.calls, &after.calls));
        kernels.push(diff(&before.kernels, &after.kernels));
        bytes.push(diff(&before.bytes, &after.bytes));
    }
    drop(kept);
    let per = |x: u128| x as f64 / steps as f64 / 1e3;
    let mut top: Vec<(String, f64)> = mean(&kernels).into_iter().collect();
    top.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    top.truncate(20);
    Ok(CaseCensus {
        name: case.name.to_string(),
        methods: if case.methods.is_empty() {
            "vanilla".into()
        } else {
            case.methods.into()
        },
        task: case.task.to_string(),
        batch_size,
        max_len: case.max_len,
        steady: counts.windows(2).all(|w| w[0] == w[1]),
        per_step: mean(&counts),
        host_us: per(host_ns),
        wall_us: per(wall_ns),
        bytes_per_step: mean(&bytes),
        gemm_gflop_per_step: flops as f64 / steps as f64 / 1e9,
        top_kernels: top,
        calls_per_step: mean(&calls),
    })
}

/// A recorded census (`bench/step_census.json`).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Census {
    /// "stand-in" or "interposer".
    pub mode: String,
    /// Day and commit of the measurement.
    pub stamp: String,
    /// The host that ran it (CPU model and cores; the GPU when interposed).
    pub machine: String,
    /// Steps run before counting.
    pub warmup: usize,
    /// Steps counted.
    pub steps: usize,
    /// Every case.
    pub cases: Vec<CaseCensus>,
}

/// The host's CPU model and core count, for the record.
pub fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    format!("{cpu}, {cores} cores")
}

/// The table printed after a census.
pub fn table(c: &Census) -> String {
    let mut s = format!(
        "step census ({}, {}; {} steps after {} warm-up; per step)\n{:<14}",
        c.mode, c.machine, c.steps, c.warmup, "case"
    );
    let width = |k: &str| k.len().max(7) + 1;
    for k in COUNTS {
        s.push_str(&format!("{k:>w$}", w = width(k)));
    }
    s.push_str(&format!("{:>10}{:>10}\n", "host µs", "GFLOP"));
    for r in &c.cases {
        s.push_str(&format!("{:<14}", r.name));
        for k in COUNTS {
            let v = r.per_step.get(k).copied().unwrap_or(0.0);
            s.push_str(&format!("{v:>w$.0}", w = width(k)));
        }
        s.push_str(&format!(
            "{:>10.0}{:>10.1}{}\n",
            r.host_us,
            r.gemm_gflop_per_step,
            if r.steady { "" } else { "  (steps differ)" }
        ));
    }
    s
}

/// Host-side library calls the CI ratchet also holds down: function
/// lookups and attribute sets (once per function, then cached), and
/// cuBLASLt plan building (once per GEMM shape). Each is cheap alone but
/// runs on the host before a launch, which is where a small model's step
/// spends its time.
pub const RATCHETED_CALLS: [&str; 6] = [
    "cuModuleGetFunction",
    "cuFuncSetAttribute",
    "cuModuleLoadData",
    "cublasLtMatmulDescCreate",
    "cublasLtMatrixLayoutCreate",
    "cublasLtMatmulAlgoGetHeuristic",
];

/// How [`differences`] compares two censuses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Compare {
    /// A count above the recorded one (the CI ratchet).
    Rises,
    /// Any count that differs (the stand-in against the real driver).
    Differs,
}

/// Every count of `now` that rose above (or, with [`Compare::Differs`],
/// differs from) `recorded`, cases matched by name, as readable lines; a
/// recorded case not measured now is reported too.
pub fn differences(recorded: &Census, now: &Census, how: Compare) -> Vec<String> {
    let mut out = Vec::new();
    for old in &recorded.cases {
        let Some(new) = now.cases.iter().find(|c| c.name == old.name) else {
            out.push(format!("{}: recorded but not measured", old.name));
            continue;
        };
        for k in COUNTS {
            let (a, b) = (
                old.per_step.get(k).copied().unwrap_or(0.0),
                new.per_step.get(k).copied().unwrap_or(0.0),
            );
            // Means over whole steps: one call more in any one step shows.
            let bad = match how {
                Compare::Rises => b > a + 1e-9,
                Compare::Differs => (b - a).abs() > 1e-9,
            };
            if bad {
                out.push(format!("{}: {k} {a:.2} → {b:.2} per step", old.name));
            }
        }
        if how == Compare::Rises {
            for k in RATCHETED_CALLS {
                let (a, b) = (
                    old.calls_per_step.get(k).copied().unwrap_or(0.0),
                    new.calls_per_step.get(k).copied().unwrap_or(0.0),
                );
                if b > a + 1e-9 {
                    out.push(format!("{}: {k} calls {a:.2} → {b:.2} per step", old.name));
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The ratchet on the recorded census: unchanged passes, one more GPU
    /// operation or one more function lookup per step fails, fewer passes.
    #[test]
    fn the_ratchet_fails_on_a_rise_of_a_count_or_a_ratcheted_call() {
        let recorded: Census =
            serde_json::from_str(include_str!("../bench/step_census.json")).unwrap();
        assert!(differences(&recorded, &recorded, Compare::Rises).is_empty());
        let mut more = recorded.clone();
        *more.cases[0].per_step.get_mut("gpu_ops").unwrap() += 1.0;
        let d = differences(&recorded, &more, Compare::Rises);
        assert!(d.len() == 1 && d[0].contains("gpu_ops"), "{d:?}");
        let mut lookups = recorded.clone();
        *lookups.cases[0]
            .calls_per_step
            .entry("cuModuleGetFunction".into())
            .or_insert(0.0) += 1.0;
        let d = differences(&recorded, &lookups, Compare::Rises);
        assert!(
            d.len() == 1 && d[0].contains("cuModuleGetFunction"),
            "{d:?}"
        );
        // Fewer is fine for the ratchet; the driver agreement wants equal.
        assert!(differences(&lookups, &recorded, Compare::Rises).is_empty());
        let mut fewer = recorded.clone();
        *fewer.cases[0].per_step.get_mut("kernels").unwrap() -= 1.0;
        assert!(differences(&recorded, &fewer, Compare::Rises).is_empty());
        assert!(!differences(&recorded, &fewer, Compare::Differs).is_empty());
    }
}
