//! Prometheus metrics of one rank: a registry the training loop updates after
//! each step, served at `http://<metrics.listen host>:<base port + local
//! rank>/metrics` (or a free port) by hyper on a small tokio runtime of its
//! own thread, found through the discovery file rank 0 writes, and/or
//! written as a node_exporter textfile. Nothing here calls MPI: each rank
//! reports its own figures (every series carries a `rank` label), and the
//! collectives' byte and time counters come from this process's communicator.

use anyhow::{Context, Result};
use prometheus::{
    Encoder, Gauge, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, Opts, Registry, TextEncoder,
};
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::PathBuf;

mod discovery;
mod endpoint;
pub use discovery::{scrape_target, write_targets, TARGETS_FILE};
pub use endpoint::{serve, Bounds};

/// Phases of a step, in the order of [`StepTimes::seconds`] (the `phase` label).
pub const PHASES: [&str; 8] =
    ["data_wait", "forward", "gather", "loss", "reduce_scatter", "backward", "all_reduce", "optimizer"];

/// What one step reports to the metrics.
pub struct StepTimes {
    /// Seconds of each of [`PHASES`].
    pub seconds: [f64; 8],
}

/// The figures of one step.
pub struct StepFigures {
    /// Steps done.
    pub step: usize,
    /// Global loss.
    pub loss: f64,
    /// Learning rate.
    pub lr: f64,
    /// Samples per second of the step, wall clock with the data wait.
    pub samples_per_second: f64,
    /// Samples of the step (the global batch).
    pub samples: usize,
    /// Distinct unreadable samples so far, all ranks.
    pub bad_samples: usize,
    /// Embedding std (collapse guard); NaN where the method has no monitor.
    pub embedding_std: f64,
    /// Global gradient norm.
    pub grad_norm: f64,
    /// Loss temperature in force (1 / logit scale for CLIP).
    pub temperature: f64,
    /// Learnt logit scale, for image–text methods.
    pub logit_scale: Option<f64>,
    /// Fraction of a MoCo queue that holds real keys (None: no queue).
    pub queue_fill: Option<f64>,
}

/// The registry and its series.
pub struct Metrics {
    registry: Registry,
    step: IntGauge,
    loss: Gauge,
    samples_per_second: Gauge,
    samples_total: IntCounter,
    learning_rate: Gauge,
    temperature: Gauge,
    logit_scale: Gauge,
    phase_seconds: HistogramVec,
    collective_bytes: IntCounterVec,
    collective_seconds: prometheus::CounterVec,
    collective_calls: IntCounterVec,
    negatives_per_anchor: IntGauge,
    queue_fill: Gauge,
    bad_samples: IntGauge,
    embedding_std: Gauge,
    grad_norm: Gauge,
    last_step_timestamp: Gauge,
    steps_target: IntGauge,
    run_info: prometheus::IntGaugeVec,
    eval_accuracy: prometheus::GaugeVec,
    eval_step: IntGauge,
    /// The communicator's counters at the last update (the counters grow by the difference).
    last_comm: [contrast_comm::OpStats; 5],
    textfile: Option<(PathBuf, usize)>,
    /// Whether this rank observes `contrast_step_phase_seconds` (`metrics.histograms`).
    histograms: bool,
    /// The address `/metrics` is served at, once bound.
    served: Option<SocketAddr>,
    /// The discovery file this rank wrote (rank 0), removed with the metrics.
    targets_file: Option<PathBuf>,
}

/// Register a new metric with `r` and hand it back.
fn register<T: prometheus::core::Collector + Clone + 'static>(
    r: &Registry,
    metric: prometheus::Result<T>,
) -> Result<T> {
    let m = metric?;
    r.register(Box::new(m.clone()))?;
    Ok(m)
}

impl Metrics {
    /// A registry whose series carry `rank`, with the process collector (RSS, CPU).
    pub fn new(rank: usize, negatives_per_anchor: usize) -> Result<Self> {
        let labels = [("rank".to_string(), rank.to_string())].into_iter().collect();
        let r = Registry::new_custom(None, Some(labels))?;
        #[cfg(target_os = "linux")]
        r.register(Box::new(prometheus::process_collector::ProcessCollector::for_self()))?;
        let gauge = |name: &str, help: &str| register(&r, Gauge::new(name, help));
        let int_gauge = |name: &str, help: &str| register(&r, IntGauge::new(name, help));
        let per_op = |name: &str, help: &str| register(&r, IntCounterVec::new(Opts::new(name, help), &["op"]));
        let buckets = prometheus::exponential_buckets(1e-4, 2.0, 18)?;
        let phases =
            HistogramOpts::new("contrast_step_phase_seconds", "Seconds of each phase of a step").buckets(buckets);
        let seconds =
            Opts::new("contrast_collective_seconds_total", "Seconds inside each kind of collective (waiting included)");
        let m = Self {
            step: int_gauge("contrast_step", "Optimiser steps done")?,
            loss: gauge("contrast_loss", "Global loss of the last step")?,
            samples_per_second: gauge(
                "contrast_samples_per_second",
                "Global samples per second of the last step, wall clock with the data wait",
            )?,
            samples_total: register(
                &r,
                IntCounter::new("contrast_samples_total", "Samples trained on by the job since this process started"),
            )?,
            learning_rate: gauge("contrast_learning_rate", "Learning rate of the last step")?,
            temperature: gauge("contrast_temperature", "Loss temperature in force (1 / logit scale for CLIP)")?,
            logit_scale: gauge("contrast_logit_scale", "Learnt logit scale of an image-text method (0 for others)")?,
            phase_seconds: register(&r, HistogramVec::new(phases, &["phase"]))?,
            collective_bytes: per_op(
                "contrast_collective_bytes_total",
                "Bytes this rank sent into each kind of collective",
            )?,
            collective_seconds: register(&r, prometheus::CounterVec::new(seconds, &["op"]))?,
            collective_calls: per_op("contrast_collective_calls_total", "Calls of each kind of collective")?,
            negatives_per_anchor: int_gauge(
                "contrast_negatives_per_anchor",
                "Negatives each anchor is contrasted with",
            )?,
            queue_fill: gauge(
                "contrast_queue_fill_ratio",
                "Fraction of the MoCo queue holding real keys (0 without a queue)",
            )?,
            bad_samples: int_gauge("contrast_bad_samples", "Distinct unreadable samples so far, all ranks")?,
            embedding_std: gauge(
                "contrast_embedding_std",
                "Std of the normalised embeddings (collapse guard; 1/sqrt(d) healthy)",
            )?,
            grad_norm: gauge("contrast_grad_norm", "Global gradient norm of the last step")?,
            last_step_timestamp: gauge(
                "contrast_last_step_timestamp_seconds",
                "Unix time at which the last step ended (for stall alerts)",
            )?,
            steps_target: int_gauge("contrast_steps_target", "Optimiser steps the run trains to (for an ETA)")?,
            run_info: register(
                &r,
                prometheus::IntGaugeVec::new(
                    Opts::new("contrast_run_info", "The run: always 1, its labels say what runs"),
                    &["method", "loss", "encoder", "world_size", "run_id", "version"],
                ),
            )?,
            eval_accuracy: register(
                &r,
                prometheus::GaugeVec::new(
                    Opts::new("contrast_eval_accuracy", "Accuracy of the last evaluation, a fraction in [0, 1]"),
                    &["metric"],
                ),
            )?,
            eval_step: int_gauge("contrast_eval_step", "Step of the last evaluation")?,
            registry: r.clone(),
            last_comm: contrast_comm::comm_stats(),
            textfile: None,
            histograms: true,
            served: None,
            targets_file: None,
        };
        m.negatives_per_anchor.set(negatives_per_anchor as i64);
        Ok(m)
    }

    /// Export the per-phase histograms or not (a family never observed is not exported).
    pub fn with_histograms(mut self, on: bool) -> Self {
        self.histograms = on;
        self
    }

    /// Record the address the endpoint bound (its port is the real one when `metrics.listen` asked for 0).
    pub fn set_served(&mut self, addr: SocketAddr) {
        self.served = Some(addr);
    }

    /// The address `/metrics` is served at, if it is.
    pub fn served(&self) -> Option<SocketAddr> {
        self.served
    }

    /// Write the discovery file of the job's `targets` into `dir` (rank 0 does);
    /// it goes when these metrics do, as the textfile does.
    pub fn publish_targets(
        &mut self,
        dir: &std::path::Path,
        targets: &[String],
        labels: &[(&str, String)],
    ) -> Result<()> {
        self.targets_file = Some(write_targets(dir, targets, labels)?);
        Ok(())
    }

    /// Also write the series to `dir/contrast-rank<r>.prom` every `every` steps.
    pub fn with_textfile(mut self, dir: PathBuf, rank: usize, every: usize) -> Result<Self> {
        std::fs::create_dir_all(&dir).with_context(|| format!("metrics.textfile_dir {}", dir.display()))?;
        self.textfile = Some((dir.join(format!("contrast-rank{rank}.prom")), every));
        Ok(self)
    }

    /// Say what runs: `contrast_run_info{…} 1` and `contrast_steps_target`.
    pub fn set_run(&self, info: &RunInfo) {
        let world = info.world_size.to_string();
        let run_id = format!("{:016x}", info.run_id);
        let labels = [info.method, info.loss, info.encoder, &world, &run_id, env!("CARGO_PKG_VERSION")];
        self.run_info.reset();
        self.run_info.with_label_values(&labels).set(1);
        self.steps_target.set(info.steps as i64);
    }

    /// Record an evaluation at `step`: each figure measured, by its name (`knn_top1`, `linear_top1`, …).
    pub fn observe_eval(&self, step: usize, figures: &[(&str, Option<f64>)]) -> Result<()> {
        for (name, value) in figures {
            if let Some(v) = value {
                self.eval_accuracy.with_label_values(&[name]).set(*v);
            }
        }
        self.eval_step.set(step as i64);
        match &self.textfile {
            Some((path, _)) => self.write_textfile(path),
            None => Ok(()),
        }
    }

    /// The registry (for the server and tests).
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// Record a step.
    pub fn observe(&mut self, f: &StepFigures, t: &StepTimes) -> Result<()> {
        self.step.set(f.step as i64);
        self.loss.set(f.loss);
        self.samples_per_second.set(f.samples_per_second);
        self.samples_total.inc_by(f.samples as u64);
        self.learning_rate.set(f.lr);
        self.temperature.set(f.temperature);
        self.logit_scale.set(f.logit_scale.unwrap_or(0.0));
        self.queue_fill.set(f.queue_fill.unwrap_or(0.0));
        self.bad_samples.set(f.bad_samples as i64);
        self.embedding_std.set(if f.embedding_std.is_finite() { f.embedding_std } else { 0.0 });
        self.grad_norm.set(f.grad_norm);
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        self.last_step_timestamp.set(now.as_secs_f64());
        for (phase, s) in PHASES.iter().zip(t.seconds).filter(|_| self.histograms) {
            self.phase_seconds.with_label_values(&[phase]).observe(s);
        }
        self.count_collectives();
        match &self.textfile {
            Some((path, every)) if f.step % every == 0 => self.write_textfile(path),
            _ => Ok(()),
        }
    }

    fn count_collectives(&mut self) {
        let now = contrast_comm::comm_stats();
        for (k, op) in contrast_comm::OP_NAMES.iter().enumerate() {
            let (a, b) = (now[k], self.last_comm[k]);
            self.collective_bytes.with_label_values(&[op]).inc_by(a.bytes - b.bytes);
            self.collective_calls.with_label_values(&[op]).inc_by(a.calls - b.calls);
            self.collective_seconds.with_label_values(&[op]).inc_by((a.seconds - b.seconds).max(0.0));
        }
        self.last_comm = now;
    }

    /// The series in Prometheus' text format.
    pub fn encode(&self) -> String {
        encode(&self.registry)
    }

    fn write_textfile(&self, path: &std::path::Path) -> Result<()> {
        // node_exporter must never read a half-written file: write, then rename.
        // It exports its own process_* series: the textfile leaves them out.
        let text = encode_where(&self.registry, |name| !name.starts_with("process_"));
        let tmp = path.with_extension(format!("prom.{}.tmp", std::process::id()));
        std::fs::write(&tmp, text).with_context(|| format!("writing {}", tmp.display()))?;
        std::fs::rename(&tmp, path).with_context(|| format!("renaming {}", path.display()))
    }
}

/// A finished (or failed) run's textfile goes with it, so node_exporter does
/// not serve its last values forever (a kill -9 leaves it; the last step's
/// timestamp then says how old it is); so does its discovery file, so
/// Prometheus stops scraping ports another job may bind next.
impl Drop for Metrics {
    fn drop(&mut self) {
        let files = [self.textfile.as_ref().map(|(p, _)| p), self.targets_file.as_ref()];
        for path in files.into_iter().flatten() {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// What [`Metrics::set_run`] labels the run with.
pub struct RunInfo<'a> {
    /// `method.name`.
    pub method: &'a str,
    /// The loss.
    pub loss: &'a str,
    /// `model.encoder`.
    pub encoder: &'a str,
    /// Ranks P.
    pub world_size: usize,
    /// The run's identity (kept across resumes).
    pub run_id: u64,
    /// `train.steps`.
    pub steps: usize,
}

pub(crate) fn encode(registry: &Registry) -> String {
    encode_where(registry, |_| true)
}

/// The families of `registry` whose name `keep` accepts, in Prometheus' text format.
fn encode_where(registry: &Registry, keep: impl Fn(&str) -> bool) -> String {
    let families: Vec<_> = registry.gather().into_iter().filter(|f| keep(f.name())).collect();
    let mut buf = Vec::new();
    let _ = TextEncoder::new().encode(&families, &mut buf);
    String::from_utf8(buf).unwrap_or_default()
}

/// The address local rank `local_rank` serves: `host:(base_port + local_rank)`,
/// or `host:0` (a free port, which the system picks) on every rank when `base_port` is 0.
pub fn address(listen_host: &str, base_port: u16, local_rank: usize) -> Result<SocketAddr> {
    let port = if base_port == 0 { 0 } else { base_port as usize + local_rank };
    (listen_host, port as u16)
        .to_socket_addrs()
        .with_context(|| format!("metrics.listen host `{listen_host}`"))?
        .next()
        .with_context(|| format!("metrics.listen host `{listen_host}` resolves to nothing"))
}
