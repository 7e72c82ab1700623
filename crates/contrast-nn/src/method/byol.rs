//! BYOL (Grill et al. 2020): an online network (backbone, projector,
//! predictor) regresses the projection of the other view by a target network
//! (backbone, projector) that follows it by EMA, with BYOL's cosine momentum
//! schedule by default. The loss is the normalised MSE 2 − 2 cos(p, sg z),
//! symmetrised over the two views (summed, as the reference does).
//!
//! Projector and predictor are Linear → BatchNorm → ReLU → Linear, as in the
//! reference. They run on the **gathered** backbone features of each view (the
//! target projector on the gathered target features), so their batch
//! statistics are the global batch's and parity with one process is exact.

use super::{check_momentum, check_predictor, describe_momentum, momentum_pairs, set_kind, settings};
use super::{Batch, Method, MethodEntry, Share, Spec, StepInfo};
use crate::ema::Ema;
use crate::encoder::{self, Encoder};
use crate::engine::{Gathered, Towers};
use crate::head::BnMlp;
use crate::loss::{normalized_mse_share, Ctx, GlobalSum};
use crate::{NnError, Result};
use contrast_config::{ConfigError, LossKind, MethodSpec, MomentumSchedule, RunInfo, Settings};
use serde::{Deserialize, Serialize};
use tch::nn::{ModuleT, VarStore};
use tch::Tensor;

/// BYOL's `method.*` keys.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ByolKeys {
    /// Hidden width of the predictor MLP (required).
    pub predictor_hidden: Option<i64>,
    /// m₀ of the target network's EMA (0.99 suits short runs; the reference's 0.996 long ones).
    pub momentum: f64,
    /// BYOL's `cosine` schedule from m₀ to 1, or a `constant` m.
    pub momentum_schedule: MomentumSchedule,
}

impl Default for ByolKeys {
    fn default() -> Self {
        Self { predictor_hidden: None, momentum: 0.99, momentum_schedule: MomentumSchedule::Cosine }
    }
}

/// BYOL's configuration.
pub struct ByolSpec;

impl MethodSpec for ByolSpec {
    fn name(&self) -> &'static str {
        "byol"
    }

    fn defaults(&self) -> Settings {
        Settings::of(&ByolKeys::default())
    }

    fn own_loss(&self) -> LossKind {
        LossKind::NormalizedMse
    }

    fn check(&self, settings: &Settings, run: &RunInfo) -> std::result::Result<(), ConfigError> {
        let k: ByolKeys = settings.parse("method")?;
        check_momentum(k.momentum)?;
        check_predictor("Byol", k.predictor_hidden, run)
    }

    fn describe(&self, settings: &Settings, _run: &RunInfo) -> String {
        let k: ByolKeys = settings.parse("method").unwrap_or_default();
        let hidden = k.predictor_hidden.unwrap_or(0);
        format!(" method=Byol predictor_hidden={hidden}{}", describe_momentum(k.momentum, k.momentum_schedule))
    }
}

/// The registration of BYOL.
pub const ENTRY: MethodEntry = MethodEntry { spec: &ByolSpec, build: |vs, spec| Ok(Box::new(Byol::new(vs, spec)?)) };

/// Online and target networks.
pub struct Byol {
    vs: VarStore,
    backbone: Box<dyn Encoder>,
    projector: BnMlp,
    predictor: BnMlp,
    target_backbone: Box<dyn Encoder>,
    target_projector: BnMlp,
    ema: Ema,
}

impl Byol {
    /// Build into `vs` (`backbone.*`, `projector.*`, `predictor.*`; targets under `momentum.*`).
    pub fn new(mut vs: VarStore, spec: &Spec) -> Result<Self> {
        let (m, root) = (&spec.model, vs.root());
        let keys: ByolKeys = settings(spec)?;
        let hidden = keys.predictor_hidden.unwrap_or(0);
        let backbone = encoder::build(&(&root / "backbone"), spec)?;
        let dim = backbone.out_dim();
        let projector = BnMlp::new(&(&root / "projector"), dim, m.proj_hidden, m.proj_dim, false);
        let predictor = BnMlp::new(&(&root / "predictor"), m.proj_dim, hidden, m.proj_dim, false);
        let t = &root / "momentum";
        let target_backbone = encoder::build(&(&t / "backbone"), spec)?;
        let target_projector = BnMlp::new(&(&t / "projector"), dim, m.proj_hidden, m.proj_dim, false);
        set_kind(&mut vs, spec);
        let ema = Ema::new(momentum_pairs(&vs, "momentum."), keys.momentum, keys.momentum_schedule);
        ema.copy_online();
        Ok(Self { vs, backbone, projector, predictor, target_backbone, target_projector, ema })
    }
}

impl Method for Byol {
    fn name(&self) -> &'static str {
        "byol"
    }

    fn sync_momentum(&self) {
        self.ema.copy_online();
    }

    fn var_store(&self) -> &VarStore {
        &self.vs
    }

    fn forward(&self, batch: &Batch, _comm: &dyn GlobalSum) -> Result<Towers> {
        if batch.views.len() != 2 {
            return Err(NnError::Param(format!("BYOL takes two views, got {}", batch.views.len())));
        }
        let grad = batch.views.iter().map(|v| self.backbone.forward_t(v, true)).collect();
        let aux = tch::no_grad(|| batch.views.iter().map(|v| self.target_backbone.forward_t(v, true)).collect());
        Ok(Towers { grad, aux, local: vec![] })
    }

    fn loss_share(&self, g: &Gathered, batch: &Batch, ctx: &Ctx) -> Result<Share> {
        if batch.mix.is_some() {
            return Err(NnError::Param("BYOL takes no soft targets".into()));
        }
        let z: Vec<Tensor> = g.towers.iter().map(|h| self.projector.forward_t(h, true)).collect();
        let p: Vec<Tensor> = z.iter().map(|z| self.predictor.forward_t(z, true)).collect();
        let zt: Vec<Tensor> = tch::no_grad(|| g.aux.iter().map(|h| self.target_projector.forward_t(h, true)).collect());
        let loss = normalized_mse_share(&p[0], &zt[1], ctx.shard)? + normalized_mse_share(&p[1], &zt[0], ctx.shard)?;
        Ok(Share { loss, monitor: Some(z[0].shallow_clone()) })
    }

    fn after_step(&mut self, info: &StepInfo, _comm: &dyn GlobalSum) -> Result<()> {
        self.ema.update(info.done, info.total);
        Ok(())
    }

    fn backbone(&self) -> &dyn Encoder {
        self.backbone.as_ref()
    }
}
