//! SIGINT / SIGTERM: a run stops after its current step with `last/`
//! written, and a resume finishes it as if it had never stopped. In its own
//! test binary: the stop request is process-wide.
mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

use common::*;
use tunefuse::train::trainer::{Config, Event, Run};

fn cfg(dir: &tempfile::TempDir, out: &str) -> Config {
    Config {
        eval_examples: Some(8),
        eval_every: 0,
        ..small_run(dir, out, tiny_model_dir(dir.path()))
    }
}

fn steps(cfg: &Config) -> Vec<String> {
    std::fs::read_to_string(cfg.output.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            let mut v: serde_json::Value = serde_json::from_str(l).unwrap();
            if let Some(o) = v.as_object_mut() {
                o.remove("examples_per_s");
            }
            v.to_string()
        })
        .collect()
}

#[test]
fn a_stop_request_writes_last_and_a_resume_finishes_the_run_exactly() {
    let dir = scratch("interrupt");
    let full = cfg(&dir, "full");
    let s_full = Run::new(full.clone()).unwrap().fit(false, |_| ()).unwrap();
    let cut = cfg(&dir, "cut");
    // Asked during step 4 (mid-epoch: 3 batches an epoch).
    let err = Run::new(cut.clone())
        .unwrap()
        .fit(false, |e| {
            if let Event::Step { step: 4, .. } = e {
                tunefuse::interrupt::request();
            }
        })
        .unwrap_err();
    tunefuse::interrupt::clear();
    let msg = err.to_string();
    assert!(
        matches!(err, tunefuse::Error::Interrupted(_))
            && msg.contains("after step 4 of 6")
            && msg.contains("--resume"),
        "{msg}"
    );
    let s_cut = Run::new(cut.clone()).unwrap().fit(true, |_| ()).unwrap();
    assert_eq!(s_cut.steps, 6);
    assert_eq!(s_cut.last, s_full.last);
    assert_eq!(steps(&cut), steps(&full));
}

#[test]
fn sigterm_stops_the_binary_with_the_command_that_resumes() {
    let dir = scratch("interrupt");
    let model = tiny_model_dir(dir.path());
    let out = dir.path().join("run");
    let args = finetune_args(
        &model,
        &data_root(),
        &out,
        &[
            "--batch-size",
            "8",
            "--epochs",
            "40",
            "--set",
            "eval_every=0",
        ],
    );
    let mut child = Command::new(env!("CARGO_BIN_EXE_tunefuse"))
        .args(&args)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut err = BufReader::new(child.stderr.take().unwrap());
    let mut seen = String::new();
    let mut line = String::new();
    while err.read_line(&mut line).unwrap() > 0 {
        seen.push_str(&line);
        if line.starts_with("step 2/") {
            // SAFETY: signalling our own child process.
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            break;
        }
        line.clear();
    }
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut err, &mut rest).unwrap();
    seen.push_str(&rest);
    let status = child.wait().unwrap();
    assert!(!status.success(), "{seen}");
    assert!(
        seen.contains("stopped by a signal after step") && seen.contains("--resume"),
        "{seen}"
    );
    assert!(!seen.contains("panicked"), "{seen}");
    assert!(out.join("last/trainer.json").exists());
    // The printed command resumes it to the end.
    let mut resume = args.clone();
    resume.push("--resume".into());
    let done = Command::new(env!("CARGO_BIN_EXE_tunefuse"))
        .args(&resume)
        .output()
        .unwrap();
    assert!(
        done.status.success(),
        "{}",
        String::from_utf8_lossy(&done.stderr)
    );
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("summary.json")).unwrap()).unwrap();
    assert_eq!(summary["steps"], 120);
}
