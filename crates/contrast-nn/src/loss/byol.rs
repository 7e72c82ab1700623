//! BYOL's and SimSiam's regression losses between an online prediction and a
//! target that carries no gradient.
//!
//! # Conventions
//! - [`negative_cosine_share`]: −cos(p_i, z_i), mean over N (lightly
//!   `NegativeCosineSimilarity`, SimSiam).
//! - [`normalized_mse_share`]: ‖p̂_i − ẑ_i‖² = 2 − 2 cos(p_i, z_i), mean over
//!   N (BYOL's regression loss).
//! - The target `z` is detached here (stop-gradient / momentum target).
//!
//! # Shapes
//! `p`, `z`: `[N, d]`; returns this rank's share (its B rows / N).

use super::{check_views, l2_normalize, Shard};
use crate::Result;

fn local_cosine(p: &tch::Tensor, z: &tch::Tensor, shard: Shard) -> tch::Tensor {
    let (b, off) = (shard.local_batch as i64, shard.offset() as i64);
    let (p, z) = (l2_normalize(&p.narrow(0, off, b)), l2_normalize(&z.narrow(0, off, b).detach()));
    let kind = z.kind();
    (p * z).sum_dim_intlist([1i64].as_slice(), false, kind)
}

/// This rank's share of −mean cos(p, stopgrad(z)).
pub fn negative_cosine_share(p: &tch::Tensor, z: &tch::Tensor, shard: Shard) -> Result<tch::Tensor> {
    check_views("negative cosine", &[p, z], shard)?;
    let cos = local_cosine(p, z, shard);
    Ok(-cos.sum(cos.kind()) / shard.global() as f64)
}

/// This rank's share of mean (2 − 2 cos(p, stopgrad(z))).
pub fn normalized_mse_share(p: &tch::Tensor, z: &tch::Tensor, shard: Shard) -> Result<tch::Tensor> {
    check_views("normalised MSE", &[p, z], shard)?;
    let cos = local_cosine(p, z, shard);
    Ok((-cos * 2.0 + 2.0).sum(p.kind()) / shard.global() as f64)
}
