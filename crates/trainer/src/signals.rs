//! Stop signals: SIGTERM (Slurm at a time limit, `kill`), SIGINT (Ctrl-C),
//! SIGUSR1 (`sbatch --signal`, forwarded by `mpirun`) and SIGHUP (a closed
//! terminal, systemd), all alike.
//!
//! The first signal only sets a flag. Every step opens and closes with a small
//! all-reduce that carries it, and the data wait polls it, so whether the
//! signal reached every rank or one, and whether that rank was computing or
//! waiting for a batch, every rank sees it after the same step, writes one
//! checkpoint there and exits 0: a requeued job resumes exactly.
//!
//! One stop request often reaches a rank twice: directly and through
//! `mpirun`'s forwarding (`scancel --full`, systemd's kill of the control
//! group). The same signal again within [`REPEAT_WINDOW`] counts once. A
//! later or a different signal exits at once (status 128 + the signal), for an
//! operator who does not want to wait.

use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM, SIGUSR1};
use std::sync::atomic::{AtomicI32, AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// The signals that ask for a clean stop.
pub const STOP_SIGNALS: [i32; 4] = [SIGTERM, SIGINT, SIGUSR1, SIGHUP];

/// A repeat of the first signal within this window is the same request.
pub const REPEAT_WINDOW: Duration = Duration::from_secs(1);

/// The first signal (0: none yet) and when it came (ns since [`EPOCH`]).
static FIRST: AtomicI32 = AtomicI32::new(0);
static FIRST_AT_NS: AtomicU64 = AtomicU64::new(0);
static EPOCH: OnceLock<Instant> = OnceLock::new();

/// What the handler does with a signal, given the first one and its age.
fn decide(first: i32, age: Duration, sig: i32) -> Decision {
    match first {
        0 => Decision::Record,
        f if f == sig && age < REPEAT_WINDOW => Decision::Ignore,
        _ => Decision::Exit,
    }
}

#[derive(Debug, PartialEq, Eq)]
enum Decision {
    Record,
    Ignore,
    Exit,
}

/// Install the handlers (once per process; later calls do nothing).
#[allow(unsafe_code)]
pub fn install() -> std::io::Result<()> {
    if EPOCH.set(Instant::now()).is_err() {
        return Ok(());
    }
    for sig in STOP_SIGNALS {
        // SAFETY: the action only reads a clock (clock_gettime is async-signal-safe),
        // touches atomics and may call `_exit` (signal_hook::low_level::exit), all
        // async-signal-safe; it allocates nothing and takes no lock.
        unsafe {
            signal_hook::low_level::register(sig, move || on_signal(sig))?;
        }
    }
    Ok(())
}

fn on_signal(sig: i32) {
    let epoch = *EPOCH.get().expect("installed");
    let now = epoch.elapsed().as_nanos() as u64;
    let first = FIRST.load(Ordering::SeqCst);
    let age = Duration::from_nanos(now.saturating_sub(FIRST_AT_NS.load(Ordering::SeqCst)));
    match decide(first, age, sig) {
        Decision::Record => {
            FIRST_AT_NS.store(now, Ordering::SeqCst);
            FIRST.store(sig, Ordering::SeqCst);
        }
        Decision::Ignore => {}
        Decision::Exit => signal_hook::low_level::exit(128 + sig),
    }
}

/// The stop signal this process received, if any.
pub fn received() -> Option<i32> {
    let n = FIRST.load(Ordering::SeqCst);
    (n != 0).then_some(n)
}

/// The conventional name of a stop signal (`SIGTERM`, …).
pub fn name(sig: i32) -> String {
    match sig {
        SIGTERM => "SIGTERM".into(),
        SIGINT => "SIGINT".into(),
        SIGUSR1 => "SIGUSR1".into(),
        SIGHUP => "SIGHUP".into(),
        other => format!("signal {other}"),
    }
}

/// The repeat rule, for tests: (first signal, its age, this signal) → whether
/// this one exits at once.
pub fn exits_at_once(first: i32, age: Duration, sig: i32) -> bool {
    decide(first, age, sig) == Decision::Exit
}
