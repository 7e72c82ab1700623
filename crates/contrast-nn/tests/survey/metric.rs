//! The metric-learning losses against slow loop references, finite
//! differences and P-rank parity.

use super::*;
use tch::{Kind, Tensor};

pub(super) fn dist(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| (x - y) * (x - y)).sum::<f64>().sqrt()
}

pub(super) fn avg_nz(v: &[f64]) -> f64 {
    let c = v.iter().filter(|x| **x > 0.0).count();
    if c == 0 {
        0.0
    } else {
        v.iter().sum::<f64>() / c as f64
    }
}

pub(super) const LABELS: [i64; 9] = [0, 1, 0, 2, 1, 0, 2, 2, 1];

/// pytorch-metric-learning `ContrastiveLoss` (losses/contrastive_loss.py) over all ordered pairs.
pub(super) fn contrastive_loop(z: &Tensor, pm: f64, nm: f64, squared: bool) -> f64 {
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
pub(super) fn triplet_loop(z: &Tensor, margin: f64, mining: Mining) -> f64 {
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
pub(super) fn lifted_loop(z: &Tensor, m: f64, hard: bool) -> f64 {
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

pub(super) fn generalized_lifted_loop(z: &Tensor, m: f64) -> f64 {
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

pub(super) fn snn_loop(z: &Tensor, t: f64) -> f64 {
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

pub(super) fn nce_loop(za: &Tensor, zb: &Tensor, t: f64, noise: f64) -> f64 {
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

pub(super) fn lab() -> Tensor {
    Tensor::from_slice(&LABELS)
}

#[test]
pub(super) fn metric_losses_match_loop_references() {
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
pub(super) fn metric_loss_gradients_match_finite_differences() {
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

pub(super) fn labels9(n: usize) -> Tensor {
    Tensor::from_slice(&(0..n as i64).map(|i| (i * 5 + 1) % 3).collect::<Vec<_>>())
}

#[test]
pub(super) fn metric_losses_are_exact_across_ranks() {
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
pub(super) fn metric_losses_stay_finite_at_extremes() {
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
