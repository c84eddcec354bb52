//! A user's own data: one file per split in CSV, TSV or JSON Lines, with
//! the columns `run_glue.py` reads by default.
//!
//! - **Format** from the extension: `.csv` (comma), `.tsv` / `.tab` (tab),
//!   `.jsonl` / `.json` (one JSON object per line). CSV and TSV follow RFC
//!   4180 (quoted fields with embedded separators, newlines and `""`
//!   quotes), with a header line naming the columns; CRLF line ends and a
//!   UTF-8 byte-order mark are accepted.
//! - **Columns**: the text is `text_column`, else `sentence1` (paired with
//!   `sentence2` when the file has it), else the first column that is not
//!   the label; `text_pair_column` names a second text; the label is
//!   `label_column` (default `label`).
//! - **Labels** are taken as written (strings, or JSON numbers and
//!   booleans in their JSON spelling). The label set is `labels` when
//!   given, else the training file's distinct labels sorted: numerically
//!   when every one is an integer (so `2` comes before `10`), else as text.
//!   A regression head reads the label as a real number instead.
//! - **Decoding**: UTF-8; a field (CSV, TSV) or line (JSON Lines) that is
//!   not valid UTF-8 is read as Latin-1, as the built-in readers do.
//!
//! Every error names the file and, where there is one, the line.
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::data::{decode_line, Dataset, Example, Split};
use crate::error::{format_err, io_err, param_err, Result};

/// Where a run's own data is and which columns it reads.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct DataFiles {
    /// The training file (also the source of the default label set).
    pub train: PathBuf,
    /// The dev split's file.
    pub dev: Option<PathBuf>,
    /// The test split's file.
    pub test: Option<PathBuf>,
    /// The text column (default: `sentence1`, else the first non-label one).
    pub text_column: Option<String>,
    /// A second text column for pairs (default: `sentence2` beside `sentence1`).
    pub text_pair_column: Option<String>,
    /// The label column (default: `label`).
    pub label_column: Option<String>,
    /// The label set, in index order (default: the training file's).
    pub labels: Option<Vec<String>>,
    /// Read labels as real-valued regression targets.
    pub regression: bool,
}

/// A file's rows as text: the header's column names and, per row, the line
/// it starts on and one value per column.
struct Table {
    columns: Vec<String>,
    rows: Vec<(usize, Vec<Cell>)>,
}

enum Cell {
    Text(String),
    /// JSON null, or a key the object lacks.
    Missing,
    /// A JSON list or object ("list" or "object").
    Nested(&'static str),
}

#[derive(Clone, Copy)]
enum Format {
    Delimited(u8),
    JsonLines,
}

fn format_of(path: &Path) -> Result<Format> {
    let ext = path
        .extension()
        .and_then(|e| e.to_str())
        .map(str::to_ascii_lowercase);
    match ext.as_deref() {
        Some("csv") => Ok(Format::Delimited(b',')),
        Some("tsv") | Some("tab") => Ok(Format::Delimited(b'\t')),
        Some("jsonl") | Some("json") => Ok(Format::JsonLines),
        _ => Err(format_err(
            path,
            "unknown data format: the file name must end in .csv, .tsv (or .tab) or .jsonl \
             (or .json, one object per line)",
        )),
    }
}

fn read_table(path: &Path) -> Result<Table> {
    let table = match format_of(path)? {
        Format::Delimited(sep) => read_delimited(path, sep)?,
        Format::JsonLines => read_json_lines(path)?,
    };
    if table.rows.is_empty() {
        return Err(format_err(
            path,
            if table.columns.is_empty() {
                "is empty"
            } else {
                "holds no examples after its header line"
            },
        ));
    }
    Ok(table)
}

fn read_delimited(path: &Path, sep: u8) -> Result<Table> {
    let file = std::fs::File::open(path).map_err(|e| io_err(path, e))?;
    let mut rd = csv::ReaderBuilder::new()
        .delimiter(sep)
        .has_headers(true)
        .from_reader(std::io::BufReader::new(file));
    let csv_err = |e: csv::Error| {
        let line = e.position().map(|p| p.line());
        let msg = match e.kind() {
            csv::ErrorKind::UnequalLengths {
                expected_len, len, ..
            } => format!(
                "expected {expected_len} fields as in the header, found {len}{}",
                if sep == b',' {
                    " (a text with commas must be quoted: \"like, this\")"
                } else {
                    ""
                }
            ),
            csv::ErrorKind::Io(io) => return io_err(path, io),
            _ => e.to_string(),
        };
        format_err(
            path,
            match line {
                Some(l) => format!("line {l}: {msg}"),
                None => msg,
            },
        )
    };
    let columns: Vec<String> = rd
        .byte_headers()
        .map_err(csv_err)?
        .iter()
        .map(|f| decode_line(f).trim().to_string())
        .collect();
    let columns = match columns.as_slice() {
        [only] if only.is_empty() => vec![],
        _ => columns,
    };
    let mut rows = Vec::new();
    let mut rec = csv::ByteRecord::new();
    while rd.read_byte_record(&mut rec).map_err(csv_err)? {
        let line = rec.position().map_or(0, |p| p.line() as usize);
        rows.push((
            line,
            rec.iter().map(|f| Cell::Text(decode_line(f))).collect(),
        ));
    }
    Ok(Table { columns, rows })
}

fn read_json_lines(path: &Path) -> Result<Table> {
    let bytes = std::fs::read(path).map_err(|e| io_err(path, e))?;
    let bytes = bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(&bytes);
    let mut columns: Vec<String> = vec![];
    let mut objects = vec![];
    for (i, raw) in bytes.split(|&b| b == b'\n').enumerate() {
        let text = decode_line(raw);
        let text = text.trim();
        if text.is_empty() {
            continue;
        }
        let at = |m: String| format_err(path, format!("line {}: {m}", i + 1));
        let Ordered(obj) = serde_json::from_str(text).map_err(|e| {
            at(if text.starts_with('{') {
                e.to_string()
            } else {
                format!("expected a JSON object per line ({e})")
            })
        })?;
        for (k, _) in &obj {
            if !columns.contains(k) {
                columns.push(k.clone());
            }
        }
        objects.push((i + 1, obj));
    }
    let mut rows = Vec::with_capacity(objects.len());
    for (line, obj) in objects {
        let mut row = Vec::with_capacity(columns.len());
        for c in &columns {
            use serde_json::Value as J;
            row.push(match obj.iter().find(|(k, _)| k == c).map(|(_, v)| v) {
                None | Some(J::Null) => Cell::Missing,
                Some(J::String(s)) => Cell::Text(s.clone()),
                Some(v @ (J::Number(_) | J::Bool(_))) => Cell::Text(v.to_string()),
                Some(J::Array(_)) => Cell::Nested("list"),
                Some(J::Object(_)) => Cell::Nested("object"),
            });
        }
        rows.push((line, row));
    }
    Ok(Table { columns, rows })
}

/// A JSON object's entries in the order the line writes them (serde_json's
/// own map sorts its keys), so that "the first column" means the first
/// written.
struct Ordered(Vec<(String, serde_json::Value)>);

impl<'de> Deserialize<'de> for Ordered {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = Ordered;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut m: A,
            ) -> std::result::Result<Ordered, A::Error> {
                let mut v = Vec::new();
                while let Some(entry) = m.next_entry()? {
                    v.push(entry);
                }
                Ok(Ordered(v))
            }
        }
        d.deserialize_map(V)
    }
}

/// The columns a file's examples come from.
struct Columns {
    text: usize,
    pair: Option<usize>,
    label: usize,
}

impl DataFiles {
    /// The file of `split` (an error naming the missing setting).
    pub fn path(&self, split: Split) -> Result<&Path> {
        match split {
            Split::Train => Ok(&self.train),
            Split::Dev => self.dev.as_deref().ok_or_else(|| {
                param_err(
                    "data",
                    "the evaluation split is dev, but no dev_file is given (--dev-file, or \
                     eval_split = \"test\" with a test_file)",
                )
            }),
            Split::Test => self.test.as_deref().ok_or_else(|| {
                param_err(
                    "data",
                    "the evaluation split is test, but no test_file is given (--test-file)",
                )
            }),
        }
    }

    fn columns(&self, path: &Path, t: &Table) -> Result<Columns> {
        let find = |name: &str, what: &str| {
            t.columns.iter().position(|c| c == name).ok_or_else(|| {
                format_err(
                    path,
                    format!(
                        "has no {what} column {name:?} (columns found: {})",
                        quoted_list(&t.columns)
                    ),
                )
            })
        };
        let label = find(self.label_column.as_deref().unwrap_or("label"), "label")?;
        let (text, pair) = match (&self.text_column, &self.text_pair_column) {
            (Some(c), p) => (find(c, "text")?, p.as_deref()),
            (None, p) if t.columns.iter().any(|c| c == "sentence1") => (
                find("sentence1", "text")?,
                p.as_deref().or_else(|| {
                    t.columns
                        .iter()
                        .any(|c| c == "sentence2")
                        .then_some("sentence2")
                }),
            ),
            (None, p) => {
                let first = (0..t.columns.len()).find(|&i| i != label).ok_or_else(|| {
                    format_err(
                        path,
                        format!(
                            "has no text column: its only column is the label {:?}",
                            t.columns[label]
                        ),
                    )
                })?;
                (first, p.as_deref())
            }
        };
        let pair = pair.map(|p| find(p, "text pair")).transpose()?;
        Ok(Columns { text, pair, label })
    }

    /// The label set: `labels`, or the training file's labels sorted.
    /// `train`: the training file's table, when the caller has read it.
    fn label_set(&self, train: Option<&Table>) -> Result<Vec<String>> {
        if let Some(l) = &self.labels {
            return Ok(l.clone());
        }
        let read;
        let t = match train {
            Some(t) => t,
            None => {
                read = read_table(&self.train)?;
                &read
            }
        };
        let c = self.columns(&self.train, t)?;
        let mut set = BTreeSet::new();
        for (line, row) in &t.rows {
            set.insert(cell(&self.train, t, *line, row, c.label, "label")?.to_string());
        }
        let mut v: Vec<String> = set.into_iter().collect();
        if v.iter().all(|l| l.parse::<i64>().is_ok()) {
            v.sort_by_key(|l| l.parse::<i64>().unwrap_or(0));
        }
        Ok(v)
    }

    /// Checks every setting that does not need the files.
    pub fn validate(&self) -> Result<()> {
        if let Some(l) = &self.labels {
            if self.regression {
                return Err(param_err(
                    "labels",
                    "a regression head reads real-valued targets: labels lists classes",
                ));
            }
            if l.len() < 2 {
                return Err(param_err(
                    "labels",
                    format!("a classifier needs at least 2 labels, got {l:?}"),
                ));
            }
            if let Some(d) = l.iter().enumerate().find(|(i, x)| l[..*i].contains(x)) {
                return Err(param_err(
                    "labels",
                    format!("label {:?} is listed twice in {l:?}", d.1),
                ));
            }
        }
        for (what, c) in [
            ("text_column", &self.text_column),
            ("text_pair_column", &self.text_pair_column),
            ("label_column", &self.label_column),
        ] {
            if c.as_deref().is_some_and(|c| c.trim().is_empty()) {
                return Err(param_err("data", format!("{what} is empty")));
            }
        }
        Ok(())
    }

    /// Reads `split`'s file into a dataset named `name`.
    pub fn load(&self, split: Split, name: &str) -> Result<Dataset> {
        self.read(split, name, None)
    }

    /// Reads `split`'s file against `train_labels`, the training set's
    /// label set as [`DataFiles::load`] found it (or a checkpoint
    /// recorded it), without reading the training file again.
    pub fn load_against(
        &self,
        split: Split,
        name: &str,
        train_labels: &[String],
    ) -> Result<Dataset> {
        self.read(split, name, Some(train_labels))
    }

    fn read(&self, split: Split, name: &str, train_labels: Option<&[String]>) -> Result<Dataset> {
        self.validate()?;
        let path = self.path(split)?;
        let t = read_table(path)?;
        let labels = if self.regression {
            vec![]
        } else {
            // Configured labels win (and errors say so); else the training
            // set's, as given or read.
            let l = match train_labels {
                Some(l) if self.labels.is_none() => l.to_vec(),
                _ => self.label_set((split == Split::Train).then_some(&t))?,
            };
            if l.len() < 2 {
                return Err(format_err(
                    &self.train,
                    format!(
                        "holds only the label {l:?}: a classifier needs at least two (or \
                         use --regression for real-valued targets)"
                    ),
                ));
            }
            l
        };
        let c = self.columns(path, &t)?;
        let mut examples = Vec::with_capacity(t.rows.len());
        for (line, row) in &t.rows {
            let raw = cell(path, &t, *line, row, c.label, "label")?;
            let (label, value) = if self.regression {
                let v: f64 = raw
                    .parse()
                    .ok()
                    .filter(|v: &f64| v.is_finite())
                    .ok_or_else(|| {
                        format_err(
                            path,
                            format!(
                            "line {line}: the regression target {raw:?} in column {:?} is not a \
                             finite number",
                            t.columns[c.label]
                        ),
                        )
                    })?;
                (0, v)
            } else {
                let i = labels.iter().position(|l| l == raw).ok_or_else(|| {
                    format_err(
                        path,
                        format!(
                            "line {line}: label {raw:?} is not among the {} labels ({})",
                            if self.labels.is_some() {
                                "configured"
                            } else {
                                "training file's"
                            },
                            quoted_list(&labels)
                        ),
                    )
                })?;
                (i, i as f64)
            };
            let text = cell(path, &t, *line, row, c.text, "text")?;
            let pair = c
                .pair
                .map(|p| cell(path, &t, *line, row, p, "text pair"))
                .transpose()?;
            examples.push(Example {
                text: text.to_string(),
                pair: pair.map(str::to_string),
                label,
                value,
                ..Default::default()
            });
        }
        Ok(Dataset {
            name: name.to_string(),
            labels,
            examples,
        })
    }
}

/// A row's trimmed value in column `col`; an error at `path:line` when it
/// is missing or empty.
fn cell<'a>(
    path: &Path,
    t: &Table,
    line: usize,
    row: &'a [Cell],
    col: usize,
    what: &str,
) -> Result<&'a str> {
    let at = |m: &str| {
        format_err(
            path,
            format!("line {line}: the {what} column {:?} {m}", t.columns[col]),
        )
    };
    match row.get(col) {
        Some(Cell::Text(v)) if !v.trim().is_empty() => Ok(v.trim()),
        Some(Cell::Nested(kind)) => Err(at(&format!(
            "holds a JSON {kind}; expected a string or a number"
        ))),
        _ => Err(at("is empty or missing")),
    }
}

fn quoted_list(v: &[String]) -> String {
    v.iter()
        .map(|c| format!("{c:?}"))
        .collect::<Vec<_>>()
        .join(", ")
}
