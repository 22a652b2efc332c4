"""NYU Depth v2 (labeled set) in its on-disk layout, read through h5py and scipy.

    <root>/nyu_depth_v2_labeled.mat   MATLAB v7.3 = HDF5. MATLAB writes column-major, so h5py sees
                                      every array with its axes reversed:
                                        images (N, 3, W, H) uint8    -> images[i].transpose(2, 1, 0)  (H, W, 3)
                                        depths (N, W, H)    float32  -> depths[i].T                   (H, W) metres
    <root>/splits.mat                 MATLAB v5 (scipy): trainNdxs (795, 1), testNdxs (654, 1), 1-based

The .mat file is opened lazily, once per process: an h5py handle does not survive a fork, and
DataLoader workers fork.
"""

from __future__ import annotations

import os
from pathlib import Path

import h5py
import numpy as np
import scipy.io
import torch
from PIL import Image
from torch.utils.data import Dataset

from pipeline.data.transforms import normalize_uint8
from pipeline.errors import PipelineError

MAT_NAME = "nyu_depth_v2_labeled.mat"
SPLITS_NAME = "splits.mat"
SPLIT_KEYS = {"train": "trainNdxs", "test": "testNdxs"}
# Eigen et al. (2014) evaluation crop of the 480 x 640 frame: rows 45:471, cols 41:601.
EIGEN_CROP = (45, 471, 41, 601)
NATIVE = (480, 640)


def check_mat(path: Path) -> tuple[int, int, int]:
    """(N, H, W) of a labeled .mat after checking keys, dtypes and shapes; PipelineError otherwise."""
    if not path.is_file():
        raise PipelineError(f"{path}: no such file; expected the NYU Depth v2 labeled set ({MAT_NAME})")
    try:
        f = h5py.File(path, "r")
    except OSError:
        raise PipelineError(f"{path}: not a MATLAB v7.3 (HDF5) file; expected {MAT_NAME} as distributed") from None
    with f:
        for key in ("images", "depths"):
            if key not in f or not isinstance(f[key], h5py.Dataset):
                raise PipelineError(f"{path}: no '{key}' array; expected keys images (N,3,W,H) and depths (N,W,H)")
        im, de = f["images"], f["depths"]
        if im.ndim != 4 or im.shape[1] != 3 or im.dtype != np.uint8:
            raise PipelineError(f"{path}: images has shape {im.shape} {im.dtype}; expected (N, 3, W, H) uint8")
        n, _, w, h = im.shape
        if de.shape != (n, w, h) or de.dtype.kind != "f":
            raise PipelineError(f"{path}: depths has shape {de.shape} {de.dtype}; expected ({n}, {w}, {h}) float")
        if n == 0:
            raise PipelineError(f"{path}: holds no images")
    return n, h, w


def read_split(path: Path, split: str, n: int) -> np.ndarray:
    """0-based indices of `split` from splits.mat; PipelineError when missing or out of range 1..n."""
    if split not in SPLIT_KEYS:
        raise PipelineError(f"NYU split {split!r} is not allowed; expected one of {list(SPLIT_KEYS)}")
    if not path.is_file():
        raise PipelineError(f"{path}: no such file; expected {SPLITS_NAME} with trainNdxs and testNdxs")
    try:
        mat = scipy.io.loadmat(path)
    except (ValueError, NotImplementedError, OSError) as e:
        raise PipelineError(f"{path}: not a MATLAB v5 .mat file scipy can read ({e})") from None
    key = SPLIT_KEYS[split]
    if key not in mat:
        raise PipelineError(f"{path}: no '{key}' array; expected trainNdxs and testNdxs (1-based column vectors)")
    raw = np.asarray(mat[key]).ravel()
    if raw.size == 0 or not np.all(raw == np.round(raw)):
        raise PipelineError(f"{path}: {key} must hold a non-empty list of whole 1-based indices")
    idx = raw.astype(np.int64)
    if idx.min() < 1 or idx.max() > n:
        bad = int(idx[(idx < 1) | (idx > n)][0])
        raise PipelineError(f"{path}: {key} holds index {bad}, out of range 1..{n} (the .mat has {n} images)")
    return idx - 1


def eigen_mask(height: int, width: int) -> np.ndarray:
    """(H, W) bool, True inside the Eigen crop scaled from 480 x 640 to height x width."""
    r0, r1, c0, c1 = EIGEN_CROP
    sy, sx = height / NATIVE[0], width / NATIVE[1]
    mask = np.zeros((height, width), bool)
    mask[round(r0 * sy):round(r1 * sy), round(c0 * sx):round(c1 * sx)] = True
    return mask


class NyuDepth(Dataset):
    """`(image, depth)` items: image (3, S, S) normalised float32 (whole frame, bilinear resize) and
    depth (S, S) float32 metres (nearest resize); native (3, H, W) / (H, W) when image_size is None.

    Attributes: indices (0-based rows of the .mat), height, width (native).
    """

    def __init__(self, root: str | Path, split: str, image_size: int | None = None):
        self.root = Path(root)
        if not self.root.is_dir():
            raise PipelineError(f"{self.root}: no such NYU folder; expected {MAT_NAME} and {SPLITS_NAME}")
        self.mat_path = self.root / MAT_NAME
        n, self.height, self.width = check_mat(self.mat_path)
        self.indices = read_split(self.root / SPLITS_NAME, split, n)
        self.image_size = image_size
        self._file: h5py.File | None = None
        self._pid = -1

    def __len__(self) -> int:
        return len(self.indices)

    def _arrays(self) -> h5py.File:
        if self._file is None or self._pid != os.getpid():
            self._file, self._pid = h5py.File(self.mat_path, "r"), os.getpid()
        return self._file

    def __getstate__(self):  # picklable for spawned workers; the handle is reopened there
        return {**self.__dict__, "_file": None, "_pid": -1}

    def raw(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Item i at native size: (H, W, 3) uint8 image, (H, W) float32 depth in metres."""
        f, j = self._arrays(), int(self.indices[i])
        image = np.ascontiguousarray(f["images"][j].transpose(2, 1, 0))
        depth = np.ascontiguousarray(f["depths"][j].T, dtype=np.float32)
        return image, depth

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        image, depth = self.raw(i)
        if self.image_size is not None and (self.height, self.width) != (self.image_size,) * 2:
            size = (self.image_size, self.image_size)
            image = np.asarray(Image.fromarray(image).resize(size, Image.BILINEAR))
            depth = np.asarray(Image.fromarray(depth).resize(size, Image.NEAREST), dtype=np.float32)
        return normalize_uint8(image), torch.from_numpy(depth.copy())
