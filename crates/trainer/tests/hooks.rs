//! The method hooks the survey needs, through the training loop in-process: a
//! probe method counts `on_epoch` calls in its checkpointed state, so a resume
//! in the middle of an epoch that called it again would show; it sees the
//! items of its rows (`Batch::indices`), the communicator, and a feature pass
//! over the training set split by item across the ranks; from epoch 1 on it
//! samples only the items ≡ epoch (mod 3), which the batches it is handed show
//! only when the pipeline waited for that epoch's `on_epoch` (and, after a
//! resume, asked it again from the restored state).

use crate::common::*;
use contrast_comm::Solo;
use contrast_config::{ConfigError, LossKind, MethodSpec, RunInfo, Settings};
use contrast_nn::encoder::{self, Encoder};
use contrast_nn::engine::{Gathered, Towers};
use contrast_nn::loss::{ntxent_share, Ctx, GlobalSum};
use contrast_nn::method::{Batch, EpochCtx, Method, MethodEntry, Sampling, Share, Spec};
use contrast_nn::state::StateItem;
use contrast_nn::Result;
use tch::nn::VarStore;
use tch::Tensor;

/// The probe, under its name; `skewed_probe` hands rank 1 a sampling of its own.
struct ProbeSpec(&'static str);

impl MethodSpec for ProbeSpec {
    fn name(&self) -> &'static str {
        self.0
    }
    fn defaults(&self) -> Settings {
        Settings::default()
    }
    fn own_loss(&self) -> LossKind {
        LossKind::NtXent
    }
    fn model_keys(&self) -> &'static [&'static str] {
        &[]
    }
    fn check(&self, _settings: &Settings, _run: &RunInfo) -> std::result::Result<(), ConfigError> {
        Ok(())
    }
    fn describe(&self, _settings: &Settings, _run: &RunInfo) -> String {
        format!(" method={}", self.0)
    }
}

/// A backbone and NT-Xent; `method.epochs` counts the on_epoch calls, `method.last_epoch` the last.
struct Probe {
    vs: VarStore,
    backbone: Box<dyn Encoder>,
    counts: Tensor,
    /// The last feature pass: this rank's rows, item-sharded.
    features: Tensor,
    items: usize,
    /// Whether this rank's sampling differs from the others' (a broken method).
    skewed: bool,
}

impl Method for Probe {
    fn name(&self) -> &'static str {
        "epoch_probe"
    }
    fn var_store(&self) -> &VarStore {
        &self.vs
    }
    fn forward(&self, batch: &Batch, _comm: &dyn GlobalSum) -> Result<Towers> {
        assert_eq!(batch.indices.len(), batch.views[0].size()[0] as usize, "one item per row");
        let epoch = self.counts.double_value(&[1]) as usize;
        if epoch > 0 {
            let off: Vec<_> = batch.indices.iter().filter(|&&i| i % 3 != epoch % 3).collect();
            assert!(off.is_empty(), "step {}: items {off:?} are outside epoch {epoch}'s sampling", batch.step + 1);
        }
        let grad = batch.views.iter().map(|v| self.backbone.forward_t(v, true)).collect();
        Ok(Towers { grad, ..Default::default() })
    }
    fn loss_share(&self, g: &Gathered, _batch: &Batch, ctx: &Ctx) -> Result<Share> {
        Ok(Share { loss: ntxent_share(&g.towers[0], &g.towers[1], 0.5, ctx.shard)?, monitor: None })
    }
    fn on_epoch(&mut self, ctx: &mut EpochCtx) -> Result<()> {
        // A collective at the epoch's start: every rank is there.
        let mut one = [1.0];
        ctx.comm.sum(&mut one);
        assert_eq!(one[0], ctx.world_size as f64);
        let calls = self.counts.double_value(&[0]) + 1.0;
        let _ = self.counts.copy_(&Tensor::from_slice(&[calls, ctx.epoch as f64]));
        let f = ctx.features.take().expect("the feature pass ran");
        let rows = contrast_nn::state::item_rows(self.items, ctx.rank, ctx.world_size) as i64;
        assert_eq!(f.size(), [rows, 32], "this rank's items only");
        let _ = self.features.copy_(&f);
        Ok(())
    }
    fn wants_features(&self, _epoch: usize) -> bool {
        true
    }
    fn sampling(&self, _comm: &dyn GlobalSum) -> Result<Option<Sampling>> {
        let epoch = self.counts.double_value(&[1]) as usize;
        let weights = (0..self.items).map(|i| (i % 3 == epoch % 3 || self.skewed) as u8 as f64).collect();
        Ok((epoch > 0).then(|| Sampling::Weighted(std::sync::Arc::new(weights))))
    }
    fn state(&self) -> Vec<StateItem> {
        let mut items = contrast_nn::state::var_store_items(&self.vs);
        items.push(StateItem::replicated("method.epoch_calls", self.counts.shallow_clone()));
        let layout = contrast_nn::state::Layout::ItemSharded { items: self.items };
        items.push(StateItem { name: "method.features".into(), tensor: self.features.shallow_clone(), layout });
        items
    }
    fn backbone(&self) -> &dyn Encoder {
        self.backbone.as_ref()
    }
}

fn build_probe(vs: VarStore, spec: &Spec) -> Result<Box<dyn Method>> {
    let skewed = spec.method.name == "skewed_probe" && spec.shard.rank == 1;
    let backbone = encoder::build(&(&vs.root() / "backbone"), spec)?;
    let items = spec.items.expect("training knows its items");
    let rows = contrast_nn::state::item_rows(items, spec.shard.rank, spec.shard.world_size) as i64;
    let features = Tensor::zeros([rows, backbone.out_dim()], (tch::Kind::Float, tch::Device::Cpu));
    Ok(Box::new(Probe { vs, backbone, counts: Tensor::from_slice(&[0.0f64, -1.0]), features, items, skewed }))
}

#[test]
fn on_epoch_runs_once_per_epoch_and_not_again_when_a_resume_lands_mid_epoch_and_its_sampling_draws_the_batches() {
    contrast_nn::registry::register_method(MethodEntry { spec: &ProbeSpec("epoch_probe"), build: build_probe })
        .unwrap();
    contrast_nn::registry::register_method(MethodEntry { spec: &ProbeSpec("skewed_probe"), build: build_probe })
        .unwrap();
    let fx = Fixture::new();
    let cfg = fx.config("probe", "ntxent", "method: {name: epoch_probe}\n");
    let yaml = std::fs::read_to_string(&cfg).unwrap().replace(", proj_hidden: 16", "").replace("proj_dim: 8, ", "");
    std::fs::write(&cfg, yaml).unwrap();
    let train = |steps: usize, resume: bool| {
        let sets = [format!("train.steps={steps}"), format!("train.resume={resume}"), "metrics.enabled=false".into()];
        trainer::train(&Solo, &cfg, &sets).unwrap();
        tensor_of(&fx.path(&format!("probe/step-{steps}")), "method.epoch_calls")
    };
    // 240 items at global batch 8: 30 steps an epoch. Steps 1–35 start epochs 0 and 1.
    assert_eq!(train(35, false), [2.0, 1.0]);
    // A resume at step 35 lands inside epoch 1: nothing is recomputed.
    assert_eq!(train(40, true), [2.0, 1.0]);
    // Step 61 starts epoch 2.
    assert_eq!(train(65, true), [3.0, 2.0]);
    // The feature pass of 2 ranks (each over its own items) saves the features of 1 rank, in item order.
    let first_epoch = |name: &str, ranks: usize| {
        let sets = [
            "train.steps=1".to_string(),
            "metrics.enabled=false".into(),
            format!("checkpoint.dir={}", fx.path(name).display()),
        ];
        contrast_comm::Threads::run(ranks, |c| trainer::train(&c, &cfg, &sets).map(|_| ()).map_err(|e| e.to_string()))
            .into_iter()
            .collect::<std::result::Result<Vec<_>, _>>()
            .unwrap();
        tensor_of(&fx.path(&format!("{name}/step-1")), "method.features")
    };
    let (one, two) = (first_epoch("features-1", 1), first_epoch("features-2", 2));
    assert_eq!(one.len(), 240 * 32);
    assert!(rel_err(&two, &one) < 1e-5, "{:e}", rel_err(&two, &one));
    for row in one.chunks(32) {
        assert!((row.iter().map(|x| x * x).sum::<f64>().sqrt() - 1.0).abs() < 1e-4, "unit rows");
    }
    // A method whose ranks hand over different samplings is stopped when the epoch opens.
    let skewed = cfg.with_file_name("skewed.yaml");
    std::fs::write(&skewed, std::fs::read_to_string(&cfg).unwrap().replace("epoch_probe", "skewed_probe")).unwrap();
    let sets = [
        "train.steps=35".to_string(),
        "metrics.enabled=false".into(),
        format!("checkpoint.dir={}", fx.path("skewed").display()),
    ];
    let errs: Vec<String> = contrast_comm::Threads::run(2, |c| {
        trainer::train(&c, &skewed, &sets).map(|_| ()).map_err(|e| format!("{e:#}"))
    })
    .into_iter()
    .filter_map(|r| r.err())
    .collect();
    assert_eq!(errs.len(), 2, "both ranks stop: {errs:?}");
    assert!(errs[0].contains("epoch 1 starting at step 31: rank 1's sampling differs from rank 0's"), "{errs:?}");
}

fn rel_err(a: &[f64], b: &[f64]) -> f64 {
    let num = a.iter().zip(b).map(|(x, y)| (x - y).powi(2)).sum::<f64>().sqrt();
    num / b.iter().map(|y| y * y).sum::<f64>().sqrt().max(1e-300)
}
