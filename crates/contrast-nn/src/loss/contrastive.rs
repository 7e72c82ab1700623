//! The contrastive (pair) loss of Chopra, Hadsell & LeCun (2005).
//!
//! # Conventions (pytorch-metric-learning `ContrastiveLoss`)
//! - Euclidean distance d between L2-normalised embeddings (not squared).
//! - All ordered pairs (i, j), i ≠ j, of the global batch: positive when the
//!   labels agree, negative otherwise.
//! - Positive term relu(d − pos_margin), negative term relu(neg_margin − d)
//!   (defaults 0 and 1); `squared` uses the survey's form d² and
//!   relu(neg_margin − d)².
//! - Reduction: `AvgNonZeroReducer` on each of the two terms separately (sum
//!   over pairs / number of non-zero pairs, counted over the global batch), then added.
//!
//! # Shapes
//! `z`: `[N, d]`, `labels`: `[N]`; returns this rank's share (pairs whose first
//! element it owns).

use super::metric::{avg_non_zero, check_labelled, distances, label_masks};
use super::{owned_rows, Ctx};
use crate::{NnError, Result};

/// This rank's share of the contrastive pair loss.
pub fn contrastive_share(
    z: &tch::Tensor,
    labels: &tch::Tensor,
    pos_margin: f64,
    neg_margin: f64,
    squared: bool,
    ctx: &Ctx,
) -> Result<tch::Tensor> {
    check_labelled("contrastive loss", z, labels, ctx.shard)?;
    if neg_margin < 0.0 || pos_margin < 0.0 {
        return Err(NnError::Param(format!(
            "contrastive loss: margins must be ≥ 0, got pos {pos_margin}, neg {neg_margin}"
        )));
    }
    let rows = owned_rows(ctx.shard, 1, z.device());
    let labels = labels.to_device(z.device());
    let d = distances(&z.index_select(0, &rows), z, false);
    let (pos, neg) = label_masks(&rows, &labels);
    let zeros = d.zeros_like();
    let (pt, nt) = if squared {
        ((&d - pos_margin).relu().square(), (-&d + neg_margin).relu().square())
    } else {
        ((&d - pos_margin).relu(), (-&d + neg_margin).relu())
    };
    Ok(avg_non_zero(&pt.where_self(&pos, &zeros), ctx) + avg_non_zero(&nt.where_self(&neg, &zeros), ctx))
}
