//! What a run serves to Prometheus: every rank's endpoint, the discovery
//! file, the textfile, the evaluation gauges and the histograms' ranks.

use crate::common::*;

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
    // Rank 0 could not bind: the discovery file lists rank 1's address alone.
    let (targets, _) = discovery_file(&run_dir);
    assert_eq!(targets, vec![format!("127.0.0.1:{}", base + 1)]);
    // The textfile of each rank parses too (node_exporter's collector reads it), without
    // the process_* series node_exporter exports itself.
    for rank in 0..2 {
        let text = std::fs::read_to_string(fx.path(&format!("prom/contrast-rank{rank}.prom"))).unwrap();
        assert!(!text.contains("process_"), "{text}");
        let parsed = prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_string()))).unwrap();
        assert!(value(&parsed, "contrast_step", &[("rank", &rank.to_string())]).unwrap() >= 2.0);
    }
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
    // Every series the shipped Grafana dashboard plots is one the endpoint serves (the
    // evaluation's only once an evaluation ran, which this run does not), and its
    // queries are scoped by the job and instance variables at the rate interval.
    let dash =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../../launch/grafana-dashboard.json"));
    let dash = dash.unwrap();
    let served: std::collections::HashSet<&str> = m.samples.iter().map(|s| s.metric.as_str()).collect();
    for word in dash.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
        let base = word.trim_end_matches("_sum").trim_end_matches("_count");
        let after_an_evaluation = word == "contrast_eval_accuracy";
        if (word.starts_with("contrast_") || word.starts_with("process_")) && !after_an_evaluation {
            assert!(served.contains(word) || served.contains(base), "the dashboard plots {word}, which is not served");
        }
    }
    let board: serde_json::Value = serde_json::from_str(&dash).unwrap();
    let exprs: Vec<&str> = board["panels"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|p| p["targets"].as_array().unwrap().iter().map(|t| t["expr"].as_str().unwrap()))
        .collect();
    assert!(exprs.len() >= 19, "{exprs:?}");
    for e in exprs {
        assert!(e.contains(r#"job=~"$job", instance=~"$instance""#) && !e.contains("[1m]"), "{e}");
    }
    // What runs, how far it goes, and when it last stepped.
    let info = m.samples.iter().find(|s| s.metric == "contrast_run_info").expect("contrast_run_info");
    for (label, want) in [("method", "simclr"), ("loss", "ntxent"), ("encoder", "convnet"), ("world_size", "2")] {
        assert_eq!(info.labels.get(label), Some(want), "{label}");
    }
    assert_eq!(info.labels.get("run_id").map(str::len), Some(16));
    assert_eq!(value(&m, "contrast_steps_target", &one), Some(100000.0));
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs_f64();
    let last = value(&m, "contrast_last_step_timestamp_seconds", &one).unwrap();
    assert!(last <= now && now - last < 600.0, "{last} against {now}");
    // The run ended: its textfiles went with it.
    assert!(!fx.path("prom/contrast-rank0.prom").exists() && !fx.path("prom/contrast-rank1.prom").exists());
    assert!(!run_dir.join("prometheus-targets.json").exists(), "the discovery file goes with the run");
    drop(busy);
}

/// Evaluations reach the metrics as `contrast_eval_accuracy{metric}` and
/// `contrast_eval_step`, in the textfile at once; the textfile goes with the metrics.
#[test]
fn evaluations_reach_the_metrics_and_the_textfile_goes_at_the_end() {
    let dir = tempfile::tempdir().unwrap();
    let m = trainer::metrics::Metrics::new(3, 10).unwrap().with_textfile(dir.path().to_path_buf(), 3, 1000).unwrap();
    m.observe_eval(40, &[("knn_top1", Some(0.75)), ("linear_top1", Some(0.8)), ("zero_shot_top1", None)]).unwrap();
    let path = dir.path().join("contrast-rank3.prom");
    let text = std::fs::read_to_string(&path).unwrap();
    let parsed = prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_string()))).unwrap();
    let rank = ("rank", "3");
    assert_eq!(value(&parsed, "contrast_eval_accuracy", &[rank, ("metric", "knn_top1")]), Some(0.75));
    assert_eq!(value(&parsed, "contrast_eval_accuracy", &[rank, ("metric", "linear_top1")]), Some(0.8));
    assert_eq!(value(&parsed, "contrast_eval_accuracy", &[rank, ("metric", "zero_shot_top1")]), None);
    assert_eq!(value(&parsed, "contrast_eval_step", &[rank]), Some(40.0));
    assert!(!text.contains("process_"), "{text}");
    drop(m);
    assert!(!path.exists(), "the textfile is removed with the metrics");
}

/// `metrics.histograms: rank0`: a rank other than 0 exports no phase histograms.
#[test]
fn phase_histograms_can_be_left_to_rank_0() {
    let times = trainer::metrics::StepTimes { seconds: [0.01; 8] };
    let figures = |step| trainer::metrics::StepFigures {
        step,
        loss: 1.0,
        lr: 0.1,
        samples_per_second: 10.0,
        samples: 8,
        bad_samples: 0,
        embedding_std: 0.1,
        grad_norm: 1.0,
        temperature: 0.2,
        logit_scale: None,
        queue_fill: None,
    };
    for on in [true, false] {
        let mut m = trainer::metrics::Metrics::new(1, 10).unwrap().with_histograms(on);
        m.observe(&figures(1), &times).unwrap();
        let text = m.encode();
        assert_eq!(text.contains("contrast_step_phase_seconds_bucket"), on, "{text}");
        assert!(text.contains("contrast_loss{rank=\"1\"} 1"), "{text}");
    }
    let fx = Fixture::new();
    let cfg = fx.config("hist", "ntxent", "");
    let out = ok(run(0, &["config", "--config", cfg.to_str().unwrap(), "--set", "metrics.histograms=rank0"], &[]));
    assert!(out.status.success());
    let bad = run(0, &["config", "--config", cfg.to_str().unwrap(), "--set", "metrics.histograms=some"], &[]);
    assert!(String::from_utf8_lossy(&bad.stderr).contains("histograms"), "{bad:?}");
}

/// The targets and labels of `run_dir/prometheus-targets.json`, checked to be
/// Prometheus' `file_sd` form: a list of `{"targets": [...], "labels": {...}}`.
fn discovery_file(run_dir: &Path) -> (Vec<String>, serde_json::Map<String, serde_json::Value>) {
    let text = std::fs::read_to_string(run_dir.join("prometheus-targets.json")).unwrap();
    let groups: serde_json::Value = serde_json::from_str(&text).unwrap();
    let [group] = groups.as_array().unwrap().as_slice() else { panic!("one group: {text}") };
    let targets = group["targets"].as_array().unwrap().iter().map(|t| t.as_str().unwrap().to_string()).collect();
    let labels = group["labels"].as_object().unwrap().clone();
    assert!(labels.values().all(|v| v.is_string()), "{text}");
    (targets, labels)
}

/// `metrics.listen` with port 0: every rank binds a free port, and rank 0's
/// `prometheus-targets.json` lists them in rank order, labelled with the run,
/// so Prometheus finds and scrapes each rank there; the file goes when the run
/// ends. A rank listening on every interface is listed by its host's name.
#[test]
fn port_0_binds_free_ports_that_the_discovery_file_lists() {
    if !is_open_mpi() {
        eprintln!("skipped: spawns Open MPI's mpirun");
        return;
    }
    let fx = Fixture::new();
    let cfg = fx.config("sd", "ntxent", "");
    let sets = ["train.steps=100000", "checkpoint.every=0", "metrics.listen=127.0.0.1:0"];
    let (run_dir, log) = (fx.path("sd"), fx.path("sd.log"));
    let mut job = spawn_mpirun(&cfg, &sets, &log);
    wait_for_steps(&mut job, &run_dir, 3, &log);
    let (targets, labels) = discovery_file(&run_dir);
    assert_eq!(labels["contrast_method"], "simclr");
    let run_id = labels["contrast_run_id"].as_str().unwrap().to_string();
    assert_eq!(targets.len(), 2, "{targets:?}");
    for (rank, target) in targets.iter().enumerate() {
        let port: u16 = target.strip_prefix("127.0.0.1:").and_then(|p| p.parse().ok()).expect(target);
        assert!(port > 0);
        let m = scrape(port).unwrap();
        assert!(value(&m, "contrast_step", &[("rank", &rank.to_string())]).is_some(), "{target} is rank {rank}'s");
        let info = m.samples.iter().find(|s| s.metric == "contrast_run_info").unwrap();
        assert_eq!(info.labels.get("run_id"), Some(run_id.as_str()));
    }
    Command::new("kill").args(["-USR1", &job.id().to_string()]).status().unwrap();
    assert!(job.wait().unwrap().success(), "{}", std::fs::read_to_string(&log).unwrap());
    assert!(!run_dir.join("prometheus-targets.json").exists(), "the discovery file goes with the run");
    // A kill -9 leaves the file: the next run into the directory, fresh or
    // resumed, removes it once it holds the lock (nobody serves those ports).
    let stale = fx.path("stale");
    std::fs::create_dir_all(&stale).unwrap();
    std::fs::write(stale.join("prometheus-targets.json"), r#"[{"targets": ["127.0.0.1:1"], "labels": {}}]"#).unwrap();
    let sets = ["train.steps=1", "metrics.enabled=false", "checkpoint.dir"];
    let dir = format!("{}={}", sets[2], stale.display());
    ok(run(0, &["--config", cfg.to_str().unwrap(), "--set", sets[0], "--set", sets[1], "--set", &dir], &[]));
    assert!(!stale.join("prometheus-targets.json").exists(), "a dead run's discovery file goes");
    // Every interface: the host's name, which other machines resolve.
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap();
    let any = trainer::metrics::scrape_target("0.0.0.0:9400".parse().unwrap());
    assert_eq!(any, format!("{}:9400", host.trim()));
    assert_eq!(trainer::metrics::scrape_target("[::1]:9400".parse().unwrap()), "[::1]:9400");
}
