//! `model.encoder: convnet`: a small CNN for small images (28×28 grayscale, or
//! RGB crops). Four 3×3 convolutions with w, 2w, 2w and embed_dim/16 channels,
//! two of stride 2, each followed by the chosen normalisation and ReLU,
//! average-pooled to a 4×4 grid and flattened, so the representation keeps
//! coarse layout (on Fashion-MNIST this beats global pooling by several kNN
//! points) → `[B, embed_dim]`.

use super::NormLayer;
use super::{Encoder, EncoderEntry, EncoderInput};
use crate::Result;
use contrast_config::{invalid, ConfigError, EncoderSpec, ImageInfo, Norm, Settings};
use serde::{Deserialize, Serialize};
use tch::nn;
use tch::Tensor;

/// Side of the spatial grid the last feature map is average-pooled to; the
/// representation is that grid flattened (`embed_dim / POOL_GRID²` channels).
pub const POOL_GRID: i64 = 4;

/// The convnet's keys under `model.*`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ConvnetKeys {
    /// Normalisation after each convolution: `group` (exact across layouts),
    /// `batch` (per-rank statistics: breaks exact parity), `layer` or `none`.
    pub norm: Norm,
    /// Channels of the first stage; later stages double it.
    pub width: i64,
    /// Dimension of the representation (what kNN evaluates): a 4×4 grid of
    /// embed_dim/16 channels, so a multiple of 16.
    pub embed_dim: i64,
}

impl Default for ConvnetKeys {
    fn default() -> Self {
        Self { norm: Norm::Group, width: 32, embed_dim: 1024 }
    }
}

/// The convnet's configuration.
pub struct ConvnetSpec;

impl EncoderSpec for ConvnetSpec {
    fn name(&self) -> &'static str {
        "convnet"
    }

    fn defaults(&self) -> Settings {
        Settings::of(&ConvnetKeys::default())
    }

    fn check(&self, settings: &Settings, _image: &ImageInfo) -> std::result::Result<(), ConfigError> {
        let k: ConvnetKeys = settings.parse("model")?;
        for (key, v) in [("model.width", k.width), ("model.embed_dim", k.embed_dim)] {
            if v <= 0 {
                return Err(invalid(key, format!("must be positive, got {v}")));
            }
        }
        let max = contrast_config::model::MAX_WIDTH;
        contrast_config::within_ceiling(
            "model.width",
            k.width as u64,
            4096,
            4 * 9 * 4 * k.width as u64 * 2,
            "the widest convolution (9·(2w)² f32 per unit of w)",
        )?;
        contrast_config::within_ceiling(
            "model.embed_dim",
            k.embed_dim as u64,
            max,
            4 * 512,
            "the first head weight (embed_dim × proj_hidden f32)",
        )?;
        let cells = POOL_GRID * POOL_GRID;
        if k.embed_dim % cells != 0 {
            return Err(invalid(
                "model.embed_dim",
                format!("{} is not a multiple of {cells} (a {POOL_GRID}×{POOL_GRID} grid of channels)", k.embed_dim),
            ));
        }
        Ok(())
    }

    fn norm(&self, settings: &Settings) -> Norm {
        settings.parse::<ConvnetKeys>("model").map(|k| k.norm).unwrap_or(Norm::Group)
    }
}

/// The registration of the convnet.
pub const ENTRY: EncoderEntry = EncoderEntry { spec: &ConvnetSpec, build: build_convnet };

fn build_convnet(p: &nn::Path, input: &EncoderInput) -> Result<Box<dyn Encoder>> {
    let k: ConvnetKeys = input.settings.parse("model").map_err(|e| crate::NnError::Param(e.to_string()))?;
    Ok(Box::new(ConvBackbone::new(p, input.image.channels, k.width, k.embed_dim, k.norm)))
}

/// The small convolutional encoder (variables `conv<k>.*`, `norm<k>.*`).
pub struct ConvBackbone {
    layers: Vec<(nn::Conv2D, NormLayer)>,
    /// Output dimension.
    pub embed_dim: i64,
}

impl ConvBackbone {
    /// Build under `p` for `in_channels`-channel images, with `width` channels in the first stage.
    pub fn new(p: &nn::Path, in_channels: i64, width: i64, embed_dim: i64, norm: Norm) -> Self {
        let last = embed_dim / (POOL_GRID * POOL_GRID);
        assert_eq!(
            last * POOL_GRID * POOL_GRID,
            embed_dim,
            "embed_dim must be a multiple of {}",
            POOL_GRID * POOL_GRID
        );
        let spec = [(in_channels, width, 1), (width, 2 * width, 2), (2 * width, 2 * width, 1), (2 * width, last, 2)];
        let layers = spec
            .iter()
            .enumerate()
            .map(|(k, &(i, o, stride))| {
                let cfg = nn::ConvConfig { stride, padding: 1, bias: norm == Norm::None, ..Default::default() };
                let conv = nn::conv2d(p / format!("conv{k}"), i, o, 3, cfg);
                (conv, NormLayer::new(p / format!("norm{k}"), norm, o, &[8, 4, 2, 1]))
            })
            .collect();
        Self { layers, embed_dim }
    }
}

impl Encoder for ConvBackbone {
    /// `[B, C, H, W]` → `[B, embed_dim]`.
    fn forward_t(&self, x: &Tensor, train: bool) -> Tensor {
        let mut h = x.shallow_clone();
        for (conv, norm) in &self.layers {
            h = norm.forward_t(&h.apply(conv), train).relu();
        }
        h.adaptive_avg_pool2d([POOL_GRID, POOL_GRID]).flatten(1, -1)
    }

    fn out_dim(&self) -> i64 {
        self.embed_dim
    }
}
