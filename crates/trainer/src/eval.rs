//! Evaluation: weighted kNN on backbone features, and CLIP zero-shot.
//!
//! kNN follows instance discrimination (Wu et al. 2018) and the usual SSL
//! monitors: L2-normalised features, cosine similarity, the k nearest training
//! images vote for their class with weight exp(sim / t); top-1 accuracy on the
//! test split. Work is split over the ranks (features by slices of images,
//! kNN by slices of the test set) and joined with collectives, so no rank idles.

use contrast_comm::Collective;
use contrast_data::idx::{Images, FASHION_MNIST_MEAN_STD};
use contrast_data::text;
use contrast_nn::loss::l2_normalize;
use contrast_nn::model::Model;
use tch::{Device, Kind, Tensor};

/// Images per forward pass during evaluation.
const CHUNK: usize = 1000;

/// Normalised input tensor `[n, 1, H, W]` of images `start..end`.
pub fn image_tensor(images: &Images, start: usize, end: usize, device: Device) -> Tensor {
    let (m, s) = FASHION_MNIST_MEAN_STD;
    let pix = images.height * images.width;
    let data: Vec<f32> = images.pixels[start * pix..end * pix].iter().map(|&v| (v as f32 / 255.0 - m) / s).collect();
    Tensor::from_slice(&data)
        .view([(end - start) as i64, 1, images.height as i64, images.width as i64])
        .to_device(device)
}

/// Rows `[lo, hi)` of `n` that rank r handles when n is split in P near-equal slices.
fn slice_of<C: Collective>(comm: &C, n: usize) -> (usize, usize, usize) {
    let per = n.div_ceil(comm.world_size());
    let lo = (comm.rank() * per).min(n);
    (lo, (lo + per).min(n), per)
}

/// Features of every image, computed in slices across ranks and all-gathered;
/// `f` maps an input batch to `[b, D]`. Returns L2-normalised `[n, D]` on `device`.
pub fn features<C: Collective>(
    comm: &C,
    images: &Images,
    device: Device,
    dim: i64,
    f: impl Fn(&Tensor) -> Tensor,
) -> Tensor {
    let n = images.len();
    let (lo, hi, per) = slice_of(comm, n);
    let mut parts = Vec::new();
    tch::no_grad(|| {
        let mut s = lo;
        while s < hi {
            let e = (s + CHUNK).min(hi);
            parts.push(l2_normalize(&f(&image_tensor(images, s, e, device)).to_kind(Kind::Float)));
            s = e;
        }
    });
    let mut local =
        if parts.is_empty() { Tensor::zeros([0, dim], (Kind::Float, device)) } else { Tensor::cat(&parts, 0) };
    let pad = per - (hi - lo);
    if pad > 0 {
        local = Tensor::cat(&[local, Tensor::zeros([pad as i64, dim], (Kind::Float, device))], 0);
    }
    let all = comm.all_gather(&contrast_nn::to_host::<f32>(&local));
    let mut rows = Vec::with_capacity(n * dim as usize);
    for r in 0..comm.world_size() {
        let lo = (r * per).min(n);
        let hi = (lo + per).min(n);
        let base = r * per * dim as usize;
        rows.extend_from_slice(&all[base..base + (hi - lo) * dim as usize]);
    }
    Tensor::from_slice(&rows).view([n as i64, dim]).to_device(device)
}

/// Weighted kNN top-1 accuracy; each rank scores a slice of the test set.
pub fn knn_top1<C: Collective>(
    comm: &C,
    train: &Tensor,
    train_labels: &[u8],
    test: &Tensor,
    test_labels: &[u8],
    k: i64,
    t: f64,
    classes: i64,
) -> f64 {
    let device = train.device();
    let n = test_labels.len();
    let (lo, hi, _) = slice_of(comm, n);
    let labels = Tensor::from_slice(&train_labels.iter().map(|&l| l as i64).collect::<Vec<_>>()).to_device(device);
    let k = k.min(train.size()[0]);
    let mut correct = 0i64;
    tch::no_grad(|| {
        let mut s = lo;
        while s < hi {
            let e = (s + 500).min(hi);
            let sim = test.narrow(0, s as i64, (e - s) as i64).matmul(&train.tr());
            let (vals, idx) = sim.topk(k, 1, true, true);
            let votes = labels.index_select(0, &idx.view([-1])).view([(e - s) as i64, k]);
            let w = (vals / t).exp();
            let scores = Tensor::zeros([(e - s) as i64, classes], (Kind::Float, device)).scatter_add(1, &votes, &w);
            let pred = scores.argmax(1, false);
            let truth =
                Tensor::from_slice(&test_labels[s..e].iter().map(|&l| l as i64).collect::<Vec<_>>()).to_device(device);
            correct += pred.eq_tensor(&truth).sum(Kind::Int64).int64_value(&[]);
            s = e;
        }
    });
    let mut c = [correct];
    comm.all_reduce_sum(&mut c);
    c[0] as f64 / n as f64
}

/// kNN top-1 of a feature extractor.
pub fn knn_of<C: Collective>(
    comm: &C,
    train: &Images,
    test: &Images,
    device: Device,
    dim: i64,
    k: i64,
    t: f64,
    f: impl Fn(&Tensor) -> Tensor,
) -> f64 {
    let ftrain = features(comm, train, device, dim, &f);
    let ftest = features(comm, test, device, dim, &f);
    knn_top1(comm, &ftrain, &train.labels, &ftest, &test.labels, k, t, 10)
}

/// kNN top-1 on raw pixels (normalised inputs, flattened).
pub fn raw_pixels_knn<C: Collective>(comm: &C, train: &Images, test: &Images, device: Device, k: i64, t: f64) -> f64 {
    let dim = (train.height * train.width) as i64;
    knn_of(comm, train, test, device, dim, k, t, |x| x.flatten(1, -1))
}

/// Zero-shot top-1 of a CLIP model: each class is the mean of its normalised
/// prompt embeddings over all templates; an image takes the most similar class.
pub fn zero_shot_top1<C: Collective>(
    comm: &C,
    model: &Model,
    test: &Images,
    device: Device,
    class_names: &[&str],
    context: usize,
    dim: i64,
) -> Option<f64> {
    let classifier = tch::no_grad(|| -> Option<Tensor> {
        let protos: Vec<Tensor> = class_names
            .iter()
            .map(|name| {
                let toks: Vec<i64> =
                    (0..text::TEMPLATES.len()).flat_map(|t| text::tokenize(&text::caption(t, name), context)).collect();
                let toks =
                    Tensor::from_slice(&toks).view([text::TEMPLATES.len() as i64, context as i64]).to_device(device);
                model
                    .encode_text(&toks)
                    .map(|e| l2_normalize(&l2_normalize(&e).mean_dim([0i64].as_slice(), true, Kind::Float)))
            })
            .collect::<Option<Vec<_>>>()?;
        Some(Tensor::cat(&protos, 0))
    })?;
    let img = features(comm, test, device, dim, |x| model.encode_image(x).expect("CLIP model"));
    let n = test.len();
    let (lo, hi, _) = slice_of(comm, n);
    let mut correct = 0i64;
    if hi > lo {
        let pred =
            tch::no_grad(|| img.narrow(0, lo as i64, (hi - lo) as i64).matmul(&classifier.tr()).argmax(1, false));
        let truth =
            Tensor::from_slice(&test.labels[lo..hi].iter().map(|&l| l as i64).collect::<Vec<_>>()).to_device(device);
        correct = pred.eq_tensor(&truth).sum(Kind::Int64).int64_value(&[]);
    }
    let mut c = [correct];
    comm.all_reduce_sum(&mut c);
    Some(c[0] as f64 / n as f64)
}
