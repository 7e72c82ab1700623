//! Decode + SimCLR two-view augmentation throughput against torchvision.
//!
//! Writes 2,000 JPEGs of 256×256 in 10 class folders, then measures images/s
//! of contrast's pipeline (`image_folder`, `simclr` RGB preset → two 224×224
//! views) at 1 and 2 workers and, in the same run, torchvision's
//! `ImageFolder` + `DataLoader` with the equivalent transforms from the
//! project's venv (`benches/torchvision_baseline.py`; `launch/setup.sh`
//! installs torchvision==0.28.0). Prints both and the ratio.
//!
//!     source launch/env.sh && cargo bench -p contrast-benches --bench data
//!     (CONTRAST_BENCH_IMAGES=500 for a quicker run)

use contrast_data::pipeline::Input;
use contrast_data::rgb::RgbAugParams;
use contrast_data::source::{ImageFolder, Source};
use contrast_data::{Mode, Pipeline, PipelineConfig};
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

fn write_images(root: &Path, n: usize) {
    let threads = std::thread::available_parallelism().map(|t| t.get()).unwrap_or(1);
    std::thread::scope(|s| {
        for t in 0..threads {
            s.spawn(move || write_some(root, n, t, threads));
        }
    });
}

fn write_some(root: &Path, n: usize, first: usize, step: usize) {
    for i in (first..n).step_by(step) {
        let dir = root.join(format!("class{}", i % 10));
        std::fs::create_dir_all(&dir).unwrap();
        let img = image::RgbImage::from_fn(256, 256, |x, y| {
            let v = (x * 3 + y * 5 + i as u32 * 17) % 256;
            let noise = (x.wrapping_mul(2654435761).wrapping_add(y.wrapping_mul(40503)).wrapping_add(i as u32 * 97)
                >> 24) as u8;
            image::Rgb([v as u8 ^ noise, ((x * y) % 256) as u8, ((255 - v) as u8).wrapping_add(noise / 2)])
        });
        let mut out = std::fs::File::create(dir.join(format!("{i:05}.jpg"))).unwrap();
        image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, 90).encode_image(&img).unwrap();
    }
}

fn contrast_rate(source: &Arc<dyn Source>, workers: usize) -> f64 {
    let batch = 64;
    let steps = source.len() / batch;
    let cfg = PipelineConfig {
        seed: 0,
        rank: 0,
        world_size: 1,
        global_batch: batch,
        workers,
        prefetch: 2 * workers,
        start_step: 0,
        end_step: steps,
        mode: Mode::Views,
        mix: None,
        shuffle_view: None,
        gated_epochs: Default::default(),
    };
    let augment = RgbAugParams { jitter: [0.4, 0.4, 0.4, 0.1], ..RgbAugParams::simclr(224) };
    let mut p = Pipeline::start_input(
        Input::Files { source: source.clone(), augment: vec![augment; 2], max_bad_fraction: 0.0 },
        cfg,
    )
    .unwrap();
    p.next_batch().unwrap().unwrap(); // warm-up, as the baseline does
    let start = Instant::now();
    let mut n = 0;
    while let Some(b) = p.next_batch() {
        let b = b.unwrap();
        n += b.indices.len();
        p.recycle(b); // as the trainer does
    }
    n as f64 / start.elapsed().as_secs_f64()
}

fn torchvision_rate(root: &Path, workers: usize) -> Option<f64> {
    let py = Path::new(env!("CARGO_MANIFEST_DIR")).join("../.venv/bin/python");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("torchvision_baseline.py");
    let out = std::process::Command::new(py).arg(script).arg(root).arg(workers.to_string()).output().ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        eprintln!("torchvision baseline failed: {}", String::from_utf8_lossy(&out.stderr));
        return None;
    }
    text.lines().find_map(|l| l.strip_prefix("images_per_s ")).and_then(|v| v.trim().parse().ok())
}

fn main() {
    let n: usize = std::env::var("CONTRAST_BENCH_IMAGES").ok().and_then(|v| v.parse().ok()).unwrap_or(2000);
    let dir = tempfile::tempdir().unwrap();
    let t = Instant::now();
    write_images(dir.path(), n);
    println!("wrote {n} JPEGs (256×256, quality 90) in {:.1}s", t.elapsed().as_secs_f64());
    let source: Arc<dyn Source> = Arc::new(ImageFolder::open(dir.path()).unwrap());
    println!("decode + SimCLR two views at 224×224, images/s (each image → two views)");
    println!("{:>8} {:>12} {:>12} {:>8}", "workers", "contrast", "torchvision", "ratio");
    for workers in [1usize, 2] {
        let ours = contrast_rate(&source, workers);
        match torchvision_rate(dir.path(), workers) {
            Some(tv) => println!("{workers:>8} {ours:>12.1} {tv:>12.1} {:>8.2}", ours / tv),
            None => println!("{workers:>8} {ours:>12.1} {:>12} {:>8}", "n/a", "-"),
        }
    }
}
