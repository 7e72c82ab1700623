//! Helpers of the end-to-end tests: a small learnable IDX dataset, tiny
//! configs, running the built binary alone and under `mpirun`, and reading
//! what a run saved.

pub use std::path::{Path, PathBuf};
pub use std::process::{Command, Output};
pub use tch::Tensor;

pub const BIN: &str = env!("CARGO_BIN_EXE_trainer");

/// A 28×28 dataset where class c draws a bright bar at a class-dependent
/// place, with per-image jitter and noise (learnable, like a tiny Fashion-MNIST).
pub fn write_dataset(dir: &Path, train: usize, test: usize) {
    let make = |n: usize, salt: u64| {
        let mut pixels = vec![0u8; n * 784];
        let mut labels = vec![0u8; n];
        let mut s = 0x1234_5678_u64 ^ salt;
        let mut rnd = move || {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            s
        };
        for i in 0..n {
            let c = (i % 10) as usize;
            labels[i] = c as u8;
            let (r0, c0) = (2 + (c / 5) * 12 + (rnd() % 3) as usize, 2 + (c % 5) * 5 + (rnd() % 2) as usize);
            for y in 0..28 {
                for x in 0..28 {
                    let bar = y >= r0 && y < r0 + 10 && x >= c0 && x < c0 + 3;
                    let v = if bar { 200 } else { 0 } + (rnd() % 40) as i32;
                    pixels[i * 784 + y * 28 + x] = v.min(255) as u8;
                }
            }
        }
        contrast_data::Images { pixels, labels, height: 28, width: 28 }
    };
    make(train, 1).write_split(dir, "train").unwrap();
    make(test, 2).write_split(dir, "t10k").unwrap();
}

pub struct Fixture {
    pub dir: tempfile::TempDir,
}

impl Fixture {
    pub fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        write_dataset(&dir.path().join("data").tap_mkdir(), 240, 60);
        Self { dir }
    }

    pub fn path(&self, p: &str) -> PathBuf {
        self.dir.path().join(p)
    }

    /// A config for a tiny, fast, exactly comparable run (no batch statistics, SGD).
    pub fn config(&self, name: &str, loss: &str, extra: &str) -> PathBuf {
        // Only the loss keys the loss reads: any other is an error.
        let reads_t = contrast_config::LossKind::parse(loss).is_some_and(|k| k.keys().contains(&"temperature"));
        let temperature = if reads_t { ", temperature: 0.2" } else { "" };
        // Only the head keys the method reads: the text tower for image–text losses, else the MLP's width.
        let image_text = contrast_config::LossKind::parse(loss).is_some_and(|k| k.is_image_text());
        let head = if image_text { "text: {width: 16, layers: 1, heads: 2, context: 40}" } else { "proj_hidden: 16" };
        let yaml = format!(
            "seed: 3\n\
             data: {{root: {data}, workers: 1, prefetch: 2}}\n\
             model: {{width: 4, embed_dim: 32, proj_dim: 8, norm: group, {head}}}\n\
             loss: {{name: {loss}{temperature}}}\n\
             train: {{global_batch: 8, steps: 3, threads: 1, log_every: 1,\n\
                      optimizer: {{name: sgd, lr: 0.1, momentum: 0.9, weight_decay: 0.0001}},\n\
                      schedule: {{warmup_steps: 1}}}}\n\
             checkpoint: {{dir: {run}, every: 0, keep: 0}}\n\
             eval: {{at_end: false, knn_k: 5}}\n{extra}",
            data = self.path("data").display(),
            run = self.path(name).display(),
        );
        let f = self.path(&format!("{name}.yaml"));
        std::fs::write(&f, yaml).unwrap();
        f
    }
}

pub trait TapMkdir {
    fn tap_mkdir(self) -> Self;
}

impl TapMkdir for PathBuf {
    fn tap_mkdir(self) -> Self {
        std::fs::create_dir_all(&self).unwrap();
        self
    }
}

pub fn run(np: usize, args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = if np == 0 {
        Command::new(BIN)
    } else {
        let mut c = Command::new("mpirun");
        c.args(["-n", &np.to_string()]);
        if is_open_mpi() {
            c.arg("--oversubscribe");
        }
        c.arg(BIN);
        c
    };
    cmd.args(args)
        .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        .env("OMPI_MCA_btl_vader_single_copy_mechanism", "none")
        .env("OMPI_MCA_rmaps_base_oversubscribe", "1");
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().unwrap_or_else(|e| {
        panic!(
            "cannot start {}: {e} (is Open MPI or MPICH installed? launch/setup.sh installs it)",
            if np == 0 { BIN } else { "mpirun" }
        )
    })
}

pub fn is_open_mpi() -> bool {
    Command::new("mpirun")
        .arg("--version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains("Open MPI"))
        .unwrap_or(false)
}

pub fn ok(out: Output) -> Output {
    assert!(
        out.status.success(),
        "trainer failed ({}):\n--- stdout\n{}\n--- stderr\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

pub fn weights(ckpt: &Path) -> Vec<(String, Vec<f64>)> {
    let mut v: Vec<(String, Vec<f64>)> = Tensor::read_safetensors(ckpt.join("model.safetensors"))
        .unwrap()
        .into_iter()
        .map(|(n, t)| (n, contrast_nn::to_host::<f64>(&t)))
        .collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

/// Largest relative difference between two checkpoints' weights, tensor by
/// tensor, relative to the tensor's largest |value| or 10⁻³ where all are
/// smaller (a parameter whose gradient is zero in exact arithmetic, as
/// Quick-Thought's context `ln_final.bias`, holds f32 rounding noise only).
pub fn max_rel_diff(a: &Path, b: &Path) -> f64 {
    let (wa, wb) = (weights(a), weights(b));
    assert_eq!(wa.iter().map(|x| &x.0).collect::<Vec<_>>(), wb.iter().map(|x| &x.0).collect::<Vec<_>>());
    wa.iter()
        .zip(&wb)
        .map(|((_, x), (_, y))| {
            let scale = y.iter().fold(1e-3f64, |m, v| m.max(v.abs()));
            x.iter().zip(y).fold(0f64, |m, (p, q)| m.max((p - q).abs())) / scale
        })
        .fold(0.0, f64::max)
}

pub fn checkpoint_tensor_shape(ckpt: &Path, name: &str) -> Vec<i64> {
    let t = tch::Tensor::read_safetensors(ckpt.join("model.safetensors")).unwrap();
    t.into_iter().find(|(n, _)| n == name).unwrap_or_else(|| panic!("{name} not in {}", ckpt.display())).1.size()
}

pub fn summary(run: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(run.join("summary.json")).unwrap()).unwrap()
}

/// The step of the checkpoint a resume would load.
pub fn latest_step(run_dir: &Path) -> usize {
    match trainer::checkpoint::latest(run_dir).unwrap() {
        Some(p) => p.file_name().unwrap().to_string_lossy().strip_prefix("step-").unwrap().parse().unwrap(),
        None => 0,
    }
}

/// The pid of the trainer process of `rank` whose command line names `config`.
pub fn rank_pid(config: &Path, rank: usize) -> Option<u32> {
    std::fs::read_dir("/proc").ok()?.filter_map(|e| e.ok()).find_map(|e| {
        let pid: u32 = e.file_name().to_str()?.parse().ok()?;
        let cmd = std::fs::read(e.path().join("cmdline")).ok()?;
        let env = std::fs::read(e.path().join("environ")).ok()?;
        let has = |hay: &[u8], needle: &str| hay.split(|&b| b == 0).any(|a| a == needle.as_bytes());
        let is_trainer = cmd.split(|&b| b == 0).next().is_some_and(|a| a.ends_with(b"trainer"));
        (is_trainer && has(&cmd, &config.display().to_string()) && has(&env, &format!("OMPI_COMM_WORLD_RANK={rank}")))
            .then_some(pid)
    })
}

pub fn dir_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().metadata().unwrap().len().div_ceil(4096) * 4096).sum()
}

/// A spawned `mpirun` job that a failing test does not leave running: when it
/// is dropped still alive, it gets SIGTERM (which mpirun forwards to the
/// ranks), then SIGKILL after 10 s.
pub struct Job(pub std::process::Child);

impl std::ops::Deref for Job {
    type Target = std::process::Child;
    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

impl std::ops::DerefMut for Job {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.0
    }
}

impl Drop for Job {
    fn drop(&mut self) {
        if !matches!(self.0.try_wait(), Ok(None)) {
            return;
        }
        let _ = Command::new("kill").args(["-TERM", &self.0.id().to_string()]).status();
        let t0 = std::time::Instant::now();
        while matches!(self.0.try_wait(), Ok(None)) && t0.elapsed().as_secs() < 10 {
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Start a 2-rank `mpirun` job on `cfg` with `sets`, logging into `log`.
pub fn spawn_mpirun(cfg: &Path, sets: &[&str], log: &Path) -> Job {
    spawn_mpirun_with(cfg, sets, log, &[])
}

/// [`spawn_mpirun`] with variables in the job's environment.
pub fn spawn_mpirun_with(cfg: &Path, sets: &[&str], log: &Path, env: &[(&str, &str)]) -> Job {
    let mut cmd = Command::new("mpirun");
    cmd.envs(env.iter().copied());
    cmd.args(["--oversubscribe", "-n", "2", BIN, "--config", cfg.to_str().unwrap()]);
    cmd.args(sets.iter().flat_map(|s| ["--set", s]));
    cmd.env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        .env("OMPI_MCA_btl_vader_single_copy_mechanism", "none")
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(log).unwrap());
    Job(cmd.spawn().unwrap())
}

/// Wait until `run_dir/steps.jsonl` has `lines` lines (the job must still run).
pub fn wait_for_steps(job: &mut std::process::Child, run_dir: &Path, lines: usize, log: &Path) {
    let t0 = std::time::Instant::now();
    while std::fs::read_to_string(run_dir.join("steps.jsonl")).map_or(0, |t| t.lines().count()) < lines {
        assert!(job.try_wait().unwrap().is_none(), "the job ended early:\n{}", std::fs::read_to_string(log).unwrap());
        assert!(t0.elapsed().as_secs() < 60, "no progress in 60 s");
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

pub fn write_script(path: &Path, body: &str) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(path, body).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).unwrap();
}

/// GET `http://127.0.0.1:port/metrics`, parsed with a Prometheus text-format parser.
pub fn scrape(port: u16) -> std::io::Result<prometheus_parse::Scrape> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port))?;
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")?;
    let mut text = String::new();
    s.read_to_string(&mut text)?;
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or_default();
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    prometheus_parse::Scrape::parse(body.lines().map(|l| Ok(l.to_string())))
}

pub fn value(scrape: &prometheus_parse::Scrape, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    scrape
        .samples
        .iter()
        .find(|s| s.metric == name && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
        .and_then(|s| match s.value {
            prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Untyped(v) => Some(v),
            _ => None,
        })
}

/// The `__metadata__` of a safetensors file's header.
pub fn safetensors_metadata(path: &Path) -> serde_json::Value {
    let bytes = std::fs::read(path).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    header["__metadata__"].clone()
}

/// Run an MPMD job: one rank per argument list, each with its own arguments.
pub fn run_mpmd(ranks: &[Vec<String>]) -> Output {
    let mut cmd = Command::new("mpirun");
    if is_open_mpi() {
        cmd.arg("--oversubscribe");
    }
    for (k, args) in ranks.iter().enumerate() {
        if k > 0 {
            cmd.arg(":");
        }
        cmd.args(["-n", "1", BIN]).args(args);
    }
    cmd.env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        .env("OMPI_MCA_btl_vader_single_copy_mechanism", "none");
    cmd.output().unwrap()
}

pub fn losses(run: &Path) -> Vec<f64> {
    std::fs::read_to_string(run.join("steps.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["loss"].as_f64().unwrap())
        .collect()
}

pub fn tensor_of(ckpt: &Path, name: &str) -> Vec<f64> {
    weights(ckpt).into_iter().find(|(n, _)| n == name).unwrap_or_else(|| panic!("{name} not in {}", ckpt.display())).1
}

pub const MOCO: &str = "method: {name: moco_v2, queue_size: 16, momentum: 0.9}\n";

/// `examples/loss_parity`, built next to this test binary by `cargo test`.
pub fn example(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().unwrap().parent().unwrap().join("examples").join(name);
    assert!(dir.is_file(), "{} is missing: cargo test builds the examples", dir.display());
    dir
}

/// Coloured shapes with captions that name them: learnable image–text pairs.
pub fn caption_dataset(dir: &Path, n: usize) -> Vec<(String, String)> {
    let colours =
        [("red", [220u8, 30, 30]), ("green", [30, 200, 40]), ("blue", [40, 60, 220]), ("yellow", [230, 220, 40])];
    let shapes = ["square", "stripe"];
    let mut rows = Vec::new();
    for i in 0..n {
        let (cname, rgb) = colours[i % 4];
        let shape = shapes[(i / 4) % 2];
        let img = image::RgbImage::from_fn(24 + (i % 5) as u32, 20, |x, y| {
            let inside =
                if shape == "square" { (6..16).contains(&x) && (5..15).contains(&y) } else { (y / 3) % 2 == 0 };
            let noise = ((i * 31 + x as usize * 7 + y as usize * 13) % 23) as u8;
            if inside {
                image::Rgb([rgb[0].saturating_sub(noise), rgb[1].saturating_sub(noise), rgb[2].saturating_sub(noise)])
            } else {
                image::Rgb([noise, noise, noise])
            }
        });
        let name = format!("img{i:03}.{}", if i % 3 == 0 { "jpg" } else { "png" });
        img.save(dir.join(&name)).unwrap();
        rows.push((name, format!("a {cname} {shape}")));
    }
    rows
}

pub fn mean_loss(run: &Path, steps: std::ops::Range<usize>) -> f64 {
    let text = std::fs::read_to_string(run.join("steps.jsonl")).unwrap();
    let losses: Vec<f64> =
        text.lines().map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["loss"].as_f64().unwrap()).collect();
    let picked = &losses[steps];
    picked.iter().sum::<f64>() / picked.len() as f64
}

/// Run the binary (`subcommand` first, if any) on `config` with each of `sets` as a `--set`, then `tail` args.
pub fn run_with_sets(np: usize, subcommand: &[&str], config: &Path, sets: &[String], tail: &[&str]) -> Output {
    let mut args: Vec<String> = subcommand.iter().map(|s| s.to_string()).collect();
    args.extend(["--config".to_string(), config.display().to_string()]);
    for s in sets {
        args.extend(["--set".to_string(), s.clone()]);
    }
    args.extend(tail.iter().map(|s| s.to_string()));
    ok(run(np, &args.iter().map(String::as_str).collect::<Vec<_>>(), &[]))
}

pub fn clip_on(dataset: &str, root: &Path, run_dir: &Path, np: usize, extra: &[String]) -> Output {
    let config = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../configs/clip.yaml");
    let sets = [
        format!("data.dataset={dataset}"),
        format!("data.root={}", root.display()),
        "data.image_size=16".into(),
        "data.workers=1".into(),
        "model.width=8".into(),
        "model.embed_dim=64".into(),
        "model.proj_dim=16".into(),
        "model.text.width=32".into(),
        "model.text.layers=1".into(),
        "train.global_batch=16".into(),
        "train.steps=60".into(),
        "train.threads=1".into(),
        "train.schedule.warmup_steps=5".into(),
        "train.optimizer.lr=0.003".into(),
        format!("checkpoint.dir={}", run_dir.display()),
        "checkpoint.every=0".into(),
    ];
    let sets: Vec<String> = sets.into_iter().chain(extra.iter().cloned()).collect();
    run_with_sets(np, &[], &config, &sets, &[])
}

/// Run a built example under `mpirun -n np` with `env` (Open MPI's root and
/// oversubscription flags as the other helpers).
pub fn run_example_mpi(name: &str, np: usize, env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new("mpirun");
    if is_open_mpi() {
        cmd.arg("--oversubscribe");
    }
    cmd.args(["-n", &np.to_string()])
        .arg(example(name))
        .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        .env("OMPI_MCA_btl_vader_single_copy_mechanism", "none")
        .envs(env.iter().copied());
    cmd.output().unwrap()
}

/// The repository's root.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The project venv's python (launch/setup.sh makes it), or `None` after
/// saying the test is skipped without it.
pub fn venv_python() -> Option<PathBuf> {
    let python = repo_root().join(".venv/bin/python");
    if !python.exists() {
        eprintln!("skipped: no {} (launch/setup.sh makes it)", python.display());
        return None;
    }
    Some(python)
}
