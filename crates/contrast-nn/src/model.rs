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
//! - [`BnMlp`]: the batch-normalised projector/predictor of BYOL and SimSiam.
//!
//! Methods (`crate::method`) assemble these into trainable models.

use contrast_config::Norm;
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

/// MLP head with batch norm: Linear → BN → ReLU → Linear (→ BN without affine
/// parameters when `out_bn`), the projector and predictor of BYOL and SimSiam.
/// Run it on the gathered batch so that its statistics are the global batch's.
#[derive(Debug)]
pub struct BnMlp {
    l1: nn::Linear,
    bn: nn::BatchNorm,
    l2: nn::Linear,
    out_bn: Option<nn::BatchNorm>,
}

impl BnMlp {
    /// `input → hidden → output`.
    pub fn new(p: &nn::Path, input: i64, hidden: i64, output: i64, out_bn: bool) -> Self {
        let no_affine = nn::BatchNormConfig { affine: false, ..Default::default() };
        Self {
            l1: nn::linear(p / "fc1", input, hidden, Default::default()),
            bn: nn::batch_norm1d(p / "bn1", hidden, Default::default()),
            l2: nn::linear(p / "fc2", hidden, output, Default::default()),
            out_bn: out_bn.then(|| nn::batch_norm1d(p / "bn2", output, no_affine)),
        }
    }
}

impl ModuleT for BnMlp {
    fn forward_t(&self, x: &Tensor, train: bool) -> Tensor {
        let h = x.apply(&self.l1).apply_t(&self.bn, train).relu().apply(&self.l2);
        match &self.out_bn {
            Some(bn) => h.apply_t(bn, train),
            None => h,
        }
    }
}
