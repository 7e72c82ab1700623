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
pub mod resnet;
pub mod text;
pub mod vit;

use crate::method::Spec;
use crate::{NnError, Result};
use contrast_config::{EncoderSpec, ImageInfo, Norm, Settings, TextAct};
use tch::nn::{self, Module, ModuleT};
use tch::Tensor;

/// An image encoder: images `[B, C, H, W]` → representations `[B, out_dim]`.
pub trait Encoder {
    /// The forward pass (`train` selects batch statistics and dropout).
    fn forward_t(&self, x: &Tensor, train: bool) -> Tensor;
    /// Dimension of the representation (what kNN evaluates; heads start from it).
    fn out_dim(&self) -> i64;
    /// The variable-name prefixes (relative to the encoder) of `model.freeze`'s groups.
    fn freeze_prefixes(&self, _groups: &[String]) -> Vec<String> {
        Vec::new()
    }
}

/// What an encoder is built from.
pub struct EncoderInput<'a> {
    /// The images it sees.
    pub image: ImageInfo,
    /// The encoder's own keys, defaults filled in.
    pub settings: &'a Settings,
    /// `model.freeze`: groups whose batch norm stays in eval mode.
    pub frozen: &'a [String],
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
    let image = ImageInfo { channels: spec.in_channels, size: spec.image_size };
    entry.spec.check(&settings, &image).map_err(|e| NnError::Param(e.to_string()))?;
    (entry.build)(p, &EncoderInput { image, settings: &settings, frozen: &spec.model.freeze })
}

/// A 2-d normalisation layer as `model.norm` chooses it (variables `weight`,
/// `bias` and, for batch norm, the running statistics).
pub(crate) enum NormLayer {
    Batch(nn::BatchNorm),
    Group(nn::GroupNorm),
    Identity,
}

impl NormLayer {
    /// `norm` over `channels`; group norm uses the largest of `groups` that divides them.
    pub(crate) fn new(p: nn::Path, norm: Norm, channels: i64, groups: &[i64]) -> Self {
        match norm {
            Norm::Batch => NormLayer::Batch(nn::batch_norm2d(p, channels, Default::default())),
            Norm::Group => {
                let groups = groups.iter().copied().find(|g| channels % g == 0).unwrap_or(1);
                NormLayer::Group(nn::group_norm(p, groups, channels, Default::default()))
            }
            // LayerNorm over (C, H, W) of each sample is GroupNorm with one group.
            Norm::Layer => NormLayer::Group(nn::group_norm(p, 1, channels, Default::default())),
            Norm::None => NormLayer::Identity,
        }
    }

    /// Zero the affine weight (torchvision's `zero_init_residual`).
    pub(crate) fn zero_weight(&self) {
        let ws = match self {
            NormLayer::Batch(b) => b.ws.as_ref(),
            NormLayer::Group(g) => g.ws.as_ref(),
            NormLayer::Identity => None,
        };
        if let Some(w) = ws {
            tch::no_grad(|| {
                let _ = w.shallow_clone().zero_();
            });
        }
    }

    pub(crate) fn forward_t(&self, x: &Tensor, train: bool) -> Tensor {
        match self {
            NormLayer::Batch(b) => b.forward_t(x, train),
            NormLayer::Group(g) => g.forward(x),
            NormLayer::Identity => x.shallow_clone(),
        }
    }
}

/// The transformer MLPs' activation (text tower, ViT): exact GELU, or OpenAI CLIP's x·σ(1.702x).
pub fn activation(x: &Tensor, act: TextAct) -> Tensor {
    match act {
        TextAct::Gelu => x.gelu("none"),
        TextAct::QuickGelu => x * (x * 1.702).sigmoid(),
    }
}
