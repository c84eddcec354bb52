//! The `tunefuse` binary: bad input gets a clear error and a failing exit.
mod common;

use std::process::Command;

fn tunefuse(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_tunefuse"))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into(),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}

#[test]
fn table_reports_missing_and_malformed_files() {
    let (ok, _, err) = tunefuse(&["table", "--ours", "/nonexistent/ours.json"]);
    assert!(
        !ok && err.contains("cannot read results file") && err.contains("ours.json"),
        "{err}"
    );
    let dir = common::scratch("cli");
    let bad = dir.path().join("bad.json");
    std::fs::write(&bad, "{\"device\": 3").unwrap();
    let (ok, _, err) = tunefuse(&["table", "--ours", bad.to_str().unwrap()]);
    assert!(!ok && err.contains("malformed"), "{err}");
}

#[test]
fn table_merges_peers() {
    let dir = common::scratch("cli-peers");
    let ours = dir.path().join("ours.json");
    let peers = dir.path().join("peers.json");
    std::fs::write(
        &ours,
        r#"{"device": "Test GPU", "copy_gbps": 1000.0,
            "results": [{"op": "dropout fwd", "shape": "4", "dtype": "bf16", "ms": 0.5, "gbps": 800.0},
                        {"op": "adapter fwd+bwd", "shape": "8x8 r2", "dtype": "bf16", "ms": 0.25, "gbps": 100.0, "tflops": 1.5}]}"#,
    )
    .unwrap();
    std::fs::write(&peers, r#"{"results": [{"op": "dropout fwd", "shape": "4", "dtype": "bf16", "eager_ms": 1.0, "compile_ms": 2.0}]}"#).unwrap();
    let (ok, out, err) = tunefuse(&[
        "table",
        "--ours",
        ours.to_str().unwrap(),
        "--peers",
        peers.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    assert!(
        out.contains("Test GPU")
            && out.contains(
                "| dropout fwd | 4 | bf16 | 0.500 | 800.0 | 80% | - | 1.000 | 2.000 | 2.00x | 4.00x |"
            )
            && out.contains("| adapter fwd+bwd | 8x8 r2 | bf16 | 0.250 | 100.0 | 10% | 1.5 | - | - | - | - |"),
        "{out}"
    );
}

#[test]
fn cuda_request_without_cuda_is_an_error() {
    if cfg!(feature = "cuda") {
        return; // with a GPU present this would run the benchmark
    }
    let (ok, _, err) = tunefuse(&["bench", "--device", "cuda"]);
    assert!(!ok && err.contains("no CUDA device"), "{err}");
}

#[test]
fn bench_only_selects_cases_and_rejects_unknown_ones() {
    let (ok, _, err) = tunefuse(&["bench", "--device", "cpu", "--only", "no such case"]);
    assert!(
        !ok && err.contains("no benchmark case matches --only \"no such case\""),
        "{err}"
    );
    let (ok, out, err) = tunefuse(&["bench", "--device", "cpu", "--only", "dropout fwd"]);
    assert!(ok, "{err}");
    let rows: Vec<&str> = out
        .lines()
        .filter(|l| l.starts_with("| ") && !l.starts_with("| op"))
        .collect();
    assert_eq!(rows.len(), 1, "one row, the dropout case: {out}");
    assert!(rows[0].starts_with("| dropout fwd |"), "{out}");
}

#[test]
fn a_negative_learning_rate_is_read_as_a_value_and_refused() {
    let dir = common::scratch("cli");
    let model = common::tiny_model_dir(dir.path());
    let data = common::data_root();
    let out = dir.path().join("run");
    let (ok, _, err) = tunefuse(&[
        "finetune",
        "--model",
        model.to_str().unwrap(),
        "--data-dir",
        data.to_str().unwrap(),
        "--output",
        out.to_str().unwrap(),
        "--device",
        "cpu",
        "--lr",
        "-1e-4",
    ]);
    assert!(
        !ok && err.contains("lr must be a finite number > 0, got -0.0001")
            && !err.contains("panicked"),
        "{err}"
    );
    assert!(!out.exists(), "nothing written for a refused run");
}
