//! Soft-target (mixed-batch) losses against loops, their reduction to the hard
//! ones, parity, and finite differences of the remaining losses.

use super::*;
use tch::Tensor;

pub(super) fn mix(n: usize) -> Mix {
    // A fixed permutation (i ↦ 5i + 2 mod n is one when 5 ∤ n) and λ in (0, 1), as the data side would draw them.
    let partner: Vec<i64> = if n % 5 != 0 {
        (0..n as i64).map(|i| (i * 5 + 2) % n as i64).collect()
    } else {
        (0..n as i64).rev().collect()
    };
    Mix { partner, lambda: (0..n).map(|i| 0.2 + 0.6 * ((i * 7 % 11) as f64 / 10.0)).collect() }
}

/// i-Mix (Lee et al. 2021, `imix` in their N-pair/SimCLR code): soft CE over keys.
pub(super) fn infonce_soft_loop(q: &Tensor, k: &Tensor, m: &Mix, t: f64) -> f64 {
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

pub(super) fn ntxent_soft_loop(za: &Tensor, zb: &Tensor, m: &Mix, t: f64) -> f64 {
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

pub(super) fn supcon_soft_loop(views: &[Tensor], probs: &[Vec<f64>], t: f64) -> f64 {
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

pub(super) fn soft_labels(n: usize, m: &Mix, classes: usize) -> Vec<Vec<f64>> {
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

pub(super) fn probs_tensor(p: &[Vec<f64>]) -> Tensor {
    Tensor::from_slice(&p.concat()).view([p.len() as i64, p[0].len() as i64])
}

#[test]
pub(super) fn soft_target_losses_match_loops_and_reduce_to_the_hard_ones() {
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
pub(super) fn soft_target_losses_are_exact_across_ranks() {
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
pub(super) fn remaining_losses_match_finite_differences() {
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
