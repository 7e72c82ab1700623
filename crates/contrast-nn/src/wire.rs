//! Tensors on the wire: every collective over a tensor's elements goes through
//! [`on_host`], which copies the elements to the host in the element type the
//! wire carries (f64 and i64 exactly, every other float kind as f32, as
//! docs/design.md's conventions say), runs the collective, and returns a flat
//! tensor of the input's kind on the input's device.

use contrast_comm::{Collective, Element};
use tch::{Kind, Tensor};

/// A collective over a host slice of any wire element type.
pub trait HostOp {
    /// Run the collective over `v`.
    fn run<T: Element + tch::kind::Element>(&self, v: Vec<T>) -> Vec<T>;
}

/// Every rank's elements, concatenated in rank order.
pub struct AllGather<'a, C>(pub &'a C);

impl<C: Collective> HostOp for AllGather<'_, C> {
    fn run<T: Element + tch::kind::Element>(&self, v: Vec<T>) -> Vec<T> {
        self.0.all_gather(&v)
    }
}

/// The element-wise sum over ranks, of which each rank keeps its 1/P slice.
pub struct ReduceScatterSum<'a, C>(pub &'a C);

impl<C: Collective> HostOp for ReduceScatterSum<'_, C> {
    fn run<T: Element + tch::kind::Element>(&self, v: Vec<T>) -> Vec<T> {
        self.0.reduce_scatter_sum(&v)
    }
}

/// The elements of rank `root` (`.1`), on every rank.
pub struct Broadcast<'a, C>(pub &'a C, pub usize);

impl<C: Collective> HostOp for Broadcast<'_, C> {
    fn run<T: Element + tch::kind::Element>(&self, mut v: Vec<T>) -> Vec<T> {
        self.0.broadcast(&mut v, self.1);
        v
    }
}

/// Run `op` over the elements of `t` (see the module doc): a flat tensor of
/// `t`'s kind on `t`'s device.
pub fn on_host(t: &Tensor, op: &impl HostOp) -> Tensor {
    let out = match t.kind() {
        Kind::Double => Tensor::from_slice(&op.run(crate::to_host::<f64>(t))),
        Kind::Int64 => Tensor::from_slice(&op.run(crate::to_host::<i64>(t))),
        k => Tensor::from_slice(&op.run(crate::to_host::<f32>(t))).to_kind(k),
    };
    out.to_device(t.device())
}

/// Gather local `[B, d]` rows into `[P·B, d]` in rank order (no gradient).
pub fn gather_rows<C: Collective>(comm: &C, local: &Tensor) -> Tensor {
    on_host(local, &AllGather(comm)).view([-1, local.size()[1]])
}
