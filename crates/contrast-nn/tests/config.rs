//! Plan resolution with the real registry of methods and encoders (moved from
//! contrast-config, which names no method): derived sizes, errors that name the
//! key, keys that do not apply, the resolved YAML as a fixed point, and a
//! method defined here, registered like the built-in ones, that trains a step.

use contrast_comm::Solo;
use contrast_config::Topology;
use contrast_config::{invalid, Config, ConfigError, LossKind, MethodSpec, MomentumSchedule, Plan, RunInfo, Settings};
use contrast_nn::encoder::{self, Encoder};
use contrast_nn::engine::{Gathered, Towers};
use contrast_nn::loss::{ntxent_share, Ctx, GlobalSum};
use contrast_nn::method::{Batch, Method, MethodEntry, Share, Spec};
use contrast_nn::{GlobalBatch, Registry, Result};
use serde::{Deserialize, Serialize};
use tch::nn::VarStore;
use tch::{Device, Kind, Tensor};

fn topo(p: usize) -> Topology {
    Topology { world_size: p, local_size: p, host_cores: 2, rank_cores: 2 }
}

fn with_root(mut c: Config) -> Config {
    c.data.root = std::env::temp_dir();
    c
}

fn resolve(yaml: &str, p: usize) -> std::result::Result<Plan, ConfigError> {
    Plan::resolve(with_root(Config::from_yaml(yaml, "f").unwrap()), topo(p), &Registry)
}

#[test]
fn negative_and_indivisible_batches_fail() {
    let err = resolve("train: {global_batch: -8}", 2).unwrap_err().to_string();
    assert!(err.contains("train.global_batch") && err.contains("-8"), "{err}");
    let err = resolve("train: {global_batch: 10}", 4).unwrap_err().to_string();
    assert!(err.contains("not divisible by the world size 4"), "{err}");
}

#[test]
fn missing_data_dir_fails() {
    let c = Config::from_yaml("data: {root: /definitely/not/here}", "f").unwrap();
    let err = Plan::resolve(c, topo(1), &Registry).unwrap_err().to_string();
    assert!(err.contains("data.root") && err.contains("/definitely/not/here"), "{err}");
}

#[test]
fn overrides_and_derived_sizes() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("c.yaml");
    std::fs::write(&f, "train:\n  global_batch: 64\n").unwrap();
    let mut c = Config::load(
        &f,
        &["train.optimizer.lr=0.5".into(), "train.optimizer.lr_scale=per_256".into(), "loss.name=clip".into()],
    )
    .unwrap();
    c.data.root = dir.path().into();
    let p = Plan::resolve(c, topo(4), &Registry).unwrap();
    assert_eq!(p.local_batch, 16);
    assert_eq!(p.negatives_per_anchor, 63);
    assert!((p.peak_lr - 0.125).abs() < 1e-12);
    assert_eq!(p.threads, 1);
    let err = Config::load(&f, &["train.bogus=1".into()]).unwrap_err().to_string();
    assert!(err.contains("bogus") && err.contains("--set"), "{err}");
    assert!(Config::load(&f, &["novalue".into()]).is_err());
}

#[test]
fn bad_enum_values_name_the_key() {
    for (yaml, key) in [
        ("model: {norm: batchy}", "model.norm"),
        ("loss: {temperature: 0}", "loss.temperature"),
        ("loss: {name: foo}", "loss.name"),
        ("loss: {name: debiased, tau_plus: 1.0}", "loss.tau_plus"),
        ("loss: {name: dclw, sigma: 0}", "loss.sigma"),
        ("loss: {name: triplet, margin: -0.1}", "loss.margin"),
        ("loss: {name: triplet, mining: hardest}", "loss.mining"),
        ("train: {optimizer: {lr_scale: x}}", "train.optimizer.lr_scale"),
        ("train: {optimizer: {name: adam}}", "train.optimizer.name"),
        ("method: {name: mocov3}", "method.name"),
        ("train: {optimizer: {betas: [0.9, 1.0]}}", "train.optimizer.betas"),
        ("train: {optimizer: {eps: 0}}", "train.optimizer.eps"),
        ("train: {schedule: {final_lr_frac: 2}}", "train.schedule.final_lr_frac"),
        ("data: {workers: 100000}", "data.workers"),
        ("data: {prefetch: 100000000}", "data.prefetch"),
        ("data: {aug: {blur_sigma: [0.1, 1.0e9]}}", "data.aug.blur_sigma"),
        ("model: {encoder: resnet1000}", "model.encoder"),
        ("model: {embed_dim: 100}", "model.embed_dim"),
        ("model: {width: 0}", "model.width"),
    ] {
        // A closed choice fails when parsed, a bad number when resolved; both name the key.
        let err = match Config::from_yaml(yaml, "f") {
            Err(e) => e.to_string(),
            Ok(c) => Plan::resolve(with_root(c), topo(1), &Registry).unwrap_err().to_string(),
        };
        assert!(err.contains(key), "{yaml}: {err}");
    }
}

#[test]
fn supervised_losses_refuse_data_without_labels() {
    let dir = tempfile::tempdir().unwrap();
    let csv = dir.path().join("pairs.csv");
    std::fs::write(&csv, "filepath\ttitle\na.png\ta cat\n").unwrap();
    for loss in ["supcon", "triplet"] {
        let yaml = format!("data: {{dataset: csv, root: {}}}\nloss: {{name: {loss}}}", csv.display());
        let err = Plan::resolve(Config::from_yaml(&yaml, "f").unwrap(), topo(1), &Registry).unwrap_err().to_string();
        assert!(err.contains("loss.name") && err.contains("no") && err.contains("labels"), "{err}");
    }
    let yaml = format!("data: {{dataset: csv, root: {}}}\nloss: {{name: clip}}", csv.display());
    Plan::resolve(Config::from_yaml(&yaml, "f").unwrap(), topo(1), &Registry).unwrap();
}

#[test]
fn keys_that_do_not_apply_are_errors() {
    for (yaml, key) in [
        ("loss: {margin: 0.2}", "loss.margin"),
        ("loss: {name: barlow_twins, temperature: 0.1}", "loss.temperature"),
        ("method: {queue_size: 512}", "method.queue_size"),
        ("method: {name: simsiam, predictor_hidden: 8, momentum: 0.9}", "method.momentum"),
        ("method: {name: moco_v2, predictor_hidden: 8}", "method.predictor_hidden"),
        // Every section, not only loss and method:
        ("train: {optimizer: {name: adamw, momentum: 0.9}}", "train.optimizer.momentum"),
        ("train: {optimizer: {name: sgd, betas: [0.9, 0.99]}}", "train.optimizer.betas"),
        ("train: {optimizer: {trust_coefficient: 0.02}}", "train.optimizer.trust_coefficient"),
        ("train: {schedule: {name: constant, final_lr_frac: 0.1}}", "train.schedule.final_lr_frac"),
        ("data: {small_crops: 4}", "data.small_crops"),
        ("data: {mix_alpha: 0.5}", "data.mix_alpha"),
        ("data: {csv_separator: ','}", "data.csv_separator"),
        ("data: {image_size: 64}", "data.image_size"),
        ("data: {aug: {hue: 0.2}}", "data.aug.hue"),
        ("data: {augment: clip, aug: {flip_prob: 0.2}}", "data.aug"),
        ("data: {text: {eda_alpha: 0.1}}", "data.text.eda_alpha"),
        ("eval: {root: /tmp}", "eval.root"),
        ("metrics: {textfile_every: 5}", "metrics.textfile_every"),
        ("model: {text: {width: 32}}", "model.text.width"),
        ("loss: {name: clip}\nmodel: {proj_hidden: 32}", "model.proj_hidden"),
        ("model: {widht: 8}", "model.widht"),
    ] {
        let err = resolve(yaml, 1).unwrap_err().to_string();
        assert!(err.contains(key) && err.contains("does not apply"), "{yaml}: {err}");
    }
    // The same keys where they apply.
    resolve("loss: {name: triplet, margin: 0.2}", 1).unwrap();
    resolve("method: {name: moco_v2, queue_size: 512, momentum: 0.9}\ntrain: {global_batch: 256}", 1).unwrap();
    resolve("train: {optimizer: {name: sgd, momentum: 0.8, lars: true, trust_coefficient: 0.02}}", 1).unwrap();
    resolve("data: {augment: swav, small_crops: 4}", 1).unwrap();
    resolve("data: {mix: mixup, mix_alpha: 0.5, mix_group: 8}", 1).unwrap();
    resolve("loss: {name: clip}\nmodel: {text: {width: 32}}", 1).unwrap();
}

#[test]
fn the_gradient_cache_is_refused_where_chunks_change_the_step() {
    resolve("train: {micro_batch: 16}", 2).unwrap();
    resolve("loss: {name: clip}\ntrain: {micro_batch: 16}", 2).unwrap();
    for (yaml, why) in [
        ("model: {norm: batch}\ntrain: {micro_batch: 16}", "model.norm: batch"),
        ("method: {name: moco_v2}\ntrain: {micro_batch: 16}", "method moco_v2 cannot run in chunks"),
        ("method: {name: byol, predictor_hidden: 64}\ntrain: {micro_batch: 16}", "method byol cannot run in chunks"),
    ] {
        let err = resolve(yaml, 2).unwrap_err().to_string();
        assert!(err.contains("train.micro_batch") && err.contains(why), "{yaml}: {err}");
    }
}

#[test]
fn methods_resolve_their_loss_and_check_their_keys() {
    let p = resolve("method: {name: moco_v2, queue_size: 1024}\ntrain: {global_batch: 256}", 4).unwrap();
    assert_eq!((p.loss, p.method.queue_size, p.temperature), (LossKind::InfoNce, 1024, 0.2));
    assert!(p.describe().contains("queue_shard=256"), "{}", p.describe());
    let schedule = |p: &Plan| p.method.settings.parse::<Keys>("method").unwrap().momentum_schedule;
    #[derive(Deserialize)]
    struct Keys {
        momentum_schedule: MomentumSchedule,
    }
    assert_eq!(schedule(&p), MomentumSchedule::Constant);
    let p = resolve("method: {name: byol, predictor_hidden: 64}", 1).unwrap();
    assert_eq!((p.loss, schedule(&p)), (LossKind::NormalizedMse, MomentumSchedule::Cosine));
    assert_eq!(resolve("loss: {name: siglip}", 1).unwrap().method.name, "clip");
    for (yaml, p, key) in [
        ("method: {name: moco_v2, queue_size: 1000}\ntrain: {global_batch: 256}", 1, "method.queue_size"),
        ("method: {name: moco_v2, momentum: 1.0}", 1, "method.momentum"),
        ("method: {name: moco_v2, momentum: -0.1}", 1, "method.momentum"),
        ("method: {name: moco_v2, shuffle_bn: true}", 1, "method.shuffle_bn"),
        ("method: {name: moco_v2, shuffle_bn: maybe}", 1, "method.shuffle_bn"),
        ("method: {name: byol}", 1, "method.predictor_hidden"),
        ("method: {name: simsiam, predictor_hidden: 0}", 1, "method.predictor_hidden"),
        ("method: {name: byol, predictor_hidden: 8}\ntrain: {global_batch: 1}", 1, "train.global_batch"),
        ("method: {name: moco_v2}\nloss: {name: ntxent}", 1, "loss.name"),
        ("method: {name: simclr}\nloss: {name: clip}", 1, "loss.name"),
        ("method: {name: moco_v2}\ndata: {augment: swav}", 1, "data.augment"),
        ("loss: {name: supcon}\ndata: {augment: swav}", 1, "data.augment"),
    ] {
        let err = resolve(yaml, p).unwrap_err().to_string();
        assert!(err.contains(key), "{yaml}: {err}");
    }
}

#[test]
fn decoding_data_workers_count_against_the_thread_budget() {
    // 64 cores, 8 ranks: 8 cores each. IDX needs no decoding: 8 threads, 4 workers.
    let topo = Topology { world_size: 8, local_size: 8, host_cores: 64, rank_cores: 64 };
    let dir = tempfile::tempdir().unwrap();
    let csv = dir.path().join("pairs.csv");
    std::fs::write(&csv, "image,caption\n").unwrap();
    let plan = |data: &str| {
        let root = if data.contains("csv") { csv.clone() } else { dir.path().to_path_buf() };
        let text = format!("data: {{root: {}, {data}}}\ntrain: {{global_batch: 64}}\n", root.display());
        let plan = Plan::resolve(Config::from_yaml(&text, "a.yaml").unwrap(), topo, &Registry).unwrap();
        (plan.threads, plan.workers, plan.threads_source)
    };
    assert_eq!(plan("dataset: fashion_mnist").0, 8);
    // Image folders decode: the 4 default workers take 4 of the 8 cores.
    let (threads, workers, source) = plan("dataset: image_folder");
    assert_eq!((threads, workers), (4, 4), "{source}");
    assert!(source.contains("decoding workers"), "{source}");
    // Never under half the share; train.threads overrides the budget.
    assert_eq!(plan("dataset: image_folder, workers: 7").0, 4);
    assert_eq!(plan("dataset: csv, workers: 2").0, 6);
    let text = format!("data: {{root: {}, dataset: csv}}\ntrain: {{global_batch: 64, threads: 8}}\n", csv.display());
    assert_eq!(Plan::resolve(Config::from_yaml(&text, "a.yaml").unwrap(), topo, &Registry).unwrap().threads, 8);
}

#[test]
fn the_resolved_yaml_loads_back_into_the_same_plan() {
    let topo = Topology { world_size: 2, local_size: 2, host_cores: 2, rank_cores: 1 };
    let dir = tempfile::tempdir().unwrap();
    for yaml in [
        "loss: {name: triplet, margin: 0.3}\n",
        "method: {name: moco_v2, queue_size: 512}\nloss: {name: infonce}\ntrain: {global_batch: 64}\n",
        "method: {name: byol, predictor_hidden: 16}\ntrain: {optimizer: {name: sgd, lars: true}}\n",
        "loss: {name: clip}\n",
        "model: {width: 8, embed_dim: 64}\ntrain: {optimizer: {name: sgd}, schedule: {name: constant}}\n",
    ] {
        let text = format!("data: {{root: {}}}\n{yaml}", dir.path().display());
        let plan = Plan::resolve(Config::from_yaml(&text, "a.yaml").unwrap(), topo, &Registry).unwrap();
        let resolved = plan.resolved_yaml();
        let again = Plan::resolve(Config::from_yaml(&resolved, "config.yaml").unwrap(), topo, &Registry)
            .unwrap_or_else(|e| panic!("{e}\n{resolved}"));
        assert_eq!(again.describe(), plan.describe());
        assert_eq!(again.resolved_yaml(), resolved, "a fixed point");
        assert!(resolved.contains("seed:") && resolved.contains("metrics:"), "every default is written");
        assert!(resolved.contains("width:"), "the encoder's keys are written: {resolved}");
    }
}

/// A method defined outside the crate: one backbone, no head, NT-Xent at a
/// temperature of its own key. It touches nothing but this file and one
/// registration line.
struct TwinSpec;

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct TwinKeys {
    /// The NT-Xent temperature of this method.
    tau: f64,
}

impl Default for TwinKeys {
    fn default() -> Self {
        Self { tau: 0.5 }
    }
}

impl MethodSpec for TwinSpec {
    fn name(&self) -> &'static str {
        "twin_test"
    }
    fn defaults(&self) -> Settings {
        Settings::of(&TwinKeys::default())
    }
    fn own_loss(&self) -> LossKind {
        LossKind::NtXent
    }
    fn model_keys(&self) -> &'static [&'static str] {
        &[]
    }
    fn check(&self, settings: &Settings, _run: &RunInfo) -> std::result::Result<(), ConfigError> {
        let k: TwinKeys = settings.parse("method")?;
        if !(k.tau > 0.0) {
            return Err(invalid("method.tau", format!("must be > 0, got {}", k.tau)));
        }
        Ok(())
    }
    fn describe(&self, settings: &Settings, _run: &RunInfo) -> String {
        format!(" method=twin_test tau={}", settings.parse::<TwinKeys>("method").unwrap().tau)
    }
}

struct Twin {
    vs: VarStore,
    backbone: Box<dyn Encoder>,
    tau: f64,
}

impl Method for Twin {
    fn name(&self) -> &'static str {
        "twin_test"
    }
    fn var_store(&self) -> &VarStore {
        &self.vs
    }
    fn forward(&self, batch: &Batch, _comm: &dyn GlobalSum) -> Result<Towers> {
        let grad = batch.views.iter().map(|v| self.backbone.forward_t(v, true)).collect();
        Ok(Towers { grad, ..Default::default() })
    }
    fn loss_share(&self, g: &Gathered, _batch: &Batch, ctx: &Ctx) -> Result<Share> {
        Ok(Share { loss: ntxent_share(&g.towers[0], &g.towers[1], self.tau, ctx.shard)?, monitor: None })
    }
    fn backbone(&self) -> &dyn Encoder {
        self.backbone.as_ref()
    }
}

fn build_twin(vs: VarStore, spec: &Spec) -> Result<Box<dyn Method>> {
    let keys: TwinKeys = spec.method.parse().map_err(|e| contrast_nn::NnError::Param(e.to_string()))?;
    let backbone = encoder::build(&(&vs.root() / "backbone"), spec)?;
    Ok(Box::new(Twin { vs, backbone, tau: keys.tau }))
}

#[test]
fn a_method_defined_outside_registers_resolves_and_trains_one_step() {
    contrast_nn::registry::register_method(MethodEntry { spec: &TwinSpec, build: build_twin }).unwrap();
    let err = contrast_nn::registry::register_method(MethodEntry { spec: &TwinSpec, build: build_twin });
    assert!(err.is_err(), "a name registers once");
    // Its own key is accepted; another method's key is refused, naming it.
    let plan =
        resolve("method: {name: twin_test, tau: 0.3}\nmodel: {width: 4, embed_dim: 16}\ntrain: {global_batch: 8}", 1)
            .unwrap();
    assert!(plan.describe().contains("method=twin_test tau=0.3"), "{}", plan.describe());
    let err = resolve("method: {name: twin_test, queue_size: 64}", 1).unwrap_err().to_string();
    assert!(err.contains("method.queue_size") && err.contains("twin_test"), "{err}");
    let err = resolve("method: {name: twin_test, tau: -1}", 1).unwrap_err().to_string();
    assert!(err.contains("method.tau"), "{err}");
    let err = resolve("method: {name: twin_test}\nmodel: {proj_dim: 8}", 1).unwrap_err().to_string();
    assert!(err.contains("model.proj_dim"), "{err}");
    // One step, through the same engine as the built-in methods.
    let mut spec = Spec::new(plan.method.clone(), plan.loss, 8);
    spec.model = plan.config.model.clone();
    let m = contrast_nn::method::build(&spec).unwrap();
    assert_eq!(m.name(), "twin_test");
    let views: Vec<Tensor> = (0..2).map(|_| Tensor::randn([8, 1, 8, 8], (Kind::Float, Device::Cpu))).collect();
    let batch = Batch { step: 0, views: &views, captions: None, labels: None, mix: None, indices: &[] };
    let params: Vec<Tensor> = m.params().into_iter().map(|p| p.tensor).collect();
    let towers = m.forward(&batch, &Solo).unwrap();
    let out = GlobalBatch::new(&Solo, 8)
        .step_towers(&towers, &params, &[], |g, ctx| Ok(m.loss_share(g, &batch, ctx)?.loss))
        .unwrap();
    assert!(out.loss.is_finite() && out.loss > 0.0);
    assert!(params.iter().all(|p| p.grad().defined()), "every parameter has a gradient");
    assert_eq!(m.features(&views[0]).size(), [8, 16]);
}

#[test]
fn survey_methods_refuse_bad_counts_naming_the_key() {
    let err = |yaml: &str| resolve(yaml, 2).unwrap_err().to_string();
    // SwAV: prototypes below 2, or above the items once the data is known.
    let e = err("method: {name: swav, prototypes: 1}\ntrain: {global_batch: 8}");
    assert!(e.contains("method.prototypes") && e.contains("at least 2"), "{e}");
    let mut plan = resolve("method: {name: swav, prototypes: 300}\ntrain: {global_batch: 8}", 2).unwrap();
    let e = plan.resolve_items(240).unwrap_err().to_string();
    assert!(e.contains("method.prototypes") && e.contains("240 training items"), "{e}");
    let e = err("method: {name: swav, queue_size: 12}\ntrain: {global_batch: 8}");
    assert!(e.contains("method.queue_size") && e.contains("multiple"), "{e}");
    // MoCHi: more hard negatives than the queue holds; mixing without hard negatives.
    let e = err("method: {name: moco_v2, queue_size: 64, hard_negatives: 65}\ntrain: {global_batch: 8}");
    assert!(e.contains("method.hard_negatives") && e.contains("queue of 64"), "{e}");
    let e = err("method: {name: moco_v2, queue_size: 64, mix_query: 4}\ntrain: {global_batch: 8}");
    assert!(e.contains("method.mix_query") && e.contains("hard_negatives"), "{e}");
    // InstDisc: a bank larger than any machine's memory says how many bytes it needs.
    let mut plan = resolve("method: {name: instdisc}\nmodel: {proj_dim: 128}\ntrain: {global_batch: 8}", 2).unwrap();
    if contrast_config::host_memory_bytes().is_some() {
        let e = plan.resolve_items(1 << 40).unwrap_err().to_string();
        assert!(e.contains("model.proj_dim") && e.contains("bytes") && e.contains("memory bank"), "{e}");
    }
    plan.resolve_items(240).unwrap();
    assert!(plan.describe().contains("bank=240×128 (0.1 MiB per rank)"), "{}", plan.describe());
    // DeepCluster: clusters below 2 or above the items; no k-means iteration.
    let e = err("method: {name: deepcluster, clusters: 1}\ntrain: {global_batch: 8}");
    assert!(e.contains("method.clusters") && e.contains("at least 2"), "{e}");
    let e = err("method: {name: deepcluster, clusters: 10, kmeans_iters: 0}\ntrain: {global_batch: 8}");
    assert!(e.contains("method.kmeans_iters"), "{e}");
    let e =
        err("method: {name: deepcluster, clusters: 10, pca_dim: 65}\nmodel: {proj_dim: 64}\ntrain: {global_batch: 8}");
    assert!(e.contains("method.pca_dim") && e.contains("model.proj_dim = 64"), "{e}");
    let mut plan = resolve("method: {name: deepcluster, clusters: 300}\ntrain: {global_batch: 8}", 2).unwrap();
    let e = plan.resolve_items(240).unwrap_err().to_string();
    assert!(e.contains("method.clusters") && e.contains("300 clusters for 240 training items"), "{e}");
    // CPC: a temperature that is neither 0 (bilinear) nor a usable one.
    for bad in ["-0.1", "0.0001", ".nan", "1000"] {
        let e = err(&format!("method: {{name: cpc, temperature: {bad}}}\ntrain: {{global_batch: 8}}"));
        let says = if bad == ".nan" { "finite" } else { "[0.001, 100]" };
        assert!(e.contains("method.temperature") && e.contains(says), "{bad}: {e}");
    }
    resolve("method: {name: cpc, temperature: 0.1}\ntrain: {global_batch: 8}", 2).unwrap();
    // Another method's key stays an error.
    let e = err("method: {name: barlow_twins, prototypes: 10}\ntrain: {global_batch: 8}");
    assert!(e.contains("method.prototypes") && e.contains("barlow_twins"), "{e}");
}

#[test]
fn pba_members_are_placed_or_the_population_is_refused_before_training() {
    use contrast_nn::method::pba::Placement;
    assert_eq!(Placement::of(2, 4).unwrap(), Placement::Spans { ranks: 2 });
    assert_eq!(Placement::of(4, 2).unwrap(), Placement::Shares { members: 2 });
    assert_eq!(Placement::of(2, 2).unwrap(), Placement::Spans { ranks: 1 });
    let p = Placement::Shares { members: 2 };
    assert_eq!(p.members_of(1), (2..4, 1));
    assert_eq!(p.first_rank(3), 1);
    let s = Placement::Spans { ranks: 2 };
    assert_eq!(s.members_of(3), (1..2, 1));
    assert_eq!(s.first_rank(1), 2);
    for (pop, world) in [(3, 2), (2, 3), (1, 1), (4, 6)] {
        let e = Placement::of(pop, world).unwrap_err().to_string();
        assert!(e.contains("method.population"), "{e}");
    }
    let pba = "method: {name: pba, population: 3, interval: 5}\ntrain: {global_batch: 12, steps: 10}\n";
    let e = resolve(pba, 2).unwrap_err().to_string();
    assert!(e.contains("method.population") && e.contains("cannot be placed on 2 ranks"), "{e}");
    let plan = resolve(pba, 3).unwrap();
    assert_eq!((plan.method.name.as_str(), plan.loss), ("pba", LossKind::NtXent));
    let e = resolve(&pba.replace("interval: 5", "interval: 0"), 1).unwrap_err().to_string();
    assert!(e.contains("method.interval"), "{e}");
    let e = resolve(&pba.replace("interval: 5", "interval: 5, queue_size: 4"), 1).unwrap_err().to_string();
    assert!(e.contains("method.queue_size"), "{e}");
}

#[test]
fn the_shard_index_dir_applies_to_webdataset_only() {
    let e = resolve("data: {index_dir: /tmp/idx}\n", 1).unwrap_err().to_string();
    assert!(e.contains("data.index_dir") && e.contains("not webdataset"), "{e}");
    let shards = "data: {dataset: webdataset, index_dir: /tmp/idx}\nmodel: {encoder: convnet}\n";
    let plan = resolve(shards, 1).unwrap();
    assert_eq!(plan.config.data.index_dir.as_deref(), Some(std::path::Path::new("/tmp/idx")));
}
