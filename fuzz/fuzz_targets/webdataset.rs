#![no_main]
//! A WebDataset tar shard → index (and its cache, read back) → every sample fetched.
use contrast_data::source::{Source, WebDataset};
use libfuzzer_sys::fuzz_target;

mod common;

fuzz_target!(|data: &[u8]| {
    let dir = common::scratch();
    let shard = dir.join("000000.tar");
    let _ = std::fs::remove_file(dir.join("000000.tar.contrast-index"));
    std::fs::write(&shard, data).unwrap();
    for _ in 0..2 {
        // The second open reads the cache the first wrote.
        let Ok(ds) = WebDataset::open(shard.to_str().unwrap()) else { return };
        for i in 0..ds.len().min(8) {
            let _ = ds.fetch(i);
        }
        let _ = (ds.fingerprint(), ds.first_unlabelled());
    }
});
