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

use super::{momentum_pairs, set_kind, Batch, Method, Share, Spec, StepInfo};
use crate::ema::Ema;
use crate::engine::{Gathered, Towers};
use crate::loss::{l2_normalize, Ctx, GlobalSum};
use crate::model::{ConvBackbone, Mlp};
use crate::queue::ShardedQueue;
use crate::state::{Layout, StateItem};
use crate::{NnError, Result};
use contrast_config::MethodName;
use std::collections::HashMap;
use tch::nn::VarStore;
use tch::Tensor;

/// Name of the queue in checkpoints (`[K, d]`, canonical layout).
pub const QUEUE: &str = "method.queue";
/// Name of the queue pointer in checkpoints (`[1]` int64: the oldest block).
pub const QUEUE_PTR: &str = "method.queue_ptr";

/// Query encoder, momentum key encoder and this rank's queue shard.
pub struct MocoV2 {
    vs: VarStore,
    backbone: ConvBackbone,
    head: Mlp,
    key_backbone: ConvBackbone,
    key_head: Mlp,
    ema: Ema,
    queue: ShardedQueue,
    temperature: f64,
    global_batch: usize,
    shard: crate::loss::Shard,
    shuffle_bn: bool,
    seed: u64,
}

impl MocoV2 {
    /// Build into `vs` (`backbone.*`, `head.*` and their copies under `momentum.*`);
    /// the queue starts as K random unit vectors drawn from the seed.
    pub fn new(mut vs: VarStore, spec: &Spec) -> Result<Self> {
        let (m, root) = (&spec.model, vs.root());
        let backbone = ConvBackbone::new(&(&root / "backbone"), spec.in_channels, m.width, m.embed_dim, m.norm);
        let head = Mlp::new(&(&root / "head"), m.embed_dim, m.proj_hidden, m.proj_dim);
        let key = &root / "momentum";
        let key_backbone = ConvBackbone::new(&(&key / "backbone"), spec.in_channels, m.width, m.embed_dim, m.norm);
        let key_head = Mlp::new(&(&key / "head"), m.embed_dim, m.proj_hidden, m.proj_dim);
        set_kind(&mut vs, spec);
        let ema = Ema::new(momentum_pairs(&vs, "momentum."), spec.method.momentum, spec.method.momentum_schedule);
        ema.copy_online();
        let (k, n, shard) = (spec.method.queue_size, spec.shard.global(), spec.shard);
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
            shuffle_bn: spec.method.shuffle_bn,
            seed: spec.seed,
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
        let d = k.size()[1];
        let all = match k.kind() {
            tch::Kind::Double => Tensor::from_slice(&comm.gather_f64(&crate::to_host::<f64>(k))),
            _ => Tensor::from_slice(&comm.gather_f32(&crate::to_host::<f32>(k))),
        };
        let all = all.view([n as i64, d]).to_device(k.device()).to_kind(k.kind());
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
    fn name(&self) -> MethodName {
        MethodName::MocoV2
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
        let loss = self.queue.infonce_share(&g.towers[0], &g.local[0], self.temperature, ctx)?;
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

    fn features(&self, images: &Tensor) -> Tensor {
        self.backbone.forward_t(images, false)
    }
}
