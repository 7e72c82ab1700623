//! The gradient all-reduce overlapped with backward (docs/design.md, "Overlap").
//!
//! The parameters are cut into buckets of at most
//! [`crate::GlobalBatch::bucket_elements`] (one parameter may fill one alone) in
//! reverse order, since backward produces the last layers' gradients first (as
//! DDP does). A post-accumulate hook on each parameter (`src/grad_hooks.cpp`)
//! counts its bucket down. Buckets start in their fixed order: bucket k once it
//! and every bucket before it are complete, so every rank starts the same sums
//! in the same order whatever order its hooks fire in. A bucket's gradients are
//! copied once into its send buffer (on a GPU: packed into one device buffer,
//! then one copy to pinned host memory), the backend sums into its receive
//! buffer while backward goes on, and [`Overlap::copy_back`] copies the sums
//! back (one copy to the GPU per bucket). Buckets that backward leaves
//! incomplete (parameters it never reaches) start after it, in the same order.

use crate::engine::define_grads;
use crate::wire::{direct, host_buffer, host_slice, host_slice_mut};
use contrast_comm::{Collective, Pending};
use std::ffi::c_void;
use tch::{Device, Kind, Tensor};

extern "C" {
    fn contrast_set_grad(param: *mut c_void, grad: *mut c_void) -> i32;
    fn contrast_set_ready_hook(
        tensor: *mut c_void,
        f: Option<extern "C" fn(*mut c_void, i64)>,
        ctx: *mut c_void,
        index: i64,
    ) -> i32;
}

/// One bucket: parameter indices (of one element kind) and their total size.
#[derive(Clone, PartialEq)]
struct Bucket {
    members: Vec<usize>,
    numel: i64,
}

/// The buckets of one step and their host buffers.
pub(crate) struct Overlap<'p, C: Collective> {
    comm: &'p C,
    params: &'p [Tensor],
    buckets: Vec<Bucket>,
    send: Vec<Tensor>,
    recv: Vec<Tensor>,
    /// The gradients are views of `send` ([`GradBuffers`]): nothing to copy in.
    views: bool,
}

/// Flat gradient buffers kept across steps: each CPU parameter's gradient is a
/// view of its bucket's send buffer (as DDP's `gradient_as_bucket_view`), so
/// backward accumulates straight into what MPI sends, and the sum comes back in
/// one copy per bucket. Give one to [`crate::GlobalBatch::buffers`] for the
/// life of a training run; it rebuilds itself when the parameters change.
#[derive(Default)]
pub struct GradBuffers {
    cached: std::cell::RefCell<Option<Cached>>,
}

struct Cached {
    key: Vec<(usize, i64)>,
    buckets: Vec<Bucket>,
    send: Vec<Tensor>,
    recv: Vec<Tensor>,
}

impl GradBuffers {
    /// The buffers for `buckets` of `params` (shallow handles), the gradients
    /// pointed into them; `None` unless every parameter is on the CPU.
    fn attach(&self, params: &[Tensor], buckets: &[Bucket]) -> Option<(Vec<Tensor>, Vec<Tensor>)> {
        let members = || buckets.iter().flat_map(|b| b.members.iter().map(|&i| &params[i]));
        if members().any(|p| p.device() != Device::Cpu) {
            return None;
        }
        let key: Vec<(usize, i64)> = params.iter().map(|p| (p.data_ptr() as usize, p.numel() as i64)).collect();
        let mut cached = self.cached.borrow_mut();
        if cached.as_ref().is_none_or(|c| c.key != key || c.buckets != buckets) {
            let zeros = |b: &Bucket| Tensor::zeros([b.numel], (params[b.members[0]].kind(), Device::Cpu));
            let (send, recv) = (buckets.iter().map(zeros).collect(), buckets.iter().map(zeros).collect());
            *cached = Some(Cached { key, buckets: buckets.to_vec(), send, recv });
        }
        let c = cached.as_ref().expect("just built");
        for (b, flat) in buckets.iter().zip(&c.send) {
            point_grads(params, &b.members, flat);
        }
        Some((c.send.iter().map(Tensor::shallow_clone).collect(), c.recv.iter().map(Tensor::shallow_clone).collect()))
    }
}

/// Make each member's gradient the view of `flat` at its offset, keeping what
/// it has accumulated so far; a no-op for gradients already there.
fn point_grads(params: &[Tensor], members: &[usize], flat: &Tensor) {
    let (base, size) = (flat.data_ptr() as usize, flat.kind().elt_size_in_bytes());
    let mut off = 0i64;
    for &i in members {
        let (p, n) = (&params[i], params[i].numel() as i64);
        let g = p.grad();
        if !(g.defined() && g.data_ptr() as usize == base + off as usize * size && g.is_contiguous()) {
            let mut view = flat.narrow(0, off, n).view(p.size().as_slice()).detach();
            tch::no_grad(|| {
                if g.defined() {
                    view.copy_(&g);
                } else {
                    let _ = view.zero_();
                }
            });
            // SAFETY: both are tch handles (`torch::Tensor*`) alive for the call; the shim
            // checks shape, dtype and device, and catches every C++ exception.
            #[allow(unsafe_code)]
            let rc = unsafe { contrast_set_grad(p.as_ptr() as *mut c_void, view.as_mut_ptr() as *mut c_void) };
            assert_eq!(rc, 0, "libtorch refused a gradient view for a parameter");
        }
        off += n;
    }
}

impl<'p, C: Collective> Overlap<'p, C> {
    /// The buckets of `params`, or `None` when a parameter that requires grad is
    /// not f32/f64 (the plain all-reduce after backward handles those).
    ///
    /// A bucket holds at most `bucket_elements`, and at most an eighth of the
    /// model (but not under 32K elements): a small model in one bucket would
    /// start its only sum when backward ends, hiding nothing.
    ///
    /// With `buffers`, the gradients of CPU parameters are views of kept send
    /// buffers (see [`GradBuffers`]).
    pub(crate) fn plan(
        comm: &'p C,
        params: &'p [Tensor],
        bucket_elements: usize,
        buffers: Option<&GradBuffers>,
    ) -> Option<Self> {
        let total: i64 = params.iter().filter(|p| p.requires_grad()).map(|p| p.numel() as i64).sum();
        let cap = (bucket_elements as i64).min((total / 8).max(1 << 15));
        let mut buckets: Vec<Bucket> = Vec::new();
        let mut kind = None;
        for (i, p) in params.iter().enumerate().rev().filter(|(_, p)| p.requires_grad()) {
            if !matches!(p.kind(), Kind::Float | Kind::Double) {
                return None;
            }
            let n = p.numel() as i64;
            match buckets.last_mut() {
                Some(b) if kind == Some(p.kind()) && b.numel + n <= cap => {
                    b.members.push(i);
                    b.numel += n;
                }
                _ => buckets.push(Bucket { members: vec![i], numel: n }),
            }
            kind = Some(p.kind());
        }
        if let Some((send, recv)) = buffers.and_then(|b| b.attach(params, &buckets)) {
            return Some(Self { comm, params, buckets, send, recv, views: true });
        }
        let staging = |b: &Bucket| {
            let first = &params[b.members[0]];
            host_buffer(&[b.numel], first.kind(), first.device())
        };
        let send = buckets.iter().map(staging).collect();
        let recv = buckets.iter().map(staging).collect();
        Some(Self { comm, params, buckets, send, recv, views: false })
    }

    /// Run `backward` with the hooks armed; the sums it started are in flight.
    pub(crate) fn during(&mut self, backward: impl FnOnce()) -> Flight<'_, C> {
        let mut bucket_of = vec![None; self.params.len()];
        for (k, b) in self.buckets.iter().enumerate() {
            for &i in &b.members {
                bucket_of[i] = Some(k);
            }
        }
        let mut flight = Flight {
            comm: self.comm,
            params: self.params,
            buckets: &self.buckets,
            remaining: self.buckets.iter().map(|b| b.members.len()).collect(),
            send: &self.send,
            views: self.views,
            recv: self.recv.iter_mut().map(Some).collect(),
            pending: Vec::new(),
            panic: None,
        };
        {
            let mut ready = |i: usize| {
                if let Some(k) = bucket_of.get(i).copied().flatten() {
                    flight.ready(k);
                }
            };
            let mut ready: &mut dyn FnMut(usize) = &mut ready;
            let hooks = Hooks::arm(self.params, &mut ready);
            backward();
            drop(hooks);
        }
        flight
    }
}

/// The sums of one backward, started or still to start.
pub(crate) struct Flight<'b, C: Collective> {
    comm: &'b C,
    params: &'b [Tensor],
    buckets: &'b [Bucket],
    remaining: Vec<usize>,
    send: &'b [Tensor],
    views: bool,
    recv: Vec<Option<&'b mut Tensor>>,
    pending: Vec<Box<dyn Pending + 'b>>,
    panic: Option<Box<dyn std::any::Any + Send>>,
}

impl<C: Collective> Flight<'_, C> {
    /// A parameter of bucket `k` has its gradient: start every complete bucket in order.
    fn ready(&mut self, k: usize) {
        if self.panic.is_some() {
            return;
        }
        let run = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            self.remaining[k] -= 1;
            while self.pending.len() < self.buckets.len() && self.remaining[self.pending.len()] == 0 {
                self.start(self.pending.len());
            }
            // Progress: MPI moves non-blocking collectives only inside MPI calls.
            // Testing the oldest incomplete sum drives them all.
            for p in self.pending.iter_mut() {
                if !p.test() {
                    break;
                }
            }
        }));
        if let Err(e) = run {
            self.panic = Some(e);
        }
    }

    /// Copy bucket `k`'s gradients into its send buffer and start its sum.
    fn start(&mut self, k: usize) {
        let send = &self.send[k];
        let members = &self.buckets[k].members;
        tch::no_grad(|| {
            if self.views {
                return; // backward accumulated into `send` itself
            }
            if self.params[members[0]].device() != tch::Device::Cpu {
                // On a GPU the bucket is packed there, then crosses to pinned memory in one copy.
                let grads: Vec<Tensor> = members.iter().map(|&i| self.params[i].grad().reshape([-1])).collect();
                send.shallow_clone().copy_(&Tensor::cat(&grads, 0));
                return;
            }
            let mut off = 0;
            for &i in members {
                let g = self.params[i].grad();
                let n = g.numel() as i64;
                send.narrow(0, off, n).copy_(&g.reshape([-1]));
                off += n;
            }
        });
        let recv = self.recv[k].take().expect("a bucket starts once");
        let pending = match send.kind() {
            Kind::Float => start::<f32, C>(self.comm, send, recv),
            _ => start::<f64, C>(self.comm, send, recv),
        };
        self.pending.push(pending);
    }

    /// After backward: give unused parameters zero gradients, start the buckets
    /// backward left, and wait for every sum ([`Overlap::copy_back`] then
    /// writes them into the gradients).
    pub(crate) fn finish(mut self) {
        if let Some(e) = self.panic.take() {
            std::panic::resume_unwind(e);
        }
        define_grads(self.params);
        while self.pending.len() < self.buckets.len() {
            self.start(self.pending.len());
        }
        for p in std::mem::take(&mut self.pending) {
            p.wait();
        }
    }
}

impl<C: Collective> Overlap<'_, C> {
    /// Copy every bucket's sum into its parameters' gradients (after [`Flight::finish`]).
    pub(crate) fn copy_back(&self) {
        tch::no_grad(|| {
            if self.views {
                // The gradients view the send buffers: one copy per bucket.
                for (send, sum) in self.send.iter().zip(&self.recv) {
                    send.shallow_clone().copy_(sum);
                }
                return;
            }
            for (b, sum) in self.buckets.iter().zip(&self.recv) {
                // To a GPU in one copy, then split there.
                let sum = sum.to_device(self.params[b.members[0]].device());
                let mut off = 0;
                for &i in &b.members {
                    let mut g = self.params[i].grad();
                    let n = g.numel() as i64;
                    g.copy_(&sum.narrow(0, off, n).view(g.size().as_slice()));
                    off += n;
                }
            }
        });
    }
}

/// Start the sum of `send` into `recv`, both f32 or both f64 host tensors.
fn start<'b, T, C>(comm: &C, send: &'b Tensor, recv: &'b mut Tensor) -> Box<dyn Pending + 'b>
where
    T: contrast_comm::Element + tch::kind::Element,
    C: Collective,
{
    assert!(direct::<T>(send) && direct::<T>(recv), "overlap: staging buffers are contiguous host tensors");
    // SAFETY: the pending sum is pushed into `Flight::pending`, which `finish` waits
    // for, or which drops (and so waits) with the flight; it is never leaked.
    #[allow(unsafe_code)]
    unsafe {
        comm.all_reduce_sum_start(host_slice::<T>(send), host_slice_mut::<T>(recv))
    }
}

/// Post-accumulate hooks on every parameter that requires grad, calling the
/// closure behind `ctx` with the parameter's index; cleared when dropped.
struct Hooks<'a> {
    params: &'a [Tensor],
}

impl<'a> Hooks<'a> {
    fn arm(params: &'a [Tensor], ready: &mut &mut dyn FnMut(usize)) -> Self {
        let ctx = ready as *mut &mut dyn FnMut(usize) as *mut c_void;
        for (i, p) in params.iter().enumerate().filter(|(_, p)| p.requires_grad()) {
            set_hook(p, Some(on_ready), ctx, i as i64);
        }
        Self { params }
    }
}

impl Drop for Hooks<'_> {
    fn drop(&mut self) {
        for p in self.params.iter().filter(|p| p.requires_grad()) {
            set_hook(p, None, std::ptr::null_mut(), 0);
        }
    }
}

/// Set or clear one leaf's hook.
fn set_hook(p: &Tensor, f: Option<extern "C" fn(*mut c_void, i64)>, ctx: *mut c_void, index: i64) {
    // SAFETY: `p.as_ptr()` is tch's handle, a `torch::Tensor*` that lives as long as
    // `p`; the shim only reads it and catches every C++ exception. `ctx` outlives
    // the hook: `Hooks` clears every hook when dropped, before its closure goes.
    #[allow(unsafe_code)]
    let rc = unsafe { contrast_set_ready_hook(p.as_ptr() as *mut c_void, f, ctx, index) };
    assert_eq!(rc, 0, "libtorch refused a gradient hook on a parameter (not a leaf that requires grad)");
}

/// The hook's entry: `ctx` is the `&mut dyn FnMut(usize)` given to [`Hooks::arm`].
extern "C" fn on_ready(ctx: *mut c_void, index: i64) {
    // SAFETY: `ctx` points at the closure reference `Hooks::arm` received, alive while
    // the hooks are armed; libtorch calls hooks one at a time from the backward
    // that runs inside `Overlap::during`, so nothing else borrows it meanwhile.
    #[allow(unsafe_code)]
    let ready = unsafe { &mut *(ctx as *mut &mut dyn FnMut(usize)) };
    // `Flight::ready` catches its own panics, so none unwinds into C++.
    ready(index as usize);
}
