"""The PyTorch side of benches/pipeline_vs_ddp.py: configs/simclr.yaml's whole
job as users write it with PyTorch: Fashion-MNIST read from Debian's IDX
files, two views through torchvision v2 transforms (contrast's `simclr` preset
with configs/simclr.yaml's `data.aug`), a DistributedSampler and a DataLoader
with persistent workers, the same model under DDP (gloo), NT-Xent over the
global batch, AdamW (lr 0.002, weight decay 1e-4).

    python -m torch.distributed.run --nproc_per_node P benches/pytorch_pipeline.py --out FILE
        [--global-batch 256] [--steps 12] [--workers 1] [--threads 1]

Rank 0 writes FILE: wall-clock seconds per step (the data wait included), and
the peak RSS of every rank (workers not included: they are other processes).
"""
import argparse
import gzip
import json
import os
import resource
import sys
import time

import numpy as np
import torch
import torch.distributed as dist
from torchvision.transforms import v2

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from pytorch_step import SimCLR, ntxent  # noqa: E402

ROOT = "/usr/share/datasets/fashion-mnist"


def idx_images(path):
    with gzip.open(path) as f:
        data = f.read()
    n, h, w = (int.from_bytes(data[4 * k:4 * k + 4], "big") for k in (1, 2, 3))
    return torch.from_numpy(np.frombuffer(data, dtype=np.uint8, offset=16).reshape(n, 1, h, w).copy())


class TwoViews(torch.utils.data.Dataset):
    def __init__(self, images):
        self.images = images
        self.t = v2.Compose([
            v2.RandomResizedCrop(28, scale=(0.3, 1.0), antialias=True),
            v2.RandomHorizontalFlip(0.5),
            v2.RandomApply([v2.ColorJitter(brightness=0.4, contrast=0.4)], p=0.8),
            v2.RandomApply([v2.GaussianBlur(kernel_size=7, sigma=(0.1, 1.0))], p=0.2),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize([0.2860], [0.3530]),
        ])

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        x = self.images[i]
        return self.t(x), self.t(x)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--global-batch", type=int, default=256)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    ds = TwoViews(idx_images(os.path.join(ROOT, "train-images-idx3-ubyte.gz")))
    sampler = torch.utils.data.distributed.DistributedSampler(ds, seed=0, drop_last=True)
    loader = torch.utils.data.DataLoader(ds, batch_size=args.global_batch // world, sampler=sampler,
                                         num_workers=args.workers, persistent_workers=args.workers > 0,
                                         prefetch_factor=4 if args.workers > 0 else None, drop_last=True)
    model = torch.nn.parallel.DistributedDataParallel(SimCLR())
    opt = torch.optim.AdamW(model.parameters(), lr=0.002, weight_decay=1e-4)
    seconds, it = [], iter(loader)
    t0 = time.perf_counter()
    for _ in range(args.steps):
        a, b = next(it)
        opt.zero_grad(set_to_none=True)
        loss = ntxent(model(torch.cat([a, b])), rank, world)
        loss.backward()
        opt.step()
        loss.item()
        now = time.perf_counter()
        seconds.append(now - t0)
        t0 = now
    rss = torch.zeros(world, dtype=torch.float64)
    rss[rank] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024.0
    dist.all_reduce(rss)
    if rank == 0:
        with open(args.out, "w") as f:
            json.dump({"seconds": seconds, "peak_rss_bytes": rss.tolist()}, f)
    dist.barrier()
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
