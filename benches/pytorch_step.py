"""The PyTorch side of benches/step_vs_ddp.py: the same SimCLR (or, with
`--method clip`, CLIP) step as target/release/step_bench, as users write it
with PyTorch DDP.

    python -m torch.distributed.run --nproc_per_node P benches/pytorch_step.py --dir DIR --steps S [--method clip]

CLIP: configs/clip.yaml's towers (the convnet with a linear projection; the
text tower mirrored below with contrast's names), random captions from
DIR/batches.safetensors (`tokens`, `ends`), open_clip's ClipLoss with
`local_loss=True, gather_with_grad=True` and its clamp of the logit scale.

- model: configs/simclr.yaml's encoder and head, built from torch.nn modules with
  the parameter names of contrast (`backbone.conv0.weight`, `head.fc1.bias`, ...),
  initial weights loaded from DIR/init.safetensors;
- data: DIR/batches.safetensors (`b<k>`, `[2, G, 1, 28, 28]`), rank r takes rows
  [r·B, (r+1)·B) of each view; step s uses batch s mod K;
- DDP over gloo; embeddings gathered with `torch.distributed.nn.functional.all_gather`
  (its backward sums the gradients into their owners); NT-Xent on the local 2B
  anchors against the global 2N columns, mean over the local anchors (lightly's
  `NTXentLoss(gather_distributed=True)` convention), so DDP's average of the
  gradients is the gradient of the mean over all 2N anchors, as in contrast;
- AdamW(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0), one intra-op thread.

Rank 0 writes DIR/torch.json: losses (the global mean), seconds per step, peak RSS per rank.
"""
import argparse
import json
import math
import os
import resource
import sys
import time

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dnn
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file


class Backbone(nn.Module):
    """contrast's convnet: 4 conv3×3 (stride 1, 2, 1, 2) + GroupNorm(8) + ReLU, 4×4 average pool."""

    def __init__(self, width=32, embed=1024):
        super().__init__()
        last = embed // 16
        spec = [(1, width, 1), (width, 2 * width, 2), (2 * width, 2 * width, 1), (2 * width, last, 2)]
        for k, (i, o, s) in enumerate(spec):
            setattr(self, f"conv{k}", nn.Conv2d(i, o, 3, stride=s, padding=1, bias=False))
            setattr(self, f"norm{k}", nn.GroupNorm(8, o))

    def forward(self, x):
        for k in range(4):
            x = F.relu(getattr(self, f"norm{k}")(getattr(self, f"conv{k}")(x)))
        return F.adaptive_avg_pool2d(x, 4).flatten(1)


def resnet18():
    """contrast's `resnet18` with group norm (32 groups) and the CIFAR stem (3×3/1, no
    max-pool) for 1-channel 28 px images: torchvision's model, whose names contrast keeps."""
    import torchvision

    net = torchvision.models.resnet18(norm_layer=lambda c: nn.GroupNorm(32, c))
    net.conv1 = nn.Conv2d(1, 64, 3, stride=1, padding=1, bias=False)
    net.maxpool, net.fc = nn.Identity(), nn.Identity()
    return net


class Head(nn.Module):
    def __init__(self, width=1024):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(width, 512), nn.Linear(512, 64)

    def forward(self, x):
        return self.fc2(F.relu(self.fc1(x)))


class Block(nn.Module):
    """contrast's text block: pre-LN, fused qkv, causal softmax attention, GELU (erf) MLP."""

    def __init__(self, width, heads):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv, self.out = nn.Linear(width, 3 * width), nn.Linear(width, width)
        self.fc1, self.fc2 = nn.Linear(width, 4 * width), nn.Linear(4 * width, width)

    def forward(self, x, causal):
        b, t, w = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.heads, w // self.heads).permute(2, 0, 3, 1, 4)
        att = (q @ k.transpose(-2, -1) / (w // self.heads) ** 0.5).masked_fill(causal, float("-inf")).softmax(-1)
        x = x + self.out((att @ v).permute(0, 2, 1, 3).reshape(b, t, w))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class Text(nn.Module):
    """contrast's CLIP text tower (configs/clip.yaml: width 64, 2 layers, 4 heads, context 48)."""

    def __init__(self, vocab=258, width=64, layers=2, heads=4, context=48, out=64):
        super().__init__()
        self.token_embedding = nn.Embedding(vocab, width)
        self.positional_embedding = nn.Parameter(torch.zeros(context, width))
        for k in range(layers):
            setattr(self, f"block{k}", Block(width, heads))
        self.layers = layers
        self.ln_final, self.proj = nn.LayerNorm(width), nn.Linear(width, out, bias=False)

    def forward(self, tokens, ends):
        t = tokens.shape[1]
        x = self.token_embedding(tokens) + self.positional_embedding[:t]
        causal = torch.ones(t, t, dtype=torch.bool).triu(1)
        for k in range(self.layers):
            x = getattr(self, f"block{k}")(x, causal)
        return self.proj(self.ln_final(x)[torch.arange(x.shape[0]), ends])


class Clip(nn.Module):
    """configs/clip.yaml: the convnet with a linear projection, the text tower, a learnt logit scale."""

    def __init__(self):
        super().__init__()
        self.backbone, self.text = Backbone(), Text()
        self.image_proj = nn.Linear(1024, 64, bias=False)
        self.loss = nn.Module()
        self.loss.logit_scale = nn.Parameter(torch.zeros(()))

    def forward(self, images, tokens, ends):
        return self.image_proj(self.backbone(images)), self.text(tokens, ends)


def clip_loss(img, txt, scale, rank):
    """open_clip's ClipLoss(local_loss=True, gather_with_grad=True): local rows against all gathered."""
    img, txt = F.normalize(img, dim=1), F.normalize(txt, dim=1)
    all_img, all_txt = torch.cat(dnn.all_gather(img)), torch.cat(dnn.all_gather(txt))
    labels = torch.arange(img.shape[0]) + rank * img.shape[0]
    s = scale.exp()
    return (F.cross_entropy(s * img @ all_txt.T, labels) + F.cross_entropy(s * txt @ all_img.T, labels)) / 2


class SimCLR(nn.Module):
    def __init__(self, resnet=False):
        super().__init__()
        self.backbone, self.head = (resnet18(), Head(512)) if resnet else (Backbone(), Head())

    def forward(self, x):
        return self.head(self.backbone(x))


def ntxent(z_local, rank, world, t=0.2):
    """Local 2B anchors (A rows then B rows) against all 2N gathered rows."""
    b = z_local.shape[0] // 2
    za, zb = F.normalize(z_local[:b], dim=1), F.normalize(z_local[b:], dim=1)
    ga, gb = torch.cat(dnn.all_gather(za)), torch.cat(dnn.all_gather(zb))
    n = ga.shape[0]
    z = torch.cat([ga, gb])  # [2N, d]
    rows = torch.arange(rank * b, (rank + 1) * b)
    anchors = torch.cat([rows, rows + n])
    logits = torch.cat([za, zb]) @ z.T / t  # [2B, 2N]
    logits[torch.arange(2 * b), anchors] = float("-inf")
    return F.cross_entropy(logits, (anchors + n) % (2 * n))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", required=True)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--double", action="store_true", help="train in float64 (the parity check)")
    ap.add_argument("--method", default="simclr", choices=["simclr", "clip"])
    ap.add_argument("--resnet18", action="store_true", help="SimCLR with contrast's group-norm ResNet-18")
    args = ap.parse_args()
    clip = args.method == "clip"
    dtype = torch.float64 if args.double else torch.float32
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    model = Clip() if clip else SimCLR(args.resnet18)
    model.load_state_dict(load_file(os.path.join(args.dir, "init.safetensors")))
    model.to(dtype)
    ddp = nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    batches = load_file(os.path.join(args.dir, "batches.safetensors"))
    views = []
    for k in range(len([key for key in batches if key.startswith("b")])):
        g = batches[f"b{k}"]
        b = g.shape[1] // world
        pair = [g[0, rank * b:(rank + 1) * b]] if clip else [g[0, rank * b:(rank + 1) * b], g[1, rank * b:(rank + 1) * b]]
        views.append(torch.cat(pair).to(dtype).contiguous())
    tokens, ends = batches["tokens"][rank * b:(rank + 1) * b], batches["ends"][rank * b:(rank + 1) * b]
    del batches
    losses, seconds = [], []
    for step in range(args.steps):
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        if clip:
            img, txt = ddp(views[step % len(views)], tokens, ends)
            loss = clip_loss(img, txt, model.loss.logit_scale, rank)
        else:
            loss = ntxent(ddp(views[step % len(views)]), rank, world)
        loss.backward()
        opt.step()
        if clip:
            with torch.no_grad():
                model.loss.logit_scale.clamp_(0, math.log(100))
        mean = loss.detach().clone()
        dist.all_reduce(mean)
        losses.append(mean.item() / world)
        seconds.append(time.perf_counter() - t0)
    rss = torch.zeros(world, dtype=torch.float64)
    rss[rank] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024.0
    dist.all_reduce(rss)
    if rank == 0:
        with open(os.path.join(args.dir, "torch.json"), "w") as f:
            json.dump({"losses": losses, "seconds": seconds, "peak_rss_bytes": rss.tolist()}, f)
    dist.barrier()
    # Exit without gloo's teardown, which was seen to hang one rank after a large run.
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
