//! Barlow Twins (Zbontar et al. 2021) over the *global* batch.
//!
//! # Conventions (lightly `BarlowTwinsLoss`, λ = 5e-3)
//! - Each view is standardised per feature over the global batch: mean, and
//!   the unbiased standard deviation (`torch.std`); lightly's distributed mode
//!   standardises per rank, which is not the global loss, so this does not.
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

/// This rank's share of the Barlow Twins loss.
pub fn barlow_twins_share(za: &Tensor, zb: &Tensor, lambda: f64, shard: Shard) -> Result<Tensor> {
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
        let std = z.std_dim([0i64].as_slice(), true, true);
        (z - mean) / std.clamp_min(1e-12)
    };
    let (a, b) = (standardise(za), standardise(zb));
    let c = a.tr().matmul(&b) / n as f64;
    let d = c.size()[0];
    let eye = Tensor::eye(d, (kind, za.device()));
    let on = (c.diagonal(0, 0, 1) - 1.0).square().sum(kind);
    let off = (&c * (eye.ones_like() - &eye)).square().sum(kind);
    Ok((on + off * lambda) / shard.world_size as f64)
}
