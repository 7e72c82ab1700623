//! k-means over features sharded by item across the ranks (DeepCluster's
//! clustering), in f64, with faiss's conventions (`faiss::Clustering`, which
//! the DeepCluster reference calls):
//!
//! - the k starting centroids are k distinct items drawn from (seed, epoch);
//! - each iteration assigns every row to its nearest centroid (squared L2
//!   distance; a tie goes to the lower index), then sets each centroid to the
//!   mean of its rows from sums and counts **summed over the ranks** in f64;
//! - an empty cluster is re-seeded by splitting a non-empty one: cluster j is
//!   picked with probability (count_j − 1)/(n − k) by a generator keyed on
//!   (seed, epoch, iteration), its centroid copied with a symmetric
//!   perturbation of ±1/1024 on alternate dimensions, and its count halved;
//! - after the last iteration, every row is assigned to the final centroids.
//!
//! Only the `[k, D]` sums and the `[k]` counts cross the ranks, never a row;
//! every rank computes the same centroids from the same sums, so P ranks give
//! the centroids and assignments of one rank holding every row.

use crate::loss::GlobalSum;
use crate::{NnError, Result};
use rand_chacha::rand_core::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tch::{Kind, Tensor};

/// Stream tags of the start and of the splits.
const START: u64 = 0x4B6D_6561_6E73_3031;
const SPLIT: u64 = 0x4B6D_6561_6E73_3032;
/// faiss's perturbation of a split centroid.
const SPLIT_EPS: f64 = 1.0 / 1024.0;

/// What the clustering computed.
pub struct Clusters {
    /// Centroids `[k, D]` f64 (equal on every rank).
    pub centroids: Tensor,
    /// The cluster of each of this rank's rows `[rows]` i64.
    pub labels: Tensor,
    /// Rows per cluster over all ranks, for the final assignment.
    pub counts: Vec<f64>,
    /// Mean squared distance of a row to its centroid, over all ranks.
    pub inertia: f64,
    /// Empty clusters re-seeded over the iterations.
    pub splits: usize,
}

/// Where the rows live: rank r holds items r, r + P, … (`Layout::ItemSharded`).
#[derive(Debug, Clone, Copy)]
pub struct Sharding {
    /// Items of the whole set n.
    pub items: usize,
    /// This rank.
    pub rank: usize,
    /// Ranks P.
    pub world_size: usize,
}

/// k distinct items drawn from `key`: a partial Fisher–Yates shuffle of 0..n.
pub fn starting_items(key: u64, n: usize, k: usize) -> Vec<usize> {
    let mut rng = ChaCha8Rng::seed_from_u64(contrast_data::rng::key(&[key, START]));
    let mut swapped: std::collections::HashMap<usize, usize> = Default::default();
    (0..k)
        .map(|i| {
            let j = i + (rng.next_u64() % (n - i) as u64) as usize;
            let (at_i, at_j) = (*swapped.get(&i).unwrap_or(&i), *swapped.get(&j).unwrap_or(&j));
            swapped.insert(j, at_i);
            at_j
        })
        .collect()
}

/// Cluster this rank's rows `local` (`[rows, D]`, rows of the items `shard`
/// gives this rank) into `k` clusters with `iters` iterations; `key` seeds
/// the start and the splits (the caller folds in the seed and the epoch).
pub fn kmeans(
    local: &Tensor,
    shard: Sharding,
    k: usize,
    iters: usize,
    key: u64,
    comm: &dyn GlobalSum,
) -> Result<Clusters> {
    let n = shard.items;
    let x = local.detach().to_kind(Kind::Double);
    let d = x.size()[1];
    let want = crate::state::item_rows(n, shard.rank, shard.world_size) as i64;
    if x.size()[0] != want {
        return Err(NnError::Shape(format!(
            "k-means: {:?} rows on rank {} for {n} items (want {want})",
            x.size(),
            shard.rank
        )));
    }
    if k < 2 || k > n {
        return Err(NnError::Param(format!("k-means: {k} clusters for {n} items (needs 2 ≤ k ≤ items)")));
    }
    let mut centroids = start(&x, shard, k, key, comm);
    let mut splits = 0;
    for iter in 0..iters {
        let (labels, _) = assign(&x, &centroids);
        let (sums, mut counts) = sums_and_counts(&x, &labels, k, comm);
        let mut c = sums;
        for (j, row) in c.chunks_mut(d as usize).enumerate() {
            if counts[j] > 0.0 {
                row.iter_mut().for_each(|v| *v /= counts[j]);
            }
        }
        splits += split_empty(&mut c, &mut counts, d as usize, n, contrast_data::rng::key(&[key, SPLIT, iter as u64]));
        centroids = Tensor::from_slice(&c).view([k as i64, d]).to_device(x.device());
    }
    let (labels, nearest) = assign(&x, &centroids);
    let (_, counts) = sums_and_counts(&x, &labels, k, comm);
    let mut inertia = [nearest.sum(Kind::Double).double_value(&[]) + x.square().sum(Kind::Double).double_value(&[])];
    comm.sum(&mut inertia);
    Ok(Clusters { centroids, labels, counts, inertia: inertia[0] / n as f64, splits })
}

/// The starting centroids: the rows of the drawn items, summed over the ranks
/// (each row comes from the one rank that holds it, so the sum is exact).
fn start(x: &Tensor, shard: Sharding, k: usize, key: u64, comm: &dyn GlobalSum) -> Tensor {
    let d = x.size()[1] as usize;
    let mut c = vec![0.0; k * d];
    let p = shard.world_size;
    for (j, item) in starting_items(key, shard.items, k).into_iter().enumerate() {
        if item % p == shard.rank {
            let row: Vec<f64> = crate::to_host(&x.get((item / p) as i64));
            c[j * d..(j + 1) * d].copy_from_slice(&row);
        }
    }
    comm.sum(&mut c);
    Tensor::from_slice(&c).view([k as i64, d as i64]).to_device(x.device())
}

/// The nearest centroid of each row and ‖c‖² − 2 x·c there (the squared
/// distance less ‖x‖²).
fn assign(x: &Tensor, c: &Tensor) -> (Tensor, Tensor) {
    let score =
        c.square().sum_dim_intlist([1i64].as_slice(), false, Kind::Double).unsqueeze(0) - x.matmul(&c.tr()) * 2.0;
    let (nearest, labels) = score.min_dim(1, false);
    (labels, nearest)
}

/// The per-cluster sums `[k·D]` and counts `[k]` of every rank's rows.
fn sums_and_counts(x: &Tensor, labels: &Tensor, k: usize, comm: &dyn GlobalSum) -> (Vec<f64>, Vec<f64>) {
    let d = x.size()[1];
    let sums = Tensor::zeros([k as i64, d], (Kind::Double, x.device())).index_add(0, labels, x);
    let mut v: Vec<f64> = crate::to_host(&sums.view([-1]));
    let counts = labels.bincount::<Tensor>(None, k as i64).to_kind(Kind::Double);
    v.extend(crate::to_host::<f64>(&counts));
    comm.sum(&mut v);
    let counts = v.split_off(k * d as usize);
    (v, counts)
}

/// faiss's re-seeding of empty clusters (see the module doc); the number split.
fn split_empty(c: &mut [f64], counts: &mut [f64], d: usize, n: usize, key: u64) -> usize {
    let k = counts.len();
    let mut rng = ChaCha8Rng::seed_from_u64(key);
    let mut splits = 0;
    for ci in 0..k {
        if counts[ci] > 0.0 {
            continue;
        }
        let mut cj = 0;
        loop {
            let p = (counts[cj] - 1.0) / (n - k) as f64;
            let r = (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
            if r < p {
                break;
            }
            cj = (cj + 1) % k;
        }
        for j in 0..d {
            let sign = if j % 2 == 0 { 1.0 } else { -1.0 };
            c[ci * d + j] = c[cj * d + j] * (1.0 + sign * SPLIT_EPS);
            c[cj * d + j] *= 1.0 - sign * SPLIT_EPS;
        }
        counts[ci] = (counts[cj] / 2.0).floor();
        counts[cj] -= counts[ci];
        splits += 1;
    }
    splits
}
