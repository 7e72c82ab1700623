//! The collectives of this build under `mpirun -n P`: the engine's embedding
//! gather (`wire::gather_rows`, tensor → host → MPI → tensor) against a raw
//! `MPI_Allgather` of the same bytes, and an α–β (latency–bandwidth) fit of
//! all-gather and all-reduce over message sizes, for `benches/scale_model.py`.
//!
//!     cargo build --release -p contrast-benches --bins
//!     launch/mpirun.sh -n 2 target/release/collectives [--json FILE]
//!
//! Rank 0 prints microseconds per call (median of 21 after 3 warm-ups) and the
//! fit t(bytes) = α + β·bytes per collective (least squares over the sizes);
//! `--json` writes the fit and the table.

use contrast_comm::{Collective, Comm};
use tch::{Kind, Tensor};

/// The trainer's allocator and options (`trainer::alloc`), as in a training run.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// Median seconds of `f` over 21 calls after 3 warm-ups (rank 0's figures are printed).
fn time(f: impl FnMut()) -> f64 {
    contrast_benches::median_secs(3, 21, f)
}

/// Least-squares α, β of t = α + β·x.
fn fit(points: &[(f64, f64)]) -> (f64, f64) {
    let n = points.len() as f64;
    let (sx, sy) = points.iter().fold((0.0, 0.0), |(a, b), (x, y)| (a + x, b + y));
    let (mx, my) = (sx / n, sy / n);
    let sxx: f64 = points.iter().map(|(x, _)| (x - mx).powi(2)).sum();
    let sxy: f64 = points.iter().map(|(x, y)| (x - mx) * (y - my)).sum();
    let beta = if sxx > 0.0 { sxy / sxx } else { 0.0 };
    ((my - beta * mx).max(0.0), beta)
}

fn main() {
    let comm = Comm::from_env().unwrap();
    assert_eq!(trainer::alloc::dirty_decay_ms(), Some(-1), "the trainer's allocator options");
    tch::set_num_threads(1);
    let json = std::env::args().skip_while(|a| a != "--json").nth(1);
    let (p, rank) = (comm.world_size(), comm.rank());
    // Per-rank payloads from 4 KiB to 16 MiB of f32.
    let sizes: Vec<usize> = (0..=12).step_by(2).map(|k| 1024usize << k).collect();
    let (mut gather_pts, mut reduce_pts, mut rows) = (Vec::new(), Vec::new(), Vec::new());
    for &n in &sizes {
        let d = 128usize;
        let local = Tensor::ones([(n / d).max(1) as i64, d as i64], (Kind::Float, tch::Device::Cpu));
        let raw = vec![1f32; n];
        let engine = time(|| {
            let _ = contrast_nn::wire::gather_rows(&comm, &local);
        });
        let mpi = time(|| {
            let _ = comm.all_gather(&raw);
        });
        let mut buf = vec![1f32; n];
        let reduce = time(|| comm.all_reduce_sum(&mut buf));
        let bytes = (n * 4) as f64;
        gather_pts.push((bytes * p as f64, mpi));
        reduce_pts.push((bytes, reduce));
        rows.push((n * 4, engine, mpi, reduce));
    }
    let (ga, gb) = fit(&gather_pts);
    let (ra, rb) = fit(&reduce_pts);
    if rank != 0 {
        return;
    }
    println!("collectives over {p} ranks ({}), µs per call, median of 21", comm.backend());
    println!(
        "{:>12} {:>14} {:>14} {:>8} {:>14}",
        "bytes/rank", "engine gather", "MPI_Allgather", "ratio", "all-reduce"
    );
    for (bytes, e, m, r) in &rows {
        println!("{bytes:>12} {:>14.1} {:>14.1} {:>8.2} {:>14.1}", e * 1e6, m * 1e6, e / m, r * 1e6);
    }
    println!("fit all-gather: t = {:.1} µs + {:.3} ns/byte (of the gathered result)", ga * 1e6, gb * 1e9);
    println!("fit all-reduce: t = {:.1} µs + {:.3} ns/byte (of the buffer)", ra * 1e6, rb * 1e9);
    if let Some(path) = json {
        let table: Vec<String> = rows.iter().map(|(b, e, m, r)| format!("[{b}, {e:e}, {m:e}, {r:e}]")).collect();
        let text = format!(
            "{{\"ranks\": {p}, \"all_gather\": {{\"alpha_s\": {ga:e}, \"beta_s_per_byte\": {gb:e}}}, \
             \"all_reduce\": {{\"alpha_s\": {ra:e}, \"beta_s_per_byte\": {rb:e}}}, \
             \"rows\": [{}]}}",
            table.join(", ")
        );
        std::fs::write(path, text).unwrap();
    }
}
