//! DeepCluster (Caron et al. 2018, the `facebookresearch/deepcluster`
//! reference): at the start of every epoch, k-means over the features of the
//! whole training set gives each item a pseudo-label; the epoch then trains
//! the network to classify its items into their clusters with cross-entropy,
//! drawing them uniformly over the pseudo-classes.
//!
//! - The network: backbone → `head` (Linear to `model.proj_dim`, ReLU: the
//!   reference's `classifier`) → `top` (Linear to `method.clusters`: its
//!   `top_layer`). The feature pass embeds the head's output, L2-normalised.
//! - k-means ([`crate::kmeans`]) runs on the ranks' own rows of that pass
//!   (item-sharded) with `method.kmeans_iters` iterations, started from
//!   (seed, epoch); only the f64 sums and counts cross the ranks.
//! - The pseudo-labels are `Layout::ItemSharded` state; the epoch's sampling is
//!   [`Sampling::Balanced`] over them (the reference's `UnifLabelSampler`).
//! - Each epoch re-initialises `top` (weights N(0, 0.01²) drawn from
//!   (seed, epoch), bias 0, as the reference does) and restarts its optimiser
//!   state ([`Method::restarts`]): the reference builds a new optimiser for it.
//! - The loss: cross-entropy of every view's logits against its item's
//!   pseudo-label, mean over the views' rows of the global batch.
//!
//! With `method.pca_dim` the features are PCA-whitened to that many dimensions
//! ([`crate::whiten`], statistics summed over the ranks in f64) and
//! L2-normalised again before k-means, as the reference does (to 256).
//!
//! Where this differs from the reference: no Sobel filter (the images here are
//! grayscale already), and no PCA unless `method.pca_dim` asks for it.

use super::{set_kind, settings, Batch, EpochCtx, Method, MethodEntry, Sampling, Share, Spec};
use crate::encoder::{self, Encoder};
use crate::engine::{Gathered, Towers};
use crate::kmeans::{kmeans, Sharding};
use crate::loss::{Ctx, GlobalSum};
use crate::state::{item_indices, item_rows, Layout, StateItem};
use crate::{NnError, Result};
use contrast_config::{invalid, AugmentPreset, ConfigError, LossKind, MethodSpec, RunInfo, Settings};
use rand_chacha::rand_core::SeedableRng;
use rand_distr::{Distribution, StandardNormal};
use serde::{Deserialize, Serialize};
use std::cell::RefCell;
use std::sync::Arc;
use tch::nn::{self, Module, VarStore};
use tch::{Kind, Tensor};

/// DeepCluster's `method.*` keys.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DeepClusterKeys {
    /// Clusters k of each epoch's k-means (10000 in the reference for ImageNet).
    pub clusters: usize,
    /// Lloyd iterations of each k-means (the reference's faiss `niter`, 20).
    pub kmeans_iters: usize,
    /// PCA-whitening of the features to this many dimensions before their L2
    /// normalisation and k-means (the reference's 256; 0: none).
    pub pca_dim: usize,
}

impl DeepClusterKeys {
    /// The width of what k-means clusters: `pca_dim`, or the head's `proj_dim`.
    fn cluster_dim(&self, proj_dim: i64) -> i64 {
        if self.pca_dim > 0 {
            self.pca_dim as i64
        } else {
            proj_dim
        }
    }
}

impl Default for DeepClusterKeys {
    fn default() -> Self {
        Self { clusters: 10000, kmeans_iters: 20, pca_dim: 0 }
    }
}

/// Name of the pseudo-labels in checkpoints (`[n]` i64, item order).
pub const LABELS: &str = "method.pseudo_labels";
/// Name of the last k-means's centroids in checkpoints (`[k, pca_dim or proj_dim]` f64).
pub const CENTROIDS: &str = "method.centroids";
/// The classifier's parameters, re-initialised each epoch.
pub const TOP: [&str; 2] = ["top.bias", "top.weight"];
/// Stream tags of k-means and of the classifier's weights.
const KMEANS: u64 = 0x4465_6570_436C_3031;
const TOP_INIT: u64 = 0x4465_6570_436C_3032;

/// DeepCluster's configuration.
pub struct DeepClusterSpec;

impl DeepClusterSpec {
    fn keys(settings: &Settings) -> std::result::Result<DeepClusterKeys, ConfigError> {
        settings.parse("method")
    }
}

impl MethodSpec for DeepClusterSpec {
    fn name(&self) -> &'static str {
        "deepcluster"
    }

    fn defaults(&self) -> Settings {
        Settings::of(&DeepClusterKeys::default())
    }

    fn own_loss(&self) -> LossKind {
        LossKind::CrossEntropy
    }

    /// One view is a sample; two-view presets give two samples of one item.
    fn accepts_augment(&self, _preset: AugmentPreset, _loss: LossKind) -> bool {
        true
    }

    fn model_keys(&self) -> &'static [&'static str] {
        &["proj_dim"]
    }

    fn per_item(&self) -> bool {
        true
    }

    fn check(&self, settings: &Settings, run: &RunInfo) -> std::result::Result<(), ConfigError> {
        let k = Self::keys(settings)?;
        super::check_classes("method.clusters", k.clusters, "clusters", run)?;
        if k.kmeans_iters == 0 {
            return Err(invalid("method.kmeans_iters", "must be at least 1"));
        }
        if k.pca_dim > run.proj_dim {
            return Err(invalid(
                "method.pca_dim",
                format!("{} is above the features' width model.proj_dim = {}", k.pca_dim, run.proj_dim),
            ));
        }
        Ok(())
    }

    fn describe(&self, settings: &Settings, _run: &RunInfo) -> String {
        let k = Self::keys(settings).unwrap_or_default();
        format!(" method=DeepCluster clusters={} kmeans_iters={} pca_dim={}", k.clusters, k.kmeans_iters, k.pca_dim)
    }

    fn negatives_per_anchor(&self, settings: &Settings, _run: &RunInfo) -> Option<usize> {
        Self::keys(settings).ok().map(|k| k.clusters - 1)
    }
}

/// The registration of DeepCluster.
pub const ENTRY: MethodEntry =
    MethodEntry { spec: &DeepClusterSpec, build: |vs, spec| Ok(Box::new(DeepCluster::new(vs, spec)?)) };

/// This rank's pseudo-labels and the centroids (with data only).
struct Clustering {
    items: usize,
    /// `[item_rows]` i64: the cluster of items rank, rank + P, …
    labels: Tensor,
    /// `[k, proj_dim]` f64.
    centroids: Tensor,
}

/// Backbone, head, classifier and the clustering state.
pub struct DeepCluster {
    vs: VarStore,
    backbone: Box<dyn Encoder>,
    head: nn::Linear,
    top: nn::Linear,
    keys: DeepClusterKeys,
    seed: u64,
    rank: usize,
    world_size: usize,
    clustering: Option<Clustering>,
    /// Every item's pseudo-label, gathered from the shards when first needed after they change.
    all_labels: RefCell<Option<Arc<Vec<u32>>>>,
    /// The last k-means: mean squared distance, splits, largest cluster.
    last: Option<(f64, usize, f64)>,
}

impl DeepCluster {
    /// Build into `vs` (`backbone.*`, `head.*`, `top.*`).
    pub fn new(mut vs: VarStore, spec: &Spec) -> Result<Self> {
        let keys: DeepClusterKeys = settings(spec)?;
        let root = vs.root();
        let backbone = encoder::build(&(&root / "backbone"), spec)?;
        let d = spec.model.proj_dim;
        let head = nn::linear(&root / "head", backbone.out_dim(), d, Default::default());
        let top = nn::linear(&root / "top", d, keys.clusters as i64, Default::default());
        set_kind(&mut vs, spec);
        let (rank, world_size) = (spec.shard.rank, spec.shard.world_size);
        let clustering = spec.items.map(|n| Clustering {
            items: n,
            labels: Tensor::zeros([item_rows(n, rank, world_size) as i64], (Kind::Int64, spec.device)),
            centroids: Tensor::zeros([keys.clusters as i64, keys.cluster_dim(d)], (Kind::Double, spec.device)),
        });
        let seed = spec.seed;
        let all_labels = None.into();
        Ok(Self { vs, backbone, head, top, keys, seed, rank, world_size, clustering, all_labels, last: None })
    }

    fn clustering(&self) -> Result<&Clustering> {
        self.clustering.as_ref().ok_or_else(|| {
            NnError::Param("DeepCluster trains on pseudo-labels, built from the training set's item count".into())
        })
    }

    /// The head's features (the input of the classifier).
    fn head_features(&self, images: &Tensor, train: bool) -> Tensor {
        self.backbone.forward_t(images, train).apply(&self.head).relu()
    }

    /// Every item's pseudo-label: each rank adds its own items' labels into a
    /// zero vector of n entries, summed over the ranks (exact in f64).
    fn gather_labels(&self, comm: &dyn GlobalSum) -> Result<Arc<Vec<u32>>> {
        if let Some(all) = self.all_labels.borrow().as_ref() {
            return Ok(all.clone());
        }
        let c = self.clustering()?;
        let mut all = vec![0.0; c.items];
        let own: Vec<i64> = crate::to_host(&c.labels);
        for (item, label) in item_indices(c.items, self.rank, self.world_size).zip(own) {
            all[item] = label as f64;
        }
        comm.sum(&mut all);
        let all = Arc::new(all.into_iter().map(|l| l as u32).collect::<Vec<u32>>());
        *self.all_labels.borrow_mut() = Some(all.clone());
        Ok(all)
    }

    /// The classifier's weights for `epoch`: N(0, 0.01²) from (seed, epoch), bias 0.
    fn reset_top(&self, epoch: usize) {
        let w = &self.top.ws;
        let mut rng =
            rand_chacha::ChaCha8Rng::seed_from_u64(contrast_data::rng::key(&[self.seed, TOP_INIT, epoch as u64]));
        let v: Vec<f64> = (0..w.numel())
            .map(|_| {
                let z: f64 = StandardNormal.sample(&mut rng);
                0.01 * z
            })
            .collect();
        let fresh = Tensor::from_slice(&v).view(w.size().as_slice()).to_kind(w.kind()).to_device(w.device());
        tch::no_grad(|| {
            w.shallow_clone().copy_(&fresh);
            if let Some(b) = &self.top.bs {
                let _ = b.shallow_clone().zero_();
            }
        });
    }
}

impl Method for DeepCluster {
    fn name(&self) -> &'static str {
        "deepcluster"
    }

    fn var_store(&self) -> &VarStore {
        &self.vs
    }

    fn forward(&self, batch: &Batch, _comm: &dyn GlobalSum) -> Result<Towers> {
        let grad = batch.views.iter().map(|v| self.top.forward(&self.head_features(v, true))).collect();
        Ok(Towers { grad, ..Default::default() })
    }

    fn loss_share(&self, g: &Gathered, batch: &Batch, ctx: &Ctx) -> Result<Share> {
        let shard = ctx.shard;
        if batch.indices.len() != shard.local_batch {
            return Err(NnError::Shape(format!(
                "DeepCluster needs the item of each of the {} rows, got {}",
                shard.local_batch,
                batch.indices.len()
            )));
        }
        let all = self.gather_labels(ctx.reduce)?;
        let labels =
            batch.indices.iter().map(|&i| all.get(i).map(|&l| l as i64)).collect::<Option<Vec<i64>>>().ok_or_else(
                || NnError::Shape(format!("DeepCluster: an item is outside the {} pseudo-labels", all.len())),
            )?;
        let (first, b) = (shard.offset() as i64, shard.local_batch as i64);
        let target = Tensor::from_slice(&labels).to_device(g.towers[0].device());
        let rows = (g.towers.len() * shard.global()) as f64;
        let mut loss = Tensor::zeros([], (g.towers[0].kind(), g.towers[0].device()));
        for logits in g.towers {
            let own = logits.narrow(0, first, b);
            loss = loss + own.log_softmax(1, own.kind()).gather(1, &target.unsqueeze(1), false).sum(own.kind()).neg();
        }
        Ok(Share { loss: loss / rows, monitor: Some(g.towers[0].shallow_clone()) })
    }

    fn wants_features(&self, _epoch: usize) -> bool {
        self.clustering.is_some()
    }

    fn pass_features(&self, images: &Tensor) -> Tensor {
        self.head_features(images, false)
    }

    /// k-means on the feature pass: new pseudo-labels and centroids, and a fresh classifier.
    fn on_epoch(&mut self, ctx: &mut EpochCtx) -> Result<()> {
        let mut features =
            ctx.features.take().ok_or_else(|| NnError::Param("DeepCluster needs the feature pass".into()))?;
        if self.keys.pca_dim > 0 {
            let w = crate::whiten::Whitening::fit(&features, ctx.comm, Some(self.keys.pca_dim))?;
            features = crate::loss::l2_normalize(&w.apply(&features.to_kind(Kind::Double)));
        }
        let c = self.clustering.as_ref().ok_or_else(|| NnError::Param("DeepCluster needs the training set".into()))?;
        let shard = Sharding { items: c.items, rank: ctx.rank, world_size: ctx.world_size };
        let key = contrast_data::rng::key(&[self.seed, KMEANS, ctx.epoch as u64]);
        let found = kmeans(&features, shard, self.keys.clusters, self.keys.kmeans_iters, key, ctx.comm)?;
        if found.centroids.size() != c.centroids.size() || found.labels.size() != c.labels.size() {
            return Err(NnError::Shape(format!(
                "DeepCluster: k-means gave centroids {:?} and labels {:?} for state of {:?} and {:?}",
                found.centroids.size(),
                found.labels.size(),
                c.centroids.size(),
                c.labels.size()
            )));
        }
        tch::no_grad(|| {
            c.labels.shallow_clone().copy_(&found.labels);
            c.centroids.shallow_clone().copy_(&found.centroids);
        });
        let largest = found.counts.iter().copied().fold(0.0, f64::max);
        self.last = Some((found.inertia, found.splits, largest));
        *self.all_labels.borrow_mut() = None;
        self.reset_top(ctx.epoch);
        Ok(())
    }

    fn sampling(&self, comm: &dyn GlobalSum) -> Result<Option<Sampling>> {
        Ok(Some(Sampling::Balanced(self.gather_labels(comm)?)))
    }

    fn restarts(&self) -> Vec<String> {
        TOP.iter().map(|s| s.to_string()).collect()
    }

    fn state(&self) -> Vec<StateItem> {
        let mut items = crate::state::var_store_items(&self.vs);
        if let Some(c) = &self.clustering {
            let layout = Layout::ItemSharded { items: c.items };
            items.push(StateItem { name: LABELS.into(), tensor: c.labels.shallow_clone(), layout });
            items.push(StateItem::replicated(CENTROIDS, c.centroids.shallow_clone()));
        }
        items
    }

    fn load_state(
        &mut self,
        canonical: &std::collections::HashMap<String, Tensor>,
        rank: usize,
        world_size: usize,
    ) -> Result<()> {
        super::load_items(&self.state(), canonical, rank, world_size)?;
        if let Some(c) = &self.clustering {
            let k = self.keys.clusters as i64;
            let (lo, hi) = (c.labels.min().int64_value(&[]), c.labels.max().int64_value(&[]));
            if c.labels.numel() > 0 && (lo < 0 || hi >= k) {
                return Err(NnError::Shape(format!(
                    "`{LABELS}` holds label {} outside 0..{k}",
                    if lo < 0 { lo } else { hi }
                )));
            }
        }
        *self.all_labels.borrow_mut() = None;
        Ok(())
    }

    fn backbone(&self) -> &dyn Encoder {
        self.backbone.as_ref()
    }

    fn status(&self) -> String {
        match self.last {
            Some((inertia, splits, largest)) => {
                format!(" kmeans-mse {inertia:.4} splits {splits} largest {largest:.0}")
            }
            None => String::new(),
        }
    }
}
