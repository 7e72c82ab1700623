//! NT-Xent, the normalised temperature-scaled cross-entropy of SimCLR.
//!
//! # Conventions (SimCLR; lightly `NTXentLoss` with `memory_bank_size=0`)
//! - Embeddings are L2-normalised; similarity is the cosine divided by the
//!   temperature t.
//! - The batch holds 2N views: view A of sample i is anchor row i, view B is
//!   row N+i; each is the positive of the other.
//! - Denominator: all 2N−1 other rows (the positive included, the anchor
//!   itself excluded).
//! - Reduction: mean over the 2N anchors.
//!
//! # Shapes
//! - `za`, `zb`: `[N, d]` gathered views A and B (global rows, rank order).
//! - returns: scalar, this rank's share: the sum of its 2B anchors' terms / 2N.
//!
//! [`ntxent_share`] streams the local anchors in blocks (loss/stream.rs): the
//! logits never exceed `[R, 2N]` and the head costs three GEMMs.
//! [`ntxent_dense_share`] builds the `[2B, 2N]` logits whole and lets autograd
//! differentiate them: the reference the parity tests hold the stream to.

use super::stream::{own_rows_gradient, with_gradients, SoftmaxCe};
use super::{check_temperature, check_views, l2_normalize, owned_rows, Ctx, Shard};
use crate::Result;
use tch::{Kind, Tensor};

/// This rank's share of NT-Xent over the gathered views (streamed).
pub fn ntxent_share(za: &Tensor, zb: &Tensor, temperature: f64, shard: Shard) -> Result<Tensor> {
    ntxent_share_blocked(za, zb, temperature, shard, 0)
}

/// [`ntxent_share`] with `rows` anchors per block (0: the default size).
pub fn ntxent_share_blocked(za: &Tensor, zb: &Tensor, temperature: f64, shard: Shard, rows: i64) -> Result<Tensor> {
    check_temperature("NT-Xent", temperature)?;
    check_views("NT-Xent", &[za, zb], shard)?;
    let n = shard.global() as i64;
    let z = l2_normalize(&Tensor::cat(&[za, zb], 0)); // [2N, d], in the graph
    let zd = z.detach();
    let own = owned_rows(shard, 2, z.device()); // [2B]: A rows, then B rows
    let positive = (&own + n).remainder(2 * n);
    let anchors = zd.index_select(0, &own) / temperature;
    let ce = SoftmaxCe {
        anchors: &anchors,
        columns: &zd,
        positive: &positive,
        skip: Some(&own),
        exclude_positive: false,
        positive_weight: None,
        rows,
    };
    let out = ce.run(z.requires_grad());
    let scale = 1.0 / (2 * n) as f64;
    let g = own_rows_gradient(out.d_anchors, out.d_columns, &own, 1.0 / temperature, scale);
    let grads: Vec<_> = g.into_iter().map(|g| (&z, g)).collect();
    Ok(with_gradients(out.loss * scale, &grads))
}

/// NT-Xent with the `[2B, 2N]` logits materialised (the reference form).
pub fn ntxent_dense_share(za: &Tensor, zb: &Tensor, temperature: f64, shard: Shard) -> Result<Tensor> {
    check_temperature("NT-Xent", temperature)?;
    check_views("NT-Xent", &[za, zb], shard)?;
    let n = shard.global() as i64;
    let device = za.device();
    let z = l2_normalize(&Tensor::cat(&[za, zb], 0)); // [2N, d]
    let rows = owned_rows(shard, 2, device); // [2B]: A rows, then B rows
    let pos = (&rows + n).remainder(2 * n); // positive column of each anchor
    let anchors = z.index_select(0, &rows);
    let logits = anchors.matmul(&z.tr()) / temperature; // [2B, 2N]
    let cols = Tensor::arange(2 * n, (Kind::Int64, device)).unsqueeze(0);
    let self_mask = cols.eq_tensor(&rows.unsqueeze(1));
    let logits = logits.masked_fill(&self_mask, f64::NEG_INFINITY);
    let lse = logits.logsumexp([1i64].as_slice(), false);
    let positive = logits.gather(1, &pos.unsqueeze(1), false).squeeze_dim(1);
    Ok((lse - positive).sum(logits.kind()) / (2 * n) as f64)
}

/// NT-Xent with several positives: V ≥ 2 views of each sample; every other
/// view of the same sample is a positive of an anchor.
///
/// # Conventions
/// ℓ_i = −(1/(V−1)) Σ_{p ∈ P(i)} log( exp(s_ip/t) / Σ_{k≠i} exp(s_ik/t) ),
/// cosine similarities, mean over the V·N anchors. With V = 2 it is NT-Xent.
///
/// # Shapes
/// `views`: V tensors `[N, d]`; returns this rank's share (its V·B anchors / V·N).
pub fn ntxent_multi_share(views: &[Tensor], temperature: f64, ctx: &Ctx) -> Result<Tensor> {
    check_temperature("multi-positive NT-Xent", temperature)?;
    if views.len() < 2 {
        return Err(crate::NnError::Param(format!(
            "multi-positive NT-Xent needs at least 2 views, got {}",
            views.len()
        )));
    }
    check_views("multi-positive NT-Xent", &views.iter().collect::<Vec<_>>(), ctx.shard)?;
    let n = ctx.shard.global() as i64;
    let z = Tensor::cat(views, 0);
    let ids = Tensor::arange(views.len() as i64 * n, (Kind::Int64, z.device())).remainder(n);
    super::supcon::multi_positive_share(&z, &ids, temperature, ctx, views.len(), super::supcon::Reduce::Mean)
}
