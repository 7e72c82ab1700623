//! The streaming loss heads (loss/stream.rs) against their materialised
//! reference forms: the same loss and the same gradient of every input
//! (embeddings, logit scale, bias) in f64, for every rank of a layout and
//! for block sizes that do and do not divide the anchor rows.

use crate::common::*;
use contrast_nn::loss::{
    clip_dense_share, clip_share_blocked, dcl_dense_share, dcl_share_blocked, debiased_dense_share,
    debiased_share_blocked, multi_positive_blocked, multi_positive_dense, nce_dense_share, nce_share_blocked,
    ntxent_dense_share, ntxent_share_blocked, siglip_dense_share, siglip_share_blocked, Ctx, GlobalSum, Reduce, Shard,
};
use tch::{Kind, Tensor};

/// Loss and the gradient of every leaf in `leaves`, from `f`.
fn value_and_grads(leaves: &[Tensor], f: impl Fn(&[Tensor]) -> Tensor) -> (f64, Vec<Vec<f64>>) {
    let xs: Vec<Tensor> = leaves.iter().map(|x| x.detach().set_requires_grad(true)).collect();
    let loss = f(&xs);
    loss.backward();
    (loss.double_value(&[]), xs.iter().map(|x| contrast_nn::to_host::<f64>(&x.grad().reshape([-1]))).collect())
}

/// Assert the two forms agree to `tol` (relative) on the value and every gradient.
fn agree(what: &str, stream: (f64, Vec<Vec<f64>>), dense: (f64, Vec<Vec<f64>>), tol: f64) {
    let scale = dense.0.abs().max(1e-12);
    assert!((stream.0 - dense.0).abs() / scale <= tol, "{what}: loss {} against {}", stream.0, dense.0);
    for (k, (s, d)) in stream.1.iter().zip(&dense.1).enumerate() {
        let e = rel_err(s, d);
        assert!(e <= tol, "{what}: gradient of input {k} off by {e:.2e}");
    }
}

/// Every rank of a 3-rank layout, with blocks of 1, 5 (not dividing 2B = 8) and the default.
fn layouts() -> Vec<(Shard, i64)> {
    let mut out = vec![(Shard::solo(12), 0), (Shard::solo(12), 7)];
    for rank in 0..3 {
        for rows in [1, 5, 0] {
            out.push((Shard { rank, world_size: 3, local_batch: 4 }, rows));
        }
    }
    out
}

#[test]
fn streamed_ntxent_matches_the_materialised_form_in_value_and_gradient() {
    let inputs = [randn(12, 6, 1) * 2.0, randn(12, 6, 2)];
    for (shard, rows) in layouts() {
        let s = value_and_grads(&inputs, |x| ntxent_share_blocked(&x[0], &x[1], 0.2, shard, rows).unwrap());
        let d = value_and_grads(&inputs, |x| ntxent_dense_share(&x[0], &x[1], 0.2, shard).unwrap());
        agree(&format!("NT-Xent {shard:?} rows={rows}"), s, d, 1e-10);
    }
}

#[test]
fn streamed_dcl_and_dclw_match_the_materialised_form() {
    let inputs = [randn(12, 6, 9), randn(12, 6, 10) * 3.0];
    for sigma in [None, Some(0.5)] {
        for (shard, rows) in layouts() {
            let s = value_and_grads(&inputs, |x| dcl_share_blocked(&x[0], &x[1], 0.1, sigma, shard, rows).unwrap());
            let d = value_and_grads(&inputs, |x| dcl_dense_share(&x[0], &x[1], 0.1, sigma, shard).unwrap());
            agree(&format!("DCL sigma={sigma:?} {shard:?} rows={rows}"), s, d, 1e-10);
        }
    }
}

#[test]
fn streamed_debiased_and_hard_negative_losses_match_the_materialised_form() {
    // τ⁺ = 0.1 with β = 0 (debiased) and β = 1 (hard negatives); τ⁺ = 0.9 clamps
    // N_g for some anchors, whose negatives then get no gradient.
    let inputs = [randn(12, 6, 14) * 2.0, randn(12, 6, 15)];
    for (tau, beta) in [(0.1, 0.0), (0.1, 1.0), (0.9, 0.0), (0.5, 0.5)] {
        for (shard, rows) in layouts() {
            let s = value_and_grads(&inputs, |x| {
                debiased_share_blocked(&x[0], &x[1], (0.5, tau, beta), shard, rows).unwrap()
            });
            let d = value_and_grads(&inputs, |x| debiased_dense_share(&x[0], &x[1], 0.5, tau, beta, shard).unwrap());
            agree(&format!("debiased τ⁺={tau} β={beta} {shard:?} rows={rows}"), s, d, 1e-10);
        }
    }
}

#[test]
fn streamed_nce_matches_the_materialised_form() {
    let inputs = [randn(12, 6, 12), randn(12, 6, 13)];
    for (shard, rows) in layouts() {
        let s = value_and_grads(&inputs, |x| nce_share_blocked(&x[0], &x[1], (0.2, 6000.0), shard, rows).unwrap());
        let d = value_and_grads(&inputs, |x| nce_dense_share(&x[0], &x[1], 0.2, 6000.0, shard).unwrap());
        agree(&format!("NCE {shard:?} rows={rows}"), s, d, 1e-10);
    }
}

#[test]
fn streamed_clip_matches_the_materialised_form_with_the_logit_scale_gradient() {
    let inputs = [randn(12, 5, 3), randn(12, 5, 4) * 0.5, Tensor::from(2.3f64)];
    for (shard, rows) in layouts() {
        let s = value_and_grads(&inputs, |x| clip_share_blocked(&x[0], &x[1], &x[2], shard, rows).unwrap());
        let d = value_and_grads(&inputs, |x| clip_dense_share(&x[0], &x[1], &x[2], shard).unwrap());
        agree(&format!("CLIP {shard:?} rows={rows}"), s, d, 1e-10);
    }
}

#[test]
fn streamed_siglip_matches_the_materialised_form_with_scale_and_bias_gradients() {
    let inputs = [randn(12, 5, 5), randn(12, 5, 6), Tensor::from(10f64.ln()), Tensor::from(-3.0f64)];
    for (shard, rows) in layouts() {
        let s = value_and_grads(&inputs, |x| siglip_share_blocked(&x[0], &x[1], (&x[2], &x[3]), shard, rows).unwrap());
        let d = value_and_grads(&inputs, |x| siglip_dense_share(&x[0], &x[1], &x[2], &x[3], shard).unwrap());
        agree(&format!("SigLIP {shard:?} rows={rows}"), s, d, 1e-10);
    }
}

#[test]
fn streamed_heads_in_f32_agree_and_need_no_graph_without_gradients() {
    let (a, b) = (randn(64, 16, 7).to_kind(Kind::Float), randn(64, 16, 8).to_kind(Kind::Float));
    let shard = Shard { rank: 1, world_size: 2, local_batch: 32 };
    let s = value_and_grads(&[a.shallow_clone(), b.shallow_clone()], |x| {
        ntxent_share_blocked(&x[0], &x[1], 0.1, shard, 24).unwrap()
    });
    let d = value_and_grads(&[a.shallow_clone(), b.shallow_clone()], |x| {
        ntxent_dense_share(&x[0], &x[1], 0.1, shard).unwrap()
    });
    agree("NT-Xent f32", s, d, 1e-4);
    // Without a graph (evaluation), the value alone, equal to the reference.
    let plain = ntxent_share_blocked(&a, &b, 0.1, shard, 24).unwrap();
    assert!(!plain.requires_grad());
    let want = ntxent_dense_share(&a, &b, 0.1, shard).unwrap().double_value(&[]);
    assert!((plain.double_value(&[]) - want).abs() <= 1e-4 * want.abs());
}

/// A communicator of one rank that pretends to be rank `shard.rank` of a larger
/// layout: the global counts of AvgNonZero are this rank's only, the same in both forms.
struct OneOf;

impl GlobalSum for OneOf {
    fn sum(&self, _v: &mut [f64]) {}
    fn max(&self, _v: &mut [f64]) {}
    fn gather_rows(&self, local: &Tensor) -> Tensor {
        local.shallow_clone()
    }
}

#[test]
fn streamed_supcon_and_multi_positive_ntxent_match_the_materialised_form() {
    // Three views of 12 samples; ids: SupCon's labels (4 classes, one class alone in
    // one view so some anchors have few positives) and the multi-positive sample ids.
    let z = randn(36, 6, 11);
    let labels: Vec<i64> = (0..36).map(|i| [0, 1, 2, 1, 3, 0][i % 6]).collect();
    let samples: Vec<i64> = (0..36).map(|i| i % 12).collect();
    for (ids, reduce) in [(&labels, Reduce::AvgNonZero), (&samples, Reduce::Mean)] {
        let ids = Tensor::from_slice(ids);
        for (shard, rows) in layouts() {
            let ctx = Ctx { shard, reduce: &OneOf };
            let how = (3, reduce);
            let s = value_and_grads(&[z.shallow_clone()], |x| {
                multi_positive_blocked(&x[0], &ids, 0.1, &ctx, how, rows).unwrap()
            });
            let d = value_and_grads(&[z.shallow_clone()], |x| {
                multi_positive_dense(&x[0], &ids, 0.1, &ctx, 3, reduce).unwrap()
            });
            agree(&format!("multi-positive {reduce:?} {shard:?} rows={rows}"), s, d, 1e-10);
        }
    }
    // No positives anywhere: a zero loss whose (zero) gradient still reaches the input.
    let ids = Tensor::arange(36, (Kind::Int64, tch::Device::Cpu));
    let ctx = Ctx { shard: Shard::solo(12), reduce: &OneOf };
    let (loss, grads) = value_and_grads(&[z.shallow_clone()], |x| {
        multi_positive_blocked(&x[0], &ids, 0.1, &ctx, (3, Reduce::AvgNonZero), 0).unwrap()
    });
    assert_eq!(loss, 0.0);
    assert!(grads[0].iter().all(|g| *g == 0.0));
}
