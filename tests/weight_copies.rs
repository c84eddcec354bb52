//! Mixed precision's persistent bf16 weight copies
//! (`tunefuse::model::Stream::compute_weight`) against casting every weight
//! per use (`TUNEFUSE_CAST_PER_USE`). Where each weight is used once per
//! backward pass the two are the same arithmetic: the forward reads
//! `bf16(w)` either way, the weight's gradient is the same bf16 GEMM output
//! (widened exactly to f32 by the cast's backward, or read as bf16 by the
//! optimiser), and the optimiser rewrites the copy as `bf16(new w)`, which
//! is the next step's cast. So a short bf16 run on the CPU must log the same
//! numbers bit for bit, for every method whose weights are used once per
//! backward (and for Bregman's teacher pass, which swaps other values into
//! the weights and must refresh the copies). SMART uses each weight twice
//! in one backward (the clean and the perturbed forward): its two weight
//! gradients then sum in bf16 on the copy, as under PyTorch's autocast,
//! instead of in f32, and only the first step's forward values must agree
//! exactly.
mod common;

use std::path::Path;
use std::process::Command;

use common::{data_root, finetune_args, scratch, tiny_model_dir};

/// The log of a bf16 run of `extra`, each line without its wall-clock
/// throughput.
fn run(model: &Path, out: &Path, extra: &[&str], per_use: bool) -> Vec<serde_json::Value> {
    let mut args = finetune_args(model, &data_root(), out, extra);
    args.extend(["--set".into(), "precision=\"bf16\"".into()]);
    let mut c = Command::new(env!("CARGO_BIN_EXE_tunefuse"));
    c.args(&args);
    if per_use {
        c.env("TUNEFUSE_CAST_PER_USE", "1");
    } else {
        c.env_remove("TUNEFUSE_CAST_PER_USE");
    }
    let o = c.output().unwrap();
    assert!(
        o.status.success(),
        "{extra:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            let mut v: serde_json::Value = serde_json::from_str(l).unwrap();
            v.as_object_mut().unwrap().remove("examples_per_s");
            v
        })
        .collect()
}

fn both(extra: &[&str]) -> (Vec<serde_json::Value>, Vec<serde_json::Value>) {
    let dir = scratch("weight-copies");
    let model = tiny_model_dir(dir.path());
    let a = run(&model, &dir.path().join("copies"), extra, false);
    let b = run(&model, &dir.path().join("per-use"), extra, true);
    assert!(a.len() > 3, "{extra:?}: only {} log lines", a.len());
    assert_eq!(a.len(), b.len(), "{extra:?}: log lengths");
    (a, b)
}

#[test]
fn copies_equal_per_use_casts_bit_for_bit() {
    for extra in [
        &[][..],
        &["--method", "lora"][..],
        &["--method", "adapter", "--set", "adapter.r=8"][..],
        &["--method", "mixout"][..],
        &["--method", "bregman"][..],
        &["--method", "freelb"][..],
        // Two micro-batches per step: the gradients sum in f32.
        &["--set", "grad_accum=2"][..],
    ] {
        let (a, b) = both(extra);
        for (i, (x, y)) in a.iter().zip(&b).enumerate() {
            assert_eq!(x, y, "{extra:?}: log line {} differs", i + 1);
        }
    }
}

#[test]
fn smart_copies_agree_on_the_first_forward() {
    let (a, b) = both(&["--method", "smart"]);
    // The first logged step: its loss and penalty come from the forward
    // before any update, which reads the same bf16 weights either way.
    let first = |v: &[serde_json::Value]| {
        v.iter()
            .find(|l| l.get("loss").is_some())
            .cloned()
            .expect("a step line")
    };
    let (x, y) = (first(&a), first(&b));
    assert_eq!(x["loss"], y["loss"]);
    assert_eq!(x["terms"], y["terms"]);
}
