"""Reference values of Barlow Twins and N-pair from the libraries the docs name.

The Rust tests (crates/contrast-nn/tests/survey.rs, `*_match_the_named_library`)
compare against the numbers this prints. Regenerate with

    pip install --target /tmp/ref --no-deps lightly==1.6.0 pytorch-metric-learning==2.9.0
    pip install --target /tmp/ref scipy tqdm scikit-learn
    PYTHONPATH=/tmp/ref python tools/reference/barlow_npair.py

(any torch ≥ 2.0 in the interpreter). Inputs are closed-form so that both
sides build them without sharing a random generator.
"""
import math

import torch
import torch.nn.functional as F
from lightly.loss import BarlowTwinsLoss
from pytorch_metric_learning.losses import NPairsLoss


def inputs(n, d, salt):
    rows = [[math.sin(0.37 * i + 1.3 * j + salt) * (1.0 + 0.1 * j) for j in range(d)] for i in range(n)]
    return torch.tensor(rows, dtype=torch.float64)


def official_barlow(za, zb, lambd):
    """facebookresearch/barlowtwins main.py: BatchNorm1d(affine=False) on each view, one process."""
    bn = torch.nn.BatchNorm1d(za.shape[1], affine=False).double()
    c = bn(za).T @ bn(zb) / za.shape[0]
    on = (torch.diagonal(c) - 1).pow(2).sum()
    off = (c - torch.diag(torch.diagonal(c))).pow(2).sum()
    return on + lambd * off


def unbiased_barlow(za, zb, lambd):
    """The paper's Algorithm 1 and lightly <= 1.5: (z - mean) / std (unbiased), no epsilon."""
    a = (za - za.mean(0)) / za.std(0)
    b = (zb - zb.mean(0)) / zb.std(0)
    c = a.T @ b / za.shape[0]
    on = (torch.diagonal(c) - 1).pow(2).sum()
    off = (c - torch.diag(torch.diagonal(c))).pow(2).sum()
    return on + lambd * off


def tf_npairs(z, labels, pairs, reg_lambda):
    """tf.contrib.losses.metric_learning.npairs_loss on pml's pairs (unique labels): CE + reg/4 (mean|a|^2 + mean|p|^2)."""
    a = z[[p[0] for p in pairs]]
    p = z[[p[1] for p in pairs]]
    ce = F.cross_entropy(a @ p.T, torch.arange(len(pairs)))
    return ce + 0.25 * reg_lambda * ((a * a).sum(1).mean() + (p * p).sum(1).mean())


for n in (8, 64):
    za, zb = inputs(n, 4, 0.0), inputs(n, 4, 2.0)
    lightly = BarlowTwinsLoss(lambda_param=5e-3)(za, zb).item()
    print(f"barlow_twins N={n} lightly-1.6={lightly!r} official={official_barlow(za, zb, 5e-3).item()!r}"
          f" unbiased={unbiased_barlow(za, zb, 5e-3).item()!r}")
z = inputs(9, 4, 5.0) * 3.0
labels = torch.tensor([0, 1, 0, 2, 1, 3, 2, 3, 1])
print(f"npair pml-2.9={NPairsLoss()(z, labels).item()!r}")
print(f"npair_dot tf={tf_npairs(z, labels, [(0, 2), (1, 4), (3, 6), (5, 7)], 0.002).item()!r}")
