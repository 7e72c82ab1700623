//! `model.encoder: resnet18 | resnet34 | resnet50`: torchvision's ResNet,
//! written here so that the stem, the normalisation and every layer can be
//! chosen (`tch::vision::resnet` fixes the 7×7 stem and batch norm).
//!
//! torchvision's structure and names exactly: convolutions without bias, norm
//! eps 1e-5 and momentum 0.1, `downsample.0/1` = 1×1 convolution + norm,
//! ResNet-50 as v1.5 (the stride on the 3×3), global average pooling; the
//! classifier `fc` is left out (the representation is 512 or 2048 wide). So a
//! torchvision state dict imports by identity, and `trainer export` of a
//! `model.norm: batch` run loads back into `torchvision.models.resnet*` with
//! only `fc.*` missing.
//!
//! - `model.stem`: `imagenet` (7×7/2 convolution + 3×3/2 max-pool), `cifar`
//!   (3×3/1, no max-pool; solo-learn's and lightly's CIFAR ResNets), or `auto`:
//!   `cifar` at image size ≤ 64.
//! - `model.norm`: `group` (32 groups, Wu & He; the default, since it keeps
//!   P ranks × B = 1 rank × P·B exact), `batch` (per-rank statistics: parity
//!   across world sizes is no longer exact), `layer` or `none`.
//! - `model.zero_init_residual` (default true; torchvision's default is false):
//!   the last norm of each block starts at zero, so each block starts as the
//!   identity. Without it a group-norm ResNet collapsed under SimCLR here.

use super::{Encoder, EncoderEntry, EncoderInput, NormLayer};
use crate::Result;
use contrast_config::{ConfigError, EncoderSpec, ImageInfo, Norm, Settings};
use serde::{Deserialize, Serialize};
use tch::nn;
use tch::Tensor;

/// `model.stem`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Stem {
    /// `cifar` at image size ≤ 64, else `imagenet`.
    Auto,
    /// 7×7 stride-2 convolution and a 3×3 stride-2 max-pool.
    Imagenet,
    /// 3×3 stride-1 convolution, no max-pool.
    Cifar,
}

/// A ResNet's keys under `model.*`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ResnetKeys {
    /// `group` (32 groups; exact across layouts), `batch` (per-rank statistics:
    /// parity across world sizes is no longer exact), `layer` or `none`.
    pub norm: Norm,
    /// `auto` (`cifar` at image size ≤ 64), `imagenet` or `cifar`.
    pub stem: Stem,
    /// Zero the last norm's weight of every residual block, so each block starts
    /// as the identity (torchvision's `zero_init_residual`, whose default is
    /// false). On by default here: a group-norm ResNet-18 trained by SimCLR on
    /// Fashion-MNIST collapsed without it (embedding spread 0.0128 → 0.0002 in
    /// 20 steps) and trained with it.
    pub zero_init_residual: bool,
}

impl Default for ResnetKeys {
    fn default() -> Self {
        Self { norm: Norm::Group, stem: Stem::Auto, zero_init_residual: true }
    }
}

/// Groups of group norm in a ResNet (channels are multiples of 64).
const GROUPS: [i64; 1] = [32];

/// One of the ResNet depths.
pub struct ResnetSpec {
    name: &'static str,
    /// Blocks per stage.
    layers: [usize; 4],
    /// Bottleneck blocks (expansion 4) rather than basic ones.
    bottleneck: bool,
}

/// ResNet-18: basic blocks [2, 2, 2, 2], 512 wide.
pub const RESNET18: ResnetSpec = ResnetSpec { name: "resnet18", layers: [2, 2, 2, 2], bottleneck: false };
/// ResNet-34: basic blocks [3, 4, 6, 3], 512 wide.
pub const RESNET34: ResnetSpec = ResnetSpec { name: "resnet34", layers: [3, 4, 6, 3], bottleneck: false };
/// ResNet-50 (v1.5): bottleneck blocks [3, 4, 6, 3], 2048 wide.
pub const RESNET50: ResnetSpec = ResnetSpec { name: "resnet50", layers: [3, 4, 6, 3], bottleneck: true };

/// The registrations of the three depths.
pub const ENTRIES: [EncoderEntry; 3] = [
    EncoderEntry { spec: &RESNET18, build: |p, i| build(&RESNET18, p, i) },
    EncoderEntry { spec: &RESNET34, build: |p, i| build(&RESNET34, p, i) },
    EncoderEntry { spec: &RESNET50, build: |p, i| build(&RESNET50, p, i) },
];

impl ResnetSpec {
    fn expansion(&self) -> i64 {
        if self.bottleneck {
            4
        } else {
            1
        }
    }
}

impl EncoderSpec for ResnetSpec {
    fn name(&self) -> &'static str {
        self.name
    }

    fn defaults(&self) -> Settings {
        Settings::of(&ResnetKeys::default())
    }

    /// Any size works: the last map is average-pooled, however small.
    fn check(&self, settings: &Settings, _image: &ImageInfo) -> std::result::Result<(), ConfigError> {
        settings.parse::<ResnetKeys>("model").map(|_| ())
    }

    fn norm(&self, settings: &Settings) -> Norm {
        settings.parse::<ResnetKeys>("model").map(|k| k.norm).unwrap_or(Norm::Group)
    }

    fn freeze_groups(&self, _settings: &Settings) -> Vec<String> {
        ["stem", "layer1", "layer2", "layer3", "layer4"].map(String::from).to_vec()
    }
}

/// The stem in force for images of `size` px.
pub fn stem_of(stem: Stem, size: i64) -> Stem {
    match stem {
        Stem::Auto if size <= 64 => Stem::Cifar,
        Stem::Auto => Stem::Imagenet,
        s => s,
    }
}

fn build(spec: &ResnetSpec, p: &nn::Path, input: &EncoderInput) -> Result<Box<dyn Encoder>> {
    let k: ResnetKeys = input.settings.parse("model").map_err(|e| crate::NnError::Param(e.to_string()))?;
    let mut net = ResNet::new(p, spec, &k, input.image);
    net.frozen = ["stem", "layer1", "layer2", "layer3", "layer4"].map(|g| input.frozen.iter().any(|f| f == g));
    Ok(Box::new(net))
}

/// torchvision's convolution init: Kaiming normal, fan-out, ReLU gain.
fn conv(p: nn::Path, i: i64, o: i64, k: i64, stride: i64) -> nn::Conv2D {
    let init = nn::Init::Kaiming {
        dist: nn::init::NormalOrUniform::Normal,
        fan: nn::init::FanInOut::FanOut,
        non_linearity: nn::init::NonLinearity::ReLU,
    };
    let cfg = nn::ConvConfig { stride, padding: k / 2, bias: false, ws_init: init, ..Default::default() };
    nn::conv2d(p, i, o, k, cfg)
}

/// A basic (two 3×3) or bottleneck (1×1, 3×3, 1×1) residual block.
struct Block {
    convs: Vec<(nn::Conv2D, NormLayer)>,
    downsample: Option<(nn::Conv2D, NormLayer)>,
}

impl Block {
    fn new(p: &nn::Path, inp: i64, planes: i64, stride: i64, bottleneck: bool, k: &ResnetKeys) -> Self {
        let norm = |name: &str, c: i64| NormLayer::new(p / name, k.norm, c, &GROUPS);
        let shape: Vec<(i64, i64, i64, i64)> = if bottleneck {
            vec![(inp, planes, 1, 1), (planes, planes, 3, stride), (planes, planes * 4, 1, 1)]
        } else {
            vec![(inp, planes, 3, stride), (planes, planes, 3, 1)]
        };
        let out = shape.last().map(|s| s.1).unwrap_or(planes);
        let last = shape.len();
        let convs = shape
            .into_iter()
            .enumerate()
            .map(|(j, (i, o, size, s))| {
                let n = norm(&format!("bn{}", j + 1), o);
                if k.zero_init_residual && j + 1 == last {
                    n.zero_weight();
                }
                (conv(p / format!("conv{}", j + 1), i, o, size, s), n)
            })
            .collect();
        let downsample = (stride != 1 || inp != out).then(|| {
            let d = p / "downsample";
            (conv(&d / "0", inp, out, 1, stride), NormLayer::new(&d / "1", k.norm, out, &GROUPS))
        });
        Self { convs, downsample }
    }

    fn forward_t(&self, x: &Tensor, train: bool) -> Tensor {
        let last = self.convs.len() - 1;
        let mut h = x.shallow_clone();
        for (j, (c, n)) in self.convs.iter().enumerate() {
            h = n.forward_t(&h.apply(c), train);
            if j < last {
                h = h.relu();
            }
        }
        let identity = match &self.downsample {
            Some((c, n)) => n.forward_t(&x.apply(c), train),
            None => x.shallow_clone(),
        };
        (h + identity).relu()
    }
}

/// A ResNet without its classifier: images → `[B, 512·expansion]`.
pub struct ResNet {
    conv1: nn::Conv2D,
    bn1: NormLayer,
    maxpool: bool,
    stages: Vec<Vec<Block>>,
    out_dim: i64,
    /// `model.freeze` of the stem and each stage: their batch norm stays in eval mode.
    frozen: [bool; 5],
}

impl ResNet {
    /// Build under `p` (variables `conv1`, `bn1`, `layer1.0.conv1`, …, torchvision's names).
    pub fn new(p: &nn::Path, spec: &ResnetSpec, k: &ResnetKeys, image: ImageInfo) -> Self {
        let imagenet = stem_of(k.stem, image.size) == Stem::Imagenet;
        let (size, stride) = if imagenet { (7, 2) } else { (3, 1) };
        let conv1 = conv(p / "conv1", image.channels, 64, size, stride);
        let bn1 = NormLayer::new(p / "bn1", k.norm, 64, &GROUPS);
        let (mut inp, mut stages) = (64, Vec::new());
        for (s, &n) in spec.layers.iter().enumerate() {
            let planes = 64 << s;
            let stage = p / format!("layer{}", s + 1);
            let blocks = (0..n)
                .map(|b| {
                    let stride = if b == 0 && s > 0 { 2 } else { 1 };
                    let block = Block::new(&(&stage / b), inp, planes, stride, spec.bottleneck, k);
                    inp = planes * spec.expansion();
                    block
                })
                .collect();
            stages.push(blocks);
        }
        Self { conv1, bn1, maxpool: imagenet, stages, out_dim: inp, frozen: [false; 5] }
    }
}

impl Encoder for ResNet {
    fn forward_t(&self, x: &Tensor, train: bool) -> Tensor {
        let mut h = self.bn1.forward_t(&x.apply(&self.conv1), train && !self.frozen[0]).relu();
        if self.maxpool {
            h = h.max_pool2d([3, 3], [2, 2], [1, 1], [1, 1], false);
        }
        for (s, stage) in self.stages.iter().enumerate() {
            for block in stage {
                h = block.forward_t(&h, train && !self.frozen[s + 1]);
            }
        }
        h.adaptive_avg_pool2d([1, 1]).flatten(1, -1)
    }

    fn out_dim(&self) -> i64 {
        self.out_dim
    }

    fn freeze_prefixes(&self, groups: &[String]) -> Vec<String> {
        groups
            .iter()
            .flat_map(|g| match g.as_str() {
                "stem" => vec!["conv1.".to_string(), "bn1.".into()],
                layer => vec![format!("{layer}.")],
            })
            .collect()
    }
}
