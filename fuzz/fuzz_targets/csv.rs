#![no_main]
//! A caption CSV/TSV (open_clip's layout) → the source → every row fetched.
use contrast_data::source::{CsvSource, Source};
use libfuzzer_sys::fuzz_target;

mod common;

fuzz_target!(|data: &[u8]| {
    let Some((&sep, rest)) = data.split_first() else { return };
    let path = common::scratch().join("train.csv");
    std::fs::write(&path, rest).unwrap();
    let sep = [None, Some(b','), Some(b'\t')][sep as usize % 3];
    if let Ok(src) = CsvSource::open(&path, "filepath", "title", sep) {
        for i in 0..src.len().min(8) {
            let _ = src.fetch(i);
            let _ = src.locate(i);
        }
        let _ = src.fingerprint();
    }
});
