"""Export the procedural scenes in the three real on-disk formats, so that one loader path serves both.

Scenes 0..T-1 are the train split, T..T+V-1 the val (NYU: test) split, T = train_scenes, V = val_scenes.
Each scene is rendered once and written three times (worker processes render and encode chunks of
scenes; the main process writes them in index order while the workers go on):

    imagenet/train/<wnid>/<wnid>_<index>.JPEG, imagenet/val/<wnid>/ILSVRC2012_val_<j:08d>.JPEG,
    imagenet/1percent.txt                          the shape class; wnid = n<label:02d><6 digits of sha1(shape)>,
                                                   so sorted wnids keep the renderer's label order
    clevr/CLEVR_v1.0/images/{train,val}/*.png, clevr/CLEVR_v1.0/scenes/CLEVR_{split}_scenes.json
                                                   objects in CLEVR's fields (size "small"/"large" split at
                                                   0.4 m; the exact radius is kept as "radius"); info holds
                                                   the closest-object distance thresholds for the loader
    nyu/nyu_depth_v2_labeled.mat, nyu/splits.mat   HDF5 with a MATLAB v7.3 userblock, transposed as MATLAB
                                                   writes it; splits 1-based column vectors (scipy, v5)

Atomicity: everything goes to `<root>/.prepare-<pid>.tmp/` first and is renamed into place at the end,
manifest.json last; only the generated entries (imagenet/, clevr/, nyu/, manifest.json) are replaced.
"""

from __future__ import annotations

import hashlib
import io
import json
import multiprocessing as mp
import os
import shutil
from pathlib import Path

import h5py
import numpy as np
import scipy.io
from PIL import Image

from pipeline.config import DataConfig
from pipeline.data import manifest as manifest_mod
from pipeline.data.clevr import THRESHOLDS_INFO_KEY, check_thresholds
from pipeline.data.nyu import MAT_NAME, SPLITS_NAME
from pipeline.data.scenes import NUM_CLASSES, SHAPES, Scene, render_scene
from pipeline.errors import PipelineError
from pipeline.progress import progress as progress_bar

GENERATED = ("imagenet", "clevr", "nyu", "manifest.json")
SUBSET_NAME = "1percent.txt"
CLEVR_DIR = Path("clevr") / "CLEVR_v1.0"
JPEG_QUALITY = 95
CHUNK = 32  # scenes per worker task: small enough to balance the workers and bound memory at 224 px
PNG_LEVEL = 1  # zlib level: ~4x faster than Pillow's default 6 and only slightly larger files
SMALL_LARGE_SPLIT = 0.4  # metres; the renderer draws radii 0.3..0.5 (x a per-shape area factor)
# MATLAB v7.3 files are HDF5 behind a 512-byte userblock whose first 128 bytes are this header
# (116 bytes of text, 8 of subsystem offset, version 0x0200, endian mark "IM"). A fixed date keeps
# the export byte-identical.
MATLAB_HEADER = (b"MATLAB 7.3 MAT-file, Platform: GLNXA64, Created on: Thu Jan  1 00:00:00 1970 "
                 b"HDF5 schema 1.00 .").ljust(116, b" ") + b"\x00" * 8 + b"\x00\x02" + b"IM"
MAT5_HEADER = b"MATLAB 5.0 MAT-file Platform: posix, Created on: Thu Jan  1 00:00:00 1970".ljust(116, b" ")


def wnid(label: int) -> str:
    """Synthetic wnid of class `label`: 'n' + 2-digit label + 6 digits hashed from the shape name."""
    h = int(hashlib.sha1(SHAPES[label].encode()).hexdigest(), 16) % 10**6
    return f"n{label:02d}{h:06d}"


def distance_thresholds(closest: np.ndarray) -> tuple[float, ...]:
    """Bin edges [0, q1..q5, 100] at the sextiles of `closest` (N,): 6 balanced classes."""
    q = np.quantile(np.asarray(closest, np.float64), np.arange(1, 6) / 6)
    return (0.0, *(round(float(v), 6) for v in q), 100.0)


def _clevr_object(o: dict) -> dict:
    x, y, z = o["pixel_coords"]
    return {
        "shape": o["shape"], "color": o["color"], "material": o["material"],
        "size": "large" if o["size"] >= SMALL_LARGE_SPLIT else "small",
        "3d_coords": o["3d_coords"], "pixel_coords": [int(round(x)), int(round(y)), float(z)],
        "rotation": o["rotation"], "radius": o["size"], "texture": o["texture"],
    }


class _Writer:
    """Writes scenes in index order into the three formats under `tmp`."""

    def __init__(self, tmp: Path, n_train: int, n_total: int, size: int):
        self.tmp, self.n_train = tmp, n_train
        for split in ("train", "val"):
            for label in range(NUM_CLASSES):
                (tmp / "imagenet" / split / wnid(label)).mkdir(parents=True)
            (tmp / CLEVR_DIR / "images" / split).mkdir(parents=True)
        (tmp / CLEVR_DIR / "scenes").mkdir(parents=True)
        (tmp / "nyu").mkdir()
        self.mat_path = tmp / "nyu" / MAT_NAME
        self.mat = h5py.File(self.mat_path, "w", userblock_size=512)
        # MATLAB's column-major (H, W, 3, N) and (H, W, N) arrays, as h5py sees them.
        opts = {"compression": "gzip", "compression_opts": 1, "track_times": False}
        self.images = self.mat.create_dataset("images", (n_total, 3, size, size), np.uint8,
                                              chunks=(1, 3, size, size), **opts)
        self.depths = self.mat.create_dataset("depths", (n_total, size, size), np.float32,
                                              chunks=(1, size, size), **opts)
        self.images.attrs["MATLAB_class"] = np.bytes_("uint8")
        self.depths.attrs["MATLAB_class"] = np.bytes_("single")
        self.clevr_scenes: dict[str, list[dict]] = {"train": [], "val": []}
        self.train_files: dict[int, list[str]] = {c: [] for c in range(NUM_CLASSES)}
        self.closest_train: list[float] = []

    def add_chunk(self, start: int, items: list[tuple[Scene, bytes, bytes]]) -> None:
        """Scenes start.. with their JPEG and PNG encodings."""
        for index, (s, jpeg, png) in enumerate(items, start):
            train = index < self.n_train
            split, j = ("train", index) if train else ("val", index - self.n_train)
            w = wnid(s.label)
            name = f"{w}_{index}.JPEG" if train else f"ILSVRC2012_val_{j + 1:08d}.JPEG"
            (self.tmp / "imagenet" / split / w / name).write_bytes(jpeg)
            png_name = f"CLEVR_{split}_{j:06d}.png"
            (self.tmp / CLEVR_DIR / "images" / split / png_name).write_bytes(png)
            self.clevr_scenes[split].append({
                "split": split, "image_index": j, "image_filename": png_name,
                "objects": [_clevr_object(o) for o in s.objects],
            })
            if train:
                self.train_files[s.label].append(name)
                self.closest_train.append(s.closest)
        end = start + len(items)  # one HDF5 write per chunk: per-row writes cost more than the data
        self.images[start:end] = np.stack([s.image.transpose(2, 1, 0) for s, _, _ in items])  # (H,W,3)->(3,W,H)
        self.depths[start:end] = np.stack([s.depth.T for s, _, _ in items])  # (H, W) -> (W, H)

    def finish(self, n_total: int, syn) -> tuple[float, ...]:
        self.mat.close()
        with open(self.mat_path, "r+b") as f:
            f.write(MATLAB_HEADER)
        ndx = np.arange(1, n_total + 1, dtype=np.float64)[:, None]  # MATLAB doubles, column vectors
        splits = self.tmp / "nyu" / SPLITS_NAME
        scipy.io.savemat(splits, {"trainNdxs": ndx[:self.n_train], "testNdxs": ndx[self.n_train:]})
        with open(splits, "r+b") as f:  # scipy stamps the time into the 116-byte v5 header text
            f.write(MAT5_HEADER)
        if syn.distance_thresholds is not None:
            thresholds = check_thresholds(syn.distance_thresholds, "data.synthetic.distance_thresholds")
        else:
            thresholds = check_thresholds(distance_thresholds(np.array(self.closest_train)),
                                          "quantiles of the synthetic training depths")
        for split, scenes in self.clevr_scenes.items():
            info = {"split": split, "version": "1.0", "license": "synthetic (pipeline.data.scenes)",
                    "seed": syn.seed, THRESHOLDS_INFO_KEY: list(thresholds)}
            path = self.tmp / CLEVR_DIR / "scenes" / f"CLEVR_{split}_scenes.json"
            path.write_text(json.dumps({"info": info, "scenes": scenes}))
        rng = np.random.default_rng([syn.seed, 1])
        subset = []
        for label in range(NUM_CLASSES):
            files = self.train_files[label]
            k = min(len(files), max(1, round(syn.subset_fraction * len(files))))
            subset += [files[i] for i in sorted(rng.choice(len(files), k, replace=False))]
        (self.tmp / "imagenet" / SUBSET_NAME).write_text("".join(f"{n}\n" for n in sorted(subset)))
        return thresholds


def _encode(image: np.ndarray, fmt: str) -> bytes:
    buf = io.BytesIO()
    opts = {"quality": JPEG_QUALITY} if fmt == "JPEG" else {"compress_level": PNG_LEVEL}
    Image.fromarray(image).save(buf, fmt, **opts)
    return buf.getvalue()


def _render_encode(args: tuple[int, range, int]) -> list[tuple[Scene, bytes, bytes]]:
    seed, indices, size = args
    scenes = [render_scene(seed, i, size) for i in indices]
    return [(s, _encode(s.image, "JPEG"), _encode(s.image, "PNG")) for s in scenes]


def _render_chunks(data: DataConfig, n_total: int, progress: bool):
    """Yield (start, [(scene, jpeg, png), ...]) in index order, rendered in data.synthetic.processes."""
    syn = data.synthetic
    tasks = [(syn.seed, range(a, min(a + CHUNK, n_total)), data.image_size) for a in range(0, n_total, CHUNK)]
    bar = progress_bar(desc="rendering scenes", total=n_total) if progress else None
    if syn.processes <= 1:
        results = map(_render_encode, tasks)
        pool = None
    else:
        ctx = mp.get_context("fork") if "fork" in mp.get_all_start_methods() else mp.get_context()
        pool = ctx.Pool(syn.processes)
        results = pool.imap(_render_encode, tasks)
    try:
        for (_, idx, _), items in zip(tasks, results, strict=True):
            yield idx.start, items
            if bar is not None:
                bar.update(len(idx))
    finally:
        if pool is not None:
            pool.terminate()
        if bar is not None:
            bar.close()


def export_synthetic(data: DataConfig, out_root: Path, progress: bool = True) -> dict:
    """Render and write the synthetic datasets under `out_root`; returns (and writes) the manifest."""
    syn = data.synthetic
    out_root = Path(out_root)
    n_total = syn.train_scenes + syn.val_scenes
    out_root.mkdir(parents=True, exist_ok=True)
    for stale in out_root.glob(".prepare-*.tmp"):  # left by a killed run (ours: the name is ours)
        shutil.rmtree(stale)
    tmp = out_root / f".prepare-{os.getpid()}.tmp"
    tmp.mkdir()
    try:
        writer = _Writer(tmp, syn.train_scenes, n_total, data.image_size)
        try:
            for start, items in _render_chunks(data, n_total, progress):
                writer.add_chunk(start, items)
        finally:
            if writer.mat.id.valid:
                writer.mat.close()
        thresholds = writer.finish(n_total, syn)
        paths = manifest_mod.synthetic_layout(tmp)
        manifest = manifest_mod.describe(paths, data.on_corrupt, base=tmp, processes=syn.processes)
        if manifest["imagenet"]["num_corrupt"]:
            raise PipelineError(f"{tmp}: the exporter wrote {manifest['imagenet']['num_corrupt']} unreadable JPEGs")
        manifest.update({"source": "synthetic", "image_size": data.image_size, "seed": syn.seed,
                         "train_scenes": syn.train_scenes, "val_scenes": syn.val_scenes,
                         "classes": {wnid(c): SHAPES[c] for c in range(NUM_CLASSES)},
                         "distance_thresholds": list(thresholds)})
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        _swap_into_place(tmp, out_root)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return manifest


def _swap_into_place(tmp: Path, out_root: Path) -> None:
    """Replace the generated entries of `out_root` by those of `tmp`; the manifest goes first and
    comes back last, so a kill in between leaves a root without manifest.json (= not finished)."""
    (out_root / "manifest.json").unlink(missing_ok=True)
    for name in GENERATED[:-1]:
        dest = out_root / name
        if dest.is_dir():
            shutil.rmtree(dest)
        elif dest.exists():
            dest.unlink()
        (tmp / name).rename(dest)
    (tmp / "manifest.json").replace(out_root / "manifest.json")

