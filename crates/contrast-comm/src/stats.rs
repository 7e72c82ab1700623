//! Counts of the collectives [`crate::Comm`] runs (calls, elements, bytes,
//! seconds), for the metrics.

/// The collectives [`crate::Comm`] counts, in [`OP_NAMES`] order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// [`crate::Collective::all_gather`].
    AllGather,
    /// [`crate::Collective::reduce_scatter_sum`].
    ReduceScatter,
    /// [`crate::Collective::all_reduce_sum`] and [`crate::Collective::all_reduce_max`].
    AllReduce,
    /// [`crate::Collective::all_to_all`].
    AllToAll,
    /// [`crate::Collective::broadcast`].
    Broadcast,
}

/// Label of each [`Op`] in metrics.
pub const OP_NAMES: [&str; 5] = ["all_gather", "reduce_scatter", "all_reduce", "all_to_all", "broadcast"];

/// Calls, bytes sent and seconds of one collective, summed over this process's life.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct OpStats {
    /// Calls.
    pub calls: u64,
    /// Bytes this rank contributed.
    pub bytes: u64,
    /// Seconds inside the call (waiting for the slowest rank included).
    pub seconds: f64,
}

struct Counter {
    calls: std::sync::atomic::AtomicU64,
    bytes: std::sync::atomic::AtomicU64,
    nanos: std::sync::atomic::AtomicU64,
}

#[allow(clippy::declare_interior_mutable_const)]
const ZERO: Counter = Counter {
    calls: std::sync::atomic::AtomicU64::new(0),
    bytes: std::sync::atomic::AtomicU64::new(0),
    nanos: std::sync::atomic::AtomicU64::new(0),
};
static COUNTERS: [Counter; 5] = [ZERO; 5];

/// What every [`crate::Comm`] of this process has moved, per [`Op`] (for metrics; it
/// never calls MPI).
pub fn comm_stats() -> [OpStats; 5] {
    use std::sync::atomic::Ordering::Relaxed;
    std::array::from_fn(|k| OpStats {
        calls: COUNTERS[k].calls.load(Relaxed),
        bytes: COUNTERS[k].bytes.load(Relaxed),
        seconds: COUNTERS[k].nanos.load(Relaxed) as f64 * 1e-9,
    })
}

/// Run one collective, counting it under `op` with `elements` of `T` sent.
pub(crate) fn counted<T, R>(op: Op, elements: usize, f: impl FnOnce() -> R) -> R {
    use std::sync::atomic::Ordering::Relaxed;
    let t0 = std::time::Instant::now();
    let out = f();
    let c = &COUNTERS[op as usize];
    c.calls.fetch_add(1, Relaxed);
    c.bytes.fetch_add((elements * std::mem::size_of::<T>()) as u64, Relaxed);
    c.nanos.fetch_add(t0.elapsed().as_nanos() as u64, Relaxed);
    out
}
