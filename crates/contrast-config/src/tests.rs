//! Tests of parsing alone; plan resolution is tested with the real registry of
//! methods and encoders in `contrast-nn`'s test binary (`tests/nn/config.rs`).

use super::*;

#[test]
fn unknown_key_is_named_with_file() {
    let err = Config::from_yaml("train:\n  global_bacth: 4\n", "x.yaml").unwrap_err().to_string();
    assert!(err.contains("x.yaml") && err.contains("global_bacth"), "{err}");
    let err = Config::from_yaml("bogus: 1\n", "y.yaml").unwrap_err().to_string();
    assert!(err.contains("bogus"), "{err}");
    for (name, kind) in [
        ("supcon", LossKind::SupCon),
        ("siglip", LossKind::SigLip),
        ("hard_negative", LossKind::HardNegative),
        ("nt_xent", LossKind::NtXent),
    ] {
        assert_eq!(LossKind::parse(name), Some(kind));
    }
}

#[test]
fn component_keys_are_kept_apart_from_the_schema() {
    let c =
        Config::from_yaml("model: {encoder: convnet, width: 8, proj_dim: 16}\nmethod: {name: x, k: 3}\n", "f").unwrap();
    assert_eq!(c.model.proj_dim, 16);
    assert_eq!(c.model.encoder_keys.get("width").and_then(|v| v.as_i64()), Some(8));
    assert_eq!(c.method.name.as_deref(), Some("x"));
    assert_eq!(c.method.keys.keys().collect::<Vec<_>>(), ["k"]);
    #[derive(serde::Deserialize, Debug)]
    #[allow(dead_code)]
    struct K {
        k: f64,
    }
    let mut s = c.method.keys.clone();
    s.set("k", "three");
    let err = s.parse::<K>("method").unwrap_err().to_string();
    assert!(err.contains("method.k"), "{err}");
}

#[test]
fn rules_refuse_and_prune_the_keys_they_cover() {
    let mut r = applies::Rules::default();
    r.keys("train.optimizer", &["momentum"], "adamw", true);
    r.keys("data", &["aug"], "data.augment: none", true);
    r.keys("data", &["small_crops"], "never", false);
    let given: std::collections::BTreeSet<String> = ["data.aug.hue".to_string()].into();
    let err = r.check(&given).unwrap_err().to_string();
    assert!(err.contains("data.aug.hue") && err.contains("data.augment: none"), "{err}");
    assert!(r.check(&["data.augmentation".to_string()].into()).is_ok(), "a prefix is a whole key");
    let mut v = yaml_serde::to_value(Config::default()).unwrap();
    r.prune(&mut v);
    assert!(v["data"].get("aug").is_none() && v["train"]["optimizer"].get("momentum").is_none());
    assert!(v["data"].get("small_crops").is_some() && v["train"]["optimizer"].get("lr").is_some());
}

#[test]
fn deep_or_huge_yaml_is_refused_before_parsing() {
    let t0 = std::time::Instant::now();
    let deep = format!("a: {}{}\n", "[".repeat(100_000), "]".repeat(100_000));
    let err = Config::from_yaml(&deep, "deep.yaml").unwrap_err().to_string();
    assert!(err.contains("deep.yaml") && err.contains("levels deep"), "{err}");
    let block: String = (0..200).map(|i| format!("{}k:\n", "  ".repeat(i))).collect();
    assert!(Config::from_yaml(&block, "b.yaml").unwrap_err().to_string().contains("levels deep"));
    let dashes = format!("a:\n{}x\n", "- ".repeat(100));
    assert!(Config::from_yaml(&dashes, "d.yaml").unwrap_err().to_string().contains("levels deep"));
    let huge = format!("seed: 1\n#{}\n", "x".repeat(MAX_CONFIG_BYTES));
    assert!(Config::from_yaml(&huge, "h.yaml").unwrap_err().to_string().contains("at most"));
    assert!(t0.elapsed() < std::time::Duration::from_secs(2), "refused early");
    // Brackets in quotes and comments do not count; shipped-style configs pass.
    assert!(check_yaml_shape(&format!("a: \"{}\" # {}\nb: [1, {{c: 2}}]\n", "[".repeat(100), "{".repeat(100))).is_ok());
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("c.yaml");
    std::fs::write(&f, "seed: 1\n").unwrap();
    let err = Config::load(&f, &[format!("train.steps={}", "[".repeat(1000))]).unwrap_err().to_string();
    assert!(err.contains("--set train.steps") && err.contains("levels deep"), "{err}");
}

#[test]
fn parsing_any_input_under_the_size_cap_is_fast_and_depth_is_bounded_everywhere() {
    // Inputs the old line-based pre-check misread (brackets after an apostrophe in a plain
    // scalar went uncounted, and libyaml's cost grew with the square of their depth).
    let n = 200_000;
    let inputs = [
        format!("seed: [a's, {}{}]\n", "[".repeat(n), "]".repeat(n)),
        format!("seed: {{a: it's {}{}}}\n", "{".repeat(n), "}".repeat(n)),
        format!("x: {}\n", "[a, ".repeat(n)),
        (0..MAX_YAML_DEPTH + 2).map(|d| format!("{}- a:\n", "  ".repeat(d))).collect(),
        format!("x: {}\n", "- ".repeat(n)),
        format!("a: &a [x]\n{}", (0..300).map(|i| format!("k{i}: *a\n")).collect::<String>()),
        format!("seed: {}\n", "? ".repeat(n)),
        format!("x: {{a: 1,\n{}{}}}\n", "[".repeat(n), "]".repeat(n)),
    ];
    for text in &inputs {
        assert!(text.len() <= MAX_CONFIG_BYTES);
        let t0 = std::time::Instant::now();
        let out = Config::from_yaml(text, "hostile.yaml");
        let took = t0.elapsed();
        assert!(out.is_err(), "{:?}… was accepted", &text[..40.min(text.len())]);
        assert!(took < std::time::Duration::from_millis(500), "{:?}… took {took:?}", &text[..40.min(text.len())]);
    }
    // Within the bound, nesting is accepted and measured.
    assert_eq!(check_yaml_shape(&format!("x: {}{}\n", "[".repeat(10), "]".repeat(10))).unwrap(), 11);
    // A --set key of very many dotted parts is refused, not a stack overflow.
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("c.yaml");
    std::fs::write(&f, "seed: 1\n").unwrap();
    let key = vec!["a"; 100_000].join(".");
    let err = Config::load(&f, &[format!("{key}=1")]).unwrap_err().to_string();
    assert!(err.contains("levels deep") && err.len() < 400, "{err}");
    // libyaml's leniency survives: a flow mapping continued at column 0 (yaml-rust2 refuses it).
    let c = Config::from_yaml("train: {steps: 3,\nglobal_batch: 8}\n", "lenient.yaml").unwrap();
    assert_eq!((c.train.steps, c.train.global_batch), (3, 8));
    // Block nesting past the bound in such a document is measured after parsing.
    let lenient =
        format!("x: {{a: 1,\nb: 2}}\n{}", (0..70).map(|d| format!("{}k:\n", "  ".repeat(d))).collect::<String>());
    assert!(Config::from_yaml(&lenient, "l.yaml").unwrap_err().to_string().contains("levels deep"));
    // A value that is not YAML is still a string.
    let c = Config::load(&f, &["checkpoint.dir=a: b: c".to_string()]).unwrap();
    assert_eq!(c.checkpoint.dir.to_str(), Some("a: b: c"));
}

#[test]
fn train_overlap_takes_true_false_or_auto() {
    let parse = |v: &str| Config::from_yaml(&format!("train: {{overlap: {v}}}\n"), "a.yaml").map(|c| c.train.overlap);
    assert_eq!(parse("true").unwrap(), Overlap::On);
    assert_eq!(parse("false").unwrap(), Overlap::Off);
    assert_eq!(parse("auto").unwrap(), Overlap::Auto);
    assert_eq!(Config::from_yaml("seed: 1\n", "a.yaml").unwrap().train.overlap, Overlap::Auto);
    for bad in ["maybe", "3"] {
        let err = parse(bad).unwrap_err().to_string();
        assert!(err.contains("train.overlap") && err.contains("true, false or auto"), "{bad}: {err}");
    }
    assert!(Overlap::Auto.enabled(true) && !Overlap::Auto.enabled(false));
    assert!(Overlap::On.enabled(false) && !Overlap::Off.enabled(true));
}
