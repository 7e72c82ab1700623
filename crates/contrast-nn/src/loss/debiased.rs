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
//!
//! [`debiased_share`] streams blocks of anchor rows (as loss/stream.rs does,
//! with this loss's own per-row arithmetic); [`debiased_dense_share`]
//! materialises the `[2B, 2N]` logits (the reference form).

use super::stream::{block_rows, own_rows_gradient, with_gradients};
use super::{check_temperature, check_views, l2_normalize, owned_rows, Shard};
use crate::{NnError, Result};
use tch::{Kind, Tensor};

/// This rank's share of the debiased (β = 0) or hard-negative (β > 0) loss, streamed.
pub fn debiased_share(
    za: &Tensor,
    zb: &Tensor,
    temperature: f64,
    tau_plus: f64,
    beta: f64,
    shard: Shard,
) -> Result<Tensor> {
    debiased_share_blocked(za, zb, (temperature, tau_plus, beta), shard, 0)
}

/// [`debiased_share`] with `rows` anchors per block (0: the default size);
/// `params` is (temperature, τ⁺, β).
pub fn debiased_share_blocked(
    za: &Tensor,
    zb: &Tensor,
    params: (f64, f64, f64),
    shard: Shard,
    rows: i64,
) -> Result<Tensor> {
    let (temperature, tau_plus, beta) = params;
    check(temperature, tau_plus, beta)?;
    check_views("debiased contrastive", &[za, zb], shard)?;
    let n = shard.global() as i64;
    let z = l2_normalize(&Tensor::cat(&[za, zb], 0));
    let zd = z.detach();
    let own = owned_rows(shard, 2, z.device());
    let anchors = zd.index_select(0, &own) / temperature;
    let stream = Stream { anchors: &anchors, columns: &zd, own: &own, n, temperature, tau_plus, beta };
    let (loss, d_anchors, d_columns) = stream.run(rows, z.requires_grad());
    let scale = 1.0 / (2 * n) as f64;
    let g = own_rows_gradient(d_anchors, d_columns, &own, 1.0 / temperature, scale);
    let grads: Vec<_> = g.into_iter().map(|g| (&z, g)).collect();
    Ok(with_gradients(loss * scale, &grads))
}

/// The debiased loss over blocks of anchors `[2B, d]` (already divided by t)
/// against the columns `z` `[2N, d]` (detached).
struct Stream<'a> {
    anchors: &'a Tensor,
    columns: &'a Tensor,
    own: &'a Tensor,
    n: i64,
    temperature: f64,
    tau_plus: f64,
    beta: f64,
}

impl Stream<'_> {
    /// Σ over anchors of ℓ_i and, with `grad`, its gradients with respect to
    /// the anchors and the columns.
    fn run(&self, rows: i64, grad: bool) -> (Tensor, Option<Tensor>, Option<Tensor>) {
        let (count, kind) = (self.anchors.size()[0], self.anchors.kind());
        let r = block_rows(2 * self.n, rows);
        let mut loss = Tensor::zeros([], (kind, self.anchors.device()));
        let mut d_anchors = grad.then(|| self.anchors.zeros_like());
        let mut d_columns = grad.then(|| self.columns.zeros_like());
        let mut start = 0;
        while start < count {
            let len = r.min(count - start);
            let a = self.anchors.narrow(0, start, len);
            let own = self.own.narrow(0, start, len).unsqueeze(1);
            let (block_loss, g) = self.block(a.matmul(&self.columns.tr()), &own, grad);
            loss += block_loss;
            if let (Some(g), Some(da), Some(dc)) = (g, d_anchors.as_mut(), d_columns.as_mut()) {
                da.narrow(0, start, len).copy_(&g.matmul(self.columns));
                let _ = dc.addmm_(&g.tr(), &a);
            }
            start += len;
        }
        (loss, d_anchors, d_columns)
    }

    /// One block's logits `s` `[R, 2N]` (consumed in place): Σ ℓ_i and ∂Σℓ/∂s.
    ///
    /// With e_k = exp(s_k − c) (c the row's maximum but itself), pos = e_p,
    /// R = Σ_neg e_k (β = 0) or M·Σ e^(1+β) / Σ e^β, N_g = max((R − τ⁺M·pos)/(1 − τ⁺),
    /// M·exp(−1/t − c)) and E = pos + N_g: ℓ = log E − (s_p − c), and
    /// ∂ℓ/∂s_p = pos·(1 − a·τ⁺M/(1 − τ⁺))/E − 1, ∂ℓ/∂s_k = a·∂R/∂s_k / ((1 − τ⁺)E),
    /// where a is 1 when N_g is not clamped and 0 when it is.
    fn block(&self, mut s: Tensor, own: &Tensor, grad: bool) -> (Tensor, Option<Tensor>) {
        let (kind, m, tau) = (s.kind(), (2 * self.n - 2) as f64, self.tau_plus);
        let pos_col = (own + self.n).remainder(2 * self.n);
        let pos_logit = s.gather(1, &pos_col, false);
        let _ = s.scatter_value_(1, own, f64::NEG_INFINITY);
        let shift = s.amax([1i64].as_slice(), true);
        s -= &shift;
        let _ = s.exp_(); // e_k; the anchor's own column is 0
        let pos = s.gather(1, &pos_col, false);
        let _ = s.scatter_value_(1, &pos_col, 0.0); // negatives only
        let sum = |t: &Tensor| t.sum_dim_intlist([1i64].as_slice(), true, kind);
        let (reweighted, powers) = if self.beta == 0.0 {
            (sum(&s), None)
        } else {
            let (lo, hi) = (s.pow_tensor_scalar(self.beta), s.pow_tensor_scalar(1.0 + self.beta));
            let (a2, a1) = (sum(&lo), sum(&hi));
            ((&a1 / &a2) * m, Some((lo, hi, a1, a2)))
        };
        let ng = (reweighted - &pos * (tau * m)) / (1.0 - tau);
        let floor = (-&shift - 1.0 / self.temperature).exp() * m;
        let active = ng.gt_tensor(&floor).to_kind(kind);
        let e = &pos + ng.maximum(&floor);
        let loss = (e.log() - (pos_logit - &shift)).sum(kind);
        if !grad {
            return (loss, None);
        }
        let coef = &active / (&e * (1.0 - tau));
        let mut g = match powers {
            None => s * &coef,
            Some((lo, hi, a1, a2)) => {
                let term = hi * ((1.0 + self.beta) * m) / &a2 - lo * (&a1 * (self.beta * m)) / a2.square();
                term * &coef
            }
        };
        let g_pos = &pos * (1.0 - &active * (tau * m / (1.0 - tau))) / &e - 1.0;
        let _ = g.scatter_(1, &pos_col, &g_pos);
        (loss, Some(g))
    }
}

fn check(temperature: f64, tau_plus: f64, beta: f64) -> Result<()> {
    check_temperature("debiased contrastive", temperature)?;
    if !(0.0..1.0).contains(&tau_plus) {
        return Err(NnError::Param(format!("debiased contrastive: tau_plus must lie in [0, 1), got {tau_plus}")));
    }
    if !(beta >= 0.0 && beta.is_finite()) {
        return Err(NnError::Param(format!("hard-negative contrastive: beta must be ≥ 0, got {beta}")));
    }
    Ok(())
}

/// The debiased or hard-negative loss with the `[2B, 2N]` logits materialised
/// (the reference form).
pub fn debiased_dense_share(
    za: &Tensor,
    zb: &Tensor,
    temperature: f64,
    tau_plus: f64,
    beta: f64,
    shard: Shard,
) -> Result<Tensor> {
    check(temperature, tau_plus, beta)?;
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
