//! CIFAR-10 and CIFAR-100 as their authors distribute them, in either of the
//! two layouts torchvision and the binary release use:
//!
//! - the Python pickle batches (`cifar-10-batches-py/data_batch_{1..5}`,
//!   `test_batch`, `batches.meta`; `cifar-100-python/{train,test,meta}`), read
//!   with `serde-pickle` (no code runs: a numpy array's reconstruction is read
//!   as its state, `(version, shape, dtype, fortran, bytes)`);
//! - the binary batches (`cifar-10-batches-bin/data_batch_{1..5}.bin`,
//!   `test_batch.bin`, `batches.meta.txt`: records of 1 label byte + 3072
//!   pixels; `cifar-100-binary/{train,test}.bin`: coarse and fine label bytes +
//!   3072 pixels, `fine_label_names.txt`).
//!
//! `data.root` is the directory holding one of those folders, or the folder
//! itself. Images are 32×32 RGB, stored planar (1024 red, green, blue); each
//! sample reaches the pipeline as a binary PPM, which the image decoder reads
//! like any file. Labels are CIFAR-100's fine labels.

use super::{RawSample, Source};
use crate::DataError;
use serde_pickle::{DeOptions, HashableValue, Value};
use std::path::{Path, PathBuf};

const PIXELS: usize = 3 * 32 * 32;

/// Which CIFAR.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cifar {
    /// 10 classes.
    Ten,
    /// 100 (fine) classes.
    Hundred,
}

/// One split of a CIFAR dataset in memory (pixels planar, as stored).
pub struct CifarSource {
    pixels: Vec<u8>,
    labels: Vec<i64>,
    classes: Vec<String>,
    dir: PathBuf,
    fingerprint: u64,
}

fn err(path: &Path, what: impl std::fmt::Display) -> DataError {
    DataError::Format { path: path.to_path_buf(), message: what.to_string() }
}

impl Cifar {
    fn classes(self) -> usize {
        match self {
            Cifar::Ten => 10,
            Cifar::Hundred => 100,
        }
    }

    /// The folder names of the two layouts (pickle, binary).
    fn folders(self) -> [&'static str; 2] {
        match self {
            Cifar::Ten => ["cifar-10-batches-py", "cifar-10-batches-bin"],
            Cifar::Hundred => ["cifar-100-python", "cifar-100-binary"],
        }
    }

    /// (batch files, class-name file) of a split in each layout.
    fn files(self, train: bool, binary: bool) -> (Vec<String>, &'static str) {
        let batches: Vec<String> = match (self, train) {
            (Cifar::Ten, true) => (1..=5).map(|i| format!("data_batch_{i}")).collect(),
            (Cifar::Ten, false) => vec!["test_batch".into()],
            (Cifar::Hundred, true) => vec!["train".into()],
            (Cifar::Hundred, false) => vec!["test".into()],
        };
        match (self, binary) {
            (Cifar::Ten, false) => (batches, "batches.meta"),
            (Cifar::Hundred, false) => (batches, "meta"),
            (Cifar::Ten, true) => (batches.into_iter().map(|b| b + ".bin").collect(), "batches.meta.txt"),
            (Cifar::Hundred, true) => (batches.into_iter().map(|b| b + ".bin").collect(), "fine_label_names.txt"),
        }
    }
}

impl CifarSource {
    /// The training (`train`) or test split of `which` under `root`.
    pub fn open(root: &Path, which: Cifar, train: bool) -> Result<Self, DataError> {
        let candidates = [root.to_path_buf(), root.join(which.folders()[0]), root.join(which.folders()[1])];
        for dir in candidates {
            for binary in [false, true] {
                let (batches, _) = which.files(train, binary);
                if dir.join(&batches[0]).is_file() {
                    return Self::read(&dir, which, train, binary);
                }
            }
        }
        let (py, bin) = (which.files(train, false).0, which.files(train, true).0);
        let message = format!(
            "no CIFAR batches ({} or {}, directly or in {} / {})",
            py[0],
            bin[0],
            which.folders()[0],
            which.folders()[1]
        );
        Err(DataError::Format { path: root.to_path_buf(), message })
    }

    fn read(dir: &Path, which: Cifar, train: bool, binary: bool) -> Result<Self, DataError> {
        let (batches, names) = which.files(train, binary);
        let (mut pixels, mut labels) = (Vec::new(), Vec::new());
        for b in &batches {
            let path = dir.join(b);
            let bytes = std::fs::read(&path).map_err(|e| err(&path, e))?;
            let (p, l) = if binary { binary_batch(&path, &bytes, which)? } else { pickle_batch(&path, &bytes, which)? };
            pixels.extend(p);
            labels.extend(l);
        }
        let classes = class_names(&dir.join(names), which, binary)?;
        let label_bytes: Vec<u8> = labels.iter().map(|&l| l as u8).collect();
        let fingerprint = crate::fingerprint([pixels.as_slice(), label_bytes.as_slice()]);
        Ok(Self { pixels, labels, classes, dir: dir.to_path_buf(), fingerprint })
    }
}

/// Records of (label bytes, 3072 pixels).
fn binary_batch(path: &Path, bytes: &[u8], which: Cifar) -> Result<(Vec<u8>, Vec<i64>), DataError> {
    let head = if which == Cifar::Hundred { 2 } else { 1 };
    if bytes.is_empty() || bytes.len() % (head + PIXELS) != 0 {
        return Err(err(
            path,
            format!("{} bytes is not a whole number of {}-byte records", bytes.len(), head + PIXELS),
        ));
    }
    let (mut pixels, mut labels) = (Vec::with_capacity(bytes.len()), Vec::new());
    for (i, rec) in bytes.chunks_exact(head + PIXELS).enumerate() {
        let label = rec[head - 1] as usize;
        if label >= which.classes() {
            return Err(err(path, format!("record {i} has label {label}; there are {} classes", which.classes())));
        }
        labels.push(label as i64);
        pixels.extend_from_slice(&rec[head..]);
    }
    Ok((pixels, labels))
}

fn get<'a>(dict: &'a Value, key: &str) -> Option<&'a Value> {
    let Value::Dict(map) = dict else { return None };
    map.iter().find_map(|(k, v)| match k {
        HashableValue::Bytes(b) if b == key.as_bytes() => Some(v),
        HashableValue::String(s) if s == key => Some(v),
        _ => None,
    })
}

fn parse_pickle(path: &Path, bytes: &[u8]) -> Result<Value, DataError> {
    serde_pickle::value_from_slice(bytes, DeOptions::new().replace_unresolved_globals())
        .map_err(|e| err(path, format!("not a pickle this reader understands: {e}")))
}

/// A batch's `data` (a numpy uint8 array `[n, 3072]`) and labels.
pub(super) fn pickle_batch(path: &Path, bytes: &[u8], which: Cifar) -> Result<(Vec<u8>, Vec<i64>), DataError> {
    let v = parse_pickle(path, bytes)?;
    let key = if which == Cifar::Hundred { "fine_labels" } else { "labels" };
    let labels: Vec<i64> = match get(&v, key) {
        Some(Value::List(l)) => l.iter().map(|x| if let Value::I64(i) = x { *i } else { -1 }).collect(),
        _ => return Err(err(path, format!("no `{key}` list"))),
    };
    let array = get(&v, "data").ok_or_else(|| err(path, "no `data` array"))?;
    // numpy's ndarray state: (version, shape, dtype, is_fortran, raw bytes).
    let Value::Tuple(state) = array else { return Err(err(path, "`data` is not a numpy array")) };
    let raw = state.iter().rev().find_map(|x| if let Value::Bytes(b) = x { Some(b) } else { None });
    let raw = raw.ok_or_else(|| err(path, "`data` holds no raw bytes"))?;
    if raw.len() != labels.len() * PIXELS {
        return Err(err(
            path,
            format!("`data` has {} bytes for {} labels of {PIXELS} pixels", raw.len(), labels.len()),
        ));
    }
    if let Some((i, l)) = labels.iter().enumerate().find(|(_, &l)| l < 0 || l as usize >= which.classes()) {
        return Err(err(path, format!("label {i} is {l}; there are {} classes", which.classes())));
    }
    Ok((raw.clone(), labels))
}

fn class_names(path: &Path, which: Cifar, binary: bool) -> Result<Vec<String>, DataError> {
    let default = || (0..which.classes()).map(|i| format!("class {i}")).collect();
    let Ok(bytes) = std::fs::read(path) else { return Ok(default()) };
    let names: Vec<String> = if binary {
        String::from_utf8_lossy(&bytes).lines().map(str::trim).filter(|l| !l.is_empty()).map(String::from).collect()
    } else {
        let key = if which == Cifar::Hundred { "fine_label_names" } else { "label_names" };
        match get(&parse_pickle(path, &bytes)?, key) {
            Some(Value::List(l)) => l
                .iter()
                .map(|x| match x {
                    Value::Bytes(b) => String::from_utf8_lossy(b).into_owned(),
                    Value::String(s) => s.clone(),
                    other => format!("{other:?}"),
                })
                .collect(),
            _ => return Ok(default()),
        }
    };
    if names.len() != which.classes() {
        return Err(err(path, format!("{} class names; expected {}", names.len(), which.classes())));
    }
    Ok(names)
}

impl Source for CifarSource {
    fn len(&self) -> usize {
        self.labels.len()
    }

    /// The image as a binary PPM (32×32, interleaved RGB).
    fn fetch(&self, i: usize) -> Result<RawSample, String> {
        let planes = self.pixels.get(i * PIXELS..(i + 1) * PIXELS).ok_or_else(|| format!("no image {i}"))?;
        let mut bytes = b"P6\n32 32\n255\n".to_vec();
        bytes.extend((0..1024).flat_map(|p| [planes[p], planes[1024 + p], planes[2048 + p]]));
        Ok(RawSample { bytes, label: self.labels[i], caption: None })
    }

    fn locate(&self, i: usize) -> String {
        format!("{}#{i}", self.dir.display())
    }

    fn class_names(&self) -> Vec<String> {
        self.classes.clone()
    }

    fn fingerprint(&self) -> u64 {
        self.fingerprint
    }

    fn first_unlabelled(&self) -> Option<usize> {
        None
    }
}
