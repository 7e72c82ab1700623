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
//! ```

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
