//! Lifted structured losses (Song et al. 2016) and the generalised form of
//! Hermans et al. (2017).
//!
//! # Conventions
//! All use Euclidean distance D between L2-normalised embeddings and labels
//! over the global batch; P are the positive pairs, N(i) the negatives of i.
//! - [`lifted_smooth_share`] (pytorch-metric-learning `LiftedStructureLoss`,
//!   neg_margin 1, pos_margin 0): for each *ordered* positive pair (i, j),
//!   J = log Σ_{k∈N(i)} e^{m−D_ik} + log-sum over N(j) jointly
//!   (one log-sum-exp over the negatives of both), + D_ij − pos_margin;
//!   loss = mean over ordered pairs of relu(J)²/2 (= 1/(2|P|) Σ_{unordered} relu(J)²).
//! - [`lifted_hard_share`] (Song et al., eq. 3, no library has it):
//!   J_ij = max(max_{k∈N(i)} (m − D_ik), max_{l∈N(j)} (m − D_jl)) + D_ij;
//!   loss = 1/(2|P|) Σ_{unordered (i,j)∈P} relu(J_ij)², i.e. the mean over
//!   ordered pairs of relu(J)²/2.
//! - [`generalized_lifted_share`] (pytorch-metric-learning
//!   `GeneralizedLiftedStructureLoss`, neg_margin 1, pos_margin 0): per anchor
//!   relu(logsumexp_{p∈P(i)}(D_ip − pos_margin) + logsumexp_{n∈N(i)}(m − D_in)),
//!   mean over all N anchors; an empty set contributes 0.
//!
//! Pair counts (|P|) are counted over the global batch.
//!
//! # Shapes
//! `z`: `[N, d]`, `labels`: `[N]`; returns this rank's share (pairs or
//! anchors whose first element it owns).

use super::metric::{check_labelled, distances, label_masks, masked_logsumexp};
use super::{owned_rows, Ctx};
use crate::{NnError, Result};
use tch::{Kind, Tensor};

fn margins_ok(what: &str, neg_margin: f64, pos_margin: f64) -> Result<()> {
    if neg_margin < 0.0 || pos_margin < 0.0 {
        return Err(NnError::Param(format!("{what}: margins must be ≥ 0, got neg {neg_margin}, pos {pos_margin}")));
    }
    Ok(())
}

/// Per ordered positive pair (i owned, j any): the negative term of i and j
/// together. The log-sum-exp over the union of both rows' negatives is
/// logaddexp(A_i, A_j) of the per-row terms A_k (max for the hard form), so the
/// cost is O(N²), not O(N³). Returns (terms [B, N], D [B, N], positive mask).
fn pair_terms(z: &Tensor, labels: &Tensor, neg_margin: f64, hard: bool, ctx: &Ctx) -> (Tensor, Tensor, Tensor) {
    let rows = owned_rows(ctx.shard, 1, z.device());
    let all = Tensor::arange(z.size()[0], (Kind::Int64, z.device()));
    let d_all = distances(z, z, false); // [N, N]
    let (_, neg_all) = label_masks(&all, labels);
    let x = (-&d_all + neg_margin).masked_fill(&neg_all.logical_not(), f64::NEG_INFINITY); // [N, N]
    let per_row = if hard { x.amax([1i64].as_slice(), false) } else { x.logsumexp([1i64].as_slice(), false) }; // [N]
    let a_i = per_row.index_select(0, &rows).unsqueeze(1); // [B, 1]
    let a_j = per_row.unsqueeze(0); // [1, N]
    let term = if hard { a_i.maximum(&a_j) } else { a_i.logaddexp(&a_j) };
    let (pos, _) = label_masks(&rows, labels);
    (term, d_all.index_select(0, &rows), pos)
}

fn lifted(z: &Tensor, labels: &Tensor, neg_margin: f64, pos_margin: f64, hard: bool, ctx: &Ctx) -> Result<Tensor> {
    let labels = labels.to_device(z.device());
    let (term, d, pos) = pair_terms(z, &labels, neg_margin, hard, ctx);
    // A pair with no negatives at all has term −inf: relu(−inf + D) = 0.
    let j = (term + d - pos_margin).relu().square() / 2.0;
    let j = j.where_self(&pos, &j.zeros_like());
    let j = j.nan_to_num(0.0, None, None);
    let pairs = ctx.global(pos.sum(Kind::Int64).int64_value(&[]) as f64);
    Ok(if pairs > 0.0 { j.sum(z.kind()) / pairs } else { j.sum(z.kind()) * 0.0 })
}

/// This rank's share of pytorch-metric-learning's `LiftedStructureLoss`.
pub fn lifted_smooth_share(z: &Tensor, labels: &Tensor, neg_margin: f64, pos_margin: f64, ctx: &Ctx) -> Result<Tensor> {
    check_labelled("lifted structure loss", z, labels, ctx.shard)?;
    margins_ok("lifted structure loss", neg_margin, pos_margin)?;
    lifted(z, labels, neg_margin, pos_margin, false, ctx)
}

/// This rank's share of the hard (max) lifted structure loss of Song et al.
pub fn lifted_hard_share(z: &Tensor, labels: &Tensor, margin: f64, ctx: &Ctx) -> Result<Tensor> {
    check_labelled("hard lifted structure loss", z, labels, ctx.shard)?;
    margins_ok("hard lifted structure loss", margin, 0.0)?;
    lifted(z, labels, margin, 0.0, true, ctx)
}

/// This rank's share of pytorch-metric-learning's `GeneralizedLiftedStructureLoss`.
pub fn generalized_lifted_share(
    z: &Tensor,
    labels: &Tensor,
    neg_margin: f64,
    pos_margin: f64,
    ctx: &Ctx,
) -> Result<Tensor> {
    check_labelled("generalized lifted structure loss", z, labels, ctx.shard)?;
    margins_ok("generalized lifted structure loss", neg_margin, pos_margin)?;
    let labels = labels.to_device(z.device());
    let rows = owned_rows(ctx.shard, 1, z.device());
    let d = distances(&z.index_select(0, &rows), z, false);
    let (pos, neg) = label_masks(&rows, &labels);
    let per_anchor = (masked_logsumexp(&(&d - pos_margin), &pos) + masked_logsumexp(&(-&d + neg_margin), &neg)).relu();
    Ok(per_anchor.sum(z.kind()) / ctx.shard.global() as f64)
}
