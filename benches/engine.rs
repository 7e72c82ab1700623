//! What exactness costs: one SimCLR step (encoder forward + backward, NT-Xent on
//! the global batch) through the global-batch engine, against the same step
//! with the loss back-propagated directly (no gather, no reduce-scatter),
//! measured in the same run on one process.
//!
//!     source launch/env.sh && cargo bench -p contrast-benches --bench engine
//!
//! Prints milliseconds per step and the ratio engine / direct (1.00 = free).

use contrast_comm::Solo;
use contrast_config::{LossKind, ModelConfig, Norm};
use contrast_nn::loss::{ntxent_share, Shard};
use contrast_nn::method::{build, Batch, Spec};
use contrast_nn::GlobalBatch;
use tch::{Device, Kind, Tensor};

fn main() {
    let threads = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    tch::set_num_threads(threads as i32);
    tch::manual_seed(0);
    println!("engine overhead, SimCLR conv encoder (width 32, embed 1024, proj 64), 28×28 inputs, {threads} threads");
    println!("{:>6} {:>12} {:>12} {:>8}", "batch", "direct ms", "engine ms", "ratio");
    for n in [64i64, 128, 256] {
        let mut spec = Spec::new(contrast_nn::method::plan("simclr").unwrap(), LossKind::NtXent, n as usize);
        spec.model = ModelConfig { proj_dim: 64, proj_hidden: 512, ..Default::default() };
        spec.model.encoder_keys.set("width", 32);
        spec.model.encoder_keys.set("embed_dim", 1024);
        spec.model.encoder_keys.set("norm", Norm::Group);
        let method = build(&spec).unwrap();
        let params: Vec<Tensor> = method.params().into_iter().map(|p| p.tensor).collect();
        let views = [
            Tensor::randn([n, 1, 28, 28], (Kind::Float, Device::Cpu)),
            Tensor::randn([n, 1, 28, 28], (Kind::Float, Device::Cpu)),
        ];
        let batch = Batch { step: 0, views: &views, captions: None, labels: None, mix: None, indices: &[] };
        let zero = |ps: &[Tensor]| {
            for p in ps {
                p.shallow_clone().zero_grad();
            }
        };
        let direct = contrast_benches::median_secs(2, 7, || {
            zero(&params);
            let t = method.forward(&batch, &Solo).unwrap().grad;
            ntxent_share(&t[0], &t[1], 0.2, Shard::solo(n as usize)).unwrap().backward();
        });
        let engine = GlobalBatch::new(&Solo, n as usize);
        let exact = contrast_benches::median_secs(2, 7, || {
            zero(&params);
            let t = method.forward(&batch, &Solo).unwrap().grad;
            engine.step(&t, &params, |g, ctx| ntxent_share(&g[0], &g[1], 0.2, ctx.shard)).unwrap();
        });
        println!("{n:>6} {:>12.2} {:>12.2} {:>8.3}", direct * 1e3, exact * 1e3, exact / direct);
    }
}
