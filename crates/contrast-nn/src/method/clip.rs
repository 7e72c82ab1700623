//! CLIP: an image tower (backbone + linear projection) and a text tower into one
//! space, with a learnable logit scale (and SigLIP's bias) as loss-head
//! parameters. After each step the log logit scale is clamped to [0, ln 100]
//! (open_clip).

use super::{set_kind, Batch, Method, MethodEntry, Share, Spec};
use crate::encoder::text::{Captions, TextTower};
use crate::encoder::{self, Encoder};
use crate::engine::{Gathered, Towers};
use crate::loss::{clip_share, siglip_share, Ctx, GlobalSum};
use crate::{NnError, Result};
use contrast_config::{ConfigError, LossKind, MethodSpec, RunInfo, Settings};
use tch::nn::{self, VarStore};
use tch::Tensor;

/// CLIP's configuration: no `method.*` keys; CLIP or SigLIP; reads `model.text`.
pub struct ClipSpec;

impl MethodSpec for ClipSpec {
    fn runs_in_chunks(&self) -> bool {
        // two towers, row by row: the gradient cache may split it.
        true
    }

    fn name(&self) -> &'static str {
        "clip"
    }

    fn defaults(&self) -> Settings {
        Settings::default()
    }

    fn own_loss(&self) -> LossKind {
        LossKind::Clip
    }

    fn accepts_loss(&self, loss: LossKind) -> bool {
        loss.is_image_text()
    }

    fn is_default_for(&self, loss: Option<LossKind>) -> bool {
        loss.is_some_and(LossKind::is_image_text)
    }

    fn model_keys(&self) -> &'static [&'static str] {
        &["proj_dim", "text"]
    }

    fn check(&self, _settings: &Settings, _run: &RunInfo) -> std::result::Result<(), ConfigError> {
        Ok(())
    }

    fn describe(&self, _settings: &Settings, _run: &RunInfo) -> String {
        " method=Clip".into()
    }
}

/// The registration of CLIP.
pub const ENTRY: MethodEntry = MethodEntry { spec: &ClipSpec, build: |vs, spec| Ok(Box::new(Clip::new(vs, spec)?)) };

/// Image and text towers.
pub struct Clip {
    vs: VarStore,
    backbone: Box<dyn Encoder>,
    image_proj: nn::Linear,
    text: TextTower,
    /// log of the logit scale.
    logit_scale: Tensor,
    /// SigLIP's logit bias.
    logit_bias: Option<Tensor>,
    loss: LossKind,
}

impl Clip {
    /// Build into `vs` (variables `backbone.*`, `text.*`, `image_proj.*`, `loss.*`).
    pub fn new(mut vs: VarStore, spec: &Spec) -> Result<Self> {
        let (m, l, root) = (&spec.model, &spec.loss_cfg, vs.root());
        let backbone = encoder::build(&(&root / "backbone"), spec)?;
        let text = TextTower::new(&(&root / "text"), spec.text_vocab, &m.text, m.proj_dim);
        let no_bias = nn::LinearConfig { bias: false, ..Default::default() };
        let image_proj = nn::linear(&root / "image_proj", backbone.out_dim(), m.proj_dim, no_bias);
        let init = (1.0 / spec.temperature()).ln();
        let head = &root / "loss";
        let logit_scale = if l.learn_scale {
            head.var("logit_scale", &[], nn::Init::Const(init))
        } else {
            head.zeros_no_train("logit_scale", &[]).fill_(init)
        };
        let logit_bias =
            (spec.loss == LossKind::SigLip).then(|| head.var("logit_bias", &[], nn::Init::Const(l.init_bias)));
        set_kind(&mut vs, spec);
        Ok(Self { vs, backbone, image_proj, text, logit_scale, logit_bias, loss: spec.loss })
    }
}

impl Method for Clip {
    fn name(&self) -> &'static str {
        "clip"
    }

    fn var_store(&self) -> &VarStore {
        &self.vs
    }

    fn forward(&self, batch: &Batch, _comm: &dyn GlobalSum) -> Result<Towers> {
        let captions = batch.captions.ok_or_else(|| NnError::Param("CLIP needs captions".into()))?;
        let img = self.backbone.forward_t(&batch.views[0], true).apply(&self.image_proj);
        Ok(Towers { grad: vec![img, self.text.forward(captions)], ..Default::default() })
    }

    fn loss_share(&self, g: &Gathered, batch: &Batch, ctx: &Ctx) -> Result<Share> {
        if batch.mix.is_some() {
            return Err(NnError::Param(format!("loss {:?} takes no soft targets", self.loss)));
        }
        let (a, b) = (&g.towers[0], &g.towers[1]);
        let loss = match (&self.logit_bias, self.loss) {
            (Some(bias), LossKind::SigLip) => siglip_share(a, b, &self.logit_scale, bias, ctx.shard)?,
            (None, LossKind::Clip) => clip_share(a, b, &self.logit_scale, ctx.shard)?,
            (_, k) => return Err(NnError::Param(format!("loss {k:?} does not fit CLIP"))),
        };
        Ok(Share { loss, monitor: Some(a.shallow_clone()) })
    }

    fn after_step(&mut self, _info: &super::StepInfo, _comm: &dyn GlobalSum) -> Result<()> {
        tch::no_grad(|| {
            let _ = self.logit_scale.shallow_clone().clamp_(0.0, 100f64.ln());
        });
        Ok(())
    }

    fn backbone(&self) -> &dyn Encoder {
        self.backbone.as_ref()
    }

    fn encode_image(&self, images: &Tensor) -> Option<Tensor> {
        Some(self.backbone.forward_t(images, false).apply(&self.image_proj))
    }

    fn encode_text(&self, captions: &Captions) -> Option<Tensor> {
        Some(self.text.forward(captions))
    }

    fn status(&self) -> String {
        format!(" logit-scale {:.2}", self.logit_scale.exp().double_value(&[]))
    }

    fn logit_scale(&self) -> Option<f64> {
        Some(self.logit_scale.exp().double_value(&[]))
    }
}
