//! The gradient all-reduce overlapped with backward: sums start while backward
//! still runs, in the same order on every rank, and give the plain sums (the
//! parity module checks the values on whole models).

use contrast_comm::{Collective, Element, Pending, Threads};
use contrast_nn::loss::ntxent_share;
use contrast_nn::GlobalBatch;
use std::cell::RefCell;
use tch::{nn, nn::Module, Device, Kind, Tensor};

/// A collective that records, at each started sum, how many elements it has
/// and whether the first layer's weight already had its gradient.
struct Spy {
    inner: Threads,
    first: Tensor,
    starts: RefCell<Vec<(usize, bool)>>,
}

impl Collective for Spy {
    fn rank(&self) -> usize {
        self.inner.rank()
    }
    fn world_size(&self) -> usize {
        self.inner.world_size()
    }
    fn local_rank(&self) -> usize {
        self.inner.local_rank()
    }
    fn local_size(&self) -> usize {
        self.inner.local_size()
    }
    fn all_gather<T: Element>(&self, send: &[T]) -> Vec<T> {
        self.inner.all_gather(send)
    }
    fn reduce_scatter_sum<T: Element>(&self, send: &[T]) -> Vec<T> {
        self.inner.reduce_scatter_sum(send)
    }
    fn all_reduce_sum<T: Element>(&self, buf: &mut [T]) {
        self.inner.all_reduce_sum(buf)
    }
    #[allow(unsafe_code)]
    unsafe fn all_reduce_sum_start<'b, T: Element>(&self, send: &'b [T], recv: &'b mut [T]) -> Box<dyn Pending + 'b> {
        self.starts.borrow_mut().push((send.len(), self.first.grad().defined()));
        // SAFETY: the caller's contract passes through unchanged.
        unsafe { self.inner.all_reduce_sum_start(send, recv) }
    }
    fn all_reduce_max<T: Element>(&self, buf: &mut [T]) {
        self.inner.all_reduce_max(buf)
    }
    fn all_to_all<T: Element>(&self, send: &[T]) -> Vec<T> {
        self.inner.all_to_all(send)
    }
    fn broadcast<T: Element>(&self, buf: &mut [T], root: usize) {
        self.inner.broadcast(buf, root)
    }
    fn barrier(&self) {
        self.inner.barrier()
    }
    fn split(&self, color: usize) -> Self {
        Spy { inner: self.inner.split(color), first: self.first.shallow_clone(), starts: RefCell::new(Vec::new()) }
    }
}

type RankOut = (Vec<(usize, bool)>, Vec<Vec<f64>>, Vec<usize>);

/// One step of a 3-layer MLP under NT-Xent on 2 ranks; each rank's started sums
/// and its gradients.
fn step(overlap: bool, bucket: usize) -> Vec<(Vec<(usize, bool)>, Vec<Vec<f64>>)> {
    steps(overlap, bucket, false, 1).into_iter().map(|(s, g, _)| (s, g)).collect()
}

/// `count` steps (gradients zeroed in place between them), with kept gradient
/// buffers or not: each rank's started sums, last gradients and the addresses
/// of the gradients at the last step.
fn steps(overlap: bool, bucket: usize, kept: bool, count: usize) -> Vec<RankOut> {
    Threads::run(2, |c| {
        let mut vs = nn::VarStore::new(Device::Cpu);
        let root = vs.root();
        let mlp = nn::seq()
            .add(nn::linear(&root / "l0", 6, 16, Default::default()))
            .add_fn(|x| x.relu())
            .add(nn::linear(&root / "l1", 16, 16, Default::default()))
            .add_fn(|x| x.relu())
            .add(nn::linear(&root / "l2", 16, 4, Default::default()));
        vs.double();
        // The same weights on both ranks without the (process-global) generator.
        let params: Vec<Tensor> = ["l0.weight", "l0.bias", "l1.weight", "l1.bias", "l2.weight", "l2.bias"]
            .iter()
            .map(|n| vs.variables()[*n].shallow_clone())
            .collect();
        tch::no_grad(|| {
            for (k, p) in params.iter().enumerate() {
                let n = p.numel() as i64;
                let w = (Tensor::arange(n, (Kind::Double, Device::Cpu)) * (0.7 + k as f64)).sin() * 0.4;
                p.shallow_clone().copy_(&w.view(p.size().as_slice()));
            }
        });
        let spy = Spy { first: params[0].shallow_clone(), inner: c, starts: RefCell::new(Vec::new()) };
        let view = |v: f64| {
            (Tensor::arange(6, (Kind::Double, Device::Cpu)) * (1.3 + v + spy.rank() as f64)).cos().view([1, 6])
        };
        let forward = || vec![mlp.forward(&view(0.0)), mlp.forward(&view(0.5))];
        let z = forward();
        let buffers = contrast_nn::engine::GradBuffers::default();
        let addresses = || params.iter().map(|p| p.grad().data_ptr() as usize).collect::<Vec<_>>();
        let mut first = Vec::new();
        for k in 0..count {
            let mut engine = GlobalBatch::new(&spy, 1).overlap(overlap).bucket_elements(bucket);
            if kept {
                engine = engine.buffers(&buffers);
            }
            for p in &params {
                p.shallow_clone().zero_grad();
            }
            let z = if k == 0 { z.iter().map(Tensor::shallow_clone).collect() } else { forward() };
            engine.step(&z, &params, |g, ctx| Ok(ntxent_share(&g[0], &g[1], 0.5, ctx.shard)?)).unwrap();
            if k == 0 {
                first = addresses();
            }
        }
        let grads = params.iter().map(|p| contrast_nn::to_host::<f64>(&p.grad())).collect();
        let at = addresses();
        if kept {
            assert_eq!(at, first, "kept gradient buffers moved between steps");
        }
        (spy.starts.into_inner(), grads, at)
    })
}

#[test]
fn bucket_sums_start_during_backward_in_reverse_layer_order() {
    // Buckets of at most 300 elements, filled in reverse parameter order.
    let ranks = step(true, 300);
    let plain = step(false, 300);
    for (r, ((starts, grads), (plain_starts, plain_grads))) in ranks.iter().zip(&plain).enumerate() {
        // [l2.bias 4, l2.weight 64, l1.bias 16], [l1.weight 256, l0.bias 16], [l0.weight 96]:
        // the last layer's sum starts first, before backward has reached the first layer.
        let sizes: Vec<usize> = starts.iter().map(|s| s.0).collect();
        assert_eq!(sizes, [84, 272, 96], "rank {r}: buckets started");
        assert!(!starts[0].1, "rank {r}: the first bucket started after backward reached layer 0");
        assert!(plain_starts.is_empty(), "rank {r}: without overlap nothing starts during backward");
        assert_eq!(grads, plain_grads, "rank {r}: overlapped and plain sums differ");
    }
    assert_eq!(ranks[0].1, ranks[1].1, "the ranks' summed gradients differ");
}

#[test]
fn kept_buffers_hold_the_gradients_in_place_and_give_the_same_sums() {
    let plain = steps(true, 300, false, 3);
    let kept = steps(true, 300, true, 3);
    for (r, ((_, want, _), (_, got, at))) in plain.iter().zip(&kept).enumerate() {
        assert_eq!(got, want, "rank {r}: gradients through kept buffers differ");
        // Reverse order within a bucket: l2.bias (4 doubles) then l2.weight, then l1.bias.
        assert_eq!(at[4], at[5] + 4 * 8, "rank {r}: l2.weight's gradient does not follow l2.bias's");
        assert_eq!(at[3], at[4] + 64 * 8, "rank {r}: l1.bias's gradient does not follow l2.weight's");
    }
}
