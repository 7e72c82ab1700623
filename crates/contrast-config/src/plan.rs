//! The resolved, validated run: every section checked, the method and encoder
//! looked up in the [`Catalog`], keys that do not apply refused, and the
//! derived sizes computed once.

use crate::applies::Rules;
use crate::component::{Catalog, EncoderSpec, ImageInfo, MethodPlan, MethodSpec, RunInfo, Settings};
use crate::{data, invalid, loss, model, run, train, yaml, Config, ConfigError, LossKind, LrScale, Norm};
use std::collections::BTreeSet;

/// Where the run is: world size and ranks per host, as the communicator reports them.
#[derive(Debug, Clone, Copy)]
pub struct Topology {
    /// Number of ranks P.
    pub world_size: usize,
    /// Ranks on this host.
    pub local_size: usize,
    /// Logical cores of this host.
    pub host_cores: usize,
    /// Cores this process may run on (its CPU affinity; MPI launchers often bind a rank to one).
    pub rank_cores: usize,
}

/// The resolved, validated run.
#[derive(Debug, Clone)]
pub struct Plan {
    /// The configuration it was made from (with overrides applied).
    pub config: Config,
    /// The method and its resolved settings.
    pub method: MethodPlan,
    /// The encoder's settings (its `model.*` keys, defaults filled in).
    pub encoder: Settings,
    /// The images the encoder sees.
    pub image: ImageInfo,
    /// Loss family.
    pub loss: LossKind,
    /// Encoder normalisation.
    pub norm: Norm,
    /// Ranks P.
    pub world_size: usize,
    /// Local batch B = N / P.
    pub local_batch: usize,
    /// Global batch N.
    pub global_batch: usize,
    /// Negatives each anchor is contrasted with (over the global batch).
    pub negatives_per_anchor: usize,
    /// Optimiser steps (0 until [`Plan::resolve_epochs`] when the run gives `train.epochs`).
    pub steps: usize,
    /// `train.epochs` and the steps of one epoch, once resolved.
    pub epochs: Option<(f64, usize)>,
    /// Items of the training set, once [`Plan::resolve_items`] saw the data.
    pub items: Option<usize>,
    /// libtorch intra-op threads per rank.
    pub threads: usize,
    /// Where `threads` came from.
    pub threads_source: String,
    /// Data worker threads per rank.
    pub workers: usize,
    /// Peak learning rate after scaling.
    pub peak_lr: f64,
    /// The loss temperature in force (given, or the loss's default).
    pub temperature: f64,
    /// The method's part of the plan line.
    describe_method: String,
    /// The keys the chosen components do not read.
    rules: Rules,
}

/// The method (given, or the default for the loss) and the loss (given, or the method's own).
fn resolve_method(c: &Config, catalog: &dyn Catalog) -> Result<(&'static dyn MethodSpec, LossKind), ConfigError> {
    let names = || catalog.methods().iter().map(|m| m.name()).collect::<Vec<_>>().join(", ");
    let spec = match &c.method.name {
        Some(name) => catalog
            .method(name)
            .ok_or_else(|| invalid("method.name", format!("`{name}` is not a registered method ({})", names())))?,
        None => catalog.methods().into_iter().find(|m| m.is_default_for(c.loss.name)).ok_or_else(|| {
            invalid("method.name", format!("no default method for this loss: set one of {}", names()))
        })?,
    };
    let own = spec.own_loss();
    let loss = c.loss.name.unwrap_or(own);
    if !spec.accepts_loss(loss) {
        return Err(invalid(
            "loss.name",
            format!("{loss:?} is not a loss of method {} (its loss is {own:?})", spec.name()),
        ));
    }
    Ok((spec, loss))
}

/// A text-only method trains on sentences (`data.dataset: lines`), and sentences train only a text-only method.
fn check_input(c: &Config, spec: &dyn MethodSpec) -> Result<(), ConfigError> {
    match (spec.text_only(), c.data.dataset.is_lines()) {
        (true, false) => Err(invalid(
            "data.dataset",
            format!("method {} trains on sentences: set data.dataset: lines (got {:?})", spec.name(), c.data.dataset),
        )),
        (false, true) => Err(invalid(
            "method.name",
            format!(
                "data.dataset: lines holds sentences without images: method {} needs images (text-only methods: simcse, quick_thought)",
                spec.name()
            ),
        )),
        _ => Ok(()),
    }
}

/// The images the encoder sees: 1 channel at 28 px for IDX, RGB at `data.image_size` for files.
fn image_of(c: &Config) -> ImageInfo {
    if !c.data.dataset.is_idx() {
        ImageInfo { channels: 3, size: c.data.image_size as i64 }
    } else {
        ImageInfo { channels: 1, size: 28 }
    }
}

/// The encoder and its settings, checked.
fn resolve_encoder(c: &Config, catalog: &dyn Catalog) -> Result<(&'static dyn EncoderSpec, Settings), ConfigError> {
    let name = &c.model.encoder;
    let spec = catalog.encoder(name).ok_or_else(|| {
        let known: Vec<_> = catalog.encoders().iter().map(|e| e.name()).collect();
        invalid("model.encoder", format!("`{name}` is not a known encoder ({})", known.join(", ")))
    })?;
    let (fixed, what) = (model::SHARED_KEYS, format!("encoder {name}"));
    own_keys(&c.given, "model", &fixed, &spec.defaults(), &what)?;
    let settings = c.model.encoder_keys.over(&spec.defaults());
    spec.check(&settings, &image_of(c))?;
    model::check_freeze(&c.model, &spec.freeze_groups(&settings))?;
    Ok((spec, settings))
}

/// A given `section.key` that the component's declared keys do not hold (besides `fixed`).
fn own_keys(
    given: &BTreeSet<String>,
    section: &str,
    fixed: &[&str],
    declared: &Settings,
    what: &str,
) -> Result<(), ConfigError> {
    for key in given {
        let Some(leaf) = key.strip_prefix(section).and_then(|k| k.strip_prefix('.')) else { continue };
        let top = leaf.split('.').next().unwrap_or(leaf);
        if !fixed.contains(&top) && declared.get(top).is_none() {
            return Err(ConfigError::NotApplicable { key: key.clone(), what: what.into() });
        }
    }
    Ok(())
}

/// The loss's default count of negatives per anchor over a global batch of `n`.
fn negatives_of(loss: LossKind, n: usize) -> usize {
    match loss {
        LossKind::Clip | LossKind::SigLip => n - 1,
        LossKind::BarlowTwins
        | LossKind::BarlowTwinsUnbiased
        | LossKind::NormalizedMse
        | LossKind::NegativeCosine
        | LossKind::CrossEntropy
        | LossKind::InfoNce => 0,
        k if k.is_metric() => n - 1,
        _ => 2 * n - 2,
    }
}

impl Plan {
    /// Validate `config` for the given topology, with the methods and encoders
    /// of `catalog`, and derive every size.
    pub fn resolve(config: Config, topo: Topology, catalog: &dyn Catalog) -> Result<Self, ConfigError> {
        let c = &config;
        let (spec, loss) = resolve_method(c, catalog)?;
        check_input(c, spec)?;
        loss::check(c, loss)?;
        let mut rules = Rules::default();
        loss::rules(loss, &mut rules);
        model::rules(&c.model, spec.name(), spec.model_keys(), &mut rules);
        data::rules(c, loss, &mut rules);
        train::rules(&c.train, &mut rules);
        run::rules(c, &mut rules);
        rules.check(&c.given)?;
        // Every number, the method's and the encoder's keys included, is finite.
        let whole = yaml_serde::to_value(c).map_err(|e| invalid("config", e.to_string()))?;
        if let Some((key, x)) = crate::first_non_finite(&whole) {
            return Err(invalid(key, format!("must be a finite number, got {x}")));
        }
        own_keys(&c.given, "method", &["name"], &spec.defaults(), &format!("method {}", spec.name()))?;
        let temperature = c.loss.temperature_for(loss);
        if !(temperature > 0.0) || !temperature.is_finite() {
            return Err(invalid("loss.temperature", format!("must be > 0, got {temperature}")));
        }
        let (encoder, encoder_settings) = resolve_encoder(c, catalog)?;
        model::check(&c.model)?;
        data::check(c, loss, spec.accepts_augment(c.data.augment, loss), spec.name())?;
        let p = topo.world_size.max(1);
        let global_batch = train::check(c, loss, p)?;
        let peak_lr = match c.train.optimizer.lr_scale {
            LrScale::Absolute => c.train.optimizer.lr,
            LrScale::Per256 => c.train.optimizer.lr * global_batch as f64 / 256.0,
        };
        run::check_eval(c)?;
        run::check_metrics(c, topo)?;
        data::check_text_and_mix(c, loss, global_batch, p)?;
        let norm = encoder.norm(&encoder_settings);
        let proj_dim = c.model.proj_dim.max(0) as usize;
        let info = RunInfo { global_batch, world_size: p, loss, norm, proj_dim, items: None };
        let method = MethodPlan::new(spec, &c.method.keys);
        spec.check(&method.settings, &info)?;
        train::check_micro_batch(c, norm, spec)?;
        let (threads, workers, threads_source) = train::threads_of(c, topo);
        let negatives_per_anchor =
            spec.negatives_per_anchor(&method.settings, &info).unwrap_or_else(|| negatives_of(loss, global_batch));
        Ok(Plan {
            describe_method: spec.describe(&method.settings, &info),
            method,
            image: image_of(c),
            encoder: encoder_settings,
            loss,
            norm,
            world_size: p,
            local_batch: global_batch / p,
            global_batch,
            negatives_per_anchor,
            steps: if c.train.epochs.is_some() { 0 } else { c.train.steps as usize },
            epochs: None,
            items: None,
            threads,
            threads_source,
            workers,
            peak_lr,
            temperature,
            rules,
            config,
        })
    }

    /// The configuration as this plan resolved it, as YAML: every default filled
    /// in (the method's and the encoder's keys too), the method's and the loss's
    /// names and temperature made explicit, and no key the chosen components do
    /// not read (so the text loads back, with `Config::from_yaml`, into the same plan).
    pub fn resolved_yaml(&self) -> String {
        let mut config = self.config.clone();
        config.method.name = Some(self.method.name.clone());
        config.method.keys = self.method.settings.clone();
        config.model.encoder_keys = self.encoder.clone();
        config.loss.name = Some(self.loss);
        config.loss.temperature = Some(self.temperature);
        let mut v = yaml_serde::to_value(&config).expect("a config serialises");
        self.rules.prune(&mut v);
        yaml::shortest_f32(&mut v);
        yaml_serde::to_string(&v).expect("YAML text")
    }

    /// Whether `train.epochs`, or a method with per-item state, still awaits the dataset's length.
    pub fn needs_dataset_len(&self) -> bool {
        (self.config.train.epochs.is_some() && self.epochs.is_none())
            || (self.method.spec.0.per_item() && self.items.is_none())
    }

    /// Resolve `train.epochs` into `train.steps` for a training set of `len`
    /// samples: ⌊len / global_batch⌋ steps per epoch (the last partial batch is
    /// dropped, as the sampler does), rounded to whole steps. A no-op without epochs.
    pub fn resolve_epochs(&mut self, len: usize) -> Result<(), ConfigError> {
        let Some(e) = self.config.train.epochs else { return Ok(()) };
        let per_epoch = len / self.global_batch;
        let steps = (e * per_epoch as f64).round() as usize;
        if steps == 0 {
            return Err(invalid(
                "train.epochs",
                format!("{e} epoch(s) of {len} samples at global batch {} is no whole step", self.global_batch),
            ));
        }
        (self.steps, self.epochs) = (steps, Some((e, per_epoch)));
        self.config.train.steps = steps as i64;
        self.config.train.epochs = None;
        Ok(())
    }

    /// Once the training data is open: the method's checks again with its item
    /// count (a memory bank's size, prototypes against items), and its part
    /// of the plan line with the sizes that follow from it.
    pub fn resolve_items(&mut self, len: usize) -> Result<(), ConfigError> {
        let info = RunInfo {
            global_batch: self.global_batch,
            world_size: self.world_size,
            loss: self.loss,
            norm: self.norm,
            proj_dim: self.config.model.proj_dim.max(0) as usize,
            items: Some(len),
        };
        let spec = self.method.spec.0;
        spec.check(&self.method.settings, &info)?;
        self.describe_method = spec.describe(&self.method.settings, &info);
        self.items = Some(len);
        Ok(())
    }

    /// One human-readable block of the derived sizes, printed at start.
    pub fn describe(&self) -> String {
        format!(
            "plan: loss={:?} temperature={} world_size={} local_batch={} global_batch={} negatives_per_anchor={} steps={}{} \
             threads/rank={} ({}) data_workers/rank={} peak_lr={:.6} norm={:?}",
            self.loss,
            self.temperature,
            self.world_size,
            self.local_batch,
            self.global_batch,
            self.negatives_per_anchor,
            self.steps,
            self.epochs.map(|(e, s)| format!(" (epochs={e} × {s} steps)")).unwrap_or_default(),
            self.threads,
            self.threads_source,
            self.workers,
            self.peak_lr,
            self.norm
        ) + if self.norm == Norm::Batch { " (batch statistics per rank: not exact across world sizes)" } else { "" }
            + &self.describe_method
            + if self.config.train.precision == crate::Precision::Bf16 { " precision=bf16 (encoders under autocast)" } else { "" }
            + &match self.config.train.micro_batch {
                m if m > 0 && m < self.local_batch => format!(" micro_batch={m} (gradient cache)"),
                _ => String::new(),
            }
    }
}
