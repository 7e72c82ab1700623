//! Barlow Twins (Zbontar et al. 2021) over the *global* batch.
//!
//! # Conventions (lightly 1.6 `BarlowTwinsLoss` and the official code, λ = 5e-3)
//! - Each view is standardised per feature over the global batch with
//!   batch-norm statistics, [`Standardise::BatchNorm`]: (z − mean)/√(var + 1e-5)
//!   with the biased variance, as `F.batch_norm(training=True)` (lightly) and
//!   `nn.BatchNorm1d(affine=False)` (facebookresearch/barlowtwins) do.
//!   [`Standardise::Unbiased`] (`loss.name: barlow_twins_unbiased`) is the
//!   paper's Algorithm 1 and lightly ≤ 1.5: `(z − z.mean(0)) / z.std(0)`, the
//!   unbiased standard deviation and no epsilon. Their standardised features
//!   differ by the factor √((N−1)/N), so the losses part most at small N.
//! - Statistics are those of the global batch; lightly's `gather_distributed`
//!   averages per-rank correlation matrices, each standardised per rank,
//!   which is not the global loss, so this does not.
//! - c = z̃_Aᵀ z̃_B / N (D×D); loss = Σ_i (1 − c_ii)² + λ Σ_{i≠j} c_ij².
//!
//! The loss does not split into per-anchor terms, so each rank's share is
//! L / P (every rank computes the whole, cheap, D×D loss once).
//!
//! # Shapes
//! `za`, `zb`: `[N, D]`, N ≥ 2; returns L / P.

use super::{check_views, Shard};
use crate::{NnError, Result};
use tch::Tensor;

/// How each view is standardised per feature before the cross-correlation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Standardise {
    /// Batch-norm statistics: biased variance + 1e-5 (lightly 1.6, official code).
    BatchNorm,
    /// Unbiased standard deviation, no epsilon (the paper's Algorithm 1, lightly ≤ 1.5).
    Unbiased,
}

/// The epsilon `torch.nn.functional.batch_norm` adds to the variance.
pub const BATCH_NORM_EPS: f64 = 1e-5;

/// This rank's share of the Barlow Twins loss.
pub fn barlow_twins_share(za: &Tensor, zb: &Tensor, lambda: f64, how: Standardise, shard: Shard) -> Result<Tensor> {
    check_views("Barlow Twins", &[za, zb], shard)?;
    let n = shard.global() as i64;
    if n < 2 {
        return Err(NnError::Shape(
            "Barlow Twins needs a global batch of at least 2 (it standardises over the batch)".into(),
        ));
    }
    if !(lambda >= 0.0) {
        return Err(NnError::Param(format!("Barlow Twins: lambda must be ≥ 0, got {lambda}")));
    }
    let kind = za.kind();
    let standardise = |z: &Tensor| {
        let mean = z.mean_dim([0i64].as_slice(), true, kind);
        let centred = z - mean;
        let scale = match how {
            Standardise::BatchNorm => {
                (centred.square().mean_dim([0i64].as_slice(), true, kind) + BATCH_NORM_EPS).sqrt()
            }
            Standardise::Unbiased => z.std_dim([0i64].as_slice(), true, true).clamp_min(1e-12),
        };
        centred / scale
    };
    let (a, b) = (standardise(za), standardise(zb));
    let c = a.tr().matmul(&b) / n as f64;
    let d = c.size()[0];
    let eye = Tensor::eye(d, (kind, za.device()));
    let on = (c.diagonal(0, 0, 1) - 1.0).square().sum(kind);
    let off = (&c * (eye.ones_like() - &eye)).square().sum(kind);
    Ok((on + off * lambda) / shard.world_size as f64)
}
