//! SwAV's swapped prediction with Sinkhorn-Knopp codes (Caron et al. 2020).
//!
//! # Conventions (the SwAV reference `main_swav.py`)
//! - Scores are cosines between L2-normalised embeddings and the prototypes
//!   (`[K, d]`, L2-normalised inside [`swav_share`]). The `swav` method keeps
//!   its prototypes unit-norm itself (renormalised after each step, as the
//!   reference does) and calls [`swapped_prediction`] on its own scores, so the
//!   prototypes' gradient is the reference's (no normalisation in the graph).
//! - Codes q = Sinkhorn(exp(scores / ε)) over the global batch, `iters`
//!   iterations: the total and the per-prototype sums are all-reduced, the
//!   per-sample sums stay local (`distributed_sinkhorn`); codes carry no gradient.
//! - For each view a in `assign`, every other view v predicts a's code:
//!   −mean_i Σ_k q_ik log softmax(scores_v / t)_ik; averaged over the V − 1
//!   predicting views and over `assign`.
//!
//! # Shapes
//! `views`: V tensors `[N, d]`; `prototypes`: `[K, d]`; returns this rank's share
//! (its B rows of every view / N).

use super::{check_temperature, check_views, l2_normalize, Ctx};
use crate::{NnError, Result};
use tch::{Kind, Tensor};

/// Sinkhorn-Knopp on this rank's rows `[R, K]` of scores, out of `columns`
/// rows over every rank (the global batch, plus any queue rows that join it):
/// the total and the per-prototype sums go through `ctx`, the per-sample sums
/// stay local (`distributed_sinkhorn`). Computed in f64; returns `[R, K]`
/// codes without gradient, rows summing to 1.
pub fn sinkhorn(scores: &Tensor, epsilon: f64, iters: usize, columns: usize, ctx: &Ctx) -> Result<Tensor> {
    if !(epsilon >= 2e-3) {
        return Err(NnError::Param(format!(
            "Sinkhorn epsilon must be ≥ 0.002 (exp(1/ε) must fit in f64), got {epsilon}"
        )));
    }
    let kind = scores.kind();
    let q = (scores.detach().to_kind(Kind::Double) / epsilon).exp().tr(); // [K, R]
    let k = q.size()[0];
    let b_global = columns as f64;
    let total = ctx.global(q.sum(Kind::Double).double_value(&[]));
    let mut q = q / total;
    for _ in 0..iters {
        let mut rows = crate::to_host::<f64>(&q.sum_dim_intlist([1i64].as_slice(), false, Kind::Double));
        ctx.reduce.sum(&mut rows);
        let rows = Tensor::from_slice(&rows).to_device(q.device()).unsqueeze(1);
        q = q / rows / k as f64;
        q = &q / q.sum_dim_intlist([0i64].as_slice(), true, Kind::Double) / b_global;
    }
    Ok((q * b_global).tr().to_kind(kind))
}

/// This rank's share of the SwAV loss.
pub fn swav_share(
    views: &[Tensor],
    prototypes: &Tensor,
    temperature: f64,
    epsilon: f64,
    iters: usize,
    assign: &[usize],
    ctx: &Ctx,
) -> Result<Tensor> {
    check_temperature("SwAV", temperature)?;
    if views.len() < 2 || assign.is_empty() || assign.iter().any(|&a| a >= views.len()) {
        return Err(NnError::Param(format!(
            "SwAV needs ≥ 2 views and assignment views among them; got {} views, assign {assign:?}",
            views.len()
        )));
    }
    check_views("SwAV", &views.iter().collect::<Vec<_>>(), ctx.shard)?;
    let d = views[0].size()[1];
    if prototypes.dim() != 2 || prototypes.size()[1] != d {
        return Err(NnError::Shape(format!("SwAV prototypes must be [K, d={d}], got {:?}", prototypes.size())));
    }
    let (b, off) = (ctx.shard.local_batch as i64, ctx.shard.offset() as i64);
    let protos = l2_normalize(prototypes);
    let scores: Vec<Tensor> = views.iter().map(|v| l2_normalize(&v.narrow(0, off, b)).matmul(&protos.tr())).collect();
    let codes = Codes { epsilon, iters, queue: &[], columns: ctx.shard.global() };
    swapped_prediction(&scores, assign, temperature, &codes, ctx)
}

/// How the codes are computed: Sinkhorn's ε and iterations, and the queue
/// rows that join each assignment view's batch (`queue[j]` for `assign[j]`,
/// this rank's rows `[R, K]` of scores; empty: no queue) out of `columns` rows in all.
pub struct Codes<'a> {
    /// ε of exp(scores / ε).
    pub epsilon: f64,
    /// Sinkhorn-Knopp iterations.
    pub iters: usize,
    /// Queue scores per assignment view (or none).
    pub queue: &'a [Tensor],
    /// Rows of one Sinkhorn problem over every rank: N, or N plus the queue's rows.
    pub columns: usize,
}

/// The swapped prediction on this rank's scores `[B, K]` of each view: for
/// each view a in `assign`, every other view predicts a's codes (the batch
/// rows' codes, the queue's dropped); −Σ_k q_ik log softmax(s_v / t)_ik summed
/// over this rank's rows / N, averaged over the V − 1 predicting views and over `assign`.
pub fn swapped_prediction(
    scores: &[Tensor],
    assign: &[usize],
    temperature: f64,
    codes: &Codes,
    ctx: &Ctx,
) -> Result<Tensor> {
    let n = ctx.shard.global() as f64;
    let (kind, device) = (scores[0].kind(), scores[0].device());
    let mut loss = Tensor::zeros([], (kind, device));
    for (j, &a) in assign.iter().enumerate() {
        let q = match codes.queue.get(j) {
            Some(queue) => {
                let rows = queue.size()[0];
                let all = Tensor::cat(&[queue.to_kind(kind), scores[a].detach()], 0);
                sinkhorn(&all, codes.epsilon, codes.iters, codes.columns, ctx)?.narrow(0, rows, scores[a].size()[0])
            }
            None => sinkhorn(&scores[a], codes.epsilon, codes.iters, codes.columns, ctx)?,
        };
        let mut sub = Tensor::zeros([], (kind, device));
        for s in scores.iter().enumerate().filter(|(v, _)| *v != a).map(|(_, s)| s) {
            let logp = (s / temperature).log_softmax(1, s.kind());
            sub = sub - (&q * logp).sum(s.kind()) / n;
        }
        loss = loss + sub / (scores.len() - 1) as f64;
    }
    Ok(loss / assign.len() as f64)
}
