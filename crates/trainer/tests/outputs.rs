//! What a run writes: logs, evaluations, the best checkpoint, export and
//! embed, the summary, TensorBoard events and comparisons.

use crate::common::*;

#[test]
fn log_lines_name_their_rank_plain_and_json() {
    let fx = Fixture::new();
    let cfg = fx.config("logs", "ntxent", "");
    // Three runs into one directory: each starts over.
    let base = [
        "--config",
        cfg.to_str().unwrap(),
        "--set",
        "train.steps=3",
        "--set",
        "checkpoint.every=0",
        "--set",
        "checkpoint.overwrite=true",
    ];
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
            // The step line's figures are fields of their own, numbers as numbers.
            let f = &v["fields"];
            assert!(f["step"].as_u64().is_some() && f["steps"].as_u64() == Some(3), "{line}");
            for key in ["loss", "lr", "samples_per_s", "data_wait_ms"] {
                assert!(f[key].as_f64().is_some_and(f64::is_finite), "{key}: {line}");
            }
            steps += 1;
        }
    }
    assert_eq!(ranks.into_iter().collect::<Vec<_>>(), vec![0, 1]);
    assert!(steps >= 3, "{err}");
    assert!(!err.contains("ETA"), "no progress bar without a terminal");
    // On a terminal (a pty from `script`), rank 0 draws a progress bar, and log lines still come through.
    if Command::new("script").arg("--version").output().is_ok_and(|o| o.status.success()) {
        let cmd = format!(
            "{BIN} --config {} --set train.steps=6 --set checkpoint.every=0 --set checkpoint.overwrite=true",
            cfg.display()
        );
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
    use contrast_comm::Collective;
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
            // Each rank holds a slice of the memory; the top k of the slices merge.
            let (m, t) = (tensor(&xm), tensor(&xt));
            let per = ym.len().div_ceil(p);
            let (lo, hi) = ((c.rank() * per).min(ym.len()), ((c.rank() + 1) * per).min(ym.len()));
            let (m, ym) = (m.narrow(0, lo as i64, (hi - lo) as i64), ym[lo..hi].to_vec());
            let knn = knn_top1(&c, &m, &ym, &t, &yt, 5, 0.1, 4);
            let f = Features { train: (m, ym), test: (t, yt.clone()), classes: 4 };
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
    embed_writes_one_file_per_rank_that_concatenate_to_one_ranks(&fx, &run_dir);
}

/// `trainer embed` of the test split on 1 rank (one file) and on 2 ranks (one
/// part per rank and an index): the parts concatenate to the one file, with
/// labels and source names; a rerun with another rank count removes the other
/// run's files under that name.
fn embed_writes_one_file_per_rank_that_concatenate_to_one_ranks(fx: &Fixture, run_dir: &std::path::Path) {
    let embed = |np: usize, f: &std::path::Path| {
        let a = ["embed", "--checkpoint", run_dir.to_str().unwrap(), "--out", f.to_str().unwrap(), "--split", "test"];
        ok(run(np, &a, &[]));
    };
    let get = |f: &std::path::Path, n: &str| {
        Tensor::read_safetensors(f).unwrap().into_iter().find(|(k, _)| k == n).unwrap().1
    };
    // The names are in the sidecar the header names, one {"row", "path"} per line.
    let paths_of = |f: &std::path::Path| -> Vec<String> {
        let meta = safetensors_metadata(f);
        assert!(meta.get("paths").is_none(), "no paths in the header");
        let sidecar = f.with_file_name(meta["paths_file"].as_str().unwrap());
        let first = meta["first_row"].as_str().unwrap().parse::<u64>().unwrap();
        let text = std::fs::read_to_string(sidecar).unwrap();
        let rows: Vec<serde_json::Value> = text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
        assert!(rows.iter().enumerate().all(|(k, r)| r["row"].as_u64() == Some(first + k as u64)));
        rows.iter().map(|r| r["path"].as_str().unwrap().to_string()).collect()
    };
    let (one, two) = (fx.path("emb1.safetensors"), fx.path("emb2.safetensors"));
    embed(0, &one);
    embed(2, &two);
    assert_eq!(get(&one, "embeddings").size(), vec![60, 32]);
    let labels: Vec<i64> = Vec::try_from(get(&one, "labels")).unwrap();
    assert_eq!(labels, (0..60).map(|i| i % 10).collect::<Vec<i64>>());
    let paths = paths_of(&one);
    assert_eq!(paths.len(), 60);
    assert!(paths[7].ends_with("t10k-images-idx3-ubyte#7"), "{}", paths[7]);
    // Two ranks: two parts of 30 rows, listed by the index; no file under the name itself.
    assert!(!two.exists());
    let index: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fx.path("emb2.safetensors.index.json")).unwrap()).unwrap();
    assert_eq!((index["rows"].as_u64(), index["dim"].as_u64()), (Some(60), Some(32)));
    let parts: Vec<std::path::PathBuf> =
        index["parts"].as_array().unwrap().iter().map(|p| fx.path(p["file"].as_str().unwrap())).collect();
    assert_eq!(parts, [fx.path("emb2-00001-of-00002.safetensors"), fx.path("emb2-00002-of-00002.safetensors")]);
    assert_eq!(index["parts"][1]["first_row"].as_u64(), Some(30));
    assert_eq!(safetensors_metadata(&parts[1])["first_row"].as_str(), Some("30"));
    let joined = Tensor::cat(&[get(&parts[0], "embeddings"), get(&parts[1], "embeddings")], 0);
    assert!((joined - get(&one, "embeddings")).abs().max().double_value(&[]) < 1e-5);
    let labels2: Vec<i64> =
        Vec::try_from(Tensor::cat(&[get(&parts[0], "labels"), get(&parts[1], "labels")], 0)).unwrap();
    assert_eq!(labels2, labels);
    assert_eq!([paths_of(&parts[0]), paths_of(&parts[1])].concat(), paths);
    assert_eq!(index["parts"][0]["paths"].as_str(), Some("emb2-00001-of-00002.safetensors.paths.jsonl"));
    // A rerun under the same name with one rank leaves one file, and the parts, their sidecars and the index go.
    embed(0, &two);
    assert!(two.exists() && !parts[0].exists() && !parts[1].exists());
    assert!(fx.path("emb2.safetensors.paths.jsonl").exists());
    assert!(!fx.path("emb2-00001-of-00002.safetensors.paths.jsonl").exists());
    assert!(!fx.path("emb2.safetensors.index.json").exists());
    // A mistyped directory is refused before any embedding is computed.
    let missing = fx.path("no/such/dir/e.safetensors");
    let out = run(0, &["embed", "--checkpoint", run_dir.to_str().unwrap(), "--out", missing.to_str().unwrap()], &[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("/no/such/dir does not exist"), "{err}");
    let left: Vec<_> = std::fs::read_dir(fx.path("")).unwrap().flatten().map(|e| e.file_name()).collect();
    assert!(!left.iter().any(|n| n.to_string_lossy().contains(".partial")), "{left:?}");
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
    let want = [
        ".lock",
        "config.yaml",
        "evals.jsonl",
        "latest",
        "plot.png",
        "step-3",
        "step-4",
        "steps.jsonl",
        "summary.json",
    ];
    assert_eq!(names, want);
    // Each step line reports the rank's page faults and peak RSS (the allocator's regression signal).
    for line in std::fs::read_to_string(fx.path("full/steps.jsonl")).unwrap().lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        assert!(v["minor_faults"].is_u64(), "{line}");
        assert!(v["peak_rss_bytes"].as_u64().unwrap() > 1 << 20, "{line}");
        assert!(v["phase_s"]["backward"].as_f64().unwrap() > 0.0, "{line}");
        assert!(v["data_cpu_s"].as_f64().unwrap() >= 0.0, "{line}");
    }
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
    // `trainer config` fails on a device the host lacks, as training would before step 1.
    if tch::Cuda::device_count() == 0 {
        let out = run(0, &["config", "--config", cfg.to_str().unwrap(), "--set", "train.device=cuda"], &[]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && err.contains("train.device=cuda"), "{err}");
    }
}

#[test]
fn jemalloc_serves_the_process_with_freed_pages_kept() {
    // The options symbol is linked in (a dropped symbol would leave jemalloc's default, 10 s decay).
    assert_eq!(trainer::alloc::dirty_decay_ms(), Some(-1));
    let before = trainer::alloc::ProcessCounters::now();
    let buffers: Vec<tch::Tensor> = (0..2).map(|_| tch::Tensor::ones([64 << 20], tch::kind::FLOAT_CPU)).collect();
    drop(buffers);
    trainer::alloc::release();
    // A 256 MiB buffer allocated again after a release is served; the peak counter covers it.
    let again = tch::Tensor::ones([64 << 20], tch::kind::FLOAT_CPU);
    assert_eq!(again.sum(tch::Kind::Double).double_value(&[]), (64u64 << 20) as f64);
    let after = trainer::alloc::ProcessCounters::now();
    assert!(after.peak_rss_bytes >= before.peak_rss_bytes.max(256 << 20), "{before:?} {after:?}");
    assert!(after.minor_faults > before.minor_faults, "{before:?} {after:?}");
}

/// `trainer` alone prints its help with examples on stdout and exits 0; `trainer
/// eval --help` names every key `trainer eval` prints; `RUST_LOG` filters the
/// logs where `CONTRAST_LOG` is unset, and `CONTRAST_LOG` wins over it.
#[test]
fn the_command_line_helps_and_honours_rust_log() {
    let bare = ok(run(0, &[], &[]));
    let help = String::from_utf8_lossy(&bare.stdout);
    assert!(help.contains("Examples:") && help.contains("launch/mpirun.sh -n 2 trainer --config"), "{help}");
    let fx = Fixture::new();
    let cfg = fx.config("help", "ntxent", "");
    let c = cfg.to_str().unwrap();
    let quiet = ok(run(0, &["--config", c, "--set", "train.steps=1"], &[("RUST_LOG", "warn")]));
    let err = String::from_utf8_lossy(&quiet.stderr);
    assert!(!err.contains(" INFO "), "RUST_LOG=warn: {err}");
    let sets = ["--config", c, "--set", "train.steps=2", "--set", "train.resume=true"];
    let loud = ok(run(0, &sets, &[("RUST_LOG", "warn"), ("CONTRAST_LOG", "info")]));
    assert!(String::from_utf8_lossy(&loud.stderr).contains(" INFO "), "CONTRAST_LOG wins");
    let eval_help = String::from_utf8_lossy(&ok(run(0, &["eval", "--help"], &[])).stdout).into_owned();
    let printed = ok(run(0, &["eval", "--checkpoint", fx.path("help").to_str().unwrap()], &[]));
    let json: serde_json::Value = serde_json::from_slice(&printed.stdout).unwrap();
    for key in json.as_object().unwrap().keys() {
        assert!(eval_help.contains(&format!("`{key}`")), "`trainer eval --help` does not name {key}");
    }
}

/// `trainer compare` shows the keys that differ between runs (defaults
/// included, the run directory left out) and each run's figures.
#[test]
fn compare_tables_the_keys_that_differ_and_the_figures() {
    let fx = Fixture::new();
    for (name, lr) in [("lr-a", "0.1"), ("lr-b", "0.05")] {
        let cfg = fx.config(name, "ntxent", "");
        let set = format!("train.optimizer.lr={lr}");
        ok(run(0, &["--config", cfg.to_str().unwrap(), "--set", "train.steps=2", "--set", &set], &[]));
    }
    let (a, b) = (fx.path("lr-a"), fx.path("lr-b"));
    let out = ok(run(0, &["compare", a.to_str().unwrap(), b.to_str().unwrap()], &[]));
    let table = String::from_utf8_lossy(&out.stdout).into_owned();
    let lines: Vec<&str> = table.lines().collect();
    assert_eq!(lines.len(), 4, "{table}");
    assert!(lines[0].starts_with("| run | train.optimizer.lr | steps | final_loss"), "{table}");
    assert!(!table.contains("global_batch") && !table.contains("checkpoint.dir"), "only what differs: {table}");
    assert!(lines[2].contains("| 0.1 | 2 |") && lines[3].contains("| 0.05 | 2 |"), "{table}");
    let missing = run(0, &["compare", a.to_str().unwrap(), fx.path("none").to_str().unwrap()], &[]);
    assert!(String::from_utf8_lossy(&missing.stderr).contains("not a run directory"), "{missing:?}");
}

/// `tools/to_tensorboard.py` turns runs into TensorBoard event files, one
/// subfolder per run (a suffix when two runs share a name), read back here
/// with TensorBoard's own reader: the losses are the run's, step by step.
#[test]
fn runs_convert_to_tensorboard_events_that_read_back() {
    let (root, Some(python)) = (repo_root(), venv_python()) else { return };
    let fx = Fixture::new();
    for name in ["a/run", "b/run"] {
        std::fs::create_dir_all(fx.path(name).parent().unwrap()).unwrap();
        let cfg = fx.config(name, "ntxent", "");
        ok(run(0, &["--config", cfg.to_str().unwrap(), "--set", "train.steps=4", "--set", "eval.at_end=true"], &[]));
    }
    let (a, b, tb) = (fx.path("a/run"), fx.path("b/run"), fx.path("tb"));
    let script = root.join("tools/to_tensorboard.py");
    let args = [script.to_str().unwrap(), a.to_str().unwrap(), b.to_str().unwrap(), "--out", tb.to_str().unwrap()];
    let out = Command::new(&python).args(args).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let read = "import json, sys\n\
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator\n\
        out = {}\n\
        for d in sys.argv[1:]:\n\
        \x20   acc = EventAccumulator(d); acc.Reload()\n\
        \x20   out[d] = {t: [[e.step, e.value] for e in acc.Scalars(t)] for t in acc.Tags()['scalars']}\n\
        print(json.dumps(out))\n";
    let dirs = [tb.join("run"), tb.join("run-2")];
    let back = Command::new(&python).args(["-c", read]).args(&dirs).output().unwrap();
    assert!(back.status.success(), "{}", String::from_utf8_lossy(&back.stderr));
    let events: serde_json::Value = serde_json::from_slice(&back.stdout).unwrap();
    for (dir, run_dir) in dirs.iter().zip([&a, &b]) {
        let tags = &events[dir.to_str().unwrap()];
        let loss: Vec<f64> = tags["train/loss"].as_array().unwrap().iter().map(|p| p[1].as_f64().unwrap()).collect();
        let want = losses(run_dir);
        assert_eq!(loss.len(), want.len());
        for (x, y) in loss.iter().zip(&want) {
            assert!((x - y).abs() <= 1e-6 * y.abs(), "{x} vs {y}");
        }
        assert_eq!(tags["train/loss"][3][0].as_u64(), Some(4), "logged at its step");
        assert!(tags["eval/knn_top1"].as_array().is_some_and(|v| !v.is_empty()), "{tags}");
        assert!(tags["phase/backward"].as_array().is_some(), "{tags}");
    }
}
