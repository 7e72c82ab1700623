//! Which samples form global batch t, and which rows a rank takes.

use crate::rng::{sample_rng, Stream};
use crate::DataError;
use rand::seq::SliceRandom;

/// Epoch-wise shuffling sampler over a dataset of `len` samples.
///
/// Global batch t of size N is rows `[j·N, (j+1)·N)` of the permutation of
/// epoch `t / steps_per_epoch` (j = t mod steps_per_epoch); the last partial
/// batch of an epoch is dropped. The permutation depends only on (seed, epoch).
/// Rank r of P takes rows `[r·B, (r+1)·B)`, B = N / P.
#[derive(Debug, Clone)]
pub struct Sampler {
    len: usize,
    global_batch: usize,
    seed: u64,
}

impl Sampler {
    /// A sampler; fails when the dataset holds fewer samples than one global batch.
    pub fn new(len: usize, global_batch: usize, seed: u64) -> Result<Self, DataError> {
        if global_batch == 0 || len < global_batch {
            return Err(DataError::Size(format!(
                "dataset of {len} samples cannot fill a global batch of {global_batch}"
            )));
        }
        Ok(Self { len, global_batch, seed })
    }

    /// Samples in the dataset.
    pub fn dataset_len(&self) -> usize {
        self.len
    }

    /// Full global batches per epoch (the remainder of the permutation is dropped).
    pub fn steps_per_epoch(&self) -> usize {
        self.len / self.global_batch
    }

    /// The epoch that step `step` falls in.
    pub fn epoch_of(&self, step: usize) -> usize {
        step / self.steps_per_epoch()
    }

    /// The permutation of one epoch.
    pub fn permutation(&self, epoch: usize) -> Vec<usize> {
        let mut perm: Vec<usize> = (0..self.len).collect();
        perm.shuffle(&mut sample_rng(self.seed, epoch as u64, 0, Stream::Permutation as u64));
        perm
    }

    /// Global sample indices of step `step`, given that epoch's permutation.
    pub fn global_batch_of(&self, step: usize, perm: &[usize]) -> Vec<usize> {
        let j = step % self.steps_per_epoch();
        perm[j * self.global_batch..(j + 1) * self.global_batch].to_vec()
    }

    /// Shuffle-BN's permutation of the `n` rows of step `step`'s global batch,
    /// from (seed, step) alone: rank r encodes the key views of rows
    /// `order[r·B..(r+1)·B]`, whatever the world size.
    pub fn shuffle_order(seed: u64, step: usize, n: usize) -> Vec<usize> {
        let mut order: Vec<usize> = (0..n).collect();
        order.shuffle(&mut sample_rng(seed, step as u64, 0, Stream::ShuffleBn as u64));
        order
    }

    /// Rows of rank `rank` of `world` in a global batch.
    pub fn local_rows(global: &[usize], rank: usize, world: usize) -> &[usize] {
        let b = global.len() / world;
        &global[rank * b..(rank + 1) * b]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranks_partition_the_global_batch_and_epochs_reshuffle() {
        let s = Sampler::new(100, 12, 7).unwrap();
        assert_eq!(s.steps_per_epoch(), 8);
        let p0 = s.permutation(0);
        let g = s.global_batch_of(3, &p0);
        let mut joined = Vec::new();
        for r in 0..4 {
            joined.extend_from_slice(Sampler::local_rows(&g, r, 4));
        }
        assert_eq!(joined, g);
        assert_ne!(s.permutation(1), p0);
        assert_eq!(s.permutation(0), p0);
        assert_eq!(s.epoch_of(8), 1);
        assert!(Sampler::new(5, 8, 0).is_err());
    }
}
