//! The text tower: token and position embeddings (byte-level or a Hugging
//! Face vocabulary), pre-LN transformer blocks, final LayerNorm, pooling and a
//! linear projection.
//!
//! - CLIP's tower (the defaults): causal attention, pooled at each text's last
//!   token (its end-of-text token: the position open_clip finds with an argmax
//!   over CLIP's ids, given explicitly so any vocabulary works).
//! - A bidirectional encoder (`model.text.causal: false`, SimCSE's and
//!   Quick-Thought's): every token attends to every token of its text, the
//!   padding after its end is masked; pooled at the first token, the last or
//!   the mean over the text's tokens (`model.text.pool`).
//!
//! Dropout (`model.text.dropout`, BERT's hidden dropout: on the embeddings and
//! on each block's attention and MLP outputs before the residual sum) draws its
//! masks from a counter-based hash of (seed, step, global row, view, layer,
//! site, element) computed with tensor ops ([`dropout_mask`]), not from
//! libtorch's generator: the masks of a row do not depend on the world size, on
//! the rank, on the gradient cache's chunks or on the device, so P ranks × B
//! equal 1 rank × P·B and a recomputed chunk draws the masks it drew before.

use super::{activation, Encoder};
use contrast_config::{TextAct, TextConfig, TextPool};
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

    /// `mask`: true where a query may not see a key (`[T, T]` causal or `[B, 1, 1, T]` padding).
    fn forward(&self, x: &Tensor, mask: &Tensor, drop: &dyn Fn(usize, &Tensor) -> Tensor) -> Tensor {
        let (b, t, w) = x.size3().unwrap();
        let dh = w / self.heads;
        let qkv = x.apply(&self.ln1).apply(&self.qkv).view([b, t, 3, self.heads, dh]).permute([2, 0, 3, 1, 4]);
        let (q, k, v) = (qkv.get(0), qkv.get(1), qkv.get(2)); // [B, H, T, dh]
        let att = (q.matmul(&k.transpose(-2, -1)) / (dh as f64).sqrt())
            .masked_fill(mask, f64::NEG_INFINITY)
            .softmax(-1, x.kind());
        let o = att.matmul(&v).permute([0, 2, 1, 3]).reshape([b, t, w]).apply(&self.out);
        let x = x + drop(0, &o);
        let m = activation(&x.apply(&self.ln2).apply(&self.fc1), self.act).apply(&self.fc2);
        x + drop(1, &m)
    }
}

/// Tokenised captions: ids `[B·m, T]` (m captions per row, row-major), the
/// position of each text's last token `[B·m]` and each row's global row `[B]`.
pub struct Captions {
    /// Token ids `[B·m, T]`.
    pub tokens: Tensor,
    /// Position of each caption's last token (where the tower pools) `[B·m]`, int64.
    pub ends: Tensor,
    /// The row of the global batch each row is (keys the dropout masks) `[B]`, int64.
    pub rows: Tensor,
    /// Captions per row m.
    pub per_row: i64,
}

impl Captions {
    /// Rows `[start, start+len)` (views of the same storage).
    pub fn rows(&self, start: i64, len: i64) -> Self {
        let m = self.per_row;
        Self {
            tokens: self.tokens.narrow(0, start * m, len * m),
            ends: self.ends.narrow(0, start * m, len * m),
            rows: self.rows.narrow(0, start, len),
            per_row: m,
        }
    }

    /// Caption `k` of every row (one per row).
    pub fn caption(&self, k: i64) -> Self {
        let (m, t) = (self.per_row, self.tokens.size()[1]);
        Self {
            tokens: self.tokens.view([-1, m, t]).select(1, k),
            ends: self.ends.view([-1, m]).select(1, k),
            rows: self.rows.shallow_clone(),
            per_row: 1,
        }
    }

    /// One caption per row from host buffers: `tokens` row-major `[b, T]`, `ends` `[b]`, rows 0..b.
    pub fn from_host(tokens: &[i64], ends: &[i64], device: tch::Device) -> Self {
        Self::from_host_rows(tokens, ends, 1, 0, device)
    }

    /// `per_row` captions per row from host buffers (`tokens` `[b, m, T]`,
    /// `ends` `[b, m]`), the rows being rows `first_row..` of the global batch.
    pub fn from_host_rows(tokens: &[i64], ends: &[i64], per_row: usize, first_row: usize, device: tch::Device) -> Self {
        let (n, m) = (ends.len() as i64, per_row.max(1) as i64);
        let first = first_row as i64;
        Self {
            tokens: Tensor::from_slice(tokens).view([n, -1]).to_device(device),
            ends: Tensor::from_slice(ends).to_device(device),
            rows: Tensor::arange_start(first, first + n / m, (Kind::Int64, device)),
            per_row: m,
        }
    }

    /// One tensor `[B, T + 1]`: the tokens, then each end (how a text set passes
    /// through [`Encoder::forward_t`], which takes one tensor). One caption per row.
    pub fn pack(&self) -> Tensor {
        Tensor::cat(&[self.tokens.shallow_clone(), self.ends.unsqueeze(1)], 1)
    }

    /// The captions of [`Captions::pack`] (rows 0..B).
    pub fn unpack(packed: &Tensor) -> Self {
        let (b, t1) = packed.size2().expect("packed captions are [B, T + 1]");
        Self {
            tokens: packed.narrow(1, 0, t1 - 1),
            ends: packed.select(1, t1 - 1),
            rows: Tensor::arange(b, (Kind::Int64, packed.device())),
            per_row: 1,
        }
    }
}

/// What keys a forward pass's dropout masks besides the row: none in eval mode.
#[derive(Debug, Clone, Copy)]
pub struct Noise {
    /// Master seed.
    pub seed: u64,
    /// Global step.
    pub step: usize,
    /// Which pass over the rows (SimCSE's two views; Quick-Thought's two sentences).
    pub view: usize,
}

const M32: i64 = 0xffff_ffff;

/// A 32-bit integer hash (Wellons' `lowbias32` constants reduced below 2³¹,
/// so every product of int64 tensors stays below 2⁶³) of values in [0, 2³²).
fn hash32(x: &Tensor) -> Tensor {
    let x = x.bitwise_xor_tensor(&x.bitwise_right_shift_tensor_scalar(16));
    let x = (x * 0x45d9_f3bi64).bitwise_and(M32);
    let x = x.bitwise_xor_tensor(&x.bitwise_right_shift_tensor_scalar(16));
    let x = (x * 0x45d9_f3bi64).bitwise_and(M32);
    x.bitwise_xor_tensor(&x.bitwise_right_shift_tensor_scalar(16))
}

/// The keep mask (scaled by 1/(1 − p)) of dropout `p` on `[B, T, W]` activations
/// at `site`: element e of global row r keeps where hash(hash(e ⊕ hash(r·φ ⊕ k₁)) ⊕ k₂) ≥ p·2³²,
/// (k₁, k₂) the two halves of key(seed, step, view, site). Same rows, same masks, on any layout.
pub fn dropout_mask(shape: (i64, i64, i64), rows: &Tensor, noise: &Noise, site: u64, p: f64, kind: Kind) -> Tensor {
    let (b, t, w) = shape;
    let k = contrast_data::rng::key(&[noise.seed, noise.step as u64, noise.view as u64, site]);
    let (k1, k2) = ((k & M32 as u64) as i64, (k >> 32) as i64);
    let row_key = hash32(&(rows.bitwise_and(0x7fff_ffff) * 0x9e37_79b1i64).bitwise_and(M32).bitwise_xor(k1));
    let e = Tensor::arange(t * w, (Kind::Int64, rows.device()));
    let h = hash32(&hash32(&e.unsqueeze(0).bitwise_xor_tensor(&row_key.unsqueeze(1))).bitwise_xor(k2));
    let keep = h.ge((p * 4_294_967_296.0).ceil());
    (keep.to_kind(kind) / (1.0 - p)).view([b, t, w])
}

/// The text tower.
pub struct TextTower {
    tokens: nn::Embedding,
    positions: Tensor,
    blocks: Vec<Block>,
    ln_final: nn::LayerNorm,
    proj: nn::Linear,
    context: i64,
    out: i64,
    causal: bool,
    pool: TextPool,
    dropout: f64,
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
            out,
            causal: t.causal,
            pool: t.pool,
            dropout: t.dropout,
        }
    }

    /// Captions (one per row) → `[B, out]`, without dropout (eval mode).
    pub fn forward(&self, captions: &Captions) -> Tensor {
        self.encode(captions, None)
    }

    /// Captions of `[B, T]` token ids (T ≤ context, one per row) → `[B, out]`;
    /// with `noise`, dropout keyed on it and on each row's global row.
    pub fn encode(&self, captions: &Captions, noise: Option<&Noise>) -> Tensor {
        let tokens = &captions.tokens;
        let (b, t) = tokens.size2().unwrap();
        assert!(t <= self.context, "text of {t} tokens exceeds the context {}", self.context);
        assert_eq!(captions.per_row, 1, "the tower takes one caption per row (Captions::caption)");
        let device = tokens.device();
        let x = tokens.apply(&self.tokens) + self.positions.narrow(0, 0, t);
        let w = x.size()[2];
        let drop = |site: u64, a: &Tensor| match noise.filter(|_| self.dropout > 0.0) {
            Some(n) => a * dropout_mask((b, t, w), &captions.rows, n, site, self.dropout, a.kind()),
            None => a.shallow_clone(),
        };
        let positions = Tensor::arange(t, (Kind::Int64, device));
        let mask = match self.causal {
            true => Tensor::ones([t, t], (Kind::Bool, device)).triu(1),
            // Keys past a text's end are padding.
            false => positions.unsqueeze(0).gt_tensor(&captions.ends.unsqueeze(1)).view([b, 1, 1, t]),
        };
        let mut x = drop(0, &x);
        for (l, blk) in self.blocks.iter().enumerate() {
            x = blk.forward(&x, &mask, &|s, a| drop(1 + 2 * l as u64 + s as u64, a));
        }
        let x = x.apply(&self.ln_final);
        let pooled = match self.pool {
            TextPool::Last => {
                x.index(&[Some(Tensor::arange(b, (Kind::Int64, device))), Some(captions.ends.shallow_clone())])
            }
            TextPool::First => x.select(1, 0),
            TextPool::Mean => {
                let inside = positions.unsqueeze(0).le_tensor(&captions.ends.unsqueeze(1)).to_kind(x.kind());
                (&x * inside.unsqueeze(2)).sum_dim_intlist([1i64].as_slice(), false, x.kind())
                    / (captions.ends.to_kind(x.kind()) + 1.0).unsqueeze(1)
            }
        };
        pooled.apply(&self.proj)
    }
}

/// The tower as an encoder of packed captions ([`Captions::pack`]): how
/// evaluation and `trainer embed` run text through the image path (eval mode, no dropout).
impl Encoder for TextTower {
    fn forward_t(&self, x: &Tensor, _train: bool) -> Tensor {
        self.forward(&Captions::unpack(x))
    }

    fn out_dim(&self) -> i64 {
        self.out
    }
}
