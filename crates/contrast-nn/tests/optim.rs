//! Optimisers against PyTorch's update formulas, written out for scalars.

use contrast_nn::optim::{Optimizer, OptimizerKind, Param, Schedule};
use tch::{Kind, Tensor};

fn param(name: &str, v: &[f64], shape: &[i64]) -> Param {
    Param::new(name.into(), Tensor::from_slice(v).view(shape).set_requires_grad(true))
}

fn set_grad(p: &Param, g: &[f64]) {
    // ∂(Σ w·g)/∂w = g.
    let g = Tensor::from_slice(g).view(p.tensor.size().as_slice());
    let mut t = p.tensor.shallow_clone();
    t.zero_grad();
    (&p.tensor * g).sum(Kind::Double).backward();
}

fn values(p: &Param) -> Vec<f64> {
    contrast_nn::to_host::<f64>(&p.tensor)
}

#[test]
fn sgd_momentum_and_decay_follow_torch() {
    // torch.optim.SGD(lr=0.1, momentum=0.9, weight_decay=0.01): d = g + λw; buf = μ·buf + d (buf₁ = d); w -= lr·buf.
    let mut opt = Optimizer::new(
        OptimizerKind::Sgd { momentum: 0.9, nesterov: false },
        0.01,
        vec![param("w", &[1.0, 2.0, 3.0, 4.0], &[2, 2])],
    );
    let (mut w, mut buf) = ([1.0f64, 2.0, 3.0, 4.0], [0.0f64; 4]);
    for step in 0..3 {
        let g = [0.5, -1.0, 0.25, 2.0].map(|v| v * (step + 1) as f64);
        set_grad(&opt.params[0], &g);
        opt.step(0.1);
        for k in 0..4 {
            let d = g[k] + 0.01 * w[k];
            buf[k] = if step == 0 { d } else { 0.9 * buf[k] + d };
            w[k] -= 0.1 * buf[k];
        }
        let got = values(&opt.params[0]);
        for k in 0..4 {
            assert!((got[k] - w[k]).abs() < 1e-12, "step {step}: {got:?} vs {w:?}");
        }
    }
}

#[test]
fn adamw_follows_torch_and_skips_decay_on_vectors() {
    // torch.optim.AdamW(lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1).
    let (b1, b2, eps, lr, wd) = (0.9f64, 0.999f64, 1e-8, 0.01, 0.1);
    let mut opt = Optimizer::new(
        OptimizerKind::AdamW { beta1: b1, beta2: b2, eps },
        wd,
        vec![param("bias", &[0.5, -0.5], &[2]), param("weight", &[1.0, -2.0], &[1, 2])],
    );
    assert!(!opt.params[0].decay && opt.params[1].decay);
    let mut w = [[0.5f64, -0.5], [1.0, -2.0]];
    let (mut m, mut v) = ([[0.0f64; 2]; 2], [[0.0f64; 2]; 2]);
    for t in 1..=4 {
        let g = [[0.3 * t as f64, -0.1], [1.0, 0.2 * t as f64]];
        set_grad(&opt.params[0], &g[0]);
        set_grad(&opt.params[1], &g[1]);
        opt.step(lr);
        for p in 0..2 {
            for k in 0..2 {
                if p == 1 {
                    w[p][k] *= 1.0 - lr * wd;
                }
                m[p][k] = b1 * m[p][k] + (1.0 - b1) * g[p][k];
                v[p][k] = b2 * v[p][k] + (1.0 - b2) * g[p][k] * g[p][k];
                let mh = m[p][k] / (1.0 - b1.powi(t));
                let vh = v[p][k] / (1.0 - b2.powi(t));
                w[p][k] -= lr * mh / (vh.sqrt() + eps);
            }
            let got = values(&opt.params[p]);
            assert!(
                (got[0] - w[p][0]).abs() < 1e-12 && (got[1] - w[p][1]).abs() < 1e-12,
                "t={t} p={p}: {got:?} vs {:?}",
                w[p]
            );
        }
    }
    // State round-trips through named tensors.
    let state = opt.named_state();
    let mut fresh = Optimizer::new(
        opt.kind.clone(),
        wd,
        vec![param("bias", &[0.0, 0.0], &[2]), param("weight", &[0.0, 0.0], &[1, 2])],
    );
    fresh.load_state(&state).unwrap();
    assert_eq!(fresh.steps, 4);
    assert_eq!(contrast_nn::to_host::<f64>(&fresh.state[1][1]), contrast_nn::to_host::<f64>(&opt.state[1][1]));
    let err = fresh.load_state(&state[1..]).unwrap_err();
    assert!(err.contains("bias.exp_avg"), "{err}");
}

#[test]
fn clipping_scales_to_the_max_norm() {
    let mut opt =
        Optimizer::new(OptimizerKind::Sgd { momentum: 0.0, nesterov: false }, 0.0, vec![param("w", &[0.0, 0.0], &[2])]);
    set_grad(&opt.params[0], &[3.0, 4.0]);
    let before = opt.clip_grad_norm(1.0);
    assert!((before - 5.0).abs() < 1e-12);
    assert!((opt.grad_norm() - 1.0).abs() < 1e-6);
}

#[test]
fn warmup_then_cosine() {
    let s = Schedule { peak: 1.0, warmup: 10, total: 110, final_frac: 0.0, cosine: true };
    assert!((s.lr(0) - 0.1).abs() < 1e-12);
    assert!((s.lr(9) - 1.0).abs() < 1e-12);
    assert!((s.lr(10) - 1.0).abs() < 1e-12);
    assert!((s.lr(60) - 0.5).abs() < 1e-12);
    assert!(s.lr(109) < 0.001);
    let c = Schedule { cosine: false, ..s };
    assert_eq!(c.lr(100), 1.0);
}

#[test]
fn a_restarted_parameter_steps_as_under_a_fresh_optimiser_and_its_restart_is_state() {
    // DeepCluster's classifier: its AdamW moments restart each epoch, and its
    // bias correction counts from the restart, as a new torch.optim.AdamW would.
    let kind = OptimizerKind::AdamW { beta1: 0.9, beta2: 0.999, eps: 1e-8 };
    let params = || vec![param("body", &[1.0, -1.0], &[1, 2]), param("top", &[0.5, 0.25], &[1, 2])];
    let mut opt = Optimizer::new(kind.clone(), 0.01, params());
    assert!(opt.track_restarts(&["nope"]).unwrap_err().contains("`nope`"));
    opt.track_restarts(&["top"]).unwrap();
    for t in 0..3 {
        set_grad(&opt.params[0], &[0.1 * t as f64, 1.0]);
        set_grad(&opt.params[1], &[1.0, -0.5 * t as f64]);
        opt.step(0.01);
    }
    assert!(opt.restart(&["body"]).unwrap_err().contains("not tracked"));
    opt.restart(&["top"]).unwrap();
    // A fresh optimiser over `top` alone, from where `top` stands now.
    let now = values(&opt.params[1]);
    let mut fresh = Optimizer::new(kind.clone(), 0.01, vec![param("top", &now, &[1, 2])]);
    for t in 0..2 {
        let g = [0.3, 0.7 * (t + 1) as f64];
        set_grad(&opt.params[0], &[1.0, 1.0]);
        set_grad(&opt.params[1], &g);
        set_grad(&fresh.params[0], &g);
        opt.step(0.01);
        fresh.step(0.01);
        assert!(rel(&values(&opt.params[1]), &values(&fresh.params[0])) < 1e-12, "step {t} after the restart");
    }
    // The restart step is saved and restored; without it the state is refused.
    let state = opt.named_state();
    assert!(state.iter().any(|(n, t)| n == "top.restarted_at" && t.int64_value(&[0]) == 3));
    let mut back = Optimizer::new(kind, 0.01, params());
    back.track_restarts(&["top"]).unwrap();
    back.load_state(&state).unwrap();
    assert_eq!(back.named_state().last().map(|(_, t)| t.int64_value(&[0])), Some(3));
    let without: Vec<_> = state.into_iter().filter(|(n, _)| n != "top.restarted_at").collect();
    assert!(back.load_state(&without).unwrap_err().contains("top.restarted_at"));
}

fn rel(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| (x - y).abs() / y.abs().max(1e-12)).fold(0.0, f64::max)
}
