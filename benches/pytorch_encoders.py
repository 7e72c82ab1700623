"""PyTorch eager baseline for benches/encoders.rs: one SimCLR step (two views
through the encoder and a 2-layer projection MLP, NT-Xent at t = 0.2, backward)
with torchvision's ResNet or timm's ViT, on the same libtorch.

    python benches/pytorch_encoders.py CASE BATCH THREADS WARMUP REPS

CASE: resnet18_cifar32 | resnet50_224 | vit_small_224. Prints one line,
`pairs_per_s <float>` (image pairs per second, median step), with group norm
(32 groups) in the ResNets as the trainer's default, and torchvision's
zero_init_residual.
"""
import statistics
import sys
import time

import torch
import torch.nn.functional as F
import torchvision


def group_norm(c):
    return torch.nn.GroupNorm(32, c)


def encoder(case):
    if case == "resnet18_cifar32":
        m = torchvision.models.resnet18(norm_layer=group_norm, zero_init_residual=True)
        m.conv1 = torch.nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        m.maxpool = torch.nn.Identity()
        m.fc = torch.nn.Identity()
        return m, 512, 32
    if case == "resnet50_224":
        m = torchvision.models.resnet50(norm_layer=group_norm, zero_init_residual=True)
        m.fc = torch.nn.Identity()
        return m, 2048, 224
    if case == "vit_small_224":
        import timm

        return timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=0), 384, 224
    sys.exit(f"unknown case {case}")


def ntxent(a, b, t):
    z = F.normalize(torch.cat([a, b]), dim=1)
    n = a.shape[0]
    s = z @ z.T / t
    s.fill_diagonal_(float("-inf"))
    target = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)])
    return F.cross_entropy(s, target)


def main():
    case, batch, threads, warmup, reps = sys.argv[1], *map(int, sys.argv[2:6])
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    net, dim, size = encoder(case)
    head = torch.nn.Sequential(torch.nn.Linear(dim, 512), torch.nn.ReLU(), torch.nn.Linear(512, 64))
    params = list(net.parameters()) + list(head.parameters())
    x1, x2 = torch.randn(batch, 3, size, size), torch.randn(batch, 3, size, size)

    def step():
        for p in params:
            p.grad = None
        ntxent(head(net(x1)), head(net(x2)), 0.2).backward()

    for _ in range(warmup):
        step()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    print(f"pairs_per_s {batch / statistics.median(times)}")


if __name__ == "__main__":
    main()
