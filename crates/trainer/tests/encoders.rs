//! Real encoders through the binary: the presets (CIFAR, ImageNet folders, a
//! CLIP ViT) resolve and train two steps on files written here in their
//! formats; weight import from an export (every rank starts identical: 2 ranks
//! equal 1), its sha256 recorded, a `.pth` refused naming the converter; and an
//! exported batch-norm ResNet-18 that torchvision loads and evaluates alike.

use crate::common::*;

/// CIFAR-10's binary release: 5 training batches of `per_batch` records and a test batch.
fn write_cifar10_bin(root: &Path, per_batch: usize) {
    let dir = root.join("cifar-10-batches-bin").tap_mkdir();
    let batch = |salt: usize| -> Vec<u8> {
        (0..per_batch)
            .flat_map(|i| {
                let label = ((i + salt) % 10) as u8;
                let px = (0..3072).map(move |p| ((p * (label as usize + 1) + i * 7 + salt) % 251) as u8);
                std::iter::once(label).chain(px)
            })
            .collect()
    };
    for b in 1..=5 {
        std::fs::write(dir.join(format!("data_batch_{b}.bin")), batch(b)).unwrap();
    }
    std::fs::write(dir.join("test_batch.bin"), batch(0)).unwrap();
}

pub fn image_folder(root: &Path, per_class: usize) {
    for (c, rgb) in [("cat", [200u8, 40, 40]), ("dog", [40, 40, 200])] {
        let d = root.join(c).tap_mkdir();
        for i in 0..per_class {
            let img = image::RgbImage::from_fn(72, 64, |x, y| {
                let n = ((x as usize * 13 + y as usize * 7 + i * 31) % 29) as u8;
                image::Rgb([rgb[0].saturating_sub(n), rgb[1].saturating_sub(n), rgb[2].saturating_sub(n)])
            });
            img.save(d.join(format!("{i}.png"))).unwrap();
        }
    }
}

fn preset(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("../../configs/{name}.yaml"))
}

#[test]
fn presets_resolve_their_epochs_and_train_two_steps_on_their_formats() {
    let dir = tempfile::tempdir().unwrap();
    let cifar = dir.path().join("cifar");
    write_cifar10_bin(&cifar, 16);
    for name in ["cifar10/simclr_resnet18", "cifar10/mocov2_resnet18", "cifar10/byol_resnet18"] {
        let root = format!("data.root={}", cifar.display());
        let cfg = preset(name);
        let out = ok(run(
            0,
            &["config", "--config", cfg.to_str().unwrap(), "--set", &root, "--set", "train.global_batch=8"],
            &[],
        ));
        let plan = String::from_utf8_lossy(&out.stdout);
        assert!(plan.contains("steps=10000 (epochs=1000 × 10 steps)"), "{name}: {plan}");
        let run_dir = dir.path().join(name.replace('/', "-"));
        let sets = [
            root,
            "train.steps=2".into(),
            "train.global_batch=8".into(),
            "eval.knn_k=5".into(),
            format!("checkpoint.dir={}", run_dir.display()),
        ];
        run_with_sets(0, &[], &cfg, &sets, &[]);
        let s = summary(&run_dir);
        assert_eq!(s["steps"], 2, "{name}");
        assert!(s["knn_top1"].as_f64().is_some(), "{name}: evaluated on CIFAR's test batch: {s}");
    }
    let folder = dir.path().join("folder");
    image_folder(&folder, 4);
    let run_dir = dir.path().join("imagenet");
    let sets = [
        format!("data.root={}", folder.display()),
        format!("eval.root={}", folder.display()),
        "data.image_size=64".into(),
        "data.workers=2".into(),
        "train.steps=2".into(),
        "train.global_batch=4".into(),
        "eval.knn_k=3".into(),
        format!("checkpoint.dir={}", run_dir.display()),
    ];
    run_with_sets(0, &[], &preset("imagenet/simclr_resnet50"), &sets, &[]);
    assert_eq!(summary(&run_dir)["steps"], 2);
    let pairs = dir.path().join("pairs").tap_mkdir();
    let rows = caption_dataset(&pairs, 8);
    let csv: String = std::iter::once("filepath\ttitle\n".to_string())
        .chain(rows.iter().map(|(f, c)| format!("{}\t{c}\n", pairs.join(f).display())))
        .collect();
    std::fs::write(pairs.join("pairs.csv"), csv).unwrap();
    let run_dir = dir.path().join("clip-vit");
    let sets = [
        format!("data.root={}", pairs.join("pairs.csv").display()),
        "data.image_size=64".into(),
        "data.workers=2".into(),
        "model.vit.depth=1".into(),
        "model.text.layers=1".into(),
        "train.steps=2".into(),
        "train.global_batch=4".into(),
        format!("checkpoint.dir={}", run_dir.display()),
    ];
    run_with_sets(0, &[], &preset("clip_vit"), &sets, &[]);
    assert_eq!(summary(&run_dir)["steps"], 2);
}

/// A ResNet-18 config on the fixture's 28-px IDX images (CIFAR stem).
fn resnet_config(fx: &Fixture, name: &str, norm: &str, extra: &str) -> PathBuf {
    let yaml = format!(
        "seed: 3\n\
         data: {{root: {data}, workers: 1, prefetch: 2}}\n\
         model: {{encoder: resnet18, norm: {norm}, proj_hidden: 16, proj_dim: 8{extra}}}\n\
         loss: {{name: ntxent, temperature: 0.2}}\n\
         train: {{global_batch: 8, steps: 2, threads: 1, log_every: 1,\n\
                  optimizer: {{name: sgd, lr: 0.05, momentum: 0.9, weight_decay: 0.0001}}, schedule: {{warmup_steps: 0}}}}\n\
         checkpoint: {{dir: {run}, every: 0}}\n\
         eval: {{at_end: false}}\n",
        data = fx.path("data").display(),
        run = fx.path(name).display(),
    );
    let f = fx.path(&format!("{name}.yaml"));
    std::fs::write(&f, yaml).unwrap();
    f
}

fn sha256_hex(path: &Path) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(std::fs::read(path).unwrap()).iter().map(|b| format!("{b:02x}")).collect()
}

#[test]
fn imported_weights_start_every_rank_alike_and_are_recorded() {
    let fx = Fixture::new();
    ok(run(0, &["--config", resnet_config(&fx, "src", "group", "").to_str().unwrap()], &[]));
    let export = fx.path("src.safetensors");
    ok(run(0, &["export", "--checkpoint", fx.path("src").to_str().unwrap(), "--out", export.to_str().unwrap()], &[]));
    let meta = safetensors_metadata(&export);
    assert_eq!(
        (meta["format"].as_str(), meta["encoder"].as_str(), meta["method"].as_str()),
        (Some("pt"), Some("resnet18"), Some("simclr"))
    );
    let from = format!(", pretrained: {}, pretrained_format: contrast", export.display());
    let one = resnet_config(&fx, "one", "group", &from);
    ok(run(0, &["--config", one.to_str().unwrap(), "--set", "train.steps=1"], &[]));
    let two = resnet_config(&fx, "two", "group", &from);
    ok(run(2, &["--config", two.to_str().unwrap(), "--set", "train.steps=1"], &[]));
    let d = max_rel_diff(&fx.path("two/step-1"), &fx.path("one/step-1"));
    assert!(d < 1e-4, "2 ranks from the imported weights differ from 1 by {d:e}");
    // The first step moved the imported weights, and did not start from the seed's.
    let fresh = resnet_config(&fx, "fresh", "group", "");
    ok(run(0, &["--config", fresh.to_str().unwrap(), "--set", "train.steps=1"], &[]));
    assert!(max_rel_diff(&fx.path("fresh/step-1"), &fx.path("one/step-1")) > 1e-3);
    let sha = sha256_hex(&export);
    assert_eq!(summary(&fx.path("one"))["pretrained_sha256"], sha.as_str());
    let config = std::fs::read_to_string(fx.path("one/config.yaml")).unwrap();
    assert!(config.contains(&format!("pretrained_sha256: {sha}")), "{config}");
    // A wrong sha256, a .pth file and a stem that does not fit: refused, naming the key or the tool.
    let bad = [
        ("model.pretrained_sha256=00ff", "has sha256"),
        ("model.pretrained=/tmp/weights.pth", "tools/convert_weights.py"),
    ];
    for (set, needle) in bad {
        let out = run(
            0,
            &["--config", one.to_str().unwrap(), "--set", set, "--set", "checkpoint.dir=/tmp/contrast-never"],
            &[],
        );
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && err.contains(needle), "{set}: {err}");
    }
    let imagenet = resnet_config(&fx, "stem", "group", &format!("{from}, stem: imagenet"));
    let out = run(0, &["--config", imagenet.to_str().unwrap()], &[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("conv1.weight") && err.contains("[64, 1, 3, 3]"), "{err}");
}

#[test]
fn an_exported_batch_norm_resnet18_loads_into_torchvision_and_embeds_alike() {
    let Some(python) = venv_python() else { return };
    let fx = Fixture::new();
    ok(run(0, &["--config", resnet_config(&fx, "bn", "batch", "").to_str().unwrap()], &[]));
    let (export, embed) = (fx.path("bn.safetensors"), fx.path("embed.safetensors"));
    let ck = fx.path("bn").display().to_string();
    ok(run(0, &["export", "--checkpoint", &ck, "--out", export.to_str().unwrap()], &[]));
    ok(run(0, &["embed", "--checkpoint", &ck, "--split", "test", "--out", embed.to_str().unwrap()], &[]));
    let (mean, std) = contrast_data::idx::FASHION_MNIST_MEAN_STD;
    let script = format!(
        r#"
import gzip, numpy, torch, torchvision
from safetensors.torch import load_file
sd = {{k[len("backbone."):]: v for k, v in load_file("{export}").items() if k.startswith("backbone.")}}
m = torchvision.models.resnet18()
m.conv1 = torch.nn.Conv2d(1, 64, 3, 1, 1, bias=False)
m.maxpool, m.fc = torch.nn.Identity(), torch.nn.Identity()
missing, unexpected = m.load_state_dict(sd, strict=False)
assert not unexpected and all(k.endswith("num_batches_tracked") for k in missing), (missing, unexpected)
raw = open("{images}", "rb").read()
x = torch.tensor(numpy.frombuffer(raw[16:], dtype=numpy.uint8).reshape(-1, 1, 28, 28).astype("float32"))
x = (x / 255 - {mean}) / {std}
with torch.no_grad():
    f = torch.nn.functional.normalize(m.eval()(x), dim=1)
want = load_file("{embed}")["embeddings"]
print("max abs diff", (f - want).abs().max().item())
assert torch.allclose(f, want, atol=1e-4), (f - want).abs().max()
"#,
        export = export.display(),
        embed = embed.display(),
        images = fx.path("data/t10k-images-idx3-ubyte").display(),
    );
    let out = Command::new(&python).arg("-c").arg(&script).output().unwrap();
    assert!(out.status.success(), "{}\n{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
}

/// The README's ResNet-18 row (`configs/simclr_resnet18.yaml`), in small:
/// SimCLR with a group-norm ResNet-18 (CIFAR stem, 28 px) on the real
/// Fashion-MNIST over 2 ranks trains (the loss falls, the embeddings keep
/// their spread) and evaluates end to end.
#[test]
fn resnet18_simclr_trains_and_evaluates_on_fashion_mnist_over_2_ranks() {
    let root = Path::new("/usr/share/datasets/fashion-mnist");
    if !root.join("train-images-idx3-ubyte.gz").exists() && !root.join("train-images-idx3-ubyte").exists() {
        eprintln!("skipped: no Fashion-MNIST in {} (launch/setup.sh installs it)", root.display());
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let sets = [
        "train.steps=16".to_string(),
        "train.log_every=4".into(),
        "train.schedule.warmup_steps=4".into(),
        "eval.max_train=2000".into(),
        "eval.max_test=1000".into(),
        "eval.linear_probe_steps=50".into(),
        format!("checkpoint.dir={}", dir.path().join("run").display()),
    ];
    run_with_sets(2, &[], &preset("simclr_resnet18"), &sets, &[]);
    let run_dir = dir.path().join("run");
    let (first, last) = (mean_loss(&run_dir, 0..4), mean_loss(&run_dir, 12..16));
    assert!(last < first - 0.1, "the loss did not fall: {first} → {last}");
    let s = summary(&run_dir);
    let knn = s["knn_top1"].as_f64().unwrap();
    assert!(knn > 0.5 && s["linear_top1"].as_f64().unwrap() > 0.5, "{s}");
    let spread: Vec<f64> = std::fs::read_to_string(run_dir.join("steps.jsonl"))
        .unwrap()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok()?["embedding_std"].as_f64())
        .collect();
    assert!(spread.last().is_some_and(|&s| s > 0.01), "collapsing: {spread:?}");
}

/// `tools/convert_weights.py` turns a torchvision `.pth` into safetensors that
/// `model.pretrained` imports: 100 tensors (the 3-channel ImageNet stem summed
/// into the IDX images' one channel), `fc.*` skipped by glob.
#[test]
fn a_converted_torchvision_pth_imports_into_a_resnet18() {
    let (root, Some(python)) = (repo_root(), venv_python()) else { return };
    let fx = Fixture::new();
    let (pth, st) = (fx.path("r18.pth"), fx.path("r18.safetensors"));
    let save = format!(
        "import torch, torchvision; torch.manual_seed(0); torch.save(torchvision.models.resnet18().state_dict(), '{}')",
        pth.display()
    );
    let out = Command::new(&python).args(["-c", &save]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let out = Command::new(&python).arg(root.join("tools/convert_weights.py")).args([&pth, &st]).output().unwrap();
    assert!(out.status.success() && String::from_utf8_lossy(&out.stdout).contains("102 tensors"), "{out:?}");
    let extra = format!(", stem: imagenet, pretrained: {}, pretrained_skip: ['fc.*']", st.display());
    let cfg = resnet_config(&fx, "converted", "batch", &extra);
    let out = ok(run(0, &["--config", cfg.to_str().unwrap(), "--set", "train.steps=1"], &[]));
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(log.contains("Torchvision names, 100 tensors loaded, 2 skipped, 0 unused"), "{log}");
}

/// `tools/contrast_torch.py` mirrors the convnet and its head: a `trainer
/// export` file loads with `load_state_dict(strict=True)` and gives the
/// features `trainer embed` wrote; `tools/export_onnx.py` writes an ONNX
/// graph whose features onnxruntime computes alike.
#[test]
fn the_pytorch_mirror_and_its_onnx_export_give_the_trainers_features() {
    let (root, Some(python)) = (repo_root(), venv_python()) else { return };
    let fx = Fixture::new();
    let cfg = fx.config("mirror", "ntxent", "");
    ok(run(0, &["--config", cfg.to_str().unwrap(), "--set", "train.steps=3"], &[]));
    let (run_dir, export, emb, onnx) =
        (fx.path("mirror"), fx.path("m.safetensors"), fx.path("emb.safetensors"), fx.path("m.onnx"));
    ok(run(0, &["export", "--checkpoint", run_dir.to_str().unwrap(), "--out", export.to_str().unwrap()], &[]));
    let embed = ["embed", "--checkpoint", run_dir.to_str().unwrap(), "--out", emb.to_str().unwrap(), "--split", "test"];
    ok(run(0, &embed, &[]));
    let tool = root.join("tools/export_onnx.py");
    let out = Command::new(&python).arg(&tool).args([&export, &onnx]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let check = format!(
        "import sys, numpy as np, torch, onnxruntime as ort\n\
         sys.path.insert(0, '{tools}')\n\
         import contrast_torch as ct\n\
         from safetensors.numpy import load_file\n\
         raw = open('{images}', 'rb').read()\n\
         imgs = np.frombuffer(raw, np.uint8, offset=16).reshape(-1, 28, 28)\n\
         model = ct.SimCLR.from_export('{export}')\n\
         x = ct.fashion_mnist_input(imgs)\n\
         with torch.no_grad():\n\
         \x20   mirror = model.features(x).numpy()\n\
         want = load_file('{emb}')['embeddings']\n\
         onnx = ort.InferenceSession('{onnx}', providers=['CPUExecutionProvider']).run(['features'], {{'images': x.numpy()}})[0]\n\
         print(mirror.shape[0], float(np.abs(mirror - want).max()), float(np.abs(onnx - want).max()))\n",
        tools = root.join("tools").display(),
        images = fx.path("data/t10k-images-idx3-ubyte").display(),
        export = export.display(),
        emb = emb.display(),
        onnx = onnx.display(),
    );
    let out = Command::new(&python).args(["-c", &check]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    let v: Vec<f64> = text.split_whitespace().map(|t| t.parse().unwrap()).collect();
    assert_eq!(v[0], 60.0, "{text}");
    assert!(v[1] < 1e-5, "the mirror's features differ from the trainer's by {}", v[1]);
    assert!(v[2] < 1e-5, "the ONNX graph's features differ from the trainer's by {}", v[2]);
}

/// The mirror's CLIP (convnet, image projection, text tower, logit scale)
/// loads a CLIP `trainer export` strictly, shaped by the config the export
/// carries (2 heads and quick_gelu here, not the defaults), and its byte
/// tokenizer and text tower give the text embeddings of `trainer embed
/// --texts` (multi-byte, cut-off and empty texts among them), its backbone
/// the image features.
#[test]
fn the_pytorch_mirror_of_clip_gives_the_trainers_text_and_image_features() {
    let (root, Some(python)) = (repo_root(), venv_python()) else { return };
    let fx = Fixture::new();
    let cfg = fx.config("clip-mirror", "clip", "");
    let sets = ["train.steps=3", "model.text.heads=2", "model.text.act=quick_gelu"];
    let mut args = vec!["--config", cfg.to_str().unwrap()];
    args.extend(sets.iter().flat_map(|s| ["--set", s]));
    ok(run(0, &args, &[]));
    let run_dir = fx.path("clip-mirror");
    let (export, texts, txt_emb, img_emb) =
        (fx.path("c.safetensors"), fx.path("texts.txt"), fx.path("txt.safetensors"), fx.path("img.safetensors"));
    let long = "a very long caption of a shirt, ".repeat(4);
    std::fs::write(&texts, format!("a photo of a shirt.\r\nun été à Zürich – 東京\n\n{long}\n")).unwrap();
    let ckpt = run_dir.to_str().unwrap();
    ok(run(0, &["export", "--checkpoint", ckpt, "--out", export.to_str().unwrap()], &[]));
    ok(run(
        0,
        &["embed", "--checkpoint", ckpt, "--out", txt_emb.to_str().unwrap(), "--texts", texts.to_str().unwrap()],
        &[],
    ));
    ok(run(0, &["embed", "--checkpoint", ckpt, "--out", img_emb.to_str().unwrap(), "--split", "test"], &[]));
    let sidecar = std::fs::read_to_string(fx.path("txt.safetensors.paths.jsonl")).unwrap();
    let second: serde_json::Value = serde_json::from_str(sidecar.lines().nth(1).unwrap()).unwrap();
    assert_eq!(second, serde_json::json!({"row": 1, "text": "un été à Zürich – 東京"}));
    let check = format!(
        "import sys, json, numpy as np, torch, torch.nn.functional as F\n\
         sys.path.insert(0, '{tools}')\n\
         import contrast_torch as ct\n\
         from safetensors.numpy import load_file\n\
         model = ct.load_export('{export}')\n\
         assert isinstance(model, ct.CLIP) and model.text.block0.heads == 2, model\n\
         texts = [json.loads(l)['text'] for l in open('{texts}.paths.jsonl')]\n\
         ids, ends = ct.byte_tokenize(texts, model.context)\n\
         raw = open('{images}', 'rb').read()\n\
         x = ct.fashion_mnist_input(np.frombuffer(raw, np.uint8, offset=16).reshape(-1, 28, 28))\n\
         with torch.no_grad():\n\
         \x20   txt = F.normalize(model.encode_text(ids, ends), dim=1).numpy()\n\
         \x20   img = model.features(x).numpy()\n\
         \x20   logits = model(x[:4], ids, ends)\n\
         want_txt, want_img = load_file('{txt}')['embeddings'], load_file('{img}')['embeddings']\n\
         assert torch.isfinite(logits).all() and logits.shape == (4, len(texts))\n\
         print(len(texts), int(ends.max()) + 1 - model.context, float(np.abs(txt - want_txt).max()), float(np.abs(img - want_img).max()))\n",
        tools = root.join("tools").display(),
        export = export.display(),
        texts = txt_emb.display(),
        images = fx.path("data/t10k-images-idx3-ubyte").display(),
        txt = txt_emb.display(),
        img = img_emb.display(),
    );
    let out = Command::new(&python).args(["-c", &check]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    let v: Vec<f64> = text.split_whitespace().map(|t| t.parse().unwrap()).collect();
    assert_eq!((v[0], v[1]), (4.0, 0.0), "four texts, the long one cut at the context: {text}");
    assert!(v[2] < 1e-5, "the mirror's text embeddings differ from the trainer's by {}", v[2]);
    assert!(v[3] < 1e-5, "the mirror's image features differ from the trainer's by {}", v[3]);
    // What --texts refuses, by name: a missing file, bytes that are not UTF-8, no text, no text tower.
    let bad = fx.path("bad.txt");
    std::fs::write(&bad, b"caf\xe9\n").unwrap();
    let empty = fx.path("empty.txt");
    std::fs::write(&empty, "").unwrap();
    let simclr = fx.config("no-tower", "ntxent", "");
    ok(run(0, &["--config", simclr.to_str().unwrap(), "--set", "train.steps=1"], &[]));
    let out_file = fx.path("x.safetensors");
    for (dir, file, says) in [
        (&run_dir, fx.path("none.txt"), "none.txt"),
        (&run_dir, bad.clone(), "not UTF-8 (an invalid sequence at byte 3)"),
        (&run_dir, empty.clone(), "holds no text"),
        (&fx.path("no-tower"), texts.clone(), "has no text tower"),
    ] {
        let args = ["embed", "--checkpoint", dir.to_str().unwrap(), "--out", out_file.to_str().unwrap()];
        let out = run(0, &[&args[..], &["--texts", file.to_str().unwrap()]].concat(), &[]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && err.contains(says), "{says}: {err}");
        assert!(!out_file.exists());
    }
}
