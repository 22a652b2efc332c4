"""ImageNet in its on-disk layout: `<root>/{train,val}/<wnid>/*.JPEG` plus the SimCLR/I-JEPA 1% list.

Class index = position of the wnid in the sorted list of class folders (torchvision ImageFolder).
The 1% list holds one file name per line (`n01440764_10026.JPEG`); its class is the text before the
first `_`, its file `train/<wnid>/<name>`.

Corrupt images (truncated, not an image at all) are found lazily, when `__getitem__` decodes them:
with on_corrupt="skip" the item is replaced by the next good one and `num_corrupt` counts the bad
files this process met; with "fail" a `CorruptImageError` names the file. Decoding every file up
front would take minutes on real ImageNet; `scan_images` does it once, for the prepare stage.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from pipeline.errors import PipelineError

IMAGE_EXTENSIONS = (".jpeg", ".jpg", ".png")
SPLITS = ("train", "val")
ON_CORRUPT = ("skip", "fail")


class CorruptImageError(PipelineError):
    """An image file that cannot be decoded; `str()` names it."""


def load_rgb(path: Path, draft: int | None = None) -> Image.Image:
    """Decode `path` fully and return it as RGB (CMYK, grayscale, palette, PNG-inside-.JPEG all work).

    `draft` lets the JPEG decoder work at a reduced scale (>= draft px): it still reads the whole
    stream, so truncation is still caught, at a fraction of the cost (used by `scan_images`).
    """
    try:
        with Image.open(path) as img:
            if draft is not None:
                img.draft("RGB", (draft, draft))
            img.load()  # force the decode here, where the error can name the file
            return img.convert("RGB")
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as e:
        # PIL raises OSError ("image file is truncated"), UnidentifiedImageError, or SyntaxError
        # (broken PNG chunks); all mean the same to us.
        raise CorruptImageError(f"{path}: corrupt or truncated image ({type(e).__name__}: {e})") from None


def is_image_file(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")


def find_classes(split_dir: Path) -> list[str]:
    """Sorted class folder names of one split; PipelineError when the split is missing or empty."""
    if not split_dir.is_dir():
        raise PipelineError(f"{split_dir}: no such folder; expected a split folder with one sub-folder per class")
    classes = sorted(e.name for e in os.scandir(split_dir) if e.is_dir() and not e.name.startswith("."))
    if not classes:
        raise PipelineError(f"{split_dir}: empty; expected one sub-folder per class (e.g. n01440764/)")
    return classes


def list_images(class_dir: Path) -> list[Path]:
    """Sorted image files of one class folder; PipelineError when there are none."""
    files = sorted(Path(e.path) for e in os.scandir(class_dir) if e.is_file() and is_image_file(Path(e.name)))
    if not files:
        raise PipelineError(f"{class_dir}: class folder holds no images (.JPEG/.jpg/.png)")
    return files


def read_subset(subset_file: Path, train_dir: Path, class_to_idx: dict[str, int]) -> list[tuple[Path, int]]:
    """The 1% list as (train/<wnid>/<name>, label), in file order; PipelineError on a bad line or file."""
    subset_file = Path(subset_file)
    if not subset_file.is_file():
        raise PipelineError(f"{subset_file}: no such subset list; expected one n01440764_10026.JPEG per line")
    samples = []
    for lineno, line in enumerate(subset_file.read_text().splitlines(), 1):
        name = line.strip()
        if not name:
            continue
        wnid = name.split("_", 1)[0]
        if "_" not in name or wnid not in class_to_idx:
            raise PipelineError(f"{subset_file}:{lineno}: {name!r} does not start with a known class "
                                f"(<wnid>_<n>.JPEG, wnid one of the {len(class_to_idx)} train folders)")
        path = train_dir / wnid / name
        if not path.is_file():
            raise PipelineError(f"{subset_file}:{lineno}: names {name}, but {path} does not exist")
        samples.append((path, class_to_idx[wnid]))
    if not samples:
        raise PipelineError(f"{subset_file}: empty subset list")
    return samples


class ImageNetFolder(Dataset):
    """`(image, label)` items of one split; `image` is `transform(rgb PIL)` or the RGB PIL image itself.

    Attributes: classes (sorted wnids), class_to_idx, samples [(path, label)], targets [label],
    num_corrupt (bad files met by this process when on_corrupt="skip").
    """

    def __init__(self, root: str | Path, split: str, transform: Callable[[Image.Image], Any] | None = None,
                 subset_file: str | Path | None = None, on_corrupt: str = "skip"):
        if split not in SPLITS:
            raise PipelineError(f"ImageNet split {split!r} is not allowed; expected one of {list(SPLITS)}")
        if on_corrupt not in ON_CORRUPT:
            raise PipelineError(f"on_corrupt {on_corrupt!r} is not allowed; expected one of {list(ON_CORRUPT)}")
        if subset_file is not None and split != "train":
            raise PipelineError(f"subset_file {subset_file} selects train images; split {split!r} cannot use it")
        self.root = Path(root)
        if not self.root.is_dir():
            raise PipelineError(f"{self.root}: no such ImageNet folder; expected train/<wnid>/ and val/<wnid>/")
        split_dir = self.root / split
        self.classes = find_classes(split_dir)
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}
        if subset_file is not None:
            self.samples = read_subset(Path(subset_file), split_dir, self.class_to_idx)
        else:
            self.samples = [(p, i) for i, c in enumerate(self.classes) for p in list_images(split_dir / c)]
        self.targets = [label for _, label in self.samples]
        self.transform = transform
        self.on_corrupt = on_corrupt
        self.num_corrupt = 0
        self._bad: set[int] = set()

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        # A skipped item is replaced by the next good one, so a DataLoader always gets a full batch.
        for step in range(len(self.samples)):
            i = (index + step) % len(self.samples)
            if i in self._bad:
                continue
            path, label = self.samples[i]
            try:
                img = load_rgb(path)
            except CorruptImageError:
                if self.on_corrupt == "fail":
                    raise
                self._bad.add(i)
                self.num_corrupt += 1
                continue
            return (self.transform(img) if self.transform is not None else img), label
        raise PipelineError(f"{self.root}: every image of the split is corrupt")


def scan_images(paths: Iterable[Path], processes: int = 1, progress: Callable | None = None
                ) -> list[tuple[int, int] | None]:
    """Decode every file (JPEG at draft scale): its (width, height), or None when corrupt; input order."""
    paths = list(paths)
    wrap = progress or (lambda it, **_: it)
    if processes <= 1 or len(paths) < 512:
        return [_size_or_none(p) for p in wrap(paths, desc="checking images", total=len(paths))]
    import multiprocessing as mp

    ctx = mp.get_context("fork") if "fork" in mp.get_all_start_methods() else mp.get_context()
    with ctx.Pool(processes) as pool:
        it = pool.imap(_size_or_none, paths, chunksize=256)
        return list(wrap(it, desc="checking images", total=len(paths)))


def _size_or_none(path: Path) -> tuple[int, int] | None:
    try:
        with Image.open(path) as img:
            size = img.size  # from the header, before draft() shrinks it
        load_rgb(path, draft=64)
    except (CorruptImageError, OSError, UnidentifiedImageError, ValueError, SyntaxError):
        return None
    return size
