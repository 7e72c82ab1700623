//! Encoders and heads. Nothing here knows about ranks or collectives.
//!
//! - [`ConvBackbone`]: a small CNN for small images (28×28 grayscale, or RGB crops) (four 3×3
//!   convolutions with w, 2w, 2w and embed_dim/16 channels, two of stride 2,
//!   each followed by the chosen normalisation and ReLU), average-pooled to a
//!   4×4 grid and flattened, so the representation keeps coarse layout (on
//!   Fashion-MNIST this beats global pooling by several kNN points)
//!   → `[B, embed_dim]`.
//! - [`Mlp`]: the SimCLR projection head, Linear → ReLU → Linear.
//! - [`TextTower`]: token and position embeddings (byte-level or a Hugging
//!   Face vocabulary), pre-LN causal transformer blocks, final LayerNorm,
//!   pooling at each text's last token (its end-of-text token: the position
//!   open_clip finds with an argmax over CLIP's ids, given explicitly so any
//!   vocabulary works) and a linear projection.
//! - [`Model`]: the whole trainable model of a run (SimCLR or CLIP).

use contrast_config::{LossConfig, LossKind, ModelConfig, Norm};
use tch::nn::{self, Module, ModuleT};
use tch::{Kind, Tensor};

enum NormLayer {
    Batch(nn::BatchNorm),
    Group(nn::GroupNorm),
    Identity,
}

impl NormLayer {
    fn new(p: nn::Path, norm: Norm, channels: i64) -> Self {
        match norm {
            Norm::Batch => NormLayer::Batch(nn::batch_norm2d(p, channels, Default::default())),
            Norm::Group => {
                let groups = [8, 4, 2, 1].into_iter().find(|g| channels % g == 0).unwrap();
                NormLayer::Group(nn::group_norm(p, groups, channels, Default::default()))
            }
            // LayerNorm over (C, H, W) of each sample is GroupNorm with one group.
            Norm::Layer => NormLayer::Group(nn::group_norm(p, 1, channels, Default::default())),
            Norm::None => NormLayer::Identity,
        }
    }

    fn forward_t(&self, x: &Tensor, train: bool) -> Tensor {
        match self {
            NormLayer::Batch(b) => b.forward_t(x, train),
            NormLayer::Group(g) => g.forward(x),
            NormLayer::Identity => x.shallow_clone(),
        }
    }
}

/// Side of the spatial grid the last feature map is average-pooled to; the
/// representation is that grid flattened (`embed_dim / POOL_GRID²` channels).
pub const POOL_GRID: i64 = contrast_config::POOL_GRID;

/// Small convolutional encoder for 28×28 single-channel images.
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
                (conv, NormLayer::new(p / format!("norm{k}"), norm, o))
            })
            .collect();
        Self { layers, embed_dim }
    }

    /// `[B, 1, H, W]` → `[B, embed_dim]`.
    pub fn forward_t(&self, x: &Tensor, train: bool) -> Tensor {
        let mut h = x.shallow_clone();
        for (conv, norm) in &self.layers {
            h = norm.forward_t(&h.apply(conv), train).relu();
        }
        h.adaptive_avg_pool2d([POOL_GRID, POOL_GRID]).flatten(1, -1)
    }
}

/// Two-layer MLP projection head.
#[derive(Debug)]
pub struct Mlp {
    l1: nn::Linear,
    l2: nn::Linear,
}

impl Mlp {
    /// `input → hidden → output`.
    pub fn new(p: &nn::Path, input: i64, hidden: i64, output: i64) -> Self {
        Self {
            l1: nn::linear(p / "fc1", input, hidden, Default::default()),
            l2: nn::linear(p / "fc2", hidden, output, Default::default()),
        }
    }
}

impl Module for Mlp {
    fn forward(&self, x: &Tensor) -> Tensor {
        x.apply(&self.l1).relu().apply(&self.l2)
    }
}

struct Block {
    ln1: nn::LayerNorm,
    qkv: nn::Linear,
    out: nn::Linear,
    ln2: nn::LayerNorm,
    fc1: nn::Linear,
    fc2: nn::Linear,
    heads: i64,
}

impl Block {
    fn new(p: &nn::Path, width: i64, heads: i64) -> Self {
        Self {
            ln1: nn::layer_norm(p / "ln1", vec![width], Default::default()),
            qkv: nn::linear(p / "qkv", width, 3 * width, Default::default()),
            out: nn::linear(p / "out", width, width, Default::default()),
            ln2: nn::layer_norm(p / "ln2", vec![width], Default::default()),
            fc1: nn::linear(p / "fc1", width, 4 * width, Default::default()),
            fc2: nn::linear(p / "fc2", 4 * width, width, Default::default()),
            heads,
        }
    }

    fn forward(&self, x: &Tensor, causal: &Tensor) -> Tensor {
        let (b, t, w) = x.size3().unwrap();
        let dh = w / self.heads;
        let qkv = x.apply(&self.ln1).apply(&self.qkv).view([b, t, 3, self.heads, dh]).permute([2, 0, 3, 1, 4]);
        let (q, k, v) = (qkv.get(0), qkv.get(1), qkv.get(2)); // [B, H, T, dh]
        let att = (q.matmul(&k.transpose(-2, -1)) / (dh as f64).sqrt())
            .masked_fill(causal, f64::NEG_INFINITY)
            .softmax(-1, x.kind());
        let o = att.matmul(&v).permute([0, 2, 1, 3]).reshape([b, t, w]).apply(&self.out);
        let x = x + o;
        let m = x.apply(&self.ln2).apply(&self.fc1).gelu("none").apply(&self.fc2);
        x + m
    }
}

/// Tokenised captions: ids `[B, T]` and the position of each text's last token `[B]`.
pub struct Captions {
    /// Token ids `[B, T]`.
    pub tokens: Tensor,
    /// Position of each row's last token (where the tower pools) `[B]`, int64.
    pub ends: Tensor,
}

impl Captions {
    /// Captions from host buffers: `tokens` row-major `[b, T]`, `ends` `[b]`.
    pub fn from_host(tokens: &[i64], ends: &[i64], device: tch::Device) -> Self {
        let b = ends.len() as i64;
        Self {
            tokens: Tensor::from_slice(tokens).view([b, -1]).to_device(device),
            ends: Tensor::from_slice(ends).to_device(device),
        }
    }
}

/// The CLIP text tower.
pub struct TextTower {
    tokens: nn::Embedding,
    positions: Tensor,
    blocks: Vec<Block>,
    ln_final: nn::LayerNorm,
    proj: nn::Linear,
    context: i64,
}

impl TextTower {
    /// Build under `p`.
    pub fn new(p: &nn::Path, vocab: i64, context: i64, width: i64, layers: i64, heads: i64, out: i64) -> Self {
        Self {
            tokens: nn::embedding(
                p / "token_embedding",
                vocab,
                width,
                nn::EmbeddingConfig { ws_init: nn::Init::Randn { mean: 0.0, stdev: 0.02 }, ..Default::default() },
            ),
            positions: p.var("positional_embedding", &[context, width], nn::Init::Randn { mean: 0.0, stdev: 0.01 }),
            blocks: (0..layers).map(|k| Block::new(&(p / format!("block{k}")), width, heads)).collect(),
            ln_final: nn::layer_norm(p / "ln_final", vec![width], Default::default()),
            proj: nn::linear(p / "proj", width, out, nn::LinearConfig { bias: false, ..Default::default() }),
            context,
        }
    }

    /// Captions of `[B, T]` token ids (T ≤ context) → `[B, out]`, pooled at each text's end.
    pub fn forward(&self, captions: &Captions) -> Tensor {
        let tokens = &captions.tokens;
        let (b, t) = tokens.size2().unwrap();
        assert!(t <= self.context, "text of {t} tokens exceeds the context {}", self.context);
        let mut x = tokens.apply(&self.tokens) + self.positions.narrow(0, 0, t);
        let causal = Tensor::ones([t, t], (Kind::Bool, tokens.device())).triu(1);
        for blk in &self.blocks {
            x = blk.forward(&x, &causal);
        }
        let x = x.apply(&self.ln_final);
        let rows = Tensor::arange(b, (Kind::Int64, tokens.device()));
        x.index(&[Some(rows), Some(captions.ends.shallow_clone())]).apply(&self.proj)
    }
}

/// The trainable model of a run.
pub enum Model {
    /// Backbone and projection head, two views (SimCLR and the other two-view losses).
    SimClr {
        /// Encoder whose features kNN evaluates.
        backbone: ConvBackbone,
        /// Projection head.
        head: Mlp,
    },
    /// Image and text towers and the learnable logit scale (CLIP).
    Clip {
        /// Image backbone.
        backbone: ConvBackbone,
        /// Linear projection of image features into the shared space.
        image_proj: nn::Linear,
        /// Text tower.
        text: TextTower,
        /// log of the logit scale (a loss-head parameter).
        logit_scale: Tensor,
        /// SigLIP's logit bias (a loss-head parameter).
        logit_bias: Option<Tensor>,
    },
}

impl Model {
    /// Build the model of `loss` for `in_channels`-channel images under the var
    /// store's root; a CLIP text tower embeds `text_vocab` token ids.
    pub fn new(
        vs: &nn::VarStore,
        loss: LossKind,
        m: &ModelConfig,
        norm: Norm,
        l: &LossConfig,
        in_channels: i64,
        text_vocab: i64,
    ) -> Self {
        let root = vs.root();
        let backbone = ConvBackbone::new(&(&root / "backbone"), in_channels, m.width, m.embed_dim, norm);
        let hidden = m.proj_hidden;
        match loss {
            k if !k.is_image_text() => {
                Model::SimClr { head: Mlp::new(&(&root / "head"), m.embed_dim, hidden, m.proj_dim), backbone }
            }
            _ => {
                let t = &m.text;
                let text =
                    TextTower::new(&(&root / "text"), text_vocab, t.context, t.width, t.layers, t.heads, m.proj_dim);
                let image_proj = nn::linear(
                    &root / "image_proj",
                    m.embed_dim,
                    m.proj_dim,
                    nn::LinearConfig { bias: false, ..Default::default() },
                );
                let init = (1.0 / l.temperature_for(loss)).ln();
                let head = &root / "loss";
                let logit_scale = if l.learn_scale {
                    head.var("logit_scale", &[], nn::Init::Const(init))
                } else {
                    head.zeros_no_train("logit_scale", &[]).fill_(init)
                };
                let logit_bias =
                    (loss == LossKind::SigLip).then(|| head.var("logit_bias", &[], nn::Init::Const(l.init_bias)));
                Model::Clip { backbone, image_proj, text, logit_scale, logit_bias }
            }
        }
    }

    /// Backbone features `[B, embed_dim]` (what kNN evaluates).
    pub fn features(&self, images: &Tensor, train: bool) -> Tensor {
        match self {
            Model::SimClr { backbone, .. } | Model::Clip { backbone, .. } => backbone.forward_t(images, train),
        }
    }

    /// The towers the loss sees: SimCLR `[z_A, z_B]` from two views (one tower
    /// per view given); CLIP `[image, text]` from one view and the captions.
    pub fn towers(&self, views: &[Tensor], captions: Option<&Captions>, train: bool) -> Vec<Tensor> {
        match self {
            Model::SimClr { backbone, head } => {
                views.iter().map(|v| backbone.forward_t(v, train).apply(head)).collect()
            }
            Model::Clip { backbone, image_proj, text, .. } => {
                let img = backbone.forward_t(&views[0], train).apply(image_proj);
                let txt = text.forward(captions.expect("CLIP needs captions"));
                vec![img, txt]
            }
        }
    }

    /// Text embeddings in the shared space (CLIP only).
    pub fn encode_text(&self, captions: &Captions) -> Option<Tensor> {
        match self {
            Model::Clip { text, .. } => Some(text.forward(captions)),
            Model::SimClr { .. } => None,
        }
    }

    /// Image embeddings in the shared space (CLIP only).
    pub fn encode_image(&self, images: &Tensor) -> Option<Tensor> {
        match self {
            Model::Clip { backbone, image_proj, .. } => Some(backbone.forward_t(images, false).apply(image_proj)),
            Model::SimClr { .. } => None,
        }
    }

    /// This rank's loss share on the gathered towers. `labels` are the gathered
    /// class labels `[N]`, needed by supervised losses only.
    pub fn loss_share(
        &self,
        gathered: &[Tensor],
        ctx: &crate::loss::Ctx,
        kind: LossKind,
        l: &LossConfig,
        labels: Option<&Tensor>,
        mix: Option<&crate::loss::Mix>,
    ) -> crate::Result<Tensor> {
        use crate::loss::*;
        let (a, shard, t) = (&gathered[0], ctx.shard, l.temperature_for(kind));
        let b = gathered.get(1).unwrap_or(a);
        match (self, kind, mix) {
            (Model::SimClr { .. }, LossKind::NtXent, Some(m)) => ntxent_soft_share(a, b, m, t, shard),
            (Model::SimClr { .. }, LossKind::SupCon, Some(m)) => {
                let y = crate::to_host::<i64>(
                    labels.ok_or_else(|| crate::NnError::Param("SupCon needs class labels".into()))?,
                );
                let classes = y.iter().copied().max().unwrap_or(0).max(0) as usize + 1;
                let mut q = vec![0f64; y.len() * classes];
                for (i, &yi) in y.iter().enumerate() {
                    q[i * classes + yi.max(0) as usize] += m.lambda[i];
                    q[i * classes + y[m.partner[i] as usize].max(0) as usize] += 1.0 - m.lambda[i];
                }
                let probs = Tensor::from_slice(&q).view([y.len() as i64, classes as i64]).to_device(a.device());
                supcon_soft_share(gathered, &probs, t, ctx)
            }
            (_, _, Some(_)) => Err(crate::NnError::Param(format!("loss {kind:?} takes no soft targets"))),
            (Model::SimClr { .. }, LossKind::NtXent, None) if gathered.len() > 2 => {
                ntxent_multi_share(gathered, t, ctx)
            }
            (Model::SimClr { .. }, LossKind::NtXent, None) => ntxent_share(a, b, t, shard),
            (Model::SimClr { .. }, LossKind::SupCon, None) => {
                let labels = labels.ok_or_else(|| crate::NnError::Param("SupCon needs class labels".into()))?;
                supcon_share(gathered, labels, t, ctx)
            }
            (Model::SimClr { .. }, LossKind::Dcl, None) => dcl_share(a, b, t, None, shard),
            (Model::SimClr { .. }, LossKind::Dclw, None) => dcl_share(a, b, t, Some(l.sigma), shard),
            (Model::SimClr { .. }, LossKind::Debiased, None) => debiased_share(a, b, t, l.tau_plus, 0.0, shard),
            (Model::SimClr { .. }, LossKind::HardNegative, None) => debiased_share(a, b, t, l.tau_plus, l.beta, shard),
            (Model::SimClr { .. }, LossKind::BarlowTwins, None) => barlow_twins_share(a, b, l.lambda, shard),
            (Model::SimClr { .. }, LossKind::Nce, None) => nce_share(a, b, t, l.noise_size, shard),
            (Model::SimClr { .. }, k, None) if k.is_metric() => {
                let y = labels.ok_or_else(|| crate::NnError::Param(format!("{k:?} needs class labels")))?;
                match k {
                    LossKind::Contrastive => contrastive_share(a, y, l.pos_margin, l.neg_margin, l.squared, ctx),
                    LossKind::Triplet => {
                        let mining = match l.mining.as_str() {
                            "batch_hard" => Mining::BatchHard,
                            "semi_hard" => Mining::SemiHard,
                            _ => Mining::All,
                        };
                        triplet_share(a, y, l.margin, mining, ctx)
                    }
                    LossKind::Lifted => lifted_smooth_share(a, y, l.neg_margin, l.pos_margin, ctx),
                    LossKind::LiftedHard => lifted_hard_share(a, y, l.neg_margin, ctx),
                    LossKind::GeneralizedLifted => generalized_lifted_share(a, y, l.neg_margin, l.pos_margin, ctx),
                    LossKind::NPair => npair_share(a, y, ctx),
                    _ => snn_share(a, y, t, ctx),
                }
            }
            (Model::Clip { logit_scale, .. }, LossKind::Clip, None) => clip_share(a, b, logit_scale, shard),
            (Model::Clip { logit_scale, logit_bias: Some(bias), .. }, LossKind::SigLip, None) => {
                siglip_share(a, b, logit_scale, bias, shard)
            }
            _ => Err(crate::NnError::Param(format!("loss {kind:?} does not fit this model"))),
        }
    }

    /// After an optimiser step: clamp CLIP's log logit scale to [0, ln 100] (open_clip).
    pub fn after_step(&self) {
        if let Model::Clip { logit_scale, .. } = self {
            tch::no_grad(|| {
                let _ = logit_scale.shallow_clone().clamp_(0.0, 100f64.ln());
            });
        }
    }

    /// Current logit scale exp(s) (CLIP), for logs.
    pub fn logit_scale(&self) -> Option<f64> {
        match self {
            Model::Clip { logit_scale, .. } => Some(logit_scale.exp().double_value(&[])),
            Model::SimClr { .. } => None,
        }
    }
}
