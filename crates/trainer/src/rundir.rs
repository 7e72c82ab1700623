//! The names of what a run directory (`checkpoint.dir`) holds, in one place:
//! every module that reads or writes them (the loop, checkpoints, the plot,
//! the commands) takes them from here.
//!
//! ```text
//! checkpoint.dir/
//!   config.yaml      the resolved configuration (CONFIG_FILE)
//!   steps.jsonl      one JSON line per logged step (STEPS_FILE)
//!   evals.jsonl      one JSON line per evaluation (EVALS_FILE)
//!   summary.json     the run's summary (SUMMARY_FILE)
//!   plot.png         loss, lr and accuracies against step (PLOT_FILE)
//!   latest           the name of the newest checkpoint (LATEST_FILE)
//!   step-<N>/        a checkpoint: model.safetensors, optim.safetensors, state.json
//!   best/            the best checkpoint by `checkpoint.best` (BEST_DIR)
//!   .lock            flocked by the run that owns the directory (LOCK_FILE)
//!   member-<k>/      population-based augmentation: member k's run directory
//!   population.json  its members' schedules and rounds (pba::POPULATION_FILE)
//!   randaugment_schedule.json  the best member's schedule (pba::SCHEDULE_FILE)
//!   prometheus-targets.json    every rank's /metrics address while it runs (TARGETS_FILE; not a record: a killed run's goes when the next run takes the lock)
//! ```
//!
//! Files are replaced by writing a temporary name unique to the process
//! ([`tmp_name`]) and renaming it; the run that takes the lock removes those
//! that dead processes left ([`is_tmp_name`]).

/// The resolved configuration.
pub const CONFIG_FILE: &str = "config.yaml";
/// One JSON line per logged step.
pub const STEPS_FILE: &str = "steps.jsonl";
/// One JSON line per evaluation.
pub const EVALS_FILE: &str = "evals.jsonl";
/// The run's summary.
pub const SUMMARY_FILE: &str = "summary.json";
/// Loss, learning rate and accuracies against step.
pub const PLOT_FILE: &str = "plot.png";
/// A text file naming the newest checkpoint directory (`step-<N>`).
pub const LATEST_FILE: &str = "latest";
/// The best checkpoint (never pruned).
pub const BEST_DIR: &str = "best";
/// A checkpoint's model state.
pub const MODEL_FILE: &str = "model.safetensors";
/// A checkpoint's optimiser state.
pub const OPTIM_FILE: &str = "optim.safetensors";
/// A checkpoint's `State` (step, seed, run id, …).
pub const STATE_FILE: &str = "state.json";

/// Name of step `n`'s checkpoint directory.
pub fn step_dir_name(step: usize) -> String {
    format!("step-{step}")
}

/// Every rank's `/metrics` address, for Prometheus' `file_sd`, while the run lives.
pub const TARGETS_FILE: &str = "prometheus-targets.json";

/// Held (`flock`, exclusive) by the run that owns the directory.
pub const LOCK_FILE: &str = ".lock";

/// A hidden temporary name for `stem`, unique to this process:
/// `.<stem>.<pid>.tmp` (`.<stem>.<pid>.tmp.<ext>` with `ext`, for writers that
/// pick a format from the extension).
pub fn tmp_name(stem: &str, ext: Option<&str>) -> String {
    let pid = std::process::id();
    match ext {
        Some(e) => format!(".{stem}.{pid}.tmp.{e}"),
        None => format!(".{stem}.{pid}.tmp"),
    }
}

/// Whether a directory entry is a temporary of [`tmp_name`]'s form (of any process).
pub fn is_tmp_name(name: &str) -> bool {
    name.starts_with('.') && (name.ends_with(".tmp") || name.contains(".tmp."))
}

/// Whether an entry of a run directory is a run's checkpoint or record: what a
/// fresh run must not mix its own with.
pub fn is_run_output(name: &str) -> bool {
    let step = name.strip_prefix("step-").is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()));
    let member = name.strip_prefix("member-").is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()));
    let population = [crate::pba::POPULATION_FILE, crate::pba::SCHEDULE_FILE].contains(&name);
    step || member
        || population
        || [LATEST_FILE, BEST_DIR, STEPS_FILE, EVALS_FILE, SUMMARY_FILE, PLOT_FILE].contains(&name)
}
