//! Stop signals: SIGTERM (Slurm at a time limit, `kill`), SIGINT (Ctrl-C) and
//! SIGUSR1 (`sbatch --signal`, forwarded by `mpirun`).
//!
//! The first signal only sets a flag. Each step's closing all-reduce carries
//! it on the control vector, so whether the signal reached every rank or one,
//! every rank sees it after the same step, writes one checkpoint there and
//! exits 0: a requeued job resumes exactly. A second signal exits at once
//! (status 128 + the signal), for an operator who does not want to wait.

use signal_hook::consts::{SIGINT, SIGTERM, SIGUSR1};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};

/// The signals that ask for a clean stop.
pub const STOP_SIGNALS: [i32; 3] = [SIGTERM, SIGINT, SIGUSR1];

struct Flags {
    /// The signal's number (0: none yet).
    first: Arc<AtomicUsize>,
}

static FLAGS: OnceLock<Flags> = OnceLock::new();

/// Install the handlers (once per process; later calls do nothing).
pub fn install() -> std::io::Result<()> {
    if FLAGS.get().is_some() {
        return Ok(());
    }
    let (first, seen) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicBool::new(false)));
    for sig in STOP_SIGNALS {
        // Registered before the flag, so the first signal finds it unset and only sets it.
        signal_hook::flag::register_conditional_shutdown(sig, 128 + sig, seen.clone())?;
        signal_hook::flag::register(sig, seen.clone())?;
        signal_hook::flag::register_usize(sig, first.clone(), sig as usize)?;
    }
    let _ = FLAGS.set(Flags { first });
    Ok(())
}

/// The stop signal this process received, if any.
pub fn received() -> Option<i32> {
    let n = FLAGS.get()?.first.load(Ordering::SeqCst);
    (n != 0).then_some(n as i32)
}

/// The conventional name of a stop signal (`SIGTERM`, …).
pub fn name(sig: i32) -> String {
    match sig {
        SIGTERM => "SIGTERM".into(),
        SIGINT => "SIGINT".into(),
        SIGUSR1 => "SIGUSR1".into(),
        other => format!("signal {other}"),
    }
}
