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
use contrast_data::text::{self, Tokenizer};
use contrast_nn::loss::l2_normalize;
use contrast_nn::model::Captions;
use contrast_nn::optim::{Optimizer, OptimizerKind, Param};
use contrast_nn::Method;
use rand::SeedableRng;
use std::sync::Arc;
use tch::{Device, Kind, Tensor};

/// Images per forward pass during evaluation.
const CHUNK: usize = 500;

/// Images to evaluate and their labels (−1: unlabelled or unreadable, left out).
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
}

impl EvalSet {
    /// The files of `source`, at most `max` of them (0 = all) taken at an even stride, so every class stays.
    pub fn files(source: Arc<dyn Source>, max: usize, transform: RgbAugParams, threads: usize) -> Self {
        let n = source.len();
        let m = if max == 0 { n } else { max.min(n) };
        let indices = (0..m).map(|i| i * n / m.max(1)).collect();
        EvalSet::Files { source, indices, transform, threads: threads.max(1) }
    }

    /// Number of images.
    pub fn len(&self) -> usize {
        match self {
            EvalSet::Idx(images) => images.len(),
            EvalSet::Files { indices, .. } => indices.len(),
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
        }
    }

    /// Shape (channels, height, width) of one input image.
    pub fn shape(&self) -> (i64, i64, i64) {
        match self {
            EvalSet::Idx(images) => (1, images.height as i64, images.width as i64),
            EvalSet::Files { transform, .. } => (3, transform.size as i64, transform.size as i64),
        }
    }

    /// Floats of one input image (channels × height × width).
    pub fn pixels(&self) -> usize {
        match self {
            EvalSet::Idx(images) => images.height * images.width,
            EvalSet::Files { transform, .. } => 3 * (transform.size as usize).pow(2),
        }
    }

    /// Normalised input tensor `[n, C, H, W]` of images `start..end` and their labels.
    pub fn batch(&self, start: usize, end: usize, device: Device) -> (Tensor, Vec<i64>) {
        match self {
            EvalSet::Idx(images) => {
                let (m, s) = FASHION_MNIST_MEAN_STD;
                let pix = images.height * images.width;
                let data: Vec<f32> =
                    images.pixels[start * pix..end * pix].iter().map(|&v| (v as f32 / 255.0 - m) / s).collect();
                let x = Tensor::from_slice(&data)
                    .view([(end - start) as i64, 1, images.height as i64, images.width as i64])
                    .to_device(device);
                (x, images.labels[start..end].iter().map(|&l| l as i64).collect())
            }
            EvalSet::Files { source, indices, transform, threads } => {
                let pix = self.pixels();
                let n = end - start;
                let mut data = vec![0f32; n * pix];
                let mut labels = vec![-1i64; n];
                let per = n.div_ceil(*threads).max(1);
                std::thread::scope(|scope| {
                    for (k, (out, lab)) in data.chunks_mut(per * pix).zip(labels.chunks_mut(per)).enumerate() {
                        let transform = transform.clone();
                        scope.spawn(move || {
                            let mut aug = RgbAugmenter::new(transform);
                            // The transform has no random op; the generator is never drawn from.
                            let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
                            for (j, (img, label)) in out.chunks_mut(pix).zip(lab.iter_mut()).enumerate() {
                                let i = indices[start + k * per + j];
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
}

/// Test images alignment and uniformity use (the first ones).
pub const ALIGN_IMAGES: usize = 2048;

/// View `k` of images `start..end` under the training augmentation, from the
/// stream (seed, 0, image, view k); a row that cannot be read is zero and flagged false.
fn view_batch(set: &EvalSet, aug: &ViewAug, k: usize, start: usize, end: usize, seed: u64) -> (Vec<f32>, Vec<bool>) {
    let rng = |i: usize| contrast_data::rng::sample_rng(seed, 0, i as u64, 100 + k as u64);
    let pix = set.pixels();
    let (mut data, mut ok) = (vec![0f32; (end - start) * pix], vec![true; end - start]);
    for (j, (out, good)) in data.chunks_mut(pix).zip(ok.iter_mut()).enumerate() {
        let i = start + j;
        match (set, aug) {
            (EvalSet::Idx(images), ViewAug::Idx(a)) => a[k].apply(images.image(i), &mut rng(i), out),
            (EvalSet::Files { source, indices, .. }, ViewAug::Files(p)) => {
                let got = source
                    .fetch(indices[i])
                    .and_then(|raw| RgbAugmenter::new(p[k].clone()).apply(&decode(&raw.bytes)?, &mut rng(i), out));
                *good = got.is_ok();
            }
            _ => *good = false,
        }
    }
    (data, ok)
}

/// Alignment E‖z₁ − z₂‖² over the rows' two views and uniformity
/// log E_{i≠j} exp(−2‖zᵢ − zⱼ‖²) over the first views (Wang & Isola 2020,
/// α = 2, t = 2), of L2-normalised `z1`, `z2` `[m, D]` (identical on every
/// rank); each rank sums a slice of the rows, and the sums are all-reduced.
pub fn alignment_uniformity<C: Collective>(comm: &C, z1: &Tensor, z2: &Tensor) -> (f64, f64) {
    let m = z1.size()[0] as usize;
    let (lo, hi, _) = slice_of(comm, m);
    let mut sums = [0f64; 2];
    if hi > lo {
        let (a, b) = (z1.narrow(0, lo as i64, (hi - lo) as i64), z2.narrow(0, lo as i64, (hi - lo) as i64));
        sums[0] = (&a - &b).square().sum(Kind::Double).double_value(&[]);
        // ‖zᵢ − zⱼ‖² = 2 − 2 zᵢ·zⱼ for unit vectors; the diagonal (i = j) is left out.
        let e = ((a.matmul(&z1.tr()) * 4.0) - 4.0).to_kind(Kind::Double).exp();
        sums[1] = e.sum(Kind::Double).double_value(&[]) - (hi - lo) as f64;
    }
    comm.all_reduce_sum(&mut sums);
    (sums[0] / m.max(1) as f64, (sums[1] / (m * m.saturating_sub(1)).max(1) as f64).ln())
}

/// Alignment and uniformity of a feature extractor on the first
/// [`ALIGN_IMAGES`] test images under two draws of the training augmentation
/// (rows either view could not read are left out).
#[allow(clippy::too_many_arguments)]
pub fn alignment_uniformity_of<C: Collective>(
    comm: &C,
    set: &EvalSet,
    aug: &ViewAug,
    device: Device,
    dim: i64,
    seed: u64,
    f: impl Fn(&Tensor) -> Tensor,
) -> (f64, f64) {
    let m = set.len().min(ALIGN_IMAGES);
    let (c, h, w) = set.shape();
    let views: Vec<(Tensor, Vec<i64>)> = (0..2)
        .map(|k| {
            features_with(comm, m, device, dim, &f, |s, e| {
                let (data, ok) = view_batch(set, aug, k, s, e, seed);
                let x = Tensor::from_slice(&data).view([(e - s) as i64, c, h, w]).to_device(device);
                (x, ok.iter().map(|&g| if g { 0 } else { -1 }).collect())
            })
        })
        .collect();
    let keep: Vec<i64> =
        (0..m as i64).filter(|&i| views[0].1[i as usize] >= 0 && views[1].1[i as usize] >= 0).collect();
    let rows = Tensor::from_slice(&keep).to_device(device);
    alignment_uniformity(comm, &views[0].0.index_select(0, &rows), &views[1].0.index_select(0, &rows))
}

/// Rows `[lo, hi)` of `n` that rank r handles when n is split in P near-equal slices.
fn slice_of<C: Collective>(comm: &C, n: usize) -> (usize, usize, usize) {
    let per = n.div_ceil(comm.world_size());
    let lo = (comm.rank() * per).min(n);
    (lo, (lo + per).min(n), per)
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
    let (lo, hi, per) = slice_of(comm, n);
    let mut parts = Vec::new();
    let mut labels = Vec::with_capacity(per);
    tch::no_grad(|| {
        let mut s = lo;
        while s < hi {
            let e = (s + CHUNK).min(hi);
            let (x, l) = batch(s, e);
            let valid = Tensor::from_slice(&l.iter().map(|&v| f32::from(v >= 0)).collect::<Vec<_>>()).to_device(device);
            parts.push(l2_normalize(&f(&x).to_kind(Kind::Float)) * valid.unsqueeze(1));
            labels.extend(l);
            s = e;
        }
    });
    let mut local =
        if parts.is_empty() { Tensor::zeros([0, dim], (Kind::Float, device)) } else { Tensor::cat(&parts, 0) };
    let pad = per - (hi - lo);
    if pad > 0 {
        local = Tensor::cat(&[local, Tensor::zeros([pad as i64, dim], (Kind::Float, device))], 0);
        labels.extend(std::iter::repeat_n(-1, pad));
    }
    let all = comm.all_gather(&contrast_nn::to_host::<f32>(&local));
    let all_labels = comm.all_gather(&labels);
    let (mut rows, mut out_labels) = (Vec::with_capacity(n * dim as usize), Vec::with_capacity(n));
    for r in 0..comm.world_size() {
        let lo = (r * per).min(n);
        let hi = (lo + per).min(n);
        let base = r * per * dim as usize;
        rows.extend_from_slice(&all[base..base + (hi - lo) * dim as usize]);
        out_labels.extend_from_slice(&all_labels[r * per..r * per + (hi - lo)]);
    }
    (Tensor::from_slice(&rows).view([n as i64, dim]).to_device(device), out_labels)
}

/// Top-1 and top-5 hits of class scores `[b, classes]` against `truth` (−1: not counted).
fn hits(scores: &Tensor, truth: &Tensor) -> [i64; 3] {
    let labelled = truth.ge(0);
    let top1 = scores.argmax(1, false).eq_tensor(truth).logical_and(&labelled);
    let k = scores.size()[1].min(5);
    let (_, top) = scores.topk(k, 1, true, true);
    let top5 = top.eq_tensor(&truth.unsqueeze(1)).any_dim(1, false).logical_and(&labelled);
    let count = |t: &Tensor| t.sum(Kind::Int64).int64_value(&[]);
    [count(&top1), count(&top5), count(&labelled)]
}

/// Weighted kNN top-1 and top-5 accuracy over the labelled test rows; each rank
/// scores a slice of the test set. Memory rows labelled −1 vote for no class.
#[allow(clippy::too_many_arguments)]
pub fn knn_top1<C: Collective>(
    comm: &C,
    train: &Tensor,
    train_labels: &[i64],
    test: &Tensor,
    test_labels: &[i64],
    k: i64,
    t: f64,
    classes: i64,
) -> [f64; 2] {
    let device = train.device();
    let n = test_labels.len();
    let (lo, hi, _) = slice_of(comm, n);
    // Column `classes` collects the votes of unlabelled memory rows and never wins.
    let voters: Vec<i64> = train_labels.iter().map(|&l| if l < 0 { classes } else { l }).collect();
    let labels = Tensor::from_slice(&voters).to_device(device);
    let k = k.min(train.size()[0]);
    let mut counts = [0i64; 3];
    tch::no_grad(|| {
        let mut s = lo;
        while s < hi {
            let e = (s + 500).min(hi);
            let sim = test.narrow(0, s as i64, (e - s) as i64).matmul(&train.tr());
            let (vals, idx) = sim.topk(k, 1, true, true);
            let votes = labels.index_select(0, &idx.view([-1])).view([(e - s) as i64, k]);
            let w = (vals / t).exp();
            let scores = Tensor::zeros([(e - s) as i64, classes + 1], (Kind::Float, device)).scatter_add(1, &votes, &w);
            let truth = Tensor::from_slice(&test_labels[s..e]).to_device(device);
            let h = hits(&scores.narrow(1, 0, classes), &truth);
            (0..3).for_each(|j| counts[j] += h[j]);
            s = e;
        }
    });
    comm.all_reduce_sum(&mut counts);
    [counts[0] as f64 / counts[2].max(1) as f64, counts[1] as f64 / counts[2].max(1) as f64]
}

/// Number of classes seen in label lists (largest label + 1).
fn classes_of(a: &[i64], b: &[i64]) -> i64 {
    a.iter().chain(b).copied().max().unwrap_or(-1).max(0) + 1
}

/// kNN top-1 and top-5 of a feature extractor with `memory` as the neighbours;
/// `None` when the memory or the test set has no labelled image (e.g. WebDataset
/// shards without `.cls`). Also hands back the features, for the linear probe.
#[allow(clippy::too_many_arguments)]
pub fn knn_of<C: Collective>(
    comm: &C,
    memory: &EvalSet,
    test: &EvalSet,
    device: Device,
    dim: i64,
    k: i64,
    t: f64,
    f: impl Fn(&Tensor) -> Tensor,
) -> Option<([f64; 2], Features)> {
    let (ftrain, ltrain) = features(comm, memory, device, dim, &f);
    let (ftest, ltest) = features(comm, test, device, dim, &f);
    if !ltrain.iter().any(|&l| l >= 0) || !ltest.iter().any(|&l| l >= 0) {
        return None;
    }
    let classes = classes_of(&ltrain, &ltest);
    let acc = knn_top1(comm, &ftrain, &ltrain, &ftest, &ltest, k, t, classes);
    Some((acc, Features { train: (ftrain, ltrain), test: (ftest, ltest), classes }))
}

/// L2-normalised features and labels of the memory and the test set (identical on every rank).
pub struct Features {
    /// Memory (training) features `[n, D]` and labels.
    pub train: (Tensor, Vec<i64>),
    /// Test features `[m, D]` and labels.
    pub test: (Tensor, Vec<i64>),
    /// Number of classes.
    pub classes: i64,
}

/// kNN top-1 on raw pixels (normalised inputs, flattened).
pub fn raw_pixels_knn<C: Collective>(
    comm: &C,
    memory: &EvalSet,
    test: &EvalSet,
    device: Device,
    k: i64,
    t: f64,
) -> Option<f64> {
    let dim = memory.pixels() as i64;
    knn_of(comm, memory, test, device, dim, k, t, |x| x.flatten(1, -1)).map(|(acc, _)| acc[0])
}

/// Zero-shot top-1 and top-5 of a CLIP model: each class is the mean of its
/// normalised prompt embeddings over all templates; an image takes the most
/// similar classes. `None` for a model without a text tower.
#[allow(clippy::too_many_arguments)]
pub fn zero_shot_top1<C: Collective>(
    comm: &C,
    model: &dyn Method,
    test: &EvalSet,
    device: Device,
    class_names: &[String],
    tokenizer: &Tokenizer,
    context: usize,
    dim: i64,
) -> anyhow::Result<Option<[f64; 2]>> {
    let classifier = tch::no_grad(|| -> anyhow::Result<Option<Tensor>> {
        let mut protos = Vec::new();
        for name in class_names {
            let (mut toks, mut ends) = (Vec::new(), Vec::new());
            for t in 0..text::TEMPLATES.len() {
                let (ids, end) = tokenizer.encode(&text::caption(t, name), context).map_err(anyhow::Error::msg)?;
                toks.extend(ids);
                ends.push(end as i64);
            }
            let Some(e) = model.encode_text(&Captions::from_host(&toks, &ends, device)) else { return Ok(None) };
            protos.push(l2_normalize(&l2_normalize(&e).mean_dim([0i64].as_slice(), true, Kind::Float)));
        }
        Ok(Some(Tensor::cat(&protos, 0)))
    })?;
    let Some(classifier) = classifier else { return Ok(None) };
    let (img, labels) = features(comm, test, device, dim, |x| model.encode_image(x).expect("CLIP model"));
    let n = test.len();
    let (lo, hi, _) = slice_of(comm, n);
    let mut counts = [0i64; 3];
    if hi > lo {
        let scores = tch::no_grad(|| img.narrow(0, lo as i64, (hi - lo) as i64).matmul(&classifier.tr()));
        counts = hits(&scores, &Tensor::from_slice(&labels[lo..hi]).to_device(device));
    }
    comm.all_reduce_sum(&mut counts);
    Ok(Some([counts[0] as f64 / counts[2].max(1) as f64, counts[1] as f64 / counts[2].max(1) as f64]))
}

/// The caption of each image of `set`: a file's own (CSV, `.txt`, `.json`), or
/// for an image with a label (`labels`, as [`features`] returns them) and none,
/// the class name in template `i mod T` (as CLIP training on class names
/// captions them). No image is read again.
pub fn captions(set: &EvalSet, labels: &[i64], class_names: &[String]) -> Vec<Option<String>> {
    let from_class = |i: usize| {
        let name = usize::try_from(labels[i]).ok().and_then(|l| class_names.get(l))?;
        Some(text::caption(i, name))
    };
    match set {
        EvalSet::Idx(_) => (0..set.len()).map(from_class).collect(),
        EvalSet::Files { source, indices, .. } => {
            indices.iter().enumerate().map(|(i, &k)| source.caption(k).or_else(|| from_class(i))).collect()
        }
    }
}

/// Image↔text retrieval recall@1/5/10 of CLIP embeddings, COCO-style with
/// duplicate texts merged: `img` `[n, D]` and `txt` `[m, D]` L2-normalised
/// (the m distinct captions), `of[i]` the caption of image i (None: left out).
/// Image→text: image i is a hit at k when its caption is among its k most
/// similar texts; text→image: a text is a hit when any of its images is among
/// its k most similar images. Rows are split across ranks, counts all-reduced.
/// Returns `[i2t@1, i2t@5, i2t@10, t2i@1, t2i@5, t2i@10]`.
pub fn retrieval<C: Collective>(comm: &C, img: &Tensor, txt: &Tensor, of: &[Option<usize>]) -> [f64; 6] {
    let device = img.device();
    let ks = [1i64, 5, 10];
    let mut counts = [0i64; 8];
    let (n, m) = (of.len(), txt.size()[0] as usize);
    let (lo, hi, _) = slice_of(comm, n);
    tch::no_grad(|| {
        let rows: Vec<i64> = (lo..hi).filter(|&i| of[i].is_some()).map(|i| i as i64).collect();
        if !rows.is_empty() {
            let sim = img.index_select(0, &Tensor::from_slice(&rows).to_device(device)).matmul(&txt.tr());
            let truth: Vec<i64> = rows.iter().map(|&i| of[i as usize].unwrap() as i64).collect();
            let (_, top) = sim.topk(10.min(m as i64), 1, true, true);
            let hit = top.eq_tensor(&Tensor::from_slice(&truth).to_device(device).unsqueeze(1));
            for (j, &k) in ks.iter().enumerate() {
                let within = hit.narrow(1, 0, k.min(top.size()[1])).any_dim(1, false);
                counts[j] = within.sum(Kind::Int64).int64_value(&[]);
            }
            counts[3] = rows.len() as i64;
        }
        let (tlo, thi, _) = slice_of(comm, m);
        if thi > tlo {
            // positives[t][i]: image i has caption t.
            let mut pos = vec![0f32; (thi - tlo) * n];
            for (i, c) in of.iter().enumerate() {
                if let Some(t) = c.filter(|t| (tlo..thi).contains(t)) {
                    pos[(t - tlo) * n + i] = 1.0;
                }
            }
            let pos = Tensor::from_slice(&pos).view([(thi - tlo) as i64, n as i64]).to_device(device);
            let sim = txt.narrow(0, tlo as i64, (thi - tlo) as i64).matmul(&img.tr());
            let (_, top) = sim.topk(10.min(n as i64), 1, true, true);
            let hit = pos.gather(1, &top, false);
            for (j, &k) in ks.iter().enumerate() {
                let within = hit
                    .narrow(1, 0, k.min(top.size()[1]))
                    .sum_dim_intlist([1i64].as_slice(), false, Kind::Float)
                    .gt(0.0);
                counts[4 + j] = within.sum(Kind::Int64).int64_value(&[]);
            }
            counts[7] =
                pos.sum_dim_intlist([1i64].as_slice(), false, Kind::Float).gt(0.0).sum(Kind::Int64).int64_value(&[]);
        }
    });
    comm.all_reduce_sum(&mut counts);
    let (ni, nt) = (counts[3].max(1) as f64, counts[7].max(1) as f64);
    [
        counts[0] as f64 / ni,
        counts[1] as f64 / ni,
        counts[2] as f64 / ni,
        counts[4] as f64 / nt,
        counts[5] as f64 / nt,
        counts[6] as f64 / nt,
    ]
}

/// Retrieval recall of a CLIP model on the test set (see [`retrieval`]); `None`
/// without a text tower or captions.
#[allow(clippy::too_many_arguments)]
pub fn retrieval_of<C: Collective>(
    comm: &C,
    model: &dyn Method,
    test: &EvalSet,
    class_names: &[String],
    device: Device,
    tokenizer: &Tokenizer,
    context: usize,
    dim: i64,
) -> anyhow::Result<Option<[f64; 6]>> {
    let (img, labels) = features(comm, test, device, dim, |x| model.encode_image(x).expect("CLIP model"));
    let caps = captions(test, &labels, class_names);
    let mut distinct: Vec<String> = caps.iter().flatten().cloned().collect();
    distinct.sort();
    distinct.dedup();
    if distinct.is_empty() {
        return Ok(None);
    }
    let of: Vec<Option<usize>> = caps.iter().map(|c| c.as_ref().and_then(|c| distinct.binary_search(c).ok())).collect();
    let mut texts = Vec::with_capacity(distinct.len());
    for chunk in distinct.chunks(CHUNK) {
        let (mut toks, mut ends) = (Vec::new(), Vec::new());
        for c in chunk {
            let (ids, end) = tokenizer.encode(c, context).map_err(anyhow::Error::msg)?;
            toks.extend(ids);
            ends.push(end as i64);
        }
        let Some(e) = tch::no_grad(|| model.encode_text(&Captions::from_host(&toks, &ends, device))) else {
            return Ok(None);
        };
        texts.push(l2_normalize(&e.to_kind(Kind::Float)));
    }
    Ok(Some(retrieval(comm, &img, &Tensor::cat(&texts, 0), &of)))
}

/// Linear probe: multinomial logistic regression on frozen, L2-normalised
/// features of the memory set, trained full-batch with AdamW (lr 0.01, weight
/// decay 1e-4, `steps` steps; features scaled by √D so logits start near
/// unit scale), top-1 on the test set. Each rank computes the gradient of its
/// slice of the memory rows; the sum is all-reduced, so every rank takes the
/// same steps and holds the same classifier.
pub fn linear_probe<C: Collective>(comm: &C, f: &Features, steps: usize) -> f64 {
    let ((x, y), (xt, yt)) = (&f.train, &f.test);
    let device = x.device();
    let d = x.size()[1];
    let scale = (d as f64).sqrt();
    let labelled: Vec<i64> = (0..y.len() as i64).filter(|&i| y[i as usize] >= 0).collect();
    let n = labelled.len();
    let (lo, hi, _) = slice_of(comm, n);
    let rows = Tensor::from_slice(&labelled[lo..hi]).to_device(device);
    let (xs, ys) = (x.index_select(0, &rows) * scale, Tensor::from_slice(y).to_device(device).index_select(0, &rows));
    let w = Tensor::zeros([d, f.classes], (Kind::Float, device)).set_requires_grad(true);
    let b = Tensor::zeros([f.classes], (Kind::Float, device)).set_requires_grad(true);
    let params = vec![Param::new("w".into(), w.shallow_clone()), Param::new("b".into(), b.shallow_clone())];
    let adamw = OptimizerKind::AdamW { beta1: 0.9, beta2: 0.999, eps: 1e-8 };
    let mut opt = Optimizer::new(adamw, 1e-4, params);
    let engine = contrast_nn::GlobalBatch::new(comm, 1);
    for _ in 0..steps {
        opt.zero_grad();
        let logits = xs.matmul(&w) + &b;
        let loss = logits.cross_entropy_loss::<Tensor>(&ys, None, tch::Reduction::Sum, -100, 0.0) / n.max(1) as f64;
        loss.backward();
        engine.all_reduce_grads(&[w.shallow_clone(), b.shallow_clone()]);
        opt.step(1e-2);
    }
    let (tlo, thi, _) = slice_of(comm, yt.len());
    let mut counts = [0i64; 3];
    if thi > tlo {
        counts = tch::no_grad(|| {
            let scores = (xt.narrow(0, tlo as i64, (thi - tlo) as i64) * scale).matmul(&w) + &b;
            hits(&scores, &Tensor::from_slice(&yt[tlo..thi]).to_device(device))
        });
    }
    comm.all_reduce_sum(&mut counts);
    counts[0] as f64 / counts[2].max(1) as f64
}
