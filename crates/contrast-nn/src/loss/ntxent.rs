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
//! Only the local anchor rows are scored against all 2N columns: the logits
//! are `[2B, 2N]` per rank, never `[2N, 2N]`.

use super::{l2_normalize, Shard};
use crate::{NnError, Result};
use tch::{Kind, Tensor};

/// This rank's share of NT-Xent over the gathered views.
pub fn ntxent_share(za: &Tensor, zb: &Tensor, temperature: f64, shard: Shard) -> Result<Tensor> {
    if !(temperature > 0.0) {
        return Err(NnError::Param(format!("NT-Xent temperature must be > 0, got {temperature}")));
    }
    let n = shard.global() as i64;
    if za.size() != zb.size() || za.dim() != 2 || za.size()[0] != n {
        return Err(NnError::Shape(format!(
            "NT-Xent views must both be [N={n}, d], got {:?} and {:?}",
            za.size(),
            zb.size()
        )));
    }
    let device = za.device();
    let z = l2_normalize(&Tensor::cat(&[za, zb], 0)); // [2N, d]
    let (b, off) = (shard.local_batch as i64, shard.offset() as i64);
    let local = Tensor::arange_start(off, off + b, (Kind::Int64, device));
    let rows = Tensor::cat(&[&local, &(&local + n)], 0); // [2B]: A rows, then B rows
    let pos = Tensor::cat(&[&(&local + n), &local], 0); // positive column of each anchor
    let anchors = z.index_select(0, &rows);
    let logits = anchors.matmul(&z.tr()) / temperature; // [2B, 2N]
    let cols = Tensor::arange(2 * n, (Kind::Int64, device)).unsqueeze(0);
    let self_mask = cols.eq_tensor(&rows.unsqueeze(1));
    let logits = logits.masked_fill(&self_mask, f64::NEG_INFINITY);
    let lse = logits.logsumexp([1i64].as_slice(), false);
    let positive = logits.gather(1, &pos.unsqueeze(1), false).squeeze_dim(1);
    Ok((lse - positive).sum(logits.kind()) / (2 * n) as f64)
}
