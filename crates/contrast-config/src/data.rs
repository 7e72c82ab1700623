//! `data.*`: the dataset, the augmentation preset and its parameters, caption
//! augmentation and batch mixing — keys, defaults and checks.

use crate::applies::Rules;
use crate::{invalid, Config, ConfigError, LossKind};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// Most data worker threads per rank (`data.workers`).
pub const MAX_WORKERS: usize = 256;
/// Most batches in flight per rank (`data.prefetch`).
pub const MAX_PREFETCH: usize = 1024;
/// The largest `data.image_size` (and `data.small_size`): a 4096² RGB view is 201 MB of f32.
pub const MAX_IMAGE_SIDE: u64 = 4096;

/// Largest blur σ in pixels (`data.aug.blur_sigma`): the kernel radius is ⌈3σ⌉.
pub const MAX_BLUR_SIGMA: f32 = 64.0;

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
    /// WebDataset: where the shards' member indexes are cached (none: beside
    /// each shard, as `<shard>.contrast-index`), for read-only dataset mounts.
    pub index_dir: Option<PathBuf>,
    /// Stop when more than this fraction of the samples cannot be read or decoded.
    pub max_bad_fraction: f64,
    /// File datasets: the largest image file or shard member read, in bytes
    /// (refused from its size before reading: a bad sample).
    pub max_image_bytes: u64,
    /// File datasets: the largest caption, label or JSON member read, in bytes.
    pub max_text_bytes: u64,
    /// File datasets: the most pixels an image may decode to, read from its
    /// header before decoding (PIL's `MAX_IMAGE_PIXELS`).
    pub max_image_pixels: u64,
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
    /// CIFAR-10: the Python pickle or binary batches (`data.root` holds them or their folder).
    Cifar10,
    /// CIFAR-100 (fine labels), pickle or binary.
    Cifar100,
    /// Sentences, one per line of a text file: `text`, `label<TAB>text` or
    /// `label<TAB>group<TAB>text` (text-only methods: SimCSE, Quick-Thought).
    Lines,
}

impl DatasetKind {
    /// True for decoded RGB images (image folders, CSV, shards, CIFAR).
    pub fn is_files(self) -> bool {
        !matches!(self, DatasetKind::FashionMnist | DatasetKind::Lines)
    }

    /// True for IDX images (grayscale, read whole at start).
    pub fn is_idx(self) -> bool {
        self == DatasetKind::FashionMnist
    }

    /// True for sentences (`lines`): no image at all.
    pub fn is_lines(self) -> bool {
        self == DatasetKind::Lines
    }

    /// True for formats whose samples are compressed images to decode (PNG,
    /// JPEG): their data workers keep cores busy, so the thread budget counts them.
    pub fn decodes_images(self) -> bool {
        matches!(self, DatasetKind::ImageFolder | DatasetKind::Csv | DatasetKind::Webdataset)
    }

    /// True when `data.root` also holds the labelled test split (IDX `t10k`,
    /// CIFAR's test batch), so evaluation needs no `eval.root`.
    pub fn has_test_split(self) -> bool {
        matches!(self, DatasetKind::FashionMnist | DatasetKind::Cifar10 | DatasetKind::Cifar100)
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
            index_dir: None,
            max_bad_fraction: 0.01,
            max_image_bytes: 256 << 20,
            max_text_bytes: 4 << 20,
            max_image_pixels: 178_956_970,
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
    /// A RandAugment schedule to replay (a JSON list of `{step, n, m}` phases,
    /// as population-based augmentation writes it): step s takes the (N, M) of
    /// the last phase starting at or before s, instead of `randaugment_n`/`_m`.
    pub randaugment_schedule: Option<PathBuf>,
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
            randaugment_schedule: None,
        }
    }
}

/// Whether the data of a `dataset` kind at `root` is there: a CSV file, the
/// directory of a shard pattern (the shards are checked when indexed), or a directory.
pub(crate) fn root_exists(dataset: DatasetKind, root: &Path) -> bool {
    match dataset {
        DatasetKind::Csv | DatasetKind::Lines => root.is_file(),
        DatasetKind::Webdataset => root.parent().map(|p| p.as_os_str().is_empty() || p.is_dir()).unwrap_or(false),
        DatasetKind::FashionMnist | DatasetKind::ImageFolder | DatasetKind::Cifar10 | DatasetKind::Cifar100 => {
            root.is_dir()
        }
    }
}

/// The `data.*` keys that the chosen dataset, preset, mixing and loss do not read.
pub(crate) fn rules(c: &Config, loss: LossKind, r: &mut Rules) {
    let d = &c.data;
    let lines = d.dataset.is_lines();
    let images = ["image_size", "max_image_bytes", "max_image_pixels", "augment", "aug", "mix", "small_crops"];
    r.keys("data", &images, "data.dataset: lines (sentences, no image)", lines);
    let eval_dataset = c.eval.dataset.unwrap_or(d.dataset);
    let csv = d.dataset == DatasetKind::Csv || eval_dataset == DatasetKind::Csv;
    r.keys("data", &["csv_img_key", "csv_caption_key", "csv_separator"], "a dataset that is not csv", !csv);
    let shards = d.dataset == DatasetKind::Webdataset || eval_dataset == DatasetKind::Webdataset;
    r.keys("data", &["index_dir"], "a dataset that is not webdataset", !shards);
    r.keys("data", &["image_size"], "fashion_mnist (its images are 28×28)", d.dataset.is_idx());
    let caps = ["max_image_bytes", "max_text_bytes", "max_image_pixels"];
    r.keys("data", &caps, "fashion_mnist (its IDX files are read whole at start)", d.dataset.is_idx());
    let preset = format!("data.augment: {}", d.augment.as_str());
    r.keys("data", &["small_crops", "small_size"], &preset, d.augment != AugmentPreset::Swav);
    r.keys("data", &["mix_alpha", "mix_group"], "data.mix: none", d.mix == MixName::None);
    // `data.aug` parameterises the `simclr` preset (and, for IDX, the views of `swav`).
    let reads_aug = match d.augment {
        AugmentPreset::Simclr => true,
        AugmentPreset::Swav => d.dataset.is_idx(),
        _ => false,
    };
    r.keys("data", &["aug"], &preset, !reads_aug);
    let rgb_only = ["saturation", "hue", "gray_prob", "solarize_prob", "autoaugment"];
    r.keys("data.aug", &rgb_only, "fashion_mnist (grayscale)", d.dataset.is_idx());
    let scheduled = d.aug.randaugment_schedule.is_some();
    r.keys("data.aug", &["randaugment_n", "randaugment_m"], "data.aug.randaugment_schedule", scheduled);
    r.keys("data", &["text"], &format!("loss {loss:?} on images (no captions)"), !loss.is_image_text() && !lines);
    let t = &d.text;
    r.keys("data.text", &["synonyms"], "data.text.eda_alpha: 0", t.eda_alpha == 0.0);
    r.keys("data.text", &["cutoff_ratio"], "data.text.cutoff: none", t.cutoff == CutoffName::None);
}

/// `data.*`, except the caption and mixing keys ([`check_text_and_mix`]).
pub(crate) fn check(c: &Config, loss: LossKind, accepts_augment: bool, method: &str) -> Result<(), ConfigError> {
    let d = &c.data;
    if d.dataset == DatasetKind::Csv && d.csv_separator.len() != 1 && d.csv_separator != "auto" {
        return Err(invalid(
            "data.csv_separator",
            format!("must be one character or `auto`, got {:?}", d.csv_separator),
        ));
    }
    for (key, v) in [
        ("max_image_bytes", d.max_image_bytes),
        ("max_text_bytes", d.max_text_bytes),
        ("max_image_pixels", d.max_image_pixels),
    ] {
        if v == 0 || v > 1 << 40 {
            return Err(invalid(format!("data.{key}"), format!("must lie in [1, 2^40], got {v}")));
        }
    }
    if !(0.0..=1.0).contains(&d.max_bad_fraction) {
        return Err(invalid("data.max_bad_fraction", format!("must lie in [0, 1], got {}", d.max_bad_fraction)));
    }
    if d.image_size < 8 {
        return Err(invalid("data.image_size", format!("must be ≥ 8, got {}", d.image_size)));
    }
    // One view of one sample is 3·S² f32.
    let side = |s: u32| 3 * 4 * s as u64;
    crate::within_ceiling(
        "data.image_size",
        d.image_size as u64,
        MAX_IMAGE_SIDE,
        side(d.image_size),
        "one RGB view's side (3·S² f32 per view)",
    )?;
    crate::within_ceiling(
        "data.small_size",
        d.small_size as u64,
        MAX_IMAGE_SIDE,
        side(d.small_size),
        "one small crop's side",
    )?;
    crate::within_ceiling(
        "data.small_crops",
        d.small_crops as u64,
        64,
        3 * 4 * 96 * 96,
        "the small crops of one sample",
    )?;
    crate::within_ceiling("data.prefetch", d.prefetch as u64, MAX_PREFETCH as u64, 1, "ready batches")?;
    let preset = d.augment;
    if matches!(preset, AugmentPreset::Mocov2 | AugmentPreset::Byol) && d.dataset.is_idx() {
        return Err(invalid("data.augment", format!("`{}` is an RGB preset: use a file dataset", preset.as_str())));
    }
    if !accepts_augment && !d.dataset.is_lines() {
        return Err(invalid(
            "data.augment",
            format!("method {method} with loss {loss:?} does not train on the `{}` preset", preset.as_str()),
        ));
    }
    if preset == AugmentPreset::Swav && d.mix != MixName::None {
        return Err(invalid("data.mix", "mixing and multi-crop do not combine"));
    }
    if d.root.as_os_str().to_string_lossy().trim().is_empty() {
        return Err(invalid("data.root", "is empty: name the training data"));
    }
    if !root_exists(d.dataset, &d.root) {
        return Err(invalid(
            "data.root",
            format!(
                "{} does not exist ({})",
                d.root.display(),
                match d.dataset {
                    DatasetKind::FashionMnist =>
                        "install Debian's dataset-fashion-mnist or point data.root at IDX files",
                    DatasetKind::Lines => "launch/setup.sh writes the fortunes corpus to data/fortunes/",
                    _ => "point data.root at the dataset",
                }
            ),
        ));
    }
    if d.dataset == DatasetKind::Csv && loss.is_supervised() {
        return Err(invalid(
            "loss.name",
            format!("{loss:?} needs class labels, and a caption CSV has none (use an image folder or labelled shards)"),
        ));
    }
    if d.workers > MAX_WORKERS {
        return Err(invalid("data.workers", format!("at most {MAX_WORKERS}, got {}", d.workers)));
    }
    if d.prefetch > MAX_PREFETCH {
        return Err(invalid("data.prefetch", format!("at most {MAX_PREFETCH}, got {}", d.prefetch)));
    }
    if d.prefetch == 0 {
        return Err(invalid("data.prefetch", "must be ≥ 1"));
    }
    check_aug(&d.aug)
}

/// `data.aug.*`.
fn check_aug(a: &AugConfig) -> Result<(), ConfigError> {
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
    // torchvision's ColorJitter: brightness, contrast and saturation are non-negative.
    for (key, x) in [
        ("data.aug.brightness", a.brightness),
        ("data.aug.contrast", a.contrast),
        ("data.aug.saturation", a.saturation),
    ] {
        if !(0.0..=100.0).contains(&x) {
            return Err(invalid(key, format!("must lie in [0, 100] (torchvision: non-negative), got {x}")));
        }
    }
    for (key, p) in [("data.aug.gray_prob", a.gray_prob), ("data.aug.solarize_prob", a.solarize_prob)] {
        if !(0.0..=1.0).contains(&p) {
            return Err(invalid(key, format!("a probability must lie in [0, 1], got {p}")));
        }
    }
    if a.crop_ratio[1] > 100.0 {
        return Err(invalid(
            "data.aug.crop_ratio",
            format!("the aspect ratio must be at most 100, got {:?}", a.crop_ratio),
        ));
    }
    if let Some(p) = a.randaugment_schedule.as_ref().filter(|p| !p.is_file()) {
        return Err(invalid("data.aug.randaugment_schedule", format!("{} does not exist", p.display())));
    }
    if a.randaugment_n > 16 {
        return Err(invalid("data.aug.randaugment_n", format!("must lie in 0..=16, got {}", a.randaugment_n)));
    }
    if a.randaugment_m > 30 {
        return Err(invalid("data.aug.randaugment_m", format!("must lie in 0..=30, got {}", a.randaugment_m)));
    }
    if !(0.0..=0.5).contains(&a.hue) {
        return Err(invalid("data.aug.hue", format!("must lie in [0, 0.5], got {}", a.hue)));
    }
    Ok(())
}

/// `data.text.*` and the mixing keys.
pub(crate) fn check_text_and_mix(c: &Config, loss: LossKind, global_batch: usize, p: usize) -> Result<(), ConfigError> {
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
    if c.data.mix == MixName::None {
        return Ok(());
    }
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
            format!("{} does not divide the local batch {b} (global {global_batch} over {p} ranks)", c.data.mix_group),
        ));
    }
    Ok(())
}
