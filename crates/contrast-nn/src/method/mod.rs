//! Methods: what is trained around a loss, one file each.
//!
//! A [`Method`] builds its modules into one var store, runs the forward pass of
//! a local batch ([`Towers`]: outputs to gather and back-propagate, outputs to
//! gather without gradient, outputs kept local), returns this rank's loss share
//! on the gathered towers, and does its own work after each optimiser step
//! (EMA update, enqueue, logit-scale clamp) and each epoch. It declares its
//! parameter groups and its checkpoint state as named items with their layout
//! across ranks ([`crate::state`]). The training loop knows nothing else of it.
//!
//! - [`simclr::SimClr`]: backbone + projection MLP, every two-view and metric loss;
//! - [`clip::Clip`]: image and text towers, CLIP and SigLIP;
//! - [`moco::MocoV2`]: momentum key encoder and the sharded queue;
//! - [`byol::Byol`]: online network with predictor, EMA target;
//! - [`simsiam::SimSiam`]: shared encoder, predictor, stop-gradient.
//!
//! Heads with batch norm (BYOL's and SimSiam's projector and predictor) run on
//! the gathered backbone features, so their statistics are the global batch's
//! and P ranks × B equals 1 rank × P·B exactly; their parameters then get a
//! share of their gradient on every rank, like a loss-head parameter.

pub mod byol;
pub mod clip;
pub mod moco;
pub mod simclr;
pub mod simsiam;

use crate::engine::{Gathered, Towers};
use crate::loss::{Ctx, GlobalSum, Mix, Shard};
use crate::model::Captions;
use crate::optim::{named_params, Param};
use crate::state::{var_store_items, StateItem};
use crate::{NnError, Result};
use contrast_config::{LossConfig, LossKind, MethodName, MethodPlan, ModelConfig, Norm};
use std::collections::HashMap;
use tch::nn::VarStore;
use tch::{Device, Kind, Tensor};

/// One rank's batch, as tensors.
pub struct Batch<'a> {
    /// Global step (0-based): keys the method's own randomness (shuffle-BN's permutation).
    pub step: usize,
    /// Image views `[B, C, H, W]` (sizes may differ between views: multi-crop).
    pub views: &'a [Tensor],
    /// Captions (image–text methods).
    pub captions: Option<&'a Captions>,
    /// Class labels of the whole global batch `[N]` (supervised losses).
    pub labels: Option<&'a Tensor>,
    /// The mixing of the global batch (soft-target losses).
    pub mix: Option<&'a Mix>,
}

/// A loss share and what the collapse guard watches.
pub struct Share {
    /// This rank's share L_r.
    pub loss: Tensor,
    /// The gathered embeddings `[N, d]` whose spread the collapse guard logs.
    pub monitor: Option<Tensor>,
}

/// Where the run stands when a step has finished.
pub struct StepInfo<'a> {
    /// Optimiser steps completed (this one included).
    pub done: usize,
    /// Steps of the whole run.
    pub total: usize,
    /// The learning rate this step used.
    pub lr: f64,
    /// The step's local outputs ([`Towers::local`]: MoCo's keys).
    pub local: &'a [Tensor],
}

/// What a method needs to build itself.
#[derive(Debug, Clone)]
pub struct Spec {
    /// The method and its settings.
    pub method: MethodPlan,
    /// The loss.
    pub loss: LossKind,
    /// `loss.*`.
    pub loss_cfg: LossConfig,
    /// `model.*`.
    pub model: ModelConfig,
    /// Image channels (1 for IDX, 3 for decoded files).
    pub in_channels: i64,
    /// Token ids of the text tower (image–text methods).
    pub text_vocab: i64,
    /// Master seed (MoCo's initial queue).
    pub seed: u64,
    /// Rows of this rank.
    pub shard: Shard,
    /// Float kind of the parameters (f32 for training, f64 in tests).
    pub kind: Kind,
    /// Device.
    pub device: Device,
}

impl Spec {
    /// A spec with the defaults of `model.*` and `loss.*` for one process.
    pub fn new(method: MethodPlan, loss: LossKind, global_batch: usize) -> Self {
        Self {
            method,
            loss,
            loss_cfg: LossConfig::default(),
            model: ModelConfig::default(),
            in_channels: 1,
            text_vocab: 258,
            seed: 0,
            shard: Shard::solo(global_batch),
            kind: Kind::Float,
            device: Device::Cpu,
        }
    }

    /// Encoder normalisation.
    pub fn norm(&self) -> Norm {
        self.model.norm
    }

    /// The loss temperature in force.
    pub fn temperature(&self) -> f64 {
        self.loss_cfg.temperature_for(self.loss)
    }
}

/// A training method (see the module doc).
pub trait Method {
    /// Which method this is.
    fn name(&self) -> MethodName;

    /// The var store that holds every module (trainable and momentum).
    fn var_store(&self) -> &VarStore;

    /// The forward pass of this rank's batch (training mode); `comm` for methods
    /// that exchange outputs before the loss (shuffle-BN's keys).
    fn forward(&self, batch: &Batch, comm: &dyn GlobalSum) -> Result<Towers>;

    /// This rank's share of the loss on the gathered towers.
    fn loss_share(&self, gathered: &Gathered, batch: &Batch, ctx: &Ctx) -> Result<Share>;

    /// After the optimiser step: EMA updates, enqueues, clamps.
    fn after_step(&mut self, _info: &StepInfo, _comm: &dyn GlobalSum) -> Result<()> {
        Ok(())
    }

    /// At the start of each epoch (k-means, bank refresh in later methods).
    fn on_epoch(&mut self, _epoch: usize) {}

    /// The trainable parameters with their groups (decay, LR factor, LARS), sorted by name.
    fn params(&self) -> Vec<Param> {
        named_params(self.var_store())
    }

    /// Checkpoint state: every variable of the var store, plus the method's own items.
    fn state(&self) -> Vec<StateItem> {
        var_store_items(self.var_store())
    }

    /// Restore from canonical tensors by name (what [`Method::state`] saved).
    fn load_state(&mut self, canonical: &HashMap<String, Tensor>, rank: usize, world_size: usize) -> Result<()> {
        load_items(&self.state(), canonical, rank, world_size)
    }

    /// What evaluation embeds: the backbone's features `[B, embed_dim]` (eval mode).
    fn features(&self, images: &Tensor) -> Tensor;

    /// Image embeddings in a shared image–text space (image–text methods).
    fn encode_image(&self, _images: &Tensor) -> Option<Tensor> {
        None
    }

    /// Text embeddings in a shared image–text space (image–text methods).
    fn encode_text(&self, _captions: &Captions) -> Option<Tensor> {
        None
    }

    /// Extra fields of the step log line (` logit-scale 14.20`).
    fn status(&self) -> String {
        String::new()
    }

    /// The learnt logit scale exp(s) of an image–text method (the metrics report it).
    fn logit_scale(&self) -> Option<f64> {
        None
    }
}

/// Load every item from `canonical`, checking names and shapes.
pub fn load_items(
    items: &[StateItem],
    canonical: &HashMap<String, Tensor>,
    rank: usize,
    world_size: usize,
) -> Result<()> {
    for item in items {
        let t = canonical.get(&item.name).ok_or_else(|| NnError::Param(format!("`{}` is missing", item.name)))?;
        let want = item.canonical_shape(world_size);
        if t.size() != want {
            return Err(NnError::Shape(format!("`{}` has shape {:?}, expected {want:?}", item.name, t.size())));
        }
        item.load(t, rank, world_size);
    }
    Ok(())
}

/// Build the method of `spec` (parameters in `spec.kind` on `spec.device`).
/// The caller seeds libtorch first when initial weights must be reproducible.
pub fn build(spec: &Spec) -> Result<Box<dyn Method>> {
    let vs = VarStore::new(spec.device);
    Ok(match spec.method.name {
        MethodName::Simclr => Box::new(simclr::SimClr::new(vs, spec)?),
        MethodName::Clip => Box::new(clip::Clip::new(vs, spec)?),
        MethodName::MocoV2 => Box::new(moco::MocoV2::new(vs, spec)?),
        MethodName::Byol => Box::new(byol::Byol::new(vs, spec)?),
        MethodName::Simsiam => Box::new(simsiam::SimSiam::new(vs, spec)?),
    })
}

/// Convert a var store whose modules are built to the spec's float kind.
pub(crate) fn set_kind(vs: &mut VarStore, spec: &Spec) {
    if spec.kind == Kind::Double {
        vs.double();
    }
}

/// Freeze every variable under `prefix` (momentum copies: no gradient reaches them)
/// and pair each with the trainable variable of the same name without the prefix.
pub(crate) fn momentum_pairs(vs: &VarStore, prefix: &str) -> Vec<(Tensor, Tensor)> {
    let vars = vs.variables();
    let mut names: Vec<&String> = vars.keys().filter(|n| n.starts_with(prefix)).collect();
    names.sort();
    names
        .into_iter()
        .filter_map(|name| {
            let target = vars[name].set_requires_grad(false);
            let online = &vars[&name[prefix.len()..]];
            // Running statistics have no online counterpart to follow: the target keeps its own.
            (!crate::state::is_running_stat(name)).then(|| (online.shallow_clone(), target))
        })
        .collect()
}

/// Embeddings `[N, d]` with their batch spread: the standard deviation over
/// rows of the L2-normalised rows, averaged over dimensions (1/√d when
/// healthy, 0 when collapsed).
pub fn embedding_std(z: &Tensor) -> f64 {
    let n = crate::loss::l2_normalize(&z.detach().to_kind(Kind::Double));
    if n.size()[0] < 2 {
        return f64::NAN;
    }
    n.std_dim([0i64].as_slice(), true, false).mean(Kind::Double).double_value(&[])
}
