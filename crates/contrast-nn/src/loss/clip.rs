//! CLIP's symmetric contrastive loss.
//!
//! # Conventions (open_clip `ClipLoss`)
//! - Image and text embeddings are L2-normalised; logits are
//!   `exp(logit_scale) · I Tᵀ`, with `logit_scale` a learnable log-scale
//!   (initialised at ln(1/0.07), clamped to [0, ln 100] after every step).
//! - Loss = ½ (CE(image→text) + CE(text→image)), each a mean over the N
//!   pairs; the label of row i is column i.
//!
//! # Shapes
//! - `img`, `txt`: `[N, d]` gathered embeddings (global rows, rank order).
//! - `logit_scale`: scalar (0-dimensional) tensor.
//! - returns: scalar, this rank's share: the terms of its B image rows and B
//!   text rows, divided by 2N. Logits are `[B, N]` per direction, never `[N, N]`.

use super::{l2_normalize, Shard};
use crate::{NnError, Result};
use tch::{Kind, Reduction, Tensor};

/// This rank's share of the CLIP loss.
pub fn clip_share(img: &Tensor, txt: &Tensor, logit_scale: &Tensor, shard: Shard) -> Result<Tensor> {
    let n = shard.global() as i64;
    if img.size() != txt.size() || img.dim() != 2 || img.size()[0] != n {
        return Err(NnError::Shape(format!(
            "CLIP towers must both be [N={n}, d], got image {:?} and text {:?}",
            img.size(),
            txt.size()
        )));
    }
    let (i, t) = (l2_normalize(img), l2_normalize(txt));
    let (b, off) = (shard.local_batch as i64, shard.offset() as i64);
    let labels = Tensor::arange_start(off, off + b, (Kind::Int64, img.device()));
    let scale = logit_scale.exp();
    let li = i.narrow(0, off, b).matmul(&t.tr()) * &scale; // [B, N]
    let lt = t.narrow(0, off, b).matmul(&i.tr()) * &scale; // [B, N]
    let ce = |logits: &Tensor| logits.cross_entropy_loss::<Tensor>(&labels, None, Reduction::Sum, -100, 0.0);
    Ok((ce(&li) + ce(&lt)) / (2 * n) as f64)
}
