//! Resumes: exact continuation (also onto another world size), torn and
//! killed checkpoint writes, refused incompatible configs, old checkpoints.

use crate::common::*;

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
fn a_fresh_run_into_an_old_directory_is_refused_unless_it_overwrites() {
    let fx = Fixture::new();
    let cfg = fx.config("reused", "ntxent", "");
    let c = cfg.to_str().unwrap();
    ok(run(
        0,
        &["--config", c, "--set", "train.steps=6", "--set", "checkpoint.every=2", "--set", "checkpoint.keep=2"],
        &[],
    ));
    let before = std::fs::read_to_string(fx.path("reused/steps.jsonl")).unwrap();
    // A new, shorter run (resume off) into the same directory: refused, nothing touched.
    let short = ["--config", c, "--set", "train.steps=3", "--set", "checkpoint.every=1"];
    let out = run(0, &short, &[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("checkpoint.dir") && err.contains("holds another run"), "{err}");
    assert!(err.contains("checkpoint.overwrite=true") && err.contains("train.resume=true"), "{err}");
    assert_eq!(std::fs::read_to_string(fx.path("reused/steps.jsonl")).unwrap(), before);
    assert_eq!(std::fs::read_to_string(fx.path("reused/latest")).unwrap().trim(), "step-6");
    assert!(fx.path("reused/evals.jsonl").exists() || !before.is_empty());
    // With checkpoint.overwrite the old run's files go first: nothing of it is mixed in.
    let mut over = short.to_vec();
    over.extend(["--set", "checkpoint.overwrite=true"]);
    ok(run(0, &over, &[]));
    assert_eq!(std::fs::read_to_string(fx.path("reused/latest")).unwrap().trim(), "step-3");
    assert!(!fx.path("reused/step-6").exists() && !fx.path("reused/step-4").exists());
    assert_eq!(losses(&fx.path("reused")).len(), 3);
    // The run's config.yaml resumes it (the overwrite happened once, at its start).
    let resolved = fx.path("reused/config.yaml");
    let resumed = ["--config", resolved.to_str().unwrap(), "--set", "train.steps=4", "--set", "train.resume=true"];
    ok(run(0, &resumed, &[]));
    assert_eq!(latest_step(&fx.path("reused")), 4);
    // Overwrite and resume contradict each other.
    let mut both = over.clone();
    both.extend(["--set", "train.resume=true"]);
    let out = run(0, &both, &[]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("checkpoint.overwrite"));
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
    assert!(
        err.contains("is not a valid checkpoint (model.safetensors is missing)") && err.contains("step-2"),
        "{err}"
    );
    assert!(err.contains("resumed from") && err.contains("at step 2"), "{err}");
    assert_eq!(std::fs::read_to_string(fx.path("torn/latest")).unwrap().trim(), "step-4");
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
    // Holding the directory's lock, it removed what the killed processes left half-written.
    let left: Vec<String> = std::fs::read_dir(&run_dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(".tmp"))
        .collect();
    assert!(left.is_empty(), "stale temporaries left: {left:?}");
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

/// A copy of a recorded run directory (`latest`, `config.yaml`, `step-3/`).
fn copy_old_run(assets: &Path, to: &Path) -> PathBuf {
    let step = to.join("step-3").tap_mkdir();
    for f in ["latest", "config.yaml"] {
        std::fs::copy(assets.join(f), to.join(f)).unwrap();
    }
    for f in ["model.safetensors", "optim.safetensors", "state.json"] {
        std::fs::copy(assets.join("step-3").join(f), step.join(f)).unwrap();
    }
    to.to_path_buf()
}

/// Checkpoints written by trainer 0.1, before the methods and encoders got
/// their own config homes (`tests/assets/checkpoints-v0.1`: a SimCLR and a
/// MoCo-v2 run of 3 steps, state.json spelling the method as `MocoV2`), resume:
/// the two steps after them log the losses 0.1 logged (1e-4 relative: the
/// recording came from another CPU), and `trainer eval` reads the run's old
/// `config.yaml`, which also lists keys its components did not read.
#[test]
fn checkpoints_written_by_version_0_1_resume_and_evaluate() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let dir = tempfile::tempdir().unwrap();
    for (name, config, extra) in [("simclr", "simclr", None), ("moco_v2", "mocov2", Some("method.queue_size=32"))] {
        let assets = root.join("crates/trainer/tests/assets/checkpoints-v0.1").join(name);
        let run_dir = copy_old_run(&assets, &dir.path().join(name));
        let mut sets = vec![
            "train.steps=5".to_string(),
            "train.global_batch=16".into(),
            "model.width=4".into(),
            "model.embed_dim=32".into(),
            "model.proj_hidden=16".into(),
            "model.proj_dim=8".into(),
            "eval.at_end=false".into(),
            "checkpoint.every=5".into(),
            format!("checkpoint.dir={}", run_dir.display()),
            "train.threads=1".into(),
            "data.workers=1".into(),
            "train.resume=true".into(),
        ];
        sets.extend(extra.map(String::from));
        let cfg = root.join(format!("configs/{config}.yaml"));
        run_with_sets(0, &[], &cfg, &sets, &[]);
        let expected: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(assets.join("expected.json")).unwrap()).unwrap();
        let got: Vec<(u64, f64)> = std::fs::read_to_string(run_dir.join("steps.jsonl"))
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
            .map(|v| (v["step"].as_u64().unwrap(), v["loss"].as_f64().unwrap()))
            .collect();
        let want: Vec<(u64, f64)> = expected["resumed_losses"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| (p[0].as_u64().unwrap(), p[1].as_f64().unwrap()))
            .collect();
        assert_eq!(got.iter().map(|g| g.0).collect::<Vec<_>>(), [4, 5], "{name}: steps after the checkpoint");
        for ((_, g), (step, w)) in got.iter().zip(&want) {
            assert!((g - w).abs() <= 1e-4 * w.abs(), "{name}: step {step} loss {g} against 0.1's {w}");
        }
        let state: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(run_dir.join("step-5/state.json")).unwrap()).unwrap();
        assert_eq!(state["method"], name, "state.json spells the method as the config does");
    }
    // The old run directory's config.yaml (no --config): evaluation reads it.
    let assets = root.join("crates/trainer/tests/assets/checkpoints-v0.1/simclr");
    let old = copy_old_run(&assets, &dir.path().join("simclr-eval"));
    let ck = old.join("step-3").display().to_string();
    let args = ["eval", "--checkpoint", &ck, "--set", "eval.max_train=200", "--set", "eval.max_test=100"];
    let out = ok(run(0, &args, &[]));
    assert!(String::from_utf8_lossy(&out.stdout).contains("knn_top1"), "{}", String::from_utf8_lossy(&out.stdout));
}
