"""Datasets: ImageNet folders + 1% list, CLEVR v1.0, NYU Depth v2 in their real on-disk formats.

The embedded default is procedural 3-D scenes (`pipeline.data.scenes`, numpy + Pillow only) that the
prepare stage writes in those same formats (`pipeline.data.export`), so one loader path serves both.

    dataset_paths(cfg.data) -> DataPaths(imagenet, imagenet_subset, clevr, nyu)
    ImageNetFolder(paths.imagenet, "train", train_transform(S), subset_file=paths.imagenet_subset)
    ClevrDataset(paths.clevr, "val", "count_all", eval_transform(S))
    NyuDepth(paths.nyu, "test", image_size=S)

The loaders import torch; they load on first use, so that `pipeline.data.scenes` stays light for the
renderer's worker processes.
"""

from importlib import import_module

from pipeline.data.paths import DataPaths, dataset_paths, synthetic_paths

_LAZY = {
    "ImageNetFolder": "imagenet", "CorruptImageError": "imagenet", "load_rgb": "imagenet",
    "ClevrDataset": "clevr", "VTAB_DISTANCE_THRESHOLDS": "clevr",
    "NyuDepth": "nyu", "eigen_mask": "nyu",
    "IMAGENET_MEAN": "transforms", "IMAGENET_STD": "transforms",
    "train_transform": "transforms", "eval_transform": "transforms",
    "export_synthetic": "export", "validate_real": "manifest",
}

__all__ = ["DataPaths", "dataset_paths", "synthetic_paths", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(import_module(f"pipeline.data.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'pipeline.data' has no attribute {name!r}")
