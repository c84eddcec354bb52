//! Every reader against the row counts of ../shared/data/README.md, and the
//! error and decoding behaviour on malformed files.
mod common;

use common::{data_root, scratch};
use tunefuse::train::data::{load, shuffle, Dataset, Split, Task};

fn get(task: &str, split: Split) -> Dataset {
    load(&task.parse().unwrap(), split, &data_root())
        .unwrap_or_else(|e| panic!("{task} {split:?}: {e}"))
}

#[test]
fn glue_counts() {
    let sst = get("sst2", Split::Train);
    assert_eq!(
        (sst.examples.len(), sst.class_counts()),
        (67_349, vec![29_780, 37_569])
    );
    let dev = get("sst2", Split::Dev);
    assert_eq!(
        (dev.examples.len(), dev.class_counts()),
        (872, vec![428, 444])
    );
    assert!(
        !dev.examples[0].text.ends_with(' '),
        "trailing space trimmed"
    );
    assert_eq!(get("cola", Split::Train).examples.len(), 7_250 + 1_301);
    assert_eq!(get("cola", Split::Dev).examples.len(), 1_043);
    let rte = get("rte", Split::Train);
    assert_eq!(rte.examples.len(), 2_127 + 363);
    assert!(rte.examples.iter().all(|e| e.pair.is_some()));
    assert_eq!(get("rte", Split::Dev).examples.len(), 277);
    let mrpc = get("mrpc", Split::Train);
    assert_eq!(mrpc.examples.len(), 3_668);
    assert!(
        mrpc.examples.iter().any(|e| e.text.contains('"')),
        "bare quotes kept (quoting off)"
    );
    assert_eq!(get("mrpc", Split::Dev).examples.len(), 408);
    assert_eq!(get("mrpc", Split::Test).examples.len(), 1_725);
}

#[test]
fn amazon_counts_and_quoted_newlines() {
    for d in ["books", "dvd", "electronics", "kitchen"] {
        let task = format!("amazon:{d}");
        for (split, n) in [
            (Split::Train, 1_700),
            (Split::Dev, 300),
            (Split::Test, 2_000),
        ] {
            let ds = get(&task, split);
            assert_eq!(ds.examples.len(), n, "{task} {split:?}");
            assert_eq!(
                ds.class_counts(),
                vec![n / 2, n / 2],
                "{task} {split:?} is balanced"
            );
        }
    }
    let books = get("amazon:books", Split::Train);
    assert!(
        books.examples.iter().any(|e| e.text.contains('\n')),
        "reviews keep their embedded newlines"
    );
    assert!(books
        .examples
        .iter()
        .all(|e| !e.text.contains('\r') || e.text.contains("\r\n")));
}

#[test]
fn ood_and_extra_counts() {
    let trec = get("trec", Split::Train);
    assert_eq!(trec.examples.len(), 5_452);
    // Line 66 has a Latin-1 byte 0xF0: decoded to 'ð', not dropped.
    assert!(
        trec.examples[65].text.contains("sister\u{f0}city"),
        "{}",
        trec.examples[65].text
    );
    assert_eq!(get("trec", Split::Test).examples.len(), 500);
    assert_eq!(get("snli", Split::Dev).examples.len(), 9_842);
    assert_eq!(get("snli", Split::Test).examples.len(), 9_824);
    assert_eq!(get("agnews", Split::Dev).examples.len(), 10_001);
    assert_eq!(get("agnews", Split::Test).examples.len(), 7_600);
    assert_eq!(get("sst5", Split::Train).examples.len(), 8_544);
    assert_eq!(get("sst5", Split::Dev).examples.len(), 1_101);
    assert_eq!(get("sst5", Split::Test).examples.len(), 2_210);
    // SentEval sets: non-blank lines of the files (counted independently).
    assert_eq!(get("cr", Split::Train).class_counts(), vec![1_366, 2_405]);
    assert_eq!(get("mpqa", Split::Train).class_counts(), vec![7_292, 3_311]);
    assert_eq!(get("subj", Split::Train).class_counts(), vec![5_000, 5_000]);
}

#[test]
fn missing_splits_and_unknown_tasks() {
    let root = data_root();
    let e = load(&Task::Trec, Split::Dev, &root)
        .unwrap_err()
        .to_string();
    assert!(e.contains("no Dev split"), "{e}");
    let e = "amazon:toys".parse::<Task>().unwrap_err().to_string();
    assert!(e.contains("unknown task"), "{e}");
    let e = load(
        &Task::Sst2,
        Split::Train,
        std::path::Path::new("/nonexistent"),
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("/nonexistent/glue/SST-2/train.tsv"), "{e}");
}

/// A data directory holding `files`, removed when the guard drops.
fn data_dir(name: &str, files: &[(&str, &[u8])]) -> tempfile::TempDir {
    let dir = scratch(&format!("data-{name}"));
    for (rel, content) in files {
        let p = dir.path().join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, content).unwrap();
    }
    dir
}

#[test]
fn malformed_lines_name_file_and_line() {
    let dir = data_dir(
        "bad",
        &[
            (
                "glue/SST-2/dev.tsv",
                b"sentence\tlabel\ngood .\t1\nbad .\t7\n",
            ),
            (
                "glue/CoLA/dev.tsv",
                b"src\t1\t\tok .\nsrc\t0\tonly three fields\n",
            ),
            (
                "amazon/books/dev.tsv",
                b"sentence\tlabel\r\n\"multi\nline\"\t1\r\n\"never closed\t0\r\n",
            ),
            ("ood/SNLI/s1.dev", b"a\nb\n"),
            ("ood/SNLI/s2.dev", b"c\n"),
            ("ood/SNLI/labels.dev", b"neutral\nentailment\n"),
        ],
    );
    let e = load(&Task::Sst2, Split::Dev, dir.path())
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("SST-2/dev.tsv") && e.contains("line 3") && e.contains("\"7\""),
        "{e}"
    );
    let e = load(&Task::Cola, Split::Dev, dir.path())
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("CoLA/dev.tsv") && e.contains("line 2") && e.contains("expected 4"),
        "{e}"
    );
    let e = load(&Task::Amazon("books".into()), Split::Dev, dir.path())
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("books/dev.tsv") && e.contains("line 4") && e.contains("never closed"),
        "{e}"
    );
    let e = load(&Task::Snli, Split::Dev, dir.path())
        .unwrap_err()
        .to_string();
    assert!(e.contains("differ in length"), "{e}");
}

#[test]
fn a_file_without_its_header_line_is_refused_not_shortened() {
    // Without the check the first example would be taken for the header.
    let dir = data_dir(
        "no-header",
        &[
            ("glue/SST-2/dev.tsv", b"good .\t1\nbad .\t0\n"),
            (
                "glue/RTE/dev.tsv",
                b"0\tA man sleeps .\tA man is awake .\tnot_entailment\n",
            ),
            (
                "glue/MRPC/dev.tsv",
                "\u{feff}Quality\t#1 ID\t#2 ID\t#1 String\t#2 String\n1\t1\t2\ta\tb\n".as_bytes(),
            ),
        ],
    );
    for (task, file) in [(Task::Sst2, "SST-2/dev.tsv"), (Task::Rte, "RTE/dev.tsv")] {
        let e = load(&task, Split::Dev, dir.path()).unwrap_err().to_string();
        assert!(
            e.contains(file) && e.contains("line 1") && e.contains("expected the header"),
            "{e}"
        );
    }
    // A byte-order mark before the header is fine.
    assert_eq!(
        load(&Task::Mrpc, Split::Dev, dir.path())
            .unwrap()
            .examples
            .len(),
        1
    );
}

#[test]
fn shuffling_and_subsampling_are_deterministic() {
    let ds = get("sst2", Split::Dev);
    let a = ds.subsample(100, 1);
    assert_eq!(a, ds.subsample(100, 1));
    assert_ne!(a.examples, ds.subsample(100, 2).examples);
    let k = ds.k_per_class(16, 3).unwrap();
    assert_eq!(k.class_counts(), vec![16, 16]);
    // SST-2 dev has 428 negative sentences: 500 of each class cannot be had.
    let e = ds.k_per_class(500, 3).unwrap_err().to_string();
    assert!(
        e.contains("k_per_class = 500") && e.contains("\"negative\"") && e.contains("only 428"),
        "{e}"
    );
    let mut v: Vec<u32> = (0..1000).collect();
    shuffle(&mut v, 9);
    let mut sorted = v.clone();
    sorted.sort();
    assert_eq!(sorted, (0..1000).collect::<Vec<_>>(), "a permutation");
    assert_ne!(v[..10], sorted[..10]);
}
