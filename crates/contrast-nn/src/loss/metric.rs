//! Helpers of the metric-learning losses (pytorch-metric-learning conventions):
//! Euclidean distances between L2-normalised embeddings, label masks, and the
//! masked log-sum-exp of `lmu.logsumexp(..., add_one=False)`.

use super::l2_normalize;
use tch::{Kind, Tensor};

/// Distances `[A, M]` between `rows` and `cols` after L2 normalisation
/// (`LpDistance(normalize_embeddings=True, p=2)`); `squared` gives ‖·‖².
/// The square root has zero gradient where the distance is exactly 0.
pub fn distances(rows: &Tensor, cols: &Tensor, squared: bool) -> Tensor {
    let (r, c) = (l2_normalize(rows), l2_normalize(cols));
    plain_distances(&r, &c, squared)
}

/// Distances `[A, M]` without normalisation.
pub fn plain_distances(r: &Tensor, c: &Tensor, squared: bool) -> Tensor {
    let kind = r.kind();
    let rn = r.square().sum_dim_intlist([1i64].as_slice(), true, kind);
    let cn = c.square().sum_dim_intlist([1i64].as_slice(), true, kind).tr();
    let d2 = (rn + cn - r.matmul(&c.tr()) * 2.0).clamp_min(0.0);
    if squared {
        return d2;
    }
    let positive = d2.gt(0.0);
    let tiny = if kind == Kind::Double { 1e-300 } else { 1e-30 };
    d2.clamp_min(tiny).sqrt().where_self(&positive, &d2.zeros_like())
}

/// Masks `[A, M]`: same label and not the anchor itself; different label.
pub fn label_masks(anchor_rows: &Tensor, labels: &Tensor) -> (Tensor, Tensor) {
    let m = labels.size()[0];
    let cols = Tensor::arange(m, (Kind::Int64, labels.device())).unsqueeze(0);
    let not_self = cols.ne_tensor(&anchor_rows.unsqueeze(1));
    let same = labels.index_select(0, anchor_rows).unsqueeze(1).eq_tensor(&labels.unsqueeze(0));
    (same.logical_and(&not_self), same.logical_not())
}

/// log Σ_{kept} exp(x) along dim 1; 0 for a row with nothing kept
/// (pytorch-metric-learning `lmu.logsumexp(..., add_one=False)`).
pub fn masked_logsumexp(x: &Tensor, keep: &Tensor) -> Tensor {
    let neg_inf = x.full_like(f64::NEG_INFINITY);
    let masked = x.where_self(keep, &neg_inf);
    let any = keep.any_dim(1, false);
    let safe = masked.where_self(&any.unsqueeze(1), &x.zeros_like());
    safe.logsumexp([1i64].as_slice(), false).where_self(&any, &any.zeros_like().to_kind(x.kind()))
}

/// Sum of `terms` divided by the global number of terms > 0
/// (pytorch-metric-learning `AvgNonZeroReducer`); 0 when there are none.
pub fn avg_non_zero(terms: &Tensor, ctx: &super::Ctx) -> Tensor {
    let count = ctx.global(terms.gt(0.0).sum(Kind::Int64).int64_value(&[]) as f64);
    let total = terms.sum(terms.kind());
    if count > 0.0 {
        total / count
    } else {
        total * 0.0
    }
}

/// Check `[N, d]` embeddings and `[N]` labels; `what` names the loss.
pub fn check_labelled(what: &str, z: &Tensor, labels: &Tensor, shard: super::Shard) -> crate::Result<()> {
    let n = shard.global() as i64;
    if z.dim() != 2 || z.size()[0] != n {
        return Err(crate::NnError::Shape(format!("{what}: embeddings must be [N={n}, d], got {:?}", z.size())));
    }
    if labels.size() != [n] {
        return Err(crate::NnError::Shape(format!(
            "{what}: labels must be [N={n}], got {:?} (a supervised loss needs labels)",
            labels.size()
        )));
    }
    Ok(())
}
