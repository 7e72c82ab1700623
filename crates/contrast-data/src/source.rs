//! The formats users bring, addressed by global sample index (so DESIGN.md
//! invariant 2 holds whatever the ranks and workers): image folders, CSV/TSV of
//! image path + caption (open_clip's layout), and WebDataset tar shards with a
//! member index cached beside each shard.

use crate::DataError;
use std::io::{Read, Seek, SeekFrom};
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
    /// A fingerprint of what the dataset holds (its names, and the sizes where
    /// an index records them): ranks all-reduce it before step 1, and a resume
    /// compares it with the checkpoint's.
    fn fingerprint(&self) -> u64;
    /// The first sample whose label is unknown (−1), if any: supervised losses
    /// refuse such data before training.
    fn first_unlabelled(&self) -> Option<usize>;
    /// The caption of sample `i`, if it has one (retrieval evaluation).
    fn caption(&self, i: usize) -> Option<String> {
        self.fetch(i).ok().and_then(|s| s.caption)
    }
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
        let bytes = std::fs::read(p).map_err(|e| format!("{}: {e}", p.display()))?;
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
        let names: Vec<String> = self.files.iter().map(|(p, l)| format!("{l}\t{}", p.display())).collect();
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
        Ok(Self { rows })
    }
}

impl Source for CsvSource {
    fn len(&self) -> usize {
        self.rows.len()
    }
    fn fetch(&self, i: usize) -> Result<RawSample, String> {
        let (p, cap) = &self.rows[i];
        let bytes = std::fs::read(p).map_err(|e| format!("{}: {e}", p.display()))?;
        Ok(RawSample { bytes, label: -1, caption: Some(cap.clone()) })
    }
    fn locate(&self, i: usize) -> String {
        self.rows[i].0.display().to_string()
    }
    fn fingerprint(&self) -> u64 {
        crate::fingerprint(self.rows.iter().flat_map(|(p, c)| [p.as_os_str().as_encoded_bytes(), c.as_bytes()]))
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

/// Expand `{a..b}` brace ranges (zero-padded to the width of `a`), as
/// WebDataset shard lists do; more than [`MAX_SHARDS`] names is an error.
pub fn expand_braces(pattern: &str) -> Result<Vec<String>, String> {
    let Some(open) = pattern.find('{') else { return Ok(vec![pattern.to_string()]) };
    let close = pattern[open..].find('}').map(|c| open + c).ok_or_else(|| format!("unclosed brace in `{pattern}`"))?;
    let inner = &pattern[open + 1..close];
    let (a, b) = inner.split_once("..").ok_or_else(|| format!("expected {{a..b}} in `{pattern}`"))?;
    let (lo, hi): (u64, u64) = (
        a.parse().map_err(|_| format!("bad range start `{a}`"))?,
        b.parse().map_err(|_| format!("bad range end `{b}`"))?,
    );
    if hi < lo {
        return Err(format!("empty range {{{inner}}} in `{pattern}`"));
    }
    let rests = expand_braces(&pattern[close + 1..])?;
    if (hi - lo).saturating_add(1).saturating_mul(rests.len() as u64) > MAX_SHARDS {
        return Err(format!("`{pattern}` names more than {MAX_SHARDS} shards"));
    }
    let width = a.len();
    let mut out = Vec::new();
    for k in lo..=hi {
        for rest in &rests {
            out.push(format!("{}{:0width$}{}", &pattern[..open], k, rest));
        }
    }
    Ok(out)
}

/// Where a member's bytes lie in a shard.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
struct Span {
    offset: u64,
    len: u64,
}

impl Span {
    /// True when the span lies inside a file of `size` bytes.
    fn within(self, size: u64) -> bool {
        self.offset.checked_add(self.len).is_some_and(|end| end <= size)
    }
}

/// One sample of a shard. `cls` is the `.cls` label, or the `.json` label
/// where there is no `.cls`, read once at indexing.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
struct Member {
    key: String,
    image: Span,
    text: Option<Span>,
    cls: Option<i64>,
    json: Option<Span>,
}

/// Caption keys looked up in a sample's `.json`, in order (LAION/img2dataset write `caption`).
const JSON_CAPTION_KEYS: [&str; 3] = ["caption", "text", "txt"];
/// Label keys looked up in a sample's `.json`, in order.
const JSON_LABEL_KEYS: [&str; 3] = ["label", "cls", "class"];

/// Labels must lie in [0, MAX_LABEL): evaluation and supervised losses size
/// tables by the largest label, so an absurd one in a hostile file must not
/// reach them.
pub const MAX_LABEL: i64 = 1 << 20;

/// Caption and label of a sample's `.json` metadata (`None` where a key is absent).
fn json_fields(raw: &[u8]) -> Result<(Option<String>, Option<i64>), String> {
    let v: serde_json::Value = serde_json::from_slice(raw).map_err(|e| format!("bad .json: {e}"))?;
    let caption = JSON_CAPTION_KEYS.iter().find_map(|k| v.get(*k)?.as_str().map(str::to_string));
    let label = JSON_LABEL_KEYS.iter().find_map(|k| v.get(*k)?.as_i64());
    if let Some(l) = label.filter(|l| !(0..MAX_LABEL).contains(l)) {
        return Err(format!("label {l} is outside [0, {MAX_LABEL})"));
    }
    Ok((caption, label))
}

/// WebDataset tar shards: members grouped by key (`<key>.jpg|png|webp` with a
/// `.txt` caption, a `.cls` label and/or `.json` metadata whose `caption`/`text`
/// and `label`/`cls`/`class` fields fill what `.txt` and `.cls` leave unset).
/// Each shard's member index is cached in `<shard>.contrast-index` (see
/// [`load_or_build_index`]).
#[derive(Debug)]
pub struct WebDataset {
    shards: Vec<PathBuf>,
    samples: Vec<(usize, Member)>,
}

/// The cache format's version; a cache of another version is rebuilt.
const INDEX_VERSION: &str = "contrast-index v3";

/// The shard's size and mtime, which a cache must match.
fn stamp(path: &Path) -> Result<(u64, String), DataError> {
    let m = std::fs::metadata(path).map_err(io_err(path))?;
    let mtime =
        m.modified().ok().and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok()).map(|d| d.as_nanos()).unwrap_or(0);
    Ok((m.len(), format!("{INDEX_VERSION} size={} mtime={mtime}", m.len())))
}

/// A key and the spans of its image, `.txt`, `.cls` and `.json` members.
type Group = (String, [Option<Span>; 4]);

/// Group a shard's members by key, checking every span against the shard's size.
fn scan_members(path: &Path, size: u64) -> Result<Vec<Group>, DataError> {
    let bad = |message: String| DataError::Format { path: path.into(), message };
    let file = std::fs::File::open(path).map_err(io_err(path))?;
    let mut archive = tar::Archive::new(file);
    let mut groups: std::collections::HashMap<String, usize> = Default::default();
    let mut out: Vec<Group> = Vec::new();
    for entry in archive.entries().map_err(|e| bad(e.to_string()))? {
        let entry = entry.map_err(|e| bad(format!("corrupt tar: {e}")))?;
        if !entry.header().entry_type().is_file() {
            continue;
        }
        let name = entry.path().map_err(|e| bad(e.to_string()))?.to_string_lossy().into_owned();
        let span = Span { offset: entry.raw_file_position(), len: entry.size() };
        if !span.within(size) {
            return Err(bad(format!(
                "member `{}` ends past the shard's {size} bytes: truncated shard?",
                name.escape_debug()
            )));
        }
        let base = name.rsplit('/').next().unwrap_or(&name);
        let Some(dot) = base.find('.') else { continue };
        let key = format!("{}{}", &name[..name.len() - base.len()], &base[..dot]);
        let slot = match ["jpg", "jpeg", "png", "webp", "txt", "cls", "json"]
            .iter()
            .position(|e| base[dot + 1..].eq_ignore_ascii_case(e))
        {
            Some(k) => [0, 0, 0, 0, 1, 2, 3][k],
            None => continue,
        };
        let at = *groups.entry(key.clone()).or_insert_with(|| {
            out.push((key, [None; 4]));
            out.len() - 1
        });
        out[at].1[slot] = Some(span);
    }
    Ok(out)
}

/// Index a shard: its image members in archive order, with their labels read.
fn index_shard(path: &Path, size: u64) -> Result<Vec<Member>, DataError> {
    let bad = |message: String| DataError::Format { path: path.into(), message };
    let mut file = std::fs::File::open(path).map_err(io_err(path))?;
    let mut out = Vec::new();
    for (key, [image, text, cls, json]) in scan_members(path, size)? {
        let Some(image) = image else { continue };
        let mut read = |s: Span| read_span(&mut file, s).map_err(|e| bad(format!("{key}: {e}")));
        let cls = match (cls, json) {
            (Some(s), _) => {
                let l = String::from_utf8_lossy(&read(s)?).trim().parse::<i64>();
                Some(
                    l.ok()
                        .filter(|l| (0..MAX_LABEL).contains(l))
                        .ok_or_else(|| bad(format!("{key}.cls is not an integer label in [0, {MAX_LABEL})")))?,
                )
            }
            // A malformed .json is the sample's fault: `fetch` reports it.
            (None, Some(s)) => json_fields(&read(s)?).ok().and_then(|(_, l)| l),
            (None, None) => None,
        };
        out.push(Member { key, image, text, cls, json });
    }
    Ok(out)
}

fn read_span(file: &mut std::fs::File, s: Span) -> std::io::Result<Vec<u8>> {
    file.seek(SeekFrom::Start(s.offset))?;
    let mut buf = vec![0u8; s.len as usize];
    file.read_exact(&mut buf)?;
    Ok(buf)
}

fn index_path(shard: &Path) -> PathBuf {
    let mut name = shard.file_name().unwrap_or_default().to_os_string();
    name.push(".contrast-index");
    shard.with_file_name(name)
}

fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

/// Parse a cache: the stamp line `<version> size=S mtime=M members=N
/// sha256=H`, then the members as JSON (so any key round-trips). Every check
/// that fails says why, and the caller re-indexes.
fn parse_index(text: &str, stamp: &str, size: u64) -> Result<Vec<Member>, String> {
    let (head, body) = text.split_once('\n').ok_or("no stamp line")?;
    let rest = head.strip_prefix(stamp).ok_or("the shard changed since it was indexed")?;
    let (count, sum) = rest
        .trim()
        .split_once(' ')
        .and_then(|(c, s)| Some((c.strip_prefix("members=")?.parse::<usize>().ok()?, s.strip_prefix("sha256=")?)))
        .ok_or("malformed stamp line")?;
    if sha256_hex(body.as_bytes()) != sum {
        return Err("checksum mismatch".into());
    }
    let members: Vec<Member> = serde_json::from_str(body).map_err(|e| format!("bad member list: {e}"))?;
    if members.len() != count {
        return Err(format!("{} members where the stamp says {count}", members.len()));
    }
    let spans = |m: &Member| [Some(m.image), m.text, m.json].into_iter().flatten().all(|s| s.within(size));
    match members.iter().find(|m| !spans(m) || m.cls.is_some_and(|l| !(0..MAX_LABEL).contains(&l))) {
        Some(m) => {
            Err(format!("member `{}` has a span past the shard's end or a label out of range", m.key.escape_debug()))
        }
        None => Ok(members),
    }
}

/// Write a cache through a temporary file unique to this process, then
/// rename it into place, so concurrent writers never mix their bytes. Best
/// effort: a read-only shard directory only costs a re-index next time.
fn write_index(idx: &Path, stamp: &str, members: &[Member]) {
    let body = serde_json::to_string(members).expect("members serialise");
    let text = format!("{stamp} members={} sha256={}\n{body}", members.len(), sha256_hex(body.as_bytes()));
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
    let mut tmp = idx.as_os_str().to_os_string();
    tmp.push(format!(".tmp.{}.{nanos}", std::process::id()));
    if std::fs::write(&tmp, text).is_ok() && std::fs::rename(&tmp, idx).is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
}

/// A shard's member index, from `<shard>.contrast-index` when that cache
/// matches the shard (version, size, mtime), its checksum holds and every span
/// lies inside the shard; otherwise (saying why) from the shard itself.
fn load_or_build_index(shard: &Path) -> Result<Vec<Member>, DataError> {
    let (size, stamp) = stamp(shard)?;
    let idx = index_path(shard);
    if let Ok(text) = std::fs::read_to_string(&idx) {
        match parse_index(&text, &stamp, size) {
            Ok(members) => return Ok(members),
            Err(why) => tracing::warn!("{}: {why}; re-indexing {}", idx.display(), shard.display()),
        }
    }
    let members = index_shard(shard, size)?;
    write_index(&idx, &stamp, &members);
    Ok(members)
}

impl WebDataset {
    /// Open the shards of `pattern` (e.g. `data/{000000..000099}.tar`).
    pub fn open(pattern: &str) -> Result<Self, DataError> {
        let names = expand_braces(pattern).map_err(|message| DataError::Format { path: pattern.into(), message })?;
        let mut shards = Vec::new();
        let mut samples = Vec::new();
        for (k, name) in names.iter().enumerate() {
            let p = PathBuf::from(name);
            for m in load_or_build_index(&p)? {
                samples.push((k, m));
            }
            shards.push(p);
        }
        if samples.is_empty() {
            return Err(DataError::Format { path: pattern.into(), message: "the shards hold no image samples".into() });
        }
        Ok(Self { shards, samples })
    }
}

impl WebDataset {
    /// The shard of sample `i`, opened.
    fn shard_of(&self, i: usize) -> Result<std::fs::File, String> {
        let path = &self.shards[self.samples[i].0];
        std::fs::File::open(path).map_err(|e| format!("{}: {e}", path.display()))
    }

    /// Caption and label of sample `i` from its `.txt`, `.cls` and `.json`
    /// members (`.json` fills what the others leave unset); the image is not read.
    fn text_of(&self, i: usize, file: &mut std::fs::File) -> Result<(Option<String>, Option<i64>), String> {
        let (k, m) = &self.samples[i];
        let path = &self.shards[*k];
        let mut read = |s: Span| read_span(file, s).map_err(|e| format!("{} ({}): {e}", path.display(), m.key));
        let mut caption = match m.text {
            Some(s) => Some(String::from_utf8_lossy(&read(s)?).trim().to_string()),
            None => None,
        };
        let mut label = m.cls;
        if let (Some(s), true) = (m.json, caption.is_none() || label.is_none()) {
            let (c, l) = json_fields(&read(s)?).map_err(|e| format!("{} ({}.json): {e}", path.display(), m.key))?;
            caption = caption.or(c);
            label = label.or(l);
        }
        Ok((caption, label))
    }
}

impl Source for WebDataset {
    fn len(&self) -> usize {
        self.samples.len()
    }
    fn fetch(&self, i: usize) -> Result<RawSample, String> {
        let (mut file, (k, m)) = (self.shard_of(i)?, &self.samples[i]);
        let bytes =
            read_span(&mut file, m.image).map_err(|e| format!("{} ({}): {e}", self.shards[*k].display(), m.key))?;
        let (caption, label) = self.text_of(i, &mut file)?;
        Ok(RawSample { bytes, label: label.unwrap_or(-1), caption })
    }
    fn caption(&self, i: usize) -> Option<String> {
        self.text_of(i, &mut self.shard_of(i).ok()?).ok()?.0
    }
    fn locate(&self, i: usize) -> String {
        let (k, m) = &self.samples[i];
        format!("{}#{}", self.shards[*k].display(), m.key.escape_debug())
    }
    fn fingerprint(&self) -> u64 {
        let rows: Vec<String> = self
            .samples
            .iter()
            .map(|(k, m)| format!("{}\t{:?}", self.shards[*k].display(), (&m.key, m.image, m.text, m.cls, m.json)))
            .collect();
        crate::fingerprint(rows.iter().map(|r| r.as_bytes()))
    }
    fn first_unlabelled(&self) -> Option<usize> {
        self.samples.iter().position(|(_, m)| m.cls.is_none())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn png_bytes(v: u8) -> Vec<u8> {
        let img = image::RgbImage::from_fn(6, 5, |x, y| image::Rgb([v, x as u8, y as u8]));
        let mut out = std::io::Cursor::new(Vec::new());
        img.write_to(&mut out, image::ImageFormat::Png).unwrap();
        out.into_inner()
    }

    #[test]
    fn image_folder_sorts_classes_and_files() {
        let dir = tempfile::tempdir().unwrap();
        for (class, files) in [("zebra", vec!["b.png", "a.png"]), ("ant", vec!["c.PNG", "notes.txt"])] {
            std::fs::create_dir(dir.path().join(class)).unwrap();
            for f in files {
                std::fs::write(dir.path().join(class).join(f), png_bytes(1)).unwrap();
            }
        }
        let s = ImageFolder::open(dir.path()).unwrap();
        assert_eq!(s.class_names(), vec!["ant", "zebra"]);
        assert_eq!(s.len(), 3);
        assert!(s.locate(0).ends_with("ant/c.PNG") && s.locate(1).ends_with("zebra/a.png"));
        assert_eq!(s.fetch(2).unwrap().label, 1);
        let empty = tempfile::tempdir().unwrap();
        assert!(ImageFolder::open(empty.path()).unwrap_err().to_string().contains("no images"));
    }

    #[test]
    fn csv_reads_open_clip_layout_and_names_missing_columns() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("x.png"), png_bytes(9)).unwrap();
        std::fs::write(dir.path().join("d.tsv"), "filepath\ttitle\nx.png\ta red square\n").unwrap();
        let s = CsvSource::open(&dir.path().join("d.tsv"), "filepath", "title", Some(b'\t')).unwrap();
        let r = s.fetch(0).unwrap();
        assert_eq!(r.caption.as_deref(), Some("a red square"));
        assert_eq!(r.bytes, png_bytes(9));
        let err = CsvSource::open(&dir.path().join("d.tsv"), "image", "title", Some(b'\t')).unwrap_err().to_string();
        assert!(err.contains("no column `image`") && err.contains("d.tsv"), "{err}");
        // `auto`: a comma-separated .csv (quoted, with a comma inside a caption) reads as such.
        std::fs::write(dir.path().join("d.csv"), "\"filepath\",title,extra\nx.png,\"a red, square\",1\n").unwrap();
        let s = CsvSource::open(&dir.path().join("d.csv"), "filepath", "title", None).unwrap();
        assert_eq!(s.fetch(0).unwrap().caption.as_deref(), Some("a red, square"));
        assert!(CsvSource::open(&dir.path().join("d.tsv"), "filepath", "title", None).is_ok());
        // A separator given wrongly: the error says which one was used and the key to change.
        let err = CsvSource::open(&dir.path().join("d.csv"), "filepath", "title", Some(b'\t')).unwrap_err().to_string();
        assert!(err.contains("separator '\\t'") && err.contains("data.csv_separator"), "{err}");
        let err = CsvSource::open(&dir.path().join("d.csv"), "image", "title", None).unwrap_err().to_string();
        assert!(err.contains("d.csv") && err.contains("data.csv_img_key"), "{err}");
    }

    fn write_shard(path: &Path, keys: &[(&str, u8, Option<&str>, Option<i64>)]) {
        let mut b = tar::Builder::new(std::fs::File::create(path).unwrap());
        let mut add = |name: String, data: &[u8]| {
            let mut h = tar::Header::new_gnu();
            h.set_size(data.len() as u64);
            h.set_mode(0o644);
            h.set_cksum();
            b.append_data(&mut h, name, data).unwrap();
        };
        for (key, v, txt, cls) in keys {
            add(format!("{key}.png"), &png_bytes(*v));
            if let Some(t) = txt {
                add(format!("{key}.txt"), t.as_bytes());
            }
            if let Some(c) = cls {
                add(format!("{key}.cls"), c.to_string().as_bytes());
            }
        }
        b.finish().unwrap();
    }

    #[test]
    fn webdataset_cls_labels_outside_the_bound_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("l-0.tar");
        let mut b = tar::Builder::new(std::fs::File::create(&path).unwrap());
        for (name, data) in [("k/a.png", png_bytes(1)), ("k/a.cls", b"1000000000000".to_vec())] {
            let mut h = tar::Header::new_gnu();
            h.set_size(data.len() as u64);
            h.set_mode(0o644);
            h.set_cksum();
            b.append_data(&mut h, name, &data[..]).unwrap();
        }
        b.finish().unwrap();
        let err = WebDataset::open(path.to_str().unwrap()).err().unwrap().to_string();
        assert!(err.contains("a.cls") && err.contains("l-0.tar"), "{err}");
    }

    #[test]
    fn webdataset_json_metadata_fills_caption_and_label() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("j-0.tar");
        let mut b = tar::Builder::new(std::fs::File::create(&path).unwrap());
        let mut add = |name: &str, data: &[u8]| {
            let mut h = tar::Header::new_gnu();
            h.set_size(data.len() as u64);
            h.set_mode(0o644);
            h.set_cksum();
            b.append_data(&mut h, name, data).unwrap();
        };
        add("x/a.jpg", &png_bytes(4));
        add("x/a.json", br#"{"caption": "from json", "label": 5, "width": 6}"#);
        add("x/b.png", &png_bytes(5));
        add("x/b.txt", b"from txt");
        add("x/b.json", br#"{"caption": "ignored: .txt wins", "cls": 2}"#);
        add("x/c.png", &png_bytes(6));
        add("x/c.json", b"{not json");
        add("x/d.png", &png_bytes(7));
        add("x/d.json", br#"{"label": 1000000000000}"#);
        b.finish().unwrap();
        let ds = WebDataset::open(path.to_str().unwrap()).unwrap();
        let a = ds.fetch(0).unwrap();
        assert_eq!((a.caption.as_deref(), a.label), (Some("from json"), 5));
        let b = ds.fetch(1).unwrap();
        assert_eq!((b.caption.as_deref(), b.label), (Some("from txt"), 2));
        // Captions alone (retrieval) come from the text members, the same as a fetch gives.
        assert_eq!((ds.caption(0).as_deref(), ds.caption(1).as_deref()), (Some("from json"), Some("from txt")));
        // A bad .json makes the sample unreadable (skipped and counted by the pipeline), naming it.
        let err = ds.fetch(2).unwrap_err();
        assert!(err.contains("c.json") && err.contains("j-0.tar"), "{err}");
        // An absurd label is refused, naming the member, before evaluation could size a table by it.
        let err = ds.fetch(3).unwrap_err();
        assert!(err.contains("d.json") && err.contains("outside"), "{err}");
        // The cached index keeps the .json spans.
        assert_eq!(WebDataset::open(path.to_str().unwrap()).unwrap().samples, ds.samples);
    }

    #[test]
    fn webdataset_indexes_shards_and_reuses_the_cache() {
        let dir = tempfile::tempdir().unwrap();
        write_shard(&dir.path().join("s-00.tar"), &[("a", 1, Some("first"), Some(3)), ("b", 2, Some("second"), None)]);
        write_shard(&dir.path().join("s-01.tar"), &[("c", 3, None, Some(7))]);
        let pattern = format!("{}/s-{{00..01}}.tar", dir.path().display());
        let ds = WebDataset::open(&pattern).unwrap();
        assert_eq!(ds.len(), 3);
        let s0 = ds.fetch(0).unwrap();
        assert_eq!((s0.caption.as_deref(), s0.label, s0.bytes == png_bytes(1)), (Some("first"), 3, true));
        assert_eq!(ds.fetch(2).unwrap().label, 7);
        assert!(ds.locate(1).ends_with("s-00.tar#b"));
        let idx = dir.path().join("s-00.tar.contrast-index");
        assert!(idx.is_file());
        // Cached index is read back identically; a changed shard is re-indexed.
        assert_eq!(WebDataset::open(&pattern).unwrap().samples, ds.samples);
        std::thread::sleep(std::time::Duration::from_millis(20));
        write_shard(&dir.path().join("s-00.tar"), &[("z", 5, Some("new"), None)]);
        let again = WebDataset::open(&pattern).unwrap();
        assert_eq!(again.len(), 2);
        assert_eq!(again.fetch(0).unwrap().caption.as_deref(), Some("new"));
        assert_eq!(expand_braces("x{8..10}y").unwrap(), vec!["x8y", "x9y", "x10y"]);
        assert_eq!(expand_braces("{000..002}.tar").unwrap(), vec!["000.tar", "001.tar", "002.tar"]);
        assert!(WebDataset::open(&format!("{}/none-{{0..1}}.tar", dir.path().display())).is_err());
    }

    #[test]
    fn webdataset_cache_survives_hostile_names_and_refuses_torn_or_forged_caches() {
        let dir = tempfile::tempdir().unwrap();
        let shard = dir.path().join("h-0.tar");
        write_shard(
            &shard,
            &[("tab\there\nnew", 1, Some("a"), Some(1)), ("b", 2, None, None), ("c", 3, None, Some(2))],
        );
        let name = shard.to_str().unwrap();
        let first = WebDataset::open(name).unwrap();
        assert_eq!(first.samples[0].1.key, "tab\there\nnew");
        assert_eq!(first.first_unlabelled(), Some(1));
        let idx = dir.path().join("h-0.tar.contrast-index");
        let cached = std::fs::read_to_string(&idx).unwrap();
        // The key round-trips through the cache.
        assert_eq!(WebDataset::open(name).unwrap().samples, first.samples);
        // A cache torn at a line boundary, or with a forged span of 100 GB, is re-indexed.
        let (head, _) = cached.split_once('\n').unwrap();
        let forged = cached.replacen("\"len\":", "\"len\":100000000000", 1);
        let stamp_only = format!("{head}\n");
        for bad in [stamp_only, forged, cached[..cached.len() - 5].to_string()] {
            std::fs::write(&idx, &bad).unwrap();
            let again = WebDataset::open(name).unwrap();
            assert_eq!(again.samples, first.samples);
            assert_eq!(again.fetch(0).unwrap().label, 1);
            assert_eq!(std::fs::read_to_string(&idx).unwrap(), cached, "the cache is rewritten whole");
        }
        // A forged span that passes the checksum (recomputed) still must lie inside the shard.
        let body = cached.split_once('\n').unwrap().1.replacen("\"len\":", "\"len\":100000000000", 1);
        let (size, stamp) = stamp(&shard).unwrap();
        let err =
            parse_index(&format!("{stamp} members=3 sha256={}\n{body}", sha256_hex(body.as_bytes())), &stamp, size);
        assert!(err.unwrap_err().contains("past the shard's end"));
        // A truncated shard is refused naming the member that runs past its end.
        let bytes = std::fs::read(&shard).unwrap();
        let cut = dir.path().join("t-0.tar");
        std::fs::write(&cut, &bytes[..1024 + 100]).unwrap();
        let err = WebDataset::open(cut.to_str().unwrap()).err().unwrap().to_string();
        assert!(err.contains("t-0.tar") && (err.contains("ends past") || err.contains("corrupt tar")), "{err}");
        // No temporary file is left behind.
        let left: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().contains(".tmp."))
            .collect();
        assert!(left.is_empty());
    }

    #[test]
    fn brace_ranges_are_bounded_and_fingerprints_see_names() {
        assert!(expand_braces("s{0..99999999999}.tar").unwrap_err().contains("more than"));
        assert!(expand_braces("{0..2000}-{0..2000}.tar").unwrap_err().contains("more than"));
        assert_ne!(crate::fingerprint([&b"ab"[..], b"c"]), crate::fingerprint([&b"a"[..], b"bc"]));
    }
}
