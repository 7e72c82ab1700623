//! Methods: what is trained around a loss, one file each. Each file holds the
//! method, its `method.*` keys with their defaults and checks (a
//! [`MethodSpec`]) and its [`MethodEntry`]; [`crate::registry`] lists the
//! entries, one line each.
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

pub mod barlow_twins;
pub mod byol;
pub mod clip;
pub mod cpc;
pub mod deepcluster;
pub mod instdisc;
pub mod mochi;
pub mod moco;
pub mod pba;
pub mod quick_thought;
pub mod simclr;
pub mod simcse;
pub mod simsiam;
pub mod swav;

use crate::encoder::text::Captions;
use crate::encoder::Encoder;
use crate::engine::{Gathered, Towers};
use crate::loss::{Ctx, GlobalSum, Mix, Shard};
use crate::optim::{named_params, Exclusions, Param};
use crate::state::{var_store_items, StateItem};
use crate::{NnError, Result};
use contrast_config::{invalid, ConfigError, LossConfig, LossKind, MethodPlan, MethodSpec, ModelConfig, Settings};
pub use contrast_data::Sampling;
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
    /// The global dataset index of each local row `[B]`: the item the row
    /// shows (a replaced unreadable sample carries its replacement's index).
    /// Empty where the caller has none (tests of methods that need none).
    pub indices: &'a [usize],
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

/// What a method sees when an epoch starts ([`Method::on_epoch`]).
pub struct EpochCtx<'a> {
    /// The epoch that starts (0-based).
    pub epoch: usize,
    /// This rank.
    pub rank: usize,
    /// Ranks of the run.
    pub world_size: usize,
    /// Global sums and gathers over the run's ranks.
    pub comm: &'a dyn GlobalSum,
    /// When the method asked for it ([`Method::wants_features`]): this rank's
    /// L2-normalised features ([`Method::pass_features`], eval mode) of the
    /// un-augmented training set, laid out as `Layout::ItemSharded` lays items
    /// out (row j is item rank + j·P; `[item_rows, D]`; an item that cannot be
    /// read is logged and seen as a blank image). No rank holds the whole set.
    pub features: Option<Tensor>,
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
    /// Side of the (large) square views the encoder sees (28 for IDX).
    pub image_size: i64,
    /// Token ids of the text tower (image–text methods).
    pub text_vocab: i64,
    /// Master seed (MoCo's initial queue).
    pub seed: u64,
    /// Items of the training set (per-item state: InstDisc's bank); None
    /// where no data was opened (evaluation of a checkpoint, tests).
    pub items: Option<usize>,
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
            image_size: 28,
            text_vocab: 258,
            seed: 0,
            items: None,
            shard: Shard::solo(global_batch),
            kind: Kind::Float,
            device: Device::Cpu,
        }
    }

    /// The loss temperature in force.
    pub fn temperature(&self) -> f64 {
        self.loss_cfg.temperature_for(self.loss)
    }
}

/// A training method (see the module doc).
pub trait Method {
    /// Which method this is (its `method.name`).
    fn name(&self) -> &'static str;

    /// The var store that holds every module (trainable and momentum).
    fn var_store(&self) -> &VarStore;

    /// The forward pass of this rank's batch (training mode); `comm` for methods
    /// that exchange outputs before the loss (shuffle-BN's keys).
    fn forward(&self, batch: &Batch, comm: &dyn GlobalSum) -> Result<Towers>;

    /// This rank's share of the loss on the gathered towers.
    fn loss_share(&self, gathered: &Gathered, batch: &Batch, ctx: &Ctx) -> Result<Share>;

    /// After weights were written from outside (a weight import): copy the
    /// online weights into the momentum or target copies, as at the start.
    fn sync_momentum(&self) {}

    /// After the optimiser step: EMA updates, enqueues, clamps.
    fn after_step(&mut self, _info: &StepInfo, _comm: &dyn GlobalSum) -> Result<()> {
        Ok(())
    }

    /// At the start of each epoch, before its first step (k-means, bank
    /// refresh). Every rank calls it at the same step, so it may run
    /// collectives. What it computes is checkpoint state: a resume in the
    /// middle of an epoch does not call it again.
    fn on_epoch(&mut self, _ctx: &mut EpochCtx) -> Result<()> {
        Ok(())
    }

    /// Whether the start of `epoch` needs a feature pass over the training set
    /// ([`EpochCtx::features`]; k-means of DeepCluster).
    fn wants_features(&self, _epoch: usize) -> bool {
        false
    }

    /// Whether the batches of `epoch` wait for its [`Method::on_epoch`]: the
    /// pipeline builds none of them (prefetch stops at the boundary) until it
    /// ran and [`Method::sampling`] was asked. By default, the epochs that ask
    /// for a feature pass; a method that samples gates the epochs it samples.
    fn gates_epoch(&self, epoch: usize) -> bool {
        self.wants_features(epoch)
    }

    /// How the current epoch draws its items (asked on gated epochs, after
    /// `on_epoch` and after a resume): per-item weights or pseudo-classes over
    /// the whole training set, equal on every rank, and a function of
    /// checkpoint state only, so a resume draws the same batches. None: the
    /// uniform permutation.
    fn sampling(&self, _comm: &dyn GlobalSum) -> Result<Option<Sampling>> {
        Ok(None)
    }

    /// After the gradients are summed and before the optimiser steps: the
    /// method may leave parameters out of this step's update (SwAV's frozen
    /// prototypes) through `exclusions`, which keeps what it sets until it
    /// changes it. An excluded parameter gets no decay, no moment and no update;
    /// zeroing its gradient would not do under decoupled weight decay.
    fn before_optimizer_step(&mut self, _info: &StepInfo, _exclusions: &mut Exclusions) -> Result<()> {
        Ok(())
    }

    /// Parameters whose optimiser state restarts whenever [`Method::on_epoch`]
    /// runs (DeepCluster's classifier, re-initialised each epoch): the trainer
    /// zeroes their moments and counts their steps afresh, as a new optimiser
    /// over them would.
    fn restarts(&self) -> Vec<String> {
        Vec::new()
    }

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

    /// The image encoder whose features evaluation embeds.
    fn backbone(&self) -> &dyn Encoder;

    /// What evaluation embeds: the backbone's features `[B, embed_dim]` (eval mode).
    fn features(&self, images: &Tensor) -> Tensor {
        self.backbone().forward_t(images, false)
    }

    /// What the feature pass of [`EpochCtx::features`] embeds (eval mode, before
    /// L2 normalisation): [`Method::features`] unless the method needs its own
    /// embedding (InstDisc fills its bank with its projected unit vectors).
    fn pass_features(&self, images: &Tensor) -> Tensor {
        self.features(images)
    }

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

/// A registered method: its config and its constructor.
#[derive(Clone, Copy)]
pub struct MethodEntry {
    /// Keys, defaults, losses and checks.
    pub spec: &'static dyn MethodSpec,
    /// Build the method into a fresh var store.
    pub build: fn(VarStore, &Spec) -> Result<Box<dyn Method>>,
}

/// Build the method of `spec` (parameters in `spec.kind` on `spec.device`).
/// The caller seeds libtorch first when initial weights must be reproducible.
pub fn build(spec: &Spec) -> Result<Box<dyn Method>> {
    let name = &spec.method.name;
    let entry = crate::registry::method_entry(name)
        .ok_or_else(|| NnError::Param(format!("method.name `{name}` is not a registered method")))?;
    let method = (entry.build)(VarStore::new(spec.device), spec)?;
    freeze(method.as_ref(), &spec.model.freeze);
    Ok(method)
}

/// `model.freeze`: the groups' variables of the online backbone get no
/// gradient, so no optimiser state, decay or update ([`Method::params`] leaves
/// them out); their batch norm stays in eval mode (the encoder's own flag).
fn freeze(method: &dyn Method, groups: &[String]) {
    let prefixes: Vec<String> =
        method.backbone().freeze_prefixes(groups).into_iter().map(|p| format!("backbone.{p}")).collect();
    for (name, var) in method.var_store().variables() {
        if prefixes.iter().any(|p| name.starts_with(p.as_str()) || name == p.trim_end_matches('.')) {
            let _ = var.set_requires_grad(false);
        }
    }
}

/// The registered method `name` with its default settings (tests and tools).
pub fn plan(name: &str) -> Result<MethodPlan> {
    let entry = crate::registry::method_entry(name)
        .ok_or_else(|| NnError::Param(format!("method.name `{name}` is not a registered method")))?;
    Ok(MethodPlan::new(entry.spec, &Settings::default()))
}

/// A method's typed settings from its plan; a bad value is an error naming the key.
pub(crate) fn settings<T: serde::de::DeserializeOwned>(spec: &Spec) -> Result<T> {
    spec.method.parse().map_err(|e| NnError::Param(e.to_string()))
}

/// The check of a count of classes over the training items (SwAV's
/// prototypes, DeepCluster's clusters): at least 2, within the size ceiling,
/// and at most one per item once the items are known.
pub(crate) fn check_classes(
    key: &str,
    count: usize,
    noun: &str,
    run: &contrast_config::RunInfo,
) -> std::result::Result<(), ConfigError> {
    if count < 2 {
        return Err(invalid(key, format!("must be at least 2, got {count}")));
    }
    contrast_config::within_ceiling(key, count as u64, 1 << 20, 4 * 8192, &format!("the {noun}"))?;
    if let Some(items) = run.items.filter(|&n| count > n) {
        return Err(invalid(key, format!("{count} {noun} for {items} training items: at most one per item")));
    }
    Ok(())
}

/// The check of an EMA momentum m (MoCo, BYOL): 0 ≤ m < 1.
pub(crate) fn check_momentum(m: f64) -> std::result::Result<(), ConfigError> {
    if !(0.0..1.0).contains(&m) {
        return Err(invalid("method.momentum", format!("must lie in [0, 1), got {m}")));
    }
    Ok(())
}

/// The check of a predictor's hidden width (BYOL, SimSiam: required) and of
/// the batch its batch-norm heads need.
pub(crate) fn check_predictor(
    method: &str,
    hidden: Option<i64>,
    run: &contrast_config::RunInfo,
) -> std::result::Result<(), ConfigError> {
    match hidden {
        Some(h) if h > 0 => {}
        other => {
            return Err(invalid(
                "method.predictor_hidden",
                format!("{method} needs the predictor's hidden width (a positive integer), got {other:?}"),
            ))
        }
    }
    if run.global_batch < 2 {
        return Err(invalid("train.global_batch", format!("{method}'s batch-norm heads need at least 2 samples")));
    }
    Ok(())
}

/// The plan line's momentum part (` momentum=0.99 (Constant)`).
pub(crate) fn describe_momentum(m: f64, schedule: contrast_config::MomentumSchedule) -> String {
    format!(" momentum={m} ({schedule:?})")
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
