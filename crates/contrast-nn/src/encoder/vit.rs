//! `model.encoder: vit_tiny | vit_small | vit_base | vit`: timm's
//! `VisionTransformer` without its head, with timm's names (`cls_token`,
//! `pos_embed`, `patch_embed.proj`, `blocks.N.{norm1,attn.qkv,attn.proj,norm2,
//! mlp.fc1,mlp.fc2}`, `norm`, or `fc_norm` with mean pooling), so a timm state
//! dict imports by identity and open_clip's through a declared table.
//!
//! Each preset fills `model.vit.*` with timm's values (patch 16; tiny 192 wide,
//! 3 heads; small 384, 6; base 768, 12; 12 blocks, MLP ratio 4, LayerNorm eps
//! 1e-6, exact GELU, qkv and patch biases, class-token pooling); every key given
//! overrides the preset's (`vit_tiny` with `patch_size: 4` at 28 px, `vit_base`
//! with `patch_size: 32` for ViT-B/32). `vit` needs `dim`, `depth` and `heads`.
//! open_clip's towers are `pre_norm: true, ln_eps: 1e-5, patch_bias: false`
//! (and `act: quick_gelu` for OpenAI's weights).
//!
//! The position embedding covers the grid of `data.image_size`; views of
//! another size (multi-crop) resample it bicubically, as timm's
//! `dynamic_img_size` does. Attention runs through libtorch's
//! `scaled_dot_product_attention`.

use super::{activation, Encoder, EncoderEntry, EncoderInput};
use crate::Result;
use contrast_config::{invalid, ConfigError, EncoderSpec, ImageInfo, Norm, Settings, TextAct};
use serde::{Deserialize, Serialize};
use tch::nn;
use tch::{Kind, Tensor};

/// `model.vit.pool`: what the representation is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Pool {
    /// The class token after the final norm (timm `global_pool='token'`, open_clip `tok`).
    Cls,
    /// The mean of the patch tokens, then `fc_norm` (timm `global_pool='avg'`).
    Mean,
}

/// `model.vit.*`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct VitParams {
    /// Side of the square patches (must divide the image size).
    pub patch_size: i64,
    /// Token width.
    pub dim: i64,
    /// Transformer blocks.
    pub depth: i64,
    /// Attention heads (must divide `dim`).
    pub heads: i64,
    /// MLP hidden width as a multiple of `dim`.
    pub mlp_ratio: f64,
    /// `cls` (the class token) or `mean` (of the patch tokens).
    pub pool: Pool,
    /// A LayerNorm before the blocks (`norm_pre`; open_clip's `ln_pre`).
    pub pre_norm: bool,
    /// Epsilon of every LayerNorm (timm 1e-6, open_clip 1e-5).
    pub ln_eps: f64,
    /// `gelu` or `quick_gelu`.
    pub act: TextAct,
    /// Bias in the qkv projection.
    pub qkv_bias: bool,
    /// Bias in the patch embedding (open_clip has none).
    pub patch_bias: bool,
}

impl Default for VitParams {
    fn default() -> Self {
        Self {
            patch_size: 16,
            dim: 0,
            depth: 0,
            heads: 0,
            mlp_ratio: 4.0,
            pool: Pool::Cls,
            pre_norm: false,
            ln_eps: 1e-6,
            act: TextAct::Gelu,
            qkv_bias: true,
            patch_bias: true,
        }
    }
}

/// A ViT's keys under `model.*`: only `model.vit` (LayerNorm throughout; `model.norm` does not apply).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct VitKeys {
    /// The transformer's shape and conventions.
    pub vit: VitParams,
}

/// A ViT preset (`vit` has no sizes of its own).
pub struct VitSpec {
    name: &'static str,
    /// (dim, depth, heads), or zeros for `vit`.
    size: (i64, i64, i64),
}

/// ViT-Tiny/16 (timm `vit_tiny_patch16_224`).
pub const VIT_TINY: VitSpec = VitSpec { name: "vit_tiny", size: (192, 12, 3) };
/// ViT-Small/16 (timm `vit_small_patch16_224`).
pub const VIT_SMALL: VitSpec = VitSpec { name: "vit_small", size: (384, 12, 6) };
/// ViT-Base/16 (timm `vit_base_patch16_224`).
pub const VIT_BASE: VitSpec = VitSpec { name: "vit_base", size: (768, 12, 12) };
/// A ViT of any size (`model.vit.dim`, `depth` and `heads` given).
pub const VIT: VitSpec = VitSpec { name: "vit", size: (0, 0, 0) };

/// The registrations of the presets and of `vit`.
pub const ENTRIES: [EncoderEntry; 4] = [
    EncoderEntry { spec: &VIT_TINY, build },
    EncoderEntry { spec: &VIT_SMALL, build },
    EncoderEntry { spec: &VIT_BASE, build },
    EncoderEntry { spec: &VIT, build },
];

fn params(settings: &Settings) -> std::result::Result<VitParams, ConfigError> {
    Ok(settings.parse::<VitKeys>("model")?.vit)
}

impl EncoderSpec for VitSpec {
    fn name(&self) -> &'static str {
        self.name
    }

    fn defaults(&self) -> Settings {
        let (dim, depth, heads) = self.size;
        Settings::of(&VitKeys { vit: VitParams { dim, depth, heads, ..VitParams::default() } })
    }

    fn check(&self, settings: &Settings, image: &ImageInfo) -> std::result::Result<(), ConfigError> {
        let v = params(settings)?;
        for (key, x) in [("dim", v.dim), ("depth", v.depth), ("heads", v.heads), ("patch_size", v.patch_size)] {
            if x <= 0 {
                return Err(invalid(
                    format!("model.vit.{key}"),
                    format!("must be positive, got {x} ({} needs it)", self.name),
                ));
            }
        }
        let d = v.dim.max(1) as u64;
        contrast_config::within_ceiling(
            "model.vit.dim",
            d,
            contrast_config::model::MAX_WIDTH,
            4 * 12 * d,
            "each block's weights (12·dim² f32)",
        )?;
        contrast_config::within_ceiling("model.vit.depth", v.depth as u64, 256, 4 * 12 * d * d, "the blocks")?;
        if v.dim % v.heads != 0 {
            return Err(invalid("model.vit.heads", format!("{} heads do not divide model.vit.dim {}", v.heads, v.dim)));
        }
        if image.size % v.patch_size != 0 {
            return Err(invalid(
                "model.vit.patch_size",
                format!("{} does not divide the image size {} (data.image_size; 28 for IDX)", v.patch_size, image.size),
            ));
        }
        if !(v.mlp_ratio > 0.0) || !(v.ln_eps > 0.0) {
            return Err(invalid("model.vit.mlp_ratio", "mlp_ratio and ln_eps must be > 0"));
        }
        Ok(())
    }

    /// LayerNorm only: no batch statistics.
    fn norm(&self, _settings: &Settings) -> Norm {
        Norm::Layer
    }

    fn freeze_groups(&self, settings: &Settings) -> Vec<String> {
        let depth = params(settings).map(|v| v.depth).unwrap_or(0);
        std::iter::once("embed".to_string()).chain((0..depth).map(|i| format!("blocks.{i}"))).collect()
    }
}

fn build(p: &nn::Path, input: &EncoderInput) -> Result<Box<dyn Encoder>> {
    let v = params(input.settings).map_err(|e| crate::NnError::Param(e.to_string()))?;
    Ok(Box::new(Vit::new(p, &v, input.image)))
}

fn linear(p: nn::Path, i: i64, o: i64, bias: bool) -> nn::Linear {
    // timm's init: truncated normal (σ 0.02) weights, zero biases.
    let ws_init = nn::Init::Randn { mean: 0.0, stdev: 0.02 };
    nn::linear(p, i, o, nn::LinearConfig { ws_init, bs_init: Some(nn::Init::Const(0.0)), bias })
}

fn layer_norm(p: nn::Path, dim: i64, eps: f64) -> nn::LayerNorm {
    nn::layer_norm(p, vec![dim], nn::LayerNormConfig { eps, ..Default::default() })
}

/// `x·Wᵀ + b` as one `linear` (addmm) like PyTorch's `F.linear`; tch's
/// `Linear` runs a matmul and a separate bias add (an extra pass and an extra
/// autograd node per layer, about 15 % of a ViT-S step on 2 cores).
fn linear_fused(x: &Tensor, l: &nn::Linear) -> Tensor {
    x.linear(&l.ws, l.bs.as_ref())
}

/// A pre-norm transformer block.
struct Block {
    norm1: nn::LayerNorm,
    qkv: nn::Linear,
    proj: nn::Linear,
    norm2: nn::LayerNorm,
    fc1: nn::Linear,
    fc2: nn::Linear,
    heads: i64,
    act: TextAct,
}

impl Block {
    fn new(p: &nn::Path, v: &VitParams) -> Self {
        let (d, hidden) = (v.dim, (v.dim as f64 * v.mlp_ratio) as i64);
        Self {
            norm1: layer_norm(p / "norm1", d, v.ln_eps),
            qkv: linear(p / "attn" / "qkv", d, 3 * d, v.qkv_bias),
            proj: linear(p / "attn" / "proj", d, d, true),
            norm2: layer_norm(p / "norm2", d, v.ln_eps),
            fc1: linear(p / "mlp" / "fc1", d, hidden, true),
            fc2: linear(p / "mlp" / "fc2", hidden, d, true),
            heads: v.heads,
            act: v.act,
        }
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        let (b, n, c) = x.size3().expect("[B, N, C] tokens");
        let qkv = linear_fused(&x.apply(&self.norm1), &self.qkv).view([b, n, 3, self.heads, c / self.heads]);
        let qkv = qkv.permute([2, 0, 3, 1, 4]);
        let a = Tensor::scaled_dot_product_attention::<Tensor>(
            &qkv.get(0),
            &qkv.get(1),
            &qkv.get(2),
            None,
            0.0,
            false,
            None,
            false,
        );
        let x = x + linear_fused(&a.transpose(1, 2).reshape([b, n, c]), &self.proj);
        let m = linear_fused(&activation(&linear_fused(&x.apply(&self.norm2), &self.fc1), self.act), &self.fc2);
        x + m
    }
}

/// A vision transformer without its head: images → `[B, dim]`.
pub struct Vit {
    proj: nn::Conv2D,
    cls_token: Tensor,
    pos_embed: Tensor,
    norm_pre: Option<nn::LayerNorm>,
    blocks: Vec<Block>,
    /// `norm` (class-token pooling) or `fc_norm` (mean pooling).
    norm: nn::LayerNorm,
    pool: Pool,
    grid: i64,
    dim: i64,
}

impl Vit {
    /// Build under `p` for `image` (the position embedding covers its grid).
    pub fn new(p: &nn::Path, v: &VitParams, image: ImageInfo) -> Self {
        let (d, grid) = (v.dim, image.size / v.patch_size);
        let cfg = nn::ConvConfig { stride: v.patch_size, bias: v.patch_bias, ..Default::default() };
        let proj = nn::conv2d(p / "patch_embed" / "proj", image.channels, d, v.patch_size, cfg);
        let cls_token = p.var("cls_token", &[1, 1, d], nn::Init::Randn { mean: 0.0, stdev: 1e-6 });
        let pos_embed = p.var("pos_embed", &[1, grid * grid + 1, d], nn::Init::Randn { mean: 0.0, stdev: 0.02 });
        let norm_pre = v.pre_norm.then(|| layer_norm(p / "norm_pre", d, v.ln_eps));
        let blocks = (0..v.depth).map(|i| Block::new(&(p / "blocks" / i), v)).collect();
        let norm_name = if v.pool == Pool::Cls { "norm" } else { "fc_norm" };
        let norm = layer_norm(p / norm_name, d, v.ln_eps);
        Self { proj, cls_token, pos_embed, norm_pre, blocks, norm, pool: v.pool, grid, dim: d }
    }

    /// The position embedding for a grid of `h × w` patches (resampled when it differs).
    fn pos_embed_for(&self, h: i64, w: i64) -> Tensor {
        if h == self.grid && w == self.grid {
            return self.pos_embed.shallow_clone();
        }
        resample_pos_embed(&self.pos_embed, self.grid, (h, w))
    }
}

/// timm's `resample_abs_pos_embed`: the class position kept, the grid's
/// positions resampled bicubically (antialiased when shrinking) to `to`.
pub fn resample_pos_embed(pos: &Tensor, grid: i64, to: (i64, i64)) -> Tensor {
    let d = pos.size()[2];
    let (cls, patches) = (pos.narrow(1, 0, 1), pos.narrow(1, 1, grid * grid));
    let img = patches.reshape([1, grid, grid, d]).permute([0, 3, 1, 2]).to_kind(Kind::Float);
    let out = if to.0 < grid || to.1 < grid {
        img.internal_upsample_bicubic2d_aa([to.0, to.1], false, None, None)
    } else {
        img.upsample_bicubic2d([to.0, to.1], false, None, None)
    };
    let out = out.permute([0, 2, 3, 1]).reshape([1, to.0 * to.1, d]).to_kind(pos.kind());
    Tensor::cat(&[cls, out], 1)
}

impl Encoder for Vit {
    fn forward_t(&self, x: &Tensor, _train: bool) -> Tensor {
        let t = x.apply(&self.proj); // [B, C, h, w]
        let (b, h, w) = (t.size()[0], t.size()[2], t.size()[3]);
        let t = t.flatten(2, 3).transpose(1, 2);
        let cls = self.cls_token.expand([b, 1, self.dim], true);
        let mut t = Tensor::cat(&[cls, t], 1) + self.pos_embed_for(h, w);
        if let Some(n) = &self.norm_pre {
            t = t.apply(n);
        }
        for blk in &self.blocks {
            t = blk.forward(&t);
        }
        match self.pool {
            Pool::Cls => t.apply(&self.norm).select(1, 0),
            Pool::Mean => t.narrow(1, 1, h * w).mean_dim(1, false, t.kind()).apply(&self.norm),
        }
    }

    fn out_dim(&self) -> i64 {
        self.dim
    }

    fn freeze_prefixes(&self, groups: &[String]) -> Vec<String> {
        groups
            .iter()
            .flat_map(|g| match g.as_str() {
                "embed" => ["patch_embed.", "cls_token", "pos_embed", "norm_pre."].map(String::from).to_vec(),
                block => vec![format!("{block}.")],
            })
            .collect()
    }
}
