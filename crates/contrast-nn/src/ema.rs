//! Momentum (EMA) encoders: θ_k ← m·θ_k + (1−m)·θ_q after each optimiser step.
//!
//! A method declares its (online, target) pairs once, as solo-learn's
//! `extra_momentum_pairs` do, and one [`Ema`] updates them all. The target
//! tensors never require a gradient. m is constant (MoCo) or follows BYOL's
//! cosine schedule m_k = 1 − (1 − m₀)·(cos(π k / K) + 1) / 2 from m₀ at step 0
//! to 1 at the last step K.

use contrast_config::MomentumSchedule;
use tch::Tensor;

/// Online and target tensors, updated in place by the moving average.
pub struct Ema {
    pairs: Vec<(Tensor, Tensor)>,
    base: f64,
    schedule: MomentumSchedule,
}

impl Ema {
    /// Pairs `(online, target)` of equal shapes; `base` is m (or m₀ with the cosine schedule).
    pub fn new(pairs: Vec<(Tensor, Tensor)>, base: f64, schedule: MomentumSchedule) -> Self {
        for (o, t) in &pairs {
            assert_eq!(o.size(), t.size(), "EMA pair of different shapes");
        }
        Self { pairs, base, schedule }
    }

    /// The momentum after `done` of `total` steps.
    pub fn momentum(&self, done: usize, total: usize) -> f64 {
        match self.schedule {
            MomentumSchedule::Constant => self.base,
            MomentumSchedule::Cosine => {
                let x = done as f64 / total.max(1) as f64;
                1.0 - (1.0 - self.base) * ((std::f64::consts::PI * x.min(1.0)).cos() + 1.0) / 2.0
            }
        }
    }

    /// One update after `done` of `total` steps; returns the momentum used.
    pub fn update(&self, done: usize, total: usize) -> f64 {
        let m = self.momentum(done, total);
        tch::no_grad(|| {
            for (online, target) in &self.pairs {
                let mut t = target.shallow_clone();
                let _ = t.g_mul_scalar_(m);
                let _ = t.g_add_(&(online.detach() * (1.0 - m)));
            }
        });
        m
    }

    /// Copy every online tensor into its target (θ_k = θ_q at the start).
    pub fn copy_online(&self) {
        tch::no_grad(|| {
            for (online, target) in &self.pairs {
                target.shallow_clone().copy_(online);
            }
        });
    }
}
