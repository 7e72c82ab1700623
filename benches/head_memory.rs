//! Loss-head peak memory of one rank as the global batch grows at a fixed
//! local batch: the other ranks' embeddings are simulated in one process (the
//! gathered `[N, d]` towers), rank 0's share and its backward are computed.
//!
//!     source launch/env.sh && cargo bench -p contrast-benches --bench head_memory
//!     (CONTRAST_BENCH_SIZES=1024,4096 to choose the global batches; default 1k … 64k)
//!
//! Each (loss, N) runs in a child process; its head peak is the peak resident
//! set (VmHWM) less the resident set before the head ran (inputs included in
//! neither). Streaming heads hold O(R·N + N·d); the dense forms O(B·N).

use contrast_nn::loss::*;
use tch::{Device, Kind, Tensor};

const LOCAL: i64 = 256;
const D: i64 = 128;

fn status_kib(key: &str) -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    s.lines().find(|l| l.starts_with(key)).and_then(|l| l.split_whitespace().nth(1)?.parse().ok()).unwrap_or(0)
}

/// Run one head in this process and print its peak in bytes.
fn child(name: &str, n: i64) {
    tch::set_num_threads(1);
    tch::manual_seed(0);
    let shard = Shard { rank: 0, world_size: (n / LOCAL) as usize, local_batch: LOCAL as usize };
    let a = Tensor::randn([n, D], (Kind::Float, Device::Cpu)).set_requires_grad(true);
    let b = Tensor::randn([n, D], (Kind::Float, Device::Cpu)).set_requires_grad(true);
    let scale = Tensor::from(10f32.ln()).set_requires_grad(true);
    let bias = Tensor::from(-10f32).set_requires_grad(true);
    let _ = (&a * 1.0).sum(Kind::Float).double_value(&[]); // touch the inputs
    let before = status_kib("VmRSS:");
    let loss = match name {
        "ntxent" => ntxent_share(&a, &b, 0.2, shard),
        "ntxent_dense" => ntxent_dense_share(&a, &b, 0.2, shard),
        "clip" => clip_share(&a, &b, &scale, shard),
        "clip_dense" => clip_dense_share(&a, &b, &scale, shard),
        "siglip" => siglip_share(&a, &b, &scale, &bias, shard),
        "dclw" => dcl_share(&a, &b, 0.1, Some(0.5), shard),
        "dclw_dense" => dcl_dense_share(&a, &b, 0.1, Some(0.5), shard),
        "hard_negative" => debiased_share(&a, &b, 0.5, 0.1, 1.0, shard),
        "hard_negative_dense" => debiased_dense_share(&a, &b, 0.5, 0.1, 1.0, shard),
        _ => siglip_dense_share(&a, &b, &scale, &bias, shard),
    }
    .unwrap();
    loss.backward();
    let peak = status_kib("VmHWM:");
    println!("{}", peak.saturating_sub(before) * 1024);
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if let Some(i) = args.iter().position(|a| a == "--child") {
        child(&args[i + 1], args[i + 2].parse().unwrap());
        return;
    }
    let sizes: Vec<i64> = std::env::var("CONTRAST_BENCH_SIZES")
        .ok()
        .map(|s| s.split(',').filter_map(|x| x.trim().parse().ok()).collect())
        .unwrap_or_else(|| vec![1024, 4096, 16384, 65536]);
    let exe = std::env::current_exe().unwrap();
    println!("loss-head peak memory of rank 0, local batch {LOCAL}, d={D}, f32 (MiB; per 1k of global batch)");
    println!("{:>14} {:>7} {:>10} {:>12}", "loss", "N", "peak MiB", "MiB per 1k");
    for name in [
        "ntxent",
        "ntxent_dense",
        "clip",
        "clip_dense",
        "siglip",
        "siglip_dense",
        "dclw",
        "dclw_dense",
        "hard_negative",
        "hard_negative_dense",
    ] {
        for &n in &sizes {
            let out = std::process::Command::new(&exe).args(["--child", name, &n.to_string()]).output().unwrap();
            let text = String::from_utf8_lossy(&out.stdout);
            match text.trim().parse::<f64>() {
                Ok(bytes) => {
                    let mib = bytes / (1 << 20) as f64;
                    println!("{name:>14} {n:>7} {mib:>10.1} {:>12.2}", mib / (n as f64 / 1024.0));
                }
                Err(_) => println!("{name:>14} {n:>7} {:>10} {:>12}", "failed", String::from_utf8_lossy(&out.stderr)),
            }
        }
    }
}
