//! MoCo's queue of negative keys, sharded over the ranks (docs/design.md, "The
//! sharded momentum queue").
//!
//! The queue holds K keys in K/N *blocks*, one per step, each block one step's
//! global batch of N keys in global row order; the pointer names the oldest
//! block, the one the next enqueue overwrites. Rank r of P keeps rows
//! `[r·B, (r+1)·B)` of every block — K/P keys — and enqueues only its own B
//! keys. That layout is the *canonical* one of checkpoints (saved through
//! `state::Layout::RowSharded`, which gathers and re-slices it): any world size
//! re-slices the same blocks and evicts them in the same order.
//!
//! The loss over the queue, [`ShardedQueue::infonce_share`], needs no gather of
//! keys: every rank scores all N gathered queries against its shard, and the
//! log-sum-exp over all shards comes from an all-reduce of `[N]` row maxima
//! and one of `[N]` shifted exp-sums.

use crate::loss::{l2_normalize, Ctx};
use crate::{NnError, Result};
use rand_chacha::rand_core::SeedableRng;
use rand_distr::{Distribution, StandardNormal};
use tch::{Device, Kind, Tensor};

/// This rank's shard of a queue of `K` keys of dimension `d`.
pub struct ShardedQueue {
    /// `[K/P, d]`: block b's rows of this rank at `[b·B, (b+1)·B)`.
    keys: Tensor,
    /// Blocks K/N.
    blocks: usize,
    /// Rows per rank and block (local batch B).
    local_batch: usize,
    /// Oldest block (the next to be overwritten).
    ptr: usize,
}

/// Row `i` of a random unit-vector table tagged `stream`: a standard normal
/// vector of dimension `d` from its own stream of (seed, stream, i),
/// L2-normalised (so any layout draws the same rows).
pub(crate) fn unit_row(seed: u64, stream: u64, i: usize, d: usize) -> Vec<f64> {
    let key = contrast_data::rng::key(&[seed, stream, i as u64]);
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(key);
    let v: Vec<f64> = (0..d).map(|_| StandardNormal.sample(&mut rng)).collect();
    let norm = v.iter().map(|x| x * x).sum::<f64>().sqrt().max(1e-12);
    v.into_iter().map(|x| x / norm).collect()
}

impl ShardedQueue {
    /// Row `i` of the canonical starting queue: a standard normal vector of
    /// dimension `d` from its own stream of (seed, i), L2-normalised.
    fn initial_row(seed: u64, i: usize, d: usize) -> Vec<f64> {
        unit_row(seed, 0x4D6F_436F_5175_6575, i, d)
    }

    /// The canonical starting queue of the MoCo reference: K random unit
    /// vectors, each row from (seed, row) alone, so every world size starts
    /// from the same negatives. `[K, d]` f64.
    pub fn initial_canonical(k: usize, d: usize, seed: u64) -> Tensor {
        let v: Vec<f64> = (0..k).flat_map(|i| Self::initial_row(seed, i, d)).collect();
        Tensor::from_slice(&v).view([k as i64, d as i64])
    }

    /// This rank's shard of the canonical starting queue, drawing only its own
    /// K/P rows (memory O(K/P·d) on every rank, also at the start).
    pub fn initial(k: usize, d: usize, seed: u64, global_batch: usize, rank: usize, world_size: usize) -> Result<Self> {
        let (n, p) = (global_batch, world_size);
        if n == 0 || k % n != 0 || n % p != 0 {
            return Err(NnError::Shape(format!(
                "queue of {k} keys: not a multiple of the global batch {n}, or {n} not divisible by {p} ranks"
            )));
        }
        let (blocks, b) = (k / n, n / p);
        let rows = crate::state::row_shard_indices(k, n, rank, p);
        let v: Vec<f64> = rows.flat_map(|i| Self::initial_row(seed, i, d)).collect();
        let keys = Tensor::from_slice(&v).view([(blocks * b) as i64, d as i64]);
        Ok(Self { keys, blocks, local_batch: b, ptr: 0 })
    }

    /// This rank's shard of a canonical queue `[K, d]` of blocks of `global_batch`
    /// keys; `ptr` names the oldest block.
    pub fn from_canonical(
        canonical: &Tensor,
        ptr: usize,
        global_batch: usize,
        rank: usize,
        world_size: usize,
    ) -> Result<Self> {
        let (k, d) = canonical.size2().map_err(|e| NnError::Shape(format!("queue: {e}")))?;
        let (k, n) = (k as usize, global_batch);
        if n == 0 || k % n != 0 || n % world_size != 0 {
            return Err(NnError::Shape(format!(
                "queue of {k} keys: not a multiple of the global batch {n}, or {n} not divisible by {world_size} ranks"
            )));
        }
        let (blocks, b) = (k / n, n / world_size);
        if ptr >= blocks {
            return Err(NnError::Param(format!("queue pointer {ptr} is not below the {blocks} blocks")));
        }
        let keys = crate::state::row_shard(canonical, n, rank, world_size).detach().copy();
        debug_assert_eq!(keys.size(), [(blocks * b) as i64, d]);
        Ok(Self { keys, blocks, local_batch: b, ptr })
    }

    /// Convert to `kind` on `device`.
    pub fn to(mut self, kind: Kind, device: Device) -> Self {
        self.keys = self.keys.to_device(device).to_kind(kind);
        self
    }

    /// This rank's keys `[K/P, d]`.
    pub fn shard(&self) -> &Tensor {
        &self.keys
    }

    /// Key dimension d.
    pub fn dim(&self) -> usize {
        self.keys.size()[1] as usize
    }

    /// The oldest block.
    pub fn ptr(&self) -> usize {
        self.ptr
    }

    /// Blocks K/N.
    pub fn blocks(&self) -> usize {
        self.blocks
    }

    /// Overwrite the oldest block's rows of this rank with this step's keys `[B, d]`.
    pub fn enqueue(&mut self, keys: &Tensor) -> Result<()> {
        let b = self.local_batch as i64;
        if keys.size() != [b, self.dim() as i64] {
            return Err(NnError::Shape(format!(
                "enqueue: keys must be [B={b}, d={}], got {:?}",
                self.dim(),
                keys.size()
            )));
        }
        tch::no_grad(|| {
            self.keys.narrow(0, self.ptr as i64 * b, b).copy_(&keys.detach().to_kind(self.keys.kind()));
        });
        self.ptr = (self.ptr + 1) % self.blocks;
        Ok(())
    }

    /// This rank's share of MoCo's InfoNCE over the gathered queries `q` `[N, d]`
    /// (L2-normalised here), this rank's positive keys `k` `[B, d]` (unit
    /// vectors, no gradient) and the whole queue, at temperature `t`.
    ///
    /// With s_ij = q_i·n_j / t over negatives j of every shard and s_i⁺ = q_i·k_i / t,
    /// lse_i = log(exp s_i⁺ + Σ_j exp s_ij) comes from all-reduces of the row
    /// maxima and shifted sums, and (sg = stop-gradient, e_ij = exp(s_ij − sg lse_i))
    ///
    /// L_r = (1/N) [ Σ_{i owned} (sg lse_i − s_i⁺) + Σ_i Σ_{j ∈ shard r ∪ pos(i ∈ r)} (e_ij − sg e_ij) ].
    ///
    /// The second sum is zero in value and carries the softmax gradient, so the
    /// shares add up to the replicated-queue loss and, summed over ranks, to its
    /// gradient with respect to q.
    pub fn infonce_share(&self, q: &Tensor, k: &Tensor, t: f64, ctx: &Ctx) -> Result<Tensor> {
        self.infonce_share_with(q, k, t, None, ctx)
    }

    /// [`ShardedQueue::infonce_share`] with further negatives of this rank's own
    /// queries: `extra` `[B, E]` are their logits (already divided by t, with
    /// the gradient they carry; MoCHi's synthetic negatives). They join each
    /// own row's log-sum-exp as the positive does.
    pub fn infonce_share_with(
        &self,
        q: &Tensor,
        k: &Tensor,
        t: f64,
        extra: Option<&Tensor>,
        ctx: &Ctx,
    ) -> Result<Tensor> {
        crate::loss::check_temperature("MoCo InfoNCE", t)?;
        let shard = ctx.shard;
        let (n, b, off) = (shard.global() as i64, shard.local_batch as i64, shard.offset() as i64);
        let d = self.dim() as i64;
        if q.size() != [n, d] || k.size() != [b, d] {
            return Err(NnError::Shape(format!(
                "MoCo InfoNCE: queries must be [N={n}, d={d}] and keys [B={b}, d], got {:?} and {:?}",
                q.size(),
                k.size()
            )));
        }
        let qn = l2_normalize(q);
        let kind = qn.kind();
        let keys = self.keys.to_kind(kind);
        let pos = (qn.narrow(0, off, b) * k.detach().to_kind(kind)).sum_dim_intlist([1i64].as_slice(), false, kind) / t;
        let neg = qn.matmul(&keys.tr()) / t; // [N, K/P]
        if let Some(e) = extra.filter(|e| e.size()[0] != b) {
            return Err(NnError::Shape(format!("MoCo InfoNCE: extra logits must be [B={b}, E], got {:?}", e.size())));
        }
        // The positive and any extra negatives of the own rows: the owner's part of each row's sum.
        let own = match extra {
            Some(e) => Tensor::cat(&[pos.unsqueeze(1), e.to_kind(kind)], 1),
            None => pos.unsqueeze(1),
        };
        let lse = global_lse(&neg, &own, off, ctx).to_kind(kind); // [N], no gradient
        let own_lse = lse.narrow(0, off, b);
        let value = (&own_lse - &pos).sum(kind);
        let e_neg = (&neg - lse.unsqueeze(1)).exp();
        let e_own = (&own - own_lse.unsqueeze(1)).exp();
        let carrier = (&e_neg - e_neg.detach()).sum(kind) + (&e_own - e_own.detach()).sum(kind);
        Ok((value + carrier) / n as f64)
    }
}

/// lse_i over the owner's logits of row i `[B, E]` (the positive, and any extra
/// negatives) and every shard's negatives, in f64.
fn global_lse(neg: &Tensor, own: &Tensor, off: i64, ctx: &Ctx) -> Tensor {
    let (neg, own) = (neg.detach().to_kind(Kind::Double), own.detach().to_kind(Kind::Double));
    let b = own.size()[0];
    let row_max = neg.amax([1i64].as_slice(), false);
    let own_max = row_max.narrow(0, off, b).maximum(&own.amax([1i64].as_slice(), false));
    row_max.narrow(0, off, b).copy_(&own_max);
    let mut m = crate::to_host::<f64>(&row_max);
    ctx.reduce.max(&mut m);
    let m = Tensor::from_slice(&m).to_device(neg.device());
    let sums = (&neg - m.unsqueeze(1)).exp().sum_dim_intlist([1i64].as_slice(), false, Kind::Double);
    let shifted =
        (&own - m.narrow(0, off, b).unsqueeze(1)).exp().sum_dim_intlist([1i64].as_slice(), false, Kind::Double);
    let own = sums.narrow(0, off, b) + shifted;
    sums.narrow(0, off, b).copy_(&own);
    let mut s = crate::to_host::<f64>(&sums);
    ctx.reduce.sum(&mut s);
    m + Tensor::from_slice(&s).to_device(neg.device()).log()
}
