"""Images/s of one full I-JEPA step (masks, forward, backward, AdamW, EMA) in one process.

    python benchmarks/train_step.py --model vit_tiny --patch 8 --image-size 96 --batch 32 --threads 2

Prints one JSON object: images/s, ms per step, and the share of step time spent outside
forward + backward (mask sampling, optimiser step, EMA update, schedules).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python benchmarks/train_step.py` from the root

from pipeline.config import load_config  # noqa: E402
from pipeline.masks import MaskCollator  # noqa: E402
from pipeline.models.ijepa import build_ijepa  # noqa: E402
from pipeline.schedules import Schedules  # noqa: E402
from pipeline.step import build_optimizer, set_schedules  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="vit_tiny")
    ap.add_argument("--patch", type=int, default=8)
    ap.add_argument("--image-size", type=int, default=96)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--pred-depth", type=int, default=None, help="default: the demo preset's")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    over = {"model.name": args.model, "model.patch_size": args.patch, "data.image_size": args.image_size}
    if args.pred_depth:
        over["model.pred_depth"] = args.pred_depth
    cfg = load_config(ROOT / "params.yaml").replace(**over)
    model = build_ijepa(cfg).train()
    opt = build_optimizer(model, cfg.optim)
    sched = Schedules(cfg.optim, steps_per_epoch=100, epochs=10)
    collator = MaskCollator(cfg.mask, model.encoder.grid_size, seed=0)
    images = torch.randn(args.batch, 3, args.image_size, args.image_size)

    # The step of pipeline.step.train_step, timed in two parts: forward+backward, and everything else.
    t_fb = t_all = 0.0
    for step in range(args.steps + 2):
        t0 = time.perf_counter()
        masks_enc, masks_pred = collator.sample(args.batch, step)
        set_schedules(opt, sched, step)
        t1 = time.perf_counter()
        out = model(images, masks_enc, masks_pred)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        t2 = time.perf_counter()
        opt.step()
        model.update_target(sched.momentum(step))
        t3 = time.perf_counter()
        if step >= 2:  # two warm-up steps
            t_fb += t2 - t1
            t_all += t3 - t0
    n = args.steps
    print(json.dumps({
        "benchmark": "train_step", "model": f"{args.model}/{args.patch}", "image_size": args.image_size,
        "batch_size": args.batch, "threads": args.threads, "pred_depth": cfg.model.pred_depth, "steps": n,
        "ms_per_step": round(1000 * t_all / n, 1), "images_per_s": round(n * args.batch / t_all, 1),
        "share_outside_fwd_bwd": round(1 - t_fb / t_all, 3),
    }))


if __name__ == "__main__":
    main()
