//! Batch-level Mixup (Zhang et al. 2018) and CutMix (Yun et al. 2019).
//!
//! Partners and coefficients depend only on (seed, step, global row) —
//! docs/design.md invariant 2. Rows are mixed within fixed groups of `group`
//! consecutive rows of the global batch (a permutation inside each group), so
//! when the local batch is a multiple of the group every partner lives on the
//! same rank and no images cross the network, whatever the world size.
//! λ ~ Beta(α, α); CutMix pastes a box of area (1 − λ) from the partner and
//! then sets λ to the exact kept fraction, as the CutMix reference does. The
//! plan is handed to the losses that take soft targets.

use crate::rng::{key, sample_rng};
use rand::seq::SliceRandom;
use rand::Rng;
use rand_chacha::rand_core::SeedableRng;
use rand_distr::{Beta, Distribution};

/// Which mixing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MixKind {
    /// Pixel-wise convex combination.
    Mixup,
    /// A box pasted from the partner.
    CutMix,
}

/// Mixing parameters.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MixConfig {
    /// Mixup or CutMix.
    pub kind: MixKind,
    /// Beta(α, α) parameter of λ.
    pub alpha: f64,
    /// Rows per mixing group (partners are drawn inside a group).
    pub group: usize,
}

/// The mixing of one global batch.
#[derive(Debug, Clone, PartialEq)]
pub struct MixPlan {
    /// Partner π(i) of each global row (a permutation within groups).
    pub partner: Vec<i64>,
    /// Weight λ_i of each row's own sample.
    pub lambda: Vec<f64>,
    /// CutMix box (top, left, height, width) of each row, in output pixels.
    pub boxes: Vec<Option<(usize, usize, usize, usize)>>,
}

const STREAM_MIX: u64 = 7;

/// The plan of global batch `step` (N rows, images `h × w`).
pub fn mix_plan(cfg: &MixConfig, seed: u64, step: usize, n: usize, h: usize, w: usize) -> MixPlan {
    let group = cfg.group.clamp(1, n.max(1));
    let mut partner: Vec<i64> = (0..n as i64).collect();
    for (g, chunk) in partner.chunks_mut(group).enumerate() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(key(&[seed, step as u64, STREAM_MIX, g as u64]));
        chunk.shuffle(&mut rng);
    }
    let beta = Beta::new(cfg.alpha, cfg.alpha).expect("alpha > 0");
    let mut lambda = Vec::with_capacity(n);
    let mut boxes = Vec::with_capacity(n);
    for i in 0..n {
        let mut rng = sample_rng(seed, step as u64, i as u64, STREAM_MIX + 1);
        let lam: f64 = beta.sample(&mut rng);
        match cfg.kind {
            MixKind::Mixup => {
                lambda.push(lam);
                boxes.push(None);
            }
            MixKind::CutMix => {
                let cut = (1.0 - lam).sqrt();
                let (ch, cw) = ((h as f64 * cut) as usize, (w as f64 * cut) as usize);
                let (cy, cx) = (rng.gen_range(0..h), rng.gen_range(0..w));
                let (top, bottom) = (cy.saturating_sub(ch / 2), (cy + ch / 2).min(h));
                let (left, right) = (cx.saturating_sub(cw / 2), (cx + cw / 2).min(w));
                let area = (bottom - top) * (right - left);
                lambda.push(1.0 - area as f64 / (h * w) as f64);
                boxes.push(Some((top, left, bottom - top, right - left)));
            }
        }
    }
    MixPlan { partner, lambda, boxes }
}

/// Mix this rank's rows of one view in place. `view` holds rows
/// `[offset, offset + B)` of the global batch, each `channels × h × w`; every
/// partner must be among them (the group divides the local batch).
pub fn apply_mix(plan: &MixPlan, view: &mut [f32], offset: usize, channels: usize, h: usize, w: usize) {
    let per = channels * h * w;
    let b = view.len() / per;
    let original = view.to_vec();
    for r in 0..b {
        let i = offset + r;
        let p = plan.partner[i] as usize;
        assert!((offset..offset + b).contains(&p), "mixing partner {p} of row {i} is on another rank");
        let src = &original[(p - offset) * per..(p - offset + 1) * per];
        let dst = &mut view[r * per..(r + 1) * per];
        match plan.boxes[i] {
            None => {
                let l = plan.lambda[i] as f32;
                for (d, s) in dst.iter_mut().zip(src) {
                    *d = l * *d + (1.0 - l) * s;
                }
            }
            Some((top, left, bh, bw)) => {
                for c in 0..channels {
                    for y in top..top + bh {
                        let o = c * h * w + y * w;
                        dst[o + left..o + left + bw].copy_from_slice(&src[o + left..o + left + bw]);
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partners_stay_in_groups_and_plans_are_keyed() {
        let cfg = MixConfig { kind: MixKind::Mixup, alpha: 1.0, group: 4 };
        let p = mix_plan(&cfg, 3, 7, 12, 8, 8);
        for (i, &q) in p.partner.iter().enumerate() {
            assert_eq!(i / 4, q as usize / 4);
        }
        let mut sorted = p.partner.clone();
        sorted.sort();
        assert_eq!(sorted, (0..12).collect::<Vec<_>>());
        assert!(p.lambda.iter().all(|l| (0.0..=1.0).contains(l)));
        assert_eq!(p, mix_plan(&cfg, 3, 7, 12, 8, 8));
        assert_ne!(p, mix_plan(&cfg, 3, 8, 12, 8, 8));
    }

    #[test]
    fn mixup_and_cutmix_mix_as_planned() {
        let (c, h, w) = (1, 4, 4);
        let view: Vec<f32> = (0..4 * 16).map(|v| (v / 16) as f32).collect(); // row r is all r
        let plan = MixPlan { partner: vec![1, 0, 3, 2], lambda: vec![0.25; 4], boxes: vec![None; 4] };
        let mut v = view.clone();
        apply_mix(&plan, &mut v, 0, c, h, w);
        assert!(v[..16].iter().all(|x| (x - 0.75).abs() < 1e-6), "0.25·0 + 0.75·1");
        let cfg = MixConfig { kind: MixKind::CutMix, alpha: 1.0, group: 2 };
        let plan = mix_plan(&cfg, 1, 0, 4, h, w);
        let mut v = view.clone();
        apply_mix(&plan, &mut v, 0, c, h, w);
        for r in 0..4 {
            let own = r as f32;
            let kept = v[r * 16..(r + 1) * 16].iter().filter(|x| **x == own).count() as f64 / 16.0;
            let expect = if plan.partner[r] as usize == r { 1.0 } else { plan.lambda[r] };
            assert!((kept - expect).abs() < 1e-9, "row {r}: kept {kept}, λ {expect}");
        }
    }
}
