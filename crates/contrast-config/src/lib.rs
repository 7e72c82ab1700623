//! YAML schema and validated run plan.
//!
//! Two stages, as in ripgrep's `LowArgs` → `HiArgs`: [`Config`] is the raw
//! serde view of a YAML file (every struct is `deny_unknown_fields`, every field
//! has a default and a one-line doc), and [`Plan`] is the resolved, validated
//! run: derived sizes (local batch, negatives per anchor, threads, effective
//! learning rate) are computed once and printed at start.
//!
//! This crate knows nothing of torch or MPI; the caller tells it the world size
//! and how many ranks share the host.
#![warn(missing_docs)]

use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// Most data worker threads per rank (`data.workers`).
pub const MAX_WORKERS: usize = 256;
/// Most batches in flight per rank (`data.prefetch`).
pub const MAX_PREFETCH: usize = 1024;
/// Largest blur σ in pixels (`data.aug.blur_sigma`): the kernel radius is ⌈3σ⌉.
pub const MAX_BLUR_SIGMA: f32 = 64.0;

/// The conv encoder average-pools its last feature map to a grid of this side;
/// `model.embed_dim` must be a multiple of its square.
pub const POOL_GRID: i64 = 4;

/// Errors of loading or validating a configuration. Each names the file, the
/// key or the size at fault.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// YAML syntax error, unknown key or wrong type.
    #[error("config file {path}: {message}")]
    Parse {
        /// The file (or `--set` for overrides).
        path: String,
        /// serde's message, which names the key.
        message: String,
    },
    /// A `--set` override that is not `a.b.c=value`.
    #[error("bad override `{0}`: expected KEY=VALUE with KEY like train.steps")]
    Override(String),
    /// A key given in the config that the chosen loss or method does not read.
    #[error("config key `{key}` does not apply to {what}: remove it (docs/config.md lists the keys of each)")]
    NotApplicable {
        /// Dotted key.
        key: String,
        /// The loss or method it does not apply to.
        what: String,
    },
    /// A value that parsed but is not allowed.
    #[error("config key `{key}`: {message}")]
    Invalid {
        /// Dotted key.
        key: &'static str,
        /// What is wrong.
        message: String,
    },
}

fn invalid(key: &'static str, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid { key, message: message.into() }
}

/// The whole configuration file.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Master seed: data order, augmentations and initial weights derive from it.
    pub seed: u64,
    /// Dataset, augmentation and input pipeline.
    pub data: DataConfig,
    /// Encoder and heads.
    pub model: ModelConfig,
    /// Loss head.
    pub loss: LossConfig,
    /// Method: what is trained around the loss (momentum encoder, queue, predictor).
    pub method: MethodConfig,
    /// Training loop.
    pub train: TrainConfig,
    /// Checkpoints and run outputs.
    pub checkpoint: CheckpointConfig,
    /// Evaluation (kNN, zero-shot).
    pub eval: EvalConfig,
    /// Prometheus metrics.
    pub metrics: MetricsConfig,
    /// Dotted keys the file and the overrides set (to reject keys that do not apply).
    #[serde(skip)]
    pub given: std::collections::BTreeSet<String>,
}

/// `data.*`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DataConfig {
    /// Dataset kind: `fashion_mnist` (IDX files), `image_folder` (root/<class>/<image>),
    /// `csv` (a CSV/TSV of image path + caption) or `webdataset` (tar shards).
    pub dataset: DatasetKind,
    /// IDX directory, image-folder directory, CSV/TSV file, or shard pattern (`dir/{000000..000099}.tar`).
    pub root: PathBuf,
    /// Side of the square RGB crops fed to the encoder (image_folder, csv, webdataset).
    pub image_size: u32,
    /// CSV: column of the image path (open_clip `--csv-img-key`).
    pub csv_img_key: String,
    /// CSV: column of the caption (open_clip `--csv-caption-key`).
    pub csv_caption_key: String,
    /// CSV: field separator (open_clip `--csv-separator`), one character, or
    /// `auto`: the one of tab, comma, semicolon and `|` whose split of the header
    /// holds both column names.
    pub csv_separator: String,
    /// Stop when more than this fraction of the samples cannot be read or decoded.
    pub max_bad_fraction: f64,
    /// Multi-crop (`swav` preset): number of small crops.
    pub small_crops: usize,
    /// Multi-crop: side of the small crops (0 = image_size · 96 / 224; IDX: ⌈28 · 96 / 224⌉ = 12).
    pub small_size: u32,
    /// Batch-level mixing: `none`, `mixup` or `cutmix` (soft targets for ntxent — i-Mix on the first view — and supcon).
    pub mix: MixName,
    /// Mixing: λ ~ Beta(α, α).
    pub mix_alpha: f64,
    /// Mixing: partners are drawn within groups of this many consecutive rows of the global batch (must divide the local batch).
    pub mix_group: usize,
    /// Augmentation preset: `simclr` (two random views), `clip` (light crop), `swav` (multi-crop) or `none`;
    /// for file datasets also `mocov2` and `byol` (asymmetric views).
    pub augment: AugmentPreset,
    /// Worker threads that decode and augment (0 = one per core, at most 4).
    pub workers: usize,
    /// Ready batches the pipeline keeps ahead of the trainer.
    pub prefetch: usize,
    /// Parameters of the augmentation preset.
    pub aug: AugConfig,
    /// Caption augmentation (image–text losses).
    pub text: TextAugConfig,
}

/// `data.dataset`: the kind of data source.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DatasetKind {
    /// IDX files (Fashion-MNIST, MNIST).
    FashionMnist,
    /// `root/<class>/<image>`.
    ImageFolder,
    /// A CSV/TSV of image path and caption.
    Csv,
    /// Tar shards.
    Webdataset,
}

impl DatasetKind {
    /// True for decoded image files (every kind but IDX).
    pub fn is_files(self) -> bool {
        self != DatasetKind::FashionMnist
    }
}

/// `data.augment`: the augmentation preset.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AugmentPreset {
    /// Two random views with the `data.aug` parameters.
    Simclr,
    /// Mild crop (IDX) or resize + centre crop (files).
    Clip,
    /// Normalise only.
    None,
    /// Multi-crop: 2 large and `data.small_crops` small views.
    Swav,
    /// MoCo v2's `aug_plus` (file datasets).
    Mocov2,
    /// BYOL's asymmetric views (file datasets).
    Byol,
}

impl AugmentPreset {
    /// The preset's name as written in the config.
    pub fn as_str(self) -> &'static str {
        match self {
            AugmentPreset::Simclr => "simclr",
            AugmentPreset::Clip => "clip",
            AugmentPreset::None => "none",
            AugmentPreset::Swav => "swav",
            AugmentPreset::Mocov2 => "mocov2",
            AugmentPreset::Byol => "byol",
        }
    }
}

/// `data.mix`: batch-level mixing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MixName {
    /// No mixing.
    None,
    /// Mixup: a convex blend of two images.
    Mixup,
    /// CutMix: a box of one image pasted into another.
    Cutmix,
}

/// `data.text.cutoff`: token cutoff on captions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CutoffName {
    /// No cutoff.
    None,
    /// Each content token is padded with probability r.
    Token,
    /// One contiguous span of ⌈r·len⌉ tokens is padded.
    Span,
}

/// `data.text.*`: tokenizer and caption augmentation for image–text losses.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TextAugConfig {
    /// `bytes` (byte-level tokens, nothing to load) or the path of a Hugging Face `tokenizer.json`.
    pub tokenizer: String,
    /// EDA strength α (fraction of words changed; 0 = off).
    pub eda_alpha: f64,
    /// EDA synonym file: one `word<TAB>syn1,syn2,…` per line (required when eda_alpha > 0).
    pub synonyms: Option<PathBuf>,
    /// Cutoff: `none`, `token` or `span`.
    pub cutoff: CutoffName,
    /// Cutoff ratio of content tokens.
    pub cutoff_ratio: f64,
}

impl Default for TextAugConfig {
    fn default() -> Self {
        Self { tokenizer: "bytes".into(), eda_alpha: 0.0, synonyms: None, cutoff: CutoffName::None, cutoff_ratio: 0.1 }
    }
}

impl Default for DataConfig {
    fn default() -> Self {
        Self {
            dataset: DatasetKind::FashionMnist,
            root: PathBuf::from("/usr/share/datasets/fashion-mnist"),
            image_size: 32,
            csv_img_key: "filepath".into(),
            csv_caption_key: "title".into(),
            csv_separator: "auto".into(),
            max_bad_fraction: 0.01,
            small_crops: 6,
            small_size: 0,
            mix: MixName::None,
            mix_alpha: 1.0,
            mix_group: 16,
            augment: AugmentPreset::Simclr,
            workers: 0,
            prefetch: 4,
            aug: AugConfig::default(),
            text: TextAugConfig::default(),
        }
    }
}

/// `data.aug.*`: parameters of the SimCLR-style augmentation.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AugConfig {
    /// Random resized crop: range of the crop's area as a fraction of the image.
    pub crop_scale: [f32; 2],
    /// Random resized crop: range of the crop's aspect ratio.
    pub crop_ratio: [f32; 2],
    /// Probability of a horizontal flip.
    pub flip_prob: f32,
    /// Probability of applying brightness/contrast jitter.
    pub jitter_prob: f32,
    /// Brightness jitter strength: factor drawn from [1-b, 1+b].
    pub brightness: f32,
    /// Contrast jitter strength: factor drawn from [1-c, 1+c].
    pub contrast: f32,
    /// Probability of a Gaussian blur.
    pub blur_prob: f32,
    /// Range of the blur's sigma, in pixels (RGB datasets: pixels at 224, scaled with image_size).
    pub blur_sigma: [f32; 2],
    /// RGB datasets: saturation jitter strength.
    pub saturation: f32,
    /// RGB datasets: hue jitter (≤ 0.5).
    pub hue: f32,
    /// RGB datasets: probability of converting to grayscale.
    pub gray_prob: f32,
    /// RGB datasets: probability of solarisation.
    pub solarize_prob: f32,
    /// RGB datasets: RandAugment ops per image (0 = off).
    pub randaugment_n: usize,
    /// RGB datasets: RandAugment magnitude (0–30).
    pub randaugment_m: u32,
    /// RGB datasets: apply the ImageNet AutoAugment policy.
    pub autoaugment: bool,
}

impl Default for AugConfig {
    fn default() -> Self {
        Self {
            crop_scale: [0.3, 1.0],
            crop_ratio: [0.75, 1.3333],
            flip_prob: 0.5,
            jitter_prob: 0.8,
            brightness: 0.4,
            contrast: 0.4,
            blur_prob: 0.2,
            blur_sigma: [0.1, 1.0],
            saturation: 0.4,
            hue: 0.1,
            gray_prob: 0.2,
            solarize_prob: 0.0,
            randaugment_n: 0,
            randaugment_m: 9,
            autoaugment: false,
        }
    }
}

/// `model.*`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ModelConfig {
    /// Image encoder: `convnet` (small CNN for 28×28 inputs).
    pub encoder: String,
    /// Normalisation in the encoder: `batch`, `group`, `layer` or `none`.
    pub norm: Norm,
    /// Channels of the first stage; later stages double it.
    pub width: i64,
    /// Dimension of the backbone's representation (what kNN evaluates): a 4×4 grid of embed_dim/16 channels.
    pub embed_dim: i64,
    /// Dimension of the projection head's output (what the loss sees).
    pub proj_dim: i64,
    /// Hidden width of the SimCLR projection MLP.
    pub proj_hidden: i64,
    /// Text tower (CLIP only).
    pub text: TextConfig,
}

impl Default for ModelConfig {
    fn default() -> Self {
        Self {
            encoder: "convnet".into(),
            norm: Norm::Group,
            width: 32,
            embed_dim: 1024,
            proj_dim: 64,
            proj_hidden: 512,
            text: TextConfig::default(),
        }
    }
}

/// `model.text.*`: the CLIP text tower.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TextConfig {
    /// Transformer width.
    pub width: i64,
    /// Transformer layers.
    pub layers: i64,
    /// Attention heads (must divide width).
    pub heads: i64,
    /// Context length in tokens (byte-level tokens plus start and end).
    pub context: i64,
}

impl Default for TextConfig {
    fn default() -> Self {
        Self { width: 64, layers: 2, heads: 4, context: 48 }
    }
}

/// `loss.*`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LossConfig {
    /// Loss: `ntxent`, `supcon`, `dcl`, `dclw`, `debiased`, `hard_negative`, `barlow_twins`, `barlow_twins_unbiased`, `nce` (two views),
    /// `clip`, `siglip` (image–text), the metric losses, or a method's own (`infonce` for moco_v2,
    /// `normalized_mse` for byol, `negative_cosine` for simsiam). Unset: the method's loss (ntxent for simclr).
    pub name: Option<LossKind>,
    /// Softmax temperature; for CLIP/SigLIP the initial temperature of the learnt logit scale (scale = 1/t).
    /// Unset: the default of the implementation the loss follows (see [`LossKind::default_temperature`]).
    pub temperature: Option<f64>,
    /// CLIP/SigLIP: learn the logit scale (stored as its log, clamped at 100).
    pub learn_scale: bool,
    /// Debiased / hard-negative: class-prior τ⁺ of a false negative, in [0, 1).
    pub tau_plus: f64,
    /// Hard-negative: concentration β of the negative reweighting (0 = debiased loss).
    pub beta: f64,
    /// Barlow Twins: weight λ of the off-diagonal (redundancy) term.
    pub lambda: f64,
    /// DCLW: σ of the von Mises-Fisher positive weighting.
    pub sigma: f64,
    /// SigLIP: initial logit bias (learnt).
    pub init_bias: f64,
    /// Triplet: margin of relu(d_ap − d_an + margin).
    pub margin: f64,
    /// Contrastive / lifted: positive-pair margin.
    pub pos_margin: f64,
    /// Contrastive / lifted (smooth, hard, generalized): negative-pair margin.
    pub neg_margin: f64,
    /// Contrastive: the survey's squared form d², relu(m − d)².
    pub squared: bool,
    /// Triplet mining over the global batch: `all`, `batch_hard` or `semi_hard`.
    pub mining: Mining,
    /// NCE: size of the uniform noise distribution (p_n = 1 / noise_size).
    pub noise_size: f64,
    /// `npair_dot`: weight λ of the penalty λ/4·(mean‖a‖² + mean‖p‖²) on the
    /// pairs' embeddings (TensorFlow's `reg_lambda`, 0.002).
    pub l2_reg: f64,
}

impl Default for LossConfig {
    fn default() -> Self {
        Self {
            name: None,
            temperature: None,
            learn_scale: true,
            tau_plus: 0.1,
            beta: 1.0,
            lambda: 5e-3,
            sigma: 0.5,
            init_bias: -10.0,
            margin: 0.05,
            pos_margin: 0.0,
            neg_margin: 1.0,
            squared: false,
            l2_reg: 0.002,
            mining: Mining::All,
            noise_size: 60000.0,
        }
    }
}

/// `train.*`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainConfig {
    /// Samples per optimiser step over all ranks (N = P·B).
    pub global_batch: i64,
    /// Optimiser steps of the whole run.
    pub steps: i64,
    /// `cpu`, `cuda`, `cuda:K` or `auto` (CUDA if present; device = local rank mod GPUs).
    pub device: String,
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
            device: "cpu".into(),
            threads: 0,
            resume: false,
            grad_clip: 0.0,
            log_every: 20,
            collapse_threshold: 0.2,
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

/// `method.*`: what is trained around the loss. Keys that do not apply to the
/// chosen method are errors (see [`Plan::resolve`]).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MethodConfig {
    /// `simclr`, `clip`, `moco_v2`, `byol` or `simsiam`; unset: `clip` for an image–text loss, else `simclr`.
    pub name: Option<MethodName>,
    /// MoCo: queue size K (a multiple of the global batch); each rank keeps K/P keys.
    pub queue_size: usize,
    /// MoCo/BYOL: momentum m of the EMA encoder (m₀ with the cosine schedule). Unset: 0.99
    /// (short runs; MoCo's reference uses 0.999 and BYOL's 0.996 for long ones).
    pub momentum: Option<f64>,
    /// MoCo/BYOL: `constant` m or BYOL's `cosine` schedule from m₀ to 1. Unset: constant for MoCo, cosine for BYOL.
    pub momentum_schedule: Option<MomentumSchedule>,
    /// MoCo: shuffle the key encoder's batch across ranks (needs `model.norm: batch`).
    pub shuffle_bn: bool,
    /// BYOL/SimSiam: hidden width of the predictor MLP (required).
    pub predictor_hidden: Option<i64>,
}

impl Default for MethodConfig {
    fn default() -> Self {
        Self {
            name: None,
            queue_size: 4096,
            momentum: None,
            momentum_schedule: None,
            shuffle_bn: false,
            predictor_hidden: None,
        }
    }
}

/// The training methods.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MethodName {
    /// Backbone + projection head, two (or more) views, any two-view or metric loss.
    Simclr,
    /// Image and text towers, CLIP or SigLIP.
    Clip,
    /// MoCo-v2: momentum key encoder and a sharded queue of negatives.
    MocoV2,
    /// BYOL: online network with a predictor, EMA target network.
    Byol,
    /// SimSiam: shared encoder, predictor, stop-gradient.
    Simsiam,
}

/// How the EMA momentum moves over the run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MomentumSchedule {
    /// m throughout (MoCo).
    Constant,
    /// 1 − (1 − m₀)(cos(πk/K) + 1)/2 (BYOL).
    Cosine,
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

/// `loss.mining`: which triplets of the global batch the triplet loss uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Mining {
    /// Every valid triplet.
    All,
    /// Hardest positive and hardest negative per anchor.
    BatchHard,
    /// Negatives farther than the positive but within the margin.
    SemiHard,
}

/// `checkpoint.*`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CheckpointConfig {
    /// Run directory: `step-<N>/`, `latest`, `steps.jsonl`, `summary.json`.
    pub dir: PathBuf,
    /// Write a checkpoint every this many steps (0 = only at the end).
    pub every: i64,
    /// Keep this many newest checkpoints (0 = keep all).
    pub keep: usize,
    /// Also keep the checkpoint with the best value of this evaluation figure
    /// in `best/` (never pruned): `knn_top1`, `knn_top5`, `linear_top1`,
    /// `zero_shot_top1` or `zero_shot_top5`. Unset: none.
    pub best: Option<String>,
}

/// The evaluation figures `checkpoint.best` can follow.
pub const BEST_METRICS: [&str; 5] = ["knn_top1", "knn_top5", "linear_top1", "zero_shot_top1", "zero_shot_top5"];

impl Default for CheckpointConfig {
    fn default() -> Self {
        Self { dir: PathBuf::from("runs/default"), every: 500, keep: 2, best: None }
    }
}

/// `metrics.*`: a Prometheus `/metrics` endpoint on every rank, and/or a
/// node_exporter textfile.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    /// Serve `/metrics` (false: no endpoint; the textfile still works).
    pub enabled: bool,
    /// `host:base_port`; local rank r serves base_port + r. Loopback by default.
    pub listen: String,
    /// A directory where each rank writes `contrast-rank<r>.prom` (node_exporter's
    /// textfile collector format), for nodes nothing can scrape; unset: none.
    pub textfile_dir: Option<PathBuf>,
    /// Write the textfile every this many steps.
    pub textfile_every: i64,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        Self { enabled: true, listen: "127.0.0.1:9400".into(), textfile_dir: None, textfile_every: 20 }
    }
}

impl MetricsConfig {
    /// The host and base port of `listen`.
    pub fn host_port(&self) -> Option<(&str, u16)> {
        let (host, port) = self.listen.rsplit_once(':')?;
        Some((host.trim_start_matches('[').trim_end_matches(']'), port.parse().ok()?))
    }
}

/// `eval.*`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EvalConfig {
    /// Evaluate every this many steps during training (0 = only at the end).
    pub every: i64,
    /// Evaluate at the end of training (and the untrained encoder and raw pixels at the start).
    pub at_end: bool,
    /// Neighbours of the kNN classifier.
    pub knn_k: i64,
    /// Full-batch AdamW steps of the linear probe (logistic regression on
    /// frozen features of the kNN memory, top-1 on the test set); 0 = no probe.
    pub linear_probe_steps: i64,
    /// Temperature of the kNN vote weights exp(sim / t).
    pub knn_t: f64,
    /// Use at most this many training images as kNN memory (0 = all).
    pub max_train: usize,
    /// Use at most this many test images (0 = all).
    pub max_test: usize,
    /// File datasets: the labelled test split (an image folder, a shard pattern or a CSV);
    /// unset = no evaluation. Fashion-MNIST uses its `t10k` files in `data.root`.
    pub root: Option<PathBuf>,
    /// Format of `eval.root`: `image_folder`, `webdataset` or `csv` (unset = `data.dataset`).
    pub dataset: Option<DatasetKind>,
}

impl Default for EvalConfig {
    fn default() -> Self {
        Self {
            every: 0,
            at_end: true,
            knn_k: 200,
            linear_probe_steps: 200,
            knn_t: 0.1,
            max_train: 0,
            max_test: 0,
            root: None,
            dataset: None,
        }
    }
}

/// The largest config file read (a config is a few kB).
pub const MAX_CONFIG_BYTES: usize = 1 << 20;
/// The deepest nesting of mappings and sequences a config may have.
pub const MAX_YAML_DEPTH: usize = 64;

/// Refuse a config that is too large or nested too deeply before the YAML
/// parser sees it (a 100k-deep document costs the parser tens of seconds).
/// Depth counts block indentation levels, `- ` sequence entries and flow
/// brackets outside quotes and comments — an upper bound of the parser's.
pub fn check_yaml_shape(text: &str) -> Result<(), String> {
    if text.len() > MAX_CONFIG_BYTES {
        return Err(format!("{} bytes; a config may be at most {MAX_CONFIG_BYTES}", text.len()));
    }
    let (mut indents, mut flow, mut deepest) = (Vec::<usize>::new(), 0usize, 0usize);
    for (n, line) in text.lines().enumerate() {
        let body = line.trim_start_matches(' ');
        if flow == 0 && !body.is_empty() && !body.starts_with('#') {
            let indent = line.len() - body.len();
            while indents.last().is_some_and(|&top| top >= indent) {
                indents.pop();
            }
            indents.push(indent);
        }
        let dashes = body.split_inclusive("- ").take_while(|p| p.trim_start() == "- ").count();
        deepest = deepest.max(indents.len() + dashes + flow);
        let mut quote = None;
        let mut prev = ' ';
        for c in body.chars() {
            match (quote, c) {
                (Some(q), c) if c == q && prev != '\\' => quote = None,
                (Some(_), _) => {}
                (None, '#') if prev.is_whitespace() => break,
                (None, '\'' | '"') => quote = Some(c),
                (None, '[' | '{') => flow += 1,
                (None, ']' | '}') => flow = flow.saturating_sub(1),
                _ => {}
            }
            deepest = deepest.max(indents.len() + dashes + flow);
            prev = c;
        }
        if deepest > MAX_YAML_DEPTH {
            return Err(format!("line {}: nested more than {MAX_YAML_DEPTH} levels deep", n + 1));
        }
    }
    Ok(())
}

/// Write numbers that came from `f32` fields as the f32's shortest decimal
/// (`0.3`, not `0.30000001192092896`); an f64 value is never changed.
fn shortest_f32(v: &mut serde_yaml_ng::Value) {
    use serde_yaml_ng::Value;
    match v {
        Value::Number(n) => {
            if let Some(x) = n.as_f64().filter(|x| x.fract() != 0.0 && (*x as f32) as f64 == *x) {
                if let Ok(short) = (x as f32).to_string().parse::<f64>() {
                    *v = Value::from(short);
                }
            }
        }
        Value::Sequence(items) => items.iter_mut().for_each(shortest_f32),
        Value::Mapping(m) => m.iter_mut().for_each(|(_, x)| shortest_f32(x)),
        _ => {}
    }
}

/// Parse YAML text after [`check_yaml_shape`].
fn parse_yaml(text: &str, origin: &str) -> Result<serde_yaml_ng::Value, ConfigError> {
    check_yaml_shape(text).map_err(|message| ConfigError::Parse { path: origin.into(), message })?;
    serde_yaml_ng::from_str(text).map_err(|e| ConfigError::Parse { path: origin.into(), message: e.to_string() })
}

impl Config {
    /// Parse YAML text; `origin` names the file in errors.
    pub fn from_yaml(text: &str, origin: &str) -> Result<Self, ConfigError> {
        let value = parse_yaml(text, origin)?;
        Self::from_value(value, origin)
    }

    fn from_value(value: serde_yaml_ng::Value, origin: &str) -> Result<Self, ConfigError> {
        let value = if value.is_null() { serde_yaml_ng::Value::Mapping(Default::default()) } else { value };
        let mut given = std::collections::BTreeSet::new();
        collect_keys(&value, "", &mut given);
        // The path of the failing key (`model.norm: unknown variant ...`) comes with the message.
        let mut c: Self = serde_path_to_error::deserialize(value).map_err(|e| {
            let path = e.path().to_string();
            let message = if path == "." { e.inner().to_string() } else { format!("{path}: {}", e.inner()) };
            ConfigError::Parse { path: origin.into(), message }
        })?;
        c.given = given;
        Ok(c)
    }

    /// Read a YAML file and apply `KEY=VALUE` overrides (values parsed as YAML).
    pub fn load(path: &Path, overrides: &[String]) -> Result<Self, ConfigError> {
        let origin = path.display().to_string();
        let text = read_bounded(path)?;
        let mut value = parse_yaml(&text, &origin)?;
        if value.is_null() {
            value = serde_yaml_ng::Value::Mapping(Default::default());
        }
        // Check the file alone first so that an unknown key is blamed on the file.
        Self::from_value(value.clone(), &origin)?;
        for o in overrides {
            apply_override(&mut value, o)?;
        }
        Self::from_value(value, &format!("{origin} (with --set overrides)"))
    }
}

/// A config file's text, reading at most one byte past [`MAX_CONFIG_BYTES`].
fn read_bounded(path: &Path) -> Result<String, ConfigError> {
    use std::io::Read;
    let read = |source| ConfigError::Read { path: path.to_path_buf(), source };
    let mut text = String::new();
    let file = std::fs::File::open(path).map_err(read)?;
    file.take(MAX_CONFIG_BYTES as u64 + 1).read_to_string(&mut text).map_err(read)?;
    Ok(text)
}

/// Every dotted key of a YAML mapping (`loss`, `loss.margin`, ...).
fn collect_keys(v: &serde_yaml_ng::Value, prefix: &str, out: &mut std::collections::BTreeSet<String>) {
    if let Some(map) = v.as_mapping() {
        for (k, child) in map {
            let k = k.as_str().map(str::to_owned).unwrap_or_else(|| format!("{k:?}"));
            let key = if prefix.is_empty() { k } else { format!("{prefix}.{k}") };
            collect_keys(child, &key, out);
            out.insert(key);
        }
    }
}

/// Set `a.b.c=value` inside a YAML mapping, creating intermediate mappings.
fn apply_override(root: &mut serde_yaml_ng::Value, spec: &str) -> Result<(), ConfigError> {
    use serde_yaml_ng::Value;
    let (key, raw) = spec.split_once('=').ok_or_else(|| ConfigError::Override(spec.into()))?;
    if key.is_empty() || key.split('.').any(str::is_empty) {
        return Err(ConfigError::Override(spec.into()));
    }
    check_yaml_shape(raw).map_err(|message| ConfigError::Parse { path: format!("--set {key}"), message })?;
    let parsed: Value = serde_yaml_ng::from_str(raw).unwrap_or_else(|_| Value::String(raw.into()));
    let mut node = root;
    for part in key.split('.') {
        if !node.is_mapping() {
            *node = Value::Mapping(Default::default());
        }
        let map = node.as_mapping_mut().expect("mapping");
        node = map.entry(Value::String(part.into())).or_insert(Value::Null);
    }
    *node = parsed;
    Ok(())
}

/// Where the run is: world size and ranks per host, as the communicator reports them.
#[derive(Debug, Clone, Copy)]
pub struct Topology {
    /// Number of ranks P.
    pub world_size: usize,
    /// Ranks on this host.
    pub local_size: usize,
    /// Logical cores of this host.
    pub host_cores: usize,
    /// Cores this process may run on (its CPU affinity; MPI launchers often bind a rank to one).
    pub rank_cores: usize,
}

/// The losses the trainer can run end to end (`loss.name`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum LossKind {
    /// NT-Xent over 2N views (SimCLR).
    #[serde(rename = "ntxent", alias = "nt_xent", alias = "simclr")]
    NtXent,
    /// Supervised contrastive over two views and the class labels.
    #[serde(rename = "supcon")]
    SupCon,
    /// Decoupled contrastive (positive out of the denominator).
    #[serde(rename = "dcl")]
    Dcl,
    /// DCL with von Mises-Fisher positive weights.
    #[serde(rename = "dclw")]
    Dclw,
    /// Debiased contrastive (Chuang et al.).
    #[serde(rename = "debiased")]
    Debiased,
    /// Hard-negative contrastive (Robinson et al.).
    #[serde(rename = "hard_negative")]
    HardNegative,
    /// Barlow Twins, standardised with batch-norm statistics (biased variance
    /// + 1e-5: the official code and lightly 1.6).
    #[serde(rename = "barlow_twins")]
    BarlowTwins,
    /// Barlow Twins, standardised with the unbiased standard deviation and no
    /// epsilon (the paper's Algorithm 1, lightly ≤ 1.5).
    #[serde(rename = "barlow_twins_unbiased")]
    BarlowTwinsUnbiased,
    /// Symmetric image–text cross-entropy with a logit scale (CLIP).
    #[serde(rename = "clip")]
    Clip,
    /// Pairwise sigmoid image–text loss (SigLIP).
    #[serde(rename = "siglip")]
    SigLip,
    /// Contrastive pair loss (Chopra et al.).
    #[serde(rename = "contrastive")]
    Contrastive,
    /// Triplet margin loss.
    #[serde(rename = "triplet")]
    Triplet,
    /// Lifted structured loss, smooth form.
    #[serde(rename = "lifted")]
    Lifted,
    /// Lifted structured loss, hard (max) form of Song et al.
    #[serde(rename = "lifted_hard")]
    LiftedHard,
    /// Generalized lifted structure loss.
    #[serde(rename = "generalized_lifted")]
    GeneralizedLifted,
    /// Multi-class N-pair loss on cosine similarities (pytorch-metric-learning
    /// `NPairsLoss`, which L2-normalises by default).
    #[serde(rename = "npair")]
    NPair,
    /// N-pair loss on raw dot products with Sohn 2016's L2 penalty on the
    /// embeddings (TensorFlow's `npairs_loss`).
    #[serde(rename = "npair_dot")]
    NPairDot,
    /// Soft nearest neighbour loss.
    #[serde(rename = "snn")]
    Snn,
    /// Binary NCE with uniform noise.
    #[serde(rename = "nce")]
    Nce,
    /// InfoNCE of queries against their key and a queue of negatives (MoCo).
    #[serde(rename = "infonce")]
    InfoNce,
    /// BYOL's normalised MSE 2 − 2 cos(p, sg z), symmetrised.
    #[serde(rename = "normalized_mse")]
    NormalizedMse,
    /// SimSiam's negative cosine −cos(p, sg z), symmetrised.
    #[serde(rename = "negative_cosine")]
    NegativeCosine,
}

impl LossConfig {
    /// `loss.temperature`, or the default of the implementation `kind` follows.
    pub fn temperature_for(&self, kind: LossKind) -> f64 {
        self.temperature.unwrap_or_else(|| kind.default_temperature())
    }
}

impl LossKind {
    /// The temperature of the implementation each loss follows: lightly
    /// `NTXentLoss` 0.5, pytorch-metric-learning `SupConLoss` 0.1, lightly
    /// `DCLLoss` 0.1, the debiased/hard-negative authors' scripts 0.5, open_clip's
    /// initial CLIP scale 1/0.07 and SigLIP scale 10, instance-discrimination
    /// NCE 0.07, MoCo-v2's InfoNCE 0.2; 1 where the loss has none.
    pub fn default_temperature(self) -> f64 {
        match self {
            LossKind::NtXent | LossKind::Debiased | LossKind::HardNegative => 0.5,
            LossKind::SupCon | LossKind::Dcl | LossKind::Dclw | LossKind::SigLip => 0.1,
            LossKind::Clip | LossKind::Nce => 0.07,
            LossKind::InfoNce => 0.2,
            _ => 1.0,
        }
    }

    /// Parse a `loss.name` value.
    pub fn parse(s: &str) -> Option<Self> {
        serde_yaml_ng::from_value(serde_yaml_ng::Value::String(s.into())).ok()
    }

    /// The `loss.*` keys (besides `name`) that this loss reads.
    pub fn keys(self) -> &'static [&'static str] {
        match self {
            LossKind::NtXent | LossKind::SupCon | LossKind::Dcl | LossKind::Snn | LossKind::InfoNce => &["temperature"],
            LossKind::Dclw => &["temperature", "sigma"],
            LossKind::Debiased => &["temperature", "tau_plus"],
            LossKind::HardNegative => &["temperature", "tau_plus", "beta"],
            LossKind::BarlowTwins | LossKind::BarlowTwinsUnbiased => &["lambda"],
            LossKind::NPairDot => &["l2_reg"],
            LossKind::Clip => &["temperature", "learn_scale"],
            LossKind::SigLip => &["temperature", "learn_scale", "init_bias"],
            LossKind::Contrastive => &["pos_margin", "neg_margin", "squared"],
            LossKind::Triplet => &["margin", "mining"],
            LossKind::Lifted | LossKind::GeneralizedLifted => &["pos_margin", "neg_margin"],
            LossKind::LiftedHard => &["neg_margin"],
            LossKind::NPair | LossKind::NormalizedMse | LossKind::NegativeCosine => &[],
            LossKind::Nce => &["temperature", "noise_size"],
        }
    }

    /// True for the image–text losses (CLIP model, captions).
    pub fn is_image_text(self) -> bool {
        matches!(self, LossKind::Clip | LossKind::SigLip)
    }

    /// True for the metric-learning losses: one embedding per sample and its label.
    pub fn is_metric(self) -> bool {
        matches!(
            self,
            LossKind::Contrastive
                | LossKind::Triplet
                | LossKind::Lifted
                | LossKind::LiftedHard
                | LossKind::GeneralizedLifted
                | LossKind::NPair
                | LossKind::NPairDot
                | LossKind::Snn
        )
    }

    /// True for the losses that belong to one method (MoCo's InfoNCE, BYOL's and SimSiam's regressions).
    pub fn is_method_own(self) -> bool {
        matches!(self, LossKind::InfoNce | LossKind::NormalizedMse | LossKind::NegativeCosine)
    }

    /// True when the loss contrasts against other samples of the batch (needs N ≥ 2).
    pub fn needs_negatives(self) -> bool {
        !self.is_image_text()
            && !matches!(
                self,
                LossKind::BarlowTwins
                    | LossKind::BarlowTwinsUnbiased
                    | LossKind::InfoNce
                    | LossKind::NormalizedMse
                    | LossKind::NegativeCosine
            )
    }

    /// True when the loss needs class labels.
    pub fn is_supervised(self) -> bool {
        self == LossKind::SupCon || self.is_metric()
    }
}

/// Normalisation layer choice (`model.norm`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Norm {
    /// BatchNorm (has batch statistics: breaks exact parity across layouts).
    Batch,
    /// GroupNorm.
    Group,
    /// LayerNorm over channels (GroupNorm with one group).
    Layer,
    /// No normalisation.
    None,
}

/// A method's resolved settings (defaults filled in, checked).
#[derive(Debug, Clone, Copy, Serialize)]
pub struct MethodPlan {
    /// The method.
    pub name: MethodName,
    /// EMA momentum m (m₀ with the cosine schedule).
    pub momentum: f64,
    /// Constant or cosine momentum.
    pub momentum_schedule: MomentumSchedule,
    /// MoCo: queue size K (0 otherwise).
    pub queue_size: usize,
    /// MoCo: keys each rank holds, K/P (0 otherwise).
    pub queue_shard: usize,
    /// MoCo: shuffle-BN in the key encoder.
    pub shuffle_bn: bool,
    /// BYOL/SimSiam: predictor hidden width (0 otherwise).
    pub predictor_hidden: i64,
}

impl MethodPlan {
    /// The defaults of `name` (momentum 0.99, its schedule; no queue, no predictor).
    pub fn of(name: MethodName) -> Self {
        let schedule = if name == MethodName::Byol { MomentumSchedule::Cosine } else { MomentumSchedule::Constant };
        Self {
            name,
            momentum: 0.99,
            momentum_schedule: schedule,
            queue_size: 0,
            queue_shard: 0,
            shuffle_bn: false,
            predictor_hidden: 0,
        }
    }
}

impl MethodName {
    /// The `method.*` keys (besides `name`) that this method reads.
    pub fn keys(self) -> &'static [&'static str] {
        match self {
            MethodName::Simclr | MethodName::Clip => &[],
            MethodName::MocoV2 => &["queue_size", "momentum", "momentum_schedule", "shuffle_bn"],
            MethodName::Byol => &["momentum", "momentum_schedule", "predictor_hidden"],
            MethodName::Simsiam => &["predictor_hidden"],
        }
    }
}

/// The resolved, validated run.
#[derive(Debug, Clone, Serialize)]
pub struct Plan {
    /// The configuration it was made from (with overrides applied).
    #[serde(skip)]
    pub config: Config,
    /// The method and its resolved settings.
    pub method: MethodPlan,
    /// Loss family.
    pub loss: LossKind,
    /// Encoder normalisation.
    pub norm: Norm,
    /// Ranks P.
    pub world_size: usize,
    /// Local batch B = N / P.
    pub local_batch: usize,
    /// Global batch N.
    pub global_batch: usize,
    /// Negatives each anchor is contrasted with (over the global batch).
    pub negatives_per_anchor: usize,
    /// Optimiser steps.
    pub steps: usize,
    /// libtorch intra-op threads per rank.
    pub threads: usize,
    /// Where `threads` came from.
    pub threads_source: String,
    /// Data worker threads per rank.
    pub workers: usize,
    /// Peak learning rate after scaling.
    pub peak_lr: f64,
    /// The loss temperature in force (given, or the loss's default).
    pub temperature: f64,
}

/// Whether the data of a `dataset` kind at `root` is there: a CSV file, the
/// directory of a shard pattern (the shards are checked when indexed), or a directory.
fn root_exists(dataset: DatasetKind, root: &Path) -> bool {
    match dataset {
        DatasetKind::Csv => root.is_file(),
        DatasetKind::Webdataset => root.parent().map(|p| p.as_os_str().is_empty() || p.is_dir()).unwrap_or(false),
        DatasetKind::FashionMnist | DatasetKind::ImageFolder => root.is_dir(),
    }
}

impl Plan {
    /// Validate `config` for the given topology and derive every size.
    pub fn resolve(config: Config, topo: Topology) -> Result<Self, ConfigError> {
        let c = &config;
        let (method, loss) = resolve_method(c)?;
        check_loss(c, loss)?;
        check_given_keys(c, method, loss)?;
        let temperature = c.loss.temperature_for(loss);
        if !(temperature > 0.0) || !temperature.is_finite() {
            return Err(invalid("loss.temperature", format!("must be > 0, got {temperature}")));
        }
        check_model(c)?;
        check_data(c, loss)?;
        let p = topo.world_size.max(1);
        let global_batch = check_train(c, loss, p)?;
        let peak_lr = match c.train.optimizer.lr_scale {
            LrScale::Absolute => c.train.optimizer.lr,
            LrScale::Per256 => c.train.optimizer.lr * global_batch as f64 / 256.0,
        };
        check_eval(c)?;
        check_metrics(c, topo)?;
        check_text_and_mix(c, loss, global_batch, p)?;
        let m = resolve_method_plan(c, method, global_batch, p)?;
        let (threads, threads_source) = threads_of(c, topo);
        let workers = if c.data.workers > 0 { c.data.workers } else { threads.clamp(1, 4) };
        let negatives_per_anchor = match loss {
            LossKind::Clip | LossKind::SigLip => global_batch - 1,
            LossKind::BarlowTwins
            | LossKind::BarlowTwinsUnbiased
            | LossKind::NormalizedMse
            | LossKind::NegativeCosine => 0,
            LossKind::InfoNce => m.queue_size,
            k if k.is_metric() => global_batch - 1,
            _ => 2 * global_batch - 2,
        };
        Ok(Plan {
            method: m,
            loss,
            norm: c.model.norm,
            world_size: p,
            local_batch: global_batch / p,
            global_batch,
            negatives_per_anchor,
            steps: c.train.steps as usize,
            threads,
            threads_source,
            workers,
            peak_lr,
            temperature,
            config,
        })
    }

    /// The configuration as this plan resolved it, as YAML: every default filled
    /// in, the method's and the loss's names and temperature made explicit, and
    /// only the `loss.*`/`method.*` keys the chosen loss and method read (so the
    /// text loads back, with `Config::from_yaml`, into the same plan).
    pub fn resolved_yaml(&self) -> String {
        use serde_yaml_ng::Value;
        let mut v = serde_yaml_ng::to_value(&self.config).expect("a config serialises");
        let keep = |v: &mut Value, section: &str, name: Value, keys: &[&str]| {
            if let Some(Value::Mapping(m)) = v.get_mut(section) {
                m.retain(|k, _| k.as_str().is_some_and(|k| k == "name" || keys.contains(&k)));
                m.insert(Value::String("name".into()), name);
            }
        };
        let loss = serde_yaml_ng::to_value(self.loss).expect("a loss name serialises");
        keep(&mut v, "loss", loss, self.loss.keys());
        if self.loss.keys().contains(&"temperature") {
            v["loss"]["temperature"] = Value::from(self.temperature);
        }
        let method = serde_yaml_ng::to_value(self.method.name).expect("a method name serialises");
        keep(&mut v, "method", method, self.method.name.keys());
        shortest_f32(&mut v);
        serde_yaml_ng::to_string(&v).expect("YAML text")
    }

    /// One human-readable block of the derived sizes, printed at start.
    pub fn describe(&self) -> String {
        format!(
            "plan: loss={:?} temperature={} world_size={} local_batch={} global_batch={} negatives_per_anchor={} steps={} \
             threads/rank={} ({}) data_workers/rank={} peak_lr={:.6} norm={:?}",
            self.loss,
            self.temperature,
            self.world_size,
            self.local_batch,
            self.global_batch,
            self.negatives_per_anchor,
            self.steps,
            self.threads,
            self.threads_source,
            self.workers,
            self.peak_lr,
            self.norm
        ) + &self.describe_method()
    }

    /// The method's part of the plan line: its settings, and the queue shard each rank holds.
    fn describe_method(&self) -> String {
        let m = &self.method;
        let momentum = format!(" momentum={} ({:?})", m.momentum, m.momentum_schedule);
        match m.name {
            MethodName::Simclr | MethodName::Clip => format!(" method={:?}", m.name),
            MethodName::MocoV2 => format!(
                " method=MocoV2 queue_size={} queue_shard={}{momentum} shuffle_bn={}",
                m.queue_size, m.queue_shard, m.shuffle_bn
            ),
            MethodName::Byol => format!(" method=Byol predictor_hidden={}{momentum}", m.predictor_hidden),
            MethodName::Simsiam => format!(" method=Simsiam predictor_hidden={}", m.predictor_hidden),
        }
    }
}

/// The method and the loss: each defaults from the other (`clip` for an
/// image–text loss, `simclr` otherwise; a method's own loss when unset).
fn resolve_method(c: &Config) -> Result<(MethodName, LossKind), ConfigError> {
    let loss = c.loss.name;
    let method = c.method.name.unwrap_or(match loss {
        Some(l) if l.is_image_text() => MethodName::Clip,
        _ => MethodName::Simclr,
    });
    let own = match method {
        MethodName::Simclr => LossKind::NtXent,
        MethodName::Clip => LossKind::Clip,
        MethodName::MocoV2 => LossKind::InfoNce,
        MethodName::Byol => LossKind::NormalizedMse,
        MethodName::Simsiam => LossKind::NegativeCosine,
    };
    let loss = loss.unwrap_or(own);
    let fits = match method {
        MethodName::Simclr => !loss.is_image_text() && !loss.is_method_own(),
        MethodName::Clip => loss.is_image_text(),
        _ => loss == own,
    };
    if !fits {
        return Err(invalid("loss.name", format!("{loss:?} is not a loss of method {method:?} (its loss is {own:?})")));
    }
    Ok((method, loss))
}

/// A `loss.*` or `method.*` key set in the file or an override that the chosen loss or method does not read.
fn check_given_keys(c: &Config, method: MethodName, loss: LossKind) -> Result<(), ConfigError> {
    for key in &c.given {
        let Some((section, leaf)) = key.split_once('.') else { continue };
        let applies = match section {
            "loss" => leaf == "name" || loss.keys().contains(&leaf),
            "method" => leaf == "name" || method.keys().contains(&leaf),
            _ => true,
        };
        if !applies {
            return Err(ConfigError::NotApplicable {
                key: key.clone(),
                what: if section == "loss" { format!("loss {loss:?}") } else { format!("method {method:?}") },
            });
        }
    }
    Ok(())
}

fn check_loss(c: &Config, loss: LossKind) -> Result<(), ConfigError> {
    if !(0.0..1.0).contains(&c.loss.tau_plus) {
        return Err(invalid("loss.tau_plus", format!("must lie in [0, 1), got {}", c.loss.tau_plus)));
    }
    if !(c.loss.beta >= 0.0) {
        return Err(invalid("loss.beta", format!("must be ≥ 0, got {}", c.loss.beta)));
    }
    if !(c.loss.lambda >= 0.0) {
        return Err(invalid("loss.lambda", format!("must be ≥ 0, got {}", c.loss.lambda)));
    }
    if !(c.loss.sigma > 0.0) {
        return Err(invalid("loss.sigma", format!("must be > 0, got {}", c.loss.sigma)));
    }
    for (key, v) in
        [("loss.margin", c.loss.margin), ("loss.pos_margin", c.loss.pos_margin), ("loss.neg_margin", c.loss.neg_margin)]
    {
        if !(v >= 0.0) {
            return Err(invalid(key, format!("a margin must be ≥ 0, got {v}")));
        }
    }
    if !(c.loss.noise_size >= 1.0) {
        return Err(invalid("loss.noise_size", format!("must be ≥ 1, got {}", c.loss.noise_size)));
    }
    if !(c.loss.l2_reg >= 0.0) {
        return Err(invalid("loss.l2_reg", format!("must be ≥ 0, got {}", c.loss.l2_reg)));
    }
    if matches!(loss, LossKind::BarlowTwins | LossKind::BarlowTwinsUnbiased) && c.train.global_batch < 2 {
        return Err(invalid("train.global_batch", "Barlow Twins standardises over the batch: need at least 2"));
    }
    Ok(())
}

fn check_model(c: &Config) -> Result<(), ConfigError> {
    if c.model.encoder != "convnet" {
        return Err(invalid("model.encoder", format!("`{}` is not a known encoder (convnet)", c.model.encoder)));
    }
    for (key, v) in [
        ("model.width", c.model.width),
        ("model.embed_dim", c.model.embed_dim),
        ("model.proj_dim", c.model.proj_dim),
        ("model.proj_hidden", c.model.proj_hidden),
        ("model.text.width", c.model.text.width),
        ("model.text.layers", c.model.text.layers),
        ("model.text.heads", c.model.text.heads),
    ] {
        if v <= 0 {
            return Err(invalid(key, format!("must be positive, got {v}")));
        }
    }
    if c.model.embed_dim % (POOL_GRID * POOL_GRID) != 0 {
        return Err(invalid(
            "model.embed_dim",
            format!(
                "{} is not a multiple of {} (a {POOL_GRID}×{POOL_GRID} grid of channels)",
                c.model.embed_dim,
                POOL_GRID * POOL_GRID
            ),
        ));
    }
    if c.model.text.width % c.model.text.heads != 0 {
        return Err(invalid(
            "model.text.heads",
            format!("{} heads do not divide model.text.width {}", c.model.text.heads, c.model.text.width),
        ));
    }
    if c.model.text.context < 8 {
        return Err(invalid("model.text.context", format!("must be ≥ 8, got {}", c.model.text.context)));
    }
    Ok(())
}

fn check_data(c: &Config, loss: LossKind) -> Result<(), ConfigError> {
    if c.data.dataset == DatasetKind::Csv && c.data.csv_separator.len() != 1 && c.data.csv_separator != "auto" {
        return Err(invalid(
            "data.csv_separator",
            format!("must be one character or `auto`, got {:?}", c.data.csv_separator),
        ));
    }
    if !(0.0..=1.0).contains(&c.data.max_bad_fraction) {
        return Err(invalid("data.max_bad_fraction", format!("must lie in [0, 1], got {}", c.data.max_bad_fraction)));
    }
    if c.data.image_size < 8 {
        return Err(invalid("data.image_size", format!("must be ≥ 8, got {}", c.data.image_size)));
    }
    if c.data.aug.randaugment_m > 30 {
        return Err(invalid("data.aug.randaugment_m", format!("must lie in 0..=30, got {}", c.data.aug.randaugment_m)));
    }
    if !(0.0..=0.5).contains(&c.data.aug.hue) {
        return Err(invalid("data.aug.hue", format!("must lie in [0, 0.5], got {}", c.data.aug.hue)));
    }
    let preset = c.data.augment;
    if matches!(preset, AugmentPreset::Mocov2 | AugmentPreset::Byol) && !c.data.dataset.is_files() {
        return Err(invalid("data.augment", format!("`{}` is an RGB preset: use a file dataset", preset.as_str())));
    }
    if c.data.augment == AugmentPreset::Swav {
        if loss != LossKind::NtXent {
            return Err(invalid(
                "data.augment",
                format!("multi-crop (swav) views train with ntxent (multi-positive), not {loss:?}"),
            ));
        }
        if c.data.mix != MixName::None {
            return Err(invalid("data.mix", "mixing and multi-crop do not combine"));
        }
    }
    if !root_exists(c.data.dataset, &c.data.root) {
        return Err(invalid(
                "data.root",
                format!(
                    "{} does not exist (for fashion_mnist install Debian's dataset-fashion-mnist or point data.root at IDX files)",
                    c.data.root.display()
                ),
            ));
    }
    if c.data.dataset == DatasetKind::Csv && loss.is_supervised() {
        return Err(invalid(
            "loss.name",
            format!("{loss:?} needs class labels, and a caption CSV has none (use an image folder or labelled shards)"),
        ));
    }
    if c.data.workers > MAX_WORKERS {
        return Err(invalid("data.workers", format!("at most {MAX_WORKERS}, got {}", c.data.workers)));
    }
    if c.data.prefetch > MAX_PREFETCH {
        return Err(invalid("data.prefetch", format!("at most {MAX_PREFETCH}, got {}", c.data.prefetch)));
    }
    if c.data.prefetch == 0 {
        return Err(invalid("data.prefetch", "must be ≥ 1"));
    }
    check_aug(c)
}

/// `data.aug.*`.
fn check_aug(c: &Config) -> Result<(), ConfigError> {
    let a = &c.data.aug;
    if !(0.0 < a.crop_scale[0] && a.crop_scale[0] <= a.crop_scale[1] && a.crop_scale[1] <= 1.0) {
        return Err(invalid("data.aug.crop_scale", format!("need 0 < lo ≤ hi ≤ 1, got {:?}", a.crop_scale)));
    }
    if !(0.0 < a.crop_ratio[0] && a.crop_ratio[0] <= a.crop_ratio[1]) {
        return Err(invalid("data.aug.crop_ratio", format!("need 0 < lo ≤ hi, got {:?}", a.crop_ratio)));
    }
    for (key, p) in [
        ("data.aug.flip_prob", a.flip_prob),
        ("data.aug.jitter_prob", a.jitter_prob),
        ("data.aug.blur_prob", a.blur_prob),
    ] {
        if !(0.0..=1.0).contains(&p) {
            return Err(invalid(key, format!("a probability must lie in [0, 1], got {p}")));
        }
    }
    if !(0.0 < a.blur_sigma[0] && a.blur_sigma[0] <= a.blur_sigma[1] && a.blur_sigma[1] <= MAX_BLUR_SIGMA) {
        return Err(invalid(
            "data.aug.blur_sigma",
            format!("need 0 < lo ≤ hi ≤ {MAX_BLUR_SIGMA}, got {:?}", a.blur_sigma),
        ));
    }

    Ok(())
}

/// Train keys; returns the global batch.
fn check_train(c: &Config, loss: LossKind, p: usize) -> Result<usize, ConfigError> {
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
    if t.steps <= 0 {
        return Err(invalid("train.steps", format!("must be positive, got {}", t.steps)));
    }
    if t.log_every <= 0 {
        return Err(invalid("train.log_every", format!("must be positive, got {}", t.log_every)));
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

fn check_metrics(c: &Config, topo: Topology) -> Result<(), ConfigError> {
    let m = &c.metrics;
    let Some((_, port)) = m.host_port() else {
        return Err(invalid("metrics.listen", format!("expected host:port, got `{}`", m.listen)));
    };
    if port as usize + topo.local_size > 65536 {
        return Err(invalid(
            "metrics.listen",
            format!("base port {port} + {} ranks on this host runs past 65535", topo.local_size),
        ));
    }
    if m.textfile_every <= 0 {
        return Err(invalid("metrics.textfile_every", format!("must be positive, got {}", m.textfile_every)));
    }
    Ok(())
}

fn check_eval(c: &Config) -> Result<(), ConfigError> {
    if let Some(best) = &c.checkpoint.best {
        if !BEST_METRICS.contains(&best.as_str()) {
            return Err(invalid("checkpoint.best", format!("`{best}` is none of {BEST_METRICS:?}")));
        }
        if !c.eval.at_end && c.eval.every <= 0 {
            return Err(invalid("checkpoint.best", "needs evaluations: set eval.every or eval.at_end"));
        }
    }
    if c.checkpoint.every < 0 {
        return Err(invalid("checkpoint.every", format!("must be ≥ 0, got {}", c.checkpoint.every)));
    }
    if c.eval.every < 0 {
        return Err(invalid("eval.every", format!("must be ≥ 0, got {}", c.eval.every)));
    }
    if !(0..=100_000).contains(&c.eval.linear_probe_steps) {
        return Err(invalid(
            "eval.linear_probe_steps",
            format!("must lie in [0, 100000], got {}", c.eval.linear_probe_steps),
        ));
    }
    if c.eval.knn_k <= 0 {
        return Err(invalid("eval.knn_k", format!("must be positive, got {}", c.eval.knn_k)));
    }
    if !(c.eval.knn_t > 0.0) {
        return Err(invalid("eval.knn_t", format!("must be > 0, got {}", c.eval.knn_t)));
    }
    let eval_dataset = c.eval.dataset.unwrap_or(c.data.dataset);
    if c.data.dataset.is_files() != eval_dataset.is_files() {
        return Err(invalid(
            "eval.dataset",
            format!("{eval_dataset:?} images do not fit an encoder trained on {:?}", c.data.dataset),
        ));
    }
    if let Some(root) = c.eval.root.as_ref().filter(|_| eval_dataset.is_files()) {
        if !root_exists(eval_dataset, root) {
            return Err(invalid("eval.root", format!("{} does not exist", root.display())));
        }
    }

    Ok(())
}

fn check_text_and_mix(c: &Config, loss: LossKind, global_batch: usize, p: usize) -> Result<(), ConfigError> {
    let ta = &c.data.text;
    if ta.tokenizer != "bytes" && !Path::new(&ta.tokenizer).is_file() {
        return Err(invalid(
            "data.text.tokenizer",
            format!("`{}` is neither `bytes` nor a tokenizer.json file", ta.tokenizer),
        ));
    }
    if !(0.0..1.0).contains(&ta.eda_alpha) {
        return Err(invalid("data.text.eda_alpha", format!("must lie in [0, 1), got {}", ta.eda_alpha)));
    }
    if ta.eda_alpha > 0.0 && !ta.synonyms.as_ref().is_some_and(|p| p.is_file()) {
        return Err(invalid(
            "data.text.synonyms",
            format!("EDA needs a synonym file; {:?} is not a file", ta.synonyms),
        ));
    }
    if !(0.0..=1.0).contains(&ta.cutoff_ratio) {
        return Err(invalid("data.text.cutoff_ratio", format!("must lie in [0, 1], got {}", ta.cutoff_ratio)));
    }
    match c.data.mix {
        MixName::None => {}
        MixName::Mixup | MixName::Cutmix => {
            if !matches!(loss, LossKind::NtXent | LossKind::SupCon) {
                return Err(invalid("data.mix", format!("soft targets exist for ntxent and supcon, not {loss:?}")));
            }
            if !(c.data.mix_alpha > 0.0) {
                return Err(invalid("data.mix_alpha", format!("must be > 0, got {}", c.data.mix_alpha)));
            }
            let b = global_batch / p;
            if c.data.mix_group == 0 || b % c.data.mix_group != 0 {
                return Err(invalid(
                    "data.mix_group",
                    format!(
                        "{} does not divide the local batch {b} (global {global_batch} over {p} ranks)",
                        c.data.mix_group
                    ),
                ));
            }
        }
    }
    Ok(())
}

/// libtorch threads per rank and where the number came from.
fn threads_of(c: &Config, topo: Topology) -> (usize, String) {
    let t = &c.train;
    let local_size = topo.local_size.max(1);
    if t.threads > 0 {
        (t.threads, "train.threads".to_string())
    } else {
        let share = (topo.host_cores / local_size).max(1);
        let n = share.min(topo.rank_cores.max(1));
        (
            n,
            format!(
                "min({} host cores ÷ {} local ranks, {} cores bound to this rank)",
                topo.host_cores, local_size, topo.rank_cores
            ),
        )
    }
}

/// The method's resolved settings, checked against the global batch and world size.
fn resolve_method_plan(c: &Config, name: MethodName, n: usize, p: usize) -> Result<MethodPlan, ConfigError> {
    let m = &c.method;
    let momentum = m.momentum.unwrap_or(0.99);
    if !(0.0..1.0).contains(&momentum) {
        return Err(invalid("method.momentum", format!("must lie in [0, 1), got {momentum}")));
    }
    let defaults = MethodPlan::of(name);
    let mut plan = MethodPlan {
        momentum,
        momentum_schedule: m.momentum_schedule.unwrap_or(defaults.momentum_schedule),
        shuffle_bn: m.shuffle_bn,
        predictor_hidden: m.predictor_hidden.unwrap_or(0),
        ..defaults
    };
    match name {
        MethodName::MocoV2 => {
            if m.queue_size == 0 || m.queue_size % n != 0 {
                return Err(invalid(
                    "method.queue_size",
                    format!("{} is not a positive multiple of the global batch {n}", m.queue_size),
                ));
            }
            if m.shuffle_bn && c.model.norm != Norm::Batch {
                return Err(invalid(
                    "method.shuffle_bn",
                    format!("shuffles batch statistics, but model.norm is {:?}: set model.norm: batch", c.model.norm),
                ));
            }
            (plan.queue_size, plan.queue_shard) = (m.queue_size, m.queue_size / p);
        }
        MethodName::Byol | MethodName::Simsiam => {
            match m.predictor_hidden {
                Some(h) if h > 0 => {}
                other => {
                    return Err(invalid(
                        "method.predictor_hidden",
                        format!("{name:?} needs the predictor's hidden width (a positive integer), got {other:?}"),
                    ))
                }
            }
            if n < 2 {
                return Err(invalid(
                    "train.global_batch",
                    format!("{name:?}'s batch-norm heads need at least 2 samples"),
                ));
            }
        }
        MethodName::Simclr | MethodName::Clip => {}
    }
    Ok(plan)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn topo(p: usize) -> Topology {
        Topology { world_size: p, local_size: p, host_cores: 2, rank_cores: 2 }
    }

    fn with_root(mut c: Config) -> Config {
        c.data.root = std::env::temp_dir();
        c
    }

    #[test]
    fn unknown_key_is_named_with_file() {
        let err = Config::from_yaml("train:\n  global_bacth: 4\n", "x.yaml").unwrap_err().to_string();
        assert!(err.contains("x.yaml") && err.contains("global_bacth"), "{err}");
        let err = Config::from_yaml("bogus: 1\n", "y.yaml").unwrap_err().to_string();
        assert!(err.contains("bogus"), "{err}");
    }

    #[test]
    fn negative_and_indivisible_batches_fail() {
        let c = with_root(Config::from_yaml("train: {global_batch: -8}", "f").unwrap());
        let err = Plan::resolve(c, topo(2)).unwrap_err().to_string();
        assert!(err.contains("train.global_batch") && err.contains("-8"), "{err}");
        let c = with_root(Config::from_yaml("train: {global_batch: 10}", "f").unwrap());
        let err = Plan::resolve(c, topo(4)).unwrap_err().to_string();
        assert!(err.contains("not divisible by the world size 4"), "{err}");
    }

    #[test]
    fn missing_data_dir_fails() {
        let c = Config::from_yaml("data: {root: /definitely/not/here}", "f").unwrap();
        let err = Plan::resolve(c, topo(1)).unwrap_err().to_string();
        assert!(err.contains("data.root") && err.contains("/definitely/not/here"), "{err}");
    }

    #[test]
    fn overrides_and_derived_sizes() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("c.yaml");
        std::fs::write(&f, "train:\n  global_batch: 64\n").unwrap();
        let mut c = Config::load(
            &f,
            &["train.optimizer.lr=0.5".into(), "train.optimizer.lr_scale=per_256".into(), "loss.name=clip".into()],
        )
        .unwrap();
        c.data.root = dir.path().into();
        let p = Plan::resolve(c, topo(4)).unwrap();
        assert_eq!(p.local_batch, 16);
        assert_eq!(p.negatives_per_anchor, 63);
        assert!((p.peak_lr - 0.125).abs() < 1e-12);
        assert_eq!(p.threads, 1);
        let err = Config::load(&f, &["train.bogus=1".into()]).unwrap_err().to_string();
        assert!(err.contains("bogus") && err.contains("--set"), "{err}");
        for (name, kind) in [
            ("supcon", LossKind::SupCon),
            ("siglip", LossKind::SigLip),
            ("hard_negative", LossKind::HardNegative),
            ("nt_xent", LossKind::NtXent),
        ] {
            assert_eq!(LossKind::parse(name), Some(kind));
        }
        assert!(Config::load(&f, &["novalue".into()]).is_err());
    }

    #[test]
    fn bad_enum_values_name_the_key() {
        for (yaml, key) in [
            ("model: {norm: batchy}", "model.norm"),
            ("loss: {temperature: 0}", "loss.temperature"),
            ("loss: {name: foo}", "loss.name"),
            ("loss: {name: debiased, tau_plus: 1.0}", "loss.tau_plus"),
            ("loss: {name: dclw, sigma: 0}", "loss.sigma"),
            ("loss: {name: triplet, margin: -0.1}", "loss.margin"),
            ("loss: {name: triplet, mining: hardest}", "loss.mining"),
            ("train: {optimizer: {lr_scale: x}}", "train.optimizer.lr_scale"),
            ("train: {optimizer: {name: adam}}", "train.optimizer.name"),
            ("method: {name: mocov3}", "method.name"),
            ("train: {optimizer: {betas: [0.9, 1.0]}}", "train.optimizer.betas"),
            ("train: {optimizer: {eps: 0}}", "train.optimizer.eps"),
            ("train: {schedule: {final_lr_frac: 2}}", "train.schedule.final_lr_frac"),
            ("data: {workers: 100000}", "data.workers"),
            ("data: {prefetch: 100000000}", "data.prefetch"),
            ("data: {aug: {blur_sigma: [0.1, 1.0e9]}}", "data.aug.blur_sigma"),
        ] {
            // A closed choice fails when parsed, a bad number when resolved; both name the key.
            let err = match Config::from_yaml(yaml, "f") {
                Err(e) => e.to_string(),
                Ok(c) => Plan::resolve(with_root(c), topo(1)).unwrap_err().to_string(),
            };
            assert!(err.contains(key), "{yaml}: {err}");
        }
    }

    fn resolve(yaml: &str, p: usize) -> Result<Plan, ConfigError> {
        Plan::resolve(with_root(Config::from_yaml(yaml, "f").unwrap()), topo(p))
    }

    #[test]
    fn supervised_losses_refuse_data_without_labels() {
        let dir = tempfile::tempdir().unwrap();
        let csv = dir.path().join("pairs.csv");
        std::fs::write(&csv, "filepath\ttitle\na.png\ta cat\n").unwrap();
        for loss in ["supcon", "triplet"] {
            let yaml = format!("data: {{dataset: csv, root: {}}}\nloss: {{name: {loss}}}", csv.display());
            let err = Plan::resolve(Config::from_yaml(&yaml, "f").unwrap(), topo(1)).unwrap_err().to_string();
            assert!(err.contains("loss.name") && err.contains("no") && err.contains("labels"), "{err}");
        }
        let yaml = format!("data: {{dataset: csv, root: {}}}\nloss: {{name: clip}}", csv.display());
        Plan::resolve(Config::from_yaml(&yaml, "f").unwrap(), topo(1)).unwrap();
    }

    #[test]
    fn keys_that_do_not_apply_are_errors() {
        for (yaml, key) in [
            ("loss: {margin: 0.2}", "loss.margin"),
            ("loss: {name: barlow_twins, temperature: 0.1}", "loss.temperature"),
            ("method: {queue_size: 512}", "method.queue_size"),
            ("method: {name: simsiam, predictor_hidden: 8, momentum: 0.9}", "method.momentum"),
            ("method: {name: moco_v2, predictor_hidden: 8}", "method.predictor_hidden"),
        ] {
            let err = resolve(yaml, 1).unwrap_err().to_string();
            assert!(err.contains(key) && err.contains("does not apply"), "{yaml}: {err}");
        }
        // The same keys where they apply.
        resolve("loss: {name: triplet, margin: 0.2}", 1).unwrap();
        resolve("method: {name: moco_v2, queue_size: 512, momentum: 0.9}\ntrain: {global_batch: 256}", 1).unwrap();
    }

    #[test]
    fn methods_resolve_their_loss_and_check_their_keys() {
        let p = resolve("method: {name: moco_v2, queue_size: 1024}\ntrain: {global_batch: 256}", 4).unwrap();
        assert_eq!((p.loss, p.method.queue_shard, p.temperature), (LossKind::InfoNce, 256, 0.2));
        assert!(p.describe().contains("queue_shard=256"), "{}", p.describe());
        assert_eq!(p.method.momentum_schedule, MomentumSchedule::Constant);
        let p = resolve("method: {name: byol, predictor_hidden: 64}", 1).unwrap();
        assert_eq!((p.loss, p.method.momentum_schedule), (LossKind::NormalizedMse, MomentumSchedule::Cosine));
        assert_eq!(resolve("loss: {name: siglip}", 1).unwrap().method.name, MethodName::Clip);
        for (yaml, p, key) in [
            ("method: {name: moco_v2, queue_size: 1000}\ntrain: {global_batch: 256}", 1, "method.queue_size"),
            ("method: {name: moco_v2, momentum: 1.0}", 1, "method.momentum"),
            ("method: {name: moco_v2, momentum: -0.1}", 1, "method.momentum"),
            ("method: {name: moco_v2, shuffle_bn: true}", 1, "method.shuffle_bn"),
            ("method: {name: byol}", 1, "method.predictor_hidden"),
            ("method: {name: simsiam, predictor_hidden: 0}", 1, "method.predictor_hidden"),
            ("method: {name: byol, predictor_hidden: 8}\ntrain: {global_batch: 1}", 1, "train.global_batch"),
            ("method: {name: moco_v2}\nloss: {name: ntxent}", 1, "loss.name"),
            ("method: {name: simclr}\nloss: {name: clip}", 1, "loss.name"),
        ] {
            let err = resolve(yaml, p).unwrap_err().to_string();
            assert!(err.contains(key), "{yaml}: {err}");
        }
    }

    #[test]
    fn deep_or_huge_yaml_is_refused_before_parsing() {
        let t0 = std::time::Instant::now();
        let deep = format!("a: {}{}\n", "[".repeat(100_000), "]".repeat(100_000));
        let err = Config::from_yaml(&deep, "deep.yaml").unwrap_err().to_string();
        assert!(err.contains("deep.yaml") && err.contains("levels deep"), "{err}");
        let block: String = (0..200).map(|i| format!("{}k:\n", "  ".repeat(i))).collect();
        assert!(Config::from_yaml(&block, "b.yaml").unwrap_err().to_string().contains("levels deep"));
        let dashes = format!("a:\n{}x\n", "- ".repeat(100));
        assert!(Config::from_yaml(&dashes, "d.yaml").unwrap_err().to_string().contains("levels deep"));
        let huge = format!("seed: 1\n#{}\n", "x".repeat(MAX_CONFIG_BYTES));
        assert!(Config::from_yaml(&huge, "h.yaml").unwrap_err().to_string().contains("at most"));
        assert!(t0.elapsed() < std::time::Duration::from_secs(2), "refused early");
        // Brackets in quotes and comments do not count; shipped-style configs pass.
        assert!(
            check_yaml_shape(&format!("a: \"{}\" # {}\nb: [1, {{c: 2}}]\n", "[".repeat(100), "{".repeat(100))).is_ok()
        );
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("c.yaml");
        std::fs::write(&f, "seed: 1\n").unwrap();
        let err = Config::load(&f, &[format!("train.steps={}", "[".repeat(1000))]).unwrap_err().to_string();
        assert!(err.contains("--set train.steps") && err.contains("levels deep"), "{err}");
    }

    #[test]
    fn the_resolved_yaml_loads_back_into_the_same_plan() {
        let topo = Topology { world_size: 2, local_size: 2, host_cores: 2, rank_cores: 1 };
        let dir = tempfile::tempdir().unwrap();
        for yaml in [
            "loss: {name: triplet, margin: 0.3}\n",
            "method: {name: moco_v2, queue_size: 512}\nloss: {name: infonce}\ntrain: {global_batch: 64}\n",
            "loss: {name: clip}\n",
        ] {
            let text = format!("data: {{root: {}}}\n{yaml}", dir.path().display());
            let plan = Plan::resolve(Config::from_yaml(&text, "a.yaml").unwrap(), topo).unwrap();
            let resolved = plan.resolved_yaml();
            let again = Plan::resolve(Config::from_yaml(&resolved, "config.yaml").unwrap(), topo)
                .unwrap_or_else(|e| panic!("{e}\n{resolved}"));
            assert_eq!(again.describe(), plan.describe());
            assert_eq!(again.resolved_yaml(), resolved, "a fixed point");
            assert!(resolved.contains("seed:") && resolved.contains("metrics:"), "every default is written");
        }
    }
}
