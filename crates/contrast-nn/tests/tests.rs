//! The nn crate's one test binary (each binary links libtorch).
//!
//! - losses: closed forms, slow loop references and central finite differences in f64;
//! - parity: P ranks × B equals 1 rank × P·B for loss and every parameter gradient,
//!   on the threaded backend (docs/design.md invariant 1);
//! - optim: SGD/AdamW against PyTorch's update formulas, the schedule;
//! - overlap: gradient sums started during backward, in order;
//! - stream: the streaming loss heads against their materialised reference forms;
//! - survey_methods: methods with per-item state (InstDisc's bank): P-rank
//!   parity, resume onto another world size, the reference's loss;
//! - kmeans: k-means over item-sharded rows against one rank and plain Lloyd;
//! - survey_epochs: DeepCluster and CPC through the same harness;
//! - whiten: whitening against Su et al.'s transcription and across ranks;
//! - config: plan resolution with the real registry, and a method registered from outside.

mod common;
mod config;
mod encoders;
mod kmeans;
mod losses;
mod methods;
mod optim;
mod overlap;
mod parity;
mod stream;
mod survey;
mod survey_epochs;
mod survey_methods;
mod text_methods;
mod whiten;
