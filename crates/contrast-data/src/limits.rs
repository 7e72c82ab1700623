//! Bounds on what reading one sample may cost: only regular files are read,
//! every read is capped (refused from `stat` or the tar header before a byte
//! is allocated), allocation is fallible, and decoding is refused above a
//! pixel count read from the image's header. A sample that passes a bound is
//! a bad sample naming the file (counted against `data.max_bad_fraction`);
//! nothing aborts the process or blocks forever on a FIFO.
//!
//! The limits are process-wide ([`set`] once from the config, `data.max_*`):
//! every reader — sources, the pipeline's workers, evaluation — sees the same.

use std::io::Read;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

/// The bounds of one sample's reads and decode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReadLimits {
    /// Bytes of an image file or shard member (`data.max_image_bytes`).
    pub image_bytes: u64,
    /// Bytes of a caption, label or JSON member (`data.max_text_bytes`).
    pub text_bytes: u64,
    /// Pixels of a decoded image (`data.max_image_pixels`; PIL's default bound).
    pub pixels: u64,
}

/// 256 MiB per image file.
pub const DEFAULT_IMAGE_BYTES: u64 = 256 << 20;
/// 4 MiB per caption, label or JSON member.
pub const DEFAULT_TEXT_BYTES: u64 = 4 << 20;
/// PIL's `Image.MAX_IMAGE_PIXELS`.
pub const DEFAULT_PIXELS: u64 = 178_956_970;

impl Default for ReadLimits {
    fn default() -> Self {
        Self { image_bytes: DEFAULT_IMAGE_BYTES, text_bytes: DEFAULT_TEXT_BYTES, pixels: DEFAULT_PIXELS }
    }
}

static IMAGE_BYTES: AtomicU64 = AtomicU64::new(DEFAULT_IMAGE_BYTES);
static TEXT_BYTES: AtomicU64 = AtomicU64::new(DEFAULT_TEXT_BYTES);
static PIXELS: AtomicU64 = AtomicU64::new(DEFAULT_PIXELS);

/// Set the process's limits (the trainer does, from `data.max_*`).
pub fn set(l: ReadLimits) {
    IMAGE_BYTES.store(l.image_bytes, Ordering::Relaxed);
    TEXT_BYTES.store(l.text_bytes, Ordering::Relaxed);
    PIXELS.store(l.pixels, Ordering::Relaxed);
}

/// The process's limits.
pub fn get() -> ReadLimits {
    ReadLimits {
        image_bytes: IMAGE_BYTES.load(Ordering::Relaxed),
        text_bytes: TEXT_BYTES.load(Ordering::Relaxed),
        pixels: PIXELS.load(Ordering::Relaxed),
    }
}

/// Refuse `size` bytes over `cap` (`key` names the config key), before reading.
pub fn check_size(size: u64, cap: u64, key: &str) -> Result<(), String> {
    if size > cap {
        return Err(format!("{size} bytes, over the cap of {cap} (data.{key})"));
    }
    Ok(())
}

/// A buffer of `len` bytes, or an error instead of an abort when memory is short.
pub fn buffer(len: u64) -> Result<Vec<u8>, String> {
    let mut v = Vec::new();
    let n = usize::try_from(len).map_err(|_| format!("{len} bytes do not fit this machine's address space"))?;
    v.try_reserve_exact(n).map_err(|e| format!("cannot allocate {len} bytes: {e}"))?;
    Ok(v)
}

/// Read a whole file of at most `cap` bytes (`key` names the cap's config key):
/// only a regular file (links followed), refused from its size before any
/// byte is read, into a fallibly allocated buffer. Errors name the path.
pub fn read_file(path: &Path, cap: u64, key: &str) -> Result<Vec<u8>, String> {
    let at = |e: String| format!("{}: {e}", path.display());
    let meta = std::fs::metadata(path).map_err(|e| at(e.to_string()))?;
    if !meta.is_file() {
        return Err(at(format!("not a regular file ({:?}); only regular files are read", meta.file_type())));
    }
    check_size(meta.len(), cap, key).map_err(at)?;
    let file = std::fs::File::open(path).map_err(|e| at(e.to_string()))?;
    // The file may have been replaced between the stat and the open: check what was opened.
    let opened = file.metadata().map_err(|e| at(e.to_string()))?;
    if !opened.is_file() {
        return Err(at("not a regular file once opened".into()));
    }
    check_size(opened.len(), cap, key).map_err(at)?;
    let mut buf = buffer(opened.len()).map_err(at)?;
    file.take(cap + 1).read_to_end(&mut buf).map_err(|e| at(e.to_string()))?;
    check_size(buf.len() as u64, cap, key).map_err(at)?;
    Ok(buf)
}

/// Read an image file under the process's `data.max_image_bytes`.
pub fn read_image_file(path: &Path) -> Result<Vec<u8>, String> {
    read_file(path, get().image_bytes, "max_image_bytes")
}

/// Refuse an image whose header declares more than `max` pixels, before decoding.
pub fn check_pixels(bytes: &[u8], max: u64) -> Result<(), String> {
    let reader = image::ImageReader::new(std::io::Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| format!("reading the image header: {e}"))?;
    let (w, h) = reader.into_dimensions().map_err(|e| e.to_string())?;
    let pixels = w as u64 * h as u64;
    if pixels > max {
        return Err(format!("{w}×{h} = {pixels} pixels, over the cap of {max} (data.max_image_pixels)"));
    }
    Ok(())
}
