//! The CLIP text tower: token and position embeddings (byte-level or a Hugging
//! Face vocabulary), pre-LN causal transformer blocks, final LayerNorm, pooling
//! at each text's last token (its end-of-text token: the position open_clip
//! finds with an argmax over CLIP's ids, given explicitly so any vocabulary
//! works) and a linear projection.

use super::activation;
use contrast_config::{TextAct, TextConfig};
use tch::nn;
use tch::{Kind, Tensor};

struct Block {
    ln1: nn::LayerNorm,
    qkv: nn::Linear,
    out: nn::Linear,
    ln2: nn::LayerNorm,
    fc1: nn::Linear,
    fc2: nn::Linear,
    heads: i64,
    act: TextAct,
}

impl Block {
    fn new(p: &nn::Path, width: i64, heads: i64, act: TextAct) -> Self {
        Self {
            ln1: nn::layer_norm(p / "ln1", vec![width], Default::default()),
            qkv: nn::linear(p / "qkv", width, 3 * width, Default::default()),
            out: nn::linear(p / "out", width, width, Default::default()),
            ln2: nn::layer_norm(p / "ln2", vec![width], Default::default()),
            fc1: nn::linear(p / "fc1", width, 4 * width, Default::default()),
            fc2: nn::linear(p / "fc2", 4 * width, width, Default::default()),
            heads,
            act,
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
        let m = activation(&x.apply(&self.ln2).apply(&self.fc1), self.act).apply(&self.fc2);
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
    /// Rows `[start, start+len)` (views of the same storage).
    pub fn rows(&self, start: i64, len: i64) -> Self {
        Self { tokens: self.tokens.narrow(0, start, len), ends: self.ends.narrow(0, start, len) }
    }

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
    /// Build under `p` for a vocabulary of `vocab` ids, projecting to `out`.
    pub fn new(p: &nn::Path, vocab: i64, t: &TextConfig, out: i64) -> Self {
        let (context, width, layers, heads) = (t.context, t.width, t.layers, t.heads);
        Self {
            tokens: nn::embedding(
                p / "token_embedding",
                vocab,
                width,
                nn::EmbeddingConfig { ws_init: nn::Init::Randn { mean: 0.0, stdev: 0.02 }, ..Default::default() },
            ),
            positions: p.var("positional_embedding", &[context, width], nn::Init::Randn { mean: 0.0, stdev: 0.01 }),
            blocks: (0..layers).map(|k| Block::new(&(p / format!("block{k}")), width, heads, t.act)).collect(),
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
