//! The backend chosen at run time, [`Comm`]: MPI under a launcher, a single
//! process otherwise; and the checks that a launch forms one job.

use crate::stats::{counted, Op};
#[cfg(feature = "mpi")]
use crate::MpiComm;
use crate::{Collective, Element, Pending, Solo, Threads};

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
    fn all_gather_into<T: Element>(&self, send: &[T], recv: &mut [T]) {
        counted::<T, _>(Op::AllGather, send.len(), || delegate!(self, c => c.all_gather_into(send, recv)))
    }
    fn reduce_scatter_sum_into<T: Element>(&self, send: &[T], recv: &mut [T]) {
        counted::<T, _>(Op::ReduceScatter, send.len(), || delegate!(self, c => c.reduce_scatter_sum_into(send, recv)))
    }
    fn all_reduce_sum<T: Element>(&self, buf: &mut [T]) {
        let n = buf.len();
        counted::<T, _>(Op::AllReduce, n, || delegate!(self, c => c.all_reduce_sum(buf)))
    }
    #[allow(unsafe_code)]
    unsafe fn all_reduce_sum_start<'b, T: Element>(&self, send: &'b [T], recv: &'b mut [T]) -> Box<dyn Pending + 'b> {
        // Counted when started: the seconds are the start's (or, by default, the blocking sum's).
        // SAFETY: the caller keeps this method's contract, which the backends' share.
        counted::<T, _>(
            Op::AllReduce,
            send.len(),
            || delegate!(self, c => unsafe { c.all_reduce_sum_start(send, recv) }),
        )
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
    fn split(&self, color: usize) -> Self {
        match self {
            Comm::Solo(c) => Comm::Solo(c.split(color)),
            Comm::Threads(c) => Comm::Threads(c.split(color)),
            #[cfg(feature = "mpi")]
            Comm::Mpi(c) => Comm::Mpi(c.split(color)),
        }
    }
}
