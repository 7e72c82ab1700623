"""PyTorch modules that mirror the trainer's `convnet` encoder, its
projection heads and the text tower, so that a `trainer export` file loads
into plain PyTorch:

    import contrast_torch as ct
    model = ct.load_export("simclr.safetensors")             # SimCLR or CLIP, by the file's method
    features = model.features(ct.fashion_mnist_input(images_uint8))   # what kNN and `trainer embed` use

    clip = ct.load_export("clip.safetensors")
    ids, ends = ct.byte_tokenize(["a photo of a shirt."], clip.context)
    text = clip.encode_text(ids, ends)                       # `trainer embed --texts`, before normalising
    image = clip.encode_image(ct.fashion_mnist_input(images_uint8))

Names and shapes are the trainer's (`backbone.conv0.weight`, ...,
`head.fc2.bias`, `text.block0.qkv.weight`, `loss.logit_scale`), loaded with
`load_state_dict(strict=True)`; the only entry the loader adds is batch
norm's `num_batches_tracked`, which the trainer does not count. The modules
are shaped from the weights and from the run's configuration, which `trainer
export` writes into the file's metadata (`config`). `features` is the
backbone's output L2-normalised, as `trainer embed` writes it. Exact only
for what is mirrored here: `convnet` (any `model.width`, `model.embed_dim`,
`model.norm`), the SimCLR MLP head (`model.proj_hidden`, `model.proj_dim`),
CLIP's image projection, logit scale (and SigLIP's bias) and its text tower
(`model.text.*`: causal or not, pooled at the last token, the first or the
mean; gelu or quick_gelu), fed by the byte tokenizer (`data.text.tokenizer:
bytes`; for a `tokenizer.json`, the `tokenizers` package with the same file
gives the ids, and the text's end is its last id before padding).
"""

import json
import math

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
    def from_export(cls, path, norm=None):
        """A model shaped by, and loaded from, a `trainer export` file (sizes read from its weights, the norm from its config)."""
        state = load_tensors(path)
        hidden, proj = state["head.fc1.weight"].shape[0], state["head.fc2.weight"].shape[0]
        model = cls(*convnet_shape(state, norm or export_norm(path, state)), hidden, proj)
        load_into(model, state)
        return model.eval()


def convnet_shape(state, norm, prefix="backbone."):
    """(in_channels, width, embed_dim, norm) of the convnet whose weights are `state[prefix + ...]`."""
    width, in_channels = state[prefix + "conv0.weight"].shape[:2]
    embed_dim = state[prefix + "conv3.weight"].shape[0] * POOL_GRID * POOL_GRID
    return in_channels, width, embed_dim, norm


def export_config(path):
    """The run's configuration that `trainer export` wrote into the file's metadata (`{}` for older files)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    return json.loads(meta["config"]) if "config" in meta else {}


def export_norm(path, state):
    """`model.norm` of an export: its config's, else batch norm where running statistics are stored, else group."""
    norm = export_config(path).get("model", {}).get("norm")
    if norm:
        return norm
    return "batch" if any(k.endswith("norm0.running_mean") for k in state) else "group"


#: The byte tokenizer's start and end tokens and its vocabulary (the trainer's `SOT`, `EOT`, `VOCAB`).
SOT, EOT, BYTE_VOCAB = 256, 257, 258


def byte_tokenize(texts, context):
    """The trainer's byte tokenizer: ids `[n, context]` (start, the UTF-8 bytes
    other than 0 cut to context − 2, end, zeros) and each text's end position `[n]`."""
    ids = torch.zeros(len(texts), context, dtype=torch.long)
    ends = torch.zeros(len(texts), dtype=torch.long)
    for row, text in enumerate(texts):
        data = [b for b in text.encode("utf-8") if b != 0][: context - 2]
        ids[row, 0] = SOT
        ids[row, 1 : 1 + len(data)] = torch.tensor(data, dtype=torch.long)
        ids[row, 1 + len(data)] = EOT
        ends[row] = 1 + len(data)
    return ids, ends


def text_activation(name):
    """`model.text.act`: `gelu` (exact, erf) or `quick_gelu` (x·σ(1.702x), OpenAI CLIP's)."""
    if name == "gelu":
        return F.gelu
    if name == "quick_gelu":
        return lambda x: x * torch.sigmoid(1.702 * x)
    raise ValueError(f"model.text.act `{name}` is not one of gelu, quick_gelu")


class TextBlock(nn.Module):
    """A pre-LN transformer block: `ln1` → attention (`qkv`, `out`) → residual, `ln2` → `fc1` → act → `fc2` → residual."""

    def __init__(self, width, heads, act):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(width, eps=1e-5), nn.LayerNorm(width, eps=1e-5)
        self.qkv, self.out = nn.Linear(width, 3 * width), nn.Linear(width, width)
        self.fc1, self.fc2 = nn.Linear(width, 4 * width), nn.Linear(4 * width, width)
        self.heads, self.act = heads, text_activation(act)

    def forward(self, x, mask):
        b, t, w = x.shape
        dh = w // self.heads
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.heads, dh).permute(2, 0, 3, 1, 4)
        att = (q @ k.transpose(-2, -1) / math.sqrt(dh)).masked_fill(mask, float("-inf")).softmax(-1)
        x = x + self.out((att @ v).permute(0, 2, 1, 3).reshape(b, t, w))
        return x + self.fc2(self.act(self.fc1(self.ln2(x))))


class TextTower(nn.Module):
    """`model.text.*`: token and position embeddings, blocks `block<k>`,
    `ln_final`, pooling (`last`: each text's end token; `first`; `mean` over
    its tokens) and a projection `proj` without bias. Causal attention, or
    (`causal=False`) every token sees its text's tokens, padding masked."""

    def __init__(self, vocab, width, layers, heads, context, out, act="gelu", causal=True, pool="last"):
        super().__init__()
        self.token_embedding = nn.Embedding(vocab, width)
        self.positional_embedding = nn.Parameter(torch.zeros(context, width))
        for k in range(layers):
            self.add_module(f"block{k}", TextBlock(width, heads, act))
        self.ln_final = nn.LayerNorm(width, eps=1e-5)
        self.proj = nn.Linear(width, out, bias=False)
        self.layers, self.causal, self.pool = layers, causal, pool

    def forward(self, ids, ends):
        """ids `[B, T]` (T ≤ context), ends `[B]` (each text's last token) → `[B, out]`."""
        b, t = ids.shape
        x = self.token_embedding(ids) + self.positional_embedding[:t]
        positions = torch.arange(t, device=ids.device)
        if self.causal:
            mask = torch.ones(t, t, dtype=torch.bool, device=ids.device).triu(1)
        else:
            mask = (positions[None, :] > ends[:, None]).view(b, 1, 1, t)
        for k in range(self.layers):
            x = getattr(self, f"block{k}")(x, mask)
        x = self.ln_final(x)
        if self.pool == "last":
            pooled = x[torch.arange(b, device=ids.device), ends]
        elif self.pool == "first":
            pooled = x[:, 0]
        elif self.pool == "mean":
            inside = (positions[None, :] <= ends[:, None]).to(x.dtype)
            pooled = (x * inside[:, :, None]).sum(1) / (ends.to(x.dtype) + 1.0)[:, None]
        else:
            raise ValueError(f"model.text.pool `{self.pool}` is not one of last, first, mean")
        return self.proj(pooled)

    @classmethod
    def from_state(cls, state, text_config, prefix="text."):
        """A tower shaped by `state[prefix + ...]` and the run's `model.text` keys (heads, act, causal, pool)."""
        vocab, width = state[prefix + "token_embedding.weight"].shape
        context = state[prefix + "positional_embedding"].shape[0]
        layers = sum(1 for k in state if k.startswith(prefix + "block") and k.endswith(".qkv.weight"))
        out = state[prefix + "proj.weight"].shape[0]
        c = {"heads": 4, "act": "gelu", "causal": True, "pool": "last", **text_config}
        return cls(vocab, width, layers, c["heads"], context, out, c["act"], c["causal"], c["pool"])


class LossParameters(nn.Module):
    """CLIP's learnt loss parameters: `logit_scale` (its log) and SigLIP's `logit_bias`."""

    def __init__(self, bias=False):
        super().__init__()
        self.logit_scale = nn.Parameter(torch.zeros(()))
        self.logit_bias = nn.Parameter(torch.zeros(())) if bias else None


class CLIP(nn.Module):
    """`method.name: clip` on `convnet`: `backbone`, `image_proj` (no bias), `text` and `loss`."""

    def __init__(self, backbone, proj_dim, text, siglip=False):
        super().__init__()
        self.backbone = backbone
        self.image_proj = nn.Linear(backbone.embed_dim, proj_dim, bias=False)
        self.text = text
        self.loss = LossParameters(siglip)
        self.context = text.positional_embedding.shape[0]

    def features(self, x):
        """The backbone's features, L2-normalised: what kNN and `trainer embed` use."""
        return F.normalize(self.backbone(x), dim=1)

    def encode_image(self, x):
        """Images → the shared space (not normalised)."""
        return self.image_proj(self.backbone(x))

    def encode_text(self, ids, ends):
        """Token ids `[B, T]` and end positions `[B]` → the shared space (not normalised)."""
        return self.text(ids, ends)

    def forward(self, x, ids, ends):
        """CLIP's logits: image rows against text columns, times the logit scale (plus SigLIP's bias)."""
        img, txt = F.normalize(self.encode_image(x), dim=1), F.normalize(self.encode_text(ids, ends), dim=1)
        logits = self.loss.logit_scale.exp() * img @ txt.T
        return logits if self.loss.logit_bias is None else logits + self.loss.logit_bias

    @classmethod
    def from_export(cls, path, norm=None):
        """A CLIP model shaped by, and loaded from, a `trainer export` file."""
        state, config = load_tensors(path), export_config(path)
        backbone = ConvNet(*convnet_shape(state, norm or export_norm(path, state)))
        text = TextTower.from_state(state, config.get("model", {}).get("text", {}))
        model = cls(backbone, state["image_proj.weight"].shape[0], text, "loss.logit_bias" in state)
        load_into(model, state)
        return model.eval()


def load_export(path):
    """A `trainer export` file as its mirror module (by the method in its metadata): `SimCLR` or `CLIP`."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        method = (f.metadata() or {}).get("method", "simclr")
    if method == "clip":
        return CLIP.from_export(path)
    if method in ("simclr", "pba"):
        return SimCLR.from_export(path)
    raise ValueError(f"{path}: method `{method}` is not mirrored here (simclr, pba and clip are)")


def load_tensors(path):
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
