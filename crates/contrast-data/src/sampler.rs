//! Which samples form global batch t, and which rows a rank takes.

use crate::rng::{sample_rng, Stream};
use crate::DataError;
use rand::distributions::{Distribution, WeightedIndex};
use rand::seq::SliceRandom;
use std::sync::Arc;

/// How an epoch draws its items: a method's sampling hook. Whatever it is, the
/// epoch's order is a function of (seed, epoch, sampling) alone, equal on every
/// rank, so P ranks × B see the global batches of 1 rank × P·B.
#[derive(Debug, Clone, Default, PartialEq)]
pub enum Sampling {
    /// A uniform permutation of the items (every item once per epoch).
    #[default]
    Uniform,
    /// As many draws as there are items, with replacement, item i with
    /// probability w_i / Σ w (one finite weight ≥ 0 per item, not all 0).
    Weighted(Arc<Vec<f64>>),
    /// One class (a pseudo-label) per item; every non-empty class is drawn
    /// equally often, as DeepCluster's `UnifLabelSampler` draws: ⌊n / K⌋ + 1
    /// items of each of the K non-empty classes (with replacement only when the
    /// class holds no more items than that), shuffled, the first n kept.
    Balanced(Arc<Vec<u32>>),
}

impl Sampling {
    /// A hash of the sampling, so that ranks can check they hold the same one.
    pub fn fingerprint(&self) -> u64 {
        let (tag, bytes): (&[u8], Vec<u8>) = match self {
            Sampling::Uniform => (b"uniform", Vec::new()),
            Sampling::Weighted(w) => (b"weighted", w.iter().flat_map(|x| x.to_le_bytes()).collect()),
            Sampling::Balanced(c) => (b"balanced", c.iter().flat_map(|x| x.to_le_bytes()).collect()),
        };
        crate::fingerprint([tag, &bytes[..]])
    }

    /// Check the sampling against a training set of `len` items; the error
    /// says what is wrong (length, a bad weight, all weights zero).
    pub fn check(&self, len: usize) -> Result<(), DataError> {
        let per_item = |n: usize, what: &str| match n == len {
            true => Ok(()),
            false => Err(DataError::Size(format!("a {what} sampling holds {n} entries for {len} training items"))),
        };
        match self {
            Sampling::Uniform => Ok(()),
            Sampling::Balanced(classes) => per_item(classes.len(), "class-balanced"),
            Sampling::Weighted(w) => {
                per_item(w.len(), "weighted")?;
                if let Some(i) = w.iter().position(|x| !(x.is_finite() && *x >= 0.0)) {
                    return Err(DataError::Size(format!(
                        "sampling weight of item {i} is {} (must be finite and ≥ 0)",
                        w[i]
                    )));
                }
                match w.iter().any(|&x| x > 0.0) {
                    true => Ok(()),
                    false => Err(DataError::Size("every sampling weight is 0".into())),
                }
            }
        }
    }
}

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

    /// The order of one epoch under `sampling` (`dataset_len` items; the
    /// uniform sampling's order is [`Sampler::permutation`]). The sampling must
    /// have passed [`Sampling::check`].
    pub fn order(&self, epoch: usize, sampling: &Sampling) -> Vec<usize> {
        let mut rng = sample_rng(self.seed, epoch as u64, 0, Stream::Permutation as u64);
        match sampling {
            Sampling::Uniform => self.permutation(epoch),
            Sampling::Weighted(w) => {
                let pick = WeightedIndex::new(w.iter()).expect("checked weights");
                (0..self.len).map(|_| pick.sample(&mut rng)).collect()
            }
            Sampling::Balanced(classes) => balanced(classes, self.len, &mut rng),
        }
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

/// DeepCluster's `UnifLabelSampler.generate_indexes_epoch` over `classes`.
fn balanced(classes: &[u32], n: usize, rng: &mut impl rand::Rng) -> Vec<usize> {
    let mut members: std::collections::BTreeMap<u32, Vec<usize>> = Default::default();
    for (i, &c) in classes.iter().enumerate() {
        members.entry(c).or_default().push(i);
    }
    let per = n / members.len().max(1) + 1;
    let mut order = Vec::with_capacity(per * members.len());
    for items in members.values() {
        match items.len() <= per {
            true => order.extend((0..per).map(|_| items[rng.gen_range(0..items.len())])),
            false => order.extend(items.choose_multiple(rng, per).copied()),
        }
    }
    order.shuffle(rng);
    order.truncate(n);
    order
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

    #[test]
    fn weighted_and_balanced_orders_follow_their_state_alone() {
        let s = Sampler::new(1000, 100, 3).unwrap();
        assert_eq!(s.order(2, &Sampling::Uniform), s.permutation(2));
        // Weights: odd items never drawn, item 0 drawn about a third of the time.
        let mut w = vec![1.0; 1000];
        w.iter_mut().skip(1).step_by(2).for_each(|x| *x = 0.0);
        w[0] = 250.0;
        let weighted = Sampling::Weighted(Arc::new(w));
        weighted.check(1000).unwrap();
        let o = s.order(1, &weighted);
        assert_eq!(o.len(), 1000);
        assert!(o.iter().all(|i| i % 2 == 0));
        let zeros = o.iter().filter(|&&i| i == 0).count();
        assert!((280..=390).contains(&zeros), "item 0 drawn {zeros} times, expected about 333");
        assert_eq!(s.order(1, &weighted), o, "a function of (seed, epoch, weights)");
        assert_ne!(s.order(2, &weighted), o);
        // Balanced: class 0 holds 990 items, classes 1 and 2 five each; each is drawn 334 times, 1002 cut to 1000.
        let classes: Vec<u32> = (0..1000)
            .map(|i| {
                if i < 5 {
                    1
                } else if i < 10 {
                    2
                } else {
                    0
                }
            })
            .collect();
        let bal = Sampling::Balanced(Arc::new(classes.clone()));
        let o = s.order(0, &bal);
        assert_eq!(o.len(), 1000);
        let count = |c: u32| o.iter().filter(|&&i| classes[i] == c).count();
        assert!((332..=334).contains(&count(1)) && (332..=334).contains(&count(2)), "{} {}", count(1), count(2));
        // A large class is drawn without replacement.
        let big: Vec<usize> = o.iter().copied().filter(|&i| classes[i] == 0).collect();
        assert_eq!(big.len(), big.iter().collect::<std::collections::HashSet<_>>().len());
        assert_eq!(s.order(0, &bal), o);
        // Bad state is refused with what is wrong.
        let err = |x: Sampling| x.check(1000).unwrap_err().to_string();
        assert!(err(Sampling::Weighted(Arc::new(vec![1.0; 999]))).contains("999 entries for 1000"));
        assert!(err(Sampling::Weighted(Arc::new(vec![0.0; 1000]))).contains("every sampling weight is 0"));
        let mut nan = vec![1.0; 1000];
        nan[7] = f64::NAN;
        assert!(err(Sampling::Weighted(Arc::new(nan))).contains("item 7"));
        assert!(err(Sampling::Balanced(Arc::new(vec![0; 3]))).contains("3 entries"));
    }
}
