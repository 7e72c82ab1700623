//! Projection and prediction heads: [`Mlp`] (SimCLR, MoCo) and [`BnMlp`]
//! (BYOL's and SimSiam's batch-normalised projector and predictor).

use tch::nn::{self, Module, ModuleT};
use tch::Tensor;

/// Two-layer MLP projection head.
#[derive(Debug)]
pub struct Mlp {
    l1: nn::Linear,
    l2: nn::Linear,
}

impl Mlp {
    /// `input → hidden → output`.
    pub fn new(p: &nn::Path, input: i64, hidden: i64, output: i64) -> Self {
        Self {
            l1: nn::linear(p / "fc1", input, hidden, Default::default()),
            l2: nn::linear(p / "fc2", hidden, output, Default::default()),
        }
    }
}

impl Module for Mlp {
    fn forward(&self, x: &Tensor) -> Tensor {
        x.apply(&self.l1).relu().apply(&self.l2)
    }
}

/// MLP head with batch norm: Linear → BN → ReLU → Linear (→ BN without affine
/// parameters when `out_bn`), the projector and predictor of BYOL and SimSiam.
/// Run it on the gathered batch so that its statistics are the global batch's.
#[derive(Debug)]
pub struct BnMlp {
    l1: nn::Linear,
    bn: nn::BatchNorm,
    l2: nn::Linear,
    out_bn: Option<nn::BatchNorm>,
}

impl BnMlp {
    /// `input → hidden → output`.
    pub fn new(p: &nn::Path, input: i64, hidden: i64, output: i64, out_bn: bool) -> Self {
        let no_affine = nn::BatchNormConfig { affine: false, ..Default::default() };
        Self {
            l1: nn::linear(p / "fc1", input, hidden, Default::default()),
            bn: nn::batch_norm1d(p / "bn1", hidden, Default::default()),
            l2: nn::linear(p / "fc2", hidden, output, Default::default()),
            out_bn: out_bn.then(|| nn::batch_norm1d(p / "bn2", output, no_affine)),
        }
    }
}

impl ModuleT for BnMlp {
    fn forward_t(&self, x: &Tensor, train: bool) -> Tensor {
        let h = x.apply(&self.l1).apply_t(&self.bn, train).relu().apply(&self.l2);
        match &self.out_bn {
            Some(bn) => h.apply_t(bn, train),
            None => h,
        }
    }
}
