//! Weighted kNN on frozen features (top-1/5, raw pixels as a baseline) and the
//! linear probe (logistic regression on frozen features, gradients all-reduced).

use super::*;
use contrast_comm::Collective;
use contrast_nn::optim::{Optimizer, OptimizerKind, Param};
use tch::{Device, Kind, Tensor};

/// Top-1 and top-5 hits of class scores `[b, classes]` against `truth` (−1: not counted).
pub(super) fn hits(scores: &Tensor, truth: &Tensor) -> [i64; 3] {
    let labelled = truth.ge(0);
    let top1 = scores.argmax(1, false).eq_tensor(truth).logical_and(&labelled);
    let k = scores.size()[1].min(5);
    let (_, top) = scores.topk(k, 1, true, true);
    let top5 = top.eq_tensor(&truth.unsqueeze(1)).any_dim(1, false).logical_and(&labelled);
    let count = |t: &Tensor| t.sum(Kind::Int64).int64_value(&[]);
    [count(&top1), count(&top5), count(&labelled)]
}

/// Weighted kNN top-1 and top-5 accuracy over the labelled test rows. Each
/// rank holds a slice of the memory (`train`, `train_labels`: its rows only;
/// no rank holds the whole memory) and scores every test row against it; the
/// ranks' top k of each test row are all-gathered and merged into the global
/// top k, which votes. Memory rows labelled −1 vote for no class.
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
    let device = test.device();
    let mut total = [train.size()[0] as i64];
    comm.all_reduce_sum(&mut total);
    let k = k.min(total[0]);
    let n = test_labels.len();
    // Column `classes` collects the votes of unlabelled memory rows (and of padding) and never wins.
    let voters: Vec<i64> = train_labels.iter().map(|&l| if l < 0 { classes } else { l }).collect();
    let labels = Tensor::from_slice(&voters).to_device(device);
    let mut counts = [0i64; 3];
    if k == 0 {
        return [0.0, 0.0];
    }
    tch::no_grad(|| {
        for s in (0..n).step_by(500) {
            let e = (s + 500).min(n);
            let (vals, votes) = local_top_k(&test.narrow(0, s as i64, (e - s) as i64), train, &labels, k, classes);
            let (vals, votes) = merge_top_k(comm, &vals, &votes, k);
            let w = (vals / t).exp();
            let scores = Tensor::zeros([(e - s) as i64, classes + 1], (Kind::Float, device)).scatter_add(1, &votes, &w);
            let truth = Tensor::from_slice(&test_labels[s..e]).to_device(device);
            let h = hits(&scores.narrow(1, 0, classes), &truth);
            (0..3).for_each(|j| counts[j] += h[j]);
        }
    });
    // Every rank scored every test row alike: no sum.
    [counts[0] as f64 / counts[2].max(1) as f64, counts[1] as f64 / counts[2].max(1) as f64]
}

/// The k most similar memory rows of this rank for each query `[q, k]` (values
/// and voter labels), padded with −∞ and the no-class column where it holds fewer.
fn local_top_k(queries: &Tensor, memory: &Tensor, labels: &Tensor, k: i64, classes: i64) -> (Tensor, Tensor) {
    let (q, device) = (queries.size()[0], queries.device());
    let kl = k.min(memory.size()[0]);
    let (vals, idx) = match kl {
        0 => (Tensor::zeros([q, 0], (Kind::Float, device)), Tensor::zeros([q, 0], (Kind::Int64, device))),
        _ => queries.matmul(&memory.tr()).topk(kl, 1, true, true),
    };
    let votes = labels.index_select(0, &idx.view([-1])).view([q, kl]);
    let pad = k - kl;
    let vals = Tensor::cat(&[vals, Tensor::full([q, pad], f64::NEG_INFINITY, (Kind::Float, device))], 1);
    let votes = Tensor::cat(&[votes, Tensor::full([q, pad], classes, (Kind::Int64, device))], 1);
    (vals, votes)
}

/// Every rank's top k per query, gathered, and the global top k of them.
fn merge_top_k<C: Collective>(comm: &C, vals: &Tensor, votes: &Tensor, k: i64) -> (Tensor, Tensor) {
    let (q, p, device) = (vals.size()[0], comm.world_size() as i64, vals.device());
    let all_v = comm.all_gather(&contrast_nn::to_host::<f32>(vals));
    let all_l = comm.all_gather(&contrast_nn::to_host::<i64>(votes));
    let all_v = Tensor::from_slice(&all_v).view([p, q, k]).permute([1, 0, 2]).reshape([q, p * k]).to_device(device);
    let all_l = Tensor::from_slice(&all_l).view([p, q, k]).permute([1, 0, 2]).reshape([q, p * k]).to_device(device);
    let (top, pos) = all_v.topk(k, 1, true, true);
    (top, all_l.gather(1, &pos, false))
}

/// Remap the labels of both lists to the distinct labels they hold, in
/// order (−1 stays −1), and return how many there are: evaluation's cost
/// follows the classes present, not the largest label value (a label of 10⁶
/// would otherwise make a vote table of 10⁶ columns per test image).
pub fn remap_labels(a: &mut [i64], b: &mut [i64]) -> i64 {
    let mut seen: Vec<i64> = a.iter().chain(b.iter()).copied().filter(|&l| l >= 0).collect();
    seen.sort_unstable();
    seen.dedup();
    for l in a.iter_mut().chain(b.iter_mut()).filter(|l| **l >= 0) {
        *l = seen.binary_search(l).expect("a label seen") as i64;
    }
    seen.len().max(1) as i64
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
    // The memory stays in slices: only its labels are gathered.
    let (ftrain, ltrain, (lo, hi, per)) = local_features(comm, memory, device, dim, &f);
    let mut all_train = gather_labels(comm, &ltrain, memory.len(), per);
    let (ftest, mut ltest) = features(comm, test, device, dim, &f);
    if !all_train.iter().any(|&l| l >= 0) || !ltest.iter().any(|&l| l >= 0) {
        return None;
    }
    let classes = remap_labels(&mut all_train, &mut ltest);
    let ltrain = all_train[lo..hi].to_vec();
    let acc = knn_top1(comm, &ftrain, &ltrain, &ftest, &ltest, k, t, classes);
    Some((acc, Features { train: (ftrain, ltrain), test: (ftest, ltest), classes }))
}

/// L2-normalised features and labels of this rank's slice of the memory, and
/// of the whole test set.
pub struct Features {
    /// This rank's memory (training) features `[rows, D]` and labels.
    pub train: (Tensor, Vec<i64>),
    /// Test features `[m, D]` and labels.
    pub test: (Tensor, Vec<i64>),
    /// Number of classes.
    pub classes: i64,
}

/// kNN top-1 on raw pixels (normalised inputs, flattened); for sentences, on
/// their bag of words. With `eval.whiten` the inputs are whitened as the
/// features are (fitted on the memory; `eval.whiten_dim` capped at the input's size).
pub fn raw_pixels_knn<C: Collective>(
    comm: &C,
    cfg: &contrast_config::EvalConfig,
    memory: &EvalSet,
    test: &EvalSet,
    device: Device,
) -> anyhow::Result<Option<f64>> {
    if let (Some(memory), Some(test)) = (memory.bag_of_words(), test.bag_of_words()) {
        return raw_pixels_knn(comm, cfg, &memory, &test, device);
    }
    let dim = memory.pixels() as i64;
    let cfg = contrast_config::EvalConfig { whiten_dim: cfg.whiten_dim.min(dim as usize), ..cfg.clone() };
    let flat = |x: &Tensor| x.flatten(1, -1);
    let w = whitening_of(comm, &cfg, memory, device, dim, flat)?;
    let out_dim = w.as_ref().map_or(dim, |w| w.1);
    let f = |x: &Tensor| match &w {
        Some((w, _)) => w.apply(&flat(x)),
        None => flat(x),
    };
    Ok(knn_of(comm, memory, test, device, out_dim, cfg.knn_k, cfg.knn_t, f).map(|(acc, _)| acc[0]))
}

/// Linear probe: multinomial logistic regression on frozen, L2-normalised
/// features of the memory set, trained full-batch with AdamW (lr 0.01, weight
/// decay 1e-4, `steps` steps; features scaled by √D so logits start near
/// unit scale), top-1 on the test set. Each rank computes the gradient of its
/// slice of the memory rows; the sum is all-reduced, so every rank takes the
/// same steps and holds the same classifier.
pub fn linear_probe<C: Collective>(comm: &C, f: &Features, steps: usize) -> f64 {
    let ((x, y), (xt, yt)) = (&f.train, &f.test);
    let device = xt.device();
    let d = xt.size()[1];
    let scale = (d as f64).sqrt();
    // This rank's labelled memory rows; the loss divides by the labelled rows of every rank.
    let labelled: Vec<i64> = (0..y.len() as i64).filter(|&i| y[i as usize] >= 0).collect();
    let mut count = [labelled.len() as i64];
    comm.all_reduce_sum(&mut count);
    let n = count[0] as usize;
    let rows = Tensor::from_slice(&labelled).to_device(device);
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
