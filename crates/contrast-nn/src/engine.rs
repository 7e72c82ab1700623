//! The global-batch engine (docs/design.md invariant 1).
//!
//! ```text
//! z_r [B,d] (graph kept) ─ all_gather(detach) ─► Z [P·B,d] (leaf)
//! loss head on Z ─► L_r ; backward ─► G_r = ∂L_r/∂Z (and head-parameter grads)
//! reduce_scatter_sum(G) ─► g_r = ∂L/∂z_r ; backward of Σ (z_r · g_r) through the encoder
//! all_reduce_sum of every parameter gradient (bucketed) ─► exact ∂L/∂θ on every rank
//! ```
//!
//! No custom autograd function is needed: communication sits between the small
//! loss-head graph and the encoder graph. The gradient all-reduce overlaps the
//! encoder's backward ([`crate::overlap`]) unless [`GlobalBatch::overlap`] turns
//! it off.

use crate::loss::{Ctx, Shard};
pub use crate::overlap::GradBuffers;
use crate::overlap::Overlap;
use crate::{NnError, Result};
use contrast_comm::Collective;
use tch::{Kind, Tensor};

/// Elements per all-reduce bucket of parameter gradients.
pub const BUCKET_ELEMENTS: usize = 1 << 22;

/// The engine bound to one communicator.
pub struct GlobalBatch<'c, C: Collective> {
    comm: &'c C,
    local_batch: usize,
    overlap: bool,
    bucket_elements: usize,
    buffers: Option<&'c GradBuffers>,
}

/// What one step produced.
#[derive(Debug, Clone)]
pub struct StepOutput {
    /// The global loss L = Σ_r L_r (identical on every rank).
    pub loss: f64,
    /// This rank's share L_r.
    pub share: f64,
    /// The control vector summed over ranks (identical on every rank).
    pub control: Vec<f64>,
    /// Seconds spent in each phase of the step on this rank.
    pub phases: Phases,
}

/// Seconds of each phase of [`GlobalBatch::step_towers`] on this rank.
#[derive(Debug, Clone, Copy, Default)]
pub struct Phases {
    /// The gradient cache's first, graph-free forward pass (0 without it: the
    /// method's forward runs before the engine).
    pub forward: f64,
    /// All-gather of the towers.
    pub gather: f64,
    /// The method's loss share and its backward to the gathered embeddings.
    pub loss: f64,
    /// Reduce-scatter of the embedding gradients to their owners.
    pub reduce_scatter: f64,
    /// Backward through the encoder from the local embeddings (with the
    /// gradient buckets' sums started during it).
    pub backward: f64,
    /// All-reduce of the parameter gradients (what backward did not hide: the
    /// wait for the sums in flight and the buckets started after it), the loss
    /// and the control vector.
    pub all_reduce: f64,
}

/// What a method's forward pass hands the engine.
#[derive(Default)]
pub struct Towers {
    /// Local `[B, d]` outputs that are gathered and back-propagated (embeddings, backbone features).
    pub grad: Vec<Tensor>,
    /// Local `[B, d]` outputs gathered without gradient (BYOL's target features).
    pub aux: Vec<Tensor>,
    /// Outputs that stay on this rank, without gradient (MoCo's keys).
    pub local: Vec<Tensor>,
}

/// The towers after the gather, as the loss head sees them.
pub struct Gathered<'a> {
    /// Gathered `[N, d]` leaves that require grad, one per [`Towers::grad`].
    pub towers: &'a [Tensor],
    /// Gathered `[N, d]` without gradient, one per [`Towers::aux`].
    pub aux: &'a [Tensor],
    /// [`Towers::local`] as they are.
    pub local: &'a [Tensor],
}

impl<'c, C: Collective> GlobalBatch<'c, C> {
    /// An engine for local batches of `local_batch` rows.
    pub fn new(comm: &'c C, local_batch: usize) -> Self {
        Self { comm, local_batch, overlap: true, bucket_elements: BUCKET_ELEMENTS, buffers: None }
    }

    /// Keep the gradient buckets in `buffers` across steps, the gradients
    /// viewing them (used with the overlap; see [`GradBuffers`]).
    pub fn buffers(mut self, buffers: &'c GradBuffers) -> Self {
        self.buffers = Some(buffers);
        self
    }

    /// Elements per gradient bucket (default [`BUCKET_ELEMENTS`]): smaller
    /// buckets start sooner in backward and cost more calls.
    pub fn bucket_elements(mut self, n: usize) -> Self {
        self.bucket_elements = n.max(1);
        self
    }

    /// Whether the gradient all-reduce overlaps the encoder's backward (default
    /// true); off, it runs after backward. The sums are the same either way.
    pub fn overlap(mut self, on: bool) -> Self {
        self.overlap = on;
        self
    }

    /// The rows this rank owns.
    pub fn shard(&self) -> Shard {
        Shard { rank: self.comm.rank(), world_size: self.comm.world_size(), local_batch: self.local_batch }
    }

    /// Gather each tower's local embeddings `[B, d]` into a leaf `[P·B, d]` that requires grad.
    pub fn gather(&self, local: &Tensor) -> Result<Tensor> {
        Ok(self.gather_data(local)?.set_requires_grad(true))
    }

    /// Gather local `[B, d]` rows into `[P·B, d]` (no gradient).
    pub fn gather_data(&self, local: &Tensor) -> Result<Tensor> {
        let size = local.size();
        if size.len() != 2 || size[0] as usize != self.local_batch {
            return Err(NnError::Shape(format!("local embeddings must be [B={}, d], got {size:?}", self.local_batch)));
        }
        Ok(crate::wire::gather_rows(self.comm, local))
    }

    /// `∂L/∂z_r`: the reduce-scatter sum of every rank's `∂L_r/∂Z`.
    fn scatter_grad(&self, gathered: &Tensor, like: &Tensor) -> Tensor {
        let g = gathered.grad();
        let g = if g.defined() { g } else { gathered.zeros_like() };
        let out = crate::wire::reduce_scatter_sum(self.comm, &g.to_kind(like.kind()));
        out.view(like.size().as_slice())
    }

    /// One exact step: gather the towers, run `head` (returning L_r) on the
    /// gathered batch, back-propagate through the encoders, and all-reduce the
    /// gradients of `params` (encoder and head parameters alike).
    ///
    /// Gradients accumulate into `params`; zero them before calling.
    pub fn step<F>(&self, towers: &[Tensor], params: &[Tensor], head: F) -> Result<StepOutput>
    where
        F: FnOnce(&[Tensor], &Ctx) -> Result<Tensor>,
    {
        let towers = Towers { grad: towers.iter().map(Tensor::shallow_clone).collect(), ..Default::default() };
        self.step_towers(&towers, params, &[], |g, ctx| head(g.towers, ctx))
    }

    /// [`GlobalBatch::step`] for a method's towers (gradient, gathered auxiliary
    /// and local outputs). `control` rides on the step's closing all-reduce of
    /// the loss: its sum over ranks comes back in [`StepOutput::control`], so
    /// every rank decides the same thing (stop, skip, warn) at the same step.
    pub fn step_towers<F>(&self, towers: &Towers, params: &[Tensor], control: &[f64], head: F) -> Result<StepOutput>
    where
        F: FnOnce(&Gathered, &Ctx) -> Result<Tensor>,
    {
        let mut clock = Lap::new();
        let (share, grads, mut phases) = self.head_and_scatter(towers, head, &mut clock)?;
        let reduced = self.backward_reducing(params, || backward_surrogate(&towers.grad, &grads));
        phases.backward = clock.lap() - reduced.unwrap_or(0.0);
        self.close(params, control, share, phases, &mut clock, reduced)
    }

    /// The gradient cache (`train.micro_batch`): the same step as
    /// [`GlobalBatch::step_towers`] in memory bounded by one chunk's graph.
    ///
    /// `forward(start, len)` runs the method on local rows `[start, start+len)`.
    /// Pass 1 runs it chunk by chunk without a graph and concatenates the towers;
    /// the head and the exchange run on them as usual, giving `∂L/∂z_r`; pass 2
    /// runs each chunk again with a graph and back-propagates its rows of
    /// `∂L/∂z_r`. Exact when the forward is a function of each row alone (no
    /// batch statistics, no random draw that differs between the two passes).
    pub fn step_chunked<M, F>(
        &self,
        chunk: usize,
        params: &[Tensor],
        control: &[f64],
        forward: M,
        head: F,
    ) -> Result<StepOutput>
    where
        M: Fn(i64, i64) -> Result<Towers>,
        F: FnOnce(&Gathered, &Ctx) -> Result<Tensor>,
    {
        let (b, chunk) = (self.local_batch as i64, chunk.max(1) as i64);
        let ranges: Vec<(i64, i64)> = (0..b).step_by(chunk as usize).map(|s| (s, chunk.min(b - s))).collect();
        let mut clock = Lap::new();
        let parts = tch::no_grad(|| ranges.iter().map(|&(s, n)| forward(s, n)).collect::<Result<Vec<_>>>())?;
        let cat = |pick: fn(&Towers) -> &Vec<Tensor>| -> Vec<Tensor> {
            let k = pick(&parts[0]).len();
            (0..k).map(|i| Tensor::cat(&parts.iter().map(|p| &pick(p)[i]).collect::<Vec<_>>(), 0)).collect()
        };
        let towers = Towers { grad: cat(|t| &t.grad), aux: cat(|t| &t.aux), local: cat(|t| &t.local) };
        drop(parts);
        let forward_s = clock.lap();
        let (share, grads, mut phases) = self.head_and_scatter(&towers, head, &mut clock)?;
        let mut reduced = None;
        for (j, &(s, n)) in ranges.iter().enumerate() {
            let part = forward(s, n)?;
            let rows: Vec<Tensor> = grads.iter().map(|g| g.narrow(0, s, n)).collect();
            if j + 1 < ranges.len() {
                backward_surrogate(&part.grad, &rows);
            } else {
                // Only the last chunk's backward completes the gradients: the sums start there.
                reduced = self.backward_reducing(params, || backward_surrogate(&part.grad, &rows));
            }
        }
        // The recompute with its graph and the backward through it.
        phases.backward = clock.lap() - reduced.unwrap_or(0.0);
        phases.forward = forward_s;
        self.close(params, control, share, phases, &mut clock, reduced)
    }

    /// Run `backward` (the last backward of the step) with the gradient
    /// all-reduce overlapped, when on and possible. `Some(seconds)` when the
    /// gradients are summed, the seconds spent after `backward` waiting for the sums.
    fn backward_reducing(&self, params: &[Tensor], backward: impl FnOnce()) -> Option<f64> {
        let plan = if self.overlap && self.comm.world_size() > 1 {
            Overlap::plan(self.comm, params, self.bucket_elements, self.buffers)
        } else {
            None
        };
        let Some(mut overlap) = plan else {
            backward();
            return None;
        };
        let flight = overlap.during(backward);
        let t = std::time::Instant::now();
        flight.finish();
        overlap.copy_back();
        Some(t.elapsed().as_secs_f64())
    }

    /// Gather the towers, run the head and its backward, and reduce-scatter the
    /// embedding gradients to their owners: `(L_r, ∂L/∂z_r per tower, phases)`.
    fn head_and_scatter<F>(&self, towers: &Towers, head: F, clock: &mut Lap) -> Result<(f64, Vec<Tensor>, Phases)>
    where
        F: FnOnce(&Gathered, &Ctx) -> Result<Tensor>,
    {
        let mut phases = Phases::default();
        let gathered = towers.grad.iter().map(|z| self.gather(z)).collect::<Result<Vec<_>>>()?;
        let aux = towers.aux.iter().map(|z| self.gather_data(z)).collect::<Result<Vec<_>>>()?;
        phases.gather = clock.lap();
        let ctx = Ctx { shard: self.shard(), reduce: self.comm };
        let share_t = head(&Gathered { towers: &gathered, aux: &aux, local: &towers.local }, &ctx)?;
        let share = share_t.double_value(&[]);
        share_t.backward();
        phases.loss = clock.lap();
        let grads = towers.grad.iter().zip(&gathered).map(|(z, zg)| self.scatter_grad(zg, z)).collect();
        phases.reduce_scatter = clock.lap();
        Ok((share, grads, phases))
    }

    /// All-reduce the parameter gradients (unless `reduced` says the overlap
    /// did, in how many seconds after backward), the loss and the control vector.
    fn close(
        &self,
        params: &[Tensor],
        control: &[f64],
        share: f64,
        mut phases: Phases,
        clock: &mut Lap,
        reduced: Option<f64>,
    ) -> Result<StepOutput> {
        // A parameter no rank used gets a zero gradient on every layout (P = 1 too), so
        // decay and momentum treat it alike whatever the world size.
        define_grads(params);
        if reduced.is_none() {
            self.all_reduce_grads(params);
        }
        let mut l = Vec::with_capacity(1 + control.len());
        l.push(share);
        l.extend_from_slice(control);
        self.comm.all_reduce_sum(&mut l);
        phases.all_reduce = clock.lap() + reduced.unwrap_or(0.0);
        Ok(StepOutput { loss: l[0], share, control: l[1..].to_vec(), phases })
    }

    /// Sum every parameter's gradient over ranks, in buckets of at most
    /// [`GlobalBatch::bucket_elements`]. Undefined gradients count as zero.
    pub fn all_reduce_grads(&self, params: &[Tensor]) {
        if self.comm.world_size() == 1 {
            return;
        }
        define_grads(params);
        let grads: Vec<Tensor> = params.iter().map(Tensor::grad).collect();
        let mut start = 0;
        while start < grads.len() {
            let mut end = start;
            let mut count = 0;
            while end < grads.len() && (end == start || count + grads[end].numel() <= self.bucket_elements) {
                count += grads[end].numel();
                end += 1;
            }
            let bucket = &grads[start..end];
            // The bucket's one flat copy is reduced in place (f32/f64 on the CPU), then copied back.
            let flat = Tensor::cat(&bucket.iter().map(|g| g.view([-1])).collect::<Vec<_>>(), 0);
            let reduced = crate::wire::all_reduce_sum(self.comm, flat);
            let mut off = 0i64;
            tch::no_grad(|| {
                for g in bucket {
                    let n = g.numel() as i64;
                    let mut g = g.shallow_clone();
                    g.copy_(&reduced.narrow(0, off, n).view(g.size().as_slice()).to_kind(g.kind()));
                    off += n;
                }
            });
            start = end;
        }
    }
}

/// Seconds since the last lap.
struct Lap(std::time::Instant);

impl Lap {
    fn new() -> Self {
        Self(std::time::Instant::now())
    }
    fn lap(&mut self) -> f64 {
        std::mem::replace(&mut self.0, std::time::Instant::now()).elapsed().as_secs_f64()
    }
}

/// Back-propagate `Σ_k z_k · g_k` through the encoders (`g` detached; no-op
/// when nothing requires grad).
fn backward_surrogate(z: &[Tensor], g: &[Tensor]) {
    let mut surrogate: Option<Tensor> = None;
    for (z, g) in z.iter().zip(g) {
        let term = (z * g).sum(z.kind());
        surrogate = Some(match surrogate {
            None => term,
            Some(s) => s + term,
        });
    }
    if let Some(s) = surrogate {
        if s.requires_grad() {
            s.backward();
        }
    }
}

/// Give every parameter that has no gradient yet a zero gradient, so that all
/// ranks send buffers of the same layout (a parameter unused on one rank must
/// still join the sum).
pub fn define_grads(params: &[Tensor]) {
    let missing: Vec<&Tensor> = params.iter().filter(|p| p.requires_grad() && !p.grad().defined()).collect();
    if missing.is_empty() {
        return;
    }
    let zero = missing.iter().map(|p| (*p * 0.0).sum(Kind::Double)).reduce(|a, b| a + b).unwrap();
    zero.backward();
}
