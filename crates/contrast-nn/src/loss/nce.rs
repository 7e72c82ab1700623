//! Noise-contrastive estimation (Gutmann & Hyvärinen 2010), binary, against a
//! known noise distribution, as instance discrimination uses it (Wu et al. 2018).
//!
//! # Conventions
//! - s_ij = cosine(z_i, z_j) / t on L2-normalised views (2N rows).
//! - For anchor i: its positive is its other view; the K = 2N − 2 other rows
//!   are noise samples drawn from p_n (uniform over a dataset of `noise_size`
//!   items: log p_n = −log noise_size).
//! - P(data | x) = σ(s − log(K·p_n)); ℓ_i = −log σ(s_ip − c) − Σ_k log(1 − σ(s_ik − c)),
//!   c = log K + log p_n, computed with softplus; mean over the 2N anchors.
//!
//! # Shapes
//! `za`, `zb`: `[N, d]`; returns this rank's share (its 2B anchors / 2N).

use super::{check_temperature, check_views, l2_normalize, owned_rows, Shard};
use crate::{NnError, Result};
use tch::{Kind, Tensor};

/// This rank's share of binary NCE.
pub fn nce_share(za: &Tensor, zb: &Tensor, temperature: f64, noise_size: f64, shard: Shard) -> Result<Tensor> {
    check_temperature("NCE", temperature)?;
    check_views("NCE", &[za, zb], shard)?;
    if !(noise_size >= 1.0) {
        return Err(NnError::Param(format!("NCE: noise_size must be ≥ 1, got {noise_size}")));
    }
    let n = shard.global() as i64;
    let z = l2_normalize(&Tensor::cat(&[za, zb], 0));
    let rows = owned_rows(shard, 2, z.device());
    let pos = (&rows + n).remainder(2 * n);
    let k = (2 * n - 2) as f64;
    let c = if k > 0.0 { k.ln() - noise_size.ln() } else { -noise_size.ln() };
    let logits = z.index_select(0, &rows).matmul(&z.tr()) / temperature - c; // [2B, 2N]
    let cols = Tensor::arange(2 * n, (Kind::Int64, z.device())).unsqueeze(0);
    let is_pos = cols.eq_tensor(&pos.unsqueeze(1));
    let is_self = cols.eq_tensor(&rows.unsqueeze(1));
    // −log σ(x) = softplus(−x); −log(1 − σ(x)) = softplus(x).
    let terms = (-&logits).softplus().where_self(&is_pos, &logits.softplus());
    let terms = terms.where_self(&is_self.logical_not(), &terms.zeros_like());
    Ok(terms.sum(logits.kind()) / (2 * n) as f64)
}
