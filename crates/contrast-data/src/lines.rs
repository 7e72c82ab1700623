//! Sentences, one per line (`data.dataset: lines`), for the text-only methods.
//!
//! A line is `text`, `label<TAB>text` or `label<TAB>group<TAB>text`; one file
//! keeps one form. Blank lines are skipped. Labels are names, numbered in
//! sorted order (the class names kNN and the linear probe report against).
//! Consecutive lines with the same group are adjacent sentences of one text
//! (a fortune's quote): Quick-Thought's pairs, and the pairs alignment and
//! uniformity are measured on. A file with no sentence, a line with an empty
//! text, a mix of forms or invalid UTF-8 is an error naming the file and line.

use crate::DataError;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// The largest corpus file read (it is read whole): 4 GiB.
pub const MAX_CORPUS_BYTES: u64 = 4 << 30;

/// A corpus of sentences.
#[derive(Debug, Clone)]
pub struct Corpus {
    /// The file it came from.
    pub path: PathBuf,
    /// Each sentence.
    pub texts: Vec<String>,
    /// Each sentence's class (−1 where the file has no labels).
    pub labels: Vec<i64>,
    /// Class names by label (sorted; empty without labels).
    pub class_names: Vec<String>,
    /// Each sentence's group number (its own line number without groups).
    pub groups: Vec<u32>,
    /// Sentences followed by one of the same group (ascending): the first sentence of each adjacent pair.
    pub anchors: Vec<usize>,
    /// Whether the file has a group column.
    pub grouped: bool,
}

impl Corpus {
    /// Read a corpus file.
    pub fn load(path: &Path) -> Result<Self, DataError> {
        let io = |source| DataError::Io { path: path.to_path_buf(), source };
        let format = |message: String| DataError::Format { path: path.to_path_buf(), message };
        let size = std::fs::metadata(path).map_err(io)?.len();
        if size > MAX_CORPUS_BYTES {
            return Err(format(format!("{size} bytes is more than the {MAX_CORPUS_BYTES} a corpus may have")));
        }
        let bytes = std::fs::read(path).map_err(io)?;
        let text = std::str::from_utf8(&bytes).map_err(|e| {
            let line = bytes[..e.valid_up_to()].iter().filter(|&&b| b == b'\n').count() + 1;
            format(format!("line {line} is not UTF-8"))
        })?;
        Self::parse(path, text)
    }

    /// A corpus from the text of a file named `path`.
    pub fn parse(path: &Path, text: &str) -> Result<Self, DataError> {
        let format = |message: String| DataError::Format { path: path.to_path_buf(), message };
        let mut fields: Option<usize> = None;
        let mut rows: Vec<(Option<&str>, Option<&str>, &str)> = Vec::new();
        for (n, line) in text.lines().enumerate() {
            let line = line.trim_end_matches('\r');
            if line.trim().is_empty() {
                continue;
            }
            let parts: Vec<&str> = line.splitn(3, '\t').collect();
            let k = *fields.get_or_insert(parts.len());
            if parts.len() != k {
                return Err(format(format!(
                    "line {} has {} tab-separated fields where the file's first sentence has {k} \
                     (one form per file: text, label<TAB>text or label<TAB>group<TAB>text)",
                    n + 1,
                    parts.len()
                )));
            }
            let row = match parts.as_slice() {
                [t] => (None, None, *t),
                [l, t] => (Some(*l), None, *t),
                [l, g, t] => (Some(*l), Some(*g), *t),
                _ => unreachable!("splitn(3)"),
            };
            if row.2.trim().is_empty() {
                return Err(format(format!("line {} has an empty sentence", n + 1)));
            }
            rows.push(row);
        }
        if rows.is_empty() {
            return Err(format(
                "holds no sentence (one per line: text, label<TAB>text or label<TAB>group<TAB>text)".into(),
            ));
        }
        let names: BTreeMap<&str, i64> = {
            let mut m: BTreeMap<&str, i64> = rows.iter().filter_map(|r| r.0).map(|l| (l, 0)).collect();
            m.values_mut().enumerate().for_each(|(i, v)| *v = i as i64);
            m
        };
        let mut group_ids: BTreeMap<&str, u32> = BTreeMap::new();
        let mut groups = Vec::with_capacity(rows.len());
        for (i, r) in rows.iter().enumerate() {
            groups.push(match r.1 {
                Some(g) => {
                    let next = group_ids.len() as u32;
                    *group_ids.entry(g).or_insert(next)
                }
                None => i as u32,
            });
        }
        let grouped = rows[0].1.is_some();
        let anchors = (0..rows.len().saturating_sub(1)).filter(|&i| grouped && groups[i] == groups[i + 1]).collect();
        Ok(Self {
            path: path.to_path_buf(),
            texts: rows.iter().map(|r| r.2.trim().to_string()).collect(),
            labels: rows.iter().map(|r| r.0.map(|l| names[l]).unwrap_or(-1)).collect(),
            class_names: names.keys().map(|s| s.to_string()).collect(),
            groups,
            anchors,
            grouped,
        })
    }

    /// Sentences.
    pub fn len(&self) -> usize {
        self.texts.len()
    }

    /// True without sentences (never, once loaded).
    pub fn is_empty(&self) -> bool {
        self.texts.is_empty()
    }

    /// What ranks must agree on: every sentence, label and group.
    pub fn fingerprint(&self) -> u64 {
        let labels: Vec<u8> = self.labels.iter().flat_map(|l| l.to_le_bytes()).collect();
        let groups: Vec<u8> = self.groups.iter().flat_map(|g| g.to_le_bytes()).collect();
        crate::fingerprint(self.texts.iter().map(|t| t.as_bytes()).chain([&labels[..], &groups[..]]))
    }
}
