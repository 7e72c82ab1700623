//! The watchdog (`train.timeout_s`), in the spirit of torch.distributed's
//! collective timeout: the training loop says which phase it is in
//! ([`enter`]); a thread of its own checks once a second how long the current
//! phase has lasted, and when that passes the timeout it logs the phase, the
//! step and the rank and ends the whole job (`MPI_Abort`) with
//! [`EXIT_TIMEOUT`]. So a rank that stops answering (stopped, swapped out, a
//! dead link) or a read that never returns ends the job within the timeout
//! instead of at the scheduler's time limit.
//!
//! Phases are coarse: the start (config agreement, dataset checks, weight
//! broadcast), the wait for a batch, a step (forward, collectives, backward,
//! optimiser), an evaluation, a checkpoint write, a method's start of an
//! epoch, the end. The timeout bounds
//! each of them, so its default (30 min) must exceed the longest legitimate one.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// The exit status of a job the watchdog ended (as coreutils' `timeout`).
pub const EXIT_TIMEOUT: i32 = 124;

/// What the rank is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(usize)]
pub enum Phase {
    /// Config agreement, dataset checks, weight broadcast, baseline evaluation.
    Start = 0,
    /// Waiting for the next batch from the data pipeline.
    DataWait,
    /// A training step: forward, collectives, backward, optimiser.
    Step,
    /// An evaluation (kNN, linear probe, zero-shot).
    Evaluation,
    /// Writing a checkpoint.
    Checkpoint,
    /// The final summary and shutdown.
    End,
    /// A method's start of an epoch (a feature pass, a clustering).
    EpochStart,
}

const NAMES: [&str; 7] = [
    "start-up",
    "the wait for a batch",
    "a training step",
    "an evaluation",
    "a checkpoint write",
    "shutdown",
    "the start of an epoch",
];

struct Watch {
    epoch: Instant,
    /// When the current phase began, in ms since `epoch`.
    since_ms: AtomicU64,
    phase: AtomicUsize,
    step: AtomicUsize,
}

static WATCH: OnceLock<Watch> = OnceLock::new();

/// Start watching this process (once; later calls do nothing): `timeout_s`
/// = 0 turns the watchdog off.
pub fn start(rank: usize, timeout_s: f64) {
    if timeout_s <= 0.0 {
        return;
    }
    let watch = Watch {
        epoch: Instant::now(),
        since_ms: AtomicU64::new(0),
        phase: AtomicUsize::new(Phase::Start as usize),
        step: AtomicUsize::new(0),
    };
    if WATCH.set(watch).is_err() {
        return;
    }
    let limit = Duration::from_secs_f64(timeout_s);
    let tick = (limit / 10).clamp(Duration::from_millis(50), Duration::from_secs(1));
    let spawned = std::thread::Builder::new().name("watchdog".into()).spawn(move || loop {
        std::thread::sleep(tick);
        let w = WATCH.get().expect("set");
        let now = w.epoch.elapsed().as_millis() as u64;
        let waited = Duration::from_millis(now.saturating_sub(w.since_ms.load(Ordering::SeqCst)));
        if waited > limit {
            fire(rank, waited, limit, w);
        }
    });
    if let Err(e) = spawned {
        tracing::warn!("watchdog: cannot start its thread ({e}); train.timeout_s is not enforced");
    }
}

fn fire(rank: usize, waited: Duration, limit: Duration, w: &Watch) -> ! {
    let phase = NAMES.get(w.phase.load(Ordering::SeqCst)).copied().unwrap_or("?");
    let step = w.step.load(Ordering::SeqCst);
    let line = format!(
        "watchdog: rank {rank} has spent {:.1} s in {phase} at step {step}, past train.timeout_s = {} s: \
         a rank stopped answering or a read never returned; aborting the job with exit status {EXIT_TIMEOUT}",
        waited.as_secs_f64(),
        limit.as_secs_f64()
    );
    tracing::error!("{line}");
    contrast_comm::abort_world(EXIT_TIMEOUT)
}

/// The rank enters `phase` at `step` (steps done so far): its clock restarts.
pub fn enter(phase: Phase, step: usize) {
    if let Some(w) = WATCH.get() {
        w.phase.store(phase as usize, Ordering::SeqCst);
        w.step.store(step, Ordering::SeqCst);
        w.since_ms.store(w.epoch.elapsed().as_millis() as u64, Ordering::SeqCst);
    }
}

/// The rank enters `phase` at the step it is at: its clock restarts.
pub fn phase(phase: Phase) {
    if let Some(w) = WATCH.get() {
        enter(phase, w.step.load(Ordering::SeqCst));
    }
}
