#![no_main]
//! A checkpoint's files: `state.json` and a safetensors file, read as
//! `train.resume` and `trainer eval` read them. Input: the length of
//! `state.json` (u16 LE), `state.json`, the safetensors file.
use libfuzzer_sys::fuzz_target;

mod common;

fuzz_target!(|data: &[u8]| {
    if data.len() < 2 {
        return;
    }
    let (len, rest) = (u16::from_le_bytes([data[0], data[1]]) as usize, &data[2..]);
    let cut = len.min(rest.len());
    let dir = common::scratch();
    std::fs::write(dir.join("state.json"), &rest[..cut]).unwrap();
    std::fs::write(dir.join("model.safetensors"), &rest[cut..]).unwrap();
    let _ = trainer::checkpoint::read_state(&dir);
    let _ = trainer::checkpoint::read_tensors(&dir, "model.safetensors");
    // The resume's validation reads the header alone, bounded.
    let _ = trainer::checkpoint::header_shapes(&dir.join("model.safetensors"));
    let _ = trainer::checkpoint::check(&dir, None);
});
