//! Image and text encoders, one file per family, each with its own config keys
//! ([`contrast_config::EncoderSpec`]) beside its code. Nothing here knows
//! about ranks or collectives: the engine distributes, encoders only compute.
//!
//! - [`convnet`]: a small CNN for small images (`model.encoder: convnet`);
//! - [`text`]: the CLIP text tower.
//!
//! A method builds its image encoder with [`build`] (the encoder named by
//! `model.encoder`, found in the [`crate::registry`]), so every method accepts
//! every registered encoder.

pub mod convnet;
pub mod text;

use crate::method::Spec;
use crate::{NnError, Result};
use contrast_config::{Catalog, EncoderSpec, Settings};
use tch::nn;
use tch::Tensor;

/// An image encoder: images `[B, C, H, W]` → representations `[B, out_dim]`.
pub trait Encoder {
    /// The forward pass (`train` selects batch statistics and dropout).
    fn forward_t(&self, x: &Tensor, train: bool) -> Tensor;
    /// Dimension of the representation (what kNN evaluates; heads start from it).
    fn out_dim(&self) -> i64;
}

/// What an encoder is built from.
pub struct EncoderInput<'a> {
    /// Image channels (1 for IDX, 3 for decoded files).
    pub in_channels: i64,
    /// The encoder's own keys, defaults filled in.
    pub settings: &'a Settings,
}

/// A registered encoder: its config and its constructor.
#[derive(Clone, Copy)]
pub struct EncoderEntry {
    /// Keys, defaults and checks.
    pub spec: &'static dyn EncoderSpec,
    /// Build the encoder's variables under a path.
    pub build: fn(&nn::Path, &EncoderInput) -> Result<Box<dyn Encoder>>,
}

/// The image encoder of `spec` (`model.encoder` and its keys) under `p`.
pub fn build(p: &nn::Path, spec: &Spec) -> Result<Box<dyn Encoder>> {
    let name = &spec.model.encoder;
    let entry = crate::registry::encoder_entry(name)
        .ok_or_else(|| NnError::Param(format!("model.encoder `{name}` is not a registered encoder")))?;
    let settings = spec.model.encoder_keys.over(&entry.spec.defaults());
    entry.spec.check(&settings).map_err(|e| NnError::Param(e.to_string()))?;
    (entry.build)(p, &EncoderInput { in_channels: spec.in_channels, settings: &settings })
}

/// The names of the registered encoders (for messages).
pub fn names() -> Vec<&'static str> {
    crate::registry::Registry.encoders().iter().map(|e| e.name()).collect()
}
