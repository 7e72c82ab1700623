//! Methods beyond one loss: MoCo-v2's sharded queue against a replicated-queue
//! reference, P-rank parity of MoCo, BYOL and SimSiam (batch-norm heads on the
//! gathered batch), resume of every piece of state onto another world size,
//! the EMA schedule and LARS.

use crate::common::*;
use contrast_comm::{Collective, Solo, Threads};
use contrast_config::{LossKind, MomentumSchedule, Norm};
use contrast_nn::ema::Ema;
use contrast_nn::loss::{Ctx, Shard};
use contrast_nn::method::{build, Batch, Method, Spec, StepInfo};
use contrast_nn::optim::{Optimizer, OptimizerKind, Param};
use contrast_nn::queue::ShardedQueue;
use contrast_nn::state::{Layout, StateItem};
use contrast_nn::GlobalBatch;
use std::collections::HashMap;
use tch::{Kind, Tensor};

const SIDE: i64 = 8;
const DIM: i64 = 6;

/// MoCo-v2 reference (`moco/builder.py`), transcribed as a plain loop over
/// queries: l_pos = q·k, l_neg = q·queue, logits = cat([l_pos, l_neg]) / T,
/// cross-entropy with label 0, mean over the N queries.
fn replicated_reference(q: &Tensor, k: &Tensor, queue: &Tensor, t: f64) -> Tensor {
    let q = contrast_nn::loss::l2_normalize(q);
    let n = q.size()[0];
    let mut total = Tensor::zeros([], (Kind::Double, q.device()));
    for i in 0..n {
        let qi = q.get(i);
        let l_pos = (&qi * k.get(i)).sum(Kind::Double).unsqueeze(0);
        let l_neg = queue.matmul(&qi);
        let logits = Tensor::cat(&[l_pos, l_neg], 0) / t;
        total = total + (logits.logsumexp([0i64].as_slice(), false) - logits.get(0));
    }
    total / n as f64
}

#[test]
fn sharded_queue_matches_the_replicated_reference() {
    let (b, d, t) = (3usize, 5i64, 0.2);
    for p in [1usize, 2, 3, 4] {
        let n = p * b;
        let k_size = 4 * n;
        let q = randn(n, d as usize, 11 + p as u64);
        let keys = contrast_nn::loss::l2_normalize(&randn(n, d as usize, 12));
        let queue = ShardedQueue::initial_canonical(k_size, d as usize, 7);
        let want_q = q.detach().set_requires_grad(true);
        let want = replicated_reference(&want_q, &keys, &queue, t);
        want.backward();
        let (want_loss, want_grad) = (want.double_value(&[]), contrast_nn::to_host::<f64>(&want_q.grad()));
        let (q, keys, queue) = (Host::of(&q), Host::of(&keys), Host::of(&queue));
        let ranks = Threads::run(p, |c| {
            let (q, keys, queue) = (q.t(), keys.t(), queue.t());
            let r = c.rank();
            let shard = ShardedQueue::from_canonical(&queue, 1, n, r, p).unwrap();
            assert_eq!(shard.shard().numel(), k_size / p * d as usize, "each rank holds K/P·d floats");
            let ctx = Ctx { shard: Shard { rank: r, world_size: p, local_batch: b }, reduce: &c };
            let leaf = q.detach().set_requires_grad(true);
            let share = shard.infonce_share(&leaf, &keys.narrow(0, (r * b) as i64, b as i64), t, &ctx).unwrap();
            share.backward();
            (share.double_value(&[]), contrast_nn::to_host::<f64>(&leaf.grad()))
        });
        let loss: f64 = ranks.iter().map(|r| r.0).sum();
        let grad: Vec<f64> = (0..want_grad.len()).map(|i| ranks.iter().map(|r| r.1[i]).sum::<f64>()).collect();
        assert!((loss - want_loss).abs() <= 1e-12 * want_loss.abs(), "P={p}: {loss} vs {want_loss}");
        assert!(rel_err(&grad, &want_grad) <= 1e-10, "P={p}: query gradient off by {:e}", rel_err(&grad, &want_grad));
    }
}

#[test]
fn each_rank_draws_only_its_rows_of_the_initial_queue() {
    let (k, d, n, seed) = (24usize, 5usize, 6usize, 9u64);
    let canonical = ShardedQueue::initial_canonical(k, d, seed);
    let norms = contrast_nn::to_host::<f64>(&canonical.norm_scalaropt_dim(2, [1i64].as_slice(), false));
    assert!(norms.iter().all(|x| (x - 1.0).abs() < 1e-12), "unit keys");
    for p in [1usize, 2, 3] {
        for r in 0..p {
            let direct = ShardedQueue::initial(k, d, seed, n, r, p).unwrap();
            let sliced = ShardedQueue::from_canonical(&canonical, 0, n, r, p).unwrap();
            assert_eq!(contrast_nn::to_host::<f64>(direct.shard()), contrast_nn::to_host::<f64>(sliced.shard()));
            assert_eq!(direct.shard().size(), [(k / p) as i64, d as i64]);
        }
    }
    assert!(ShardedQueue::initial(25, d, seed, n, 0, 1).is_err());
}

#[test]
fn queue_blocks_keep_global_row_order_and_evict_the_oldest() {
    // K = 2 blocks of N = 4 keys over P = 2 ranks: enqueue writes each rank's rows of the oldest block.
    let shards: Vec<Vec<f64>> = Threads::run(2, |c| {
        let canonical = Tensor::arange(8 * 2, (Kind::Double, tch::Device::Cpu)).view([8, 2]);
        let r = c.rank();
        let mut q = ShardedQueue::from_canonical(&canonical, 0, 4, r, 2).unwrap();
        let own = Tensor::full([2, 2], 100.0 + r as f64, (Kind::Double, tch::Device::Cpu));
        q.enqueue(&own).unwrap();
        assert_eq!(q.ptr(), 1);
        let item =
            StateItem { name: "q".into(), tensor: q.shard().shallow_clone(), layout: Layout::RowSharded { block: 4 } };
        contrast_nn::to_host::<f64>(&item.to_canonical(&c))
    });
    let want: Vec<f64> = [100.0; 4].into_iter().chain([101.0; 4]).chain((8..16).map(f64::from)).collect();
    assert_eq!(shards[0], want);
    assert_eq!(shards[0], shards[1]);
}

#[test]
fn item_sharded_state_is_saved_in_item_order_and_resliced_onto_any_world_size() {
    use contrast_nn::state::{item_indices, item_rows};
    // Counts P divides and counts it does not, fewer items than ranks included.
    for items in [8usize, 7, 3] {
        let canonical = || Tensor::arange(items as i64 * 2, (Kind::Double, tch::Device::Cpu)).view([items as i64, 2]);
        let want = contrast_nn::to_host::<f64>(&canonical());
        for p in [1usize, 2, 3, 4] {
            let saved: Vec<Vec<f64>> = Threads::run(p, |c| {
                let (r, canonical) = (c.rank(), canonical());
                let local = Tensor::zeros([item_rows(items, r, p) as i64, 2], (Kind::Double, tch::Device::Cpu));
                let item = StateItem { name: "bank".into(), tensor: local, layout: Layout::ItemSharded { items } };
                assert_eq!(item.canonical_shape(p), [items as i64, 2]);
                item.load(&canonical, r, p);
                // Rank r holds items r, r + P, …: row j is item r + j·P.
                let rows = contrast_nn::to_host::<f64>(&item.tensor);
                let held: Vec<f64> =
                    item_indices(items, r, p).flat_map(|i| [2.0 * i as f64, 2.0 * i as f64 + 1.0]).collect();
                assert_eq!(rows, held, "items {items}, P {p}, rank {r}");
                contrast_nn::to_host::<f64>(&item.to_canonical(&c))
            });
            for (r, s) in saved.iter().enumerate() {
                assert_eq!(s, &want, "items {items}, P {p}: rank {r} saves the items in order");
            }
        }
    }
}

fn spec(name: &str, p: usize, b: usize, kind: Kind) -> Spec {
    let loss = match name {
        "moco_v2" => LossKind::InfoNce,
        "byol" => LossKind::NormalizedMse,
        _ => LossKind::NegativeCosine,
    };
    let mut method = contrast_nn::method::plan(name).unwrap();
    set_key(&mut method, "queue_size", 3 * p * b);
    set_key(&mut method, "predictor_hidden", 5);
    set_key(&mut method, "momentum", 0.9);
    let mut s = Spec::new(method, loss, p * b);
    s.model = convnet_model(4, 32, 8, DIM, Norm::Group);
    s.shard = Shard { rank: 0, world_size: p, local_batch: b };
    s.seed = 5;
    s.kind = kind;
    s
}

type Snapshot = HashMap<String, Host>;

fn snapshot(m: &dyn Method) -> Snapshot {
    m.var_store().variables().into_iter().map(|(n, t)| (n, Host::of(&t))).collect()
}

fn load_snapshot(m: &dyn Method, snap: &Snapshot) {
    tch::no_grad(|| {
        for (name, t) in m.var_store().variables() {
            t.shallow_clone().copy_(&snap[&name].t());
        }
    });
}

/// Rank r's slice of two views of the global batch of `step` (depends on the step and global row only).
fn views(step: usize, n: usize, r: usize, b: usize) -> Vec<Tensor> {
    let rows: Vec<usize> = (r * b..(r + 1) * b).collect();
    vec![view_rows(step, n, 0, &rows), view_rows(step, n, 1, &rows)]
}

/// View `v` of the given global rows of step `step`.
fn view_rows(step: usize, n: usize, v: u64, rows: &[usize]) -> Tensor {
    let pix = (SIDE * SIDE) as usize;
    let all = randn_vec(n * pix, 1000 + 10 * step as u64 + v);
    let data: Vec<f64> = rows.iter().flat_map(|&g| all[g * pix..(g + 1) * pix].iter().copied()).collect();
    Tensor::from_slice(&data).view([rows.len() as i64, 1, SIDE, SIDE])
}

/// One rank of `method` for steps `from..to` with SGD; the losses of those steps.
fn train<C: Collective>(
    c: &C,
    m: &mut dyn Method,
    opt: &mut Optimizer,
    range: std::ops::Range<usize>,
    b: usize,
    total: usize,
) -> Vec<f64> {
    let engine = GlobalBatch::new(c, b);
    let n = b * c.world_size();
    range
        .map(|step| {
            let v = views(step, n, c.rank(), b);
            let batch = Batch { step, views: &v, captions: None, labels: None, mix: None, indices: &[] };
            opt.zero_grad();
            let towers = m.forward(&batch, c).unwrap();
            let out = engine
                .step_towers(&towers, &opt.tensors(), &[], |g, ctx| Ok(m.loss_share(g, &batch, ctx)?.loss))
                .unwrap();
            opt.step(0.05);
            m.after_step(&StepInfo { done: step + 1, total, lr: 0.05, local: &towers.local }, c).unwrap();
            out.loss
        })
        .collect()
}

fn sgd(m: &dyn Method) -> Optimizer {
    Optimizer::new(OptimizerKind::Sgd { momentum: 0.9, nesterov: false }, 1e-4, m.params())
}

/// Loss and gradient of every parameter after one step on P ranks (rank 0's view).
fn one_step<C: Collective>(c: &C, name: &str, init: &Snapshot, b: usize) -> (f64, Vec<(String, Vec<f64>)>) {
    one_step_with(c, name, init, b, false)
}

/// [`one_step`], optionally with shuffle-BN: the key views (view 1) of this rank
/// are those of the rows the (seed, step) permutation gives it, as the pipeline makes them.
fn one_step_with<C: Collective>(
    c: &C,
    name: &str,
    init: &Snapshot,
    b: usize,
    shuffle: bool,
) -> (f64, Vec<(String, Vec<f64>)>) {
    let mut s = spec(name, c.world_size(), b, Kind::Double);
    s.shard.rank = c.rank();
    set_key(&mut s.method, "shuffle_bn", shuffle);
    let m = build(&s).unwrap();
    load_snapshot(m.as_ref(), init);
    let mut opt = sgd(m.as_ref());
    let engine = GlobalBatch::new(c, b);
    let (n, r, step) = (b * c.world_size(), c.rank(), 3);
    let mut v = views(step, n, r, b);
    if shuffle {
        let order = contrast_data::Sampler::shuffle_order(s.seed, step, n);
        v[1] = view_rows(step, n, 1, &order[r * b..(r + 1) * b]);
    }
    let batch = Batch { step, views: &v, captions: None, labels: None, mix: None, indices: &[] };
    opt.zero_grad();
    let towers = m.forward(&batch, c).unwrap();
    let out =
        engine.step_towers(&towers, &opt.tensors(), &[], |g, ctx| Ok(m.loss_share(g, &batch, ctx)?.loss)).unwrap();
    let grads =
        m.params().iter().map(|p: &Param| (p.name.clone(), contrast_nn::to_host::<f64>(&p.tensor.grad()))).collect();
    (out.loss, grads)
}

#[test]
fn shuffle_bn_returns_each_key_to_its_row() {
    // Without batch statistics, shuffling which rank encodes which key view must change nothing:
    // every key comes back to the rank that owns its row.
    let (p, b) = (3usize, 2usize);
    let init = snapshot(build(&spec("moco_v2", p, b, Kind::Double)).unwrap().as_ref());
    let (l1, g1) = one_step(&Solo, "moco_v2", &init, p * b);
    for shuffled in [
        vec![one_step_with(&Solo, "moco_v2", &init, p * b, true)],
        Threads::run(p, |c| one_step_with(&c, "moco_v2", &init, b, true)),
    ] {
        for (lp, gp) in &shuffled {
            assert!((lp - l1).abs() <= 1e-9 * l1.abs(), "{lp} vs {l1}");
            for ((name, a), (_, w)) in gp.iter().zip(&g1) {
                assert!(rel_err(a, w) <= 1e-9, "{name}: {:e}", rel_err(a, w));
            }
        }
    }
    // The check can fail: keys of the wrong rows give another loss.
    let wrong = Threads::run(p, |c| {
        let mut s = spec("moco_v2", p, b, Kind::Double);
        s.shard.rank = c.rank();
        let m = build(&s).unwrap();
        load_snapshot(m.as_ref(), &init);
        let n = p * b;
        let order = contrast_data::Sampler::shuffle_order(s.seed, 3, n);
        let mut v = views(3, n, c.rank(), b);
        v[1] = view_rows(3, n, 1, &order[c.rank() * b..(c.rank() + 1) * b]);
        let batch = Batch { step: 3, views: &v, captions: None, labels: None, mix: None, indices: &[] };
        let towers = m.forward(&batch, &c).unwrap();
        let opt = sgd(m.as_ref());
        GlobalBatch::new(&c, b)
            .step_towers(&towers, &opt.tensors(), &[], |g, ctx| Ok(m.loss_share(g, &batch, ctx)?.loss))
            .unwrap()
            .loss
    });
    assert!((wrong[0] - l1).abs() > 1e-6, "{} vs {l1}", wrong[0]);
}

#[test]
fn moco_byol_and_simsiam_are_exact_across_ranks() {
    for name in ["moco_v2", "byol", "simsiam"] {
        for (p, b) in [(2usize, 3usize), (3, 2), (4, 2)] {
            let init = snapshot(build(&spec(name, p, b, Kind::Double)).unwrap().as_ref());
            let (l1, g1) = one_step(&Solo, name, &init, p * b);
            assert!(l1.is_finite());
            let ranks = Threads::run(p, |c| one_step(&c, name, &init, b));
            for (r, (lp, gp)) in ranks.iter().enumerate() {
                assert!((lp - l1).abs() <= 1e-9 * l1.abs().max(1e-3), "{name:?} P={p} rank {r}: loss {lp} vs {l1}");
                let largest = g1.iter().flat_map(|(_, g)| g.iter()).fold(0f64, |m, v| m.max(v.abs()));
                for ((pn, a), (_, want)) in gp.iter().zip(&g1) {
                    let scale = want.iter().fold(1e-6 * largest, |m, v| m.max(v.abs()));
                    let e = a.iter().zip(want).fold(0f64, |m, (x, y)| m.max((x - y).abs())) / scale;
                    assert!(e <= 1e-9, "{name:?} P={p} rank {r}: gradient of {pn} off by {e:e}");
                }
            }
        }
    }
}

/// Canonical state (model items and optimiser state) from rank 0.
type Saved = (Vec<(String, Host)>, Vec<(String, Host)>);

fn save<C: Collective>(c: &C, m: &dyn Method, opt: &Optimizer) -> Saved {
    let model = m.state().iter().map(|i| (i.name.clone(), Host::of(&i.to_canonical(c)))).collect();
    (model, opt.named_state().into_iter().map(|(n, t)| (n, Host::of(&t))).collect())
}

/// Run `steps` on `p` ranks from `saved` (or from `init`), returning losses and the final canonical state.
fn run_span(
    p: usize,
    b_global: usize,
    init: &Snapshot,
    saved: Option<&Saved>,
    span: std::ops::Range<usize>,
    total: usize,
) -> (Vec<f64>, Saved) {
    let b = b_global / p;
    let mut out = Threads::run(p, |c| {
        let mut s = spec("moco_v2", p, b, Kind::Double);
        s.shard.rank = c.rank();
        // The queue of K = 3·N keys needs the same N whatever P.
        s.method.settings.set("queue_size", 3 * b_global);
        let mut m = build(&s).unwrap();
        load_snapshot(m.as_ref(), init);
        let mut opt = sgd(m.as_ref());
        if let Some((model, optim)) = saved {
            let map: HashMap<String, Tensor> = model.iter().map(|(n, t)| (n.clone(), t.t())).collect();
            m.load_state(&map, c.rank(), p).unwrap();
            let optim: Vec<(String, Tensor)> = optim.iter().map(|(n, t)| (n.clone(), t.t())).collect();
            opt.load_state(&optim).unwrap();
        }
        let losses = train(&c, m.as_mut(), &mut opt, span.clone(), b, total);
        (losses, save(&c, m.as_ref(), &opt))
    });
    out.swap_remove(0)
}

#[test]
fn moco_resumes_onto_another_world_size_with_the_same_queue() {
    let n = 12;
    let (s, total) = (4usize, 24usize);
    let init = snapshot(build(&spec("moco_v2", 1, n, Kind::Double)).unwrap().as_ref());
    let (straight, end) = run_span(1, n, &init, None, 0..total, total);
    for (before, after) in [(2usize, 1usize), (1, 4), (3, 2)] {
        let (first, saved) = run_span(before, n, &init, None, 0..s, total);
        let (rest, resumed) = run_span(after, n, &init, Some(&saved), s..total, total);
        let losses: Vec<f64> = first.into_iter().chain(rest).collect();
        for (k, (a, w)) in losses.iter().zip(&straight).enumerate() {
            assert!((a - w).abs() <= 1e-9 * w.abs(), "{before}→{after} step {}: {a} vs {w}", k + 1);
        }
        let get = |st: &Saved, name: &str| st.0.iter().find(|(n, _)| n == name).unwrap().1.data.clone();
        for name in ["method.queue", "method.queue_ptr", "momentum.head.fc2.weight"] {
            let (a, w) = (get(&resumed, name), get(&end, name));
            assert!(rel_err(&a, &w) <= 1e-9, "{before}→{after}: {name} differs by {:e}", rel_err(&a, &w));
        }
    }
    // The queue moved: 24 steps over 3 blocks evicted every block several times.
    let q0 = ShardedQueue::initial_canonical(3 * n, DIM as usize, 5);
    let q = &end.0.iter().find(|(n, _)| n == "method.queue").unwrap().1.data;
    assert!(rel_err(q, &contrast_nn::to_host::<f64>(&q0)) > 0.1);
}

#[test]
fn ema_follows_the_online_weights_with_constant_or_cosine_momentum() {
    let online = Tensor::from_slice(&[1.0f64, 2.0]);
    let target = Tensor::from_slice(&[0.0f64, 0.0]);
    let ema = Ema::new(vec![(online.shallow_clone(), target.shallow_clone())], 0.9, MomentumSchedule::Constant);
    assert_eq!(ema.update(1, 10), 0.9);
    assert!(rel_err(&contrast_nn::to_host::<f64>(&target), &[0.1, 0.2]) < 1e-15);
    let cos = Ema::new(vec![], 0.99, MomentumSchedule::Cosine);
    assert!((cos.momentum(0, 100) - 0.99).abs() < 1e-15);
    assert!((cos.momentum(50, 100) - 0.995).abs() < 1e-12);
    assert!((cos.momentum(100, 100) - 1.0).abs() < 1e-15);
    // No gradient reaches a momentum encoder: its variables are frozen.
    let m = build(&spec("moco_v2", 1, 4, Kind::Double)).unwrap();
    let vars = m.var_store().variables();
    assert!(vars.iter().filter(|(n, _)| n.starts_with("momentum.")).all(|(_, t)| !t.requires_grad()));
    assert!(m.params().iter().all(|p| !p.name.starts_with("momentum.")));
    assert!(vars.iter().any(|(n, _)| n == "momentum.backbone.conv0.weight"));
}

#[test]
fn lars_scales_by_the_trust_ratio_and_skips_biases() {
    let w = Tensor::from_slice(&[3.0f64, 4.0]).view([1, 2]).set_requires_grad(true);
    let bias = Tensor::from_slice(&[1.0f64]).set_requires_grad(true);
    let loss = (&w * Tensor::from_slice(&[0.6f64, 0.8]).view([1, 2])).sum(Kind::Double) + &bias * 2.0;
    loss.sum(Kind::Double).backward();
    let params = vec![Param::new("w".into(), w.shallow_clone()), Param::new("b".into(), bias.shallow_clone())];
    let mut opt = Optimizer::new(OptimizerKind::Sgd { momentum: 0.0, nesterov: false }, 0.1, params).with_lars(0.01);
    opt.step(1.0);
    // ‖w‖ = 5, g = (0.6, 0.8), ‖g‖ = 1: (g + 0.1 w)·0.01·5/(1 + 0.5 + 1e-8).
    let ratio = 0.01 * 5.0 / (1.0 + 0.5 + 1e-8);
    let want = [3.0 - (0.6 + 0.3) * ratio, 4.0 - (0.8 + 0.4) * ratio];
    let got = contrast_nn::to_host::<f64>(&w);
    assert!((got[0] - want[0]).abs() < 1e-12 && (got[1] - want[1]).abs() < 1e-12, "{got:?} vs {want:?}");
    // The bias is neither adapted nor decayed: plain SGD.
    assert!((bias.double_value(&[0]) - (1.0 - 2.0)).abs() < 1e-12);
}

#[test]
fn an_unused_parameter_moves_alike_on_every_layout() {
    // One step of SGD with decay and momentum; `extra` takes no part in the loss.
    let (n, d) = (4usize, 3usize);
    let a = randn(n, d, 31);
    let b = randn(n, d, 32);
    let (a, b) = (Host::of(&a), Host::of(&b));
    let moved: Vec<Vec<f64>> = [1usize, 2]
        .into_iter()
        .map(|p| {
            let out = Threads::run(p, |c| {
                let bl = n / p;
                let w = Tensor::ones([1, d as i64], (Kind::Double, tch::Device::Cpu)).set_requires_grad(true);
                let extra = Tensor::ones([2, 2], (Kind::Double, tch::Device::Cpu)).set_requires_grad(true);
                let rows = |h: &Host| h.t().narrow(0, (c.rank() * bl) as i64, bl as i64);
                let towers = [rows(&a) * &w, rows(&b) * &w];
                let params =
                    vec![Param::new("w".into(), w.shallow_clone()), Param::new("extra".into(), extra.shallow_clone())];
                let mut opt = Optimizer::new(OptimizerKind::Sgd { momentum: 0.9, nesterov: false }, 0.1, params);
                GlobalBatch::new(&c, bl)
                    .step(&towers, &opt.tensors(), |g, ctx| {
                        contrast_nn::loss::ntxent_share(&g[0], &g[1], 0.5, ctx.shard)
                    })
                    .unwrap();
                opt.step(0.5);
                contrast_nn::to_host::<f64>(&extra)
            });
            out[0].clone()
        })
        .collect();
    assert_eq!(moved[0], moved[1]);
    assert!(moved[0].iter().all(|&x| (x - (1.0 - 0.5 * 0.1)).abs() < 1e-12), "decay applies: {:?}", moved[0]);
}
