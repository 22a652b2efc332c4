"""Scene renderer benchmark: images/s on one process, and a label-honesty probe.

    python benchmarks/scenes.py                                        # the embedded default, 2,000 scenes
    python benchmarks/scenes.py 2000 --objects 1 2 --object-size 0.5 0.8 --object-depth 3.2 5.0

The probe fits a logistic regression on 64-bin colour histograms (4x4x4 RGB bins); the class is the
shape, never the colour, so its held-out accuracy should sit near chance (1/8). `object_share` is the
share of pixels that belong to an object. The `--objects`, `--object-size` and `--object-depth` flags
render another `Layout` (`pipeline.data.scenes`): check a generator change here before pretraining on
it (`benchmarks/demo_quality.py` takes the same flags). Prints one JSON object.
"""

import argparse
import dataclasses
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere without installing
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold, cross_val_score

from pipeline.data.scenes import NUM_CLASSES, ROOM, Layout, Scene, render_many, render_scene


def colour_hist(img: np.ndarray) -> np.ndarray:
    q = (img // 64).reshape(-1, 3).astype(np.int64)
    h = np.bincount(q[:, 0] * 16 + q[:, 1] * 4 + q[:, 2], minlength=64).astype(np.float64)
    return h / h.sum()


def histogram_probe(scenes: Sequence[Scene]) -> np.ndarray:
    """Held-out accuracy of each of 5 stratified folds of a logistic regression on the scenes' histograms."""
    x = np.stack([colour_hist(s.image) for s in scenes])
    y = np.array([s.label for s in scenes])
    cv = StratifiedKFold(5, shuffle=True, random_state=0)
    return cross_val_score(LogisticRegression(max_iter=2000), x, y, cv=cv)


def add_layout_args(ap: argparse.ArgumentParser) -> None:
    """The flags of a `Layout` other than the embedded default's (`layout_from_args` reads them)."""
    ap.add_argument("--objects", type=int, nargs=2, default=list(ROOM.count), metavar=("MIN", "MAX"),
                    help="objects per scene (default: %(default)s, the embedded scenes')")
    ap.add_argument("--object-size", type=float, nargs=2, default=list(ROOM.size), metavar=("MIN", "MAX"),
                    help="object radius in metres, before the per-shape area factor (default: %(default)s)")
    ap.add_argument("--object-depth", type=float, nargs=2, default=list(ROOM.depth), metavar=("MIN", "MAX"),
                    help="object distance ahead of the camera in metres (default: %(default)s)")


def layout_from_args(args: argparse.Namespace) -> Layout:
    """The `Layout` the flags name; a bad range stops the script with one line on stderr (exit 2)."""
    try:
        return Layout(count=tuple(args.objects), size=tuple(args.object_size), depth=tuple(args.object_depth))
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


def object_share(scenes: Sequence[Scene]) -> float:
    """Mean share of the pixels that belong to an object (the renderer's object-id buffer)."""
    return float(np.mean([s.object_pixels / s.image[..., 0].size for s in scenes]))


def main(n_probe: int = 2000, n_speed: int = 200, seed: int = 0, layout: Layout = ROOM) -> dict:
    render_scene(seed, 0, layout=layout)  # warm-up
    t0 = time.perf_counter()
    for i in range(n_speed):
        render_scene(seed + 1, i, layout=layout)
    ips1 = n_speed / (time.perf_counter() - t0)
    t0 = time.perf_counter()
    scenes = render_many(seed, range(n_probe), 64, processes=2, layout=layout)
    ips2 = n_probe / (time.perf_counter() - t0)
    folds = histogram_probe(scenes)
    acc = float(folds.mean())
    chance = 1.0 / NUM_CLASSES
    return {
        "image_size": 64,
        "layout": dataclasses.asdict(layout),
        "images_per_s_1proc": round(ips1, 1),
        "images_per_s_2proc": round(ips2, 1),
        "probe_scenes": n_probe,
        "probe": "logreg on 64-bin RGB histograms, 5-fold stratified CV",
        "object_share": round(object_share(scenes), 4),
        "probe_accuracy": round(acc, 4),
        "probe_accuracy_fold_std": round(float(folds.std()), 4),
        "chance": round(chance, 4),
        "within_5_points_of_chance": abs(acc - chance) <= 0.05,
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("n_probe", type=int, nargs="?", default=2000, help="scenes for the probe (default: 2000)")
    add_layout_args(parser)
    cli = parser.parse_args()
    print(json.dumps(main(cli.n_probe, layout=layout_from_args(cli))))
