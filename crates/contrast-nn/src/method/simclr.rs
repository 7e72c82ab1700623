//! SimCLR: a backbone and a projection MLP shared by every view; the loss is
//! any two-view loss (NT-Xent, its multi-positive form for multi-crop, SupCon,
//! DCL/DCLW, debiased, hard-negative, Barlow Twins, NCE, the soft targets of
//! mixed batches) or a metric loss on the first view and the labels.

use super::{set_kind, Batch, Method, MethodEntry, Share, Spec};
use crate::encoder::{self, Encoder};
use crate::engine::{Gathered, Towers};
use crate::head::Mlp;
use crate::loss::GlobalSum;
use crate::loss::*;
use crate::{NnError, Result};
use contrast_config::{AugmentPreset, ConfigError, LossConfig, LossKind, MethodSpec, RunInfo, Settings};
use tch::nn::VarStore;
use tch::Tensor;

/// SimCLR's configuration: no `method.*` keys; any two-view or metric loss.
pub struct SimclrSpec;

impl MethodSpec for SimclrSpec {
    fn runs_in_chunks(&self) -> bool {
        // an encoder and an MLP head, row by row: the gradient cache may split it.
        true
    }

    fn name(&self) -> &'static str {
        "simclr"
    }

    fn defaults(&self) -> Settings {
        Settings::default()
    }

    fn own_loss(&self) -> LossKind {
        LossKind::NtXent
    }

    fn accepts_loss(&self, loss: LossKind) -> bool {
        !loss.is_image_text() && !loss.is_method_own()
    }

    fn is_default_for(&self, loss: Option<LossKind>) -> bool {
        !loss.is_some_and(LossKind::is_image_text)
    }

    /// Multi-crop views train with NT-Xent's multi-positive form.
    fn accepts_augment(&self, preset: AugmentPreset, loss: LossKind) -> bool {
        preset != AugmentPreset::Swav || loss == LossKind::NtXent
    }

    fn check(&self, _settings: &Settings, _run: &RunInfo) -> std::result::Result<(), ConfigError> {
        Ok(())
    }

    fn describe(&self, _settings: &Settings, _run: &RunInfo) -> String {
        " method=Simclr".into()
    }
}

/// The registration of SimCLR.
pub const ENTRY: MethodEntry =
    MethodEntry { spec: &SimclrSpec, build: |vs, spec| Ok(Box::new(SimClr::new(vs, spec)?)) };

/// Backbone + projection head.
pub struct SimClr {
    vs: VarStore,
    backbone: Box<dyn Encoder>,
    head: Mlp,
    loss: LossKind,
    cfg: LossConfig,
}

impl SimClr {
    /// Build into `vs` (variables `backbone.*`, `head.*`).
    pub fn new(mut vs: VarStore, spec: &Spec) -> Result<Self> {
        let (m, root) = (&spec.model, vs.root());
        let backbone = encoder::build(&(&root / "backbone"), spec)?;
        let head = Mlp::new(&(&root / "head"), backbone.out_dim(), m.proj_hidden, m.proj_dim);
        set_kind(&mut vs, spec);
        Ok(Self { vs, backbone, head, loss: spec.loss, cfg: spec.loss_cfg.clone() })
    }
}

/// SupCon's soft class targets of a mixed batch: row i is λ_i on its class and
/// 1 − λ_i on its partner's.
fn mixed_label_probs(labels: &Tensor, m: &Mix) -> Tensor {
    let y = crate::to_host::<i64>(labels);
    let classes = y.iter().copied().max().unwrap_or(0).max(0) as usize + 1;
    let mut q = vec![0f64; y.len() * classes];
    for (i, &yi) in y.iter().enumerate() {
        q[i * classes + yi.max(0) as usize] += m.lambda[i];
        q[i * classes + y[m.partner[i] as usize].max(0) as usize] += 1.0 - m.lambda[i];
    }
    Tensor::from_slice(&q).view([y.len() as i64, classes as i64]).to_device(labels.device())
}

impl SimClr {
    fn labels<'a>(&self, batch: &'a Batch) -> Result<&'a Tensor> {
        batch.labels.ok_or_else(|| NnError::Param(format!("{:?} needs class labels", self.loss)))
    }

    /// Metric-learning losses: one embedding per sample (the first view) and its label.
    fn metric_share(&self, a: &Tensor, y: &Tensor, ctx: &Ctx) -> Result<Tensor> {
        let l = &self.cfg;
        match self.loss {
            LossKind::Contrastive => contrastive_share(a, y, l.pos_margin, l.neg_margin, l.squared, ctx),
            LossKind::Triplet => triplet_share(a, y, l.margin, l.mining, ctx),
            LossKind::Lifted => lifted_smooth_share(a, y, l.neg_margin, l.pos_margin, ctx),
            LossKind::LiftedHard => lifted_hard_share(a, y, l.neg_margin, ctx),
            LossKind::GeneralizedLifted => generalized_lifted_share(a, y, l.neg_margin, l.pos_margin, ctx),
            LossKind::NPair => npair_share(a, y, NPairForm::Cosine, ctx),
            LossKind::NPairDot => npair_share(a, y, NPairForm::Dot { l2_reg: l.l2_reg }, ctx),
            LossKind::Snn => snn_share(a, y, self.cfg.temperature_for(self.loss), ctx),
            k => Err(NnError::Param(format!("{k:?} is not a metric loss"))),
        }
    }

    /// Two-view (and multi-view) losses without mixing.
    fn views_share(&self, g: &[Tensor], batch: &Batch, ctx: &Ctx) -> Result<Tensor> {
        let (l, t, shard) = (&self.cfg, self.cfg.temperature_for(self.loss), ctx.shard);
        let (a, b) = (&g[0], g.get(1).unwrap_or(&g[0]));
        match self.loss {
            LossKind::NtXent if g.len() > 2 => ntxent_multi_share(g, t, ctx),
            LossKind::NtXent => ntxent_share(a, b, t, shard),
            LossKind::SupCon => supcon_share(g, self.labels(batch)?, t, ctx),
            LossKind::Dcl => dcl_share(a, b, t, None, shard),
            LossKind::Dclw => dcl_share(a, b, t, Some(l.sigma), shard),
            LossKind::Debiased => debiased_share(a, b, t, l.tau_plus, 0.0, shard),
            LossKind::HardNegative => debiased_share(a, b, t, l.tau_plus, l.beta, shard),
            LossKind::BarlowTwins => barlow_twins_share(a, b, l.lambda, Standardise::BatchNorm, shard),
            LossKind::BarlowTwinsUnbiased => barlow_twins_share(a, b, l.lambda, Standardise::Unbiased, shard),
            LossKind::Nce => nce_share(a, b, t, l.noise_size, shard),
            k if k.is_metric() => self.metric_share(a, self.labels(batch)?, ctx),
            k => Err(NnError::Param(format!("loss {k:?} does not fit SimCLR"))),
        }
    }
}

impl Method for SimClr {
    fn name(&self) -> &'static str {
        "simclr"
    }

    fn var_store(&self) -> &VarStore {
        &self.vs
    }

    fn forward(&self, batch: &Batch, _comm: &dyn GlobalSum) -> Result<Towers> {
        // Metric-learning losses take one embedding per sample: the first view.
        let used = if self.loss.is_metric() { &batch.views[..1] } else { batch.views };
        let grad = used.iter().map(|v| self.backbone.forward_t(v, true).apply(&self.head)).collect();
        Ok(Towers { grad, ..Default::default() })
    }

    fn loss_share(&self, g: &Gathered, batch: &Batch, ctx: &Ctx) -> Result<Share> {
        let t = self.cfg.temperature_for(self.loss);
        let towers = g.towers;
        let loss = match (self.loss, batch.mix) {
            (LossKind::NtXent, Some(m)) => ntxent_soft_share(&towers[0], &towers[1], m, t, ctx.shard)?,
            (LossKind::SupCon, Some(m)) => {
                supcon_soft_share(towers, &mixed_label_probs(self.labels(batch)?, m), t, ctx)?
            }
            (k, Some(_)) => return Err(NnError::Param(format!("loss {k:?} takes no soft targets"))),
            (_, None) => self.views_share(towers, batch, ctx)?,
        };
        Ok(Share { loss, monitor: Some(towers[0].shallow_clone()) })
    }

    fn backbone(&self) -> &dyn Encoder {
        self.backbone.as_ref()
    }
}
