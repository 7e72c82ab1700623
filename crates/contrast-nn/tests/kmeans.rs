//! k-means over item-sharded rows (DeepCluster's clustering): P ranks give the
//! centroids, counts and assignments of one rank holding every row, which
//! equal a plain Lloyd's algorithm written out over the whole set; empty
//! clusters are split as faiss splits them, on every layout alike.

use crate::common::*;
use contrast_comm::{Collective, Threads};
use contrast_nn::kmeans::{kmeans, starting_items, Sharding};
use tch::Tensor;

const D: usize = 5;

/// What one layout found, in item order: centroids, counts, labels, inertia, splits.
struct Found {
    centroids: Vec<f64>,
    counts: Vec<f64>,
    labels: Vec<i64>,
    inertia: f64,
    splits: usize,
}

/// k-means of the rows `x` (`n × D`, item order) on `p` threaded ranks.
fn cluster(x: &[f64], p: usize, k: usize, iters: usize, key: u64) -> Found {
    let n = x.len() / D;
    let mut per_rank = Threads::run(p, |c| {
        let (r, p) = (c.rank(), c.world_size());
        let rows: Vec<f64> = (r..n).step_by(p).flat_map(|i| x[i * D..(i + 1) * D].to_vec()).collect();
        let local = Tensor::from_slice(&rows).view([-1, D as i64]);
        let shard = Sharding { items: n, rank: r, world_size: p };
        let f = kmeans(&local, shard, k, iters, key, &c).unwrap();
        let labels: Vec<i64> = contrast_nn::to_host(&f.labels);
        (contrast_nn::to_host::<f64>(&f.centroids), f.counts, labels, f.inertia, f.splits)
    });
    let mut labels = vec![-1; n];
    for (r, part) in per_rank.iter().enumerate() {
        for (j, &l) in part.2.iter().enumerate() {
            labels[r + j * p] = l;
        }
    }
    let (centroids, counts, _, inertia, splits) = per_rank.swap_remove(0);
    Found { centroids, counts, labels, inertia, splits }
}

/// Lloyd's algorithm written out over every row (no empty cluster may arise).
fn lloyd(x: &[f64], k: usize, iters: usize, key: u64) -> (Vec<f64>, Vec<i64>) {
    let n = x.len() / D;
    let mut c: Vec<f64> = starting_items(key, n, k).iter().flat_map(|&i| x[i * D..(i + 1) * D].to_vec()).collect();
    let nearest = |c: &[f64]| -> Vec<i64> {
        (0..n)
            .map(|i| {
                let dist = |j: usize| (0..D).map(|t| (x[i * D + t] - c[j * D + t]).powi(2)).sum::<f64>();
                (0..k).fold(0, |best, j| if dist(j) < dist(best) { j } else { best }) as i64
            })
            .collect()
    };
    for _ in 0..iters {
        let labels = nearest(&c);
        let mut sums = vec![0.0; k * D];
        let mut counts = vec![0.0; k];
        for (i, &l) in labels.iter().enumerate() {
            counts[l as usize] += 1.0;
            (0..D).for_each(|t| sums[l as usize * D + t] += x[i * D + t]);
        }
        assert!(counts.iter().all(|&m| m > 0.0), "the transcription has no splits: {counts:?}");
        c = sums.iter().enumerate().map(|(e, s)| s / counts[e / D]).collect();
    }
    let labels = nearest(&c);
    (c, labels)
}

fn close(what: &str, a: &[f64], b: &[f64]) {
    let e = rel_err(a, b);
    assert!(e <= 1e-9, "{what}: off by {e:e}");
}

#[test]
fn kmeans_on_p_ranks_equals_one_rank_and_plain_lloyd() {
    let x = randn_vec(37 * D, 11);
    let (k, iters, key) = (6, 5, 42);
    let one = cluster(&x, 1, k, iters, key);
    let (c, labels) = lloyd(&x, k, iters, key);
    close("centroids against Lloyd", &one.centroids, &c);
    assert_eq!(one.labels, labels);
    assert_eq!(one.splits, 0);
    assert_eq!(one.counts.iter().sum::<f64>(), 37.0);
    for p in [2, 4] {
        let f = cluster(&x, p, k, iters, key);
        close(&format!("P={p} centroids"), &f.centroids, &one.centroids);
        assert_eq!(f.labels, one.labels, "P={p} labels");
        assert_eq!(f.counts, one.counts, "P={p} counts");
        close(&format!("P={p} inertia"), &[f.inertia], &[one.inertia]);
    }
    // Another key (another epoch) starts elsewhere.
    assert_ne!(starting_items(key, 37, k), starting_items(key + 1, 37, k));
    let mut start = starting_items(key, 37, 37);
    start.sort_unstable();
    assert_eq!(start, (0..37).collect::<Vec<_>>(), "the start draws distinct items");
}

#[test]
fn empty_clusters_are_split_alike_on_every_layout() {
    // 30 items on 3 distinct points and k = 5: a start on two copies of one
    // point leaves a cluster empty, which a split re-seeds.
    let points = randn_vec(3 * D, 7);
    let x: Vec<f64> = (0..30).flat_map(|i| points[(i % 3) * D..(i % 3 + 1) * D].to_vec()).collect();
    let one = cluster(&x, 1, 5, 4, 9);
    assert!(one.splits > 0, "no empty cluster arose");
    assert_eq!(one.counts.iter().sum::<f64>(), 30.0);
    for i in 0..30 {
        assert_eq!(one.labels[i], one.labels[i % 3], "copies of one point share a cluster");
    }
    for p in [2, 3] {
        let f = cluster(&x, p, 5, 4, 9);
        close(&format!("P={p} centroids"), &f.centroids, &one.centroids);
        assert_eq!((f.labels, f.splits), (one.labels.clone(), one.splits), "P={p}");
    }
}

#[test]
fn kmeans_refuses_bad_sizes() {
    let x = Tensor::from_slice(&randn_vec(4 * D, 1)).view([4, D as i64]);
    let solo = Sharding { items: 4, rank: 0, world_size: 1 };
    let err = |r: contrast_nn::Result<_>| r.err().map(|e| e.to_string()).unwrap_or_default();
    assert!(err(kmeans(&x, solo, 1, 3, 0, &contrast_comm::Solo)).contains("1 clusters for 4 items"));
    assert!(err(kmeans(&x, solo, 5, 3, 0, &contrast_comm::Solo)).contains("5 clusters for 4 items"));
    let wrong = Sharding { items: 9, ..solo };
    assert!(err(kmeans(&x, wrong, 2, 3, 0, &contrast_comm::Solo)).contains("for 9 items"));
}
