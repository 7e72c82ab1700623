//! Loss references: closed forms, slow loops, finite differences (all in f64).

use crate::common::*;
use contrast_nn::loss::{clip_share, l2_normalize, ntxent_share, Shard};
use tch::{Kind, Tensor};

fn unit(v: &[f64]) -> Vec<f64> {
    let n = v.iter().map(|x| x * x).sum::<f64>().sqrt().max(1e-12);
    v.iter().map(|x| x / n).collect()
}

fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// NT-Xent written as the SimCLR paper's equation (1) with plain loops:
/// ℓ(i,j) = −log exp(s_ij/τ) / Σ_{k≠i} exp(s_ik/τ), averaged over all 2N anchors
/// (Chen et al. 2020, Algorithm 1; lightly `tests/loss/test_ntx_ent_loss.py` slow reference).
fn ntxent_loop(za: &Tensor, zb: &Tensor, t: f64) -> f64 {
    let mut z: Vec<Vec<f64>> = rows(za).iter().map(|r| unit(r)).collect();
    let n = z.len();
    z.extend(rows(zb).iter().map(|r| unit(r)));
    let mut total = 0.0;
    for i in 0..2 * n {
        let pos = (i + n) % (2 * n);
        let denom: f64 = (0..2 * n).filter(|&k| k != i).map(|k| (dot(&z[i], &z[k]) / t).exp()).sum();
        total += -((dot(&z[i], &z[pos]) / t).exp() / denom).ln();
    }
    total / (2 * n) as f64
}

/// CLIP's loss as in the paper's pseudo-code and open_clip `ClipLoss` (world size 1):
/// logits = exp(s)·I·Tᵀ, loss = (CE(logits, arange) + CE(logitsᵀ, arange)) / 2.
fn clip_loop(img: &Tensor, txt: &Tensor, log_scale: f64) -> f64 {
    let i: Vec<Vec<f64>> = rows(img).iter().map(|r| unit(r)).collect();
    let t: Vec<Vec<f64>> = rows(txt).iter().map(|r| unit(r)).collect();
    let n = i.len();
    let s = log_scale.exp();
    let l = |a: usize, b: usize| s * dot(&i[a], &t[b]);
    let mut ce_i = 0.0;
    let mut ce_t = 0.0;
    for a in 0..n {
        ce_i += -(l(a, a) - (0..n).map(|b| l(a, b).exp()).sum::<f64>().ln());
        ce_t += -(l(a, a) - (0..n).map(|b| l(b, a).exp()).sum::<f64>().ln());
    }
    (ce_i / n as f64 + ce_t / n as f64) / 2.0
}

#[test]
fn ntxent_equals_log_2n_minus_1_when_all_embeddings_are_equal() {
    // Closed form (lightly's test): every logit is 1/τ, so ℓ = log(2N−1).
    for n in [1usize, 15, 16, 17] {
        let z = Tensor::ones([n as i64, 8], (Kind::Double, tch::Device::Cpu));
        let l = ntxent_share(&z, &z, 0.1, Shard::solo(n)).unwrap().double_value(&[]);
        assert!((l - ((2 * n - 1) as f64).ln()).abs() < 1e-9, "n={n}: {l}");
    }
}

#[test]
fn ntxent_matches_loop_reference() {
    for (n, d, t) in [(4usize, 3usize, 0.5), (7, 5, 0.1), (16, 8, 0.07), (1, 4, 1.0)] {
        let (za, zb) = (randn(n, d, 1), randn(n, d, 2));
        let got = ntxent_share(&za, &zb, t, Shard::solo(n)).unwrap().double_value(&[]);
        let want = ntxent_loop(&za, &zb, t);
        assert!((got - want).abs() < 1e-10 * want.abs().max(1.0), "n={n}: {got} vs {want}");
    }
}

#[test]
fn ntxent_shares_sum_to_the_loss() {
    let (za, zb) = (randn(12, 4, 3), randn(12, 4, 4));
    let whole = ntxent_share(&za, &zb, 0.2, Shard::solo(12)).unwrap().double_value(&[]);
    let sum: f64 = (0..3)
        .map(|r| {
            ntxent_share(&za, &zb, 0.2, Shard { rank: r, world_size: 3, local_batch: 4 }).unwrap().double_value(&[])
        })
        .sum();
    assert!((whole - sum).abs() < 1e-12);
}

#[test]
fn ntxent_gradient_matches_finite_differences() {
    let (za, zb) = (randn(5, 3, 5), randn(5, 3, 6));
    let f = |a: &Tensor| ntxent_share(a, &zb, 0.3, Shard::solo(5)).unwrap();
    let ag = autograd(&za, f);
    let fd = finite_diff(&za, |a| f(a).double_value(&[]), 1e-6);
    assert!(rel_err(&ag, &fd) < 1e-7, "{ag:?} vs {fd:?}");
}

#[test]
fn clip_matches_loop_reference() {
    for (n, d, s) in [(4usize, 3usize, (1.0f64 / 0.07).ln()), (9, 6, 0.0), (1, 2, 2.0), (17, 8, 100f64.ln())] {
        let (img, txt) = (randn(n, d, 7), randn(n, d, 8));
        let scale = Tensor::from(s).to_kind(Kind::Double);
        let got = clip_share(&img, &txt, &scale, Shard::solo(n)).unwrap().double_value(&[]);
        let want = clip_loop(&img, &txt, s);
        assert!((got - want).abs() < 1e-10 * want.abs().max(1.0), "n={n}: {got} vs {want}");
    }
}

#[test]
fn clip_gradients_match_finite_differences_including_logit_scale() {
    let (img, txt) = (randn(6, 4, 9), randn(6, 4, 10));
    let s0 = 1.3f64;
    let scale = Tensor::from(s0).to_kind(Kind::Double);
    let fi = |x: &Tensor| clip_share(x, &txt, &scale, Shard::solo(6)).unwrap();
    let ag = autograd(&img, fi);
    let fd = finite_diff(&img, |x| fi(x).double_value(&[]), 1e-6);
    assert!(rel_err(&ag, &fd) < 1e-7);
    let ft = |x: &Tensor| clip_share(&img, x, &scale, Shard::solo(6)).unwrap();
    assert!(rel_err(&autograd(&txt, ft), &finite_diff(&txt, |x| ft(x).double_value(&[]), 1e-6)) < 1e-7);
    let s = Tensor::from(s0).to_kind(Kind::Double).set_requires_grad(true);
    clip_share(&img, &txt, &s, Shard::solo(6)).unwrap().backward();
    let g = s.grad().double_value(&[]);
    let h = 1e-6;
    let fd = (clip_loop(&img, &txt, s0 + h) - clip_loop(&img, &txt, s0 - h)) / (2.0 * h);
    assert!((g - fd).abs() < 1e-7 * fd.abs().max(1.0), "{g} vs {fd}");
}

#[test]
fn losses_stay_finite_at_extremes() {
    // Norm 0 and 1e4 embeddings, temperature 0.01, a batch of one.
    for scale in [0.0, 1e4] {
        let z = randn(4, 3, 11) * scale;
        let za = z.set_requires_grad(true);
        let l = ntxent_share(&za, &(randn(4, 3, 12) * scale), 0.01, Shard::solo(4)).unwrap();
        l.backward();
        assert!(l.double_value(&[]).is_finite());
        assert!(contrast_nn::to_host::<f64>(&za.grad()).iter().all(|v| v.is_finite()));
        let c = clip_share(&z, &(randn(4, 3, 13) * scale), &Tensor::from(100f64.ln()), Shard::solo(4)).unwrap();
        assert!(c.double_value(&[]).is_finite());
    }
    let n0 = l2_normalize(&Tensor::zeros([2, 3], (Kind::Double, tch::Device::Cpu)));
    assert!(contrast_nn::to_host::<f64>(&n0).iter().all(|v| *v == 0.0));
}

#[test]
fn bad_parameters_and_shapes_are_errors() {
    let z = randn(4, 3, 1);
    let err = ntxent_share(&z, &z, 0.0, Shard::solo(4)).unwrap_err().to_string();
    assert!(err.contains("temperature"), "{err}");
    let err = ntxent_share(&z, &randn(3, 3, 1), 0.1, Shard::solo(4)).unwrap_err().to_string();
    assert!(err.contains("[4, 3]") && err.contains("[3, 3]"), "{err}");
    let err = clip_share(&z, &randn(4, 2, 1), &Tensor::from(0.0), Shard::solo(4)).unwrap_err().to_string();
    assert!(err.contains("text [4, 2]"), "{err}");
}
