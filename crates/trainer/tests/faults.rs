//! Faults: panics, kill -9, stop signals, Slurm requeue, bad input, ranks that disagree.

use crate::common::*;

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

#[test]
fn a_second_stop_signal_exits_at_once() {
    let fx = Fixture::new();
    let cfg = fx.config("twice", "ntxent", "");
    let (run_dir, log) = (fx.path("twice"), fx.path("twice.log"));
    let mut job = Command::new(BIN)
        .args(["--config", cfg.to_str().unwrap(), "--set", "train.steps=100000", "--set", "checkpoint.every=0"])
        .env("CONTRAST_FAULT_STEP_SLEEP_MS", "4000")
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    wait_for_steps(&mut job, &run_dir, 1, &log);
    // Both arrive inside one 4 s step: the first asks for a stop at its end; the second,
    // later than the 1 s in which a repeat counts as the same request, ends the process.
    let pid = job.id().to_string();
    Command::new("kill").args(["-INT", &pid]).status().unwrap();
    std::thread::sleep(std::time::Duration::from_millis(1300));
    let sent = std::time::Instant::now();
    Command::new("kill").args(["-INT", &pid]).status().unwrap();
    let status = job.wait().unwrap();
    assert_eq!(status.code(), Some(128 + 2), "{}", std::fs::read_to_string(&log).unwrap());
    assert!(sent.elapsed().as_millis() < 1000, "the second signal waited for the step");
    assert_eq!(latest_step(&run_dir), 0, "no checkpoint: the operator chose not to wait");
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
        (0, vec!["--set".into(), "data.mix=mixup".into()], "data.mix"),
        (0, vec!["--set".into(), "data.text.eda_alpha=0.1".into()], "data.text.synonyms"),
        (0, vec!["--set".into(), "data.augment=byol".into()], "RGB preset"),
        (0, vec!["--set".into(), "data.text.tokenizer=/no/tokenizer.json".into()], "data.text.tokenizer"),
        (0, vec!["--set".into(), "eval.dataset=image_folder".into()], "eval.dataset"),
    ];
    for (i, (np, extra, needle)) in cases.into_iter().enumerate() {
        let name = format!("bad{i}");
        // Mixing and caption augmentation are refused for CLIP; they are keys of its config.
        let loss = if i == 6 || i == 7 { "clip" } else { "ntxent" };
        let cfg = fx.config(&name, loss, "");
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
