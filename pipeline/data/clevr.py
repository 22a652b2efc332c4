"""CLEVR v1.0 in its on-disk layout, with the two VTAB tasks the I-JEPA paper reports.

    <root>/images/{train,val}/CLEVR_{split}_{:06d}.png
    <root>/scenes/CLEVR_{split}_scenes.json   {"info": {...}, "scenes": [{"image_filename", "objects": [
                                                  {"pixel_coords": [x, y, depth], ...}, ...]}, ...]}

Tasks (VTAB, task_adaptation/data/clevr.py):
    count_all                number of objects - 3               (8 classes, CLEVR has 3..10 objects)
    closest_object_distance  min over objects of pixel_coords[2], binned by `thresholds`   (6 classes)
                             label i  <=>  thresholds[i] < distance <= thresholds[i + 1]

Thresholds: the argument when given; else `info["closest_object_distance_thresholds"]` of the scenes
file (the synthetic exporter writes the edges it derived from its own training depths there, since
its scenes are in metres, not CLEVR units); else VTAB's edges for real CLEVR.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from pipeline.data.imagenet import load_rgb
from pipeline.errors import PipelineError

VTAB_DISTANCE_THRESHOLDS = (0.0, 8.0, 8.5, 9.0, 9.5, 10.0, 100.0)
THRESHOLDS_INFO_KEY = "closest_object_distance_thresholds"
TASKS = {"count_all": 8, "closest_object_distance": 6}
SPLITS = ("train", "val")
MIN_OBJECTS = 3


def scenes_file(root: Path, split: str) -> Path:
    return Path(root) / "scenes" / f"CLEVR_{split}_scenes.json"


def read_scenes(root: Path, split: str) -> tuple[dict, list[dict]]:
    """(info, scenes) of one split; PipelineError naming the file on a missing or malformed json."""
    path = scenes_file(root, split)
    if not path.is_file():
        raise PipelineError(f"{path}: no such file; expected CLEVR_v1.0/scenes/CLEVR_{split}_scenes.json")
    try:
        doc = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise PipelineError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("scenes"), list) or not doc["scenes"]:
        raise PipelineError(f"{path}: expected {{'info': ..., 'scenes': [...]}} with at least one scene")
    for i, s in enumerate(doc["scenes"]):
        if not isinstance(s, dict) or "image_filename" not in s or not isinstance(s.get("objects"), list):
            raise PipelineError(f"{path}: scenes[{i}] lacks 'image_filename' or an 'objects' list")
        for j, o in enumerate(s["objects"]):
            pc = o.get("pixel_coords") if isinstance(o, dict) else None
            if not (isinstance(pc, list) and len(pc) == 3):
                raise PipelineError(f"{path}: scenes[{i}].objects[{j}] lacks pixel_coords [x, y, depth]")
    info = doc.get("info") if isinstance(doc.get("info"), dict) else {}
    return info, doc["scenes"]


def distance_label(distance: float, thresholds: Sequence[float]) -> int:
    """VTAB binning: the largest i with thresholds[i] < distance (clipped to the 6 classes)."""
    i = int(np.searchsorted(np.asarray(thresholds), distance, side="left")) - 1
    return min(max(i, 0), len(thresholds) - 2)


def check_thresholds(thresholds: Sequence[float], where: str) -> tuple[float, ...]:
    t = tuple(float(v) for v in thresholds)
    if len(t) != TASKS["closest_object_distance"] + 1 or any(b <= a for a, b in zip(t, t[1:], strict=False)):
        raise PipelineError(f"{where}: distance thresholds {list(t)} are not allowed; "
                            "expected 7 strictly increasing bin edges (6 classes)")
    return t


class ClevrDataset(Dataset):
    """`(image, label)` items; `image` is `transform(rgb PIL)` or the RGB PIL image itself.

    Attributes: task, num_classes, thresholds (distance task), samples [(path, label)], targets.
    """

    def __init__(self, root: str | Path, split: str, task: str,
                 transform: Callable[[Image.Image], Any] | None = None,
                 thresholds: Sequence[float] | None = None):
        if split not in SPLITS:
            raise PipelineError(f"CLEVR split {split!r} is not allowed; expected one of {list(SPLITS)}")
        if task not in TASKS:
            raise PipelineError(f"CLEVR task {task!r} is not allowed; expected one of {list(TASKS)}")
        self.root = Path(root)
        if not self.root.is_dir():
            raise PipelineError(f"{self.root}: no such CLEVR folder; expected CLEVR_v1.0 with images/ and scenes/")
        info, scenes = read_scenes(self.root, split)
        self.task, self.num_classes, self.transform = task, TASKS[task], transform
        where = str(scenes_file(self.root, split))
        if thresholds is None:
            thresholds = info.get(THRESHOLDS_INFO_KEY, VTAB_DISTANCE_THRESHOLDS)
        self.thresholds = check_thresholds(thresholds, where)
        image_dir = self.root / "images" / split
        if not image_dir.is_dir():
            raise PipelineError(f"{image_dir}: no such folder; expected the {split} PNGs there")
        present = {e.name for e in os.scandir(image_dir)}
        self.samples: list[tuple[Path, int]] = []
        for i, s in enumerate(scenes):
            name = s["image_filename"]
            if name not in present:
                raise PipelineError(f"{where}: scenes[{i}] names {name}, but {image_dir / name} does not exist")
            self.samples.append((image_dir / name, self._label(s, i, where)))
        self.targets = [label for _, label in self.samples]

    def _label(self, scene: dict, i: int, where: str) -> int:
        objects = scene["objects"]
        if self.task == "count_all":
            n = len(objects)
            if not MIN_OBJECTS <= n < MIN_OBJECTS + self.num_classes:
                raise PipelineError(f"{where}: scenes[{i}] has {n} objects; count_all allows 3..10")
            return n - MIN_OBJECTS
        if not objects:
            raise PipelineError(f"{where}: scenes[{i}] has no objects; closest_object_distance needs one")
        return distance_label(min(float(o["pixel_coords"][2]) for o in objects), self.thresholds)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        path, label = self.samples[index]
        img = load_rgb(path)
        return (self.transform(img) if self.transform is not None else img), label
