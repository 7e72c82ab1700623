//! `model.*`: which encoder, the heads' sizes and the text tower. The
//! encoder's own keys (`model.width`, `model.norm`, …) are declared by the
//! encoder ([`crate::EncoderSpec`]) and checked there.

use crate::applies::Rules;
use crate::{invalid, ConfigError, Settings};
use serde::{Deserialize, Serialize};

/// `model.*`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct ModelConfig {
    /// Image encoder: a registered encoder (`convnet`, a small CNN for small images).
    pub encoder: String,
    /// Dimension of the projection head's output (what the loss sees).
    pub proj_dim: i64,
    /// Hidden width of the projection MLP (methods with an MLP head).
    pub proj_hidden: i64,
    /// Text tower (image–text methods).
    pub text: TextConfig,
    /// The encoder's own keys as given (`width`, `embed_dim`, `norm` for `convnet`).
    #[serde(flatten)]
    pub encoder_keys: Settings,
}

impl Default for ModelConfig {
    fn default() -> Self {
        Self {
            encoder: "convnet".into(),
            proj_dim: 64,
            proj_hidden: 512,
            text: TextConfig::default(),
            encoder_keys: Settings::default(),
        }
    }
}

/// `model.text.*`: the CLIP text tower.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TextConfig {
    /// Transformer width.
    pub width: i64,
    /// Transformer layers.
    pub layers: i64,
    /// Attention heads (must divide width).
    pub heads: i64,
    /// Context length in tokens (byte-level tokens plus start and end).
    pub context: i64,
}

impl Default for TextConfig {
    fn default() -> Self {
        Self { width: 64, layers: 2, heads: 4, context: 48 }
    }
}

/// `loss.*`
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Norm {
    /// BatchNorm (has batch statistics: breaks exact parity across layouts).
    Batch,
    /// GroupNorm.
    Group,
    /// LayerNorm over channels (GroupNorm with one group).
    Layer,
    /// No normalisation.
    None,
}

/// A method's resolved settings (defaults filled in, checked).

/// The head keys of `model.*` (besides the encoder's own): a method reads some of them.
pub const HEAD_KEYS: [&str; 3] = ["proj_dim", "proj_hidden", "text"];

/// The head keys of `model.*` the method does not read.
pub(crate) fn rules(method: &str, reads: &[&str], r: &mut Rules) {
    let unread: Vec<&str> = HEAD_KEYS.iter().copied().filter(|k| !reads.contains(k)).collect();
    r.keys("model", &unread, &format!("method {method}"), true);
}

/// The heads' sizes and the text tower.
pub(crate) fn check(m: &ModelConfig) -> Result<(), ConfigError> {
    for (key, v) in [
        ("model.proj_dim", m.proj_dim),
        ("model.proj_hidden", m.proj_hidden),
        ("model.text.width", m.text.width),
        ("model.text.layers", m.text.layers),
        ("model.text.heads", m.text.heads),
    ] {
        if v <= 0 {
            return Err(invalid(key, format!("must be positive, got {v}")));
        }
    }
    if m.text.width % m.text.heads != 0 {
        return Err(invalid(
            "model.text.heads",
            format!("{} heads do not divide model.text.width {}", m.text.heads, m.text.width),
        ));
    }
    if m.text.context < 8 {
        return Err(invalid("model.text.context", format!("must be ≥ 8, got {}", m.text.context)));
    }
    Ok(())
}
