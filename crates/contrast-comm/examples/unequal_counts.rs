//! Run under `mpirun -n 2` with `CONTRAST_CHECK_COLLECTIVES=1`: rank r sums a
//! buffer of 4 + r elements, which the count check turns into a panic naming
//! the operation (without it, MPI's behaviour is undefined). A test of the trainer runs it.

use contrast_comm::{Collective, Comm};

fn main() {
    let comm = Comm::from_env().expect("MPI starts");
    let mut buf = vec![1.0f32; 4 + comm.rank()];
    comm.all_reduce_sum(&mut buf);
    println!("summed {} elements", buf.len());
}
