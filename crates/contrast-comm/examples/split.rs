//! Run under `mpirun -n 4`: the ranks split by parity into two groups, each
//! sums its members' ranks and broadcasts from its last member, and the world
//! still sums after; prints one line per rank that a trainer test checks.

use contrast_comm::{Collective, Comm};

fn main() {
    let comm = Comm::from_env().expect("MPI starts");
    let sub = comm.split(comm.rank() % 2);
    let mut sum = [comm.rank() as i64];
    sub.all_reduce_sum(&mut sum);
    let mut last = [comm.rank() as i64];
    sub.broadcast(&mut last, sub.world_size() - 1);
    let mut all = [1i64];
    comm.all_reduce_sum(&mut all);
    println!(
        "rank {} of {}: group rank {} of {}, group sum {}, group last {}, world {}",
        comm.rank(),
        comm.world_size(),
        sub.rank(),
        sub.world_size(),
        sum[0],
        last[0],
        all[0]
    );
}
