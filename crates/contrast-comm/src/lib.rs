//! Collective communication over plain element buffers.
//!
//! [`Collective`] is the one interface the engine uses. Three backends:
//! [`Solo`] (one process), [`Threads`] (N ranks as threads of one process, for
//! fast tests that need no MPI) and, with feature `mpi`, [`MpiComm`] (the `mpi`
//! crate over Open MPI or MPICH; works under `mpirun`, `mpiexec` and `srun`).
//! [`Comm`] picks one at run time.
//!
//! Every buffer is rank ordered and row major. Sums are taken in rank order in
//! the threaded backend, so every rank sees bit-identical results.
#![warn(missing_docs)]

use std::fmt::Debug;
use std::sync::{Arc, Condvar, Mutex};

#[cfg(feature = "mpi")]
mod mpi_backend;
#[cfg(feature = "mpi")]
pub use mpi_backend::MpiComm;

#[doc(hidden)]
#[cfg(feature = "mpi")]
pub trait MpiType: mpi::datatype::Equivalence {}
#[cfg(feature = "mpi")]
impl<T: mpi::datatype::Equivalence> MpiType for T {}
#[doc(hidden)]
#[cfg(not(feature = "mpi"))]
pub trait MpiType {}
#[cfg(not(feature = "mpi"))]
impl<T> MpiType for T {}

/// Element types that travel through collectives: f32, f64, i64, u8.
pub trait Element: bytemuck::Pod + Send + Sync + Debug + PartialOrd + MpiType {
    /// a + b (wrapping for integers).
    fn add(self, other: Self) -> Self;
}

impl Element for f32 {
    fn add(self, o: Self) -> Self {
        self + o
    }
}
impl Element for f64 {
    fn add(self, o: Self) -> Self {
        self + o
    }
}
impl Element for i64 {
    fn add(self, o: Self) -> Self {
        self.wrapping_add(o)
    }
}
impl Element for u8 {
    fn add(self, o: Self) -> Self {
        self.wrapping_add(o)
    }
}

fn maximum<T: Element>(a: T, b: T) -> T {
    if b > a {
        b
    } else {
        a
    }
}

/// Collective operations among the ranks of one job.
///
/// All ranks must call the same operations in the same order with buffers of
/// the same length (as in MPI).
pub trait Collective {
    /// This rank, in `0..world_size()`.
    fn rank(&self) -> usize;
    /// Number of ranks P.
    fn world_size(&self) -> usize;
    /// Rank among the ranks on this host.
    fn local_rank(&self) -> usize;
    /// Ranks on this host.
    fn local_size(&self) -> usize;
    /// Concatenation of every rank's `send`, in rank order (length P·len).
    fn all_gather<T: Element>(&self, send: &[T]) -> Vec<T>;
    /// `send` has P equal blocks; returns block `rank` summed over all ranks.
    fn reduce_scatter_sum<T: Element>(&self, send: &[T]) -> Vec<T>;
    /// Element-wise sum over ranks, in place.
    fn all_reduce_sum<T: Element>(&self, buf: &mut [T]);
    /// Element-wise maximum over ranks, in place.
    fn all_reduce_max<T: Element>(&self, buf: &mut [T]);
    /// `send` has P equal blocks; block j goes to rank j. Returns the blocks
    /// received, in rank order.
    fn all_to_all<T: Element>(&self, send: &[T]) -> Vec<T>;
    /// Overwrite `buf` on every rank with the root's.
    fn broadcast<T: Element>(&self, buf: &mut [T], root: usize);
    /// Wait for every rank.
    fn barrier(&self);
}

/// A single process: every collective is the identity.
#[derive(Debug, Default, Clone, Copy)]
pub struct Solo;

impl Collective for Solo {
    fn rank(&self) -> usize {
        0
    }
    fn world_size(&self) -> usize {
        1
    }
    fn local_rank(&self) -> usize {
        0
    }
    fn local_size(&self) -> usize {
        1
    }
    fn all_gather<T: Element>(&self, send: &[T]) -> Vec<T> {
        send.to_vec()
    }
    fn reduce_scatter_sum<T: Element>(&self, send: &[T]) -> Vec<T> {
        send.to_vec()
    }
    fn all_reduce_sum<T: Element>(&self, _buf: &mut [T]) {}
    fn all_reduce_max<T: Element>(&self, _buf: &mut [T]) {}
    fn all_to_all<T: Element>(&self, send: &[T]) -> Vec<T> {
        send.to_vec()
    }
    fn broadcast<T: Element>(&self, _buf: &mut [T], _root: usize) {}
    fn barrier(&self) {}
}

struct Shared {
    slots: Mutex<Vec<Vec<u8>>>,
    barrier: RankBarrier,
}

/// A barrier that a panicking rank breaks: the ranks waiting at it (or arriving
/// later) panic too, so a failing rank fails the test instead of deadlocking it.
struct RankBarrier {
    /// (arrived in this generation, generation, broken).
    state: Mutex<(usize, u64, bool)>,
    cv: Condvar,
    size: usize,
}

impl RankBarrier {
    fn new(size: usize) -> Self {
        Self { state: Mutex::new((0, 0, false)), cv: Condvar::new(), size }
    }

    fn wait(&self) {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if st.2 {
            panic!("another rank panicked");
        }
        let generation = st.1;
        st.0 += 1;
        if st.0 == self.size {
            *st = (0, generation + 1, false);
            self.cv.notify_all();
            return;
        }
        while st.1 == generation && !st.2 {
            st = self.cv.wait(st).unwrap_or_else(|e| e.into_inner());
        }
        if st.1 == generation {
            panic!("another rank panicked");
        }
    }

    fn break_all(&self) {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        st.2 = true;
        self.cv.notify_all();
    }
}

/// One rank of a group of ranks that are threads of this process.
///
/// Made by [`Threads::run`]; used for tests of the global-batch engine without
/// MPI. Every operation is two barriers around a shared slot table.
pub struct Threads {
    rank: usize,
    size: usize,
    ranks_per_host: usize,
    shared: Arc<Shared>,
}

impl Threads {
    /// Run `f` on `p` ranks, each a thread, and return the results in rank
    /// order. A panic on any rank is re-raised here.
    pub fn run<R, F>(p: usize, f: F) -> Vec<R>
    where
        R: Send,
        F: Fn(Threads) -> R + Sync,
    {
        Self::run_on_hosts(p, p, f)
    }

    /// As [`Threads::run`], pretending `ranks_per_host` ranks share each host
    /// (for tests of local rank and thread choices).
    pub fn run_on_hosts<R, F>(p: usize, ranks_per_host: usize, f: F) -> Vec<R>
    where
        R: Send,
        F: Fn(Threads) -> R + Sync,
    {
        assert!(p > 0 && ranks_per_host > 0);
        let shared = Arc::new(Shared { slots: Mutex::new(vec![Vec::new(); p]), barrier: RankBarrier::new(p) });
        std::thread::scope(|s| {
            let handles: Vec<_> = (0..p)
                .map(|rank| {
                    let comm = Threads { rank, size: p, ranks_per_host, shared: shared.clone() };
                    let (f, shared) = (&f, shared.clone());
                    s.spawn(move || {
                        let out = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(comm)));
                        out.unwrap_or_else(|e| {
                            shared.barrier.break_all();
                            std::panic::resume_unwind(e)
                        })
                    })
                })
                .collect();
            let joined: Vec<std::thread::Result<R>> = handles.into_iter().map(|h| h.join()).collect();
            // Re-raise the panic that broke the barrier, not one of the ranks that followed it.
            let secondary = |e: &Box<dyn std::any::Any + Send>| {
                e.downcast_ref::<&str>().is_some_and(|m| *m == "another rank panicked")
            };
            let first = joined.iter().position(|r| r.as_ref().is_err_and(|e| !secondary(e)));
            if let Some(i) = first.or_else(|| joined.iter().position(|r| r.is_err())) {
                let mut joined = joined;
                std::panic::resume_unwind(joined.swap_remove(i).err().unwrap());
            }
            joined.into_iter().map(|r| r.ok().unwrap()).collect()
        })
    }

    /// Publish `bytes` in this rank's slot, wait for all, run `read` on the
    /// table, wait again so no slot is overwritten while others still read.
    fn exchange<R>(&self, bytes: &[u8], read: impl FnOnce(&[Vec<u8>]) -> R) -> R {
        {
            let mut slots = self.shared.slots.lock().unwrap();
            slots[self.rank].clear();
            slots[self.rank].extend_from_slice(bytes);
        }
        self.shared.barrier.wait();
        let out = {
            let slots = self.shared.slots.lock().unwrap();
            read(&slots)
        };
        self.shared.barrier.wait();
        out
    }

    fn elements<T: Element>(bytes: &[u8]) -> Vec<T> {
        // Slots are byte vectors (alignment 1): copy instead of casting in place.
        let mut out = vec![T::zeroed(); bytes.len() / std::mem::size_of::<T>()];
        bytemuck::cast_slice_mut::<T, u8>(&mut out).copy_from_slice(bytes);
        out
    }

    fn reduce_into<T: Element>(&self, buf: &mut [T], op: fn(T, T) -> T) {
        let n = buf.len();
        let sum = self.exchange(bytemuck::cast_slice(buf), |slots| {
            let mut acc = Self::elements::<T>(&slots[0]);
            for s in &slots[1..] {
                let v = Self::elements::<T>(s);
                assert_eq!(v.len(), n, "all_reduce: ranks passed buffers of different lengths");
                for (a, b) in acc.iter_mut().zip(v) {
                    *a = op(*a, b);
                }
            }
            acc
        });
        buf.copy_from_slice(&sum);
    }
}

impl Collective for Threads {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world_size(&self) -> usize {
        self.size
    }
    fn local_rank(&self) -> usize {
        self.rank % self.ranks_per_host
    }
    fn local_size(&self) -> usize {
        let host = self.rank / self.ranks_per_host;
        (self.size - host * self.ranks_per_host).min(self.ranks_per_host)
    }
    fn all_gather<T: Element>(&self, send: &[T]) -> Vec<T> {
        self.exchange(bytemuck::cast_slice(send), |slots| {
            let mut out = Vec::with_capacity(send.len() * slots.len());
            for s in slots {
                assert_eq!(s.len(), std::mem::size_of_val(send), "all_gather: unequal lengths across ranks");
                out.extend(Self::elements::<T>(s));
            }
            out
        })
    }
    fn reduce_scatter_sum<T: Element>(&self, send: &[T]) -> Vec<T> {
        assert_eq!(
            send.len() % self.size,
            0,
            "reduce_scatter_sum: length {} not divisible by P={}",
            send.len(),
            self.size
        );
        let n = send.len() / self.size;
        let rank = self.rank;
        self.exchange(bytemuck::cast_slice(send), |slots| {
            let mut acc = vec![T::zeroed(); n];
            for s in slots {
                let v = Self::elements::<T>(s);
                for (a, b) in acc.iter_mut().zip(&v[rank * n..(rank + 1) * n]) {
                    *a = a.add(*b);
                }
            }
            acc
        })
    }
    fn all_reduce_sum<T: Element>(&self, buf: &mut [T]) {
        // Start from zero so that the order of additions is the same on every rank.
        self.reduce_into(buf, T::add)
    }
    fn all_reduce_max<T: Element>(&self, buf: &mut [T]) {
        self.reduce_into(buf, maximum)
    }
    fn all_to_all<T: Element>(&self, send: &[T]) -> Vec<T> {
        assert_eq!(send.len() % self.size, 0, "all_to_all: length not divisible by P");
        let n = send.len() / self.size;
        let rank = self.rank;
        self.exchange(bytemuck::cast_slice(send), |slots| {
            slots.iter().flat_map(|s| Self::elements::<T>(s)[rank * n..(rank + 1) * n].to_vec()).collect()
        })
    }
    fn broadcast<T: Element>(&self, buf: &mut [T], root: usize) {
        let got = self.exchange(bytemuck::cast_slice(buf), |slots| Self::elements::<T>(&slots[root]));
        buf.copy_from_slice(&got);
    }
    fn barrier(&self) {
        self.shared.barrier.wait();
    }
}

/// The backend chosen at run time.
pub enum Comm {
    /// One process.
    Solo(Solo),
    /// Ranks as threads (tests).
    Threads(Threads),
    /// MPI ranks.
    #[cfg(feature = "mpi")]
    Mpi(MpiComm),
}

/// True when this process was started by an MPI launcher or Slurm with more
/// than one task (Open MPI, MPICH/Hydra, PMIx, Slurm).
pub fn launched_under_mpi() -> bool {
    const VARS: [&str; 6] =
        ["OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK", "MPI_LOCALNRANKS", "SLURM_NTASKS", "SLURM_STEP_NUM_TASKS"];
    VARS.iter().any(|v| std::env::var(v).is_ok_and(|s| !s.is_empty()))
}

/// The task count a launcher announces, and the variable that says it: Open
/// MPI's `mpirun`, MPICH/Hydra and Intel MPI (PMI), and Slurm's `srun` (whose
/// step size is known before MPI is up, whatever its PMI plugin).
pub fn launcher_world_size(get: impl Fn(&str) -> Option<String>) -> Option<(usize, &'static str)> {
    ["OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "SLURM_STEP_NUM_TASKS"]
        .into_iter()
        .find_map(|v| get(v).and_then(|s| s.trim().parse().ok()).map(|n| (n, v)))
}

/// This process's rank as its launcher announces it (before MPI is up), for
/// early error messages: Open MPI, PMI (MPICH, Intel MPI), PMIx, Slurm.
pub fn launcher_rank(get: impl Fn(&str) -> Option<String>) -> Option<usize> {
    ["OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK", "SLURM_PROCID"]
        .into_iter()
        .find_map(|v| get(v).and_then(|s| s.trim().parse().ok()))
}

/// Refuse a launch that would run tasks that do not form one job: several
/// tasks started for a binary without MPI, or an MPI world smaller than the
/// launcher's task count (`srun` without a PMI plugin the MPI library speaks:
/// every task a world of its own). Either would run P independent trainers
/// writing into one directory.
pub fn check_launch(launched: Option<(usize, &str)>, mpi_world: Option<usize>) -> Result<(), String> {
    match (launched, mpi_world) {
        (Some((n, var)), None) if n > 1 => Err(format!(
            "started as one of {n} tasks ({var}={n}) but this binary was built without feature `mpi`: \
             the tasks would train alone, into one directory; build with the default features"
        )),
        (Some((n, var)), Some(p)) if n != p => Err(format!(
            "the launcher started {n} tasks ({var}={n}) but MPI sees a world of {p}: \
             under srun, pass --mpi=pmix (or pmi2) as `srun --mpi=list` offers for this MPI (docs/cluster.md)"
        )),
        _ => Ok(()),
    }
}

impl Comm {
    /// MPI when launched by `mpirun`/`srun` and built with feature `mpi`;
    /// otherwise a single process. A launch whose tasks would not form one job
    /// is an error ([`check_launch`]).
    pub fn from_env() -> Result<Self, String> {
        let launched = launcher_world_size(|v| std::env::var(v).ok());
        #[cfg(feature = "mpi")]
        if launched_under_mpi() {
            let mpi = MpiComm::init()?;
            check_launch(launched, Some(mpi.world_size()))?;
            return Ok(Comm::Mpi(mpi));
        }
        #[cfg(not(feature = "mpi"))]
        check_launch(launched, None)?;
        Ok(Comm::Solo(Solo))
    }

    /// Stop every rank of the job after an unrecoverable error on this one
    /// (`MPI_Abort`); a no-op returning normally for in-process backends.
    pub fn abort_job(&self, code: i32) {
        #[cfg(feature = "mpi")]
        if let Comm::Mpi(m) = self {
            if m.world_size() > 1 {
                m.abort(code);
            }
        }
        let _ = code;
    }

    /// Short backend name for logs.
    pub fn backend(&self) -> &'static str {
        match self {
            Comm::Solo(_) => "solo",
            Comm::Threads(_) => "threads",
            #[cfg(feature = "mpi")]
            Comm::Mpi(_) => "mpi",
        }
    }
}

/// The collectives [`Comm`] counts, in [`OP_NAMES`] order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// [`Collective::all_gather`].
    AllGather,
    /// [`Collective::reduce_scatter_sum`].
    ReduceScatter,
    /// [`Collective::all_reduce_sum`] and [`Collective::all_reduce_max`].
    AllReduce,
    /// [`Collective::all_to_all`].
    AllToAll,
    /// [`Collective::broadcast`].
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

/// What every [`Comm`] of this process has moved, per [`Op`] (for metrics; it
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
fn counted<T, R>(op: Op, elements: usize, f: impl FnOnce() -> R) -> R {
    use std::sync::atomic::Ordering::Relaxed;
    let t0 = std::time::Instant::now();
    let out = f();
    let c = &COUNTERS[op as usize];
    c.calls.fetch_add(1, Relaxed);
    c.bytes.fetch_add((elements * std::mem::size_of::<T>()) as u64, Relaxed);
    c.nanos.fetch_add(t0.elapsed().as_nanos() as u64, Relaxed);
    out
}

macro_rules! delegate {
    ($self:ident, $c:ident => $e:expr) => {
        match $self {
            Comm::Solo($c) => $e,
            Comm::Threads($c) => $e,
            #[cfg(feature = "mpi")]
            Comm::Mpi($c) => $e,
        }
    };
}

impl Collective for Comm {
    fn rank(&self) -> usize {
        delegate!(self, c => c.rank())
    }
    fn world_size(&self) -> usize {
        delegate!(self, c => c.world_size())
    }
    fn local_rank(&self) -> usize {
        delegate!(self, c => c.local_rank())
    }
    fn local_size(&self) -> usize {
        delegate!(self, c => c.local_size())
    }
    fn all_gather<T: Element>(&self, send: &[T]) -> Vec<T> {
        counted::<T, _>(Op::AllGather, send.len(), || delegate!(self, c => c.all_gather(send)))
    }
    fn reduce_scatter_sum<T: Element>(&self, send: &[T]) -> Vec<T> {
        counted::<T, _>(Op::ReduceScatter, send.len(), || delegate!(self, c => c.reduce_scatter_sum(send)))
    }
    fn all_reduce_sum<T: Element>(&self, buf: &mut [T]) {
        let n = buf.len();
        counted::<T, _>(Op::AllReduce, n, || delegate!(self, c => c.all_reduce_sum(buf)))
    }
    fn all_reduce_max<T: Element>(&self, buf: &mut [T]) {
        let n = buf.len();
        counted::<T, _>(Op::AllReduce, n, || delegate!(self, c => c.all_reduce_max(buf)))
    }
    fn all_to_all<T: Element>(&self, send: &[T]) -> Vec<T> {
        counted::<T, _>(Op::AllToAll, send.len(), || delegate!(self, c => c.all_to_all(send)))
    }
    fn broadcast<T: Element>(&self, buf: &mut [T], root: usize) {
        let n = buf.len();
        counted::<T, _>(Op::Broadcast, n, || delegate!(self, c => c.broadcast(buf, root)))
    }
    fn barrier(&self) {
        delegate!(self, c => c.barrier())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn threaded_collectives_match_their_definitions() {
        for p in 1..=4usize {
            let out = Threads::run(p, |c| {
                let r = c.rank() as i64;
                let g = c.all_gather(&[r, 10 * r]);
                let want: Vec<i64> = (0..p as i64).flat_map(|k| [k, 10 * k]).collect();
                assert_eq!(g, want);

                let send: Vec<f64> = (0..2 * p).map(|j| (c.rank() * 100 + j) as f64).collect();
                let rs = c.reduce_scatter_sum(&send);
                let expect: Vec<f64> =
                    (0..2).map(|k| (0..p).map(|q| (q * 100 + c.rank() * 2 + k) as f64).sum()).collect();
                assert_eq!(rs, expect);

                let mut s = [c.rank() as f32 + 1.0];
                c.all_reduce_sum(&mut s);
                assert_eq!(s[0], (p * (p + 1) / 2) as f32);

                let mut m = [c.rank() as u8, 7 - c.rank() as u8];
                c.all_reduce_max(&mut m);
                assert_eq!(m, [p as u8 - 1, 7]);

                let send: Vec<i64> = (0..p as i64).map(|j| 10 * r + j).collect();
                let a2a = c.all_to_all(&send);
                let want: Vec<i64> = (0..p as i64).map(|q| 10 * q + r).collect();
                assert_eq!(a2a, want);

                let mut b = [c.rank() as f32; 3];
                c.broadcast(&mut b, p - 1);
                assert_eq!(b, [(p - 1) as f32; 3]);
                c.barrier();
                c.rank()
            });
            assert_eq!(out, (0..p).collect::<Vec<_>>());
        }
    }

    #[test]
    fn a_panicking_rank_fails_the_run_instead_of_deadlocking_it() {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let out = std::panic::catch_unwind(|| {
                Threads::run(3, |c| {
                    if c.rank() == 1 {
                        panic!("rank 1 fails");
                    }
                    let mut v = [1.0f64];
                    c.all_reduce_sum(&mut v);
                    v[0]
                })
            });
            let message = out.err().and_then(|e| e.downcast_ref::<&str>().map(|s| s.to_string()));
            let _ = tx.send(message);
        });
        let message = rx.recv_timeout(std::time::Duration::from_secs(20)).expect("the threaded ranks deadlocked");
        assert_eq!(message.as_deref(), Some("rank 1 fails"));
    }

    #[test]
    fn local_ranks_follow_hosts() {
        let got = Threads::run_on_hosts(5, 2, |c| (c.local_rank(), c.local_size()));
        assert_eq!(got, vec![(0, 2), (1, 2), (0, 2), (1, 2), (0, 1)]);
    }

    #[test]
    fn launches_that_would_not_form_one_job_are_refused() {
        let env = |pairs: &'static [(&'static str, &'static str)]| {
            move |v: &str| pairs.iter().find(|(k, _)| *k == v).map(|(_, x)| x.to_string())
        };
        assert_eq!(
            launcher_world_size(env(&[("PMI_SIZE", "4"), ("SLURM_STEP_NUM_TASKS", "8")])),
            Some((4, "PMI_SIZE"))
        );
        assert_eq!(launcher_world_size(env(&[("SLURM_STEP_NUM_TASKS", "8")])), Some((8, "SLURM_STEP_NUM_TASKS")));
        assert_eq!(launcher_world_size(env(&[("SLURM_NTASKS", "8")])), None, "the batch shell is no step");
        assert_eq!(launcher_rank(env(&[("PMIX_RANK", "3")])), Some(3));
        assert_eq!(launcher_rank(env(&[("SLURM_PROCID", "5")])), Some(5));
        // A build without MPI under srun or MPICH.
        let err = check_launch(Some((4, "PMI_SIZE")), None).unwrap_err();
        assert!(err.contains("without feature `mpi`") && err.contains("PMI_SIZE=4"), "{err}");
        assert!(check_launch(Some((1, "SLURM_STEP_NUM_TASKS")), None).is_ok());
        assert!(check_launch(None, None).is_ok());
        // srun without a PMI plugin: every task is a world of one.
        let err = check_launch(Some((8, "SLURM_STEP_NUM_TASKS")), Some(1)).unwrap_err();
        assert!(err.contains("--mpi=pmix"), "{err}");
        assert!(check_launch(Some((2, "OMPI_COMM_WORLD_SIZE")), Some(2)).is_ok());
    }

    #[test]
    fn solo_is_identity() {
        let c = Solo;
        assert_eq!(c.all_gather(&[1.0f32, 2.0]), vec![1.0, 2.0]);
        assert_eq!((c.rank(), c.world_size()), (0, 1));
    }
}
