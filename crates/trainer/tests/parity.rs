//! Exactness through real MPI: P ranks × B equals 1 rank × P·B for every loss
//! family, the sharded queue, multi-crop and two hosts over TCP.

use crate::common::*;

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
    // The gradient cache (chunks of 3 rows: 3 + 3 + 2 on one rank, 3 + 1 on each of two) trains
    // the same weights as the plain step.
    for (name, np) in [("ntxent", 1), ("ntxent", 2), ("clip", 2)] {
        let run_name = format!("{name}-micro{np}");
        let cfg = fx.config(&run_name, name, "");
        let out = ok(run(np, &["--config", cfg.to_str().unwrap(), "--set", "train.micro_batch=3"], &[]));
        let log = String::from_utf8_lossy(&out.stderr);
        let d = max_rel_diff(&fx.path(&format!("{run_name}/step-3")), &fx.path(&format!("{name}-solo/step-3")));
        assert!(d < 1e-4, "{name}: micro-batched at {np} ranks differs from the plain step by {d:e}\n{log}");
    }
    // The all-reduce overlapped with backward (MPI_Iallreduce from the gradient hooks, which
    // `auto` leaves off on one host), plain and with the gradient cache.
    for (name, np, micro) in [("ntxent", 2, "0"), ("clip", 4, "0"), ("ntxent", 2, "3")] {
        let run_name = format!("{name}-overlap{np}-{micro}");
        let cfg = fx.config(&run_name, name, "");
        let sets = ["--set", "train.overlap=true", "--set", &format!("train.micro_batch={micro}")];
        let mut args = vec!["--config", cfg.to_str().unwrap()];
        args.extend_from_slice(&sets);
        ok(run(np, &args, &[]));
        let d = max_rel_diff(&fx.path(&format!("{run_name}/step-3")), &fx.path(&format!("{name}-solo/step-3")));
        assert!(d < 1e-4, "{name}: overlapped at {np} ranks (micro {micro}) differs from 1 rank by {d:e}");
    }
    // bf16 autocast (the encoders' products in bf16, the head in fp32) trains close to fp32,
    // not equal to it: the plan says so, the first loss agrees to bf16's precision.
    let cfg = fx.config("ntxent-bf16", "ntxent", "");
    let out = ok(run(2, &["--config", cfg.to_str().unwrap(), "--set", "train.precision=bf16"], &[]));
    assert!(String::from_utf8_lossy(&out.stderr).contains("precision=bf16"));
    let (bf16, fp32) = (losses(&fx.path("ntxent-bf16")), losses(&fx.path("ntxent-solo")));
    assert!(bf16.iter().all(|l| l.is_finite()), "{bf16:?}");
    assert!((bf16[0] - fp32[0]).abs() <= 2e-2 * fp32[0].abs(), "bf16 {bf16:?} against fp32 {fp32:?}");
    assert!(max_rel_diff(&fx.path("ntxent-bf16/step-3"), &fx.path("ntxent-solo/step-3")) > 1e-6);
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
        assert_eq!(text.lines().filter(|l| l.ends_with(" ok")).count(), 20, "{text}");
        assert!(text.contains(&format!("P={np}")));
    }
}

#[test]
fn multi_crop_and_asymmetric_presets_train_and_stay_exact_across_ranks() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("folder").tap_mkdir();
    for class in ["a", "b"] {
        caption_dataset(&root.join(class).tap_mkdir(), 16);
    }
    // The shipped SimCLR config without its `data.aug` block, which only the simclr preset reads.
    let shipped =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../../configs/simclr.yaml")).unwrap();
    let mut in_aug = false;
    let lines = shipped.lines().filter(|l| {
        in_aug = l.starts_with("  aug:") || (in_aug && l.starts_with("    "));
        !in_aug
    });
    let cfg = dir.path().join("simclr-no-aug.yaml");
    std::fs::write(&cfg, lines.collect::<Vec<_>>().join("\n")).unwrap();
    let train = |preset: &str, np: usize, name: &str| {
        let run_dir = dir.path().join(name);
        let mut sets = vec![
            "data.dataset=image_folder".to_string(),
            format!("data.root={}", root.display()),
            format!("data.augment={preset}"),
            "data.image_size=16".into(),
            "model.width=4".into(),
            "model.embed_dim=32".into(),
            "train.global_batch=8".into(),
            "train.steps=3".into(),
            "train.threads=1".into(),
            "train.optimizer.name=sgd".into(),
            "train.optimizer.lr=0.1".into(),
            format!("checkpoint.dir={}", run_dir.display()),
        ];
        if preset == "swav" {
            sets.extend(["data.small_size=8".to_string(), "data.small_crops=2".into()]);
        }
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

#[test]
fn split_sub_communicators_work_through_real_mpi() {
    let out = run_example_mpi("split", 4, &[(contrast_comm::CHECK_COUNTS_VAR, "1")]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}\n{}", String::from_utf8_lossy(&out.stderr));
    for want in [
        "rank 0 of 4: group rank 0 of 2, group sum 2, group last 2, world 4",
        "rank 1 of 4: group rank 0 of 2, group sum 4, group last 3, world 4",
        "rank 2 of 4: group rank 1 of 2, group sum 2, group last 2, world 4",
        "rank 3 of 4: group rank 1 of 2, group sum 4, group last 3, world 4",
    ] {
        assert!(text.contains(want), "{want:?} not in\n{text}");
    }
}
