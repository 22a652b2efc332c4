"""The paper preset on paper: FLOPs of one I-JEPA image, and what 300 epochs of ImageNet-1k cost on 16 A100s.

    python benchmarks/paper_budget.py                 # preset paper: ViT-H/14, 224 px, batch 2048, 300 epochs
    python benchmarks/paper_budget.py --gpus 32 --mfu 0.3 0.45

Counts, with torch's FlopCounterMode on the meta device (no memory, no compute: seconds on any machine),
the model FLOPs of one training image as our step runs it: forward + backward of the context encoder and
the predictor, forward of the target encoder, at the masks of `--draws` seeded batches (the context and
target sizes vary per batch). Then the arithmetic: images = epochs x 1,281,167; time = images x FLOPs /
(GPUs x bf16 peak x MFU), next to the paper's "less than 72 hours on 16 A100 GPUs" (Assran et al. 2023,
Fig. 1 / Sec. 7) for ViT-H/14. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python benchmarks/paper_budget.py` from the root

from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from pipeline.config import from_dict  # noqa: E402
from pipeline.masks import MaskSampler  # noqa: E402
from pipeline.models.ijepa import build_ijepa  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
IMAGENET_TRAIN = 1_281_167
A100_BF16_TFLOPS = 312.0  # dense, SXM (NVIDIA A100 data sheet)
PAPER_HOURS = 72.0  # "< 72 h" for ViT-H/14 on 16 A100 (the paper's own bound)


def flops_per_image(cfg, draws: int, batch: int = 4) -> list[float]:
    """Model FLOPs of one training image at each of `draws` seeded mask batches (FlopCounterMode)."""
    with torch.device("meta"):
        model = build_ijepa(cfg).train()
    sampler = MaskSampler(cfg.mask, model.encoder.grid_size, seed=0)
    images = torch.empty(batch, 3, cfg.data.image_size, cfg.data.image_size, device="meta")
    out = []
    for step in range(draws):
        masks_enc, masks_pred = sampler.sample(batch, step)
        counter = FlopCounterMode(display=False)
        with counter:
            model(images, masks_enc.to("meta"), masks_pred.to("meta")).loss.backward()
        out.append(counter.get_total_flops() / batch)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="paper")
    ap.add_argument("--gpus", type=int, default=16)
    ap.add_argument("--mfu", type=float, nargs="+", default=[0.3, 0.4, 0.5], help="model FLOP utilisations")
    ap.add_argument("--draws", type=int, default=20, help="mask batches to average the FLOPs over")
    args = ap.parse_args()

    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["preset"] = args.preset
    cfg = from_dict(raw)
    per_image = flops_per_image(cfg, args.draws)
    mean = statistics.fmean(per_image)
    images = cfg.pretrain.epochs * IMAGENET_TRAIN
    steps = images / cfg.pretrain.batch_size
    cluster = args.gpus * A100_BF16_TFLOPS * 1e12
    at_mfu = {}
    for mfu in args.mfu:
        seconds = images * mean / (cluster * mfu)
        at_mfu[str(mfu)] = {"hours": round(seconds / 3600, 1), "days": round(seconds / 86400, 2),
                            "s_per_step": round(seconds / steps, 2)}
    print(json.dumps({
        "preset": args.preset, "model": f"{cfg.model.name}/{cfg.model.patch_size}", "image_size": cfg.data.image_size,
        "pred_depth": cfg.model.pred_depth, "batch_size": cfg.pretrain.batch_size, "epochs": cfg.pretrain.epochs,
        "tflop_per_image": round(mean / 1e12, 3), "tflop_per_image_range": [round(min(per_image) / 1e12, 3),
                                                                            round(max(per_image) / 1e12, 3)],
        "images": images, "total_zettaflop": round(images * mean / 1e21, 3), "gpus": args.gpus,
        "gpu_peak_tflops": A100_BF16_TFLOPS, "at_mfu": at_mfu,
        "paper_hours_bound": PAPER_HOURS,
        "mfu_needed_for_paper_bound": round(images * mean / (cluster * PAPER_HOURS * 3600), 3),
    }))


if __name__ == "__main__":
    main()
