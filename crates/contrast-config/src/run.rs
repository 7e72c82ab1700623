//! `checkpoint.*`, `eval.*` and `metrics.*`: what a run writes, evaluates and serves.

use crate::applies::Rules;
use crate::data::root_exists;
use crate::{invalid, Config, ConfigError, DatasetKind, Topology};
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

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
    /// A fresh run (`train.resume: false`) into a directory that holds another
    /// run's checkpoints or records is refused unless this is set; then those
    /// files are removed before the run writes anything.
    pub overwrite: bool,
    /// Hold an exclusive `flock` on `checkpoint.dir/.lock` for the run's life, so
    /// that a second run into the same directory is refused. `false` only for a
    /// filesystem that refuses locks (docs/reliability.md).
    pub lock: bool,
}

/// The evaluation figures `checkpoint.best` can follow.
pub const BEST_METRICS: [&str; 5] = ["knn_top1", "knn_top5", "linear_top1", "zero_shot_top1", "zero_shot_top5"];

impl Default for CheckpointConfig {
    fn default() -> Self {
        Self { dir: PathBuf::from("runs/default"), every: 500, keep: 2, best: None, overwrite: false, lock: true }
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
    /// Connections the endpoint serves at once; more are closed when accepted.
    pub max_connections: usize,
    /// Which ranks export the per-phase step histograms (`all`, or `rank0`
    /// for runs of many ranks, whose histograms would dominate the series).
    pub histograms: HistogramRanks,
}

/// `metrics.histograms`: the ranks that export `contrast_step_phase_seconds`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum HistogramRanks {
    /// Every rank.
    #[default]
    All,
    /// Rank 0 only.
    Rank0,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            listen: "127.0.0.1:9400".into(),
            textfile_dir: None,
            textfile_every: 20,
            max_connections: 32,
            histograms: HistogramRanks::All,
        }
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
    /// Whiten the features before kNN, the linear probe, alignment and
    /// `trainer embed` (Su et al. 2021): x ↦ (x − μ)·U·Λ^(−1/2), μ and the
    /// covariance from the kNN memory (the training split), then L2-normalise.
    pub whiten: bool,
    /// Keep the first k whitened dimensions (largest variance first); 0 = all.
    pub whiten_dim: usize,
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
            whiten: false,
            whiten_dim: 0,
        }
    }
}

/// The `eval.*` and `metrics.*` keys that the dataset and the metrics settings do not read.
pub(crate) fn rules(c: &Config, r: &mut Rules) {
    let idx = c.data.dataset.is_idx();
    r.keys("eval", &["root"], "fashion_mnist (its t10k files in data.root are the test split)", idx);
    r.keys("eval", &["whiten_dim"], "eval.whiten: false", !c.eval.whiten);
    r.keys("metrics", &["textfile_every"], "metrics without metrics.textfile_dir", c.metrics.textfile_dir.is_none());
    r.keys("metrics", &["max_connections"], "metrics.enabled: false", !c.metrics.enabled);
}

pub(crate) fn check_metrics(c: &Config, topo: Topology) -> Result<(), ConfigError> {
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
    if !(1..=10_000).contains(&m.max_connections) {
        return Err(invalid("metrics.max_connections", format!("must lie in [1, 10000], got {}", m.max_connections)));
    }
    if m.textfile_every <= 0 {
        return Err(invalid("metrics.textfile_every", format!("must be positive, got {}", m.textfile_every)));
    }
    Ok(())
}

pub(crate) fn check_eval(c: &Config) -> Result<(), ConfigError> {
    if c.checkpoint.dir.as_os_str().to_string_lossy().trim().is_empty() {
        return Err(invalid("checkpoint.dir", "is empty: name the run directory"));
    }
    if c.checkpoint.overwrite && c.train.resume {
        return Err(invalid(
            "checkpoint.overwrite",
            "starts the run in checkpoint.dir over, train.resume=true continues it: set train.resume=false to overwrite",
        ));
    }
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
    if c.eval.whiten && c.eval.max_train == 1 {
        return Err(invalid(
            "eval.max_train",
            "eval.whiten fits a covariance: it needs at least 2 training items (0 = all)",
        ));
    }
    if c.eval.knn_k <= 0 {
        return Err(invalid("eval.knn_k", format!("must be positive, got {}", c.eval.knn_k)));
    }
    if !(c.eval.knn_t > 0.0) {
        return Err(invalid("eval.knn_t", format!("must be > 0, got {}", c.eval.knn_t)));
    }
    let eval_dataset = c.eval.dataset.unwrap_or(c.data.dataset);
    if c.data.dataset.is_files() != eval_dataset.is_files() || c.data.dataset.is_lines() != eval_dataset.is_lines() {
        return Err(invalid(
            "eval.dataset",
            format!("{eval_dataset:?} images do not fit an encoder trained on {:?}", c.data.dataset),
        ));
    }
    if let Some(root) = c.eval.root.as_ref().filter(|_| !eval_dataset.is_idx()) {
        if !root_exists(eval_dataset, root) {
            return Err(invalid("eval.root", format!("{} does not exist", root.display())));
        }
    }

    Ok(())
}
