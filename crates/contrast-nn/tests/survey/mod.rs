//! The survey's losses beyond NT-Xent and CLIP: slow loop references (f64),
//! closed forms, finite differences, and P-rank parity through the engine with
//! an identity "encoder" (leaf embeddings per rank), so the gradient that would
//! reach the encoder and every head parameter is compared directly.

use crate::common::*;
use contrast_nn::loss::*;
use tch::{Kind, Tensor};

mod metric;
mod parity;
mod soft;

use metric::labels9;
use parity::parity;
use soft::mix;

fn unit(v: &[f64]) -> Vec<f64> {
    let n = v.iter().map(|x| x * x).sum::<f64>().sqrt().max(1e-12);
    v.iter().map(|x| x / n).collect()
}

fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

fn units(t: &Tensor) -> Vec<Vec<f64>> {
    rows(t).iter().map(|r| unit(r)).collect()
}

fn lse(v: impl Iterator<Item = f64>) -> f64 {
    let v: Vec<f64> = v.collect();
    let m = v.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    m + v.iter().map(|x| (x - m).exp()).sum::<f64>().ln()
}

fn scalar(x: f64) -> Tensor {
    Tensor::from(x).to_kind(Kind::Double)
}

fn close(got: f64, want: f64, what: &str) {
    assert!((got - want).abs() <= 1e-10 * want.abs().max(1.0), "{what}: {got} vs {want}");
}

// ---------- slow references ----------

/// SupCon exactly as pytorch-metric-learning `SupConLoss` + `AvgNonZeroReducer`
/// (losses/supcon_loss.py): per anchor −Σ_p log_softmax / |P|, denominator over all j ≠ i.
fn supcon_loop(views: &[Tensor], labels: &[i64], t: f64, mean_over_all: bool) -> f64 {
    let z: Vec<Vec<f64>> = views.iter().flat_map(units).collect();
    let m = z.len();
    let n = labels.len();
    let lab = |i: usize| labels[i % n];
    let (mut total, mut nonzero) = (0.0, 0usize);
    for i in 0..m {
        let denom = lse((0..m).filter(|&k| k != i).map(|k| dot(&z[i], &z[k]) / t));
        let pos: Vec<usize> = (0..m).filter(|&p| p != i && lab(p) == lab(i)).collect();
        if pos.is_empty() {
            continue;
        }
        let l = -pos.iter().map(|&p| dot(&z[i], &z[p]) / t - denom).sum::<f64>() / pos.len() as f64;
        total += l;
        if l > 0.0 {
            nonzero += 1;
        }
    }
    if mean_over_all {
        total / m as f64
    } else {
        total / nonzero.max(1) as f64
    }
}

/// open_clip `SigLipLoss` (loss.py): −Σ logsigmoid(labels · (s·I·Tᵀ + b)) / N.
fn siglip_loop(img: &Tensor, txt: &Tensor, s: f64, b: f64) -> f64 {
    let (i, t) = (units(img), units(txt));
    let n = i.len();
    let mut total = 0.0;
    for a in 0..n {
        for c in 0..n {
            let y = if a == c { 1.0 } else { -1.0 };
            let l = s.exp() * dot(&i[a], &t[c]) + b;
            total += (1.0 + (-y * l).exp()).ln();
        }
    }
    total / n as f64
}

/// lightly `DCLLoss`/`DCLWLoss` (loss/dcl_loss.py): ½(ℓ(A,B) + ℓ(B,A)).
fn dcl_loop(za: &Tensor, zb: &Tensor, t: f64, sigma: Option<f64>) -> f64 {
    let (a, b) = (units(za), units(zb));
    let n = a.len();
    let w: Vec<f64> = match sigma {
        None => vec![1.0; n],
        Some(sg) => {
            let s: Vec<f64> = (0..n).map(|i| dot(&a[i], &b[i]) / sg).collect();
            let z = lse(s.iter().cloned());
            s.iter().map(|x| 2.0 - n as f64 * (x - z).exp()).collect()
        }
    };
    let one = |x: &Vec<Vec<f64>>, y: &Vec<Vec<f64>>| {
        (0..n)
            .map(|i| {
                let negs = (0..n)
                    .filter(|&k| k != i)
                    .map(|k| dot(&x[i], &x[k]) / t)
                    .chain((0..n).filter(|&k| k != i).map(|k| dot(&x[i], &y[k]) / t));
                -w[i] * dot(&x[i], &y[i]) / t + lse(negs)
            })
            .sum::<f64>()
            / n as f64
    };
    0.5 * (one(&a, &b) + one(&b, &a))
}

/// The authors' debiased / hard-negative estimator (Chuang et al. `main.py`;
/// Robinson et al. `main.py`), written with plain exponentials.
fn debiased_loop(za: &Tensor, zb: &Tensor, t: f64, tau: f64, beta: f64) -> f64 {
    let mut z = units(za);
    let n = z.len();
    z.extend(units(zb));
    let m = (2 * n - 2) as f64;
    (0..2 * n)
        .map(|i| {
            let p = (i + n) % (2 * n);
            let pos = (dot(&z[i], &z[p]) / t).exp();
            let neg: Vec<f64> =
                (0..2 * n).filter(|&k| k != i && k != p).map(|k| (dot(&z[i], &z[k]) / t).exp()).collect();
            let imp: Vec<f64> = neg.iter().map(|v| v.powf(beta)).collect();
            let re = neg.iter().zip(&imp).map(|(a, b)| a * b).sum::<f64>() / (imp.iter().sum::<f64>() / m);
            let ng = ((re - tau * m * pos) / (1.0 - tau)).max(m * (-1.0 / t).exp());
            -(pos / (pos + ng)).ln()
        })
        .sum::<f64>()
        / (2 * n) as f64
}

/// Barlow Twins with loops: batch-norm statistics (biased variance + 1e-5,
/// lightly 1.6) or the unbiased std without epsilon (the paper's Algorithm 1).
fn barlow_loop(za: &Tensor, zb: &Tensor, lambda: f64, unbiased: bool) -> f64 {
    let std = |z: Vec<Vec<f64>>| {
        let (n, d) = (z.len(), z[0].len());
        let mut out = z.clone();
        for j in 0..d {
            let mean = z.iter().map(|r| r[j]).sum::<f64>() / n as f64;
            let ss = z.iter().map(|r| (r[j] - mean).powi(2)).sum::<f64>();
            let scale = if unbiased { (ss / (n - 1) as f64).sqrt() } else { (ss / n as f64 + 1e-5).sqrt() };
            for i in 0..n {
                out[i][j] = (z[i][j] - mean) / scale;
            }
        }
        out
    };
    let (a, b) = (std(rows(za)), std(rows(zb)));
    let (n, d) = (a.len(), a[0].len());
    let mut loss = 0.0;
    for i in 0..d {
        for j in 0..d {
            let c = (0..n).map(|k| a[k][i] * b[k][j]).sum::<f64>() / n as f64;
            loss += if i == j { (1.0 - c).powi(2) } else { lambda * c * c };
        }
    }
    loss
}

/// The SwAV reference `distributed_sinkhorn` on one process, with loops.
fn sinkhorn_loop(scores: &[Vec<f64>], eps: f64, iters: usize) -> Vec<Vec<f64>> {
    let (b, k) = (scores.len(), scores[0].len());
    let mut q: Vec<Vec<f64>> = (0..k).map(|p| (0..b).map(|i| (scores[i][p] / eps).exp()).collect()).collect();
    let total: f64 = q.iter().flatten().sum();
    q.iter_mut().flatten().for_each(|v| *v /= total);
    for _ in 0..iters {
        for row in q.iter_mut() {
            let s: f64 = row.iter().sum();
            row.iter_mut().for_each(|v| *v /= s * k as f64);
        }
        for i in 0..b {
            let s: f64 = (0..k).map(|p| q[p][i]).sum();
            (0..k).for_each(|p| q[p][i] /= s * b as f64);
        }
    }
    (0..b).map(|i| (0..k).map(|p| q[p][i] * b as f64).collect()).collect()
}

fn swav_loop(views: &[Tensor], protos: &Tensor, t: f64, eps: f64, iters: usize, assign: &[usize]) -> f64 {
    let c = units(protos);
    let scores: Vec<Vec<Vec<f64>>> =
        views.iter().map(|v| units(v).iter().map(|z| c.iter().map(|p| dot(z, p)).collect()).collect()).collect();
    let n = scores[0].len();
    let mut loss = 0.0;
    for &a in assign {
        let q = sinkhorn_loop(&scores[a], eps, iters);
        let mut sub = 0.0;
        for (v, s) in scores.iter().enumerate() {
            if v == a {
                continue;
            }
            for i in 0..n {
                let z = lse(s[i].iter().map(|x| x / t));
                sub -= (0..c.len()).map(|p| q[i][p] * (s[i][p] / t - z)).sum::<f64>() / n as f64;
            }
        }
        loss += sub / (views.len() - 1) as f64;
    }
    loss / assign.len() as f64
}

// ---------- references, closed forms, finite differences ----------

#[test]
fn supcon_matches_pml_loop_and_closed_form() {
    let labels = vec![0i64, 1, 0, 2, 1, 0, 3];
    let lt = Tensor::from_slice(&labels);
    for views in [1usize, 2] {
        let v: Vec<Tensor> = (0..views).map(|k| randn(7, 5, 20 + k as u64)).collect();
        let got = supcon_share(&v, &lt, 0.1, &Ctx::solo(7)).unwrap().double_value(&[]);
        close(got, supcon_loop(&v, &labels, 0.1, false), "SupCon");
    }
    // All-equal embeddings: every log-softmax is −log(M−1).
    let same = Tensor::ones([6, 3], (Kind::Double, tch::Device::Cpu));
    let l =
        supcon_share(&[same.shallow_clone(), same], &Tensor::from_slice(&[0i64, 0, 1, 1, 2, 2]), 0.05, &Ctx::solo(6));
    close(l.unwrap().double_value(&[]), 11f64.ln(), "SupCon closed form");
    let za = randn(7, 5, 21);
    let f = |x: &Tensor| supcon_share(&[x.shallow_clone()], &lt, 0.2, &Ctx::solo(7)).unwrap();
    assert!(rel_err(&autograd(&za, f), &finite_diff(&za, |x| f(x).double_value(&[]), 1e-6)) < 1e-7);
}

#[test]
fn multi_positive_ntxent_generalises_ntxent() {
    let (a, b, c) = (randn(6, 4, 30), randn(6, 4, 31), randn(6, 4, 32));
    let two =
        ntxent_multi_share(&[a.shallow_clone(), b.shallow_clone()], 0.3, &Ctx::solo(6)).unwrap().double_value(&[]);
    close(two, ntxent_share(&a, &b, 0.3, Shard::solo(6)).unwrap().double_value(&[]), "V=2 is NT-Xent");
    let ids: Vec<i64> = (0..6).collect();
    let three =
        ntxent_multi_share(&[a.shallow_clone(), b.shallow_clone(), c.shallow_clone()], 0.3, &Ctx::solo(6)).unwrap();
    close(three.double_value(&[]), supcon_loop(&[a, b, c], &ids, 0.3, true), "V=3 loop");
}

#[test]
fn siglip_matches_open_clip_loop_and_gradients() {
    let (img, txt) = (randn(5, 4, 40), randn(5, 4, 41));
    for (s, b) in [(10f64.ln(), -10.0), (0.0, 0.0), (2.0, 1.5)] {
        let got = siglip_share(&img, &txt, &scalar(s), &scalar(b), Shard::solo(5)).unwrap().double_value(&[]);
        close(got, siglip_loop(&img, &txt, s, b), "SigLIP");
    }
    let f = |x: &Tensor| siglip_share(x, &txt, &scalar(1.0), &scalar(-2.0), Shard::solo(5)).unwrap();
    assert!(rel_err(&autograd(&img, f), &finite_diff(&img, |x| f(x).double_value(&[]), 1e-6)) < 1e-7);
    let fb = |x: &Tensor| siglip_share(&img, &txt, &scalar(1.0), &x.view([]), Shard::solo(5)).unwrap();
    let b0 = Tensor::from_slice(&[-2.0f64]);
    assert!(rel_err(&autograd(&b0, fb), &finite_diff(&b0, |x| fb(x).double_value(&[]), 1e-6)) < 1e-7);
}

#[test]
fn dcl_and_dclw_match_lightly_loop() {
    let (a, b) = (randn(6, 4, 50), randn(6, 4, 51));
    for sigma in [None, Some(0.5)] {
        let got = dcl_share(&a, &b, 0.1, sigma, Shard::solo(6)).unwrap().double_value(&[]);
        close(got, dcl_loop(&a, &b, 0.1, sigma), "DCL");
    }
    let same = Tensor::ones([5, 3], (Kind::Double, tch::Device::Cpu));
    close(
        dcl_share(&same, &same, 0.5, None, Shard::solo(5)).unwrap().double_value(&[]),
        8f64.ln(),
        "DCL closed form log(2N−2)",
    );
    // DCLW's weights carry no gradient (lightly detaches them), so the finite-difference check is on DCL.
    let f = |x: &Tensor| dcl_share(x, &b, 0.2, None, Shard::solo(6)).unwrap();
    assert!(rel_err(&autograd(&a, f), &finite_diff(&a, |x| f(x).double_value(&[]), 1e-6)) < 1e-7);
}

#[test]
fn debiased_and_hard_negative_match_authors_and_reduce_to_ntxent() {
    let (a, b) = (randn(6, 4, 60), randn(6, 4, 61));
    let nt = ntxent_share(&a, &b, 0.5, Shard::solo(6)).unwrap().double_value(&[]);
    close(debiased_share(&a, &b, 0.5, 0.0, 0.0, Shard::solo(6)).unwrap().double_value(&[]), nt, "τ⁺=0, β=0 is NT-Xent");
    for (tau, beta) in [(0.1, 0.0), (0.1, 1.0), (0.05, 0.5), (0.0, 2.0)] {
        let got = debiased_share(&a, &b, 0.5, tau, beta, Shard::solo(6)).unwrap().double_value(&[]);
        close(got, debiased_loop(&a, &b, 0.5, tau, beta), &format!("τ⁺={tau} β={beta}"));
    }
    // The clamp at M·e^(−1/t) binds when τ⁺ is large.
    let got = debiased_share(&a, &b, 0.5, 0.9, 0.0, Shard::solo(6)).unwrap().double_value(&[]);
    close(got, debiased_loop(&a, &b, 0.5, 0.9, 0.0), "clamped");
    let f = |x: &Tensor| debiased_share(x, &b, 0.5, 0.1, 1.0, Shard::solo(6)).unwrap();
    assert!(rel_err(&autograd(&a, f), &finite_diff(&a, |x| f(x).double_value(&[]), 1e-6)) < 1e-6);
}

#[test]
fn barlow_twins_matches_its_loops_in_both_forms() {
    let (a, b) = (randn(7, 4, 70), randn(7, 4, 71));
    for (how, unbiased) in [(Standardise::BatchNorm, false), (Standardise::Unbiased, true)] {
        close(
            barlow_twins_share(&a, &b, 5e-3, how, Shard::solo(7)).unwrap().double_value(&[]),
            barlow_loop(&a, &b, 5e-3, unbiased),
            "Barlow",
        );
        let f = |x: &Tensor| barlow_twins_share(x, &b, 5e-3, how, Shard::solo(7)).unwrap();
        assert!(rel_err(&autograd(&a, f), &finite_diff(&a, |x| f(x).double_value(&[]), 1e-6)) < 1e-6);
    }
}

/// The closed-form inputs of tools/reference/barlow_npair.py.
fn reference_inputs(n: usize, d: usize, salt: f64) -> Tensor {
    let v: Vec<f64> = (0..n)
        .flat_map(|i| (0..d).map(move |j| (0.37 * i as f64 + 1.3 * j as f64 + salt).sin() * (1.0 + 0.1 * j as f64)))
        .collect();
    Tensor::from_slice(&v).view([n as i64, d as i64])
}

/// Values printed by tools/reference/barlow_npair.py with lightly 1.6.0,
/// pytorch-metric-learning 2.9.0 and torch 2.13 (float64).
#[test]
fn barlow_twins_and_npair_match_the_named_library() {
    // (N, lightly 1.6 BarlowTwinsLoss = facebookresearch/barlowtwins' BatchNorm1d, paper's Algorithm 1)
    for (n, lightly, unbiased) in
        [(8, 7.408683347365461, 6.830746707052231), (64, 7.998606773491446, 7.925232502415597)]
    {
        let (za, zb) = (reference_inputs(n, 4, 0.0), reference_inputs(n, 4, 2.0));
        let got = |how| barlow_twins_share(&za, &zb, 5e-3, how, Shard::solo(n)).unwrap().double_value(&[]);
        close(got(Standardise::BatchNorm), lightly, "barlow_twins vs lightly 1.6");
        close(got(Standardise::Unbiased), unbiased, "barlow_twins_unbiased vs Algorithm 1");
    }
    let z = reference_inputs(9, 4, 5.0) * 3.0;
    let labels = Tensor::from_slice(&[0i64, 1, 0, 2, 1, 3, 2, 3, 1]);
    let c = Ctx::solo(9);
    let got = npair_share(&z, &labels, NPairForm::Cosine, &c).unwrap().double_value(&[]);
    close(got, 1.2306730703228101, "npair vs pml 2.9 NPairsLoss()");
    let got = npair_share(&z, &labels, NPairForm::Dot { l2_reg: 0.002 }, &c).unwrap().double_value(&[]);
    close(got, 5.956901853899915, "npair_dot vs TensorFlow npairs_loss");
}

#[test]
fn byol_and_simsiam_losses_have_their_closed_forms() {
    let p = randn(5, 4, 80);
    close(negative_cosine_share(&p, &(&p * 3.0), Shard::solo(5)).unwrap().double_value(&[]), -1.0, "−cos(p, 3p)");
    close(normalized_mse_share(&p, &(-&p), Shard::solo(5)).unwrap().double_value(&[]), 4.0, "2 − 2cos(p, −p)");
    // The target gets no gradient.
    let z = randn(5, 4, 81).set_requires_grad(true);
    let pp = p.set_requires_grad(true);
    negative_cosine_share(&pp, &z, Shard::solo(5)).unwrap().backward();
    assert!(!z.grad().defined());
    let (p, z) = (randn(5, 4, 82), randn(5, 4, 83));
    let want: f64 = units(&p).iter().zip(units(&z)).map(|(a, b)| 2.0 - 2.0 * dot(a, &b)).sum::<f64>() / 5.0;
    close(normalized_mse_share(&p, &z, Shard::solo(5)).unwrap().double_value(&[]), want, "normalised MSE");
}

#[test]
fn sinkhorn_and_swav_match_the_reference_code() {
    let (v0, v1, v2) = (randn(6, 4, 90), randn(6, 4, 91), randn(6, 4, 92));
    let protos = randn(5, 4, 93);
    let c = units(&protos);
    let scores: Vec<Vec<f64>> = units(&v0).iter().map(|z| c.iter().map(|p| dot(z, p)).collect()).collect();
    let st = Tensor::from_slice(&scores.concat()).view([6, 5]);
    let q = sinkhorn(&st, 0.05, 3, 6, &Ctx::solo(6)).unwrap();
    let want = sinkhorn_loop(&scores, 0.05, 3);
    assert!(rel_err(&contrast_nn::to_host::<f64>(&q), &want.concat()) < 1e-12);
    // Codes are a transport plan: rows sum to 1 after the last (column) step.
    for r in rows(&q) {
        assert!((r.iter().sum::<f64>() - 1.0).abs() < 1e-12);
    }
    let views = [v0, v1, v2];
    let got = swav_share(&views, &protos, 0.1, 0.05, 3, &[0, 1], &Ctx::solo(6)).unwrap().double_value(&[]);
    close(got, swav_loop(&views, &protos, 0.1, 0.05, 3, &[0, 1]), "SwAV");
    // Codes carry no gradient, so differentiate a view that only predicts (assign = [0]) and the prototypes' use in it.
    let f = |x: &Tensor| {
        swav_share(&[views[0].shallow_clone(), x.shallow_clone()], &protos, 0.1, 0.05, 3, &[0], &Ctx::solo(6)).unwrap()
    };
    assert!(rel_err(&autograd(&views[1], f), &finite_diff(&views[1], |x| f(x).double_value(&[]), 1e-6)) < 1e-7);
}

#[test]
fn infonce_and_cpc_match_loops() {
    let (q, k) = (randn(6, 4, 100), randn(6, 4, 101));
    let (qr, kr) = (rows(&q), rows(&k));
    let want: f64 =
        (0..6).map(|i| lse((0..6).map(|j| dot(&qr[i], &kr[j]) / 0.5)) - dot(&qr[i], &kr[i]) / 0.5).sum::<f64>() / 6.0;
    close(infonce_share(&q, &k, 0.5, false, Shard::solo(6)).unwrap().double_value(&[]), want, "InfoNCE");
    let same = Tensor::ones([6, 3], (Kind::Double, tch::Device::Cpu));
    close(
        infonce_share(&same, &same, 0.1, true, Shard::solo(6)).unwrap().double_value(&[]),
        6f64.ln(),
        "InfoNCE log N",
    );
    let (c, z, w) = (randn(6, 3, 102), randn(6, 4, 103), randn(4, 3, 104));
    let (cr, zr, wr) = (rows(&c), rows(&z), rows(&w));
    let score = |i: usize, j: usize| (0..4).map(|a| zr[j][a] * dot(&wr[a], &cr[i])).sum::<f64>();
    let want: f64 = (0..6).map(|i| lse((0..6).map(|j| score(i, j))) - score(i, i)).sum::<f64>() / 6.0;
    close(cpc_share(&c, &z, &w, None, Shard::solo(6)).unwrap().double_value(&[]), want, "CPC");
    let f = |x: &Tensor| cpc_share(&c, &z, x, None, Shard::solo(6)).unwrap();
    assert!(rel_err(&autograd(&w, f), &finite_diff(&w, |x| f(x).double_value(&[]), 1e-6)) < 1e-7);
    // Cosine scores at a temperature: the same loop on unit vectors.
    let unit = |v: &[f64]| {
        let n = dot(v, v).sqrt();
        v.iter().map(|x| x / n).collect::<Vec<f64>>()
    };
    let pred: Vec<Vec<f64>> = (0..6).map(|i| unit(&(0..4).map(|a| dot(&wr[a], &cr[i])).collect::<Vec<_>>())).collect();
    let code: Vec<Vec<f64>> = zr.iter().map(|v| unit(v)).collect();
    let cos = |i: usize, j: usize| dot(&pred[i], &code[j]) / 0.2;
    let want: f64 = (0..6).map(|i| lse((0..6).map(|j| cos(i, j))) - cos(i, i)).sum::<f64>() / 6.0;
    close(cpc_share(&c, &z, &w, Some(0.2), Shard::solo(6)).unwrap().double_value(&[]), want, "CPC cosine");
    let f = |x: &Tensor| cpc_share(&c, &z, x, Some(0.2), Shard::solo(6)).unwrap();
    assert!(rel_err(&autograd(&w, f), &finite_diff(&w, |x| f(x).double_value(&[]), 1e-6)) < 1e-7);
}

// ---------- parity through the engine ----------

type Head = dyn Fn(&[Tensor], &Ctx, &[Tensor]) -> contrast_nn::Result<Tensor> + Sync;
