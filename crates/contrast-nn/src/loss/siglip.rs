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
//!
//! [`siglip_share`] streams blocks of image rows (loss/stream.rs);
//! [`siglip_dense_share`] materialises the `[B, N]` logits (the reference form).

use super::stream::{with_gradients, SigmoidPairs};
use super::{check_views, l2_normalize, Shard};
use crate::Result;
use tch::{Kind, Tensor};

/// This rank's share of the SigLIP loss (streamed).
pub fn siglip_share(
    img: &Tensor,
    txt: &Tensor,
    logit_scale: &Tensor,
    logit_bias: &Tensor,
    shard: Shard,
) -> Result<Tensor> {
    siglip_share_blocked(img, txt, (logit_scale, logit_bias), shard, 0)
}

/// [`siglip_share`] with `rows` image rows per block (0: the default size);
/// `logit` is (log-scale, bias).
pub fn siglip_share_blocked(
    img: &Tensor,
    txt: &Tensor,
    logit: (&Tensor, &Tensor),
    shard: Shard,
    rows: i64,
) -> Result<Tensor> {
    check_views("SigLIP", &[img, txt], shard)?;
    let (n, b, off) = (shard.global() as i64, shard.local_batch as i64, shard.offset() as i64);
    let (i, t) = (l2_normalize(img), l2_normalize(txt));
    let scale = logit.0.exp();
    let bias = logit.1;
    let (id, td) = (i.detach(), t.detach());
    let anchors = id.narrow(0, off, b);
    let positive = Tensor::arange_start(off, off + b, (Kind::Int64, img.device()));
    let grad = i.requires_grad() || t.requires_grad() || scale.requires_grad() || bias.requires_grad();
    let pairs = SigmoidPairs {
        anchors: &anchors,
        columns: &td,
        positive: &positive,
        scale: scale.double_value(&[]),
        bias: bias.double_value(&[]),
        skip: None,
        rows,
    };
    let out = pairs.run(grad);
    let w = 1.0 / n as f64;
    let grads = match out.grads {
        Some((da, dc, ds, db)) => vec![
            (&i, id.zeros_like().index_add(0, &positive, &da) * w),
            (&t, dc * w),
            (&scale, (ds * w).to_kind(scale.kind())),
            (bias, (db * w).to_kind(bias.kind())),
        ],
        None => vec![],
    };
    Ok(with_gradients(out.loss * w, &grads))
}

/// The SigLIP loss with the `[B, N]` logits materialised (the reference form).
pub fn siglip_dense_share(
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
