//! SigLIP's pairwise sigmoid loss (Zhai et al. 2023).
//!
//! # Conventions (open_clip `SigLipLoss`)
//! - L2-normalised image and text embeddings; logits
//!   `exp(logit_scale) · I Tᵀ + logit_bias`, both learnable (open_clip
//!   initialises them at ln 10 and −10).
//! - Label +1 on the diagonal (matching pairs), −1 elsewhere.
//! - Loss = −Σ_{i,j} log σ(label_ij · logit_ij) / N over all N² pairs of the
//!   global batch (open_clip divides each rank's sum by its local batch and
//!   averages ranks, which is the same number).
//!
//! # Shapes
//! - `img`, `txt`: `[N, d]`; `logit_scale`, `logit_bias`: scalars.
//! - returns this rank's share: its B image rows against all N texts, / N.

use super::{check_views, l2_normalize, Shard};
use crate::Result;
use tch::{Kind, Tensor};

/// This rank's share of the SigLIP loss.
pub fn siglip_share(
    img: &Tensor,
    txt: &Tensor,
    logit_scale: &Tensor,
    logit_bias: &Tensor,
    shard: Shard,
) -> Result<Tensor> {
    check_views("SigLIP", &[img, txt], shard)?;
    let (n, b, off) = (shard.global() as i64, shard.local_batch as i64, shard.offset() as i64);
    let (i, t) = (l2_normalize(img), l2_normalize(txt));
    let logits = i.narrow(0, off, b).matmul(&t.tr()) * logit_scale.exp() + logit_bias; // [B, N]
    let rows = Tensor::arange_start(off, off + b, (Kind::Int64, img.device())).unsqueeze(1);
    let cols = Tensor::arange(n, (Kind::Int64, img.device())).unsqueeze(0);
    let sign = cols.eq_tensor(&rows).to_kind(logits.kind()) * 2.0 - 1.0;
    let kind = logits.kind();
    Ok(-(sign * logits).log_sigmoid().sum(kind) / n as f64)
}
