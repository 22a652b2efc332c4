"""Ray's overhead: the same pretraining steps through a 1-worker TorchTrainer and as a bare loop in one process.

    python benchmarks/ray_overhead.py --image-size 32 --batch 16 --steps 30

Both run `pipeline.train.train_worker` with one intra-op thread on the same data and config; throughput
is the steady state (images/s between the first and the last logged step, so start-up and the first
step are excluded). Prints one JSON object: both throughputs, their ratio, Ray's start-up seconds, and
whether Ray adds less than 10 % once started (the target).
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python benchmarks/ray_overhead.py` from the root

from pipeline import ray_train  # noqa: E402
from pipeline.config import load_config  # noqa: E402
from pipeline.data.random_images import RandomImages  # noqa: E402
from pipeline.train import set_threads, train_worker  # noqa: E402
from pipeline.train_state import load_checkpoint  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TARGET = 0.10


def steady_images_per_s(history: list[dict], batch: int) -> float:
    """Images/s from the first to the last logged step, using the per-interval rates (time = images / rate)."""
    rows = history[1:]
    seconds = sum(batch * (b["step"] - a["step"]) / b["images_per_s"] for a, b in zip(history, rows, strict=False))
    return batch * (history[-1]["step"] - history[0]["step"]) / seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--image-size", type=int, default=32)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--model", default="vit_tiny")
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="ray-overhead-"))
    cfg = load_config(ROOT / "params.yaml").replace(**{
        "data.image_size": args.image_size, "data.num_workers": 0, "model.name": args.model,
        "pretrain.epochs": 1, "pretrain.batch_size": args.batch, "pretrain.log_every": 1,
        "pretrain.checkpoint_every": args.steps, "ray.num_workers": 1, "ray.storage_path": str(tmp),
        "mask.min_keep": 2,
    })
    data = functools.partial(RandomImages, args.steps * args.batch, args.image_size)

    set_threads(1)
    bare: list[dict] = []
    t0 = time.perf_counter()
    train_worker(cfg, data(), lambda m, d: bare.extend(load_checkpoint(d)["history"]) if d else None)
    bare_wall = time.perf_counter() - t0

    t0 = time.perf_counter()
    ray_train.init_ray(cfg.ray)
    t_init = time.perf_counter() - t0
    result = ray_train.build_trainer(cfg, data, "ray-overhead", tmp).fit()
    ray_wall = time.perf_counter() - t0
    history = load_checkpoint(result.checkpoint.path)["history"]

    bare_ips, ray_ips = steady_images_per_s(bare, args.batch), steady_images_per_s(history, args.batch)
    overhead = 1 - ray_ips / bare_ips
    print(json.dumps({
        "benchmark": "ray_overhead", "model": f"{args.model}/{cfg.model.patch_size}", "image_size": args.image_size,
        "batch_size": args.batch, "steps": args.steps, "threads": 1,
        "bare_images_per_s": round(bare_ips, 2), "ray_images_per_s": round(ray_ips, 2),
        "ray_over_bare": round(ray_ips / bare_ips, 3), "steady_overhead": round(overhead, 3),
        "bare_wall_s": round(bare_wall, 1), "ray_wall_s": round(ray_wall, 1), "ray_init_s": round(t_init, 1),
        "ray_startup_s": round(ray_wall - args.steps * args.batch / ray_ips, 1),
        "target_overhead": TARGET, "meets_target": overhead < TARGET,
    }), flush=True)
    ray_train.shutdown_ray()


if __name__ == "__main__":
    main()
