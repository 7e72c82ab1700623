//! IDX files (MNIST, Fashion-MNIST), plain or gzip-compressed.

use crate::DataError;
use std::io::Read;
use std::path::{Path, PathBuf};

/// A split of grayscale images with integer labels, kept as bytes.
#[derive(Debug, Clone)]
pub struct Images {
    /// Pixels, `len × height × width`, row major.
    pub pixels: Vec<u8>,
    /// Class label of each image.
    pub labels: Vec<u8>,
    /// Image height.
    pub height: usize,
    /// Image width.
    pub width: usize,
}

/// Fashion-MNIST's class names, in label order.
pub const FASHION_MNIST_CLASSES: [&str; 10] =
    ["t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot"];

/// Per-pixel mean and standard deviation of Fashion-MNIST's training split (in [0, 1] units).
pub const FASHION_MNIST_MEAN_STD: (f32, f32) = (0.2860, 0.3530);

impl Images {
    /// Number of images.
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    /// True when there are no images.
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// Pixels of image `i`.
    pub fn image(&self, i: usize) -> &[u8] {
        let n = self.height * self.width;
        &self.pixels[i * n..(i + 1) * n]
    }

    /// Keep the first `n` images (no-op when `n` is 0 or at least the length).
    pub fn truncate(&mut self, n: usize) {
        if n > 0 && n < self.len() {
            self.labels.truncate(n);
            self.pixels.truncate(n * self.height * self.width);
        }
    }

    /// Load split `train` or `t10k` from `root` (`<split>-images-idx3-ubyte[.gz]`
    /// and `<split>-labels-idx1-ubyte[.gz]`).
    pub fn load_split(root: &Path, split: &str) -> Result<Self, DataError> {
        let images = read_idx(&find(root, &format!("{split}-images-idx3-ubyte"))?)?;
        let labels = read_idx(&find(root, &format!("{split}-labels-idx1-ubyte"))?)?;
        let (ipath, dims, pixels) = images;
        let (lpath, ldims, labels) = labels;
        if dims.len() != 3 {
            return Err(DataError::Format { path: ipath, message: format!("expected 3 dimensions, found {dims:?}") });
        }
        if ldims.len() != 1 || ldims[0] != dims[0] {
            return Err(DataError::Format {
                path: lpath,
                message: format!("{:?} labels for {} images", ldims, dims[0]),
            });
        }
        Ok(Self { pixels, labels, height: dims[1], width: dims[2] })
    }

    /// Write this split as uncompressed IDX files (for tests and small fixtures).
    pub fn write_split(&self, root: &Path, split: &str) -> std::io::Result<()> {
        let mut img = vec![0, 0, 8, 3];
        for d in [self.len(), self.height, self.width] {
            img.extend_from_slice(&(d as u32).to_be_bytes());
        }
        img.extend_from_slice(&self.pixels);
        std::fs::write(root.join(format!("{split}-images-idx3-ubyte")), img)?;
        let mut lab = vec![0, 0, 8, 1];
        lab.extend_from_slice(&(self.len() as u32).to_be_bytes());
        lab.extend_from_slice(&self.labels);
        std::fs::write(root.join(format!("{split}-labels-idx1-ubyte")), lab)
    }
}

fn find(root: &Path, stem: &str) -> Result<PathBuf, DataError> {
    for name in [stem.to_string(), format!("{stem}.gz")] {
        let p = root.join(&name);
        if p.is_file() {
            return Ok(p);
        }
    }
    Err(DataError::Io {
        path: root.join(format!("{stem}[.gz]")),
        source: std::io::Error::new(std::io::ErrorKind::NotFound, "no such IDX file"),
    })
}

/// Most bytes of IDX data accepted (16 GiB).
pub const MAX_IDX_BYTES: u64 = 1 << 34;
/// Deflate expands at most ~1032:1: a gzip file declaring more data per
/// compressed byte than this cannot be genuine, so it is refused before anything
/// is inflated past that bound.
const MAX_GZIP_RATIO: u64 = 1100;

/// Read one IDX file of unsigned bytes: (path, dimensions, data). The header is
/// checked (magic, type, no zero dimension, a size that neither overflows nor
/// exceeds [`MAX_IDX_BYTES`]) before the data is read, and gzip input is inflated
/// only up to the declared size.
fn read_idx(path: &Path) -> Result<(PathBuf, Vec<usize>, Vec<u8>), DataError> {
    let io = |source| DataError::Io { path: path.into(), source };
    let bad = |message: String| DataError::Format { path: path.into(), message };
    let raw = std::fs::read(path).map_err(io)?;
    let gz = raw.starts_with(&[0x1f, 0x8b]);
    let mut reader: Box<dyn Read> =
        if gz { Box::new(flate2::read::GzDecoder::new(&raw[..])) } else { Box::new(&raw[..]) };
    let mut magic = [0u8; 4];
    reader.read_exact(&mut magic).map_err(|_| bad("not an IDX file (shorter than its magic)".into()))?;
    if magic[0] != 0 || magic[1] != 0 {
        return Err(bad("not an IDX file (bad magic)".into()));
    }
    if magic[2] != 0x08 {
        return Err(bad(format!("element type 0x{:02x} is not unsigned byte", magic[2])));
    }
    let nd = magic[3] as usize;
    let mut head = vec![0u8; 4 * nd];
    reader.read_exact(&mut head).map_err(|_| bad("truncated header".into()))?;
    let dims: Vec<usize> = head.chunks(4).map(|c| u32::from_be_bytes(c.try_into().unwrap()) as usize).collect();
    if dims.iter().any(|&d| d == 0) {
        return Err(bad(format!("dimensions {dims:?} include a zero")));
    }
    let count = dims.iter().try_fold(1u64, |acc, &d| acc.checked_mul(d as u64)).filter(|&c| c <= MAX_IDX_BYTES);
    let Some(count) = count else {
        return Err(bad(format!("dimensions {dims:?} declare more than {MAX_IDX_BYTES} bytes")));
    };
    if gz && count > MAX_GZIP_RATIO.saturating_mul(raw.len() as u64) {
        return Err(bad(format!(
            "dimensions {dims:?} declare {count} bytes, more than {} compressed bytes can hold",
            raw.len()
        )));
    }
    let mut data = Vec::new();
    reader.take(count + 1).read_to_end(&mut data).map_err(io)?;
    if data.len() as u64 != count {
        let held = if data.len() as u64 > count { "more".to_string() } else { data.len().to_string() };
        return Err(bad(format!("dimensions {dims:?} need {count} bytes, file holds {held}")));
    }
    Ok((path.into(), dims, data))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip_and_errors_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let imgs = Images { pixels: (0..2 * 6).map(|v| v as u8).collect(), labels: vec![3, 4], height: 2, width: 3 };
        imgs.write_split(dir.path(), "train").unwrap();
        let back = Images::load_split(dir.path(), "train").unwrap();
        assert_eq!(back.pixels, imgs.pixels);
        assert_eq!(back.labels, vec![3, 4]);
        assert_eq!(back.image(1), &[6, 7, 8, 9, 10, 11]);
        let err = Images::load_split(dir.path(), "t10k").unwrap_err().to_string();
        assert!(err.contains("t10k-images-idx3-ubyte"), "{err}");
        std::fs::write(dir.path().join("train-labels-idx1-ubyte"), [0, 0, 8, 1, 0, 0, 0, 5, 1]).unwrap();
        let err = Images::load_split(dir.path(), "train").unwrap_err().to_string();
        assert!(err.contains("train-labels-idx1-ubyte"), "{err}");
    }

    #[test]
    fn hostile_headers_are_refused_before_allocating() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("train-images-idx3-ubyte");
        let header = |dims: &[u32]| -> Vec<u8> {
            let mut v = vec![0, 0, 8, dims.len() as u8];
            dims.iter().for_each(|d| v.extend_from_slice(&d.to_be_bytes()));
            v
        };
        for (dims, needle) in
            [(vec![u32::MAX; 3], "declare more than"), (vec![3, 0, 2], "zero"), (vec![2, 2], "need 4 bytes")]
        {
            std::fs::write(&f, header(&dims)).unwrap();
            let err = read_idx(&f).unwrap_err().to_string();
            assert!(err.contains(needle) && err.contains("train-images-idx3-ubyte"), "{dims:?}: {err}");
        }
        // A small gzip file that declares far more than it could hold is refused without inflating it.
        let mut body = header(&[60_000, 280, 280]);
        body.extend(std::iter::repeat_n(0u8, 1 << 20));
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
        std::io::Write::write_all(&mut gz, &body).unwrap();
        let gz_path = dir.path().join("bomb-idx3-ubyte.gz");
        std::fs::write(&gz_path, gz.finish().unwrap()).unwrap();
        let err = read_idx(&gz_path).unwrap_err().to_string();
        assert!(err.contains("compressed bytes can hold"), "{err}");
    }

    #[test]
    fn reads_debian_fashion_mnist_when_installed() {
        let root = Path::new("/usr/share/datasets/fashion-mnist");
        if !root.is_dir() {
            eprintln!("skipped: Debian's dataset-fashion-mnist is not installed");
            return;
        }
        let test = Images::load_split(root, "t10k").unwrap();
        assert_eq!((test.len(), test.height, test.width), (10_000, 28, 28));
        assert!(test.labels.iter().all(|&l| l < 10));
    }
}
