"""The raw-pixel baseline: the same linear probe on area-downscaled pixels instead of encoder features.

Beating a random-init encoder says little by itself (random ViT features are a random projection of the
pixels); beating the pixels says the encoder learnt something a linear read-out of the image cannot see.
Every classification evaluation reports it under `pixels` in its metrics file, the report's `baseline`
column. The images are the evaluation's own (eval transform, normalised), downscaled to
`PIXEL_SIZE` x `PIXEL_SIZE` (3 * 16 * 16 = 768 features, ViT-Micro's 128 / ViT-H's 1280 for scale).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset, Subset

from evals.features import cached, extract
from evals.probe import linear_probe
from pipeline.config import ProbeConfig

PIXEL_SIZE = 16
NAME = "pixels"  # the metrics files' section


class PixelFeatures(nn.Module):
    """Not an encoder: images (B, 3, S, S) -> one token (B, 1, 3 * s * s) of area-downscaled pixels, so the
    feature cache and extraction of `evals.features` serve it as they serve an encoder ("last" view)."""

    def __init__(self, size: int = PIXEL_SIZE):
        super().__init__()
        self.register_buffer("size", torch.tensor(size))  # in the state dict: names the cache entry

    def forward(self, x: Tensor) -> Tensor:
        """(B, 3, S, S) -> (B, 1, 3 * s * s)."""
        s = int(self.size)
        return F.adaptive_avg_pool2d(x.float(), (s, s)).flatten(1)[:, None, :]

    def forward_layers(self, x: Tensor, n: int = 1) -> list[Tensor]:
        """n references to the one token tensor: the layer interface `evals.features` reads."""
        return [self(x)] * n


def pixel_features(ds: Dataset, cfg: ProbeConfig, *, rows: Sequence[int] | None = None,
                   cache_dir: str | Path | None = None, num_workers: int = 0) -> dict[str, Tensor]:
    """{"last": (n, 3 s s), "y"}: the downscaled pixels of every item of `ds` (of its `rows` only, picked from
    the cached full set when there is one, as the 1 % probe does), cached like encoder features."""
    kw = {"batch_size": cfg.batch_size, "cache_dir": cache_dir, "num_workers": num_workers, "desc": "pixels"}
    if rows is None:
        return extract(PixelFeatures(), ds, "pooled", **kw)
    full = cached(PixelFeatures(), ds, "pooled", cache_dir=cache_dir)
    if full is None:
        return extract(PixelFeatures(), Subset(ds, list(rows)), "pooled", **kw)
    idx = torch.as_tensor(list(rows), dtype=torch.long)
    return {k: v[idx] for k, v in full.items()}


def pixel_baseline(train: Dataset, val: Dataset, cfg: ProbeConfig, *, rows: Sequence[int] | None = None,
                   num_classes: int | None = None, cache_dir: str | Path | None = None,
                   num_workers: int = 0) -> dict[str, Any]:
    """{"top1", "top5"} (%) of the probe on the pixels of `train` (its `rows` only, when given) and `val`:
    what an evaluation stage writes under NAME."""
    kw = {"cache_dir": cache_dir, "num_workers": num_workers}
    return pixel_probe(pixel_features(train, cfg, rows=rows, **kw), pixel_features(val, cfg, **kw), cfg,
                       num_classes)


def pixel_probe(ftr: dict[str, Tensor], fva: dict[str, Tensor], cfg: ProbeConfig,
                num_classes: int | None = None) -> dict[str, Any]:
    """{"top1", "top5"} (%) of the linear probe (the evaluation's protocol and grid) on pixel features
    ({"last": (n, 3 s s), "y": (n,)}, from `pixel_features`)."""
    c = num_classes or int(max(ftr["y"].max(), fva["y"].max())) + 1
    res = linear_probe(ftr["last"], ftr["y"], fva["last"], fva["y"], c, cfg)
    return {k: res[k] for k in ("top1", "top5")}
