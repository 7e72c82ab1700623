//! Multi-class N-pair loss (Sohn 2016).
//!
//! # Conventions (pytorch-metric-learning `NPairsLoss`)
//! - One positive pair per label: among all ordered positive pairs (a, p) of
//!   the global batch in row-major order, the first one of each label
//!   (`convert_to_pos_pairs_with_unique_labels`), labels in ascending order.
//! - Similarity is the plain dot product (`DotProductSimilarity`, no normalisation).
//! - ℓ_k = CE(a_k · [p_1 … p_K]ᵀ, k); mean over the K pairs.
//!
//! # Shapes
//! `z`: `[N, d]`, `labels`: `[N]`; returns this rank's share (pairs whose
//! anchor it owns). The pair choice is made on the host from the gathered
//! labels, identically on every rank.

use super::metric::check_labelled;
use super::Ctx;
use crate::Result;
use tch::{Reduction, Tensor};

/// The (anchor, positive) rows pytorch-metric-learning picks: per label (ascending), the first ordered pair.
pub fn npair_pairs(labels: &[i64]) -> Vec<(usize, usize)> {
    let mut seen = std::collections::BTreeMap::new();
    for (a, &la) in labels.iter().enumerate() {
        if seen.contains_key(&la) {
            continue;
        }
        if let Some(p) = labels.iter().enumerate().position(|(p, &lp)| p != a && lp == la) {
            seen.insert(la, (a, p));
        }
    }
    seen.into_values().collect()
}

/// This rank's share of the N-pair loss.
pub fn npair_share(z: &Tensor, labels: &Tensor, ctx: &Ctx) -> Result<Tensor> {
    check_labelled("N-pair loss", z, labels, ctx.shard)?;
    let host = crate::to_host::<i64>(labels);
    let pairs = npair_pairs(&host);
    if pairs.is_empty() {
        return Ok(z.sum(z.kind()) * 0.0);
    }
    let (lo, hi) = (ctx.shard.offset(), ctx.shard.offset() + ctx.shard.local_batch);
    let k = pairs.len() as i64;
    let idx = |v: Vec<i64>| Tensor::from_slice(&v).to_device(z.device());
    let positives = z.index_select(0, &idx(pairs.iter().map(|p| p.1 as i64).collect()));
    let mine: Vec<(usize, &(usize, usize))> =
        pairs.iter().enumerate().filter(|(_, p)| (lo..hi).contains(&p.0)).collect();
    if mine.is_empty() {
        return Ok(z.sum(z.kind()) * 0.0);
    }
    let anchors = z.index_select(0, &idx(mine.iter().map(|(_, p)| p.0 as i64).collect()));
    let targets = idx(mine.iter().map(|(k, _)| *k as i64).collect());
    let logits = anchors.matmul(&positives.tr());
    Ok(logits.cross_entropy_loss::<Tensor>(&targets, None, Reduction::Sum, -100, 0.0) / k as f64)
}
