"""Validate a dataset layout through the loaders themselves and describe it as a manifest (a dict).

The manifest holds, per dataset: counts per split and class, image sizes, the number (and names) of
corrupt images skipped, and a checksum of the file list (sha256 over sorted `relative-path size`
lines: it changes when a file is added, removed, renamed or resized, without reading 150 GB).
Real and synthetic data go through the same `describe`, so the exporter's output is checked by the
code that will read it.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from pipeline.atomic import atomic_write_json
from pipeline.config import DataConfig
from pipeline.data.clevr import SPLITS as CLEVR_SPLITS
from pipeline.data.clevr import ClevrDataset, scenes_file
from pipeline.data.imagenet import CorruptImageError, ImageNetFolder, load_rgb, scan_images
from pipeline.data.nyu import MAT_NAME, SPLIT_KEYS, SPLITS_NAME, check_mat, read_split
from pipeline.data.paths import DataPaths, dataset_paths, synthetic_paths
from pipeline.errors import PipelineError
from pipeline.progress import progress

MAX_LISTED_CORRUPT = 1000
synthetic_layout = synthetic_paths


def _rel(path: Path, base: Path | None) -> str:
    if base is not None:
        try:
            return Path(path).relative_to(base).as_posix()
        except ValueError:
            pass
    return str(path)


def file_listing(files: Iterable[Path], base: Path | None) -> dict:
    """{"count", "bytes", "sha256"} of the sorted (relative path, size) list."""
    rows = sorted((_rel(p, base), os.stat(p).st_size) for p in files)
    digest = hashlib.sha256("".join(f"{name}\t{size}\n" for name, size in rows).encode()).hexdigest()
    return {"count": len(rows), "bytes": sum(s for _, s in rows), "sha256": digest}


def _size_stats(sizes: list[tuple[int, int]]) -> dict:
    if not sizes:
        return {}
    a = np.asarray(sizes)
    return {axis: {"min": int(a[:, k].min()), "median": float(np.median(a[:, k])), "max": int(a[:, k].max())}
            for k, axis in enumerate(("width", "height"))}


def describe_imagenet(root: Path, subset: Path, on_corrupt: str, base: Path | None = None,
                      processes: int = 1) -> dict:
    """Counts per split and class, the 1% list, image sizes and corrupt files (decodes every image)."""
    splits = {s: ImageNetFolder(root, s, on_corrupt=on_corrupt) for s in ("train", "val")}
    if splits["val"].classes != splits["train"].classes:
        extra = sorted(set(splits["val"].classes) ^ set(splits["train"].classes))[:3]
        raise PipelineError(f"{root}: train/ and val/ hold different class folders (e.g. {extra}); "
                            "class indices would not match")
    sub = ImageNetFolder(root, "train", subset_file=subset, on_corrupt=on_corrupt)
    files = [p for ds in splits.values() for p, _ in ds.samples]
    sizes = scan_images(files, processes, progress)
    corrupt = [p for p, s in zip(files, sizes, strict=True) if s is None]
    if corrupt and on_corrupt == "fail":
        raise CorruptImageError(f"{corrupt[0]}: corrupt or truncated image ({len(corrupt)} in all); "
                                "data.on_corrupt: skip would skip and count them")
    bad = set(corrupt)
    out = {"path": _rel(root, base), "classes": splits["train"].classes, "num_classes": len(splits["train"].classes),
           "num_corrupt": len(corrupt), "corrupt": [_rel(p, base) for p in corrupt[:MAX_LISTED_CORRUPT]],
           "image_size": _size_stats([s for s in sizes if s is not None])}
    for name, ds in splits.items():
        good = Counter(label for p, label in ds.samples if p not in bad)
        out[name] = {"count": sum(good.values()),
                     "per_class": {c: good.get(i, 0) for i, c in enumerate(ds.classes)}}
    per = Counter(sub.targets)
    out["subset"] = {"path": _rel(subset, base), "count": len(sub),
                     "per_class": {c: per.get(i, 0) for i, c in enumerate(sub.classes)}}
    out["files"] = file_listing([*files, subset], base)
    return out


def describe_clevr(root: Path, base: Path | None = None) -> dict:
    """Counts and label histograms of both VTAB tasks per split; image sizes from each split's first PNG."""
    out: dict = {"path": _rel(root, base)}
    files: list[Path] = []
    for split in CLEVR_SPLITS:
        count = ClevrDataset(root, split, "count_all")
        dist = ClevrDataset(root, split, "closest_object_distance")
        first = load_rgb(count.samples[0][0])
        out[split] = {
            "count": len(count), "image_size": list(first.size),
            "count_all": np.bincount(count.targets, minlength=count.num_classes).tolist(),
            "closest_object_distance": np.bincount(dist.targets, minlength=dist.num_classes).tolist(),
        }
        out["distance_thresholds"] = list(dist.thresholds)
        files += [p for p, _ in count.samples] + [scenes_file(root, split)]
    out["files"] = file_listing(files, base)
    return out


def describe_nyu(root: Path, base: Path | None = None) -> dict:
    """Image count and native size of the .mat, split sizes (indices checked against the count)."""
    n, h, w = check_mat(root / MAT_NAME)
    split = {s: read_split(root / SPLITS_NAME, s, n) for s in SPLIT_KEYS}
    overlap = len(set(split["train"].tolist()) & set(split["test"].tolist()))
    return {"path": _rel(root, base), "num_images": n, "height": h, "width": w,
            "train": len(split["train"]), "test": len(split["test"]), "train_test_overlap": overlap,
            "files": file_listing([root / MAT_NAME, root / SPLITS_NAME], base)}


def describe(paths: DataPaths, on_corrupt: str, base: Path | None = None, processes: int = 1) -> dict:
    """The manifest of every configured dataset (None for one left unset with real data)."""
    manifest = {
        "imagenet": describe_imagenet(paths.imagenet, paths.imagenet_subset, on_corrupt, base, processes),
        "clevr": describe_clevr(paths.clevr, base) if paths.has("clevr") else None,
        "nyu": describe_nyu(paths.nyu, base) if paths.has("nyu") else None,
    }
    parts = [manifest[k]["files"]["sha256"] for k in ("imagenet", "clevr", "nyu") if manifest[k]]
    manifest["files_sha256"] = hashlib.sha256("".join(parts).encode()).hexdigest()
    manifest["num_corrupt"] = manifest["imagenet"]["num_corrupt"]
    return manifest


def _check_outside(path: Path, root: Path, key: str) -> None:
    if path == root or root in path.parents:
        raise PipelineError(f"params: data.{key} = {path} lies inside data.root ({root}), which prepare "
                            "regenerates (a dvc output); keep real data outside it")


def validate_real(data: DataConfig, root: Path | None = None) -> dict:
    """Check the real datasets' layout (every ImageNet image decoded) and return their manifest."""
    if data.source != "real":
        raise PipelineError(f"params: data.source = {data.source!r}; validate_real needs 'real'")
    paths = dataset_paths(data, root)
    out_root = ((Path.cwd() if root is None else Path(root)) / data.root).resolve()
    for name, key in (("imagenet", "imagenet_root"), ("imagenet_subset", "imagenet_subset"),
                      ("clevr", "clevr_root"), ("nyu", "nyu_root")):
        if paths.has(name):
            _check_outside(getattr(paths, name), out_root, key)
    manifest = describe(paths, data.on_corrupt, base=None, processes=os.cpu_count() or 1)
    manifest.update({"source": "real", "on_corrupt": data.on_corrupt})
    return manifest


def write_manifest(manifest: dict, path: Path) -> None:
    """Write `manifest` as JSON atomically (a temporary file renamed into place)."""
    atomic_write_json(path, manifest)
