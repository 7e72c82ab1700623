//! YAML schema and validated run plan.
//!
//! Two stages, as in ripgrep's `LowArgs` → `HiArgs`: [`Config`] is the raw
//! serde view of a YAML file (every struct is `deny_unknown_fields`, every field
//! has a default and a one-line doc), and [`Plan`] is the resolved, validated
//! run: derived sizes (local batch, negatives per anchor, threads, effective
//! learning rate) are computed once and printed at start.
//!
//! Each section's keys, defaults and checks live in a module of their own
//! (`data`, `model`, `loss`, `train`, `run`). Methods and encoders are open
//! sets: their keys are declared next to their code (in `contrast-nn`) through
//! [`MethodSpec`] and [`EncoderSpec`], and reach [`Plan::resolve`] through a
//! [`Catalog`]. This crate names no method and no encoder.
//!
//! A key given in the file that the chosen component does not read is an
//! error ([`applies`]), and the resolved config ([`Plan::resolved_yaml`])
//! leaves those keys out, so it loads back into the same plan.
//!
//! This crate knows nothing of torch or MPI; the caller tells it the world size
//! and how many ranks share the host.
#![warn(missing_docs)]

pub mod applies;
mod component;
mod data;
mod loss;
pub mod model;
mod plan;
mod run;
mod train;
mod yaml;

pub use component::{Catalog, EncoderSpec, ImageInfo, MethodPlan, MethodSpec, RunInfo, Settings, SpecRef};
pub use data::{
    AugConfig, AugmentPreset, CutoffName, DataConfig, DatasetKind, MixName, TextAugConfig, MAX_BLUR_SIGMA,
    MAX_PREFETCH, MAX_WORKERS,
};
pub use loss::{LossConfig, LossKind, Mining};
pub use model::{ModelConfig, Norm, PretrainedFormat, TextAct, TextConfig, TextPool};
pub use plan::{Plan, Topology};
pub use run::{CheckpointConfig, EvalConfig, HistogramRanks, MetricsConfig, BEST_METRICS};
pub use train::{
    LrScale, MomentumSchedule, OptimizerConfig, OptimizerName, Overlap, Precision, ScheduleConfig, ScheduleName,
    TrainConfig,
};
pub use yaml::{
    check_yaml_shape, leaves, parse_bounded, value_depth, MAX_CONFIG_BYTES, MAX_YAML_ALIASES, MAX_YAML_DEPTH,
    RESOLVED_HEADER,
};

use serde::{Deserialize, Serialize};
use std::path::PathBuf;

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
    /// A key given in the config that the chosen component does not read.
    #[error("config key `{key}` does not apply to {what}: remove it (docs/config.md lists the keys of each)")]
    NotApplicable {
        /// Dotted key.
        key: String,
        /// The component (loss, method, encoder, optimiser, preset…) it does not apply to.
        what: String,
    },
    /// A value that parsed but is not allowed.
    #[error("config key `{key}`: {message}")]
    Invalid {
        /// Dotted key.
        key: String,
        /// What is wrong.
        message: String,
    },
}

/// A [`ConfigError::Invalid`] naming `key`.
pub fn invalid(key: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid { key: key.into(), message: message.into() }
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
    pub method: MethodSection,
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

/// `method.*`: the method's name and its own keys, which the method declares
/// ([`MethodSpec::defaults`]) and checks; keys of another method are errors.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
#[serde(default)]
pub struct MethodSection {
    /// A registered method (`simclr`, `clip`, `moco_v2`, `byol`, `simsiam`, …);
    /// unset: the method registered as the default for the loss (`clip` for an
    /// image–text loss, else `simclr`).
    pub name: Option<String>,
    /// The method's own keys as given.
    #[serde(flatten)]
    pub keys: Settings,
}

#[cfg(test)]
mod tests;

/// Refuse a size that allocates past its documented ceiling: `value` of `key`
/// is at most `max`; the error says how many bytes `bytes_per_unit · value`
/// would need (`what` names the tensor that grows with it).
pub fn within_ceiling(key: &str, value: u64, max: u64, bytes_per_unit: u64, what: &str) -> Result<(), ConfigError> {
    if value <= max {
        return Ok(());
    }
    let bytes = (value as u128) * (bytes_per_unit as u128);
    Err(invalid(
        key,
        format!(
            "{value} is over its ceiling of {max}: {what} alone would need {bytes} bytes ({:.1} GiB)",
            bytes as f64 / (1u64 << 30) as f64
        ),
    ))
}

/// The machine's physical memory in bytes (`MemTotal` of /proc/meminfo; None
/// where that cannot be read), for checks of state that grows with the data.
pub fn host_memory_bytes() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// The first non-finite number of a YAML value (`.nan`, `.inf`), with the dotted key of its leaf.
pub fn first_non_finite(v: &yaml_serde::Value) -> Option<(String, f64)> {
    fn non_finite(v: &yaml_serde::Value) -> Option<f64> {
        use yaml_serde::Value;
        match v {
            Value::Number(n) => n.as_f64().filter(|x| !x.is_finite()),
            Value::Sequence(s) => s.iter().find_map(non_finite),
            Value::Tagged(t) => non_finite(&t.value),
            _ => None,
        }
    }
    yaml::leaves(v).into_iter().find_map(|(key, leaf)| non_finite(leaf).map(|x| (key, x)))
}
