//! Unsupervised SimCSE (Gao et al. 2021): each sentence of the batch goes
//! through one text encoder twice, and only the dropout masks differ between
//! the two passes; the second pass of the same sentence is the positive, the
//! second passes of the other sentences of the global batch are the negatives.
//!
//! # Conventions
//! - The loss is the paper's: InfoNCE from each first pass to every second
//!   pass on cosine similarity (`loss.name: infonce`, `loss.temperature` 0.05
//!   in `configs/simcse.yaml`), mean over the N sentences; `ntxent` (SimCLR's
//!   form, 2N − 2 negatives) is accepted too.
//! - The encoder is the text tower (`model.text.*`, variables `backbone.*`),
//!   projected to `model.proj_dim`; evaluation embeds its output without
//!   dropout. The paper's MLP pooler, used in training only, is left out.
//! - The dropout masks are keyed on (seed, step, global row, pass, layer)
//!   ([`crate::encoder::text::dropout_mask`]): the two passes are views 0 and 1.

use super::{set_kind, Batch, Method, MethodEntry, Share, Spec};
use crate::encoder::text::{Captions, Noise, TextTower};
use crate::encoder::Encoder;
use crate::engine::{Gathered, Towers};
use crate::loss::{infonce_share, ntxent_share, Ctx, GlobalSum};
use crate::{NnError, Result};
use contrast_config::{invalid, ConfigError, LossKind, MethodSpec, RunInfo, Settings};
use tch::nn::VarStore;

/// SimCSE's configuration: no `method.*` keys; reads `model.proj_dim` and `model.text`.
pub struct SimcseSpec;

impl MethodSpec for SimcseSpec {
    fn name(&self) -> &'static str {
        "simcse"
    }

    fn defaults(&self) -> Settings {
        Settings::default()
    }

    fn own_loss(&self) -> LossKind {
        LossKind::InfoNce
    }

    fn accepts_loss(&self, loss: LossKind) -> bool {
        matches!(loss, LossKind::InfoNce | LossKind::NtXent)
    }

    fn model_keys(&self) -> &'static [&'static str] {
        &["proj_dim", "text"]
    }

    fn text_only(&self) -> bool {
        true
    }

    fn runs_in_chunks(&self) -> bool {
        // one tower, row by row, masks keyed on the global row: the gradient cache may split it.
        true
    }

    fn check(&self, _settings: &Settings, run: &RunInfo) -> std::result::Result<(), ConfigError> {
        check_text_batch("SimCSE", run)
    }

    fn describe(&self, _settings: &Settings, _run: &RunInfo) -> String {
        " method=SimCSE".into()
    }

    fn negatives_per_anchor(&self, _settings: &Settings, run: &RunInfo) -> Option<usize> {
        Some(if run.loss == LossKind::NtXent { 2 * run.global_batch - 2 } else { run.global_batch - 1 })
    }
}

/// The negatives of a text method are the other sentences of the batch: at least 2.
pub(crate) fn check_text_batch(what: &str, run: &RunInfo) -> std::result::Result<(), ConfigError> {
    if run.global_batch < 2 {
        return Err(invalid("train.global_batch", format!("{what}'s negatives are the other sentences: at least 2")));
    }
    Ok(())
}

/// The registration of SimCSE.
pub const ENTRY: MethodEntry =
    MethodEntry { spec: &SimcseSpec, build: |vs, spec| Ok(Box::new(SimCse::new(vs, spec)?)) };

/// One text encoder, run twice.
pub struct SimCse {
    vs: VarStore,
    tower: TextTower,
    loss: LossKind,
    temperature: f64,
    seed: u64,
}

impl SimCse {
    /// Build into `vs` (variables `backbone.*`).
    pub fn new(mut vs: VarStore, spec: &Spec) -> Result<Self> {
        let tower = TextTower::new(&(vs.root() / "backbone"), spec.text_vocab, &spec.model.text, spec.model.proj_dim);
        set_kind(&mut vs, spec);
        Ok(Self { vs, tower, loss: spec.loss, temperature: spec.temperature(), seed: spec.seed })
    }
}

/// The batch's captions, `per_row` of them per row; an error naming the method otherwise.
pub(crate) fn captions<'a>(what: &str, batch: &'a Batch, per_row: i64) -> Result<&'a Captions> {
    match batch.captions {
        Some(c) if c.per_row == per_row => Ok(c),
        Some(c) => Err(NnError::Shape(format!("{what} takes {per_row} caption(s) per row, got {}", c.per_row))),
        None => Err(NnError::Param(format!("{what} trains on sentences: the batch has no captions"))),
    }
}

impl Method for SimCse {
    fn name(&self) -> &'static str {
        "simcse"
    }

    fn var_store(&self) -> &VarStore {
        &self.vs
    }

    fn forward(&self, batch: &Batch, _comm: &dyn GlobalSum) -> Result<Towers> {
        let c = captions("SimCSE", batch, 1)?;
        let pass = |view| self.tower.encode(c, Some(&Noise { seed: self.seed, step: batch.step, view }));
        Ok(Towers { grad: vec![pass(0), pass(1)], ..Default::default() })
    }

    fn loss_share(&self, g: &Gathered, _batch: &Batch, ctx: &Ctx) -> Result<Share> {
        let (a, b) = (&g.towers[0], &g.towers[1]);
        let loss = match self.loss {
            LossKind::InfoNce => infonce_share(a, b, self.temperature, true, ctx.shard)?,
            LossKind::NtXent => ntxent_share(a, b, self.temperature, ctx.shard)?,
            k => return Err(NnError::Param(format!("loss {k:?} does not fit SimCSE"))),
        };
        Ok(Share { loss, monitor: Some(a.shallow_clone()) })
    }

    fn backbone(&self) -> &dyn Encoder {
        &self.tower
    }

    fn encode_text(&self, captions: &Captions) -> Option<tch::Tensor> {
        Some(self.tower.forward(captions))
    }
}
