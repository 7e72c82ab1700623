//! Encoders, heads, losses, the global-batch engine and optimisers (libtorch via `tch`).
//!
//! Models here know nothing about distribution (torchtitan's rule): the
//! [`engine`] gathers embeddings, runs a loss head on the global batch and
//! scatters the gradient back, as docs/design.md invariant 1 describes.
//! Methods and encoders each live in a file of their own with their config
//! keys beside them, listed in the [`registry`].
#![warn(missing_docs)]

pub mod ema;
pub mod encoder;
pub mod engine;
pub mod head;
pub mod import;
mod import_table;
pub mod kmeans;
pub mod loss;
pub mod method;
pub mod optim;
mod overlap;
pub mod precision;
pub mod queue;
pub mod registry;
pub mod state;
pub mod whiten;
pub mod wire;

pub use engine::{Gathered, GlobalBatch, StepOutput, Towers};
pub use method::Method;
pub use registry::Registry;
pub use tch;

/// Errors of the nn crate.
#[derive(Debug, thiserror::Error)]
pub enum NnError {
    /// An error from libtorch (shape mismatch, device, I/O of tensors).
    #[error("libtorch: {0}")]
    Torch(#[from] tch::TchError),
    /// A shape that does not fit the operation; the message names both.
    #[error("shape: {0}")]
    Shape(String),
    /// A bad parameter value.
    #[error("{0}")]
    Param(String),
}

/// Result alias of the nn crate.
pub type Result<T> = std::result::Result<T, NnError>;

/// Flatten a tensor into a host vector of `T` (copies from any device).
pub fn to_host<T: tch::kind::Element + Copy>(t: &tch::Tensor) -> Vec<T> {
    let flat = t.detach().to_device(tch::Device::Cpu).to_kind(T::KIND).contiguous().view([-1]);
    let n = flat.numel();
    let mut out = vec![T::ZERO; n];
    flat.copy_data(&mut out, n);
    out
}
