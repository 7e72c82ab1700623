//! Population-based augmentation through the real binary: members on 1, 2 and
//! 4 ranks (several per rank, one per rank, two ranks each) save the same
//! weights and rounds; a loser takes the best member's state; the schedule
//! found replays; a run stopped with uneven members resumes on another world
//! size with the losses of the uninterrupted run; bad input is refused.

use crate::common::*;
use std::path::Path;

const PBA: &str = "method: {name: pba, population: 2, interval: 3}\n";

fn json(path: &Path) -> serde_json::Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap()
}

/// The fixture's config with PBA's keys and a held-out split of its 240 training images.
fn pba_config(fx: &Fixture, name: &str) -> std::path::PathBuf {
    let path = fx.config(name, "ntxent", PBA);
    let yaml = std::fs::read_to_string(&path)
        .unwrap()
        .replace("eval: {at_end: false, knn_k: 5}", "eval: {at_end: true, knn_k: 5, max_train: 100, max_test: 40}");
    std::fs::write(&path, yaml).unwrap();
    path
}

#[test]
fn pba_members_on_one_two_and_four_ranks_agree_and_the_schedule_replays() {
    let fx = Fixture::new();
    let steps = "train.steps=7";
    for (name, np) in [("solo", 0), ("mpi2", 2), ("mpi4", 4)] {
        let cfg = pba_config(&fx, name);
        let out = ok(run(np, &["--config", cfg.to_str().unwrap(), "--set", steps], &[]));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("PBA round at step 3") && err.contains("PBA round at step 6"), "{err}");
        let placed = ["2 members per rank", "1 rank(s) per member", "2 rank(s) per member"][np / 2];
        assert!(err.contains(&format!("method=PBA population=2 ({placed}) interval=3")), "{err}");
    }
    for name in ["mpi2", "mpi4"] {
        for k in 0..2 {
            let (a, b) = (fx.path(&format!("{name}/member-{k}/step-7")), fx.path(&format!("solo/member-{k}/step-7")));
            let d = max_rel_diff(&a, &b);
            assert!(d < 1e-4, "{name}: member {k} differs from 1 rank's by {d:e}");
        }
        let (p, q) = (json(&fx.path(&format!("{name}/population.json"))), json(&fx.path("solo/population.json")));
        assert_eq!(p["schedules"], q["schedules"], "{name}");
        assert_eq!(p["best"], q["best"], "{name}");
    }
    let pop = json(&fx.path("solo/population.json"));
    let rounds = pop["rounds"].as_array().unwrap();
    assert_eq!(rounds.len(), 2, "{pop}");
    for r in rounds {
        let (best, loser) = (r["best"].as_u64().unwrap() as usize, r["losers"][0].as_u64().unwrap() as usize);
        assert_ne!(best, loser);
        // The loser took the best member's weights at the round's step (its checkpoint there is the copy).
        let step = r["step"].as_u64().unwrap();
        let at = |k: usize| fx.path(&format!("solo/member-{k}/step-{step}"));
        assert_eq!(max_rel_diff(&at(loser), &at(best)), 0.0, "round {r}");
    }
    // The last round's loser carries the best member's schedule up to the round, then its own phase.
    let last = &rounds[1];
    let (best, loser) = (last["best"].as_u64().unwrap() as usize, last["losers"][0].as_u64().unwrap() as usize);
    let (sb, sl) = (pop["schedules"][best].as_array().unwrap(), pop["schedules"][loser].as_array().unwrap());
    assert_eq!(&sl[..sb.len().min(sl.len())], &sb[..sb.len().min(sl.len())], "{pop}");
    assert!(sl.iter().all(|p| p["step"].as_u64().unwrap() <= 6));
    // The summary is the best member's, evaluated on the test split.
    let s = summary(&fx.path("solo"));
    let k = s["best_member"].as_u64().unwrap() as usize;
    assert_eq!(pop["best"].as_u64(), Some(k as u64));
    assert!(s["knn_top1"].as_f64().is_some(), "{s}");
    let member = losses(&fx.path(&format!("solo/member-{k}")));
    assert!((s["final_loss"].as_f64().unwrap() - member[6]).abs() < 1e-12, "{s}");
    // The schedule found replays in a normal run.
    let schedule = fx.path("solo/randaugment_schedule.json");
    assert_eq!(json(&schedule), pop["schedules"][k]);
    let replay = fx.config("replay", "ntxent", "");
    let set = format!("data.aug.randaugment_schedule={}", schedule.display());
    ok(run(0, &["--config", replay.to_str().unwrap(), "--set", steps, "--set", &set], &[]));
    // A second fresh run into the directory is refused; a resume must keep the
    // population, and a finished one has nothing to train.
    let cfg = fx.path("solo.yaml");
    let done = ok(run(0, &["--config", cfg.to_str().unwrap(), "--set", steps, "--set", "train.resume=true"], &[]));
    assert!(String::from_utf8_lossy(&done.stderr).contains("nothing to train"), "{done:?}");
    assert_eq!(summary(&fx.path("solo")), s, "the summary stays as it was");
    let again = run(0, &["--config", cfg.to_str().unwrap(), "--set", steps], &[]);
    assert!(String::from_utf8_lossy(&again.stderr).contains("holds another run"), "{again:?}");
    let sets = ["--set", "train.resume=true", "--set", "method.population=4", "--set", "train.steps=9"];
    let changed = run(0, &[&["--config", cfg.to_str().unwrap()][..], &sets].concat(), &[]);
    let err = String::from_utf8_lossy(&changed.stderr);
    assert!(!changed.status.success() && err.contains("`method.population` was 2 and is 4"), "{err}");
}

#[test]
fn pba_refuses_what_it_cannot_place_or_hold_out_before_training() {
    let fx = Fixture::new();
    let cfg = pba_config(&fx, "bad");
    let c = cfg.to_str().unwrap();
    for (np, set, says) in [
        (2, "method.population=3", "method.population"),
        (0, "eval.max_test=0", "eval.max_test"),
        (0, "eval.max_train=300", "together at most its 240 items"),
        (0, "method.interval=0", "method.interval"),
    ] {
        let out = run(np, &["--config", c, "--set", set], &[]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && err.contains(says), "{set}: {err}");
        assert!(!fx.path("bad/member-0/steps.jsonl").exists(), "{set}: nothing trained");
    }
}

#[test]
fn pba_stopped_with_uneven_members_on_one_rank_resumes_on_two() {
    let fx = Fixture::new();
    let steps = "train.steps=8";
    let straight = pba_config(&fx, "straight");
    ok(run(0, &["--config", straight.to_str().unwrap(), "--set", steps], &[]));
    // Member 0 stops after its checkpoint at step 4, inside the stretch to 6; member 1 is still at 3.
    let split = pba_config(&fx, "split");
    let args = ["--config", split.to_str().unwrap(), "--set", steps, "--set", "checkpoint.every=4"];
    let stopped = run(0, &args, &[("CONTRAST_FAULT_PANIC_AT_STEP", "5")]);
    assert!(!stopped.status.success(), "the injected fault stops the run");
    assert_eq!((latest_step(&fx.path("split/member-0")), latest_step(&fx.path("split/member-1"))), (4, 3));
    ok(run(2, &[&args[..], &["--set", "train.resume=true"]].concat(), &[]));
    for k in 0..2 {
        let (a, w) =
            (losses(&fx.path(&format!("split/member-{k}"))), losses(&fx.path(&format!("straight/member-{k}"))));
        assert_eq!(a.len(), 8, "member {k}: {a:?}");
        for (s, (x, y)) in a.iter().zip(&w).enumerate() {
            assert!((x - y).abs() <= 1e-5 * y.abs(), "member {k} step {}: {x} vs {y}", s + 1);
        }
        let (a, b) = (fx.path(&format!("split/member-{k}/step-8")), fx.path(&format!("straight/member-{k}/step-8")));
        let d = max_rel_diff(&a, &b);
        assert!(d < 1e-4, "member {k}: resumed weights differ by {d:e}");
    }
    assert_eq!(
        json(&fx.path("split/population.json"))["schedules"],
        json(&fx.path("straight/population.json"))["schedules"]
    );
}
