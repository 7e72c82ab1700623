//! The contrast trainer: glue over the library crates.
//!
//! [`train_command`] validates the config into a plan (before any training),
//! builds the model on every rank from one seed (then broadcasts rank 0's
//! weights), streams host batches from the data pipeline, runs the exact
//! global-batch engine, steps the optimiser, writes checkpoints, the per-step
//! log and the summary, and evaluates.
#![warn(missing_docs)]

pub mod checkpoint;
pub mod eval;

use anyhow::{bail, Context, Result};
use contrast_comm::{Collective, Comm};
use contrast_config::{Config, Plan, Topology};
use contrast_data::idx::{Images, FASHION_MNIST_CLASSES, FASHION_MNIST_MEAN_STD};
use contrast_data::pipeline::Input;
use contrast_data::rgb::{small_crop_side, RgbAugParams, SWAV_LARGE_SCALE, SWAV_SMALL_SCALE};
use contrast_data::source::{CsvSource, ImageFolder, Source, WebDataset};
use contrast_data::text::Tokenizer;
use contrast_data::{AugParams, Augmenter, Mode, Pipeline, PipelineConfig};
use contrast_nn::model::{Captions, Model};
use contrast_nn::optim::{named_params, Optimizer, OptimizerKind, Schedule};
use contrast_nn::GlobalBatch;
use eval::{EvalData, EvalSet};
use serde::Serialize;
use std::io::Write;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;
use tch::{nn::VarStore, Device, Tensor};

/// What `summary.json` holds (flat keys; accuracies are fractions in [0, 1]).
#[derive(Debug, Clone, Serialize, Default)]
pub struct Summary {
    /// Optimiser steps completed.
    pub steps: usize,
    /// Global loss of the last step.
    pub final_loss: f64,
    /// Global samples per second over the training steps of this invocation.
    pub samples_per_s: f64,
    /// kNN top-1 of the trained backbone.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub knn_top1: Option<f64>,
    /// kNN top-1 of the untrained backbone.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub knn_top1_init: Option<f64>,
    /// kNN top-1 of raw pixels.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub knn_top1_raw_pixels: Option<f64>,
    /// CLIP zero-shot top-1 from class-name prompts.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub zero_shot_top1: Option<f64>,
    /// Ranks of the run.
    pub world_size: usize,
    /// Global batch.
    pub global_batch: usize,
}

fn init_logging(rank: usize) {
    let default = if rank == 0 { "info" } else { "warn" };
    let filter = tracing_subscriber::EnvFilter::try_from_env("CONTRAST_LOG").unwrap_or_else(|_| default.into());
    let _ =
        tracing_subscriber::fmt().with_env_filter(filter).with_target(false).with_writer(std::io::stderr).try_init();
}

/// Cores this process may use (its affinity mask, as `available_parallelism` reads it).
fn rank_cores() -> usize {
    std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
}

/// Logical cores online on this host (`/sys/devices/system/cpu/online`, e.g. `0-7,16-23`),
/// whatever this process's affinity; falls back to the affinity count.
fn host_cores() -> usize {
    let parsed = std::fs::read_to_string("/sys/devices/system/cpu/online").ok().and_then(|s| {
        s.trim()
            .split(',')
            .map(|r| match r.split_once('-') {
                Some((a, b)) => Some(b.parse::<usize>().ok()? + 1 - a.parse::<usize>().ok()?),
                None => r.parse::<usize>().ok().map(|_| 1),
            })
            .sum::<Option<usize>>()
    });
    parsed.filter(|&n| n > 0).unwrap_or_else(rank_cores)
}

/// Pick the device: `cpu`, `cuda[:K]`, or `auto` (GPU local_rank mod count when CUDA is present).
pub fn resolve_device(spec: &str, local_rank: usize) -> Result<Device> {
    let gpus = tch::Cuda::device_count() as usize;
    Ok(match spec {
        "cpu" => Device::Cpu,
        "auto" if gpus == 0 => Device::Cpu,
        "auto" | "cuda" => {
            if gpus == 0 {
                bail!("train.device=cuda but libtorch sees no CUDA device");
            }
            Device::Cuda(local_rank % gpus)
        }
        s => {
            let k: usize =
                s.strip_prefix("cuda:").and_then(|k| k.parse().ok()).with_context(|| format!("train.device `{s}`"))?;
            if k >= gpus {
                bail!("train.device={s} but libtorch sees {gpus} CUDA device(s)");
            }
            Device::Cuda(k)
        }
    })
}

/// Load a plan for this communicator (fails before any training on bad input).
pub fn load_plan<C: Collective>(comm: &C, path: &Path, overrides: &[String]) -> Result<Plan> {
    let config = Config::load(path, overrides)?;
    let topo = Topology {
        world_size: comm.world_size(),
        local_size: comm.local_size(),
        host_cores: host_cores(),
        rank_cores: rank_cores(),
    };
    Ok(Plan::resolve(config, topo)?)
}

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
        mean_std: FASHION_MNIST_MEAN_STD,
    };
    let view = |params: AugParams| Augmenter::new(params, images.height, images.width);
    match d.augment.as_str() {
        "simclr" => vec![view(simclr); 2],
        // CLIP's preset: a mild random resized crop, nothing else.
        "clip" => vec![
            view(AugParams {
                crop_scale: Some([0.8, 1.0]),
                crop_ratio: [0.9, 1.1],
                ..AugParams::identity(FASHION_MNIST_MEAN_STD)
            });
            2
        ],
        "swav" => {
            let small = if d.small_size > 0 { d.small_size } else { small_crop_side(images.height as u32) } as usize;
            let large = view(AugParams { crop_scale: Some(SWAV_LARGE_SCALE), ..simclr.clone() });
            let little = view(AugParams { crop_scale: Some(SWAV_SMALL_SCALE), ..simclr }).resized(small, small);
            let mut v = vec![large.clone(), large];
            v.extend(std::iter::repeat_n(little, d.small_crops));
            v
        }
        _ => vec![view(AugParams::identity(FASHION_MNIST_MEAN_STD)); 2],
    }
}

/// Image channels the encoder sees: 1 for IDX, 3 for decoded files.
pub fn in_channels(plan: &Plan) -> i64 {
    if plan.config.data.dataset == "fashion_mnist" {
        1
    } else {
        3
    }
}

/// The RGB augmentation of each view of `data.augment` (`simclr` takes the `data.aug` parameters).
fn rgb_augment(plan: &Plan) -> Vec<RgbAugParams> {
    let (d, a) = (&plan.config.data, &plan.config.data.aug);
    let small = if d.small_size > 0 { d.small_size } else { small_crop_side(d.image_size) };
    match d.augment.as_str() {
        "simclr" => vec![
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
        "none" => vec![RgbAugParams::clip(d.image_size); 2],
        // A one-view preset (clip) still gives the two-view losses two views.
        name => match RgbAugParams::preset(name, d.image_size, small, d.small_crops).expect("validated preset") {
            one if one.len() == 1 => vec![one[0].clone(); 2],
            views => views,
        },
    }
}

/// Batch-level mixing of the plan: i-Mix mixes the first view for NT-Xent;
/// SupCon's mixed labels apply to both views.
fn mix_config(plan: &Plan) -> Option<(contrast_data::mix::MixConfig, usize)> {
    use contrast_data::mix::{MixConfig, MixKind};
    let d = &plan.config.data;
    let kind = match d.mix.as_str() {
        "mixup" => MixKind::Mixup,
        "cutmix" => MixKind::CutMix,
        _ => return None,
    };
    let views = if plan.loss == contrast_config::LossKind::SupCon { 2 } else { 1 };
    Some((MixConfig { kind, alpha: d.mix_alpha, group: d.mix_group }, views))
}

/// The training input of the plan and its class names.
fn training_input(plan: &Plan) -> Result<(Input, Vec<String>)> {
    let d = &plan.config.data;
    if d.dataset == "fashion_mnist" {
        let images =
            Images::load_split(&d.root, "train").with_context(|| format!("loading data.root {}", d.root.display()))?;
        let augment = augmenter(plan, &images);
        let names = FASHION_MNIST_CLASSES.iter().map(|s| s.to_string()).collect();
        return Ok((Input::Idx { images: Arc::new(images), augment }, names));
    }
    let source = open_source(plan, &d.dataset, &d.root)?;
    let names = source.class_names();
    let input =
        Input::Files { source: source.into(), augment: rgb_augment(plan), max_bad_fraction: d.max_bad_fraction };
    Ok((input, names))
}

/// The caption tokenizer of the plan (`data.text.tokenizer`), for texts of `model.text.context` tokens.
pub fn tokenizer(plan: &Plan) -> Result<Arc<Tokenizer>> {
    let c = &plan.config;
    Ok(Arc::new(Tokenizer::from_spec(&c.data.text.tokenizer, c.model.text.context as usize)?))
}

/// The model and its var store, identical on every rank (rank 0's initial
/// weights are broadcast); a CLIP text tower embeds `tokenizer`'s vocabulary.
pub fn build_model<C: Collective>(comm: &C, plan: &Plan, device: Device, tokenizer: &Tokenizer) -> (VarStore, Model) {
    let c = &plan.config;
    tch::manual_seed(c.seed as i64);
    let vs = VarStore::new(device);
    let vocab = tokenizer.vocab_size();
    let model = Model::new(&vs, plan.loss, &c.model, plan.norm, &c.loss, in_channels(plan), vocab);
    if comm.world_size() > 1 {
        let mut vars: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
        vars.sort_by(|a, b| a.0.cmp(&b.0));
        for (_, t) in vars {
            let mut host = contrast_nn::to_host::<f32>(&t);
            comm.broadcast(&mut host, 0);
            let src = Tensor::from_slice(&host).view(t.size().as_slice()).to_device(device).to_kind(t.kind());
            tch::no_grad(|| t.shallow_clone().copy_(&src));
        }
    }
    (vs, model)
}

/// Average non-trainable float buffers (BatchNorm running statistics) over ranks,
/// so that the checkpoint holds one consistent set.
fn average_buffers<C: Collective>(comm: &C, vs: &VarStore) {
    if comm.world_size() == 1 {
        return;
    }
    let mut vars: Vec<(String, Tensor)> =
        vs.variables().into_iter().filter(|(_, t)| !t.requires_grad() && t.is_floating_point()).collect();
    vars.sort_by(|a, b| a.0.cmp(&b.0));
    for (_, t) in vars {
        let mut host = contrast_nn::to_host::<f32>(&t);
        comm.all_reduce_sum(&mut host);
        let p = comm.world_size() as f32;
        host.iter_mut().for_each(|v| *v /= p);
        let src = Tensor::from_slice(&host).view(t.size().as_slice()).to_device(t.device()).to_kind(t.kind());
        tch::no_grad(|| t.shallow_clone().copy_(&src));
    }
}

fn sorted_vars(vs: &VarStore) -> Vec<(String, Tensor)> {
    let mut v: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

/// Evaluation figures of a model.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct EvalFigures {
    /// kNN top-1 of the backbone (`None` when the training set has no labels).
    pub knn_top1: Option<f64>,
    /// CLIP zero-shot top-1.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub zero_shot_top1: Option<f64>,
}

/// kNN of `model`'s backbone (the training set as memory) and, for image–text
/// models, zero-shot from class-name prompts, on the test set.
pub fn evaluate<C: Collective>(
    comm: &C,
    plan: &Plan,
    model: &Model,
    data: &EvalData,
    tokenizer: &Tokenizer,
    device: Device,
) -> Result<EvalFigures> {
    let c = &plan.config;
    let knn = data.memory.as_ref().and_then(|memory| {
        eval::knn_of(comm, memory, &data.test, device, c.model.embed_dim, c.eval.knn_k, c.eval.knn_t, |x| {
            model.features(x, false)
        })
    });
    let zs = if plan.loss.is_image_text() && !data.class_names.is_empty() {
        let (context, dim) = (c.model.text.context as usize, c.model.proj_dim);
        eval::zero_shot_top1(comm, model, &data.test, device, &data.class_names, tokenizer, context, dim)?
    } else {
        None
    };
    Ok(EvalFigures { knn_top1: knn, zero_shot_top1: zs })
}

/// Open a file dataset of kind `dataset` at `root` (image folder, CSV, WebDataset).
fn open_source(plan: &Plan, dataset: &str, root: &Path) -> Result<Box<dyn Source>> {
    let d = &plan.config.data;
    Ok(match dataset {
        "image_folder" => Box::new(ImageFolder::open(root)?),
        "csv" => Box::new(CsvSource::open(root, &d.csv_img_key, &d.csv_caption_key, d.csv_separator.as_bytes()[0])?),
        "webdataset" => Box::new(WebDataset::open(&root.to_string_lossy())?),
        other => bail!("{other} is not a file dataset"),
    })
}

/// The evaluation data of the plan, or the reason there is none (no labelled
/// test split). `opened` is the training set's source when the caller already has it.
fn load_eval(plan: &Plan, opened: Option<Arc<dyn Source>>) -> Result<std::result::Result<EvalData, &'static str>> {
    let (d, e) = (&plan.config.data, &plan.config.eval);
    if d.dataset == "fashion_mnist" {
        let mut train = Images::load_split(&d.root, "train")?;
        let mut test = Images::load_split(&d.root, "t10k")?;
        train.truncate(e.max_train);
        test.truncate(e.max_test);
        let class_names = FASHION_MNIST_CLASSES.iter().map(|s| s.to_string()).collect();
        return Ok(Ok(EvalData { memory: Some(EvalSet::Idx(train)), test: EvalSet::Idx(test), class_names }));
    }
    let Some(root) = &e.root else { return Ok(Err("set eval.root to a labelled test split")) };
    let kind = if e.dataset.is_empty() { d.dataset.as_str() } else { e.dataset.as_str() };
    let test: Arc<dyn Source> =
        open_source(plan, kind, root).with_context(|| format!("eval.root {}", root.display()))?.into();
    // Evaluation sees what training normalised: the first view's statistics, no random op.
    let first = &rgb_augment(plan)[0];
    let transform = RgbAugParams { mean: first.mean, std: first.std, ..RgbAugParams::clip(d.image_size) };
    let threads = plan.workers.max(1);
    let mut class_names = test.class_names();
    let memory = if d.dataset == "csv" {
        None
    } else {
        let train = match opened {
            Some(source) => source,
            None => open_source(plan, &d.dataset, &d.root)?.into(),
        };
        if class_names.is_empty() {
            class_names = train.class_names();
        }
        Some(EvalSet::files(train, e.max_train, transform.clone(), threads))
    };
    Ok(Ok(EvalData { memory, test: EvalSet::files(test, e.max_test, transform, threads), class_names }))
}

fn log_figures(what: &str, f: &EvalFigures, extra: &str) {
    tracing::info!(
        "{what}: kNN top-1 {}{}{extra}",
        f.knn_top1.map(|v| format!("{v:.4}")).unwrap_or_else(|| "- (no labels)".into()),
        f.zero_shot_top1.map(|z| format!(", zero-shot {z:.4}")).unwrap_or_default()
    );
}

/// Drop the lines of `steps.jsonl` past `keep_through` (steps logged after the
/// checkpoint a run resumes from), so that the log holds each step once.
fn truncate_step_log(path: &Path, keep_through: usize) -> Result<()> {
    if !path.exists() {
        return Ok(());
    }
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let kept: String = text
        .lines()
        .filter(|l| {
            serde_json::from_str::<serde_json::Value>(l)
                .ok()
                .and_then(|v| v["step"].as_u64())
                .is_some_and(|s| s as usize <= keep_through)
        })
        .map(|l| format!("{l}\n"))
        .collect();
    if kept.len() != text.len() {
        let tmp = path.with_extension("jsonl.tmp");
        std::fs::write(&tmp, kept)?;
        std::fs::rename(&tmp, path)?;
    }
    Ok(())
}

/// `trainer --config FILE`: train, then write `summary.json`. Aborts every rank on error.
pub fn train_command(path: &Path, overrides: &[String]) -> Result<Summary> {
    let comm = Comm::from_env().map_err(anyhow::Error::msg)?;
    init_logging(comm.rank());
    let out = train(&comm, path, overrides);
    if let Err(e) = &out {
        if comm.world_size() > 1 {
            eprintln!("error [rank {}]: {e:#}", comm.rank());
            comm.abort_job(2);
        }
    }
    out
}

/// Train with an explicit communicator (tests pass the threaded backend).
pub fn train<C: Collective>(comm: &C, path: &Path, overrides: &[String]) -> Result<Summary> {
    let plan = load_plan(comm, path, overrides)?;
    let c = plan.config.clone();
    let rank = comm.rank();
    let lead = rank == 0;
    tch::set_num_threads(plan.threads as i32);
    let device = resolve_device(&c.train.device, comm.local_rank())?;
    if lead {
        tracing::info!("{}", plan.describe());
        tracing::info!(
            "device={device:?} intra-op threads per rank={} (libtorch reports {})",
            plan.threads,
            tch::get_num_threads()
        );
    }
    let (input, class_names) = training_input(&plan)?;
    let view_shapes: Vec<(usize, usize, usize)> = (0..input.views().max(1)).map(|k| input.view_shape(k)).collect();
    let sampler_check = contrast_data::Sampler::new(input.len(), plan.global_batch, c.seed)?;
    let run_dir = c.checkpoint.dir.clone();
    let tokenizer = tokenizer(&plan)?;
    let (vs, model) = build_model(comm, &plan, device, &tokenizer);
    let params = named_params(&vs);
    let kind = match c.train.optimizer.name.as_str() {
        "sgd" => OptimizerKind::Sgd { momentum: c.train.optimizer.momentum, nesterov: c.train.optimizer.nesterov },
        _ => OptimizerKind::AdamW {
            beta1: c.train.optimizer.betas[0],
            beta2: c.train.optimizer.betas[1],
            eps: c.train.optimizer.eps,
        },
    };
    let mut opt = Optimizer::new(kind, c.train.optimizer.weight_decay, params);
    let schedule = Schedule {
        peak: plan.peak_lr,
        warmup: c.train.schedule.warmup_steps as usize,
        total: plan.steps,
        final_frac: c.train.schedule.final_lr_frac,
        cosine: c.train.schedule.name == "cosine",
    };

    // Resume.
    let mut start_step = 0usize;
    let mut init_figures = (None, None);
    let mut last_loss = f64::NAN;
    if c.train.resume {
        if let Some(ckpt) = checkpoint::latest(&run_dir)? {
            let state = checkpoint::read_state(&ckpt)?;
            if state.global_batch != plan.global_batch {
                bail!(
                    "{}: checkpoint has global batch {}, config has {}; a resume must keep the global batch",
                    ckpt.display(),
                    state.global_batch,
                    plan.global_batch
                );
            }
            checkpoint::load_into(&vs, &checkpoint::read_tensors(&ckpt, "model.safetensors")?, &ckpt)?;
            opt.load_state(&checkpoint::read_tensors(&ckpt, "optim.safetensors")?)
                .map_err(|e| anyhow::anyhow!("{}: {e}", ckpt.display()))?;
            start_step = state.step;
            last_loss = state.loss;
            init_figures = (state.knn_top1_init, state.knn_top1_raw_pixels);
            if lead {
                tracing::info!(
                    "resumed from {} at step {start_step} (written by {} ranks, now {})",
                    ckpt.display(),
                    state.world_size,
                    plan.world_size
                );
            }
        } else if lead {
            tracing::info!("train.resume=true but {} has no checkpoint yet: starting fresh", run_dir.display());
        }
    }
    if lead {
        std::fs::create_dir_all(&run_dir).with_context(|| format!("creating checkpoint.dir {}", run_dir.display()))?;
        truncate_step_log(&run_dir.join("steps.jsonl"), start_step)?;
    }
    comm.barrier();

    // Baselines before training: raw pixels and the untrained encoder.
    let wants_eval = c.eval.at_end || c.eval.every > 0;
    let eval_data = if wants_eval {
        let opened = match &input {
            Input::Files { source, .. } => Some(source.clone()),
            Input::Idx { .. } => None,
        };
        match load_eval(&plan, opened)? {
            Ok(d) => Some(d),
            Err(why) => {
                if lead {
                    tracing::info!("evaluation skipped: {why}");
                }
                None
            }
        }
    } else {
        None
    };
    if let (Some(data), 0, true) = (&eval_data, start_step, c.eval.at_end) {
        let t0 = Instant::now();
        let raw = data
            .memory
            .as_ref()
            .and_then(|m| eval::raw_pixels_knn(comm, m, &data.test, device, c.eval.knn_k, c.eval.knn_t));
        let init = evaluate(comm, &plan, &model, data, &tokenizer, device)?;
        init_figures = (init.knn_top1, raw);
        if lead {
            let raw = raw.map(|r| format!(", raw pixels {r:.4}")).unwrap_or_default();
            log_figures(
                "before training (untrained encoder)",
                &init,
                &format!("{raw} ({:.1}s)", t0.elapsed().as_secs_f64()),
            );
        }
    }

    let mode = if plan.loss.is_image_text() {
        let t = &c.data.text;
        let eda = match (&t.synonyms, t.eda_alpha > 0.0) {
            (Some(path), true) => {
                Some((std::sync::Arc::new(contrast_data::textaug::Synonyms::load(path)?), t.eda_alpha))
            }
            _ => None,
        };
        let cutoff = match t.cutoff.as_str() {
            "token" => Some((contrast_data::textaug::Cutoff::Token, t.cutoff_ratio)),
            "span" => Some((contrast_data::textaug::Cutoff::Span, t.cutoff_ratio)),
            _ => None,
        };
        let text = contrast_data::pipeline::TextAug { eda, cutoff };
        Mode::ImageText { context: c.model.text.context as usize, tokenizer: tokenizer.clone(), class_names, text }
    } else {
        Mode::Views
    };
    let pipeline = Pipeline::start_input(
        input,
        PipelineConfig {
            seed: c.seed,
            rank,
            world_size: plan.world_size,
            global_batch: plan.global_batch,
            workers: plan.workers,
            prefetch: c.data.prefetch,
            start_step,
            end_step: plan.steps,
            mode,
            mix: mix_config(&plan),
        },
    )?;
    let engine = GlobalBatch::new(comm, plan.local_batch);
    let mut log = if lead {
        Some(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(run_dir.join("steps.jsonl"))
                .context("opening steps.jsonl")?,
        )
    } else {
        None
    };
    let fault_step: Option<usize> = std::env::var("CONTRAST_FAULT_NAN_AT_STEP").ok().and_then(|s| s.parse().ok());
    let save = |step: usize, loss: f64, opt: &Optimizer, init: (Option<f64>, Option<f64>)| -> Result<()> {
        average_buffers(comm, &vs);
        if lead {
            let state = checkpoint::State {
                step,
                epoch: sampler_check.epoch_of(step),
                seed: c.seed,
                world_size: plan.world_size,
                global_batch: plan.global_batch,
                loss,
                knn_top1_init: init.0,
                knn_top1_raw_pixels: init.1,
            };
            let p = checkpoint::save(&run_dir, &state, &sorted_vars(&vs), &opt.named_state(), c.checkpoint.keep)?;
            tracing::info!("checkpoint {}", p.display());
        }
        comm.barrier();
        Ok(())
    };

    let mut train_time = 0.0f64;
    let mut trained_steps = 0usize;
    let mut window = (Instant::now(), 0usize);
    let mut pipeline = pipeline;
    while let Some(batch) = pipeline.next_batch() {
        let mut batch = batch?;
        let t0 = Instant::now();
        let step = batch.step;
        let lr = schedule.lr(step);
        let b = plan.local_batch as i64;
        let views: Vec<Tensor> = batch
            .views
            .iter()
            .zip(&view_shapes)
            .map(|(v, &(ch, h, w))| Tensor::from_slice(v).view([b, ch as i64, h as i64, w as i64]).to_device(device))
            .collect();
        let captions = (!batch.tokens.is_empty()).then(|| Captions::from_host(&batch.tokens, &batch.text_end, device));
        // Supervised losses see the labels of the whole global batch.
        let labels =
            plan.loss.is_supervised().then(|| Tensor::from_slice(&comm.all_gather(&batch.labels)).to_device(device));
        let mix = batch.mix.take().map(|(partner, lambda)| contrast_nn::loss::Mix { partner, lambda });
        let (wait, bad_files) = (batch.wait, batch.bad_files);
        // The tensors own copies: the host buffers go back to the pipeline for a later step.
        pipeline.recycle(batch);
        opt.zero_grad();
        // Metric-learning losses take one embedding per sample: the first view.
        let used = if plan.loss.is_metric() { &views[..1] } else { &views[..] };
        let towers = model.towers(used, captions.as_ref(), true);
        let out = engine.step(&towers, &opt.tensors(), |g, ctx| {
            model.loss_share(g, ctx, plan.loss, &c.loss, labels.as_ref(), mix.as_ref())
        })?;
        let loss = if fault_step == Some(step + 1) { f64::NAN } else { out.loss };
        if !loss.is_finite() {
            let last = checkpoint::latest(&run_dir)
                .ok()
                .flatten()
                .map(|p| p.display().to_string())
                .unwrap_or_else(|| "none yet".into());
            bail!("loss is {loss} at step {}: stopping; the last good checkpoint ({last}) is intact", step + 1);
        }
        if c.train.grad_clip > 0.0 {
            opt.clip_grad_norm(c.train.grad_clip);
        }
        opt.step(lr);
        model.after_step();
        last_loss = loss;
        let dt = t0.elapsed().as_secs_f64();
        train_time += dt;
        trained_steps += 1;
        window.1 += 1;
        let done = step + 1;
        let sps = plan.global_batch as f64 / dt;
        if let Some(f) = log.as_mut() {
            writeln!(
                f,
                "{}",
                serde_json::json!({"step": done, "loss": loss, "lr": lr, "samples_per_s": sps, "data_wait_s": wait.as_secs_f64(), "bad_files": bad_files})
            )?;
        }
        if lead && (done % c.train.log_every as usize == 0 || done == plan.steps || done == start_step + 1) {
            let el = window.0.elapsed().as_secs_f64();
            tracing::info!(
                "step {done}/{} loss {loss:.4} lr {lr:.5} {:.0} samples/s data-wait {:.1}ms{}",
                plan.steps,
                window.1 as f64 * plan.global_batch as f64 / el,
                wait.as_secs_f64() * 1e3,
                model.logit_scale().map(|s| format!(" logit-scale {s:.2}")).unwrap_or_default()
            );
            window = (Instant::now(), 0);
        }
        if c.checkpoint.every > 0 && done % c.checkpoint.every as usize == 0 && done < plan.steps {
            save(done, loss, &opt, init_figures)?;
        }
        if let (Some(data), true) =
            (&eval_data, c.eval.every > 0 && done % c.eval.every as usize == 0 && done < plan.steps)
        {
            let f = evaluate(comm, &plan, &model, data, &tokenizer, device)?;
            if lead {
                log_figures(&format!("step {done}"), &f, "");
            }
        }
    }
    if trained_steps > 0 || start_step < plan.steps {
        save(plan.steps, last_loss, &opt, init_figures)?;
    }

    let mut summary = Summary {
        steps: plan.steps,
        final_loss: last_loss,
        samples_per_s: if train_time > 0.0 { (trained_steps * plan.global_batch) as f64 / train_time } else { 0.0 },
        knn_top1_init: init_figures.0,
        knn_top1_raw_pixels: init_figures.1,
        world_size: plan.world_size,
        global_batch: plan.global_batch,
        ..Default::default()
    };
    if let (Some(data), true) = (&eval_data, c.eval.at_end) {
        let f = evaluate(comm, &plan, &model, data, &tokenizer, device)?;
        summary.knn_top1 = f.knn_top1;
        summary.zero_shot_top1 = f.zero_shot_top1;
    }
    if lead {
        let text = serde_json::to_string_pretty(&summary)?;
        std::fs::write(run_dir.join("summary.json"), &text)?;
        let pct = |v: Option<f64>| v.map(|x| format!("{:.2}%", 100.0 * x)).unwrap_or_else(|| "-".into());
        tracing::info!(
            "done: {} steps, final loss {:.4}, {:.0} samples/s | kNN top-1: trained {}  untrained {}  raw pixels {}{}",
            summary.steps,
            summary.final_loss,
            summary.samples_per_s,
            pct(summary.knn_top1),
            pct(summary.knn_top1_init),
            pct(summary.knn_top1_raw_pixels),
            summary.zero_shot_top1.map(|z| format!(" | zero-shot top-1 {:.2}%", 100.0 * z)).unwrap_or_default()
        );
        println!("{text}");
    }
    Ok(summary)
}

/// `trainer eval --config FILE --checkpoint DIR`: print the evaluation as JSON.
pub fn eval_command(path: &Path, overrides: &[String], ckpt: &Path) -> Result<()> {
    let comm = Comm::from_env().map_err(anyhow::Error::msg)?;
    init_logging(comm.rank());
    let plan = load_plan(&comm, path, overrides)?;
    tch::set_num_threads(plan.threads as i32);
    let device = resolve_device(&plan.config.train.device, comm.local_rank())?;
    let ckpt = checkpoint::resolve(ckpt)?;
    let tokenizer = tokenizer(&plan)?;
    let (vs, model) = build_model(&comm, &plan, device, &tokenizer);
    checkpoint::load_into(&vs, &checkpoint::read_tensors(&ckpt, "model.safetensors")?, &ckpt)?;
    let state = checkpoint::read_state(&ckpt)?;
    let data = load_eval(&plan, None)?.map_err(|why| anyhow::anyhow!("nothing to evaluate: {why}"))?;
    let f = evaluate(&comm, &plan, &model, &data, &tokenizer, device)?;
    if comm.rank() == 0 {
        let out = serde_json::json!({
            "checkpoint": ckpt.display().to_string(),
            "step": state.step,
            "knn_top1": f.knn_top1,
            "zero_shot_top1": f.zero_shot_top1,
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
    }
    Ok(())
}
