//! The formats users bring, addressed by global sample index (so docs/design.md
//! invariant 2 holds whatever the ranks and workers): image folders, CSV/TSV of
//! image path + caption (open_clip's layout), and WebDataset tar shards with a
//! member index cached beside each shard.

use crate::DataError;
use std::io::Read;
use std::path::{Path, PathBuf};

/// One undecoded sample.
#[derive(Debug, Clone)]
pub struct RawSample {
    /// Encoded image bytes (JPEG, PNG or WebP).
    pub bytes: Vec<u8>,
    /// Class label, or −1 when the format has none.
    pub label: i64,
    /// Caption, when the format has one.
    pub caption: Option<String>,
}

/// The form of [`Source::fingerprint`]: 1 hashed absolute paths (names only), 2
/// hashes paths relative to the root with sizes. Checkpoints record it.
pub const FINGERPRINT_VERSION: u32 = 2;

/// A dataset of encoded images addressed by index.
pub trait Source: Send + Sync {
    /// Number of samples.
    fn len(&self) -> usize;
    /// True when empty.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Read sample `i` (decoding happens later). Errors name the file.
    fn fetch(&self, i: usize) -> Result<RawSample, String>;
    /// Where sample `i` lives, for logs.
    fn locate(&self, i: usize) -> String;
    /// Class names by label (empty when the format has none).
    fn class_names(&self) -> Vec<String> {
        Vec::new()
    }
    /// A fingerprint of what the dataset holds ([`FINGERPRINT_VERSION`] 2): each
    /// file's path relative to the dataset's root and its size (for shards, each
    /// member's name, offset and size; for IDX and CIFAR, the decoded content).
    /// The same files staged at another path fingerprint alike. Ranks gather it
    /// before step 1, and a resume compares it with the checkpoint's.
    fn fingerprint(&self) -> u64;
    /// The first sample whose label is unknown (−1), if any: supervised losses
    /// refuse such data before training.
    fn first_unlabelled(&self) -> Option<usize>;
    /// The caption of sample `i`, if it has one (retrieval evaluation).
    fn caption(&self, i: usize) -> Option<String> {
        self.fetch(i).ok().and_then(|s| s.caption)
    }
}

/// The last `parts` components of `p` (`class/file.jpg`): what a fingerprint
/// records, so that the same files staged under another root fingerprint alike.
pub(crate) fn relative_name(p: &Path, parts: usize) -> String {
    let names: Vec<_> = p.components().rev().take(parts).collect();
    names.iter().rev().map(|c| c.as_os_str().to_string_lossy()).collect::<Vec<_>>().join("/")
}

/// The size of a file (following links), or `missing`, for fingerprints.
pub(crate) fn file_size(p: &Path) -> String {
    std::fs::metadata(p).map_or_else(|_| "missing".into(), |m| m.len().to_string())
}

const IMAGE_EXTS: [&str; 4] = ["jpg", "jpeg", "png", "webp"];

fn is_image(p: &Path) -> bool {
    p.extension().and_then(|e| e.to_str()).is_some_and(|e| IMAGE_EXTS.contains(&e.to_ascii_lowercase().as_str()))
}

fn io_err(path: &Path) -> impl Fn(std::io::Error) -> DataError + '_ {
    move |source| DataError::Io { path: path.to_path_buf(), source }
}

/// `root/<class>/<image>`; classes sorted by name, images sorted within a class.
#[derive(Debug)]
pub struct ImageFolder {
    files: Vec<(PathBuf, i64)>,
    classes: Vec<String>,
}

impl ImageFolder {
    /// Scan `root`.
    pub fn open(root: &Path) -> Result<Self, DataError> {
        let mut classes: Vec<PathBuf> = std::fs::read_dir(root)
            .map_err(io_err(root))?
            .filter_map(|e| e.ok())
            .map(|e| e.path())
            .filter(|p| p.is_dir())
            .collect();
        classes.sort();
        let mut files = Vec::new();
        for (label, dir) in classes.iter().enumerate() {
            let mut imgs: Vec<PathBuf> = std::fs::read_dir(dir)
                .map_err(io_err(dir))?
                .filter_map(|e| e.ok())
                .map(|e| e.path())
                .filter(|p| is_image(p))
                .collect();
            imgs.sort();
            files.extend(imgs.into_iter().map(|p| (p, label as i64)));
        }
        if files.is_empty() {
            return Err(DataError::Format {
                path: root.into(),
                message: "no images found: expected root/<class>/<image>.{jpg,jpeg,png,webp}".into(),
            });
        }
        let classes = classes.iter().map(|p| p.file_name().unwrap().to_string_lossy().into_owned()).collect();
        Ok(Self { files, classes })
    }
}

impl Source for ImageFolder {
    fn len(&self) -> usize {
        self.files.len()
    }
    fn fetch(&self, i: usize) -> Result<RawSample, String> {
        let (p, label) = &self.files[i];
        let bytes = crate::limits::read_image_file(p)?;
        Ok(RawSample { bytes, label: *label, caption: None })
    }
    fn locate(&self, i: usize) -> String {
        self.files[i].0.display().to_string()
    }
    fn class_names(&self) -> Vec<String> {
        self.classes.clone()
    }
    fn caption(&self, _i: usize) -> Option<String> {
        None
    }
    fn fingerprint(&self) -> u64 {
        // Relative to the root (the class directory and the file name) with the size.
        let names: Vec<String> =
            self.files.iter().map(|(p, l)| format!("{l}\t{}\t{}", relative_name(p, 2), file_size(p))).collect();
        crate::fingerprint(names.iter().map(|n| n.as_bytes()))
    }
    fn first_unlabelled(&self) -> Option<usize> {
        None
    }
}

/// A CSV/TSV file of image path and caption columns (open_clip's
/// `--csv-img-key`, `--csv-caption-key`, `--csv-separator`); relative paths are
/// relative to the file's directory.
#[derive(Debug)]
pub struct CsvSource {
    rows: Vec<(PathBuf, String)>,
    /// The CSV file's directory, which relative paths are relative to.
    base: PathBuf,
}

impl CsvSource {
    /// Read `path` with the given column names and separator (None: detect it
    /// from the header, see [`detect_separator`]).
    pub fn open(path: &Path, img_key: &str, caption_key: &str, separator: Option<u8>) -> Result<Self, DataError> {
        let bad = |message: String| DataError::Format { path: path.into(), message };
        let separator = match separator {
            Some(s) => s,
            None => detect_separator(path, &[img_key, caption_key])?,
        };
        let mut reader =
            csv::ReaderBuilder::new().delimiter(separator).from_path(path).map_err(|e| bad(e.to_string()))?;
        let headers = reader.headers().map_err(|e| bad(e.to_string()))?.clone();
        let col = |key: &str| {
            headers.iter().position(|h| h == key).ok_or_else(|| {
                bad(format!(
                    "no column `{key}` (columns: {:?}) reading with separator {:?}: set data.csv_separator \
                     (or `auto`) and data.csv_img_key / data.csv_caption_key",
                    headers.iter().collect::<Vec<_>>(),
                    separator as char
                ))
            })
        };
        let (ic, cc) = (col(img_key)?, col(caption_key)?);
        let base = path.parent().unwrap_or(Path::new("."));
        let mut rows = Vec::new();
        for (line, rec) in reader.records().enumerate() {
            let rec = rec.map_err(|e| bad(format!("row {}: {e}", line + 2)))?;
            let (img, cap) = (rec.get(ic).unwrap_or(""), rec.get(cc).unwrap_or(""));
            rows.push((base.join(img), cap.to_string()));
        }
        if rows.is_empty() {
            return Err(bad("no rows".into()));
        }
        Ok(Self { rows, base: base.to_path_buf() })
    }
}

impl Source for CsvSource {
    fn len(&self) -> usize {
        self.rows.len()
    }
    fn fetch(&self, i: usize) -> Result<RawSample, String> {
        let (p, cap) = &self.rows[i];
        let bytes = crate::limits::read_image_file(p)?;
        Ok(RawSample { bytes, label: -1, caption: Some(cap.clone()) })
    }
    fn locate(&self, i: usize) -> String {
        self.rows[i].0.display().to_string()
    }
    fn fingerprint(&self) -> u64 {
        // Paths as the file names them relative to its directory, each with its size and caption.
        let rows: Vec<String> = self
            .rows
            .iter()
            .map(|(p, c)| {
                let rel = p.strip_prefix(&self.base).unwrap_or(p);
                format!("{}\t{}\t{c}", rel.display(), file_size(p))
            })
            .collect();
        crate::fingerprint(rows.iter().map(|r| r.as_bytes()))
    }
    fn first_unlabelled(&self) -> Option<usize> {
        Some(0)
    }
    fn caption(&self, i: usize) -> Option<String> {
        Some(self.rows[i].1.clone())
    }
}

/// The most shards a pattern may expand to.
pub const MAX_SHARDS: u64 = 1 << 20;

/// Separators `auto` tries, in order.
pub const SEPARATORS: [u8; 4] = [b'\t', b',', b';', b'|'];

/// The separator of a CSV/TSV whose header line holds both `keys`: the first of
/// [`SEPARATORS`] that splits it into columns including them. An error names
/// the file, the header and the keys when none does.
pub fn detect_separator(path: &Path, keys: &[&str]) -> Result<u8, DataError> {
    use std::io::BufRead;
    let file = std::fs::File::open(path).map_err(io_err(path))?;
    let mut header = String::new();
    // A header is one short line: read at most 64 KiB of it.
    std::io::BufReader::new(file).take(1 << 16).read_line(&mut header).map_err(io_err(path))?;
    let header = header.trim_end_matches(['\n', '\r']).trim_start_matches('\u{feff}');
    SEPARATORS
        .into_iter()
        .find(|&sep| {
            let cols: Vec<&str> = header.split(sep as char).map(|c| c.trim_matches('"')).collect();
            keys.iter().all(|k| cols.contains(k))
        })
        .ok_or_else(|| DataError::Format {
            path: path.into(),
            message: format!(
                "no separator of tab, comma, semicolon or `|` splits the header {:?} into columns with {keys:?}: \
                 set data.csv_img_key and data.csv_caption_key to its columns (and data.csv_separator)",
                header.chars().take(200).collect::<String>()
            ),
        })
}

/// Expand a shard spec as WebDataset and open_clip write them (the
/// `braceexpand` convention): `{a..b}` numeric ranges (zero-padded to the
/// width of `a`), `{x,y,z}` alternatives, either nested inside the other
/// (`{a,b{0..2}}`), and several specs joined by `::`, expanded in order.
/// More than [`MAX_SHARDS`] names, an unclosed or empty brace, or a brace
/// that is neither form is an error naming the spec.
pub fn expand_braces(pattern: &str) -> Result<Vec<String>, String> {
    let mut out = Vec::new();
    for spec in pattern.split("::") {
        let names = expand_one(spec).map_err(|e| format!("{e} in `{spec}`"))?;
        if out.len() + names.len() > MAX_SHARDS as usize {
            return Err(format!("`{pattern}` names more than {MAX_SHARDS} shards"));
        }
        out.extend(names);
    }
    Ok(out)
}

/// Braces nested deeper than this in a shard spec are refused (the expansion recurses).
const MAX_NESTING: usize = 32;

/// The byte offset of the `}` that closes the `{` at `open`, and the top-level commas between them.
fn closing_brace(s: &str, open: usize) -> Result<(usize, Vec<usize>), String> {
    let (mut depth, mut commas) = (0usize, Vec::new());
    for (i, c) in s[open..].char_indices() {
        match c {
            '{' if depth == MAX_NESTING => return Err(format!("braces nested deeper than {MAX_NESTING}")),
            '{' => depth += 1,
            '}' => {
                depth -= 1;
                if depth == 0 {
                    return Ok((open + i, commas));
                }
            }
            ',' if depth == 1 => commas.push(open + i),
            _ => {}
        }
    }
    Err("unclosed brace".into())
}

/// One spec (no `::`), expanded left to right.
fn expand_one(spec: &str) -> Result<Vec<String>, String> {
    let Some(open) = spec.find('{') else {
        return match spec.find('}') {
            Some(_) => Err("a `}` without its `{`".into()),
            None => Ok(vec![spec.to_string()]),
        };
    };
    let (close, commas) = closing_brace(spec, open)?;
    let inner = &spec[open + 1..close];
    let middles = if commas.is_empty() {
        range(inner)?
    } else {
        let mut bounds = vec![open];
        bounds.extend(&commas);
        bounds.push(close);
        let mut all = Vec::new();
        for w in bounds.windows(2) {
            all.extend(expand_one(&spec[w[0] + 1..w[1]])?);
        }
        all
    };
    let rests = expand_one(&spec[close + 1..])?;
    if (middles.len() as u64).saturating_mul(rests.len() as u64) > MAX_SHARDS {
        return Err(format!("more than {MAX_SHARDS} shards"));
    }
    let head = &spec[..open];
    Ok(middles.iter().flat_map(|m| rests.iter().map(move |r| format!("{head}{m}{r}"))).collect())
}

/// The names of a `{a..b}` range, zero-padded to the width of `a`.
fn range(inner: &str) -> Result<Vec<String>, String> {
    let (a, b) = inner.split_once("..").ok_or_else(|| format!("expected {{a..b}} or {{x,y}}, got {{{inner}}}"))?;
    let lo: u64 = a.parse().map_err(|_| format!("bad range start `{a}`"))?;
    let hi: u64 = b.parse().map_err(|_| format!("bad range end `{b}`"))?;
    if hi < lo {
        return Err(format!("empty range {{{inner}}}"));
    }
    if hi - lo >= MAX_SHARDS {
        return Err(format!("more than {MAX_SHARDS} shards"));
    }
    let width = a.len();
    Ok((lo..=hi).map(|k| format!("{k:0width$}")).collect())
}

mod cifar;
#[cfg(test)]
mod tests;
mod webdataset;

pub use cifar::{Cifar, CifarSource};
pub use webdataset::*;
