"""The masking sweep's per-epoch score: a label-efficient linear probe on the target encoder.

    probe_score(cfg, root) -> ProbeScore    on the configured data: the 1% train list and val
    ProbeScore(cfg, data_fn)                on any (train, val) pair (tests pass tiny ones)

The stage hands it to `pipeline.sweep.run`, which hands it to every trial (`pipeline.ray_tune`): rank 0
calls it after each epoch and its figures join the epoch's report, `probe_top1` being what ASHA compares.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from torch import nn
from torch.utils.data import Dataset

from evals.features import extract
from evals.linear import imagenet_splits, num_classes
from evals.probe import linear_probe
from pipeline.config import Config
from pipeline.metrics import rankme
from pipeline.sweep import SCORE


def probe_datasets(cfg: Config, root: str | Path) -> tuple[Dataset, Dataset]:
    """(1% train list, val) of the ImageNet-format data, eval transform: the label-efficient probe's data."""
    return imagenet_splits(cfg, Path(root), subset=True)


@dataclass
class ProbeScore:
    """`(model, epoch) -> {"probe_top1", "probe_top1_se", "probe_top5", "val_rankme"}`: the trial's
    per-epoch score.

    The target encoder's pooled last-layer features (D,) of the 1% train images train a linear probe
    (`cfg.eval_semi`'s grid); top-1/top-5 on val in %, and top-1's binomial standard error in points
    (100 * sqrt(p (1 - p) / n_val)). RankMe is the effective rank of the val features (n_val, D).
    The worker also calls it on the seeded, untrained model (epoch 0): the trial's random-init level.
    Picklable (it travels to the Ray worker); the datasets load there, once.
    """

    cfg: Config
    data_fn: Callable[[], tuple[Dataset, Dataset]]
    _data: tuple[Dataset, Dataset] | None = field(default=None, repr=False)

    def check(self) -> None:
        """Load the datasets here and drop them: missing data fails in one line before any trial starts
        (the copy sent to the workers stays empty, they load their own)."""
        self.data_fn()

    def __call__(self, model: nn.Module, epoch: int) -> dict[str, float]:
        if self._data is None:
            self._data = self.data_fn()
        return self._score(model.target_encoder, *self._data, f"epoch {epoch}" if epoch else "random init")

    def _score(self, encoder: nn.Module, train: Dataset, val: Dataset, what: str) -> dict[str, float]:
        bs = self.cfg.eval_semi.batch_size
        ftr = extract(encoder, train, "pooled", batch_size=bs, desc=f"probe train ({what})")
        fva = extract(encoder, val, "pooled", batch_size=bs, desc=f"probe val ({what})")
        result = linear_probe(ftr["last"], ftr["y"], fva["last"], fva["y"], num_classes(train, ftr["y"]),
                              self.cfg.eval_semi)
        return {SCORE: result["top1"], SCORE + "_se": binomial_se(result["top1"], len(fva["y"])),
                "probe_top5": result["top5"], "val_rankme": rankme(fva["last"])}


def binomial_se(top1: float, n: int) -> float:
    """The standard error, in points, of a top-1 of `top1` % measured on `n` items."""
    p = top1 / 100
    return 100 * math.sqrt(p * (1 - p) / n)


def probe_score(cfg: Config, root: str | Path) -> ProbeScore:
    """The sweep's score on the data under `cfg.data` (relative to `root`)."""
    return ProbeScore(cfg, functools.partial(probe_datasets, cfg, str(Path(root).resolve())))
