"""torchvision baseline for benches/data.rs: ImageFolder + DataLoader with the
transforms of contrast's `simclr` RGB preset, two views per image.

    python benches/torchvision_baseline.py DIR WORKERS [SIZE]

Prints one line: `images_per_s <float>` (images decoded per second, each
giving two augmented views), measured over one pass after a warm-up batch.
"""
import sys
import time

import torch
from torchvision import datasets, transforms


class TwoViews:
    def __init__(self, t):
        self.t = t

    def __call__(self, x):
        return self.t(x), self.t(x)


def main():
    root, workers = sys.argv[1], int(sys.argv[2])
    size = int(sys.argv[3]) if len(sys.argv) > 3 else 224
    torch.set_num_threads(1)
    t = transforms.Compose([
        transforms.RandomResizedCrop(size, scale=(0.08, 1.0)),
        transforms.RandomHorizontalFlip(),
        transforms.RandomApply([transforms.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
        transforms.RandomGrayscale(p=0.2),
        transforms.RandomApply([transforms.GaussianBlur(kernel_size=23, sigma=(0.1, 2.0))], p=0.5),
        transforms.ToTensor(),
        transforms.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]),
    ])
    ds = datasets.ImageFolder(root, transform=TwoViews(t))
    loader = torch.utils.data.DataLoader(ds, batch_size=64, shuffle=True, num_workers=workers,
                                         persistent_workers=workers > 0, drop_last=True)
    it = iter(loader)
    next(it)  # warm-up: worker start-up and first batch
    n = 0
    start = time.perf_counter()
    for (a, b), _ in it:
        n += a.shape[0]
    elapsed = time.perf_counter() - start
    print(f"images_per_s {n / elapsed:.1f}")


if __name__ == "__main__":
    main()
