//! Decoupled contrastive learning (Yeh et al. 2022): NT-Xent with the positive
//! removed from the denominator. Not the *debiased* loss (see `debiased`).
//!
//! # Conventions (lightly `DCLLoss` / `DCLWLoss`)
//! - L2-normalised views; s = cosine / t (lightly's default t = 0.1).
//! - ℓ_i = −w_i·s_ip + log Σ_{k ∉ {i, p}} exp(s_ik) over both views of the
//!   global batch (2N − 2 negatives); mean over the 2N anchors
//!   (lightly: ½(loss(A,B) + loss(B,A)), each a mean over N).
//! - DCLW: w_i = 2 − N · softmax_j(cos(a_j, b_j) / σ)_i over the global batch,
//!   without gradient (lightly `negative_mises_fisher_weights`, σ = 0.5);
//!   `sigma = None` gives w_i = 1 (plain DCL).
//!
//! # Shapes
//! `za`, `zb`: `[N, d]`; returns this rank's share (its 2B anchors / 2N).
//!
//! [`dcl_share`] streams blocks of anchor rows (loss/stream.rs);
//! [`dcl_dense_share`] materialises the `[2B, 2N]` logits (the reference form).

use super::stream::{own_rows_gradient, with_gradients, SoftmaxCe};
use super::{check_temperature, check_views, l2_normalize, owned_rows, Shard};
use crate::Result;
use tch::{Kind, Tensor};

/// This rank's share of DCL (or DCLW when `sigma` is given), streamed.
pub fn dcl_share(za: &Tensor, zb: &Tensor, temperature: f64, sigma: Option<f64>, shard: Shard) -> Result<Tensor> {
    dcl_share_blocked(za, zb, temperature, sigma, shard, 0)
}

/// DCLW's weights `[2N]` (view-major), without gradient: 2 − N·softmax(cos(a_j, b_j)/σ).
fn weights(a: &Tensor, b: &Tensor, sigma: f64, n: i64) -> Tensor {
    let sim = (a * b).sum_dim_intlist([1i64].as_slice(), false, a.kind()).detach() / sigma;
    (sim.softmax(0, a.kind()) * -(n as f64) + 2.0).repeat([2])
}

/// [`dcl_share`] with `rows` anchors per block (0: the default size).
pub fn dcl_share_blocked(
    za: &Tensor,
    zb: &Tensor,
    temperature: f64,
    sigma: Option<f64>,
    shard: Shard,
    rows: i64,
) -> Result<Tensor> {
    check_temperature("DCL", temperature)?;
    check_views("DCL", &[za, zb], shard)?;
    let n = shard.global() as i64;
    let (a, b) = (l2_normalize(za), l2_normalize(zb));
    let z = Tensor::cat(&[&a, &b], 0);
    let zd = z.detach();
    let own = owned_rows(shard, 2, z.device());
    let positive = (&own + n).remainder(2 * n);
    let w = sigma.map(|s| weights(&a, &b, s, n).index_select(0, &own));
    let anchors = zd.index_select(0, &own) / temperature;
    let ce = SoftmaxCe {
        anchors: &anchors,
        columns: &zd,
        positive: &positive,
        skip: Some(&own),
        exclude_positive: true,
        positive_weight: w.as_ref(),
        rows,
    };
    let out = ce.run(z.requires_grad());
    let scale = 1.0 / (2 * n) as f64;
    let g = own_rows_gradient(out.d_anchors, out.d_columns, &own, 1.0 / temperature, scale);
    let grads: Vec<_> = g.into_iter().map(|g| (&z, g)).collect();
    Ok(with_gradients(out.loss * scale, &grads))
}

/// DCL / DCLW with the `[2B, 2N]` logits materialised (the reference form).
pub fn dcl_dense_share(za: &Tensor, zb: &Tensor, temperature: f64, sigma: Option<f64>, shard: Shard) -> Result<Tensor> {
    check_temperature("DCL", temperature)?;
    check_views("DCL", &[za, zb], shard)?;
    let n = shard.global() as i64;
    let (a, b) = (l2_normalize(za), l2_normalize(zb));
    let z = Tensor::cat(&[&a, &b], 0);
    let rows = owned_rows(shard, 2, z.device());
    let pos = (&rows + n).remainder(2 * n);
    let logits = z.index_select(0, &rows).matmul(&z.tr()) / temperature; // [2B, 2N]
    let cols = Tensor::arange(2 * n, (Kind::Int64, z.device())).unsqueeze(0);
    let drop = cols.eq_tensor(&rows.unsqueeze(1)).logical_or(&cols.eq_tensor(&pos.unsqueeze(1)));
    let negative = logits.masked_fill(&drop, f64::NEG_INFINITY).logsumexp([1i64].as_slice(), false);
    let positive = logits.gather(1, &pos.unsqueeze(1), false).squeeze_dim(1);
    let positive = match sigma {
        None => positive,
        Some(sigma) => positive * weights(&a, &b, sigma, n).index_select(0, &rows),
    };
    Ok((negative - positive).sum(logits.kind()) / (2 * n) as f64)
}
