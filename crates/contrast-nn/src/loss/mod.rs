//! Loss heads on the gathered global batch.
//!
//! Each loss is a pure function that returns this rank's *share* L_r of the
//! global loss L = Σ_r L_r: the terms whose anchor rows rank r owns, divided by
//! the global count. The engine sums the shares' gradients across ranks.

pub mod clip;
pub mod ntxent;

pub use clip::clip_share;
pub use ntxent::ntxent_share;

use tch::Tensor;

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

/// `F.normalize(x, dim=1)`: x / max(‖x‖₂, 1e-12), safe at norm 0.
pub fn l2_normalize(x: &Tensor) -> Tensor {
    let norm = x.norm_scalaropt_dim(2, [1i64].as_slice(), true).clamp_min(1e-12);
    x / norm
}
