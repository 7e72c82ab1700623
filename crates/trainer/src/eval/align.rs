//! Alignment and uniformity (Wang & Isola 2020) of the backbone features under
//! two draws of the training augmentation; for sentences, over pairs of
//! adjacent sentences of one group (a quote's consecutive sentences).

use super::*;
use contrast_comm::Collective;
use contrast_data::rgb::{decode, RgbAugmenter};
use tch::{Device, Kind, Tensor};

/// Test images alignment and uniformity use (the first ones).
pub const ALIGN_IMAGES: usize = 2048;

/// View `k` of images `start..end` under the training augmentation, from the
/// stream (seed, 0, image, view k); a row that cannot be read is zero and flagged false.
pub(super) fn view_batch(
    set: &EvalSet,
    aug: &ViewAug,
    k: usize,
    start: usize,
    end: usize,
    seed: u64,
) -> (Vec<f32>, Vec<bool>) {
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
    if let (EvalSet::Lines(lines) | EvalSet::Words(lines), ViewAug::Adjacent) = (set, aug) {
        let pairs = lines.pairs(ALIGN_IMAGES);
        let view = |k: usize| {
            features_with(comm, pairs.len(), device, dim, &f, |s, e| {
                let sentences: Vec<usize> = pairs[s..e].iter().map(|&i| i + k).collect();
                match set {
                    EvalSet::Words(_) => lines.words_of(&sentences, device),
                    _ => lines.tokens_of(&sentences, device),
                }
            })
        };
        return keep_both(comm, pairs.len(), &[view(0), view(1)], device);
    }
    let m = set.len().min(ALIGN_IMAGES);
    let (c, h, w) = set.shape();
    let views: Vec<(Tensor, Vec<i64>)> = (0..2)
        .map(|k| {
            features_with(comm, m, device, dim, &f, |s, e| {
                let (data, ok) = view_batch(set, aug, k, s, e, seed);
                let x = Tensor::from_slice(&data).view([(e - s) as i64, c, h, w]).to_device(device);
                (x, ok.iter().map(|&g| if g { 0 } else { UNREADABLE }).collect())
            })
        })
        .collect();
    keep_both(comm, m, &views, device)
}

/// Alignment and uniformity of the bag of words of a sentence set over its
/// adjacent pairs (None for images).
pub fn bag_of_words_alignment<C: Collective>(comm: &C, set: &EvalSet, device: Device) -> Option<(f64, f64)> {
    let words = set.bag_of_words()?;
    Some(alignment_uniformity_of(comm, &words, &ViewAug::Adjacent, device, BOW_DIM as i64, 0, |x| x.shallow_clone()))
}

/// Alignment and uniformity of the `m` rows both views could read.
fn keep_both<C: Collective>(comm: &C, m: usize, views: &[(Tensor, Vec<i64>)], device: Device) -> (f64, f64) {
    let keep: Vec<i64> = (0..m as i64).filter(|&i| views.iter().all(|v| v.1[i as usize] != UNREADABLE)).collect();
    let rows = Tensor::from_slice(&keep).to_device(device);
    alignment_uniformity(comm, &views[0].0.index_select(0, &rows), &views[1].0.index_select(0, &rows))
}
