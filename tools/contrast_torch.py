"""PyTorch modules that mirror the trainer's `convnet` encoder and its
projection heads, so that a `trainer export` file loads into plain PyTorch:

    import contrast_torch as ct
    model = ct.SimCLR.from_export("simclr.safetensors", in_channels=1)
    features = model.features(ct.fashion_mnist_input(images_uint8))   # what kNN and `trainer embed` use

Names and shapes are the trainer's (`backbone.conv0.weight`, ...,
`head.fc2.bias`), loaded with `load_state_dict(strict=True)`; the only entry
the loader adds is batch norm's `num_batches_tracked`, which the trainer does
not count. `features` is the backbone's output L2-normalised, as
`trainer embed` writes it. Exact only for what is mirrored here: `convnet`
(any `model.width`, `model.embed_dim`, `model.norm`), the SimCLR MLP head
(`model.proj_hidden`, `model.proj_dim`).
"""

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

#: Fashion-MNIST's pixel mean and std after scaling to [0, 1] (the trainer's `FASHION_MNIST_MEAN_STD`).
FASHION_MNIST_MEAN_STD = (0.2860, 0.3530)
#: The grid the convnet average-pools its last feature map to.
POOL_GRID = 4


def fashion_mnist_input(images):
    """uint8 images `[n, 28, 28]` as the trainer's evaluation feeds them: `[n, 1, 28, 28]` float, normalised."""
    mean, std = FASHION_MNIST_MEAN_STD
    x = images if isinstance(images, torch.Tensor) else torch.from_numpy(np.array(images, dtype=np.uint8))
    x = x.float().div(255.0)
    return ((x - mean) / std).unsqueeze(1)


def norm_layer(norm, channels):
    """The trainer's `NormLayer`: group norm with the largest of 8, 4, 2, 1 groups that divides the channels."""
    if norm == "group":
        groups = next(g for g in (8, 4, 2, 1) if channels % g == 0)
        return nn.GroupNorm(groups, channels, eps=1e-5)
    if norm == "layer":
        return nn.GroupNorm(1, channels, eps=1e-5)
    if norm == "batch":
        return nn.BatchNorm2d(channels, eps=1e-5, momentum=0.1)
    if norm == "none":
        return nn.Identity()
    raise ValueError(f"model.norm `{norm}` is not one of group, layer, batch, none")


class ConvNet(nn.Module):
    """`model.encoder: convnet`: four 3x3 convolutions (channels w, 2w, 2w,
    embed_dim/16; strides 1, 2, 1, 2; padding 1), each with norm and ReLU,
    average-pooled to a 4x4 grid and flattened to `embed_dim`."""

    def __init__(self, in_channels=1, width=32, embed_dim=1024, norm="group"):
        super().__init__()
        cells = POOL_GRID * POOL_GRID
        if embed_dim % cells:
            raise ValueError(f"embed_dim {embed_dim} is not a multiple of {cells}")
        spec = [(in_channels, width, 1), (width, 2 * width, 2), (2 * width, 2 * width, 1), (2 * width, embed_dim // cells, 2)]
        for k, (i, o, stride) in enumerate(spec):
            self.add_module(f"conv{k}", nn.Conv2d(i, o, 3, stride=stride, padding=1, bias=norm == "none"))
            self.add_module(f"norm{k}", norm_layer(norm, o))
        self.embed_dim = embed_dim

    #: Pool with two matrix products instead of `adaptive_avg_pool2d` (the
    #: same bins; ONNX's exporter refuses an adaptive pool whose output does
    #: not divide its input, 7 → 4 on 28-pixel images).
    explicit_pool = False

    def forward(self, x):
        for k in range(4):
            x = F.relu(getattr(self, f"norm{k}")(getattr(self, f"conv{k}")(x)))
        if self.explicit_pool:
            ph, pw = pool_matrix(x.shape[2], POOL_GRID, x), pool_matrix(x.shape[3], POOL_GRID, x)
            return (ph @ x @ pw.T).flatten(1)
        return F.adaptive_avg_pool2d(x, POOL_GRID).flatten(1)


def pool_matrix(size, bins, like):
    """`[bins, size]`: row i averages PyTorch's adaptive-pool bin i, [⌊i·size/bins⌋, ⌈(i+1)·size/bins⌉)."""
    size = int(size)
    m = torch.zeros(bins, size, dtype=like.dtype, device=like.device)
    for i in range(bins):
        lo, hi = (i * size) // bins, -(-((i + 1) * size) // bins)
        m[i, lo:hi] = 1.0 / (hi - lo)
    return m


class MlpHead(nn.Module):
    """SimCLR's projection head: `fc1` → ReLU → `fc2`."""

    def __init__(self, dim_in, hidden, dim_out):
        super().__init__()
        self.fc1 = nn.Linear(dim_in, hidden)
        self.fc2 = nn.Linear(hidden, dim_out)

    def forward(self, x):
        return self.fc2(F.relu(self.fc1(x)))


class SimCLR(nn.Module):
    """`method.name: simclr` (and PBA's members): `backbone` and `head`."""

    def __init__(self, in_channels=1, width=32, embed_dim=1024, norm="group", proj_hidden=512, proj_dim=64):
        super().__init__()
        self.backbone = ConvNet(in_channels, width, embed_dim, norm)
        self.head = MlpHead(embed_dim, proj_hidden, proj_dim)

    def forward(self, x):
        """The head's projection (what the loss sees)."""
        return self.head(self.backbone(x))

    def features(self, x):
        """The backbone's features, L2-normalised: what kNN, the linear probe and `trainer embed` use."""
        return F.normalize(self.backbone(x), dim=1)

    @classmethod
    def from_export(cls, path, in_channels=1, norm="group"):
        """A model shaped by, and loaded from, a `trainer export` file (width, embed_dim and head sizes read from it)."""
        state = load_export(path)
        width = state["backbone.conv0.weight"].shape[0]
        embed_dim = state["backbone.conv3.weight"].shape[0] * POOL_GRID * POOL_GRID
        hidden, proj = state["head.fc1.weight"].shape[0], state["head.fc2.weight"].shape[0]
        if "backbone.norm0.running_mean" in state:
            norm = "batch"
        model = cls(in_channels, width, embed_dim, norm, hidden, proj)
        load_into(model, state)
        return model.eval()


def load_export(path):
    """The tensors of a `trainer export` (or checkpoint `model.safetensors`) file, as float32 (bf16 exports too)."""
    from safetensors.torch import load_file

    return {k: (v.float() if v.is_floating_point() else v) for k, v in load_file(str(path)).items()}


def load_into(model, state):
    """`model.load_state_dict(state, strict=True)`, with batch norm's `num_batches_tracked` (which the trainer does not keep) filled in."""
    state = dict(state)
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.track_running_stats:
            state.setdefault(f"{name}.num_batches_tracked", torch.tensor(0, dtype=torch.long))
    model.load_state_dict(state, strict=True)
    return model
