//! MPI backend through the `mpi` crate. Implementation neutral: only MPI-3
//! calls (`MPI_Allgather`, `MPI_Reduce_scatter_block`, `MPI_Allreduce`,
//! `MPI_Alltoall`, `MPI_Bcast`, `MPI_Comm_split_type(SHARED)` for the local
//! rank), so Open MPI and MPICH behave alike, under `mpirun` or `srun`.

use crate::{Collective, Element};
use mpi::collective::SystemOperation;
use mpi::topology::{Communicator, SimpleCommunicator};
use mpi::traits::*;

/// One MPI rank of `MPI_COMM_WORLD`. Dropping it finalises MPI.
pub struct MpiComm {
    world: SimpleCommunicator,
    node: SimpleCommunicator,
    // Declared last: dropped after the communicators, which finalises MPI.
    _universe: mpi::environment::Universe,
}

impl MpiComm {
    /// Initialise MPI (threads funneled through the main thread).
    pub fn init() -> Result<Self, String> {
        let (universe, _level) = mpi::initialize_with_threading(mpi::Threading::Funneled)
            .ok_or_else(|| "MPI was already initialised in this process".to_string())?;
        let world = universe.world();
        let node = world.split_shared(world.rank());
        Ok(Self { world, node, _universe: universe })
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
        let mut out = vec![T::zeroed(); send.len() * self.world_size()];
        self.world.all_gather_into(send, &mut out[..]);
        out
    }
    fn all_gather_into<T: Element>(&self, send: &[T], recv: &mut [T]) {
        assert_eq!(recv.len(), send.len() * self.world_size(), "all_gather_into: receive buffer length");
        self.world.all_gather_into(send, recv);
    }
    fn reduce_scatter_sum_into<T: Element>(&self, send: &[T], recv: &mut [T]) {
        assert_eq!(recv.len() * self.world_size(), send.len(), "reduce_scatter_sum_into: buffer lengths");
        self.world.reduce_scatter_block_into(send, recv, SystemOperation::sum());
    }
    fn reduce_scatter_sum<T: Element>(&self, send: &[T]) -> Vec<T> {
        let p = self.world_size();
        assert_eq!(send.len() % p, 0, "reduce_scatter_sum: length {} not divisible by P={p}", send.len());
        let mut out = vec![T::zeroed(); send.len() / p];
        self.world.reduce_scatter_block_into(send, &mut out[..], SystemOperation::sum());
        out
    }
    fn all_reduce_sum<T: Element>(&self, buf: &mut [T]) {
        let send = buf.to_vec();
        self.world.all_reduce_into(&send[..], buf, SystemOperation::sum());
    }
    fn all_reduce_max<T: Element>(&self, buf: &mut [T]) {
        let send = buf.to_vec();
        self.world.all_reduce_into(&send[..], buf, SystemOperation::max());
    }
    fn all_to_all<T: Element>(&self, send: &[T]) -> Vec<T> {
        let mut out = vec![T::zeroed(); send.len()];
        self.world.all_to_all_into(send, &mut out[..]);
        out
    }
    fn broadcast<T: Element>(&self, buf: &mut [T], root: usize) {
        self.world.process_at_rank(root as i32).broadcast_into(buf);
    }
    fn barrier(&self) {
        self.world.barrier();
    }
}
