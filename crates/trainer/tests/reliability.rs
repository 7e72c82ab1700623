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
    let text = trainer::agree::describe_difference("a: 1\nb: 2\n", "a: 1\nb: 3\nc: 4\n", 3, 2);
    assert!(text.contains("`b` is 2 on rank 0 but 3 on rank 3 (1 more key(s) differ); 2 ranks differ"), "{text}");
}

#[test]
fn collectives_with_unequal_counts_are_an_error_when_checked() {
    let bin = example("unequal_counts");
    let mut cmd = Command::new("mpirun");
    if is_open_mpi() {
        cmd.arg("--oversubscribe");
    }
    let out = cmd
        .args(["-n", "2"])
        .arg(bin)
        .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        .env(contrast_comm::CHECK_COUNTS_VAR, "1")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("all_reduce_sum: the ranks passed different element counts"), "{err}");
}
