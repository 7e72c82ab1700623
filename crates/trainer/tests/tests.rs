//! End-to-end tests of the `trainer` binary (one test binary: each links libtorch).
//!
//! They write a small learnable IDX dataset, run the built binary alone and
//! under `mpirun`, and compare what it saved: the MPI parity of DESIGN.md
//! invariant 1 through real MPI, exact resume (also onto another world size),
//! the NaN stop, bad-input errors and the summary keys.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use tch::Tensor;

const BIN: &str = env!("CARGO_BIN_EXE_trainer");

/// A 28×28 dataset where class c draws a bright bar at a class-dependent
/// place, with per-image jitter and noise (learnable, like a tiny Fashion-MNIST).
fn write_dataset(dir: &Path, train: usize, test: usize) {
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

struct Fixture {
    dir: tempfile::TempDir,
}

impl Fixture {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        write_dataset(&dir.path().join("data").tap_mkdir(), 240, 60);
        Self { dir }
    }

    fn path(&self, p: &str) -> PathBuf {
        self.dir.path().join(p)
    }

    /// A config for a tiny, fast, exactly comparable run (no batch statistics, SGD).
    fn config(&self, name: &str, loss: &str, extra: &str) -> PathBuf {
        // Only the loss keys the loss reads: any other is an error.
        let reads_t = contrast_config::LossKind::parse(loss).is_some_and(|k| k.keys().contains(&"temperature"));
        let temperature = if reads_t { ", temperature: 0.2" } else { "" };
        let yaml = format!(
            "seed: 3\n\
             data: {{root: {data}, workers: 1, prefetch: 2}}\n\
             model: {{width: 4, embed_dim: 32, proj_hidden: 16, proj_dim: 8, norm: group, text: {{width: 16, layers: 1, heads: 2, context: 40}}}}\n\
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

trait TapMkdir {
    fn tap_mkdir(self) -> Self;
}
impl TapMkdir for PathBuf {
    fn tap_mkdir(self) -> Self {
        std::fs::create_dir_all(&self).unwrap();
        self
    }
}

fn run(np: usize, args: &[&str], env: &[(&str, &str)]) -> Output {
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

fn is_open_mpi() -> bool {
    Command::new("mpirun")
        .arg("--version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains("Open MPI"))
        .unwrap_or(false)
}

fn ok(out: Output) -> Output {
    assert!(
        out.status.success(),
        "trainer failed ({}):\n--- stdout\n{}\n--- stderr\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn weights(ckpt: &Path) -> Vec<(String, Vec<f64>)> {
    let mut v: Vec<(String, Vec<f64>)> = Tensor::read_safetensors(ckpt.join("model.safetensors"))
        .unwrap()
        .into_iter()
        .map(|(n, t)| (n, contrast_nn::to_host::<f64>(&t)))
        .collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

/// Largest relative difference between two checkpoints' weights, tensor by tensor.
fn max_rel_diff(a: &Path, b: &Path) -> f64 {
    let (wa, wb) = (weights(a), weights(b));
    assert_eq!(wa.iter().map(|x| &x.0).collect::<Vec<_>>(), wb.iter().map(|x| &x.0).collect::<Vec<_>>());
    wa.iter()
        .zip(&wb)
        .map(|((_, x), (_, y))| {
            let scale = y.iter().fold(1e-8f64, |m, v| m.max(v.abs()));
            x.iter().zip(y).fold(0f64, |m, (p, q)| m.max((p - q).abs())) / scale
        })
        .fold(0.0, f64::max)
}

fn checkpoint_tensor_shape(ckpt: &Path, name: &str) -> Vec<i64> {
    let t = tch::Tensor::read_safetensors(ckpt.join("model.safetensors")).unwrap();
    t.into_iter().find(|(n, _)| n == name).unwrap_or_else(|| panic!("{name} not in {}", ckpt.display())).1.size()
}

fn summary(run: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(run.join("summary.json")).unwrap()).unwrap()
}

#[test]
fn mpi_ranks_match_one_rank_of_the_same_global_batch() {
    let fx = Fixture::new();
    // NT-Xent and CLIP at 2 and 4 ranks; one MPI run of each other loss family at 2 ranks;
    // mixed batches (soft targets) too, with groups that divide every local batch.
    let mixup: &[&str] = &["--set", "data.mix=mixup", "--set", "data.mix_group=2"];
    let cutmix: &[&str] = &["--set", "data.mix=cutmix", "--set", "data.mix_group=2"];
    let multi_crop: &[&str] = &["--set", "data.augment=swav", "--set", "data.small_crops=2"];
    let cases: [(&str, &str, &[usize], &[&str]); 12] = [
        ("ntxent", "ntxent", &[2, 4], &[]),
        ("clip", "clip", &[2, 4], &[]),
        ("supcon", "supcon", &[2], &[]),
        ("dclw", "dclw", &[2], &[]),
        ("hard_negative", "hard_negative", &[2], &[]),
        ("barlow_twins", "barlow_twins", &[2], &[]),
        ("siglip", "siglip", &[2], &[]),
        ("triplet", "triplet", &[2], &[]),
        ("nce", "nce", &[2], &[]),
        ("imix", "ntxent", &[2, 4], mixup),
        ("supcon-cutmix", "supcon", &[2], cutmix),
        ("multi-crop", "ntxent", &[2], multi_crop),
    ];
    for (name, loss, worlds, extra) in cases {
        let solo = fx.config(&format!("{name}-solo"), loss, "");
        let mut args = vec!["--config", solo.to_str().unwrap()];
        args.extend_from_slice(extra);
        ok(run(0, &args, &[]));
        for &np in worlds {
            let run_name = format!("{name}-mpi{np}");
            let cfg = fx.config(&run_name, loss, "");
            let mut args = vec!["--config", cfg.to_str().unwrap()];
            args.extend_from_slice(extra);
            let out = ok(run(np, &args, &[]));
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(err.contains(&format!("world_size={np}")), "plan line missing: {err}");
            let d = max_rel_diff(&fx.path(&format!("{run_name}/step-3")), &fx.path(&format!("{name}-solo/step-3")));
            assert!(d < 1e-4, "{name}: {np} MPI ranks differ from 1 rank by {d:e}");
            let s = summary(&fx.path(&run_name));
            assert_eq!(s["world_size"], np);
            assert_eq!(s["steps"], 3);
        }
    }
    // Mixing changes the run (the comparison above would see a lost mix).
    assert!(max_rel_diff(&fx.path("imix-solo/step-3"), &fx.path("ntxent-solo/step-3")) > 1e-4);
    assert!(max_rel_diff(&fx.path("multi-crop-solo/step-3"), &fx.path("ntxent-solo/step-3")) > 1e-4);
}

#[test]
fn local_negatives_would_be_caught_by_the_mpi_comparison() {
    // The comparison above is sensitive: a different global batch (another seed) moves the weights.
    let fx = Fixture::new();
    let a = fx.config("a", "ntxent", "");
    let b = fx.config("b", "ntxent", "");
    ok(run(0, &["--config", a.to_str().unwrap()], &[]));
    ok(run(0, &["--config", b.to_str().unwrap(), "--set", "data.aug.flip_prob=0.0"], &[]));
    assert!(max_rel_diff(&fx.path("a/step-3"), &fx.path("b/step-3")) > 1e-4);
}

#[test]
fn nan_loss_stops_with_last_checkpoint_intact_and_resume_is_exact() {
    let fx = Fixture::new();
    let extra = "";
    let straight = fx.config("straight", "ntxent", extra);
    ok(run(0, &["--config", straight.to_str().unwrap(), "--set", "train.steps=4", "--set", "checkpoint.every=2"], &[]));

    let broken = fx.config("broken", "ntxent", extra);
    let args = ["--config", broken.to_str().unwrap(), "--set", "train.steps=4", "--set", "checkpoint.every=2"];
    let out = run(0, &args, &[("CONTRAST_FAULT_NAN_AT_STEP", "4")]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("loss is NaN at step 4") && err.contains("step-2") && err.contains("intact"), "{err}");
    assert_eq!(std::fs::read_to_string(fx.path("broken/latest")).unwrap().trim(), "step-2");
    assert!(!fx.path("broken/step-4").exists());

    // Step 3 was logged before the fault; the resume from step-2 logs it again, once.
    // Resume on the same layout: bit-for-bit the straight run.
    let mut resume = args.to_vec();
    resume.extend(["--set", "train.resume=true"]);
    ok(run(0, &resume, &[]));
    assert_eq!(max_rel_diff(&fx.path("broken/step-4"), &fx.path("straight/step-4")), 0.0);
    let lines = std::fs::read_to_string(fx.path("broken/steps.jsonl")).unwrap();
    let steps: Vec<u64> = lines
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["step"].as_u64().unwrap())
        .collect();
    assert_eq!(steps, vec![1, 2, 3, 4], "steps.jsonl: {lines}");
}

#[test]
fn a_resume_with_an_incompatible_config_is_refused_naming_the_key() {
    let fx = Fixture::new();
    let cfg = fx.config("compat", "ntxent", "");
    ok(run(0, &["--config", cfg.to_str().unwrap(), "--set", "train.steps=2"], &[]));
    // The same number of samples, one pixel changed.
    let changed = fx.path("data-changed").tap_mkdir();
    for f in std::fs::read_dir(fx.path("data")).unwrap().map(|e| e.unwrap().path()) {
        let mut bytes = std::fs::read(&f).unwrap();
        if f.to_string_lossy().contains("train-images") {
            bytes[4000] ^= 1;
        }
        std::fs::write(changed.join(f.file_name().unwrap()), bytes).unwrap();
    }
    let changed = format!("data.root={}", changed.display());
    for (set, key) in [
        ("seed=4", "`seed`"),
        ("train.global_batch=16", "`train.global_batch`"),
        ("loss.name=dcl", "`loss.name`"),
        (changed.as_str(), "`data.root`"),
        ("model.proj_dim=16", "`head.fc2.bias` has shape [8], this run expects [16]"),
    ] {
        let out = run(
            2,
            &["--config", cfg.to_str().unwrap(), "--set", "train.steps=4", "--set", "train.resume=true", "--set", set],
            &[],
        );
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{set} was accepted");
        assert!(err.contains(key) && (err.contains("cannot be resumed") || set.starts_with("model")), "{set}: {err}");
    }
    // Extending the run on another world size is allowed.
    ok(run(2, &["--config", cfg.to_str().unwrap(), "--set", "train.steps=4", "--set", "train.resume=true"], &[]));
}

#[test]
fn a_fresh_run_into_an_old_directory_keeps_its_own_checkpoints() {
    let fx = Fixture::new();
    let cfg = fx.config("reused", "ntxent", "");
    let long = [
        "--config",
        cfg.to_str().unwrap(),
        "--set",
        "train.steps=6",
        "--set",
        "checkpoint.every=2",
        "--set",
        "checkpoint.keep=2",
    ];
    ok(run(0, &long, &[]));
    // A new, shorter run (resume off) into the same directory.
    let short = [
        "--config",
        cfg.to_str().unwrap(),
        "--set",
        "train.steps=3",
        "--set",
        "checkpoint.every=1",
        "--set",
        "checkpoint.keep=2",
    ];
    ok(run(0, &short, &[]));
    assert_eq!(std::fs::read_to_string(fx.path("reused/latest")).unwrap().trim(), "step-3");
    for kept in ["step-2", "step-3", "step-6"] {
        assert!(fx.path("reused").join(kept).join("state.json").is_file(), "{kept} is gone");
    }
    assert!(!fx.path("reused/step-1").exists(), "the new run keeps only its 2 newest");
    let state: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fx.path("reused/step-3/state.json")).unwrap()).unwrap();
    let old: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fx.path("reused/step-6/state.json")).unwrap()).unwrap();
    assert_ne!(state["run_id"], old["run_id"]);
}

#[test]
fn a_latest_naming_a_torn_checkpoint_falls_back_to_the_newest_intact_one() {
    let fx = Fixture::new();
    let cfg = fx.config("torn", "ntxent", "");
    let args = [
        "--config",
        cfg.to_str().unwrap(),
        "--set",
        "train.steps=4",
        "--set",
        "checkpoint.every=1",
        "--set",
        "checkpoint.keep=0",
    ];
    let out = run(0, &args, &[("CONTRAST_FAULT_NAN_AT_STEP", "4")]);
    assert!(!out.status.success());
    // A crash that left step-3 torn (its model file gone) while `latest` already named it.
    std::fs::remove_file(fx.path("torn/step-3/model.safetensors")).unwrap();
    let mut resume = args.to_vec();
    resume.extend(["--set", "train.resume=true"]);
    let out = ok(run(0, &resume, &[]));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("not a complete checkpoint") && err.contains("step-2"), "{err}");
    assert!(err.contains("resumed from") && err.contains("at step 2"), "{err}");
    assert_eq!(std::fs::read_to_string(fx.path("torn/latest")).unwrap().trim(), "step-4");
}

/// A panic on one rank of an MPMD job (the fault hook set on rank 0 only) ends
/// the whole job promptly with a non-zero status instead of hanging the other
/// rank in a collective.
#[test]
fn a_panic_on_one_rank_aborts_the_whole_job() {
    let fx = Fixture::new();
    let cfg = fx.config("panic", "ntxent", "");
    let cfg = cfg.to_str().unwrap();
    let mut cmd = Command::new("mpirun");
    if is_open_mpi() {
        cmd.arg("--oversubscribe");
    }
    cmd.args(["-n", "1", "env", "CONTRAST_FAULT_PANIC_AT_STEP=2", BIN, "--config", cfg, "--set", "train.steps=6"]);
    cmd.args([":", "-n", "1", BIN, "--config", cfg, "--set", "train.steps=6"]);
    cmd.env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        .env("OMPI_MCA_btl_vader_single_copy_mechanism", "none")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let started = std::time::Instant::now();
    let mut child = cmd.spawn().unwrap();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if started.elapsed() > std::time::Duration::from_secs(60) {
            child.kill().unwrap();
            panic!("the job still runs 60 s after one rank panicked: it hangs");
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    };
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!status.success(), "{err}");
    assert!(err.contains("injected panic at step 2"), "{err}");
}

/// The step of the checkpoint a resume would load.
fn latest_step(run_dir: &Path) -> usize {
    match trainer::checkpoint::latest(run_dir).unwrap() {
        Some(p) => p.file_name().unwrap().to_string_lossy().strip_prefix("step-").unwrap().parse().unwrap(),
        None => 0,
    }
}

#[test]
fn kills_at_random_points_of_checkpoint_writes_always_leave_a_loadable_checkpoint() {
    let fx = Fixture::new();
    let cfg = fx.config("kills", "ntxent", "");
    let run_dir = fx.path("kills");
    let sets =
        ["train.steps=1000000", "checkpoint.every=1", "checkpoint.keep=2", "train.resume=true", "train.log_every=1000"];
    let mut args = vec!["--config".to_string(), cfg.display().to_string()];
    args.extend(sets.iter().flat_map(|s| ["--set".to_string(), s.to_string()]));
    let (mut last, mut state, mut torn) = (0usize, 0x9E37_79B9_7F4A_7C15u64, 0);
    for round in 0..40 {
        let log = fx.path(&format!("kills-{round}.log"));
        let mut child = Command::new(BIN).args(&args).stderr(std::fs::File::create(&log).unwrap()).spawn().unwrap();
        // Each round first resumes from what the last kill left: it must load and move on.
        let t0 = std::time::Instant::now();
        while latest_step(&run_dir) <= last {
            if let Some(status) = child.try_wait().unwrap() {
                panic!("round {round}: the run stopped ({status}):\n{}", std::fs::read_to_string(&log).unwrap());
            }
            assert!(t0.elapsed().as_secs() < 60, "round {round}: no new checkpoint in 60 s");
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        std::thread::sleep(std::time::Duration::from_micros(state % 30_000));
        child.kill().unwrap();
        child.wait().unwrap();
        let tmp = std::fs::read_dir(&run_dir).unwrap().filter_map(|e| e.ok());
        torn += tmp.filter(|e| e.file_name().to_string_lossy().ends_with(".tmp")).count().min(1);
        let now = latest_step(&run_dir);
        assert!(now >= last, "round {round}: the newest checkpoint went back from step {last} to {now}");
        last = now;
    }
    // Most steps of this run are checkpoint writes, so kills land inside them.
    eprintln!("{torn} of 40 kills left a half-written checkpoint behind");
    assert!(torn >= 3, "only {torn} of 40 kills landed inside a checkpoint write");
    // The last kill's checkpoint resumes and trains on.
    let mut tail = args.clone();
    tail.extend(["--set".to_string(), format!("train.steps={}", last + 2)]);
    ok(run(0, &tail.iter().map(String::as_str).collect::<Vec<_>>(), &[]));
    assert_eq!(latest_step(&run_dir), last + 2);
}

/// The pid of the trainer process of `rank` whose command line names `config`.
fn rank_pid(config: &Path, rank: usize) -> Option<u32> {
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

#[test]
fn kill_9_of_one_rank_ends_the_mpirun_job_promptly() {
    if !is_open_mpi() {
        eprintln!("skipped: finds ranks by OMPI_COMM_WORLD_RANK (Open MPI)");
        return;
    }
    let fx = Fixture::new();
    let cfg = fx.config("kill9", "ntxent", "");
    let sets = ["train.steps=1000000", "checkpoint.every=5", "checkpoint.keep=2", "train.log_every=1000"];
    let mut job = spawn_mpirun(&cfg, &sets, &fx.path("kill9.log"));
    let t0 = std::time::Instant::now();
    while latest_step(&fx.path("kill9")) < 10 {
        assert!(job.try_wait().unwrap().is_none(), "{}", std::fs::read_to_string(fx.path("kill9.log")).unwrap());
        assert!(t0.elapsed().as_secs() < 60, "no checkpoint in 60 s");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let pid = rank_pid(&cfg, 1).expect("rank 1's process");
    let killed = std::time::Instant::now();
    Command::new("kill").args(["-9", &pid.to_string()]).status().unwrap();
    let status = loop {
        if let Some(s) = job.try_wait().unwrap() {
            break s;
        }
        if killed.elapsed().as_secs() > 30 {
            job.kill().unwrap();
            panic!("the job still runs 30 s after rank 1 was killed: it hangs");
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    let took = killed.elapsed().as_secs_f64();
    eprintln!("kill -9 of rank 1: mpirun exited ({status}) after {took:.1} s");
    assert!(!status.success());
    assert!(rank_pid(&cfg, 0).is_none(), "rank 0 outlived the job");
    // What was committed survives: the run resumes from it.
    let resume_at = latest_step(&fx.path("kill9"));
    let steps = format!("train.steps={}", resume_at + 1);
    let args = ["--config", cfg.to_str().unwrap(), "--set", "train.resume=true", "--set", &steps];
    ok(run(2, &args, &[]));
    assert_eq!(latest_step(&fx.path("kill9")), resume_at + 1);
}

fn dir_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().metadata().unwrap().len().div_ceil(4096) * 4096).sum()
}

#[test]
fn a_full_disk_stops_the_run_and_keeps_the_last_checkpoint() {
    let fx = Fixture::new();
    let probe = fx.config("probe", "ntxent", "");
    ok(run(0, &["--config", probe.to_str().unwrap(), "--set", "train.steps=1", "--set", "checkpoint.every=1"], &[]));
    let per_checkpoint = dir_bytes(&fx.path("probe/step-1"));
    // A disk with room for two and a half checkpoints (root may mount a tmpfs; elsewhere this is skipped).
    let disk = fx.path("disk").tap_mkdir();
    let size = format!("size={}", per_checkpoint * 5 / 2 + 16384);
    let mounted = Command::new("mount").args(["-t", "tmpfs", "-o", &size, "tmpfs"]).arg(&disk).status();
    if !mounted.is_ok_and(|s| s.success()) {
        eprintln!("skipped: cannot mount a small tmpfs here (needs root)");
        return;
    }
    let cfg = fx.config("disk/run", "ntxent", "");
    let args = ["--config", cfg.to_str().unwrap(), "--set", "train.steps=20", "--set", "checkpoint.every=1"];
    let out = run(0, &args, &[]);
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    let last = latest_step(&fx.path("disk/run"));
    let loadable = trainer::checkpoint::latest(&fx.path("disk/run"))
        .unwrap()
        .map(|p| trainer::checkpoint::read_tensors(&p, "model.safetensors").is_ok());
    Command::new("umount").arg(&disk).status().unwrap();
    assert!(!out.status.success(), "the run ignored a full disk:\n{err}");
    assert!(err.contains("No space left on device"), "{err}");
    assert!(last >= 1 && loadable == Some(true), "latest step {last}, loadable {loadable:?}:\n{err}");
}

/// Start a 2-rank `mpirun` job on `cfg` with `sets`, logging into `log`.
fn spawn_mpirun(cfg: &Path, sets: &[&str], log: &Path) -> std::process::Child {
    let mut cmd = Command::new("mpirun");
    cmd.args(["--oversubscribe", "-n", "2", BIN, "--config", cfg.to_str().unwrap()]);
    cmd.args(sets.iter().flat_map(|s| ["--set", s]));
    cmd.env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        .env("OMPI_MCA_btl_vader_single_copy_mechanism", "none")
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(log).unwrap());
    cmd.spawn().unwrap()
}

/// Wait until `run_dir/steps.jsonl` has `lines` lines (the job must still run).
fn wait_for_steps(job: &mut std::process::Child, run_dir: &Path, lines: usize, log: &Path) {
    let t0 = std::time::Instant::now();
    while std::fs::read_to_string(run_dir.join("steps.jsonl")).map_or(0, |t| t.lines().count()) < lines {
        assert!(job.try_wait().unwrap().is_none(), "the job ended early:\n{}", std::fs::read_to_string(log).unwrap());
        assert!(t0.elapsed().as_secs() < 60, "no progress in 60 s");
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

#[test]
fn a_stop_signal_checkpoints_at_an_agreed_step_and_the_resume_is_exact() {
    if !is_open_mpi() {
        eprintln!("skipped: finds ranks by OMPI_COMM_WORLD_RANK (Open MPI)");
        return;
    }
    let fx = Fixture::new();
    let sets = ["train.steps=30", "checkpoint.every=0"];
    let straight = fx.config("sig-straight", "ntxent", "");
    let mut args = vec!["--config", straight.to_str().unwrap()];
    args.extend(sets.iter().flat_map(|s| ["--set", *s]));
    ok(run(2, &args, &[]));
    // SIGTERM to rank 1 only (as `kill` of one task would): both ranks stop after the same step.
    let cfg = fx.config("sig", "ntxent", "");
    let (run_dir, log) = (fx.path("sig"), fx.path("sig.log"));
    let mut job = spawn_mpirun(&cfg, &sets, &log);
    wait_for_steps(&mut job, &run_dir, 3, &log);
    let pid = rank_pid(&cfg, 1).expect("rank 1's process");
    Command::new("kill").args(["-TERM", &pid.to_string()]).status().unwrap();
    let status = job.wait().unwrap();
    let err = std::fs::read_to_string(&log).unwrap();
    assert!(status.success(), "a stop signal must end the job with status 0 ({status}):\n{err}");
    let stopped = latest_step(&run_dir);
    assert!((3..30).contains(&stopped), "stopped at {stopped}:\n{err}");
    assert!(err.contains("stop signal on 1 of 2 ranks") && err.contains(&format!("after step {stopped}/30")), "{err}");
    let s = summary(&run_dir);
    assert_eq!((s["steps"].as_u64(), s["stopped_by_signal"].as_bool()), (Some(stopped as u64), Some(true)), "{s}");
    // SIGUSR1 to mpirun (which forwards it to every rank): the same clean stop, exit 0.
    let mut resume: Vec<&str> = sets.to_vec();
    resume.push("train.resume=true");
    let mut job = spawn_mpirun(&cfg, &resume, &log);
    wait_for_steps(&mut job, &run_dir, stopped + 3, &log);
    Command::new("kill").args(["-USR1", &job.id().to_string()]).status().unwrap();
    let status = job.wait().unwrap();
    let again = latest_step(&run_dir);
    assert!(status.success() && again > stopped, "{status}, {again}:\n{}", std::fs::read_to_string(&log).unwrap());
    // The requeued job finishes, and its losses are the uninterrupted run's.
    let mut args = vec!["--config", cfg.to_str().unwrap()];
    args.extend(resume.iter().flat_map(|s| ["--set", *s]));
    ok(run(2, &args, &[]));
    assert_eq!(losses(&run_dir), losses(&fx.path("sig-straight")));
    assert_eq!(max_rel_diff(&fx.path("sig/step-30"), &fx.path("sig-straight/step-30")), 0.0);
}

fn write_script(path: &Path, body: &str) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(path, body).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).unwrap();
}

#[test]
fn the_slurm_script_forwards_the_time_limit_signal_checkpoints_and_requeues() {
    let fx = Fixture::new();
    // No Slurm here: `srun` runs the command after its options (as one task), `scontrol` logs its arguments.
    let stubs = fx.path("stubs").tap_mkdir();
    write_script(
        &stubs.join("srun"),
        "#!/bin/sh\nwhile [ $# -gt 0 ]; do case \"$1\" in -c|-n|-N) shift 2;; -*) shift;; *) break;; esac; done\nexec \"$@\"\n",
    );
    write_script(&stubs.join("scontrol"), "#!/bin/sh\necho \"$@\" >> \"$SCONTROL_LOG\"\n");
    let cfg = fx.config("slurm", "ntxent", "");
    let (run_dir, log, calls) = (fx.path("slurm"), fx.path("slurm.log"), fx.path("scontrol.log"));
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../launch/slurm.sbatch");
    let start = |steps: &str| {
        Command::new("bash")
            .arg(&script)
            .arg(&cfg)
            .args(["--set", steps, "--set", "checkpoint.every=0"])
            .env("PATH", format!("{}:{}", stubs.display(), std::env::var("PATH").unwrap()))
            .env("SLURM_JOB_ID", "42")
            .env("SLURM_SUBMIT_DIR", fx.dir.path())
            .env("CONTRAST_TRAINER", BIN)
            .env("SCONTROL_LOG", &calls)
            .stdout(std::fs::File::create(fx.path("slurm.out")).unwrap())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap()
    };
    let mut job = start("train.steps=100000");
    wait_for_steps(&mut job, &run_dir, 3, &log);
    // What `--signal=B:USR1@180` does: SIGUSR1 to the batch shell only.
    Command::new("kill").args(["-USR1", &job.id().to_string()]).status().unwrap();
    let status = job.wait().unwrap();
    let err = std::fs::read_to_string(&log).unwrap();
    assert!(status.success(), "{status}:\n{err}");
    assert_eq!(std::fs::read_to_string(&calls).unwrap().trim(), "requeue 42", "{err}");
    let stopped = latest_step(&run_dir);
    assert!(stopped >= 3 && summary(&run_dir)["stopped_by_signal"] == true, "{err}");
    // The requeued start resumes from that checkpoint and finishes without requeueing again.
    let steps = format!("train.steps={}", stopped + 2);
    let status = start(&steps).wait().unwrap();
    assert!(status.success(), "{}", std::fs::read_to_string(&log).unwrap());
    assert_eq!(latest_step(&run_dir), stopped + 2);
    assert_eq!(std::fs::read_to_string(&calls).unwrap().lines().count(), 1);
    assert!(std::fs::read_to_string(&log)
        .unwrap()
        .contains(&format!("resumed from {}", run_dir.join(format!("step-{stopped}")).display())));
    // `mpirun -n 8 trainer …` works as written after `source launch/env.sh`.
    let env_sh = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../launch/env.sh");
    let found =
        Command::new("bash").args(["-c", &format!("source {} && command -v trainer", env_sh.display())]).output();
    let found = String::from_utf8(found.unwrap().stdout).unwrap();
    assert!(found.trim().ends_with("target/release/trainer"), "{found}");
}

/// GET `http://127.0.0.1:port/metrics`, parsed with a Prometheus text-format parser.
fn scrape(port: u16) -> std::io::Result<prometheus_parse::Scrape> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port))?;
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")?;
    let mut text = String::new();
    s.read_to_string(&mut text)?;
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or_default();
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    prometheus_parse::Scrape::parse(body.lines().map(|l| Ok(l.to_string())))
}

fn value(scrape: &prometheus_parse::Scrape, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
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

#[test]
fn every_rank_serves_prometheus_metrics_during_a_run() {
    if !is_open_mpi() {
        eprintln!("skipped: finds ranks by OMPI_COMM_WORLD_RANK (Open MPI)");
        return;
    }
    let fx = Fixture::new();
    // A base port of our own; rank 0's is taken: it warns and trains on, rank 1 serves base + 1.
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let base = busy.local_addr().unwrap().port();
    if base == u16::MAX || std::net::TcpListener::bind(("127.0.0.1", base + 1)).is_err() {
        eprintln!("skipped: port {} is taken", base + 1);
        return;
    }
    let listen = format!("metrics.listen=127.0.0.1:{base}");
    let textfile = format!("metrics.textfile_dir={}", fx.path("prom").display());
    let cfg = fx.config("metrics", "ntxent", "");
    let sets = ["train.steps=100000", "checkpoint.every=0", &listen, &textfile, "metrics.textfile_every=2"];
    let (run_dir, log) = (fx.path("metrics"), fx.path("metrics.log"));
    let mut job = spawn_mpirun(&cfg, &sets, &log);
    // Rank 0 logs step 6 after that step's all-reduce, by which time rank 1 has reported step 5 at least.
    wait_for_steps(&mut job, &run_dir, 6, &log);
    let scraped = scrape(base + 1);
    Command::new("kill").args(["-USR1", &job.id().to_string()]).status().unwrap();
    let status = job.wait().unwrap();
    let err = std::fs::read_to_string(&log).unwrap();
    assert!(status.success(), "{err}");
    assert!(err.contains(&format!("cannot listen on 127.0.0.1:{base}")), "rank 0 names the port in use:\n{err}");
    let m = scraped.unwrap();
    let one = [("rank", "1")];
    let step = value(&m, "contrast_step", &one).expect("contrast_step");
    assert!(step >= 5.0, "step {step}");
    assert!(value(&m, "contrast_samples_total", &one).unwrap() >= 5.0 * 8.0);
    assert!(value(&m, "contrast_samples_per_second", &one).unwrap() > 0.0);
    assert!(value(&m, "contrast_loss", &one).unwrap().is_finite());
    assert_eq!(value(&m, "contrast_negatives_per_anchor", &one), Some(14.0));
    assert!(value(&m, "contrast_collective_bytes_total", &[("rank", "1"), ("op", "all_gather")]).unwrap() > 0.0);
    assert!(value(&m, "process_resident_memory_bytes", &one).unwrap() > 1e6, "RSS");
    let phases: Vec<&str> = m
        .samples
        .iter()
        .filter(|s| s.metric == "contrast_step_phase_seconds")
        .filter_map(|s| s.labels.get("phase"))
        .collect();
    for phase in trainer::metrics::PHASES {
        assert!(phases.contains(&phase), "no {phase} histogram: {phases:?}");
    }
    // Every series the shipped Grafana dashboard plots is one the endpoint serves.
    let dash =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../../launch/grafana-dashboard.json"));
    let dash = dash.unwrap();
    let served: std::collections::HashSet<&str> = m.samples.iter().map(|s| s.metric.as_str()).collect();
    for word in dash.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
        let base = word.trim_end_matches("_sum").trim_end_matches("_count");
        if word.starts_with("contrast_") || word.starts_with("process_") {
            assert!(served.contains(word) || served.contains(base), "the dashboard plots {word}, which is not served");
        }
    }
    // The textfile of each rank parses too (node_exporter's collector reads it).
    for rank in 0..2 {
        let text = std::fs::read_to_string(fx.path(&format!("prom/contrast-rank{rank}.prom"))).unwrap();
        let parsed = prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_string()))).unwrap();
        assert!(value(&parsed, "contrast_step", &[("rank", &rank.to_string())]).unwrap() >= 2.0);
    }
    drop(busy);
}

#[test]
fn log_lines_name_their_rank_plain_and_json() {
    let fx = Fixture::new();
    let cfg = fx.config("logs", "ntxent", "");
    let base = ["--config", cfg.to_str().unwrap(), "--set", "train.steps=3", "--set", "checkpoint.every=0"];
    // Plain: the step line keeps its form, after the rank and step spans.
    let out = ok(run(2, &base, &[("CONTRAST_LOG", "info")]));
    let err = String::from_utf8_lossy(&out.stderr);
    for line in err.lines() {
        assert!(line.contains("rank{rank=0}") || line.contains("rank{rank=1}"), "a line without its rank: {line}");
    }
    assert!(
        err.lines().any(|l| l.contains("rank{rank=0}:step{step=2}: step 2/3 loss ") && l.contains(" samples/s ")),
        "{err}"
    );
    assert!(err.contains("rank{rank=1}"), "rank 1 logs at info when asked: {err}");
    // At the default level rank 1 logs only warnings, and they carry its rank too (its metrics port is taken).
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let listen = format!("metrics.listen=127.0.0.1:{}", busy.local_addr().unwrap().port() - 1);
    let mut args = base.to_vec();
    args.extend(["--set", &listen]);
    let out = ok(run(2, &args, &[]));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.lines().any(|l| l.contains("WARN") && l.contains("rank{rank=1}") && l.contains("cannot listen")),
        "{err}"
    );
    // JSON: every line is an object; the rank and step are fields of its spans.
    let mut args = vec!["--log-format", "json"];
    args.extend(base);
    let out = ok(run(2, &args, &[("CONTRAST_LOG", "info")]));
    let err = String::from_utf8_lossy(&out.stderr);
    let mut ranks = std::collections::BTreeSet::new();
    let mut steps = 0;
    for line in err.lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        let spans = v["spans"].as_array().unwrap_or_else(|| panic!("no spans: {line}"));
        ranks.insert(spans[0]["rank"].as_u64().expect("rank span first"));
        if v["fields"]["message"].as_str().unwrap_or("").starts_with("step ") {
            assert_eq!(spans.last().unwrap()["name"], "step", "{line}");
            steps += 1;
        }
    }
    assert_eq!(ranks.into_iter().collect::<Vec<_>>(), vec![0, 1]);
    assert!(steps >= 3, "{err}");
    assert!(!err.contains("ETA"), "no progress bar without a terminal");
    // On a terminal (a pty from `script`), rank 0 draws a progress bar, and log lines still come through.
    if Command::new("script").arg("--version").output().is_ok_and(|o| o.status.success()) {
        let cmd = format!("{BIN} --config {} --set train.steps=6 --set checkpoint.every=0", cfg.display());
        let out = Command::new("script").args(["-qfec", &cmd, "/dev/null"]).output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{text}");
        assert!(text.contains("ETA") && text.contains("samples/s ["), "no progress bar on a terminal: {text}");
        assert!(text.contains("step 6/6 loss"), "{text}");
    }
    // An error before MPI is up names the rank the launcher gave.
    let out = run(0, &["--log-format", "json", "--config", "/no/such.yaml"], &[("PMIX_RANK", "3")]);
    let v: serde_json::Value = serde_json::from_str(String::from_utf8_lossy(&out.stderr).trim()).unwrap();
    assert_eq!((v["rank"].as_u64(), v["level"].as_str()), (Some(3), Some("ERROR")), "{v}");
}

#[test]
fn evaluations_give_known_answers_on_small_fixtures() {
    use trainer::eval::{knn_top1, linear_probe, Features};
    // 4 classes along 4 orthogonal directions, 6 memory rows each, slightly perturbed.
    let cluster = |c: usize, j: usize| -> Vec<f32> {
        (0..4).map(|d| if d == c { 1.0 } else { 0.05 * ((j * 7 + d * 3) % 5) as f32 / 5.0 }).collect()
    };
    let rows = |spec: &[(usize, usize)]| -> Vec<f32> { spec.iter().flat_map(|&(c, j)| cluster(c, j)).collect() };
    let tensor = |v: &[f32]| contrast_nn::loss::l2_normalize(&Tensor::from_slice(v).view([v.len() as i64 / 4, 4]));
    let memory: Vec<(usize, usize)> = (0..4).flat_map(|c| (0..6).map(move |j| (c, j))).collect();
    let (xm, ym) = (rows(&memory), memory.iter().map(|&(c, _)| c as i64).collect::<Vec<_>>());
    // Test: three rows sit in their class's cluster; the fourth, labelled 1, sits in cluster 0.
    let (xt, yt) = (rows(&[(0, 9), (1, 9), (2, 9), (0, 8)]), vec![0i64, 1, 2, 1]);
    for p in [1, 2, 3] {
        let got = contrast_comm::Threads::run(p, |c| {
            let (m, t) = (tensor(&xm), tensor(&xt));
            let knn = knn_top1(&c, &m, &ym, &t, &yt, 5, 0.1, 4);
            let f = Features { train: (m, ym.clone()), test: (t, yt.clone()), classes: 4 };
            (knn, linear_probe(&c, &f, 200))
        });
        for (knn, probe) in got {
            // Top-1: 3 of 4; top-5 over 4 classes: every row.
            assert_eq!(knn, [0.75, 1.0], "kNN on {p} ranks");
            assert_eq!(probe, 0.75, "linear probe on {p} ranks");
        }
        // Alignment and uniformity (Wang & Isola): 4 orthonormal rows, ‖zᵢ − zⱼ‖² = 2 for i ≠ j, so
        // uniformity = log exp(−4) = −4; views equal: alignment 0; views opposite: ‖2z‖² = 4.
        let got = contrast_comm::Threads::run(p, |c| {
            let eye = Tensor::eye(4, (tch::Kind::Float, tch::Device::Cpu));
            (trainer::eval::alignment_uniformity(&c, &eye, &eye), trainer::eval::alignment_uniformity(&c, &eye, &-&eye))
        });
        for ((a0, u0), (a1, u1)) in got {
            assert!(a0.abs() < 1e-9 && (u0 + 4.0).abs() < 1e-6 && (a1 - 4.0).abs() < 1e-6 && (u1 + 4.0).abs() < 1e-6);
        }
        // Retrieval: images e0, e1, e2 and a fourth near e1 but captioned like image 0; texts t0 = e0, t1 = e1, t2 = e2.
        // Image→text: the fourth misses at 1 and hits at 5 (3/4, 1, 1); text→image: every text's best image is its own.
        let got = contrast_comm::Threads::run(p, |c| {
            let img =
                Tensor::from_slice(&[1f32, 0., 0., 0., 0., 1., 0., 0., 0., 0., 1., 0., 0., 1., 0., 0.1]).view([4, 4]);
            let txt = Tensor::eye(4, (tch::Kind::Float, tch::Device::Cpu)).narrow(0, 0, 3);
            trainer::eval::retrieval(
                &c,
                &contrast_nn::loss::l2_normalize(&img),
                &txt,
                &[Some(0), Some(1), Some(2), Some(0)],
            )
        });
        for r in got {
            assert_eq!(r, [0.75, 1.0, 1.0, 1.0, 1.0, 1.0], "retrieval on {p} ranks");
        }
    }
}

/// The `__metadata__` of a safetensors file's header.
fn safetensors_metadata(path: &Path) -> serde_json::Value {
    let bytes = std::fs::read(path).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    header["__metadata__"].clone()
}

#[test]
fn the_best_checkpoint_is_kept_and_models_export_and_embed() {
    let fx = Fixture::new();
    let cfg = fx.config("best", "ntxent", "");
    let sets = [
        "train.steps=6",
        "checkpoint.every=2",
        "checkpoint.keep=1",
        "eval.every=2",
        "eval.at_end=true",
        "eval.knn_k=5",
        "checkpoint.best=knn_top1",
    ];
    let mut args = vec!["--config", cfg.to_str().unwrap()];
    args.extend(sets.iter().flat_map(|s| ["--set", *s]));
    let out = ok(run(2, &args, &[]));
    let err = String::from_utf8_lossy(&out.stderr);
    let run_dir = fx.path("best");
    // best/ holds the best kNN top-1 of the evaluations (steps 2, 4 and the end), apart from the pruned step directories.
    let best: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run_dir.join("best/state.json")).unwrap()).unwrap();
    let value = best["best_metric"].as_f64().expect("best_metric");
    assert!(err.contains("best knn_top1 so far"), "{err}");
    let out = ok(run(0, &["eval", "--checkpoint", run_dir.join("best").to_str().unwrap()], &[]));
    let e: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(e["knn_top1"].as_f64(), Some(value), "best/ holds the model that scored it");
    assert!(value >= summary(&run_dir)["knn_top1"].as_f64().unwrap());
    assert!(!run_dir.join("step-2").exists() && run_dir.join("step-6").exists());
    // Every evaluation is logged (the untrained encoder at step 0), and plot.png is drawn from the logs.
    let evals: Vec<u64> = std::fs::read_to_string(run_dir.join("evals.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["step"].as_u64().unwrap())
        .collect();
    assert_eq!(evals, vec![0, 2, 4, 6]);
    let png = image::open(run_dir.join("plot.png")).expect("plot.png decodes").to_rgb8();
    assert_eq!(png.dimensions(), (1500, 450));
    let colours: std::collections::HashSet<[u8; 3]> = png.pixels().map(|p| p.0).collect();
    assert!(colours.len() > 20, "a blank plot ({} colours)", colours.len());
    // Export: the model alone, in bfloat16.
    let exported = fx.path("model-bf16.safetensors");
    ok(run(
        0,
        &["export", "--checkpoint", run_dir.to_str().unwrap(), "--out", exported.to_str().unwrap(), "--bf16"],
        &[],
    ));
    let tensors = Tensor::read_safetensors(&exported).unwrap();
    let model = Tensor::read_safetensors(run_dir.join("step-6/model.safetensors")).unwrap();
    assert_eq!(tensors.len(), model.len());
    for (name, t) in &tensors {
        assert_eq!(t.kind(), tch::Kind::BFloat16, "{name}");
        let (_, w) = model.iter().find(|(n, _)| n == name).unwrap();
        let diff = (t.to_kind(tch::Kind::Float) - w).abs().max().double_value(&[]);
        assert!(diff <= 1e-2 * w.abs().max().double_value(&[]).max(1e-3), "{name} moved by {diff}");
    }
    // Embed the test split: the same on 1 and 2 ranks, with labels and source names.
    let (one, two) = (fx.path("emb1.safetensors"), fx.path("emb2.safetensors"));
    for (np, f) in [(0, &one), (2, &two)] {
        let a = ["embed", "--checkpoint", run_dir.to_str().unwrap(), "--out", f.to_str().unwrap(), "--split", "test"];
        ok(run(np, &a, &[]));
    }
    let (a, b) = (Tensor::read_safetensors(&one).unwrap(), Tensor::read_safetensors(&two).unwrap());
    let get = |v: &[(String, Tensor)], n: &str| v.iter().find(|(k, _)| k == n).unwrap().1.shallow_clone();
    assert_eq!(get(&a, "embeddings").size(), vec![60, 32]);
    assert!((get(&a, "embeddings") - get(&b, "embeddings")).abs().max().double_value(&[]) < 1e-5);
    let labels: Vec<i64> = Vec::try_from(get(&a, "labels")).unwrap();
    assert_eq!(labels, (0..60).map(|i| i % 10).collect::<Vec<i64>>());
    let paths: Vec<String> = serde_json::from_str(safetensors_metadata(&one)["paths"].as_str().unwrap()).unwrap();
    assert_eq!(paths.len(), 60);
    assert!(paths[7].ends_with("t10k-images-idx3-ubyte#7"), "{}", paths[7]);
}

/// Two network namespaces joined by a veth pair, removed on drop.
struct TwoHosts {
    ns: [String; 2],
}

impl TwoHosts {
    const IPS: [&'static str; 2] = ["10.77.0.1", "10.77.0.2"];

    /// None (with the reason) where namespaces cannot be made (not root, no CAP_SYS_ADMIN, no iproute2).
    fn new() -> Result<Self, String> {
        let tag = std::process::id() % 100_000;
        let hosts = TwoHosts { ns: [format!("ctA{tag}"), format!("ctB{tag}")] };
        let ip = |args: &[&str]| -> Result<(), String> {
            let out = Command::new("ip").args(args).output().map_err(|e| format!("ip: {e}"))?;
            out.status.success().then_some(()).ok_or_else(|| String::from_utf8_lossy(&out.stderr).trim().to_string())
        };
        let (va, vb) = (format!("va{tag}"), format!("vb{tag}"));
        ip(&["netns", "add", &hosts.ns[0]])?;
        ip(&["netns", "add", &hosts.ns[1]])?;
        ip(&["link", "add", &va, "type", "veth", "peer", "name", &vb])?;
        for (k, v) in [&va, &vb].into_iter().enumerate() {
            let ns = &hosts.ns[k];
            ip(&["link", "set", v, "netns", ns])?;
            ip(&["-n", ns, "addr", "add", &format!("{}/24", Self::IPS[k]), "dev", v])?;
            ip(&["-n", ns, "link", "set", v, "up"])?;
            ip(&["-n", ns, "link", "set", "lo", "up"])?;
        }
        Ok(hosts)
    }

    /// Bytes host A has sent over its veth.
    fn tx_bytes(&self) -> u64 {
        let tag = &self.ns[0][3..];
        let path = format!("/sys/class/net/va{tag}/statistics/tx_bytes");
        let out = Command::new("ip").args(["netns", "exec", &self.ns[0], "cat", &path]).output().unwrap();
        String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
    }

    /// `mpirun` started on host A (hostname hostA) over both hosts, one rank each, over TCP only;
    /// Open MPI reaches host B through `agent`, which enters B's namespace under hostname hostB.
    fn mpirun(&self, agent: &Path, command: &str) -> Output {
        let script = format!(
            "#!/bin/sh\nhost=\"$1\"; shift\ncase \"$host\" in\n  {}) ns={}; name=hostA ;;\n  {}) ns={}; name=hostB ;;\n  *) exit 1 ;;\nesac\nexec ip netns exec \"$ns\" unshare --uts sh -c \"hostname $name; $*\"\n",
            Self::IPS[0], self.ns[0], Self::IPS[1], self.ns[1]
        );
        write_script(agent, &script);
        let mpirun = format!(
            "hostname hostA; exec mpirun --host {}:1,{}:1 -n 2 --mca plm_rsh_agent {} --mca btl tcp,self \
             --mca btl_tcp_if_include 10.77.0.0/24 --mca oob_tcp_if_include 10.77.0.0/24 {command}",
            Self::IPS[0],
            Self::IPS[1],
            agent.display()
        );
        Command::new("ip")
            .args(["netns", "exec", &self.ns[0], "unshare", "--uts", "sh", "-c", &mpirun])
            .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
            .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
            .output()
            .unwrap()
    }
}

impl Drop for TwoHosts {
    fn drop(&mut self) {
        for ns in &self.ns {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

#[test]
fn two_hosts_in_network_namespaces_train_exactly_over_tcp() {
    if !is_open_mpi() {
        eprintln!("skipped: uses Open MPI's plm_rsh_agent");
        return;
    }
    let hosts = match TwoHosts::new() {
        Ok(h) => h,
        Err(why) => {
            eprintln!("skipped: cannot create network namespaces here ({why})");
            return;
        }
    };
    let fx = Fixture::new();
    let agent = fx.path("agent.sh");
    // Each rank runs on its own "host", with its own hostname.
    let out = hosts.mpirun(&agent, "hostname");
    let names = String::from_utf8_lossy(&out.stdout);
    assert!(names.contains("hostA") && names.contains("hostB"), "{names}{}", String::from_utf8_lossy(&out.stderr));
    // The 2-rank parity check: 3 steps on two hosts equal 3 steps of one rank with the whole batch.
    let solo = fx.config("hosts-solo", "ntxent", "");
    ok(run(0, &["--config", solo.to_str().unwrap()], &[]));
    let cfg = fx.config("hosts", "ntxent", "");
    let before = hosts.tx_bytes();
    let out = ok(hosts.mpirun(&agent, &format!("{BIN} --config {}", cfg.display())));
    let sent = hosts.tx_bytes() - before;
    assert!(String::from_utf8_lossy(&out.stderr).contains("world_size=2"));
    let d = max_rel_diff(&fx.path("hosts/step-3"), &fx.path("hosts-solo/step-3"));
    assert!(d < 1e-4, "two hosts differ from one rank by {d:e}");
    // The embeddings, gradients and checkpoint broadcasts crossed the veth.
    assert!(sent > 20_000, "only {sent} bytes left host A");
    eprintln!("two hosts over TCP: {sent} bytes over the veth, max relative weight difference {d:e}");
}

#[test]
fn a_second_stop_signal_exits_at_once() {
    let fx = Fixture::new();
    let cfg = fx.config("twice", "ntxent", "");
    let (run_dir, log) = (fx.path("twice"), fx.path("twice.log"));
    let mut job = Command::new(BIN)
        .args(["--config", cfg.to_str().unwrap(), "--set", "train.steps=100000", "--set", "checkpoint.every=0"])
        .env("CONTRAST_FAULT_STEP_SLEEP_MS", "1500")
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    wait_for_steps(&mut job, &run_dir, 1, &log);
    // Both arrive inside one 1.5 s step: the first asks for a stop at its end, the second ends the process.
    let pid = job.id().to_string();
    Command::new("kill").args(["-INT", &pid]).status().unwrap();
    std::thread::sleep(std::time::Duration::from_millis(200));
    let sent = std::time::Instant::now();
    Command::new("kill").args(["-INT", &pid]).status().unwrap();
    let status = job.wait().unwrap();
    assert_eq!(status.code(), Some(128 + 2), "{}", std::fs::read_to_string(&log).unwrap());
    assert!(sent.elapsed().as_millis() < 1000, "the second signal waited for the step");
    assert_eq!(latest_step(&run_dir), 0, "no checkpoint: the operator chose not to wait");
}

#[test]
fn nan_gradient_with_a_finite_loss_stops_before_the_weights_change() {
    let fx = Fixture::new();
    let cfg = fx.config("nan-grad", "ntxent", "");
    let args = ["--config", cfg.to_str().unwrap(), "--set", "train.steps=4", "--set", "checkpoint.every=2"];
    let out = run(2, &args, &[("CONTRAST_FAULT_NAN_GRAD_AT_STEP", "3")]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("gradient norm is NaN at step 3") && err.contains("step-2"), "{err}");
    assert_eq!(std::fs::read_to_string(fx.path("nan-grad/latest")).unwrap().trim(), "step-2");
    assert!(weights(&fx.path("nan-grad/step-2")).iter().all(|(_, w)| w.iter().all(|v| v.is_finite())));
}

#[test]
fn resume_onto_another_world_size_continues_the_same_run() {
    let fx = Fixture::new();
    let straight = fx.config("straight", "ntxent", "");
    ok(run(0, &["--config", straight.to_str().unwrap(), "--set", "train.steps=4"], &[]));
    let moved = fx.config("moved", "ntxent", "");
    let args = ["--config", moved.to_str().unwrap(), "--set", "train.steps=4", "--set", "checkpoint.every=2"];
    let out = run(0, &args, &[("CONTRAST_FAULT_NAN_AT_STEP", "3")]);
    assert_eq!(out.status.code(), Some(2));
    let mut resume = args.to_vec();
    resume.extend(["--set", "train.resume=true"]);
    let out = ok(run(2, &resume, &[]));
    assert!(String::from_utf8_lossy(&out.stderr).contains("written by 1 ranks, now 2"));
    let d = max_rel_diff(&fx.path("moved/step-4"), &fx.path("straight/step-4"));
    assert!(d < 1e-4, "resume on 2 ranks drifted by {d:e}");
}

#[test]
fn bad_input_fails_before_training_and_names_the_problem() {
    let fx = Fixture::new();
    let cases: Vec<(usize, Vec<String>, &str)> = vec![
        (0, vec!["--set".into(), "train.global_bacth=8".into()], "global_bacth"),
        (0, vec!["--set".into(), "train.global_batch=-8".into()], "train.global_batch"),
        (2, vec!["--set".into(), "train.global_batch=9".into()], "not divisible by the world size 2"),
        (0, vec!["--set".into(), "data.root=/no/such/dir".into()], "/no/such/dir"),
        (0, vec!["--set".into(), "model.norm=batchy".into()], "model.norm"),
        (
            2,
            vec!["--set".into(), "data.mix=mixup".into(), "--set".into(), "data.mix_group=3".into()],
            "does not divide the local batch 4",
        ),
        (0, vec!["--set".into(), "data.mix=mixup".into(), "--set".into(), "loss.name=clip".into()], "data.mix"),
        (0, vec!["--set".into(), "data.text.eda_alpha=0.1".into()], "data.text.synonyms"),
        (0, vec!["--set".into(), "data.augment=byol".into()], "RGB preset"),
        (0, vec!["--set".into(), "data.text.tokenizer=/no/tokenizer.json".into()], "data.text.tokenizer"),
        (0, vec!["--set".into(), "eval.dataset=image_folder".into()], "eval.dataset"),
    ];
    for (i, (np, extra, needle)) in cases.into_iter().enumerate() {
        let name = format!("bad{i}");
        let cfg = fx.config(&name, "ntxent", "");
        let mut args = vec!["--config".to_string(), cfg.to_str().unwrap().to_string()];
        args.extend(extra);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = run(np, &args, &[]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "case {i} succeeded");
        assert!(err.contains(needle), "case {i}: `{needle}` not in:\n{err}");
        assert!(!fx.path(&format!("{name}/steps.jsonl")).exists(), "case {i} started training");
    }
    // Method keys: each fails before training, naming the key.
    let method_cases = [
        ("infonce", "method: {name: moco_v2, queue_size: 12}", "", "method.queue_size"),
        ("infonce", "method: {name: moco_v2, momentum: 1.5}", "", "method.momentum"),
        ("normalized_mse", "method: {name: byol}", "", "method.predictor_hidden"),
        ("ntxent", "method: {bogus: 1}", "", "bogus"),
        ("ntxent", "method: {queue_size: 64}", "", "method.queue_size"),
        ("ntxent", "", "loss.margin=0.3", "loss.margin"),
    ];
    for (i, (loss, yaml, set, needle)) in method_cases.into_iter().enumerate() {
        let name = format!("bad-method{i}");
        let cfg = fx.config(&name, loss, &format!("{yaml}\n"));
        let mut args = vec!["--config", cfg.to_str().unwrap()];
        if !set.is_empty() {
            args.extend(["--set", set]);
        }
        let out = run(0, &args, &[]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "method case {i} succeeded");
        assert!(err.contains(needle), "method case {i}: `{needle}` not in:\n{err}");
        assert!(!fx.path(&format!("{name}/steps.jsonl")).exists(), "method case {i} started training");
    }
    // An unknown key in the file itself names the file.
    let f = fx.path("typo.yaml");
    std::fs::write(&f, "train:\n  stepz: 3\n").unwrap();
    let out = run(0, &["--config", f.to_str().unwrap()], &[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2));
    assert!(err.contains("typo.yaml") && err.contains("stepz"), "{err}");
}

/// Run an MPMD job: one rank per argument list, each with its own arguments.
fn run_mpmd(ranks: &[Vec<String>]) -> Output {
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

#[test]
fn ranks_must_agree_on_the_data_and_supervised_losses_need_labels() {
    let fx = Fixture::new();
    // Rank 1 sees another dataset (per-node data.root gone wrong): refused before step 1, naming the rank.
    write_dataset(&fx.path("data2").tap_mkdir(), 200, 60);
    let cfg = fx.config("disagree", "ntxent", "");
    let base = vec!["--config".to_string(), cfg.display().to_string()];
    let mut other = base.clone();
    other.extend(["--set".into(), format!("data.root={}", fx.path("data2").display())]);
    let out = run_mpmd(&[base, other]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("rank 1 opened a different training set") && err.contains("200 samples"), "{err}");
    assert!(!fx.path("disagree/steps.jsonl").exists());
    // SupCon on WebDataset shards without labels: refused naming the first unlabelled sample.
    let shards = fx.path("shards").tap_mkdir();
    let imgs = fx.path("imgs").tap_mkdir();
    let rows = caption_dataset(&imgs, 8);
    let mut b = tar::Builder::new(std::fs::File::create(shards.join("000000.tar")).unwrap());
    for (k, (f, _)) in rows.iter().enumerate() {
        b.append_path_with_name(imgs.join(f), f).unwrap();
        if k != 3 {
            let mut h = tar::Header::new_gnu();
            h.set_size(1);
            h.set_mode(0o644);
            h.set_cksum();
            b.append_data(&mut h, format!("{}.cls", f.split_once('.').unwrap().0), &b"1"[..]).unwrap();
        }
    }
    b.finish().unwrap();
    let cfg = fx.config("unlabelled", "supcon", "");
    let root = format!("data.root={}", shards.join("000000.tar").display());
    let args = ["--config", cfg.to_str().unwrap(), "--set", "data.dataset=webdataset", "--set", &root];
    let out = run(2, &args, &[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("loss.name") && err.contains("000000.tar#img003"), "{err}");
    // srun without a PMI plugin: each task would be a world of one, training alone into one directory.
    let cfg = fx.config("no-pmi", "ntxent", "");
    let out = run(0, &["--config", cfg.to_str().unwrap()], &[("SLURM_STEP_NUM_TASKS", "2")]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("MPI sees a world of 1") && err.contains("--mpi=pmix"), "{err}");
    assert!(!fx.path("no-pmi/steps.jsonl").exists());
}

#[test]
fn summary_eval_and_checkpoint_layout() {
    let fx = Fixture::new();
    let cfg = fx.config("full", "clip", "");
    let args = [
        "--config",
        cfg.to_str().unwrap(),
        "--set",
        "eval.at_end=true",
        "--set",
        "train.steps=4",
        "--set",
        "checkpoint.every=1",
        "--set",
        "checkpoint.keep=2",
    ];
    ok(run(0, &args, &[]));
    let s = summary(&fx.path("full"));
    let keys = [
        "steps",
        "stopped_by_signal",
        "final_loss",
        "samples_per_s",
        "compute_samples_per_s",
        "knn_top1",
        "knn_top5",
        "linear_top1",
        "knn_top1_init",
        "knn_top1_raw_pixels",
        "zero_shot_top1",
        "zero_shot_top5",
        "alignment",
        "uniformity",
        "i2t_r1",
        "i2t_r5",
        "i2t_r10",
        "t2i_r1",
        "t2i_r5",
        "t2i_r10",
    ];
    for key in keys {
        assert!(s.get(key).is_some(), "summary.json lacks {key}: {s}");
    }
    // Wall-clock throughput counts the wait for data; the compute-only figure does not.
    assert!(s["samples_per_s"].as_f64().unwrap() <= s["compute_samples_per_s"].as_f64().unwrap(), "{s}");
    for key in ["knn_top1", "knn_top1_init", "knn_top1_raw_pixels", "zero_shot_top1"] {
        let v = s[key].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&v), "{key}={v}");
    }
    // keep=2: only the two newest remain; latest names the newest; no temporary directories.
    let mut names: Vec<String> = std::fs::read_dir(fx.path("full"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    let want = ["config.yaml", "evals.jsonl", "latest", "plot.png", "step-3", "step-4", "steps.jsonl", "summary.json"];
    assert_eq!(names, want);
    for f in ["model.safetensors", "optim.safetensors", "state.json"] {
        assert!(fx.path("full/step-4").join(f).is_file());
    }
    let state: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fx.path("full/step-4/state.json")).unwrap()).unwrap();
    assert_eq!(
        (state["step"].as_u64(), state["seed"].as_u64(), state["world_size"].as_u64()),
        (Some(4), Some(3), Some(1))
    );

    let out = ok(run(
        0,
        &["eval", "--config", cfg.to_str().unwrap(), "--checkpoint", fx.path("full").to_str().unwrap()],
        &[],
    ));
    let e: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(e["step"], 4);
    assert!((e["knn_top1"].as_f64().unwrap() - s["knn_top1"].as_f64().unwrap()).abs() < 1e-9);
    assert!(e["zero_shot_top1"].as_f64().is_some());
    // Without --config, `trainer eval` reads the run directory's config.yaml (from a step directory too).
    for ckpt in [fx.path("full"), fx.path("full/step-4")] {
        let out = ok(run(0, &["eval", "--checkpoint", ckpt.to_str().unwrap()], &[]));
        let again: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(again["knn_top1"], e["knn_top1"]);
    }
    // `trainer config --print` shows that file's content without running, and it loads back.
    let mut printed = vec!["config", "--config", cfg.to_str().unwrap(), "--print"];
    printed.extend(args.iter().skip(2).copied());
    let out = ok(run(0, &printed, &[]));
    let yaml = String::from_utf8(out.stdout).unwrap();
    let written = std::fs::read_to_string(fx.path("full/config.yaml")).unwrap();
    assert!(written.ends_with(&yaml), "config --print:\n{yaml}\nconfig.yaml:\n{written}");
    assert!(yaml.contains("temperature: 0.2") && yaml.contains("knn_k: 5"), "{yaml}");
    let out = run(0, &["eval", "--checkpoint", fx.path("nowhere").to_str().unwrap()], &[]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("no --config given and no config.yaml"));
}

/// The restructure into methods did not change results: 30 steps of the shipped
/// SimCLR and CLIP configs (one process and two ranks, one libtorch thread and
/// one data worker, since those change summation order) log the losses the code
/// before it logged, to the last printed digit (`tests/assets/losses/`).
#[test]
fn shipped_configs_reproduce_the_recorded_losses() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let dir = tempfile::tempdir().unwrap();
    for (config, np) in [("simclr", 0usize), ("simclr", 2), ("clip", 0), ("clip", 2)] {
        let name = format!("{config}-{}", np.max(1));
        let run_dir = dir.path().join(&name);
        let cfg = root.join(format!("configs/{config}.yaml"));
        let set = [
            "train.steps=30".to_string(),
            "train.threads=1".into(),
            "data.workers=1".into(),
            "eval.at_end=false".into(),
            "checkpoint.every=0".into(),
            format!("checkpoint.dir={}", run_dir.display()),
        ];
        let mut args = vec!["--config".to_string(), cfg.to_str().unwrap().to_string()];
        args.extend(set.iter().flat_map(|s| ["--set".to_string(), s.clone()]));
        ok(run(np, &args.iter().map(String::as_str).collect::<Vec<_>>(), &[]));
        let losses = |p: &Path| -> Vec<f64> {
            std::fs::read_to_string(p)
                .unwrap()
                .lines()
                .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["loss"].as_f64().unwrap())
                .collect()
        };
        let want = losses(&root.join(format!("crates/trainer/tests/assets/losses/{name}.jsonl")));
        let got = losses(&run_dir.join("steps.jsonl"));
        assert_eq!(got, want, "{name}: the losses of 30 steps changed");
    }
}

fn losses(run: &Path) -> Vec<f64> {
    std::fs::read_to_string(run.join("steps.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["loss"].as_f64().unwrap())
        .collect()
}

fn tensor_of(ckpt: &Path, name: &str) -> Vec<f64> {
    weights(ckpt).into_iter().find(|(n, _)| n == name).unwrap_or_else(|| panic!("{name} not in {}", ckpt.display())).1
}

const MOCO: &str = "method: {name: moco_v2, queue_size: 16, momentum: 0.9}\n";

/// MoCo's sharded queue through real MPI: 2 and 4 ranks hold K/P keys each and
/// give the weights (query, momentum encoder and the canonical queue) and the
/// losses of one rank, over K/N + 3 steps so that every block is evicted.
#[test]
fn moco_sharded_queue_is_exact_through_real_mpi() {
    let fx = Fixture::new();
    let solo = fx.config("moco-solo", "infonce", MOCO);
    ok(run(0, &["--config", solo.to_str().unwrap(), "--set", "train.steps=5"], &[]));
    assert_eq!(checkpoint_tensor_shape(&fx.path("moco-solo/step-5"), "method.queue"), vec![16, 8]);
    for np in [2usize, 4] {
        let name = format!("moco-mpi{np}");
        let cfg = fx.config(&name, "infonce", MOCO);
        let out = ok(run(np, &["--config", cfg.to_str().unwrap(), "--set", "train.steps=5"], &[]));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(&format!("queue_size=16 queue_shard={}", 16 / np)), "plan line: {err}");
        let d = max_rel_diff(&fx.path(&format!("{name}/step-5")), &fx.path("moco-solo/step-5"));
        assert!(d < 1e-4, "MoCo on {np} MPI ranks differs from 1 rank by {d:e}");
        let (a, w) = (losses(&fx.path(&name)), losses(&fx.path("moco-solo")));
        assert_eq!(a.len(), 5);
        for (x, y) in a.iter().zip(&w) {
            assert!((x - y).abs() <= 1e-5 * y.abs(), "{np} ranks: loss {x} vs {y}");
        }
    }
    // Shuffle-BN (batch norm in the encoders): on one rank it permutes rows inside one batch,
    // which changes no statistic; on two ranks each key encoder sees another half of the batch.
    let bn = ["--set", "train.steps=3", "--set", "model.norm=batch"];
    for (name, np, shuffle) in
        [("bn-solo", 0usize, false), ("bn-solo-shuffle", 0, true), ("bn-mpi2", 2, false), ("bn-mpi2-shuffle", 2, true)]
    {
        let cfg = fx.config(name, "infonce", MOCO);
        let mut args = vec!["--config", cfg.to_str().unwrap()];
        args.extend(bn);
        if shuffle {
            args.extend(["--set", "method.shuffle_bn=true"]);
        }
        ok(run(np, &args, &[]));
    }
    let d = max_rel_diff(&fx.path("bn-solo-shuffle/step-3"), &fx.path("bn-solo/step-3"));
    assert!(d < 1e-4, "shuffle-BN on one rank changed the run by {d:e}");
    let d = max_rel_diff(&fx.path("bn-mpi2-shuffle/step-3"), &fx.path("bn-mpi2/step-3"));
    assert!(d > 1e-6, "shuffle-BN on two ranks changed nothing ({d:e})");
    // The queue moved: it is not the initial one of a 1-step run.
    let first = fx.config("moco-first", "infonce", MOCO);
    ok(run(0, &["--config", first.to_str().unwrap(), "--set", "train.steps=1"], &[]));
    let (q1, q5) = (
        tensor_of(&fx.path("moco-first/step-1"), "method.queue"),
        tensor_of(&fx.path("moco-solo/step-5"), "method.queue"),
    );
    assert!(q1.iter().zip(&q5).any(|(a, b)| (a - b).abs() > 1e-3));
}

/// A MoCo run stopped at step 4 and resumed on another world size (2 → 1, 1 → 4)
/// logs the losses of the uninterrupted run for the next 20 steps and ends with
/// its queue, block by block.
#[test]
fn moco_resumes_onto_another_world_size_through_real_mpi() {
    let fx = Fixture::new();
    let steps = ["--set", "train.steps=24", "--set", "checkpoint.every=4"];
    let straight = fx.config("straight", "infonce", MOCO);
    let mut args = vec!["--config", straight.to_str().unwrap()];
    args.extend(steps);
    ok(run(0, &args, &[]));
    let want = losses(&fx.path("straight"));
    for (before, after) in [(2usize, 0usize), (0, 4)] {
        let name = format!("moved-{before}-{after}");
        let cfg = fx.config(&name, "infonce", MOCO);
        let mut args = vec!["--config", cfg.to_str().unwrap()];
        args.extend(steps);
        let out = run(before, &args, &[("CONTRAST_FAULT_NAN_AT_STEP", "5")]);
        assert!(!out.status.success());
        assert_eq!(std::fs::read_to_string(fx.path(&format!("{name}/latest"))).unwrap().trim(), "step-4");
        args.extend(["--set", "train.resume=true"]);
        ok(run(after, &args, &[]));
        let got = losses(&fx.path(&name));
        assert_eq!(got.len(), 24, "{name}");
        for (k, (x, y)) in got.iter().zip(&want).enumerate() {
            assert!((x - y).abs() <= 1e-5 * y.abs(), "{name} step {}: {x} vs {y}", k + 1);
        }
        let (q, w) = (
            tensor_of(&fx.path(&format!("{name}/step-24")), "method.queue"),
            tensor_of(&fx.path("straight/step-24"), "method.queue"),
        );
        let e = q.iter().zip(&w).fold(0f64, |m, (a, b)| m.max((a - b).abs()));
        assert!(e < 1e-4, "{name}: queue differs by {e:e}");
        assert_eq!(
            tensor_of(&fx.path(&format!("{name}/step-24")), "method.queue_ptr"),
            tensor_of(&fx.path("straight/step-24"), "method.queue_ptr")
        );
    }
}

/// The shipped method configs train as written (a few steps on 2 ranks).
#[test]
fn shipped_method_configs_train() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let dir = tempfile::tempdir().unwrap();
    for (config, state) in
        [("mocov2", "method.queue"), ("byol", "momentum.projector.fc1.weight"), ("simsiam", "predictor.fc1.weight")]
    {
        let run_dir = dir.path().join(config);
        let cfg = root.join(format!("configs/{config}.yaml"));
        let sets = [
            "train.steps=3".to_string(),
            "train.global_batch=32".into(),
            "eval.at_end=false".into(),
            format!("checkpoint.dir={}", run_dir.display()),
        ];
        let mut args = vec!["--config".to_string(), cfg.to_str().unwrap().to_string()];
        args.extend(sets.iter().flat_map(|s| ["--set".to_string(), s.clone()]));
        let out = ok(run(2, &args.iter().map(String::as_str).collect::<Vec<_>>(), &[]));
        assert!(String::from_utf8_lossy(&out.stderr).contains("method="), "{config}: no method in the plan line");
        assert!(summary(&run_dir)["final_loss"].as_f64().unwrap().is_finite(), "{config}");
        assert!(!tensor_of(&run_dir.join("step-3"), state).is_empty());
    }
}

/// `examples/loss_parity`, built next to this test binary by `cargo test`.
fn example(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().unwrap().parent().unwrap().join("examples").join(name);
    assert!(dir.is_file(), "{} is missing: cargo test builds the examples", dir.display());
    dir
}

#[test]
fn every_loss_family_is_exact_through_real_mpi() {
    let bin = example("loss_parity");
    for np in [2usize, 3] {
        let mut cmd = Command::new("mpirun");
        cmd.args(["-n", &np.to_string()]);
        if is_open_mpi() {
            cmd.arg("--oversubscribe");
        }
        let out = cmd
            .arg(&bin)
            .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
            .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
            .env("OMPI_MCA_btl_vader_single_copy_mechanism", "none")
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "loss_parity on {np} ranks failed:\n{text}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(text.lines().filter(|l| l.ends_with(" ok")).count(), 19, "{text}");
        assert!(text.contains(&format!("P={np}")));
    }
}

/// Coloured shapes with captions that name them: learnable image–text pairs.
fn caption_dataset(dir: &Path, n: usize) -> Vec<(String, String)> {
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

fn mean_loss(run: &Path, steps: std::ops::Range<usize>) -> f64 {
    let text = std::fs::read_to_string(run.join("steps.jsonl")).unwrap();
    let losses: Vec<f64> =
        text.lines().map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["loss"].as_f64().unwrap()).collect();
    let picked = &losses[steps];
    picked.iter().sum::<f64>() / picked.len() as f64
}

/// Run the binary (`subcommand` first, if any) on `config` with each of `sets` as a `--set`, then `tail` args.
fn run_with_sets(np: usize, subcommand: &[&str], config: &Path, sets: &[String], tail: &[&str]) -> Output {
    let mut args: Vec<String> = subcommand.iter().map(|s| s.to_string()).collect();
    args.extend(["--config".to_string(), config.display().to_string()]);
    for s in sets {
        args.extend(["--set".to_string(), s.clone()]);
    }
    args.extend(tail.iter().map(|s| s.to_string()));
    ok(run(np, &args.iter().map(String::as_str).collect::<Vec<_>>(), &[]))
}

fn clip_on(dataset: &str, root: &Path, run_dir: &Path, np: usize, extra: &[String]) -> Output {
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

#[test]
fn clip_config_trains_on_a_csv_and_on_webdataset_shards() {
    let dir = tempfile::tempdir().unwrap();
    let imgs = dir.path().join("images").tap_mkdir();
    let rows = caption_dataset(&imgs, 64);
    // open_clip's CSV layout (TSV, filepath + title), paths relative to the file.
    let mut tsv = String::from("filepath\ttitle\n");
    for (f, cap) in &rows {
        tsv.push_str(&format!("images/{f}\t{cap}\n"));
    }
    std::fs::write(dir.path().join("train.tsv"), tsv).unwrap();
    // The same pairs as two WebDataset shards.
    let shards = dir.path().join("shards").tap_mkdir();
    for (k, chunk) in rows.chunks(32).enumerate() {
        let mut b = tar::Builder::new(std::fs::File::create(shards.join(format!("{k:06}.tar"))).unwrap());
        for (f, cap) in chunk {
            let (stem, ext) = f.split_once('.').unwrap();
            b.append_path_with_name(imgs.join(f), format!("{stem}.{ext}")).unwrap();
            let mut h = tar::Header::new_gnu();
            h.set_size(cap.len() as u64);
            h.set_mode(0o644);
            h.set_cksum();
            b.append_data(&mut h, format!("{stem}.txt"), cap.as_bytes()).unwrap();
        }
        b.finish().unwrap();
    }
    let csv_run = dir.path().join("run-csv");
    // Captions augmented with EDA (a synonym file) and span cutoff on the CSV run.
    std::fs::write(dir.path().join("synonyms.tsv"), "red\tcrimson,scarlet\nsquare\tbox\nstripe\tband\n").unwrap();
    let text_aug = [
        "data.text.eda_alpha=0.1".to_string(),
        format!("data.text.synonyms={}", dir.path().join("synonyms.tsv").display()),
        "data.text.cutoff=span".to_string(),
        "data.text.cutoff_ratio=0.1".to_string(),
    ];
    clip_on("csv", &dir.path().join("train.tsv"), &csv_run, 0, &text_aug);
    let wds_run = dir.path().join("run-wds");
    let out = clip_on("webdataset", &shards.join("{000000..000001}.tar"), &wds_run, 2, &[]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("world_size=2"));
    assert!(shards.join("000000.tar.contrast-index").is_file());
    // A Hugging Face tokenizer.json (word level, [CLS] … [SEP]) instead of bytes, and zero-shot
    // on a labelled image folder (classes = colours) given as eval.root.
    let words = ["a", "photo", "picture", "of", "the", "red", "green", "blue", "yellow", "square", "stripe"];
    let tok = dir.path().join("tokenizer.json");
    std::fs::write(&tok, contrast_data::text::word_level_tokenizer_json(&words)).unwrap();
    let test = dir.path().join("test").tap_mkdir();
    // caption_dataset colours image i with colour i % 4 (red, green, blue, yellow): keep one colour per class.
    for (k, colour) in ["red", "green", "blue", "yellow"].iter().enumerate() {
        let class = test.join(colour).tap_mkdir();
        for (i, (f, _)) in caption_dataset(&class, 24).into_iter().enumerate() {
            if i % 4 != k {
                std::fs::remove_file(class.join(f)).unwrap();
            }
        }
    }
    let hf_run = dir.path().join("run-hf");
    let out = clip_on(
        "csv",
        &dir.path().join("train.tsv"),
        &hf_run,
        0,
        &[
            format!("data.text.tokenizer={}", tok.display()),
            "eval.at_end=true".into(),
            format!("eval.root={}", test.display()),
            "eval.dataset=image_folder".into(),
        ],
    );
    let err = String::from_utf8_lossy(&out.stderr);
    let s = summary(&hf_run);
    let zs = s["zero_shot_top1"].as_f64().unwrap_or_else(|| panic!("no zero-shot figure: {s}\n{err}"));
    // Chance is 0.25; pooling at a wrong token (e.g. the constant [CLS]) gives exactly that.
    assert!((0.5..=1.0).contains(&zs), "zero-shot {zs} is no better than chance");
    eprintln!("CLIP with a Hugging Face tokenizer: zero-shot top-1 {zs:.3} over 4 colour classes");
    assert!(s.get("knn_top1").is_none(), "a caption CSV has no labels for kNN: {s}");
    let model = checkpoint_tensor_shape(&hf_run.join("step-60"), "text.token_embedding.weight");
    assert_eq!(model[0], 4 + words.len() as i64, "the text tower embeds the tokenizer's vocabulary");
    for run in [&csv_run, &wds_run, &hf_run] {
        let (first, last) = (mean_loss(run, 0..10), mean_loss(run, 50..60));
        assert!(
            last < first - 0.3,
            "{}: loss did not fall: first 10 steps {first:.3}, last 10 {last:.3}",
            run.display()
        );
    }
}

#[test]
fn simclr_trains_on_an_image_folder_with_a_corrupt_file() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("folder").tap_mkdir();
    for class in ["cats", "dogs"] {
        caption_dataset(&root.join(class).tap_mkdir(), 24);
    }
    std::fs::write(root.join("dogs").join("broken.png"), b"not a png at all").unwrap();
    // A labelled test split (eval.root) with its own unreadable file.
    let test = dir.path().join("test").tap_mkdir();
    for class in ["cats", "dogs"] {
        caption_dataset(&test.join(class).tap_mkdir(), 6);
    }
    std::fs::write(test.join("cats").join("corrupt-test.jpg"), b"\xff\xd8 truncated").unwrap();
    let cfg = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../configs/simclr.yaml");
    let run_dir = dir.path().join("run");
    // What `trainer eval` must see too: the data, the model and the test split.
    let shared = [
        "data.dataset=image_folder".to_string(),
        format!("data.root={}", root.display()),
        "data.image_size=16".into(),
        "model.width=8".into(),
        "model.embed_dim=64".into(),
        format!("eval.root={}", test.display()),
        "eval.knn_k=5".into(),
    ];
    let training = [
        "data.max_bad_fraction=0.05".to_string(),
        "data.aug.randaugment_n=2".into(),
        "data.aug.autoaugment=true".into(),
        "train.global_batch=16".into(),
        "train.steps=6".into(),
        format!("checkpoint.dir={}", run_dir.display()),
    ];
    let out = run_with_sets(0, &[], &cfg, &[&shared[..], &training[..]].concat(), &[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("broken.png"), "the bad file is logged with its path: {err}");
    assert_eq!(err.matches("skipping unreadable").count(), 1, "logged once: {err}");
    assert!(err.contains("evaluation skips") && err.contains("corrupt-test.jpg"), "{err}");
    let s = summary(&run_dir);
    for key in ["knn_top1", "knn_top1_init", "knn_top1_raw_pixels"] {
        let v = s[key].as_f64().unwrap_or_else(|| panic!("summary.json lacks {key}: {s}"));
        assert!((0.0..=1.0).contains(&v), "{key}={v}");
    }
    // `trainer eval` on the checkpoint gives the same kNN figure.
    let out = run_with_sets(0, &["eval"], &cfg, &shared, &["--checkpoint", run_dir.to_str().unwrap()]);
    let e: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!((e["knn_top1"].as_f64().unwrap() - s["knn_top1"].as_f64().unwrap()).abs() < 1e-9, "{e} vs {s}");
    let last: serde_json::Value =
        serde_json::from_str(std::fs::read_to_string(run_dir.join("steps.jsonl")).unwrap().lines().last().unwrap())
            .unwrap();
    assert_eq!(last["bad_files"], 1);
    assert!(run_dir.join("step-6/model.safetensors").is_file());
    let state: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run_dir.join("step-6/state.json")).unwrap()).unwrap();
    assert_eq!(state["bad_samples"].as_array().map(Vec::len), Some(1), "the budget is checkpointed: {state}");
    // With no budget, both ranks stop at the step whose batch met the file (the count is global).
    let strict_dir = dir.path().join("strict");
    let strict = [
        "data.max_bad_fraction=0".to_string(),
        "train.global_batch=16".into(),
        "train.steps=6".into(),
        format!("checkpoint.dir={}", strict_dir.display()),
    ];
    let mut args = vec!["--config".to_string(), cfg.display().to_string()];
    for s in shared.iter().chain(&strict) {
        args.extend(["--set".to_string(), s.clone()]);
    }
    let out = run(2, &args.iter().map(String::as_str).collect::<Vec<_>>(), &[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("1 of 49 samples are unreadable") && err.contains("max_bad_fraction"), "{err}");
}

#[test]
fn multi_crop_and_asymmetric_presets_train_and_stay_exact_across_ranks() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("folder").tap_mkdir();
    for class in ["a", "b"] {
        caption_dataset(&root.join(class).tap_mkdir(), 16);
    }
    let cfg = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../configs/simclr.yaml");
    let train = |preset: &str, np: usize, name: &str| {
        let run_dir = dir.path().join(name);
        let sets = [
            "data.dataset=image_folder".to_string(),
            format!("data.root={}", root.display()),
            format!("data.augment={preset}"),
            "data.image_size=16".into(),
            "data.small_size=8".into(),
            "data.small_crops=2".into(),
            "model.width=4".into(),
            "model.embed_dim=32".into(),
            "train.global_batch=8".into(),
            "train.steps=3".into(),
            "train.threads=1".into(),
            "train.optimizer.name=sgd".into(),
            "train.optimizer.lr=0.1".into(),
            format!("checkpoint.dir={}", run_dir.display()),
        ];
        run_with_sets(np, &[], &cfg, &sets, &[]);
        run_dir.join("step-3")
    };
    for preset in ["swav", "byol", "mocov2"] {
        let one = train(preset, 0, &format!("{preset}-1"));
        let two = train(preset, 2, &format!("{preset}-2"));
        let d = max_rel_diff(&two, &one);
        assert!(d < 1e-4, "{preset}: 2 ranks differ from 1 by {d:e}");
    }
    // The presets really differ (multi-crop changes the run).
    assert!(max_rel_diff(&dir.path().join("swav-1/step-3"), &dir.path().join("mocov2-1/step-3")) > 1e-4);
}
