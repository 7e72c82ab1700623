//! The shipped configs and the data formats they train on.

use crate::common::*;

/// Results do not move unnoticed: 30 steps of the shipped SimCLR and CLIP
/// configs (one process and two ranks, one libtorch thread and one data worker,
/// since those change summation order) log the recorded losses
/// (`tests/assets/losses/`), to 1e-4 relative over 30 steps, across CPUs whose
/// kernels sum in another order. Re-recorded when the streaming loss heads
/// landed: they sum in another order too (the first steps agree to 1e-7, and f32
/// training amplifies that to 0.9% by step 30); the f64 parity tests of
/// contrast-nn (`stream::*`) show they compute the same loss and gradients.
#[test]
fn shipped_configs_reproduce_the_recorded_losses() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let dir = tempfile::tempdir().unwrap();
    for (config, np) in [("simclr", 0usize), ("simclr", 2), ("clip", 0), ("clip", 2)] {
        let name = format!("{config}-{}", np.max(1));
        let run_dir = dir.path().join(&name);
        let cfg = root.join(format!("configs/{config}.yaml"));
        let set = [
            "train.steps=30".to_string(),
            "train.threads=1".into(),
            "data.workers=1".into(),
            "eval.at_end=false".into(),
            "checkpoint.every=0".into(),
            format!("checkpoint.dir={}", run_dir.display()),
        ];
        let mut args = vec!["--config".to_string(), cfg.to_str().unwrap().to_string()];
        args.extend(set.iter().flat_map(|s| ["--set".to_string(), s.clone()]));
        ok(run(np, &args.iter().map(String::as_str).collect::<Vec<_>>(), &[]));
        let losses = |p: &Path| -> Vec<f64> {
            std::fs::read_to_string(p)
                .unwrap()
                .lines()
                .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["loss"].as_f64().unwrap())
                .collect()
        };
        let want = losses(&root.join(format!("crates/trainer/tests/assets/losses/{name}.jsonl")));
        let got = losses(&run_dir.join("steps.jsonl"));
        // libtorch picks other kernels on other CPUs (AVX-512 or not): from step 5
        // the sixth significant digit may differ, so the check is relative.
        assert_eq!(got.len(), want.len(), "{name}: steps logged");
        for (step, (g, w)) in got.iter().zip(&want).enumerate() {
            assert!((g - w).abs() <= 1e-4 * w.abs(), "{name}: step {} loss {g} against the recorded {w}", step + 1);
        }
    }
}

/// The shipped method configs train as written (a few steps on 2 ranks).
#[test]
fn shipped_method_configs_train() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let dir = tempfile::tempdir().unwrap();
    for (config, state) in [
        ("mocov2", "method.queue"),
        ("byol", "momentum.projector.fc1.weight"),
        ("simsiam", "predictor.fc1.weight"),
        ("mochi", "method.queue"),
        ("supcon", "head.fc2.weight"),
        ("barlow_twins", "projector.fc3.weight"),
        ("swav", "prototypes.weight"),
        ("instdisc", "method.bank"),
        ("deepcluster", "method.pseudo_labels"),
        ("cpc", "predict.k1.weight"),
        ("simcse", "backbone.proj.weight"),
        ("quick_thought", "backbone.context.proj.weight"),
        ("pba", "head.fc2.weight"),
    ] {
        let run_dir = dir.path().join(config);
        let cfg = root.join(format!("configs/{config}.yaml"));
        let mut sets = vec![
            "train.steps=3".to_string(),
            "train.global_batch=32".into(),
            "eval.at_end=false".into(),
            format!("checkpoint.dir={}", run_dir.display()),
        ];
        if matches!(config, "simcse" | "quick_thought") {
            // The configs name the corpus launch/setup.sh writes, relative to the repository.
            let fortunes = root.join("data/fortunes");
            sets.push(format!("data.root={}", fortunes.join("train.tsv").display()));
            sets.push(format!("data.text.tokenizer={}", fortunes.join("tokenizer.json").display()));
            sets.push(format!("eval.root={}", fortunes.join("test.tsv").display()));
        }
        let mut args = vec!["--config".to_string(), cfg.to_str().unwrap().to_string()];
        args.extend(sets.iter().flat_map(|s| ["--set".to_string(), s.clone()]));
        let out = ok(run(2, &args.iter().map(String::as_str).collect::<Vec<_>>(), &[]));
        assert!(String::from_utf8_lossy(&out.stderr).contains("method="), "{config}: no method in the plan line");
        assert!(summary(&run_dir)["final_loss"].as_f64().unwrap().is_finite(), "{config}");
        // A population's checkpoints are its members'.
        let ckpt = if config == "pba" { run_dir.join("member-0/step-3") } else { run_dir.join("step-3") };
        assert!(!tensor_of(&ckpt, state).is_empty(), "{config}");
    }
}

#[test]
fn clip_config_trains_on_a_csv_and_on_webdataset_shards() {
    let dir = tempfile::tempdir().unwrap();
    let imgs = dir.path().join("images").tap_mkdir();
    let rows = caption_dataset(&imgs, 64);
    // open_clip's CSV layout (TSV, filepath + title), paths relative to the file.
    let mut tsv = String::from("filepath\ttitle\n");
    for (f, cap) in &rows {
        tsv.push_str(&format!("images/{f}\t{cap}\n"));
    }
    std::fs::write(dir.path().join("train.tsv"), tsv).unwrap();
    // The same pairs as two WebDataset shards.
    let shards = dir.path().join("shards").tap_mkdir();
    for (k, chunk) in rows.chunks(32).enumerate() {
        let mut b = tar::Builder::new(std::fs::File::create(shards.join(format!("{k:06}.tar"))).unwrap());
        for (f, cap) in chunk {
            let (stem, ext) = f.split_once('.').unwrap();
            b.append_path_with_name(imgs.join(f), format!("{stem}.{ext}")).unwrap();
            let mut h = tar::Header::new_gnu();
            h.set_size(cap.len() as u64);
            h.set_mode(0o644);
            h.set_cksum();
            b.append_data(&mut h, format!("{stem}.txt"), cap.as_bytes()).unwrap();
        }
        b.finish().unwrap();
    }
    let csv_run = dir.path().join("run-csv");
    // Captions augmented with EDA (a synonym file) and span cutoff on the CSV run.
    std::fs::write(dir.path().join("synonyms.tsv"), "red\tcrimson,scarlet\nsquare\tbox\nstripe\tband\n").unwrap();
    let text_aug = [
        "data.text.eda_alpha=0.1".to_string(),
        format!("data.text.synonyms={}", dir.path().join("synonyms.tsv").display()),
        "data.text.cutoff=span".to_string(),
        "data.text.cutoff_ratio=0.1".to_string(),
    ];
    clip_on("csv", &dir.path().join("train.tsv"), &csv_run, 0, &text_aug);
    let wds_run = dir.path().join("run-wds");
    let out = clip_on("webdataset", &shards.join("{000000..000001}.tar"), &wds_run, 2, &[]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("world_size=2"));
    assert!(shards.join("000000.tar.contrast-index").is_file());
    // A Hugging Face tokenizer.json (word level, [CLS] … [SEP]) instead of bytes, and zero-shot
    // on a labelled image folder (classes = colours) given as eval.root.
    let words = ["a", "photo", "picture", "of", "the", "red", "green", "blue", "yellow", "square", "stripe"];
    let tok = dir.path().join("tokenizer.json");
    std::fs::write(&tok, contrast_data::text::word_level_tokenizer_json(&words)).unwrap();
    let test = dir.path().join("test").tap_mkdir();
    // caption_dataset colours image i with colour i % 4 (red, green, blue, yellow): keep one colour per class.
    for (k, colour) in ["red", "green", "blue", "yellow"].iter().enumerate() {
        let class = test.join(colour).tap_mkdir();
        for (i, (f, _)) in caption_dataset(&class, 24).into_iter().enumerate() {
            if i % 4 != k {
                std::fs::remove_file(class.join(f)).unwrap();
            }
        }
    }
    let hf_run = dir.path().join("run-hf");
    let out = clip_on(
        "csv",
        &dir.path().join("train.tsv"),
        &hf_run,
        0,
        &[
            format!("data.text.tokenizer={}", tok.display()),
            "eval.at_end=true".into(),
            format!("eval.root={}", test.display()),
            "eval.dataset=image_folder".into(),
        ],
    );
    let err = String::from_utf8_lossy(&out.stderr);
    let s = summary(&hf_run);
    let zs = s["zero_shot_top1"].as_f64().unwrap_or_else(|| panic!("no zero-shot figure: {s}\n{err}"));
    // Chance is 0.25; pooling at a wrong token (e.g. the constant [CLS]) gives exactly that.
    assert!((0.5..=1.0).contains(&zs), "zero-shot {zs} is no better than chance");
    eprintln!("CLIP with a Hugging Face tokenizer: zero-shot top-1 {zs:.3} over 4 colour classes");
    assert!(s.get("knn_top1").is_none(), "a caption CSV has no labels for kNN: {s}");
    let model = checkpoint_tensor_shape(&hf_run.join("step-60"), "text.token_embedding.weight");
    assert_eq!(model[0], 4 + words.len() as i64, "the text tower embeds the tokenizer's vocabulary");
    for run in [&csv_run, &wds_run, &hf_run] {
        let (first, last) = (mean_loss(run, 0..10), mean_loss(run, 50..60));
        assert!(
            last < first - 0.3,
            "{}: loss did not fall: first 10 steps {first:.3}, last 10 {last:.3}",
            run.display()
        );
    }
}

#[test]
fn simclr_trains_on_an_image_folder_with_a_corrupt_file() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("folder").tap_mkdir();
    for class in ["cats", "dogs"] {
        caption_dataset(&root.join(class).tap_mkdir(), 24);
    }
    std::fs::write(root.join("dogs").join("broken.png"), b"not a png at all").unwrap();
    // A labelled test split (eval.root) with its own unreadable file.
    let test = dir.path().join("test").tap_mkdir();
    for class in ["cats", "dogs"] {
        caption_dataset(&test.join(class).tap_mkdir(), 6);
    }
    std::fs::write(test.join("cats").join("corrupt-test.jpg"), b"\xff\xd8 truncated").unwrap();
    let cfg = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../configs/simclr.yaml");
    let run_dir = dir.path().join("run");
    // What `trainer eval` must see too: the data, the model and the test split.
    let shared = [
        "data.dataset=image_folder".to_string(),
        format!("data.root={}", root.display()),
        "data.image_size=16".into(),
        "model.width=8".into(),
        "model.embed_dim=64".into(),
        format!("eval.root={}", test.display()),
        "eval.knn_k=5".into(),
    ];
    let training = [
        "data.max_bad_fraction=0.05".to_string(),
        "data.aug.randaugment_n=2".into(),
        "data.aug.autoaugment=true".into(),
        "train.global_batch=16".into(),
        "train.steps=6".into(),
        format!("checkpoint.dir={}", run_dir.display()),
    ];
    let out = run_with_sets(0, &[], &cfg, &[&shared[..], &training[..]].concat(), &[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("broken.png"), "the bad file is logged with its path: {err}");
    assert_eq!(err.matches("skipping unreadable").count(), 1, "logged once: {err}");
    assert!(err.contains("evaluation skips") && err.contains("corrupt-test.jpg"), "{err}");
    let s = summary(&run_dir);
    for key in ["knn_top1", "knn_top1_init", "knn_top1_raw_pixels"] {
        let v = s[key].as_f64().unwrap_or_else(|| panic!("summary.json lacks {key}: {s}"));
        assert!((0.0..=1.0).contains(&v), "{key}={v}");
    }
    // `trainer eval` on the checkpoint gives the same kNN figure.
    let out = run_with_sets(0, &["eval"], &cfg, &shared, &["--checkpoint", run_dir.to_str().unwrap()]);
    let e: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!((e["knn_top1"].as_f64().unwrap() - s["knn_top1"].as_f64().unwrap()).abs() < 1e-9, "{e} vs {s}");
    let last: serde_json::Value =
        serde_json::from_str(std::fs::read_to_string(run_dir.join("steps.jsonl")).unwrap().lines().last().unwrap())
            .unwrap();
    assert_eq!(last["bad_files"], 1);
    assert!(run_dir.join("step-6/model.safetensors").is_file());
    let state: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run_dir.join("step-6/state.json")).unwrap()).unwrap();
    assert_eq!(state["bad_samples"].as_array().map(Vec::len), Some(1), "the budget is checkpointed: {state}");
    // With no budget, both ranks stop at the step whose batch met the file (the count is global).
    let strict_dir = dir.path().join("strict");
    let strict = [
        "data.max_bad_fraction=0".to_string(),
        "train.global_batch=16".into(),
        "train.steps=6".into(),
        format!("checkpoint.dir={}", strict_dir.display()),
    ];
    let mut args = vec!["--config".to_string(), cfg.display().to_string()];
    for s in shared.iter().chain(&strict) {
        args.extend(["--set".to_string(), s.clone()]);
    }
    let out = run(2, &args.iter().map(String::as_str).collect::<Vec<_>>(), &[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("1 of 49 samples are unreadable") && err.contains("max_bad_fraction"), "{err}");
}

/// A RandAugment schedule (what PBA writes) replays on Fashion-MNIST's grayscale views;
/// a bad one, or one given with fixed RandAugment keys, is refused before training.
#[test]
fn a_randaugment_schedule_replays_and_bad_ones_are_refused() {
    let fx = Fixture::new();
    let cfg = fx.config("ra", "ntxent", "");
    let good = fx.path("schedule.json");
    std::fs::write(&good, r#"[{"step": 0, "n": 0, "m": 0}, {"step": 2, "n": 2, "m": 9}]"#).unwrap();
    let set = |p: &std::path::Path| format!("data.aug.randaugment_schedule={}", p.display());
    let go = |extra: &[String]| {
        let mut a = vec!["--config".to_string(), cfg.to_str().unwrap().to_string()];
        extra.iter().for_each(|s| a.extend(["--set".to_string(), s.clone()]));
        run(0, &a.iter().map(String::as_str).collect::<Vec<_>>(), &[])
    };
    ok(go(&[set(&good)]));
    assert!(summary(&fx.path("ra"))["final_loss"].as_f64().unwrap().is_finite());
    let bad = fx.path("bad.json");
    std::fs::write(&bad, r#"[{"step": 1, "n": 2, "m": 9}]"#).unwrap();
    let over = "checkpoint.overwrite=true".to_string();
    for (extra, needles) in [
        (vec![set(&bad), over.clone()], vec!["bad.json", "first phase starts at step 1"]),
        (vec![set(&fx.path("missing.json")), over.clone()], vec!["data.aug.randaugment_schedule", "missing.json"]),
        (vec![set(&good), "data.aug.randaugment_n=2".into(), over.clone()], vec!["data.aug.randaugment_n"]),
    ] {
        let out = go(&extra);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && !err.contains("step 1/"), "{extra:?}: {err}");
        for n in needles {
            assert!(err.contains(n), "{extra:?}: `{n}` missing from {err}");
        }
    }
}

/// GitHub's anchor of a heading: lower case, punctuation dropped, spaces as hyphens.
fn anchor(heading: &str) -> String {
    let kept = heading.trim().to_lowercase();
    kept.chars()
        .filter(|c| c.is_alphanumeric() || *c == '-' || *c == '_' || *c == ' ')
        .map(|c| if c == ' ' { '-' } else { c })
        .collect()
}

/// The README stays a first read (at most about 150 lines), and every
/// relative link of it and of `docs/` resolves: the file exists, and an
/// `#anchor` names one of its headings.
#[test]
fn the_readme_is_short_and_every_relative_link_resolves() {
    let root = repo_root();
    let readme = std::fs::read_to_string(root.join("README.md")).unwrap();
    assert!(readme.lines().count() <= 160, "the README has {} lines", readme.lines().count());
    let mut files = vec![root.join("README.md")];
    files.extend(std::fs::read_dir(root.join("docs")).unwrap().map(|e| e.unwrap().path()));
    let mut checked = 0;
    for file in files.iter().filter(|f| f.extension().is_some_and(|e| e == "md")) {
        let text = std::fs::read_to_string(file).unwrap();
        for (_, rest) in text.match_indices("](").map(|(i, _)| ((), &text[i + 2..])) {
            let target = &rest[..rest.find(')').unwrap()];
            if target.contains("://") || target.starts_with("mailto:") || target.contains(' ') {
                continue;
            }
            let (path, frag) = target.split_once('#').unwrap_or((target, ""));
            let dest = if path.is_empty() { file.clone() } else { file.parent().unwrap().join(path) };
            assert!(dest.exists(), "{}: the link {target} names no file", file.display());
            if !frag.is_empty() {
                let body = std::fs::read_to_string(&dest).unwrap();
                let headings: Vec<String> = body
                    .lines()
                    .filter_map(|l| l.strip_prefix('#'))
                    .map(|h| anchor(h.trim_start_matches('#')))
                    .collect();
                assert!(headings.contains(&frag.to_string()), "{}: no heading #{frag} in {path}", file.display());
            }
            checked += 1;
        }
    }
    assert!(checked >= 15, "only {checked} links found");
}
