//! Every loss of the survey through the global-batch engine under real MPI,
//! checking itself (rsmpi's examples do the same): each rank computes the
//! loss and gradients of its rows on P ranks, and the whole-batch reference on
//! one process (`Solo`) from the same data; the example fails (exit 1) if any
//! loss, embedding gradient or head-parameter gradient differs.
//!
//!     launch/mpirun.sh -n 3 target/release/examples/loss_parity
//!
//! The trainer's tests run it on 2 and 3 ranks.

use contrast_comm::{Collective, Comm, Solo};
use contrast_nn::loss::*;
use contrast_nn::GlobalBatch;
use tch::Tensor;

type Head = dyn Fn(&[Tensor], &Ctx, &[Tensor]) -> contrast_nn::Result<Tensor>;

fn data(n: usize, d: usize, seed: u64) -> Vec<f64> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n * d)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0
        })
        .collect()
}

fn labels(n: usize) -> Tensor {
    Tensor::from_slice(&(0..n as i64).map(|i| (i * 5 + 1) % 3).collect::<Vec<_>>())
}

struct Out {
    loss: f64,
    leaf: Vec<Vec<f64>>,
    params: Vec<Vec<f64>>,
}

fn run<C: Collective>(
    comm: &C,
    towers: &[Vec<f64>],
    d: usize,
    b: usize,
    params: &[(Vec<f64>, Vec<i64>)],
    head: &Head,
) -> Out {
    let r = comm.rank();
    let leaves: Vec<Tensor> = towers
        .iter()
        .map(|v| Tensor::from_slice(&v[r * b * d..(r + 1) * b * d]).view([b as i64, d as i64]).set_requires_grad(true))
        .collect();
    let ps: Vec<Tensor> =
        params.iter().map(|(v, s)| Tensor::from_slice(v).view(s.as_slice()).set_requires_grad(true)).collect();
    let out = GlobalBatch::new(comm, b).step(&leaves, &ps, |g, ctx| head(g, ctx, &ps)).expect("loss");
    let host = |t: &Tensor| contrast_nn::to_host::<f64>(&t.grad());
    Out { loss: out.loss, leaf: leaves.iter().map(host).collect(), params: ps.iter().map(host).collect() }
}

fn main() {
    let comm = Comm::from_env().expect("communicator");
    let (p, r, b, d) = (comm.world_size(), comm.rank(), 3usize, 5usize);
    let n = p * b;
    let protos = vec![(data(6, d, 7), vec![6, d as i64])];
    let w = vec![(data(d, d, 8), vec![d as i64, d as i64])];
    let scale = vec![(vec![10f64.ln()], vec![]), (vec![-10.0], vec![])];
    let cases: Vec<(&str, usize, Vec<(Vec<f64>, Vec<i64>)>, Box<Head>)> = vec![
        ("ntxent", 2, vec![], Box::new(|g, c, _| ntxent_share(&g[0], &g[1], 0.2, c.shard))),
        ("ntxent_multi", 3, vec![], Box::new(|g, c, _| ntxent_multi_share(g, 0.2, c))),
        ("supcon", 2, vec![], Box::new(|g, c, _| supcon_share(g, &labels(c.shard.global()), 0.1, c))),
        ("dclw", 2, vec![], Box::new(|g, c, _| dcl_share(&g[0], &g[1], 0.1, Some(0.5), c.shard))),
        ("hard_negative", 2, vec![], Box::new(|g, c, _| debiased_share(&g[0], &g[1], 0.5, 0.1, 1.0, c.shard))),
        ("clip", 2, vec![scale[0].clone()], Box::new(|g, c, p| clip_share(&g[0], &g[1], &p[0], c.shard))),
        ("siglip", 2, scale.clone(), Box::new(|g, c, p| siglip_share(&g[0], &g[1], &p[0], &p[1], c.shard))),
        (
            "barlow_twins",
            2,
            vec![],
            Box::new(|g, c, _| barlow_twins_share(&g[0], &g[1], 5e-3, Standardise::BatchNorm, c.shard)),
        ),
        ("byol", 2, vec![], Box::new(|g, c, _| normalized_mse_share(&g[0], &g[1], c.shard))),
        ("swav", 3, protos, Box::new(|g, c, p| swav_share(g, &p[0], 0.1, 0.05, 3, &[0, 1], c))),
        ("infonce", 2, vec![], Box::new(|g, c, _| infonce_share(&g[0], &g[1], 0.1, true, c.shard))),
        ("cpc", 2, w.clone(), Box::new(|g, c, p| cpc_share(&g[0], &g[1], &p[0], None, c.shard))),
        ("cpc_cosine", 2, w, Box::new(|g, c, p| cpc_share(&g[0], &g[1], &p[0], Some(0.1), c.shard))),
        ("nce", 2, vec![], Box::new(|g, c, _| nce_share(&g[0], &g[1], 0.5, 1000.0, c.shard))),
        (
            "contrastive",
            1,
            vec![],
            Box::new(|g, c, _| contrastive_share(&g[0], &labels(c.shard.global()), 0.0, 1.0, false, c)),
        ),
        (
            "triplet_semihard",
            1,
            vec![],
            Box::new(|g, c, _| triplet_share(&g[0], &labels(c.shard.global()), 0.5, Mining::SemiHard, c)),
        ),
        ("lifted_hard", 1, vec![], Box::new(|g, c, _| lifted_hard_share(&g[0], &labels(c.shard.global()), 1.0, c))),
        ("npair", 1, vec![], Box::new(|g, c, _| npair_share(&g[0], &labels(c.shard.global()), NPairForm::Cosine, c))),
        (
            "npair_dot",
            1,
            vec![],
            Box::new(|g, c, _| npair_share(&g[0], &labels(c.shard.global()), NPairForm::Dot { l2_reg: 0.002 }, c)),
        ),
        ("snn", 1, vec![], Box::new(|g, c, _| snn_share(&g[0], &labels(c.shard.global()), 0.7, c))),
    ];
    let mut failures = 0;
    for (name, towers, params, head) in &cases {
        let inputs: Vec<Vec<f64>> = (0..*towers).map(|k| data(n, d, 100 + k as u64)).collect();
        let solo = run(&Solo, &inputs, d, n, params, head.as_ref());
        let mine = run(&comm, &inputs, d, b, params, head.as_ref());
        let mut worst = (mine.loss - solo.loss).abs() / solo.loss.abs().max(1.0);
        for (k, g) in mine.leaf.iter().enumerate() {
            let want = &solo.leaf[k][r * b * d..(r + 1) * b * d];
            let scale = want.iter().fold(1e-12f64, |m, v| m.max(v.abs()));
            worst = worst.max(g.iter().zip(want).fold(0f64, |m, (a, b)| m.max((a - b).abs())) / scale);
        }
        for (g, want) in mine.params.iter().zip(&solo.params) {
            let scale = want.iter().fold(1e-12f64, |m, v| m.max(v.abs()));
            worst = worst.max(g.iter().zip(want).fold(0f64, |m, (a, b)| m.max((a - b).abs())) / scale);
        }
        let mut all = [worst];
        comm.all_reduce_max(&mut all);
        let ok = all[0] < 1e-9;
        failures += usize::from(!ok);
        if r == 0 {
            println!(
                "{name:>18}: P={p} loss {:.6}  max relative difference to 1 rank {:.1e}  {}",
                mine.loss,
                all[0],
                if ok { "ok" } else { "FAIL" }
            );
        }
    }
    if failures > 0 {
        if r == 0 {
            eprintln!("{failures} loss(es) differ between {p} ranks and 1 rank");
        }
        comm.abort_job(1);
        std::process::exit(1);
    }
}
