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
//! `z`: `[N, d]`, `labels`: `[N]`; returns this rank's share. "All" is
//! evaluated in anchor chunks so memory stays O(chunk · N²).

use super::metric::{avg_non_zero, check_labelled, distances, label_masks};
use super::{owned_rows, Ctx};
use crate::{NnError, Result};
use tch::Tensor;

/// Which triplets the loss uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mining {
    /// Every valid triplet.
    All,
    /// Hardest positive and hardest negative per anchor.
    BatchHard,
    /// Negatives farther than the positive but within the margin.
    SemiHard,
}

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
        Mining::All | Mining::SemiHard => {
            let b = d.size()[0];
            let chunk = (1i64 << 22) / (d.size()[1] * d.size()[1]).max(1);
            let chunk = chunk.clamp(1, b.max(1));
            let mut parts = Vec::new();
            let mut s = 0;
            while s < b {
                let e = (s + chunk).min(b);
                let (dc, pc, nc) = (d.narrow(0, s, e - s), pos.narrow(0, s, e - s), neg.narrow(0, s, e - s));
                let ap = dc.unsqueeze(2); // [c, N, 1]: p along dim 1
                let an = dc.unsqueeze(1); // [c, 1, N]: n along dim 2
                let mut valid = pc.unsqueeze(2).logical_and(&nc.unsqueeze(1));
                if mining == Mining::SemiHard {
                    let gap = (&an - &ap).detach();
                    valid = valid.logical_and(&gap.gt(0.0)).logical_and(&gap.le(margin));
                }
                let t = (ap - an + margin).relu();
                parts.push(t.where_self(&valid, &t.zeros_like()).flatten(0, -1));
                s = e;
            }
            if parts.is_empty() {
                Tensor::zeros([0], (z.kind(), z.device()))
            } else {
                Tensor::cat(&parts, 0)
            }
        }
    };
    Ok(avg_non_zero(&terms, ctx))
}
