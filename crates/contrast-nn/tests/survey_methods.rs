//! The survey's methods with per-item and per-step state (InstDisc's bank),
//! trained for a few steps in f64 on the threaded backend: P ranks × B equals
//! 1 rank × P·B in the loss and every piece of state, a stop on one world size
//! resumes on another with the same next losses, and the loss matches a plain
//! replicated transcription of the reference.

use crate::common::*;
use contrast_comm::{Collective, Solo, Threads};
use contrast_config::{LossKind, MethodPlan, Norm};
use contrast_nn::encoder::text::Captions;
use contrast_nn::loss::Shard;
use contrast_nn::method::{build, Batch, EpochCtx, Method, Spec, StepInfo};
use contrast_nn::optim::{Optimizer, OptimizerKind};
use contrast_nn::GlobalBatch;
use std::collections::HashMap;
use tch::{Kind, Tensor};

pub(crate) const SIDE: i64 = 8;

/// A method under test: its name, loss, keys and the training set's size.
#[derive(Clone, Copy)]
pub(crate) struct Case {
    pub(crate) name: &'static str,
    pub(crate) loss: LossKind,
    pub(crate) items: usize,
    /// Global batch N.
    pub(crate) n: usize,
    /// Steps per epoch when the method starts epochs (k-means), else 0.
    pub(crate) epoch_steps: usize,
    pub(crate) keys: fn(&mut MethodPlan),
}

impl Case {
    pub(crate) fn spec(&self, p: usize, rank: usize) -> Spec {
        let mut method = contrast_nn::method::plan(self.name).unwrap();
        (self.keys)(&mut method);
        let mut s = Spec::new(method, self.loss, self.n);
        s.model = convnet_model(4, 32, 8, 6, Norm::Group);
        s.shard = Shard { rank, world_size: p, local_batch: self.n / p };
        s.items = Some(self.items);
        s.image_size = SIDE;
        s.seed = 5;
        s.kind = Kind::Double;
        if self.captions_per_row() > 0 {
            s.model.text = text_tower_config();
        }
        s
    }

    /// Captions per row of a text-only method (2 for sentence pairs), else 0.
    pub(crate) fn captions_per_row(&self) -> usize {
        let spec = contrast_nn::registry::method_entry(self.name).unwrap().spec;
        match (spec.text_only(), spec.sentence_pairs()) {
            (false, _) => 0,
            (true, false) => 1,
            (true, true) => 2,
        }
    }
}

/// The text methods' tower: small, bidirectional, mean-pooled, with dropout.
pub(crate) fn text_tower_config() -> contrast_config::TextConfig {
    contrast_config::TextConfig {
        width: 8,
        layers: 2,
        heads: 2,
        context: CONTEXT as i64,
        causal: false,
        pool: contrast_config::TextPool::Mean,
        dropout: 0.2,
        ..Default::default()
    }
}

/// Tokens per caption of the text methods' tests.
pub(crate) const CONTEXT: usize = 10;

/// Rank r's captions of global batch `step` (`m` per row, byte tokens, ends
/// between 3 and 8): a function of the step, the global row and k only.
pub(crate) fn captions(step: usize, r: usize, b: usize, m: usize) -> Captions {
    let (mut tokens, mut ends) = (Vec::new(), Vec::new());
    for g in r * b..(r + 1) * b {
        for k in 0..m {
            let end = 3 + (7 * g + step + 5 * k) % 6;
            let mut row = vec![0i64; CONTEXT];
            row[0] = 256;
            for (j, t) in row.iter_mut().enumerate().take(end).skip(1) {
                *t = 1 + ((31 * g + 17 * j + 101 * k + 13 * step) % 255) as i64;
            }
            row[end] = 257;
            tokens.extend(row);
            ends.push(end as i64);
        }
    }
    Captions::from_host_rows(&tokens, &ends, m, r * b, tch::Device::Cpu)
}

/// Canonical state: the method's items and the optimiser's, as rank 0 saves them.
type Saved = (Vec<(String, Host)>, Vec<(String, Host)>);

/// Items shown by the rows of global batch `step`: distinct within a step, every item in turn.
pub(crate) fn items_of(step: usize, n: usize, items: usize) -> Vec<usize> {
    (0..n).map(|g| (7 * (step * n + g) + 3) % items).collect()
}

/// Rank r's two views of global batch `step` (a function of the step and global row only).
pub(crate) fn views(step: usize, n: usize, r: usize, b: usize) -> Vec<Tensor> {
    let pix = (SIDE * SIDE) as usize;
    (0..2u64)
        .map(|v| {
            let all = randn_vec(n * pix, 1000 + 10 * step as u64 + v);
            let data = all[r * b * pix..(r + 1) * b * pix].to_vec();
            Tensor::from_slice(&data).view([b as i64, 1, SIDE, SIDE])
        })
        .collect()
}

/// The un-augmented image of `item` (the feature pass's input).
fn item_image(item: usize) -> Tensor {
    Tensor::from_slice(&randn_vec((SIDE * SIDE) as usize, 5000 + item as u64)).view([1, 1, SIDE, SIDE])
}

/// The start of `epoch` as the trainer runs it: the feature pass over this
/// rank's items (rank, rank + P, …), `on_epoch`, and the restarts.
pub(crate) fn start_epoch<C: Collective>(c: &C, case: &Case, m: &mut dyn Method, opt: &mut Optimizer, epoch: usize) {
    let (p, r) = (c.world_size(), c.rank());
    let images: Vec<Tensor> = (r..case.items).step_by(p).map(item_image).collect();
    let features = tch::no_grad(|| contrast_nn::loss::l2_normalize(&m.pass_features(&Tensor::cat(&images, 0))));
    let mut ctx = EpochCtx { epoch, rank: r, world_size: p, comm: c, features: Some(features) };
    m.on_epoch(&mut ctx).unwrap();
    opt.restart(&m.restarts()).unwrap();
}

/// Initial weights every layout starts from.
/// The same on every run: each variable that varies is redrawn from a stream
/// keyed on its name, at its initialiser's mean and spread (libtorch's global
/// generator is shared with the tests that run alongside, so the built values
/// alone would differ from run to run); constant ones (norm weights, running
/// statistics, zero biases) keep their values.
pub(crate) fn snapshot(case: &Case) -> HashMap<String, Host> {
    let m = build(&case.spec(1, 0)).unwrap();
    let mut vars: Vec<(String, Tensor)> = m.var_store().variables().into_iter().collect();
    vars.sort_by(|a, b| a.0.cmp(&b.0));
    vars.into_iter()
        .enumerate()
        .map(|(i, (name, t))| {
            let t = t.detach().to_kind(Kind::Double);
            let (mean, std) = (t.mean(Kind::Double).double_value(&[]), t.std(false).double_value(&[]));
            let draw = || Tensor::from_slice(&randn_vec(t.numel(), 9000 + i as u64)).view(t.size().as_slice());
            let fresh = match (t.numel() > 1 && std > 0.0, t.dim()) {
                (false, _) => t,
                (true, 1) => draw() * std + mean,
                // Rows keep their norms (SwAV's prototypes start as unit rows).
                (true, _) => {
                    let (rows, norm) = (t.size()[0], |x: &Tensor| {
                        x.reshape([t.size()[0], -1]).norm_scalaropt_dim(2, [1i64].as_slice(), true)
                    });
                    let d = draw();
                    (d.reshape([rows, -1]) / norm(&d) * norm(&t)).view(t.size().as_slice())
                }
            };
            (name, Host::of(&fresh))
        })
        .collect()
}

/// One rank: steps `span` from the initial weights or `saved`; the losses and the final canonical state.
fn train<C: Collective>(
    c: &C,
    case: &Case,
    init: &HashMap<String, Host>,
    saved: Option<&Saved>,
    span: std::ops::Range<usize>,
) -> (Vec<f64>, Saved) {
    let (p, r) = (c.world_size(), c.rank());
    let b = case.n / p;
    let mut m = build(&case.spec(p, r)).unwrap();
    tch::no_grad(|| {
        for (name, t) in m.var_store().variables() {
            t.shallow_clone().copy_(&init[&name].t());
        }
    });
    let mut opt = Optimizer::new(OptimizerKind::Sgd { momentum: 0.9, nesterov: false }, 1e-4, m.params());
    opt.track_restarts(&m.restarts()).unwrap();
    if let Some((model, optim)) = saved {
        let map: HashMap<String, Tensor> = model.iter().map(|(n, t)| (n.clone(), t.t())).collect();
        m.load_state(&map, r, p).unwrap();
        let optim: Vec<(String, Tensor)> = optim.iter().map(|(n, t)| (n.clone(), t.t())).collect();
        opt.load_state(&optim).unwrap();
    }
    let engine = GlobalBatch::new(c, b);
    let total = 6;
    let losses = span
        .map(|step| {
            if case.epoch_steps > 0 && step % case.epoch_steps == 0 {
                start_epoch(c, case, m.as_mut(), &mut opt, step / case.epoch_steps);
            }
            let v = views(step, case.n, r, b);
            let items = items_of(step, case.n, case.items);
            let indices = &items[r * b..(r + 1) * b];
            let text = (case.captions_per_row() > 0).then(|| captions(step, r, b, case.captions_per_row()));
            let v = if text.is_some() { Vec::new() } else { v };
            let batch = Batch { step, views: &v, captions: text.as_ref(), labels: None, mix: None, indices };
            opt.zero_grad();
            let towers = m.forward(&batch, c).unwrap();
            let out = engine
                .step_towers(&towers, &opt.tensors(), &[], |g, ctx| Ok(m.loss_share(g, &batch, ctx)?.loss))
                .unwrap();
            let info = StepInfo { done: step + 1, total, lr: 0.05, local: &towers.local };
            m.before_optimizer_step(&info, &mut opt.exclusions()).unwrap();
            opt.step(0.05);
            m.after_step(&info, c).unwrap();
            out.loss
        })
        .collect();
    let model = m.state().iter().map(|i| (i.name.clone(), Host::of(&i.to_canonical(c)))).collect();
    let optim = opt.named_state().into_iter().map(|(n, t)| (n, Host::of(&t))).collect();
    (losses, (model, optim))
}

/// `train` on `p` threaded ranks; rank 0's result.
pub(crate) fn run(
    case: &Case,
    p: usize,
    init: &HashMap<String, Host>,
    saved: Option<&Saved>,
    span: std::ops::Range<usize>,
) -> (Vec<f64>, Saved) {
    Threads::run(p, |c| train(&c, case, init, saved, span.clone())).swap_remove(0)
}

/// Within `tol` of the largest |w|, or of 10⁻³ where every |w| is smaller: a
/// parameter whose gradient is zero in exact arithmetic (Quick-Thought's
/// context `ln_final.bias`: softmax is shift-invariant) holds rounding noise only.
fn assert_close(what: &str, a: &[f64], w: &[f64], tol: f64) {
    let scale = w.iter().fold(1e-3f64, |m, v| m.max(v.abs()));
    let e = a.iter().zip(w).fold(0f64, |m, (x, y)| m.max((x - y).abs())) / scale;
    assert!(e <= tol, "{what}: off by {e:e}");
}

/// P ∈ {2, 4} (and 3 where it divides N) equals one rank after 3 steps: the
/// losses and every state item; and a stop after 2 steps resumes on another
/// world size with the losses and state of the uninterrupted run.
pub(crate) fn check_layouts(case: &Case) {
    let init = snapshot(case);
    let (straight, end) = train(&Solo, case, &init, None, 0..5);
    assert!(straight.iter().all(|l| l.is_finite()), "{}: {straight:?}", case.name);
    for p in [2usize, 3, 4].into_iter().filter(|p| case.n % p == 0) {
        let (losses, state) = run(case, p, &init, None, 0..5);
        assert_close(&format!("{} P={p} losses", case.name), &losses, &straight, 1e-9);
        for ((name, a), (_, w)) in state.0.iter().zip(&end.0) {
            assert_close(&format!("{} P={p} `{name}`", case.name), &a.data, &w.data, 1e-9);
        }
    }
    for (before, after) in
        [(2usize, 4usize), (4, 3), (1, 2)].into_iter().filter(|(a, b)| case.n % a == 0 && case.n % b == 0)
    {
        let (first, saved) = run(case, before, &init, None, 0..2);
        let (rest, resumed) = run(case, after, &init, Some(&saved), 2..5);
        let losses: Vec<f64> = first.into_iter().chain(rest).collect();
        assert_close(&format!("{} {before}→{after} losses", case.name), &losses, &straight, 1e-9);
        for ((name, a), (_, w)) in resumed.0.iter().zip(&end.0) {
            assert_close(&format!("{} {before}→{after} `{name}`", case.name), &a.data, &w.data, 1e-9);
        }
    }
}

const INSTDISC: Case = Case {
    name: "instdisc",
    loss: LossKind::BankNce,
    // 22 items: no world size of the test divides it.
    items: 22,
    n: 12,
    epoch_steps: 0,
    keys: |m| {
        set_key(m, "negatives", 7);
        set_key(m, "proximal", 0.5);
    },
};

#[test]
fn instdisc_bank_is_exact_across_ranks_and_resumes_onto_another_world_size() {
    check_layouts(&INSTDISC);
    // The bank moved where the batches' items were, and Z was fixed once.
    let init = snapshot(&INSTDISC);
    let (_, start) = train(&Solo, &INSTDISC, &init, None, 0..0);
    let (_, end) = train(&Solo, &INSTDISC, &init, None, 0..2);
    let get = |s: &Saved, n: &str| s.0.iter().find(|(k, _)| k == n).unwrap().1.clone();
    assert_eq!(get(&start, "method.nce_z").data, [0.0], "Z is unset before the first step");
    assert!(get(&end, "method.nce_z").data[0] > 0.0);
    let (b0, b1) = (get(&start, "method.bank"), get(&end, "method.bank"));
    assert_eq!(b1.shape, [22, 6]);
    let seen: std::collections::HashSet<usize> = (0..2).flat_map(|s| items_of(s, 12, 22)).collect();
    for i in 0..22 {
        let moved = (0..6).any(|j| b0.data[i * 6 + j] != b1.data[i * 6 + j]);
        assert_eq!(moved, seen.contains(&i), "item {i}");
        let norm: f64 = (0..6).map(|j| b1.data[i * 6 + j].powi(2)).sum::<f64>().sqrt();
        assert!((norm - 1.0).abs() < 1e-12, "bank rows stay unit vectors");
    }
}

#[test]
fn instdisc_bank_can_start_from_the_feature_pass() {
    let case = Case { keys: |m| set_key(m, "bank_init", "features"), ..INSTDISC };
    let mut m = build(&case.spec(2, 1)).unwrap();
    assert!(m.wants_features(0) && !m.wants_features(1), "a feature pass before the first epoch only");
    let x = Tensor::randn([3, 1, SIDE, SIDE], (Kind::Double, tch::Device::Cpu));
    assert_eq!(m.pass_features(&x).size(), [3, 6], "the pass embeds the bank's unit vectors");
    // Rank 1 of 2 holds items 1, 3, …, 21: 11 rows.
    let rows = contrast_nn::loss::l2_normalize(&Tensor::randn([11, 6], (Kind::Double, tch::Device::Cpu)));
    let mut ctx = EpochCtx { epoch: 0, rank: 1, world_size: 2, comm: &Solo, features: Some(rows.shallow_clone()) };
    m.on_epoch(&mut ctx).unwrap();
    let bank = m.state().into_iter().find(|i| i.name == "method.bank").unwrap().tensor;
    assert_eq!(Host::of(&bank).data, Host::of(&rows).data);
    let wrong = Tensor::zeros([10, 6], (Kind::Double, tch::Device::Cpu));
    let mut ctx = EpochCtx { epoch: 0, rank: 1, world_size: 2, comm: &Solo, features: Some(wrong) };
    let err = m.on_epoch(&mut ctx).err().unwrap().to_string();
    assert!(err.contains("the feature pass gave [10, 6] rows for a bank shard of [11, 6]"), "{err}");
}

/// Wu et al.'s loss for one step, transcribed from `lemniscate.pytorch`
/// (`NCEAverage` + `NCECriterion`) as a loop over queries on the whole bank:
/// x = exp(v·m / τ) / Z for the positive and each negative, Pn = 1/n,
/// loss = −(Σ log(x⁺/(x⁺ + K·Pn)) + Σ_k log(K·Pn/(x_k + K·Pn))) / N, plus λ‖v − m⁺‖² / N.
fn lemniscate_loss(v: &Tensor, bank: &Tensor, items: &[usize], negatives: &[usize], t: f64, lambda: f64) -> (f64, f64) {
    let v = contrast_nn::loss::l2_normalize(v);
    let (n, k, n_items) = (v.size()[0], negatives.len() as f64, bank.size()[0] as f64);
    let score = |i: i64, j: usize| ((v.get(i) * bank.get(j as i64)).sum(Kind::Double).double_value(&[]) / t).exp();
    let mut all = Vec::new();
    for i in 0..n {
        all.push(score(i, items[i as usize]));
        all.extend(negatives.iter().map(|&j| score(i, j)));
    }
    let z = all.iter().sum::<f64>() / all.len() as f64 * n_items;
    let pn = 1.0 / n_items;
    let mut loss = 0.0;
    for i in 0..n {
        let pos = score(i, items[i as usize]) / z;
        loss -= (pos / (pos + k * pn)).ln();
        for &j in negatives {
            let x = score(i, j) / z;
            loss -= (k * pn / (x + k * pn)).ln();
        }
        let diff = v.get(i) - bank.get(items[i as usize] as i64);
        loss += lambda * diff.square().sum(Kind::Double).double_value(&[]);
    }
    (loss / n as f64, z)
}

#[test]
fn instdisc_loss_matches_the_lemniscate_transcription() {
    let case = INSTDISC;
    let init = snapshot(&case);
    let (losses, state) = train(&Solo, &case, &init, None, 0..1);
    let (_, start) = train(&Solo, &case, &init, None, 0..0);
    let bank = start.0.iter().find(|(k, _)| k == "method.bank").unwrap().1.t();
    // The step's embeddings, from the same weights.
    let m = build(&case.spec(1, 0)).unwrap();
    tch::no_grad(|| {
        for (name, t) in m.var_store().variables() {
            t.shallow_clone().copy_(&init[&name].t());
        }
    });
    let v = views(0, case.n, 0, case.n);
    let items = items_of(0, case.n, case.items);
    let batch = Batch { step: 0, views: &v, captions: None, labels: None, mix: None, indices: &items };
    let emb = tch::no_grad(|| m.forward(&batch, &Solo).unwrap().grad[0].shallow_clone());
    let negatives = contrast_nn::method::instdisc::InstDisc::negatives(5, 0, 7, case.items);
    let (want, z) = lemniscate_loss(&emb, &bank, &items, &negatives, 0.07, 0.5);
    assert!((losses[0] - want).abs() <= 1e-9 * want.abs(), "{} vs {want}", losses[0]);
    let saved_z = state.0.iter().find(|(k, _)| k == "method.nce_z").unwrap().1.data[0];
    assert!((saved_z - z).abs() <= 1e-9 * z, "Z {saved_z} vs {z}");
}

const BARLOW_TWINS: Case = Case {
    name: "barlow_twins",
    loss: LossKind::BarlowTwins,
    items: 22,
    n: 12,
    epoch_steps: 0,
    keys: |m| set_key(m, "projector_layers", 3),
};

#[test]
fn barlow_twins_projector_on_the_gathered_batch_is_exact_across_ranks() {
    check_layouts(&BARLOW_TWINS);
    // The paper's projector: three bias-free linear layers, batch norm between them.
    let m = build(&BARLOW_TWINS.spec(1, 0)).unwrap();
    let mut names: Vec<String> =
        m.var_store().variables().into_keys().filter(|n| n.starts_with("projector.")).collect();
    names.sort();
    let want = [
        "projector.bn1.bias",
        "projector.bn1.running_mean",
        "projector.bn1.running_var",
        "projector.bn1.weight",
        "projector.bn2.bias",
        "projector.bn2.running_mean",
        "projector.bn2.running_var",
        "projector.bn2.weight",
        "projector.fc1.weight",
        "projector.fc2.weight",
        "projector.fc3.weight",
    ];
    assert_eq!(names, want);
}

const SWAV: Case = Case {
    name: "swav",
    loss: LossKind::Swav,
    items: 22,
    n: 12,
    epoch_steps: 0,
    keys: |m| {
        set_key(m, "prototypes", 5);
        set_key(m, "freeze_prototypes_steps", 2);
        // Two blocks of N: full after 2 steps, so steps 3 to 5 solve Sinkhorn with the queue's rows.
        set_key(m, "queue_size", 24);
        set_key(m, "queue_start_step", 0);
    },
};

#[test]
fn swav_queue_sinkhorn_and_prototypes_are_exact_across_ranks_and_resume() {
    check_layouts(&SWAV);
    let init = snapshot(&SWAV);
    let get = |s: &Saved, n: &str| s.0.iter().find(|(k, _)| k == n).unwrap().1.clone();
    let (_, start) = train(&Solo, &SWAV, &init, None, 0..0);
    let (_, frozen) = train(&Solo, &SWAV, &init, None, 0..2);
    let (losses, end) = train(&Solo, &SWAV, &init, None, 0..5);
    // Left out of the optimiser for 2 steps (not even decayed or given a moment), then trained; unit rows throughout.
    // (Renormalising unit rows moves them by rounding only.)
    assert_close(
        "frozen prototypes",
        &get(&frozen, "prototypes.weight").data,
        &get(&start, "prototypes.weight").data,
        1e-14,
    );
    let moved = get(&end, "prototypes.weight");
    assert!(rel_err(&moved.data, &get(&start, "prototypes.weight").data) > 1e-6);
    for row in moved.data.chunks(6) {
        assert!((row.iter().map(|x| x * x).sum::<f64>().sqrt() - 1.0).abs() < 1e-12);
    }
    assert_eq!(get(&end, "method.queue_filled").data, [2.0]);
    // The queue joins once full: without it, steps 3 to 5 give other losses.
    let no_queue = Case {
        keys: |m| {
            set_key(m, "prototypes", 5);
            set_key(m, "freeze_prototypes_steps", 2);
        },
        ..SWAV
    };
    let (plain, _) = train(&Solo, &no_queue, &init, None, 0..5);
    assert_close("swav before the queue is full", &plain[..2], &losses[..2], 1e-12);
    assert!(rel_err(&plain[2..], &losses[2..]) > 1e-9, "the full queue changes the codes");
}

const MOCHI: Case = Case {
    name: "moco_v2",
    loss: LossKind::InfoNce,
    items: 22,
    n: 12,
    epoch_steps: 0,
    keys: |m| {
        set_key(m, "queue_size", 36);
        set_key(m, "momentum", 0.9);
        set_key(m, "hard_negatives", 5);
        set_key(m, "mix_negatives", 3);
        set_key(m, "mix_query", 2);
    },
};

#[test]
fn mochi_selection_and_mixing_are_exact_across_ranks_and_resume() {
    check_layouts(&MOCHI);
    // Mixing changes the loss: the same run without it differs.
    let plain = Case {
        keys: |m| {
            set_key(m, "queue_size", 36);
            set_key(m, "momentum", 0.9);
        },
        ..MOCHI
    };
    let init = snapshot(&MOCHI);
    let (a, _) = train(&Solo, &MOCHI, &init, None, 0..2);
    let (b, _) = train(&Solo, &plain, &init, None, 0..2);
    assert!(rel_err(&a, &b) > 1e-6, "{a:?} vs {b:?}");
}

/// MoCHi on a replicated queue, transcribed as a loop over queries: the H
/// hardest keys by q·n, each synthetic negative normalise(α n_a + (1−α) n_b)
/// or normalise(β q + (1−β) n_j) (q detached), logits [q·k⁺, q·queue, q·h] / T,
/// cross-entropy with label 0, mean over the N queries.
fn mochi_reference(q: &Tensor, k: &Tensor, queue: &Tensor, t: f64, m: &contrast_nn::method::mochi::Mochi) -> Tensor {
    let q = contrast_nn::loss::l2_normalize(q);
    let n = q.size()[0];
    let mut total = Tensor::zeros([], (Kind::Double, q.device()));
    for i in 0..n {
        let qi = q.get(i);
        let l_neg = queue.matmul(&qi);
        let scores = contrast_nn::to_host::<f64>(&l_neg);
        let mut order: Vec<usize> = (0..scores.len()).collect();
        order.sort_by(|&x, &y| scores[y].total_cmp(&scores[x]).then(x.cmp(&y)));
        let hard: Vec<usize> = order.into_iter().take(m.hard).collect();
        let plan = m.plan(5, 3, i as usize, hard.len());
        let key = |j: usize| queue.get(hard[j] as i64);
        let mut synth: Vec<Tensor> =
            plan.pairs.iter().map(|&(a, b, alpha)| key(a) * alpha + key(b) * (1.0 - alpha)).collect();
        synth.extend(plan.query.iter().map(|&(j, beta)| qi.detach() * beta + key(j) * (1.0 - beta)));
        let h = contrast_nn::loss::l2_normalize(&Tensor::stack(&synth, 0));
        let l_pos = (&qi * k.get(i)).sum(Kind::Double).unsqueeze(0);
        let logits = Tensor::cat(&[l_pos, l_neg, h.matmul(&qi)], 0) / t;
        total = total + (logits.logsumexp([0i64].as_slice(), false) - logits.get(0));
    }
    total / n as f64
}

#[test]
fn mochi_over_the_sharded_queue_matches_the_replicated_transcription() {
    use contrast_nn::loss::Ctx;
    use contrast_nn::method::mochi::Mochi;
    use contrast_nn::queue::ShardedQueue;
    let (b, d, t) = (3usize, 5i64, 0.2);
    let m = Mochi { hard: 6, mix_negatives: 4, mix_query: 3 };
    for p in [1usize, 2, 3, 4] {
        let n = p * b;
        let q = randn(n, d as usize, 11 + p as u64);
        let keys = contrast_nn::loss::l2_normalize(&randn(n, d as usize, 12));
        let queue = ShardedQueue::initial_canonical(4 * n, d as usize, 7);
        let want_q = q.detach().set_requires_grad(true);
        let want = mochi_reference(&want_q, &keys, &queue, t, &m);
        want.backward();
        let (want_loss, want_grad) = (want.double_value(&[]), contrast_nn::to_host::<f64>(&want_q.grad()));
        let (q, keys, queue) = (Host::of(&q), Host::of(&keys), Host::of(&queue));
        let ranks = Threads::run(p, |c| {
            let (q, keys, queue) = (q.t(), keys.t(), queue.t());
            let r = c.rank();
            let shard = ShardedQueue::from_canonical(&queue, 1, n, r, p).unwrap();
            let ctx = Ctx { shard: Shard { rank: r, world_size: p, local_batch: b }, reduce: &c };
            let leaf = q.detach().set_requires_grad(true);
            let qn = contrast_nn::loss::l2_normalize(&leaf);
            let extra = m.logits(&qn, &shard, 5, 3, t, &ctx).unwrap();
            let own = keys.narrow(0, (r * b) as i64, b as i64);
            let share = shard.infonce_share_with(&leaf, &own, t, Some(&extra), &ctx).unwrap();
            share.backward();
            (share.double_value(&[]), contrast_nn::to_host::<f64>(&leaf.grad()))
        });
        let loss: f64 = ranks.iter().map(|r| r.0).sum();
        let grad: Vec<f64> = (0..want_grad.len()).map(|i| ranks.iter().map(|r| r.1[i]).sum::<f64>()).collect();
        assert!((loss - want_loss).abs() <= 1e-12 * want_loss.abs(), "P={p}: {loss} vs {want_loss}");
        assert_close(&format!("P={p}: query gradient"), &grad, &want_grad, 1e-10);
    }
}
