#![no_main]
//! Encoded images (JPEG, PNG, WebP) → decode → the SimCLR RGB augmentation.
use contrast_data::rgb::{decode, RgbAugParams, RgbAugmenter};
use libfuzzer_sys::fuzz_target;
use rand::SeedableRng;

fuzz_target!(|data: &[u8]| {
    if let Ok(img) = decode(data) {
        let mut aug = RgbAugmenter::new(RgbAugParams::simclr(16));
        let mut out = vec![0f32; 3 * 16 * 16];
        let _ = aug.apply(&img, &mut rand_chacha::ChaCha8Rng::seed_from_u64(1), &mut out);
    }
});
