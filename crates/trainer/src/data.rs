//! From the plan to the data: the augmentation presets of each view (IDX and
//! RGB), batch-level mixing, the training input, the caption tokenizer and
//! mode, and the evaluation sets.

use crate::eval::{EvalData, EvalSet, LineSet, ViewAug};
use anyhow::{bail, Context, Result};
use contrast_config::{AugmentPreset, CutoffName, DatasetKind, MixName, Plan};
use contrast_data::idx::{Images, FASHION_MNIST_CLASSES, FASHION_MNIST_MEAN_STD};
use contrast_data::lines::Corpus;
use contrast_data::pipeline::Input;
use contrast_data::rgb::{small_crop_side, RgbAugParams, SWAV_LARGE_SCALE, SWAV_SMALL_SCALE};
use contrast_data::schedule::RandAugSchedule;
use contrast_data::source::{Cifar, CifarSource, CsvSource, ImageFolder, Source, WebDataset};
use contrast_data::text::Tokenizer;
use contrast_data::{AugParams, Augmenter, Mode};
use std::path::Path;
use std::sync::Arc;

/// The grayscale augmentation of each view of `data.augment` for IDX input:
/// two views for `simclr`, `clip` and `none`; 2 + `data.small_crops` for `swav`
/// (SwAV's crop scales, small views at `data.small_size`, default ⌈28 · 96 / 224⌉ = 12).
fn augmenter(plan: &Plan, images: &Images) -> Vec<Augmenter> {
    let (d, a) = (&plan.config.data, &plan.config.data.aug);
    let simclr = AugParams {
        crop_scale: Some(a.crop_scale),
        crop_ratio: a.crop_ratio,
        flip_prob: a.flip_prob,
        jitter_prob: a.jitter_prob,
        brightness: a.brightness,
        contrast: a.contrast,
        blur_prob: a.blur_prob,
        blur_sigma: a.blur_sigma,
        randaugment: (a.randaugment_n > 0).then_some((a.randaugment_n, a.randaugment_m)),
        mean_std: FASHION_MNIST_MEAN_STD,
    };
    let view = |params: AugParams| Augmenter::new(params, images.height, images.width);
    match d.augment {
        AugmentPreset::Simclr => vec![view(simclr); 2],
        // CLIP's preset: a mild random resized crop, nothing else.
        AugmentPreset::Clip => vec![
            view(AugParams {
                crop_scale: Some([0.8, 1.0]),
                crop_ratio: [0.9, 1.1],
                ..AugParams::identity(FASHION_MNIST_MEAN_STD)
            });
            2
        ],
        AugmentPreset::Swav => {
            let small = if d.small_size > 0 { d.small_size } else { small_crop_side(images.height as u32) } as usize;
            let large = view(AugParams { crop_scale: Some(SWAV_LARGE_SCALE), ..simclr.clone() });
            let little = view(AugParams { crop_scale: Some(SWAV_SMALL_SCALE), ..simclr }).resized(small, small);
            let mut v = vec![large.clone(), large];
            v.extend(std::iter::repeat_n(little, d.small_crops));
            v
        }
        AugmentPreset::None => vec![view(AugParams::identity(FASHION_MNIST_MEAN_STD)); 2],
        AugmentPreset::Mocov2 | AugmentPreset::Byol => unreachable!("Plan::resolve refuses RGB presets for IDX input"),
    }
}

/// The RGB augmentation of each view of `data.augment` (`simclr` takes the `data.aug` parameters).
pub fn rgb_augment(plan: &Plan) -> Vec<RgbAugParams> {
    let (d, a) = (&plan.config.data, &plan.config.data.aug);
    let small = if d.small_size > 0 { d.small_size } else { small_crop_side(d.image_size) };
    match d.augment {
        AugmentPreset::Simclr => vec![
            RgbAugParams {
                size: d.image_size,
                crop_scale: Some(a.crop_scale),
                crop_ratio: a.crop_ratio,
                flip_prob: a.flip_prob,
                jitter_prob: a.jitter_prob,
                jitter: [a.brightness, a.contrast, a.saturation, a.hue],
                gray_prob: a.gray_prob,
                blur_prob: a.blur_prob,
                blur_sigma: a.blur_sigma,
                solarize_prob: a.solarize_prob,
                randaugment: (a.randaugment_n > 0).then_some((a.randaugment_n, a.randaugment_m)),
                autoaugment: a.autoaugment,
                ..RgbAugParams::simclr(d.image_size)
            };
            2
        ],
        AugmentPreset::None => vec![RgbAugParams::clip(d.image_size); 2],
        // A one-view preset (clip) still gives the two-view losses two views.
        name => match RgbAugParams::preset(name.as_str(), d.image_size, small, d.small_crops).expect("a preset") {
            one if one.len() == 1 => vec![one[0].clone(); 2],
            views => views,
        },
    }
}

/// Batch-level mixing of the plan: i-Mix mixes the first view for NT-Xent;
/// SupCon's mixed labels apply to both views.
pub fn mix_config(plan: &Plan) -> Option<(contrast_data::mix::MixConfig, usize)> {
    use contrast_data::mix::{MixConfig, MixKind};
    let d = &plan.config.data;
    let kind = match d.mix {
        MixName::Mixup => MixKind::Mixup,
        MixName::Cutmix => MixKind::CutMix,
        MixName::None => return None,
    };
    let views = if plan.loss == contrast_config::LossKind::SupCon { 2 } else { 1 };
    Some((MixConfig { kind, alpha: d.mix_alpha, group: d.mix_group }, views))
}

/// The corpus at `path` (`data.dataset: lines`), or an error naming the file.
pub fn corpus(path: &Path) -> Result<Arc<Corpus>> {
    Ok(Arc::new(Corpus::load(path).with_context(|| format!("loading data.root {}", path.display()))?))
}

/// The sentences of a text-only run: each sentence, or for a method that
/// trains on adjacent pairs the sentences followed by one of their group.
fn lines_input(plan: &Plan) -> Result<(Input, Vec<String>)> {
    let root = &plan.config.data.root;
    let corpus = corpus(root)?;
    let pairs = plan.method.spec.0.sentence_pairs();
    if pairs && !corpus.grouped {
        bail!(
            "data.root {}: method {} trains on adjacent sentences of one group: write lines as label<TAB>group<TAB>text",
            root.display(),
            plan.method.name
        );
    }
    if pairs && corpus.anchors.is_empty() {
        bail!("data.root {}: no group holds two consecutive sentences: no pair to train on", root.display());
    }
    let names = corpus.class_names.clone();
    Ok((Input::Lines { corpus, pairs }, names))
}

/// The training input of the plan and its class names.
pub fn training_input(plan: &Plan) -> Result<(Input, Vec<String>)> {
    let d = &plan.config.data;
    if d.dataset.is_lines() {
        return lines_input(plan);
    }
    if !d.dataset.is_files() {
        let images =
            Images::load_split(&d.root, "train").with_context(|| format!("loading data.root {}", d.root.display()))?;
        let augment = augmenter(plan, &images);
        let names = FASHION_MNIST_CLASSES.iter().map(|s| s.to_string()).collect();
        return Ok((Input::Idx { images: Arc::new(images), augment }, names));
    }
    let source = open_source(plan, d.dataset, &d.root, true)?;
    if let (true, Some(i)) = (plan.loss.is_supervised(), source.first_unlabelled()) {
        bail!(
            "loss.name: {:?} needs a class label for every sample, and {} has none (no .cls, no label in its .json)",
            plan.loss,
            source.locate(i)
        );
    }
    let names = source.class_names();
    let input =
        Input::Files { source: source.into(), augment: rgb_augment(plan), max_bad_fraction: d.max_bad_fraction };
    Ok((input, names))
}

/// Population-based augmentation's held-out images, from the training split
/// (`input`), so that selecting members never sees the test split: `queries`
/// images at an even stride (`eval.max_test`) and, of the others, `memory` at
/// an even stride (`eval.max_train`) as the kNN neighbours, both through the
/// evaluation transform. Errors name the key when the split cannot hold both.
pub fn held_out(plan: &Plan, input: &Input, memory: usize, queries: usize) -> Result<(EvalSet, EvalSet)> {
    let n = input.len();
    if memory == 0 || queries == 0 || memory + queries > n {
        bail!(
            "eval.max_train ({memory}) and eval.max_test ({queries}) size the held-out part of the training split \
             that selects members: each at least 1, together at most its {n} items"
        );
    }
    let picked: Vec<usize> = (0..queries).map(|i| i * n / queries).collect();
    let rest: Vec<usize> = {
        let mut taken = vec![false; n];
        picked.iter().for_each(|&i| taken[i] = true);
        (0..n).filter(|&i| !taken[i]).collect()
    };
    let neighbours: Vec<usize> = (0..memory).map(|i| rest[i * rest.len() / memory]).collect();
    let set = |which: &[usize]| -> Result<EvalSet> {
        Ok(match input {
            Input::Idx { images, .. } => EvalSet::Idx(select_images(images, which)),
            Input::Files { source, .. } => EvalSet::Files {
                source: source.clone(),
                indices: which.to_vec(),
                transform: eval_transform(plan),
                threads: plan.workers.max(1),
            },
            Input::Lines { .. } => bail!("population-based augmentation trains on images, not sentences"),
        })
    };
    Ok((set(&neighbours)?, set(&picked)?))
}

/// The images at `which`, in that order.
fn select_images(images: &Images, which: &[usize]) -> Images {
    let pix = images.height * images.width;
    Images {
        pixels: which.iter().flat_map(|&i| images.pixels[i * pix..(i + 1) * pix].iter().copied()).collect(),
        labels: which.iter().map(|&i| images.labels[i]).collect(),
        height: images.height,
        width: images.width,
    }
}

/// `data.aug.randaugment_schedule`, read and checked (an error names the file).
pub fn randaug_schedule(plan: &Plan) -> Result<Option<Arc<RandAugSchedule>>> {
    let Some(path) = plan.config.data.aug.randaugment_schedule.as_ref() else { return Ok(None) };
    let s = RandAugSchedule::load(path).context("data.aug.randaugment_schedule")?;
    Ok(Some(Arc::new(s)))
}

/// The caption tokenizer of the plan (`data.text.tokenizer`), for texts of `model.text.context` tokens.
pub fn tokenizer(plan: &Plan) -> Result<Arc<Tokenizer>> {
    let c = &plan.config;
    Ok(Arc::new(Tokenizer::from_spec(&c.data.text.tokenizer, c.model.text.context as usize)?))
}

/// Open a file dataset of kind `dataset` at `root` (image folder, CSV,
/// WebDataset, or CIFAR's training or test split).
fn open_source(plan: &Plan, dataset: DatasetKind, root: &Path, train: bool) -> Result<Box<dyn Source>> {
    let d = &plan.config.data;
    let sep = (d.csv_separator != "auto").then(|| d.csv_separator.as_bytes()[0]);
    Ok(match dataset {
        DatasetKind::Cifar10 => Box::new(CifarSource::open(root, Cifar::Ten, train)?),
        DatasetKind::Cifar100 => Box::new(CifarSource::open(root, Cifar::Hundred, train)?),
        DatasetKind::ImageFolder => Box::new(ImageFolder::open(root)?),
        DatasetKind::Csv => Box::new(CsvSource::open(root, &d.csv_img_key, &d.csv_caption_key, sep)?),
        DatasetKind::Webdataset => Box::new(WebDataset::open_indexed(&root.to_string_lossy(), d.index_dir.as_deref())?),
        DatasetKind::FashionMnist | DatasetKind::Lines => bail!("{dataset:?} is not an image file dataset"),
    })
}

/// The evaluation data of the plan, or the reason there is none (no labelled
/// test split). `opened` is the training set's source when the caller already has it.
pub fn load_eval(plan: &Plan, opened: Option<Arc<dyn Source>>) -> Result<std::result::Result<EvalData, &'static str>> {
    let (d, e) = (&plan.config.data, &plan.config.eval);
    if d.dataset.is_lines() {
        return lines_eval(plan);
    }
    if !d.dataset.is_files() {
        let mut train = Images::load_split(&d.root, "train")?;
        let mut test = Images::load_split(&d.root, "t10k")?;
        train.truncate(e.max_train);
        test.truncate(e.max_test);
        let class_names = FASHION_MNIST_CLASSES.iter().map(|s| s.to_string()).collect();
        let views = Some(ViewAug::Idx(augmenter(plan, &test).into_iter().take(2).collect()));
        return Ok(Ok(EvalData { memory: Some(EvalSet::Idx(train)), test: EvalSet::Idx(test), class_names, views }));
    }
    let kind = e.dataset.unwrap_or(d.dataset);
    // CIFAR's test batch lives beside its training batches.
    let root = e.root.as_ref().or(kind.has_test_split().then_some(&d.root));
    let Some(root) = root else { return Ok(Err("set eval.root to a labelled test split")) };
    let test: Arc<dyn Source> =
        open_source(plan, kind, root, false).with_context(|| format!("eval.root {}", root.display()))?.into();
    let (transform, threads) = (eval_transform(plan), plan.workers.max(1));
    let mut class_names = test.class_names();
    let memory = if d.dataset == DatasetKind::Csv {
        None
    } else {
        let train = match opened {
            Some(source) => source,
            None => open_source(plan, d.dataset, &d.root, true)?.into(),
        };
        if class_names.is_empty() {
            class_names = train.class_names();
        }
        Some(EvalSet::files(train, e.max_train, transform.clone(), threads))
    };
    let views = Some(ViewAug::Files(rgb_augment(plan).into_iter().take(2).collect()));
    Ok(Ok(EvalData { memory, test: EvalSet::files(test, e.max_test, transform, threads), class_names, views }))
}

/// The evaluation data of sentences: the training corpus as kNN memory, the
/// corpus at `eval.root` as the test set, and adjacent sentences for alignment.
fn lines_eval(plan: &Plan) -> Result<std::result::Result<EvalData, &'static str>> {
    let (d, e) = (&plan.config.data, &plan.config.eval);
    let Some(root) = e.root.as_ref() else { return Ok(Err("set eval.root to a labelled corpus of test sentences")) };
    let (tokenizer, context) = (tokenizer(plan)?, plan.config.model.text.context as usize);
    let train = corpus(&d.root)?;
    let test = Arc::new(Corpus::load(root).with_context(|| format!("loading eval.root {}", root.display()))?);
    let class_names = train.class_names.clone();
    let set = |c: Arc<Corpus>, max| EvalSet::Lines(LineSet::new(c, max, tokenizer.clone(), context));
    Ok(Ok(EvalData {
        memory: Some(set(train, e.max_train)),
        test: set(test, e.max_test),
        class_names,
        views: Some(ViewAug::Adjacent),
    }))
}

/// The evaluation transform: what training normalised (the first view's
/// statistics), resized and centre-cropped, no random op.
fn eval_transform(plan: &Plan) -> RgbAugParams {
    let first = &rgb_augment(plan)[0];
    RgbAugParams { mean: first.mean, std: first.std, ..RgbAugParams::clip(plan.config.data.image_size) }
}

/// Every image of the training split (`test`: the test split, `t10k` or
/// `eval.root`) through the evaluation transform, for `trainer embed`, with a
/// name for each image's source.
pub fn embed_set(plan: &Plan, test: bool) -> Result<(EvalSet, Box<dyn Fn(usize) -> String>)> {
    let (d, e) = (&plan.config.data, &plan.config.eval);
    if d.dataset.is_lines() {
        let path = match (test, &e.root) {
            (false, _) => d.root.clone(),
            (true, Some(root)) => root.clone(),
            (true, None) => bail!("--split test needs eval.root"),
        };
        let lines = LineSet::new(corpus(&path)?, 0, tokenizer(plan)?, plan.config.model.text.context as usize);
        let shown = path.display().to_string();
        return Ok((EvalSet::Lines(lines), Box::new(move |i| format!("{shown}#{}", i + 1))));
    }
    if !d.dataset.is_files() {
        let split = if test { "t10k" } else { "train" };
        let images = Images::load_split(&d.root, split)?;
        let root = d.root.display().to_string();
        return Ok((EvalSet::Idx(images), Box::new(move |i| format!("{root}/{split}-images-idx3-ubyte#{i}"))));
    }
    let (kind, root) = match (test, &e.root) {
        (false, _) => (d.dataset, &d.root),
        (true, Some(root)) => (e.dataset.unwrap_or(d.dataset), root),
        (true, None) if d.dataset.has_test_split() => (d.dataset, &d.root),
        (true, None) => bail!("--split test needs eval.root"),
    };
    let source: Arc<dyn Source> = open_source(plan, kind, root, !test)?.into();
    let set = EvalSet::files(source.clone(), 0, eval_transform(plan), plan.workers.max(1));
    Ok((set, Box::new(move |i| source.locate(i))))
}

/// What a batch holds for the plan: captions for image–text methods (with
/// their augmentation), views otherwise.
pub fn mode(plan: &Plan, tokenizer: &Arc<Tokenizer>, class_names: Vec<String>) -> Result<Mode> {
    let lines = plan.config.data.dataset.is_lines();
    if !plan.loss.is_image_text() && !lines {
        return Ok(Mode::Views);
    }
    let (c, t) = (&plan.config, &plan.config.data.text);
    let eda = match (&t.synonyms, t.eda_alpha > 0.0) {
        (Some(path), true) => Some((Arc::new(contrast_data::textaug::Synonyms::load(path)?), t.eda_alpha)),
        _ => None,
    };
    let cutoff = match t.cutoff {
        CutoffName::Token => Some((contrast_data::textaug::Cutoff::Token, t.cutoff_ratio)),
        CutoffName::Span => Some((contrast_data::textaug::Cutoff::Span, t.cutoff_ratio)),
        CutoffName::None => None,
    };
    let (text, context, tokenizer) =
        (contrast_data::pipeline::TextAug { eda, cutoff }, c.model.text.context as usize, tokenizer.clone());
    Ok(match lines {
        true => Mode::Text { context, tokenizer, text },
        false => Mode::ImageText { context, tokenizer, class_names, text },
    })
}
