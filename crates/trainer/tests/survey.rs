//! The survey's methods through the real binary: each (InstDisc, Barlow Twins,
//! SwAV, MoCHi, DeepCluster, CPC) trains on 2 MPI ranks with the weights (and the
//! bank, queues, prototypes, pseudo-labels and centroids) of one rank, and the
//! stateful ones stop in the middle of an epoch on 2 ranks and resume on 1
//! with the losses of the uninterrupted run.

use crate::common::*;

/// (run name, loss, extra YAML) of each method; the fixture's config with its keys.
const METHODS: [(&str, &str, &str); 6] = [
    ("instdisc", "bank_nce", "method: {name: instdisc, negatives: 16, proximal: 0.5, bank_init: features}\n"),
    ("barlow_twins", "barlow_twins", "method: {name: barlow_twins}\n"),
    ("swav", "swav", "method: {name: swav, prototypes: 6, freeze_prototypes_steps: 1, queue_size: 16}\n"),
    (
        "mochi",
        "infonce",
        "method: {name: moco_v2, queue_size: 16, hard_negatives: 4, mix_negatives: 2, mix_query: 2}\n",
    ),
    ("deepcluster", "cross_entropy", "method: {name: deepcluster, clusters: 5, kmeans_iters: 3}\n"),
    ("cpc", "cpc", "method: {name: cpc, patch_size: 10, patch_stride: 6, context_dim: 8, temperature: 0.07}\n"),
];

/// The fixture's config for `method`, without the head keys it does not read.
fn config(fx: &Fixture, name: &str, loss: &str, extra: &str) -> std::path::PathBuf {
    let path = fx.config(name, loss, extra);
    if loss == "bank_nce" || loss == "cross_entropy" {
        // InstDisc's and DeepCluster's heads are one linear layer: they read model.proj_dim only.
        let yaml = std::fs::read_to_string(&path).unwrap().replace(", proj_hidden: 16", "");
        std::fs::write(&path, yaml).unwrap();
    }
    if loss == "cpc" {
        // CPC has no projection head.
        let yaml =
            std::fs::read_to_string(&path).unwrap().replace(", proj_dim: 8", "").replace(", proj_hidden: 16", "");
        std::fs::write(&path, yaml).unwrap();
    }
    path
}

#[test]
fn survey_methods_on_two_mpi_ranks_match_one_rank() {
    let fx = Fixture::new();
    for (method, loss, extra) in METHODS {
        let solo = config(&fx, &format!("{method}-solo"), loss, extra);
        ok(run(0, &["--config", solo.to_str().unwrap(), "--set", "train.steps=4"], &[]));
        let mpi = config(&fx, &format!("{method}-mpi2"), loss, extra);
        let out = ok(run(2, &["--config", mpi.to_str().unwrap(), "--set", "train.steps=4"], &[]));
        let err = String::from_utf8_lossy(&out.stderr);
        let d = max_rel_diff(&fx.path(&format!("{method}-mpi2/step-4")), &fx.path(&format!("{method}-solo/step-4")));
        assert!(d < 1e-4, "{method}: 2 MPI ranks differ from 1 rank by {d:e}\n{err}");
        if method == "instdisc" {
            assert!(err.contains("bank=240×8 (0.0 MiB per rank)"), "the plan line states the bank: {err}");
            assert_eq!(checkpoint_tensor_shape(&fx.path("instdisc-mpi2/step-4"), "method.bank"), vec![240, 8]);
        }
        if method == "deepcluster" {
            assert_eq!(checkpoint_tensor_shape(&fx.path("deepcluster-mpi2/step-4"), "method.pseudo_labels"), vec![240]);
        }
        if method == "mochi" {
            assert!(err.contains("mochi: hard_negatives=4 mix_negatives=2 mix_query=2"), "plan line: {err}");
        }
    }
}

/// Method `which` of [`METHODS`] trains `steps` steps straight on 1 rank, and
/// again on 2 ranks stopped after its checkpoint at step `stop` and resumed on
/// 1: the losses and the final state agree.
fn stops_on_two_ranks_and_resumes_on_one(which: usize, steps: usize, stop: usize) {
    let fx = Fixture::new();
    let (_, loss, extra) = METHODS[which];
    let steps_key = format!("train.steps={steps}");
    let straight = config(&fx, "straight", loss, extra);
    ok(run(0, &["--config", straight.to_str().unwrap(), "--set", &steps_key], &[]));
    // The same run (so the same schedule), stopped after its checkpoint at step `stop`.
    let split = config(&fx, "split", loss, extra);
    let every = format!("checkpoint.every={stop}");
    let args = ["--config", split.to_str().unwrap(), "--set", &steps_key, "--set", &every];
    let stopped = run(2, &args, &[("CONTRAST_FAULT_PANIC_AT_STEP", &(stop + 1).to_string())]);
    assert!(!stopped.status.success(), "the injected fault stops the run");
    assert_eq!(latest_step(&fx.path("split")), stop);
    ok(run(0, &[&args[..], &["--set", "train.resume=true"]].concat(), &[]));
    let (a, w) = (losses(&fx.path("split")), losses(&fx.path("straight")));
    assert_eq!(a.len(), steps, "{a:?}");
    for (k, (x, y)) in a.iter().zip(&w).enumerate() {
        assert!((x - y).abs() <= 1e-5 * y.abs(), "step {}: {x} vs {y}", k + 1);
    }
    let d = max_rel_diff(&fx.path(&format!("split/step-{steps}")), &fx.path(&format!("straight/step-{steps}")));
    assert!(d < 1e-4, "resumed state and weights differ by {d:e}");
}

#[test]
fn instdisc_stops_mid_epoch_on_two_ranks_and_resumes_on_one() {
    // 240 items at global batch 8: 30 steps an epoch, so step 3 is inside the first.
    stops_on_two_ranks_and_resumes_on_one(0, 6, 3);
}

#[test]
fn deepcluster_stops_mid_epoch_on_two_ranks_and_resumes_on_one() {
    // The second epoch starts at step 31 (k-means on 2 ranks, a fresh classifier
    // and its optimiser state); the stop after step 32 resumes inside it on 1 rank
    // with the pseudo-labels, centroids and restart step of the checkpoint.
    stops_on_two_ranks_and_resumes_on_one(4, 34, 32);
}
