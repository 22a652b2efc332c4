"""Scene renderer benchmark: images/s on one process, and a label-honesty probe.

The probe fits a logistic regression on 64-bin colour histograms (4x4x4 RGB bins); the class is the
shape, never the colour, so its held-out accuracy should sit near chance (1/8). Prints one JSON object.
"""

import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere without installing
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold, cross_val_score

from pipeline.data.scenes import NUM_CLASSES, Scene, render_many, render_scene


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


def main(n_probe: int = 2000, n_speed: int = 200, seed: int = 0) -> dict:
    render_scene(seed, 0)  # warm-up
    t0 = time.perf_counter()
    for i in range(n_speed):
        render_scene(seed + 1, i)
    ips1 = n_speed / (time.perf_counter() - t0)
    t0 = time.perf_counter()
    scenes = render_many(seed, range(n_probe), 64, processes=2)
    ips2 = n_probe / (time.perf_counter() - t0)
    folds = histogram_probe(scenes)
    acc = float(folds.mean())
    chance = 1.0 / NUM_CLASSES
    return {
        "image_size": 64,
        "images_per_s_1proc": round(ips1, 1),
        "images_per_s_2proc": round(ips2, 1),
        "probe_scenes": n_probe,
        "probe": "logreg on 64-bin RGB histograms, 5-fold stratified CV",
        "probe_accuracy": round(acc, 4),
        "probe_accuracy_fold_std": round(float(folds.std()), 4),
        "chance": round(chance, 4),
        "within_5_points_of_chance": abs(acc - chance) <= 0.05,
    }


if __name__ == "__main__":
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 2000
    print(json.dumps(main(n)))
