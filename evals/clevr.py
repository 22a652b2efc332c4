"""CLEVR (VTAB tasks): count_all (8 classes) and closest_object_distance (6 classes), linear probe top-1,
and the k-NN / attentive probes' top-1 when the section turns them on.

Both tasks read the same images, so they share one set of cached features (and patch tokens) per split.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn
from torch.utils.data import Dataset

from evals import attentive, common, knn, pixels
from evals.features import VIEWS, extract
from evals.probe import linear_probe
from pipeline.config import ClassifierProbeConfig, Config

NAME = "eval_clevr"
TASKS = ("count_all", "closest_object_distance")


def evaluate_clevr(encoder: nn.Module, tasks: dict[str, tuple[Dataset, Dataset]], cfg: ClassifierProbeConfig, *,
                   cache_dir: str | Path | None = None, num_workers: int = 0, hits: bool = False) -> dict[str, Any]:
    """tasks {name: (train, val)} -> {name: {"last": {"top1", "lr", "weight_decay"}, "last4": {...}, "knn":
    {"last": {"top1"}, "last4": {...}}, "attentive": {"last": {"top1", "lr", "weight_decay"}}}} (knn /
    attentive when cfg turns them on); with `hits`, each also holds its per-item top-1 hits (`evals.paired`)."""
    kw = {"batch_size": cfg.batch_size, "cache_dir": cache_dir, "num_workers": num_workers}
    out: dict[str, Any] = {}
    for task, (train, val) in tasks.items():
        c = getattr(getattr(train, "dataset", train), "num_classes", None)
        out[task] = {}
        if cfg.attentive:  # first: its token budget is checked before any encoder pass
            out[task][attentive.NAME] = attentive.evaluate_attentive(
                encoder, train, val, cfg, num_classes=c, hits=hits, cache_dir=cache_dir, num_workers=num_workers)
        ftr = extract(encoder, train, "pooled", desc=f"features {task} train", **kw)
        fva = extract(encoder, val, "pooled", desc=f"features {task} val", **kw)
        c = c or int(ftr["y"].max()) + 1
        for v in VIEWS:
            out[task][v] = linear_probe(ftr[v], ftr["y"], fva[v], fva["y"], c, cfg, hits=hits)
        if cfg.knn:
            out[task][knn.NAME] = knn.knn_probe(ftr, fva, c, cfg, hits=hits)
        for res in _results(out[task]):
            res.pop("top5")  # VTAB reports top-1 only
    return out


def _results(d: dict[str, Any]) -> list[dict[str, Any]]:
    """The probe results (the dicts holding "top1") nested anywhere in `d`."""
    if "top1" in d:
        return [d]
    return [r for v in d.values() if isinstance(v, dict) for r in _results(v)]


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
    common.prefetch(ctx, list(tasks[TASKS[0]]), cfg.eval_clevr, tokens=common.whole_split_tokens(cfg.eval_clevr),
                    baselines={pixels.NAME: pixels.PixelFeatures()}, num_workers=cfg.data.num_workers)
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
