//! SwAV (Caron et al. 2020, the `main_swav.py` reference): one backbone for
//! every crop, a projection head (Linear → BN → ReLU → Linear, on the
//! gathered features of all crops together, so its statistics are the global
//! batch's), and `method.prototypes` trained prototypes `[K, d]`, a
//! loss-head parameter. Codes come from the two large crops (views 0 and 1 of
//! `data.augment: swav`, or the two views of any two-view preset) by
//! distributed Sinkhorn-Knopp; every other crop predicts them
//! ([`crate::loss::swapped_prediction`], temperature `loss.temperature`).
//!
//! As in the reference:
//! - the prototypes are L2-normalised at the start and after every step, and
//!   scores are z·Wᵀ on the unit prototypes (no normalisation in the graph);
//! - they are left out of the optimiser (no update, decay or moment) for the
//!   first `method.freeze_prototypes_steps` steps;
//! - an optional queue (`method.queue_size` rows per assignment crop, sharded
//!   over the ranks like MoCo's) starts filling at `method.queue_start_step`
//!   and joins Sinkhorn's problem only once full; the queue rows' codes are
//!   dropped.

use super::{set_kind, settings, Batch, Method, MethodEntry, Share, Spec, StepInfo};
use crate::encoder::{self, Encoder};
use crate::engine::{Gathered, Towers};
use crate::head::BnMlp;
use crate::loss::{l2_normalize, swapped_prediction, Codes, Ctx, GlobalSum};
use crate::optim::Exclusions;
use crate::queue::ShardedQueue;
use crate::state::{Layout, StateItem};
use crate::{NnError, Result};
use contrast_config::{invalid, AugmentPreset, ConfigError, LossKind, MethodSpec, RunInfo, Settings};
use serde::{Deserialize, Serialize};
use std::cell::RefCell;
use std::collections::HashMap;
use tch::nn::{self, ModuleT, VarStore};
use tch::Tensor;

/// SwAV's `method.*` keys.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SwavKeys {
    /// Prototypes K (3000 in the reference for ImageNet).
    pub prototypes: usize,
    /// ε of Sinkhorn's exp(scores / ε).
    pub sinkhorn_epsilon: f64,
    /// Sinkhorn-Knopp iterations.
    pub sinkhorn_iters: usize,
    /// Steps during which the prototypes are left out of the optimiser (the reference's `freeze_prototypes_niters`).
    pub freeze_prototypes_steps: usize,
    /// Queue rows per assignment crop (0: no queue); a multiple of the global batch.
    pub queue_size: usize,
    /// The step from which the queue fills (it joins the codes once full).
    pub queue_start_step: usize,
}

impl Default for SwavKeys {
    fn default() -> Self {
        Self {
            prototypes: 3000,
            sinkhorn_epsilon: 0.05,
            sinkhorn_iters: 3,
            freeze_prototypes_steps: 313,
            queue_size: 0,
            queue_start_step: 0,
        }
    }
}

/// Names of the queue's state in checkpoints.
const QUEUES: [&str; 2] = ["method.queue0", "method.queue1"];
const QUEUE_PTR: &str = "method.queue_ptr";
const QUEUE_FILLED: &str = "method.queue_filled";
/// The prototypes' variable.
pub const PROTOTYPES: &str = "prototypes.weight";

/// SwAV's configuration.
pub struct SwavSpec;

impl SwavSpec {
    fn keys(settings: &Settings) -> std::result::Result<SwavKeys, ConfigError> {
        settings.parse("method")
    }
}

impl MethodSpec for SwavSpec {
    fn name(&self) -> &'static str {
        "swav"
    }

    fn defaults(&self) -> Settings {
        Settings::of(&SwavKeys::default())
    }

    fn own_loss(&self) -> LossKind {
        LossKind::Swav
    }

    /// Multi-crop (two large crops assign, every crop predicts) or any two-view preset.
    fn accepts_augment(&self, _preset: AugmentPreset, _loss: LossKind) -> bool {
        true
    }

    fn per_item(&self) -> bool {
        // Prototypes are checked against the item count.
        true
    }

    fn check(&self, settings: &Settings, run: &RunInfo) -> std::result::Result<(), ConfigError> {
        let k = Self::keys(settings)?;
        super::check_classes("method.prototypes", k.prototypes, "prototypes", run)?;
        if !(k.sinkhorn_epsilon >= 2e-3 && k.sinkhorn_epsilon.is_finite()) {
            return Err(invalid("method.sinkhorn_epsilon", format!("must be ≥ 0.002, got {}", k.sinkhorn_epsilon)));
        }
        if k.sinkhorn_iters == 0 {
            return Err(invalid("method.sinkhorn_iters", "must be at least 1"));
        }
        if k.queue_size % run.global_batch != 0 {
            return Err(invalid(
                "method.queue_size",
                format!("{} is not a multiple of the global batch {}", k.queue_size, run.global_batch),
            ));
        }
        contrast_config::within_ceiling("method.queue_size", k.queue_size as u64, 1 << 22, 8 * 8192, "the two queues")
    }

    fn describe(&self, settings: &Settings, run: &RunInfo) -> String {
        let k = Self::keys(settings).unwrap_or_default();
        let queue = match k.queue_size {
            0 => String::new(),
            q => format!(" queue_size={q} ({} per rank, from step {})", q / run.world_size.max(1), k.queue_start_step),
        };
        format!(
            " method=Swav prototypes={} sinkhorn_epsilon={} sinkhorn_iters={} freeze_prototypes_steps={}{queue}",
            k.prototypes, k.sinkhorn_epsilon, k.sinkhorn_iters, k.freeze_prototypes_steps
        )
    }

    fn queue_size(&self, settings: &Settings) -> usize {
        Self::keys(settings).map(|k| k.queue_size).unwrap_or(0)
    }
}

/// The registration of SwAV.
pub const ENTRY: MethodEntry = MethodEntry { spec: &SwavSpec, build: |vs, spec| Ok(Box::new(Swav::new(vs, spec)?)) };

/// The queues of the two assignment crops, their write pointer and fill.
struct Queues {
    queues: [ShardedQueue; 2],
    /// Blocks written so far (capped at the block count): full when it reaches it.
    filled: usize,
}

/// Backbone, projection head, prototypes and the optional queues.
pub struct Swav {
    vs: VarStore,
    backbone: Box<dyn Encoder>,
    head: BnMlp,
    prototypes: Tensor,
    keys: SwavKeys,
    temperature: f64,
    global_batch: usize,
    queues: Option<Queues>,
    /// This step's own rows of the two assignment crops' embeddings, for the queue.
    pending: RefCell<Option<[Tensor; 2]>>,
}

impl Swav {
    /// Build into `vs` (`backbone.*`, `head.*`, `prototypes.weight`).
    pub fn new(mut vs: VarStore, spec: &Spec) -> Result<Self> {
        let (m, root) = (&spec.model, vs.root());
        let keys: SwavKeys = settings(spec)?;
        let backbone = encoder::build(&(&root / "backbone"), spec)?;
        let head = BnMlp::new(&(&root / "head"), backbone.out_dim(), m.proj_hidden, m.proj_dim, false);
        let no_bias = nn::LinearConfig { bias: false, ..Default::default() };
        // `prototypes.weight` [K, d]: taken from the var store after the kind conversion.
        let _ = nn::linear(&root / "prototypes", m.proj_dim, keys.prototypes as i64, no_bias);
        set_kind(&mut vs, spec);
        let prototypes = vs.variables()[PROTOTYPES].shallow_clone();
        let (n, shard) = (spec.shard.global(), spec.shard);
        let queues = (keys.queue_size > 0)
            .then(|| -> Result<Queues> {
                let queue = |seed| {
                    ShardedQueue::initial(keys.queue_size, m.proj_dim as usize, seed, n, shard.rank, shard.world_size)
                        .map(|q| q.to(spec.kind, spec.device))
                };
                Ok(Queues { queues: [queue(spec.seed)?, queue(spec.seed + 1)?], filled: 0 })
            })
            .transpose()?;
        let swav = Self {
            vs,
            backbone,
            head,
            prototypes,
            keys,
            temperature: spec.temperature(),
            global_batch: n,
            queues,
            pending: None.into(),
        };
        swav.normalise_prototypes();
        Ok(swav)
    }

    fn normalise_prototypes(&self) {
        tch::no_grad(|| {
            let unit = l2_normalize(&self.prototypes);
            let _ = self.prototypes.shallow_clone().copy_(&unit);
        });
    }

    /// The queues' scores `[K/P, K]` per assignment crop, once full; else none.
    fn queue_scores(&self) -> Vec<Tensor> {
        match &self.queues {
            Some(q) if q.filled >= q.queues[0].blocks() => {
                tch::no_grad(|| q.queues.iter().map(|q| q.shard().matmul(&self.prototypes.tr())).collect())
            }
            _ => Vec::new(),
        }
    }
}

impl Method for Swav {
    fn name(&self) -> &'static str {
        "swav"
    }

    fn var_store(&self) -> &VarStore {
        &self.vs
    }

    fn forward(&self, batch: &Batch, _comm: &dyn GlobalSum) -> Result<Towers> {
        if batch.views.len() < 2 {
            return Err(NnError::Param(format!("SwAV takes at least two crops, got {}", batch.views.len())));
        }
        let grad = batch.views.iter().map(|v| self.backbone.forward_t(v, true)).collect();
        Ok(Towers { grad, ..Default::default() })
    }

    fn loss_share(&self, g: &Gathered, batch: &Batch, ctx: &Ctx) -> Result<Share> {
        if batch.mix.is_some() {
            return Err(NnError::Param("SwAV takes no soft targets".into()));
        }
        let (n, b, off) = (self.global_batch as i64, ctx.shard.local_batch as i64, ctx.shard.offset() as i64);
        // The head sees every crop of the global batch at once, as the reference's does.
        let z = l2_normalize(&self.head.forward_t(&Tensor::cat(g.towers, 0), true));
        let own: Vec<Tensor> = (0..g.towers.len() as i64).map(|v| z.narrow(0, v * n + off, b)).collect();
        let scores: Vec<Tensor> = own.iter().map(|z| z.matmul(&self.prototypes.tr())).collect();
        let queue = self.queue_scores();
        let columns = self.global_batch + queue.first().map_or(0, |_| self.keys.queue_size);
        let codes =
            Codes { epsilon: self.keys.sinkhorn_epsilon, iters: self.keys.sinkhorn_iters, queue: &queue, columns };
        let loss = swapped_prediction(&scores, &[0, 1], self.temperature, &codes, ctx)?;
        if self.queues.is_some() && batch.step >= self.keys.queue_start_step {
            *self.pending.borrow_mut() = Some([own[0].detach(), own[1].detach()]);
        }
        Ok(Share { loss, monitor: Some(z.narrow(0, 0, n)) })
    }

    fn before_optimizer_step(&mut self, info: &StepInfo, exclusions: &mut Exclusions) -> Result<()> {
        if info.done <= self.keys.freeze_prototypes_steps {
            exclusions.exclude(&[PROTOTYPES]).map_err(NnError::Param)
        } else {
            exclusions.include(&[PROTOTYPES]);
            Ok(())
        }
    }

    fn after_step(&mut self, _info: &StepInfo, _comm: &dyn GlobalSum) -> Result<()> {
        self.normalise_prototypes();
        if let (Some(q), Some(rows)) = (self.queues.as_mut(), self.pending.borrow_mut().take()) {
            for (queue, rows) in q.queues.iter_mut().zip(rows) {
                queue.enqueue(&rows)?;
            }
            q.filled = (q.filled + 1).min(q.queues[0].blocks());
        }
        Ok(())
    }

    fn state(&self) -> Vec<StateItem> {
        let mut items = crate::state::var_store_items(&self.vs);
        if let Some(q) = &self.queues {
            let rows = Layout::RowSharded { block: self.global_batch };
            for (name, queue) in QUEUES.iter().zip(&q.queues) {
                items.push(StateItem { name: name.to_string(), tensor: queue.shard().shallow_clone(), layout: rows });
            }
            let counters = [(QUEUE_PTR, q.queues[0].ptr()), (QUEUE_FILLED, q.filled)];
            for (name, v) in counters {
                items.push(StateItem::replicated(name, Tensor::from_slice(&[v as i64])));
            }
        }
        items
    }

    fn load_state(&mut self, canonical: &HashMap<String, Tensor>, rank: usize, world_size: usize) -> Result<()> {
        super::load_items(&crate::state::var_store_items(&self.vs), canonical, rank, world_size)?;
        let Some(q) = self.queues.as_mut() else { return Ok(()) };
        let get = |name: &str| canonical.get(name).ok_or_else(|| NnError::Param(format!("`{name}` is missing")));
        let ptr = get(QUEUE_PTR)?.int64_value(&[0]).max(0) as usize;
        q.filled = get(QUEUE_FILLED)?.int64_value(&[0]).max(0) as usize;
        for (name, queue) in QUEUES.iter().zip(q.queues.iter_mut()) {
            let t = get(name)?;
            let want = [(queue.blocks() * self.global_batch) as i64, queue.dim() as i64];
            if t.size() != want {
                return Err(NnError::Shape(format!("`{name}` has shape {:?}, expected {want:?}", t.size())));
            }
            let (kind, device) = (queue.shard().kind(), queue.shard().device());
            *queue = ShardedQueue::from_canonical(t, ptr, self.global_batch, rank, world_size)?.to(kind, device);
        }
        Ok(())
    }

    fn backbone(&self) -> &dyn Encoder {
        self.backbone.as_ref()
    }
}
