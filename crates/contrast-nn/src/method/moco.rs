//! MoCo-v2 (Chen et al. 2020, the `moco/builder.py` reference): a query
//! encoder (backbone + 2-layer MLP head), a momentum key encoder that follows
//! it by EMA, and InfoNCE at temperature τ over each query's positive key and a
//! queue of K negatives — here **sharded over the ranks** ([`ShardedQueue`]):
//! rank r holds K/P keys and enqueues only its own.
//!
//! The key encoder runs in training mode on the second view and its output is
//! L2-normalised, as in the reference. With shuffle-BN (`model.norm: batch`)
//! rank r encodes the key views of a permuted slice of the global batch, the
//! permutation coming from (seed, step): the pipeline produces those rows'
//! key views itself (no images move), and one all-gather of the `[N, d]` keys
//! returns each key to the rank that owns its row; the queue keeps global row order. The reference updates the key encoder
//! at the start of each forward pass; updating it after each optimiser step is
//! the same sequence of weights (they first differ at step 0, where the
//! reference's update is a no-op since θ_k = θ_q).
//!
//! With `method.hard_negatives` > 0 it is MoCHi: synthetic hard negatives
//! mixed over the whole sharded queue join each query's denominator
//! ([`super::mochi`]).

use super::mochi::Mochi;
use super::{check_momentum, describe_momentum, momentum_pairs, set_kind, settings, Batch, Method, MethodEntry};
use super::{Share, Spec, StepInfo};
use crate::ema::Ema;
use crate::encoder::{self, Encoder};
use crate::engine::{Gathered, Towers};
use crate::head::Mlp;
use crate::loss::{l2_normalize, Ctx, GlobalSum};
use crate::queue::ShardedQueue;
use crate::state::{Layout, StateItem};
use crate::{NnError, Result};
use contrast_config::{invalid, ConfigError, LossKind, MethodSpec, MomentumSchedule, Norm, RunInfo, Settings};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use tch::nn::VarStore;
use tch::Tensor;

/// MoCo-v2's `method.*` keys.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MocoKeys {
    /// Queue size K (a multiple of the global batch); each rank keeps K/P keys.
    pub queue_size: usize,
    /// Momentum m of the EMA key encoder (0.99 suits short runs; the reference's 0.999 long ones).
    pub momentum: f64,
    /// `constant` m, or BYOL's `cosine` schedule from m to 1.
    pub momentum_schedule: MomentumSchedule,
    /// Shuffle the key encoder's batch across ranks (needs `model.norm: batch`).
    pub shuffle_bn: bool,
    /// MoCHi: hard negatives per query over the whole queue (0: plain MoCo-v2).
    pub hard_negatives: usize,
    /// MoCHi: synthetic negatives mixed from pairs of hard negatives.
    pub mix_negatives: usize,
    /// MoCHi: synthetic negatives mixed from the query and a hard negative.
    pub mix_query: usize,
}

impl MocoKeys {
    fn mochi(&self) -> Mochi {
        Mochi { hard: self.hard_negatives, mix_negatives: self.mix_negatives, mix_query: self.mix_query }
    }
}

impl Default for MocoKeys {
    fn default() -> Self {
        Self {
            queue_size: 4096,
            momentum: 0.99,
            momentum_schedule: MomentumSchedule::Constant,
            shuffle_bn: false,
            hard_negatives: 0,
            mix_negatives: 0,
            mix_query: 0,
        }
    }
}

/// MoCo-v2's configuration: its keys, InfoNCE, and the queue's fit to the global batch.
pub struct MocoSpec;

impl MocoSpec {
    fn keys(settings: &Settings) -> std::result::Result<MocoKeys, ConfigError> {
        settings.parse("method")
    }
}

impl MethodSpec for MocoSpec {
    fn name(&self) -> &'static str {
        "moco_v2"
    }

    fn defaults(&self) -> Settings {
        Settings::of(&MocoKeys::default())
    }

    fn own_loss(&self) -> LossKind {
        LossKind::InfoNce
    }

    fn check(&self, settings: &Settings, run: &RunInfo) -> std::result::Result<(), ConfigError> {
        let k = Self::keys(settings)?;
        check_momentum(k.momentum)?;
        let n = run.global_batch;
        if k.queue_size == 0 || k.queue_size % n != 0 {
            return Err(invalid(
                "method.queue_size",
                format!("{} is not a positive multiple of the global batch {n}", k.queue_size),
            ));
        }
        // The queue holds K keys of the projection's width (its rows are sharded, its sum is not).
        contrast_config::within_ceiling(
            "method.queue_size",
            k.queue_size as u64,
            1 << 24,
            4 * 8192,
            "the queue (K × proj_dim f32, at proj_dim 8192)",
        )?;
        check_mochi(&k)?;
        if k.shuffle_bn && run.norm != Norm::Batch {
            return Err(invalid(
                "method.shuffle_bn",
                format!("shuffles batch statistics, but model.norm is {:?}: set model.norm: batch", run.norm),
            ));
        }
        Ok(())
    }

    fn describe(&self, settings: &Settings, run: &RunInfo) -> String {
        let k = Self::keys(settings).unwrap_or_default();
        let mochi = k.mochi();
        let mochi = match mochi.on() {
            true => format!(
                " mochi: hard_negatives={} mix_negatives={} mix_query={} ({:.1} MiB all-reduced per step)",
                k.hard_negatives,
                k.mix_negatives,
                k.mix_query,
                mochi.bytes_per_step(run.global_batch, run.proj_dim) as f64 / (1u64 << 20) as f64
            ),
            false => String::new(),
        };
        format!(
            " method=MocoV2 queue_size={} queue_shard={}{} shuffle_bn={}{mochi}",
            k.queue_size,
            k.queue_size / run.world_size.max(1),
            describe_momentum(k.momentum, k.momentum_schedule),
            k.shuffle_bn
        )
    }

    fn negatives_per_anchor(&self, settings: &Settings, _run: &RunInfo) -> Option<usize> {
        Some(self.queue_size(settings))
    }

    fn queue_size(&self, settings: &Settings) -> usize {
        Self::keys(settings).map(|k| k.queue_size).unwrap_or(0)
    }

    /// Shuffle-BN: the pipeline makes the key views (view 1) of a permuted slice.
    fn shuffled_view(&self, settings: &Settings) -> Option<usize> {
        Self::keys(settings).is_ok_and(|k| k.shuffle_bn).then_some(1)
    }
}

/// MoCHi's counts: hard negatives within the queue; mixing needs hard negatives to mix.
fn check_mochi(k: &MocoKeys) -> std::result::Result<(), ConfigError> {
    if k.hard_negatives > k.queue_size {
        return Err(invalid(
            "method.hard_negatives",
            format!("{} hard negatives per query from a queue of {} keys", k.hard_negatives, k.queue_size),
        ));
    }
    for (key, v) in [("method.mix_negatives", k.mix_negatives), ("method.mix_query", k.mix_query)] {
        if v > 0 && k.hard_negatives == 0 {
            return Err(invalid(key, format!("{v} mixes need hard negatives to mix: set method.hard_negatives > 0")));
        }
        contrast_config::within_ceiling(key, v as u64, k.queue_size as u64, 8 * 8192, "the mixed keys per query")?;
    }
    Ok(())
}

/// The registration of MoCo-v2.
pub const ENTRY: MethodEntry = MethodEntry { spec: &MocoSpec, build: |vs, spec| Ok(Box::new(MocoV2::new(vs, spec)?)) };

/// Name of the queue in checkpoints (`[K, d]`, canonical layout).
pub const QUEUE: &str = "method.queue";
/// Name of the queue pointer in checkpoints (`[1]` int64: the oldest block).
pub const QUEUE_PTR: &str = "method.queue_ptr";

/// Query encoder, momentum key encoder and this rank's queue shard.
pub struct MocoV2 {
    vs: VarStore,
    backbone: Box<dyn Encoder>,
    head: Mlp,
    key_backbone: Box<dyn Encoder>,
    key_head: Mlp,
    ema: Ema,
    queue: ShardedQueue,
    temperature: f64,
    global_batch: usize,
    shard: crate::loss::Shard,
    shuffle_bn: bool,
    seed: u64,
    mochi: Mochi,
}

impl MocoV2 {
    /// Build into `vs` (`backbone.*`, `head.*` and their copies under `momentum.*`);
    /// the queue starts as K random unit vectors drawn from the seed.
    pub fn new(mut vs: VarStore, spec: &Spec) -> Result<Self> {
        let (m, root) = (&spec.model, vs.root());
        let keys: MocoKeys = settings(spec)?;
        let backbone = encoder::build(&(&root / "backbone"), spec)?;
        let head = Mlp::new(&(&root / "head"), backbone.out_dim(), m.proj_hidden, m.proj_dim);
        let key = &root / "momentum";
        let key_backbone = encoder::build(&(&key / "backbone"), spec)?;
        let key_head = Mlp::new(&(&key / "head"), backbone.out_dim(), m.proj_hidden, m.proj_dim);
        set_kind(&mut vs, spec);
        let ema = Ema::new(momentum_pairs(&vs, "momentum."), keys.momentum, keys.momentum_schedule);
        ema.copy_online();
        let (k, n, shard) = (keys.queue_size, spec.shard.global(), spec.shard);
        if k == 0 || k % n != 0 {
            return Err(NnError::Param(format!(
                "method.queue_size {k} is not a positive multiple of the global batch {n}"
            )));
        }
        let queue = ShardedQueue::initial(k, m.proj_dim as usize, spec.seed, n, shard.rank, shard.world_size)?
            .to(spec.kind, spec.device);
        let temperature = spec.temperature();
        Ok(Self {
            vs,
            backbone,
            head,
            key_backbone,
            key_head,
            ema,
            queue,
            temperature,
            global_batch: n,
            shard,
            shuffle_bn: keys.shuffle_bn,
            seed: spec.seed,
            mochi: keys.mochi(),
        })
    }

    /// This rank's queue shard.
    pub fn queue(&self) -> &ShardedQueue {
        &self.queue
    }

    /// Shuffle-BN: this rank encoded the key views of the global rows
    /// `order[r·B..(r+1)·B]` (the pipeline made them from (seed, step)); gather
    /// the keys and keep those of this rank's own rows.
    fn unshuffle(&self, k: &Tensor, step: usize, comm: &dyn GlobalSum) -> Tensor {
        let (n, shard) = (self.global_batch, self.shard);
        let all = comm.gather_rows(k);
        debug_assert_eq!(all.size()[0], n as i64);
        let order = contrast_data::Sampler::shuffle_order(self.seed, step, n);
        let mut position = vec![0i64; n];
        for (j, &g) in order.iter().enumerate() {
            position[g] = j as i64;
        }
        let own = &position[shard.offset()..shard.offset() + shard.local_batch];
        all.index_select(0, &Tensor::from_slice(own).to_device(k.device()))
    }
}

impl Method for MocoV2 {
    fn name(&self) -> &'static str {
        "moco_v2"
    }

    fn sync_momentum(&self) {
        self.ema.copy_online();
    }

    fn var_store(&self) -> &VarStore {
        &self.vs
    }

    fn forward(&self, batch: &Batch, comm: &dyn GlobalSum) -> Result<Towers> {
        if batch.views.len() < 2 {
            return Err(NnError::Param("MoCo needs two views (query and key)".into()));
        }
        let q = self.backbone.forward_t(&batch.views[0], true).apply(&self.head);
        let k =
            tch::no_grad(|| l2_normalize(&self.key_backbone.forward_t(&batch.views[1], true).apply(&self.key_head)));
        let k = if self.shuffle_bn { self.unshuffle(&k, batch.step, comm) } else { k };
        Ok(Towers { grad: vec![q], aux: vec![], local: vec![k] })
    }

    fn loss_share(&self, g: &Gathered, batch: &Batch, ctx: &Ctx) -> Result<Share> {
        if batch.mix.is_some() {
            return Err(NnError::Param("MoCo takes no soft targets".into()));
        }
        let t = self.temperature;
        let extra = match self.mochi.on() {
            true => Some(self.mochi.logits(&l2_normalize(&g.towers[0]), &self.queue, self.seed, batch.step, t, ctx)?),
            false => None,
        };
        let loss = self.queue.infonce_share_with(&g.towers[0], &g.local[0], t, extra.as_ref(), ctx)?;
        Ok(Share { loss, monitor: Some(g.towers[0].shallow_clone()) })
    }

    fn after_step(&mut self, info: &StepInfo, _comm: &dyn GlobalSum) -> Result<()> {
        self.ema.update(info.done, info.total);
        self.queue.enqueue(&info.local[0])
    }

    fn state(&self) -> Vec<StateItem> {
        let mut items = crate::state::var_store_items(&self.vs);
        let rows = crate::state::Layout::RowSharded { block: self.global_batch };
        items.push(StateItem { name: QUEUE.into(), tensor: self.queue.shard().shallow_clone(), layout: rows });
        let ptr = Tensor::from_slice(&[self.queue.ptr() as i64]);
        items.push(StateItem { name: QUEUE_PTR.into(), tensor: ptr, layout: Layout::Replicated });
        items
    }

    fn load_state(&mut self, canonical: &HashMap<String, Tensor>, rank: usize, world_size: usize) -> Result<()> {
        let items = crate::state::var_store_items(&self.vs);
        super::load_items(&items, canonical, rank, world_size)?;
        let missing = |n: &str| NnError::Param(format!("`{n}` is missing"));
        let queue = canonical.get(QUEUE).ok_or_else(|| missing(QUEUE))?;
        let ptr = canonical.get(QUEUE_PTR).ok_or_else(|| missing(QUEUE_PTR))?;
        let want = [(self.queue.blocks() * self.global_batch) as i64, self.queue.dim() as i64];
        if queue.size() != want || ptr.numel() != 1 {
            return Err(NnError::Shape(format!(
                "`{QUEUE}` {:?} / `{QUEUE_PTR}` {:?}: expected {want:?} (method.queue_size × model.proj_dim) and [1]",
                queue.size(),
                ptr.size()
            )));
        }
        let (kind, device) = (self.queue.shard().kind(), self.queue.shard().device());
        let ptr = ptr.int64_value(&[0]).max(0) as usize;
        self.queue = ShardedQueue::from_canonical(queue, ptr, self.global_batch, rank, world_size)?.to(kind, device);
        Ok(())
    }

    fn backbone(&self) -> &dyn Encoder {
        self.backbone.as_ref()
    }
}
