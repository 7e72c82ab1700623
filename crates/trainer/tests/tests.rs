//! End-to-end tests of the `trainer` binary (one test binary: each links libtorch).
//!
//! They write a small learnable IDX dataset, run the built binary alone and
//! under `mpirun`, and compare what it saved: the MPI parity of docs/design.md
//! invariant 1 through real MPI, exact resume (also onto another world size),
//! the NaN stop, bad-input errors and the summary keys.

mod common;
mod configs;
mod encoders;
mod faults;
mod hooks;
mod metrics;
mod outputs;
mod parity;
mod pba;
mod reliability;
mod resume;
mod survey;
mod text;
