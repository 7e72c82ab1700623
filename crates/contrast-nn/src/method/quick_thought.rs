//! Quick-Thought (Logeswaran & Lee 2018): a sentence encoder f and a context
//! encoder g; each sentence must pick, among the context encodings of the
//! global batch, the next sentence of its own text (its quote).
//!
//! # Conventions
//! - A training item is a sentence followed by one of its group
//!   (`data.dataset: lines` with a group column); the batch holds both.
//! - The score of a candidate c for a sentence s is f(s)·g(c) (the paper's
//!   inner product, `method.normalize: false`) or their cosine; the loss is
//!   InfoNCE over the N candidates (`loss.name: infonce`, `loss.temperature`),
//!   mean over the N sentences. The paper also predicts the previous sentence;
//!   here each adjacent pair is one item, seen from its first sentence.
//! - Evaluation embeds the concatenation [f(x), g(x)], as the paper does at
//!   test time: `2 · model.proj_dim` features.
//! - Both encoders are text towers (`model.text.*`): variables
//!   `backbone.sentence.*` and `backbone.context.*`; their dropout masks are
//!   keyed as views 0 and 1.

use super::simcse::{captions, check_text_batch};
use super::{set_kind, Batch, Method, MethodEntry, Share, Spec};
use crate::encoder::text::{Captions, Noise, TextTower};
use crate::encoder::Encoder;
use crate::engine::{Gathered, Towers};
use crate::loss::{infonce_share, Ctx, GlobalSum};
use crate::Result;
use contrast_config::{ConfigError, LossKind, MethodSpec, RunInfo, Settings};
use serde::{Deserialize, Serialize};
use tch::nn::VarStore;
use tch::Tensor;

/// Quick-Thought's `method.*` keys.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct QuickThoughtKeys {
    /// Score by cosine instead of the paper's inner product.
    pub normalize: bool,
}

/// Quick-Thought's configuration.
pub struct QuickThoughtSpec;

impl MethodSpec for QuickThoughtSpec {
    fn name(&self) -> &'static str {
        "quick_thought"
    }

    fn defaults(&self) -> Settings {
        Settings::of(&QuickThoughtKeys::default())
    }

    fn own_loss(&self) -> LossKind {
        LossKind::InfoNce
    }

    fn model_keys(&self) -> &'static [&'static str] {
        &["proj_dim", "text"]
    }

    fn text_only(&self) -> bool {
        true
    }

    fn runs_in_chunks(&self) -> bool {
        true
    }

    fn sentence_pairs(&self) -> bool {
        true
    }

    fn check(&self, settings: &Settings, run: &RunInfo) -> std::result::Result<(), ConfigError> {
        settings.parse::<QuickThoughtKeys>("method")?;
        check_text_batch("Quick-Thought", run)
    }

    fn describe(&self, settings: &Settings, _run: &RunInfo) -> String {
        let k: QuickThoughtKeys = settings.parse("method").unwrap_or_default();
        format!(" method=QuickThought normalize={}", k.normalize)
    }

    fn negatives_per_anchor(&self, _settings: &Settings, run: &RunInfo) -> Option<usize> {
        Some(run.global_batch - 1)
    }
}

/// The registration of Quick-Thought.
pub const ENTRY: MethodEntry =
    MethodEntry { spec: &QuickThoughtSpec, build: |vs, spec| Ok(Box::new(QuickThought::new(vs, spec)?)) };

/// The two encoders, as one encoder of their concatenated outputs (what evaluation embeds).
pub struct Pair {
    sentence: TextTower,
    context: TextTower,
}

impl Encoder for Pair {
    fn forward_t(&self, x: &Tensor, train: bool) -> Tensor {
        Tensor::cat(&[self.sentence.forward_t(x, train), self.context.forward_t(x, train)], 1)
    }

    fn out_dim(&self) -> i64 {
        self.sentence.out_dim() + self.context.out_dim()
    }
}

/// Sentence and context encoders.
pub struct QuickThought {
    vs: VarStore,
    pair: Pair,
    normalize: bool,
    temperature: f64,
    seed: u64,
}

impl QuickThought {
    /// Build into `vs` (variables `backbone.sentence.*`, `backbone.context.*`).
    pub fn new(mut vs: VarStore, spec: &Spec) -> Result<Self> {
        let keys: QuickThoughtKeys = super::settings(spec)?;
        let (m, root) = (&spec.model, vs.root() / "backbone");
        let tower = |name: &str| TextTower::new(&(&root / name), spec.text_vocab, &m.text, m.proj_dim);
        let pair = Pair { sentence: tower("sentence"), context: tower("context") };
        set_kind(&mut vs, spec);
        Ok(Self { vs, pair, normalize: keys.normalize, temperature: spec.temperature(), seed: spec.seed })
    }
}

impl Method for QuickThought {
    fn name(&self) -> &'static str {
        "quick_thought"
    }

    fn var_store(&self) -> &VarStore {
        &self.vs
    }

    fn forward(&self, batch: &Batch, _comm: &dyn GlobalSum) -> Result<Towers> {
        let c = captions("Quick-Thought", batch, 2)?;
        let noise = |view| Noise { seed: self.seed, step: batch.step, view };
        let s = self.pair.sentence.encode(&c.caption(0), Some(&noise(0)));
        let next = self.pair.context.encode(&c.caption(1), Some(&noise(1)));
        Ok(Towers { grad: vec![s, next], ..Default::default() })
    }

    fn loss_share(&self, g: &Gathered, _batch: &Batch, ctx: &Ctx) -> Result<Share> {
        let (s, next) = (&g.towers[0], &g.towers[1]);
        let loss = infonce_share(s, next, self.temperature, self.normalize, ctx.shard)?;
        Ok(Share { loss, monitor: Some(s.shallow_clone()) })
    }

    fn backbone(&self) -> &dyn Encoder {
        &self.pair
    }

    fn encode_text(&self, captions: &Captions) -> Option<Tensor> {
        Some(self.pair.forward_t(&captions.pack(), false))
    }
}
