//! The text methods through the binary, on a corpus the test writes: SimCSE
//! and Quick-Thought on 2 MPI ranks match 1 rank; evaluation reports kNN by
//! label, the bag-of-words baseline, and alignment and uniformity over adjacent
//! sentences, whitened alike on 1 and 2 ranks; `trainer embed` embeds
//! sentences; bad corpora and bad keys fail before training, naming the file or key.

use crate::common::*;
use std::path::{Path, PathBuf};

/// Labels of the test corpus and the words that mark them.
const TOPICS: [(&str, [&str; 4]); 4] = [
    ("food", ["bread", "soup", "cheese", "apple"]),
    ("law", ["judge", "court", "lawyer", "jury"]),
    ("sea", ["ship", "wave", "sailor", "harbour"]),
    ("code", ["compiler", "kernel", "bug", "unix"]),
];

/// `quotes` quotes of 4 sentences each, `label<TAB>quote<TAB>sentence`, cycling over the topics.
fn corpus(path: &Path, quotes: usize, salt: usize) {
    let mut text = String::new();
    for q in 0..quotes {
        let (label, words) = TOPICS[q % 4];
        for s in 0..4 {
            let w = words[(q + s + salt) % 4];
            let other = words[(q * 3 + s) % 4];
            text.push_str(&format!("{label}\t{label}/{q}\tThe {w} saw {s} {other} and a {w} at dawn number {q}.\n"));
        }
    }
    std::fs::write(path, text).unwrap();
}

struct Text {
    dir: tempfile::TempDir,
}

impl Text {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        corpus(&dir.path().join("train.tsv"), 24, 0);
        corpus(&dir.path().join("test.tsv"), 8, 1);
        Self { dir }
    }

    fn path(&self, p: &str) -> PathBuf {
        self.dir.path().join(p)
    }

    /// A small exactly comparable run of `method` (SGD, no batch statistics).
    fn config(&self, name: &str, method: &str, loss: &str) -> PathBuf {
        let yaml = format!(
            "seed: 3\n\
             data: {{dataset: lines, root: {train}, workers: 1, prefetch: 2}}\n\
             model: {{proj_dim: 8, text: {{width: 16, layers: 1, heads: 2, context: 24, causal: false, pool: mean, dropout: 0.1}}}}\n\
             method: {{name: {method}}}\n\
             loss: {{name: {loss}, temperature: {t}}}\n\
             train: {{global_batch: 8, steps: 4, threads: 1, log_every: 1,\n\
                      optimizer: {{name: sgd, lr: 0.1, momentum: 0.9, weight_decay: 0.0001}},\n\
                      schedule: {{warmup_steps: 1}}}}\n\
             checkpoint: {{dir: {run}, every: 0, keep: 0}}\n\
             eval: {{at_end: true, root: {test}, knn_k: 5, linear_probe_steps: 20}}\n",
            train = self.path("train.tsv").display(),
            test = self.path("test.tsv").display(),
            run = self.path(name).display(),
            // Quick-Thought scores by the unnormalised inner product: at the paper's temperature 1.
            t = if method == "quick_thought" { 1.0 } else { 0.1 },
        );
        let f = self.path(&format!("{name}.yaml"));
        std::fs::write(&f, yaml).unwrap();
        f
    }
}

#[test]
fn text_methods_on_two_mpi_ranks_match_one_rank_and_evaluate_sentences() {
    let t = Text::new();
    for (method, loss) in [("simcse", "infonce"), ("quick_thought", "infonce")] {
        let solo = t.config(&format!("{method}-solo"), method, loss);
        let out = ok(run(0, &["--config", solo.to_str().unwrap()], &[]));
        let mpi = t.config(&format!("{method}-mpi2"), method, loss);
        ok(run(2, &["--config", mpi.to_str().unwrap()], &[]));
        let d = max_rel_diff(&t.path(&format!("{method}-mpi2/step-4")), &t.path(&format!("{method}-solo/step-4")));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(d < 1e-4, "{method}: 2 MPI ranks differ from 1 rank by {d:e}\n{err}");
        let s = summary(&t.path(&format!("{method}-solo")));
        for key in ["knn_top1", "knn_top1_init", "knn_top1_bag_of_words", "linear_top1", "alignment", "uniformity"] {
            assert!(s[key].as_f64().is_some_and(f64::is_finite), "{method}: summary.json lacks {key}: {s}");
        }
        assert!(s.get("knn_top1_raw_pixels").is_none(), "sentences have no pixels: {s}");
        assert!(err.contains("bag of words"), "{err}");
    }
    // Quick-Thought's items are the 72 sentences followed by one of their quote.
    let err = String::from_utf8_lossy(
        &ok(run(
            0,
            &[
                "--config",
                t.config("qt-plan", "quick_thought", "infonce").to_str().unwrap(),
                "--set",
                "train.steps=1",
                "--set",
                "eval.at_end=false",
            ],
            &[],
        ))
        .stderr,
    )
    .to_string();
    assert!(err.contains("negatives_per_anchor=7"), "{err}");
}

#[test]
fn whitened_evaluation_and_embedding_agree_across_ranks() {
    let t = Text::new();
    let cfg = t.config("simcse", "simcse", "infonce");
    ok(run(0, &["--config", cfg.to_str().unwrap(), "--set", "eval.at_end=false"], &[]));
    let ckpt = t.path("simcse/step-4");
    let eval = |np: usize, sets: &[&str]| {
        let mut args = vec!["eval", "--config", cfg.to_str().unwrap(), "--checkpoint", ckpt.to_str().unwrap()];
        sets.iter().for_each(|s| args.extend(["--set", s]));
        let out = ok(run(np, &args, &[]));
        serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()
    };
    let (plain, one, two) = (
        eval(0, &[]),
        eval(0, &["eval.whiten=true", "eval.whiten_dim=4"]),
        eval(2, &["eval.whiten=true", "eval.whiten_dim=4"]),
    );
    for key in ["knn_top1", "linear_top1", "alignment", "uniformity"] {
        let (a, b) = (one[key].as_f64().unwrap(), two[key].as_f64().unwrap());
        assert!((a - b).abs() <= 1e-4 * a.abs().max(1e-3), "{key}: 1 rank {a}, 2 ranks {b}");
    }
    assert_ne!(plain["uniformity"], one["uniformity"], "whitening changes the features");
    // Whitened to 4 dimensions, the embedding file is [n, 4] and its rows unit vectors.
    let out = t.path("emb.safetensors");
    let args = [
        "embed",
        "--config",
        cfg.to_str().unwrap(),
        "--checkpoint",
        ckpt.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--set",
        "eval.whiten=true",
        "--set",
        "eval.whiten_dim=4",
    ];
    ok(run(2, &args, &[]));
    let rows = embedding_rows(&t.path("emb-00001-of-00002.safetensors"))
        + embedding_rows(&t.path("emb-00002-of-00002.safetensors"));
    assert_eq!(rows, 96);
    // Training with eval.whiten whitens the baselines too, alike on 1 and 2 ranks.
    let baselines = |np: usize, name: &str| {
        let c = t.config(name, "simcse", "infonce");
        ok(run(np, &["--config", c.to_str().unwrap(), "--set", "eval.whiten=true", "--set", "eval.whiten_dim=4"], &[]));
        summary(&t.path(name))
    };
    let (a, b) = (baselines(0, "w1"), baselines(2, "w2"));
    for key in ["knn_top1_init", "knn_top1_bag_of_words"] {
        let (x, y) = (a[key].as_f64().unwrap(), b[key].as_f64().unwrap());
        assert!((x - y).abs() < 1e-9, "{key}: 1 rank {x}, 2 ranks {y}");
    }
    // A cut above the dimension is refused, naming the key.
    let bad = run(
        0,
        &[
            "eval",
            "--config",
            cfg.to_str().unwrap(),
            "--checkpoint",
            ckpt.to_str().unwrap(),
            "--set",
            "eval.whiten=true",
            "--set",
            "eval.whiten_dim=9",
        ],
        &[],
    );
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(!bad.status.success() && err.contains("eval.whiten_dim") && err.contains("8 dimensions"), "{err}");
    let train = run(
        0,
        &[
            "--config",
            cfg.to_str().unwrap(),
            "--set",
            "eval.whiten=true",
            "--set",
            "eval.whiten_dim=9",
            "--set",
            "checkpoint.overwrite=true",
        ],
        &[],
    );
    let err = String::from_utf8_lossy(&train.stderr);
    assert!(!train.status.success() && err.contains("eval.whiten_dim") && !err.contains("step 1/"), "{err}");
}

/// Rows of an embedding part, each a unit vector of 4 values.
fn embedding_rows(path: &Path) -> usize {
    let bytes = std::fs::read(path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let e = st.tensor("embeddings").unwrap();
    assert_eq!(e.shape()[1], 4);
    let v: Vec<f32> = e.data().chunks(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect();
    for row in v.chunks(4) {
        let n: f32 = row.iter().map(|x| x * x).sum::<f32>().sqrt();
        assert!((n - 1.0).abs() < 1e-4, "{row:?}");
    }
    e.shape()[0]
}

#[test]
fn bad_corpora_and_mismatched_inputs_fail_before_training() {
    let t = Text::new();
    let cfg = t.config("bad", "simcse", "infonce");
    let fails = |sets: &[String], needles: &[&str]| {
        let mut args = vec!["--config".to_string(), cfg.to_str().unwrap().to_string()];
        sets.iter().for_each(|s| args.extend(["--set".to_string(), s.clone()]));
        let out = run(0, &args.iter().map(String::as_str).collect::<Vec<_>>(), &[]);
        let err = String::from_utf8_lossy(&out.stderr).to_string();
        assert!(!out.status.success() && !err.contains("step 1/"), "{sets:?}: {err}");
        for n in needles {
            assert!(err.contains(n), "{sets:?}: `{n}` missing from: {err}");
        }
    };
    let write = |name: &str, text: &[u8]| {
        let p = t.path(name);
        std::fs::write(&p, text).unwrap();
        format!("data.root={}", p.display())
    };
    fails(&[write("empty.tsv", b"\n  \n")], &["empty.tsv", "holds no sentence"]);
    fails(&[write("mixed.tsv", b"a\tone\nb\tq\ttwo\n")], &["mixed.tsv", "line 2"]);
    fails(&[write("blank.tsv", b"a\tq\tone\nb\tq\t \n")], &["blank.tsv", "line 2 has an empty sentence"]);
    fails(&[write("latin1.tsv", b"a\tq\tcaf\xe9\n")], &["latin1.tsv", "line 1 is not UTF-8"]);
    fails(
        &[write("ungrouped.tsv", b"a\tone\nb\ttwo\n"), "method.name=quick_thought".into()],
        &["ungrouped.tsv", "label<TAB>group<TAB>text"],
    );
    fails(&["method.name=simclr".into(), "loss.name=ntxent".into()], &["method.name", "text-only methods"]);
    fails(
        &["data.dataset=fashion_mnist".into(), "data.root=/usr/share/datasets/fashion-mnist".into()],
        &["data.dataset", "lines"],
    );
    fails(&["model.text.pool=first".into(), "model.text.causal=true".into()], &["model.text.pool"]);
    fails(&["model.text.dropout=1".into()], &["model.text.dropout"]);
    fails(&["data.augment=simclr".into()], &["data.augment"]);
}
