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
/// `gpu_ops` is kernels + memsets + copies + cuBLAS + cuRAND calls + graph
/// launches: what the host submits to the GPU, each a driver call (a
/// replayed step is one graph launch; the launches inside it are counted
/// once, when it is captured: [`CaseCensus::graph_nodes`]).
pub const COUNTS: [&str; 14] = [
    "gpu_ops",
    "graphs",
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
/// long-sequence cases (Amazon reviews truncated at 256 tokens, where every
/// batch has the same length), and vanilla with batches padded to multiples
/// of 16 tokens.
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
    long("vanilla-long", ""),
    // At one length every step has the same shape, so the census can tell
    // which kernel arguments change from step to step ([`Capture`]): the
    // methods a captured CUDA graph is first meant for.
    long("smart-long", "smart"),
    long("lora-long", "lora"),
    // Lengths padded to multiples of 16: the shapes a step meets repeat.
    case("vanilla-pad16", "", "sst2", 128, &["pad_to_multiple = 16"]),
    // The step as a CUDA graph (`cuda_graph`): the first step of the
    // shape runs eagerly, the second is captured, the measured ones replay.
    graph("vanilla-graph", ""),
    graph("smart-graph", "smart"),
    graph("lora-graph", "lora"),
    // The other methods at one length: their launches' arguments (the
    // `varying` check a graph's replay needs) and, where `cuda_graph`
    // covers them, their captured steps. Bregman's step is not capturable
    // (its teacher swap uploads the weight copies' table, and its teacher
    // update allocates past the step), so it has no graph case.
    long("r3f-long", "r3f"),
    long("freelb-long", "freelb"),
    long("mixout-long", "mixout"),
    long("adapter-long", "adapter"),
    long("bregman-long", "smart,bregman"),
    graph("r3f-graph", "r3f"),
    graph("freelb-graph", "freelb"),
    graph("mixout-graph", "mixout"),
    graph("adapter-graph", "adapter"),
];

/// A case on Amazon books reviews at 256 tokens, where every batch has one
/// shape.
const fn long(name: &'static str, methods: &'static str) -> Case {
    case(name, methods, "amazon:books", 256, &[])
}

/// [`long`] with the step as a CUDA graph (`cuda_graph`).
const fn graph(name: &'static str, methods: &'static str) -> Case {
    case(name, methods, "amazon:books", 256, &["cuda_graph = true"])
}

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

/// Calls the census library's JSON writer `symbol` (a C function that
/// writes at most `cap` bytes into a buffer and returns the length the
/// whole text needs) with a buffer grown until the text fits, and parses
/// it; `missing` says what to do when the library is not loaded, `what`
/// names the text in a parse error.
fn call_json<T: serde::de::DeserializeOwned>(
    symbol: &[u8],
    missing: &str,
    what: &str,
    start: usize,
) -> Result<T> {
    type Writer = unsafe extern "C" fn(*mut u8, usize) -> usize;
    let this = libloading::os::unix::Library::this();
    // SAFETY: the symbol, when present, is census.c's function of this type.
    let f: libloading::os::unix::Symbol<Writer> =
        unsafe { this.get(symbol) }.map_err(|_| param_err("census", missing))?;
    let mut buf = vec![0u8; start];
    loop {
        // SAFETY: buf is writable for buf.len() bytes; the writers change
        // their state (the launch log is emptied) only when the text fits.
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
            format!("the census library wrote an unreadable {what}: {e}"),
        )
    })
}

/// Reads the totals of the census library loaded into this process.
pub fn read() -> Result<Totals> {
    call_json(
        b"tunefuse_census_json\0",
        "the step census needs its library loaded: run scripts/step-census.sh (it builds \
         census/census.c and sets LD_PRELOAD)",
        "set of totals",
        1 << 16,
    )
}

/// One kernel launch of the census library's launch log: the function and
/// each argument's bytes in hex, with every 8-byte word that held a live
/// device address written as `pppppppppppppppp`; `p` is `None` where the
/// argument sizes are unknown (a kernel not loaded from PTX).
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
pub struct Launch {
    /// The kernel's name.
    pub k: String,
    /// Its arguments.
    pub p: Option<Vec<String>>,
}

/// Takes the launches logged since the last call (the first call turns
/// the log on and returns nothing logged before it).
pub fn launches() -> Result<Vec<Launch>> {
    call_json(
        b"tunefuse_census_args\0",
        "the census library loaded has no launch log (tunefuse_census_args): rebuild it with \
         scripts/step-census.sh",
        "launch log",
        1 << 20,
    )
}

/// What a CUDA graph captured from one step would get wrong when replayed
/// at the next step of the same batch shape: the kernel arguments, other
/// than device addresses, that changed between two such steps. Inside a
/// capture the step's allocations are the graph's own and keep their
/// addresses; every other argument is baked in, so each one listed here
/// (a Philox offset, a learning rate, a bias correction) has to move into
/// device memory before the step can be captured.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Capture {
    /// Consecutive measured steps compared (those with the same batch
    /// shape, i.e. the same bytes uploaded).
    pub pairs: usize,
    /// Pairs whose launches differed in number or in kernel order: control
    /// flow that a replayed graph cannot follow.
    pub sequence_differs: usize,
    /// Launches per compared step with at least one changed argument.
    pub varying_launches: f64,
    /// Launches per compared step whose argument sizes are unknown.
    pub unknown_launches: f64,
    /// "kernel (argument i)": launches per compared step in which that
    /// argument changed.
    pub varying: BTreeMap<String, f64>,
}

/// The arguments that changed from step `a` to step `b`, added into
/// `into` (launch counts, not yet per step); `false` when the two steps'
/// launches do not match one to one.
fn compare_steps(a: &[Launch], b: &[Launch], into: &mut Capture) -> bool {
    if a.len() != b.len() || a.iter().zip(b).any(|(x, y)| x.k != y.k) {
        return false;
    }
    for (x, y) in a.iter().zip(b) {
        match (&x.p, &y.p) {
            (Some(px), Some(py)) => {
                let mut varied = false;
                for (i, (u, v)) in px.iter().zip(py).enumerate() {
                    if u != v {
                        varied = true;
                        *into
                            .varying
                            .entry(format!("{} (argument {i})", x.k))
                            .or_insert(0.0) += 1.0;
                    }
                }
                into.varying_launches += f64::from(u8::from(varied || px.len() != py.len()));
            }
            _ => into.unknown_launches += 1.0,
        }
    }
    true
}

/// The [`Capture`] of measured steps given as (bytes uploaded, launches):
/// each step against the one before it when both uploaded the same bytes;
/// `None` when no two consecutive steps did.
pub fn capture(steps: &[(u64, Vec<Launch>)]) -> Option<Capture> {
    let mut c = Capture::default();
    for w in steps.windows(2) {
        if w[0].0 != w[1].0 {
            continue;
        }
        c.pairs += 1;
        if !compare_steps(&w[0].1, &w[1].1, &mut c) {
            c.sequence_differs += 1;
        }
    }
    let compared = c.pairs - c.sequence_differs;
    if c.pairs == 0 {
        return None;
    }
    if compared > 0 {
        let n = compared as f64;
        c.varying_launches /= n;
        c.unknown_launches /= n;
        c.varying.values_mut().for_each(|v| *v /= n);
    }
    Some(c)
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
    /// GPU operations recorded into CUDA graphs over the whole case, warm-up
    /// included (the captured steps' launches, copies and library calls).
    #[serde(default)]
    pub graph_nodes: u64,
    /// Operations the driver refuses inside a capture, or relaunches it
    /// refuses, over the whole case (the stand-in counts them; see
    /// census/census.c); must stay 0.
    #[serde(default)]
    pub capture_errors: u64,
    /// What a graph captured from one step would replay wrong ([`Capture`]);
    /// `None` when no two consecutive measured steps had the same batch
    /// shape (then shape arguments would differ too and nothing can be
    /// told apart).
    #[serde(default)]
    pub capture: Option<Capture>,
}

fn diff(a: &BTreeMap<String, u64>, b: &BTreeMap<String, u64>) -> BTreeMap<String, u64> {
    b.iter()
        .map(|(k, v)| (k.clone(), v - a.get(k).copied().unwrap_or(0)))
        .filter(|(_, v)| *v > 0)
        .collect()
}

fn with_gpu_ops(mut c: BTreeMap<String, u64>) -> BTreeMap<String, u64> {
    let ops = [
        "kernels", "memsets", "htod", "dtoh", "dtod", "cublas", "curand", "graphs",
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
    // The learning rate of the configured schedule over these steps, as
    // the training loop sets it: it changes every step, as in training.
    let total = (warmup + steps) as u64;
    let mut phases = super::train::step::PhaseTimes::new(&run.device, false);
    // The steps' values stay alive as in the training loop, which reads
    // them only when it logs.
    let mut kept = Vec::new();
    let (mut counts, mut calls, mut kernels, mut bytes) = (vec![], vec![], vec![], vec![]);
    let (mut host_ns, mut wall_ns, mut flops) = (0u128, 0u128, 0u64);
    let mut logged = vec![];
    let first = read()?;
    for i in 0..warmup + steps {
        let group = [&order[i * batch_size..(i + 1) * batch_size]];
        run.bert.stream.set_train(true);
        // Empties the launch log (reading is outside the timed window).
        launches()?;
        let before = read()?;
        let t = Instant::now();
        let lr = run.cfg.schedule.lr(run.cfg.lr, i as u64, total);
        kept.push(run.step(&group, lr, &mut phases)?.values);
        let wall = t.elapsed().as_nanos();
        let after = read()?;
        let log = launches()?;
        if i < warmup {
            continue;
        }
        let uploaded = after.bytes.get("htod").copied().unwrap_or(0)
            - before.bytes.get("htod").copied().unwrap_or(0);
        logged.push((uploaded, log));
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
    let last = read()?;
    let whole = |k: &str| {
        last.categories.get(k).copied().unwrap_or(0) - first.categories.get(k).copied().unwrap_or(0)
    };
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
        graph_nodes: whole("graph_nodes"),
        capture_errors: whole("capture_errors"),
        capture: capture(&logged),
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
    s.push_str(&format!(
        "{:>10}{:>10}{:>9}\n",
        "host µs", "GFLOP", "varying"
    ));
    for r in &c.cases {
        s.push_str(&format!("{:<14}", r.name));
        for k in COUNTS {
            let v = r.per_step.get(k).copied().unwrap_or(0.0);
            s.push_str(&format!("{v:>w$.0}", w = width(k)));
        }
        let varying = match &r.capture {
            Some(c) if c.pairs > c.sequence_differs => format!("{:.0}", c.varying_launches),
            Some(_) => "order".into(),
            None => "-".into(),
        };
        s.push_str(&format!(
            "{:>10.0}{:>10.1}{varying:>9}{}\n",
            r.host_us,
            r.gemm_gflop_per_step,
            if r.steady { "" } else { "  (steps differ)" }
        ));
    }
    s.push_str(
        "varying: launches per step whose arguments (other than device addresses) change from \
         one step to the next of the same shape, which a captured CUDA graph would replay \
         stale; - where no two steps had the same shape, order where their launches differed\n",
    );
    for r in c
        .cases
        .iter()
        .filter(|r| r.graph_nodes > 0 || r.capture_errors > 0)
    {
        s.push_str(&format!(
            "  {}: {} operations recorded into CUDA graphs over the case, {} refused inside a \
             capture or at a launch\n",
            r.name, r.graph_nodes, r.capture_errors
        ));
    }
    for r in &c.cases {
        let Some(c) = &r.capture else { continue };
        if c.varying.is_empty() && c.unknown_launches == 0.0 {
            continue;
        }
        s.push_str(&format!("  {}:", r.name));
        for (k, v) in &c.varying {
            s.push_str(&format!(" {k} ×{v:.0};"));
        }
        if c.unknown_launches > 0.0 {
            s.push_str(&format!(
                " {:.0} launches with unknown arguments;",
                c.unknown_launches
            ));
        }
        s.push('\n');
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

/// Whether a graph captured from a step got further from replaying right:
/// more launches with changing or unknown arguments, an argument that did
/// not change before, more steps whose launches differ in order, or fewer
/// steps of one shape to compare (which hides the rest).
fn capture_rose(a: &Capture, b: &Capture) -> bool {
    b.varying_launches > a.varying_launches + 1e-9
        || b.unknown_launches > a.unknown_launches + 1e-9
        || b.sequence_differs > a.sequence_differs
        || b.pairs < a.pairs
        || b.varying.keys().any(|k| !a.varying.contains_key(k))
}

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
        for (k, a, b) in [
            ("graph_nodes", old.graph_nodes, new.graph_nodes),
            ("capture_errors", old.capture_errors, new.capture_errors),
        ] {
            let bad = match how {
                Compare::Rises => b > a,
                Compare::Differs => b != a,
            };
            if bad {
                out.push(format!("{}: {k} {a} → {b} over the case", old.name));
            }
        }
        match (&old.capture, &new.capture, how) {
            (Some(a), Some(b), Compare::Rises) if capture_rose(a, b) => {
                out.push(format!(
                    "{}: launches with step-varying arguments {:.2} → {:.2} per step \
                     (unknown {:.2} → {:.2}, order differs {} → {}, steps compared {} → {}); \
                     arguments that newly vary: {:?}",
                    old.name,
                    a.varying_launches,
                    b.varying_launches,
                    a.unknown_launches,
                    b.unknown_launches,
                    a.sequence_differs,
                    b.sequence_differs,
                    a.pairs,
                    b.pairs,
                    b.varying
                        .keys()
                        .filter(|k| !a.varying.contains_key(*k))
                        .collect::<Vec<_>>()
                ));
            }
            (Some(a), Some(b), Compare::Differs) if a != b => out.push(format!(
                "{}: step-varying arguments differ: {:?} against {:?}",
                old.name, a.varying, b.varying
            )),
            (Some(_), None, _) => out.push(format!(
                "{}: the recorded census compared steps of one shape, this one could not",
                old.name
            )),
            _ => {}
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

    fn launch(k: &str, p: &[&str]) -> Launch {
        Launch {
            k: k.into(),
            p: Some(p.iter().map(|s| s.to_string()).collect()),
        }
    }

    /// Two steps of one shape: a changed scalar is listed, a masked device
    /// address is not; steps of another upload size are not compared;
    /// launches in another order are counted, not compared.
    #[test]
    fn capture_lists_the_arguments_that_change_between_steps_of_one_shape() {
        let ptr = "pppppppppppppppp";
        let step = |offset: &str, lr: &str| {
            vec![
                launch("dropout_bf16", &[ptr, ptr, "00100000", offset]),
                launch("gemm_epilogue", &[ptr, "01000000"]),
                launch("adamw_multi_f32", &[ptr, lr]),
                Launch {
                    k: "runtime_kernel".into(),
                    p: None,
                },
            ]
        };
        let steps = vec![
            (100, step("0000000000000000", "0000803f")),
            (100, step("0010000000000000", "0000003f")),
            // Another shape: not compared with its neighbours.
            (200, step("0020000000000000", "0000003f")),
            (100, step("0030000000000000", "0000003f")),
            (100, step("0040000000000000", "0000003f")),
        ];
        let c = capture(&steps).unwrap();
        assert_eq!((c.pairs, c.sequence_differs), (2, 0));
        // Dropout's offset changes in both pairs, the learning rate in one.
        assert_eq!(c.varying["dropout_bf16 (argument 3)"], 1.0);
        assert_eq!(c.varying["adamw_multi_f32 (argument 1)"], 0.5);
        assert_eq!(c.varying.len(), 2);
        assert_eq!(c.varying_launches, 1.5);
        assert_eq!(c.unknown_launches, 1.0);

        let mut reordered = step("0050000000000000", "0000003f");
        reordered.swap(0, 1);
        let c = capture(&[
            (100, step("0040000000000000", "0000003f")),
            (100, reordered),
        ])
        .unwrap();
        assert_eq!((c.pairs, c.sequence_differs), (1, 1));
        assert!(c.varying.is_empty());
        // No two consecutive steps of one shape: nothing to tell.
        assert!(capture(&[(1, step("00", "00")), (2, step("00", "00"))]).is_none());
    }

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
        let measured = recorded
            .cases
            .iter()
            .position(|c| c.capture.as_ref().is_some_and(|c| c.pairs > 0))
            .expect("a recorded case compares steps of one shape");
        let mut varying = recorded.clone();
        varying.cases[measured]
            .capture
            .as_mut()
            .unwrap()
            .varying_launches += 1.0;
        let d = differences(&recorded, &varying, Compare::Rises);
        assert!(d.len() == 1 && d[0].contains("step-varying"), "{d:?}");
        assert!(differences(&varying, &recorded, Compare::Rises).is_empty());
        // An argument that newly varies, at the same count; fewer steps of
        // one shape to compare.
        let mut other = varying.clone();
        other.cases[measured]
            .capture
            .as_mut()
            .unwrap()
            .varying
            .insert("some_kernel (argument 0)".into(), 1.0);
        let d = differences(&varying, &other, Compare::Rises);
        assert!(d.len() == 1 && d[0].contains("some_kernel"), "{d:?}");
        let mut fewer_pairs = recorded.clone();
        fewer_pairs.cases[measured].capture.as_mut().unwrap().pairs -= 1;
        assert_eq!(
            differences(&recorded, &fewer_pairs, Compare::Rises).len(),
            1
        );
        // Fewer is fine for the ratchet; the driver agreement wants equal.
        assert!(differences(&lookups, &recorded, Compare::Rises).is_empty());
        let mut fewer = recorded.clone();
        *fewer.cases[0].per_step.get_mut("kernels").unwrap() -= 1.0;
        assert!(differences(&recorded, &fewer, Compare::Rises).is_empty());
        assert!(!differences(&recorded, &fewer, Compare::Differs).is_empty());
    }

    /// The stand-in refuses inside a capture what the driver refuses (a
    /// host-to-device copy, a free of memory from before the capture), a
    /// relaunch while memory the graph allocated is still held, and a
    /// launch after memory the graph names was freed; each is counted
    /// under capture_errors. A capture of device work alone gives
    /// a graph that launches. Runs only with the stand-in loaded (the lib
    /// tests `scripts/step-census.sh --check` runs).
    #[cfg(feature = "cuda")]
    #[test]
    fn the_stand_in_refuses_what_a_capture_cannot_hold() {
        use candle_core::cuda_backend::cudarc::driver::sys;
        use candle_core::{DType, Device, Tensor};
        let Ok(t0) = read() else {
            eprintln!("skipped: the census library is not loaded (scripts/step-census.sh)");
            return;
        };
        if t0.mode != "stand-in" {
            eprintln!("skipped: the census library is the interposer, not the stand-in");
            return;
        }
        let errors = |t: &Totals| t.categories.get("capture_errors").copied().unwrap_or(0);
        let dev = crate::cuda_device(0).unwrap();
        let Device::Cuda(d) = &dev else {
            unreachable!("a CUDA device")
        };
        let stream = d.cuda_stream();
        let mode = sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL;
        let flags = sys::CUgraphInstantiate_flags(0);
        let end = || {
            let recorded = stream.context().check_err();
            let g = stream.end_capture(flags);
            recorded.and(g)
        };

        // A host-to-device copy: refused, and the capture with it.
        stream.begin_capture(mode).unwrap();
        assert!(Tensor::new(&[1f32, 2.0], &dev).is_err());
        assert!(end().is_err());
        assert_eq!(errors(&read().unwrap()), errors(&t0) + 1);

        // A free of memory allocated before the capture.
        let before = Tensor::zeros(4, DType::F32, &dev).unwrap();
        stream.begin_capture(mode).unwrap();
        drop(before);
        assert!(end().is_err());
        assert_eq!(errors(&read().unwrap()), errors(&t0) + 2);

        // Device work alone: a graph. Memory it allocates and leaves held
        // (`kept`) must be freed before the graph launches again.
        let x = Tensor::zeros(4, DType::F32, &dev).unwrap();
        stream.begin_capture(mode).unwrap();
        let kept = (&x + 1.0).unwrap();
        let graph = end().unwrap().expect("a graph");
        graph.launch().unwrap();
        assert!(graph.launch().is_err());
        assert_eq!(errors(&read().unwrap()), errors(&t0) + 3);
        drop(kept);
        graph.launch().unwrap();
        assert_eq!(errors(&read().unwrap()), errors(&t0) + 3);
        // Memory from before the capture that the graph reads: freed, the
        // graph may not launch again.
        drop(graph);
        stream.begin_capture(mode).unwrap();
        drop((&x + 1.0).unwrap());
        let graph = end().unwrap().expect("a graph");
        graph.launch().unwrap();
        drop(x);
        assert!(graph.launch().is_err());
        assert_eq!(errors(&read().unwrap()), errors(&t0) + 4);
    }
}
