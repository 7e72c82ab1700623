//! Triplet margin loss with triplets mined from the global batch.
//!
//! # Conventions (pytorch-metric-learning `TripletMarginLoss`, margin 0.05)
//! - Euclidean distance between L2-normalised embeddings.
//! - ℓ(a, p, n) = relu(d_ap − d_an + margin).
//! - Mining over the global batch (anchors are this rank's rows):
//!   `All` — every (a, p, n) with y_p = y_a, p ≠ a, y_n ≠ y_a;
//!   `BatchHard` — per anchor the farthest positive and the nearest negative
//!   (`BatchHardMiner`; ties go to the lowest global index);
//!   `SemiHard` — the triplets with 0 < d_an − d_ap ≤ margin
//!   (`TripletMarginMiner(type_of_triplets="semihard")` at the loss margin).
//!   Mining uses distances without gradient; the loss is then differentiated.
//! - Reduction: `AvgNonZeroReducer` over the mined triplets, counted globally.
//!
//! # Shapes
//! `z`: `[N, d]`, `labels`: `[N]`; returns this rank's share.
//!
//! "All" and "semi-hard" never keep the B·N² triplet terms for autograd: the
//! active triplets (term > 0) are counted without gradient in anchor chunks,
//! c_ap = #active n per (a, p) and c_an = #active p per (a, n), and the loss is
//! (Σ c_ap·d_ap − Σ c_an·d_an + m·K) / K_global — the same value and the same
//! (sub)gradient as summing relu over the triplets, in O(B·N) autograd memory.

use super::metric::{avg_non_zero, check_labelled, distances, label_masks};
use super::{owned_rows, Ctx};
use crate::{NnError, Result};
use tch::Tensor;

pub use contrast_config::Mining;

/// This rank's share of the triplet margin loss.
pub fn triplet_share(z: &Tensor, labels: &Tensor, margin: f64, mining: Mining, ctx: &Ctx) -> Result<Tensor> {
    check_labelled("triplet loss", z, labels, ctx.shard)?;
    if margin < 0.0 {
        return Err(NnError::Param(format!("triplet loss: margin must be ≥ 0, got {margin}")));
    }
    let rows = owned_rows(ctx.shard, 1, z.device());
    let labels = labels.to_device(z.device());
    let d = distances(&z.index_select(0, &rows), z, false); // [B, N]
    let (pos, neg) = label_masks(&rows, &labels);
    let terms = match mining {
        Mining::BatchHard => {
            let dd = d.detach();
            let far = dd.masked_fill(&pos.logical_not(), f64::NEG_INFINITY).argmax(1, true);
            let near = dd.masked_fill(&neg.logical_not(), f64::INFINITY).argmin(1, true);
            let valid = pos.any_dim(1, false).logical_and(&neg.any_dim(1, false));
            let t = (d.gather(1, &far, false) - d.gather(1, &near, false) + margin).relu().squeeze_dim(1);
            t.where_self(&valid, &t.zeros_like())
        }
        Mining::All | Mining::SemiHard => return all_triplets(&d, &pos, &neg, margin, mining, ctx),
    };
    Ok(avg_non_zero(&terms, ctx))
}

fn all_triplets(d: &Tensor, pos: &Tensor, neg: &Tensor, margin: f64, mining: Mining, ctx: &Ctx) -> Result<Tensor> {
    let (b, n) = (d.size()[0], d.size()[1]);
    let dd = d.detach();
    let chunk = ((1i64 << 24) / (n * n).max(1)).clamp(1, b.max(1));
    let mut c_ap = Vec::new();
    let mut c_an = Vec::new();
    let mut active_total = 0i64;
    tch::no_grad(|| {
        let mut s = 0;
        while s < b {
            let e = (s + chunk).min(b);
            let (dc, pc, nc) = (dd.narrow(0, s, e - s), pos.narrow(0, s, e - s), neg.narrow(0, s, e - s));
            let ap = dc.unsqueeze(2); // [c, N(p), 1]
            let an = dc.unsqueeze(1); // [c, 1, N(n)]
            let gap = &an - &ap; // d_an − d_ap
            let mut active = pc.unsqueeze(2).logical_and(&nc.unsqueeze(1)).logical_and(&gap.lt(margin));
            if mining == Mining::SemiHard {
                active = active.logical_and(&gap.gt(0.0));
            }
            let kind = d.kind();
            c_ap.push(active.sum_dim_intlist([2i64].as_slice(), false, kind));
            c_an.push(active.sum_dim_intlist([1i64].as_slice(), false, kind));
            active_total += active.sum(tch::Kind::Int64).int64_value(&[]);
            s = e;
        }
    });
    let count = ctx.global(active_total as f64);
    if b == 0 || count == 0.0 {
        return Ok(d.sum(d.kind()) * 0.0);
    }
    let (c_ap, c_an) = (Tensor::cat(&c_ap, 0), Tensor::cat(&c_an, 0));
    let total = (c_ap * d).sum(d.kind()) - (c_an * d).sum(d.kind()) + margin * active_total as f64;
    Ok(total / count)
}
