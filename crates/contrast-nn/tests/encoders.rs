//! ResNet and ViT against the real torchvision, timm and open_clip
//! (`tests/assets/encoders.json`, written by `tools/reference/encoders.py`):
//! the full-size models' key and shape contracts through the importer, and
//! small models with closed-form weights that must give the features the
//! libraries gave (float64, 1e-9 relative). Then the importer's refusals and
//! P-rank parity of a group-norm ResNet.

use contrast_comm::{Collective, Solo, Threads};
use contrast_config::{LossKind, ModelConfig, PretrainedFormat, TextAct, TextConfig};
use contrast_nn::encoder::text::Captions;
use contrast_nn::import::{import, ImportOptions, ImportReport};
use contrast_nn::method::{build, plan, Batch, Method, Spec};
use contrast_nn::GlobalBatch;
use serde_json::Value;
use std::sync::OnceLock;
use tch::{Device, Kind, Tensor};

fn fixture() -> &'static Value {
    static F: OnceLock<Value> = OnceLock::new();
    F.get_or_init(|| {
        let p = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/assets/encoders.json");
        serde_json::from_str(&std::fs::read_to_string(p).expect("encoders.json")).expect("JSON")
    })
}

fn keys_of(v: &Value) -> Vec<(String, Vec<i64>)> {
    let shape = |s: &Value| s.as_array().unwrap().iter().map(|d| d.as_i64().unwrap()).collect();
    v.as_array().unwrap().iter().map(|kv| (kv[0].as_str().unwrap().to_string(), shape(&kv[1]))).collect()
}

/// `closed_form` of encoders.py: key number `k` in sorted order, element by flat index.
fn closed_form(name: &str, k: usize, shape: &[i64]) -> Tensor {
    let n: i64 = shape.iter().product();
    let i = Tensor::arange(n, (Kind::Double, Device::Cpu));
    let base = (&i * 0.37 + 0.91 * k as f64 + 0.13).sin();
    let v = if name.ends_with("running_var") {
        &base * &base * 0.5 + 1.0
    } else if name.ends_with("running_mean") {
        base * 0.1
    } else if shape.len() == 1 && name.ends_with("weight") {
        base * 0.1 + 1.0
    } else if shape.len() == 1 && name.ends_with("bias") {
        base * 0.05
    } else {
        let fan_in = match shape.first() {
            Some(&s0) if s0 > 1 => n / s0,
            _ => (n / shape.last().copied().unwrap_or(1)).max(1),
        };
        base * (3.0 / fan_in as f64).sqrt()
    };
    v.reshape(shape)
}

fn state(keys: &[(String, Vec<i64>)], zeros: bool) -> Vec<(String, Tensor)> {
    let mut sorted: Vec<&(String, Vec<i64>)> = keys.iter().collect();
    sorted.sort_by(|a, b| a.0.cmp(&b.0));
    sorted
        .into_iter()
        .enumerate()
        .map(|(k, (n, s))| {
            let t = if zeros { Tensor::zeros(s.as_slice(), (Kind::Float, Device::Cpu)) } else { closed_form(n, k, s) };
            (n.clone(), t)
        })
        .collect()
}

fn images(shape: &[i64]) -> Tensor {
    let n: i64 = shape.iter().product();
    (Tensor::arange(n, (Kind::Double, Device::Cpu)) * 0.05).sin().reshape(shape)
}

/// A method of `encoder` with `keys` (YAML) for `size`-px RGB images.
fn spec(method: &str, encoder: &str, keys: &str, size: i64, kind: Kind) -> Spec {
    let loss = if method == "clip" { LossKind::Clip } else { LossKind::NtXent };
    let mut s = Spec::new(plan(method).unwrap(), loss, 2);
    let mut model = ModelConfig { encoder: encoder.into(), ..Default::default() };
    model.encoder_keys = yaml_serde::from_str(keys).unwrap();
    s.model = model;
    (s.in_channels, s.image_size, s.kind) = (3, size, kind);
    s
}

fn import_as(m: &dyn Method, tensors: Vec<(String, Tensor)>, format: PretrainedFormat, skip: &[&str]) -> ImportReport {
    let opts = ImportOptions {
        format,
        prefix: String::new(),
        skip: skip.iter().map(|s| s.to_string()).collect(),
        strict: true,
    };
    import(m.var_store(), tensors, &opts).unwrap_or_else(|e| panic!("{e}"))
}

#[test]
fn full_size_encoders_match_the_upstream_key_contracts() {
    let k = &fixture()["keys"];
    let cases = [
        ("resnet18", "torchvision_resnet18", "{norm: batch, stem: imagenet}", "fc.*"),
        ("resnet34", "torchvision_resnet34", "{norm: batch, stem: imagenet}", "fc.*"),
        ("resnet50", "torchvision_resnet50", "{norm: batch, stem: imagenet}", "fc.*"),
        ("vit_tiny", "timm_vit_tiny_patch16_224", "{}", "head.*"),
        ("vit_small", "timm_vit_small_patch16_224", "{}", "head.*"),
        ("vit_base", "timm_vit_base_patch16_224", "{}", "head.*"),
    ];
    for (encoder, upstream, keys, skip) in cases {
        let m = build(&spec("simclr", encoder, keys, 224, Kind::Float)).unwrap();
        let r = import_as(m.as_ref(), state(&keys_of(&k[upstream]), true), PretrainedFormat::Auto, &[skip]);
        let missing: Vec<_> = r.missing.iter().filter(|n| n.starts_with("backbone.")).collect();
        assert!(missing.is_empty(), "{encoder}: not in {upstream}: {missing:?}");
        assert!(!r.skipped.is_empty() && r.unused.is_empty(), "{encoder}: {r:?}");
    }
    // open_clip's ViT-B-32 into the CLIP method: image tower, text tower, projections and logit scale.
    let vit = "{vit: {patch_size: 32, pre_norm: true, ln_eps: 1.0e-5, patch_bias: false}}";
    let mut s = spec("clip", "vit_base", vit, 224, Kind::Float);
    s.model.text =
        TextConfig { width: 512, layers: 12, heads: 8, context: 77, act: TextAct::Gelu, ..Default::default() };
    (s.model.proj_dim, s.text_vocab) = (512, 49408);
    let m = build(&s).unwrap();
    let r = import_as(m.as_ref(), state(&keys_of(&k["open_clip_ViT-B-32"]), true), PretrainedFormat::Auto, &[]);
    assert_eq!(r.format, Some(PretrainedFormat::OpenClip));
    assert!(r.missing.is_empty() && r.unused.is_empty(), "{r:?}");
}

fn close(got: &Value, want: &Value, what: &str) {
    for key in ["sum", "sumsq"] {
        let (g, w) = (got[key].as_f64().unwrap(), want[key].as_f64().unwrap());
        assert!((g - w).abs() <= 1e-9 * w.abs().max(1.0), "{what} {key}: {g} against {w}");
    }
    for key in ["head", "tail"] {
        for (g, w) in got[key].as_array().unwrap().iter().zip(want[key].as_array().unwrap()) {
            let (g, w) = (g.as_f64().unwrap(), w.as_f64().unwrap());
            assert!((g - w).abs() <= 1e-9 * w.abs().max(1.0), "{what} {key}: {g} against {w}");
        }
    }
}

fn stats(y: &Tensor) -> Value {
    let v = |t: Tensor| contrast_nn::to_host::<f64>(&t);
    let (rows, d) = (y.size()[0], y.size()[1]);
    serde_json::json!({
        "sum": y.sum(Kind::Double).double_value(&[]),
        "sumsq": y.square().sum(Kind::Double).double_value(&[]),
        "head": v(y.get(0).narrow(0, 0, 6)),
        "tail": v(y.get(rows - 1).narrow(0, d - 6, 6)),
    })
}

#[test]
fn small_encoders_match_torchvision_timm_and_open_clip() {
    let vit = "{vit: {patch_size: 8, dim: 64, depth: 2, heads: 4";
    for c in fixture()["cases"].as_array().unwrap() {
        let name = c["name"].as_str().unwrap();
        let keys = keys_of(&c["keys"]);
        let x = images(&keys_of(&serde_json::json!([["x", c["input"]]]))[0].1);
        if name.starts_with("open_clip") {
            let act = if name.ends_with("quick_gelu") { "quick_gelu" } else { "gelu" };
            let v = format!("{{vit: {{patch_size: 8, dim: 64, depth: 2, heads: 2, pre_norm: true, ln_eps: 1.0e-5, patch_bias: false, act: {act}}}}}");
            let mut s = spec("clip", "vit", &v, 32, Kind::Double);
            let text_act = if act == "gelu" { TextAct::Gelu } else { TextAct::QuickGelu };
            s.model.text =
                TextConfig { width: 32, layers: 1, heads: 2, context: 16, act: text_act, ..Default::default() };
            (s.model.proj_dim, s.text_vocab) = (16, 100);
            let m = build(&s).unwrap();
            import_as(m.as_ref(), state(&keys, false), PretrainedFormat::OpenClip, &[]);
            close(&stats(&m.encode_image(&x).unwrap()), &c["image"], name);
            let tokens: Vec<i64> = c["tokens"]
                .as_array()
                .unwrap()
                .iter()
                .flat_map(|r| r.as_array().unwrap().iter().map(|t| t.as_i64().unwrap()))
                .collect();
            let captions = Captions::from_host(&tokens, &[5, 8], Device::Cpu);
            close(&stats(&m.encode_text(&captions).unwrap()), &c["text"], name);
            continue;
        }
        if name == "resnet18_cifar_32_train_step" {
            let m = build(&spec("simclr", "resnet18", "{norm: batch, stem: cifar}", 32, Kind::Double)).unwrap();
            import_as(m.as_ref(), state(&keys, false), PretrainedFormat::Torchvision, &[]);
            let _ = m.backbone().forward_t(&x, true);
            let vars = m.var_store().variables();
            for (bn, want) in c["running"].as_object().unwrap() {
                for (stat, key) in [("running_mean", "mean"), ("running_var", "var")] {
                    let got = vars[&format!("backbone.{bn}.{stat}")].sum(Kind::Double).double_value(&[]);
                    let w = want[key].as_f64().unwrap();
                    assert!((got - w).abs() <= 1e-9 * w.abs().max(1.0), "{name} {bn}.{stat}: {got} against {w}");
                }
            }
            continue;
        }
        let (encoder, keys_yaml, format, size) = match name {
            "resnet18_cifar_32" => {
                ("resnet18", "{norm: batch, stem: cifar}".to_string(), PretrainedFormat::Torchvision, 32)
            }
            "resnet50_imagenet_64" => {
                ("resnet50", "{norm: batch, stem: imagenet}".into(), PretrainedFormat::Torchvision, 64)
            }
            "vit_2_blocks_cls" => ("vit", format!("{vit}}}}}"), PretrainedFormat::Timm, 32),
            "vit_2_blocks_mean" => ("vit", format!("{vit}, pool: mean}}}}"), PretrainedFormat::Timm, 32),
            other => panic!("unknown case {other}"),
        };
        let m = build(&spec("simclr", encoder, &keys_yaml, size, Kind::Double)).unwrap();
        let r = import_as(m.as_ref(), state(&keys, false), format, &[]);
        assert!(r.missing.iter().all(|n| n.starts_with("head.")), "{name}: {:?}", r.missing);
        close(&stats(&m.features(&x)), &c["features"], name);
    }
}

#[test]
fn the_importer_refuses_what_does_not_fit_naming_the_key() {
    let k = keys_of(&fixture()["keys"]["torchvision_resnet18"]);
    let opts = |strict| ImportOptions { format: PretrainedFormat::Auto, prefix: String::new(), skip: vec![], strict };
    // An ImageNet stem file into a CIFAR stem: conv1 names both shapes.
    let m = build(&spec("simclr", "resnet18", "{norm: batch, stem: cifar}", 32, Kind::Float)).unwrap();
    let e = import(m.var_store(), state(&k, true), &opts(false)).unwrap_err().to_string();
    assert!(e.contains("conv1.weight") && e.contains("[64, 3, 7, 7]") && e.contains("[64, 3, 3, 3]"), "{e}");
    // Unused keys in strict mode are listed; fc.* skipped by glob they are fine.
    let m = build(&spec("simclr", "resnet18", "{norm: batch, stem: imagenet}", 224, Kind::Float)).unwrap();
    let e = import(m.var_store(), state(&k, true), &opts(true)).unwrap_err().to_string();
    assert!(e.contains("fc.weight") && e.contains("fc.bias") && e.contains("pretrained_skip"), "{e}");
    // Batch-norm statistics into a group-norm model: refused, naming the key.
    let m = build(&spec("simclr", "resnet18", "{norm: group, stem: imagenet}", 224, Kind::Float)).unwrap();
    let e = import(m.var_store(), state(&k, true), &opts(false)).unwrap_err().to_string();
    assert!(e.contains("running_mean") && e.contains("model.norm"), "{e}");
    // fp16 tensors are cast to the variables' f32; a 3-channel stem sums into a 1-channel one.
    let mut s = spec("simclr", "resnet18", "{norm: batch, stem: imagenet}", 224, Kind::Float);
    s.in_channels = 1;
    let m = build(&s).unwrap();
    let half: Vec<(String, Tensor)> = state(&k, false).into_iter().map(|(n, t)| (n, t.to_kind(Kind::Half))).collect();
    let stem = half.iter().find(|(n, _)| n == "conv1.weight").unwrap().1.to_kind(Kind::Float).sum_dim_intlist(
        [1i64].as_slice(),
        true,
        Kind::Float,
    );
    let opts = ImportOptions { skip: vec!["fc.*".into()], ..opts(true) };
    import(m.var_store(), half, &opts).unwrap();
    let conv1 = m.var_store().variables()["backbone.conv1.weight"].shallow_clone();
    assert_eq!((conv1.kind(), conv1.size()), (Kind::Float, vec![64, 1, 7, 7]));
    assert!(conv1.allclose(&stem, 1e-6, 1e-6, false));
}

#[test]
fn a_vit_position_embedding_resamples_to_another_grid() {
    let cases = fixture()["cases"].as_array().unwrap();
    let case = cases.iter().find(|c| c["name"] == "vit_2_blocks_cls").unwrap(); // at 32 px: a 4×4 grid
    let keys = keys_of(&case["keys"]);
    let m =
        build(&spec("simclr", "vit", "{vit: {patch_size: 8, dim: 64, depth: 2, heads: 4}}", 64, Kind::Double)).unwrap();
    let opts = ImportOptions { format: PretrainedFormat::Timm, prefix: String::new(), skip: vec![], strict: true };
    import(m.var_store(), state(&keys, false), &opts).unwrap();
    let pos = m.var_store().variables()["backbone.pos_embed"].shallow_clone();
    assert_eq!(pos.size(), [1, 65, 64]);
    let file = state(&keys, false).into_iter().find(|(n, _)| n == "pos_embed").unwrap().1;
    assert!(pos.narrow(1, 0, 1).allclose(&file.narrow(1, 0, 1), 0.0, 0.0, false), "the class position is kept");
}

type Snapshot = Vec<(String, Vec<f64>, Vec<i64>)>;

fn resnet_step<C: Collective>(c: &C, init: &Snapshot, b: usize) -> Vec<(String, Vec<f64>)> {
    let mut s = spec("simclr", "resnet18", "{stem: cifar}", 16, Kind::Double);
    s.shard = contrast_nn::loss::Shard { rank: c.rank(), world_size: c.world_size(), local_batch: b };
    s.model.proj_dim = 8;
    s.model.proj_hidden = 16;
    let m = build(&s).unwrap();
    tch::no_grad(|| {
        let vars = m.var_store().variables();
        for (n, v, shape) in init {
            vars[n].shallow_clone().copy_(&Tensor::from_slice(v).view(shape.as_slice()));
        }
    });
    let n = b * c.world_size();
    let all: Vec<Tensor> = (0..2).map(|v| images(&[n as i64, 3, 16, 16]) * (1.0 + v as f64)).collect();
    let views: Vec<Tensor> = all.iter().map(|t| t.narrow(0, (c.rank() * b) as i64, b as i64)).collect();
    let batch = Batch { step: 0, views: &views, captions: None, labels: None, mix: None, indices: &[] };
    let params: Vec<Tensor> = m.params().into_iter().map(|p| p.tensor).collect();
    let towers = m.forward(&batch, c).unwrap();
    GlobalBatch::new(c, b).step_towers(&towers, &params, &[], |g, ctx| Ok(m.loss_share(g, &batch, ctx)?.loss)).unwrap();
    m.params().iter().map(|p| (p.name.clone(), contrast_nn::to_host::<f64>(&p.tensor.grad()))).collect()
}

#[test]
fn a_group_norm_resnet18_on_2_ranks_equals_1_rank_of_the_whole_batch() {
    let init: Snapshot = {
        let mut s = spec("simclr", "resnet18", "{stem: cifar}", 16, Kind::Double);
        (s.model.proj_dim, s.model.proj_hidden) = (8, 16);
        let m = build(&s).unwrap();
        let vars = m.var_store().variables().into_iter();
        let mut v: Snapshot = vars.map(|(n, t)| (n, contrast_nn::to_host::<f64>(&t), t.size())).collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    };
    let one = resnet_step(&Solo, &init, 4);
    let two = Threads::run(2, |c| resnet_step(&c, &init, 2));
    for ((name, a), (_, b)) in one.iter().zip(&two[0]) {
        let scale = a.iter().map(|x| x.abs()).fold(1e-12, f64::max);
        let diff = a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f64::max);
        assert!(diff <= 1e-9 * scale, "{name}: 2 ranks differ from 1 by {diff:e} (scale {scale:e})");
    }
}

#[test]
fn frozen_groups_get_no_gradient_no_update_and_keep_their_statistics() {
    let mut s = spec("simclr", "resnet18", "{norm: batch, stem: cifar}", 16, Kind::Float);
    s.model.freeze = vec!["stem".into(), "layer1".into()];
    let m = build(&s).unwrap();
    let names: Vec<String> = m.params().into_iter().map(|p| p.name).collect();
    assert!(names.iter().all(|n| !n.starts_with("backbone.layer1.") && !n.starts_with("backbone.conv1")), "{names:?}");
    assert!(names.iter().any(|n| n.starts_with("backbone.layer2.")));
    let vars = m.var_store().variables();
    let (stat, live) =
        (vars["backbone.layer1.0.bn1.running_mean"].copy(), vars["backbone.layer2.0.bn1.running_mean"].copy());
    let x = images(&[4, 3, 16, 16]).to_kind(Kind::Float);
    let views = [x.shallow_clone(), x.flip([3])];
    let batch = Batch { step: 0, views: &views, captions: None, labels: None, mix: None, indices: &[] };
    let _ = m.forward(&batch, &Solo).unwrap();
    assert!(vars["backbone.layer1.0.bn1.running_mean"].equal(&stat), "a frozen group's batch norm stays in eval mode");
    assert!(!vars["backbone.layer2.0.bn1.running_mean"].equal(&live), "the others update their statistics");
    // The optimiser's exclusion list (what a method sets for a while): no decay, no update.
    let params = m.params();
    let head = params.iter().find(|p| p.name == "head.fc1.weight").unwrap().tensor.shallow_clone();
    let mut opt = contrast_nn::optim::Optimizer::new(
        contrast_nn::optim::OptimizerKind::AdamW { beta1: 0.9, beta2: 0.999, eps: 1e-8 },
        0.1,
        params,
    );
    let before = head.copy();
    let loss = m
        .forward(&batch, &Solo)
        .unwrap()
        .grad
        .iter()
        .map(|t| t.square().sum(Kind::Float))
        .fold(Tensor::zeros([], (Kind::Float, Device::Cpu)), |a, b| a + b);
    loss.backward();
    opt.exclude(&["head.fc1.weight"]);
    opt.step(0.1);
    assert!(head.equal(&before), "an excluded parameter is not updated, not even decayed");
    opt.include(&["head.fc1.weight"]);
    opt.step(0.1);
    assert!(!head.equal(&before));
}

/// Full-size forward passes against the libraries (one 224-px image each):
/// ResNet-50, ViT-B/16 and open_clip's ViT-B-32, float64. Behind
/// `CONTRAST_FULL_ENCODERS=1` (about a minute and several GB on 2 cores).
#[test]
fn full_size_encoders_match_the_libraries_behind_a_flag() {
    if std::env::var("CONTRAST_FULL_ENCODERS").as_deref() != Ok("1") {
        eprintln!("skipped: set CONTRAST_FULL_ENCODERS=1 for the full-size forward passes");
        return;
    }
    let f = fixture();
    let without = |upstream: &str, head: &str| -> Vec<(String, Vec<i64>)> {
        keys_of(&f["keys"][upstream]).into_iter().filter(|(k, _)| !k.starts_with(head)).collect()
    };
    let x = images(&[1, 3, 224, 224]);
    for c in f["full_cases"].as_array().unwrap() {
        let name = c["name"].as_str().unwrap();
        match name {
            "full_resnet50_224" => {
                let m = build(&spec("simclr", "resnet50", "{norm: batch, stem: imagenet}", 224, Kind::Double)).unwrap();
                import_as(
                    m.as_ref(),
                    state(&without("torchvision_resnet50", "fc."), false),
                    PretrainedFormat::Torchvision,
                    &[],
                );
                close(&stats(&m.features(&x)), &c["features"], name);
            }
            "full_vit_base_224" => {
                let m = build(&spec("simclr", "vit_base", "{}", 224, Kind::Double)).unwrap();
                import_as(
                    m.as_ref(),
                    state(&without("timm_vit_base_patch16_224", "head."), false),
                    PretrainedFormat::Timm,
                    &[],
                );
                close(&stats(&m.features(&x)), &c["features"], name);
            }
            "full_open_clip_vit_b_32" => {
                let vit = "{vit: {patch_size: 32, pre_norm: true, ln_eps: 1.0e-5, patch_bias: false}}";
                let mut s = spec("clip", "vit_base", vit, 224, Kind::Double);
                s.model.text = TextConfig {
                    width: 512,
                    layers: 12,
                    heads: 8,
                    context: 77,
                    act: TextAct::Gelu,
                    ..Default::default()
                };
                (s.model.proj_dim, s.text_vocab) = (512, 49408);
                let m = build(&s).unwrap();
                import_as(
                    m.as_ref(),
                    state(&keys_of(&f["keys"]["open_clip_ViT-B-32"]), false),
                    PretrainedFormat::OpenClip,
                    &[],
                );
                close(&stats(&m.encode_image(&x).unwrap()), &c["image"], name);
            }
            other => panic!("unknown full case {other}"),
        }
    }
}

/// Every method trains a step on every encoder family (momentum copies and
/// batch-norm heads included): the encoder is built in one place for all.
#[test]
fn every_method_takes_a_step_on_every_encoder() {
    let encoders = [
        ("convnet", "{width: 4, embed_dim: 32}"),
        ("resnet18", "{stem: cifar}"),
        ("vit", "{vit: {patch_size: 8, dim: 32, depth: 1, heads: 2}}"),
    ];
    let losses = [
        ("simclr", LossKind::NtXent),
        ("clip", LossKind::Clip),
        ("moco_v2", LossKind::InfoNce),
        ("byol", LossKind::NormalizedMse),
        ("simsiam", LossKind::NegativeCosine),
    ];
    let n = 4;
    let views: Vec<Tensor> = (0..2).map(|v| images(&[n, 3, 16, 16]).to_kind(Kind::Float) * (1.0 + v as f64)).collect();
    let tokens: Vec<i64> = (0..n * 12).map(|i| i % 50 + 1).collect();
    let captions = Captions::from_host(&tokens, &[5, 6, 7, 8], Device::Cpu);
    for (encoder, keys) in encoders {
        for (method, loss) in losses {
            let mut s = spec(method, encoder, keys, 16, Kind::Float);
            s.loss = loss;
            if method == "moco_v2" {
                s.method.settings.set("queue_size", 8);
            }
            if matches!(method, "byol" | "simsiam") {
                s.method.settings.set("predictor_hidden", 8);
            }
            s.model.text =
                TextConfig { width: 16, layers: 1, heads: 2, context: 12, act: TextAct::Gelu, ..Default::default() };
            (s.model.proj_dim, s.model.proj_hidden, s.text_vocab) = (8, 16, 64);
            let m = build(&s).unwrap_or_else(|e| panic!("{method} on {encoder}: {e}"));
            let batch =
                Batch { step: 0, views: &views, captions: Some(&captions), labels: None, mix: None, indices: &[] };
            let params: Vec<Tensor> = m.params().into_iter().map(|p| p.tensor).collect();
            let towers = m.forward(&batch, &Solo).unwrap();
            let out = GlobalBatch::new(&Solo, n as usize)
                .step_towers(&towers, &params, &[], |g, ctx| Ok(m.loss_share(g, &batch, ctx)?.loss))
                .unwrap();
            assert!(out.loss.is_finite(), "{method} on {encoder}");
            assert_eq!(m.features(&views[0]).size()[1], m.backbone().out_dim(), "{method} on {encoder}");
        }
    }
}

#[test]
fn bf16_autocast_runs_matrix_products_in_bf16_on_the_cpu_and_restores_the_state() {
    use contrast_nn::precision::{autocast, to_f32};
    use tch::nn::Module;
    let vs = tch::nn::VarStore::new(tch::Device::Cpu);
    let layer = tch::nn::linear(vs.root() / "fc", 8, 4, Default::default());
    let x = tch::Tensor::ones([3, 8], tch::kind::FLOAT_CPU);
    let plain = layer.forward(&x);
    let cast = autocast(true, tch::Device::Cpu, || layer.forward(&x));
    assert_eq!((plain.kind(), cast.kind()), (tch::Kind::Float, tch::Kind::BFloat16));
    // Off again afterwards, and off when not asked for.
    assert_eq!(layer.forward(&x).kind(), tch::Kind::Float);
    assert_eq!(autocast(false, tch::Device::Cpu, || layer.forward(&x)).kind(), tch::Kind::Float);
    // The same numbers to bf16's precision; the fp32 copy keeps the graph to the fp32 weights.
    let back = to_f32(&cast);
    assert_eq!(back.kind(), tch::Kind::Float);
    let err = (&back - &plain).abs().max().double_value(&[]);
    assert!(err <= 1e-2 * plain.abs().max().double_value(&[]).max(1.0), "{err}");
    back.sum(tch::Kind::Float).backward();
    let w = &vs.variables()["fc.weight"];
    assert_eq!(w.kind(), tch::Kind::Float);
    assert!(w.grad().defined() && w.grad().kind() == tch::Kind::Float);
}
