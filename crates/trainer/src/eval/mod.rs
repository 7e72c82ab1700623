//! Evaluation: weighted kNN on backbone features, and CLIP zero-shot.
//!
//! kNN follows instance discrimination (Wu et al. 2018) and the usual SSL
//! monitors: L2-normalised features, cosine similarity, the k nearest training
//! images vote for their class with weight exp(sim / t); top-1 accuracy on the
//! test split. Work is split over the ranks (features by slices of images,
//! kNN by slices of the test set) and joined with collectives, so no rank idles.
//!
//! An [`EvalSet`] is either IDX images or encoded files (image folder,
//! WebDataset, CSV) seen through the evaluation transform: resize the shorter
//! side, centre crop, normalise as in training. A file that cannot be read is
//! logged, left out of the memory and of the test count.

use contrast_comm::Collective;
use contrast_data::idx::{Images, FASHION_MNIST_MEAN_STD};
use contrast_data::rgb::{decode, RgbAugParams, RgbAugmenter};
use contrast_data::source::Source;
use contrast_nn::loss::l2_normalize;
use rand::SeedableRng;
use std::sync::Arc;
use tch::{Device, Kind, Tensor};

mod align;
mod knn;
mod lines;
mod zero_shot;
pub use align::*;
pub use knn::*;
pub use lines::*;
pub use zero_shot::*;

/// The label of an input that could not be read or tokenised: its features
/// are zero and it counts nowhere (−1 is a readable input without a label).
pub const UNREADABLE: i64 = -2;

/// Images per forward pass during evaluation.
const CHUNK: usize = 500;

/// Images (or sentences) to evaluate and their labels (−1: unlabelled or unreadable, left out).
pub enum EvalSet {
    /// IDX images, normalised with the dataset statistics.
    Idx(Images),
    /// Encoded files at `transform.size`, a strided subset `indices` of `source`.
    Files {
        /// The files.
        source: Arc<dyn Source>,
        /// Which samples, in order.
        indices: Vec<usize>,
        /// The deterministic evaluation transform (no random op).
        transform: RgbAugParams,
        /// Decoding threads.
        threads: usize,
    },
    /// Sentences, a strided subset `indices` of `corpus`: a batch is packed
    /// captions `[n, context + 1]` ([`contrast_nn::encoder::text::Captions::pack`]).
    Lines(LineSet),
    /// The same sentences as word counts `[n, BOW_DIM]` (the bag-of-words baseline).
    Words(LineSet),
}

impl EvalSet {
    /// The files of `source`, at most `max` of them (0 = all) taken at an even stride, so every class stays.
    pub fn files(source: Arc<dyn Source>, max: usize, transform: RgbAugParams, threads: usize) -> Self {
        let n = source.len();
        let m = if max == 0 { n } else { max.min(n) };
        let indices = (0..m).map(|i| i * n / m.max(1)).collect();
        EvalSet::Files { source, indices, transform, threads: threads.max(1) }
    }

    /// At most `max` of the set's items (0 = all), as evaluation takes them
    /// (`eval.max_train`): IDX's first ones, files and sentences at an even stride.
    pub fn strided(self, max: usize) -> Self {
        let pick = |indices: Vec<usize>| match max {
            0 => indices,
            m if m >= indices.len() => indices,
            m => (0..m).map(|i| indices[i * indices.len() / m]).collect(),
        };
        match self {
            EvalSet::Idx(mut images) => {
                images.truncate(max);
                EvalSet::Idx(images)
            }
            EvalSet::Files { source, indices, transform, threads } => {
                EvalSet::Files { source, indices: pick(indices), transform, threads }
            }
            EvalSet::Lines(s) => EvalSet::Lines(LineSet { indices: pick(s.indices.clone()), ..s }),
            EvalSet::Words(s) => EvalSet::Words(LineSet { indices: pick(s.indices.clone()), ..s }),
        }
    }

    /// Number of images.
    pub fn len(&self) -> usize {
        match self {
            EvalSet::Idx(images) => images.len(),
            EvalSet::Files { indices, .. } => indices.len(),
            EvalSet::Lines(s) | EvalSet::Words(s) => s.indices.len(),
        }
    }

    /// True when there are no images.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The source index of image `i` of a file set (None for IDX, whose index is `i`).
    pub fn source_index(&self, i: usize) -> Option<usize> {
        match self {
            EvalSet::Idx(_) => None,
            EvalSet::Files { indices, .. } => Some(indices[i]),
            EvalSet::Lines(s) | EvalSet::Words(s) => Some(s.indices[i]),
        }
    }

    /// Shape (channels, height, width) of one input image.
    pub fn shape(&self) -> (i64, i64, i64) {
        match self {
            EvalSet::Idx(images) => (1, images.height as i64, images.width as i64),
            EvalSet::Files { transform, .. } => (3, transform.size as i64, transform.size as i64),
            EvalSet::Lines(s) => (1, 1, s.context as i64 + 1),
            EvalSet::Words(_) => (1, 1, BOW_DIM as i64),
        }
    }

    /// Floats of one input image (channels × height × width).
    pub fn pixels(&self) -> usize {
        match self {
            EvalSet::Idx(images) => images.height * images.width,
            EvalSet::Files { transform, .. } => 3 * (transform.size as usize).pow(2),
            EvalSet::Lines(s) => s.context + 1,
            EvalSet::Words(_) => BOW_DIM,
        }
    }

    /// Normalised input tensor `[n, C, H, W]` of images `start..end` and their labels.
    pub fn batch(&self, start: usize, end: usize, device: Device) -> (Tensor, Vec<i64>) {
        self.batch_of(&(start..end).collect::<Vec<_>>(), device)
    }

    /// [`EvalSet::batch`] of the images at positions `which` (any order).
    pub fn batch_of(&self, which: &[usize], device: Device) -> (Tensor, Vec<i64>) {
        match self {
            EvalSet::Lines(s) => s.tokens(which, device),
            EvalSet::Words(s) => s.words(which, device),
            EvalSet::Idx(images) => {
                let (m, s) = FASHION_MNIST_MEAN_STD;
                let pix = images.height * images.width;
                let data: Vec<f32> = which
                    .iter()
                    .flat_map(|&i| images.pixels[i * pix..(i + 1) * pix].iter().map(|&v| (v as f32 / 255.0 - m) / s))
                    .collect();
                let x = Tensor::from_slice(&data)
                    .view([which.len() as i64, 1, images.height as i64, images.width as i64])
                    .to_device(device);
                (x, which.iter().map(|&i| images.labels[i] as i64).collect())
            }
            EvalSet::Files { source, indices, transform, threads } => {
                let pix = self.pixels();
                let n = which.len();
                let mut data = vec![0f32; n * pix];
                let mut labels = vec![UNREADABLE; n];
                let per = n.div_ceil(*threads).max(1);
                std::thread::scope(|scope| {
                    for (k, (out, lab)) in data.chunks_mut(per * pix).zip(labels.chunks_mut(per)).enumerate() {
                        let transform = transform.clone();
                        scope.spawn(move || {
                            let mut aug = RgbAugmenter::new(transform);
                            // The transform has no random op; the generator is never drawn from.
                            let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
                            for (j, (img, label)) in out.chunks_mut(pix).zip(lab.iter_mut()).enumerate() {
                                let i = indices[which[k * per + j]];
                                let got = source.fetch(i).and_then(|raw| {
                                    let rgb = decode(&raw.bytes)?;
                                    aug.apply(&rgb, &mut rng, img)?;
                                    Ok(raw.label)
                                });
                                match got {
                                    Ok(l) => *label = l,
                                    Err(e) => {
                                        tracing::warn!("evaluation skips {}: {e}", source.locate(i));
                                        img.iter_mut().for_each(|v| *v = 0.0);
                                    }
                                }
                            }
                        });
                    }
                });
                let s = transform.size as i64;
                (Tensor::from_slice(&data).view([n as i64, 3, s, s]).to_device(device), labels)
            }
        }
    }
}

/// What evaluation runs on: the kNN memory (the training set, when it has
/// labels), the labelled test set, and the class names zero-shot prompts use.
pub struct EvalData {
    /// kNN memory; `None` when the training set has no labels (a caption CSV).
    pub memory: Option<EvalSet>,
    /// The test set.
    pub test: EvalSet,
    /// Class names by label (empty: no zero-shot).
    pub class_names: Vec<String>,
    /// The training augmentation of the first two views, for alignment and uniformity.
    pub views: Option<ViewAug>,
}

/// Two views' training augmentation, applied to evaluation images.
pub enum ViewAug {
    /// IDX input: the grayscale augmenters.
    Idx(Vec<contrast_data::Augmenter>),
    /// Decoded files: the RGB augmentation parameters.
    Files(Vec<RgbAugParams>),
    /// Sentences: the two views of an item are a sentence and the next one of its group.
    Adjacent,
}

/// Rows `[lo, hi)` of `n` that rank r handles when n is split in P near-equal slices.
fn slice_of<C: Collective>(comm: &C, n: usize) -> (usize, usize, usize) {
    let (lo, hi) = slice_bounds(n, comm.rank(), comm.world_size());
    (lo, hi, n.div_ceil(comm.world_size()))
}

/// Rows `[lo, hi)` of rank `rank` of `p` over `n` rows: ⌈n/P⌉ each, the last ranks fewer.
pub fn slice_bounds(n: usize, rank: usize, p: usize) -> (usize, usize) {
    let per = n.div_ceil(p.max(1));
    ((rank * per).min(n), ((rank + 1) * per).min(n))
}

/// Features and labels of every image, computed in slices across ranks and
/// all-gathered; `f` maps an input batch to `[b, D]`. Returns L2-normalised
/// `[n, D]` on `device` (zero rows for unreadable images) and the labels.
pub fn features<C: Collective>(
    comm: &C,
    set: &EvalSet,
    device: Device,
    dim: i64,
    f: impl Fn(&Tensor) -> Tensor,
) -> (Tensor, Vec<i64>) {
    features_with(comm, set.len(), device, dim, f, |s, e| set.batch(s, e, device))
}

/// [`features`] of `n` inputs that `batch(start, end)` makes (with labels, −1: unreadable).
fn features_with<C: Collective>(
    comm: &C,
    n: usize,
    device: Device,
    dim: i64,
    f: impl Fn(&Tensor) -> Tensor,
    batch: impl Fn(usize, usize) -> (Tensor, Vec<i64>),
) -> (Tensor, Vec<i64>) {
    let (local, labels, (_, _, per)) = local_features_with(comm, n, device, dim, f, batch, true);
    let rows = gather_slices(comm, &contrast_nn::to_host::<f32>(&local), n, per, dim as usize, 0.0);
    let labels = gather_slices(comm, &labels, n, per, 1, -1);
    (Tensor::from_slice(&rows).view([n as i64, dim]).to_device(device), labels)
}

/// This rank's slice `[lo, hi)` of [`features`] (not gathered): the features
/// `[hi − lo, D]`, their labels, and (lo, hi, rows per rank).
pub fn local_features<C: Collective>(
    comm: &C,
    set: &EvalSet,
    device: Device,
    dim: i64,
    f: impl Fn(&Tensor) -> Tensor,
) -> (Tensor, Vec<i64>, (usize, usize, usize)) {
    local_features_with(comm, set.len(), device, dim, f, |s, e| set.batch(s, e, device), true)
}

/// The whitening (Su et al. 2021) of `f`'s features fitted on `memory`: each
/// rank embeds its slice (no L2 normalisation, unreadable rows left out) and
/// the statistics are summed over the ranks in f64 ([`contrast_nn::whiten`]);
/// `dims` keeps that many whitened dimensions. Collective.
pub fn fit_whitening<C: Collective>(
    comm: &C,
    memory: &EvalSet,
    device: Device,
    dim: i64,
    dims: Option<usize>,
    f: impl Fn(&Tensor) -> Tensor,
) -> contrast_nn::Result<contrast_nn::whiten::Whitening> {
    let (raw, labels, _) =
        local_features_with(comm, memory.len(), device, dim, f, |s, e| memory.batch(s, e, device), false);
    let read: Vec<i64> = (0..labels.len() as i64).filter(|&i| labels[i as usize] != UNREADABLE).collect();
    let rows = raw.index_select(0, &Tensor::from_slice(&read).to_device(device));
    contrast_nn::whiten::Whitening::fit(&rows, comm, dims)
}

/// `eval.whiten`: the whitening of `f` on the memory with `eval.whiten_dim`, and its output width.
pub fn whitening_of<C: Collective>(
    comm: &C,
    cfg: &contrast_config::EvalConfig,
    memory: &EvalSet,
    device: Device,
    dim: i64,
    f: impl Fn(&Tensor) -> Tensor,
) -> anyhow::Result<Option<(contrast_nn::whiten::Whitening, i64)>> {
    if !cfg.whiten {
        return Ok(None);
    }
    let k = check_whiten_dim(cfg, dim)?;
    let w = fit_whitening(comm, memory, device, dim, Some(k as usize), f)?;
    Ok(Some((w, k)))
}

/// The whitened width of `eval.whiten_dim` for `dim`-dimensional features:
/// an error naming the key when it is above `dim`.
pub fn check_whiten_dim(cfg: &contrast_config::EvalConfig, dim: i64) -> anyhow::Result<i64> {
    match cfg.whiten_dim as i64 {
        0 => Ok(dim),
        k if k > dim => {
            anyhow::bail!("eval.whiten_dim: {k} is more than the {dim} dimensions of the embedding (0 keeps all)")
        }
        k => Ok(k),
    }
}

fn local_features_with<C: Collective>(
    comm: &C,
    n: usize,
    device: Device,
    dim: i64,
    f: impl Fn(&Tensor) -> Tensor,
    batch: impl Fn(usize, usize) -> (Tensor, Vec<i64>),
    normalize: bool,
) -> (Tensor, Vec<i64>, (usize, usize, usize)) {
    let (lo, hi, per) = slice_of(comm, n);
    let mut parts = Vec::new();
    let mut labels = Vec::with_capacity(per);
    tch::no_grad(|| {
        let mut s = lo;
        while s < hi {
            let e = (s + CHUNK).min(hi);
            let (x, l) = batch(s, e);
            let valid = l.iter().map(|&v| f32::from(v != UNREADABLE)).collect::<Vec<_>>();
            let valid = Tensor::from_slice(&valid).to_device(device);
            let y = f(&x).to_kind(Kind::Float);
            parts.push(if normalize { l2_normalize(&y) } else { y } * valid.unsqueeze(1));
            labels.extend(l);
            s = e;
        }
    });
    let local = if parts.is_empty() { Tensor::zeros([0, dim], (Kind::Float, device)) } else { Tensor::cat(&parts, 0) };
    (local, labels, (lo, hi, per))
}

/// Every rank's slice of `n` items of `width` values (`per` items each, the
/// last slices short; `fill` pads them for the gather), joined in rank order.
fn gather_slices<C: Collective, T: contrast_comm::Element>(
    comm: &C,
    local: &[T],
    n: usize,
    per: usize,
    width: usize,
    fill: T,
) -> Vec<T> {
    let mut padded = local.to_vec();
    padded.resize(per * width, fill);
    let all = comm.all_gather(&padded);
    (0..comm.world_size())
        .flat_map(|r| {
            let lo = (r * per).min(n);
            let hi = (lo + per).min(n);
            all[r * per * width..(r * per + hi - lo) * width].to_vec()
        })
        .collect()
}

/// Every rank's slice of labels (`per` each, the last ones short), in rank order: `[n]`.
fn gather_labels<C: Collective>(comm: &C, local: &[i64], n: usize, per: usize) -> Vec<i64> {
    gather_slices(comm, local, n, per, 1, -1)
}
