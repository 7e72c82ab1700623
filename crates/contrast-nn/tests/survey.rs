//! The survey's losses beyond NT-Xent and CLIP: slow loop references (f64),
//! closed forms, finite differences, and P-rank parity through the engine with
//! an identity "encoder" (leaf embeddings per rank), so the gradient that would
//! reach the encoder and every head parameter is compared directly.

use crate::common::*;
use contrast_comm::{Collective, Solo, Threads};
use contrast_nn::loss::*;
use contrast_nn::GlobalBatch;
use tch::{Kind, Tensor};

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
    let q = sinkhorn(&st, 0.05, 3, &Ctx::solo(6)).unwrap();
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
    close(cpc_share(&c, &z, &w, Shard::solo(6)).unwrap().double_value(&[]), want, "CPC");
    let f = |x: &Tensor| cpc_share(&c, &z, x, Shard::solo(6)).unwrap();
    assert!(rel_err(&autograd(&w, f), &finite_diff(&w, |x| f(x).double_value(&[]), 1e-6)) < 1e-7);
}

// ---------- parity through the engine ----------

type Head = dyn Fn(&[Tensor], &Ctx, &[Tensor]) -> contrast_nn::Result<Tensor> + Sync;

struct RankOut {
    loss: f64,
    leaf_grads: Vec<Vec<f64>>,
    param_grads: Vec<Vec<f64>>,
}

fn run_leaves<C: Collective>(
    comm: &C,
    data: &[Vec<f64>],
    d: usize,
    b: usize,
    params: &[(Vec<f64>, Vec<i64>)],
    head: &Head,
) -> RankOut {
    let r = comm.rank();
    let leaves: Vec<Tensor> = data
        .iter()
        .map(|v| Tensor::from_slice(&v[r * b * d..(r + 1) * b * d]).view([b as i64, d as i64]).set_requires_grad(true))
        .collect();
    let ps: Vec<Tensor> =
        params.iter().map(|(v, s)| Tensor::from_slice(v).view(s.as_slice()).set_requires_grad(true)).collect();
    let engine = GlobalBatch::new(comm, b);
    let out = engine.step(&leaves, &ps, |g, ctx| head(g, ctx, &ps)).unwrap();
    let grad = |t: &Tensor| contrast_nn::to_host::<f64>(&t.grad());
    RankOut {
        loss: out.loss,
        leaf_grads: leaves.iter().map(grad).collect(),
        param_grads: ps.iter().map(grad).collect(),
    }
}

fn parity(
    name: &str,
    towers: usize,
    d: usize,
    b: usize,
    worlds: &[usize],
    params: &[(Vec<f64>, Vec<i64>)],
    head: &Head,
) {
    for &p in worlds {
        let n = p * b;
        let data: Vec<Vec<f64>> = (0..towers).map(|k| randn_vec(n * d, 1000 + 10 * p as u64 + k as u64)).collect();
        let solo = run_leaves(&Solo, &data, d, n, params, head);
        let ranks = Threads::run(p, |c| run_leaves(&c, &data, d, b, params, head));
        for (r, out) in ranks.iter().enumerate() {
            assert!(
                (out.loss - solo.loss).abs() <= 1e-9 * solo.loss.abs().max(1.0),
                "{name} P={p}: loss {} vs {}",
                out.loss,
                solo.loss
            );
            for (k, g) in out.leaf_grads.iter().enumerate() {
                let want = &solo.leaf_grads[k][r * b * d..(r + 1) * b * d];
                let e = rel_err(g, want);
                assert!(e < 1e-9, "{name} P={p} rank {r}: ∂L/∂z of tower {k} off by {e:e}");
            }
            for (k, g) in out.param_grads.iter().enumerate() {
                let e = rel_err(g, &solo.param_grads[k]);
                assert!(e < 1e-9, "{name} P={p} rank {r}: head parameter {k} gradient off by {e:e}");
            }
        }
    }
}

fn labels_for(n: usize) -> Tensor {
    Tensor::from_slice(&(0..n as i64).map(|i| (i * 7 + 3) % 4).collect::<Vec<_>>())
}

#[test]
fn every_batch_loss_is_exact_across_ranks() {
    let w = [2usize, 3, 4];
    parity("SupCon", 2, 5, 3, &w, &[], &|g, ctx, _| supcon_share(g, &labels_for(ctx.shard.global()), 0.1, ctx));
    parity("SupCon one view", 1, 5, 3, &w, &[], &|g, ctx, _| {
        supcon_share(g, &labels_for(ctx.shard.global()), 0.1, ctx)
    });
    parity("multi NT-Xent", 3, 5, 2, &w, &[], &|g, ctx, _| ntxent_multi_share(g, 0.2, ctx));
    let sig = [(vec![10f64.ln()], vec![]), (vec![-10.0], vec![])];
    parity("SigLIP", 2, 5, 3, &w, &sig, &|g, ctx, p| siglip_share(&g[0], &g[1], &p[0], &p[1], ctx.shard));
    parity("DCL", 2, 5, 3, &w, &[], &|g, ctx, _| dcl_share(&g[0], &g[1], 0.1, None, ctx.shard));
    parity("DCLW", 2, 5, 3, &w, &[], &|g, ctx, _| dcl_share(&g[0], &g[1], 0.1, Some(0.5), ctx.shard));
    parity("debiased", 2, 5, 3, &w, &[], &|g, ctx, _| debiased_share(&g[0], &g[1], 0.5, 0.1, 0.0, ctx.shard));
    parity("hard negative", 2, 5, 3, &w, &[], &|g, ctx, _| debiased_share(&g[0], &g[1], 0.5, 0.1, 1.0, ctx.shard));
    parity("Barlow Twins", 2, 4, 3, &w, &[], &|g, ctx, _| {
        barlow_twins_share(&g[0], &g[1], 5e-3, Standardise::BatchNorm, ctx.shard)
    });
    parity("negative cosine", 2, 5, 3, &w, &[], &|g, ctx, _| negative_cosine_share(&g[0], &g[1], ctx.shard));
    parity("normalised MSE", 2, 5, 3, &w, &[], &|g, ctx, _| normalized_mse_share(&g[0], &g[1], ctx.shard));
    let protos = [(randn_vec(6 * 5, 7), vec![6, 5])];
    parity("SwAV", 3, 5, 3, &w, &protos, &|g, ctx, p| swav_share(g, &p[0], 0.1, 0.05, 3, &[0, 1], ctx));
    parity("InfoNCE", 2, 5, 3, &w, &[], &|g, ctx, _| infonce_share(&g[0], &g[1], 0.1, true, ctx.shard));
    let wk = [(randn_vec(5 * 5, 8), vec![5, 5])];
    parity("CPC", 2, 5, 3, &w, &wk, &|g, ctx, p| cpc_share(&g[0], &g[1], &p[0], ctx.shard));
}

#[test]
fn batch_of_one_per_rank_is_exact() {
    let w = [2usize, 4];
    parity("SupCon B=1", 2, 4, 1, &w, &[], &|g, ctx, _| supcon_share(g, &labels_for(ctx.shard.global()), 0.1, ctx));
    parity("DCL B=1", 2, 4, 1, &w, &[], &|g, ctx, _| dcl_share(&g[0], &g[1], 0.1, None, ctx.shard));
    parity("hard negative B=1", 2, 4, 1, &w, &[], &|g, ctx, _| debiased_share(&g[0], &g[1], 0.5, 0.1, 1.0, ctx.shard));
    let protos = [(randn_vec(3 * 4, 9), vec![3, 4])];
    parity("SwAV B=1", 2, 4, 1, &w, &protos, &|g, ctx, p| swav_share(g, &p[0], 0.1, 0.05, 3, &[0, 1], ctx));
    let sig = [(vec![10f64.ln()], vec![]), (vec![-10.0], vec![])];
    parity("SigLIP B=1", 2, 4, 1, &w, &sig, &|g, ctx, p| siglip_share(&g[0], &g[1], &p[0], &p[1], ctx.shard));
    parity("multi NT-Xent B=1", 3, 4, 1, &w, &[], &|g, ctx, _| ntxent_multi_share(g, 0.2, ctx));
    parity("debiased B=1", 2, 4, 1, &w, &[], &|g, ctx, _| debiased_share(&g[0], &g[1], 0.5, 0.1, 0.0, ctx.shard));
    parity("Barlow Twins unbiased", 2, 4, 3, &w, &[], &|g, ctx, _| {
        barlow_twins_share(&g[0], &g[1], 5e-3, Standardise::Unbiased, ctx.shard)
    });
    parity("Barlow Twins B=1", 2, 4, 1, &w, &[], &|g, ctx, _| {
        barlow_twins_share(&g[0], &g[1], 5e-3, Standardise::BatchNorm, ctx.shard)
    });
    parity("BYOL B=1", 2, 4, 1, &w, &[], &|g, ctx, _| normalized_mse_share(&g[0], &g[1], ctx.shard));
    parity("InfoNCE B=1", 2, 4, 1, &w, &[], &|g, ctx, _| infonce_share(&g[0], &g[1], 0.1, true, ctx.shard));
    let wk = [(randn_vec(16, 8), vec![4, 4])];
    parity("CPC B=1", 2, 4, 1, &w, &wk, &|g, ctx, p| cpc_share(&g[0], &g[1], &p[0], ctx.shard));
    parity("NCE B=1", 2, 4, 1, &w, &[], &|g, ctx, _| nce_share(&g[0], &g[1], 0.5, 1000.0, ctx.shard));
    parity("contrastive B=1", 1, 4, 1, &w, &[], &|g, ctx, _| {
        contrastive_share(&g[0], &labels9(ctx.shard.global()), 0.0, 1.0, false, ctx)
    });
    parity("triplet B=1", 1, 4, 1, &w, &[], &|g, ctx, _| {
        triplet_share(&g[0], &labels9(ctx.shard.global()), 0.5, Mining::BatchHard, ctx)
    });
    parity("lifted B=1", 1, 4, 1, &w, &[], &|g, ctx, _| {
        lifted_smooth_share(&g[0], &labels9(ctx.shard.global()), 1.0, 0.0, ctx)
    });
    parity("N-pair B=1", 1, 4, 1, &w, &[], &|g, ctx, _| {
        npair_share(&g[0], &labels9(ctx.shard.global()), NPairForm::Cosine, ctx)
    });
    parity("SNN B=1", 1, 4, 1, &w, &[], &|g, ctx, _| snn_share(&g[0], &labels9(ctx.shard.global()), 0.7, ctx));
    parity("soft NT-Xent B=1", 2, 4, 1, &w, &[], &|g, ctx, _| {
        ntxent_soft_share(&g[0], &g[1], &mix(ctx.shard.global()), 0.2, ctx.shard)
    });
}

// ---------- numerical safety ----------

#[test]
fn no_nan_or_inf_at_the_extremes() {
    let losses: Vec<(&str, Box<dyn Fn(&Tensor, &Tensor, f64) -> Tensor>)> = vec![
        (
            "SupCon",
            Box::new(|a, b, t| {
                supcon_share(&[a.shallow_clone(), b.shallow_clone()], &labels_for(4), t, &Ctx::solo(4)).unwrap()
            }),
        ),
        (
            "multi NT-Xent",
            Box::new(|a, b, t| ntxent_multi_share(&[a.shallow_clone(), b.shallow_clone()], t, &Ctx::solo(4)).unwrap()),
        ),
        (
            "SigLIP",
            Box::new(|a, b, _| siglip_share(a, b, &scalar(100f64.ln()), &scalar(-10.0), Shard::solo(4)).unwrap()),
        ),
        ("DCL", Box::new(|a, b, t| dcl_share(a, b, t, Some(0.5), Shard::solo(4)).unwrap())),
        ("debiased", Box::new(|a, b, t| debiased_share(a, b, t, 0.1, 0.0, Shard::solo(4)).unwrap())),
        ("hard negative", Box::new(|a, b, t| debiased_share(a, b, t, 0.1, 1.0, Shard::solo(4)).unwrap())),
        (
            "Barlow Twins",
            Box::new(|a, b, _| barlow_twins_share(a, b, 5e-3, Standardise::BatchNorm, Shard::solo(4)).unwrap()),
        ),
        ("negative cosine", Box::new(|a, b, _| negative_cosine_share(a, b, Shard::solo(4)).unwrap())),
        (
            "SwAV",
            Box::new(|a, b, t| {
                swav_share(&[a.shallow_clone(), b.shallow_clone()], &randn(3, 3, 5), t, 0.05, 3, &[0, 1], &Ctx::solo(4))
                    .unwrap()
            }),
        ),
        ("InfoNCE", Box::new(|a, b, t| infonce_share(a, b, t, true, Shard::solo(4)).unwrap())),
    ];
    for (name, f) in &losses {
        for (scale, equal) in [(0.0, false), (1e4, false), (1.0, true), (1.0, false)] {
            let a = if equal { Tensor::ones([4, 3], (Kind::Double, tch::Device::Cpu)) } else { randn(4, 3, 1) * scale };
            let b = if equal { a.copy() } else { randn(4, 3, 2) * scale };
            let a = a.set_requires_grad(true);
            let l = f(&a, &b, 0.01);
            l.backward();
            let v = l.double_value(&[]);
            assert!(v.is_finite(), "{name}: loss {v} at scale {scale}, equal {equal}");
            let g = a.grad();
            if g.defined() {
                assert!(
                    contrast_nn::to_host::<f64>(&g).iter().all(|x| x.is_finite()),
                    "{name}: gradient not finite at scale {scale}, equal {equal}"
                );
            }
        }
    }
}

#[test]
fn bad_parameters_fail_clearly() {
    let (a, b) = (randn(4, 3, 1), randn(4, 3, 2));
    let err = |r: contrast_nn::Result<Tensor>| r.unwrap_err().to_string();
    assert!(err(supcon_share(&[a.shallow_clone()], &Tensor::from_slice(&[0i64, 1]), 0.1, &Ctx::solo(4)))
        .contains("labels must be [N=4]"));
    assert!(err(dcl_share(&a, &b, -1.0, None, Shard::solo(4))).contains("temperature must be > 0"));
    assert!(err(debiased_share(&a, &b, 0.5, 1.0, 0.0, Shard::solo(4))).contains("tau_plus"));
    assert!(err(debiased_share(&a, &b, 0.5, 0.1, -1.0, Shard::solo(4))).contains("beta"));
    assert!(err(barlow_twins_share(
        &a.narrow(0, 0, 1),
        &b.narrow(0, 0, 1),
        5e-3,
        Standardise::BatchNorm,
        Shard::solo(1)
    ))
    .contains("at least 2"));
    assert!(err(swav_share(
        &[a.shallow_clone(), b.shallow_clone()],
        &randn(3, 2, 1),
        0.1,
        0.05,
        3,
        &[0],
        &Ctx::solo(4)
    ))
    .contains("prototypes"));
    assert!(err(sinkhorn(&a, 0.0, 3, &Ctx::solo(4))).contains("epsilon"));
    assert!(err(cpc_share(&a, &b, &randn(2, 2, 1), Shard::solo(4))).contains("W must be"));
}

// ---------- metric-learning losses ----------

fn dist(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| (x - y) * (x - y)).sum::<f64>().sqrt()
}

fn avg_nz(v: &[f64]) -> f64 {
    let c = v.iter().filter(|x| **x > 0.0).count();
    if c == 0 {
        0.0
    } else {
        v.iter().sum::<f64>() / c as f64
    }
}

const LABELS: [i64; 9] = [0, 1, 0, 2, 1, 0, 2, 2, 1];

/// pytorch-metric-learning `ContrastiveLoss` (losses/contrastive_loss.py) over all ordered pairs.
fn contrastive_loop(z: &Tensor, pm: f64, nm: f64, squared: bool) -> f64 {
    let u = units(z);
    let (mut p, mut n) = (vec![], vec![]);
    for i in 0..u.len() {
        for j in 0..u.len() {
            if i == j {
                continue;
            }
            let d = dist(&u[i], &u[j]);
            if LABELS[i] == LABELS[j] {
                p.push(if squared { (d - pm).max(0.0).powi(2) } else { (d - pm).max(0.0) });
            } else {
                n.push(if squared { (nm - d).max(0.0).powi(2) } else { (nm - d).max(0.0) });
            }
        }
    }
    avg_nz(&p) + avg_nz(&n)
}

/// pytorch-metric-learning `TripletMarginLoss` + miners, as loops.
fn triplet_loop(z: &Tensor, margin: f64, mining: Mining) -> f64 {
    let u = units(z);
    let m = u.len();
    let mut terms = vec![];
    for a in 0..m {
        let pos: Vec<usize> = (0..m).filter(|&p| p != a && LABELS[p] == LABELS[a]).collect();
        let neg: Vec<usize> = (0..m).filter(|&n| LABELS[n] != LABELS[a]).collect();
        if pos.is_empty() || neg.is_empty() {
            continue;
        }
        let d = |x: usize| dist(&u[a], &u[x]);
        match mining {
            Mining::BatchHard => {
                let ap = pos.iter().map(|&p| d(p)).fold(f64::MIN, f64::max);
                let an = neg.iter().map(|&n| d(n)).fold(f64::MAX, f64::min);
                terms.push((ap - an + margin).max(0.0));
            }
            _ => {
                for &p in &pos {
                    for &n in &neg {
                        let gap = d(n) - d(p);
                        if mining == Mining::SemiHard && !(gap > 0.0 && gap <= margin) {
                            continue;
                        }
                        terms.push((margin - gap).max(0.0));
                    }
                }
            }
        }
    }
    avg_nz(&terms)
}

/// Song et al. (2016) eq. (3)/(4) and pytorch-metric-learning `LiftedStructureLoss`, as loops.
fn lifted_loop(z: &Tensor, m: f64, hard: bool) -> f64 {
    let u = units(z);
    let n = u.len();
    let negs = |i: usize| (0..n).filter(move |&k| LABELS[k] != LABELS[i]);
    let (mut total, mut pairs) = (0.0, 0usize);
    for i in 0..n {
        for j in (i + 1)..n {
            if LABELS[i] != LABELS[j] {
                continue;
            }
            let terms: Vec<f64> =
                negs(i).map(|k| m - dist(&u[i], &u[k])).chain(negs(j).map(|l| m - dist(&u[j], &u[l]))).collect();
            let neg = if hard { terms.iter().cloned().fold(f64::MIN, f64::max) } else { lse(terms.into_iter()) };
            total += (neg + dist(&u[i], &u[j])).max(0.0).powi(2);
            pairs += 1;
        }
    }
    total / (2 * pairs) as f64
}

fn generalized_lifted_loop(z: &Tensor, m: f64) -> f64 {
    let u = units(z);
    let n = u.len();
    (0..n)
        .map(|i| {
            let p: Vec<f64> =
                (0..n).filter(|&j| j != i && LABELS[j] == LABELS[i]).map(|j| dist(&u[i], &u[j])).collect();
            let q: Vec<f64> = (0..n).filter(|&j| LABELS[j] != LABELS[i]).map(|j| m - dist(&u[i], &u[j])).collect();
            let f = |v: Vec<f64>| if v.is_empty() { 0.0 } else { lse(v.into_iter()) };
            (f(p) + f(q)).max(0.0)
        })
        .sum::<f64>()
        / n as f64
}

fn snn_loop(z: &Tensor, t: f64) -> f64 {
    let r = rows(z);
    let n = r.len();
    let d2 = |i: usize, j: usize| dist(&r[i], &r[j]).powi(2);
    let mut total = 0.0;
    let mut count = 0;
    for i in 0..n {
        let pos: Vec<usize> = (0..n).filter(|&j| j != i && LABELS[j] == LABELS[i]).collect();
        if pos.is_empty() {
            continue;
        }
        let num: f64 = pos.iter().map(|&j| (-d2(i, j) / t).exp()).sum();
        let den: f64 = (0..n).filter(|&k| k != i).map(|k| (-d2(i, k) / t).exp()).sum();
        total += -(num / den).ln();
        count += 1;
    }
    total / count as f64
}

fn nce_loop(za: &Tensor, zb: &Tensor, t: f64, noise: f64) -> f64 {
    let mut z = units(za);
    let n = z.len();
    z.extend(units(zb));
    let k = (2 * n - 2) as f64;
    let c = (k / noise).ln();
    let sig = |x: f64| 1.0 / (1.0 + (-x).exp());
    (0..2 * n)
        .map(|i| {
            let p = (i + n) % (2 * n);
            let mut l = -sig(dot(&z[i], &z[p]) / t - c).ln();
            for j in (0..2 * n).filter(|&j| j != i && j != p) {
                l -= (1.0 - sig(dot(&z[i], &z[j]) / t - c)).ln();
            }
            l
        })
        .sum::<f64>()
        / (2 * n) as f64
}

fn lab() -> Tensor {
    Tensor::from_slice(&LABELS)
}

#[test]
fn metric_losses_match_loop_references() {
    let z = randn(9, 4, 110);
    let c = Ctx::solo(9);
    for squared in [false, true] {
        close(
            contrastive_share(&z, &lab(), 0.0, 1.0, squared, &c).unwrap().double_value(&[]),
            contrastive_loop(&z, 0.0, 1.0, squared),
            "contrastive",
        );
    }
    close(
        contrastive_share(&z, &lab(), 0.3, 0.8, false, &c).unwrap().double_value(&[]),
        contrastive_loop(&z, 0.3, 0.8, false),
        "contrastive margins",
    );
    for mining in [Mining::All, Mining::BatchHard, Mining::SemiHard] {
        for margin in [0.05, 0.5] {
            let got = triplet_share(&z, &lab(), margin, mining, &c).unwrap().double_value(&[]);
            close(got, triplet_loop(&z, margin, mining), &format!("triplet {mining:?} m={margin}"));
        }
    }
    close(
        lifted_smooth_share(&z, &lab(), 1.0, 0.0, &c).unwrap().double_value(&[]),
        lifted_loop(&z, 1.0, false),
        "lifted smooth",
    );
    close(
        lifted_hard_share(&z, &lab(), 1.0, &c).unwrap().double_value(&[]),
        lifted_loop(&z, 1.0, true),
        "lifted hard (Song eq. 3)",
    );
    close(
        generalized_lifted_share(&z, &lab(), 1.0, 0.0, &c).unwrap().double_value(&[]),
        generalized_lifted_loop(&z, 1.0),
        "generalized lifted",
    );
    close(snn_share(&z, &lab(), 0.7, &c).unwrap().double_value(&[]), snn_loop(&z, 0.7), "soft nearest neighbours");
    let (a, b) = (randn(5, 4, 111), randn(5, 4, 112));
    close(
        nce_share(&a, &b, 0.5, 1000.0, Shard::solo(5)).unwrap().double_value(&[]),
        nce_loop(&a, &b, 0.5, 1000.0),
        "NCE",
    );
    // N-pair: pml picks, per label, the first ordered positive pair: (0,2), (1,4), (3,6).
    assert_eq!(contrast_nn::loss::npair::npair_pairs(&LABELS), vec![(0, 2), (1, 4), (3, 6)]);
    let r = rows(&l2_normalize(&z));
    let pairs = [(0usize, 2usize), (1, 4), (3, 6)];
    let want = pairs
        .iter()
        .enumerate()
        .map(|(k, &(a, _))| lse(pairs.iter().map(|&(_, p)| dot(&r[a], &r[p]))) - dot(&r[a], &r[pairs[k].1]))
        .sum::<f64>()
        / 3.0;
    close(npair_share(&z, &lab(), NPairForm::Cosine, &c).unwrap().double_value(&[]), want, "N-pair");
}

#[test]
fn metric_loss_gradients_match_finite_differences() {
    let z = randn(9, 4, 120);
    let c = Ctx::solo(9);
    let checks: Vec<(&str, Box<dyn Fn(&Tensor) -> Tensor>)> = vec![
        ("contrastive", Box::new(|x| contrastive_share(x, &lab(), 0.0, 1.0, false, &c).unwrap())),
        ("triplet all", Box::new(|x| triplet_share(x, &lab(), 0.5, Mining::All, &c).unwrap())),
        ("triplet batch-hard", Box::new(|x| triplet_share(x, &lab(), 0.5, Mining::BatchHard, &c).unwrap())),
        ("lifted smooth", Box::new(|x| lifted_smooth_share(x, &lab(), 1.0, 0.0, &c).unwrap())),
        ("lifted hard", Box::new(|x| lifted_hard_share(x, &lab(), 1.0, &c).unwrap())),
        ("generalized lifted", Box::new(|x| generalized_lifted_share(x, &lab(), 1.0, 0.0, &c).unwrap())),
        ("N-pair", Box::new(|x| npair_share(x, &lab(), NPairForm::Cosine, &c).unwrap())),
        ("N-pair dot", Box::new(|x| npair_share(x, &lab(), NPairForm::Dot { l2_reg: 0.01 }, &c).unwrap())),
        ("soft nearest neighbours", Box::new(|x| snn_share(x, &lab(), 0.7, &c).unwrap())),
    ];
    for (name, f) in &checks {
        let e = rel_err(&autograd(&z, f), &finite_diff(&z, |x| f(x).double_value(&[]), 1e-6));
        assert!(e < 1e-6, "{name}: autograd vs finite differences {e:e}");
    }
    let b = randn(9, 4, 121);
    let f = |x: &Tensor| nce_share(x, &b, 0.5, 100.0, Shard::solo(9)).unwrap();
    assert!(rel_err(&autograd(&z, f), &finite_diff(&z, |x| f(x).double_value(&[]), 1e-6)) < 1e-7);
}

fn labels9(n: usize) -> Tensor {
    Tensor::from_slice(&(0..n as i64).map(|i| (i * 5 + 1) % 3).collect::<Vec<_>>())
}

#[test]
fn metric_losses_are_exact_across_ranks() {
    let w = [2usize, 3, 4];
    parity("contrastive", 1, 4, 3, &w, &[], &|g, ctx, _| {
        contrastive_share(&g[0], &labels9(ctx.shard.global()), 0.0, 1.0, false, ctx)
    });
    for mining in [Mining::All, Mining::BatchHard, Mining::SemiHard] {
        parity("triplet", 1, 4, 3, &w, &[], &move |g, ctx, _| {
            triplet_share(&g[0], &labels9(ctx.shard.global()), 0.5, mining, ctx)
        });
    }
    parity("lifted smooth", 1, 4, 3, &w, &[], &|g, ctx, _| {
        lifted_smooth_share(&g[0], &labels9(ctx.shard.global()), 1.0, 0.0, ctx)
    });
    parity("lifted hard", 1, 4, 3, &w, &[], &|g, ctx, _| {
        lifted_hard_share(&g[0], &labels9(ctx.shard.global()), 1.0, ctx)
    });
    parity("generalized lifted", 1, 4, 3, &w, &[], &|g, ctx, _| {
        generalized_lifted_share(&g[0], &labels9(ctx.shard.global()), 1.0, 0.0, ctx)
    });
    parity("N-pair dot", 1, 4, 3, &w, &[], &|g, ctx, _| {
        npair_share(&g[0], &labels9(ctx.shard.global()), NPairForm::Dot { l2_reg: 0.01 }, ctx)
    });
    parity("N-pair", 1, 4, 3, &w, &[], &|g, ctx, _| {
        npair_share(&g[0], &labels9(ctx.shard.global()), NPairForm::Cosine, ctx)
    });
    parity("soft nearest neighbours", 1, 4, 3, &w, &[], &|g, ctx, _| {
        snn_share(&g[0], &labels9(ctx.shard.global()), 0.7, ctx)
    });
    parity("NCE", 2, 4, 3, &w, &[], &|g, ctx, _| nce_share(&g[0], &g[1], 0.5, 1000.0, ctx.shard));
}

#[test]
fn metric_losses_stay_finite_at_extremes() {
    let c = Ctx::solo(4);
    let l4 = labels9(4);
    let losses: Vec<(&str, Box<dyn Fn(&Tensor) -> Tensor>)> = vec![
        ("contrastive", Box::new(|x| contrastive_share(x, &l4, 0.0, 1.0, true, &c).unwrap())),
        ("triplet", Box::new(|x| triplet_share(x, &l4, 0.05, Mining::All, &c).unwrap())),
        ("batch-hard", Box::new(|x| triplet_share(x, &l4, 0.05, Mining::BatchHard, &c).unwrap())),
        ("lifted", Box::new(|x| lifted_smooth_share(x, &l4, 1.0, 0.0, &c).unwrap())),
        ("lifted hard", Box::new(|x| lifted_hard_share(x, &l4, 1.0, &c).unwrap())),
        ("generalized lifted", Box::new(|x| generalized_lifted_share(x, &l4, 1.0, 0.0, &c).unwrap())),
        ("N-pair", Box::new(|x| npair_share(&(x / 1e4), &l4, NPairForm::Cosine, &c).unwrap())),
        ("N-pair dot", Box::new(|x| npair_share(&(x / 1e4), &l4, NPairForm::Dot { l2_reg: 0.002 }, &c).unwrap())),
        ("SNN", Box::new(|x| snn_share(&(x / 1e4), &l4, 0.01, &c).unwrap())),
        ("NCE", Box::new(|x| nce_share(x, &x.detach(), 0.01, 1e6, Shard::solo(4)).unwrap())),
    ];
    for (name, f) in &losses {
        for (scale, equal) in [(0.0, false), (1e4, false), (1.0, true)] {
            let a = if equal { Tensor::ones([4, 3], (Kind::Double, tch::Device::Cpu)) } else { randn(4, 3, 3) * scale };
            let a = a.set_requires_grad(true);
            let l = f(&a);
            l.backward();
            assert!(l.double_value(&[]).is_finite(), "{name}: loss not finite at scale {scale}, equal {equal}");
            let g = a.grad();
            if g.defined() {
                assert!(
                    contrast_nn::to_host::<f64>(&g).iter().all(|x| x.is_finite()),
                    "{name}: gradient not finite at scale {scale}, equal {equal}"
                );
            }
        }
    }
    let err = triplet_share(&randn(4, 3, 1), &l4, -0.1, Mining::All, &c).unwrap_err().to_string();
    assert!(err.contains("margin must be ≥ 0"), "{err}");
    let err =
        contrastive_share(&randn(4, 3, 1), &Tensor::from_slice(&[1i64]), 0.0, 1.0, false, &c).unwrap_err().to_string();
    assert!(err.contains("labels must be [N=4]"), "{err}");
}

// ---------- soft targets (mixup / CutMix batches) ----------

fn mix(n: usize) -> Mix {
    // A fixed permutation (i ↦ 5i + 2 mod n is one when 5 ∤ n) and λ in (0, 1), as the data side would draw them.
    let partner: Vec<i64> = if n % 5 != 0 {
        (0..n as i64).map(|i| (i * 5 + 2) % n as i64).collect()
    } else {
        (0..n as i64).rev().collect()
    };
    Mix { partner, lambda: (0..n).map(|i| 0.2 + 0.6 * ((i * 7 % 11) as f64 / 10.0)).collect() }
}

/// i-Mix (Lee et al. 2021, `imix` in their N-pair/SimCLR code): soft CE over keys.
fn infonce_soft_loop(q: &Tensor, k: &Tensor, m: &Mix, t: f64) -> f64 {
    let (q, k) = (units(q), units(k));
    let n = q.len();
    (0..n)
        .map(|i| {
            let z = lse((0..n).map(|j| dot(&q[i], &k[j]) / t));
            let lp = |j: usize| dot(&q[i], &k[j]) / t - z;
            -(m.lambda[i] * lp(i) + (1.0 - m.lambda[i]) * lp(m.partner[i] as usize))
        })
        .sum::<f64>()
        / n as f64
}

fn ntxent_soft_loop(za: &Tensor, zb: &Tensor, m: &Mix, t: f64) -> f64 {
    let mut z = units(za);
    let n = z.len();
    z.extend(units(zb));
    let lp =
        |i: usize, c: usize| dot(&z[i], &z[c]) / t - lse((0..2 * n).filter(|&k| k != i).map(|k| dot(&z[i], &z[k]) / t));
    let mut total = 0.0;
    for i in 0..n {
        total -= m.lambda[i] * lp(i, n + i) + (1.0 - m.lambda[i]) * lp(i, n + m.partner[i] as usize);
        let j = m.partner.iter().position(|&p| p as usize == i).unwrap();
        let (wi, wj) = (m.lambda[i], 1.0 - m.lambda[j]);
        total -= (wi * lp(n + i, i) + wj * lp(n + i, j)) / (wi + wj);
    }
    total / (2 * n) as f64
}

fn supcon_soft_loop(views: &[Tensor], probs: &[Vec<f64>], t: f64) -> f64 {
    let z: Vec<Vec<f64>> = views.iter().flat_map(units).collect();
    let (m, n) = (z.len(), probs.len());
    let (mut total, mut nz) = (0.0, 0);
    for i in 0..m {
        let den = lse((0..m).filter(|&k| k != i).map(|k| dot(&z[i], &z[k]) / t));
        let w = |p: usize| dot(&probs[i % n], &probs[p % n]);
        let ws: f64 = (0..m).filter(|&p| p != i).map(w).sum();
        let l = -(0..m).filter(|&p| p != i).map(|p| w(p) * (dot(&z[i], &z[p]) / t - den)).sum::<f64>() / ws;
        total += l;
        nz += usize::from(l > 0.0);
    }
    total / nz as f64
}

fn soft_labels(n: usize, m: &Mix, classes: usize) -> Vec<Vec<f64>> {
    let y = |i: usize| (i * 7 + 3) % classes;
    (0..n)
        .map(|i| {
            let mut q = vec![0.0; classes];
            q[y(i)] += m.lambda[i];
            q[y(m.partner[i] as usize)] += 1.0 - m.lambda[i];
            q
        })
        .collect()
}

fn probs_tensor(p: &[Vec<f64>]) -> Tensor {
    Tensor::from_slice(&p.concat()).view([p.len() as i64, p[0].len() as i64])
}

#[test]
fn soft_target_losses_match_loops_and_reduce_to_the_hard_ones() {
    let (a, b) = (randn(7, 4, 130), randn(7, 4, 131));
    let m = mix(7);
    close(
        infonce_soft_share(&a, &b, &m, 0.3, true, Shard::solo(7)).unwrap().double_value(&[]),
        infonce_soft_loop(&a, &b, &m, 0.3),
        "i-Mix InfoNCE",
    );
    close(
        ntxent_soft_share(&a, &b, &m, 0.3, Shard::solo(7)).unwrap().double_value(&[]),
        ntxent_soft_loop(&a, &b, &m, 0.3),
        "soft NT-Xent",
    );
    let probs = soft_labels(7, &m, 4);
    let pt = probs_tensor(&probs);
    let got =
        supcon_soft_share(&[a.shallow_clone(), b.shallow_clone()], &pt, 0.1, &Ctx::solo(7)).unwrap().double_value(&[]);
    close(got, supcon_soft_loop(&[a.shallow_clone(), b.shallow_clone()], &probs, 0.1), "SupCon mixed labels");
    // λ ≡ 1: the unmixed losses.
    let hard = Mix { partner: m.partner.clone(), lambda: vec![1.0; 7] };
    close(
        infonce_soft_share(&a, &b, &hard, 0.3, true, Shard::solo(7)).unwrap().double_value(&[]),
        infonce_share(&a, &b, 0.3, true, Shard::solo(7)).unwrap().double_value(&[]),
        "λ=1 InfoNCE",
    );
    close(
        ntxent_soft_share(&a, &b, &hard, 0.3, Shard::solo(7)).unwrap().double_value(&[]),
        ntxent_share(&a, &b, 0.3, Shard::solo(7)).unwrap().double_value(&[]),
        "λ=1 NT-Xent",
    );
    let onehot = probs_tensor(&soft_labels(7, &hard, 4));
    let labels = Tensor::from_slice(&(0..7i64).map(|i| (i * 7 + 3) % 4).collect::<Vec<_>>());
    close(
        supcon_soft_share(&[a.shallow_clone(), b.shallow_clone()], &onehot, 0.1, &Ctx::solo(7))
            .unwrap()
            .double_value(&[]),
        supcon_share(&[a.shallow_clone(), b.shallow_clone()], &labels, 0.1, &Ctx::solo(7)).unwrap().double_value(&[]),
        "one-hot SupCon",
    );
    let f = |x: &Tensor| ntxent_soft_share(x, &b, &m, 0.3, Shard::solo(7)).unwrap();
    assert!(rel_err(&autograd(&a, f), &finite_diff(&a, |x| f(x).double_value(&[]), 1e-6)) < 1e-7);
    let g = |x: &Tensor| supcon_soft_share(&[x.shallow_clone()], &pt, 0.2, &Ctx::solo(7)).unwrap();
    assert!(rel_err(&autograd(&a, g), &finite_diff(&a, |x| g(x).double_value(&[]), 1e-6)) < 1e-7);
    let bad = Mix { partner: vec![0; 7], lambda: vec![0.5; 7] };
    assert!(ntxent_soft_share(&a, &b, &bad, 0.3, Shard::solo(7)).unwrap_err().to_string().contains("permutation"));
}

#[test]
fn soft_target_losses_are_exact_across_ranks() {
    let w = [2usize, 3, 4];
    parity("i-Mix InfoNCE", 2, 4, 3, &w, &[], &|g, ctx, _| {
        infonce_soft_share(&g[0], &g[1], &mix(ctx.shard.global()), 0.2, true, ctx.shard)
    });
    parity("soft NT-Xent", 2, 4, 3, &w, &[], &|g, ctx, _| {
        ntxent_soft_share(&g[0], &g[1], &mix(ctx.shard.global()), 0.2, ctx.shard)
    });
    parity("SupCon mixed labels", 2, 4, 3, &w, &[], &|g, ctx, _| {
        let n = ctx.shard.global();
        supcon_soft_share(g, &probs_tensor(&soft_labels(n, &mix(n), 3)), 0.1, ctx)
    });
}

#[test]
fn remaining_losses_match_finite_differences() {
    let (a, b, c3) = (randn(6, 4, 140), randn(6, 4, 141), randn(6, 4, 142));
    let m = mix(6);
    let lab = labels9(6);
    let ctx = Ctx::solo(6);
    let checks: Vec<(&str, Box<dyn Fn(&Tensor) -> Tensor>)> = vec![
        (
            "multi NT-Xent",
            Box::new(|x| {
                ntxent_multi_share(&[x.shallow_clone(), b.shallow_clone(), c3.shallow_clone()], 0.3, &ctx).unwrap()
            }),
        ),
        ("InfoNCE", Box::new(|x| infonce_share(x, &b, 0.3, true, Shard::solo(6)).unwrap())),
        ("i-Mix InfoNCE", Box::new(|x| infonce_soft_share(x, &b, &m, 0.3, true, Shard::solo(6)).unwrap())),
        ("negative cosine", Box::new(|x| negative_cosine_share(x, &b, Shard::solo(6)).unwrap())),
        ("normalised MSE", Box::new(|x| normalized_mse_share(x, &b, Shard::solo(6)).unwrap())),
        ("contrastive squared", Box::new(|x| contrastive_share(x, &lab, 0.1, 1.0, true, &ctx).unwrap())),
        ("triplet semi-hard", Box::new(|x| triplet_share(x, &lab, 0.5, Mining::SemiHard, &ctx).unwrap())),
    ];
    for (name, f) in &checks {
        let e = rel_err(&autograd(&a, f), &finite_diff(&a, |x| f(x).double_value(&[]), 1e-6));
        assert!(e < 1e-6, "{name}: autograd vs finite differences {e:e}");
    }
}
