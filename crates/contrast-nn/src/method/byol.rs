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

use super::{momentum_pairs, set_kind, Batch, Method, Share, Spec, StepInfo};
use crate::ema::Ema;
use crate::engine::{Gathered, Towers};
use crate::loss::{normalized_mse_share, Ctx, GlobalSum};
use crate::model::{BnMlp, ConvBackbone};
use crate::{NnError, Result};
use contrast_config::MethodName;
use tch::nn::{ModuleT, VarStore};
use tch::Tensor;

/// Online and target networks.
pub struct Byol {
    vs: VarStore,
    backbone: ConvBackbone,
    projector: BnMlp,
    predictor: BnMlp,
    target_backbone: ConvBackbone,
    target_projector: BnMlp,
    ema: Ema,
}

impl Byol {
    /// Build into `vs` (`backbone.*`, `projector.*`, `predictor.*`; targets under `momentum.*`).
    pub fn new(mut vs: VarStore, spec: &Spec) -> Result<Self> {
        let (m, root) = (&spec.model, vs.root());
        let hidden = spec.method.predictor_hidden;
        let backbone = ConvBackbone::new(&(&root / "backbone"), spec.in_channels, m.width, m.embed_dim, m.norm);
        let projector = BnMlp::new(&(&root / "projector"), m.embed_dim, m.proj_hidden, m.proj_dim, false);
        let predictor = BnMlp::new(&(&root / "predictor"), m.proj_dim, hidden, m.proj_dim, false);
        let t = &root / "momentum";
        let target_backbone = ConvBackbone::new(&(&t / "backbone"), spec.in_channels, m.width, m.embed_dim, m.norm);
        let target_projector = BnMlp::new(&(&t / "projector"), m.embed_dim, m.proj_hidden, m.proj_dim, false);
        set_kind(&mut vs, spec);
        let ema = Ema::new(momentum_pairs(&vs, "momentum."), spec.method.momentum, spec.method.momentum_schedule);
        ema.copy_online();
        Ok(Self { vs, backbone, projector, predictor, target_backbone, target_projector, ema })
    }
}

impl Method for Byol {
    fn name(&self) -> MethodName {
        MethodName::Byol
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

    fn features(&self, images: &Tensor) -> Tensor {
        self.backbone.forward_t(images, false)
    }
}
