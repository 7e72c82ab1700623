//! `model.*`: which encoder, the heads' sizes and the text tower. The
//! encoder's own keys (`model.width`, `model.norm`, …) are declared by the
//! encoder ([`crate::EncoderSpec`]) and checked there.

use crate::applies::Rules;
use crate::{invalid, ConfigError, Settings};
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

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
    /// Groups of the image encoder that get no gradient, no decay and no update
    /// (ResNet `stem`, `layer1`…`layer4`; ViT `embed`, `blocks.N`); their batch
    /// norm stays in eval mode.
    pub freeze: Vec<String>,
    /// A safetensors file of weights to start from (torchvision, timm or
    /// open_clip names, or a `trainer export`); `train.resume` takes precedence.
    pub pretrained: Option<PathBuf>,
    /// The names in `pretrained`: `auto` (detected from the keys), `torchvision`,
    /// `timm`, `open_clip` or `contrast`.
    pub pretrained_format: PretrainedFormat,
    /// A prefix stripped from every key of `pretrained` (`module.`, `backbone.`), as a prefix.
    pub pretrained_prefix: String,
    /// Globs of `pretrained` keys to leave out (`fc.*`, `head.*`).
    pub pretrained_skip: Vec<String>,
    /// Unused keys of `pretrained` are an error listing them (false: a warning).
    pub pretrained_strict: bool,
    /// The sha256 of `pretrained` (written by the run into its config.yaml; when
    /// given, rank 0 checks the file against it).
    pub pretrained_sha256: Option<String>,
    /// The encoder's own keys as given (`width`, `embed_dim`, `norm` for `convnet`).
    #[serde(flatten)]
    pub encoder_keys: Settings,
}

/// `model.pretrained_format`: whose names a weight file uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PretrainedFormat {
    /// Detected from the key names.
    Auto,
    /// torchvision's ResNet names (`conv1`, `layer1.0.bn1`, `fc`).
    Torchvision,
    /// timm's ViT names (`patch_embed.proj`, `blocks.N.attn.qkv`, `head`).
    Timm,
    /// open_clip's names (`visual.*`, `transformer.resblocks.*`, `token_embedding`, …).
    OpenClip,
    /// This trainer's own names (`backbone.*`, a `trainer export` file).
    Contrast,
}

impl Default for ModelConfig {
    fn default() -> Self {
        Self {
            encoder: "convnet".into(),
            proj_dim: 64,
            proj_hidden: 512,
            text: TextConfig::default(),
            freeze: Vec::new(),
            pretrained: None,
            pretrained_format: PretrainedFormat::Auto,
            pretrained_prefix: String::new(),
            pretrained_skip: Vec::new(),
            pretrained_strict: true,
            pretrained_sha256: None,
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
    /// Activation of the MLPs: `gelu` or `quick_gelu` (x·σ(1.702x), OpenAI CLIP's).
    pub act: TextAct,
    /// Causal attention (CLIP's text tower); false: every token sees every
    /// token of its text (BERT's, SimCSE's encoder), padding masked.
    pub causal: bool,
    /// Where the tower pools a text: `last` (its end token, CLIP), `mean` (over
    /// its tokens, start and end included) or `first` (its start token, BERT's `[CLS]`).
    pub pool: TextPool,
    /// Dropout probability on the embeddings, the attention output and the MLP
    /// output of every block (BERT's hidden dropout); its masks are keyed on
    /// (seed, step, global row, view, layer), not on libtorch's generator.
    pub dropout: f64,
}

/// `model.text.pool`: where the text tower pools a text.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TextPool {
    /// The text's last token (its end token).
    Last,
    /// The mean over the text's tokens.
    Mean,
    /// The text's first token (its start token).
    First,
}

/// `model.text.act` (and `model.vit.act`): the transformer MLP's activation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TextAct {
    /// The exact (erf) GELU.
    Gelu,
    /// x·σ(1.702x), as OpenAI's CLIP models (open_clip `QuickGELU`).
    QuickGelu,
}

impl Default for TextConfig {
    fn default() -> Self {
        Self {
            width: 64,
            layers: 2,
            heads: 4,
            context: 48,
            act: TextAct::Gelu,
            causal: true,
            pool: TextPool::Last,
            dropout: 0.0,
        }
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

/// The `model.*` keys of every encoder (the rest are the encoder's own).
pub const SHARED_KEYS: &[&str] = &[
    "encoder",
    "proj_dim",
    "proj_hidden",
    "text",
    "freeze",
    "pretrained",
    "pretrained_format",
    "pretrained_prefix",
    "pretrained_skip",
    "pretrained_strict",
    "pretrained_sha256",
];

/// The head keys of `model.*` the method does not read, and the import keys without a file.
pub(crate) fn rules(m: &ModelConfig, method: &str, reads: &[&str], r: &mut Rules) {
    let unread: Vec<&str> = HEAD_KEYS.iter().copied().filter(|k| !reads.contains(k)).collect();
    r.keys("model", &unread, &format!("method {method}"), true);
    let import =
        ["pretrained_format", "pretrained_prefix", "pretrained_skip", "pretrained_strict", "pretrained_sha256"];
    r.keys("model", &import, "a model without model.pretrained", m.pretrained.is_none());
}

/// `model.freeze` names groups of the encoder.
pub(crate) fn check_freeze(m: &ModelConfig, groups: &[String]) -> Result<(), ConfigError> {
    for g in &m.freeze {
        if !groups.contains(g) {
            let known = if groups.is_empty() { "none".to_string() } else { groups.join(", ") };
            return Err(invalid(
                "model.freeze",
                format!("`{g}` is not a group of encoder {} (its groups: {known})", m.encoder),
            ));
        }
    }
    Ok(())
}

/// The largest width of a head or of the text tower (model.proj_dim, proj_hidden, text.width).
pub const MAX_WIDTH: u64 = 65_536;
/// The longest caption context (`model.text.context`): its attention map is context² per head.
pub const MAX_TEXT_CONTEXT: u64 = 8_192;

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
    let hidden = m.proj_hidden.max(1) as u64;
    crate::within_ceiling(
        "model.proj_dim",
        m.proj_dim as u64,
        MAX_WIDTH,
        4 * hidden,
        "the projection's last weight (proj_hidden × proj_dim f32)",
    )?;
    crate::within_ceiling(
        "model.proj_hidden",
        m.proj_hidden as u64,
        MAX_WIDTH,
        4 * MAX_WIDTH,
        "the projection's hidden weights",
    )?;
    let w = m.text.width.max(1) as u64;
    crate::within_ceiling("model.text.width", w, MAX_WIDTH, 4 * 12 * w, "each text block's weights (12·width² f32)")?;
    crate::within_ceiling("model.text.layers", m.text.layers as u64, 256, 4 * 12 * w * w, "the text blocks")?;
    let ctx = m.text.context.max(0) as u64;
    crate::within_ceiling(
        "model.text.context",
        ctx,
        MAX_TEXT_CONTEXT,
        4 * ctx,
        "one attention map per head and caption (context² f32)",
    )?;
    if m.text.width % m.text.heads != 0 {
        return Err(invalid(
            "model.text.heads",
            format!("{} heads do not divide model.text.width {}", m.text.heads, m.text.width),
        ));
    }
    if m.text.context < 8 {
        return Err(invalid("model.text.context", format!("must be ≥ 8, got {}", m.text.context)));
    }
    if !(0.0..1.0).contains(&m.text.dropout) {
        return Err(invalid("model.text.dropout", format!("must lie in [0, 1), got {}", m.text.dropout)));
    }
    if m.text.causal && m.text.pool == TextPool::First {
        return Err(invalid(
            "model.text.pool",
            "`first` under causal attention sees the start token alone: set model.text.causal: false",
        ));
    }
    if let Some(p) = m.pretrained.as_ref().filter(|p| p.extension().is_some_and(|e| e != "safetensors")) {
        return Err(invalid(
            "model.pretrained",
            format!(
                "{} is not a .safetensors file: convert a .pth, .ckpt or TorchScript file with \
                 tools/convert_weights.py (it runs in the project's venv)",
                p.display()
            ),
        ));
    }
    Ok(())
}
