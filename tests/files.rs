//! A user's own data files: CSV, TSV and JSON Lines read into the same
//! examples, the column and label defaults, regression targets, the errors
//! that name file, line and problem, and a training run on a CSV file.
mod common;

use std::path::{Path, PathBuf};

use common::{scratch, tiny_model_dir};
use tunefuse::train::data::Split;
use tunefuse::train::files::DataFiles;

fn write(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, bytes).unwrap();
    p
}

fn files(train: &Path) -> DataFiles {
    DataFiles {
        train: train.to_path_buf(),
        ..Default::default()
    }
}

fn err(f: &DataFiles, split: Split) -> String {
    match f.load(split, "t") {
        Ok(d) => panic!("expected an error, read {} examples", d.examples.len()),
        Err(e) => e.to_string(),
    }
}

#[test]
fn the_three_formats_read_the_same_examples() {
    let dir = scratch("files-formats");
    // A byte-order mark, CRLF line ends, a quoted field with a comma, an
    // embedded newline and a doubled quote.
    let csv = write(
        dir.path(),
        "a.csv",
        b"\xEF\xBB\xBFsentence1,sentence2,label\r\n\"Hi, there\",\"He said \"\"no\"\"\",yes\r\nplain,\"two\nlines\",no\r\n",
    );
    let tsv = write(
        dir.path(),
        "a.tsv",
        b"sentence1\tsentence2\tlabel\nHi, there\tHe said \"no\"\tyes\nplain\t\"two\nlines\"\tno\n",
    );
    let jsonl = write(
        dir.path(),
        "a.jsonl",
        "{\"sentence1\": \"Hi, there\", \"sentence2\": \"He said \\\"no\\\"\", \"label\": \"yes\"}\n\n{\"label\": \"no\", \"sentence1\": \"plain\", \"sentence2\": \"two\\nlines\"}\n".as_bytes(),
    );
    let want: Vec<(String, Option<String>, usize)> = vec![
        ("Hi, there".into(), Some("He said \"no\"".into()), 1),
        ("plain".into(), Some("two\nlines".into()), 0),
    ];
    for p in [&csv, &tsv, &jsonl] {
        let ds = files(p).load(Split::Train, "t").unwrap();
        assert_eq!(
            ds.labels,
            vec!["no", "yes"],
            "{}: sorted label set",
            p.display()
        );
        let got: Vec<_> = ds
            .examples
            .iter()
            .map(|e| (e.text.clone(), e.pair.clone(), e.label))
            .collect();
        assert_eq!(got, want, "{}", p.display());
    }
}

#[test]
fn column_defaults_and_choices() {
    let dir = scratch("files-columns");
    // No sentence1: the first column that is not the label, no pair.
    let p = write(
        dir.path(),
        "t.csv",
        b"label,review,id\npos,good,1\nneg,bad,2\n",
    );
    let ds = files(&p).load(Split::Train, "t").unwrap();
    assert_eq!(ds.examples[0].text, "good");
    assert_eq!(ds.examples[0].pair, None);
    // Named columns, a label set given in another order.
    let f = DataFiles {
        text_column: Some("id".into()),
        text_pair_column: Some("review".into()),
        label_column: Some("label".into()),
        labels: Some(vec!["pos".into(), "neg".into()]),
        ..files(&p)
    };
    let ds = f.load(Split::Train, "t").unwrap();
    assert_eq!(ds.labels, vec!["pos", "neg"]);
    assert_eq!(
        (
            ds.examples[1].text.as_str(),
            ds.examples[1].pair.as_deref(),
            ds.examples[1].label
        ),
        ("2", Some("bad"), 1)
    );
    // Integer labels sort as numbers; JSON numbers and booleans read in
    // their JSON spelling.
    let p = write(
        dir.path(),
        "n.jsonl",
        b"{\"text\": \"a\", \"label\": 10}\n{\"text\": \"b\", \"label\": 2}\n{\"text\": \"c\", \"label\": 2}\n",
    );
    let ds = files(&p).load(Split::Train, "t").unwrap();
    assert_eq!(ds.labels, vec!["2", "10"]);
    assert_eq!(ds.class_counts(), vec![2, 1]);
    // "The first column" of JSON Lines is the first written, not the first
    // in alphabetical order.
    let p = write(
        dir.path(),
        "o.jsonl",
        b"{\"review\": \"nice\", \"aaa_id\": 7, \"label\": \"a\"}\n{\"review\": \"bad\", \"aaa_id\": 8, \"label\": \"b\"}\n",
    );
    let ds = files(&p).load(Split::Train, "t").unwrap();
    assert_eq!(ds.examples[0].text, "nice");
}

#[test]
fn regression_targets_are_real_numbers() {
    let dir = scratch("files-regression");
    let p = write(
        dir.path(),
        "r.tsv",
        b"sentence\tlabel\nfine\t3.25\nawful\t-1e-1\n",
    );
    let f = DataFiles {
        regression: true,
        ..files(&p)
    };
    let ds = f.load(Split::Train, "t").unwrap();
    assert!(ds.labels.is_empty());
    let v: Vec<f64> = ds.examples.iter().map(|e| e.value).collect();
    assert_eq!(v, vec![3.25, -0.1]);
    let bad = write(
        dir.path(),
        "b.tsv",
        b"sentence\tlabel\nfine\t3.25\nawful\tNaN\n",
    );
    let e = err(
        &DataFiles {
            regression: true,
            ..files(&bad)
        },
        Split::Train,
    );
    assert!(
        e.contains("b.tsv") && e.contains("line 3") && e.contains("not a finite number"),
        "{e}"
    );
    let e = err(
        &DataFiles {
            regression: true,
            ..files(&write(
                dir.path(),
                "c.tsv",
                b"sentence\tlabel\nfine\thigh\n",
            ))
        },
        Split::Train,
    );
    assert!(e.contains("line 2") && e.contains("\"high\""), "{e}");
}

#[test]
fn errors_name_the_file_the_line_and_the_problem() {
    let dir = scratch("files-errors");
    let train = write(dir.path(), "train.csv", b"text,label\na,x\nb,y\n");
    // A missing column lists the columns found.
    let f = DataFiles {
        label_column: Some("gold".into()),
        ..files(&train)
    };
    let e = err(&f, Split::Train);
    assert!(
        e.contains("train.csv") && e.contains("\"gold\"") && e.contains("\"text\", \"label\""),
        "{e}"
    );
    // Empty files, and a header without rows.
    for (name, body, says) in [
        ("empty.csv", &b""[..], "is empty"),
        ("header.csv", &b"text,label\n"[..], "no examples"),
        ("empty.jsonl", &b"\n\n"[..], "is empty"),
    ] {
        let e = err(&files(&write(dir.path(), name, body)), Split::Train);
        assert!(e.contains(name) && e.contains(says), "{e}");
    }
    // A dev label the training file does not have.
    let dev = write(dir.path(), "dev.csv", b"text,label\nc,x\nd,z\n");
    let f = DataFiles {
        dev: Some(dev),
        ..files(&train)
    };
    let e = err(&f, Split::Dev);
    assert!(
        e.contains("dev.csv")
            && e.contains("line 3")
            && e.contains("\"z\"")
            && e.contains("\"x\", \"y\""),
        "{e}"
    );
    // No dev file for the dev split.
    let e = err(&files(&train), Split::Dev);
    assert!(e.contains("no dev_file"), "{e}");
    // A row with too many fields, an unquoted comma.
    let e = err(
        &files(&write(
            dir.path(),
            "ragged.csv",
            b"text,label\ngood, really,x\n",
        )),
        Split::Train,
    );
    assert!(
        e.contains("ragged.csv") && e.contains("line 2") && e.contains("quoted"),
        "{e}"
    );
    // An empty label, a one-label file, a JSON list as text, bad JSON, an
    // unknown extension, a label list that repeats itself.
    let cases: Vec<(DataFiles, &str)> = vec![
        (
            files(&write(dir.path(), "el.csv", b"text,label\na,\nb,y\n")),
            "line 2: the label column \"label\" is empty",
        ),
        (
            files(&write(dir.path(), "one.csv", b"text,label\na,x\nb,x\n")),
            "needs at least two",
        ),
        (
            files(&write(
                dir.path(),
                "nest.jsonl",
                b"{\"text\": [\"a\"], \"label\": 1}\n{\"text\": \"b\", \"label\": 0}\n",
            )),
            "line 1: the text column \"text\" holds a JSON list",
        ),
        (
            files(&write(
                dir.path(),
                "bad.jsonl",
                b"{\"text\": \"a\", \"label\": 1}\n{\"text\": \n",
            )),
            "line 2:",
        ),
        (
            files(&write(dir.path(), "x.parquet", b"")),
            "must end in .csv",
        ),
        (
            DataFiles {
                labels: Some(vec!["x".into(), "y".into(), "x".into()]),
                ..files(&train)
            },
            "listed twice",
        ),
    ];
    for (f, says) in cases {
        let e = err(&f, Split::Train);
        assert!(e.contains(says), "{e}\nshould say {says:?}");
    }
}

#[test]
fn bytes_that_are_not_utf8_read_as_latin1() {
    let dir = scratch("files-latin1");
    let p = write(dir.path(), "l.csv", b"text,label\ncaf\xe9,a\nok,b\n");
    let ds = files(&p).load(Split::Train, "t").unwrap();
    assert_eq!(ds.examples[0].text, "café");
}

/// The binary trains on a CSV file, evaluates on a TSV dev file, records
/// the label set's size in its head and refuses a built-in task name given
/// with the files.
#[test]
fn finetune_trains_on_own_files() {
    let dir = scratch("files-finetune");
    let model = tiny_model_dir(dir.path());
    let mut train = String::from("review,stars\n");
    let mut dev = String::from("review\tstars\n");
    for i in 0..24 {
        let (t, l) = if i % 3 == 0 {
            ("\"great, would buy again\"", "good")
        } else if i % 3 == 1 {
            ("broke after a day", "bad")
        } else {
            ("it is a product", "meh")
        };
        train.push_str(&format!("{t} {i},{l}\n"));
        if i < 9 {
            dev.push_str(&format!("{}\t{l}\n", t.trim_matches('"')));
        }
    }
    let train = write(dir.path(), "train.csv", train.as_bytes());
    let dev = write(dir.path(), "dev.tsv", dev.as_bytes());
    let out = dir.path().join("run");
    let bin = env!("CARGO_BIN_EXE_tunefuse");
    let s = |p: &Path| p.to_str().unwrap().to_string();
    let args = common::own_data_args(
        &model,
        &train,
        &dev,
        &out,
        &["--text-column", "review", "--label-column", "stars"],
    );
    let o = std::process::Command::new(bin)
        .args(&args)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let cfg = std::fs::read_to_string(out.join("config.toml")).unwrap();
    assert!(cfg.contains("task = \"files\""), "{cfg}");
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("summary.json")).unwrap()).unwrap();
    assert!(summary["best"].as_f64().is_some(), "{summary}");
    let head = candle_core::safetensors::load(
        out.join("best/model.safetensors"),
        &candle_core::Device::Cpu,
    )
    .unwrap();
    let w = head
        .iter()
        .find(|(k, _)| k.starts_with("classifier.") && k.ends_with("weight"))
        .map(|(_, v)| v.dims().to_vec());
    assert_eq!(w, Some(vec![3, 32]), "three labels: bad, good, meh");
    // `eval --file` reads another file in the run's columns and labels:
    // the dev file again gives the run's own final evaluation.
    let eval_dev = || -> serde_json::Value {
        let o = std::process::Command::new(bin)
            .args([
                "eval",
                "--checkpoint",
                &s(&out.join("best")),
                "--file",
                &s(&dev),
            ])
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        serde_json::from_slice(&o.stdout).unwrap()
    };
    let ev = eval_dev();
    assert_eq!(ev["accuracy"], summary["best"], "{ev}");
    // The checkpoint keeps its labels: evaluating it needs no training file.
    let moved = dir.path().join("train-moved.csv");
    std::fs::rename(&train, &moved).unwrap();
    assert_eq!(eval_dev(), ev);
    std::fs::rename(&moved, &train).unwrap();
    // A built-in task with the files is refused, naming both.
    let mut a: Vec<&str> = args.iter().map(String::as_str).collect();
    a.extend(["--task", "sst2", "--overwrite"]);
    let o = std::process::Command::new(bin).args(&a).output().unwrap();
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && e.contains("train_file") && e.contains("sst2"),
        "{e}"
    );
}

/// The TOML form: `train_file` alone selects the files task; the files task
/// without a training file, and own-data keys beside a built-in task, are
/// refused before any file is read.
#[test]
fn config_selects_and_checks_the_files_task() {
    use tunefuse::train::trainer::{Config, Reading};
    let cfg = Config::from_toml(
        "train_file = \"t.csv\"\ndev_file = \"d.csv\"\nlabels = [\"a\", \"b\"]",
        Reading::Strict,
    )
    .unwrap();
    assert_eq!(cfg.task, "files");
    cfg.validate().unwrap();
    let f = cfg.data_files().unwrap();
    assert_eq!(f.labels, Some(vec!["a".to_string(), "b".to_string()]));
    assert_eq!(f.dev.as_deref(), Some(Path::new("d.csv")));
    let e = Config::from_toml("task = \"files\"", Reading::Strict)
        .unwrap()
        .validate()
        .unwrap_err()
        .to_string();
    assert!(e.contains("train_file"), "{e}");
    let e = Config::from_toml("task = \"sst2\"\ntext_column = \"x\"", Reading::Strict)
        .unwrap()
        .validate()
        .unwrap_err()
        .to_string();
    assert!(e.contains("text_column") && e.contains("sst2"), "{e}");
    let e = Config::from_toml("train_file = \"t.csv\"\nlabels = [\"a\"]", Reading::Strict)
        .unwrap()
        .validate()
        .unwrap_err()
        .to_string();
    assert!(e.contains("at least 2 labels"), "{e}");
}
