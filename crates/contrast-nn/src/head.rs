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

/// MLP head with batch norm: n linear layers, each but the last followed by
/// BN → ReLU, the last optionally by a BN without affine parameters
/// (`out_bn`). The 2-layer form (Linear → BN → ReLU → Linear) is the
/// projector and predictor of BYOL and SimSiam; Barlow Twins' projector has 3
/// layers without biases. Variables are `fc1…fcn` and `bn1…`, so the 2-layer
/// names are those of the earlier 2-layer head. Run it on the gathered batch so
/// that its statistics are the global batch's.
#[derive(Debug)]
pub struct BnMlp {
    layers: Vec<(nn::Linear, Option<nn::BatchNorm>)>,
}

impl BnMlp {
    /// `input → hidden → output`, with biases.
    pub fn new(p: &nn::Path, input: i64, hidden: i64, output: i64, out_bn: bool) -> Self {
        Self::layers(p, &[input, hidden, output], out_bn, true)
    }

    /// Widths `[input, h₁, …, output]` (at least two): one linear layer per step.
    pub fn layers(p: &nn::Path, widths: &[i64], out_bn: bool, bias: bool) -> Self {
        assert!(widths.len() >= 2, "an MLP needs an input and an output width");
        let last = widths.len() - 2;
        let linear = nn::LinearConfig { bias, ..Default::default() };
        let no_affine = nn::BatchNormConfig { affine: false, ..Default::default() };
        let layers = widths
            .windows(2)
            .enumerate()
            .map(|(i, w)| {
                let fc = nn::linear(p / format!("fc{}", i + 1), w[0], w[1], linear);
                let bn = match (i < last, out_bn) {
                    (true, _) => Some(nn::batch_norm1d(p / format!("bn{}", i + 1), w[1], Default::default())),
                    (false, true) => Some(nn::batch_norm1d(p / format!("bn{}", i + 1), w[1], no_affine)),
                    (false, false) => None,
                };
                (fc, bn)
            })
            .collect();
        Self { layers }
    }
}

impl ModuleT for BnMlp {
    fn forward_t(&self, x: &Tensor, train: bool) -> Tensor {
        let last = self.layers.len() - 1;
        let mut h = x.shallow_clone();
        for (i, (fc, bn)) in self.layers.iter().enumerate() {
            h = h.apply(fc);
            if let Some(bn) = bn {
                h = h.apply_t(bn, train);
            }
            if i < last {
                h = h.relu();
            }
        }
        h
    }
}
