"""1% semi-supervised probe: the linear probe trained only on the images of the 1% list; top-1 on val.

When the linear probe has cached the full train set's features, the 1% rows are picked from them (by
path); otherwise only the 1% images are encoded. The val features are the linear probe's. The k-NN and
attentive probes (when the section turns them on) use the same 1% images, the attentive one their patch
tokens (picked from the linear probe's cached ones, likewise).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset, Subset

from evals import attentive, common, pixels
from evals.features import cached, extract
from evals.linear import imagenet_splits, num_classes, probe_views
from pipeline.config import ClassifierProbeConfig, Config
from pipeline.errors import PipelineError

NAME = "eval_semi"


def subset_indices(train: Dataset, subset: Dataset) -> list[int]:
    """Rows of `train` holding the images of `subset` (both with .samples [(path, label)])."""
    row = {Path(p).resolve(): i for i, (p, _) in enumerate(train.samples)}
    out = []
    for p, _ in subset.samples:
        i = row.get(Path(p).resolve())
        if i is None:
            raise PipelineError(f"1% list names {p}, which is not an image of the train split")
        out.append(i)
    return out


def evaluate_semi(encoder: nn.Module, train: Dataset, val: Dataset, subset: Sequence[int],
                  cfg: ClassifierProbeConfig, *, cache_dir: str | Path | None = None, num_workers: int = 0,
                  hits: bool = False) -> dict[str, dict[str, Any]]:
    """Probes on the train rows `subset` only -> {"last": {"top1", "top5", "lr", ...}, "last4": {...}} and, when
    cfg turns them on, "knn" and "attentive" (laid out as in `evals.linear.evaluate_linear`); with `hits`,
    each also holds its per-item top-1 hits (see `evals.paired`)."""
    if len(subset) == 0:
        raise PipelineError("1% probe: the subset is empty; expected at least one training image")
    out: dict[str, Any] = {}
    if cfg.attentive:  # first: its token budget is checked before any encoder pass
        out[attentive.NAME] = attentive.evaluate_attentive(encoder, train, val, cfg, rows=subset, hits=hits,
                                                           cache_dir=cache_dir, num_workers=num_workers)
    kw = {"batch_size": cfg.batch_size, "cache_dir": cache_dir, "num_workers": num_workers}
    full = cached(encoder, train, "pooled", cache_dir=cache_dir)
    if full is not None:  # the linear probe's train features: pick the rows
        idx = torch.as_tensor(list(subset), dtype=torch.long)
        ftr = {k: v[idx] for k, v in full.items()}
    else:  # encode only the subset's images (1% of the work)
        ftr = extract(encoder, Subset(train, list(subset)), "pooled", desc="features 1%", **kw)
    fva = extract(encoder, val, "pooled", desc="features val", **kw)
    out.update(probe_views(ftr, fva, num_classes(train, ftr["y"]), cfg, hits=hits))
    return out


def run(cfg: Config, root: str | Path | None = None) -> dict[str, Any]:
    """The eval_semi stage: both encoders, metrics/eval_semi.json, an MLflow child run."""
    from pipeline.data import ImageNetFolder, dataset_paths

    ctx = common.prepare(cfg, root)
    train, val = imagenet_splits(cfg, ctx.root)
    val = common.limit(val, cfg.eval_semi.max_test, cfg.eval_semi.seed)
    subset_file = dataset_paths(cfg.data, ctx.root).imagenet_subset
    subset = subset_indices(train, ImageNetFolder(train.root, "train", subset_file=subset_file))
    # The val split only: the train rows come from the linear probe's cache, or only the 1 % is encoded.
    common.prefetch(ctx, [val], cfg.eval_semi, tokens=cfg.eval_semi.attentive,
                    baselines={pixels.NAME: pixels.PixelFeatures()}, num_workers=cfg.data.num_workers)
    results = {name: evaluate_semi(enc, train, val, subset, cfg.eval_semi, cache_dir=ctx.cache_dir,
                                   num_workers=cfg.data.num_workers, hits=True)
               for name, enc in ctx.encoders.items()}
    metrics, chosen = common.split_results(results)
    metrics[pixels.NAME] = pixels.pixel_baseline(train, val, cfg.eval_semi, rows=subset, cache_dir=ctx.cache_dir,
                                                 num_workers=cfg.data.num_workers)
    params = {**common.section_params(cfg.eval_semi, NAME), "chosen": chosen, "n_subset": len(subset),
              "subset_file": str(subset_file), "n_val": len(val)}
    common.finish(cfg, ctx, NAME, metrics, params)
    return metrics
