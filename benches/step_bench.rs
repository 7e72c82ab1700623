//! Our side of `benches/step_vs_ddp.py`: SimCLR steps (configs/simclr.yaml's
//! encoder and head, NT-Xent over the global batch, AdamW at a constant rate,
//! no weight decay) on in-memory batches, under `mpirun -n P`.
//!
//!     launch/mpirun.sh -n 2 target/release/step_bench --global-batch 256 --steps 10 --out DIR [--write] [--double]
//!         [--method clip] [--vit-b32] [--resnet18] [--device cuda] [--no-overlap]
//!
//! `--method clip` trains configs/clip.yaml's towers (random captions of 48
//! tokens); `--vit-b32` swaps the image tower for configs/clip_vit.yaml's ViT-B/32
//! at 224×224×3 (and its 12-layer text tower); `--resnet18` swaps SimCLR's
//! convnet for a group-norm ResNet-18 with the CIFAR stem; `--device cuda` runs on the local
//! rank's GPU (`launch/gpu-check.sh`). Rank 0 prints the median samples/s of
//! steps 2 onwards. The PyTorch comparison covers the SimCLR default only.
//!
//! `--double` trains in f64 (the parity check: f32 rounding, amplified by
//! Adam's normalised updates, drifts past 1e-4 within ten steps).
//!
//! With `--write`, rank 0 first writes the initial weights (`DIR/init.safetensors`)
//! and the batches (`DIR/batches.safetensors`, `b<k>`: `[2, G, 1, 28, 28]`) that
//! the PyTorch side (`benches/pytorch_step.py`) loads. Rank 0 writes
//! `DIR/ours.json`: losses, seconds per step, peak RSS of every rank. The
//! allocator and its options are the trainer's (`trainer::alloc`).

use contrast_comm::{Collective, Comm};
use contrast_config::{LossKind, ModelConfig, Norm, TextConfig};
use contrast_nn::encoder::text::Captions;
use contrast_nn::method::{build, Batch, Method, Spec};
use contrast_nn::optim::{Optimizer, OptimizerKind};
use contrast_nn::GlobalBatch;
use std::path::PathBuf;
use std::time::Instant;
use tch::{Device, Kind, Tensor};

#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// Distinct batches the steps cycle through.
const BATCHES: usize = 2;
const LR: f64 = 1e-3;

struct Args {
    global: usize,
    steps: usize,
    out: PathBuf,
    write: bool,
    double: bool,
    clip: bool,
    vit: bool,
    resnet: bool,
    device: Device,
    overlap: bool,
}

fn args() -> Args {
    let mut a = Args {
        global: 256,
        steps: 10,
        out: PathBuf::from("."),
        write: false,
        double: false,
        clip: false,
        vit: false,
        resnet: false,
        device: Device::Cpu,
        overlap: true,
    };
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        match k.as_str() {
            "--global-batch" => a.global = it.next().and_then(|v| v.parse().ok()).expect("--global-batch N"),
            "--steps" => a.steps = it.next().and_then(|v| v.parse().ok()).expect("--steps N"),
            "--out" => a.out = PathBuf::from(it.next().expect("--out DIR")),
            "--write" => a.write = true,
            "--double" => a.double = true,
            "--method" => {
                a.clip = match it.next().as_deref() {
                    Some("simclr") => false,
                    Some("clip") => true,
                    other => panic!("--method simclr|clip, got {other:?}"),
                }
            }
            "--vit-b32" => a.vit = true,
            "--resnet18" => a.resnet = true,
            "--no-overlap" => a.overlap = false,
            "--device" => {
                a.device = match it.next().as_deref() {
                    Some("cpu") => Device::Cpu,
                    Some("cuda") => Device::Cuda(0),
                    other => panic!("--device cpu|cuda, got {other:?}"),
                }
            }
            "--bench" => {}
            other => panic!("unknown argument {other}"),
        }
    }
    a
}

/// configs/simclr.yaml's model: convnet width 32, embed 1024, group norm; head
/// 1024→512→64. With `--method clip`, configs/clip.yaml's towers, or
/// configs/clip_vit.yaml's with `--vit-b32`.
fn method(a: &Args, local: usize, kind: Kind) -> Box<dyn Method> {
    let (name, loss) = if a.clip { ("clip", LossKind::Clip) } else { ("simclr", LossKind::NtXent) };
    let mut spec = Spec::new(contrast_nn::method::plan(name).unwrap(), loss, local);
    spec.model = ModelConfig { proj_dim: 64, proj_hidden: if a.clip { 0 } else { 512 }, ..Default::default() };
    spec.model.encoder_keys.set("width", 32);
    spec.model.encoder_keys.set("embed_dim", 1024);
    spec.model.encoder_keys.set("norm", Norm::Group);
    spec.model.text = TextConfig { width: 64, layers: 2, heads: 4, context: CTX, ..Default::default() };
    if a.resnet {
        // configs/simclr_resnet18.yaml's encoder: group norm, the CIFAR stem at 28 px.
        spec.model.encoder = "resnet18".into();
        spec.model.encoder_keys = Default::default();
    }
    if a.vit {
        spec.model.encoder = "vit_base".into();
        spec.model.encoder_keys = Default::default();
        let vit = "{patch_size: 32, pre_norm: true, patch_bias: false}";
        spec.model.encoder_keys.set("vit", yaml_serde::from_str::<yaml_serde::Value>(vit).unwrap());
        spec.model.proj_dim = 512;
        spec.model.text = TextConfig { width: 512, layers: 12, heads: 8, context: CTX, ..Default::default() };
        (spec.in_channels, spec.image_size) = (3, 224);
    }
    spec.loss_cfg.temperature = Some(if a.clip { 0.07 } else { 0.2 });
    spec.kind = kind;
    spec.device = a.device;
    build(&spec).unwrap()
}

/// Caption length of `--method clip`.
const CTX: i64 = 48;

/// Global batch k: `[2, G, C, S, S]`, the same on every rank.
fn global_batch(k: usize, global: usize, vit: bool) -> Tensor {
    tch::manual_seed(1000 + k as i64);
    let (c, side) = if vit { (3, 224) } else { (1, 28) };
    Tensor::randn([2, global as i64, c, side, side], tch::kind::FLOAT_CPU)
}

fn main() {
    let a = args();
    let comm = Comm::from_env().unwrap();
    assert_eq!(trainer::alloc::dirty_decay_ms(), Some(-1), "the trainer's allocator options");
    tch::set_num_threads(1);
    let (rank, world) = (comm.rank(), comm.world_size());
    assert_eq!(a.global % world, 0, "--global-batch must be a multiple of the ranks");
    let local = a.global / world;
    tch::manual_seed(0);
    let kind = if a.double { Kind::Double } else { Kind::Float };
    let m = method(&a, local, kind);
    let params = m.params();
    let batches: Vec<Tensor> = (0..BATCHES).map(|k| global_batch(k, a.global, a.vit)).collect();
    // Random captions of the global batch for CLIP (the first view pairs with them).
    tch::manual_seed(2000);
    let tokens = Tensor::randint_low(1, 250, [a.global as i64, CTX], tch::kind::INT64_CPU);
    let ends = Tensor::randint_low(4, CTX, [a.global as i64], tch::kind::INT64_CPU);
    if a.write && rank == 0 {
        std::fs::create_dir_all(&a.out).unwrap();
        let named: Vec<(String, Tensor)> = params.iter().map(|p| (p.name.clone(), p.tensor.detach())).collect();
        Tensor::write_safetensors(&named, a.out.join("init.safetensors")).unwrap();
        let mut named: Vec<(String, Tensor)> =
            batches.iter().enumerate().map(|(k, b)| (format!("b{k}"), b.shallow_clone())).collect();
        named.extend([("tokens".to_string(), tokens.shallow_clone()), ("ends".to_string(), ends.shallow_clone())]);
        Tensor::write_safetensors(&named, a.out.join("batches.safetensors")).unwrap();
    }
    let local_views: Vec<[Tensor; 2]> = batches
        .iter()
        .map(|b| {
            [0, 1].map(|v| b.get(v).narrow(0, (rank * local) as i64, local as i64).to_kind(kind).to_device(a.device))
        })
        .collect();
    let (r0, b) = ((rank * local) as i64, local as i64);
    let captions = Captions::from_host(
        &Vec::<i64>::try_from(&tokens.narrow(0, r0, b).reshape([-1])).unwrap(),
        &Vec::<i64>::try_from(&ends.narrow(0, r0, b)).unwrap(),
        a.device,
    );
    drop(batches);
    let adamw = OptimizerKind::AdamW { beta1: 0.9, beta2: 0.999, eps: 1e-8 };
    let mut opt = Optimizer::new(adamw, 0.0, params);
    let buffers = contrast_nn::engine::GradBuffers::default();
    let engine = GlobalBatch::new(&comm, local).overlap(a.overlap).buffers(&buffers);
    let (mut losses, mut seconds) = (Vec::new(), Vec::new());
    for step in 0..a.steps {
        let t0 = Instant::now();
        let both = &local_views[step % BATCHES];
        let views = if a.clip { &both[..1] } else { &both[..] };
        let captions = a.clip.then_some(&captions);
        let batch = Batch { step, views, captions, labels: None, mix: None, indices: &[] };
        opt.zero_grad();
        let towers = m.forward(&batch, &comm).unwrap();
        let out =
            engine.step_towers(&towers, &opt.tensors(), &[], |g, ctx| Ok(m.loss_share(g, &batch, ctx)?.loss)).unwrap();
        opt.step(LR);
        if a.device != Device::Cpu {
            tch::Cuda::synchronize(0);
        }
        losses.push(out.loss);
        seconds.push(t0.elapsed().as_secs_f64());
    }
    let mut rss = vec![0.0; world];
    rss[rank] = trainer::alloc::ProcessCounters::now().peak_rss_bytes as f64;
    comm.all_reduce_sum(&mut rss);
    if rank == 0 {
        let mut timed: Vec<f64> = seconds.iter().skip(1).copied().collect();
        timed.sort_by(f64::total_cmp);
        if let Some(median) = timed.get(timed.len() / 2) {
            println!(
                "{} samples/s (global batch {}, median of steps 2..{})",
                a.global as f64 / median,
                a.global,
                a.steps
            );
        }
        let json = format!(
            "{{\"losses\": {losses:?}, \"seconds\": {seconds:?}, \"peak_rss_bytes\": {rss:?}, \"kind\": \"{kind:?}\"}}"
        );
        std::fs::write(a.out.join("ours.json"), json).unwrap();
    }
}
