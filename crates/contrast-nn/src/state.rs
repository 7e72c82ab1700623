//! Checkpoint state as a registry of named items, each with its layout across ranks.
//!
//! - [`Layout::Replicated`]: identical on every rank (weights, optimiser state,
//!   momentum encoders, the queue pointer); saved as rank 0 holds it.
//! - [`Layout::Mean`]: differs per rank and is averaged on save (batch-norm
//!   running statistics, which each rank accumulates over its own rows).
//! - [`Layout::RowSharded`]: rank r holds rows `[r·B, (r+1)·B)` of every block of
//!   `block` global rows (MoCo's queue); gathered into the canonical layout on
//!   save and re-sliced on load, so any world size resumes it.
//! - [`Layout::ItemSharded`]: item i of the training set lives on rank i mod P,
//!   as row i div P of that rank's tensor (a memory bank, pseudo-labels);
//!   saved in item order and re-sliced on load, so any world size resumes it,
//!   including item counts P does not divide.
//!
//! Nothing is averaged unless its item says so: a queue shard must never be.

use contrast_comm::Collective;
use tch::Tensor;

/// How an item lies across ranks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// The same on every rank.
    Replicated,
    /// Averaged over ranks on save.
    Mean,
    /// Blocks of `block` global rows, each rank holding its local rows of every block.
    RowSharded {
        /// Global rows per block (one step's global batch N).
        block: usize,
    },
    /// One row per training item, item i on rank i mod P (rows [`item_rows`]).
    ItemSharded {
        /// Items of the whole set (rows of the canonical tensor).
        items: usize,
    },
}

/// Rows rank `rank` of `world_size` holds of an [`Layout::ItemSharded`] item of `items` rows.
pub fn item_rows(items: usize, rank: usize, world_size: usize) -> usize {
    (items + world_size - 1 - rank.min(world_size - 1)) / world_size
}

/// The items rank `rank` holds, in its row order: rank, rank + P, rank + 2P, …
pub fn item_indices(items: usize, rank: usize, world_size: usize) -> impl Iterator<Item = usize> {
    (rank..items).step_by(world_size.max(1))
}

/// One named piece of state (a tensor that shares storage with the live one).
pub struct StateItem {
    /// Name in the checkpoint file.
    pub name: String,
    /// The live tensor on this rank (a shard for [`Layout::RowSharded`]).
    pub tensor: Tensor,
    /// Its layout.
    pub layout: Layout,
}

impl StateItem {
    /// A replicated item.
    pub fn replicated(name: impl Into<String>, tensor: Tensor) -> Self {
        Self { name: name.into(), tensor, layout: Layout::Replicated }
    }

    /// Shape of the canonical (saved) tensor for `world_size` ranks.
    pub fn canonical_shape(&self, world_size: usize) -> Vec<i64> {
        let mut s = self.tensor.size();
        match self.layout {
            Layout::RowSharded { .. } => s[0] *= world_size as i64,
            Layout::ItemSharded { items } => s[0] = items as i64,
            Layout::Replicated | Layout::Mean => {}
        }
        s
    }

    /// The canonical tensor (on the CPU). Collective: every rank calls it for every item, in the same order.
    pub fn to_canonical<C: Collective>(&self, comm: &C) -> Tensor {
        let t = self.tensor.detach().to_device(tch::Device::Cpu);
        let p = comm.world_size();
        if p == 1 {
            return t.copy();
        }
        match self.layout {
            Layout::Replicated => t.copy(),
            Layout::Mean => {
                let mut host = crate::to_host::<f64>(&t);
                comm.all_reduce_sum(&mut host);
                host.iter_mut().for_each(|v| *v /= p as f64);
                let mean = Tensor::from_slice(&host).view(t.size().as_slice()).to_kind(t.kind());
                // Every rank continues with the mean, so evaluation sees one set of statistics.
                self.load(&mean, 0, 1);
                mean
            }
            Layout::RowSharded { block } => {
                let gathered = all_gather_tensor(comm, &t);
                let s = t.size();
                let (rows, b) = (s[0], (block / p) as i64);
                let rest: Vec<i64> = s[1..].to_vec();
                let mut shape = vec![p as i64, rows / b, b];
                shape.extend(&rest);
                let mut out = vec![rows * p as i64];
                out.extend(&rest);
                gathered.view(shape.as_slice()).transpose(0, 1).reshape(out.as_slice())
            }
            Layout::ItemSharded { items } => item_canonical(comm, &t, items),
        }
    }

    /// This rank's part of a canonical tensor (the inverse of [`StateItem::to_canonical`]).
    pub fn from_canonical(&self, canonical: &Tensor, rank: usize, world_size: usize) -> Tensor {
        match self.layout {
            Layout::Replicated | Layout::Mean => canonical.shallow_clone(),
            Layout::RowSharded { block } => row_shard(canonical, block, rank, world_size),
            Layout::ItemSharded { items } => {
                let end = (items as i64).max(rank as i64);
                canonical.slice(0, rank as i64, end, world_size as i64)
            }
        }
    }

    /// Overwrite the live tensor with this rank's part of `canonical`.
    pub fn load(&self, canonical: &Tensor, rank: usize, world_size: usize) {
        let part = self.from_canonical(canonical, rank, world_size);
        tch::no_grad(|| {
            self.tensor.shallow_clone().copy_(&part.to_device(self.tensor.device()).to_kind(self.tensor.kind()))
        });
    }
}

/// The canonical tensor of an [`Layout::ItemSharded`] item from each rank's
/// rows: every rank pads its rows to ⌈items/P⌉, the padded blocks are
/// all-gathered, and canonical row j·P + r is rank r's row j.
fn item_canonical<C: Collective>(comm: &C, local: &Tensor, items: usize) -> Tensor {
    let p = comm.world_size() as i64;
    let s = local.size();
    let per = (items as i64 + p - 1) / p;
    let rest: Vec<i64> = s[1..].to_vec();
    let mut pad_shape = vec![per - s[0]];
    pad_shape.extend(&rest);
    let padded =
        Tensor::cat(&[local.shallow_clone(), Tensor::zeros(pad_shape.as_slice(), (local.kind(), local.device()))], 0);
    let gathered = all_gather_tensor(comm, &padded);
    let mut shape = vec![p, per];
    shape.extend(&rest);
    let mut out = vec![p * per];
    out.extend(&rest);
    gathered.view(shape.as_slice()).transpose(0, 1).reshape(out.as_slice()).narrow(0, 0, items as i64)
}

/// Rank `rank`'s rows of a [`Layout::RowSharded`] tensor: rows `[r·B, (r+1)·B)`
/// of every block of `block` canonical rows (B = block / world_size), in block order.
pub fn row_shard(canonical: &Tensor, block: usize, rank: usize, world_size: usize) -> Tensor {
    let s = canonical.size();
    let b = (block / world_size) as i64;
    let rest: Vec<i64> = s[1..].to_vec();
    let mut shape = vec![s[0] / block as i64, world_size as i64, b];
    shape.extend(&rest);
    let mut out = vec![s[0] / world_size as i64];
    out.extend(&rest);
    canonical.view(shape.as_slice()).select(1, rank as i64).reshape(out.as_slice())
}

/// The canonical row indices of [`row_shard`], in the same order (for drawing a
/// shard's rows without building the canonical tensor).
pub fn row_shard_indices(rows: usize, block: usize, rank: usize, world_size: usize) -> impl Iterator<Item = usize> {
    let b = block / world_size;
    (0..rows / block).flat_map(move |blk| (0..b).map(move |j| blk * block + rank * b + j))
}

/// All-gather a tensor's elements in rank order (f64 and i64 exactly, other kinds through f32).
pub fn all_gather_tensor<C: Collective>(comm: &C, t: &Tensor) -> Tensor {
    crate::wire::on_host(t, &crate::wire::AllGather(comm))
}

/// Broadcast a tensor's elements from `root` (same shape on every rank).
pub fn broadcast_tensor<C: Collective>(comm: &C, t: &Tensor, root: usize) -> Tensor {
    crate::wire::on_host(t, &crate::wire::Broadcast(comm, root)).view(t.size().as_slice())
}

/// Whether a var-store name is a batch-norm running statistic (averaged over ranks on save).
pub fn is_running_stat(name: &str) -> bool {
    name.ends_with("running_mean") || name.ends_with("running_var")
}

/// Every variable of a var store as a state item, sorted by name: running
/// statistics are [`Layout::Mean`], the rest [`Layout::Replicated`].
pub fn var_store_items(vs: &tch::nn::VarStore) -> Vec<StateItem> {
    let mut v: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v.into_iter()
        .map(|(name, tensor)| {
            let layout = if is_running_stat(&name) { Layout::Mean } else { Layout::Replicated };
            StateItem { name, tensor, layout }
        })
        .collect()
}
