//! Open sets of components: methods and encoders declare their own keys,
//! defaults and checks next to their code, and a [`Catalog`] of them (the
//! registry in `contrast-nn`) is what [`crate::Plan::resolve`] consults. Adding
//! a method or an encoder touches its own file and one registration line; this
//! crate names none of them.

use crate::{invalid, AugmentPreset, ConfigError, LossKind, Norm};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use yaml_serde::{Mapping, Value};

/// A component's own keys (`method.*` or the encoder's `model.*`), as YAML values.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Settings(pub Mapping);

impl Settings {
    /// The fields of a settings struct (its defaults, when `value` is `T::default()`).
    pub fn of<T: Serialize>(value: &T) -> Self {
        match yaml_serde::to_value(value).expect("settings serialise") {
            Value::Mapping(m) => Settings(m),
            other => panic!("settings must serialise to a mapping, got {other:?}"),
        }
    }

    /// The key names.
    pub fn keys(&self) -> impl Iterator<Item = &str> {
        self.0.keys().filter_map(Value::as_str)
    }

    /// The value of `key`.
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.0.get(key)
    }

    /// Set `key` to `value` (tests and presets).
    pub fn set(&mut self, key: &str, value: impl Serialize) {
        let value = yaml_serde::to_value(value).expect("a value serialises");
        self.0.insert(Value::String(key.into()), value);
    }

    /// `defaults` with these settings laid over them; nested mappings merge key
    /// by key (`model.vit.patch_size` given keeps the preset's other `vit` keys).
    pub fn over(&self, defaults: &Settings) -> Settings {
        fn merge(into: &mut Mapping, from: &Mapping) {
            for (k, v) in from {
                match (into.get_mut(k), v) {
                    (Some(Value::Mapping(a)), Value::Mapping(b)) => merge(a, b),
                    _ => {
                        into.insert(k.clone(), v.clone());
                    }
                }
            }
        }
        let mut merged = defaults.0.clone();
        merge(&mut merged, &self.0);
        Settings(merged)
    }

    /// The settings as the component's typed struct; an error names `section.key`.
    pub fn parse<T: DeserializeOwned>(&self, section: &str) -> Result<T, ConfigError> {
        serde_path_to_error::deserialize(Value::Mapping(self.0.clone())).map_err(|e| {
            let key = format!("{section}.{}", e.path());
            invalid(key, e.inner().to_string())
        })
    }
}

/// What a method's checks see of the rest of the run.
#[derive(Debug, Clone, Copy)]
pub struct RunInfo {
    /// Global batch N.
    pub global_batch: usize,
    /// Ranks P.
    pub world_size: usize,
    /// The loss.
    pub loss: LossKind,
    /// The encoder's normalisation.
    pub norm: Norm,
    /// Width of the projection (`model.proj_dim`): rows of per-item state.
    pub proj_dim: usize,
    /// Items of the training set, once the data is open (None while the
    /// config alone is checked): methods with per-item state check and
    /// describe it when it is known ([`crate::Plan::resolve_items`]).
    pub items: Option<usize>,
}

/// A training method's configuration: its name, keys, losses and checks.
/// Implemented next to the method (`contrast-nn/src/method/<name>.rs`).
pub trait MethodSpec: Send + Sync {
    /// The `method.name` value (`moco_v2`).
    fn name(&self) -> &'static str;
    /// Every `method.*` key it reads, with its default (usually
    /// `Settings::of(&Keys::default())` of a serde struct with a doc per field).
    fn defaults(&self) -> Settings;
    /// The loss when `loss.name` is unset.
    fn own_loss(&self) -> LossKind;
    /// Whether it trains with `loss`.
    fn accepts_loss(&self, loss: LossKind) -> bool {
        loss == self.own_loss()
    }
    /// With `method.name` unset: whether this is the method for `loss`.
    fn is_default_for(&self, _loss: Option<LossKind>) -> bool {
        false
    }
    /// Whether it trains on the views of augmentation `preset` with `loss`.
    fn accepts_augment(&self, preset: AugmentPreset, _loss: LossKind) -> bool {
        preset != AugmentPreset::Swav
    }
    /// The head keys of `model.*` it reads (of `proj_dim`, `proj_hidden`, `text`).
    fn model_keys(&self) -> &'static [&'static str] {
        &["proj_dim", "proj_hidden"]
    }
    /// Check its settings (defaults filled in) against the run; errors name the key.
    fn check(&self, settings: &Settings, run: &RunInfo) -> Result<(), ConfigError>;
    /// Its part of the plan line (` method=MocoV2 queue_size=… queue_shard=…`).
    fn describe(&self, settings: &Settings, run: &RunInfo) -> String;
    /// Negatives per anchor, where the method decides them (a queue); else the loss does.
    fn negatives_per_anchor(&self, _settings: &Settings, _run: &RunInfo) -> Option<usize> {
        None
    }
    /// Whether it keeps state per training item (a memory bank): its checks and
    /// plan line then need the item count ([`crate::Plan::resolve_items`]).
    fn per_item(&self) -> bool {
        false
    }
    /// Keys it holds in a queue (the metrics report its fill); 0 for none.
    fn queue_size(&self, _settings: &Settings) -> usize {
        0
    }
    /// The view whose rows the pipeline makes for a shuffled slice of the global
    /// batch (shuffle-BN's key view), if any.
    fn shuffled_view(&self, _settings: &Settings) -> Option<usize> {
        None
    }
    /// Whether it trains on sentences alone (`data.dataset: lines`, no image):
    /// its batches hold captions and no view.
    fn text_only(&self) -> bool {
        false
    }
    /// Whether a text-only method's items are pairs of adjacent sentences of one
    /// group (Quick-Thought): the corpus needs a group column.
    fn sentence_pairs(&self) -> bool {
        false
    }
    /// Whether its forward is a function of each row alone (no batch statistics
    /// in its heads, no exchange inside it), so the gradient cache
    /// (`train.micro_batch`) may run it in chunks of rows.
    fn runs_in_chunks(&self) -> bool {
        false
    }
}

/// What an encoder's checks see of its input.
#[derive(Debug, Clone, Copy)]
pub struct ImageInfo {
    /// Image channels (1 for IDX, 3 for decoded files).
    pub channels: i64,
    /// Side of the (large) square views (28 for IDX, `data.image_size` for files).
    pub size: i64,
}

/// An image encoder's configuration: its keys among `model.*` and their checks.
/// Implemented next to the encoder (`contrast-nn/src/encoder/<name>.rs`).
pub trait EncoderSpec: Send + Sync {
    /// The `model.encoder` value.
    fn name(&self) -> &'static str;
    /// Every `model.*` key of its own, with its default (a preset's values).
    fn defaults(&self) -> Settings;
    /// Check its settings (defaults filled in) for these images; errors name the key.
    fn check(&self, settings: &Settings, image: &ImageInfo) -> Result<(), ConfigError>;
    /// The groups `model.freeze` may name (`stem`, `layer1`, `blocks.0`, …).
    fn freeze_groups(&self, _settings: &Settings) -> Vec<String> {
        Vec::new()
    }
    /// Its normalisation (batch statistics break exact parity across layouts).
    fn norm(&self, settings: &Settings) -> Norm;
}

/// The registered methods and encoders.
pub trait Catalog {
    /// Every registered method, in registration order.
    fn methods(&self) -> Vec<&'static dyn MethodSpec>;
    /// Every registered encoder, in registration order.
    fn encoders(&self) -> Vec<&'static dyn EncoderSpec>;
    /// The method named `name`.
    fn method(&self, name: &str) -> Option<&'static dyn MethodSpec> {
        self.methods().into_iter().find(|m| m.name() == name)
    }
    /// The encoder named `name`.
    fn encoder(&self, name: &str) -> Option<&'static dyn EncoderSpec> {
        self.encoders().into_iter().find(|e| e.name() == name)
    }
}

/// A method as resolved: its name and its settings with the defaults filled in.
#[derive(Debug, Clone)]
pub struct MethodPlan {
    /// `method.name`.
    pub name: String,
    /// Every key of the method, given or default.
    pub settings: Settings,
    /// Keys it holds in a queue (0 for none).
    pub queue_size: usize,
    /// Shuffle-BN's key view, if any.
    pub shuffled_view: Option<usize>,
    /// The method's configuration (checks run again once the item count is known).
    pub spec: SpecRef,
}

/// A registered method's configuration, shown by name in debug output.
#[derive(Clone, Copy)]
pub struct SpecRef(pub &'static dyn MethodSpec);

impl std::fmt::Debug for SpecRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0.name())
    }
}

impl MethodPlan {
    /// The method of `spec` with `given` keys over its defaults.
    pub fn new(spec: &'static dyn MethodSpec, given: &Settings) -> Self {
        let settings = given.over(&spec.defaults());
        Self {
            name: spec.name().into(),
            queue_size: spec.queue_size(&settings),
            shuffled_view: spec.shuffled_view(&settings),
            settings,
            spec: SpecRef(spec),
        }
    }

    /// The settings as the method's typed struct.
    pub fn parse<T: DeserializeOwned>(&self) -> Result<T, ConfigError> {
        self.settings.parse("method")
    }
}
