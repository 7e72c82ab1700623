//! WebDataset tar shards: an index of each shard's samples (cached beside it,
//! checked against the shard), and samples read by byte range.

use super::*;
use crate::DataError;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

/// Where a member's bytes lie in a shard.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub(super) struct Span {
    pub(super) offset: u64,
    pub(super) len: u64,
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
pub(super) struct Member {
    pub(super) key: String,
    pub(super) image: Span,
    pub(super) text: Option<Span>,
    pub(super) cls: Option<i64>,
    pub(super) json: Option<Span>,
}

/// Caption keys looked up in a sample's `.json`, in order (LAION/img2dataset write `caption`).
pub(super) const JSON_CAPTION_KEYS: [&str; 3] = ["caption", "text", "txt"];
/// Label keys looked up in a sample's `.json`, in order.
pub(super) const JSON_LABEL_KEYS: [&str; 3] = ["label", "cls", "class"];

/// Labels must lie in [0, MAX_LABEL): evaluation and supervised losses size
/// tables by the largest label, so an absurd one in a hostile file must not
/// reach them.
pub const MAX_LABEL: i64 = 1 << 20;

/// Caption and label of a sample's `.json` metadata (`None` where a key is absent).
pub(super) fn json_fields(raw: &[u8]) -> Result<(Option<String>, Option<i64>), String> {
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
    pub(super) shards: Vec<PathBuf>,
    pub(super) samples: Vec<(usize, Member)>,
}

/// The cache format's version; a cache of another version is rebuilt.
pub(super) const INDEX_VERSION: &str = "contrast-index v3";

/// The shard's size and mtime, which a cache must match.
pub(super) fn stamp(path: &Path) -> Result<(u64, String), DataError> {
    let m = std::fs::metadata(path).map_err(io_err(path))?;
    if !m.is_file() {
        let message = format!("not a regular file ({:?}); shards must be regular files", m.file_type());
        return Err(DataError::Format { path: path.into(), message });
    }
    let mtime =
        m.modified().ok().and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok()).map(|d| d.as_nanos()).unwrap_or(0);
    Ok((m.len(), format!("{INDEX_VERSION} size={} mtime={mtime}", m.len())))
}

/// A key and the spans of its image, `.txt`, `.cls` and `.json` members.
pub(super) type Group = (String, [Option<Span>; 4]);

/// Group a shard's members by key, checking every span against the shard's size.
pub(super) fn scan_members(path: &Path, size: u64) -> Result<Vec<Group>, DataError> {
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
pub(super) fn index_shard(path: &Path, size: u64) -> Result<Vec<Member>, DataError> {
    let bad = |message: String| DataError::Format { path: path.into(), message };
    let mut file = std::fs::File::open(path).map_err(io_err(path))?;
    let mut out = Vec::new();
    for (key, [image, text, cls, json]) in scan_members(path, size)? {
        let Some(image) = image else { continue };
        let cap = crate::limits::get().text_bytes;
        let mut read = |s: Span| read_span(&mut file, s, cap, "max_text_bytes").map_err(|e| bad(format!("{key}: {e}")));
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

/// Read a member's span of at most `cap` bytes (`key`: the cap's config key):
/// its size comes from the tar header, so an oversized member is refused
/// before a byte is allocated, and the buffer is allocated fallibly.
pub(super) fn read_span(file: &mut std::fs::File, s: Span, cap: u64, key: &str) -> Result<Vec<u8>, String> {
    crate::limits::check_size(s.len, cap, key)?;
    let mut buf = crate::limits::buffer(s.len)?;
    file.seek(SeekFrom::Start(s.offset)).map_err(|e| e.to_string())?;
    file.take(s.len).read_to_end(&mut buf).map_err(|e| e.to_string())?;
    if buf.len() as u64 != s.len {
        return Err(format!("the member ends after {} of its {} bytes (the shard shrank?)", buf.len(), s.len));
    }
    Ok(buf)
}

/// Where a shard's index is cached: beside it, or in `dir` under a name of
/// its absolute path's hash and its file name (shards of one name in two
/// directories do not share a cache).
pub(super) fn index_path(shard: &Path, dir: Option<&Path>) -> PathBuf {
    let mut name = shard.file_name().unwrap_or_default().to_os_string();
    name.push(".contrast-index");
    let Some(dir) = dir else { return shard.with_file_name(name) };
    let absolute = std::path::absolute(shard).unwrap_or_else(|_| shard.to_path_buf());
    let hash = sha256_hex(absolute.as_os_str().as_encoded_bytes());
    let mut unique = std::ffi::OsString::from(format!("{}-", &hash[..16]));
    unique.push(name);
    dir.join(unique)
}

pub(super) fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

/// Parse a cache: the stamp line `<version> size=S mtime=M members=N
/// sha256=H`, then the members as JSON (so any key round-trips). Every check
/// that fails says why, and the caller re-indexes.
pub(super) fn parse_index(text: &str, stamp: &str, size: u64) -> Result<Vec<Member>, String> {
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
pub(super) fn write_index(idx: &Path, stamp: &str, members: &[Member]) {
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
pub(super) fn load_or_build_index(shard: &Path, dir: Option<&Path>) -> Result<Vec<Member>, DataError> {
    let (size, stamp) = stamp(shard)?;
    let idx = index_path(shard, dir);
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
    /// Open the shards of `pattern` (e.g. `data/{000000..000099}.tar`), their
    /// indexes cached beside them.
    pub fn open(pattern: &str) -> Result<Self, DataError> {
        Self::open_indexed(pattern, None)
    }

    /// [`WebDataset::open`] with the indexes cached in `index_dir` (created if
    /// missing) instead of beside the shards (`data.index_dir`).
    pub fn open_indexed(pattern: &str, index_dir: Option<&Path>) -> Result<Self, DataError> {
        if let Some(dir) = index_dir {
            std::fs::create_dir_all(dir).map_err(|source| DataError::Io { path: dir.to_path_buf(), source })?;
        }
        let names = expand_braces(pattern).map_err(|message| DataError::Format { path: pattern.into(), message })?;
        let mut shards = Vec::new();
        let mut samples = Vec::new();
        for (k, name) in names.iter().enumerate() {
            let p = PathBuf::from(name);
            for m in load_or_build_index(&p, index_dir)? {
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
        let regular = std::fs::metadata(path).map(|m| m.is_file()).map_err(|e| format!("{}: {e}", path.display()))?;
        if !regular {
            return Err(format!("{}: not a regular file; only regular files are read", path.display()));
        }
        std::fs::File::open(path).map_err(|e| format!("{}: {e}", path.display()))
    }

    /// Caption and label of sample `i` from its `.txt`, `.cls` and `.json`
    /// members (`.json` fills what the others leave unset); the image is not read.
    fn text_of(&self, i: usize, file: &mut std::fs::File) -> Result<(Option<String>, Option<i64>), String> {
        let (k, m) = &self.samples[i];
        let path = &self.shards[*k];
        let cap = crate::limits::get().text_bytes;
        let mut read = |s: Span| {
            read_span(file, s, cap, "max_text_bytes").map_err(|e| format!("{} ({}): {e}", path.display(), m.key))
        };
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
        let cap = crate::limits::get().image_bytes;
        let bytes = read_span(&mut file, m.image, cap, "max_image_bytes")
            .map_err(|e| format!("{} ({}): {e}", self.shards[*k].display(), m.key))?;
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
            .map(|(k, m)| {
                let shard = super::relative_name(&self.shards[*k], 1);
                format!("{shard}\t{:?}", (&m.key, m.image, m.text, m.cls, m.json))
            })
            .collect();
        crate::fingerprint(rows.iter().map(|r| r.as_bytes()))
    }
    fn first_unlabelled(&self) -> Option<usize> {
        self.samples.iter().position(|(_, m)| m.cls.is_none())
    }
}
