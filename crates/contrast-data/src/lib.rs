//! Datasets, augmentations, tokenizer, sampler and the prefetching pipeline.
//!
//! No torch here: the pipeline hands the trainer [`HostBatch`]es of plain
//! `f32`/`i64` buffers. Every random choice is keyed on (seed, epoch, global
//! sample index) — docs/design.md invariant 2 — so batches do not depend on the
//! world size, the rank, the worker count or thread timing.
#![warn(missing_docs)]

pub mod augment;
pub mod hostile;
pub mod idx;
pub mod limits;
pub mod lines;
pub mod mix;
pub mod pipeline;
pub mod randaug;
pub mod rgb;
pub mod rng;
pub mod sampler;
pub mod schedule;
pub mod source;
pub mod text;
pub mod textaug;

pub use augment::{AugParams, Augmenter};
pub use idx::Images;
pub use pipeline::{HostBatch, Mode, Next, Pipeline, PipelineConfig};
pub use sampler::{Sampler, Sampling};

/// A 64-bit fingerprint of a sequence of byte strings (SHA-256, each part
/// length-prefixed so `["ab","c"]` and `["a","bc"]` differ). Ranks all-reduce
/// it to check that they opened the same dataset.
pub fn fingerprint<'a>(parts: impl IntoIterator<Item = &'a [u8]>) -> u64 {
    use sha2::Digest;
    let mut h = sha2::Sha256::new();
    for p in parts {
        h.update((p.len() as u64).to_le_bytes());
        h.update(p);
    }
    u64::from_le_bytes(h.finalize()[..8].try_into().expect("8 bytes"))
}

/// Errors of the data crate; each names the file or the size at fault.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// A file could not be read.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The file.
        path: std::path::PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A file is not in the expected format.
    #[error("{path}: {message}")]
    Format {
        /// The file.
        path: std::path::PathBuf,
        /// What is wrong.
        message: String,
    },
    /// The dataset is too small for the requested batch.
    #[error("{0}")]
    Size(String),
    /// A worker thread panicked or the pipeline stopped.
    #[error("data pipeline: {0}")]
    Pipeline(String),
}
