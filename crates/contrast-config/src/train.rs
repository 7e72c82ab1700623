//! `train.*`: batch, steps, device, threads, the optimiser and the schedule.

use crate::applies::Rules;
use crate::{invalid, Config, ConfigError, LossKind, MethodSpec, Norm, Topology};
use serde::{Deserialize, Serialize};

/// `train.*`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainConfig {
    /// Samples per optimiser step over all ranks (N = P·B).
    pub global_batch: i64,
    /// Optimiser steps of the whole run (or give `epochs`; a file may give only one).
    pub steps: i64,
    /// Passes over the training set instead of `steps`: each is ⌊len / global_batch⌋
    /// steps (the last partial batch is dropped); resolved to `steps` once the data is open.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub epochs: Option<f64>,
    /// `cpu`, `cuda`, `cuda:K` or `auto` (CUDA if present; device = local rank mod GPUs).
    pub device: String,
    /// Compute precision of the encoders: `fp32`, or `bf16` (libtorch's autocast:
    /// matrix products and convolutions in bf16, weights, gradients, normalisations
    /// and the loss head in fp32), on the CPU and on CUDA.
    pub precision: Precision,
    /// libtorch intra-op threads per rank (0 = cores ÷ ranks on this host).
    pub threads: usize,
    /// Continue from `checkpoint.dir/latest` when it exists.
    pub resume: bool,
    /// Clip the global gradient norm to this value (0 = off).
    pub grad_clip: f64,
    /// Print and log a line every this many steps.
    pub log_every: i64,
    /// Collapse guard: warn when the batch standard deviation of the L2-normalised embeddings,
    /// times √d (1 when healthy, 0 when collapsed), stays below this for 20 steps (0 = off).
    pub collapse_threshold: f64,
    /// The gradient cache: rows per chunk of each rank's forward and backward
    /// (0 = off). The step runs the model over the local batch in chunks without
    /// a graph, computes the loss's gradient for the whole global batch, then runs
    /// each chunk again with a graph; memory holds one chunk's activations, the
    /// cost is one more forward pass. Exact; not with `model.norm: batch`.
    pub micro_batch: usize,
    /// Sum the gradient buckets over ranks while backward still runs (as DDP
    /// does), or after it; the sums are the same. `auto`: only when the job
    /// spans hosts (see [`Overlap`]).
    pub overlap: Overlap,
    /// Watchdog: seconds any phase (start-up, the wait for a batch, a step, an
    /// evaluation, a checkpoint write) may last before the job is aborted with
    /// exit status 124; 0 = off.
    pub timeout_s: f64,
    /// Optimiser.
    pub optimizer: OptimizerConfig,
    /// Learning-rate schedule.
    pub schedule: ScheduleConfig,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            global_batch: 256,
            steps: 1000,
            epochs: None,
            device: "cpu".into(),
            precision: Precision::Fp32,
            threads: 0,
            resume: false,
            grad_clip: 0.0,
            log_every: 20,
            collapse_threshold: 0.2,
            micro_batch: 0,
            overlap: Overlap::Auto,
            timeout_s: 1800.0,
            optimizer: OptimizerConfig::default(),
            schedule: ScheduleConfig::default(),
        }
    }
}

/// `train.optimizer.*`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OptimizerConfig {
    /// `sgd` (with momentum) or `adamw`.
    pub name: OptimizerName,
    /// Wrap the optimiser in LARS (layer-wise trust ratio; biases and norm weights excluded, as in BYOL/SimCLR).
    pub lars: bool,
    /// LARS trust coefficient η.
    pub trust_coefficient: f64,
    /// Peak learning rate; see `lr_scale`.
    pub lr: f64,
    /// `absolute` (lr as given) or `per_256` (lr × global_batch / 256, the linear scaling rule).
    pub lr_scale: LrScale,
    /// SGD momentum.
    pub momentum: f64,
    /// SGD: use Nesterov momentum.
    pub nesterov: bool,
    /// Decoupled weight decay; never applied to biases, norm weights or the logit scale.
    pub weight_decay: f64,
    /// AdamW betas.
    pub betas: [f64; 2],
    /// AdamW epsilon.
    pub eps: f64,
}

impl Default for OptimizerConfig {
    fn default() -> Self {
        Self {
            name: OptimizerName::Adamw,
            lars: false,
            trust_coefficient: 1e-3,
            lr: 1e-3,
            lr_scale: LrScale::Absolute,
            momentum: 0.9,
            nesterov: false,
            weight_decay: 1e-4,
            betas: [0.9, 0.999],
            eps: 1e-8,
        }
    }
}

/// `train.schedule.*`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ScheduleConfig {
    /// `cosine` (to `final_lr_frac` × lr) or `constant`, both after the warm-up.
    pub name: ScheduleName,
    /// Steps of linear warm-up from 0 to the peak learning rate.
    pub warmup_steps: i64,
    /// Cosine schedule ends at this fraction of the peak learning rate.
    pub final_lr_frac: f64,
}

impl Default for ScheduleConfig {
    fn default() -> Self {
        Self { name: ScheduleName::Cosine, warmup_steps: 50, final_lr_frac: 0.0 }
    }
}

/// How the EMA momentum of a method's target network moves over the run
/// (`method.momentum_schedule` of MoCo and BYOL).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MomentumSchedule {
    /// m throughout (MoCo).
    Constant,
    /// 1 − (1 − m₀)(cos(πk/K) + 1)/2 (BYOL).
    Cosine,
}

/// `train.overlap`: `auto` (the default), `true` or `false`.
///
/// `auto` overlaps when the job spans more than one host. On one host the sums
/// run over shared memory with every core busy, so there is no idle link to
/// hide them behind: on a 2-core machine the trainer ran slower with the
/// overlap (docs/benchmarks.md, "Overlap").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Overlap {
    /// On when the job spans hosts.
    #[default]
    Auto,
    /// Always.
    On,
    /// Never: the sums run after backward.
    Off,
}

impl Overlap {
    /// Whether to overlap, for a job that does or does not span hosts.
    pub fn enabled(self, spans_hosts: bool) -> bool {
        match self {
            Overlap::Auto => spans_hosts,
            Overlap::On => true,
            Overlap::Off => false,
        }
    }
}

impl Serialize for Overlap {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Overlap::Auto => s.serialize_str("auto"),
            Overlap::On => s.serialize_bool(true),
            Overlap::Off => s.serialize_bool(false),
        }
    }
}

impl<'de> Deserialize<'de> for Overlap {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Bool(bool),
            Text(String),
        }
        match Raw::deserialize(d).map_err(|_| serde::de::Error::custom("expected true, false or auto"))? {
            Raw::Bool(true) => Ok(Overlap::On),
            Raw::Bool(false) => Ok(Overlap::Off),
            Raw::Text(t) if t == "auto" => Ok(Overlap::Auto),
            Raw::Text(t) => Err(serde::de::Error::custom(format!("expected true, false or auto, got `{t}`"))),
        }
    }
}

/// `train.precision`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Precision {
    /// Everything in fp32.
    Fp32,
    /// The encoders under bf16 autocast; the loss head in fp32.
    Bf16,
}

/// `train.optimizer.name`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OptimizerName {
    /// SGD with momentum (`torch.optim.SGD`).
    Sgd,
    /// AdamW (`torch.optim.AdamW`).
    Adamw,
}

/// `train.optimizer.lr_scale`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LrScale {
    /// The learning rate as given.
    Absolute,
    /// lr × global_batch / 256 (the linear scaling rule).
    #[serde(rename = "per_256")]
    Per256,
}

/// `train.schedule.name`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ScheduleName {
    /// Cosine decay after the warm-up.
    Cosine,
    /// Constant after the warm-up.
    Constant,
}

/// The optimiser and schedule keys the chosen ones do not read.
pub(crate) fn rules(t: &TrainConfig, r: &mut Rules) {
    let o = &t.optimizer;
    r.keys("train.optimizer", &["momentum", "nesterov"], "train.optimizer.name: adamw", o.name == OptimizerName::Adamw);
    r.keys("train.optimizer", &["betas", "eps"], "train.optimizer.name: sgd", o.name == OptimizerName::Sgd);
    r.keys("train.optimizer", &["trust_coefficient"], "train.optimizer.lars: false", !o.lars);
    r.keys(
        "train.schedule",
        &["final_lr_frac"],
        "train.schedule.name: constant",
        t.schedule.name == ScheduleName::Constant,
    );
}

/// Train keys; returns the global batch.
pub(crate) fn check(c: &Config, loss: LossKind, p: usize) -> Result<usize, ConfigError> {
    let t = &c.train;
    if t.global_batch <= 0 {
        return Err(invalid("train.global_batch", format!("must be positive, got {}", t.global_batch)));
    }
    let global_batch = t.global_batch as usize;
    if global_batch % p != 0 {
        return Err(invalid(
            "train.global_batch",
            format!(
                "{global_batch} is not divisible by the world size {p} (local batch would be {:.2})",
                global_batch as f64 / p as f64
            ),
        ));
    }
    if loss.needs_negatives() && global_batch < 2 {
        return Err(invalid("train.global_batch", format!("{loss:?} needs at least 2 samples for a negative")));
    }
    match t.epochs {
        Some(e) if !(e > 0.0 && e.is_finite()) => {
            return Err(invalid("train.epochs", format!("must be positive, got {e}")));
        }
        None if t.steps <= 0 => return Err(invalid("train.steps", format!("must be positive, got {}", t.steps))),
        _ => {}
    }
    if t.log_every <= 0 {
        return Err(invalid("train.log_every", format!("must be positive, got {}", t.log_every)));
    }
    if !(t.timeout_s == 0.0 || (1.0..=1e7).contains(&t.timeout_s)) {
        return Err(invalid(
            "train.timeout_s",
            format!("must be 0 (off) or lie in [1, 1e7] seconds, got {}", t.timeout_s),
        ));
    }
    if t.grad_clip < 0.0 {
        return Err(invalid("train.grad_clip", format!("must be ≥ 0, got {}", t.grad_clip)));
    }
    match t.device.as_str() {
        "cpu" | "cuda" | "auto" => {}
        d if d.strip_prefix("cuda:").is_some_and(|k| k.parse::<usize>().is_ok()) => {}
        d => return Err(invalid("train.device", format!("`{d}` is not cpu, cuda, cuda:K or auto"))),
    }
    let o = &t.optimizer;
    if !(o.lr > 0.0) {
        return Err(invalid("train.optimizer.lr", format!("must be > 0, got {}", o.lr)));
    }
    if o.weight_decay < 0.0 {
        return Err(invalid("train.optimizer.weight_decay", format!("must be ≥ 0, got {}", o.weight_decay)));
    }
    if !(0.0..1.0).contains(&o.momentum) {
        return Err(invalid("train.optimizer.momentum", format!("must lie in [0, 1), got {}", o.momentum)));
    }
    for (key, b) in [("train.optimizer.betas", o.betas[0]), ("train.optimizer.betas", o.betas[1])] {
        if !(0.0..1.0).contains(&b) {
            return Err(invalid(key, format!("each β must lie in [0, 1), got {:?}", o.betas)));
        }
    }
    if !(o.eps > 0.0 && o.eps.is_finite()) {
        return Err(invalid("train.optimizer.eps", format!("must be > 0, got {}", o.eps)));
    }
    if !(0.0..=1.0).contains(&t.schedule.final_lr_frac) {
        return Err(invalid(
            "train.schedule.final_lr_frac",
            format!("must lie in [0, 1], got {}", t.schedule.final_lr_frac),
        ));
    }
    if o.lars && !(o.trust_coefficient > 0.0) {
        return Err(invalid("train.optimizer.trust_coefficient", format!("must be > 0, got {}", o.trust_coefficient)));
    }
    if !(t.collapse_threshold >= 0.0) {
        return Err(invalid("train.collapse_threshold", format!("must be ≥ 0, got {}", t.collapse_threshold)));
    }
    let s = &t.schedule;
    if s.warmup_steps < 0 {
        return Err(invalid("train.schedule.warmup_steps", format!("must be ≥ 0, got {}", s.warmup_steps)));
    }
    Ok(global_batch)
}

/// `train.micro_batch` needs a forward that is a function of each row alone.
pub(crate) fn check_micro_batch(c: &Config, norm: Norm, method: &dyn MethodSpec) -> Result<(), ConfigError> {
    if c.train.micro_batch == 0 {
        return Ok(());
    }
    if norm == Norm::Batch {
        return Err(invalid(
            "train.micro_batch",
            "chunks would change the batch statistics of model.norm: batch; use group or layer norm, or 0",
        ));
    }
    if !method.runs_in_chunks() {
        return Err(invalid(
            "train.micro_batch",
            format!(
                "method {} cannot run in chunks (batch statistics in its heads or an exchange inside its forward); use 0",
                method.name()
            ),
        ));
    }
    Ok(())
}

/// libtorch threads per rank and where the number came from.
pub(crate) fn threads_of(c: &Config, topo: Topology) -> (usize, usize, String) {
    let t = &c.train;
    let local_size = topo.local_size.max(1);
    let share = (topo.host_cores / local_size).max(1).min(topo.rank_cores.max(1));
    let workers = if c.data.workers > 0 { c.data.workers } else { share.clamp(1, 4) };
    if t.threads > 0 {
        return (t.threads, workers, "train.threads".to_string());
    }
    let source = format!(
        "min({} host cores ÷ {} local ranks, {} cores bound to this rank)",
        topo.host_cores, local_size, topo.rank_cores
    );
    if !c.data.dataset.decodes_images() {
        return (share, workers, source);
    }
    // Decoding workers keep cores busy: they count against the budget, up to half of it.
    let n = share.saturating_sub(workers).max(share.div_ceil(2)).max(1);
    (n, workers, format!("{source} − {} decoding workers, at least half", share - n))
}
