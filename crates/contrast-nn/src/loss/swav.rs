//! SwAV's swapped prediction with Sinkhorn-Knopp codes (Caron et al. 2020).
//!
//! # Conventions (the SwAV reference `main_swav.py`)
//! - Scores are cosines between L2-normalised embeddings and the prototypes
//!   (`[K, d]`, L2-normalised inside the loss; no method trains prototypes yet, and
//!   SwAV's renormalisation after each step belongs to the method that will).
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

/// Sinkhorn-Knopp on this rank's rows `[B, K]` of scores; the batch is the
/// global one (sums over samples and the total go through `ctx`). Computed in
/// f64; returns `[B, K]` codes without gradient, rows summing to 1.
pub fn sinkhorn(scores: &Tensor, epsilon: f64, iters: usize, ctx: &Ctx) -> Result<Tensor> {
    if !(epsilon >= 2e-3) {
        return Err(NnError::Param(format!(
            "Sinkhorn epsilon must be ≥ 0.002 (exp(1/ε) must fit in f64), got {epsilon}"
        )));
    }
    let kind = scores.kind();
    let q = (scores.detach().to_kind(Kind::Double) / epsilon).exp().tr(); // [K, B]
    let k = q.size()[0];
    let b_global = ctx.shard.global() as f64;
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
    let (b, off, n) = (ctx.shard.local_batch as i64, ctx.shard.offset() as i64, ctx.shard.global() as f64);
    let protos = l2_normalize(prototypes);
    let scores: Vec<Tensor> = views.iter().map(|v| l2_normalize(&v.narrow(0, off, b)).matmul(&protos.tr())).collect();
    let mut loss = Tensor::zeros([], (views[0].kind(), views[0].device()));
    for &a in assign {
        let q = sinkhorn(&scores[a], epsilon, iters, ctx)?;
        let mut sub = Tensor::zeros([], (views[0].kind(), views[0].device()));
        for (v, s) in scores.iter().enumerate().filter(|(v, _)| *v != a) {
            let _ = v;
            let logp = (s / temperature).log_softmax(1, s.kind());
            sub = sub - (&q * logp).sum(s.kind()) / n;
        }
        loss = loss + sub / (views.len() - 1) as f64;
    }
    Ok(loss / assign.len() as f64)
}
