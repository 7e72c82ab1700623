#![no_main]
//! A Hugging Face tokenizer.json → `Tokenizer` → captions encoded into a context.
use contrast_data::text::Tokenizer;
use libfuzzer_sys::fuzz_target;

mod common;

fuzz_target!(
    init: {
        // libfuzzer-sys aborts on every panic, even one that is caught. `Tokenizer::from_file`
        // catches the tokenizers crate's panics by design (turning them into an error naming the
        // file), so keep the default hook: an uncaught panic still aborts (fuzz_target! checks).
        let _ = std::panic::take_hook();
    },
    |data: &[u8]| {
    let path = common::scratch().join("tokenizer.json");
    std::fs::write(&path, data).unwrap();
    if let Ok(tok) = Tokenizer::from_file(&path, 16) {
        let mut out = [0i64; 16];
        for text in ["a photo of a red square", "", "ünïcödé ☃ text\twith\ttabs"] {
            if tok.encode_into(text, &mut out).is_ok() {
                assert!(out.iter().all(|&id| (0..tok.vocab_size()).contains(&id)), "an id outside the vocabulary");
            }
        }
    }
    }
);
