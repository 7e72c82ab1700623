//! Debiased contrastive loss (Chuang et al. 2020) and its hard-negative
//! reweighting (Robinson et al. 2021), one function.
//!
//! # Conventions (the authors' training scripts, `DebiasedPosLoss`-free form)
//! With s = cosine / t over L2-normalised views, M = 2N − 2 negatives per
//! anchor (both views of the global batch but the anchor and its positive):
//! - pos = exp(s_ip); neg_k = exp(s_ik);
//! - reweighted negatives R = Σ_k imp_k·neg_k / mean_k(imp_k) with
//!   imp_k = neg_k^β (β = 0: R = Σ_k neg_k, the debiased loss);
//! - N_g = max((R − τ⁺·M·pos) / (1 − τ⁺), M·e^(−1/t)) (the authors' clamp);
//! - ℓ_i = −log(pos / (pos + N_g)), mean over the 2N anchors.
//!
//! With τ⁺ = 0 and β = 0 it equals NT-Xent. Everything is evaluated after
//! shifting each row by its maximum logit, so no exponential overflows.
//!
//! # Shapes
//! `za`, `zb`: `[N, d]`; returns this rank's share (its 2B anchors / 2N).

use super::{check_temperature, check_views, l2_normalize, owned_rows, Shard};
use crate::{NnError, Result};
use tch::{Kind, Tensor};

/// This rank's share of the debiased (β = 0) or hard-negative (β > 0) loss.
pub fn debiased_share(
    za: &Tensor,
    zb: &Tensor,
    temperature: f64,
    tau_plus: f64,
    beta: f64,
    shard: Shard,
) -> Result<Tensor> {
    check_temperature("debiased contrastive", temperature)?;
    if !(0.0..1.0).contains(&tau_plus) {
        return Err(NnError::Param(format!("debiased contrastive: tau_plus must lie in [0, 1), got {tau_plus}")));
    }
    if !(beta >= 0.0 && beta.is_finite()) {
        return Err(NnError::Param(format!("hard-negative contrastive: beta must be ≥ 0, got {beta}")));
    }
    check_views("debiased contrastive", &[za, zb], shard)?;
    let n = shard.global() as i64;
    let z = l2_normalize(&Tensor::cat(&[za, zb], 0));
    let rows = owned_rows(shard, 2, z.device());
    let pos_col = (&rows + n).remainder(2 * n);
    let logits = z.index_select(0, &rows).matmul(&z.tr()) / temperature; // [2B, 2N]
    let kind = logits.kind();
    let cols = Tensor::arange(2 * n, (Kind::Int64, z.device())).unsqueeze(0);
    let neg_mask = cols.ne_tensor(&rows.unsqueeze(1)).logical_and(&cols.ne_tensor(&pos_col.unsqueeze(1)));
    let m = (2 * n - 2) as f64;
    let pos_logit = logits.gather(1, &pos_col.unsqueeze(1), false); // [2B, 1]
                                                                    // Shift by the row maximum over the anchor's positive and negatives (detached: the value cancels).
    let shift = logits
        .masked_fill(&cols.eq_tensor(&rows.unsqueeze(1)), f64::NEG_INFINITY)
        .amax([1i64].as_slice(), true)
        .detach();
    let pos = (&pos_logit - &shift).exp();
    let zeros = logits.zeros_like();
    let neg = (&logits - &shift).exp().where_self(&neg_mask, &zeros); // exp(s_ik − shift)
    let reweighted = if beta == 0.0 {
        neg.sum_dim_intlist([1i64].as_slice(), true, kind)
    } else {
        // Σ neg^(1+β) / mean(neg^β), with neg in shifted units: the β·shift factors cancel.
        let powered = ((&logits - &shift) * (1.0 + beta)).exp().where_self(&neg_mask, &zeros);
        let imp = ((&logits - &shift) * beta).exp().where_self(&neg_mask, &zeros);
        powered.sum_dim_intlist([1i64].as_slice(), true, kind)
            / (imp.sum_dim_intlist([1i64].as_slice(), true, kind) / m)
    };
    let ng = (reweighted - &pos * (tau_plus * m)) / (1.0 - tau_plus);
    let floor = (-&shift - 1.0 / temperature).exp() * m;
    let ng = ng.maximum(&floor);
    let per_anchor = (&pos + ng).log() - (pos_logit - &shift); // −log(pos/(pos+N_g))
    Ok(per_anchor.sum(kind) / (2 * n) as f64)
}
