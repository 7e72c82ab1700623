//! The encoders against PyTorch eager on the same libtorch: one SimCLR step
//! (two views through the encoder and a 2-layer projection MLP, NT-Xent at
//! t = 0.2 on the global batch, backward) for a ResNet-18 with the CIFAR stem
//! at 32 px, a ResNet-50 at 224 px and a ViT-S/16 at 224 px, group norm in the
//! ResNets on both sides. The PyTorch side (`benches/pytorch_encoders.py`) runs
//! in the project's venv in the same run, with the same thread count; the ViT
//! baseline needs timm in it (`pip install timm`), else that row says so.
//!
//!     source launch/env.sh && cargo bench -p contrast-benches --bench encoders
//!
//! Prints image pairs per second for both and the ratio contrast / PyTorch
//! (the target on CPU is ≥ 0.9: the kernels are the same, only per-op overhead
//! differs). `CONTRAST_BENCH_QUICK=1` runs the 32-px case alone.

use contrast_comm::Solo;
use contrast_config::{LossKind, ModelConfig};
use contrast_nn::loss::ntxent_share;
use contrast_nn::method::{build, plan, Batch, Spec};
use contrast_nn::GlobalBatch;
use std::path::Path;
use tch::{Device, Kind, Tensor};

/// (name, encoder, its keys, image size, batch, warm-up, repetitions).
const CASES: [(&str, &str, &str, i64, i64, usize, usize); 3] = [
    ("resnet18_cifar32", "resnet18", "{stem: cifar}", 32, 64, 2, 5),
    ("resnet50_224", "resnet50", "{stem: imagenet}", 224, 4, 1, 3),
    ("vit_small_224", "vit_small", "{}", 224, 8, 1, 3),
];

fn contrast_pairs_per_s(encoder: &str, keys: &str, size: i64, n: i64, warmup: usize, reps: usize) -> f64 {
    let mut spec = Spec::new(plan("simclr").unwrap(), LossKind::NtXent, n as usize);
    spec.model = ModelConfig { encoder: encoder.into(), proj_hidden: 512, proj_dim: 64, ..Default::default() };
    spec.model.encoder_keys = yaml_serde::from_str(keys).unwrap();
    (spec.in_channels, spec.image_size) = (3, size);
    let method = build(&spec).unwrap();
    let params: Vec<Tensor> = method.params().into_iter().map(|p| p.tensor).collect();
    let views = [
        Tensor::randn([n, 3, size, size], (Kind::Float, Device::Cpu)),
        Tensor::randn([n, 3, size, size], (Kind::Float, Device::Cpu)),
    ];
    let batch = Batch { step: 0, views: &views, captions: None, labels: None, mix: None, indices: &[] };
    let engine = GlobalBatch::new(&Solo, n as usize);
    let secs = contrast_benches::median_secs(warmup, reps, || {
        for p in &params {
            p.shallow_clone().zero_grad();
        }
        let t = method.forward(&batch, &Solo).unwrap().grad;
        engine.step(&t, &params, |g, ctx| ntxent_share(&g[0], &g[1], 0.2, ctx.shard)).unwrap();
    });
    n as f64 / secs
}

fn pytorch_pairs_per_s(case: &str, n: i64, threads: usize, warmup: usize, reps: usize) -> Result<f64, String> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    let py = dir.join("../.venv/bin/python");
    let out = std::process::Command::new(&py)
        .arg(dir.join("pytorch_encoders.py"))
        .args([case.to_string(), n.to_string(), threads.to_string(), warmup.to_string(), reps.to_string()])
        .output()
        .map_err(|e| format!("{}: {e}", py.display()))?;
    let text = String::from_utf8_lossy(&out.stdout);
    let value = text.lines().find_map(|l| l.strip_prefix("pairs_per_s ")?.trim().parse().ok());
    value.ok_or_else(|| String::from_utf8_lossy(&out.stderr).lines().last().unwrap_or("no output").to_string())
}

fn main() {
    let threads = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    tch::set_num_threads(threads as i32);
    tch::manual_seed(0);
    let quick = std::env::var("CONTRAST_BENCH_QUICK").is_ok_and(|v| v == "1");
    println!("SimCLR step (two views, encoder + MLP head, NT-Xent, backward), {threads} threads, image pairs/s");
    println!("{:<18} {:>6} {:>12} {:>12} {:>8}", "case", "batch", "contrast", "pytorch", "ratio");
    for (case, encoder, keys, size, n, warmup, reps) in CASES {
        if quick && size > 32 {
            continue;
        }
        let ours = contrast_pairs_per_s(encoder, keys, size, n, warmup, reps);
        match pytorch_pairs_per_s(case, n, threads, warmup, reps) {
            Ok(theirs) => println!("{case:<18} {n:>6} {ours:>12.2} {theirs:>12.2} {:>8.3}", ours / theirs),
            Err(e) => println!("{case:<18} {n:>6} {ours:>12.2} {:>12} {:>8}   (PyTorch baseline: {e})", "-", "-"),
        }
    }
}
