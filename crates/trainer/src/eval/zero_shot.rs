//! CLIP zero-shot classification from class-name prompts, and image↔text
//! retrieval recall@1/5/10 (duplicate captions merged).

use super::*;
use contrast_comm::Collective;
use contrast_data::text::{self, Tokenizer};
use contrast_nn::encoder::text::Captions;
use contrast_nn::loss::l2_normalize;
use contrast_nn::Method;
use tch::{Device, Kind, Tensor};

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
        // Sentences are their own captions (no image–text method trains on them).
        EvalSet::Lines(s) | EvalSet::Words(s) => s.indices.iter().map(|&k| Some(s.corpus.texts[k].clone())).collect(),
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
