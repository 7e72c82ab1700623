//! The loop's parts, each deciding when it runs: the checkpointer, the
//! evaluator, the step log, the collapse guard and the metrics; with the
//! optimiser and schedule of the plan, the control vector that rides on each
//! step's loss all-reduce, and the resume compatibility check.

use crate::checkpoint::{self, Slot, State};
use crate::eval::{self, EvalData};
use crate::metrics::Metrics;
use crate::rundir::EVALS_FILE;
use crate::EvalFigures;
use anyhow::{bail, Context, Result};
use contrast_comm::Collective;
use contrast_config::{Plan, ScheduleName};
use contrast_data::text::Tokenizer;
use contrast_nn::encoder::text::Captions;
use contrast_nn::method::{Batch, Method};
use contrast_nn::optim::{Optimizer, OptimizerKind, Schedule};
use contrast_nn::state::StateItem;
use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;
use tch::{Device, Tensor};

/// Append an evaluation to the run's `evals.jsonl` and redraw `plot.png`
/// (rank 0; a plot that cannot be drawn is a warning, never a failed run).
pub(super) fn record_evaluation(dir: &std::path::Path, step: usize, f: &EvalFigures) -> Result<()> {
    let mut line = serde_json::to_value(f)?;
    line["step"] = serde_json::json!(step);
    let mut file = std::fs::OpenOptions::new().create(true).append(true).open(dir.join(EVALS_FILE))?;
    writeln!(file, "{line}")?;
    if let Err(e) = crate::plot::plot(dir) {
        tracing::warn!("plot: {e:#}");
    }
    Ok(())
}

/// Steps the collapse guard waits below its threshold before it warns.
pub const COLLAPSE_PATIENCE: usize = 20;

/// Indices of the control vector that rides on each step's loss all-reduce.
pub(super) mod control {
    /// Samples this rank's batch could not read (summed: all ranks).
    pub const BAD_SAMPLES: usize = 0;
    /// 1 where this rank has received a stop signal (summed: the ranks that have).
    pub const STOP: usize = 1;
    /// Length of the vector.
    pub const LEN: usize = 2;
}

/// The optimiser of the plan: SGD or AdamW, wrapped in LARS when asked, over
/// the method's parameter groups, tracking the parameters the method restarts
/// each epoch ([`Method::restarts`]).
pub fn optimizer(plan: &Plan, method: &dyn Method) -> Result<Optimizer> {
    let o = &plan.config.train.optimizer;
    let kind = match o.name {
        contrast_config::OptimizerName::Sgd => OptimizerKind::Sgd { momentum: o.momentum, nesterov: o.nesterov },
        contrast_config::OptimizerName::Adamw => {
            OptimizerKind::AdamW { beta1: o.betas[0], beta2: o.betas[1], eps: o.eps }
        }
    };
    let mut opt = Optimizer::new(kind, o.weight_decay, method.params());
    opt.track_restarts(&method.restarts()).map_err(|e| anyhow::anyhow!("method {}: {e}", method.name()))?;
    Ok(if o.lars { opt.with_lars(o.trust_coefficient) } else { opt })
}

/// The learning-rate schedule of the plan.
pub fn schedule(plan: &Plan) -> Schedule {
    let s = &plan.config.train.schedule;
    Schedule {
        peak: plan.peak_lr,
        warmup: s.warmup_steps as usize,
        total: plan.steps,
        final_frac: s.final_lr_frac,
        cosine: s.name == ScheduleName::Cosine,
    }
}

pub(super) fn optim_items(opt: &Optimizer) -> Vec<StateItem> {
    opt.named_state().into_iter().map(|(n, t)| StateItem::replicated(n, t)).collect()
}

/// A part that runs every `every` steps before the last (0: never); what it
/// does at the last step is its own business (a final checkpoint, an evaluation at the end).
#[derive(Debug, Clone, Copy)]
pub struct Cadence {
    /// Steps between runs (0 = none).
    pub every: usize,
}

impl Cadence {
    /// Whether the part runs after step `done` of `total`.
    pub fn due(&self, done: usize, total: usize) -> bool {
        self.every > 0 && done % self.every == 0 && done < total
    }
}

/// Writes checkpoints every `checkpoint.every` steps and at the end.
pub struct Checkpointer {
    pub(super) dir: PathBuf,
    pub(super) cadence: Cadence,
    pub(super) keep: usize,
}

impl Checkpointer {
    pub(super) fn save<C: Collective>(
        &self,
        comm: &C,
        method: &dyn Method,
        opt: &Optimizer,
        state: &State,
    ) -> Result<()> {
        let saved = checkpoint::save(
            comm,
            &self.dir,
            state,
            &method.state(),
            &optim_items(opt),
            Slot::Step { keep: self.keep },
        )?;
        if let Some(p) = saved {
            tracing::info!("checkpoint {}", p.display());
        }
        Ok(())
    }
}

/// kNN (and zero-shot) evaluation: baselines before training, every `eval.every` steps, at the end.
pub struct Evaluator {
    pub(super) data: EvalData,
    pub(super) cadence: Cadence,
    pub(super) at_end: bool,
}

/// kNN of the method's features (the training set as memory) and, for
/// image–text methods, zero-shot from class-name prompts, on the test set.
pub fn evaluate<C: Collective>(
    comm: &C,
    plan: &Plan,
    method: &dyn Method,
    data: &EvalData,
    tokenizer: &Tokenizer,
    device: Device,
) -> Result<EvalFigures> {
    crate::watchdog::phase(crate::watchdog::Phase::Evaluation);
    let c = &plan.config;
    let mut f = EvalFigures::default();
    let raw = method.backbone().out_dim();
    // `eval.whiten`: every figure below sees the whitened features.
    let whitening = match data.memory.as_ref() {
        Some(memory) => eval::whitening_of(comm, &c.eval, memory, device, raw, |x| method.features(x))?,
        None => None,
    };
    let dim = whitening.as_ref().map_or(raw, |w| w.1);
    let features = |x: &Tensor| match &whitening {
        Some((w, _)) => w.apply(&method.features(x)),
        None => method.features(x),
    };
    if let Some(memory) = data.memory.as_ref() {
        let (k, t) = (c.eval.knn_k, c.eval.knn_t);
        if let Some((knn, features)) = eval::knn_of(comm, memory, &data.test, device, dim, k, t, &features) {
            (f.knn_top1, f.knn_top5) = (Some(knn[0]), Some(knn[1]));
            let steps = c.eval.linear_probe_steps as usize;
            f.linear_top1 = (steps > 0).then(|| eval::linear_probe(comm, &features, steps));
        }
    }
    if let Some(aug) = &data.views {
        let (a, u) = eval::alignment_uniformity_of(comm, &data.test, aug, device, dim, c.seed, &features);
        (f.alignment, f.uniformity) = (Some(a), Some(u));
    }
    if plan.loss.is_image_text() {
        let (context, dim, names) = (c.model.text.context as usize, c.model.proj_dim, &data.class_names);
        if !names.is_empty() {
            let zs = eval::zero_shot_top1(comm, method, &data.test, device, names, tokenizer, context, dim)?;
            (f.zero_shot_top1, f.zero_shot_top5) = (zs.map(|z| z[0]), zs.map(|z| z[1]));
        }
        let r = eval::retrieval_of(comm, method, &data.test, names, device, tokenizer, context, dim)?;
        f.retrieval = r.map(Into::into);
    }
    Ok(f)
}

pub(super) fn log_figures(what: &str, f: &EvalFigures, extra: &str) {
    tracing::info!(
        "{what}: kNN top-1 {} top-5 {}{}{}{extra}",
        f.knn_top1.map(|v| format!("{v:.4}")).unwrap_or_else(|| "- (no labels)".into()),
        f.knn_top5.map(|v| format!("{v:.4}")).unwrap_or_else(|| "-".into()),
        f.linear_top1.map(|v| format!(", linear probe {v:.4}")).unwrap_or_default(),
        f.zero_shot_top1.map(|z| format!(", zero-shot {z:.4}")).unwrap_or_default()
            + &f.alignment
                .zip(f.uniformity)
                .map(|(a, u)| format!(", alignment {a:.3} uniformity {u:.3}"))
                .unwrap_or_default()
    );
}

/// `steps.jsonl` (rank 0) and the human log line every `train.log_every` steps.
pub struct StepLog {
    pub(super) file: Option<std::fs::File>,
    pub(super) every: usize,
    pub(super) window: (Instant, usize),
}

/// What one step produced, for the parts.
pub(super) struct StepRecord {
    pub(super) done: usize,
    pub(super) loss: f64,
    pub(super) lr: f64,
    pub(super) seconds: f64,
    pub(super) wait: f64,
    pub(super) bad_samples: f64,
    pub(super) grad_norm: f64,
    pub(super) embedding_std: f64,
    /// Ranks that had received a stop signal by this step's all-reduce.
    pub(super) stop_ranks: usize,
    /// Seconds of each of [`crate::metrics::PHASES`].
    pub(super) phases: [f64; 8],
    /// Minor page faults of this rank during the step (data wait excluded).
    pub(super) minor_faults: u64,
    /// This rank's peak resident set size so far, in bytes.
    pub(super) peak_rss_bytes: u64,
    /// CPU seconds of this rank's data workers since the previous step ended.
    pub(super) data_cpu_s: f64,
}

/// The device tensors of one step.
pub(super) struct Inputs {
    pub(super) views: Vec<Tensor>,
    pub(super) captions: Option<Captions>,
    pub(super) labels: Option<Tensor>,
    pub(super) mix: Option<contrast_nn::loss::Mix>,
    pub(super) indices: Vec<usize>,
}

impl Inputs {
    pub(super) fn batch(&self, step: usize) -> Batch<'_> {
        Batch {
            step,
            views: &self.views,
            captions: self.captions.as_ref(),
            labels: self.labels.as_ref(),
            mix: self.mix.as_ref(),
            indices: &self.indices,
        }
    }
}

impl StepLog {
    pub(super) fn write(&mut self, r: &StepRecord, global_batch: usize) -> Result<()> {
        if let Some(f) = self.file.as_mut() {
            let line = serde_json::json!({
                "step": r.done, "loss": r.loss, "lr": r.lr,
                // Wall clock, the wait for data included; the compute-only rate has its own name.
                "samples_per_s": global_batch as f64 / (r.seconds + r.wait),
                "compute_samples_per_s": global_batch as f64 / r.seconds,
                "data_wait_s": r.wait, "bad_files": r.bad_samples as u64, "grad_norm": r.grad_norm,
                "embedding_std": finite_or_null(r.embedding_std),
                // Rank 0's: a jump in faults per step is the allocator mapping buffers afresh.
                "minor_faults": r.minor_faults, "peak_rss_bytes": r.peak_rss_bytes, "data_cpu_s": r.data_cpu_s,
                "phase_s": crate::metrics::PHASES.iter().zip(r.phases).map(|(k, v)| (k.to_string(), v.into())).collect::<serde_json::Map<_, _>>(),
            });
            writeln!(f, "{line}")?;
        }
        self.window.1 += 1;
        Ok(())
    }

    pub(super) fn print(&mut self, r: &StepRecord, plan: &Plan, start: usize, status: &str) {
        let done = r.done;
        if self.file.is_none() || !(done % self.every == 0 || done == plan.steps || done == start + 1) {
            return;
        }
        let el = self.window.0.elapsed().as_secs_f64();
        let samples_per_s = self.window.1 as f64 * plan.global_batch as f64 / el;
        let (steps, wait_ms) = (plan.steps, r.wait * 1e3);
        if crate::plain_logs() {
            tracing::info!(
                "step {done}/{steps} loss {:.4} lr {:.5} {samples_per_s:.0} samples/s data-wait {wait_ms:.1}ms emb-std {:.4}{status}",
                r.loss,
                r.lr,
                r.embedding_std,
            );
        } else {
            // `--log-format json`: the figures are fields, not text inside the message.
            let (loss, lr, embedding_std, status) = (r.loss, r.lr, r.embedding_std, status.trim());
            tracing::info!(
                step = done,
                steps,
                loss,
                lr,
                samples_per_s,
                data_wait_ms = wait_ms,
                embedding_std,
                status,
                "step {done}/{steps}"
            );
        }
        self.window = (Instant::now(), 0);
    }
}

pub(super) fn finite_or_null(x: f64) -> serde_json::Value {
    if x.is_finite() {
        serde_json::json!(x)
    } else {
        serde_json::Value::Null
    }
}

/// Warns when the spread of the embeddings (std · √d: 1 healthy, 0 collapsed)
/// stays below the threshold for [`COLLAPSE_PATIENCE`] steps.
pub struct CollapseGuard {
    pub(super) threshold: f64,
    pub(super) dim: f64,
    pub(super) below: usize,
}

impl CollapseGuard {
    pub(super) fn observe(&mut self, std: f64, done: usize) {
        if self.threshold <= 0.0 || !std.is_finite() {
            return;
        }
        let spread = std * self.dim.sqrt();
        self.below = if spread < self.threshold { self.below + 1 } else { 0 };
        if self.below == COLLAPSE_PATIENCE {
            tracing::warn!(
                "step {done}: the embeddings may be collapsing: std·√d = {spread:.4} has stayed below \
                 train.collapse_threshold = {} for {COLLAPSE_PATIENCE} steps (1 is healthy)",
                self.threshold
            );
        }
    }
}

/// Whether a checkpoint's run can be continued by this one: the same seed,
/// global batch, method, loss and dataset size (the world size and
/// `train.steps` may change). Fields an older checkpoint lacks are not compared.
pub(super) fn compatible(theirs: &State, mine: &State) -> Result<()> {
    let differ = |key: &str, a: String, b: String| -> Result<()> {
        if a != b {
            bail!("`{key}` is {b} in this config but {a} in the checkpoint; a resume must keep it");
        }
        Ok(())
    };
    differ("seed", theirs.seed.to_string(), mine.seed.to_string())?;
    differ("train.global_batch", theirs.global_batch.to_string(), mine.global_batch.to_string())?;
    let opt = |a: &Option<String>, b: &Option<String>, key: &str| match (a, b) {
        (Some(a), Some(b)) => differ(key, a.clone(), b.clone()),
        _ => Ok(()),
    };
    // Checkpoints before 0.2 spell these as Rust does (`MocoV2`, `InfoNce`): compare spellings alike.
    let spelled = |s: &Option<String>| s.as_ref().map(|s| s.to_lowercase().replace('_', ""));
    opt(&spelled(&theirs.method), &spelled(&mine.method), "method.name")?;
    opt(&spelled(&theirs.loss_name), &spelled(&mine.loss_name), "loss.name")?;
    let len = |s: &State| s.dataset_len.map(|n| format!("{n} samples"));
    opt(&len(theirs), &len(mine), "data.root")?;
    let fp = |s: &State| s.dataset_fingerprint.as_ref().map(|f| format!("a dataset of fingerprint {f}"));
    let version = |s: &State| s.dataset_fingerprint_version.unwrap_or(1);
    if version(theirs) != version(mine) && fp(theirs) != fp(mine) {
        // An older form hashed absolute paths without sizes: it cannot be compared with this one.
        tracing::warn!(
            "the checkpoint's dataset fingerprint is of form {} (absolute paths, no sizes), this version's is of \
             form {} (paths relative to data.root, and sizes): the dataset's content is not compared on this \
             resume (its length is); the next checkpoint records the new form",
            version(theirs),
            version(mine)
        );
        return Ok(());
    }
    opt(&fp(theirs), &fp(mine), "data.root")
}

/// This rank's metrics: the registry, its `/metrics` endpoint (local rank r on
/// base port + r) and the textfile, as `metrics.*` asks.
pub(super) fn start_metrics<C: Collective>(comm: &C, plan: &Plan) -> Result<Option<Metrics>> {
    let m = &plan.config.metrics;
    if !m.enabled && m.textfile_dir.is_none() {
        return Ok(None);
    }
    let histograms = m.histograms == contrast_config::HistogramRanks::All || comm.rank() == 0;
    let mut metrics = Metrics::new(comm.rank(), plan.negatives_per_anchor)?.with_histograms(histograms);
    if let Some(dir) = &m.textfile_dir {
        metrics = metrics.with_textfile(dir.clone(), comm.rank(), m.textfile_every as usize)?;
    }
    if m.enabled {
        let (host, port) = m.host_port().context("metrics.listen")?;
        let served = crate::metrics::serve(
            metrics.registry().clone(),
            crate::metrics::address(host, port, comm.local_rank())?,
            crate::metrics::Bounds { connections: plan.config.metrics.max_connections, ..Default::default() },
        );
        if let Some(addr) = served {
            metrics.set_served(addr);
        }
    }
    Ok(Some(metrics))
}

/// Gather every rank's scrape address and, on rank 0, write them to
/// `checkpoint.dir/prometheus-targets.json`. Collective: every rank calls it,
/// with metrics or without (`metrics.textfile_dir` may differ per node). Ranks
/// that could not bind are left out; with none, no file is written.
pub(super) fn publish_targets<C: Collective>(
    comm: &C,
    metrics: Option<&mut Metrics>,
    plan: &Plan,
    run_id: u64,
) -> Result<()> {
    let mine = metrics.as_ref().and_then(|m| m.served()).map(crate::metrics::scrape_target).unwrap_or_default();
    let targets: Vec<String> = crate::agree::gather_text(comm, &mine).into_iter().filter(|t| !t.is_empty()).collect();
    match metrics {
        Some(m) if comm.rank() == 0 && !targets.is_empty() => {
            let labels = [("contrast_run_id", format!("{run_id:016x}")), ("contrast_method", plan.method.name.clone())];
            m.publish_targets(&plan.config.checkpoint.dir, &targets, &labels)
        }
        _ => Ok(()),
    }
}

/// Every rank's `indices` (of any length), gathered: the longest length is
/// agreed first and the shorter lists are padded with −1.
pub(super) fn gather_indices<C: Collective>(comm: &C, indices: &[usize]) -> Vec<usize> {
    let mut longest = [indices.len() as i64];
    comm.all_reduce_max(&mut longest);
    let mut mine: Vec<i64> = indices.iter().map(|&i| i as i64).collect();
    mine.resize(longest[0] as usize, -1);
    comm.all_gather(&mine).into_iter().filter(|&i| i >= 0).map(|i| i as usize).collect()
}

/// A run identity from rank 0's clock and process id, the same on every rank
/// (the metrics of every rank label the run with it).
pub(super) fn fresh_run_id<C: Collective>(comm: &C) -> u64 {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
    let mut id = [contrast_data::rng::key(&[nanos as u64, (nanos >> 64) as u64, std::process::id() as u64]) as i64];
    comm.broadcast(&mut id, 0);
    id[0] as u64
}

/// The first parameter holding a non-finite value, if any. One reduction over
/// all parameters (the largest |w| of each, stacked; NaN propagates through
/// the maximum) and one host sync per step; the weights are replicated, so
/// every rank decides alike without a collective.
pub(super) fn non_finite_weight(opt: &Optimizer) -> Option<String> {
    let maxima: Vec<Tensor> = opt.params.iter().map(|p| p.tensor.detach().abs().max()).collect();
    if maxima.is_empty() {
        return None;
    }
    let all = Tensor::stack(&maxima, 0).max();
    if f64::try_from(&all).is_ok_and(f64::is_finite) {
        return None;
    }
    let bad = opt.params.iter().find(|p| !f64::try_from(&p.tensor.detach().abs().max()).is_ok_and(f64::is_finite));
    Some(bad.map_or_else(|| "?".into(), |p| p.name.clone()))
}
