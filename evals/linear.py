"""Linear probe (ImageNet protocol): top-1 / top-5 on val, for both pooled views of the frozen encoder; the
k-NN (`evals.knn`) and attentive (`evals.attentive`) probes beside it, when the section turns them on."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import Tensor, nn
from torch.utils.data import Dataset

from evals import attentive, common, knn, pixels
from evals.features import VIEWS, extract
from evals.probe import linear_probe
from pipeline.config import ClassifierProbeConfig, Config, ProbeConfig
from pipeline.diagnostics import representation_stats
from pipeline.errors import PipelineError

NAME = "eval_linear"
DIAG_IMAGES = 512


def num_classes(train: Dataset, y) -> int:
    classes = getattr(getattr(train, "dataset", train), "classes", None)  # through a Subset
    return len(classes) if classes is not None else int(y.max()) + 1


def evaluate_linear(encoder: nn.Module, train: Dataset, val: Dataset, cfg: ClassifierProbeConfig, *,
                    cache_dir: str | Path | None = None, num_workers: int = 0,
                    hits: bool = False) -> dict[str, dict[str, Any]]:
    """{"last": {"top1", "top5", "lr", "weight_decay"}, "last4": {...}, "knn": {"last": {"top1", "top5"},
    "last4": {...}}, "attentive": {"last": {"top1", "top5", "lr", "weight_decay"}}} (knn / attentive when
    cfg turns them on); accuracies in %; with `hits`, each also holds its per-item top-1 hits (`evals.paired`)."""
    out: dict[str, Any] = {}
    if cfg.attentive:  # first: its token budget is checked before any encoder pass
        out[attentive.NAME] = attentive.evaluate_attentive(encoder, train, val, cfg, hits=hits,
                                                           cache_dir=cache_dir, num_workers=num_workers)
    kw = {"batch_size": cfg.batch_size, "cache_dir": cache_dir, "num_workers": num_workers}
    ftr = extract(encoder, train, "pooled", desc="features train", **kw)
    fva = extract(encoder, val, "pooled", desc="features val", **kw)
    out.update(probe_views(ftr, fva, num_classes(train, ftr["y"]), cfg, hits=hits))
    return out


def probe_views(ftr: dict[str, Tensor], fva: dict[str, Tensor], classes: int, cfg: ClassifierProbeConfig, *,
                hits: bool = False) -> dict[str, dict[str, Any]]:
    """Pooled features {view: (n, D), "y": (n,)} of train and test -> the linear probe of each view and, when
    cfg turns it on, the k-NN probe: {"last": {...}, "last4": {...}, "knn": {...}}."""
    out = {v: linear_probe(ftr[v], ftr["y"], fva[v], fva["y"], classes, cfg, hits=hits) for v in VIEWS}
    if cfg.knn:
        out[knn.NAME] = knn.knn_probe(ftr, fva, classes, cfg, hits=hits)
    return out


def representation_diagnostics(encoders: dict[str, nn.Module], val: Dataset, cfg: ProbeConfig, *,
                               cache_dir: str | Path | None = None, num_workers: int = 0) -> dict[str, Any]:
    """{encoder: {"rankme", "feature_std", "position_share", "image_share"}} on the last layer's patch
    tokens of (at most) DIAG_IMAGES val images: the pretraining diagnostics, for both encoders."""
    images = common.limit(val, DIAG_IMAGES, cfg.seed)
    kw = {"batch_size": cfg.batch_size, "cache_dir": cache_dir, "num_workers": num_workers, "desc": "diagnostics"}
    return {name: representation_stats(extract(enc, images, "tokens", **kw)["tokens"])
            for name, enc in encoders.items()}


def imagenet_splits(cfg: Config, root: Path, subset: bool = False):
    """(train, val) ImageNetFolders with the eval transform (train: only the 1% list's images when `subset`);
    PipelineError when the class lists differ."""
    from pipeline.data import ImageNetFolder, dataset_paths, eval_transform

    paths = dataset_paths(cfg.data, root)
    tf = eval_transform(cfg.data.image_size)
    train = ImageNetFolder(paths.imagenet, "train", tf, subset_file=paths.imagenet_subset if subset else None,
                           on_corrupt=cfg.data.on_corrupt)
    val = ImageNetFolder(paths.imagenet, "val", tf, on_corrupt=cfg.data.on_corrupt)
    if val.classes != train.classes:
        missing = sorted(set(train.classes) ^ set(val.classes))[:3]
        raise PipelineError(f"{paths.imagenet}: train and val class folders differ (e.g. {missing}); "
                            "expected the same wnids in both")
    return train, val


def run(cfg: Config, root: str | Path | None = None) -> dict[str, Any]:
    """The eval_linear stage: both encoders, metrics/eval_linear.json, an MLflow child run."""
    ctx = common.prepare(cfg, root)
    train, val = imagenet_splits(cfg, ctx.root)
    train = common.limit(train, cfg.eval_linear.max_train, cfg.eval_linear.seed)
    val = common.limit(val, cfg.eval_linear.max_test, cfg.eval_linear.seed)
    common.prefetch(ctx, [train, val], cfg.eval_linear, tokens=common.whole_split_tokens(cfg.eval_linear),
                    baselines={pixels.NAME: pixels.PixelFeatures()}, num_workers=cfg.data.num_workers)
    results = {name: evaluate_linear(enc, train, val, cfg.eval_linear, cache_dir=ctx.cache_dir,
                                     num_workers=cfg.data.num_workers, hits=True)
               for name, enc in ctx.encoders.items()}
    metrics, chosen = common.split_results(results)
    kw = {"cache_dir": ctx.cache_dir, "num_workers": cfg.data.num_workers}
    metrics[pixels.NAME] = pixels.pixel_baseline(train, val, cfg.eval_linear, **kw)
    metrics[common.DIAGNOSTICS] = representation_diagnostics(ctx.encoders, val, cfg.eval_linear, **kw)
    params = {**common.section_params(cfg.eval_linear, NAME), "chosen": chosen,
              "n_train": len(train), "n_val": len(val)}
    common.finish(cfg, ctx, NAME, metrics, params)
    return metrics
