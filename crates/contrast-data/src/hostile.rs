//! Builders of hostile inputs, for the tests (and fuzz seeds) that keep the
//! bounds of docs/reliability.md in place: files that never end, that are
//! huge, that decode into gigabytes, or that are cut short.

use std::path::Path;

/// A FIFO at `path` (a read of it would block forever).
pub fn fifo(path: &Path) -> std::io::Result<()> {
    let ok = std::process::Command::new("mkfifo").arg(path).status()?.success();
    ok.then_some(()).ok_or_else(|| std::io::Error::other(format!("mkfifo {} failed", path.display())))
}

/// A sparse file of `len` bytes (no disk used): huge by `stat`, cheap to make.
pub fn sparse(path: &Path, len: u64) -> std::io::Result<()> {
    std::fs::File::create(path)?.set_len(len)
}

/// A symbolic link at `path` to `/dev/zero` (a file that never ends).
pub fn link_to_dev_zero(path: &Path) -> std::io::Result<()> {
    std::os::unix::fs::symlink("/dev/zero", path)
}

/// A PNG of a few dozen bytes whose header declares `width`×`height` RGB
/// pixels (a decompression bomb's header; its data is one empty block).
pub fn png_bomb(width: u32, height: u32) -> Vec<u8> {
    let mut out = b"\x89PNG\r\n\x1a\n".to_vec();
    let mut ihdr = Vec::new();
    ihdr.extend(width.to_be_bytes());
    ihdr.extend(height.to_be_bytes());
    ihdr.extend([8, 2, 0, 0, 0]);
    chunk(&mut out, b"IHDR", &ihdr);
    chunk(&mut out, b"IDAT", &[0x78, 0x9c, 0x03, 0x00, 0x00, 0x00, 0x00, 0x01]);
    chunk(&mut out, b"IEND", &[]);
    out
}

fn chunk(out: &mut Vec<u8>, kind: &[u8; 4], data: &[u8]) {
    out.extend((data.len() as u32).to_be_bytes());
    let start = out.len();
    out.extend(kind);
    out.extend(data);
    let crc = crc32(&out[start..]);
    out.extend(crc.to_be_bytes());
}

/// CRC-32 (IEEE), as PNG chunks carry it.
fn crc32(bytes: &[u8]) -> u32 {
    let mut c = 0xFFFF_FFFFu32;
    for &b in bytes {
        c ^= b as u32;
        for _ in 0..8 {
            c = if c & 1 != 0 { 0xEDB8_8320 ^ (c >> 1) } else { c >> 1 };
        }
    }
    !c
}

/// Cut a file to its first `keep` bytes.
pub fn truncate(path: &Path, keep: u64) -> std::io::Result<()> {
    std::fs::OpenOptions::new().write(true).open(path)?.set_len(keep)
}

/// YAML nested `depth` levels deep, in block (`a:\n  a:\n …`) or flow (`[[[…]]]`) form.
pub fn deep_yaml(depth: usize, flow: bool) -> String {
    if flow {
        format!("x: {}{}", "[".repeat(depth), "]".repeat(depth))
    } else {
        (0..depth).map(|d| format!("{}a:\n", "  ".repeat(d))).collect()
    }
}
