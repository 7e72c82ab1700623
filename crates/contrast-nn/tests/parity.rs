//! docs/design.md invariant 1: P ranks × B gives the same loss and the same
//! gradient of every parameter as 1 rank × P·B (models without batch statistics).

use crate::common::*;
use contrast_comm::{Collective, Solo, Threads};
use contrast_config::{LossConfig, LossKind, ModelConfig, Norm, TextConfig};
use contrast_nn::encoder::text::Captions;
use contrast_nn::method::{build as build_method, Batch, Method, Spec};
use contrast_nn::GlobalBatch;
use tch::{nn::VarStore, Kind, Tensor};

const SIDE: i64 = 8;
const CTX: i64 = 12;

fn model_config(norm: Norm) -> ModelConfig {
    ModelConfig {
        text: TextConfig { width: 8, layers: 1, heads: 2, context: CTX, ..Default::default() },
        ..convnet_model(4, 32, 8, 6, norm)
    }
}

struct Inputs {
    views: Vec<Vec<f64>>, // each [N, 1, SIDE, SIDE]
    tokens: Vec<i64>,     // [N, CTX]
    ends: Vec<i64>,       // [N]
}

fn inputs(n: usize, seed: u64) -> Inputs {
    let pix = (SIDE * SIDE) as usize;
    let views = (0..2).map(|v| randn_vec(n * pix, seed * 10 + v)).collect();
    let (mut tokens, mut ends) = (Vec::new(), Vec::new());
    for i in 0..n {
        let text = format!("caption number {} of {}", i * 7 % 13, seed);
        let (t, end) = contrast_data::text::Tokenizer::Bytes.encode(&text, CTX as usize).unwrap();
        tokens.extend(t);
        ends.push(end as i64);
    }
    Inputs { views, tokens, ends }
}

type Snapshot = Vec<(String, Vec<f64>, Vec<i64>)>;

fn build(loss: LossKind, norm: Norm, kind: Kind) -> Box<dyn Method> {
    let name = if loss.is_image_text() { "clip" } else { "simclr" };
    let mut spec = Spec::new(contrast_nn::method::plan(name).unwrap(), loss, 1);
    spec.model = model_config(norm);
    spec.loss_cfg =
        LossConfig { temperature: Some(if loss.is_image_text() { 0.07 } else { 0.2 }), ..Default::default() };
    spec.kind = kind;
    spec.device = test_device();
    build_method(&spec).unwrap()
}

fn snapshot(vs: &VarStore) -> Snapshot {
    let mut v: Vec<_> =
        vs.variables().into_iter().map(|(n, t)| (n, contrast_nn::to_host::<f64>(&t), t.size())).collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

fn load(vs: &VarStore, snap: &Snapshot) {
    let vars = vs.variables();
    tch::no_grad(|| {
        for (name, data, shape) in snap {
            let mut t = vars[name].shallow_clone();
            t.copy_(&Tensor::from_slice(data).view(shape.as_slice()).to_kind(t.kind()));
        }
    });
}

/// How the engine runs a step: gradient-cache chunk rows (0: whole), bucket
/// elements of the gradient all-reduce, and whether it overlaps backward.
#[derive(Clone, Copy)]
struct Run {
    chunk: usize,
    bucket: usize,
    overlap: bool,
    /// Gradients as views of kept bucket buffers (`GlobalBatch::buffers`).
    kept: bool,
}

const PLAIN: Run = Run { chunk: 0, bucket: contrast_nn::engine::BUCKET_ELEMENTS, overlap: true, kept: false };

/// One rank's loss and parameter gradients (by name).
fn run_rank<C: Collective>(
    comm: &C,
    (loss, norm, kind): (LossKind, Norm, Kind),
    init: &Snapshot,
    data: &Inputs,
    b: usize,
    run: Run,
) -> (f64, Snapshot) {
    let model = build(loss, norm, kind);
    load(model.var_store(), init);
    let pix = (SIDE * SIDE) as usize;
    let r = comm.rank();
    let views: Vec<Tensor> = data
        .views
        .iter()
        .map(|v| {
            let t = Tensor::from_slice(&v[r * b * pix..(r + 1) * b * pix]).view([b as i64, 1, SIDE, SIDE]);
            t.to_kind(kind).to_device(test_device())
        })
        .collect();
    let captions = Captions::from_host(
        &data.tokens[r * b * CTX as usize..(r + 1) * b * CTX as usize],
        &data.ends[r * b..(r + 1) * b],
        test_device(),
    );
    let params = model.params();
    let tensors: Vec<Tensor> = params.iter().map(|p| p.tensor.shallow_clone()).collect();
    let buffers = contrast_nn::engine::GradBuffers::default();
    let mut engine = GlobalBatch::new(comm, b).bucket_elements(run.bucket).overlap(run.overlap);
    if run.kept {
        engine = engine.buffers(&buffers);
    }
    let labels = Tensor::from_slice(&(0..comm.world_size() * b).map(|i| (i % 3) as i64).collect::<Vec<_>>())
        .to_device(test_device());
    let batch =
        Batch { step: 0, views: &views, captions: Some(&captions), labels: Some(&labels), mix: None, indices: &[] };
    let head = |g: &contrast_nn::Gathered, ctx: &contrast_nn::loss::Ctx| Ok(model.loss_share(g, &batch, ctx)?.loss);
    let out = if run.chunk > 0 {
        // The gradient cache: the model runs on rows [s, s+n) of every input, twice.
        let forward = |s: i64, n: i64| {
            let views: Vec<Tensor> = views.iter().map(|v| v.narrow(0, s, n)).collect();
            let captions = captions.rows(s, n);
            model.forward(&Batch { views: &views, captions: Some(&captions), ..batch }, comm)
        };
        engine.step_chunked(run.chunk, &tensors, &[], forward, head).unwrap()
    } else {
        let towers = model.forward(&batch, comm).unwrap();
        engine.step_towers(&towers, &tensors, &[], head).unwrap()
    };
    let grads = params
        .iter()
        .map(|p| (p.name.clone(), contrast_nn::to_host::<f64>(&p.tensor.grad()), p.tensor.size()))
        .collect();
    (out.loss, grads)
}

fn check(loss: LossKind, norm: Norm, kind: Kind, worlds: &[usize], b: usize, tol: f64) {
    check_run(loss, norm, kind, worlds, b, PLAIN, tol)
}

fn check_chunked(loss: LossKind, norm: Norm, kind: Kind, worlds: &[usize], b: usize, chunk: usize, tol: f64) {
    check_run(loss, norm, kind, worlds, b, Run { chunk, ..PLAIN }, tol)
}

/// P ranks × B, each rank's engine set up as `run`, against 1 rank × P·B run whole.
fn check_run(loss: LossKind, norm: Norm, kind: Kind, worlds: &[usize], b: usize, run: Run, tol: f64) {
    let init = snapshot(build(loss, norm, kind).var_store());
    for &p in worlds {
        let data = inputs(p * b, p as u64);
        let (l1, g1) = run_rank(&Solo, (loss, norm, kind), &init, &data, p * b, PLAIN);
        let ranks = Threads::run(p, |c| run_rank(&c, (loss, norm, kind), &init, &data, b, run));
        for (r, (lp, gp)) in ranks.iter().enumerate() {
            assert!((lp - l1).abs() <= tol * l1.abs(), "{loss:?} P={p} rank {r}: loss {lp} vs {l1}");
            assert_eq!(gp.len(), g1.len());
            // A gradient that is zero in exact arithmetic (a bias in front of Barlow Twins'
            // standardisation) is compared at 1e-6 of the model's largest gradient, not at round-off.
            // In f32 a parameter whose gradient is a sum with heavy cancellation (a norm weight)
            // keeps only absolute precision, so f32 errors are relative to the largest gradient.
            let largest = g1.iter().flat_map(|(_, g, _)| g.iter()).fold(0f64, |m, v| m.max(v.abs()));
            let floor = if kind == Kind::Float { largest } else { 1e-6 * largest };
            for ((name, a, _), (_, want, _)) in gp.iter().zip(&g1) {
                let scale = want.iter().fold(floor, |m, v| m.max(v.abs()));
                let e = a.iter().zip(want).fold(0f64, |m, (x, y)| m.max((x - y).abs())) / scale;
                assert!(e <= tol, "{loss:?} {kind:?} P={p} rank {r}: gradient of {name} off by {e:e}");
            }
        }
    }
}

#[test]
fn ntxent_parity_f64() {
    check(LossKind::NtXent, Norm::Group, Kind::Double, &[2, 3, 4], 3, 1e-9);
}

#[test]
fn clip_parity_f64() {
    check(LossKind::Clip, Norm::Layer, Kind::Double, &[2, 3, 4], 3, 1e-9);
}

#[test]
fn ntxent_and_clip_parity_f32() {
    check(LossKind::NtXent, Norm::None, Kind::Float, &[2, 3, 4], 4, 1e-4);
    check(LossKind::Clip, Norm::Group, Kind::Float, &[2, 3, 4], 4, 1e-4);
}

#[test]
fn model_level_parity_of_the_trainer_losses() {
    for loss in [LossKind::SupCon, LossKind::Dclw, LossKind::HardNegative, LossKind::BarlowTwins] {
        check(loss, Norm::Group, Kind::Double, &[2, 3], 3, 1e-9);
    }
    check(LossKind::SigLip, Norm::Layer, Kind::Double, &[2, 4], 2, 1e-9);
}

#[test]
fn the_gradient_cache_gives_the_plain_step_in_f64() {
    // Chunks of 2 and 3 rows (3 does not divide B = 5; 1 and 5 are the edges), P = 1 and 2.
    for chunk in [1, 2, 3, 5] {
        check_chunked(LossKind::NtXent, Norm::Group, Kind::Double, &[1, 2], 5, chunk, 1e-9);
        check_chunked(LossKind::Clip, Norm::Layer, Kind::Double, &[2], 5, chunk, 1e-9);
    }
}

#[test]
fn small_buckets_overlapped_with_backward_give_the_plain_sums() {
    // Buckets of 50 elements start one by one while backward runs (on Threads, each
    // sum runs inside the gradient hook); with and without the gradient cache.
    for chunk in [0, 2] {
        for (overlap, kept) in [(true, false), (true, true), (false, false)] {
            let run = Run { chunk, bucket: 50, overlap, kept };
            check_run(LossKind::NtXent, Norm::Group, Kind::Double, &[2, 3], 4, run, 1e-9);
            check_run(LossKind::Clip, Norm::Layer, Kind::Double, &[2], 4, run, 1e-9);
        }
    }
}

#[test]
fn batch_of_one_per_rank() {
    check(LossKind::NtXent, Norm::Group, Kind::Double, &[2, 4], 1, 1e-9);
    check(LossKind::Clip, Norm::Group, Kind::Double, &[3], 1, 1e-9);
}

#[test]
fn local_negatives_would_fail_parity() {
    // Guard that the parity check can fail: a loss over the local batch only
    // (what a naive data-parallel trainer computes) differs from the global loss.
    let data = inputs(8, 42);
    let model = build(LossKind::NtXent, Norm::Group, Kind::Double);
    let views: Vec<Tensor> = data.views.iter().map(|v| Tensor::from_slice(v).view([8, 1, SIDE, SIDE])).collect();
    let t = model
        .forward(&Batch { step: 0, views: &views, captions: None, labels: None, mix: None, indices: &[] }, &Solo)
        .unwrap()
        .grad;
    let global = contrast_nn::loss::ntxent_share(&t[0], &t[1], 0.2, contrast_nn::loss::Shard::solo(8))
        .unwrap()
        .double_value(&[]);
    let local: f64 = (0..2)
        .map(|r| {
            let (a, b) = (t[0].narrow(0, 4 * r, 4), t[1].narrow(0, 4 * r, 4));
            contrast_nn::loss::ntxent_share(&a, &b, 0.2, contrast_nn::loss::Shard::solo(4)).unwrap().double_value(&[])
                / 2.0
        })
        .sum();
    assert!((global - local).abs() > 1e-3, "{global} vs {local}");
}
