//! Multi-class N-pair loss (Sohn 2016).
//!
//! # Conventions (pytorch-metric-learning `NPairsLoss`)
//! - One positive pair per label: among all ordered positive pairs (a, p) of
//!   the global batch in row-major order, the first one of each label
//!   (`convert_to_pos_pairs_with_unique_labels`), labels in ascending order.
//! - [`NPairForm::Cosine`] (`loss.name: npair`, the default): similarity is
//!   the dot product of L2-normalised embeddings, as pml's
//!   `DotProductSimilarity` computes it with its default
//!   `normalize_embeddings=True`.
//! - ℓ_k = CE(s(a_k, [p_1 … p_K]), k); mean over the K pairs.
//! - [`NPairForm::Dot`] (`loss.name: npair_dot`): Sohn 2016's form on raw dot
//!   products, with the paper's penalty that keeps the embeddings' norms
//!   bounded, as TensorFlow's `npairs_loss` writes it: + λ/4·(mean_k ‖a_k‖² +
//!   mean_k ‖p_k‖²), λ = `loss.l2_reg` (0.002).
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

/// The similarity an N-pair loss uses.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum NPairForm {
    /// Cosine similarity (pml's default L2 normalisation).
    Cosine,
    /// Raw dot products with the L2 penalty of weight `l2_reg` (Sohn 2016, TensorFlow).
    Dot {
        /// λ of λ/4·(mean‖a‖² + mean‖p‖²).
        l2_reg: f64,
    },
}

/// This rank's share of the N-pair loss.
pub fn npair_share(z: &Tensor, labels: &Tensor, form: NPairForm, ctx: &Ctx) -> Result<Tensor> {
    check_labelled("N-pair loss", z, labels, ctx.shard)?;
    let normalised;
    let z = match form {
        NPairForm::Cosine => {
            normalised = super::l2_normalize(z);
            &normalised
        }
        NPairForm::Dot { .. } => z,
    };
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
    let ce = logits.cross_entropy_loss::<Tensor>(&targets, None, Reduction::Sum, -100, 0.0) / k as f64;
    Ok(match form {
        NPairForm::Cosine => ce,
        // This rank's anchors and their positives: summed over ranks, the mean over all K pairs.
        NPairForm::Dot { l2_reg } => {
            let mine_pos = z.index_select(0, &idx(mine.iter().map(|(_, p)| p.1 as i64).collect()));
            let sq = anchors.square().sum(z.kind()) + mine_pos.square().sum(z.kind());
            ce + sq * (l2_reg / 4.0 / k as f64)
        }
    })
}
