"""Images/s of one full I-JEPA step (masks, forward, backward, AdamW, EMA) in one process.

    python benchmarks/train_step.py --model vit_tiny --patch 8 --image-size 96 --batch 32 --threads 2
    python benchmarks/train_step.py --model vit_base --patch 16 --image-size 224 --batch 128   # on a GPU: bf16

Prints one JSON object: images/s, ms per step, the share of step time spent outside forward + backward
(mask sampling, optimiser step, EMA update, schedules), and the model FLOPs of a step (forward +
backward of the context encoder and predictor, forward of the target encoder, as counted by torch's
FlopCounterMode: matmuls and attention). On CUDA it also prints the model FLOP utilisation, FLOPs/s over
the GPU's dense bf16 peak (`--peak-tflops`, or a known value for A100/H100/H200).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python benchmarks/train_step.py` from the root

from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from pipeline.config import load_config  # noqa: E402
from pipeline.masks import MaskSampler  # noqa: E402
from pipeline.models.ijepa import build_ijepa  # noqa: E402
from pipeline.schedules import Schedules  # noqa: E402
from pipeline.step import autocast, build_optimizer, set_schedules  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
# Dense bf16 tensor-core peaks (TFLOP/s) from the vendors' data sheets; SXM parts.
PEAK_BF16_TFLOPS = {"A100": 312.0, "H100": 989.0, "H200": 989.0}


def peak_tflops(device: torch.device, given: float | None) -> float | None:
    if given is not None or device.type != "cuda":
        return given
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="vit_tiny")
    ap.add_argument("--patch", type=int, default=8)
    ap.add_argument("--image-size", type=int, default=96)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--pred-depth", type=int, default=None, help="default: the demo preset's")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--no-bf16", action="store_true", help="fp32 on CUDA (bf16 autocast is the default there)")
    ap.add_argument("--peak-tflops", type=float, default=None, help="the device's peak, for the MFU")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    bf16 = device.type == "cuda" and not args.no_bf16
    over = {"model.name": args.model, "model.patch_size": args.patch, "data.image_size": args.image_size}
    if args.pred_depth:
        over["model.pred_depth"] = args.pred_depth
    cfg = load_config(ROOT / "params.yaml").replace(**over)
    model = build_ijepa(cfg).to(device).train()
    opt = build_optimizer(model, cfg.optim)
    sched = Schedules(cfg.optim, steps_per_epoch=100, epochs=10)
    sampler = MaskSampler(cfg.mask, model.encoder.grid_size, seed=0)
    images = torch.randn(args.batch, 3, args.image_size, args.image_size, device=device)

    def clock() -> float:  # the benchmark syncs to time the parts; the training loop never does
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter()

    def forward_backward(masks_enc: torch.Tensor, masks_pred: torch.Tensor) -> None:
        with autocast(device, bf16):
            out = model(images, masks_enc, masks_pred)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()

    # The step of pipeline.step.train_step, timed in two parts: forward+backward, and everything else.
    t_fb = t_all = 0.0
    for step in range(args.steps + 2):
        t0 = clock()
        masks_enc, masks_pred = (m.to(device, non_blocking=True) for m in sampler.sample(args.batch, step))
        set_schedules(opt, sched, step)
        t1 = clock()
        forward_backward(masks_enc, masks_pred)
        t2 = clock()
        opt.step()
        model.update_target(sched.momentum(step))
        t3 = clock()
        if step >= 2:  # two warm-up steps
            t_fb += t2 - t1
            t_all += t3 - t0
    n = args.steps
    counter = FlopCounterMode(display=False)
    with counter:
        forward_backward(*(m.to(device) for m in sampler.sample(args.batch, 0)))
    flops, step_s = counter.get_total_flops(), t_all / n
    peak = peak_tflops(device, args.peak_tflops)
    print(json.dumps({
        "benchmark": "train_step", "model": f"{args.model}/{args.patch}", "image_size": args.image_size,
        "batch_size": args.batch, "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "bf16": bf16, "threads": args.threads, "pred_depth": cfg.model.pred_depth, "steps": n,
        "ms_per_step": round(1000 * step_s, 1), "images_per_s": round(args.batch / step_s, 1),
        "share_outside_fwd_bwd": round(1 - t_fb / t_all, 3),
        "gflop_per_step": round(flops / 1e9, 1), "model_tflops_per_s": round(flops / step_s / 1e12, 3),
        "mfu": round(flops / step_s / (peak * 1e12), 3) if peak else None,
    }))


if __name__ == "__main__":
    main()
