"""CLEVR v1.0 loader on a fabricated real-format fixture: VTAB labels, thresholds, RGB, bad input."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.data.clevr import VTAB_DISTANCE_THRESHOLDS, ClevrDataset, distance_label
from pipeline.data.transforms import eval_transform
from pipeline.errors import PipelineError

# (number of objects, closest depth) per train scene; CLEVR depths are ~7..13 units
SCENES = [(3, 7.0), (5, 8.0), (10, 8.2), (4, 9.7), (6, 12.0), (7, 10.0)]


def _obj(depth):
    return {"shape": "cube", "color": "red", "material": "rubber", "size": "large",
            "3d_coords": [0.1, -1.0, 0.7], "pixel_coords": [240, 160, depth], "rotation": 33.0}


def _write(root, split, scenes, info=None):
    (root / "images" / split).mkdir(parents=True, exist_ok=True)
    (root / "scenes").mkdir(exist_ok=True)
    entries = []
    for i, (n, closest) in enumerate(scenes):
        name = f"CLEVR_{split}_{i:06d}.png"
        Image.new("RGBA", (48, 32), (10 * i, 100, 200, 255)).save(root / "images" / split / name)
        objects = [_obj(closest + 0.5 * k) for k in range(n)][::-1]  # the closest is not first
        entries.append({"split": split, "image_index": i, "image_filename": name, "objects": objects})
    doc = {"info": info or {"split": split, "version": "1.0"}, "scenes": entries}
    (root / "scenes" / f"CLEVR_{split}_scenes.json").write_text(json.dumps(doc))


@pytest.fixture
def clevr(tmp_path):
    root = tmp_path / "CLEVR_v1.0"
    _write(root, "train", SCENES)
    _write(root, "val", SCENES[:2], info={"closest_object_distance_thresholds": [0, 7.5, 8.1, 9, 9.5, 10, 100]})
    return root


def test_count_all_labels_and_rgb(clevr):
    ds = ClevrDataset(clevr, "train", "count_all", transform=eval_transform(32))
    assert ds.num_classes == 8 and ds.targets == [n - 3 for n, _ in SCENES]
    x, y = ds[2]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and y == 7
    img, _ = ClevrDataset(clevr, "train", "count_all")[1]
    assert img.mode == "RGB" and img.size == (48, 32)  # RGBA PNG -> RGB


def test_closest_distance_vtab_bins(clevr):
    ds = ClevrDataset(clevr, "train", "closest_object_distance")
    assert ds.num_classes == 6 and ds.thresholds == VTAB_DISTANCE_THRESHOLDS
    # VTAB: label = max i with thresholds[i] < d: 7 -> 0, 8 -> 0 (edge), 8.2 -> 1, 9.7 -> 4, 12 -> 5, 10 -> 4
    assert ds.targets == [0, 0, 1, 4, 5, 4]
    assert [distance_label(d, VTAB_DISTANCE_THRESHOLDS) for d in (0.5, 8.5, 8.51, 99)] == [0, 1, 2, 5]


def test_thresholds_from_info_or_argument(clevr):
    assert ClevrDataset(clevr, "val", "closest_object_distance").targets == [0, 1]  # info: 7.5, 8.1
    ds = ClevrDataset(clevr, "val", "closest_object_distance", thresholds=[0, 1, 2, 3, 4, 7.5, 100])
    assert ds.targets == [4, 5]
    with pytest.raises(PipelineError, match="7 strictly increasing"):
        ClevrDataset(clevr, "val", "closest_object_distance", thresholds=[0, 1, 2])


def test_bad_input(clevr, tmp_path):
    with pytest.raises(PipelineError, match="no such CLEVR folder"):
        ClevrDataset(tmp_path / "nope", "train", "count_all")
    with pytest.raises(PipelineError, match="task 'count' is not allowed"):
        ClevrDataset(clevr, "train", "count")
    (clevr / "images" / "val" / "CLEVR_val_000001.png").unlink()
    with pytest.raises(PipelineError, match=r"CLEVR_val_scenes.json: scenes\[1\] names CLEVR_val_000001.png"):
        ClevrDataset(clevr, "val", "count_all")
    _write(clevr, "val", [(11, 8.0)])
    with pytest.raises(PipelineError, match=r"scenes\[0\] has 11 objects; count_all allows 3..10"):
        ClevrDataset(clevr, "val", "count_all")
    (clevr / "scenes" / "CLEVR_val_scenes.json").write_text("{not json")
    with pytest.raises(PipelineError, match="CLEVR_val_scenes.json: not valid JSON"):
        ClevrDataset(clevr, "val", "count_all")
    (clevr / "scenes" / "CLEVR_val_scenes.json").write_text(json.dumps({"scenes": [{"objects": []}]}))
    with pytest.raises(PipelineError, match=r"scenes\[0\] lacks 'image_filename'"):
        ClevrDataset(clevr, "val", "count_all")
    (clevr / "scenes" / "CLEVR_val_scenes.json").unlink()
    with pytest.raises(PipelineError, match="CLEVR_val_scenes.json: no such file"):
        ClevrDataset(clevr, "val", "count_all")


def test_distance_bins_balanced_on_quantile_edges():
    from pipeline.data.export import distance_thresholds

    d = np.random.default_rng(0).uniform(2.8, 7.5, 600)
    t = distance_thresholds(d)
    counts = np.bincount([distance_label(v, t) for v in d], minlength=6)
    assert len(t) == 7 and counts.min() >= 99 and counts.max() <= 101
