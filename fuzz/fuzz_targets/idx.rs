#![no_main]
//! IDX image and label files, plain or gzip, as `data.dataset: fashion_mnist`
//! reads them. Input: a mode byte (bit 0: images gzip, bit 1: labels gzip),
//! the image file's length (u16 LE), the image file, the label file.
use libfuzzer_sys::fuzz_target;

mod common;

fuzz_target!(|data: &[u8]| {
    if data.len() < 3 {
        return;
    }
    let (mode, len, rest) = (data[0], u16::from_le_bytes([data[1], data[2]]) as usize, &data[3..]);
    let (images, labels) = rest.split_at(len.min(rest.len()));
    let dir = common::scratch();
    for f in std::fs::read_dir(&dir).unwrap().flatten() {
        let _ = std::fs::remove_file(f.path());
    }
    let gz = |b: bool| if b { ".gz" } else { "" };
    std::fs::write(dir.join(format!("train-images-idx3-ubyte{}", gz(mode & 1 == 1))), images).unwrap();
    std::fs::write(dir.join(format!("train-labels-idx1-ubyte{}", gz(mode & 2 == 2))), labels).unwrap();
    if let Ok(split) = contrast_data::Images::load_split(&dir, "train") {
        for i in 0..split.len().min(4) {
            let _ = split.image(i);
        }
    }
});
