//! Contrastive predictive coding on images (van den Oord et al. 2018, §3.3;
//! Hénaff et al. 2019): the survey's InfoNCE section.
//!
//! - Each image (the first view) is cut into a grid of overlapping square
//!   patches (`method.patch_size`, `method.patch_stride`): R rows × C columns.
//! - The backbone encodes every patch on its own: z_{r,c} `[embed_dim]`.
//! - A GRU runs down each column (`method.context_dim` units): the context
//!   c_{r,c} summarises rows 0..=r of column c.
//! - For each offset k = 1..=`method.offsets` there is one bilinear map W_k
//!   `[embed_dim, context_dim]` (`predict.k<k>.weight`, a loss-head
//!   parameter). c_{r,c} scores z_{r+k,c} of every image of the **global**
//!   batch at the same position through [`crate::loss::cpc_share`]: its own
//!   image's patch is the positive, the other N − 1 images' are negatives.
//! - The loss is the mean of those InfoNCE terms over offsets and positions
//!   (each term a mean over the N contexts).
//! - With `method.temperature` > 0 a score is instead the cosine of the
//!   prediction W_k c and the code z over that temperature (the same
//!   `cpc_share`): the bilinear codes share a large common component, which
//!   the normalised scores spread out.
//!
//! Evaluation embeds the whole image with the patch encoder (the backbone's
//! own features): a convnet's filters slide over the whole image as over a
//! patch, and its pooled grid keeps the layout that a mean over the patch
//! codes would lose (that mean gave 75.4 % kNN untrained on Fashion-MNIST,
//! against 80.3 % for the whole image).
//! Where this differs from the papers: they predict with a PixelCNN (v2) or
//! GRU over a 7 × 7 grid of 64-pixel patches and draw negatives from other
//! positions too; here the negatives are the same position's patches of the
//! other images (so P ranks × B equals 1 rank × P·B exactly).

use super::{set_kind, settings, Batch, Method, MethodEntry, Share, Spec};
use crate::encoder::{self, Encoder};
use crate::engine::{Gathered, Towers};
use crate::loss::{cpc_share, Ctx, GlobalSum};
use crate::{NnError, Result};
use contrast_config::{invalid, AugmentPreset, ConfigError, LossKind, MethodSpec, RunInfo, Settings};
use serde::{Deserialize, Serialize};
use tch::nn::{self, VarStore, RNN};
use tch::Tensor;

/// CPC's `method.*` keys.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CpcKeys {
    /// Side of a square patch, in pixels.
    pub patch_size: i64,
    /// Step between patches (less than `patch_size`: the patches overlap).
    pub patch_stride: i64,
    /// Rows ahead predicted: one W_k for each k = 1..=offsets.
    pub offsets: usize,
    /// Units of the GRU context network.
    pub context_dim: i64,
    /// 0: the paper's bilinear score zᵀ W_k c. Above 0: the cosine of the
    /// prediction W_k c and the code z, divided by this temperature.
    pub temperature: f64,
}

impl Default for CpcKeys {
    fn default() -> Self {
        Self { patch_size: 10, patch_stride: 6, offsets: 2, context_dim: 256, temperature: 0.0 }
    }
}

/// CPC's configuration.
pub struct CpcSpec;

impl CpcSpec {
    fn keys(settings: &Settings) -> std::result::Result<CpcKeys, ConfigError> {
        settings.parse("method")
    }
}

impl MethodSpec for CpcSpec {
    fn name(&self) -> &'static str {
        "cpc"
    }

    fn defaults(&self) -> Settings {
        Settings::of(&CpcKeys::default())
    }

    fn own_loss(&self) -> LossKind {
        LossKind::Cpc
    }

    /// The first view is cut into patches; any preset gives one.
    fn accepts_augment(&self, _preset: AugmentPreset, _loss: LossKind) -> bool {
        true
    }

    fn model_keys(&self) -> &'static [&'static str] {
        &[]
    }

    fn check(&self, settings: &Settings, run: &RunInfo) -> std::result::Result<(), ConfigError> {
        let k = Self::keys(settings)?;
        for (key, v) in [("method.patch_size", k.patch_size), ("method.patch_stride", k.patch_stride)] {
            if v < 1 {
                return Err(invalid(key, format!("must be at least 1, got {v}")));
            }
        }
        if k.offsets == 0 {
            return Err(invalid("method.offsets", "must be at least 1"));
        }
        if !(k.temperature == 0.0 || (0.001..=100.0).contains(&k.temperature)) {
            return Err(invalid(
                "method.temperature",
                format!("must be 0 (bilinear scores) or lie in [0.001, 100], got {}", k.temperature),
            ));
        }
        if k.context_dim < 1 {
            return Err(invalid("method.context_dim", format!("must be at least 1, got {}", k.context_dim)));
        }
        contrast_config::within_ceiling("method.context_dim", k.context_dim as u64, 1 << 16, 8192, "the GRU")?;
        if run.global_batch < 2 {
            return Err(invalid("train.global_batch", "CPC's negatives are the other images: at least 2"));
        }
        Ok(())
    }

    fn describe(&self, settings: &Settings, _run: &RunInfo) -> String {
        let k = Self::keys(settings).unwrap_or_default();
        format!(
            " method=CPC patch_size={} patch_stride={} offsets={} context_dim={}",
            k.patch_size, k.patch_stride, k.offsets, k.context_dim
        )
    }

    fn negatives_per_anchor(&self, _settings: &Settings, run: &RunInfo) -> Option<usize> {
        Some(run.global_batch - 1)
    }
}

/// The registration of CPC.
pub const ENTRY: MethodEntry = MethodEntry { spec: &CpcSpec, build: |vs, spec| Ok(Box::new(Cpc::new(vs, spec)?)) };

/// Rows and columns of the patch grid over a side of `side` pixels.
pub fn grid_side(side: i64, patch: i64, stride: i64) -> i64 {
    if side < patch {
        0
    } else {
        (side - patch) / stride + 1
    }
}

/// Patch encoder, column GRU and the bilinear maps.
pub struct Cpc {
    vs: VarStore,
    backbone: Box<dyn Encoder>,
    gru: nn::GRU,
    predict: Vec<Tensor>,
    keys: CpcKeys,
    /// Rows (= columns) of the grid on the training views.
    grid: i64,
}

impl Cpc {
    /// Build into `vs` (`backbone.*`, `context.*`, `predict.k<k>.weight`);
    /// the grid must leave more rows than offsets on `spec.image_size`.
    pub fn new(mut vs: VarStore, spec: &Spec) -> Result<Self> {
        let keys: CpcKeys = settings(spec)?;
        let grid = grid_side(spec.image_size, keys.patch_size, keys.patch_stride);
        if grid <= keys.offsets as i64 {
            return Err(NnError::Param(format!(
                "method.patch_size {} with method.patch_stride {} gives a grid of {grid} rows on {}-pixel views: \
                 CPC predicts {} rows ahead, so it needs at least {}",
                keys.patch_size,
                keys.patch_stride,
                spec.image_size,
                keys.offsets,
                keys.offsets + 1
            )));
        }
        let root = vs.root();
        let backbone = encoder::build(&(&root / "backbone"), spec)?;
        let d = backbone.out_dim();
        let gru = nn::gru(&root / "context", d, keys.context_dim, Default::default());
        let no_bias = nn::LinearConfig { bias: false, ..Default::default() };
        let predict: Vec<Tensor> = (1..=keys.offsets)
            .map(|k| nn::linear(&root / "predict" / format!("k{k}"), keys.context_dim, d, no_bias).ws)
            .collect();
        set_kind(&mut vs, spec);
        Ok(Self { vs, backbone, gru, predict, keys, grid })
    }

    /// Patch codes `[B, R, C, D]` of images `[B, ch, H, W]`.
    fn codes(&self, images: &Tensor, train: bool) -> Tensor {
        let (p, s) = (self.keys.patch_size, self.keys.patch_stride);
        let patches = images.unfold(2, p, s).unfold(3, p, s); // [B, ch, R, C, p, p]
        let sz = patches.size();
        let (b, ch, r, c) = (sz[0], sz[1], sz[2], sz[3]);
        let flat = patches.permute([0, 2, 3, 1, 4, 5]).reshape([b * r * c, ch, p, p]);
        self.backbone.forward_t(&flat, train).view([b, r, c, -1])
    }

    /// Contexts `[B, R, C, H]`: the GRU down each column of the codes.
    fn contexts(&self, z: &Tensor) -> Tensor {
        let sz = z.size();
        let (b, r, c, d) = (sz[0], sz[1], sz[2], sz[3]);
        let columns = z.permute([0, 2, 1, 3]).reshape([b * c, r, d]);
        let (out, _) = self.gru.seq(&columns);
        out.view([b, c, r, -1]).permute([0, 2, 1, 3])
    }
}

impl Method for Cpc {
    fn name(&self) -> &'static str {
        "cpc"
    }

    fn var_store(&self) -> &VarStore {
        &self.vs
    }

    fn forward(&self, batch: &Batch, _comm: &dyn GlobalSum) -> Result<Towers> {
        let z = self.codes(&batch.views[0], true);
        let (r, c) = (z.size()[1], z.size()[2]);
        if r != self.grid || c != self.grid {
            return Err(NnError::Shape(format!(
                "CPC: views of {:?} give a {r} × {c} grid, built for {g} × {g}",
                batch.views[0].size(),
                g = self.grid
            )));
        }
        let ctx = self.contexts(&z);
        let b = z.size()[0];
        Ok(Towers { grad: vec![z.reshape([b, -1]), ctx.reshape([b, -1])], ..Default::default() })
    }

    fn loss_share(&self, g: &Gathered, _batch: &Batch, ctx: &Ctx) -> Result<Share> {
        let (n, grid) = (ctx.shard.global() as i64, self.grid);
        let z = g.towers[0].view([n, grid, grid, -1]);
        let c = g.towers[1].view([n, grid, grid, -1]);
        let temperature = Some(self.keys.temperature).filter(|&t| t > 0.0);
        let mut terms = Vec::new();
        for (k, w) in (1..).zip(&self.predict) {
            for row in 0..grid - k {
                for col in 0..grid {
                    let (context, target) = (c.select(1, row).select(1, col), z.select(1, row + k).select(1, col));
                    terms.push(cpc_share(&context, &target, w, temperature, ctx.shard)?);
                }
            }
        }
        let count = terms.len() as f64;
        let loss = Tensor::stack(&terms, 0).sum(terms[0].kind()) / count;
        // No collapse watch: patch codes share a large common component (their
        // spread reads as collapsed from the first step), and InfoNCE against
        // the other images cannot be lowered by collapsing.
        Ok(Share { loss, monitor: None })
    }

    fn backbone(&self) -> &dyn Encoder {
        self.backbone.as_ref()
    }
}
