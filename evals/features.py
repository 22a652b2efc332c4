"""Frozen feature extraction, cached on disk and shared by every probe.

One pass of the encoder over a dataset gives, per image,

    pooled  "last"   (D,)    mean of the last layer's patch tokens
            "last4"  (4D,)   means of the last 4 layers' patch tokens, concatenated
    tokens  "tokens" (N, D)  the last layer's patch tokens (dense tasks), stored as float16

plus "y", the dataset's targets (class labels (n,) int64, or depth maps (n, S, S) float32).

The cache key is (encoder weights hash, dataset identity, kind). The dataset identity is its files
(path, size, mtime) or the NYU .mat and split rows, plus its image size / transform, never its labels:
the two CLEVR tasks share one set of features, and the 1% probe reuses the train-set features of the
linear probe. Class labels come back from `dataset.targets` when the dataset has them.
Files are written to a temporary name and renamed, so a killed run never leaves half a cache entry.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset

from pipeline.atomic import atomic_write
from pipeline.errors import PipelineError
from pipeline.progress import progress

VIEWS = ("last", "last4")
Kind = Literal["pooled", "tokens"]
CACHE_VERSION = 1  # bump when the stored layout changes


def tensor_digest(*tensors: Tensor, names: Sequence[str] | None = None) -> str:
    """sha256 (64 hex digits) over each tensor's shape, dtype and bytes, in order; with `names` (one per
    tensor), each tensor's name too, so renaming a weight changes the digest."""
    labels = [""] * len(tensors) if names is None else [f"{n}:" for n in names]
    h = hashlib.sha256()
    for label, t in zip(labels, tensors, strict=True):
        t = t.detach().cpu().contiguous()
        h.update(f"{label}{tuple(t.shape)}:{t.dtype};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def weights_hash(module: nn.Module) -> str:
    """16 hex digits of `tensor_digest` over the state dict, sorted by name (names, shapes, dtypes, bytes)."""
    state = sorted(module.state_dict().items())
    return tensor_digest(*(t for _, t in state), names=[n for n, _ in state])[:16]


def dataset_identity(ds: Dataset) -> dict[str, Any] | None:
    """What determines the images of `ds` (not its class labels); None when it cannot be told (no cache)."""
    if isinstance(ds, Subset):
        inner = dataset_identity(ds.dataset)
        if inner is None:
            return None
        return {"subset_of": inner, "indices": tensor_digest(torch.as_tensor(list(ds.indices)))}
    if isinstance(ds, TensorDataset):
        return {"type": "TensorDataset", "tensors": tensor_digest(*ds.tensors)}
    base = {"type": type(ds).__name__, "transform": repr(getattr(ds, "transform", None))}
    if hasattr(ds, "samples"):  # ImageNetFolder, ClevrDataset: [(path, label)]
        h = hashlib.sha256()
        for path, _ in ds.samples:
            st = os.stat(path)
            h.update(f"{Path(path).resolve()}|{st.st_size}|{st.st_mtime_ns}\n".encode())
        return {**base, "n": len(ds.samples), "files": h.hexdigest()}
    if hasattr(ds, "mat_path") and hasattr(ds, "indices"):  # NyuDepth
        st = os.stat(ds.mat_path)
        return {**base, "mat": f"{Path(ds.mat_path).resolve()}|{st.st_size}|{st.st_mtime_ns}",
                "rows": tensor_digest(torch.as_tensor(ds.indices)), "image_size": ds.image_size}
    return None


def cache_key(encoder_hash: str, identity: dict[str, Any], kind: Kind) -> str:
    doc = {"v": CACHE_VERSION, "encoder": encoder_hash, "data": identity, "kind": kind}
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:24]


def _targets(ds: Dataset) -> Tensor | None:
    """Class labels straight from the dataset (ImageNetFolder, ClevrDataset, Subset of them), else None."""
    if isinstance(ds, Subset):
        inner = _targets(ds.dataset)
        return None if inner is None else inner[torch.as_tensor(list(ds.indices), dtype=torch.long)]
    if hasattr(ds, "targets"):
        return torch.as_tensor(list(ds.targets), dtype=torch.long)
    return None


def _save_atomic(obj: Any, path: Path) -> None:
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def _keys(kind: Kind) -> tuple[str, ...]:
    """The feature entries of a kind (besides "y")."""
    return ("tokens",) if kind == "tokens" else VIEWS


@torch.no_grad()
def _run(jobs: dict[str, tuple[nn.Module, tuple[Kind, ...]]], ds: Dataset, batch_size: int, num_workers: int,
         desc: str) -> dict[str, dict[Kind, dict[str, Tensor]]]:
    """One pass over `ds` (each image read and decoded once) through every encoder of `jobs`
    ({name: (encoder, kinds)}), one forward each for all its kinds: {name: {kind: features}}."""
    encoders = {n: e for n, (e, _) in jobs.items()}
    devices = {n: next(itertools.chain(e.parameters(), e.buffers())).device for n, e in encoders.items()}
    was_training = {n: e.training for n, e in encoders.items()}
    for e in encoders.values():
        e.eval()
    pin = any(d.type == "cuda" for d in devices.values())
    loader = DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=num_workers, pin_memory=pin)
    out: dict[str, dict[str, list[Tensor]]] = {
        n: {k: [] for kind in kinds for k in _keys(kind)}
        for n, (_, kinds) in jobs.items()}
    ys: list[Tensor] = []
    for x, y in progress(loader, desc=desc, total=len(loader)):
        for name, (encoder, kinds) in jobs.items():
            dev = devices[name]
            autocast = torch.autocast("cuda", dtype=torch.bfloat16) if dev.type == "cuda" else torch.autocast(
                "cpu", enabled=False)
            with autocast:
                layers = encoder.forward_layers(x.to(dev, non_blocking=True), 4 if "pooled" in kinds else 1)
                if "tokens" in kinds:  # the last layer's output, through the final norm: encoder(x)
                    out[name]["tokens"].append(layers[-1].half().cpu())
                if "pooled" in kinds:
                    means = [t.float().mean(1) for t in layers]  # 4 x (B, D)
                    out[name]["last"].append(means[-1].cpu())
                    out[name]["last4"].append(torch.cat(means, 1).cpu())
        ys.append(torch.as_tensor(y))
    for name, e in encoders.items():
        e.train(was_training[name])
    if not ys:
        raise PipelineError(f"{desc}: the dataset is empty; expected at least one image")
    y_all = torch.cat(ys)
    result: dict[str, dict[Kind, dict[str, Tensor]]] = {}
    for name, (_, kinds) in jobs.items():
        feats = {k: torch.cat(v) for k, v in out[name].items()}
        result[name] = {kind: {**{k: feats[k] for k in _keys(kind)}, "y": y_all}
                        for kind in kinds}
    return result


def _cache_path(encoder: nn.Module, ds: Dataset, kind: Kind, cache_dir: str | Path | None,
                encoder_hash: str | None) -> Path | None:
    identity = dataset_identity(ds) if cache_dir is not None else None
    if identity is None:
        return None
    return Path(cache_dir) / f"{cache_key(encoder_hash or weights_hash(encoder), identity, kind)}.pt"


def _with_targets(feats: dict[str, Tensor], ds: Dataset) -> dict[str, Tensor]:
    labels = _targets(ds)
    return feats if labels is None else {**feats, "y": labels}


def cached(encoder: nn.Module, ds: Dataset, kind: Kind = "pooled", *, cache_dir: str | Path | None = None,
           encoder_hash: str | None = None) -> dict[str, Tensor] | None:
    """The cached features of `ds` (as `extract` returns them), or None when not cached: never runs the encoder."""
    path = _cache_path(encoder, ds, kind, cache_dir, encoder_hash)
    if path is None or not path.is_file():
        return None
    return _with_targets(torch.load(path, map_location="cpu", weights_only=True), ds)


def extract(encoder: nn.Module, ds: Dataset, kind: Kind = "pooled", *, batch_size: int = 256,
            cache_dir: str | Path | None = None, num_workers: int = 0, desc: str = "features",
            encoder_hash: str | None = None) -> dict[str, Tensor]:
    """Features of every item of `ds` ((image (3, S, S), target) items), in dataset order.

    pooled -> {"last": (n, D) f32, "last4": (n, 4D) f32, "y"}; tokens -> {"tokens": (n, N, D) f16, "y"}.
    With `cache_dir`, a dataset with a known identity is read from / written to the cache.
    """
    hashes = None if encoder_hash is None else {"_": encoder_hash}
    return extract_many({"_": encoder}, ds, kind, batch_size=batch_size, cache_dir=cache_dir,
                        num_workers=num_workers, desc=desc, encoder_hashes=hashes)["_"]


def extract_many(encoders: dict[str, nn.Module], ds: Dataset, kind: Kind = "pooled", *, batch_size: int = 256,
                 cache_dir: str | Path | None = None, num_workers: int = 0, desc: str = "features",
                 encoder_hashes: dict[str, str] | None = None) -> dict[str, dict[str, Tensor]]:
    """`extract` for several encoders at once: {name: features}. The encoders whose features are not cached
    share one pass over `ds`, so each image is read, decoded and transformed once, not once per encoder."""
    jobs = {n: (e, (kind,)) for n, e in encoders.items()}
    feats = extract_jobs(jobs, ds, batch_size=batch_size, cache_dir=cache_dir, num_workers=num_workers, desc=desc,
                         encoder_hashes=encoder_hashes)
    return {n: feats[n][kind] for n in encoders}


def extract_jobs(jobs: dict[str, tuple[nn.Module, tuple[Kind, ...]]], ds: Dataset, *, batch_size: int = 256,
                 cache_dir: str | Path | None = None, num_workers: int = 0, desc: str = "features",
                 encoder_hashes: dict[str, str] | None = None) -> dict[str, dict[Kind, dict[str, Tensor]]]:
    """{name: (encoder, kinds)} -> {name: {kind: features}}: what is not cached is computed in one pass over
    `ds` (one forward per encoder and batch for all its kinds) and cached. An evaluation stage calls it
    once per dataset with everything its probes will read, which they then find in the cache."""
    for _, kinds in jobs.values():
        for kind in kinds:
            if kind not in ("pooled", "tokens"):
                raise PipelineError(f"feature kind {kind!r} is not allowed; expected 'pooled' or 'tokens'")
    hashes = dict(encoder_hashes or {})
    for n, (e, _) in jobs.items():
        if cache_dir is not None and n not in hashes:
            hashes[n] = weights_hash(e)  # once per encoder, not once per kind
    found: dict[str, dict[Kind, dict[str, Tensor]]] = {n: {} for n in jobs}
    paths: dict[tuple[str, Kind], Path | None] = {}
    todo: dict[str, tuple[nn.Module, tuple[Kind, ...]]] = {}
    for n, (e, kinds) in jobs.items():
        for kind in kinds:
            paths[n, kind] = p = _cache_path(e, ds, kind, cache_dir, hashes.get(n))
            if p is not None and p.is_file():
                found[n][kind] = torch.load(p, map_location="cpu", weights_only=True)
        missing = tuple(k for k in kinds if k not in found[n])
        if missing:
            todo[n] = (e, missing)
    if todo:
        for n, by_kind in _run(todo, ds, batch_size, num_workers, desc).items():
            for kind, feats in by_kind.items():
                if paths[n, kind] is not None:
                    _save_atomic(feats, paths[n, kind])
                found[n][kind] = feats
    return {n: {kind: _with_targets(f, ds) for kind, f in by_kind.items()} for n, by_kind in found.items()}
