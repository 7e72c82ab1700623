//! The contrast trainer: glue over the library crates.
//!
//! [`train_command`] validates the config into a plan (before any training),
//! builds the model on every rank from one seed (then broadcasts rank 0's
//! weights), streams host batches from the data pipeline, runs the exact
//! global-batch engine, steps the optimiser, writes checkpoints, the per-step
//! log and the summary, and evaluates.
#![warn(missing_docs)]

pub mod agree;
pub mod alloc;
pub mod checkpoint;
mod commands;
pub mod compare;
pub mod data;
pub mod embed;
pub mod eval;
pub mod host;
pub mod metrics;
pub mod pba;
pub mod plot;
pub mod pretrained;
pub mod progress;
pub mod rundir;
pub mod runlock;
pub mod signals;
pub mod trainer;
pub mod watchdog;

use anyhow::{bail, Context, Result};
use contrast_comm::{Collective, Comm};
use contrast_config::{Config, ModelConfig, Plan, Topology};
use contrast_data::pipeline::Input;
use contrast_data::text::Tokenizer;
use contrast_data::{Mode, Pipeline, PipelineConfig};
use contrast_nn::loss::Shard;
use contrast_nn::method::{Method, Spec};
use eval::EvalData;
pub use host::resolve_device;
use serde::Serialize;
use std::path::Path;
use tch::Device;
use trainer::{Parts, Trainer};

pub use commands::{config_command, eval_command, export_command};
pub use embed::{embed_command, EmbedInput};

/// What `summary.json` holds (flat keys; accuracies are fractions in [0, 1]).
#[derive(Debug, Clone, Serialize, Default)]
pub struct Summary {
    /// Optimiser steps completed (the run's last step, or where a stop signal ended it).
    pub steps: usize,
    /// True when a stop signal ended the run early (a checkpoint was written at `steps`).
    pub stopped_by_signal: bool,
    /// Global loss of the last step.
    pub final_loss: f64,
    /// Global samples per second over the training steps of this invocation,
    /// wall clock: the wait for data is included.
    pub samples_per_s: f64,
    /// The same without the wait for data (the model's compute and communication only).
    pub compute_samples_per_s: f64,
    /// kNN top-1 of the untrained backbone.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub knn_top1_init: Option<f64>,
    /// kNN top-1 of raw pixels.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub knn_top1_raw_pixels: Option<f64>,
    /// kNN top-1 of the bag of words (sentences, `data.dataset: lines`: their
    /// baseline in place of raw pixels).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub knn_top1_bag_of_words: Option<f64>,
    /// The final evaluation of the trained backbone (flat keys: `knn_top1`, `knn_top5`,
    /// `linear_top1`, `zero_shot_top1/5`, `i2t_r1`…, `alignment`, `uniformity`).
    #[serde(flatten)]
    pub eval: EvalFigures,
    /// Ranks of the run.
    pub world_size: usize,
    /// Global batch.
    pub global_batch: usize,
    /// The sha256 of `model.pretrained`, when the run imported weights.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pretrained_sha256: Option<String>,
    /// Population-based augmentation: the member whose figures these are
    /// (the best by held-out kNN top-1; its directory is `member-<k>/`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub best_member: Option<usize>,
}

/// Log line format (`--log-format`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogFormat {
    /// `<timestamp> LEVEL rank{rank=r}:step{step=n}: message` (the step line keeps its form).
    #[default]
    Plain,
    /// One JSON object per line (tracing-subscriber's json: `fields.message`, and the
    /// `rank` and `step` spans under `spans`).
    Json,
}

static LOG_FORMAT: std::sync::OnceLock<LogFormat> = std::sync::OnceLock::new();

/// Whether log lines are plain text (the progress bar only goes with plain lines).
pub fn plain_logs() -> bool {
    LOG_FORMAT.get().map_or(true, |f| *f == LogFormat::Plain)
}

/// Set up logging before anything else: rank 0 (as the launcher names it) logs
/// at info, the others at warn; `CONTRAST_LOG` overrides (`debug`, `warn`, …),
/// and, where it is unset, `RUST_LOG` does.
/// Every line carries the rank through a `rank` span each thread enters (an
/// error-level span, so that it is not filtered out where only warnings log).
pub fn init_logging(format: LogFormat) {
    LOG_FORMAT.get_or_init(|| format);
    let rank = contrast_comm::launcher_rank(|v| std::env::var(v).ok()).unwrap_or(0);
    let default = if rank == 0 { "info" } else { "warn" };
    let filter = ["CONTRAST_LOG", "RUST_LOG"]
        .iter()
        .find_map(|v| tracing_subscriber::EnvFilter::try_from_env(v).ok())
        .unwrap_or_else(|| default.into());
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let fmt = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false)
        .with_ansi(ansi)
        .with_writer(progress::LogWriter);
    let _ = match format {
        LogFormat::Plain => fmt.try_init(),
        LogFormat::Json => fmt.json().with_current_span(false).with_span_list(true).try_init(),
    };
}

/// Load a plan for this communicator (fails before any training on bad input),
/// and check that every rank resolved the same one: the first collective of
/// every command ([`agree::agree_on_config`]).
pub fn load_plan<C: Collective>(comm: &C, path: &Path, overrides: &[String]) -> Result<Plan> {
    let plan = resolve_plan(comm, path, overrides)?;
    agree::agree_on_config(comm, &plan)?;
    let d = &plan.config.data;
    contrast_data::limits::set(contrast_data::limits::ReadLimits {
        image_bytes: d.max_image_bytes,
        text_bytes: d.max_text_bytes,
        pixels: d.max_image_pixels,
    });
    Ok(plan)
}

/// This rank's plan, unchecked against the others'.
fn resolve_plan<C: Collective>(comm: &C, path: &Path, overrides: &[String]) -> Result<Plan> {
    let config = Config::load(path, overrides)?;
    let topo = Topology {
        world_size: comm.world_size(),
        local_size: comm.local_size(),
        host_cores: host::host_cores(),
        rank_cores: host::rank_cores(),
    };
    Ok(Plan::resolve(config, topo, &contrast_nn::Registry)?)
}

/// The method of the plan, identical on every rank: built from the seed, then
/// rank 0's initial weights are broadcast; a CLIP text tower embeds
/// `tokenizer`'s vocabulary.
pub fn build_method<C: Collective>(
    comm: &C,
    plan: &Plan,
    device: Device,
    tokenizer: &Tokenizer,
) -> Result<Box<dyn Method>> {
    let c = &plan.config;
    tch::manual_seed(c.seed as i64);
    let spec = Spec {
        method: plan.method.clone(),
        loss: plan.loss,
        loss_cfg: c.loss.clone(),
        model: ModelConfig { encoder_keys: plan.encoder.clone(), ..c.model.clone() },
        in_channels: plan.image.channels,
        image_size: plan.image.size,
        text_vocab: tokenizer.vocab_size(),
        seed: c.seed,
        items: plan.items,
        shard: Shard { rank: comm.rank(), world_size: comm.world_size(), local_batch: plan.local_batch },
        kind: tch::Kind::Float,
        device,
    };
    let method = contrast_nn::method::build(&spec)?;
    if comm.rank() == 0 && plan.config.model.pretrained.is_some() && !pretrained::resuming(plan)? {
        pretrained::import_pretrained(plan, method.as_ref())?;
    }
    if comm.world_size() > 1 {
        for item in contrast_nn::state::var_store_items(method.var_store()) {
            let src = contrast_nn::state::broadcast_tensor(comm, &item.tensor, 0);
            tch::no_grad(|| item.tensor.shallow_clone().copy_(&src.to_device(device)));
        }
    }
    Ok(method)
}

/// Retrieval recall of a CLIP model (fractions in [0, 1]).
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Retrieval {
    /// Image→text recall@1.
    pub i2t_r1: f64,
    /// Image→text recall@5.
    pub i2t_r5: f64,
    /// Image→text recall@10.
    pub i2t_r10: f64,
    /// Text→image recall@1.
    pub t2i_r1: f64,
    /// Text→image recall@5.
    pub t2i_r5: f64,
    /// Text→image recall@10.
    pub t2i_r10: f64,
}

impl From<[f64; 6]> for Retrieval {
    fn from(r: [f64; 6]) -> Self {
        Self { i2t_r1: r[0], i2t_r5: r[1], i2t_r10: r[2], t2i_r1: r[3], t2i_r5: r[4], t2i_r10: r[5] }
    }
}

impl EvalFigures {
    /// The figure named `name` (one of `contrast_config::BEST_METRICS`), when measured.
    pub fn metric(&self, name: &str) -> Option<f64> {
        match name {
            "knn_top1" => self.knn_top1,
            "knn_top5" => self.knn_top5,
            "linear_top1" => self.linear_top1,
            "zero_shot_top1" => self.zero_shot_top1,
            "zero_shot_top5" => self.zero_shot_top5,
            _ => None,
        }
    }
}

/// Evaluation figures of a model.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct EvalFigures {
    /// kNN top-1 of the backbone (`None` when the training set has no labels).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub knn_top1: Option<f64>,
    /// kNN top-5.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub knn_top5: Option<f64>,
    /// Linear probe top-1 (logistic regression on frozen features; `eval.linear_probe_steps`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub linear_top1: Option<f64>,
    /// CLIP zero-shot top-1.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub zero_shot_top1: Option<f64>,
    /// CLIP zero-shot top-5.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub zero_shot_top5: Option<f64>,
    /// Image→text and text→image retrieval recall@1, @5, @10 of a CLIP model on the test
    /// set (duplicate captions merged): `i2t_r1`, `i2t_r5`, `i2t_r10`, `t2i_r1`, `t2i_r5`, `t2i_r10`.
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    pub retrieval: Option<Retrieval>,
    /// Alignment E‖f(x) − f(x⁺)‖² of the backbone features (Wang & Isola 2020; lower is better).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub alignment: Option<f64>,
    /// Uniformity log E exp(−2‖f(x) − f(y)‖²) (lower is more uniform).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub uniformity: Option<f64>,
}

/// Write `summary.json` and print it with a one-line digest.
pub(crate) fn write_summary(dir: &Path, summary: &Summary) -> Result<()> {
    let text = serde_json::to_string_pretty(summary)?;
    std::fs::write(dir.join(rundir::SUMMARY_FILE), &text)?;
    let pct = |v: Option<f64>| v.map(|x| format!("{:.2}%", 100.0 * x)).unwrap_or_else(|| "-".into());
    tracing::info!(
        "done: {} steps, final loss {:.4}, {:.0} samples/s | kNN top-1: trained {}  untrained {}  {} {}{}",
        summary.steps,
        summary.final_loss,
        summary.samples_per_s,
        pct(summary.eval.knn_top1),
        pct(summary.knn_top1_init),
        match (summary.knn_top1_raw_pixels, summary.knn_top1_bag_of_words) {
            (_, Some(_)) => "bag of words",
            (Some(_), None) => "raw pixels",
            (None, None) => "baseline",
        },
        pct(summary.knn_top1_raw_pixels.or(summary.knn_top1_bag_of_words)),
        summary.eval.zero_shot_top1.map(|z| format!(" | zero-shot top-1 {:.2}%", 100.0 * z)).unwrap_or_default()
    );
    println!("{text}");
    Ok(())
}

/// Drop the lines of `steps.jsonl` past `keep_through` (steps logged after the
/// checkpoint a run resumes from), so that the log holds each step once.
pub(crate) fn truncate_step_log(path: &Path, keep_through: usize) -> Result<()> {
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
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let tmp = path.with_file_name(rundir::tmp_name(&name, None));
        std::fs::write(&tmp, kept)?;
        std::fs::rename(&tmp, path)?;
    }
    Ok(())
}

/// `trainer --config FILE`: train, then write `summary.json`. Aborts every rank on error.
pub fn train_command(path: &Path, overrides: &[String]) -> Result<Summary> {
    collective_command(|comm| train(comm, path, overrides))
}

/// Run a command on this process's communicator. A panic on one rank must not
/// unwind into MPI_Finalize while the others wait in a collective: it becomes an
/// error (the panic hook has printed it), and any error aborts the whole job.
fn collective_command<T>(f: impl FnOnce(&Comm) -> Result<T>) -> Result<T> {
    let comm = Comm::from_env().map_err(anyhow::Error::msg)?;
    signals::install().context("installing the stop-signal handlers")?;
    let _rank = tracing::error_span!("rank", rank = comm.rank()).entered();
    let out = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(&comm)))
        .unwrap_or_else(|panic| Err(anyhow::anyhow!("panicked: {}", panic_message(&panic))));
    if let Err(e) = &out {
        if comm.world_size() > 1 {
            tracing::error!("{e:#}");
            comm.abort_job(2);
        }
    }
    out
}

/// The message of a caught panic.
fn panic_message(panic: &Box<dyn std::any::Any + Send>) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(no message)".into())
}

/// Train with an explicit communicator (tests pass the threaded backend).
pub fn train<C: Collective>(comm: &C, path: &Path, overrides: &[String]) -> Result<Summary> {
    let mut plan = load_plan(comm, path, overrides)?;
    watchdog::start(comm.rank(), plan.config.train.timeout_s);
    // Held until training ends: a second run into checkpoint.dir is refused.
    let _lock = runlock::claim(comm, &plan)?;
    // Only with a pretrained file: a resume's search for its checkpoint (and its warnings) happens once.
    if comm.rank() == 0 && plan.config.model.pretrained.is_some() && !pretrained::resuming(&plan)? {
        // Recorded in config.yaml and summary.json; only rank 0 reads the file.
        plan.config.model.pretrained_sha256 = pretrained::pretrained_sha256(&plan)?;
    }
    if plan.method.name == "pba" {
        return pba::train(comm, plan);
    }
    compute_threads(&plan);
    let device = resolve_device(&plan.config.train.device, comm.local_rank())?;
    let (input, class_names) = open_training_input(comm, &plan)?;
    plan.resolve_epochs(input.len())?;
    plan.resolve_items(input.len())?;
    if comm.rank() == 0 {
        tracing::info!("{}", plan.describe());
        let n = tch::get_num_threads();
        let allocator = match alloc::dirty_decay_ms() {
            Some(-1) => "jemalloc, freed pages kept for reuse",
            Some(_) => "jemalloc, freed pages decay (MALLOC_CONF)",
            None => "the system's",
        };
        tracing::info!(
            "device={device:?} intra-op threads per rank={} (libtorch reports {n}); allocator: {allocator}",
            plan.threads
        );
        write_resolved_config(&plan)?;
    }
    let view_shapes = (0..input.views().max(1)).map(|k| input.view_shape(k)).collect();
    let sampler = contrast_data::Sampler::new(input.len(), plan.global_batch, plan.config.seed)?;
    let tokenizer = data::tokenizer(&plan)?;
    let schedule = data::randaug_schedule(&plan)?;
    let method = build_method(comm, &plan, device, &tokenizer)?;
    if plan.config.eval.whiten {
        eval::check_whiten_dim(&plan.config.eval, method.backbone().out_dim())?;
    }
    let eval = eval_data(&plan, &input)?;
    let mode = data::mode(&plan, &tokenizer, class_names)?;
    let dataset_fingerprint = input.fingerprint();
    let parts = Parts { method, device, tokenizer, view_shapes, eval, sampler, dataset_fingerprint };
    let mut trainer = Trainer::new(comm, plan.clone(), parts)?;
    if trainer.start_step() >= plan.steps {
        return Ok(nothing_to_train(comm, &plan, trainer.start_step()));
    }
    trainer.baselines()?;
    let mut config = pipeline_config(comm, &plan, trainer.start_step(), mode);
    config.gated_epochs = trainer.gated_epochs(trainer.start_step());
    let pipeline = Pipeline::start_scheduled(input, config, schedule)?;
    trainer.run(pipeline)
}

/// A resume whose checkpoint already holds `train.steps` steps: say so (the
/// run's summary and evaluations stay as they were) instead of finishing again.
fn nothing_to_train<C: Collective>(comm: &C, plan: &Plan, at: usize) -> Summary {
    if comm.rank() == 0 {
        tracing::warn!(
            "nothing to train: the checkpoint in {} is at step {at} and train.steps is {}; \
             raise train.steps to train further, or start over with checkpoint.overwrite=true \
             and train.resume=false. {} is unchanged",
            plan.config.checkpoint.dir.display(),
            plan.steps,
            rundir::SUMMARY_FILE
        );
    }
    Summary {
        steps: at,
        final_loss: f64::NAN,
        world_size: plan.world_size,
        global_batch: plan.global_batch,
        ..Default::default()
    }
}

/// Open the training data on rank 0 first (it builds any index cache the
/// others then read), then on the other ranks, and check that every rank holds
/// the same dataset: its length and fingerprint are gathered before step 1.
fn open_training_input<C: Collective>(comm: &C, plan: &Plan) -> Result<(Input, Vec<String>)> {
    let first = (comm.rank() == 0).then(|| data::training_input(plan));
    let mut ok = [first.as_ref().map_or(0u8, |r| r.is_ok() as u8)];
    comm.broadcast(&mut ok, 0);
    if ok[0] == 0 && comm.rank() != 0 {
        bail!("rank 0 could not open the training data (its error says why)");
    }
    let (input, names) = match first {
        Some(opened) => opened?,
        None => data::training_input(plan)?,
    };
    let mine = [input.len() as i64, input.fingerprint() as i64];
    let all = comm.all_gather(&mine);
    if let Some(r) = (1..comm.world_size()).find(|&r| all[2 * r..2 * r + 2] != all[..2]) {
        bail!(
            "rank {r} opened a different training set than rank 0 ({} samples, fingerprint {:016x}, against {} and {:016x}): \
             data.root must name the same files on every node",
            all[2 * r],
            all[2 * r + 1] as u64,
            all[0],
            all[1] as u64
        );
    }
    Ok((input, names))
}

/// The pipeline of this rank, from `start_step` to the end of the run.
fn pipeline_config<C: Collective>(comm: &C, plan: &Plan, start_step: usize, mode: Mode) -> PipelineConfig {
    PipelineConfig {
        seed: plan.config.seed,
        rank: comm.rank(),
        world_size: plan.world_size,
        global_batch: plan.global_batch,
        workers: plan.workers,
        prefetch: plan.config.data.prefetch,
        start_step,
        end_step: plan.steps,
        mode,
        mix: data::mix_config(plan),
        // Shuffle-BN: this rank's key views (view 1) are those of the rows the permutation of (seed, step) gives it.
        shuffle_view: plan.method.shuffled_view,
        // Set by the trainer, which asks the method which epochs wait for their start.
        gated_epochs: Default::default(),
    }
}

/// The evaluation data of a run that evaluates, reusing the opened training source.
fn eval_data(plan: &Plan, input: &Input) -> Result<Option<EvalData>> {
    let e = &plan.config.eval;
    if !(e.at_end || e.every > 0) {
        return Ok(None);
    }
    let opened = match input {
        Input::Files { source, .. } => Some(source.clone()),
        Input::Idx { .. } | Input::Lines { .. } => None,
    };
    Ok(match data::load_eval(plan, opened)? {
        Ok(d) => Some(d),
        Err(why) => {
            tracing::info!("evaluation skipped: {why}");
            None
        }
    })
}

/// The run directory's copy of the configuration: `checkpoint.dir/config.yaml`,
/// every default filled in (what `trainer eval` reads when `--config` is omitted).
fn write_resolved_config(plan: &Plan) -> Result<()> {
    // Overwriting happened once, at this run's start: a resume from this file must not ask for it again.
    let mut plan = plan.clone();
    plan.config.checkpoint.overwrite = false;
    let dir = &plan.config.checkpoint.dir;
    std::fs::create_dir_all(dir).with_context(|| format!("creating checkpoint.dir {}", dir.display()))?;
    let text = format!(
        "{} (every default filled in), written by trainer {}.\n\
         # `trainer eval --checkpoint {}` reads it when --config is omitted.\n{}",
        contrast_config::RESOLVED_HEADER,
        env!("CARGO_PKG_VERSION"),
        dir.display(),
        plan.resolved_yaml()
    );
    let (path, tmp) = (dir.join(rundir::CONFIG_FILE), dir.join(rundir::tmp_name(rundir::CONFIG_FILE, None)));
    std::fs::write(&tmp, text).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, &path).with_context(|| format!("writing {}", path.display()))
}

/// The config of a command: `--config FILE`, or else the `config.yaml` of the
/// run directory that `checkpoint` is (or is a `step-<N>` directory of).
pub fn config_path(config: Option<&Path>, checkpoint: &Path) -> Result<std::path::PathBuf> {
    if let Some(c) = config {
        return Ok(c.to_path_buf());
    }
    let run_dir = match checkpoint.join(rundir::STATE_FILE).is_file() {
        true => checkpoint.parent().map(Path::to_path_buf),
        // A population's directory: its best member's run.
        false => Some(pba::best_member_dir(checkpoint).unwrap_or_else(|| checkpoint.to_path_buf())),
    };
    let found = run_dir.map(|d| d.join(rundir::CONFIG_FILE)).filter(|p| p.is_file());
    found.with_context(|| {
        format!("no --config given and no {} in the run directory of {}", rundir::CONFIG_FILE, checkpoint.display())
    })
}

/// The rank's compute threads: denormals flushed to zero (before libtorch's
/// intra-op pool starts, so its threads inherit it) and the plan's count.
pub(crate) fn compute_threads(plan: &Plan) {
    contrast_nn::precision::flush_denormal(true);
    tch::set_num_threads(plan.threads as i32);
}
