"""Throughput of MaskSampler.sample (multiblock, the paper's config): batch 128, 14x14 grid, 1 thread.

Prints one JSON object; the target is >= 100000 images/s.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python benchmarks/masks.py` from the repo root

from pipeline.config import MaskConfig  # noqa: E402
from pipeline.masks import MaskSampler  # noqa: E402

BATCH, GRID, TARGET = 128, (14, 14), 100_000


def main() -> None:
    torch.set_num_threads(1)
    sampler = MaskSampler(MaskConfig(), GRID, seed=0)
    for step in range(50):  # warm-up
        sampler.sample(BATCH, step)
    best = 0.0
    for _ in range(5):
        steps = 400
        t0 = time.perf_counter()
        for step in range(steps):
            sampler.sample(BATCH, step)
        best = max(best, steps * BATCH / (time.perf_counter() - t0))
    print(json.dumps({"benchmark": "masks.sample", "strategy": "multiblock", "batch_size": BATCH,
                      "grid": list(GRID), "threads": 1, "images_per_s": round(best), "target_images_per_s": TARGET,
                      "meets_target": best >= TARGET}))


if __name__ == "__main__":
    main()
