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

/// Read one IDX file of unsigned bytes: (path, dimensions, data).
fn read_idx(path: &Path) -> Result<(PathBuf, Vec<usize>, Vec<u8>), DataError> {
    let io = |source| DataError::Io { path: path.into(), source };
    let raw = std::fs::read(path).map_err(io)?;
    let bytes = if raw.starts_with(&[0x1f, 0x8b]) {
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(&raw[..]).read_to_end(&mut out).map_err(io)?;
        out
    } else {
        raw
    };
    let bad = |message: String| DataError::Format { path: path.into(), message };
    if bytes.len() < 4 || bytes[0] != 0 || bytes[1] != 0 {
        return Err(bad("not an IDX file (bad magic)".into()));
    }
    if bytes[2] != 0x08 {
        return Err(bad(format!("element type 0x{:02x} is not unsigned byte", bytes[2])));
    }
    let nd = bytes[3] as usize;
    let header = 4 + 4 * nd;
    if bytes.len() < header {
        return Err(bad("truncated header".into()));
    }
    let dims: Vec<usize> =
        (0..nd).map(|k| u32::from_be_bytes(bytes[4 + 4 * k..8 + 4 * k].try_into().unwrap()) as usize).collect();
    let count: usize = dims.iter().product();
    if bytes.len() - header != count {
        return Err(bad(format!("dimensions {dims:?} need {count} bytes, file holds {}", bytes.len() - header)));
    }
    Ok((path.into(), dims, bytes[header..].to_vec()))
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
