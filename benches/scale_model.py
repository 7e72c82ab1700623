#!/usr/bin/env python3
"""Scale model: predicted step time and efficiency of CLIP ViT-B/32 (configs/clip_vit.yaml's
shape) at P = 8 … 1024 ranks with a fixed local batch, from measured costs and one
interconnect's published figures.

    launch/mpirun.sh -n 2 target/release/collectives --json /tmp/collectives.json   # this build's α–β
    .venv/bin/python benches/scale_model.py --collectives /tmp/collectives.json [--local 256]

Inputs
- compute: forward + backward + optimiser seconds per sample of the two towers, measured
  here by this script with libtorch through PyTorch (torchvision's vit_b_32 and a 12-layer,
  width-512 text transformer at context 77, batch 8, all threads): the same kernels the
  trainer calls (benches/step_vs_ddp.py shows the two level per step). `--speedup` scales
  it, to ask what a faster device changes: communication's share grows as compute shrinks.
- loss head: seconds per logit of the streamed CLIP head, measured here (N = 4096); each
  rank scores 2·B·N logits, so at a fixed local batch it grows with P.
- collectives: ring algorithms, t = (P−1)·α + (P−1)/P · bytes · β for the all-gather and
  the reduce-scatter of the embeddings (two towers, d = 512, f32), 2× that for the
  gradient all-reduce of the 151.3 M parameters (open_clip ViT-B-32's count), which does
  not grow with P. β from the interconnect: InfiniBand NDR, 400 Gb/s per port
  (NVIDIA ConnectX-7 product brief) → 50 GB/s, one port per rank; α = 2 µs per hop
  (an assumption of the usual order of MPI latency on InfiniBand, not a measurement).
  `--collectives` prints this build's fit on this host beside it (shared memory).
- The all-reduce is counted whole: the trainer does not overlap it with the backward yet.

Printed: per P the step's parts in seconds, communication's share of the step, and the
efficiency against the same local batch with no communication; then the first P where
communication passes 5% of the step.
"""
import argparse
import json
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

PARAMS = 151.3e6
EMBED = 512
NDR_BYTES_PER_S = 400e9 / 8
ALPHA_S = 2e-6


def compute_per_sample(batch=8, reps=3):
    import torchvision
    image = torchvision.models.vit_b_32()
    layer = nn.TransformerEncoderLayer(512, 8, 2048, batch_first=True, norm_first=True, activation="gelu")
    text = nn.TransformerEncoder(layer, 12, enable_nested_tensor=False)
    embed = nn.Embedding(49408, 512)
    params = list(image.parameters()) + list(text.parameters()) + list(embed.parameters())
    opt = torch.optim.AdamW(params, lr=1e-4)
    x = torch.randn(batch, 3, 224, 224)
    tokens = torch.randint(0, 49408, (batch, 77))

    def step():
        opt.zero_grad()
        loss = image(x).square().mean() + text(embed(tokens)).square().mean()
        loss.backward()
        opt.step()

    step()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2] / batch


def head_per_logit(n=4096, d=EMBED):
    a = torch.randn(n, d, requires_grad=True)
    b = torch.randn(n, d, requires_grad=True)
    scale = torch.tensor(2.659, requires_grad=True)
    # The streamed head's arithmetic: per direction one GEMM forward, two backward.
    t0 = time.perf_counter()
    for _ in range(2):
        ia, tb = F.normalize(a, dim=1), F.normalize(b, dim=1)
        logits = scale.exp() * ia @ tb.T
        labels = torch.arange(n)
        loss = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
        loss.backward()
    return (time.perf_counter() - t0) / 2 / (2 * n * n)


def ring(p, alpha, beta, total_bytes):
    return (p - 1) * alpha + (p - 1) / p * total_bytes * beta


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--local", type=int, default=256, help="local batch per rank")
    ap.add_argument("--speedup", default="1,10,100", help="compute (and head) faster than measured here by these factors")
    ap.add_argument("--collectives", help="JSON of target/release/collectives --json")
    args = ap.parse_args()
    torch.manual_seed(0)
    per_sample = compute_per_sample()
    per_logit = head_per_logit()
    print(f"measured here: {per_sample * 1e3:.1f} ms per sample (ViT-B/32 + text tower, fwd+bwd+AdamW), "
          f"{per_logit * 1e9:.2f} ns per logit (CLIP head)")
    if args.collectives:
        with open(args.collectives) as f:
            c = json.load(f)
        for k in ("all_gather", "all_reduce"):
            print(f"this build on this host ({c['ranks']} ranks): {k} α = {c[k]['alpha_s'] * 1e6:.1f} µs, "
                  f"β = {c[k]['beta_s_per_byte'] * 1e9:.3f} ns/byte ({1 / max(c[k]['beta_s_per_byte'], 1e-30) / 1e9:.1f} GB/s)")
    beta = 1 / NDR_BYTES_PER_S
    b = args.local
    print(f"model: InfiniBand NDR (50 GB/s, α = 2 µs assumed), local batch {b}, ring collectives, "
          f"all-reduce not overlapped")
    for speed in [float(s) for s in args.speedup.split(",")]:
        compute = per_sample * b / speed
        print(f"\ncompute {speed:g}× this host: {compute:.3f} s per step of local batch {b}")
        print(f"{'P':>6} {'compute':>9} {'head':>9} {'gath+rs':>9} {'allreduce':>10} {'step':>9} {'comm %':>7} {'eff':>6}")
        crossed = None
        for p in [8, 16, 32, 64, 128, 256, 512, 1024]:
            n = p * b
            head = 2 * b * n * per_logit / speed
            emb = 2 * 2 * ring(p, ALPHA_S, beta, n * EMBED * 4)  # (gather + reduce-scatter) × two towers
            allreduce = 2 * ring(p, ALPHA_S, beta, PARAMS * 4)
            step = compute + head + emb + allreduce
            comm = (emb + allreduce) / step
            if crossed is None and comm > 0.05:
                crossed = p
            print(f"{p:>6} {compute:>9.3f} {head:>9.4f} {emb:>9.4f} {allreduce:>10.4f} {step:>9.3f} "
                  f"{comm * 100:>6.1f}% {compute / step:>6.2f}")
        print(f"communication passes 5% of the step at P = {crossed}" if crossed else
              "communication stays under 5% up to P = 1024")


if __name__ == "__main__":
    main()
