//! SimSiam (Chen & He 2021): one encoder (backbone + projector) for both
//! views, a predictor, and a stop-gradient on the other view's projection;
//! the loss is −cos(p₁, sg z₂)/2 − cos(p₂, sg z₁)/2.
//!
//! Projector: Linear → BN → ReLU → Linear → BN (no affine), a 2-layer form of
//! the reference's 3-layer projector (which ends in the same affine-free BN);
//! predictor: Linear → BN → ReLU → Linear (the reference's bottleneck). Both
//! run on the gathered backbone features, so their batch statistics are the
//! global batch's and parity with one process is exact.

use super::{check_predictor, set_kind, settings, Batch, Method, MethodEntry, Share, Spec};
use crate::encoder::{self, Encoder};
use crate::engine::{Gathered, Towers};
use crate::head::BnMlp;
use crate::loss::GlobalSum;
use crate::loss::{negative_cosine_share, Ctx};
use crate::{NnError, Result};
use contrast_config::{ConfigError, LossKind, MethodSpec, RunInfo, Settings};
use serde::{Deserialize, Serialize};
use tch::nn::{ModuleT, VarStore};
use tch::Tensor;

/// SimSiam's `method.*` keys.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SimsiamKeys {
    /// Hidden width of the predictor MLP (required; the reference's bottleneck is a quarter of the projection).
    pub predictor_hidden: Option<i64>,
}

/// SimSiam's configuration.
pub struct SimsiamSpec;

impl MethodSpec for SimsiamSpec {
    fn name(&self) -> &'static str {
        "simsiam"
    }

    fn defaults(&self) -> Settings {
        Settings::of(&SimsiamKeys::default())
    }

    fn own_loss(&self) -> LossKind {
        LossKind::NegativeCosine
    }

    fn check(&self, settings: &Settings, run: &RunInfo) -> std::result::Result<(), ConfigError> {
        let k: SimsiamKeys = settings.parse("method")?;
        check_predictor("Simsiam", k.predictor_hidden, run)
    }

    fn describe(&self, settings: &Settings, _run: &RunInfo) -> String {
        let k: SimsiamKeys = settings.parse("method").unwrap_or_default();
        format!(" method=Simsiam predictor_hidden={}", k.predictor_hidden.unwrap_or(0))
    }
}

/// The registration of SimSiam.
pub const ENTRY: MethodEntry =
    MethodEntry { spec: &SimsiamSpec, build: |vs, spec| Ok(Box::new(SimSiam::new(vs, spec)?)) };

/// Shared encoder and predictor.
pub struct SimSiam {
    vs: VarStore,
    backbone: Box<dyn Encoder>,
    projector: BnMlp,
    predictor: BnMlp,
}

impl SimSiam {
    /// Build into `vs` (`backbone.*`, `projector.*`, `predictor.*`).
    pub fn new(mut vs: VarStore, spec: &Spec) -> Result<Self> {
        let (m, root) = (&spec.model, vs.root());
        let hidden = settings::<SimsiamKeys>(spec)?.predictor_hidden.unwrap_or(0);
        let backbone = encoder::build(&(&root / "backbone"), spec)?;
        let projector = BnMlp::new(&(&root / "projector"), backbone.out_dim(), m.proj_hidden, m.proj_dim, true);
        let predictor = BnMlp::new(&(&root / "predictor"), m.proj_dim, hidden, m.proj_dim, false);
        set_kind(&mut vs, spec);
        Ok(Self { vs, backbone, projector, predictor })
    }
}

impl Method for SimSiam {
    fn name(&self) -> &'static str {
        "simsiam"
    }

    fn var_store(&self) -> &VarStore {
        &self.vs
    }

    fn forward(&self, batch: &Batch, _comm: &dyn GlobalSum) -> Result<Towers> {
        if batch.views.len() != 2 {
            return Err(NnError::Param(format!("SimSiam takes two views, got {}", batch.views.len())));
        }
        let grad = batch.views.iter().map(|v| self.backbone.forward_t(v, true)).collect();
        Ok(Towers { grad, ..Default::default() })
    }

    fn loss_share(&self, g: &Gathered, batch: &Batch, ctx: &Ctx) -> Result<Share> {
        if batch.mix.is_some() {
            return Err(NnError::Param("SimSiam takes no soft targets".into()));
        }
        let z: Vec<Tensor> = g.towers.iter().map(|h| self.projector.forward_t(h, true)).collect();
        let p: Vec<Tensor> = z.iter().map(|z| self.predictor.forward_t(z, true)).collect();
        // negative_cosine_share detaches its target: the stop-gradient.
        let loss =
            (negative_cosine_share(&p[0], &z[1], ctx.shard)? + negative_cosine_share(&p[1], &z[0], ctx.shard)?) * 0.5;
        Ok(Share { loss, monitor: Some(z[0].shallow_clone()) })
    }

    fn backbone(&self) -> &dyn Encoder {
        self.backbone.as_ref()
    }
}
