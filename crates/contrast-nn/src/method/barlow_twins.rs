//! Barlow Twins (Zbontar et al. 2021, the `facebookresearch/barlowtwins`
//! reference): one backbone for both views, the paper's projector of
//! `method.projector_layers` linear layers without biases (BN → ReLU between
//! them; widths `model.proj_hidden`, …, `model.proj_dim`), and the
//! cross-correlation loss of the two views' projections, each standardised
//! over the batch by a batch norm without affine parameters
//! (Σ_i (1 − C_ii)² + λ Σ_{i≠j} C_ij², `loss.lambda`).
//!
//! The projector runs on the **gathered** backbone features of each view, so
//! its batch statistics (and the loss's standardisation) are the global
//! batch's and P ranks × B equals 1 rank × P·B exactly; its parameters get a
//! share of their gradient on every rank, like a loss-head parameter. The
//! reference trains with LARS (`train.optimizer.lars: true`), which leaves
//! biases and batch-norm parameters out of the adaptation and the decay.

use super::{set_kind, settings, Batch, Method, MethodEntry, Share, Spec};
use crate::encoder::{self, Encoder};
use crate::engine::{Gathered, Towers};
use crate::head::BnMlp;
use crate::loss::{barlow_twins_share, Ctx, GlobalSum, Standardise};
use crate::{NnError, Result};
use contrast_config::{invalid, ConfigError, LossKind, MethodSpec, RunInfo, Settings};
use serde::{Deserialize, Serialize};
use tch::nn::{ModuleT, VarStore};
use tch::Tensor;

/// Barlow Twins' `method.*` keys.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BarlowTwinsKeys {
    /// Linear layers of the projector (3 in the paper: 8192-8192-8192).
    pub projector_layers: usize,
}

impl Default for BarlowTwinsKeys {
    fn default() -> Self {
        Self { projector_layers: 3 }
    }
}

/// Barlow Twins' configuration.
pub struct BarlowTwinsSpec;

impl MethodSpec for BarlowTwinsSpec {
    fn name(&self) -> &'static str {
        "barlow_twins"
    }

    fn defaults(&self) -> Settings {
        Settings::of(&BarlowTwinsKeys::default())
    }

    fn own_loss(&self) -> LossKind {
        LossKind::BarlowTwins
    }

    fn accepts_loss(&self, loss: LossKind) -> bool {
        matches!(loss, LossKind::BarlowTwins | LossKind::BarlowTwinsUnbiased)
    }

    fn model_keys(&self) -> &'static [&'static str] {
        &["proj_dim", "proj_hidden"]
    }

    fn check(&self, settings: &Settings, run: &RunInfo) -> std::result::Result<(), ConfigError> {
        let k: BarlowTwinsKeys = settings.parse("method")?;
        if !(1..=8).contains(&k.projector_layers) {
            return Err(invalid("method.projector_layers", format!("must be 1 to 8, got {}", k.projector_layers)));
        }
        if run.global_batch < 2 {
            return Err(invalid("train.global_batch", "Barlow Twins' batch norms need at least 2 samples"));
        }
        Ok(())
    }

    fn describe(&self, settings: &Settings, _run: &RunInfo) -> String {
        let k: BarlowTwinsKeys = settings.parse("method").unwrap_or_default();
        format!(" method=BarlowTwins projector_layers={} (on the gathered batch)", k.projector_layers)
    }
}

/// The registration of Barlow Twins.
pub const ENTRY: MethodEntry =
    MethodEntry { spec: &BarlowTwinsSpec, build: |vs, spec| Ok(Box::new(BarlowTwins::new(vs, spec)?)) };

/// Backbone and batch-normalised projector.
pub struct BarlowTwins {
    vs: VarStore,
    backbone: Box<dyn Encoder>,
    projector: BnMlp,
    lambda: f64,
    standardise: Standardise,
}

impl BarlowTwins {
    /// Build into `vs` (`backbone.*`, `projector.fc1…`, `projector.bn1…`).
    pub fn new(mut vs: VarStore, spec: &Spec) -> Result<Self> {
        let (m, root) = (&spec.model, vs.root());
        let keys: BarlowTwinsKeys = settings(spec)?;
        let backbone = encoder::build(&(&root / "backbone"), spec)?;
        let mut widths = vec![backbone.out_dim()];
        widths.extend(std::iter::repeat_n(m.proj_hidden, keys.projector_layers.saturating_sub(1)));
        widths.push(m.proj_dim);
        let projector = BnMlp::layers(&(&root / "projector"), &widths, false, false);
        set_kind(&mut vs, spec);
        let standardise = match spec.loss {
            LossKind::BarlowTwinsUnbiased => Standardise::Unbiased,
            _ => Standardise::BatchNorm,
        };
        Ok(Self { vs, backbone, projector, lambda: spec.loss_cfg.lambda, standardise })
    }
}

impl Method for BarlowTwins {
    fn name(&self) -> &'static str {
        "barlow_twins"
    }

    fn var_store(&self) -> &VarStore {
        &self.vs
    }

    fn forward(&self, batch: &Batch, _comm: &dyn GlobalSum) -> Result<Towers> {
        if batch.views.len() != 2 {
            return Err(NnError::Param(format!("Barlow Twins takes two views, got {}", batch.views.len())));
        }
        let grad = batch.views.iter().map(|v| self.backbone.forward_t(v, true)).collect();
        Ok(Towers { grad, ..Default::default() })
    }

    fn loss_share(&self, g: &Gathered, batch: &Batch, ctx: &Ctx) -> Result<Share> {
        if batch.mix.is_some() {
            return Err(NnError::Param("Barlow Twins takes no soft targets".into()));
        }
        let z: Vec<Tensor> = g.towers.iter().map(|h| self.projector.forward_t(h, true)).collect();
        let loss = barlow_twins_share(&z[0], &z[1], self.lambda, self.standardise, ctx.shard)?;
        Ok(Share { loss, monitor: Some(z[0].shallow_clone()) })
    }

    fn backbone(&self) -> &dyn Encoder {
        self.backbone.as_ref()
    }
}
