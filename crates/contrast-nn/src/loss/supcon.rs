//! Supervised contrastive loss (Khosla et al. 2020), and the multi-positive
//! softmax core that multi-positive NT-Xent shares with it.
//!
//! # Conventions (pytorch-metric-learning `SupConLoss`, default temperature 0.1)
//! - Cosine similarity of L2-normalised embeddings, divided by t.
//! - Positives of anchor i: every other row with the same label; the
//!   denominator runs over every row but i itself (positives and negatives).
//! - ℓ_i = −Σ_{p∈P(i)} log_softmax_i(p) / (|P(i)| + tiny); an anchor without
//!   positives contributes 0.
//! - Reduction: `AvgNonZeroReducer`, the sum over anchors divided by the number
//!   of anchors with ℓ_i > 0, counted over the **global** batch.
//!
//! # Shapes
//! - `views`: V tensors `[N, d]` (V = 1 for one embedding per sample, 2 for
//!   SimCLR-style views); `labels`: `[N]` int64 class of each sample.
//! - returns this rank's share: the sum over its V·B anchors / the global count.
//!
//! The core streams blocks of anchor rows (loss/stream.rs, [`multi_positive_blocked`]);
//! [`multi_positive_dense`] materialises the `[V·B, V·N]` logits (the reference form).

use super::stream::{own_rows_gradient, with_gradients, MultiPositiveCe};
use super::{check_temperature, check_views, l2_normalize, owned_rows, Ctx};
use crate::{NnError, Result};
use tch::{Kind, Tensor};

/// How per-anchor terms are reduced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reduce {
    /// Mean over all anchors.
    Mean,
    /// Sum / number of anchors with a term > 0 (pytorch-metric-learning `AvgNonZeroReducer`).
    AvgNonZero,
}

/// This rank's share of SupCon.
pub fn supcon_share(views: &[Tensor], labels: &Tensor, temperature: f64, ctx: &Ctx) -> Result<Tensor> {
    check_temperature("SupCon", temperature)?;
    if views.is_empty() {
        return Err(NnError::Param("SupCon needs at least one view".into()));
    }
    check_views("SupCon", &views.iter().collect::<Vec<_>>(), ctx.shard)?;
    let n = ctx.shard.global() as i64;
    if labels.size() != [n] {
        return Err(NnError::Shape(format!(
            "SupCon: labels must be [N={n}], got {:?} (a supervised loss needs labels)",
            labels.size()
        )));
    }
    let z = Tensor::cat(views, 0);
    let all_labels = labels.to_device(z.device()).to_kind(Kind::Int64).repeat([views.len() as i64]);
    multi_positive_share(&z, &all_labels, temperature, ctx, views.len(), Reduce::AvgNonZero)
}

/// The shared core: `z` `[V·N, d]` view-major, `ids` `[V·N]` (same id = positive),
/// streamed over blocks of anchor rows (loss/stream.rs).
pub(crate) fn multi_positive_share(
    z: &Tensor,
    ids: &Tensor,
    t: f64,
    ctx: &Ctx,
    views: usize,
    reduce: Reduce,
) -> Result<Tensor> {
    multi_positive_blocked(z, ids, t, ctx, (views, reduce), 0)
}

/// [`multi_positive_share`] with `rows` anchors per block (0: the default size).
pub fn multi_positive_blocked(
    z: &Tensor,
    ids: &Tensor,
    t: f64,
    ctx: &Ctx,
    (views, reduce): (usize, Reduce),
    rows: i64,
) -> Result<Tensor> {
    let z = l2_normalize(z);
    let zd = z.detach();
    let own = owned_rows(ctx.shard, views, z.device());
    let anchors = zd.index_select(0, &own) / t;
    let kind = z.kind();
    let ce = MultiPositiveCe {
        anchors: &anchors,
        columns: &zd,
        anchor_ids: &ids.index_select(0, &own),
        column_ids: ids,
        skip: &own,
        tiny: tiny(kind),
        rows,
    };
    let out = ce.run(z.requires_grad());
    let denom = denominator(&out.per_anchor, ctx, views, reduce);
    if denom <= 0.0 {
        // No anchor has a positive anywhere: the loss is 0, and so is its gradient
        // (still attached to the graph, so the engine's backward runs as usual).
        return Ok(with_gradients(out.per_anchor.sum(kind) * 0.0, &[(&z, z.zeros_like())]));
    }
    let g = own_rows_gradient(out.d_anchors, out.d_columns, &own, 1.0 / t, 1.0 / denom);
    let grads: Vec<_> = g.into_iter().map(|g| (&z, g)).collect();
    Ok(with_gradients(out.per_anchor.sum(kind) / denom, &grads))
}

/// pytorch-metric-learning's `small_val` of the kind.
fn tiny(kind: Kind) -> f64 {
    if kind == Kind::Double {
        f64::MIN_POSITIVE
    } else {
        f32::MIN_POSITIVE as f64
    }
}

/// The reduction's denominator over the global batch.
fn denominator(per_anchor: &Tensor, ctx: &Ctx, views: usize, reduce: Reduce) -> f64 {
    match reduce {
        Reduce::Mean => (views as f64) * ctx.shard.global() as f64,
        Reduce::AvgNonZero => ctx.global(per_anchor.gt(0.0).sum(Kind::Int64).int64_value(&[]) as f64),
    }
}

/// The multi-positive core with the `[V·B, V·N]` logits materialised (the reference form).
pub fn multi_positive_dense(
    z: &Tensor,
    ids: &Tensor,
    t: f64,
    ctx: &Ctx,
    views: usize,
    reduce: Reduce,
) -> Result<Tensor> {
    let z = l2_normalize(z);
    let m = z.size()[0];
    let rows = owned_rows(ctx.shard, views, z.device());
    let logits = z.index_select(0, &rows).matmul(&z.tr()) / t; // [V·B, V·N]
    let cols = Tensor::arange(m, (Kind::Int64, z.device())).unsqueeze(0);
    let self_mask = cols.eq_tensor(&rows.unsqueeze(1));
    let pos_mask =
        ids.index_select(0, &rows).unsqueeze(1).eq_tensor(&ids.unsqueeze(0)).logical_and(&self_mask.logical_not());
    let logits = logits.masked_fill(&self_mask, f64::NEG_INFINITY);
    let log_prob = &logits - logits.logsumexp([1i64].as_slice(), true);
    let zeros = log_prob.zeros_like();
    let pos_sum = log_prob.where_self(&pos_mask, &zeros).sum_dim_intlist([1i64].as_slice(), false, logits.kind());
    let pos_count = pos_mask.sum_dim_intlist([1i64].as_slice(), false, logits.kind());
    let per_anchor = -(pos_sum / (pos_count + tiny(logits.kind())));
    let total = per_anchor.sum(logits.kind());
    let denom = denominator(&per_anchor, ctx, views, reduce);
    Ok(if denom > 0.0 { total / denom } else { total * 0.0 })
}
