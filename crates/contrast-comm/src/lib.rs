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

#[cfg(feature = "mpi")]
mod mpi_backend;
#[cfg(feature = "mpi")]
pub use mpi_backend::{abort_world, MpiComm, CHECK_COUNTS_VAR};

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
    /// [`Collective::all_gather`] into `recv` (length P·len): a backend that can
    /// write there directly (MPI) copies nothing more.
    fn all_gather_into<T: Element>(&self, send: &[T], recv: &mut [T]) {
        recv.copy_from_slice(&self.all_gather(send));
    }
    /// [`Collective::reduce_scatter_sum`] into `recv` (length len/P).
    fn reduce_scatter_sum_into<T: Element>(&self, send: &[T], recv: &mut [T]) {
        recv.copy_from_slice(&self.reduce_scatter_sum(send));
    }
    /// Element-wise sum over ranks, in place.
    fn all_reduce_sum<T: Element>(&self, buf: &mut [T]);
    /// Start the element-wise sum over ranks of `send` into `recv` (equal
    /// lengths) and return without waiting for it, so that computation
    /// overlaps it (the engine reduces gradient buckets during backward).
    /// Every rank must start such sums in the same order. The default runs the
    /// blocking sum at once.
    ///
    /// # Safety
    /// The returned [`Pending`] borrows both buffers and must end by
    /// [`Pending::wait`] or by being dropped (which waits). Leaking it
    /// (`mem::forget`, a reference cycle) would let the backend write `recv`
    /// after the borrow ends.
    #[allow(unsafe_code)]
    unsafe fn all_reduce_sum_start<'b, T: Element>(&self, send: &'b [T], recv: &'b mut [T]) -> Box<dyn Pending + 'b> {
        recv.copy_from_slice(send);
        self.all_reduce_sum(recv);
        Box::new(Done)
    }
    /// Element-wise maximum over ranks, in place.
    fn all_reduce_max<T: Element>(&self, buf: &mut [T]);
    /// `send` has P equal blocks; block j goes to rank j. Returns the blocks
    /// received, in rank order.
    fn all_to_all<T: Element>(&self, send: &[T]) -> Vec<T>;
    /// Overwrite `buf` on every rank with the root's.
    fn broadcast<T: Element>(&self, buf: &mut [T], root: usize);
    /// Wait for every rank.
    fn barrier(&self);
    /// A sub-communicator of the ranks that pass the same `color` (as
    /// `MPI_Comm_split` with the rank as key: ranks keep their relative order).
    /// Collective: every rank calls it, in the same order as its other collectives.
    fn split(&self, color: usize) -> Self
    where
        Self: Sized;
}

/// A collective started by [`Collective::all_reduce_sum_start`].
pub trait Pending {
    /// Whether it has completed. MPI progresses a non-blocking collective only
    /// inside MPI calls, so calling this now and then also moves it along.
    fn test(&mut self) -> bool;
    /// Block until it completes.
    fn wait(self: Box<Self>);
}

/// A collective that completed when it was started.
struct Done;

impl Pending for Done {
    fn test(&mut self) -> bool {
        true
    }
    fn wait(self: Box<Self>) {}
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
    fn split(&self, _color: usize) -> Self {
        Solo
    }
}

/// End the process with `code` (built without MPI there is no job to end).
#[cfg(not(feature = "mpi"))]
pub fn abort_world(code: i32) -> ! {
    std::process::exit(code)
}

mod launch;
mod stats;
#[cfg(test)]
mod tests;
mod threads;

pub use launch::{check_launch, launched_under_mpi, launcher_rank, launcher_world_size, Comm};
pub use stats::{comm_stats, Op, OpStats, OP_NAMES};
pub use threads::Threads;
