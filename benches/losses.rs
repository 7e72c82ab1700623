//! Forward + backward time of every loss on one process at global batch
//! N ∈ {256, 1024, 4096}, d = 128, f32, with the ratio to a plain N×128×N
//! matrix multiply (the logits' cost) measured in the same run.
//!
//!     source launch/env.sh && cargo bench -p contrast-benches --bench losses
//!     (CONTRAST_BENCH_SIZES=256,1024 to choose the sizes;
//!      CONTRAST_BENCH_ONLY=ntxent,clip for the losses whose names start so)
//!
//! NT-Xent (and its multi-positive form), SupCon, CLIP, SigLIP, DCL/DCLW and NCE stream their logits in blocks (loss/stream.rs);
//! the `_dense` rows are the materialised reference forms, for comparison.
//!
//! Triplet "all" and "semi_hard" enumerate N² triplets per anchor (O(N³)) and
//! are measured up to N = 1024.

use contrast_nn::loss::*;
use tch::{Device, Kind, Tensor};

type LossFn = Box<dyn Fn(&[Tensor], &Tensor, &[Tensor]) -> Tensor>;

fn main() {
    let threads = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    tch::set_num_threads(threads as i32);
    tch::manual_seed(0);
    let sizes: Vec<i64> = std::env::var("CONTRAST_BENCH_SIZES")
        .ok()
        .map(|s| s.split(',').filter_map(|x| x.trim().parse().ok()).collect())
        .unwrap_or_else(|| vec![256, 1024, 4096]);
    let d = 128i64;
    let solo = |n: i64| Ctx::solo(n as usize);
    let losses: Vec<(&str, usize, Option<i64>, LossFn)> = vec![
        (
            "ntxent",
            2,
            None,
            Box::new(|v, _, _| ntxent_share(&v[0], &v[1], 0.2, Shard::solo(v[0].size()[0] as usize)).unwrap()),
        ),
        (
            "ntxent_dense",
            2,
            None,
            Box::new(|v, _, _| ntxent_dense_share(&v[0], &v[1], 0.2, Shard::solo(v[0].size()[0] as usize)).unwrap()),
        ),
        (
            "ntxent_multi(3)",
            3,
            None,
            Box::new(move |v, _, _| ntxent_multi_share(v, 0.2, &solo(v[0].size()[0])).unwrap()),
        ),
        ("supcon", 2, None, Box::new(move |v, y, _| supcon_share(v, y, 0.1, &solo(v[0].size()[0])).unwrap())),
        (
            "supcon_dense",
            2,
            None,
            Box::new(move |v, y, _| {
                let (n, views) = (v[0].size()[0], v.len() as i64);
                let ids = y.repeat([views]);
                multi_positive_dense(&Tensor::cat(v, 0), &ids, 0.1, &solo(n), views as usize, Reduce::AvgNonZero)
                    .unwrap()
            }),
        ),
        (
            "dcl",
            2,
            None,
            Box::new(|v, _, _| dcl_share(&v[0], &v[1], 0.1, None, Shard::solo(v[0].size()[0] as usize)).unwrap()),
        ),
        (
            "dclw_dense",
            2,
            None,
            Box::new(|v, _, _| {
                dcl_dense_share(&v[0], &v[1], 0.1, Some(0.5), Shard::solo(v[0].size()[0] as usize)).unwrap()
            }),
        ),
        (
            "dclw",
            2,
            None,
            Box::new(|v, _, _| dcl_share(&v[0], &v[1], 0.1, Some(0.5), Shard::solo(v[0].size()[0] as usize)).unwrap()),
        ),
        (
            "debiased",
            2,
            None,
            Box::new(|v, _, _| {
                debiased_share(&v[0], &v[1], 0.5, 0.1, 0.0, Shard::solo(v[0].size()[0] as usize)).unwrap()
            }),
        ),
        (
            "debiased_dense",
            2,
            None,
            Box::new(|v, _, _| {
                debiased_dense_share(&v[0], &v[1], 0.5, 0.1, 0.0, Shard::solo(v[0].size()[0] as usize)).unwrap()
            }),
        ),
        (
            "hard_negative",
            2,
            None,
            Box::new(|v, _, _| {
                debiased_share(&v[0], &v[1], 0.5, 0.1, 1.0, Shard::solo(v[0].size()[0] as usize)).unwrap()
            }),
        ),
        (
            "hard_negative_dense",
            2,
            None,
            Box::new(|v, _, _| {
                debiased_dense_share(&v[0], &v[1], 0.5, 0.1, 1.0, Shard::solo(v[0].size()[0] as usize)).unwrap()
            }),
        ),
        (
            "clip",
            2,
            None,
            Box::new(|v, _, p| clip_share(&v[0], &v[1], &p[0], Shard::solo(v[0].size()[0] as usize)).unwrap()),
        ),
        (
            "clip_dense",
            2,
            None,
            Box::new(|v, _, p| clip_dense_share(&v[0], &v[1], &p[0], Shard::solo(v[0].size()[0] as usize)).unwrap()),
        ),
        (
            "siglip",
            2,
            None,
            Box::new(|v, _, p| siglip_share(&v[0], &v[1], &p[0], &p[1], Shard::solo(v[0].size()[0] as usize)).unwrap()),
        ),
        (
            "siglip_dense",
            2,
            None,
            Box::new(|v, _, p| {
                siglip_dense_share(&v[0], &v[1], &p[0], &p[1], Shard::solo(v[0].size()[0] as usize)).unwrap()
            }),
        ),
        (
            "barlow_twins",
            2,
            None,
            Box::new(|v, _, _| {
                barlow_twins_share(&v[0], &v[1], 5e-3, Standardise::BatchNorm, Shard::solo(v[0].size()[0] as usize))
                    .unwrap()
            }),
        ),
        (
            "byol_nmse",
            2,
            None,
            Box::new(|v, _, _| normalized_mse_share(&v[0], &v[1], Shard::solo(v[0].size()[0] as usize)).unwrap()),
        ),
        (
            "swav(K=512)",
            2,
            None,
            Box::new(move |v, _, p| swav_share(v, &p[2], 0.1, 0.05, 3, &[0, 1], &solo(v[0].size()[0])).unwrap()),
        ),
        (
            "infonce",
            2,
            None,
            Box::new(|v, _, _| infonce_share(&v[0], &v[1], 0.1, true, Shard::solo(v[0].size()[0] as usize)).unwrap()),
        ),
        (
            "cpc",
            2,
            None,
            Box::new(|v, _, p| cpc_share(&v[0], &v[1], &p[3], None, Shard::solo(v[0].size()[0] as usize)).unwrap()),
        ),
        (
            "nce",
            2,
            None,
            Box::new(|v, _, _| nce_share(&v[0], &v[1], 0.1, 60000.0, Shard::solo(v[0].size()[0] as usize)).unwrap()),
        ),
        (
            "nce_dense",
            2,
            None,
            Box::new(|v, _, _| {
                nce_dense_share(&v[0], &v[1], 0.1, 60000.0, Shard::solo(v[0].size()[0] as usize)).unwrap()
            }),
        ),
        (
            "contrastive",
            1,
            None,
            Box::new(move |v, y, _| contrastive_share(&v[0], y, 0.0, 1.0, false, &solo(v[0].size()[0])).unwrap()),
        ),
        (
            "triplet_all",
            1,
            Some(1024),
            Box::new(move |v, y, _| triplet_share(&v[0], y, 0.05, Mining::All, &solo(v[0].size()[0])).unwrap()),
        ),
        (
            "triplet_semi_hard",
            1,
            Some(1024),
            Box::new(move |v, y, _| triplet_share(&v[0], y, 0.05, Mining::SemiHard, &solo(v[0].size()[0])).unwrap()),
        ),
        (
            "triplet_batch_hard",
            1,
            None,
            Box::new(move |v, y, _| triplet_share(&v[0], y, 0.05, Mining::BatchHard, &solo(v[0].size()[0])).unwrap()),
        ),
        (
            "lifted",
            1,
            None,
            Box::new(move |v, y, _| lifted_smooth_share(&v[0], y, 1.0, 0.0, &solo(v[0].size()[0])).unwrap()),
        ),
        (
            "lifted_hard",
            1,
            None,
            Box::new(move |v, y, _| lifted_hard_share(&v[0], y, 1.0, &solo(v[0].size()[0])).unwrap()),
        ),
        (
            "generalized_lifted",
            1,
            None,
            Box::new(move |v, y, _| generalized_lifted_share(&v[0], y, 1.0, 0.0, &solo(v[0].size()[0])).unwrap()),
        ),
        (
            "npair",
            1,
            None,
            Box::new(move |v, y, _| npair_share(&v[0], y, NPairForm::Cosine, &solo(v[0].size()[0])).unwrap()),
        ),
        ("snn", 1, None, Box::new(move |v, y, _| snn_share(&v[0], y, 1.0, &solo(v[0].size()[0])).unwrap())),
    ];
    println!("loss forward+backward, one process, f32, d={d}, {threads} threads; ratio = loss / (N×{d}×N matmul)");
    println!("{:>20} {:>6} {:>10} {:>10} {:>8}", "loss", "N", "loss ms", "matmul ms", "ratio");
    for &n in &sizes {
        let a = Tensor::randn([n, d], (Kind::Float, Device::Cpu));
        let b = Tensor::randn([n, d], (Kind::Float, Device::Cpu));
        let mm = contrast_benches::median_secs(2, 7, || {
            let _ = a.matmul(&b.tr()).sum(Kind::Float).double_value(&[]);
        });
        let labels = Tensor::arange(n, (Kind::Int64, Device::Cpu)).remainder(64);
        let only: Vec<String> = std::env::var("CONTRAST_BENCH_ONLY")
            .map(|s| s.split(',').map(|x| x.trim().to_string()).collect())
            .unwrap_or_default();
        for (name, views, max_n, f) in &losses {
            if !only.is_empty() && !only.iter().any(|o| name.starts_with(o.as_str())) {
                continue;
            }
            if max_n.is_some_and(|m| n > m) {
                println!("{name:>20} {n:>6} {:>10} {:>10.2} {:>8}", "O(N³): -", mm * 1e3, "-");
                continue;
            }
            let v: Vec<Tensor> = (0..*views)
                .map(|_| Tensor::randn([n, d], (Kind::Float, Device::Cpu)).set_requires_grad(true))
                .collect();
            let params = [
                Tensor::from(10f32.ln()).set_requires_grad(true),
                Tensor::from(-10f32).set_requires_grad(true),
                Tensor::randn([512, d], (Kind::Float, Device::Cpu)).set_requires_grad(true),
                Tensor::randn([d, d], (Kind::Float, Device::Cpu)).set_requires_grad(true),
            ];
            let reps = if n >= 4096 { 3 } else { 5 };
            // Two warm-up calls: the first call of a process pays for allocator and kernel set-up.
            let t = contrast_benches::median_secs(2, reps, || {
                let l = f(&v, &labels, &params);
                l.backward();
            });
            println!("{name:>20} {n:>6} {:>10.2} {:>10.2} {:>8.1}", t * 1e3, mm * 1e3, t / mm);
        }
    }
}
