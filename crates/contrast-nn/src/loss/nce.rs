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
//!
//! [`nce_share`] streams blocks of anchor rows (the sigmoid pairs of
//! loss/stream.rs: a positive at the other view, noise elsewhere, itself left
//! out); [`nce_dense_share`] materialises the `[2B, 2N]` logits (the reference form).

use super::stream::{own_rows_gradient, with_gradients, SigmoidPairs};
use super::{check_temperature, check_views, l2_normalize, owned_rows, Shard};
use crate::{NnError, Result};
use tch::{Kind, Tensor};

fn check(za: &Tensor, zb: &Tensor, temperature: f64, noise_size: f64, shard: Shard) -> Result<()> {
    check_temperature("NCE", temperature)?;
    check_views("NCE", &[za, zb], shard)?;
    if !(noise_size >= 1.0) {
        return Err(NnError::Param(format!("NCE: noise_size must be ≥ 1, got {noise_size}")));
    }
    Ok(())
}

/// c = log K + log p_n, with K = 2N − 2 noise samples.
fn offset(n: i64, noise_size: f64) -> f64 {
    let k = (2 * n - 2) as f64;
    if k > 0.0 {
        k.ln() - noise_size.ln()
    } else {
        -noise_size.ln()
    }
}

/// This rank's share of binary NCE (streamed).
pub fn nce_share(za: &Tensor, zb: &Tensor, temperature: f64, noise_size: f64, shard: Shard) -> Result<Tensor> {
    nce_share_blocked(za, zb, (temperature, noise_size), shard, 0)
}

/// [`nce_share`] with `rows` anchors per block (0: the default size);
/// `params` is (temperature, noise_size).
pub fn nce_share_blocked(za: &Tensor, zb: &Tensor, params: (f64, f64), shard: Shard, rows: i64) -> Result<Tensor> {
    let (temperature, noise_size) = params;
    check(za, zb, temperature, noise_size, shard)?;
    let n = shard.global() as i64;
    let z = l2_normalize(&Tensor::cat(&[za, zb], 0));
    let zd = z.detach();
    let own = owned_rows(shard, 2, z.device());
    let positive = (&own + n).remainder(2 * n);
    let anchors = zd.index_select(0, &own);
    let pairs = SigmoidPairs {
        anchors: &anchors,
        columns: &zd,
        positive: &positive,
        scale: 1.0 / temperature,
        bias: -offset(n, noise_size),
        skip: Some(&own),
        rows,
    };
    let out = pairs.run(z.requires_grad());
    let w = 1.0 / (2 * n) as f64;
    // The anchors are z's own rows, unscaled (the pairs apply 1/t themselves).
    let g = out.grads.and_then(|(da, dc, _, _)| own_rows_gradient(Some(da), Some(dc), &own, 1.0, w));
    let grads: Vec<_> = g.into_iter().map(|g| (&z, g)).collect();
    Ok(with_gradients(out.loss * w, &grads))
}

/// Binary NCE with the `[2B, 2N]` logits materialised (the reference form).
pub fn nce_dense_share(za: &Tensor, zb: &Tensor, temperature: f64, noise_size: f64, shard: Shard) -> Result<Tensor> {
    check(za, zb, temperature, noise_size, shard)?;
    let n = shard.global() as i64;
    let z = l2_normalize(&Tensor::cat(&[za, zb], 0));
    let rows = owned_rows(shard, 2, z.device());
    let pos = (&rows + n).remainder(2 * n);
    let c = offset(n, noise_size);
    let logits = z.index_select(0, &rows).matmul(&z.tr()) / temperature - c; // [2B, 2N]
    let cols = Tensor::arange(2 * n, (Kind::Int64, z.device())).unsqueeze(0);
    let is_pos = cols.eq_tensor(&pos.unsqueeze(1));
    let is_self = cols.eq_tensor(&rows.unsqueeze(1));
    // −log σ(x) = softplus(−x); −log(1 − σ(x)) = softplus(x).
    let terms = (-&logits).softplus().where_self(&is_pos, &logits.softplus());
    let terms = terms.where_self(&is_self.logical_not(), &terms.zeros_like());
    Ok(terms.sum(logits.kind()) / (2 * n) as f64)
}
