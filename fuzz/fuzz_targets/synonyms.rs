#![no_main]
//! A synonym file (EDA) → `Synonyms` → EDA on a caption.
use contrast_data::textaug::{eda, Synonyms};
use libfuzzer_sys::fuzz_target;
use rand::SeedableRng;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    if let Ok(syn) = Synonyms::parse(text) {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
        let _ = eda("a photo of the red square on a table", &syn, 0.3, &mut rng);
    }
});
