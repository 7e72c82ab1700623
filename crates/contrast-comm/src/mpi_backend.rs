//! MPI backend through the `mpi` crate. Implementation neutral: only MPI-3
//! calls (`MPI_Allgather`, `MPI_Reduce_scatter_block`, `MPI_Allreduce`,
//! `MPI_Iallreduce`, `MPI_Alltoall`, `MPI_Bcast`, `MPI_Comm_split_type(SHARED)`
//! for the local rank), so Open MPI and MPICH behave alike, under `mpirun` or `srun`.

use crate::{Collective, Element, Pending};
use mpi::collective::SystemOperation;
use mpi::ffi;
use mpi::topology::{Communicator, SimpleCommunicator};
use mpi::traits::*;

/// Set (to anything but `0`) to check element counts in release builds too.
pub const CHECK_COUNTS_VAR: &str = "CONTRAST_CHECK_COLLECTIVES";

/// One MPI rank of `MPI_COMM_WORLD`. Dropping it finalises MPI.
pub struct MpiComm {
    world: SimpleCommunicator,
    node: SimpleCommunicator,
    /// Whether every collective first checks that the ranks pass equal counts.
    check_counts: bool,
    // Declared last: dropped after the communicators; the last holder (the
    // world's communicator or a split of it) finalises MPI.
    universe: std::sync::Arc<mpi::environment::Universe>,
}

impl MpiComm {
    /// Initialise MPI. Serialized threading is asked for: on CUDA, libtorch runs
    /// the gradient hooks that start bucket all-reduces on its device thread
    /// while the main thread waits in backward, so one thread calls MPI at a time.
    pub fn init() -> Result<Self, String> {
        let (universe, _level) = mpi::initialize_with_threading(mpi::Threading::Serialized)
            .ok_or_else(|| "MPI was already initialised in this process".to_string())?;
        let world = universe.world();
        let node = world.split_shared(world.rank());
        let check_counts = cfg!(debug_assertions) || std::env::var_os(CHECK_COUNTS_VAR).is_some_and(|v| v != "0");
        Ok(Self { world, node, check_counts, universe: std::sync::Arc::new(universe) })
    }

    /// In debug builds (or with [`CHECK_COUNTS_VAR`] set): one small all-reduce
    /// before a collective, so that ranks passing different element counts is a
    /// panic naming the operation, not undefined behaviour inside MPI.
    fn agree_count(&self, op: &str, count: usize) {
        if !self.check_counts {
            return;
        }
        let n = count as i64;
        let mut range = [n, -n];
        let send = range;
        self.world.all_reduce_into(&send[..], &mut range[..], SystemOperation::max());
        let (max, min) = (range[0], -range[1]);
        assert!(
            min == max,
            "{op}: the ranks passed different element counts (rank {} passed {n}; they range over {min}..={max}): \
             every rank must call the same collectives with the same lengths",
            self.world.rank()
        );
    }

    /// `MPI_Abort` on the world communicator.
    pub fn abort(&self, code: i32) -> ! {
        self.world.abort(code)
    }
}

impl Collective for MpiComm {
    fn rank(&self) -> usize {
        self.world.rank() as usize
    }
    fn world_size(&self) -> usize {
        self.world.size() as usize
    }
    fn local_rank(&self) -> usize {
        self.node.rank() as usize
    }
    fn local_size(&self) -> usize {
        self.node.size() as usize
    }
    fn all_gather<T: Element>(&self, send: &[T]) -> Vec<T> {
        self.agree_count("all_gather", send.len());
        let mut out = vec![T::zeroed(); send.len() * self.world_size()];
        self.world.all_gather_into(send, &mut out[..]);
        out
    }
    fn all_gather_into<T: Element>(&self, send: &[T], recv: &mut [T]) {
        self.agree_count("all_gather", send.len());
        assert_eq!(recv.len(), send.len() * self.world_size(), "all_gather_into: receive buffer length");
        self.world.all_gather_into(send, recv);
    }
    fn reduce_scatter_sum_into<T: Element>(&self, send: &[T], recv: &mut [T]) {
        self.agree_count("reduce_scatter_sum", send.len());
        assert_eq!(recv.len() * self.world_size(), send.len(), "reduce_scatter_sum_into: buffer lengths");
        self.world.reduce_scatter_block_into(send, recv, SystemOperation::sum());
    }
    fn reduce_scatter_sum<T: Element>(&self, send: &[T]) -> Vec<T> {
        self.agree_count("reduce_scatter_sum", send.len());
        let p = self.world_size();
        assert_eq!(send.len() % p, 0, "reduce_scatter_sum: length {} not divisible by P={p}", send.len());
        let mut out = vec![T::zeroed(); send.len() / p];
        self.world.reduce_scatter_block_into(send, &mut out[..], SystemOperation::sum());
        out
    }
    fn all_reduce_sum<T: Element>(&self, buf: &mut [T]) {
        self.agree_count("all_reduce_sum", buf.len());
        let send = buf.to_vec();
        self.world.all_reduce_into(&send[..], buf, SystemOperation::sum());
    }
    #[allow(unsafe_code)]
    unsafe fn all_reduce_sum_start<'b, T: Element>(&self, send: &'b [T], recv: &'b mut [T]) -> Box<dyn Pending + 'b> {
        assert_eq!(send.len(), recv.len(), "all_reduce_sum_start: buffer lengths");
        self.agree_count("all_reduce_sum_start", send.len());
        let count = i32::try_from(send.len()).expect("all_reduce_sum_start: more than 2^31 elements");
        let mut request = std::mem::MaybeUninit::<ffi::MPI_Request>::uninit();
        // SAFETY: `send` and `recv` are valid for `count` elements of T's MPI datatype and
        // stay borrowed by the returned request, which waits for completion before the
        // borrow can end (its `wait` or its `Drop`; the caller promises not to leak it).
        // The communicator outlives the call; MPI fills `request` before returning.
        let request = unsafe {
            ffi::MPI_Iallreduce(
                send.as_ptr().cast(),
                recv.as_mut_ptr().cast(),
                count,
                T::equivalent_datatype().as_raw(),
                ffi::RSMPI_SUM,
                self.world.as_raw(),
                request.as_mut_ptr(),
            );
            request.assume_init()
        };
        Box::new(MpiPending { request, done: false, _buffers: std::marker::PhantomData })
    }
    fn all_reduce_max<T: Element>(&self, buf: &mut [T]) {
        self.agree_count("all_reduce_max", buf.len());
        let send = buf.to_vec();
        self.world.all_reduce_into(&send[..], buf, SystemOperation::max());
    }
    fn all_to_all<T: Element>(&self, send: &[T]) -> Vec<T> {
        self.agree_count("all_to_all", send.len());
        let mut out = vec![T::zeroed(); send.len()];
        self.world.all_to_all_into(send, &mut out[..]);
        out
    }
    fn broadcast<T: Element>(&self, buf: &mut [T], root: usize) {
        self.agree_count("broadcast", buf.len());
        self.world.process_at_rank(root as i32).broadcast_into(buf);
    }
    fn barrier(&self) {
        self.world.barrier();
    }
    fn split(&self, color: usize) -> Self {
        let value = i32::try_from(color).expect("split: a color under 2^31");
        self.agree_count("split", 1);
        let world = self
            .world
            .split_by_color(mpi::topology::Color::with_value(value))
            .expect("split: a defined color always gives a communicator");
        let node = world.split_shared(world.rank());
        Self { world, node, check_counts: self.check_counts, universe: self.universe.clone() }
    }
}

/// An `MPI_Iallreduce` in flight, borrowing its buffers until it completes.
struct MpiPending<'b> {
    request: ffi::MPI_Request,
    done: bool,
    _buffers: std::marker::PhantomData<&'b mut [u8]>,
}

#[allow(unsafe_code)]
impl Pending for MpiPending<'_> {
    fn test(&mut self) -> bool {
        if !self.done {
            let mut flag = 0;
            // SAFETY: `request` is an active request from MPI_Iallreduce (MPI sets it to
            // MPI_REQUEST_NULL once complete, and `done` stops further calls).
            unsafe { ffi::MPI_Test(&mut self.request, &mut flag, ffi::RSMPI_STATUS_IGNORE) };
            self.done = flag != 0;
        }
        self.done
    }
    fn wait(mut self: Box<Self>) {
        self.finish();
    }
}

impl MpiPending<'_> {
    #[allow(unsafe_code)]
    fn finish(&mut self) {
        if !self.done {
            // SAFETY: as in `test`; MPI_Wait returns once the buffers are no longer in use.
            unsafe { ffi::MPI_Wait(&mut self.request, ffi::RSMPI_STATUS_IGNORE) };
            self.done = true;
        }
    }
}

impl Drop for MpiPending<'_> {
    fn drop(&mut self) {
        self.finish();
    }
}

/// End the whole job from any thread: `MPI_Abort` on the world when MPI is
/// up (the launcher then ends every rank, and exits with `code`), else exit
/// this process with `code`. For a watchdog, whose rank may be blocked inside
/// a collective on another thread.
#[allow(unsafe_code)]
pub fn abort_world(code: i32) -> ! {
    let mut up = 0;
    let mut down = 0;
    // SAFETY: MPI_Initialized and MPI_Finalized may be called at any time, from any thread.
    unsafe {
        ffi::MPI_Initialized(&mut up);
        ffi::MPI_Finalized(&mut down);
    }
    if up != 0 && down == 0 {
        // SAFETY: MPI is initialised and not finalised; MPI_Abort does not return.
        unsafe { ffi::MPI_Abort(ffi::RSMPI_COMM_WORLD, code) };
    }
    std::process::exit(code)
}
