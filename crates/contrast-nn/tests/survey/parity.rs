//! P-rank parity of every batch loss through the engine (leaf embeddings per
//! rank), batches of one per rank, extremes and bad parameters.

use super::*;
use contrast_comm::{Collective, Solo, Threads};
use contrast_nn::GlobalBatch;
use tch::{Kind, Tensor};

pub(super) struct RankOut {
    pub(super) loss: f64,
    pub(super) leaf_grads: Vec<Vec<f64>>,
    pub(super) param_grads: Vec<Vec<f64>>,
}

pub(super) fn run_leaves<C: Collective>(
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

pub(super) fn parity(
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

pub(super) fn labels_for(n: usize) -> Tensor {
    Tensor::from_slice(&(0..n as i64).map(|i| (i * 7 + 3) % 4).collect::<Vec<_>>())
}

#[test]
pub(super) fn every_batch_loss_is_exact_across_ranks() {
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
    parity("CPC", 2, 5, 3, &w, &wk, &|g, ctx, p| cpc_share(&g[0], &g[1], &p[0], None, ctx.shard));
    parity("CPC cosine", 2, 5, 3, &w, &wk, &|g, ctx, p| cpc_share(&g[0], &g[1], &p[0], Some(0.1), ctx.shard));
}

#[test]
pub(super) fn batch_of_one_per_rank_is_exact() {
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
    parity("CPC B=1", 2, 4, 1, &w, &wk, &|g, ctx, p| cpc_share(&g[0], &g[1], &p[0], None, ctx.shard));
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
pub(super) fn no_nan_or_inf_at_the_extremes() {
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
pub(super) fn bad_parameters_fail_clearly() {
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
    assert!(err(sinkhorn(&a, 0.0, 3, 4, &Ctx::solo(4))).contains("epsilon"));
    assert!(err(cpc_share(&a, &b, &randn(2, 2, 1), None, Shard::solo(4))).contains("W must be"));
}

// ---------- metric-learning losses ----------
