//! Tensors on the wire: every collective over a tensor's elements goes through
//! [`on_host`], which copies the elements to the host in the element type the
//! wire carries (f64 and i64 exactly, every other float kind as f32, as
//! docs/design.md's conventions say), runs the collective, and returns a flat
//! tensor of the input's kind on the input's device.

use contrast_comm::{Collective, Element};
use tch::{Device, Kind, Tensor};

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

/// Gather local `[B, d]` rows into `[P·B, d]` in rank order (no gradient), on
/// the input's device.
///
/// A contiguous f32 or f64 tensor goes to MPI as it lies in host memory, and the
/// result is written straight into the output tensor (no host copies; see
/// `benches/collectives.rs`). A GPU tensor is staged through pinned host memory
/// ([`staged`]); other kinds go through [`on_host`].
pub fn gather_rows<C: Collective>(comm: &C, local: &Tensor) -> Tensor {
    let (d, device) = (local.size()[1], local.device());
    let local = staged(&local.detach().contiguous());
    let out = |kind| host_buffer(&[local.size()[0] * comm.world_size() as i64, d], kind, device);
    if direct::<f32>(&local) {
        let mut out = out(Kind::Float);
        comm.all_gather_into(host_slice::<f32>(&local), host_slice_mut::<f32>(&mut out));
        out.to_device(device)
    } else if direct::<f64>(&local) {
        let mut out = out(Kind::Double);
        comm.all_gather_into(host_slice::<f64>(&local), host_slice_mut::<f64>(&mut out));
        out.to_device(device)
    } else {
        on_host(&local, &AllGather(comm)).view([-1, d]).to_device(device)
    }
}

/// The sum over ranks of `t` (P equal blocks of rows), of which this rank keeps
/// block `rank`, flat, on `t`'s device; staged like [`gather_rows`].
pub fn reduce_scatter_sum<C: Collective>(comm: &C, t: &Tensor) -> Tensor {
    let device = t.device();
    let t = staged(&t.detach().contiguous());
    let n = t.numel() as i64 / comm.world_size() as i64;
    if direct::<f32>(&t) {
        let mut out = host_buffer(&[n], Kind::Float, device);
        comm.reduce_scatter_sum_into(host_slice::<f32>(&t), host_slice_mut::<f32>(&mut out));
        out.to_device(device)
    } else if direct::<f64>(&t) {
        let mut out = host_buffer(&[n], Kind::Double, device);
        comm.reduce_scatter_sum_into(host_slice::<f64>(&t), host_slice_mut::<f64>(&mut out));
        out.to_device(device)
    } else {
        on_host(&t, &ReduceScatterSum(comm)).to_device(device)
    }
}

/// The element-wise sum over ranks of a flat tensor, on its device: in place
/// for f32 and f64 CPU tensors (MPI's own send copy aside), staged like
/// [`gather_rows`] from a GPU, through [`on_host`] otherwise.
pub fn all_reduce_sum<C: Collective>(comm: &C, t: Tensor) -> Tensor {
    let device = t.device();
    let mut t = staged(&t);
    if direct::<f32>(&t) {
        comm.all_reduce_sum(host_slice_mut::<f32>(&mut t));
        t.to_device(device)
    } else if direct::<f64>(&t) {
        comm.all_reduce_sum(host_slice_mut::<f64>(&mut t));
        t.to_device(device)
    } else {
        on_host(&t, &AllReduceSum(comm)).to_device(device)
    }
}

/// `t` in host memory for a collective: itself when on the CPU; from a GPU, a
/// copy in pinned (page-locked) memory, which the device copies into at full
/// speed and which MPI reads without another copy. (CUDA-aware MPI could take
/// device pointers; this build always stages, which works with any MPI.)
pub fn staged(t: &Tensor) -> Tensor {
    if t.device() == Device::Cpu {
        return t.shallow_clone();
    }
    let host = host_buffer(&t.size(), t.kind(), t.device());
    tch::no_grad(|| host.shallow_clone().copy_(t));
    host
}

/// An uninitialised contiguous host tensor; pinned when its data comes from or
/// goes to the GPU `device`.
pub(crate) fn host_buffer(size: &[i64], kind: Kind, device: Device) -> Tensor {
    let t = Tensor::empty(size, (kind, Device::Cpu));
    if device == Device::Cpu {
        t
    } else {
        t.pin_memory(device)
    }
}

/// The element-wise sum over ranks.
struct AllReduceSum<'a, C>(&'a C);

impl<C: Collective> HostOp for AllReduceSum<'_, C> {
    fn run<T: Element + tch::kind::Element>(&self, mut v: Vec<T>) -> Vec<T> {
        self.0.all_reduce_sum(&mut v);
        v
    }
}

/// Whether `t`'s memory can be handed to a collective as a `[T]`: a contiguous
/// CPU tensor of `T`'s kind.
pub(crate) fn direct<T: tch::kind::Element>(t: &Tensor) -> bool {
    t.device() == Device::Cpu && t.kind() == T::KIND && t.is_contiguous()
}

/// The elements of a tensor that passes [`direct`], borrowed.
#[allow(unsafe_code)]
pub(crate) fn host_slice<T: tch::kind::Element>(t: &Tensor) -> &[T] {
    assert!(direct::<T>(t), "host_slice: not a contiguous CPU tensor of the element type");
    let n = t.numel();
    if n == 0 {
        return &[];
    }
    // SAFETY: `t` is a contiguous CPU tensor of n elements of type T (asserted), so its
    // data pointer addresses n initialised, aligned T. The borrow of `t` keeps the
    // tensor, and so its storage, alive as long as the slice; nothing here resizes it.
    unsafe { std::slice::from_raw_parts(t.data_ptr() as *const T, n) }
}

/// The elements of a tensor that passes [`direct`], mutably. Only for tensors
/// this module created or owns alone (no other handle writes their storage).
#[allow(unsafe_code)]
pub(crate) fn host_slice_mut<T: tch::kind::Element>(t: &mut Tensor) -> &mut [T] {
    assert!(direct::<T>(t), "host_slice_mut: not a contiguous CPU tensor of the element type");
    let n = t.numel();
    if n == 0 {
        return &mut [];
    }
    // SAFETY: as in `host_slice`; the exclusive borrow of `t` and the callers' use
    // (fresh outputs, or the engine's own flat gradient bucket) leave no other
    // reference to the storage while the slice lives.
    unsafe { std::slice::from_raw_parts_mut(t.data_ptr() as *mut T, n) }
}
