//! Loss heads on the gathered global batch.
//!
//! Each loss is a pure function that returns this rank's *share* L_r of the
//! global loss L = Σ_r L_r: the terms whose anchor rows rank r owns, divided by
//! the global count. The engine sums the shares' gradients across ranks.

pub mod barlow;
pub mod byol;
pub mod clip;
pub mod contrastive;
pub mod dcl;
pub mod debiased;
pub mod infonce;
pub mod lifted;
pub mod metric;
pub mod nce;
pub mod npair;
pub mod ntxent;
pub mod siglip;
pub mod snn;
pub mod soft;
pub mod stream;
pub mod supcon;
pub mod swav;
pub mod triplet;

pub use barlow::{barlow_twins_share, Standardise};
pub use byol::{negative_cosine_share, normalized_mse_share};
pub use clip::{clip_dense_share, clip_share, clip_share_blocked};
pub use contrastive::contrastive_share;
pub use dcl::{dcl_dense_share, dcl_share, dcl_share_blocked};
pub use debiased::{debiased_dense_share, debiased_share, debiased_share_blocked};
pub use infonce::{cpc_share, infonce_share};
pub use lifted::{generalized_lifted_share, lifted_hard_share, lifted_smooth_share};
pub use nce::{nce_dense_share, nce_share, nce_share_blocked};
pub use npair::{npair_share, NPairForm};
pub use ntxent::{ntxent_dense_share, ntxent_multi_share, ntxent_share, ntxent_share_blocked};
pub use siglip::{siglip_dense_share, siglip_share, siglip_share_blocked};
pub use snn::snn_share;
pub use soft::{infonce_soft_share, ntxent_soft_share, supcon_soft_share, Mix};
pub use supcon::{multi_positive_blocked, multi_positive_dense, supcon_share, Reduce};
pub use swav::{sinkhorn, swapped_prediction, swav_share, Codes};
pub use triplet::{triplet_share, Mining};

use crate::{NnError, Result};
use tch::{Kind, Tensor};

/// Which rows of the gathered batch this rank owns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shard {
    /// This rank r.
    pub rank: usize,
    /// Ranks P.
    pub world_size: usize,
    /// Rows per rank B.
    pub local_batch: usize,
}

impl Shard {
    /// The whole batch on one rank.
    pub fn solo(n: usize) -> Self {
        Self { rank: 0, world_size: 1, local_batch: n }
    }
    /// Global batch N = P·B.
    pub fn global(&self) -> usize {
        self.world_size * self.local_batch
    }
    /// First global row of this rank.
    pub fn offset(&self) -> usize {
        self.rank * self.local_batch
    }
}

/// The communicator as losses and methods see it: all-reduces of small host
/// vectors (how a loss counts over the *global* batch: averages over non-zero
/// terms, anchor counts, Sinkhorn sums, MoCo's log-sum-exp) and row gathers.
/// It is object safe (the communicator's own trait is generic), so losses and
/// methods take it as `&dyn GlobalSum`.
pub trait GlobalSum {
    /// Sum `v` element-wise over all ranks, in place.
    fn sum(&self, v: &mut [f64]);
    /// Element-wise maximum over all ranks, in place.
    fn max(&self, v: &mut [f64]);
    /// Every rank's `[B, d]` rows, concatenated in rank order (no gradient).
    fn gather_rows(&self, local: &tch::Tensor) -> tch::Tensor;
}

impl<C: contrast_comm::Collective> GlobalSum for C {
    fn sum(&self, v: &mut [f64]) {
        self.all_reduce_sum(v)
    }
    fn max(&self, v: &mut [f64]) {
        self.all_reduce_max(v)
    }
    fn gather_rows(&self, local: &tch::Tensor) -> tch::Tensor {
        crate::wire::gather_rows(self, local)
    }
}

/// What a loss head sees besides the gathered batch.
#[derive(Clone, Copy)]
pub struct Ctx<'a> {
    /// The rows this rank owns.
    pub shard: Shard,
    /// Global sums (the communicator).
    pub reduce: &'a dyn GlobalSum,
}

impl<'a> Ctx<'a> {
    /// A context for the whole batch on one process.
    pub fn solo(n: usize) -> Ctx<'static> {
        Ctx { shard: Shard::solo(n), reduce: &contrast_comm::Solo }
    }

    /// Sum one scalar over ranks.
    pub fn global(&self, x: f64) -> f64 {
        let mut v = [x];
        self.reduce.sum(&mut v);
        v[0]
    }
}

/// `F.normalize(x, dim=1)`: x / max(‖x‖₂, 1e-12), safe at norm 0.
pub fn l2_normalize(x: &Tensor) -> Tensor {
    let norm = x.norm_scalaropt_dim(2, [1i64].as_slice(), true).clamp_min(1e-12);
    x / norm
}

/// Row indices this rank owns in `views` stacked view-major (`[V·N, d]`):
/// rows `v·N + [r·B, (r+1)·B)` for each view v, in that order.
pub fn owned_rows(shard: Shard, views: usize, device: tch::Device) -> Tensor {
    let (n, b, off) = (shard.global() as i64, shard.local_batch as i64, shard.offset() as i64);
    let local = Tensor::arange_start(off, off + b, (Kind::Int64, device));
    Tensor::cat(&(0..views as i64).map(|v| &local + v * n).collect::<Vec<_>>(), 0)
}

/// Check that every view is `[N, d]` with the same d; `what` names the loss.
pub fn check_views(what: &str, views: &[&Tensor], shard: Shard) -> Result<()> {
    let n = shard.global() as i64;
    let first = views[0].size();
    for v in views {
        if v.dim() != 2 || v.size()[0] != n || v.size() != first {
            let shapes: Vec<Vec<i64>> = views.iter().map(|v| v.size()).collect();
            return Err(NnError::Shape(format!("{what}: every input must be [N={n}, d]; got {shapes:?}")));
        }
    }
    Ok(())
}

/// Reject a temperature that is not a positive finite number.
pub fn check_temperature(what: &str, t: f64) -> Result<()> {
    if t > 0.0 && t.is_finite() {
        Ok(())
    } else {
        Err(NnError::Param(format!("{what}: temperature must be > 0, got {t}")))
    }
}
