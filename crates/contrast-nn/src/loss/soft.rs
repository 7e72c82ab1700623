//! Soft targets for mixed batches (mixup / CutMix of the data pipeline).
//!
//! A mixed batch row i is λ_i·x_i + (1 − λ_i)·x_{π(i)} with π a permutation of
//! the global batch ([`Mix`], keyed on (seed, step, global row) by the data
//! side). The losses then take soft targets:
//! - [`infonce_soft_share`] (i-Mix, Lee et al. 2021): the target of query i is
//!   λ_i on key i and 1 − λ_i on key π(i); −Σ_c target_c log softmax_c; mean over N.
//! - [`ntxent_soft_share`]: NT-Xent with view A mixed: anchor A_i targets B_i
//!   (λ_i) and B_{π(i)} (1 − λ_i); anchor B_i targets the mixed A rows that
//!   contain i — A_i (λ_i) and A_j with π(j) = i (1 − λ_j) — normalised to sum 1.
//!   Softmax over all 2N − 1 rows but the anchor; mean over 2N anchors.
//! - [`supcon_soft_share`] (SupCon with mixed labels): label distributions
//!   q_i; the positive weight of (i, p) is ⟨q_i, q_p⟩, the probability that
//!   they share a class; ℓ_i = −Σ_p w_ip log softmax_ip / Σ_p w_ip;
//!   AvgNonZero over anchors, as `SupConLoss`. One-hot q gives SupCon.
//!
//! With λ ≡ 1 each equals its unmixed loss (tested).

use super::{check_temperature, check_views, l2_normalize, owned_rows, Ctx, Shard};
use crate::{NnError, Result};
use tch::{Kind, Tensor};

/// The mixing of a global batch: partner π(i) and weight λ_i of every global row.
#[derive(Debug, Clone)]
pub struct Mix {
    /// π(i), a permutation of 0..N.
    pub partner: Vec<i64>,
    /// λ_i ∈ [0, 1], the weight of row i's own sample.
    pub lambda: Vec<f64>,
}

impl Mix {
    fn check(&self, n: usize) -> Result<()> {
        let mut seen = vec![false; n];
        let ok = self.partner.len() == n
            && self.lambda.len() == n
            && self
                .partner
                .iter()
                .all(|&p| (0..n as i64).contains(&p) && !std::mem::replace(&mut seen[p as usize], true))
            && self.lambda.iter().all(|l| (0.0..=1.0).contains(l));
        if ok {
            Ok(())
        } else {
            Err(NnError::Param(format!("mix: need a permutation of 0..{n} and λ ∈ [0, 1] for each of the {n} rows")))
        }
    }
}

/// Soft cross-entropy of `logits` `[A, M]` against dense `targets` `[A, M]`, summed.
fn soft_ce(logits: &Tensor, targets: &Tensor) -> Tensor {
    let logp = logits.log_softmax(1, logits.kind());
    let zeros = logp.zeros_like();
    // Masked entries (−inf) carry zero target: keep 0·(−inf) out of the sum.
    let logp = logp.where_self(&targets.gt(0.0), &zeros);
    -(targets * logp).sum(logits.kind())
}

/// This rank's share of InfoNCE with i-Mix soft targets.
pub fn infonce_soft_share(
    q: &Tensor,
    k: &Tensor,
    mix: &Mix,
    temperature: f64,
    normalize: bool,
    shard: Shard,
) -> Result<Tensor> {
    check_temperature("InfoNCE (soft)", temperature)?;
    check_views("InfoNCE (soft)", &[q, k], shard)?;
    let n = shard.global();
    mix.check(n)?;
    let (q, k) = if normalize { (l2_normalize(q), l2_normalize(k)) } else { (q.shallow_clone(), k.shallow_clone()) };
    let (b, off) = (shard.local_batch, shard.offset());
    let logits = q.narrow(0, off as i64, b as i64).matmul(&k.tr()) / temperature;
    let mut t = vec![0f64; b * n];
    for r in 0..b {
        let i = off + r;
        t[r * n + i] += mix.lambda[i];
        t[r * n + mix.partner[i] as usize] += 1.0 - mix.lambda[i];
    }
    let targets = Tensor::from_slice(&t).view([b as i64, n as i64]).to_device(q.device()).to_kind(logits.kind());
    Ok(soft_ce(&logits, &targets) / n as f64)
}

/// This rank's share of NT-Xent with view A mixed.
pub fn ntxent_soft_share(za: &Tensor, zb: &Tensor, mix: &Mix, temperature: f64, shard: Shard) -> Result<Tensor> {
    check_temperature("NT-Xent (soft)", temperature)?;
    check_views("NT-Xent (soft)", &[za, zb], shard)?;
    let n = shard.global();
    mix.check(n)?;
    let z = l2_normalize(&Tensor::cat(&[za, zb], 0));
    let rows = owned_rows(shard, 2, z.device());
    let logits = z.index_select(0, &rows).matmul(&z.tr()) / temperature;
    let cols = Tensor::arange(2 * n as i64, (Kind::Int64, z.device())).unsqueeze(0);
    let logits = logits.masked_fill(&cols.eq_tensor(&rows.unsqueeze(1)), f64::NEG_INFINITY);
    let (b, off) = (shard.local_batch, shard.offset());
    let mut inverse = vec![0usize; n];
    for (j, &p) in mix.partner.iter().enumerate() {
        inverse[p as usize] = j;
    }
    let m = 2 * n;
    let mut t = vec![0f64; 2 * b * m];
    for r in 0..b {
        let i = off + r;
        // Anchor A_i: the keys of the two samples it is made of.
        t[r * m + n + i] += mix.lambda[i];
        t[r * m + n + mix.partner[i] as usize] += 1.0 - mix.lambda[i];
        // Anchor B_i: the mixed rows that contain sample i.
        let j = inverse[i];
        let row = (b + r) * m;
        t[row + i] += mix.lambda[i];
        t[row + j] += 1.0 - mix.lambda[j];
        let s: f64 = t[row..row + m].iter().sum();
        t[row..row + m].iter_mut().for_each(|v| *v /= s);
    }
    let targets = Tensor::from_slice(&t).view([2 * b as i64, m as i64]).to_device(z.device()).to_kind(logits.kind());
    Ok(soft_ce(&logits, &targets) / m as f64)
}

/// This rank's share of SupCon with soft (mixed) labels `probs` `[N, C]`.
pub fn supcon_soft_share(views: &[Tensor], probs: &Tensor, temperature: f64, ctx: &Ctx) -> Result<Tensor> {
    check_temperature("SupCon (soft)", temperature)?;
    check_views("SupCon (soft)", &views.iter().collect::<Vec<_>>(), ctx.shard)?;
    let n = ctx.shard.global() as i64;
    if probs.dim() != 2 || probs.size()[0] != n {
        return Err(NnError::Shape(format!(
            "SupCon (soft): label distributions must be [N={n}, C], got {:?}",
            probs.size()
        )));
    }
    let z = l2_normalize(&Tensor::cat(views, 0));
    let m = z.size()[0];
    let q = probs.to_device(z.device()).to_kind(z.kind()).repeat([views.len() as i64, 1]); // [V·N, C]
    let rows = owned_rows(ctx.shard, views.len(), z.device());
    let logits = z.index_select(0, &rows).matmul(&z.tr()) / temperature;
    let cols = Tensor::arange(m, (Kind::Int64, z.device())).unsqueeze(0);
    let self_mask = cols.eq_tensor(&rows.unsqueeze(1));
    let log_prob = logits.masked_fill(&self_mask, f64::NEG_INFINITY).log_softmax(1, logits.kind());
    let w = q.index_select(0, &rows).matmul(&q.tr()).masked_fill(&self_mask, 0.0); // ⟨q_i, q_p⟩
    let zeros = log_prob.zeros_like();
    let log_prob = log_prob.where_self(&self_mask.logical_not(), &zeros);
    let wsum = w.sum_dim_intlist([1i64].as_slice(), false, w.kind());
    let tiny = if logits.kind() == Kind::Double { f64::MIN_POSITIVE } else { f32::MIN_POSITIVE as f64 };
    let per_anchor = -((&w * log_prob).sum_dim_intlist([1i64].as_slice(), false, w.kind()) / (wsum + tiny));
    Ok(super::metric::avg_non_zero(&per_anchor, ctx))
}
