//! Counter-based seeding: one independent stream per (seed, epoch, sample, purpose).

use rand_chacha::rand_core::SeedableRng;
use rand_chacha::ChaCha8Rng;

/// SplitMix64 finaliser: a bijective mix of 64 bits.
pub fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Hash a sequence of keys into one seed.
pub fn key(parts: &[u64]) -> u64 {
    parts.iter().fold(0x5EED_u64, |h, &p| mix(h ^ mix(p)))
}

/// Purposes of random streams, so that two uses of one sample never share a stream.
#[derive(Debug, Clone, Copy)]
#[repr(u64)]
pub enum Stream {
    /// The epoch's permutation of the dataset.
    Permutation = 1,
    /// Augmentation of view `k` is `View as u64 + k`.
    View = 100,
    /// Caption template choice.
    Caption = 2,
    /// Shuffle-BN's permutation of a step's global batch.
    ShuffleBn = 3,
}

/// The generator for (seed, epoch, index, stream).
pub fn sample_rng(seed: u64, epoch: u64, index: u64, stream: u64) -> ChaCha8Rng {
    ChaCha8Rng::seed_from_u64(key(&[seed, epoch, index, stream]))
}
