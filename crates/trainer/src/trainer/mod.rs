//! The training loop: a small struct whose parts each decide when they run
//! (torchtitan's shape). [`Trainer::run`] takes host batches from the
//! pipeline; each step runs the method through the exact engine, steps the
//! optimiser, lets the method do its after-step work, and then asks each part
//! whether it is due: the step log, the collapse guard, the checkpointer and
//! the evaluator.
//!
//! Every rank takes the same decisions at the same step: the loss is the
//! all-reduced sum, and the step's control vector (bad samples and stop
//! requests from signals) rides on that same all-reduce.

use crate::checkpoint::{self, Slot, State};
use crate::eval::{self, EvalData};
use crate::metrics::{Metrics, StepFigures, StepTimes};
use crate::rundir::{EVALS_FILE, STEPS_FILE};
use crate::{EvalFigures, Summary};
use anyhow::{bail, Context, Result};
use contrast_comm::Collective;
use contrast_config::{Plan, Precision};
use contrast_data::pipeline::BadBudget;
use contrast_data::text::Tokenizer;
use contrast_data::{HostBatch, Pipeline};
use contrast_nn::encoder::text::Captions;
use contrast_nn::engine::{Gathered, StepOutput, Towers};
use contrast_nn::loss::Ctx;
use contrast_nn::method::{embedding_std, Batch, Method, StepInfo};
use contrast_nn::optim::{Optimizer, Schedule};
use contrast_nn::{precision, GlobalBatch};
use std::sync::Arc;
use std::time::Instant;
use tch::{Device, Tensor};

mod epoch;
mod looping;
mod member;
mod parts;

pub use looping::Ran;

use parts::*;
pub use parts::{evaluate, optimizer, schedule, Checkpointer, CollapseGuard, Evaluator, StepLog, COLLAPSE_PATIENCE};

/// Where the run stands.
struct Progress {
    start_step: usize,
    last_loss: f64,
    trained_steps: usize,
    train_time: f64,
    /// Seconds the steps waited for their batches.
    wait_time: f64,
    /// kNN of the untrained encoder and of raw pixels (measured at step 0, carried across resumes).
    init: (Option<f64>, Option<f64>),
    epoch: Option<usize>,
    /// Identity of the run (rank 0's is the one written), kept across resumes.
    run_id: u64,
    /// The best `checkpoint.best` figure so far (kept across resumes).
    best: Option<f64>,
    /// The data workers' CPU seconds when the previous step ended.
    data_cpu: f64,
}

impl Progress {
    /// The data workers' CPU seconds since the previous call, given the total now.
    fn data_cpu_since(&mut self, total: f64) -> f64 {
        (total - std::mem::replace(&mut self.data_cpu, total)).max(0.0)
    }
}

/// The training loop and its parts.
pub struct Trainer<'c, C: Collective> {
    comm: &'c C,
    plan: Plan,
    device: Device,
    method: Box<dyn Method>,
    opt: Optimizer,
    schedule: Schedule,
    tokenizer: Arc<Tokenizer>,
    view_shapes: Vec<(usize, usize, usize)>,
    checkpointer: Checkpointer,
    evaluator: Option<Evaluator>,
    log: StepLog,
    guard: CollapseGuard,
    progress: Progress,
    sampler: contrast_data::Sampler,
    dataset_fingerprint: u64,
    /// Unreadable samples met by every rank so far, against data.max_bad_fraction.
    bad: BadBudget,
    /// Prometheus series of this rank (None: `metrics.enabled: false` and no textfile).
    metrics: Option<Metrics>,
    /// The gradient buckets, kept across steps (the gradients view them).
    grad_buffers: contrast_nn::engine::GradBuffers,
    /// The un-augmented training set of the feature pass, opened at its first use.
    train_set: Option<crate::eval::EvalSet>,
    /// Test hooks: pretend the loss (or a gradient) of this step is NaN.
    fault_step: Option<usize>,
    fault_grad_step: Option<usize>,
    fault_panic_step: Option<usize>,
    fault_step_sleep: Option<std::time::Duration>,
}

/// What [`Trainer::new`] needs besides the communicator and the plan.
pub struct Parts {
    /// The method, built and identical on every rank.
    pub method: Box<dyn Method>,
    /// Device of the run.
    pub device: Device,
    /// The caption tokenizer.
    pub tokenizer: Arc<Tokenizer>,
    /// Shape (channels, height, width) of each view.
    pub view_shapes: Vec<(usize, usize, usize)>,
    /// Evaluation data, when the run evaluates.
    pub eval: Option<EvalData>,
    /// The sampler of the training set (epochs of a step).
    pub sampler: contrast_data::Sampler,
    /// The training set's fingerprint, agreed by every rank.
    pub dataset_fingerprint: u64,
}

impl<'c, C: Collective> Trainer<'c, C> {
    /// Assemble the loop, resuming from `checkpoint.dir/latest` when `train.resume` is set.
    pub fn new(comm: &'c C, plan: Plan, parts: Parts) -> Result<Self> {
        let c = &plan.config;
        let opt = optimizer(&plan, parts.method.as_ref())?;
        let (every, at_end) = (c.eval.every as usize, c.eval.at_end);
        let bad = BadBudget::new(c.data.max_bad_fraction, parts.sampler.dataset_len(), []);
        let mut t = Self {
            comm,
            device: parts.device,
            schedule: schedule(&plan),
            opt,
            tokenizer: parts.tokenizer,
            view_shapes: parts.view_shapes,
            checkpointer: Checkpointer {
                dir: c.checkpoint.dir.clone(),
                cadence: Cadence { every: c.checkpoint.every as usize },
                keep: c.checkpoint.keep,
            },
            evaluator: parts.eval.map(|data| Evaluator { data, cadence: Cadence { every }, at_end }),
            log: StepLog { file: None, every: c.train.log_every as usize, window: (Instant::now(), 0) },
            guard: CollapseGuard { threshold: c.train.collapse_threshold, dim: c.model.proj_dim as f64, below: 0 },
            progress: Progress {
                start_step: 0,
                last_loss: f64::NAN,
                trained_steps: 0,
                train_time: 0.0,
                wait_time: 0.0,
                init: (None, None),
                epoch: None,
                run_id: fresh_run_id(comm),
                best: None,
                data_cpu: 0.0,
            },
            metrics: start_metrics(comm, &plan)?,
            grad_buffers: Default::default(),
            train_set: None,
            fault_step: std::env::var("CONTRAST_FAULT_NAN_AT_STEP").ok().and_then(|s| s.parse().ok()),
            fault_grad_step: std::env::var("CONTRAST_FAULT_NAN_GRAD_AT_STEP").ok().and_then(|s| s.parse().ok()),
            fault_panic_step: std::env::var("CONTRAST_FAULT_PANIC_AT_STEP").ok().and_then(|s| s.parse().ok()),
            fault_step_sleep: std::env::var("CONTRAST_FAULT_STEP_SLEEP_MS")
                .ok()
                .and_then(|s| s.parse().ok())
                .map(std::time::Duration::from_millis),
            method: parts.method,
            sampler: parts.sampler,
            dataset_fingerprint: parts.dataset_fingerprint,
            bad,
            plan,
        };
        if t.plan.config.train.resume {
            t.resume()?;
        }
        t.open_log()?;
        publish_targets(comm, t.metrics.as_mut(), &t.plan, t.progress.run_id)?;
        if let Some(m) = &t.metrics {
            let c = &t.plan.config;
            let loss = t.plan.loss.name();
            m.set_run(&crate::metrics::RunInfo {
                method: &t.plan.method.name,
                loss: &loss,
                encoder: &c.model.encoder,
                world_size: t.plan.world_size,
                run_id: t.progress.run_id,
                steps: t.plan.steps,
            });
        }
        Ok(t)
    }

    /// The step the run continues from.
    pub fn start_step(&self) -> usize {
        self.progress.start_step
    }

    fn resume(&mut self) -> Result<()> {
        let dir = self.plan.config.checkpoint.dir.clone();
        let (model, optim) = (self.method.state(), optim_items(&self.opt));
        let p = self.comm.world_size();
        let expect = checkpoint::Expect { model: &model, optim: Some(&optim), world_size: p };
        let find = || checkpoint::newest_valid(&dir, Some(&expect));
        let mine = self.state(0, 0.0);
        let accept = |st: &State| compatible(st, &mine);
        let Some(loaded) = checkpoint::load(self.comm, find, accept, &model, Some(&optim))? else {
            if self.comm.rank() == 0 {
                tracing::info!("train.resume=true but {} has no checkpoint yet: starting fresh", dir.display());
            }
            return Ok(());
        };
        let st = &loaded.state;
        let rank = self.comm.rank();
        self.method.load_state(&loaded.model, rank, p).with_context(|| loaded.dir.display().to_string())?;
        let optim: Vec<(String, Tensor)> = loaded.optim.into_iter().collect();
        self.opt.load_state(&optim).map_err(|e| anyhow::anyhow!("{}: {e}", loaded.dir.display()))?;
        self.progress.start_step = st.step;
        // Mid-epoch, what the epoch's start computed came back with the state: not again.
        self.progress.epoch = st.step.checked_sub(1).map(|s| self.sampler.epoch_of(s));
        self.progress.last_loss = st.loss;
        self.progress.init = (st.knn_top1_init, st.knn_top1_raw_pixels);
        self.progress.best = st.best_metric;
        self.progress.run_id = st.run_id.unwrap_or(self.progress.run_id);
        self.bad =
            BadBudget::new(self.plan.config.data.max_bad_fraction, self.sampler.dataset_len(), st.bad_samples.clone());
        if rank == 0 {
            tracing::info!(
                "resumed from {} at step {} (written by {} ranks, now {p})",
                loaded.dir.display(),
                st.step,
                st.world_size
            );
        }
        Ok(())
    }

    fn open_log(&mut self) -> Result<()> {
        let dir = &self.plan.config.checkpoint.dir;
        if self.comm.rank() == 0 {
            std::fs::create_dir_all(dir).with_context(|| format!("creating checkpoint.dir {}", dir.display()))?;
            let path = dir.join(STEPS_FILE);
            crate::truncate_step_log(&path, self.progress.start_step)?;
            // Evaluations after the resumed step belong to the interrupted continuation; a fresh run has none.
            let evals = dir.join(EVALS_FILE);
            match self.progress.start_step {
                0 if evals.exists() => std::fs::remove_file(&evals).context("removing an old evals.jsonl")?,
                0 => {}
                s => crate::truncate_step_log(&evals, s)?,
            }
            let f = std::fs::OpenOptions::new().create(true).append(true).open(&path).context("opening steps.jsonl")?;
            self.log.file = Some(f);
        }
        self.comm.barrier();
        Ok(())
    }

    /// Raw pixels and the untrained encoder, before the first step of a fresh run.
    pub fn baselines(&mut self) -> Result<()> {
        let Some(ev) = self.evaluator.as_ref().filter(|e| e.at_end && self.progress.start_step == 0) else {
            return Ok(());
        };
        let (c, t0) = (&self.plan.config, Instant::now());
        let raw = match ev.data.memory.as_ref() {
            Some(m) => eval::raw_pixels_knn(self.comm, &c.eval, m, &ev.data.test, self.device)?,
            None => None,
        };
        let init = evaluate(self.comm, &self.plan, self.method.as_ref(), &ev.data, &self.tokenizer, self.device)?;
        self.progress.init = (init.knn_top1, raw);
        let bow =
            (c.data.dataset.is_lines()).then(|| eval::bag_of_words_alignment(self.comm, &ev.data.test, self.device));
        if self.comm.rank() == 0 {
            let raw = match (raw, bow.flatten()) {
                (Some(r), Some((a, u))) => format!(", bag of words {r:.4} (alignment {a:.3} uniformity {u:.3})"),
                (r, _) => r.map(|r| format!(", raw pixels {r:.4}")).unwrap_or_default(),
            };
            let extra = format!("{raw} ({:.1}s)", t0.elapsed().as_secs_f64());
            log_figures("before training (untrained encoder)", &init, &extra);
            record_evaluation(&self.plan.config.checkpoint.dir, 0, &init)?;
        }
        Ok(())
    }

    fn state(&self, step: usize, loss: f64) -> State {
        State {
            step,
            epoch: self.sampler.epoch_of(step),
            seed: self.plan.config.seed,
            world_size: self.plan.world_size,
            global_batch: self.plan.global_batch,
            loss,
            method: Some(self.plan.method.name.clone()),
            loss_name: Some(self.plan.loss.name()),
            dataset_len: Some(self.sampler.dataset_len()),
            dataset_fingerprint: Some(format!("{:016x}", self.dataset_fingerprint)),
            dataset_fingerprint_version: Some(contrast_data::source::FINGERPRINT_VERSION),
            bad_samples: self.bad.seen(),
            run_id: Some(self.progress.run_id),
            knn_top1_init: self.progress.init.0,
            knn_top1_raw_pixels: self.progress.init.1,
            best_metric: self.progress.best,
        }
    }

    fn save(&self, step: usize, loss: f64) -> Result<()> {
        self.checkpointer.save(self.comm, self.method.as_ref(), &self.opt, &self.state(step, loss))
    }

    /// The device tensors of a host batch: views, captions, the global batch's
    /// labels (supervised losses) and the mixing.
    fn tensors(&self, batch: &mut HostBatch) -> Inputs {
        let (device, b) = (self.device, self.plan.local_batch as i64);
        let views = batch
            .views
            .iter()
            .zip(&self.view_shapes)
            .map(|(v, &(ch, h, w))| upload(Tensor::from_slice(v).view([b, ch as i64, h as i64, w as i64]), device))
            .collect();
        // The rows are rows rank·B.. of the global batch (they key the text tower's dropout masks).
        let captions = (!batch.tokens.is_empty()).then(|| {
            let per_row = batch.text_end.len() / (b as usize).max(1);
            Captions::from_host_rows(&batch.tokens, &batch.text_end, per_row, self.comm.rank() * b as usize, device)
        });
        let labels = self
            .plan
            .loss
            .is_supervised()
            .then(|| Tensor::from_slice(&self.comm.all_gather(&batch.labels)).to_device(device));
        let mix = batch.mix.take().map(|(partner, lambda)| contrast_nn::loss::Mix { partner, lambda });
        Inputs { views, captions, labels, mix, indices: batch.indices.clone() }
    }

    /// The test hooks of step `done` (documented in docs/config.md).
    fn faults(&self, done: usize) {
        if let Some(pause) = self.fault_step_sleep {
            std::thread::sleep(pause);
        }
        if self.fault_panic_step == Some(done) {
            panic!("CONTRAST_FAULT_PANIC_AT_STEP: injected panic at step {done}");
        }
        if self.fault_grad_step == Some(done) {
            let _ = tch::no_grad(|| self.opt.params[0].tensor.grad().fill_(f64::NAN));
        }
    }

    /// One step: tensors from the host batch, the exact engine, the optimiser, the method's after-step work.
    fn step(&mut self, mut batch: HostBatch, pipeline: &mut Pipeline) -> Result<StepRecord> {
        let t0 = Instant::now();
        let mem0 = crate::alloc::ProcessCounters::now();
        let (step, wait, bad) = (batch.step, batch.wait, std::mem::take(&mut batch.bad));
        debug_assert_eq!(self.progress.epoch, Some(batch.epoch), "the epoch started before its first batch");
        let lr = self.schedule.lr(step);
        let inputs = self.tensors(&mut batch);
        // The tensors own copies: the host buffers go back to the pipeline for a later step.
        pipeline.recycle(batch);
        let batch = inputs.batch(step);
        self.opt.zero_grad();
        let mut ctl = [0.0; control::LEN];
        ctl[control::BAD_SAMPLES] = bad.len() as f64;
        ctl[control::STOP] = if crate::signals::received().is_some() { 1.0 } else { 0.0 };
        let (towers, out, monitor, forward) = self.exchange(&batch, &ctl, t0)?;
        let loss = if self.fault_step == Some(step + 1) { f64::NAN } else { out.loss };
        self.faults(step + 1);
        let t_opt = Instant::now();
        // The gradients are all-reduced already, so every rank computes the same norm and decides alike.
        let clip = self.plan.config.train.grad_clip;
        let grad_norm = if clip > 0.0 { self.opt.clip_grad_norm(clip) } else { self.opt.grad_norm() };
        self.check_finite(loss, grad_norm, step + 1)?;
        if out.control[control::BAD_SAMPLES] > 0.0 {
            let all = gather_indices(self.comm, &bad);
            self.bad.add(all).map_err(|e| anyhow::anyhow!("step {}: {e}", step + 1))?;
        }
        let info = StepInfo { done: step + 1, total: self.plan.steps, lr, local: &towers.local };
        self.method.before_optimizer_step(&info, &mut self.opt.exclusions())?;
        self.opt.step(lr);
        if let Some(name) = non_finite_weight(&self.opt) {
            let last = self.last_checkpoint();
            bail!("step {} wrote non-finite weights (`{name}`): stopping before any checkpoint holds them; the last good checkpoint ({last}) is intact", step + 1);
        }
        self.method.after_step(&info, self.comm)?;
        let p = out.phases;
        let (wait, optimizer) = (wait.as_secs_f64(), t_opt.elapsed().as_secs_f64());
        let mem = crate::alloc::ProcessCounters::now();
        Ok(StepRecord {
            done: step + 1,
            loss,
            lr,
            seconds: t0.elapsed().as_secs_f64(),
            wait,
            bad_samples: self.bad.count() as f64,
            grad_norm,
            embedding_std: monitor.as_ref().map(embedding_std).unwrap_or(f64::NAN),
            stop_ranks: out.control[control::STOP].round() as usize,
            phases: [wait, forward, p.gather, p.loss, p.reduce_scatter, p.backward, p.all_reduce, optimizer],
            minor_faults: mem.minor_faults.saturating_sub(mem0.minor_faults),
            peak_rss_bytes: mem.peak_rss_bytes,
            data_cpu_s: self.progress.data_cpu_since(mem.data_cpu_s),
        })
    }

    /// The method's forward and the exact engine, whole or with the gradient
    /// cache (`train.micro_batch`): the towers, the engine's output, the
    /// embeddings the collapse guard reads and the forward's seconds.
    fn exchange(&self, batch: &Batch, ctl: &[f64], t0: Instant) -> Result<(Towers, StepOutput, Option<Tensor>, f64)> {
        let engine = GlobalBatch::new(self.comm, self.plan.local_batch)
            .overlap(self.plan.config.train.overlap.enabled(self.comm.world_size() > self.comm.local_size()))
            .buffers(&self.grad_buffers);
        let (method, comm) = (self.method.as_ref(), self.comm);
        let mut monitor = None;
        let head = |g: &Gathered, ctx: &Ctx| {
            let share = method.loss_share(g, batch, ctx)?;
            monitor = share.monitor;
            Ok(share.loss)
        };
        let bf16 = self.plan.config.train.precision == Precision::Bf16;
        // The method's forward, under autocast with bf16; the towers leave it in fp32.
        let run = |b: &Batch| -> contrast_nn::Result<Towers> {
            let t = precision::autocast(bf16, self.device, || method.forward(b, comm))?;
            let f32 = |v: Vec<Tensor>| v.iter().map(precision::to_f32).collect();
            Ok(Towers { grad: f32(t.grad), aux: f32(t.aux), local: f32(t.local) })
        };
        let micro = self.plan.config.train.micro_batch;
        if micro > 0 && micro < self.plan.local_batch {
            let forward = |start: i64, len: i64| {
                let views: Vec<Tensor> = batch.views.iter().map(|v| v.narrow(0, start, len)).collect();
                let captions = batch.captions.map(|c| c.rows(start, len));
                let indices = &batch.indices[(start as usize).min(batch.indices.len())..]
                    [..(len as usize).min(batch.indices.len().saturating_sub(start as usize))];
                run(&Batch { step: batch.step, views: &views, captions: captions.as_ref(), indices, ..*batch })
            };
            let out = engine.step_chunked(micro, &self.opt.tensors(), ctl, forward, head)?;
            let forward = out.phases.forward;
            return Ok((Towers::default(), out, monitor, forward));
        }
        let towers = run(batch)?;
        let forward = t0.elapsed().as_secs_f64();
        let out = engine.step_towers(&towers, &self.opt.tensors(), ctl, head)?;
        Ok((towers, out, monitor, forward))
    }

    /// Hand an evaluation's accuracies to the metrics.
    fn report_eval(&self, step: usize, f: &EvalFigures) -> Result<()> {
        let Some(metrics) = self.metrics.as_ref() else { return Ok(()) };
        let figures = [
            ("knn_top1", f.knn_top1),
            ("knn_top5", f.knn_top5),
            ("linear_top1", f.linear_top1),
            ("zero_shot_top1", f.zero_shot_top1),
            ("zero_shot_top5", f.zero_shot_top5),
        ];
        metrics.observe_eval(step, &figures)
    }

    /// Hand the step's figures to the metrics.
    fn report(&mut self, r: &StepRecord) -> Result<()> {
        let Some(metrics) = self.metrics.as_mut() else { return Ok(()) };
        let (plan, gb) = (&self.plan, self.plan.global_batch);
        let logit_scale = self.method.logit_scale();
        let k = plan.method.queue_size;
        let figures = StepFigures {
            step: r.done,
            loss: r.loss,
            lr: r.lr,
            samples_per_second: gb as f64 / (r.seconds + r.wait),
            samples: gb,
            bad_samples: r.bad_samples as usize,
            embedding_std: r.embedding_std,
            grad_norm: r.grad_norm,
            temperature: logit_scale.map_or(plan.temperature, |s| 1.0 / s),
            logit_scale,
            queue_fill: (k > 0).then(|| (r.done * gb).min(k) as f64 / k as f64),
        };
        metrics.observe(&figures, &StepTimes { seconds: r.phases })
    }

    /// A non-finite loss or gradient norm stops every rank at the same step, before the
    /// optimiser writes non-finite weights (both are sums over ranks, identical everywhere).
    fn check_finite(&self, loss: f64, grad_norm: f64, done: usize) -> Result<()> {
        if loss.is_finite() && grad_norm.is_finite() {
            return Ok(());
        }
        let last = self.last_checkpoint();
        let what = if loss.is_finite() { format!("gradient norm is {grad_norm}") } else { format!("loss is {loss}") };
        bail!("{what} at step {done}: stopping; the last good checkpoint ({last}) is intact")
    }

    /// The newest valid checkpoint of the run, for messages.
    fn last_checkpoint(&self) -> String {
        let found = checkpoint::latest(&self.plan.config.checkpoint.dir).ok().flatten();
        found.map(|p| p.display().to_string()).unwrap_or_else(|| "none yet".into())
    }

    /// The parts that run after a step, each when it is due.
    fn after(&mut self, r: &StepRecord) -> Result<()> {
        self.progress.last_loss = r.loss;
        self.progress.train_time += r.seconds;
        self.progress.wait_time += r.wait;
        self.progress.trained_steps += 1;
        self.log.write(r, self.plan.global_batch)?;
        self.log.print(r, &self.plan, self.progress.start_step, &self.method.status());
        self.guard.observe(r.embedding_std, r.done);
        self.report(r)?;
        crate::progress::step(r.done, r.loss, self.plan.global_batch as f64 / (r.seconds + r.wait));
        if self.checkpointer.cadence.due(r.done, self.plan.steps) {
            self.save(r.done, r.loss)?;
        }
        if let Some(ev) = self.evaluator.as_ref().filter(|e| e.cadence.due(r.done, self.plan.steps)) {
            let f = evaluate(self.comm, &self.plan, self.method.as_ref(), &ev.data, &self.tokenizer, self.device)?;
            if self.comm.rank() == 0 {
                log_figures(&format!("step {}", r.done), &f, "");
                record_evaluation(&self.plan.config.checkpoint.dir, r.done, &f)?;
            }
            self.report_eval(r.done, &f)?;
            self.keep_if_best(&f, r.done, r.loss)?;
        }
        Ok(())
    }

    /// `checkpoint.best`: save `best/` when this evaluation beats every earlier one.
    fn keep_if_best(&mut self, f: &EvalFigures, step: usize, loss: f64) -> Result<()> {
        let Some(name) = self.plan.config.checkpoint.best.clone() else { return Ok(()) };
        let Some(value) = f.metric(&name) else { return Ok(()) };
        if self.progress.best.is_some_and(|b| b >= value) {
            return Ok(());
        }
        self.progress.best = Some(value);
        let (dir, state) = (&self.plan.config.checkpoint.dir, self.state(step, loss));
        let (model, optim) = (self.method.state(), optim_items(&self.opt));
        let saved = checkpoint::save(self.comm, dir, &state, &model, &optim, Slot::Best)?;
        if let Some(p) = saved {
            tracing::info!("best {name} so far, {value:.4} at step {step}: {}", p.display());
        }
        Ok(())
    }

    /// The summary (with the final evaluation), written by rank 0; `stopped_at`
    /// is the step a stop signal ended the run at.
    fn finish(self, stopped_at: Option<usize>) -> Result<Summary> {
        let (comm, dir) = (self.comm, self.plan.config.checkpoint.dir.clone());
        let summary = self.final_summary(stopped_at)?;
        if comm.rank() == 0 {
            crate::write_summary(&dir, &summary)?;
        }
        Ok(summary)
    }

    /// [`Trainer::finish`]'s summary, not written.
    fn final_summary(mut self, stopped_at: Option<usize>) -> Result<Summary> {
        crate::progress::finish();
        // Training's buffers are free now: hand their pages back before evaluating.
        crate::alloc::release();
        let final_eval = match self.evaluator.as_ref().filter(|e| e.at_end && stopped_at.is_none()) {
            Some(ev) => {
                Some(evaluate(self.comm, &self.plan, self.method.as_ref(), &ev.data, &self.tokenizer, self.device)?)
            }
            None => None,
        };
        if let Some(f) = &final_eval {
            let (done, loss) = (self.plan.steps, self.progress.last_loss);
            self.report_eval(done, f)?;
            self.keep_if_best(f, done, loss)?;
            if self.comm.rank() == 0 {
                record_evaluation(&self.plan.config.checkpoint.dir, done, f)?;
            }
        }
        let (p, plan) = (&self.progress, &self.plan);
        let samples = (p.trained_steps * plan.global_batch) as f64;
        let mut summary = Summary {
            steps: stopped_at.unwrap_or(plan.steps),
            stopped_by_signal: stopped_at.is_some(),
            final_loss: p.last_loss,
            samples_per_s: if p.train_time > 0.0 { samples / (p.train_time + p.wait_time) } else { 0.0 },
            compute_samples_per_s: if p.train_time > 0.0 { samples / p.train_time } else { 0.0 },
            knn_top1_init: p.init.0,
            // Sentences' baseline is their bag of words; the checkpoint keeps either in one field.
            knn_top1_raw_pixels: p.init.1.filter(|_| !plan.config.data.dataset.is_lines()),
            knn_top1_bag_of_words: p.init.1.filter(|_| plan.config.data.dataset.is_lines()),
            world_size: plan.world_size,
            global_batch: plan.global_batch,
            pretrained_sha256: plan.config.model.pretrained_sha256.clone(),
            ..Default::default()
        };
        if let Some(f) = final_eval {
            summary.eval = f;
        }
        Ok(summary)
    }
}

/// A host tensor on `device`. To a GPU it goes through pinned memory with a
/// non-blocking copy: the host queues the step's kernels behind the copy
/// instead of waiting for it (libtorch keeps the pinned buffer until the copy
/// is done). On the CPU the tensor is already where it runs.
fn upload(t: Tensor, device: tch::Device) -> Tensor {
    if device == tch::Device::Cpu {
        return t;
    }
    let kind = t.kind();
    t.pin_memory(device).to_device_(device, kind, true, false)
}
