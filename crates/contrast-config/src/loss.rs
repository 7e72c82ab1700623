//! `loss.*`: the loss, its keys and defaults (the conventions of the library
//! each loss follows), and their checks.

use crate::applies::Rules;
use crate::{invalid, ConfigError};
use serde::{Deserialize, Serialize};

/// `loss.*`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LossConfig {
    /// Loss: `ntxent`, `supcon`, `dcl`, `dclw`, `debiased`, `hard_negative`, `barlow_twins`, `barlow_twins_unbiased`, `nce` (two views),
    /// `clip`, `siglip` (image–text), the metric losses, or a method's own (`infonce` for moco_v2,
    /// `normalized_mse` for byol, `negative_cosine` for simsiam). Unset: the method's loss (ntxent for simclr).
    pub name: Option<LossKind>,
    /// Softmax temperature; for CLIP/SigLIP the initial temperature of the learnt logit scale (scale = 1/t).
    /// Unset: the default of the implementation the loss follows (see [`LossKind::default_temperature`]).
    pub temperature: Option<f64>,
    /// CLIP/SigLIP: learn the logit scale (stored as its log, clamped at 100).
    pub learn_scale: bool,
    /// Debiased / hard-negative: class-prior τ⁺ of a false negative, in [0, 1).
    pub tau_plus: f64,
    /// Hard-negative: concentration β of the negative reweighting (0 = debiased loss).
    pub beta: f64,
    /// Barlow Twins: weight λ of the off-diagonal (redundancy) term.
    pub lambda: f64,
    /// DCLW: σ of the von Mises-Fisher positive weighting.
    pub sigma: f64,
    /// SigLIP: initial logit bias (learnt).
    pub init_bias: f64,
    /// Triplet: margin of relu(d_ap − d_an + margin).
    pub margin: f64,
    /// Contrastive / lifted: positive-pair margin.
    pub pos_margin: f64,
    /// Contrastive / lifted (smooth, hard, generalized): negative-pair margin.
    pub neg_margin: f64,
    /// Contrastive: the survey's squared form d², relu(m − d)².
    pub squared: bool,
    /// Triplet mining over the global batch: `all`, `batch_hard` or `semi_hard`.
    pub mining: Mining,
    /// NCE: size of the uniform noise distribution (p_n = 1 / noise_size).
    pub noise_size: f64,
    /// `npair_dot`: weight λ of the penalty λ/4·(mean‖a‖² + mean‖p‖²) on the
    /// pairs' embeddings (TensorFlow's `reg_lambda`, 0.002).
    pub l2_reg: f64,
}

impl Default for LossConfig {
    fn default() -> Self {
        Self {
            name: None,
            temperature: None,
            learn_scale: true,
            tau_plus: 0.1,
            beta: 1.0,
            lambda: 5e-3,
            sigma: 0.5,
            init_bias: -10.0,
            margin: 0.05,
            pos_margin: 0.0,
            neg_margin: 1.0,
            squared: false,
            l2_reg: 0.002,
            mining: Mining::All,
            noise_size: 60000.0,
        }
    }
}

/// `train.*`
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Mining {
    /// Every valid triplet.
    All,
    /// Hardest positive and hardest negative per anchor.
    BatchHard,
    /// Negatives farther than the positive but within the margin.
    SemiHard,
}

/// The losses the trainer can run end to end (`loss.name`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum LossKind {
    /// NT-Xent over 2N views (SimCLR).
    #[serde(rename = "ntxent", alias = "nt_xent", alias = "simclr")]
    NtXent,
    /// Supervised contrastive over two views and the class labels.
    #[serde(rename = "supcon")]
    SupCon,
    /// Decoupled contrastive (positive out of the denominator).
    #[serde(rename = "dcl")]
    Dcl,
    /// DCL with von Mises-Fisher positive weights.
    #[serde(rename = "dclw")]
    Dclw,
    /// Debiased contrastive (Chuang et al.).
    #[serde(rename = "debiased")]
    Debiased,
    /// Hard-negative contrastive (Robinson et al.).
    #[serde(rename = "hard_negative")]
    HardNegative,
    /// Barlow Twins, standardised with batch-norm statistics (biased variance
    /// + 1e-5: the official code and lightly 1.6).
    #[serde(rename = "barlow_twins")]
    BarlowTwins,
    /// Barlow Twins, standardised with the unbiased standard deviation and no
    /// epsilon (the paper's Algorithm 1, lightly ≤ 1.5).
    #[serde(rename = "barlow_twins_unbiased")]
    BarlowTwinsUnbiased,
    /// Symmetric image–text cross-entropy with a logit scale (CLIP).
    #[serde(rename = "clip")]
    Clip,
    /// Pairwise sigmoid image–text loss (SigLIP).
    #[serde(rename = "siglip")]
    SigLip,
    /// Contrastive pair loss (Chopra et al.).
    #[serde(rename = "contrastive")]
    Contrastive,
    /// Triplet margin loss.
    #[serde(rename = "triplet")]
    Triplet,
    /// Lifted structured loss, smooth form.
    #[serde(rename = "lifted")]
    Lifted,
    /// Lifted structured loss, hard (max) form of Song et al.
    #[serde(rename = "lifted_hard")]
    LiftedHard,
    /// Generalized lifted structure loss.
    #[serde(rename = "generalized_lifted")]
    GeneralizedLifted,
    /// Multi-class N-pair loss on cosine similarities (pytorch-metric-learning
    /// `NPairsLoss`, which L2-normalises by default).
    #[serde(rename = "npair")]
    NPair,
    /// N-pair loss on raw dot products with Sohn 2016's L2 penalty on the
    /// embeddings (TensorFlow's `npairs_loss`).
    #[serde(rename = "npair_dot")]
    NPairDot,
    /// Soft nearest neighbour loss.
    #[serde(rename = "snn")]
    Snn,
    /// Binary NCE with uniform noise.
    #[serde(rename = "nce")]
    Nce,
    /// InfoNCE of queries against their key and a queue of negatives (MoCo).
    #[serde(rename = "infonce")]
    InfoNce,
    /// Instance discrimination's NCE against a memory bank (InstDisc): noise
    /// uniform over the training items, the normaliser Z fixed at the first step.
    #[serde(rename = "bank_nce")]
    BankNce,
    /// SwAV's swapped prediction of Sinkhorn-Knopp codes over trained prototypes.
    #[serde(rename = "swav")]
    Swav,
    /// BYOL's normalised MSE 2 − 2 cos(p, sg z), symmetrised.
    #[serde(rename = "normalized_mse")]
    NormalizedMse,
    /// SimSiam's negative cosine −cos(p, sg z), symmetrised.
    #[serde(rename = "negative_cosine")]
    NegativeCosine,
    /// Cross-entropy of a classifier against per-item pseudo-labels, mean over
    /// the views' rows (DeepCluster's `nn.CrossEntropyLoss`).
    #[serde(rename = "cross_entropy")]
    CrossEntropy,
    /// CPC's InfoNCE with one bilinear map per offset, over a grid of patches
    /// (method `cpc`; negatives: the same position in the other images).
    #[serde(rename = "cpc")]
    Cpc,
}

impl LossConfig {
    /// `loss.temperature`, or the default of the implementation `kind` follows.
    pub fn temperature_for(&self, kind: LossKind) -> f64 {
        self.temperature.unwrap_or_else(|| kind.default_temperature())
    }
}

impl LossKind {
    /// The temperature of the implementation each loss follows: lightly
    /// `NTXentLoss` 0.5, pytorch-metric-learning `SupConLoss` 0.1, lightly
    /// `DCLLoss` 0.1, the debiased/hard-negative authors' scripts 0.5, open_clip's
    /// initial CLIP scale 1/0.07 and SigLIP scale 10, instance-discrimination
    /// NCE 0.07 (and InstDisc's bank NCE), MoCo-v2's InfoNCE 0.2, SwAV's 0.1; 1 where the loss has none.
    pub fn default_temperature(self) -> f64 {
        match self {
            LossKind::NtXent | LossKind::Debiased | LossKind::HardNegative => 0.5,
            LossKind::SupCon | LossKind::Dcl | LossKind::Dclw | LossKind::SigLip | LossKind::Swav => 0.1,
            LossKind::Clip | LossKind::Nce | LossKind::BankNce => 0.07,
            LossKind::InfoNce => 0.2,
            _ => 1.0,
        }
    }

    /// The `loss.name` spelling (`infonce`, `ntxent`).
    pub fn name(self) -> String {
        match yaml_serde::to_value(self) {
            Ok(yaml_serde::Value::String(s)) => s,
            other => unreachable!("a loss serialises to its name, got {other:?}"),
        }
    }

    /// Parse a `loss.name` value.
    pub fn parse(s: &str) -> Option<Self> {
        yaml_serde::from_value(yaml_serde::Value::String(s.into())).ok()
    }

    /// The `loss.*` keys (besides `name`) that this loss reads.
    pub fn keys(self) -> &'static [&'static str] {
        match self {
            LossKind::NtXent
            | LossKind::SupCon
            | LossKind::Dcl
            | LossKind::Snn
            | LossKind::InfoNce
            | LossKind::BankNce
            | LossKind::Swav => &["temperature"],
            LossKind::Dclw => &["temperature", "sigma"],
            LossKind::Debiased => &["temperature", "tau_plus"],
            LossKind::HardNegative => &["temperature", "tau_plus", "beta"],
            LossKind::BarlowTwins | LossKind::BarlowTwinsUnbiased => &["lambda"],
            LossKind::NPairDot => &["l2_reg"],
            LossKind::Clip => &["temperature", "learn_scale"],
            LossKind::SigLip => &["temperature", "learn_scale", "init_bias"],
            LossKind::Contrastive => &["pos_margin", "neg_margin", "squared"],
            LossKind::Triplet => &["margin", "mining"],
            LossKind::Lifted | LossKind::GeneralizedLifted => &["pos_margin", "neg_margin"],
            LossKind::LiftedHard => &["neg_margin"],
            LossKind::NPair
            | LossKind::NormalizedMse
            | LossKind::NegativeCosine
            | LossKind::CrossEntropy
            | LossKind::Cpc => &[],
            LossKind::Nce => &["temperature", "noise_size"],
        }
    }

    /// True for the image–text losses (CLIP model, captions).
    pub fn is_image_text(self) -> bool {
        matches!(self, LossKind::Clip | LossKind::SigLip)
    }

    /// True for the metric-learning losses: one embedding per sample and its label.
    pub fn is_metric(self) -> bool {
        matches!(
            self,
            LossKind::Contrastive
                | LossKind::Triplet
                | LossKind::Lifted
                | LossKind::LiftedHard
                | LossKind::GeneralizedLifted
                | LossKind::NPair
                | LossKind::NPairDot
                | LossKind::Snn
        )
    }

    /// True for the losses that belong to one method (MoCo's InfoNCE, BYOL's and SimSiam's regressions).
    pub fn is_method_own(self) -> bool {
        matches!(
            self,
            LossKind::InfoNce
                | LossKind::BankNce
                | LossKind::Swav
                | LossKind::NormalizedMse
                | LossKind::NegativeCosine
                | LossKind::CrossEntropy
                | LossKind::Cpc
        )
    }

    /// True when the loss contrasts against other samples of the batch (needs N ≥ 2).
    pub fn needs_negatives(self) -> bool {
        !self.is_image_text()
            && !matches!(
                self,
                LossKind::BarlowTwins
                    | LossKind::BarlowTwinsUnbiased
                    | LossKind::InfoNce
                    | LossKind::NormalizedMse
                    | LossKind::NegativeCosine
                    | LossKind::CrossEntropy
            )
    }

    /// True when the loss needs class labels.
    pub fn is_supervised(self) -> bool {
        self == LossKind::SupCon || self.is_metric()
    }
}

/// Normalisation layer choice (`model.norm`).

/// The `loss.*` keys the chosen loss does not read.
pub(crate) fn rules(loss: LossKind, r: &mut Rules) {
    let all = yaml_serde::to_value(LossConfig::default()).expect("loss keys serialise");
    let keys = all.as_mapping().into_iter().flat_map(|m| m.keys()).filter_map(|k| k.as_str());
    let unread: Vec<&str> = keys.filter(|k| *k != "name" && !loss.keys().contains(k)).collect();
    r.keys("loss", &unread, &format!("loss {loss:?}"), true);
}

pub(crate) fn check(c: &crate::Config, loss: LossKind) -> Result<(), ConfigError> {
    if !(0.0..1.0).contains(&c.loss.tau_plus) {
        return Err(invalid("loss.tau_plus", format!("must lie in [0, 1), got {}", c.loss.tau_plus)));
    }
    if !(c.loss.beta >= 0.0) {
        return Err(invalid("loss.beta", format!("must be ≥ 0, got {}", c.loss.beta)));
    }
    if !(c.loss.lambda >= 0.0) {
        return Err(invalid("loss.lambda", format!("must be ≥ 0, got {}", c.loss.lambda)));
    }
    if !(c.loss.sigma > 0.0) {
        return Err(invalid("loss.sigma", format!("must be > 0, got {}", c.loss.sigma)));
    }
    for (key, v) in
        [("loss.margin", c.loss.margin), ("loss.pos_margin", c.loss.pos_margin), ("loss.neg_margin", c.loss.neg_margin)]
    {
        if !(v >= 0.0) {
            return Err(invalid(key, format!("a margin must be ≥ 0, got {v}")));
        }
    }
    if !(c.loss.noise_size >= 1.0) {
        return Err(invalid("loss.noise_size", format!("must be ≥ 1, got {}", c.loss.noise_size)));
    }
    if !(c.loss.l2_reg >= 0.0) {
        return Err(invalid("loss.l2_reg", format!("must be ≥ 0, got {}", c.loss.l2_reg)));
    }
    if matches!(loss, LossKind::BarlowTwins | LossKind::BarlowTwinsUnbiased) && c.train.global_batch < 2 {
        return Err(invalid("train.global_batch", "Barlow Twins standardises over the batch: need at least 2"));
    }
    Ok(())
}
