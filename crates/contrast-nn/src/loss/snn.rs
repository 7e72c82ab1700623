//! Soft nearest neighbour loss (Frosst, Papernot & Hinton 2019).
//!
//! # Conventions
//! - Squared Euclidean distance on the embeddings as given (no normalisation),
//!   divided by the temperature T.
//! - ℓ_i = −log( Σ_{j≠i, y_j=y_i} e^{−d²_ij/T} / Σ_{k≠i} e^{−d²_ik/T} ), in
//!   log-sum-exp form.
//! - Mean over the anchors that have at least one positive, counted over the
//!   global batch (the paper's reference adds a stability ε inside the log
//!   instead; here anchors without positives are left out).
//!
//! # Shapes
//! `z`: `[N, d]`, `labels`: `[N]`; returns this rank's share.

use super::metric::{check_labelled, label_masks, masked_logsumexp, plain_distances};
use super::{check_temperature, owned_rows, Ctx};
use crate::Result;
use tch::{Kind, Tensor};

/// This rank's share of the soft nearest neighbour loss.
pub fn snn_share(z: &Tensor, labels: &Tensor, temperature: f64, ctx: &Ctx) -> Result<Tensor> {
    check_temperature("soft nearest neighbour", temperature)?;
    check_labelled("soft nearest neighbour", z, labels, ctx.shard)?;
    let labels = labels.to_device(z.device());
    let rows = owned_rows(ctx.shard, 1, z.device());
    let x = -plain_distances(&z.index_select(0, &rows), z, true) / temperature; // [B, N]
    let (pos, _) = label_masks(&rows, &labels);
    let cols = Tensor::arange(z.size()[0], (Kind::Int64, z.device())).unsqueeze(0);
    let not_self = cols.ne_tensor(&rows.unsqueeze(1));
    let has_pos = pos.any_dim(1, false);
    let per_anchor = masked_logsumexp(&x, &not_self) - masked_logsumexp(&x, &pos);
    let per_anchor = per_anchor.where_self(&has_pos, &per_anchor.zeros_like());
    let count = ctx.global(has_pos.sum(Kind::Int64).int64_value(&[]) as f64);
    Ok(if count > 0.0 { per_anchor.sum(z.kind()) / count } else { per_anchor.sum(z.kind()) * 0.0 })
}
