"""CLEVR (VTAB tasks): count_all (8 classes) and closest_object_distance (6 classes), linear probe top-1.

Both tasks read the same images, so they share one set of cached features per split.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn
from torch.utils.data import Dataset

from evals import common, pixels
from evals.features import VIEWS, extract
from evals.probe import linear_probe
from pipeline.config import Config, ProbeConfig

NAME = "eval_clevr"
TASKS = ("count_all", "closest_object_distance")


def evaluate_clevr(encoder: nn.Module, tasks: dict[str, tuple[Dataset, Dataset]], cfg: ProbeConfig, *,
                   cache_dir: str | Path | None = None, num_workers: int = 0, hits: bool = False) -> dict[str, Any]:
    """tasks {name: (train, val)} -> {name: {"last": {"top1", "lr", "weight_decay"}, "last4": {...}}}; with
    `hits`, each view also holds the per-item top-1 hits (see `evals.paired`)."""
    kw = {"batch_size": cfg.batch_size, "cache_dir": cache_dir, "num_workers": num_workers}
    out: dict[str, Any] = {}
    for task, (train, val) in tasks.items():
        ftr = extract(encoder, train, "pooled", desc=f"features {task} train", **kw)
        fva = extract(encoder, val, "pooled", desc=f"features {task} val", **kw)
        c = getattr(getattr(train, "dataset", train), "num_classes", None) or int(ftr["y"].max()) + 1
        out[task] = {}
        for v in VIEWS:
            res = linear_probe(ftr[v], ftr["y"], fva[v], fva["y"], c, cfg, hits=hits)
            res.pop("top5")  # VTAB reports top-1 only
            out[task][v] = res
    return out


def run(cfg: Config, root: str | Path | None = None) -> dict[str, Any]:
    """The eval_clevr stage: both encoders, metrics/eval_clevr.json, an MLflow child run."""
    from pipeline.data import ClevrDataset, dataset_paths, eval_transform

    ctx = common.prepare(cfg, root)
    clevr = dataset_paths(cfg.data, ctx.root).clevr
    tf = eval_transform(cfg.data.image_size)
    tasks = {}
    for task in TASKS:  # same seed and length: both tasks keep the same images, so they share features
        train = ClevrDataset(clevr, "train", task, tf)
        val = ClevrDataset(clevr, "val", task, tf, thresholds=train.thresholds)
        tasks[task] = (common.limit(train, cfg.eval_clevr.max_train, cfg.eval_clevr.seed),
                       common.limit(val, cfg.eval_clevr.max_test, cfg.eval_clevr.seed))
    results = {name: evaluate_clevr(enc, tasks, cfg.eval_clevr, cache_dir=ctx.cache_dir,
                                    num_workers=cfg.data.num_workers, hits=True)
               for name, enc in ctx.encoders.items()}
    metrics, chosen = common.split_results(results)
    kw = {"cache_dir": ctx.cache_dir, "num_workers": cfg.data.num_workers}
    metrics[pixels.NAME] = {}
    for task, (train, val) in tasks.items():  # both tasks share the images: the second reads the cache
        res = pixels.pixel_baseline(train, val, cfg.eval_clevr, **kw,
                                    num_classes=getattr(getattr(train, "dataset", train), "num_classes", None))
        metrics[pixels.NAME][task] = {"top1": res["top1"]}  # VTAB reports top-1 only
    params = {**common.section_params(cfg.eval_clevr, NAME), "chosen": chosen,
              "n_train": len(tasks[TASKS[0]][0]), "n_val": len(tasks[TASKS[0]][1])}
    common.finish(cfg, ctx, NAME, metrics, params)
    return metrics
