//! Readers for the text-classification data in `../shared/data` (see its
//! README), found through a `--data-dir` flag or the `TUNEFUSE_DATA`
//! variable. Every reader yields [`Example`]s (text, optional text pair,
//! label index) and the label names.
//!
//! Decoding: files are UTF-8; a line that is not valid UTF-8 is decoded as
//! Latin-1 (TREC's `train_5500.label` has one such byte, line 66), never
//! dropped. A UTF-8 byte-order mark is skipped. Malformed lines are errors
//! naming the file and line.
use std::path::{Path, PathBuf};

use crate::error::{format_err, io_err, param_err, Error, Result};
use crate::philox;

/// One example.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Example {
    /// The (first) text, trimmed.
    pub text: String,
    /// The second text of a pair task.
    pub pair: Option<String>,
    /// Index into [`Dataset::labels`] (0 for a regression file, whose
    /// label set is empty).
    pub label: usize,
    /// The real-valued target a regression head trains towards: the label
    /// index for the built-in readers (SST-5's 0–4 scale), the number in
    /// the label column for a regression data file.
    pub value: f64,
    /// Token classification: the sentence's words (`text` is them joined
    /// by spaces); empty for sentence tasks.
    pub words: Vec<String>,
    /// Token classification: each word's tag, an index into
    /// [`Dataset::labels`].
    pub tags: Vec<usize>,
}

/// Examples with their label names.
#[derive(Clone, Debug, PartialEq)]
pub struct Dataset {
    /// The task's name (`sst2`, `amazon:books`, a data file's stem).
    pub name: String,
    /// The label names in index order (empty for regression targets).
    pub labels: Vec<String>,
    /// The examples, in file order until shuffled.
    pub examples: Vec<Example>,
}

/// The tasks with readers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Task {
    /// GLUE SST-2: binary sentiment (train, dev).
    Sst2,
    /// GLUE CoLA: grammatical acceptability (train + val, dev).
    Cola,
    /// GLUE RTE: entailment of sentence pairs (train + val, dev).
    Rte,
    /// MRPC: paraphrase pairs (train, dev, test).
    Mrpc,
    /// Amazon multi-domain sentiment: books, dvd, electronics or kitchen.
    Amazon(String),
    /// TREC question classification, 6 coarse classes (train, test).
    Trec,
    /// SNLI: 3-way entailment (dev, test).
    Snli,
    /// AG News: 4 topics (dev, test).
    AgNews,
    /// SST-5: 5-point sentiment (train, dev, test).
    Sst5,
    /// CR customer reviews: binary sentiment (train only).
    Cr,
    /// MPQA opinion polarity (train only).
    Mpqa,
    /// SUBJ: subjective vs objective (train only).
    Subj,
    /// Named entities of a CoNLL-style corpus of the data folder's `ner/`:
    /// `conll2003`, `ncbi-disease` or `sciie` (train, dev, test); a token
    /// classification task.
    Ner(String),
}

const NER: [(&str, crate::train::ner::Scheme); 3] = [
    ("conll2003", crate::train::ner::Scheme::Iob2),
    ("ncbi-disease", crate::train::ner::Scheme::Iob2),
    ("sciie", crate::train::ner::Scheme::Iob1),
];

impl Task {
    /// Whether the task labels every word (token classification).
    pub fn is_token_task(&self) -> bool {
        matches!(self, Task::Ner(_))
    }
}

/// A split; not every task has every split (errors say which exist).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Split {
    /// The training split.
    Train,
    #[serde(alias = "validation")]
    /// The development (validation) split.
    Dev,
    /// The test split.
    Test,
}

const AMAZON: [&str; 4] = ["books", "dvd", "electronics", "kitchen"];

impl std::str::FromStr for Task {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        let lower = s.to_ascii_lowercase();
        Ok(match lower.as_str() {
            "sst2" | "sst-2" => Task::Sst2,
            "cola" => Task::Cola,
            "rte" => Task::Rte,
            "mrpc" => Task::Mrpc,
            "trec" => Task::Trec,
            "snli" => Task::Snli,
            "agnews" | "ag_news" => Task::AgNews,
            "sst5" | "sst-5" => Task::Sst5,
            "cr" => Task::Cr,
            "mpqa" => Task::Mpqa,
            "subj" => Task::Subj,
            d if d.starts_with("amazon:") && AMAZON.contains(&&d[7..]) => Task::Amazon(d[7..].to_string()),
            d if d.starts_with("ner:") && NER.iter().any(|(c, _)| *c == &d[4..]) => {
                Task::Ner(d[4..].to_string())
            }
            _ => {
                return Err(param_err(
                    "task",
                    format!("unknown task {s:?}: sst2, cola, rte, mrpc, amazon:<books|dvd|electronics|kitchen>, trec, snli, agnews, sst5, cr, mpqa, subj, ner:<conll2003|ncbi-disease|sciie>"),
                ))
            }
        })
    }
}

impl Split {
    /// The split's name in configurations and messages.
    pub fn name(self) -> &'static str {
        match self {
            Split::Train => "train",
            Split::Dev => "dev",
            Split::Test => "test",
        }
    }
}

impl std::str::FromStr for Split {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "train" => Ok(Split::Train),
            "dev" | "validation" => Ok(Split::Dev),
            "test" => Ok(Split::Test),
            _ => Err(param_err(
                "split",
                format!("unknown split {s:?}: train, dev, test"),
            )),
        }
    }
}

/// The data directory: the flag if given, else `TUNEFUSE_DATA`.
pub fn data_dir(flag: Option<&Path>) -> Result<PathBuf> {
    let dir = match flag {
        Some(p) => p.to_path_buf(),
        None => PathBuf::from(std::env::var_os("TUNEFUSE_DATA").ok_or_else(|| {
            param_err(
                "data",
                "no data directory: pass --data-dir or set TUNEFUSE_DATA (e.g. to ../shared/data)",
            )
        })?),
    };
    if !dir.is_dir() {
        return Err(io_err(&dir, "not a directory"));
    }
    Ok(dir)
}

/// Reads a file to text lines: BOM skipped, `\r\n` accepted, each line
/// UTF-8 or else Latin-1.
fn read_lines(path: &Path) -> Result<Vec<String>> {
    Ok(decode(&read(path)?).lines().map(str::to_string).collect())
}

fn read(path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|e| io_err(path, e))
}

/// Whole-file decoding with the per-line Latin-1 fallback.
fn decode(bytes: &[u8]) -> String {
    let bytes = bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(bytes);
    match std::str::from_utf8(bytes) {
        Ok(s) => s.to_string(),
        Err(_) => bytes
            .split(|&b| b == b'\n')
            .map(decode_line)
            .collect::<Vec<_>>()
            .join("\n"),
    }
}

/// UTF-8, or Latin-1 (each byte its code point) when it is not valid UTF-8.
pub(crate) fn decode_line(bytes: &[u8]) -> String {
    match std::str::from_utf8(bytes) {
        Ok(s) => s.to_string(),
        Err(_) => bytes.iter().map(|&b| b as char).collect(),
    }
}

/// Label index of `name` in `labels`, or an error at `path:line`.
fn label_of(labels: &[&str], name: &str, path: &Path, line: usize) -> Result<usize> {
    labels.iter().position(|l| *l == name).ok_or_else(|| {
        format_err(
            path,
            format!("line {line}: unknown label {name:?} (expected one of {labels:?})"),
        )
    })
}

/// Tab-separated lines without quoting; each line must have `cols`
/// fields. With `header`, line 1 must be exactly those column names (a
/// byte-order mark before it allowed) and is skipped: a file without its
/// header would otherwise lose its first example without a word.
fn tsv(path: &Path, header: Option<&[&str]>, cols: usize) -> Result<Vec<(usize, Vec<String>)>> {
    let lines = read_lines(path)?;
    if let Some(h) = header {
        let first = lines.first().map(|l| l.trim_start_matches('\u{feff}'));
        let want = h.join("\t");
        if first != Some(want.as_str()) {
            return Err(format_err(
                path,
                format!(
                    "line 1: expected the header {:?} (columns {}), found {:?}",
                    want,
                    h.join(", "),
                    first.unwrap_or("")
                ),
            ));
        }
    }
    let mut out = Vec::new();
    for (i, line) in lines.iter().enumerate().skip(usize::from(header.is_some())) {
        if line.is_empty() {
            continue;
        }
        let f: Vec<String> = line.split('\t').map(str::to_string).collect();
        if f.len() != cols {
            return Err(format_err(
                path,
                format!(
                    "line {}: expected {cols} tab-separated fields, found {}",
                    i + 1,
                    f.len()
                ),
            ));
        }
        out.push((i + 1, f));
    }
    if out.is_empty() {
        return Err(format_err(
            path,
            if header.is_some() {
                "holds no examples after its header line"
            } else {
                "holds no examples"
            },
        ));
    }
    Ok(out)
}

/// Quoted TSV (RFC 4180 rules with tabs): fields may be `"…"` with `""`
/// for a quote and embedded newlines. Returns records with the line each
/// starts on.
fn quoted_tsv(path: &Path) -> Result<Vec<(usize, Vec<String>)>> {
    let text = decode(&read(path)?);
    let mut records = Vec::new();
    let (mut field, mut rec) = (String::new(), Vec::new());
    let (mut line, mut start_line) = (1usize, 1usize);
    let mut chars = text.chars().peekable();
    let mut quoted = false;
    let mut at_field_start = true;
    while let Some(c) = chars.next() {
        if quoted {
            match c {
                '"' if chars.peek() == Some(&'"') => {
                    chars.next();
                    field.push('"');
                }
                '"' => {
                    quoted = false;
                    if !matches!(chars.peek(), None | Some('\t') | Some('\n') | Some('\r')) {
                        return Err(format_err(
                            path,
                            format!("line {line}: text after a closing quote"),
                        ));
                    }
                }
                '\n' => {
                    line += 1;
                    field.push('\n');
                }
                _ => field.push(c),
            }
            continue;
        }
        match c {
            '"' if at_field_start => {
                quoted = true;
                at_field_start = false;
            }
            '\t' => {
                rec.push(std::mem::take(&mut field));
                at_field_start = true;
            }
            '\r' if chars.peek() == Some(&'\n') => {}
            '\n' => {
                rec.push(std::mem::take(&mut field));
                records.push((start_line, std::mem::take(&mut rec)));
                line += 1;
                start_line = line;
                at_field_start = true;
            }
            _ => {
                field.push(c);
                at_field_start = false;
            }
        }
    }
    if quoted {
        return Err(format_err(
            path,
            format!("line {start_line}: quoted field never closed"),
        ));
    }
    if !field.is_empty() || !rec.is_empty() {
        rec.push(field);
        records.push((start_line, rec));
    }
    Ok(records)
}

fn need_split(task: &str, split: Split, have: &[Split]) -> Result<()> {
    if have.contains(&split) {
        Ok(())
    } else {
        Err(param_err(
            "data",
            format!("{task} has no {split:?} split (it has {have:?})"),
        ))
    }
}

/// Loads a task's split from `dir` (the folder the data README describes).
pub fn load(task: &Task, split: Split, dir: &Path) -> Result<Dataset> {
    use Split::*;
    let p = |rel: &str| dir.join(rel);
    let ds = |name: &str, labels: &[&str], examples: Vec<Example>| Dataset {
        name: name.to_string(),
        labels: labels.iter().map(|s| s.to_string()).collect(),
        examples,
    };
    let ex = |text: &str, pair: Option<&str>, label: usize| Example {
        text: text.trim().to_string(),
        pair: pair.map(|s| s.trim().to_string()),
        label,
        value: label as f64,
        ..Default::default()
    };
    match task {
        Task::Ner(corpus) => {
            let scheme = NER
                .iter()
                .find(|(c, _)| c == corpus)
                .map(|(_, s)| *s)
                .ok_or_else(|| param_err("task", format!("unknown NER corpus {corpus:?}")))?;
            let file = |s: Split| p(&format!("ner/{corpus}/{}.txt", s.name()));
            // The tag set is that of the three files, "O" first then
            // sorted, so every split (and a checkpoint) indexes tags alike
            // (SciERC's few B- tags are not in every split).
            let strict = scheme == crate::train::ner::Scheme::Iob2;
            let mut all = [Train, Dev, Test]
                .iter()
                .map(|&s| crate::train::ner::read_conll(&file(s), scheme, strict))
                .collect::<Result<Vec<_>>>()?;
            let mut labels: Vec<String> =
                all.iter().flatten().flat_map(|s| s.tags.clone()).collect();
            labels.sort_by(|a, b| (a != "O", a).cmp(&(b != "O", b)));
            labels.dedup();
            let sents = std::mem::take(&mut all[split as usize]);
            let mut v = Vec::with_capacity(sents.len());
            for (n, s) in sents.into_iter().enumerate() {
                let tags = s
                    .tags
                    .iter()
                    .map(|t| {
                        labels.iter().position(|l| l == t).ok_or_else(|| {
                            format_err(
                                &file(split),
                                format!(
                                    "sentence {}: tag {t:?} is not in the corpus's tag set",
                                    n + 1
                                ),
                            )
                        })
                    })
                    .collect::<Result<Vec<_>>>()?;
                v.push(Example {
                    text: s.words.join(" "),
                    words: s.words,
                    tags,
                    ..Default::default()
                });
            }
            Ok(Dataset {
                name: format!("ner:{corpus}"),
                labels,
                examples: v,
            })
        }
        Task::Sst2 => {
            need_split("sst2", split, &[Train, Dev])?;
            let path = p(if split == Train {
                "glue/SST-2/train.tsv"
            } else {
                "glue/SST-2/dev.tsv"
            });
            let labels = ["0", "1"];
            let mut v = Vec::new();
            for (line, f) in tsv(&path, Some(&["sentence", "label"]), 2)? {
                v.push(ex(&f[0], None, label_of(&labels, &f[1], &path, line)?));
            }
            Ok(ds("sst2", &["negative", "positive"], v))
        }
        Task::Cola => {
            need_split("cola", split, &[Train, Dev])?;
            let files: &[&str] = if split == Train {
                &["glue/CoLA/train.tsv", "glue/CoLA/val.tsv"]
            } else {
                &["glue/CoLA/dev.tsv"]
            };
            let mut v = Vec::new();
            for f in files {
                let path = p(f);
                for (line, r) in tsv(&path, None, 4)? {
                    v.push(ex(&r[3], None, label_of(&["0", "1"], &r[1], &path, line)?));
                }
            }
            Ok(ds("cola", &["unacceptable", "acceptable"], v))
        }
        Task::Rte => {
            need_split("rte", split, &[Train, Dev])?;
            const HEADER: &[&str] = &["index", "sentence1", "sentence2", "label"];
            let files: &[(&str, Option<&[&str]>)] = if split == Train {
                &[
                    ("glue/RTE/train.tsv", Some(HEADER)),
                    ("glue/RTE/val.tsv", None),
                ]
            } else {
                &[("glue/RTE/dev.tsv", Some(HEADER))]
            };
            let labels = ["entailment", "not_entailment"];
            let mut v = Vec::new();
            for (f, header) in files {
                let path = p(f);
                for (line, r) in tsv(&path, *header, 4)? {
                    v.push(ex(
                        &r[1],
                        Some(&r[2]),
                        label_of(&labels, &r[3], &path, line)?,
                    ));
                }
            }
            Ok(ds("rte", &labels, v))
        }
        Task::Mrpc => {
            let f = match split {
                Train => "glue/MRPC/train.tsv",
                Dev => "glue/MRPC/dev.tsv",
                Test => "glue/MRPC/msr_paraphrase_test.txt",
            };
            let path = p(f);
            let mut v = Vec::new();
            for (line, r) in tsv(
                &path,
                Some(&["Quality", "#1 ID", "#2 ID", "#1 String", "#2 String"]),
                5,
            )? {
                v.push(ex(
                    &r[3],
                    Some(&r[4]),
                    label_of(&["0", "1"], &r[0], &path, line)?,
                ));
            }
            Ok(ds("mrpc", &["not_paraphrase", "paraphrase"], v))
        }
        Task::Amazon(domain) => {
            let f = match split {
                Train => "train.tsv",
                Dev => "dev.tsv",
                Test => "test-labeled.tsv",
            };
            let path = p(&format!("amazon/{domain}/{f}"));
            let recs = quoted_tsv(&path)?;
            match recs.first() {
                Some((_, h)) if h.len() == 2 && h[0] == "sentence" && h[1] == "label" => {}
                _ => {
                    return Err(format_err(
                        &path,
                        "line 1: expected the header sentence<TAB>label",
                    ))
                }
            }
            let mut v = Vec::new();
            for (line, r) in &recs[1..] {
                if r.len() != 2 {
                    return Err(format_err(
                        &path,
                        format!("line {line}: expected 2 fields, found {}", r.len()),
                    ));
                }
                v.push(ex(&r[0], None, label_of(&["0", "1"], &r[1], &path, *line)?));
            }
            Ok(ds(
                &format!("amazon:{domain}"),
                &["negative", "positive"],
                v,
            ))
        }
        Task::Trec => {
            need_split("trec", split, &[Train, Test])?;
            let path = p(if split == Train {
                "ood/TREC/train_5500.label"
            } else {
                "ood/TREC/TREC_10.label"
            });
            let labels = ["ABBR", "DESC", "ENTY", "HUM", "LOC", "NUM"];
            let mut v = Vec::new();
            for (i, l) in read_lines(&path)?.iter().enumerate() {
                if l.trim().is_empty() {
                    continue;
                }
                let (tag, q) = l.split_once(' ').ok_or_else(|| {
                    format_err(
                        &path,
                        format!("line {}: expected `COARSE:fine question`", i + 1),
                    )
                })?;
                let coarse = tag.split(':').next().unwrap_or("");
                v.push(ex(q, None, label_of(&labels, coarse, &path, i + 1)?));
            }
            Ok(ds("trec", &labels, v))
        }
        Task::Snli => {
            need_split("snli", split, &[Dev, Test])?;
            let s = if split == Dev { "dev" } else { "test" };
            let (p1, p2, pl) = (
                p(&format!("ood/SNLI/s1.{s}")),
                p(&format!("ood/SNLI/s2.{s}")),
                p(&format!("ood/SNLI/labels.{s}")),
            );
            let (a, b, l) = (read_lines(&p1)?, read_lines(&p2)?, read_lines(&pl)?);
            if a.len() != b.len() || a.len() != l.len() {
                return Err(format_err(
                    &pl,
                    format!(
                        "parallel files differ in length: s1 {}, s2 {}, labels {}",
                        a.len(),
                        b.len(),
                        l.len()
                    ),
                ));
            }
            let labels = ["entailment", "neutral", "contradiction"];
            let mut v = Vec::new();
            for i in 0..a.len() {
                v.push(ex(
                    &a[i],
                    Some(&b[i]),
                    label_of(&labels, l[i].trim(), &pl, i + 1)?,
                ));
            }
            Ok(ds("snli", &labels, v))
        }
        Task::AgNews => {
            need_split("agnews", split, &[Dev, Test])?;
            let path = p(if split == Dev {
                "ood/AGNews/dev.tsv"
            } else {
                "ood/AGNews/test.tsv"
            });
            let labels = ["World", "Sports", "Business", "Sci/Tech"];
            let mut v = Vec::new();
            for (line, r) in tsv(&path, None, 2)? {
                v.push(ex(&r[0], None, label_of(&labels, &r[1], &path, line)?));
            }
            Ok(ds("agnews", &labels, v))
        }
        Task::Sst5 => {
            let f = match split {
                Train => "extra/SST-5/sentiment-train",
                Dev => "extra/SST-5/sentiment-dev",
                Test => "extra/SST-5/sentiment-test",
            };
            let path = p(f);
            let labels = ["0", "1", "2", "3", "4"];
            let mut v = Vec::new();
            for (i, l) in read_lines(&path)?.iter().enumerate() {
                if l.trim().is_empty() {
                    continue;
                }
                let (lab, s) = l.split_once(' ').ok_or_else(|| {
                    format_err(&path, format!("line {}: expected `label sentence`", i + 1))
                })?;
                v.push(ex(s, None, label_of(&labels, lab, &path, i + 1)?));
            }
            Ok(ds(
                "sst5",
                &[
                    "very negative",
                    "negative",
                    "neutral",
                    "positive",
                    "very positive",
                ],
                v,
            ))
        }
        Task::Cr | Task::Mpqa | Task::Subj => {
            need_split("cr/mpqa/subj", split, &[Train])?;
            let (name, files, labels): (&str, [&str; 2], [&str; 2]) = match task {
                Task::Cr => (
                    "cr",
                    ["extra/CR/custrev.neg", "extra/CR/custrev.pos"],
                    ["negative", "positive"],
                ),
                Task::Mpqa => (
                    "mpqa",
                    ["extra/MPQA/mpqa.neg", "extra/MPQA/mpqa.pos"],
                    ["negative", "positive"],
                ),
                _ => (
                    "subj",
                    ["extra/SUBJ/subj.objective", "extra/SUBJ/subj.subjective"],
                    ["objective", "subjective"],
                ),
            };
            let mut v = Vec::new();
            for (label, f) in files.iter().enumerate() {
                // Blank lines are separators in these files, not examples.
                v.extend(
                    read_lines(&p(f))?
                        .iter()
                        .filter(|l| !l.trim().is_empty())
                        .map(|l| ex(l, None, label)),
                );
            }
            Ok(ds(name, &labels, v))
        }
    }
}

impl Dataset {
    /// Examples per label.
    pub fn class_counts(&self) -> Vec<usize> {
        let mut c = vec![0; self.labels.len()];
        self.examples.iter().for_each(|e| c[e.label] += 1);
        c
    }

    /// Deterministic Fisher–Yates shuffle driven by Philox(seed).
    pub fn shuffle(&mut self, seed: u64) {
        shuffle(&mut self.examples, seed);
    }

    /// The first `n` examples after a shuffle by `seed` (all if fewer).
    pub fn subsample(&self, n: usize, seed: u64) -> Dataset {
        let mut d = self.clone();
        d.shuffle(seed);
        d.examples.truncate(n);
        d
    }

    /// `k` examples of every class, chosen by `seed`, in shuffled order:
    /// the low-resource setting. A class with fewer than `k` examples is an
    /// error naming it: quietly taking fewer would run another experiment
    /// (an unbalanced, smaller set) than the one asked for.
    pub fn k_per_class(&self, k: usize, seed: u64) -> Result<Dataset> {
        if self.labels.is_empty() {
            return Err(param_err(
                "k_per_class",
                format!(
                    "k_per_class needs classes, and {} holds regression targets",
                    self.name
                ),
            ));
        }
        let mut have = vec![0usize; self.labels.len()];
        for e in &self.examples {
            have[e.label] += 1;
        }
        if let Some((c, n)) = have.iter().enumerate().find(|(_, n)| **n < k) {
            return Err(param_err(
                "k_per_class",
                format!(
                    "k_per_class = {k}, but class {:?} of {} has only {n} examples (the \
                     smallest class allows at most {})",
                    self.labels[c],
                    self.name,
                    have.iter().min().unwrap_or(&0)
                ),
            ));
        }
        let mut d = self.clone();
        d.shuffle(seed);
        let mut taken = vec![0; self.labels.len()];
        d.examples.retain(|e| {
            taken[e.label] += 1;
            taken[e.label] <= k
        });
        Ok(d)
    }
}

/// Fisher–Yates with Philox words: the same order on every machine.
pub fn shuffle<T>(v: &mut [T], seed: u64) {
    for i in (1..v.len()).rev() {
        let w = philox::group(seed, 0, i as u64);
        let r = ((u64::from(w[0]) << 32) | u64::from(w[1])) % (i as u64 + 1);
        v.swap(i, r as usize);
    }
}
