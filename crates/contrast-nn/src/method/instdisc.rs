//! Instance discrimination with a memory bank (Wu et al. 2018, the
//! `lemniscate.pytorch` reference): every training item is its own class. A
//! backbone and a linear layer map an image to a unit vector v; the bank holds
//! one unit vector m_j per item, **sharded over the ranks** by item
//! ([`Layout::ItemSharded`]: item j on rank j mod P), so a rank holds n/P rows.
//!
//! # The loss (NCE in `nce_share`'s convention)
//! - s_ij = v_i·m_j / τ. The positive of query i is the bank row of its own
//!   item; the negatives are `method.negatives` bank rows drawn uniformly with
//!   replacement, keyed on (seed, step), shared by the whole global batch.
//! - P(j | v) = exp(s) / Z; noise is uniform over the n items (p_n = 1/n), so
//!   h = P / (P + K·p_n) = σ(s − c) with c = log Z + log K − log n.
//! - ℓ_i = −log σ(s_i⁺ − c) − Σ_k log(1 − σ(s_ik − c)) + λ‖v_i − m_{item(i)}‖²
//!   (the proximal term, `method.proximal`), mean over the N queries.
//! - Z is fixed at the first step to n · mean exp(s) over every score of that
//!   step (positives and negatives), as the reference does, and saved.
//!
//! Every term belongs to one bank row, so the rank holding that row computes
//! it: rank r scores all N gathered queries against its own sampled negatives
//! and the positives of the items it holds. The shares add up to the loss
//! without moving bank rows; Z's first-step mean is an all-reduce of two sums.
//!
//! After the optimiser step each slot's owner writes m ← normalise(μ·m + (1−μ)·v)
//! from the step's gathered, detached features (`method.momentum`, 0.5 in the
//! reference). Queries use the first view only.

use super::{check_momentum, set_kind, settings, Batch, EpochCtx, Method, MethodEntry, Share, Spec, StepInfo};
use crate::encoder::{self, Encoder};
use crate::engine::{Gathered, Towers};
use crate::loss::{l2_normalize, Ctx, GlobalSum};
use crate::state::{item_indices, item_rows, Layout, StateItem};
use crate::{NnError, Result};
use contrast_config::{invalid, ConfigError, LossKind, MethodSpec, RunInfo, Settings};
use serde::{Deserialize, Serialize};
use std::cell::RefCell;
use std::collections::HashMap;
use tch::nn::{self, VarStore};
use tch::{Kind, Tensor};

/// InstDisc's `method.*` keys.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct InstDiscKeys {
    /// Bank rows drawn as noise per step, K (4096 in the paper).
    pub negatives: usize,
    /// Momentum μ of the bank update m ← normalise(μ·m + (1−μ)·v) (0.5 in the reference).
    pub momentum: f64,
    /// Weight λ of the proximal term λ‖v − m‖² (0: off; the paper's proximal runs use 30).
    pub proximal: f64,
    /// What the bank holds before the first step.
    pub bank_init: BankInit,
}

/// The bank's starting rows (`method.bank_init`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BankInit {
    /// One random unit vector per item, from (seed, item) alone (the reference's start).
    Random,
    /// The untrained network's own unit embedding of each item (the
    /// un-augmented image), from a feature pass before the first step.
    Features,
}

impl Default for InstDiscKeys {
    fn default() -> Self {
        Self { negatives: 4096, momentum: 0.5, proximal: 0.0, bank_init: BankInit::Random }
    }
}

/// Name of the bank in checkpoints (`[n, proj_dim]`, item order).
pub const BANK: &str = "method.bank";
/// Name of the NCE normaliser in checkpoints (`[1]` f64; 0 until the first step fixes it).
pub const NORMALISER: &str = "method.nce_z";
/// Stream tag of the negatives' draw and of the bank's starting rows.
const NEGATIVES: u64 = 0x496E_7374_4E65_6773;
const BANK_ROWS: u64 = 0x496E_7374_4261_6E6B;

/// InstDisc's configuration.
pub struct InstDiscSpec;

impl InstDiscSpec {
    fn keys(settings: &Settings) -> std::result::Result<InstDiscKeys, ConfigError> {
        settings.parse("method")
    }
}

/// Bytes of one rank's bank: ⌈n/P⌉ rows of `proj_dim` f32.
fn bank_bytes(items: usize, world_size: usize, proj_dim: usize) -> u64 {
    (items.div_ceil(world_size.max(1)) * proj_dim * 4) as u64
}

impl MethodSpec for InstDiscSpec {
    fn name(&self) -> &'static str {
        "instdisc"
    }

    fn defaults(&self) -> Settings {
        Settings::of(&InstDiscKeys::default())
    }

    fn own_loss(&self) -> LossKind {
        LossKind::BankNce
    }

    fn model_keys(&self) -> &'static [&'static str] {
        &["proj_dim"]
    }

    fn per_item(&self) -> bool {
        true
    }

    fn check(&self, settings: &Settings, run: &RunInfo) -> std::result::Result<(), ConfigError> {
        let k = Self::keys(settings)?;
        check_momentum(k.momentum)?;
        if k.negatives == 0 {
            return Err(invalid("method.negatives", "must be at least 1"));
        }
        contrast_config::within_ceiling("method.negatives", k.negatives as u64, 1 << 20, 4 * 8192, "the sampled rows")?;
        if !(k.proximal >= 0.0 && k.proximal.is_finite()) {
            return Err(invalid("method.proximal", format!("must be a finite λ ≥ 0, got {}", k.proximal)));
        }
        let Some(items) = run.items else { return Ok(()) };
        if items < 2 {
            return Err(invalid("data.root", format!("instdisc needs at least 2 training items, found {items}")));
        }
        let bytes = bank_bytes(items, run.world_size, run.proj_dim);
        if let Some(total) = contrast_config::host_memory_bytes().filter(|&t| bytes > t / 2) {
            return Err(invalid(
                "model.proj_dim",
                format!(
                    "the memory bank of {items} items × {} f32 needs {bytes} bytes ({:.1} GiB) on each of {} rank(s), \
                     over half of this machine's {:.1} GiB: lower model.proj_dim or use more ranks",
                    run.proj_dim,
                    bytes as f64 / (1u64 << 30) as f64,
                    run.world_size,
                    total as f64 / (1u64 << 30) as f64
                ),
            ));
        }
        Ok(())
    }

    fn describe(&self, settings: &Settings, run: &RunInfo) -> String {
        let k = Self::keys(settings).unwrap_or_default();
        let bank = match run.items {
            Some(n) => {
                let bytes = bank_bytes(n, run.world_size, run.proj_dim);
                format!(" bank={n}×{} ({:.1} MiB per rank)", run.proj_dim, bytes as f64 / (1u64 << 20) as f64)
            }
            None => String::new(),
        };
        format!(
            " method=InstDisc negatives={} momentum={} proximal={} bank_init={:?}{bank}",
            k.negatives, k.momentum, k.proximal, k.bank_init
        )
    }

    fn negatives_per_anchor(&self, settings: &Settings, _run: &RunInfo) -> Option<usize> {
        Self::keys(settings).ok().map(|k| k.negatives)
    }
}

/// The registration of InstDisc.
pub const ENTRY: MethodEntry =
    MethodEntry { spec: &InstDiscSpec, build: |vs, spec| Ok(Box::new(InstDisc::new(vs, spec)?)) };

/// Backbone, linear embedding and this rank's bank rows.
pub struct InstDisc {
    vs: VarStore,
    backbone: Box<dyn Encoder>,
    head: nn::Linear,
    keys: InstDiscKeys,
    temperature: f64,
    seed: u64,
    /// Items n and this rank's rows (item rank + j·P is row j); None without data (evaluation).
    bank: Option<(usize, Tensor)>,
    /// The normaliser Z (`[1]` f64, 0 until the first step).
    z: Tensor,
    rank: usize,
    world_size: usize,
    /// The step's gathered items and detached unit features, for the bank update.
    pending: RefCell<Option<(Vec<i64>, Tensor)>>,
}

impl InstDisc {
    /// Build into `vs` (`backbone.*`, `head.*`); the bank starts as one random
    /// unit vector per item, each drawn from (seed, item) alone.
    pub fn new(mut vs: VarStore, spec: &Spec) -> Result<Self> {
        let keys: InstDiscKeys = settings(spec)?;
        let root = vs.root();
        let backbone = encoder::build(&(&root / "backbone"), spec)?;
        let head = nn::linear(&root / "head" / "fc", backbone.out_dim(), spec.model.proj_dim, Default::default());
        set_kind(&mut vs, spec);
        let (rank, world_size, d) = (spec.shard.rank, spec.shard.world_size, spec.model.proj_dim as usize);
        let bank = spec.items.map(|n| {
            let rows: Vec<f64> = item_indices(n, rank, world_size)
                .flat_map(|i| crate::queue::unit_row(spec.seed, BANK_ROWS, i, d))
                .collect();
            let t = Tensor::from_slice(&rows).view([item_rows(n, rank, world_size) as i64, d as i64]);
            (n, t.to_kind(spec.kind).to_device(spec.device))
        });
        let z = Tensor::zeros([1], (Kind::Double, spec.device));
        let temperature = spec.temperature();
        crate::loss::check_temperature("InstDisc", temperature)?;
        Ok(Self {
            vs,
            backbone,
            head,
            keys,
            temperature,
            seed: spec.seed,
            bank,
            z,
            rank,
            world_size,
            pending: None.into(),
        })
    }

    fn bank(&self) -> Result<&(usize, Tensor)> {
        self.bank.as_ref().ok_or_else(|| {
            NnError::Param("InstDisc trains with a memory bank, built from the training set's item count".into())
        })
    }

    /// The negatives of `step`: K items drawn uniformly with replacement from (seed, step).
    pub fn negatives(seed: u64, step: usize, k: usize, items: usize) -> Vec<usize> {
        (0..k)
            .map(|j| (contrast_data::rng::key(&[seed, NEGATIVES, step as u64, j as u64]) % items as u64) as usize)
            .collect()
    }

    /// Local bank rows of the items this rank holds among `items` (and their positions in `items`).
    fn own(&self, items: &[i64]) -> (Vec<i64>, Vec<i64>) {
        let p = self.world_size as i64;
        items.iter().enumerate().filter(|(_, &j)| j % p == self.rank as i64).map(|(i, &j)| (i as i64, j / p)).unzip()
    }

    /// Z from the first step's scores (every rank's), written into the state.
    fn fix_normaliser(&self, scores: &[&Tensor], items: usize, reduce: &dyn GlobalSum) -> f64 {
        let mut sums = [0.0, 0.0];
        for s in scores {
            sums[0] += s.detach().to_kind(Kind::Double).exp().sum(Kind::Double).double_value(&[]);
            sums[1] += s.numel() as f64;
        }
        reduce.sum(&mut sums);
        let z = items as f64 * sums[0] / sums[1];
        let _ = tch::no_grad(|| self.z.shallow_clone().fill_(z));
        z
    }
}

impl Method for InstDisc {
    fn name(&self) -> &'static str {
        "instdisc"
    }

    fn var_store(&self) -> &VarStore {
        &self.vs
    }

    fn forward(&self, batch: &Batch, _comm: &dyn GlobalSum) -> Result<Towers> {
        let v = self.backbone.forward_t(&batch.views[0], true).apply(&self.head);
        Ok(Towers { grad: vec![v], ..Default::default() })
    }

    fn loss_share(&self, g: &Gathered, batch: &Batch, ctx: &Ctx) -> Result<Share> {
        let (n_items, bank) = self.bank()?;
        let shard = ctx.shard;
        if batch.indices.len() != shard.local_batch {
            return Err(NnError::Shape(format!(
                "InstDisc needs the item of each of the {} rows, got {}",
                shard.local_batch,
                batch.indices.len()
            )));
        }
        let local: Vec<i64> = batch.indices.iter().map(|&i| i as i64).collect();
        let items = crate::to_host::<i64>(&ctx.reduce.gather_rows(&Tensor::from_slice(&local).view([-1, 1])));
        if let Some(bad) = items.iter().find(|&&j| j < 0 || j as usize >= *n_items) {
            return Err(NnError::Shape(format!("InstDisc: item {bad} is outside the bank of {n_items} items")));
        }
        let v = l2_normalize(&g.towers[0]);
        let (n, t, device) = (shard.global() as f64, self.temperature, v.device());
        let bank = bank.to_kind(v.kind());
        // This rank's sampled negatives and the positives of the items it holds.
        let p = self.world_size;
        let negs: Vec<i64> = Self::negatives(self.seed, batch.step, self.keys.negatives, *n_items)
            .into_iter()
            .filter(|j| j % p == self.rank)
            .map(|j| (j / p) as i64)
            .collect();
        let neg = v.matmul(&bank.index_select(0, &Tensor::from_slice(&negs).to_device(device)).tr()) / t; // [N, K_r]
        let (rows, slots) = self.own(&items);
        let (rows, slots) = (Tensor::from_slice(&rows).to_device(device), Tensor::from_slice(&slots).to_device(device));
        let (vq, m) = (v.index_select(0, &rows), bank.index_select(0, &slots));
        let pos = (&vq * &m).sum_dim_intlist([1i64].as_slice(), false, v.kind()) / t; // [own positives]
        let mut z = self.z.double_value(&[0]);
        if z == 0.0 {
            z = self.fix_normaliser(&[&neg, &pos], *n_items, ctx.reduce);
        }
        let c = z.ln() + (self.keys.negatives as f64).ln() - (*n_items as f64).ln();
        let k = v.kind();
        let mut loss = ((-(&pos - c)).softplus().sum(k) + (&neg - c).softplus().sum(k)) / n;
        if self.keys.proximal > 0.0 {
            loss = loss + (&vq - &m).square().sum(k) * (self.keys.proximal / n);
        }
        *self.pending.borrow_mut() = Some((items, v.detach()));
        Ok(Share { loss, monitor: Some(g.towers[0].shallow_clone()) })
    }

    fn wants_features(&self, epoch: usize) -> bool {
        epoch == 0 && self.keys.bank_init == BankInit::Features
    }

    fn pass_features(&self, images: &Tensor) -> Tensor {
        self.backbone.forward_t(images, false).apply(&self.head)
    }

    /// With `bank_init: features`, the bank starts as the feature pass's rows
    /// (this rank's items, in the bank's own item-sharded order).
    fn on_epoch(&mut self, ctx: &mut EpochCtx) -> Result<()> {
        let (Some(rows), Some((_, bank))) = (ctx.features.take(), self.bank.as_mut()) else { return Ok(()) };
        if rows.size() != bank.size() {
            return Err(NnError::Shape(format!(
                "InstDisc: the feature pass gave {:?} rows for a bank shard of {:?}",
                rows.size(),
                bank.size()
            )));
        }
        tch::no_grad(|| bank.copy_(&rows));
        Ok(())
    }

    fn after_step(&mut self, _info: &StepInfo, _comm: &dyn GlobalSum) -> Result<()> {
        let Some((items, v)) = self.pending.borrow_mut().take() else { return Ok(()) };
        let (own_rows, own_slots) = self.own(&items);
        // A repeated item (a replaced unreadable sample) keeps its last row, as sequential writes would.
        let mut last: HashMap<i64, i64> = HashMap::new();
        for (&row, &slot) in own_rows.iter().zip(&own_slots) {
            last.insert(slot, row);
        }
        let mut pairs: Vec<(i64, i64)> = last.into_iter().collect();
        pairs.sort_unstable();
        let (slots, rows): (Vec<i64>, Vec<i64>) = pairs.into_iter().unzip();
        let Some((_, bank)) = self.bank.as_mut() else { return Ok(()) };
        let device = bank.device();
        let (slots, rows) = (Tensor::from_slice(&slots).to_device(device), Tensor::from_slice(&rows).to_device(device));
        let mu = self.keys.momentum;
        tch::no_grad(|| {
            let old = bank.index_select(0, &slots);
            let new = l2_normalize(&(old * mu + v.index_select(0, &rows).to_kind(bank.kind()) * (1.0 - mu)));
            let _ = bank.index_copy_(0, &slots, &new);
        });
        Ok(())
    }

    fn state(&self) -> Vec<StateItem> {
        let mut items = crate::state::var_store_items(&self.vs);
        if let Some((n, bank)) = &self.bank {
            let layout = Layout::ItemSharded { items: *n };
            items.push(StateItem { name: BANK.into(), tensor: bank.shallow_clone(), layout });
        }
        items.push(StateItem::replicated(NORMALISER, self.z.shallow_clone()));
        items
    }

    fn backbone(&self) -> &dyn Encoder {
        self.backbone.as_ref()
    }

    fn status(&self) -> String {
        format!(" nce-Z {:.4e}", self.z.double_value(&[0]))
    }
}
