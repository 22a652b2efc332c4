"""A linear head on cached features, its lr x weight decay picked on a split carved from train.

Every (lr, wd) pair of the grid is trained at once as one wide linear layer: the heads share the
input, their losses add up, and gradients never cross heads, so G heads cost one (D, G*C) matmul a
step. `GridAdam` gives each head its own learning rate. Weight decay is an L2 penalty in the loss
(0.5 * wd * |W|^2, the bias excluded), so each head converges to regularised logistic regression.

Protocol: standardise features with the train statistics; train the grid on (train - val); pick the
head with the best val top-1 (ties: lower val cross-entropy); retrain that (lr, wd) on all of train;
touch the test set once. A grid of one point skips the split.

Tiny label sets (a 1% list of 6 images a class: a 10% split would validate on 6 images) choose by
k-fold cross-validation instead (`selection_splits`): when the held-out split would hold fewer than
MIN_VAL_ITEMS items per class on average, k = min(MAX_FOLDS, n) stratified folds, every train item
validated once, and top-1 / cross-entropy pooled over all of them. The result says which ran:
"selection_folds" is 1 for the held-out split, k for k-fold (and 0 for a grid of one point).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from evals import common
from evals.paired import HITS
from pipeline.config import ProbeConfig
from pipeline.errors import PipelineError

PROBE_BATCH = 1024  # training minibatch on cached features (cfg.batch_size is for extraction)
# Below 5 val items per class, val top-1 moves in steps of >= 1/5 of a class's accuracy and most grid
# points tie or differ by an item or two: the choice is noise. k-fold validates on every train item
# (10x the items at val_fraction 0.1) for k trainings of heads on cached features, which cost seconds.
MIN_VAL_ITEMS = 5  # per class on average (linear probe); images (depth probe)
MAX_FOLDS = 5


class GridAdam:
    """Adam over parameters whose first axis is the head (G, ...); head g steps with lrs[g]."""

    def __init__(self, params: Sequence[Tensor], lrs: Tensor, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8):
        self.params, self.lrs, self.betas, self.eps, self.t = list(params), lrs, betas, eps, 0
        self.m = [torch.zeros_like(p) for p in self.params]
        self.v = [torch.zeros_like(p) for p in self.params]

    @torch.no_grad()
    def step(self, grads: Sequence[Tensor], scale: float = 1.0) -> None:
        """One Adam step with lr = lrs * scale (scale: the schedule's factor)."""
        self.t += 1
        b1, b2 = self.betas
        c1, c2 = 1 - b1**self.t, 1 - b2**self.t
        for p, g, m, v in zip(self.params, grads, self.m, self.v, strict=True):
            m.mul_(b1).add_(g, alpha=1 - b1)
            v.mul_(b2).addcmul_(g, g, value=1 - b2)
            lr = (self.lrs * scale).view(-1, *([1] * (p.dim() - 1)))
            p.sub_(lr * (m / c1) / ((v / c2).sqrt() + self.eps))


@contextmanager
def num_threads(n: int) -> Iterator[None]:
    """Run torch ops on `n` threads inside the block. Heads on cached features are many tiny ops, where
    OpenMP's fork/join costs more than the work: 1 thread trains a grid 8x faster on a busy 2-core box."""
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def cosine(step: int, total: int) -> float:
    """Cosine decay factor 1 -> 0 over `total` steps."""
    return 0.5 * (1 + math.cos(math.pi * min(step, total) / max(total, 1)))


def grid(lrs: Sequence[float], wds: Sequence[float]) -> list[tuple[float, float]]:
    """Every (lr, wd) pair, lr-major."""
    return [(lr, wd) for lr in lrs for wd in wds]


def split_train_val(n: int, val_fraction: float, seed: int) -> tuple[Tensor, Tensor]:
    """Random disjoint (train_idx, val_idx) covering range(n); at least one item on each side."""
    if n < 2:
        raise PipelineError(f"a probe needs at least 2 training items to carve a validation split; got {n}")
    n_val = min(max(1, round(n * val_fraction)), n - 1)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return perm[n_val:], perm[:n_val]


def kfold(n: int, k: int, seed: int, labels: Tensor | None = None) -> list[tuple[Tensor, Tensor]]:
    """k disjoint val folds covering range(n), as (train_idx, val_idx) pairs; 2 <= k <= n.

    Sizes differ by at most one. With `labels` (n,), stratified: each class is dealt round-robin over
    the folds (after a seeded shuffle), so a class of m items has floor(m / k) or ceil(m / k) in each.
    """
    if not 2 <= k <= n:
        raise PipelineError(f"k-fold needs 2 <= k <= n; got k={k}, n={n}")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    if labels is not None:
        order = order[torch.sort(labels.cpu()[order], stable=True).indices]
    fold = torch.empty(n, dtype=torch.long)
    fold[order] = torch.arange(n) % k
    return [((fold != f).nonzero()[:, 0], (fold == f).nonzero()[:, 0]) for f in range(k)]


def selection_splits(n: int, val_fraction: float, seed: int, labels: Tensor | None = None
                     ) -> list[tuple[Tensor, Tensor]]:
    """The (train_idx, val_idx) pairs that choose hyper-parameters: the one held-out split of
    `split_train_val` when it would hold >= MIN_VAL_ITEMS items per class (`labels` (n,); without them,
    items) on average, else `kfold` with k = min(MAX_FOLDS, n), stratified by `labels`."""
    tr, va = split_train_val(n, val_fraction, seed)
    groups = 1 if labels is None else len(torch.unique(labels))
    if len(va) >= MIN_VAL_ITEMS * groups:
        return [(tr, va)]
    return kfold(n, min(MAX_FOLDS, n), seed, labels)


def standardizer(x: Tensor) -> Callable[[Tensor], Tensor]:
    """x (n, ...) -> a function that maps features to zero mean / unit std per dimension (train stats)."""
    flat = x.reshape(-1, x.shape[-1]).float()
    mean = flat.mean(0)
    std = flat.std(0).clamp_min(1e-6) if len(flat) > 1 else torch.ones_like(mean)
    return lambda z: (z.float() - mean) / std


def topk_accuracy(logits: Tensor, y: Tensor, k: int) -> float:
    """logits (n, C), y (n,) -> % of items whose label is among the k highest logits (k capped at C)."""
    k = min(k, logits.shape[-1])
    hit = (logits.topk(k, dim=-1).indices == y[:, None]).any(-1)
    return 100.0 * hit.double().mean().item()


def _logits(x: Tensor, w: Tensor, b: Tensor) -> Tensor:
    """x (n, D), w (G, D, C), b (G, C) -> (n, G, C)."""
    g, d, c = w.shape
    return (x @ w.permute(1, 0, 2).reshape(d, g * c)).view(-1, g, c) + b


def train_heads(x: Tensor, y: Tensor, num_classes: int, lrs: Sequence[float], wds: Sequence[float],
                epochs: int, seed: int = 0, batch_size: int = PROBE_BATCH) -> tuple[Tensor, Tensor]:
    """Softmax regression heads, one per (lrs[g], wds[g]); x (n, D) standardised, y (n,) in [0, C).

    Returns w (G, D, C), b (G, C). Adam, cosine lr over all steps, minibatches shuffled per epoch.
    """
    n, d = x.shape
    heads, dev = len(lrs), x.device
    w = torch.zeros(heads, d, num_classes, device=dev, requires_grad=True)
    b = torch.zeros(heads, num_classes, device=dev, requires_grad=True)
    wd = torch.tensor(list(wds), dtype=torch.float32, device=dev)
    opt = GridAdam([w, b], torch.tensor(list(lrs), dtype=torch.float32, device=dev))
    gen = torch.Generator().manual_seed(seed)
    steps_per_epoch = math.ceil(n / batch_size)
    total, step = epochs * steps_per_epoch, 0
    for _ in range(epochs):
        perm = (torch.randperm(n, generator=gen) if steps_per_epoch > 1 else torch.arange(n)).to(dev)
        for i in range(steps_per_epoch):
            idx = perm[i * batch_size:(i + 1) * batch_size]
            logits = _logits(x[idx], w, b)  # (B, G, C)
            ce = F.cross_entropy(logits.permute(0, 2, 1), y[idx, None].expand(-1, heads), reduction="none")
            loss = ce.mean(0).sum() + 0.5 * (wd * w.pow(2).sum((1, 2))).sum()
            grads = torch.autograd.grad(loss, [w, b])
            opt.step(grads, cosine(step, total))
            step += 1
    return w.detach(), b.detach()


def linear_probe(x_train: Tensor, y_train: Tensor, x_test: Tensor, y_test: Tensor, num_classes: int,
                 cfg: ProbeConfig, hits: bool = False) -> dict[str, Any]:
    """Features (n, D) and labels (n,) -> {"top1", "top5"} on test in %, plus the chosen "lr", "weight_decay"
    and "selection_folds" (1: held-out split, k: k-fold, 0: a grid of one point, nothing chosen); with
    `hits`, also "hits": (n_test,) bool on the CPU, the top-1 hit of each test item (for `evals.paired`)."""
    dev = common.device()  # the heads train on the GPU when there is one; features are cached on the CPU
    with num_threads(1):
        out = _linear_probe(x_train.to(dev), y_train.to(dev), x_test.to(dev), y_test.to(dev), num_classes, cfg)
    if not hits:
        del out[HITS]
    return out


def _linear_probe(x_train: Tensor, y_train: Tensor, x_test: Tensor, y_test: Tensor, num_classes: int,
                  cfg: ProbeConfig) -> dict[str, Any]:
    if len(x_test) == 0:
        raise PipelineError("linear probe: the test split is empty; expected at least one item")
    y_train, y_test = y_train.long(), y_test.long()
    if int(y_train.max()) >= num_classes or int(y_test.max()) >= num_classes or int(y_train.min()) < 0:
        raise PipelineError(f"linear probe: labels outside 0..{num_classes - 1}")
    points = grid(cfg.lrs, cfg.weight_decays)
    norm = standardizer(x_train)
    xs = norm(x_train)
    if len(points) == 1:
        (lr, wd), folds = points[0], 0
    else:
        splits = selection_splits(len(xs), cfg.val_fraction, cfg.seed, y_train)
        val_hits, val_ce = (torch.zeros(len(points), device=xs.device) for _ in range(2))
        for tr, va in ((tr.to(xs.device), va.to(xs.device)) for tr, va in splits):
            sub = standardizer(x_train[tr])  # selection must not see the val items' statistics
            w, b = train_heads(sub(x_train[tr]), y_train[tr], num_classes, [p[0] for p in points],
                               [p[1] for p in points], cfg.epochs, cfg.seed)
            with torch.no_grad():
                logits = _logits(sub(x_train[va]), w, b)  # (n_val, G, C)
                yv = y_train[va]
                val_hits += (logits.argmax(-1) == yv[:, None]).float().sum(0)
                val_ce += F.cross_entropy(logits.permute(0, 2, 1), yv[:, None].expand(-1, len(points)),
                                      reduction="none").sum(0)
        # Pooled over the folds (each item validated once): whole hit counts, so ties are exact.
        best = min(range(len(points)), key=lambda g: (-val_hits[g].item(), val_ce[g].item(), g))
        (lr, wd), folds = points[best], len(splits)
    w, b = train_heads(xs, y_train, num_classes, [lr], [wd], cfg.epochs, cfg.seed)
    with torch.no_grad():
        logits = _logits(norm(x_test), w, b)[:, 0]
    hits = logits.topk(1, dim=-1).indices[:, 0] == y_test  # what top1 counts
    return {"top1": topk_accuracy(logits, y_test, 1), "top5": topk_accuracy(logits, y_test, 5),
            "lr": lr, "weight_decay": wd, "selection_folds": folds, HITS: hits.cpu()}
