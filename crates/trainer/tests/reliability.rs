//! Reliability round 2: ranks agree on the config, a run directory belongs to
//! one run, and the bounds of docs/reliability.md.

use crate::common::*;

fn args_of(cfg: &Path, sets: &[&str]) -> Vec<String> {
    let mut a = vec!["--config".to_string(), cfg.display().to_string()];
    for s in sets {
        a.extend(["--set".to_string(), s.to_string()]);
    }
    a
}

#[test]
fn ranks_that_resolve_different_configs_refuse_before_any_other_collective() {
    let fx = Fixture::new();
    let cfg = fx.config("differ", "ntxent", "");
    // A silent difference (temperature), one that corrupted the heap (model size),
    // one that aborted in MPI (batch) and one that hung (steps).
    for (set, key, a, b) in [
        ("loss.temperature=0.5", "loss.temperature", "0.2", "0.5"),
        ("model.width=8", "model.width", "4", "8"),
        ("train.global_batch=16", "train.global_batch", "8", "16"),
        ("train.steps=5", "train.steps", "3", "5"),
    ] {
        let out = run_mpmd(&[args_of(&cfg, &[]), args_of(&cfg, &[set])]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{set}: {err}");
        let want = format!("`{key}` is {a} on rank 0 but {b} on rank 1");
        assert!(err.contains(&want), "{set}: wanted {want:?} in\n{err}");
        assert!(!fx.path("differ/steps.jsonl").exists(), "{set}: a step ran");
    }
    // Keys that may differ per node do not stop the job.
    let out = run_mpmd(&[args_of(&cfg, &[]), args_of(&cfg, &["data.workers=2", "train.threads=2"])]);
    ok(out);
    // `trainer eval` under mpirun checks the same way.
    let ckpt = fx.path("differ").display().to_string();
    let eval = |sets: &[&str]| {
        let mut a = vec!["eval".to_string(), "--checkpoint".into(), ckpt.clone()];
        a.extend(args_of(&cfg, sets));
        a
    };
    let out = run_mpmd(&[eval(&[]), eval(&["eval.knn_k=7"])]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("`eval.knn_k` is 5 on rank 0 but 7 on rank 1"), "{err}");
    // And `trainer embed`.
    let out_file = fx.path("emb.safetensors").display().to_string();
    let embed = |sets: &[&str]| {
        let mut a = vec!["embed".to_string(), "--checkpoint".into(), ckpt.clone(), "--out".into(), out_file.clone()];
        a.extend(args_of(&cfg, sets));
        a
    };
    let out = run_mpmd(&[embed(&["seed=4"]), embed(&[])]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("`seed` is 4 on rank 0 but 3 on rank 1"), "{err}");
    assert!(!fx.path("emb.safetensors").exists());
    let text = trainer::agree::describe_difference("a: 1\nb: 2\n", "a: 1\nb: 3\nc: 4\n", 3, 2);
    assert!(text.contains("`b` is 2 on rank 0 but 3 on rank 3 (1 more key(s) differ); 2 ranks differ"), "{text}");
}

#[test]
fn collectives_with_unequal_counts_are_an_error_when_checked() {
    let out = run_example_mpi("unequal_counts", 2, &[(contrast_comm::CHECK_COUNTS_VAR, "1")]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("all_reduce_sum: the ranks passed different element counts"), "{err}");
}

#[test]
fn a_second_run_into_a_directory_in_use_is_refused_and_a_killed_ones_leftovers_go() {
    let fx = Fixture::new();
    let cfg = fx.config("locked", "ntxent", "");
    let args = args_of(&cfg, &["train.steps=40", "train.resume=true", "checkpoint.every=1"]);
    let log = fx.path("first.log");
    let mut first = Command::new(BIN)
        .args(&args)
        .env("CONTRAST_FAULT_STEP_SLEEP_MS", "150")
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    wait_for_steps(&mut first, &fx.path("locked"), 1, &log);
    // A job submitted twice: refused at start, naming the directory; the first run is untouched.
    let out = run(0, &args.iter().map(String::as_str).collect::<Vec<_>>(), &[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("checkpoint.dir") && err.contains("in use by another run") && err.contains("pid"), "{err}");
    assert!(first.try_wait().unwrap().is_none(), "the first run ended");
    first.kill().unwrap();
    first.wait().unwrap();
    // kill -9 releases the lock; what a dead writer left behind goes, and the resume goes on.
    std::fs::create_dir(fx.path("locked/.step-99.12345.tmp")).unwrap();
    std::fs::write(fx.path("locked/.latest.12345.tmp"), "step-99").unwrap();
    let mut short = args.clone();
    short.extend(["--set".into(), format!("train.steps={}", latest_step(&fx.path("locked")) + 1)]);
    ok(run(0, &short.iter().map(String::as_str).collect::<Vec<_>>(), &[]));
    assert!(!fx.path("locked/.step-99.12345.tmp").exists() && !fx.path("locked/.latest.12345.tmp").exists());
}

#[test]
fn the_demo_command_run_twice_resumes_then_says_it_is_done() {
    let fx = Fixture::new();
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let sets = [
        format!("data.root={}", fx.path("data").display()),
        format!("checkpoint.dir={}", fx.path("demo").display()),
        "train.steps=2".into(),
        "train.global_batch=16".into(),
        "model.width=4".into(),
        "model.embed_dim=64".into(),
        "eval.at_end=false".into(),
        "metrics.enabled=false".into(),
    ];
    let demo = || {
        let mut c = Command::new(root.join("launch/demo.sh"));
        c.args(sets.iter().flat_map(|s| ["--set".to_string(), s.clone()]))
            .env("CONTRAST_DEMO_SKIP_SETUP", "1")
            .env("OMPI_MCA_btl_vader_single_copy_mechanism", "none");
        c.output().unwrap()
    };
    ok(demo());
    let losses_before = losses(&fx.path("demo"));
    let out = ok(demo());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("nothing to train") && err.contains("at step 2"), "{err}");
    assert_eq!(losses(&fx.path("demo")), losses_before, "the second run changed the first one's records");
}

#[test]
fn empty_paths_and_outputs_inside_a_checkpoint_are_refused() {
    let fx = Fixture::new();
    let cfg = fx.config("paths", "ntxent", "");
    for (set, key) in [("checkpoint.dir=' '", "checkpoint.dir"), ("data.root=''", "data.root")] {
        let out = run(0, &["config", "--config", cfg.to_str().unwrap(), "--set", set], &[]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && err.contains(key) && err.contains("empty"), "{set}: {err}");
    }
    ok(run(0, &["--config", cfg.to_str().unwrap()], &[]));
    let step = fx.path("paths/step-3");
    let inside = step.join("emb.safetensors");
    let out = run(0, &["export", "--checkpoint", step.to_str().unwrap(), "--out", inside.to_str().unwrap()], &[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("inside the checkpoint directory"), "{err}");
    let args = ["embed", "--checkpoint", step.to_str().unwrap(), "--out", inside.to_str().unwrap()];
    let out = run(0, &args, &[]);
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("inside the checkpoint directory"));
    assert!(!inside.exists());
    ok(run(
        0,
        &["export", "--checkpoint", step.to_str().unwrap(), "--out", fx.path("w.safetensors").to_str().unwrap()],
        &[],
    ));
}

#[test]
fn a_resume_skips_invalid_checkpoints_with_a_warning_and_says_when_nothing_is_left_to_train() {
    let fx = Fixture::new();
    let cfg = fx.config("valid", "ntxent", "");
    let base = ["train.steps=4", "checkpoint.every=1", "checkpoint.keep=0"];
    ok(run(0, &args_of(&cfg, &base).iter().map(String::as_str).collect::<Vec<_>>(), &[]));
    let dir = fx.path("valid");
    // step-4: a truncated model file; step-3: state.json of another step; step-2: a model of
    // another width (the shapes do not match); `latest` points outside the run directory.
    let model = dir.join("step-4/model.safetensors");
    let len = std::fs::metadata(&model).unwrap().len();
    std::fs::OpenOptions::new().write(true).open(&model).unwrap().set_len(len - 100).unwrap();
    let state = std::fs::read_to_string(dir.join("step-3/state.json")).unwrap();
    std::fs::write(dir.join("step-3/state.json"), state.replace("\"step\": 3", "\"step\": 7")).unwrap();
    let wide = fx.config("wide", "ntxent", "");
    ok(run(
        0,
        &args_of(&wide, &["train.steps=2", "model.width=8"]).iter().map(String::as_str).collect::<Vec<_>>(),
        &[],
    ));
    std::fs::copy(fx.path("wide/step-2/model.safetensors"), dir.join("step-2/model.safetensors")).unwrap();
    std::fs::write(dir.join("latest"), "../wide/step-2\n").unwrap();
    let resume = args_of(&cfg, &["train.steps=5", "checkpoint.every=1", "checkpoint.keep=0", "train.resume=true"]);
    let out = ok(run(0, &resume.iter().map(String::as_str).collect::<Vec<_>>(), &[]));
    let err = String::from_utf8_lossy(&out.stderr);
    for why in ["not a step-<N> directory of this run directory", "truncated", "its name says 3", "has shape"] {
        assert!(err.contains(why), "no warning with {why:?}:\n{err}");
    }
    assert!(err.contains("resumed from") && err.contains("step-1") && err.contains("at step 1"), "{err}");
    // Resumed at the last step: said so, nothing retrained or re-evaluated.
    let before = std::fs::read_to_string(dir.join("steps.jsonl")).unwrap();
    let out = ok(run(0, &resume.iter().map(String::as_str).collect::<Vec<_>>(), &[]));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("nothing to train") && err.contains("at step 5") && !err.contains("done:"), "{err}");
    assert_eq!(std::fs::read_to_string(dir.join("steps.jsonl")).unwrap(), before);
}

#[test]
fn the_dataset_fingerprint_follows_content_not_where_the_files_are_staged() {
    let fx = Fixture::new();
    let (a, b) = (fx.path("staged-a"), fx.path("staged-b"));
    crate::encoders::image_folder(&a, 8);
    let cfg = fx.config("moved", "ntxent", "");
    let sets = |root: &Path, more: &[&str]| {
        let mut s = vec![
            "data.dataset=image_folder".to_string(),
            format!("data.root={}", root.display()),
            "data.image_size=32".into(),
            "eval.at_end=false".into(),
        ];
        s.extend(more.iter().map(|m| m.to_string()));
        s
    };
    let go = |sets: Vec<String>| {
        let sets: Vec<&str> = sets.iter().map(String::as_str).collect();
        run(0, &args_of(&cfg, &sets).iter().map(String::as_str).collect::<Vec<_>>(), &[])
    };
    ok(go(sets(&a, &["train.steps=2"])));
    // The same files staged at another path: the resume goes on.
    Command::new("cp").arg("-r").arg(&a).arg(&b).status().unwrap();
    ok(go(sets(&b, &["train.steps=3", "train.resume=true"])));
    // Two ranks that stage the data at different paths agree too (MPMD).
    let mpmd = |root: &Path| {
        let mut v = vec!["--config".to_string(), cfg.display().to_string()];
        for s in sets(root, &["train.steps=4", "train.resume=true"]) {
            v.extend(["--set".to_string(), s]);
        }
        v
    };
    ok(run_mpmd(&[mpmd(&a), mpmd(&b)]));
    // The same names with other content (a file grew): refused, naming data.root.
    let f = b.join("cat/3.png");
    let mut bytes = std::fs::read(&f).unwrap();
    bytes.extend([0u8; 16]);
    std::fs::write(&f, bytes).unwrap();
    let out = go(sets(&b, &["train.steps=5", "train.resume=true"]));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("data.root") && err.contains("fingerprint"), "{err}");
    // A checkpoint of the older form (no version) still resumes, with a warning naming the change.
    let state = fx.path("moved/step-4/state.json");
    let mut v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&state).unwrap()).unwrap();
    v.as_object_mut().unwrap().remove("dataset_fingerprint_version");
    v["dataset_fingerprint"] = "0123456789abcdef".into();
    std::fs::write(&state, serde_json::to_string(&v).unwrap()).unwrap();
    let out = ok(go(sets(&b, &["train.steps=5", "train.resume=true"])));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("fingerprint is of form 1") && err.contains("relative to data.root"), "{err}");
}

#[test]
fn hostile_files_in_a_dataset_are_bad_samples_that_name_themselves() {
    use contrast_data::hostile;
    let fx = Fixture::new();
    let root = fx.path("hostile");
    crate::encoders::image_folder(&root, 8);
    hostile::fifo(&root.join("cat/fifo.png")).unwrap();
    hostile::link_to_dev_zero(&root.join("cat/zero.png")).unwrap();
    hostile::sparse(&root.join("dog/huge.png"), 1 << 30).unwrap();
    std::fs::write(root.join("dog/bomb.png"), hostile::png_bomb(60_000, 60_000)).unwrap();
    let cfg = fx.config("hostile-run", "ntxent", "");
    let sets = [
        "data.dataset=image_folder".to_string(),
        format!("data.root={}", root.display()),
        "data.image_size=32".into(),
        "data.max_bad_fraction=0.5".into(),
        "data.max_image_bytes=1000000".into(),
        "train.steps=6".into(),
        "eval.at_end=false".into(),
    ];
    let sets: Vec<&str> = sets.iter().map(String::as_str).collect();
    let t0 = std::time::Instant::now();
    let out = ok(run(0, &args_of(&cfg, &sets).iter().map(String::as_str).collect::<Vec<_>>(), &[]));
    assert!(t0.elapsed().as_secs() < 60, "the run took {:?}", t0.elapsed());
    let err = String::from_utf8_lossy(&out.stderr);
    for (file, why) in [
        ("fifo.png", "not a regular file"),
        ("zero.png", "not a regular file"),
        ("huge.png", "data.max_image_bytes"),
        ("bomb.png", "data.max_image_pixels"),
    ] {
        assert!(err.lines().any(|l| l.contains(file) && l.contains(why)), "{file}: {why} not logged:\n{err}");
    }
    let last = std::fs::read_to_string(fx.path("hostile-run/steps.jsonl")).unwrap();
    let last: serde_json::Value = serde_json::from_str(last.lines().last().unwrap()).unwrap();
    assert_eq!(last["bad_files"].as_u64(), Some(4), "{last}");
}

/// A GET of /metrics: Some(true) when it answered 200, Some(false) when the
/// connection was closed or refused without an answer.
fn try_scrape(port: u16) -> bool {
    use std::io::{Read, Write};
    let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) else { return false };
    let _ = s.set_read_timeout(Some(std::time::Duration::from_secs(2)));
    if s.write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\n\r\n").is_err() {
        return false;
    }
    let mut text = String::new();
    let _ = s.read_to_string(&mut text);
    text.starts_with("HTTP/1.1 200") && text.contains("contrast_step")
}

/// Poll until /metrics answers, for at most `secs` seconds; the seconds it took.
fn answers_within(port: u16, secs: u64) -> Option<f64> {
    let t0 = std::time::Instant::now();
    while t0.elapsed().as_secs() < secs {
        if try_scrape(port) {
            return Some(t0.elapsed().as_secs_f64());
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    None
}

#[test]
fn the_metrics_endpoint_survives_idle_floods_and_descriptor_exhaustion() {
    let fx = Fixture::new();
    let cfg = fx.config("endpoint", "ntxent", "");
    let start = |cap: usize| {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let mut args = vec![BIN.to_string()];
        args.extend(args_of(
            &cfg,
            &[
                "train.steps=100000",
                "checkpoint.every=0",
                &format!("metrics.listen=127.0.0.1:{port}"),
                &format!("metrics.max_connections={cap}"),
                &format!("checkpoint.dir={}", fx.path(&format!("endpoint-{cap}")).display()),
            ],
        ));
        // 64 descriptors: a few hundred connections exhaust them.
        let script = format!("ulimit -n 64; exec \"$@\"");
        let child = Command::new("sh")
            .args(["-c", &script, "sh"])
            .args(&args)
            .env("CONTRAST_FAULT_STEP_SLEEP_MS", "50")
            .stderr(std::fs::File::create(fx.path(&format!("endpoint-{cap}.log"))).unwrap())
            .spawn()
            .unwrap();
        let log = fx.path(&format!("endpoint-{cap}.log"));
        let answered = answers_within(port, 30).is_some();
        assert!(answered, "the endpoint never answered:\n{}", std::fs::read_to_string(&log).unwrap());
        (child, port)
    };
    // More idle connections than the cap: the endpoint still answers, once the
    // header timeout (5 s) has closed them.
    let (mut job, port) = start(4);
    let idle: Vec<_> = (0..12).map(|_| std::net::TcpStream::connect(("127.0.0.1", port)).unwrap()).collect();
    let took = answers_within(port, 15).expect("no answer with idle connections held");
    assert!(took < 8.0, "took {took} s");
    drop(idle);
    job.kill().unwrap();
    job.wait().unwrap();
    // Without a cap worth the name, a flood exhausts the descriptors: accept fails,
    // backs off, and the endpoint answers again once the flood ends.
    let (mut job, port) = start(10_000);
    let flood: Vec<_> = (0..300).filter_map(|_| std::net::TcpStream::connect(("127.0.0.1", port)).ok()).collect();
    assert!(flood.len() > 64, "only {} connections", flood.len());
    std::thread::sleep(std::time::Duration::from_millis(500));
    drop(flood);
    let took = answers_within(port, 20).expect("the endpoint did not recover after the flood");
    assert!(job.try_wait().unwrap().is_none(), "the run ended");
    job.kill().unwrap();
    job.wait().unwrap();
    let log = std::fs::read_to_string(fx.path("endpoint-10000.log")).unwrap();
    assert!(log.contains("metrics: accept failed"), "no descriptor exhaustion happened:\n{log}");
    eprintln!("recovered {took:.1} s after the flood");
}

/// Wait for `job` at most `secs` seconds; on a timeout, kill it (after SIGCONT
/// to `stopped`) and fail.
fn wait_at_most(
    job: &mut std::process::Child,
    secs: u64,
    stopped: Option<u32>,
    log: &Path,
) -> std::process::ExitStatus {
    let t0 = std::time::Instant::now();
    loop {
        if let Some(status) = job.try_wait().unwrap() {
            return status;
        }
        if t0.elapsed().as_secs() >= secs {
            if let Some(pid) = stopped {
                Command::new("kill").args(["-CONT", &pid.to_string()]).status().unwrap();
            }
            job.kill().unwrap();
            job.wait().unwrap();
            panic!("the job still ran after {secs} s:\n{}", std::fs::read_to_string(log).unwrap_or_default());
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

#[test]
fn a_rank_that_stops_answering_ends_the_job_within_the_timeout() {
    if !is_open_mpi() {
        eprintln!("skipped: finds ranks by OMPI_COMM_WORLD_RANK (Open MPI)");
        return;
    }
    let fx = Fixture::new();
    let cfg = fx.config("watched", "ntxent", "");
    let (run_dir, log) = (fx.path("watched"), fx.path("watched.log"));
    let mut job = spawn_mpirun(&cfg, &["train.steps=100000", "checkpoint.every=0", "train.timeout_s=4"], &log);
    wait_for_steps(&mut job, &run_dir, 3, &log);
    let pid = rank_pid(&cfg, 1).expect("rank 1's process");
    Command::new("kill").args(["-STOP", &pid.to_string()]).status().unwrap();
    let t0 = std::time::Instant::now();
    let status = wait_at_most(&mut job, 30, Some(pid), &log);
    let took = t0.elapsed().as_secs_f64();
    let _ = Command::new("kill").args(["-CONT", &pid.to_string()]).status();
    let err = std::fs::read_to_string(&log).unwrap();
    assert_eq!(status.code(), Some(trainer::watchdog::EXIT_TIMEOUT), "{status}:\n{err}");
    assert!(took < 4.0 + 6.0, "the job ended {took:.1} s after rank 1 stopped");
    assert!(err.contains("watchdog: rank 0 has spent") && err.contains("train.timeout_s = 4 s"), "{err}");
    assert!(err.contains(" at step "), "{err}");
    eprintln!("the job ended {took:.1} s after rank 1 stopped");
}

#[test]
fn a_stop_signal_to_a_rank_stuck_waiting_for_data_stops_the_job_at_the_last_step() {
    if !is_open_mpi() {
        eprintln!("skipped: finds ranks by OMPI_COMM_WORLD_RANK (Open MPI)");
        return;
    }
    let fx = Fixture::new();
    let cfg = fx.config("stuck", "ntxent", "");
    let (run_dir, log) = (fx.path("stuck"), fx.path("stuck.log"));
    // Rank 1's read for step 4 never returns (a hung filesystem).
    let stall = [("CONTRAST_FAULT_DATA_STALL", "1:4")];
    let mut job = spawn_mpirun_with(&cfg, &["train.steps=30", "checkpoint.every=0"], &log, &stall);
    wait_for_steps(&mut job, &run_dir, 3, &log);
    std::thread::sleep(std::time::Duration::from_millis(500));
    let pid = rank_pid(&cfg, 1).expect("rank 1's process");
    let t0 = std::time::Instant::now();
    Command::new("kill").args(["-TERM", &pid.to_string()]).status().unwrap();
    let status = wait_at_most(&mut job, 30, None, &log);
    let err = std::fs::read_to_string(&log).unwrap();
    assert!(status.success(), "{status}:\n{err}");
    assert!(t0.elapsed().as_secs_f64() < 5.0, "took {:?}", t0.elapsed());
    assert_eq!(latest_step(&run_dir), 3, "{err}");
    assert!(err.contains("stop signal on 1 of 2 ranks") && err.contains("after step 3/30"), "{err}");
    assert_eq!(summary(&run_dir)["stopped_by_signal"].as_bool(), Some(true));
}

#[test]
fn one_stop_request_delivered_twice_counts_once_and_sighup_stops_cleanly() {
    let fx = Fixture::new();
    let cfg = fx.config("hup", "ntxent", "");
    let (run_dir, log) = (fx.path("hup"), fx.path("hup.log"));
    let mut job = Command::new(BIN)
        .args(["--config", cfg.to_str().unwrap(), "--set", "train.steps=100000", "--set", "checkpoint.every=0"])
        .env("CONTRAST_FAULT_STEP_SLEEP_MS", "1000")
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    wait_for_steps(&mut job, &run_dir, 1, &log);
    // Directly and through a launcher's forwarding, a few ms apart: one request.
    let pid = job.id().to_string();
    Command::new("kill").args(["-HUP", &pid]).status().unwrap();
    std::thread::sleep(std::time::Duration::from_millis(50));
    Command::new("kill").args(["-HUP", &pid]).status().unwrap();
    let status = wait_at_most(&mut job, 30, None, &log);
    let err = std::fs::read_to_string(&log).unwrap();
    assert!(status.success(), "{status}:\n{err}");
    assert!(err.contains("received SIGHUP"), "{err}");
    let s = summary(&run_dir);
    assert_eq!(s["stopped_by_signal"].as_bool(), Some(true));
    assert!(latest_step(&run_dir) >= 1);
    // The rule: the same signal within 1 s is the same request; later or different, an exit.
    use trainer::signals::exits_at_once;
    let ms = std::time::Duration::from_millis;
    assert!(!exits_at_once(0, ms(0), 15) && !exits_at_once(15, ms(50), 15));
    assert!(exits_at_once(15, ms(1500), 15) && exits_at_once(15, ms(50), 2));
}

#[test]
fn every_config_number_is_finite_and_bounded_and_non_finite_weights_never_reach_a_checkpoint() {
    let fx = Fixture::new();
    let cfg = fx.config("bounded", "ntxent", "");
    let clip = fx.config("bounded-clip", "clip", "");
    let moco = fx.config("bounded-moco", "infonce", MOCO);
    let cases: [(&Path, &str, &str, &str); 11] = [
        (&cfg, "train.optimizer.weight_decay=.nan", "train.optimizer.weight_decay", "finite"),
        (&cfg, "train.optimizer.lr=.inf", "train.optimizer.lr", "finite"),
        (&cfg, "train.grad_clip=.inf", "train.grad_clip", "finite"),
        (&cfg, "loss.temperature=.nan", "loss.temperature", "finite"),
        (&moco, "method.momentum=.nan", "method.momentum", "finite"),
        (&cfg, "data.aug.brightness=-1", "data.aug.brightness", "non-negative"),
        (&cfg, "data.aug.crop_ratio=[1, 1000]", "data.aug.crop_ratio", "at most 100"),
        (&cfg, "model.proj_dim=100000000", "model.proj_dim", "bytes"),
        (&clip, "model.text.context=1000000", "model.text.context", "bytes"),
        (&moco, "method.queue_size=1073741824", "method.queue_size", "bytes"),
        (&cfg, "model.width=100000", "model.width", "bytes"),
    ];
    for (file, set, key, why) in cases {
        let out = run(0, &["config", "--config", file.to_str().unwrap(), "--set", set], &[]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && err.contains(key) && err.contains(why), "{set}: {err}");
    }
    // A warm-up longer than the run stays allowed (the schedule is cut short).
    ok(run(0, &["config", "--config", cfg.to_str().unwrap(), "--set", "train.schedule.warmup_steps=1000"], &[]));
    // A step that overflows the weights (finite gradients, an absurd learning rate) stops
    // the run before the checkpoint of that step is written.
    let sets = ["train.optimizer.lr=1e300", "checkpoint.every=1"];
    let out = run(0, &args_of(&cfg, &sets).iter().map(String::as_str).collect::<Vec<_>>(), &[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("step 1 wrote non-finite weights"), "{err}");
    assert!(!fx.path("bounded/step-1").exists() && !fx.path("bounded/latest").exists(), "{err}");
    // Evaluation's cost follows the classes present: labels are remapped to those seen.
    let (mut a, mut b) = (vec![1_000_000, 7, -1, 7], vec![42, 1_000_000]);
    assert_eq!(trainer::eval::remap_labels(&mut a, &mut b), 3);
    assert_eq!((a, b), (vec![2, 0, -1, 0], vec![1, 2]));
}

#[test]
fn a_filesystem_that_refuses_the_lock_is_named_with_what_to_do() {
    // A shim that makes every flock fail as on a mount without lock support.
    let fx = Fixture::new();
    let (src, lib) = (fx.path("nolock.c"), fx.path("libnolock.so"));
    std::fs::write(
        &src,
        "#include <errno.h>\nint flock(int fd, int op) { (void)fd; (void)op; errno = ENOLCK; return -1; }\n",
    )
    .unwrap();
    let built = Command::new("cc").args(["-shared", "-fPIC", "-o"]).arg(&lib).arg(&src).status();
    if !built.is_ok_and(|s| s.success()) {
        eprintln!("skipped: no C compiler to build the flock shim");
        return;
    }
    let cfg = fx.config("nolock", "ntxent", "");
    let out = run(0, &["--config", cfg.to_str().unwrap()], &[("LD_PRELOAD", lib.to_str().unwrap())]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("the filesystem refused to lock") && err.contains("docs/reliability.md"), "{err}");
    assert!(err.contains("checkpoint.lock=false"), "{err}");
    // With checkpoint.lock=false the run goes on, warned.
    let out = ok(run(
        0,
        &["--config", cfg.to_str().unwrap(), "--set", "checkpoint.lock=false"],
        &[("LD_PRELOAD", lib.to_str().unwrap())],
    ));
    assert!(String::from_utf8_lossy(&out.stderr).contains("nothing stops a second run"));
}
